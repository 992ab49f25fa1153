//! Makespan of `cmk-private-vault-new-cluster` against the sandbox with fixed latencies
//! (200 ms per write, 2 s per cluster operation, no random faults): the wall time beside the
//! runbook's critical path (the longest chain of step durations through the DAG) and beside
//! the sum of all step durations (what running the seed's commands one by one would take).
//!
//! Run: `cargo bench --bench makespan`.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::progress::Progress;
use kmsflow_engine::{FragmentResolver, Registry, RunbookSource, compile_with};
use kmsflow_sandbox::{Delays, Faults, Latency, Sandbox, SandboxOptions};
use kmsflow_state::{Durability, RunStatus};
use kmsflow_steps::{AuthMode, Azure, AzureConfig};

/// When a step first started and when it succeeded.
type StepTimes = (Option<Instant>, Option<Instant>);

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
                write_ms: 200,
            }),
            delays: Delays {
                cluster_operation: Duration::from_secs(2),
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
        let marks: Arc<Mutex<HashMap<String, StepTimes>>> = Arc::default();
        let sink = {
            let marks = marks.clone();
            Arc::new(move |event: &Progress| {
                let mut marks = marks.lock().unwrap();
                match event {
                    Progress::StepStarted { step_id, .. } => {
                        marks.entry(step_id.clone()).or_default().0.get_or_insert(Instant::now());
                    }
                    Progress::StepSucceeded { step_id, .. } => {
                        marks.entry(step_id.clone()).or_default().1 = Some(Instant::now());
                    }
                    _ => {}
                }
            })
        };
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine { registry, state_path: dir.path().join("state.db"), durability: Durability::Full };
        let request = RunRequest {
            runbook: compiled.clone(),
            runbook_ref: "cmk-private-vault-new-cluster".into(),
            source: text.clone(),
            params,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: sink,
        };
        let started = Instant::now();
        let summary = launch::start(&engine, request).await.unwrap();
        let wall = started.elapsed();
        assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);

        let marks = marks.lock().unwrap();
        let duration = |id: &str| match marks.get(id) {
            Some((Some(start), Some(end))) => *end - *start,
            _ => Duration::ZERO,
        };
        // Longest path: steps come in topological order, so one pass suffices.
        let mut finish: HashMap<&str, Duration> = HashMap::new();
        for step in &compiled.steps {
            let ready = step.needs.iter().map(|n| finish[n.as_str()]).max().unwrap_or_default();
            finish.insert(&step.id, ready + duration(&step.id));
        }
        let critical = finish.values().copied().max().unwrap_or_default();
        let total: Duration = compiled.steps.iter().map(|s| duration(&s.id)).sum();
        println!("cmk-private-vault-new-cluster, {} steps, 200 ms per write, 2 s per cluster operation:", compiled.steps.len());
        println!("  wall time        {:>7.2} s", wall.as_secs_f64());
        println!("  critical path    {:>7.2} s  (wall / critical = {:.3}; target <= 1.10)", critical.as_secs_f64(), wall.as_secs_f64() / critical.as_secs_f64());
        println!("  sum of steps     {:>7.2} s  (one by one, as the seed's commands run; {:.1}x the wall time)", total.as_secs_f64(), total.as_secs_f64() / wall.as_secs_f64());
    });
}
