//! The store seam: the executor commits checkpoints through [`Checkpoints`], so another
//! backend (PostgreSQL for many runners) can stand in for the SQLite writer.

use async_trait::async_trait;
use kmsflow_state::{StoreError, Write, Writer};

/// Commits a checkpoint durably; returns only once it is on disk (or has failed).
#[async_trait]
pub trait Checkpoints: Send + Sync {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError>;
}

#[async_trait]
impl Checkpoints for Writer {
    async fn commit(&self, writes: Vec<Write>) -> Result<(), StoreError> {
        let (done, committed) = tokio::sync::oneshot::channel();
        self.submit(
            writes,
            Box::new(move |result| {
                let _ = done.send(result);
            }),
        );
        committed.await.map_err(|_| StoreError::WriterGone)?
    }
}
