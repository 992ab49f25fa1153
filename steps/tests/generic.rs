//! The generic ARM kinds against the sandbox: `azure.resource` is idempotent and undone,
//! `azure.action` posts, `azure.wait` waits for a value, `azure.assert` says what it found.

mod support;

use std::time::Duration;

use kmsflow_engine::kind::Outcome;
use kmsflow_sandbox::{Delays, Faults};
use kmsflow_state::RunStatus;
use support::Harness;

const GENERIC: &str = r#"
name: generic
params:
  subscription: { type: string }
steps:
  - id: group
    uses: azure.resource
    with:
      id: "/subscriptions/{{params.subscription}}/resourcegroups/rg-generic"
      api_version: 2025-04-01
      body: { location: westeurope, tags: { owner: platform } }
  - id: register
    uses: azure.action
    with:
      id: "/subscriptions/{{params.subscription}}/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview"
      action: register
      api_version: 2021-07-01
  - id: registered
    uses: azure.wait
    needs: [register]
    timeout: 10s
    with:
      id: "/subscriptions/{{params.subscription}}/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview"
      api_version: 2021-07-01
      pointer: /properties/state
      values: [Registered]
      poll_interval: 50ms
  - id: located
    uses: azure.assert
    with:
      id: "{{steps.group.outputs.id}}"
      api_version: 2025-04-01
      pointer: /location
      values: [westeurope]
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn generic_kinds_create_act_wait_and_assert() {
    let faults = Faults {
        delays: Delays {
            feature_registration: Duration::from_millis(300),
            ..Delays::default()
        },
        ..Faults::default()
    };
    let h = Harness::new(faults).await;
    let first = h.run(GENERIC, &[]).await;
    assert_eq!(first.status, RunStatus::Succeeded, "{:?}", first.error);
    assert_eq!(
        h.step(&first.run_id, "group").outcome,
        Some(Outcome::Created)
    );
    assert_eq!(
        h.step(&first.run_id, "registered").outcome,
        Some(Outcome::Invoked),
        "it had to wait"
    );
    assert_eq!(
        h.step(&first.run_id, "registered").outputs.unwrap()["value"],
        "Registered"
    );

    let second = h.run(GENERIC, &[]).await;
    assert_eq!(second.status, RunStatus::Succeeded);
    assert_eq!(
        h.step(&second.run_id, "group").outcome,
        Some(Outcome::Unchanged)
    );
    assert_eq!(
        h.step(&second.run_id, "registered").outcome,
        Some(Outcome::Unchanged)
    );

    let wrong = GENERIC.replace("values: [westeurope]", "values: [eastus]");
    let failed = h.run(&wrong, &[]).await;
    assert_eq!(failed.status, RunStatus::Failed);
    let error = h.step(&failed.run_id, "located").error.unwrap();
    assert!(
        error.contains("/location is \"westeurope\", expected one of [\"eastus\"]"),
        "{error}"
    );
}
