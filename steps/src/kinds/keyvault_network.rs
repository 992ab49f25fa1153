use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{self, RESOURCE_GROUP, SUBSCRIPTION, outputs, pattern};
use super::keyvault::API;
use crate::azure::Azure;

/// The firewall step of the private-vault flow: `defaultAction` and `bypass`, keeping the
/// vault's existing IP and virtual-network rules.
pub struct KeyVaultNetwork(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    #[serde(default = "deny")]
    default_action: String,
    #[serde(default = "azure_services")]
    bypass: String,
}

fn deny() -> String {
    "Deny".into()
}
fn azure_services() -> String {
    "AzureServices".into()
}

static SPEC: KindSpec = KindSpec {
    name: "azure.keyvault_network",
    summary: "Sets a vault's firewall: `default_action` (default `Deny`) and `bypass` (default `AzureServices`, so AKS reaches the vault as a trusted service), keeping its IP and virtual-network rules. After `Deny`, data-plane calls from outside fail with `ForbiddenByFirewall`: create keys before this step. Rollback restores the previous rules.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        ParamSpec::required("name", ValueType::String, "the vault's name").pattern(pattern::VAULT),
        ParamSpec::optional(
            "default_action",
            ValueType::String,
            "`Deny` (default) or `Allow`",
        )
        .one_of(&["Deny", "Allow"]),
        ParamSpec::optional(
            "bypass",
            ValueType::String,
            "`AzureServices` (default) or `None`",
        )
        .one_of(&["AzureServices", "None"]),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the vault's ARM id",
        },
        OutputSpec {
            name: "default_action",
            description: "the firewall's default action",
        },
        OutputSpec {
            name: "bypass",
            description: "the trusted-services bypass",
        },
    ]),
    may_be_irreversible: false,
};

fn acl_outputs(body: &Value) -> Map<String, Value> {
    let acls = &body["properties"]["networkAcls"];
    outputs([
        ("id", body["id"].clone()),
        ("default_action", acls["defaultAction"].clone()),
        ("bypass", acls["bypass"].clone()),
    ])
}

impl KeyVaultNetwork {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        let names = ("Microsoft.KeyVault", "vaults", p.name.as_str());
        common::resource_url(&self.0, (&p.subscription, &p.resource_group), names, API).await
    }

    async fn patch_acls(&self, p: &Params, acls: Value) -> Result<Value, StepError> {
        let (client, url) = self.url(p).await?;
        Ok(client
            .write_and_wait(
                Method::PATCH,
                &url,
                &json!({"properties": {"networkAcls": acls}}),
                None,
            )
            .await?)
    }
}

#[async_trait]
impl StepKind for KeyVaultNetwork {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        common::read_existing(&client, &url, ("key vault", &p.name, &p.resource_group)).await
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        let mut fields = Vec::new();
        common::differences(
            &json!({"properties": {"networkAcls": {"defaultAction": p.default_action, "bypass": p.bypass}}}),
            before,
            "",
            &mut fields,
        );
        if fields.is_empty() {
            return Ok(StepPlan::unchanged(acl_outputs(before)));
        }
        Ok(StepPlan::change(Change::Update {
            summary: format!(
                "set the firewall of key vault {} to {} (bypass {})",
                p.name, p.default_action, p.bypass
            ),
            fields,
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let existing = &before["properties"]["networkAcls"];
        let acls = json!({
            "defaultAction": p.default_action,
            "bypass": p.bypass,
            "ipRules": existing.get("ipRules").cloned().unwrap_or(json!([])),
            "virtualNetworkRules": existing.get("virtualNetworkRules").cloned().unwrap_or(json!([])),
        });
        let result = self.patch_acls(&p, acls).await?;
        Ok(acl_outputs(&result).into())
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        if outcome != Outcome::Updated {
            return Ok(Undo::NothingToUndo);
        }
        let p: Params = cx.params()?;
        self.patch_acls(&p, before["properties"]["networkAcls"].clone())
            .await?;
        Ok(Undo::Done)
    }
}
