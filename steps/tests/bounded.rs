//! Every wait ends, and passing trouble does not end a run: a wait that never sees its value
//! fails with what it saw, and a credential that fails for a moment is asked again.

mod support;

use std::time::Duration;

use kmsflow_sandbox::{Delays, Faults};
use kmsflow_state::RunStatus;
use support::Harness;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_wait_that_never_sees_its_value_fails_with_what_it_saw() {
    let h = Harness::new(Faults::default()).await;
    let runbook = r#"
name: wait
params:
  subscription: { type: string }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-wait, location: eastus }
  - id: wait
    uses: azure.wait
    with:
      id: "{{steps.group.outputs.id}}"
      api_version: 2025-04-01
      pointer: /location
      values: [westeurope]
      poll_interval: 50ms
      max_wait: 300ms
"#;
    let started = std::time::Instant::now();
    let summary = h.run(runbook, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = h.step(&summary.run_id, "wait").error.unwrap();
    assert!(
        error.contains("/location is still `eastus` after 300ms"),
        "{error}"
    );
    assert!(started.elapsed() < Duration::from_secs(20), "it ended");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_feature_that_never_registers_fails_with_its_state() {
    let h = Harness::new(Faults {
        delays: Delays {
            feature_registration: Duration::from_secs(600),
            ..Delays::default()
        },
        ..Faults::default()
    })
    .await;
    let runbook = r#"
name: feature
params:
  subscription: { type: string }
steps:
  - id: feature
    uses: azure.feature
    with: { subscription: "{{params.subscription}}", poll_interval: 50ms, max_wait: 1s }
"#;
    let summary = h.run(runbook, &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = h.step(&summary.run_id, "feature").error.unwrap();
    assert!(
        error.contains("KMSPMKPreview is still `Registering` after 1s"),
        "{error}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_credential_that_fails_for_a_moment_is_asked_again() {
    let h = Harness::with_flaky_credential(Faults::default(), 2).await;
    let runbook = r#"
name: group
params:
  subscription: { type: string }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: rg-blip, location: eastus }
"#;
    let summary = h.run(runbook, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_retries_no_longer_than_its_budget_whatever_retry_after_asks() {
    // Throttled every time, asked to come back in 11 days (clamped to 300 s a wait): with a
    // budget of 2 s, the request gives up at once instead of holding the step for the 35
    // minutes eight such waits would take.
    let faults = Faults {
        throttle: Some(kmsflow_sandbox::Throttle {
            probability: 1.0,
            retry_after_s: 999_999,
        }),
        ..Faults::default()
    };
    let retry = kmsflow_steps::RetryBounds {
        retry_budget: Duration::from_secs(2),
        eventual_budget: Duration::from_secs(1),
        ..support::fast_retries()
    };
    let h = Harness::with_retries(faults, retry).await;
    let client = support::client_with(&h.sandbox, support::credential(&h.sandbox), retry);
    let url = client
        .arm_url(&["subscriptions", &h.subscription()], "2022-12-01")
        .unwrap();
    let started = std::time::Instant::now();
    let error = client.get(&url).await.unwrap_err();
    assert_eq!(error.status(), Some(429), "{error}");
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "gave up after {:?}",
        started.elapsed()
    );
    assert_eq!(
        h.sandbox
            .requests()
            .iter()
            .filter(|r| r.path.starts_with("/subscriptions"))
            .count(),
        1,
        "asked once: the first wait Azure asked for is past the budget"
    );
}
