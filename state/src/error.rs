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
    /// PostgreSQL refused a statement, or the session to it broke.
    #[error("state store (PostgreSQL): {0}")]
    Postgres(#[from] PgError),
    /// A `postgres://` location that cannot be used as written.
    #[error("cannot use the state location `{location}`: {why}")]
    BadLocation { location: String, why: String },
    /// The PostgreSQL server could not be reached or refused the session.
    #[error("cannot connect to the state database `{location}`: {detail}; {what_to_check}")]
    Connect {
        location: String,
        detail: String,
        /// What to look at, which depends on how the location signs in.
        what_to_check: &'static str,
    },
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
    /// The PostgreSQL server took a session or a statement and did not answer within the
    /// bound: a frozen server, or something between that holds the connection open.
    #[error(
        "the PostgreSQL server did not answer {what} within {waited_s}s; the session is given up (is the server frozen or overloaded, or does a proxy hold the connection?)"
    )]
    Silent { what: &'static str, waited_s: u64 },
    /// The state file, or its write-ahead log, was deleted or replaced under the open store:
    /// what was committed since may be in no file that anyone can read.
    #[error(
        "the state file's {what} was deleted or replaced while kmsflow had it open ({path}); what this run committed since may be lost: the run stops here. Put the file back if you can, then `kmsflow show` tells what is recorded; `kmsflow resume` observes the world again before it changes anything"
    )]
    Vanished { what: &'static str, path: PathBuf },
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
    /// `state migrate` would not copy: what is wrong and what to do.
    #[error("cannot copy the state: {0}")]
    CopyRefused(String),
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

/// What PostgreSQL answered: its SQLSTATE code, message and detail, or how the session broke.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PgError {
    /// The SQLSTATE code (`40001`, `23505`...), when the server answered.
    pub code: Option<String>,
    pub message: String,
    /// The session is gone (the server restarted, the network dropped it): what ran in it
    /// and was not committed is lost, and a new session may succeed.
    pub connection_lost: bool,
}

impl std::fmt::Display for PgError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match &self.code {
            Some(code) => write!(f, "{} (SQLSTATE {code})", self.message),
            None => f.write_str(&self.message),
        }
    }
}

impl std::error::Error for PgError {}

impl From<tokio_postgres::Error> for PgError {
    fn from(error: tokio_postgres::Error) -> PgError {
        match error.as_db_error() {
            Some(db) => {
                let mut message = db.message().to_owned();
                if let Some(detail) = db.detail() {
                    message.push_str(": ");
                    message.push_str(detail);
                }
                PgError {
                    code: Some(db.code().code().to_owned()),
                    message,
                    // The administrator shut the server down, or it crashes: class 57P.
                    connection_lost: db.code().code().starts_with("57P"),
                }
            }
            None => PgError {
                code: None,
                // The driver's own text names the kind ("error connecting to server"); the
                // cause (refused, timed out, a TLS failure) is in its sources.
                message: {
                    let mut message = error.to_string();
                    let mut source = std::error::Error::source(&error);
                    while let Some(cause) = source {
                        let cause_text = cause.to_string();
                        if !message.contains(&cause_text) {
                            message.push_str(": ");
                            message.push_str(&cause_text);
                        }
                        source = cause.source();
                    }
                    message
                },
                connection_lost: error.is_closed()
                    || std::error::Error::source(&error)
                        .is_some_and(|source| source.is::<std::io::Error>()),
            },
        }
    }
}

impl From<tokio_postgres::Error> for StoreError {
    fn from(error: tokio_postgres::Error) -> StoreError {
        StoreError::Postgres(error.into())
    }
}

impl StoreError {
    /// The session to PostgreSQL broke: the same work may succeed on a new one.
    pub fn is_connection_lost(&self) -> bool {
        // A session the server stopped answering is given up like a broken one.
        matches!(self, StoreError::Postgres(pg) if pg.connection_lost)
            || matches!(self, StoreError::Silent { .. })
    }
}
