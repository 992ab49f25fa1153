//! The run queue: runs asked for on one machine (`kmsflow run --queue`) and driven by workers
//! on others (`kmsflow worker`).
//!
//! An entry holds what a worker needs to start the run (the runbook's text, kept once under its
//! hash, and its bound parameters; never a secret), and who drives it now: a worker's claim with
//! a lease timed by the store's clock, renewed by the worker's heartbeat. A claim whose lease ran
//! out (the worker died, or stopped heartbeating) is taken by the next worker that asks, which
//! resumes the run where it stopped. Claims are made in the store's serial transaction (and on
//! PostgreSQL with `FOR UPDATE SKIP LOCKED` too), so two workers never take one entry.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::db::{Db, args};
use crate::store::{json, parse, timestamp};
use crate::write::{event, keep_source, ts};
use crate::{Store, StoreError};

/// A run to be started by a worker.
#[derive(Debug, Clone)]
pub struct NewQueued {
    /// The run's id, fixed when it is queued.
    pub id: String,
    pub queue: String,
    pub runbook: String,
    pub runbook_ref: String,
    pub content_hash: String,
    pub source: String,
    pub fragments: Value,
    /// Bound parameters; the caller refuses to queue secrets.
    pub params: Value,
    /// How to drive it (concurrency), as the engine describes it.
    pub options: Value,
    pub enqueued_at: DateTime<Utc>,
}

/// Where a queued run stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum QueueStatus {
    /// Waiting for a worker.
    Queued,
    /// A worker drives it (or did, until its lease runs out).
    Claimed,
    /// Its run ended (succeeded, failed, waits for an approval): no worker takes it again.
    Done,
    /// Quarantined: it was taken [`MAX_CLAIMS`] times and each time its worker stopped before
    /// giving it back (a run that kills the worker that runs it). No worker takes it again;
    /// `queue_poisoned` in its journal says why.
    Poisoned,
}

/// How many times a queued run is taken by a worker that then stops (its claim runs out)
/// before it is quarantined instead of taken again: a run that crashes every worker must not
/// take the whole pool down, one worker after another.
pub const MAX_CLAIMS: i64 = 3;

impl QueueStatus {
    fn as_str(self) -> &'static str {
        match self {
            QueueStatus::Queued => "queued",
            QueueStatus::Claimed => "claimed",
            QueueStatus::Done => "done",
            QueueStatus::Poisoned => "poisoned",
        }
    }
}

impl std::str::FromStr for QueueStatus {
    type Err = String;
    fn from_str(text: &str) -> Result<QueueStatus, String> {
        match text {
            "queued" => Ok(QueueStatus::Queued),
            "claimed" => Ok(QueueStatus::Claimed),
            "done" => Ok(QueueStatus::Done),
            "poisoned" => Ok(QueueStatus::Poisoned),
            other => Err(format!("unknown queue status `{other}`")),
        }
    }
}

/// A queued run as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct QueuedRun {
    pub id: String,
    pub queue: String,
    pub runbook: String,
    pub runbook_ref: String,
    #[serde(skip)]
    pub source: String,
    #[serde(skip)]
    pub fragments: Value,
    pub params: Value,
    pub options: Value,
    pub status: QueueStatus,
    pub claimed_by: Option<String>,
    /// How many times a worker took it (a second means the first worker stopped).
    pub claims: i64,
    pub enqueued_at: DateTime<Utc>,
}

const QUEUED_COLUMNS: &str = "q.id, q.queue, q.runbook, q.runbook_ref, s.source, s.fragments, \
     q.params, q.options, q.status, q.claimed_by, q.claims, q.enqueued_at";

fn queued_from_row(row: &crate::db::Row<'_>) -> Result<QueuedRun, StoreError> {
    Ok(QueuedRun {
        id: row.get(0)?,
        queue: row.get(1)?,
        runbook: row.get(2)?,
        runbook_ref: row.get(3)?,
        source: row.get(4)?,
        fragments: json(row.get(5)?, "runbook_sources.fragments")?,
        params: json(row.get(6)?, "run_queue.params")?,
        options: json(row.get(7)?, "run_queue.options")?,
        status: parse(row.get(8)?, "run_queue.status")?,
        claimed_by: row.get(9)?,
        claims: row.get(10)?,
        enqueued_at: timestamp(row.get(11)?, "run_queue.enqueued_at")?,
    })
}

pub(crate) fn enqueue(tx: &mut Db<'_>, queued: &NewQueued) -> Result<(), StoreError> {
    keep_source(tx, &queued.content_hash, &queued.source, &queued.fragments)?;
    tx.execute(
        "INSERT INTO run_queue (id, queue, runbook, runbook_ref, content_hash, params, options,
                                status, claims, enqueued_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'queued', 0, ?8)",
        args![
            queued.id,
            queued.queue,
            queued.runbook,
            queued.runbook_ref,
            queued.content_hash,
            queued.params.to_string(),
            queued.options.to_string(),
            ts(&queued.enqueued_at)
        ],
    )?;
    event(
        tx,
        &queued.id,
        None,
        &queued.enqueued_at,
        "run_queued",
        &json!({"queue": queued.queue, "runbook_ref": queued.runbook_ref}),
    )
}

/// Renews `worker`'s claim on `id`; fails with [`StoreError::LeaseLost`] when another worker
/// took it (the lease ran out first).
pub(crate) fn heartbeat(
    tx: &mut Db<'_>,
    id: &str,
    worker: &str,
    lease: chrono::Duration,
) -> Result<(), StoreError> {
    let expires = tx.now()? + lease;
    let renewed = tx.execute(
        "UPDATE run_queue SET lease_expires_at = ?3
         WHERE id = ?1 AND claimed_by = ?2 AND status = 'claimed'",
        args![id, worker, ts(&expires)],
    )?;
    if renewed == 1 {
        return Ok(());
    }
    let holder: Option<Option<String>> = tx.query_opt(
        "SELECT claimed_by FROM run_queue WHERE id = ?1",
        args![id],
        |row| row.get(0),
    )?;
    Err(StoreError::LeaseLost {
        key: format!("queue/{id}"),
        run_id: id.to_owned(),
        why: "the worker's claim on the queued run ran out".into(),
        taken_by: holder.flatten().filter(|holder| holder != worker),
    })
}

/// Gives up `worker`'s claim: `done` when the run ended, otherwise back to the queue for the
/// next worker (a drain, a lock another run holds).
pub(crate) fn release(
    tx: &mut Db<'_>,
    id: &str,
    worker: &str,
    done: bool,
    error: Option<&str>,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let status = if done {
        QueueStatus::Done
    } else {
        QueueStatus::Queued
    };
    let released = tx.execute(
        "UPDATE run_queue SET status = ?3, claimed_by = NULL, lease_expires_at = NULL
         WHERE id = ?1 AND claimed_by = ?2",
        args![id, worker, status.as_str()],
    )?;
    if released == 1 {
        event(
            tx,
            id,
            None,
            at,
            if done { "queue_done" } else { "queue_released" },
            &json!({"worker": worker, "error": error}),
        )?;
    }
    Ok(())
}

pub(crate) fn requeue(tx: &mut Db<'_>, id: &str, at: &DateTime<Utc>) -> Result<(), StoreError> {
    let requeued = tx.execute(
        "UPDATE run_queue SET status = 'queued' WHERE id = ?1 AND status = 'done'",
        args![id],
    )?;
    if requeued == 1 {
        event(tx, id, None, at, "run_requeued", &json!({}))?;
    }
    Ok(())
}

/// How a queued run ended, once a worker is done with it.
#[derive(Debug, Clone, PartialEq)]
pub enum QueuedEnd {
    /// Its run, as the worker left it.
    Ran(Box<crate::RunRecord>),
    /// No run was made: the worker could not start it, and said why (or it is in no queue);
    /// or it was quarantined ([`QueueStatus::Poisoned`]), whatever its run shows.
    NotStarted { error: Option<String> },
}

impl Store {
    /// How queued run `id` ended; `None` while it waits for a worker or a worker drives it.
    pub fn queued_end(&self, id: &str) -> Result<Option<QueuedEnd>, StoreError> {
        let Some(entry) = self.queued(id)? else {
            return Ok(Some(QueuedEnd::NotStarted {
                error: Some(format!("`{id}` is in no queue")),
            }));
        };
        if entry.status == QueueStatus::Poisoned {
            return Ok(Some(QueuedEnd::NotStarted {
                error: Some(self.quarantine_reason(id)?),
            }));
        }
        if entry.status != QueueStatus::Done {
            return Ok(None);
        }
        let ran: bool = self.db().query_one(
            "SELECT EXISTS (SELECT 1 FROM runs WHERE id = ?1)",
            args![id],
            |row| row.get(0),
        )?;
        if ran {
            return Ok(Some(QueuedEnd::Ran(Box::new(self.run(id)?))));
        }
        let error = self
            .events(id)?
            .into_iter()
            .rev()
            .find(|e| e.kind == "queue_done")
            .and_then(|e| e.detail["error"].as_str().map(str::to_owned));
        Ok(Some(QueuedEnd::NotStarted { error }))
    }

    /// Why queued run `id` was quarantined, as its journal says (`queue_poisoned`).
    pub fn quarantine_reason(&self, id: &str) -> Result<String, StoreError> {
        Ok(self
            .events(id)?
            .into_iter()
            .rev()
            .find(|e| e.kind == "queue_poisoned")
            .and_then(|e| e.detail["reason"].as_str().map(str::to_owned))
            .unwrap_or_else(|| "quarantined: its workers stopped while they ran it".into()))
    }

    /// Which of `ids` have ended as far as the queue tells (their entry is done, or there is
    /// none): one query for all of a rollout's targets in flight, where [`Store::queued_end`]
    /// then reads how each ended.
    pub fn queued_ended(&self, ids: &[String]) -> Result<Vec<String>, StoreError> {
        let ids_json = serde_json::to_string(ids).expect("strings serialize");
        let elements = if self.backend_name() == "postgres" {
            "SELECT value FROM jsonb_array_elements_text(?1::text::jsonb) AS e(value)"
        } else {
            "SELECT value FROM json_each(?1)"
        };
        self.db().query(
            &format!(
                "SELECT value FROM ({elements}) AS asked
                  WHERE NOT EXISTS (SELECT 1 FROM run_queue q
                                     WHERE q.id = asked.value
                                       AND q.status NOT IN ('done', 'poisoned'))"
            ),
            args![ids_json],
            |row| row.get(0),
        )
    }

    /// Claims up to `max` runs of `queue` for `worker` for `lease`: entries waiting, and
    /// entries whose claim ran out (their worker stopped). Oldest first.
    pub fn claim_queued(
        &mut self,
        queue: &str,
        worker: &str,
        lease: chrono::Duration,
        max: usize,
    ) -> Result<Vec<QueuedRun>, StoreError> {
        let postgres = self.backend_name() == "postgres";
        // The store's serial transaction, on both backends: the claim's journal entries take
        // their sequence numbers in commit order, as every entry must (a process watching for
        // `cancel_requested` after a sequence number would otherwise miss one). On PostgreSQL
        // the rows are also locked with SKIP LOCKED, so the claim stays right for any writer
        // that does not take the store's lock.
        self.db().transaction(|tx| {
            let now = tx.now()?;
            let lock = if postgres {
                "FOR UPDATE SKIP LOCKED"
            } else {
                ""
            };
            // Entries whose last worker stopped holding them, taken too often already: held
            // back from every worker, with the reason in their journal.
            let poisoned: Vec<(String, i64, Option<String>)> = tx.query(
                &format!(
                    "SELECT id, claims, claimed_by FROM run_queue
                     WHERE queue = ?1 AND status = 'claimed' AND lease_expires_at <= ?2
                       AND claims >= ?3
                     ORDER BY enqueued_at, id {lock}"
                ),
                args![queue, ts(&now), MAX_CLAIMS],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?)),
            )?;
            for (id, claims, last) in poisoned {
                tx.execute(
                    "UPDATE run_queue SET status = 'poisoned', claimed_by = NULL,
                         lease_expires_at = NULL
                     WHERE id = ?1",
                    args![id],
                )?;
                let reason = format!(
                    "taken by a worker {claims} times, and each time the worker stopped before it gave the run back (last: {}): it may crash the worker that runs it, so no worker takes it again; look at the workers' logs, then `kmsflow resume {id}` runs it here, in the foreground, or `kmsflow rollback {id}` undoes what it did",
                    last.as_deref().unwrap_or("unknown")
                );
                event(
                    tx,
                    &id,
                    None,
                    &now,
                    "queue_poisoned",
                    &json!({"claims": claims, "reason": reason}),
                )?;
            }
            let ids: Vec<String> = tx.query(
                &format!(
                    "SELECT id FROM run_queue
                     WHERE queue = ?1 AND (status = 'queued'
                           OR (status = 'claimed' AND lease_expires_at <= ?2))
                     ORDER BY enqueued_at, id LIMIT ?3 {lock}"
                ),
                args![queue, ts(&now), max as i64],
                |row| row.get(0),
            )?;
            let expires = ts(&(now + lease));
            let mut claimed = Vec::with_capacity(ids.len());
            for id in ids {
                tx.execute(
                    "UPDATE run_queue SET status = 'claimed', claimed_by = ?2,
                         lease_expires_at = ?3, claims = claims + 1
                     WHERE id = ?1",
                    args![id, worker, expires],
                )?;
                event(
                    tx,
                    &id,
                    None,
                    &now,
                    "queue_claimed",
                    &json!({"worker": worker}),
                )?;
                claimed.extend(tx.query_opt(
                    &format!(
                        "SELECT {QUEUED_COLUMNS} FROM run_queue q
                         JOIN runbook_sources s ON s.content_hash = q.content_hash
                         WHERE q.id = ?1"
                    ),
                    args![id],
                    queued_from_row,
                )?);
            }
            Ok(claimed)
        })
    }

    /// Queued runs no worker has made a run of yet (waiting, or taken and starting), newest
    /// first, at most `limit`: what `kmsflow runs` shows before the runs. A distributed
    /// rollout's drive and its targets are shown with their rollout instead.
    pub fn queued_not_started(&self, limit: usize) -> Result<Vec<QueuedRun>, StoreError> {
        self.db().query(
            &format!(
                "SELECT {QUEUED_COLUMNS} FROM run_queue q
                 JOIN runbook_sources s ON s.content_hash = q.content_hash
                 WHERE q.status <> 'done'
                   AND NOT EXISTS (SELECT 1 FROM runs r WHERE r.id = q.id)
                   AND NOT EXISTS (SELECT 1 FROM rollouts o WHERE o.id = q.id)
                   AND NOT EXISTS (SELECT 1 FROM rollout_targets t WHERE t.queued_as = q.id)
                 ORDER BY q.enqueued_at DESC, q.id DESC LIMIT ?1"
            ),
            args![limit as i64],
            queued_from_row,
        )
    }

    /// One queued run, by its run id.
    pub fn queued(&self, id: &str) -> Result<Option<QueuedRun>, StoreError> {
        self.db().query_opt(
            &format!(
                "SELECT {QUEUED_COLUMNS} FROM run_queue q
                 JOIN runbook_sources s ON s.content_hash = q.content_hash WHERE q.id = ?1"
            ),
            args![id],
            queued_from_row,
        )
    }
}
