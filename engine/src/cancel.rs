//! Cancel requests from another shell. `kmsflow cancel RUN` journals `cancel_requested`
//! under the run's (or rollout's) id; the process driving it sees the entry within a quarter
//! of a second and drains it as Ctrl-C would: no new step starts, running steps finish and
//! checkpoint, the lock is released, and the run is `interrupted`. The request travels
//! through the state file, so it reaches the driver whatever process or user it runs as.

use std::collections::HashMap;
use std::sync::mpsc::{RecvTimeoutError, Sender};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use kmsflow_state::{Durability, Location, Store, StoreError};
use tokio_util::sync::CancellationToken;

/// The journal entry a cancel request is.
pub const CANCEL_REQUESTED: &str = "cancel_requested";

/// How often the driver looks for requests: the delay before a cancel takes effect.
const POLL_EVERY: Duration = Duration::from_millis(250);

type Tokens = Arc<Mutex<HashMap<String, CancellationToken>>>;

/// Watches the journal for cancel requests aimed at the runs this process drives.
pub(crate) struct CancelWatch {
    tokens: Tokens,
    stop: Option<Sender<()>>,
    thread: Option<JoinHandle<()>>,
}

impl CancelWatch {
    /// Starts watching requests journaled from now on, on a connection of its own.
    pub(crate) fn start(
        location: &Location,
        durability: Durability,
    ) -> Result<CancelWatch, StoreError> {
        let store = Store::open(location, durability)?;
        let mut seen = store.last_event_seq()?;
        let tokens: Tokens = Arc::default();
        let (stop, stopped) = std::sync::mpsc::channel::<()>();
        let watched = tokens.clone();
        let thread = std::thread::Builder::new()
            .name("kmsflow-cancel-watch".into())
            .spawn(move || {
                loop {
                    match stopped.recv_timeout(POLL_EVERY) {
                        Err(RecvTimeoutError::Timeout) => {}
                        _ => return,
                    }
                    let requests = match store.events_of_kind_after(CANCEL_REQUESTED, seen) {
                        Ok(requests) => requests,
                        // A busy file: the next look finds the request all the same.
                        Err(error) => {
                            tracing::debug!(%error, "could not look for cancel requests");
                            continue;
                        }
                    };
                    for (seq, id) in requests {
                        seen = seq;
                        let tokens = watched.lock().unwrap_or_else(|p| p.into_inner());
                        if let Some(token) = tokens.get(&id) {
                            tracing::info!(%id, "cancel requested from another shell: draining");
                            token.cancel();
                        }
                    }
                }
            })
            .expect("spawn the cancel watcher");
        Ok(CancelWatch {
            tokens,
            stop: Some(stop),
            thread: Some(thread),
        })
    }

    /// A drain token for `id` that a request cancels, under `parent` (Ctrl-C still drains
    /// it); the request stops applying when the returned guard is dropped.
    pub(crate) fn register(&self, id: &str, parent: &CancellationToken) -> Registered {
        let token = parent.child_token();
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .insert(id.to_owned(), token.clone());
        Registered {
            tokens: self.tokens.clone(),
            id: id.to_owned(),
            token,
        }
    }
}

impl Drop for CancelWatch {
    fn drop(&mut self) {
        drop(self.stop.take());
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

/// A run's registration with the watcher.
pub(crate) struct Registered {
    tokens: Tokens,
    id: String,
    pub(crate) token: CancellationToken,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.tokens
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}
