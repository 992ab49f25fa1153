//! `azure.kms_check`: reads a cluster, its key, vault and roles, and judges whether KMS data
//! encryption is still healthy. Reads only: its plan is always "no change", and what it finds
//! are findings (ok, warn, fail) in its outputs, not errors, so one bad cluster is a report,
//! not a crash.

use std::sync::Arc;

use async_trait::async_trait;
use chrono::{DateTime, Duration, Utc};
use kmsflow_engine::kind::*;
use serde::{Deserialize, Serialize};
use serde_json::{Value, json};

use super::aks::{self, NAME};
use super::common::{self, RESOURCE_GROUP, SUBSCRIPTION, outputs, pattern};
use super::role_assignment::role_guid;
use crate::azure::Azure;

/// How bad a finding is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Severity {
    Ok,
    Warn,
    Fail,
}

/// One thing the check found: what, how bad, and the evidence.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Finding {
    pub severity: Severity,
    pub code: String,
    pub message: String,
    pub evidence: Value,
}

fn finding(severity: Severity, code: &str, message: impl Into<String>, evidence: Value) -> Finding {
    Finding {
        severity,
        code: code.to_owned(),
        message: message.into(),
        evidence,
    }
}

/// AKS's KMS controller re-reads a versionless key every 6 hours.
const PICKUP: Duration = Duration::hours(6);

pub struct KmsCheck(pub Arc<Azure>);

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
    key_vault_id: Option<String>,
    #[serde(default = "thirty")]
    expiry_warning_days: i64,
    #[serde(default = "ninety")]
    max_key_age_days: i64,
}

fn thirty() -> i64 {
    30
}
fn ninety() -> i64 {
    90
}

static SPEC: KindSpec = KindSpec {
    name: "azure.kms_check",
    summary: "Judges a cluster's KMS encryption without changing anything. PMK: infrastructure encryption is on. CMK: the key id is versionless and in the expected vault; the key exists, is enabled and not expired (warn inside `expiry_warning_days`, fail past it); its newest version is younger than `max_key_age_days` (warn when rotation is overdue; a version younger than 6 hours is ok, pickup pending); a rotation policy exists (warn if not); the cluster's identity still holds Key Vault Crypto User on the vault; for `Private`, the vault still denies by default with the AzureServices bypass. A cluster that cannot be read is a `fail` finding. Outputs every finding with its evidence, and the worst severity.",
    params: &[
        SUBSCRIPTION,
        RESOURCE_GROUP,
        NAME,
        ParamSpec::required("expected_mode", ValueType::String, "`PMK` or `CMK`")
            .one_of(&["PMK", "CMK"]),
        ParamSpec::optional(
            "network_access",
            ValueType::String,
            "CMK: the expected `Public` or `Private` (default: what the cluster says)",
        )
        .one_of(&["Public", "Private"]),
        ParamSpec::optional(
            "key_vault_id",
            ValueType::String,
            "CMK: the vault the key must be in (default: the cluster's keyVaultResourceId)",
        )
        .pattern(pattern::RESOURCE_ID),
        ParamSpec::optional(
            "expiry_warning_days",
            ValueType::Int,
            "warn when the key expires within this many days (default 30)",
        ),
        ParamSpec::optional(
            "max_key_age_days",
            ValueType::Int,
            "warn when the newest key version is older (default 90)",
        ),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "findings",
            description: "every finding: severity, code, message, evidence",
        },
        OutputSpec {
            name: "worst",
            description: "the worst severity: `ok`, `warn` or `fail`",
        },
        OutputSpec {
            name: "mode",
            description: "the cluster's KMS mode: `PMK`, `CMK` or `None`",
        },
        OutputSpec {
            name: "rotation_overdue",
            description: "whether the key's newest version is older than `max_key_age_days`, or the key expired or expires soon",
        },
        OutputSpec {
            name: "vault_uri",
            description: "the data-plane URI of the key's vault (empty for PMK)",
        },
        OutputSpec {
            name: "key_name",
            description: "the key's name (empty for PMK)",
        },
    ]),
    may_be_irreversible: false,
};

fn date(unix: Option<i64>) -> Option<DateTime<Utc>> {
    unix.and_then(|u| DateTime::from_timestamp(u, 0))
}

impl KmsCheck {
    /// The resource id of the vault whose `vaultUri` the key id starts with, among the
    /// subscription's vaults (Vaults - List By Subscription, every page).
    async fn vault_of_key(
        &self,
        client: &crate::AzureClient,
        subscription: &str,
        key_id: &str,
    ) -> Result<Option<String>, StepError> {
        let Some((vault_uri, _)) = key_id.split_once("/keys/") else {
            return Ok(None);
        };
        let wanted = vault_uri
            .trim_end_matches('/')
            .replacen(":443", "", 1)
            .to_ascii_lowercase();
        let url = client.arm_url(
            &[
                "subscriptions",
                subscription,
                "providers",
                "Microsoft.KeyVault",
                "vaults",
            ],
            super::keyvault::API,
        )?;
        let Some(vaults) = client.list_all(&url).await? else {
            return Ok(None);
        };
        Ok(vaults.iter().find_map(|vault| {
            let uri = vault["properties"]["vaultUri"]
                .as_str()
                .unwrap_or_default()
                .trim_end_matches('/')
                .replacen(":443", "", 1)
                .to_ascii_lowercase();
            (uri == wanted)
                .then(|| vault["id"].as_str().map(str::to_owned))
                .flatten()
        }))
    }

    /// Reads everything the judgement needs; missing pieces are recorded, not errors.
    async fn gather(&self, p: &Params) -> Result<Value, StepError> {
        let (client, url) =
            aks::cluster_url(&self.0, (&p.subscription, &p.resource_group), &p.name).await?;
        let cluster = match client.get(&url).await {
            Ok(found) => found.map(|r| r.body).unwrap_or(Value::Null),
            Err(error) if matches!(error.status(), Some(401 | 403)) => {
                return Ok(json!({"unreachable": error.to_string()}));
            }
            Err(error) => return Err(error.into()),
        };
        if cluster.is_null() {
            return Ok(json!({"missing": true}));
        }
        let kms = &cluster["properties"]["securityProfile"]["azureKeyVaultKms"];
        if kms["enabled"] != true {
            return Ok(json!({"cluster": cluster}));
        }
        let mut vault_id = p.key_vault_id.clone().or_else(|| {
            kms["keyVaultResourceId"]
                .as_str()
                .filter(|s| !s.is_empty())
                .map(str::to_owned)
        });
        if vault_id.is_none() {
            // A Public CMK cluster need not name its vault (the spec says to leave the id
            // empty for Public): find it by the key's vault URI among the subscription's vaults.
            let key_id = kms["keyId"].as_str().unwrap_or_default();
            vault_id = self.vault_of_key(&client, &p.subscription, key_id).await?;
        }
        let mut gathered = json!({"cluster": cluster, "vault_id": vault_id});
        let Some(vault_id) = vault_id else {
            return Ok(gathered);
        };
        let vault_url = client.arm_url(&common::id_segments(&vault_id)?, super::keyvault::API)?;
        gathered["vault"] = common::read(&client, &vault_url).await?;
        let key_name = kms["keyId"]
            .as_str()
            .and_then(|k| k.split("/keys/").nth(1))
            .map(|r| r.split('/').next().unwrap_or(r).to_owned());
        if let Some(key_name) = key_name {
            let mut segments = common::id_segments(&vault_id)?;
            segments.extend(["keys", key_name.as_str()]);
            // Reading a key through ARM takes a Key Vault data role on it; without one the
            // check says so rather than waiting for a grant that is not coming.
            let url = client.arm_url(&segments, super::keyvault::API)?;
            match client.get_if_permitted(&url).await {
                Ok(key) => gathered["key"] = key.map(|r| r.body).unwrap_or(Value::Null),
                Err(error) if error.code() == Some("ForbiddenByRbac") => {
                    gathered["key_forbidden"] = json!(error.to_string());
                }
                Err(error) => return Err(error.into()),
            }
        }
        let principal = cluster["identity"]["userAssignedIdentities"]
            .as_object()
            .and_then(|m| {
                m.values()
                    .find_map(|v| v["principalId"].as_str().map(str::to_owned))
            });
        if let Some(principal) = &principal {
            let mut segments = common::id_segments(&vault_id)?;
            segments.extend(["providers", "Microsoft.Authorization", "roleAssignments"]);
            let mut url = client.arm_url(&segments, "2022-04-01")?;
            url.query_pairs_mut()
                .append_pair("$filter", &format!("principalId eq '{principal}'"));
            gathered["assignments"] = json!({"value": common::read_list(&client, &url).await?});
            gathered["principal"] = json!(principal);
        }
        Ok(gathered)
    }
}

/// Judges what `gather` read: each rule below adds its findings, and a rule that finds the
/// rest cannot be judged (no cluster, not CMK, no vault) stops the judgement there.
fn judge(p: &Params, gathered: &Value, now: DateTime<Utc>) -> Vec<Finding> {
    let mut findings = Vec::new();
    if reachable(p, gathered, &mut findings).is_break() {
        return findings;
    }
    let cluster = &gathered["cluster"];
    let profile = &cluster["properties"]["securityProfile"];
    let kms = &profile["azureKeyVaultKms"];
    let facts = Facts {
        p,
        gathered,
        now,
        cluster,
        profile,
        mode: aks::mode_of(cluster),
        key_id: kms["keyId"].as_str().unwrap_or_default(),
        access: kms["keyVaultNetworkAccess"].as_str().unwrap_or("Public"),
        vault: &gathered["vault"],
    };
    infrastructure_encryption(&facts, &mut findings);
    if kms_mode(&facts, &mut findings).is_break() {
        return findings;
    }
    key_reference(&facts, &mut findings);
    if vault_of_key(&facts, &mut findings).is_break() {
        return findings;
    }
    key_health(&facts, &mut findings);
    identity_grant(&facts, &mut findings);
    firewall(&facts, &mut findings);
    findings
}

/// What the rules read, once.
struct Facts<'a> {
    p: &'a Params,
    gathered: &'a Value,
    now: DateTime<Utc>,
    cluster: &'a Value,
    profile: &'a Value,
    mode: &'static str,
    key_id: &'a str,
    access: &'a str,
    vault: &'a Value,
}

type Judged = std::ops::ControlFlow<()>;

/// The cluster could be read and exists.
fn reachable(p: &Params, gathered: &Value, findings: &mut Vec<Finding>) -> Judged {
    use Severity::*;
    if let Some(error) = gathered["unreachable"].as_str() {
        findings.push(finding(
            Fail,
            "cluster-unreachable",
            format!("cannot read cluster `{}`: {error}", p.name),
            json!({}),
        ));
        return Judged::Break(());
    }
    if gathered["missing"] == true {
        findings.push(finding(
            Fail,
            "cluster-missing",
            format!(
                "cluster `{}` does not exist in resource group `{}`",
                p.name, p.resource_group
            ),
            json!({}),
        ));
        return Judged::Break(());
    }
    Judged::Continue(())
}

/// Secrets are encrypted with KMS at all.
fn infrastructure_encryption(f: &Facts<'_>, findings: &mut Vec<Finding>) {
    use Severity::*;
    let cluster_id = f.cluster["id"].clone();
    if f.profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"]
        == "Enabled"
    {
        findings.push(finding(
            Ok,
            "infrastructure-encryption",
            "KMS infrastructure encryption is enabled",
            json!({"cluster": cluster_id}),
        ));
    } else {
        findings.push(finding(
            Fail,
            "infrastructure-encryption-off",
            "KMS infrastructure encryption is not enabled: secrets are not encrypted with KMS",
            json!({"cluster": cluster_id, "securityProfile": f.profile}),
        ));
    }
}

/// The KMS mode is the one expected; only a CMK cluster has a key to judge further.
fn kms_mode(f: &Facts<'_>, findings: &mut Vec<Finding>) -> Judged {
    use Severity::*;
    if f.p.expected_mode == "PMK" {
        if f.mode == "CMK" {
            findings.push(finding(
                Warn,
                "mode-mismatch",
                "the cluster uses a customer-managed key, not platform-managed keys",
                json!({"mode": f.mode}),
            ));
        }
        return Judged::Break(());
    }
    if f.mode != "CMK" {
        findings.push(finding(
            Fail,
            "mode-mismatch",
            format!("the cluster's KMS mode is {}, expected CMK", f.mode),
            json!({"mode": f.mode}),
        ));
        return Judged::Break(());
    }
    Judged::Continue(())
}

/// How the cluster names its key: versionless, with the expected network access.
fn key_reference(f: &Facts<'_>, findings: &mut Vec<Finding>) {
    use Severity::*;
    let key_id = f.key_id;
    if key_id
        .split("/keys/")
        .nth(1)
        .is_some_and(|rest| rest.contains('/'))
    {
        findings.push(finding(Fail, "key-id-versioned", "the cluster's key id carries a version: rotated key versions will never be picked up; use the versionless id", json!({"keyId": key_id})));
    }
    if let Some(expected) = &f.p.network_access
        && !expected.eq_ignore_ascii_case(f.access)
    {
        findings.push(finding(
            Fail,
            "network-access-mismatch",
            format!("keyVaultNetworkAccess is {}, expected {expected}", f.access),
            json!({"keyVaultNetworkAccess": f.access}),
        ));
    }
}

/// The vault exists, and the key is in it.
fn vault_of_key(f: &Facts<'_>, findings: &mut Vec<Finding>) -> Judged {
    use Severity::*;
    let (vault, key_id) = (f.vault, f.key_id);
    if vault.is_null() {
        findings.push(finding(
            Fail,
            "vault-missing",
            "the key vault the cluster uses cannot be found",
            json!({"keyVaultResourceId": f.gathered["vault_id"]}),
        ));
        return Judged::Break(());
    }
    let vault_uri = vault["properties"]["vaultUri"]
        .as_str()
        .unwrap_or_default()
        .trim_end_matches('/');
    if !key_id
        .replacen(":443/", "/", 1)
        .starts_with(&format!("{vault_uri}/keys/"))
    {
        findings.push(finding(
            Fail,
            "key-vault-mismatch",
            format!(
                "the key `{key_id}` is not in the expected vault `{}`",
                vault["name"].as_str().unwrap_or_default()
            ),
            json!({"keyId": key_id, "vaultUri": vault_uri}),
        ));
    }
    Judged::Continue(())
}

/// The key exists, is enabled, is not expired or overdue, and rotates.
fn key_health(f: &Facts<'_>, findings: &mut Vec<Finding>) {
    use Severity::*;
    let (p, now, key_id) = (f.p, f.now, f.key_id);
    let key = &f.gathered["key"];
    if let Some(denied) = f.gathered["key_forbidden"].as_str() {
        findings.push(finding(
            Warn,
            "key-unreadable",
            "the key could not be read with this identity: give it a Key Vault data role on the vault \
             (Key Vault Reader is enough) to judge the key's expiry and rotation",
            json!({"keyId": key_id, "error": denied}),
        ));
    } else if key.is_null() {
        findings.push(finding(
            Fail,
            "key-missing",
            format!("the key `{key_id}` does not exist: the cluster cannot decrypt its secrets"),
            json!({"keyId": key_id}),
        ));
    } else {
        let attributes = &key["properties"]["attributes"];
        let evidence = json!({"keyUriWithVersion": key["properties"]["keyUriWithVersion"], "attributes": attributes});
        if attributes["enabled"] == false {
            findings.push(finding(
                Fail,
                "key-disabled",
                "the key is disabled: the cluster cannot wrap or unwrap",
                evidence.clone(),
            ));
        }
        match date(attributes["exp"].as_i64()) {
            Some(expiry) if expiry <= now => findings.push(finding(
                Fail,
                "key-expired",
                format!("the key expired on {}: rotate it now", expiry.to_rfc3339()),
                evidence.clone(),
            )),
            Some(expiry) if expiry - now <= Duration::days(p.expiry_warning_days) => {
                findings.push(finding(
                    Warn,
                    "key-expiring",
                    format!(
                        "the key expires on {} ({} days): rotate it or extend its expiry",
                        expiry.to_rfc3339(),
                        (expiry - now).num_days()
                    ),
                    evidence.clone(),
                ))
            }
            Some(expiry) => findings.push(finding(
                Ok,
                "key-expiry",
                format!("the key expires on {}", expiry.to_rfc3339()),
                evidence.clone(),
            )),
            None => findings.push(finding(
                Ok,
                "key-expiry",
                "the key has no expiry date",
                evidence.clone(),
            )),
        }
        match date(attributes["created"].as_i64()) {
            Some(created) if now - created < PICKUP => findings.push(finding(
                Ok,
                "rotation-pickup-pending",
                format!(
                    "the newest key version was created {} minutes ago: pickup pending until {}",
                    (now - created).num_minutes(),
                    (created + PICKUP).to_rfc3339()
                ),
                evidence.clone(),
            )),
            Some(created) if now - created > Duration::days(p.max_key_age_days) => {
                findings.push(finding(
                    Warn,
                    "rotation-overdue",
                    format!(
                        "the newest key version is {} days old (more than {}): rotation is overdue",
                        (now - created).num_days(),
                        p.max_key_age_days
                    ),
                    evidence.clone(),
                ))
            }
            Some(created) => findings.push(finding(
                Ok,
                "key-age",
                format!(
                    "the newest key version is {} days old",
                    (now - created).num_days()
                ),
                evidence.clone(),
            )),
            None => {}
        }
        let rotates = key["properties"]["rotationPolicy"]["lifetimeActions"]
            .as_array()
            .is_some_and(|actions| {
                actions.iter().any(|a| {
                    a["action"]["type"]
                        .as_str()
                        .is_some_and(|t| t.eq_ignore_ascii_case("Rotate"))
                })
            });
        if rotates {
            findings.push(finding(
                Ok,
                "rotation-policy",
                "the key has a rotation policy that rotates it",
                json!({"rotationPolicy": key["properties"]["rotationPolicy"]}),
            ));
        } else {
            findings.push(finding(Warn, "rotation-policy-missing", "the key has no rotation policy that rotates it: set one (e.g. rotate 90 days after creation)", json!({"rotationPolicy": key["properties"]["rotationPolicy"]})));
        }
    }
}

/// The cluster's identity still holds Crypto User (or Officer) on the vault.
fn identity_grant(f: &Facts<'_>, findings: &mut Vec<Finding>) {
    use Severity::*;
    let (gathered, cluster, vault) = (f.gathered, f.cluster, f.vault);
    // Roles whose data actions include encrypt and decrypt on keys.
    let crypto_roles: Vec<String> = [
        "Key Vault Crypto User",
        "Key Vault Crypto Officer",
        "Key Vault Administrator",
    ]
    .into_iter()
    .filter_map(|name| role_guid(name).ok())
    .collect();
    // ARM lists the assignments at, above and below the vault: only those at or above it, or
    // on this very key, let the cluster use the key.
    let vault_id = vault["id"]
        .as_str()
        .unwrap_or_default()
        .to_ascii_lowercase();
    let key_name = f
        .key_id
        .split_once("/keys/")
        .map(|(_, rest)| {
            rest.split('/')
                .next()
                .unwrap_or_default()
                .to_ascii_lowercase()
        })
        .unwrap_or_default();
    let key_scope = format!("{vault_id}/keys/{key_name}");
    let covers = |scope: &str| {
        let scope = scope.trim_end_matches('/').to_ascii_lowercase();
        scope == vault_id
            || scope == key_scope
            || vault_id.starts_with(&format!("{scope}/"))
            || scope == "/"
    };
    let holds = gathered["assignments"]["value"]
        .as_array()
        .is_some_and(|list| {
            list.iter().any(|a| {
                let role = a["properties"]["roleDefinitionId"]
                    .as_str()
                    .unwrap_or_default()
                    .to_ascii_lowercase();
                crypto_roles.iter().any(|r| role.ends_with(r.as_str()))
                    && covers(a["properties"]["scope"].as_str().unwrap_or_default())
            })
        });
    match (&gathered["principal"], holds) {
        (Value::Null, _) => findings.push(finding(
            Fail,
            "identity-missing",
            "the cluster has no user-assigned identity to reach the key",
            json!({"identity": cluster["identity"]}),
        )),
        (principal, false) => findings.push(finding(
            Fail,
            "identity-role-missing",
            "the cluster's identity no longer holds Key Vault Crypto User on the vault",
            json!({"principalId": principal, "vault": vault["id"]}),
        )),
        (principal, true) => findings.push(finding(
            Ok,
            "identity-role",
            "the cluster's identity holds Key Vault Crypto User on the vault",
            json!({"principalId": principal}),
        )),
    }
}

/// A private vault's firewall denies by default and lets Azure services through.
fn firewall(f: &Facts<'_>, findings: &mut Vec<Finding>) {
    use Severity::*;
    let acls = &f.vault["properties"]["networkAcls"];
    if f.access == "Private" {
        if acls["defaultAction"] != "Deny" {
            findings.push(finding(Warn, "firewall-open", "the vault's firewall no longer denies by default: a private vault is reachable from anywhere", json!({"networkAcls": acls})));
        } else if acls["bypass"] != "AzureServices" {
            findings.push(finding(Fail, "trusted-services-blocked", "the vault's firewall no longer lets Azure services through: AKS cannot reach the key", json!({"networkAcls": acls})));
        } else {
            findings.push(finding(
                Ok,
                "firewall",
                "the vault denies by default and lets Azure services through",
                json!({"networkAcls": acls}),
            ));
        }
    }
}

#[async_trait]
impl StepKind for KmsCheck {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let mut gathered = self.gather(&p).await?;
        // The judgement depends on the time; record it with what was read.
        gathered["checked_at"] = json!(Utc::now().timestamp());
        Ok(gathered)
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        let now = date(before["checked_at"].as_i64()).unwrap_or_else(Utc::now);
        let findings = judge(&p, before, now);
        let worst = findings
            .iter()
            .map(|f| f.severity)
            .max()
            .unwrap_or(Severity::Ok);
        let mode = if before["cluster"].is_null() {
            "None"
        } else {
            aks::mode_of(&before["cluster"])
        };
        let overdue = findings.iter().any(|f| {
            matches!(
                f.code.as_str(),
                "rotation-overdue" | "key-expired" | "key-expiring"
            )
        });
        let key_id =
            before["cluster"]["properties"]["securityProfile"]["azureKeyVaultKms"]["keyId"]
                .as_str()
                .unwrap_or_default();
        let key_name = key_id
            .split("/keys/")
            .nth(1)
            .map(|r| r.split('/').next().unwrap_or(r))
            .unwrap_or_default();
        let vault_uri = before["vault"]["properties"]["vaultUri"]
            .as_str()
            .unwrap_or_default();
        Ok(StepPlan::unchanged(outputs([
            (
                "findings",
                serde_json::to_value(&findings).expect("findings serialize"),
            ),
            (
                "worst",
                serde_json::to_value(worst).expect("severity serializes"),
            ),
            ("mode", json!(mode)),
            ("rotation_overdue", json!(overdue)),
            ("vault_uri", json!(vault_uri)),
            ("key_name", json!(key_name)),
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

    async fn prepare(&self) -> Result<(), StepError> {
        self.0.prepare().await
    }
}
