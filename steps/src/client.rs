//! The ARM and Key Vault REST client: tokens per audience from `azure_identity`, URLs built
//! only from validated segments, error envelopes parsed into [`AzureError`], bounded retries,
//! and long-running operations followed to the end.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use azure_core::credentials::TokenCredential;
use base64::Engine as _;
use reqwest::Method;
use serde_json::Value;
use tokio::sync::Mutex;
use url::Url;

use crate::cloud::CloudProfile;
use crate::error::AzureError;

/// The service a request is for: it decides the token's audience (from the cloud profile)
/// and which hosts may receive that token.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Service {
    /// Resource Manager: only its endpoint.
    ResourceManager,
    /// Key Vault's data plane: only hosts under the cloud's Key Vault suffixes (or, for the
    /// sandbox, its own loopback origin).
    KeyVault,
}

/// How kmsflow authenticates (`--auth`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AuthMode {
    /// Workload identity when its environment is set, then managed identity when its endpoint
    /// is set, then the Azure CLI.
    #[default]
    Auto,
    Cli,
    ManagedIdentity,
    WorkloadIdentity,
    /// `AZURE_TENANT_ID`, `AZURE_CLIENT_ID`, `AZURE_CLIENT_SECRET`.
    ClientSecret,
}

/// Retry bounds of the client itself (the step's own retry policy comes on top).
#[derive(Debug, Clone, Copy)]
pub struct RetryBounds {
    /// Attempts for throttling, 5xx and connection errors.
    pub transient_attempts: u32,
    /// Backoff when Azure gives no `Retry-After`.
    pub initial_backoff: Duration,
    pub max_backoff: Duration,
    /// How long to keep retrying eventual-consistency errors (`PrincipalNotFound`,
    /// `ForbiddenByRbac`, `OperationNotAllowed`).
    pub eventual_budget: Duration,
    /// The longest a long-running operation is followed.
    pub operation_timeout: Duration,
    /// The longest one request waits for its whole answer.
    pub request_timeout: Duration,
    /// The longest one request keeps retrying transient failures, `Retry-After` waits
    /// included: past it, the last error goes back to the step.
    pub retry_budget: Duration,
}

impl Default for RetryBounds {
    fn default() -> Self {
        RetryBounds {
            transient_attempts: 8,
            initial_backoff: Duration::from_secs(2),
            max_backoff: Duration::from_secs(60),
            eventual_budget: Duration::from_secs(600),
            operation_timeout: Duration::from_secs(3600),
            request_timeout: Duration::from_secs(120),
            retry_budget: Duration::from_secs(600),
        }
    }
}

/// Where and how to reach Azure.
#[derive(Debug, Clone)]
pub struct AzureConfig {
    /// The cloud's own endpoint unless a sandbox (or another endpoint) is given.
    pub arm_endpoint: Url,
    /// Token audiences and Key Vault host names.
    pub cloud: CloudProfile,
    pub auth: AuthMode,
    pub retry: RetryBounds,
    /// The largest answer read ([`DEFAULT_MAX_ANSWER_BYTES`] unless set): anything longer is
    /// an error, not a gigabyte of memory.
    pub max_answer_bytes: usize,
}

/// The largest answer the client reads by default: 32 MiB. ARM's largest answers, a list page
/// of a thousand resources, are a few MiB.
pub const DEFAULT_MAX_ANSWER_BYTES: usize = 32 << 20;

impl AzureConfig {
    /// Azure's public cloud, with Resource Manager at `arm_endpoint`. Checks the endpoint:
    /// https, except on loopback (the sandbox).
    pub fn new(arm_endpoint: &str, auth: AuthMode) -> Result<AzureConfig, AzureError> {
        AzureConfig::for_cloud(CloudProfile::public(), Some(arm_endpoint), auth)
    }

    /// A cloud's profile, with Resource Manager at `arm_endpoint` when given (a sandbox), else
    /// at the cloud's own endpoint.
    pub fn for_cloud(
        cloud: CloudProfile,
        arm_endpoint: Option<&str>,
        auth: AuthMode,
    ) -> Result<AzureConfig, AzureError> {
        let arm_endpoint = arm_endpoint.unwrap_or(&cloud.arm_endpoint).to_owned();
        let url = Url::parse(&arm_endpoint)
            .map_err(|e| AzureError::Refused(format!("`{arm_endpoint}` is not a URL: {e}")))?;
        check_scheme(&url)?;
        Ok(AzureConfig {
            arm_endpoint: url,
            cloud,
            auth,
            retry: RetryBounds::default(),
            max_answer_bytes: DEFAULT_MAX_ANSWER_BYTES,
        })
    }

    /// The token scope of `service` in this cloud.
    fn scope(&self, service: Service) -> &str {
        match service {
            Service::ResourceManager => &self.cloud.arm_scope,
            Service::KeyVault => &self.cloud.key_vault_scope,
        }
    }

    /// Refuses a URL that `service`'s token must not be sent to. Resource Manager tokens go
    /// only to the ARM endpoint. Key Vault tokens go to the cloud's vault hosts over https, or
    /// to the ARM endpoint's own origin when that is loopback (the sandbox serves vaults
    /// there); never to a host a parameter names.
    fn check_destination(&self, service: Service, url: &Url) -> Result<(), AzureError> {
        let sandbox = is_loopback(&self.arm_endpoint);
        let on_arm_origin = url.origin() == self.arm_endpoint.origin();
        let allowed = match service {
            Service::ResourceManager => on_arm_origin,
            Service::KeyVault => {
                (sandbox && on_arm_origin)
                    || (url.scheme() == "https"
                        && url
                            .host_str()
                            .is_some_and(|h| self.cloud.is_key_vault_host(h)))
            }
        };
        if allowed {
            return Ok(());
        }
        let expected = match service {
            Service::ResourceManager => format!(
                "the Resource Manager endpoint `{}`",
                self.arm_endpoint.origin().ascii_serialization()
            ),
            Service::KeyVault => format!(
                "a Key Vault host of {} ({})",
                self.cloud.name,
                self.cloud.key_vault_suffixes.join(", ")
            ),
        };
        Err(AzureError::Refused(format!(
            "refusing to send a token to `{}`: it is not {expected}",
            url.origin().ascii_serialization()
        )))
    }
}

/// Whether a host is on this machine.
fn is_loopback(url: &Url) -> bool {
    match url.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(domain)) => domain == "localhost",
        None => false,
    }
}

fn check_scheme(url: &Url) -> Result<(), AzureError> {
    if url.scheme() == "https" || (url.scheme() == "http" && is_loopback(url)) {
        Ok(())
    } else {
        Err(AzureError::Refused(format!(
            "refusing `{}`: Azure endpoints must use https (plain http only on loopback, for the sandbox)",
            url.origin().ascii_serialization()
        )))
    }
}

/// A bearer token; its `Debug` never shows it.
#[derive(Clone)]
struct Token {
    secret: String,
    expires_at: std::time::SystemTime,
}

impl std::fmt::Debug for Token {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Token(***)")
    }
}

/// Who the caller is, from the ARM token's claims.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Caller {
    pub object_id: String,
    /// `User` or `ServicePrincipal`, as role assignments want it.
    pub principal_type: String,
}

/// An answer from Azure with the headers the client acts on.
#[derive(Debug, Clone)]
pub struct ApiResponse {
    pub status: u16,
    pub body: Value,
    pub async_operation: Option<String>,
    pub location: Option<String>,
    pub retry_after: Option<Duration>,
    pub etag: Option<String>,
}

/// The client. Cheap to share (`Arc`).
pub struct AzureClient {
    http: reqwest::Client,
    config: AzureConfig,
    credential: Arc<dyn TokenCredential>,
    tokens: Mutex<Tokens>,
    pacer: crate::pacer::Pacer,
}

/// Tokens by scope, and recent failures to get one.
#[derive(Default)]
struct Tokens {
    issued: HashMap<Service, Token>,
    /// When a scope's token last could not be had, and why. The credential's own retry policy
    /// takes a minute or more to give up; without this, every step waiting behind the lock
    /// would wait that long again, and a fleet of 1,000 clusters would take a day to fail.
    refused: HashMap<Service, (std::time::Instant, String)>,
}

/// How long a failure to get a token is answered from memory before trying again. Callers
/// that were already waiting for the token when it failed get the failure too, however long
/// the credential took to give up (its own retries take over a minute against a token
/// endpoint that does not answer).
const REMEMBER_REFUSAL: Duration = Duration::from_secs(5);

/// How often a request is sent when what answers proves nothing (`AzureError::Unproven`).
const UNPROVEN_ATTEMPTS: u32 = 3;

/// How often a request asks for a token again after the credential failed (an IMDS 5xx, a
/// timeout): a blip in the middle of a 20-minute cluster operation must not fail the step.
const CREDENTIAL_ATTEMPTS: u32 = 3;

pub use kmsflow_engine::executor::MAX_RETRY_AFTER;

/// A `Retry-After` header's delay, clamped to [`MAX_RETRY_AFTER`].
/// The resource a URL names, for progress lines: its last path segment, in backquotes.
fn resource_name(url: &Url) -> String {
    let name = url
        .path_segments()
        .and_then(|mut segments| segments.rfind(|s| !s.is_empty()))
        .unwrap_or_default();
    format!("`{name}`")
}

fn retry_after_header(value: Option<String>, path: &str) -> Option<Duration> {
    let seconds = value?.trim().parse::<u64>().ok()?;
    let asked = Duration::from_secs(seconds);
    if asked > MAX_RETRY_AFTER {
        tracing::warn!(
            path,
            asked_s = seconds,
            clamped_s = MAX_RETRY_AFTER.as_secs(),
            "Retry-After is longer than kmsflow waits at once; clamped"
        );
        return Some(MAX_RETRY_AFTER);
    }
    Some(asked)
}

impl std::fmt::Debug for AzureClient {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AzureClient")
            .field("arm_endpoint", &self.config.arm_endpoint.as_str())
            .field("auth", &self.config.auth)
            .finish_non_exhaustive()
    }
}

/// Tokens for one scope from the credential a mode names: how an `auth=entra` state database
/// signs in with the same identity as the steps. Each call asks the credential (which keeps
/// its own cache); the store decides when a token is old enough to replace.
pub struct ScopedTokens {
    credential: Arc<dyn TokenCredential>,
    scope: String,
}

impl ScopedTokens {
    pub fn new(mode: AuthMode, scope: &str) -> Result<ScopedTokens, AzureError> {
        Ok(ScopedTokens {
            credential: credential_for(mode)?,
            scope: scope.to_owned(),
        })
    }

    /// A token and when it expires, or why there is none (the credential's words, which
    /// never hold a secret).
    pub async fn token(&self) -> Result<(String, std::time::SystemTime), String> {
        let access = self
            .credential
            .get_token(&[self.scope.as_str()], None)
            .await
            .map_err(|e| format!("for `{}`: {e}", self.scope))?;
        let expires_at = std::time::UNIX_EPOCH
            + Duration::from_secs(access.expires_on.unix_timestamp().max(0) as u64);
        Ok((access.token.secret().to_owned(), expires_at))
    }
}

/// The credential `mode` names (`Auto` resolved from the environment), as the client and an
/// `auth=entra` state database use it.
pub fn credential_for(mode: AuthMode) -> Result<Arc<dyn TokenCredential>, AzureError> {
    let env = |name: &str| std::env::var(name).ok().filter(|v| !v.is_empty());
    let failed = |what: &str, e: azure_core::Error| AzureError::Credential {
        scope: what.to_owned(),
        detail: e.to_string(),
    };
    let mode = match mode {
        AuthMode::Auto if env("AZURE_FEDERATED_TOKEN_FILE").is_some() => AuthMode::WorkloadIdentity,
        AuthMode::Auto if env("IDENTITY_ENDPOINT").is_some() || env("MSI_ENDPOINT").is_some() => {
            AuthMode::ManagedIdentity
        }
        AuthMode::Auto => AuthMode::Cli,
        other => other,
    };
    Ok(match mode {
        AuthMode::ManagedIdentity => azure_identity::ManagedIdentityCredential::new(None)
            .map_err(|e| failed("managed identity", e))?,
        AuthMode::WorkloadIdentity => azure_identity::WorkloadIdentityCredential::new(None)
            .map_err(|e| failed("workload identity", e))?,
        AuthMode::Cli => {
            azure_identity::AzureCliCredential::new(None).map_err(|e| failed("the Azure CLI", e))?
        }
        AuthMode::ClientSecret => {
            let (Some(tenant), Some(client), Some(secret)) = (
                env("AZURE_TENANT_ID"),
                env("AZURE_CLIENT_ID"),
                env("AZURE_CLIENT_SECRET"),
            ) else {
                return Err(AzureError::Credential {
                    scope: "client secret".into(),
                    detail: "set AZURE_TENANT_ID, AZURE_CLIENT_ID and AZURE_CLIENT_SECRET".into(),
                });
            };
            azure_identity::ClientSecretCredential::new(
                &tenant,
                client,
                azure_core::credentials::Secret::new(secret),
                None,
            )
            .map_err(|e| failed("client secret", e))?
        }
        AuthMode::Auto => unreachable!("resolved above"),
    })
}

/// Pulls `{"error": {"code", "message", "innererror": {"code"}}}` out of a body; Key Vault's
/// inner code (`ForbiddenByRbac`) is more useful than its outer one (`Forbidden`).
fn error_code_and_message(body: &Value, status: u16) -> (String, String) {
    let error = &body["error"];
    let inner = error["innererror"]["code"].as_str();
    let code = inner
        .filter(|c| !c.is_empty() && *c != "AKV10000")
        .or_else(|| error["code"].as_str())
        .map(str::to_owned)
        .unwrap_or_else(|| format!("Http{status}"));
    let message = error["message"]
        .as_str()
        .map(|m| m.replace("\r\n", " "))
        .or_else(|| body["message"].as_str().map(str::to_owned))
        .unwrap_or_else(|| "no error message in the response".to_owned());
    (code, message)
}

impl AzureClient {
    /// Builds the client and its credential; no request is sent yet.
    pub fn new(config: AzureConfig) -> Result<AzureClient, AzureError> {
        let credential = credential_for(config.auth)?;
        Self::with_credential(config, credential)
    }

    /// A client with a given credential (tests, embedding).
    pub fn with_credential(
        config: AzureConfig,
        credential: Arc<dyn TokenCredential>,
    ) -> Result<AzureClient, AzureError> {
        let mut builder = reqwest::Client::builder()
            // A 3xx is an answer to report, never a place to send the token, the body or the
            // write again (see `send_once`).
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(Duration::from_secs(10))
            .timeout(config.retry.request_timeout)
            .user_agent(concat!("kmsflow/", env!("CARGO_PKG_VERSION")));
        if let Some(route) = &config.cloud.sandbox {
            let pem = std::fs::read(&route.ca_file).map_err(|e| {
                AzureError::Refused(format!(
                    "cannot read the sandbox's certificate authority `{}`: {e}",
                    route.ca_file.display()
                ))
            })?;
            let authority = reqwest::Certificate::from_pem(&pem).map_err(|e| {
                AzureError::Refused(format!(
                    "`{}` is not a PEM certificate: {e}",
                    route.ca_file.display()
                ))
            })?;
            let resolver =
                crate::cloud::SandboxResolver::new(&config.cloud, config.arm_endpoint.host_str())
                    .expect("the profile has a sandbox route");
            builder = builder
                .add_root_certificate(authority)
                .dns_resolver(resolver);
        }
        let http = builder
            .build()
            .map_err(|e| AzureError::Refused(format!("cannot build the HTTP client: {e}")))?;
        Ok(AzureClient {
            http,
            config,
            credential,
            tokens: Mutex::new(Tokens::default()),
            pacer: crate::pacer::Pacer::default(),
        })
    }

    pub fn config(&self) -> &AzureConfig {
        &self.config
    }

    /// Which certificate authorities the client trusts, for an error about one that did not
    /// verify.
    fn trusted_authorities(&self) -> String {
        match &self.config.cloud.sandbox {
            Some(route) => format!(
                "the sandbox's CA `{}` and the system's roots",
                route.ca_file.display()
            ),
            None => "the system's root certificates".to_owned(),
        }
    }

    /// A token for `scope`, cached until five minutes before it expires. A failure is
    /// remembered for a minute: callers meanwhile get the same error at once.
    /// A token for `service`, cached until 5 minutes before it expires. `ask_again` skips a
    /// remembered failure (a request retrying after one).
    async fn token(&self, service: Service, ask_again: bool) -> Result<Token, AzureError> {
        let scope = self.config.scope(service);
        let waiting_since = std::time::Instant::now();
        let mut tokens = self.tokens.lock().await;
        let fresh_enough = std::time::SystemTime::now() + Duration::from_secs(300);
        if let Some(token) = tokens
            .issued
            .get(&service)
            .filter(|t| t.expires_at > fresh_enough)
        {
            return Ok(token.clone());
        }
        if let Some((at, detail)) = tokens.refused.get(&service)
            && !ask_again
            && (*at >= waiting_since || at.elapsed() < REMEMBER_REFUSAL)
        {
            return Err(AzureError::Credential {
                scope: scope.to_owned(),
                detail: format!(
                    "{detail} (this failure is {}s old; kmsflow asks again once it is {}s old)",
                    at.elapsed().as_secs(),
                    REMEMBER_REFUSAL.as_secs()
                ),
            });
        }
        let access = match self.credential.get_token(&[scope], None).await {
            Ok(access) => access,
            Err(error) => {
                let detail = error.to_string();
                tokens
                    .refused
                    .insert(service, (std::time::Instant::now(), detail.clone()));
                return Err(AzureError::Credential {
                    scope: scope.to_owned(),
                    detail,
                });
            }
        };
        tokens.refused.remove(&service);
        let expires_at = std::time::UNIX_EPOCH
            + Duration::from_secs(access.expires_on.unix_timestamp().max(0) as u64);
        let token = Token {
            secret: access.token.secret().to_owned(),
            expires_at,
        };
        tokens.issued.insert(service, token.clone());
        Ok(token)
    }

    /// Fetches (and caches) the ARM token.
    pub async fn warm_up(&self) -> Result<(), AzureError> {
        self.token(Service::ResourceManager, false).await.map(drop)
    }

    /// The caller's object id and principal type, from the ARM token's `oid` and `idtyp`.
    pub async fn caller(&self) -> Result<Caller, AzureError> {
        let token = self.token(Service::ResourceManager, false).await?;
        let claims = token
            .secret
            .split('.')
            .nth(1)
            .and_then(|p| {
                base64::engine::general_purpose::URL_SAFE_NO_PAD
                    .decode(p.trim_end_matches('='))
                    .ok()
            })
            .and_then(|bytes| serde_json::from_slice::<Value>(&bytes).ok())
            .ok_or_else(|| {
                AzureError::Refused(
                    "the ARM token is not a JWT; cannot tell who the caller is".into(),
                )
            })?;
        let object_id = claims["oid"]
            .as_str()
            .ok_or_else(|| AzureError::Refused("the ARM token has no `oid` claim".into()))?
            .to_owned();
        let principal_type = match claims["idtyp"].as_str() {
            Some("app") => "ServicePrincipal",
            _ if claims.get("scp").is_none() && claims.get("roles").is_some() => "ServicePrincipal",
            _ => "User",
        };
        Ok(Caller {
            object_id,
            principal_type: principal_type.to_owned(),
        })
    }

    /// An ARM URL from path segments (each percent-encoded on its own, so no value can add a
    /// segment, a query or a fragment) and an api-version.
    pub fn arm_url(&self, segments: &[&str], api_version: &str) -> Result<Url, AzureError> {
        let mut url = self.config.arm_endpoint.clone();
        push_segments(&mut url, segments)?;
        url.query_pairs_mut()
            .append_pair("api-version", api_version);
        Ok(url)
    }

    /// A Key Vault data-plane URL under the vault's own `vaultUri` (never built from a name).
    pub fn vault_url(
        &self,
        vault_uri: &str,
        segments: &[&str],
        api_version: &str,
    ) -> Result<Url, AzureError> {
        let mut url = Url::parse(vault_uri).map_err(|e| {
            AzureError::Refused(format!("the vault URI `{vault_uri}` is not a URL: {e}"))
        })?;
        check_scheme(&url)?;
        push_segments(&mut url, segments)?;
        url.query_pairs_mut()
            .append_pair("api-version", api_version);
        Ok(url)
    }

    /// One request, no retries.
    #[allow(clippy::too_many_arguments)]
    async fn send_once(
        &self,
        method: &Method,
        url: &Url,
        scope: Service,
        body: Option<&Value>,
        precondition: Precondition<'_>,
        ask_again: bool,
        proof: Proof,
    ) -> Result<ApiResponse, AzureError> {
        // Before the token is even fetched: a token never goes to another service's host.
        self.config.check_destination(scope, url)?;
        let token = self.token(scope, ask_again).await?;
        // Only Resource Manager meters by subscription; Key Vault has its own limits.
        let metered = (scope == Service::ResourceManager)
            .then(|| crate::pacer::subscription_of(url.path()).map(str::to_owned))
            .flatten();
        let write = *method != Method::GET;
        let mut slot = match &metered {
            Some(subscription) => Some(self.pacer.acquire(subscription, write).await),
            None => None,
        };
        let mut request = self
            .http
            .request(method.clone(), url.clone())
            .bearer_auth(&token.secret)
            .header("x-ms-client-request-id", uuid::Uuid::new_v4().to_string());
        request = match body {
            Some(body) => request.json(body),
            // ARM front ends want an explicit empty body on POSTs without one.
            None if *method == Method::POST => request.header("content-length", "0"),
            None => request,
        };
        match precondition {
            Precondition::None => {}
            Precondition::IfMatch(etag) => request = request.header("if-match", etag),
            Precondition::IfAbsent => request = request.header("if-none-match", "*"),
        }
        let path = url.path().to_owned();
        let response = request.send().await.map_err(|e| {
            let detail = without_url(&e);
            if e.is_connect() && detail.to_ascii_lowercase().contains("certificate") {
                // Retrying cannot make a certificate verify: say so at once, and say whom
                // kmsflow trusted.
                return AzureError::Refused(format!(
                    "{method} {path}: the TLS certificate of `{}` does not verify ({detail}); kmsflow trusted {}. \
                     A TLS-inspecting proxy needs its CA in the system's store; a `--sandbox` run needs the sandbox's own CA",
                    url.origin().ascii_serialization(),
                    self.trusted_authorities()
                ));
            }
            AzureError::Transport {
                method: method.to_string(),
                path: path.clone(),
                detail,
                // A connection never made carried no request; anything else may have.
                maybe_applied: !e.is_connect(),
            }
        })?;
        let status = response.status().as_u16();
        let header = |name: &str| {
            response
                .headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        let retry_after = retry_after_header(header("retry-after"), url.path());
        if let Some(slot) = &mut slot {
            let remaining_header = if write {
                "x-ms-ratelimit-remaining-subscription-writes"
            } else {
                "x-ms-ratelimit-remaining-subscription-reads"
            };
            let remaining = header(remaining_header).and_then(|v| v.trim().parse::<u64>().ok());
            let throttled =
                (status == 429).then_some(retry_after.unwrap_or(Duration::from_secs(1)));
            slot.observe(remaining, throttled);
        }
        let correlation_id = header("x-ms-correlation-request-id");
        let async_operation = header("azure-asyncoperation");
        let location = header("location");
        let etag = header("etag");
        let host = url.origin().ascii_serialization();
        if (300..400).contains(&status) {
            return Err(AzureError::Redirected {
                method: method.to_string(),
                path,
                host,
                status,
                location: location
                    .as_deref()
                    .map(|l| match url.join(l) {
                        Ok(to) => format!("{}{}", to.origin().ascii_serialization(), to.path()),
                        Err(_) => "an unreadable Location".to_owned(),
                    })
                    .unwrap_or_else(|| "nowhere (no Location)".to_owned()),
            });
        }
        let text = self.read_bounded(response, method, &path, &host).await?;
        let unproven = |what: String| AzureError::unproven(method.as_str(), url, status, what);
        let body: Value = if text.trim().is_empty() {
            Value::Null
        } else {
            match serde_json::from_str(&text) {
                Ok(body) => body,
                Err(_) => {
                    return Err(unproven(format!(
                        "{status} with a body that is not JSON: {}",
                        excerpt(&text)
                    )));
                }
            }
        };
        if !(200..300).contains(&status) {
            // Throttling and server errors are retried whoever sent them; any other error is
            // evidence (absent, refused) only in Azure's own envelope.
            let enveloped = body["error"]["code"].is_string() || body["code"].is_string();
            if !enveloped && status != 429 && status < 500 {
                return Err(unproven(format!(
                    "{status} without Azure's error envelope{}",
                    if body.is_null() {
                        ", and no body".to_owned()
                    } else {
                        format!(": {}", excerpt(&text))
                    }
                )));
            }
            let (code, message) = error_code_and_message(&body, status);
            return Err(AzureError::Api {
                method: method.to_string(),
                path,
                status,
                code,
                message,
                correlation_id,
                retry_after,
            });
        }
        if let Some(what) = proof.refutes(&body, url) {
            return Err(unproven(format!("{status} with {what}")));
        }
        Ok(ApiResponse {
            status,
            body,
            async_operation,
            location,
            retry_after,
            etag,
        })
    }

    /// A request with the client's retries: throttling, 5xx and connection errors a bounded
    /// number of times; eventual-consistency errors for a bounded time. `Retry-After` is
    /// always honoured.
    ///
    /// A POST (which mints a key version, rotates, registers or acts) is never sent again
    /// once it may have reached Azure: after a lost answer or a 5xx the error goes back to
    /// the step, whose next attempt observes the world and decides. Refusals that prove
    /// nothing was done (429, eventual-consistency codes, a connection never made) are
    /// retried as for any request. PUT, PATCH, DELETE and GET are idempotent and resent.
    pub async fn send(
        &self,
        method: Method,
        url: &Url,
        scope: Service,
        body: Option<&Value>,
        if_match: Option<&str>,
    ) -> Result<ApiResponse, AzureError> {
        let precondition = if_match.map_or(Precondition::None, Precondition::IfMatch);
        self.send_proven(method, url, scope, body, precondition, true, Proof::Json)
            .await
    }

    /// [`send`](Self::send), where `wait_for_rbac: false` answers `ForbiddenByRbac` at once
    /// (for a read whose denial is the caller's own lack of rights, not a grant on its way),
    /// and a successful answer must prove itself as `proof` says.
    #[allow(clippy::too_many_arguments)]
    async fn send_proven(
        &self,
        method: Method,
        url: &Url,
        scope: Service,
        body: Option<&Value>,
        precondition: Precondition<'_>,
        wait_for_rbac: bool,
        proof: Proof,
    ) -> Result<ApiResponse, AzureError> {
        let bounds = self.config.retry;
        let started = Instant::now();
        let mut transient_failures = 0u32;
        let mut unproven_answers = 0u32;
        let mut credential_failures = 0u32;
        let mut attempt = 0u32;
        loop {
            attempt += 1;
            let ask_again = credential_failures > 0;
            let error = match self
                .send_once(&method, url, scope, body, precondition, ask_again, proof)
                .await
            {
                Ok(response) => return Ok(response),
                Err(error) => error,
            };
            let retry = if let AzureError::Credential { .. } = error {
                // Nothing was sent: ask the credential again, a few times.
                credential_failures += 1;
                credential_failures < CREDENTIAL_ATTEMPTS
            } else if method == Method::POST && error.may_have_applied() {
                tracing::debug!(error = %error.summary(), "not resending a POST that may have been applied");
                false
            } else if let AzureError::Unproven { .. } = error {
                // Whatever stands in front of Azure answered for it: asked again a few times
                // (a gateway's page is usually a moment's), then reported, naming it.
                unproven_answers += 1;
                unproven_answers < UNPROVEN_ATTEMPTS.min(bounds.transient_attempts)
            } else if error.is_transient() {
                transient_failures += 1;
                transient_failures < bounds.transient_attempts
            } else if !wait_for_rbac && error.code() == Some("ForbiddenByRbac") {
                false
            } else {
                error.is_eventual() && started.elapsed() < bounds.eventual_budget
            };
            if !retry {
                return Err(error);
            }
            let backoff = bounds
                .initial_backoff
                .saturating_mul(2u32.saturating_pow(attempt.min(16) - 1))
                .min(bounds.max_backoff);
            let jittered = backoff / 2 + backoff.mul_f64(fastrand::f64() / 2.0);
            let delay = error
                .retry_after()
                .map_or(jittered, |after| after.max(jittered.min(after)));
            if started.elapsed() + delay > bounds.retry_budget.max(bounds.eventual_budget) {
                tracing::debug!(error = %error.summary(), waited_s = started.elapsed().as_secs(), "the request's retry budget is spent");
                return Err(error);
            }
            tracing::debug!(error = %error.summary(), delay_ms = delay.as_millis() as u64, "retrying Azure request");
            tokio::time::sleep(delay).await;
        }
    }

    /// GET an ARM resource: `None` only when Azure says it does not exist
    /// ([`AzureError::is_not_found`]), `Some` only when the body is that resource (its `id`
    /// names it). Anything else is an error, never "absent" or "present".
    pub async fn get(&self, url: &Url) -> Result<Option<ApiResponse>, AzureError> {
        self.read_as(url, Service::ResourceManager, Proof::Resource, true)
            .await
    }

    /// GET an ARM resource as the caller may or may not be allowed to: `ForbiddenByRbac` is
    /// returned at once instead of being waited out (a check run by an operator without a
    /// Key Vault data role must say so, not retry for ten minutes); otherwise as [`get`].
    pub async fn get_if_permitted(&self, url: &Url) -> Result<Option<ApiResponse>, AzureError> {
        self.read_as(url, Service::ResourceManager, Proof::Resource, false)
            .await
    }

    /// GET a Key Vault data-plane object (a key, its rotation policy), proven as [`get`] does:
    /// by its `id` or its key's `kid`.
    pub async fn get_in_vault(&self, url: &Url) -> Result<Option<ApiResponse>, AzureError> {
        self.read_as(url, Service::KeyVault, Proof::Resource, true)
            .await
    }

    /// One page of a list: a body with a `value` array, or an error; `None` when Azure says
    /// the scope listed does not exist.
    pub async fn get_page(&self, url: &Url) -> Result<Option<ApiResponse>, AzureError> {
        self.read_as(url, Service::ResourceManager, Proof::List, true)
            .await
    }

    /// Every item of a list, following `nextLink` (only on the ARM endpoint), bounded: a page
    /// seen twice, a page that is not a list, or more than [`MAX_PAGES`] pages stop with an
    /// error, so a partial list is never taken for the whole. `None` when Azure says the
    /// scope listed does not exist.
    pub async fn list_all(&self, first: &Url) -> Result<Option<Vec<Value>>, AzureError> {
        let mut items = Vec::new();
        let mut seen = std::collections::HashSet::new();
        let mut next = Some(first.clone());
        let mut pages = 0usize;
        while let Some(url) = next.take() {
            if !seen.insert(url.as_str().to_owned()) {
                return Err(AzureError::Refused(format!(
                    "the list at `{}` links back to a page it already gave (`{}`): it would never end; the list is incomplete, so nothing is taken from it",
                    first.path(),
                    url.path()
                )));
            }
            pages += 1;
            if pages > MAX_PAGES {
                return Err(AzureError::Refused(format!(
                    "the list at `{}` goes on past {MAX_PAGES} pages; the list is incomplete, so nothing is taken from it",
                    first.path()
                )));
            }
            let Some(page) = self.get_page(&url).await? else {
                if pages == 1 {
                    return Ok(None);
                }
                return Err(AzureError::Refused(format!(
                    "page {pages} of the list at `{}` is gone (`{}` answered not found); the list is incomplete, so nothing is taken from it",
                    first.path(),
                    url.path()
                )));
            };
            items.extend(page.body["value"].as_array().into_iter().flatten().cloned());
            match &page.body["nextLink"] {
                Value::Null => {}
                Value::String(link) if link.is_empty() => {}
                Value::String(link) => next = Some(self.trusted_link(link, "a list's nextLink")?),
                other => {
                    return Err(AzureError::unproven(
                        "GET",
                        &url,
                        page.status,
                        format!(
                            "a `nextLink` that is not a URL: {}",
                            excerpt(&other.to_string())
                        ),
                    ));
                }
            }
        }
        Ok(Some(items))
    }

    /// A GET whose answer must prove itself as `proof` says; one that does not is taken as
    /// no answer (tried again within the client's bounds, then reported).
    async fn read_as(
        &self,
        url: &Url,
        service: Service,
        proof: Proof,
        wait_for_rbac: bool,
    ) -> Result<Option<ApiResponse>, AzureError> {
        match self
            .send_proven(
                Method::GET,
                url,
                service,
                None,
                Precondition::None,
                wait_for_rbac,
                proof,
            )
            .await
        {
            Ok(response) => Ok(Some(response)),
            Err(error) if error.is_not_found() => Ok(None),
            Err(error) => Err(error),
        }
    }

    /// Reads the answer's body, at most `max_answer_bytes` of it.
    async fn read_bounded(
        &self,
        mut response: reqwest::Response,
        method: &Method,
        path: &str,
        host: &str,
    ) -> Result<String, AzureError> {
        let limit = self.config.max_answer_bytes;
        let too_large = || AzureError::TooLarge {
            method: method.to_string(),
            path: path.to_owned(),
            host: host.to_owned(),
            limit,
        };
        if response.content_length().is_some_and(|n| n > limit as u64) {
            return Err(too_large());
        }
        let mut bytes = Vec::new();
        loop {
            let chunk = response.chunk().await.map_err(|e| AzureError::Transport {
                method: method.to_string(),
                path: path.to_owned(),
                detail: without_url(&e),
                maybe_applied: true,
            })?;
            let Some(chunk) = chunk else { break };
            if bytes.len() + chunk.len() > limit {
                return Err(too_large());
            }
            bytes.extend_from_slice(&chunk);
        }
        Ok(String::from_utf8_lossy(&bytes).into_owned())
    }

    /// GET a resource and, while an operation on it is still running (a provisioning state
    /// that is not terminal), read it again until the operation ends: a resource caught
    /// `Updating` has not reached what it was asked to become. Returns it as it ended, `Failed`
    /// included (the caller decides what that means); `None` if it does not exist. Bounded by
    /// the operation timeout: "still Updating after N s".
    pub async fn get_settled(&self, url: &Url) -> Result<Option<Value>, AzureError> {
        let deadline = Instant::now() + self.config.retry.operation_timeout;
        let mut delay = Duration::from_millis(250);
        loop {
            let Some(current) = self.get(url).await? else {
                return Ok(None);
            };
            if !is_provisioning(&current.body) {
                return Ok(Some(current.body));
            }
            let state = current.body["properties"]["provisioningState"]
                .as_str()
                .unwrap_or_default()
                .to_owned();
            if Instant::now() > deadline {
                return Err(AzureError::Timeout {
                    path: url.path().to_owned(),
                    state,
                    waited_s: self.config.retry.operation_timeout.as_secs(),
                });
            }
            tracing::debug!(state = %state, "waiting for the operation on the resource to end");
            kmsflow_engine::progress::report_waiting(format!("{} {state}", resource_name(url)));
            tokio::time::sleep(current.retry_after.unwrap_or(delay)).await;
            delay = (delay * 2).min(Duration::from_secs(15));
        }
    }

    /// PUT (or PATCH) and follow the long-running operation; returns the resource as it ends,
    /// proven (see [`proven_result`](Self::proven_result)).
    pub async fn write_and_wait(
        &self,
        method: Method,
        url: &Url,
        body: &Value,
        if_match: Option<&str>,
    ) -> Result<Value, AzureError> {
        let response = self
            .send(
                method.clone(),
                url,
                Service::ResourceManager,
                Some(body),
                if_match,
            )
            .await?;
        let result = self.follow(response, url).await?;
        self.proven_result(&method, url, result).await
    }

    /// Creates a resource the step saw absent, and says whether the answer proves this request
    /// made it. `conditional` sends `If-None-Match: *` (for providers that document it, such
    /// as AKS): a 412 then means it exists, and it is this step's only if it was created
    /// after the step began (an earlier send whose answer was lost); otherwise the 412 goes
    /// back to the step, which observes again. Without it, a `201 Created` or a
    /// `systemData.createdAt` after the step began proves the creation; a `200` with an older
    /// or no creation time is an update of a resource someone else made.
    pub async fn create_and_wait(
        &self,
        url: &Url,
        body: &Value,
        conditional: bool,
    ) -> Result<(Value, Creation), AzureError> {
        let started = chrono::Utc::now();
        let precondition = if conditional {
            Precondition::IfAbsent
        } else {
            Precondition::None
        };
        let response = match self
            .send_proven(
                Method::PUT,
                url,
                Service::ResourceManager,
                Some(body),
                precondition,
                true,
                Proof::Json,
            )
            .await
        {
            Ok(response) => response,
            Err(error) if conditional && error.status() == Some(412) => {
                let Some(resource) = self.get_settled(url).await? else {
                    return Err(error);
                };
                return match created_at(&resource) {
                    Some(at) if at >= started => Ok((resource, Creation::Made)),
                    _ => Err(error),
                };
            }
            Err(error) => return Err(error),
        };
        let status = response.status;
        let result = self.follow(response, url).await?;
        let resource = self.proven_result(&Method::PUT, url, result).await?;
        let creation = match created_at(&resource) {
            _ if status == 201 => Creation::Made,
            Some(at) if at >= started => Creation::Made,
            Some(at) => Creation::Existed(format!(
                "Azure answered {status}, not 201 Created, and it was created at {} (before this step began): the create updated a resource someone else made",
                at.to_rfc3339()
            )),
            None => Creation::Existed(format!(
                "Azure answered {status}, not 201 Created, and shows no creation time: nothing proves this step made it, so it is taken as someone else's"
            )),
        };
        Ok((resource, creation))
    }

    /// What a successful PUT or PATCH made, proven: the answer when it names the resource,
    /// else the resource read back (a gateway's empty 200 proves nothing was written). A
    /// resource Azure says does not exist after the write is an error.
    async fn proven_result(
        &self,
        method: &Method,
        url: &Url,
        result: Value,
    ) -> Result<Value, AzureError> {
        if Proof::Resource.refutes(&result, url).is_none() {
            return Ok(result);
        }
        match self.get_settled(url).await? {
            Some(resource) => Ok(resource),
            None => Err(AzureError::unproven(
                method.as_str(),
                url,
                200,
                "an answer of success, but Azure says the resource does not exist".into(),
            )),
        }
    }

    /// Follows a long-running operation: `Azure-AsyncOperation`, else `Location`, else the
    /// resource's `provisioningState`; then returns the resource.
    pub async fn follow(
        &self,
        response: ApiResponse,
        resource_url: &Url,
    ) -> Result<Value, AzureError> {
        let deadline = Instant::now() + self.config.retry.operation_timeout;
        let mut delay = response.retry_after.unwrap_or(Duration::from_secs(1));
        if let Some(status_url) = &response.async_operation {
            let status_url = self.trusted(status_url)?;
            loop {
                tokio::time::sleep(delay.min(Duration::from_secs(30))).await;
                let status = self
                    .send_proven(
                        Method::GET,
                        &status_url,
                        Service::ResourceManager,
                        None,
                        Precondition::None,
                        true,
                        Proof::OperationStatus,
                    )
                    .await?;
                let state = status.body["status"]
                    .as_str()
                    .unwrap_or("InProgress")
                    .to_owned();
                match state.as_str() {
                    "Succeeded" => break,
                    "Failed" | "Canceled" | "Cancelled" => {
                        let (code, message) = error_code_and_message(&status.body, 200);
                        return Err(AzureError::OperationFailed {
                            path: resource_url.path().to_owned(),
                            status: state,
                            code,
                            message,
                            correlation_id: None,
                        });
                    }
                    _ if Instant::now() > deadline => {
                        return Err(AzureError::Timeout {
                            path: resource_url.path().to_owned(),
                            state,
                            waited_s: self.config.retry.operation_timeout.as_secs(),
                        });
                    }
                    _ => {
                        kmsflow_engine::progress::report_waiting(format!(
                            "{} operation {state}",
                            resource_name(resource_url)
                        ));
                        delay = status.retry_after.unwrap_or(delay);
                    }
                }
            }
        } else if let (Some(location), 201 | 202) = (&response.location, response.status) {
            let location = self.trusted(location)?;
            loop {
                let polled = self
                    .send(Method::GET, &location, Service::ResourceManager, None, None)
                    .await?;
                if polled.status != 202 {
                    break;
                }
                kmsflow_engine::progress::report_waiting(format!(
                    "{} operation Accepted",
                    resource_name(resource_url)
                ));
                if Instant::now() > deadline {
                    return Err(AzureError::Timeout {
                        path: resource_url.path().to_owned(),
                        state: "Accepted".into(),
                        waited_s: self.config.retry.operation_timeout.as_secs(),
                    });
                }
                tokio::time::sleep(polled.retry_after.unwrap_or(delay)).await;
                delay = polled.retry_after.unwrap_or(delay);
            }
        } else if response.status == 202 && response.body.is_null() {
            return Ok(Value::Null);
        } else if !is_provisioning(&response.body) {
            return Ok(response.body);
        }
        // Read the resource until its provisioning state is terminal.
        let Some(body) = self.get_settled(resource_url).await? else {
            return Ok(Value::Null);
        };
        match body["properties"]["provisioningState"].as_str() {
            Some(state @ ("Failed" | "Canceled")) => Err(AzureError::OperationFailed {
                path: resource_url.path().to_owned(),
                status: state.to_owned(),
                code: "ProvisioningFailed".into(),
                message: "the resource's provisioningState is not Succeeded".into(),
                correlation_id: None,
            }),
            _ => Ok(body),
        }
    }

    /// An operation's status URL from a response, only if it points at the ARM endpoint we
    /// talk to: a token must never be sent anywhere else.
    pub fn trusted(&self, status_url: &str) -> Result<Url, AzureError> {
        self.trusted_link(status_url, "an operation status URL")
    }

    /// A URL an answer gave (`what`: an operation status URL, a list's nextLink), only if it
    /// points at the ARM endpoint we talk to.
    pub fn trusted_link(&self, link: &str, what: &str) -> Result<Url, AzureError> {
        let url = Url::parse(link)
            .map_err(|e| AzureError::Refused(format!("{what} is not a URL: {e}")))?;
        if url.origin() != self.config.arm_endpoint.origin() {
            return Err(AzureError::Refused(format!(
                "refusing to follow {what} on `{}`: it is not the ARM endpoint `{}`",
                url.origin().ascii_serialization(),
                self.config.arm_endpoint.origin().ascii_serialization()
            )));
        }
        Ok(url)
    }
}

/// A conditional request's header.
#[derive(Debug, Clone, Copy)]
enum Precondition<'a> {
    None,
    /// `If-Match: <etag>`: only if it is still this version.
    IfMatch(&'a str),
    /// `If-None-Match: *`: only if it does not exist.
    IfAbsent,
}

/// Whether a create made the resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Creation {
    /// The answer proves this request made it.
    Made,
    /// It existed: the write updated it (why kmsflow thinks so).
    Existed(String),
}

/// When Azure says a resource was created: `systemData.createdAt`, or a role assignment's
/// `properties.createdOn`.
pub fn created_at(resource: &Value) -> Option<chrono::DateTime<chrono::Utc>> {
    let text = resource["systemData"]["createdAt"]
        .as_str()
        .or_else(|| resource["properties"]["createdOn"].as_str())?;
    chrono::DateTime::parse_from_rfc3339(text)
        .ok()
        .map(|at| at.with_timezone(&chrono::Utc))
}

/// What a successful answer must show before kmsflow believes it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Proof {
    /// Any JSON, or no body (a write's answer: what it made is read back and proven then).
    Json,
    /// The resource asked for: an object whose `id` (an ARM id or a Key Vault URL) or whose
    /// key's `kid` names the URL's path.
    Resource,
    /// A page of a list: an object with a `value` array.
    List,
    /// A long-running operation's status: an object with a `status` string.
    OperationStatus,
}

impl Proof {
    /// Why `body` does not prove itself as the answer to `url`, if it does not.
    fn refutes(self, body: &Value, url: &Url) -> Option<String> {
        if self == Proof::Json {
            return None;
        }
        // Everything below is asked of an object.
        if body.is_null() {
            return Some("an empty body".to_owned());
        }
        if !body.is_object() {
            return Some(format!(
                "a body that is not an object: {}",
                excerpt(&body.to_string())
            ));
        }
        match self {
            Proof::Json => None,
            Proof::Resource => {
                let named = body["id"].as_str().or_else(|| body["key"]["kid"].as_str());
                match named {
                    Some(id) if names(id, url) => None,
                    Some(id) => Some(format!(
                        "a body for `{}`, not for the resource asked",
                        excerpt(id)
                    )),
                    None => Some("a body with no `id` naming the resource asked".to_owned()),
                }
            }
            Proof::List => (!body["value"].is_array())
                .then(|| "a body with no `value` list, not a page of the list asked".to_owned()),
            Proof::OperationStatus => (!body["status"].is_string())
                .then(|| "an operation status with no `status`".to_owned()),
        }
    }
}

/// Whether `id` (an ARM id, `/subscriptions/...`, or a Key Vault URL, `https://v.../keys/k/ver`)
/// names the resource at `url`: the same path, compared as ARM compares (case-insensitively),
/// each segment encoded as the client encodes it. A key's `kid` names a version under the
/// key's URL; an ARM child id must not stand for its parent.
fn names(id: &str, url: &Url) -> bool {
    let asked = url.path().trim_end_matches('/').to_ascii_lowercase();
    match Url::parse(id) {
        // A Key Vault URL, on the vault's own origin: the object itself, or (a key's `kid`)
        // one of its versions.
        Ok(absolute) => {
            let named = absolute.path().trim_end_matches('/').to_ascii_lowercase();
            absolute.origin() == url.origin()
                && (named == asked || named.starts_with(&format!("{asked}/")))
        }
        // An ARM id: exactly the path asked, each segment encoded as the client encodes it.
        Err(_) if id.starts_with('/') => {
            let mut encoded = url.clone();
            let segments: Vec<&str> = id.trim_matches('/').split('/').collect();
            push_segments_over(&mut encoded, &segments).is_ok()
                && encoded.path().trim_end_matches('/').to_ascii_lowercase() == asked
        }
        Err(_) => false,
    }
}

/// Replaces `url`'s path with `segments`, each encoded as [`push_segments`] would.
fn push_segments_over(url: &mut Url, segments: &[&str]) -> Result<(), AzureError> {
    url.set_path("/");
    push_segments(url, segments)
}

/// How many pages a list may have: at ARM's 1,000 items a page, a million items.
pub const MAX_PAGES: usize = 1000;

/// A little of a body that proved nothing, for the error: one line, at most 80 characters.
fn excerpt(text: &str) -> String {
    let flat: String = text
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .split_whitespace()
        .collect::<Vec<_>>()
        .join(" ");
    let mut cut: String = flat.chars().take(80).collect();
    if flat.chars().count() > 80 {
        cut.push('…');
    }
    format!("`{cut}`")
}

fn is_provisioning(body: &Value) -> bool {
    body["properties"]["provisioningState"]
        .as_str()
        .is_some_and(|s| !matches!(s, "Succeeded" | "Failed" | "Canceled"))
}

fn push_segments(url: &mut Url, segments: &[&str]) -> Result<(), AzureError> {
    for segment in segments {
        if segment.is_empty() || *segment == "." || *segment == ".." {
            return Err(AzureError::Refused(format!(
                "refusing a URL path segment `{segment}`: names cannot be empty, `.` or `..`"
            )));
        }
    }
    let mut path = url
        .path_segments_mut()
        .map_err(|_| AzureError::Refused("the endpoint cannot take a path".into()))?;
    path.pop_if_empty();
    for segment in segments {
        path.push(segment);
    }
    Ok(())
}

/// reqwest's errors carry the URL, query included; keep its path only.
fn without_url(error: &reqwest::Error) -> String {
    let mut text = error.to_string();
    if let Some(url) = error.url() {
        text = text.replace(url.as_str(), url.path());
    }
    let mut source = std::error::Error::source(error);
    while let Some(cause) = source {
        text.push_str(&format!(": {cause}"));
        source = cause.source();
    }
    text
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering::SeqCst};

    use azure_core::credentials::{AccessToken, TokenRequestOptions};

    use super::*;

    /// A credential whose token endpoint is down, counting how often it was asked.
    #[derive(Debug, Default)]
    struct Refusing(AtomicUsize);

    #[async_trait::async_trait]
    impl TokenCredential for Refusing {
        async fn get_token(
            &self,
            _: &[&str],
            _: Option<TokenRequestOptions<'_>>,
        ) -> azure_core::Result<AccessToken> {
            self.0.fetch_add(1, SeqCst);
            Err(azure_core::Error::with_message(
                azure_core::error::ErrorKind::Credential,
                "the token endpoint did not answer",
            ))
        }
    }

    #[tokio::test]
    async fn a_refused_token_is_remembered_rather_than_asked_for_again_at_once() {
        let credential = Arc::new(Refusing::default());
        let config = AzureConfig::new("http://127.0.0.1:9", AuthMode::Cli).unwrap();
        let client = AzureClient::with_credential(config, credential.clone()).unwrap();
        let first = client.warm_up().await.unwrap_err().to_string();
        assert!(first.contains("did not answer"), "{first}");
        let second = client.warm_up().await.unwrap_err().to_string();
        assert!(
            second.contains("did not answer") && second.contains("kmsflow asks again"),
            "{second}"
        );
        assert_eq!(credential.0.load(SeqCst), 1, "asked once");
    }

    #[test]
    fn retry_after_is_clamped() {
        assert_eq!(
            retry_after_header(Some("86400".into()), "/x"),
            Some(MAX_RETRY_AFTER)
        );
        assert_eq!(
            retry_after_header(Some(" 7 ".into()), "/x"),
            Some(Duration::from_secs(7))
        );
        assert_eq!(retry_after_header(Some("soon".into()), "/x"), None);
    }

    #[test]
    fn endpoints_must_be_https_except_on_loopback() {
        assert!(AzureConfig::new("https://management.azure.com", AuthMode::Cli).is_ok());
        assert!(AzureConfig::new("http://127.0.0.1:8080", AuthMode::Cli).is_ok());
        assert!(AzureConfig::new("http://localhost:8080", AuthMode::Cli).is_ok());
        let refused = AzureConfig::new("http://management.example.com", AuthMode::Cli).unwrap_err();
        assert!(refused.to_string().contains("must use https"));
    }

    #[test]
    fn values_cannot_change_the_url() {
        let config = AzureConfig::new("https://management.azure.com", AuthMode::Cli).unwrap();
        let mut url = config.arm_endpoint.clone();
        push_segments(
            &mut url,
            &["subscriptions", "s", "resourceGroups", "rg/../x?y#z"],
        )
        .unwrap();
        assert_eq!(
            url.path(),
            "/subscriptions/s/resourceGroups/rg%2F..%2Fx%3Fy%23z"
        );
        assert!(url.query().is_none());
        assert!(push_segments(&mut url, &[".."]).is_err());
        assert!(push_segments(&mut url, &[""]).is_err());
    }

    #[test]
    fn key_vault_inner_codes_win() {
        let body = serde_json::json!({"error": {"code": "Forbidden", "message": "no", "innererror": {"code": "ForbiddenByRbac"}}});
        assert_eq!(error_code_and_message(&body, 403).0, "ForbiddenByRbac");
        let arm =
            serde_json::json!({"error": {"code": "PrincipalNotFound", "message": "Principal x"}});
        assert_eq!(
            error_code_and_message(&arm, 400),
            ("PrincipalNotFound".into(), "Principal x".into())
        );
    }
}
