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
    /// What a running step waits for, as its kind last reported it ("`aks-1` Updating").
    StepWaitingOn {
        step_id: String,
        what: String,
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

tokio::task_local! {
    /// The running step's reporter, set by the executor around each attempt, so a kind (or
    /// the client it calls) can say what it waits for without every call carrying it.
    static WAITING: WaitingReporter;
}

/// Reports for one step, through the run's sink, with the run's secrets masked.
#[derive(Clone)]
pub struct WaitingReporter {
    pub step_id: String,
    pub sink: ProgressSink,
    pub redactor: crate::redact::Redactor,
}

/// Says what the current step waits for, e.g. "`aks-1` Updating". Outside a step (a plan,
/// a test calling a kind directly) it does nothing. The text must name resources, never
/// values: it goes to the terminal and to JSON logs.
pub fn report_waiting(what: impl Into<String>) {
    let _ = WAITING.try_with(|reporter| {
        (reporter.sink)(&Progress::StepWaitingOn {
            step_id: reporter.step_id.clone(),
            what: reporter.redactor.text(&what.into()),
        })
    });
}

/// Runs `future` with `reporter` as the current step's.
pub async fn reporting<F: std::future::Future>(reporter: WaitingReporter, future: F) -> F::Output {
    WAITING.scope(reporter, future).await
}
