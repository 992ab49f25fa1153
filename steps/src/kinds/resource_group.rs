use std::sync::Arc;

use async_trait::async_trait;
use kmsflow_engine::kind::*;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{self, LOCATION, REPLACE_TAGS, RESOURCE_GROUP, SUBSCRIPTION, TAGS, outputs};
use crate::azure::Azure;

const API: &str = "2025-04-01";

/// A resource group (`PUT /subscriptions/{s}/resourcegroups/{rg}`).
pub struct ResourceGroup(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    resource_group: String,
    location: String,
    #[serde(default)]
    tags: Option<Map<String, Value>>,
    #[serde(default)]
    replace_tags: bool,
}

static SPEC: KindSpec = KindSpec {
    name: "azure.resource_group",
    summary: "Ensures a resource group exists in `location` (with `tags`, if given). Rollback deletes it only if this run created it.",
    params: &[SUBSCRIPTION, RESOURCE_GROUP, LOCATION, TAGS, REPLACE_TAGS],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the resource group's ARM id",
        },
        OutputSpec {
            name: "name",
            description: "its name",
        },
        OutputSpec {
            name: "location",
            description: "its region",
        },
    ]),
    may_be_irreversible: false,
};

impl ResourceGroup {
    /// The names of the resources in the group (Resources - List By Resource Group), every
    /// page of them.
    async fn resources_inside(
        &self,
        client: &crate::AzureClient,
        p: &Params,
    ) -> Result<Vec<String>, StepError> {
        let url = client.arm_url(
            &[
                "subscriptions",
                &p.subscription,
                "resourcegroups",
                &p.resource_group,
                "resources",
            ],
            API,
        )?;
        // A group that is gone already (Azure said so) holds nothing either.
        Ok(common::read_list(client, &url)
            .await?
            .iter()
            .map(|resource| {
                let name = resource["name"].as_str().unwrap_or_default();
                let kind = resource["type"].as_str().unwrap_or_default();
                format!("{name} ({kind})")
            })
            .collect())
    }

    async fn url(&self, p: &Params) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
        let client = self.0.client().await?;
        let url = client.arm_url(
            &[
                "subscriptions",
                &p.subscription,
                "resourcegroups",
                &p.resource_group,
            ],
            API,
        )?;
        Ok((client, url))
    }
}

fn group_outputs(body: &Value) -> Map<String, Value> {
    outputs([
        ("id", body["id"].clone()),
        ("name", body["name"].clone()),
        ("location", body["location"].clone()),
    ])
}

#[async_trait]
impl StepKind for ResourceGroup {
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
                summary: format!(
                    "create resource group {} in {}",
                    p.resource_group, p.location
                ),
            }));
        }
        if !before["location"]
            .as_str()
            .unwrap_or_default()
            .eq_ignore_ascii_case(&p.location)
        {
            return Err(StepError::permanent(format!(
                "resource group `{}` already exists in `{}`, not `{}`; a resource group cannot move: use its location or another name",
                p.resource_group,
                before["location"].as_str().unwrap_or_default(),
                p.location
            )));
        }
        let mut fields = Vec::new();
        common::tag_changes(p.tags.as_ref(), before, p.replace_tags, &mut fields);
        if fields.is_empty() {
            return Ok(StepPlan::unchanged(group_outputs(before)));
        }
        Ok(StepPlan::change(Change::Update {
            summary: format!("update tags of resource group {}", p.resource_group),
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
        let body = json!({
            "location": p.location,
            "tags": common::tags_to_put(p.tags.as_ref(), before, p.replace_tags),
        });
        let (result, existed) = common::put_proven(&client, &url, before, &body, false).await?;
        Ok(common::applied(group_outputs(&result), existed))
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
            // Deleting a group deletes everything in it. Rollback has already removed what this
            // run made inside it (newest first); whatever is left someone else put there.
            let others = self.resources_inside(&client, &p).await?;
            if !others.is_empty() {
                return Ok(Undo::Irreversible(format!(
                    "resource group `{}` holds {} this run did not create ({}); left in place with them",
                    p.resource_group,
                    if others.len() == 1 {
                        "a resource".to_owned()
                    } else {
                        format!("{} resources", others.len())
                    },
                    others.join(", ")
                )));
            }
        }
        common::undo_create_or_tags(&client, &url, before, outcome).await
    }
}
