//! The AKS kinds against the sandbox: a new PMK cluster, a PMK → CMK migration of an existing
//! cluster and its rollback, Kubernetes < 1.33 refused, and a 409 during a cluster operation.

mod support;

use std::time::Duration;

use kmsflow_engine::kind::Outcome;
use kmsflow_sandbox::{Delays, Faults, Rule};
use kmsflow_state::RunStatus;
use serde_json::{Value, json};
use support::Harness;

fn quick_clusters() -> Faults {
    Faults {
        delays: Delays {
            cluster_operation: Duration::from_millis(300),
            ..Delays::default()
        },
        ..Faults::default()
    }
}

const PMK_NEW: &str = r#"
name: pmk-new
params:
  subscription: { type: string }
steps:
  - id: feature
    uses: azure.feature
    with: { subscription: "{{params.subscription}}", poll_interval: 50ms }
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, location: eastus }
  - id: cluster
    uses: azure.aks_cluster
    needs: [feature, group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-pmk, location: eastus, kms_mode: PMK }
  - id: verify
    uses: azure.aks_verify
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: "{{steps.cluster.outputs.name}}", expected_mode: PMK }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_new_pmk_cluster_is_created_verified_and_then_left_alone() {
    let h = Harness::new(quick_clusters()).await;
    let first = h.run(PMK_NEW, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    assert_eq!(
        h.step(&first.run_id, "cluster").outcome,
        Some(Outcome::Created)
    );
    let profile = &h.step(&first.run_id, "verify").outputs.unwrap()["security_profile"];
    assert_eq!(
        profile["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
        "Enabled"
    );
    let mark = h.sandbox.requests().len();
    let second = h.run(PMK_NEW, &[]).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(h.writes_since(mark), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pmk_is_refused_until_the_feature_is_registered() {
    let h = Harness::new(quick_clusters()).await;
    let without_feature = PMK_NEW.replace("needs: [feature, group]", "needs: [group]").replace(
        "  - id: feature\n    uses: azure.feature\n    with: { subscription: \"{{params.subscription}}\", poll_interval: 50ms }\n",
        "",
    );
    let summary = h.run(&without_feature, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = h.step(&summary.run_id, "cluster").error.unwrap();
    assert!(
        error.contains("400 BadRequest") && error.contains("KMSPMKPreview is not enabled"),
        "{error}"
    );
}

fn existing_cluster(subscription: &str, version: &str, pmk: bool) -> Value {
    let profile = if pmk {
        json!({"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}, "azureKeyVaultKms": null})
    } else {
        json!({"kubernetesResourceObjectEncryptionProfile": null, "azureKeyVaultKms": null})
    };
    json!({
        "id": format!("/subscriptions/{subscription}/resourceGroups/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-prod"),
        "name": "aks-prod",
        "type": "Microsoft.ContainerService/ManagedClusters",
        "location": "eastus",
        "eTag": "etag-1",
        "identity": {"type": "SystemAssigned", "principalId": "11111111-1111-4111-8111-111111111111", "tenantId": "t"},
        "properties": {
            "provisioningState": "Succeeded",
            "kubernetesVersion": version,
            "currentKubernetesVersion": version,
            "dnsPrefix": "aks-prod",
            "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
            "securityProfile": profile,
        },
    })
}

const MIGRATE: &str = r#"
name: migrate-pmk-to-cmk
params:
  subscription: { type: string }
  tenant: { type: string }
  network_access: { type: string, default: Private, enum: [Public, Private] }
steps:
  - id: vault
    uses: azure.keyvault
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: kv-aks-prod, location: eastus, tenant: "{{params.tenant}}" }
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
  - id: key
    uses: azure.keyvault_key
    needs: [officer]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", name: kms-key }
  - id: firewall
    uses: azure.keyvault_network
    needs: [key]
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: kv-aks-prod }
  - id: identity
    uses: azure.identity
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: id-aks-prod, location: eastus }
  - id: crypto-user
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto User, principal: "{{steps.identity.outputs.principal_id}}" }
  - id: contributor
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Contributor, principal: "{{steps.identity.outputs.principal_id}}" }
  - id: switch
    uses: azure.aks_kms
    needs: [firewall, crypto-user, contributor]
    with:
      subscription: "{{params.subscription}}"
      resource_group: rg-aks
      name: aks-prod
      kms_mode: CMK
      migrate_from: PMK
      key_id: "{{steps.key.outputs.key_id}}"
      key_vault_id: "{{steps.vault.outputs.id}}"
      network_access: "{{params.network_access}}"
      identity_id: "{{steps.identity.outputs.id}}"
  - id: verify
    uses: azure.aks_verify
    needs: [switch]
    with:
      subscription: "{{params.subscription}}"
      resource_group: rg-aks
      name: aks-prod
      expected_mode: CMK
      key_id: "{{steps.key.outputs.key_id}}"
      network_access: "{{params.network_access}}"
"#;

fn seed(h: &Harness, version: &str, pmk: bool) {
    let cluster = existing_cluster(&h.subscription(), version, pmk);
    h.sandbox.with_world(|w| {
        w.resource_group("rg-aks", "eastus");
        w.feature_registered("Microsoft.ContainerService", "KMSPMKPreview");
        w.resource(cluster);
    });
}

fn cluster_of(h: &Harness) -> Value {
    h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "aks-prod")
        .cloned()
        .unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_pmk_cluster_migrates_to_cmk_and_rolls_back_to_pmk() {
    let h = Harness::new(quick_clusters()).await;
    seed(&h, "1.33.0", true);
    let summary = h.run(MIGRATE, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let cluster = cluster_of(&h);
    let kms = &cluster["properties"]["securityProfile"]["azureKeyVaultKms"];
    assert_eq!(kms["enabled"], true);
    assert_eq!(kms["keyVaultNetworkAccess"], "Private");
    assert!(kms["keyId"].as_str().unwrap().ends_with("/keys/kms-key"));
    assert_eq!(cluster["identity"]["type"], "UserAssigned");

    let rolled = h.rollback(&summary.run_id).await;
    assert_eq!(rolled.status, RunStatus::RolledBack, "{:?}", rolled.error);
    let cluster = cluster_of(&h);
    assert_eq!(
        cluster["properties"]["securityProfile"]["azureKeyVaultKms"]["enabled"],
        false
    );
    assert_eq!(
        cluster["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"],
        "Enabled"
    );
    assert_eq!(cluster["identity"]["type"], "SystemAssigned");
    let world = h.sandbox.world();
    assert_eq!(world["role_assignments"].as_array().unwrap().len(), 0);
    assert_eq!(
        world["resources"].as_array().unwrap().len(),
        1,
        "only the pre-existing cluster is left: {world:#}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_below_1_33_is_refused_before_any_change() {
    let h = Harness::new(quick_clusters()).await;
    seed(&h, "1.32.7", false);
    let only_switch = r#"
name: pmk-existing
params:
  subscription: { type: string }
steps:
  - id: switch
    uses: azure.aks_kms
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, kms_mode: PMK }
"#;
    let mark = h.sandbox.requests().len();
    let summary = h.run(only_switch, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = h.step(&summary.run_id, "switch").error.unwrap();
    assert!(
        error.contains("runs Kubernetes 1.32.7") && error.contains("1.33"),
        "{error}"
    );
    assert_eq!(h.writes_since(mark), vec![]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn enabling_pmk_is_a_point_of_no_return_and_survives_a_409() {
    let mut faults = quick_clusters();
    faults.rules.push(Rule {
        method: Some("PUT".into()),
        path: "*/managedClusters/*".into(),
        times: 1,
        status: 409,
        code: "OperationNotAllowed".into(),
        message: None,
    });
    let h = Harness::new(faults).await;
    seed(&h, "1.33.0", false);
    let enable = r#"
name: pmk-existing
params:
  subscription: { type: string }
steps:
  - id: switch
    uses: azure.aks_kms
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, kms_mode: PMK }
"#;
    let compiled = kmsflow_engine::compile(
        &kmsflow_engine::RunbookSource::new("t", enable),
        &h.engine.registry,
    )
    .unwrap();
    let params = kmsflow_engine::params::bind(
        &compiled,
        &kmsflow_engine::params::ParamSources {
            cli: vec![("subscription".into(), h.subscription())],
            ..Default::default()
        },
    )
    .unwrap();
    let previews = kmsflow_engine::preview::preview(&compiled, &params, &h.engine.registry).await;
    assert!(
        previews[0]
            .irreversible
            .as_deref()
            .unwrap()
            .contains("cannot be turned off"),
        "{previews:?}"
    );
    let summary = h.run(enable, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert!(
        h.sandbox.requests().iter().any(|r| r.status == 409),
        "the 409 happened and was retried"
    );
    assert_eq!(
        cluster_of(&h)["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]
            ["infrastructureEncryption"],
        "Enabled"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_if_match_conflict_is_read_again_and_retried() {
    let mut faults = quick_clusters();
    faults.rules.push(Rule {
        method: Some("PUT".into()),
        path: "*/managedClusters/*".into(),
        times: 1,
        status: 412,
        code: "PreconditionFailed".into(),
        message: None,
    });
    let h = Harness::new(faults).await;
    seed(&h, "1.33.0", false);
    let enable = r#"
name: pmk-existing
params:
  subscription: { type: string }
steps:
  - id: switch
    uses: azure.aks_kms
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, kms_mode: PMK }
"#;
    let summary = h.run(enable, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let requests = h.sandbox.requests();
    let puts: Vec<u16> = requests
        .iter()
        .filter(|r| r.method == "PUT")
        .map(|r| r.status)
        .collect();
    assert_eq!(
        puts,
        vec![412, 200],
        "one 412, then a PUT on what was read again"
    );
}

const PMK_SWITCH_AND_VERIFY: &str = r#"
name: pmk-switch
params:
  subscription: { type: string }
steps:
  - id: switch
    uses: azure.aks_kms
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, kms_mode: PMK }
  - id: verify
    uses: azure.aks_verify
    needs: [switch]
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, expected_mode: PMK }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_still_updating_is_waited_for_not_taken_as_done() {
    let h = Harness::new(Faults {
        delays: Delays {
            cluster_operation: Duration::from_millis(1_500),
            ..Delays::default()
        },
        ..Faults::default()
    })
    .await;
    seed(&h, "1.33.0", false);
    // Someone (a run that died, another operator) already asked for this very change: the
    // cluster has the wanted fields but its operation is still running.
    let client = h.client();
    let url = h.resource_url(
        &client,
        "rg-aks",
        ("Microsoft.ContainerService", "managedClusters", "aks-prod"),
        "2026-01-02-preview",
    );
    let wanted = existing_cluster(&h.subscription(), "1.33.0", true);
    client
        .send(
            reqwest::Method::PUT,
            &url,
            kmsflow_steps::Service::ResourceManager,
            Some(&wanted),
            None,
        )
        .await
        .unwrap();
    assert_eq!(
        cluster_of(&h)["properties"]["provisioningState"],
        "Updating"
    );
    let summary = h.run(PMK_SWITCH_AND_VERIFY, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(
        cluster_of(&h)["properties"]["provisioningState"],
        "Succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_whose_operation_failed_is_applied_again_not_taken_as_done() {
    let h = Harness::new(quick_clusters()).await;
    let mut failed = existing_cluster(&h.subscription(), "1.33.0", true);
    failed["properties"]["provisioningState"] = json!("Failed");
    h.sandbox.with_world(|w| {
        w.resource_group("rg-aks", "eastus");
        w.feature_registered("Microsoft.ContainerService", "KMSPMKPreview");
        w.resource(failed);
    });
    let mark = h.sandbox.requests().len();
    let summary = h.run(PMK_SWITCH_AND_VERIFY, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(
        h.step(&summary.run_id, "switch").outcome,
        Some(Outcome::Updated),
        "a Failed cluster is reconciled, even with the wanted fields"
    );
    let puts = h
        .writes_since(mark)
        .into_iter()
        .filter(|r| r.method == "PUT")
        .count();
    assert_eq!(puts, 1);
    assert_eq!(
        cluster_of(&h)["properties"]["provisioningState"],
        "Succeeded"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cmk_switch_waits_out_permission_propagation_and_an_etag_race() {
    let h = Harness::new(Faults {
        delays: Delays {
            rbac_propagation: Duration::from_millis(1_500),
            cluster_operation: Duration::from_millis(200),
            ..Delays::default()
        },
        rules: vec![Rule {
            method: Some("PUT".into()),
            path: "*/managedClusters/aks-prod".into(),
            times: 1,
            status: 409,
            code: "EtagMismatch".into(),
            message: Some("Operation is not allowed: Another operation is in progress".into()),
        }],
        ..Faults::default()
    })
    .await;
    seed(&h, "1.33.0", true);
    // Grant Crypto User last, right before the switch, as a run that lost time elsewhere would.
    let late_grant = MIGRATE.replace(
        "  - id: crypto-user\n    uses: azure.role_assignment\n",
        "  - id: crypto-user\n    uses: azure.role_assignment\n    needs: [firewall]\n",
    );
    assert_ne!(late_grant, MIGRATE);
    let summary = h.run(&late_grant, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let puts: Vec<u16> = h
        .sandbox
        .requests()
        .iter()
        .filter(|r| {
            r.method == "PUT" && r.path.to_lowercase().ends_with("/managedclusters/aks-prod")
        })
        .map(|r| r.status)
        .collect();
    assert!(
        puts.len() >= 3 && puts[0] == 409,
        "a racing PUT (409), one whose operation failed while the grant propagated, then one that took: {puts:?}"
    );
    let kms = &cluster_of(&h)["properties"]["securityProfile"]["azureKeyVaultKms"];
    assert_eq!(kms["enabled"], true);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rolling_back_a_new_cluster_follows_its_delete_to_the_end() {
    let h = Harness::new(quick_clusters()).await;
    let created = h.run(PMK_NEW, &[]).await;
    assert_eq!(created.status, RunStatus::Succeeded, "{:?}", created.error);
    let mark = h.sandbox.requests().len();
    let rolled_back = h.rollback(&created.run_id).await;
    // The cluster's delete takes a while (202, `Location`); the group is deleted only once the
    // cluster is gone, since nothing the run did not create may be left in it.
    assert_eq!(
        rolled_back.status,
        RunStatus::RolledBack,
        "{:?}",
        rolled_back.error
    );
    let requests = &h.sandbox.requests()[mark..];
    let delete = requests
        .iter()
        .find(|r| {
            r.method == "DELETE" && r.path.to_lowercase().ends_with("/managedclusters/aks-pmk")
        })
        .expect("the cluster was deleted");
    assert_eq!(delete.status, 202);
    assert!(
        requests
            .iter()
            .any(|r| r.method == "GET" && r.path.contains("/operationresults/")),
        "its operation was followed"
    );
    let clusters = h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["name"] == "aks-pmk")
        .count();
    assert_eq!(clusters, 0);
}
