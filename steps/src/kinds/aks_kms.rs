use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Value, json};

use super::aks::{
    self, IDENTITY_ID, KEY_ID, KEY_VAULT_ID, KMS_MODE, Kms, MIGRATE_FROM, NAME, NETWORK_ACCESS,
};
use super::common::{self, RESOURCE_GROUP, SUBSCRIPTION};
use crate::azure::Azure;

/// Changes the KMS configuration of an existing cluster: GET with the preview API version,
/// check Kubernetes >= 1.33, change only `securityProfile` (and `identity` for CMK), PUT with
/// `If-Match`, follow the operation to `Succeeded`.
pub struct AksKms(pub Arc<Azure>);

// No `deny_unknown_fields`: serde does not support it with `flatten`; compile checks keys.
#[derive(Deserialize)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    #[serde(flatten)]
    kms: Kms,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.aks_kms",
    summary: "Switches an existing cluster's KMS data encryption: to `PMK` (enables infrastructure encryption; from CMK, disables the customer-managed key) or to `CMK` (a versionless `key_id` through the user-assigned `identity_id`). Only `securityProfile` (and `identity` for CMK) change; the PUT carries `If-Match`. Enabling infrastructure encryption is the point of no return: `plan` says so first, and rollback puts back everything else but leaves it on.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        NAME,
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

/// Puts back the KMS fields and identity of `before` (infrastructure encryption cannot be
/// turned off, so it stays as it is now).
pub(crate) async fn restore(
    client: &crate::AzureClient,
    url: &url::Url,
    before: &Value,
    name: &str,
) -> Result<Undo, StepError> {
    let current = common::read(client, url).await?;
    if current.is_null() {
        return Ok(Undo::Done);
    }
    // A step that failed before its change took effect has nothing to put back.
    let kms = |c: &Value| c["properties"]["securityProfile"]["azureKeyVaultKms"].clone();
    let same_kms = aks::mode_of(&current) == aks::mode_of(before)
        && kms(&current)["keyId"] == kms(before)["keyId"];
    if same_kms && current["identity"]["type"] == before["identity"]["type"] {
        return Ok(Undo::NothingToUndo);
    }
    let mut body = current.clone();
    let profile = &mut body["properties"]["securityProfile"];
    let previous_kms = before["properties"]["securityProfile"]["azureKeyVaultKms"].clone();
    profile["azureKeyVaultKms"] = if previous_kms.is_null() {
        json!({"enabled": false})
    } else {
        previous_kms
    };
    body["identity"] = before["identity"].clone();
    aks::strip_read_only(&mut body);
    client
        .write_and_wait(reqwest::Method::PUT, url, &body, current["eTag"].as_str())
        .await?;
    if aks::mode_of(before) == "None" {
        return Ok(Undo::Irreversible(format!(
            "{} on cluster `{name}`; everything else was put back",
            aks::NO_DOWNGRADE
        )));
    }
    Ok(Undo::Done)
}

/// PUTs `cluster` changed to `kms`, with `If-Match` on its etag. When the cluster changed in
/// between (412), it is read again and the change made on what is there now, twice at most.
pub(crate) async fn put_kms(
    client: &crate::AzureClient,
    url: &url::Url,
    kms: &Kms,
    cluster: &Value,
) -> Result<Value, StepError> {
    aks::put_cluster(client, url, cluster.clone(), true, |current| {
        kms.apply_to(current)
    })
    .await
}

impl AksKms {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        aks::cluster_url(&self.0, (&p.subscription, &p.resource_group), &p.name).await
    }
}

#[async_trait]
impl StepKind for AksKms {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        let cluster = aks::read_settled(&client, &url).await?;
        if cluster.is_null() {
            // Says what to do, as for any resource that must exist.
            return common::read_existing(
                &client,
                &url,
                ("AKS cluster", &p.name, &p.resource_group),
            )
            .await;
        }
        Ok(cluster)
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        p.kms.check()?;
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
        let result = put_kms(&client, &url, &p.kms, before).await?;
        Ok(aks::cluster_outputs(&result).into())
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
        let (client, url) = self.url(&p).await?;
        restore(&client, &url, before, &p.name).await
    }
}
