//! Errors from Azure, typed, with what a platform engineer needs to act: the HTTP status, the
//! ARM (or Key Vault) error code and message, and the correlation id to quote to support.

use std::time::Duration;

use kmsflow_engine::kind::StepError;

/// A failed call to ARM or Key Vault.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AzureError {
    /// Azure answered with an error.
    #[error("{method} {path}: {status} {code}: {message}{}", correlation_suffix(.correlation_id))]
    Api {
        method: String,
        /// The URL path, without query string (never a token or secret).
        path: String,
        status: u16,
        /// The ARM error code, or Key Vault's inner code when it is more specific
        /// (`ForbiddenByRbac`, `ForbiddenByFirewall`).
        code: String,
        message: String,
        correlation_id: Option<String>,
        retry_after: Option<Duration>,
    },
    /// The request never got an answer (connection refused, reset, timed out).
    #[error("{method} {path}: {detail}")]
    Transport {
        method: String,
        path: String,
        detail: String,
        /// Whether the request may have reached Azure (it was sent, then the answer was lost
        /// or never came), as opposed to a connection that could not be made at all.
        maybe_applied: bool,
    },
    /// A long-running operation ended `Failed` or `Canceled`.
    #[error("{path}: the operation ended {status}: {code}: {message}{}", correlation_suffix(.correlation_id))]
    OperationFailed {
        path: String,
        status: String,
        code: String,
        message: String,
        correlation_id: Option<String>,
    },
    /// No token could be had.
    #[error("cannot get a token for {scope}: {detail}")]
    Credential { scope: String, detail: String },
    /// The client refused to send a request (a bad name, an untrusted status URL).
    #[error("{0}")]
    Refused(String),
    /// A long-running operation outlived its deadline.
    #[error("{path}: still {state} after {waited_s}s")]
    Timeout {
        path: String,
        state: String,
        waited_s: u64,
    },
    /// Something answered, but the answer proves nothing: an empty or non-JSON body, an error
    /// without Azure's envelope, a body naming another resource. Gateways, TLS-inspecting
    /// proxies and load balancers answer like this for Azure; kmsflow takes it as no answer
    /// (never as "absent", "present" or "refused") and tries again within its bounds.
    #[error(
        "{method} {path}: the answer from `{host}` proves nothing ({what}); kmsflow takes it as no answer. Something between kmsflow and Azure answers like this (a proxy, a gateway, a load balancer): check HTTPS_PROXY and the network path to Azure, then resume"
    )]
    Unproven {
        method: String,
        path: String,
        /// `scheme://host:port` that answered.
        host: String,
        status: u16,
        what: String,
    },
    /// A 3xx: kmsflow follows no redirect (a token, a body with a secret, or a write must never
    /// go where Azure's endpoint did not name).
    #[error(
        "{method} {path}: `{host}` answered {status}, a redirect to `{location}`; kmsflow follows no redirect (a proxy or gateway between kmsflow and Azure sent it)"
    )]
    Redirected {
        method: String,
        path: String,
        host: String,
        status: u16,
        /// Where it pointed: origin and path only (a query could carry anything).
        location: String,
    },
    /// An answer larger than the client reads ([`crate::client::DEFAULT_MAX_ANSWER_BYTES`],
    /// `KMSFLOW_MAX_ANSWER_BYTES`).
    #[error(
        "{method} {path}: the answer from `{host}` is larger than {limit} bytes, more than any Azure answer kmsflow reads; not read (raise KMSFLOW_MAX_ANSWER_BYTES if this is expected)"
    )]
    TooLarge {
        method: String,
        path: String,
        host: String,
        limit: usize,
    },
}

fn correlation_suffix(id: &Option<String>) -> String {
    id.as_ref()
        .map(|id| format!(" (correlation id {id})"))
        .unwrap_or_default()
}

/// Codes that mean "Azure has not caught up yet": retried, within a bound.
pub const EVENTUAL_CODES: &[&str] = &[
    "PrincipalNotFound",
    "ForbiddenByRbac",
    "OperationNotAllowed",
    "AnotherOperationInProgress",
    "RetryableErrorDueToAnotherOperation",
];

/// Whether an `OperationNotAllowed` message names a state that does not pass by itself.
fn settled_refusal(message: &str) -> bool {
    let message = message.to_ascii_lowercase();
    ["quota", "failed", "not supported"]
        .iter()
        .any(|words| message.contains(words))
}

impl AzureError {
    /// The HTTP status, where Azure answered.
    pub fn status(&self) -> Option<u16> {
        match self {
            AzureError::Api { status, .. } => Some(*status),
            _ => None,
        }
    }

    /// Whether Azure itself said the thing asked for does not exist: a 404 in Azure's error
    /// envelope with a not-found code (ARM's `ResourceNotFound`, `ResourceGroupNotFound`, a
    /// provider's `NotFound`, Key Vault's `KeyNotFound`, ...). A 404 without the envelope
    /// never gets this far (it is [`AzureError::Unproven`]), and a 404 with another code
    /// (`InvalidResourceType`, an unknown API version) says nothing about the resource.
    pub fn is_not_found(&self) -> bool {
        matches!(self, AzureError::Api { status: 404, code, .. } if code.ends_with("NotFound"))
    }

    /// An answer to `method` on `url` that proved nothing (see [`AzureError::Unproven`]).
    pub fn unproven(method: &str, url: &url::Url, status: u16, what: String) -> AzureError {
        AzureError::Unproven {
            method: method.to_owned(),
            path: url.path().to_owned(),
            host: url.origin().ascii_serialization(),
            status,
            what,
        }
    }

    /// What a log line may say of this error: where and which code, never Azure's message
    /// (which can echo a request's secret values; the engine redacts what it stores and shows,
    /// but a log line of the client's is written before any run's redaction could see it).
    pub fn summary(&self) -> String {
        match self {
            AzureError::Api {
                method,
                path,
                status,
                code,
                ..
            } => format!("{method} {path}: {status} {code}"),
            AzureError::Transport { method, path, .. } => {
                format!("{method} {path}: no answer")
            }
            AzureError::Unproven {
                method,
                path,
                host,
                status,
                ..
            } => format!("{method} {path}: {status} from `{host}` proved nothing"),
            AzureError::Redirected {
                method,
                path,
                status,
                ..
            } => format!("{method} {path}: {status} redirect"),
            AzureError::TooLarge { method, path, .. } => format!("{method} {path}: too large"),
            AzureError::OperationFailed { path, code, .. } => {
                format!("{path}: operation failed: {code}")
            }
            AzureError::Credential { scope, .. } => format!("no token for {scope}"),
            AzureError::Refused(_) => "refused by the client".to_owned(),
            AzureError::Timeout { path, state, .. } => format!("{path}: still {state}"),
        }
    }

    /// The ARM error code, where Azure answered.
    pub fn code(&self) -> Option<&str> {
        match self {
            AzureError::Api { code, .. } | AzureError::OperationFailed { code, .. } => Some(code),
            _ => None,
        }
    }

    /// Throttling, server errors and lost connections: worth retrying soon.
    pub fn is_transient(&self) -> bool {
        match self {
            AzureError::Api { status, .. } => *status == 429 || *status >= 500,
            AzureError::Transport { .. } | AzureError::Unproven { .. } => true,
            _ => false,
        }
    }

    /// Whether Azure may have applied the request although it failed: the answer was lost
    /// after the request was sent (a reset, a timeout) or a server error came back, which
    /// may come from a front end after the change was made.
    pub fn may_have_applied(&self) -> bool {
        match self {
            AzureError::Api { status, .. } => *status >= 500,
            AzureError::Transport { maybe_applied, .. } => *maybe_applied,
            // Whatever stood between kmsflow and Azure may have passed the write on first.
            AzureError::Unproven { method, .. } | AzureError::Redirected { method, .. } => {
                method != "GET"
            }
            _ => false,
        }
    }

    /// A POST that may have taken effect: the client did not resend it, and the step must
    /// observe before it decides.
    pub fn is_unanswered_post(&self) -> bool {
        let method = match self {
            AzureError::Api { method, .. }
            | AzureError::Transport { method, .. }
            | AzureError::Unproven { method, .. }
            | AzureError::Redirected { method, .. } => method,
            _ => return false,
        };
        method == "POST" && self.may_have_applied()
    }

    /// Azure's eventual consistency: a new principal, a fresh role assignment, an operation
    /// still running. Retried, but within a bound.
    pub fn is_eventual(&self) -> bool {
        let Some(code) = self.code() else {
            return false;
        };
        // AKS (and other providers) also answer OperationNotAllowed for states that waiting
        // does not end: a failed upgrade, a quota (fidelity audit, row 18). Those fail at once.
        if code == "OperationNotAllowed" && self.message().is_some_and(settled_refusal) {
            return false;
        }
        EVENTUAL_CODES.contains(&code)
    }

    /// Azure's message, where it answered.
    pub fn message(&self) -> Option<&str> {
        match self {
            AzureError::Api { message, .. } | AzureError::OperationFailed { message, .. } => {
                Some(message)
            }
            _ => None,
        }
    }

    pub fn retry_after(&self) -> Option<Duration> {
        match self {
            AzureError::Api { retry_after, .. } => *retry_after,
            _ => None,
        }
    }

    /// As a step error, classified for the engine's retry policy.
    pub fn into_step_error(self) -> StepError {
        let retry_after = self.retry_after();
        let status = self.status();
        let outcome_unknown = self.is_unanswered_post();
        // A 412 means the resource changed under us: the step's next attempt observes it again.
        // A credential that failed after the client's own retries may still recover (IMDS
        // answers 410 for a minute during host updates): worth the step's retries too.
        let error = if self.is_transient()
            || self.is_eventual()
            || self.status() == Some(412)
            || matches!(
                self,
                AzureError::Timeout { .. } | AzureError::Credential { .. }
            ) {
            StepError::transient(self)
        } else {
            StepError::permanent(self)
        };
        let error = if outcome_unknown {
            error.with_unknown_outcome()
        } else {
            error
        };
        let error = match status {
            // Azure looked at the request and said no: nothing was applied. (408 and 429 say
            // only that it was not looked at in time.)
            Some(status) if (400..500).contains(&status) && status != 408 && status != 429 => {
                error.refusing()
            }
            _ => error,
        };
        match retry_after {
            Some(delay) => error.with_retry_after(delay),
            None => error,
        }
    }
}

impl From<AzureError> for StepError {
    fn from(error: AzureError) -> StepError {
        error.into_step_error()
    }
}

#[cfg(test)]
mod eventual_tests {
    use super::*;

    fn not_allowed(message: &str) -> AzureError {
        AzureError::Api {
            method: "PUT".into(),
            path: "/subscriptions/s".into(),
            status: 409,
            code: "OperationNotAllowed".into(),
            message: message.into(),
            correlation_id: None,
            retry_after: None,
        }
    }

    #[test]
    fn operation_not_allowed_waits_only_for_states_that_pass() {
        assert!(not_allowed("Operation is not allowed because there's an in progress create managed cluster operation").is_eventual());
        assert!(
            !not_allowed(
                "Operation is not allowed while cluster is being upgrading or failed in upgrade"
            )
            .is_eventual()
        );
        assert!(!not_allowed("Operation could not be completed as it results in exceeding approved Total Regional Cores quota").is_eventual());
    }
}
