//! Ctrl-C and SIGTERM: once stops scheduling (running steps finish and checkpoint), twice
//! cancels running steps, three times exits at once.

use kmsflow_engine::executor::Signals;

/// Installs the handlers and returns the tokens the executor watches.
pub fn install() -> Signals {
    let signals = Signals::default();
    let handle = signals.clone();
    tokio::spawn(async move {
        let mut presses = 0;
        loop {
            wait_for_interrupt().await;
            presses += 1;
            match presses {
                1 => handle.drain.cancel(),
                2 => {
                    crate::output::note!(
                        "cancelling running steps (Ctrl-C once more exits at once)"
                    );
                    handle.abort.cancel();
                }
                _ => std::process::exit(130),
            }
        }
    });
    signals
}

#[cfg(unix)]
async fn wait_for_interrupt() {
    use tokio::signal::unix::{SignalKind, signal};
    let mut terminate = signal(SignalKind::terminate()).expect("install the SIGTERM handler");
    tokio::select! {
        _ = tokio::signal::ctrl_c() => {}
        _ = terminate.recv() => {}
    }
}

#[cfg(not(unix))]
async fn wait_for_interrupt() {
    let _ = tokio::signal::ctrl_c().await;
}
