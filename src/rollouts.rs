//! The commands of a rollout: `run --targets`, and `resume`, `rollback`, `approve`, `show`
//! and `events` given a rollout's id (`rollout-…`).

use std::path::Path;
use std::sync::Arc;

use kmsflow_engine::executor::ExecOptions;
use kmsflow_engine::launch::{Engine, Launcher};
use kmsflow_engine::rollout::{
    self, Drive, Policy, RollbackDrive, RolloutRequest, RolloutSummary, Share,
};
use kmsflow_state::{RolloutRecord, RolloutTargetRecord, RunStatus, Store};
use serde_json::{Map, Value, json};

use crate::cli::{Output, ParamArgs, RateArgs};
use crate::commands::{Context, compile_loaded, load, param_sources, print_json};
use crate::confirm::Consequence;
use crate::failure::{Failure, code, status_code};
use crate::output::{out, outln};
use crate::progress_view::Mode;
use crate::render;

/// Whether `id` names a rollout rather than a run.
pub fn is_rollout(id: &str) -> bool {
    id.starts_with(kmsflow_state::ROLLOUT_PREFIX)
}

/// Where a fleet comes from.
#[derive(Debug, Clone, Copy)]
pub enum Fleet<'a> {
    /// `--targets FILE`.
    File(&'a Path),
    /// `--discover`.
    Discover(&'a crate::cli::DiscoverArgs),
}

impl<'a> Fleet<'a> {
    /// The fleet a command names, if any.
    pub fn of(
        targets: Option<&'a Path>,
        discover: &'a crate::cli::DiscoverArgs,
    ) -> Option<Fleet<'a>> {
        match targets {
            Some(path) => Some(Fleet::File(path)),
            None if discover.discover => Some(Fleet::Discover(discover)),
            None => None,
        }
    }

    /// Its rows of parameters for `runbook`.
    async fn rows(
        self,
        context: &Context,
        runbook: &kmsflow_engine::CompiledRunbook,
    ) -> Result<Vec<kmsflow_engine::rollout::TargetRow>, Failure> {
        match self {
            Fleet::File(path) => crate::targets::read_rows(path),
            Fleet::Discover(args) => {
                let spec = crate::discover::DiscoverSpec::of(args);
                crate::discover::rows(context.azure_config(), &spec, runbook).await
            }
        }
    }

    /// Binds its rows, every problem at once.
    async fn bind(
        self,
        context: &Context,
        runbook: &kmsflow_engine::CompiledRunbook,
        shared: &kmsflow_engine::params::ParamSources,
    ) -> Result<Vec<kmsflow_engine::rollout::Target>, Failure> {
        let rows = self.rows(context, runbook).await?;
        rollout::bind_targets(runbook, shared, &rows).map_err(|problems| {
            Failure::Usage(match self {
                Fleet::File(path) => format!("`{}`: {problems}", path.display()),
                Fleet::Discover(_) => format!("the discovered clusters: {problems}"),
            })
        })
    }
}

/// Targets at once when `--concurrency` is not given: SSM Automation's default.
const DEFAULT_CONCURRENCY: Share = Share::Count(10);

/// The rate control the flags ask for, with the defaults: 10 at once, no failure allowed,
/// the ramp, no gate.
pub fn policy_of(concurrency: Option<Share>, rate: &RateArgs) -> Policy {
    Policy {
        concurrency: concurrency.unwrap_or(DEFAULT_CONCURRENCY),
        max_errors: rate.max_errors.unwrap_or(Share::Count(0)),
        waves: rate.waves.clone(),
        gate: rate.wave_gate.unwrap_or_default(),
        queue: None,
    }
}

/// What `run --targets` was given.
pub struct Rollout<'a> {
    pub runbook: &'a str,
    pub params: &'a ParamArgs,
    pub fleet: Fleet<'a>,
    pub concurrency: Option<Share>,
    pub rate: &'a RateArgs,
    pub yes: bool,
    pub output: Output,
    /// `--distribute`: the rollout is driven by a queue's workers, not here.
    pub distribute: Option<crate::distribute::Distribute>,
}

/// `kmsflow run RUNBOOK --targets FILE`: every row bound and checked before anything starts,
/// then one rollout.
pub async fn run(context: &Context, asked: Rollout<'_>) -> Result<u8, Failure> {
    let loaded = load(asked.runbook)?;
    let compiled = compile_loaded(&loaded)?;
    let shared = param_sources(context, asked.params)?;
    let targets = asked.fleet.bind(context, &compiled, &shared).await?;
    let policy = policy_of(asked.concurrency, asked.rate);
    policy
        .assign_waves(targets.len())
        .map_err(|e| Failure::Usage(e.to_string()))?;
    // Planning every target before asking would read the whole fleet twice; the question
    // names the steps that may pass a point of no return, and how many targets they touch.
    let points: Vec<Consequence> = compiled
        .steps
        .iter()
        .filter(|s| s.may_be_irreversible && !compiled.approval_before(&s.id))
        .map(|s| Consequence {
            step_id: s.id.clone(),
            what: format!(
                "may pass a point of no return on each of the {} targets",
                targets.len()
            ),
        })
        .collect();
    crate::confirm::confirm("rollout may pass a point of no return", &points, asked.yes)?;
    // The values every row shares, as given, for the record (never secrets).
    let secret = compiled.secret_params();
    let mut given: Map<String, Value> = shared
        .file
        .iter()
        .map(|(k, v)| (k.clone(), v.clone()))
        .collect();
    for (k, v) in &shared.cli {
        given.insert(k.clone(), Value::String(v.clone()));
    }
    given.retain(|k, _| !secret.contains(k));
    let width = targets.iter().map(|t| t.label.len()).max().unwrap_or(6);
    let request = RolloutRequest {
        runbook: compiled,
        runbook_ref: loaded.reference,
        source: loaded.source.text.to_string(),
        shared: Value::Object(given),
        targets,
        policy,
    };
    if let Some(distribute) = asked.distribute {
        return crate::distribute::submit(context, request, distribute, asked.output).await;
    }
    let engine = context.engine()?;
    let drive = drive(
        context,
        shared,
        width,
        crate::commands::operator(None).into(),
    );
    let summary = with_launcher(&engine, |launcher| async move {
        rollout::start(&launcher, request, drive).await
    })
    .await?;
    finish(context, summary, asked.output)
}

/// What `plan --targets` (or `run --targets --dry-run`) was given.
pub struct PlanFleet<'a> {
    pub runbook: &'a str,
    pub params: &'a ParamArgs,
    pub fleet: Fleet<'a>,
    pub concurrency: usize,
    pub detailed_exitcode: bool,
    pub output: Output,
}

/// Plans every target (reads only), `concurrency` at once, and prints a row per target: what
/// would change, what would fail, and the points of no return.
pub async fn plan(context: &Context, asked: PlanFleet<'_>) -> Result<u8, Failure> {
    use futures::StreamExt as _;
    use kmsflow_engine::preview::PreviewAction;
    let loaded = load(asked.runbook)?;
    let compiled = compile_loaded(&loaded)?;
    let shared = param_sources(context, asked.params)?;
    let targets = asked.fleet.bind(context, &compiled, &shared).await?;
    let registry = context.engine()?.registry;
    let plans: Vec<_> = futures::stream::iter(&targets)
        .map(|target| {
            let (compiled, registry) = (&compiled, &registry);
            async move {
                let previews =
                    kmsflow_engine::preview::preview(compiled, &target.params, registry).await;
                (target, previews)
            }
        })
        .buffered(asked.concurrency.max(1))
        .collect()
        .await;
    let (mut changing, mut failing) = (0, 0);
    let mut rows = vec![
        [
            "target",
            "would change",
            "would fail",
            "points of no return",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    let mut report = Vec::new();
    for (target, previews) in &plans {
        let changes: Vec<&str> = previews
            .iter()
            .filter(|p| p.action.is_change())
            .map(|p| p.step_id.as_str())
            .collect();
        let fails: Vec<String> = previews
            .iter()
            .filter_map(|p| match &p.action {
                PreviewAction::WouldFail { error } => Some(format!("{}: {error}", p.step_id)),
                _ => None,
            })
            .collect();
        let points: Vec<String> = crate::confirm::points_of_no_return(&compiled, previews)
            .into_iter()
            .map(|c| c.step_id)
            .collect();
        changing += usize::from(!changes.is_empty());
        failing += usize::from(!fails.is_empty());
        rows.push(vec![
            target.label.clone(),
            if changes.is_empty() {
                "-".into()
            } else {
                changes.join(", ")
            },
            fails.first().cloned().unwrap_or_else(|| "-".into()),
            if points.is_empty() {
                "-".into()
            } else {
                points.join(", ")
            },
        ]);
        report.push(
            json!({"target": target.label, "params": target.params.storable(), "steps": previews}),
        );
    }
    match asked.output {
        Output::Json => {
            print_json(&json!({"runbook": compiled.name, "targets": report}))?;
        }
        Output::Text => {
            outln!("plan for `{}` over {} targets:", compiled.name, plans.len());
            out!("{}", render::aligned(&rows));
            outln!(
                "\n{changing} of {} targets would change, {failing} would fail",
                plans.len()
            );
        }
    }
    if !asked.detailed_exitcode {
        return Ok(code::SUCCESS);
    }
    Ok(if failing > 0 {
        code::USAGE
    } else if changing > 0 {
        code::CHANGES
    } else {
        code::SUCCESS
    })
}

fn drive(
    context: &Context,
    params: kmsflow_engine::params::ParamSources,
    width: usize,
    operator: kmsflow_engine::launch::Operator,
) -> Drive {
    Drive {
        params,
        options: ExecOptions::default(),
        signals: crate::signals::install(),
        progress: crate::rollout_view::sink(Mode::detect(context.json_logs), width),
        operator,
    }
}

/// Opens the state file once for every child of the rollout (their checkpoints share
/// commits), runs `work`, and closes it once every checkpoint is down.
async fn with_launcher<F, Fut>(engine: &Engine, work: F) -> Result<RolloutSummary, Failure>
where
    F: FnOnce(Arc<Launcher>) -> Fut,
    Fut: std::future::Future<Output = Result<RolloutSummary, kmsflow_engine::launch::LaunchError>>,
{
    let launcher = Arc::new(Launcher::open(engine).await?);
    let result = work(launcher.clone()).await;
    if let Ok(launcher) = Arc::try_unwrap(launcher) {
        launcher.close().await;
    }
    Ok(result?)
}

fn label_width(targets: &[RolloutTargetRecord]) -> usize {
    targets.iter().map(|t| t.label.len()).max().unwrap_or(6)
}

/// `kmsflow resume ROLLOUT`.
pub async fn resume(
    context: &Context,
    id: &str,
    args: &ParamArgs,
    operator: kmsflow_engine::launch::Operator,
    output: Output,
) -> Result<u8, Failure> {
    let store = context.store()?;
    let id = store.resolve_rollout_id(id)?;
    let width = label_width(&store.rollout_targets(&id)?);
    drop(store);
    let engine = context.engine()?;
    let drive = drive(context, param_sources(context, args)?, width, operator);
    let summary = with_launcher(&engine, |launcher| async move {
        rollout::resume(&launcher, &id, drive).await
    })
    .await?;
    finish(context, summary, output)
}

/// `kmsflow rollback ROLLOUT`: asks before deleting what the rollout's runs created.
/// What `rollback ROLLOUT` was asked beyond parameters.
pub struct Undo {
    pub concurrency: Option<u16>,
    pub yes: bool,
    pub operator: kmsflow_engine::launch::Operator,
}

pub async fn rollback(
    context: &Context,
    id: &str,
    args: &ParamArgs,
    asked: Undo,
    output: Output,
) -> Result<u8, Failure> {
    let Undo {
        concurrency,
        yes,
        operator,
    } = asked;
    let store = context.store()?;
    let id = store.resolve_rollout_id(id)?;
    let record = store.rollout(&id)?;
    let children = rollout::undoable_children(&store, &id)?;
    let mut deletes = Vec::new();
    for child in &children {
        let steps = store.steps(child.run_id.as_deref().unwrap_or_default())?;
        for (step, outcome) in kmsflow_engine::rollback::undo_plan(&steps) {
            if outcome == kmsflow_state::Outcome::Created {
                deletes.push(Consequence {
                    step_id: format!("{} {}", child.label, step.step_id),
                    what: format!("delete what it created ({})", step.uses),
                });
            }
        }
    }
    let width = label_width(&store.rollout_targets(&id)?);
    drop(store);
    crate::confirm::confirm(&format!("rollback of rollout {id} deletes"), &deletes, yes)?;
    let policy: Policy = serde_json::from_value(record.policy.clone()).unwrap_or_default();
    let drive = RollbackDrive {
        params: param_sources(context, args)?,
        concurrency: concurrency
            .map(usize::from)
            .unwrap_or_else(|| policy.concurrency_for(record.targets)),
        progress: crate::rollout_view::sink(Mode::detect(context.json_logs), width),
        operator,
    };
    let engine = context.engine()?;
    let summary = with_launcher(&engine, |launcher| async move {
        rollout::rollback(&launcher, &id, drive).await
    })
    .await?;
    finish(context, summary, output)
}

/// `kmsflow rollback ROLLOUT --dry-run`: from the records alone, what each run would undo.
pub fn rollback_dry_run(context: &Context, id: &str, output: Output) -> Result<u8, Failure> {
    let store = context.read_store()?;
    let id = store.resolve_rollout_id(id)?;
    let mut plans = Vec::new();
    for child in rollout::undoable_children(&store, &id)? {
        let steps = store.steps(child.run_id.as_deref().unwrap_or_default())?;
        let undo: Vec<Value> = kmsflow_engine::rollback::undo_plan(&steps)
            .into_iter()
            .map(|(step, outcome)| json!({"step_id": step.step_id, "uses": step.uses, "outcome": outcome}))
            .collect();
        plans.push(json!({"target": child.label, "run_id": child.run_id, "would_undo": undo}));
    }
    match output {
        Output::Json => {
            print_json(&json!({"rollout_id": id, "targets": plans}))?;
        }
        Output::Text if plans.is_empty() => outln!("rollback of {id}: nothing to undo"),
        Output::Text => {
            outln!("rollback of {id} would undo, newest first:");
            let mut rows = Vec::new();
            for plan in &plans {
                for step in plan["would_undo"].as_array().into_iter().flatten() {
                    rows.push(vec![
                        format!("  {}", plan["target"].as_str().unwrap_or_default()),
                        step["step_id"].as_str().unwrap_or_default().to_owned(),
                        step["uses"].as_str().unwrap_or_default().to_owned(),
                        step["outcome"].as_str().unwrap_or_default().to_owned(),
                    ]);
                }
            }
            out!("{}", render::aligned(&rows));
        }
    }
    Ok(code::SUCCESS)
}

/// `kmsflow approve ROLLOUT wave-N`.
pub fn approve(context: &Context, id: &str, gate: &str, approved_by: &str) -> Result<u8, Failure> {
    let wave: u32 = gate
        .strip_prefix("wave-")
        .and_then(|n| n.parse().ok())
        .filter(|n| *n > 1)
        .ok_or_else(|| {
            Failure::Usage(format!(
                "a rollout's gates are `wave-2`, `wave-3`, ...; `{gate}` is not one"
            ))
        })?;
    let mut store = context.store()?;
    let id = store.resolve_rollout_id(id)?;
    let waiting = store
        .events(&id)?
        .iter()
        .any(|e| e.kind == "wave_gate" && e.detail["wave"] == wave);
    if !waiting {
        return Err(Failure::Usage(format!(
            "rollout {id} is not waiting at wave {wave}'s gate; `kmsflow show {id}` says where it stands"
        )));
    }
    store.commit(&[kmsflow_state::Write::ApproveWave {
        rollout_id: id.clone(),
        wave,
        approved_by: approved_by.to_owned(),
        at: chrono::Utc::now(),
    }])?;
    outln!(
        "approved wave {wave} of rollout {id} as {approved_by}; continue with `kmsflow resume {id}`"
    );
    Ok(code::SUCCESS)
}

/// Prints the outcome as asked and turns the status into the exit code: 0 every target
/// succeeded, 1 a failure or the budget stopped it, 4 interrupted or waiting at a gate.
pub(crate) fn finish(
    context: &Context,
    summary: RolloutSummary,
    output: Output,
) -> Result<u8, Failure> {
    if output == Output::Json {
        let store = context.store()?;
        print_report(&store, &store.rollout(&summary.rollout_id)?)?;
    }
    let id = &summary.rollout_id;
    let exit = status_code(summary.status);
    if exit != code::SUCCESS {
        if let Some(error) = &summary.error {
            crate::output::note!("{error}");
        }
        let hint = match summary.status {
            RunStatus::Waiting => {
                format!("approve what waits (`kmsflow show {id}`), then `kmsflow resume {id}`")
            }
            RunStatus::RollbackFailed => {
                format!("see `kmsflow show {id}`; `kmsflow rollback {id}` tries again")
            }
            _ => format!(
                "see `kmsflow show {id}`; deal with the cause, then `kmsflow resume {id}`, or undo with `kmsflow rollback {id}`"
            ),
        };
        crate::output::note!("{hint}");
    }
    Ok(exit)
}

/// The `--output json` report and `show ROLLOUT --output json`, on stdout: the rollout, its
/// counts, and per target its parameters, run, status and each step's outcome and error
/// (Azure's code and correlation id are in the error text, as the step recorded it). Written
/// a target at a time: a fleet of 10,000 is never held as one JSON value.
pub fn print_report(store: &Store, rollout: &RolloutRecord) -> Result<u8, Failure> {
    use std::io::Write as _;
    let targets = store.rollout_targets(&rollout.id)?;
    let head = json!({
        "id": rollout.id, "runbook": rollout.runbook, "runbook_ref": rollout.runbook_ref,
        "status": rollout.status, "error": rollout.error, "policy": rollout.policy,
        "params": rollout.params, "started_at": rollout.started_at, "finished_at": rollout.finished_at,
        "summary": count(&targets),
    });
    let written = (|| -> std::io::Result<()> {
        let mut out = std::io::BufWriter::new(std::io::stdout().lock());
        let head = serde_json::to_string_pretty(&head)?;
        // The head without its closing brace, then the targets, each indented as a member of
        // the array (a JSON text holds no raw newline inside a string).
        let open = head.strip_suffix("\n}").unwrap_or(&head);
        write!(out, "{open},\n  \"targets\": [")?;
        for (index, target) in targets.iter().enumerate() {
            let row = serde_json::to_string_pretty(
                &target_row(store, target).map_err(std::io::Error::other)?,
            )?;
            let separator = if index == 0 { "" } else { "," };
            write!(out, "{separator}\n    {}", row.replace('\n', "\n    "))?;
        }
        let close = if targets.is_empty() { "" } else { "\n  " };
        writeln!(out, "{close}]\n}}")?;
        out.flush()
    })();
    written.map_err(|e| Failure::Usage(format!("cannot write to stdout: {e}")))?;
    Ok(code::SUCCESS)
}

/// One target of the report.
fn target_row(
    store: &Store,
    target: &RolloutTargetRecord,
) -> Result<Value, kmsflow_state::StoreError> {
    let steps: Vec<Value> = match &target.run_id {
        Some(run_id) => store
            .steps(run_id)?
            .iter()
            .map(|s| json!({"id": s.step_id, "status": s.status, "outcome": s.outcome, "error": s.error}))
            .collect(),
        None => Vec::new(),
    };
    Ok(json!({
        "position": target.position, "target": target.label, "wave": target.wave,
        "params": target.params, "run_id": target.run_id,
        "status": target.status.map_or("not_started", |s| s.as_str()),
        "step": target.step, "error": target.error, "steps": steps,
    }))
}

/// "40 targets: 38 succeeded, 2 failed", in the order statuses first appear.
fn counts_text(targets: &[RolloutTargetRecord]) -> String {
    let mut counts: Vec<(&str, usize)> = Vec::new();
    for target in targets {
        let word = target.status.map_or("not started", |s| s.as_str());
        match counts.iter_mut().find(|(w, _)| *w == word) {
            Some((_, n)) => *n += 1,
            None => counts.push((word, 1)),
        }
    }
    let parts: Vec<String> = counts.iter().map(|(w, n)| format!("{n} {w}")).collect();
    format!(
        "{} target{}: {}",
        targets.len(),
        if targets.len() == 1 { "" } else { "s" },
        parts.join(", ")
    )
}

fn count(targets: &[RolloutTargetRecord]) -> Value {
    let mut counts = Map::new();
    counts.insert("targets".into(), json!(targets.len()));
    for target in targets {
        let word = target.status.map_or("not_started", |s| s.as_str());
        let n = counts.get(word).and_then(Value::as_u64).unwrap_or(0);
        counts.insert(word.to_owned(), json!(n + 1));
    }
    Value::Object(counts)
}

/// `kmsflow show ROLLOUT`: the rollout, then a row per target (target, wave, run, status,
/// current or failed step, duration).
pub fn show(context: &Context, id: &str, output: Output) -> Result<u8, Failure> {
    let store = context.read_store()?;
    let id = store.resolve_rollout_id(id)?;
    let rollout = store.rollout(&id)?;
    if output == Output::Json {
        return print_report(&store, &rollout);
    }
    let targets = store.rollout_targets(&id)?;
    let policy: Policy = serde_json::from_value(rollout.policy.clone()).unwrap_or_default();
    outln!("rollout   {}", rollout.id);
    outln!("runbook   {} ({})", rollout.runbook, rollout.runbook_ref);
    outln!("status    {}", rollout.status);
    outln!(
        "policy    concurrency {}, max errors {}, waves {}, gate {}",
        policy.concurrency,
        policy.max_errors,
        policy.waves.as_ref().map_or_else(
            || "ramp".to_owned(),
            |w| w
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>()
                .join(",")
        ),
        policy.gate
    );
    outln!("started   {}", rollout.started_at.to_rfc3339());
    if let Some(finished) = rollout.finished_at {
        outln!("finished  {}", finished.to_rfc3339());
    }
    if let Some(error) = &rollout.error {
        outln!("error     {error}");
    }
    let mut rows = vec![
        [
            "target", "wave", "run", "status", "step", "duration", "error",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for t in &targets {
        let duration = match (t.started_at, t.finished_at) {
            (Some(start), Some(end)) => {
                crate::progress_view::compact((end - start).to_std().unwrap_or_default())
            }
            (Some(start), None) => format!(
                "{}+",
                crate::progress_view::compact(
                    (chrono::Utc::now() - start).to_std().unwrap_or_default()
                )
            ),
            _ => "-".into(),
        };
        rows.push(vec![
            t.label.clone(),
            t.wave.to_string(),
            t.run_id.clone().unwrap_or_else(|| "-".into()),
            t.status.map_or("not started", |s| s.as_str()).to_owned(),
            t.step.clone().unwrap_or_else(|| "-".into()),
            duration,
            t.error
                .as_deref()
                .and_then(|e| e.lines().next())
                .unwrap_or_default()
                .to_owned(),
        ]);
    }
    out!("\n{}", render::aligned(&rows));
    outln!("\n{}", counts_text(&targets));
    Ok(code::SUCCESS)
}

/// `kmsflow events ROLLOUT`: the rollout's own journal (each target's run has its own).
pub fn events(context: &Context, id: &str, output: Output) -> Result<u8, Failure> {
    let store = context.read_store()?;
    let id = store.resolve_rollout_id(id)?;
    let events = store.events(&id)?;
    match output {
        Output::Json => print_json(&serde_json::to_value(&events).expect("events serialize")),
        Output::Text => {
            out!("{}", render::events_text(&events));
            Ok(code::SUCCESS)
        }
    }
}

/// The rollouts for `kmsflow runs`, newest first.
pub fn rollouts_text(rollouts: &[RolloutRecord]) -> String {
    let mut rows = vec![
        [
            "rollout", "runbook", "targets", "status", "started", "error",
        ]
        .map(str::to_owned)
        .to_vec(),
    ];
    for r in rollouts {
        rows.push(vec![
            r.id.clone(),
            r.runbook.clone(),
            r.targets.to_string(),
            r.status.as_str().to_owned(),
            r.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            r.error.clone().unwrap_or_default(),
        ]);
    }
    render::aligned(&rows)
}
