//! The run's target is the run's: `resume` and `rollback` act on the subscription, group and
//! names the run was started with, whatever the shell now says, unless told on purpose
//! (`--allow-param-change`). Against `kmsflow sandbox serve` in another process, with its
//! request log as the witness.

mod support;

use std::process::Output;

use serde_json::Value;
use support::serve;

const RUNBOOK: &str = r#"
name: target
params:
  subscription: { type: string, env: AZURE_SUBSCRIPTION_ID }
  resource_group: { type: string, default: rg-target }
  stop: { type: bool, default: false }
steps:
  - id: group
    uses: azure.resource_group
    with: { subscription: "{{params.subscription}}", resource_group: "{{params.resource_group}}", location: eastus }
  - id: identity
    uses: azure.identity
    needs: [group]
    with: { subscription: "{{params.subscription}}", resource_group: "{{params.resource_group}}", name: id-target, location: eastus }
  - id: stop
    uses: fail
    needs: [identity]
    if: "{{params.stop}}"
    with: { message: stopped on purpose }
"#;

const OTHER_SUBSCRIPTION: &str = "11111111-2222-4333-8444-555555555555";

fn run_id(output: &Output) -> String {
    let json: Value = serde_json::from_slice(&output.stdout).unwrap();
    json["id"].as_str().unwrap().to_owned()
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

#[test]
fn rollback_and_resume_keep_the_runs_target_whatever_the_shell_says() {
    let served = serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("target.yaml"), RUNBOOK).unwrap();
    let stopped = served
        .kmsflow(
            dir.path(),
            &["run", "target.yaml", "-p", "stop=true", "--output", "json"],
        )
        .output()
        .unwrap();
    assert_eq!(stopped.status.code(), Some(1), "{}", stderr(&stopped));
    let run = run_id(&stopped);

    // A shell pointed at another subscription: refused, naming the parameter, both values and
    // the flag; nothing sent anywhere.
    let before = served.requests().len();
    let rollback = served
        .kmsflow(dir.path(), &["rollback", &run])
        .env("AZURE_SUBSCRIPTION_ID", OTHER_SUBSCRIPTION)
        .output()
        .unwrap();
    let said = stderr(&rollback);
    assert_eq!(rollback.status.code(), Some(2), "{said}");
    let home = &served.env["AZURE_SUBSCRIPTION_ID"];
    assert!(
        said.contains(&format!(
            "parameter `subscription`: run `{run}` was started with `{home}`, but the environment (`AZURE_SUBSCRIPTION_ID`) says `{OTHER_SUBSCRIPTION}`"
        )),
        "{said}"
    );
    assert!(said.contains("--allow-param-change"), "{said}");
    // `resume -p resource_group=other` would move the half-done run to another group.
    let resume = served
        .kmsflow(
            dir.path(),
            &["resume", &run, "-p", "resource_group=rg-other"],
        )
        .output()
        .unwrap();
    let said = stderr(&resume);
    assert_eq!(resume.status.code(), Some(2), "{said}");
    assert!(
        said.contains("parameter `resource_group`: run")
            && said.contains("`rg-target`, but `-p resource_group` says `rg-other`"),
        "{said}"
    );
    assert_eq!(served.requests().len(), before, "refusals send nothing");

    // The same values again are no change: the rollback goes ahead, at home only.
    let rollback = served
        .kmsflow(
            dir.path(),
            &["rollback", &run, "-p", "resource_group=rg-target"],
        )
        .output()
        .unwrap();
    assert_eq!(rollback.status.code(), Some(0), "{}", stderr(&rollback));
    assert_eq!(served.requests_to(OTHER_SUBSCRIPTION), Vec::<String>::new());
    let deleted: Vec<String> = served.requests()[before..]
        .iter()
        .filter(|r| r["method"] == "DELETE")
        .map(|r| r["path"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(
        deleted.len(),
        2,
        "the identity, then the group: {deleted:#?}"
    );
    assert!(
        deleted.iter().all(|path| path.contains(home.as_str())),
        "{deleted:#?}"
    );
}

#[test]
fn with_the_flag_a_rollback_does_what_it_was_told() {
    let served = serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("target.yaml"), RUNBOOK).unwrap();
    let ran = served
        .kmsflow(dir.path(), &["run", "target.yaml", "--output", "json"])
        .output()
        .unwrap();
    assert_eq!(ran.status.code(), Some(0), "{}", stderr(&ran));
    let run = run_id(&ran);
    let rollback = served
        .kmsflow(dir.path(), &["rollback", &run, "--allow-param-change"])
        .env("AZURE_SUBSCRIPTION_ID", OTHER_SUBSCRIPTION)
        .output()
        .unwrap();
    // It was told to act on the other subscription, and it did (where nothing of the run is).
    assert!(
        !served.requests_to(OTHER_SUBSCRIPTION).is_empty(),
        "{}",
        stderr(&rollback)
    );
}

/// `plan --detailed-exitcode` exits 2 when a step would fail, and lists it: CI must not read
/// "no changes" from a plan that could not read Azure at all (here the token is refused).
#[test]
fn plan_exits_2_and_lists_the_steps_that_would_fail() {
    let served = serve(&[]);
    let dir = tempfile::tempdir().unwrap();
    let subscription = format!("subscription={}", served.env["AZURE_SUBSCRIPTION_ID"]);
    let plan = served
        .kmsflow(
            dir.path(),
            &[
                "plan",
                "verify-kms",
                "-p",
                &subscription,
                "-p",
                "resource_group=rg",
                "-p",
                "cluster=aks",
                "--detailed-exitcode",
            ],
        )
        .env("IDENTITY_HEADER", "not-the-sandboxs")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&plan.stderr);
    assert_eq!(plan.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("would fail:") && stderr.contains("  verify:"),
        "{stderr}"
    );
}
