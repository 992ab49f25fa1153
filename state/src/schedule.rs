//! Schedules and their fires.

use chrono::{DateTime, Utc};
use serde::Serialize;
use serde_json::Value;

use crate::db::args;
use crate::store::timestamp;
use crate::write::ts;
use crate::{FireOutcome, Overlap, Store, StoreError};

/// A schedule as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ScheduleRecord {
    pub name: String,
    /// A runbook path or bundled name.
    pub runbook: String,
    /// Parameters (never secrets).
    pub params: Value,
    /// A targets file: a fleet check (`rotation-check`), or a rollout of the runbook.
    pub targets: Option<String>,
    /// A rollout's rate control (concurrency, error budget, waves, gate), as the engine
    /// describes it; `None` for one run or a fleet check.
    pub policy: Option<Value>,
    /// Where to find the fleet in Azure at each fire (subscriptions, filters, per-target
    /// parameters), instead of `targets`.
    pub discover: Option<Value>,
    /// The queue whose workers its fires go to (a run queued, a rollout's targets shared
    /// out); `None`: the daemon runs them itself.
    pub queue: Option<String>,
    pub cron: String,
    pub overlap: Overlap,
    pub catchup_ms: i64,
    pub jitter_ms: i64,
    /// Where notifications go. For Slack and Teams the URL is the credential: kept here to be
    /// used, and shown (serialized) only as its origin and `/***`.
    #[serde(serialize_with = "masked_url")]
    pub webhook: Option<String>,
    pub paused: bool,
    pub created_at: DateTime<Utc>,
    /// The latest occurrence already considered (fired, skipped or missed).
    pub last_seen_at: DateTime<Utc>,
    /// The worst severity of the latest finished run, for recovery notifications.
    pub last_worst: Option<String>,
}

/// One occurrence of a schedule, and what became of it.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FireRecord {
    pub schedule: String,
    pub occurrence: DateTime<Utc>,
    pub fired_at: DateTime<Utc>,
    /// `started`, `skipped` or `missed`.
    pub outcome: FireOutcome,
    pub run_id: Option<String>,
    pub detail: Option<Value>,
}

/// A URL as it may be shown: its scheme and host, the rest masked.
pub fn mask_url(url: &str) -> String {
    let (scheme, rest) = url.split_once("://").unwrap_or(("", url));
    let host = rest.split(['/', '?', '#']).next().unwrap_or_default();
    // Credentials in the authority (`user:pass@host`) are masked too.
    let host = host.rsplit('@').next().unwrap_or_default();
    format!("{scheme}://{host}/***")
}

fn masked_url<S: serde::Serializer>(
    url: &Option<String>,
    serializer: S,
) -> Result<S::Ok, S::Error> {
    match url {
        Some(url) => serializer.serialize_str(&mask_url(url)),
        None => serializer.serialize_none(),
    }
}

impl Store {
    /// Adds a schedule; an existing name is an error.
    pub fn add_schedule(&mut self, schedule: &ScheduleRecord) -> Result<bool, StoreError> {
        let inserted = self.db().execute(
            "INSERT INTO schedules (name, runbook, params, targets, cron, overlap, catchup_ms, jitter_ms,
                 webhook, paused, created_at, last_seen_at, policy, discover, queue)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9, ?10, ?11, ?12, ?13, ?14, ?15)
             ON CONFLICT (name) DO NOTHING",
            args![
                schedule.name,
                schedule.runbook,
                schedule.params.to_string(),
                schedule.targets,
                schedule.cron,
                schedule.overlap.as_str(),
                schedule.catchup_ms,
                schedule.jitter_ms,
                schedule.webhook,
                i64::from(schedule.paused),
                ts(&schedule.created_at),
                ts(&schedule.last_seen_at),
                schedule.policy.as_ref().map(Value::to_string),
                schedule.discover.as_ref().map(Value::to_string),
                schedule.queue,
            ],
        )?;
        Ok(inserted == 1)
    }

    /// Every schedule, by name.
    pub fn schedules(&self) -> Result<Vec<ScheduleRecord>, StoreError> {
        self.db().query(
            "SELECT name, runbook, params, targets, cron, overlap, catchup_ms, jitter_ms, webhook, paused,
                    created_at, last_seen_at, last_worst, policy, discover, queue
             FROM schedules ORDER BY name",
            args![],
            |row| {
                Ok(ScheduleRecord {
                    name: row.get(0)?,
                    runbook: row.get(1)?,
                    params: serde_json::from_str(&row.get::<String>(2)?)
                        .map_err(|e| crate::error::corrupt("schedules.params", e))?,
                    targets: row.get(3)?,
                    cron: row.get(4)?,
                    overlap: crate::store::parse(row.get(5)?, "schedules.overlap")?,
                    catchup_ms: row.get(6)?,
                    jitter_ms: row.get(7)?,
                    webhook: row.get(8)?,
                    paused: row.get(9)?,
                    created_at: timestamp(row.get(10)?, "schedules.created_at")?,
                    last_seen_at: timestamp(row.get(11)?, "schedules.last_seen_at")?,
                    last_worst: row.get(12)?,
                    policy: row
                        .get::<Option<String>>(13)?
                        .map(|p| serde_json::from_str(&p))
                        .transpose()
                        .map_err(|e| crate::error::corrupt("schedules.policy", e))?,
                    discover: row
                        .get::<Option<String>>(14)?
                        .map(|d| serde_json::from_str(&d))
                        .transpose()
                        .map_err(|e| crate::error::corrupt("schedules.discover", e))?,
                    queue: row.get(15)?,
                })
            },
        )
    }

    /// Removes a schedule (its history stays); whether it existed.
    pub fn remove_schedule(&mut self, name: &str) -> Result<bool, StoreError> {
        Ok(self
            .db()
            .execute("DELETE FROM schedules WHERE name = ?1", args![name])?
            == 1)
    }

    /// Pauses or resumes a schedule; whether it existed.
    pub fn set_schedule_paused(&mut self, name: &str, paused: bool) -> Result<bool, StoreError> {
        Ok(self.db().execute(
            "UPDATE schedules SET paused = ?2 WHERE name = ?1",
            args![name, i64::from(paused)],
        )? == 1)
    }

    /// Claims an occurrence for this process: true when no one (no other daemon) had.
    pub fn claim_fire(&mut self, fire: &FireRecord) -> Result<bool, StoreError> {
        self.db().transaction(|tx| {
            let claimed = tx.execute(
                "INSERT INTO schedule_fires (schedule, occurrence, fired_at, outcome, run_id, detail)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (schedule, occurrence) DO NOTHING",
                args![
                    fire.schedule,
                    ts(&fire.occurrence),
                    ts(&fire.fired_at),
                    fire.outcome.as_str(),
                    fire.run_id,
                    fire.detail.as_ref().map(Value::to_string),
                ],
            )? == 1;
            // Whoever claims or not, the occurrence has been seen.
            tx.execute(
                "UPDATE schedules
                 SET last_seen_at = CASE WHEN last_seen_at > ?2 THEN last_seen_at ELSE ?2 END
                 WHERE name = ?1",
                args![fire.schedule, ts(&fire.occurrence)],
            )?;
            Ok(claimed)
        })
    }

    /// Turns a `buffered` occurrence into a `started` one; whether there was one to turn.
    pub fn promote_buffered_fire(&mut self, fire: &FireRecord) -> Result<bool, StoreError> {
        Ok(self.db().execute(
            "UPDATE schedule_fires SET outcome = 'claimed', run_id = ?3, fired_at = ?4
             WHERE schedule = ?1 AND occurrence = ?2 AND outcome = 'buffered'",
            args![
                fire.schedule,
                ts(&fire.occurrence),
                fire.run_id,
                ts(&fire.fired_at)
            ],
        )? == 1)
    }

    /// Records how a fired run ended.
    pub fn finish_fire(
        &mut self,
        schedule: &str,
        occurrence: DateTime<Utc>,
        detail: &Value,
        worst: Option<&str>,
    ) -> Result<(), StoreError> {
        self.db().transaction(|tx| {
            tx.execute(
                "UPDATE schedule_fires SET detail = ?3 WHERE schedule = ?1 AND occurrence = ?2",
                args![schedule, ts(&occurrence), detail.to_string()],
            )?;
            if let Some(worst) = worst {
                tx.execute(
                    "UPDATE schedules SET last_worst = ?2 WHERE name = ?1",
                    args![schedule, worst],
                )?;
            }
            Ok(())
        })
    }

    /// Adds how a finished fire's notification went (`notification`) to its recorded detail.
    pub fn note_fire_notification(
        &mut self,
        schedule: &str,
        occurrence: DateTime<Utc>,
        notification: &Value,
    ) -> Result<(), StoreError> {
        self.db().transaction(|tx| {
            let detail: Option<Option<String>> = tx.query_opt(
                "SELECT detail FROM schedule_fires WHERE schedule = ?1 AND occurrence = ?2",
                args![schedule, ts(&occurrence)],
                |row| row.get(0),
            )?;
            let Some(detail) = detail else {
                return Ok(());
            };
            let mut detail: Value = detail
                .and_then(|d| serde_json::from_str(&d).ok())
                .unwrap_or_else(|| Value::Object(Default::default()));
            if let Some(object) = detail.as_object_mut() {
                object.insert("notification".into(), notification.clone());
            }
            tx.execute(
                "UPDATE schedule_fires SET detail = ?3 WHERE schedule = ?1 AND occurrence = ?2",
                args![schedule, ts(&occurrence), detail.to_string()],
            )?;
            Ok(())
        })
    }

    /// A schedule's fires, oldest first.
    pub fn fires(&self, schedule: &str) -> Result<Vec<FireRecord>, StoreError> {
        self.db().query(
            "SELECT schedule, occurrence, fired_at, outcome, run_id, detail FROM schedule_fires
             WHERE schedule = ?1 ORDER BY occurrence, seq",
            args![schedule],
            |row| {
                Ok(FireRecord {
                    schedule: row.get(0)?,
                    occurrence: timestamp(row.get(1)?, "schedule_fires.occurrence")?,
                    fired_at: timestamp(row.get(2)?, "schedule_fires.fired_at")?,
                    outcome: crate::store::parse(row.get(3)?, "schedule_fires.outcome")?,
                    run_id: row.get(4)?,
                    detail: row
                        .get::<Option<String>>(5)?
                        .map(|d| serde_json::from_str(&d))
                        .transpose()
                        .map_err(|e| crate::error::corrupt("schedule_fires.detail", e))?,
                })
            },
        )
    }

    /// Whether a run is still going (for the overlap policy), judged by its lock: a live
    /// run holds one with a lease running past `now`, in a process that is not certainly gone.
    /// A run's status alone says `running` for ever after a crash.
    pub fn run_is_live(&self, run_id: &str, now: DateTime<Utc>) -> Result<bool, StoreError> {
        let holders = self.db().query(
            "SELECT owner_pid, owner_host, lease_expires_at FROM locks WHERE run_id = ?1",
            args![run_id],
            |row| {
                Ok((
                    row.get::<u32>(0)?,
                    row.get::<String>(1)?,
                    row.get::<String>(2)?,
                ))
            },
        )?;
        for (pid, host, expires) in holders {
            let expires = timestamp(expires, "locks.lease_expires_at")?;
            let owner = crate::LockOwner { pid, host };
            if expires > now && !owner.is_certainly_dead() {
                return Ok(true);
            }
        }
        // A run queued for a worker goes on until a worker ends it, taken or not yet.
        self.db().query_one(
            "SELECT EXISTS (SELECT 1 FROM run_queue WHERE id = ?1 AND status NOT IN ('done', 'poisoned'))",
            args![run_id],
            |row| row.get(0),
        )
    }

    /// Marks the fires a daemon left behind when it stopped: a `claimed` fire whose run was
    /// never created, and a `buffered` one (the buffer lived in its memory). Both become
    /// `lost`, with the reason; returns how many.
    pub fn sweep_orphan_fires(&mut self, now: DateTime<Utc>) -> Result<usize, StoreError> {
        // Other daemons may be running on this store: only what none of them can still be
        // holding is swept. A claim turns `started` within moments of being made, so one a
        // minute old never got its run. A buffered fire waits for the run before it; once that
        // run is not live (and a minute has passed, a few ticks), no daemon will start it.
        let stale = ts(&(now - chrono::Duration::seconds(60)));
        let mut orphaned_buffers = Vec::new();
        let buffered: Vec<(String, String)> = self.db().query(
            "SELECT schedule, occurrence FROM schedule_fires
             WHERE outcome = 'buffered' AND fired_at < ?1",
            args![stale],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )?;
        for (schedule, occurrence) in buffered {
            let previous: Option<String> = self
                .db()
                .query_opt(
                    "SELECT run_id FROM schedule_fires
                     WHERE schedule = ?1 AND outcome IN ('started', 'claimed')
                     ORDER BY occurrence DESC LIMIT 1",
                    args![schedule],
                    |row| row.get::<Option<String>>(0),
                )?
                .flatten();
            let live = match &previous {
                Some(run_id) => self.run_is_live(run_id, now)?,
                None => false,
            };
            if !live {
                orphaned_buffers.push((schedule, occurrence));
            }
        }
        self.db().transaction(|tx| {
            // (`started` rows without a run come from kmsflow before a fire became `started`
            // with its run's creation.)
            let mut swept = tx.execute(
                "UPDATE schedule_fires SET outcome = 'lost', fired_at = ?1,
                     detail = '{\"reason\":\"the daemon stopped before the run was created\"}'
                 WHERE fired_at < ?2
                   AND (outcome = 'claimed'
                        OR (outcome = 'started'
                            AND (run_id IS NULL OR run_id NOT IN (SELECT id FROM runs))))",
                args![ts(&now), stale],
            )?;
            for (schedule, occurrence) in orphaned_buffers {
                swept += tx.execute(
                    "UPDATE schedule_fires SET outcome = 'lost', fired_at = ?1,
                         detail = '{\"reason\":\"the daemon stopped while the fire waited for the run before it\"}'
                     WHERE schedule = ?2 AND occurrence = ?3 AND outcome = 'buffered'",
                    args![ts(&now), schedule, occurrence],
                )?;
            }
            Ok(swept)
        })
    }
}

#[cfg(test)]
mod tests {
    use chrono::Duration;

    use super::*;
    use crate::{Durability, LockOwner, NewRun, Store, Write};

    fn running_run(store: &mut Store, id: &str) {
        store
            .commit(&[Write::CreateRun(NewRun {
                id: id.into(),
                runbook: "t".into(),
                runbook_ref: "t.yaml".into(),
                content_hash: "h".into(),
                source: "name: t".into(),
                params: serde_json::json!({}),
                secret_params: vec![],
                started_at: Utc::now(),
                lock_key: Some(format!("run/{id}")),
                steps: vec![],
                fragments: serde_json::json!([]),
            })])
            .unwrap();
    }

    #[test]
    fn a_run_is_live_while_it_holds_a_lease_not_while_its_status_says_running() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_file(&dir.path().join("state.db"), Durability::Normal).unwrap();
        let now = Utc::now();
        running_run(&mut store, "crashed");
        running_run(&mut store, "alive");
        // The crashed run's process is gone; the live one is this test.
        let dead = LockOwner {
            pid: u32::MAX - 7,
            host: LockOwner::current().host,
        };
        let lease = Duration::seconds(60);
        store
            .acquire_lock("run/crashed", "crashed", &dead, lease)
            .unwrap()
            .unwrap();
        store
            .acquire_lock("run/alive", "alive", &LockOwner::current(), lease)
            .unwrap()
            .unwrap();
        assert!(!store.run_is_live("crashed", now).unwrap());
        assert!(store.run_is_live("alive", now).unwrap());
        assert!(
            !store
                .run_is_live("alive", now + lease + Duration::seconds(1))
                .unwrap(),
            "past its lease"
        );
    }

    #[test]
    fn fires_a_stopped_daemon_left_behind_are_swept_as_lost() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = Store::open_file(&dir.path().join("state.db"), Durability::Normal).unwrap();
        let at = Utc::now();
        running_run(&mut store, "exists");
        for (minute, outcome, run_id) in [
            (1, FireOutcome::Started, Some("exists")),
            (2, FireOutcome::Claimed, Some("never-created")),
            (3, FireOutcome::Buffered, None),
        ] {
            store
                .claim_fire(&FireRecord {
                    schedule: "s".into(),
                    occurrence: at + Duration::minutes(minute),
                    fired_at: at,
                    outcome,
                    run_id: run_id.map(str::to_owned),
                    detail: None,
                })
                .unwrap();
        }
        // Another daemon may be holding fresh claims and buffers: nothing is swept at once.
        assert_eq!(store.sweep_orphan_fires(at).unwrap(), 0);
        // A schedule whose previous run is still live (in another daemon): its buffered fire is
        // that daemon's to start, and stays.
        running_run(&mut store, "alive");
        let later = at + Duration::minutes(2);
        store
            .acquire_lock(
                "run/alive",
                "alive",
                &LockOwner::current(),
                Duration::minutes(3),
            )
            .unwrap()
            .unwrap();
        for (minute, outcome, run_id) in [
            (1, FireOutcome::Started, Some("alive")),
            (2, FireOutcome::Buffered, None),
        ] {
            store
                .claim_fire(&FireRecord {
                    schedule: "busy".into(),
                    occurrence: at + Duration::minutes(minute),
                    fired_at: at,
                    outcome,
                    run_id: run_id.map(str::to_owned),
                    detail: None,
                })
                .unwrap();
        }
        assert_eq!(store.sweep_orphan_fires(later).unwrap(), 2);
        let busy: Vec<FireOutcome> = store
            .fires("busy")
            .unwrap()
            .into_iter()
            .map(|f| f.outcome)
            .collect();
        assert_eq!(busy, [FireOutcome::Started, FireOutcome::Buffered]);
        let outcomes: Vec<FireOutcome> = store
            .fires("s")
            .unwrap()
            .into_iter()
            .map(|f| f.outcome)
            .collect();
        assert_eq!(
            outcomes,
            [FireOutcome::Started, FireOutcome::Lost, FireOutcome::Lost]
        );
    }
}
