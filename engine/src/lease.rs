//! A run's hold on its lock: the fencing token it was granted, the check that goes first in
//! every checkpoint before a write to Azure, and the renewal that keeps the lease alive.
//!
//! Every run holds a lock. A runbook's `lock:` names the thing it changes (a cluster's
//! resource id); a runbook without one still holds `run/<id>`, its claim on itself, so two
//! `resume`s of one run never both proceed. Keys are compared in lower case, because ARM
//! names are case-insensitive: `RG-X/AKS-1` and `rg-x/aks-1` are one cluster. (A key that is
//! not an ARM id is made no less exclusive by it.)

use std::sync::Arc;
use std::time::Duration;

use kmsflow_state::{StoreError, Write};

use crate::checkpoint::Checkpoints;

/// Lease length of a run lock unless `KMSFLOW_LOCK_LEASE` says otherwise; a live run renews
/// it every quarter of its length.
pub const LOCK_LEASE: Duration = Duration::from_secs(60);

/// The lease this process takes: `KMSFLOW_LOCK_LEASE` (seconds, at least 4), else
/// [`LOCK_LEASE`]. How long a runner that went silent (a closed laptop lid, a partition, a
/// `kill -STOP`) keeps its locks before another may take over; shorter takes over sooner and
/// renews more often.
pub fn lock_lease() -> Duration {
    static LEASE: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *LEASE.get_or_init(|| {
        std::env::var("KMSFLOW_LOCK_LEASE")
            .ok()
            .and_then(|text| text.trim().parse::<u64>().ok())
            .filter(|seconds| *seconds >= 4)
            .map_or(LOCK_LEASE, Duration::from_secs)
    })
}

/// [`lock_lease`] as the store takes it (leases are timed by the store's clock).
pub fn lease() -> chrono::Duration {
    chrono::Duration::from_std(lock_lease()).expect("a lease fits")
}

/// The lock key a run without `lock:` holds: its claim on itself.
pub fn claim_on_run(run_id: &str) -> String {
    format!("run/{}", run_id.to_lowercase())
}

/// A lock key as stored and compared.
pub fn normalise(key: &str) -> String {
    key.to_lowercase()
}

/// A lock this run holds, with the fencing token it was granted, and when (on this process's
/// monotonic clock) its lease was last granted or renewed.
#[derive(Debug, Clone)]
pub struct HeldLock {
    pub key: String,
    pub token: i64,
    renewed: Renewed,
}

impl PartialEq for HeldLock {
    fn eq(&self, other: &HeldLock) -> bool {
        (&self.key, self.token) == (&other.key, other.token)
    }
}

impl Eq for HeldLock {}

/// The monotonic instant of the last grant or renewal, shared by a lock's clones (the
/// renewal task writes it, the executor's fences read it).
#[derive(Debug, Clone)]
struct Renewed(Arc<std::sync::Mutex<std::time::Instant>>);

impl Renewed {
    fn now() -> Renewed {
        Renewed(Arc::new(std::sync::Mutex::new(std::time::Instant::now())))
    }

    fn mark(&self) {
        *self.0.lock().unwrap_or_else(|p| p.into_inner()) = std::time::Instant::now();
    }

    fn elapsed(&self) -> Duration {
        self.0.lock().unwrap_or_else(|p| p.into_inner()).elapsed()
    }
}

impl HeldLock {
    /// A lock just granted with `token`.
    pub fn granted(key: impl Into<String>, token: i64) -> HeldLock {
        HeldLock {
            key: key.into(),
            token,
            renewed: Renewed::now(),
        }
    }

    /// The fencing check to put first in a checkpoint that precedes a write to Azure: the
    /// checkpoint (and so the write) fails if another run holds the lock now (its token
    /// changed) or, once this process's own monotonic clock says the lease may have lapsed
    /// (paused, frozen, a closed lid), if it ran out by the store's clock. While the holder
    /// renewed within its lease by the monotonic clock, the store's clock is not asked: a
    /// wall-clock step (NTP, a VM restored) must not stop a live run nobody took over. A
    /// takeover always changes the token, so the check stays exact.
    pub fn fence(&self, run_id: &str) -> Write {
        let (key, run_id, token) = (self.key.clone(), run_id.to_owned(), self.token);
        // A quarter of the lease to spare: the renewal runs every quarter.
        if self.renewed.elapsed() < lock_lease() * 3 / 4 {
            Write::CheckHolder { key, run_id, token }
        } else {
            Write::CheckFence { key, run_id, token }
        }
    }

    /// Frees the lock with the run's final checkpoint.
    pub fn release(&self, run_id: &str) -> Write {
        Write::ReleaseLock {
            key: self.key.clone(),
            run_id: run_id.to_owned(),
        }
    }

    /// Renews the lease every quarter of its length until the returned guard is dropped. Renewal is compare
    /// and swap on the fencing token; once it fails the lease is lost, renewal stops, and the
    /// next fencing check stops the run before it writes.
    pub fn keep(&self, checkpoints: Arc<dyn Checkpoints>, run_id: &str) -> LeaseKeeper {
        let (key, token, run_id) = (self.key.clone(), self.token, run_id.to_owned());
        let renewed = self.renewed.clone();
        let task = tokio::spawn(async move {
            loop {
                tokio::time::sleep(lock_lease() / 4).await;
                let renewal = Write::RenewLock {
                    key: key.clone(),
                    run_id: run_id.clone(),
                    token,
                    lease: lease(),
                };
                match checkpoints.commit(vec![renewal]).await {
                    Ok(()) => renewed.mark(),
                    Err(
                        error @ StoreError::LeaseLost {
                            taken_by: Some(_), ..
                        },
                    ) => {
                        tracing::warn!(%error, "lease lost; the run stops before its next write");
                        return;
                    }
                    // No row yet: a new run's claim is held with its first checkpoint.
                    Err(StoreError::LeaseLost { taken_by: None, .. }) => {}
                    // A busy state file: try again at the next renewal, well within the lease.
                    Err(error) => tracing::warn!(%error, "could not renew the lease"),
                }
            }
        });
        LeaseKeeper { task }
    }
}

/// Renews a lease while it lives.
pub struct LeaseKeeper {
    task: tokio::task::JoinHandle<()>,
}

impl Drop for LeaseKeeper {
    fn drop(&mut self) {
        self.task.abort();
    }
}
