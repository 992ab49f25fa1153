//! Generic ARM kinds, so runbooks can reach beyond KMS (as SSM Automation's executeAwsApi,
//! waitForAwsResourceProperty and assertAwsResourceProperty do): `azure.resource`,
//! `azure.action`, `azure.wait`, `azure.assert`.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kmsflow_engine::duration::HumanDuration;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::{self, outputs, pattern};
use crate::azure::Azure;
use crate::client::Service;

const ID: ParamSpec = ParamSpec::required("id", ValueType::String, "the resource's ARM id")
    .pattern(pattern::RESOURCE_ID);
const API_VERSION: ParamSpec = ParamSpec::required(
    "api_version",
    ValueType::String,
    "the API version to call, e.g. `2025-04-01`",
)
.pattern(r"\d{4}-\d{2}-\d{2}(-preview)?|\d+\.\d+");
const POINTER: ParamSpec = ParamSpec::required(
    "pointer",
    ValueType::String,
    "a JSON pointer into the resource, e.g. `/properties/provisioningState`",
)
.pattern(r"(/[^/]*)*");

async fn url(
    azure: &Azure,
    id: &str,
    extra: Option<&str>,
    api_version: &str,
) -> Result<(Arc<crate::AzureClient>, url::Url), StepError> {
    let client = azure.client().await?;
    let mut segments = common::id_segments(id)?;
    if let Some(extra) = extra {
        segments.push(extra);
    }
    let url = client.arm_url(&segments, api_version)?;
    Ok((client, url))
}

/// A resource with a desired body: PUT only when it differs from what is there.
pub struct Resource(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ResourceParams {
    id: String,
    api_version: String,
    body: Map<String, Value>,
}

static RESOURCE: KindSpec = KindSpec {
    name: "azure.resource",
    summary: "Ensures an ARM resource matches `body` (compared field by field; fields Azure adds are ignored): created when absent, PUT when different, untouched otherwise. Rollback deletes what it created, or PUTs back what was there.",
    params: &[
        ID,
        API_VERSION,
        ParamSpec::required(
            "body",
            ValueType::Map,
            "the resource's desired body (`location`, `properties`, ...)",
        ),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "id",
            description: "the resource's ARM id",
        },
        OutputSpec {
            name: "resource",
            description: "the resource as Azure returns it",
        },
        OutputSpec {
            name: "instance",
            description: "what tells this instance from one made again under the same name (`{pointer: value}`: its `systemData.createdAt`, principal id, resource UID or GUID; empty if it shows none); rollback deletes only a resource this run created that still shows it",
        },
    ]),
    may_be_irreversible: false,
};

/// Where a resource shows what tells one instance from another made under the same name,
/// most telling first: ARM's creation time, then ids a provider mints per instance.
const INSTANCE_MARKERS: &[&str] = &[
    "/systemData/createdAt",
    "/properties/principalId",
    "/identity/principalId",
    "/properties/resourceUID",
    "/properties/resourceGuid",
    "/properties/uniqueId",
    "/properties/createdOn",
];

/// The first instance marker `resource` shows, as `{pointer: value}`; `null` if none.
fn instance_of(resource: &Value) -> Value {
    INSTANCE_MARKERS
        .iter()
        .find_map(|pointer| {
            resource
                .pointer(pointer)
                .filter(|v| v.as_str().is_some_and(|s| !s.is_empty()))
                .map(|v| json!({ *pointer: v }))
        })
        .unwrap_or(Value::Null)
}

fn resource_outputs(resource: &Value) -> Map<String, Value> {
    outputs([
        ("id", resource["id"].clone()),
        ("resource", resource.clone()),
        ("instance", instance_of(resource)),
    ])
}

#[async_trait]
impl StepKind for Resource {
    fn spec(&self) -> &'static KindSpec {
        &RESOURCE
    }

    fn sensitive_outputs(&self) -> &'static [&'static str] {
        &["resource"]
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: ResourceParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, None, &p.api_version).await?;
        common::read(&client, &url).await
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: ResourceParams = cx.params()?;
        if before.is_null() {
            return Ok(StepPlan::change(Change::Create {
                summary: format!("create {}", p.id),
            }));
        }
        let mut fields = Vec::new();
        common::differences(&Value::Object(p.body), before, "", &mut fields);
        if fields.is_empty() {
            return Ok(StepPlan::unchanged(resource_outputs(before)));
        }
        Ok(StepPlan::change(Change::Update {
            summary: format!("update {}", p.id),
            fields,
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: ResourceParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, None, &p.api_version).await?;
        let (result, existed) =
            common::put_proven(&client, &url, before, &Value::Object(p.body), false).await?;
        Ok(common::applied(resource_outputs(&result), existed))
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let p: ResourceParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, None, &p.api_version).await?;
        match outcome {
            Outcome::Created => {
                let what = format!("`{}`", p.id);
                // The marker recorded at creation, as `delete_created` reads one.
                let recorded = cx
                    .recorded_outputs
                    .and_then(|o| o["instance"].as_object())
                    .and_then(|m| m.iter().next())
                    .filter(|(pointer, _)| INSTANCE_MARKERS.contains(&pointer.as_str()));
                let (pointer, marker) = match recorded {
                    Some((pointer, value)) => (pointer.as_str(), json!({ "instance": value })),
                    None => (INSTANCE_MARKERS[0], json!({})),
                };
                common::delete_created(&client, &url, &what, Some(&marker), ("instance", pointer))
                    .await
            }
            Outcome::Updated => {
                // Only a resource as Azure showed it can be put back; anything else stored as
                // the before image (a damaged store, an answer that proved nothing in an older
                // version) is reported, never sent.
                let Value::Object(mut body) = before.clone() else {
                    return Ok(Undo::Irreversible(format!(
                        "`{}`: the image kept of it before this run's change is not a resource, so it cannot be put back; left as it is",
                        p.id
                    )));
                };
                if let Some(Value::Object(properties)) = body.get_mut("properties") {
                    properties.remove("provisioningState");
                }
                common::put(&client, &url, &Value::Object(body))
                    .await
                    .map(|_| Undo::Done)
            }
            _ => Ok(Undo::NothingToUndo),
        }
    }
}

/// A POST action on a resource.
pub struct Action(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionParams {
    id: String,
    action: String,
    api_version: String,
    #[serde(default)]
    body: Option<Map<String, Value>>,
    #[serde(default)]
    undo_action: Option<String>,
    #[serde(default)]
    repeatable: bool,
}

static ACTION: KindSpec = KindSpec {
    name: "azure.action",
    summary: "POSTs `action` on a resource (e.g. `register`, `rotate`, `abort`) and follows the operation. It runs on every run: use `azure.wait`/`azure.assert` or `if` to make it conditional. Rollback POSTs `undo_action` when given, and otherwise leaves things as they are.",
    params: &[
        ID,
        ParamSpec::required(
            "action",
            ValueType::String,
            "the action's name, the last URL segment",
        )
        .pattern("[A-Za-z][A-Za-z0-9]{0,63}"),
        API_VERSION,
        ParamSpec::optional(
            "body",
            ValueType::Map,
            "the request body, if the action takes one",
        ),
        ParamSpec::optional(
            "undo_action",
            ValueType::String,
            "an action that undoes this one, for rollback",
        )
        .pattern("[A-Za-z][A-Za-z0-9]{0,63}"),
        ParamSpec::optional(
            "repeatable",
            ValueType::Bool,
            "the action is safe to POST again when an earlier attempt's answer was lost (default false: kmsflow then stops and asks you to check)",
        ),
    ],
    outputs: OutputsSpec::Fixed(&[OutputSpec {
        name: "response",
        description: "the action's response body",
    }]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Action {
    fn spec(&self) -> &'static KindSpec {
        &ACTION
    }

    fn sensitive_outputs(&self) -> &'static [&'static str] {
        &["response"]
    }

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let p: ActionParams = cx.params()?;
        // An earlier attempt sent the POST and never learnt how it ended; an action leaves no
        // trace kmsflow can read in general, so it will not guess.
        if cx.earlier_before.is_some() && !p.repeatable {
            return Err(StepError::permanent(format!(
                "an earlier attempt sent POST {} on {} and its answer was lost, so it may have taken effect; \
                 check the resource, then either set `repeatable: true` on this step (if the action is safe to repeat) \
                 and resume with `--allow-changed-runbook`, or roll the run back",
                p.action, p.id
            )));
        }
        Ok(StepPlan::change(Change::Action {
            summary: format!("POST {} on {}", p.action, p.id),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: ActionParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, Some(&p.action), &p.api_version).await?;
        let body = p.body.map(Value::Object);
        let response = client
            .send(
                Method::POST,
                &url,
                Service::ResourceManager,
                body.as_ref(),
                None,
            )
            .await?;
        let status_url = url.clone();
        let result = if response.async_operation.is_some() || response.status == 202 {
            client.follow(response, &status_url).await?
        } else {
            response.body
        };
        Ok(outputs([("response", result)]).into())
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let p: ActionParams = cx.params()?;
        let Some(undo) = &p.undo_action else {
            return Ok(Undo::NothingToUndo);
        };
        let (client, url) = url(&self.0, &p.id, Some(undo), &p.api_version).await?;
        client
            .send(Method::POST, &url, Service::ResourceManager, None, None)
            .await?;
        Ok(Undo::Done)
    }
}

/// Polls a resource until a JSON pointer has one of the wanted values.
pub struct Wait(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WaitParams {
    id: String,
    api_version: String,
    pointer: String,
    values: Vec<Value>,
    #[serde(default = "ten_seconds")]
    poll_interval: HumanDuration,
    #[serde(default = "thirty_minutes")]
    max_wait: HumanDuration,
}

fn thirty_minutes() -> HumanDuration {
    HumanDuration(Duration::from_secs(1800))
}

fn ten_seconds() -> HumanDuration {
    HumanDuration(Duration::from_secs(10))
}

static WAIT: KindSpec = KindSpec {
    name: "azure.wait",
    summary: "Reads a resource every `poll_interval` until the value at `pointer` is one of `values` (strings compare case-insensitively); a missing resource counts as not yet. Fails after `max_wait` (default 30m) with the value it last saw. Reads only.",
    params: &[
        ID,
        API_VERSION,
        POINTER,
        ParamSpec::required("values", ValueType::List, "the values to wait for"),
        ParamSpec::optional(
            "poll_interval",
            ValueType::Duration,
            "how often to read (default 10s)",
        ),
        common::MAX_WAIT,
    ],
    outputs: OutputsSpec::Fixed(&[OutputSpec {
        name: "value",
        description: "the value found",
    }]),
    may_be_irreversible: false,
};

fn matches_any(found: &Value, wanted: &[Value]) -> bool {
    wanted.iter().any(|w| match (w, found) {
        (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
        (a, b) => a == b,
    })
}

#[async_trait]
impl StepKind for Wait {
    fn spec(&self) -> &'static KindSpec {
        &WAIT
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: WaitParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, None, &p.api_version).await?;
        let resource = common::read(&client, &url).await?;
        Ok(resource.pointer(&p.pointer).cloned().unwrap_or(Value::Null))
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: WaitParams = cx.params()?;
        if matches_any(before, &p.values) {
            return Ok(StepPlan::unchanged(outputs([("value", before.clone())])));
        }
        Ok(StepPlan::change(Change::Action {
            summary: format!(
                "wait until {}{} is one of {} (now {before})",
                p.id,
                p.pointer,
                Value::from(p.values.clone())
            ),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: WaitParams = cx.params()?;
        let deadline = common::Deadline::new(p.max_wait.0);
        let what = format!("{}{}", p.id, p.pointer);
        loop {
            kmsflow_engine::progress::report_waiting(format!("`{what}` to match"));
            tokio::time::sleep(p.poll_interval.0).await;
            let found = self.observe(cx).await?;
            if matches_any(&found, &p.values) {
                return Ok(outputs([("value", found)]).into());
            }
            let shown = match &found {
                Value::String(s) => s.clone(),
                other => other.to_string(),
            };
            deadline.check(&what, &shown)?;
        }
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

/// Fails unless a resource's value at a JSON pointer is one of the expected values.
pub struct Assert(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AssertParams {
    id: String,
    api_version: String,
    pointer: String,
    values: Vec<Value>,
    #[serde(default)]
    message: Option<String>,
}

static ASSERT: KindSpec = KindSpec {
    name: "azure.assert",
    summary: "Fails unless the value at `pointer` in a resource is one of `values` (strings compare case-insensitively), saying what was found. Reads only.",
    params: &[
        ID,
        API_VERSION,
        POINTER,
        ParamSpec::required("values", ValueType::List, "the accepted values"),
        ParamSpec::optional("message", ValueType::String, "what the failure means"),
    ],
    outputs: OutputsSpec::Fixed(&[OutputSpec {
        name: "value",
        description: "the value found",
    }]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Assert {
    fn spec(&self) -> &'static KindSpec {
        &ASSERT
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: AssertParams = cx.params()?;
        let (client, url) = url(&self.0, &p.id, None, &p.api_version).await?;
        let resource = common::read(&client, &url).await?;
        if resource.is_null() {
            return Err(StepError::permanent(format!("`{}` does not exist", p.id)));
        }
        Ok(json!({"value": resource.pointer(&p.pointer).cloned().unwrap_or(Value::Null)}))
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: AssertParams = cx.params()?;
        let found = &before["value"];
        if matches_any(found, &p.values) {
            return Ok(StepPlan::unchanged(outputs([("value", found.clone())])));
        }
        Err(StepError::permanent(format!(
            "{}: {}{} is {found}, expected one of {}",
            p.message.as_deref().unwrap_or("assertion failed"),
            p.id,
            p.pointer,
            Value::from(p.values.clone())
        )))
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
