//! Every bundled KMS runbook, end to end against `--sandbox`: it succeeds on the world it
//! expects, ends verified, and a second run changes nothing.

mod support;

use std::process::{Command, Output};

use serde_json::Value;

/// The KMS runbooks and the feature registration they all start with.
fn runbooks() -> impl Iterator<Item = &'static str> {
    std::iter::once("register-kms-feature").chain(support::KMS_RUNBOOKS.iter().copied())
}

/// Runs `runbook --sandbox --output json` in `dir`; it must succeed. Its JSON report.
fn run_ok(dir: &std::path::Path, runbook: &str) -> Value {
    let run = kmsflow(dir, &["run", runbook, "--sandbox", "--output", "json"]);
    assert!(
        run.status.success(),
        "{runbook}: {}",
        String::from_utf8_lossy(&run.stderr)
    );
    serde_json::from_slice(&run.stdout).unwrap()
}

fn kmsflow(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(support::consenting(args))
        .current_dir(dir)
        .env("KMSFLOW_STATE", dir.join("state.db"))
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .env_remove("AZURE_TENANT_ID")
        .env_remove("IDENTITY_ENDPOINT")
        .env_remove("IDENTITY_HEADER")
        .output()
        .unwrap()
}

fn expected_mode(runbook: &str) -> Option<&'static str> {
    match runbook {
        "register-kms-feature" => None,
        r if r.starts_with("cmk-") || r == "migrate-pmk-to-cmk" => Some("CMK"),
        _ => Some("PMK"),
    }
}

#[test]
fn every_kms_runbook_runs_verified_and_a_second_run_changes_nothing() {
    for runbook in runbooks() {
        let dir = tempfile::tempdir().unwrap();
        let run = run_ok(dir.path(), runbook);
        assert_eq!(run["status"], "succeeded", "{runbook}");
        if let Some(mode) = expected_mode(runbook) {
            let verify = run["steps"]
                .as_array()
                .unwrap()
                .iter()
                .find(|s| s["id"] == "verify")
                .unwrap();
            assert_eq!(verify["status"], "succeeded", "{runbook}");
            assert_eq!(verify["outputs"]["kms_mode"], mode, "{runbook}");
            let profile = &run["outputs"]["security_profile"];
            assert_eq!(
                profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
                "Enabled",
                "{runbook}"
            );
        }
        let run = run_ok(dir.path(), runbook);
        for step in run["steps"].as_array().unwrap() {
            assert!(
                step["outcome"] == "unchanged" || step["status"] == "skipped",
                "{runbook}: a second run changed `{}`: {step}",
                step["id"]
            );
        }
    }
}

#[test]
fn plan_marks_the_point_of_no_return_and_values_known_after_apply() {
    let dir = tempfile::tempdir().unwrap();
    let plan = kmsflow(dir.path(), &["plan", "pmk-existing-cluster", "--sandbox"]);
    assert!(
        plan.status.success(),
        "{}",
        String::from_utf8_lossy(&plan.stderr)
    );
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("POINT OF NO RETURN"), "{text}");
    assert!(text.contains("cannot be turned off"), "{text}");

    let plan = kmsflow(
        dir.path(),
        &["plan", "cmk-private-vault-new-cluster", "--sandbox"],
    );
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("create key vault kv-kms-sandbox"), "{text}");
    assert!(text.contains("known after apply"), "{text}");
}

#[test]
fn every_kms_runbook_succeeds_under_the_realistic_fault_profile() {
    let faults = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("runbooks/faults/azure-realistic.yaml");
    let faults = faults.to_str().unwrap();
    // The runs wait on the sandbox's delays, not the CPU: run them side by side.
    std::thread::scope(|scope| {
        for runbook in runbooks() {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let run = kmsflow(
                    dir.path(),
                    &[
                        "run",
                        runbook,
                        "--sandbox",
                        "--sandbox-faults",
                        faults,
                        "--output",
                        "json",
                    ],
                );
                assert!(
                    run.status.success(),
                    "{runbook}: {}",
                    String::from_utf8_lossy(&run.stderr)
                );
            });
        }
    });
}

fn world(dir: &std::path::Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(dir.join("state.sandbox.json")).unwrap()).unwrap()
}

fn cluster(world: &Value) -> Value {
    world["resources"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(id, _)| id.contains("/managedclusters/"))
        .map(|(_, c)| c.clone())
        .unwrap()
}

fn run_id(output: &Output) -> String {
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    run["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_failed_migration_rolls_back_what_it_created_and_leaves_the_rest() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fail-cluster.yaml"),
        "rules:\n  - { method: PUT, path: \"*/managedClusters/*\", times: 5, status: 400, code: BadRequest, message: the cluster update failed }\n",
    )
    .unwrap();
    let run = kmsflow(
        dir.path(),
        &[
            "run",
            "migrate-pmk-to-cmk",
            "--sandbox",
            "--sandbox-faults",
            "fail-cluster.yaml",
            "--output",
            "json",
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let before = world(dir.path());
    assert_eq!(before["assignments"].as_object().unwrap().len(), 3);
    let rollback = kmsflow(dir.path(), &["rollback", &run_id(&run), "--sandbox"]);
    assert!(
        rollback.status.success(),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    let after = world(dir.path());
    assert_eq!(
        after["assignments"].as_object().unwrap().len(),
        0,
        "role assignments removed"
    );
    assert!(after["keys"].as_array().unwrap().is_empty(), "key removed");
    let ids: Vec<&String> = after["resources"].as_object().unwrap().keys().collect();
    assert_eq!(
        ids.len(),
        1,
        "only the pre-existing cluster is left: {ids:?}"
    );
    assert_eq!(
        after["groups"].as_object().unwrap().len(),
        1,
        "the resource group stays"
    );
    let profile = &cluster(&after)["properties"]["securityProfile"];
    assert_eq!(
        profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
        "Enabled"
    );
    assert!(
        profile["azureKeyVaultKms"].is_null(),
        "still PMK: {profile}"
    );
}

#[test]
fn rolling_back_after_enabling_infrastructure_encryption_reports_it_as_irreversible() {
    let dir = tempfile::tempdir().unwrap();
    let run = kmsflow(
        dir.path(),
        &[
            "run",
            "pmk-existing-cluster",
            "--sandbox",
            "--output",
            "json",
        ],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    let rollback = kmsflow(
        dir.path(),
        &["rollback", &run_id(&run), "--sandbox", "--output", "json"],
    );
    assert_eq!(rollback.status.code(), Some(1));
    let result: Value = serde_json::from_slice(&rollback.stdout).unwrap();
    assert_eq!(result["status"], "rollback_failed");
    let error = result["error"].as_str().unwrap();
    assert!(
        error.contains("`cluster`") && error.contains("cannot be turned off"),
        "{error}"
    );
    let stderr = String::from_utf8_lossy(&rollback.stderr);
    assert!(stderr.contains("irreversible"), "{stderr}");
}

#[test]
fn migrate_cmk_to_pmk_rolled_back_puts_the_customer_managed_key_back() {
    let dir = tempfile::tempdir().unwrap();
    let run = kmsflow(
        dir.path(),
        &["run", "migrate-cmk-to-pmk", "--sandbox", "--output", "json"],
    );
    assert!(
        run.status.success(),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert_eq!(
        cluster(&world(dir.path()))["properties"]["securityProfile"]["azureKeyVaultKms"]["enabled"],
        false
    );
    let rollback = kmsflow(dir.path(), &["rollback", &run_id(&run), "--sandbox"]);
    assert!(
        rollback.status.success(),
        "{}",
        String::from_utf8_lossy(&rollback.stderr)
    );
    let restored = cluster(&world(dir.path()));
    let kms = &restored["properties"]["securityProfile"]["azureKeyVaultKms"];
    assert_eq!(kms["enabled"], true, "{kms}");
    assert!(kms["keyId"].as_str().unwrap().ends_with("/keys/kms-key"));
    assert_eq!(restored["identity"]["type"], "UserAssigned");
}

#[test]
fn a_second_run_against_the_same_cluster_exits_3_naming_the_first() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("slow.yaml"),
        "delays: { cluster_operation: 4s }\n",
    )
    .unwrap();
    let mut first = Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args([
            "run",
            "pmk-new-cluster",
            "--sandbox",
            "--sandbox-faults",
            "slow.yaml",
        ])
        .current_dir(dir.path())
        .env("KMSFLOW_STATE", dir.path().join("state.db"))
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut lines = std::io::BufRead::lines(std::io::BufReader::new(first.stderr.take().unwrap()));
    let mut holder = None;
    for line in lines.by_ref() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("kmsflow: starting run ") {
            holder = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("create AKS cluster") {
            break;
        }
    }
    // The second `--sandbox` command is refused before it starts a sandbox of its own (whose
    // authority and world would replace the first's), naming the command that holds it.
    let second = kmsflow(dir.path(), &["run", "pmk-new-cluster", "--sandbox"]);
    assert_eq!(
        second.status.code(),
        Some(3),
        "{}",
        String::from_utf8_lossy(&second.stderr)
    );
    let stderr = String::from_utf8_lossy(&second.stderr);
    assert!(
        stderr.contains(&format!("another `--sandbox` command (pid {}:", first.id()))
            && stderr.contains("run pmk-new-cluster --sandbox"),
        "{stderr}"
    );
    assert!(holder.is_some(), "the first run started");
    std::thread::spawn(move || lines.for_each(drop));
    assert!(first.wait().unwrap().success());
}

#[test]
fn a_runbook_for_enabling_kms_never_migrates_a_cluster_that_has_the_other_mode() {
    let dir = tempfile::tempdir().unwrap();
    // The sandbox's world lives beside the state: first make the cluster CMK.
    let migrated = kmsflow(dir.path(), &["run", "migrate-pmk-to-cmk", "--sandbox"]);
    assert!(
        migrated.status.success(),
        "{}",
        String::from_utf8_lossy(&migrated.stderr)
    );
    let before = cluster(&world(dir.path()));
    assert_eq!(
        before["properties"]["securityProfile"]["azureKeyVaultKms"]["enabled"],
        true
    );
    let pmk = kmsflow(dir.path(), &["run", "pmk-existing-cluster", "--sandbox"]);
    assert_eq!(pmk.status.code(), Some(1));
    let said = String::from_utf8_lossy(&pmk.stderr);
    assert!(
        said.contains("already uses CMK KMS encryption") && said.contains("`migrate-cmk-to-pmk`"),
        "{said}"
    );
    assert_eq!(
        cluster(&world(dir.path())),
        before,
        "the customer-managed key is still in place: nothing was written"
    );
}

#[test]
fn the_quick_start_runs_clean_for_a_newcomer_with_no_state_folder_yet() {
    // A fresh HOME: no `~/.local/state/kmsflow` yet, no KMSFLOW_STATE.
    let home = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(["run", "engine-drill", "--sandbox"])
        .current_dir(home.path())
        .env("HOME", home.path())
        .env_remove("KMSFLOW_STATE")
        .env_remove("XDG_STATE_HOME")
        .env_remove("XDG_DATA_HOME")
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{said}");
    assert!(
        !said.contains("ERROR"),
        "a first run prints no error:\n{said}"
    );
    let world = home.path().join(".local/state/kmsflow/state.sandbox.json");
    assert!(world.exists(), "the sandbox world is kept beside the state");
}

/// Rolling back a CMK runbook deletes its key and its vault, which Key Vault keeps
/// soft-deleted under their names; running the runbook again recovers both (the same key
/// versions) instead of failing on the 409s, and then succeeds, or, where the rollback had to
/// leave the cluster with platform-managed keys, stops naming the runbook that migrates it.
#[test]
fn every_cmk_runbook_runs_again_after_a_rollback_and_recovers_its_key() {
    const CMK: &[&str] = &[
        "cmk-private-vault-new-cluster",
        "cmk-private-vault-existing-cluster",
        "cmk-public-vault-new-cluster",
        "cmk-public-vault-existing-cluster",
        "migrate-pmk-to-cmk",
    ];
    std::thread::scope(|scope| {
        for runbook in CMK {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let run = run_ok(dir.path(), runbook);
                let run_id = run["id"].as_str().unwrap().to_owned();
                let versions = |world: &Value| {
                    world["keys"]
                        .as_array()
                        .unwrap()
                        .iter()
                        .map(|k| k[2].as_array().unwrap().len())
                        .sum::<usize>()
                };
                let created = world(dir.path());
                assert_eq!(versions(&created), 1, "{runbook}");
                let rolled_back = kmsflow(dir.path(), &["rollback", &run_id, "--sandbox"]);
                let stderr = String::from_utf8_lossy(&rolled_back.stderr);
                // On an existing cluster, enabling KMS data encryption cannot be undone; all
                // else is.
                let only_the_cluster_kept = runbook.ends_with("existing-cluster")
                    && stderr.contains("these steps cannot be undone: `cluster`");
                assert!(
                    rolled_back.status.success() || only_the_cluster_kept,
                    "{runbook}: {stderr}"
                );
                let after_rollback = world(dir.path());
                assert_eq!(
                    versions(&after_rollback),
                    0,
                    "{runbook}: the key is deleted"
                );
                assert_eq!(
                    after_rollback["deleted_keys"]
                        .as_array()
                        .map_or(0, Vec::len),
                    1,
                    "{runbook}: and soft-deleted"
                );
                let again = kmsflow(dir.path(), &["run", runbook, "--sandbox"]);
                let stderr = String::from_utf8_lossy(&again.stderr);
                if only_the_cluster_kept {
                    // The rollback left the cluster with platform-managed keys (the part it
                    // could not undo): enabling CMK on it now is a migration, and the run says
                    // which runbook does that, after recovering the vault and the key.
                    assert!(!again.status.success(), "{runbook}: {stderr}");
                    assert!(
                        stderr.contains("use `migrate-pmk-to-cmk`"),
                        "{runbook}: {stderr}"
                    );
                } else {
                    assert!(again.status.success(), "{runbook}: {stderr}");
                }
                let recovered = world(dir.path());
                assert_eq!(
                    versions(&recovered),
                    1,
                    "{runbook}: the same key, recovered"
                );
                assert_eq!(
                    recovered["deleted_keys"].as_array().map_or(0, Vec::len),
                    0,
                    "{runbook}"
                );
                assert_eq!(
                    created["keys"][0][2][0]["version"], recovered["keys"][0][2][0]["version"],
                    "{runbook}: recovered, not made anew"
                );
            });
        }
    });
}

/// What kmsflow's own CMK runbooks build passes kmsflow's own check: the key has a rotation
/// policy and an expiry (it used to warn `rotation-policy-missing`).
#[test]
fn kmsflows_check_passes_on_what_its_cmk_runbooks_build() {
    let dir = tempfile::tempdir().unwrap();
    run_ok(dir.path(), "cmk-public-vault-new-cluster");
    let check = kmsflow(
        dir.path(),
        &[
            "check",
            "--sandbox",
            "-p",
            "resource_group=rg-kms-sandbox",
            "-p",
            "cluster=aks-sandbox",
            "--output",
            "json",
        ],
    );
    let stdout = String::from_utf8_lossy(&check.stdout);
    assert!(
        check.status.success(),
        "{stdout}{}",
        String::from_utf8_lossy(&check.stderr)
    );
    assert!(!stdout.contains("rotation-policy-missing"), "{stdout}");
    assert!(!stdout.contains("key-expiry-missing"), "{stdout}");
}

/// `plan` on each bundled runbook's `--sandbox` world tells the truth: no step plans `FAIL`
/// where the run succeeds (values a fragment or an earlier step makes are known after apply),
/// `--detailed-exitcode` says 5 (changes) or 0 (none), never 2 (would fail), and the point of
/// no return of the existing-cluster runbooks is in the plan.
#[test]
fn plan_tells_the_truth_for_every_bundled_runbook() {
    std::thread::scope(|scope| {
        for runbook in runbooks() {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let plan = kmsflow(
                    dir.path(),
                    &["plan", runbook, "--sandbox", "--detailed-exitcode"],
                );
                let text = String::from_utf8_lossy(&plan.stdout);
                let stderr = String::from_utf8_lossy(&plan.stderr);
                // 5: changes; 0: nothing to change (verify-kms on a PMK world); never 2.
                assert!(
                    matches!(plan.status.code(), Some(5 | 0)),
                    "{runbook}:\n{text}{stderr}"
                );
                assert!(!text.contains("FAIL"), "{runbook}:\n{text}");
                if runbook.ends_with("existing-cluster") {
                    assert!(
                        text.to_lowercase().contains("point of no return"),
                        "{runbook}:\n{text}"
                    );
                }
                // And the run it previewed succeeds.
                run_ok(dir.path(), runbook);
            });
        }
    });
}

/// A parameter typo in `check` is a usage error (exit 2) before anything is read or written,
/// not a cluster's `fail` that would page on-call; and `run rotation-check` exits on its
/// findings as `check` does.
#[test]
fn check_refuses_a_parameter_typo_and_run_rotation_check_exits_on_its_findings() {
    let dir = tempfile::tempdir().unwrap();
    let typo = kmsflow(
        dir.path(),
        &[
            "check",
            "--sandbox",
            "-p",
            "resource_group=rg-kms-sandbox",
            "-p",
            "clustr=aks-sandbox",
        ],
    );
    let stderr = String::from_utf8_lossy(&typo.stderr);
    assert_eq!(typo.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("did you mean `cluster`"), "{stderr}");
    let runs = kmsflow(dir.path(), &["runs", "--output", "json"]);
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap_or(Value::Null);
    assert_eq!(
        runs.as_array().map_or(0, Vec::len),
        0,
        "no run was recorded"
    );

    // No such cluster in the fresh world: the check's worst finding is `fail`.
    let run = kmsflow(
        dir.path(),
        &[
            "run",
            "rotation-check",
            "--sandbox",
            "-p",
            "resource_group=rg-none",
            "-p",
            "cluster=aks-none",
        ],
    );
    assert_eq!(
        run.status.code(),
        Some(1),
        "{}",
        String::from_utf8_lossy(&run.stderr)
    );
}

/// `rollback --dry-run` says what a rollback would delete and put back, newest first, and
/// changes nothing: the run stays as it was and so does the world.
#[test]
fn rollback_dry_run_lists_what_it_would_undo_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let run = run_ok(dir.path(), "cmk-public-vault-new-cluster");
    let id = run["id"].as_str().unwrap().to_owned();
    let before = world(dir.path());
    let dry = kmsflow(
        dir.path(),
        &["rollback", &id, "--dry-run", "--output", "json"],
    );
    assert!(
        dry.status.success(),
        "{}",
        String::from_utf8_lossy(&dry.stderr)
    );
    let plan: Value = serde_json::from_slice(&dry.stdout).unwrap();
    let steps: Vec<&str> = plan["would_undo"]
        .as_array()
        .unwrap()
        .iter()
        .map(|s| s["step_id"].as_str().unwrap())
        .collect();
    assert_eq!(steps.first(), Some(&"cluster"), "newest first: {steps:?}");
    assert_eq!(steps.last(), Some(&"feature"), "{steps:?}");
    assert!(steps.contains(&"cmk--key"));
    assert_eq!(world(dir.path()), before, "nothing changed in the world");
    let show = kmsflow(dir.path(), &["show", &id, "--output", "json"]);
    let shown: Value = serde_json::from_slice(&show.stdout).unwrap();
    assert_eq!(shown["status"], "succeeded");
}

/// When a fleet spans several subscriptions, the target column names the subscription.
#[test]
fn check_names_the_subscription_when_targets_span_several() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(
        dir.path().join("fleet.csv"),
        "subscription,resource_group,cluster\n00000000-0000-4000-8000-5a4db0c5ab0c,rg-a,aks-a\n00000000-0000-4000-8000-00000000b0b0,rg-a,aks-a\n",
    )
    .unwrap();
    let check = kmsflow(
        dir.path(),
        &["check", "--sandbox", "--targets", "fleet.csv"],
    );
    let table = String::from_utf8_lossy(&check.stdout);
    assert!(
        table.contains("00000000-0000-4000-8000-5a4db0c5ab0c/rg-a/aks-a"),
        "{table}"
    );
    assert!(
        table.contains("00000000-0000-4000-8000-00000000b0b0/rg-a/aks-a"),
        "{table}"
    );
}
