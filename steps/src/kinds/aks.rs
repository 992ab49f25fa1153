//! What the AKS step kinds share: the preview API version that carries the KMS fields, the
//! wanted `securityProfile` for a KMS mode, and how a cluster body is changed to get there.

use kmsflow_engine::kind::{
    Change, FieldChange, OutputSpec, ParamSpec, StepError, StepPlan, ValueType,
};
use serde::Deserialize;
use serde_json::{Map, Value, json};

use super::common::pattern;

/// `securityProfile.kubernetesResourceObjectEncryptionProfile` exists only in preview API
/// versions; every call uses the same one, so a GET-modify-PUT never drops preview fields.
pub const API: &str = "2025-10-02-preview";

pub const NAME: ParamSpec =
    ParamSpec::required("name", ValueType::String, "the cluster's name").pattern(pattern::CLUSTER);
pub const KMS_MODE: ParamSpec = ParamSpec::required(
    "kms_mode",
    ValueType::String,
    "`PMK` (platform-managed keys) or `CMK` (customer-managed key)",
)
.one_of(&["PMK", "CMK"]);
pub const KEY_ID: ParamSpec = ParamSpec::optional(
    "key_id",
    ValueType::String,
    "CMK: the versionless key id (the `key_id` output of `azure.keyvault_key`)",
);
pub const KEY_VAULT_ID: ParamSpec = ParamSpec::optional(
    "key_vault_id",
    ValueType::String,
    "CMK: the vault's ARM id (required for `Private`)",
)
.pattern(pattern::RESOURCE_ID);
pub const NETWORK_ACCESS: ParamSpec = ParamSpec::optional(
    "network_access",
    ValueType::String,
    "CMK: `Public` (default) or `Private` (vault firewall with the trusted-services bypass)",
)
.one_of(&["Public", "Private"]);
pub const MIGRATE_FROM: ParamSpec = ParamSpec::optional(
    "migrate_from",
    ValueType::String,
    "the KMS mode a cluster may be moved away from (`PMK` or `CMK`): without it, a cluster that already has the other mode is refused before any write, so a runbook for enabling KMS never migrates one",
)
.one_of(&["PMK", "CMK"]);
pub const IDENTITY_ID: ParamSpec = ParamSpec::optional(
    "identity_id",
    ValueType::String,
    "CMK: the user-assigned identity's ARM id (it must hold Key Vault Crypto User on the vault)",
)
.pattern(pattern::RESOURCE_ID);

/// The KMS settings every AKS kind takes.
#[derive(Debug, Clone, Deserialize)]
pub struct Kms {
    pub kms_mode: String,
    #[serde(default)]
    pub key_id: Option<String>,
    #[serde(default)]
    pub key_vault_id: Option<String>,
    #[serde(default)]
    pub network_access: Option<String>,
    #[serde(default)]
    pub identity_id: Option<String>,
    #[serde(default)]
    pub migrate_from: Option<String>,
}

impl Kms {
    pub fn is_cmk(&self) -> bool {
        self.kms_mode == "CMK"
    }

    /// Checks what CMK needs before anything is sent.
    pub fn check(&self) -> Result<(), StepError> {
        if !self.is_cmk() {
            return Ok(());
        }
        let key_id = self.key_id.as_deref().unwrap_or_default();
        let Some((vault, rest)) = key_id.split_once("/keys/") else {
            return Err(StepError::permanent(format!(
                "CMK needs `key_id`, a key id like `https://<vault>.vault.azure.net/keys/<name>`; got `{key_id}`"
            )));
        };
        if vault.is_empty() || rest.is_empty() || rest.contains('/') {
            return Err(StepError::permanent(format!(
                "`key_id` must be versionless (`.../keys/<name>`, as the `key_id` output of `azure.keyvault_key`); got `{key_id}`"
            )));
        }
        if self.identity_id.is_none() {
            return Err(StepError::permanent(
                "CMK needs `identity_id`: the user-assigned identity AKS uses to reach the key",
            ));
        }
        if self.network_access.as_deref() == Some("Private") && self.key_vault_id.is_none() {
            return Err(StepError::permanent(
                "`network_access: Private` needs `key_vault_id`, the vault's ARM id",
            ));
        }
        Ok(())
    }

    /// Whether this step turns a CMK cluster's key off (`migrate_from: CMK` in PMK mode), as
    /// `az aks update --disable-azure-keyvault-kms` does. Enabling PMK alone leaves
    /// `azureKeyVaultKms` as it is, as `az aks update --kms-infrastructure-encryption Enabled`
    /// does.
    fn disables_cmk(&self) -> bool {
        !self.is_cmk() && self.migrate_from.as_deref() == Some("CMK")
    }

    /// The wanted `securityProfile` KMS fields.
    pub fn security_profile(&self) -> Value {
        let infrastructure = json!({"infrastructureEncryption": "Enabled"});
        if self.is_cmk() {
            let mut kms = json!({
                "enabled": true,
                "keyId": self.key_id,
                "keyVaultNetworkAccess": self.network_access.as_deref().unwrap_or("Public"),
            });
            if let Some(vault) = &self.key_vault_id {
                kms["keyVaultResourceId"] = json!(vault);
            }
            json!({"kubernetesResourceObjectEncryptionProfile": infrastructure, "azureKeyVaultKms": kms})
        } else if self.disables_cmk() {
            json!({"kubernetesResourceObjectEncryptionProfile": infrastructure, "azureKeyVaultKms": {"enabled": false}})
        } else {
            json!({"kubernetesResourceObjectEncryptionProfile": infrastructure})
        }
    }

    /// The wanted cluster identity, for CMK.
    pub fn identity(&self) -> Option<Value> {
        let id = self.identity_id.as_ref().filter(|_| self.is_cmk())?;
        Some(json!({"type": "UserAssigned", "userAssignedIdentities": {id.clone(): {}}}))
    }

    /// The fields of `cluster` that differ from what this mode wants.
    pub fn differences(&self, cluster: &Value) -> Vec<FieldChange> {
        let mut out = Vec::new();
        let profile = &cluster["properties"]["securityProfile"];
        let wanted = self.security_profile();
        let have_infra =
            &profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"];
        if *have_infra != "Enabled" {
            out.push(change("properties.securityProfile.kubernetesResourceObjectEncryptionProfile.infrastructureEncryption", have_infra, &json!("Enabled")));
        }
        let have_kms = &profile["azureKeyVaultKms"];
        if self.is_cmk() {
            for field in [
                "enabled",
                "keyId",
                "keyVaultNetworkAccess",
                "keyVaultResourceId",
            ] {
                let want = &wanted["azureKeyVaultKms"][field];
                let have = &have_kms[field];
                let same = match (want, have) {
                    (Value::String(a), Value::String(b)) => a.eq_ignore_ascii_case(b),
                    (Value::Null, _) => true,
                    (a, b) => a == b,
                };
                if !same {
                    out.push(change(
                        &format!("properties.securityProfile.azureKeyVaultKms.{field}"),
                        have,
                        want,
                    ));
                }
            }
            if let Some(id) = &self.identity_id {
                let has = cluster["identity"]["userAssignedIdentities"]
                    .as_object()
                    .is_some_and(|m| m.keys().any(|k| k.eq_ignore_ascii_case(id)));
                if cluster["identity"]["type"] != "UserAssigned" || !has {
                    out.push(change(
                        "identity",
                        &cluster["identity"],
                        &self.identity().unwrap_or_default(),
                    ));
                }
            }
        } else if self.disables_cmk() && have_kms["enabled"] == true {
            out.push(change(
                "properties.securityProfile.azureKeyVaultKms.enabled",
                &json!(true),
                &json!(false),
            ));
        }
        out
    }

    /// `cluster` changed to this mode: only `securityProfile`'s KMS fields (and the identity
    /// for CMK) are touched.
    pub fn apply_to(&self, cluster: &Value) -> Value {
        let mut body = cluster.clone();
        let wanted = self.security_profile();
        let profile = &mut body["properties"]["securityProfile"];
        if !profile.is_object() {
            *profile = json!({});
        }
        profile["kubernetesResourceObjectEncryptionProfile"] =
            wanted["kubernetesResourceObjectEncryptionProfile"].clone();
        if let Some(kms) = wanted.get("azureKeyVaultKms") {
            profile["azureKeyVaultKms"] = kms.clone();
        }
        if let Some(identity) = self.identity() {
            body["identity"] = identity;
        }
        strip_read_only(&mut body);
        body
    }
}

fn change(path: &str, from: &Value, to: &Value) -> FieldChange {
    FieldChange {
        path: path.to_owned(),
        from: from.clone(),
        to: to.clone(),
    }
}

/// Removes what ARM computes, so a PUT of a read body sends only what a client may set: the
/// fields the ManagedCluster model marks read-only, as the Azure SDK's serializer drops them
/// when `az aks update` PUTs what it read. The etag goes in `If-Match`, not the body.
pub fn strip_read_only(body: &mut Value) {
    if let Some(properties) = body["properties"].as_object_mut() {
        for field in [
            "provisioningState",
            "currentKubernetesVersion",
            "fqdn",
            "privateFQDN",
            "azurePortalFQDN",
            "powerState",
            "maxAgentPools",
            "resourceUID",
        ] {
            properties.remove(field);
        }
        for pool in properties
            .get_mut("agentPoolProfiles")
            .and_then(Value::as_array_mut)
            .into_iter()
            .flatten()
        {
            if let Some(pool) = pool.as_object_mut() {
                for field in [
                    "provisioningState",
                    "currentOrchestratorVersion",
                    "nodeImageVersion",
                    "eTag",
                ] {
                    pool.remove(field);
                }
            }
        }
    }
    if let Some(identity) = body["identity"].as_object_mut() {
        identity.remove("principalId");
        identity.remove("tenantId");
        for assigned in identity
            .get_mut("userAssignedIdentities")
            .and_then(Value::as_object_mut)
            .into_iter()
            .flat_map(|m| m.values_mut())
        {
            *assigned = json!({});
        }
    }
    if let Some(map) = body.as_object_mut() {
        for field in ["systemData", "eTag", "id", "name", "type"] {
            map.remove(field);
        }
    }
}

/// The KMS mode a cluster runs: `CMK`, `PMK` or `None`.
pub fn mode_of(cluster: &Value) -> &'static str {
    let profile = &cluster["properties"]["securityProfile"];
    if profile["azureKeyVaultKms"]["enabled"] == true {
        "CMK"
    } else if profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"]
        == "Enabled"
    {
        "PMK"
    } else {
        "None"
    }
}

/// Whether `version` (`1.33.0`) is at least 1.33.
pub fn supports_kms(version: &str) -> bool {
    let mut parts = version.split('.').map(|p| p.parse::<u64>().unwrap_or(0));
    (parts.next().unwrap_or(0), parts.next().unwrap_or(0)) >= (1, 33)
}

pub const NO_DOWNGRADE: &str =
    "KMS infrastructure encryption cannot be turned off once enabled (no downgrade)";

/// What `azure.aks_cluster` and `azure.aks_kms` return.
pub const CLUSTER_OUTPUTS: &[OutputSpec] = &[
    OutputSpec {
        name: "id",
        description: "the cluster's ARM id",
    },
    OutputSpec {
        name: "resource_uid",
        description: "its `resourceUID`, which tells it from a cluster made later under the same id; rollback deletes only that one",
    },
    OutputSpec {
        name: "name",
        description: "its name",
    },
    OutputSpec {
        name: "kms_mode",
        description: "`PMK` or `CMK`, as the cluster reports it",
    },
    OutputSpec {
        name: "security_profile",
        description: "the cluster's `securityProfile`",
    },
];

/// The outputs of [`CLUSTER_OUTPUTS`] from a cluster's body.
pub fn cluster_outputs(body: &Value) -> Map<String, Value> {
    super::common::outputs([
        ("id", body["id"].clone()),
        ("resource_uid", body["properties"]["resourceUID"].clone()),
        ("name", body["name"].clone()),
        ("kms_mode", json!(mode_of(body))),
        (
            "security_profile",
            body["properties"]["securityProfile"].clone(),
        ),
    ])
}

/// The client and the URL of cluster `name`.
pub async fn cluster_url(
    azure: &crate::azure::Azure,
    (subscription, resource_group): (&str, &str),
    name: &str,
) -> Result<(std::sync::Arc<crate::AzureClient>, url::Url), StepError> {
    super::common::resource_url(
        azure,
        (subscription, resource_group),
        ("Microsoft.ContainerService", "managedClusters", name),
        API,
    )
    .await
}

/// AKS's answer while a new grant to the cluster's identity has not reached Key Vault yet
/// (RBAC propagates in minutes): worth putting the cluster again, within a bound.
pub const PERMISSION_PROPAGATING: &str = "AzureKeyVaultKmsValidateIdentityPermissionCustomerError";

/// PUTs a cluster until AKS takes it. `body_of` makes the body from the cluster as it is now
/// (`Null` for a new one); with `if_match`, the PUT carries its etag. The cluster is read
/// again and the PUT made again when it changed meanwhile (412, or 409 `EtagMismatch` when the
/// PUT raced an operation of AKS's own), a few times; and while the identity's new key
/// permission is still propagating, with backoff, within the client's eventual-consistency
/// budget. Anything else fails the step as Azure said it.
pub async fn put_cluster(
    client: &crate::AzureClient,
    url: &url::Url,
    current: Value,
    if_match: bool,
    body_of: impl Fn(&Value) -> Value,
) -> Result<Value, StepError> {
    Ok(
        write_cluster(client, url, current, if_match, body_of, false)
            .await?
            .0,
    )
}

/// Creates a cluster the step saw absent, with `If-None-Match: *` (AKS documents it): a
/// cluster someone made meanwhile is never written over (the 412 sends the step back to
/// observe). Returns the cluster, and why it is not this step's creation if it is not.
pub async fn create_cluster(
    client: &crate::AzureClient,
    url: &url::Url,
    body: &Value,
) -> Result<(Value, Option<String>), StepError> {
    write_cluster(client, url, Value::Null, false, |_| body.clone(), true).await
}

/// [`put_cluster`] or [`create_cluster`]: the write, retried while the identity's key
/// permission propagates and (with `if_match`) when the cluster changed meanwhile.
async fn write_cluster(
    client: &crate::AzureClient,
    url: &url::Url,
    mut current: Value,
    if_match: bool,
    body_of: impl Fn(&Value) -> Value,
    create: bool,
) -> Result<(Value, Option<String>), StepError> {
    let retry = client.config().retry;
    let deadline = std::time::Instant::now() + retry.eventual_budget;
    let mut delay = retry.initial_backoff;
    let mut conflicts = 0;
    loop {
        let etag = if_match.then(|| current["eTag"].as_str()).flatten();
        let written = if create {
            client
                .create_and_wait(url, &body_of(&current), true)
                .await
                .map(|(cluster, creation)| match creation {
                    crate::client::Creation::Made => (cluster, None),
                    crate::client::Creation::Existed(why) => (cluster, Some(why)),
                })
        } else {
            client
                .write_and_wait(reqwest::Method::PUT, url, &body_of(&current), etag)
                .await
                .map(|cluster| (cluster, None))
        };
        let error = match written {
            Ok(written) => return Ok(written),
            Err(error) => error,
        };
        // A create's 412 is someone else's cluster: back to the step, which observes it.
        // A create's 412 answers its `If-None-Match: *`: someone else's cluster is there, and
        // the step must observe it, not write again.
        let changed =
            error.code() == Some("EtagMismatch") || (!create && error.status() == Some(412));
        let propagating = error.code() == Some(PERMISSION_PROPAGATING);
        if changed && conflicts < 3 {
            conflicts += 1;
            tracing::debug!(error = %error.summary(), "the cluster changed meanwhile; reading it again");
        } else if propagating && std::time::Instant::now() < deadline {
            tracing::info!(error = %error.summary(), retry_in_ms = delay.as_millis() as u64, "the identity's key permission is still propagating; putting the cluster again");
            kmsflow_engine::progress::report_waiting("the identity's key permission to propagate");
            tokio::time::sleep(delay).await;
            delay = (delay * 2).min(retry.max_backoff);
        } else {
            return Err(error.into());
        }
        if if_match {
            current = read_settled(client, url).await?;
        }
    }
}

/// Reads a cluster, waiting while an operation on it runs; `Null` if it does not exist.
pub async fn read_settled(client: &crate::AzureClient, url: &url::Url) -> Result<Value, StepError> {
    Ok(client.get_settled(url).await?.unwrap_or(Value::Null))
}

/// The plan for an existing cluster that should have `kms`: nothing, or a switch of only its
/// KMS fields, refused below Kubernetes 1.33 and marked irreversible when it turns on
/// infrastructure encryption.
///
/// `before` was read settled ([`read_settled`]): no operation runs on it. A cluster whose last
/// operation ended `Failed` (or `Canceled`) is reconciled by putting it again, even when its
/// fields already read as wanted: Azure recorded them, it did not reach them.
/// Moving a cluster off the KMS mode it has is a migration: only a step that says so
/// (`migrate_from`) may, whether or not this step's own fields already read as wanted.
fn refuse_other_mode(name: &str, kms: &Kms, before: &Value) -> Result<(), StepError> {
    let from = mode_of(before);
    if from != "None" && from != kms.kms_mode && kms.migrate_from.as_deref() != Some(from) {
        let infrastructure = &before["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]
            ["infrastructureEncryption"];
        if from == "CMK" && *infrastructure != "Enabled" {
            let key = before["properties"]["securityProfile"]["azureKeyVaultKms"]["keyId"]
                .as_str()
                .unwrap_or("?");
            return Err(StepError::permanent(format!(
                "cluster `{name}` runs legacy KMS (azureKeyVaultKms with key `{key}`, without KMS data encryption). \
                 `az aks update --kms-infrastructure-encryption Enabled` on it moves it to KMS data encryption with that same key (CMK), \
                 not to platform-managed keys, so this step does not guess: to keep the key, run `cmk-public-vault-existing-cluster` \
                 or `cmk-private-vault-existing-cluster` with it; to drop it for platform-managed keys, run `migrate-cmk-to-pmk`"
            )));
        }
        let runbook = if from == "CMK" {
            "migrate-cmk-to-pmk"
        } else {
            "migrate-pmk-to-cmk"
        };
        return Err(StepError::permanent(format!(
            "cluster `{name}` already uses {from} KMS encryption; this step enables {} and does not migrate clusters \
             (it would drop the {from} configuration): use `{runbook}`, or set `migrate_from: {from}` on the step",
            kms.kms_mode
        )));
    }
    Ok(())
}

pub fn plan_switch(name: &str, kms: &Kms, before: &Value) -> Result<StepPlan, StepError> {
    refuse_other_mode(name, kms, before)?;
    let fields = kms.differences(before);
    let state = before["properties"]["provisioningState"]
        .as_str()
        .unwrap_or("Succeeded");
    let failed = matches!(state, "Failed" | "Canceled");
    if fields.is_empty() && !failed {
        return Ok(StepPlan::unchanged(cluster_outputs(before)));
    }
    if fields.is_empty() {
        return Ok(StepPlan::change(Change::Update {
            summary: format!(
                "reconcile AKS cluster {name}: its last operation ended {state} ({} KMS encryption as wanted)",
                kms.kms_mode
            ),
            fields,
        }));
    }
    let version = before["properties"]["currentKubernetesVersion"]
        .as_str()
        .or_else(|| before["properties"]["kubernetesVersion"].as_str())
        .unwrap_or_default();
    if !supports_kms(version) {
        return Err(StepError::permanent(format!(
            "cluster `{name}` runs Kubernetes {version}; KMS data encryption needs 1.33 or later: upgrade the cluster first"
        )));
    }
    let from = mode_of(before);
    let mut plan = StepPlan::change(Change::Update {
        summary: format!(
            "switch AKS cluster {name} from {from} to {} KMS encryption",
            kms.kms_mode
        ),
        fields,
    });
    if from == "None" {
        plan.irreversible = Some(format!("{NO_DOWNGRADE} on cluster `{name}`"));
    }
    Ok(plan)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmk() -> Kms {
        Kms {
            kms_mode: "CMK".into(),
            key_id: Some("https://kv.vault.azure.net/keys/k".into()),
            key_vault_id: Some("/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/kv".into()),
            network_access: Some("Private".into()),
            identity_id: Some("/subscriptions/s/resourcegroups/rg/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id".into()),
            migrate_from: None,
        }
    }

    fn pmk() -> Kms {
        Kms {
            kms_mode: "PMK".into(),
            key_id: None,
            key_vault_id: None,
            network_access: None,
            identity_id: None,
            migrate_from: None,
        }
    }

    #[test]
    fn enabling_pmk_leaves_azure_key_vault_kms_as_az_does_and_only_a_migration_disables_it() {
        let plain = json!({"properties": {"kubernetesVersion": "1.33.0", "securityProfile": {}}});
        let enabled = pmk().apply_to(&plain);
        assert!(
            enabled["properties"]["securityProfile"]
                .get("azureKeyVaultKms")
                .is_none(),
            "{enabled}"
        );
        assert_eq!(
            enabled["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
            "Enabled"
        );
        let migrating = Kms {
            migrate_from: Some("CMK".into()),
            ..pmk()
        };
        let cmk_cluster = cmk().apply_to(&plain);
        let migrated = migrating.apply_to(&cmk_cluster);
        assert_eq!(
            migrated["properties"]["securityProfile"]["azureKeyVaultKms"],
            json!({"enabled": false})
        );
        assert_eq!(mode_of(&migrated), "PMK");
    }

    #[test]
    fn a_realistic_body_goes_back_without_its_read_only_fields() {
        let mut body = json!({
            "id": "/subscriptions/s/resourceGroups/g/providers/Microsoft.ContainerService/managedClusters/c",
            "name": "c", "type": "Microsoft.ContainerService/ManagedClusters", "eTag": "e1", "location": "eastus",
            "identity": {"type": "UserAssigned", "principalId": "p", "tenantId": "t",
                "userAssignedIdentities": {"/id/1": {"clientId": "c1", "principalId": "p1"}}},
            "properties": {
                "provisioningState": "Succeeded", "powerState": {"code": "Running"}, "maxAgentPools": 100,
                "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0", "dnsPrefix": "c",
                "fqdn": "c.hcp.eastus.azmk8s.io", "azurePortalFQDN": "c.portal", "resourceUID": "u",
                "nodeResourceGroup": "MC_g_c_eastus",
                "identityProfile": {"kubeletidentity": {"resourceId": "/k", "clientId": "k", "objectId": "o"}},
                "agentPoolProfiles": [{"name": "nodepool1", "count": 3, "provisioningState": "Succeeded",
                    "currentOrchestratorVersion": "1.33.0", "orchestratorVersion": "1.33.0", "nodeImageVersion": "AKSUbuntu", "eTag": "p1"}],
            },
        });
        strip_read_only(&mut body);
        assert_eq!(
            body,
            json!({
                "location": "eastus",
                "identity": {"type": "UserAssigned", "userAssignedIdentities": {"/id/1": {}}},
                "properties": {
                    "kubernetesVersion": "1.33.0", "dnsPrefix": "c", "nodeResourceGroup": "MC_g_c_eastus",
                    "identityProfile": {"kubeletidentity": {"resourceId": "/k", "clientId": "k", "objectId": "o"}},
                    "agentPoolProfiles": [{"name": "nodepool1", "count": 3, "orchestratorVersion": "1.33.0"}],
                },
            })
        );
    }

    #[test]
    fn pmk_on_a_legacy_kms_cluster_is_refused_saying_what_az_would_do() {
        let legacy = json!({"name": "aks-1", "properties": {"currentKubernetesVersion": "1.33.0", "provisioningState": "Succeeded",
            "securityProfile": {"azureKeyVaultKms": {"enabled": true, "keyId": "https://kv.vault.azure.net/keys/k/0123", "keyVaultNetworkAccess": "Public"}}}});
        let refused = plan_switch("aks-1", &pmk(), &legacy)
            .unwrap_err()
            .to_string();
        assert!(refused.contains("legacy KMS"), "{refused}");
        assert!(refused.contains("migrate-cmk-to-pmk"), "{refused}");
    }

    #[test]
    fn cmk_checks_reject_versioned_keys_and_missing_pieces() {
        assert!(cmk().check().is_ok());
        let versioned = Kms {
            key_id: Some("https://kv.vault.azure.net/keys/k/0123".into()),
            ..cmk()
        };
        assert!(
            versioned
                .check()
                .unwrap_err()
                .to_string()
                .contains("versionless")
        );
        let no_identity = Kms {
            identity_id: None,
            ..cmk()
        };
        assert!(no_identity.check().is_err());
    }

    #[test]
    fn applying_touches_only_kms_fields_and_a_pmk_cluster_differs_from_cmk() {
        let cluster = json!({"properties": {"kubernetesVersion": "1.33.0", "provisioningState": "Succeeded",
            "securityProfile": {"defender": {"x": 1}, "kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}}},
            "identity": {"type": "SystemAssigned"}});
        assert_eq!(mode_of(&cluster), "PMK");
        let changed = cmk().apply_to(&cluster);
        assert_eq!(
            changed["properties"]["securityProfile"]["defender"],
            json!({"x": 1})
        );
        assert_eq!(changed["properties"]["kubernetesVersion"], "1.33.0");
        assert!(changed["properties"].get("provisioningState").is_none());
        assert_eq!(mode_of(&changed), "CMK");
        let fields: Vec<String> = cmk()
            .differences(&cluster)
            .into_iter()
            .map(|f| f.path)
            .collect();
        assert!(fields.contains(&"identity".to_owned()));
        assert!(fields.contains(&"properties.securityProfile.azureKeyVaultKms.enabled".to_owned()));
        assert!(cmk().differences(&changed).is_empty());
    }
}
