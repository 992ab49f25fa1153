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
use std::time::Duration;

// tokio's clock, so the pacer's timing is tested on a paused clock, exactly.
use tokio::time::Instant;

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
    /// Tokens left when last heard from ARM (or the full bucket before that).
    remaining: f64,
    heard_at: Instant,
    /// Requests sent and not answered yet: each will take a token.
    in_flight: u32,
    /// No request before this (a 429's Retry-After).
    hold_until: Option<Instant>,
}

impl Mirror {
    fn new(shape: BucketShape, now: Instant) -> Mirror {
        Mirror {
            shape,
            remaining: shape.capacity,
            heard_at: now,
            in_flight: 0,
            hold_until: None,
        }
    }

    /// Tokens there will be for a new request: what ARM last said, refilled since, less what
    /// requests in flight will take.
    fn available(&self, now: Instant) -> f64 {
        let refilled =
            now.saturating_duration_since(self.heard_at).as_secs_f64() * self.shape.refill_per_s;
        (self.remaining + refilled).min(self.shape.capacity) - f64::from(self.in_flight)
    }
}

/// The mirrors of every subscription's buckets.
#[derive(Debug, Default)]
pub struct Pacer {
    mirrors: Mutex<HashMap<(String, bool), Mirror>>,
}

/// A request's place in its bucket: dropping it (the answer came, or the request failed)
/// frees it.
pub struct Slot<'a> {
    pacer: &'a Pacer,
    key: (String, bool),
    /// Whether ARM's count for this request was heard (it then includes the request).
    heard: bool,
}

impl Slot<'_> {
    /// Records the answer's remaining count and a 429's Retry-After.
    pub fn observe(&mut self, remaining: Option<u64>, retry_after: Option<Duration>) {
        self.heard |= remaining.is_some();
        self.pacer
            .observe(&self.key.0, self.key.1, remaining, retry_after);
    }
}

impl Drop for Slot<'_> {
    fn drop(&mut self) {
        let now = Instant::now();
        if let Some(mirror) = self
            .pacer
            .mirrors
            .lock()
            .expect("pacer lock")
            .get_mut(&self.key)
        {
            mirror.in_flight = mirror.in_flight.saturating_sub(1);
            if !self.heard {
                // No count from ARM: the request took a token all the same.
                mirror.remaining = (mirror.available(now) + f64::from(mirror.in_flight)) - 1.0;
                mirror.heard_at = now;
            }
        }
    }
}

impl Pacer {
    /// Waits until a request for `subscription` (`write` or read) may go, then counts it in
    /// flight until the returned slot is dropped.
    pub async fn acquire(&self, subscription: &str, write: bool) -> Slot<'_> {
        let key = (subscription.to_owned(), write);
        loop {
            let wait = {
                let now = Instant::now();
                let mut mirrors = self.mirrors.lock().expect("pacer lock");
                let shape = if write { WRITES } else { READS };
                let mirror = mirrors
                    .entry(key.clone())
                    .or_insert_with(|| Mirror::new(shape, now));
                let hold = mirror
                    .hold_until
                    .map_or(Duration::ZERO, |until| until.saturating_duration_since(now));
                let available = mirror.available(now);
                if hold.is_zero() && available >= 1.0 {
                    mirror.in_flight += 1;
                    return Slot {
                        pacer: self,
                        key,
                        heard: false,
                    };
                }
                // Wait for one token's refill (plus a little spread, so waiters do not wake
                // together), or for the hold to end.
                let refill =
                    Duration::from_secs_f64((1.0 - available).max(0.0) / mirror.shape.refill_per_s);
                hold.max(refill).max(Duration::from_millis(5))
                    + Duration::from_micros(fastrand::u64(0..2_000))
            };
            tokio::time::sleep(wait).await;
        }
    }

    /// Corrects the mirror from an answer: the remaining count ARM reported, and a 429's
    /// Retry-After.
    fn observe(
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
        if let Some(remaining) = remaining {
            // ARM's count already includes this request, but answers arrive out of order: an
            // older answer's higher count must not undo a newer one's. Counts only ever lower
            // the estimate; the refill raises it again.
            let estimate = (mirror.available(now) + f64::from(mirror.in_flight)).max(0.0);
            mirror.remaining = (remaining as f64).min(estimate);
            mirror.heard_at = now;
        }
        if let Some(after) = retry_after {
            let until = now + after;
            mirror.hold_until = Some(mirror.hold_until.map_or(until, |h| h.max(until)));
            // ARM's Retry-After is when a request is accepted again: one token then (the
            // paused-clock test showed a whole refill period wasted after every 429 before).
            mirror.remaining = 1.0;
            mirror.heard_at = until;
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

    /// Virtual time since `start`, on the paused clock.
    fn since(start: Instant) -> Duration {
        Instant::now() - start
    }

    #[tokio::test(start_paused = true)]
    async fn a_full_bucket_sends_at_once_then_paces_at_the_refill_rate() {
        let pacer = Pacer::default();
        let started = Instant::now();
        for _ in 0..250 {
            // Answered without a count: each still takes a token.
            drop(pacer.acquire("s", false).await);
        }
        assert_eq!(since(started), Duration::ZERO, "the burst goes at once");
        let _next = pacer.acquire("s", false).await;
        // One read token refills in 40 ms (25/s); a waiter adds at most 2 ms of spread.
        let waited = since(started);
        assert!(
            waited >= Duration::from_millis(40) && waited <= Duration::from_millis(42),
            "the 251st waits for one refill: {waited:?}"
        );
        // Writes have their own bucket.
        let quick = Instant::now();
        let _write = pacer.acquire("s", true).await;
        assert_eq!(since(quick), Duration::ZERO);
    }

    #[tokio::test(start_paused = true)]
    async fn an_older_answer_arriving_late_does_not_raise_a_newer_count() {
        let pacer = Pacer::default();
        let mut older = pacer.acquire("s", false).await;
        let mut newer = pacer.acquire("s", false).await;
        newer.observe(Some(1), None);
        older.observe(Some(2), None);
        drop((older, newer));
        // One token left, not two: one request goes, the next waits for the refill.
        drop(pacer.acquire("s", false).await);
        let started = Instant::now();
        drop(pacer.acquire("s", false).await);
        assert!(
            since(started) >= Duration::from_millis(40),
            "the late answer's count was believed: {:?}",
            since(started)
        );
    }

    #[tokio::test(start_paused = true)]
    async fn the_servers_count_and_retry_after_rule() {
        let pacer = Pacer::default();
        pacer.acquire("s", false).await.observe(Some(0), None);
        let started = Instant::now();
        drop(pacer.acquire("s", false).await);
        assert!(
            since(started) >= Duration::from_millis(40),
            "no token left: wait for one"
        );
        pacer
            .acquire("t", false)
            .await
            .observe(Some(249), Some(Duration::from_millis(300)));
        let started = Instant::now();
        drop(pacer.acquire("t", false).await);
        let waited = since(started);
        assert!(
            waited >= Duration::from_millis(300) && waited <= Duration::from_millis(302),
            "nothing before Retry-After, and no longer: {waited:?}"
        );
        // A bucket the server keeps full (no limits) never slows anyone down.
        let started = Instant::now();
        for _ in 0..1000 {
            let mut slot = pacer.acquire("u", false).await;
            slot.observe(Some(249), None);
        }
        assert_eq!(since(started), Duration::ZERO);
        assert_eq!(
            subscription_of("/subscriptions/abc/resourceGroups/x"),
            Some("abc")
        );
        assert_eq!(subscription_of("/_kv/vault/keys/k"), None);
    }
}
