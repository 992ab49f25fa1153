//! Created means created by this run: a create Azure refused is not recorded as the run's,
//! so a resource someone else makes meanwhile is never adopted, and never deleted by rollback.

mod support;

use kmsflow_engine::kind::Outcome;
use kmsflow_sandbox::{Faults, Rule};
use kmsflow_state::RunStatus;
use support::Harness;

const IDENTITY: &str = r#"
name: identity
params:
  subscription: { type: string }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, location: eastus }
  - id: identity
    uses: azure.identity
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, name: id-shared, location: eastus }
"#;

fn identities(h: &Harness) -> usize {
    h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities")
        .count()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_create_is_not_the_runs_so_rollback_leaves_what_another_team_made() {
    let h = Harness::new(Faults {
        rules: vec![Rule {
            method: Some("PUT".into()),
            path: "*/userAssignedIdentities/id-shared".into(),
            times: 1,
            status: 400,
            code: "InvalidRequestContent".into(),
            message: None,
        }],
        ..Faults::default()
    })
    .await;
    let refused = h.run(IDENTITY, &[]).await;
    assert_eq!(refused.status, RunStatus::Failed, "{:?}", refused.error);
    let step = h.step(&refused.run_id, "identity");
    assert_eq!(
        step.planned_outcome, None,
        "Azure refused the create: nothing of it is the run's"
    );

    // Another team (another state file, here simply another run) creates the identity.
    let other = h.run(IDENTITY, &[]).await;
    assert_eq!(other.status, RunStatus::Succeeded, "{:?}", other.error);
    assert_eq!(identities(&h), 1);

    // The first run, resumed, finds it there: it did not create it.
    let resumed = h.resume(&refused.run_id).await;
    assert_eq!(resumed.status, RunStatus::Succeeded, "{:?}", resumed.error);
    assert_eq!(
        h.step(&refused.run_id, "identity").outcome,
        Some(Outcome::Unchanged)
    );
    // Rollback does not delete the identity, nor the group this run created around it: a
    // group's deletion would take the other team's identity with it.
    let rolled_back = h.rollback(&refused.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RollbackFailed);
    let error = rolled_back.error.unwrap();
    assert!(
        error.contains("`rg-own` holds a resource this run did not create (id-shared"),
        "{error}"
    );
    assert_eq!(
        identities(&h),
        1,
        "the other team's identity survives the rollback"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_leaves_a_resource_made_again_since_under_the_same_name() {
    let h = Harness::new(Faults::default()).await;
    let ours = h.run(IDENTITY, &[]).await;
    assert_eq!(ours.status, RunStatus::Succeeded, "{:?}", ours.error);
    // Someone deletes the identity and makes one of the same name: a new principal.
    let client = h.client();
    let url = h.resource_url(
        &client,
        "rg-own",
        (
            "Microsoft.ManagedIdentity",
            "userAssignedIdentities",
            "id-shared",
        ),
        "2023-01-31",
    );
    let arm = kmsflow_steps::Service::ResourceManager;
    client
        .send(reqwest::Method::DELETE, &url, arm, None, None)
        .await
        .unwrap();
    client
        .send(
            reqwest::Method::PUT,
            &url,
            arm,
            Some(&serde_json::json!({"location": "eastus"})),
            None,
        )
        .await
        .unwrap();
    let rolled_back = h.rollback(&ours.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RollbackFailed);
    let error = rolled_back.error.unwrap();
    assert!(
        error.contains("managed identity `id-shared` is not the one this run created"),
        "{error}"
    );
    assert_eq!(identities(&h), 1, "the identity made since survives");
}

const VAULT: &str = r#"
name: vault
params:
  subscription: { type: string }
  tenant: { type: string }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, location: eastus }
  - id: vault
    uses: azure.keyvault
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, name: kv-own, location: eastus, tenant: "{{params.tenant}}" }
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
"#;

const KEY: &str = r#"
name: key
params:
  subscription: { type: string }
steps:
  - id: key
    uses: azure.keyvault_key
    with: { vault_uri: "VAULT_URI", name: kms-key }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_run_after_a_rollback_recovers_the_soft_deleted_key_of_the_same_name() {
    let h = Harness::new(Faults::default()).await;
    let vault = h.run(VAULT, &[]).await;
    assert_eq!(vault.status, RunStatus::Succeeded, "{:?}", vault.error);
    let vault_uri = h.step(&vault.run_id, "vault").outputs.unwrap()["vault_uri"]
        .as_str()
        .unwrap()
        .to_owned();
    let key = KEY.replace("VAULT_URI", &vault_uri);
    let first = h.run(&key, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    let kid = h.step(&first.run_id, "key").outputs.unwrap()["kid"].clone();
    let rolled_back = h.rollback(&first.run_id).await;
    assert_eq!(
        rolled_back.status,
        RunStatus::RolledBack,
        "{:?}",
        rolled_back.error
    );
    let world = h.sandbox.world();
    assert_eq!(
        world["deleted_keys"],
        serde_json::json!(["kv-own/kms-key"]),
        "soft-deleted, as in Key Vault"
    );
    // The name is held: a create would be 409 ObjectIsDeletedButRecoverable. The run brings
    // the key back instead.
    let again = h.run(&key, &[]).await;
    assert_eq!(again.status, RunStatus::Succeeded, "{:?}", again.error);
    assert_eq!(
        h.step(&again.run_id, "key").outputs.unwrap()["kid"],
        kid,
        "the same key, recovered, not a new one"
    );
    assert_eq!(h.sandbox.world()["deleted_keys"], serde_json::json!([]));
}
