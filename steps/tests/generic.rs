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

const ACTION_ONLY: &str = r#"
name: action
params:
  subscription: { type: string }
steps:
  - id: register
    uses: azure.action
    with:
      id: "/subscriptions/{{params.subscription}}/providers/Microsoft.Features/providers/Microsoft.ContainerService/features/KMSPMKPreview"
      action: register
      api_version: 2021-07-01
      REPEATABLE
"#;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_action_whose_answer_was_lost_is_not_posted_again_unless_repeatable() {
    use kmsflow_sandbox::{Loss, LostAnswer};
    let lose_one = || Faults {
        lose_answers: vec![LostAnswer {
            method: Some("POST".into()),
            path: "*/features/KMSPMKPreview/register".into(),
            times: 1,
            how: Loss::ServerError,
            hold_ms: 0,
        }],
        ..Faults::default()
    };
    let posts = |h: &Harness| {
        h.sandbox
            .requests()
            .iter()
            .filter(|r| r.method == "POST")
            .count()
    };

    let h = Harness::new(lose_one()).await;
    let summary = h.run(&ACTION_ONLY.replace("REPEATABLE", ""), &[]).await;
    assert_eq!(summary.status, RunStatus::Failed);
    let error = h.step(&summary.run_id, "register").error.unwrap();
    assert!(
        error.contains("its answer was lost, so it may have taken effect"),
        "{error}"
    );
    assert_eq!(
        posts(&h),
        1,
        "the POST was sent once, by the client and the step alike"
    );

    let h = Harness::new(lose_one()).await;
    let repeatable = ACTION_ONLY.replace("REPEATABLE", "repeatable: true");
    let summary = h.run(&repeatable, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(
        posts(&h),
        2,
        "a repeatable action is posted again by the step's next attempt"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_actions_response_is_stored_masked_and_still_read_by_later_steps() {
    let h = Harness::new(Faults::default()).await;
    let runbook = ACTION_ONLY.replace("REPEATABLE", "repeatable: true")
        + r#"  - id: read
    uses: noop
    with: { outputs: { state: "{{steps.register.outputs.response.properties.state}}" } }
"#;
    let summary = h.run(&runbook, &[]).await;
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    assert_eq!(
        h.step(&summary.run_id, "register").outputs.unwrap()["response"],
        "***",
        "an action's response may hold credentials: stored masked"
    );
    let state = &h.step(&summary.run_id, "read").outputs.unwrap()["state"];
    assert!(
        state == "Registering" || state == "Registered",
        "a later step read the real response: {state}"
    );
}
