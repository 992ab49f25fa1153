//! Answers that lie: a gateway's empty 200 or HTML 404, a truncated or foreign body, a
//! redirect, an oversized answer, a list that links back to itself. Each is taken as no
//! answer (never "absent", never "present", never "created"), so nothing someone else made
//! is written over, recorded as this run's, or deleted by its rollback; and no request
//! follows a redirect anywhere.

mod support;

use std::time::Duration;

use kmsflow_engine::kind::Outcome;
use kmsflow_sandbox::{Delays, Faults, Lie, LieAnswer, Rule, Sandbox, SandboxOptions};
use kmsflow_state::RunStatus;
use serde_json::json;
use support::Harness;

fn lie(method: &str, path: &str, times: u32, answer: LieAnswer) -> Lie {
    Lie {
        method: Some(method.into()),
        path: path.into(),
        times,
        answer,
        location: None,
        status: None,
        bytes: None,
    }
}

fn lying(lies: Vec<Lie>) -> Faults {
    Faults {
        lies,
        delays: Delays {
            cluster_operation: Duration::from_millis(200),
            ..Delays::default()
        },
        ..Faults::default()
    }
}

/// More than the client's transient attempts (10 in the tests' bounds): a lie that lasts.
const ALWAYS: u32 = 1000;

const CLUSTER: &str = r#"
name: pmk-new
params:
  subscription: { type: string }
steps:
  - id: cluster
    uses: azure.aks_cluster
    with: { subscription: "{{params.subscription}}", resource_group: rg-aks, name: aks-prod, location: eastus, kms_mode: PMK }
"#;

/// Another team's cluster, PMK already, as `CLUSTER` wants it.
fn seed_existing_cluster(h: &Harness) {
    let subscription = h.subscription();
    h.sandbox.with_world(|w| {
        w.resource_group("rg-aks", "eastus");
        w.feature_registered("Microsoft.ContainerService", "KMSPMKPreview");
        w.resource(json!({
            "id": format!("/subscriptions/{subscription}/resourceGroups/rg-aks/providers/Microsoft.ContainerService/managedClusters/aks-prod"),
            "name": "aks-prod",
            "type": "Microsoft.ContainerService/ManagedClusters",
            "location": "eastus",
            "eTag": "etag-1",
            "identity": {"type": "SystemAssigned", "principalId": "11111111-1111-4111-8111-111111111111", "tenantId": "t"},
            "properties": {
                "provisioningState": "Succeeded",
                "resourceUID": "another-teams-cluster",
                "kubernetesVersion": "1.33.0",
                "currentKubernetesVersion": "1.33.0",
                "dnsPrefix": "aks-prod",
                "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                "securityProfile": {"kubernetesResourceObjectEncryptionProfile": {"infrastructureEncryption": "Enabled"}},
            },
        }));
    });
}

fn cluster_writes(h: &Harness) -> Vec<String> {
    h.sandbox
        .requests()
        .iter()
        .filter(|r| r.write && r.path.to_ascii_lowercase().contains("/managedclusters/"))
        .map(|r| format!("{} {}", r.method, r.path))
        .collect()
}

fn cluster_exists(h: &Harness) -> bool {
    h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .any(|r| r["properties"]["resourceUID"] == "another-teams-cluster")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_gateways_empty_200_or_html_404_never_makes_an_existing_cluster_absent() {
    for answer in [LieAnswer::Empty200, LieAnswer::Html404, LieAnswer::Html200] {
        // A lie that lasts: the step fails, naming who answered and what came back, and
        // nothing is written to the cluster, by the run or by its rollback.
        let h = Harness::new(lying(vec![lie(
            "GET",
            "*/managedClusters/aks-prod",
            ALWAYS,
            answer,
        )]))
        .await;
        seed_existing_cluster(&h);
        let run = h.run(CLUSTER, &[]).await;
        assert_eq!(run.status, RunStatus::Failed, "{answer:?}");
        let error = h.step(&run.run_id, "cluster").error.unwrap();
        assert!(
            error.contains("proves nothing")
                && error.contains(&h.sandbox.base_url().replace("localhost", "127.0.0.1")),
            "{answer:?}: {error}"
        );
        assert_eq!(h.step(&run.run_id, "cluster").planned_outcome, None);
        let rolled_back = h.rollback(&run.run_id).await;
        assert_eq!(rolled_back.status, RunStatus::RolledBack, "{answer:?}");
        assert_eq!(cluster_writes(&h), Vec::<String>::new(), "{answer:?}");
        assert!(cluster_exists(&h), "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passing_lie_is_read_again_and_the_truth_decides() {
    // Two lies in a row, then the truth: the client asks up to three times.
    for pair in [
        [LieAnswer::Empty200, LieAnswer::Truncated],
        [LieAnswer::Html404, LieAnswer::Foreign],
    ] {
        let h = Harness::new(lying(
            pair.iter()
                .map(|answer| lie("GET", "*/managedClusters/aks-prod", 1, *answer))
                .collect(),
        ))
        .await;
        seed_existing_cluster(&h);
        let run = h.run(CLUSTER, &[]).await;
        assert_eq!(
            run.status,
            RunStatus::Succeeded,
            "{pair:?}: {:?}",
            run.error
        );
        assert_eq!(
            h.step(&run.run_id, "cluster").outcome,
            Some(Outcome::Unchanged)
        );
        let lies = h
            .sandbox
            .requests()
            .iter()
            .filter(|r| r.lie.is_some())
            .count();
        assert_eq!(
            lies, 2,
            "{pair:?}: every lie was told, and none was believed"
        );
        let rolled_back = h.rollback(&run.run_id).await;
        assert_eq!(rolled_back.status, RunStatus::RolledBack);
        assert_eq!(cluster_writes(&h), Vec::<String>::new());
        assert!(cluster_exists(&h));
    }
}

const IDENTITY: &str = r#"
name: identity
params:
  subscription: { type: string }
steps:
  - id: identity
    uses: azure.identity
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, name: id-shared, location: eastus }
"#;

const IDENTITY_PATH: &str = "*/userAssignedIdentities/id-shared";

fn identities(h: &Harness) -> usize {
    h.sandbox.world()["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["type"] == "Microsoft.ManagedIdentity/userAssignedIdentities")
        .count()
}

/// Another team's identity in `rg-own`.
async fn another_teams_identity(h: &Harness) {
    h.sandbox
        .with_world(|w| w.resource_group("rg-own", "eastus"));
    let other = h.run(IDENTITY, &[]).await;
    assert_eq!(other.status, RunStatus::Succeeded, "{:?}", other.error);
    assert_eq!(identities(h), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_identity_another_team_made_is_never_adopted_through_a_lie() {
    for answer in [LieAnswer::Empty200, LieAnswer::Html404] {
        let h = Harness::new(Faults::default()).await;
        another_teams_identity(&h).await;
        h.sandbox
            .set_faults(lying(vec![lie("GET", IDENTITY_PATH, ALWAYS, answer)]));
        let mark = h.sandbox.requests().len();
        let run = h.run(IDENTITY, &[]).await;
        assert_eq!(run.status, RunStatus::Failed, "{answer:?}");
        assert_eq!(h.writes_since(mark), vec![], "{answer:?}: nothing written");
        let rolled_back = h.rollback(&run.run_id).await;
        assert_eq!(rolled_back.status, RunStatus::RolledBack, "{answer:?}");
        assert_eq!(identities(&h), 1, "{answer:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_create_raced_by_someone_else_is_recorded_as_theirs_and_rollback_leaves_it() {
    let h = Harness::new(Faults::default()).await;
    another_teams_identity(&h).await;
    // The observe proves absence (Azure's own 404), then the identity is there at the PUT:
    // as when another team creates it between the two.
    h.sandbox.set_faults(Faults {
        rules: vec![Rule {
            method: Some("GET".into()),
            path: IDENTITY_PATH.into(),
            times: 1,
            status: 404,
            code: "ResourceNotFound".into(),
            message: None,
        }],
        ..Faults::default()
    });
    let run = h.run(IDENTITY, &[]).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(
        h.step(&run.run_id, "identity").outcome,
        Some(Outcome::Updated),
        "Azure answered 200, not 201: the create updated someone else's identity"
    );
    let rolled_back = h.rollback(&run.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RollbackFailed);
    let error = rolled_back.error.unwrap();
    assert!(
        error.contains("existed before this run wrote to it"),
        "{error}"
    );
    assert_eq!(identities(&h), 1, "the other team's identity survives");
    let deletes = h
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE")
        .count();
    assert_eq!(deletes, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cluster_raced_by_someone_else_is_never_written_over() {
    let h = Harness::new(lying(vec![])).await;
    seed_existing_cluster(&h);
    h.sandbox.set_faults(Faults {
        rules: vec![Rule {
            method: Some("GET".into()),
            path: "*/managedClusters/aks-prod".into(),
            times: 1,
            status: 404,
            code: "ResourceNotFound".into(),
            message: None,
        }],
        ..lying(vec![])
    });
    let run = h.run(CLUSTER, &[]).await;
    // The create asked `If-None-Match: *`, and AKS refused it: nothing was written, and
    // nothing of it is the run's.
    assert_eq!(run.status, RunStatus::Failed);
    let error = h.step(&run.run_id, "cluster").error.unwrap();
    assert!(error.contains("412 PreconditionFailed"), "{error}");
    assert_eq!(h.step(&run.run_id, "cluster").planned_outcome, None);
    // Resumed, the step observes the cluster that is there.
    let run = h.resume(&run.run_id).await;
    assert_eq!(run.status, RunStatus::Succeeded, "{:?}", run.error);
    assert_eq!(
        cluster_writes(&h).len(),
        1,
        "one conditional PUT, refused: {:?}",
        cluster_writes(&h)
    );
    let put = h
        .sandbox
        .requests()
        .into_iter()
        .find(|r| r.method == "PUT" && r.path.contains("aks-prod"))
        .unwrap();
    assert_eq!(put.status, 412);
    assert_eq!(
        h.step(&run.run_id, "cluster").outcome,
        Some(Outcome::Unchanged)
    );
    let rolled_back = h.rollback(&run.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RolledBack);
    assert!(cluster_exists(&h));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_redirect_is_followed_and_no_body_goes_to_another_origin() {
    let elsewhere = Sandbox::start(SandboxOptions::default()).await.unwrap();
    let h = Harness::new(Faults::default()).await;
    h.sandbox
        .with_world(|w| w.resource_group("rg-own", "eastus"));
    let subscription = h.subscription();
    let other_path = format!(
        "/subscriptions/{subscription}/resourceGroups/rg-own/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-other"
    );
    for (status, location) in [
        (
            307,
            format!(
                "{}{other_path}?api-version=2023-01-31",
                elsewhere.base_url()
            ),
        ),
        (
            307,
            format!(
                "{}{other_path}?api-version=2023-01-31",
                h.sandbox.base_url()
            ),
        ),
        (
            302,
            format!(
                "{}{other_path}?api-version=2023-01-31",
                elsewhere.base_url()
            ),
        ),
    ] {
        let method = if status == 302 { "GET" } else { "PUT" };
        h.sandbox.set_faults(Faults {
            lies: vec![Lie {
                location: Some(location.clone()),
                status: Some(status),
                ..lie(method, IDENTITY_PATH, ALWAYS, LieAnswer::Redirect)
            }],
            ..Faults::default()
        });
        let run = h.run(IDENTITY, &[]).await;
        assert_eq!(run.status, RunStatus::Failed, "{status} {method}");
        let error = h.step(&run.run_id, "identity").error.unwrap();
        assert!(
            error.contains("follows no redirect") && error.contains(&format!("answered {status}")),
            "{error}"
        );
        assert!(
            !error.contains("api-version"),
            "no query in the error: {error}"
        );
        let rolled_back = h.rollback(&run.run_id).await;
        assert_eq!(rolled_back.status, RunStatus::RolledBack);
    }
    assert_eq!(
        elsewhere.requests(),
        vec![],
        "nothing reached another origin"
    );
    assert!(
        !h.sandbox
            .requests()
            .iter()
            .any(|r| r.path.ends_with("/id-other")),
        "nothing went to another path of the same origin"
    );
    assert_eq!(
        identities(&h),
        0,
        "nothing was created, and nothing claims it was"
    );
}

const GENERIC: &str = r#"
name: generic
params:
  subscription: { type: string }
steps:
  - id: resource
    uses: azure.resource
    with:
      id: "/subscriptions/{{params.subscription}}/resourceGroups/rg-own/providers/Microsoft.ManagedIdentity/userAssignedIdentities/id-generic"
      api_version: 2023-01-31
      body: { location: eastus, tags: { owner: platform } }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_truncated_foreign_or_oversized_answer_is_never_a_before_image() {
    for answer in [
        LieAnswer::Truncated,
        LieAnswer::Foreign,
        LieAnswer::Oversized,
    ] {
        let h = Harness::new(Faults::default()).await;
        h.sandbox
            .with_world(|w| w.resource_group("rg-own", "eastus"));
        let first = h.run(GENERIC, &[]).await;
        assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
        let changed = GENERIC.replace("owner: platform", "owner: security");
        h.sandbox.set_faults(lying(vec![Lie {
            bytes: Some(40 << 20),
            ..lie("GET", "*/id-generic", ALWAYS, answer)
        }]));
        let mark = h.sandbox.requests().len();
        let run = h.run(&changed, &[]).await;
        assert_eq!(run.status, RunStatus::Failed, "{answer:?}");
        let step = h.step(&run.run_id, "resource");
        let error = step.error.unwrap();
        let expected = match answer {
            LieAnswer::Truncated => "not JSON",
            LieAnswer::Foreign => "not for the resource asked",
            _ => "larger than",
        };
        assert!(error.contains(expected), "{answer:?}: {error}");
        assert_eq!(step.before_image, None, "{answer:?}");
        assert_eq!(h.writes_since(mark), vec![], "{answer:?}");
        // Rollback of the first run still works, and deletes what it provably made.
        h.sandbox.set_faults(Faults::default());
        let rolled_back = h.rollback(&first.run_id).await;
        assert_eq!(
            rolled_back.status,
            RunStatus::RolledBack,
            "{answer:?}: {:?}",
            rolled_back.error
        );
    }
}

const KEY: &str = r#"
name: key
params:
  subscription: { type: string }
  tenant: { type: string }
steps:
  - id: vault
    uses: azure.keyvault
    with: { subscription: "{{params.subscription}}", resource_group: rg-own, name: kv-shared, location: eastus, tenant: "{{params.tenant}}" }
  - id: officer
    uses: azure.role_assignment
    with: { scope: "{{steps.vault.outputs.id}}", role: Key Vault Crypto Officer, principal: me }
  - id: key
    uses: azure.keyvault_key
    needs: [officer]
    with: { vault_uri: "{{steps.vault.outputs.vault_uri}}", name: kms-key }
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_empty_200_on_a_keys_read_never_mints_a_version_of_another_clusters_key() {
    let h = Harness::new(Faults::default()).await;
    h.sandbox
        .with_world(|w| w.resource_group("rg-own", "eastus"));
    let first = h.run(KEY, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    h.sandbox.set_faults(lying(vec![lie(
        "GET",
        "*/keys/kms-key",
        ALWAYS,
        LieAnswer::Empty200,
    )]));
    let second = h.run(KEY, &[]).await;
    assert_eq!(second.status, RunStatus::Failed);
    let creates = |h: &Harness| {
        h.sandbox
            .requests()
            .iter()
            .filter(|r| r.method == "POST" && r.path.ends_with("/keys/kms-key/create"))
            .count()
    };
    assert_eq!(creates(&h), 1, "only the first run's create");
    h.sandbox.set_faults(Faults::default());
    let rolled_back = h.rollback(&second.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RolledBack);
    let keys = h.sandbox.world()["keys"].to_string();
    assert!(
        keys.contains("kms-key"),
        "the first run's key survives: {keys}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_key_created_over_one_that_existed_is_recorded_as_an_update_and_never_deleted() {
    let h = Harness::new(Faults::default()).await;
    h.sandbox
        .with_world(|w| w.resource_group("rg-own", "eastus"));
    let first = h.run(KEY, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    // Key Vault itself says the key is absent at the observe (a race), so the second run
    // creates: the create adds a version to the first run's key.
    h.sandbox.set_faults(Faults {
        rules: vec![Rule {
            method: Some("GET".into()),
            path: "*/keys/kms-key".into(),
            times: 1,
            status: 404,
            code: "KeyNotFound".into(),
            message: None,
        }],
        ..Faults::default()
    });
    let second = h.run(KEY, &[]).await;
    assert_eq!(second.status, RunStatus::Succeeded, "{:?}", second.error);
    assert_eq!(
        h.step(&second.run_id, "key").outcome,
        Some(Outcome::Updated)
    );
    let rolled_back = h.rollback(&second.run_id).await;
    assert_eq!(rolled_back.status, RunStatus::RollbackFailed);
    let error = rolled_back.error.unwrap();
    assert!(
        error.contains("existed before this run wrote to it"),
        "{error}"
    );
    let deletes = h
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.method == "DELETE" && r.path.ends_with("/keys/kms-key"))
        .count();
    assert_eq!(deletes, 0, "the first run's key is not deleted");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn discovery_stops_at_a_page_that_links_back_or_is_not_a_list() {
    let h = Harness::new(Faults::default()).await;
    seed_existing_cluster(&h);
    let client = h.client();
    let subscription = h.subscription();
    let found = kmsflow_steps::discover::clusters(&client, &subscription)
        .await
        .unwrap();
    assert_eq!(found.len(), 1);
    for (answer, expected) in [
        (
            LieAnswer::NextLinkLoop,
            "links back to a page it already gave",
        ),
        (LieAnswer::Empty200, "an empty body"),
        (LieAnswer::Html200, "not JSON"),
    ] {
        h.sandbox.set_faults(lying(vec![lie(
            "GET",
            "*/providers/Microsoft.ContainerService/managedClusters",
            ALWAYS,
            answer,
        )]));
        let started = std::time::Instant::now();
        let error = kmsflow_steps::discover::clusters(&client, &subscription)
            .await
            .unwrap_err()
            .to_string();
        assert!(error.contains(expected), "{answer:?}: {error}");
        assert!(started.elapsed() < Duration::from_secs(30), "{answer:?}");
    }
    let looped = h
        .sandbox
        .requests()
        .iter()
        .filter(|r| r.lie == Some("next_link_loop"))
        .count();
    assert_eq!(looped, 1, "the page that links back is read once");
}

#[test]
fn lies_parse_from_a_fault_file() {
    let faults = Faults::from_yaml(
        r#"
lies:
  - { method: GET, path: "*/managedClusters/*", answer: empty_200 }
  - { method: PUT, path: "*/vaults/*", answer: redirect, location: "https://elsewhere.example/x", status: 308, times: 2 }
  - { path: "*", answer: oversized, bytes: 1048576 }
"#,
    )
    .unwrap();
    assert_eq!(faults.lies.len(), 3);
    assert_eq!(faults.lies[1].status, Some(308));
    assert_eq!(faults.lies[2].bytes, Some(1 << 20));
    assert_eq!(faults.lies[0].answer, LieAnswer::Empty200);
    assert_eq!(faults.lies[1].times, 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_that_does_not_verify_fails_at_once_naming_the_host_and_the_ca() {
    let https = |_: ()| SandboxOptions {
        tls: true,
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::start(https(())).await.unwrap();
    // Another sandbox's authority: what a second `--sandbox` run on the same state file
    // left in place of this one's.
    let other = Sandbox::start(https(())).await.unwrap();
    let dir = tempfile::tempdir().unwrap();
    let ca_file = dir.path().join("ca.pem");
    std::fs::write(&ca_file, other.ca_pem().unwrap()).unwrap();
    let profile = json!({
        "name": "kmsflow sandbox",
        "arm_endpoint": sandbox.addressing().arm_endpoint(),
        "arm_scope": "https://management.azure.com/.default",
        "key_vault_scope": format!("{}/.default", sandbox.addressing().vault_audience()),
        "key_vault_suffixes": [kmsflow_sandbox::VAULT_SUFFIX],
        "postgres_scope": "https://ossrdbms-aad.database.windows.net/.default",
        "sandbox": {"address": sandbox.address().to_string(), "ca_file": ca_file},
    });
    let profile_file = dir.path().join("cloud.json");
    std::fs::write(&profile_file, profile.to_string()).unwrap();
    let cloud = kmsflow_steps::CloudProfile::named_or_file(profile_file.to_str().unwrap()).unwrap();
    let mut config = kmsflow_steps::AzureConfig::for_cloud(
        cloud,
        None,
        kmsflow_steps::AuthMode::ManagedIdentity,
    )
    .unwrap();
    config.retry = support::fast_retries();
    let client = kmsflow_steps::AzureClient::with_credential(
        config,
        std::sync::Arc::new(support::credential(&sandbox)),
    )
    .unwrap();
    let url = client
        .arm_url(&["subscriptions", sandbox.subscription()], "2022-12-01")
        .unwrap();
    let started = std::time::Instant::now();
    let error = client.get(&url).await.unwrap_err().to_string();
    assert!(
        error.contains("does not verify")
            && error.contains(kmsflow_sandbox::ARM_HOST)
            && error.contains(&ca_file.display().to_string()),
        "{error}"
    );
    assert!(
        started.elapsed() < Duration::from_secs(5),
        "at once, not retried"
    );
    assert!(
        sandbox.requests().iter().all(|r| r.path == "/msi/token"),
        "nothing reached Resource Manager: {:?}",
        sandbox.requests()
    );
}
