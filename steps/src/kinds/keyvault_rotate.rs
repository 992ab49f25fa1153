use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::common::{outputs, pattern};
use crate::azure::Azure;
use crate::client::Service;

/// Rotates a key now (Key Vault's data-plane `rotate`): a new version, which AKS picks up
/// within 6 hours when the cluster uses the versionless key id.
pub struct KeyVaultRotate(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    vault_uri: String,
    name: String,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.keyvault_rotate",
    summary: "Rotates a key (a new version) through Key Vault's data plane; needs Key Vault Crypto Officer and a firewall that lets the caller in. Runs every time it is reached: guard it with `if`. Rollback cannot remove a version: the old one stays usable, so there is nothing to undo.",
    params: &[
        ParamSpec::required("vault_uri", ValueType::String, "the vault's data-plane URI"),
        ParamSpec::required("name", ValueType::String, "the key's name").pattern(pattern::KEY),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "kid",
            description: "the new version's key id",
        },
        OutputSpec {
            name: "rotated_at",
            description: "when (RFC 3339, UTC)",
        },
    ]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for KeyVaultRotate {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    /// The key's current version: what a rotation replaces, and how the next attempt tells
    /// whether this one took effect.
    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name], "7.5")?;
        let Some(response) = client.get_in_vault(&url).await? else {
            return Err(StepError::permanent(format!(
                "key `{}` does not exist in {}: create it first (azure.keyvault_key)",
                p.name, p.vault_uri
            )));
        };
        Ok(json!({
            "kid": response.body["key"]["kid"],
            "created": response.body["attributes"]["created"],
        }))
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        // An earlier attempt recorded the version it set out to replace; a newer one now means
        // that rotation happened (its answer was lost), so rotating again would mint another.
        if let Some(earlier) = cx.earlier_before
            && earlier["kid"].is_string()
            && before["kid"].is_string()
            && earlier["kid"] != before["kid"]
        {
            let rotated_at = before["created"]
                .as_i64()
                .and_then(|s| chrono::DateTime::from_timestamp(s, 0))
                .map_or(Value::Null, |at| json!(at.to_rfc3339()));
            return Ok(StepPlan::unchanged(outputs([
                ("kid", before["kid"].clone()),
                ("rotated_at", rotated_at),
            ])));
        }
        Ok(StepPlan::change(Change::Action {
            summary: format!("rotate key {} in {}", p.name, p.vault_uri),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "rotate"], "7.5")?;
        let response = client
            .send(Method::POST, &url, Service::KeyVault, None, None)
            .await?;
        Ok(outputs([
            ("kid", response.body["key"]["kid"].clone()),
            ("rotated_at", json!(chrono::Utc::now().to_rfc3339())),
        ])
        .into())
    }

    async fn rollback(
        &self,
        _cx: &StepContext<'_>,
        _before: &Value,
        _outcome: Outcome,
    ) -> Result<Undo, StepError> {
        Ok(Undo::NothingToUndo)
    }
}
