//! The kmsflow engine: the runbook language, its compiler to a DAG, and the durable executor.
//!
//! A run flows through: [`compile`] (pure: text in, [`CompiledRunbook`] or [`Diagnostics`]
//! out), [`params::bind`], then [`launch::start`] / [`launch::resume`], which take the run's
//! lock, record it, and hand it to the [`executor`]. [`rollback::rollback`] undoes a run;
//! [`preview::preview`] is `plan`.

pub mod cancel;
pub mod checkpoint;
mod compile;
pub mod diagnostic;
pub mod duration;
pub mod executor;
pub mod export;
mod fragment;
mod input;
pub mod kind;
mod kinds;
pub mod launch;
pub mod lease;
pub mod params;
mod pattern;
pub mod preview;
pub mod progress;
pub mod redact;
pub mod rollback;
pub mod rollout;
pub mod runbook;
pub mod schedule;
pub mod schema;
pub mod template;
mod yaml;

pub use compile::{
    FRAGMENT_KIND, FragmentResolver, NoFragments, compile, compile_with, content_hash,
};
pub use diagnostic::{Diagnostics, Problem, ProblemKind, RunbookSource};
pub use input::{check_value, prepare_input};
pub use kind::Registry;
pub use runbook::CompiledRunbook;
