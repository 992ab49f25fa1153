//! The compiled runbook: a plain value (clone, compare, print) that the executor runs.

use std::time::Duration;

use serde::Serialize;
use serde_json::Value;

use crate::kind::ValueType;

/// A runbook that passed every check, its steps in execution order.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompiledRunbook {
    pub name: String,
    pub description: Option<String>,
    pub params: Vec<ParamDecl>,
    /// The lock key template; rendered from `params` and `run` only.
    pub lock: Option<String>,
    /// A topological order of the DAG; ties keep the order the steps are written in.
    pub steps: Vec<CompiledStep>,
    /// Run outputs: name and template.
    pub outputs: Vec<(String, String)>,
    /// SHA-256 of the runbook text (hex).
    pub content_hash: String,
    /// The text of every fragment it includes, nested ones too, as read when it was
    /// compiled: stored with a run, so resume and rollback compile exactly what ran.
    #[serde(skip)]
    pub fragment_sources: Vec<FragmentSource>,
}

/// One fragment as a `uses: runbook` step found it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct FragmentSource {
    /// The runbook that includes it (its source name).
    pub including: String,
    /// The path as the including runbook wrote it.
    pub path: String,
    /// The fragment's own source name (a file path, or `bundled:...`).
    pub name: String,
    pub text: String,
}

/// Resolves fragments from the texts stored with a run, never from files. Stored entries
/// name the top-level runbook as `""` (it may have been compiled under another name, a path
/// as typed), so any including name that is not a fragment's is the top level.
#[derive(Debug, Clone, Default)]
pub struct StoredFragments(Vec<FragmentSource>);

impl StoredFragments {
    pub fn new(stored: Vec<FragmentSource>) -> StoredFragments {
        StoredFragments(stored)
    }
}

impl crate::compile::FragmentResolver for StoredFragments {
    fn resolve(&self, including: &str, path: &str) -> Option<crate::RunbookSource> {
        let is_fragment = self.0.iter().any(|f| f.name == including);
        let including = if is_fragment { including } else { "" };
        self.0
            .iter()
            .find(|f| f.including == including && f.path == path)
            .map(|f| crate::RunbookSource::new(f.name.clone(), f.text.clone()))
    }
}

/// A declared runbook parameter.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct ParamDecl {
    pub name: String,
    #[serde(rename = "type")]
    pub ty: ValueType,
    pub description: Option<String>,
    pub default: Option<Value>,
    #[serde(rename = "enum", skip_serializing_if = "Vec::is_empty")]
    pub enum_values: Vec<Value>,
    pub pattern: Option<String>,
    /// Never stored, never logged; asked for again on resume.
    pub secret: bool,
    /// An environment variable that supplies the value when no `-p` or params file does.
    pub env: Option<String>,
}

impl ParamDecl {
    /// Required when it has no default.
    pub fn is_required(&self) -> bool {
        self.default.is_none()
    }
}

/// One step, with every dependency resolved.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct CompiledStep {
    pub id: String,
    pub uses: String,
    pub description: Option<String>,
    /// `with:` as JSON; strings containing `{{` are templates.
    pub with: Value,
    /// The `if:` template, when the step is conditional.
    pub condition: Option<String>,
    /// Every step this one waits for (explicit `needs` and output references), in execution order.
    pub needs: Vec<String>,
    /// Steps whose outputs this one reads: if one of them is skipped, so is this step.
    pub reads_outputs_of: Vec<String>,
    pub retry: RetryPolicy,
    /// Bounds each attempt (observe, plan and apply together).
    pub timeout: Option<Duration>,
    pub may_be_irreversible: bool,
    /// Outputs stored and shown as `***` (`sensitive_outputs:`), beyond the kind's own.
    pub sensitive_outputs: Vec<String>,
}

/// How a step is retried after a transient failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct RetryPolicy {
    /// Attempts in all, the first included.
    pub attempts: u32,
    pub backoff: Backoff,
    pub initial: Duration,
    pub max: Duration,
}

impl Default for RetryPolicy {
    fn default() -> Self {
        RetryPolicy {
            attempts: 1,
            backoff: Backoff::Exponential,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(60),
        }
    }
}

/// Delay growth between attempts.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum Backoff {
    Exponential,
    Fixed,
}

impl RetryPolicy {
    /// The delay before retry number `retry_idx` (1 for the first retry), with "equal jitter":
    /// half the nominal delay, plus a random share of the other half, so retrying clients spread
    /// out without ever retrying at once.
    pub fn delay(&self, retry_idx: u32, random_unit: f64) -> Duration {
        let nominal = match self.backoff {
            Backoff::Fixed => self.initial,
            Backoff::Exponential => {
                let factor = 2u32.saturating_pow(retry_idx.saturating_sub(1).min(30));
                self.initial.saturating_mul(factor)
            }
        }
        .min(self.max);
        let half = nominal / 2;
        half + half.mul_f64(random_unit.clamp(0.0, 1.0))
    }
}

impl CompiledRunbook {
    /// Each step's index in execution order, by id.
    pub fn step_positions(&self) -> std::collections::HashMap<&str, usize> {
        self.steps
            .iter()
            .enumerate()
            .map(|(i, s)| (s.id.as_str(), i))
            .collect()
    }

    /// The step called `id`.
    pub fn step(&self, id: &str) -> Option<&CompiledStep> {
        self.steps.iter().find(|s| s.id == id)
    }

    /// The index of the step called `id` in execution order.
    pub fn position(&self, id: &str) -> Option<usize> {
        self.steps.iter().position(|s| s.id == id)
    }

    /// Whether an `approve` step runs before step `id` on every path to it: one of the steps it
    /// waits for, directly or through others. Such a runbook has its own gate in front of
    /// whatever `id` does.
    pub fn approval_before(&self, id: &str) -> bool {
        let mut seen = std::collections::HashSet::new();
        let mut pending: Vec<&str> = self
            .step(id)
            .map(|s| s.needs.iter().map(String::as_str).collect())
            .unwrap_or_default();
        while let Some(next) = pending.pop() {
            if !seen.insert(next) {
                continue;
            }
            if let Some(step) = self.step(next) {
                if step.uses == "approve" {
                    return true;
                }
                pending.extend(step.needs.iter().map(String::as_str));
            }
        }
        false
    }

    /// Step `id` and every step that depends on it, directly or through others (by `needs`
    /// or by reading its outputs), in execution order; `None` if there is no such step.
    pub fn downstream_of(&self, id: &str) -> Option<Vec<String>> {
        self.step(id)?;
        let mut affected = std::collections::HashSet::from([id]);
        // Execution order is topological: a step's dependencies come before it.
        for step in &self.steps {
            let depends = step
                .needs
                .iter()
                .chain(&step.reads_outputs_of)
                .any(|d| affected.contains(d.as_str()));
            if depends {
                affected.insert(step.id.as_str());
            }
        }
        Some(
            self.steps
                .iter()
                .filter(|s| affected.contains(s.id.as_str()))
                .map(|s| s.id.clone())
                .collect(),
        )
    }

    /// Names of secret parameters.
    pub fn secret_params(&self) -> Vec<String> {
        self.params
            .iter()
            .filter(|p| p.secret)
            .map(|p| p.name.clone())
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exponential_delay_grows_and_caps() {
        let policy = RetryPolicy {
            attempts: 10,
            backoff: Backoff::Exponential,
            initial: Duration::from_secs(1),
            max: Duration::from_secs(5),
        };
        assert_eq!(policy.delay(1, 1.0), Duration::from_secs(1));
        assert_eq!(policy.delay(2, 1.0), Duration::from_secs(2));
        assert_eq!(policy.delay(3, 0.0), Duration::from_secs(2));
        assert_eq!(policy.delay(9, 1.0), Duration::from_secs(5));
        assert_eq!(policy.delay(40, 1.0), Duration::from_secs(5));
    }
}
