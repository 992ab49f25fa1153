use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value};

use crate::kind::*;

/// Fails its first `times` attempts with `message` (transiently), then succeeds: for tests and
/// drills of retry and resume. Attempts are counted across resumes.
pub struct Fail;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    #[serde(default = "always")]
    times: u32,
    #[serde(default = "default_message")]
    message: String,
}

fn always() -> u32 {
    u32::MAX
}

fn default_message() -> String {
    "failed on purpose".to_owned()
}

static SPEC: KindSpec = KindSpec {
    name: "fail",
    summary: "Fails its first `times` attempts (all of them if `times` is absent) with `message`, as a transient error; for drills.",
    params: &[
        ParamSpec::optional(
            "times",
            ValueType::Int,
            "how many attempts fail before one succeeds",
        ),
        ParamSpec::optional("message", ValueType::String, "the error message"),
    ],
    outputs: OutputsSpec::Fixed(&[]),
    may_be_irreversible: false,
};

#[async_trait]
impl StepKind for Fail {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, _cx: &StepContext<'_>) -> Result<Value, StepError> {
        Ok(Value::Null)
    }

    fn plan(&self, cx: &StepContext<'_>, _before: &Value) -> Result<StepPlan, StepError> {
        let params: Params = cx.params()?;
        Ok(StepPlan::change(Change::Action {
            summary: match params.times {
                u32::MAX => "fail".to_owned(),
                n => format!("fail the first {n} attempt(s)"),
            },
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let params: Params = cx.params()?;
        if cx.attempt <= params.times {
            return Err(StepError::transient(format!(
                "{} (attempt {})",
                params.message, cx.attempt
            )));
        }
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
