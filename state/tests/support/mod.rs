//! What the store's test files share.

use std::sync::mpsc;

use kmsflow_state::{Store, StoreError, Write, Writer};

/// Commits `checkpoints` through a writer held busy until all are queued, so they go as one
/// batch; each one's result, in order. The writer is gone when this returns.
pub fn commit_together(store: Store, checkpoints: Vec<Vec<Write>>) -> Vec<Result<(), StoreError>> {
    let (writer, thread) = Writer::spawn(store);
    let (release, hold) = mpsc::channel::<()>();
    writer.run(Box::new(move |_| {
        let _ = hold.recv();
    }));
    let results: Vec<_> = checkpoints
        .into_iter()
        .map(|writes| {
            let (done, result) = mpsc::channel();
            writer.submit(writes, Box::new(move |r| done.send(r).unwrap()));
            result
        })
        .collect();
    release.send(()).unwrap();
    let results = results.into_iter().map(|r| r.recv().unwrap()).collect();
    drop(writer);
    thread.join();
    results
}
