//! What the store's test files share.

use std::sync::mpsc;

use chrono::Utc;
use kmsflow_state::{NewRun, Store, StoreError, Write, Writer};
use serde_json::json;

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

/// A new run `id` of runbook `t` with `steps` (all `noop`), holding `lock_key` if given.
pub fn new_run(id: &str, steps: &[&str], lock_key: Option<&str>) -> Write {
    Write::CreateRun(NewRun {
        id: id.into(),
        runbook: "t".into(),
        runbook_ref: "t.yaml".into(),
        content_hash: "hash-t".into(),
        source: "name: t".into(),
        params: json!({"cluster": "aks-1"}),
        secret_params: vec!["token".into()],
        started_at: Utc::now(),
        lock_key: lock_key.map(str::to_owned),
        steps: steps.iter().map(|s| ((*s).into(), "noop".into())).collect(),
        fragments: json!([]),
    })
}
