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

/// Commits `n` checkpoints the way a chain of steps commits them, one after another through
/// the store's writer, without the engine: each a step's outcome behind its run's fencing
/// check, with its journal row. Returns how long they took. The benchmarks print this beside
/// the raw commit rate and the engine's chain, so a reader sees how much of a chain's cost is
/// the store's statements and how much the engine's.
pub fn measure_checkpoint_commits(
    location: &crate::Location,
    n: usize,
    durability: Durability,
) -> Result<Duration, StoreError> {
    let mut store = crate::Store::open(location, durability)?;
    let (run_id, key) = ("probe-chain", "probe/chain");
    let steps: Vec<(String, String)> = (0..n).map(|i| (format!("s{i}"), "noop".into())).collect();
    store.commit(&[crate::Write::CreateRun(crate::NewRun {
        id: run_id.into(),
        runbook: "probe".into(),
        runbook_ref: "probe.yaml".into(),
        content_hash: "probe".into(),
        source: "name: probe".into(),
        params: serde_json::json!({}),
        secret_params: Vec::new(),
        started_at: chrono::Utc::now(),
        lock_key: Some(key.into()),
        steps,
        fragments: serde_json::json!([]),
    })])?;
    let owner = crate::LockOwner {
        pid: std::process::id(),
        host: "probe".into(),
    };
    let token = match store.acquire_lock(key, run_id, &owner, chrono::Duration::minutes(10))? {
        Ok(grant) => grant.token,
        Err(held) => {
            return Err(crate::error::corrupt(
                "(the checkpoint probe)",
                format!("its lock is held: {held:?}"),
            ));
        }
    };
    let (writer, thread) = crate::Writer::spawn(store);
    let started = Instant::now();
    for index in 0..n {
        let (done, committed) = std::sync::mpsc::channel();
        writer.submit(
            vec![
                crate::Write::CheckFence {
                    key: key.into(),
                    run_id: run_id.into(),
                    token,
                },
                crate::Write::StepSucceeded {
                    run_id: run_id.into(),
                    step_id: format!("s{index}"),
                    attempt: 1,
                    outcome: crate::Outcome::Unchanged,
                    outputs: serde_json::json!({}),
                    at: chrono::Utc::now(),
                },
            ],
            Box::new(move |result| {
                let _ = done.send(result);
            }),
        );
        committed.recv().map_err(|_| StoreError::WriterGone)??;
    }
    let elapsed = started.elapsed();
    drop(writer);
    thread.join();
    Ok(elapsed)
}
