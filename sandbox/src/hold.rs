//! Holding answers back for a configured latency, to within a fraction of a millisecond.
//!
//! tokio's timers fire on whole-millisecond ticks, and late when the runtime is busy: a
//! configured 50 ms came back as 51.5 to 53 ms, and everything measured against the sandbox
//! (the fleet benchmark's ideal, the makespan's critical path) carried that error. One thread
//! keeps the deadlines in a heap and sleeps to the nearest one with the operating system's
//! own timer, which wakes within tens of microseconds.

use std::collections::BTreeMap;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::time::Instant;

use tokio::sync::oneshot;

type Waiter = (Instant, oneshot::Sender<()>);

/// The hold thread; dropping this stops it (and releases whatever it still holds).
pub(crate) struct Holds {
    deadlines: mpsc::Sender<Waiter>,
}

impl Holds {
    pub(crate) fn start() -> Holds {
        let (deadlines, receiver) = mpsc::channel::<Waiter>();
        std::thread::Builder::new()
            .name("sandbox-holds".into())
            .spawn(move || run(receiver))
            .expect("spawn the sandbox's hold thread");
        Holds { deadlines }
    }

    /// Returns at `deadline` (at once if it has passed).
    pub(crate) async fn until(&self, deadline: Instant) {
        if deadline <= Instant::now() {
            return;
        }
        let (wake, woken) = oneshot::channel();
        if self.deadlines.send((deadline, wake)).is_err() {
            // The thread is gone: a coarser timer is better than none.
            tokio::time::sleep_until(deadline.into()).await;
            return;
        }
        let _ = woken.await;
    }
}

fn run(receiver: mpsc::Receiver<Waiter>) {
    // By deadline, then by arrival, so equal deadlines wake in the order they came.
    let mut waiting: BTreeMap<(Instant, u64), oneshot::Sender<()>> = BTreeMap::new();
    let mut next_id = 0u64;
    loop {
        let now = Instant::now();
        while let Some(entry) = waiting.first_entry() {
            if entry.key().0 > now {
                break;
            }
            let _ = entry.remove().send(());
        }
        let received = match waiting.keys().next() {
            None => receiver.recv().map_err(|_| RecvTimeoutError::Disconnected),
            Some((deadline, _)) => receiver.recv_timeout(deadline.saturating_duration_since(now)),
        };
        match received {
            Ok((deadline, wake)) => {
                waiting.insert((deadline, next_id), wake);
                next_id += 1;
            }
            Err(RecvTimeoutError::Timeout) => {}
            // The sandbox is gone; dropping the senders releases whoever still waits.
            Err(RecvTimeoutError::Disconnected) => return,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use super::*;

    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn holds_release_in_deadline_order_and_close_to_their_deadline() {
        let holds = std::sync::Arc::new(Holds::start());
        let started = Instant::now();
        let mut tasks = Vec::new();
        for ms in [30u64, 10, 20] {
            let holds = holds.clone();
            tasks.push(tokio::spawn(async move {
                holds.until(started + Duration::from_millis(ms)).await;
                (ms, started.elapsed())
            }));
        }
        for task in tasks {
            let (ms, took) = task.await.unwrap();
            let wanted = Duration::from_millis(ms);
            assert!(took >= wanted, "released early: {took:?} for {wanted:?}");
            // Generous for a loaded CI machine; typically within 0.2 ms.
            assert!(
                took < wanted + Duration::from_millis(40),
                "released late: {took:?} for {wanted:?}"
            );
        }
        // A passed deadline does not wait at all.
        let before = Instant::now();
        holds.until(started).await;
        assert!(before.elapsed() < Duration::from_millis(5));
    }
}
