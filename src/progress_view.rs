//! How a run's progress looks while it happens: on a terminal, a live line per running step
//! (spinner, what it waits for, elapsed time) under the transitions; piped, one line per
//! transition and per change of what a step waits for; under `--log-format json`, one JSON
//! object per event with its time. Every mode ends with a summary: counts per outcome and the
//! run's duration.

use std::collections::HashMap;
use std::io::Write as _;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use indicatif::{MultiProgress, ProgressBar, ProgressDrawTarget, ProgressStyle};
use kmsflow_engine::progress::{Progress, ProgressSink};
use kmsflow_state::Outcome;

use crate::render;

/// Where progress goes and how it looks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// A terminal: live lines for running steps.
    Live,
    /// A pipe or a file: plain lines.
    Lines,
    /// `--log-format json`.
    Json,
}

impl Mode {
    /// Live only on a terminal that can redraw (not `TERM=dumb`).
    pub fn detect(json_logs: bool) -> Mode {
        let dumb = std::env::var("TERM").is_ok_and(|t| t == "dumb");
        if json_logs {
            Mode::Json
        } else if std::io::IsTerminal::is_terminal(&std::io::stderr()) && !dumb {
            Mode::Live
        } else {
            Mode::Lines
        }
    }
}

/// Outcomes counted for the closing summary.
#[derive(Debug, Default)]
struct Tally {
    outcomes: HashMap<&'static str, usize>,
}

impl Tally {
    fn add(&mut self, what: &'static str) {
        *self.outcomes.entry(what).or_default() += 1;
    }

    /// "2 created, 1 updated, 3 unchanged", in a fixed order, zeros left out.
    fn summary(&self) -> String {
        const ORDER: &[&str] = &[
            "created",
            "updated",
            "unchanged",
            "invoked",
            "reused",
            "skipped",
            "waiting",
            "failed",
            "undone",
            "kept",
            "rollback failed",
        ];
        let parts: Vec<String> = ORDER
            .iter()
            .filter_map(|what| self.outcomes.get(what).map(|n| format!("{n} {what}")))
            .collect();
        if parts.is_empty() {
            "no steps ran".to_owned()
        } else {
            parts.join(", ")
        }
    }
}

#[derive(Default)]
struct View {
    run_started: Option<Instant>,
    step_started: HashMap<String, Instant>,
    /// What each running step waits for, as last printed (plain lines print changes only).
    waiting_on: HashMap<String, String>,
    bars: HashMap<String, ProgressBar>,
    tally: Tally,
}

/// Colour on a live terminal, unless `NO_COLOR` is set (https://no-color.org).
fn colour(mode: Mode) -> bool {
    mode == Mode::Live && std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
}

type Paint = fn(console::StyledObject<&str>) -> console::StyledObject<&str>;

/// The state word of a progress line, coloured: red for failures, yellow for what needs a
/// look, green for what went well.
fn paint(line: &str) -> String {
    const WORDS: &[(&str, Paint)] = &[
        ("FAILED", |s| s.red().bold()),
        ("WARNING", |s| s.yellow().bold()),
        ("KEPT", |s| s.yellow()),
        ("waiting", |s| s.yellow()),
        ("retrying", |s| s.yellow()),
        ("created", |s| s.green()),
        ("updated", |s| s.green()),
        ("unchanged", |s| s.green()),
        ("undone", |s| s.green()),
    ];
    for (word, style) in WORDS {
        let padded = format!(" {word} ");
        if let Some(at) = line.find(&padded) {
            let styled = style(console::style(*word)).force_styling(true);
            return format!("{} {styled} {}", &line[..at], &line[at + padded.len()..]);
        }
    }
    line.to_owned()
}

/// The sink for a run's progress, aligned on step ids `width` wide.
pub fn sink(width: usize, mode: Mode) -> ProgressSink {
    let colour = colour(mode);
    let multi =
        (mode == Mode::Live).then(|| MultiProgress::with_draw_target(ProgressDrawTarget::stderr()));
    let view = Arc::new(Mutex::new(View::default()));
    Arc::new(move |event: &Progress| {
        let mut view = view.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
        let lines = view.observe(event, width, mode, multi.as_ref());
        for line in lines {
            let line = if colour { paint(&line) } else { line };
            match &multi {
                Some(multi) => {
                    let _ = multi.println(&line);
                }
                None => {
                    let _ = writeln!(std::io::stderr().lock(), "{line}");
                }
            }
        }
    })
}

impl View {
    /// Updates the view with one event; returns the lines to print above the live ones.
    fn observe(
        &mut self,
        event: &Progress,
        width: usize,
        mode: Mode,
        multi: Option<&MultiProgress>,
    ) -> Vec<String> {
        let now = Instant::now();
        let mut lines = Vec::new();
        let mut repeated = false;
        match event {
            Progress::RunStarted { .. } => {
                self.run_started = Some(now);
            }
            Progress::StepStarted { step_id, uses, .. } => {
                self.step_started.insert(step_id.clone(), now);
                self.waiting_on.remove(step_id);
                if let Some(multi) = multi {
                    let bar = multi.add(ProgressBar::new_spinner());
                    bar.set_style(
                        ProgressStyle::with_template(&format!(
                            "  {{spinner}} {{prefix:<{width}}}  {{wide_msg}} {{elapsed}}"
                        ))
                        .expect("a valid template"),
                    );
                    bar.set_prefix(step_id.clone());
                    bar.set_message(uses.clone());
                    bar.enable_steady_tick(Duration::from_millis(120));
                    if let Some(old) = self.bars.insert(step_id.clone(), bar) {
                        old.finish_and_clear();
                    }
                }
            }
            Progress::StepWaitingOn { step_id, what } => {
                if let Some(bar) = self.bars.get(step_id) {
                    bar.set_message(what.clone());
                }
                // A kind reports at every poll; only a change is worth a line.
                repeated = self.waiting_on.get(step_id) == Some(what);
                if !repeated {
                    self.waiting_on.insert(step_id.clone(), what.clone());
                    if mode == Mode::Lines {
                        let elapsed = self
                            .step_started
                            .get(step_id)
                            .map(|t| now.duration_since(*t))
                            .unwrap_or_default();
                        lines.push(render::step_line(
                            width,
                            step_id,
                            "waiting",
                            &format!("{what}, {}", compact(elapsed)),
                        ));
                    }
                }
            }
            Progress::StepSucceeded {
                step_id, outcome, ..
            } => {
                self.end_step(step_id);
                self.tally.add(match outcome {
                    Outcome::Created => "created",
                    Outcome::Updated => "updated",
                    Outcome::Unchanged => "unchanged",
                    Outcome::Invoked => "invoked",
                });
            }
            Progress::StepReused { .. } => self.tally.add("reused"),
            Progress::StepSkipped { step_id, .. } => {
                self.end_step(step_id);
                self.tally.add("skipped");
            }
            Progress::StepWaiting { step_id, .. } => {
                self.end_step(step_id);
                self.tally.add("waiting");
            }
            Progress::StepFailed { step_id, .. } => {
                self.end_step(step_id);
                self.tally.add("failed");
            }
            Progress::StepRetrying { step_id, .. } => self.end_step(step_id),
            Progress::StepRolledBack { .. } => self.tally.add("undone"),
            Progress::StepIrreversible { .. } => self.tally.add("kept"),
            Progress::StepRollbackFailed { .. } => self.tally.add("rollback failed"),
            _ => {}
        }
        if mode == Mode::Json && !repeated {
            lines.push(render::progress_json(event).to_string());
        } else if let Some(line) = render::progress_line(event, width) {
            lines.push(line);
        }
        if let Progress::RunFinished { .. } = event {
            for (_, bar) in self.bars.drain() {
                bar.finish_and_clear();
            }
            let took = self
                .run_started
                .map(|t| now.duration_since(t))
                .unwrap_or_default();
            let summary = self.tally.summary();
            lines.push(match mode {
                Mode::Json => render::progress_json_summary(&summary, took).to_string(),
                _ => format!("kmsflow: {summary}, in {}", compact(took)),
            });
        }
        lines
    }

    fn end_step(&mut self, step_id: &str) {
        if let Some(bar) = self.bars.remove(step_id) {
            bar.finish_and_clear();
        }
        self.waiting_on.remove(step_id);
    }
}

/// "8s", "2m10s", "1h03m": how long a step has waited, at a glance.
pub fn compact(elapsed: Duration) -> String {
    let s = elapsed.as_secs();
    match s {
        0..60 => format!("{s}s"),
        60..3600 => format!("{}m{:02}s", s / 60, s % 60),
        _ => format!("{}h{:02}m", s / 3600, (s % 3600) / 60),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elapsed_times_read_at_a_glance() {
        assert_eq!(compact(Duration::from_secs(8)), "8s");
        assert_eq!(compact(Duration::from_secs(130)), "2m10s");
        assert_eq!(compact(Duration::from_secs(3780)), "1h03m");
    }

    #[test]
    fn waiting_lines_are_printed_when_what_is_waited_for_changes() {
        let mut view = View::default();
        let started = Progress::StepStarted {
            step_id: "cluster".into(),
            uses: "azure.aks_kms".into(),
            attempt: 1,
        };
        let waiting = |what: &str| Progress::StepWaitingOn {
            step_id: "cluster".into(),
            what: what.into(),
        };
        view.observe(&started, 7, Mode::Lines, None);
        let first = view.observe(&waiting("`aks-1` Updating"), 7, Mode::Lines, None);
        let same = view.observe(&waiting("`aks-1` Updating"), 7, Mode::Lines, None);
        let next = view.observe(&waiting("`aks-1` Succeeded"), 7, Mode::Lines, None);
        assert_eq!(first.len(), 1, "{first:?}");
        assert!(first[0].contains("waiting") && first[0].contains("`aks-1` Updating, 0s"));
        assert!(same.is_empty(), "{same:?}");
        assert_eq!(next.len(), 1);
    }

    #[test]
    fn the_summary_counts_outcomes_in_order() {
        let mut tally = Tally::default();
        for what in ["unchanged", "created", "created", "failed"] {
            tally.add(what);
        }
        assert_eq!(tally.summary(), "2 created, 1 unchanged, 1 failed");
    }
}
