//! The team store end to end: the binary with its state on a real PostgreSQL server (a
//! throwaway one, `kmsflow-pgtest`), judged by the sandbox's world and request log.
//!
//! Two runners on two "hosts" (distinct `KMSFLOW_HOST_ID`s) share one database: exactly one
//! proceeds; one paused past its lease is fenced out once another took over; a server restart
//! in the middle of a run loses nothing.

mod support;

use std::collections::BTreeMap;
use std::path::Path;
use std::process::{Child, Output, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;
use support::{Served, serve};

const RUNBOOK: &str = "migrate-pmk-to-cmk";

fn params() -> Vec<String> {
    [
        ("resource_group", "rg-kms-sandbox"),
        ("cluster", "aks-sandbox"),
        ("key_vault", "kv-kms-sandbox"),
        ("identity", "id-kms-sandbox"),
    ]
    .iter()
    .flat_map(|(k, v)| ["-p".to_owned(), format!("{k}={v}")])
    .collect()
}

/// A sandbox answering each write `write_ms` after applying it, and a database of its own.
fn sandbox(dir: &Path, write_ms: u64) -> Served {
    let faults = dir.join("faults.yaml");
    std::fs::write(
        &faults,
        format!("latency: {{ min_ms: 0, max_ms: 0, write_ms: {write_ms} }}\n"),
    )
    .unwrap();
    let mut served = serve(&["--faults", faults.to_str().unwrap(), "--world", RUNBOOK]);
    served.state = Some(kmsflow_pgtest::server().database());
    served
}

fn run_args() -> Vec<String> {
    let mut args = vec!["run".to_owned(), RUNBOOK.to_owned()];
    args.extend(params());
    args
}

fn kmsflow(served: &Served, dir: &Path, host: &str, args: &[String]) -> std::process::Command {
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut command = served.kmsflow(dir, &args);
    command.env("KMSFLOW_HOST_ID", host);
    command
}

fn stderr(output: &Output) -> String {
    String::from_utf8_lossy(&output.stderr).into_owned()
}

/// Waits until the sandbox has served `n` writes (or the child ended).
fn until_writes(served: &Served, child: &mut Child, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(60);
    while served.writes() < n {
        assert!(
            child.try_wait().unwrap().is_none(),
            "the run ended before write {n}"
        );
        assert!(Instant::now() < deadline, "no write {n} within a minute");
        std::thread::sleep(Duration::from_millis(5));
    }
}

/// Every write the sandbox applied (refused ones left out), as `METHOD path` (lower case),
/// with how often. No write may have been made twice; role assignments' names (derived from principal ids each sandbox
/// makes anew) are counted together.
fn writes(served: &Served) -> BTreeMap<String, usize> {
    let mut counts = BTreeMap::new();
    let applied = |r: &&Value| {
        r["write"] == true && (r["status"].as_u64() < Some(400) || !r["lost"].is_null())
    };
    for request in served.requests().iter().filter(applied) {
        let key = format!(
            "{} {}",
            request["method"].as_str().unwrap(),
            request["path"].as_str().unwrap().to_lowercase()
        );
        *counts.entry(key).or_insert(0) += 1;
    }
    let twice: Vec<&String> = counts
        .iter()
        .filter(|(_, n)| **n > 1)
        .map(|(k, _)| k)
        .collect();
    assert!(twice.is_empty(), "written more than once: {twice:?}");
    let mut shapes = BTreeMap::new();
    for (key, n) in counts {
        let shape = match key.split_once("/roleassignments/") {
            Some((scope, _)) => format!("{scope}/roleassignments/*"),
            None => key,
        };
        *shapes.entry(shape).or_insert(0) += n;
    }
    shapes
}

/// What an undisturbed run writes: each write and how often.
fn undisturbed_writes() -> BTreeMap<String, usize> {
    let dir = tempfile::tempdir().unwrap();
    let served = sandbox(dir.path(), 0);
    let out = kmsflow(&served, dir.path(), "host-a", &run_args())
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", stderr(&out));
    writes(&served)
}

fn cluster_mode(served: &Served) -> Value {
    let world = served.world();
    let cluster = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| {
            r["type"]
                .as_str()
                .unwrap()
                .eq_ignore_ascii_case("Microsoft.ContainerService/managedClusters")
        })
        .cloned()
        .unwrap();
    cluster["properties"]["securityProfile"]["azureKeyVaultKms"]["enabled"].clone()
}

#[test]
fn a_run_on_postgres_resumes_nothing_twice_and_a_second_run_writes_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = sandbox(dir.path(), 0);
    // A password in the URL (the throwaway server trusts loopback, so any will do) must never
    // be shown, at any log level.
    let url = served.state.clone().unwrap();
    let with_password = url.replacen("kmsflow@", "kmsflow:pw-never-shown@", 1);
    served.state = Some(with_password);
    let first = kmsflow(&served, dir.path(), "host-a", &run_args())
        .env("KMSFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(first.status.success(), "{}", stderr(&first));
    assert_eq!(cluster_mode(&served), true);
    let writes = served.writes();
    let second = kmsflow(&served, dir.path(), "host-b", &run_args())
        .env("KMSFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(second.status.success(), "{}", stderr(&second));
    assert_eq!(
        served.writes(),
        writes,
        "a second run, from another host, writes nothing"
    );
    let runs = kmsflow(
        &served,
        dir.path(),
        "host-c",
        &["runs".into(), "--output".into(), "json".into()],
    )
    .output()
    .unwrap();
    let listed: Value = serde_json::from_slice(&runs.stdout).unwrap();
    assert_eq!(
        listed.as_array().unwrap().len(),
        2,
        "one place to see everyone's runs"
    );
    for output in [&first, &second, &runs] {
        let text = format!(
            "{}{}",
            stderr(output),
            String::from_utf8_lossy(&output.stdout)
        );
        assert!(!text.contains("pw-never-shown"), "{text}");
    }
}

/// The audience of Azure Database for PostgreSQL in the public cloud.
const POSTGRES_AUDIENCE: &str = "https://ossrdbms-aad.database.windows.net";

/// Whether the sandbox at `base_url` minted `token` for `audience`, and it has not expired:
/// what Azure's server asks Entra of the password an Entra sign-in gives it.
fn sandbox_minted(base_url: &str, token: &str, audience: &str) -> bool {
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    runtime.block_on(async {
        reqwest::Client::new()
            .post(format!("{base_url}/_sandbox/tokens/check"))
            .json(&serde_json::json!({"token": token, "audience": audience}))
            .send()
            .await
            .is_ok_and(|answer| answer.status() == 200)
    })
}

/// Every row of every table of the database, as text.
fn everything_stored(pg: &kmsflow_pgtest::Server, db: &str) -> String {
    let tables = pg.sql(
        db,
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'public'",
    );
    tables
        .lines()
        .map(|table| pg.sql(db, &format!("SELECT t::text FROM {table} t")))
        .collect::<Vec<_>>()
        .join("\n")
}

/// `auth=entra`: the binary signs in with a token from the credential its steps use, for
/// Azure Database for PostgreSQL's audience. The server hands the password to a stand-in
/// directory (PostgreSQL's `ldap` sign-in), which checks it with the sandbox that minted it,
/// as Azure's server checks it with Entra.
#[test]
fn auth_entra_signs_in_with_a_token_for_the_databases_audience_and_never_shows_it() {
    const ROLE: &str = "kmsflow_entra";
    let dir = tempfile::tempdir().unwrap();
    let mut served = sandbox(dir.path(), 0);
    let pg = kmsflow_pgtest::private_server();
    let db = pg.database().rsplit('/').next().unwrap().to_owned();
    pg.sql(
        &db,
        &format!("CREATE ROLE {ROLE} LOGIN; ALTER DATABASE {db} OWNER TO {ROLE}"),
    );
    let base_url = served.base_url.clone();
    let directory = kmsflow_pgtest::ldap::Directory::start(move |dn, password| {
        dn == format!("cn={ROLE},dc=kmsflow")
            && sandbox_minted(&base_url, password, POSTGRES_AUDIENCE)
    });
    pg.authenticate_first(&directory.hba_line(ROLE));
    let url = format!("postgres://{ROLE}@127.0.0.1:{}/{db}?auth=entra", pg.port());
    served.state = Some(url);

    // Without auth=entra, the role has no password to give: refused.
    let mut without = served.state.clone().unwrap();
    without.truncate(without.len() - "?auth=entra".len());
    let refused = served
        .kmsflow(dir.path(), &["runs"])
        .env("KMSFLOW_STATE", &without)
        .output()
        .unwrap();
    assert!(!refused.status.success());

    let run = kmsflow(&served, dir.path(), "host-a", &run_args())
        .env("KMSFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(run.status.success(), "{}", stderr(&run));
    assert_eq!(cluster_mode(&served), true);
    assert_eq!(
        pg.sql(&db, "SELECT status FROM runs"),
        "succeeded",
        "the run is in the database it signed in to"
    );
    let binds = directory.binds();
    let tokens: std::collections::BTreeSet<&str> =
        binds.iter().map(|b| b.password.as_str()).collect();
    assert!(
        binds.iter().any(|b| b.accepted),
        "signed in with a token: {binds:?}"
    );
    assert_eq!(
        tokens.len(),
        1,
        "one token kept for every session of the process, not one asked per session"
    );
    let token = *tokens.first().unwrap();

    // A token for another audience (a cloud profile naming the wrong scope) is refused by
    // the server, and the error says what to check without the token.
    let profile = dir.path().join("cloud.json");
    std::fs::write(
        &profile,
        serde_json::json!({
            "name": "wrong-scope",
            "arm_endpoint": "https://management.azure.com",
            "arm_scope": "https://management.azure.com/.default",
            "key_vault_scope": "https://vault.azure.net/.default",
            "key_vault_suffixes": [".vault.azure.net"],
            "postgres_scope": "https://management.azure.com/.default",
        })
        .to_string(),
    )
    .unwrap();
    let wrong = served
        .kmsflow(dir.path(), &["runs"])
        .env("KMSFLOW_CLOUD", &profile)
        .env("KMSFLOW_LOG", "debug")
        .output()
        .unwrap();
    assert!(!wrong.status.success());
    let said = stderr(&wrong);
    assert!(said.contains("Microsoft Entra sign-in"), "{said}");
    assert!(
        directory.binds().iter().any(|b| !b.accepted),
        "the server asked about the wrong token, and was told no"
    );

    let stored = everything_stored(&pg, &db);
    assert!(stored.contains("succeeded"), "the dump holds the run");
    let signature = token.rsplit('.').next().unwrap();
    for (what, text) in [
        (
            "the run's output",
            format!("{}{}", stderr(&run), String::from_utf8_lossy(&run.stdout)),
        ),
        (
            "the refusal",
            format!("{said}{}", String::from_utf8_lossy(&wrong.stdout)),
        ),
        ("the store", stored),
    ] {
        assert!(!text.contains(signature), "{what} shows the token: {text}");
    }
}

#[test]
fn two_runners_on_two_hosts_one_cluster_exactly_one_proceeds() {
    let dir = tempfile::tempdir().unwrap();
    let served = sandbox(dir.path(), 300);
    let mut first = kmsflow(&served, dir.path(), "host-a", &run_args())
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    until_writes(&served, &mut first, 1);
    let second = kmsflow(&served, dir.path(), "host-b", &run_args())
        .output()
        .unwrap();
    assert!(!second.status.success());
    let text = stderr(&second);
    assert!(
        text.contains("is held by run") && text.contains("host-a"),
        "{text}"
    );
    assert!(first.wait().unwrap().success());
    assert_eq!(
        writes(&served),
        undisturbed_writes(),
        "only the first one wrote"
    );
}

#[test]
fn a_runner_paused_past_its_lease_is_fenced_out_after_another_took_over() {
    let lease = 4;
    let dir = tempfile::tempdir().unwrap();
    let served = sandbox(dir.path(), 150);
    let mut paused = kmsflow(&served, dir.path(), "laptop", &run_args())
        .env("KMSFLOW_LOCK_LEASE", lease.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_writes(&served, &mut paused, 2);
    let pid = nix::unistd::Pid::from_raw(paused.id() as i32);
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGSTOP).unwrap();
    // The lid stays closed past the lease, by the database's clock.
    std::thread::sleep(Duration::from_secs(lease + 2));
    let runner = kmsflow(&served, dir.path(), "ci-runner", &run_args())
        .env("KMSFLOW_LOCK_LEASE", lease.to_string())
        .output()
        .unwrap();
    assert!(
        runner.status.success(),
        "the other runner takes over: {}",
        stderr(&runner)
    );
    let after_takeover = served.writes();
    nix::sys::signal::kill(pid, nix::sys::signal::Signal::SIGCONT).unwrap();
    let woke = paused.wait_with_output().unwrap();
    assert!(!woke.status.success(), "the woken runner must stop");
    let text = stderr(&woke);
    assert!(text.contains("no longer holds lock"), "{text}");
    assert_eq!(
        served.writes(),
        after_takeover,
        "the woken runner wrote nothing after the takeover"
    );
    assert_eq!(cluster_mode(&served), true);
    assert_eq!(
        writes(&served),
        undisturbed_writes(),
        "no change applied twice"
    );
}

/// A real partition: the runner reaches the database over a veth link into a network
/// namespace of the test's own, and the test cuts that link mid-run while the runner can still
/// reach Azure (the sandbox). Another runner takes over once the lease has run out, by the
/// database's clock, and finishes. When the link comes back, the cut-off runner must stop
/// without a single write more, and the world must show no change applied twice.
///
/// Needs root and `ip` (network namespaces); elsewhere it says so and checks nothing.
#[test]
fn a_runner_cut_off_from_the_database_is_fenced_out_after_another_took_over() {
    let network = match support::netns::Namespace::make() {
        Ok(network) => network,
        Err(why) => {
            eprintln!("SKIPPED: this machine cannot make a network namespace: {why}");
            return;
        }
    };
    let lease = 4;
    let dir = tempfile::tempdir().unwrap();
    let mut served = sandbox(dir.path(), 150);
    let server = kmsflow_pgtest::private_server_also_on(network.here.into());
    server.authenticate_first(&format!("host all kmsflow {}/32 trust", network.there));
    let database = server.database();
    served.state = Some(database.clone());
    // Off loopback, so TLS is the default: this test's server has none.
    let across = format!(
        "{}?sslmode=disable",
        database.replace("127.0.0.1", &network.here.to_string())
    );
    let sandbox_port = served.base_url.rsplit(':').next().unwrap().parse().unwrap();
    network.forward_loopback(sandbox_port);
    let mut laptop = kmsflow(&served, dir.path(), "laptop", &run_args());
    laptop
        .env("KMSFLOW_STATE", &across)
        .env("KMSFLOW_LOCK_LEASE", lease.to_string());
    let mut cut_off = network
        .inside(&laptop)
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_writes(&served, &mut cut_off, 2);
    network.cut();
    let cut_at = served.writes();
    // Cut off past the lease, by the database's clock.
    std::thread::sleep(Duration::from_secs(lease + 2));
    let mut other = kmsflow(&served, dir.path(), "ci-runner", &run_args());
    other
        .env("KMSFLOW_LOCK_LEASE", lease.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::piped());
    let runner = within(other.spawn().unwrap(), Duration::from_secs(90));
    assert!(
        runner.status.success(),
        "the other runner takes over: {}",
        stderr(&runner)
    );
    let after_takeover = served.writes();
    network.heal();
    let woke = within(cut_off, Duration::from_secs(150));
    let text = stderr(&woke);
    assert!(
        !woke.status.success(),
        "the cut-off runner must stop: {text}"
    );
    assert!(
        text.contains("no longer holds lock") || text.contains("kmsflow resume"),
        "it says why, and what to do: {text}"
    );
    eprintln!(
        "cut after {cut_at} writes; the other runner's takeover ended at {after_takeover}; \
         the cut-off runner said: {}",
        text.lines().last().unwrap_or_default()
    );
    assert_eq!(
        served.writes(),
        after_takeover,
        "the cut-off runner wrote nothing after the takeover"
    );
    assert_eq!(cluster_mode(&served), true);
    assert_eq!(
        writes(&served),
        undisturbed_writes(),
        "no change applied twice"
    );
}

/// Waits for `child` to end, at most `bound`: a test must not hang on a run that does not.
fn within(mut child: Child, bound: Duration) -> Output {
    let deadline = Instant::now() + bound;
    while child.try_wait().unwrap().is_none() {
        if Instant::now() > deadline {
            let _ = child.kill();
            let out = child.wait_with_output().unwrap();
            panic!("still running after {bound:?}: {}", stderr(&out));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    child.wait_with_output().unwrap()
}

#[test]
fn a_database_restart_in_the_middle_of_a_run_loses_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = sandbox(dir.path(), 200);
    // A server of its own: restarting the shared one would cut the other tests' sessions.
    let server = kmsflow_pgtest::private_server();
    served.state = Some(server.database());
    let mut run = kmsflow(&served, dir.path(), "host-a", &run_args())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    until_writes(&served, &mut run, 3);
    // Every session is cut, as a failover or a restart of the managed server does.
    server.restart();
    let ended = run.wait_with_output().unwrap();
    if !ended.status.success() {
        // It may stop, resumable, with the database's error: then resume finishes it.
        let text = stderr(&ended);
        assert!(text.contains("resume"), "says what to do: {text}");
        let runs = kmsflow(
            &served,
            dir.path(),
            "host-a",
            &["runs".into(), "--output".into(), "json".into()],
        )
        .output()
        .unwrap();
        let listed: Value = serde_json::from_slice(&runs.stdout).unwrap();
        let id = listed[0]["id"].as_str().unwrap().to_owned();
        let resumed = kmsflow(&served, dir.path(), "host-a", &["resume".into(), id])
            .output()
            .unwrap();
        assert!(resumed.status.success(), "{}", stderr(&resumed));
    }
    assert_eq!(cluster_mode(&served), true);
    assert_eq!(
        writes(&served),
        undisturbed_writes(),
        "nothing written twice"
    );
}

/// `state migrate`: a run that failed halfway on a laptop's file is moved into the team's
/// database and resumed there, from another host, to the world an undisturbed run leaves.
#[test]
fn a_failed_run_moved_from_a_state_file_into_postgres_resumes_there() {
    let dir = tempfile::tempdir().unwrap();
    let mut served = sandbox(dir.path(), 0);
    let database = served.state.take().unwrap();
    served.set_faults(
        r#"
rules:
  - { method: PUT, path: "*/managedClusters/aks-sandbox", times: 1000, status: 400, code: InvalidParameter, message: "refused by the test" }
"#,
    );
    let failed = kmsflow(&served, dir.path(), "laptop", &run_args())
        .output()
        .unwrap();
    assert_eq!(failed.status.code(), Some(1), "{}", stderr(&failed));
    let file = dir.path().join("state.db");
    let migrate = || {
        let args = [
            "state",
            "migrate",
            "--from",
            &file.display().to_string(),
            "--to",
            &database,
            "--output",
            "json",
        ]
        .map(str::to_owned);
        kmsflow(&served, dir.path(), "laptop", &args)
            .output()
            .unwrap()
    };
    let moved = migrate();
    assert!(moved.status.success(), "{}", stderr(&moved));
    let report: Value = serde_json::from_slice(&moved.stdout).unwrap();
    assert_eq!(report["copied"]["runs"], 1);
    // Moving it twice would mix histories: refused.
    let twice = migrate();
    assert!(!twice.status.success());
    assert!(
        stderr(&twice).contains("already holds 1 runs"),
        "{}",
        stderr(&twice)
    );

    served.set_faults("{}");
    served.state = Some(database);
    let runs = kmsflow(
        &served,
        dir.path(),
        "ci",
        &["runs".into(), "--output".into(), "json".into()],
    )
    .output()
    .unwrap();
    let listed: Value =
        serde_json::from_slice(&runs.stdout).unwrap_or_else(|_| panic!("{}", stderr(&runs)));
    assert_eq!(listed[0]["status"], "failed");
    let id = listed[0]["id"].as_str().unwrap().to_owned();
    let resumed = kmsflow(&served, dir.path(), "ci", &["resume".into(), id])
        .output()
        .unwrap();
    assert!(resumed.status.success(), "{}", stderr(&resumed));
    assert_eq!(cluster_mode(&served), true);
    assert_eq!(
        writes(&served),
        undisturbed_writes(),
        "nothing lost or done twice in the move"
    );
}

/// Two daemons on one database with a seconds cron; one is kill -9ed half-way. Every second
/// between the first fire and the last has exactly one record (the survivor goes on alone, and
/// nothing is fired twice), and every started fire has its one run.
#[test]
fn two_daemons_on_one_database_one_killed_every_occurrence_fired_once() {
    let dir = tempfile::tempdir().unwrap();
    let url = kmsflow_pgtest::server().database();
    std::fs::write(
        dir.path().join("quick.yaml"),
        "name: quick\nsteps:\n  - id: hi\n    uses: noop\n",
    )
    .unwrap();
    let kmsflow = |args: &[&str], host: &str| on_database(dir.path(), &url, host, args);
    let added = kmsflow(
        &[
            "schedule",
            "add",
            "shared",
            "--runbook",
            "quick.yaml",
            "--cron",
            "* * * * * *",
            "--overlap",
            "allow",
        ],
        "admin",
    )
    .output()
    .unwrap();
    assert!(added.status.success(), "{}", stderr(&added));
    let daemon = |host: &str| {
        kmsflow(&["daemon", "--tick", "100ms"], host)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let (mut a, mut b) = (daemon("runner-a"), daemon("runner-b"));
    std::thread::sleep(Duration::from_secs(6));
    a.kill().unwrap();
    a.wait().unwrap();
    std::thread::sleep(Duration::from_secs(6));
    nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(b.id() as i32),
        nix::sys::signal::Signal::SIGTERM,
    )
    .unwrap();
    assert!(b.wait().unwrap().success());

    let history = kmsflow(
        &["schedule", "history", "shared", "--output", "json"],
        "admin",
    )
    .output()
    .unwrap();
    let fires: Vec<Value> = serde_json::from_slice::<Value>(&history.stdout)
        .unwrap()
        .as_array()
        .unwrap()
        .clone();
    let seconds: Vec<i64> = fires
        .iter()
        .map(|f| {
            chrono::DateTime::parse_from_rfc3339(f["occurrence"].as_str().unwrap())
                .unwrap()
                .timestamp()
        })
        .collect();
    let (first, last) = (seconds[0], *seconds.last().unwrap());
    assert!(
        last - first >= 10,
        "the survivor went on firing: {fires:#?}"
    );
    assert_eq!(
        seconds,
        (first..=last).collect::<Vec<_>>(),
        "each second exactly once, none lost or doubled"
    );
    let started = fires.iter().filter(|f| f["outcome"] == "started").count();
    assert!(
        started >= seconds.len() - 1,
        "at most the one in the killed daemon's hands: {fires:#?}"
    );
    let runs = kmsflow(&["runs", "--output", "json", "--limit", "1000"], "admin")
        .output()
        .unwrap();
    let listed: Value =
        serde_json::from_slice(&runs.stdout).unwrap_or_else(|_| panic!("{}", stderr(&runs)));
    assert_eq!(
        listed.as_array().unwrap().len(),
        started,
        "one run per started fire"
    );
}

/// A daemon keeps one connection to the database across its ticks: forty looks at the
/// schedules in two seconds are not forty logins (each a server process on PostgreSQL).
#[test]
fn a_daemon_keeps_its_connection_across_ticks() {
    let dir = tempfile::tempdir().unwrap();
    let server = kmsflow_pgtest::server();
    let url = server.database();
    let name = url.rsplit('/').next().unwrap().to_owned();
    let daemon = on_database(dir.path(), &url, "runner", &["daemon", "--tick", "50ms"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_secs(2));
    drain(std::iter::once(daemon));
    let sessions: u64 = server
        .sql(
            &name,
            "SELECT sessions FROM pg_stat_database WHERE datname = current_database()",
        )
        .parse()
        .unwrap();
    // The migration's, the sweep's and the ticks' connection, the cancel watcher's; not one a
    // tick. (psql's own session counts once when it ends, after this query.)
    assert!(sessions <= 6, "{sessions} sessions for forty ticks");
}

/// The binary in `dir` with its state in database `url`, as host `host`, with no Azure.
fn on_database(dir: &Path, url: &str, host: &str, args: &[&str]) -> std::process::Command {
    let mut command = std::process::Command::new(env!("CARGO_BIN_EXE_kmsflow"));
    command
        .args(args)
        .current_dir(dir)
        .env("KMSFLOW_STATE", url)
        .env("KMSFLOW_HOST_ID", host)
        .stdin(Stdio::null());
    command
}

/// A schedule with `--queue`: the daemon decides each occurrence and queues its run; workers
/// run them. Every started fire's run was taken by a worker, succeeded, and its fire records
/// the run's end (`worst: ok`), as a fire the daemon ran itself would.
#[test]
fn a_queued_schedules_fires_are_run_by_workers_and_recorded_by_the_daemon() {
    let dir = tempfile::tempdir().unwrap();
    let url = kmsflow_pgtest::server().database();
    std::fs::write(
        dir.path().join("quick.yaml"),
        "name: quick\nsteps:\n  - id: hi\n    uses: noop\n",
    )
    .unwrap();
    let kmsflow = |args: &[&str], host: &str| on_database(dir.path(), &url, host, args);
    let schedule = [
        "schedule",
        "add",
        "queued",
        "--runbook",
        "quick.yaml",
        "--cron",
        "* * * * * *",
        "--overlap",
        "allow",
        "--queue",
        "east",
    ];
    let added = kmsflow(&schedule, "admin").output().unwrap();
    assert!(added.status.success(), "{}", stderr(&added));
    let spawn = |args: &[&str], host: &str| {
        kmsflow(args, host)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap()
    };
    let workers = vec![
        spawn(&["worker", "--queue", "east"], "worker-1"),
        spawn(&["worker", "--queue", "east"], "worker-2"),
    ];
    let daemon = spawn(&["daemon", "--tick", "100ms"], "runner");
    std::thread::sleep(Duration::from_secs(5));
    drain(std::iter::once(daemon));
    drain(workers.into_iter());

    let history = kmsflow(
        &["schedule", "history", "queued", "--output", "json"],
        "admin",
    )
    .output()
    .unwrap();
    let fires: Vec<Value> = serde_json::from_slice::<Value>(&history.stdout)
        .unwrap_or_else(|_| panic!("{}", stderr(&history)))
        .as_array()
        .unwrap()
        .clone();
    let started: Vec<&Value> = fires.iter().filter(|f| f["outcome"] == "started").collect();
    assert!(started.len() >= 3, "a fire a second: {fires:#?}");
    for fire in started {
        let run_id = fire["run_id"].as_str().unwrap();
        let events = kmsflow(&["events", run_id, "--output", "json"], "admin")
            .output()
            .unwrap();
        let events: Value = serde_json::from_slice(&events.stdout)
            .unwrap_or_else(|_| panic!("{}", stderr(&events)));
        let kinds: Vec<&str> = events
            .as_array()
            .unwrap()
            .iter()
            .map(|e| e["kind"].as_str().unwrap())
            .collect();
        assert!(
            kinds.contains(&"run_queued") && kinds.contains(&"queue_claimed"),
            "{run_id} went through the queue: {kinds:?}"
        );
        assert_eq!(
            (
                fire["detail"]["status"].as_str(),
                fire["detail"]["worst"].as_str()
            ),
            (Some("succeeded"), Some("ok")),
            "the fire records how its run ended: {fire:#?}"
        );
    }
}

const SUBSCRIPTION: &str = "00000000-0000-4000-8000-5a4db0c5ab0c";

/// A sandbox world of `n` PMK-ready clusters in `rg-east`, answering each write `write_ms`
/// after applying it; and a database of its own.
fn fleet(dir: &Path, n: usize, write_ms: u64) -> Served {
    let clusters: Vec<Value> = (0..n)
        .map(|i| {
            let name = format!("aks-{i:03}");
            serde_json::json!({
                "id": format!("/subscriptions/{SUBSCRIPTION}/resourceGroups/rg-east/providers/Microsoft.ContainerService/managedClusters/{name}"),
                "name": name, "type": "Microsoft.ContainerService/ManagedClusters", "location": "eastus",
                "eTag": "00000000-0000-4000-8000-0000000e7a90",
                "identity": {"type": "SystemAssigned", "principalId": "00000000-0000-4000-8000-00000000c1a5", "tenantId": "sandbox"},
                "properties": {
                    "provisioningState": "Succeeded", "kubernetesVersion": "1.33.0", "currentKubernetesVersion": "1.33.0",
                    "dnsPrefix": format!("{name}-dns"),
                    "agentPoolProfiles": [{"name": "nodepool1", "mode": "System", "count": 3, "vmSize": "Standard_DS2_v2", "osType": "Linux", "type": "VirtualMachineScaleSets"}],
                    "securityProfile": {"azureKeyVaultKms": null},
                },
            })
        })
        .collect();
    let world = serde_json::json!({
        "resource_groups": [{"name": "rg-east", "location": "eastus"}],
        "features_registered": [{"namespace": "Microsoft.ContainerService", "feature": "KMSPMKPreview"}],
        "resources": clusters,
    });
    std::fs::write(dir.join("world.json"), world.to_string()).unwrap();
    std::fs::write(
        dir.join("faults.yaml"),
        format!("latency: {{ min_ms: 0, max_ms: 0, write_ms: {write_ms} }}\n"),
    )
    .unwrap();
    let world = dir.join("world.json").display().to_string();
    let faults = dir.join("faults.yaml").display().to_string();
    let mut served = serve(&["--world", &world, "--faults", &faults]);
    served.state = Some(kmsflow_pgtest::server().database());
    served
}

/// Three workers on one queue of twelve clusters' runs; one worker is kill -9ed after the
/// fleet's fourth write. Its claims pass on when their lease runs out, and another worker
/// resumes each of its runs: every cluster converges, each cluster's PUT sent exactly once.
#[test]
fn three_workers_one_killed_every_queued_cluster_converges_exactly_once() {
    let n = 12;
    let dir = tempfile::tempdir().unwrap();
    let served = fleet(dir.path(), n, 400);
    let lease = "4";
    let mut ids = Vec::new();
    for i in 0..n {
        ids.push(cluster_run_queued(&served, dir.path(), i));
    }
    assert_eq!(served.writes(), 0, "queueing changes nothing");
    // Everyone sees what waits: `runs` lists the queued runs, `show` says where one waits.
    let listed = served
        .kmsflow(dir.path(), &["runs", "--output", "json"])
        .output()
        .unwrap();
    let listed: Value = serde_json::from_slice(&listed.stdout).unwrap();
    let waiting: Vec<&str> = listed
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["kind"] == "queued" && r["status"] == "queued")
        .map(|r| r["id"].as_str().unwrap())
        .collect();
    assert_eq!(waiting.len(), n, "{listed:#}");
    let shown = served
        .kmsflow(dir.path(), &["show", &ids[0]])
        .output()
        .unwrap();
    assert!(
        String::from_utf8_lossy(&shown.stdout).contains("queued on `east`: waiting for a worker"),
        "{}",
        String::from_utf8_lossy(&shown.stdout)
    );
    let mut workers = three_workers(&served, dir.path(), lease);
    let logs = || worker_logs(dir.path());
    until_writes(&served, &mut workers[0], 4);
    workers[0].kill().unwrap();
    workers[0].wait().unwrap();
    // Every queued run ends, the killed worker's too.
    let deadline = Instant::now() + Duration::from_secs(120);
    let finished = loop {
        let shown: Vec<Value> = ids
            .iter()
            .map(|id| {
                let out = served
                    .kmsflow(dir.path(), &["show", id, "--output", "json"])
                    .output()
                    .unwrap();
                serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
            })
            .collect();
        if shown.iter().all(|run| run["status"] == "succeeded") {
            break shown;
        }
        assert!(
            Instant::now() < deadline,
            "not every run ended: {:#?}\n{}",
            shown
                .iter()
                .map(|r| (&r["id"], &r["status"]))
                .collect::<Vec<_>>(),
            logs()
        );
        std::thread::sleep(Duration::from_millis(500));
    };
    drain(workers.drain(1..));
    assert_eq!(finished.len(), n);
    every_cluster_converged_once(&served, n);
}

/// A worker sent SIGTERM in the middle of a queued run drains like Ctrl-C: its running step
/// (the cluster's PUT) finishes and is checkpointed, the worker exits 0, and the run goes back
/// on the queue at once. Another worker resumes it long before the claim's lease would have
/// run out, observes the PUT done, and sends no write again.
#[test]
fn a_worker_drained_in_the_middle_of_a_run_gives_it_back_and_another_finishes_it_once() {
    let dir = tempfile::tempdir().unwrap();
    let served = fleet(dir.path(), 1, 1500);
    let id = cluster_run_queued(&served, dir.path(), 0);
    // A lease far longer than the test: only the release can pass the run on in time.
    let env = [("KMSFLOW_LOCK_LEASE", "600"), ("KMSFLOW_LOG", "info")];
    let worker = |host: &str| one_slot_worker(&served, dir.path(), host, &env);
    let mut first = worker("worker-1");
    until_writes(&served, &mut first, 1);
    let drained_at = Instant::now();
    drain(std::iter::once(first));
    let log = |host: &str| {
        std::fs::read_to_string(dir.path().join(format!("{host}.log"))).unwrap_or_default()
    };
    assert!(log("worker-1").contains("draining"), "{}", log("worker-1"));
    let shown = |id: &str| -> Value {
        let out = served
            .kmsflow(dir.path(), &["show", id, "--output", "json"])
            .output()
            .unwrap();
        serde_json::from_slice(&out.stdout).unwrap_or(Value::Null)
    };
    assert_ne!(
        shown(&id)["status"],
        "succeeded",
        "the drain stopped the run"
    );
    let writes_when_drained = served.writes();

    let second = worker("worker-2");
    let deadline = Instant::now() + Duration::from_secs(60);
    while shown(&id)["status"] != "succeeded" {
        assert!(
            Instant::now() < deadline,
            "the run did not end: {:#}\n{}",
            shown(&id),
            log("worker-2")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert!(
        drained_at.elapsed() < Duration::from_secs(120),
        "passed on by the release, not after the 600 s lease"
    );
    drain(std::iter::once(second));
    assert!(log("worker-2").contains("resuming"), "{}", log("worker-2"));
    assert_eq!(
        served.writes(),
        writes_when_drained,
        "the resumed run sent no write again"
    );
    every_cluster_converged_once(&served, 1);
}

/// Runs `kmsflow run ARGS --detach` and returns the queued id it printed.
fn detached(served: &Served, dir: &Path, args: &[&str]) -> String {
    let args: Vec<&str> = ["run"]
        .iter()
        .chain(args)
        .chain(&["--detach"])
        .copied()
        .collect();
    let queued = served.kmsflow(dir, &args).output().unwrap();
    assert!(queued.status.success(), "{}", stderr(&queued));
    String::from_utf8_lossy(&queued.stdout).trim().to_owned()
}

/// `pmk-existing-cluster` for [`fleet`]'s cluster `i`, queued on `east`; the run's id.
fn cluster_run_queued(served: &Served, dir: &Path, i: usize) -> String {
    let cluster = format!("cluster=aks-{i:03}");
    let args = [
        "pmk-existing-cluster",
        "-p",
        "resource_group=rg-east",
        "-p",
        &cluster,
    ];
    detached(served, dir, &[&args[..], &["--queue", "east"]].concat())
}

/// A worker on queue `east` with one slot, as host `host`, logging to `HOST.log` in `dir`.
fn one_slot_worker(served: &Served, dir: &Path, host: &str, env: &[(&str, &str)]) -> Child {
    served
        .kmsflow(dir, &["worker", "--queue", "east", "--concurrency", "1"])
        .env("KMSFLOW_HOST_ID", host)
        .envs(env.iter().copied())
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join(format!("{host}.log"))).unwrap())
        .spawn()
        .unwrap()
}

/// `targets.csv` in `dir`: the `n` clusters of [`fleet`], one per row.
fn targets_file(dir: &Path, n: usize) {
    let rows: String = std::iter::once("cluster\n".to_owned())
        .chain((0..n).map(|i| format!("aks-{i:03}\n")))
        .collect();
    std::fs::write(dir.join("targets.csv"), rows).unwrap();
}

/// Three workers (hosts `worker-1` to `-3`) on queue `east`, two runs each at once, with a
/// lease of `lease` seconds; each logs to `worker-N.log` in `dir`.
fn three_workers(served: &Served, dir: &Path, lease: &str) -> Vec<Child> {
    (1..=3)
        .map(|i| {
            let host = format!("worker-{i}");
            served
                .kmsflow(dir, &["worker", "--queue", "east", "--concurrency", "2"])
                .env("KMSFLOW_HOST_ID", &host)
                .env("KMSFLOW_LOCK_LEASE", lease)
                .env("KMSFLOW_LOG", "info")
                .stdout(Stdio::null())
                .stderr(std::fs::File::create(dir.join(format!("{host}.log"))).unwrap())
                .spawn()
                .unwrap()
        })
        .collect()
}

fn worker_logs(dir: &Path) -> String {
    (1..=3)
        .map(|i| {
            let name = format!("worker-{i}.log");
            let log = std::fs::read_to_string(dir.join(&name)).unwrap_or_default();
            format!("--- {name}\n{log}")
        })
        .collect()
}

/// SIGTERMs each worker: it drains and exits 0.
fn drain(workers: impl Iterator<Item = Child>) {
    for mut worker in workers {
        nix::sys::signal::kill(
            nix::unistd::Pid::from_raw(worker.id() as i32),
            nix::sys::signal::Signal::SIGTERM,
        )
        .unwrap();
        assert!(worker.wait().unwrap().success(), "SIGTERM drains");
    }
}

/// Every one of the `n` clusters is encrypted, and each had its PUT exactly once (`writes`
/// asserts that no write at all was sent twice).
fn every_cluster_converged_once(served: &Served, n: usize) {
    let world = served.world();
    let encrypted = world["resources"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|r| r["properties"]["securityProfile"]["kubernetesResourceObjectEncryptionProfile"]["infrastructureEncryption"] == "Enabled")
        .count();
    assert_eq!(encrypted, n, "every cluster converged");
    let sent = writes(served);
    let puts = sent
        .keys()
        .filter(|k| k.contains("/managedclusters/aks-"))
        .count();
    assert_eq!(puts, n, "one PUT per cluster: {sent:#?}");
}

/// One rollout of sixty clusters shared out to three workers (`--distribute`); the worker
/// that drives it is kill -9ed a third of the way through. Its claims (the rollout's drive
/// and its runs) pass on when their lease runs out: another worker takes over the drive and
/// the runs, and every cluster converges, each cluster's PUT sent exactly once. The command
/// that asked waits throughout and exits 0.
#[test]
fn three_workers_one_killed_a_distributed_rollout_converges_every_cluster_exactly_once() {
    distributed_rollout_survives_its_driver(Store::Postgres);
}

/// The same with the four processes sharing one SQLite file on one machine: the queue, the
/// claims and the takeover work on both backends.
#[test]
fn on_a_state_file_too_a_distributed_rollout_survives_its_driver() {
    distributed_rollout_survives_its_driver(Store::File);
}

#[derive(Clone, Copy)]
enum Store {
    Postgres,
    File,
}

fn distributed_rollout_survives_its_driver(store: Store) {
    let n = 60;
    let dir = tempfile::tempdir().unwrap();
    let mut served = fleet(dir.path(), n, 100);
    if let Store::File = store {
        served.state = None;
    }
    targets_file(dir.path(), n);
    let mut workers = three_workers(&served, dir.path(), "4");
    let mut asked = served
        .kmsflow(
            dir.path(),
            &[
                "run",
                "pmk-existing-cluster",
                "-p",
                "resource_group=rg-east",
                "--targets",
                "targets.csv",
                "--concurrency",
                "6",
                "--distribute",
                "--queue",
                "east",
            ],
        )
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.path().join("asked.log")).unwrap())
        .spawn()
        .unwrap();
    let followed = || std::fs::read_to_string(dir.path().join("asked.log")).unwrap();
    let deadline = Instant::now() + Duration::from_secs(120);
    while served.writes() < n / 3 {
        assert!(
            asked.try_wait().unwrap().is_none() && Instant::now() < deadline,
            "the rollout ended, or did not write, before write {}:\n{}\n{}",
            n / 3,
            followed(),
            worker_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(5));
    }
    // Kill the worker driving the rollout: the hardest one to lose.
    let driver = (0..3)
        .find(|i| {
            std::fs::read_to_string(dir.path().join(format!("worker-{}.log", i + 1)))
                .unwrap()
                .contains("driving the rollout")
        })
        .expect("one worker drives the rollout");
    let killed_at = served.writes();
    workers[driver].kill().unwrap();
    workers[driver].wait().unwrap();
    let deadline = Instant::now() + Duration::from_secs(240);
    let status = loop {
        if let Some(status) = asked.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "the rollout did not end\n{}",
            worker_logs(dir.path())
        );
        std::thread::sleep(Duration::from_millis(200));
    };
    let followed = followed();
    assert!(
        status.success(),
        "the rollout succeeds (worker-{} killed at write {killed_at}):\n{followed}\n{}",
        driver + 1,
        worker_logs(dir.path())
    );
    assert!(
        followed.matches("driven by worker").count() >= 2,
        "another worker took the drive over: {followed}"
    );
    let taken_over = (0..3).filter(|i| *i != driver).any(|i| {
        std::fs::read_to_string(dir.path().join(format!("worker-{}.log", i + 1)))
            .unwrap()
            .contains("taking over the rollout")
    });
    assert!(taken_over, "{}", worker_logs(dir.path()));
    // Already waited for when it was killed.
    let _killed = workers.remove(driver).wait();
    drain(workers.into_iter());
    every_cluster_converged_once(&served, n);
}

/// A distributed rollout whose canary fails (Azure refuses its PUT once) stops there, its
/// other targets never queued; `kmsflow resume ROLLOUT` puts the failed run back on the queue
/// for a worker to resume, and queues the rest: every cluster converges, with one accepted
/// PUT each.
#[test]
fn a_failed_distributed_rollout_resumed_puts_its_failed_target_back_on_the_queue() {
    let n = 4;
    let dir = tempfile::tempdir().unwrap();
    let served = fleet(dir.path(), n, 0);
    served.set_faults(
        "rules:\n  - { method: PUT, path: \"*/managedClusters/aks-000\", times: 1, status: 400, code: InvalidParameter }\n",
    );
    targets_file(dir.path(), n);
    let workers = three_workers(&served, dir.path(), "4");
    let rollout = served
        .kmsflow(
            dir.path(),
            &[
                "run",
                "pmk-existing-cluster",
                "-p",
                "resource_group=rg-east",
                "--targets",
                "targets.csv",
                "--distribute",
                "--queue",
                "east",
                "--output",
                "json",
            ],
        )
        .output()
        .unwrap();
    assert_eq!(rollout.status.code(), Some(1), "{}", stderr(&rollout));
    let report: Value = serde_json::from_slice(&rollout.stdout).unwrap();
    let id = report["id"].as_str().unwrap().to_owned();
    assert_eq!(report["summary"]["failed"], 1, "{report:#}");
    assert_eq!(report["summary"]["not_started"], n - 1, "{report:#}");

    let resumed = served
        .kmsflow(dir.path(), &["resume", &id])
        .output()
        .unwrap();
    assert!(
        resumed.status.success(),
        "{}\n{}",
        stderr(&resumed),
        worker_logs(dir.path())
    );
    drain(workers.into_iter());
    let events = served
        .kmsflow(dir.path(), &["events", &id, "--output", "json"])
        .output()
        .unwrap();
    let events: Value = serde_json::from_slice(&events.stdout).unwrap();
    let queued = events
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["kind"] == "target_queued")
        .count();
    assert_eq!(
        queued, n,
        "each target queued once, the failed one put back, not queued anew"
    );
    every_cluster_converged_once(&served, n);
}

/// A distributed rollout whose only worker is drained part-way leaves targets on the queue.
/// Rolling it back takes them off first: a worker started afterwards starts or resumes none
/// of them, and sends no write. (The one target that ran cannot be undone: PMK has no
/// downgrade, so the rollback itself ends `rollback_failed`, as it would locally.)
#[test]
fn rolling_back_a_distributed_rollout_takes_its_waiting_targets_off_the_queue() {
    let n = 6;
    let dir = tempfile::tempdir().unwrap();
    let served = fleet(dir.path(), n, 1500);
    targets_file(dir.path(), n);
    let id = detached(
        &served,
        dir.path(),
        &[
            "pmk-existing-cluster",
            "-p",
            "resource_group=rg-east",
            "--targets",
            "targets.csv",
            "--waves",
            "100%",
            "--concurrency",
            "4",
            "--distribute",
            "--queue",
            "east",
        ],
    );
    let worker = |host: &str| one_slot_worker(&served, dir.path(), host, &[]);
    let mut first = worker("worker-1");
    // Its one slot is in the first target's PUT; three more targets wait on the queue.
    until_writes(&served, &mut first, 1);
    drain(std::iter::once(first));

    let undone = served
        .kmsflow(dir.path(), &["rollback", &id])
        .output()
        .unwrap();
    let said = stderr(&undone);
    assert!(said.contains("1 of its 6 targets to undo"), "{said}");
    let writes_after_rollback = served.writes();
    let again = worker("worker-2");
    std::thread::sleep(Duration::from_secs(3));
    drain(std::iter::once(again));
    let log = std::fs::read_to_string(dir.path().join("worker-2.log")).unwrap();
    assert!(
        !log.contains("starting") && !log.contains("resuming"),
        "no worker starts or resumes a target of a rolled-back rollout: {log}"
    );
    assert_eq!(
        served.writes(),
        writes_after_rollback,
        "nothing written after the rollback"
    );
}
