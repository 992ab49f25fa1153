//! Run locks: a second run whose lock key is held exits at once, naming the holder.

use chrono::{DateTime, Utc};

use crate::db::args;
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
    pub(crate) fn is_certainly_dead(&self) -> bool {
        self.host == hostname() && !process_exists(self.pid)
    }
}

/// The lock is held by a live run.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error(
    "lock `{key}` is held by run `{run_id}` (pid {pid} on {host}, lease until {lease_expires_at}); \
     wait for it to finish, or if that process is gone from another machine, for its lease to run out"
)]
pub struct LockHeld {
    pub key: String,
    pub run_id: String,
    pub pid: u32,
    pub host: String,
    pub lease_expires_at: DateTime<Utc>,
}

/// A lock taken: its fencing token grows every time the lock changes hands, so a former
/// holder's checks ([`crate::Write::CheckFence`]) fail once another run has it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LockGrant {
    pub token: i64,
}

impl Store {
    /// Takes `key` for `run_id` for `lease`, unless a live run holds it. The lock belongs to
    /// a run, not a process: another run in this very process is refused like one elsewhere,
    /// and so is a second driver of the same run (two `resume`s). A holder whose process is
    /// gone (this host) or whose lease has expired is replaced, with a new fencing token.
    ///
    /// Leases are timed by the store's clock (the database server's, for PostgreSQL), never
    /// by the hosts', so machines whose clocks disagree still agree on who holds a lock.
    pub fn acquire_lock(
        &mut self,
        key: &str,
        run_id: &str,
        owner: &LockOwner,
        lease: chrono::Duration,
    ) -> Result<Result<LockGrant, LockHeld>, StoreError> {
        // One writer at a time (see `Db::begin`), so two processes cannot both see it free.
        self.db().transaction(|tx| {
            let now = tx.now()?;
            let holder: Option<(String, u32, String, String, i64)> = tx.query_opt(
                "SELECT run_id, owner_pid, owner_host, lease_expires_at, token FROM locks WHERE key = ?1",
                args![key],
                |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?, row.get(4)?)),
            )?;
            let mut token = 1;
            if let Some((holder_run, pid, host, expires, held_token)) = holder {
                let expires = timestamp(expires, "locks.lease_expires_at")?;
                let holder_owner = LockOwner { pid, host };
                let stale = expires <= now || holder_owner.is_certainly_dead();
                if !stale {
                    return Ok(Err(LockHeld {
                        key: key.to_owned(),
                        run_id: holder_run,
                        pid: holder_owner.pid,
                        host: holder_owner.host,
                        lease_expires_at: expires,
                    }));
                }
                token = held_token + 1;
            }
            tx.execute(
                "INSERT INTO locks (key, run_id, owner_pid, owner_host, lease_expires_at, token)
                 VALUES (?1, ?2, ?3, ?4, ?5, ?6)
                 ON CONFLICT (key) DO UPDATE SET run_id = excluded.run_id, owner_pid = excluded.owner_pid,
                     owner_host = excluded.owner_host, lease_expires_at = excluded.lease_expires_at,
                     token = excluded.token",
                args![key, run_id, i64::from(owner.pid), owner.host, ts(&(now + lease)), token],
            )?;
            Ok(Ok(LockGrant { token }))
        })
    }

    /// Whether `run_id` is driven by a live process now: it holds `key` with a lease that
    /// has not run out (by the store's clock), from a process not certainly gone. `cancel`
    /// asks a live driver to stop; a run nobody drives any more (killed) it marks interrupted
    /// itself.
    pub fn driven_now(&self, key: &str, run_id: &str) -> Result<bool, StoreError> {
        let mut db = self.db();
        let now = db.now()?;
        let holder: Option<(String, u32, String, String)> = db.query_opt(
            "SELECT run_id, owner_pid, owner_host, lease_expires_at FROM locks WHERE key = ?1",
            args![key],
            |row| Ok((row.get(0)?, row.get(1)?, row.get(2)?, row.get(3)?)),
        )?;
        let Some((holder, pid, host, expires)) = holder else {
            return Ok(false);
        };
        let expires = timestamp(expires, "locks.lease_expires_at")?;
        Ok(holder == run_id && expires > now && !LockOwner { pid, host }.is_certainly_dead())
    }
}

/// The host id locks are taken under: `KMSFLOW_HOST_ID`, else the machine's hostname. Set it
/// where hostnames repeat (containers that all say `localhost`, CI runners from one image): a
/// holder on "this host" whose pid is gone is taken over at once, so two machines sharing a
/// name could take each other's locks before the lease runs out.
fn hostname() -> String {
    if let Some(id) = std::env::var("KMSFLOW_HOST_ID")
        .ok()
        .filter(|id| !id.trim().is_empty())
    {
        return id.trim().to_owned();
    }
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
        let store =
            Store::open_file(&dir.path().join("state.db"), crate::Durability::Normal).unwrap();
        (dir, store)
    }

    #[test]
    fn a_live_holder_keeps_the_lock() {
        let (_dir, mut store) = store();
        let me = LockOwner::current();
        store
            .acquire_lock("cluster/a", "run-1", &me, Duration::seconds(30))
            .unwrap()
            .unwrap();
        // Another process on this host that is alive: our parent is.
        let other = LockOwner {
            pid: std::os::unix::process::parent_id(),
            host: me.host.clone(),
        };
        let held = store
            .acquire_lock("cluster/a", "run-2", &other, Duration::seconds(30))
            .unwrap()
            .unwrap_err();
        assert_eq!(held.run_id, "run-1");
    }

    #[test]
    fn an_expired_lease_is_taken_over() {
        let (_dir, mut store) = store();
        let remote = LockOwner {
            pid: 1,
            host: "elsewhere".into(),
        };
        store
            .acquire_lock("k", "run-1", &remote, Duration::seconds(-1))
            .unwrap()
            .unwrap();
        store
            .acquire_lock("k", "run-2", &LockOwner::current(), Duration::seconds(30))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn a_dead_process_on_this_host_loses_the_lock() {
        let (_dir, mut store) = store();
        let dead = LockOwner {
            pid: u32::MAX - 7,
            host: LockOwner::current().host,
        };
        store
            .acquire_lock("k", "run-1", &dead, Duration::seconds(300))
            .unwrap()
            .unwrap();
        store
            .acquire_lock("k", "run-2", &LockOwner::current(), Duration::seconds(30))
            .unwrap()
            .unwrap();
    }

    #[test]
    fn another_run_in_this_very_process_is_refused() {
        let (_dir, mut store) = store();
        let me = LockOwner::current();
        let lease = Duration::seconds(30);
        store
            .acquire_lock("k", "run-1", &me, lease)
            .unwrap()
            .unwrap();
        let held = store
            .acquire_lock("k", "run-2", &me, lease)
            .unwrap()
            .unwrap_err();
        assert_eq!((held.run_id.as_str(), held.pid), ("run-1", me.pid));
        // And the same run, driven a second time while it holds the lock (two resumes).
        let held = store
            .acquire_lock("k", "run-1", &me, lease)
            .unwrap()
            .unwrap_err();
        assert_eq!(held.run_id, "run-1");
    }

    #[test]
    fn every_takeover_raises_the_fencing_token_and_fences_the_old_holder_out() {
        let (_dir, mut store) = store();
        let remote = LockOwner {
            pid: 1,
            host: "elsewhere".into(),
        };
        let first = store
            .acquire_lock("k", "run-1", &remote, Duration::seconds(-1))
            .unwrap()
            .unwrap();
        let second = store
            .acquire_lock("k", "run-2", &LockOwner::current(), Duration::seconds(30))
            .unwrap()
            .unwrap();
        assert!(second.token > first.token);
        let fence = |store: &mut Store, run: &str, token: i64| {
            store.commit(&[crate::Write::CheckFence {
                key: "k".into(),
                run_id: run.into(),
                token,
            }])
        };
        let lost = fence(&mut store, "run-1", first.token).unwrap_err();
        assert!(
            matches!(&lost, StoreError::LeaseLost { why, .. } if why.contains("run `run-2` holds it")),
            "{lost}"
        );
        fence(&mut store, "run-2", second.token).unwrap();
        // Renewal is compare and swap: the old holder cannot extend the new one's lease.
        let renewal = store.commit(&[crate::Write::RenewLock {
            key: "k".into(),
            run_id: "run-1".into(),
            token: first.token,
            lease: Duration::seconds(60),
        }]);
        assert!(matches!(renewal, Err(StoreError::LeaseLost { .. })));
    }

    #[test]
    fn a_remote_holder_within_its_lease_keeps_the_lock() {
        let (_dir, mut store) = store();
        let remote = LockOwner {
            pid: 42,
            host: "elsewhere".into(),
        };
        store
            .acquire_lock("k", "run-1", &remote, Duration::seconds(30))
            .unwrap()
            .unwrap();
        let held = store
            .acquire_lock("k", "run-2", &LockOwner::current(), Duration::seconds(30))
            .unwrap()
            .unwrap_err();
        assert_eq!((held.run_id.as_str(), held.pid), ("run-1", 42));
    }
}
