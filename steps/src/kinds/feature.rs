use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use kmsflow_engine::duration::HumanDuration;
use kmsflow_engine::kind::*;
use reqwest::Method;
use serde::Deserialize;
use serde_json::{Value, json};

use super::common::{self, SUBSCRIPTION, outputs};
use crate::azure::Azure;
use crate::client::Service;

const FEATURES_API: &str = "2021-07-01";
const PROVIDERS_API: &str = "2025-04-01";

/// Registers a preview feature, waits until it is `Registered`, then re-registers its resource
/// provider so the flag propagates. All three are safe to repeat.
pub struct Feature(pub Arc<Azure>);

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    subscription: String,
    #[serde(default = "container_service")]
    namespace: String,
    #[serde(default = "kms_feature")]
    feature: String,
    #[serde(default = "thirty_seconds")]
    poll_interval: HumanDuration,
    #[serde(default = "one_hour")]
    max_wait: HumanDuration,
}

fn one_hour() -> HumanDuration {
    HumanDuration(Duration::from_secs(3600))
}

fn container_service() -> String {
    "Microsoft.ContainerService".into()
}
fn kms_feature() -> String {
    "KMSPMKPreview".into()
}
fn thirty_seconds() -> HumanDuration {
    HumanDuration(Duration::from_secs(30))
}

/// Waits before the next check: 1 s, then doubling up to `max` (a registration that takes
/// seconds is seen in seconds; one that takes minutes costs few reads).
async fn pause(waited: &mut Duration, max: Duration) {
    let next = if waited.is_zero() {
        Duration::from_secs(1)
    } else {
        (*waited * 2).min(max)
    };
    *waited = next.min(max);
    tokio::time::sleep(*waited).await;
}

static SPEC: KindSpec = KindSpec {
    name: "azure.feature",
    summary: "Registers a preview feature (default `Microsoft.ContainerService/KMSPMKPreview`), waits until it is `Registered`, then re-registers the resource provider. A feature left `Pending` needs approval and fails the step with that explanation. Fails after `max_wait` (default 1h) with the state it last saw. Rollback leaves the feature registered (harmless, and other clusters may rely on it).",
    params: &[
        SUBSCRIPTION,
        ParamSpec::optional(
            "namespace",
            ValueType::String,
            "the resource provider (default `Microsoft.ContainerService`)",
        )
        .pattern(r"[A-Za-z]+\.[A-Za-z]+"),
        ParamSpec::optional(
            "feature",
            ValueType::String,
            "the feature (default `KMSPMKPreview`)",
        )
        .pattern("[A-Za-z0-9-]{1,100}"),
        ParamSpec::optional(
            "poll_interval",
            ValueType::Duration,
            "the longest wait between checks of the registration (default 30s; checks start at 1s and double)",
        ),
        common::MAX_WAIT,
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "state",
            description: "the feature's state (`Registered`)",
        },
        OutputSpec {
            name: "provider_state",
            description: "the provider's registration state",
        },
    ]),
    may_be_irreversible: false,
};

impl Feature {
    fn feature_url(
        client: &crate::AzureClient,
        p: &Params,
        register: bool,
    ) -> Result<url::Url, StepError> {
        let mut segments = vec![
            "subscriptions",
            &p.subscription,
            "providers",
            "Microsoft.Features",
            "providers",
            &p.namespace,
            "features",
            &p.feature,
        ];
        if register {
            segments.push("register");
        }
        Ok(client.arm_url(&segments, FEATURES_API)?)
    }

    fn provider_url(
        client: &crate::AzureClient,
        p: &Params,
        register: bool,
    ) -> Result<url::Url, StepError> {
        let mut segments = vec![
            "subscriptions",
            p.subscription.as_str(),
            "providers",
            p.namespace.as_str(),
        ];
        if register {
            segments.push("register");
        }
        Ok(client.arm_url(&segments, PROVIDERS_API)?)
    }
}

fn state(body: &Value, pointer: &str) -> String {
    body.pointer(pointer)
        .and_then(Value::as_str)
        .unwrap_or("NotRegistered")
        .to_owned()
}

#[async_trait]
impl StepKind for Feature {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let feature = common::read(&client, &Self::feature_url(&client, &p, false)?).await?;
        let provider = common::read(&client, &Self::provider_url(&client, &p, false)?).await?;
        Ok(json!({
            "state": state(&feature, "/properties/state"),
            "provider_state": state(&provider, "/registrationState"),
        }))
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let p: Params = cx.params()?;
        // Azure has written both `Registered` and `registered`.
        let registered = |v: &Value| {
            v.as_str()
                .is_some_and(|s| s.eq_ignore_ascii_case("Registered"))
        };
        if registered(&before["state"]) && registered(&before["provider_state"]) {
            return Ok(StepPlan::unchanged(outputs([
                ("state", json!("Registered")),
                ("provider_state", json!("Registered")),
            ])));
        }
        Ok(StepPlan::change(Change::Action {
            summary: format!(
                "register feature {}/{} (now {}) and re-register {}",
                p.namespace,
                p.feature,
                before["state"].as_str().unwrap_or("?"),
                p.namespace
            ),
        }))
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let p: Params = cx.params()?;
        let client = self.0.client().await?;
        let register = client
            .send(
                Method::POST,
                &Self::feature_url(&client, &p, true)?,
                Service::ResourceManager,
                None,
                None,
            )
            .await?;
        let mut current = state(&register.body, "/properties/state");
        let get = Self::feature_url(&client, &p, false)?;
        let mut waited = Duration::ZERO;
        let deadline = common::Deadline::new(p.max_wait.0);
        let feature = format!("feature {}/{}", p.namespace, p.feature);
        while !current.eq_ignore_ascii_case("Registered") {
            deadline.check(&feature, &current)?;
            if current.eq_ignore_ascii_case("Pending") {
                return Err(StepError::permanent(format!(
                    "feature {}/{} is `Pending`: it needs approval from Microsoft before it can be registered; ask for it, then run again",
                    p.namespace, p.feature
                )));
            }
            kmsflow_engine::progress::report_waiting(format!("{feature} {current}"));
            pause(&mut waited, p.poll_interval.0).await;
            current = state(&common::read(&client, &get).await?, "/properties/state");
        }
        client
            .send(
                Method::POST,
                &Self::provider_url(&client, &p, true)?,
                Service::ResourceManager,
                None,
                None,
            )
            .await?;
        let provider = Self::provider_url(&client, &p, false)?;
        let mut provider_state = state(
            &common::read(&client, &provider).await?,
            "/registrationState",
        );
        let mut waited = Duration::ZERO;
        let provider_name = format!("resource provider {}", p.namespace);
        while !provider_state.eq_ignore_ascii_case("Registered") {
            deadline.check(&provider_name, &provider_state)?;
            kmsflow_engine::progress::report_waiting(format!("{provider_name} {provider_state}"));
            pause(&mut waited, p.poll_interval.0).await;
            provider_state = state(
                &common::read(&client, &provider).await?,
                "/registrationState",
            );
        }
        Ok(outputs([
            ("state", json!("Registered")),
            ("provider_state", json!(provider_state)),
        ])
        .into())
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
