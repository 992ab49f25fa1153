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
            AzureError::Transport { .. } => true,
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
            _ => false,
        }
    }

    /// A POST that may have taken effect: the client did not resend it, and the step must
    /// observe before it decides.
    pub fn is_unanswered_post(&self) -> bool {
        let method = match self {
            AzureError::Api { method, .. } | AzureError::Transport { method, .. } => method,
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
