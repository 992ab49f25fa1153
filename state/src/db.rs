//! One connection, either backend: the statements of the store are written once, in the SQL
//! both SQLite and PostgreSQL accept, and run through [`Db`].
//!
//! Statements use SQLite's numbered placeholders (`?1`); PostgreSQL's (`$1`) are made from
//! them once per statement. Integers are `BIGINT` in the PostgreSQL schema, so every integer
//! crosses as an `i64` whichever backend holds it. Timestamps are RFC 3339 text in UTC with
//! microseconds on both, so they compare as text the same way.

use chrono::{DateTime, Utc};

use crate::StoreError;
pub(crate) use crate::postgres::CommitFailure;
use crate::postgres::{Check, PgConn};

/// The SQLSTATE the schema's own checks raise on PostgreSQL (see [`Db::execute_enforced`]).
const REFUSED: &str = "KF001";

/// A value bound to a placeholder: anything both drivers can send.
pub(crate) trait Arg: rusqlite::ToSql + tokio_postgres::types::ToSql + Sync {}
impl<T: rusqlite::ToSql + tokio_postgres::types::ToSql + Sync + ?Sized> Arg for T {}

/// The values of a statement's placeholders, in order: `args![run_id, ts(at)]`.
macro_rules! args {
    ($($value:expr),* $(,)?) => {
        &[$(&$value as &dyn $crate::db::Arg),*] as &[&dyn $crate::db::Arg]
    };
}
pub(crate) use args;

/// A connection (SQLite) or the store's session (PostgreSQL), inside or outside a transaction.
pub(crate) enum Db<'c> {
    Sqlite(&'c rusqlite::Connection),
    Postgres(std::sync::MutexGuard<'c, PgConn>),
}

/// One row of a result, either backend's.
pub(crate) enum Row<'r> {
    Sqlite(&'r rusqlite::Row<'r>),
    Postgres(&'r tokio_postgres::Row),
}

/// A column type read back the same way from both backends.
pub(crate) trait Column: Sized {
    fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self>;
    fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError>;
}

impl Row<'_> {
    pub(crate) fn get<T: Column>(&self, index: usize) -> Result<T, StoreError> {
        match self {
            Row::Sqlite(row) => Ok(T::from_sqlite(row, index)?),
            Row::Postgres(row) => T::from_postgres(row, index),
        }
    }
}

impl Column for String {
    fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self> {
        row.get(index)
    }
    fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError> {
        Ok(row.try_get(index)?)
    }
}

impl Column for Option<String> {
    fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self> {
        row.get(index)
    }
    fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError> {
        Ok(row.try_get(index)?)
    }
}

impl Column for Option<i64> {
    fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self> {
        row.get(index)
    }
    fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError> {
        use tokio_postgres::types::Type;
        // Columns are BIGINT, but an expression (a literal, `count`, a comparison) may come
        // back narrower or as a boolean: read what the server says it sent.
        let ty = row.columns()[index].type_().clone();
        Ok(match ty {
            Type::INT2 => row.try_get::<_, Option<i16>>(index)?.map(i64::from),
            Type::INT4 => row.try_get::<_, Option<i32>>(index)?.map(i64::from),
            Type::BOOL => row.try_get::<_, Option<bool>>(index)?.map(i64::from),
            _ => row.try_get::<_, Option<i64>>(index)?,
        })
    }
}

/// Non-null integers of any width the store keeps (attempts, pids, positions, flags).
macro_rules! integer_column {
    ($($ty:ty),*) => {$(
        impl Column for $ty {
            fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self> {
                row.get(index)
            }
            fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError> {
                let value = Option::<i64>::from_postgres(row, index)?.ok_or_else(|| {
                    crate::error::corrupt("(integer column)", "NULL where a number belongs")
                })?;
                <$ty>::try_from(value)
                    .map_err(|e| crate::error::corrupt("(integer column)", e))
            }
        }
    )*};
}
integer_column!(i64, u32, u64, usize);

impl Column for bool {
    fn from_sqlite(row: &rusqlite::Row<'_>, index: usize) -> rusqlite::Result<Self> {
        row.get(index)
    }
    fn from_postgres(row: &tokio_postgres::Row, index: usize) -> Result<Self, StoreError> {
        Ok(i64::from_postgres(row, index)? != 0)
    }
}

impl Db<'_> {
    /// Runs one statement; the number of rows it changed.
    pub(crate) fn execute(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<usize, StoreError> {
        match self {
            Db::Sqlite(conn) => {
                let args: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| *a as _).collect();
                Ok(conn.prepare_cached(sql)?.execute(args.as_slice())?)
            }
            Db::Postgres(pg) => pg.execute(sql, args),
        }
    }

    /// Every row of a query, each mapped by `each`.
    pub(crate) fn query<T>(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        mut each: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Vec<T>, StoreError> {
        match self {
            Db::Sqlite(conn) => {
                let args: Vec<&dyn rusqlite::ToSql> = args.iter().map(|a| *a as _).collect();
                let mut statement = conn.prepare_cached(sql)?;
                let mut rows = statement.query(args.as_slice())?;
                let mut found = Vec::new();
                while let Some(row) = rows.next()? {
                    found.push(each(&Row::Sqlite(row))?);
                }
                Ok(found)
            }
            Db::Postgres(pg) => pg
                .query(sql, args)?
                .iter()
                .map(|row| each(&Row::Postgres(row)))
                .collect(),
        }
    }

    /// The first row of a query, if there is one.
    pub(crate) fn query_opt<T>(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        each: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<Option<T>, StoreError> {
        Ok(self.query(sql, args, each)?.into_iter().next())
    }

    /// The one row a query always returns (an aggregate).
    pub(crate) fn query_one<T>(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        each: impl FnMut(&Row<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.query_opt(sql, args, each)?
            .ok_or_else(|| crate::error::corrupt("(query)", "no row where one was expected"))
    }

    /// Runs a statement whose answer need not be waited for now: on PostgreSQL it goes with
    /// the next round trip (see [`PgConn`]); on SQLite it runs now. Its failure fails the
    /// transaction's next wait ([`Db::settle`], COMMIT, any other statement), never later.
    pub(crate) fn execute_then(&mut self, sql: &str, args: &[&dyn Arg]) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(_) => self.execute(sql, args).map(drop),
            Db::Postgres(pg) => pg.defer(sql, args, Check::Ran),
        }
    }

    /// A query whose rows are checked when they come: on PostgreSQL with the next round trip,
    /// on SQLite now. `check` gets the rows (mapped by `each`) and the store's clock of the
    /// transaction; its error fails the transaction's next wait, so a checkpoint whose check
    /// fails is never committed.
    pub(crate) fn query_then<T: 'static>(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        each: fn(&Row<'_>) -> Result<T, StoreError>,
        check: impl FnOnce(Vec<T>, DateTime<Utc>) -> Result<(), StoreError> + Send + 'static,
    ) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(_) => {
                let rows = self.query(sql, args, each)?;
                check(rows, Utc::now())
            }
            Db::Postgres(pg) => pg.defer(
                sql,
                args,
                Check::Rows(Box::new(move |rows, now| {
                    let rows = rows
                        .iter()
                        .map(|row| each(&Row::Postgres(row)))
                        .collect::<Result<Vec<T>, _>>()?;
                    check(rows, now)
                })),
            ),
        }
    }

    /// A PostgreSQL statement that makes its own check and raises SQLSTATE `KF001` when it
    /// fails (a function of the schema's): it goes with the next round trip, COMMIT's too, and
    /// `refused` turns the server's message and detail into the store's error. A failed check
    /// aborts the transaction, so nothing of it is committed.
    ///
    /// The statement must only read, and read nothing of `steps`: steps' outcomes gathered in
    /// place before it may leave after it (see [`PgConn::gather_in_place`]). The fence reads
    /// only `locks`; a fleet's batch, one fence per run between its steps' outcomes, then
    /// still sends those outcomes as one statement.
    pub(crate) fn execute_enforced(
        &mut self,
        sql: &str,
        args: &[&dyn Arg],
        refused: impl FnOnce(&str, Option<&str>) -> StoreError + Send + 'static,
    ) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(_) => Err(crate::error::corrupt(
                "(an enforced check)",
                "made by a PostgreSQL function, not on SQLite",
            )),
            Db::Postgres(pg) => pg.defer_reading(
                sql,
                args,
                Check::Raised(Box::new(move |error| {
                    (error.code().code() == REFUSED)
                        .then(|| refused(error.message(), error.detail()))
                })),
            ),
        }
    }

    /// Until this transaction ends, rows of the same kind go to PostgreSQL as one statement
    /// (see [`PgConn::gather_rows`]); SQLite writes each where it is asked. Only for a
    /// transaction without savepoints.
    pub(crate) fn gather_rows(&mut self) {
        if let Db::Postgres(pg) = self {
            pg.gather_rows();
        }
    }

    pub(crate) fn is_postgres(&self) -> bool {
        matches!(self, Db::Postgres(_))
    }

    /// Waits for every statement sent without waiting, and checks their answers.
    pub(crate) fn settle(&mut self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(_) => Ok(()),
            Db::Postgres(pg) => pg.settle(),
        }
    }

    /// Runs statements without placeholders, one after another.
    pub(crate) fn batch(&mut self, sql: &str) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(conn) => Ok(conn.execute_batch(sql)?),
            Db::Postgres(pg) => pg.batch(sql),
        }
    }

    /// Opens a write transaction that no other writer runs beside: SQLite's `IMMEDIATE`
    /// takes the file's write lock; PostgreSQL takes the store's writer lock (an advisory
    /// lock held to the end of the transaction). Every read-then-write of the store (a lock
    /// taken, a fire claimed, an approval decided) is then exactly as serial on both.
    pub(crate) fn begin(&mut self) -> Result<(), StoreError> {
        match self {
            Db::Sqlite(conn) => Ok(conn.execute_batch("BEGIN IMMEDIATE")?),
            Db::Postgres(pg) => pg.begin_serial(),
        }
    }

    pub(crate) fn commit(&mut self) -> Result<(), StoreError> {
        self.commit_or_tell().map_err(|failure| match failure {
            CommitFailure::RolledBack(error) | CommitFailure::Unknown { error, .. } => error,
        })
    }

    /// COMMIT, telling a refusal (nothing stored) from a COMMIT whose answer was lost.
    pub(crate) fn commit_or_tell(&mut self) -> Result<(), CommitFailure> {
        match self {
            // SQLite answers in this process: its COMMIT's answer is never lost.
            Db::Sqlite(conn) => conn
                .execute_batch("COMMIT")
                .map_err(|error| CommitFailure::RolledBack(error.into())),
            Db::Postgres(pg) => pg.commit(),
        }
    }

    /// Rolls back the open transaction, if any; for the error paths, so it never fails them.
    pub(crate) fn rollback(&mut self) {
        let _ = self.batch("ROLLBACK");
    }

    /// Runs `work` in one write transaction: committed if it succeeds, rolled back if not.
    pub(crate) fn transaction<T>(
        &mut self,
        work: impl FnOnce(&mut Db<'_>) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        self.begin()?;
        match work(self) {
            Ok(value) => {
                if let Err(error) = self.commit() {
                    self.rollback();
                    return Err(error);
                }
                Ok(value)
            }
            Err(error) => {
                self.rollback();
                Err(error)
            }
        }
    }

    /// The store's clock: this host's for SQLite (one machine), the database server's for
    /// PostgreSQL, so leases taken on many machines are timed by one clock.
    pub(crate) fn now(&mut self) -> Result<DateTime<Utc>, StoreError> {
        match self {
            Db::Sqlite(_) => Ok(Utc::now()),
            Db::Postgres(pg) => pg.now(),
        }
    }
}
