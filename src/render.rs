//! How runs, steps, plans and progress look on a terminal.

use std::time::Duration;

use kmsflow_engine::executor::change_summary;
use kmsflow_engine::preview::{PreviewAction, StepPreview};
use kmsflow_engine::progress::Progress;
use kmsflow_state::{EventRecord, RunRecord, StepRecord};
use serde_json::{Value, json};

fn seconds(duration: Duration) -> String {
    format!("{:.2}s", duration.as_secs_f64())
}

pub fn step_line(width: usize, step_id: &str, word: &str, detail: &str) -> String {
    format!("  {step_id:<width$}  {word:<10} {detail}")
        .trim_end()
        .to_owned()
}

pub fn progress_line(event: &Progress, width: usize) -> Option<String> {
    Some(match event {
        Progress::RunStarted {
            run_id,
            runbook,
            resumed,
            n_steps,
        } => format!(
            "kmsflow: {} run {run_id} of `{runbook}` ({n_steps} steps)",
            if *resumed { "resuming" } else { "starting" }
        ),
        Progress::StepReused { step_id } => {
            step_line(width, step_id, "done", "(succeeded before; outputs reused)")
        }
        Progress::StepStarted {
            step_id,
            uses,
            attempt,
        } => step_line(
            width,
            step_id,
            "started",
            &format!("{uses}, attempt {attempt}"),
        ),
        Progress::StepApplying { step_id, summary } => {
            step_line(width, step_id, "applying", summary)
        }
        // Printed by the view, which knows whether it changed.
        Progress::StepWaitingOn { .. } => return None,
        Progress::PointOfNoReturn { step_id, reason } => step_line(
            width,
            step_id,
            "WARNING",
            &format!("point of no return: {reason}"),
        ),
        Progress::StepSucceeded {
            step_id,
            outcome,
            elapsed,
        } => step_line(width, step_id, outcome.as_str(), &seconds(*elapsed)),
        Progress::StepRetrying {
            step_id,
            attempt,
            delay,
            error,
        } => step_line(
            width,
            step_id,
            "retrying",
            &format!("in {} after attempt {attempt}: {error}", seconds(*delay)),
        ),
        Progress::StepFailed { step_id, error } => step_line(width, step_id, "FAILED", error),
        Progress::StepSkipped { step_id, reason } => step_line(width, step_id, "skipped", reason),
        Progress::StepWaiting { step_id, message } => match message {
            Some(message) => step_line(
                width,
                step_id,
                "waiting",
                &format!("for approval: {message}"),
            ),
            None => step_line(width, step_id, "waiting", "for approval"),
        },
        Progress::Draining { running } => format!(
            "kmsflow: stopping: no new steps; waiting for {running} running step(s) to finish (Ctrl-C again cancels them)"
        ),
        Progress::RunFinished {
            run_id,
            status,
            error,
        } => match error {
            // The step's FAILED line just above carries the error: name the step only.
            Some(error) => match failed_step(error) {
                Some(step) => {
                    format!("kmsflow: run {run_id} {status} at step `{step}` (its error is above)")
                }
                None => format!("kmsflow: run {run_id} {status}: {error}"),
            },
            None => format!("kmsflow: run {run_id} {status}"),
        },
        Progress::StepRolledBack { step_id } => step_line(width, step_id, "undone", ""),
        Progress::StepIrreversible { step_id, reason } => {
            step_line(width, step_id, "KEPT", &format!("irreversible: {reason}"))
        }
        Progress::StepRollbackFailed { step_id, error } => {
            step_line(width, step_id, "FAILED", error)
        }
    })
}

pub fn progress_json(event: &Progress) -> Value {
    let (kind, detail) = match event {
        Progress::RunStarted {
            run_id,
            runbook,
            resumed,
            n_steps,
        } => (
            "run_started",
            json!({"run_id": run_id, "runbook": runbook, "resumed": resumed, "n_steps": n_steps}),
        ),
        Progress::StepReused { step_id } => ("step_reused", json!({"step_id": step_id})),
        Progress::StepStarted {
            step_id,
            uses,
            attempt,
        } => (
            "step_started",
            json!({"step_id": step_id, "uses": uses, "attempt": attempt}),
        ),
        Progress::StepWaitingOn { step_id, what } => {
            ("step_waiting_on", json!({"step_id": step_id, "what": what}))
        }
        Progress::StepApplying { step_id, summary } => (
            "step_applying",
            json!({"step_id": step_id, "summary": summary}),
        ),
        Progress::PointOfNoReturn { step_id, reason } => (
            "point_of_no_return",
            json!({"step_id": step_id, "reason": reason}),
        ),
        Progress::StepSucceeded {
            step_id,
            outcome,
            elapsed,
        } => (
            "step_succeeded",
            json!({"step_id": step_id, "outcome": outcome, "elapsed_ms": elapsed.as_millis() as u64}),
        ),
        Progress::StepRetrying {
            step_id,
            attempt,
            delay,
            error,
        } => (
            "step_retrying",
            json!({"step_id": step_id, "attempt": attempt, "delay_ms": delay.as_millis() as u64, "error": error}),
        ),
        Progress::StepFailed { step_id, error } => {
            ("step_failed", json!({"step_id": step_id, "error": error}))
        }
        Progress::StepSkipped { step_id, reason } => (
            "step_skipped",
            json!({"step_id": step_id, "reason": reason}),
        ),
        Progress::StepWaiting { step_id, message } => (
            "step_waiting",
            json!({"step_id": step_id, "message": message}),
        ),
        Progress::Draining { running } => ("draining", json!({"running": running})),
        Progress::RunFinished {
            run_id,
            status,
            error,
        } => (
            "run_finished",
            json!({"run_id": run_id, "status": status, "error": error}),
        ),
        Progress::StepRolledBack { step_id } => ("step_rolled_back", json!({"step_id": step_id})),
        Progress::StepIrreversible { step_id, reason } => (
            "step_irreversible",
            json!({"step_id": step_id, "reason": reason}),
        ),
        Progress::StepRollbackFailed { step_id, error } => (
            "step_rollback_failed",
            json!({"step_id": step_id, "error": error}),
        ),
    };
    json!({"ts": now_rfc3339(), "event": kind, "detail": detail})
}

/// The closing summary as a JSON log line.
pub fn progress_json_summary(summary: &str, took: Duration) -> Value {
    json!({"ts": now_rfc3339(), "event": "run_summary", "detail": {"summary": summary, "elapsed_ms": took.as_millis() as u64}})
}

/// A log line's time: UTC, to the millisecond.
pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

/// The `show --output json` object (also printed by `run --output json`).
pub fn run_json(run: &RunRecord, steps: &[StepRecord]) -> Value {
    let mut params = run.params.as_object().cloned().unwrap_or_default();
    for secret in &run.secret_params {
        params.insert(secret.clone(), json!("***"));
    }
    json!({
        "id": run.id,
        "runbook": run.runbook,
        "status": run.status,
        "params": params,
        "started_at": run.started_at,
        "finished_at": run.finished_at,
        "error": run.error,
        "steps": steps.iter().map(|s| json!({
            "id": s.step_id,
            "uses": s.uses,
            "status": s.status,
            "outcome": s.outcome,
            "attempts": s.attempts,
            "outputs": s.outputs,
            "error": s.error,
        })).collect::<Vec<_>>(),
        "outputs": run.outputs,
    })
}

/// `show` as text.
pub fn run_text(run: &RunRecord, steps: &[StepRecord]) -> String {
    let mut out = String::new();
    out.push_str(&format!("run       {}\n", run.id));
    out.push_str(&format!(
        "runbook   {} ({})\n",
        run.runbook, run.runbook_ref
    ));
    out.push_str(&format!("status    {}\n", run.status));
    out.push_str(&format!("started   {}\n", run.started_at.to_rfc3339()));
    if let Some(finished) = run.finished_at {
        out.push_str(&format!("finished  {}\n", finished.to_rfc3339()));
    }
    if let Some(error) = &run.error {
        out.push_str(&format!("error     {error}\n"));
    }
    let width = steps
        .iter()
        .map(|s| s.step_id.len())
        .max()
        .unwrap_or(4)
        .max(4);
    let uses_width = steps.iter().map(|s| s.uses.len()).max().unwrap_or(4).max(4);
    out.push_str(&format!(
        "\n  {:<width$}  {:<uses_width$}  {:<11}  {:<9}  {:>8}  error\n",
        "step", "uses", "status", "outcome", "attempts"
    ));
    for step in steps {
        out.push_str(
            format!(
                "  {:<width$}  {:<uses_width$}  {:<11}  {:<9}  {:>8}  {}\n",
                step.step_id,
                step.uses,
                step.status.as_str(),
                step.outcome.map_or("-", |o| o.as_str()),
                step.attempts,
                step.error.as_deref().unwrap_or("")
            )
            .trim_end(),
        );
        out.push('\n');
    }
    if let Some(outputs) = run.outputs.as_ref().and_then(Value::as_object)
        && !outputs.is_empty()
    {
        out.push_str("\noutputs\n");
        for (name, value) in outputs {
            out.push_str(&format!("  {name} = {value}\n"));
        }
    }
    out
}

/// `runs` as text: columns as wide as their widest value.
pub fn runs_text(runs: &[RunRecord]) -> String {
    let mut rows = vec![vec![
        "run".to_owned(),
        "runbook".to_owned(),
        "status".to_owned(),
        "started".to_owned(),
        "error".to_owned(),
    ]];
    rows.extend(runs.iter().map(|run| {
        vec![
            run.id.clone(),
            run.runbook.clone(),
            run.status.as_str().to_owned(),
            run.started_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
            run.error.clone().unwrap_or_default(),
        ]
    }));
    aligned(&rows)
}

/// Runs queued for a worker that no worker has started yet.
pub fn queued_text(queued: &[kmsflow_state::QueuedRun]) -> String {
    let mut rows = vec![
        ["queued run", "runbook", "queue", "state", "queued at"]
            .map(str::to_owned)
            .to_vec(),
    ];
    rows.extend(queued.iter().map(|q| {
        vec![
            q.id.clone(),
            q.runbook.clone(),
            q.queue.clone(),
            match &q.claimed_by {
                Some(worker) => format!("starting on {worker}"),
                None => "waiting for a worker".to_owned(),
            },
            q.enqueued_at.format("%Y-%m-%d %H:%M:%S UTC").to_string(),
        ]
    }));
    aligned(&rows)
}

/// Rows as text, each column padded to its widest cell (the last one left as it is).
pub fn aligned(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let widths: Vec<usize> = (0..columns)
        .map(|c| {
            rows.iter()
                .filter_map(|r| r.get(c))
                .map(|cell| cell.chars().count())
                .max()
                .unwrap_or(0)
        })
        .collect();
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (c, cell) in row.iter().enumerate() {
            if c + 1 < row.len() {
                let pad = widths[c] - cell.chars().count();
                line.push_str(cell);
                line.push_str(&" ".repeat(pad + 2));
            } else {
                line.push_str(cell);
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// `events` as text.
/// The approvals a waiting run asks for, with what each approver should check.
pub fn waiting_text(
    run_id: &str,
    events: &[EventRecord],
    approved: &[kmsflow_state::Approval],
) -> String {
    let mut out = String::new();
    for event in events.iter().filter(|e| e.kind == "approval_requested") {
        let Some(step_id) = event.step_id.as_deref() else {
            continue;
        };
        if approved.iter().any(|a| a.step_id == step_id) || out.contains(&format!("`{step_id}`")) {
            continue;
        }
        out.push_str(&format!("\nwaiting for approval of `{step_id}`"));
        if let Some(message) = event.detail["message"].as_str() {
            out.push_str(&format!(": {message}"));
        }
        out.push_str(&format!(
            "\n  approve with `kmsflow approve {run_id} {step_id}`, then `kmsflow resume {run_id}`\n"
        ));
    }
    out
}

pub fn events_text(events: &[EventRecord]) -> String {
    let mut out = String::new();
    for event in events {
        let detail = match &event.detail {
            Value::Object(map) if map.values().all(Value::is_null) => String::new(),
            other => other.to_string(),
        };
        out.push_str(
            format!(
                "{:>5}  {}  {:<22}  {:<20}  {detail}",
                event.seq,
                event.at.format("%H:%M:%S%.3f"),
                event.kind,
                event.step_id.as_deref().unwrap_or("-"),
            )
            .trim_end(),
        );
        out.push('\n');
    }
    out
}

/// `plan` as text.
pub fn plan_text(previews: &[StepPreview]) -> String {
    let width = previews.iter().map(|p| p.step_id.len()).max().unwrap_or(4);
    let mut out = String::new();
    let mut n_changes = 0;
    for preview in previews {
        let (word, detail) = match &preview.action {
            PreviewAction::Planned { change } => {
                let word = match change {
                    kmsflow_engine::kind::Change::Unchanged => "unchanged",
                    kmsflow_engine::kind::Change::Create { .. } => "create",
                    kmsflow_engine::kind::Change::Update { .. } => "update",
                    kmsflow_engine::kind::Change::Action { .. } => "invoke",
                };
                let mut detail = change_summary(change);
                if let kmsflow_engine::kind::Change::Update { fields, .. } = change {
                    for field in fields {
                        detail.push_str(&format!(
                            "\n{:width$}      ~ {}: {} -> {}",
                            "", field.path, field.from, field.to
                        ));
                    }
                }
                (word, detail)
            }
            PreviewAction::KnownAfterApply { reason } => {
                ("pending", format!("known after apply: {reason}"))
            }
            PreviewAction::Skipped { reason } => ("skip", reason.clone()),
            PreviewAction::WouldWait => ("wait", "pauses for `kmsflow approve`".to_owned()),
            PreviewAction::WouldFail { error } => ("FAIL", error.clone()),
        };
        if preview.action.is_change() {
            n_changes += 1;
        }
        out.push_str(&format!(
            "  {:<width$}  {word:<9}  {detail}\n",
            preview.step_id
        ));
        if let Some(reason) = &preview.irreversible {
            out.push_str(&format!(
                "  {:<width$}  {:<9}  POINT OF NO RETURN: {reason}\n",
                "", ""
            ));
        } else if preview.may_be_irreversible && preview.action.is_change() {
            out.push_str(&format!(
                "  {:<width$}  {:<9}  may be a point of no return (known after apply)\n",
                "", ""
            ));
        }
    }
    out.push_str(&format!(
        "\n{n_changes} of {} steps would change something\n",
        previews.len()
    ));
    out
}

/// `validate --output sarif`: SARIF 2.1.0, one result per problem, one rule per problem code,
/// as GitHub code scanning and editors read it.
pub fn sarif(reports: &[Value]) -> Value {
    let problems: Vec<&Value> = reports
        .iter()
        .flat_map(|r| r["problems"].as_array().into_iter().flatten())
        .collect();
    let mut rules: Vec<&str> = problems.iter().filter_map(|p| p["code"].as_str()).collect();
    rules.sort_unstable();
    rules.dedup();
    let results: Vec<Value> = problems
        .iter()
        .map(|p| {
            let mut text = p["message"].as_str().unwrap_or_default().to_owned();
            if let Some(help) = p["help"].as_str() {
                text.push_str(&format!(" ({help})"));
            }
            serde_json::json!({
                "ruleId": p["code"],
                "level": "error",
                "message": {"text": text},
                "locations": [{"physicalLocation": {
                    "artifactLocation": {"uri": p["file"].as_str().unwrap_or_default().trim_start_matches("bundled:")},
                    "region": {"startLine": p["line"], "startColumn": p["column"]},
                }}],
            })
        })
        .collect();
    serde_json::json!({
        "$schema": "https://json.schemastore.org/sarif-2.1.0.json",
        "version": "2.1.0",
        "runs": [{
            "tool": {"driver": {
                "name": "kmsflow",
                "version": env!("CARGO_PKG_VERSION"),
                "rules": rules.iter().map(|r| serde_json::json!({"id": r})).collect::<Vec<_>>(),
            }},
            "results": results,
        }],
    })
}

/// The step a run's error names, when it is the executor's "step `X` failed: ..." (whose
/// message its own progress line has already shown).
fn failed_step(error: &str) -> Option<&str> {
    let rest = error.strip_prefix("step `")?;
    let (step, tail) = rest.split_once('`')?;
    tail.starts_with(" failed: ").then_some(step)
}
