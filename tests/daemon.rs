//! The schedule daemon with second-granular cron: overlap `skip`, catch-up after downtime,
//! two daemons on one store, SIGTERM draining, and webhook notifications.

use std::io::{BufRead, BufReader, Read, Write};
use std::path::Path;
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

fn kmsflow(dir: &Path, args: &[&str]) -> Command {
    let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(args)
        .current_dir(dir)
        .env("KMSFLOW_STATE", dir.join("state.db"));
    command
}

fn run(dir: &Path, args: &[&str]) -> Output {
    kmsflow(dir, args).output().unwrap()
}

fn daemon(dir: &Path) -> Child {
    kmsflow(dir, &["daemon", "--tick", "100ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap()
}

fn sigterm(child: &mut Child) -> std::process::ExitStatus {
    Command::new("kill")
        .args(["-TERM", &child.id().to_string()])
        .status()
        .unwrap();
    child.wait().unwrap()
}

fn history(dir: &Path, name: &str) -> Vec<Value> {
    let out = run(dir, &["schedule", "history", name, "--output", "json"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    serde_json::from_slice::<Value>(&out.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone()
}

fn count(fires: &[Value], outcome: &str) -> usize {
    fires.iter().filter(|f| f["outcome"] == outcome).count()
}

fn add(dir: &Path, args: &[&str]) {
    let out = run(dir, &[&["schedule", "add"], args].concat());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

const SLOW: &str =
    "name: slow\nsteps:\n  - id: wait\n    uses: sleep\n    with: { duration: 2500ms }\n";
/// Fails every time: a schedule that pages.
const FAILING: &str = "name: failing\nsteps:\n  - id: no\n    uses: assert\n    with: { condition: false, message: drift found }\n";
const QUICK: &str = "name: quick\nsteps:\n  - id: hi\n    uses: noop\n";

#[test]
fn skip_overlap_records_skipped_fires_while_a_run_is_going() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    add(
        dir.path(),
        &[
            "every-second",
            "--runbook",
            "slow.yaml",
            "--cron",
            "* * * * * *",
        ],
    );
    let mut d = daemon(dir.path());
    std::thread::sleep(Duration::from_millis(4200));
    assert!(sigterm(&mut d).success(), "SIGTERM drains and exits 0");
    let fires = history(dir.path(), "every-second");
    assert!(count(&fires, "started") >= 1, "{fires:#?}");
    assert!(
        count(&fires, "skipped") >= 2,
        "fires while the 2.5 s run went on are skipped: {fires:#?}"
    );
    for fire in fires.iter().filter(|f| f["outcome"] == "started") {
        assert_eq!(fire["detail"]["status"], "succeeded", "{fire}");
    }
}

#[test]
fn after_downtime_one_catch_up_fires_and_the_rest_are_missed() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    add(
        dir.path(),
        &[
            "catching-up",
            "--runbook",
            "quick.yaml",
            "--cron",
            "* * * * * *",
            "--catchup",
            "1500ms",
        ],
    );
    // The daemon is down for a while: several occurrences pass.
    std::thread::sleep(Duration::from_millis(3500));
    let mut d = daemon(dir.path());
    std::thread::sleep(Duration::from_millis(600));
    assert!(sigterm(&mut d).success());
    let fires = history(dir.path(), "catching-up");
    let time = |f: &Value, key: &str| {
        chrono::DateTime::parse_from_rfc3339(f[key].as_str().unwrap()).unwrap()
    };
    // What the daemon found due when it came up: every occurrence up to its first record. If
    // it came up just past a second, the occurrence of that second is among them, and it is
    // the one fired (it covers the downtime as the catch-up would).
    let came_up = fires.iter().map(|f| time(f, "fired_at")).min().unwrap();
    let before_start: Vec<Value> = fires
        .iter()
        .filter(|f| time(f, "occurrence") <= came_up)
        .cloned()
        .collect();
    assert_eq!(
        count(&before_start, "started"),
        1,
        "one catch-up: {before_start:#?}"
    );
    assert!(count(&before_start, "missed") >= 2, "{before_start:#?}");
}

#[test]
fn two_daemons_on_one_store_fire_each_occurrence_once() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    add(
        dir.path(),
        &[
            "shared",
            "--runbook",
            "quick.yaml",
            "--cron",
            "* * * * * *",
            "--overlap",
            "allow",
        ],
    );
    let (mut a, mut b) = (daemon(dir.path()), daemon(dir.path()));
    std::thread::sleep(Duration::from_millis(3600));
    assert!(sigterm(&mut a).success());
    assert!(sigterm(&mut b).success());
    let fires = history(dir.path(), "shared");
    let started = count(&fires, "started");
    assert!(started >= 3, "{fires:#?}");
    let runs: Value =
        serde_json::from_slice(&run(dir.path(), &["runs", "--output", "json"]).stdout).unwrap();
    assert_eq!(
        runs.as_array().unwrap().len(),
        started,
        "one run per fired occurrence, none twice"
    );
    let mut occurrences: Vec<&str> = fires
        .iter()
        .map(|f| f["occurrence"].as_str().unwrap())
        .collect();
    let n = occurrences.len();
    occurrences.dedup();
    assert_eq!(occurrences.len(), n);
}

#[test]
fn sigterm_lets_the_running_check_finish() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    add(
        dir.path(),
        &["drain", "--runbook", "slow.yaml", "--cron", "* * * * * *"],
    );
    let mut d = daemon(dir.path());
    let deadline = Instant::now() + Duration::from_secs(10);
    while count(&history(dir.path(), "drain"), "started") == 0 {
        assert!(Instant::now() < deadline, "nothing fired");
        std::thread::sleep(Duration::from_millis(100));
    }
    let stopped = Instant::now();
    assert!(sigterm(&mut d).success());
    assert!(
        stopped.elapsed() >= Duration::from_millis(1000),
        "it waited for the run"
    );
    let runs: Value =
        serde_json::from_slice(&run(dir.path(), &["runs", "--output", "json"]).stdout).unwrap();
    for r in runs.as_array().unwrap() {
        assert_eq!(r["status"], "succeeded", "{r}");
    }
}

#[test]
fn a_failing_run_posts_to_the_webhook() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("failing.yaml"), FAILING).unwrap();
    // For Slack and Teams the URL is the credential: it must never be shown again.
    let (hook, received) = webhook_listener();
    let url = hook.replace("/hook", "/hook/T000-SECRET-8f3a");
    add(
        dir.path(),
        &[
            "alerting",
            "--runbook",
            "failing.yaml",
            "--cron",
            "* * * * * *",
            "--notify-webhook",
            &url,
        ],
    );
    let log = std::fs::File::create(dir.path().join("daemon.log")).unwrap();
    let mut d = kmsflow(dir.path(), &["daemon", "--tick", "100ms"])
        .env("KMSFLOW_LOG", "trace")
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .unwrap();
    let body = received
        .recv_timeout(Duration::from_secs(10))
        .expect("the webhook was called");
    // Failing again is not news: later fires, still failing, post nothing.
    let deadline = std::time::Instant::now() + Duration::from_secs(15);
    loop {
        let history = run(
            dir.path(),
            &["schedule", "history", "alerting", "--output", "json"],
        );
        let fires: Value = serde_json::from_slice(&history.stdout).unwrap_or(Value::Null);
        let finished = fires.as_array().map_or(0, |f| {
            f.iter().filter(|f| f["detail"]["worst"] == "fail").count()
        });
        if finished >= 3 || std::time::Instant::now() > deadline {
            assert!(finished >= 3, "three failing fires: {fires}");
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        received.recv_timeout(Duration::from_millis(300)).is_err(),
        "a webhook fires on a change of state, not on every failing fire"
    );
    // How it went is recorded on the fire that sent it, once it was sent.
    let fires = history(dir.path(), "alerting");
    let notified: Vec<&Value> = fires
        .iter()
        .filter(|f| !f["detail"]["notification"].is_null())
        .collect();
    assert_eq!(notified.len(), 1, "{fires:?}");
    assert_eq!(notified[0]["detail"]["notification"]["sent"], true);
    assert!(sigterm(&mut d).success());
    let payload: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(payload["schedule"], "alerting");
    assert_eq!(payload["worst"], "fail");
    assert_eq!(payload["recovered"], false);
    let mut shown = String::from_utf8(run(dir.path(), &["schedule", "list"]).stdout).unwrap();
    let listed = run(dir.path(), &["schedule", "list", "--output", "json"]);
    shown.push_str(&String::from_utf8(listed.stdout).unwrap());
    let history = run(
        dir.path(),
        &["schedule", "history", "alerting", "--output", "json"],
    );
    shown.push_str(&String::from_utf8(history.stdout).unwrap());
    shown.push_str(&std::fs::read_to_string(dir.path().join("daemon.log")).unwrap());
    assert!(shown.contains("webhook"), "the lists do say there is one");
    assert!(
        !shown.contains("SECRET"),
        "the webhook URL is never shown or logged"
    );
}

#[test]
fn a_webhook_must_be_https_unless_on_loopback() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    let refused = run(
        dir.path(),
        &[
            "schedule",
            "add",
            "plain",
            "--runbook",
            "quick.yaml",
            "--cron",
            "0 * * * *",
            "--notify-webhook",
            "http://hooks.example.com/services/T000-SECRET",
        ],
    );
    assert_eq!(refused.status.code(), Some(2));
    let said = String::from_utf8_lossy(&refused.stderr);
    assert!(said.contains("must use https"), "{said}");
    assert!(!said.contains("SECRET"), "not even in the refusal: {said}");
}

#[test]
fn schedule_commands_validate_and_manage() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    let bad = run(
        dir.path(),
        &[
            "schedule",
            "add",
            "x",
            "--runbook",
            "quick.yaml",
            "--cron",
            "every day",
        ],
    );
    assert_eq!(bad.status.code(), Some(2));
    assert!(String::from_utf8_lossy(&bad.stderr).contains("invalid cron expression"));
    add(
        dir.path(),
        &["nightly", "--runbook", "quick.yaml", "--cron", "0 3 * * *"],
    );
    let dup = run(
        dir.path(),
        &[
            "schedule",
            "add",
            "nightly",
            "--runbook",
            "quick.yaml",
            "--cron",
            "0 3 * * *",
        ],
    );
    assert_eq!(dup.status.code(), Some(2));
    assert!(
        run(dir.path(), &["schedule", "pause", "nightly"])
            .status
            .success()
    );
    let list: Value =
        serde_json::from_slice(&run(dir.path(), &["schedule", "list", "--output", "json"]).stdout)
            .unwrap();
    assert_eq!(list[0]["paused"], true);
    assert!(
        run(dir.path(), &["schedule", "resume", "nightly"])
            .status
            .success()
    );
    assert!(
        run(dir.path(), &["schedule", "remove", "nightly"])
            .status
            .success()
    );
    assert_eq!(
        run(dir.path(), &["schedule", "remove", "nightly"])
            .status
            .code(),
        Some(2)
    );
}

/// The status of a run, through `kmsflow show`.
fn run_status(dir: &Path, run_id: &str) -> String {
    let out = run(dir, &["show", run_id, "--output", "json"]);
    // A fire is `started` only once its run exists (they are committed together).
    let shown: Value = serde_json::from_slice(&out.stdout)
        .unwrap_or_else(|_| panic!("a started fire's run `{run_id}` exists"));
    shown["status"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn a_state_file_held_busy_past_the_timeout_stops_neither_the_daemon_nor_its_running_fire() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("slow.yaml"), SLOW).unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    for (name, runbook) in [("slow", "slow.yaml"), ("quick", "quick.yaml")] {
        add(
            dir.path(),
            &[
                name,
                "--runbook",
                runbook,
                "--cron",
                "* * * * * *",
                "--overlap",
                "skip",
            ],
        );
    }
    let mut daemon = daemon(dir.path());
    // Wait (bounded) for a slow fire to be under way.
    let deadline = Instant::now() + Duration::from_secs(20);
    let slow_run = loop {
        assert!(Instant::now() < deadline, "no slow fire started");
        let started = history(dir.path(), "slow")
            .into_iter()
            .find(|f| f["outcome"] == "started" && f["run_id"].is_string());
        if let Some(fire) = started {
            let run_id = fire["run_id"].as_str().unwrap().to_owned();
            if run_status(dir.path(), &run_id) == "running" {
                break run_id;
            }
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Another program holds the file past SQLite's 10 s busy timeout.
    let mut holder = rusqlite::Connection::open(dir.path().join("state.db")).unwrap();
    let exclusive = holder
        .transaction_with_behavior(rusqlite::TransactionBehavior::Exclusive)
        .unwrap();
    exclusive
        .execute("UPDATE schedules SET paused = paused", [])
        .unwrap();
    std::thread::sleep(Duration::from_secs(11));
    exclusive.commit().unwrap();
    let released = chrono::Utc::now();
    assert!(
        daemon.try_wait().unwrap().is_none(),
        "the daemon survived the busy file"
    );
    // It goes on firing, and the fire that was running when the file went busy finishes.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        assert!(
            Instant::now() < deadline,
            "the daemon stopped firing: slow run {}, quick fires {:#?}",
            run_status(dir.path(), &slow_run),
            history(dir.path(), "quick")
                .iter()
                .rev()
                .take(3)
                .collect::<Vec<_>>()
        );
        let fired_since = history(dir.path(), "quick").into_iter().any(|f| {
            f["outcome"] == "started"
                && f["fired_at"]
                    .as_str()
                    .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                    .is_some_and(|t| t > released)
        });
        if fired_since && run_status(dir.path(), &slow_run) == "succeeded" {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(sigterm(&mut daemon).success());
}

/// `schedule list` shows what each schedule runs with: its parameters and its webhook's host.
#[test]
fn schedule_list_shows_parameters_and_the_masked_webhook() {
    let dir = tempfile::tempdir().unwrap();
    add(
        dir.path(),
        &[
            "nightly",
            "--runbook",
            "rotation-check",
            "--cron",
            "0 3 * * *",
            "-p",
            "resource_group=rg-prod",
            "-p",
            "cluster=aks-prod",
            "--notify-webhook",
            "https://hooks.example.com/services/T0/SECRET",
        ],
    );
    let list = String::from_utf8(run(dir.path(), &["schedule", "list"]).stdout).unwrap();
    assert!(
        list.contains("cluster=aks-prod resource_group=rg-prod"),
        "{list}"
    );
    assert!(list.contains("https://hooks.example.com/***"), "{list}");
    assert!(!list.contains("SECRET"), "{list}");
}

/// A webhook that never answers holds neither the fire nor the next ones: the notification is
/// sent apart from the fire, after the fire is recorded. (It used to be sent inside the fire:
/// three 10 s timeouts kept the fire `running`, and every occurrence meanwhile was `skipped`.)
#[test]
fn a_webhook_that_never_answers_makes_no_fire_skipped() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("failing.yaml"), FAILING).unwrap();
    // Accepts connections, reads nothing, answers nothing.
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        let mut held = Vec::new();
        for stream in listener.incoming() {
            held.push(stream.unwrap());
        }
    });
    add(
        dir.path(),
        &[
            "alerting",
            "--runbook",
            "failing.yaml",
            "--cron",
            "* * * * * *",
            "--notify-webhook",
            &url,
        ],
    );
    let mut d = daemon(dir.path());
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    let fires = loop {
        let fires = history(dir.path(), "alerting");
        let finished = fires
            .iter()
            .filter(|f| f["detail"]["worst"] == "fail")
            .count();
        if finished >= 4 || std::time::Instant::now() > deadline {
            break fires;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    d.kill().unwrap();
    let _ = d.wait();
    let finished = fires
        .iter()
        .filter(|f| f["detail"]["worst"] == "fail")
        .count();
    assert!(finished >= 4, "a fire every second goes on: {fires:?}");
    assert_eq!(count(&fires, "skipped"), 0, "{fires:?}");
}

/// One file per target; the target whose `ok` is false fails.
const TOUCH: &str = r#"
name: touch
params:
  name: { type: string }
  ok: { type: bool, default: true }
lock: "touch/{{params.name}}"
steps:
  - id: check
    uses: assert
    with: { condition: "{{params.ok}}", message: "target refused" }
  - id: write
    uses: file
    needs: [check]
    with: { path: "out-{{params.name}}.txt", content: "{{params.name}}" }
"#;

/// Accepts webhook posts and hands each body over.
fn webhook_listener() -> (String, std::sync::mpsc::Receiver<String>) {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/hook", listener.local_addr().unwrap());
    let (sender, received) = std::sync::mpsc::channel::<String>();
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let mut stream = stream.unwrap();
            let mut reader = BufReader::new(stream.try_clone().unwrap());
            let mut length = 0;
            loop {
                let mut line = String::new();
                reader.read_line(&mut line).unwrap();
                if let Some(v) = line.to_ascii_lowercase().strip_prefix("content-length:") {
                    length = v.trim().parse().unwrap();
                }
                if line == "\r\n" {
                    break;
                }
            }
            let mut body = vec![0; length];
            reader.read_exact(&mut body).unwrap();
            stream
                .write_all(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
                .unwrap();
            let _ = sender.send(String::from_utf8(body).unwrap());
        }
    });
    (url, received)
}

#[test]
fn a_schedule_fires_a_rollout_and_a_budget_stop_notifies() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("touch.yaml"), TOUCH).unwrap();
    std::fs::write(
        dir.path().join("fleet.csv"),
        "name,ok\na,true\nb,false\nc,true\n",
    )
    .unwrap();
    // Rows are bound when the schedule is made: a typo is refused now, not at 3 a.m.
    std::fs::write(dir.path().join("typo.csv"), "nmae\na\n").unwrap();
    let refused = run(
        dir.path(),
        &[
            "schedule",
            "add",
            "typo",
            "--runbook",
            "touch.yaml",
            "--targets",
            "typo.csv",
            "--cron",
            "* * * * * *",
        ],
    );
    assert_eq!(
        refused.status.code(),
        Some(2),
        "{}",
        String::from_utf8_lossy(&refused.stderr)
    );
    let (url, received) = webhook_listener();
    add(
        dir.path(),
        &[
            "fleet-touch",
            "--runbook",
            "touch.yaml",
            "--targets",
            "fleet.csv",
            "--concurrency",
            "1",
            "--max-errors",
            "0",
            "--cron",
            "* * * * * *",
            "--notify-webhook",
            &url,
        ],
    );
    let mut d = daemon(dir.path());
    let body = received
        .recv_timeout(Duration::from_secs(15))
        .expect("the budget stop was notified");
    assert!(sigterm(&mut d).success());
    let payload: Value = serde_json::from_str(&body).unwrap();
    assert_eq!(payload["worst"], "fail");
    let rollout_id = payload["run_id"].as_str().unwrap().to_owned();
    assert!(rollout_id.starts_with("rollout-"), "{payload}");
    assert_eq!(payload["detail"]["status"], "failed");
    assert_eq!(
        payload["detail"]["counts"]["not_started"], 1,
        "the budget stopped the rollout before `c`: {payload}"
    );
    // The rollout is an ordinary one: shown, and resumable once the cause is dealt with.
    assert_eq!(
        std::fs::read_to_string(dir.path().join("out-a.txt")).unwrap(),
        "a"
    );
    assert!(!dir.path().join("out-c.txt").exists());
    let shown = run(dir.path(), &["show", &rollout_id, "--output", "json"]);
    let shown: Value = serde_json::from_slice(&shown.stdout).unwrap();
    assert_eq!(shown["status"], "failed");
    let fires = history(dir.path(), "fleet-touch");
    assert!(
        fires
            .iter()
            .any(|f| f["run_id"] == rollout_id.as_str() && f["outcome"] == "started"),
        "{fires:?}"
    );
}

/// libfaketime, from Debian's `faketime` (`.ci/run` installs it).
fn libfaketime() -> std::path::PathBuf {
    let candidates = [
        "/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/aarch64-linux-gnu/faketime/libfaketime.so.1",
        "/usr/lib/faketime/libfaketime.so.1",
    ];
    candidates
        .iter()
        .map(std::path::PathBuf::from)
        .find(|p| p.exists())
        .expect("libfaketime is missing: `apt-get install faketime` (.ci/run does)")
}

/// Waits (at most 30 s) until `name`'s history satisfies `done`; returns it.
fn until_history(dir: &Path, name: &str, done: impl Fn(&[Value]) -> bool) -> Vec<Value> {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let fires = history(dir, name);
        if done(&fires) {
            return fires;
        }
        assert!(Instant::now() < deadline, "waited 30 s: {fires:#?}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_step_of_the_wall_clock_is_not_downtime_and_firing_goes_on_by_the_new_clock() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("quick.yaml"), QUICK).unwrap();
    add(
        dir.path(),
        &[
            "every-2s",
            "--runbook",
            "quick.yaml",
            "--cron",
            "*/2 * * * * *",
        ],
    );
    // The daemon's wall clock is the one this file says (`+0`, then stepped); its monotonic
    // clock is left alone, as a real clock step leaves it.
    let offset = dir.path().join("faketime");
    std::fs::write(&offset, "+0\n").unwrap();
    let mut d = kmsflow(dir.path(), &["daemon", "--tick", "100ms"])
        .env("LD_PRELOAD", libfaketime())
        .env("FAKETIME_TIMESTAMP_FILE", &offset)
        .env("FAKETIME_NO_CACHE", "1")
        .env("DONT_FAKE_MONOTONIC", "1")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let started = |fires: &[Value]| count(fires, "started");
    until_history(dir.path(), "every-2s", |f| started(f) >= 1);

    // An hour forward: the occurrences it passed over are missed because of the step, not
    // "because the daemon was not running", and firing goes on.
    std::fs::write(&offset, "+1h\n").unwrap();
    let fires = until_history(dir.path(), "every-2s", |f| count(f, "missed") >= 1000);
    let before = started(&fires);
    let fires = until_history(dir.path(), "every-2s", |f| started(f) > before);
    let downtime = fires
        .iter()
        .filter(|f| {
            f["detail"]["reason"]
                .as_str()
                .is_some_and(|r| r.contains("not running"))
        })
        .count();
    assert_eq!(downtime, 0, "a clock step is not downtime");
    assert!(
        fires.iter().any(|f| f["detail"]["reason"]
            .as_str()
            .is_some_and(|r| r.contains("jumped forward"))),
        "the step is named"
    );

    // Two hours back: occurrences go on firing by the new clock, not after two hours.
    let before = started(&fires);
    std::fs::write(&offset, "-1h\n").unwrap();
    until_history(dir.path(), "every-2s", |f| started(f) >= before + 2);
    assert!(sigterm(&mut d).success());
}
