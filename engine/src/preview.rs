//! `plan`: what each step would do, without changing anything.
//!
//! Steps are observed and planned in execution order. A step whose inputs depend on outputs
//! that do not exist yet is not observed: its inputs are "known after apply", like Terraform's.

use serde::Serialize;
use serde_json::{Map, Value, json};
use tokio_util::sync::CancellationToken;

use crate::input::prepare_input;
use crate::kind::{Change, ErrorClass, OutputsSpec, Registry, StepContext};
use crate::params::BoundParams;
use crate::redact::Redactor;
use crate::runbook::CompiledRunbook;
use crate::template::Renderer;

/// Stands in for values that exist only once earlier steps have run.
pub const KNOWN_AFTER_APPLY: &str = "(known after apply)";

/// What one step would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepPreview {
    pub step_id: String,
    pub uses: String,
    #[serde(flatten)]
    pub action: PreviewAction,
    /// Set when the change cannot be undone.
    pub irreversible: Option<String>,
    /// The kind can make irreversible changes, though this plan may not.
    pub may_be_irreversible: bool,
}

/// The preview of one step.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum PreviewAction {
    /// Observed and planned.
    Planned {
        change: Change,
    },
    /// Its inputs (or condition) depend on steps that would change first.
    KnownAfterApply {
        reason: String,
    },
    Skipped {
        reason: String,
    },
    /// It would pause for `kmsflow approve`.
    WouldWait,
    /// Observing or planning failed; the run would fail here.
    WouldFail {
        error: String,
    },
}

impl PreviewAction {
    /// Whether the step would (or might) change something.
    pub fn is_change(&self) -> bool {
        match self {
            PreviewAction::Planned { change } => *change != Change::Unchanged,
            PreviewAction::KnownAfterApply { .. } => true,
            _ => false,
        }
    }
}

/// Observes and plans every step.
pub async fn preview(
    runbook: &CompiledRunbook,
    params: &BoundParams,
    registry: &Registry,
) -> Vec<StepPreview> {
    let renderer = Renderer::new();
    let redactor = Redactor::new(params.secret_values());
    let cancel = CancellationToken::new();
    let mut context = json!({
        "params": params.values(),
        "steps": {},
        "run": {"id": KNOWN_AFTER_APPLY, "started_at": KNOWN_AFTER_APPLY},
    });
    let mut skipped: Vec<&str> = Vec::new();
    let mut changes_first: std::collections::HashSet<&str> = std::collections::HashSet::new();
    let mut previews = Vec::with_capacity(runbook.steps.len());
    'steps: for step in &runbook.steps {
        let kind = registry
            .get(&step.uses)
            .expect("compile checked the step kind");
        let spec = kind.spec();
        // Until the step is planned, each output it declares is known after apply. Outputs
        // named by a parameter's keys (a fragment's, a `noop`'s) are those keys.
        let unknown_outputs = || -> Map<String, Value> {
            let unknown = |name: &str| (name.to_owned(), Value::String(KNOWN_AFTER_APPLY.into()));
            match spec.outputs {
                OutputsSpec::Fixed(outputs) => outputs.iter().map(|o| unknown(o.name)).collect(),
                OutputsSpec::KeysOf(param) => step.with[param]
                    .as_object()
                    .map(|keys| keys.keys().map(|k| unknown(k)).collect())
                    .unwrap_or_default(),
            }
        };
        // A dependency that changes first (or may) can make what this step reads appear:
        // a vault a step creates does not exist yet when the next step is planned.
        let changing_dependency = step
            .needs
            .iter()
            .find(|d| changes_first.contains(d.as_str()))
            .cloned();
        let mut outputs = unknown_outputs();
        let action = 'action: {
            if let Some(dep) = step
                .reads_outputs_of
                .iter()
                .find(|d| skipped.contains(&d.as_str()))
            {
                break 'action PreviewAction::Skipped {
                    reason: format!("reads outputs of skipped step `{dep}`"),
                };
            }
            if let Some(condition) = &step.condition {
                match renderer.render_str(condition, &context) {
                    Ok(value) if value.to_string().contains(KNOWN_AFTER_APPLY) => {
                        break 'action PreviewAction::KnownAfterApply {
                            reason: "its `if` depends on values known after apply".into(),
                        };
                    }
                    Ok(_) => match renderer.render_condition(condition, &context) {
                        Ok(false) => {
                            break 'action PreviewAction::Skipped {
                                reason: format!("`if` is false: {condition}"),
                            };
                        }
                        Ok(true) => {}
                        Err(error) => {
                            break 'action PreviewAction::WouldFail {
                                error: error.to_string(),
                            };
                        }
                    },
                    Err(error) => {
                        break 'action PreviewAction::WouldFail {
                            error: error.to_string(),
                        };
                    }
                }
            }
            let rendered = match renderer.render_value(&step.with, &context) {
                Ok(rendered) => rendered,
                Err(error) => {
                    break 'action PreviewAction::WouldFail {
                        error: error.to_string(),
                    };
                }
            };
            if rendered.to_string().contains(KNOWN_AFTER_APPLY) {
                break 'action PreviewAction::KnownAfterApply {
                    reason: "its inputs depend on outputs known after apply".into(),
                };
            }
            let input = match prepare_input(spec, rendered) {
                Ok(input) => input,
                Err(error) => {
                    break 'action PreviewAction::WouldFail {
                        error: format!("invalid input: {error}"),
                    };
                }
            };
            let cx = StepContext {
                run_id: "plan",
                step_id: &step.id,
                attempt: 1,
                input: &input,
                approval: None,
                cancel: &cancel,
                earlier_before: None,
                input_has_secrets: redactor.value(&input) != input,
                recorded_outputs: None,
            };
            let planned = match kind.observe(&cx).await {
                Ok(before) => kind.plan(&cx, &before),
                Err(error) => Err(error),
            };
            match planned {
                Ok(plan) => {
                    if plan.change != Change::Unchanged {
                        changes_first.insert(&step.id);
                    }
                    if plan.change == Change::Unchanged {
                        outputs = plan.outputs.clone();
                    } else {
                        outputs.extend(plan.outputs.clone());
                    }
                    let irreversible = plan.irreversible.clone();
                    previews.push(StepPreview {
                        step_id: step.id.clone(),
                        uses: step.uses.clone(),
                        action: PreviewAction::Planned {
                            change: plan.change,
                        },
                        irreversible,
                        may_be_irreversible: step.may_be_irreversible,
                    });
                    context["steps"][&step.id] = json!({"outputs": outputs});
                    continue 'steps;
                }
                Err(error) if error.class == ErrorClass::AwaitingApproval => {
                    PreviewAction::WouldWait
                }
                Err(error) => match &changing_dependency {
                    Some(dependency) => PreviewAction::KnownAfterApply {
                        reason: format!(
                            "`{dependency}` changes first; planned now, it would fail: {}",
                            redactor.text(&error.to_string())
                        ),
                    },
                    None => PreviewAction::WouldFail {
                        error: redactor.text(&error.to_string()),
                    },
                },
            }
        };
        if matches!(action, PreviewAction::Skipped { .. }) {
            skipped.push(&step.id);
        }
        if matches!(action, PreviewAction::KnownAfterApply { .. }) {
            changes_first.insert(&step.id);
        }
        context["steps"][&step.id] = json!({"outputs": outputs});
        previews.push(StepPreview {
            step_id: step.id.clone(),
            uses: step.uses.clone(),
            action,
            irreversible: None,
            may_be_irreversible: step.may_be_irreversible,
        });
    }
    previews
}
