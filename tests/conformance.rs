//! The sandbox against clients this project did not write, over https on Azure's host shapes.
//!
//! The Azure SDK for Python (pinned in `conformance/requirements.txt`, installed by
//! `conformance/install.sh` into a cache) runs every scenario of the seed against
//! `kmsflow sandbox serve --tls`: feature and provider registration, the group, vaults with RBAC
//! and then the firewall, role assignments by role name, keys, identities, clusters with PMK
//! and with CMK on a public and a private vault, both migrations, and `securityProfile` read
//! back as the seed shows it. It fails when the sandbox stops speaking the contract the SDK
//! expects. Then kmsflow's own runbooks run against the same kind of sandbox.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

/// The conformance environment's python, installed on first use.
fn python() -> PathBuf {
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/install.sh");
    let installed = Command::new("bash").arg(&script).output().unwrap();
    assert!(
        installed.status.success(),
        "conformance/install.sh could not install the Azure SDK for Python (it needs python3 and PyPI):\n{}",
        String::from_utf8_lossy(&installed.stderr)
    );
    PathBuf::from(String::from_utf8(installed.stdout).unwrap().trim())
}

/// Azure's ordinary delays, short: features register, principals replicate and grants
/// propagate while the SDK is already asking.
const DELAYS: &str = "delays: { feature_registration: 1s, provider_registration: 1s, principal_replication: 1s, rbac_propagation: 1s, cluster_operation: 1s }\n";

#[test]
fn the_azure_sdk_for_python_runs_every_seed_scenario_against_the_tls_sandbox() {
    let python = python();
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.yaml");
    std::fs::write(&faults, DELAYS).unwrap();
    let tls_dir = dir.path().join("tls");
    let served = support::serve(&[
        "--tls",
        "--tls-dir",
        tls_dir.to_str().unwrap(),
        "--faults",
        faults.to_str().unwrap(),
    ]);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("conformance/seed_scenarios.py");
    let run = Command::new(&python)
        .arg(&script)
        .envs(&served.env)
        .env("KMSFLOW_ARM_ENDPOINT", &served.arm_endpoint)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&run.stdout);
    assert!(
        run.status.success(),
        "the Azure SDK for Python failed against the sandbox:\n{stdout}\n{}",
        String::from_utf8_lossy(&run.stderr)
    );
    assert!(stdout.contains("every scenario passed"), "{stdout}");
    // What the SDK did reached the sandbox as Azure would see it: keys on the vaults' own
    // hosts (logged under `/_kv/{vault}`), token challenges answered, nothing failed inside.
    let requests = served.requests();
    let key_creates = requests
        .iter()
        .filter(|r| {
            r["method"] == "POST"
                && r["path"]
                    .as_str()
                    .unwrap()
                    .ends_with("/keys/kms-key/create")
        })
        .filter(|r| r["status"] == 200)
        .count();
    assert_eq!(key_creates, 2, "one key in each vault");
    assert!(
        requests
            .iter()
            .any(|r| r["status"] == 401 && r["path"].as_str().unwrap().starts_with("/_kv/")),
        "Key Vault's SDK authenticates by challenge"
    );
    assert!(
        requests.iter().all(|r| r["status"].as_u64().unwrap() < 500),
        "no request failed inside the sandbox"
    );
}

/// Every bundled KMS runbook, run by kmsflow against `sandbox serve --tls` through the cloud
/// profile it writes (no `--sandbox`), under the realistic fault profile (throttling, 503s,
/// delays, a propagation error on the CMK cluster PUT, a 409 `EtagMismatch`): the steps meet
/// vault URIs and key ids shaped like Key Vault's, and their token goes only to the sandbox's
/// names.
#[test]
fn every_kms_runbook_runs_against_the_tls_sandbox_through_its_cloud_profile() {
    std::thread::scope(|scope| {
        for runbook in support::KMS_RUNBOOKS {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let tls_dir = dir.path().join("tls");
                let faults = Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("runbooks/faults/azure-realistic.yaml");
                let served = support::serve(&[
                    "--tls",
                    "--tls-dir",
                    tls_dir.to_str().unwrap(),
                    "--world",
                    runbook,
                    "--faults",
                    faults.to_str().unwrap(),
                ]);
                let subscription = format!("subscription={}", served.env["AZURE_SUBSCRIPTION_ID"]);
                let cmk = runbook.starts_with("cmk") || *runbook == "migrate-pmk-to-cmk";
                let mut args = vec![
                    "run",
                    runbook,
                    "-p",
                    &subscription,
                    "-p",
                    "resource_group=rg-kms-sandbox",
                    "-p",
                    "cluster=aks-sandbox",
                ];
                if cmk {
                    args.extend([
                        "-p",
                        "key_vault=kv-kms-sandbox",
                        "-p",
                        "key_name=kms-key",
                        "-p",
                        "identity=id-kms-sandbox",
                    ]);
                }
                let run = served.kmsflow(dir.path(), &args).output().unwrap();
                assert!(
                    run.status.success(),
                    "{runbook}: {}",
                    String::from_utf8_lossy(&run.stderr)
                );
                let vault_hosts = served
                    .requests()
                    .iter()
                    .filter(|r| r["path"].as_str().unwrap().starts_with("/_kv/"))
                    .count();
                if cmk {
                    assert!(
                        vault_hosts > 0,
                        "{runbook}: the key was made on the vault's host"
                    );
                }
            });
        }
    });
}
