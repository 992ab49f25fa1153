//! Crash safety of the bundled runbooks: kill the process with SIGKILL at 20 points spread over
//! a run (before, during and after requests), resume, and compare the final world with an
//! uninterrupted run's: the same resources and properties, exactly one key version, no
//! duplicate role assignments, and no step applied again after its checkpoint.

mod support;

use std::collections::BTreeMap;
use std::process::{Command, Output, Stdio};
use std::time::Instant;

use serde_json::{Value, json};

const KILL_POINTS: usize = 20;
/// Chooses where in its slice of the run each kill lands; change it to explore other points.
const SEED: u64 = 0x006b_6d73_666c_6f77;

/// A number in [0, 1) from the seed and the kill point (SplitMix64).
fn unit(seed: u64, point: usize) -> f64 {
    let mut z = seed.wrapping_add((point as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15));
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    (z ^ (z >> 31)) as f64 / (u64::MAX as f64 + 1.0)
}
const CALLER: &str = "00000000-0000-4000-8000-ca11e4000001";
/// Writes answered 40 ms after they take effect, and cluster operations of 300 ms: a run
/// lasts long enough to be killed anywhere in it.
const FAULTS: &str =
    "latency: { min_ms: 0, max_ms: 5, write_ms: 40 }\ndelays: { cluster_operation: 300ms }\n";

fn kmsflow(dir: &std::path::Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(support::consenting(args))
        .current_dir(dir)
        .env("KMSFLOW_STATE", dir.join("state.db"))
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .env_remove("IDENTITY_ENDPOINT");
    command
}

fn output(dir: &std::path::Path, args: &[&str]) -> Output {
    kmsflow(dir, args).output().unwrap()
}

/// The world reduced to what must match: resources and their KMS-relevant properties, key
/// version counts, and role assignments by (scope, role, whose).
fn normalized(dir: &std::path::Path) -> Value {
    let world: Value =
        serde_json::from_str(&std::fs::read_to_string(dir.join("state.sandbox.json")).unwrap())
            .unwrap();
    let resources: BTreeMap<String, Value> = world["resources"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(id, r)| {
            let p = &r["properties"];
            (
                id.clone(),
                json!({
                    "type": r["type"],
                    "rbac": p["enableRbacAuthorization"],
                    "acls": [p["networkAcls"]["defaultAction"], p["networkAcls"]["bypass"]],
                    "security": p["securityProfile"],
                    "identity_type": r["identity"]["type"],
                }),
            )
        })
        .collect();
    let security: Vec<Value> = resources.values().map(|r| r["security"].clone()).collect();
    let keys: BTreeMap<String, usize> = world["keys"]
        .as_array()
        .unwrap()
        .iter()
        .map(|k| {
            (
                format!("{}/{}", k[0].as_str().unwrap(), k[1].as_str().unwrap()),
                k[2].as_array().unwrap().len(),
            )
        })
        .collect();
    let mut assignments: Vec<String> = world["assignments"]
        .as_object()
        .unwrap()
        .values()
        .map(|a| {
            let whose = if a["principal"] == CALLER {
                "caller"
            } else {
                "identity"
            };
            format!(
                "{}|{}|{whose}",
                a["scope"].as_str().unwrap(),
                a["role"].as_str().unwrap()
            )
        })
        .collect();
    assignments.sort();
    // Key ids carry the sandbox's port: compare the security profiles without it.
    let text = json!({"resources": resources, "keys": keys, "assignments": assignments, "groups": world["groups"].as_object().unwrap().keys().collect::<Vec<_>>(), "security": security}).to_string();
    let without_ports = regex_free_port_strip(&text);
    serde_json::from_str(&without_ports).unwrap()
}

fn regex_free_port_strip(text: &str) -> String {
    // Plain sandboxes put their address in URLs, TLS ones their port after the host name.
    let mut text = text.to_owned();
    for marker in ["http://127.0.0.1:", ".sandbox.localhost:"] {
        let mut out = String::with_capacity(text.len());
        let mut rest = text.as_str();
        while let Some(index) = rest.find(marker) {
            out.push_str(&rest[..index + marker.len()]);
            out.push_str("PORT");
            rest = &rest[index + marker.len()..];
            rest = rest.trim_start_matches(|c: char| c.is_ascii_digit());
        }
        out.push_str(rest);
        text = out;
    }
    text
}

/// No step was applied again after it had checkpointed success.
fn assert_no_reapply(dir: &std::path::Path, run_id: &str) {
    let events: Value =
        serde_json::from_slice(&output(dir, &["events", run_id, "--output", "json"]).stdout)
            .unwrap();
    let mut succeeded = std::collections::HashSet::new();
    for event in events.as_array().unwrap() {
        let step = event["step_id"].as_str().unwrap_or_default().to_owned();
        match event["kind"].as_str().unwrap() {
            "step_succeeded" => {
                succeeded.insert(step);
            }
            "step_applying" => assert!(
                !succeeded.contains(&step),
                "`{step}` was applied after it succeeded"
            ),
            _ => {}
        }
    }
}

fn crash_and_resume(runbook: &str) {
    let reference = tempfile::tempdir().unwrap();
    std::fs::write(reference.path().join("faults.yaml"), FAULTS).unwrap();
    let started = Instant::now();
    let run = output(
        reference.path(),
        &[
            "run",
            runbook,
            "--sandbox",
            "--sandbox-faults",
            "faults.yaml",
        ],
    );
    let duration = started.elapsed();
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let expected = normalized(reference.path());
    assert!(
        expected["keys"]
            .as_object()
            .unwrap()
            .values()
            .all(|n| *n == 1)
    );

    let results: Vec<(usize, Result<(), String>)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..KILL_POINTS)
            .map(|point| {
                let expected = &expected;
                scope.spawn(move || {
                    let dir = tempfile::tempdir().unwrap();
                    std::fs::write(dir.path().join("faults.yaml"), FAULTS).unwrap();
                    // One kill in each twentieth of a run, placed within it by the seed.
                    let kill_at = duration.mul_f64((point as f64 + unit(SEED, point)) / KILL_POINTS as f64);
                    let mut child = kmsflow(dir.path(), &["run", runbook, "--sandbox", "--sandbox-faults", "faults.yaml"])
                        .stdout(Stdio::null())
                        .stderr(Stdio::null())
                        .spawn()
                        .unwrap();
                    std::thread::sleep(kill_at);
                    let _ = child.kill();
                    child.wait().unwrap();
                    let runs: Value = serde_json::from_slice(&output(dir.path(), &["runs", "--output", "json"]).stdout).unwrap();
                    let finish = match runs.as_array().and_then(|r| r.first()) {
                        Some(run) if run["status"] == "succeeded" => None,
                        Some(run) => Some(run["id"].as_str().unwrap().to_owned()),
                        None => {
                            // Killed before the run was recorded: start it again.
                            let again = output(dir.path(), &["run", runbook, "--sandbox"]);
                            if !again.status.success() {
                                return Err(format!("rerun failed: {}", String::from_utf8_lossy(&again.stderr)));
                            }
                            None
                        }
                    };
                    if let Some(run_id) = &finish {
                        let resumed = output(dir.path(), &["resume", run_id, "--sandbox"]);
                        if !resumed.status.success() {
                            return Err(format!("resume failed: {}", String::from_utf8_lossy(&resumed.stderr)));
                        }
                        assert_no_reapply(dir.path(), run_id);
                    }
                    let found = normalized(dir.path());
                    if found != *expected {
                        return Err(format!("world differs after a kill at {kill_at:?}:\nexpected {expected:#}\nfound {found:#}"));
                    }
                    Ok(())
                })
            })
            .collect();
        handles
            .into_iter()
            .enumerate()
            .map(|(i, h)| (i, h.join().unwrap()))
            .collect()
    });
    let failures: Vec<String> = results
        .into_iter()
        .filter_map(|(point, result)| result.err().map(|e| format!("kill point {point}: {e}")))
        .collect();
    assert!(failures.is_empty(), "{}", failures.join("\n\n"));
}

#[test]
fn cmk_private_vault_new_cluster_survives_kills_anywhere() {
    crash_and_resume("cmk-private-vault-new-cluster");
}

#[test]
fn migrate_pmk_to_cmk_survives_kills_anywhere() {
    crash_and_resume("migrate-pmk-to-cmk");
}
