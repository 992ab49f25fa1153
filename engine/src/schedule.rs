//! The schedule loop behind `kmsflow daemon`.
//!
//! Every tick, each schedule's occurrences since the last one it considered are due. The
//! latest due occurrence fires if it is within the catch-up window (else it is `missed`), and
//! every earlier one is recorded `missed`: after downtime a schedule catches up once, not once
//! per missed occurrence. Firing follows the overlap policy: `skip` records `skipped` while
//! the previous run is still going, `buffer_one` keeps one occurrence to start when it ends,
//! `allow` starts regardless. An occurrence is claimed in the store before anything starts;
//! the claim is unique per (schedule, occurrence), so two daemons on one store never both fire
//! it. Draining (SIGTERM) stops firing and waits for running fires to finish.

use std::collections::HashMap;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use croner::Cron;
use kmsflow_state::{
    Durability, FireOutcome, FireRecord, Location, Overlap, ScheduleRecord, Store, StoreError,
};
use serde_json::{Value, json};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// Starts what a schedule runs. The binary implements it: it knows runbooks, fleets and
/// notifications.
#[async_trait]
pub trait Firer: Send + Sync + 'static {
    /// Runs the schedule's work for `occurrence` as run `run_id`; returns what to record and
    /// the worst severity (`ok`, `warn`, `fail`) when there is one.
    async fn fire(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        run_id: &str,
    ) -> (Value, Option<String>);

    /// The id a fire of `schedule` claims for its work: a run's, by default. A rollout's
    /// fire claims the rollout's id, so the overlap policy sees the rollout's own lock.
    fn fire_id(&self, _schedule: &ScheduleRecord) -> String {
        crate::launch::new_run_id(Utc::now())
    }

    /// Tells whoever listens how a fire ended (a webhook). Called once the fire is recorded as
    /// finished, apart from it: a slow or failing listener never keeps the fire running (and
    /// the next occurrence `skipped`). Returns what to add to the fire's record.
    async fn notify(
        &self,
        _schedule: &ScheduleRecord,
        _occurrence: DateTime<Utc>,
        _run_id: &str,
        _detail: &Value,
        _worst: Option<&str>,
    ) -> Option<Value> {
        None
    }
}

/// Parses a schedule's cron expression: 5 fields, or 6 with seconds first. UTC.
pub fn parse_cron(expression: &str) -> Result<Cron, String> {
    Cron::from_str(expression).map_err(|e| format!("invalid cron expression `{expression}`: {e}"))
}

/// The daemon's settings.
pub struct Daemon {
    /// The state file, or the team's PostgreSQL database.
    pub state: Location,
    pub durability: Durability,
    pub firer: Arc<dyn Firer>,
    /// How often schedules are looked at.
    pub tick: Duration,
    /// Cancelled to stop firing (SIGTERM); running fires finish first.
    pub drain: CancellationToken,
}

/// The daemon's own connection to the store, opened on first use and kept between ticks: on
/// PostgreSQL a fresh connection for each look at the schedules (four a second) would be a
/// login and a server process each. After an error the next use opens it afresh.
#[derive(Clone)]
struct StoreHandle {
    location: Location,
    durability: Durability,
    store: Arc<std::sync::Mutex<Option<Store>>>,
}

impl StoreHandle {
    fn new(location: Location, durability: Durability) -> StoreHandle {
        StoreHandle {
            location,
            durability,
            store: Arc::default(),
        }
    }

    async fn run<T: Send + 'static>(
        &self,
        work: impl FnOnce(&mut Store) -> Result<T, StoreError> + Send + 'static,
    ) -> Result<T, StoreError> {
        let this = self.clone();
        tokio::task::spawn_blocking(move || {
            let mut kept = this.store.lock().unwrap_or_else(|p| p.into_inner());
            let store = match &mut *kept {
                Some(store) => store,
                empty => empty.insert(Store::open(&this.location, this.durability)?),
            };
            let result = work(store);
            if result.is_err() {
                *kept = None;
            }
            result
        })
        .await
        .expect("store work does not panic")
    }
}

/// What the loop keeps between ticks: fires in flight and buffered occurrences. It outlives
/// any store error, so a busy state file never aborts a running fire.
#[derive(Default)]
struct Firing {
    running: HashMap<String, tokio::task::AbortHandle>,
    buffered: HashMap<String, DateTime<Utc>>,
    tasks: JoinSet<String>,
    /// Notifications of finished fires, still being sent; a drain waits for them too.
    notifications: tokio_util::task::TaskTracker,
}

/// How the wall clock moved between two looks, unlike the monotonic clock: a step (NTP, a VM
/// restored, an operator), which is not downtime, since the daemon ran all along.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ClockStep {
    Forward(chrono::Duration),
    Back(chrono::Duration),
}

/// Both clocks as the daemon last looked at them.
struct ClockWatch {
    monotonic: std::time::Instant,
    wall: DateTime<Utc>,
}

impl ClockWatch {
    fn start(monotonic: std::time::Instant, wall: DateTime<Utc>) -> ClockWatch {
        ClockWatch { monotonic, wall }
    }

    /// How far each clock moved since the last look; a difference past `tolerance` is a step
    /// of the wall clock. Remembers this look.
    fn observe(
        &mut self,
        monotonic: std::time::Instant,
        wall: DateTime<Utc>,
        tolerance: Duration,
    ) -> Option<ClockStep> {
        let ran = chrono::Duration::from_std(monotonic.saturating_duration_since(self.monotonic))
            .unwrap_or_default();
        let moved = wall - self.wall;
        self.monotonic = monotonic;
        self.wall = wall;
        let drift = moved - ran;
        let tolerance = chrono::Duration::from_std(tolerance).unwrap_or_default();
        if drift > tolerance {
            Some(ClockStep::Forward(drift))
        } else if drift < -tolerance {
            Some(ClockStep::Back(-drift))
        } else {
            None
        }
    }
}

/// What a tick knows of the clocks: the wall time of the look before, and a step since.
#[derive(Debug, Clone, Copy)]
struct Seen {
    before: DateTime<Utc>,
    step: Option<ClockStep>,
}

/// The longest the daemon waits between ticks after store errors.
const MAX_BACKOFF: Duration = Duration::from_secs(60);

impl Daemon {
    /// Runs until drained; returns once every started fire has finished. A store error in a
    /// tick (a state file busy past its timeout, a full disk) is logged and the tick is tried
    /// again with backoff: the daemon keeps running, and so do the fires it started.
    pub async fn run(self) -> Result<(), StoreError> {
        let store = StoreHandle::new(self.state.clone(), self.durability);
        match store.run(|s| s.sweep_orphan_fires(Utc::now())).await {
            Ok(0) => {}
            Ok(n) => tracing::warn!(
                fires = n,
                "marked fires a stopped daemon left behind as lost"
            ),
            Err(error) => tracing::warn!(%error, "could not sweep fires left behind; going on"),
        }
        let mut firing = Firing::default();
        let mut failures: u32 = 0;
        let mut clock = ClockWatch::start(std::time::Instant::now(), Utc::now());
        // A wall clock that moved more than this unlike the monotonic one was stepped.
        let tolerance = (self.tick * 4).max(Duration::from_secs(2));
        loop {
            while let Some(Ok(name)) = firing.tasks.try_join_next() {
                firing.running.remove(&name);
            }
            firing.running.retain(|_, handle| !handle.is_finished());
            if self.drain.is_cancelled() {
                break;
            }
            let before = clock.wall;
            let step = clock.observe(std::time::Instant::now(), Utc::now(), tolerance);
            match step {
                Some(ClockStep::Forward(by)) => tracing::warn!(
                    by_s = by.num_seconds(),
                    "the wall clock jumped forward while the daemon ran; occurrences it passed over are recorded missed for that reason, and firing goes on by the new clock"
                ),
                Some(ClockStep::Back(by)) => tracing::warn!(
                    by_s = by.num_seconds(),
                    "the wall clock jumped back while the daemon ran; firing goes on by the new clock (an occurrence already fired is not fired again)"
                ),
                None => {}
            }
            let seen = Seen { before, step };
            let pause = match self.tick(&mut firing, &store, seen).await {
                Ok(()) => {
                    failures = 0;
                    self.tick
                }
                Err(error) => {
                    failures += 1;
                    let pause = self
                        .tick
                        .saturating_mul(2u32.saturating_pow(failures.min(16)))
                        .min(MAX_BACKOFF);
                    tracing::warn!(%error, failures, retry_in_ms = pause.as_millis() as u64, "a tick failed on the state store; trying again");
                    pause
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = self.drain.cancelled() => {}
            }
        }
        // Drain: let running fires finish and checkpoint, then their notifications go out.
        while firing.tasks.join_next().await.is_some() {}
        firing.notifications.close();
        firing.notifications.wait().await;
        Ok(())
    }

    /// One look at every schedule: fire, buffer, skip or record missed occurrences.
    async fn tick(
        &self,
        firing: &mut Firing,
        store: &StoreHandle,
        seen: Seen,
    ) -> Result<(), StoreError> {
        let grace = chrono::Duration::from_std(self.tick * 3).unwrap_or_default();
        let now = Utc::now();
        let schedules = store.run(|s| s.schedules()).await?;
        for schedule in schedules.into_iter().filter(|s| !s.paused) {
            let Ok(cron) = parse_cron(&schedule.cron) else {
                tracing::warn!(schedule = %schedule.name, cron = %schedule.cron, "skipping a schedule with an invalid cron expression");
                continue;
            };
            let busy = firing.running.contains_key(&schedule.name);
            // A buffered occurrence starts as soon as the run before it has ended.
            if !busy && let Some(&occurrence) = firing.buffered.get(&schedule.name) {
                self.start(&schedule, occurrence, firing, store).await?;
                firing.buffered.remove(&schedule.name);
                continue;
            }
            // After the clock went back, what was seen lies ahead of the new clock: from there
            // on, occurrences are looked for after the previous tick instead, so firing goes
            // on by the new clock rather than stopping until it catches up.
            let since = if schedule.last_seen_at > now {
                seen.before.min(now)
            } else {
                schedule.last_seen_at
            };
            let due: Vec<DateTime<Utc>> = cron
                .iter_after(since)
                .take_while(|occurrence| *occurrence <= now)
                .take(100_000)
                .collect();
            let Some((&latest, earlier)) = due.split_last() else {
                continue;
            };
            let reason = match seen.step {
                Some(ClockStep::Forward(by)) => format!(
                    "the wall clock jumped forward {} s while the daemon ran, past this occurrence; a later occurrence is due",
                    by.num_seconds()
                ),
                _ => "the daemon was not running; a later occurrence is due".to_owned(),
            };
            for &occurrence in earlier {
                self.record(
                    &schedule,
                    occurrence,
                    FireOutcome::Missed,
                    json!({ "reason": reason }),
                    store,
                )
                .await?;
            }
            let window = chrono::Duration::milliseconds(schedule.catchup_ms).max(grace);
            if now - latest > window {
                self.record(
                    &schedule,
                    latest,
                    FireOutcome::Missed,
                    json!({"reason": "older than the catch-up window"}),
                    store,
                )
                .await?;
                continue;
            }
            let busy = firing.running.contains_key(&schedule.name)
                || self.previous_still_running(&schedule, store).await?;
            match (busy, schedule.overlap) {
                (true, Overlap::Allow) | (false, _) => {
                    self.start(&schedule, latest, firing, store).await?
                }
                (true, Overlap::BufferOne) if !firing.buffered.contains_key(&schedule.name) => {
                    // Seen now, started later; a second one while it waits is skipped.
                    store
                        .run({
                            let (name, at) = (schedule.name.clone(), latest);
                            move |s| {
                                s.claim_fire(&FireRecord {
                                    schedule: name,
                                    occurrence: at,
                                    fired_at: Utc::now(),
                                    outcome: FireOutcome::Buffered,
                                    run_id: None,
                                    detail: None,
                                })
                            }
                        })
                        .await?;
                    firing.buffered.insert(schedule.name.clone(), latest);
                }
                (true, _) => {
                    self.record(
                        &schedule,
                        latest,
                        FireOutcome::Skipped,
                        json!({"reason": "the previous run is still going"}),
                        store,
                    )
                    .await?;
                }
            }
        }
        Ok(())
    }

    async fn record(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        outcome: FireOutcome,
        detail: Value,
        store: &StoreHandle,
    ) -> Result<bool, StoreError> {
        let fire = FireRecord {
            schedule: schedule.name.clone(),
            occurrence,
            fired_at: Utc::now(),
            outcome,
            run_id: None,
            detail: Some(detail),
        };
        store.run(move |s| s.claim_fire(&fire)).await
    }

    /// Whether the run of this schedule's latest started fire is still going (perhaps in another
    /// daemon), judged by its lock's lease: a run a crash left `running` is not.
    async fn previous_still_running(
        &self,
        schedule: &ScheduleRecord,
        store: &StoreHandle,
    ) -> Result<bool, StoreError> {
        let name = schedule.name.clone();
        store
            .run(move |s| {
                let last = s
                    .fires(&name)?
                    .into_iter()
                    .rev()
                    .find(|f| matches!(f.outcome, FireOutcome::Started | FireOutcome::Claimed));
                match last.and_then(|f| f.run_id) {
                    Some(run_id) => s.run_is_live(&run_id, Utc::now()),
                    None => Ok(false),
                }
            })
            .await
    }

    /// Claims the occurrence and, if this daemon got it, starts the fire.
    async fn start(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        firing: &mut Firing,
        store: &StoreHandle,
    ) -> Result<(), StoreError> {
        let run_id = self.firer.fire_id(schedule);
        let fire = FireRecord {
            schedule: schedule.name.clone(),
            occurrence,
            fired_at: Utc::now(),
            outcome: FireOutcome::Claimed,
            run_id: Some(run_id.clone()),
            detail: None,
        };
        // A buffered occurrence already has its row: replace it with the start.
        let buffered_row = fire.clone();
        let claimed = store
            .run(move |s| {
                if s.claim_fire(&buffered_row)? {
                    return Ok(true);
                }
                s.promote_buffered_fire(&buffered_row)
            })
            .await?;
        if !claimed {
            return Ok(());
        }
        let (firer, schedule, store) = (self.firer.clone(), schedule.clone(), store.clone());
        let jitter =
            Duration::from_millis((schedule.jitter_ms.max(0) as f64 * fastrand::f64()) as u64);
        let name = schedule.name.clone();
        let notifications = firing.notifications.clone();
        let handle = firing.tasks.spawn(async move {
            tokio::time::sleep(jitter).await;
            let (detail, worst) = firer.fire(&schedule, occurrence, &run_id).await;
            // The run is recorded in its own state; recording how the fire ended is worth a few
            // tries against a busy file.
            for attempt in 1..=5u32 {
                let (name, detail, worst) = (schedule.name.clone(), detail.clone(), worst.clone());
                match store.run(move |s| {
                    s.finish_fire(&name, occurrence, &detail, worst.as_deref())
                })
                .await
                {
                    Ok(()) => break,
                    Err(error) => {
                        tracing::warn!(%error, attempt, schedule = %schedule.name, "could not record how a fire ended");
                        tokio::time::sleep(Duration::from_secs(u64::from(attempt))).await;
                    }
                }
            }
            let name = schedule.name.clone();
            notifications.spawn(async move {
                let Some(sent) = firer
                    .notify(&schedule, occurrence, &run_id, &detail, worst.as_deref())
                    .await
                else {
                    return;
                };
                let record = schedule.name.clone();
                if let Err(error) = store.run(move |s| {
                    s.note_fire_notification(&record, occurrence, &sent)
                })
                .await
                {
                    tracing::warn!(%error, schedule = %schedule.name, "could not record a fire's notification");
                }
            });
            name
        });
        firing.running.insert(name, handle);
        Ok(())
    }
}

#[cfg(test)]
mod clock_tests {
    use super::*;

    #[test]
    fn a_step_of_the_wall_clock_is_told_from_time_passing() {
        let start = std::time::Instant::now();
        let wall = Utc::now();
        let mut watch = ClockWatch::start(start, wall);
        let tolerance = Duration::from_secs(4);
        let later = |s: u64| start + Duration::from_secs(s);
        let secs = chrono::Duration::seconds;
        // Both clocks move together: no step, however long the daemon waited.
        assert_eq!(watch.observe(later(1), wall + secs(1), tolerance), None);
        assert_eq!(watch.observe(later(61), wall + secs(61), tolerance), None);
        // The wall clock moves an hour in one second: forward.
        assert_eq!(
            watch.observe(later(62), wall + secs(62 + 3600), tolerance),
            Some(ClockStep::Forward(secs(3600)))
        );
        // Then two hours back.
        assert_eq!(
            watch.observe(later(63), wall + secs(63 + 3600 - 7200), tolerance),
            Some(ClockStep::Back(secs(7200)))
        );
        // Drift within the tolerance is no step.
        assert_eq!(
            watch.observe(later(64), wall + secs(64 - 3600 + 3), tolerance),
            None
        );
    }
}
