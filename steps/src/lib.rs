//! kmsflow's Azure step kinds and the ARM / Key Vault REST client they share.

// `AzureError` carries what an engineer needs (status, code, message, correlation id); it is
// returned on paths that just made a network round trip, where its size does not matter.
#![allow(clippy::result_large_err)]

pub mod azure;
pub mod client;
pub mod cloud;
pub mod discover;
pub mod error;
mod kinds;
pub mod pacer;

pub use azure::Azure;
pub use client::{AuthMode, AzureClient, AzureConfig, Caller, RetryBounds, ScopedTokens, Service};
pub use cloud::CloudProfile;
pub use error::AzureError;
pub use kinds::register;
pub use kinds::role_assignment::{ROLES, assignment_name, role_guid};
