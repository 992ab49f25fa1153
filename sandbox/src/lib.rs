//! kmsflow's sandbox: a real HTTP server on 127.0.0.1 that behaves like the parts of Azure
//! kmsflow's steps use (Resource Manager, Key Vault's data plane, and a managed-identity token
//! endpoint), including how they fail.
//!
//! It is how the tests run and how a new user tries a runbook without a subscription. It
//! depends on none of kmsflow's crates: it stands in for Azure, and must not share code with
//! the client it tests.

mod addressing;
mod auth;
mod faults;
mod hold;
mod server;
mod tls;
mod world;

pub use addressing::{ARM_HOST, Addressing, VAULT_SUFFIX};
pub use faults::{
    Delays, Faults, Latency, Lie, LieAnswer, Loss, LostAnswer, Rule, ServerErrors, Throttle,
};
pub use server::{
    RequestRecord, Sandbox, SandboxOptions, SeedAssignment, SeedFeature, SeedGroup, SeedKey,
    WorldSeed,
};
