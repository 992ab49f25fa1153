//! The PostgreSQL backend: a team's state, shared by every runner, worker and daemon.
//!
//! The driver is tokio-postgres. Its connection task runs on a small runtime of the store's
//! own (one thread for the whole process), and the store's calls wait on their answers from
//! whichever thread asks: the store is synchronous like the SQLite one, and may be called from
//! inside the engine's async tasks without nesting a runtime.

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use chrono::{DateTime, Utc};
use serde_json::Value;
use tokio_postgres::config::{Host, SslMode};

use crate::StoreError;
use crate::db::Arg;
use crate::entra::{EntraPassword, TokenSource};

/// Where a PostgreSQL store lives, parsed from `postgres://user@host:port/db?sslmode=...`.
/// Shown without its password.
#[derive(Clone)]
pub struct PgLocation {
    config: tokio_postgres::Config,
    /// The URL without its password, for messages and `kmsflow runs`.
    shown: String,
    tls: Tls,
    /// `auth=entra`: the password is a Microsoft Entra token, got at each connect.
    entra: Option<Arc<EntraPassword>>,
}

/// How the connection is protected.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tls {
    /// No TLS: asked for (`sslmode=disable`), or the server is on this machine.
    Off,
    /// TLS with the server's certificate verified against the system's roots.
    Verified,
}

impl std::fmt::Debug for PgLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

impl std::fmt::Display for PgLocation {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.shown)
    }
}

/// How long data sent to the server may stay unacknowledged before the connection counts as
/// lost (`tcp_user_timeout`, unless the URL sets it).
const SILENT_FOR: Duration = Duration::from_secs(20);

/// Set on every session, whatever the server's defaults:
/// - a commit is acknowledged only once it is on the server's disk;
/// - a session that stops in the middle of a transaction (its runner partitioned away, paused,
///   frozen) is ended by the server after 10 s, which rolls it back and frees the writer lock
///   every other runner, worker and daemon waits for. kmsflow itself never waits inside a
///   transaction: a checkpoint's statements leave together, and nothing else happens between.
const SESSION_SETTINGS: &str =
    "SET synchronous_commit = on; SET idle_in_transaction_session_timeout = '10s'";

/// Whether `text` names a PostgreSQL store rather than a state file.
pub fn is_postgres_url(text: &str) -> bool {
    text.starts_with("postgres://") || text.starts_with("postgresql://")
}

impl PgLocation {
    /// Parses a `postgres://` URL. The password comes from the URL, else `PGPASSWORD`, else
    /// `~/.pgpass`. Without `sslmode`, a server on loopback or a Unix socket is reached
    /// without TLS and any other with TLS whose certificate is verified; `sslmode=require`
    /// (and `verify-full`) always verify, `disable` turns TLS off.
    pub fn parse(text: &str) -> Result<PgLocation, StoreError> {
        let bad = |why: String| StoreError::BadLocation {
            location: mask_password(text),
            why,
        };
        let mut url = url::Url::parse(text).map_err(|e| bad(e.to_string()))?;
        let mut sslmode = None;
        let mut entra = false;
        let mut kept = Vec::new();
        for (key, value) in url.query_pairs() {
            match (&*key, &*value) {
                ("sslmode", _) => sslmode = Some(value.into_owned()),
                ("auth", "entra") => entra = true,
                ("auth", "password") => entra = false,
                ("auth", other) => {
                    return Err(bad(format!(
                        "`auth={other}` is not one of `password` (the default: in the URL, \
                         PGPASSWORD or ~/.pgpass) and `entra` (a Microsoft Entra token from the \
                         credential the steps use)"
                    )));
                }
                _ => kept.push((key.into_owned(), value.into_owned())),
            }
        }
        if entra && url.password().is_some() {
            return Err(bad(
                "`auth=entra` signs in with a Microsoft Entra token: remove the password from \
                 the URL"
                    .into(),
            ));
        }
        let named = |key: &str| kept.iter().any(|(k, _)| k == key);
        let (tcp_user_timeout_named, keepalives_named) = (
            named("tcp_user_timeout"),
            named("keepalives_idle") || named("keepalives_interval") || named("keepalives_retries"),
        );
        url.set_query(None);
        if !kept.is_empty() {
            url.query_pairs_mut().extend_pairs(kept);
        }
        let mut config: tokio_postgres::Config = url
            .as_str()
            .parse()
            .map_err(|e: tokio_postgres::Error| bad(e.to_string()))?;
        if config.get_hosts().is_empty() {
            return Err(bad("the URL names no host".into()));
        }
        let local = config.get_hosts().iter().all(|host| match host {
            Host::Unix(_) => true,
            Host::Tcp(name) => {
                name == "localhost"
                    || name
                        .trim_matches(['[', ']'])
                        .parse::<std::net::IpAddr>()
                        .is_ok_and(|ip| ip.is_loopback())
            }
        });
        let tls = match sslmode.as_deref() {
            None if local => Tls::Off,
            None | Some("require" | "verify-ca" | "verify-full") => Tls::Verified,
            Some("disable") => Tls::Off,
            Some(other) => {
                return Err(bad(format!(
                    "sslmode `{other}` is not one of disable, require, verify-ca, verify-full"
                )));
            }
        };
        if entra && tls == Tls::Off && !local {
            // The token would open any database of the tenant that takes this identity: it
            // crosses a network only inside TLS.
            return Err(bad(
                "`auth=entra` sends a Microsoft Entra token as the password: it is never sent \
                 without TLS off this machine (drop `sslmode=disable`)"
                    .into(),
            ));
        }
        config.ssl_mode(match tls {
            Tls::Off => SslMode::Disable,
            Tls::Verified => SslMode::Require,
        });
        if config.get_application_name().is_none() {
            config.application_name("kmsflow");
        }
        if config.get_connect_timeout().is_none() {
            config.connect_timeout(Duration::from_secs(10));
        }
        // A partition drops packets without a word: without these a statement in flight waits
        // for the kernel to give up on the connection (about 15 minutes), and the run with
        // it. With them a silent connection is declared lost within about half a minute, and
        // the writer's reconnect-and-retry (bounded) takes over.
        if !tcp_user_timeout_named {
            config.tcp_user_timeout(SILENT_FOR);
        }
        if !keepalives_named {
            config
                .keepalives_idle(Duration::from_secs(15))
                .keepalives_interval(Duration::from_secs(5))
                .keepalives_retries(3);
        }
        // With `auth=entra` a password from the environment would be a mistake, and sending
        // it to the server a leak: it is not read.
        if config.get_password().is_none() && !entra {
            if let Some(password) = std::env::var_os("PGPASSWORD") {
                config.password(password.to_string_lossy().as_bytes());
            } else if let Some(password) = pgpass_password(&config) {
                config.password(password);
            }
        }
        Ok(PgLocation {
            config,
            shown: mask_password(text),
            tls,
            entra: entra.then(Default::default),
        })
    }

    /// Whether the URL says `auth=entra`, so the store needs a [`TokenSource`].
    pub fn uses_entra(&self) -> bool {
        self.entra.is_some()
    }

    /// Where this location's `auth=entra` tokens come from (for it and all its clones).
    /// Nothing for a location signing in with a password.
    pub fn use_token_source(&self, source: Arc<dyn TokenSource>) {
        if let Some(entra) = &self.entra {
            entra.set_source(source);
        }
    }

    /// Opens a session.
    pub(crate) fn connect(&self) -> Result<PgConn, StoreError> {
        let mut config = self.config.clone();
        if let Some(entra) = &self.entra {
            let password = entra
                .password(std::time::SystemTime::now(), |token| {
                    futures::executor::block_on(io().spawn(token))
                        .map_err(|e| format!("the token request stopped: {e}"))?
                })
                .map_err(|why| crate::entra::no_token(&self.shown, why))?;
            config.password(password);
        }
        let tls = self.tls;
        // Connecting, TLS and start-up together, bounded by twice the TCP connect timeout
        // (the URL's `connect_timeout`, else 10 s): a server that takes the connection and
        // never answers is an error, not a hang.
        let within = config
            .get_connect_timeout()
            .copied()
            .unwrap_or(Duration::from_secs(10))
            * 2;
        let connecting = io().spawn(async move {
            tokio::time::timeout(within, async move {
                let (client, connection) = match tls {
                    Tls::Off => {
                        let (client, connection) = config.connect(tokio_postgres::NoTls).await?;
                        (client, tokio::spawn(connection))
                    }
                    Tls::Verified => {
                        let (client, connection) = config.connect(verified_tls()?).await?;
                        (client, tokio::spawn(connection))
                    }
                };
                drop(connection);
                client.batch_execute(SESSION_SETTINGS).await?;
                Ok::<_, StoreError>(client)
            })
            .await
            .unwrap_or(Err(StoreError::Silent {
                what: "a new session (connection, TLS and start-up)",
                waited_s: within.as_secs(),
            }))
        });
        let client = futures::executor::block_on(connecting)
            .map_err(|e| {
                StoreError::CommitFailed(format!("the PostgreSQL connector stopped: {e}"))
            })?
            .map_err(|error| match error {
                StoreError::Postgres(pg) => StoreError::Connect {
                    location: self.shown.clone(),
                    detail: pg.to_string(),
                    what_to_check: if self.entra.is_some() {
                        "check that the server runs and takes Microsoft Entra sign-in, and that \
                         the URL's user is the role made for this identity (its token's `oid`)"
                    } else {
                        "check that the server runs and the URL, user and password (PGPASSWORD, \
                         ~/.pgpass) are right"
                    },
                },
                other => other,
            })?;
        Ok(PgConn {
            client,
            statements: HashMap::new(),
            pending: Vec::new(),
            tx: Tx::Idle,
            serial_now: None,
            xid: None,
            gathered: None,
            in_place: None,
        })
    }
}

/// The URL as it may be shown: its password replaced.
pub fn mask_password(text: &str) -> String {
    match url::Url::parse(text) {
        Ok(mut url) if url.password().is_some() => {
            let _ = url.set_password(Some("***"));
            url.to_string()
        }
        Ok(url) => url.to_string(),
        Err(_) => "(an unreadable postgres:// URL)".into(),
    }
}

/// The password `~/.pgpass` holds for this host, port, database and user, as libpq reads it
/// (`host:port:database:user:password`, `*` matching anything, `\` escaping `:` and `\`).
fn pgpass_password(config: &tokio_postgres::Config) -> Option<String> {
    let path = std::env::var_os("PGPASSFILE")
        .map(std::path::PathBuf::from)
        .or_else(|| dirs_home().map(|home| home.join(".pgpass")))?;
    let text = std::fs::read_to_string(path).ok()?;
    let host = match config.get_hosts().first()? {
        Host::Tcp(name) => name.clone(),
        Host::Unix(_) => "localhost".into(),
    };
    let port = config
        .get_ports()
        .first()
        .copied()
        .unwrap_or(5432)
        .to_string();
    let user = config.get_user().unwrap_or_default().to_owned();
    let dbname = config.get_dbname().unwrap_or(&user).to_owned();
    text.lines()
        .filter(|line| !line.starts_with('#'))
        .find_map(|line| {
            let fields = split_pgpass(line);
            let [h, p, d, u, password] = fields.as_slice() else {
                return None;
            };
            let matches = |field: &str, value: &str| field == "*" || field == value;
            (matches(h, &host) && matches(p, &port) && matches(d, &dbname) && matches(u, &user))
                .then(|| password.clone())
        })
}

fn split_pgpass(line: &str) -> Vec<String> {
    let mut fields = vec![String::new()];
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        match c {
            '\\' => {
                if let Some(next) = chars.next() {
                    fields.last_mut().expect("one field").push(next);
                }
            }
            ':' => fields.push(String::new()),
            c => fields.last_mut().expect("one field").push(c),
        }
    }
    fields
}

fn dirs_home() -> Option<std::path::PathBuf> {
    std::env::var_os("HOME").map(std::path::PathBuf::from)
}

fn verified_tls() -> Result<tokio_postgres_rustls::MakeRustlsConnect, StoreError> {
    let mut roots = rustls::RootCertStore::empty();
    let found = rustls_native_certs::load_native_certs();
    for cert in found.certs {
        let _ = roots.add(cert);
    }
    if roots.is_empty() {
        return Err(StoreError::CommitFailed(
            "no trusted root certificates on this machine to verify the PostgreSQL server's \
             certificate with (install ca-certificates, or use sslmode=disable on a private \
             network)"
                .into(),
        ));
    }
    let provider = std::sync::Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| StoreError::CommitFailed(e.to_string()))?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(tokio_postgres_rustls::MakeRustlsConnect::new(config))
}

/// The runtime that drives every PostgreSQL connection of this process.
fn io() -> &'static tokio::runtime::Runtime {
    static IO: OnceLock<tokio::runtime::Runtime> = OnceLock::new();
    IO.get_or_init(|| {
        tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("kmsflow-postgres")
            .enable_all()
            .build()
            .expect("start the PostgreSQL connection runtime")
    })
}

/// One session with the server, and the statements it has prepared.
///
/// Statements whose answers only need checking before the transaction goes on
/// ([`crate::db::Db::execute_then`], [`crate::db::Db::query_then`],
/// [`crate::db::Db::execute_enforced`]) are not sent one round trip each: they wait in
/// `pending`, and the next statement that must wait for the server (any other statement,
/// [`PgConn::settle`], COMMIT) first sends them all at once, in order, and checks their answers
/// in order. BEGIN goes with them too.
///
/// COMMIT itself goes in that same round trip when every pending check is the server's own (a
/// statement that raises, a key, a constraint): the first failure aborts the transaction, the
/// server answers the COMMIT behind it by rolling back, and the answers, read in order, say
/// which statement failed. A check made here on the rows (`query_then`) instead makes COMMIT
/// wait for its answer. Nothing is ever committed unchecked, and a ROLLBACK drops what is
/// pending.
pub(crate) struct PgConn {
    client: tokio_postgres::Client,
    statements: HashMap<String, tokio_postgres::Statement>,
    pending: Vec<Deferred>,
    /// Where the session's transaction is.
    tx: Tx,
    /// The server's clock when the open write transaction got the writer lock: the store's
    /// "now" for everything in that transaction (fences, leases, claims), fetched in the same
    /// round trip as BEGIN instead of one more per use.
    serial_now: Option<DateTime<Utc>>,
    /// The id of the last write transaction begun, once the server's answer gave it: what
    /// tells, after a lost COMMIT answer, whether the transaction committed.
    xid: Option<i64>,
    /// Rows gathered for one statement each (see [`PgConn::gather`]), by statement, in the
    /// order first used; `None` while each row goes as its own statement.
    gathered: Option<Vec<(&'static str, Vec<Value>)>>,
    /// Rows gathered where they stand (see [`PgConn::gather_in_place`]), while gathering.
    in_place: Option<Box<InPlace>>,
}

/// Consecutive rows for one statement, sent as that statement before any other statement
/// leaves (or instead as `alone`, when the first row stays alone).
struct InPlace {
    many_rows: &'static str,
    /// The rows' keys: a second row for a key starts a new statement, so each of the keys'
    /// writes lands, in order.
    keys: HashSet<String>,
    rows: Vec<Value>,
    /// The first row as a statement of its own, ready to be sent instead.
    alone: Deferred,
}

/// Where a session's transaction is, so a ROLLBACK is sent only to an open one.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Tx {
    Idle,
    /// Begun with [`PgConn::begin_serial`]; its BEGIN leaves with the next round trip.
    Unsent,
    Open,
}

/// BEGIN, and the writer lock with the server's clock at the moment it was granted (the
/// store's "now" for everything in the transaction): prepared once per session, sent with the
/// transaction's first statements.
const BEGIN: &str = "BEGIN";
fn writer_lock_sql() -> String {
    format!(
        "SELECT pg_advisory_xact_lock({WRITER_LOCK}), \
         to_char(clock_timestamp() AT TIME ZONE 'UTC', 'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"'), \
         txid_current()"
    )
}

/// Whether transaction `?1` committed (`committed`, `aborted`, `in progress`): asked on a new
/// session when a COMMIT's answer was lost with the session.
pub(crate) const STATUS_OF_TRANSACTION: &str = "SELECT txid_status(?1)";

/// The transaction's id the writer lock's statement answers with (its third column).
fn xid_of(rows: &[tokio_postgres::Row]) -> Result<i64, StoreError> {
    let row = rows
        .first()
        .ok_or_else(|| crate::error::corrupt("txid_current()", "no row"))?;
    Ok(row.try_get::<_, i64>(2)?)
}
const COMMIT: &str = "COMMIT";

/// The clock the writer lock's statement answers with (its second column).
fn clock_of(rows: &[tokio_postgres::Row]) -> Result<DateTime<Utc>, StoreError> {
    let row = rows
        .first()
        .ok_or_else(|| crate::error::corrupt("clock_timestamp()", "no row"))?;
    crate::store::timestamp(row.try_get::<_, String>(1)?, "clock_timestamp()")
}

/// Starts every request in `queries` now, in this order, then waits for all their answers.
///
/// A query sends its request when it is first polled, and the server answers in the order it
/// was asked. Each is polled once here, in order, before any is waited for: a combinator
/// (`join_all`) would not promise that, and a COMMIT must never leave before the statements
/// it commits.
fn in_order<F: std::future::Future + Unpin>(
    mut queries: Vec<F>,
) -> Result<Vec<F::Output>, StoreError> {
    let waker = futures::task::noop_waker();
    let mut started = std::task::Context::from_waker(&waker);
    let mut answers: Vec<Option<F::Output>> = queries
        .iter_mut()
        .map(
            |query| match std::future::Future::poll(std::pin::Pin::new(query), &mut started) {
                std::task::Poll::Ready(answer) => Some(answer),
                std::task::Poll::Pending => None,
            },
        )
        .collect();
    let mut deadline = Deadline::start();
    for (query, answer) in queries.into_iter().zip(&mut answers) {
        if answer.is_none() {
            *answer = Some(deadline.wait(query)?);
        }
    }
    Ok(answers.into_iter().map(Option::unwrap).collect())
}

/// A statement waiting for the next round trip (see [`PgConn`]).
struct Deferred {
    statement: tokio_postgres::Statement,
    params: Vec<Encoded>,
    check: Check,
}

/// What is checked of a deferred statement's answer.
pub(crate) enum Check {
    /// Only that the server ran it.
    Ran,
    /// Its rows, checked here: COMMIT waits for them.
    Rows(Then),
    /// The statement raises when its check fails; this turns the server's error into the
    /// store's (or leaves it, for an error of another kind).
    Raised(Raised),
    /// The writer lock's answer: the clock kept as the transaction's now, and its id.
    Clock,
    /// The writer lock's answer when nothing needs the clock: only the transaction's id.
    Xid,
}

/// Checks a deferred statement's rows, at the store's clock of the transaction.
pub(crate) type Then =
    Box<dyn FnOnce(&[tokio_postgres::Row], DateTime<Utc>) -> Result<(), StoreError> + Send>;

/// Turns the error a statement raised for its failed check into the store's.
pub(crate) type Raised =
    Box<dyn FnOnce(&tokio_postgres::error::DbError) -> Option<StoreError> + Send>;

/// How a COMMIT that did not succeed ended (see [`PgConn::commit`]).
pub(crate) enum CommitFailure {
    /// Refused before or by the server: nothing of the transaction is stored. The session
    /// may still be inside the transaction; roll it back.
    RolledBack(StoreError),
    /// The session broke with the COMMIT in flight: whether it landed is unknown here. `xid`
    /// is the transaction's id when its answer came before the break: the server can then
    /// say, on a new session, whether it committed (see [`STATUS_OF_TRANSACTION`]).
    Unknown { error: StoreError, xid: Option<i64> },
}

/// A parameter already in the server's binary format, so a deferred statement owns its
/// values instead of borrowing the caller's.
#[derive(Debug)]
struct Encoded(Option<Vec<u8>>);

impl Encoded {
    fn of(arg: &dyn Arg, ty: &tokio_postgres::types::Type) -> Result<Encoded, StoreError> {
        let mut out = bytes::BytesMut::new();
        let is_null = tokio_postgres::types::ToSql::to_sql_checked(arg, ty, &mut out)
            .map_err(|e| crate::error::corrupt("(a statement's parameter)", e))?;
        Ok(Encoded(match is_null {
            tokio_postgres::types::IsNull::Yes => None,
            tokio_postgres::types::IsNull::No => Some(out.to_vec()),
        }))
    }
}

impl tokio_postgres::types::ToSql for Encoded {
    fn to_sql(
        &self,
        _: &tokio_postgres::types::Type,
        out: &mut bytes::BytesMut,
    ) -> Result<tokio_postgres::types::IsNull, Box<dyn std::error::Error + Sync + Send>> {
        Ok(match &self.0 {
            None => tokio_postgres::types::IsNull::Yes,
            Some(bytes) => {
                out.extend_from_slice(bytes);
                tokio_postgres::types::IsNull::No
            }
        })
    }

    /// Checked when it was encoded, against the statement's own parameter type.
    fn accepts(_: &tokio_postgres::types::Type) -> bool {
        true
    }

    tokio_postgres::types::to_sql_checked!();
}

/// The key of the advisory lock every write transaction holds (see [`crate::db::Db::begin`]):
/// "kmsflow" as a number, so it is unlikely to meet another application's lock.
const WRITER_LOCK: i64 = 0x006b_6d73_666c_6f77;
/// The key of the session lock held while migrating the schema.
const MIGRATION_LOCK: i64 = WRITER_LOCK + 1;

impl PgConn {
    fn statement(&mut self, sql: &str) -> Result<tokio_postgres::Statement, StoreError> {
        if let Some(statement) = self.statements.get(sql) {
            return Ok(statement.clone());
        }
        let statement = wait(self.client.prepare(&numbered_placeholders(sql)))?;
        self.statements.insert(sql.to_owned(), statement.clone());
        Ok(statement)
    }

    pub(crate) fn execute(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<usize, StoreError> {
        self.settle()?;
        let statement = self.statement(sql)?;
        let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            args.iter().map(|a| *a as _).collect();
        Ok(wait(self.client.execute(&statement, &args))? as usize)
    }

    pub(crate) fn query(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
    ) -> Result<Vec<tokio_postgres::Row>, StoreError> {
        self.settle()?;
        let statement = self.statement(sql)?;
        let args: Vec<&(dyn tokio_postgres::types::ToSql + Sync)> =
            args.iter().map(|a| *a as _).collect();
        wait(self.client.query(&statement, &args))
    }

    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        if sql.starts_with("ROLLBACK") {
            // What is pending was part of what is rolled back: never sent, never checked.
            self.pending.clear();
            if let Some(gathered) = &mut self.gathered {
                gathered.clear();
            }
            self.in_place = None;
            if sql == "ROLLBACK" {
                let open = self.tx == Tx::Open;
                self.end();
                // A transaction whose BEGIN never left, or that the server already rolled
                // back at its COMMIT, has nothing to roll back.
                if !open {
                    return Ok(());
                }
            }
        } else {
            self.settle()?;
        }
        match sql {
            "BEGIN" => self.tx = Tx::Open,
            "COMMIT" => self.end(),
            _ => {}
        }
        wait(self.client.batch_execute(sql))
    }

    /// The transaction is over: committed, rolled back, or gone with the session.
    fn end(&mut self) {
        self.tx = Tx::Idle;
        self.serial_now = None;
        self.gathered = None;
        self.in_place = None;
    }

    /// From now until the transaction ends, rows given to [`PgConn::gather`] are kept and go
    /// as one statement per kind, after everything deferred before the next round trip. Only
    /// for a transaction without savepoints: a row kept across `SAVEPOINT` would be sent after
    /// it, and a rollback to it would take the row with it.
    pub(crate) fn gather_rows(&mut self) {
        self.gathered.get_or_insert_with(Vec::new);
    }

    /// One row for `many_rows`, a statement that takes a JSON array of rows as its only
    /// parameter (`?1`): kept with the others while gathering (see [`PgConn::gather_rows`]),
    /// otherwise deferred now as an array of one. Nothing must read what these rows write
    /// in the same round trip: they are sent after the statements deferred with them.
    pub(crate) fn gather(&mut self, many_rows: &'static str, row: Value) -> Result<(), StoreError> {
        let Some(gathered) = &mut self.gathered else {
            let rows = Value::Array(vec![row]).to_string();
            return self.defer(many_rows, crate::db::args![rows], Check::Ran);
        };
        match gathered.iter_mut().find(|(sql, _)| *sql == many_rows) {
            Some((_, rows)) => rows.push(row),
            None => gathered.push((many_rows, vec![row])),
        }
        Ok(())
    }

    /// One row written where it stands: while gathering (see [`PgConn::gather_rows`]), rows
    /// given one after another for the same `many_rows` statement (which takes a JSON array of
    /// rows as its only parameter) go as that one statement, deferred before whatever
    /// statement is deferred next (see [`PgConn::defer`]), so everything else sees them
    /// written in order. A row for a `key` already among them starts a new statement: one
    /// statement must not write the same row twice. A row that stays alone goes as `alone`,
    /// its statement of its own (a single row is cheaper to the server that way); so does
    /// every row while not gathering.
    pub(crate) fn gather_in_place(
        &mut self,
        many_rows: &'static str,
        key: String,
        row: Value,
        alone: (&str, &[&dyn Arg]),
    ) -> Result<(), StoreError> {
        let (sql, args) = alone;
        if self.gathered.is_none() {
            return self.defer(sql, args, Check::Ran);
        }
        if self
            .in_place
            .as_ref()
            .is_some_and(|run| run.many_rows != many_rows || run.keys.contains(&key))
        {
            self.flush_in_place()?;
        }
        match &mut self.in_place {
            Some(run) => {
                run.keys.insert(key);
                run.rows.push(row);
            }
            None => {
                let alone = self.prepared(sql, args, Check::Ran)?;
                self.in_place = Some(Box::new(InPlace {
                    many_rows,
                    keys: HashSet::from([key]),
                    rows: vec![row],
                    alone,
                }));
            }
        }
        Ok(())
    }

    /// Defers the rows gathered in place, as one statement (or the lone row's own).
    fn flush_in_place(&mut self) -> Result<(), StoreError> {
        let Some(run) = self.in_place.take() else {
            return Ok(());
        };
        let run = *run;
        let deferred = if run.rows.len() == 1 {
            run.alone
        } else {
            let rows = Value::Array(run.rows).to_string();
            self.prepared(run.many_rows, crate::db::args![rows], Check::Ran)?
        };
        self.pending.push(deferred);
        Ok(())
    }

    /// Defers the gathered rows' statements, so they leave with the next round trip: the rows
    /// gathered in place first, where they stood, then the others.
    fn defer_gathered(&mut self) -> Result<(), StoreError> {
        self.flush_in_place()?;
        let Some(gathered) = &mut self.gathered else {
            return Ok(());
        };
        for (sql, rows) in std::mem::take(gathered) {
            let rows = Value::Array(rows).to_string();
            self.defer(sql, crate::db::args![rows], Check::Ran)?;
        }
        Ok(())
    }

    /// Queues a statement to be sent with the next round trip, after the rows gathered in
    /// place before it; `check` says what is checked of its answer when it comes (and may fail
    /// the transaction).
    pub(crate) fn defer(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        check: Check,
    ) -> Result<(), StoreError> {
        self.flush_in_place()?;
        self.defer_reading(sql, args, check)
    }

    /// Queues a statement that only reads, and reads nothing rows gathered in place write: it
    /// may leave before them (see [`crate::db::Db::execute_enforced`]).
    pub(crate) fn defer_reading(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        check: Check,
    ) -> Result<(), StoreError> {
        let deferred = self.prepared(sql, args, check)?;
        self.pending.push(deferred);
        Ok(())
    }

    /// A statement ready to be deferred: prepared, its parameters encoded.
    fn prepared(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        check: Check,
    ) -> Result<Deferred, StoreError> {
        let statement = self.statement(sql)?;
        if statement.params().len() != args.len() {
            return Err(crate::error::corrupt(
                "(a deferred statement)",
                format!(
                    "{} parameters given for {} placeholders",
                    args.len(),
                    statement.params().len()
                ),
            ));
        }
        let params = statement
            .params()
            .iter()
            .zip(args)
            .map(|(ty, arg)| Encoded::of(*arg, ty))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(Deferred {
            statement,
            params,
            check,
        })
    }

    /// Sends every pending statement in one round trip and checks their answers in order: the
    /// first failure (the server's, or a check's) is returned, and the transaction must then
    /// be rolled back (to its savepoint, or whole).
    pub(crate) fn settle(&mut self) -> Result<(), StoreError> {
        self.defer_gathered()?;
        if self.pending.is_empty() {
            return Ok(());
        }
        let pending = std::mem::take(&mut self.pending);
        let answers = self.send(&pending, None)?;
        if self.tx == Tx::Unsent {
            self.tx = Tx::Open;
        }
        self.check(pending, answers)
    }

    /// COMMIT, sent in the same round trip as whatever is pending (see [`PgConn`]); only if a
    /// pending check is made here on the rows does it wait for their answers first.
    pub(crate) fn commit(&mut self) -> Result<(), CommitFailure> {
        self.defer_gathered().map_err(CommitFailure::RolledBack)?;
        if self
            .pending
            .iter()
            .any(|deferred| matches!(deferred.check, Check::Rows(_)))
        {
            self.settle().map_err(CommitFailure::RolledBack)?;
        }
        let commit = self.statement(COMMIT).map_err(CommitFailure::RolledBack)?;
        let mut pending = std::mem::take(&mut self.pending);
        for deferred in &mut pending {
            // Nothing asked for the transaction's clock before COMMIT: only its lock matters,
            // and its id, in case the COMMIT's answer is lost.
            if matches!(deferred.check, Check::Clock) {
                deferred.check = Check::Xid;
            }
        }
        let mut answers = match self.send(&pending, Some(&commit)) {
            Ok(answers) => answers,
            // COMMIT was in flight when the server went silent: it may have landed.
            Err(error) => {
                self.end();
                return Err(CommitFailure::Unknown {
                    error,
                    xid: self.xid,
                });
            }
        };
        let committed = answers.pop().expect("COMMIT's answer");
        // Whatever the answers say, the transaction is over: committed, rolled back by the
        // server at a failed statement (it answers the COMMIT behind it by rolling back), or
        // gone with the session.
        self.end();
        let outcome = self
            .check(pending, answers)
            .and_then(|()| committed.map(drop).map_err(StoreError::from));
        match outcome {
            Ok(()) => Ok(()),
            // COMMIT was in flight: it may have landed before the session broke.
            Err(error) if error.is_connection_lost() => Err(CommitFailure::Unknown {
                error,
                xid: self.xid,
            }),
            Err(error) => Err(CommitFailure::RolledBack(error)),
        }
    }

    /// Sends `pending` (then `commit`, if given) in one round trip; their answers, in order.
    fn send(
        &self,
        pending: &[Deferred],
        commit: Option<&tokio_postgres::Statement>,
    ) -> Result<Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>, StoreError> {
        let params: Vec<Vec<&(dyn tokio_postgres::types::ToSql + Sync)>> = pending
            .iter()
            .map(|deferred| deferred.params.iter().map(|p| p as _).collect())
            .collect();
        let queries = pending
            .iter()
            .zip(&params)
            .map(|(deferred, params)| (&deferred.statement, params.as_slice()))
            .chain(commit.map(|commit| (commit, &[][..])))
            .map(|(statement, params)| Box::pin(self.client.query(statement, params)))
            .collect();
        in_order(queries)
    }

    /// Checks the answers to `pending`, in order; the first failure is returned.
    fn check(
        &mut self,
        pending: Vec<Deferred>,
        answers: Vec<Result<Vec<tokio_postgres::Row>, tokio_postgres::Error>>,
    ) -> Result<(), StoreError> {
        for (deferred, answer) in pending.into_iter().zip(answers) {
            let rows = match (answer, deferred.check) {
                (Ok(rows), check) => (rows, check),
                (Err(error), Check::Raised(raised)) => {
                    return Err(error
                        .as_db_error()
                        .and_then(raised)
                        .unwrap_or_else(|| error.into()));
                }
                (Err(error), _) => return Err(error.into()),
            };
            match rows {
                (_, Check::Ran | Check::Raised(_)) => {}
                (rows, Check::Clock) => {
                    self.serial_now = Some(clock_of(&rows)?);
                    self.xid = Some(xid_of(&rows)?);
                }
                (rows, Check::Xid) => self.xid = Some(xid_of(&rows)?),
                (rows, Check::Rows(then)) => {
                    let now = self.serial_now.ok_or_else(|| {
                        crate::error::corrupt(
                            "(a checked statement)",
                            "outside a write transaction",
                        )
                    })?;
                    then(&rows, now)?;
                }
            }
        }
        Ok(())
    }

    /// BEGIN, the writer lock and the server's clock: sent with the transaction's first
    /// statements, in their round trip (see [`PgConn`]).
    pub(crate) fn begin_serial(&mut self) -> Result<(), StoreError> {
        self.settle()?;
        self.defer(BEGIN, &[], Check::Ran)?;
        self.defer(&writer_lock_sql(), &[], Check::Clock)?;
        self.xid = None;
        self.tx = Tx::Unsent;
        Ok(())
    }

    pub(crate) fn now(&mut self) -> Result<DateTime<Utc>, StoreError> {
        if self.tx == Tx::Unsent {
            self.settle()?;
        }
        if let Some(now) = self.serial_now {
            return Ok(now);
        }
        let rows = self.query(
            "SELECT to_char(clock_timestamp() AT TIME ZONE 'UTC', \
             'YYYY-MM-DD\"T\"HH24:MI:SS.US\"Z\"')",
            &[],
        )?;
        let text: String = rows
            .first()
            .ok_or_else(|| crate::error::corrupt("clock_timestamp()", "no row"))?
            .try_get(0)?;
        crate::store::timestamp(text, "clock_timestamp()")
    }

    /// Whether the session is gone (the server restarted, the network dropped it).
    pub(crate) fn is_closed(&self) -> bool {
        self.client.is_closed()
    }

    /// Brings the schema up to date. Two processes migrating at once are serialised by a
    /// session advisory lock; the second finds the work done.
    pub(crate) fn migrate(&mut self) -> Result<(), StoreError> {
        self.batch(&format!("SELECT pg_advisory_lock({MIGRATION_LOCK})"))?;
        let migrated = self.migrate_locked();
        let unlocked = self.batch(&format!("SELECT pg_advisory_unlock({MIGRATION_LOCK})"));
        migrated.and(unlocked)
    }

    fn migrate_locked(&mut self) -> Result<(), StoreError> {
        // (`IF NOT EXISTS` alone would have the server send a notice at every open.)
        let exists = self
            .query("SELECT to_regclass('kmsflow_schema') IS NOT NULL", &[])?
            .first()
            .map(|row| row.try_get::<_, bool>(0))
            .transpose()?
            .unwrap_or(false);
        if !exists {
            self.batch(
                "CREATE TABLE IF NOT EXISTS kmsflow_schema (
                     version    BIGINT PRIMARY KEY,
                     applied_at TIMESTAMPTZ NOT NULL DEFAULT now()
                 )",
            )?;
        }
        let found: i64 = self
            .query("SELECT coalesce(max(version), 0) FROM kmsflow_schema", &[])?
            .first()
            .map(|row| row.try_get(0))
            .transpose()?
            .unwrap_or(0);
        let supported = crate::schema::POSTGRES_MIGRATIONS.len() as i64;
        if found > supported {
            return Err(StoreError::SchemaTooNew { found, supported });
        }
        for (index, sql) in crate::schema::POSTGRES_MIGRATIONS
            .iter()
            .enumerate()
            .skip(found as usize)
        {
            let version = index as i64 + 1;
            self.batch("BEGIN")?;
            let applied = self.batch(sql).and_then(|()| {
                self.execute(
                    "INSERT INTO kmsflow_schema (version) VALUES (?1)",
                    crate::db::args![version],
                )
                .map(drop)
            });
            match applied {
                Ok(()) => self.batch("COMMIT")?,
                Err(error) => {
                    let _ = self.batch("ROLLBACK");
                    return Err(error);
                }
            }
        }
        Ok(())
    }
}

/// Waits for the driver's answer from any thread, async context or not: the connection is
/// driven on the store's own runtime, so this only waits on a channel, for at most
/// [`ANSWER_WITHIN`].
fn wait<T>(
    answer: impl std::future::Future<Output = Result<T, tokio_postgres::Error>>,
) -> Result<T, StoreError> {
    let mut deadline = Deadline::start();
    Ok(deadline.wait(answer)??)
}

/// The longest kmsflow waits for the answer to a statement. Far above any statement of its
/// own (a checkpoint is milliseconds; a writer lock's holder is ended by the server after
/// 10 s idle in its transaction): past it the server is taken as gone, not slow.
const ANSWER_WITHIN: Duration = Duration::from_secs(120);

/// A timer on the store's runtime, for waits outside any runtime (`block_on`).
struct Deadline(tokio::task::JoinHandle<()>);

impl Deadline {
    fn start() -> Deadline {
        Deadline(io().spawn(async { tokio::time::sleep(ANSWER_WITHIN).await }))
    }

    /// `answer`, or [`StoreError::Silent`] once the deadline passed.
    fn wait<F: std::future::Future>(&mut self, answer: F) -> Result<F::Output, StoreError> {
        let answer = std::pin::pin!(answer);
        match futures::executor::block_on(futures::future::select(answer, &mut self.0)) {
            futures::future::Either::Left((output, _)) => Ok(output),
            futures::future::Either::Right(_) => Err(StoreError::Silent {
                what: "a statement",
                waited_s: ANSWER_WITHIN.as_secs(),
            }),
        }
    }
}

impl Drop for Deadline {
    fn drop(&mut self) {
        // A timer per statement would pile up for two minutes each on a busy writer.
        self.0.abort();
    }
}

/// `?1` becomes `$1`; a `?` inside a quoted literal is left alone.
fn numbered_placeholders(sql: &str) -> String {
    let mut out = String::with_capacity(sql.len());
    let mut quoted = false;
    for c in sql.chars() {
        match c {
            '\'' => {
                quoted = !quoted;
                out.push(c);
            }
            '?' if !quoted => out.push('$'),
            c => out.push(c),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A runner cut off or frozen while its transaction holds the writer lock must not stop
    /// every other runner, worker and daemon on the database: the server ends that session.
    #[test]
    fn a_session_stopped_inside_a_transaction_frees_the_writer_lock_for_the_others() {
        let location = PgLocation::parse(&kmsflow_pgtest::server().database()).unwrap();
        let mut frozen = location.connect().unwrap();
        frozen.begin_serial().unwrap();
        // BEGIN and the writer lock reach the server; then nothing more comes.
        frozen.settle().unwrap();
        let mut other = location.connect().unwrap();
        // Bounded, so that without the session setting this fails instead of hanging.
        other.batch("SET lock_timeout = '60s'").unwrap();
        let asked = std::time::Instant::now();
        other.begin_serial().unwrap();
        other
            .settle()
            .expect("the writer lock, once the server ended the frozen session");
        let waited = asked.elapsed();
        other.batch("ROLLBACK").unwrap();
        assert!(
            waited >= Duration::from_secs(8) && waited < Duration::from_secs(30),
            "waited {waited:?}: about idle_in_transaction_session_timeout"
        );
        let after = frozen.query("SELECT 1", &[]);
        assert!(
            after.is_err(),
            "the frozen session was ended by the server: {after:?}"
        );
    }

    /// Many steps' outcomes go as one UPDATE joined to `steps` by its key: on a team's
    /// database of many runs it must look each up, never read the whole table per checkpoint.
    #[test]
    fn many_steps_outcomes_are_looked_up_by_key_not_scanned_for() {
        let location = PgLocation::parse(&kmsflow_pgtest::server().database()).unwrap();
        let mut session = location.connect().unwrap();
        session.migrate().unwrap();
        session
            .batch(
                "INSERT INTO runs (id, runbook, runbook_ref, content_hash, params, secret_params,
                                   status, started_at)
                 SELECT 'run-' || r, 't', 't.yaml', 'h', '{}', '[]', 'succeeded', '2026-12-01'
                   FROM generate_series(1, 50) AS r;
                 INSERT INTO steps (run_id, step_id, position, uses, status)
                 SELECT 'run-' || r, 's' || s, s, 'noop', 'succeeded'
                   FROM generate_series(1, 50) AS r, generate_series(1, 40) AS s;
                 ANALYZE steps",
            )
            .unwrap();
        let rows: Vec<Value> = (1..=64)
            .map(|s| {
                serde_json::json!(["run-7", format!("s{s}"), 1, "unchanged", "{}", "2026-12-01"])
            })
            .collect();
        let plan: Vec<String> = session
            .query(
                &format!("EXPLAIN {}", crate::write::STEPS_SUCCEEDED),
                crate::db::args![Value::Array(rows).to_string()],
            )
            .unwrap()
            .iter()
            .map(|row| row.get(0))
            .collect();
        let plan = plan.join("\n");
        assert!(
            plan.contains("Index Scan using steps_pkey") && !plan.contains("Seq Scan on steps"),
            "{plan}"
        );
    }

    #[test]
    fn placeholders_are_renumbered_outside_literals() {
        assert_eq!(
            numbered_placeholders("SELECT ?1, '?', x FROM t WHERE a = ?2"),
            "SELECT $1, '?', x FROM t WHERE a = $2"
        );
    }

    #[test]
    fn a_password_is_never_shown() {
        let location = PgLocation::parse("postgres://ana:s3cret@db.example:5432/kmsflow").unwrap();
        assert!(!location.to_string().contains("s3cret"), "{location}");
        assert!(!format!("{location:?}").contains("s3cret"));
        assert_eq!(
            location.tls,
            Tls::Verified,
            "off loopback, TLS is verified by default"
        );
    }

    #[test]
    fn loopback_needs_no_tls_and_sslmode_is_checked() {
        let local = PgLocation::parse("postgres://ana@127.0.0.1:5433/kmsflow").unwrap();
        assert_eq!(local.tls, Tls::Off);
        let asked = PgLocation::parse("postgres://ana@127.0.0.1:5433/k?sslmode=require").unwrap();
        assert_eq!(asked.tls, Tls::Verified);
        let error = PgLocation::parse("postgres://ana@h/k?sslmode=allow").unwrap_err();
        assert!(error.to_string().contains("sslmode `allow`"), "{error}");
    }

    #[test]
    fn a_silent_connection_is_given_up_in_seconds_unless_the_url_says_otherwise() {
        let default = PgLocation::parse("postgres://ana@db.example/k").unwrap();
        assert_eq!(default.config.get_tcp_user_timeout(), Some(&SILENT_FOR));
        assert_eq!(
            default.config.get_keepalives_idle(),
            Duration::from_secs(15)
        );
        let asked =
            PgLocation::parse("postgres://ana@db.example/k?tcp_user_timeout=90&keepalives_idle=60")
                .unwrap();
        assert_eq!(
            asked.config.get_tcp_user_timeout(),
            Some(&Duration::from_secs(90))
        );
        assert_eq!(asked.config.get_keepalives_idle(), Duration::from_secs(60));
    }

    #[test]
    fn auth_entra_takes_no_password_and_other_auth_values_are_refused() {
        let entra = PgLocation::parse("postgres://ana@db.example/k?auth=entra").unwrap();
        assert!(entra.uses_entra());
        assert!(entra.config.get_password().is_none());
        assert!(
            !PgLocation::parse("postgres://ana@db.example/k")
                .unwrap()
                .uses_entra()
        );
        let both = PgLocation::parse("postgres://ana:pw@db.example/k?auth=entra").unwrap_err();
        assert!(both.to_string().contains("remove the password"), "{both}");
        assert!(!both.to_string().contains(":pw@"), "{both}");
        let plain = PgLocation::parse("postgres://ana@db.example/k?auth=entra&sslmode=disable")
            .unwrap_err();
        assert!(
            plain.to_string().contains("never sent without TLS"),
            "{plain}"
        );
        assert!(PgLocation::parse("postgres://ana@127.0.0.1/k?auth=entra&sslmode=disable").is_ok());
        let other = PgLocation::parse("postgres://ana@db.example/k?auth=kerberos").unwrap_err();
        assert!(
            other.to_string().contains("`auth=kerberos` is not one of"),
            "{other}"
        );
    }

    #[test]
    fn pgpass_lines_match_like_libpq() {
        assert_eq!(
            split_pgpass(r"db\:1:*:k:ana:pa\:ss"),
            ["db:1", "*", "k", "ana", "pa:ss"]
        );
    }
}
