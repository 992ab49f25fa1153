//! Rollouts end to end: `kmsflow run RUNBOOK --targets FILE` over a fleet of sandbox clusters
//! in another process, judged by the sandbox's world and request log, not by what kmsflow
//! says of itself.

mod support;

use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::process::{Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::{Served, serve};

const SUBSCRIPTION: &str = "00000000-0000-4000-8000-5a4db0c5ab0c";
const GROUPS: &[&str] = &["rg-east", "rg-west", "rg-north"];

fn cluster_name(i: usize) -> String {
    format!("aks-{i:03}")
}

/// A world of `n` PMK clusters over three resource groups, plus a vault and an identity that
/// exist before the rollout (nothing may touch them), and the targets CSV: each cluster with
/// its own vault and identity.
fn fleet(dir: &Path, n: usize) {
    let mut resources = vec![
        json!({
            "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-east/providers/Microsoft.KeyVault/vaults/kv-keep"),
            "name": "kv-keep", "type": "Microsoft.KeyVault/vaults", "location": "eastus", "tags": {},
            "properties": {"tenantId": "00000000-0000-4000-8000-7e4a47000001", "sku": {"family": "A", "name": "standard"},
                "enableRbacAuthorization": true, "enableSoftDelete": true, "softDeleteRetentionInDays": 90,
                "publicNetworkAccess": "Enabled", "accessPolicies": [], "provisioningState": "Succeeded"},
        }),
        json!({
            "id": format!("/subscriptions/{SUBSCRIPTION}/resourcegroups/rg-east/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-keep"),
            "name": "id-keep", "type": "Microsoft.ManagedIdentity/userAssignedIdentities", "location": "eastus", "tags": {},
            "properties": {"clientId": "00000000-0000-4000-8000-00000000c11e", "principalId": "00000000-0000-4000-8000-00000000a1d0", "tenantId": "sandbox"},
        }),
    ];
    let mut targets = String::from("resource_group,cluster,key_vault,identity\n");
    for i in 0..n {
        let (group, name) = (GROUPS[i % GROUPS.len()], cluster_name(i));
        targets.push_str(&format!("{group},{name},kv-{name},id-{name}\n"));
        resources.push(json!({
            "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/{group}/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "eTag": "00000000-0000-4000-8000-0000000e7a90",
            "identity": {"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"},
            "properties": {
                "provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
                "dnsPrefix": format!("{name}-dns"),
                "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}, "azureKeyVaultKms": null},
            },
        }));
    }
    let world = json!({
        "resource_groups": GROUPS.iter().map(|g| json!({"name": g, "location": "eastus"})).collect::<Vec<_>>(),
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": resources,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("targets.csv"), targets).unwrap();
}

fn serve_fleet(dir: &Path, faults: Option<&str>) -> Served {
    let world = dir.join("world.json").display().to_string();
    let mut args = vec!["--world", &world];
    let faults_file = dir.join("faults.yaml").display().to_string();
    if let Some(faults) = faults {
        std::fs::write(dir.join("faults.yaml"), faults).unwrap();
        args.extend(["--faults", &faults_file]);
    }
    serve(&args)
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// `kmsflow run migrate-pmk-to-cmk --targets targets.csv ARGS`, to its end.
fn migrate(served: &Served, dir: &Path, args: &[&str]) -> Output {
    let mut all = vec!["run", "migrate-pmk-to-cmk", "--targets", "targets.csv"];
    all.extend_from_slice(args);
    served.kmsflow(dir, &all).output().unwrap()
}

/// The id of the newest rollout in the state.
fn rollout_id(served: &Served, dir: &Path) -> String {
    let runs = served
        .kmsflow(dir, &["runs", "--output", "json"])
        .output()
        .unwrap();
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    runs.as_array()
        .unwrap()
        .iter()
        .find(|r| r["kind"] == "rollout")
        .expect("a rollout is recorded")["id"]
        .as_str()
        .unwrap()
        .to_owned()
}

/// What a migration to CMK leaves in the world, per cluster and overall, ignoring what
/// differs between two runs of the same rollout (generated ids and key material): the KMS
/// state and vault of each cluster, the key versions and role assignments per vault.
fn kms_world(world: &Value) -> Value {
    let resources = world["resources"].as_array().unwrap();
    let clusters: BTreeMap<String, Value> = resources
        .iter()
        .filter(|r| r["type"] == "Microsoft.ContainerService/ManagedClusters")
        .map(|r| {
            let kms = &r["properties"]["securityProfile"]["azureKeyVaultKms"];
            let state = if kms["enabled"] == true {
                json!({"mode": "CMK", "vault": kms["keyVaultResourceId"].as_str().unwrap().rsplit('/').next()})
            } else {
                json!({"mode": "PMK"})
            };
            (r["name"].as_str().unwrap().to_owned(), state)
        })
        .collect();
    let vaults: BTreeSet<String> = resources
        .iter()
        .filter(|r| r["type"] == "Microsoft.KeyVault/vaults")
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    let identities: BTreeSet<String> = resources
        .iter()
        .filter(|r| r["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities")
        .map(|r| r["name"].as_str().unwrap().to_owned())
        .collect();
    let key_versions: BTreeMap<String, usize> = world["keys"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(name, versions)| (name.clone(), versions.as_array().unwrap().len()))
        .collect();
    let mut assignments: BTreeMap<String, usize> = BTreeMap::new();
    for a in world["role_assignments"].as_array().unwrap() {
        let scope = a["properties"]["scope"].as_str().unwrap();
        let vault = scope.rsplit('/').next().unwrap().to_owned();
        *assignments.entry(vault).or_default() += 1;
    }
    json!({"clusters": clusters, "vaults": vaults, "identities": identities,
           "key_versions": key_versions, "role_assignments_per_vault": assignments})
}

/// Asserts every cluster is CMK with its own vault, one key version each, three role
/// assignments per vault and no two alike.
fn assert_migrated(world: &Value, n: usize) {
    let summary = kms_world(world);
    for i in 0..n {
        let name = cluster_name(i);
        assert_eq!(
            summary["clusters"][&name],
            json!({"mode": "CMK", "vault": format!("kv-{name}")}),
            "{name}"
        );
        assert_eq!(
            summary["key_versions"][format!("kv-{name}/kms-key")],
            1,
            "{name}: one key version"
        );
        assert_eq!(
            summary["role_assignments_per_vault"][format!("kv-{name}")],
            3,
            "{name}: officer, crypto user and contributor, once each"
        );
    }
    let triples: Vec<(String, String, String)> = world["role_assignments"]
        .as_array()
        .unwrap()
        .iter()
        .map(|a| {
            let p = &a["properties"];
            (
                p["scope"].as_str().unwrap().to_lowercase(),
                p["principalId"].as_str().unwrap().to_owned(),
                p["roleDefinitionId"].as_str().unwrap().to_lowercase(),
            )
        })
        .collect();
    let unique: BTreeSet<_> = triples.iter().collect();
    assert_eq!(unique.len(), triples.len(), "no duplicate role assignment");
}

#[test]
fn a_rollout_of_40_clusters_in_three_waves_migrates_each_once_and_reports_what_the_world_shows() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 40);
    let served = serve_fleet(dir.path(), None);
    let output = migrate(
        &served,
        dir.path(),
        &[
            "--waves",
            "1,25%,100%",
            "--concurrency",
            "8",
            "--output",
            "json",
        ],
    );
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(0), "{log}");
    let world = served.world();
    assert_migrated(&world, 40);
    // What was there before is untouched.
    let summary = kms_world(&world);
    assert!(
        summary["vaults"]
            .as_array()
            .unwrap()
            .contains(&json!("kv-keep"))
    );
    assert!(
        summary["identities"]
            .as_array()
            .unwrap()
            .contains(&json!("id-keep"))
    );
    // One cluster PUT per cluster, never a second.
    let puts: Vec<String> = served
        .requests_to("/managedClusters/")
        .into_iter()
        .filter(|r| r.starts_with("PUT "))
        .collect();
    let distinct: BTreeSet<&String> = puts.iter().collect();
    assert_eq!((puts.len(), distinct.len()), (40, 40), "{puts:#?}");

    // The report agrees with the world: every target, its wave and its steps.
    let report: Value = serde_json::from_slice(&output.stdout).unwrap();
    assert_eq!(report["status"], "succeeded");
    assert_eq!(report["summary"], json!({"targets": 40, "succeeded": 40}));
    let targets = report["targets"].as_array().unwrap();
    let mut per_wave = BTreeMap::new();
    for target in targets {
        *per_wave
            .entry(target["wave"].as_u64().unwrap())
            .or_insert(0) += 1;
        let cluster = target["params"]["cluster"].as_str().unwrap();
        assert_eq!(target["params"]["key_vault"], format!("kv-{cluster}"));
        let step = |id: &str| {
            target["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["id"] == id)
                .unwrap()
                .clone()
        };
        assert_eq!(step("cluster")["outcome"], "updated", "{cluster}");
        assert_eq!(step("cmk--vault")["outcome"], "created", "{cluster}");
    }
    // 1, then 25% of 40 (10) less the canary, then the rest.
    assert_eq!(per_wave, BTreeMap::from([(1, 1), (2, 9), (3, 30)]));

    // The lines printed while it ran say the same: each target started and succeeded once,
    // the canary alone before any other.
    let started: Vec<&str> = log.lines().filter(|l| l.contains(" started ")).collect();
    let succeeded: Vec<&str> = log.lines().filter(|l| l.contains(" succeeded ")).collect();
    assert_eq!((started.len(), succeeded.len()), (40, 40), "{log}");
    let first_success = log.lines().position(|l| l.contains(" succeeded ")).unwrap();
    let second_start = log
        .lines()
        .enumerate()
        .filter(|(_, l)| l.contains(" started "))
        .nth(1)
        .unwrap()
        .0;
    assert!(
        first_success < second_start,
        "the canary ends before wave 2 starts:\n{log}"
    );

    // Run again: every target's run is new and writes nothing.
    let before = served.writes();
    let again = migrate(&served, dir.path(), &["--concurrency", "8"]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(served.writes(), before, "a second rollout sends no write");
}

/// A cluster whose PUT is refused every time.
const REFUSE_AKS_001: &str = r#"
rules:
  - { method: PUT, path: "*/managedClusters/aks-001", times: 1000, status: 400, code: InvalidParameter, message: "refused by the test" }
"#;

#[test]
fn the_error_budget_stops_the_rollout_and_resume_finishes_it_once_the_cause_is_gone() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 5);
    let served = serve_fleet(dir.path(), Some(REFUSE_AKS_001));
    let output = migrate(
        &served,
        dir.path(),
        &["--max-errors", "0", "--concurrency", "1"],
    );
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(1), "{log}");
    assert!(log.contains("more than the 0 allowed"), "{log}");
    // aks-000 went through, aks-001 failed, and no later target started.
    let touched: BTreeSet<String> = served
        .requests_to("/managedClusters/")
        .iter()
        .filter_map(|r| {
            r.rsplit('/')
                .next()
                .map(|n| n.split('?').next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        touched,
        BTreeSet::from(["aks-000".to_owned(), "aks-001".to_owned()]),
        "the later targets never started"
    );
    let id = rollout_id(&served, dir.path());
    let shown = served
        .kmsflow(dir.path(), &["show", &id, "--output", "json"])
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["status"], "failed");
    assert_eq!(
        shown["summary"],
        json!({"targets": 5, "succeeded": 1, "failed": 1, "not_started": 3})
    );
    let failed = &shown["targets"][1];
    assert_eq!(failed["step"], "cluster");
    assert!(
        failed["error"]
            .as_str()
            .unwrap()
            .contains("InvalidParameter"),
        "{failed}"
    );

    // The cause is dealt with; resume retries the failed target and starts the rest.
    served.set_faults("{}");
    let resumed = served
        .kmsflow(dir.path(), &["resume", &id])
        .output()
        .unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_migrated(&served.world(), 5);
    let events = served
        .kmsflow(dir.path(), &["events", &id, "--output", "json"])
        .output()
        .unwrap();
    let kinds: Vec<String> = serde_json::from_slice::<Value>(&events.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["kind"].as_str().unwrap().to_owned())
        .collect();
    assert!(kinds.contains(&"budget_exhausted".to_owned()), "{kinds:?}");
    assert_eq!(kinds.last().unwrap(), "rollout_finished");
}

#[test]
fn a_wave_gate_waits_for_approval_and_resume_continues() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 3);
    let served = serve_fleet(dir.path(), None);
    let output = migrate(
        &served,
        dir.path(),
        &["--waves", "1,100%", "--wave-gate", "approve"],
    );
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(4), "{log}");
    let id = rollout_id(&served, dir.path());
    let summary = kms_world(&served.world());
    assert_eq!(summary["clusters"]["aks-000"]["mode"], "CMK");
    assert_eq!(
        summary["clusters"]["aks-001"]["mode"], "PMK",
        "wave 2 waits"
    );
    // A resume before the approval waits again, and changes nothing.
    let writes = served.writes();
    let early = served
        .kmsflow(dir.path(), &["resume", &id])
        .output()
        .unwrap();
    assert_eq!(early.status.code(), Some(4), "{}", stderr(&early));
    assert_eq!(served.writes(), writes);
    // Only the gate it waits at can be approved.
    let wrong = served
        .kmsflow(dir.path(), &["approve", &id, "wave-3"])
        .output()
        .unwrap();
    assert_eq!(wrong.status.code(), Some(2), "{}", stderr(&wrong));
    let approved = served
        .kmsflow(dir.path(), &["approve", &id, "wave-2", "--by", "ana"])
        .output()
        .unwrap();
    assert_eq!(approved.status.code(), Some(0), "{}", stderr(&approved));
    let resumed = served
        .kmsflow(dir.path(), &["resume", &id])
        .output()
        .unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_migrated(&served.world(), 3);
    let events = served
        .kmsflow(dir.path(), &["events", &id])
        .output()
        .unwrap();
    let events = String::from_utf8_lossy(&events.stdout);
    assert!(
        events.contains("wave_approved") && events.contains("ana"),
        "{events}"
    );
}

#[test]
fn rollback_of_a_rollout_puts_every_cluster_back_and_deletes_only_what_it_made() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 4);
    let served = serve_fleet(dir.path(), None);
    let before = kms_world(&served.world());
    let output = migrate(&served, dir.path(), &["--concurrency", "2"]);
    assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
    assert_migrated(&served.world(), 4);
    let id = rollout_id(&served, dir.path());
    // Without a terminal or --yes, nothing is deleted.
    let refused = std::process::Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(["rollback", &id])
        .current_dir(dir.path())
        .envs(&served.env)
        .env("KMSFLOW_STATE", dir.path().join("state.db"))
        .stdin(Stdio::null())
        .output()
        .unwrap();
    assert_eq!(refused.status.code(), Some(2), "{}", stderr(&refused));
    assert!(
        stderr(&refused).contains("rg-east/aks-000 cmk--vault"),
        "{}",
        stderr(&refused)
    );
    let rolled = served
        .kmsflow(dir.path(), &["rollback", &id])
        .output()
        .unwrap();
    assert_eq!(rolled.status.code(), Some(0), "{}", stderr(&rolled));
    let after = kms_world(&served.world());
    assert_eq!(
        after["clusters"], before["clusters"],
        "every cluster is PMK again"
    );
    assert_eq!(
        after["vaults"], before["vaults"],
        "only the rollout's vaults are gone"
    );
    assert_eq!(after["identities"], before["identities"]);
    assert_eq!(after["role_assignments_per_vault"], json!({}));
    let shown = served
        .kmsflow(dir.path(), &["show", &id, "--output", "json"])
        .output()
        .unwrap();
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["status"], "rolled_back");
    assert_eq!(shown["summary"], json!({"targets": 4, "rolled_back": 4}));
}

#[test]
fn kill_9_of_a_rollout_at_any_write_then_resume_leaves_the_world_an_undisturbed_rollout_leaves() {
    const N: usize = 6;
    let run_args = [
        "run",
        "migrate-pmk-to-cmk",
        "--targets",
        "targets.csv",
        "--concurrency",
        "3",
    ];
    // The undisturbed rollout, for the world to compare with.
    let calm = tempfile::tempdir().unwrap();
    fleet(calm.path(), N);
    let (undisturbed, total_writes) = {
        let served = serve_fleet(calm.path(), None);
        let output = served.kmsflow(calm.path(), &run_args).output().unwrap();
        assert_eq!(output.status.code(), Some(0), "{}", stderr(&output));
        (kms_world(&served.world()), served.writes())
    };
    // The first write, writes in the first, second and last waves, and the very last.
    for k in [1, 9, 23, 41, total_writes] {
        let dir = tempfile::tempdir().unwrap();
        fleet(dir.path(), N);
        let served = serve_fleet(dir.path(), None);
        let mut child = served
            .kmsflow(dir.path(), &run_args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let deadline = Instant::now() + Duration::from_secs(60);
        let hit = loop {
            let writes: Vec<Value> = served
                .requests()
                .into_iter()
                .filter(|r| r["write"] == true)
                .collect();
            if writes.len() >= k {
                child.kill().unwrap();
                break writes[k - 1]["path"].as_str().unwrap().to_owned();
            }
            if child.try_wait().unwrap().is_some() {
                panic!("the rollout ended before write {k}");
            }
            assert!(Instant::now() < deadline, "no write {k} within a minute");
            std::thread::sleep(Duration::from_millis(5));
        };
        child.wait().unwrap();
        eprintln!("k={k}: killed at the write to {hit}");
        let id = rollout_id(&served, dir.path());
        let resumed = served
            .kmsflow(dir.path(), &["resume", &id])
            .output()
            .unwrap();
        assert_eq!(
            resumed.status.code(),
            Some(0),
            "k={k} ({hit}): {}",
            stderr(&resumed)
        );
        let world = served.world();
        assert_migrated(&world, N);
        assert_eq!(kms_world(&world), undisturbed, "k={k}: killed at {hit}");
    }
}

#[test]
fn targets_are_checked_before_anything_starts_and_every_problem_is_named() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 2);
    let served = serve_fleet(dir.path(), None);
    std::fs::write(
        dir.path().join("bad.csv"),
        "resource_group,cluster,key_vault,identity,colour\n\
         rg-east,aks-000,kv-aks-000,id-aks-000,\n\
         rg-east,aks_bad!,kv-x,id-x,\n\
         RG-EAST,AKS-000,kv-other,id-other,\n\
         rg-west,aks-001,kv-aks-001,id-aks-001,blue\n",
    )
    .unwrap();
    let output = served
        .kmsflow(
            dir.path(),
            &["run", "migrate-pmk-to-cmk", "--targets", "bad.csv"],
        )
        .output()
        .unwrap();
    let log = stderr(&output);
    assert_eq!(output.status.code(), Some(2), "{log}");
    assert!(log.contains("row 3: parameter `cluster`"), "{log}");
    assert!(log.contains("row 4: the same target as row 2"), "{log}");
    assert!(log.contains("row 5: parameter `colour`"), "{log}");
    assert_eq!(served.requests().len(), 0, "nothing was sent");
    let runs = served
        .kmsflow(dir.path(), &["runs", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(
        serde_json::from_slice::<Value>(&runs.stdout).unwrap(),
        json!([])
    );
}

#[test]
fn cancel_of_a_rollout_drains_the_targets_in_flight_and_starts_no_other() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 4);
    let served = serve_fleet(dir.path(), Some("delays: { cluster_operation: 2s }\n"));
    let running = served
        .kmsflow(
            dir.path(),
            &[
                "run",
                "migrate-pmk-to-cmk",
                "--targets",
                "targets.csv",
                "--concurrency",
                "1",
            ],
        )
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Cancel while the canary's cluster operation runs.
    let deadline = Instant::now() + Duration::from_secs(60);
    while !served
        .requests_to("/managedClusters/aks-000")
        .iter()
        .any(|r| r.starts_with("PUT "))
    {
        assert!(
            Instant::now() < deadline,
            "the canary never reached its cluster"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    let id = rollout_id(&served, dir.path());
    let cancel = served
        .kmsflow(dir.path(), &["cancel", &id, "--reason", "change freeze"])
        .output()
        .unwrap();
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    let ended = running.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(4), "{}", stderr(&ended));
    let touched: BTreeSet<String> = served
        .requests_to("/managedClusters/")
        .iter()
        .filter_map(|r| {
            r.rsplit('/')
                .next()
                .map(|n| n.split('?').next().unwrap().to_owned())
        })
        .collect();
    assert_eq!(
        touched,
        BTreeSet::from(["aks-000".to_owned()]),
        "no other target started"
    );
    let resumed = served
        .kmsflow(dir.path(), &["resume", &id])
        .output()
        .unwrap();
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_migrated(&served.world(), 4);
}

#[test]
fn plan_of_a_fleet_says_what_each_target_would_change_and_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 3);
    let served = serve_fleet(dir.path(), None);
    let plan = served
        .kmsflow(
            dir.path(),
            &[
                "plan",
                "migrate-pmk-to-cmk",
                "--targets",
                "targets.csv",
                "--detailed-exitcode",
                "--output",
                "json",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(plan.status.code(), Some(5), "{}", stderr(&plan));
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let targets = plan["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 3);
    for target in targets {
        let cluster = target["steps"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["step_id"] == "cluster")
            .unwrap();
        assert_ne!(cluster["action"], "would_fail", "{cluster}");
    }
    let dry = migrate(&served, dir.path(), &["--dry-run"]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let text = String::from_utf8_lossy(&dry.stdout);
    assert!(
        text.contains("rg-north/aks-002") && text.contains("3 of 3 targets would change"),
        "{text}"
    );
    assert_eq!(served.writes(), 0, "planning writes nothing");
    let run = migrate(&served, dir.path(), &[]);
    assert_eq!(run.status.code(), Some(0), "{}", stderr(&run));
    let after = served
        .kmsflow(
            dir.path(),
            &[
                "plan",
                "migrate-pmk-to-cmk",
                "--targets",
                "targets.csv",
                "--detailed-exitcode",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(
        after.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&after.stdout)
    );
}

#[test]
fn discover_finds_exactly_the_matching_clusters_over_three_subscriptions_and_pages() {
    let subscriptions = [
        SUBSCRIPTION,
        "11111111-1111-4111-8111-111111111111",
        "22222222-2222-4222-8222-222222222222",
    ];
    let mut resources = Vec::new();
    let mut expected = BTreeSet::new();
    for i in 0..2_500 {
        let subscription = match i {
            0..1_200 => subscriptions[0],
            1_200..2_000 => subscriptions[1],
            _ => subscriptions[2],
        };
        let name = format!("aks-{i:04}");
        let prod = i % 5 == 0;
        let pmk = i % 2 == 0;
        if prod && !pmk && name.starts_with("aks-1") {
            expected.insert(format!("{subscription}/rg-fleet/{name}"));
        }
        resources.push(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/rg-fleet/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "tags": if prod { json!({"env": "prod"}) } else { json!({"env": "dev"}) },
            "properties": {"provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": if pmk { json!({"infrastructureEncryption": "Enabled"}) } else { Value::Null }}},
        }));
    }
    assert_eq!(expected.len(), 100);
    let dir = tempfile::tempdir().unwrap();
    let world = json!({
        "subscriptions": &subscriptions[1..],
        "list_page_size": 1_000,
        "resource_groups": [{"name": "rg-fleet", "location": "eastus"}],
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": resources,
    });
    std::fs::write(dir.path().join("world.json"), world.to_string()).unwrap();
    let served = serve_fleet(dir.path(), None);
    let plan = served
        .kmsflow(
            dir.path(),
            &[
                "plan",
                "pmk-existing-cluster",
                "--discover",
                "--where",
                "tag:env=prod",
                "--where",
                "kms=none",
                "--where",
                "name=aks-1*",
                "--output",
                "json",
            ],
        )
        .output()
        .unwrap();
    let log = stderr(&plan);
    assert_eq!(plan.status.code(), Some(0), "{log}");
    assert!(
        log.contains("discovered 2500 clusters in 3 subscriptions; 100 match"),
        "{log}"
    );
    let plan: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let found: BTreeSet<String> = plan["targets"]
        .as_array()
        .unwrap()
        .iter()
        .map(|t| t["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(found, expected);
    // The first subscription's 1,200 clusters came in two pages; nothing was written.
    let lists: Vec<String> = served
        .requests_to("/providers/Microsoft.ContainerService/managedClusters")
        .into_iter()
        .filter(|r| r.starts_with("GET ") && r.ends_with("/managedClusters"))
        .collect();
    assert_eq!(lists.len(), 4, "{lists:#?}");
    assert_eq!(served.writes(), 0);
    // One subscription, and a per-target parameter from the cluster's names.
    let one = served
        .kmsflow(
            dir.path(),
            &[
                "plan",
                "migrate-pmk-to-cmk",
                "--discover",
                "--subscription",
                subscriptions[2],
                "--where",
                "name=aks-249?",
                "--target-param",
                "key_vault=kv-{{cluster}}",
                "--target-param",
                "identity=id-{{cluster}}",
                "--output",
                "json",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(one.status.code(), Some(0), "{}", stderr(&one));
    let one: Value = serde_json::from_slice(&one.stdout).unwrap();
    let targets = one["targets"].as_array().unwrap();
    assert_eq!(targets.len(), 10);
    assert_eq!(targets[0]["params"]["key_vault"], "kv-aks-2490");
    assert_eq!(targets[0]["params"]["subscription"], subscriptions[2]);
}

/// Clusters on Kubernetes 1.33 without KMS in two subscriptions (three in the sandbox's own,
/// two in another), with the feature registered: what `pmk-existing-cluster` changes.
fn unencrypted_over_two_subscriptions(dir: &Path) -> Vec<String> {
    let other = "11111111-1111-4111-8111-111111111111";
    let mut resources = Vec::new();
    let mut names = Vec::new();
    for (i, subscription) in [SUBSCRIPTION, SUBSCRIPTION, SUBSCRIPTION, other, other]
        .iter()
        .enumerate()
    {
        let name = cluster_name(i);
        names.push(format!("{subscription}/rg-east/{name}"));
        resources.push(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/rg-east/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "eTag": "00000000-0000-4000-8000-0000000e7a90",
            "identity": {"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"},
            "properties": {"provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
                "dnsPrefix": format!("{name}-dns"),
                "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": null, "azureKeyVaultKms": null}},
        }));
    }
    let world = json!({
        "subscriptions": [other],
        "resource_groups": [{"name": "rg-east", "location": "eastus"}],
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": resources,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    names
}

#[test]
fn check_and_a_schedule_discover_their_fleet_and_the_schedules_rollout_changes_it() {
    let dir = tempfile::tempdir().unwrap();
    let names = unencrypted_over_two_subscriptions(dir.path());
    let served = serve_fleet(dir.path(), None);
    let check = served
        .kmsflow(
            dir.path(),
            &[
                "check",
                "--discover",
                "--where",
                "kms=none",
                "--output",
                "json",
            ],
        )
        .output()
        .unwrap();
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    let checked: BTreeSet<String> = report["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .map(|c| c["target"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        checked,
        names.iter().cloned().collect(),
        "{}",
        stderr(&check)
    );
    // A schedule keeps the discovery and finds the fleet again at its fire.
    let added = served
        .kmsflow(
            dir.path(),
            &[
                "schedule",
                "add",
                "pmk-everywhere",
                "--runbook",
                "pmk-existing-cluster",
                "--discover",
                "--where",
                "kms=none",
                "--concurrency",
                "2",
                "--cron",
                "* * * * * *",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(added.status.code(), Some(0), "{}", stderr(&added));
    let mut daemon = served
        .kmsflow(dir.path(), &["daemon", "--tick", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = Instant::now() + Duration::from_secs(60);
    let fire = loop {
        let history = served
            .kmsflow(
                dir.path(),
                &["schedule", "history", "pmk-everywhere", "--output", "json"],
            )
            .output()
            .unwrap();
        let fires: Value = serde_json::from_slice(&history.stdout).unwrap_or(Value::Null);
        let done = fires
            .as_array()
            .into_iter()
            .flatten()
            .find(|f| f["detail"]["status"] == "succeeded")
            .cloned();
        if let Some(done) = done {
            break done;
        }
        assert!(
            Instant::now() < deadline,
            "no rollout fire succeeded: {fires}"
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let _ = daemon.kill();
    let _ = daemon.wait();
    assert_eq!(fire["detail"]["counts"]["succeeded"], 5, "{fire}");
    let world = served.world();
    for r in world["resources"].as_array().unwrap() {
        assert_eq!(
            r["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
            "Enabled",
            "{}",
            r["id"]
        );
    }
}

#[test]
fn a_rollout_over_two_subscriptions_resumes_from_a_shell_pointed_at_one_of_them() {
    let dir = tempfile::tempdir().unwrap();
    let names = unencrypted_over_two_subscriptions(dir.path());
    let mut targets = String::from("subscription,resource_group,cluster\n");
    for name in &names {
        targets.push_str(&format!("{}\n", name.replace('/', ",")));
    }
    std::fs::write(dir.path().join("fleet.csv"), targets).unwrap();
    // The first target in the other subscription is refused until the cause is dealt with.
    let served = serve_fleet(
        dir.path(),
        Some(
            "rules:\n  - { method: PUT, path: \"*/managedClusters/aks-003\", times: 1000, status: 400, code: InvalidParameter }\n",
        ),
    );
    let run = |args: &[&str]| served.kmsflow(dir.path(), args).output().unwrap();
    let stopped = run(&[
        "run",
        "pmk-existing-cluster",
        "--targets",
        "fleet.csv",
        "--concurrency",
        "1",
    ]);
    assert_eq!(stopped.status.code(), Some(1), "{}", stderr(&stopped));
    served.set_faults("{}");
    // This shell's AZURE_SUBSCRIPTION_ID names the first subscription; the failed target
    // and the one never started are in the other. Their stored subscription is the target,
    // not a change the shell asks for.
    assert_eq!(served.env["AZURE_SUBSCRIPTION_ID"], SUBSCRIPTION);
    let id = rollout_id(&served, dir.path());
    let resumed = run(&["resume", &id]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    let world = served.world();
    let encrypted = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]
                ["infrastructureEncryption"]
                == "Enabled"
        })
        .count();
    assert_eq!(encrypted, 5);
}
