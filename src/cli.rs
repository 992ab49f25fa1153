//! The command line: the contract the tests and the docs build on.

use std::path::PathBuf;

use clap::{Args, Parser, Subcommand, ValueEnum};
use kmsflow_engine::rollout::{Share, WaveGate};

/// Durable, resumable runbooks for risky changes to Azure clusters.
#[derive(Debug, Parser)]
#[command(name = "kmsflow", version, about, long_about = None)]
pub struct Cli {
    /// How logs look on stderr (filter them with `KMSFLOW_LOG`, e.g. `KMSFLOW_LOG=debug`).
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Pretty)]
    pub log_format: LogFormat,

    #[command(subcommand)]
    pub command: Command,
}

/// Where runs are kept: for the commands that read or write them.
#[derive(Debug, Clone, Args)]
pub struct StateArgs {
    /// The state: a file (SQLite), or a team's PostgreSQL database as
    /// `postgres://user@host:port/db?sslmode=...` (password from the URL, PGPASSWORD or
    /// ~/.pgpass; TLS verified off loopback). Default: `$KMSFLOW_STATE`, else
    /// kmsflow/state.db under the user's state directory.
    #[arg(long, global = true, env = "KMSFLOW_STATE", value_name = "DB")]
    pub state: Option<PathBuf>,

    /// `full` survives power loss; `normal` survives a crash of kmsflow, and may re-observe
    /// the last step after a power loss (steps are idempotent, so nothing is applied twice).
    #[arg(long, global = true, value_enum, default_value_t = Sync::Full)]
    pub sync: Sync,
}

impl Default for StateArgs {
    fn default() -> StateArgs {
        StateArgs {
            state: None,
            sync: Sync::Full,
        }
    }
}

/// How kmsflow reaches Azure: for the commands that call it.
#[derive(Debug, Clone, Args)]
pub struct AzureArgs {
    /// How to authenticate to Azure. `auto`: workload identity when its environment is set,
    /// then managed identity when its endpoint is set, then the Azure CLI.
    #[arg(long, env = "KMSFLOW_AUTH", value_enum, default_value_t = Auth::Auto)]
    pub auth: Auth,

    /// The Azure cloud: `AzurePublicCloud`, `AzureUSGovernment`, `AzureChinaCloud`, or a JSON
    /// profile file. It decides the token audiences and which hosts are Key Vault's.
    #[arg(long, env = "KMSFLOW_CLOUD", default_value = "AzurePublicCloud")]
    pub cloud: String,

    /// The Resource Manager endpoint, if not the cloud's own (a sandbox). Must be https except
    /// on loopback.
    #[arg(long, env = "KMSFLOW_ARM_ENDPOINT")]
    pub arm_endpoint: Option<String>,
}

impl Default for AzureArgs {
    fn default() -> AzureArgs {
        AzureArgs {
            auth: Auth::Auto,
            cloud: "AzurePublicCloud".to_owned(),
            arm_endpoint: None,
        }
    }
}

impl AzureArgs {
    /// For a command without the flags (`runs`, `show`, ...): what `KMSFLOW_AUTH`,
    /// `KMSFLOW_CLOUD` and `KMSFLOW_ARM_ENDPOINT` say, so an `auth=entra` state database is
    /// signed in to the same way by every command.
    pub fn from_env() -> Result<AzureArgs, clap::Error> {
        #[derive(clap::Parser)]
        struct EnvOnly {
            #[command(flatten)]
            azure: AzureArgs,
        }
        <EnvOnly as clap::Parser>::try_parse_from(["kmsflow"]).map(|only| only.azure)
    }
}

#[derive(Debug, Clone, Copy, ValueEnum)]
pub enum Sync {
    Full,
    Normal,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Auth {
    Auto,
    Cli,
    ManagedIdentity,
    WorkloadIdentity,
    ClientSecret,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum LogFormat {
    Pretty,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Output {
    Text,
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ValidateOutput {
    Text,
    Json,
    Sarif,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum GraphFormat {
    Dot,
    Mermaid,
    Json,
}

/// Running against the built-in sandbox instead of Azure.
#[derive(Debug, Clone, Args)]
pub struct SandboxArgs {
    /// Run against an in-process sandbox (a loopback stand-in for Azure) instead of Azure. Its
    /// world is kept beside the state file, so a killed run resumes against the same world.
    #[arg(long)]
    pub sandbox: bool,
    /// Fault injection for the sandbox (YAML).
    #[arg(long, value_name = "FILE", requires = "sandbox")]
    pub sandbox_faults: Option<PathBuf>,
}

/// How a rollout paces its targets (with `--targets`).
#[derive(Debug, Clone, Args)]
pub struct RateArgs {
    /// Failures allowed before no new target starts (targets in flight finish): a number or
    /// a share (`5%`). Default 0: the first failure stops the rollout.
    #[arg(long, value_name = "N|N%")]
    pub max_errors: Option<Share>,
    /// Cumulative shares of the targets per wave, e.g. `1,10%,50%,100%`. Default: a canary
    /// of one, then doubling up to the concurrency, then the rest.
    #[arg(
        long,
        value_delimiter = ',',
        value_name = "SHARES",
        requires = "targets"
    )]
    pub waves: Option<Vec<Share>>,
    /// Between waves: `approve` (wait for `kmsflow approve ROLLOUT wave-N`), `pause=DURATION`
    /// or `none` (the default).
    #[arg(long, value_name = "GATE")]
    pub wave_gate: Option<WaveGate>,
}

/// `--discover`: the fleet found in Azure instead of a file.
#[derive(Debug, Clone, Args)]
pub struct DiscoverArgs {
    /// Find the targets in Azure: the managed clusters of `--subscription` (default: every
    /// subscription the credential can see), kept by `--where`.
    #[arg(long, conflicts_with = "targets")]
    pub discover: bool,
    /// A subscription to look in (repeatable).
    #[arg(long, value_name = "ID", requires = "discover")]
    pub subscription: Vec<String>,
    /// Keep only clusters that match (repeatable, all must): `tag:KEY=VALUE`, `name=GLOB`,
    /// `location=X`, `version=GLOB` (e.g. `1.33*`), `kms=none|PMK|CMK`.
    #[arg(long = "where", value_name = "FILTER", requires = "discover")]
    pub filters: Vec<crate::discover::Filter>,
    /// A per-target parameter from the cluster's names (repeatable), e.g.
    /// `key_vault=kv-{{cluster}}` (`{{cluster}}`, `{{resource_group}}`, `{{subscription}}`,
    /// `{{location}}`).
    #[arg(
        long = "target-param",
        value_name = "NAME=TEMPLATE",
        requires = "discover"
    )]
    pub target_params: Vec<crate::discover::TargetParam>,
}

/// Parameters of a runbook.
#[derive(Debug, Clone, Args)]
pub struct ParamArgs {
    /// A parameter, `key=value` (repeatable).
    #[arg(short = 'p', long = "param", value_name = "KEY=VALUE")]
    pub params: Vec<String>,
    /// A YAML mapping of parameters.
    #[arg(long, value_name = "FILE")]
    pub params_file: Option<PathBuf>,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Check runbooks without running anything (exit 0 valid, 2 invalid).
    Validate {
        /// Runbook files, or names of bundled runbooks.
        #[arg(required = true, value_name = "RUNBOOK")]
        runbooks: Vec<String>,
        /// `text` (diagnostics drawn on stderr), `json` (every problem with its file, line
        /// and column, on stdout) or `sarif` (SARIF 2.1.0, for code-scanning).
        #[arg(long, value_enum, default_value_t = ValidateOutput::Text)]
        output: ValidateOutput,
    },
    /// Print a runbook's DAG.
    Graph {
        /// A runbook file, or the name of a bundled runbook (`kmsflow runbooks`).
        runbook: String,
        /// `dot` (Graphviz), `mermaid` or `json`.
        #[arg(long, value_enum, default_value_t = GraphFormat::Dot)]
        format: GraphFormat,
    },
    /// Print the JSON Schema of the runbook format (for editors).
    Schema,
    /// List the bundled runbooks.
    Runbooks,
    /// Print a shell completion script (e.g. `kmsflow completions bash > /etc/bash_completion.d/kmsflow`).
    Completions {
        /// The shell to complete for.
        #[arg(value_enum)]
        shell: clap_complete::Shell,
    },
    /// Print the man page (roff; e.g. `kmsflow man > kmsflow.1`).
    Man,
    /// Print the reference of every step kind (parameters and outputs) as Markdown.
    Docs,
    /// Show what each step would do, without changing anything.
    Plan {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// A runbook file, or the name of a bundled runbook (`kmsflow runbooks`).
        runbook: String,
        #[command(flatten)]
        params: ParamArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// Plan once per target of this file (as `run --targets` would run them): a row per
        /// target with what it would change.
        #[arg(long, value_name = "FILE")]
        targets: Option<PathBuf>,
        #[command(flatten)]
        discover: DiscoverArgs,
        /// With `--targets` or `--discover`: targets planned at once.
        #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// Exit 0 when nothing would change, 2 when a step would fail (listed), 5 when the
        /// plan has changes.
        #[arg(long)]
        detailed_exitcode: bool,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Run a runbook.
    Run {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// A runbook file, or the name of a bundled runbook (`kmsflow runbooks`).
        runbook: String,
        #[command(flatten)]
        params: ParamArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// Run once per target of this file, as one rollout: CSV with a header row, or a
        /// YAML list of mappings. Columns are the runbook's parameters (`resource_group,cluster,
        /// key_vault,identity`); `-p` gives values every row shares.
        #[arg(long, value_name = "FILE")]
        targets: Option<PathBuf>,
        #[command(flatten)]
        discover: DiscoverArgs,
        /// Steps running at once (default 8). With `--targets` or `--discover`: targets at
        /// once, a number or a share of them (`25%`; default 10).
        #[arg(long, value_name = "N|N%")]
        concurrency: Option<Share>,
        #[command(flatten)]
        rate: RateArgs,
        /// With `--targets` or `--discover`: print the targets and what each would change (as
        /// `plan --targets`); change nothing.
        #[arg(long)]
        dry_run: bool,
        /// Go past a point of no return without asking (needed without a terminal, unless an
        /// `approve` step of the runbook stands before it).
        #[arg(long, short = 'y')]
        yes: bool,
        /// Queue the run for a worker of this queue (`kmsflow worker --queue NAME`, on any
        /// machine sharing the state) instead of running it here; wait and print its
        /// transitions as the worker records them.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
        /// With `--targets` or `--discover`: share the rollout out to the workers of
        /// `--queue` (default `default`): a worker drives it, and each target's run goes to
        /// whichever worker takes it. Waits and prints the rollout's progress.
        #[arg(long, conflicts_with = "dry_run")]
        distribute: bool,
        /// With `--queue` or `--distribute`: print the run's (or rollout's) id and return at
        /// once.
        #[arg(long)]
        detach: bool,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Continue a run (or a rollout) that failed, was interrupted or waits for approval.
    Resume {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        #[command(flatten)]
        params: ParamArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// Run the runbook file as it is now even if it changed since the run started.
        #[arg(long)]
        allow_changed_runbook: bool,
        /// Let `-p`, the params file or the environment change a parameter the run was
        /// started with (which can point it at another target). Off: such a value is refused.
        #[arg(long)]
        allow_param_change: bool,
        /// Run STEP and every step downstream of it again, even if they succeeded (their
        /// outputs are dropped; upstream outputs are reused). A succeeded run can be resumed so.
        #[arg(long, value_name = "STEP")]
        from: Option<String>,
        /// With `--from`: print which steps would run again and which are reused; run nothing.
        #[arg(long, requires = "from")]
        dry_run: bool,
        /// Who resumes (default: $USER@host; the OS user is recorded beside it).
        #[arg(long)]
        by: Option<String>,
        /// Why: recorded in the journal.
        #[arg(long)]
        reason: Option<String>,
        /// Steps running at once, at most.
        #[arg(long, default_value_t = 8, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Undo what a run (or every run of a rollout) changed, newest first.
    Rollback {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        #[command(flatten)]
        params: ParamArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// Let `-p`, the params file or the environment change a parameter the run was
        /// started with. Off: rollback acts only on what the run recorded it touched.
        #[arg(long)]
        allow_param_change: bool,
        /// Print what the rollback would delete and put back, newest first; change nothing.
        #[arg(long, conflicts_with = "yes")]
        dry_run: bool,
        /// Delete what the run created without asking (needed without a terminal).
        #[arg(long, short = 'y')]
        yes: bool,
        /// For a rollout: targets rolled back at once (default: the rollout's concurrency).
        #[arg(long, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: Option<u16>,
        /// Who rolls back (default: $USER@host; the OS user is recorded beside it).
        #[arg(long)]
        by: Option<String>,
        /// Why: recorded in the journal.
        #[arg(long)]
        reason: Option<String>,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Approve a waiting `approve` step, or a rollout's next wave; then `kmsflow resume`
    /// continues.
    Approve {
        #[command(flatten)]
        state: StateArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        /// The waiting `approve` step, or `wave-N` for a rollout.
        step_id: String,
        /// Who approves (default: $USER@host).
        #[arg(long)]
        by: Option<String>,
    },
    /// Refuse a waiting `approve` step: the run fails at it (and can be rolled back).
    Reject {
        #[command(flatten)]
        state: StateArgs,
        /// The run: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        /// The waiting `approve` step.
        step_id: String,
        /// Why: recorded in the journal and shown as the run's error.
        #[arg(long)]
        reason: String,
        /// Who rejects (default: $USER@host; the OS user is recorded beside it).
        #[arg(long)]
        by: Option<String>,
    },
    /// Stop a run (or rollout) another shell drives, as Ctrl-C there would: no new step
    /// starts, running steps finish and checkpoint, the lock is released, and it is
    /// `interrupted` (resumable). Recorded with who and why.
    Cancel {
        #[command(flatten)]
        state: StateArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        /// Why: recorded in the journal.
        #[arg(long)]
        reason: Option<String>,
        /// Who cancels (default: $USER@host; the OS user is recorded beside it).
        #[arg(long)]
        by: Option<String>,
        /// How long to wait for it to stop (its running steps finish first).
        #[arg(long, default_value = "2m", value_parser = parse_duration_arg)]
        wait: std::time::Duration,
    },
    /// List recent runs.
    Runs {
        #[command(flatten)]
        state: StateArgs,
        /// The most recent runs shown, at most.
        #[arg(long, default_value_t = 50)]
        limit: usize,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Show a run and its steps, or a rollout and its targets.
    Show {
        #[command(flatten)]
        state: StateArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Check KMS health (the `rotation-check` runbook) for one cluster, or a fleet with
    /// `--targets`; exit 0 all ok, 5 any warning, 1 any failure.
    Check {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        #[command(flatten)]
        params: ParamArgs,
        #[command(flatten)]
        sandbox: SandboxArgs,
        /// A YAML list or CSV (`subscription,resource_group,cluster,expected_mode`) of clusters.
        #[arg(long, value_name = "FILE")]
        targets: Option<PathBuf>,
        #[command(flatten)]
        discover: DiscoverArgs,
        /// Clusters checked at once, at most.
        #[arg(long, default_value_t = 16, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// The loopback Azure stand-in, for trying runbooks without a subscription.
    #[command(subcommand)]
    Sandbox(SandboxCommand),
    /// Moves the state between stores.
    #[command(subcommand)]
    State(StateCommand),
    /// Runs on a schedule (`kmsflow daemon` fires them).
    Schedule {
        #[command(flatten)]
        state: StateArgs,
        #[command(subcommand)]
        command: ScheduleCommand,
    },
    /// Fires due schedules until SIGTERM or Ctrl-C (then lets running checks finish, exit 0).
    Daemon {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// How often schedules are looked at.
        #[arg(long, default_value = "250ms", value_parser = parse_duration_arg)]
        tick: std::time::Duration,
    },
    /// Takes queued runs (`kmsflow run ... --queue NAME`) from the shared state and drives
    /// them, resuming any a stopped worker left part-way; SIGTERM or Ctrl-C drains (running
    /// steps finish, their runs go back to the queue).
    Worker {
        #[command(flatten)]
        state: StateArgs,
        #[command(flatten)]
        azure: AzureArgs,
        /// The queue to take runs from.
        #[arg(long, default_value = "default", value_name = "NAME")]
        queue: String,
        /// Runs driven at once.
        #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
        concurrency: u16,
    },
    /// Show a run's (or a rollout's) journal of transitions.
    Events {
        #[command(flatten)]
        state: StateArgs,
        /// The run or rollout: its id or a unique prefix of it (`kmsflow runs`).
        run_id: String,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[derive(Debug, Subcommand)]
pub enum SandboxCommand {
    /// Serve on 127.0.0.1; prints the base URL, then `NAME=value` lines ready for `export`.
    Serve {
        /// Port to listen on (0 picks a free one).
        #[arg(long, default_value_t = 0)]
        port: u16,
        /// Fault injection (YAML): latency, throttling, errors, delays, token buckets, rules.
        #[arg(long, value_name = "FILE")]
        faults: Option<PathBuf>,
        /// Pre-existing resources (YAML or JSON), or the name of a bundled runbook to seed what
        /// it expects to exist (as `--sandbox` does).
        #[arg(long, value_name = "FILE")]
        world: Option<PathBuf>,
        /// Speak https with a certificate made for this run, on Azure's host shapes: Resource
        /// Manager on `management.sandbox.localhost`, each vault on
        /// `{vault}.vault.sandbox.localhost`. The authority's certificate and a cloud profile
        /// for `--cloud` are written to `--tls-dir`.
        #[arg(long)]
        tls: bool,
        /// Where `--tls` writes `ca.pem` and `cloud.json` (default: a new private folder
        /// under the temporary directory).
        #[arg(long, value_name = "DIR", requires = "tls")]
        tls_dir: Option<PathBuf>,
    },
}

impl Command {
    /// Where the command keeps runs, for the commands that have runs.
    pub fn state_args(&self) -> Option<&StateArgs> {
        match self {
            Command::Plan { state, .. }
            | Command::Run { state, .. }
            | Command::Resume { state, .. }
            | Command::Rollback { state, .. }
            | Command::Check { state, .. }
            | Command::Daemon { state, .. }
            | Command::Worker { state, .. }
            | Command::Approve { state, .. }
            | Command::Reject { state, .. }
            | Command::Cancel { state, .. }
            | Command::Runs { state, .. }
            | Command::Show { state, .. }
            | Command::Events { state, .. }
            | Command::Schedule { state, .. } => Some(state),
            _ => None,
        }
    }

    /// How the command reaches Azure, for the commands that call it.
    pub fn azure_args_mut(&mut self) -> Option<&mut AzureArgs> {
        match self {
            Command::Plan { azure, .. }
            | Command::Run { azure, .. }
            | Command::Resume { azure, .. }
            | Command::Rollback { azure, .. }
            | Command::Check { azure, .. }
            | Command::Worker { azure, .. }
            | Command::Daemon { azure, .. } => Some(azure),
            _ => None,
        }
    }

    /// The `--sandbox` arguments, for commands that take them and set them.
    pub fn sandbox(&self) -> Option<&SandboxArgs> {
        match self {
            Command::Plan { sandbox, .. }
            | Command::Run { sandbox, .. }
            | Command::Resume { sandbox, .. }
            | Command::Rollback { sandbox, .. }
            | Command::Check { sandbox, .. } => Some(sandbox).filter(|s| s.sandbox),
            _ => None,
        }
    }
}

fn parse_duration_arg(text: &str) -> Result<std::time::Duration, String> {
    kmsflow_engine::duration::parse_duration(text).map_err(|e| e.to_string())
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Overlap {
    /// A fire that finds the previous run still going is recorded `skipped`.
    Skip,
    /// Keep one such fire and start it when the previous run ends.
    BufferOne,
    /// Start regardless.
    Allow,
}

#[derive(Debug, Subcommand)]
pub enum StateCommand {
    /// Copies a state file's whole history (runs, steps, journal, approvals, schedules and
    /// their fires, rollouts) into another store, typically the team's PostgreSQL database,
    /// in one transaction. Refused if the target holds runs already, or while a run of the
    /// file is being driven.
    Migrate {
        /// The state file to copy.
        #[arg(long, value_name = "FILE")]
        from: PathBuf,
        /// Where to copy it: `postgres://...` (or another state file).
        #[arg(long, value_name = "DB")]
        to: PathBuf,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

// Parsed once per process: the size of its largest variant costs nothing worth a Box.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Subcommand)]
pub enum ScheduleCommand {
    /// Adds a schedule.
    Add {
        /// The schedule's name.
        name: String,
        /// The runbook (a path or a bundled name); `rotation-check` when `--targets` is given.
        #[arg(long)]
        runbook: Option<String>,
        #[command(flatten)]
        params: ParamArgs,
        /// UTC cron: 5 fields, or 6 with seconds first (`*/30 * * * * *`).
        #[arg(long)]
        cron: String,
        /// What a fire does when the previous run is still going.
        #[arg(long, value_enum, default_value_t = Overlap::Skip)]
        overlap: Overlap,
        /// After downtime, an occurrence this recent still fires (once); older ones are `missed`.
        #[arg(long, default_value = "0s", value_parser = parse_duration_arg)]
        catchup: std::time::Duration,
        /// Delay each fire by a random part of this (spreads fleets of schedules).
        #[arg(long, default_value = "0s", value_parser = parse_duration_arg)]
        jitter: std::time::Duration,
        /// Fire once per row of this file: a fleet check of these clusters without
        /// `--runbook` (see `kmsflow check --targets`), a rollout of the runbook with it (see
        /// `kmsflow run --targets`).
        #[arg(long, value_name = "FILE")]
        targets: Option<PathBuf>,
        /// The fleet found in Azure at each fire, instead of a file (see `kmsflow run
        /// --discover`).
        #[command(flatten)]
        discover: DiscoverArgs,
        /// A rollout's targets at once, a number or a share (`25%`; default 10).
        #[arg(long, value_name = "N|N%")]
        concurrency: Option<Share>,
        #[command(flatten)]
        rate: RateArgs,
        /// POST a JSON summary here when a run ends `warn` or `fail`, and once when it recovers.
        #[arg(long, value_name = "URL")]
        notify_webhook: Option<String>,
        /// Fires go to the workers of this queue (`kmsflow worker --queue NAME`): a run is
        /// queued for one, a rollout's targets are shared out among them (as `run
        /// --distribute`). The daemon still decides each occurrence, waits for its end and
        /// notifies. Not for a fleet check, which the daemon runs itself.
        #[arg(long, value_name = "NAME")]
        queue: Option<String>,
    },
    /// Lists the schedules.
    List {
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
    /// Removes a schedule (its history stays).
    Remove {
        /// The schedule's name.
        name: String,
    },
    /// Stops firing a schedule until `resume`.
    Pause {
        /// The schedule's name.
        name: String,
    },
    /// Fires a paused schedule again.
    Resume {
        /// The schedule's name.
        name: String,
    },
    /// Every fire of a schedule: started (with its run), skipped, missed.
    History {
        /// The schedule's name.
        name: String,
        /// `text` for people, `json` for scripts (on stdout).
        #[arg(long, value_enum, default_value_t = Output::Text)]
        output: Output,
    },
}

#[cfg(test)]
mod tests {
    use clap::CommandFactory;

    use super::*;

    /// Every argument and flag of every subcommand says what it is for.
    #[test]
    fn every_argument_has_help() {
        fn walk(command: &clap::Command, path: &str, missing: &mut Vec<String>) {
            for arg in command.get_arguments() {
                let id = arg.get_id().as_str();
                if id == "help" || id == "version" {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    missing.push(format!("{path} {id}"));
                }
            }
            for sub in command.get_subcommands() {
                walk(sub, &format!("{path} {}", sub.get_name()), missing);
            }
        }
        let mut missing = Vec::new();
        walk(&Cli::command(), "kmsflow", &mut missing);
        assert!(missing.is_empty(), "without help: {missing:#?}");
    }

    /// A flag a subcommand ignores is not offered on it: `validate` reads no state and calls
    /// no Azure, so neither `--state` nor `--cloud` is one of its flags.
    #[test]
    fn flags_a_subcommand_ignores_are_not_offered() {
        let cli = Cli::command();
        let flags = |name: &str| -> Vec<String> {
            let sub = cli.find_subcommand(name).unwrap();
            sub.get_arguments()
                .filter_map(|a| a.get_long().map(str::to_owned))
                .collect()
        };
        for offline in ["validate", "graph", "schema", "runbooks", "docs", "man"] {
            let offered = flags(offline);
            for flag in ["state", "sync", "auth", "cloud", "arm-endpoint"] {
                assert!(
                    !offered.contains(&flag.to_owned()),
                    "{offline} offers --{flag}"
                );
            }
        }
        for reads_state in ["runs", "show", "events", "approve"] {
            let offered = flags(reads_state);
            assert!(offered.contains(&"state".to_owned()), "{reads_state}");
            assert!(!offered.contains(&"cloud".to_owned()), "{reads_state}");
        }
        assert!(flags("run").contains(&"cloud".to_owned()));
    }
}
