use chrono::{DateTime, SecondsFormat, Utc};
use serde_json::{Value, json};

use crate::StoreError;
use crate::db::{Db, args};
use crate::records::{Outcome, RunStatus, StepStatus};
use crate::rollout::NewRollout;

/// A new run, as created before its first step starts.
#[derive(Debug, Clone)]
pub struct NewRun {
    pub id: String,
    pub runbook: String,
    pub runbook_ref: String,
    pub content_hash: String,
    pub source: String,
    /// Bound parameters without secrets: the caller removes them, the store never sees them.
    pub params: Value,
    pub secret_params: Vec<String>,
    pub started_at: DateTime<Utc>,
    pub lock_key: Option<String>,
    /// Step ids with their kinds, in execution order.
    pub steps: Vec<(String, String)>,
    /// The fragments the runbook includes (a JSON list), kept with its text.
    pub fragments: Value,
}

/// One change to the store. A checkpoint is a list of writes committed together; each
/// transition also appends its entry to the journal in the same transaction.
#[derive(Debug, Clone)]
pub enum Write {
    /// Creates the run, its pending steps, and the `run_created` event.
    CreateRun(NewRun),
    /// The run starts (again): status `running`.
    RunResumed {
        run_id: String,
        at: DateTime<Utc>,
        /// Set when resume was allowed to run a changed runbook: (content hash, source,
        /// fragments).
        new_source: Option<(String, String, Value)>,
        /// Step ids with their kinds, in execution order; steps a changed runbook adds are
        /// created pending.
        steps: Vec<(String, String)>,
        /// Steps to run again although they succeeded (`resume --from`): made pending, their
        /// outputs dropped. What they changed stays recorded (before image and planned
        /// outcome), so a rollback still undoes it.
        reset: Vec<String>,
        /// Who resumed, and what they allowed: kept in the journal entry.
        operator: Value,
    },
    /// A rollback of the run begins (or continues): status `rolling_back`. `operator` (who,
    /// and what they allowed) is kept in the journal entry.
    RollbackStarted {
        run_id: String,
        at: DateTime<Utc>,
        operator: Value,
    },
    /// The run reached a status; `finished_at` is set for every status but `running`.
    RunFinished {
        run_id: String,
        status: RunStatus,
        error: Option<String>,
        outputs: Option<Value>,
        at: DateTime<Utc>,
    },
    /// The step is about to change the world: its before image is now durable.
    StepApplying {
        run_id: String,
        step_id: String,
        attempt: u32,
        before_image: Value,
        planned_outcome: Outcome,
        at: DateTime<Utc>,
    },
    /// The step finished; `attempt` is the attempt that succeeded.
    StepSucceeded {
        run_id: String,
        step_id: String,
        attempt: u32,
        outcome: Outcome,
        outputs: Value,
        at: DateTime<Utc>,
    },
    /// One attempt failed and the step will be retried.
    StepAttemptFailed {
        run_id: String,
        step_id: String,
        attempt: u32,
        error: String,
        retry_in_ms: u64,
        /// As for [`Write::StepFailed`]: Azure refused the step's only write so far.
        refused: bool,
        at: DateTime<Utc>,
    },
    /// The step failed for good (its retries are spent or the error is not retryable).
    StepFailed {
        run_id: String,
        step_id: String,
        attempt: u32,
        error: String,
        /// Azure refused the step's only write: its before image and planned outcome are
        /// cleared in the same transaction, so nothing of it counts as the run's change.
        refused: bool,
        at: DateTime<Utc>,
    },
    /// The step's `if` was false, or it needs outputs of a skipped step.
    StepSkipped {
        run_id: String,
        step_id: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// Rollback undid what the step changed.
    StepRolledBack {
        run_id: String,
        step_id: String,
        at: DateTime<Utc>,
    },
    /// An entry in the journal that changes no status.
    Event {
        run_id: String,
        step_id: Option<String>,
        kind: String,
        detail: Value,
        at: DateTime<Utc>,
    },
    /// Extends the holder's lease on a lock to `lease` from now by the store's clock: only if
    /// `run_id` still holds it with `token` (compare and swap); otherwise the checkpoint fails
    /// with [`StoreError::LeaseLost`].
    RenewLock {
        key: String,
        run_id: String,
        token: i64,
        lease: chrono::Duration,
    },
    /// The fencing check: fails the checkpoint with [`StoreError::LeaseLost`] unless `run_id`
    /// still holds `key` with `token` and a lease that runs past now, by the store's clock.
    /// Put first in the checkpoint that precedes a write to Azure, so a run that lost its lock
    /// records nothing and applies nothing.
    CheckFence {
        key: String,
        run_id: String,
        token: i64,
    },
    /// The lock is still this run's, with this fencing token; its lease is not timed by the
    /// store's clock. For a holder whose own monotonic clock says it renewed within its lease:
    /// a takeover changes the token, so this check is as exact as [`Write::CheckFence`]
    /// against another run, and a step of the store's wall clock cannot fail it.
    CheckHolder {
        key: String,
        run_id: String,
        token: i64,
    },
    /// A new run's claim on itself (`run/<id>`), written with the run's record: its id is
    /// fresh, so no other run can hold it, and it costs no transaction of its own.
    ClaimLock {
        key: String,
        run_id: String,
        owner_pid: u32,
        owner_host: String,
        lease: chrono::Duration,
    },
    /// Frees a lock this run holds (a no-op if another run holds it now).
    ReleaseLock { key: String, run_id: String },
    /// A claimed schedule fire's run now exists: committed with the run's creation, so a
    /// fire is `started` exactly when its run is.
    FireStarted {
        schedule: String,
        occurrence: DateTime<Utc>,
        run_id: String,
    },
    /// Records who approved an `approve` step.
    Approve {
        run_id: String,
        step_id: String,
        approved_by: String,
        at: DateTime<Utc>,
    },
    /// Refuses an `approve` step: the step and the run fail, with who and why. Only while
    /// the run waits and nobody approved the step, checked in the same transaction.
    Reject {
        run_id: String,
        step_id: String,
        rejected_by: String,
        reason: String,
        at: DateTime<Utc>,
    },
    /// Creates a rollout with its targets (none started) and the `rollout_created` event.
    CreateRollout(NewRollout),
    /// A target's run exists: committed in the transaction that creates the run, so a target
    /// has its run exactly when the run exists. Refused if the target has one already.
    RolloutTargetStarted {
        rollout_id: String,
        position: usize,
        run_id: String,
        at: DateTime<Utc>,
    },
    /// The rollout reached a status (`finished_at` is set for every status but `running`
    /// and `rolling_back`).
    RolloutStatus {
        rollout_id: String,
        status: RunStatus,
        error: Option<String>,
        at: DateTime<Utc>,
    },
    /// Queues a run for a worker (`run --queue`), with the `run_queued` event.
    Enqueue(crate::queue::NewQueued),
    /// A worker's heartbeat: renews its claim on a queued run (fails with
    /// [`StoreError::LeaseLost`] once another worker took it).
    QueueHeartbeat {
        id: String,
        worker: String,
        lease: chrono::Duration,
    },
    /// A worker gives up its claim: `done` when the run ended, otherwise back to the queue;
    /// `error` when the worker could not start or resume the run (journalled with it).
    QueueRelease {
        id: String,
        worker: String,
        done: bool,
        error: Option<String>,
        at: DateTime<Utc>,
    },
    /// A distributed rollout's target queued under `run_id` (with its [`Write::Enqueue`]);
    /// the worker that starts the run links it with [`Write::RolloutTargetStarted`].
    RolloutTargetQueued {
        rollout_id: String,
        position: usize,
        run_id: String,
        at: DateTime<Utc>,
    },
    /// Puts an entry that is done (its run failed or was interrupted) back in its queue, for
    /// the run to be resumed by the next worker: a rollout resumed by its operator does this
    /// for each of its targets that did not succeed. Nothing happens to an entry still queued
    /// or claimed.
    Requeue { id: String, at: DateTime<Utc> },
    /// Opens the gate before `wave`: only while the rollout waits, and only once.
    ApproveWave {
        rollout_id: String,
        wave: u32,
        approved_by: String,
        at: DateTime<Utc>,
    },
}

pub(crate) fn ts(at: &DateTime<Utc>) -> String {
    at.to_rfc3339_opts(SecondsFormat::Micros, true)
}

pub(crate) fn event(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: Option<&str>,
    at: &DateTime<Utc>,
    kind: &str,
    detail: &Value,
) -> Result<(), StoreError> {
    // Nothing to check: the journal row goes with the checkpoint's next round trip, on
    // PostgreSQL with the transaction's other journal rows when they are gathered. The
    // ordinality keeps their sequence numbers in the order they were written.
    if let Db::Postgres(pg) = tx {
        return pg.gather(
            "INSERT INTO events (run_id, step_id, at, kind, detail)
             SELECT row ->> 0, row ->> 1, row ->> 2, row ->> 3, row ->> 4
               FROM jsonb_array_elements(?1::text::jsonb) WITH ORDINALITY AS r(row, n)
              ORDER BY n",
            json!([run_id, step_id, ts(at), kind, detail.to_string()]),
        );
    }
    tx.execute_then(
        "INSERT INTO events (run_id, step_id, at, kind, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
        args![run_id, step_id, ts(at), kind, detail.to_string()],
    )
}

/// Keeps a runbook's text and its fragments under its content hash, once however many runs
/// use it. (The hash covers the fragments' texts too.)
pub(crate) fn keep_source(
    tx: &mut Db<'_>,
    content_hash: &str,
    source: &str,
    fragments: &Value,
) -> Result<(), StoreError> {
    tx.execute(
        "INSERT INTO runbook_sources (content_hash, source, fragments) VALUES (?1, ?2, ?3)
         ON CONFLICT (content_hash) DO NOTHING",
        args![content_hash, source, fragments.to_string()],
    )?;
    Ok(())
}

/// Fails with [`StoreError::LeaseLost`] unless `run_id` holds `key` with `token`, its lease
/// running past the store's now (when `timed`).
fn check_fence(
    tx: &mut Db<'_>,
    key: &str,
    run_id: &str,
    token: i64,
    timed: bool,
) -> Result<(), StoreError> {
    let (lock, run) = (key.to_owned(), run_id.to_owned());
    let lost = move |why: String, taken_by: Option<String>| StoreError::LeaseLost {
        key: lock,
        run_id: run,
        why,
        taken_by,
    };
    let taken = |holder: &str, held_token: i64| {
        format!("run `{holder}` holds it now, with fencing token {held_token}")
    };
    let expired = |expires: DateTime<Utc>| format!("its lease ran out at {expires}");
    if tx.is_postgres() {
        // Made by the server (`kmsflow_fence`, PostgreSQL migration 5), so the checkpoint's
        // COMMIT leaves with it in one round trip: a failed check aborts the transaction and
        // that COMMIT rolls back. A fenced checkpoint is never committed.
        let run = run_id.to_owned();
        return tx.execute_enforced(
            "SELECT kmsflow_fence(?1, ?2, ?3, ?4)",
            args![key, run_id, token, timed],
            move |which, detail| {
                let detail = detail.unwrap_or_default();
                match which {
                    "held by" => {
                        let (held_token, holder) = detail.split_once(' ').unwrap_or(("?", ""));
                        let held_token = held_token.parse().unwrap_or(-1);
                        let taken_by = (holder != run).then(|| holder.to_owned());
                        lost(taken(holder, held_token), taken_by)
                    }
                    "expired" => {
                        match crate::store::timestamp(detail.to_owned(), "locks.lease_expires_at") {
                            Ok(expires) => lost(expired(expires), None),
                            Err(error) => error,
                        }
                    }
                    _ => lost("the lock is not held".into(), None),
                }
            },
        );
    }
    // Checked with the checkpoint's other statements, before its COMMIT.
    let run = run_id.to_owned();
    tx.query_then(
        "SELECT run_id, token, lease_expires_at FROM locks WHERE key = ?1",
        args![key],
        |row| {
            Ok((
                row.get::<String>(0)?,
                row.get::<i64>(1)?,
                row.get::<String>(2)?,
            ))
        },
        move |holders, now| match holders.into_iter().next() {
            None => Err(lost("the lock is not held".into(), None)),
            Some((holder, held_token, _)) if holder != run || held_token != token => {
                let taken_by = (holder != run).then(|| holder.clone());
                Err(lost(taken(&holder, held_token), taken_by))
            }
            Some((_, _, expires)) => {
                let expires = crate::store::timestamp(expires, "locks.lease_expires_at")?;
                if timed && expires <= now {
                    Err(lost(expired(expires), None))
                } else {
                    Ok(())
                }
            }
        },
    )
}

/// Applies a whole transaction's writes, in order, where any failure fails all of them.
///
/// A fencing check the same as one made earlier in the transaction is left out when no write
/// between the two can have changed a lock: the transaction commits whole or not at all, so
/// the earlier check holds for everything after it. A fan-out's checkpoints, committed
/// together, then pay for one check instead of one each. (Checkpoints that may fail one by
/// one each keep their own check: see the writer's savepoints.)
pub(crate) fn apply_all<'w>(
    tx: &mut Db<'_>,
    writes: impl IntoIterator<Item = &'w Write>,
) -> Result<(), StoreError> {
    // (key, run, token, timed): a timed check made earlier covers an untimed one too.
    let mut checked: Vec<(&str, &str, i64, bool)> = Vec::new();
    for write in writes {
        match write {
            Write::CheckFence { key, run_id, token } => {
                let fence = (key.as_str(), run_id.as_str(), *token, true);
                if checked.contains(&fence) {
                    continue;
                }
                checked.push(fence);
            }
            Write::CheckHolder { key, run_id, token } => {
                let (key, run_id) = (key.as_str(), run_id.as_str());
                if checked.contains(&(key, run_id, *token, true))
                    || checked.contains(&(key, run_id, *token, false))
                {
                    continue;
                }
                checked.push((key, run_id, *token, false));
            }
            write if !write.leaves_locks_alone() => checked.clear(),
            _ => {}
        }
        apply(tx, write)?;
    }
    Ok(())
}

impl Write {
    /// Whether this write is sure to leave the `locks` table as it found it. Only the kinds
    /// named here are: a kind added later counts as touching locks until it is named.
    fn leaves_locks_alone(&self) -> bool {
        matches!(
            self,
            Write::StepApplying { .. }
                | Write::StepSucceeded { .. }
                | Write::StepAttemptFailed { .. }
                | Write::StepFailed { .. }
                | Write::StepSkipped { .. }
                | Write::StepRolledBack { .. }
                | Write::Event { .. }
                | Write::CheckFence { .. }
                | Write::CheckHolder { .. }
        )
    }
}

/// Applies one write inside an open transaction: one function per kind of write.
pub(crate) fn apply(tx: &mut Db<'_>, write: &Write) -> Result<(), StoreError> {
    match write {
        Write::CreateRun(run) => create_run(tx, run),
        Write::RunResumed {
            run_id,
            at,
            new_source,
            steps,
            reset,
            operator,
        } => run_resumed(tx, run_id, at, new_source, steps, reset, operator),
        Write::RollbackStarted {
            run_id,
            at,
            operator,
        } => rollback_started(tx, run_id, at, operator),
        Write::RunFinished {
            run_id,
            status,
            error,
            outputs,
            at,
        } => run_finished(tx, run_id, *status, error, outputs, at),
        Write::StepApplying {
            run_id,
            step_id,
            attempt,
            before_image,
            planned_outcome,
            at,
        } => step_applying(
            tx,
            run_id,
            step_id,
            *attempt,
            before_image,
            *planned_outcome,
            at,
        ),
        Write::StepSucceeded {
            run_id,
            step_id,
            attempt,
            outcome,
            outputs,
            at,
        } => step_succeeded(tx, run_id, step_id, *attempt, *outcome, outputs, at),
        Write::StepAttemptFailed {
            run_id,
            step_id,
            attempt,
            error,
            retry_in_ms,
            refused,
            at,
        } => step_attempt_failed(
            tx,
            (run_id, step_id),
            *attempt,
            error,
            *retry_in_ms,
            *refused,
            at,
        ),
        Write::StepFailed {
            run_id,
            step_id,
            attempt,
            error,
            refused,
            at,
        } => step_failed(tx, run_id, step_id, *attempt, error, *refused, at),
        Write::StepSkipped {
            run_id,
            step_id,
            reason,
            at,
        } => step_skipped(tx, run_id, step_id, reason, at),
        Write::StepRolledBack {
            run_id,
            step_id,
            at,
        } => step_rolled_back(tx, run_id, step_id, at),
        Write::Event {
            run_id,
            step_id,
            kind,
            detail,
            at,
        } => event(tx, run_id, step_id.as_deref(), at, kind, detail),
        Write::RenewLock {
            key,
            run_id,
            token,
            lease,
        } => renew_lock(tx, key, run_id, *token, *lease),
        Write::CheckFence { key, run_id, token } => check_fence(tx, key, run_id, *token, true),
        Write::CheckHolder { key, run_id, token } => check_fence(tx, key, run_id, *token, false),
        Write::ReleaseLock { key, run_id } => release_lock(tx, key, run_id),
        Write::ClaimLock {
            key,
            run_id,
            owner_pid,
            owner_host,
            lease,
        } => claim_lock(tx, key, run_id, (*owner_pid, owner_host), *lease),
        Write::FireStarted {
            schedule,
            occurrence,
            run_id,
        } => fire_started(tx, schedule, occurrence, run_id),
        Write::Approve {
            run_id,
            step_id,
            approved_by,
            at,
        } => approve(tx, run_id, step_id, approved_by, at),
        Write::Reject {
            run_id,
            step_id,
            rejected_by,
            reason,
            at,
        } => reject(tx, run_id, step_id, rejected_by, reason, at),
        Write::CreateRollout(rollout) => crate::rollout::create_rollout(tx, rollout),
        Write::Enqueue(queued) => crate::queue::enqueue(tx, queued),
        Write::QueueHeartbeat { id, worker, lease } => {
            crate::queue::heartbeat(tx, id, worker, *lease)
        }
        Write::QueueRelease {
            id,
            worker,
            done,
            error,
            at,
        } => crate::queue::release(tx, id, worker, *done, error.as_deref(), at),
        Write::Requeue { id, at } => crate::queue::requeue(tx, id, at),
        Write::RolloutTargetQueued {
            rollout_id,
            position,
            run_id,
            at,
        } => crate::rollout::target_queued(tx, rollout_id, *position, run_id, at),
        Write::RolloutTargetStarted {
            rollout_id,
            position,
            run_id,
            at,
        } => crate::rollout::target_started(tx, rollout_id, *position, run_id, at),
        Write::RolloutStatus {
            rollout_id,
            status,
            error,
            at,
        } => crate::rollout::rollout_status(tx, rollout_id, *status, error, at),
        Write::ApproveWave {
            rollout_id,
            wave,
            approved_by,
            at,
        } => crate::rollout::approve_wave(tx, rollout_id, *wave, approved_by, at),
    }
}

fn create_run(tx: &mut Db<'_>, run: &NewRun) -> Result<(), StoreError> {
    keep_source(tx, &run.content_hash, &run.source, &run.fragments)?;
    tx.execute(
        "INSERT INTO runs (id, runbook, runbook_ref, content_hash, params, secret_params,
                           status, started_at, lock_key)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, 'running', ?7, ?8)",
        args![
            run.id,
            run.runbook,
            run.runbook_ref,
            run.content_hash,
            run.params.to_string(),
            serde_json::to_string(&run.secret_params).expect("strings serialize"),
            ts(&run.started_at),
            run.lock_key,
        ],
    )?;
    insert_steps(tx, &run.id, &run.steps, false)?;
    event(
        tx,
        &run.id,
        None,
        &run.started_at,
        "run_created",
        &json!({"runbook": run.runbook, "runbook_ref": run.runbook_ref, "content_hash": run.content_hash}),
    )?;
    Ok(())
}

/// A run's steps, `(step id, kind)` in runbook order, as `pending` rows; with `renumber`, a
/// step already recorded keeps its row and takes its new position (a resumed run whose
/// runbook changed).
///
/// On PostgreSQL every row goes in one statement: a row each would cost the server a
/// statement per step (a thousand-step runbook spent about 110 ms there), and a round trip each
/// where `execute` waits. SQLite runs its cached statement once per row, in process.
fn insert_steps(
    tx: &mut Db<'_>,
    run_id: &str,
    steps: &[(String, String)],
    renumber: bool,
) -> Result<(), StoreError> {
    let on_conflict = if renumber {
        " ON CONFLICT (run_id, step_id) DO UPDATE SET position = excluded.position"
    } else {
        ""
    };
    if tx.is_postgres() {
        let rows = serde_json::to_string(steps).expect("strings serialize");
        return tx.execute_then(
            &format!(
                "INSERT INTO steps (run_id, step_id, position, uses, status)
                 SELECT ?1, step ->> 0, position - 1, step ->> 1, 'pending'
                   FROM jsonb_array_elements(?2::text::jsonb) WITH ORDINALITY AS s(step, position)
                 {on_conflict}"
            ),
            args![run_id, rows],
        );
    }
    let sql = format!(
        "INSERT INTO steps (run_id, step_id, position, uses, status) VALUES (?1, ?2, ?3, ?4, 'pending'){on_conflict}"
    );
    for (position, (step_id, uses)) in steps.iter().enumerate() {
        tx.execute(&sql, args![run_id, step_id, position as i64, uses])?;
    }
    Ok(())
}

fn run_resumed(
    tx: &mut Db<'_>,
    run_id: &str,
    at: &DateTime<Utc>,
    new_source: &Option<(String, String, Value)>,
    steps: &[(String, String)],
    reset: &[String],
    operator: &Value,
) -> Result<(), StoreError> {
    insert_steps(tx, run_id, steps, true)?;
    tx.execute(
        "UPDATE runs SET status = 'running', finished_at = NULL, error = NULL WHERE id = ?1",
        args![run_id],
    )?;
    for step_id in reset {
        tx.execute(
            "UPDATE steps SET status = 'pending', outputs = NULL, outcome = NULL, error = NULL,
                    finished_at = NULL
             WHERE run_id = ?1 AND step_id = ?2",
            args![run_id, step_id],
        )?;
    }
    let mut detail = operator.as_object().cloned().unwrap_or_default();
    if let Some((hash, source, fragments)) = new_source {
        keep_source(tx, hash, source, fragments)?;
        tx.execute(
            "UPDATE runs SET content_hash = ?2 WHERE id = ?1",
            args![run_id, hash],
        )?;
        detail.insert("changed_runbook".into(), json!(hash));
    }
    if !reset.is_empty() {
        detail.insert("run_again".into(), json!(reset));
    }
    event(tx, run_id, None, at, "run_resumed", &Value::Object(detail))?;
    Ok(())
}

fn rollback_started(
    tx: &mut Db<'_>,
    run_id: &str,
    at: &DateTime<Utc>,
    operator: &Value,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE runs SET status = 'rolling_back', finished_at = NULL, error = NULL WHERE id = ?1",
        args![run_id],
    )?;
    event(tx, run_id, None, at, "rollback_started", operator)?;
    Ok(())
}

fn run_finished(
    tx: &mut Db<'_>,
    run_id: &str,
    status: RunStatus,
    error: &Option<String>,
    outputs: &Option<Value>,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let finished = (status != RunStatus::Running).then(|| ts(at));
    tx.execute(
        "UPDATE runs SET status = ?2, error = ?3, outputs = ?4, finished_at = ?5 WHERE id = ?1",
        args![
            run_id,
            status.as_str(),
            error,
            outputs.as_ref().map(Value::to_string),
            finished
        ],
    )?;
    event(
        tx,
        run_id,
        None,
        at,
        &format!("run_{status}"),
        &json!({"error": error}),
    )?;
    Ok(())
}

fn step_applying(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    attempt: u32,
    before_image: &Value,
    planned_outcome: Outcome,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    // Keep the first before image: a step re-observed after a crash sees the world its
    // own earlier attempt changed, and rollback must restore what was there before that.
    tx.execute_then(
"UPDATE steps SET status = 'running', attempts = CASE WHEN attempts > ?3 THEN attempts ELSE ?3 END,
                before_image = coalesce(before_image, ?4),
                planned_outcome = coalesce(planned_outcome, ?5),
                started_at = coalesce(started_at, ?6), error = NULL
         WHERE run_id = ?1 AND step_id = ?2", args![
        run_id,
        step_id,
        i64::from(attempt),
        before_image.to_string(),
        planned_outcome.as_str(),
        ts(at)
    ])?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_applying",
        &json!({"attempt": attempt, "planned": planned_outcome}),
    )?;
    Ok(())
}

/// Steps' outcomes on PostgreSQL, many in one statement: a JSON array of rows `[run id, step
/// id, attempt, outcome, outputs, at]`.
pub(crate) const STEPS_SUCCEEDED: &str = "UPDATE steps SET status = 'succeeded',
        attempts = CASE WHEN steps.attempts > (u.row ->> 2)::bigint
                        THEN steps.attempts ELSE (u.row ->> 2)::bigint END,
        outcome = u.row ->> 3, outputs = u.row ->> 4, error = NULL,
        started_at = coalesce(steps.started_at, u.row ->> 5), finished_at = u.row ->> 5
   FROM kmsflow_elements(?1::text::jsonb) AS u(row)
  WHERE steps.run_id = u.row ->> 0 AND steps.step_id = u.row ->> 1";

fn step_succeeded(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    attempt: u32,
    outcome: Outcome,
    outputs: &Value,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let one = "UPDATE steps SET status = 'succeeded', attempts = CASE WHEN attempts > ?3 THEN attempts ELSE ?3 END, outcome = ?4,
                outputs = ?5, error = NULL, started_at = coalesce(started_at, ?6), finished_at = ?6
         WHERE run_id = ?1 AND step_id = ?2";
    let (outputs, at_text) = (outputs.to_string(), ts(at));
    let args = args![
        run_id,
        step_id,
        i64::from(attempt),
        outcome.as_str(),
        outputs,
        at_text
    ];
    match tx {
        // A batch's outcomes (a fan-out's, a fleet's) go as one statement where they stand.
        // `kmsflow_elements` is estimated at one row, so each is an index lookup: with
        // `jsonb_array_elements`' estimate of 100 the planner scans all of `steps` instead.
        Db::Postgres(pg) => pg.gather_in_place(
            STEPS_SUCCEEDED,
            json!([run_id, step_id]).to_string(),
            json!([run_id, step_id, attempt, outcome.as_str(), outputs, at_text]),
            (one, args),
        )?,
        Db::Sqlite(_) => tx.execute_then(one, args)?,
    }
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_succeeded",
        &json!({"attempt": attempt, "outcome": outcome}),
    )?;
    Ok(())
}

fn step_attempt_failed(
    tx: &mut Db<'_>,
    (run_id, step_id): (&str, &str),
    attempt: u32,
    error: &str,
    retry_in_ms: u64,
    refused: bool,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE steps SET attempts = CASE WHEN attempts > ?3 THEN attempts ELSE ?3 END, error = ?4,
                started_at = coalesce(started_at, ?5),
                before_image = CASE WHEN ?6 THEN NULL ELSE before_image END,
                planned_outcome = CASE WHEN ?6 THEN NULL ELSE planned_outcome END
         WHERE run_id = ?1 AND step_id = ?2",
        args![run_id, step_id, i64::from(attempt), error, ts(at), refused],
    )?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_attempt_failed",
        &json!({"attempt": attempt, "error": error, "retry_in_ms": retry_in_ms}),
    )?;
    Ok(())
}

fn step_failed(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    attempt: u32,
    error: &str,
    refused: bool,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.execute(
"UPDATE steps SET status = 'failed', attempts = CASE WHEN attempts > ?3 THEN attempts ELSE ?3 END, error = ?4,
                started_at = coalesce(started_at, ?5), finished_at = ?5,
                before_image = CASE WHEN ?6 THEN NULL ELSE before_image END,
                planned_outcome = CASE WHEN ?6 THEN NULL ELSE planned_outcome END
         WHERE run_id = ?1 AND step_id = ?2", args![run_id, step_id, i64::from(attempt), error, ts(at), refused])?;
    let detail = if refused {
        json!({"attempt": attempt, "error": error, "refused": true})
    } else {
        json!({"attempt": attempt, "error": error})
    };
    event(tx, run_id, Some(step_id), at, "step_failed", &detail)?;
    Ok(())
}

fn step_skipped(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    reason: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE steps SET status = 'skipped', error = NULL, finished_at = ?3
         WHERE run_id = ?1 AND step_id = ?2",
        args![run_id, step_id, ts(at)],
    )?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_skipped",
        &json!({"reason": reason}),
    )?;
    Ok(())
}

fn step_rolled_back(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE steps SET status = ?3, finished_at = ?4 WHERE run_id = ?1 AND step_id = ?2",
        args![run_id, step_id, StepStatus::RolledBack.as_str(), ts(at)],
    )?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_rolled_back",
        &json!({}),
    )?;
    Ok(())
}

fn renew_lock(
    tx: &mut Db<'_>,
    key: &str,
    run_id: &str,
    token: i64,
    lease: chrono::Duration,
) -> Result<(), StoreError> {
    let expires = tx.now()? + lease;
    let renewed = tx.execute(
        "UPDATE locks SET lease_expires_at = ?4
         WHERE key = ?1 AND run_id = ?2 AND token = ?3",
        args![key, run_id, token, ts(&expires)],
    )?;
    if renewed == 0 {
        // Say who has it (or that nobody does).
        check_fence(tx, key, run_id, token, false)?;
    }
    Ok(())
}

fn release_lock(tx: &mut Db<'_>, key: &str, run_id: &str) -> Result<(), StoreError> {
    tx.execute(
        "DELETE FROM locks WHERE key = ?1 AND run_id = ?2",
        args![key, run_id],
    )?;
    Ok(())
}

fn claim_lock(
    tx: &mut Db<'_>,
    key: &str,
    run_id: &str,
    (owner_pid, owner_host): (u32, &str),
    lease: chrono::Duration,
) -> Result<(), StoreError> {
    let expires = tx.now()? + lease;
    tx.execute(
        "INSERT INTO locks (key, run_id, owner_pid, owner_host, lease_expires_at, token)
         VALUES (?1, ?2, ?3, ?4, ?5, 1)",
        args![key, run_id, i64::from(owner_pid), owner_host, ts(&expires)],
    )?;
    Ok(())
}

fn fire_started(
    tx: &mut Db<'_>,
    schedule: &str,
    occurrence: &DateTime<Utc>,
    run_id: &str,
) -> Result<(), StoreError> {
    tx.execute(
        "UPDATE schedule_fires SET outcome = 'started'
         WHERE schedule = ?1 AND occurrence = ?2 AND run_id = ?3 AND outcome = 'claimed'",
        args![schedule, ts(occurrence), run_id],
    )?;
    Ok(())
}

/// A decision on an approval is taken only while the run waits and nobody decided before:
/// checked inside the decision's transaction, so an approval and a rejection racing from two
/// shells cannot both land.
fn check_undecided(tx: &mut Db<'_>, run_id: &str, step_id: &str) -> Result<(), StoreError> {
    let status: Option<String> = tx.query_opt(
        "SELECT status FROM runs WHERE id = ?1",
        args![run_id],
        |row| row.get(0),
    )?;
    let approved: bool = tx.query_one(
        "SELECT EXISTS (SELECT 1 FROM approvals WHERE run_id = ?1 AND step_id = ?2)",
        args![run_id, step_id],
        |row| row.get(0),
    )?;
    match status.as_deref() {
        Some("waiting") if !approved => Ok(()),
        Some(status) => Err(StoreError::Decided {
            run_id: run_id.to_owned(),
            step_id: step_id.to_owned(),
            status: status.to_owned(),
            approved,
        }),
        None => Err(StoreError::RunNotFound(run_id.to_owned())),
    }
}

fn reject(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    rejected_by: &str,
    reason: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    check_undecided(tx, run_id, step_id)?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_rejected",
        &json!({"rejected_by": rejected_by, "reason": reason}),
    )?;
    let error = format!("rejected by {rejected_by}: {reason}");
    step_failed(tx, run_id, step_id, 0, &error, false, at)?;
    run_finished(
        tx,
        run_id,
        RunStatus::Failed,
        &Some(format!("step `{step_id}` failed: {error}")),
        &None,
        at,
    )
}

fn approve(
    tx: &mut Db<'_>,
    run_id: &str,
    step_id: &str,
    approved_by: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    check_undecided(tx, run_id, step_id)?;
    tx.execute(
        // Never over an earlier approval: a second one fails the primary key.
        "INSERT INTO approvals (run_id, step_id, approved_by, approved_at)
         VALUES (?1, ?2, ?3, ?4)",
        args![run_id, step_id, approved_by, ts(at)],
    )?;
    event(
        tx,
        run_id,
        Some(step_id),
        at,
        "step_approved",
        &json!({"approved_by": approved_by}),
    )?;
    Ok(())
}

/// A new run of a runbook with these steps (id, kind), for the store's tests.
#[cfg(test)]
pub(crate) fn new_run(id: &str, steps: &[(&str, &str)]) -> Write {
    Write::CreateRun(NewRun {
        id: id.into(),
        runbook: "t".into(),
        runbook_ref: "t.yaml".into(),
        content_hash: "h".into(),
        source: "name: t".into(),
        params: json!({}),
        secret_params: vec![],
        started_at: Utc::now(),
        lock_key: None,
        steps: steps
            .iter()
            .map(|(id, uses)| ((*id).into(), (*uses).into()))
            .collect(),
        fragments: json!([]),
    })
}

#[cfg(test)]
mod decision_tests {
    use chrono::Utc;

    use super::*;
    use crate::{Durability, Store};

    /// A run waiting on its `approve` step `gate`.
    fn waiting(store: &mut Store, id: &str) {
        store
            .commit(&[
                new_run(id, &[("gate", "approve")]),
                Write::RunFinished {
                    run_id: id.into(),
                    status: RunStatus::Waiting,
                    error: None,
                    outputs: None,
                    at: Utc::now(),
                },
            ])
            .unwrap();
    }

    fn approve(id: &str) -> Write {
        Write::Approve {
            run_id: id.into(),
            step_id: "gate".into(),
            approved_by: "alice".into(),
            at: Utc::now(),
        }
    }

    fn reject(id: &str) -> Write {
        Write::Reject {
            run_id: id.into(),
            step_id: "gate".into(),
            rejected_by: "bob".into(),
            reason: "no".into(),
            at: Utc::now(),
        }
    }

    /// Whichever decision commits first, the other is refused in its own transaction: the
    /// checks `approve` and `reject` make before committing cannot see a decision racing them.
    #[test]
    fn an_approval_and_a_rejection_cannot_both_land() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_file(&dir.path().join("state.db"), Durability::Normal).unwrap();
        waiting(&mut store, "approved-first");
        store.commit(&[approve("approved-first")]).unwrap();
        let late = store.commit(&[reject("approved-first")]).unwrap_err();
        assert!(
            matches!(late, StoreError::Decided { approved: true, .. }),
            "{late}"
        );
        assert_eq!(
            store.run("approved-first").unwrap().status,
            RunStatus::Waiting
        );

        waiting(&mut store, "rejected-first");
        store.commit(&[reject("rejected-first")]).unwrap();
        let late = store.commit(&[approve("rejected-first")]).unwrap_err();
        assert!(
            matches!(
                late,
                StoreError::Decided {
                    approved: false,
                    ..
                }
            ),
            "{late}"
        );
        assert!(store.approvals("rejected-first").unwrap().is_empty());
        assert_eq!(
            store.run("rejected-first").unwrap().status,
            RunStatus::Failed
        );
    }
}
