//! Standard output that ends quietly when its reader has gone: `kmsflow runbooks | head` must
//! not panic (Rust's `println!` does on a closed pipe). The process exits 141, as a Unix tool
//! killed by SIGPIPE reports itself, so `set -o pipefail` scripts see what they expect.

use std::io::Write as _;

/// Exit status of a process stopped by a closed pipe (128 + SIGPIPE).
const CLOSED_PIPE: i32 = 141;

/// Writes `text` to standard output; other write errors are ignored, as `println!`'s would
/// not be worth more than the output itself.
pub fn write(text: std::fmt::Arguments<'_>) {
    let mut stdout = std::io::stdout().lock();
    if let Err(error) = stdout.write_fmt(text).and_then(|()| stdout.flush())
        && error.kind() == std::io::ErrorKind::BrokenPipe
    {
        std::process::exit(CLOSED_PIPE);
    }
}

/// `println!` to standard output, ending quietly on a closed pipe.
macro_rules! outln {
    () => { $crate::output::write(format_args!("\n")) };
    ($($arg:tt)*) => { $crate::output::write(format_args!("{}\n", format_args!($($arg)*))) };
}

/// `print!` to standard output, ending quietly on a closed pipe.
macro_rules! out {
    ($($arg:tt)*) => { $crate::output::write(format_args!($($arg)*)) };
}

/// Whether stderr carries JSON lines (`--log-format json`); set once at start.
static JSON_LOGS: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

pub fn set_json_logs(json: bool) {
    let _ = JSON_LOGS.set(json);
}

pub fn json_logs() -> bool {
    JSON_LOGS.get().copied().unwrap_or(false)
}

/// A message for the operator on stderr: `kmsflow: ...`, or under `--log-format json` a JSON
/// line with its time and level, so a log pipeline gets all of a run's output as JSON.
pub fn note_at(level: &str, text: std::fmt::Arguments<'_>) {
    let mut stderr = std::io::stderr().lock();
    let _ = if json_logs() {
        let line = serde_json::json!({
            "ts": crate::render::now_rfc3339(),
            "level": level,
            "event": "message",
            "message": text.to_string(),
        });
        writeln!(stderr, "{line}")
    } else if level == "ERROR" {
        writeln!(stderr, "error: {text}")
    } else {
        writeln!(stderr, "kmsflow: {text}")
    };
}

/// `kmsflow: ...` on stderr (a JSON line under `--log-format json`).
macro_rules! note {
    ($($arg:tt)*) => { $crate::output::note_at("INFO", format_args!($($arg)*)) };
}

pub(crate) use {note, out, outln};
