//! What the executor reports as a run proceeds. The engine never prints: the binary decides
//! how a [`Progress`] looks on a terminal, in JSON logs, or nowhere (benchmarks).

use std::sync::Arc;
use std::time::Duration;

use kmsflow_state::{Outcome, RunStatus};

/// One step transition or run milestone.
#[derive(Debug, Clone, PartialEq)]
pub enum Progress {
    RunStarted {
        run_id: String,
        runbook: String,
        resumed: bool,
        n_steps: usize,
    },
    /// A step succeeded in an earlier process; its outputs are reused.
    StepReused {
        step_id: String,
    },
    StepStarted {
        step_id: String,
        uses: String,
        attempt: u32,
    },
    /// The before image is durable and the step is about to change the world.
    StepApplying {
        step_id: String,
        summary: String,
    },
    /// The change about to be applied cannot be undone.
    PointOfNoReturn {
        step_id: String,
        reason: String,
    },
    StepSucceeded {
        step_id: String,
        outcome: Outcome,
        elapsed: Duration,
    },
    StepRetrying {
        step_id: String,
        attempt: u32,
        delay: Duration,
        error: String,
    },
    StepFailed {
        step_id: String,
        error: String,
    },
    StepSkipped {
        step_id: String,
        reason: String,
    },
    StepWaiting {
        step_id: String,
        /// What the approver should check (an `approve` step's `message`).
        message: Option<String>,
    },
    /// Ctrl-C: no new steps start.
    Draining {
        running: usize,
    },
    RunFinished {
        run_id: String,
        status: RunStatus,
        error: Option<String>,
    },
    /// Rollback of one step.
    StepRolledBack {
        step_id: String,
    },
    StepIrreversible {
        step_id: String,
        reason: String,
    },
    StepRollbackFailed {
        step_id: String,
        error: String,
    },
}

/// Receives progress; called from the executor's tasks, so it must be cheap and thread-safe.
pub type ProgressSink = Arc<dyn Fn(&Progress) + Send + Sync>;

/// A sink that drops everything.
pub fn silent() -> ProgressSink {
    Arc::new(|_| {})
}
