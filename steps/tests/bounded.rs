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
