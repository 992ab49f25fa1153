//! Answers lost after Azure applied the request: the connection breaks, a front end answers
//! 500, or the client times out first. That is how clients write twice. Every write kind
//! loses one answer, and the run (resumed if it failed) must end with the world of an
//! undisturbed run: one key version, one rotation, one assignment per grant, one rotation
//! policy.

mod support;

use std::time::Duration;

use kmsflow_sandbox::{Delays, Faults, Loss, LostAnswer};
use kmsflow_state::RunStatus;
use serde_json::Value;
use support::Harness;

const ROTATE: &str = r#"  - id: rotate
    uses: azure.keyvault_rotate
    needs: [key]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", name: kms-key }"#;

const SETUP_AND_CLUSTER: &str = r#"
name: lost-answers
params:
  subscription: { type: string }
  tenant: { type: string }
steps:
  - id: feature
    uses: azure.feature
    with: { subscription: "{{params.subscription}}", poll_interval: 50ms }
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-lost, location: eastus }
  - id: vault
    uses: azure.keyvault
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-lost, name: kv-lost, location: eastus, tenant: "{{params.tenant}}" }
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
  - id: key
    uses: azure.keyvault_key
    needs: [officer]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", vault_id: "{{steps.vault.outputs.id}}", name: kms-key, rotate_after: P90D, expires_after: P2Y }
ROTATE
  - id: identity
    uses: azure.identity
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-lost, name: id-lost, location: eastus }
  - id: crypto-user
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto User, principal: "{{steps.identity.outputs.principal_id}}" }
  - id: cluster
    uses: azure.aks_cluster
    needs: [feature, crypto-user, rotate]
    with:
      subscription: "{{params.subscription}}"
      resource_group: rg-lost
      name: aks-lost
      location: eastus
      kms_mode: CMK
      key_id: "{{steps.key.outputs.key_id}}"
      key_vault_id: "{{steps.vault.outputs.id}}"
      network_access: Public
      identity_id: "{{steps.identity.outputs.id}}"
"#;

/// Every write the runbook makes, each losing its first answer.
fn every_write_loses_one_answer(how: Loss) -> Vec<LostAnswer> {
    let lose = |method: &str, path: &str| LostAnswer {
        method: Some(method.into()),
        path: path.into(),
        times: 1,
        how,
        hold_ms: 3_000,
    };
    vec![
        lose("POST", "*/features/*/register"),
        lose("PUT", "/subscriptions/*/resourcegroups/rg-lost"),
        lose("PUT", "*/vaults/kv-lost"),
        lose("PUT", "*/roleAssignments/*"),
        lose("POST", "/_kv/kv-lost/keys/kms-key/create"),
        lose("PUT", "/_kv/kv-lost/keys/kms-key/rotationpolicy"),
        lose("POST", "/_kv/kv-lost/keys/kms-key/rotate"),
        lose("PUT", "*/userAssignedIdentities/id-lost"),
        lose("PUT", "*/managedClusters/aks-lost"),
    ]
}

fn key_versions(world: &Value) -> usize {
    world["keys"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_array().unwrap().len())
        .sum()
}

/// Runs the runbook through lost answers, resuming while it fails (at most a few times), and
/// checks the world against an undisturbed run's.
async fn survive(how: Loss) {
    let faults = Faults {
        lose_answers: every_write_loses_one_answer(how),
        delays: Delays {
            cluster_operation: Duration::from_millis(200),
            ..Delays::default()
        },
        ..Faults::default()
    };
    let h = Harness::with_request_timeout(faults, Duration::from_millis(1_500)).await;
    let runbook = SETUP_AND_CLUSTER.replace("ROTATE", ROTATE);
    let mut summary = h.run(&runbook, &[]).await;
    for _ in 0..3 {
        if summary.status == RunStatus::Succeeded {
            break;
        }
        summary = h.resume(&summary.run_id).await;
    }
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let lost: Vec<String> = h
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.lost.is_some())
        .map(|r| format!("{} {}", r.method, r.path))
        .collect();
    assert_eq!(lost.len(), 9, "every write lost one answer: {lost:#?}");

    let world = h.sandbox.world();
    assert_eq!(
        key_versions(&world),
        2,
        "one version from the create and one from the rotation, however many answers were lost"
    );
    let assignments = world["role_assignments"].as_array().unwrap();
    assert_eq!(assignments.len(), 2, "one assignment per grant");
    let clusters = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| {
            r["type"].as_str().is_some_and(|t| {
                t.eq_ignore_ascii_case("Microsoft.ContainerService/managedClusters")
            })
        })
        .count();
    assert_eq!(clusters, 1);
    let mark = h.sandbox.requests().len();
    // The same runbook without its rotation (which rotates whenever it runs).
    let without_rotation = SETUP_AND_CLUSTER
        .replace("ROTATE\n", "")
        .replace(", rotate]", "]");
    let again = h.run(&without_rotation, &[]).await;
    assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
    assert_eq!(
        h.writes_since(mark),
        vec![],
        "the world is the undisturbed one: nothing left to write"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_to_a_reset_connection_write_nothing_twice() {
    survive(Loss::Reset).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_to_a_late_500_write_nothing_twice() {
    survive(Loss::ServerError).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn answers_lost_to_a_client_timeout_write_nothing_twice() {
    survive(Loss::Timeout { hold_ms: 3_000 }).await;
}
