//! `azure.kms_check` against seeded worlds: each finding the on-call engineer needs, with its
//! severity.

mod support;

use kmsflow_sandbox::Faults;
use kmsflow_state::RunStatus;
use serde_json::{Value, json};
use support::Harness;

const CHECK: &str = r#"
name: check
params:
  subscription: { type: string }
  expected_mode: { type: string, default: CMK }
steps:
  - id: check
    uses: azure.kms_check
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, expected_mode: "{{params.expected_mode}}" }
outputs:
  worst: "{{steps.check.outputs.worst}}"
  findings: "{{steps.check.outputs.findings}}"
"#;

const DAY: i64 = 86_400;

/// What to change from a healthy CMK world.
#[derive(Default, Clone, Copy)]
struct Drift {
    pmk_only: bool,
    no_cluster: bool,
    expires_in_days: Option<i64>,
    created_days_ago: Option<f64>,
    no_rotation_policy: bool,
    role_removed: bool,
    firewall_open: bool,
    /// The caller holds Key Vault Crypto Officer (to rotate).
    caller_officer: bool,
    /// A Public CMK cluster that names no vault, as the spec says it may.
    public_without_vault_id: bool,
    /// The identity's Crypto User grant is on the key itself, not the vault (as Terraform
    /// modules often scope it).
    role_on_the_key: bool,
    /// The identity's Crypto User grant is on another key of the same vault.
    role_on_another_key: bool,
    /// The operator running the check has no Key Vault data role (reading the key through
    /// ARM needs one).
    caller_without_data_role: bool,
}

fn seed(h: &Harness, drift: Drift) {
    let sub = h.subscription();
    let group = format!("/subscriptions/{sub}/resourceGroups/rg-aks");
    let vault_id = format!("{group}/providers/Microsoft.KeyVault/vaults/kv-prod");
    let vault_uri = format!("{}/_kv/kv-prod", h.sandbox.base_url());
    let identity_id = format!(
        "/subscriptions/{sub}/resourcegroups/rg-aks/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-prod"
    );
    let principal = "22222222-2222-4222-8222-222222222222";
    let now = chrono::Utc::now().timestamp();
    h.sandbox.with_world(|w| {
        w.resource_group("rg-aks", "eastus");
        w.resource(json!({
            "id": vault_id, "name": "kv-prod", "type": "Microsoft.KeyVault/vaults", "location": "eastus",
            "properties": {"vaultUri": vault_uri, "enableRbacAuthorization": true, "tenantId": "t", "sku": {"family": "A", "name": "standard"},
                "networkAcls": {"defaultAction": if drift.firewall_open { "Allow" } else { "Deny" }, "bypass": "AzureServices", "ipRules": [], "virtualNetworkRules": []}},
        }));
        let created = now - (drift.created_days_ago.unwrap_or(10.0) * DAY as f64) as i64;
        let mut attributes = json!({"created": created, "updated": created});
        attributes["exp"] = json!(now + drift.expires_in_days.unwrap_or(365) * DAY);
        let key_id = w.key_with("kv-prod", "kms-key", attributes).unwrap();
        if !drift.no_rotation_policy {
            w.rotation_policy("kv-prod", "kms-key", json!({"lifetimeActions": [{"trigger": {"timeAfterCreate": "P90D"}, "action": {"type": "Rotate"}}], "attributes": {"expiryTime": "P2Y"}}));
        }
        w.resource(json!({
            "id": identity_id, "name": "id-prod", "type": "Microsoft.ManagedIdentity/userAssignedIdentities", "location": "eastus",
            "properties": {"principalId": principal, "clientId": "c", "tenantId": "t"},
        }));
        let grant_scope = if drift.role_on_the_key {
            format!("{vault_id}/keys/kms-key")
        } else if drift.role_on_another_key {
            format!("{vault_id}/keys/other-key")
        } else {
            vault_id.clone()
        };
        if !drift.role_removed {
            w.role_assignment(&grant_scope, principal, "12338af0-0e69-4776-bea7-57ae8d297424");
        }
        if !drift.caller_without_data_role {
            // Key Vault Reader: what a checker needs to read keys through ARM.
            w.role_assignment(&vault_id, "00000000-0000-4000-8000-ca11e4000001", "21090545-7ca7-4776-b22c-e363652d74d2");
        }
        if drift.caller_officer {
            w.role_assignment(&vault_id, "00000000-0000-4000-8000-ca11e4000001", "14b46e9e-c2b7-41b4-b07b-48a6ebf60603");
        }
        if drift.no_cluster {
            return;
        }
        let mut profile = json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}, "azureKeyVaultKms": null});
        let mut identity = json!({"type": "SystemAssigned"});
        if !drift.pmk_only {
            profile["azureKeyVaultKms"] = if drift.public_without_vault_id {
                json!({"enabled": true, "keyId": key_id, "keyVaultNetworkAccess": "Public"})
            } else {
                json!({"enabled": true, "keyId": key_id, "keyVaultNetworkAccess": "Private", "keyVaultResourceId": vault_id})
            };
            identity = json!({"type": "UserAssigned", "userAssignedIdentities": {identity_id.clone(): {"principalId": principal, "clientId": "c"}}});
        }
        w.resource(json!({
            "id": format!("{group}/providers/Microsoft.ContainerService/managedClusters/aks-prod"), "name": "aks-prod",
            "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus", "identity": identity,
            "properties": {"provisioningState": "Succeeded", "currentKubernetesVersion": "1.33.0", "securityProfile": profile},
        }));
    });
}

async fn check(drift: Drift, expected_mode: &str) -> (String, Vec<Value>) {
    let h = Harness::new(Faults::default()).await;
    seed(&h, drift);
    let summary = h.run(CHECK, &[("expected_mode", expected_mode)]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let outputs = summary.outputs.unwrap();
    (
        outputs["worst"].as_str().unwrap().to_owned(),
        outputs["findings"].as_array().unwrap().clone(),
    )
}

fn has(findings: &[Value], severity: &str, code: &str) -> bool {
    findings
        .iter()
        .any(|f| f["severity"] == severity && f["code"] == code)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_healthy_cmk_cluster_is_all_ok() {
    let (worst, findings) = check(Drift::default(), "CMK").await;
    assert_eq!(worst, "ok", "{findings:#?}");
    for code in [
        "infrastructure-encryption",
        "key-expiry",
        "key-age",
        "rotation-policy",
        "identity-role",
        "firewall",
    ] {
        assert!(has(&findings, "ok", code), "{code}: {findings:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_cmk_cluster_that_names_no_vault_is_judged_by_its_keys_vault() {
    let drift = Drift {
        public_without_vault_id: true,
        ..Drift::default()
    };
    let (worst, findings) = check(drift, "CMK").await;
    assert_eq!(worst, "ok", "{findings:#?}");
    assert!(!has(&findings, "fail", "vault-missing"), "{findings:#?}");
    for code in ["key-expiry", "identity-role"] {
        assert!(has(&findings, "ok", code), "{code}: {findings:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_drift_is_a_finding_with_its_severity() {
    let cases: &[(Drift, &str, &str, &str)] = &[
        (
            Drift {
                expires_in_days: Some(-1),
                ..Drift::default()
            },
            "fail",
            "fail",
            "key-expired",
        ),
        (
            Drift {
                expires_in_days: Some(10),
                ..Drift::default()
            },
            "warn",
            "warn",
            "key-expiring",
        ),
        (
            Drift {
                no_rotation_policy: true,
                ..Drift::default()
            },
            "warn",
            "warn",
            "rotation-policy-missing",
        ),
        (
            Drift {
                role_removed: true,
                ..Drift::default()
            },
            "fail",
            "fail",
            "identity-role-missing",
        ),
        (
            Drift {
                caller_without_data_role: true,
                ..Drift::default()
            },
            "warn",
            "warn",
            "key-unreadable",
        ),
        (
            Drift {
                role_on_another_key: true,
                ..Drift::default()
            },
            "fail",
            "fail",
            "identity-role-missing",
        ),
        (
            Drift {
                role_on_the_key: true,
                ..Drift::default()
            },
            "ok",
            "ok",
            "identity-role",
        ),
        (
            Drift {
                firewall_open: true,
                ..Drift::default()
            },
            "warn",
            "warn",
            "firewall-open",
        ),
        (
            Drift {
                created_days_ago: Some(120.0),
                ..Drift::default()
            },
            "warn",
            "warn",
            "rotation-overdue",
        ),
        (
            Drift {
                created_days_ago: Some(1.0 / 24.0),
                ..Drift::default()
            },
            "ok",
            "ok",
            "rotation-pickup-pending",
        ),
        (
            Drift {
                no_cluster: true,
                ..Drift::default()
            },
            "fail",
            "fail",
            "cluster-missing",
        ),
    ];
    for (drift, worst, severity, code) in cases {
        let (found_worst, findings) = check(*drift, "CMK").await;
        assert_eq!(found_worst, *worst, "{code}: {findings:#?}");
        assert!(has(&findings, severity, code), "{code}: {findings:#?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pmk_cluster_is_judged_as_pmk() {
    let (worst, findings) = check(
        Drift {
            pmk_only: true,
            ..Drift::default()
        },
        "PMK",
    )
    .await;
    assert_eq!(worst, "ok", "{findings:#?}");
    assert!(has(&findings, "ok", "infrastructure-encryption"));
    let (worst, findings) = check(
        Drift {
            pmk_only: true,
            ..Drift::default()
        },
        "CMK",
    )
    .await;
    assert_eq!(worst, "fail");
    assert!(has(&findings, "fail", "mode-mismatch"));
}

fn rotation_check_runbook() -> String {
    std::fs::read_to_string(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../runbooks/rotation-check.yaml"
    ))
    .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_overdue_key_is_rotated_when_asked_and_after_approval_unless_auto_approved() {
    // An open firewall lets this machine reach the data plane to rotate.
    let overdue = Drift {
        created_days_ago: Some(120.0),
        firewall_open: true,
        caller_officer: true,
        ..Drift::default()
    };
    let runbook = rotation_check_runbook();

    let h = Harness::new(Faults::default()).await;
    seed(&h, overdue);
    let params = [
        ("resource_group", "rg-aks"),
        ("cluster", "aks-prod"),
        ("rotate_when_overdue", "true"),
        ("auto_approve", "true"),
    ];
    let summary = h.run(&runbook, &params).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(summary.outputs.as_ref().unwrap()["worst"], "warn");
    let versions = h.sandbox.world()["keys"]["kv-prod/kms-key"]
        .as_array()
        .unwrap()
        .len();
    assert_eq!(versions, 2, "the overdue key was rotated");
    assert_eq!(
        h.step(&summary.run_id, "rotate").outcome,
        Some(kmsflow_engine::kind::Outcome::Invoked)
    );

    let h = Harness::new(Faults::default()).await;
    seed(&h, overdue);
    let summary = h.run(&runbook, &params[..3]).await;
    assert_eq!(
        summary.status,
        RunStatus::Waiting,
        "rotation waits for approval"
    );
    assert_eq!(
        h.sandbox.world()["keys"]["kv-prod/kms-key"]
            .as_array()
            .unwrap()
            .len(),
        1
    );

    let h = Harness::new(Faults::default()).await;
    seed(&h, overdue);
    let summary = h.run(&runbook, &params[..2]).await;
    assert_eq!(summary.status, RunStatus::Succeeded);
    assert_eq!(
        h.step(&summary.run_id, "rotate").status,
        kmsflow_state::StepStatus::Skipped,
        "no rotation unless asked"
    );
}
