//! The Azure step kinds, one module each.

mod aks;
mod aks_cluster;
mod aks_kms;
mod aks_verify;
mod common;
mod feature;
mod generic;
mod identity;
mod keyvault;
mod keyvault_key;
mod keyvault_network;
mod keyvault_rotate;
pub mod kms_check;
mod resource_group;
pub mod role_assignment;

use std::sync::Arc;

use kmsflow_engine::Registry;

use crate::azure::Azure;

/// The managed-cluster API version the AKS kinds use: the one that shows KMS data encryption.
pub(crate) fn aks_api() -> &'static str {
    aks::API
}

/// Adds every Azure step kind to `registry`, sharing one Azure context.
pub fn register(registry: &mut Registry, azure: Arc<Azure>) {
    registry.register(Arc::new(feature::Feature(azure.clone())));
    registry.register(Arc::new(resource_group::ResourceGroup(azure.clone())));
    registry.register(Arc::new(keyvault::KeyVault(azure.clone())));
    registry.register(Arc::new(keyvault_network::KeyVaultNetwork(azure.clone())));
    registry.register(Arc::new(keyvault_key::KeyVaultKey(azure.clone())));
    registry.register(Arc::new(identity::Identity(azure.clone())));
    registry.register(Arc::new(role_assignment::RoleAssignment(azure.clone())));
    registry.register(Arc::new(aks_cluster::AksCluster(azure.clone())));
    registry.register(Arc::new(aks_kms::AksKms(azure.clone())));
    registry.register(Arc::new(aks_verify::AksVerify(azure.clone())));
    registry.register(Arc::new(generic::Resource(azure.clone())));
    registry.register(Arc::new(generic::Action(azure.clone())));
    registry.register(Arc::new(generic::Wait(azure.clone())));
    registry.register(Arc::new(generic::Assert(azure.clone())));
    registry.register(Arc::new(kms_check::KmsCheck(azure.clone())));
    registry.register(Arc::new(keyvault_rotate::KeyVaultRotate(azure)));
}
