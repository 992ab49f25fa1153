//! One function per subcommand.

use crate::output::{out, outln};
use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;

use kmsflow_engine::executor::{ExecOptions, NoReturn, RunSummary};
use kmsflow_engine::launch::{self, Continuation, Engine, RollbackRequest, RunRequest};
use kmsflow_engine::params::{self, BoundParams, ParamSources};
use kmsflow_engine::progress::ProgressSink;
use kmsflow_engine::{CompiledRunbook, RunbookSource};
use kmsflow_state::{Durability, RunStatus, Store};
use serde_json::{Map, Value};

use crate::cli::{
    Auth, Cli, Command, GraphFormat, LogFormat, Output, ParamArgs, SandboxCommand, Sync,
};
use crate::failure::{Failure, code, status_code};
use crate::{bundled, registry, render};
use kmsflow_steps::{AuthMode, AzureConfig};

pub async fn dispatch(mut cli: Cli) -> Result<u8, Failure> {
    let reach = match cli.command.azure_args_mut() {
        Some(given) => given.clone(),
        None => crate::cli::AzureArgs::from_env()
            .map_err(|e| Failure::Usage(format!("KMSFLOW_AUTH, KMSFLOW_CLOUD: {e}")))?,
    };
    let state = cli.command.state_args().cloned().unwrap_or_default();
    let auth = match reach.auth {
        Auth::Auto => AuthMode::Auto,
        Auth::Cli => AuthMode::Cli,
        Auth::ManagedIdentity => AuthMode::ManagedIdentity,
        Auth::WorkloadIdentity => AuthMode::WorkloadIdentity,
        Auth::ClientSecret => AuthMode::ClientSecret,
    };
    let cloud = kmsflow_steps::CloudProfile::named_or_file(&reach.cloud)
        .map_err(|e| Failure::Usage(format!("--cloud: {e}")))?;
    let mut azure = AzureConfig::for_cloud(cloud, reach.arm_endpoint.as_deref(), auth)
        .map_err(|e| Failure::Usage(format!("--arm-endpoint: {e}")))?;
    if let Some(limit) = std::env::var("KMSFLOW_MAX_ANSWER_BYTES")
        .ok()
        .filter(|v| !v.is_empty())
    {
        azure.max_answer_bytes = limit.trim().parse().ok().filter(|n| *n >= 1024).ok_or_else(|| {
            Failure::Usage(format!(
                "KMSFLOW_MAX_ANSWER_BYTES is `{limit}`: give a number of bytes, at least 1024 (the default is {})",
                kmsflow_steps::client::DEFAULT_MAX_ANSWER_BYTES
            ))
        })?;
    }
    let context = Context {
        azure,
        state: state.state.clone(),
        durability: match state.sync {
            Sync::Full => Durability::Full,
            Sync::Normal => Durability::Normal,
        },
        json_logs: cli.log_format == LogFormat::Json,
        sandbox: cli.command.sandbox().is_some(),
        location: std::sync::OnceLock::new(),
    };
    match cli.command {
        Command::Validate { runbooks, output } => validate(&runbooks, output),
        Command::Graph { runbook, format } => graph(&runbook, format),
        Command::Schema => print_json(&kmsflow_engine::schema::runbook_schema(&registry())),
        Command::Runbooks => list_runbooks(),
        Command::Completions { shell } => {
            let mut command = <crate::cli::Cli as clap::CommandFactory>::command();
            let mut script = Vec::new();
            clap_complete::generate(shell, &mut command, "kmsflow", &mut script);
            out!("{}", String::from_utf8_lossy(&script));
            Ok(code::SUCCESS)
        }
        Command::Man => {
            let command = <crate::cli::Cli as clap::CommandFactory>::command();
            let mut page = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut page)
                .map_err(|e| Failure::Usage(format!("cannot render the man page: {e}")))?;
            out!("{}", String::from_utf8_lossy(&page));
            Ok(code::SUCCESS)
        }
        Command::Docs => {
            out!("{}", docs());
            Ok(code::SUCCESS)
        }
        Command::Plan {
            runbook,
            params,
            targets,
            discover,
            concurrency,
            detailed_exitcode,
            output,
            ..
        } => match crate::rollouts::Fleet::of(targets.as_deref(), &discover) {
            Some(fleet) => {
                let asked = crate::rollouts::PlanFleet {
                    runbook: &runbook,
                    params: &params,
                    fleet,
                    concurrency: concurrency.into(),
                    detailed_exitcode,
                    output,
                };
                crate::rollouts::plan(&context, asked).await
            }
            None => plan(&context, &runbook, &params, detailed_exitcode, output).await,
        },
        Command::Run {
            runbook,
            params,
            targets,
            discover,
            concurrency,
            rate,
            dry_run,
            yes,
            output,
            queue,
            distribute,
            detach,
            ..
        } => match crate::rollouts::Fleet::of(targets.as_deref(), &discover) {
            _ if detach && queue.is_none() && !distribute => Err(Failure::Usage(
                "`--detach` returns once the run is queued: give `--queue NAME` (or, for a rollout, `--distribute`)".into(),
            )),
            Some(_) if queue.is_some() && !distribute => Err(Failure::Usage(
                "`--queue` with a fleet: add `--distribute` to share the rollout out to the queue's workers".into(),
            )),
            None if distribute => Err(Failure::Usage(
                "`--distribute` shares a rollout out to workers: give `--targets FILE` or `--discover` (one run goes to a worker with `--queue NAME`)".into(),
            )),
            Some(fleet) if dry_run => {
                let asked = crate::rollouts::PlanFleet {
                    runbook: &runbook,
                    params: &params,
                    fleet,
                    concurrency: match concurrency {
                        Some(kmsflow_engine::rollout::Share::Count(n)) => n.max(1),
                        _ => 10,
                    },
                    detailed_exitcode: false,
                    output,
                };
                crate::rollouts::plan(&context, asked).await
            }
            Some(fleet) => {
                let asked = crate::rollouts::Rollout {
                    runbook: &runbook,
                    params: &params,
                    fleet,
                    concurrency,
                    rate: &rate,
                    yes,
                    output,
                    distribute: distribute.then(|| crate::distribute::Distribute {
                        queue: queue.unwrap_or_else(|| "default".into()),
                        detach,
                    }),
                };
                crate::rollouts::run(&context, asked).await
            }
            None if queue.is_some() => {
                let asked = crate::worker::Enqueue {
                    runbook: &runbook,
                    params: &params,
                    queue: queue.expect("given"),
                    concurrency: steps_at_once(concurrency)?,
                    yes,
                    detach,
                };
                crate::worker::enqueue(&context, asked).await
            }
            None => {
                let fleet_only = [
                    (rate.max_errors.is_some(), "--max-errors"),
                    (rate.waves.is_some(), "--waves"),
                    (rate.wave_gate.is_some(), "--wave-gate"),
                    (dry_run, "--dry-run"),
                ];
                if let Some((_, flag)) = fleet_only.iter().find(|(given, _)| *given) {
                    return Err(Failure::Usage(format!(
                        "{flag} is for a rollout: give `--targets FILE` or `--discover` (for one run, `kmsflow plan` is the dry run)"
                    )));
                }
                let steps = steps_at_once(concurrency)?;
                run(&context, &runbook, &params, steps, yes, output).await
            }
        },
        Command::Resume {
            run_id,
            params,
            from,
            by,
            reason,
            output,
            ..
        } if crate::rollouts::is_rollout(&run_id) => {
            if from.is_some() {
                return Err(Failure::Usage(
                    "`--from` runs steps of one run again; give one of the rollout's runs (`kmsflow show ROLLOUT` lists them)".into(),
                ));
            }
            let operator = operator_of(by, reason);
            crate::rollouts::resume(&context, &run_id, &params, operator, output).await
        }
        Command::Resume {
            run_id,
            from: Some(from),
            dry_run: true,
            output,
            ..
        } => rerun_dry_run(&context, &run_id, &from, output),
        Command::Resume {
            run_id,
            params,
            allow_changed_runbook,
            allow_param_change,
            from,
            by,
            reason,
            concurrency,
            output,
            ..
        } => {
            let allow = Allow {
                changed_runbook: allow_changed_runbook,
                param_change: allow_param_change,
            };
            let asked = Resumed {
                from,
                operator: operator_of(by, reason),
                concurrency,
            };
            resume(&context, &run_id, &params, allow, asked, output).await
        }
        Command::Rollback {
            run_id,
            params,
            dry_run,
            yes,
            concurrency,
            by,
            reason,
            output,
            ..
        } if crate::rollouts::is_rollout(&run_id) => {
            if dry_run {
                crate::rollouts::rollback_dry_run(&context, &run_id, output)
            } else {
                let asked = crate::rollouts::Undo {
                    concurrency,
                    yes,
                    operator: operator_of(by, reason),
                };
                crate::rollouts::rollback(&context, &run_id, &params, asked, output).await
            }
        }
        Command::Rollback {
            run_id,
            params,
            allow_param_change,
            dry_run,
            yes,
            by,
            reason,
            output,
            ..
        } => {
            if dry_run {
                // From the records alone: parameters only matter to a rollback that acts.
                rollback_dry_run(&context, &run_id, output)
            } else {
                let asked = UndoRun {
                    allow_param_change,
                    yes,
                    operator: operator_of(by, reason),
                };
                rollback(&context, &run_id, &params, asked, output).await
            }
        }
        Command::Approve {
            run_id,
            step_id,
            by,
            ..
        } if crate::rollouts::is_rollout(&run_id) => {
            crate::rollouts::approve(&context, &run_id, &step_id, &operator(by))
        }
        Command::Approve {
            run_id,
            step_id,
            by,
            ..
        } => approve(&context, &run_id, &step_id, by),
        Command::Reject {
            run_id,
            step_id,
            reason,
            by,
            ..
        } => reject(&context, &run_id, &step_id, &reason, by),
        Command::Cancel {
            run_id,
            reason,
            by,
            wait,
            ..
        } => cancel(&context, &run_id, reason, by, wait).await,
        Command::Runs { limit, output, .. } => runs(&context, limit, output),
        Command::Show { run_id, output, .. } if crate::rollouts::is_rollout(&run_id) => {
            crate::rollouts::show(&context, &run_id, output)
        }
        Command::Show { run_id, output, .. } => show(&context, &run_id, output),
        Command::Events { run_id, output, .. } if crate::rollouts::is_rollout(&run_id) => {
            crate::rollouts::events(&context, &run_id, output)
        }
        Command::Events { run_id, output, .. } => events(&context, &run_id, output),
        Command::Check {
            params,
            targets,
            discover,
            concurrency,
            output,
            ..
        } => {
            let fleet = crate::rollouts::Fleet::of(targets.as_deref(), &discover);
            check(&context, &params, fleet, concurrency, output).await
        }
        Command::Schedule { command, .. } => schedule(&context, command).await,
        Command::Daemon { tick, .. } => daemon(&context, tick).await,
        Command::Worker {
            queue, concurrency, ..
        } => crate::worker::worker(&context, queue, concurrency as usize).await,
        Command::State(crate::cli::StateCommand::Migrate { from, to, output }) => {
            migrate_state(&context, &from, &to, output)
        }
        Command::Sandbox(SandboxCommand::Serve {
            port,
            faults,
            world,
            tls,
            tls_dir,
        }) => {
            let tls = tls.then(|| tls_dir.clone());
            sandbox_serve(port, faults.as_deref(), world.as_deref(), tls).await
        }
    }
}

/// `--concurrency` of a single run: steps at once, a number (a share means targets).
fn steps_at_once(concurrency: Option<kmsflow_engine::rollout::Share>) -> Result<u16, Failure> {
    use kmsflow_engine::rollout::Share;
    match concurrency {
        None => Ok(8),
        Some(Share::Count(n)) if (1..=u16::MAX as usize).contains(&n) => Ok(n as u16),
        Some(other) => Err(Failure::Usage(format!(
            "--concurrency {other}: a run's steps at once are a number from 1; a share of targets needs `--targets`"
        ))),
    }
}

pub(crate) struct Context {
    azure: AzureConfig,
    /// `--sandbox`: required names default to the sandbox's.
    sandbox: bool,
    state: Option<PathBuf>,
    durability: Durability,
    pub(crate) json_logs: bool,
    /// Where the state is, made once: an `auth=entra` database keeps its token for every
    /// store the command opens.
    location: std::sync::OnceLock<kmsflow_state::Location>,
}

impl Context {
    /// How this command reaches Azure.
    pub(crate) fn azure_config(&self) -> AzureConfig {
        self.azure.clone()
    }

    /// Where the state is, signed in to as `--auth` says when its URL says `auth=entra`.
    pub(crate) fn state_location(&self) -> Result<kmsflow_state::Location, Failure> {
        if let Some(location) = self.location.get() {
            return Ok(location.clone());
        }
        let location = crate::state_file::state_location(self.state.as_deref())?;
        crate::state_file::sign_in_with_azure(&location, &self.azure)?;
        Ok(self.location.get_or_init(|| location).clone())
    }

    pub(crate) fn engine(&self) -> Result<Engine, Failure> {
        let state = self.state_location()?;
        Ok(Engine {
            registry: crate::registry_with(self.azure.clone()),
            state,
            durability: self.durability,
        })
    }

    /// Opens the store for reading.
    pub(crate) fn store(&self) -> Result<Store, Failure> {
        let engine = self.engine()?;
        Ok(Store::open(&engine.state, engine.durability)?)
    }

    /// Opens the store for a command that only reads (`runs`, `show`, `events`): read-only
    /// when this user may not write the file, so a copied or shared state can be inspected.
    /// [`read_store`](Self::read_store), or `None` when the state file does not exist yet.
    pub(crate) fn read_store_if_any(&self) -> Result<Option<Store>, Failure> {
        let engine = self.engine()?;
        if engine
            .state
            .file()
            .is_some_and(|path| std::fs::metadata(path).is_err())
        {
            return Ok(None);
        }
        self.read_store().map(Some)
    }

    pub(crate) fn read_store(&self) -> Result<Store, Failure> {
        let engine = self.engine()?;
        // A command that only reads never creates a store (and its folders) by looking.
        if let Some(path) = engine.state.file()
            && std::fs::metadata(path).is_err()
        {
            return Err(Failure::Usage(format!(
                "there is no state file at `{}`: nothing has run with it; point --state (or KMSFLOW_STATE) at the file your runs use",
                path.display()
            )));
        }
        match Store::open(&engine.state, engine.durability) {
            Ok(store) => Ok(store),
            Err(error) if engine.state.file().is_some_and(std::path::Path::is_file) => {
                let path = engine.state.file().expect("a file store");
                tracing::debug!(%error, "opening the state file read-only");
                Store::open_read_only(path).map_err(|read_only| {
                    Failure::Usage(format!(
                        "cannot read the state file `{}`: {read_only} (opening it to write said: {error})",
                        path.display()
                    ))
                })
            }
            Err(error) => Err(error.into()),
        }
    }
}

/// A runbook's text and the name it is known by: a path, or a bundled runbook's name.
pub(crate) struct Loaded {
    pub(crate) source: RunbookSource,
    /// Stored with the run: the path, or `bundled:<name>`.
    pub(crate) reference: String,
}

pub(crate) fn load(runbook: &str) -> Result<Loaded, Failure> {
    let path = std::path::Path::new(runbook);
    let bundled_name = runbook.strip_prefix("bundled:").unwrap_or(runbook);
    if path.is_dir() {
        // A folder is never a runbook; a bundled runbook of its name is what was meant, and
        // the user is told which was taken.
        if let Some(b) = bundled::find(bundled_name) {
            crate::output::note!(
                "`{runbook}` is a folder here; using the bundled runbook `{}` (say `bundled:{}` to be explicit)",
                b.name,
                b.name
            );
        } else {
            return Err(Failure::Usage(format!(
                "`{runbook}` is a folder, not a runbook file; name the YAML file inside it"
            )));
        }
    } else if path.exists() {
        let text = std::fs::read_to_string(path)
            .map_err(|e| Failure::Usage(format!("cannot read `{runbook}`: {e}")))?;
        let reference = std::fs::canonicalize(path)
            .map(|p| p.display().to_string())
            .unwrap_or_else(|_| runbook.to_owned());
        return Ok(Loaded {
            source: RunbookSource::new(runbook, text),
            reference,
        });
    }
    let name = runbook.strip_prefix("bundled:").unwrap_or(runbook);
    match bundled::find(name) {
        Some(b) => Ok(Loaded {
            source: RunbookSource::new(format!("bundled:{}", b.name), b.text),
            reference: format!("bundled:{}", b.name),
        }),
        None => Err(Failure::Usage(format!(
            "no runbook file `{runbook}` and no bundled runbook of that name; `kmsflow runbooks` lists the bundled ones"
        ))),
    }
}

pub(crate) fn compile_loaded(loaded: &Loaded) -> Result<Arc<CompiledRunbook>, Failure> {
    compile_source(&loaded.source)
}

/// Compiles a runbook, finding its fragments beside it (or in the binary, for bundled ones).
fn compile_source(source: &RunbookSource) -> Result<Arc<CompiledRunbook>, Failure> {
    kmsflow_engine::compile_with(source, &registry(), &bundled::Fragments)
        .map(Arc::new)
        .map_err(Failure::Invalid)
}

pub(crate) fn param_sources(context: &Context, args: &ParamArgs) -> Result<ParamSources, Failure> {
    let mut cli: Vec<(String, String)> = args
        .params
        .iter()
        .map(|p| params::parse_assignment(p).map_err(Failure::Usage))
        .collect::<Result<_, _>>()?;
    // `-p NAME=@-`: the value from standard input, so a secret is in neither `ps` nor the
    // shell's history.
    let from_stdin: Vec<&mut (String, String)> =
        cli.iter_mut().filter(|(_, value)| value == "@-").collect();
    if from_stdin.len() > 1 {
        return Err(Failure::Usage(
            "only one `-p NAME=@-` can read standard input".into(),
        ));
    }
    if let Some((name, value)) = from_stdin.into_iter().next() {
        let text = match STDIN_PARAM.get() {
            Some((read, text)) if read.as_str() == name.as_str() => text.clone(),
            _ => {
                let mut text = String::new();
                std::io::Read::read_to_string(&mut std::io::stdin(), &mut text).map_err(|e| {
                    Failure::Usage(format!("-p {name}=@-: cannot read standard input: {e}"))
                })?;
                let text = text.strip_suffix('\n').unwrap_or(&text);
                let text = text.strip_suffix('\r').unwrap_or(text).to_owned();
                let _ = STDIN_PARAM.set((name.clone(), text.clone()));
                text
            }
        };
        *value = text;
    }
    let file = match &args.params_file {
        None => Map::new(),
        Some(path) => {
            let text = std::fs::read_to_string(path)
                .map_err(|e| Failure::Usage(format!("cannot read `{}`: {e}", path.display())))?;
            match serde_yaml::from_str::<Value>(&text) {
                Ok(Value::Object(map)) => map,
                Ok(Value::Null) => Map::new(),
                Ok(_) => {
                    return Err(Failure::Usage(format!(
                        "`{}` must be a YAML mapping of parameter names to values",
                        path.display()
                    )));
                }
                Err(e) => {
                    return Err(Failure::Usage(format!(
                        "cannot parse `{}`: {e}",
                        path.display()
                    )));
                }
            }
        }
    };
    let env: HashMap<String, String> = std::env::vars().collect();
    let fallback = if context.sandbox {
        crate::sandboxed::default_names()
    } else {
        Map::new()
    };
    Ok(ParamSources {
        cli,
        file,
        env,
        fallback,
        ..Default::default()
    })
}

/// The parameter read from standard input (`-p NAME=@-`), once per process.
static STDIN_PARAM: std::sync::OnceLock<(String, String)> = std::sync::OnceLock::new();

pub(crate) fn bind(
    runbook: &CompiledRunbook,
    sources: &ParamSources,
) -> Result<BoundParams, Failure> {
    warn_of_secrets_on_the_command_line(runbook, sources);
    params::bind(runbook, sources).map_err(Failure::Params)
}

/// Once per process: a secret given as `-p NAME=VALUE` is visible to every user of the machine
/// (`ps`) and stays in the shell's history.
fn warn_of_secrets_on_the_command_line(runbook: &CompiledRunbook, sources: &ParamSources) {
    static WARNED: std::sync::atomic::AtomicBool = std::sync::atomic::AtomicBool::new(false);
    let from_stdin = STDIN_PARAM.get().map(|(name, _)| name.as_str());
    let Some(param) = runbook.params.iter().find(|param| {
        param.secret
            && Some(param.name.as_str()) != from_stdin
            && sources.cli.iter().any(|(name, _)| *name == param.name)
    }) else {
        return;
    };
    if !WARNED.swap(true, std::sync::atomic::Ordering::SeqCst) {
        crate::output::note!(
            "`-p {0}=...` puts the secret `{0}` on the command line, where `ps` and the shell's history see it; pass it as KMSFLOW_PARAM_{1}, in --params-file, or as `-p {0}=@-` (read from standard input)",
            param.name,
            param.name.to_uppercase()
        );
    }
}

pub(crate) fn print_json(value: &Value) -> Result<u8, Failure> {
    use std::io::Write;
    // Straight into a buffered stdout: a fleet report runs to megabytes.
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    serde_json::to_writer_pretty(&mut out, value)
        .map_err(std::io::Error::from)
        .and_then(|()| writeln!(out))
        .and_then(|()| out.flush())
        .map_err(|e| Failure::Usage(format!("cannot write to stdout: {e}")))?;
    Ok(code::SUCCESS)
}

fn validate(runbooks: &[String], output: crate::cli::ValidateOutput) -> Result<u8, Failure> {
    use crate::cli::ValidateOutput;
    let mut invalid = 0;
    let handler = miette::GraphicalReportHandler::new();
    let mut reports: Vec<Value> = Vec::new();
    for runbook in runbooks {
        let loaded = match load(runbook) {
            Ok(loaded) => loaded,
            Err(failure) => {
                invalid += 1;
                if output == ValidateOutput::Text {
                    eprintln!("error: {failure}");
                }
                reports.push(serde_json::json!({"runbook": runbook, "valid": false, "problems": [
                    {"file": runbook, "line": 1, "column": 1, "code": "kmsflow::load", "message": failure.to_string(), "label": null, "help": null}
                ]}));
                continue;
            }
        };
        match kmsflow_engine::compile_with(&loaded.source, &registry(), &bundled::Fragments) {
            Ok(compiled) => {
                if output == ValidateOutput::Text {
                    outln!(
                        "{}: valid ({} steps)",
                        loaded.source.name,
                        compiled.steps.len()
                    );
                }
                reports.push(serde_json::json!({"runbook": loaded.source.name, "valid": true, "steps": compiled.steps.len(), "problems": []}));
            }
            Err(diagnostics) => {
                invalid += 1;
                if output == ValidateOutput::Text {
                    eprint!("{}", diagnostics.render(&handler));
                    eprintln!("error: {diagnostics}");
                }
                reports.push(serde_json::json!({"runbook": loaded.source.name, "valid": false, "problems": diagnostics.to_json()}));
            }
        }
    }
    match output {
        ValidateOutput::Text => {}
        ValidateOutput::Json => {
            print_json(&serde_json::json!(reports))?;
        }
        ValidateOutput::Sarif => {
            print_json(&render::sarif(&reports))?;
        }
    }
    Ok(if invalid == 0 {
        code::SUCCESS
    } else {
        code::USAGE
    })
}

fn graph(runbook: &str, format: GraphFormat) -> Result<u8, Failure> {
    let compiled = compile_loaded(&load(runbook)?)?;
    match format {
        GraphFormat::Dot => out!("{}", kmsflow_engine::export::to_dot(&compiled)),
        GraphFormat::Mermaid => out!("{}", kmsflow_engine::export::to_mermaid(&compiled)),
        GraphFormat::Json => return print_json(&kmsflow_engine::export::to_json(&compiled)),
    }
    Ok(code::SUCCESS)
}

fn list_runbooks() -> Result<u8, Failure> {
    let width = bundled::BUNDLED
        .iter()
        .map(|b| b.name.len())
        .max()
        .unwrap_or(0);
    for b in bundled::BUNDLED {
        let description = kmsflow_engine::compile_with(
            &RunbookSource::new(format!("bundled:{}", b.name), b.text),
            &registry(),
            &bundled::Fragments,
        )
        .ok()
        .and_then(|c| c.description)
        .unwrap_or_default();
        let first_sentence = description
            .split(". ")
            .next()
            .unwrap_or("")
            .trim_end_matches('.');
        outln!("{:<width$}  {first_sentence}", b.name);
    }
    Ok(code::SUCCESS)
}

/// The step-kind reference, generated from the kinds' declared parameters and outputs.
pub fn docs() -> String {
    use kmsflow_engine::kind::OutputsSpec;
    let mut out = String::from(
        "# Step kinds\n\nGenerated by `kmsflow docs` from the step kinds' declared parameters and outputs.\n",
    );
    out.push_str(
        "\n## `runbook`\n\nIncludes a runbook fragment: its steps join the same DAG as `<step>--<inner step>`, \
         each checkpointed on its own; its `outputs` become this step's outputs.\n\n\
         | parameter | type | required | description |\n|---|---|---|---|\n\
         | `path` | string | yes | the fragment's file, relative to the including runbook |\n\
         | `params` | map | no | the fragment's parameters (templates are rendered in the caller's context) |\n\n\
         Outputs: the fragment's `outputs`.\n",
    );
    for spec in registry().specs() {
        out.push_str(&format!("\n## `{}`\n\n{}\n", spec.name, spec.summary));
        if spec.may_be_irreversible {
            out.push_str("\nSome of its changes cannot be undone: `plan` and `run` say so before they happen.\n");
        }
        if !spec.params.is_empty() {
            out.push_str("\n| parameter | type | required | description |\n|---|---|---|---|\n");
            for p in spec.params {
                let mut description = p.description.to_owned();
                if !p.one_of.is_empty() {
                    description.push_str(&format!(
                        " (one of: {})",
                        p.one_of
                            .iter()
                            .map(|v| format!("`{v}`"))
                            .collect::<Vec<_>>()
                            .join(", ")
                    ));
                }
                if let Some(pattern) = p.pattern {
                    description.push_str(&format!(" (pattern: `{pattern}`)"));
                }
                out.push_str(&format!(
                    "| `{}` | {} | {} | {} |\n",
                    p.name,
                    serde_json::to_value(p.ty)
                        .expect("serializes")
                        .as_str()
                        .unwrap_or("any"),
                    if p.required { "yes" } else { "no" },
                    description
                ));
            }
        }
        match spec.outputs {
            OutputsSpec::Fixed([]) => out.push_str("\nOutputs: none.\n"),
            OutputsSpec::Fixed(outputs) => {
                out.push_str("\n| output | description |\n|---|---|\n");
                for o in outputs {
                    out.push_str(&format!("| `{}` | {} |\n", o.name, o.description));
                }
            }
            OutputsSpec::KeysOf(param) => {
                out.push_str(&format!("\nOutputs: the keys of `{param}`.\n"));
            }
        }
    }
    out
}

async fn plan(
    context: &Context,
    runbook: &str,
    args: &ParamArgs,
    detailed_exitcode: bool,
    output: Output,
) -> Result<u8, Failure> {
    let compiled = compile_loaded(&load(runbook)?)?;
    let bound = bind(&compiled, &param_sources(context, args)?)?;
    let registry = crate::registry_with(context.azure.clone());
    let previews = kmsflow_engine::preview::preview(&compiled, &bound, &registry).await;
    match output {
        Output::Json => {
            print_json(&serde_json::to_value(&previews).expect("previews serialize"))?;
        }
        Output::Text => {
            outln!("plan for `{}`:", compiled.name);
            out!("{}", render::plan_text(&previews));
        }
    }
    let failing: Vec<_> = previews
        .iter()
        .filter_map(|p| match &p.action {
            kmsflow_engine::preview::PreviewAction::WouldFail { error } => {
                Some((&p.step_id, error))
            }
            _ => None,
        })
        .collect();
    if !detailed_exitcode {
        return Ok(code::SUCCESS);
    }
    // As `terraform plan -detailed-exitcode` tells CI apart: nothing to do, a plan that
    // cannot be applied, or changes.
    if !failing.is_empty() {
        let listed: String = failing
            .iter()
            .map(|(step, error)| format!("\n  {step}: {error}"))
            .collect();
        crate::output::note!(
            "{} step{} would fail:{listed}",
            failing.len(),
            if failing.len() == 1 { "" } else { "s" }
        );
        return Ok(code::USAGE);
    }
    let changes = previews.iter().any(|p| p.action.is_change());
    Ok(if changes {
        code::CHANGES
    } else {
        code::SUCCESS
    })
}

fn request(
    context: &Context,
    runbook: Arc<CompiledRunbook>,
    loaded_reference: String,
    source: String,
    params: BoundParams,
    concurrency: u16,
) -> RunRequest {
    let width = runbook.steps.iter().map(|s| s.id.len()).max().unwrap_or(4);
    RunRequest {
        runbook,
        runbook_ref: loaded_reference,
        source,
        params,
        options: ExecOptions {
            concurrency: concurrency as usize,
            ..ExecOptions::default()
        },
        signals: crate::signals::install(),
        progress: crate::progress_view::sink(
            width,
            crate::progress_view::Mode::detect(context.json_logs),
        ),
    }
}

/// Prints the run's outcome as asked and turns its status into the exit code.
fn finish(context: &Context, summary: RunSummary, output: Output) -> Result<u8, Failure> {
    if output == Output::Json {
        let store = context.store()?;
        let run = store.run(&summary.run_id)?;
        let steps = store.steps(&summary.run_id)?;
        print_json(&render::run_json(&run, &steps))?;
    } else if let Some(outputs) = summary.outputs.as_ref().and_then(Value::as_object) {
        for (name, value) in outputs {
            outln!("{name} = {value}");
        }
    }
    match status_code(summary.status) {
        code::SUCCESS => Ok(code::SUCCESS),
        _ => {
            if output == Output::Text {
                let hint = match summary.status {
                    RunStatus::Waiting => format!(
                        "approve with `kmsflow approve {} STEP`, then `kmsflow resume {}`",
                        summary.run_id, summary.run_id
                    ),
                    RunStatus::Failed | RunStatus::Interrupted => format!(
                        "resume with `kmsflow resume {0}`, or undo with `kmsflow rollback {0}`",
                        summary.run_id
                    ),
                    _ => format!("details: `kmsflow show {}`", summary.run_id),
                };
                crate::output::note!("{hint}");
            }
            Err(Failure::RunEnded {
                run_id: summary.run_id,
                status: summary.status,
            })
        }
    }
}

async fn run(
    context: &Context,
    runbook: &str,
    args: &ParamArgs,
    concurrency: u16,
    yes: bool,
    output: Output,
) -> Result<u8, Failure> {
    let loaded = load(runbook)?;
    let compiled = compile_loaded(&loaded)?;
    let bound = bind(&compiled, &param_sources(context, args)?)?;
    let engine = context.engine()?;
    let no_return = confirm_run(&compiled, &bound, &engine, yes, true).await?;
    // The bundled check's findings exit as `kmsflow check`'s do, so a schedule or CI job
    // running it pages on the same codes.
    let judges = loaded.reference == "bundled:rotation-check";
    let mut request = request(
        context,
        compiled,
        loaded.reference,
        loaded.source.text.to_string(),
        bound,
        concurrency,
    );
    request.options.no_return = no_return;
    let summary = launch::start(&engine, request).await?;
    let worst = summary
        .outputs
        .as_ref()
        .and_then(|o| o["worst"].as_str())
        .map(str::to_owned);
    let code = finish(context, summary, output)?;
    Ok(match worst {
        Some(worst) if judges && code == code::SUCCESS => crate::check::severity_code(&worst),
        _ => code,
    })
}

/// Asks before a run that may pass a point of no return no `approve` step guards (refused
/// without a terminal unless `yes`); what the run's steps do with one found only at apply.
///
/// With `at_apply` (the run goes in this process), a point the plan can only call "may be"
/// (known after apply) does not refuse a run without a terminal: the step's own plan, made
/// just before it applies, knows, and refuses it then if it is one ([`NoReturn::Refuse`]). A
/// new cluster created with CMK is thus no question at all. A queued run is decided here,
/// whole: its worker has nobody to ask.
pub(crate) async fn confirm_run(
    compiled: &CompiledRunbook,
    bound: &BoundParams,
    engine: &Engine,
    yes: bool,
    at_apply: bool,
) -> Result<NoReturn, Failure> {
    let ungated = |s: &kmsflow_engine::runbook::CompiledStep| {
        s.may_be_irreversible && !compiled.approval_before(&s.id)
    };
    if yes || !compiled.steps.iter().any(ungated) {
        return Ok(NoReturn::Proceed);
    }
    // Only the plan knows whether this run would pass the point (a cluster already
    // encrypted will not), so a rerun is not asked about what it will not do.
    let previews = kmsflow_engine::preview::preview(compiled, bound, &engine.registry).await;
    let points = crate::confirm::points_of_no_return(compiled, &previews);
    if !at_apply || crate::confirm::can_ask() {
        crate::confirm::confirm("run passes a point of no return", &points, false)?;
        return Ok(NoReturn::Proceed);
    }
    let sure = |point: &crate::confirm::Consequence| {
        previews
            .iter()
            .any(|p| p.step_id == point.step_id && p.irreversible.is_some())
    };
    let (sure, maybe): (Vec<_>, Vec<_>) = points.into_iter().partition(sure);
    crate::confirm::confirm("run passes a point of no return", &sure, false)?;
    for point in &maybe {
        crate::output::note!(
            "`{}` {}: with no terminal to ask, its plan is made again just before it applies, \
             and it is refused then if it is one (pass `--yes` to go ahead)",
            point.step_id,
            point.what
        );
    }
    Ok(NoReturn::Refuse)
}

/// What the user allowed `resume` to change on purpose.
#[derive(Debug, Clone, Copy)]
struct Allow {
    changed_runbook: bool,
    param_change: bool,
}

/// The runbook as it is now, when the user allowed it (`--allow-changed-runbook`, changed or
/// not: a run an older kmsflow recorded kept no fragments, and this is how it resumes); a
/// refusal if it changed and they did not; `None` (the stored runbook, fragments included)
/// otherwise, or when its file is gone.
fn changed_runbook(
    run: &kmsflow_state::RunRecord,
    allow_changed: bool,
) -> Result<Option<(Arc<CompiledRunbook>, String)>, Failure> {
    let current = match run.runbook_ref.strip_prefix("bundled:") {
        Some(name) => bundled::find(name).map(|b| b.text.to_owned()),
        None => std::fs::read_to_string(&run.runbook_ref).ok(),
    };
    let Some(current) = current else {
        crate::output::note!(
            "`{}` is gone; resuming with the runbook stored with the run",
            run.runbook_ref
        );
        return Ok(None);
    };
    let compiled = compile_source(&RunbookSource::new(&run.runbook_ref, current.clone()))?;
    if compiled.content_hash == run.content_hash && !allow_changed {
        return Ok(None);
    }
    if !allow_changed {
        return Err(Failure::Usage(format!(
            "the runbook `{}` (or a fragment it uses) changed since run `{}` started (sha256 {} then, {} now); \
             resume with `--allow-changed-runbook` to run it as it is now, or restore the file",
            run.runbook_ref,
            run.id,
            &run.content_hash[..12],
            &compiled.content_hash[..12]
        )));
    }
    Ok(Some((compiled, current)))
}

/// The progress sink for a stored run: aligned on its step ids.
fn progress_for(context: &Context, steps: &[kmsflow_state::StepRecord]) -> ProgressSink {
    let width = steps.iter().map(|s| s.step_id.len()).max().unwrap_or(4);
    crate::progress_view::sink(width, crate::progress_view::Mode::detect(context.json_logs))
}

/// What `resume` was asked beyond parameters and permissions.
struct Resumed {
    from: Option<String>,
    operator: kmsflow_engine::launch::Operator,
    concurrency: u16,
}

async fn resume(
    context: &Context,
    run_id: &str,
    args: &ParamArgs,
    allow: Allow,
    asked: Resumed,
    output: Output,
) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let (run, steps, _) = launch::load_run(&engine, run_id)?;
    let continuation = Continuation {
        run_id: run.id.clone(),
        params: param_sources(context, args)?,
        allow_param_change: allow.param_change,
        changed_runbook: changed_runbook(&run, allow.changed_runbook)?,
        options: ExecOptions {
            concurrency: asked.concurrency as usize,
            ..ExecOptions::default()
        },
        signals: crate::signals::install(),
        progress: progress_for(context, &steps),
        from: asked.from,
        operator: asked.operator,
    };
    let summary = launch::resume(&engine, continuation).await?;
    finish(context, summary, output)
}

/// What `rollback RUN` was asked beyond parameters.
struct UndoRun {
    allow_param_change: bool,
    yes: bool,
    operator: kmsflow_engine::launch::Operator,
}

async fn rollback(
    context: &Context,
    run_id: &str,
    args: &ParamArgs,
    asked: UndoRun,
    output: Output,
) -> Result<u8, Failure> {
    let UndoRun {
        allow_param_change,
        yes,
        operator,
    } = asked;
    let engine = context.engine()?;
    let (run, steps, _) = launch::load_run(&engine, run_id)?;
    let deletes: Vec<crate::confirm::Consequence> = kmsflow_engine::rollback::undo_plan(&steps)
        .into_iter()
        .filter(|(_, outcome)| *outcome == kmsflow_state::Outcome::Created)
        .map(|(record, _)| crate::confirm::Consequence {
            step_id: record.step_id.clone(),
            what: format!("delete what it created ({})", record.uses),
        })
        .collect();
    crate::confirm::confirm(
        &format!("rollback of run {} deletes", run.id),
        &deletes,
        yes,
    )?;
    crate::output::note!("rolling back run {} of `{}`", run.id, run.runbook);
    // The engine undoes what the run recorded, with the runbook (fragments included) and
    // parameters it stored; nothing here is re-read from files or the shell unless allowed.
    let request = RollbackRequest {
        run_id: run.id.clone(),
        params: param_sources(context, args)?,
        allow_param_change,
        progress: progress_for(context, &steps),
        operator,
    };
    let summary = launch::rollback(&engine, request).await?;
    finish(context, summary, output)
}

/// `resume RUN --from STEP --dry-run`: which steps would run again, and which are reused.
fn rerun_dry_run(
    context: &Context,
    run_id: &str,
    from: &str,
    output: Output,
) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let (run, steps, _) = launch::load_run(&engine, run_id)?;
    // The runbook as the run stored it, fragments included: what `resume` runs.
    let fragments = kmsflow_engine::runbook::StoredFragments::new(
        serde_json::from_value(run.fragments.clone()).unwrap_or_default(),
    );
    let runbook = kmsflow_engine::compile_with(
        &RunbookSource::new(&run.runbook_ref, run.source.clone()),
        &registry(),
        &fragments,
    )
    .map_err(Failure::Invalid)?;
    let again = runbook
        .downstream_of(from)
        .ok_or_else(|| Failure::Usage(format!("run {} has no step `{from}`", run.id)))?;
    let reused: Vec<&str> = steps
        .iter()
        .filter(|s| s.status == kmsflow_state::StepStatus::Succeeded && !again.contains(&s.step_id))
        .map(|s| s.step_id.as_str())
        .collect();
    match output {
        Output::Json => {
            print_json(
                &serde_json::json!({"run_id": run.id, "from": from, "run_again": again, "reused": reused}),
            )?;
        }
        Output::Text => {
            outln!("resume {} --from {from} would run again, in order:", run.id);
            for step in &again {
                outln!("  {step}");
            }
            if !reused.is_empty() {
                outln!("and reuse the outputs of: {}", reused.join(", "));
            }
        }
    }
    Ok(code::SUCCESS)
}

/// `rollback --dry-run`: from the run's records alone (nothing is read from Azure or written),
/// what a rollback would undo, newest first.
fn rollback_dry_run(context: &Context, run_id: &str, output: Output) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let (run, steps, _) = launch::load_run(&engine, run_id)?;
    let plan = kmsflow_engine::rollback::undo_plan(&steps);
    let what = |outcome: kmsflow_state::Outcome| match outcome {
        kmsflow_state::Outcome::Created => "delete what it created",
        kmsflow_state::Outcome::Updated => "put back what it changed",
        _ => "undo its action, where the step kind can",
    };
    match output {
        Output::Json => {
            let entries: Vec<Value> = plan
                .iter()
                .map(|(record, outcome)| {
                    serde_json::json!({"step_id": record.step_id, "uses": record.uses, "outcome": outcome.to_string(), "undo": what(*outcome), "before": record.before_image})
                })
                .collect();
            print_json(&serde_json::json!({"run_id": run.id, "would_undo": entries}))?;
        }
        Output::Text if plan.is_empty() => {
            outln!("rollback of {}: nothing to undo", run.id);
        }
        Output::Text => {
            outln!("rollback of {} would, newest first:", run.id);
            let mut rows = Vec::new();
            for (record, outcome) in &plan {
                rows.push(vec![
                    format!("  {}", record.step_id),
                    record.uses.clone(),
                    what(*outcome).to_owned(),
                ]);
            }
            out!("{}", render::aligned(&rows));
            outln!(
                "(a change that cannot be undone, such as enabling KMS infrastructure encryption, is kept and reported)"
            );
        }
    }
    Ok(code::SUCCESS)
}

fn approve(
    context: &Context,
    run_id: &str,
    step_id: &str,
    by: Option<String>,
) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let approved_by = operator(by);
    let run_id = launch::approve(&engine, run_id, step_id, &approved_by)?;
    outln!(
        "approved `{step_id}` of run {run_id} as {approved_by}; continue with `kmsflow resume {run_id}`"
    );
    Ok(code::SUCCESS)
}

fn reject(
    context: &Context,
    run_id: &str,
    step_id: &str,
    reason: &str,
    by: Option<String>,
) -> Result<u8, Failure> {
    if reason.trim().is_empty() {
        return Err(Failure::Usage(
            "--reason is recorded for whoever reads the run later: say why".into(),
        ));
    }
    let engine = context.engine()?;
    let rejected_by = operator(by);
    let run_id = launch::reject(&engine, run_id, step_id, &rejected_by, reason)?;
    outln!(
        "rejected `{step_id}` of run {run_id} as {rejected_by}; the run failed there: undo what it did with `kmsflow rollback {run_id}`"
    );
    Ok(code::SUCCESS)
}

/// `kmsflow cancel`: journals the request, which the driving process acts on within a
/// quarter second, and waits for the run to stop. A run nobody drives any more (its process
/// was killed) is marked interrupted here.
async fn cancel(
    context: &Context,
    id: &str,
    reason: Option<String>,
    by: Option<String>,
    wait: std::time::Duration,
) -> Result<u8, Failure> {
    use kmsflow_state::Write;
    let mut store = context.store()?;
    let rollout = crate::rollouts::is_rollout(id);
    let (id, status, key) = if rollout {
        let id = store.resolve_rollout_id(id)?;
        let status = store.rollout(&id)?.status;
        let key = kmsflow_engine::rollout::lock_key_of(&id);
        (id, status, key)
    } else {
        let id = store.resolve_run_id(id)?;
        let run = store.run(&id)?;
        let key = run
            .lock_key
            .unwrap_or_else(|| kmsflow_engine::lease::claim_on_run(&id));
        (id, run.status, key)
    };
    let what = if rollout { "rollout" } else { "run" };
    match status {
        RunStatus::Running => {}
        RunStatus::Waiting => {
            return Err(Failure::Usage(format!(
                "{what} {id} is waiting, and nothing of it is running: refuse what it waits for with `kmsflow reject`, or leave it"
            )));
        }
        other => {
            return Err(Failure::Usage(format!(
                "{what} {id} is {other}: only a running {what} can be cancelled"
            )));
        }
    }
    let cancelled_by = operator(by);
    let now = chrono::Utc::now();
    let request = Write::Event {
        run_id: id.clone(),
        step_id: None,
        kind: kmsflow_engine::cancel::CANCEL_REQUESTED.to_owned(),
        detail: serde_json::json!({"by": cancelled_by, "reason": reason}),
        at: now,
    };
    if !store.driven_now(&key, &id)? {
        // Its process is gone (kill -9, a lost machine whose lease ran out): nothing will
        // act on the request, so it is carried out here, as the drain would have ended it.
        let error = Some(format!("cancelled by {cancelled_by}; its process was gone"));
        let finished = if rollout {
            Write::RolloutStatus {
                rollout_id: id.clone(),
                status: RunStatus::Interrupted,
                error,
                at: now,
            }
        } else {
            Write::RunFinished {
                run_id: id.clone(),
                status: RunStatus::Interrupted,
                error,
                outputs: None,
                at: now,
            }
        };
        store.commit(&[
            request,
            finished,
            Write::ReleaseLock {
                key,
                run_id: id.clone(),
            },
        ])?;
        outln!(
            "{what} {id} was not being driven (its process is gone): marked interrupted; continue with `kmsflow resume {id}`"
        );
        return Ok(code::SUCCESS);
    }
    store.commit(&[request])?;
    crate::output::note!(
        "asked the process driving {what} {id} to stop; running steps finish and checkpoint first"
    );
    let deadline = tokio::time::Instant::now() + wait;
    loop {
        let status = if rollout {
            store.rollout(&id)?.status
        } else {
            store.run(&id)?.status
        };
        if status != RunStatus::Running {
            outln!("{what} {id} {status}; continue with `kmsflow resume {id}`");
            return Ok(code::SUCCESS);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(Failure::Usage(format!(
                "{what} {id} is still running after {}: its running steps have not finished; the request stands, and `kmsflow show {id}` says when it stops",
                kmsflow_engine::duration::format_duration(wait)
            )));
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
}

/// Who asks (see [`operator`]) and why, for the journal.
pub(crate) fn operator_of(
    by: Option<String>,
    reason: Option<String>,
) -> kmsflow_engine::launch::Operator {
    kmsflow_engine::launch::Operator {
        by: operator(by),
        reason,
    }
}

/// Who typed the command, recorded beside the name given: `--by` is a claim, the OS user a
/// fact.
pub(crate) fn operator(by: Option<String>) -> String {
    let user = std::env::var("USER").unwrap_or_else(|_| "unknown".into());
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "localhost".into());
    let os_user = format!("{user}@{host}");
    match by {
        Some(name) => format!("{name} (as {os_user})"),
        None => os_user,
    }
}

fn runs(context: &Context, limit: usize, output: Output) -> Result<u8, Failure> {
    // No state file yet: nothing has run, and looking makes none.
    let (rollouts, runs, queued) = match context.read_store_if_any()? {
        Some(store) => (
            store.rollouts(limit)?,
            store.runs_outside_rollouts(limit)?,
            store.queued_not_started(limit)?,
        ),
        None => (Vec::new(), Vec::new(), Vec::new()),
    };
    match output {
        Output::Json => print_json(&Value::Array(
            queued
                .iter()
                .map(|q| {
                    serde_json::json!({
                        "kind": "queued", "id": q.id, "runbook": q.runbook, "status": q.status,
                        "queue": q.queue, "claimed_by": q.claimed_by, "enqueued_at": q.enqueued_at,
                    })
                })
                .chain(rollouts.iter().map(|r| {
                    serde_json::json!({
                        "kind": "rollout", "id": r.id, "runbook": r.runbook, "status": r.status,
                        "targets": r.targets, "started_at": r.started_at,
                        "finished_at": r.finished_at, "error": r.error,
                    })
                }))
                .chain(runs.iter().map(|r| {
                    serde_json::json!({
                        "kind": "run", "id": r.id, "runbook": r.runbook, "status": r.status,
                        "started_at": r.started_at, "finished_at": r.finished_at, "error": r.error,
                    })
                }))
                .collect(),
        )),
        Output::Text => {
            if !queued.is_empty() {
                out!("{}\n", render::queued_text(&queued));
            }
            if !rollouts.is_empty() {
                out!("{}", crate::rollouts::rollouts_text(&rollouts));
                if runs.is_empty() {
                    return Ok(code::SUCCESS);
                }
                out!("\n");
            }
            out!("{}", render::runs_text(&runs));
            Ok(code::SUCCESS)
        }
    }
}

fn show(context: &Context, run_id: &str, output: Output) -> Result<u8, Failure> {
    let store = context.read_store()?;
    // Queued and not started yet: there is no run to show, only where it waits.
    if let Some(queued) = store
        .queued(run_id)?
        .filter(|q| q.status != kmsflow_state::QueueStatus::Done)
        && store.resolve_run_id(run_id).is_err()
    {
        match output {
            Output::Json => {
                print_json(&serde_json::to_value(&queued).expect("serializes"))?;
            }
            Output::Text if queued.status == kmsflow_state::QueueStatus::Poisoned => outln!(
                "run {} of {} is quarantined on `{}`: {}",
                queued.id,
                queued.runbook_ref,
                queued.queue,
                store.quarantine_reason(&queued.id)?
            ),
            Output::Text => outln!(
                "run {} of {} is queued on `{}`: {}",
                queued.id,
                queued.runbook_ref,
                queued.queue,
                match &queued.claimed_by {
                    Some(worker) => format!("worker {worker} is starting it"),
                    None => "waiting for a worker (`kmsflow worker --queue NAME`)".to_owned(),
                }
            ),
        }
        return Ok(code::SUCCESS);
    }
    let run_id = store.resolve_run_id(run_id)?;
    let run = store.run(&run_id)?;
    let steps = store.steps(&run_id)?;
    match output {
        Output::Json => print_json(&render::run_json(&run, &steps)),
        Output::Text => {
            out!("{}", render::run_text(&run, &steps));
            // A run whose workers kept dying with it: its record still says how far it got,
            // and this says why no worker goes on with it.
            if let Some(queued) = store
                .queued(&run_id)?
                .filter(|q| q.status == kmsflow_state::QueueStatus::Poisoned)
            {
                outln!(
                    "\nquarantined in queue `{}`: {}",
                    queued.queue,
                    store.quarantine_reason(&run_id)?
                );
            }
            if run.status == RunStatus::Waiting {
                let approved = store.approvals(&run_id)?;
                out!(
                    "{}",
                    render::waiting_text(&run_id, &store.events(&run_id)?, &approved)
                );
            }
            Ok(code::SUCCESS)
        }
    }
}

fn events(context: &Context, run_id: &str, output: Output) -> Result<u8, Failure> {
    let store = context.read_store()?;
    let run_id = store.resolve_run_id(run_id)?;
    let events = store.events(&run_id)?;
    match output {
        Output::Json => print_json(&serde_json::to_value(&events).expect("events serialize")),
        Output::Text => {
            out!("{}", render::events_text(&events));
            Ok(code::SUCCESS)
        }
    }
}

fn read_file(path: &std::path::Path, what: &str) -> Result<String, Failure> {
    std::fs::read_to_string(path).map_err(|e| {
        Failure::Usage(format!(
            "cannot read the {what} file `{}`: {e}",
            path.display()
        ))
    })
}

/// `kmsflow sandbox serve`: the base URL on the first line of stdout, then the environment a
/// client needs, one `NAME=value` per line; serves until Ctrl-C or SIGTERM. With `tls`
/// (`Some(folder)`, `None` for a fresh one) it speaks https and writes its authority and a
/// cloud profile there.
async fn sandbox_serve(
    port: u16,
    faults: Option<&std::path::Path>,
    world: Option<&std::path::Path>,
    tls: Option<Option<PathBuf>>,
) -> Result<u8, Failure> {
    use kmsflow_sandbox::{Faults, Sandbox, SandboxOptions, WorldSeed};
    use std::io::Write as _;
    let faults = match faults {
        Some(path) => Faults::from_yaml(&read_file(path, "faults")?).map_err(|e| {
            Failure::Usage(format!("invalid faults file `{}`: {e}", path.display()))
        })?,
        None => Faults::default(),
    };
    // `--world NAME` with a bundled runbook's name seeds what `--sandbox` would for it.
    let runbook_world = world
        .filter(|path| !path.exists())
        .and_then(|path| path.to_str())
        .and_then(bundled::find)
        .map(|b| b.name);
    let world = world.filter(|_| runbook_world.is_none());
    let seed = match world {
        Some(path) => Some(
            WorldSeed::from_yaml(&read_file(path, "world")?).map_err(|e| {
                Failure::Usage(format!("invalid world file `{}`: {e}", path.display()))
            })?,
        ),
        None => None,
    };
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port))
        .await
        .map_err(|e| Failure::Usage(format!("cannot listen on 127.0.0.1:{port}: {e}")))?;
    let address = listener
        .local_addr()
        .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
    let options = SandboxOptions {
        faults,
        tls: tls.is_some(),
        ..SandboxOptions::default()
    };
    let sandbox = Sandbox::serve(listener, options)
        .map_err(|e| Failure::Usage(format!("cannot start the sandbox: {e}")))?;
    let tls_files = match tls {
        Some(folder) => Some(write_tls_files(&sandbox, address, folder)?),
        None => None,
    };
    if let Some(seed) = &seed {
        sandbox.seed(seed);
    }
    if let Some(name) = runbook_world {
        crate::sandboxed::seed_for(&sandbox, name);
    }
    let mut stdout = std::io::stdout().lock();
    let _ = writeln!(stdout, "{}", sandbox.base_url());
    for (name, value) in sandbox.env() {
        let _ = writeln!(stdout, "{name}={value}");
    }
    let _ = writeln!(stdout, "KMSFLOW_ARM_ENDPOINT={}", sandbox.base_url());
    let _ = writeln!(stdout, "KMSFLOW_AUTH=managed-identity");
    if let Some((ca, profile)) = &tls_files {
        let _ = writeln!(stdout, "KMSFLOW_CLOUD={}", profile.display());
        // Python's requests and OpenSSL-based clients read these.
        let _ = writeln!(stdout, "REQUESTS_CA_BUNDLE={}", ca.display());
        let _ = writeln!(stdout, "SSL_CERT_FILE={}", ca.display());
    }
    let _ = stdout.flush();
    drop(stdout);
    if tls_files.is_some() {
        let addressing = sandbox.addressing();
        crate::output::note!(
            "Resource Manager on {}, each vault on https://{{vault}}{}:{}",
            addressing.arm_endpoint(),
            kmsflow_sandbox::VAULT_SUFFIX,
            address.port()
        );
        crate::output::note!(
            "kmsflow resolves these names itself (KMSFLOW_CLOUD); names under .localhost reach loopback where the resolver follows RFC 6761, otherwise add to /etc/hosts:"
        );
        for line in addressing.hosts_lines(&["{vault}"]) {
            eprintln!("  {line}");
        }
    }
    crate::signals::install().drain.cancelled().await;
    Ok(code::SUCCESS)
}

/// Writes the authority's certificate and a cloud profile for a TLS sandbox into `folder` (a
/// new private one under the temporary directory when `None`); returns their paths.
fn write_tls_files(
    sandbox: &kmsflow_sandbox::Sandbox,
    address: std::net::SocketAddr,
    folder: Option<PathBuf>,
) -> Result<(PathBuf, PathBuf), Failure> {
    let folder = folder.unwrap_or_else(|| {
        std::env::temp_dir().join(format!("kmsflow-sandbox-{}", address.port()))
    });
    kmsflow_state::create_private_folder(&folder.join("ca.pem"))
        .map_err(|e| Failure::Usage(format!("cannot create `{}`: {e}", folder.display())))?;
    let (ca, profile) = (folder.join("ca.pem"), folder.join("cloud.json"));
    crate::sandboxed::write_private(&ca, sandbox.ca_pem().unwrap_or_default())?;
    crate::sandboxed::write_private(
        &profile,
        &serde_json::to_string_pretty(&crate::sandboxed::client_profile(address, &ca))
            .expect("a profile serializes"),
    )?;
    Ok((ca, profile))
}

/// `kmsflow check`: one cluster from `-p`, or a fleet from `--targets`.
async fn check(
    context: &Context,
    args: &ParamArgs,
    fleet: Option<crate::rollouts::Fleet<'_>>,
    concurrency: u16,
    output: Output,
) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let (runbook, source) = crate::check::runbook()?;
    let shared = param_sources(context, args)?;
    let targets = match fleet {
        Some(crate::rollouts::Fleet::File(path)) => crate::check::read_targets(path)?,
        Some(crate::rollouts::Fleet::Discover(discover)) => {
            let spec = crate::discover::DiscoverSpec::of(discover);
            let rows = crate::discover::rows(context.azure_config(), &spec, &runbook).await?;
            crate::check::targets_of(rows, "the discovered clusters")?
        }
        None => vec![crate::check::Target { params: Map::new() }],
    };
    let results = crate::check::check_all(
        &engine,
        runbook,
        source,
        &shared,
        targets,
        concurrency as usize,
    )
    .await?;
    match output {
        Output::Json => {
            print_json(&crate::check::report(&results))?;
        }
        Output::Text => out!("{}", crate::check::table(&results)),
    }
    Ok(crate::check::exit_code(&results))
}

/// `kmsflow schedule ...`.
async fn schedule(context: &Context, command: crate::cli::ScheduleCommand) -> Result<u8, Failure> {
    use crate::cli::{Overlap, ScheduleCommand};
    let mut store = context.store()?;
    match command {
        ScheduleCommand::Add {
            name,
            runbook,
            params,
            cron,
            overlap,
            catchup,
            jitter,
            targets,
            discover,
            concurrency,
            rate,
            notify_webhook,
            queue,
        } => {
            kmsflow_engine::schedule::parse_cron(&cron).map_err(Failure::Usage)?;
            let fleet = targets.is_some() || discover.discover;
            let runbook = match runbook {
                Some(runbook) => runbook,
                None if fleet => "rotation-check".to_owned(),
                None => {
                    return Err(Failure::Usage(
                        "give `--runbook`, or `--targets`/`--discover` for a fleet check".into(),
                    ));
                }
            };
            // Found again in Azure at every fire, so a cluster added since is checked too.
            let discover = discover.discover.then(|| {
                serde_json::to_value(crate::discover::DiscoverSpec::of(&discover))
                    .expect("a discovery serializes")
            });
            let loaded = load(&runbook)?;
            let compiled = compile_loaded(&loaded)?;
            let stored =
                crate::daemon::stored_params(&compiled, &param_sources(context, &params)?)?;
            if let Some(url) = &notify_webhook {
                crate::daemon::check_webhook(url).map_err(Failure::Usage)?;
            }
            let rollout = fleet && loaded.reference != "bundled:rotation-check";
            if queue.is_some() && fleet && !rollout {
                return Err(Failure::Usage(
                    "`--queue` sends a schedule's runs to workers; a fleet check runs in the daemon itself: leave `--queue` out, or give `--runbook` for a rollout".into(),
                ));
            }
            let policy = if rollout {
                let policy = kmsflow_engine::rollout::Policy {
                    queue: queue.clone(),
                    ..crate::rollouts::policy_of(concurrency, &rate)
                };
                if let Some(path) = &targets {
                    // Every row binds now, so a typo is found when the schedule is made, not at
                    // three in the morning. (A discovery is found again at each fire.)
                    let rows = crate::targets::read_rows(path)?;
                    let shared = param_sources(context, &params)?;
                    let bound = kmsflow_engine::rollout::bind_targets(&compiled, &shared, &rows)
                        .map_err(|p| Failure::Usage(format!("`{}`: {p}", path.display())))?;
                    policy
                        .assign_waves(bound.len())
                        .map_err(|e| Failure::Usage(e.to_string()))?;
                }
                Some(serde_json::to_value(policy).expect("a policy serializes"))
            } else {
                let paced = concurrency.is_some()
                    || rate.max_errors.is_some()
                    || rate.waves.is_some()
                    || rate.wave_gate.is_some();
                if paced {
                    return Err(Failure::Usage(
                        "--concurrency, --max-errors, --waves and --wave-gate pace a rollout: give `--runbook` and `--targets` or `--discover`".into(),
                    ));
                }
                None
            };
            let targets = match targets {
                Some(path) => {
                    if !rollout {
                        crate::check::read_targets(&path)?;
                    }
                    Some(
                        std::fs::canonicalize(&path)
                            .unwrap_or(path)
                            .display()
                            .to_string(),
                    )
                }
                None => None,
            };
            let now = chrono::Utc::now();
            let record = kmsflow_state::ScheduleRecord {
                name: name.clone(),
                runbook: loaded.reference,
                params: Value::Object(stored),
                targets,
                cron,
                overlap: match overlap {
                    Overlap::Skip => kmsflow_state::Overlap::Skip,
                    Overlap::BufferOne => kmsflow_state::Overlap::BufferOne,
                    Overlap::Allow => kmsflow_state::Overlap::Allow,
                },
                catchup_ms: catchup.as_millis() as i64,
                jitter_ms: jitter.as_millis() as i64,
                webhook: notify_webhook,
                paused: false,
                created_at: now,
                last_seen_at: now,
                last_worst: None,
                policy,
                discover,
                queue,
            };
            if !store.add_schedule(&record)? {
                return Err(Failure::Usage(format!(
                    "a schedule `{name}` exists already; remove it first"
                )));
            }
            outln!("added schedule `{name}`; `kmsflow daemon` fires it");
            Ok(code::SUCCESS)
        }
        ScheduleCommand::List { output } => {
            let schedules = store.schedules()?;
            match output {
                Output::Json => {
                    print_json(&serde_json::to_value(&schedules).expect("schedules serialize"))
                }
                Output::Text => {
                    let mut rows = vec![
                        [
                            "schedule",
                            "cron",
                            "runbook or targets",
                            "parameters",
                            "overlap",
                            "state",
                            "webhook",
                            "last",
                        ]
                        .map(str::to_owned)
                        .to_vec(),
                    ];
                    for s in schedules {
                        let params = s
                            .params
                            .as_object()
                            .map(|p| {
                                p.iter()
                                    .map(|(k, v)| {
                                        format!(
                                            "{k}={}",
                                            v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                                        )
                                    })
                                    .collect::<Vec<_>>()
                                    .join(" ")
                            })
                            .filter(|p| !p.is_empty())
                            .unwrap_or_else(|| "-".into());
                        rows.push(vec![
                            s.name.clone(),
                            s.cron.clone(),
                            match (&s.targets, &s.discover, &s.policy) {
                                (Some(t), _, Some(_)) => format!("{} over {t}", s.runbook),
                                (None, Some(_), Some(_)) => {
                                    format!("{} over discovered clusters", s.runbook)
                                }
                                (Some(t), _, None) => format!("fleet {t}"),
                                (None, Some(_), None) => "fleet of discovered clusters".into(),
                                (None, None, _) => s.runbook.clone(),
                            },
                            params,
                            s.overlap.to_string(),
                            if s.paused { "paused" } else { "active" }.to_owned(),
                            s.webhook
                                .as_deref()
                                .map_or_else(|| "-".into(), kmsflow_state::mask_url),
                            s.last_worst.clone().unwrap_or_else(|| "-".into()),
                        ]);
                    }
                    out!("{}", render::aligned(&rows));
                    Ok(code::SUCCESS)
                }
            }
        }
        ScheduleCommand::Remove { name } => found(store.remove_schedule(&name)?, &name, "removed"),
        ScheduleCommand::Pause { name } => {
            found(store.set_schedule_paused(&name, true)?, &name, "paused")
        }
        ScheduleCommand::Resume { name } => {
            found(store.set_schedule_paused(&name, false)?, &name, "resumed")
        }
        ScheduleCommand::History { name, output } => {
            let fires = store.fires(&name)?;
            match output {
                Output::Json => print_json(&serde_json::to_value(&fires).expect("fires serialize")),
                Output::Text => {
                    for f in fires {
                        let worst = f
                            .detail
                            .as_ref()
                            .and_then(|d| d["worst"].as_str())
                            .unwrap_or("");
                        outln!(
                            "{}  {:<8}  {:<22}  {worst}",
                            f.occurrence.format("%Y-%m-%d %H:%M:%S"),
                            f.outcome,
                            f.run_id.as_deref().unwrap_or("-")
                        );
                    }
                    Ok(code::SUCCESS)
                }
            }
        }
    }
}

fn found(existed: bool, name: &str, what: &str) -> Result<u8, Failure> {
    if existed {
        outln!("{what} schedule `{name}`");
        Ok(code::SUCCESS)
    } else {
        Err(Failure::Usage(format!(
            "no schedule `{name}`; `kmsflow schedule list` shows them"
        )))
    }
}

/// `kmsflow state migrate`: the file's history into the team's store.
fn migrate_state(
    context: &Context,
    from: &std::path::Path,
    to: &std::path::Path,
    output: Output,
) -> Result<u8, Failure> {
    if !from.is_file() {
        return Err(Failure::Usage(format!(
            "no state file `{}` to copy",
            from.display()
        )));
    }
    let source = Store::open_file(from, kmsflow_state::Durability::Full)?;
    let target = crate::state_file::state_location(Some(to))?;
    crate::state_file::sign_in_with_azure(&target, &context.azure)?;
    if target.file() == Some(from) {
        return Err(Failure::Usage(
            "--from and --to name the same state file".into(),
        ));
    }
    let mut store = Store::open(&target, kmsflow_state::Durability::Full)?;
    let copied = store.copy_from(&source)?;
    if output == Output::Json {
        let tables: serde_json::Map<String, Value> = copied
            .tables
            .iter()
            .map(|(table, rows)| ((*table).to_owned(), Value::from(*rows)))
            .collect();
        return print_json(
            &serde_json::json!({"from": from, "to": target.to_string(), "copied": tables}),
        );
    }
    for (table, rows) in &copied.tables {
        crate::output::note!("{table}: {rows} copied");
    }
    crate::output::note!(
        "copied `{}` into {target}; point KMSFLOW_STATE at it (the file is left as it was)",
        from.display()
    );
    Ok(code::SUCCESS)
}

/// `kmsflow daemon`.
async fn daemon(context: &Context, tick: std::time::Duration) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let signals = crate::signals::install();
    crate::output::note!("daemon firing schedules from {}", engine.state);
    let daemon = kmsflow_engine::schedule::Daemon {
        state: engine.state.clone(),
        durability: engine.durability,
        firer: Arc::new(crate::daemon::RunFirer::new(engine, context.azure_config())),
        tick,
        drain: signals.drain.clone(),
    };
    daemon.run().await.map_err(|e| Failure::Launch(e.into()))?;
    crate::output::note!("daemon stopped");
    Ok(code::SUCCESS)
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_checked_in_step_kind_reference_is_current() {
        let checked_in = include_str!("../docs/step-kinds.md");
        assert!(
            checked_in == super::docs(),
            "docs/step-kinds.md is stale: run `cargo run -- docs > docs/step-kinds.md`"
        );
    }
}
