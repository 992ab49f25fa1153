//! The group-commit writer.
//!
//! One thread owns the write connection. Callers hand it checkpoints (lists of writes) with a
//! completion callback; the thread takes every checkpoint that is already waiting, commits
//! them all in one transaction, and only then calls each callback. A caller therefore never
//! proceeds before its checkpoint is durable, and steps that finish together pay for one device
//! flush instead of one each. A checkpoint that fails (a constraint, a fence) fails alone: on
//! SQLite each checkpoint has its own savepoint; on PostgreSQL the batch first goes whole, in
//! one round trip (its journal rows in one statement, each run's fencing check once), and only
//! after a failure again with a savepoint each.
//!
//! Work that must read before it writes (taking a run lock, loading a run to resume it) runs on
//! the same thread through [`Writer::run`], between two batches, so many runs can share one
//! connection and one writer: a fleet check's thousand runs then share their commits too.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::db::{CommitFailure, Db};
use crate::{Store, StoreError, Write};

/// Called once the checkpoint is committed (or has failed).
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

/// Work on the writer's connection, outside any batch.
pub type Exclusive = Box<dyn FnOnce(&mut Store) + Send>;

enum Job {
    Checkpoint {
        writes: Vec<Write>,
        done: Completion,
    },
    Exclusive(Exclusive),
}

/// A handle to the writer thread. Cloning shares the same thread.
#[derive(Clone)]
pub struct Writer {
    jobs: mpsc::Sender<Job>,
}

/// Owns the thread; dropping it without [`WriterThread::join`] leaves the thread to finish alone.
pub struct WriterThread {
    handle: JoinHandle<()>,
}

/// Checkpoints waiting beyond this many are left for the next transaction, so one huge batch
/// cannot delay the first callers' acknowledgements indefinitely.
const MAX_BATCH: usize = 512;

impl Writer {
    /// Starts the writer thread on `store`'s connection.
    pub fn spawn(store: Store) -> (Writer, WriterThread) {
        let (jobs, receiver) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("kmsflow-state-writer".into())
            .spawn(move || run(store, receiver))
            .expect("spawn the state writer thread");
        (Writer { jobs }, WriterThread { handle })
    }

    /// Queues a checkpoint; `done` runs on the writer thread after the commit.
    pub fn submit(&self, writes: Vec<Write>, done: Completion) {
        if let Err(mpsc::SendError(Job::Checkpoint { done, .. })) =
            self.jobs.send(Job::Checkpoint { writes, done })
        {
            done(Err(StoreError::WriterGone));
        }
    }

    /// Queues `work` to run on the writer's connection after the checkpoints queued before it
    /// are committed. If the thread is gone, `work` is dropped without running (a caller
    /// waiting on a channel inside it then sees the channel close).
    pub fn run(&self, work: Exclusive) {
        let _ = self.jobs.send(Job::Exclusive(work));
    }
}

impl WriterThread {
    /// Waits until every queued checkpoint is committed. All [`Writer`] handles must be
    /// dropped first, or this waits forever.
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

struct Checkpoint {
    writes: Vec<Write>,
    done: Completion,
}

fn run(mut store: Store, receiver: mpsc::Receiver<Job>) {
    // An exclusive job found while gathering a batch waits here until the batch is committed,
    // so every job still runs in the order it was queued.
    let mut held: Option<Job> = None;
    while let Some(first) = held.take().or_else(|| receiver.recv().ok()) {
        let (writes, done) = match first {
            Job::Exclusive(work) => {
                work(&mut store);
                continue;
            }
            Job::Checkpoint { writes, done } => (writes, done),
        };
        let mut batch = vec![Checkpoint { writes, done }];
        let mut yields = YIELDS_BEFORE_SEALING;
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Err(mpsc::TryRecvError::Empty) if yields > 0 => {
                    yields -= 1;
                    std::thread::yield_now();
                }
                Ok(Job::Checkpoint { writes, done }) => batch.push(Checkpoint { writes, done }),
                Ok(exclusive) => {
                    held = Some(exclusive);
                    break;
                }
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut store, &batch);
        for (job, result) in batch.into_iter().zip(results) {
            (job.done)(result);
        }
    }
}

/// How many times the writer gives up the CPU, finding nothing more waiting, before it seals a
/// batch. Checkpoints of steps that finish together are submitted one by one as the engine
/// takes each step's end in; on a busy core the first one wakes the writer before the others
/// are submitted, and a batch sealed at once then commits one checkpoint and leaves the rest
/// for the next flush. With nothing else wanting the CPU (a chain: one checkpoint at a time)
/// a yield returns at once. On PostgreSQL a fan-out at `--concurrency 8` went from 6,900 to
/// 8,300 steps/s to 9,500 to 10,200 (`cargo bench --bench engine`), the chain unchanged.
const YIELDS_BEFORE_SEALING: u32 = 3;

/// How many more busy timeouts (10 s each) a checkpoint waits for the state file.
const BUSY_RETRIES: u32 = 11;

/// How long a checkpoint waits for a PostgreSQL session that broke to come back (the server
/// restarting, a failover, the network) before the run stops, resumable.
const RECONNECT_FOR: std::time::Duration = std::time::Duration::from_secs(60);

fn is_busy(error: &StoreError) -> bool {
    matches!(
        error,
        StoreError::Sqlite(error) if matches!(
            error.sqlite_error_code(),
            Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
        )
    )
}

/// How a batch's transaction ended.
enum Attempt {
    /// Committed, or failed before anything was sent to commit: each checkpoint's result.
    Done(Vec<Result<(), StoreError>>),
    /// The session broke before COMMIT was sent: nothing of the batch is stored, and the whole
    /// batch may be tried again on a new session.
    SessionLost(StoreError),
    /// The session broke with the batch's COMMIT in flight, after the transaction's id came.
    InDoubt(Box<InDoubt>),
}

/// A transaction whose COMMIT was in flight when the session broke (`error`): the server is
/// asked on a new session whether transaction `xid` committed. If it did, each checkpoint's
/// result is its entry in `if_committed`; if it rolled back, nothing is stored and the batch
/// may go again.
struct InDoubt {
    xid: i64,
    error: StoreError,
    if_committed: Vec<Result<(), StoreError>>,
}

fn commit_batch(store: &mut Store, batch: &[Checkpoint]) -> Vec<Result<(), StoreError>> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(100);
    loop {
        let lost = match store.reconnect_if_lost() {
            Ok(_) => match try_batch(store, batch) {
                Attempt::Done(results) => {
                    // Committed, but to the file the path still names? A state file or log
                    // deleted under the store takes every commit since with it.
                    return match store.files_intact() {
                        Ok(()) => results,
                        Err(error) => {
                            tracing::error!(%error, "the state file vanished under the store");
                            all_failed(batch, error)
                        }
                    };
                }
                Attempt::SessionLost(error) => error,
                Attempt::InDoubt(in_doubt) => match committed(store, in_doubt.xid) {
                    Ok(true) => {
                        tracing::warn!(error = %in_doubt.error, xid = in_doubt.xid, "the state database session broke with a COMMIT in flight; the server says it committed");
                        return in_doubt.if_committed;
                    }
                    Ok(false) => {
                        tracing::warn!(error = %in_doubt.error, xid = in_doubt.xid, "the state database session broke with a COMMIT in flight; the server says it rolled back, so the batch goes again");
                        in_doubt.error
                    }
                    Err(why) => {
                        return all_failed(batch, commit_unknown(in_doubt.error, Some(why)));
                    }
                },
            },
            Err(error) => error,
        };
        if started.elapsed() >= RECONNECT_FOR {
            let why = format!(
                "the state database was unreachable for {} s ({lost}); nothing of these \
                 checkpoints is stored: the run stops here and resumes from its last checkpoint \
                 once the database is back",
                RECONNECT_FOR.as_secs()
            );
            return batch
                .iter()
                .map(|_| Err(StoreError::CommitFailed(why.clone())))
                .collect();
        }
        tracing::warn!(error = %lost, "the state database session broke; reconnecting");
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_secs(5));
    }
}

/// How long the server may still say a transaction whose COMMIT's answer was lost is in
/// progress: until its old session is ended (at once when the connection closed;
/// `idle_in_transaction_session_timeout`, 10 s, when the connection is silent).
const IN_DOUBT_FOR: std::time::Duration = std::time::Duration::from_secs(30);

/// Whether transaction `xid`, whose COMMIT's answer was lost with its session, committed: the
/// server's own record, asked on a new session (within bounds: reaching the server for
/// [`RECONNECT_FOR`], the transaction ending for [`IN_DOUBT_FOR`]). Without an answer, why.
fn committed(store: &mut Store, xid: i64) -> Result<bool, String> {
    let started = std::time::Instant::now();
    let mut pause = std::time::Duration::from_millis(50);
    loop {
        let status = store
            .reconnect_if_lost()
            .and_then(|()| store.transaction_status(xid));
        let waited = started.elapsed();
        match status {
            Ok(Some(status)) if status == "committed" => return Ok(true),
            Ok(Some(status)) if status == "aborted" => return Ok(false),
            Ok(status) if waited >= IN_DOUBT_FOR => {
                return Err(format!(
                    "after {} s the server still says transaction {xid} is {}",
                    IN_DOUBT_FOR.as_secs(),
                    status.as_deref().unwrap_or("unknown to it")
                ));
            }
            Ok(_) => {}
            Err(error)
                if error.is_connection_lost() || matches!(error, StoreError::Connect { .. }) =>
            {
                if waited >= RECONNECT_FOR {
                    return Err(format!(
                        "the state database was unreachable for {} s ({error})",
                        RECONNECT_FOR.as_secs()
                    ));
                }
            }
            Err(error) => return Err(error.to_string()),
        }
        std::thread::sleep(pause);
        pause = (pause * 2).min(std::time::Duration::from_secs(2));
    }
}

/// Opens the batch's write transaction. One writer at a time: a busy SQLite file is waited
/// for (busy_timeout) instead of failing a deferred transaction's upgrade with SQLITE_BUSY. A
/// file held longer than that (a backup, another tool's long transaction) is waited for
/// again, up to a bound: a run whose checkpoint fails stops, and a moment's contention should
/// not stop it.
fn begin(tx: &mut Db<'_>, batch: &[Checkpoint]) -> Result<(), Attempt> {
    let mut waited = 0;
    loop {
        match tx.begin() {
            Ok(()) => return Ok(()),
            Err(error) if is_busy(&error) && waited < BUSY_RETRIES => {
                waited += 1;
                tracing::warn!(%error, attempt = waited, "the state file is busy; waiting again");
            }
            Err(error) if error.is_connection_lost() => return Err(Attempt::SessionLost(error)),
            Err(error) => return Err(Attempt::Done(all_failed(batch, error))),
        }
    }
}

fn try_batch(store: &mut Store, batch: &[Checkpoint]) -> Attempt {
    let mut tx = store.db();
    if let Err(attempt) = begin(&mut tx, batch) {
        return attempt;
    }
    if batch.len() == 1 || tx.is_postgres() {
        // Every checkpoint in one transaction, without savepoints: on PostgreSQL their
        // statements and the COMMIT then leave in one round trip, unless a write must read
        // first (see `PgConn`). Any failure rolls the whole transaction back. Alone, the
        // failure is the checkpoint's own; in a batch, the batch goes again below with a
        // savepoint each, to keep the failure to its checkpoint and commit the others.
        // Without savepoints the batch's journal rows can go as one statement (on
        // PostgreSQL), and a fencing check made once stands for its repeats (`apply_all`).
        tx.gather_rows();
        let outcome =
            match crate::write::apply_all(&mut tx, batch.iter().flat_map(|job| &job.writes)) {
                Ok(()) => tx.commit_or_tell(),
                Err(error) => Err(CommitFailure::RolledBack(error)),
            };
        match outcome {
            Ok(()) => return Attempt::Done(batch.iter().map(|_| Ok(())).collect()),
            // Never tried again blindly: that could record a transition twice.
            Err(CommitFailure::Unknown {
                error,
                xid: Some(xid),
            }) => {
                return Attempt::InDoubt(Box::new(InDoubt {
                    xid,
                    error,
                    if_committed: batch.iter().map(|_| Ok(())).collect(),
                }));
            }
            Err(CommitFailure::Unknown { error, xid: None }) => {
                return Attempt::Done(all_failed(batch, commit_unknown(error, None)));
            }
            // Before COMMIT was sent: nothing is stored, and all may go again.
            Err(CommitFailure::RolledBack(error)) if error.is_connection_lost() => {
                return Attempt::SessionLost(error);
            }
            Err(CommitFailure::RolledBack(error)) => {
                tx.rollback();
                if batch.len() == 1 {
                    return Attempt::Done(vec![Err(error)]);
                }
                tracing::debug!(%error, "a checkpoint of the batch failed; again, one savepoint each");
                if let Err(attempt) = begin(&mut tx, batch) {
                    return attempt;
                }
            }
        }
    }
    let mut results = Vec::with_capacity(batch.len());
    // Each checkpoint in its own savepoint, and settled before the next begins, so a failure
    // is the checkpoint's own. The release of one, the next one's savepoint and its
    // statements go in one round trip on PostgreSQL, and COMMIT releases the last.
    let mut open = false;
    for job in batch {
        let result = (|| {
            if open {
                tx.execute_then("RELEASE SAVEPOINT checkpoint", &[])?;
            }
            tx.execute_then("SAVEPOINT checkpoint", &[])?;
            open = true;
            let applied = job
                .writes
                .iter()
                .try_for_each(|write| crate::write::apply(&mut tx, write))
                .and_then(|()| tx.settle());
            if let Err(error) = applied {
                // Keep the failure to this checkpoint: the others still commit.
                tx.batch("ROLLBACK TO SAVEPOINT checkpoint; RELEASE SAVEPOINT checkpoint")?;
                open = false;
                return Err(error);
            }
            Ok(())
        })();
        if let Err(error) = &result
            && error.is_connection_lost()
        {
            return Attempt::SessionLost(result.unwrap_err());
        }
        results.push(result);
    }
    match tx.commit_or_tell() {
        Ok(()) => Attempt::Done(results),
        Err(CommitFailure::Unknown {
            error,
            xid: Some(xid),
        }) => Attempt::InDoubt(Box::new(InDoubt {
            xid,
            error,
            if_committed: results,
        })),
        Err(CommitFailure::Unknown { error, xid: None } | CommitFailure::RolledBack(error)) => {
            tx.rollback();
            Attempt::Done(all_failed(batch, commit_unknown(error, None)))
        }
    }
}

/// The same failure for every checkpoint of the batch: none of them is stored.
fn all_failed(batch: &[Checkpoint], error: StoreError) -> Vec<Result<(), StoreError>> {
    let text = match error {
        StoreError::CommitFailed(text) => text,
        other => other.to_string(),
    };
    batch
        .iter()
        .map(|_| Err(StoreError::CommitFailed(text.clone())))
        .collect()
}

/// A COMMIT that failed: on a broken session, unless the server could say whether it landed
/// (`unanswered` says why it could not), it is never tried again (that could record a
/// transition twice) and never acknowledged.
fn commit_unknown(error: StoreError, unanswered: Option<String>) -> StoreError {
    if error.is_connection_lost() {
        let asked = unanswered
            .map(|why| format!(", and the server could not say whether it landed: {why}"))
            .unwrap_or_default();
        StoreError::CommitFailed(format!(
            "the state database session broke while committing ({error}){asked}; whether the \
             last checkpoint was stored is unknown, so the run stops here: `kmsflow resume` \
             observes the world again and goes on from what is stored"
        ))
    } else {
        error
    }
}

#[cfg(test)]
mod tests {
    use std::sync::mpsc;

    use super::*;
    use crate::Durability;

    fn new_run(id: &str) -> Write {
        crate::write::new_run(id, &[("a", "noop")])
    }

    #[test]
    fn exclusive_work_runs_after_the_checkpoints_queued_before_it() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_file(&dir.path().join("state.db"), Durability::Normal).unwrap();
        let (writer, thread) = Writer::spawn(store);
        let (seen, saw) = mpsc::channel();
        // Queued back to back, so the writer finds them together: the exclusive job must wait
        // for the batch before it, and the checkpoint after it must wait for the job.
        for id in ["first", "second"] {
            writer.submit(vec![new_run(id)], Box::new(|result| result.unwrap()));
        }
        let order = seen.clone();
        writer.run(Box::new(move |store| {
            order.send(store.runs(10).unwrap().len()).unwrap();
        }));
        writer.submit(vec![new_run("third")], Box::new(|result| result.unwrap()));
        writer.run(Box::new(move |store| {
            seen.send(store.runs(10).unwrap().len()).unwrap();
        }));
        drop(writer);
        thread.join();
        assert_eq!(saw.iter().collect::<Vec<_>>(), [2, 3]);
    }

    /// Commits `writes` alone and returns what the writer said.
    fn commit_alone(writer: &Writer, writes: Vec<Write>) -> Result<(), StoreError> {
        let (sent, answer) = mpsc::channel();
        writer.submit(writes, Box::new(move |result| sent.send(result).unwrap()));
        answer.recv().unwrap()
    }

    #[test]
    fn a_failed_checkpoint_leaves_nothing_of_itself_behind() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open_file(&dir.path().join("state.db"), Durability::Normal).unwrap();
        let (writer, thread) = Writer::spawn(store);
        commit_alone(&writer, vec![new_run("taken")]).unwrap();
        // Alone in its transaction: the first write is fine, the second breaks a key.
        let failed = commit_alone(&writer, vec![new_run("fresh"), new_run("taken")]);
        assert!(
            failed.is_err(),
            "a duplicate run id must fail the checkpoint"
        );
        // And inside a batch: one checkpoint fails, the one beside it still commits.
        let (sent, answers) = mpsc::channel();
        for writes in [
            vec![new_run("also-fresh"), new_run("taken")],
            vec![new_run("neighbour")],
        ] {
            let sent = sent.clone();
            writer.submit(
                writes,
                Box::new(move |result| sent.send(result.is_ok()).unwrap()),
            );
        }
        drop(sent);
        let mut outcomes: Vec<bool> = answers.iter().collect();
        outcomes.sort();
        assert_eq!(outcomes, [false, true]);
        let (listed, list) = mpsc::channel();
        writer.run(Box::new(move |store| {
            let ids: Vec<String> = store.runs(10).unwrap().into_iter().map(|r| r.id).collect();
            listed.send(ids).unwrap();
        }));
        let mut ids = list.recv().unwrap();
        ids.sort();
        drop(writer);
        thread.join();
        assert_eq!(
            ids,
            ["neighbour", "taken"],
            "nothing of a failed checkpoint is kept"
        );
    }
}
