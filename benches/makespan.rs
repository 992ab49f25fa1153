//! Makespan of `cmk-private-vault-new-cluster` against the sandbox with fixed latencies
//! (200 ms per write, reads free, 2 s per cluster operation, no random faults): the wall time
//! beside the runbook's critical path and beside the sum of all steps (what running the seed's
//! commands one by one would take).
//!
//! Both come from the latency model, never from durations measured in the run being judged:
//! each step costs the writes its contract needs (`STEP_COST`) at 200 ms and its cluster
//! operations at 2 s, and the critical path is the longest chain of those costs through the
//! DAG. The run's own request log is checked against the model's count of writes, so a model
//! that no longer matches the runbook says so instead of flattering anyone.
//!
//! Run: `cargo bench --bench makespan`.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::{FragmentResolver, Registry, RunbookSource, compile_with};
use kmsflow_sandbox::{Delays, Faults, Latency, Sandbox, SandboxOptions};
use kmsflow_state::{Durability, RunStatus};
use kmsflow_steps::{AuthMode, Azure, AzureConfig};

const WRITE_MS: u64 = 200;
const OPERATION_MS: u64 = 2_000;

/// What each step must ask of Azure, whatever the client: (step, writes, cluster operations).
/// `feature` registers the feature and re-registers the provider; `cmk--key` creates the key
/// and sets its rotation policy; the cluster is one PUT and its operation; the other writers
/// are one PUT or PATCH each; reads cost nothing in this model.
const STEP_COST: &[(&str, u64, u64)] = &[
    ("feature", 2, 0),
    ("group", 1, 0),
    ("cmk--identity", 1, 0),
    ("cmk--vault", 1, 0),
    ("cmk--contributor", 1, 0),
    ("cmk--crypto-user", 1, 0),
    ("cmk--officer", 1, 0),
    ("cmk--key", 2, 0),
    ("cmk--firewall", 1, 0),
    ("cluster", 1, 1),
];

/// A step's cost in the model.
fn modelled(step_id: &str) -> Duration {
    STEP_COST.iter().find(|(id, ..)| *id == step_id).map_or(
        Duration::ZERO,
        |(_, writes, operations)| {
            Duration::from_millis(writes * WRITE_MS + operations * OPERATION_MS)
        },
    )
}

struct Files;

impl FragmentResolver for Files {
    fn resolve(&self, including: &str, path: &str) -> Option<RunbookSource> {
        let file = std::path::Path::new(including).parent()?.join(path);
        Some(RunbookSource::new(
            file.display().to_string(),
            std::fs::read_to_string(&file).ok()?,
        ))
    }
}

fn main() {
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let runbook_path = root.join("runbooks/cmk-private-vault-new-cluster.yaml");
    let text = std::fs::read_to_string(&runbook_path).expect("the runbook");

    let listener = std::net::TcpListener::bind(("127.0.0.1", 0)).unwrap();
    listener.set_nonblocking(true).unwrap();
    let base_url = format!("http://{}", listener.local_addr().unwrap());
    let options = SandboxOptions {
        faults: Faults {
            latency: Some(Latency {
                min_ms: 0,
                max_ms: 0,
                write_ms: WRITE_MS,
            }),
            delays: Delays {
                cluster_operation: Duration::from_millis(OPERATION_MS),
                ..Delays::default()
            },
            ..Faults::default()
        },
        identity_header: Some("makespan-bench".into()),
        ..SandboxOptions::default()
    };
    // SAFETY: no other thread exists yet; azure_identity reads these to find the token endpoint.
    unsafe {
        std::env::set_var("IDENTITY_ENDPOINT", format!("{base_url}/msi/token"));
        std::env::set_var("IDENTITY_HEADER", "makespan-bench");
    }
    let (subscription, tenant) = (options.subscription.clone(), options.tenant.clone());
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        let _sandbox = Sandbox::serve(tokio::net::TcpListener::from_std(listener).unwrap(), options).unwrap();
        let mut registry = Registry::with_engine_kinds();
        kmsflow_steps::register(&mut registry, Azure::new(AzureConfig::new(&base_url, AuthMode::ManagedIdentity).unwrap()));
        let source = RunbookSource::new(runbook_path.display().to_string(), text.as_str());
        let compiled = Arc::new(compile_with(&source, &registry, &Files).expect("the runbook compiles"));
        let cli: Vec<(String, String)> = [
            ("subscription", subscription.as_str()),
            ("tenant", tenant.as_str()),
            ("resource_group", "rg-bench"),
            ("cluster", "aks-bench"),
            ("key_vault", "kv-bench"),
            ("identity", "id-bench"),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_owned(), v.to_owned()))
        .collect();
        let params = bind(&compiled, &ParamSources { cli, ..Default::default() }).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine { registry, state: dir.path().join("state.db").into(), durability: Durability::Full };
        let request = RunRequest {
            runbook: compiled.clone(),
            runbook_ref: "cmk-private-vault-new-cluster".into(),
            source: text.clone(),
            params,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: kmsflow_engine::progress::silent(),
        };
        let started = Instant::now();
        let summary = launch::start(&engine, request).await.unwrap();
        let wall = started.elapsed();
        assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);

        // Longest path through the DAG with the model's costs: steps come in topological
        // order, so one pass suffices.
        let mut finish: HashMap<&str, Duration> = HashMap::new();
        for step in &compiled.steps {
            let ready = step
                .needs
                .iter()
                .chain(&step.reads_outputs_of)
                .filter_map(|n| finish.get(n.as_str()).copied())
                .max()
                .unwrap_or_default();
            finish.insert(&step.id, ready + modelled(&step.id));
        }
        let critical = finish.values().copied().max().unwrap_or_default();
        let total: Duration = compiled.steps.iter().map(|s| modelled(&s.id)).sum();
        let writes = sandbox_writes(&base_url).await;
        let modelled_writes: u64 = STEP_COST.iter().map(|(_, w, _)| w).sum();
        println!(
            "cmk-private-vault-new-cluster, {} steps, {WRITE_MS} ms per write, {OPERATION_MS} ms per cluster operation:",
            compiled.steps.len()
        );
        println!("  wall time        {:>7.2} s", wall.as_secs_f64());
        println!(
            "  critical path    {:>7.2} s  (the model's; wall / critical = {:.3}; target <= 1.10)",
            critical.as_secs_f64(),
            wall.as_secs_f64() / critical.as_secs_f64()
        );
        println!(
            "  sum of steps     {:>7.2} s  (one by one, as the seed's commands run; {:.1}x the wall time)",
            total.as_secs_f64(),
            total.as_secs_f64() / wall.as_secs_f64()
        );
        println!(
            "  writes sent      {writes:>7}    (the model counts {modelled_writes}{})",
            if writes as u64 == modelled_writes { "" } else { ": the model no longer matches the runbook" }
        );
    });
}

/// Writes the sandbox served (its own request log).
async fn sandbox_writes(base_url: &str) -> usize {
    let log: serde_json::Value = reqwest::get(format!("{base_url}/_sandbox/requests"))
        .await
        .unwrap()
        .json()
        .await
        .unwrap();
    log.as_array()
        .unwrap()
        .iter()
        .filter(|r| r["write"] == true)
        .count()
}
