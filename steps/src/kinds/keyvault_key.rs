use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{self, outputs, pattern};
use crate::AzureError;
use crate::azure::Azure;
use crate::client::Service;

const API: &str = "7.5";
const MANAGEMENT_API: &str = "2025-05-01";

/// A Key Vault key (data plane). `create` mints a new version every call, so the key is read
/// first and created only when absent: a retry after a crash never makes a second version.
pub struct KeyVaultKey(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vault_uri: String,
    #[serde(default)]
    vault_id: Option<String>,
    name: String,
    #[serde(default = "rsa")]
    kty: String,
    #[serde(default = "bits")]
    key_size: i64,
    #[serde(default)]
    key_ops: Option<Vec<String>>,
}

fn rsa() -> String {
    "RSA".into()
}
fn bits() -> i64 {
    2048
}

static SPEC: KindSpec = KindSpec {
    name: "azure.keyvault_key",
    summary: "Ensures a key exists in a vault (read first; created only when absent, since each create adds a version). Needs Key Vault Crypto Officer on the vault and a vault firewall that lets the caller in. Rollback deletes a key this run created (Key Vault keeps it soft-deleted); a later run recovers a soft-deleted key of the same name instead of failing on the held name.",
    params: &[
        ParamSpec::required(
            "vault_uri",
            ValueType::String,
            "the vault's data-plane URI: the `vault_uri` output of an `azure.keyvault` step",
        ),
        ParamSpec::optional(
            "vault_id",
            ValueType::String,
            "the vault's ARM id: when given, the key is read through Resource Manager, which the vault's firewall does not block (so a second run of a private-vault runbook still sees the key)",
        )
        .pattern(pattern::RESOURCE_ID),
        ParamSpec::required("name", ValueType::String, "the key's name").pattern(pattern::KEY),
        ParamSpec::optional("kty", ValueType::String, "key type (default `RSA`)")
            .one_of(&["RSA", "RSA-HSM", "EC", "EC-HSM"]),
        ParamSpec::optional("key_size", ValueType::Int, "RSA key size (default 2048)"),
        ParamSpec::optional(
            "key_ops",
            ValueType::List,
            "permitted operations (default: all)",
        ),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "kid",
            description: "the key's id with its current version",
        },
        OutputSpec {
            name: "key_id",
            description: "the versionless key id (what AKS wants)",
        },
        OutputSpec {
            name: "version",
            description: "the current version",
        },
        OutputSpec {
            name: "name",
            description: "the key's name",
        },
    ]),
    may_be_irreversible: false,
};

/// Outputs from a data-plane key bundle or a management-plane key resource. Resource Manager
/// writes key URIs with `:443`; AKS and the data plane use them without.
fn key_outputs(key: &Value) -> Map<String, Value> {
    let kid = key["key"]["kid"]
        .as_str()
        .or_else(|| key["properties"]["keyUriWithVersion"].as_str())
        .unwrap_or_default()
        .replacen(":443/", "/", 1);
    let kid = kid.as_str();
    let (versionless, version) = kid.rsplit_once('/').unwrap_or((kid, ""));
    let name = versionless.rsplit('/').next().unwrap_or_default();
    outputs([
        ("kid", json!(kid)),
        ("key_id", json!(versionless)),
        ("version", json!(version)),
        ("name", json!(name)),
    ])
}

#[async_trait]
impl StepKind for KeyVaultKey {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        if let Some(vault_id) = &p.vault_id {
            let mut segments = common::id_segments(vault_id)?;
            segments.extend(["keys", p.name.as_str()]);
            let url = client.arm_url(&segments, MANAGEMENT_API)?;
            return common::read(&client, &url).await;
        }
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name], API)?;
        match client
            .send(Method::GET, &url, Service::KeyVault, None, None)
            .await
        {
            Ok(response) => Ok(response.body),
            Err(AzureError::Api { status: 404, .. }) => Ok(Value::Null),
            Err(error) => Err(error.into()),
        }
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        if before.is_null() {
            return Ok(StepPlan::change(Change::Create {
                summary: format!("create {} key {} in {}", p.kty, p.name, p.vault_uri),
            }));
        }
        Ok(StepPlan::unchanged(key_outputs(before)))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Map<String, Value>, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "create"], API)?;
        let mut body = json!({"kty": p.kty, "attributes": {"enabled": true}});
        if p.kty.starts_with("RSA") {
            body["key_size"] = json!(p.key_size);
        }
        if let Some(ops) = &p.key_ops {
            body["key_ops"] = json!(ops);
        }
        match client
            .send(Method::POST, &url, Service::KeyVault, Some(&body), None)
            .await
        {
            Ok(response) => Ok(key_outputs(&response.body)),
            // Key Vault soft-deletes keys: after a rollback, the name is held by the key this
            // runbook made before, deleted but recoverable. Bring that key back (Key Vault
            // allows nothing else but a purge, which would destroy it for good).
            Err(AzureError::Api {
                status: 409, code, ..
            }) if code == "ObjectIsDeletedButRecoverable" => {
                tracing::info!(key = %p.name, "the key is soft-deleted; recovering it");
                let recover =
                    client.vault_url(&p.vault_uri, &["deletedkeys", &p.name, "recover"], API)?;
                let response = client
                    .send(Method::POST, &recover, Service::KeyVault, None, None)
                    .await?;
                Ok(key_outputs(&response.body))
            }
            Err(error) => Err(error.into()),
        }
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        if outcome != Outcome::Created {
            return Ok(Undo::NothingToUndo);
        }
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name], API)?;
        match client
            .send(Method::DELETE, &url, Service::KeyVault, None, None)
            .await
        {
            Ok(_) | Err(AzureError::Api { status: 404, .. }) => Ok(Undo::Done),
            Err(error) => Err(error.into()),
        }
    }
}
