//! `kmsflow check`: the `rotation-check` runbook for one cluster or a fleet, one run per
//! cluster in the store, a summary table (or JSON report), and the worst severity as the exit
//! code.

use std::path::Path;
use std::sync::{Arc, Mutex};

use kmsflow_engine::executor::{Checkpointing, ExecOptions, Signals};
use kmsflow_engine::launch::{Engine, LaunchError, Launcher, RunRequest};
use kmsflow_engine::params::{self, ParamSources};
use kmsflow_engine::progress::{Progress, ProgressSink};
use kmsflow_engine::{CompiledRunbook, RunbookSource};
use kmsflow_state::RunStatus;
use serde_json::{Map, Value, json};
use tokio::sync::OwnedSemaphorePermit;

use crate::failure::{Failure, code};

// Here rather than in `failure.rs`, so that module depends on no command's types.
impl From<NotChecked> for Failure {
    fn from(error: NotChecked) -> Failure {
        match error {
            NotChecked::Store(error) => error.into(),
            params @ NotChecked::Params(_) => Failure::Usage(params.to_string()),
            unprepared => Failure::NotChecked(unprepared.to_string()),
        }
    }
}

/// One cluster to check: its parameters for `rotation-check`.
#[derive(Debug, Clone, PartialEq)]
pub struct Target {
    pub params: Map<String, Value>,
}

/// `resource_group/cluster` (`subscription/resource_group/cluster` when the fleet spans
/// several subscriptions), from the parameters a check runs with.
fn label(sources: &ParamSources, with_subscription: bool) -> String {
    let get = |k: &str| {
        sources
            .cli
            .iter()
            .rev()
            .find(|(key, _)| key == k)
            .map(|(_, v)| v.clone())
            .or_else(|| {
                sources
                    .file
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .or_else(|| {
                sources
                    .fallback
                    .get(k)
                    .and_then(Value::as_str)
                    .map(str::to_owned)
            })
            .unwrap_or_else(|| "?".into())
    };
    if with_subscription {
        format!(
            "{}/{}/{}",
            get("subscription"),
            get("resource_group"),
            get("cluster")
        )
    } else {
        format!("{}/{}", get("resource_group"), get("cluster"))
    }
}

const COLUMNS: &[&str] = &["subscription", "resource_group", "cluster", "expected_mode"];

/// Reads `--targets` (see [`crate::targets`]): rows naming only the columns a check knows.
pub fn read_targets(path: &Path) -> Result<Vec<Target>, Failure> {
    targets_of(
        crate::targets::read_rows(path)?,
        &format!("`{}`", path.display()),
    )
}

/// A check's targets from rows (of a file, or discovered), each naming only the columns a
/// check knows; `source` says where they came from in an error.
pub fn targets_of(
    rows: Vec<kmsflow_engine::rollout::TargetRow>,
    source: &str,
) -> Result<Vec<Target>, Failure> {
    rows.into_iter()
        .map(|row| {
            if let Some(unknown) = row.params.keys().find(|k| !COLUMNS.contains(&k.as_str())) {
                return Err(Failure::Usage(format!(
                    "{source}, {}: unknown column `{unknown}`; use {}",
                    row.origin,
                    COLUMNS.join(", ")
                )));
            }
            Ok(Target { params: row.params })
        })
        .collect()
}

/// What checking one cluster came to.
#[derive(Debug, Clone)]
pub struct Checked {
    pub target: String,
    pub run_id: Option<String>,
    pub worst: String,
    pub mode: String,
    pub findings: Vec<Value>,
}

/// Why a check could not start at all.
#[derive(Debug, thiserror::Error)]
pub enum NotChecked {
    #[error(transparent)]
    Store(#[from] LaunchError),
    /// Not one cluster could be read: no client, no token.
    #[error(
        "no cluster was checked: {0}\n  check the credential kmsflow uses (`--auth`, and the environment it reads)"
    )]
    Unprepared(String),
    /// A target's parameters do not bind: a typo must not become a cluster's `fail` (and
    /// page someone); nothing is checked.
    #[error("no cluster was checked; invalid parameters:\n{0}")]
    Params(String),
}

/// Checks every target, at most `concurrency` at once, each its own run in one shared store
/// (one connection, one writer: the runs' checkpoints are committed together). Fails if the
/// state file cannot be opened or no token can be had (then no cluster could be read, and
/// saying so once beats a thousand identical findings); a cluster that cannot be checked is a
/// `fail` finding of its own.
pub async fn check_all(
    engine: &Engine,
    runbook: Arc<CompiledRunbook>,
    source: String,
    shared: &ParamSources,
    targets: Vec<Target>,
    concurrency: usize,
) -> Result<Vec<Checked>, NotChecked> {
    // Every target binds before any is checked, and all problems are told at once.
    let targets: Vec<(Target, ParamSources)> = targets
        .into_iter()
        .map(|target| {
            let sources = kmsflow_engine::rollout::row_sources(shared, &target.params);
            (target, sources)
        })
        .collect();
    let subscriptions: std::collections::BTreeSet<String> = targets
        .iter()
        .filter_map(|(t, _)| t.params.get("subscription").map(Value::to_string))
        .collect();
    let several_subscriptions = subscriptions.len() > 1;
    let problems: Vec<String> = targets
        .iter()
        .enumerate()
        .filter_map(|(index, (_, sources))| {
            params::bind(&runbook, sources).err().map(|errors| {
                let errors = errors.to_string().replace('\n', "\n    ");
                if targets.len() == 1 {
                    format!("  {errors}")
                } else {
                    format!(
                        "  target {} ({}): {errors}",
                        index + 1,
                        label(sources, several_subscriptions)
                    )
                }
            })
        })
        .collect();
    if !problems.is_empty() {
        return Err(NotChecked::Params(problems.join("\n")));
    }
    // The client and its token once, while the store opens, rather than a hundred checks all
    // waiting on them together.
    let (launcher, prepared) =
        tokio::join!(Launcher::open(engine), engine.registry.prepare(&runbook));
    let launcher = launcher?;
    if let Err(error) = prepared {
        launcher.close().await;
        return Err(NotChecked::Unprepared(error.to_string()));
    }
    let launcher = Arc::new(launcher);
    let semaphore = Arc::new(tokio::sync::Semaphore::new(concurrency.max(1)));
    let mut tasks = tokio::task::JoinSet::new();
    let mut results: Vec<(usize, Checked)> = Vec::new();
    for (index, (_, sources)) in targets.into_iter().enumerate() {
        // A cluster's task is made only once it has a slot, so a fleet of 10,000 holds a
        // hundred checks in memory, not 10,000 waiting ones; and a finished task, which keeps
        // its memory until joined, is joined as soon as it ends.
        let slot = semaphore
            .clone()
            .acquire_owned()
            .await
            .expect("the semaphore is never closed");
        while let Some(joined) = tasks.try_join_next() {
            results.push(joined.expect("checks do not panic"));
        }
        let (launcher, runbook, source) = (launcher.clone(), runbook.clone(), source.clone());
        let label = label(&sources, several_subscriptions);
        tasks.spawn(async move {
            (
                index,
                check_one(&launcher, runbook, source, &sources, label, slot).await,
            )
        });
    }
    while let Some(joined) = tasks.join_next().await {
        results.push(joined.expect("checks do not panic"));
    }
    if let Ok(launcher) = Arc::try_unwrap(launcher) {
        launcher.close().await;
    }
    results.sort_by_key(|(index, _)| *index);
    Ok(results.into_iter().map(|(_, checked)| checked).collect())
}

async fn check_one(
    launcher: &Launcher,
    runbook: Arc<CompiledRunbook>,
    source: String,
    sources: &ParamSources,
    target: String,
    slot: OwnedSemaphorePermit,
) -> Checked {
    let failed = |message: String, run_id: Option<String>| Checked {
        target: target.clone(),
        run_id,
        worst: "fail".into(),
        mode: "?".into(),
        findings: vec![
            json!({"severity": "fail", "code": "check-failed", "message": message, "evidence": {}}),
        ],
    };
    let bound = match params::bind(&runbook, sources) {
        Ok(bound) => bound,
        Err(errors) => return failed(errors.to_string().replace('\n', "; "), None),
    };
    let progress = release_after_reading(
        slot,
        bound.get("rotate_when_overdue") == Some(&Value::Bool(true)),
    );
    let request = RunRequest {
        runbook,
        runbook_ref: "bundled:rotation-check".into(),
        source,
        params: bound,
        // Checks read; their transitions are committed once, when the run ends (or before a
        // rotation, the one change a check can make).
        options: ExecOptions {
            checkpointing: Checkpointing::BeforeChanges,
            ..ExecOptions::default()
        },
        signals: Signals::default(),
        progress,
    };
    let summary = match launcher.start(request).await {
        Ok(summary) => summary,
        Err(error) => return failed(error.to_string(), None),
    };
    let outputs = summary.outputs.clone().unwrap_or_default();
    match summary.status {
        RunStatus::Succeeded => Checked {
            target,
            run_id: Some(summary.run_id),
            worst: outputs["worst"].as_str().unwrap_or("fail").to_owned(),
            mode: outputs["mode"].as_str().unwrap_or("?").to_owned(),
            findings: outputs["findings"].as_array().cloned().unwrap_or_default(),
        },
        RunStatus::Waiting => Checked {
            target,
            worst: "warn".into(),
            mode: "CMK".into(),
            findings: vec![
                json!({"severity": "warn", "code": "rotation-awaiting-approval",
                "message": format!("the key is overdue and waits for approval: kmsflow approve {} approval, then kmsflow resume {}", summary.run_id, summary.run_id),
                "evidence": {}}),
            ],
            run_id: Some(summary.run_id),
        },
        _ => failed(
            summary
                .error
                .unwrap_or_else(|| "the check did not finish".into()),
            Some(summary.run_id),
        ),
    }
}

/// Holds a cluster's `--concurrency` slot while the check reads from Azure. Without a rotation
/// the `check` step is the run's only Azure work, so the slot goes back when it ends and
/// recording this cluster's result overlaps reading the next one's; with a rotation it is
/// kept until the run ends.
fn release_after_reading(slot: OwnedSemaphorePermit, rotates: bool) -> ProgressSink {
    let slot = Mutex::new(Some(slot));
    Arc::new(move |event: &Progress| {
        let read = match event {
            Progress::StepSucceeded { step_id, .. } | Progress::StepFailed { step_id, .. } => {
                step_id == "check" && !rotates
            }
            Progress::RunFinished { .. } => true,
            _ => false,
        };
        if read {
            slot.lock().expect("never poisoned").take();
        }
    })
}

/// The exit code for the worst severity among the results.
pub fn exit_code(results: &[Checked]) -> u8 {
    results
        .iter()
        .map(|r| severity_code(&r.worst))
        .max_by_key(|c| match *c {
            code::RUN_FAILED => 2,
            code::CHANGES => 1,
            _ => 0,
        })
        .unwrap_or(code::SUCCESS)
}

/// What a worst severity exits with: `fail` 1, `warn` 5, `ok` 0; the same for `kmsflow
/// check` and `kmsflow run rotation-check`.
pub fn severity_code(worst: &str) -> u8 {
    match worst {
        "fail" => code::RUN_FAILED,
        "warn" => code::CHANGES,
        _ => code::SUCCESS,
    }
}

/// The summary table: cluster, mode, worst severity, the first finding that is not ok.
pub fn table(results: &[Checked]) -> String {
    let width = results
        .iter()
        .map(|r| r.target.len())
        .max()
        .unwrap_or(7)
        .max(7);
    let mut out = format!(
        "{:<width$}  {:<4}  {:<5}  finding\n",
        "cluster", "mode", "worst"
    );
    for r in results {
        let first = r
            .findings
            .iter()
            .find(|f| f["severity"] != "ok")
            .map(|f| {
                format!(
                    "{}: {}",
                    f["code"].as_str().unwrap_or_default(),
                    f["message"].as_str().unwrap_or_default()
                )
            })
            .unwrap_or_else(|| "all ok".into());
        out.push_str(
            format!(
                "{:<width$}  {:<4}  {:<5}  {first}",
                r.target, r.mode, r.worst
            )
            .trim_end(),
        );
        out.push('\n');
    }
    let count = |s: &str| results.iter().filter(|r| r.worst == s).count();
    out.push_str(&format!(
        "\n{} cluster{}: {} ok, {} warn, {} fail\n",
        results.len(),
        if results.len() == 1 { "" } else { "s" },
        count("ok"),
        count("warn"),
        count("fail")
    ));
    out
}

/// The JSON report.
pub fn report(results: &[Checked]) -> Value {
    let count = |s: &str| results.iter().filter(|r| r.worst == s).count();
    json!({
        "summary": {"clusters": results.len(), "ok": count("ok"), "warn": count("warn"), "fail": count("fail")},
        "clusters": results.iter().map(|r| json!({
            "target": r.target, "run_id": r.run_id, "mode": r.mode, "worst": r.worst, "findings": r.findings,
        })).collect::<Vec<_>>(),
    })
}

/// The bundled `rotation-check` runbook, compiled.
pub fn runbook() -> Result<(Arc<CompiledRunbook>, String), Failure> {
    let bundled = crate::bundled::find("rotation-check").expect("rotation-check is bundled");
    let source = RunbookSource::new("bundled:rotation-check", bundled.text);
    let compiled =
        kmsflow_engine::compile_with(&source, &crate::registry(), &crate::bundled::Fragments)
            .map_err(Failure::Invalid)?;
    Ok((Arc::new(compiled), bundled.text.to_owned()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_check_refuses_a_column_it_does_not_know_naming_the_row() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("fleet.csv");
        std::fs::write(&path, "resource_group,cluster\nrg,a\n").unwrap();
        assert_eq!(read_targets(&path).unwrap().len(), 1);
        std::fs::write(&path, "resource_group,cluster,region\nrg,a,\nrg,b,x\n").unwrap();
        let refused = read_targets(&path).unwrap_err().to_string();
        assert!(
            refused.contains("row 3: unknown column `region`"),
            "{refused}"
        );
    }
}
