//! Pacing requests to ARM's per-subscription request-rate limits.
//!
//! ARM meters each subscription with token buckets (reads: 250 burst, refilled 25/s; writes:
//! 200 burst, refilled 10/s) and says how many tokens remain in
//! `x-ms-ratelimit-remaining-subscription-reads`/`-writes`. A fleet check that fires requests
//! as fast as it can empties the bucket and then collects 429s. The pacer keeps a local mirror
//! of each bucket: every request takes a token (waiting for its refill when there is none),
//! every answer's header corrects the estimate downwards, and a 429's `Retry-After` holds every
//! request for that subscription until it has passed, since ARM refuses (and re-arms) any
//! request sent earlier.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// A bucket's shape: burst and refill per second.
#[derive(Debug, Clone, Copy)]
pub struct BucketShape {
    pub capacity: f64,
    pub refill_per_s: f64,
}

pub const READS: BucketShape = BucketShape {
    capacity: 250.0,
    refill_per_s: 25.0,
};
pub const WRITES: BucketShape = BucketShape {
    capacity: 200.0,
    refill_per_s: 10.0,
};

#[derive(Debug)]
struct Mirror {
    shape: BucketShape,
    tokens: f64,
    updated: Instant,
    /// No request before this (a 429's Retry-After).
    hold_until: Option<Instant>,
}

impl Mirror {
    fn new(shape: BucketShape, now: Instant) -> Mirror {
        Mirror {
            shape,
            tokens: shape.capacity,
            updated: now,
            hold_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.saturating_duration_since(self.updated).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.shape.refill_per_s).min(self.shape.capacity);
        self.updated = now;
    }
}

/// The mirrors of every subscription's buckets.
#[derive(Debug, Default)]
pub struct Pacer {
    mirrors: Mutex<HashMap<(String, bool), Mirror>>,
}

impl Pacer {
    /// How long to wait before sending a request for `subscription` (`write` or read); the
    /// token is taken now, so concurrent callers queue up behind each other.
    pub fn reserve(&self, subscription: &str, write: bool) -> Duration {
        let now = Instant::now();
        let mut mirrors = self.mirrors.lock().expect("pacer lock");
        let shape = if write { WRITES } else { READS };
        let mirror = mirrors
            .entry((subscription.to_owned(), write))
            .or_insert_with(|| Mirror::new(shape, now));
        mirror.refill(now);
        mirror.tokens -= 1.0;
        let refill_wait = if mirror.tokens >= 0.0 {
            Duration::ZERO
        } else {
            Duration::from_secs_f64(-mirror.tokens / mirror.shape.refill_per_s)
        };
        let hold = mirror
            .hold_until
            .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
        refill_wait.max(hold)
    }

    /// Corrects the mirror from an answer: the remaining count ARM reported, and a 429's
    /// Retry-After.
    pub fn observe(
        &self,
        subscription: &str,
        write: bool,
        remaining: Option<u64>,
        retry_after: Option<Duration>,
    ) {
        let now = Instant::now();
        let mut mirrors = self.mirrors.lock().expect("pacer lock");
        let shape = if write { WRITES } else { READS };
        let mirror = mirrors
            .entry((subscription.to_owned(), write))
            .or_insert_with(|| Mirror::new(shape, now));
        mirror.refill(now);
        if let Some(remaining) = remaining {
            // Never believe in more tokens than ARM says are left.
            mirror.tokens = mirror.tokens.min(remaining as f64);
        }
        if let Some(after) = retry_after {
            let until = now + after;
            mirror.hold_until = Some(mirror.hold_until.map_or(until, |h| h.max(until)));
            mirror.tokens = mirror.tokens.min(0.0);
        }
    }
}

/// The subscription an ARM path is metered against, if any.
pub fn subscription_of(path: &str) -> Option<&str> {
    let mut segments = path.trim_start_matches('/').split('/');
    segments
        .next()
        .filter(|s| s.eq_ignore_ascii_case("subscriptions"))
        .and_then(|_| segments.next())
        .filter(|s| !s.is_empty())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_bucket_sends_at_once_then_paces_at_the_refill_rate() {
        let pacer = Pacer::default();
        for _ in 0..250 {
            assert_eq!(pacer.reserve("s", false), Duration::ZERO);
        }
        let wait = pacer.reserve("s", false);
        assert!(
            wait > Duration::from_millis(30) && wait <= Duration::from_millis(45),
            "{wait:?}"
        );
        let next = pacer.reserve("s", false);
        assert!(next > wait, "later requests queue behind: {next:?}");
        // Writes have their own bucket.
        assert_eq!(pacer.reserve("s", true), Duration::ZERO);
    }

    #[test]
    fn headers_and_retry_after_hold_requests() {
        let pacer = Pacer::default();
        pacer.observe("s", false, Some(0), None);
        assert!(pacer.reserve("s", false) >= Duration::from_millis(30));
        pacer.observe("t", false, None, Some(Duration::from_secs(2)));
        assert!(pacer.reserve("t", false) >= Duration::from_millis(1900));
        assert_eq!(
            subscription_of("/subscriptions/abc/resourceGroups/x"),
            Some("abc")
        );
        assert_eq!(subscription_of("/_kv/vault/keys/k"), None);
    }
}
