use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::aks::{self, IDENTITY_ID, KEY_ID, KEY_VAULT_ID, KMS_MODE, Kms, NAME, NETWORK_ACCESS};
use super::common::{self, LOCATION, RESOURCE_GROUP, SUBSCRIPTION, outputs};
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
            "DNS prefix (default `<name>-dns`)",
        )
        .pattern("[a-zA-Z0-9][a-zA-Z0-9-]{0,52}"),
        KMS_MODE,
        KEY_ID,
        KEY_VAULT_ID,
        NETWORK_ACCESS,
        IDENTITY_ID,
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the cluster's ARM id",
        },
        OutputSpec {
            name: "name",
            description: "its name",
        },
        OutputSpec {
            name: "kms_mode",
            description: "`PMK` or `CMK`, as the cluster reports it",
        },
        OutputSpec {
            name: "security_profile",
            description: "the cluster's `securityProfile`",
        },
    ]),
    may_be_irreversible: true,
};

pub(crate) fn cluster_outputs(body: &Value) -> Map<String, Value> {
    outputs([
        ("id", body["id"].clone()),
        ("name", body["name"].clone()),
        ("kms_mode", json!(aks::mode_of(body))),
        (
            "security_profile",
            body["properties"]["securityProfile"].clone(),
        ),
    ])
}

impl AksCluster {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        let names = (
            "Microsoft.ContainerService",
            "managedClusters",
            p.name.as_str(),
        );
        common::resource_url(
            &self.0,
            (&p.subscription, &p.resource_group),
            names,
            aks::API,
        )
        .await
    }
}

impl Params {
    fn new_cluster(&self) -> Value {
        let mut body = json!({
            "location": self.location,
            "identity": {"type": "SystemAssigned"},
            "properties": {
                "kubernetesVersion": self.kubernetes_version,
                "dnsPrefix": self.dns_prefix.clone().unwrap_or_else(|| format!("{}-dns", self.name)),
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
        common::read(&client, &url).await
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
        let fields = p.kms.differences(before);
        if fields.is_empty() {
            return Ok(StepPlan::unchanged(cluster_outputs(before)));
        }
        let current = before["properties"]["currentKubernetesVersion"]
            .as_str()
            .unwrap_or_default();
        if !aks::supports_kms(current) {
            return Err(StepError::permanent(format!(
                "cluster `{}` runs Kubernetes {current}; KMS data encryption needs 1.33 or later: upgrade it first",
                p.name
            )));
        }
        let mut plan = StepPlan::change(Change::Update {
            summary: format!(
                "switch AKS cluster {} to {} KMS encryption",
                p.name, p.kms.kms_mode
            ),
            fields,
        });
        if aks::mode_of(before) == "None" {
            plan.irreversible = Some(format!("{} on cluster `{}`", aks::NO_DOWNGRADE, p.name));
        }
        Ok(plan)
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Map<String, Value>, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        let result = if before.is_null() {
            common::put(&client, &url, &p.new_cluster()).await?
        } else {
            super::aks_kms::put_kms(&client, &url, &p.kms, before).await?
        };
        Ok(cluster_outputs(&result))
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
                common::delete(&client, &url).await?;
                Ok(Undo::Done)
            }
            Outcome::Updated => super::aks_kms::restore(&client, &url, before, &p.name).await,
            _ => Ok(Undo::NothingToUndo),
        }
    }
}
