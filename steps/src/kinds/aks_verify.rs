use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::aks::{self, NAME};
use super::common::{self, RESOURCE_GROUP, SUBSCRIPTION, outputs, pattern};
use crate::azure::Azure;

/// Reads a cluster's `securityProfile` and checks it against the expected KMS settings (the
/// seed's "Verify KMS configuration"). Reads only.
pub struct AksVerify(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    expected_mode: String,
    #[serde(default)]
    network_access: Option<String>,
    #[serde(default)]
    key_id: Option<String>,
    #[serde(default)]
    key_vault_id: Option<String>,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.aks_verify",
    summary: "Checks that a cluster's `securityProfile` is what the KMS mode wants: infrastructure encryption `Enabled`; for `CMK`, the key vault KMS enabled with the expected versionless `key_id`, `network_access` and `key_vault_id`; and `provisioningState` `Succeeded`. Fails with every mismatch; never writes.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        NAME,
        ParamSpec::required("expected_mode", ValueType::String, "`PMK` or `CMK`")
            .one_of(&["PMK", "CMK"]),
        ParamSpec::optional(
            "network_access",
            ValueType::String,
            "CMK: `Public` or `Private`",
        )
        .one_of(&["Public", "Private"]),
        ParamSpec::optional(
            "key_id",
            ValueType::String,
            "CMK: the expected versionless key id",
        ),
        ParamSpec::optional(
            "key_vault_id",
            ValueType::String,
            "CMK: the expected vault id",
        )
        .pattern(pattern::RESOURCE_ID),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "security_profile",
            description: "the cluster's `securityProfile`",
        },
        OutputSpec {
            name: "kms_mode",
            description: "`PMK`, `CMK` or `None`",
        },
        OutputSpec {
            name: "provisioning_state",
            description: "the cluster's provisioning state",
        },
    ]),
    may_be_irreversible: false,
};

fn same(a: &str, b: &Value) -> bool {
    b.as_str().is_some_and(|b| a.eq_ignore_ascii_case(b))
}

#[async_trait]
impl StepKind for AksVerify {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let (client, url) =
            aks::cluster_url(&self.0, (&p.subscription, &p.resource_group), &p.name).await?;
        common::read_existing(&client, &url, ("AKS cluster", &p.name, &p.resource_group)).await
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        let state = before["properties"]["provisioningState"]
            .as_str()
            .unwrap_or("Succeeded");
        if matches!(state, "Creating" | "Updating" | "Upgrading") {
            return Err(StepError::transient(format!(
                "cluster `{}` is still {state}",
                p.name
            )));
        }
        let profile = &before["properties"]["securityProfile"];
        let kms = &profile["azureKeyVaultKms"];
        let mut mismatches = Vec::new();
        if state != "Succeeded" {
            mismatches.push(format!(
                "provisioningState is `{state}`, expected `Succeeded`"
            ));
        }
        if profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"]
            != "Enabled"
        {
            mismatches.push(format!(
                "infrastructureEncryption is {}, expected \"Enabled\"",
                profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"]
            ));
        }
        if p.expected_mode == "CMK" {
            if kms["enabled"] != true {
                mismatches.push(format!(
                    "azureKeyVaultKms.enabled is {}, expected true",
                    kms["enabled"]
                ));
            }
            for (field, want) in [
                ("keyId", &p.key_id),
                ("keyVaultNetworkAccess", &p.network_access),
                ("keyVaultResourceId", &p.key_vault_id),
            ] {
                if let Some(want) = want
                    && !same(want, &kms[field])
                {
                    mismatches.push(format!(
                        "azureKeyVaultKms.{field} is {}, expected \"{want}\"",
                        kms[field]
                    ));
                }
            }
            if kms["keyId"]
                .as_str()
                .and_then(|k| k.split_once("/keys/"))
                .is_some_and(|(_, rest)| rest.contains('/'))
            {
                mismatches.push(
                    "azureKeyVaultKms.keyId carries a version; rotation will not be picked up"
                        .into(),
                );
            }
        } else if kms["enabled"] == true {
            mismatches.push(
                "azureKeyVaultKms.enabled is true: the cluster still uses a customer-managed key"
                    .into(),
            );
        }
        if !mismatches.is_empty() {
            return Err(StepError::permanent(format!(
                "cluster `{}` is not {} as expected: {}",
                p.name,
                p.expected_mode,
                mismatches.join("; ")
            )));
        }
        Ok(StepPlan::unchanged(outputs([
            ("security_profile", profile.clone()),
            ("kms_mode", json!(aks::mode_of(before))),
            ("provisioning_state", json!(state)),
        ])))
    }

    async fn apply(
        &self,
        _cx: &StepContext<'_>,
        _before: &Value,
        plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        Ok(plan.outputs.clone().into())
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
