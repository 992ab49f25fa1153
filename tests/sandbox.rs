//! The binary against `kmsflow sandbox serve` in another process: a run killed with SIGKILL
//! right after it asked Azure to create a key (before it could checkpoint the answer) resumes
//! into exactly one key version and one role assignment per grant; a second run sends no writes.

mod support;

use std::io::{BufRead, BufReader};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::{Value, json};
use support::Served;

const SETUP: &str = r#"
name: cmk-public-setup
params:
  subscription: { type: string, env: AZURE_SUBSCRIPTION_ID }
  tenant: { type: string, env: AZURE_TENANT_ID }
steps:
  - id: feature
    uses: azure.feature
    with: { subscription: "{{params.subscription}}", poll_interval: 100ms }
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-kms, location: eastus }
  - id: vault
    uses: azure.keyvault
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-kms, name: kv-kms-e2e, location: eastus, tenant: "{{params.tenant}}" }
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
  - id: key
    uses: azure.keyvault_key
    needs: [officer]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", name: kms-key }
  - id: identity
    uses: azure.identity
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-kms, name: id-kms, location: eastus }
  - id: crypto-user
    uses: azure.role_assignment
    needs: [key]
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto User, principal: "{{steps.identity.outputs.principal_id}}" }
"#;

/// `kmsflow sandbox serve <args>` (see `tests/support`).
fn serve_args<S: AsRef<str>>(args: &[S]) -> Served {
    let args: Vec<&str> = args.iter().map(AsRef::as_ref).collect();
    let served = support::serve(&args);
    for name in [
        "AZURE_SUBSCRIPTION_ID",
        "AZURE_TENANT_ID",
        "IDENTITY_ENDPOINT",
        "IDENTITY_HEADER",
    ] {
        assert!(served.env.contains_key(name), "serve prints {name}");
    }
    served
}

fn serve(faults: &std::path::Path) -> Served {
    serve_args(&["--faults", faults.to_str().unwrap()])
}

fn kmsflow(dir: &std::path::Path, served: &Served, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(support::consenting(args))
        .current_dir(dir)
        .envs(&served.env)
        .env("KMSFLOW_STATE", dir.join("state.db"));
    command
}

fn get(url: &str) -> Value {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn a_run_killed_after_a_create_request_resumes_without_duplicates() {
    let dir = tempfile::tempdir().unwrap();
    let faults = dir.path().join("faults.yaml");
    // Every write is answered 800 ms after it took effect: room to die in between.
    std::fs::write(
        &faults,
        "latency: { min_ms: 0, max_ms: 0, write_ms: 800 }\n",
    )
    .unwrap();
    let served = serve(&faults);
    std::fs::write(dir.path().join("setup.yaml"), SETUP).unwrap();

    let mut run = kmsflow(dir.path(), &served, &["run", "setup.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stderr_lines = BufReader::new(run.stderr.take().unwrap()).lines();
    let mut run_id = None;
    let deadline = Instant::now() + Duration::from_secs(60);
    for line in stderr_lines {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("kmsflow: starting run ") {
            run_id = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("create RSA key kms-key") || Instant::now() > deadline {
            break;
        }
    }
    // The create request is out and held by the server: the key now exists, and the run has
    // not seen the answer.
    std::thread::sleep(Duration::from_millis(400));
    run.kill().unwrap();
    run.wait().unwrap();
    let run_id = run_id.expect("the run said its id");
    let keys = get(&format!("{}/_sandbox/world", served.base_url))["keys"].clone();
    assert_eq!(
        keys["kv-kms-e2e/kms-key"].as_array().map(Vec::len),
        Some(1),
        "the key was created before the kill"
    );

    let resumed = kmsflow(dir.path(), &served, &["resume", &run_id])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let world = get(&format!("{}/_sandbox/world", served.base_url));
    assert_eq!(
        world["keys"]["kv-kms-e2e/kms-key"]
            .as_array()
            .unwrap()
            .len(),
        1,
        "exactly one key version"
    );
    let assignments = world["role_assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 2);
    let show: Value = serde_json::from_slice(
        &kmsflow(dir.path(), &served, &["show", &run_id, "--output", "json"])
            .output()
            .unwrap()
            .stdout,
    )
    .unwrap();
    let key = show["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "key")
        .unwrap();
    assert_eq!(
        key["outcome"], "created",
        "the run made the key, even if it saw it on resume"
    );

    let before = get(&format!("{}/_sandbox/requests", served.base_url))
        .as_array()
        .unwrap()
        .len();
    let again = kmsflow(dir.path(), &served, &["run", "setup.yaml"])
        .output()
        .unwrap();
    assert!(again.status.success(), "{}", stderr(&again));
    let requests = get(&format!("{}/_sandbox/requests", served.base_url));
    let writes: Vec<&Value> = requests.as_array().unwrap()[before..]
        .iter()
        .filter(|r| r["write"] == true)
        .collect();
    assert!(
        writes.is_empty(),
        "a second run sends no writes: {writes:?}"
    );
}

#[test]
fn a_sandboxed_run_survives_a_kill_and_resumes_against_the_same_world() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("setup.yaml"), SETUP).unwrap();
    std::fs::write(
        dir.path().join("slow.yaml"),
        "latency: { min_ms: 0, max_ms: 0, write_ms: 500 }\n",
    )
    .unwrap();
    let command = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
        command
            .args(args)
            .current_dir(dir.path())
            .env("KMSFLOW_STATE", dir.path().join("state.db"))
            .env_remove("AZURE_SUBSCRIPTION_ID")
            .env_remove("IDENTITY_ENDPOINT");
        command
    };
    let mut run = command(&[
        "run",
        "setup.yaml",
        "--sandbox",
        "--sandbox-faults",
        "slow.yaml",
    ])
    .stdout(Stdio::null())
    .stderr(Stdio::piped())
    .spawn()
    .unwrap();
    let mut run_id = None;
    for line in BufReader::new(run.stderr.take().unwrap()).lines() {
        let line = line.unwrap();
        if let Some(rest) = line.strip_prefix("kmsflow: starting run ") {
            run_id = rest.split_whitespace().next().map(str::to_owned);
        }
        if line.contains("create RSA key kms-key") {
            break;
        }
    }
    std::thread::sleep(Duration::from_millis(250));
    run.kill().unwrap();
    run.wait().unwrap();
    let run_id = run_id.unwrap();
    let world_file = dir.path().join("state.sandbox.json");
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(&world_file).unwrap().permissions().mode();
        assert_eq!(
            mode & 0o777,
            0o600,
            "the world file is private like the state"
        );
    }
    let world: Value =
        serde_json::from_str(&std::fs::read_to_string(&world_file).unwrap()).unwrap();
    assert!(
        world["resources"]
            .as_object()
            .unwrap()
            .keys()
            .any(|k| k.contains("/vaults/kv-kms-e2e")),
        "the vault was saved"
    );

    let resumed = command(&["resume", &run_id, "--sandbox"]).output().unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    let world: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("state.sandbox.json")).unwrap(),
    )
    .unwrap();
    let keys = world["keys"].as_array().unwrap();
    assert_eq!(keys.len(), 1);
    assert_eq!(
        keys[0][2].as_array().unwrap().len(),
        1,
        "exactly one key version"
    );
    assert_eq!(world["assignments"].as_object().unwrap().len(), 2);
}

/// The KMS runbooks and the feature registration they start with.
fn kms_runbooks() -> impl Iterator<Item = &'static str> {
    std::iter::once("register-kms-feature").chain(support::KMS_RUNBOOKS.iter().copied())
}

fn serve_world(name: &str) -> Served {
    serve_args(&["--world", name])
}

#[test]
fn every_kms_runbook_sends_zero_writes_on_its_second_run() {
    std::thread::scope(|scope| {
        for runbook in kms_runbooks() {
            scope.spawn(move || {
                let dir = tempfile::tempdir().unwrap();
                let served = serve_world(runbook);
                // The names the seeded world uses, for the parameters this runbook declares.
                let text = std::fs::read_to_string(
                    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                        .join(format!("runbooks/{runbook}.yaml")),
                )
                .unwrap();
                let mut run_args: Vec<&str> = vec!["run", runbook];
                for assignment in [
                    "resource_group=rg-kms-sandbox",
                    "cluster=aks-sandbox",
                    "key_vault=kv-kms-sandbox",
                    "identity=id-kms-sandbox",
                ] {
                    let name = assignment.split('=').next().unwrap();
                    if text.contains(&format!("\n  {name}:")) {
                        run_args.extend(["-p", assignment]);
                    }
                }
                let first = kmsflow(dir.path(), &served, &run_args).output().unwrap();
                assert!(first.status.success(), "{runbook}: {}", stderr(&first));
                let before = get(&format!("{}/_sandbox/requests", served.base_url))
                    .as_array()
                    .unwrap()
                    .len();
                let second = kmsflow(dir.path(), &served, &run_args).output().unwrap();
                assert!(
                    second.status.success(),
                    "{runbook} again: {}",
                    stderr(&second)
                );
                let requests = get(&format!("{}/_sandbox/requests", served.base_url));
                let writes: Vec<&Value> = requests.as_array().unwrap()[before..]
                    .iter()
                    .filter(|r| r["write"] == true)
                    .collect();
                assert!(
                    writes.is_empty(),
                    "{runbook}: a second run wrote {writes:?}"
                );
            });
        }
    });
}

/// A world of `n` PMK clusters (every fourth unhealthy in one of three ways), its targets CSV,
/// and the counts a check must find: (ok, warn, fail).
fn fleet(dir: &std::path::Path, n: usize) -> (usize, usize, usize) {
    let subscription = "00000000-0000-4000-8000-5a4db0c5ab0c";
    let mut resources = Vec::new();
    let mut targets = String::from("resource_group,cluster,expected_mode\n");
    let (mut ok, mut warn, mut fail) = (0, 0, 0);
    for i in 0..n {
        let name = format!("aks-{i:04}");
        targets.push_str(&format!("rg-fleet,{name},PMK\n"));
        let profile = match i % 4 {
            0 => {
                ok += 1;
                json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}})
            }
            1 => {
                warn += 1;
                json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}, "azureKeyVaultKms": {"enabled": true, "keyId": "https://kv.vault.azure.net/keys/k"}})
            }
            2 => {
                fail += 1;
                json!({"kubernetesResourceObjectEncryptionProfile": null})
            }
            _ => {
                fail += 1;
                continue;
            } // listed, never created
        };
        resources.push(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/rg-fleet/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "properties": {"provisioningState": "Succeeded", "currentKubernetesVersion": "1.33.0", "securityProfile": profile},
        }));
    }
    let world = json!({"resource_groups": [{"name": "rg-fleet", "location": "eastus"}], "resources": resources});
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("targets.csv"), targets).unwrap();
    (ok, warn, fail)
}

fn serve_with(dir: &std::path::Path, faults: Option<&str>) -> Served {
    let mut args = vec![
        "--world".to_owned(),
        dir.join("world.json").display().to_string(),
    ];
    if let Some(faults) = faults {
        std::fs::write(dir.join("faults.yaml"), faults).unwrap();
        args.extend([
            "--faults".into(),
            dir.join("faults.yaml").display().to_string(),
        ]);
    }
    serve_args(&args)
}

#[test]
fn a_fleet_check_of_200_clusters_counts_exactly_what_was_seeded() {
    let dir = tempfile::tempdir().unwrap();
    let (ok, warn, fail) = fleet(dir.path(), 200);
    let served = serve_with(dir.path(), None);
    let check = kmsflow(
        dir.path(),
        &served,
        &[
            "check",
            "--targets",
            "targets.csv",
            "--concurrency",
            "16",
            "--output",
            "json",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(
        report["summary"],
        json!({"clusters": 200, "ok": ok, "warn": warn, "fail": fail})
    );
    let missing = report["clusters"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["findings"][0]["code"] == "cluster-missing")
        .count();
    assert_eq!(missing, 50);
    let runs: Value = serde_json::from_slice(
        &kmsflow(
            dir.path(),
            &served,
            &["runs", "--limit", "500", "--output", "json"],
        )
        .output()
        .unwrap()
        .stdout,
    )
    .unwrap();
    assert_eq!(
        runs.as_array().unwrap().len(),
        200,
        "one run per cluster in the store"
    );
}

#[test]
fn a_fleet_check_paces_itself_to_the_subscription_read_bucket() {
    let dir = tempfile::tempdir().unwrap();
    // 400 reads: the 250-token burst, then 150 that can only go at the refill rate (25/s).
    fleet(dir.path(), 400);
    let served = serve_with(dir.path(), Some("token_buckets: true\n"));
    let check = kmsflow(
        dir.path(),
        &served,
        &[
            "check",
            "--targets",
            "targets.csv",
            "--concurrency",
            "32",
            "--output",
            "json",
        ],
    )
    .output()
    .unwrap();
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let report: Value = serde_json::from_slice(&check.stdout).unwrap();
    assert_eq!(report["summary"]["clusters"], 400);
    let requests = get(&format!("{}/_sandbox/requests", served.base_url));
    let arm: Vec<&Value> = requests
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["path"].as_str().unwrap().starts_with("/subscriptions/"))
        .collect();
    let throttled = arm.iter().filter(|r| r["status"] == 429).count();
    assert!(
        throttled * 100 <= arm.len(),
        "{throttled} of {} requests were answered 429",
        arm.len()
    );
    // Past the burst, throughput holds at least 90% of the refill rate.
    let paced: Vec<u64> = arm
        .iter()
        .skip(260)
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    let span_s = (paced.last().unwrap() - paced.first().unwrap()) as f64 / 1000.0;
    let rate = (paced.len() - 1) as f64 / span_s;
    assert!(
        rate >= 22.5,
        "paced at {rate:.1} requests/s, below 90% of 25/s"
    );
}

#[test]
fn a_fleet_check_without_a_token_says_so_once_and_checks_nothing() {
    let dir = tempfile::tempdir().unwrap();
    fleet(dir.path(), 50);
    let served = serve_with(dir.path(), None);
    let started = std::time::Instant::now();
    let check = kmsflow(
        dir.path(),
        &served,
        &["check", "--targets", "targets.csv", "--output", "json"],
    )
    .env("IDENTITY_HEADER", "not-the-sandboxes")
    .output()
    .unwrap();
    assert_eq!(check.status.code(), Some(1), "{}", stderr(&check));
    let error = stderr(&check);
    assert!(
        error.contains("no cluster was checked") && error.contains("cannot get a token"),
        "{error}"
    );
    assert!(
        check.stdout.is_empty(),
        "no report of 50 identical failures"
    );
    assert!(started.elapsed() < std::time::Duration::from_secs(20));
    let requests = get(&format!("{}/_sandbox/requests", served.base_url));
    assert!(
        !requests
            .as_array()
            .unwrap()
            .iter()
            .any(|r| r["path"].as_str().unwrap().starts_with("/subscriptions/")),
        "no cluster was read"
    );
}
