//! Starting and resuming runs against a state file: the lock, the run's records, the writer
//! thread, and the executor, in that order. A [`Launcher`] keeps the file open for many runs
//! (a fleet check); [`start`] and [`resume`] open it for one.

use std::sync::Arc;

use chrono::{DateTime, Utc};
use kmsflow_state::{
    Approval, Durability, Location, LockHeld, LockOwner, NewRun, RunRecord, RunStatus, StepRecord,
    Store, StoreError, Write, Writer, WriterThread,
};
use serde_json::json;

use crate::cancel::{CancelWatch, Registered};
use crate::checkpoint::Checkpoints;
use crate::diagnostic::{Diagnostics, RunbookSource};
use crate::executor::{
    CheckpointFailed, Checkpointing, ExecOptions, Execution, RunSummary, Signals, execute,
};
use crate::kind::Registry;
use crate::lease::{self, HeldLock};
use crate::params::{BoundParams, ParamSources, RebindError};
use crate::progress::ProgressSink;
use crate::runbook::{CompiledRunbook, FragmentSource, StoredFragments};
use crate::template::{RenderError, Renderer};

/// Where runs are kept and which step kinds they may use.
#[derive(Debug, Clone)]
pub struct Engine {
    pub registry: Registry,
    /// The state file, or the team's PostgreSQL database.
    pub state: Location,
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
    #[error("cannot render the lock key: {0}")]
    LockKey(RenderError),
    #[error(
        "run `{run_id}` is {status}: only running, failed, interrupted or waiting runs can be resumed (and, with `--from STEP`, succeeded ones)"
    )]
    NotResumable { run_id: String, status: RunStatus },
    #[error("run `{run_id}` is {status}: there is nothing to roll back")]
    NotRollbackable { run_id: String, status: RunStatus },
    #[error(
        "run `{run_id}` is being rolled back (or a rollback of it stopped halfway): it cannot be resumed; \
         finish with `kmsflow rollback {run_id}`"
    )]
    RollingBack { run_id: String },
    #[error(transparent)]
    Params(#[from] RebindError),
    #[error(
        "the runbook stored with run `{run_id}` does not compile ({diagnostics}); a run recorded by an \
         older kmsflow kept no fragments: resume it with `--allow-changed-runbook`"
    )]
    StoredRunbook {
        run_id: String,
        diagnostics: Diagnostics,
    },
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
    #[error(
        "run `{run_id}` is not waiting for approval of `{step_id}` (it is {status}); approve a step once \
         `kmsflow run` or `resume` stops at it, as `kmsflow show {run_id}` says"
    )]
    NotWaiting {
        run_id: String,
        step_id: String,
        status: RunStatus,
    },
    #[error(
        "step `{step_id}` of run `{run_id}` was approved already, by {approved_by} at {approved_at}; an approval is given once"
    )]
    AlreadyApproved {
        run_id: String,
        step_id: String,
        approved_by: String,
        approved_at: DateTime<Utc>,
    },
    #[error(transparent)]
    Checkpoint(#[from] CheckpointFailed),
    /// A rollout cannot be started, resumed or rolled back as asked.
    #[error("{0}")]
    Rollout(String),
}

/// A fresh run id: sortable by time, short enough to type (a unique prefix will do), and with
/// 32 random bits, so a fleet starting hundreds of runs a second does not collide.
pub fn new_run_id(now: DateTime<Utc>) -> String {
    format!("{}-{:08x}", now.format("%Y%m%d-%H%M%S"), fastrand::u32(..))
}

/// The lock a run holds: its runbook's `lock:` rendered from its parameters (in lower case:
/// ARM names are case-insensitive), or its claim on itself when the runbook has none.
pub fn lock_key(
    runbook: &CompiledRunbook,
    params: &BoundParams,
    run_id: &str,
) -> Result<String, RenderError> {
    let Some(template) = &runbook.lock else {
        return Ok(lease::claim_on_run(run_id));
    };
    let context = json!({"params": params.values(), "run": {"id": run_id}});
    // A lock read from an empty value names no target: `aks/{{params.cluster}}` with no
    // cluster would be one lock for every such run.
    for path in crate::template::references(template).unwrap_or_default() {
        if let crate::template::Target::Param(name) = path.target()
            && context["params"][name]
                .as_str()
                .is_some_and(|value| value.trim().is_empty())
        {
            return Err(RenderError {
                template: template.clone(),
                reason: format!(
                    "it reads `params.{name}`, which is empty: the lock would name no target and be shared by every such run; give `{name}` a value"
                ),
            });
        }
    }
    let rendered = match Renderer::new().render_str(template, &context)? {
        serde_json::Value::String(s) => s,
        other => other.to_string(),
    };
    let reads_secret = crate::template::references(template)
        .unwrap_or_default()
        .iter()
        .any(|path| matches!(path.target(), crate::template::Target::Param(name) if params.is_secret(name)));
    let rendered = if reads_secret {
        secret_lock(&lease::normalise(&rendered))
    } else {
        rendered
    };
    // `{{params.rg}}/{{params.cluster}}` with empty values renders `/`: a key that names no
    // target would be shared by every such run, of any runbook.
    if !rendered.chars().any(char::is_alphanumeric) {
        return Err(RenderError {
            template: template.clone(),
            reason: format!(
                "it renders `{rendered}`, which names nothing: every run with these values would share one lock; give the parameters it reads a value"
            ),
        });
    }
    Ok(lease::normalise(&rendered))
}

/// The lock key of a `lock:` that reads a secret parameter: a digest of what it rendered, so
/// the key (stored in `runs.lock_key` and `locks`, printed in lock conflicts) never carries
/// the secret in any form a template made of it (`{{upper params.token}}` too), and is still
/// the same for every run on the same target. A secret with little entropy (a PIN) can be
/// guessed back from a digest: a lock should name a target, not carry a secret.
fn secret_lock(rendered: &str) -> String {
    use sha2::{Digest, Sha256};
    let digest = Sha256::digest(format!("kmsflow lock key\0{rendered}").as_bytes());
    let hex: String = digest[..12].iter().map(|b| format!("{b:02x}")).collect();
    format!("secret-{hex}")
}

/// The fragments of a compiled runbook as a run stores them. The including runbook's own
/// name (a path as typed, which may differ from the stored reference) is stored as `""`.
/// The fragments a runbook includes, as a run keeps them with its text.
pub fn storable_fragments(runbook: &CompiledRunbook) -> serde_json::Value {
    let names: Vec<&str> = runbook
        .fragment_sources
        .iter()
        .map(|f| f.name.as_str())
        .collect();
    let stored: Vec<FragmentSource> = runbook
        .fragment_sources
        .iter()
        .map(|f| FragmentSource {
            including: if names.contains(&f.including.as_str()) {
                f.including.clone()
            } else {
                String::new()
            },
            ..f.clone()
        })
        .collect();
    serde_json::to_value(stored).expect("fragment sources serialize")
}

/// Takes `key` for `run_id` on the writer's connection.
fn take_lock(store: &mut Store, key: &str, run_id: &str) -> Result<HeldLock, LaunchError> {
    let grant = store.acquire_lock(key, run_id, &LockOwner::current(), lease::lease())??;
    Ok(HeldLock::granted(key, grant.token))
}

/// What `resume` is given beyond the run's own records: the parameters given now (secrets,
/// and values the caller means to change), and a changed runbook the caller allowed.
pub struct Continuation {
    /// A run id or a unique prefix of one.
    pub run_id: String,
    /// Parameters as given now; the stored values win unless `allow_param_change`.
    pub params: ParamSources,
    pub allow_param_change: bool,
    /// The runbook as it is now, with its text, when the user allowed a changed one; `None`
    /// continues with the stored runbook (fragments included).
    pub changed_runbook: Option<(Arc<CompiledRunbook>, String)>,
    pub options: ExecOptions,
    pub signals: Signals,
    pub progress: ProgressSink,
    /// `resume --from STEP`: run this step and every step downstream of it again, even if
    /// they succeeded (upstream outputs are reused). A succeeded run may be resumed so.
    pub from: Option<String>,
    /// Who resumes, and why: recorded in the journal.
    pub operator: Operator,
}

/// Who asked for an operator action (the OS user, and the name they gave), and why: what
/// the journal keeps of a resume, a rollback or a rollout's drive.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize)]
pub struct Operator {
    pub by: String,
    pub reason: Option<String>,
}

impl From<&str> for Operator {
    fn from(by: &str) -> Operator {
        Operator {
            by: by.to_owned(),
            reason: None,
        }
    }
}

impl From<String> for Operator {
    fn from(by: String) -> Operator {
        Operator { by, reason: None }
    }
}

/// What `rollback` is given beyond the run's own records.
pub struct RollbackRequest {
    /// A run id or a unique prefix of one.
    pub run_id: String,
    pub params: ParamSources,
    pub allow_param_change: bool,
    pub progress: ProgressSink,
    /// Who rolls back, and why: recorded in the journal.
    pub operator: Operator,
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
    cancels: CancelWatch,
}

impl Launcher {
    /// Opens (creating and migrating if needed) the engine's state file.
    pub async fn open(engine: &Engine) -> Result<Launcher, LaunchError> {
        let (location, durability) = (engine.state.clone(), engine.durability);
        let (store, cancels) = tokio::task::spawn_blocking(move || {
            let store = Store::open(&location, durability)?;
            Ok::<_, StoreError>((store, CancelWatch::start(&location, durability)?))
        })
        .await
        .expect("opening the store does not panic")?;
        let (writer, thread) = Writer::spawn(store);
        Ok(Launcher {
            engine: engine.clone(),
            writer: Arc::new(writer),
            thread,
            cancels,
        })
    }

    /// Waits until every checkpoint is committed, then closes the state file.
    pub async fn close(self) {
        let Launcher {
            writer,
            thread,
            cancels,
            ..
        } = self;
        // Executions hold clones only while they run; all have ended when `close` is called.
        drop(writer);
        tokio::task::spawn_blocking(move || {
            drop(cancels);
            thread.join()
        })
        .await
        .expect("writer thread join");
    }

    /// `signals` with a drain that `kmsflow cancel ID` from another shell also triggers,
    /// while the returned registration lives.
    pub(crate) fn cancellable(&self, id: &str, signals: Signals) -> (Signals, Registered) {
        let registered = self.cancels.register(id, &signals.drain);
        let signals = Signals {
            drain: registered.token.clone(),
            abort: signals.abort,
        };
        (signals, registered)
    }

    /// Creates a run with a fresh id and executes it.
    pub async fn start(&self, request: RunRequest) -> Result<RunSummary, LaunchError> {
        self.start_with_id(request, new_run_id(Utc::now()), Vec::new())
            .await
    }

    /// Creates a run with a chosen id (a scheduler claims it before the run starts) and
    /// executes it. `with_creation` is committed in the transaction that creates the run (a
    /// schedule's fire turning `started`).
    pub async fn start_with_id(
        &self,
        request: RunRequest,
        run_id: String,
        with_creation: Vec<Write>,
    ) -> Result<RunSummary, LaunchError> {
        let started_at = Utc::now();
        let key =
            lock_key(&request.runbook, &request.params, &run_id).map_err(LaunchError::LockKey)?;
        // A runbook's lock may be held by another run: take it in a transaction of its own,
        // before anything is recorded. A new run's claim on itself cannot be (its id is fresh):
        // it is written with the run's record, at no extra commit (a fleet of read-only checks
        // would otherwise pay one per cluster).
        let mut claim = None;
        let lock = if request.runbook.lock.is_none() {
            let owner = LockOwner::current();
            claim = Some(Write::ClaimLock {
                key: key.clone(),
                run_id: run_id.clone(),
                owner_pid: owner.pid,
                owner_host: owner.host,
                lease: lease::lease(),
            });
            HeldLock::granted(key.clone(), 1)
        } else {
            let (key, run_id) = (key.clone(), run_id.clone());
            on_writer(&self.writer, move |store| take_lock(store, &key, &run_id)).await?
        };
        let new_run = NewRun {
            id: run_id.clone(),
            runbook: request.runbook.name.clone(),
            runbook_ref: request.runbook_ref.clone(),
            content_hash: request.runbook.content_hash.clone(),
            source: request.source.clone(),
            params: request.params.storable(),
            secret_params: request.runbook.secret_params(),
            started_at,
            lock_key: Some(key),
            fragments: storable_fragments(&request.runbook),
            steps: request
                .runbook
                .steps
                .iter()
                .map(|s| (s.id.clone(), s.uses.clone()))
                .collect(),
        };
        let mut created = vec![Write::CreateRun(new_run)];
        created.extend(claim);
        created.extend(with_creation);
        let pending = if request.options.checkpointing == Checkpointing::BeforeChanges {
            // Committed with the run's first checkpoint, before any change.
            created
        } else {
            // Group-committed with whatever other runs are checkpointing.
            Checkpoints::commit(&*self.writer, created).await?;
            Vec::new()
        };
        let (signals, _cancellable) = self.cancellable(&run_id, request.signals);
        let request = RunRequest { signals, ..request };
        Ok(execute(Execution {
            pending,
            ..self.execution(request, run_id, started_at, lock)
        })
        .await?)
    }

    /// A fresh execution of `request` as run `run_id`, checkpointing through this launcher.
    fn execution(
        &self,
        request: RunRequest,
        run_id: String,
        started_at: DateTime<Utc>,
        lock: HeldLock,
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
            lock,
            resumed: false,
            pending: Vec::new(),
        }
    }

    /// Where this launcher's runs checkpoint: its writer.
    pub fn checkpoints(&self) -> Arc<dyn Checkpoints> {
        self.writer.clone()
    }

    /// Runs `work` on the writer's connection (reads that must see every commit so far, and
    /// transactions of their own) and waits for its answer.
    pub async fn on_store<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Store) -> Result<T, LaunchError> + Send + 'static,
    ) -> Result<T, LaunchError> {
        on_writer(&self.writer, work).await
    }

    /// Compiles a runbook from a stored text and its stored fragments (`owner` names the run
    /// or rollout in the error).
    pub fn compile_stored(
        &self,
        owner: &str,
        runbook_ref: &str,
        source: &str,
        fragments: &serde_json::Value,
    ) -> Result<Arc<CompiledRunbook>, LaunchError> {
        let fragments: Vec<FragmentSource> =
            serde_json::from_value(fragments.clone()).unwrap_or_default();
        let source = RunbookSource::new(runbook_ref, source.to_owned());
        crate::compile::compile_with(
            &source,
            &self.engine.registry,
            &StoredFragments::new(fragments),
        )
        .map(Arc::new)
        .map_err(|diagnostics| LaunchError::StoredRunbook {
            run_id: owner.to_owned(),
            diagnostics,
        })
    }

    /// Reads a run (by id or unique prefix) on the writer's connection.
    async fn load(&self, run_id_or_prefix: &str) -> Result<RunRecord, LaunchError> {
        let wanted = run_id_or_prefix.to_owned();
        on_writer(&self.writer, move |store| {
            let run_id = store.resolve_run_id(&wanted)?;
            Ok(store.run(&run_id)?)
        })
        .await
    }

    /// The runbook a run executed, compiled from the text and fragments stored with it.
    pub fn stored_runbook(&self, run: &RunRecord) -> Result<Arc<CompiledRunbook>, LaunchError> {
        self.compile_stored(&run.id, &run.runbook_ref, &run.source, &run.fragments)
    }

    /// Continues a run where it stopped, with the runbook and parameters it stored (see
    /// [`Continuation`] for what the caller may change on purpose).
    pub async fn resume(&self, continuation: Continuation) -> Result<RunSummary, LaunchError> {
        let run = self.load(&continuation.run_id).await?;
        let resumable = if continuation.from.is_some() {
            check_rerunnable
        } else {
            check_resumable
        };
        resumable(&run)?;
        let (runbook, changed) = match continuation.changed_runbook {
            Some((runbook, text)) if runbook.content_hash != run.content_hash => {
                let fragments = storable_fragments(&runbook);
                let hash = runbook.content_hash.clone();
                (runbook, Some((hash, text, fragments)))
            }
            Some((runbook, _)) => (runbook, None),
            None => (self.stored_runbook(&run)?, None),
        };
        let stored = run.params.as_object().cloned().unwrap_or_default();
        let params = crate::params::rebind(
            &runbook,
            &run.id,
            &stored,
            &continuation.params,
            continuation.allow_param_change,
        )?;
        let run_id = run.id.clone();
        let key = run
            .lock_key
            .clone()
            .unwrap_or_else(|| lease::claim_on_run(&run.id));
        let steps: Vec<(String, String)> = runbook
            .steps
            .iter()
            .map(|s| (s.id.clone(), s.uses.clone()))
            .collect();
        let reset = match &continuation.from {
            Some(from) => runbook
                .downstream_of(from)
                .ok_or_else(|| LaunchError::UnknownStep {
                    run_id: run.id.clone(),
                    step_id: from.clone(),
                })?,
            None => Vec::new(),
        };
        let operator = json!({
            "by": continuation.operator.by,
            "reason": continuation.operator.reason,
            "from": continuation.from,
            "allow_param_change": continuation.allow_param_change,
        });
        let store_run = run_id.clone();
        // Lock, check the status again, mark resumed and read back what is done, in one visit
        // to the connection: a second `resume` of this run waits for the lock and then finds
        // it held, and nothing another process commits can slip between the four.
        let (lock, previous, approvals) = on_writer(&self.writer, move |store| {
            let lock = reclaim(store, &key, &store_run, resumable)?;
            store.commit(&[Write::RunResumed {
                run_id: store_run.clone(),
                at: Utc::now(),
                new_source: changed,
                steps,
                reset,
                operator,
            }])?;
            Ok((lock, store.steps(&store_run)?, store.approvals(&store_run)?))
        })
        .await?;
        let (signals, _cancellable) = self.cancellable(&run_id, continuation.signals);
        let request = RunRequest {
            source: run.source.clone(),
            runbook_ref: run.runbook_ref.clone(),
            runbook,
            params,
            options: continuation.options,
            signals,
            progress: continuation.progress,
        };
        Ok(execute(Execution {
            previous,
            approvals,
            resumed: true,
            ..self.execution(request, run_id, run.started_at, lock)
        })
        .await?)
    }

    /// Rolls a run back: undoes, newest first, what its steps recorded they changed, with the
    /// runbook and parameters it stored. The run is `rolling_back` from the first undo until
    /// the walk ends, so a crash halfway leaves a run that `resume` refuses and `rollback`
    /// continues.
    pub async fn rollback(&self, request: RollbackRequest) -> Result<RunSummary, LaunchError> {
        let run = self.load(&request.run_id).await?;
        check_rollbackable(&run)?;
        let runbook = self.stored_runbook(&run)?;
        let stored = run.params.as_object().cloned().unwrap_or_default();
        let params = crate::params::rebind(
            &runbook,
            &run.id,
            &stored,
            &request.params,
            request.allow_param_change,
        )?;
        let key = run
            .lock_key
            .clone()
            .unwrap_or_else(|| lease::claim_on_run(&run.id));
        let store_run = run.id.clone();
        let operator = json!({
            "by": request.operator.by,
            "reason": request.operator.reason,
            "allow_param_change": request.allow_param_change,
        });
        // Holding the run's lock guarantees no other process is executing or rolling it back.
        let (lock, records) = on_writer(&self.writer, move |store| {
            let lock = reclaim(store, &key, &store_run, check_rollbackable)?;
            store.commit(&[Write::RollbackStarted {
                run_id: store_run.clone(),
                at: Utc::now(),
                operator,
            }])?;
            Ok((lock, store.steps(&store_run)?))
        })
        .await?;
        let checkpoints: Arc<dyn Checkpoints> = self.writer.clone();
        let _lease = lock.keep(checkpoints.clone(), &run.id);
        crate::rollback::walk(crate::rollback::Walk {
            registry: &self.engine.registry,
            run: &run,
            runbook: &runbook,
            params: &params,
            records: &records,
            checkpoints: checkpoints.as_ref(),
            lock: &lock,
            progress: &request.progress,
        })
        .await
    }
}

/// Takes a stored run's lock, then checks its status again under the lock: a run another
/// process finished (or started rolling back) while this one loaded it is refused, and the
/// lock given back.
fn reclaim(
    store: &mut Store,
    key: &str,
    run_id: &str,
    allowed: fn(&RunRecord) -> Result<(), LaunchError>,
) -> Result<HeldLock, LaunchError> {
    let lock = take_lock(store, key, run_id)?;
    if let Err(refused) = allowed(&store.run(run_id)?) {
        store.commit(&[lock.release(run_id)])?;
        return Err(refused);
    }
    Ok(lock)
}

fn check_resumable(run: &RunRecord) -> Result<(), LaunchError> {
    match run.status {
        RunStatus::RollingBack => Err(LaunchError::RollingBack {
            run_id: run.id.clone(),
        }),
        status if status.is_resumable() => Ok(()),
        status => Err(LaunchError::NotResumable {
            run_id: run.id.clone(),
            status,
        }),
    }
}

/// `resume --from`: also a run that succeeded (its steps run again on purpose).
fn check_rerunnable(run: &RunRecord) -> Result<(), LaunchError> {
    match run.status {
        RunStatus::Succeeded => Ok(()),
        _ => check_resumable(run),
    }
}

fn check_rollbackable(run: &RunRecord) -> Result<(), LaunchError> {
    match run.status {
        RunStatus::RolledBack => Err(LaunchError::NotRollbackable {
            run_id: run.id.clone(),
            status: run.status,
        }),
        _ => Ok(()),
    }
}

/// Creates a run and executes it, on a state file opened for this one run.
pub async fn start(engine: &Engine, request: RunRequest) -> Result<RunSummary, LaunchError> {
    start_with_id(engine, request, new_run_id(Utc::now()), Vec::new()).await
}

/// Creates a run with a chosen id and executes it, on a state file opened for this one run;
/// `with_creation` is committed with the run's creation.
pub async fn start_with_id(
    engine: &Engine,
    request: RunRequest,
    run_id: String,
    with_creation: Vec<Write>,
) -> Result<RunSummary, LaunchError> {
    let launcher = Launcher::open(engine).await?;
    let result = launcher.start_with_id(request, run_id, with_creation).await;
    launcher.close().await;
    result
}

/// Reads a run and its steps (for `resume`, `rollback`, `show`).
pub fn load_run(
    engine: &Engine,
    run_id_or_prefix: &str,
) -> Result<(RunRecord, Vec<StepRecord>, Vec<Approval>), LaunchError> {
    let store = Store::open(&engine.state, engine.durability)?;
    let run_id = store.resolve_run_id(run_id_or_prefix)?;
    let run = store.run(&run_id)?;
    let steps = store.steps(&run_id)?;
    let approvals = store.approvals(&run_id)?;
    Ok((run, steps, approvals))
}

/// Continues a run where it stopped, on a state file opened for this one run.
pub async fn resume(
    engine: &Engine,
    continuation: Continuation,
) -> Result<RunSummary, LaunchError> {
    let launcher = Launcher::open(engine).await?;
    let result = launcher.resume(continuation).await;
    launcher.close().await;
    result
}

/// Rolls a run back, on a state file opened for this one run.
pub async fn rollback(
    engine: &Engine,
    request: RollbackRequest,
) -> Result<RunSummary, LaunchError> {
    let launcher = Launcher::open(engine).await?;
    let result = launcher.rollback(request).await;
    launcher.close().await;
    result
}

/// Records who approved a waiting step: only a step the run is waiting on, and only once (a
/// second approval is refused, never written over the first).
pub fn approve(
    engine: &Engine,
    run_id_or_prefix: &str,
    step_id: &str,
    approved_by: &str,
) -> Result<String, LaunchError> {
    let (mut store, run_id) = awaiting_decision(engine, run_id_or_prefix, step_id)?;
    store.commit(&[Write::Approve {
        run_id: run_id.clone(),
        step_id: step_id.to_owned(),
        approved_by: approved_by.to_owned(),
        at: Utc::now(),
    }])?;
    Ok(run_id)
}

/// Refuses a waiting step's approval: the step and the run fail (a run that can be rolled
/// back), and the journal says who and why. The same checks as [`approve`]; a step already
/// approved is not rejected.
pub fn reject(
    engine: &Engine,
    run_id_or_prefix: &str,
    step_id: &str,
    rejected_by: &str,
    reason: &str,
) -> Result<String, LaunchError> {
    let (mut store, run_id) = awaiting_decision(engine, run_id_or_prefix, step_id)?;
    store.commit(&[Write::Reject {
        run_id: run_id.clone(),
        step_id: step_id.to_owned(),
        rejected_by: rejected_by.to_owned(),
        reason: reason.to_owned(),
        at: Utc::now(),
    }])?;
    Ok(run_id)
}

/// The run, when `step_id` is an `approve` step it waits on and nobody has decided yet.
fn awaiting_decision(
    engine: &Engine,
    run_id_or_prefix: &str,
    step_id: &str,
) -> Result<(Store, String), LaunchError> {
    let store = Store::open(&engine.state, engine.durability)?;
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
    if let Some(earlier) = store
        .approvals(&run_id)?
        .into_iter()
        .find(|a| a.step_id == step_id)
    {
        return Err(LaunchError::AlreadyApproved {
            run_id,
            step_id: step_id.to_owned(),
            approved_by: earlier.approved_by,
            approved_at: earlier.approved_at,
        });
    }
    let run = store.run(&run_id)?;
    let requested = store
        .events(&run_id)?
        .iter()
        .any(|e| e.kind == "approval_requested" && e.step_id.as_deref() == Some(step_id));
    if run.status != RunStatus::Waiting || !requested {
        return Err(LaunchError::NotWaiting {
            run_id,
            step_id: step_id.to_owned(),
            status: run.status,
        });
    }
    Ok((store, run_id))
}
