//! Starting and resuming runs against a state file: the lock, the run's records, the writer
//! thread, and the executor, in that order. A [`Launcher`] keeps the file open for many runs
//! (a fleet check); [`start`] and [`resume`] open it for one.

use std::path::PathBuf;
use std::sync::Arc;

use chrono::{DateTime, Utc};
use kmsflow_state::{
    Approval, Durability, LockHeld, LockOwner, NewRun, RunRecord, RunStatus, StepRecord, Store,
    StoreError, Write, Writer, WriterThread,
};
use serde_json::json;

use crate::checkpoint::Checkpoints;
use crate::executor::{
    CheckpointFailed, Checkpointing, ExecOptions, Execution, LOCK_LEASE, RunSummary, Signals,
    execute,
};
use crate::kind::Registry;
use crate::params::BoundParams;
use crate::progress::ProgressSink;
use crate::runbook::CompiledRunbook;
use crate::template::{RenderError, Renderer};

/// Where runs are kept and which step kinds they may use.
#[derive(Debug, Clone)]
pub struct Engine {
    pub registry: Registry,
    pub state_path: PathBuf,
    pub durability: Durability,
}

/// A runbook ready to run, with its parameters and how to drive it.
pub struct RunRequest {
    pub runbook: Arc<CompiledRunbook>,
    /// Where the runbook came from: a path, or `bundled:<name>`.
    pub runbook_ref: String,
    /// The runbook's text, stored with the run.
    pub source: String,
    pub params: BoundParams,
    pub options: ExecOptions,
    pub signals: Signals,
    pub progress: ProgressSink,
}

/// Why a run could not be started, resumed or rolled back.
#[derive(Debug, thiserror::Error)]
pub enum LaunchError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    LockHeld(#[from] LockHeld),
    #[error("cannot render the lock key")]
    LockKey(#[source] RenderError),
    #[error(
        "run `{run_id}` is {status}: only running, failed, interrupted or waiting runs can be resumed"
    )]
    NotResumable { run_id: String, status: RunStatus },
    #[error("run `{run_id}` is {status}: there is nothing to roll back")]
    NotRollbackable { run_id: String, status: RunStatus },
    #[error("run `{run_id}` has no step `{step_id}`")]
    UnknownStep { run_id: String, step_id: String },
    #[error(
        "step `{step_id}` of run `{run_id}` is a `{uses}` step; only `approve` steps take approvals"
    )]
    NotAnApproval {
        run_id: String,
        step_id: String,
        uses: String,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointFailed),
}

/// A fresh run id: sortable by time, short enough to type (a unique prefix will do), and with
/// 32 random bits, so a fleet starting hundreds of runs a second does not collide.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    format!("{}-{:08x}", now.format("%Y%m%d-%H%M%S"), fastrand::u32(..))
}

/// Renders the runbook's lock key from its parameters.
pub fn lock_key(
    runbook: &CompiledRunbook,
    params: &BoundParams,
    run_id: &str,
) -> Result<Option<String>, RenderError> {
    let Some(template) = &runbook.lock else {
        return Ok(None);
    };
    let context = json!({"params": params.values(), "run": {"id": run_id}});
    let rendered = Renderer::new().render_str(template, &context)?;
    Ok(Some(match rendered {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    }))
}

/// Runs `work` on the writer's connection and waits for its answer.
async fn on_writer<T: Send + 'static>(
    writer: &Writer,
    work: impl FnOnce(&mut Store) -> Result<T, LaunchError> + Send + 'static,
) -> Result<T, LaunchError> {
    let (answer, answered) = tokio::sync::oneshot::channel();
    writer.run(Box::new(move |store| {
        let _ = answer.send(work(store));
    }));
    answered
        .await
        .map_err(|_| LaunchError::Store(StoreError::WriterGone))?
}

/// One state file held open for any number of runs: one connection and one writer thread.
///
/// Runs started through the same launcher share commits: when a fleet check drives a hundred
/// runs at once, their checkpoints land in one transaction and one device flush, instead of a
/// hundred connections queueing for SQLite's single write lock. Each checkpoint is still
/// durable before its run goes on.
pub struct Launcher {
    engine: Engine,
    writer: Arc<Writer>,
    thread: WriterThread,
}

impl Launcher {
    /// Opens (creating and migrating if needed) the engine's state file.
    pub async fn open(engine: &Engine) -> Result<Launcher, LaunchError> {
        let (path, durability) = (engine.state_path.clone(), engine.durability);
        let store = tokio::task::spawn_blocking(move || Store::open(&path, durability))
            .await
            .expect("opening the store does not panic")?;
        let (writer, thread) = Writer::spawn(store);
        Ok(Launcher {
            engine: engine.clone(),
            writer: Arc::new(writer),
            thread,
        })
    }

    /// Waits until every checkpoint is committed, then closes the state file.
    pub async fn close(self) {
        let Launcher { writer, thread, .. } = self;
        // Executions hold clones only while they run; all have ended when `close` is called.
        drop(writer);
        tokio::task::spawn_blocking(move || thread.join())
            .await
            .expect("writer thread join");
    }

    /// Creates a run with a fresh id and executes it.
    pub async fn start(&self, request: RunRequest) -> Result<RunSummary, LaunchError> {
        self.start_with_id(request, new_run_id(Utc::now())).await
    }

    /// Creates a run with a chosen id (a scheduler records it before the run starts) and
    /// executes it.
    pub async fn start_with_id(
        &self,
        request: RunRequest,
        run_id: String,
    ) -> Result<RunSummary, LaunchError> {
        let started_at = Utc::now();
        let key =
            lock_key(&request.runbook, &request.params, &run_id).map_err(LaunchError::LockKey)?;
        if let Some(key) = key.clone() {
            let run_id = run_id.clone();
            on_writer(&self.writer, move |store| {
                Ok(store.acquire_lock(
                    &key,
                    &run_id,
                    &LockOwner::current(),
                    started_at + LOCK_LEASE,
                    started_at,
                )??)
            })
            .await?;
        }
        let new_run = NewRun {
            id: run_id.clone(),
            runbook: request.runbook.name.clone(),
            runbook_ref: request.runbook_ref.clone(),
            content_hash: request.runbook.content_hash.clone(),
            source: request.source.clone(),
            params: request.params.storable(),
            secret_params: request.runbook.secret_params(),
            started_at,
            lock_key: key.clone(),
            steps: request
                .runbook
                .steps
                .iter()
                .map(|s| (s.id.clone(), s.uses.clone()))
                .collect(),
        };
        let created = Write::CreateRun(new_run);
        let pending = if request.options.checkpointing == Checkpointing::BeforeChanges {
            // Committed with the run's first checkpoint, before any change.
            vec![created]
        } else {
            // Group-committed with whatever other runs are checkpointing.
            Checkpoints::commit(&*self.writer, vec![created]).await?;
            Vec::new()
        };
        Ok(execute(Execution {
            pending,
            ..self.execution(request, run_id, started_at, key)
        })
        .await?)
    }

    /// A fresh execution of `request` as run `run_id`, checkpointing through this launcher.
    fn execution(
        &self,
        request: RunRequest,
        run_id: String,
        started_at: DateTime<Utc>,
        lock_key: Option<String>,
    ) -> Execution {
        Execution {
            run_id,
            started_at,
            runbook: request.runbook,
            params: request.params,
            registry: self.engine.registry.clone(),
            checkpoints: self.writer.clone(),
            progress: request.progress,
            options: request.options,
            signals: request.signals,
            previous: Vec::new(),
            approvals: Vec::new(),
            lock_key,
            resumed: false,
            pending: Vec::new(),
        }
    }

    /// Continues a run where it stopped. `request.runbook` is the runbook to run: the stored
    /// one, or a changed one the user allowed (its hash then replaces the stored one).
    pub async fn resume(
        &self,
        run: &RunRecord,
        request: RunRequest,
    ) -> Result<RunSummary, LaunchError> {
        if !run.status.is_resumable() {
            return Err(LaunchError::NotResumable {
                run_id: run.id.clone(),
                status: run.status,
            });
        }
        let run_id = run.id.clone();
        let key = run.lock_key.clone();
        let changed = (request.runbook.content_hash != run.content_hash)
            .then(|| (request.runbook.content_hash.clone(), request.source.clone()));
        let steps: Vec<(String, String)> = request
            .runbook
            .steps
            .iter()
            .map(|s| (s.id.clone(), s.uses.clone()))
            .collect();
        let (store_key, store_run) = (key.clone(), run_id.clone());
        // Lock, mark resumed and read back what is done, in one visit to the connection, so
        // nothing another process commits can slip between the three.
        let (previous, approvals) = on_writer(&self.writer, move |store| {
            let now = Utc::now();
            if let Some(key) = &store_key {
                store.acquire_lock(
                    key,
                    &store_run,
                    &LockOwner::current(),
                    now + LOCK_LEASE,
                    now,
                )??;
            }
            store.commit(&[Write::RunResumed {
                run_id: store_run.clone(),
                at: now,
                new_source: changed,
                steps,
            }])?;
            Ok((store.steps(&store_run)?, store.approvals(&store_run)?))
        })
        .await?;
        Ok(execute(Execution {
            previous,
            approvals,
            resumed: true,
            ..self.execution(request, run_id, run.started_at, key)
        })
        .await?)
    }
}

/// Creates a run and executes it, on a state file opened for this one run.
pub async fn start(engine: &Engine, request: RunRequest) -> Result<RunSummary, LaunchError> {
    start_with_id(engine, request, new_run_id(Utc::now())).await
}

/// Creates a run with a chosen id and executes it, on a state file opened for this one run.
pub async fn start_with_id(
    engine: &Engine,
    request: RunRequest,
    run_id: String,
) -> Result<RunSummary, LaunchError> {
    let launcher = Launcher::open(engine).await?;
    let result = launcher.start_with_id(request, run_id).await;
    launcher.close().await;
    result
}

/// Reads a run and its steps (for `resume`, `rollback`, `show`).
pub fn load_run(
    engine: &Engine,
    run_id_or_prefix: &str,
) -> Result<(RunRecord, Vec<StepRecord>, Vec<Approval>), LaunchError> {
    let store = Store::open(&engine.state_path, engine.durability)?;
    let run_id = store.resolve_run_id(run_id_or_prefix)?;
    let run = store.run(&run_id)?;
    let steps = store.steps(&run_id)?;
    let approvals = store.approvals(&run_id)?;
    Ok((run, steps, approvals))
}

/// Continues a run where it stopped, on a state file opened for this one run.
pub async fn resume(
    engine: &Engine,
    run: &RunRecord,
    request: RunRequest,
) -> Result<RunSummary, LaunchError> {
    let launcher = Launcher::open(engine).await?;
    let result = launcher.resume(run, request).await;
    launcher.close().await;
    result
}

/// Records who approved a waiting step.
pub fn approve(
    engine: &Engine,
    run_id_or_prefix: &str,
    step_id: &str,
    approved_by: &str,
) -> Result<String, LaunchError> {
    let mut store = Store::open(&engine.state_path, engine.durability)?;
    let run_id = store.resolve_run_id(run_id_or_prefix)?;
    match store.steps(&run_id)?.iter().find(|s| s.step_id == step_id) {
        None => {
            return Err(LaunchError::UnknownStep {
                run_id,
                step_id: step_id.to_owned(),
            });
        }
        Some(step) if step.uses != "approve" => {
            return Err(LaunchError::NotAnApproval {
                run_id,
                step_id: step_id.to_owned(),
                uses: step.uses.clone(),
            });
        }
        Some(_) => {}
    }
    store.commit(&[Write::Approve {
        run_id: run_id.clone(),
        step_id: step_id.to_owned(),
        approved_by: approved_by.to_owned(),
        at: Utc::now(),
    }])?;
    Ok(run_id)
}
