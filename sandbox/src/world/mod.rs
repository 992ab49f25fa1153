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

use crate::addressing::Addressing;
use crate::faults::Delays;

mod api_versions;
mod clusters;
mod features;
mod groups;
mod identities;
mod keys;
mod operations;
mod persistence;
mod roles;
mod subscriptions;
mod vaults;

use features::{Feature, Provider};
use keys::KeyVersion;
use operations::Operation;
use persistence::stamp;
use roles::{Assignment, KeyRights};

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
    /// `If-None-Match`: `*` asks for a create only (AKS documents it on managed clusters).
    pub if_none_match: Option<String>,
    pub body: Option<Value>,
    /// The token's `oid`.
    pub caller: String,
    /// `scheme://host[:port]` as the client addressed the sandbox: status URLs are written with
    /// it, as Azure answers on the name it was asked on.
    pub origin: String,
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

/// Every resource in the sandbox.
pub struct World {
    /// Where the surfaces are, for the URLs the world writes into bodies.
    pub addressing: Addressing,
    pub subscription: String,
    /// Subscriptions besides `subscription` that the caller can see (a fleet over several).
    pub other_subscriptions: Vec<String>,
    /// How many items a list answers per page before its `nextLink`. Azure does not document
    /// the page size of managed-cluster lists; 1,000 is the default here.
    pub list_page_size: usize,
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
    /// Deleted vaults as they were, by lowercase name: `createMode: recover` brings one back
    /// (its keys stay in `keys` meanwhile, unreachable while the vault is gone).
    deleted_vault_bodies: BTreeMap<String, Value>,
    operations: BTreeMap<String, Operation>,
    /// The caller's object id (always a known principal).
    pub caller: String,
    /// Features whose registration waits for approval, lowercase `namespace/feature`.
    approval_required: BTreeSet<String>,
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

fn name_ok(name: &str, min: usize, max: usize, allowed: impl Fn(char) -> bool) -> bool {
    (min..=max).contains(&name.len()) && name.chars().all(allowed)
}

impl World {
    pub fn new(
        addressing: Addressing,
        subscription: String,
        tenant: String,
        caller: String,
        delays: Delays,
    ) -> World {
        World {
            addressing,
            subscription,
            other_subscriptions: Vec::new(),
            list_page_size: 1_000,
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
            deleted_vault_bodies: BTreeMap::new(),
            operations: BTreeMap::new(),
            caller,
            approval_required: BTreeSet::new(),
        }
    }

    /// Takes the world's part of a fault configuration: the delays of eventual consistency
    /// and the features that need approval.
    pub fn configure(&mut self, faults: &crate::faults::Faults) {
        self.delays = faults.delays;
        self.approval_required = faults
            .approval_required
            .iter()
            .map(|f| f.to_ascii_lowercase())
            .collect();
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
        let surface = api_versions::Surface::of(&req.segments);
        if let Some(refused) = api_versions::check(surface, &req.query["api-version"], req) {
            return refused;
        }
        let s: Vec<&str> = req.segments.iter().map(String::as_str).collect();
        match s.as_slice() {
            ["subscriptions"] => return self.subscriptions(req, false),
            ["tenants"] => return self.tenants(req),
            _ => {}
        }
        if s.first() != Some(&"subscriptions") {
            return Resp::arm_error(
                404,
                "InvalidResourceType",
                format!(
                    "The resource type could not be found for path '{}'.",
                    req.path
                ),
            );
        }
        if !s.get(1).is_some_and(|sub| self.has_subscription(sub)) {
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
        if let Some(position) = s
            .windows(2)
            .position(|w| w == ["providers", "microsoft.authorization"])
            && s.get(position + 2) == Some(&"roledefinitions")
        {
            return self
                .role_definitions(req, req.raw_segments.get(position + 3).map(String::as_str));
        }
        // Everything inside a resource group needs the group.
        if let ["subscriptions", _, "resourcegroups", group, _, ..] = s.as_slice()
            && !self.groups.contains_key(*group)
        {
            return group_not_found(&req.raw_segments[3]);
        }
        match s.as_slice() {
            ["subscriptions", _] => self.subscriptions(req, true),
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
                subscription,
                "providers",
                "microsoft.containerservice",
                "managedclusters",
            ] => {
                let subscription = subscription.to_string();
                self.clusters_in_subscription(req, &subscription)
            }
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

/// Requests and worlds for the surfaces' unit tests.
#[cfg(test)]
pub(crate) mod testing {
    use super::*;

    pub(crate) fn request(method: &str, path: &str, api_version: &str, body: Option<Value>) -> Req {
        let raw: Vec<String> = path
            .trim_matches('/')
            .split('/')
            .map(str::to_owned)
            .collect();
        let mut query = BTreeMap::new();
        let (path, filter) = path.split_once('?').unwrap_or((path, ""));
        if let Some(filter) = filter.strip_prefix("$filter=") {
            query.insert("$filter".to_owned(), filter.to_owned());
        }
        let raw: Vec<String> = if filter.is_empty() {
            raw
        } else {
            path.trim_matches('/')
                .split('/')
                .map(str::to_owned)
                .collect()
        };
        query.insert("api-version".to_owned(), api_version.to_owned());
        Req {
            method: method.into(),
            path: path.into(),
            segments: raw.iter().map(|s| s.to_ascii_lowercase()).collect(),
            raw_segments: raw,
            query,
            if_match: None,
            if_none_match: None,
            body,
            caller: "caller".into(),
            origin: "https://management.sandbox.localhost:1".into(),
        }
    }

    pub(crate) fn get(path: &str, api_version: &str) -> Req {
        request("GET", path, api_version, None)
    }

    pub(crate) fn world() -> World {
        World::new(
            Addressing::Hosts { port: 1 },
            "sub-1".into(),
            "tenant-1".into(),
            "caller".into(),
            Delays::default(),
        )
    }
}
