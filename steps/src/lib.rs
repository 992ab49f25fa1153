//! kmsflow's Azure step kinds and the ARM / Key Vault REST client they share.

pub mod azure;
pub mod client;
pub mod error;
mod kinds;

pub use azure::Azure;
pub use client::{AuthMode, AzureClient, AzureConfig, Caller, RetryBounds};
pub use error::AzureError;
pub use kinds::register;
pub use kinds::role_assignment::{ROLES, assignment_name, role_guid};
