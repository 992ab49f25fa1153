//! Every Azure step kind against the sandbox: the first run creates, the second changes
//! nothing and sends zero writes; faults are survived within the retry budgets; errors that
//! retrying cannot fix fail at once with the ARM code, message and correlation id.

mod support;

use kmsflow_engine::kind::Outcome;
use kmsflow_sandbox::{Delays, Faults, Latency, Rule, ServerErrors, Throttle};
use kmsflow_state::{RunStatus, StepStatus};
use serde_json::Value;
use std::time::Duration;
use support::Harness;

const CMK_SETUP: &str = r#"
name: cmk-setup
params:
  subscription: { type: string }
  tenant: { type: string }
  resource_group: { type: string, default: rg-kms }
  location: { type: string, default: eastus }
  key_vault: { type: string, default: kv-kms-test }
  key_name: { type: string, default: kms-key }
  identity: { type: string, default: id-kms }
steps:
  - id: feature
    uses: azure.feature
    with: { subscription: "{{params.subscription}}", poll_interval: 100ms }
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: "{{params.resource_group}}", location: "{{params.location}}" }
  - id: vault
    uses: azure.keyvault
    needs: [group]
    with:
      subscription: "{{params.subscription}}"
      resource_group: "{{params.resource_group}}"
      name: "{{params.key_vault}}"
      location: "{{params.location}}"
      tenant: "{{params.tenant}}"
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
  - id: key
    uses: azure.keyvault_key
    needs: [officer]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", vault_id: "{{steps.vault.outputs.id}}", name: "{{params.key_name}}" }
  - id: firewall
    uses: azure.keyvault_network
    needs: [key]
    with: { subscription: "{{params.subscription}}", resource_group: "{{params.resource_group}}", name: "{{params.key_vault}}" }
  - id: identity
    uses: azure.identity
    needs: [group]
    with:
      subscription: "{{params.subscription}}"
      resource_group: "{{params.resource_group}}"
      name: "{{params.identity}}"
      location: "{{params.location}}"
  - id: crypto-user
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto User, principal: "{{steps.identity.outputs.principal_id}}" }
  - id: contributor
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Contributor, principal: "{{steps.identity.outputs.principal_id}}" }
outputs:
  key_id: "{{steps.key.outputs.key_id}}"
"#;

fn world_counts(world: &Value) -> (usize, usize, usize) {
    let versions = world["keys"]
        .as_object()
        .unwrap()
        .values()
        .map(|v| v.as_array().unwrap().len())
        .sum();
    let assignments = world["role_assignments"].as_array().unwrap().len();
    let resources = world["resources"].as_array().unwrap().len();
    (versions, assignments, resources)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_cmk_setup_creates_once_and_a_second_run_sends_zero_writes() {
    let h = Harness::new(Faults::default()).await;
    let first = h.run(CMK_SETUP, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    for step in h.steps(&first.run_id) {
        assert_ne!(
            step.outcome,
            Some(Outcome::Unchanged),
            "{} changed nothing on a fresh world",
            step.step_id
        );
    }
    let key_id = first.outputs.as_ref().unwrap()["key_id"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        key_id.ends_with("/_kv/kv-kms-test/keys/kms-key"),
        "{key_id}"
    );
    let world = h.sandbox.world();
    assert_eq!(
        world_counts(&world),
        (1, 3, 2),
        "one key version, three assignments, vault and identity"
    );
    let vault = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["type"] == "Microsoft.KeyVault/vaults")
        .unwrap();
    assert_eq!(vault["properties"]["networkAcls"]["defaultAction"], "Deny");
    assert_eq!(
        vault["properties"]["networkAcls"]["bypass"],
        "AzureServices"
    );
    assert_eq!(vault["properties"]["enableRbacAuthorization"], true);

    // The firewall now blocks this machine from the data plane, as it would in Azure; the
    // key step reads the key through Resource Manager (`vault_id`), so a second run still
    // sees it, changes nothing and sends no writes.
    let mark = h.sandbox.requests().len();
    let second = h.run(CMK_SETUP, &[]).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    for step in h.steps(&second.run_id) {
        assert_eq!(step.outcome, Some(Outcome::Unchanged), "{}", step.step_id);
    }
    assert_eq!(h.writes_since(mark), vec![], "a second run sends no writes");
    assert_eq!(world_counts(&h.sandbox.world()), (1, 3, 2));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_public_vault_setup_is_fully_idempotent_including_the_key() {
    let h = Harness::new(Faults::default()).await;
    let public = CMK_SETUP.replace(
        "  - id: firewall\n    uses: azure.keyvault_network\n    needs: [key]\n    with: { subscription: \"{{params.subscription}}\", resource_group: \"{{params.resource_group}}\", name: \"{{params.key_vault}}\" }\n",
        "",
    );
    assert_eq!(h.run(&public, &[]).await.status, RunStatus::Succeeded);
    let mark = h.sandbox.requests().len();
    let second = h.run(&public, &[]).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(h.writes_since(mark), vec![]);
    assert_eq!(
        h.step(&second.run_id, "key").outcome,
        Some(Outcome::Unchanged)
    );
    assert_eq!(
        world_counts(&h.sandbox.world()).0,
        1,
        "still exactly one key version"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_throttling_storm_and_5xx_bursts_are_survived() {
    let faults = Faults {
        seed: 7,
        latency: Some(Latency {
            min_ms: 1,
            max_ms: 10,
            write_ms: 0,
        }),
        throttle: Some(Throttle {
            probability: 0.3,
            retry_after_s: 1,
        }),
        errors: Some(ServerErrors {
            probability: 0.1,
            statuses: vec![500, 503],
        }),
        rules: vec![Rule {
            method: Some("PUT".into()),
            path: "*/vaults/*".into(),
            times: 2,
            status: 503,
            code: "ServiceUnavailable".into(),
            message: None,
        }],
        ..Faults::default()
    };
    let h = Harness::new(faults).await;
    let summary = h.run(CMK_SETUP, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(world_counts(&h.sandbox.world()), (1, 3, 2));
    let requests = h.sandbox.requests();
    let throttled = requests.iter().filter(|r| r.status == 429).count();
    assert!(throttled >= 3, "the storm throttled {throttled} requests");
    assert!(
        requests.iter().filter(|r| r.status == 503).count() >= 2,
        "the vault PUT failed twice first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn principal_replication_and_rbac_propagation_delays_are_waited_out() {
    let faults = Faults {
        delays: Delays {
            feature_registration: Duration::from_millis(300),
            principal_replication: Duration::from_millis(1000),
            rbac_propagation: Duration::from_millis(1000),
            cluster_operation: Duration::ZERO,
            ..Delays::default()
        },
        ..Faults::default()
    };
    let h = Harness::new(faults).await;
    let summary = h.run(CMK_SETUP, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(world_counts(&h.sandbox.world()), (1, 3, 2));
    let requests = h.sandbox.requests();
    assert!(
        requests
            .iter()
            .any(|r| r.status == 400 && r.path.contains("roleAssignments")),
        "a fresh principal was not found at first"
    );
    assert!(
        requests
            .iter()
            // 403 from the data plane, or 400 ForbiddenByRbac from a key read through ARM.
            .any(|r| (r.status == 403 || r.status == 400) && r.path.contains("/keys/")),
        "a fresh role assignment had not propagated at first"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_firewalled_vault_fails_the_key_step_at_once_with_code_message_and_correlation_id() {
    let h = Harness::new(Faults::default()).await;
    let closed_first = CMK_SETUP.replace("needs: [key]", "needs: [officer]").replace(
        "  - id: key\n    uses: azure.keyvault_key\n    needs: [officer]",
        "  - id: key\n    uses: azure.keyvault_key\n    needs: [firewall]\n    retry: { attempts: 3, initial: 10ms }",
    );
    let summary = h.run(&closed_first, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let key = h.step(&summary.run_id, "key");
    assert_eq!(key.status, StepStatus::Failed);
    assert_eq!(key.attempts, 1, "ForbiddenByFirewall is not retried");
    let error = key.error.unwrap();
    assert!(error.contains("403 ForbiddenByFirewall"), "{error}");
    assert!(
        error.contains("Client address is not authorized"),
        "{error}"
    );
    assert!(error.contains("correlation id "), "{error}");
    assert!(!error.contains("Bearer"), "no token in errors: {error}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn names_outside_azure_rules_are_rejected_before_any_request() {
    let h = Harness::new(Faults::default()).await;
    for bad in ["kv/../other", "kv?x=1", "a", "kv#frag"] {
        let mark = h.sandbox.requests().len();
        let summary = h.run(CMK_SETUP, &[("key_vault", bad)]).await;
        assert_eq!(summary.status, RunStatus::Failed, "{bad}");
        let vault = h.step(&summary.run_id, "vault");
        let error = vault.error.unwrap();
        assert!(
            error.contains("invalid input: `name`") && error.contains("does not match"),
            "{bad}: {error}"
        );
        assert!(
            h.sandbox.requests()[mark..]
                .iter()
                .all(|r| !r.path.to_ascii_lowercase().contains("/vaults/")),
            "no vault request was sent for {bad}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wrong_audience_token_is_a_clear_401_not_a_retry_loop() {
    let sandbox = kmsflow_sandbox::Sandbox::start(Default::default())
        .await
        .unwrap();
    let mut credential = support::credential(&sandbox);
    credential.force_resource = Some("https://vault.azure.net".into());
    let client = support::client(&sandbox, credential);
    let url = client
        .arm_url(
            &[
                "subscriptions",
                sandbox.subscription(),
                "resourcegroups",
                "rg",
            ],
            "2025-04-01",
        )
        .unwrap();
    let error = client.get(&url).await.unwrap_err();
    assert_eq!(error.status(), Some(401));
    assert!(
        error.to_string().contains("InvalidAuthenticationToken"),
        "{error}"
    );
    assert!(error.to_string().contains("invalid audience"), "{error}");
    let arm_requests = sandbox
        .requests()
        .iter()
        .filter(|r| r.path != "/msi/token")
        .count();
    assert_eq!(arm_requests, 1, "401 is not retried");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollback_removes_what_the_run_created_and_nothing_else() {
    let h = Harness::new(Faults::default()).await;
    h.sandbox
        .with_world(|w| w.resource_group("rg-kms", "eastus"));
    let failing = CMK_SETUP.replace(
        "outputs:",
        "  - id: boom\n    uses: assert\n    needs: [contributor, firewall]\n    with: { condition: false, message: cluster update failed }\noutputs:",
    );
    let summary = h.run(&failing, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    assert_eq!(
        h.step(&summary.run_id, "group").outcome,
        Some(Outcome::Unchanged),
        "the group existed"
    );
    let rolled = h.rollback(&summary.run_id).await;
    assert_eq!(rolled.status, RunStatus::RolledBack, "{:?}", rolled.error);
    let world = h.sandbox.world();
    assert_eq!(
        world_counts(&world),
        (0, 0, 0),
        "assignments, key, identity and vault are gone: {world:#}"
    );
    assert_eq!(
        world["resource_groups"].as_array().unwrap().len(),
        1,
        "the pre-existing group stays"
    );
}

const VAULT_ONLY: &str = r#"
name: vault
params:
  subscription: { type: string }
  tenant: { type: string }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-full, location: eastus }
  - id: vault
    uses: azure.keyvault
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: rg-full, name: kv-full-body, location: eastus, tenant: "{{params.tenant}}" TAGS }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn updating_a_vault_keeps_what_the_step_does_not_manage_and_merges_tags() {
    let h = Harness::new(Faults::default()).await;
    let created = h.run(&VAULT_ONLY.replace(" TAGS", ""), &[]).await;
    assert_eq!(created.status, RunStatus::Succeeded, "{:?}", created.error);
    // Someone else set a property kmsflow does not manage, and a tag of their own.
    let client = h.client();
    let url = h.resource_url(
        &client,
        "rg-full",
        ("Microsoft.KeyVault", "vaults", "kv-full-body"),
        "2025-05-01",
    );
    client
        .send(
            reqwest::Method::PATCH,
            &url,
            kmsflow_steps::Service::ResourceManager,
            Some(&serde_json::json!({"tags": {"owner": "other-team"}, "properties": {"enabledForDiskEncryption": true}})),
            None,
        )
        .await
        .unwrap();
    let tagged = VAULT_ONLY.replace(" TAGS", ", tags: { env: prod } ");
    let updated = h.run(&tagged, &[]).await;
    assert_eq!(updated.status, RunStatus::Succeeded, "{:?}", updated.error);
    let vault = h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "kv-full-body")
        .unwrap()
        .clone();
    assert_eq!(
        vault["properties"]["enabledForDiskEncryption"], true,
        "a property the step does not manage is kept"
    );
    assert_eq!(
        vault["tags"],
        serde_json::json!({"owner": "other-team", "env": "prod"}),
        "tags are merged"
    );
    // Replacing tags on purpose: the plan shows the removal it makes.
    let replaced = VAULT_ONLY.replace(" TAGS", ", tags: { env: prod }, replace_tags: true ");
    let summary = h.run(&replaced, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let events = kmsflow_state::Store::open(&h.engine.state, kmsflow_state::Durability::Normal)
        .unwrap()
        .events(&summary.run_id)
        .unwrap();
    assert!(events.iter().any(|e| e.kind == "step_applying"));
    let vault = h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["name"] == "kv-full-body")
        .unwrap()
        .clone();
    assert_eq!(vault["tags"], serde_json::json!({"env": "prod"}));
    assert_eq!(vault["properties"]["enabledForDiskEncryption"], true);
}
