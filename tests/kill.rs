//! Kill points placed by events, not by sleeps: a run (and a rollback) is SIGKILLed right after
//! its k-th write reached the sandbox, for every k, and resumed; each ends in the world an
//! undisturbed run leaves. The sandbox holds every write's answer back after applying it, so
//! each kill loses an answer, as a crash between a request and its checkpoint does. Which step
//! each kill hit is recorded, and every step that writes must have been hit.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Served, serve};

/// The names `--sandbox` would default to, as `-p` for a runbook that declares them.
fn params(runbook: &str) -> Vec<String> {
    let names: &[(&str, &str)] = match runbook {
        "migrate-cmk-to-pmk" => &[
            ("resource_group", "rg-kms-sandbox"),
            ("cluster", "aks-sandbox"),
        ],
        _ => &[
            ("resource_group", "rg-kms-sandbox"),
            ("cluster", "aks-sandbox"),
            ("key_vault", "kv-kms-sandbox"),
            ("identity", "id-kms-sandbox"),
        ],
    };
    names
        .iter()
        .flat_map(|(k, v)| ["-p".to_owned(), format!("{k}={v}")])
        .collect()
}

/// Where the runs keep their state.
#[derive(Clone, Copy, PartialEq)]
enum Backend {
    /// `state.db` in the test's folder.
    Sqlite,
    /// A database of its own on the test process's throwaway PostgreSQL server.
    Postgres,
}

/// A fresh sandbox seeded for `runbook`, answering every write 150 ms after applying it, and
/// a fresh state on `backend`.
fn sandbox(dir: &Path, runbook: &str, backend: Backend) -> Served {
    let faults = dir.join("faults.yaml");
    std::fs::write(
        &faults,
        "latency: { min_ms: 0, max_ms: 0, write_ms: 150 }\n",
    )
    .unwrap();
    let mut served = serve(&["--faults", faults.to_str().unwrap(), "--world", runbook]);
    if backend == Backend::Postgres {
        served.state = Some(kmsflow_pgtest::server().database());
    }
    served
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn run_args<'a>(command: &'a str, target: &'a str, params: &'a [String]) -> Vec<&'a str> {
    let mut args = vec![command, target];
    args.extend(params.iter().map(String::as_str));
    args
}

/// What must be the same after a disturbed run as after an undisturbed one: which resources
/// exist, how many versions each key has, which grants are in place, the cluster's KMS.
/// Addresses and generated ids differ between sandboxes and are left out.
fn summary(world: &Value, base_url: &str) -> Value {
    let text = |v: &Value| v.as_str().unwrap_or_default().to_lowercase();
    let resources: BTreeSet<String> = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .map(|r| format!("{} {}", text(&r["type"]), text(&r["name"])))
        .collect();
    let keys: BTreeMap<String, usize> = world["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_array().unwrap().len()))
        .collect();
    let grants: Vec<String> = {
        let mut grants: Vec<String> = world["role_assignments"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let role = text(&a["properties"]["roleDefinitionId"]);
                let scope = text(&a["properties"]["scope"]);
                format!(
                    "{} on {}",
                    role.rsplit('/').next().unwrap(),
                    scope.rsplit('/').next().unwrap()
                )
            })
            .collect();
        grants.sort();
        grants
    };
    let cluster = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| text(&r["type"]) == "microsoft.containerservice/managedclusters")
        .map(|c| {
            let profile = c["properties"]["securityProfile"].to_string();
            json!({
                "state": c["properties"]["provisioningState"],
                "security_profile": profile.replace(base_url, "BASE"),
                "identity": c["identity"]["type"],
            })
        });
    json!({"resources": resources, "keys": keys, "grants": grants, "cluster": cluster})
}

/// The run's id and its steps, from `show`.
fn show(served: &Served, dir: &Path, run: &str) -> Value {
    let out = served
        .kmsflow(dir, &["show", run, "--output", "json"])
        .output()
        .unwrap();
    serde_json::from_slice(&out.stdout).unwrap()
}

fn only_run(served: &Served, dir: &Path) -> String {
    let out = served
        .kmsflow(dir, &["runs", "--output", "json"])
        .output()
        .unwrap();
    let runs: Value = serde_json::from_slice(&out.stdout).unwrap();
    runs[0]["id"].as_str().unwrap().to_owned()
}

/// Starts `args` and SIGKILLs it once the sandbox has served `k` more writes than `from`.
/// Returns whether the kill came before the process ended on its own.
fn kill_at_write(served: &Served, dir: &Path, args: &[&str], from: usize, k: usize) -> bool {
    let mut child = served
        .kmsflow(dir, args)
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if served.writes() >= from + k {
            let killed = child.try_wait().unwrap().is_none();
            let _ = child.kill();
            child.wait().unwrap();
            return killed;
        }
        if child.try_wait().unwrap().is_some() || Instant::now() > deadline {
            return false;
        }
        std::thread::sleep(Duration::from_millis(2));
    }
}

/// The steps a run found `running` (its before image committed, its outcome not): the ones
/// a kill interrupted mid-write.
fn interrupted_steps(run: &Value) -> Vec<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| s["status"] == "running")
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Steps of an undisturbed run that changed something in Azure.
fn writing_steps(run: &Value) -> BTreeSet<String> {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|s| {
            s["uses"].as_str().unwrap().starts_with("azure.")
                && !matches!(s["outcome"].as_str(), Some("unchanged") | None)
        })
        .map(|s| s["id"].as_str().unwrap().to_owned())
        .collect()
}

/// Resumes (or rolls back again) until the run ends, at most a few times.
fn finish(served: &Served, dir: &Path, command: &str, run: &str) -> Output {
    let mut output = served.kmsflow(dir, &[command, run]).output().unwrap();
    for _ in 0..2 {
        if output.status.success() {
            break;
        }
        output = served.kmsflow(dir, &[command, run]).output().unwrap();
    }
    output
}

fn every_write_killed_and_resumed(runbook: &str, backend: Backend) {
    let params = params(runbook);
    // The undisturbed run: its world, its writes, the steps that make them.
    let calm = tempfile::tempdir().unwrap();
    let served = sandbox(calm.path(), runbook, backend);
    let out = served
        .kmsflow(calm.path(), &run_args("run", runbook, &params))
        .output()
        .unwrap();
    assert!(out.status.success(), "{runbook}: {}", stderr(&out));
    let writes = served.writes();
    let wanted = summary(&served.world(), &served.base_url);
    let writers = writing_steps(&show(&served, calm.path(), &only_run(&served, calm.path())));
    drop(served);
    assert!(writes > 0);

    let mut hit: BTreeMap<usize, Vec<String>> = BTreeMap::new();
    for k in 1..=writes {
        let dir = tempfile::tempdir().unwrap();
        let served = sandbox(dir.path(), runbook, backend);
        let killed = kill_at_write(
            &served,
            dir.path(),
            &run_args("run", runbook, &params),
            0,
            k,
        );
        assert!(killed, "{runbook}: the run ended before its write {k}");
        let run = only_run(&served, dir.path());
        hit.insert(k, interrupted_steps(&show(&served, dir.path(), &run)));
        let resumed = finish(&served, dir.path(), "resume", &run);
        assert!(
            resumed.status.success(),
            "{runbook}, killed at write {k}: {}",
            stderr(&resumed)
        );
        assert_eq!(
            summary(&served.world(), &served.base_url),
            wanted,
            "{runbook}, killed at write {k} (in {:?}), resumed",
            hit[&k]
        );
    }
    let seen: BTreeSet<String> = hit.values().flatten().cloned().collect();
    let missed: Vec<&String> = writers.difference(&seen).collect();
    assert!(
        missed.is_empty(),
        "{runbook}: no kill hit {missed:?}; kills hit {hit:?}"
    );
}

#[test]
fn cmk_private_vault_new_cluster_killed_at_every_write_resumes_to_the_undisturbed_world() {
    every_write_killed_and_resumed("cmk-private-vault-new-cluster", Backend::Sqlite);
}

#[test]
fn migrate_pmk_to_cmk_killed_at_every_write_resumes_to_the_undisturbed_world() {
    every_write_killed_and_resumed("migrate-pmk-to-cmk", Backend::Sqlite);
}

#[test]
fn migrate_cmk_to_pmk_killed_at_every_write_resumes_to_the_undisturbed_world() {
    every_write_killed_and_resumed("migrate-cmk-to-pmk", Backend::Sqlite);
}

/// The same kills with the state on PostgreSQL: every transition is committed there before
/// the next action, so a kill anywhere resumes to the undisturbed world.
#[test]
fn migrate_pmk_to_cmk_on_postgres_killed_at_every_write_resumes_to_the_undisturbed_world() {
    every_write_killed_and_resumed("migrate-pmk-to-cmk", Backend::Postgres);
}

#[test]
fn a_rollback_killed_at_every_write_continues_to_the_undisturbed_rollback() {
    let runbook = "cmk-private-vault-new-cluster";
    let params = params(runbook);
    let run_and_count = |served: &Served, dir: &Path| {
        let out = served
            .kmsflow(dir, &run_args("run", runbook, &params))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", stderr(&out));
        (only_run(served, dir), served.writes())
    };
    let calm = tempfile::tempdir().unwrap();
    let served = sandbox(calm.path(), runbook, Backend::Sqlite);
    let (run, before) = run_and_count(&served, calm.path());
    let out = served
        .kmsflow(calm.path(), &["rollback", &run])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    let writes = served.writes() - before;
    let wanted = summary(&served.world(), &served.base_url);
    drop(served);
    assert!(writes > 0);

    for k in 1..=writes {
        let dir = tempfile::tempdir().unwrap();
        let served = sandbox(dir.path(), runbook, Backend::Sqlite);
        let (run, before) = run_and_count(&served, dir.path());
        let killed = kill_at_write(&served, dir.path(), &["rollback", &run], before, k);
        assert!(killed, "the rollback ended before its write {k}");
        let status = show(&served, dir.path(), &run)["status"].clone();
        assert_eq!(status, "rolling_back", "killed at rollback write {k}");
        let refused = served
            .kmsflow(dir.path(), &["resume", &run])
            .output()
            .unwrap();
        assert_eq!(
            refused.status.code(),
            Some(2),
            "a half-rolled-back run is not resumed: {}",
            stderr(&refused)
        );
        let again = finish(&served, dir.path(), "rollback", &run);
        assert!(
            again.status.success(),
            "rollback write {k}: {}",
            stderr(&again)
        );
        assert_eq!(
            summary(&served.world(), &served.base_url),
            wanted,
            "rollback killed at write {k}, then run again"
        );
    }
}
