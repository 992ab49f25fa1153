use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::Duration;

use chrono::{DateTime, Utc};
use rusqlite::Connection;
use serde_json::Value;

use crate::db::{Db, Row, args};
use crate::error::corrupt;
use crate::postgres::{PgConn, PgLocation};
use crate::records::{Approval, EventRecord, RunRecord, StepRecord};
use crate::{StoreError, schema};

/// How hard a commit tries to reach the disk.
///
/// `Full` (the default) survives a power loss. `Normal` survives a crash of the process but
/// may lose the last commits on a power loss; since every step is idempotent, such a loss costs
/// one step being observed again, never a duplicated change. PostgreSQL always commits with
/// `synchronous_commit` on: a team's store is not the place to trade durability for speed.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum Durability {
    #[default]
    Full,
    Normal,
}

impl Durability {
    fn pragma(self) -> &'static str {
        match self {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        }
    }
}

/// Where the state lives: a SQLite file on this machine, or a PostgreSQL database a team shares.
#[derive(Debug, Clone)]
pub enum Location {
    File(PathBuf),
    Postgres(Box<PgLocation>),
}

impl Location {
    /// A `postgres://` (or `postgresql://`) URL names a database; anything else is a path.
    pub fn parse(text: &str) -> Result<Location, StoreError> {
        if crate::postgres::is_postgres_url(text) {
            Ok(Location::Postgres(Box::new(PgLocation::parse(text)?)))
        } else {
            Ok(Location::File(PathBuf::from(text)))
        }
    }

    /// The state file, for a file store.
    pub fn file(&self) -> Option<&Path> {
        match self {
            Location::File(path) => Some(path),
            Location::Postgres(_) => None,
        }
    }
}

impl From<PathBuf> for Location {
    fn from(path: PathBuf) -> Location {
        Location::File(path)
    }
}

impl From<&Path> for Location {
    fn from(path: &Path) -> Location {
        Location::File(path.to_owned())
    }
}

/// Shown in messages: the path, or the URL without its password.
impl std::fmt::Display for Location {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Location::File(path) => write!(f, "{}", path.display()),
            Location::Postgres(pg) => write!(f, "{pg}"),
        }
    }
}

/// An open store: a state file or a session with the team's database.
pub struct Store {
    backend: Backend,
    location: Location,
}

enum Backend {
    Sqlite(Connection, Files),
    /// Behind a mutex because reads take `&self` and the session needs `&mut` to prepare.
    Postgres(Mutex<PgConn>),
}

/// The identity (device and inode) of a state file and of its write-ahead log, as first seen.
struct Files {
    database: std::path::PathBuf,
    wal: std::path::PathBuf,
    database_id: Option<(u64, u64)>,
    /// Learnt at the first check that finds the log (SQLite makes it at the first write).
    wal_id: std::sync::OnceLock<(u64, u64)>,
}

impl Files {
    fn of(path: &Path) -> Files {
        let mut wal = path.as_os_str().to_owned();
        wal.push("-wal");
        Files {
            database: path.to_owned(),
            wal: wal.into(),
            database_id: file_id(path),
            wal_id: std::sync::OnceLock::new(),
        }
    }

    fn intact(&self) -> Result<(), StoreError> {
        let vanished = |what, path: &Path| StoreError::Vanished {
            what,
            path: path.to_owned(),
        };
        if self.database_id.is_some() && file_id(&self.database) != self.database_id {
            return Err(vanished("database file", &self.database));
        }
        match (file_id(&self.wal), self.wal_id.get()) {
            (Some(now), Some(then)) if now != *then => {
                Err(vanished("write-ahead log (`-wal`)", &self.wal))
            }
            (None, Some(_)) => Err(vanished("write-ahead log (`-wal`)", &self.wal)),
            (Some(now), None) => {
                let _ = self.wal_id.set(now);
                Ok(())
            }
            _ => Ok(()),
        }
    }
}

/// A file's device and inode, if it exists.
fn file_id(path: &Path) -> Option<(u64, u64)> {
    let metadata = std::fs::metadata(path).ok()?;
    #[cfg(unix)]
    {
        use std::os::unix::fs::MetadataExt;
        Some((metadata.dev(), metadata.ino()))
    }
    #[cfg(not(unix))]
    {
        let _ = metadata;
        Some((0, 0))
    }
}

impl std::fmt::Debug for Store {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Store")
            .field("location", &self.location.to_string())
            .finish()
    }
}

/// How long a SQLite writer waits for another's transaction.
const BUSY_TIMEOUT: Duration = Duration::from_secs(10);

/// Sets a state file's journal, durability and constraints, and brings its schema up to date.
fn prepare_file(conn: &mut Connection, durability: Durability) -> Result<(), StoreError> {
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(None, "synchronous", durability.pragma())?;
    conn.pragma_update(None, "foreign_keys", "ON")?;
    schema::migrate(conn)
}

impl Store {
    /// Opens (creating if needed) and migrates the store. A state file is created mode 0600
    /// in a 0700 folder; a database is migrated under an advisory lock.
    pub fn open(location: &Location, durability: Durability) -> Result<Store, StoreError> {
        match location {
            Location::File(path) => Store::open_file(path, durability),
            Location::Postgres(pg) => {
                let mut conn = pg.connect()?;
                conn.migrate()?;
                Ok(Store {
                    backend: Backend::Postgres(Mutex::new(conn)),
                    location: location.clone(),
                })
            }
        }
    }

    pub fn open_file(path: &Path, durability: Durability) -> Result<Store, StoreError> {
        create_private(path).map_err(|source| StoreError::Open {
            path: path.to_owned(),
            source,
        })?;
        let mut conn = Connection::open(path)?;
        // Several kmsflow processes may share one file (locks are how they coordinate), so a
        // writer waits for another's transaction instead of failing at once.
        conn.busy_timeout(BUSY_TIMEOUT)?;
        // A fresh file's switch to WAL and its migrations upgrade locks that SQLite refuses at
        // once, without waiting, when another connection is upgrading too (waiting would
        // deadlock them): the loser backs off and tries again, within the busy timeout.
        let deadline = std::time::Instant::now() + BUSY_TIMEOUT;
        let mut backoff = Duration::from_millis(2);
        loop {
            match prepare_file(&mut conn, durability) {
                Err(StoreError::Sqlite(rusqlite::Error::SqliteFailure(e, _)))
                    if e.code == rusqlite::ErrorCode::DatabaseBusy
                        && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(Duration::from_millis(100));
                }
                prepared => break prepared?,
            }
        }
        Ok(Store {
            backend: Backend::Sqlite(conn, Files::of(path)),
            location: Location::File(path.to_owned()),
        })
    }

    /// Whether the state file and its write-ahead log are still the files this store opened:
    /// a file deleted or replaced under an open SQLite connection takes what is written to it
    /// from then on with it, so a writer checks after each commit and stops rather than go on
    /// (or report success) writing to a file nobody will read. Nothing to check on PostgreSQL.
    pub fn files_intact(&self) -> Result<(), StoreError> {
        match &self.backend {
            Backend::Sqlite(_, files) => files.intact(),
            Backend::Postgres(_) => Ok(()),
        }
    }

    /// Opens an existing state file for reading only: for read commands on a file this user
    /// may not write (a copy from CI, a colleague's file, a read-only mount). Nothing is
    /// created or migrated; a file an older kmsflow wrote is refused with what to do.
    pub fn open_read_only(path: &Path) -> Result<Store, StoreError> {
        use rusqlite::OpenFlags;
        let flags = OpenFlags::SQLITE_OPEN_READ_ONLY | OpenFlags::SQLITE_OPEN_URI;
        let opened = Connection::open_with_flags(path, flags).and_then(|conn| {
            conn.query_row("PRAGMA user_version", [], |row| row.get::<_, i64>(0))
                .map(|version| (conn, version))
        });
        // A WAL file needs its shared-memory file, which a reader that may not write cannot
        // create: then read it as an immutable file (nobody this user can stop writes it).
        let (conn, found) = match opened {
            Ok(opened) => opened,
            Err(_) => {
                let uri = format!(
                    "file:{}?immutable=1",
                    path.display()
                        .to_string()
                        .replace('?', "%3f")
                        .replace('#', "%23")
                );
                let conn = Connection::open_with_flags(&uri, flags)?;
                let version = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
                (conn, version)
            }
        };
        conn.busy_timeout(Duration::from_secs(10))?;
        if found > schema::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooNew {
                found,
                supported: schema::SCHEMA_VERSION,
            });
        }
        if found < schema::SCHEMA_VERSION {
            return Err(StoreError::SchemaTooOldToRead {
                path: path.to_owned(),
                found,
                supported: schema::SCHEMA_VERSION,
            });
        }
        Ok(Store {
            backend: Backend::Sqlite(conn, Files::of(path)),
            location: Location::File(path.to_owned()),
        })
    }

    /// Where this store reads and writes.
    pub fn location(&self) -> &Location {
        &self.location
    }

    /// Which backend holds the state: `sqlite` or `postgres`.
    pub fn backend_name(&self) -> &'static str {
        match self.backend {
            Backend::Sqlite(..) => "sqlite",
            Backend::Postgres(_) => "postgres",
        }
    }

    /// The connection, for one statement or one transaction. A PostgreSQL session that broke
    /// since its last use (the server restarted, the network dropped it) is replaced first, if
    /// the server answers; otherwise the statement fails with the session's error.
    pub(crate) fn db(&self) -> Db<'_> {
        match &self.backend {
            Backend::Sqlite(conn, _) => Db::Sqlite(conn),
            // A panic while the session was held leaves it as it was: the next statement
            // finds out whether it still works.
            Backend::Postgres(conn) => {
                let mut session = conn.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
                if let (true, Location::Postgres(pg)) = (session.is_closed(), &self.location) {
                    match pg.connect() {
                        Ok(fresh) => *session = fresh,
                        Err(error) => tracing::debug!(%error, "the state database is not back yet"),
                    }
                }
                Db::Postgres(session)
            }
        }
    }

    /// Replaces a PostgreSQL session that broke with a new one, or says why it cannot; a file
    /// store has nothing to reconnect.
    pub(crate) fn reconnect_if_lost(&mut self) -> Result<(), StoreError> {
        let Backend::Postgres(conn) = &mut self.backend else {
            return Ok(());
        };
        let conn = conn
            .get_mut()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if let (true, Location::Postgres(pg)) = (conn.is_closed(), &self.location) {
            *conn = pg.connect()?;
        }
        Ok(())
    }

    /// What the PostgreSQL server says of transaction `xid` (`committed`, `aborted`,
    /// `in progress`, or nothing when it no longer knows it); nothing for a file store, whose
    /// commits are never in doubt.
    pub(crate) fn transaction_status(&mut self, xid: i64) -> Result<Option<String>, StoreError> {
        if !matches!(self.backend, Backend::Postgres(_)) {
            return Ok(None);
        }
        Ok(self
            .db()
            .query_opt(crate::postgres::STATUS_OF_TRANSACTION, args![xid], |row| {
                row.get::<Option<String>>(0)
            })?
            .flatten())
    }

    /// Applies writes in one transaction, for callers that do not need group commit.
    pub fn commit(&mut self, writes: &[crate::Write]) -> Result<(), StoreError> {
        self.db().transaction(|tx| {
            for write in writes {
                crate::write::apply(tx, write)?;
            }
            Ok(())
        })
    }

    /// Resolves a full run id or a unique prefix of one.
    pub fn resolve_run_id(&self, id_or_prefix: &str) -> Result<String, StoreError> {
        let mut db = self.db();
        let exact: Option<String> = db.query_opt(
            "SELECT id FROM runs WHERE id = ?1",
            args![id_or_prefix],
            |row| row.get(0),
        )?;
        if let Some(id) = exact {
            return Ok(id);
        }
        let candidates: Vec<String> = db.query(
            "SELECT id FROM runs WHERE substr(id, 1, length(?1)) = ?1 ORDER BY id LIMIT 6",
            args![id_or_prefix],
            |row| row.get(0),
        )?;
        match candidates.len() {
            0 => Err(StoreError::RunNotFound(id_or_prefix.to_owned())),
            1 => Ok(candidates.into_iter().next().expect("one candidate")),
            _ => Err(StoreError::AmbiguousRunId {
                prefix: id_or_prefix.to_owned(),
                candidates,
            }),
        }
    }

    /// One run, by exact id.
    pub fn run(&self, run_id: &str) -> Result<RunRecord, StoreError> {
        self.db()
            .query_opt(
                &format!("SELECT {RUN_COLUMNS} FROM runs WHERE id = ?1"),
                args![run_id],
                run_from_row,
            )?
            .ok_or_else(|| StoreError::RunNotFound(run_id.to_owned()))
    }

    /// The most recent runs first, at most `limit`.
    pub fn runs(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_where(limit, "")
    }

    /// The most recent runs that are no rollout's targets, at most `limit` (a rollout's runs
    /// are listed by `show ROLLOUT`).
    pub fn runs_outside_rollouts(&self, limit: usize) -> Result<Vec<RunRecord>, StoreError> {
        self.runs_where(
            limit,
            "WHERE NOT EXISTS (SELECT 1 FROM rollout_targets t WHERE t.run_id = runs.id)",
        )
    }

    fn runs_where(&self, limit: usize, filter: &str) -> Result<Vec<RunRecord>, StoreError> {
        self.db().query(
            &format!(
                "SELECT {RUN_COLUMNS} FROM runs {filter} ORDER BY started_at DESC, id DESC LIMIT ?1"
            ),
            args![limit as i64],
            run_from_row,
        )
    }

    /// The steps of a run, in the runbook's execution order.
    pub fn steps(&self, run_id: &str) -> Result<Vec<StepRecord>, StoreError> {
        self.db().query(
            "SELECT step_id, uses, status, attempts, before_image, planned_outcome, outputs, outcome,
                    error, started_at, finished_at
             FROM steps WHERE run_id = ?1 ORDER BY position",
            args![run_id],
            step_from_row,
        )
    }

    /// The journal of a run, oldest first.
    pub fn events(&self, run_id: &str) -> Result<Vec<EventRecord>, StoreError> {
        self.events_after(run_id, 0)
    }

    /// A run's (or rollout's) journal after sequence number `seq`: what a follower has not
    /// printed yet.
    pub fn events_after(&self, run_id: &str, seq: i64) -> Result<Vec<EventRecord>, StoreError> {
        self.db().query(
            "SELECT seq, run_id, step_id, at, kind, detail FROM events
             WHERE run_id = ?1 AND seq > ?2 ORDER BY seq",
            args![run_id, seq],
            |row| {
                Ok(EventRecord {
                    seq: row.get(0)?,
                    run_id: row.get(1)?,
                    step_id: row.get(2)?,
                    at: timestamp(row.get::<String>(3)?, "events.at")?,
                    kind: row.get(4)?,
                    detail: json(row.get::<String>(5)?, "events.detail")?,
                })
            },
        )
    }

    /// The newest journal entry's sequence number (0 for an empty journal).
    pub fn last_event_seq(&self) -> Result<i64, StoreError> {
        self.db()
            .query_one("SELECT coalesce(max(seq), 0) FROM events", args![], |row| {
                row.get(0)
            })
    }

    /// Entries of `kind` after `seq`, oldest first, as (sequence number, run or rollout id):
    /// how a process learns of a request another process journaled (`cancel_requested`).
    pub fn events_of_kind_after(
        &self,
        kind: &str,
        seq: i64,
    ) -> Result<Vec<(i64, String)>, StoreError> {
        self.db().query(
            "SELECT seq, run_id FROM events WHERE seq > ?1 AND kind = ?2 ORDER BY seq",
            args![seq, kind],
            |row| Ok((row.get(0)?, row.get(1)?)),
        )
    }

    /// The approvals recorded for a run.
    pub fn approvals(&self, run_id: &str) -> Result<Vec<Approval>, StoreError> {
        self.db().query(
            "SELECT step_id, approved_by, approved_at FROM approvals WHERE run_id = ?1 ORDER BY step_id",
            args![run_id],
            |row| {
                Ok(Approval {
                    step_id: row.get(0)?,
                    approved_by: row.get(1)?,
                    approved_at: timestamp(row.get::<String>(2)?, "approvals.approved_at")?,
                })
            },
        )
    }
}

const RUN_COLUMNS: &str = "id, runbook, runbook_ref, content_hash, \
     (SELECT source FROM runbook_sources WHERE runbook_sources.content_hash = runs.content_hash), \
     params, secret_params, status, \
     started_at, finished_at, error, outputs, lock_key, \
     (SELECT fragments FROM runbook_sources WHERE runbook_sources.content_hash = runs.content_hash)";

fn run_from_row(row: &Row<'_>) -> Result<RunRecord, StoreError> {
    Ok(RunRecord {
        id: row.get(0)?,
        runbook: row.get(1)?,
        runbook_ref: row.get(2)?,
        content_hash: row.get(3)?,
        source: row.get(4)?,
        params: json(row.get::<String>(5)?, "runs.params")?,
        secret_params: serde_json::from_str(&row.get::<String>(6)?)
            .map_err(|e| corrupt("runs.secret_params", e))?,
        status: parse(row.get::<String>(7)?, "runs.status")?,
        started_at: timestamp(row.get::<String>(8)?, "runs.started_at")?,
        finished_at: opt_timestamp(row.get(9)?, "runs.finished_at")?,
        error: row.get(10)?,
        outputs: opt_json(row.get(11)?, "runs.outputs")?,
        lock_key: row.get(12)?,
        fragments: json(row.get::<String>(13)?, "runbook_sources.fragments")?,
    })
}

fn step_from_row(row: &Row<'_>) -> Result<StepRecord, StoreError> {
    Ok(StepRecord {
        step_id: row.get(0)?,
        uses: row.get(1)?,
        status: parse(row.get::<String>(2)?, "steps.status")?,
        attempts: row.get(3)?,
        before_image: opt_json(row.get(4)?, "steps.before_image")?,
        planned_outcome: row
            .get::<Option<String>>(5)?
            .map(|s| parse(s, "steps.planned_outcome"))
            .transpose()?,
        outputs: opt_json(row.get(6)?, "steps.outputs")?,
        outcome: row
            .get::<Option<String>>(7)?
            .map(|s| parse(s, "steps.outcome"))
            .transpose()?,
        error: row.get(8)?,
        started_at: opt_timestamp(row.get(9)?, "steps.started_at")?,
        finished_at: opt_timestamp(row.get(10)?, "steps.finished_at")?,
    })
}

pub(crate) fn parse<T: std::str::FromStr<Err = String>>(
    text: String,
    column: &'static str,
) -> Result<T, StoreError> {
    text.parse().map_err(|e| corrupt(column, e))
}

pub(crate) fn json(text: String, column: &'static str) -> Result<Value, StoreError> {
    serde_json::from_str(&text).map_err(|e| corrupt(column, e))
}

fn opt_json(text: Option<String>, column: &'static str) -> Result<Option<Value>, StoreError> {
    text.map(|t| json(t, column)).transpose()
}

pub(crate) fn timestamp(text: String, column: &'static str) -> Result<DateTime<Utc>, StoreError> {
    DateTime::parse_from_rfc3339(&text)
        .map(|t| t.with_timezone(&Utc))
        .map_err(|e| corrupt(column, e))
}

pub(crate) fn opt_timestamp(
    text: Option<String>,
    column: &'static str,
) -> Result<Option<DateTime<Utc>>, StoreError> {
    text.map(|t| timestamp(t, column)).transpose()
}

/// Creates the folder the state file `path` lives in (0700), if it does not exist yet. Files
/// kept beside the state (the sandbox's world) need it before the store is first opened.
pub fn create_private_folder(path: &Path) -> std::io::Result<()> {
    if let Some(parent) = path
        .parent()
        .filter(|p| !p.as_os_str().is_empty() && !p.exists())
    {
        let mut builder = std::fs::DirBuilder::new();
        builder.recursive(true);
        #[cfg(unix)]
        std::os::unix::fs::DirBuilderExt::mode(&mut builder, 0o700);
        builder.create(parent)?;
    }
    Ok(())
}

/// What kind of thing a path that is not a regular file is, for an error.
pub fn describe_file_type(file_type: &std::fs::FileType) -> &'static str {
    #[cfg(unix)]
    {
        use std::os::unix::fs::FileTypeExt;
        if file_type.is_fifo() {
            return "a named pipe";
        }
        if file_type.is_socket() {
            return "a socket";
        }
        if file_type.is_block_device() || file_type.is_char_device() {
            return "a device";
        }
    }
    if file_type.is_dir() {
        "a folder"
    } else {
        "not a regular file"
    }
}

/// Creates the file with mode 0600 (and its folder with 0700) before SQLite opens it, so the
/// state is never readable by other users, not even for an instant. SQLite creates the WAL and
/// shared-memory files with the database file's mode.
fn create_private(path: &Path) -> std::io::Result<()> {
    create_private_folder(path)?;
    // Only a file that does not exist yet is opened here. Closing any descriptor of a file
    // drops every POSIX lock this process holds on it, SQLite's included. A daemon opens the
    // state file again while its writer holds it open; had that dropped the writer's shared
    // lock, a short-lived second process (`kmsflow runs`) closing its connection would think
    // itself the last one, checkpoint and delete the WAL under the daemon, and corrupt the file.
    if let Ok(metadata) = std::fs::metadata(path) {
        // A FIFO would hang SQLite's open, a folder or a device is no state file: refused
        // with what it is.
        if !metadata.is_file() {
            return Err(std::io::Error::new(
                std::io::ErrorKind::InvalidInput,
                format!(
                    "it is not a regular file (it is {}); point --state or KMSFLOW_STATE at a state file",
                    describe_file_type(&metadata.file_type())
                ),
            ));
        }
        return Ok(());
    }
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    match options.open(path) {
        Ok(_) => Ok(()),
        // Another process created it between the check and now.
        Err(error) if error.kind() == std::io::ErrorKind::AlreadyExists => Ok(()),
        Err(error) => Err(error),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Set in a child process: the state file it opens and closes.
    const OPEN_AND_CLOSE: &str = "KMSFLOW_TEST_OPEN_AND_CLOSE";

    #[test]
    fn opening_a_store_again_keeps_the_locks_this_processs_connections_hold() {
        if let Ok(path) = std::env::var(OPEN_AND_CLOSE) {
            // The child: a short-lived `kmsflow runs` beside a daemon.
            let store = Store::open_file(Path::new(&path), Durability::Normal).unwrap();
            store.runs(1).unwrap();
            drop(store);
            std::process::exit(0);
        }
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        let mut holder = Store::open_file(&path, Durability::Normal).unwrap();
        holder
            .commit(&[crate::Write::Event {
                run_id: "r".into(),
                step_id: None,
                kind: "k".into(),
                detail: serde_json::json!({}),
                at: chrono::Utc::now(),
            }])
            .unwrap();
        let wal = dir.path().join("state.db-wal");
        assert!(wal.exists());
        // What a daemon does every tick while its writer keeps the file open.
        let _again = Store::open_file(&path, Durability::Normal).unwrap();
        let child = std::process::Command::new(std::env::current_exe().unwrap())
            .args([
                "--exact",
                "store::tests::opening_a_store_again_keeps_the_locks_this_processs_connections_hold",
            ])
            .env(OPEN_AND_CLOSE, &path)
            .output()
            .unwrap();
        assert!(child.status.success());
        assert!(
            wal.exists(),
            "the other process took itself for the last connection and removed the WAL in use"
        );
        assert_eq!(holder.events("r").unwrap().len(), 1);
    }
}
