//! How a rollout looks while it happens. On a terminal: an overall bar (wave, done, in
//! flight, failed) and a live line per target in flight with its current step and elapsed
//! time, under one line per target that starts or ends. Piped: those lines only. Under
//! `--log-format json`: one JSON object per event. Every mode ends with the counts.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kmsflow_engine::rollout::{Counts, RolloutProgress, RolloutSink};
use kmsflow_state::RunStatus;
use serde_json::json;

use crate::progress_view::{Mode, compact};
use crate::render;

struct View {
    mode: Mode,
    started: Instant,
    total: usize,
    wave: (u32, u32),
    done: usize,
    failed: usize,
    /// When each target in flight started, and its live line.
    in_flight: HashMap<usize, (Instant, Option<ProgressBar>, String)>,
    multi: Option<MultiProgress>,
    overall: Option<ProgressBar>,
    label_width: usize,
}

/// The sink for a rollout's progress.
pub fn sink(mode: Mode, label_width: usize) -> RolloutSink {
    let multi =
        (mode == Mode::Live).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let view = Arc::new(Mutex::new(View {
        mode,
        started: Instant::now(),
        total: 0,
        wave: (0, 0),
        done: 0,
        failed: 0,
        in_flight: HashMap::new(),
        multi,
        overall: None,
        label_width,
    }));
    Arc::new(move |event: &RolloutProgress| {
        let mut view = view.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        for line in view.observe(event) {
            match &view.multi {
                Some(multi) => {
                    let _ = multi.println(&line);
                }
                None => {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }
        }
        view.redraw();
    })
}

impl View {
    fn tag(&self, position: usize) -> String {
        let width = self.total.to_string().len();
        format!("[{:>width$}/{}]", position + 1, self.total)
    }

    fn observe(&mut self, event: &RolloutProgress) -> Vec<String> {
        if self.mode == Mode::Json {
            return json_line(event).into_iter().collect();
        }
        let mut lines = Vec::new();
        let width = self.label_width;
        match event {
            RolloutProgress::Started {
                rollout_id,
                runbook,
                targets,
                waves,
                resumed,
            } => {
                self.total = *targets;
                self.started = Instant::now();
                lines.push(format!(
                    "kmsflow: {} rollout {rollout_id} of `{runbook}`: {targets} target{} in {waves} wave{}",
                    if *resumed { "resuming" } else { "starting" },
                    plural(*targets),
                    plural(*waves as usize),
                ));
                if let Some(multi) = &self.multi {
                    let bar = multi.add(ProgressBar::new(*targets as u64));
                    bar.set_style(
                        ProgressStyle::with_template(
                            "{msg} [{bar:30}] {pos}/{len} done, {elapsed}",
                        )
                        .expect("a valid template")
                        .progress_chars("=> "),
                    );
                    self.overall = Some(bar);
                }
            }
            RolloutProgress::RollbackStarted {
                rollout_id,
                targets,
                to_undo,
            } => {
                self.total = *targets;
                self.started = Instant::now();
                lines.push(format!(
                    "kmsflow: rolling back rollout {rollout_id}: {to_undo} of its {targets} target{} to undo, newest first",
                    plural(*targets)
                ));
            }
            RolloutProgress::WaveStarted {
                wave,
                waves,
                targets,
            } => {
                self.wave = (*wave, *waves);
                lines.push(format!(
                    "kmsflow: wave {wave}/{waves}: {targets} target{}",
                    plural(*targets)
                ));
            }
            RolloutProgress::GateWaiting { wave } => lines.push(format!(
                "kmsflow: wave {wave} waits for approval (`kmsflow approve ROLLOUT wave-{wave}`)"
            )),
            RolloutProgress::Pausing { wave, until } => lines.push(format!(
                "kmsflow: wave {wave} starts at {}",
                until.format("%H:%M:%S UTC")
            )),
            RolloutProgress::TargetStarted {
                position,
                label,
                run_id,
                begins,
            } => {
                let bar = self.multi.as_ref().map(|multi| {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(&format!(
                            "  {{spinner}} {{prefix:<{width}}}  {{wide_msg}} {{elapsed}}"
                        ))
                        .expect("a valid template"),
                    );
                    bar.set_prefix(label.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    bar
                });
                self.in_flight
                    .insert(*position, (Instant::now(), bar, label.clone()));
                lines.push(format!(
                    "{} {label:<width$}  {:<11}  run {run_id}",
                    self.tag(*position),
                    begins.as_str()
                ));
            }
            RolloutProgress::TargetStep { position, step_id } => {
                if let Some((_, Some(bar), _)) = self.in_flight.get(position) {
                    bar.set_message(step_id.clone());
                }
            }
            RolloutProgress::TargetFinished {
                position,
                label,
                status,
                error,
                ..
            } => {
                let took = match self.in_flight.remove(position) {
                    Some((since, bar, _)) => {
                        if let Some(bar) = bar {
                            bar.finish_and_clear();
                        }
                        format!(" in {}", compact(since.elapsed()))
                    }
                    None => String::new(),
                };
                match status {
                    RunStatus::Succeeded | RunStatus::RolledBack => self.done += 1,
                    RunStatus::Waiting | RunStatus::Interrupted => {}
                    _ => {
                        self.done += 1;
                        self.failed += 1;
                    }
                }
                let word = match status {
                    RunStatus::Failed | RunStatus::RollbackFailed => "FAILED".to_owned(),
                    other => other.to_string(),
                };
                let why = error
                    .as_deref()
                    .and_then(|e| e.lines().next())
                    .map(|e| format!(": {e}"))
                    .unwrap_or_default();
                lines.push(format!(
                    "{} {label:<width$}  {word:<11}{took}{why}",
                    self.tag(*position)
                ));
            }
            RolloutProgress::BudgetExhausted { failed, allowed } => lines.push(format!(
                "kmsflow: {failed} failed, more than the {allowed} allowed: no new target starts"
            )),
            RolloutProgress::Finished {
                rollout_id,
                status,
                counts,
                ..
            } => {
                for (_, (_, bar, _)) in self.in_flight.drain() {
                    if let Some(bar) = bar {
                        bar.finish_and_clear();
                    }
                }
                if let Some(bar) = self.overall.take() {
                    bar.finish_and_clear();
                }
                lines.push(format!(
                    "kmsflow: rollout {rollout_id} {status}: {}, in {}",
                    counts_text(counts),
                    compact(self.started.elapsed())
                ));
            }
        }
        lines
    }

    fn redraw(&self) {
        if let Some(bar) = &self.overall {
            bar.set_position(self.done as u64);
            bar.set_message(format!(
                "wave {}/{}, {} in flight, {} failed",
                self.wave.0,
                self.wave.1,
                self.in_flight.len(),
                self.failed
            ));
        }
    }
}

fn plural(n: usize) -> &'static str {
    if n == 1 { "" } else { "s" }
}

/// "38 succeeded, 2 failed, 0 not started", zeros left out (but never empty).
pub fn counts_text(counts: &Counts) -> String {
    let parts: Vec<String> = [
        (counts.succeeded, "succeeded"),
        (counts.failed, "failed"),
        (counts.waiting, "waiting"),
        (counts.interrupted, "interrupted"),
        (counts.rolled_back, "rolled back"),
        (counts.not_started, "not started"),
    ]
    .into_iter()
    .filter(|(n, _)| *n > 0)
    .map(|(n, what)| format!("{n} {what}"))
    .collect();
    if parts.is_empty() {
        "no targets".to_owned()
    } else {
        parts.join(", ")
    }
}

/// One event as a JSON log line; a step change is not worth one.
fn json_line(event: &RolloutProgress) -> Option<String> {
    let ts = render::now_rfc3339();
    let value = match event {
        RolloutProgress::Started {
            rollout_id,
            runbook,
            targets,
            waves,
            resumed,
        } => {
            json!({"ts": ts, "event": "rollout_started", "rollout_id": rollout_id, "runbook": runbook, "targets": targets, "waves": waves, "resumed": resumed})
        }
        RolloutProgress::RollbackStarted {
            rollout_id,
            targets,
            to_undo,
        } => {
            json!({"ts": ts, "event": "rollout_rollback_started", "rollout_id": rollout_id, "targets": targets, "to_undo": to_undo})
        }
        RolloutProgress::WaveStarted {
            wave,
            waves,
            targets,
        } => {
            json!({"ts": ts, "event": "wave_started", "wave": wave, "waves": waves, "targets": targets})
        }
        RolloutProgress::GateWaiting { wave } => {
            json!({"ts": ts, "event": "wave_gate", "wave": wave})
        }
        RolloutProgress::Pausing { wave, until } => {
            json!({"ts": ts, "event": "wave_paused", "wave": wave, "until": until.to_rfc3339()})
        }
        RolloutProgress::TargetStarted {
            position,
            label,
            run_id,
            begins,
        } => {
            json!({"ts": ts, "event": "target_started", "position": position, "target": label, "run_id": run_id, "begins": begins})
        }
        RolloutProgress::TargetStep { .. } => return None,
        RolloutProgress::TargetFinished {
            position,
            label,
            run_id,
            status,
            error,
        } => {
            json!({"ts": ts, "event": "target_finished", "position": position, "target": label, "run_id": run_id, "status": status, "error": error})
        }
        RolloutProgress::BudgetExhausted { failed, allowed } => {
            json!({"ts": ts, "event": "budget_exhausted", "failed": failed, "allowed": allowed})
        }
        RolloutProgress::Finished {
            rollout_id,
            status,
            error,
            counts,
        } => {
            json!({"ts": ts, "event": "rollout_finished", "rollout_id": rollout_id, "status": status, "error": error, "counts": counts})
        }
    };
    Some(value.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn piped_lines_say_which_target_did_what() {
        let mut view = View {
            mode: Mode::Lines,
            started: Instant::now(),
            total: 0,
            wave: (0, 0),
            done: 0,
            failed: 0,
            in_flight: HashMap::new(),
            multi: None,
            overall: None,
            label_width: 10,
        };
        let started = view.observe(&RolloutProgress::Started {
            rollout_id: "rollout-x".into(),
            runbook: "pmk".into(),
            targets: 12,
            waves: 2,
            resumed: false,
        });
        assert_eq!(
            started,
            vec!["kmsflow: starting rollout rollout-x of `pmk`: 12 targets in 2 waves"]
        );
        view.observe(&RolloutProgress::TargetStarted {
            position: 2,
            label: "rg/aks-2".into(),
            run_id: "r2".into(),
            begins: kmsflow_engine::rollout::Begins::Started,
        });
        let failed = view.observe(&RolloutProgress::TargetFinished {
            position: 2,
            label: "rg/aks-2".into(),
            run_id: Some("r2".into()),
            status: RunStatus::Failed,
            error: Some("step `cluster`: 409 Conflict\nmore".into()),
        });
        assert_eq!(failed.len(), 1);
        assert!(
            failed[0]
                .starts_with("[ 3/12] rg/aks-2    FAILED      in 0s: step `cluster`: 409 Conflict"),
            "{failed:?}"
        );
        assert_eq!((view.done, view.failed), (1, 1));
    }

    #[test]
    fn counts_leave_out_zeros() {
        let counts = Counts {
            succeeded: 38,
            failed: 2,
            ..Counts::default()
        };
        assert_eq!(counts_text(&counts), "38 succeeded, 2 failed");
        assert_eq!(counts_text(&Counts::default()), "no targets");
    }
}
