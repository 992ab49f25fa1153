//! Rollouts: one runbook run once per target (a fleet of clusters), in waves, at a bounded
//! concurrency, stopping when failures pass an error budget; durable, resumable and
//! reversible as one.
//!
//! A rollout is a record (runbook, shared parameters, policy, targets and their waves) and,
//! for each target started, an ordinary child run with its own lock, journal, resume and
//! rollback. A target is linked to its run in the transaction that creates the run, so after
//! a crash every target either has its run, which resume continues where it stopped, or was
//! never started. The rollout holds a lock of its own (`rollout/<id>`) while it is driven, so
//! two shells never drive one rollout.

mod distributed;
pub mod policy;

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

use chrono::{DateTime, Utc};
use kmsflow_state::{
    LockOwner, NewRollout, NewTarget, ROLLOUT_PREFIX, RolloutRecord, RolloutTargetRecord,
    RunStatus, Write,
};
use serde::Serialize;
use serde_json::{Map, Value, json};

use crate::checkpoint::Checkpoints;
use crate::executor::{ExecOptions, RunSummary, Signals};
use crate::launch::{
    Continuation, LaunchError, Launcher, Operator, RollbackRequest, RunRequest, lock_key,
    new_run_id,
};
use crate::lease::{HeldLock, lease};
use crate::params::{self, BoundParams, ParamSources};
use crate::progress::{Progress, ProgressSink};
use crate::runbook::CompiledRunbook;

pub use policy::{Policy, Share, WaveGate, WavesError};

/// One row of a targets file (or one discovered cluster): its own parameters.
#[derive(Debug, Clone, PartialEq)]
pub struct TargetRow {
    /// How the user finds it in their file: `row 3`, `entry 2`.
    pub origin: String,
    pub params: Map<String, Value>,
}

/// A target bound and ready: its parameters checked against the runbook.
#[derive(Debug, Clone)]
pub struct Target {
    pub label: String,
    pub params: BoundParams,
}

/// Every problem with the targets, found before anything starts.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{} problem{} with the targets; nothing was started:\n{}", problems.len(),
    if problems.len() == 1 { "" } else { "s" }, problems.join("\n"))]
pub struct TargetProblems {
    pub problems: Vec<String>,
}

/// Binds every row (the shared parameters under the row's own) and refuses, all at once,
/// rows that do not bind and rows that name a target twice: two rows are one target when
/// the runbook's lock renders the same for both (ARM names compare case-insensitively), or,
/// for a runbook without a lock, when their parameters are equal ignoring case.
pub fn bind_targets(
    runbook: &CompiledRunbook,
    shared: &ParamSources,
    rows: &[TargetRow],
) -> Result<Vec<Target>, TargetProblems> {
    let several_subscriptions = rows
        .iter()
        .filter_map(|row| row.params.get("subscription").map(Value::to_string))
        .collect::<BTreeSet<_>>()
        .len()
        > 1;
    let mut problems = Vec::new();
    let mut targets = Vec::with_capacity(rows.len());
    let mut seen: HashMap<String, &str> = HashMap::new();
    for row in rows {
        let sources = row_sources(shared, &row.params);
        let bound = match params::bind(runbook, &sources) {
            Ok(bound) => bound,
            Err(errors) => {
                for error in errors.errors {
                    problems.push(format!("  {}: {error}", row.origin));
                }
                continue;
            }
        };
        let identity = match &runbook.lock {
            Some(_) => lock_key(runbook, &bound, "").unwrap_or_default(),
            None => bound.storable().to_string().to_lowercase(),
        };
        if let Some(first) = seen.get(&identity) {
            problems.push(format!(
                "  {}: the same target as {first} (`{identity}`); a target runs once per rollout",
                row.origin
            ));
            continue;
        }
        seen.insert(identity, &row.origin);
        targets.push(Target {
            label: label(&bound, several_subscriptions, &row.origin),
            params: bound,
        });
    }
    if problems.is_empty() {
        Ok(targets)
    } else {
        Err(TargetProblems { problems })
    }
}

/// The shared parameters with a row's own above them.
pub fn row_sources(shared: &ParamSources, row: &Map<String, Value>) -> ParamSources {
    let mut sources = shared.clone();
    for (key, value) in row {
        sources.cli.retain(|(k, _)| k != key);
        sources.cli.push((
            key.clone(),
            value
                .as_str()
                .map_or_else(|| value.to_string(), str::to_owned),
        ));
    }
    sources
}

/// `resource_group/cluster` (with the subscription first when the targets span several), or
/// the row when the runbook names no cluster.
fn label(params: &BoundParams, with_subscription: bool, origin: &str) -> String {
    let get = |k: &str| params.get(k).and_then(Value::as_str);
    match (get("resource_group"), get("cluster")) {
        (Some(group), Some(cluster)) => match get("subscription") {
            Some(subscription) if with_subscription => {
                format!("{subscription}/{group}/{cluster}")
            }
            _ => format!("{group}/{cluster}"),
        },
        _ => origin.to_owned(),
    }
}

/// The parameters a rollout's children are resumed or rolled back with: what the user gives
/// now, without the environment variables that would stand for stored parameters. A rollout
/// over three subscriptions is resumed from a shell whose `AZURE_SUBSCRIPTION_ID` names one
/// of them; the stored values are the targets, and the shell's are not a change the user
/// asked for. A value given on purpose (`-p`, a params file) is still compared, and refused.
fn without_ambient(runbook: &CompiledRunbook, given: &ParamSources) -> ParamSources {
    let mut sources = given.clone();
    for param in runbook.params.iter().filter(|p| !p.secret) {
        sources
            .env
            .remove(&format!("KMSFLOW_PARAM_{}", param.name.to_uppercase()));
        if let Some(env) = &param.env {
            sources.env.remove(env);
        }
    }
    sources
}

/// What a rollout reports as it goes; the binary draws it.
#[derive(Debug, Clone, PartialEq)]
pub enum RolloutProgress {
    Started {
        rollout_id: String,
        runbook: String,
        targets: usize,
        waves: u32,
        resumed: bool,
    },
    /// A rollback of the rollout begins: `to_undo` of its `targets` have something to undo.
    RollbackStarted {
        rollout_id: String,
        targets: usize,
        to_undo: usize,
    },
    WaveStarted {
        wave: u32,
        waves: u32,
        targets: usize,
    },
    /// The next wave waits for `kmsflow approve ROLLOUT wave-N`.
    GateWaiting { wave: u32 },
    /// The next wave starts at `until`.
    Pausing { wave: u32, until: DateTime<Utc> },
    TargetStarted {
        position: usize,
        label: String,
        run_id: String,
        begins: Begins,
    },
    /// A step of a target's run started.
    TargetStep { position: usize, step_id: String },
    TargetFinished {
        position: usize,
        label: String,
        run_id: Option<String>,
        status: RunStatus,
        error: Option<String>,
    },
    /// More targets failed than allowed: no new target starts.
    BudgetExhausted { failed: usize, allowed: usize },
    Finished {
        rollout_id: String,
        status: RunStatus,
        error: Option<String>,
        counts: Counts,
    },
}

/// How a target's run begins in this drive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Begins {
    /// A new run.
    Started,
    /// Its run continues where it stopped.
    Resumed,
    /// Its run is rolled back.
    Undoing,
}

impl Begins {
    pub fn as_str(self) -> &'static str {
        match self {
            Begins::Started => "started",
            Begins::Resumed => "resumed",
            Begins::Undoing => "undoing",
        }
    }
}

/// Receives a rollout's progress; called from its tasks, so it must be cheap.
pub type RolloutSink = Arc<dyn Fn(&RolloutProgress) + Send + Sync>;

/// How many targets stand where.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize)]
pub struct Counts {
    pub succeeded: usize,
    pub failed: usize,
    pub waiting: usize,
    pub interrupted: usize,
    pub rolled_back: usize,
    pub not_started: usize,
}

impl Counts {
    pub fn of(targets: &[RolloutTargetRecord]) -> Counts {
        let mut counts = Counts::default();
        for target in targets {
            match target.status {
                None => counts.not_started += 1,
                Some(RunStatus::Succeeded) => counts.succeeded += 1,
                Some(RunStatus::Waiting) => counts.waiting += 1,
                Some(RunStatus::Interrupted | RunStatus::Running) => counts.interrupted += 1,
                Some(RunStatus::RolledBack) => counts.rolled_back += 1,
                Some(_) => counts.failed += 1,
            }
        }
        counts
    }
}

/// How a rollout ended (this time).
#[derive(Debug, Clone, PartialEq)]
pub struct RolloutSummary {
    pub rollout_id: String,
    pub status: RunStatus,
    pub error: Option<String>,
    pub counts: Counts,
}

/// A new rollout.
pub struct RolloutRequest {
    pub runbook: Arc<CompiledRunbook>,
    pub runbook_ref: String,
    pub source: String,
    /// The parameters every target shares, as bound for the record (without secrets).
    pub shared: Value,
    pub targets: Vec<Target>,
    pub policy: Policy,
}

/// How a rollout is driven, new or resumed.
pub struct Drive {
    /// Parameters given now: secrets, for every child.
    pub params: ParamSources,
    /// Each child's executor options.
    pub options: ExecOptions,
    pub signals: Signals,
    pub progress: RolloutSink,
    /// Who drives it, and why: recorded in the journals.
    pub operator: Operator,
}

/// A fresh rollout id: a run id's shape after `rollout-`.
pub fn new_rollout_id(now: DateTime<Utc>) -> String {
    format!("{ROLLOUT_PREFIX}{}", new_run_id(now))
}

/// The lock a rollout's driver holds.
pub fn lock_key_of(rollout_id: &str) -> String {
    format!("rollout/{}", rollout_id.to_lowercase())
}

/// Records a new rollout, then drives it.
pub async fn start(
    launcher: &Arc<Launcher>,
    request: RolloutRequest,
    drive: Drive,
) -> Result<RolloutSummary, LaunchError> {
    start_with_id(
        launcher,
        request,
        drive,
        new_rollout_id(Utc::now()),
        Vec::new(),
    )
    .await
}

/// Records a new rollout under a chosen id (a schedule's fire claims it first), with
/// `with_creation` committed in the same transaction (the fire turning `started`), then
/// drives it.
pub async fn start_with_id(
    launcher: &Arc<Launcher>,
    request: RolloutRequest,
    drive: Drive,
    id: String,
    with_creation: Vec<Write>,
) -> Result<RolloutSummary, LaunchError> {
    let mut created = vec![creation(&request, &id)?];
    created.extend(with_creation);
    launcher.checkpoints().commit(created).await?;
    let bound: HashMap<usize, BoundParams> = request
        .targets
        .into_iter()
        .map(|t| t.params)
        .enumerate()
        .collect();
    drive_rollout(launcher, &id, request.runbook, bound, drive, false).await
}

/// The write that records `request` as rollout `id`, its targets in their waves, to be
/// driven later: by this process, or by a worker when it is queued with it.
pub fn creation(request: &RolloutRequest, id: &str) -> Result<Write, LaunchError> {
    let waves = request
        .policy
        .assign_waves(request.targets.len())
        .map_err(|e| LaunchError::Rollout(e.to_string()))?;
    Ok(Write::CreateRollout(NewRollout {
        id: id.to_owned(),
        runbook: request.runbook.name.clone(),
        runbook_ref: request.runbook_ref.clone(),
        content_hash: request.runbook.content_hash.clone(),
        source: request.source.clone(),
        fragments: crate::launch::storable_fragments(&request.runbook),
        params: request.shared.clone(),
        secret_params: request.runbook.secret_params(),
        policy: serde_json::to_value(&request.policy).expect("a policy serializes"),
        started_at: Utc::now(),
        targets: request
            .targets
            .iter()
            .zip(&waves)
            .map(|(target, wave)| NewTarget {
                label: target.label.clone(),
                params: target.params.storable(),
                wave: *wave,
            })
            .collect(),
    }))
}

/// Continues a rollout: children that failed or were interrupted are resumed where they
/// stopped, children never started are started, and the waves and their gates go on. The
/// error budget is counted afresh: a resume is the operator saying the cause is dealt with.
pub async fn resume(
    launcher: &Arc<Launcher>,
    rollout_id: &str,
    drive: Drive,
) -> Result<RolloutSummary, LaunchError> {
    drive_stored(launcher, rollout_id, drive, true).await
}

/// Drives a rollout recorded earlier: one a worker took from the queue (`resumed` when an
/// earlier worker drove it before), or one resumed by its operator.
pub async fn drive_stored(
    launcher: &Arc<Launcher>,
    rollout_id: &str,
    drive: Drive,
    resumed: bool,
) -> Result<RolloutSummary, LaunchError> {
    let rollout = load_rollout(launcher, rollout_id).await?;
    match rollout.status {
        RunStatus::RollingBack | RunStatus::RolledBack | RunStatus::RollbackFailed => {
            return Err(LaunchError::Rollout(format!(
                "rollout `{}` is {}: it cannot be resumed{}",
                rollout.id,
                rollout.status,
                if rollout.status == RunStatus::RolledBack {
                    ""
                } else {
                    &"; finish with `kmsflow rollback ROLLOUT`"
                }
            )));
        }
        RunStatus::Succeeded => {
            return Err(LaunchError::Rollout(format!(
                "rollout `{}` succeeded: there is nothing to resume",
                rollout.id
            )));
        }
        _ => {}
    }
    let runbook = launcher.compile_stored(
        &rollout.id,
        &rollout.runbook_ref,
        &rollout.source,
        &rollout.fragments,
    )?;
    drive_rollout(
        launcher,
        &rollout.id,
        runbook,
        HashMap::new(),
        drive,
        resumed,
    )
    .await
}

/// A rollout by id or unique prefix, read on the launcher's connection.
async fn load_rollout(launcher: &Launcher, wanted: &str) -> Result<RolloutRecord, LaunchError> {
    let wanted = wanted.to_owned();
    launcher
        .on_store(move |store| {
            let id = store.resolve_rollout_id(&wanted)?;
            Ok(store.rollout(&id)?)
        })
        .await
}

/// What one target came to in this drive.
struct Finished {
    status: RunStatus,
}

/// Drives a recorded rollout from wherever it stands.
async fn drive_rollout(
    launcher: &Arc<Launcher>,
    rollout_id: &str,
    runbook: Arc<CompiledRunbook>,
    mut bound: HashMap<usize, BoundParams>,
    drive: Drive,
    resumed: bool,
) -> Result<RolloutSummary, LaunchError> {
    let key = lock_key_of(rollout_id);
    let id = rollout_id.to_owned();
    let (lock, rollout, targets, approvals, pauses) = launcher
        .on_store(move |store| {
            let now = Utc::now();
            let grant = store.acquire_lock(&key, &id, &LockOwner::current(), lease())??;
            let lock = HeldLock::granted(key, grant.token);
            store.commit(&[Write::RolloutStatus {
                rollout_id: id.clone(),
                status: RunStatus::Running,
                error: None,
                at: now,
            }])?;
            let approvals: BTreeSet<String> = store
                .approvals(&id)?
                .into_iter()
                .map(|a| a.step_id)
                .collect();
            // A pause already begun keeps its end across a resume.
            let pauses: HashMap<u32, DateTime<Utc>> = store
                .events(&id)?
                .into_iter()
                .filter(|e| e.kind == "wave_paused")
                .filter_map(|e| {
                    let wave = e.detail["wave"].as_u64()? as u32;
                    let until = e.detail["until"].as_str()?.parse().ok()?;
                    Some((wave, until))
                })
                .collect();
            Ok((
                lock,
                store.rollout(&id)?,
                store.rollout_targets(&id)?,
                approvals,
                pauses,
            ))
        })
        .await?;
    let checkpoints = launcher.checkpoints();
    let _lease = lock.keep(checkpoints.clone(), rollout_id);
    let policy: Policy = serde_json::from_value(rollout.policy.clone())
        .map_err(|e| LaunchError::Rollout(format!("the rollout's stored policy: {e}")))?;
    let total = targets.len();
    let waves = targets.iter().map(|t| t.wave).max().unwrap_or(0);
    let allowed = policy.max_errors_for(total);
    (drive.progress)(&RolloutProgress::Started {
        rollout_id: rollout_id.to_owned(),
        runbook: rollout.runbook.clone(),
        targets: total,
        waves,
        resumed,
    });
    let sources = without_ambient(&runbook, &drive.params);
    // `kmsflow cancel ROLLOUT` drains the rollout and, through it, every target in flight.
    let (signals, _cancellable) = launcher.cancellable(rollout_id, drive.signals.clone());
    let drive = Drive { signals, ..drive };
    let context = Arc::new(TargetContext {
        launcher: launcher.clone(),
        rollout_id: rollout_id.to_owned(),
        runbook,
        runbook_ref: rollout.runbook_ref.clone(),
        source: rollout.source.clone(),
        sources,
        options: drive.options,
        signals: drive.signals.clone(),
        progress: drive.progress.clone(),
        operator: drive.operator.clone(),
        lock: lock.clone(),
        queue: policy.queue.clone(),
        ended: Default::default(),
    });
    if resumed {
        journal(
            &checkpoints,
            rollout_id,
            "rollout_resumed",
            json!({"by": drive.operator.by, "reason": drive.operator.reason}),
        )
        .await?;
    }
    let failed = Arc::new(AtomicUsize::new(0));
    let mut stop: Option<(RunStatus, Option<String>)> = None;
    for wave in 1..=waves {
        let todo: Vec<&RolloutTargetRecord> = targets
            .iter()
            .filter(|t| t.wave == wave && t.status != Some(RunStatus::Succeeded))
            .collect();
        if todo.is_empty() {
            continue;
        }
        let started_before = targets.iter().any(|t| t.wave == wave && t.run_id.is_some());
        if wave > 1 && !started_before {
            match policy.gate {
                WaveGate::None => {}
                WaveGate::Approve if approvals.contains(&format!("wave-{wave}")) => {}
                WaveGate::Approve => {
                    journal(&checkpoints, rollout_id, "wave_gate", json!({"wave": wave})).await?;
                    (drive.progress)(&RolloutProgress::GateWaiting { wave });
                    stop = Some((
                        RunStatus::Waiting,
                        Some(format!("wave {wave} waits for approval")),
                    ));
                    break;
                }
                WaveGate::Pause(pause) => {
                    let until = match pauses.get(&wave) {
                        Some(until) => *until,
                        None => {
                            let until =
                                Utc::now() + chrono::Duration::from_std(pause).unwrap_or_default();
                            journal(
                                &checkpoints,
                                rollout_id,
                                "wave_paused",
                                json!({"wave": wave, "until": until.to_rfc3339()}),
                            )
                            .await?;
                            until
                        }
                    };
                    (drive.progress)(&RolloutProgress::Pausing { wave, until });
                    let left = (until - Utc::now()).to_std().unwrap_or_default();
                    tokio::select! {
                        () = tokio::time::sleep(left) => {}
                        () = drive.signals.drain.cancelled() => {
                            stop = Some((RunStatus::Interrupted, None));
                            break;
                        }
                    }
                }
            }
        }
        journal(
            &checkpoints,
            rollout_id,
            "wave_started",
            json!({"wave": wave, "targets": todo.len()}),
        )
        .await?;
        (drive.progress)(&RolloutProgress::WaveStarted {
            wave,
            waves,
            targets: todo.len(),
        });
        let concurrency = policy.concurrency_for(total);
        let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency));
        let mut tasks = tokio::task::JoinSet::new();
        let (mut exhausted, mut waiting) = (false, false);
        let settle = |joined: Result<Finished, tokio::task::JoinError>, waiting: &mut bool| {
            let finished =
                joined.map_err(|e| LaunchError::Rollout(format!("a target's task: {e}")))?;
            *waiting |= finished.status == RunStatus::Waiting;
            Ok::<(), LaunchError>(())
        };
        for target in todo {
            let slot = semaphore
                .clone()
                .acquire_owned()
                .await
                .expect("the semaphore is never closed");
            // A finished task keeps its memory until it is joined: join as they end, so a
            // rollout of 10,000 holds the targets in flight, not every one it ran.
            while let Some(joined) = tasks.try_join_next() {
                settle(joined, &mut waiting)?;
            }
            if failed.load(Ordering::SeqCst) > allowed {
                exhausted = true;
                break;
            }
            if drive.signals.drain.is_cancelled() {
                break;
            }
            let (context, target, fresh, failed) = (
                context.clone(),
                target.clone(),
                bound.remove(&target.position),
                failed.clone(),
            );
            tasks.spawn(async move {
                let finished = context.run_target(&target, fresh).await;
                if !matches!(
                    finished.status,
                    RunStatus::Succeeded | RunStatus::Waiting | RunStatus::Interrupted
                ) {
                    failed.fetch_add(1, Ordering::SeqCst);
                }
                drop(slot);
                finished
            });
        }
        while let Some(joined) = tasks.join_next().await {
            settle(joined, &mut waiting)?;
        }
        let failures = failed.load(Ordering::SeqCst);
        if failures > allowed {
            exhausted = true;
        }
        if exhausted {
            journal(
                &checkpoints,
                rollout_id,
                "budget_exhausted",
                json!({"failed": failures, "allowed": allowed}),
            )
            .await?;
            (drive.progress)(&RolloutProgress::BudgetExhausted {
                failed: failures,
                allowed,
            });
            stop = Some((
                RunStatus::Failed,
                Some(format!(
                    "{failures} target{} failed, more than the {allowed} allowed (--max-errors): no new target started",
                    if failures == 1 { "" } else { "s" }
                )),
            ));
            break;
        }
        if drive.signals.drain.is_cancelled() {
            stop = Some((RunStatus::Interrupted, None));
            break;
        }
        if waiting {
            stop = Some((
                RunStatus::Waiting,
                Some(format!("targets of wave {wave} wait for approval")),
            ));
            break;
        }
    }
    let id = rollout_id.to_owned();
    let after = launcher
        .on_store(move |store| Ok(store.rollout_targets(&id)?))
        .await?;
    let counts = Counts::of(&after);
    let (status, error) = match stop {
        Some(stop) => stop,
        None if counts.failed > 0 => (
            RunStatus::Failed,
            Some(format!(
                "{} of {total} targets failed (within --max-errors {allowed})",
                counts.failed
            )),
        ),
        None if counts.waiting > 0 => (RunStatus::Waiting, None),
        None if counts.interrupted > 0 || counts.not_started > 0 => (RunStatus::Interrupted, None),
        None => (RunStatus::Succeeded, None),
    };
    checkpoints
        .commit(vec![
            Write::RolloutStatus {
                rollout_id: rollout_id.to_owned(),
                status,
                error: error.clone(),
                at: Utc::now(),
            },
            lock.release(rollout_id),
        ])
        .await?;
    (drive.progress)(&RolloutProgress::Finished {
        rollout_id: rollout_id.to_owned(),
        status,
        error: error.clone(),
        counts,
    });
    Ok(RolloutSummary {
        rollout_id: rollout_id.to_owned(),
        status,
        error,
        counts,
    })
}

async fn journal(
    checkpoints: &Arc<dyn Checkpoints>,
    rollout_id: &str,
    kind: &str,
    detail: Value,
) -> Result<(), LaunchError> {
    checkpoints
        .commit(vec![Write::Event {
            run_id: rollout_id.to_owned(),
            step_id: None,
            kind: kind.to_owned(),
            detail,
            at: Utc::now(),
        }])
        .await?;
    Ok(())
}

/// What every target of one drive shares.
struct TargetContext {
    launcher: Arc<Launcher>,
    rollout_id: String,
    runbook: Arc<CompiledRunbook>,
    runbook_ref: String,
    source: String,
    sources: ParamSources,
    options: ExecOptions,
    signals: Signals,
    progress: RolloutSink,
    operator: Operator,
    /// The driver's lock: queueing a target is fenced by it.
    lock: HeldLock,
    /// The queue the targets are shared out on, if they are.
    queue: Option<String>,
    /// Which of the queued targets in flight have ended, asked for all of them at once.
    ended: distributed::Ended,
}

impl TargetContext {
    /// Starts, resumes or leaves one target, and says how it ended.
    async fn run_target(
        &self,
        target: &RolloutTargetRecord,
        fresh: Option<BoundParams>,
    ) -> Finished {
        let position = target.position;
        let result = match (&target.run_id, target.status) {
            (Some(_), Some(RunStatus::Succeeded)) => {
                return Finished {
                    status: RunStatus::Succeeded,
                };
            }
            (Some(run_id), Some(status)) if !status.is_resumable() => {
                // Rolled back (or being): its target is done with in this rollout.
                self.report_finished(target, Some(run_id.clone()), status, None);
                return Finished { status };
            }
            (_, _) if self.queue.is_some() => {
                let queue = self.queue.as_deref().expect("just matched");
                self.run_on_queue(queue, target, fresh).await
            }
            (Some(run_id), _) => {
                (self.progress)(&RolloutProgress::TargetStarted {
                    position,
                    label: target.label.clone(),
                    run_id: run_id.clone(),
                    begins: Begins::Resumed,
                });
                self.launcher
                    .resume(Continuation {
                        run_id: run_id.clone(),
                        params: self.sources.clone(),
                        allow_param_change: false,
                        changed_runbook: None,
                        options: self.options,
                        signals: self.signals.clone(),
                        progress: self.step_sink(position),
                        from: None,
                        operator: self.operator.clone(),
                    })
                    .await
            }
            (None, _) => self.start_target(target, fresh).await,
        };
        let (run_id, status, error) = match result {
            Ok(RunSummary {
                run_id,
                status,
                error,
                ..
            }) => (Some(run_id), status, error),
            // It could not start or resume at all: its cluster is locked by another run, its
            // parameters do not bind, the store failed. A failure of this target.
            Err(error) => (
                target.run_id.clone(),
                RunStatus::Failed,
                Some(error.to_string()),
            ),
        };
        let recorded = journal(
            &self.launcher.checkpoints(),
            &self.rollout_id,
            "target_finished",
            json!({"position": position, "run_id": run_id, "status": status, "error": error}),
        )
        .await;
        if let Err(error) = recorded {
            tracing::warn!(%error, "could not journal a target's end (its run holds it)");
        }
        self.report_finished(target, run_id, status, error);
        Finished { status }
    }

    fn report_finished(
        &self,
        target: &RolloutTargetRecord,
        run_id: Option<String>,
        status: RunStatus,
        error: Option<String>,
    ) {
        (self.progress)(&RolloutProgress::TargetFinished {
            position: target.position,
            label: target.label.clone(),
            run_id,
            status,
            error,
        });
    }

    /// A target's parameters: as bound when the rollout was asked for, or bound again from
    /// the stored ones with this drive's secrets.
    fn params_of(
        &self,
        target: &RolloutTargetRecord,
        fresh: Option<BoundParams>,
    ) -> Result<BoundParams, LaunchError> {
        match fresh {
            Some(params) => Ok(params),
            None => Ok(params::rebind(
                &self.runbook,
                &self.rollout_id,
                target.params.as_object().unwrap_or(&Map::new()),
                &self.sources,
                false,
            )?),
        }
    }

    async fn start_target(
        &self,
        target: &RolloutTargetRecord,
        fresh: Option<BoundParams>,
    ) -> Result<RunSummary, LaunchError> {
        let params = self.params_of(target, fresh)?;
        let run_id = new_run_id(Utc::now());
        (self.progress)(&RolloutProgress::TargetStarted {
            position: target.position,
            label: target.label.clone(),
            run_id: run_id.clone(),
            begins: Begins::Started,
        });
        let request = RunRequest {
            runbook: self.runbook.clone(),
            runbook_ref: self.runbook_ref.clone(),
            source: self.source.clone(),
            params,
            options: self.options,
            signals: self.signals.clone(),
            progress: self.step_sink(target.position),
        };
        let link = Write::RolloutTargetStarted {
            rollout_id: self.rollout_id.clone(),
            position: target.position,
            run_id: run_id.clone(),
            at: Utc::now(),
        };
        self.launcher
            .start_with_id(request, run_id, vec![link])
            .await
    }

    /// A child's progress, as the rollout reports it: the step it is in.
    fn step_sink(&self, position: usize) -> ProgressSink {
        let progress = self.progress.clone();
        Arc::new(move |event: &Progress| {
            if let Progress::StepStarted { step_id, .. } = event {
                progress(&RolloutProgress::TargetStep {
                    position,
                    step_id: step_id.clone(),
                });
            }
        })
    }
}

/// What `rollback ROLLOUT` is given.
pub struct RollbackDrive {
    pub params: ParamSources,
    /// Children rolled back at once.
    pub concurrency: usize,
    pub progress: RolloutSink,
    /// Who rolls back, and why: recorded in the journals.
    pub operator: Operator,
}

/// Rolls a rollout back: every child that changed something (or whose rollback stopped
/// halfway), newest first, at most `concurrency` at once, each with the runbook and
/// parameters it stored.
pub async fn rollback(
    launcher: &Arc<Launcher>,
    rollout_id: &str,
    drive: RollbackDrive,
) -> Result<RolloutSummary, LaunchError> {
    let rollout = load_rollout(launcher, rollout_id).await?;
    if rollout.status == RunStatus::RolledBack {
        return Err(LaunchError::Rollout(format!(
            "rollout `{}` is rolled back already",
            rollout.id
        )));
    }
    let (key, id) = (lock_key_of(&rollout.id), rollout.id.clone());
    let (lock, children) = launcher
        .on_store(move |store| {
            let now = Utc::now();
            let grant = store.acquire_lock(&key, &id, &LockOwner::current(), lease())??;
            // A distributed rollout's targets still on the queue are taken back first: a
            // worker must not start one after its rollout was rolled back.
            let withdrawn = store.withdraw_queued_targets(&id)?;
            if !withdrawn.held.is_empty() {
                store.commit(&[Write::ReleaseLock {
                    key: key.clone(),
                    run_id: id.clone(),
                }])?;
                let named: Vec<String> = withdrawn
                    .held
                    .iter()
                    .map(|(label, worker)| format!("{label} (worker {worker})"))
                    .collect();
                return Err(LaunchError::Rollout(format!(
                    "rollout `{id}` has targets a worker holds now: {}; stop those workers \
                     (SIGTERM drains them) or let the targets end, then roll back \
                     (`kmsflow show {id}`)",
                    named.join(", ")
                )));
            }
            store.commit(&[Write::RolloutStatus {
                rollout_id: id.clone(),
                status: RunStatus::RollingBack,
                error: None,
                at: now,
            }])?;
            let children = undoable_children(store, &id)?;
            Ok((HeldLock::granted(key, grant.token), children))
        })
        .await?;
    let checkpoints = launcher.checkpoints();
    let _lease = lock.keep(checkpoints.clone(), &rollout.id);
    journal(
        &checkpoints,
        &rollout.id,
        "rollout_rollback_started",
        json!({"by": drive.operator.by, "reason": drive.operator.reason, "to_undo": children.len()}),
    )
    .await?;
    (drive.progress)(&RolloutProgress::RollbackStarted {
        rollout_id: rollout.id.clone(),
        targets: rollout.targets,
        to_undo: children.len(),
    });
    let runbook = launcher.compile_stored(
        &rollout.id,
        &rollout.runbook_ref,
        &rollout.source,
        &rollout.fragments,
    )?;
    let sources = without_ambient(&runbook, &drive.params);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(drive.concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    // Each failure was reported with its target as it happened, and stays on its run; the
    // rollout's own error counts them and names the first.
    let mut failures = Vec::new();
    let settle = |joined: Result<(String, RunStatus, Option<String>), tokio::task::JoinError>,
                  failures: &mut Vec<String>| {
        let (label, status, _) =
            joined.map_err(|e| LaunchError::Rollout(format!("a target's task: {e}")))?;
        if status != RunStatus::RolledBack {
            failures.push(label);
        }
        Ok::<(), LaunchError>(())
    };
    for child in children {
        let slot = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        while let Some(joined) = tasks.try_join_next() {
            settle(joined, &mut failures)?;
        }
        let (launcher, sources, progress, operator) = (
            launcher.clone(),
            sources.clone(),
            drive.progress.clone(),
            drive.operator.clone(),
        );
        tasks.spawn(async move {
            let run_id = child.run_id.clone().expect("only started children");
            progress(&RolloutProgress::TargetStarted {
                position: child.position,
                label: child.label.clone(),
                run_id: run_id.clone(),
                begins: Begins::Undoing,
            });
            let result = launcher
                .rollback(RollbackRequest {
                    run_id: run_id.clone(),
                    params: sources,
                    allow_param_change: false,
                    progress: crate::progress::silent(),
                    operator: operator.clone(),
                })
                .await;
            let (status, error) = match result {
                Ok(summary) => (summary.status, summary.error),
                Err(error) => (RunStatus::RollbackFailed, Some(error.to_string())),
            };
            progress(&RolloutProgress::TargetFinished {
                position: child.position,
                label: child.label.clone(),
                run_id: Some(run_id),
                status,
                error: error.clone(),
            });
            drop(slot);
            (child.label, status, error)
        });
    }
    while let Some(joined) = tasks.join_next().await {
        settle(joined, &mut failures)?;
    }
    let (status, error) = match failures.as_slice() {
        [] => (RunStatus::RolledBack, None),
        [only] => (
            RunStatus::RollbackFailed,
            Some(format!("the rollback of {only} failed")),
        ),
        [first, rest @ ..] => (
            RunStatus::RollbackFailed,
            Some(format!(
                "the rollbacks of {first} and {} other target{} failed",
                rest.len(),
                if rest.len() == 1 { "" } else { "s" }
            )),
        ),
    };
    checkpoints
        .commit(vec![
            Write::RolloutStatus {
                rollout_id: rollout.id.clone(),
                status,
                error: error.clone(),
                at: Utc::now(),
            },
            lock.release(&rollout.id),
        ])
        .await?;
    let id = rollout.id.clone();
    let counts = Counts::of(
        &launcher
            .on_store(move |store| Ok(store.rollout_targets(&id)?))
            .await?,
    );
    (drive.progress)(&RolloutProgress::Finished {
        rollout_id: rollout.id.clone(),
        status,
        error: error.clone(),
        counts,
    });
    Ok(RolloutSummary {
        rollout_id: rollout.id,
        status,
        error,
        counts,
    })
}

/// The children a rollback of the rollout undoes, newest first: those whose records show a
/// change to undo, and those whose own rollback stopped halfway.
pub fn undoable_children(
    store: &kmsflow_state::Store,
    rollout_id: &str,
) -> Result<Vec<RolloutTargetRecord>, LaunchError> {
    let mut children = Vec::new();
    for target in store.rollout_targets(rollout_id)? {
        let Some(run_id) = &target.run_id else {
            continue;
        };
        let halfway = matches!(
            target.status,
            Some(RunStatus::RollingBack | RunStatus::RollbackFailed)
        );
        if target.status == Some(RunStatus::RolledBack) {
            continue;
        }
        let steps = store.steps(run_id)?;
        if halfway || !crate::rollback::undo_plan(&steps).is_empty() {
            children.push(target);
        }
    }
    children.sort_by_key(|child| std::cmp::Reverse(child.started_at));
    Ok(children)
}
