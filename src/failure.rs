//! Every way a command can end other than success, and the exit code each maps to.
//! This is the one place exit codes are chosen.

use kmsflow_engine::Diagnostics;
use kmsflow_engine::launch::LaunchError;
use kmsflow_engine::params::BindErrors;
use kmsflow_state::{LockHeld, RunStatus, StoreError};

/// Exit codes, as documented in the README.
pub mod code {
    pub const SUCCESS: u8 = 0;
    pub const RUN_FAILED: u8 = 1;
    pub const USAGE: u8 = 2;
    pub const LOCK_HELD: u8 = 3;
    pub const PAUSED: u8 = 4;
    pub const CHANGES: u8 = 5;
}

/// Why a command did not succeed.
#[derive(Debug, thiserror::Error)]
pub enum Failure {
    /// Bad arguments, unreadable files, a runbook that does not exist.
    #[error("{0}")]
    Usage(String),
    /// The runbook has problems (printed as diagnostics).
    #[error(transparent)]
    Invalid(Diagnostics),
    #[error("invalid parameters:\n{0}")]
    Params(BindErrors),
    #[error("{0}\n  the run holding it: `kmsflow show {run}`", run = .0.run_id)]
    LockHeld(LockHeld),
    /// Another `--sandbox` command holds the sandbox kept beside this state.
    #[error("{0}")]
    SandboxHeld(String),
    #[error(transparent)]
    Launch(LaunchError),
    /// A fleet check that could not read a single cluster (no credential).
    #[error("{0}")]
    NotChecked(String),
    /// The user did not answer `yes` when asked; nothing was changed.
    #[error("not confirmed: nothing was changed")]
    Declined,
    /// A run ended in a status that is not success; the summary was already printed.
    #[error("run `{run_id}` {status}")]
    RunEnded { run_id: String, status: RunStatus },
}

impl From<LaunchError> for Failure {
    fn from(error: LaunchError) -> Failure {
        match error {
            LaunchError::LockHeld(held) => Failure::LockHeld(held),
            LaunchError::Store(StoreError::RunNotFound(id)) => Failure::Usage(format!(
                "no run `{id}` in the state file; `kmsflow runs` lists them"
            )),
            LaunchError::Store(e @ StoreError::AmbiguousRunId { .. })
            | LaunchError::Store(e @ StoreError::Decided { .. }) => Failure::Usage(e.to_string()),
            LaunchError::NotResumable { .. }
            | LaunchError::NotRollbackable { .. }
            | LaunchError::RollingBack { .. }
            | LaunchError::NotWaiting { .. }
            | LaunchError::AlreadyApproved { .. }
            | LaunchError::Params(_)
            | LaunchError::UnknownStep { .. }
            | LaunchError::NotAnApproval { .. } => Failure::Usage(error.to_string()),
            other => Failure::Launch(other),
        }
    }
}

impl From<StoreError> for Failure {
    fn from(error: StoreError) -> Failure {
        Failure::from(LaunchError::Store(error))
    }
}

impl Failure {
    pub fn exit_code(&self) -> u8 {
        match self {
            Failure::Usage(_) | Failure::Invalid(_) | Failure::Params(_) => code::USAGE,
            Failure::LockHeld(_) | Failure::SandboxHeld(_) => code::LOCK_HELD,
            Failure::Launch(_) | Failure::NotChecked(_) | Failure::Declined => code::RUN_FAILED,
            Failure::RunEnded { status, .. } => status_code(*status),
        }
    }
}

/// The exit code for a run's final status.
pub fn status_code(status: RunStatus) -> u8 {
    match status {
        RunStatus::Succeeded | RunStatus::RolledBack => code::SUCCESS,
        RunStatus::Interrupted | RunStatus::Waiting => code::PAUSED,
        RunStatus::Failed
        | RunStatus::RollbackFailed
        | RunStatus::RollingBack
        | RunStatus::Running => code::RUN_FAILED,
    }
}
