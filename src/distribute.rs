//! `kmsflow run --targets FILE --distribute`: a rollout driven by the workers of a queue.
//!
//! The rollout is recorded here, every target bound and checked first as for a local one, and
//! queued in the same transaction; a worker takes it and drives it (waves, gates, the error
//! budget), queueing each target's run for the queue's workers. A worker that dies loses its
//! claims after the lease and another takes over, the rollout's drive included. This process
//! only follows: it prints the rollout's journal as the workers record it, and exits with the
//! rollout's status, or with `--detach` prints the rollout's id and returns.

use std::time::Duration;

use chrono::Utc;
use kmsflow_engine::executor::ExecOptions;
use kmsflow_engine::rollout::{self, Counts, RolloutRequest, RolloutSummary};
use kmsflow_state::{NewQueued, QueueStatus, Store, Write};
use serde_json::{Value, json};

use crate::cli::Output;
use crate::commands::Context;
use crate::failure::{Failure, code};

/// Where a distributed rollout goes, and whether to wait for it.
pub struct Distribute {
    pub queue: String,
    pub detach: bool,
}

/// Records `request` as a rollout whose targets run on `asked.queue`, queues its drive, and
/// follows it (or returns its id).
pub async fn submit(
    context: &Context,
    mut request: RolloutRequest,
    asked: Distribute,
    output: Output,
) -> Result<u8, Failure> {
    if let Some(target) = request
        .targets
        .iter()
        .find(|t| !t.params.secret_values().is_empty())
    {
        return Err(Failure::Usage(format!(
            "target {} takes secret parameters, and its run on a worker would have to keep them \
             in the store, which never holds a secret: run the rollout here, without \
             --distribute",
            target.label
        )));
    }
    request.policy.queue = Some(asked.queue.clone());
    let now = Utc::now();
    let id = rollout::new_rollout_id(now);
    let drive = NewQueued {
        id: id.clone(),
        queue: asked.queue.clone(),
        runbook: request.runbook.name.clone(),
        runbook_ref: request.runbook_ref.clone(),
        content_hash: request.runbook.content_hash.clone(),
        source: request.source.clone(),
        fragments: kmsflow_engine::launch::storable_fragments(&request.runbook),
        params: request.shared.clone(),
        options: json!({"concurrency": ExecOptions::default().concurrency}),
        enqueued_at: now,
    };
    let targets = request.targets.len();
    let creation = rollout::creation(&request, &id)?;
    let mut store = context.store()?;
    // One transaction: a rollout is never recorded without a worker to drive it, nor queued
    // without its targets.
    store.commit(&[creation, Write::Enqueue(drive)])?;
    if asked.detach {
        println!("{id}");
        crate::output::note!(
            "queued rollout {id} of {targets} targets on `{}`; `kmsflow show {id}` follows it",
            asked.queue
        );
        return Ok(code::SUCCESS);
    }
    crate::output::note!(
        "queued rollout {id} of {targets} targets on `{}`; waiting for a worker",
        asked.queue
    );
    let summary = follow(&store, &id).await?;
    drop(store);
    crate::rollouts::finish(context, summary, output)
}

/// How often the journal is read while following.
const POLL: Duration = Duration::from_millis(300);

/// Prints the rollout's journal as the workers record it, until its drive is done.
async fn follow(store: &Store, id: &str) -> Result<RolloutSummary, Failure> {
    let mut seen = 0;
    let labels: Vec<String> = store
        .rollout_targets(id)?
        .into_iter()
        .map(|t| t.label)
        .collect();
    let label = |detail: &Value| {
        detail["position"]
            .as_u64()
            .and_then(|p| labels.get(p as usize))
            .map_or("?", String::as_str)
            .to_owned()
    };
    loop {
        for entry in store.events_after(id, seen)? {
            seen = entry.seq;
            if let Some(line) = describe(&entry.kind, &entry.detail, &label) {
                crate::output::note!("{line}");
            }
        }
        if store.queued(id)?.map(|q| q.status) == Some(QueueStatus::Done) {
            let rollout = store.rollout(id)?;
            return Ok(RolloutSummary {
                rollout_id: id.to_owned(),
                status: rollout.status,
                error: rollout.error,
                counts: Counts::of(&store.rollout_targets(id)?),
            });
        }
        tokio::time::sleep(POLL).await;
    }
}

/// One line for a journal entry of a distributed rollout, or none for those that say
/// nothing to the operator.
fn describe(kind: &str, detail: &Value, label: &dyn Fn(&Value) -> String) -> Option<String> {
    let text = |key: &str| detail[key].as_str().unwrap_or("?").to_owned();
    Some(match kind {
        "queue_claimed" => format!("driven by worker {}", text("worker")),
        "queue_released" => format!("worker {} gave the drive back", text("worker")),
        "rollout_resumed" => "the rollout's drive goes on where it stopped".into(),
        "wave_started" => format!("wave {}: {} targets", detail["wave"], detail["targets"]),
        "wave_gate" => format!(
            "wave {} waits for `kmsflow approve ROLLOUT wave-{}`",
            detail["wave"], detail["wave"]
        ),
        "wave_paused" => format!("wave {} starts at {}", detail["wave"], text("until")),
        "target_queued" => format!("{}: queued as {}", label(detail), text("run_id")),
        "target_started" => format!("{}: started on a worker", label(detail)),
        "target_finished" => match detail["error"].as_str() {
            Some(error) => format!("{}: {} ({error})", label(detail), text("status")),
            None => format!("{}: {}", label(detail), text("status")),
        },
        "budget_exhausted" => format!(
            "{} failed, more than the {} allowed: no new target starts",
            detail["failed"], detail["allowed"]
        ),
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_finished_target_is_named_by_its_label_with_its_error() {
        let label = |d: &Value| format!("aks-{}", d["position"]);
        let line = describe(
            "target_finished",
            &json!({"position": 3, "status": "failed", "error": "Conflict"}),
            &label,
        );
        assert_eq!(line.as_deref(), Some("aks-3: failed (Conflict)"));
        assert_eq!(describe("lock_renewed", &json!({}), &label), None);
    }
}
