//! The HTTP layer: routing by surface (control, token, ARM, Key Vault), authentication,
//! fault injection, the request log and the headers Azure sends with every answer.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use axum::body::Bytes;
use axum::extract::State;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, Uri};
use axum::response::{IntoResponse, Response};
use serde::Serialize;
use serde_json::{Value, json};
use tokio::sync::oneshot;

use crate::addressing::Addressing;
use crate::auth::{ARM_AUDIENCE, Caller, TokenIssuer};
use crate::faults::{Faults, Injector, Lie, LieAnswer, Loss, Verdict};
use crate::world::{Req, Resp, World};

/// How to start a sandbox.
#[derive(Debug, Clone)]
pub struct SandboxOptions {
    pub subscription: String,
    pub tenant: String,
    /// The caller's object id, as the token's `oid` claim carries it.
    pub caller_object_id: String,
    pub faults: Faults,
    /// The managed-identity endpoint's secret (`IDENTITY_HEADER`); random when `None`.
    pub identity_header: Option<String>,
    /// A file the world is loaded from at start (if it exists) and saved to after every
    /// write, so a killed client can resume against the same world.
    pub persist: Option<std::path::PathBuf>,
    /// Serve https with a certificate made for this run, on Azure's host shapes (see
    /// [`Addressing`]); plain http on `127.0.0.1` without.
    pub tls: bool,
}

impl Default for SandboxOptions {
    fn default() -> Self {
        SandboxOptions {
            subscription: "00000000-0000-4000-8000-5a4db0c5ab0c".into(),
            tenant: "00000000-0000-4000-8000-7e4a47000001".into(),
            caller_object_id: "00000000-0000-4000-8000-ca11e4000001".into(),
            faults: Faults::default(),
            identity_header: None,
            persist: None,
            tls: false,
        }
    }
}

/// One request the sandbox served.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct RequestRecord {
    pub method: String,
    pub path: String,
    pub status: u16,
    /// Milliseconds since the sandbox started.
    pub at_ms: u64,
    /// Whether the request asked for a change (PUT, PATCH, POST, DELETE).
    pub write: bool,
    /// Set when the request was applied and its answer then lost (`reset`, `server_error`,
    /// `timeout`): the client never learnt that its change was made.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lost: Option<&'static str>,
    /// Set when something other than Azure answered (`lies`): the request reached no
    /// resource (a read's real answer may have been damaged on the way back).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub lie: Option<&'static str>,
    /// The request's body, when it had one (tests look for secrets that must not travel).
    #[serde(skip)]
    pub body: Option<String>,
}

struct Shared {
    world: Mutex<World>,
    injector: Mutex<Injector>,
    issuer: TokenIssuer,
    identity_header: String,
    log: Mutex<Vec<RequestRecord>>,
    persist: Option<std::path::PathBuf>,
    started: Instant,
    subscription: String,
    holds: crate::hold::Holds,
    addressing: Addressing,
}

/// A running sandbox. Dropping it stops the server.
pub struct Sandbox {
    address: SocketAddr,
    /// The authority's certificate (PEM) when serving https.
    ca_pem: Option<String>,
    shared: Arc<Shared>,
    stop: Option<oneshot::Sender<()>>,
}

impl Sandbox {
    /// Binds 127.0.0.1 on a free port and serves in the background of the current runtime.
    pub async fn start(options: SandboxOptions) -> std::io::Result<Sandbox> {
        let listener = tokio::net::TcpListener::bind(("127.0.0.1", 0)).await?;
        Sandbox::serve(listener, options)
    }

    /// Serves on a listener bound by the caller (so its address is known before the runtime
    /// starts, as `kmsflow run --sandbox` needs).
    pub fn serve(
        listener: tokio::net::TcpListener,
        options: SandboxOptions,
    ) -> std::io::Result<Sandbox> {
        let address: SocketAddr = listener.local_addr()?;
        let addressing = if options.tls {
            Addressing::Hosts {
                port: address.port(),
            }
        } else {
            Addressing::Paths {
                origin: format!("http://{address}"),
            }
        };
        let certificates = options
            .tls
            .then(|| {
                crate::tls::Certificates::generate(&[
                    crate::addressing::ARM_HOST.to_owned(),
                    format!("*{}", crate::addressing::VAULT_SUFFIX),
                ])
            })
            .transpose()
            .map_err(std::io::Error::other)?;
        let issuer = TokenIssuer::new(Caller {
            object_id: options.caller_object_id.clone(),
            tenant_id: options.tenant.clone(),
        });
        let mut world = World::new(
            addressing.clone(),
            options.subscription.clone(),
            options.tenant.clone(),
            options.caller_object_id.clone(),
            options.faults.delays,
        );
        world.configure(&options.faults);
        if let Some(path) = options.persist.as_ref().filter(|p| p.exists()) {
            let invalid = |e: String| {
                std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("sandbox world `{}`: {e}", path.display()),
                )
            };
            let saved: Value = serde_json::from_str(&std::fs::read_to_string(path)?)
                .map_err(|e| invalid(e.to_string()))?;
            world.restore(saved).map_err(|e| invalid(e.to_string()))?;
        }
        let shared = Arc::new(Shared {
            world: Mutex::new(world),
            injector: Mutex::new(Injector::new(options.faults)),
            issuer,
            identity_header: options
                .identity_header
                .clone()
                .unwrap_or_else(|| uuid::Uuid::new_v4().simple().to_string()),
            log: Mutex::new(Vec::new()),
            persist: options.persist.clone(),
            started: Instant::now(),
            subscription: options.subscription,
            holds: crate::hold::Holds::start(),
            addressing,
        });
        let router = axum::Router::new()
            .fallback(handle)
            .with_state(shared.clone())
            .into_make_service_with_connect_info::<crate::tls::Transport>();
        let listener = crate::tls::Listener::new(listener, certificates.as_ref())?;
        let (stop, stopped) = oneshot::channel::<()>();
        tokio::spawn(async move {
            let _ = axum::serve(listener, router)
                .with_graceful_shutdown(async {
                    let _ = stopped.await;
                })
                .await;
        });
        Ok(Sandbox {
            address,
            ca_pem: certificates.map(|c| c.ca_pem),
            shared,
            stop: Some(stop),
        })
    }

    /// Resource Manager's endpoint: `http://127.0.0.1:PORT`, or with TLS
    /// `https://management.sandbox.localhost:PORT`.
    pub fn base_url(&self) -> String {
        self.shared.addressing.arm_endpoint()
    }

    /// `http://127.0.0.1:PORT`: the control endpoints (`/_sandbox/...`) and the token
    /// endpoint answer plain http on it, with or without TLS.
    pub fn control_url(&self) -> String {
        format!("http://{}", self.address)
    }

    /// The loopback address the sandbox listens on.
    pub fn address(&self) -> SocketAddr {
        self.address
    }

    /// How the sandbox's surfaces are addressed.
    pub fn addressing(&self) -> &Addressing {
        &self.shared.addressing
    }

    /// The certificate authority to trust (PEM), when serving https.
    pub fn ca_pem(&self) -> Option<&str> {
        self.ca_pem.as_deref()
    }

    pub fn subscription(&self) -> &str {
        &self.shared.subscription
    }

    /// The environment a client needs, as `serve` prints it.
    pub fn env(&self) -> Vec<(String, String)> {
        let world = self.shared.world.lock().expect("world lock");
        vec![
            ("AZURE_SUBSCRIPTION_ID".into(), world.subscription.clone()),
            ("AZURE_TENANT_ID".into(), world.tenant.clone()),
            (
                "IDENTITY_ENDPOINT".into(),
                format!("{}/msi/token", self.control_url()),
            ),
            (
                "IDENTITY_HEADER".into(),
                self.shared.identity_header.clone(),
            ),
        ]
    }

    /// Every request served so far.
    pub fn requests(&self) -> Vec<RequestRecord> {
        self.shared.log.lock().expect("log lock").clone()
    }

    /// The world as JSON.
    pub fn world(&self) -> Value {
        self.shared.world.lock().expect("world lock").dump()
    }

    /// Saves the world to its persist file now (after seeding, say), if it has one.
    pub fn save(&self) {
        if let Some(path) = &self.shared.persist {
            save(path, &self.shared.world.lock().expect("world lock").save());
        }
    }

    /// Replaces the fault configuration.
    pub fn set_faults(&self, faults: Faults) {
        self.shared
            .world
            .lock()
            .expect("world lock")
            .configure(&faults);
        *self.shared.injector.lock().expect("injector lock") = Injector::new(faults);
    }

    /// Changes the world directly (seeding existing resources).
    pub fn with_world<R>(&self, change: impl FnOnce(&mut WorldHandle<'_>) -> R) -> R {
        let mut world = self.shared.world.lock().expect("world lock");
        change(&mut WorldHandle { world: &mut world })
    }
}

impl Drop for Sandbox {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

/// Seeding access to the world.
pub struct WorldHandle<'a> {
    world: &'a mut World,
}

impl WorldHandle<'_> {
    pub fn resource_group(&mut self, name: &str, location: &str) {
        self.world.seed_group(name, location);
    }

    /// Adds a resource (its body must carry `id`), as if created long ago.
    pub fn resource(&mut self, body: Value) {
        self.world.seed_resource(body);
    }

    pub fn feature_registered(&mut self, namespace: &str, feature: &str) {
        self.world.seed_feature_registered(namespace, feature);
    }

    /// Lets the caller see `subscription` too (`GET /subscriptions` lists it).
    pub fn visible_subscription(&mut self, subscription: &str) {
        if !self.world.has_subscription(subscription) {
            self.world.other_subscriptions.push(subscription.to_owned());
        }
    }

    /// Items per page of a list.
    pub fn list_page_size(&mut self, size: usize) {
        self.world.list_page_size = size.max(1);
    }

    /// Adds a key with one version to a seeded vault; returns the versionless key id.
    pub fn key(&mut self, vault: &str, key: &str) -> Option<String> {
        self.world.seed_key(vault, key)
    }

    /// Adds a key version with the given attributes (`created`, `exp`, `enabled`, as Unix
    /// seconds and booleans); returns the versionless key id.
    pub fn key_with(&mut self, vault: &str, key: &str, attributes: Value) -> Option<String> {
        self.world.seed_key_with(vault, key, &attributes)
    }

    /// Gives a key a rotation policy.
    pub fn rotation_policy(&mut self, vault: &str, key: &str, policy: Value) {
        self.world.seed_rotation_policy(vault, key, policy);
    }

    /// Adds a role assignment (a role definition GUID) that has long propagated.
    pub fn role_assignment(&mut self, scope: &str, principal: &str, role: &str) {
        self.world.seed_assignment(scope, principal, role);
    }

    /// A vault's `vaultUri` (with its trailing slash), as the sandbox writes it.
    pub fn vault_uri(&self, vault: &str) -> String {
        self.world.addressing.vault_uri(vault)
    }

    /// The sandbox's subscription.
    pub fn subscription(&self) -> &str {
        &self.world.subscription
    }
}

fn parse_query(query: Option<&str>) -> BTreeMap<String, String> {
    query
        .unwrap_or_default()
        .split('&')
        .filter(|pair| !pair.is_empty())
        .map(|pair| {
            let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
            (decode(key), decode(value))
        })
        .collect()
}

fn decode(text: &str) -> String {
    let bytes = text.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut index = 0;
    while index < bytes.len() {
        match bytes[index] {
            b'+' => out.push(b' '),
            b'%' if index + 2 < bytes.len() => {
                let hex = |b: u8| (b as char).to_digit(16);
                match (hex(bytes[index + 1]), hex(bytes[index + 2])) {
                    (Some(high), Some(low)) => {
                        out.push((high * 16 + low) as u8);
                        index += 2;
                    }
                    _ => out.push(b'%'),
                }
            }
            other => out.push(other),
        }
        index += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

fn to_response(resp: Resp, extra: &[(String, String)]) -> Response {
    let status = StatusCode::from_u16(resp.status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
    let mut response = match resp.body {
        Some(body) => (status, axum::Json(body)).into_response(),
        None => status.into_response(),
    };
    for (name, value) in resp.headers.iter().chain(extra) {
        if let (Ok(name), Ok(value)) = (
            HeaderName::try_from(name.as_str()),
            HeaderValue::from_str(value),
        ) {
            response.headers_mut().insert(name, value);
        }
    }
    response
}

/// An answer whose connection breaks after the status line: the body starts, then the stream
/// fails, so hyper closes the connection before the message is complete.
fn broken_answer(status: u16) -> Response {
    let parts: [Result<Bytes, std::io::Error>; 2] = [
        Ok(Bytes::from_static(b"{\"id\":")),
        Err(std::io::Error::new(
            std::io::ErrorKind::ConnectionReset,
            "connection reset after the request was applied (injected)",
        )),
    ];
    let mut response = Response::new(axum::body::Body::from_stream(futures::stream::iter(parts)));
    *response.status_mut() = StatusCode::from_u16(status).unwrap_or(StatusCode::OK);
    response
}

async fn handle(
    State(shared): State<Arc<Shared>>,
    axum::extract::ConnectInfo(transport): axum::extract::ConnectInfo<crate::tls::Transport>,
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
) -> Response {
    // Latency counts from the request's arrival: the answer leaves `latency` after it came in,
    // however long the handling took, as a configured round trip should.
    let arrived = Instant::now();
    let host = headers
        .get(axum::http::header::HOST)
        .and_then(|v| v.to_str().ok())
        .or_else(|| uri.authority().map(|a| a.as_str()))
        .unwrap_or_default()
        .to_owned();
    let origin = format!("{}://{host}", if transport.tls { "https" } else { "http" });
    // A vault's own host name carries Key Vault's paths; inside, vaults are `/_kv/{vault}/...`
    // whichever way they were reached, so the handlers and the request log see one form.
    let path = match shared.addressing.vault_of_host(&host) {
        Some(vault) => format!("/_kv/{vault}{}", uri.path()),
        None => uri.path().to_owned(),
    };
    let method = method.as_str().to_owned();
    let write = method != "GET" && method != "HEAD";
    let correlation = headers
        .get("x-ms-correlation-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    let mut extra = vec![
        (
            "x-ms-request-id".to_owned(),
            uuid::Uuid::new_v4().to_string(),
        ),
        ("x-ms-correlation-request-id".to_owned(), correlation),
    ];
    let mut hold = std::time::Duration::ZERO;
    let mut lost: Option<Loss> = None;
    let mut lie: Option<Lie> = None;
    let response = if path.starts_with("/_sandbox/") {
        control(&shared, &method, &path, &body)
    } else if path == "/msi/token" {
        token(&shared, &uri, &headers)
    } else if path.eq_ignore_ascii_case("/metadata/endpoints") {
        // ARM serves its cloud's metadata to anyone: clients read it before they have a token.
        metadata_endpoints(&shared.addressing)
    } else {
        let vault = path.starts_with("/_kv/");
        let vault_audience = shared.addressing.vault_audience();
        let audience = if vault {
            vault_audience.as_str()
        } else {
            ARM_AUDIENCE
        };
        let authorization = headers.get("authorization").and_then(|v| v.to_str().ok());
        let now = chrono::Utc::now().timestamp();
        match shared.issuer.check(authorization, audience, now) {
            Err(error) => {
                let resp = if vault {
                    // Key Vault's envelope: the AKV code leads the message, no inner error.
                    let message = match error {
                        crate::auth::TokenError::Missing => {
                            "AKV10000: Request is missing a Bearer or PoP token.".to_owned()
                        }
                        other => format!("AKV10000: {other}"),
                    };
                    Resp::vault_error(401, "Unauthorized", None, message)
                } else {
                    Resp::arm_error(
                        401,
                        if matches!(error, crate::auth::TokenError::Expired) {
                            "ExpiredAuthenticationToken"
                        } else {
                            "InvalidAuthenticationToken"
                        },
                        error.to_string(),
                    )
                };
                extra.push((
                    "WWW-Authenticate".into(),
                    format!("Bearer authorization=\"https://login.windows.net/{}\", resource=\"{audience}\"", shared.issuer.caller.tenant_id),
                ));
                resp
            }
            Ok(claims) => {
                let subscription = (!vault)
                    .then(|| path.split('/').nth(2).map(str::to_owned))
                    .flatten();
                let (latency, (verdict, quota)) = {
                    let mut injector = shared.injector.lock().expect("injector lock");
                    let latency = injector.latency(write);
                    let judged = injector.judge(&method, &path, subscription.as_deref(), write);
                    if judged.0 == Verdict::Pass {
                        lie = injector.lie(&method, &path);
                        if lie.is_none() {
                            lost = injector.loss(&method, &path);
                        }
                    }
                    (latency, judged)
                };
                // The answer is held back after the world changed, as Azure's would be: a
                // client that gives up (or dies) meanwhile has still made its change.
                hold = latency;
                // ARM reports the bucket the request drew from: reads on a read, writes on a
                // write (fidelity audit, row 21).
                if !vault && write {
                    extra.push((
                        "x-ms-ratelimit-remaining-subscription-writes".into(),
                        quota.writes.unwrap_or(199).to_string(),
                    ));
                } else if !vault {
                    extra.push((
                        "x-ms-ratelimit-remaining-subscription-reads".into(),
                        quota.reads.unwrap_or(249).to_string(),
                    ));
                }
                match verdict {
                    Verdict::Fail {
                        status,
                        code,
                        message,
                        retry_after_s,
                    } => {
                        if let Some(after) = retry_after_s {
                            extra.push(("Retry-After".into(), after.to_string()));
                        }
                        if vault {
                            Resp::vault_error(status, &code, None, message)
                        } else {
                            Resp::arm_error(status, &code, message)
                        }
                    }
                    Verdict::Pass => {
                        let parsed: Option<Value> = if body.is_empty() {
                            None
                        } else {
                            serde_json::from_slice(&body).ok()
                        };
                        let reaches_azure = lie.as_ref().is_none_or(|lie| {
                            method == "GET"
                                && matches!(
                                    lie.answer,
                                    LieAnswer::Truncated
                                        | LieAnswer::Foreign
                                        | LieAnswer::NextLinkLoop
                                )
                        });
                        if !reaches_azure {
                            // A gateway answers; Azure never sees the request.
                            Resp::empty(200)
                        } else if !body.is_empty() && parsed.is_none() {
                            Resp::arm_error(
                                400,
                                "InvalidRequestContent",
                                "The request content was invalid and could not be deserialized.",
                            )
                        } else {
                            let raw_segments: Vec<String> =
                                path.trim_matches('/').split('/').map(decode).collect();
                            let req = Req {
                                method: method.clone(),
                                path: path.clone(),
                                segments: raw_segments
                                    .iter()
                                    .map(|s| s.to_ascii_lowercase())
                                    .collect(),
                                raw_segments,
                                query: parse_query(uri.query()),
                                if_match: headers
                                    .get("if-match")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned),
                                if_none_match: headers
                                    .get("if-none-match")
                                    .and_then(|v| v.to_str().ok())
                                    .map(str::to_owned),
                                body: parsed,
                                caller: claims["oid"].as_str().unwrap_or_default().to_owned(),
                                origin: origin.clone(),
                            };
                            let mut world = shared.world.lock().expect("world lock");
                            let answer = if vault {
                                let caller = req.caller.clone();
                                world.key_vault(&req, &caller)
                            } else {
                                world.arm(&req)
                            };
                            if write && let Some(path) = &shared.persist {
                                save(path, &world.save());
                            }
                            answer
                        }
                    }
                }
            }
        }
    };
    // The request has taken effect; now its answer may be lost on the way back.
    let response = match lost {
        Some(Loss::ServerError) => {
            if path.starts_with("/_kv/") {
                Resp::vault_error(
                    500,
                    "InternalServerError",
                    None,
                    "The server had an error after the request was processed (injected).",
                )
            } else {
                Resp::arm_error(
                    500,
                    "InternalServerError",
                    "The server had an error after the request was processed (injected).",
                )
            }
        }
        Some(Loss::Timeout { hold_ms }) => {
            hold = hold.max(std::time::Duration::from_millis(hold_ms));
            response
        }
        Some(Loss::Reset) | None => response,
    };
    let status = lie
        .as_ref()
        .map_or(response.status, |lie| lie_status(lie, response.status));
    if !path.starts_with("/_sandbox/") {
        // Logged when handled, before the answer is held back: a request whose client died
        // during the hold still counts.
        shared.log.lock().expect("log lock").push(RequestRecord {
            method,
            path,
            status,
            at_ms: shared.started.elapsed().as_millis() as u64,
            write,
            lost: lost.map(Loss::as_str),
            lie: lie.as_ref().map(|l| l.answer.as_str()),
            body: (!body.is_empty()).then(|| String::from_utf8_lossy(&body).into_owned()),
        });
    }
    if !hold.is_zero() {
        shared.holds.until(arrived + hold).await;
    }
    if lost == Some(Loss::Reset) {
        return broken_answer(response.status);
    }
    if let Some(lie) = &lie {
        let own_url = format!(
            "{origin}{}",
            uri.path_and_query().map(|p| p.as_str()).unwrap_or("/")
        );
        return lying_answer(lie, response, &own_url);
    }
    to_response(response, &extra)
}

/// The status a lie answers with.
fn lie_status(lie: &Lie, real: u16) -> u16 {
    match lie.answer {
        LieAnswer::Html404 => 404,
        LieAnswer::Redirect => lie.status.unwrap_or(307),
        LieAnswer::Truncated | LieAnswer::Foreign | LieAnswer::NextLinkLoop => real,
        LieAnswer::Empty200 | LieAnswer::Html200 | LieAnswer::Oversized => 200,
    }
}

/// What a gateway in front of Azure sends instead of (or made of) Azure's answer `real`.
fn lying_answer(lie: &Lie, real: Resp, own_url: &str) -> Response {
    let status = StatusCode::from_u16(lie_status(lie, real.status)).unwrap_or(StatusCode::OK);
    let html = |title: &str| {
        format!(
            "<html>\r\n<head><title>{title}</title></head>\r\n<body>\r\n<center><h1>{title}</h1></center>\r\n<hr><center>nginx</center>\r\n</body>\r\n</html>\r\n"
        )
    };
    let text_html = [(axum::http::header::CONTENT_TYPE, "text/html")];
    match lie.answer {
        LieAnswer::Html404 => (status, text_html, html("404 Not Found")).into_response(),
        LieAnswer::Html200 => (status, text_html, html("Sign in to continue")).into_response(),
        LieAnswer::Empty200 => status.into_response(),
        LieAnswer::Redirect => {
            let location = lie.location.clone().unwrap_or_else(|| own_url.to_owned());
            (status, [(axum::http::header::LOCATION, location)]).into_response()
        }
        LieAnswer::Oversized => {
            let size = lie.bytes.unwrap_or(64 << 20);
            // Streamed in 64 KiB pieces, so the sandbox never holds it whole.
            let piece = Bytes::from(vec![b' '; 64 << 10]);
            let count = size.div_ceil(piece.len());
            let stream = futures::stream::iter(
                (0..count).map(move |_| Ok::<_, std::io::Error>(piece.clone())),
            );
            let mut response = Response::new(axum::body::Body::from_stream(stream));
            *response.status_mut() = status;
            response
        }
        LieAnswer::Truncated => {
            let text = real.body.map(|b| b.to_string()).unwrap_or_default();
            let cut = text.len() / 2;
            let cut = (0..=cut)
                .rev()
                .find(|i| text.is_char_boundary(*i))
                .unwrap_or(0);
            (
                status,
                [(axum::http::header::CONTENT_TYPE, "application/json")],
                text[..cut].to_owned(),
            )
                .into_response()
        }
        LieAnswer::Foreign => {
            let mut body = real.body.unwrap_or(Value::Null);
            if let Some(id) = body["id"].as_str() {
                let other = match id.rsplit_once('/') {
                    Some((parent, _)) => format!("{parent}/someone-elses"),
                    None => "/someone-elses".to_owned(),
                };
                body["id"] = json!(other);
                body["name"] = json!("someone-elses");
            }
            (status, axum::Json(body)).into_response()
        }
        LieAnswer::NextLinkLoop => {
            let mut body = real.body.unwrap_or(Value::Null);
            if body.is_object() {
                body["nextLink"] = json!(own_url);
            }
            (status, axum::Json(body)).into_response()
        }
    }
}

fn control(shared: &Shared, method: &str, path: &str, body: &Bytes) -> Resp {
    match (method, path) {
        ("GET", "/_sandbox/world") => {
            Resp::json(200, shared.world.lock().expect("world lock").dump())
        }
        ("GET", "/_sandbox/requests") => {
            Resp::json(200, json!(*shared.log.lock().expect("log lock")))
        }
        ("POST", "/_sandbox/faults") => match Faults::from_yaml(&String::from_utf8_lossy(body)) {
            Ok(faults) => {
                shared.world.lock().expect("world lock").configure(&faults);
                *shared.injector.lock().expect("injector lock") = Injector::new(faults);
                Resp::empty(204)
            }
            Err(error) => Resp::arm_error(400, "InvalidFaults", error.to_string()),
        },
        ("POST", "/_sandbox/tokens/check") => check_token(shared, body),
        _ => Resp::arm_error(
            404,
            "NotFound",
            format!("no sandbox control endpoint {method} {path}"),
        ),
    }
}

/// `POST /_sandbox/tokens/check` with `{"token", "audience"}`: whether this sandbox minted
/// the token, for that audience, and it has not expired; the claims (200) or why not (401).
/// For a service that takes Entra tokens other than in an `Authorization` header and that
/// the sandbox does not serve itself: Azure Database for PostgreSQL takes one as a password,
/// and a test's stand-in for that server checks it here, as the real one checks Entra's
/// signature, audience and expiry.
fn check_token(shared: &Shared, body: &Bytes) -> Resp {
    let asked: Value = match serde_json::from_slice(body) {
        Ok(asked) => asked,
        Err(error) => return Resp::arm_error(400, "InvalidRequest", error.to_string()),
    };
    let (Some(token), Some(audience)) = (asked["token"].as_str(), asked["audience"].as_str())
    else {
        return Resp::arm_error(400, "InvalidRequest", "give `token` and `audience`");
    };
    let header = format!("Bearer {token}");
    match shared.issuer.check(
        Some(&header),
        audience.trim_end_matches('/'),
        chrono::Utc::now().timestamp(),
    ) {
        Ok(claims) => Resp::json(200, claims),
        Err(error) => Resp::json(401, json!({"error": error.to_string()})),
    }
}

/// `GET /metadata/endpoints`: the cloud's endpoints, in the object form `az cloud register
/// --endpoint-resource-manager` reads (api-version 2019-05-01 and earlier). Newer
/// api-versions answer an array of clouds in Azure; the sandbox answers the object form
/// whatever the version asked, because which fields the array form carries is not in the
/// references this sandbox follows.
fn metadata_endpoints(addressing: &Addressing) -> Resp {
    let vault_dns = match addressing {
        Addressing::Hosts { .. } => crate::addressing::VAULT_SUFFIX.trim_start_matches('.'),
        Addressing::Paths { .. } => "vault.azure.net",
    };
    Resp::json(
        200,
        json!({
            "name": "AzureCloud",
            "resourceManager": format!("{}/", addressing.arm_endpoint()),
            "portal": "https://portal.azure.com",
            "galleryEndpoint": "https://gallery.azure.com/",
            "graphEndpoint": "https://graph.windows.net/",
            "microsoftGraphResourceId": "https://graph.microsoft.com/",
            "authentication": {
                "loginEndpoint": "https://login.microsoftonline.com/",
                "audiences": ["https://management.core.windows.net/", "https://management.azure.com/"],
                "tenant": "common",
                "identityProvider": "AAD",
            },
            "suffixes": {
                "keyVaultDns": vault_dns,
                "storage": "core.windows.net",
                "acrLoginServer": "azurecr.io",
            },
        }),
    )
}

/// The App Service managed-identity protocol (api-version 2019-08-01): `GET
/// {IDENTITY_ENDPOINT}?api-version=...&resource=...` with the `X-IDENTITY-HEADER` secret.
fn token(shared: &Shared, uri: &Uri, headers: &HeaderMap) -> Resp {
    let query = parse_query(uri.query());
    let secret = headers
        .get("x-identity-header")
        .and_then(|v| v.to_str().ok());
    if secret != Some(shared.identity_header.as_str()) {
        return Resp::json(
            401,
            json!({"statusCode": 401, "message": "The X-IDENTITY-HEADER header is missing or wrong."}),
        );
    }
    let Some(resource) = query.get("resource").filter(|r| !r.is_empty()) else {
        return Resp::json(
            400,
            json!({"statusCode": 400, "message": "The resource query parameter is required."}),
        );
    };
    let (access_token, expires_on) = shared.issuer.mint(resource, chrono::Utc::now().timestamp());
    Resp::json(
        200,
        json!({
            "access_token": access_token,
            "expires_on": expires_on.to_string(),
            "resource": resource,
            "token_type": "Bearer",
            "client_id": shared.issuer.caller.object_id,
        }),
    )
}

/// Pre-existing resources for `--world FILE` (YAML or JSON).
#[derive(Debug, Clone, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorldSeed {
    #[serde(default)]
    pub resource_groups: Vec<SeedGroup>,
    /// Features already registered (and their providers re-registered).
    #[serde(default)]
    pub features_registered: Vec<SeedFeature>,
    /// Whole resource bodies, each with its `id` (vaults, identities, managed clusters).
    #[serde(default)]
    pub resources: Vec<Value>,
    /// Subscriptions the caller can see besides the sandbox's own (their resources may be
    /// seeded like any other).
    #[serde(default)]
    pub subscriptions: Vec<String>,
    /// Items per page of a list (default 1,000).
    #[serde(default)]
    pub list_page_size: Option<usize>,
    /// Keys (one version each) in seeded vaults.
    #[serde(default)]
    pub keys: Vec<SeedKey>,
    /// Role assignments: a role (its GUID) for a principal at a scope.
    #[serde(default)]
    pub role_assignments: Vec<SeedAssignment>,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedKey {
    pub vault: String,
    pub name: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedAssignment {
    pub scope: String,
    pub principal: String,
    pub role: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedGroup {
    pub name: String,
    pub location: String,
}

#[derive(Debug, Clone, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SeedFeature {
    pub namespace: String,
    pub feature: String,
}

impl WorldSeed {
    /// Parses a world file.
    pub fn from_yaml(text: &str) -> Result<WorldSeed, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

impl Sandbox {
    /// Adds the seed's resources to the world.
    pub fn seed(&self, seed: &WorldSeed) {
        self.with_world(|world| {
            for group in &seed.resource_groups {
                world.resource_group(&group.name, &group.location);
            }
            for feature in &seed.features_registered {
                world.feature_registered(&feature.namespace, &feature.feature);
            }
            for subscription in &seed.subscriptions {
                world.visible_subscription(subscription);
            }
            if let Some(size) = seed.list_page_size {
                world.list_page_size(size);
            }
            for resource in &seed.resources {
                world.resource(resource.clone());
            }
            for key in &seed.keys {
                world.key(&key.vault, &key.name);
            }
            for assignment in &seed.role_assignments {
                world.role_assignment(&assignment.scope, &assignment.principal, &assignment.role);
            }
        });
    }
}

/// Writes the world beside, then renames: a crash never leaves half a file.
fn save(path: &std::path::Path, world: &Value) {
    let temporary = path.with_extension("tmp");
    // Private like the state file beside it: the world holds the sandbox's keys.
    let mut options = std::fs::OpenOptions::new();
    options.write(true).create(true).truncate(true);
    #[cfg(unix)]
    std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
    let written = options
        .open(&temporary)
        .and_then(|mut file| std::io::Write::write_all(&mut file, world.to_string().as_bytes()))
        .and_then(|()| std::fs::rename(&temporary, path));
    if let Err(error) = written {
        tracing::error!(path = %path.display(), %error, "cannot save the sandbox world");
    }
}
