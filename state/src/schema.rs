//! Append-only schema migrations, one list per backend: SQLite's indexed by
//! `PRAGMA user_version`, PostgreSQL's recorded in `kmsflow_schema`.
//!
//! Never edit a migration that has shipped: add a new one at the end of each list. The two
//! lists hold the same tables; PostgreSQL's began at SQLite's sixth version, so its first
//! migration is SQLite's first six in one, with `BIGINT` for every integer (so integers cross
//! as `i64` on both) and text timestamps (RFC 3339, UTC, microseconds) as in SQLite.

use rusqlite::Connection;

use crate::StoreError;

const MIGRATIONS: &[&str] = &[
    // 1: runs, steps, the journal, locks and approvals.
    r#"
    CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_ref   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        source        TEXT NOT NULL,
        params        TEXT NOT NULL,
        secret_params TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        error         TEXT,
        outputs       TEXT,
        lock_key      TEXT
    );
    CREATE INDEX runs_started_at ON runs (started_at);
    CREATE TABLE steps (
        run_id          TEXT NOT NULL REFERENCES runs (id),
        step_id         TEXT NOT NULL,
        position        INTEGER NOT NULL,
        uses            TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        INTEGER NOT NULL DEFAULT 0,
        before_image    TEXT,
        planned_outcome TEXT,
        outputs         TEXT,
        outcome         TEXT,
        error           TEXT,
        started_at      TEXT,
        finished_at     TEXT,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE events (
        seq     INTEGER PRIMARY KEY AUTOINCREMENT,
        run_id  TEXT NOT NULL,
        step_id TEXT,
        at      TEXT NOT NULL,
        kind    TEXT NOT NULL,
        detail  TEXT NOT NULL
    );
    CREATE INDEX events_run ON events (run_id, seq);
    CREATE TABLE locks (
        key              TEXT PRIMARY KEY,
        run_id           TEXT NOT NULL,
        owner_pid        INTEGER NOT NULL,
        owner_host       TEXT NOT NULL,
        lease_expires_at TEXT NOT NULL
    );
    CREATE TABLE approvals (
        run_id      TEXT NOT NULL,
        step_id     TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        approved_at TEXT NOT NULL,
        PRIMARY KEY (run_id, step_id)
    );
    "#,
    // 2: schedules and the record of every fire. A fire's (schedule, occurrence) is unique:
    // that is how two daemons on one store never both fire the same occurrence.
    r#"
    CREATE TABLE schedules (
        name         TEXT PRIMARY KEY,
        runbook      TEXT NOT NULL,
        params       TEXT NOT NULL,
        targets      TEXT,
        cron         TEXT NOT NULL,
        overlap      TEXT NOT NULL,
        catchup_ms   INTEGER NOT NULL,
        jitter_ms    INTEGER NOT NULL,
        webhook      TEXT,
        paused       INTEGER NOT NULL DEFAULT 0,
        created_at   TEXT NOT NULL,
        last_seen_at TEXT NOT NULL,
        last_worst   TEXT
    );
    CREATE TABLE schedule_fires (
        seq        INTEGER PRIMARY KEY,
        schedule   TEXT NOT NULL,
        occurrence TEXT NOT NULL,
        fired_at   TEXT NOT NULL,
        outcome    TEXT NOT NULL,
        run_id     TEXT,
        detail     TEXT,
        UNIQUE (schedule, occurrence)
    );
    "#,
    // 3: a runbook's text is kept once per content hash, not once per run: a daemon checking
    // 200 clusters an hour stored the same 2.4 KB of text 4,800 times a day.
    r#"
    CREATE TABLE runbook_sources (
        content_hash TEXT PRIMARY KEY,
        source       TEXT NOT NULL
    );
    INSERT OR IGNORE INTO runbook_sources (content_hash, source)
        SELECT content_hash, source FROM runs;
    ALTER TABLE runs DROP COLUMN source;
    "#,
    // 4: the fragments a runbook includes are kept with its text (resume and rollback compile
    // what ran, not what the files say now), and locks carry a fencing token that grows on
    // every change of holder, so a holder that lost its lease cannot act on it.
    r#"
    ALTER TABLE runbook_sources ADD COLUMN fragments TEXT NOT NULL DEFAULT '[]';
    ALTER TABLE locks ADD COLUMN token INTEGER NOT NULL DEFAULT 0;
    "#,
    // 5: rollouts: one runbook over many targets, each target's child run an ordinary run.
    // A target's run id is set in the transaction that creates that run, so after a crash a
    // target either has its run or was never started. The text is kept in runbook_sources,
    // so a rollout whose targets never started still resumes without its file.
    r#"
    CREATE TABLE rollouts (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_ref   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        params        TEXT NOT NULL,
        secret_params TEXT NOT NULL,
        policy        TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        error         TEXT
    );
    CREATE TABLE rollout_targets (
        rollout_id TEXT NOT NULL REFERENCES rollouts (id),
        position   INTEGER NOT NULL,
        label      TEXT NOT NULL,
        params     TEXT NOT NULL,
        wave       INTEGER NOT NULL,
        run_id     TEXT UNIQUE REFERENCES runs (id),
        PRIMARY KEY (rollout_id, position)
    );
    "#,
    // 6: a schedule may fire a rollout (a runbook over a fleet): its rate control; and its
    // fleet may be discovered in Azure at each fire instead of read from a file.
    r#"
    ALTER TABLE schedules ADD COLUMN policy TEXT;
    ALTER TABLE schedules ADD COLUMN discover TEXT;
    "#,
    // 7: the run queue: runs asked for on one machine and driven by workers on others.
    r#"
    CREATE TABLE run_queue (
        id               TEXT PRIMARY KEY,
        queue            TEXT NOT NULL,
        runbook          TEXT NOT NULL,
        runbook_ref      TEXT NOT NULL,
        content_hash     TEXT NOT NULL,
        params           TEXT NOT NULL,
        options          TEXT NOT NULL,
        status           TEXT NOT NULL,
        claimed_by       TEXT,
        lease_expires_at TEXT,
        claims           INTEGER NOT NULL DEFAULT 0,
        enqueued_at      TEXT NOT NULL
    );
    CREATE INDEX run_queue_waiting ON run_queue (queue, status, enqueued_at);
    "#,
    // 8: a distributed rollout's target queued for a worker, before the worker makes its run
    // (and links it, as `run_id`, in the transaction that creates it).
    r#"
    ALTER TABLE rollout_targets ADD COLUMN queued_as TEXT;
    CREATE UNIQUE INDEX rollout_targets_queued_as ON rollout_targets (queued_as);
    "#,
    // 9: a schedule whose fires go to the workers of a queue.
    r#"
    ALTER TABLE schedules ADD COLUMN queue TEXT;
    "#,
];

pub(crate) const POSTGRES_MIGRATIONS: &[&str] = &[
    // 1: everything SQLite's migrations 1 to 6 hold.
    r#"
    CREATE TABLE runbook_sources (
        content_hash TEXT PRIMARY KEY,
        source       TEXT NOT NULL,
        fragments    TEXT NOT NULL DEFAULT '[]'
    );
    CREATE TABLE runs (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_ref   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        params        TEXT NOT NULL,
        secret_params TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        error         TEXT,
        outputs       TEXT,
        lock_key      TEXT
    );
    CREATE INDEX runs_started_at ON runs (started_at);
    CREATE TABLE steps (
        run_id          TEXT NOT NULL REFERENCES runs (id),
        step_id         TEXT NOT NULL,
        position        BIGINT NOT NULL,
        uses            TEXT NOT NULL,
        status          TEXT NOT NULL,
        attempts        BIGINT NOT NULL DEFAULT 0,
        before_image    TEXT,
        planned_outcome TEXT,
        outputs         TEXT,
        outcome         TEXT,
        error           TEXT,
        started_at      TEXT,
        finished_at     TEXT,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE events (
        seq     BIGSERIAL PRIMARY KEY,
        run_id  TEXT NOT NULL,
        step_id TEXT,
        at      TEXT NOT NULL,
        kind    TEXT NOT NULL,
        detail  TEXT NOT NULL
    );
    CREATE INDEX events_run ON events (run_id, seq);
    CREATE INDEX events_kind ON events (kind, seq);
    CREATE TABLE locks (
        key              TEXT PRIMARY KEY,
        run_id           TEXT NOT NULL,
        owner_pid        BIGINT NOT NULL,
        owner_host       TEXT NOT NULL,
        lease_expires_at TEXT NOT NULL,
        token            BIGINT NOT NULL DEFAULT 0
    );
    CREATE INDEX locks_run ON locks (run_id);
    CREATE TABLE approvals (
        run_id      TEXT NOT NULL,
        step_id     TEXT NOT NULL,
        approved_by TEXT NOT NULL,
        approved_at TEXT NOT NULL,
        PRIMARY KEY (run_id, step_id)
    );
    CREATE TABLE schedules (
        name         TEXT PRIMARY KEY,
        runbook      TEXT NOT NULL,
        params       TEXT NOT NULL,
        targets      TEXT,
        cron         TEXT NOT NULL,
        overlap      TEXT NOT NULL,
        catchup_ms   BIGINT NOT NULL,
        jitter_ms    BIGINT NOT NULL,
        webhook      TEXT,
        paused       BIGINT NOT NULL DEFAULT 0,
        created_at   TEXT NOT NULL,
        last_seen_at TEXT NOT NULL,
        last_worst   TEXT,
        policy       TEXT,
        discover     TEXT
    );
    CREATE TABLE schedule_fires (
        seq        BIGSERIAL PRIMARY KEY,
        schedule   TEXT NOT NULL,
        occurrence TEXT NOT NULL,
        fired_at   TEXT NOT NULL,
        outcome    TEXT NOT NULL,
        run_id     TEXT,
        detail     TEXT,
        UNIQUE (schedule, occurrence)
    );
    CREATE TABLE rollouts (
        id            TEXT PRIMARY KEY,
        runbook       TEXT NOT NULL,
        runbook_ref   TEXT NOT NULL,
        content_hash  TEXT NOT NULL,
        params        TEXT NOT NULL,
        secret_params TEXT NOT NULL,
        policy        TEXT NOT NULL,
        status        TEXT NOT NULL,
        started_at    TEXT NOT NULL,
        finished_at   TEXT,
        error         TEXT
    );
    CREATE TABLE rollout_targets (
        rollout_id TEXT NOT NULL REFERENCES rollouts (id),
        position   BIGINT NOT NULL,
        label      TEXT NOT NULL,
        params     TEXT NOT NULL,
        wave       BIGINT NOT NULL,
        run_id     TEXT UNIQUE REFERENCES runs (id),
        PRIMARY KEY (rollout_id, position)
    );
    "#,
    // 2: the run queue (SQLite's 7).
    r#"
    CREATE TABLE run_queue (
        id               TEXT PRIMARY KEY,
        queue            TEXT NOT NULL,
        runbook          TEXT NOT NULL,
        runbook_ref      TEXT NOT NULL,
        content_hash     TEXT NOT NULL,
        params           TEXT NOT NULL,
        options          TEXT NOT NULL,
        status           TEXT NOT NULL,
        claimed_by       TEXT,
        lease_expires_at TEXT,
        claims           BIGINT NOT NULL DEFAULT 0,
        enqueued_at      TEXT NOT NULL
    );
    CREATE INDEX run_queue_waiting ON run_queue (queue, status, enqueued_at);
    "#,
    // 3: a distributed rollout's queued targets (SQLite's 8).
    r#"
    ALTER TABLE rollout_targets ADD COLUMN queued_as TEXT;
    CREATE UNIQUE INDEX rollout_targets_queued_as ON rollout_targets (queued_as);
    "#,
    // 4: queued schedules (SQLite's 9).
    r#"
    ALTER TABLE schedules ADD COLUMN queue TEXT;
    "#,
    // 5: the fencing check, made by the server. A failed check raises, which aborts the
    // checkpoint's transaction, so its COMMIT can leave with its statements: the server
    // answers that COMMIT by rolling back. SQLSTATE KF001 is the store's refusal; the message
    // says which check failed, the detail what was found (see `write::check_fence`).
    r#"
    CREATE FUNCTION kmsflow_fence(lock_key TEXT, holder TEXT, holder_token BIGINT, timed BOOLEAN)
    RETURNS VOID LANGUAGE plpgsql AS $$
    DECLARE
        held RECORD;
    BEGIN
        SELECT run_id, token, lease_expires_at INTO held FROM locks WHERE key = lock_key;
        IF NOT FOUND THEN
            RAISE EXCEPTION 'not held' USING ERRCODE = 'KF001';
        END IF;
        IF held.run_id <> holder OR held.token <> holder_token THEN
            RAISE EXCEPTION 'held by'
                USING ERRCODE = 'KF001', DETAIL = held.token || ' ' || held.run_id;
        END IF;
        IF timed AND held.lease_expires_at::timestamptz <= clock_timestamp() THEN
            RAISE EXCEPTION 'expired' USING ERRCODE = 'KF001', DETAIL = held.lease_expires_at;
        END IF;
    END
    $$;
    "#,
    // 6: a JSON array's elements as rows, estimated at one row: a statement joining them to a
    // table's key (a batch's steps' outcomes in one UPDATE) is then planned as index lookups.
    // With `jsonb_array_elements`' fixed estimate of 100 rows the planner scans the whole table.
    r#"
    CREATE FUNCTION kmsflow_elements(elements JSONB) RETURNS SETOF JSONB
    LANGUAGE plpgsql IMMUTABLE STRICT ROWS 1 AS $$
    BEGIN
        RETURN QUERY SELECT jsonb_array_elements(elements);
    END
    $$;
    "#,
];

/// The schema version this build writes.
pub(crate) const SCHEMA_VERSION: i64 = MIGRATIONS.len() as i64;

/// Brings the schema up to date, one migration per transaction.
pub(crate) fn migrate(conn: &mut Connection) -> Result<(), StoreError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |row| row.get(0))?;
    if found > SCHEMA_VERSION {
        return Err(StoreError::SchemaTooNew {
            found,
            supported: SCHEMA_VERSION,
        });
    }
    for (index, sql) in MIGRATIONS.iter().enumerate().skip(found as usize) {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated while we waited for the write lock.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |row| row.get(0))?;
        if now > index as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", index as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{Durability, Store};

    #[test]
    fn runbook_texts_move_out_of_runs_and_are_kept_once() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("state.db");
        // A state file as version 2 left it: the text in every run.
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(MIGRATIONS[0]).unwrap();
            conn.execute_batch(MIGRATIONS[1]).unwrap();
            conn.pragma_update(None, "user_version", 2).unwrap();
            for id in ["a", "b"] {
                conn.execute(
                    "INSERT INTO runs (id, runbook, runbook_ref, content_hash, source, params,
                                       secret_params, status, started_at)
                     VALUES (?1, 't', 't.yaml', 'h1', 'name: t', '{}', '[]', 'succeeded',
                             '2026-11-28T00:00:00Z')",
                    [id],
                )
                .unwrap();
            }
        }
        let store = Store::open_file(&path, Durability::Normal).unwrap();
        assert_eq!(store.run("a").unwrap().source, "name: t");
        assert_eq!(store.run("b").unwrap().source, "name: t");
        let kept: i64 = store
            .db()
            .query_one("SELECT count(*) FROM runbook_sources", &[], |row| {
                row.get(0)
            })
            .unwrap();
        assert_eq!(kept, 1, "one text for both runs");
        let version: i64 = store
            .db()
            .query_one("PRAGMA user_version", &[], |row| row.get(0))
            .unwrap();
        assert_eq!(version, SCHEMA_VERSION);
    }
}
