//! Asking before what cannot be taken back, as `terraform apply` does: a point of no return in
//! a run, and a rollback that deletes. On a terminal the user types `yes`; without one the
//! command refuses unless `--yes` says the caller has already decided (a CI job), or (for a
//! run) the runbook's own `approve` step stands before the point.

use std::io::{BufRead as _, IsTerminal as _, Write as _};

use kmsflow_engine::CompiledRunbook;
use kmsflow_engine::preview::{PreviewAction, StepPreview};

use crate::failure::Failure;
use crate::render;

/// One thing the user is asked to accept: the step and what it would do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Consequence {
    pub step_id: String,
    pub what: String,
}

/// The points of no return a run would pass, as the plan sees them: the ones a step's plan
/// names, and those of steps whose plan is known only after apply (or could not be made), which
/// may be. A step the runbook gates with an `approve` step before it is left to that step.
pub fn points_of_no_return(
    runbook: &CompiledRunbook,
    previews: &[StepPreview],
) -> Vec<Consequence> {
    previews
        .iter()
        .filter(|p| p.may_be_irreversible && !runbook.approval_before(&p.step_id))
        .filter_map(|p| {
            let what = match (&p.irreversible, &p.action) {
                (Some(reason), _) => reason.clone(),
                (None, PreviewAction::KnownAfterApply { reason }) => {
                    format!("may be a point of no return (known after apply: {reason})")
                }
                (None, PreviewAction::WouldFail { .. }) => {
                    "may be a point of no return (its plan could not be made)".to_owned()
                }
                (None, _) => return None,
            };
            Some(Consequence {
                step_id: p.step_id.clone(),
                what,
            })
        })
        .collect()
}

/// Whether this process can ask: both the reader and the screen are a terminal.
pub fn can_ask() -> bool {
    std::io::stdin().is_terminal() && std::io::stderr().is_terminal()
}

/// Goes ahead when there is nothing to accept or `yes` was given; otherwise asks on the
/// terminal, or refuses without one. `action` completes "kmsflow: this ..." and "... without
/// asking" in the messages (e.g. "run passes a point of no return").
pub fn confirm(action: &str, consequences: &[Consequence], yes: bool) -> Result<(), Failure> {
    if consequences.is_empty() || yes {
        return Ok(());
    }
    let rows: Vec<Vec<String>> = consequences
        .iter()
        .map(|c| vec![format!("  {}", c.step_id), c.what.clone()])
        .collect();
    let listed = render::aligned(&rows);
    if !can_ask() {
        return Err(Failure::Usage(format!(
            "this {action}:\n{listed}there is no terminal to ask; pass `--yes` to go ahead without asking"
        )));
    }
    let mut stderr = std::io::stderr().lock();
    let _ = write!(
        stderr,
        "kmsflow: this {action}:\n{listed}\nDo you want to go ahead? Only 'yes' will be accepted.\n  Enter a value: "
    );
    let _ = stderr.flush();
    drop(stderr);
    let mut answer = String::new();
    std::io::stdin()
        .lock()
        .read_line(&mut answer)
        .map_err(|e| Failure::Usage(format!("cannot read the answer: {e}")))?;
    if answer.trim() == "yes" {
        Ok(())
    } else {
        Err(Failure::Declined)
    }
}
