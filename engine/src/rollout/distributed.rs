//! A rollout's targets shared out to workers (`run --targets --distribute`).
//!
//! The driver paces the rollout as it does a local one (waves, gates, concurrency, the error
//! budget); it only runs no target itself. Each target's run is queued on the rollout's queue,
//! in the transaction that records it as the target's (`queued_as`; the worker links the run
//! itself when it creates it) and under the fencing check of the driver's lock, so a driver that lost its lock (paused past its lease while another took over) can
//! queue nothing, and a target is queued at most once. The driver then waits for the entry to
//! be done: a worker ran the run to an end. A worker that dies loses its claim after the lease
//! and the next worker resumes the run; the driver keeps waiting, and counts it once.

use std::collections::HashSet;
use std::time::{Duration, Instant};

use chrono::Utc;
use kmsflow_state::{NewQueued, QueuedEnd, RolloutTargetRecord, RunStatus, Write};
use serde_json::json;

use super::{Begins, RolloutProgress, TargetContext};
use crate::executor::RunSummary;
use crate::launch::{LaunchError, new_run_id, storable_fragments};
use crate::params::BoundParams;

/// How often the driver asks which of its queued targets have ended. One query answers for
/// all of them, so a short wait costs the store little: a target's slot in the rollout is
/// free again within this long of its run's end. (At 250 ms, a look per target, a
/// distributed rollout of 1,000 clusters ran at 157 clusters/s on 3 workers; at 25 ms, one
/// look for all, 235.)
const POLL: Duration = Duration::from_millis(25);

/// The queued targets a driver waits for, and which of them the queue last said had ended.
#[derive(Default)]
pub(super) struct Ended {
    asked: tokio::sync::Mutex<Asked>,
}

#[derive(Default)]
struct Asked {
    waiting: HashSet<String>,
    ended: HashSet<String>,
    at: Option<Instant>,
}

impl TargetContext {
    /// Queues `target`'s run on `queue` (or, when it has one, puts it back if it ended
    /// resumable), then waits for a worker to end it.
    pub(super) async fn run_on_queue(
        &self,
        queue: &str,
        target: &RolloutTargetRecord,
        fresh: Option<BoundParams>,
    ) -> Result<RunSummary, LaunchError> {
        let run_id = match target.run_id.as_ref().or(target.queued_as.as_ref()) {
            Some(run_id) => {
                // Queued by an earlier drive: still queued or claimed, it is waited for; done
                // (failed, interrupted, waiting), it goes back to the queue to be resumed.
                self.launcher
                    .checkpoints()
                    .commit(vec![
                        self.lock.fence(&self.rollout_id),
                        Write::Requeue {
                            id: run_id.clone(),
                            at: Utc::now(),
                        },
                    ])
                    .await?;
                (self.progress)(&RolloutProgress::TargetStarted {
                    position: target.position,
                    label: target.label.clone(),
                    run_id: run_id.clone(),
                    begins: Begins::Resumed,
                });
                run_id.clone()
            }
            None => self.enqueue(queue, target, fresh).await?,
        };
        self.until_done(&run_id).await
    }

    async fn enqueue(
        &self,
        queue: &str,
        target: &RolloutTargetRecord,
        fresh: Option<BoundParams>,
    ) -> Result<String, LaunchError> {
        let params = self.params_of(target, fresh)?;
        if !params.secret_values().is_empty() {
            // The submitting command refuses these; a stored rollout never has one to give.
            return Err(LaunchError::Rollout(format!(
                "target {} takes secret parameters, which a queued run would have to keep in \
                 the store: drive this rollout where the secret is, without --distribute",
                target.label
            )));
        }
        let now = Utc::now();
        let run_id = new_run_id(now);
        let queued = NewQueued {
            id: run_id.clone(),
            queue: queue.to_owned(),
            runbook: self.runbook.name.clone(),
            runbook_ref: self.runbook_ref.clone(),
            content_hash: self.runbook.content_hash.clone(),
            source: self.source.clone(),
            fragments: storable_fragments(&self.runbook),
            params: params.storable(),
            // The worker links the run to its target when it creates it, as a local drive
            // does: a target has a run once its run exists.
            options: json!({
                "concurrency": self.options.concurrency,
                "target": {"rollout_id": self.rollout_id, "position": target.position},
            }),
            enqueued_at: now,
        };
        self.launcher
            .checkpoints()
            .commit(vec![
                self.lock.fence(&self.rollout_id),
                Write::Enqueue(queued),
                Write::RolloutTargetQueued {
                    rollout_id: self.rollout_id.clone(),
                    position: target.position,
                    run_id: run_id.clone(),
                    at: now,
                },
            ])
            .await?;
        (self.progress)(&RolloutProgress::TargetStarted {
            position: target.position,
            label: target.label.clone(),
            run_id: run_id.clone(),
            begins: Begins::Started,
        });
        Ok(run_id)
    }

    /// Whether the queue says `run_id` has ended. The first waiter to find the last answer
    /// older than [`POLL`] asks again, for every target waited for; the others wait for it
    /// and read that answer.
    async fn has_ended(&self, run_id: &str) -> Result<bool, LaunchError> {
        let mut asked = self.ended.asked.lock().await;
        asked.waiting.insert(run_id.to_owned());
        if asked.at.is_none_or(|at| at.elapsed() >= POLL) {
            let ids: Vec<String> = asked.waiting.iter().cloned().collect();
            let ended = self
                .launcher
                .on_store(move |store| Ok(store.queued_ended(&ids)?))
                .await?;
            asked.ended = ended.into_iter().collect();
            asked.at = Some(Instant::now());
        }
        Ok(asked.ended.contains(run_id))
    }

    /// `run_id` is no longer waited for.
    async fn forget(&self, run_id: &str) {
        let mut asked = self.ended.asked.lock().await;
        asked.waiting.remove(run_id);
        asked.ended.remove(run_id);
    }

    /// Waits until a worker has ended `run_id`, and says how; a drain stops the waiting (the
    /// run goes on on its worker, and the next drive waits for it again).
    async fn until_done(&self, run_id: &str) -> Result<RunSummary, LaunchError> {
        loop {
            let ended = if self.has_ended(run_id).await? {
                let id = run_id.to_owned();
                let end = self
                    .launcher
                    .on_store(move |store| Ok(store.queued_end(&id)?))
                    .await?;
                if end.is_none() {
                    // Back on the queue since it was asked: waited for again from scratch.
                    self.forget(run_id).await;
                }
                end.map(|end| match end {
                    QueuedEnd::Ran(run) => (run.status, run.error),
                    QueuedEnd::NotStarted { error } => (RunStatus::Failed, error),
                })
            } else {
                None
            };
            if let Some((status, error)) = ended {
                self.forget(run_id).await;
                return Ok(RunSummary {
                    run_id: run_id.to_owned(),
                    status,
                    error,
                    outputs: None,
                });
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = self.signals.drain.cancelled() => {
                    self.forget(run_id).await;
                    return Ok(RunSummary {
                        run_id: run_id.to_owned(),
                        status: RunStatus::Interrupted,
                        error: None,
                        outputs: None,
                    });
                }
            }
        }
    }
}
