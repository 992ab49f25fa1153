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

pub(crate) use {out, outln};
