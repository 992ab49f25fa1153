//! `auth=entra`: signing in to Azure Database for PostgreSQL with a Microsoft Entra access
//! token as the password.
//!
//! The server checks the token once, when a session starts; a session keeps going after its
//! token expires. So a token matters only at connect time: it is kept for the next session
//! (a reconnect after a restart, another store of this process) and replaced once it is
//! within [`REFRESH_BEFORE`] of expiring, so no session ever starts with a token that could
//! expire while the server looks at it.
//!
//! This crate does not know Azure's credentials: whoever opens the store gives it a
//! [`TokenSource`] (the binary gives the credential its steps use). The token is never shown:
//! not in `Debug`, not in an error, not in the store.

use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime};

use futures::future::BoxFuture;

use crate::StoreError;

/// A token is replaced this long before it expires.
pub const REFRESH_BEFORE: Duration = Duration::from_secs(5 * 60);

/// An access token and when it expires.
#[derive(Clone)]
pub struct AccessToken {
    pub secret: String,
    pub expires_at: SystemTime,
}

impl std::fmt::Debug for AccessToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AccessToken")
            .field("secret", &"***")
            .field("expires_at", &self.expires_at)
            .finish()
    }
}

/// Where `auth=entra` tokens come from. The future runs on the store's own runtime.
pub trait TokenSource: Send + Sync {
    /// A fresh token for Azure Database for PostgreSQL, or why there is none (never holding
    /// a secret).
    fn token(&self) -> BoxFuture<'static, Result<AccessToken, String>>;
}

/// The password of an `auth=entra` location: its source, once given, and the token kept.
/// Shared by every clone of the location, so a process asks once per token lifetime.
#[derive(Default)]
pub(crate) struct EntraPassword {
    source: Mutex<Option<Arc<dyn TokenSource>>>,
    kept: Mutex<Option<AccessToken>>,
}

impl EntraPassword {
    pub(crate) fn set_source(&self, source: Arc<dyn TokenSource>) {
        *self.source.lock().expect("token source") = Some(source);
    }

    /// The token to sign in with at `now`: the kept one, unless it is about to expire.
    /// `fetch` waits on the source's future (on the store's runtime).
    pub(crate) fn password(
        &self,
        now: SystemTime,
        fetch: impl FnOnce(
            BoxFuture<'static, Result<AccessToken, String>>,
        ) -> Result<AccessToken, String>,
    ) -> Result<String, String> {
        // Held while fetching: stores opened together wait for one token rather than each
        // asking the identity endpoint for its own.
        let mut kept = self.kept.lock().expect("kept token");
        if let Some(token) = kept.as_ref().filter(|t| fresh(t, now)) {
            return Ok(token.secret.clone());
        }
        let source = self.source.lock().expect("token source").clone().ok_or_else(|| {
            "this program gave the store no Azure credential to get a Microsoft Entra token with"
                .to_owned()
        })?;
        let token = fetch(source.token())?;
        if !fresh(&token, now) {
            return Err(format!(
                "the Azure credential gave a token that expires in under {} minutes",
                REFRESH_BEFORE.as_secs() / 60
            ));
        }
        let secret = token.secret.clone();
        *kept = Some(token);
        Ok(secret)
    }
}

fn fresh(token: &AccessToken, now: SystemTime) -> bool {
    token
        .expires_at
        .duration_since(now)
        .is_ok_and(|left| left > REFRESH_BEFORE)
}

/// The error of a connection that could not get its token.
pub(crate) fn no_token(location: &str, why: String) -> StoreError {
    StoreError::Connect {
        location: location.to_owned(),
        detail: format!(
            "auth=entra: no Microsoft Entra token for Azure Database for PostgreSQL: {why}"
        ),
        what_to_check: "auth=entra signs in with the credential the steps use: check --auth \
                        (KMSFLOW_AUTH) and that this identity can get a token here",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    /// Hands out `token-1`, `token-2`, ... each living `lifetime`.
    struct Counting {
        asked: AtomicU32,
        lifetime: Duration,
        at: SystemTime,
    }

    impl TokenSource for Counting {
        fn token(&self) -> BoxFuture<'static, Result<AccessToken, String>> {
            let n = self.asked.fetch_add(1, Ordering::SeqCst) + 1;
            let token = AccessToken {
                secret: format!("token-{n}"),
                expires_at: self.at + self.lifetime * n,
            };
            Box::pin(async move { Ok(token) })
        }
    }

    fn block(
        future: BoxFuture<'static, Result<AccessToken, String>>,
    ) -> Result<AccessToken, String> {
        futures::executor::block_on(future)
    }

    #[test]
    fn a_token_is_kept_until_it_is_about_to_expire_then_replaced() {
        let start = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let source = Arc::new(Counting {
            asked: AtomicU32::new(0),
            lifetime: Duration::from_secs(3600),
            at: start,
        });
        let password = EntraPassword::default();
        password.set_source(source.clone());

        assert_eq!(password.password(start, block).unwrap(), "token-1");
        let later = start + Duration::from_secs(3600) - REFRESH_BEFORE - Duration::from_secs(1);
        assert_eq!(password.password(later, block).unwrap(), "token-1");
        assert_eq!(
            source.asked.load(Ordering::SeqCst),
            1,
            "kept, not asked again"
        );

        // Within the margin: replaced before it expires, not after.
        let near = start + Duration::from_secs(3600) - REFRESH_BEFORE;
        assert_eq!(password.password(near, block).unwrap(), "token-2");
        assert_eq!(source.asked.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn no_source_or_a_token_about_to_expire_is_refused_without_a_secret() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        let password = EntraPassword::default();
        let error = password.password(now, block).unwrap_err();
        assert!(error.contains("no Azure credential"), "{error}");

        password.set_source(Arc::new(Counting {
            asked: AtomicU32::new(0),
            lifetime: Duration::from_secs(60),
            at: now,
        }));
        let error = password.password(now, block).unwrap_err();
        assert!(error.contains("expires in under 5 minutes"), "{error}");
        assert!(!error.contains("token-1"), "{error}");
        let shown = format!(
            "{:?}",
            AccessToken {
                secret: "s3cret".into(),
                expires_at: now
            }
        );
        assert!(!shown.contains("s3cret"), "{shown}");
    }
}
