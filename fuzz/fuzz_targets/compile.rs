//! Parse + compile never panics, and every diagnostic's span stays inside the input.
//! Run: `cargo +nightly fuzz run compile` (from the repository root).

#![no_main]

use kmsflow_engine::{Registry, RunbookSource, compile};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let registry = Registry::with_engine_kinds();
    if let Err(diagnostics) = compile(&RunbookSource::new("fuzz.yaml", text), &registry) {
        for problem in diagnostics.problems {
            assert!(problem.span.offset + problem.span.len <= text.len());
            assert!(text.is_char_boundary(problem.span.offset));
        }
    }
});
