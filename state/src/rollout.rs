//! Rollouts: one runbook run once per target, each target's run an ordinary run of its own.
//!
//! A rollout's own record holds what it was asked (runbook, shared parameters, policy, the
//! targets and their waves); how each target stands is its child run's status, read through
//! the link, never copied. Its journal is the `events` table under the rollout's id.

use crate::db::{Db, Row, args};
use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::{Value, json};

use crate::error::corrupt;
use crate::records::RunStatus;
use crate::store::{json, opt_timestamp, parse, timestamp};
use crate::write::{event, keep_source, ts};
use crate::{Store, StoreError};

/// A rollout as created, before any target starts.
#[derive(Debug, Clone)]
pub struct NewRollout {
    pub id: String,
    pub runbook: String,
    pub runbook_ref: String,
    pub content_hash: String,
    pub source: String,
    pub fragments: Value,
    /// The parameters every target shares, without secrets.
    pub params: Value,
    pub secret_params: Vec<String>,
    /// Concurrency, error budget, waves and gates, as the engine describes them.
    pub policy: Value,
    pub started_at: DateTime<Utc>,
    pub targets: Vec<NewTarget>,
}

/// One target of a new rollout.
#[derive(Debug, Clone)]
pub struct NewTarget {
    /// How people name it (`resource_group/cluster`).
    pub label: String,
    /// Its bound parameters (shared ones included), without secrets.
    pub params: Value,
    /// Its wave, from 1.
    pub wave: u32,
}

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutRecord {
    pub id: String,
    pub runbook: String,
    pub runbook_ref: String,
    pub content_hash: String,
    /// The runbook text (and its fragments), kept once under its hash.
    #[serde(skip)]
    pub source: String,
    #[serde(skip)]
    pub fragments: Value,
    pub params: Value,
    pub secret_params: Vec<String>,
    pub policy: Value,
    pub status: RunStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub targets: usize,
}

/// One target of a rollout, with how its run stands.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RolloutTargetRecord {
    /// Its row in the targets, from 0.
    pub position: usize,
    pub label: String,
    pub params: Value,
    pub wave: u32,
    /// Its run, once started.
    pub run_id: Option<String>,
    /// The id its run was queued under for a worker (a distributed rollout), before the
    /// worker started it.
    pub queued_as: Option<String>,
    pub status: Option<RunStatus>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    /// The step its run is in, or failed at.
    pub step: Option<String>,
}

/// Rollout ids are told from run ids by this prefix.
pub const ROLLOUT_PREFIX: &str = "rollout-";

pub(crate) fn create_rollout(tx: &mut Db<'_>, rollout: &NewRollout) -> Result<(), StoreError> {
    keep_source(
        tx,
        &rollout.content_hash,
        &rollout.source,
        &rollout.fragments,
    )?;
    tx.execute(
        "INSERT INTO rollouts (id, runbook, runbook_ref, content_hash, params, secret_params,
                               policy, status, started_at)
         VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, 'running', ?8)",
        args![
            rollout.id,
            rollout.runbook,
            rollout.runbook_ref,
            rollout.content_hash,
            rollout.params.to_string(),
            serde_json::to_string(&rollout.secret_params).expect("strings serialize"),
            rollout.policy.to_string(),
            ts(&rollout.started_at),
        ],
    )?;
    for (position, target) in rollout.targets.iter().enumerate() {
        tx.execute(
            "INSERT INTO rollout_targets (rollout_id, position, label, params, wave)
             VALUES (?1, ?2, ?3, ?4, ?5)",
            args![
                rollout.id,
                position as i64,
                target.label,
                target.params.to_string(),
                i64::from(target.wave)
            ],
        )?;
    }
    event(
        tx,
        &rollout.id,
        None,
        &rollout.started_at,
        "rollout_created",
        &json!({"runbook": rollout.runbook, "runbook_ref": rollout.runbook_ref,
                "targets": rollout.targets.len(), "policy": rollout.policy}),
    )
}

/// Links a target to its run: committed with the run's creation.
pub(crate) fn target_started(
    tx: &mut Db<'_>,
    rollout_id: &str,
    position: usize,
    run_id: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let linked = tx.execute(
        "UPDATE rollout_targets SET run_id = ?3
             WHERE rollout_id = ?1 AND position = ?2 AND run_id IS NULL
               AND (queued_as IS NULL OR queued_as = ?3)",
        args![rollout_id, position as i64, run_id],
    )?;
    if linked != 1 {
        // A target runs once: a second driver that got this far would have to have taken the
        // rollout's lock, so this is a bug, and the run's creation is refused with it.
        return Err(corrupt(
            "rollout_targets.run_id",
            format!("target {position} of rollout `{rollout_id}` has a run already"),
        ));
    }
    event(
        tx,
        rollout_id,
        None,
        at,
        "target_started",
        &json!({"position": position, "run_id": run_id}),
    )
}

pub(crate) fn target_queued(
    tx: &mut Db<'_>,
    rollout_id: &str,
    position: usize,
    run_id: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let queued = tx.execute(
        "UPDATE rollout_targets SET queued_as = ?3
             WHERE rollout_id = ?1 AND position = ?2 AND run_id IS NULL AND queued_as IS NULL",
        args![rollout_id, position as i64, run_id],
    )?;
    if queued != 1 {
        // As for a second run: a second driver would have had to take the rollout's lock,
        // and the fencing check before this write refuses a driver that lost it.
        return Err(corrupt(
            "rollout_targets.queued_as",
            format!("target {position} of rollout `{rollout_id}` was queued or started already"),
        ));
    }
    event(
        tx,
        rollout_id,
        None,
        at,
        "target_queued",
        &json!({"position": position, "run_id": run_id}),
    )
}

pub(crate) fn rollout_status(
    tx: &mut Db<'_>,
    rollout_id: &str,
    status: RunStatus,
    error: &Option<String>,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let finished =
        (status != RunStatus::Running && status != RunStatus::RollingBack).then(|| ts(at));
    tx.execute(
        "UPDATE rollouts SET status = ?2, error = ?3, finished_at = ?4 WHERE id = ?1",
        args![rollout_id, status.as_str(), error, finished],
    )?;
    event(
        tx,
        rollout_id,
        None,
        at,
        match status {
            RunStatus::Running => "rollout_running",
            RunStatus::RollingBack => "rollout_rolling_back",
            _ => "rollout_finished",
        },
        &json!({"status": status, "error": error}),
    )
}

/// Records a wave's approval: only while the rollout waits at that wave's gate, once.
pub(crate) fn approve_wave(
    tx: &mut Db<'_>,
    rollout_id: &str,
    wave: u32,
    approved_by: &str,
    at: &DateTime<Utc>,
) -> Result<(), StoreError> {
    let gate = format!("wave-{wave}");
    let status: Option<String> = tx.query_opt(
        "SELECT status FROM rollouts WHERE id = ?1",
        args![rollout_id],
        |row| row.get(0),
    )?;
    let status = status.ok_or_else(|| StoreError::RunNotFound(rollout_id.to_owned()))?;
    let approved: bool = tx.query_one(
        "SELECT count(*) > 0 FROM approvals WHERE run_id = ?1 AND step_id = ?2",
        args![rollout_id, gate],
        |row| row.get(0),
    )?;
    if status != RunStatus::Waiting.as_str() || approved {
        return Err(StoreError::Decided {
            run_id: rollout_id.to_owned(),
            step_id: gate,
            status,
            approved,
        });
    }
    tx.execute(
        "INSERT INTO approvals (run_id, step_id, approved_by, approved_at) VALUES (?1, ?2, ?3, ?4)",
        args![rollout_id, gate, approved_by, ts(at)],
    )?;
    event(
        tx,
        rollout_id,
        Some(&gate),
        at,
        "wave_approved",
        &json!({"wave": wave, "approved_by": approved_by}),
    )
}

const ROLLOUT_COLUMNS: &str = "id, runbook, runbook_ref, content_hash, \
     (SELECT source FROM runbook_sources WHERE runbook_sources.content_hash = rollouts.content_hash), \
     (SELECT fragments FROM runbook_sources WHERE runbook_sources.content_hash = rollouts.content_hash), \
     params, secret_params, policy, status, started_at, finished_at, error, \
     (SELECT count(*) FROM rollout_targets WHERE rollout_targets.rollout_id = rollouts.id)";

fn rollout_from_row(row: &Row<'_>) -> Result<RolloutRecord, StoreError> {
    Ok(RolloutRecord {
        id: row.get(0)?,
        runbook: row.get(1)?,
        runbook_ref: row.get(2)?,
        content_hash: row.get(3)?,
        source: row.get(4)?,
        fragments: json(row.get::<String>(5)?, "runbook_sources.fragments")?,
        params: json(row.get::<String>(6)?, "rollouts.params")?,
        secret_params: serde_json::from_str(&row.get::<String>(7)?)
            .map_err(|e| corrupt("rollouts.secret_params", e))?,
        policy: json(row.get::<String>(8)?, "rollouts.policy")?,
        status: parse(row.get::<String>(9)?, "rollouts.status")?,
        started_at: timestamp(row.get::<String>(10)?, "rollouts.started_at")?,
        finished_at: opt_timestamp(row.get(11)?, "rollouts.finished_at")?,
        error: row.get(12)?,
        targets: row.get::<i64>(13)? as usize,
    })
}

impl Store {
    /// Resolves a full rollout id or a unique prefix of one.
    pub fn resolve_rollout_id(&self, id_or_prefix: &str) -> Result<String, StoreError> {
        let candidates: Vec<String> = self.db().query(
            "SELECT id FROM rollouts WHERE id = ?1
             UNION ALL
             SELECT id FROM (SELECT id FROM rollouts WHERE substr(id, 1, length(?1)) = ?1
                             AND id <> ?1 ORDER BY id LIMIT 6) AS prefixed",
            args![id_or_prefix],
            |row| row.get(0),
        )?;
        match candidates.as_slice() {
            [] => Err(StoreError::RunNotFound(id_or_prefix.to_owned())),
            [only] => Ok(only.clone()),
            [exact, ..] if exact == id_or_prefix => Ok(exact.clone()),
            _ => Err(StoreError::AmbiguousRunId {
                prefix: id_or_prefix.to_owned(),
                candidates,
            }),
        }
    }

    /// One rollout, by exact id.
    pub fn rollout(&self, rollout_id: &str) -> Result<RolloutRecord, StoreError> {
        self.db()
            .query_opt(
                &format!("SELECT {ROLLOUT_COLUMNS} FROM rollouts WHERE id = ?1"),
                args![rollout_id],
                rollout_from_row,
            )?
            .ok_or_else(|| StoreError::RunNotFound(rollout_id.to_owned()))
    }

    /// The most recent rollouts first, at most `limit`.
    pub fn rollouts(&self, limit: usize) -> Result<Vec<RolloutRecord>, StoreError> {
        self.db().query(
            &format!(
                "SELECT {ROLLOUT_COLUMNS} FROM rollouts ORDER BY started_at DESC, id DESC LIMIT ?1"
            ),
            args![limit as i64],
            rollout_from_row,
        )
    }

    /// A rollout's targets in their order, each with its run's status and current step.
    pub fn rollout_targets(
        &self,
        rollout_id: &str,
    ) -> Result<Vec<RolloutTargetRecord>, StoreError> {
        self.db().query(
            "SELECT t.position, t.label, t.params, t.wave, t.run_id, r.status, r.started_at,
                    r.finished_at, r.error,
                    (SELECT s.step_id FROM steps s WHERE s.run_id = t.run_id
                       AND s.status IN ('running', 'failed') ORDER BY s.position LIMIT 1),
                    t.queued_as
             FROM rollout_targets t LEFT JOIN runs r ON r.id = t.run_id
             WHERE t.rollout_id = ?1 ORDER BY t.position",
            args![rollout_id],
            |row| {
                Ok(RolloutTargetRecord {
                    position: row.get::<i64>(0)? as usize,
                    label: row.get(1)?,
                    params: json(row.get::<String>(2)?, "rollout_targets.params")?,
                    wave: row.get(3)?,
                    run_id: row.get(4)?,
                    status: row
                        .get::<Option<String>>(5)?
                        .map(|s| parse(s, "runs.status"))
                        .transpose()?,
                    started_at: opt_timestamp(row.get(6)?, "runs.started_at")?,
                    finished_at: opt_timestamp(row.get(7)?, "runs.finished_at")?,
                    error: row.get(8)?,
                    step: row.get(9)?,
                    queued_as: row.get(10)?,
                })
            },
        )
    }
}

/// What withdrawing a rollout's queued targets found.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Withdrawn {
    /// Targets taken back from the queue before any worker started them.
    pub withdrawn: usize,
    /// Targets a live worker holds (starting or running their run): `(label, worker)`.
    pub held: Vec<(String, String)>,
}

impl Store {
    /// Takes back from the queue every target of `rollout_id` whose run waits there for a
    /// worker (never started, or put back by a drained worker), or whose worker's claim ran
    /// out: a rollback must not be followed by a worker starting or resuming one of them.
    /// Targets a live worker holds are left and named.
    pub fn withdraw_queued_targets(&mut self, rollout_id: &str) -> Result<Withdrawn, StoreError> {
        self.db().transaction(|tx| {
            let now = tx.now()?;
            struct Waiting {
                label: String,
                id: String,
                status: String,
                worker: Option<String>,
                expires: Option<String>,
            }
            let waiting: Vec<Waiting> = tx.query(
                "SELECT t.label, q.id, q.status, q.claimed_by, q.lease_expires_at
                 FROM rollout_targets t JOIN run_queue q ON q.id = t.queued_as
                 WHERE t.rollout_id = ?1 AND q.status NOT IN ('done', 'poisoned')
                 ORDER BY t.position",
                args![rollout_id],
                |row| {
                    Ok(Waiting {
                        label: row.get(0)?,
                        id: row.get(1)?,
                        status: row.get(2)?,
                        worker: row.get(3)?,
                        expires: row.get(4)?,
                    })
                },
            )?;
            let mut found = Withdrawn::default();
            for Waiting {
                label,
                id,
                status,
                worker,
                expires,
            } in waiting
            {
                let live = status == "claimed"
                    && expires
                        .map(|e| timestamp(e, "run_queue.lease_expires_at"))
                        .transpose()?
                        .is_some_and(|expires| expires > now);
                if live {
                    found.held.push((label, worker.unwrap_or_default()));
                    continue;
                }
                tx.execute(
                    "UPDATE run_queue SET status = 'done', claimed_by = NULL, lease_expires_at = NULL
                     WHERE id = ?1",
                    args![id],
                )?;
                event(
                    tx,
                    &id,
                    None,
                    &now,
                    "queue_done",
                    &json!({"worker": null, "error": "withdrawn: its rollout is rolled back"}),
                )?;
                found.withdrawn += 1;
            }
            Ok(found)
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::write::new_run;
    use crate::{Durability, Write};

    fn rollout(id: &str, targets: usize) -> Write {
        Write::CreateRollout(NewRollout {
            id: id.into(),
            runbook: "t".into(),
            runbook_ref: "t.yaml".into(),
            content_hash: "h".into(),
            source: "name: t".into(),
            fragments: json!([]),
            params: json!({}),
            secret_params: vec![],
            policy: json!({"concurrency": 2}),
            started_at: Utc::now(),
            targets: (0..targets)
                .map(|i| NewTarget {
                    label: format!("rg/aks-{i}"),
                    params: json!({"cluster": format!("aks-{i}")}),
                    wave: 1 + i as u32 / 2,
                })
                .collect(),
        })
    }

    #[test]
    fn a_target_is_linked_to_one_run_in_the_runs_own_creation() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_file(&dir.path().join("s.db"), Durability::Normal).unwrap();
        store.commit(&[rollout("rollout-a", 3)]).unwrap();
        let link = |position, run: &str| Write::RolloutTargetStarted {
            rollout_id: "rollout-a".into(),
            position,
            run_id: run.into(),
            at: Utc::now(),
        };
        store
            .commit(&[new_run("run-1", &[("s", "noop")]), link(1, "run-1")])
            .unwrap();
        // A second run for the same target is refused, and so is its creation: all or nothing.
        assert!(
            store
                .commit(&[new_run("run-2", &[("s", "noop")]), link(1, "run-2")])
                .is_err()
        );
        assert!(
            store.run("run-2").is_err(),
            "the refused run was not created"
        );
        let targets = store.rollout_targets("rollout-a").unwrap();
        assert_eq!(targets.len(), 3);
        assert_eq!(targets[1].run_id.as_deref(), Some("run-1"));
        assert_eq!(targets[1].status, Some(RunStatus::Running));
        assert_eq!(targets[0].run_id, None);
        assert_eq!(targets[2].wave, 2);
        let record = store.rollout("rollout-a").unwrap();
        assert_eq!((record.targets, record.status), (3, RunStatus::Running));
        assert_eq!(record.source, "name: t");
        assert_eq!(store.resolve_rollout_id("rollout-").unwrap(), "rollout-a");
    }

    #[test]
    fn a_wave_is_approved_only_while_the_rollout_waits_and_only_once() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_file(&dir.path().join("s.db"), Durability::Normal).unwrap();
        store.commit(&[rollout("rollout-b", 4)]).unwrap();
        let approve = || Write::ApproveWave {
            rollout_id: "rollout-b".into(),
            wave: 2,
            approved_by: "ana".into(),
            at: Utc::now(),
        };
        assert!(matches!(
            store.commit(&[approve()]),
            Err(StoreError::Decided { .. })
        ));
        store
            .commit(&[Write::RolloutStatus {
                rollout_id: "rollout-b".into(),
                status: RunStatus::Waiting,
                error: None,
                at: Utc::now(),
            }])
            .unwrap();
        store.commit(&[approve()]).unwrap();
        assert!(matches!(
            store.commit(&[approve()]),
            Err(StoreError::Decided { approved: true, .. })
        ));
        let approvals = store.approvals("rollout-b").unwrap();
        assert_eq!(approvals.len(), 1);
        assert_eq!(approvals[0].step_id, "wave-2");
    }
}
