//! The durable executor.
//!
//! A loop owns the run's state and the template context. It starts every step whose
//! dependencies are done, up to the concurrency limit, each as a tokio task, then waits for a
//! task to finish or for Ctrl-C. Tasks checkpoint their own transitions through
//! [`Checkpoints`]; a task never proceeds past a transition until it is committed, and the
//! writer batches the checkpoints of tasks that finish together into one transaction.
//!
//! Checkpoint economy: a step that changes nothing commits once (its outcome). A step that
//! changes something commits its before image first (rollback needs it, and a crash between
//! the two leaves it `running`, so resume observes it again), then its outcome.
//!
//! [`Checkpointing::BeforeChanges`] (fleet checks) goes further: transitions that change
//! nothing in Azure (the run created, a step that found nothing to do, a step skipped) are
//! held and committed with the run's next checkpoint, which is always taken before any change
//! is applied and when the run ends. A crash then loses only the record of reads, which a new
//! run makes again; a read-only run costs one commit instead of one per step.

use futures::FutureExt as _;
use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::Arc;
use std::time::Instant;

use chrono::{DateTime, Utc};
use futures::future::BoxFuture;
use futures::stream::{FuturesUnordered, StreamExt};
use kmsflow_state::{Approval, Outcome, RunStatus, StepRecord, StepStatus, StoreError, Write};
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::checkpoint::Checkpoints;
use crate::input::prepare_input;
use crate::kind::{Change, ErrorClass, Registry, StepContext, StepError};
use crate::lease::HeldLock;
use crate::params::BoundParams;
use crate::progress::{Progress, ProgressSink};
use crate::redact::Redactor;
use crate::runbook::CompiledRunbook;
use crate::template::Renderer;

/// How a run is driven.
#[derive(Debug, Clone, Copy)]
pub struct ExecOptions {
    /// Steps running at once, at most.
    pub concurrency: usize,
    pub checkpointing: Checkpointing,
    pub no_return: NoReturn,
}

impl Default for ExecOptions {
    fn default() -> Self {
        ExecOptions {
            concurrency: 8,
            checkpointing: Checkpointing::default(),
            no_return: NoReturn::default(),
        }
    }
}

/// What a step does when its plan, made just before it applies, passes a point of no return
/// that nobody accepted: no `approve` step stands before it, and the run was started without
/// `--yes` and without a terminal to ask, when the plan up front could only say "may be"
/// (its inputs were known only after apply).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum NoReturn {
    /// Accepted: `--yes`, a terminal's `yes`, a schedule, a resume.
    #[default]
    Proceed,
    /// The step fails before it changes anything, refused, and the run stops resumable.
    Refuse,
}

/// When a run's transitions reach the store.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Checkpointing {
    /// Every transition is committed before the run goes on.
    #[default]
    EveryTransition,
    /// Transitions that change nothing in Azure are committed with the run's next checkpoint,
    /// which is always taken before a change is applied and when the run ends. For many short
    /// read-only runs (a fleet check), where a crash costs only reads made again.
    BeforeChanges,
}

/// Ctrl-C as the executor sees it: `drain` stops scheduling (running steps finish and
/// checkpoint); `abort` also cancels running steps.
#[derive(Debug, Clone, Default)]
pub struct Signals {
    pub drain: CancellationToken,
    pub abort: CancellationToken,
}

/// Everything one execution needs.
pub struct Execution {
    pub run_id: String,
    pub started_at: DateTime<Utc>,
    pub runbook: Arc<CompiledRunbook>,
    pub params: BoundParams,
    pub registry: Registry,
    pub checkpoints: Arc<dyn Checkpoints>,
    pub progress: ProgressSink,
    pub options: ExecOptions,
    pub signals: Signals,
    /// Step records from the store when resuming; empty for a new run.
    pub previous: Vec<StepRecord>,
    pub approvals: Vec<Approval>,
    /// The lock this run holds: checked before every write to Azure, renewed while the run
    /// goes on, released with the final checkpoint.
    pub lock: HeldLock,
    pub resumed: bool,
    /// Transitions made before the execution that are not committed yet (a new run's record,
    /// under [`Checkpointing::BeforeChanges`]); they go with the run's first checkpoint.
    pub pending: Vec<Write>,
}

/// How a run ended.
#[derive(Debug, Clone, PartialEq)]
pub struct RunSummary {
    pub run_id: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub outputs: Option<Value>,
}

/// The store failed: the run's state on disk is what was last committed.
#[derive(Debug, thiserror::Error)]
#[error("run `{run_id}` stopped because its state could not be saved")]
pub struct CheckpointFailed {
    pub run_id: String,
    #[source]
    pub source: StoreError,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Slot {
    Pending,
    Running,
    Succeeded,
    Failed,
    Skipped,
    Waiting,
}

enum TaskEnd {
    Succeeded(Map<String, Value>),
    /// The step's error, already redacted.
    Failed(String),
    Waiting,
    Cancelled,
}

/// State shared by the step tasks.
struct Shared {
    run_id: String,
    runbook: Arc<CompiledRunbook>,
    registry: Registry,
    checkpoints: Arc<dyn Checkpoints>,
    progress: ProgressSink,
    redactor: Redactor,
    /// The runbook's secret parameters: what a template reading one renders is masked too.
    secret_params: Vec<String>,
    abort: CancellationToken,
    /// Fences every checkpoint that precedes a write to Azure.
    lock: HeldLock,
    /// Transitions held for the next commit; `None` when every transition is committed at once.
    held: Option<std::sync::Mutex<Vec<Write>>>,
    /// Whether a point of no return found at apply time may be passed.
    no_return: NoReturn,
}

impl Shared {
    /// Commits `writes` (a transition before a change, a failure, the run's end), together
    /// with any transitions held for it, held ones first.
    ///
    /// Every checkpoint carries the fencing check, after the held transitions (a new run's
    /// claim on its lock may be among them) and before the new ones: a run that lost its lock
    /// (paused past its lease while another runner took over) records nothing more, not only
    /// no further write to Azure, so it cannot overwrite what the new holder recorded.
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let mut all = match &self.held {
            Some(held) => std::mem::take(&mut *held.lock().expect("never poisoned")),
            None => Vec::with_capacity(writes.len() + 1),
        };
        all.push(self.lock.fence(&self.run_id));
        all.extend(writes);
        self.checkpoints.commit(all).await
    }

    /// Records a transition that changes nothing in Azure: committed now, or held for the
    /// next commit under [`Checkpointing::BeforeChanges`].
    async fn record(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        match &self.held {
            Some(held) => {
                held.lock().expect("never poisoned").extend(writes);
                Ok(())
            }
            None => self.commit(writes).await,
        }
    }
}

/// The longest a server-requested `Retry-After` is honoured at once, by the executor and the
/// Azure client alike; longer ones are clamped, and the clamp is logged.
pub const MAX_RETRY_AFTER: std::time::Duration = std::time::Duration::from_secs(300);

/// How many attempts beyond its retry policy a step gets to find out whether a write whose
/// answer was lost took effect.
const MAX_UNKNOWN_OUTCOMES: u32 = 3;

/// Runs (or resumes) a run to its end: succeeded, failed, waiting or interrupted.
pub async fn execute(execution: Execution) -> Result<RunSummary, CheckpointFailed> {
    let span =
        tracing::info_span!("run", run_id = %execution.run_id, runbook = %execution.runbook.name);
    execute_in_span(execution).instrument(span).await
}

async fn execute_in_span(execution: Execution) -> Result<RunSummary, CheckpointFailed> {
    let run_id = execution.run_id.clone();
    let fail_store = |source| CheckpointFailed {
        run_id: run_id.clone(),
        source,
    };
    let (concurrency, signals) = (execution.options.concurrency, execution.signals.clone());
    let lock = execution.lock.clone();
    let checkpoints = execution.checkpoints.clone();
    let mut run = Run::setup(execution).await.map_err(fail_store)?;
    let lease = lock.keep(checkpoints, &run_id);
    let driven = run.drive(concurrency, &signals).await;
    drop(lease);
    driven.map_err(fail_store)?;
    run.finish().await.map_err(fail_store)
}

/// A future running one step's attempts, polled by the executor loop.
type StepFuture = BoxFuture<'static, (usize, Result<TaskEnd, StoreError>)>;

/// The steps' dependencies as indices, and how many of each step's are not done yet: a step
/// becomes ready when its count reaches zero, so scheduling never rescans the whole runbook.
struct ReadyQueue {
    /// For each step, the steps whose outputs it reads.
    reads: Vec<Vec<usize>>,
    dependents: Vec<Vec<usize>>,
    waiting_on: Vec<usize>,
    /// Ready steps, earliest in execution order first, so runs are deterministic.
    ready: BinaryHeap<Reverse<usize>>,
}

impl ReadyQueue {
    fn new(runbook: &CompiledRunbook, slots: &[Slot]) -> ReadyQueue {
        let position = runbook.step_positions();
        let indices =
            |ids: &[String]| -> Vec<usize> { ids.iter().map(|d| position[d.as_str()]).collect() };
        let needs: Vec<Vec<usize>> = runbook.steps.iter().map(|s| indices(&s.needs)).collect();
        let reads = runbook
            .steps
            .iter()
            .map(|s| indices(&s.reads_outputs_of))
            .collect();
        let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); runbook.steps.len()];
        for (index, deps) in needs.iter().enumerate() {
            for &dep in deps {
                dependents[dep].push(index);
            }
        }
        let is_done = |slot: Slot| matches!(slot, Slot::Succeeded | Slot::Skipped);
        let waiting_on: Vec<usize> = needs
            .iter()
            .map(|deps| deps.iter().filter(|&&d| !is_done(slots[d])).count())
            .collect();
        let ready = (0..slots.len())
            .filter(|&i| slots[i] == Slot::Pending && waiting_on[i] == 0)
            .map(Reverse)
            .collect();
        ReadyQueue {
            reads,
            dependents,
            waiting_on,
            ready,
        }
    }

    fn pop(&mut self) -> Option<usize> {
        self.ready.pop().map(|Reverse(index)| index)
    }

    /// `index` succeeded or was skipped: its dependents are one dependency closer to ready.
    fn done(&mut self, index: usize) {
        for &dependent in &self.dependents[index] {
            self.waiting_on[dependent] -= 1;
            if self.waiting_on[dependent] == 0 {
                self.ready.push(Reverse(dependent));
            }
        }
    }
}

/// The executor loop's state: where each step stands, the template context the steps render
/// against, what the store says about earlier attempts, and the ready queue.
struct Run {
    shared: Arc<Shared>,
    renderer: Renderer,
    context: Value,
    slots: Vec<Slot>,
    prior: Vec<Option<StepRecord>>,
    approvals: HashMap<String, Approval>,
    queue: ReadyQueue,
    /// The first step failure; no new step starts once it is set.
    failure: Option<String>,
}

impl Run {
    /// Commits what was pending, announces the run, and takes in what a resumed run already
    /// did: succeeded steps' outputs join the context and are never run again.
    async fn setup(execution: Execution) -> Result<Run, StoreError> {
        let Execution {
            run_id,
            started_at,
            runbook,
            params,
            registry,
            checkpoints,
            progress,
            options,
            signals,
            previous,
            approvals,
            lock,
            resumed,
            pending,
        } = execution;
        let shared = Arc::new(Shared {
            run_id: run_id.clone(),
            runbook: runbook.clone(),
            registry,
            checkpoints,
            progress: progress.clone(),
            redactor: Redactor::new(params.secret_values()),
            secret_params: runbook.secret_params(),
            abort: signals.abort.clone(),
            lock,
            no_return: options.no_return,
            held: (options.checkpointing == Checkpointing::BeforeChanges)
                .then(|| std::sync::Mutex::new(Vec::new())),
        });
        if !pending.is_empty() {
            shared.record(pending).await?;
        }
        progress(&Progress::RunStarted {
            run_id: run_id.clone(),
            runbook: runbook.name.clone(),
            resumed,
            n_steps: runbook.steps.len(),
        });
        let mut context = json!({
            "params": params.values(),
            "steps": {},
            "run": {"id": run_id, "started_at": started_at.to_rfc3339()},
        });
        let n_steps = runbook.steps.len();
        let mut slots = vec![Slot::Pending; n_steps];
        let mut prior: Vec<Option<StepRecord>> = vec![None; n_steps];
        let position = runbook.step_positions();
        for record in previous {
            let Some(&index) = position.get(record.step_id.as_str()) else {
                continue;
            };
            match record.status {
                StepStatus::Succeeded => {
                    slots[index] = Slot::Succeeded;
                    context["steps"][&record.step_id] =
                        json!({"outputs": record.outputs.clone().unwrap_or(json!({}))});
                    progress(&Progress::StepReused {
                        step_id: record.step_id.clone(),
                    });
                }
                StepStatus::Skipped => slots[index] = Slot::Skipped,
                // Failed steps are retried; running ones (the process died) are observed again.
                _ => {}
            }
            prior[index] = Some(record);
        }
        let queue = ReadyQueue::new(&runbook, &slots);
        Ok(Run {
            shared,
            renderer: Renderer::new(),
            context,
            slots,
            prior,
            approvals: approvals
                .into_iter()
                .map(|a| (a.step_id.clone(), a))
                .collect(),
            queue,
            failure: None,
        })
    }

    /// Starts ready steps up to `concurrency` and takes in each one's end, until nothing is
    /// running and nothing more may start (all done, a failure, Ctrl-C, a store error).
    ///
    /// Steps run as futures polled by this loop's own task rather than as spawned tasks: they
    /// wait on the network and the store, not the CPU, and a spawn plus a join costs two
    /// cross-thread wake-ups per step, which is most of a chain's overhead.
    async fn drive(&mut self, concurrency: usize, signals: &Signals) -> Result<(), StoreError> {
        let mut tasks: FuturesUnordered<StepFuture> = FuturesUnordered::new();
        let mut draining = false;
        let mut store_error: Option<StoreError> = None;
        loop {
            while !draining
                && self.failure.is_none()
                && store_error.is_none()
                && tasks.len() < concurrency.max(1)
            {
                let Some(index) = self.queue.pop() else {
                    break;
                };
                if self.slots[index] != Slot::Pending {
                    continue;
                }
                if let Some(task) = self.dispatch(index).await? {
                    tasks.push(task);
                }
            }
            if tasks.is_empty() {
                break;
            }
            tokio::select! {
                finished = tasks.next() => {
                    let (index, end) = finished.expect("tasks is not empty");
                    if let Err(error) = self.take_in(index, end) {
                        store_error.get_or_insert(error);
                    }
                }
                _ = signals.drain.cancelled(), if !draining => {
                    draining = true;
                    (self.shared.progress)(&Progress::Draining { running: tasks.len() });
                }
            }
        }
        match store_error {
            Some(error) => Err(error),
            None => Ok(()),
        }
    }

    /// A ready step: skipped (its `if` is false, or it reads a skipped step's outputs),
    /// failed (its `if` or input does not render), or started (the future that runs it).
    async fn dispatch(&mut self, index: usize) -> Result<Option<StepFuture>, StoreError> {
        let shared = self.shared.clone();
        let step = &shared.runbook.steps[index];
        let now = Utc::now();
        // A step that reads outputs of a skipped step has nothing to read: skip it too.
        let skipped_source = self.queue.reads[index]
            .iter()
            .find(|&&d| self.slots[d] == Slot::Skipped);
        let skip_reason = match (skipped_source, &step.condition) {
            (Some(&dep), _) => Some(format!(
                "reads outputs of skipped step `{}`",
                shared.runbook.steps[dep].id
            )),
            (None, Some(condition)) => {
                match self.renderer.render_condition(condition, &self.context) {
                    Ok(true) => None,
                    Ok(false) => Some(format!("`if` is false: {condition}")),
                    Err(error) => {
                        let error = shared.redactor.text(&error.to_string());
                        return self.fail(index, error, now).await.map(|()| None);
                    }
                }
            }
            (None, None) => None,
        };
        if let Some(reason) = skip_reason {
            shared
                .record(vec![Write::StepSkipped {
                    run_id: shared.run_id.clone(),
                    step_id: step.id.clone(),
                    reason: reason.clone(),
                    at: now,
                }])
                .await?;
            (shared.progress)(&Progress::StepSkipped {
                step_id: step.id.clone(),
                reason,
            });
            self.slots[index] = Slot::Skipped;
            self.queue.done(index);
            return Ok(None);
        }
        let spec = shared
            .registry
            .get(&step.uses)
            .expect("compile checked the step kind")
            .spec();
        let input = self
            .renderer
            .render_value(&step.with, &self.context)
            .inspect(|rendered| {
                let mut derived = Vec::new();
                crate::template::renderings_of_secrets(
                    &step.with,
                    rendered,
                    &|name| shared.secret_params.iter().any(|s| s == name),
                    &mut derived,
                );
                shared.redactor.also_mask(derived);
            })
            .map_err(|e| e.to_string())
            .and_then(|rendered| prepare_input(spec, rendered));
        let input = match input {
            Ok(input) => input,
            Err(error) => {
                let error = shared.redactor.text(&format!("invalid input: {error}"));
                return self.fail(index, error, now).await.map(|()| None);
            }
        };
        self.slots[index] = Slot::Running;
        let prior = self.prior[index].as_ref();
        let task = StepTask {
            shared: shared.clone(),
            index,
            input_has_secrets: shared.redactor.value(&input) != input,
            input,
            prior_attempts: prior.map_or(0, |r| r.attempts),
            prior_planned: prior.and_then(|r| r.planned_outcome),
            prior_before: prior.and_then(|r| r.before_image.clone()),
            approval: self.approvals.get(&step.id).cloned(),
        };
        let span = tracing::info_span!(
            "step",
            step_id = %step.id,
            kind = %step.uses,
            attempt = tracing::field::Empty
        );
        Ok(Some(Box::pin(
            async move { (index, task.run().await) }.instrument(span),
        )))
    }

    /// Fails a step before it ran (its `if` or input), and so the run.
    async fn fail(
        &mut self,
        index: usize,
        error: String,
        at: DateTime<Utc>,
    ) -> Result<(), StoreError> {
        fail_step(&self.shared, index, &error, at).await?;
        self.slots[index] = Slot::Failed;
        let step_id = &self.shared.runbook.steps[index].id;
        self.failure = Some(format!("step `{step_id}` failed: {error}"));
        Ok(())
    }

    /// Takes in how a step's task ended.
    fn take_in(
        &mut self,
        index: usize,
        end: Result<TaskEnd, StoreError>,
    ) -> Result<(), StoreError> {
        let step_id = self.shared.runbook.steps[index].id.clone();
        match end {
            Ok(TaskEnd::Succeeded(outputs)) => {
                self.slots[index] = Slot::Succeeded;
                self.context["steps"][&step_id] = json!({"outputs": outputs});
                self.queue.done(index);
            }
            Ok(TaskEnd::Failed(error)) => {
                self.slots[index] = Slot::Failed;
                self.failure
                    .get_or_insert_with(|| format!("step `{step_id}` failed: {error}"));
            }
            Ok(TaskEnd::Waiting) => self.slots[index] = Slot::Waiting,
            Ok(TaskEnd::Cancelled) => self.slots[index] = Slot::Pending,
            Err(error) => {
                self.slots[index] = Slot::Pending;
                return Err(error);
            }
        }
        Ok(())
    }

    /// The run's status from its steps', its outputs, and the final checkpoint (which releases
    /// the lock).
    async fn finish(mut self) -> Result<RunSummary, StoreError> {
        let shared = self.shared.clone();
        let runbook = &shared.runbook;
        let any = |slot: Slot| self.slots.contains(&slot);
        let (status, error) = if let Some(failure) = self.failure.take() {
            (RunStatus::Failed, Some(failure))
        } else if any(Slot::Waiting) {
            let waiting: Vec<String> = self
                .slots
                .iter()
                .enumerate()
                .filter(|(_, s)| **s == Slot::Waiting)
                .map(|(i, _)| format!("`{}`", runbook.steps[i].id))
                .collect();
            (
                RunStatus::Waiting,
                Some(format!("waiting for approval of {}", waiting.join(", "))),
            )
        } else if any(Slot::Pending) {
            (RunStatus::Interrupted, Some("interrupted".to_owned()))
        } else {
            (RunStatus::Succeeded, None)
        };
        // Run outputs are stored and printed: they see sensitive outputs masked.
        for (index, step) in runbook.steps.iter().enumerate() {
            let kind = shared
                .registry
                .get(&step.uses)
                .expect("compile checked the step kind");
            let sensitive = sensitive_of(kind.as_ref(), step);
            if !sensitive.is_empty() && self.slots[index] == Slot::Succeeded {
                let shown = mask_sensitive(&self.context["steps"][&step.id]["outputs"], &sensitive);
                self.context["steps"][&step.id]["outputs"] = shown;
            }
        }
        let outputs = (status == RunStatus::Succeeded).then(|| {
            let rendered: Map<String, Value> = runbook
                .outputs
                .iter()
                .map(|(name, template)| {
                    let value = self
                        .renderer
                        .render_str(template, &self.context)
                        .unwrap_or(Value::Null);
                    (name.clone(), shared.redactor.value(&value))
                })
                .collect();
            Value::Object(rendered)
        });
        let run_id = shared.run_id.clone();
        shared
            .commit(vec![
                Write::RunFinished {
                    run_id: run_id.clone(),
                    status,
                    error: error.clone(),
                    outputs: outputs.clone(),
                    at: Utc::now(),
                },
                shared.lock.release(&run_id),
            ])
            .await?;
        (shared.progress)(&Progress::RunFinished {
            run_id: run_id.clone(),
            status,
            error: error.clone(),
        });
        Ok(RunSummary {
            run_id,
            status,
            error,
            outputs,
        })
    }
}

/// A step's sensitive outputs: its kind's, and those its runbook names.
fn sensitive_of<'a>(
    kind: &dyn crate::kind::StepKind,
    step: &'a crate::runbook::CompiledStep,
) -> Vec<&'a str> {
    kind.sensitive_outputs()
        .iter()
        .copied()
        .chain(step.sensitive_outputs.iter().map(String::as_str))
        .collect()
}

/// `outputs` with the named ones replaced by `***`, for the store and the terminal.
fn mask_sensitive(outputs: &Value, sensitive: &[&str]) -> Value {
    let mut masked = outputs.clone();
    if let Value::Object(map) = &mut masked {
        for name in sensitive {
            if let Some(value) = map.get_mut(*name) {
                *value = Value::String("***".into());
            }
        }
    }
    masked
}

async fn fail_step(
    shared: &Shared,
    index: usize,
    error: &str,
    at: DateTime<Utc>,
) -> Result<(), StoreError> {
    let step_id = shared.runbook.steps[index].id.clone();
    shared
        .commit(vec![Write::StepFailed {
            run_id: shared.run_id.clone(),
            step_id: step_id.clone(),
            attempt: 0,
            error: error.to_owned(),
            refused: false,
            at,
        }])
        .await?;
    (shared.progress)(&Progress::StepFailed {
        step_id,
        error: error.to_owned(),
    });
    Ok(())
}

/// One step's attempts, as a task.
struct StepTask {
    shared: Arc<Shared>,
    index: usize,
    input: Value,
    prior_attempts: u32,
    prior_planned: Option<Outcome>,
    /// The before image an earlier attempt committed, if any (a resumed run's).
    prior_before: Option<Value>,
    input_has_secrets: bool,
    approval: Option<Approval>,
}

/// How one attempt ended.
enum Attempt {
    Done {
        outcome: Outcome,
        outputs: Map<String, Value>,
    },
    Error(StepError),
}

impl StepTask {
    async fn run(self) -> Result<TaskEnd, StoreError> {
        let shared = self.shared.clone();
        let mut planned = self.prior_planned;
        let mut earlier_before = self.prior_before.clone();
        let step = &shared.runbook.steps[self.index];
        let kind = shared
            .registry
            .get(&step.uses)
            .expect("compile checked the step kind")
            .clone();
        let mut attempt = self.prior_attempts;
        let mut attempts_here = 0;
        // Attempts granted beyond the policy to observe a write whose answer was lost.
        let mut unknown_outcomes = 0;
        loop {
            attempt += 1;
            attempts_here += 1;
            tracing::Span::current().record("attempt", attempt);
            let started = Instant::now();
            (shared.progress)(&Progress::StepStarted {
                step_id: step.id.clone(),
                uses: step.uses.clone(),
                attempt,
            });
            let cx = StepContext {
                run_id: &shared.run_id,
                step_id: &step.id,
                attempt,
                input: &self.input,
                approval: self.approval.as_ref(),
                cancel: &shared.abort,
                earlier_before: earlier_before.as_ref(),
                input_has_secrets: self.input_has_secrets,
                recorded_outputs: None,
            };
            let mut committed_before = None;
            let attempt_future = async {
                let attempt = attempt_once(
                    &shared,
                    kind.as_ref(),
                    &cx,
                    &mut planned,
                    &mut committed_before,
                );
                // A kind that panics (a bug, or input nobody foresaw) fails its step, which
                // can be resumed or rolled back; it must not take the process, and the other
                // runs it carries, with it.
                match std::panic::AssertUnwindSafe(attempt).catch_unwind().await {
                    Ok(result) => result,
                    Err(panic) => Ok(Attempt::Error(
                        StepError::permanent(format!(
                            "the `{}` kind failed unexpectedly ({}); this is a bug in kmsflow: the step may have applied its change, so resume (which observes first) or roll back",
                            step.uses,
                            crate::rollback::panic_message(&panic)
                        ))
                        .with_unknown_outcome(),
                    )),
                }
            };
            let reporter = crate::progress::WaitingReporter {
                step_id: step.id.clone(),
                sink: shared.progress.clone(),
                redactor: shared.redactor.clone(),
            };
            let bounded = crate::progress::reporting(reporter, async {
                match step.timeout {
                    Some(limit) => match tokio::time::timeout(limit, attempt_future).await {
                        Ok(result) => result,
                        Err(_) => Ok(Attempt::Error(StepError::transient(format!(
                            "timed out after {}",
                            crate::duration::format_duration(limit)
                        )))),
                    },
                    None => attempt_future.await,
                }
            });
            let result = tokio::select! {
                result = bounded => result?,
                _ = shared.abort.cancelled() => return Ok(TaskEnd::Cancelled),
            };
            // Whether any attempt before this one may have applied the change: then a refusal
            // of this attempt's write says nothing about what the earlier one did.
            let applied_before = earlier_before.is_some();
            // Refused with nothing applied before: the step has changed nothing so far, and
            // its planned outcome and before image are forgotten (here and in the store).
            let refused = matches!(&result, Attempt::Error(e) if e.refused) && !applied_before;
            if refused {
                planned = None;
            } else if earlier_before.is_none() {
                // The store keeps the first before image; so does the next attempt's context.
                earlier_before = committed_before;
            }
            let at = Utc::now();
            match result {
                Attempt::Done { outcome, outputs } => {
                    let outputs = shared.redactor.value(&Value::Object(outputs));
                    let succeeded = vec![Write::StepSucceeded {
                        run_id: shared.run_id.clone(),
                        step_id: step.id.clone(),
                        attempt,
                        outcome,
                        outputs: bounded_depth(
                            &mask_sensitive(&outputs, &sensitive_of(kind.as_ref(), step)),
                            MAX_STORED_DEPTH,
                        ),
                        at,
                    }];
                    if outcome == Outcome::Unchanged {
                        shared.record(succeeded).await?;
                    } else {
                        shared.commit(succeeded).await?;
                    }
                    tracing::info!(outcome = %outcome, "step succeeded");
                    (shared.progress)(&Progress::StepSucceeded {
                        step_id: step.id.clone(),
                        outcome,
                        elapsed: started.elapsed(),
                    });
                    let Value::Object(outputs) = outputs else {
                        unreachable!("redaction keeps the shape")
                    };
                    return Ok(TaskEnd::Succeeded(outputs));
                }
                Attempt::Error(error) if error.class == ErrorClass::AwaitingApproval => {
                    let message = self.input["message"]
                        .as_str()
                        .map(|m| shared.redactor.text(m));
                    shared
                        .commit(vec![Write::Event {
                            run_id: shared.run_id.clone(),
                            step_id: Some(step.id.clone()),
                            kind: "approval_requested".into(),
                            detail: json!({
                                "approve_with": format!("kmsflow approve {} {}", shared.run_id, step.id),
                                "message": message,
                            }),
                            at,
                        }])
                        .await?;
                    (shared.progress)(&Progress::StepWaiting {
                        step_id: step.id.clone(),
                        message,
                    });
                    return Ok(TaskEnd::Waiting);
                }
                Attempt::Error(error) => {
                    let message = shared.redactor.text(&error.to_string());
                    let observe_again = error.outcome_unknown
                        && unknown_outcomes < MAX_UNKNOWN_OUTCOMES
                        && attempts_here >= step.retry.attempts;
                    if observe_again {
                        unknown_outcomes += 1;
                    }
                    if error.is_retryable()
                        && (attempts_here < step.retry.attempts || observe_again)
                    {
                        let backoff = step.retry.delay(attempts_here, fastrand::f64());
                        let delay = error
                            .retry_after
                            .map(|after| {
                                if after > MAX_RETRY_AFTER {
                                    tracing::warn!(
                                        asked_s = after.as_secs(),
                                        clamped_s = MAX_RETRY_AFTER.as_secs(),
                                        "Retry-After clamped"
                                    );
                                }
                                after.min(MAX_RETRY_AFTER)
                            })
                            .map_or(backoff, |after| after.max(backoff / 2));
                        shared
                            .commit(vec![Write::StepAttemptFailed {
                                run_id: shared.run_id.clone(),
                                step_id: step.id.clone(),
                                attempt,
                                error: message.clone(),
                                retry_in_ms: delay.as_millis() as u64,
                                refused,
                                at,
                            }])
                            .await?;
                        tracing::warn!(error = %message, retry_in_ms = delay.as_millis() as u64, "step attempt failed; retrying");
                        (shared.progress)(&Progress::StepRetrying {
                            step_id: step.id.clone(),
                            attempt,
                            delay,
                            error: message,
                        });
                        tokio::select! {
                            _ = tokio::time::sleep(delay) => continue,
                            _ = shared.abort.cancelled() => return Ok(TaskEnd::Cancelled),
                        }
                    }
                    let message = if error.is_retryable() && step.retry.attempts > 1 {
                        format!("{message} (gave up after {attempts_here} attempts)")
                    } else {
                        message
                    };
                    shared
                        .commit(vec![Write::StepFailed {
                            run_id: shared.run_id.clone(),
                            step_id: step.id.clone(),
                            attempt,
                            error: message.clone(),
                            refused,
                            at,
                        }])
                        .await?;
                    // The progress line below tells the user; the log keeps it for `debug`, so a
                    // failure is printed once, not once per channel.
                    tracing::debug!(error = %message, "step failed");
                    (shared.progress)(&Progress::StepFailed {
                        step_id: step.id.clone(),
                        error: message.clone(),
                    });
                    return Ok(TaskEnd::Failed(message));
                }
            }
        }
    }
}

/// observe → plan → (checkpoint the before image → apply). `planned` is the outcome the step
/// set out to make in an earlier attempt, if any: it is the outcome even when this attempt
/// finds the change already made. `committed_before` is set to the before image once it is
/// committed, so the next attempt knows this one may have applied (even if it timed out).
async fn attempt_once(
    shared: &Shared,
    kind: &dyn crate::kind::StepKind,
    cx: &StepContext<'_>,
    planned: &mut Option<Outcome>,
    committed_before: &mut Option<Value>,
) -> Result<Attempt, StoreError> {
    let before = match kind.observe(cx).await {
        Ok(before) => before,
        Err(error) => return Ok(Attempt::Error(error)),
    };
    let plan = match kind.plan(cx, &before) {
        Ok(plan) => plan,
        Err(error) => return Ok(Attempt::Error(error)),
    };
    if plan.change == Change::Unchanged {
        // An earlier attempt (perhaps in a process that died) already made the change.
        let outcome = planned.unwrap_or(Outcome::Unchanged);
        return Ok(Attempt::Done {
            outcome,
            outputs: plan.outputs,
        });
    }
    if let (Some(reason), NoReturn::Refuse) = (&plan.irreversible, shared.no_return)
        && !shared.runbook.approval_before(cx.step_id)
    {
        return Ok(Attempt::Error(
            StepError::permanent(format!(
                "not applied: this is a point of no return ({reason}), and nobody accepted it: \
                 there was no terminal to ask and no `--yes`. Nothing was changed; `kmsflow \
                 resume {}` goes ahead",
                shared.run_id
            ))
            .refusing(),
        ));
    }
    let this_change = plan.change.outcome();
    let before_image = shared.redactor.value(&before);
    // The fencing check goes with it (see `Shared::commit`): a run that lost its lock records
    // nothing and applies nothing (the checkpoint fails whole).
    shared
        .commit(vec![Write::StepApplying {
            run_id: shared.run_id.clone(),
            step_id: cx.step_id.to_owned(),
            attempt: cx.attempt,
            before_image: before_image.clone(),
            planned_outcome: this_change,
            at: Utc::now(),
        }])
        .await?;
    *committed_before = Some(before_image);
    let outcome = *planned.get_or_insert(this_change);
    (shared.progress)(&Progress::StepApplying {
        step_id: cx.step_id.to_owned(),
        summary: change_summary(&plan.change),
    });
    if let Some(reason) = &plan.irreversible {
        (shared.progress)(&Progress::PointOfNoReturn {
            step_id: cx.step_id.to_owned(),
            reason: reason.clone(),
        });
    }
    Ok(match kind.apply(cx, &before, &plan).await {
        Ok(applied) => {
            if let Some(note) = &applied.note {
                tracing::warn!(step = cx.step_id, "{}", shared.redactor.text(note));
            }
            let outcome = match applied.outcome {
                Some(proven) => {
                    // What the answer proved stands for every later attempt too.
                    *planned = Some(proven);
                    proven
                }
                None => outcome,
            };
            Attempt::Done {
                outcome,
                outputs: applied.outputs,
            }
        }
        Err(error) => Attempt::Error(error),
    })
}

/// One line describing a change.
pub fn change_summary(change: &Change) -> String {
    match change {
        Change::Unchanged => "no change".to_owned(),
        Change::Create { summary } | Change::Action { summary } => summary.clone(),
        Change::Update { summary, fields } => {
            let names: Vec<&str> = fields.iter().map(|f| f.path.as_str()).collect();
            if names.is_empty() {
                summary.clone()
            } else {
                format!("{summary} ({})", names.join(", "))
            }
        }
    }
}

/// How deep stored outputs may nest: the store reads JSON back with a recursion limit (128),
/// and a value it cannot read back would leave the run unreadable. Deeper parts are replaced,
/// in the store only, by a note saying so.
pub const MAX_STORED_DEPTH: usize = 64;

/// `value` with everything below `depth` levels replaced by a note.
pub fn bounded_depth(value: &Value, depth: usize) -> Value {
    match value {
        Value::Object(_) | Value::Array(_) if depth == 0 => Value::String(format!(
            "(nested deeper than {MAX_STORED_DEPTH} levels: not kept)"
        )),
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), bounded_depth(v, depth - 1)))
                .collect(),
        ),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| bounded_depth(v, depth - 1)).collect())
        }
        other => other.clone(),
    }
}

#[cfg(test)]
mod depth_tests {
    use super::*;

    #[test]
    fn stored_outputs_can_always_be_read_back() {
        let mut deep = serde_json::json!(1);
        for _ in 0..130 {
            deep = serde_json::json!({ "k": deep });
        }
        let text = deep.to_string();
        assert!(
            serde_json::from_str::<Value>(&text).is_err(),
            "serde_json refuses to read 130 levels back (what the store would have kept)"
        );
        let kept = bounded_depth(&deep, MAX_STORED_DEPTH);
        let read: Value = serde_json::from_str(&kept.to_string()).unwrap();
        assert_eq!(read, kept);
        let mut at = &read;
        for _ in 0..MAX_STORED_DEPTH {
            at = &at["k"];
        }
        assert!(at.as_str().unwrap().contains("not kept"), "{at}");
        let shallow = serde_json::json!({"a": [1, {"b": 2}]});
        assert_eq!(bounded_depth(&shallow, MAX_STORED_DEPTH), shallow);
    }
}
