//! Finding a fleet in Azure: the subscriptions the credential can see (Subscriptions - List)
//! and every managed cluster in each (Managed Clusters - List), following `nextLink` page by
//! page, only ever on the Resource Manager endpoint the client talks to.

use serde_json::{Map, Value};

use crate::client::AzureClient;
use crate::error::AzureError;

/// The Subscriptions API the sandbox and Azure both serve.
const SUBSCRIPTIONS_API: &str = "2022-12-01";

/// A cluster's data encryption, as its `securityProfile` says.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KmsMode {
    /// Neither infrastructure encryption nor a customer-managed key.
    None,
    /// Platform-managed keys: infrastructure encryption enabled, no Key Vault KMS.
    Pmk,
    /// A customer-managed key (Key Vault KMS enabled).
    Cmk,
}

impl KmsMode {
    pub fn as_str(self) -> &'static str {
        match self {
            KmsMode::None => "none",
            KmsMode::Pmk => "PMK",
            KmsMode::Cmk => "CMK",
        }
    }

    fn of(cluster: &Value) -> KmsMode {
        let security = &cluster["properties"]["securityProfile"];
        if security["azureKeyVaultKms"]["enabled"] == true {
            KmsMode::Cmk
        } else if security["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"]
            == "Enabled"
        {
            KmsMode::Pmk
        } else {
            KmsMode::None
        }
    }
}

/// One managed cluster as a list shows it.
#[derive(Debug, Clone, PartialEq)]
pub struct DiscoveredCluster {
    pub subscription: String,
    pub resource_group: String,
    pub name: String,
    pub location: String,
    pub kubernetes_version: String,
    pub tags: Map<String, Value>,
    pub kms: KmsMode,
}

/// Every item of a list (every page, bounded: see [`AzureClient::list_all`]). A scope that is
/// not there is an error here: a fleet is never taken to be smaller than it is.
async fn every_page(client: &AzureClient, first: url::Url) -> Result<Vec<Value>, AzureError> {
    client.list_all(&first).await?.ok_or_else(|| {
        AzureError::Refused(format!(
            "`{}`: Azure says it does not exist, so its list cannot be read",
            first.path()
        ))
    })
}

/// The ids of the enabled subscriptions the credential can see.
pub async fn subscriptions(client: &AzureClient) -> Result<Vec<String>, AzureError> {
    let url = client.arm_url(&["subscriptions"], SUBSCRIPTIONS_API)?;
    Ok(every_page(client, url)
        .await?
        .iter()
        .filter(|s| s["state"].as_str().is_none_or(|state| state == "Enabled"))
        .filter_map(|s| s["subscriptionId"].as_str().map(str::to_owned))
        .collect())
}

/// Every managed cluster of `subscription`, read with the API version that shows KMS data
/// encryption (so the mode can be told).
pub async fn clusters(
    client: &AzureClient,
    subscription: &str,
) -> Result<Vec<DiscoveredCluster>, AzureError> {
    let url = client.arm_url(
        &[
            "subscriptions",
            subscription,
            "providers",
            "Microsoft.ContainerService",
            "managedClusters",
        ],
        crate::kinds::aks_api(),
    )?;
    Ok(every_page(client, url)
        .await?
        .iter()
        .filter_map(|c| {
            let id = c["id"].as_str()?;
            // /subscriptions/{s}/resourceGroups/{g}/providers/.../managedClusters/{name}
            let segments: Vec<&str> = id.trim_start_matches('/').split('/').collect();
            let group = segments
                .iter()
                .position(|s| s.eq_ignore_ascii_case("resourceGroups"))
                .and_then(|i| segments.get(i + 1))?;
            let properties = &c["properties"];
            Some(DiscoveredCluster {
                subscription: segments.get(1)?.to_string(),
                resource_group: group.to_string(),
                name: c["name"].as_str()?.to_owned(),
                location: c["location"].as_str().unwrap_or_default().to_owned(),
                kubernetes_version: properties["currentKubernetesVersion"]
                    .as_str()
                    .or(properties["kubernetesVersion"].as_str())
                    .unwrap_or_default()
                    .to_owned(),
                tags: c["tags"].as_object().cloned().unwrap_or_default(),
                kms: KmsMode::of(c),
            })
        })
        .collect())
}
