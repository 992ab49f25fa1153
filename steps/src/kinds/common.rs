//! Helpers the Azure step kinds share: naming rules, resource paths, and field comparison.

use kmsflow_engine::kind::{FieldChange, ParamSpec, StepError, ValueType};
use serde_json::{Map, Value};

/// Azure's naming rules, as parameter patterns (checked when a step's input is bound, so a
/// value can never carry `/`, `?`, `#` or `..` into a URL).
pub mod pattern {
    pub const SUBSCRIPTION: &str =
        "[0-9a-fA-F]{8}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{4}-[0-9a-fA-F]{12}";
    pub const RESOURCE_GROUP: &str = r"[-A-Za-z0-9._()]{0,89}[-A-Za-z0-9_()]";
    pub const LOCATION: &str = "[a-z0-9]{1,40}";
    pub const VAULT: &str = "[a-zA-Z][a-zA-Z0-9-]{1,22}[a-zA-Z0-9]";
    pub const KEY: &str = "[0-9a-zA-Z-]{1,127}";
    pub const IDENTITY: &str = "[a-zA-Z0-9][a-zA-Z0-9_-]{2,127}";
    pub const CLUSTER: &str = "[a-zA-Z0-9]|[a-zA-Z0-9][-_a-zA-Z0-9]{0,61}[a-zA-Z0-9]";
    pub const GUID: &str = SUBSCRIPTION;
    /// An ARM resource id: `/subscriptions/...`, segments of safe characters only.
    /// An ISO 8601 duration in years, months and days, as Key Vault's rotation policies
    /// take them (`P90D`, `P2Y`, `P1Y6M`).
    pub const ISO_DAYS: &str = r"P(?:[0-9]+Y)?(?:[0-9]+M)?(?:[0-9]+D)?";
    pub const RESOURCE_ID: &str = r"(/[A-Za-z0-9._()\-]+)+";
}

pub const SUBSCRIPTION: ParamSpec =
    ParamSpec::required("subscription", ValueType::String, "the subscription id")
        .pattern(pattern::SUBSCRIPTION);
pub const RESOURCE_GROUP: ParamSpec =
    ParamSpec::required("resource_group", ValueType::String, "the resource group")
        .pattern(pattern::RESOURCE_GROUP);
pub const LOCATION: ParamSpec = ParamSpec::required(
    "location",
    ValueType::String,
    "the Azure region, e.g. `eastus`",
)
.pattern(pattern::LOCATION);
pub const TAGS: ParamSpec = ParamSpec::optional(
    "tags",
    ValueType::Map,
    "tags to set on the resource, merged into the ones it has (see `replace_tags`)",
);
pub const MAX_WAIT: ParamSpec = ParamSpec::optional(
    "max_wait",
    ValueType::Duration,
    "the longest this step waits before it fails with what it last saw (default: the kind's)",
);

/// A ceiling on a wait: every wait ends, with what it last saw.
pub struct Deadline {
    started: std::time::Instant,
    limit: std::time::Duration,
}

impl Deadline {
    pub fn new(limit: std::time::Duration) -> Deadline {
        Deadline {
            started: std::time::Instant::now(),
            limit,
        }
    }

    /// Fails once the limit has passed: "`what` is still `state` after 30m".
    pub fn check(&self, what: &str, state: &str) -> Result<(), StepError> {
        if self.started.elapsed() < self.limit {
            return Ok(());
        }
        Err(StepError::permanent(format!(
            "{what} is still `{state}` after {}; raise `max_wait` if that is expected, or look at why it does not move",
            kmsflow_engine::duration::format_duration(self.limit)
        )))
    }
}

pub const REPLACE_TAGS: ParamSpec = ParamSpec::optional(
    "replace_tags",
    ValueType::Bool,
    "make `tags` the resource's only tags, removing others (default false: merge)",
);

/// The tags a PUT of an existing resource sends: its own, with `wanted` merged in, or only
/// `wanted` when replacing. A PUT replaces the whole resource, so tags left out are removed.
pub fn tags_to_put(wanted: Option<&Map<String, Value>>, before: &Value, replace: bool) -> Value {
    let mut tags = match (&before["tags"], replace) {
        (Value::Object(existing), false) => existing.clone(),
        _ => Map::new(),
    };
    if let Some(wanted) = wanted {
        tags.extend(wanted.iter().map(|(k, v)| (k.clone(), v.clone())));
    } else if replace {
        return Value::Object(Map::new());
    }
    Value::Object(tags)
}

/// The tag changes that [`tags_to_put`] makes, as the plan shows them: every tag added or
/// changed, and every tag removed when replacing.
pub fn tag_changes(
    wanted: Option<&Map<String, Value>>,
    before: &Value,
    replace: bool,
    out: &mut Vec<FieldChange>,
) {
    if wanted.is_none() && !replace {
        return;
    }
    let put = tags_to_put(wanted, before, replace);
    let empty = Map::new();
    let had = before["tags"].as_object().unwrap_or(&empty);
    let will = put.as_object().unwrap_or(&empty);
    for (key, value) in will {
        if had.get(key) != Some(value) {
            out.push(FieldChange {
                path: format!("tags.{key}"),
                from: had.get(key).cloned().unwrap_or(Value::Null),
                to: value.clone(),
            });
        }
    }
    for (key, value) in had {
        if !will.contains_key(key) {
            out.push(FieldChange {
                path: format!("tags.{key}"),
                from: value.clone(),
                to: Value::Null,
            });
        }
    }
}

/// Path segments of a resource in a resource group.
pub fn resource_path<'a>(
    subscription: &'a str,
    resource_group: &'a str,
    namespace: &'a str,
    kind: &'a str,
    name: &'a str,
) -> Vec<&'a str> {
    vec![
        "subscriptions",
        subscription,
        "resourceGroups",
        resource_group,
        "providers",
        namespace,
        kind,
        name,
    ]
}

/// Splits an ARM id into segments, refusing anything that could change the URL.
pub fn id_segments(id: &str) -> Result<Vec<&str>, StepError> {
    let valid = id.starts_with("/subscriptions/")
        && id[1..].split('/').all(|s| {
            !s.is_empty()
                && s != "."
                && s != ".."
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || "._()-".contains(c))
        });
    if !valid {
        return Err(StepError::permanent(format!(
            "`{id}` is not an ARM resource id (`/subscriptions/...`)"
        )));
    }
    Ok(id[1..].split('/').collect())
}

/// The fields of `desired` whose values differ in `observed` (objects compared key by key, so
/// fields Azure adds are not differences; ids and strings compared case-insensitively where
/// ARM is case-insensitive).
pub fn differences(desired: &Value, observed: &Value, path: &str, out: &mut Vec<FieldChange>) {
    match (desired, observed) {
        (Value::Object(want), Value::Object(have)) => {
            for (key, value) in want {
                let child = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                differences(value, have.get(key).unwrap_or(&Value::Null), &child, out);
            }
        }
        (Value::String(a), Value::String(b)) if a.eq_ignore_ascii_case(b) => {}
        (a, b) if a == b => {}
        (Value::Null, _) => {}
        (a, b) => out.push(FieldChange {
            path: path.to_owned(),
            from: b.clone(),
            to: a.clone(),
        }),
    }
}

/// Outputs as a map.
pub fn outputs<const N: usize>(pairs: [(&str, Value); N]) -> Map<String, Value> {
    pairs.into_iter().map(|(k, v)| (k.to_owned(), v)).collect()
}

use crate::client::{AzureClient, Service};
use reqwest::Method;
use url::Url;

/// GET a resource: its body, or `null` when it does not exist.
pub async fn read(client: &AzureClient, url: &Url) -> Result<Value, StepError> {
    Ok(client
        .get(url)
        .await?
        .map(|r| r.body)
        .unwrap_or(Value::Null))
}

/// Every item of a list (every page, bounded; see [`AzureClient::list_all`]); empty when Azure
/// says the scope listed does not exist.
pub async fn read_list(client: &AzureClient, url: &Url) -> Result<Vec<Value>, StepError> {
    Ok(client.list_all(url).await?.unwrap_or_default())
}

/// GET a resource that must exist already (the kinds that change existing resources).
pub async fn read_existing(
    client: &AzureClient,
    url: &Url,
    (what, name, resource_group): (&str, &str, &str),
) -> Result<Value, StepError> {
    let found = read(client, url).await?;
    if found.is_null() {
        return Err(StepError::permanent(format!(
            "{what} `{name}` does not exist in resource group `{resource_group}`: check the name and the resource group, or create it first"
        )));
    }
    Ok(found)
}

/// PUT a resource and wait for it to settle.
pub async fn put(client: &AzureClient, url: &Url, body: &Value) -> Result<Value, StepError> {
    Ok(client.write_and_wait(Method::PUT, url, body, None).await?)
}

/// PUT a resource the step observed as `before`: an update when it was there, a create when
/// it was absent, whose answer must prove the creation ([`AzureClient::create_and_wait`];
/// `conditional` for providers that document `If-None-Match: *`). Returns the resource,
/// and why it is not this step's creation when a planned create turned out to update a
/// resource that existed.
pub async fn put_proven(
    client: &AzureClient,
    url: &Url,
    before: &Value,
    body: &Value,
    conditional: bool,
) -> Result<(Value, Option<String>), StepError> {
    if !before.is_null() {
        return Ok((put(client, url, body).await?, None));
    }
    let (resource, creation) = client.create_and_wait(url, body, conditional).await?;
    Ok(match creation {
        crate::client::Creation::Made => (resource, None),
        crate::client::Creation::Existed(why) => (resource, Some(why)),
    })
}

/// The step's outputs, recorded as an update of someone else's resource when `existed` says
/// why (see [`put_proven`]).
pub fn applied(
    outputs: Map<String, Value>,
    existed: Option<String>,
) -> kmsflow_engine::kind::Applied {
    match existed {
        Some(why) => kmsflow_engine::kind::Applied::existed(outputs, why),
        None => outputs.into(),
    }
}

/// DELETE a resource and wait until it is gone; absent already is fine.
pub async fn delete(client: &AzureClient, url: &Url) -> Result<(), StepError> {
    match client
        .send(Method::DELETE, url, Service::ResourceManager, None, None)
        .await
    {
        Ok(response) => {
            client.follow(response, url).await?;
            Ok(())
        }
        Err(error) if error.is_not_found() => Ok(()),
        Err(error) => Err(error.into()),
    }
}

/// The client, and the URL of `namespace/kind/name` in a resource group: what every ARM
/// resource kind starts with.
pub async fn resource_url(
    azure: &crate::azure::Azure,
    (subscription, resource_group): (&str, &str),
    (namespace, kind, name): (&str, &str, &str),
    api_version: &str,
) -> Result<(std::sync::Arc<AzureClient>, Url), StepError> {
    let client = azure.client().await?;
    let url = client.arm_url(
        &resource_path(subscription, resource_group, namespace, kind, name),
        api_version,
    )?;
    Ok((client, url))
}

/// Before rollback deletes what a step created: why `current` is not provably that instance,
/// if it is not. The step recorded `output` when it made it; `pointer` finds the same marker
/// in the resource as it is now (a principal id, a creation time). A marker missing on either
/// side proves nothing, so nothing is deleted: kmsflow never deletes what it cannot show it made.
pub fn not_the_one_created(
    what: &str,
    current: &Value,
    recorded: Option<&Value>,
    output: &str,
    pointer: &str,
) -> Option<String> {
    let Some(then) = recorded
        .and_then(|r| r.get(output))
        .filter(|v| v.is_string() && v.as_str() != Some("***"))
    else {
        return Some(format!(
            "{what}: this run recorded no {output} when it created it, so nothing proves the one there now is that one; left in place (delete it yourself if it is)"
        ));
    };
    let Some(now) = current.pointer(pointer).filter(|v| v.is_string()) else {
        return Some(format!(
            "{what} shows no {output} now, so nothing proves it is the one this run created ({output} {then}); left in place"
        ));
    };
    (then != now).then(|| {
        format!(
            "{what} is not the one this run created (its {output} was {then}, it is {now} now): someone made it again since; left in place"
        )
    })
}

/// Rollback of a create: deletes the resource, unless it is not the one the step created
/// ([`not_the_one_created`]), which is left and reported.
pub async fn delete_created(
    client: &AzureClient,
    url: &Url,
    what: &str,
    recorded: Option<&Value>,
    marker: (&str, &str),
) -> Result<kmsflow_engine::kind::Undo, StepError> {
    let current = read(client, url).await?;
    if current.is_null() {
        // Gone already (Azure said so): nothing to delete.
        return Ok(kmsflow_engine::kind::Undo::Done);
    }
    let (output, pointer) = marker;
    if let Some(reason) = not_the_one_created(what, &current, recorded, output, pointer) {
        return Ok(kmsflow_engine::kind::Undo::Irreversible(reason));
    }
    delete(client, url).await?;
    Ok(kmsflow_engine::kind::Undo::Done)
}

/// Rollback for the kinds that create a resource or change only its tags: a created one is
/// deleted, an updated one gets back the location and tags `before` had.
pub async fn undo_create_or_tags(
    client: &AzureClient,
    url: &Url,
    before: &Value,
    outcome: kmsflow_engine::kind::Outcome,
) -> Result<kmsflow_engine::kind::Undo, StepError> {
    use kmsflow_engine::kind::{Outcome, Undo};
    match outcome {
        Outcome::Created => delete(client, url).await?,
        Outcome::Updated => {
            let tags = before
                .get("tags")
                .cloned()
                .unwrap_or_else(|| Value::Object(Map::new()));
            put(
                client,
                url,
                &serde_json::json!({"location": before["location"], "tags": tags}),
            )
            .await?;
        }
        _ => return Ok(Undo::NothingToUndo),
    }
    Ok(Undo::Done)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn only_desired_fields_count() {
        let mut out = Vec::new();
        differences(
            &json!({"properties": {"sku": {"name": "standard"}, "enableRbacAuthorization": true}}),
            &json!({"properties": {"sku": {"name": "Standard", "family": "A"}, "enableRbacAuthorization": false, "vaultUri": "x"}}),
            "",
            &mut out,
        );
        assert_eq!(out.len(), 1);
        assert_eq!(out[0].path, "properties.enableRbacAuthorization");
    }

    #[test]
    fn ids_cannot_smuggle_urls() {
        assert!(id_segments("/subscriptions/s/resourceGroups/rg").is_ok());
        assert!(id_segments("/subscriptions/s/../x").is_err());
        assert!(id_segments("/subscriptions/s?x=1").is_err());
        assert!(id_segments("https://evil/subscriptions/s").is_err());
    }
}
