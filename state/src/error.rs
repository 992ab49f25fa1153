use std::path::PathBuf;

/// Everything that can go wrong in the store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// The state file could not be created or opened.
    #[error("cannot open the state file `{path}`")]
    Open {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// SQLite refused a statement.
    #[error("state store: {0}")]
    Sqlite(#[from] rusqlite::Error),
    /// The file was written by a newer kmsflow.
    #[error(
        "the state file has schema version {found}, newer than this kmsflow understands ({supported}); upgrade kmsflow"
    )]
    SchemaTooNew { found: i64, supported: i64 },
    /// A file opened read-only that an older kmsflow wrote: reading it needs a migration.
    #[error(
        "the state file `{}` has schema version {found} and this kmsflow reads {supported}; it cannot be migrated read-only: run `kmsflow runs` once as a user who may write it (or on a copy)",
        path.display()
    )]
    SchemaTooOldToRead {
        path: PathBuf,
        found: i64,
        supported: i64,
    },
    /// An approval decision came too late: the run no longer waits, or the step was approved.
    #[error(
        "step `{step_id}` of run `{run_id}` is decided already (the run is {status}{}); an approval is decided once",
        if *approved { ", and the step was approved" } else { "" }
    )]
    Decided {
        run_id: String,
        step_id: String,
        status: String,
        approved: bool,
    },
    /// No run has this id (or prefix).
    #[error("no run `{0}` in the state file")]
    RunNotFound(String),
    /// A run id prefix matches several runs.
    #[error("run id prefix `{prefix}` is ambiguous: it matches {}", candidates.join(", "))]
    AmbiguousRunId {
        prefix: String,
        candidates: Vec<String>,
    },
    /// A stored value did not parse back.
    #[error("corrupt value in column `{column}`: {detail}")]
    Corrupt {
        column: &'static str,
        detail: String,
    },
    /// The transaction holding a batch of checkpoints failed to commit; none of them is stored.
    #[error("state store: commit failed: {0}")]
    CommitFailed(String),
    /// A run no longer holds its lock: another run took it over, or its lease ran out. A
    /// checkpoint that carries the fencing check fails whole, so nothing after it is applied.
    #[error(
        "run `{run_id}` no longer holds lock `{key}` ({why}); it stopped before changing anything else: \
         see `kmsflow runs`, and resume it once the other run is done"
    )]
    LeaseLost {
        key: String,
        run_id: String,
        why: String,
        /// The run that holds the lock now, if any (none: no row, or an expired lease).
        taken_by: Option<String>,
    },
    /// The writer thread is gone (it panicked or was closed).
    #[error("the state writer has stopped")]
    WriterGone,
}

pub(crate) fn corrupt(column: &'static str, detail: impl std::fmt::Display) -> StoreError {
    StoreError::Corrupt {
        column,
        detail: detail.to_string(),
    }
}
