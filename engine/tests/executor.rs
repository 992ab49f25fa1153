//! The executor against a real state file, with a probe step kind that counts what the engine
//! asks of it.

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_trait::async_trait;
use chrono::Utc;
use kmsflow_engine::executor::{
    Checkpointing, ExecOptions, Execution, RunSummary, Signals, execute,
};
use kmsflow_engine::kind::*;
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::progress::silent;
use kmsflow_engine::{Registry, RunbookSource, compile};
use kmsflow_state::{Durability, NewRun, RunStatus, StepStatus, Store, Write};
use serde::Deserialize;
use serde_json::{Map, Value, json};

/// What the probe kind was asked to do, per key.
#[derive(Default)]
struct Calls {
    observe: HashMap<String, usize>,
    apply: HashMap<String, usize>,
    /// Keys whose resource "exists" (created by apply, or seeded).
    existing: Vec<String>,
}

struct Probe {
    calls: Arc<Mutex<Calls>>,
    in_flight: Arc<AtomicUsize>,
    max_in_flight: Arc<AtomicUsize>,
}

#[derive(Deserialize)]
struct ProbeParams {
    key: String,
    #[serde(default)]
    fail_transiently: u32,
    #[serde(default)]
    fail_permanently: bool,
    #[serde(default)]
    hold_ms: u64,
}

static SPEC: KindSpec = KindSpec {
    name: "probe",
    summary: "test kind",
    params: &[
        ParamSpec::required("key", ValueType::String, "resource name"),
        ParamSpec::optional("fail_transiently", ValueType::Int, "failing attempts"),
        ParamSpec::optional("fail_permanently", ValueType::Bool, "fail for good"),
        ParamSpec::optional("hold_ms", ValueType::Int, "apply takes this long"),
    ],
    outputs: OutputsSpec::Fixed(&[OutputSpec {
        name: "key",
        description: "the key",
    }]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Probe {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let params: ProbeParams = cx.params()?;
        let mut calls = self.calls.lock().unwrap();
        *calls.observe.entry(params.key.clone()).or_default() += 1;
        Ok(json!({"exists": calls.existing.contains(&params.key)}))
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let params: ProbeParams = cx.params()?;
        let mut outputs = Map::new();
        outputs.insert("key".into(), json!(params.key));
        if before["exists"] == true {
            return Ok(StepPlan::unchanged(outputs));
        }
        Ok(StepPlan::change(Change::Create {
            summary: format!("create {}", params.key),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _: &Value,
        _: &StepPlan,
    ) -> Result<Applied, StepError> {
        let params: ProbeParams = cx.params()?;
        let now = self.in_flight.fetch_add(1, Ordering::SeqCst) + 1;
        self.max_in_flight.fetch_max(now, Ordering::SeqCst);
        tokio::time::sleep(Duration::from_millis(params.hold_ms)).await;
        self.in_flight.fetch_sub(1, Ordering::SeqCst);
        let mut calls = self.calls.lock().unwrap();
        *calls.apply.entry(params.key.clone()).or_default() += 1;
        if params.fail_permanently {
            return Err(StepError::permanent("bad request: the name is taken"));
        }
        if cx.attempt <= params.fail_transiently {
            return Err(StepError::transient("503 service unavailable")
                .with_retry_after(Duration::from_millis(20)));
        }
        calls.existing.push(params.key.clone());
        let mut outputs = Map::new();
        outputs.insert("key".into(), json!(params.key));
        Ok(outputs.into())
    }

    async fn rollback(
        &self,
        _: &StepContext<'_>,
        _: &Value,
        _: Outcome,
    ) -> Result<Undo, StepError> {
        Ok(Undo::Done)
    }
}

struct Harness {
    dir: tempfile::TempDir,
    probe: Arc<Probe>,
}

impl Harness {
    fn new() -> Harness {
        Harness {
            dir: tempfile::tempdir().unwrap(),
            probe: Arc::new(Probe {
                calls: Arc::default(),
                in_flight: Arc::default(),
                max_in_flight: Arc::default(),
            }),
        }
    }

    fn engine(&self) -> Engine {
        let mut registry = Registry::with_engine_kinds();
        registry.register(self.probe.clone());
        Engine {
            registry,
            state: self.dir.path().join("state.db").into(),
            durability: Durability::Normal,
        }
    }

    /// Resumes `run_id` with what it stored.
    fn continuation(&self, run_id: &str) -> launch::Continuation {
        launch::Continuation {
            run_id: run_id.into(),
            params: ParamSources::default(),
            allow_param_change: false,
            changed_runbook: None,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
            from: None,
            operator: "test".into(),
        }
    }

    fn rollback_request(&self, run_id: &str) -> launch::RollbackRequest {
        launch::RollbackRequest {
            run_id: run_id.into(),
            params: ParamSources::default(),
            allow_param_change: false,
            progress: silent(),
            operator: "test".into(),
        }
    }

    fn request(&self, text: &str, concurrency: usize) -> RunRequest {
        let compiled = Arc::new(
            compile(&RunbookSource::new("t.yaml", text), &self.engine().registry).unwrap(),
        );
        let params = bind(&compiled, &ParamSources::default()).unwrap();
        RunRequest {
            runbook: compiled,
            runbook_ref: "t.yaml".into(),
            source: text.into(),
            params,
            options: ExecOptions {
                concurrency,
                ..ExecOptions::default()
            },
            signals: Signals::default(),
            progress: silent(),
        }
    }

    async fn run(&self, text: &str, concurrency: usize) -> RunSummary {
        launch::start(&self.engine(), self.request(text, concurrency))
            .await
            .unwrap()
    }

    fn store(&self) -> Store {
        Store::open_file(&self.dir.path().join("state.db"), Durability::Normal).unwrap()
    }

    fn count(&self, which: &str, key: &str) -> usize {
        let calls = self.probe.calls.lock().unwrap();
        let map = if which == "observe" {
            &calls.observe
        } else {
            &calls.apply
        };
        map.get(key).copied().unwrap_or(0)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_found_running_after_a_crash_is_observed_again_and_keeps_its_outcome() {
    let h = Harness::new();
    let text = "name: t\nsteps:\n  - id: make\n    uses: probe\n    with: { key: vault }\n";
    // The state a crash leaves: the before image is committed, apply went through (the
    // resource exists), the outcome never was.
    let mut store = h.store();
    let now = Utc::now();
    store
        .commit(&[
            Write::CreateRun(NewRun {
                id: "crashed".into(),
                runbook: "t".into(),
                runbook_ref: "t.yaml".into(),
                content_hash: kmsflow_engine::content_hash(text),
                source: text.into(),
                params: json!({}),
                secret_params: vec![],
                started_at: now,
                lock_key: None,
                steps: vec![("make".into(), "probe".into())],
                fragments: json!([]),
            }),
            Write::StepApplying {
                run_id: "crashed".into(),
                step_id: "make".into(),
                attempt: 1,
                before_image: json!({"exists": false}),
                planned_outcome: Outcome::Created,
                at: now,
            },
        ])
        .unwrap();
    drop(store);
    h.probe.calls.lock().unwrap().existing.push("vault".into());

    let summary = launch::resume(&h.engine(), h.continuation("crashed"))
        .await
        .unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(h.count("observe", "vault"), 1, "observed again");
    assert_eq!(h.count("apply", "vault"), 0, "not applied twice");
    let step = &h.store().steps("crashed").unwrap()[0];
    assert_eq!(
        step.outcome,
        Some(Outcome::Created),
        "the run still created it, so rollback deletes it"
    );
    assert_eq!(
        step.before_image,
        Some(json!({"exists": false})),
        "the first before image is kept"
    );
    assert_eq!(step.attempts, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn transient_errors_are_retried_and_permanent_ones_fail_at_once() {
    let h = Harness::new();
    let text = r#"
name: t
steps:
  - id: flaky
    uses: probe
    with: { key: flaky, fail_transiently: 2 }
    retry: { attempts: 3, initial: 10ms, max: 50ms }
  - id: broken
    uses: probe
    needs: [flaky]
    with: { key: broken, fail_permanently: true }
    retry: { attempts: 5, initial: 10ms }
  - id: after
    uses: probe
    needs: [broken]
    with: { key: after }
"#;
    let summary = h.run(text, 8).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = summary.error.unwrap();
    assert!(
        error.contains("step `broken` failed: bad request: the name is taken"),
        "{error}"
    );
    assert_eq!(h.count("apply", "flaky"), 3);
    assert_eq!(
        h.count("apply", "broken"),
        1,
        "a permanent error is not retried"
    );
    assert_eq!(
        h.count("observe", "after"),
        0,
        "nothing starts after a failure"
    );
    let steps = h.store().steps(&summary.run_id).unwrap();
    let status: Vec<_> = steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.status))
        .collect();
    assert_eq!(
        status,
        [
            ("flaky", StepStatus::Succeeded),
            ("broken", StepStatus::Failed),
            ("after", StepStatus::Pending)
        ]
    );
    let attempt_failures = h
        .store()
        .events(&summary.run_id)
        .unwrap()
        .iter()
        .filter(|e| e.kind == "step_attempt_failed")
        .count();
    assert_eq!(attempt_failures, 2);
}

#[tokio::test(start_paused = true)]
async fn a_timeout_bounds_each_attempt() {
    let h = Harness::new();
    let text = r#"
name: t
steps:
  - id: slow
    uses: probe
    with: { key: slow, hold_ms: 2000 }
    timeout: 50ms
    retry: { attempts: 2, initial: 10ms }
"#;
    let (summary, took) = on_paused_clock(&h, text, 8).await;
    assert_eq!(summary.status, RunStatus::Failed);
    assert!(summary.error.unwrap().contains("timed out after 50ms"));
    // Two attempts of 50 ms and a backoff of 5 to 10 ms between them (equal jitter).
    assert!(
        took >= Duration::from_millis(105) && took <= Duration::from_millis(110),
        "{took:?}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn skipped_steps_skip_their_readers_but_not_their_other_dependents() {
    let h = Harness::new();
    let text = r#"
name: t
steps:
  - id: optional
    uses: probe
    if: false
    with: { key: optional }
  - id: reader
    uses: probe
    with: { key: "reads-{{steps.optional.outputs.key}}" }
  - id: follower
    uses: probe
    needs: [optional]
    with: { key: follower }
"#;
    let summary = h.run(text, 8).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    let steps = h.store().steps(&summary.run_id).unwrap();
    let status: HashMap<_, _> = steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.status))
        .collect();
    assert_eq!(status["optional"], StepStatus::Skipped);
    assert_eq!(status["reader"], StepStatus::Skipped);
    assert_eq!(status["follower"], StepStatus::Succeeded);
}

/// A condition that renders anything but `true` or `false` fails its step, naming what it
/// rendered; it never runs the step (`"no"` used to be "truthy").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_condition_that_renders_neither_true_nor_false_fails_its_step() {
    let h = Harness::new();
    let text = r#"
name: t
params:
  production: { type: string, default: "no" }
steps:
  - id: guarded
    uses: probe
    if: "{{params.production}}"
    with: { key: guarded }
"#;
    let summary = h.run(text, 1).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = summary.error.unwrap_or_default();
    assert!(
        error.contains("`if` rendered `no`, not `true` or `false`"),
        "{error}"
    );
    assert_eq!(h.count("apply", "guarded"), 0);
    assert_eq!(h.count("observe", "guarded"), 0);
}

#[tokio::test(start_paused = true)]
async fn concurrency_is_capped_and_independent_steps_overlap() {
    let h = Harness::new();
    let mut text = String::from("name: t\nsteps:\n");
    for i in 0..12 {
        text.push_str(&format!(
            "  - id: s{i}\n    uses: probe\n    with: {{ key: k{i}, hold_ms: 40 }}\n"
        ));
    }
    let (summary, took) = on_paused_clock(&h, &text, 3).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(h.probe.max_in_flight.load(Ordering::SeqCst), 3);
    // 12 steps of 40 ms, 3 at a time: four rounds, exactly, not the 480 ms of one at a time.
    assert_eq!(took, Duration::from_millis(160));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_is_all_unchanged_and_applies_nothing() {
    let h = Harness::new();
    let text = r#"
name: t
steps:
  - id: a
    uses: probe
    with: { key: a }
  - id: b
    uses: probe
    with: { key: "{{steps.a.outputs.key}}-b" }
"#;
    assert_eq!(h.run(text, 8).await.status, RunStatus::Succeeded);
    let second = h.run(text, 8).await;
    assert_eq!(second.status, RunStatus::Succeeded);
    assert_eq!(
        h.count("apply", "a") + h.count("apply", "a-b"),
        2,
        "applied once each, in the first run"
    );
    for step in h.store().steps(&second.run_id).unwrap() {
        assert_eq!(step.outcome, Some(Outcome::Unchanged), "{}", step.step_id);
    }
}

/// A change that cannot be undone, like enabling AKS infrastructure encryption.
struct OneWay;

static ONE_WAY: KindSpec = KindSpec {
    name: "oneway",
    summary: "test kind",
    params: &[],
    outputs: OutputsSpec::Fixed(&[]),
    may_be_irreversible: true,
};

#[async_trait]
impl StepKind for OneWay {
    fn spec(&self) -> &'static KindSpec {
        &ONE_WAY
    }
    async fn observe(&self, _: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }
    fn plan(&self, _: &StepContext<'_>, _: &Value) -> Result<StepPlan, StepError> {
        let mut plan = StepPlan::change(Change::Action {
            summary: "enable infrastructure encryption".into(),
        });
        plan.irreversible = Some("infrastructure encryption cannot be turned off".into());
        Ok(plan)
    }
    async fn apply(
        &self,
        _: &StepContext<'_>,
        _: &Value,
        _: &StepPlan,
    ) -> Result<Applied, StepError> {
        Ok(Map::new().into())
    }
    async fn rollback(
        &self,
        _: &StepContext<'_>,
        _: &Value,
        _: Outcome,
    ) -> Result<Undo, StepError> {
        Ok(Undo::Irreversible(
            "infrastructure encryption cannot be turned off".into(),
        ))
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_undoes_what_it_can_and_names_the_irreversible_step() {
    let h = Harness::new();
    let mut engine = h.engine();
    engine.registry.register(Arc::new(OneWay));
    let text = r#"
name: t
steps:
  - id: before
    uses: probe
    with: { key: before }
  - id: encrypt
    uses: oneway
    needs: [before]
  - id: after
    uses: probe
    needs: [encrypt]
    with: { key: after }
  - id: verify
    uses: assert
    needs: [after]
    with: { condition: false, message: verification failed }
"#;
    let compiled =
        Arc::new(compile(&RunbookSource::new("t.yaml", text), &engine.registry).unwrap());
    assert!(compiled.step("encrypt").unwrap().may_be_irreversible);
    let params = bind(&compiled, &ParamSources::default()).unwrap();
    let seen = Arc::new(Mutex::new(Vec::new()));
    let sink = {
        let seen = seen.clone();
        Arc::new(move |p: &kmsflow_engine::progress::Progress| seen.lock().unwrap().push(p.clone()))
    };
    let request = RunRequest {
        runbook: compiled.clone(),
        runbook_ref: "t.yaml".into(),
        source: text.into(),
        params: params.clone(),
        options: ExecOptions::default(),
        signals: Signals::default(),
        progress: sink,
    };
    let summary = launch::start(&engine, request).await.unwrap();
    assert_eq!(summary.status, RunStatus::Failed);
    assert!(seen.lock().unwrap().iter().any(|p| matches!(
        p,
        kmsflow_engine::progress::Progress::PointOfNoReturn { step_id, .. } if step_id == "encrypt"
    )));

    let rolled = launch::rollback(&engine, h.rollback_request(&summary.run_id))
        .await
        .unwrap();
    assert_eq!(rolled.status, RunStatus::RollbackFailed);
    let error = rolled.error.unwrap();
    assert!(
        error.contains("`encrypt` (infrastructure encryption cannot be turned off)"),
        "{error}"
    );
    let steps = h.store().steps(&summary.run_id).unwrap();
    let status: HashMap<_, _> = steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.status))
        .collect();
    assert_eq!(
        status["before"],
        StepStatus::RolledBack,
        "undid what it could past the irreversible step"
    );
    assert_eq!(status["after"], StepStatus::RolledBack);
    assert_eq!(status["encrypt"], StepStatus::Succeeded);
}

/// Runs `text` with checkpoints kept in memory, on tokio's paused clock (the test's runtime
/// must start paused); returns how it ended and how much virtual time it took. Exact, and
/// deaf to a loaded machine.
async fn on_paused_clock(h: &Harness, text: &str, concurrency: usize) -> (RunSummary, Duration) {
    let started = tokio::time::Instant::now();
    let execution = in_memory(
        h,
        h.request(text, concurrency),
        Arc::new(CommitLog::default()),
        Checkpointing::EveryTransition,
        Vec::new(),
    );
    let summary = execute(execution).await.unwrap();
    (summary, started.elapsed())
}

/// An execution of `request` as run `r` whose checkpoints go to `checkpoints`.
fn in_memory(
    h: &Harness,
    request: RunRequest,
    checkpoints: Arc<dyn kmsflow_engine::checkpoint::Checkpoints>,
    checkpointing: Checkpointing,
    pending: Vec<Write>,
) -> Execution {
    Execution {
        run_id: "r".into(),
        started_at: Utc::now(),
        runbook: request.runbook,
        params: request.params,
        registry: h.engine().registry,
        checkpoints,
        progress: silent(),
        options: ExecOptions {
            concurrency: request.options.concurrency,
            checkpointing,
            ..ExecOptions::default()
        },
        signals: Signals::default(),
        previous: Vec::new(),
        approvals: Vec::new(),
        lock: kmsflow_engine::lease::HeldLock::granted("run/r", 1),
        resumed: false,
        pending,
    }
}

/// Records what each commit carried, by the kind of write, instead of storing it.
#[derive(Default)]
struct CommitLog(Mutex<Vec<Vec<String>>>);

#[async_trait]
impl kmsflow_engine::checkpoint::Checkpoints for CommitLog {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), kmsflow_state::StoreError> {
        let kinds = writes
            .iter()
            .map(|w| {
                let debug = format!("{w:?}");
                debug[..debug.find([' ', '(', '{']).unwrap_or(debug.len())].to_owned()
            })
            .collect();
        self.0.lock().unwrap().push(kinds);
        Ok(())
    }
}

async fn commits_of(h: &Harness, checkpointing: Checkpointing) -> Vec<Vec<String>> {
    // `seen` exists already: reading it changes nothing. `skipped` is skipped. `made` creates.
    let text = "name: t\nsteps:\n  - id: seen\n    uses: probe\n    with: { key: seen }\n  - id: skipped\n    uses: noop\n    needs: [seen]\n    if: \"{{eq 1 2}}\"\n  - id: made\n    uses: probe\n    needs: [skipped]\n    with: { key: made }\n";
    h.probe.calls.lock().unwrap().existing.push("seen".into());
    let request = h.request(text, 1);
    let log = Arc::new(CommitLog::default());
    let pending = match checkpointing {
        Checkpointing::BeforeChanges => vec![Write::Event {
            run_id: "r".into(),
            step_id: None,
            kind: "created".into(),
            detail: json!({}),
            at: Utc::now(),
        }],
        Checkpointing::EveryTransition => Vec::new(),
    };
    let summary = execute(in_memory(h, request, log.clone(), checkpointing, pending))
        .await
        .unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded);
    log.0.lock().unwrap().clone()
}

#[tokio::test]
async fn every_transition_is_committed_on_its_own_by_default() {
    let commits = commits_of(&Harness::new(), Checkpointing::EveryTransition).await;
    assert_eq!(
        commits,
        // Every checkpoint carries the fencing check in its own transaction: a runner that
        // lost its lock records nothing more, and no check costs a commit of its own.
        [
            vec!["CheckHolder", "StepSucceeded"],
            vec!["CheckHolder", "StepSkipped"],
            vec!["CheckHolder", "StepApplying"],
            vec!["CheckHolder", "StepSucceeded"],
            vec!["CheckHolder", "RunFinished", "ReleaseLock"],
        ]
    );
}

#[tokio::test]
async fn before_changes_holds_what_changed_nothing_until_the_next_change_is_committed() {
    let commits = commits_of(&Harness::new(), Checkpointing::BeforeChanges).await;
    assert_eq!(
        commits,
        [
            // The run's record, the read and the skip go with the before image of the change,
            // so they are durable before anything is changed.
            vec![
                "Event",
                "StepSucceeded",
                "StepSkipped",
                "CheckHolder",
                "StepApplying"
            ],
            vec!["CheckHolder", "StepSucceeded"],
            vec!["CheckHolder", "RunFinished", "ReleaseLock"],
        ]
    );
}

/// A run's first step holds its apply open; the second would create `second`.
const LOCKED: &str = "name: t\nparams:\n  cluster: { type: string }\nlock: \"cluster/{{params.cluster}}\"\nsteps:\n  - id: first\n    uses: probe\n    with: { key: first, hold_ms: 400 }\n  - id: second\n    uses: probe\n    needs: [first]\n    with: { key: second }\n";

impl Harness {
    fn locked_request(&self, cluster: &str) -> RunRequest {
        let runbook = Arc::new(
            compile(
                &RunbookSource::new("t.yaml", LOCKED),
                &self.engine().registry,
            )
            .unwrap(),
        );
        let sources = ParamSources {
            cli: vec![("cluster".into(), cluster.into())],
            ..Default::default()
        };
        RunRequest {
            params: bind(&runbook, &sources).unwrap(),
            runbook,
            runbook_ref: "t.yaml".into(),
            source: LOCKED.into(),
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
        }
    }

    /// Waits (polling the probe, bounded) until some apply is in flight.
    /// The store's clock passes every lease, as a wall clock stepped forward (or a laptop lid
    /// closed past the lease) looks to the store.
    fn lease_runs_out_by_the_stores_clock(&self) {
        rusqlite::Connection::open(self.dir.path().join("state.db"))
            .unwrap()
            .execute(
                "UPDATE locks SET lease_expires_at = '2000-01-01T00:00:00.000000Z'",
                [],
            )
            .unwrap();
    }

    async fn until_applying(&self) {
        for _ in 0..500 {
            if self.probe.in_flight.load(Ordering::SeqCst) > 0 {
                return;
            }
            tokio::time::sleep(Duration::from_millis(2)).await;
        }
        panic!("no apply started");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_second_run_in_the_same_process_is_refused_the_lock_whatever_the_case_of_its_key() {
    let h = Harness::new();
    let launcher = launch::Launcher::open(&h.engine()).await.unwrap();
    let first = launcher.start(h.locked_request("RG-X/AKS-1"));
    let second = async {
        h.until_applying().await;
        launcher.start(h.locked_request("rg-x/aks-1")).await
    };
    let (first, second) = tokio::join!(first, second);
    assert_eq!(first.unwrap().status, RunStatus::Succeeded);
    match second {
        Err(launch::LaunchError::LockHeld(held)) => {
            assert_eq!(held.key, "cluster/rg-x/aks-1");
            assert_eq!(held.pid, std::process::id(), "held by this very process");
        }
        other => panic!("the second run must be refused, got {other:?}"),
    }
    assert_eq!(h.count("apply", "first"), 1);
    launcher.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_whose_lock_was_taken_over_stops_before_its_next_write() {
    let h = Harness::new();
    let engine = h.engine();
    let run = launch::start(&engine, h.locked_request("aks-1"));
    let takeover = async {
        h.until_applying().await;
        // The store's clock passes the lease (a laptop lid closed past it looks like this to
        // the sleeper), and another runner, elsewhere, takes the lock over.
        h.lease_runs_out_by_the_stores_clock();
        let elsewhere = kmsflow_state::LockOwner {
            pid: 4242,
            host: "elsewhere".into(),
        };
        h.store()
            .acquire_lock(
                "cluster/aks-1",
                "intruder",
                &elsewhere,
                chrono::Duration::seconds(60),
            )
            .unwrap()
            .unwrap();
    };
    let (run, ()) = tokio::join!(run, takeover);
    let error = run.unwrap_err();
    let text = format!("{error}: {}", std::error::Error::source(&error).unwrap());
    assert!(
        text.contains("no longer holds lock `cluster/aks-1` (run `intruder` holds it now"),
        "{text}"
    );
    assert_eq!(h.count("apply", "first"), 1, "the write in flight finished");
    assert_eq!(
        h.count("apply", "second"),
        0,
        "nothing is written once the lock is lost"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_step_of_the_wall_clock_past_the_lease_never_stops_a_live_run_nobody_took_over() {
    let h = Harness::new();
    let engine = h.engine();
    let run = launch::start(&engine, h.locked_request("aks-1"));
    let clock_step = async {
        h.until_applying().await;
        // The wall clock jumps ten minutes ahead (NTP, a VM restored): to the store, the
        // lease ran out. Nobody takes the lock over.
        h.lease_runs_out_by_the_stores_clock();
    };
    let (run, ()) = tokio::join!(run, clock_step);
    let summary = run.unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(h.count("apply", "second"), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_resumes_of_a_run_without_a_lock_never_both_proceed() {
    let h = Harness::new();
    let text =
        "name: t\nsteps:\n  - id: make\n    uses: probe\n    with: { key: vault, hold_ms: 300 }\n";
    let mut store = h.store();
    // A run a dead process left `running`, as an older kmsflow recorded it (no lock key).
    store
        .commit(&[Write::CreateRun(NewRun {
            id: "orphan".into(),
            runbook: "t".into(),
            runbook_ref: "t.yaml".into(),
            content_hash: kmsflow_engine::content_hash(text),
            source: text.into(),
            params: json!({}),
            secret_params: vec![],
            started_at: Utc::now(),
            lock_key: None,
            steps: vec![("make".into(), "probe".into())],
            fragments: json!([]),
        })])
        .unwrap();
    drop(store);
    // Two processes' worth of state connections, resuming at once.
    let (one, two) = (
        launch::Launcher::open(&h.engine()).await.unwrap(),
        launch::Launcher::open(&h.engine()).await.unwrap(),
    );
    let (a, b) = tokio::join!(
        one.resume(h.continuation("orphan")),
        two.resume(h.continuation("orphan"))
    );
    let proceeded = [&a, &b].iter().filter(|r| r.is_ok()).count();
    assert_eq!(proceeded, 1, "{a:?} / {b:?}");
    let refused = if a.is_err() { a } else { b };
    match refused {
        Err(launch::LaunchError::LockHeld(held)) => assert_eq!(held.run_id, "orphan"),
        // The other finished first: this one then found nothing left to resume.
        Err(launch::LaunchError::NotResumable { .. }) => {}
        other => panic!("{other:?}"),
    }
    assert_eq!(h.count("apply", "vault"), 1, "created once");
    one.close().await;
    two.close().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outputs_a_runbook_marks_sensitive_are_stored_masked_and_read_for_real() {
    let h = Harness::new();
    let text = r#"
name: t
steps:
  - id: issue
    uses: noop
    with: { outputs: { token: kubeconfig-7c1e, name: admin } }
    sensitive_outputs: [token]
  - id: use
    uses: noop
    with: { outputs: { length: "{{steps.issue.outputs.token}}" } }
outputs:
  token: "{{steps.issue.outputs.token}}"
"#;
    let summary = h.run(text, 8).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    let steps = h.store().steps(&summary.run_id).unwrap();
    let issue = steps.iter().find(|s| s.step_id == "issue").unwrap();
    assert_eq!(
        issue.outputs,
        Some(json!({"token": "***", "name": "admin"}))
    );
    let used = steps.iter().find(|s| s.step_id == "use").unwrap();
    assert_eq!(
        used.outputs,
        Some(json!({"length": "kubeconfig-7c1e"})),
        "a later step read the real value"
    );
    assert_eq!(
        summary.outputs,
        Some(json!({"token": "***"})),
        "run outputs see it masked"
    );
    let unknown = text.replace("sensitive_outputs: [token]", "sensitive_outputs: [tokn]");
    let diagnostics = compile(
        &RunbookSource::new("t.yaml", unknown.as_str()),
        &h.engine().registry,
    )
    .unwrap_err();
    assert!(
        diagnostics.problems.iter().any(|p| matches!(
            &p.kind,
            kmsflow_engine::ProblemKind::UnknownOutput { output, .. } if output == "tokn"
        )),
        "{diagnostics:?}"
    );
}

/// A kind with a bug: it panics where `panic_in` says.
struct Panicking;

static PANICKING: KindSpec = KindSpec {
    name: "panicking",
    summary: "test kind",
    params: &[ParamSpec::required(
        "panic_in",
        ValueType::String,
        "observe or rollback",
    )],
    outputs: OutputsSpec::Fixed(&[]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Panicking {
    fn spec(&self) -> &'static KindSpec {
        &PANICKING
    }
    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        if cx.input["panic_in"] == "observe" {
            panic!("index out of bounds: the len is 0 but the index is 0");
        }
        Ok(Value::Null)
    }
    fn plan(&self, _: &StepContext<'_>, _: &Value) -> Result<StepPlan, StepError> {
        Ok(StepPlan::change(Change::Create {
            summary: "create".into(),
        }))
    }
    async fn apply(
        &self,
        _: &StepContext<'_>,
        _: &Value,
        _: &StepPlan,
    ) -> Result<Applied, StepError> {
        Ok(Map::new().into())
    }
    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        _: &Value,
        _: Outcome,
    ) -> Result<Undo, StepError> {
        if cx.input["panic_in"] == "rollback" {
            // What `azure.resource` did with a before image that was a JSON string.
            let mut body = json!("<html>");
            body["properties"]["provisioningState"] = Value::Null;
        }
        Ok(Undo::Done)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_kind_that_panics_fails_its_step_or_its_undo_never_the_process() {
    let h = Harness::new();
    let mut engine = h.engine();
    engine.registry.register(Arc::new(Panicking));
    let run = |text: &'static str| {
        let engine = engine.clone();
        let compiled =
            Arc::new(compile(&RunbookSource::new("t.yaml", text), &engine.registry).unwrap());
        let params = bind(&compiled, &ParamSources::default()).unwrap();
        async move {
            launch::start(
                &engine,
                RunRequest {
                    runbook: compiled,
                    runbook_ref: "t.yaml".into(),
                    source: text.into(),
                    params,
                    options: ExecOptions::default(),
                    signals: Signals::default(),
                    progress: silent(),
                },
            )
            .await
            .unwrap()
        }
    };
    let observed = run(
        "name: t\nsteps:\n  - id: buggy\n    uses: panicking\n    with: { panic_in: observe }\n",
    )
    .await;
    assert_eq!(observed.status, RunStatus::Failed);
    let error = observed.error.unwrap();
    assert!(
        error.contains("the `panicking` kind failed unexpectedly (index out of bounds"),
        "{error}"
    );

    // A before image rollback cannot handle: the undo fails, reported, and the run does not
    // stay `rolling_back`.
    let text = "name: u\nsteps:\n  - id: made\n    uses: panicking\n    with: { panic_in: rollback }\n  - id: fails\n    uses: assert\n    needs: [made]\n    with: { condition: false, message: no }\n";
    let failed = run(text).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let rolled = launch::rollback(&engine, h.rollback_request(&failed.run_id))
        .await
        .unwrap();
    assert_eq!(rolled.status, RunStatus::RollbackFailed);
    assert!(
        rolled
            .error
            .as_deref()
            .unwrap_or_default()
            .contains("failed while undoing this step"),
        "{:?}",
        rolled.error
    );
}
