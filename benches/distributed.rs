//! A distributed read-only rollout (`run verify-kms --targets --distribute`) of 1,000 sandbox
//! clusters on 1, 2 and 3 workers, with the state on a throwaway PostgreSQL server: the
//! makespan, clusters per second, and CPU per cluster (the workers', and the whole machine's:
//! the database and the sandbox run here too).
//!
//! The ideal comes from the latency model, never from the run being judged: `verify-kms`
//! needs one read of each cluster (`L` ms), and at most `C = min(rollout concurrency, workers
//! x slots)` targets run at once, so the rollout takes at least `ceil(n / C) * L`. On the 2
//! cores of the machines we run on, every worker, the database and the sandbox share the same
//! CPUs: expect little scaling; the CPU per cluster says where the time goes.
//!
//! Run: `cargo bench --bench distributed`.

mod support;

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

const CLUSTERS: usize = 1_000;
const LATENCY_MS: u64 = 20;
/// Targets at once in the rollout: more than three workers' slots, so the workers bound it.
const ROLLOUT_CONCURRENCY: usize = 48;
const SLOTS: usize = 8;

/// `n` clusters already on platform-managed keys (what `verify-kms` expects), and their
/// targets.
fn world(dir: &Path, n: usize) {
    let mut resources = Vec::with_capacity(n);
    let mut targets = String::from("resource_group,cluster\n");
    for i in 0..n {
        let name = format!("aks-{i:05}");
        targets.push_str(&format!("rg-fleet,{name}\n"));
        resources.push(support::fleet_cluster(
            &name,
            json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}, "azureKeyVaultKms": null}),
        ));
    }
    let world = json!({
        "resource_groups": [{"name": "rg-fleet", "location": "eastus"}],
        "resources": resources,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(dir.join("targets.csv"), targets).unwrap();
}

/// CPU seconds a process used so far (user + system), from /proc.
fn cpu_of(pid: u32) -> f64 {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).unwrap_or_default();
    // The fields after the command's `(...)`: utime and stime are the 12th and 13th.
    let after = stat.rsplit_once(')').map_or("", |(_, rest)| rest);
    let fields: Vec<&str> = after.split_whitespace().collect();
    let ticks: f64 = [11, 12]
        .iter()
        .filter_map(|i| fields.get(*i).and_then(|f| f.parse::<f64>().ok()))
        .sum();
    ticks / clock_ticks()
}

/// CPU seconds the whole machine spent busy so far, from /proc/stat.
fn machine_cpu() -> f64 {
    let stat = std::fs::read_to_string("/proc/stat").unwrap();
    let cpu = stat.lines().next().unwrap();
    // user nice system idle iowait irq softirq steal: everything but idle and iowait.
    let busy: f64 = cpu
        .split_whitespace()
        .skip(1)
        .enumerate()
        .filter(|(i, _)| ![3, 4].contains(i))
        .take(7)
        .filter_map(|(_, v)| v.parse::<f64>().ok())
        .sum();
    busy / clock_ticks()
}

fn clock_ticks() -> f64 {
    nix::unistd::sysconf(nix::unistd::SysconfVar::CLK_TCK)
        .ok()
        .flatten()
        .map_or(100.0, |t| t as f64)
}

struct Measured {
    wall: f64,
    worker_cpu: f64,
    machine_cpu: f64,
}

/// Queues the rollout (`--detach`), starts `workers` workers, and waits for the rollout to
/// end.
fn rollout(
    dir: &Path,
    env: &std::collections::HashMap<String, String>,
    workers: usize,
) -> Measured {
    let database = kmsflow_pgtest::server().database();
    let kmsflow = |args: &[&str]| {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
        command
            .args(args)
            .current_dir(dir)
            .envs(env)
            .env("KMSFLOW_STATE", &database)
            .stdin(Stdio::null());
        command
    };
    let queued = kmsflow(&[
        "run",
        "verify-kms",
        "--targets",
        "targets.csv",
        "--concurrency",
        &ROLLOUT_CONCURRENCY.to_string(),
        "--waves",
        "100%",
        "--distribute",
        "--queue",
        "bench",
        "--detach",
        "--yes",
    ])
    .stderr(Stdio::null())
    .output()
    .unwrap();
    assert!(queued.status.success(), "the rollout is queued");
    let id = String::from_utf8(queued.stdout).unwrap().trim().to_owned();
    let store = kmsflow_state::Store::open(
        &kmsflow_state::Location::parse(&database).unwrap(),
        kmsflow_state::Durability::Full,
    )
    .unwrap();
    let machine_before = machine_cpu();
    let started = Instant::now();
    let mut children: Vec<Child> = (0..workers)
        .map(|i| {
            kmsflow(&[
                "worker",
                "--queue",
                "bench",
                "--concurrency",
                &SLOTS.to_string(),
            ])
            .env("KMSFLOW_HOST_ID", format!("bench-{i}"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
        })
        .collect();
    loop {
        if store.queued(&id).unwrap().map(|q| q.status) == Some(kmsflow_state::QueueStatus::Done) {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(900),
            "the rollout ends"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let wall = started.elapsed().as_secs_f64();
    let machine = machine_cpu() - machine_before;
    let worker_cpu: f64 = children.iter().map(|c| cpu_of(c.id())).sum();
    for child in &mut children {
        let _ = nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(child.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        );
        let _ = child.wait();
    }
    let rollout = store.rollout(&id).unwrap();
    let targets = store.rollout_targets(&id).unwrap();
    let succeeded = targets
        .iter()
        .filter(|t| t.status == Some(kmsflow_state::RunStatus::Succeeded))
        .count();
    assert_eq!(
        succeeded, CLUSTERS,
        "every target succeeds: {:?}",
        rollout.error
    );
    Measured {
        wall,
        worker_cpu,
        machine_cpu: machine,
    }
}

fn main() {
    let dir = tempfile::tempdir().unwrap();
    world(dir.path(), CLUSTERS);
    let (mut sandbox, env, _) = support::serve(
        dir.path(),
        &format!("latency: {{ min_ms: {LATENCY_MS}, max_ms: {LATENCY_MS}, write_ms: 0 }}\n"),
    );
    println!(
        "distributed read-only rollout (verify-kms) of {CLUSTERS} sandbox clusters on PostgreSQL, \
         {LATENCY_MS} ms per request, --concurrency {ROLLOUT_CONCURRENCY} in one wave, {SLOTS} runs per worker:"
    );
    let mut first = None;
    for workers in 1..=3 {
        let measured = rollout(dir.path(), &env, workers);
        let at_once = ROLLOUT_CONCURRENCY.min(workers * SLOTS);
        let ideal = CLUSTERS.div_ceil(at_once) as f64 * LATENCY_MS as f64 / 1000.0;
        let rate = CLUSTERS as f64 / measured.wall;
        let base = *first.get_or_insert(rate);
        println!(
            "  {workers} worker{}: {:.1} s, {rate:.1} clusters/s ({:.2}x one worker; latency-model ideal {ideal:.2} s), \
             CPU per cluster {:.1} ms in the workers, {:.1} ms on the whole machine",
            if workers == 1 { " " } else { "s" },
            measured.wall,
            rate / base,
            measured.worker_cpu * 1000.0 / CLUSTERS as f64,
            measured.machine_cpu * 1000.0 / CLUSTERS as f64,
        );
    }
    let _ = sandbox.kill();
}
