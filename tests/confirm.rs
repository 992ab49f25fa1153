//! `run` and `rollback` ask before what cannot be taken back: on a terminal (a real pty), the
//! user types `yes`; without one they refuse unless `--yes`. Nothing is changed before the
//! answer.

use std::path::Path;
use std::process::{Command, Output};
use std::time::Duration;

use nix::sys::wait::WaitStatus;
use serde_json::Value;

fn kmsflow(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(args)
        .current_dir(dir)
        .env("KMSFLOW_STATE", dir.join("state.db"))
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .env_remove("KMSFLOW_LOG");
    command
}

fn output(dir: &Path, args: &[&str]) -> Output {
    kmsflow(dir, args)
        .stdin(std::process::Stdio::null())
        .output()
        .unwrap()
}

fn runs(dir: &Path) -> Vec<Value> {
    let listed = output(dir, &["runs", "--output", "json"]);
    serde_json::from_slice::<Value>(&listed.stdout)
        .map(|v| v.as_array().cloned().unwrap_or_default())
        .unwrap_or_default()
}

fn exit_code(session: &mut rexpect::session::PtySession) -> i32 {
    for _ in 0..600 {
        match session.process().status() {
            Some(WaitStatus::Exited(_, code)) => return code,
            Some(WaitStatus::StillAlive) | None => std::thread::sleep(Duration::from_millis(50)),
            Some(other) => panic!("kmsflow ended with {other:?}"),
        }
    }
    panic!("kmsflow did not end within 30 s");
}

#[test]
fn without_a_terminal_a_run_past_a_point_of_no_return_needs_yes_and_changes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let refused = output(dir.path(), &["run", "pmk-existing-cluster", "--sandbox"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("point of no return"), "{said}");
    assert!(said.contains("cluster"), "names the step: {said}");
    assert!(said.contains("--yes"), "says what to do: {said}");
    assert!(runs(dir.path()).is_empty(), "no run was started");

    let agreed = output(
        dir.path(),
        &["run", "pmk-existing-cluster", "--sandbox", "--yes"],
    );
    assert_eq!(
        agreed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&agreed.stderr)
    );
    // Rerun: the cluster is already encrypted, the plan says nothing irreversible is left,
    // and a CI job that reruns is not refused.
    let rerun = output(dir.path(), &["run", "pmk-existing-cluster", "--sandbox"]);
    assert_eq!(
        rerun.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&rerun.stderr)
    );
}

/// The cluster's KMS and infrastructure encryption, as the sandbox's world holds it.
fn cluster_encryption(dir: &Path) -> Value {
    let world: Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.sandbox.json")).unwrap()).unwrap();
    let cluster = world["resources"]
        .as_object()
        .unwrap()
        .iter()
        .find(|(id, _)| id.contains("/managedclusters/"))
        .map(|(_, cluster)| cluster.clone())
        .unwrap();
    cluster["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"].clone()
}

/// The README's first command without `--yes` and without a terminal: the cluster step's plan
/// up front can only say "may be" (its inputs come from the key made before it); made again
/// just before it applies, it creates a new cluster, which takes nothing back, so nobody
/// needs to be asked and the run goes through.
#[test]
fn without_a_terminal_a_new_cluster_with_cmk_needs_no_yes() {
    let dir = tempfile::tempdir().unwrap();
    let run = output(
        dir.path(),
        &["run", "cmk-private-vault-new-cluster", "--sandbox"],
    );
    let said = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(0), "{said}");
    assert!(said.contains("may be a point of no return"), "{said}");
    assert_eq!(runs(dir.path())[0]["status"], "succeeded");
}

/// Without a terminal, a point of no return the plan up front could only call "may be" is
/// refused when the step's own plan, just before it applies, says it is one: the step fails
/// before it changes anything, says why and what to do, and `resume` goes ahead.
#[test]
fn without_a_terminal_a_point_found_only_at_apply_is_refused_there_and_resume_goes_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let run = output(
        dir.path(),
        &["run", "cmk-public-vault-existing-cluster", "--sandbox"],
    );
    let said = String::from_utf8_lossy(&run.stderr);
    assert_eq!(run.status.code(), Some(1), "{said}");
    assert!(
        said.contains("not applied: this is a point of no return"),
        "{said}"
    );
    assert!(said.contains("kmsflow resume"), "says what to do: {said}");
    let listed = runs(dir.path());
    assert_eq!(listed[0]["status"], "failed", "{listed:?}");
    assert_eq!(
        cluster_encryption(dir.path()),
        Value::Null,
        "the cluster is untouched"
    );

    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let resumed = output(dir.path(), &["resume", &id, "--sandbox"]);
    assert_eq!(
        resumed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&resumed.stderr)
    );
    assert_eq!(
        cluster_encryption(dir.path())["infrastructureEncryption"],
        "Enabled"
    );
}

#[test]
fn without_a_terminal_a_rollback_that_deletes_needs_yes() {
    let dir = tempfile::tempdir().unwrap();
    let run = output(
        dir.path(),
        &["run", "pmk-new-cluster", "--sandbox", "--output", "json"],
    );
    assert_eq!(run.status.code(), Some(0));
    let id = serde_json::from_slice::<Value>(&run.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let refused = output(dir.path(), &["rollback", &id, "--sandbox"]);
    let said = String::from_utf8_lossy(&refused.stderr);
    assert_eq!(refused.status.code(), Some(2), "{said}");
    assert!(said.contains("deletes") && said.contains("--yes"), "{said}");
    assert_eq!(runs(dir.path())[0]["status"], "succeeded", "nothing undone");

    let agreed = output(dir.path(), &["rollback", &id, "--sandbox", "--yes"]);
    assert_eq!(
        agreed.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&agreed.stderr)
    );
    assert_eq!(runs(dir.path())[0]["status"], "rolled_back");
}

#[test]
fn on_a_terminal_run_asks_and_only_yes_goes_ahead() {
    let dir = tempfile::tempdir().unwrap();
    let mut declined = rexpect::session::spawn_command(
        kmsflow(dir.path(), &["run", "pmk-existing-cluster", "--sandbox"]),
        Some(30_000),
    )
    .unwrap();
    declined.exp_string("point of no return").unwrap();
    declined.exp_string("Enter a value:").unwrap();
    declined.send_line("y").unwrap();
    declined.exp_string("not confirmed").unwrap();
    assert_eq!(exit_code(&mut declined), 1);
    assert!(runs(dir.path()).is_empty(), "declining starts nothing");

    let mut agreed = rexpect::session::spawn_command(
        kmsflow(dir.path(), &["run", "pmk-existing-cluster", "--sandbox"]),
        Some(60_000),
    )
    .unwrap();
    agreed.exp_string("Enter a value:").unwrap();
    agreed.send_line("yes").unwrap();
    agreed.exp_string("succeeded").unwrap();
    agreed.exp_eof().unwrap();
    assert_eq!(exit_code(&mut agreed), 0);
    assert_eq!(runs(dir.path())[0]["status"], "succeeded");
}
