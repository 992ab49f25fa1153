use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{
    self, LOCATION, REPLACE_TAGS, RESOURCE_GROUP, SUBSCRIPTION, TAGS, outputs, pattern,
};
use crate::azure::Azure;

const API: &str = "2023-01-31";

/// A user-assigned managed identity.
pub struct Identity(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    resource_group: String,
    name: String,
    location: String,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    replace_tags: bool,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.identity",
    summary: "Ensures a user-assigned managed identity exists. Rollback deletes it only if this run created it.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        ParamSpec::required("name", ValueType::String, "the identity's name")
            .pattern(pattern::IDENTITY),
        LOCATION,
        TAGS,
        REPLACE_TAGS,
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the identity's ARM id (for the cluster's `identity`)",
        },
        OutputSpec {
            name: "principal_id",
            description: "its object id (for role assignments)",
        },
        OutputSpec {
            name: "client_id",
            description: "its client id",
        },
    ]),
    may_be_irreversible: false,
};

fn identity_outputs(body: &Value) -> Map<String, Value> {
    outputs([
        ("id", body["id"].clone()),
        ("principal_id", body["properties"]["principalId"].clone()),
        ("client_id", body["properties"]["clientId"].clone()),
    ])
}

impl Identity {
    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        let names = (
            "Microsoft.ManagedIdentity",
            "userAssignedIdentities",
            p.name.as_str(),
        );
        common::resource_url(&self.0, (&p.subscription, &p.resource_group), names, API).await
    }
}

#[async_trait]
impl StepKind for Identity {
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
        if before.is_null() {
            return Ok(StepPlan::change(Change::Create {
                summary: format!("create managed identity {} in {}", p.name, p.location),
            }));
        }
        let mut fields = Vec::new();
        common::tag_changes(p.tags.as_ref(), before, p.replace_tags, &mut fields);
        if fields.is_empty() {
            return Ok(StepPlan::unchanged(identity_outputs(before)));
        }
        Ok(StepPlan::change(Change::Update {
            summary: format!("update tags of managed identity {}", p.name),
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
        let (client, url) = self.url(&p).await?;
        let tags = common::tags_to_put(p.tags.as_ref(), before, p.replace_tags);
        let body = json!({"location": p.location, "tags": tags});
        let (result, existed) = common::put_proven(&client, &url, before, &body, false).await?;
        Ok(common::applied(identity_outputs(&result), existed))
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let p: Params = cx.params()?;
        let (client, url) = self.url(&p).await?;
        if outcome == Outcome::Created {
            let what = format!("managed identity `{}`", p.name);
            let marker = ("principal_id", "/properties/principalId");
            return common::delete_created(&client, &url, &what, cx.recorded_outputs, marker).await;
        }
        common::undo_create_or_tags(&client, &url, before, outcome).await
    }
}
