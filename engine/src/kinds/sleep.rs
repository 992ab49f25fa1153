use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::duration::HumanDuration;
use crate::kind::*;

/// Waits for a duration (a soak time between changes, or a drill).
pub struct Sleep;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    duration: HumanDuration,
}

static SPEC: KindSpec = KindSpec {
    name: "sleep",
    summary: "Waits for `duration`; cancelled at once by a second Ctrl-C.",
    params: &[ParamSpec::required(
        "duration",
        ValueType::Duration,
        "how long to wait, e.g. `30s`",
    )],
    outputs: OutputsSpec::Fixed(&[]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Sleep {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let params: Params = cx.params()?;
        Ok(StepPlan::change(Change::Action {
            summary: format!("wait {}", params.duration),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let params: Params = cx.params()?;
        tokio::select! {
            _ = tokio::time::sleep(params.duration.0) => Ok(Map::new().into()),
            _ = cx.cancel.cancelled() => Err(StepError::permanent("cancelled")),
        }
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
