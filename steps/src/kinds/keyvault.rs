use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{
    self, LOCATION, REPLACE_TAGS, RESOURCE_GROUP, SUBSCRIPTION, TAGS, outputs, pattern,
};
use crate::azure::Azure;

pub(crate) const API: &str = "2025-05-01";

/// A Key Vault (management plane).
pub struct KeyVault(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    location: String,
    tenant: String,
    #[serde(default = "standard")]
    sku: String,
    #[serde(default = "yes")]
    enable_rbac_authorization: bool,
    #[serde(default = "enabled")]
    public_network_access: String,
    #[serde(default = "ninety")]
    soft_delete_retention_days: i64,
    #[serde(default)]
    purge_protection: bool,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    replace_tags: bool,
}

/// Vault properties Azure computes: never sent back in a PUT.
const READ_ONLY: &[&str] = &["provisioningState", "vaultUri", "hsmPoolResourceId"];

fn standard() -> String {
    "standard".into()
}
fn yes() -> bool {
    true
}
fn enabled() -> String {
    "Enabled".into()
}
fn ninety() -> i64 {
    90
}

static SPEC: KindSpec = KindSpec {
    name: "azure.keyvault",
    summary: "Ensures a Key Vault with RBAC authorization, public network access, SKU, soft-delete retention and purge protection as given; keeps its firewall rules. Rollback deletes a vault this run created (Key Vault keeps it soft-deleted, holding the name for the retention period) or puts back changed properties. Enabling purge protection cannot be undone.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        ParamSpec::required(
            "name",
            ValueType::String,
            "the vault's name, 3-24 letters, digits and hyphens, globally unique",
        )
        .pattern(pattern::VAULT),
        LOCATION,
        ParamSpec::required(
            "tenant",
            ValueType::String,
            "the tenant id that authenticates requests to the vault",
        )
        .pattern(pattern::GUID),
        ParamSpec::optional(
            "sku",
            ValueType::String,
            "`standard` (default) or `premium`",
        )
        .one_of(&["standard", "premium"]),
        ParamSpec::optional(
            "enable_rbac_authorization",
            ValueType::Bool,
            "authorize data-plane calls with Azure RBAC (default true; kmsflow's key steps need it)",
        ),
        ParamSpec::optional(
            "public_network_access",
            ValueType::String,
            "`Enabled` (default) or `Disabled`",
        )
        .one_of(&["Enabled", "Disabled"]),
        ParamSpec::optional(
            "soft_delete_retention_days",
            ValueType::Int,
            "7 to 90 (default 90)",
        ),
        ParamSpec::optional(
            "purge_protection",
            ValueType::Bool,
            "enable purge protection (irreversible; default false)",
        ),
        TAGS,
        REPLACE_TAGS,
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the vault's ARM id",
        },
        OutputSpec {
            name: "name",
            description: "its name",
        },
        OutputSpec {
            name: "vault_uri",
            description: "its data-plane URI (what key steps call)",
        },
        OutputSpec {
            name: "created_at",
            description: "when Azure made it (`systemData.createdAt`); rollback deletes it only if it is still that vault",
        },
    ]),
    may_be_irreversible: true,
};

fn vault_outputs(body: &Value) -> Map<String, Value> {
    outputs([
        ("id", body["id"].clone()),
        ("name", body["name"].clone()),
        ("vault_uri", body["properties"]["vaultUri"].clone()),
        ("created_at", body["systemData"]["createdAt"].clone()),
    ])
}

impl Params {
    fn desired_properties(&self) -> Value {
        let mut properties = json!({
            "tenantId": self.tenant,
            "sku": {"family": "A", "name": self.sku},
            "enableRbacAuthorization": self.enable_rbac_authorization,
            "publicNetworkAccess": self.public_network_access,
            "softDeleteRetentionInDays": self.soft_delete_retention_days,
        });
        if self.purge_protection {
            properties["enablePurgeProtection"] = json!(true);
        }
        properties
    }
}

impl KeyVault {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        let names = ("Microsoft.KeyVault", "vaults", p.name.as_str());
        common::resource_url(&self.0, (&p.subscription, &p.resource_group), names, API).await
    }
}

#[async_trait]
impl StepKind for KeyVault {
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
        if !(7..=90).contains(&p.soft_delete_retention_days) {
            return Err(StepError::permanent(format!(
                "`soft_delete_retention_days` must be 7 to 90, not {}",
                p.soft_delete_retention_days
            )));
        }
        let purge_turning_on =
            p.purge_protection && before["properties"]["enablePurgeProtection"] != true;
        let mut plan = if before.is_null() {
            StepPlan::change(Change::Create {
                summary: format!("create key vault {} in {}", p.name, p.location),
            })
        } else {
            let mut fields = Vec::new();
            common::differences(
                &json!({"properties": p.desired_properties()}),
                before,
                "",
                &mut fields,
            );
            common::tag_changes(p.tags.as_ref(), before, p.replace_tags, &mut fields);
            if fields.is_empty() {
                return Ok(StepPlan::unchanged(vault_outputs(before)));
            }
            StepPlan::change(Change::Update {
                summary: format!("update key vault {}", p.name),
                fields,
            })
        };
        if purge_turning_on {
            plan.irreversible = Some(format!(
                "purge protection on key vault `{}` cannot be turned off once enabled",
                p.name
            ));
        }
        Ok(plan)
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        // A PUT replaces the vault: it carries every property the vault has (the firewall that
        // `azure.keyvault_network` sets, access policies, `enabledForDiskEncryption`, ...)
        // and changes only the ones this step manages; the plan showed exactly those.
        let mut properties = match &before["properties"] {
            Value::Object(observed) => {
                let mut kept = observed.clone();
                kept.retain(|key, value| !READ_ONLY.contains(&key.as_str()) && !value.is_null());
                Value::Object(kept)
            }
            _ => json!({}),
        };
        if let (Value::Object(kept), Value::Object(managed)) =
            (&mut properties, p.desired_properties())
        {
            kept.extend(managed);
        }
        if before.is_null() && properties.get("accessPolicies").is_none() {
            // The spec requires it on create; with RBAC authorization it stays empty.
            properties["accessPolicies"] = json!([]);
        }
        let tags = common::tags_to_put(p.tags.as_ref(), before, p.replace_tags);
        let body = json!({"location": p.location, "tags": tags, "properties": properties});
        let (result, existed) = match common::put_proven(&client, &url, before, &body, false).await
        {
            // Key Vault keeps a deleted vault (and its keys) under its name for the retention
            // period: one this step's runbook made before a rollback comes back with
            // `createMode: recover`, keys and all, and is then given the wanted properties.
            Err(error) if before.is_null() && is_deleted_vault(&error) => {
                tracing::info!(vault = %p.name, "recovering the soft-deleted key vault of the same name");
                let recover = json!({"location": p.location, "properties": {
                    "tenantId": properties["tenantId"],
                    "sku": properties["sku"],
                    "createMode": "recover",
                }});
                common::put(&client, &url, &recover).await?;
                (common::put(&client, &url, &body).await?, None)
            }
            other => other?,
        };
        Ok(common::applied(vault_outputs(&result), existed))
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
                // Deleted, not purged: Key Vault keeps it recoverable, and a later run of the
                // runbook recovers it.
                let what = format!("key vault `{}`", p.name);
                let marker = ("created_at", "/systemData/createdAt");
                common::delete_created(&client, &url, &what, cx.recorded_outputs, marker).await
            }
            Outcome::Updated => {
                if p.purge_protection && before["properties"]["enablePurgeProtection"] != true {
                    return Ok(Undo::Irreversible(format!(
                        "purge protection on key vault `{}` cannot be turned off",
                        p.name
                    )));
                }
                let mut properties = before["properties"].clone();
                if let Some(map) = properties.as_object_mut() {
                    map.remove("provisioningState");
                    map.remove("vaultUri");
                }
                common::put(&client, &url, &json!({"location": before["location"], "tags": before.get("tags").cloned().unwrap_or(json!({})), "properties": properties})).await?;
                Ok(Undo::Done)
            }
            _ => Ok(Undo::NothingToUndo),
        }
    }
}

/// Azure's 409 for a vault name held by a soft-deleted vault.
fn is_deleted_vault(error: &StepError) -> bool {
    let text = error.to_string();
    text.contains("409") && text.contains("already exists in deleted state")
}
