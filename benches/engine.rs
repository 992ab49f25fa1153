//! Engine overhead: a 1,000-step chain and a 1,000-step fan-out of `noop` steps with durable
//! checkpoints, beside the raw commit rate of the same store measured in the same process: on
//! SQLite with the same journal mode and `synchronous` setting; then on PostgreSQL (a
//! throwaway server of this run, fsync on, `synchronous_commit` on) beside single-row INSERT
//! transactions through the same driver against the same server.
//!
//! Beside them, in the same run: the chain's checkpoints committed one after another through
//! the store's writer without the engine (what the chain's statements alone allow), and the
//! wide fan-out as the first run on a fresh store, creating its schema. The other runs use a
//! store migrated before they start, as every run on a team's database after its first does;
//! each still opens its own session.
//!
//! Run: `cargo bench --bench engine` (add `-- --sync normal` for synchronous=NORMAL on SQLite;
//! `-- --sqlite-only` without PostgreSQL, `-- --postgres-only` without SQLite).

use std::sync::Arc;
use std::time::{Duration, Instant};

use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::progress::silent;
use kmsflow_engine::{Registry, RunbookSource, compile};
use kmsflow_state::{
    Durability, Location, RunStatus, measure_checkpoint_commits, measure_raw_commits,
    measure_raw_postgres_commits,
};

const N_STEPS: usize = 1_000;

fn chain(n: usize) -> String {
    let mut text = String::from("name: chain\nsteps:\n  - id: s0\n    uses: noop\n");
    for i in 1..n {
        text.push_str(&format!(
            "  - id: s{i}\n    uses: noop\n    needs: [s{}]\n",
            i - 1
        ));
    }
    text
}

fn fan_out(n: usize) -> String {
    let mut text = String::from("name: fan-out\nsteps:\n  - id: root\n    uses: noop\n");
    for i in 1..n {
        text.push_str(&format!(
            "  - id: s{i}\n    uses: noop\n    needs: [root]\n"
        ));
    }
    text
}

/// Whether a run's time counts creating the store's schema: a team's database is migrated once
/// in its life, so the rates are for runs on a migrated store, and one figure shows the first
/// run on a fresh one.
#[derive(Clone, Copy, PartialEq)]
enum Schema {
    MigratedBefore,
    MigratedInRun,
}

async fn time_run(
    state: Location,
    name: &str,
    text: &str,
    (durability, schema): (Durability, Schema),
    concurrency: usize,
) -> Duration {
    let registry = Registry::with_engine_kinds();
    let compiled = Arc::new(compile(&RunbookSource::new(name, text), &registry).expect("valid"));
    let params = bind(&compiled, &ParamSources::default()).expect("no params");
    let engine = Engine {
        registry,
        state,
        durability,
    };
    let request = RunRequest {
        runbook: compiled,
        runbook_ref: name.to_owned(),
        source: text.to_owned(),
        params,
        options: ExecOptions {
            concurrency,
            ..ExecOptions::default()
        },
        signals: Signals::default(),
        progress: silent(),
    };
    if schema == Schema::MigratedBefore {
        drop(kmsflow_state::Store::open(&engine.state, durability).expect("migrate the store"));
    }
    // The run still opens its own session and reads the schema's version.
    let started = Instant::now();
    let summary = launch::start(&engine, request).await.expect("run");
    let elapsed = started.elapsed();
    assert_eq!(summary.status, RunStatus::Succeeded);
    elapsed
}

/// The chain and the fan-outs on `state(name, concurrency)`, each rate beside `raw_rate`.
fn engine_rates(
    runtime: &tokio::runtime::Runtime,
    state: &dyn Fn(&str, usize) -> Location,
    durability: Durability,
    raw_rate: f64,
    (chain_target, fan_target): (f64, f64),
) {
    let chain_text = chain(N_STEPS);
    let fan_text = fan_out(N_STEPS);
    // The chain's checkpoints alone, through the store's writer without the engine: the most
    // the chain could reach with the statements each of its steps must commit.
    let alone = measure_checkpoint_commits(&state("checkpoints", 1), N_STEPS, durability)
        .expect("checkpoints alone");
    let alone_rate = N_STEPS as f64 / alone.as_secs_f64();
    println!(
        "a chain's checkpoints alone (fence, step, journal row; no engine): {alone_rate:>9.0} commits/s  = {:.2} x raw",
        alone_rate / raw_rate
    );
    let migrated = (durability, Schema::MigratedBefore);
    let chain_time = runtime.block_on(time_run(
        state("chain", 8),
        "chain",
        &chain_text,
        migrated,
        8,
    ));
    let chain_rate = N_STEPS as f64 / chain_time.as_secs_f64();
    println!(
        "chain   of {N_STEPS} noop steps: {chain_rate:>9.0} steps/s  = {:.2} x raw (target >= {chain_target}), {:.2} x its checkpoints alone",
        chain_rate / raw_rate,
        chain_rate / alone_rate
    );
    for concurrency in [8, 64] {
        let fan_time = runtime.block_on(time_run(
            state("fan-out", concurrency),
            "fan-out",
            &fan_text,
            migrated,
            concurrency,
        ));
        let fan_rate = N_STEPS as f64 / fan_time.as_secs_f64();
        println!(
            "fan-out of {N_STEPS} noop steps, --concurrency {concurrency:>2}: {fan_rate:>9.0} steps/s  = {:.2} x raw (target >= {fan_target})",
            fan_rate / raw_rate
        );
    }
    // The expensive first run: the store's schema is created inside it.
    let first_time = runtime.block_on(time_run(
        state("fresh", 64),
        "fan-out",
        &fan_text,
        (durability, Schema::MigratedInRun),
        64,
    ));
    let first_rate = N_STEPS as f64 / first_time.as_secs_f64();
    println!(
        "  the same fan-out (--concurrency 64) as the first run on a fresh store, creating its schema: {first_rate:>9.0} steps/s  = {:.2} x raw",
        first_rate / raw_rate
    );
}

fn main() {
    let durability = if std::env::args().any(|a| a == "normal") {
        Durability::Normal
    } else {
        Durability::Full
    };
    let dir = tempfile::tempdir().expect("temp dir");
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .unwrap();

    let n_commits = 3_000;
    let postgres_only = std::env::args().any(|a| a == "--postgres-only");
    if !postgres_only {
        sqlite_rates(&runtime, dir.path(), durability, n_commits);
    }
    if std::env::args().any(|a| a == "--sqlite-only") {
        return;
    }
    postgres_rates(&runtime, n_commits);
}

/// The chain and fan-outs on SQLite files, beside the raw SQLite commit rate.
fn sqlite_rates(
    runtime: &tokio::runtime::Runtime,
    dir: &std::path::Path,
    durability: Durability,
    n_commits: usize,
) {
    let raw = measure_raw_commits(&dir.join("raw.db"), n_commits, durability).expect("raw commits");
    let raw_rate = n_commits as f64 / raw.as_secs_f64();
    println!("SQLite: synchronous={durability:?}, journal_mode=WAL");
    println!(
        "raw SQLite commit rate: {raw_rate:>9.0} commits/s ({n_commits} single-row transactions)"
    );
    let files = |name: &str, concurrency: usize| {
        Location::File(dir.join(format!("{name}-{concurrency}.db")))
    };
    engine_rates(runtime, &files, durability, raw_rate, (0.5, 2.0));
}

/// The chain and fan-outs on a throwaway PostgreSQL server, beside its raw commit rate.
fn postgres_rates(runtime: &tokio::runtime::Runtime, n_commits: usize) {
    let server = kmsflow_pgtest::private_server();
    let raw_location = match Location::parse(&server.database()).expect("a URL") {
        Location::Postgres(pg) => pg,
        Location::File(_) => unreachable!("a postgres:// URL"),
    };
    let raw = measure_raw_postgres_commits(&raw_location, n_commits).expect("raw commits");
    let raw_rate = n_commits as f64 / raw.as_secs_f64();
    println!("PostgreSQL: fsync=on, synchronous_commit=on, loopback TCP, same server for all");
    println!(
        "raw PostgreSQL commit rate: {raw_rate:>9.0} commits/s ({n_commits} single-row INSERT transactions)"
    );
    let databases = |_: &str, _: usize| Location::parse(&server.database()).expect("a URL");
    engine_rates(runtime, &databases, Durability::Full, raw_rate, (0.8, 3.0));
}
