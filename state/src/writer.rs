//! The group-commit writer.
//!
//! One thread owns the write connection. Callers hand it checkpoints (lists of writes) with a
//! completion callback; the thread takes every checkpoint that is already waiting, applies each
//! inside its own savepoint, commits them all in one transaction, and only then calls each
//! callback. A caller therefore never proceeds before its checkpoint is durable, and steps that
//! finish together pay for one device flush instead of one each. A checkpoint that fails (a
//! constraint, say) rolls back to its savepoint and fails alone.

use std::sync::mpsc;
use std::thread::JoinHandle;

use crate::{Store, StoreError, Write};

/// Called once the checkpoint is committed (or has failed).
pub type Completion = Box<dyn FnOnce(Result<(), StoreError>) + Send>;

struct Job {
    writes: Vec<Write>,
    done: Completion,
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
        if let Err(mpsc::SendError(job)) = self.jobs.send(Job { writes, done }) {
            (job.done)(Err(StoreError::WriterGone));
        }
    }
}

impl WriterThread {
    /// Waits until every queued checkpoint is committed. All [`Writer`] handles must be
    /// dropped first, or this waits forever.
    pub fn join(self) {
        let _ = self.handle.join();
    }
}

fn run(mut store: Store, receiver: mpsc::Receiver<Job>) {
    while let Ok(first) = receiver.recv() {
        let mut batch = vec![first];
        while batch.len() < MAX_BATCH {
            match receiver.try_recv() {
                Ok(job) => batch.push(job),
                Err(_) => break,
            }
        }
        let results = commit_batch(&mut store, &batch);
        for (job, result) in batch.into_iter().zip(results) {
            (job.done)(result);
        }
    }
}

fn commit_batch(store: &mut Store, batch: &[Job]) -> Vec<Result<(), StoreError>> {
    let shared_failure = |error: &rusqlite::Error| -> Vec<Result<(), StoreError>> {
        batch
            .iter()
            .map(|_| Err(StoreError::CommitFailed(error.to_string())))
            .collect()
    };
    // IMMEDIATE: take the write lock up front, so a busy file is waited for (busy_timeout)
    // instead of failing a deferred transaction's upgrade with SQLITE_BUSY.
    let mut tx = match store
        .conn
        .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)
    {
        Ok(tx) => tx,
        Err(error) => return shared_failure(&error),
    };
    let mut results = Vec::with_capacity(batch.len());
    if let [job] = batch {
        // Alone in its transaction: no savepoint needed to keep a failure to itself.
        let result = job
            .writes
            .iter()
            .try_for_each(|write| crate::write::apply(&tx, write));
        return match (result, tx.commit()) {
            (Ok(()), Ok(())) => vec![Ok(())],
            (Err(error), _) => vec![Err(error)],
            (Ok(()), Err(error)) => shared_failure(&error),
        };
    }
    for job in batch {
        let result = (|| {
            let savepoint = tx.savepoint()?;
            // `Savepoint` derefs to the connection; statements run inside the savepoint.
            for write in &job.writes {
                crate::write::apply(&savepoint, write)?;
            }
            savepoint.commit()?;
            Ok(())
        })();
        results.push(result);
    }
    match tx.commit() {
        Ok(()) => results,
        Err(error) => shared_failure(&error),
    }
}
