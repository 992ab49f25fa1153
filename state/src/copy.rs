//! `kmsflow state migrate`: one store's whole history copied into another (a SQLite file into
//! the team's PostgreSQL database), in one transaction: all of it or none.

use serde::Serialize;

use crate::db::{Arg, Db, args};
use crate::{Store, StoreError};

/// What was copied: rows per table.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Copied {
    pub tables: Vec<(&'static str, usize)>,
}

#[derive(Clone, Copy)]
enum Ty {
    Text,
    Int,
}

use Ty::{Int, Text};

/// Every table of the history, parents before children, with its columns. Locks are not
/// copied: they belong to processes on the machine the file lived on, which must have stopped.
const TABLES: &[(&str, &[(&str, Ty)])] = &[
    (
        "runbook_sources",
        &[
            ("content_hash", Text),
            ("source", Text),
            ("fragments", Text),
        ],
    ),
    (
        "runs",
        &[
            ("id", Text),
            ("runbook", Text),
            ("runbook_ref", Text),
            ("content_hash", Text),
            ("params", Text),
            ("secret_params", Text),
            ("status", Text),
            ("started_at", Text),
            ("finished_at", Text),
            ("error", Text),
            ("outputs", Text),
            ("lock_key", Text),
        ],
    ),
    (
        "steps",
        &[
            ("run_id", Text),
            ("step_id", Text),
            ("position", Int),
            ("uses", Text),
            ("status", Text),
            ("attempts", Int),
            ("before_image", Text),
            ("planned_outcome", Text),
            ("outputs", Text),
            ("outcome", Text),
            ("error", Text),
            ("started_at", Text),
            ("finished_at", Text),
        ],
    ),
    (
        "events",
        &[
            ("seq", Int),
            ("run_id", Text),
            ("step_id", Text),
            ("at", Text),
            ("kind", Text),
            ("detail", Text),
        ],
    ),
    (
        "approvals",
        &[
            ("run_id", Text),
            ("step_id", Text),
            ("approved_by", Text),
            ("approved_at", Text),
        ],
    ),
    (
        "schedules",
        &[
            ("name", Text),
            ("runbook", Text),
            ("params", Text),
            ("targets", Text),
            ("cron", Text),
            ("overlap", Text),
            ("catchup_ms", Int),
            ("jitter_ms", Int),
            ("webhook", Text),
            ("paused", Int),
            ("created_at", Text),
            ("last_seen_at", Text),
            ("last_worst", Text),
            ("policy", Text),
            ("discover", Text),
            ("queue", Text),
        ],
    ),
    (
        "schedule_fires",
        &[
            ("seq", Int),
            ("schedule", Text),
            ("occurrence", Text),
            ("fired_at", Text),
            ("outcome", Text),
            ("run_id", Text),
            ("detail", Text),
        ],
    ),
    (
        "rollouts",
        &[
            ("id", Text),
            ("runbook", Text),
            ("runbook_ref", Text),
            ("content_hash", Text),
            ("params", Text),
            ("secret_params", Text),
            ("policy", Text),
            ("status", Text),
            ("started_at", Text),
            ("finished_at", Text),
            ("error", Text),
        ],
    ),
    (
        "rollout_targets",
        &[
            ("rollout_id", Text),
            ("position", Int),
            ("label", Text),
            ("params", Text),
            ("wave", Int),
            ("run_id", Text),
            ("queued_as", Text),
        ],
    ),
    (
        "run_queue",
        &[
            ("id", Text),
            ("queue", Text),
            ("runbook", Text),
            ("runbook_ref", Text),
            ("content_hash", Text),
            ("params", Text),
            ("options", Text),
            ("status", Text),
            ("claimed_by", Text),
            ("lease_expires_at", Text),
            ("claims", Int),
            ("enqueued_at", Text),
        ],
    ),
];

/// Tables whose `seq` a sequence hands out on PostgreSQL: moved past the copied rows.
const SERIAL: &[&str] = &["events", "schedule_fires"];

enum Cell {
    Text(Option<String>),
    Int(Option<i64>),
}

impl Cell {
    fn arg(&self) -> &dyn Arg {
        match self {
            Cell::Text(text) => text,
            Cell::Int(number) => number,
        }
    }
}

impl Store {
    /// Copies every run, step, journal entry, approval, schedule, fire and rollout of `from`
    /// into this store, in one transaction. Refused when this store holds runs already (a
    /// second copy would mix two histories), or when a run of `from` is driven right now.
    pub fn copy_from(&mut self, from: &Store) -> Result<Copied, StoreError> {
        let mut source = from.db();
        let now = crate::write::ts(&source.now()?);
        let live: Vec<String> = source.query(
            "SELECT run_id FROM locks WHERE lease_expires_at > ?1",
            args![now],
            |row| row.get(0),
        )?;
        drop(source);
        if let Some(run) = live.first() {
            return Err(StoreError::CopyRefused(format!(
                "run `{run}` holds a lock in `{}` with a lease still running: stop every kmsflow \
                 using that state (or let its lease run out) before moving it",
                from.location()
            )));
        }
        let backend = self.backend_name();
        self.db().transaction(|to| {
            let held: i64 = to.query_one("SELECT count(*) FROM runs", args![], |row| row.get(0))?;
            if held > 0 {
                return Err(StoreError::CopyRefused(format!(
                    "the target already holds {held} runs: copy into an empty store, so two \
                     histories are never mixed"
                )));
            }
            let mut tables = Vec::new();
            for (table, columns) in TABLES {
                let rows = read_table(&mut from.db(), table, columns)?;
                let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
                let marks: Vec<String> = (1..=columns.len()).map(|i| format!("?{i}")).collect();
                let insert = format!(
                    "INSERT INTO {table} ({}) VALUES ({})",
                    names.join(", "),
                    marks.join(", ")
                );
                for row in &rows {
                    let values: Vec<&dyn Arg> = row.iter().map(Cell::arg).collect();
                    to.execute(&insert, &values)?;
                }
                if backend == "postgres" && SERIAL.contains(table) {
                    to.batch(&format!(
                        "SELECT setval(pg_get_serial_sequence('{table}', 'seq'), \
                         (SELECT coalesce(max(seq), 0) + 1 FROM {table}), false)"
                    ))?;
                }
                tables.push((*table, rows.len()));
            }
            Ok(Copied { tables })
        })
    }
}

fn read_table(
    db: &mut Db<'_>,
    table: &str,
    columns: &[(&str, Ty)],
) -> Result<Vec<Vec<Cell>>, StoreError> {
    let names: Vec<&str> = columns.iter().map(|(name, _)| *name).collect();
    db.query(
        &format!("SELECT {} FROM {table}", names.join(", ")),
        args![],
        |row| {
            columns
                .iter()
                .enumerate()
                .map(|(i, (_, ty))| {
                    Ok(match ty {
                        Ty::Text => Cell::Text(row.get(i)?),
                        Ty::Int => Cell::Int(row.get(i)?),
                    })
                })
                .collect()
        },
    )
}
