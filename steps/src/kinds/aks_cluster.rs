use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::aks::{
    self, IDENTITY_ID, KEY_ID, KEY_VAULT_ID, KMS_MODE, Kms, MIGRATE_FROM, NAME, NETWORK_ACCESS,
};
use super::common::{self, LOCATION, RESOURCE_GROUP, SUBSCRIPTION};
use crate::azure::Azure;

/// A new AKS cluster with KMS data encryption (platform-managed keys, or a customer-managed
/// key in a public or private vault).
pub struct AksCluster(pub Arc<Azure>);

// No `deny_unknown_fields`: serde does not support it with `flatten`; compile checks keys.
#[derive(Deserialize)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    location: String,
    #[serde(default = "version")]
    kubernetes_version: String,
    #[serde(default = "three")]
    node_count: i64,
    #[serde(default = "vm_size")]
    vm_size: String,
    #[serde(default)]
    dns_prefix: Option<String>,
    #[serde(flatten)]
    kms: Kms,
}

fn version() -> String {
    "1.33.0".into()
}
fn three() -> i64 {
    3
}
fn vm_size() -> String {
    "Standard_DS2_v2".into()
}

static SPEC: KindSpec = KindSpec {
    name: "azure.aks_cluster",
    summary: "Creates an AKS cluster (Kubernetes 1.33 or later) with KMS data encryption: `kms_mode: PMK` enables infrastructure encryption with platform-managed keys; `CMK` also uses `key_id` through the user-assigned `identity_id`, with `network_access` `Public` or `Private`. An existing cluster is brought to the same KMS settings (as `azure.aks_kms` does). Rollback deletes a cluster this run created.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        NAME,
        LOCATION,
        ParamSpec::optional(
            "kubernetes_version",
            ValueType::String,
            "at least 1.33 (default `1.33.0`)",
        )
        .pattern(r"\d+\.\d+(\.\d+)?"),
        ParamSpec::optional(
            "node_count",
            ValueType::Int,
            "nodes in the system pool (default 3)",
        ),
        ParamSpec::optional(
            "vm_size",
            ValueType::String,
            "node size (default `Standard_DS2_v2`)",
        )
        .pattern("[A-Za-z0-9_]{1,64}"),
        ParamSpec::optional(
            "dns_prefix",
            ValueType::String,
            "DNS prefix (default as `az aks create` derives it: the first 10 letters, digits and dashes of the name, then 16 of the resource group's, then the subscription's first 6 characters)",
        )
        .pattern("[a-zA-Z0-9][a-zA-Z0-9-]{0,52}"),
        KMS_MODE,
        KEY_ID,
        KEY_VAULT_ID,
        NETWORK_ACCESS,
        IDENTITY_ID,
        MIGRATE_FROM,
    ],
    outputs: OutputsSpec::Fixed(aks::CLUSTER_OUTPUTS),
    may_be_irreversible: true,
};

impl AksCluster {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        aks::cluster_url(&self.0, (&p.subscription, &p.resource_group), &p.name).await
    }
}

/// The DNS prefix `az aks create` makes when none is given: the name, the resource group and
/// the subscription, each kept to letters, digits and dashes and cut short, starting with a
/// letter (`_get_default_dns_prefix` in the Azure CLI's `acs/custom.py`). `<name>-dns` would
/// carry an underscore of the name into a DNS label, which AKS refuses.
fn default_dns_prefix(name: &str, resource_group: &str, subscription: &str) -> String {
    let keep = |text: &str, limit: usize| -> String {
        text.chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(limit)
            .collect()
    };
    let mut name_part = keep(name, 10);
    if !name_part.starts_with(|c: char| c.is_ascii_alphabetic()) {
        name_part = format!("a{name_part}").chars().take(10).collect();
    }
    format!(
        "{name_part}-{}-{}",
        keep(resource_group, 16),
        subscription.chars().take(6).collect::<String>()
    )
}

impl Params {
    fn new_cluster(&self) -> Value {
        let mut body = json!({
            "location": self.location,
            "identity": {"type": "SystemAssigned"},
            "properties": {
                "kubernetesVersion": self.kubernetes_version,
                "dnsPrefix": self.dns_prefix.clone().unwrap_or_else(|| {
                    default_dns_prefix(&self.name, &self.resource_group, &self.subscription)
                }),
                "agentPoolProfiles": [{
                    "name": "nodepool1", "mode": "System", "count": self.node_count,
                    "vmSize": self.vm_size, "osType": "Linux", "type": "VirtualMachineScaleSets",
                }],
                "securityProfile": self.kms.security_profile(),
            },
        });
        if let Some(identity) = self.kms.identity() {
            body["identity"] = identity;
        }
        if !self.kms.is_cmk() {
            // A new PMK cluster states only what it enables.
            body["properties"]["securityProfile"]
                .as_object_mut()
                .map(|p| p.remove("azureKeyVaultKms"));
        }
        body
    }
}

#[async_trait]
impl StepKind for AksCluster {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        aks::read_settled(&client, &url).await
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        p.kms.check()?;
        if before.is_null() {
            if !aks::supports_kms(&p.kubernetes_version) {
                return Err(StepError::permanent(format!(
                    "KMS data encryption needs Kubernetes 1.33 or later; `kubernetes_version` is `{}`",
                    p.kubernetes_version
                )));
            }
            return Ok(StepPlan::change(Change::Create {
                summary: format!(
                    "create AKS cluster {} ({}, Kubernetes {}) with {} KMS encryption",
                    p.name, p.location, p.kubernetes_version, p.kms.kms_mode
                ),
            }));
        }
        aks::plan_switch(&p.name, &p.kms, before)
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        let (result, existed) = if before.is_null() {
            aks::create_cluster(&client, &url, &p.new_cluster()).await?
        } else {
            (
                super::aks_kms::put_kms(&client, &url, &p.kms, before).await?,
                None,
            )
        };
        Ok(common::applied(aks::cluster_outputs(&result), existed))
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        match outcome {
            Outcome::Created => {
                let what = format!("AKS cluster `{}`", p.name);
                let marker = ("resource_uid", "/properties/resourceUID");
                common::delete_created(&client, &url, &what, cx.recorded_outputs, marker).await
            }
            Outcome::Updated => super::aks_kms::restore(&client, &url, before, &p.name).await,
            _ => Ok(Undo::NothingToUndo),
        }
    }
}

#[cfg(test)]
mod dns_prefix_tests {
    use super::default_dns_prefix;

    #[test]
    fn the_default_dns_prefix_is_azs() {
        assert_eq!(
            default_dns_prefix("aks_prod_cluster", "rg.platform-teams(eu)", "0123abcd-0000"),
            "aksprodclu-rgplatform-teams-0123ab"
        );
        assert_eq!(
            default_dns_prefix("1cluster", "rg", "sub"),
            "a1cluster-rg-sub"
        );
    }
}
