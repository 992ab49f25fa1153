//! A fleet check of 1,000 sandbox clusters (`kmsflow check --targets`, one run per cluster in
//! the store) at `--concurrency 100` with 50 ms per request, for a PMK fleet, a CMK fleet and
//! a mixed one: clusters per second beside the ideal (concurrency / (reads a check needs x
//! latency): one read for PMK, four for CMK), and the check's peak memory; the same for 10,000
//! PMK clusters, where the process around the fleet weighs a tenth as much. Then 1,000
//! with the sandbox's token buckets on: requests per second beside the read bucket's refill
//! rate, and the share of 429s.
//!
//! Run: `cargo bench --bench fleet`. It drives the built binary, as an operator would.

mod support;

use std::collections::HashMap;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use serde_json::{Value, json};
use support::{requests, serve};

const CLUSTERS: usize = 1_000;
const CONCURRENCY: usize = 100;
const LATENCY_MS: u64 = 50;

/// What the fleet is made of.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mix {
    Pmk,
    Cmk,
    /// Every other cluster CMK.
    Mixed,
}

impl Mix {
    fn cmk(self, i: usize) -> bool {
        match self {
            Mix::Pmk => false,
            Mix::Cmk => true,
            Mix::Mixed => i % 2 == 1,
        }
    }

    /// Reads a check must make per cluster, from what it judges, not from what it sent: a PMK
    /// cluster is one read; a CMK cluster is four (the cluster, its vault, its key, the role
    /// assignments on the vault).
    fn reads_per_check(self) -> f64 {
        match self {
            Mix::Pmk => 1.0,
            Mix::Cmk => 4.0,
            Mix::Mixed => 2.5,
        }
    }

    fn name(self) -> &'static str {
        match self {
            Mix::Pmk => "PMK",
            Mix::Cmk => "CMK",
            Mix::Mixed => "half PMK, half CMK",
        }
    }
}

/// Key Vault Crypto User and Key Vault Contributor, as the CMK runbooks grant them.
const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";
const CONTRIBUTOR: &str = "f25e0fa2-a7c8-4377-a976-54943a77a395";
/// Key Vault Reader, for the identity the check runs as (the sandbox's caller).
const READER: &str = "21090545-7ca7-4776-b22c-e363652d74d2";
const CHECKER: &str = "00000000-0000-4000-8000-ca11e4000001";

fn world(dir: &Path, clusters: usize, mix: Mix) {
    let subscription = "00000000-0000-4000-8000-5a4db0c5ab0c";
    let group = format!("/subscriptions/{subscription}/resourceGroups/rg-fleet");
    let (mut resources, mut keys, mut assignments) = (Vec::new(), Vec::new(), Vec::new());
    let mut targets = String::from("resource_group,cluster,expected_mode\n");
    for i in 0..clusters {
        let name = format!("aks-{i:05}");
        let mut profile = json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}});
        let mut identity = json!({"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"});
        if mix.cmk(i) {
            targets.push_str(&format!("rg-fleet,{name},CMK\n"));
            let vault = format!("kv{i:05}");
            let vault_id = format!("{group}/providers/Microsoft.KeyVault/vaults/{vault}");
            let principal = format!("00000000-0000-4000-8000-{i:012}");
            resources.push(json!({
                "id": vault_id, "name": vault, "type": "Microsoft.KeyVault/vaults", "location": "eastus", "tags": {},
                "properties": {"tenantId": "00000000-0000-4000-8000-7e4a47000001", "sku": {"family": "A", "name": "standard"},
                    "enableRbacAuthorization": true, "enableSoftDelete": true, "softDeleteRetentionInDays": 90,
                    "publicNetworkAccess": "Enabled", "accessPolicies": [], "provisioningState": "Succeeded",
                    "vaultUri": format!("https://{vault}.vault.azure.net/"),
                    "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow", "ipRules": [], "virtualNetworkRules": []}},
            }));
            keys.push(json!({"vault": vault, "name": "kms-key"}));
            for role in [CRYPTO_USER, CONTRIBUTOR] {
                assignments.push(json!({"scope": vault_id, "principal": principal, "role": role}));
            }
            // The checker reads the key through Resource Manager: that takes a data role.
            assignments.push(json!({"scope": vault_id, "principal": CHECKER, "role": READER}));
            let identity_id = format!(
                "{group}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-{name}"
            );
            identity = json!({"type": "UserAssigned", "userAssignedIdentities": {identity_id: {"principalId": principal, "clientId": principal}}});
            profile["azureKeyVaultKms"] = json!({"enabled": true, "keyId": format!("https://{vault}.vault.azure.net/keys/kms-key"),
                "keyVaultNetworkAccess": "Public", "keyVaultResourceId": vault_id});
        } else {
            targets.push_str(&format!("rg-fleet,{name},PMK\n"));
        }
        resources.push(json!({
            "id": format!("{group}/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "identity": identity,
            "properties": {"provisioningState": "Succeeded", "currentKubernetesVersion": "1.33.0", "securityProfile": profile},
        }));
    }
    let world = json!({"resource_groups": [{"name": "rg-fleet", "location": "eastus"}], "resources": resources,
                       "keys": keys, "role_assignments": assignments});
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("targets.csv"), targets).unwrap();
}

/// Runs the fleet check; returns (wall time, peak MiB, the report).
fn check(dir: &Path, env: &HashMap<String, String>) -> (Duration, f64, Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args([
            "check",
            "--targets",
            "targets.csv",
            "--concurrency",
            &CONCURRENCY.to_string(),
            "--output",
            "json",
        ])
        .current_dir(dir)
        .envs(env)
        .env(
            "KMSFLOW_STATE",
            dir.join(format!("state-{}.db", fastrand::u64(..))),
        );
    let (wall, peak, stdout) = support::measured(command);
    (wall, peak, serde_json::from_str(&stdout).unwrap())
}

/// The fleet at 50 ms per request with token buckets off: its rate beside the ideal, which
/// the latency model gives (concurrency / (reads a check must make x latency)), whatever the
/// check sent.
fn unmetered(clusters: usize, mix: Mix, target: &str) {
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), clusters, mix);
    let (mut sandbox, env, base_url) = serve(
        dir.path(),
        &format!("latency: {{ min_ms: {LATENCY_MS}, max_ms: {LATENCY_MS} }}\n"),
    );
    let (wall, peak, report) = check(dir.path(), &env);
    let log = requests(&base_url);
    let sent = log.len();
    let _ = sandbox.kill();
    // The sandbox logs each request as it arrives; its answer leaves the latency later.
    let arrivals: Vec<u64> = log.iter().map(|r| r["at_ms"].as_u64().unwrap()).collect();
    let span_s = (arrivals.iter().max().unwrap() - arrivals.iter().min().unwrap()) as f64 / 1000.0
        + LATENCY_MS as f64 / 1000.0;
    let per_check = sent as f64 / clusters as f64;
    let ideal = CONCURRENCY as f64 / (mix.reads_per_check() * LATENCY_MS as f64 / 1000.0);
    let rate = clusters as f64 / wall.as_secs_f64();
    println!(
        "fleet check, {clusters} clusters ({}), --concurrency {CONCURRENCY}, {LATENCY_MS} ms per request, token buckets off:",
        mix.name()
    );
    println!(
        "  {} checked ({} ok, {} warn, {} fail) in {:.2} s; {per_check:.2} requests per check sent, {:.1} needed",
        report["summary"]["clusters"],
        report["summary"]["ok"],
        report["summary"]["warn"],
        report["summary"]["fail"],
        wall.as_secs_f64(),
        mix.reads_per_check()
    );
    println!(
        "  {rate:>8.1} clusters/s; ideal {ideal:.1} clusters/s = {:.0}%{target}",
        rate / ideal * 100.0
    );
    println!(
        "  inside the check (first request to last answer, without process start and exit): {:.1} clusters/s = {:.0}%",
        clusters as f64 / span_s,
        clusters as f64 / span_s / ideal * 100.0
    );
    println!(
        "  peak memory {peak:.1} MiB{}",
        if target.is_empty() {
            ""
        } else {
            " (target < 200 MiB)"
        }
    );
}

fn main() {
    unmetered(CLUSTERS, Mix::Pmk, " (target >= 90%)");
    unmetered(CLUSTERS, Mix::Cmk, " (target >= 90%)");
    unmetered(CLUSTERS, Mix::Mixed, " (target >= 90%)");
    // Ten times the fleet: what the process costs around it (starting, the token, the report)
    // weighs a tenth as much.
    unmetered(10 * CLUSTERS, Mix::Pmk, "");

    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), CLUSTERS, Mix::Pmk);
    let (mut sandbox, env, base_url) = serve(dir.path(), "token_buckets: true\n");
    let (wall, _, report) = check(dir.path(), &env);
    let sent = requests(&base_url);
    let _ = sandbox.kill();
    let throttled = sent.iter().filter(|r| r["status"] == 429).count();
    // After the 250-request burst the bucket refills at 25/s: that is the rate to hold.
    let paced: Vec<u64> = sent
        .iter()
        .skip(260)
        .map(|r| r["at_ms"].as_u64().unwrap())
        .collect();
    let paced_rate = (paced.len().saturating_sub(1)) as f64
        / ((paced.last().unwrap_or(&0) - paced.first().unwrap_or(&0)) as f64 / 1000.0).max(0.001);
    println!("the same with token buckets on (reads: 250 burst, 25/s):");
    println!(
        "  {} checked in {:.2} s; {} requests, {} answered 429 ({:.2}%, target <= 1%)",
        report["summary"]["clusters"],
        wall.as_secs_f64(),
        sent.len(),
        throttled,
        throttled as f64 * 100.0 / sent.len() as f64
    );
    println!(
        "  past the burst: {paced_rate:.1} requests/s = {:.0}% of the 25/s refill (target >= 90%)",
        paced_rate / 25.0 * 100.0
    );
}
