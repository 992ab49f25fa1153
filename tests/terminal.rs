//! What a run looks like while it happens: on a terminal (a real pty), live lines for running
//! steps with what they wait for, colour, and a closing summary; piped, plain lines without
//! escape codes; under `--log-format json`, JSON lines with their time.

use std::path::Path;
use std::process::Command;

/// The cluster's update takes long enough to be seen waiting.
const SLOW: &str = "delays: { cluster_operation: 3s }\n";

fn kmsflow(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(args)
        .current_dir(dir)
        .env("KMSFLOW_STATE", dir.join("state.db"))
        .env("TERM", "xterm")
        .env_remove("NO_COLOR")
        .env_remove("AZURE_SUBSCRIPTION_ID")
        .env_remove("KMSFLOW_LOG");
    command
}

const RUN: &[&str] = &[
    "run",
    "pmk-existing-cluster",
    "--sandbox",
    "--sandbox-faults",
    "slow.yaml",
    "--yes",
];

#[test]
fn on_a_terminal_a_running_step_shows_what_it_waits_for_in_colour() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    let mut session =
        rexpect::session::spawn_command(kmsflow(dir.path(), RUN), Some(60_000)).unwrap();
    // The live line: the step, what the cluster is doing, and the time it has taken.
    let (before, _) = session
        .exp_regex(r"cluster\s+`aks-sandbox` (operation InProgress|Updating)")
        .unwrap();
    // The point of no return's word is painted (and reset after it).
    assert!(
        before.contains("WARNING\u{1b}[0m"),
        "colour on a terminal: {before:?}"
    );
    let rest = session.exp_eof().unwrap();
    assert!(rest.contains("succeeded"), "{rest}");
    assert!(
        regex_like(&rest, "kmsflow: ", " in "),
        "a closing summary: {rest}"
    );
}

#[test]
fn piped_each_change_of_what_a_step_waits_for_is_one_plain_line() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    let output = kmsflow(dir.path(), RUN).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        !stderr.contains('\u{1b}'),
        "no escape codes when piped: {stderr}"
    );
    let waiting: Vec<&str> = stderr
        .lines()
        .filter(|l| l.contains("waiting") && l.contains("`aks-sandbox` operation InProgress"))
        .collect();
    assert_eq!(waiting.len(), 1, "one line, not one per poll: {stderr}");
    assert!(
        stderr
            .lines()
            .any(|l| l.starts_with("kmsflow: ") && l.contains("updated") && l.contains(" in ")),
        "the summary counts outcomes: {stderr}"
    );
}

#[test]
fn under_json_logs_every_line_is_json_with_a_time() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    let mut args = RUN.to_vec();
    args.extend(["--log-format", "json"]);
    let output = kmsflow(dir.path(), &args).output().unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| serde_json::from_str(line).unwrap_or_else(|_| panic!("not JSON: {line}")))
        .collect();
    assert!(events.iter().all(|e| e["ts"].is_string()), "{stderr}");
    assert!(
        events.iter().any(|e| e["event"] == "step_waiting_on"),
        "{stderr}"
    );
    assert!(
        events.iter().any(|e| e["event"] == "run_summary"),
        "{stderr}"
    );

    // A refusal is JSON too.
    let refused = kmsflow(
        dir.path(),
        &["run", "no-such-runbook", "--log-format", "json"],
    )
    .output()
    .unwrap();
    let line = String::from_utf8_lossy(&refused.stderr);
    let error: serde_json::Value = serde_json::from_str(line.trim()).unwrap();
    assert_eq!(error["level"], "ERROR", "{line}");
}

/// Whether a line starts with `start` and later holds `then`.
fn regex_like(text: &str, start: &str, then: &str) -> bool {
    text.lines()
        .any(|l| l.contains(start) && l[l.find(start).unwrap()..].contains(then))
}

#[test]
fn on_a_terminal_a_rollout_shows_its_waves_and_each_target_in_flight_with_its_step() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    std::fs::write(
        dir.path().join("fleet.csv"),
        "resource_group,cluster\nrg-kms-sandbox,aks-sandbox\n",
    )
    .unwrap();
    let mut args = RUN.to_vec();
    args.extend(["--targets", "fleet.csv"]);
    let mut session =
        rexpect::session::spawn_command(kmsflow(dir.path(), &args), Some(60_000)).unwrap();
    // The overall line, then the target's own live line with the step it is in.
    session
        .exp_regex(r"wave 1/1, 1 in flight, 0 failed")
        .unwrap();
    session
        .exp_regex(r"rg-kms-sandbox/aks-sandbox\s+cluster")
        .unwrap();
    let rest = session.exp_eof().unwrap();
    assert!(
        rest.contains("rollout") && rest.contains("1 succeeded"),
        "the closing line: {rest}"
    );
}
