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
    #[serde(default)]
    rotate_after: Option<String>,
    #[serde(default)]
    expires_after: Option<String>,
}

/// How long before a version expires Key Vault is asked to notify (its own default).
const NOTIFY_BEFORE_EXPIRY: &str = "P30D";

impl Params {
    /// The rotation policy this step wants, in the data plane's shape; `None` when it manages
    /// none.
    fn wanted_policy(&self) -> Option<Value> {
        if self.rotate_after.is_none() && self.expires_after.is_none() {
            return None;
        }
        let mut actions = Vec::new();
        if let Some(after) = &self.rotate_after {
            actions
                .push(json!({"trigger": {"timeAfterCreate": after}, "action": {"type": "Rotate"}}));
        }
        if self.expires_after.is_some() {
            actions.push(json!({"trigger": {"timeBeforeExpiry": NOTIFY_BEFORE_EXPIRY}, "action": {"type": "Notify"}}));
        }
        let mut policy = json!({"lifetimeActions": actions, "attributes": {}});
        if let Some(expiry) = &self.expires_after {
            policy["attributes"]["expiryTime"] = json!(expiry);
        }
        Some(policy)
    }
}

/// A policy's lifetime actions and expiry, comparable whichever plane wrote it (Resource
/// Manager writes action types in lower case).
fn policy_terms(policy: &Value) -> (Vec<String>, String) {
    let mut actions: Vec<String> = policy["lifetimeActions"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let trigger = &a["trigger"];
            format!(
                "{}|{}|{}",
                trigger["timeAfterCreate"].as_str().unwrap_or_default(),
                trigger["timeBeforeExpiry"].as_str().unwrap_or_default(),
                a["action"]["type"].as_str().unwrap_or_default()
            )
            .to_ascii_lowercase()
        })
        .collect();
    actions.sort();
    let expiry = policy["attributes"]["expiryTime"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_uppercase();
    (actions, expiry)
}

/// The policy a read key has: in Resource Manager's body, or as the data plane answered it.
fn observed_policy(before: &Value) -> &Value {
    match &before["properties"]["rotationPolicy"] {
        Value::Null => &before["rotationPolicy"],
        policy => policy,
    }
}

/// Seconds in an ISO 8601 duration of years, months and days (a year 365 days, a month 30):
/// the first version's expiry, which the policy's `expiryTime` gives only to later ones.
fn duration_seconds(iso: &str) -> i64 {
    let mut total = 0i64;
    let mut number = String::new();
    for c in iso.trim_start_matches('P').chars() {
        if c.is_ascii_digit() {
            number.push(c);
            continue;
        }
        let n: i64 = number.parse().unwrap_or(0);
        number.clear();
        total +=
            n * match c {
                'Y' => 365,
                'M' => 30,
                _ => 1,
            } * 86_400;
    }
    total
}

fn rsa() -> String {
    "RSA".into()
}
fn bits() -> i64 {
    2048
}

static SPEC: KindSpec = KindSpec {
    name: "azure.keyvault_key",
    summary: "Ensures a key exists in a vault (read first; created only when absent, since each create adds a version), and with `rotate_after`/`expires_after` its rotation policy and the first version's expiry. Needs Key Vault Crypto Officer on the vault and a vault firewall that lets the caller in. Rollback deletes a key this run created (Key Vault keeps it soft-deleted) or puts back the policy it changed; a later run recovers a soft-deleted key of the same name instead of failing on the held name.",
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
        ParamSpec::optional(
            "rotate_after",
            ValueType::String,
            "rotate the key this long after each version is created (ISO 8601, e.g. `P90D`): sets the key's rotation policy",
        )
        .pattern(pattern::ISO_DAYS),
        ParamSpec::optional(
            "expires_after",
            ValueType::String,
            "each version expires this long after it is created (ISO 8601, e.g. `P2Y`), with a notification 30 days before",
        )
        .pattern(pattern::ISO_DAYS),
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
        let Some(mut key) = client.get_in_vault(&url).await?.map(|r| r.body) else {
            return Ok(Value::Null);
        };
        if p.wanted_policy().is_some() {
            let policy =
                client.vault_url(&p.vault_uri, &["keys", &p.name, "rotationpolicy"], API)?;
            key["rotationPolicy"] = client
                .get_in_vault(&policy)
                .await?
                .map(|r| r.body)
                .unwrap_or(Value::Null);
        }
        Ok(key)
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        let policy = p.wanted_policy();
        let terms = |rotate: &Option<String>, expires: &Option<String>| {
            [
                rotate.as_ref().map(|r| format!("rotated after {r}")),
                expires.as_ref().map(|e| format!("expiring after {e}")),
            ]
            .into_iter()
            .flatten()
            .collect::<Vec<_>>()
            .join(", ")
        };
        if before.is_null() {
            let mut summary = format!("create {} key {} in {}", p.kty, p.name, p.vault_uri);
            if policy.is_some() {
                summary.push_str(&format!(" ({})", terms(&p.rotate_after, &p.expires_after)));
            }
            return Ok(StepPlan::change(Change::Create { summary }));
        }
        if let Some(wanted) = policy
            && policy_terms(observed_policy(before)) != policy_terms(&wanted)
        {
            return Ok(StepPlan::change(Change::Update {
                summary: format!(
                    "set the rotation policy of key {}: {}",
                    p.name,
                    terms(&p.rotate_after, &p.expires_after)
                ),
                fields: vec![FieldChange {
                    path: "rotationPolicy".into(),
                    from: observed_policy(before).clone(),
                    to: wanted,
                }],
            }));
        }
        Ok(StepPlan::unchanged(key_outputs(before)))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let (outputs, existed) = if before.is_null() {
            let outputs = self.create(&client, &p).await?;
            let existed = self.other_versions(&client, &p, &outputs).await?;
            (outputs, existed)
        } else {
            (key_outputs(before), None)
        };
        // After the key exists (a PUT: resent safely if its answer is lost).
        if let Some(policy) = p.wanted_policy() {
            let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "rotationpolicy"], API)?;
            client
                .send(Method::PUT, &url, Service::KeyVault, Some(&policy), None)
                .await?;
        }
        Ok(common::applied(outputs, existed))
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        match outcome {
            Outcome::Created => {
                // The key is this run's only while the version it created is still there: a
                // key deleted and made again by someone else has other versions.
                let recorded = cx
                    .recorded_outputs
                    .and_then(|o| o["version"].as_str())
                    .filter(|v| !v.is_empty() && *v != "***");
                let Some(version) = recorded else {
                    return Ok(Undo::Irreversible(format!(
                        "key `{}`: this run recorded no version when it created it, so nothing proves the key there now is that one; left in place",
                        p.name
                    )));
                };
                let key = client.vault_url(&p.vault_uri, &["keys", &p.name], API)?;
                if client.get_in_vault(&key).await?.is_none() {
                    // Deleted already (an earlier rollback whose checkpoint did not land).
                    return Ok(Undo::Done);
                }
                let ours = client.vault_url(&p.vault_uri, &["keys", &p.name, version], API)?;
                if client.get_in_vault(&ours).await?.is_none() {
                    return Ok(Undo::Irreversible(format!(
                        "key `{}` is not the one this run created (its version {version} is not there): someone made it again since; left in place",
                        p.name
                    )));
                }
                let url = client.vault_url(&p.vault_uri, &["keys", &p.name], API)?;
                match client
                    .send(Method::DELETE, &url, Service::KeyVault, None, None)
                    .await
                {
                    Ok(_) => Ok(Undo::Done),
                    Err(error) if error.is_not_found() => Ok(Undo::Done),
                    Err(error) => Err(error.into()),
                }
            }
            Outcome::Updated => {
                // The policy the key had; Key Vault's default (notify before expiry) if none.
                let mut policy = observed_policy(before).clone();
                if policy["lifetimeActions"]
                    .as_array()
                    .is_none_or(Vec::is_empty)
                {
                    policy = json!({"lifetimeActions": [{"trigger": {"timeBeforeExpiry": NOTIFY_BEFORE_EXPIRY}, "action": {"type": "Notify"}}], "attributes": {}});
                }
                let url =
                    client.vault_url(&p.vault_uri, &["keys", &p.name, "rotationpolicy"], API)?;
                client
                    .send(Method::PUT, &url, Service::KeyVault, Some(&policy), None)
                    .await?;
                Ok(Undo::Done)
            }
            _ => Ok(Undo::NothingToUndo),
        }
    }
}

impl KeyVaultKey {
    /// After a create: why the key is not this step's, when it has versions other than the
    /// one just made (the create added a version to a key that existed).
    async fn other_versions(
        &self,
        client: &crate::AzureClient,
        p: &Params,
        created: &Map<String, Value>,
    ) -> Result<Option<String>, StepError> {
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "versions"], API)?;
        let listed = client
            .send(Method::GET, &url, Service::KeyVault, None, None)
            .await?;
        let Some(versions) = listed.body["value"].as_array() else {
            return Err(AzureError::unproven(
                "GET",
                &url,
                listed.status,
                "a body with no `value` list of the key's versions".into(),
            )
            .into());
        };
        let mine = created["version"].as_str().unwrap_or_default();
        let others = versions
            .iter()
            .filter_map(|v| v["kid"].as_str())
            .filter(|kid| !kid.ends_with(&format!("/{mine}")))
            .count();
        let more = listed.body["nextLink"]
            .as_str()
            .is_some_and(|l| !l.is_empty());
        Ok((others > 0 || more).then(|| {
            format!(
                "key `{}` had {} other version(s) besides the one this step made: the create added a version to a key someone else made",
                p.name,
                if more { format!("{others}+") } else { others.to_string() }
            )
        }))
    }

    /// Creates the key's first version (or recovers the soft-deleted key of its name).
    async fn create(
        &self,
        client: &crate::AzureClient,
        p: &Params,
    ) -> Result<Map<String, Value>, StepError> {
        let url = client.vault_url(&p.vault_uri, &["keys", &p.name, "create"], API)?;
        let mut body = json!({"kty": p.kty, "attributes": {"enabled": true}});
        if let Some(expires) = &p.expires_after {
            body["attributes"]["exp"] =
                json!(chrono::Utc::now().timestamp() + duration_seconds(expires));
        }
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
}
