use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{outputs, pattern};
use crate::azure::Azure;
use crate::client::VAULT_SCOPE;

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

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        Ok(StepPlan::change(Change::Action {
            summary: format!("rotate key {} in {}", p.name, p.vault_uri),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Map<String, Value>, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "rotate"], "7.5")?;
        let response = client
            .send(Method::POST, &url, VAULT_SCOPE, None, None)
            .await?;
        Ok(outputs([
            ("kid", response.body["key"]["kid"].clone()),
            ("rotated_at", json!(chrono::Utc::now().to_rfc3339())),
        ]))
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
