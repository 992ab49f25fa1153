//! Run locks: a second run whose lock key is held exits at once, naming the holder.

use chrono::{DateTime, Utc};
use rusqlite::{OptionalExtension, TransactionBehavior, params};

use crate::store::timestamp;
use crate::write::ts;
use crate::{Store, StoreError};

/// The process that holds (or wants) a lock.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockOwner {
    pub pid: u32,
    pub host: String,
}

impl LockOwner {
    /// This process on this machine.
    pub fn current() -> LockOwner {
        LockOwner {
            pid: std::process::id(),
            host: hostname(),
        }
    }

    /// Whether the owner is certainly gone: a process on this host whose pid no longer exists.
    /// An owner on another host is presumed alive until its lease expires.
    fn is_certainly_dead(&self) -> bool {
        self.host == hostname() && !process_exists(self.pid)
    }
}

/// The lock is held by a live run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lock `{key}` is held by run `{run_id}` (pid {pid} on {host}, lease until {lease_expires_at})"
)]
pub struct LockHeld {
    pub key: String,
    pub run_id: String,
    pub pid: u32,
    pub host: String,
    pub lease_expires_at: DateTime<Utc>,
}

impl Store {
    /// Takes `key` for `run_id`, unless a live run holds it. A holder whose process is gone or
    /// whose lease has expired is replaced; a run re-taking its own lock (resume) always may.
    pub fn acquire_lock(
        &mut self,
        key: &str,
        run_id: &str,
        owner: &LockOwner,
        lease_expires_at: DateTime<Utc>,
        now: DateTime<Utc>,
    ) -> Result<Result<(), LockHeld>, StoreError> {
        // IMMEDIATE takes the write lock at once, so two processes cannot both see the key free.
        let tx = self
            .conn
            .transaction_with_behavior(TransactionBehavior::Immediate)?;
        let holder: Option<(String, u32, String, String)> = tx
            .query_row(
                "SELECT run_id, owner_pid, owner_host, lease_expires_at FROM locks WHERE key = ?1",
                [key],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
            )
            .optional()?;
        if let Some((holder_run, pid, host, expires)) = holder {
            let expires = timestamp(expires, "locks.lease_expires_at")?;
            let holder_owner = LockOwner { pid, host };
            let same_process = holder_owner == *owner;
            let stale = expires <= now || holder_owner.is_certainly_dead();
            if holder_run != run_id && !same_process && !stale {
                return Ok(Err(LockHeld {
                    key: key.to_owned(),
                    run_id: holder_run,
                    pid: holder_owner.pid,
                    host: holder_owner.host,
                    lease_expires_at: expires,
                }));
            }
            if holder_run == run_id && !same_process && !stale {
                // The same run is being driven by another live process (a second `resume`).
                return Ok(Err(LockHeld {
                    key: key.to_owned(),
                    run_id: holder_run,
                    pid: holder_owner.pid,
                    host: holder_owner.host,
                    lease_expires_at: expires,
                }));
            }
        }
        tx.execute(
            "INSERT INTO locks (key, run_id, owner_pid, owner_host, lease_expires_at)
             VALUES (?1, ?2, ?3, ?4, ?5)
             ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, owner_pid = excluded.owner_pid,
                 owner_host = excluded.owner_host, lease_expires_at = excluded.lease_expires_at",
            params![key, run_id, owner.pid, owner.host, ts(&lease_expires_at)],
        )?;
        tx.commit()?;
        Ok(Ok(()))
    }
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .map(|h| h.trim().to_owned())
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "localhost".to_owned())
}

fn process_exists(pid: u32) -> bool {
    if cfg!(target_os = "linux") {
        std::path::Path::new(&format!("/proc/{pid}")).exists()
    } else {
        // Without /proc we cannot tell; rely on the lease.
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use chrono::Duration;

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(&dir.path().join("state.db"), crate::Durability::Normal).unwrap();
        (dir, store)
    }

    #[test]
    fn a_live_holder_keeps_the_lock() {
        let (_dir, mut store) = store();
        let now = Utc::now();
        let me = LockOwner::current();
        store
            .acquire_lock("cluster/a", "run-1", &me, now + Duration::seconds(30), now)
            .unwrap()
            .unwrap();
        // Another process on this host that is alive: our parent is.
        let other = LockOwner {
            pid: std::os::unix::process::parent_id(),
            host: me.host.clone(),
        };
        let held = store
            .acquire_lock(
                "cluster/a",
                "run-2",
                &other,
                now + Duration::seconds(30),
                now,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!(held.run_id, "run-1");
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        let (_dir, mut store) = store();
        let now = Utc::now();
        let remote = LockOwner {
            pid: 1,
            host: "elsewhere".into(),
        };
        store
            .acquire_lock("k", "run-1", &remote, now - Duration::seconds(1), now)
            .unwrap()
            .unwrap();
        store
            .acquire_lock(
                "k",
                "run-2",
                &LockOwner::current(),
                now + Duration::seconds(30),
                now,
            )
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_dead_process_on_this_host_loses_the_lock() {
        let (_dir, mut store) = store();
        let now = Utc::now();
        let dead = LockOwner {
            pid: u32::MAX - 7,
            host: LockOwner::current().host,
        };
        store
            .acquire_lock("k", "run-1", &dead, now + Duration::seconds(300), now)
            .unwrap()
            .unwrap();
        store
            .acquire_lock(
                "k",
                "run-2",
                &LockOwner::current(),
                now + Duration::seconds(30),
                now,
            )
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_remote_holder_within_its_lease_keeps_the_lock() {
        let (_dir, mut store) = store();
        let now = Utc::now();
        let remote = LockOwner {
            pid: 42,
            host: "elsewhere".into(),
        };
        store
            .acquire_lock("k", "run-1", &remote, now + Duration::seconds(30), now)
            .unwrap()
            .unwrap();
        let held = store
            .acquire_lock(
                "k",
                "run-2",
                &LockOwner::current(),
                now + Duration::seconds(30),
                now,
            )
            .unwrap()
            .unwrap_err();
        assert_eq!((held.run_id.as_str(), held.pid), ("run-1", 42));
    }
}
