//! A rollout of `pmk-existing-cluster` over 200 sandbox clusters (`kmsflow run --targets`,
//! one run per cluster) with a fixed latency per request and per cluster operation and ARM's
//! token buckets on: the makespan beside the ideal, the share of 429s, and peak memory; then
//! 10,000 targets (no latency) for memory.
//!
//! The ideal comes from the latency model and the rollout's policy, never from the run being
//! judged. A target needs at least these requests (what the runbook must ask Azure, whatever
//! the client): the feature and its provider read, the cluster read, the cluster PUT, one read
//! of the operation once it is done, the cluster read that ARM's long-running-operation
//! contract requires after it (an `Azure-AsyncOperation` status carries only the status), and
//! the verifying read: `MIN_READS` reads and one write, plus the operation itself. So a target takes at least `T = (MIN_READS + 1) * L + W + D`.
//! The waves (the default ramp: 1, 2, 4, ... below the concurrency, then the rest) run one
//! after another, each in `ceil(size / concurrency)` rounds of `T`; and no rollout can beat
//! the buckets: `(reads - burst) / refill` for reads and the same for writes. The ideal is the
//! largest of the three.
//!
//! Run: `cargo bench --bench rollout`.

mod support;

use std::path::Path;
use std::process::Command;

use serde_json::{Value, json};

const LATENCY_MS: u64 = 20;
const WRITE_MS: u64 = 50;
const OPERATION_MS: u64 = 1_000;
const CONCURRENCY: usize = 20;
/// Reads a target needs at the least (see the module's comment).
const MIN_READS: usize = 6;
const MIN_WRITES: usize = 1;
/// ARM's buckets as the sandbox keeps them (and as Azure documents them).
const READ_BURST: f64 = 250.0;
const READ_REFILL: f64 = 25.0;
const WRITE_BURST: f64 = 200.0;
const WRITE_REFILL: f64 = 10.0;

/// `n` clusters on Kubernetes 1.33 without KMS, the feature registered, and their targets.
fn world(dir: &Path, n: usize) {
    let mut resources = Vec::with_capacity(n);
    let mut targets = String::from("resource_group,cluster\n");
    for i in 0..n {
        let name = format!("aks-{i:05}");
        targets.push_str(&format!("rg-fleet,{name}\n"));
        resources.push(support::fleet_cluster(
            &name,
            json!({"kubernetesResourceObjectEncryptionProfile": null, "azureKeyVaultKms": null}),
        ));
    }
    let world = json!({
        "resource_groups": [{"name": "rg-fleet", "location": "eastus"}],
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": resources,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("targets.csv"), targets).unwrap();
}

/// Wave sizes of the default ramp, as the rollout's policy defines it.
fn ramp(concurrency: usize, n: usize) -> Vec<usize> {
    let (mut sizes, mut size, mut done) = (Vec::new(), 1, 0);
    while size < concurrency && done + size < n {
        sizes.push(size);
        done += size;
        size *= 2;
    }
    if done < n {
        sizes.push(n - done);
    }
    sizes
}

/// The rollout's makespan as the latency model bounds it, in seconds: (ideal, concurrency
/// bound, read bucket bound, write bucket bound).
fn ideal(n: usize) -> (f64, f64, f64, f64) {
    let per_target =
        ((MIN_READS + MIN_WRITES) as u64 * LATENCY_MS + WRITE_MS + OPERATION_MS) as f64 / 1000.0;
    let rounds: usize = ramp(CONCURRENCY, n)
        .iter()
        .map(|size| size.div_ceil(CONCURRENCY))
        .sum();
    let by_concurrency = rounds as f64 * per_target;
    let by_reads = ((MIN_READS * n) as f64 - READ_BURST).max(0.0) / READ_REFILL;
    let by_writes = ((MIN_WRITES * n) as f64 - WRITE_BURST).max(0.0) / WRITE_REFILL;
    (
        by_concurrency.max(by_reads).max(by_writes),
        by_concurrency,
        by_reads,
        by_writes,
    )
}

fn rollout(
    dir: &Path,
    env: &std::collections::HashMap<String, String>,
    concurrency: usize,
) -> (f64, f64, Value) {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args([
            "run",
            "pmk-existing-cluster",
            "--targets",
            "targets.csv",
            "--concurrency",
            &concurrency.to_string(),
            "--yes",
            "--output",
            "json",
        ])
        .current_dir(dir)
        .envs(env)
        .env("KMSFLOW_STATE", dir.join("state.db"));
    let (wall, peak, stdout) = support::measured(command);
    let report: Value = serde_json::from_str(&stdout).expect("the rollout's report");
    (wall.as_secs_f64(), peak, report)
}

fn main() {
    let n = 200;
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), n);
    let (mut sandbox, env, base_url) = support::serve(
        dir.path(),
        &format!(
            "latency: {{ min_ms: {LATENCY_MS}, max_ms: {LATENCY_MS}, write_ms: {WRITE_MS} }}\n\
             delays: {{ cluster_operation: {OPERATION_MS}ms }}\ntoken_buckets: true\n"
        ),
    );
    let (wall, peak, report) = rollout(dir.path(), &env, CONCURRENCY);
    let sent = support::requests(&base_url);
    let _ = sandbox.kill();
    assert_eq!(report["summary"]["succeeded"], n, "{}", report["summary"]);
    let throttled = sent.iter().filter(|r| r["status"] == 429).count();
    let writes = sent.iter().filter(|r| r["write"] == true).count();
    let (ideal, by_concurrency, by_reads, by_writes) = ideal(n);
    println!(
        "rollout of pmk-existing-cluster, {n} clusters, --concurrency {CONCURRENCY} (waves {:?}), \
         {LATENCY_MS} ms per request (+{WRITE_MS} ms per write), {OPERATION_MS} ms per cluster operation, token buckets on:",
        ramp(CONCURRENCY, n)
    );
    println!(
        "  makespan {wall:.2} s; ideal {ideal:.2} s = max(concurrency {by_concurrency:.2} s, read bucket {by_reads:.2} s, write bucket {by_writes:.2} s)"
    );
    println!("  makespan / ideal = {:.3} (target <= 1.15)", wall / ideal);
    println!(
        "  {} requests ({:.1} per cluster; at least {} needed), {writes} writes, {throttled} answered 429 ({:.2}%, target 0)",
        sent.len(),
        sent.len() as f64 / n as f64,
        MIN_READS + MIN_WRITES,
        throttled as f64 * 100.0 / sent.len().max(1) as f64
    );
    println!("  peak memory {peak:.1} MiB");

    // Memory at 10,000 targets: no latency, no buckets, 200 at once (each target still waits
    // a second for its first operation poll); what the rollout holds per target, its JSON
    // report of every target's steps included.
    let n = 10_000;
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), n);
    let (mut sandbox, env, _) = support::serve(dir.path(), "{}\n");
    let (wall, peak, report) = rollout(dir.path(), &env, 200);
    let _ = sandbox.kill();
    assert_eq!(report["summary"]["succeeded"], n, "{}", report["summary"]);
    println!("the same over {n} clusters, --concurrency 200, no latency, buckets off:");
    println!(
        "  {:.1} s ({:.0} clusters/s); peak memory {peak:.1} MiB (target < 150 MiB)",
        wall,
        n as f64 / wall
    );
}
