//! A sandbox, an engine with the Azure kinds, and a credential speaking the sandbox's token
//! protocol, for the step kinds' tests.

#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use azure_core::credentials::{AccessToken, Secret, TokenCredential, TokenRequestOptions};
use kmsflow_engine::executor::{ExecOptions, RunSummary, Signals};
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::progress::silent;
use kmsflow_engine::{Registry, RunbookSource, compile};
use kmsflow_sandbox::{Faults, RequestRecord, Sandbox, SandboxOptions};
use kmsflow_state::{Durability, StepRecord, Store};
use kmsflow_steps::{AuthMode, Azure, AzureClient, AzureConfig, RetryBounds};

/// Fetches tokens from the sandbox's managed-identity endpoint, as App Service's protocol
/// says. (`azure_identity`'s own credential reads the process environment, which parallel
/// tests cannot share; `tests/credential.rs` runs it alone in its own process.)
#[derive(Debug)]
pub struct SandboxCredential {
    endpoint: String,
    header: String,
    /// Overrides the audience asked for (to test wrong-audience tokens).
    pub force_resource: Option<String>,
    /// Fails this many token requests before answering (an IMDS blip).
    pub fail_first: std::sync::Arc<std::sync::atomic::AtomicUsize>,
}

#[async_trait::async_trait]
impl TokenCredential for SandboxCredential {
    async fn get_token(
        &self,
        scopes: &[&str],
        _: Option<TokenRequestOptions<'_>>,
    ) -> azure_core::Result<AccessToken> {
        let failing = self.fail_first.load(std::sync::atomic::Ordering::SeqCst);
        if failing > 0 {
            self.fail_first
                .store(failing - 1, std::sync::atomic::Ordering::SeqCst);
            return Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "the managed identity endpoint answered 503 (injected)",
            ));
        }
        let resource = self
            .force_resource
            .clone()
            .unwrap_or_else(|| scopes[0].trim_end_matches("/.default").to_owned());
        let mut url = url::Url::parse(&self.endpoint).unwrap();
        url.query_pairs_mut()
            .append_pair("api-version", "2019-08-01")
            .append_pair("resource", &resource);
        let body: serde_json::Value = reqwest::Client::new()
            .get(url)
            .header("x-identity-header", &self.header)
            .send()
            .await
            .and_then(|r| r.error_for_status())
            .map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    e.to_string(),
                )
            })?
            .json()
            .await
            .map_err(|e| {
                azure_core::Error::with_message(
                    azure_core::error::ErrorKind::Credential,
                    e.to_string(),
                )
            })?;
        let expires: i64 = body["expires_on"].as_str().unwrap().parse().unwrap();
        Ok(AccessToken::new(
            Secret::new(body["access_token"].as_str().unwrap().to_owned()),
            azure_core::time::OffsetDateTime::from_unix_timestamp(expires).unwrap(),
        ))
    }
}

pub struct Harness {
    pub sandbox: Sandbox,
    pub dir: tempfile::TempDir,
    pub engine: Engine,
}

/// Short client backoffs: the sandbox's delays are seconds, not minutes.
pub fn fast_retries() -> RetryBounds {
    RetryBounds {
        transient_attempts: 10,
        initial_backoff: Duration::from_millis(50),
        max_backoff: Duration::from_millis(500),
        eventual_budget: Duration::from_secs(30),
        operation_timeout: Duration::from_secs(60),
        ..RetryBounds::default()
    }
}

pub fn credential(sandbox: &Sandbox) -> SandboxCredential {
    let env: std::collections::HashMap<String, String> = sandbox.env().into_iter().collect();
    SandboxCredential {
        endpoint: env["IDENTITY_ENDPOINT"].clone(),
        header: env["IDENTITY_HEADER"].clone(),
        force_resource: None,
        fail_first: Default::default(),
    }
}

pub fn client(sandbox: &Sandbox, credential: SandboxCredential) -> AzureClient {
    client_with(sandbox, credential, fast_retries())
}

pub fn client_with(
    sandbox: &Sandbox,
    credential: SandboxCredential,
    retry: RetryBounds,
) -> AzureClient {
    let mut config = AzureConfig::new(&sandbox.base_url(), AuthMode::ManagedIdentity).unwrap();
    config.retry = retry;
    AzureClient::with_credential(config, Arc::new(credential)).unwrap()
}

impl Harness {
    pub async fn new(faults: Faults) -> Harness {
        Harness::with_retries(faults, fast_retries()).await
    }

    /// A harness whose client gives up on an answer after `timeout`.
    pub async fn with_request_timeout(faults: Faults, timeout: Duration) -> Harness {
        let retry = RetryBounds {
            request_timeout: timeout,
            ..fast_retries()
        };
        Harness::with_retries(faults, retry).await
    }

    pub async fn with_retries(faults: Faults, retry: RetryBounds) -> Harness {
        Harness::with_client(faults, |sandbox| {
            client_with(sandbox, credential(sandbox), retry)
        })
        .await
    }

    /// A harness whose credential fails its first `n` token requests.
    pub async fn with_flaky_credential(faults: Faults, n: usize) -> Harness {
        Harness::with_client(faults, |sandbox| {
            let credential = credential(sandbox);
            credential
                .fail_first
                .store(n, std::sync::atomic::Ordering::SeqCst);
            client_with(sandbox, credential, fast_retries())
        })
        .await
    }

    async fn with_client(faults: Faults, client: impl FnOnce(&Sandbox) -> AzureClient) -> Harness {
        let sandbox = Sandbox::start(SandboxOptions {
            faults,
            ..SandboxOptions::default()
        })
        .await
        .unwrap();
        let client = client(&sandbox);
        let mut registry = Registry::with_engine_kinds();
        kmsflow_steps::register(&mut registry, Azure::with_client(client));
        let dir = tempfile::tempdir().unwrap();
        let engine = Engine {
            registry,
            state: dir.path().join("state.db").into(),
            durability: Durability::Normal,
        };
        Harness {
            sandbox,
            dir,
            engine,
        }
    }

    /// A client of this sandbox, for what another team does out of band.
    pub fn client(&self) -> AzureClient {
        client(&self.sandbox, credential(&self.sandbox))
    }

    /// The ARM URL of `provider/kind/name` in resource group `group`.
    pub fn resource_url(
        &self,
        client: &AzureClient,
        group: &str,
        (provider, kind, name): (&str, &str, &str),
        api_version: &str,
    ) -> url::Url {
        let subscription = self.subscription();
        let segments = [
            "subscriptions",
            &subscription,
            "resourceGroups",
            group,
            "providers",
            provider,
            kind,
            name,
        ];
        client.arm_url(&segments, api_version).unwrap()
    }

    pub fn subscription(&self) -> String {
        self.sandbox.subscription().to_owned()
    }

    pub fn tenant(&self) -> String {
        self.sandbox
            .env()
            .into_iter()
            .find(|(k, _)| k == "AZURE_TENANT_ID")
            .unwrap()
            .1
    }

    /// Runs a runbook with `-p` parameters; the sandbox's subscription and tenant are passed
    /// as `subscription` and `tenant` when the runbook declares them.
    pub async fn run(&self, text: &str, params: &[(&str, &str)]) -> RunSummary {
        let compiled = compile(
            &RunbookSource::new("test.yaml", text),
            &self.engine.registry,
        )
        .unwrap_or_else(|d| panic!("{d:?}"));
        let mut cli: Vec<(String, String)> = params
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect();
        for (name, value) in [
            ("subscription", self.subscription()),
            ("tenant", self.tenant()),
        ] {
            if compiled.params.iter().any(|p| p.name == name) && !cli.iter().any(|(k, _)| k == name)
            {
                cli.push((name.into(), value));
            }
        }
        let params = bind(
            &compiled,
            &ParamSources {
                cli,
                ..Default::default()
            },
        )
        .unwrap();
        let request = RunRequest {
            runbook: Arc::new(compiled),
            runbook_ref: "test.yaml".into(),
            source: text.into(),
            params,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
        };
        launch::start(&self.engine, request).await.unwrap()
    }

    /// Resumes a run with the runbook and parameters it stored.
    pub async fn resume(&self, run_id: &str) -> RunSummary {
        let continuation = launch::Continuation {
            run_id: run_id.to_owned(),
            params: ParamSources::default(),
            allow_param_change: false,
            changed_runbook: None,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
            from: None,
            operator: "test".into(),
        };
        launch::resume(&self.engine, continuation).await.unwrap()
    }

    /// Rolls a run back with the runbook and parameters it stored.
    pub async fn rollback(&self, run_id: &str) -> RunSummary {
        let request = launch::RollbackRequest {
            run_id: run_id.to_owned(),
            params: ParamSources::default(),
            allow_param_change: false,
            progress: silent(),
            operator: "test".into(),
        };
        launch::rollback(&self.engine, request).await.unwrap()
    }

    pub fn steps(&self, run_id: &str) -> Vec<StepRecord> {
        Store::open(&self.engine.state, Durability::Normal)
            .unwrap()
            .steps(run_id)
            .unwrap()
    }

    pub fn step(&self, run_id: &str, step_id: &str) -> StepRecord {
        self.steps(run_id)
            .into_iter()
            .find(|s| s.step_id == step_id)
            .unwrap()
    }

    pub fn writes_since(&self, mark: usize) -> Vec<RequestRecord> {
        self.sandbox.requests()[mark..]
            .iter()
            .filter(|r| r.write)
            .cloned()
            .collect()
    }
}
