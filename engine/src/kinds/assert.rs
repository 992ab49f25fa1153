use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::kind::*;

/// Fails (permanently) unless `condition` rendered to true.
pub struct Assert;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    condition: Value,
    #[serde(default)]
    message: Option<String>,
}

static SPEC: KindSpec = KindSpec {
    name: "assert",
    summary: "Fails unless `condition` renders to true (e.g. `{{eq steps.check.outputs.mode 'CMK'}}`), with `message`.",
    params: &[
        ParamSpec::required(
            "condition",
            ValueType::Any,
            "a template that must render to `true`",
        ),
        ParamSpec::optional("message", ValueType::String, "what the failure says"),
    ],
    outputs: OutputsSpec::Fixed(&[]),
    may_be_irreversible: false,
};

fn holds(condition: &Value) -> bool {
    match condition {
        Value::Bool(b) => *b,
        Value::String(s) => s.trim() == "true",
        _ => false,
    }
}

#[async_trait]
impl StepKind for Assert {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let params: Params = cx.params()?;
        if holds(&params.condition) {
            Ok(StepPlan::unchanged(Map::new()))
        } else {
            Err(StepError::permanent(format!(
                "assertion failed: {} (condition rendered to {})",
                params.message.as_deref().unwrap_or("condition is not true"),
                params.condition
            )))
        }
    }

    async fn apply(
        &self,
        _cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        Ok(Map::new().into())
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
