//! The raw commit rate of this machine, measured the way the store commits.

use std::path::Path;
use std::time::{Duration, Instant};

use rusqlite::Connection;

use crate::{Durability, StoreError};

/// Commits `n` single-row INSERT transactions into a fresh file at `path` with the store's
/// journal mode (WAL) and the given `synchronous` setting, and returns how long that took.
/// Benchmarks print the engine's step rate beside this figure.
pub fn measure_raw_commits(
    path: &Path,
    n: usize,
    durability: Durability,
) -> Result<Duration, StoreError> {
    let conn = Connection::open(path)?;
    conn.pragma_update(None, "journal_mode", "WAL")?;
    conn.pragma_update(
        None,
        "synchronous",
        match durability {
            Durability::Full => "FULL",
            Durability::Normal => "NORMAL",
        },
    )?;
    conn.execute_batch("CREATE TABLE IF NOT EXISTS probe (id INTEGER PRIMARY KEY, body TEXT)")?;
    let mut insert = conn.prepare("INSERT INTO probe (body) VALUES (?1)")?;
    let started = Instant::now();
    for index in 0..n {
        // Autocommit: one transaction, so one durable commit, per row.
        insert.execute([format!("row {index}")])?;
    }
    Ok(started.elapsed())
}

/// Commits `n` single-row INSERT transactions into a fresh table of the database at `location`
/// with `synchronous_commit` on, through the same driver the store uses, and returns how long
/// that took: the PostgreSQL baseline the benchmarks print beside the engine's step rate.
pub fn measure_raw_postgres_commits(
    location: &crate::PgLocation,
    n: usize,
) -> Result<Duration, StoreError> {
    let mut conn = location.connect()?;
    conn.batch(
        "SET synchronous_commit = on;
         DROP TABLE IF EXISTS kmsflow_probe;
         CREATE TABLE kmsflow_probe (id BIGSERIAL PRIMARY KEY, body TEXT)",
    )?;
    let started = Instant::now();
    for index in 0..n {
        // Autocommit: one transaction, so one durable commit, per row.
        conn.execute(
            "INSERT INTO kmsflow_probe (body) VALUES (?1)",
            crate::db::args![format!("row {index}")],
        )?;
    }
    let elapsed = started.elapsed();
    conn.batch("DROP TABLE kmsflow_probe")?;
    Ok(elapsed)
}
