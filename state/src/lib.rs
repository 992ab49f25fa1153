//! The store of kmsflow: a SQLite file for one person on one machine, or a PostgreSQL
//! database a team's runners, workers and daemons share.
//!
//! Every SQL statement of the project lives in this crate, written once for both backends
//! ([`db`] runs them). The store keeps runs, their steps, an append-only journal of every
//! transition, run locks and approvals: in one file (WAL mode, created 0600, schema versioned
//! with `PRAGMA user_version`), or in a database (schema versioned in `kmsflow_schema`,
//! migrated under an advisory lock).
//!
//! Writes go through [`Writer`], a dedicated thread that owns the connection and commits
//! whatever checkpoints are waiting in one transaction (group commit), so steps that finish
//! together share one device flush. Reads use their own short-lived [`Store`].

mod copy;
mod db;
mod entra;
mod error;
mod lock;
mod postgres;
mod probe;
mod queue;
mod records;
mod rollout;
mod schedule;
mod schema;
mod store;
mod write;
mod writer;

pub use copy::Copied;
pub use entra::{AccessToken, REFRESH_BEFORE, TokenSource};
pub use error::{PgError, StoreError};
pub use lock::{LockGrant, LockHeld, LockOwner};
pub use postgres::{PgLocation, is_postgres_url, mask_password};
pub use probe::{measure_checkpoint_commits, measure_raw_commits, measure_raw_postgres_commits};
pub use queue::{NewQueued, QueueStatus, QueuedEnd, QueuedRun};
pub use records::{
    Approval, EventRecord, FireOutcome, Outcome, Overlap, RunRecord, RunStatus, StepRecord,
    StepStatus,
};
pub use rollout::{
    NewRollout, NewTarget, ROLLOUT_PREFIX, RolloutRecord, RolloutTargetRecord, Withdrawn,
};
pub use schedule::{FireRecord, ScheduleRecord, mask_url};
pub use store::{Durability, Location, Store, create_private_folder, describe_file_type};
pub use write::{NewRun, Write};
pub use writer::{Exclusive, Writer, WriterThread};
