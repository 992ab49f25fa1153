//! Engine-level step kinds: they need nothing but the engine, and serve drills, tests and
//! runbook plumbing.

mod approve;
mod assert;
mod fail;
mod file;
mod noop;
mod sleep;

use std::sync::Arc;

use crate::kind::Registry;

// The engine's own kinds are added here, where they live, so `kind.rs` (the trait and the
// registry) knows nothing of them.
impl Registry {
    /// The engine-level kinds: `noop`, `sleep`, `fail`, `assert`, `approve`, `file`.
    pub fn with_engine_kinds() -> Registry {
        let mut registry = Registry::new();
        registry.register(Arc::new(noop::Noop));
        registry.register(Arc::new(sleep::Sleep));
        registry.register(Arc::new(fail::Fail));
        registry.register(Arc::new(assert::Assert));
        registry.register(Arc::new(approve::Approve));
        registry.register(Arc::new(file::File));
        registry
    }
}

#[cfg(test)]
pub(crate) mod test_support {
    use serde_json::Value;
    use tokio_util::sync::CancellationToken;

    use crate::kind::StepContext;

    /// Owns what a [`StepContext`] borrows, for unit tests of step kinds.
    pub struct Harness {
        pub input: Value,
        cancel: CancellationToken,
    }

    impl Harness {
        pub fn new(input: Value) -> Harness {
            Harness {
                input,
                cancel: CancellationToken::new(),
            }
        }

        pub fn cx(&self, attempt: u32) -> StepContext<'_> {
            StepContext {
                run_id: "run-test",
                step_id: "step",
                attempt,
                input: &self.input,
                approval: None,
                cancel: &self.cancel,
                earlier_before: None,
                input_has_secrets: false,
                recorded_outputs: None,
            }
        }
    }
}
