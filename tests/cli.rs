//! End-to-end tests of the `kmsflow` binary: crash and resume, locks, rollback, approvals,
//! changed runbooks, secrets and exit codes. Each test works in its own temporary folder with
//! its own state file.

mod support;

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

struct Workspace {
    dir: tempfile::TempDir,
}

impl Workspace {
    fn new() -> Workspace {
        Workspace {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn path(&self, name: &str) -> PathBuf {
        self.dir.path().join(name)
    }

    fn write(&self, name: &str, text: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    fn read(&self, name: &str) -> String {
        std::fs::read_to_string(self.path(name)).unwrap_or_default()
    }

    fn command(&self, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
        command
            .args(support::consenting(args))
            .current_dir(self.dir.path())
            .env("KMSFLOW_STATE", self.path("state.db"))
            .env_remove("KMSFLOW_LOG");
        command
    }

    fn run(&self, args: &[&str]) -> Output {
        self.command(args).output().unwrap()
    }

    /// Starts kmsflow and reads its stderr until a line contains `marker`; returns the child
    /// and the lines read so far.
    fn spawn_until(&self, args: &[&str], marker: &str) -> (Child, Vec<String>) {
        let mut child = self
            .command(args)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let stderr = child.stderr.take().unwrap();
        let (sender, receiver) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines() {
                let Ok(line) = line else { break };
                if sender.send(line).is_err() {
                    break;
                }
            }
        });
        let mut lines = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        while Instant::now() < deadline {
            match receiver.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => {
                    let found = line.contains(marker);
                    lines.push(line);
                    if found {
                        // Keep draining in the background so the child never blocks on stderr.
                        std::thread::spawn(move || while receiver.recv().is_ok() {});
                        return (child, lines);
                    }
                }
                Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
                Err(_) => break,
            }
        }
        let _ = child.kill();
        let _ = child.wait();
        panic!(
            "`{marker}` never appeared; stderr so far:\n{}",
            lines.join("\n")
        );
    }

    fn show(&self, run_id: &str) -> Value {
        let output = self.run(&["show", run_id, "--output", "json"]);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice(&output.stdout).unwrap()
    }

    fn events(&self, run_id: &str) -> Vec<Value> {
        let output = self.run(&["events", run_id, "--output", "json"]);
        assert!(output.status.success(), "{}", stderr(&output));
        serde_json::from_slice::<Value>(&output.stdout)
            .unwrap()
            .as_array()
            .unwrap()
            .clone()
    }
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

fn run_id_from(lines: &[String]) -> String {
    lines
        .iter()
        .find_map(|l| l.strip_prefix("kmsflow: starting run "))
        .and_then(|rest| rest.split_whitespace().next())
        .expect("the first line names the run")
        .to_owned()
}

fn run_id_of(output: &Output) -> String {
    run_id_from(
        &stderr(output)
            .lines()
            .map(str::to_owned)
            .collect::<Vec<_>>(),
    )
}

fn step<'a>(run: &'a Value, id: &str) -> &'a Value {
    run["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == id)
        .unwrap_or_else(|| panic!("no step {id} in {run}"))
}

fn kill_9(child: &mut Child) {
    child.kill().unwrap(); // SIGKILL on Unix
    child.wait().unwrap();
}

const JOURNAL: &str = r#"
name: journal
lock: "journal"
steps:
  - id: one
    uses: file
    with: { path: log.txt, content: "one\n", mode: append }
  - id: two
    uses: file
    needs: [one]
    with: { path: log.txt, content: "two\n", mode: append }
  - id: pause
    uses: sleep
    needs: [two]
    with: { duration: 2s }
  - id: three
    uses: file
    needs: [pause]
    with: { path: log.txt, content: "three\n", mode: append }
  - id: four
    uses: file
    needs: [three]
    with: { path: log.txt, content: "four\n", mode: append }
"#;

#[test]
fn a_run_killed_mid_step_resumes_and_applies_every_step_exactly_once() {
    let ws = Workspace::new();
    ws.write("journal.yaml", JOURNAL);
    let (mut child, lines) = ws.spawn_until(&["run", "journal.yaml"], "wait 2s");
    kill_9(&mut child);
    let run_id = run_id_from(&lines);
    assert_eq!(ws.read("log.txt"), "one\ntwo\n");
    assert_eq!(
        ws.show(&run_id)["status"],
        "running",
        "a killed run stays `running`"
    );

    let output = ws.run(&["resume", &run_id]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert_eq!(ws.read("log.txt"), "one\ntwo\nthree\nfour\n");
    let run = ws.show(&run_id);
    assert_eq!(run["status"], "succeeded");
    assert_eq!(
        step(&run, "pause")["attempts"],
        2,
        "the interrupted step ran again"
    );
    assert_eq!(step(&run, "one")["attempts"], 1);
    let applying: Vec<String> = ws
        .events(&run_id)
        .iter()
        .filter(|e| e["kind"] == "step_applying")
        .map(|e| e["step_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(applying, ["one", "two", "pause", "pause", "three", "four"]);
    assert!(stderr(&output).contains("succeeded before; outputs reused"));
}

#[test]
fn a_second_run_with_the_same_lock_key_exits_3_naming_the_holder() {
    let ws = Workspace::new();
    ws.write(
        "slow.yaml",
        r#"
name: slow
params:
  cluster: { type: string }
lock: "cluster/{{params.cluster}}"
steps:
  - id: hold
    uses: sleep
    with: { duration: 3s }
"#,
    );
    let (mut first, lines) =
        ws.spawn_until(&["run", "slow.yaml", "-p", "cluster=aks-1"], "wait 3s");
    let holder = run_id_from(&lines);
    let second = ws.run(&["run", "slow.yaml", "-p", "cluster=aks-1"]);
    assert_eq!(second.status.code(), Some(3), "{}", stderr(&second));
    assert!(
        stderr(&second).contains(&format!("held by run `{holder}`")),
        "{}",
        stderr(&second)
    );
    // Another cluster is another lock.
    let (mut other, _) = ws.spawn_until(&["run", "slow.yaml", "-p", "cluster=aks-2"], "wait 3s");
    assert_eq!(first.wait().unwrap().code(), Some(0));
    assert_eq!(other.wait().unwrap().code(), Some(0));
    // The lock is free again.
    let (mut third, _) = ws.spawn_until(&["run", "slow.yaml", "-p", "cluster=aks-1"], "wait 3s");
    kill_9(&mut third);
}

#[test]
fn a_lock_whose_holder_was_killed_is_taken_over() {
    let ws = Workspace::new();
    ws.write("journal.yaml", JOURNAL);
    let (mut child, _) = ws.spawn_until(&["run", "journal.yaml"], "wait 2s");
    kill_9(&mut child);
    let output = ws.run(&["run", "journal.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
}

#[test]
fn rollback_undoes_changes_newest_first_and_restores_what_existed() {
    let ws = Workspace::new();
    ws.write("existing.txt", "original\n");
    ws.write(
        "change.yaml",
        r#"
name: change
steps:
  - id: first
    uses: file
    with: { path: a.txt, content: "a" }
  - id: second
    uses: file
    needs: [first]
    with: { path: b.txt, content: "b" }
  - id: third
    uses: file
    needs: [second]
    with: { path: existing.txt, content: "changed\n" }
  - id: unchanged
    uses: noop
    needs: [third]
  - id: check
    uses: assert
    needs: [unchanged]
    with: { condition: "false", message: the change broke something }
"#,
    );
    let output = ws.run(&["run", "change.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    assert!(stderr(&output).contains("the change broke something"));
    assert!(
        stderr(&output).contains("kmsflow rollback"),
        "a failed run says how to undo it"
    );
    let run_id = run_id_of(&output);
    assert_eq!(ws.read("existing.txt"), "changed\n");

    let output = ws.run(&["rollback", &run_id]);
    assert!(output.status.success(), "{}", stderr(&output));
    assert!(!ws.path("a.txt").exists());
    assert!(!ws.path("b.txt").exists());
    assert_eq!(ws.read("existing.txt"), "original\n");
    let run = ws.show(&run_id);
    assert_eq!(run["status"], "rolled_back");
    assert_eq!(
        step(&run, "unchanged")["status"],
        "succeeded",
        "nothing to undo there"
    );
    let order: Vec<String> = ws
        .events(&run_id)
        .iter()
        .filter(|e| e["kind"] == "step_rolled_back")
        .map(|e| e["step_id"].as_str().unwrap().to_owned())
        .collect();
    assert_eq!(order, ["third", "second", "first"]);
    // A rolled-back run cannot be rolled back again or resumed.
    assert_eq!(ws.run(&["rollback", &run_id]).status.code(), Some(2));
    assert_eq!(ws.run(&["resume", &run_id]).status.code(), Some(2));
}

/// Makes a file, waits for approval, then makes another with the approver's name.
const GATED: &str = r#"
name: gated
steps:
  - id: prepare
    uses: file
    with: { path: prepared.txt, content: "ready" }
  - id: gate
    uses: approve
    needs: [prepare]
    with: { message: look at prepared.txt }
  - id: go
    uses: file
    needs: [gate]
    with: { path: done.txt, content: "approved by {{steps.gate.outputs.approved_by}}" }
"#;

#[test]
fn an_approve_step_pauses_the_run_until_approved() {
    let ws = Workspace::new();
    ws.write("gated.yaml", GATED);
    let output = ws.run(&["run", "gated.yaml"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    // The approver is told what to check, where the run stops and where they look.
    assert!(
        stderr(&output).contains("for approval: look at prepared.txt"),
        "{}",
        stderr(&output)
    );
    let run_id = run_id_of(&output);
    let shown = ws.run(&["show", &run_id]);
    assert!(
        String::from_utf8_lossy(&shown.stdout)
            .contains("waiting for approval of `gate`: look at prepared.txt"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let events = ws.run(&["events", &run_id]);
    assert!(String::from_utf8_lossy(&events.stdout).contains("look at prepared.txt"));
    assert_eq!(ws.show(&run_id)["status"], "waiting");
    assert!(!ws.path("done.txt").exists());
    // Resuming before approval waits again.
    assert_eq!(ws.run(&["resume", &run_id]).status.code(), Some(4));

    let approve = ws.run(&["approve", &run_id, "gate", "--by", "alice@ops"]);
    assert!(approve.status.success(), "{}", stderr(&approve));
    // A second approval is refused, naming the first, never written over it.
    let again = ws.run(&["approve", &run_id, "gate", "--by", "bob@ops"]);
    assert_eq!(again.status.code(), Some(2));
    assert!(
        stderr(&again).contains("approved already, by alice@ops (as "),
        "{}",
        stderr(&again)
    );
    let output = ws.run(&["resume", &run_id]);
    assert!(output.status.success(), "{}", stderr(&output));
    let run = ws.show(&run_id);
    let approved_by = step(&run, "gate")["outputs"]["approved_by"]
        .as_str()
        .unwrap()
        .to_owned();
    assert!(
        approved_by.starts_with("alice@ops (as ") && approved_by.contains('@'),
        "the name given and the OS user: {approved_by}"
    );
    assert_eq!(ws.read("done.txt"), format!("approved by {approved_by}"));
    // The run is not waiting any more: nothing to approve.
    let late = ws.run(&["approve", &run_id, "gate"]);
    assert_eq!(late.status.code(), Some(2));
    // Approving a step that does not exist is a usage error.
    assert_eq!(ws.run(&["approve", &run_id, "nope"]).status.code(), Some(2));
    let not_a_gate = ws.run(&["approve", &run_id, "prepare"]);
    assert_eq!(not_a_gate.status.code(), Some(2));
    assert!(stderr(&not_a_gate).contains("only `approve` steps take approvals"));
}

#[test]
fn resume_refuses_a_changed_runbook_unless_allowed() {
    let ws = Workspace::new();
    let text = r#"
name: flaky
steps:
  - id: flaky
    uses: fail
    with: { times: 1, message: not yet }
"#;
    ws.write("flaky.yaml", text);
    let output = ws.run(&["run", "flaky.yaml"]);
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let run_id = run_id_of(&output);
    ws.write(
        "flaky.yaml",
        &format!("{text}  - id: extra\n    uses: noop\n"),
    );

    let refused = ws.run(&["resume", &run_id]);
    assert_eq!(refused.status.code(), Some(2));
    assert!(
        stderr(&refused).contains("changed since run"),
        "{}",
        stderr(&refused)
    );
    assert!(stderr(&refused).contains("--allow-changed-runbook"));

    let allowed = ws.run(&["resume", &run_id, "--allow-changed-runbook"]);
    assert!(allowed.status.success(), "{}", stderr(&allowed));
    let run = ws.show(&run_id);
    assert_eq!(step(&run, "flaky")["attempts"], 2);
    assert_eq!(step(&run, "extra")["status"], "succeeded");
}

#[test]
fn secrets_never_reach_the_store_and_are_asked_for_again_on_resume() {
    let ws = Workspace::new();
    ws.write(
        "secret.yaml",
        r#"
name: secret
params:
  token: { type: string, secret: true }
steps:
  - id: use
    uses: noop
    with: { outputs: { header: "Bearer {{params.token}}" } }
  - id: boom
    uses: fail
    needs: [use]
    with: { times: 1, message: "rejected {{params.token}}" }
"#,
    );
    let secret = "hunter2-7f3a9c";
    let output = ws.run(&["run", "secret.yaml", "-p", &format!("token={secret}")]);
    assert_eq!(output.status.code(), Some(1));
    assert!(!stderr(&output).contains(secret), "{}", stderr(&output));
    let run_id = run_id_of(&output);
    let run = ws.show(&run_id);
    assert_eq!(run["params"]["token"], "***");
    // What a template made of the secret is secret whole.
    assert_eq!(step(&run, "use")["outputs"]["header"], "***");
    for file in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(ws.path(file)).unwrap_or_default();
        assert!(
            !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
            "{file} holds the secret"
        );
    }
    let missing = ws.run(&["resume", &run_id]);
    assert_eq!(missing.status.code(), Some(2));
    assert!(
        stderr(&missing).contains("parameter `token`: is required (secret"),
        "{}",
        stderr(&missing)
    );
    let resumed = ws
        .command(&["resume", &run_id])
        .env("KMSFLOW_PARAM_TOKEN", secret)
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
}

#[cfg(unix)]
#[test]
fn secrets_stay_out_of_logs_at_every_level_out_of_before_images_and_in_private_files() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    ws.write(
        "creds.yaml",
        r#"
name: creds
params:
  token: { type: string, secret: true }
steps:
  - id: write
    uses: file
    with: { path: creds.txt, content: "token={{params.token}}" }
"#,
    );
    let first = "first-secret-4b1d";
    let second = "second-secret-9e2c";
    for secret in [first, second] {
        let output = ws
            .command(&["run", "creds.yaml", "-p", &format!("token={secret}")])
            .env("KMSFLOW_LOG", "trace")
            .output()
            .unwrap();
        assert!(output.status.success(), "{}", stderr(&output));
        let logged = format!(
            "{}{}",
            stderr(&output),
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(
            !logged.contains(secret),
            "the log holds the secret:\n{logged}"
        );
        let mode = std::fs::metadata(ws.path("creds.txt"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "a file with a secret is private");
    }
    // The second run's before image is the file the first wrote: the first secret must not
    // be kept in it.
    for file in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(ws.path(file)).unwrap_or_default();
        for secret in [first, second] {
            assert!(
                !bytes.windows(secret.len()).any(|w| w == secret.as_bytes()),
                "{file} holds `{secret}`"
            );
        }
    }
}

#[cfg(unix)]
#[test]
fn the_state_file_is_private() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    // A read command makes no state file; the first run does.
    ws.write("noop.yaml", "name: n\nsteps:\n  - id: a\n    uses: noop\n");
    let output = ws.run(&["run", "noop.yaml"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let mode = std::fs::metadata(ws.path("state.db"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
}

#[cfg(unix)]
#[test]
fn ctrl_c_once_lets_running_steps_finish_and_exits_4() {
    let ws = Workspace::new();
    ws.write(
        "two.yaml",
        r#"
name: two
steps:
  - id: first
    uses: sleep
    with: { duration: 1s }
  - id: second
    uses: file
    needs: [first]
    with: { path: second.txt, content: x }
"#,
    );
    let (mut child, lines) = ws.spawn_until(&["run", "two.yaml"], "wait 1s");
    let status = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    assert_eq!(child.wait().unwrap().code(), Some(4));
    let run_id = run_id_from(&lines);
    let run = ws.show(&run_id);
    assert_eq!(run["status"], "interrupted");
    assert_eq!(
        step(&run, "first")["status"],
        "succeeded",
        "the running step finished"
    );
    assert_eq!(step(&run, "second")["status"], "pending");
    assert!(!ws.path("second.txt").exists());
    let resumed = ws.run(&["resume", &run_id]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert!(ws.path("second.txt").exists());
}

#[test]
fn run_output_json_follows_the_contract() {
    let ws = Workspace::new();
    let output = ws.run(&["run", "engine-drill", "-p", "soak=10ms", "--output", "json"]);
    assert!(output.status.success(), "{}", stderr(&output));
    let run: Value = serde_json::from_slice(&output.stdout).unwrap();
    let keys: Vec<&str> = run
        .as_object()
        .unwrap()
        .keys()
        .map(String::as_str)
        .collect();
    for key in [
        "id",
        "runbook",
        "status",
        "params",
        "started_at",
        "finished_at",
        "steps",
        "outputs",
    ] {
        assert!(keys.contains(&key), "missing `{key}` in {run}");
    }
    assert_eq!(run["status"], "succeeded");
    for step in run["steps"].as_array().unwrap() {
        for key in [
            "id", "uses", "status", "outcome", "attempts", "outputs", "error",
        ] {
            assert!(step.get(key).is_some(), "step lacks `{key}`: {step}");
        }
    }
    assert_eq!(step(&run, "approval")["status"], "skipped");
    assert_eq!(step(&run, "flaky-dependency")["attempts"], 3);
    // A second run changes nothing the first one wrote.
    let again = ws.run(&["run", "engine-drill", "-p", "soak=10ms", "--output", "json"]);
    let run: Value = serde_json::from_slice(&again.stdout).unwrap();
    assert_eq!(step(&run, "render-config")["outcome"], "unchanged");
}

#[test]
fn validate_and_bind_errors_exit_2() {
    let ws = Workspace::new();
    let valid = ws.run(&["validate", "engine-drill"]);
    assert_eq!(valid.status.code(), Some(0), "{}", stderr(&valid));
    let bad = ws.write("bad.yaml", "name: bad\nsteps:\n  - id: a\n    uses: slep\n");
    let invalid = ws.run(&["validate", bad.to_str().unwrap()]);
    assert_eq!(invalid.status.code(), Some(2));
    assert!(
        stderr(&invalid).contains("did you mean `sleep`?"),
        "{}",
        stderr(&invalid)
    );
    assert!(
        stderr(&invalid).contains("bad.yaml:4:11"),
        "{}",
        stderr(&invalid)
    );
    let unknown_param = ws.run(&["run", "engine-drill", "-p", "enviroment=production"]);
    assert_eq!(unknown_param.status.code(), Some(2));
    assert!(stderr(&unknown_param).contains("did you mean `environment`?"));
    let wrong_enum = ws.run(&["plan", "engine-drill", "-p", "environment=prod"]);
    assert_eq!(wrong_enum.status.code(), Some(2));
    let missing = ws.run(&["run", "no-such-runbook"]);
    assert_eq!(missing.status.code(), Some(2));
}

#[test]
fn plan_changes_nothing_and_reports_changes_with_detailed_exitcode() {
    let ws = Workspace::new();
    let plan = ws.run(&["plan", "engine-drill", "--detailed-exitcode"]);
    assert_eq!(plan.status.code(), Some(5), "{}", stderr(&plan));
    let text = String::from_utf8_lossy(&plan.stdout);
    assert!(
        text.contains("create target/kmsflow-drill/staging.conf"),
        "{text}"
    );
    assert!(
        !ws.path("target/kmsflow-drill/staging.conf").exists(),
        "plan wrote a file"
    );
    let run = ws.run(&["run", "engine-drill", "-p", "soak=10ms"]);
    assert!(run.status.success(), "{}", stderr(&run));
    let plan = ws.run(&["plan", "engine-drill", "--output", "json"]);
    let previews: Value = serde_json::from_slice(&plan.stdout).unwrap();
    let render = previews
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["step_id"] == "render-config")
        .unwrap();
    assert_eq!(render["change"]["change"], "unchanged", "{render}");
}

#[test]
fn a_run_recorded_without_its_fragments_resumes_with_the_unchanged_file_when_allowed() {
    let ws = Workspace::new();
    ws.write(
        "part.yaml",
        "name: part\nsteps:\n  - id: inner\n    uses: noop\n    with: { outputs: { value: from-part } }\noutputs:\n  value: \"{{steps.inner.outputs.value}}\"\n",
    );
    ws.write(
        "whole.yaml",
        r#"
name: whole
steps:
  - id: part
    uses: runbook
    with: { path: part.yaml }
  - id: once
    uses: fail
    needs: [part]
    with: { times: 1, message: first time only }
"#,
    );
    let first = ws.run(&["run", "whole.yaml"]);
    assert_eq!(first.status.code(), Some(1), "{}", stderr(&first));
    let run_id = run_id_of(&first);
    // As an older kmsflow recorded runs: the runbook's text, not its fragments.
    rusqlite::Connection::open(ws.path("state.db"))
        .unwrap()
        .execute("UPDATE runbook_sources SET fragments = '[]'", [])
        .unwrap();
    let refused = ws.run(&["resume", &run_id]);
    assert_ne!(refused.status.code(), Some(0));
    assert!(
        stderr(&refused).contains("resume it with `--allow-changed-runbook`"),
        "{}",
        stderr(&refused)
    );
    // What the error says to do works, although the file did not change.
    let resumed = ws.run(&["resume", &run_id, "--allow-changed-runbook"]);
    assert!(resumed.status.success(), "{}", stderr(&resumed));
}

/// `kmsflow runbooks | head`: a reader that goes away ends the listing quietly (141, as a
/// tool stopped by SIGPIPE), never a panic (101).
#[test]
fn a_closed_pipe_ends_output_quietly() {
    let ws = Workspace::new();
    // A run, so `runs`, `show` and `events` have something to print.
    ws.write("t.yaml", "name: t\nsteps:\n  - id: a\n    uses: noop\n");
    let run = ws.run(&["run", "t.yaml", "--output", "json"]);
    assert!(run.status.success());
    let run: Value = serde_json::from_slice(&run.stdout).unwrap();
    let id = run["id"].as_str().unwrap().to_owned();
    for args in [
        &["runbooks"][..],
        &["docs"],
        &["runs"],
        &["show", &id],
        &["events", &id],
    ] {
        let mut child = ws
            .command(args)
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        // The reader closes before the first line is written.
        drop(child.stdout.take());
        let output = child.wait_with_output().unwrap();
        let stderr = String::from_utf8_lossy(&output.stderr);
        assert!(!stderr.contains("panicked"), "{args:?}: {stderr}");
        assert_ne!(output.status.code(), Some(101), "{args:?}: {stderr}");
    }
}

/// A lock that renders to no name at all is refused before the run starts: it would be
/// shared by every run with those values, of any runbook.
#[test]
fn a_lock_that_renders_no_name_is_refused() {
    let ws = Workspace::new();
    ws.write(
        "locked.yaml",
        "name: locked\nparams:\n  rg: { type: string }\n  cluster: { type: string }\nlock: \"{{params.rg}}/{{params.cluster}}\"\nsteps:\n  - id: a\n    uses: noop\n",
    );
    let refused = ws.run(&["run", "locked.yaml", "-p", "rg=", "-p", "cluster="]);
    let stderr = String::from_utf8_lossy(&refused.stderr);
    assert!(!refused.status.success(), "{stderr}");
    assert!(
        stderr.contains("it reads `params.rg`, which is empty"),
        "{stderr}"
    );
    let runs = ws.run(&["runs", "--output", "json"]);
    let runs: Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert_eq!(
        runs.as_array().map_or(0, Vec::len),
        0,
        "no run was recorded"
    );
    assert!(
        ws.run(&["run", "locked.yaml", "-p", "rg=rg-1", "-p", "cluster=aks-1"])
            .status
            .success()
    );
}

/// A fragment is read only from inside the including runbook's folder: a symbolic link that
/// leads out of it is not followed, and `validate` never shows the other file's lines.
#[test]
fn a_fragment_link_out_of_the_runbooks_folder_is_not_followed() {
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("team")).unwrap();
    ws.write(
        "outside.yaml",
        "name: outside\nsteps:\n  - id: secret-looking-line\n    uses: noop\n",
    );
    #[cfg(unix)]
    std::os::unix::fs::symlink(ws.path("outside.yaml"), ws.path("team/link.yaml")).unwrap();
    ws.write(
        "team/main.yaml",
        "name: main\nsteps:\n  - id: include\n    uses: runbook\n    with: { path: link.yaml }\n",
    );
    let validated = ws.run(&["validate", ws.path("team/main.yaml").to_str().unwrap()]);
    let stderr = String::from_utf8_lossy(&validated.stderr);
    let stdout = String::from_utf8_lossy(&validated.stdout);
    assert!(!validated.status.success(), "{stdout}{stderr}");
    assert!(
        stderr.contains("no runbook fragment `link.yaml`"),
        "{stderr}"
    );
    assert!(!stderr.contains("secret-looking-line") && !stdout.contains("secret-looking-line"));
    // A fragment inside the folder is read as before.
    ws.write(
        "team/inner.yaml",
        "name: inner\nsteps:\n  - id: a\n    uses: noop\n",
    );
    ws.write(
        "team/ok.yaml",
        "name: ok\nsteps:\n  - id: include\n    uses: runbook\n    with: { path: inner.yaml }\n",
    );
    assert!(
        ws.run(&["validate", ws.path("team/ok.yaml").to_str().unwrap()])
            .status
            .success()
    );
}

/// No input overflows the stack: thousands of nested mappings, block or flow, are a
/// diagnostic (exit 2), not an abort; `run` refuses them the same way. Generated here, not
/// checked in.
#[test]
fn deep_nesting_is_a_diagnostic_not_a_crash() {
    let ws = Workspace::new();
    let mut block = String::from(
        "name: deep\nsteps:\n  - id: a\n    uses: noop\n    with:\n      outputs:\n        v:\n",
    );
    // One space deeper per level: 2,800 levels fit under the 4 MiB file limit.
    for level in 0..2_800 {
        block.push_str(&format!("{}k:\n", " ".repeat(10 + level)));
    }
    let flow = format!(
        "name: deep\nsteps:\n  - id: a\n    uses: noop\n    with: {{ outputs: {{ v: {}1{} }} }}\n",
        "{a: ".repeat(9_000),
        "}".repeat(9_000)
    );
    for (name, text) in [("block.yaml", block), ("flow.yaml", flow)] {
        ws.write(name, &text);
        for command in ["validate", "run"] {
            let output = ws.run(&[command, name]);
            let stderr = String::from_utf8_lossy(&output.stderr);
            assert_eq!(output.status.code(), Some(2), "{command} {name}: {stderr}");
            assert!(
                stderr.contains("nests deeper than 64 levels"),
                "{command} {name}: {stderr}"
            );
        }
    }
}

/// Size limits answer at once: a 50 MB runbook and one with 8,000 times the same step id get
/// a clear answer (the first drew 8,000 diagnostics and took a minute; the second never ended).
#[test]
fn huge_runbooks_get_a_quick_clear_answer() {
    let ws = Workspace::new();
    let mut huge = String::from("name: huge\nsteps:\n");
    while huge.len() < 50 << 20 {
        huge.push_str("  - id: s\n    uses: noop\n    with: { outputs: { v: \"xxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxxx\" } }\n");
    }
    ws.write("huge.yaml", &huge);
    let output = ws.run(&["validate", "huge.yaml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("a runbook may be at most 4194304 bytes"),
        "{stderr}"
    );

    let mut duplicates = String::from("name: dup\nsteps:\n");
    for _ in 0..8_000 {
        duplicates.push_str("  - id: a\n    uses: noop\n");
    }
    ws.write("dup.yaml", &duplicates);
    let output = ws.run(&["validate", "dup.yaml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr.contains("and 7949 more problems"),
        "{}",
        &stderr[stderr.len().saturating_sub(500)..]
    );
    assert!(stderr.contains("7999 problems"));
}

/// `validate --output sarif` is SARIF 2.1.0 with a result per problem at its line and column,
/// for code scanning; the exit code is still 2.
#[test]
fn validate_speaks_json_and_sarif_for_ci() {
    let ws = Workspace::new();
    ws.write(
        "bad.yaml",
        "name: bad\nsteps:\n  - id: a\n    uses: noop\n    if: \"no\"\n",
    );
    ws.write(
        "good.yaml",
        "name: good\nsteps:\n  - id: a\n    uses: noop\n",
    );
    let json = ws.run(&["validate", "bad.yaml", "good.yaml", "--output", "json"]);
    assert_eq!(json.status.code(), Some(2));
    let reports: Value = serde_json::from_slice(&json.stdout).unwrap();
    assert_eq!(reports[0]["valid"], false);
    assert_eq!(reports[0]["problems"][0]["line"], 5);
    assert_eq!(reports[0]["problems"][0]["column"], 9);
    assert_eq!(reports[1]["valid"], true);
    let sarif = ws.run(&["validate", "bad.yaml", "--output", "sarif"]);
    assert_eq!(sarif.status.code(), Some(2));
    let sarif: Value = serde_json::from_slice(&sarif.stdout).unwrap();
    assert_eq!(sarif["version"], "2.1.0");
    let result = &sarif["runs"][0]["results"][0];
    assert_eq!(result["ruleId"], "kmsflow::invalid_value");
    assert_eq!(
        result["locations"][0]["physicalLocation"]["region"]["startLine"],
        5
    );
    assert_eq!(
        sarif["runs"][0]["tool"]["driver"]["rules"][0]["id"],
        "kmsflow::invalid_value"
    );
}

/// A fragment step whose parameters read its own outputs is a diagnostic at the reference
/// (it used to be "error: 0 problems").
#[test]
fn a_fragment_fed_by_its_own_outputs_is_a_located_diagnostic() {
    let ws = Workspace::new();
    ws.write(
        "inner.yaml",
        "name: inner\nparams:\n  x: { type: string }\nsteps:\n  - id: a\n    uses: noop\n    with: { outputs: { y: \"{{params.x}}\" } }\noutputs:\n  y: \"{{steps.a.outputs.y}}\"\n",
    );
    ws.write(
        "outer.yaml",
        "name: outer\nsteps:\n  - id: cmk\n    uses: runbook\n    with: { path: inner.yaml, params: { x: \"{{steps.cmk.outputs.y}}\" } }\n",
    );
    let output = ws.run(&["validate", "outer.yaml", "--output", "json"]);
    assert_eq!(output.status.code(), Some(2));
    let reports: Value = serde_json::from_slice(&output.stdout).unwrap();
    let problems = reports[0]["problems"].as_array().unwrap();
    assert_eq!(problems.len(), 1, "{problems:#?}");
    assert!(
        problems[0]["message"]
            .as_str()
            .unwrap()
            .contains("cannot read its own outputs")
    );
    assert_eq!(problems[0]["line"], 5);
}

/// Shell completions and the man page come from the parser's own definitions.
#[test]
fn completions_and_the_man_page_cover_every_subcommand() {
    let ws = Workspace::new();
    for shell in ["bash", "zsh", "fish", "powershell", "elvish"] {
        let output = ws.run(&["completions", shell]);
        assert!(output.status.success(), "{shell}");
        let script = String::from_utf8_lossy(&output.stdout);
        for subcommand in ["validate", "plan", "rollback", "schedule", "sandbox"] {
            assert!(script.contains(subcommand), "{shell} lacks {subcommand}");
        }
    }
    let bash = ws.run(&["completions", "bash"]);
    ws.write("kmsflow.bash", &String::from_utf8_lossy(&bash.stdout));
    let syntax = Command::new("bash")
        .args(["-n", "kmsflow.bash"])
        .current_dir(ws.dir.path())
        .status()
        .unwrap();
    assert!(syntax.success(), "the bash script parses");
    let man = ws.run(&["man"]);
    let page = String::from_utf8_lossy(&man.stdout);
    assert!(man.status.success());
    assert!(
        page.contains(".TH kmsflow 1") && page.contains("rollback"),
        "{page}"
    );
}

/// A failure is printed once: on its step's line, not again by the log and the summary.
#[test]
fn a_failure_is_printed_once() {
    let ws = Workspace::new();
    ws.write("f.yaml", "name: f\nsteps:\n  - id: boom\n    uses: fail\n");
    let output = ws.run(&["run", "f.yaml"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(1));
    assert_eq!(stderr.matches("failed on purpose").count(), 1, "{stderr}");
    assert!(stderr.contains("failed at step `boom`"), "{stderr}");
}

/// Piped, the logs carry no colour codes (they did: colour was on whatever the output).
#[test]
fn piped_logs_have_no_colour() {
    let ws = Workspace::new();
    ws.write("f.yaml", "name: f\nsteps:\n  - id: boom\n    uses: fail\n");
    let output = ws
        .command(&["run", "f.yaml"])
        .env("KMSFLOW_LOG", "debug")
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(stderr.contains("DEBUG"), "{stderr}");
    assert!(!stderr.contains('\u{1b}'), "{stderr}");
}

/// A folder named like a bundled runbook does not shadow it: the bundled one is used, and
/// the user is told.
#[test]
fn a_folder_named_like_a_bundled_runbook_does_not_shadow_it() {
    let ws = Workspace::new();
    std::fs::create_dir(ws.path("verify-kms")).unwrap();
    let output = ws.run(&["validate", "verify-kms"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(output.status.success(), "{stderr}");
    assert!(
        stderr.contains("is a folder here; using the bundled runbook `verify-kms`"),
        "{stderr}"
    );
    std::fs::create_dir(ws.path("not-a-runbook")).unwrap();
    let output = ws.run(&["validate", "not-a-runbook"]);
    assert_eq!(output.status.code(), Some(2));
}

/// A state path that is a folder or a file that is not a state file is a usage error (2)
/// naming the file and what to do, not SQLite's "file is not a database" (exit 1).
#[test]
fn a_bad_state_path_is_named_with_what_to_do() {
    let ws = Workspace::new();
    ws.write("notes.txt", "not a database\n");
    let output = ws.run(&["runs", "--state", "notes.txt"]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("`notes.txt` is not a kmsflow state file"),
        "{stderr}"
    );
    let folder = ws.dir.path().to_str().unwrap().to_owned();
    let output = ws.run(&["runs", "--state", &folder]);
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert_eq!(output.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("is a folder"), "{stderr}");
}

/// `runs` lines its columns up whatever the width of ids and names.
#[test]
fn the_runs_table_is_aligned() {
    let ws = Workspace::new();
    ws.write(
        "a-runbook-with-a-long-name.yaml",
        "name: a-runbook-with-a-long-name\nsteps:\n  - id: a\n    uses: noop\n",
    );
    assert!(
        ws.run(&["run", "a-runbook-with-a-long-name.yaml"])
            .status
            .success()
    );
    let table = String::from_utf8_lossy(&ws.run(&["runs"]).stdout).into_owned();
    let lines: Vec<&str> = table.lines().collect();
    let column = |line: &str, word: &str| line.find(word).unwrap();
    assert_eq!(
        column(lines[0], "runbook"),
        column(lines[1], "a-runbook-with-a-long-name"),
        "{table}"
    );
    assert_eq!(
        column(lines[0], "status"),
        column(lines[1], "succeeded"),
        "{table}"
    );
}

/// Read commands work on a state file this user may not write (a copy from CI, a colleague's
/// file): `runs`, `show` and `events` read it without creating or migrating anything. Root
/// writes whatever the mode says, so as root the reader is another user (`setpriv`).
#[test]
fn read_commands_work_on_a_state_file_this_user_cannot_write() {
    use std::os::unix::fs::PermissionsExt;
    let ws = Workspace::new();
    ws.write("t.yaml", "name: t\nsteps:\n  - id: a\n    uses: noop\n");
    let run = ws.run(&["run", "t.yaml", "--output", "json"]);
    let id = serde_json::from_slice::<Value>(&run.stdout).unwrap()["id"]
        .as_str()
        .unwrap()
        .to_owned();
    let shared = ws.path("shared");
    std::fs::create_dir(&shared).unwrap();
    std::fs::copy(ws.path("state.db"), shared.join("state.db")).unwrap();
    std::fs::set_permissions(&shared, std::fs::Permissions::from_mode(0o555)).unwrap();
    std::fs::set_permissions(
        shared.join("state.db"),
        std::fs::Permissions::from_mode(0o444),
    )
    .unwrap();
    std::fs::set_permissions(ws.dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let is_root =
        std::fs::metadata("/proc/self").is_ok_and(|m| std::os::unix::fs::MetadataExt::uid(&m) == 0);
    let read = |args: &[&str]| {
        let mut command = if is_root {
            let mut command = Command::new("setpriv");
            command
                .args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(env!("CARGO_BIN_EXE_kmsflow"));
            command
        } else {
            Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        };
        command
            .args(args)
            .env("KMSFLOW_STATE", shared.join("state.db"))
            .env("HOME", &shared)
            .current_dir(&shared)
            .output()
            .unwrap()
    };
    for args in [&["runs"][..], &["show", &id], &["events", &id]] {
        let output = read(args);
        assert!(
            output.status.success(),
            "{args:?}: {}",
            String::from_utf8_lossy(&output.stderr)
        );
    }
    assert!(String::from_utf8_lossy(&read(&["runs"]).stdout).contains(&id[..8]));
    let left: Vec<_> = std::fs::read_dir(&shared).unwrap().collect();
    assert_eq!(left.len(), 1, "nothing was created beside the file");
}

/// `reject` refuses a waiting approval: the run fails at that step with who and why, the
/// journal records it, a later approval is refused, and the run can be rolled back.
#[test]
fn a_rejected_approval_fails_the_run_at_that_step_and_it_rolls_back() {
    let ws = Workspace::new();
    ws.write("gated.yaml", GATED);
    let output = ws.run(&["run", "gated.yaml"]);
    assert_eq!(output.status.code(), Some(4), "{}", stderr(&output));
    let run_id = run_id_of(&output);
    let no_reason = ws.run(&["reject", &run_id, "gate", "--reason", " "]);
    assert_eq!(no_reason.status.code(), Some(2));
    assert_eq!(ws.show(&run_id)["status"], "waiting");

    let rejected = ws.run(&[
        "reject",
        &run_id,
        "gate",
        "--reason",
        "prepared.txt is wrong",
        "--by",
        "carol@ops",
    ]);
    assert!(rejected.status.success(), "{}", stderr(&rejected));
    let run = ws.show(&run_id);
    assert_eq!(run["status"], "failed");
    let error = run["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("gate")
            && error.contains("carol@ops")
            && error.contains("prepared.txt is wrong"),
        "{run}"
    );
    assert_eq!(step(&run, "gate")["status"], "failed");
    let events = ws.run(&["events", &run_id, "--output", "json"]);
    let journal = String::from_utf8_lossy(&events.stdout);
    assert!(
        journal.contains("step_rejected") && journal.contains("carol@ops"),
        "{journal}"
    );

    // Decided once: neither an approval nor a second rejection lands now.
    let approve = ws.run(&["approve", &run_id, "gate", "--by", "alice@ops"]);
    assert_eq!(approve.status.code(), Some(2), "{}", stderr(&approve));
    let again = ws.run(&["reject", &run_id, "gate", "--reason", "again"]);
    assert_eq!(again.status.code(), Some(2), "{}", stderr(&again));
    assert!(!ws.path("done.txt").exists(), "nothing past the gate ran");

    let rollback = ws.run(&["rollback", &run_id]);
    assert!(rollback.status.success(), "{}", stderr(&rollback));
    assert!(
        !ws.path("prepared.txt").exists(),
        "what the run made is undone"
    );
}

const SLOW: &str = r#"
name: slow
steps:
  - id: first
    uses: file
    with: { path: first.txt, content: one }
  - id: nap
    uses: sleep
    needs: [first]
    with: { duration: 2s }
  - id: last
    uses: file
    needs: [nap]
    with: { path: last.txt, content: two }
"#;

/// The newest run's id.
fn newest_run(ws: &Workspace) -> String {
    let runs: Value =
        serde_json::from_slice(&ws.run(&["runs", "--output", "json"]).stdout).unwrap();
    runs[0]["id"].as_str().unwrap().to_owned()
}

#[test]
fn cancel_from_another_shell_drains_the_run_as_ctrl_c_would_and_is_journaled() {
    let ws = Workspace::new();
    ws.write("slow.yaml", SLOW);
    let running = ws
        .command(&["run", "slow.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // Wait for the event: the first step's file, then the run in the store.
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ws.read("first.txt").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the run never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    let id = newest_run(&ws);
    let cancel = ws.run(&["cancel", &id, "--reason", "wrong cluster", "--by", "ana"]);
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    assert!(
        String::from_utf8_lossy(&cancel.stdout).contains("interrupted"),
        "{}",
        String::from_utf8_lossy(&cancel.stdout)
    );
    let ended = running.wait_with_output().unwrap();
    assert_eq!(ended.status.code(), Some(4), "{}", stderr(&ended));
    assert!(
        ws.read("last.txt").is_empty(),
        "no step started after the cancel"
    );
    let events: Value =
        serde_json::from_slice(&ws.run(&["events", &id, "--output", "json"]).stdout).unwrap();
    let request = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "cancel_requested")
        .expect("the request is journaled");
    assert_eq!(request["detail"]["reason"], "wrong cluster");
    assert!(
        request["detail"]["by"]
            .as_str()
            .unwrap()
            .starts_with("ana (as ")
    );
    // Nothing is running any more: a second cancel is refused; resume finishes the run.
    assert_eq!(ws.run(&["cancel", &id]).status.code(), Some(2));
    let resumed = ws.run(&["resume", &id]);
    assert_eq!(resumed.status.code(), Some(0), "{}", stderr(&resumed));
    assert_eq!(ws.read("last.txt"), "two");
}

#[test]
fn cancel_of_a_run_whose_process_was_killed_marks_it_interrupted() {
    let ws = Workspace::new();
    ws.write("slow.yaml", SLOW);
    let mut running = ws
        .command(&["run", "slow.yaml"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    while ws.read("first.txt").is_empty() {
        assert!(std::time::Instant::now() < deadline, "the run never began");
        std::thread::sleep(Duration::from_millis(20));
    }
    running.kill().unwrap();
    running.wait().unwrap();
    let id = newest_run(&ws);
    let cancel = ws.run(&["cancel", &id]);
    assert_eq!(cancel.status.code(), Some(0), "{}", stderr(&cancel));
    assert!(String::from_utf8_lossy(&cancel.stdout).contains("process is gone"));
    let shown: Value =
        serde_json::from_slice(&ws.run(&["show", &id, "--output", "json"]).stdout).unwrap();
    assert_eq!(shown["status"], "interrupted");
}

const CHAIN: &str = r#"
name: chain
steps:
  - id: a
    uses: file
    with: { path: a.txt, content: "a" }
  - id: b
    uses: file
    needs: [a]
    with: { path: b.txt, content: "b" }
  - id: c
    uses: file
    needs: [b]
    with: { path: c.txt, content: "c" }
  - id: side
    uses: file
    needs: [a]
    with: { path: side.txt, content: "side" }
"#;

#[test]
fn resume_from_a_step_runs_it_and_what_follows_again_and_rollback_still_undoes_them() {
    let ws = Workspace::new();
    ws.write("chain.yaml", CHAIN);
    assert_eq!(ws.run(&["run", "chain.yaml"]).status.code(), Some(0));
    let id = newest_run(&ws);
    // Someone removed two files; `b` and what follows it must run again, nothing else.
    std::fs::remove_file(ws.path("b.txt")).unwrap();
    std::fs::remove_file(ws.path("side.txt")).unwrap();
    // A succeeded run is not resumed without --from.
    assert_eq!(ws.run(&["resume", &id]).status.code(), Some(2));
    let dry = ws.run(&[
        "resume",
        &id,
        "--from",
        "b",
        "--dry-run",
        "--output",
        "json",
    ]);
    assert_eq!(dry.status.code(), Some(0), "{}", stderr(&dry));
    let dry: Value = serde_json::from_slice(&dry.stdout).unwrap();
    assert_eq!(dry["run_again"], serde_json::json!(["b", "c"]));
    assert_eq!(dry["reused"], serde_json::json!(["a", "side"]));
    assert!(ws.read("b.txt").is_empty(), "a dry run changes nothing");
    assert_eq!(
        ws.run(&["resume", &id, "--from", "nope"]).status.code(),
        Some(2)
    );
    let again = ws.run(&[
        "resume",
        &id,
        "--from",
        "b",
        "--by",
        "ana",
        "--reason",
        "b.txt was deleted",
    ]);
    assert_eq!(again.status.code(), Some(0), "{}", stderr(&again));
    assert_eq!(ws.read("b.txt"), "b");
    assert!(
        ws.read("side.txt").is_empty(),
        "not downstream of b: not run again"
    );
    let events: Value =
        serde_json::from_slice(&ws.run(&["events", &id, "--output", "json"]).stdout).unwrap();
    let resumed = events
        .as_array()
        .unwrap()
        .iter()
        .rfind(|e| e["kind"] == "run_resumed")
        .unwrap();
    assert_eq!(resumed["detail"]["from"], "b");
    assert_eq!(
        resumed["detail"]["run_again"],
        serde_json::json!(["b", "c"])
    );
    assert!(
        resumed["detail"]["by"]
            .as_str()
            .unwrap()
            .starts_with("ana (as ")
    );
    assert_eq!(resumed["detail"]["reason"], "b.txt was deleted");
    // `c` found its file as it left it; it is still what the run created, and rollback
    // deletes it.
    let shown: Value =
        serde_json::from_slice(&ws.run(&["show", &id, "--output", "json"]).stdout).unwrap();
    let c = shown["steps"]
        .as_array()
        .unwrap()
        .iter()
        .find(|s| s["id"] == "c")
        .unwrap();
    assert_eq!(c["outcome"], "created", "{c}");
    let undone = ws.run(&["rollback", &id, "--reason", "not needed after all"]);
    assert_eq!(undone.status.code(), Some(0), "{}", stderr(&undone));
    for file in ["a.txt", "b.txt", "c.txt"] {
        assert!(!ws.path(file).exists(), "{file} is undone");
    }
    let events: Value =
        serde_json::from_slice(&ws.run(&["events", &id, "--output", "json"]).stdout).unwrap();
    let rollback = events
        .as_array()
        .unwrap()
        .iter()
        .find(|e| e["kind"] == "rollback_started")
        .unwrap();
    assert!(rollback["detail"]["by"].as_str().is_some(), "{rollback}");
    assert_eq!(rollback["detail"]["reason"], "not needed after all");
}

/// A newcomer whose state folder cannot be made (here its parent is a file; for a user, a home
/// that is not theirs to write) is told what to do, not only what failed.
#[test]
fn a_state_folder_that_cannot_be_made_says_how_to_put_the_state_elsewhere() {
    let ws = Workspace::new();
    let blocker = ws.write("not-a-folder", "");
    let out = ws
        .command(&["run", "pmk-existing-cluster", "--sandbox"])
        .env_remove("KMSFLOW_STATE")
        .env("XDG_STATE_HOME", &blocker)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2), "{}", stderr(&out));
    let said = stderr(&out);
    assert!(
        said.contains("cannot create the state folder") && said.contains("pass --state FILE"),
        "{said}"
    );
}

const SECRET_FORMS: &str = r#"
name: forms
params:
  token: { type: string, secret: true }
  pin: { type: int, secret: true }
steps:
  - id: use
    uses: noop
    with:
      outputs:
        escaped: "{{json params.token}}"
        pin: "{{params.pin}}"
  - id: boom
    uses: fail
    needs: [use]
    with: { times: 1, message: "rejected {{json params.token}}" }
"#;

#[test]
fn a_secret_from_standard_input_is_masked_in_every_form_and_the_command_line_warns() {
    let ws = Workspace::new();
    ws.write("forms.yaml", SECRET_FORMS);
    // A secret with characters JSON escapes: echoed escaped (as an Azure error echoes a
    // body), it must still be masked.
    let secret = "pa\"ss\\wo\trd-51c2";
    let mut child = ws
        .command(&["run", "forms.yaml", "-p", "token=@-", "-p", "pin=8675309"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        child.stdin.as_mut().unwrap(),
        format!("{secret}\n").as_bytes(),
    )
    .unwrap();
    drop(child.stdin.take());
    let output = child.wait_with_output().unwrap();
    assert_eq!(output.status.code(), Some(1), "{}", stderr(&output));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    let escaped = serde_json::to_string(secret).unwrap();
    let escaped = &escaped[1..escaped.len() - 1];
    for form in [secret, escaped, "8675309"] {
        assert!(!printed.contains(form), "{form} printed:\n{printed}");
    }
    assert!(
        printed.contains("`-p pin=...` puts the secret `pin` on the command line"),
        "the secret given on the command line is warned of:\n{printed}"
    );
    assert!(
        !printed.contains("`-p token=...`"),
        "not the one read from standard input:\n{printed}"
    );
    let run = ws.show(&run_id_of(&output));
    assert_eq!(step(&run, "use")["outputs"]["pin"], "***");
    assert_eq!(step(&run, "use")["outputs"]["escaped"], "***");
    for file in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(ws.path(file)).unwrap_or_default();
        for form in [secret, escaped, "8675309"] {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_bytes()),
                "{file} holds {form}"
            );
        }
    }
}

#[test]
fn a_secret_shorter_than_four_characters_is_refused() {
    let ws = Workspace::new();
    ws.write("forms.yaml", SECRET_FORMS);
    let output = ws
        .command(&["run", "forms.yaml"])
        .env("KMSFLOW_PARAM_TOKEN", "abc")
        .env("KMSFLOW_PARAM_PIN", "86753")
        .output()
        .unwrap();
    assert_eq!(output.status.code(), Some(2));
    assert!(
        stderr(&output).contains("a secret must be at least 4 characters"),
        "{}",
        stderr(&output)
    );
}

#[test]
fn a_template_nested_thousands_deep_is_refused_cleanly_by_validate_and_run() {
    let ws = Workspace::new();
    // Generated here, not checked in: 5,000 nested subexpressions (65 KB) aborted the
    // process with a stack overflow before nesting was bounded.
    let deep = format!(
        "{{{{concat {}params.a{}}}}}",
        "(concat ".repeat(5_000),
        ")".repeat(5_000)
    );
    ws.write(
        "deep.yaml",
        &format!(
            "name: deep\nparams:\n  a: {{ type: string, default: x }}\nsteps:\n  - id: s\n    uses: noop\n    with: {{ outputs: {{ v: \"{}\" }} }}\n",
            deep.replace('"', "\\\"")
        ),
    );
    for command in [&["validate", "deep.yaml"][..], &["run", "deep.yaml"][..]] {
        let output = ws.run(command);
        assert_eq!(
            output.status.code(),
            Some(2),
            "{command:?}: {}",
            stderr(&output)
        );
        assert!(
            stderr(&output).contains("nests blocks and subexpressions more than 32 deep"),
            "{command:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn a_read_command_never_creates_a_store_and_a_state_that_is_not_a_file_is_refused() {
    let ws = Workspace::new();
    let missing = ws.path("not/yet/state.db");
    let runs = ws
        .command(&["runs", "--output", "json"])
        .env("KMSFLOW_STATE", &missing)
        .output()
        .unwrap();
    assert!(runs.status.success(), "{}", stderr(&runs));
    assert_eq!(String::from_utf8_lossy(&runs.stdout).trim(), "[]");
    for command in [
        &["show", "20260101-000000-00000000"][..],
        &["events", "20260101-000000-00000000"][..],
    ] {
        let output = ws
            .command(command)
            .env("KMSFLOW_STATE", &missing)
            .output()
            .unwrap();
        assert_eq!(output.status.code(), Some(2), "{command:?}");
        assert!(
            stderr(&output).contains("there is no state file at"),
            "{command:?}: {}",
            stderr(&output)
        );
    }
    assert!(!ws.path("not").exists(), "no folder was made by looking");

    let fifo = ws.path("state.fifo");
    let made = Command::new("mkfifo").arg(&fifo).status().unwrap();
    assert!(made.success());
    ws.write("noop.yaml", "name: n\nsteps:\n  - id: a\n    uses: noop\n");
    for command in [&["runs"][..], &["run", "noop.yaml"][..]] {
        let started = Instant::now();
        let output = ws
            .command(command)
            .env("KMSFLOW_STATE", &fifo)
            .output()
            .unwrap();
        assert!(
            started.elapsed() < Duration::from_secs(10),
            "{command:?} hung"
        );
        assert!(!output.status.success(), "{command:?}");
        assert!(
            stderr(&output).contains("not a regular file (it is a named pipe)"),
            "{command:?}: {}",
            stderr(&output)
        );
    }
}

#[test]
fn what_a_template_makes_of_a_secret_is_as_secret_as_the_secret_and_so_is_a_lock_built_from_it() {
    let ws = Workspace::new();
    ws.write(
        "derived.yaml",
        r#"
name: derived
lock: "vault/{{lower params.token}}"
params:
  token: { type: string, secret: true }
steps:
  - id: use
    uses: noop
    with: { outputs: { shout: "{{upper params.token}}", header: "Bearer {{params.token}}" } }
"#,
    );
    let secret = "quiet-Token-77ab";
    let output = ws
        .command(&["run", "derived.yaml"])
        .env("KMSFLOW_PARAM_TOKEN", secret)
        .env("KMSFLOW_LOG", "trace")
        .output()
        .unwrap();
    assert!(output.status.success(), "{}", stderr(&output));
    let printed = format!(
        "{}{}",
        String::from_utf8_lossy(&output.stdout),
        stderr(&output)
    );
    let forms = [
        secret.to_owned(),
        secret.to_uppercase(),
        secret.to_lowercase(),
    ];
    for form in &forms {
        assert!(!printed.contains(form.as_str()), "{form} printed");
    }
    let run = ws.show(&run_id_of(&output));
    assert_eq!(step(&run, "use")["outputs"]["shout"], "***");
    assert_eq!(step(&run, "use")["outputs"]["header"], "***");
    let shown = run.to_string();
    for form in &forms {
        assert!(!shown.contains(form.as_str()), "{form} in show: {shown}");
    }
    for file in ["state.db", "state.db-wal"] {
        let bytes = std::fs::read(ws.path(file)).unwrap_or_default();
        for form in &forms {
            assert!(
                !bytes.windows(form.len()).any(|w| w == form.as_bytes()),
                "{file} holds {form}"
            );
        }
    }
}

/// A listener that takes every connection and never answers: a frozen PostgreSQL, or a
/// proxy holding connections open. The receiver hears of each connection taken.
fn silent_listener() -> (std::net::SocketAddr, std::sync::mpsc::Receiver<()>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let address = listener.local_addr().unwrap();
    let (taken, connections) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming().take(16) {
            held.push(stream);
            let _ = taken.send(());
        }
        std::thread::sleep(Duration::from_secs(120));
    });
    (address, connections)
}

#[test]
fn a_silent_postgresql_server_is_an_error_within_the_bound_and_sigterm_ends_the_wait() {
    let ws = Workspace::new();
    let (address, connections) = silent_listener();
    let url = format!("postgres://kmsflow@{address}/kmsflow?connect_timeout=2&sslmode=disable");
    let started = Instant::now();
    let output = ws
        .command(&["runs"])
        .env("KMSFLOW_STATE", &url)
        .output()
        .unwrap();
    assert!(
        started.elapsed() < Duration::from_secs(20),
        "returned after {:?}",
        started.elapsed()
    );
    assert!(!output.status.success());
    assert!(
        stderr(&output).contains("did not answer a new session"),
        "{}",
        stderr(&output)
    );

    // The default bound is 20 s; SIGTERM ends the wait before it.
    let url = format!("postgres://kmsflow@{address}/kmsflow?sslmode=disable");
    let mut child = ws
        .command(&["runs"])
        .env("KMSFLOW_STATE", &url)
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    // Once it waits on the server: its second connection (the first was the run above's).
    connections.recv().unwrap();
    connections
        .recv_timeout(Duration::from_secs(10))
        .expect("kmsflow connects");
    let signalled = Instant::now();
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        assert!(
            signalled.elapsed() < Duration::from_secs(5),
            "SIGTERM did not end the wait"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_write_ahead_log_deleted_mid_run_stops_the_run_instead_of_reporting_success() {
    let ws = Workspace::new();
    ws.write(
        "slow.yaml",
        r#"
name: slow
steps:
  - id: first
    uses: file
    with: { path: first.txt, content: one }
  - id: wait
    uses: sleep
    needs: [first]
    with: { duration: 2s }
  - id: last
    uses: file
    needs: [wait]
    with: { path: last.txt, content: two }
"#,
    );
    let (child, _) = ws.spawn_until(&["run", "slow.yaml"], "sleep, attempt 1");
    // While the run waits, something deletes the state file's write-ahead log.
    std::fs::remove_file(ws.path("state.db-wal")).unwrap();
    let output = child.wait_with_output().unwrap();
    assert_ne!(
        output.status.code(),
        Some(0),
        "the run must not report success over a lost record"
    );
}

#[test]
fn two_sandboxed_commands_on_one_state_never_share_a_sandbox() {
    let ws = Workspace::new();
    ws.write(
        "wait.yaml",
        "name: wait\nsteps:\n  - id: wait\n    uses: sleep\n    with: { duration: 3s }\n",
    );
    let (first, _) = ws.spawn_until(&["run", "wait.yaml", "--sandbox"], "sleep, attempt 1");
    let second = ws.run(&["run", "wait.yaml", "--sandbox"]);
    assert_eq!(second.status.code(), Some(3), "{}", stderr(&second));
    assert!(
        stderr(&second).contains("is using the sandbox kept beside this state"),
        "{}",
        stderr(&second)
    );
    let first = first.wait_with_output().unwrap();
    assert!(first.status.success());
    // Once the first has ended, the sandbox is free again.
    let third = ws.run(&["run", "wait.yaml", "--sandbox"]);
    assert!(third.status.success(), "{}", stderr(&third));
}

#[test]
fn a_quarantined_queued_run_says_so_and_why() {
    use kmsflow_state::{Durability, NewQueued, Store, Write};
    let ws = Workspace::new();
    {
        let mut store = Store::open_file(&ws.path("state.db"), Durability::Normal).unwrap();
        store
            .commit(&[Write::Enqueue(NewQueued {
                id: "20260101-000000-0000beef".into(),
                queue: "east".into(),
                runbook: "n".into(),
                runbook_ref: "n.yaml".into(),
                content_hash: "hash-n".into(),
                source: "name: n\nsteps:\n  - id: a\n    uses: noop\n".into(),
                fragments: serde_json::json!([]),
                params: serde_json::json!({}),
                options: serde_json::json!({}),
                enqueued_at: chrono::Utc::now(),
            })])
            .unwrap();
        // Three workers take it and die with it; the fourth that asks finds it quarantined.
        for worker in ["w1", "w2", "w3", "w4"] {
            store
                .claim_queued("east", worker, chrono::Duration::seconds(-1), 1)
                .unwrap();
        }
    }
    let shown = ws.run(&["show", "20260101-000000-0000beef"]);
    assert!(shown.status.success(), "{}", stderr(&shown));
    let text = String::from_utf8_lossy(&shown.stdout);
    assert!(
        text.contains("is quarantined on `east`: taken by a worker 3 times"),
        "{text}"
    );
    let runs = ws.run(&["runs", "--output", "json"]);
    let listed: Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert_eq!(listed[0]["status"], "poisoned", "{listed}");
}
