//! A fleet check of 1,000 sandbox clusters (`kmsflow check --targets`, one run per cluster in
//! the store) at `--concurrency 100` with 50 ms per request: clusters per second beside the
//! ideal (concurrency / (requests per check x latency)), and the check's peak memory; the same
//! for 10,000 clusters, where the process around the fleet weighs a tenth as much. Then 1,000
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

fn world(dir: &Path, clusters: usize) {
    let subscription = "00000000-0000-4000-8000-5a4db0c5ab0c";
    let mut resources = Vec::new();
    let mut targets = String::from("resource_group,cluster,expected_mode\n");
    for i in 0..clusters {
        let name = format!("aks-{i:04}");
        targets.push_str(&format!("rg-fleet,{name},PMK\n"));
        resources.push(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/rg-fleet/providers/Microsoft.ContainerService/managedClusters/{name}"),
            "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
            "properties": {"provisioningState": "Succeeded", "currentKubernetesVersion": "1.33.0",
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}}},
        }));
    }
    let world = json!({"resource_groups": [{"name": "rg-fleet", "location": "eastus"}], "resources": resources});
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

/// The fleet at 50 ms per request with token buckets off: its rate beside the ideal.
fn unmetered(clusters: usize, target: &str) {
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), clusters);
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
    let ideal = CONCURRENCY as f64 / (per_check * LATENCY_MS as f64 / 1000.0);
    let rate = clusters as f64 / wall.as_secs_f64();
    println!(
        "fleet check, {clusters} clusters, --concurrency {CONCURRENCY}, {LATENCY_MS} ms per request, token buckets off:"
    );
    println!(
        "  {} checked ({} ok) in {:.2} s, {per_check:.2} requests per check",
        report["summary"]["clusters"],
        report["summary"]["ok"],
        wall.as_secs_f64()
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
    unmetered(CLUSTERS, " (target >= 90%)");
    // Ten times the fleet: what the process costs around it (starting, the token, the report)
    // weighs a tenth as much.
    unmetered(10 * CLUSTERS, "");

    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), CLUSTERS);
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
