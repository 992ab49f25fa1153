//! The Azure step kinds, one module each.

mod common;
mod feature;
mod identity;
mod keyvault;
mod keyvault_key;
mod keyvault_network;
mod resource_group;
pub mod role_assignment;

use std::sync::Arc;

use kmsflow_engine::Registry;

use crate::azure::Azure;

/// Adds every Azure step kind to `registry`, sharing one Azure context.
pub fn register(registry: &mut Registry, azure: Arc<Azure>) {
    registry.register(Arc::new(feature::Feature(azure.clone())));
    registry.register(Arc::new(resource_group::ResourceGroup(azure.clone())));
    registry.register(Arc::new(keyvault::KeyVault(azure.clone())));
    registry.register(Arc::new(keyvault_network::KeyVaultNetwork(azure.clone())));
    registry.register(Arc::new(keyvault_key::KeyVaultKey(azure.clone())));
    registry.register(Arc::new(identity::Identity(azure.clone())));
    registry.register(Arc::new(role_assignment::RoleAssignment(azure)));
}
