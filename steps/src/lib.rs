//! kmsflow's Azure step kinds and the ARM / Key Vault REST client they share.

pub mod client;
pub mod error;

pub use client::{AuthMode, AzureClient, AzureConfig, Caller, RetryBounds};
pub use error::AzureError;
