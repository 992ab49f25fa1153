use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::kind::*;

/// Returns its `outputs`; changes nothing.
pub struct Noop;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default)]
    outputs: Map<String, Value>,
}

static SPEC: KindSpec = KindSpec {
    name: "noop",
    summary: "Returns the values given in `outputs` as its outputs; changes nothing.",
    params: &[ParamSpec::optional(
        "outputs",
        ValueType::Map,
        "values to return as the step's outputs (templates allowed)",
    )],
    outputs: OutputsSpec::KeysOf("outputs"),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Noop {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let params: Params = cx.params()?;
        Ok(StepPlan::unchanged(params.outputs))
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
