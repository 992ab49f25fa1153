//! The SQLite store of kmsflow.
//!
//! Every SQL statement of the project lives in this crate. The store keeps runs, their steps,
//! an append-only journal of every transition, run locks and approvals in one file (WAL mode,
//! created 0600, schema versioned with `PRAGMA user_version`).
//!
//! Writes go through [`Writer`], a dedicated thread that owns the connection and commits
//! whatever checkpoints are waiting in one transaction (group commit), so steps that finish
//! together share one device flush. Reads use their own short-lived [`Store`].

mod error;
mod lock;
mod probe;
mod records;
mod rollout;
mod schedule;
mod schema;
mod store;
mod write;
mod writer;

pub use error::StoreError;
pub use lock::{LockGrant, LockHeld, LockOwner};
pub use probe::measure_raw_commits;
pub use records::{
    Approval, EventRecord, FireOutcome, Outcome, Overlap, RunRecord, RunStatus, StepRecord,
    StepStatus,
};
pub use rollout::{NewRollout, NewTarget, ROLLOUT_PREFIX, RolloutRecord, RolloutTargetRecord};
pub use schedule::{FireRecord, ScheduleRecord, mask_url};
pub use store::{Durability, Store, create_private_folder};
pub use write::{NewRun, Write};
pub use writer::{Exclusive, Writer, WriterThread};
