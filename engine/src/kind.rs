//! The step trait: what every step kind (engine-level or Azure) implements.
//!
//! A step's lifecycle, driven by the executor:
//! 1. `observe` reads the world (never writes); its result is the step's *before image*.
//! 2. `plan` compares the wanted state with the before image: unchanged, create, update (with
//!    the differing fields) or an action.
//! 3. `apply` makes the change, only when the plan is not `unchanged`, after the before image is
//!    committed.
//! 4. `rollback` undoes a change from the before image, deleting only what the step created and
//!    restoring only what it changed.

use std::collections::BTreeMap;
use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use serde::Serialize;
use serde::de::DeserializeOwned;
use serde_json::{Map, Value};
use tokio_util::sync::CancellationToken;

pub use kmsflow_state::{Approval, Outcome};

/// The type of a step parameter or runbook parameter value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum ValueType {
    String,
    Int,
    Bool,
    Duration,
    Map,
    List,
    Any,
}

impl ValueType {
    /// Words for error messages ("a string").
    pub fn describe(self) -> &'static str {
        match self {
            ValueType::String => "a string",
            ValueType::Int => "an integer",
            ValueType::Bool => "a boolean",
            ValueType::Duration => "a duration (e.g. `30s`)",
            ValueType::Map => "a mapping",
            ValueType::List => "a list",
            ValueType::Any => "any value",
        }
    }
}

/// One parameter a step kind takes under `with:`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct ParamSpec {
    pub name: &'static str,
    #[serde(rename = "type")]
    pub ty: ValueType,
    pub required: bool,
    pub description: &'static str,
    /// The only values allowed, if restricted.
    #[serde(skip_serializing_if = "<[_]>::is_empty")]
    pub one_of: &'static [&'static str],
    /// A regular expression the (rendered) value must match in full.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pattern: Option<&'static str>,
}

impl ParamSpec {
    /// A required parameter.
    pub const fn required(name: &'static str, ty: ValueType, description: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            required: true,
            description,
            one_of: &[],
            pattern: None,
        }
    }

    /// An optional parameter.
    pub const fn optional(name: &'static str, ty: ValueType, description: &'static str) -> Self {
        ParamSpec {
            name,
            ty,
            required: false,
            description,
            one_of: &[],
            pattern: None,
        }
    }

    /// Restricts the value to a fixed set.
    pub const fn one_of(mut self, values: &'static [&'static str]) -> Self {
        self.one_of = values;
        self
    }

    /// Requires the value to match a regular expression.
    pub const fn pattern(mut self, pattern: &'static str) -> Self {
        self.pattern = Some(pattern);
        self
    }
}

/// One output a step kind produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct OutputSpec {
    pub name: &'static str,
    pub description: &'static str,
}

/// Which outputs a step produces.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum OutputsSpec {
    /// Always these.
    Fixed(&'static [OutputSpec]),
    /// The keys of the mapping given in this parameter (`noop`'s `outputs`).
    KeysOf(&'static str),
}

/// What a step kind is, for the compiler, the docs and the JSON Schema.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub struct KindSpec {
    pub name: &'static str,
    pub summary: &'static str,
    pub params: &'static [ParamSpec],
    pub outputs: OutputsSpec,
    /// Whether some of its changes cannot be undone; `plan` and `run` say so before they run.
    pub may_be_irreversible: bool,
}

impl KindSpec {
    /// The parameter called `name`.
    pub fn param(&self, name: &str) -> Option<&ParamSpec> {
        self.params.iter().find(|p| p.name == name)
    }
}

/// One field that differs between what is and what is wanted.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct FieldChange {
    /// A JSON pointer-like path: `properties.securityProfile.azureKeyVaultKms.keyId`.
    pub path: String,
    pub from: Value,
    pub to: Value,
}

/// What applying a step would do.
#[derive(Debug, Clone, PartialEq, Serialize)]
#[serde(tag = "change", rename_all = "snake_case")]
pub enum Change {
    /// Already as wanted: nothing is written.
    Unchanged,
    /// Something absent is created.
    Create { summary: String },
    /// Something present is changed, in these fields.
    Update {
        summary: String,
        fields: Vec<FieldChange>,
    },
    /// An action is performed (a POST, a wait, an append).
    Action { summary: String },
}

impl Change {
    /// The outcome recorded once the change is applied.
    pub fn outcome(&self) -> Outcome {
        match self {
            Change::Unchanged => Outcome::Unchanged,
            Change::Create { .. } => Outcome::Created,
            Change::Update { .. } => Outcome::Updated,
            Change::Action { .. } => Outcome::Invoked,
        }
    }
}

/// A step's plan: the change, the outputs when they are known now, and whether the change is
/// a point of no return.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct StepPlan {
    pub change: Change,
    /// Known outputs; for `Unchanged` these are the step's outputs.
    pub outputs: Map<String, Value>,
    /// Set when applying this change cannot be undone, with the reason.
    pub irreversible: Option<String>,
}

impl StepPlan {
    /// Nothing to do; these are the outputs.
    pub fn unchanged(outputs: Map<String, Value>) -> StepPlan {
        StepPlan {
            change: Change::Unchanged,
            outputs,
            irreversible: None,
        }
    }

    /// A change to apply, outputs known after apply.
    pub fn change(change: Change) -> StepPlan {
        StepPlan {
            change,
            outputs: Map::new(),
            irreversible: None,
        }
    }
}

/// What `apply` did: the step's outputs and, where Azure's answer showed the change was not
/// the one planned, what it was instead.
#[derive(Debug, Clone, PartialEq)]
pub struct Applied {
    pub outputs: Map<String, Value>,
    /// The outcome to record instead of the plan's: a planned create whose answer shows the
    /// resource existed already (someone made it between the observe and the write) is an
    /// update of someone else's resource, which rollback never deletes.
    pub outcome: Option<Outcome>,
    /// Why the outcome differs from the plan, for the journal and the operator.
    pub note: Option<String>,
}

impl Applied {
    /// A planned create that turned out to update a resource that existed: recorded as an
    /// update, with the reason.
    pub fn existed(outputs: Map<String, Value>, why: String) -> Applied {
        Applied {
            outputs,
            outcome: Some(Outcome::Updated),
            note: Some(why),
        }
    }
}

impl From<Map<String, Value>> for Applied {
    /// The change the plan said, with these outputs.
    fn from(outputs: Map<String, Value>) -> Applied {
        Applied {
            outputs,
            outcome: None,
            note: None,
        }
    }
}

/// What rollback did for one step.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Undo {
    /// The change was undone.
    Done,
    /// The step changed nothing that needs undoing (a wait, say).
    NothingToUndo,
    /// The change cannot be undone, with the reason.
    Irreversible(String),
}

/// How the executor should treat a failure.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorClass {
    /// Worth retrying within the step's retry policy (throttling, 5xx, propagation delays).
    Transient,
    /// Retrying will not help (validation, not found, forbidden by a firewall).
    Permanent,
    /// The step waits for `kmsflow approve`.
    AwaitingApproval,
}

/// A step's failure: its class, an optional server-requested delay, and the cause.
pub struct StepError {
    pub class: ErrorClass,
    pub retry_after: Option<Duration>,
    /// The service definitively refused the step's write (a 4xx other than 408 and 429):
    /// nothing of it was applied. When that write was the step's only one, the executor
    /// forgets the planned outcome, so a resource someone else makes later is never taken
    /// for this run's (and never deleted by its rollback).
    pub refused: bool,
    /// The write may have taken effect though it failed (its answer was lost). The executor
    /// then gives the step another attempt beyond its retry policy (a few at most), whose
    /// observe tells whether the change was made; the client itself never resends it.
    pub outcome_unknown: bool,
    pub source: Box<dyn std::error::Error + Send + Sync>,
}

impl StepError {
    pub fn transient(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StepError {
        StepError {
            class: ErrorClass::Transient,
            retry_after: None,
            refused: false,
            outcome_unknown: false,
            source: source.into(),
        }
    }

    pub fn permanent(source: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> StepError {
        StepError {
            class: ErrorClass::Permanent,
            retry_after: None,
            refused: false,
            outcome_unknown: false,
            source: source.into(),
        }
    }

    pub fn awaiting_approval() -> StepError {
        StepError {
            class: ErrorClass::AwaitingApproval,
            retry_after: None,
            refused: false,
            outcome_unknown: false,
            source: "waiting for approval".into(),
        }
    }

    /// Asks the executor to wait at least this long before the next attempt.
    pub fn with_retry_after(mut self, delay: Duration) -> StepError {
        self.retry_after = Some(delay);
        self
    }

    /// Marks the error as a definitive refusal: nothing of the write was applied.
    pub fn refusing(mut self) -> StepError {
        self.refused = true;
        self
    }

    /// Marks the error as one whose write may have taken effect.
    pub fn with_unknown_outcome(mut self) -> StepError {
        self.outcome_unknown = true;
        self
    }

    pub fn is_retryable(&self) -> bool {
        self.class == ErrorClass::Transient
    }
}

impl fmt::Display for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // The whole chain, so "what, where and why" survive into the store and the terminal.
        write!(f, "{}", self.source)?;
        let mut cause = self.source.source();
        while let Some(error) = cause {
            write!(f, ": {error}")?;
            cause = error.source();
        }
        Ok(())
    }
}

impl fmt::Debug for StepError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("StepError")
            .field("class", &self.class)
            .field("retry_after", &self.retry_after)
            .field("refused", &self.refused)
            .field("outcome_unknown", &self.outcome_unknown)
            .field("message", &self.to_string())
            .finish()
    }
}

/// Everything a step sees while it runs. Steps never see YAML text or graph order.
pub struct StepContext<'a> {
    pub run_id: &'a str,
    pub step_id: &'a str,
    /// 1-based, counted across resumes.
    pub attempt: u32,
    /// The step's rendered `with:` values.
    pub input: &'a Value,
    /// The approval recorded for this step, if any (`approve` steps).
    pub approval: Option<&'a Approval>,
    /// Cancelled when the user asks to stop running steps (Ctrl-C twice).
    pub cancel: &'a CancellationToken,
    /// The before image an earlier attempt of this step committed before it applied (in
    /// this process or one that died). Its answer may have been lost, so a kind that cannot
    /// tell from the world alone whether its change was made (a key rotation adds a version
    /// that looks like any other) compares the world with this instead of applying again.
    pub earlier_before: Option<&'a Value>,
    /// Whether the rendered input holds a secret parameter's value. A kind that would keep
    /// part of the world in its before image (a file's content) keeps only a digest then, and
    /// writes what it makes private.
    pub input_has_secrets: bool,
    /// For rollback: the outputs the step recorded when it succeeded. A kind that deletes
    /// what the step created checks the thing is still that one (a principal id, a resource
    /// UID, a creation time recorded at creation) before it deletes.
    pub recorded_outputs: Option<&'a Value>,
}

impl StepContext<'_> {
    /// Deserializes the step's input into the kind's parameter struct.
    pub fn params<T: DeserializeOwned>(&self) -> Result<T, StepError> {
        serde_json::from_value(self.input.clone()).map_err(|error| {
            StepError::permanent(format!(
                "invalid input for step `{}`: {error}",
                self.step_id
            ))
        })
    }
}

/// A step kind: named by `uses:` in a runbook.
#[async_trait]
pub trait StepKind: Send + Sync + 'static {
    /// Parameters, outputs and docs; used by `compile` without running anything.
    fn spec(&self) -> &'static KindSpec;

    /// Reads the world. Must not write.
    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError>;

    /// Decides what `apply` would do, from the input and the before image.
    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError>;

    /// Makes the planned change and returns the step's outputs (and, where the answer proved
    /// the change was another than planned, that: see [`Applied`]).
    async fn apply(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        plan: &StepPlan,
    ) -> Result<Applied, StepError>;

    /// Undoes what `apply` did, from the before image.
    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError>;

    /// Outputs that may hold credentials (an action's response: `listClusterAdminCredential`
    /// answers with a kubeconfig). They are stored and shown as `***`; later steps of the
    /// same process still read the real value, a resumed run reads `***`.
    fn sensitive_outputs(&self) -> &'static [&'static str] {
        &[]
    }

    /// Gets ready to run many steps of this kind (a fleet check): builds clients, fetches
    /// credentials. Optional; a failure here is not final, the steps meet it again.
    async fn prepare(&self) -> Result<(), StepError> {
        Ok(())
    }
}

/// The step kinds a runbook may use, by name.
#[derive(Clone, Default)]
pub struct Registry {
    kinds: BTreeMap<&'static str, Arc<dyn StepKind>>,
}

impl fmt::Debug for Registry {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_list().entries(self.kinds.keys()).finish()
    }
}

impl Registry {
    /// An empty registry.
    pub fn new() -> Registry {
        Registry::default()
    }

    /// Adds a kind; a later kind with the same name replaces the earlier one.
    pub fn register(&mut self, kind: Arc<dyn StepKind>) {
        self.kinds.insert(kind.spec().name, kind);
    }

    pub fn get(&self, name: &str) -> Option<&Arc<dyn StepKind>> {
        self.kinds.get(name)
    }

    /// Every kind's spec, sorted by name.
    pub fn specs(&self) -> impl Iterator<Item = &'static KindSpec> + '_ {
        self.kinds.values().map(|k| k.spec())
    }

    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.kinds.keys().copied()
    }

    /// Prepares every kind `runbook` uses, at once (see [`StepKind::prepare`]).
    pub async fn prepare(&self, runbook: &crate::CompiledRunbook) -> Result<(), StepError> {
        let used: std::collections::BTreeSet<&str> =
            runbook.steps.iter().map(|s| s.uses.as_str()).collect();
        for kind in used.into_iter().filter_map(|name| self.get(name)) {
            kind.prepare().await?;
        }
        Ok(())
    }
}
