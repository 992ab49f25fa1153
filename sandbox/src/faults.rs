//! Fault injection: latency, throttling, server errors, per-route rules, the delays of
//! eventual consistency, and ARM's per-subscription request-rate token buckets.

use std::time::{Duration, Instant};

use serde::Deserialize;

/// The fault file's shape (`--faults FILE`, or POST `/_sandbox/faults`).
#[derive(Debug, Clone, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Faults {
    /// Seeds every random choice, so a run is reproducible.
    #[serde(default)]
    pub seed: u64,
    #[serde(default)]
    pub latency: Option<Latency>,
    #[serde(default)]
    pub throttle: Option<Throttle>,
    #[serde(default)]
    pub errors: Option<ServerErrors>,
    #[serde(default)]
    pub delays: Delays,
    /// ARM's request-rate token buckets per subscription (reads 250 burst, 25/s; writes 200
    /// burst, 10/s).
    #[serde(default)]
    pub token_buckets: bool,
    #[serde(default)]
    pub rules: Vec<Rule>,
    /// Requests that are applied and then lose their answer, as a client sees when a
    /// connection breaks, a front end fails or a timeout strikes after Azure made the change.
    #[serde(default)]
    pub lose_answers: Vec<LostAnswer>,
    /// Answers that do not come from Azure: what a gateway, a TLS-inspecting proxy or a load
    /// balancer between a client and Azure sends for it every day. The request does not reach
    /// the world (nothing is applied); a read's real answer is what `truncated`, `foreign`
    /// and `next_link_loop` damage.
    #[serde(default)]
    pub lies: Vec<Lie>,
    /// Features (`Namespace/Feature`) whose registration needs Microsoft's approval: `register`
    /// leaves them `Pending` (`approvalType: ApprovalRequired` in the features spec).
    #[serde(default)]
    pub approval_required: Vec<String>,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Latency {
    pub min_ms: u64,
    pub max_ms: u64,
    /// Extra latency for writes (PUT, PATCH, POST, DELETE), on top of the range above.
    #[serde(default)]
    pub write_ms: u64,
}

#[derive(Debug, Clone, Copy, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Throttle {
    pub probability: f64,
    #[serde(default = "one")]
    pub retry_after_s: u64,
}

fn one() -> u64 {
    1
}

#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct ServerErrors {
    pub probability: f64,
    #[serde(default = "default_statuses")]
    pub statuses: Vec<u16>,
}

fn default_statuses() -> Vec<u16> {
    vec![500, 503]
}

/// How long Azure takes to converge after a change.
#[derive(Debug, Clone, Copy, Default, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Delays {
    /// A feature stays `Registering` this long after `register`.
    #[serde(default, with = "duration_text")]
    pub feature_registration: Duration,
    /// A new identity's principal is unknown to RBAC (`PrincipalNotFound`) this long.
    #[serde(default, with = "duration_text")]
    pub principal_replication: Duration,
    /// A new role assignment takes effect on the data plane (`ForbiddenByRbac` before) after this.
    #[serde(default, with = "duration_text")]
    pub rbac_propagation: Duration,
    /// A cluster create or update runs this long.
    #[serde(default, with = "duration_text")]
    pub cluster_operation: Duration,
    /// A provider stays `Registering` this long after `register` (its POST always answers
    /// `Registering`, as the GetProvider example shows).
    #[serde(default, with = "duration_text")]
    pub provider_registration: Duration,
}

/// Fails the next `times` requests matching `method` and `path` (a `*` glob).
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Rule {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default = "one_u32")]
    pub times: u32,
    pub status: u16,
    pub code: String,
    #[serde(default)]
    pub message: Option<String>,
}

fn one_u32() -> u32 {
    1
}

/// Applies the next `times` requests matching `method` and `path` (a `*` glob), then loses
/// each one's answer as `how` says.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct LostAnswer {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default = "one_u32")]
    pub times: u32,
    pub how: Loss,
    /// With `how: timeout`: how long the answer is held back (default 150 s, past a client's
    /// two-minute timeout).
    #[serde(default = "default_timeout_hold_ms")]
    pub hold_ms: u64,
}

/// Answers the next `times` requests matching `method` and `path` (a `*` glob) with `answer`
/// instead of Azure.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(deny_unknown_fields)]
pub struct Lie {
    #[serde(default)]
    pub method: Option<String>,
    pub path: String,
    #[serde(default = "one_u32")]
    pub times: u32,
    pub answer: LieAnswer,
    /// With `answer: redirect`: where to (any URL), and the status (default 307).
    #[serde(default)]
    pub location: Option<String>,
    #[serde(default)]
    pub status: Option<u16>,
    /// With `answer: oversized`: how many bytes (default 64 MiB).
    #[serde(default)]
    pub bytes: Option<usize>,
}

/// What a lie answers.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub enum LieAnswer {
    /// nginx's HTML "404 Not Found" page, without Azure's error envelope.
    #[serde(rename = "html_404")]
    Html404,
    /// `200 OK` with no body.
    #[serde(rename = "empty_200")]
    Empty200,
    /// A gateway's HTML page with `200 OK` (a captive portal, a login page).
    #[serde(rename = "html_200")]
    Html200,
    /// The real answer of a read, cut in the middle.
    Truncated,
    /// The real answer of a read, about another resource (its `id` and `name` changed).
    Foreign,
    /// A 3xx to `location`.
    Redirect,
    /// A `200 OK` of `bytes` bytes.
    Oversized,
    /// The real answer of a list read, whose `nextLink` points back at the page itself.
    NextLinkLoop,
}

impl LieAnswer {
    /// How the request log names it.
    pub fn as_str(self) -> &'static str {
        match self {
            LieAnswer::Html404 => "html_404",
            LieAnswer::Empty200 => "empty_200",
            LieAnswer::Html200 => "html_200",
            LieAnswer::Truncated => "truncated",
            LieAnswer::Foreign => "foreign",
            LieAnswer::Redirect => "redirect",
            LieAnswer::Oversized => "oversized",
            LieAnswer::NextLinkLoop => "next_link_loop",
        }
    }
}

/// How an answer is lost after the request took effect.
#[derive(Debug, Clone, Copy, Deserialize, PartialEq, Eq)]
#[serde(rename_all = "snake_case", from = "LossName")]
pub enum Loss {
    /// The connection breaks after the status line, before the body is complete.
    Reset,
    /// A `500 InternalServerError` instead of the real answer (a front end failing late).
    ServerError,
    /// The answer is held back `hold_ms`, so the client times out first.
    Timeout { hold_ms: u64 },
}

/// `how:` as written; `hold_ms` joins it in [`Injector::loss`].
#[derive(Debug, Clone, Copy, Deserialize)]
#[serde(rename_all = "snake_case")]
enum LossName {
    Reset,
    ServerError,
    Timeout,
}

impl From<LossName> for Loss {
    fn from(name: LossName) -> Loss {
        match name {
            LossName::Reset => Loss::Reset,
            LossName::ServerError => Loss::ServerError,
            LossName::Timeout => Loss::Timeout { hold_ms: 0 },
        }
    }
}

fn default_timeout_hold_ms() -> u64 {
    150_000
}

impl Loss {
    /// How the request log names it.
    pub fn as_str(self) -> &'static str {
        match self {
            Loss::Reset => "reset",
            Loss::ServerError => "server_error",
            Loss::Timeout { .. } => "timeout",
        }
    }
}

mod duration_text {
    use std::time::Duration;

    use serde::{Deserialize, Deserializer};

    pub fn deserialize<'de, D: Deserializer<'de>>(deserializer: D) -> Result<Duration, D::Error> {
        let text = String::deserialize(deserializer)?;
        parse(&text).ok_or_else(|| serde::de::Error::custom(format!("invalid duration `{text}`")))
    }

    pub fn parse(text: &str) -> Option<Duration> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit())?;
        let number: u64 = text[..split].parse().ok()?;
        Some(match &text[split..] {
            "ms" => Duration::from_millis(number),
            "s" => Duration::from_secs(number),
            "m" => Duration::from_secs(number * 60),
            _ => return None,
        })
    }
}

impl Faults {
    /// Parses a fault file.
    pub fn from_yaml(text: &str) -> Result<Faults, serde_yaml::Error> {
        serde_yaml::from_str(text)
    }
}

/// What the injector decided for one request.
#[derive(Debug, Clone, PartialEq)]
pub enum Verdict {
    Pass,
    /// Answer with this status and ARM error code, with `Retry-After` for 429.
    Fail {
        status: u16,
        code: String,
        message: String,
        retry_after_s: Option<u64>,
    },
}

/// A token bucket: `capacity` tokens, refilled at `rate` per second.
#[derive(Debug, Clone)]
struct Bucket {
    tokens: f64,
    capacity: f64,
    rate: f64,
    last: Instant,
    /// Requests before this instant are refused again (ARM: "sending before Retry-After
    /// elapses is not processed and returns a new value").
    blocked_until: Option<Instant>,
}

impl Bucket {
    fn new(capacity: f64, rate: f64) -> Bucket {
        Bucket {
            tokens: capacity,
            capacity,
            rate,
            last: Instant::now(),
            blocked_until: None,
        }
    }

    fn refill(&mut self, now: Instant) {
        let elapsed = now.duration_since(self.last).as_secs_f64();
        self.tokens = (self.tokens + elapsed * self.rate).min(self.capacity);
        self.last = now;
    }

    /// Takes a token, or says how many whole seconds until one is there.
    fn take(&mut self, now: Instant) -> Result<(), u64> {
        self.refill(now);
        if let Some(until) = self.blocked_until {
            if now < until {
                let wait = (until - now).as_secs_f64().ceil().max(1.0) as u64;
                return Err(wait);
            }
            self.blocked_until = None;
        }
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            Ok(())
        } else {
            let wait = ((1.0 - self.tokens) / self.rate).ceil().max(1.0) as u64;
            self.blocked_until = Some(now + Duration::from_secs(wait));
            Err(wait)
        }
    }

    fn remaining(&self) -> u64 {
        self.tokens.floor().max(0.0) as u64
    }
}

/// The injector's state: the configuration, its random generator, rules' remaining counts,
/// and the buckets.
pub struct Injector {
    pub faults: Faults,
    rng: fastrand::Rng,
    remaining: Vec<u32>,
    /// How many more times each `lose_answers` entry fires.
    losses_left: Vec<u32>,
    /// How many more times each `lies` entry fires.
    lies_left: Vec<u32>,
    reads: std::collections::HashMap<String, Bucket>,
    writes: std::collections::HashMap<String, Bucket>,
}

/// Remaining-quota headers to send with an answer.
#[derive(Debug, Clone, Copy, Default)]
pub struct Quota {
    pub reads: Option<u64>,
    pub writes: Option<u64>,
}

impl Injector {
    pub fn new(faults: Faults) -> Injector {
        let remaining = faults.rules.iter().map(|r| r.times).collect();
        let losses_left = faults.lose_answers.iter().map(|l| l.times).collect();
        let lies_left = faults.lies.iter().map(|l| l.times).collect();
        Injector {
            lies_left,
            rng: fastrand::Rng::with_seed(faults.seed),
            losses_left,
            faults,
            remaining,
            reads: Default::default(),
            writes: Default::default(),
        }
    }

    /// How long to hold this request before answering.
    pub fn latency(&mut self, is_write: bool) -> Duration {
        match self.faults.latency {
            None => Duration::ZERO,
            Some(latency) => {
                let base = if latency.max_ms > latency.min_ms {
                    self.rng.u64(latency.min_ms..=latency.max_ms)
                } else {
                    latency.min_ms
                };
                Duration::from_millis(base + if is_write { latency.write_ms } else { 0 })
            }
        }
    }

    /// Whether something other than Azure answers this request, and how.
    pub fn lie(&mut self, method: &str, path: &str) -> Option<Lie> {
        let entries = self
            .faults
            .lies
            .iter()
            .map(|l| (l.method.as_deref(), &*l.path));
        let index = take_match(&mut self.lies_left, entries, method, path)?;
        Some(self.faults.lies[index].clone())
    }

    /// Whether this request, which is about to be applied, loses its answer afterwards.
    pub fn loss(&mut self, method: &str, path: &str) -> Option<Loss> {
        let entries = self
            .faults
            .lose_answers
            .iter()
            .map(|l| (l.method.as_deref(), &*l.path));
        let index = take_match(&mut self.losses_left, entries, method, path)?;
        let lost = &self.faults.lose_answers[index];
        Some(match lost.how {
            Loss::Timeout { .. } => Loss::Timeout {
                hold_ms: lost.hold_ms,
            },
            other => other,
        })
    }

    /// Decides whether an ARM or data-plane request fails before it is handled.
    pub fn judge(
        &mut self,
        method: &str,
        path: &str,
        subscription: Option<&str>,
        is_write: bool,
    ) -> (Verdict, Quota) {
        let mut quota = Quota::default();
        if self.faults.token_buckets
            && let Some(subscription) = subscription
        {
            let now = Instant::now();
            let bucket = if is_write {
                self.writes
                    .entry(subscription.to_owned())
                    .or_insert_with(|| Bucket::new(200.0, 10.0))
            } else {
                self.reads
                    .entry(subscription.to_owned())
                    .or_insert_with(|| Bucket::new(250.0, 25.0))
            };
            let taken = bucket.take(now);
            let remaining = bucket.remaining();
            if is_write {
                quota.writes = Some(remaining);
            } else {
                quota.reads = Some(remaining);
            }
            if let Err(wait) = taken {
                return (
                    Verdict::Fail {
                        status: 429,
                        code: "TooManyRequests".into(),
                        message: format!(
                            "The request is being throttled: the subscription's {} quota is exhausted. Retry after {wait} seconds.",
                            if is_write { "write" } else { "read" }
                        ),
                        retry_after_s: Some(wait),
                    },
                    quota,
                );
            }
        }
        let rules = self
            .faults
            .rules
            .iter()
            .map(|r| (r.method.as_deref(), &*r.path));
        if let Some(index) = take_match(&mut self.remaining, rules, method, path) {
            let rule = &self.faults.rules[index];
            return (
                Verdict::Fail {
                    status: rule.status,
                    code: rule.code.clone(),
                    message: rule
                        .message
                        .clone()
                        .unwrap_or_else(|| default_message(&rule.code)),
                    retry_after_s: (rule.status == 429).then_some(1),
                },
                quota,
            );
        }
        if let Some(throttle) = self.faults.throttle
            && self.rng.f64() < throttle.probability
        {
            return (
                Verdict::Fail {
                    status: 429,
                    code: "TooManyRequests".into(),
                    message: "The request is being throttled.".into(),
                    retry_after_s: Some(throttle.retry_after_s),
                },
                quota,
            );
        }
        if let Some(errors) = &self.faults.errors
            && !errors.statuses.is_empty()
            && self.rng.f64() < errors.probability
        {
            let status = errors.statuses[self.rng.usize(..errors.statuses.len())];
            return (
                Verdict::Fail {
                    status,
                    code: if status == 503 {
                        "ServiceUnavailable"
                    } else {
                        "InternalServerError"
                    }
                    .into(),
                    message: "The server had an error while processing the request (injected)."
                        .into(),
                    retry_after_s: None,
                },
                quota,
            );
        }
        (Verdict::Pass, quota)
    }
}

fn default_message(code: &str) -> String {
    match code {
        "OperationNotAllowed" => "Operation is not allowed: Another operation (Updating) is in progress, please wait for it to finish before starting a new operation. See https://aka.ms/aks-pending-operation for more details".into(),
        other => format!("{other} (injected by the sandbox)"),
    }
}

/// The first of `entries` (a method, or any; a path glob) that still has times `left` and
/// matches `method` and `path`; one of its times is used up.
fn take_match<'a>(
    left: &mut [u32],
    entries: impl Iterator<Item = (Option<&'a str>, &'a str)>,
    method: &str,
    path: &str,
) -> Option<usize> {
    let path = path.to_ascii_lowercase();
    let index = entries
        .enumerate()
        .position(|(index, (wanted, glob_path))| {
            left[index] > 0
                && wanted.is_none_or(|m| m.eq_ignore_ascii_case(method))
                && glob(&glob_path.to_ascii_lowercase(), &path)
        })?;
    left[index] -= 1;
    Some(index)
}

/// `*` matches any run of characters, including `/`.
pub fn glob(pattern: &str, text: &str) -> bool {
    let parts: Vec<&str> = pattern.split('*').collect();
    if parts.len() == 1 {
        return pattern == text;
    }
    let mut rest = text;
    for (index, part) in parts.iter().enumerate() {
        if index == 0 {
            match rest.strip_prefix(part) {
                Some(r) => rest = r,
                None => return false,
            }
        } else if index == parts.len() - 1 {
            return rest.ends_with(part);
        } else {
            match rest.find(part) {
                Some(position) => rest = &rest[position + part.len()..],
                None => return false,
            }
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn globs() {
        assert!(glob(
            "*/managedclusters/*",
            "/subscriptions/s/resourcegroups/rg/providers/microsoft.containerservice/managedclusters/c"
        ));
        assert!(!glob("*/vaults/*", "/subscriptions/s/resourcegroups/rg"));
        assert!(glob("/exact", "/exact"));
    }

    #[test]
    fn parses_the_documented_shape() {
        let faults = Faults::from_yaml(
            r#"
seed: 42
latency: { min_ms: 20, max_ms: 80 }
throttle: { probability: 0.05, retry_after_s: 1 }
errors: { probability: 0.02, statuses: [500, 503] }
delays: { feature_registration: 5s, principal_replication: 3s, rbac_propagation: 3s, cluster_operation: 4s }
token_buckets: true
rules:
  - { method: PUT, path: "*/managedClusters/*", times: 1, status: 409, code: OperationNotAllowed }
"#,
        )
        .unwrap();
        assert_eq!(faults.delays.cluster_operation, Duration::from_secs(4));
        assert_eq!(faults.rules[0].code, "OperationNotAllowed");
    }

    #[test]
    fn rules_fire_the_given_number_of_times() {
        let mut injector = Injector::new(Faults {
            rules: vec![Rule {
                method: Some("PUT".into()),
                path: "*/vaults/*".into(),
                times: 2,
                status: 409,
                code: "Conflict".into(),
                message: None,
            }],
            ..Faults::default()
        });
        let path = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v";
        assert!(matches!(
            injector.judge("PUT", path, Some("s"), true).0,
            Verdict::Fail { status: 409, .. }
        ));
        assert!(matches!(
            injector.judge("GET", path, Some("s"), false).0,
            Verdict::Pass
        ));
        assert!(matches!(
            injector.judge("PUT", path, Some("s"), true).0,
            Verdict::Fail { .. }
        ));
        assert_eq!(
            injector.judge("PUT", path, Some("s"), true).0,
            Verdict::Pass
        );
    }

    #[test]
    fn lost_answers_parse_and_fire_the_given_number_of_times() {
        let faults = Faults::from_yaml(
            r#"
lose_answers:
  - { method: POST, path: "*/keys/*/create", how: reset }
  - { path: "*/vaults/*", times: 2, how: server_error }
  - { method: PUT, path: "*/managedClusters/*", how: timeout, hold_ms: 1500 }
"#,
        )
        .unwrap();
        let mut injector = Injector::new(faults);
        let cluster = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.ContainerService/managedClusters/c";
        assert_eq!(
            injector.loss("PUT", cluster),
            Some(Loss::Timeout { hold_ms: 1500 })
        );
        let key = "/_kv/kv1/keys/k/create";
        assert_eq!(injector.loss("GET", key), None);
        assert_eq!(injector.loss("POST", key), Some(Loss::Reset));
        assert_eq!(injector.loss("POST", key), None);
        let vault = "/subscriptions/s/resourceGroups/rg/providers/Microsoft.KeyVault/vaults/v";
        assert_eq!(injector.loss("PUT", vault), Some(Loss::ServerError));
        assert_eq!(injector.loss("PUT", vault), Some(Loss::ServerError));
        assert_eq!(injector.loss("PUT", vault), None);
    }

    #[test]
    fn an_empty_bucket_refuses_and_keeps_refusing_until_retry_after() {
        let mut bucket = Bucket::new(2.0, 1.0);
        let now = Instant::now();
        assert!(bucket.take(now).is_ok());
        assert!(bucket.take(now).is_ok());
        let wait = bucket.take(now).unwrap_err();
        assert_eq!(wait, 1);
        // Even with a token refilled halfway, a request before Retry-After is refused again.
        assert!(bucket.take(now + Duration::from_millis(500)).is_err());
        assert!(bucket.take(now + Duration::from_millis(1500)).is_ok());
    }
}
