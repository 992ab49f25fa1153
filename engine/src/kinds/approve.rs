use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Value, json};

use crate::kind::*;

/// Pauses the run until `kmsflow approve RUN STEP` records who approved it.
pub struct Approve;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    #[allow(dead_code)]
    message: Option<String>,
}

static SPEC: KindSpec = KindSpec {
    name: "approve",
    summary: "Pauses the run (exit code 4, status `waiting`) until `kmsflow approve RUN STEP`; then `kmsflow resume RUN` continues.",
    params: &[ParamSpec::optional(
        "message",
        ValueType::String,
        "what the approver should check",
    )],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "approved_by",
            description: "who approved (user@host)",
        },
        OutputSpec {
            name: "approved_at",
            description: "when (RFC 3339, UTC)",
        },
    ]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Approve {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let _: Params = cx.params()?;
        match cx.approval {
            Some(approval) => Ok(json!({
                "approved_by": approval.approved_by,
                "approved_at": approval.approved_at.to_rfc3339(),
            })),
            None => Err(StepError::awaiting_approval()),
        }
    }

    fn plan(&self, _cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        Ok(StepPlan::unchanged(
            before.as_object().cloned().unwrap_or_default(),
        ))
    }

    async fn apply(
        &self,
        _cx: &StepContext<'_>,
        _before: &Value,
        plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        Ok(plan.outputs.clone().into())
    }

    async fn rollback(
        &self,
        _cx: &StepContext<'_>,
        _before: &Value,
        _outcome: Outcome,
    ) -> Result<Undo, StepError> {
        Ok(Undo::NothingToUndo)
    }
}
