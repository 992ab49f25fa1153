//! Every bundled KMS runbook, end to end against `--sandbox`: it succeeds on the world it
//! expects, ends verified, and a second run changes nothing.

use std::process::{Command, Output};

use serde_json::Value;

const RUNBOOKS: &[&str] = &[
    "register-kms-feature",
    "pmk-new-cluster",
    "pmk-existing-cluster",
    "cmk-private-vault-new-cluster",
    "cmk-private-vault-existing-cluster",
    "cmk-public-vault-new-cluster",
    "cmk-public-vault-existing-cluster",
    "verify-kms",
    "migrate-pmk-to-cmk",
    "migrate-cmk-to-pmk",
];

fn kmsflow(dir: &std::path::Path, args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(args)
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
    for runbook in RUNBOOKS {
        let dir = tempfile::tempdir().unwrap();
        let first = kmsflow(dir.path(), &["run", runbook, "--sandbox", "--output", "json"]);
        assert!(first.status.success(), "{runbook}: {}", String::from_utf8_lossy(&first.stderr));
        let run: Value = serde_json::from_slice(&first.stdout).unwrap();
        assert_eq!(run["status"], "succeeded", "{runbook}");
        if let Some(mode) = expected_mode(runbook) {
            let verify = run["steps"].as_array().unwrap().iter().find(|s| s["id"] == "verify").unwrap();
            assert_eq!(verify["status"], "succeeded", "{runbook}");
            assert_eq!(verify["outputs"]["kms_mode"], mode, "{runbook}");
            let profile = &run["outputs"]["security_profile"];
            assert_eq!(profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"], "Enabled", "{runbook}");
        }
        let second = kmsflow(dir.path(), &["run", runbook, "--sandbox", "--output", "json"]);
        assert!(second.status.success(), "{runbook} again: {}", String::from_utf8_lossy(&second.stderr));
        let run: Value = serde_json::from_slice(&second.stdout).unwrap();
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
    assert!(plan.status.success(), "{}", String::from_utf8_lossy(&plan.stderr));
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("POINT OF NO RETURN"), "{text}");
    assert!(text.contains("cannot be turned off"), "{text}");

    let plan = kmsflow(dir.path(), &["plan", "cmk-private-vault-new-cluster", "--sandbox"]);
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(text.contains("create key vault kv-kms-sandbox"), "{text}");
    assert!(text.contains("known after apply"), "{text}");
}

#[test]
fn every_kms_runbook_succeeds_under_the_realistic_fault_profile() {
    let faults = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks/faults/azure-realistic.yaml");
    let faults = faults.to_str().unwrap();
    // The runs wait on the sandbox's delays, not the CPU: run them side by side.
    std::thread::scope(|scope| {
        for runbook in RUNBOOKS {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let run = kmsflow(dir.path(), &["run", runbook, "--sandbox", "--sandbox-faults", faults, "--output", "json"]);
                assert!(run.status.success(), "{runbook}: {}", String::from_utf8_lossy(&run.stderr));
            });
        }
    });
}
