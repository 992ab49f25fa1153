//! Rollback: undo what a run changed, newest first.
//!
//! Steps that changed something are undone in reverse execution order (a reverse topological
//! order of the DAG), each from its before image: what the run created is deleted, what it
//! changed is put back. A step whose change cannot be undone is reported and skipped, and the
//! rest continue ("undo what it can"). A step whose rollback fails stops the walk: undoing its
//! prerequisites while it still stands could break what depends on them. Each undone step is
//! checkpointed, so running rollback again continues where it stopped.

use chrono::Utc;
use futures::FutureExt as _;
use kmsflow_state::{Outcome, RunRecord, RunStatus, StepRecord, StepStatus, Write};
use serde_json::{Value, json};
use tokio_util::sync::CancellationToken;

use crate::checkpoint::Checkpoints;
use crate::executor::RunSummary;
use crate::input::prepare_input;
use crate::kind::{Registry, StepContext, Undo};
use crate::launch::LaunchError;
use crate::lease::HeldLock;
use crate::params::BoundParams;
use crate::progress::{Progress, ProgressSink};
use crate::redact::Redactor;
use crate::runbook::CompiledRunbook;
use crate::template::Renderer;

/// The step's outcome, if it changed something rollback must undo.
fn change_to_undo(record: &StepRecord) -> Option<Outcome> {
    match record.status {
        StepStatus::Succeeded => record.outcome.filter(|o| o.changed_something()),
        // It checkpointed a before image, then failed or died while applying: the change may
        // be partly made.
        StepStatus::Running | StepStatus::Failed | StepStatus::Pending => record
            .before_image
            .as_ref()
            .and(record.planned_outcome)
            .filter(|o| o.changed_something()),
        StepStatus::Skipped | StepStatus::RolledBack => None,
    }
}

/// What a rollback of these records would undo, newest first: each step that changed
/// something (or may have, having died while applying), with its outcome. `rollback
/// --dry-run` shows it; the walk below undoes it in this order.
pub fn undo_plan(records: &[StepRecord]) -> Vec<(&StepRecord, Outcome)> {
    records
        .iter()
        .rev()
        .filter_map(|record| change_to_undo(record).map(|outcome| (record, outcome)))
        .collect()
}

/// What one rollback walk works with: the run's records and the runbook it stored.
pub(crate) struct Walk<'a> {
    pub registry: &'a Registry,
    pub run: &'a RunRecord,
    pub runbook: &'a CompiledRunbook,
    pub params: &'a BoundParams,
    pub records: &'a [StepRecord],
    pub checkpoints: &'a dyn Checkpoints,
    /// Checked before every undo, which writes to Azure.
    pub lock: &'a HeldLock,
    pub progress: &'a ProgressSink,
}

/// Undoes, newest first, what the run's steps changed; ends `rolled_back` or
/// `rollback_failed`, releasing the lock. [`crate::launch::Launcher::rollback`] takes the lock
/// and marks the run `rolling_back` first.
pub(crate) async fn walk(walk: Walk<'_>) -> Result<RunSummary, LaunchError> {
    let Walk {
        registry,
        run,
        runbook,
        params,
        records,
        checkpoints,
        lock,
        progress,
    } = walk;
    let redactor = Redactor::new(params.secret_values());
    let renderer = Renderer::new();
    let mut context = json!({
        "params": params.values(),
        "steps": {},
        "run": {"id": run.id, "started_at": run.started_at.to_rfc3339()},
    });
    for record in records {
        if let Some(outputs) = &record.outputs {
            context["steps"][&record.step_id] = json!({"outputs": outputs});
        }
    }
    let cancel = CancellationToken::new();
    let mut irreversible: Vec<String> = Vec::new();
    let mut failed: Option<String> = None;
    // Records come in execution order; undo newest first.
    for record in records.iter().rev() {
        let Some(outcome) = change_to_undo(record) else {
            continue;
        };
        let at = Utc::now();
        let Some(step) = runbook.step(&record.step_id) else {
            failed = Some(format!(
                "step `{}` is not in the stored runbook; cannot undo it",
                record.step_id
            ));
            break;
        };
        let kind = registry
            .get(&step.uses)
            .expect("compile checked the step kind");
        let input = renderer
            .render_value(&step.with, &context)
            .map_err(|e| e.to_string())
            .and_then(|rendered| prepare_input(kind.spec(), rendered));
        // The fencing check: a rollback that lost its lock to another run stops here.
        checkpoints
            .commit(vec![lock.fence(&run.id)])
            .await
            .map_err(LaunchError::Store)?;
        let result = match input {
            Ok(input) => {
                let cx = StepContext {
                    run_id: &run.id,
                    step_id: &step.id,
                    attempt: record.attempts,
                    input: &input,
                    approval: None,
                    cancel: &cancel,
                    earlier_before: record.before_image.as_ref(),
                    input_has_secrets: redactor.value(&input) != input,
                    recorded_outputs: record.outputs.as_ref(),
                };
                let before = record.before_image.clone().unwrap_or(Value::Null);
                let reporter = crate::progress::WaitingReporter {
                    step_id: step.id.clone(),
                    sink: progress.clone(),
                    redactor: redactor.clone(),
                };
                if outcome == Outcome::Updated && before.is_null() {
                    // A planned create whose answer proved the resource was there already:
                    // someone else's, and kmsflow has no image of it to put back.
                    Ok(Undo::Irreversible(
                        "it existed before this run wrote to it (Azure's answer said so), and no image of it as it was was kept; left as it is".into(),
                    ))
                } else {
                    // A kind that panics on what it was given fails its undo, reported and
                    // retryable: the run must never stay `rolling_back` for good.
                    let undo =
                        crate::progress::reporting(reporter, kind.rollback(&cx, &before, outcome));
                    match std::panic::AssertUnwindSafe(undo).catch_unwind().await {
                        Ok(result) => result.map_err(|e| redactor.text(&e.to_string())),
                        Err(panic) => Err(redactor.text(&format!(
                            "the `{}` kind failed while undoing this step ({}); nothing more was done to it",
                            step.uses,
                            panic_message(&panic)
                        ))),
                    }
                }
            }
            Err(error) => Err(redactor.text(&format!("invalid input: {error}"))),
        };
        match result {
            Ok(Undo::Done | Undo::NothingToUndo) => {
                checkpoints
                    .commit(vec![Write::StepRolledBack {
                        run_id: run.id.clone(),
                        step_id: step.id.clone(),
                        at,
                    }])
                    .await
                    .map_err(LaunchError::Store)?;
                progress(&Progress::StepRolledBack {
                    step_id: step.id.clone(),
                });
            }
            Ok(Undo::Irreversible(reason)) => {
                checkpoints
                    .commit(vec![Write::Event {
                        run_id: run.id.clone(),
                        step_id: Some(step.id.clone()),
                        kind: "step_irreversible".into(),
                        detail: json!({"reason": reason}),
                        at,
                    }])
                    .await
                    .map_err(LaunchError::Store)?;
                progress(&Progress::StepIrreversible {
                    step_id: step.id.clone(),
                    reason: reason.clone(),
                });
                irreversible.push(format!("`{}` ({reason})", step.id));
            }
            Err(error) => {
                checkpoints
                    .commit(vec![Write::Event {
                        run_id: run.id.clone(),
                        step_id: Some(step.id.clone()),
                        kind: "step_rollback_failed".into(),
                        detail: json!({"error": error}),
                        at,
                    }])
                    .await
                    .map_err(LaunchError::Store)?;
                progress(&Progress::StepRollbackFailed {
                    step_id: step.id.clone(),
                    error: error.clone(),
                });
                failed = Some(format!("rollback of step `{}` failed: {error}", step.id));
                break;
            }
        }
    }
    let (status, error) = match (&failed, irreversible.is_empty()) {
        (Some(failure), _) => (
            RunStatus::RollbackFailed,
            Some(format!(
                "{failure}; fix the cause and run `kmsflow rollback {}` again",
                run.id
            )),
        ),
        (None, false) => (
            RunStatus::RollbackFailed,
            Some(format!(
                "undid everything else, but these steps cannot be undone: {}",
                irreversible.join(", ")
            )),
        ),
        (None, true) => (RunStatus::RolledBack, None),
    };
    let mut writes = vec![Write::RunFinished {
        run_id: run.id.clone(),
        status,
        error: error.clone(),
        outputs: None,
        at: Utc::now(),
    }];
    writes.push(lock.release(&run.id));
    checkpoints
        .commit(writes)
        .await
        .map_err(LaunchError::Store)?;
    progress(&Progress::RunFinished {
        run_id: run.id.clone(),
        status,
        error: error.clone(),
    });
    Ok(RunSummary {
        run_id: run.id.clone(),
        status,
        error,
        outputs: None,
    })
}

/// The text a panic carried, if it carried one.
pub(crate) fn panic_message(panic: &Box<dyn std::any::Any + Send>) -> String {
    panic
        .downcast_ref::<&str>()
        .map(|s| (*s).to_owned())
        .or_else(|| panic.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "a panic without a message".to_owned())
}
