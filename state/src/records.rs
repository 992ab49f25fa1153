use chrono::{DateTime, Utc};
use serde::{Deserialize, Serialize};
use serde_json::Value;

macro_rules! string_enum {
    ($(#[$meta:meta])* $name:ident { $($(#[$vmeta:meta])* $variant:ident => $text:literal),+ $(,)? }) => {
        $(#[$meta])*
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        pub enum $name { $($(#[$vmeta])* $variant),+ }

        impl $name {
            /// The word stored in the database and printed by the CLI.
            pub fn as_str(self) -> &'static str {
                match self { $(Self::$variant => $text),+ }
            }
        }

        impl std::str::FromStr for $name {
            type Err = String;
            fn from_str(s: &str) -> Result<Self, String> {
                match s { $($text => Ok(Self::$variant),)+ other => Err(format!("unknown {} `{other}`", stringify!($name))) }
            }
        }

        impl std::fmt::Display for $name {
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result { f.pad(self.as_str()) }
        }
    };
}

string_enum! {
    /// Where a run stands.
    RunStatus {
        /// Steps are executing (or the process died while they were).
        Running => "running",
        /// Every step succeeded or was skipped.
        Succeeded => "succeeded",
        /// A step failed after its retries; resumable.
        Failed => "failed",
        /// Stopped by Ctrl-C; resumable.
        Interrupted => "interrupted",
        /// Paused at an `approve` step; resumable after `kmsflow approve`.
        Waiting => "waiting",
        /// Everything the run changed was undone.
        RolledBack => "rolled_back",
        /// A rollback could not undo everything.
        RollbackFailed => "rollback_failed",
        /// A rollback is undoing the run's changes (or died while it was): `rollback`
        /// continues it, `resume` refuses it.
        RollingBack => "rolling_back",
    }
}

string_enum! {
    /// What a schedule does with an occurrence that finds its previous run still going.
    Overlap {
        /// Record it `skipped`.
        Skip => "skip",
        /// Keep one, and start it when the previous run ends.
        BufferOne => "buffer_one",
        /// Start it regardless.
        Allow => "allow",
    }
}

string_enum! {
    /// What became of one occurrence of a schedule.
    FireOutcome {
        /// Claimed by a daemon, whose run is about to be created (it becomes `started` in the
        /// transaction that creates the run).
        Claimed => "claimed",
        /// Its run was started (the fire's run id names it).
        Started => "started",
        /// The previous run was still going.
        Skipped => "skipped",
        /// The daemon was not running, or it was older than the catch-up window.
        Missed => "missed",
        /// Kept, to start when the previous run ends.
        Buffered => "buffered",
        /// A daemon stopped before its run was created.
        Lost => "lost",
    }
}

string_enum! {
    /// Where one step of a run stands.
    StepStatus {
        Pending => "pending",
        Running => "running",
        Succeeded => "succeeded",
        Failed => "failed",
        Skipped => "skipped",
        RolledBack => "rolled_back",
    }
}

string_enum! {
    /// What a succeeded step did to the world.
    Outcome {
        /// It found the world as wanted and wrote nothing.
        Unchanged => "unchanged",
        /// It created something that was absent.
        Created => "created",
        /// It changed something that existed.
        Updated => "updated",
        /// It performed an action (a POST, a wait).
        Invoked => "invoked",
    }
}

impl Outcome {
    /// Whether the step changed the world, so rollback has something to undo.
    pub fn changed_something(self) -> bool {
        !matches!(self, Outcome::Unchanged)
    }
}

impl RunStatus {
    /// Whether `resume` can continue a run in this status.
    pub fn is_resumable(self) -> bool {
        matches!(
            self,
            RunStatus::Running | RunStatus::Failed | RunStatus::Interrupted | RunStatus::Waiting
        )
    }
}

/// One run as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct RunRecord {
    pub id: String,
    /// The runbook's `name`.
    pub runbook: String,
    /// Where the runbook came from: a path, or `bundled:<name>`.
    pub runbook_ref: String,
    /// SHA-256 of the runbook text the run executes.
    pub content_hash: String,
    /// The runbook text itself, so a run can be shown and rolled back without its file.
    pub source: String,
    /// Bound parameters, without any parameter marked secret.
    pub params: Value,
    /// Names of the secret parameters (their values are never stored).
    pub secret_params: Vec<String>,
    pub status: RunStatus,
    pub started_at: DateTime<Utc>,
    pub finished_at: Option<DateTime<Utc>>,
    pub error: Option<String>,
    pub outputs: Option<Value>,
    pub lock_key: Option<String>,
    /// The fragments the runbook includes, as a JSON list kept with its text.
    pub fragments: Value,
}

/// One step of a run as stored.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepRecord {
    pub step_id: String,
    pub uses: String,
    pub status: StepStatus,
    /// Attempts made so far, across resumes.
    pub attempts: u32,
    /// What `observe` saw before the step first changed anything: rollback restores it.
    pub before_image: Option<Value>,
    /// The change the step set out to make when it checkpointed its before image.
    pub planned_outcome: Option<Outcome>,
    pub outputs: Option<Value>,
    pub outcome: Option<Outcome>,
    pub error: Option<String>,
    pub started_at: Option<DateTime<Utc>>,
    pub finished_at: Option<DateTime<Utc>>,
}

/// One entry of the append-only journal.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct EventRecord {
    pub seq: i64,
    pub run_id: String,
    pub step_id: Option<String>,
    pub at: DateTime<Utc>,
    pub kind: String,
    pub detail: Value,
}

/// Who approved an `approve` step, and when.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Approval {
    pub step_id: String,
    pub approved_by: String,
    pub approved_at: DateTime<Utc>,
}
