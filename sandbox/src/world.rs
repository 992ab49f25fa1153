//! The sandbox's Azure: resources, their rules, and the request handlers that enforce them.
//!
//! Handlers are plain functions of a [`Req`] and the world, so the HTTP layer stays thin and
//! every rule can be read in one place. Time-dependent state (feature registration, principal
//! replication, RBAC propagation, cluster operations) is computed from creation instants when
//! read, so nothing needs a background task.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value, json};

use crate::faults::Delays;

/// Built-in role definitions the sandbox knows, by GUID.
pub const ROLES: &[(&str, &str)] = &[
    (
        "14b46e9e-c2b7-41b4-b07b-48a6ebf60603",
        "Key Vault Crypto Officer",
    ),
    (
        "12338af0-0e69-4776-bea7-57ae8d297424",
        "Key Vault Crypto User",
    ),
    (
        "f25e0fa2-a7c8-4377-a976-54943a77a395",
        "Key Vault Contributor",
    ),
    ("21090545-7ca7-4776-b22c-e363652d74d2", "Key Vault Reader"),
    (
        "8b54135c-b56d-4d72-a534-26097cfdc8d8",
        "Key Vault Data Access Administrator",
    ),
    ("b24988ac-6180-42a0-ab88-20f7382dd24c", "Contributor"),
    ("acdd72a7-3385-48ef-bd42-f606fba81ae7", "Reader"),
];
const CRYPTO_OFFICER: &str = "14b46e9e-c2b7-41b4-b07b-48a6ebf60603";
const CRYPTO_USER: &str = "12338af0-0e69-4776-bea7-57ae8d297424";

/// One request, as the handlers see it.
#[derive(Debug, Clone)]
pub struct Req {
    pub method: String,
    /// The path as sent.
    pub path: String,
    /// Path segments, lowercased (ARM paths are case-insensitive).
    pub segments: Vec<String>,
    /// Path segments as sent.
    pub raw_segments: Vec<String>,
    pub query: BTreeMap<String, String>,
    pub if_match: Option<String>,
    pub body: Option<Value>,
    /// The token's `oid`.
    pub caller: String,
}

/// One answer.
#[derive(Debug, Clone)]
pub struct Resp {
    pub status: u16,
    pub body: Option<Value>,
    pub headers: Vec<(String, String)>,
}

impl Resp {
    pub fn json(status: u16, body: Value) -> Resp {
        Resp {
            status,
            body: Some(body),
            headers: Vec::new(),
        }
    }

    pub fn empty(status: u16) -> Resp {
        Resp {
            status,
            body: None,
            headers: Vec::new(),
        }
    }

    /// An ARM error envelope.
    pub fn arm_error(status: u16, code: &str, message: impl Into<String>) -> Resp {
        Resp::json(
            status,
            json!({"error": {"code": code, "message": message.into()}}),
        )
    }

    /// A Key Vault data-plane error envelope, with its inner code.
    pub fn vault_error(
        status: u16,
        code: &str,
        inner: Option<&str>,
        message: impl Into<String>,
    ) -> Resp {
        let mut error = json!({"code": code, "message": message.into()});
        if let Some(inner) = inner {
            error["innererror"] = json!({"code": inner});
        }
        Resp::json(status, json!({"error": error}))
    }

    fn header(mut self, name: &str, value: impl Into<String>) -> Resp {
        self.headers.push((name.to_owned(), value.into()));
        self
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Feature {
    state: String,
    #[serde(with = "stamp::optional")]
    registered_at: Option<Instant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Provider {
    #[serde(with = "stamp::optional")]
    registered_at: Option<Instant>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Assignment {
    body: Value,
    scope: String,
    principal: String,
    role: String,
    #[serde(with = "stamp")]
    created: Instant,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct KeyVersion {
    version: String,
    body: Value,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct Operation {
    cluster: String,
    #[serde(with = "stamp")]
    started: Instant,
    #[serde(with = "stamp")]
    done_at: Instant,
    /// Set when the operation will fail: (code, message).
    failure: Option<(String, String)>,
    /// The cluster body to show once it succeeds.
    result: Value,
    /// The body to go back to if it fails.
    previous: Option<Value>,
    finished: bool,
    /// A delete: the cluster is removed when it ends.
    #[serde(default)]
    deletes: bool,
}

impl Operation {
    /// An operation on `cluster` that starts `now` and takes `takes`, succeeding with nothing
    /// to show: callers set what it makes (or undoes).
    fn on_cluster(cluster: &str, now: Instant, takes: Duration) -> Operation {
        Operation {
            cluster: cluster.to_owned(),
            started: now,
            done_at: now + takes,
            failure: None,
            result: Value::Null,
            previous: None,
            finished: false,
            deletes: false,
        }
    }
}

/// Every resource in the sandbox.
pub struct World {
    pub base_url: String,
    pub subscription: String,
    pub tenant: String,
    pub delays: Delays,
    /// Resource groups, by lowercase name.
    groups: BTreeMap<String, Value>,
    features: BTreeMap<String, Feature>,
    providers: BTreeMap<String, Provider>,
    /// Vaults, identities and clusters, by lowercase id.
    resources: BTreeMap<String, Value>,
    /// Creation instants of identities' principals, by principal id.
    principals: BTreeMap<String, Instant>,
    assignments: BTreeMap<String, Assignment>,
    /// Keys by (lowercase vault name, lowercase key name).
    keys: BTreeMap<(String, String), Vec<KeyVersion>>,
    /// Keys deleted but recoverable (Key Vault soft-deletes every key): their versions and
    /// the Unix time of the deletion. The name cannot be used again until recovered or purged.
    deleted_keys: BTreeMap<(String, String), (i64, Vec<KeyVersion>)>,
    rotation_policies: BTreeMap<(String, String), Value>,
    deleted_vaults: BTreeSet<String>,
    operations: BTreeMap<String, Operation>,
    /// The caller's object id (always a known principal).
    pub caller: String,
}

fn uuid() -> String {
    uuid::Uuid::new_v4().to_string()
}

fn unix_now() -> i64 {
    chrono::Utc::now().timestamp()
}

fn deep_merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(target), Value::Object(patch)) => {
            for (key, value) in patch {
                deep_merge(target.entry(key.clone()).or_insert(Value::Null), value);
            }
        }
        (target, patch) => *target = patch.clone(),
    }
}

fn version_at_least(version: &str, major: u64, minor: u64) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

fn name_ok(name: &str, min: usize, max: usize, allowed: impl Fn(char) -> bool) -> bool {
    (min..=max).contains(&name.len()) && name.chars().all(allowed)
}

impl World {
    pub fn new(
        base_url: String,
        subscription: String,
        tenant: String,
        caller: String,
        delays: Delays,
    ) -> World {
        World {
            base_url,
            subscription,
            tenant,
            delays,
            groups: BTreeMap::new(),
            features: BTreeMap::new(),
            providers: BTreeMap::new(),
            resources: BTreeMap::new(),
            principals: BTreeMap::new(),
            assignments: BTreeMap::new(),
            keys: BTreeMap::new(),
            deleted_keys: BTreeMap::new(),
            rotation_policies: BTreeMap::new(),
            deleted_vaults: BTreeSet::new(),
            operations: BTreeMap::new(),
            caller,
        }
    }

    /// Every resource, for `GET /_sandbox/world` and tests.
    pub fn dump(&mut self) -> Value {
        self.settle(Instant::now());
        let keys: Map<String, Value> = self
            .keys
            .iter()
            .map(|((vault, key), versions)| {
                (
                    format!("{vault}/{key}"),
                    Value::Array(versions.iter().map(|v| v.body.clone()).collect()),
                )
            })
            .collect();
        let now = Instant::now();
        json!({
            "subscription": self.subscription,
            "tenant": self.tenant,
            "resource_groups": self.groups.values().cloned().collect::<Vec<_>>(),
            "features": self.features.iter().map(|(k, f)| json!({"name": k, "state": self.feature_state(f, now)})).collect::<Vec<_>>(),
            "providers": self.providers.iter().map(|(k, p)| json!({"namespace": k, "registrationState": if p.registered_at.is_some() { "Registered" } else { "NotRegistered" }})).collect::<Vec<_>>(),
            "resources": self.resources.values().cloned().collect::<Vec<_>>(),
            "role_assignments": self.assignments.values().map(|a| a.body.clone()).collect::<Vec<_>>(),
            "keys": keys,
            "deleted_keys": self.deleted_keys.keys().map(|(vault, key)| format!("{vault}/{key}")).collect::<Vec<_>>(),
            "rotation_policies": self.rotation_policies.values().cloned().collect::<Vec<_>>(),
            "deleted_vaults": self.deleted_vaults,
        })
    }

    /// Seeds a resource as if it had been created long ago (world files).
    pub fn seed_resource(&mut self, body: Value) {
        let id = body["id"].as_str().unwrap_or_default().to_ascii_lowercase();
        if let Some(principal) = body["properties"]["principalId"].as_str() {
            self.principals.insert(
                principal.to_owned(),
                Instant::now() - Duration::from_secs(3600),
            );
        }
        self.resources.insert(id, body);
    }

    /// Seeds a key (one version) in a seeded vault; returns its versionless id.
    pub fn seed_key(&mut self, vault_name: &str, key_name: &str) -> Option<String> {
        let vault = self.find_vault(vault_name)?.clone();
        let vault_uri = vault["properties"]["vaultUri"].as_str()?.to_owned();
        self.new_key_version(
            &vault_uri,
            &vault_name.to_ascii_lowercase(),
            key_name,
            &json!({"kty": "RSA"}),
        );
        Some(format!("{vault_uri}/keys/{key_name}"))
    }

    /// Seeds a key version with some attributes (`created`, `exp`, `enabled`) as given.
    pub fn seed_key_with(
        &mut self,
        vault_name: &str,
        key_name: &str,
        attributes: &Value,
    ) -> Option<String> {
        let id = self.seed_key(vault_name, key_name)?;
        let versions = self.keys.get_mut(&(
            vault_name.to_ascii_lowercase(),
            key_name.to_ascii_lowercase(),
        ))?;
        let latest = versions.last_mut()?;
        if let (Some(target), Some(changes)) = (
            latest.body["attributes"].as_object_mut(),
            attributes.as_object(),
        ) {
            for (key, value) in changes {
                target.insert(key.clone(), value.clone());
            }
        }
        Some(id)
    }

    /// Seeds a rotation policy on a key.
    pub fn seed_rotation_policy(&mut self, vault_name: &str, key_name: &str, policy: Value) {
        self.rotation_policies.insert(
            (
                vault_name.to_ascii_lowercase(),
                key_name.to_ascii_lowercase(),
            ),
            policy,
        );
    }

    /// Seeds a role assignment, propagated long ago.
    pub fn seed_assignment(&mut self, scope: &str, principal: &str, role: &str) {
        let name = uuid();
        let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
        let body = json!({
            "properties": {
                "roleDefinitionId": format!("/subscriptions/{}/providers/Microsoft.Authorization/roleDefinitions/{role}", self.subscription),
                "principalId": principal,
                "principalType": "ServicePrincipal",
                "scope": scope,
            },
            "id": id,
            "type": "Microsoft.Authorization/roleAssignments",
            "name": name,
        });
        self.assignments.insert(
            id.to_ascii_lowercase(),
            Assignment {
                body,
                scope: scope.to_ascii_lowercase(),
                principal: principal.to_owned(),
                role: role.to_ascii_lowercase(),
                created: Instant::now() - Duration::from_secs(3600),
            },
        );
    }

    /// Seeds a resource group.
    pub fn seed_group(&mut self, name: &str, location: &str) {
        let id = format!("/subscriptions/{}/resourceGroups/{name}", self.subscription);
        self.groups.insert(
            name.to_ascii_lowercase(),
            json!({"id": id, "name": name, "location": location, "properties": {"provisioningState": "Succeeded"}}),
        );
    }

    /// Marks a feature registered and its provider re-registered (world files).
    pub fn seed_feature_registered(&mut self, namespace: &str, feature: &str) {
        let long_ago = Instant::now() - Duration::from_secs(3600);
        self.features.insert(
            format!(
                "{}/{}",
                namespace.to_ascii_lowercase(),
                feature.to_ascii_lowercase()
            ),
            Feature {
                state: "Registered".into(),
                registered_at: Some(long_ago),
            },
        );
        self.providers.insert(
            namespace.to_ascii_lowercase(),
            Provider {
                registered_at: Some(long_ago + Duration::from_secs(1)),
            },
        );
    }

    /// Handles an ARM request (the path starts with `/subscriptions/`).
    pub fn arm(&mut self, req: &Req) -> Resp {
        let now = Instant::now();
        self.settle(now);
        if req.query.get("api-version").is_none_or(|v| v.is_empty()) {
            return Resp::arm_error(
                400,
                "MissingApiVersionParameter",
                "The api-version query parameter (?api-version=) is required for all requests.",
            );
        }
        let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
        if s.get(1).copied() != Some(self.subscription.to_ascii_lowercase().as_str()) {
            return Resp::arm_error(
                404,
                "SubscriptionNotFound",
                format!(
                    "The subscription '{}' could not be found.",
                    req.raw_segments.get(1).cloned().unwrap_or_default()
                ),
            );
        }
        // Role assignments can hang under any scope.
        if let Some(position) = s
            .windows(2)
            .position(|w| w == ["providers", "microsoft.authorization"])
            && s.get(position + 2) == Some(&"roleassignments")
        {
            let scope = format!("/{}", req.raw_segments[..position].join("/"));
            return match s.get(position + 3) {
                None if req.method == "GET" => self.list_assignments(&scope, req),
                Some(_) => self.role_assignment(&scope, req, now),
                None => method_not_allowed(req),
            };
        }
        // Everything inside a resource group needs the group.
        if let ["subscriptions", _, "resourcegroups", group, _, ..] = s.as_slice()
            && !self.groups.contains_key(*group)
        {
            return group_not_found(&req.raw_segments[3]);
        }
        match s.as_slice() {
            ["subscriptions", _, "resourcegroups", _] => self.resource_group(req),
            ["subscriptions", _, "resourcegroups", group, "resources"] if req.method == "GET" => {
                self.resources_in_group(group)
            }
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.features",
                "providers",
                namespace,
                "features",
                feature,
            ] => self.feature(req, namespace, feature, false, now),
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.features",
                "providers",
                namespace,
                "features",
                feature,
                "register",
            ] => self.feature(req, namespace, feature, true, now),
            ["subscriptions", _, "providers", namespace] => {
                self.provider(req, namespace, false, now)
            }
            ["subscriptions", _, "providers", namespace, "register"] => {
                self.provider(req, namespace, true, now)
            }
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.containerservice",
                "locations",
                _,
                "operations",
                operation,
            ] => self.operation_status(req, operation),
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.keyvault",
                "locations",
                _,
                "operationresults",
                operation,
            ] => self.vault_operation(req, operation),
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.containerservice",
                "locations",
                _,
                "operationresults",
                operation,
            ] => self.cluster_operation_result(req, operation),
            [
                "subscriptions",
                _,
                "providers",
                "microsoft.keyvault",
                "vaults",
            ] if req.method == "GET" => self.vaults_in_subscription(),
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                "microsoft.keyvault",
                "vaults",
                vault,
                "keys",
                key,
            ] => {
                let (vault, key) = (vault.to_string(), key.to_string());
                self.management_key(req, &vault, &key)
            }
            [
                "subscriptions",
                _,
                "resourcegroups",
                _,
                "providers",
                namespace,
                kind,
                _,
            ] => match (*namespace, *kind) {
                ("microsoft.keyvault", "vaults") => self.vault(req),
                ("microsoft.managedidentity", "userassignedidentities") => self.identity(req, now),
                ("microsoft.containerservice", "managedclusters") => self.cluster(req, now),
                _ => Resp::arm_error(
                    400,
                    "NoRegisteredProviderFound",
                    format!(
                        "No registered resource provider found for type '{}/{}'.",
                        req.raw_segments[5], req.raw_segments[6]
                    ),
                ),
            },
            _ => Resp::arm_error(
                404,
                "InvalidResourceType",
                format!(
                    "The resource type could not be found for path '{}'.",
                    req.path
                ),
            ),
        }
    }

    /// Vaults - List By Subscription: `{value: [Vault], nextLink?}` (one page: the sandbox
    /// never holds enough vaults to page).
    fn vaults_in_subscription(&self) -> Resp {
        let value: Vec<Value> = self
            .resources
            .values()
            .filter(|r| r["type"] == "Microsoft.KeyVault/vaults")
            .cloned()
            .collect();
        Resp::json(200, json!({ "value": value }))
    }

    /// Resources - List By Resource Group: `{value: [GenericResourceExpanded], nextLink?}`.
    /// Role assignments are not resources there, as in Azure.
    fn resources_in_group(&self, group: &str) -> Resp {
        let prefix = format!(
            "/subscriptions/{}/resourcegroups/{group}/",
            self.subscription.to_ascii_lowercase()
        );
        let value: Vec<Value> = self
            .resources
            .iter()
            .filter(|(id, _)| id.starts_with(&prefix))
            .map(|(_, r)| {
                let mut listed = json!({
                    "id": r["id"], "name": r["name"], "type": r["type"], "location": r["location"],
                });
                if let Some(tags) = r.get("tags") {
                    listed["tags"] = tags.clone();
                }
                listed
            })
            .collect();
        Resp::json(200, json!({ "value": value }))
    }

    fn resource_group(&mut self, req: &Req) -> Resp {
        let name = req.raw_segments[3].clone();
        let key = name.to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.groups.get(&key) {
                Some(group) => Resp::json(200, group.clone()),
                None => group_not_found(&name),
            },
            "PUT" => {
                if !name_ok(&name, 1, 90, |c| c.is_alphanumeric() || "-_.()".contains(c))
                    || name.ends_with('.')
                {
                    return Resp::arm_error(
                        400,
                        "InvalidResourceGroup",
                        format!(
                            "The provided resource group name '{name}' has these invalid characters or length."
                        ),
                    );
                }
                let Some(location) = req.body.as_ref().and_then(|b| b["location"].as_str()) else {
                    return location_required();
                };
                if let Some(existing) = self.groups.get(&key)
                    && existing["location"].as_str() != Some(location)
                {
                    return Resp::arm_error(
                        409,
                        "InvalidResourceGroupLocation",
                        format!(
                            "Invalid resource group location '{location}'. The Resource group already exists in location '{}'.",
                            existing["location"].as_str().unwrap_or_default()
                        ),
                    );
                }
                let existed = self.groups.contains_key(&key);
                let stored_name = self
                    .groups
                    .get(&key)
                    .and_then(|g| g["name"].as_str().map(str::to_owned))
                    .unwrap_or(name);
                let mut group = json!({
                    "id": format!("/subscriptions/{}/resourceGroups/{stored_name}", self.subscription),
                    "name": stored_name,
                    "location": location,
                    "properties": {"provisioningState": "Succeeded"},
                });
                if let Some(tags) = req.body.as_ref().and_then(|b| b.get("tags")) {
                    group["tags"] = tags.clone();
                }
                self.groups.insert(key, group.clone());
                Resp::json(if existed { 200 } else { 201 }, group)
            }
            "DELETE" => match self.groups.remove(&key) {
                Some(_) => {
                    let prefix = format!(
                        "/subscriptions/{}/resourcegroups/{key}/",
                        self.subscription.to_ascii_lowercase()
                    );
                    self.resources.retain(|id, _| !id.starts_with(&prefix));
                    Resp::empty(200)
                }
                None => Resp::empty(204),
            },
            _ => method_not_allowed(req),
        }
    }

    fn feature_state(&self, feature: &Feature, now: Instant) -> String {
        match feature.registered_at {
            Some(at)
                if feature.state == "Registering"
                    && now >= at + self.delays.feature_registration =>
            {
                "Registered".into()
            }
            _ => feature.state.clone(),
        }
    }

    fn feature(
        &mut self,
        req: &Req,
        namespace: &str,
        feature: &str,
        register: bool,
        now: Instant,
    ) -> Resp {
        let key = format!("{namespace}/{feature}");
        let display = format!("{}/{}", req.raw_segments[5], req.raw_segments[7]);
        if register {
            if req.method != "POST" {
                return method_not_allowed(req);
            }
            let entry = self.features.entry(key.clone()).or_insert(Feature {
                state: "NotRegistered".into(),
                registered_at: None,
            });
            if entry.state != "Registered" && entry.state != "Registering" {
                entry.state = "Registering".into();
                entry.registered_at = Some(now);
            }
        } else if req.method != "GET" {
            return method_not_allowed(req);
        }
        let state = self.features.get(&key).map_or_else(
            || "NotRegistered".to_owned(),
            |f| self.feature_state(f, now),
        );
        Resp::json(
            200,
            json!({
                "id": format!("/subscriptions/{}/providers/Microsoft.Features/providers/{}/features/{}", self.subscription, req.raw_segments[5], req.raw_segments[7]),
                "name": display,
                "type": "Microsoft.Features/providers/features",
                "properties": {"state": state},
            }),
        )
    }

    fn provider(&mut self, req: &Req, namespace: &str, register: bool, now: Instant) -> Resp {
        if register {
            if req.method != "POST" {
                return method_not_allowed(req);
            }
            self.providers.insert(
                namespace.to_owned(),
                Provider {
                    registered_at: Some(now),
                },
            );
        } else if req.method != "GET" {
            return method_not_allowed(req);
        }
        let registered = self
            .providers
            .get(namespace)
            .and_then(|p| p.registered_at)
            .is_some();
        Resp::json(
            200,
            json!({
                "id": format!("/subscriptions/{}/providers/{}", self.subscription, req.raw_segments[3]),
                "namespace": req.raw_segments[3],
                "registrationState": if registered { "Registered" } else { "NotRegistered" },
                "registrationPolicy": "RegistrationRequired",
                "resourceTypes": [{"resourceType": "managedClusters", "locations": ["East US", "West Europe"], "apiVersions": ["2025-10-02-preview", "2026-01-01"]}],
            }),
        )
    }

    /// Whether a preview feature is registered and its provider re-registered since.
    fn feature_effective(&self, namespace: &str, feature: &str, now: Instant) -> bool {
        let Some(f) = self.features.get(&format!("{namespace}/{feature}")) else {
            return false;
        };
        if self.feature_state(f, now) != "Registered" {
            return false;
        }
        let registered_at = f
            .registered_at
            .map(|at| at + self.delays.feature_registration);
        match (
            self.providers.get(namespace).and_then(|p| p.registered_at),
            registered_at,
        ) {
            (Some(provider), Some(feature)) => provider >= feature,
            (Some(_), None) => true,
            _ => false,
        }
    }

    fn vault(&mut self, req: &Req) -> Resp {
        let name = req.raw_segments[7].clone();
        let id_key = req.path.trim_end_matches('/').to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.resources.get(&id_key) {
                Some(vault) => Resp::json(200, vault.clone()),
                None => not_found("Microsoft.KeyVault/vaults", &name, &req.raw_segments[3]),
            },
            "PUT" => {
                if !name_ok(&name, 3, 24, |c| c.is_ascii_alphanumeric() || c == '-') {
                    return Resp::arm_error(
                        400,
                        "VaultNameNotValid",
                        format!(
                            "The vault name '{name}' is invalid. A vault's name must be between 3-24 alphanumeric characters."
                        ),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let Some(location) = body["location"].as_str() else {
                    return location_required();
                };
                if body["properties"]["tenantId"].as_str().is_none()
                    || body["properties"]["sku"].is_null()
                {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        "The properties 'tenantId' and 'sku' are required.",
                    );
                }
                let existing = self.resources.get(&id_key).cloned();
                // Not enforced: the spec says access policies are required unless
                // `createMode: recover`, and clients reported "The parameter accessPolicies is not
                // specified." (fidelity audit, row 1), but the official example
                // `createVaultWithNetworkAcls` creates a vault without them. Which holds for an
                // RBAC vault is not known; kmsflow sends `accessPolicies: []` on create either way.
                if existing.is_none() && self.deleted_vaults.contains(&name.to_ascii_lowercase()) {
                    return Resp::arm_error(
                        409,
                        "ConflictError",
                        format!(
                            "A vault with the same name already exists in deleted state. You need to either recover or purge existing key vault. Vault name: {name}"
                        ),
                    );
                }
                if existing.is_none()
                    && self.resources.keys().any(|k| {
                        k.ends_with(&format!(
                            "/providers/microsoft.keyvault/vaults/{}",
                            name.to_ascii_lowercase()
                        ))
                    })
                {
                    return Resp::arm_error(
                        409,
                        "VaultAlreadyExists",
                        format!("The vault name '{name}' is already in use."),
                    );
                }
                if let Some(existing) = &existing
                    && existing["properties"]["enablePurgeProtection"] == true
                    && body["properties"]["enablePurgeProtection"] == false
                {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        "Purge protection cannot be disabled once enabled.",
                    );
                }
                let mut properties = body["properties"].clone();
                let defaults = json!({
                    "enabledForDeployment": false,
                    "enabledForDiskEncryption": false,
                    "enabledForTemplateDeployment": false,
                    "enableRbacAuthorization": false,
                    "enableSoftDelete": true,
                    "softDeleteRetentionInDays": 90,
                    "publicNetworkAccess": "Enabled",
                    "accessPolicies": [],
                    "networkAcls": {"bypass": "AzureServices", "defaultAction": "Allow", "ipRules": [], "virtualNetworkRules": []},
                });
                for (key, value) in defaults.as_object().expect("object") {
                    if properties.get(key).is_none_or(Value::is_null) {
                        properties[key] = value.clone();
                    }
                }
                properties["vaultUri"] = json!(format!(
                    "{}/_kv/{}",
                    self.base_url,
                    name.to_ascii_lowercase()
                ));
                properties["provisioningState"] = json!("Succeeded");
                let stored_id = existing
                    .as_ref()
                    .and_then(|e| e["id"].as_str().map(str::to_owned))
                    .unwrap_or_else(|| req.path.trim_end_matches('/').to_owned());
                let vault = json!({
                    "id": stored_id,
                    "name": name,
                    "type": "Microsoft.KeyVault/vaults",
                    "location": location,
                    "tags": body.get("tags").cloned().unwrap_or(json!({})),
                    "properties": properties,
                    "systemData": {
                        // Set when the vault is made; an update changes only lastModifiedAt.
                        "createdAt": existing
                            .as_ref()
                            .map(|e| e["systemData"]["createdAt"].clone())
                            .filter(Value::is_string)
                            .unwrap_or_else(|| json!(chrono::Utc::now().to_rfc3339())),
                        "createdBy": self.caller,
                        "createdByType": "Application",
                        "lastModifiedAt": chrono::Utc::now().to_rfc3339(),
                    },
                });
                self.resources.insert(id_key, vault.clone());
                if existing.is_some() {
                    Resp::json(200, vault)
                } else {
                    // Vault creation is long-running: 201 with a status URL to follow.
                    let operation = uuid();
                    self.operations.insert(
                        operation.clone(),
                        Operation {
                            cluster: String::new(),
                            started: Instant::now(),
                            done_at: Instant::now(),
                            failure: None,
                            result: vault.clone(),
                            previous: None,
                            finished: true,
                            deletes: false,
                        },
                    );
                    Resp::json(201, vault)
                        .header("Location", format!("{}/subscriptions/{}/providers/Microsoft.KeyVault/locations/{location}/operationResults/{operation}?api-version={}", self.base_url, self.subscription, req.query["api-version"]))
                        .header("Retry-After", "1")
                }
            }
            "PATCH" => {
                let Some(vault) = self.resources.get_mut(&id_key) else {
                    return not_found("Microsoft.KeyVault/vaults", &name, &req.raw_segments[3]);
                };
                let patch = req.body.clone().unwrap_or(Value::Null);
                if vault["properties"]["enablePurgeProtection"] == true
                    && patch["properties"]["enablePurgeProtection"] == false
                {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        "Purge protection cannot be disabled once enabled.",
                    );
                }
                // Arrays (ipRules, virtualNetworkRules) are replaced when given, kept when not.
                deep_merge(
                    vault,
                    &json!({"properties": patch["properties"], "tags": patch.get("tags").cloned().unwrap_or_else(|| vault["tags"].clone())}),
                );
                Resp::json(200, vault.clone())
            }
            "DELETE" => match self.resources.remove(&id_key) {
                Some(_) => {
                    let lower = name.to_ascii_lowercase();
                    self.deleted_vaults.insert(lower.clone());
                    self.keys.retain(|(vault, _), _| *vault != lower);
                    self.rotation_policies
                        .retain(|(vault, _), _| *vault != lower);
                    Resp::empty(200)
                }
                None => Resp::empty(204),
            },
            _ => method_not_allowed(req),
        }
    }

    fn vault_operation(&mut self, req: &Req, operation: &str) -> Resp {
        match self.operations.get(operation) {
            Some(op) if req.method == "GET" => Resp::json(200, op.result.clone()),
            Some(_) => method_not_allowed(req),
            None => Resp::arm_error(
                404,
                "OperationNotFound",
                format!("Operation '{operation}' was not found."),
            ),
        }
    }

    fn identity(&mut self, req: &Req, now: Instant) -> Resp {
        let name = req.raw_segments[7].clone();
        let id_key = req.path.trim_end_matches('/').to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.resources.get(&id_key) {
                Some(identity) => Resp::json(200, identity.clone()),
                None => not_found(
                    "Microsoft.ManagedIdentity/userAssignedIdentities",
                    &name,
                    &req.raw_segments[3],
                ),
            },
            "PUT" => {
                if !name_ok(&name, 3, 128, |c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_'
                }) || name.starts_with(['-', '_'])
                {
                    return Resp::arm_error(
                        400,
                        "InvalidResourceName",
                        format!("Resource name '{name}' is invalid."),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let Some(location) = body["location"].as_str() else {
                    return location_required();
                };
                let existing = self.resources.get(&id_key).cloned();
                let (principal, client) = match &existing {
                    Some(e) => (
                        e["properties"]["principalId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                        e["properties"]["clientId"]
                            .as_str()
                            .unwrap_or_default()
                            .to_owned(),
                    ),
                    None => (uuid(), uuid()),
                };
                // ARM returns ids of identities with a lowercase `resourcegroups`.
                let id = format!(
                    "/subscriptions/{}/resourcegroups/{}/providers/Microsoft.ManagedIdentity/userAssignedIdentities/{name}",
                    self.subscription, req.raw_segments[3]
                );
                let identity = json!({
                    "id": existing.as_ref().and_then(|e| e["id"].as_str().map(str::to_owned)).unwrap_or(id),
                    "location": location,
                    "name": name,
                    "properties": {"clientId": client, "principalId": principal, "tenantId": self.tenant},
                    "tags": body.get("tags").cloned().unwrap_or(json!({})),
                    "type": "Microsoft.ManagedIdentity/userAssignedIdentities",
                });
                if existing.is_none() {
                    self.principals.insert(principal, now);
                }
                self.resources.insert(id_key, identity.clone());
                Resp::json(if existing.is_some() { 200 } else { 201 }, identity)
            }
            "DELETE" => match self.resources.remove(&id_key) {
                Some(_) => Resp::empty(200),
                None => Resp::empty(204),
            },
            _ => method_not_allowed(req),
        }
    }

    fn principal_known(&self, principal: &str, now: Instant) -> bool {
        principal == self.caller
            || self
                .principals
                .get(principal)
                .is_some_and(|created| now >= *created + self.delays.principal_replication)
    }

    fn role_assignment(&mut self, scope: &str, req: &Req, now: Instant) -> Resp {
        let position = req
            .segments
            .iter()
            .rposition(|s| s == "roleassignments")
            .expect("routed here");
        let name = req.raw_segments[position + 1].clone();
        let id = format!("{scope}/providers/Microsoft.Authorization/roleAssignments/{name}");
        let key = id.to_ascii_lowercase();
        match req.method.as_str() {
            "GET" => match self.assignments.get(&key) {
                Some(a) => Resp::json(200, a.body.clone()),
                None => Resp::arm_error(
                    404,
                    "RoleAssignmentNotFound",
                    format!("The role assignment '{name}' is not found."),
                ),
            },
            "DELETE" => match self.assignments.remove(&key) {
                Some(a) => Resp::json(200, a.body),
                None => Resp::empty(204),
            },
            "PUT" => {
                if uuid::Uuid::parse_str(&name).is_err() {
                    return Resp::arm_error(
                        400,
                        "InvalidRoleAssignmentId",
                        format!(
                            "The role assignment ID '{name}' is not valid. The role assignment ID must be a GUID."
                        ),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let properties = &body["properties"];
                let (Some(role_definition), Some(principal)) = (
                    properties["roleDefinitionId"].as_str(),
                    properties["principalId"].as_str(),
                ) else {
                    return Resp::arm_error(
                        400,
                        "InvalidRequest",
                        "roleDefinitionId and principalId are required.",
                    );
                };
                let role = role_definition
                    .rsplit('/')
                    .next()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                if !ROLES.iter().any(|(guid, _)| *guid == role) {
                    return Resp::arm_error(
                        400,
                        "RoleDefinitionDoesNotExist",
                        format!("The specified role definition with ID '{role}' does not exist."),
                    );
                }
                if scope
                    .to_ascii_lowercase()
                    .contains("/providers/microsoft.keyvault/vaults/")
                    && !self.resources.contains_key(&scope.to_ascii_lowercase())
                {
                    return Resp::arm_error(
                        404,
                        "ResourceNotFound",
                        format!("The scope '{scope}' does not exist."),
                    );
                }
                if !self.principal_known(principal, now) {
                    return Resp::arm_error(
                        400,
                        "PrincipalNotFound",
                        format!(
                            "Principal {principal} does not exist in the directory {}. Check that you have the correct principal ID. If you are creating this principal and then immediately assigning a role, this error might be related to a replication delay. In this case, set the role assignment principalType property to a value, such as ServicePrincipal, User, or Group.  See https://aka.ms/docs-principaltype",
                            self.tenant
                        ),
                    );
                }
                let scope_key = scope.to_ascii_lowercase();
                if let Some(existing) = self.assignments.get(&key) {
                    if existing.principal == principal && existing.role == role {
                        return Resp::json(200, existing.body.clone());
                    }
                    return Resp::arm_error(
                        409,
                        "RoleAssignmentUpdateNotPermitted",
                        "Tenant ID, application ID, principal ID, and scope are not allowed to be updated.",
                    );
                }
                if self
                    .assignments
                    .values()
                    .any(|a| a.scope == scope_key && a.principal == principal && a.role == role)
                {
                    return Resp::arm_error(
                        409,
                        "RoleAssignmentExists",
                        "The role assignment already exists.",
                    );
                }
                let stored = json!({
                    "properties": {
                        "roleDefinitionId": role_definition,
                        "principalId": principal,
                        "principalType": properties["principalType"].as_str().unwrap_or("User"),
                        "scope": scope,
                    },
                    "id": id,
                    "type": "Microsoft.Authorization/roleAssignments",
                    "name": name,
                });
                self.assignments.insert(
                    key,
                    Assignment {
                        body: stored.clone(),
                        scope: scope_key,
                        principal: principal.to_owned(),
                        role,
                        created: now,
                    },
                );
                Resp::json(201, stored)
            }
            _ => method_not_allowed(req),
        }
    }

    fn list_assignments(&self, scope: &str, req: &Req) -> Resp {
        let scope_key = scope.to_ascii_lowercase();
        let principal_filter = req.query.get("$filter").and_then(|f| {
            let rest = f.strip_prefix("principalId eq '")?;
            Some(rest.trim_end_matches('\'').to_owned())
        });
        let value: Vec<Value> = self
            .assignments
            .values()
            .filter(|a| a.scope == scope_key || scope_key.starts_with(&format!("{}/", a.scope)))
            .filter(|a| principal_filter.as_ref().is_none_or(|p| *p == a.principal))
            .map(|a| a.body.clone())
            .collect();
        Resp::json(200, json!({"value": value}))
    }

    /// Whether `principal` holds one of `roles` on the vault (or a scope above it), and the
    /// assignment has propagated.
    fn holds_role(
        &self,
        principal: &str,
        vault_id: &str,
        roles: &[&str],
        now: Instant,
    ) -> Result<(), bool> {
        let vault_key = vault_id.to_ascii_lowercase();
        let mut pending = false;
        for a in self.assignments.values() {
            let covers = vault_key == a.scope || vault_key.starts_with(&format!("{}/", a.scope));
            if covers && a.principal == principal && roles.contains(&a.role.as_str()) {
                if now >= a.created + self.delays.rbac_propagation {
                    return Ok(());
                }
                pending = true;
            }
        }
        Err(pending)
    }

    fn find_vault(&self, name: &str) -> Option<&Value> {
        let suffix = format!(
            "/providers/microsoft.keyvault/vaults/{}",
            name.to_ascii_lowercase()
        );
        self.resources
            .iter()
            .find(|(k, _)| k.ends_with(&suffix))
            .map(|(_, v)| v)
    }

    /// Handles a Key Vault data-plane request: `/_kv/{vault}/keys/...`.
    pub fn key_vault(&mut self, req: &Req, caller: &str) -> Resp {
        let now = Instant::now();
        if req.query.get("api-version").is_none_or(|v| v.is_empty()) {
            return Resp::vault_error(400, "BadParameter", None, "api-version is required");
        }
        let vault_name = req.segments[1].clone();
        let Some(vault) = self.find_vault(&vault_name).cloned() else {
            // The vault's host does not resolve: what a client sees is a connection error, but
            // on loopback the nearest honest answer is 404.
            return Resp::vault_error(
                404,
                "VaultNotFound",
                None,
                format!("The vault '{vault_name}' does not exist."),
            );
        };
        let acls = &vault["properties"]["networkAcls"];
        let public_disabled = vault["properties"]["publicNetworkAccess"] == "Disabled";
        if public_disabled
            || (acls["defaultAction"] == "Deny"
                && !acls["ipRules"].as_array().is_some_and(|r| {
                    r.iter().any(|ip| {
                        ip["value"]
                            .as_str()
                            .is_some_and(|v| v.starts_with("127.0.0.1"))
                    })
                }))
        {
            return Resp::vault_error(403, "Forbidden", Some("ForbiddenByFirewall"), "Client address is not authorized and caller is not a trusted service.\r\nClient address: 127.0.0.1\r\nCaller: appid=sandbox;oid=".to_owned() + caller);
        }
        if vault["properties"]["enableRbacAuthorization"] != true {
            return Resp::vault_error(
                403,
                "Forbidden",
                Some("AccessDenied"),
                "The user, group or application does not have keys permissions on key vault; the vault uses access policies, and kmsflow expects RBAC authorization.",
            );
        }
        let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
        let write = req.method != "GET";
        let roles: &[&str] = if write {
            &[CRYPTO_OFFICER]
        } else {
            &[CRYPTO_OFFICER, CRYPTO_USER]
        };
        let vault_id = vault["id"].as_str().unwrap_or_default().to_owned();
        if let Err(pending) = self.holds_role(caller, &vault_id, roles, now) {
            let detail = if pending {
                " If role assignments, deny assignments or role definitions were changed recently, please observe propagation time."
            } else {
                ""
            };
            return Resp::vault_error(
                403,
                "Forbidden",
                Some("ForbiddenByRbac"),
                format!(
                    "Caller is not authorized to perform action on resource.{detail}\r\nCaller: oid={caller}\r\nAction: 'Microsoft.KeyVault/vaults/keys/{}'\r\nResource: '{}'\r\nDecisionReason: 'DeniedWithNoValidRBAC'",
                    if write { "create/action" } else { "read" },
                    vault_id.to_ascii_lowercase()
                ),
            );
        }
        let vault_uri = vault["properties"]["vaultUri"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match (req.method.as_str(), &s[2..]) {
            ("POST", ["keys", key, "create"]) => {
                if !name_ok(key, 1, 127, |c| c.is_ascii_alphanumeric() || c == '-') {
                    return Resp::vault_error(
                        400,
                        "BadParameter",
                        None,
                        format!("The key name '{key}' is invalid."),
                    );
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let kty = body["kty"].as_str().unwrap_or_default();
                if !["RSA", "RSA-HSM", "EC", "EC-HSM"].contains(&kty) {
                    return Resp::vault_error(
                        400,
                        "BadParameter",
                        None,
                        "The key type (kty) is missing or not supported.",
                    );
                }
                if self
                    .deleted_keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return Resp::vault_error(
                        409,
                        "Conflict",
                        Some("ObjectIsDeletedButRecoverable"),
                        format!(
                            "Key {} is currently in a deleted but recoverable state, and its name cannot be reused; in this state, the key can only be recovered or purged.",
                            req.raw_segments[3]
                        ),
                    );
                }
                let bundle =
                    self.new_key_version(&vault_uri, &vault_name, &req.raw_segments[3], &body);
                Resp::json(200, bundle)
            }
            ("GET", ["deletedkeys", key]) => {
                match self
                    .deleted_keys
                    .get(&(vault_name.clone(), key.to_string()))
                {
                    Some((at, versions)) => Resp::json(
                        200,
                        deleted_bundle(&vault_uri, &req.raw_segments[3], *at, versions),
                    ),
                    None => deleted_key_not_found(key),
                }
            }
            ("POST", ["deletedkeys", key, "recover"]) => {
                match self
                    .deleted_keys
                    .remove(&(vault_name.clone(), key.to_string()))
                {
                    Some((_, versions)) => {
                        let latest = versions
                            .last()
                            .map(|v| v.body.clone())
                            .unwrap_or(Value::Null);
                        self.keys.insert((vault_name, key.to_string()), versions);
                        Resp::json(200, latest)
                    }
                    None => deleted_key_not_found(key),
                }
            }
            ("DELETE", ["deletedkeys", key]) => {
                match self.deleted_keys.remove(&(vault_name, key.to_string())) {
                    Some(_) => Resp::empty(204),
                    None => deleted_key_not_found(key),
                }
            }
            ("POST", ["keys", key, "rotate"]) => {
                let Some(latest) = self
                    .keys
                    .get(&(vault_name.clone(), key.to_string()))
                    .and_then(|v| v.last())
                    .cloned()
                else {
                    return key_not_found(key);
                };
                let template = json!({"kty": latest.body["key"]["kty"], "key_ops": latest.body["key"]["key_ops"], "tags": latest.body["tags"]});
                let bundle =
                    self.new_key_version(&vault_uri, &vault_name, &req.raw_segments[3], &template);
                Resp::json(200, bundle)
            }
            ("GET", ["keys", key, "versions"]) => {
                match self.keys.get(&(vault_name.clone(), key.to_string())) {
                    Some(versions) => Resp::json(
                        200,
                        json!({
                            "value": versions.iter().map(|v| json!({"kid": v.body["key"]["kid"], "attributes": v.body["attributes"], "tags": v.body["tags"]})).collect::<Vec<_>>(),
                            "nextLink": null,
                        }),
                    ),
                    None => key_not_found(key),
                }
            }
            ("PUT", ["keys", key, "rotationpolicy"]) => {
                if !self
                    .keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return key_not_found(key);
                }
                let body = req.body.clone().unwrap_or(json!({}));
                let unix = unix_now();
                let policy = json!({
                    "id": format!("{vault_uri}/keys/{}/rotationpolicy", req.raw_segments[3]),
                    "lifetimeActions": body.get("lifetimeActions").cloned().unwrap_or(json!([])),
                    "attributes": {"expiryTime": body["attributes"]["expiryTime"], "created": unix, "updated": unix},
                });
                self.rotation_policies
                    .insert((vault_name, key.to_string()), policy.clone());
                Resp::json(200, policy)
            }
            ("GET", ["keys", key, "rotationpolicy"]) => {
                if !self
                    .keys
                    .contains_key(&(vault_name.clone(), key.to_string()))
                {
                    return key_not_found(key);
                }
                match self.rotation_policies.get(&(vault_name, key.to_string())) {
                    Some(policy) => Resp::json(200, policy.clone()),
                    // A key without a policy answers with the service's default: notify only.
                    None => Resp::json(
                        200,
                        json!({
                            "id": format!("{vault_uri}/keys/{}/rotationpolicy", req.raw_segments[3]),
                            "lifetimeActions": [{"trigger": {"timeBeforeExpiry": "P30D"}, "action": {"type": "Notify"}}],
                            "attributes": {},
                        }),
                    ),
                }
            }
            ("DELETE", ["keys", key]) => {
                match self.keys.remove(&(vault_name.clone(), key.to_string())) {
                    Some(versions) => {
                        self.rotation_policies
                            .remove(&(vault_name.clone(), key.to_string()));
                        // Soft-deleted, as every key in Key Vault: recoverable until purged.
                        let at = unix_now();
                        let bundle =
                            deleted_bundle(&vault_uri, &req.raw_segments[3], at, &versions);
                        self.deleted_keys
                            .insert((vault_name, key.to_string()), (at, versions));
                        Resp::json(200, bundle)
                    }
                    None => key_not_found(key),
                }
            }
            ("GET", ["keys", key]) => match self
                .keys
                .get(&(vault_name, key.to_string()))
                .and_then(|v| v.last())
            {
                Some(latest) => Resp::json(200, latest.body.clone()),
                None => key_not_found(key),
            },
            ("GET", ["keys", key, version]) => match self
                .keys
                .get(&(vault_name, key.to_string()))
                .and_then(|v| v.iter().find(|k| k.version == *version))
            {
                Some(found) => Resp::json(200, found.body.clone()),
                None => key_not_found(key),
            },
            _ => Resp::vault_error(
                400,
                "BadParameter",
                None,
                format!(
                    "{} {} is not an operation the sandbox's Key Vault serves.",
                    req.method, req.path
                ),
            ),
        }
    }

    /// The management-plane keys API (`Keys_Get`, `Keys_CreateIfNotExist`): through ARM, so
    /// the vault's firewall does not apply; a PUT never adds a version to an existing key.
    fn management_key(&mut self, req: &Req, vault_name: &str, key_name: &str) -> Resp {
        let lower = req.path.to_ascii_lowercase();
        let vault_key = lower.split("/keys/").next().unwrap_or_default().to_owned();
        let Some(vault) = self.resources.get(&vault_key).cloned() else {
            return not_found(
                "Microsoft.KeyVault/vaults",
                &req.raw_segments[7],
                &req.raw_segments[3],
            );
        };
        let vault_uri = vault["properties"]["vaultUri"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        let key = (vault_name.to_owned(), key_name.to_owned());
        match req.method.as_str() {
            "PUT" if !self.keys.contains_key(&key) => {
                let body = req.body.clone().unwrap_or(Value::Null);
                let kty = body["properties"]["kty"]
                    .as_str()
                    .unwrap_or("RSA")
                    .to_owned();
                self.new_key_version(
                    &vault_uri,
                    vault_name,
                    &req.raw_segments[9],
                    &json!({"kty": kty}),
                );
            }
            "PUT" | "GET" => {}
            _ => return method_not_allowed(req),
        }
        let Some(latest) = self.keys.get(&key).and_then(|v| v.last()) else {
            return Resp::arm_error(
                404,
                "ResourceNotFound",
                format!(
                    "The key '{}' was not found in vault '{}'.",
                    req.raw_segments[9], req.raw_segments[7]
                ),
            );
        };
        let kid = latest.body["key"]["kid"].as_str().unwrap_or_default();
        let name = kid
            .split("/keys/")
            .nth(1)
            .and_then(|r| r.split('/').next())
            .unwrap_or(key_name)
            .to_owned();
        Resp::json(
            200,
            json!({
                "id": format!("{}/keys/{name}", vault["id"].as_str().unwrap_or_default()),
                "name": name,
                "type": "Microsoft.KeyVault/vaults/keys",
                "location": vault["location"],
                "properties": {
                    "attributes": latest.body["attributes"],
                    "kty": latest.body["key"]["kty"],
                    "keyOps": latest.body["key"]["key_ops"],
                    "keySize": 2048,
                    "keyUri": format!("{vault_uri}/keys/{name}"),
                    "keyUriWithVersion": kid,
                    "rotationPolicy": self.rotation_policies.get(&key).map(|p| json!({
                        "lifetimeActions": p["lifetimeActions"],
                        "attributes": p["attributes"],
                    })),
                },
            }),
        )
    }

    fn new_key_version(
        &mut self,
        vault_uri: &str,
        vault: &str,
        key_name: &str,
        request: &Value,
    ) -> Value {
        let version = uuid::Uuid::new_v4().simple().to_string();
        let unix = unix_now();
        let mut attributes = json!({"enabled": true, "created": unix, "updated": unix, "recoveryLevel": "Recoverable+Purgeable", "recoverableDays": 90});
        if let Some(exp) = request["attributes"]["exp"].as_i64() {
            attributes["exp"] = json!(exp);
        }
        if let Some(enabled) = request["attributes"]["enabled"].as_bool() {
            attributes["enabled"] = json!(enabled);
        }
        let bundle = json!({
            "key": {
                "kid": format!("{vault_uri}/keys/{key_name}/{version}"),
                "kty": request["kty"],
                "key_ops": request.get("key_ops").cloned().unwrap_or(json!(["encrypt", "decrypt", "sign", "verify", "wrapKey", "unwrapKey"])),
                "n": "sandbox-modulus",
                "e": "AQAB",
            },
            "attributes": attributes,
            "tags": request.get("tags").cloned().unwrap_or(json!({})),
        });
        self.keys
            .entry((vault.to_owned(), key_name.to_ascii_lowercase()))
            .or_default()
            .push(KeyVersion {
                version,
                body: bundle.clone(),
            });
        bundle
    }

    /// Finishes cluster operations whose time has come.
    fn settle(&mut self, now: Instant) {
        let due: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, op)| !op.finished && now >= op.done_at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let op = self.operations.get_mut(&id).expect("listed");
            op.finished = true;
            let cluster_key = op.cluster.clone();
            if op.deletes {
                self.resources.remove(&cluster_key);
                continue;
            }
            let body = match &op.failure {
                None => {
                    let mut body = op.result.clone();
                    body["properties"]["provisioningState"] = json!("Succeeded");
                    body
                }
                Some(_) => {
                    let mut body = op.previous.clone().unwrap_or_else(|| op.result.clone());
                    body["properties"]["provisioningState"] = json!("Failed");
                    body
                }
            };
            self.resources.insert(cluster_key, body);
        }
    }

    fn operation_status(&mut self, req: &Req, operation: &str) -> Resp {
        let Some(op) = self.operations.get(operation) else {
            return Resp::arm_error(
                404,
                "OperationNotFound",
                format!("Operation '{operation}' was not found."),
            );
        };
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        let start = chrono::Utc::now()
            - chrono::Duration::from_std(Instant::now() - op.started).unwrap_or_default();
        let mut status = json!({"name": operation, "startTime": start.to_rfc3339()});
        match (&op.failure, op.finished) {
            (_, false) => {
                status["status"] = json!("InProgress");
                let total = (op.done_at - op.started).as_secs_f64().max(0.001);
                status["percentComplete"] =
                    json!(((Instant::now() - op.started).as_secs_f64() / total * 100.0).min(99.0));
            }
            (None, true) => {
                status["status"] = json!("Succeeded");
                status["endTime"] = json!(chrono::Utc::now().to_rfc3339());
            }
            (Some((code, message)), true) => {
                status["status"] = json!("Failed");
                status["error"] = json!({"code": code, "message": message});
            }
        }
        Resp::json(200, status).header("Retry-After", "1")
    }

    /// A cluster operation's `Location`: 202 while it runs, then 204 (it succeeded) or its
    /// error.
    fn cluster_operation_result(&mut self, req: &Req, operation: &str) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        match self.operations.get(operation) {
            None => Resp::arm_error(
                404,
                "OperationNotFound",
                format!("Operation '{operation}' was not found."),
            ),
            Some(op) if !op.finished => Resp::empty(202)
                .header(
                    "Location",
                    format!(
                        "{}{}?api-version={}",
                        self.base_url,
                        req.path,
                        req.query.get("api-version").cloned().unwrap_or_default()
                    ),
                )
                .header("Retry-After", "1"),
            Some(Operation {
                failure: Some((code, message)),
                ..
            }) => Resp::arm_error(400, code, message.clone()),
            Some(_) => Resp::empty(204),
        }
    }

    fn cluster(&mut self, req: &Req, now: Instant) -> Resp {
        let name = req.raw_segments[7].clone();
        let id_key = req.path.trim_end_matches('/').to_ascii_lowercase();
        let running = self
            .operations
            .values()
            .any(|op| op.cluster == id_key && !op.finished);
        match req.method.as_str() {
            "GET" => match self.resources.get(&id_key) {
                Some(cluster) => Resp::json(200, cluster.clone()),
                None => not_found(
                    "Microsoft.ContainerService/managedClusters",
                    &name,
                    &req.raw_segments[3],
                ),
            },
            // ManagedClusters_Delete: 202 with a `Location` to poll (the cluster reads `Deleting`
            // until the operation ends), or 204 when there is nothing to delete.
            "DELETE" => {
                if running {
                    return operation_not_allowed();
                }
                let Some(cluster) = self.resources.get_mut(&id_key) else {
                    return Resp::empty(204);
                };
                cluster["properties"]["provisioningState"] = json!("Deleting");
                let location = cluster["location"].as_str().unwrap_or("eastus").to_owned();
                let operation = uuid();
                self.operations.insert(
                    operation.clone(),
                    Operation {
                        deletes: true,
                        ..Operation::on_cluster(&id_key, now, self.delays.cluster_operation)
                    },
                );
                self.settle(now);
                Resp::empty(202)
                    .header("Location", format!("{}/subscriptions/{}/providers/Microsoft.ContainerService/locations/{location}/operationresults/{operation}?api-version={}", self.base_url, self.subscription, req.query["api-version"]))
                    .header("Retry-After", "1")
            }
            "PUT" => {
                let valid_name = name_ok(&name, 1, 63, |c| {
                    c.is_ascii_alphanumeric() || c == '-' || c == '_'
                }) && name
                    .chars()
                    .next()
                    .is_some_and(|c| c.is_ascii_alphanumeric())
                    && name
                        .chars()
                        .last()
                        .is_some_and(|c| c.is_ascii_alphanumeric());
                if !valid_name {
                    return Resp::arm_error(
                        400,
                        "InvalidResourceName",
                        format!("Resource name '{name}' is invalid."),
                    );
                }
                if running {
                    return operation_not_allowed();
                }
                let existing = self.resources.get(&id_key).cloned();
                if let (Some(if_match), Some(existing)) = (&req.if_match, &existing) {
                    let etag = existing["eTag"].as_str().unwrap_or_default();
                    if if_match.trim_matches('"') != etag.trim_matches('"') && if_match != "*" {
                        return Resp::arm_error(
                            412,
                            "PreconditionFailed",
                            format!(
                                "Operation failed: the If-Match header '{if_match}' does not match the current ETag '{etag}'."
                            ),
                        );
                    }
                }
                let body = req.body.clone().unwrap_or(Value::Null);
                let Some(location) = body["location"].as_str() else {
                    return location_required();
                };
                let version = body["properties"]["kubernetesVersion"]
                    .as_str()
                    .unwrap_or_default()
                    .to_owned();
                let current = existing.as_ref().and_then(|e| {
                    e["properties"]["currentKubernetesVersion"]
                        .as_str()
                        .map(str::to_owned)
                });
                let effective_version = if version.is_empty() {
                    current.clone().unwrap_or_default()
                } else {
                    version.clone()
                };
                let security = &body["properties"]["securityProfile"];
                let infrastructure = security["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"].as_str();
                let kms = &security["azureKeyVaultKms"];
                let was_enabled = existing.as_ref().is_some_and(|e| {
                    e["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]
                        ["infrastructureEncryption"]
                        == "Enabled"
                });
                if was_enabled && infrastructure != Some("Enabled") {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        "KMS infrastructure encryption cannot be disabled once it is enabled (no downgrade).",
                    );
                }
                let wants_kms = infrastructure == Some("Enabled") || kms["enabled"] == true;
                if wants_kms && !version_at_least(&effective_version, 1, 33) {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        format!(
                            "KMS data encryption requires Kubernetes version 1.33 or later; the cluster runs '{effective_version}'."
                        ),
                    );
                }
                if wants_kms
                    && !self.feature_effective("microsoft.containerservice", "kmspmkpreview", now)
                {
                    return Resp::arm_error(
                        400,
                        "BadRequest",
                        "Feature Microsoft.ContainerService/KMSPMKPreview is not enabled. Please see https://aka.ms/aks/previews for how to enable features.",
                    );
                }
                if kms["enabled"] == true
                    && let Err(resp) = self.check_kms_request(&body)
                {
                    return resp;
                }
                let failure = if kms["enabled"] == true {
                    self.kms_access_failure(&body, now)
                } else {
                    None
                };
                let mut stored = body.clone();
                let etag = uuid();
                stored["id"] = json!(
                    existing
                        .as_ref()
                        .and_then(|e| e["id"].as_str().map(str::to_owned))
                        .unwrap_or_else(|| req.path.trim_end_matches('/').to_owned())
                );
                stored["name"] = json!(name);
                stored["type"] = json!("Microsoft.ContainerService/ManagedClusters");
                stored["eTag"] = json!(etag);
                let properties = stored["properties"]
                    .as_object_mut()
                    .map(std::mem::take)
                    .unwrap_or_default();
                let mut properties = Value::Object(properties);
                properties["kubernetesVersion"] = json!(effective_version);
                properties["currentKubernetesVersion"] = json!(effective_version);
                properties["maxAgentPools"] = json!(100);
                // Read-only: tells a cluster from another made later under the same id (a
                // create, delete, create sequence). Kept across updates.
                properties["resourceUID"] = existing
                    .as_ref()
                    .map(|e| e["properties"]["resourceUID"].clone())
                    .filter(|uid| uid.is_string())
                    .unwrap_or_else(|| json!(uuid().replace('-', "")[..24].to_owned()));
                if properties
                    .get("nodeResourceGroup")
                    .is_none_or(Value::is_null)
                {
                    properties["nodeResourceGroup"] =
                        json!(format!("MC_{}_{name}_{location}", req.raw_segments[3]));
                }
                properties["fqdn"] = json!(format!(
                    "{}-{}.hcp.{location}.azmk8s.io",
                    properties["dnsPrefix"].as_str().unwrap_or(&name),
                    &etag[..8]
                ));
                if properties.get("securityProfile").is_none() {
                    properties["securityProfile"] = json!({});
                }
                let security = &mut properties["securityProfile"];
                for field in [
                    "azureKeyVaultKms",
                    "kubernetesResourceObjectEncryptionProfile",
                ] {
                    if security.get(field).is_none() {
                        security[field] = Value::Null;
                    }
                }
                stored["properties"] = properties;
                if stored["identity"]["type"] == "UserAssigned" {
                    let ids: Vec<String> = stored["identity"]["userAssignedIdentities"]
                        .as_object()
                        .map(|m| m.keys().cloned().collect())
                        .unwrap_or_default();
                    for id in ids {
                        let identity = self.resources.get(&id.to_ascii_lowercase()).cloned();
                        if let Some(identity) = identity {
                            stored["identity"]["userAssignedIdentities"][&id] = json!({"clientId": identity["properties"]["clientId"], "principalId": identity["properties"]["principalId"]});
                        }
                    }
                } else if stored["identity"]["type"] == "SystemAssigned" {
                    let principal = existing
                        .as_ref()
                        .and_then(|e| e["identity"]["principalId"].as_str().map(str::to_owned))
                        .unwrap_or_else(uuid);
                    stored["identity"]["principalId"] = json!(principal);
                    stored["identity"]["tenantId"] = json!(self.tenant);
                }
                let creating = existing.is_none();
                let mut shown = stored.clone();
                shown["properties"]["provisioningState"] =
                    json!(if creating { "Creating" } else { "Updating" });
                let operation = uuid();
                self.operations.insert(
                    operation.clone(),
                    Operation {
                        failure,
                        result: stored,
                        previous: existing.clone(),
                        ..Operation::on_cluster(&id_key, now, self.delays.cluster_operation)
                    },
                );
                // While the operation runs, GET shows the new body as `Creating`/`Updating`.
                let mut in_progress = match &existing {
                    Some(previous) => {
                        let mut p = shown.clone();
                        if self.operations[&operation].failure.is_some() {
                            p["properties"]["securityProfile"] =
                                previous["properties"]["securityProfile"].clone();
                        }
                        p
                    }
                    None => shown.clone(),
                };
                in_progress["eTag"] = shown["eTag"].clone();
                self.resources.insert(id_key, in_progress);
                self.settle(now);
                Resp::json(if creating { 201 } else { 200 }, shown)
                    .header("Azure-AsyncOperation", format!("{}/subscriptions/{}/providers/Microsoft.ContainerService/locations/{location}/operations/{operation}?api-version={}", self.base_url, self.subscription, req.query["api-version"]))
                    .header("Retry-After", "1")
            }
            _ => method_not_allowed(req),
        }
    }

    /// Static checks AKS makes on a CMK request before accepting it.
    fn check_kms_request(&self, body: &Value) -> Result<(), Resp> {
        let kms = &body["properties"]["securityProfile"]["azureKeyVaultKms"];
        let key_id = kms["keyId"].as_str().unwrap_or_default();
        let access = kms["keyVaultNetworkAccess"].as_str().unwrap_or("Public");
        if key_id.is_empty() {
            return Err(Resp::arm_error(
                400,
                "InvalidParameter",
                "azureKeyVaultKms.keyId is required when azureKeyVaultKms is enabled.",
            ));
        }
        let Some(rest) = key_id.split("/keys/").nth(1) else {
            return Err(Resp::arm_error(
                400,
                "InvalidParameter",
                format!("azureKeyVaultKms.keyId '{key_id}' is not a valid key identifier."),
            ));
        };
        if rest.contains('/') {
            return Err(Resp::arm_error(
                400,
                "InvalidParameter",
                format!(
                    "azureKeyVaultKms.keyId '{key_id}' must not include a key version; use the versionless key identifier."
                ),
            ));
        }
        if access == "Private" && kms["keyVaultResourceId"].as_str().is_none_or(str::is_empty) {
            return Err(Resp::arm_error(
                400,
                "InvalidParameter",
                "azureKeyVaultKms.keyVaultResourceId is required when keyVaultNetworkAccess is Private.",
            ));
        }
        if body["identity"]["type"] != "UserAssigned" {
            return Err(Resp::arm_error(
                400,
                "InvalidParameter",
                "Customer-managed key KMS requires a user-assigned identity on the cluster.",
            ));
        }
        Ok(())
    }

    /// What makes AKS's KMS plugin fail to reach the key, checked when the operation runs.
    fn kms_access_failure(&self, body: &Value, now: Instant) -> Option<(String, String)> {
        let kms = &body["properties"]["securityProfile"]["azureKeyVaultKms"];
        let key_id = kms["keyId"].as_str().unwrap_or_default();
        let access = kms["keyVaultNetworkAccess"].as_str().unwrap_or("Public");
        let vault_uri = key_id.split("/keys/").next().unwrap_or_default();
        let key_name = key_id
            .split("/keys/")
            .nth(1)
            .unwrap_or_default()
            .to_ascii_lowercase();
        let vault = self.resources.values().find(|r| {
            r["type"] == "Microsoft.KeyVault/vaults"
                && r["properties"]["vaultUri"].as_str() == Some(vault_uri)
        });
        let Some(vault) = vault else {
            return Some((
                "AzureKeyVaultKmsKeyNotFound".into(),
                format!("The key '{key_id}' does not belong to any vault."),
            ));
        };
        if let Some(resource_id) = kms["keyVaultResourceId"].as_str().filter(|s| !s.is_empty())
            && !resource_id.eq_ignore_ascii_case(vault["id"].as_str().unwrap_or_default())
        {
            return Some((
                "AzureKeyVaultKmsKeyVaultMismatch".into(),
                format!("The key '{key_id}' does not belong to the key vault '{resource_id}'."),
            ));
        }
        let vault_name = vault["name"]
            .as_str()
            .unwrap_or_default()
            .to_ascii_lowercase();
        if !self.keys.contains_key(&(vault_name, key_name)) {
            return Some((
                "AzureKeyVaultKmsKeyNotFound".into(),
                format!("The key '{key_id}' was not found."),
            ));
        }
        let acls = &vault["properties"]["networkAcls"];
        if acls["defaultAction"] == "Deny" && acls["bypass"] != "AzureServices" {
            return Some(("AzureKeyVaultKmsNetworkAccessDenied".into(), "The key vault's firewall blocks AKS: set `bypass: AzureServices` so AKS can reach it as a trusted service.".into()));
        }
        if access == "Public" && vault["properties"]["publicNetworkAccess"] == "Disabled" {
            return Some((
                "AzureKeyVaultKmsNetworkAccessDenied".into(),
                "keyVaultNetworkAccess is Public but the vault disables public network access."
                    .into(),
            ));
        }
        let identities = body["identity"]["userAssignedIdentities"]
            .as_object()
            .cloned()
            .unwrap_or_default();
        let principal = identities
            .keys()
            .find_map(|id| self.resources.get(&id.to_ascii_lowercase()))
            .and_then(|identity| {
                identity["properties"]["principalId"]
                    .as_str()
                    .map(str::to_owned)
            });
        let Some(principal) = principal else {
            return Some((
                "InvalidUserAssignedIdentity".into(),
                "The cluster's user-assigned identity does not exist.".into(),
            ));
        };
        if self
            .holds_role(
                &principal,
                vault["id"].as_str().unwrap_or_default(),
                &[CRYPTO_USER, CRYPTO_OFFICER],
                now,
            )
            .is_err()
        {
            // The code and message are AKS's own (see the fidelity audit, row 2). Whether AKS
            // answers it on the PUT itself or in the operation is not known; the sandbox fails
            // the operation, which is the harder case for a client.
            return Some((
                "AzureKeyVaultKmsValidateIdentityPermissionCustomerError".into(),
                format!(
                    "The identity does not have keys encrypt/decrypt permission on key vault {vault_uri}."
                ),
            ));
        }
        None
    }
}

fn group_not_found(name: &str) -> Resp {
    Resp::arm_error(
        404,
        "ResourceGroupNotFound",
        format!("Resource group '{name}' could not be found."),
    )
}

fn method_not_allowed(req: &Req) -> Resp {
    Resp::arm_error(
        405,
        "MethodNotAllowed",
        format!(
            "The requested method '{}' is not allowed for '{}'.",
            req.method, req.path
        ),
    )
}

fn location_required() -> Resp {
    Resp::arm_error(
        400,
        "LocationRequired",
        "The location property is required for this definition.",
    )
}

fn operation_not_allowed() -> Resp {
    Resp::arm_error(
        409,
        "OperationNotAllowed",
        "Operation is not allowed: Another operation (Updating) is in progress, please wait for it to finish before starting a new operation. See https://aka.ms/aks-pending-operation for more details",
    )
}

fn not_found(kind: &str, name: &str, group: &str) -> Resp {
    Resp::arm_error(
        404,
        "ResourceNotFound",
        format!(
            "The Resource '{kind}/{name}' under resource group '{group}' was not found. For more details please go to https://aka.ms/ARMResourceNotFoundFix"
        ),
    )
}

/// A DeletedKeyBundle: the latest version, where to recover it, and when it was deleted and
/// will be purged (90 days, the default retention).
fn deleted_bundle(vault_uri: &str, key: &str, deleted_at: i64, versions: &[KeyVersion]) -> Value {
    let latest = versions
        .last()
        .map(|v| v.body.clone())
        .unwrap_or(Value::Null);
    json!({
        "recoveryId": format!("{vault_uri}/deletedkeys/{key}"),
        "deletedDate": deleted_at,
        "scheduledPurgeDate": deleted_at + 90 * 86_400,
        "key": latest["key"],
        "attributes": latest["attributes"],
        "tags": latest["tags"],
    })
}

fn deleted_key_not_found(key: &str) -> Resp {
    Resp::vault_error(
        404,
        "KeyNotFound",
        None,
        format!("Deleted Key not found: {key}"),
    )
}

fn key_not_found(key: &str) -> Resp {
    Resp::vault_error(
        404,
        "KeyNotFound",
        None,
        format!("A key with (name/id) {key} was not found in this key vault."),
    )
}

/// Instants as wall-clock milliseconds, so a persisted world keeps its clocks (a principal
/// created 2 s before a crash is still 2 s old after it).
mod stamp {
    use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

    use serde::{Deserialize, Deserializer, Serializer};

    fn wall_ms() -> i64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64)
    }

    pub fn to_ms(instant: Instant) -> i64 {
        let now = Instant::now();
        if instant <= now {
            wall_ms() - (now - instant).as_millis() as i64
        } else {
            wall_ms() + (instant - now).as_millis() as i64
        }
    }

    pub fn from_ms(ms: i64) -> Instant {
        let delta = ms - wall_ms();
        let now = Instant::now();
        if delta >= 0 {
            now + Duration::from_millis(delta as u64)
        } else {
            now.checked_sub(Duration::from_millis((-delta) as u64))
                .unwrap_or(now)
        }
    }

    pub fn serialize<S: Serializer>(instant: &Instant, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_i64(to_ms(*instant))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Instant, D::Error> {
        Ok(from_ms(i64::deserialize(deserializer)?))
    }

    pub mod optional {
        use std::time::Instant;

        use serde::{Deserialize, Deserializer, Serializer};

        pub fn serialize<S: Serializer>(
            instant: &Option<Instant>,
            serializer: S,
        ) -> Result<S::Ok, S::Error> {
            match instant {
                Some(instant) => serializer.serialize_some(&super::to_ms(*instant)),
                None => serializer.serialize_none(),
            }
        }

        pub fn deserialize<'de, D: Deserializer<'de>>(
            deserializer: D,
        ) -> Result<Option<Instant>, D::Error> {
            Ok(Option::<i64>::deserialize(deserializer)?.map(super::from_ms))
        }
    }
}

/// Everything a world holds, in a form that survives a restart.
#[derive(Serialize, Deserialize)]
struct Snapshot {
    groups: BTreeMap<String, Value>,
    features: BTreeMap<String, Feature>,
    providers: BTreeMap<String, Provider>,
    resources: BTreeMap<String, Value>,
    principals: BTreeMap<String, i64>,
    assignments: BTreeMap<String, Assignment>,
    keys: Vec<(String, String, Vec<KeyVersion>)>,
    #[serde(default)]
    deleted_keys: Vec<(String, String, i64, Vec<KeyVersion>)>,
    rotation_policies: Vec<(String, String, Value)>,
    deleted_vaults: BTreeSet<String>,
    operations: BTreeMap<String, Operation>,
}

impl World {
    /// The world as JSON that [`World::restore`] reads back.
    pub fn save(&self) -> Value {
        let snapshot = Snapshot {
            groups: self.groups.clone(),
            features: self.features.clone(),
            providers: self.providers.clone(),
            resources: self.resources.clone(),
            principals: self
                .principals
                .iter()
                .map(|(k, v)| (k.clone(), stamp::to_ms(*v)))
                .collect(),
            assignments: self.assignments.clone(),
            keys: self
                .keys
                .iter()
                .map(|((v, k), versions)| (v.clone(), k.clone(), versions.clone()))
                .collect(),
            deleted_keys: self
                .deleted_keys
                .iter()
                .map(|((v, k), (at, versions))| (v.clone(), k.clone(), *at, versions.clone()))
                .collect(),
            rotation_policies: self
                .rotation_policies
                .iter()
                .map(|((v, k), p)| (v.clone(), k.clone(), p.clone()))
                .collect(),
            deleted_vaults: self.deleted_vaults.clone(),
            operations: self.operations.clone(),
        };
        let mut saved = serde_json::to_value(snapshot).expect("the world serializes");
        // Clients keep URLs the sandbox gave them (vault URIs, key ids): a restarted sandbox
        // should come back at the same address when it can.
        saved["base_url"] = json!(self.base_url);
        saved
    }

    /// Replaces the world's resources with a saved one. Vault URIs carry the sandbox's address,
    /// which changes between processes, so they are rewritten to this one's.
    pub fn restore(&mut self, saved: Value) -> Result<(), serde_json::Error> {
        let old_base = saved["resources"]
            .as_object()
            .and_then(|r| {
                r.values()
                    .find_map(|v| v["properties"]["vaultUri"].as_str().map(str::to_owned))
            })
            .and_then(|uri| uri.split("/_kv/").next().map(str::to_owned));
        let mut text = saved.to_string();
        if let Some(old) = old_base.filter(|old| *old != self.base_url) {
            text = text.replace(&old, &self.base_url);
        }
        let snapshot: Snapshot = serde_json::from_str(&text)?;
        self.groups = snapshot.groups;
        self.features = snapshot.features;
        self.providers = snapshot.providers;
        self.resources = snapshot.resources;
        self.principals = snapshot
            .principals
            .into_iter()
            .map(|(k, v)| (k, stamp::from_ms(v)))
            .collect();
        self.assignments = snapshot.assignments;
        self.keys = snapshot
            .keys
            .into_iter()
            .map(|(v, k, versions)| ((v, k), versions))
            .collect();
        self.deleted_keys = snapshot
            .deleted_keys
            .into_iter()
            .map(|(v, k, at, versions)| ((v, k), (at, versions)))
            .collect();
        self.rotation_policies = snapshot
            .rotation_policies
            .into_iter()
            .map(|(v, k, p)| ((v, k), p))
            .collect();
        self.deleted_vaults = snapshot.deleted_vaults;
        self.operations = snapshot.operations;
        Ok(())
    }
}
