//! `compile`: YAML text in, a [`CompiledRunbook`] or every problem in the file out.
//!
//! Compiling is pure: no I/O, no clock, no environment. It can be fuzzed and property-tested,
//! and `validate`, `graph`, `plan` and `run` all see the same result for the same text.

use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap, HashMap, HashSet};
use std::sync::LazyLock;

use petgraph::graph::{DiGraph, NodeIndex};
use regex::Regex;
use serde_json::{Map, Value};
use sha2::{Digest, Sha256};

use crate::diagnostic::{Diagnostics, Problem, ProblemKind, RunbookSource, Span, suggest};
use crate::duration::parse_duration;
use crate::kind::{KindSpec, OutputsSpec, Registry, ValueType};
use crate::runbook::{Backoff, CompiledRunbook, CompiledStep, ParamDecl, RetryPolicy};
use crate::template::{self, PathRef, Target};
use crate::yaml::{self, Spanned, Yaml, YamlValue};

const TOP_KEYS: &[&str] = &["name", "description", "params", "lock", "steps", "outputs"];

/// The most steps a runbook may have (fragments' steps included in their own files).
pub const MAX_STEPS: usize = 10_000;
const PARAM_KEYS: &[&str] = &[
    "type",
    "description",
    "default",
    "enum",
    "pattern",
    "secret",
    "env",
];
const STEP_KEYS: &[&str] = &[
    "id",
    "uses",
    "description",
    "needs",
    "with",
    "if",
    "retry",
    "timeout",
    "sensitive_outputs",
];
const RETRY_KEYS: &[&str] = &["attempts", "backoff", "initial", "max"];
const RUN_FIELDS: &[&str] = &["id", "started_at"];
/// The compile-time kind that includes a runbook fragment.
pub const FRAGMENT_KIND: &str = "runbook";

static STEP_ID: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[A-Za-z][A-Za-z0-9_-]{0,62}$").expect("valid regex"));
static PARAM_NAME: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"^[a-z][a-z0-9_]{0,62}$").expect("valid regex"));

/// The SHA-256 of a runbook's text, as stored with each run.
pub fn content_hash(text: &str) -> String {
    let digest = Sha256::digest(text.as_bytes());
    digest.iter().map(|b| format!("{b:02x}")).collect()
}

/// Compiles a runbook against the step kinds of `registry`.
pub fn compile(
    source: &RunbookSource,
    registry: &Registry,
) -> Result<CompiledRunbook, Diagnostics> {
    compile_with(source, registry, &NoFragments)
}

/// Finds the runbook fragments that `uses: runbook` steps name. Compiling stays pure: the
/// caller decides where fragments come from (files beside the runbook, or the binary).
pub trait FragmentResolver {
    /// The fragment at `path`, as named in the runbook called `including`.
    fn resolve(&self, including: &str, path: &str) -> Option<RunbookSource>;
}

/// Resolves no fragment at all.
pub struct NoFragments;

impl FragmentResolver for NoFragments {
    fn resolve(&self, _including: &str, _path: &str) -> Option<RunbookSource> {
        None
    }
}

/// Compiles a runbook that may use fragments (`uses: runbook`).
pub fn compile_with(
    source: &RunbookSource,
    registry: &Registry,
    fragments: &dyn FragmentResolver,
) -> Result<CompiledRunbook, Diagnostics> {
    compile_nested(source, registry, fragments, &mut Vec::new())
}

fn compile_nested(
    source: &RunbookSource,
    registry: &Registry,
    fragments: &dyn FragmentResolver,
    including: &mut Vec<String>,
) -> Result<CompiledRunbook, Diagnostics> {
    let diagnostics = |problems: Vec<Problem>| Diagnostics {
        file: source.name.clone(),
        problems,
    };
    let document = yaml::parse(source).map_err(|p| diagnostics(vec![*p]))?;
    including.push(source.name.clone());
    let mut compiler = Compiler {
        source,
        registry,
        fragments,
        including,
        problems: Vec::new(),
        fragment_sources: Vec::new(),
    };
    let result = compiler.runbook(&document);
    compiler.including.pop();
    match result {
        Some(runbook) if compiler.problems.is_empty() => Ok(runbook),
        None if compiler.problems.is_empty() => {
            // Every refusal must say why; this one did not (a gap in the checks above).
            Err(diagnostics(vec![Problem {
                kind: ProblemKind::InvalidValue {
                    key: "steps".into(),
                    reason: "the runbook could not be compiled, and no check said why".into(),
                    hint: Some("please report this runbook to kmsflow's maintainers".into()),
                },
                span: Span::new(0, 0),
                source: source.clone(),
            }]))
        }
        _ => {
            let mut problems = compiler.problems;
            problems.sort_by_key(|p| p.span.offset);
            Err(diagnostics(problems))
        }
    }
}

struct Compiler<'a> {
    source: &'a RunbookSource,
    registry: &'a Registry,
    fragments: &'a dyn FragmentResolver,
    /// The runbooks being compiled, outermost first, to catch a fragment including itself.
    including: &'a mut Vec<String>,
    problems: Vec<Problem>,
    /// Every fragment read so far, nested ones included.
    fragment_sources: Vec<crate::runbook::FragmentSource>,
}

/// A step as read from YAML, before dependencies are resolved.
struct StepDraft {
    id: Spanned<String>,
    uses: Spanned<String>,
    spec: Option<&'static KindSpec>,
    /// For `uses: runbook`: the compiled fragment and the parameters given to it.
    fragment: Option<Box<(CompiledRunbook, Map<String, Value>)>>,
    description: Option<String>,
    needs: Vec<Spanned<String>>,
    with: Option<Yaml>,
    condition: Option<Spanned<String>>,
    retry: RetryPolicy,
    timeout: Option<std::time::Duration>,
    /// Outputs stored and shown as `***` (beyond the kind's own sensitive ones).
    sensitive_outputs: Vec<Spanned<String>>,
}

/// A template string found in the runbook, and where.
struct TemplateSite {
    text: String,
    span: Span,
}

impl Compiler<'_> {
    /// Every name under a step's `sensitive_outputs` is one of its outputs.
    fn check_sensitive_outputs(&mut self, drafts: &[StepDraft]) {
        for draft in drafts {
            let Some(declared) = declared_outputs(draft) else {
                continue;
            };
            for name in &draft.sensitive_outputs {
                if !declared.contains(&name.value) {
                    self.problem(
                        ProblemKind::UnknownOutput {
                            step: draft.id.value.clone(),
                            uses: draft.uses.value.clone(),
                            output: name.value.clone(),
                            declared: declared.clone(),
                        },
                        name.span,
                    );
                }
            }
        }
    }

    /// "Did you mean" for the problems that are drawn: past [`MAX_RENDERED`] problems none is
    /// shown, and finding one costs a pass over every name, which for a file with thousands
    /// of the same mistake made `validate` quadratic (`benches/validate.rs`).
    fn suggest<'a>(
        &self,
        word: &str,
        candidates: impl IntoIterator<Item = &'a str>,
    ) -> Option<String> {
        if self.problems.len() >= crate::diagnostic::MAX_RENDERED {
            return None;
        }
        suggest(word, candidates)
    }

    fn problem(&mut self, kind: ProblemKind, span: Span) {
        self.problems.push(Problem {
            kind,
            span,
            source: self.source.clone(),
        });
    }

    fn wrong_type(&mut self, key: &str, expected: &str, found: &Yaml) {
        self.problem(
            ProblemKind::WrongType {
                key: key.to_owned(),
                expected: expected.to_owned(),
                found: found.value.type_name().to_owned(),
            },
            found.span,
        );
    }

    /// Reports unknown keys of a mapping and returns its entries by name.
    fn keys<'y>(
        &mut self,
        entries: &'y [(Spanned<String>, Yaml)],
        allowed: &[&str],
        context: &str,
    ) -> BTreeMap<&'y str, (&'y Spanned<String>, &'y Yaml)> {
        let mut found = BTreeMap::new();
        for (key, value) in entries {
            if allowed.contains(&key.value.as_str()) {
                found.insert(key.value.as_str(), (key, value));
            } else {
                self.problem(
                    ProblemKind::UnknownKey {
                        key: key.value.clone(),
                        context: context.to_owned(),
                        suggestion: self.suggest(&key.value, allowed.iter().copied()),
                        allowed: allowed.iter().map(|k| k.to_string()).collect(),
                    },
                    key.span,
                );
            }
        }
        found
    }

    fn map<'y>(&mut self, key: &str, value: &'y Yaml) -> Option<&'y [(Spanned<String>, Yaml)]> {
        let map = value.as_map();
        if map.is_none() {
            self.wrong_type(key, "a mapping", value);
        }
        map
    }

    fn string(&mut self, key: &str, value: &Yaml) -> Option<Spanned<String>> {
        match &value.value {
            YamlValue::Str(s) => Some(Spanned {
                value: s.clone(),
                span: value.span,
            }),
            _ => {
                self.wrong_type(key, "a string", value);
                None
            }
        }
    }

    fn runbook(&mut self, document: &Yaml) -> Option<CompiledRunbook> {
        let entries = self.map("runbook", document)?;
        let top = self.keys(entries, TOP_KEYS, "the runbook");

        let name = match top.get("name") {
            Some((_, value)) => self.string("name", value),
            None => {
                self.problem(
                    ProblemKind::MissingKey {
                        key: "name".into(),
                        context: "the runbook".into(),
                    },
                    Span::new(0, 0),
                );
                None
            }
        };
        let description = top
            .get("description")
            .and_then(|(_, v)| self.string("description", v))
            .map(|s| s.value);
        let params = match top.get("params") {
            Some((_, value)) => self.params(value),
            None => Vec::new(),
        };
        let lock = top.get("lock").and_then(|(_, v)| self.string("lock", v));
        let drafts = match top.get("steps") {
            Some((_, value)) => self.steps(value),
            None => {
                self.problem(
                    ProblemKind::MissingKey {
                        key: "steps".into(),
                        context: "the runbook".into(),
                    },
                    Span::new(0, 0),
                );
                Vec::new()
            }
        };
        let outputs: Vec<(Spanned<String>, Spanned<String>)> = match top.get("outputs") {
            Some((_, value)) => match self.map("outputs", value) {
                Some(entries) => entries
                    .iter()
                    .filter_map(|(k, v)| Some((k.clone(), self.string(&k.value, v)?)))
                    .collect(),
                None => Vec::new(),
            },
            None => Vec::new(),
        };

        self.check_sensitive_outputs(&drafts);
        let steps = self.resolve(&params, lock.as_ref(), &drafts, &outputs)?;
        let fragment_hashes: Vec<&str> = drafts
            .iter()
            .filter_map(|d| d.fragment.as_ref().map(|f| f.0.content_hash.as_str()))
            .collect();
        let steps = crate::fragment::expand(steps, &drafts_fragments(&drafts));
        Some(CompiledRunbook {
            name: name?.value,
            description,
            params,
            lock: lock.map(|l| l.value),
            steps,
            outputs: outputs
                .into_iter()
                .map(|(k, v)| (k.value, v.value))
                .collect(),
            // A run must notice a changed fragment as much as a changed runbook.
            content_hash: if fragment_hashes.is_empty() {
                content_hash(&self.source.text)
            } else {
                content_hash(&format!(
                    "{}\0{}",
                    self.source.text,
                    fragment_hashes.join("\0")
                ))
            },
            fragment_sources: std::mem::take(&mut self.fragment_sources),
        })
    }

    /// Reads a `uses: runbook` step's `with:` (`path`, `params`), compiles the fragment, and
    /// checks the parameters given to it.
    fn fragment(
        &mut self,
        step_id: Option<&str>,
        with: Option<&Yaml>,
        at: Span,
    ) -> Option<Box<(CompiledRunbook, Map<String, Value>)>> {
        let Some(entries) = with.and_then(Yaml::as_map) else {
            self.problem(
                ProblemKind::MissingKey {
                    key: "path".into(),
                    context: "`with` of a `runbook` step".into(),
                },
                at,
            );
            return None;
        };
        let keys = self.keys(entries, &["path", "params"], "`with` of a `runbook` step");
        let Some((_, path_value)) = keys.get("path") else {
            self.problem(
                ProblemKind::MissingKey {
                    key: "path".into(),
                    context: "`with` of a `runbook` step".into(),
                },
                at,
            );
            return None;
        };
        let path = self.string("path", path_value)?;
        // Checked before anything is read: a fragment is a runbook file inside the including
        // runbook's folder, so no diagnostic ever shows lines of another file.
        if let Err(reason) = confined_fragment_path(&path.value) {
            self.problem(
                ProblemKind::InvalidValue {
                    key: "path".into(),
                    reason,
                    hint: Some("a fragment's path is relative to the runbook that uses it and stays inside its folder, e.g. `fragments/cmk-key-vault.yaml`".into()),
                },
                path.span,
            );
            return None;
        }
        let Some(source) = self.fragments.resolve(&self.source.name, &path.value) else {
            self.problem(
                ProblemKind::InvalidValue {
                    key: "path".into(),
                    reason: format!("no runbook fragment `{}`", path.value),
                    hint: Some("a fragment's path is relative to the runbook that uses it, e.g. `fragments/cmk-key-vault.yaml`".into()),
                },
                path.span,
            );
            return None;
        };
        if self.including.contains(&source.name) {
            self.problem(
                ProblemKind::Cycle {
                    path: self
                        .including
                        .iter()
                        .cloned()
                        .chain([source.name.clone()])
                        .collect(),
                },
                path.span,
            );
            return None;
        }
        let compiled = match compile_nested(&source, self.registry, self.fragments, self.including)
        {
            Ok(compiled) => compiled,
            Err(diagnostics) => {
                self.problems.extend(diagnostics.problems);
                return None;
            }
        };
        self.fragment_sources.push(crate::runbook::FragmentSource {
            including: self.source.name.clone(),
            path: path.value.clone(),
            name: source.name.clone(),
            text: source.text.to_string(),
        });
        self.fragment_sources
            .extend(compiled.fragment_sources.iter().cloned());
        if let Some(lock) = &compiled.lock {
            self.problem(
                ProblemKind::InvalidValue {
                    key: "path".into(),
                    reason: format!(
                        "the fragment `{}` takes a lock (`{lock}`); only a top-level runbook may",
                        path.value
                    ),
                    hint: Some("remove `lock:` from the fragment".into()),
                },
                path.span,
            );
        }
        let given: Vec<(Spanned<String>, Yaml)> = match keys.get("params") {
            Some((_, value)) => self
                .map("params", value)
                .map(<[_]>::to_vec)
                .unwrap_or_default(),
            None => Vec::new(),
        };
        let names: Vec<&str> = compiled.params.iter().map(|p| p.name.as_str()).collect();
        let mut values = Map::new();
        for (key, value) in &given {
            // The fragment's outputs come from its steps, which its parameters feed: reading
            // them here could never be satisfied.
            let mut sites = Vec::new();
            collect_templates(value, &mut sites);
            for (path, span) in self.template_refs(&sites) {
                if step_id.is_some() && path.step() == step_id {
                    self.problem(
                        ProblemKind::InvalidValue {
                            key: key.value.clone(),
                            reason: format!(
                                "a fragment's parameters cannot read its own outputs (`{}`)",
                                path.raw
                            ),
                            hint: Some(
                                "pass a parameter or an earlier step's output instead".into(),
                            ),
                        },
                        span,
                    );
                }
            }
            if names.contains(&key.value.as_str()) {
                values.insert(key.value.clone(), value.value.to_json());
            } else {
                self.problem(
                    ProblemKind::UnknownKey {
                        key: key.value.clone(),
                        context: format!("the parameters of fragment `{}`", path.value),
                        suggestion: self.suggest(&key.value, names.iter().copied()),
                        allowed: names.iter().map(|n| n.to_string()).collect(),
                    },
                    key.span,
                );
            }
        }
        for param in &compiled.params {
            if values.contains_key(&param.name) {
                continue;
            }
            match &param.default {
                Some(default) => {
                    values.insert(param.name.clone(), default.clone());
                }
                None => self.problem(
                    ProblemKind::MissingKey {
                        key: param.name.clone(),
                        context: format!("the parameters of fragment `{}`", path.value),
                    },
                    keys.get("params").map_or(path.span, |(k, _)| k.span),
                ),
            }
        }
        Some(Box::new((compiled, values)))
    }

    fn params(&mut self, value: &Yaml) -> Vec<ParamDecl> {
        let Some(entries) = self.map("params", value) else {
            return Vec::new();
        };
        let mut params = Vec::new();
        for (name, spec) in entries {
            if !PARAM_NAME.is_match(&name.value) {
                self.problem(
                    ProblemKind::InvalidName {
                        what: "parameter name".into(),
                        name: name.value.clone(),
                    },
                    name.span,
                );
            }
            if let Some(param) = self.param(name, spec) {
                params.push(param);
            }
        }
        params
    }

    fn param(&mut self, name: &Spanned<String>, spec: &Yaml) -> Option<ParamDecl> {
        let context = format!("parameter `{}`", name.value);
        let entries = self.map(&name.value, spec)?;
        let keys = self.keys(entries, PARAM_KEYS, &context);
        let ty = match keys.get("type") {
            None => ValueType::String,
            Some((_, value)) => match &value.value {
                YamlValue::Str(t) => match t.as_str() {
                    "string" => ValueType::String,
                    "int" => ValueType::Int,
                    "bool" => ValueType::Bool,
                    "duration" => ValueType::Duration,
                    other => {
                        self.problem(
                            ProblemKind::InvalidValue {
                                key: "type".into(),
                                reason: format!("unknown parameter type `{other}`"),
                                hint: Some(
                                    suggest(other, ["string", "int", "bool", "duration"])
                                        .map(|s| format!("did you mean `{s}`?"))
                                        .unwrap_or_else(|| {
                                            "use `string`, `int`, `bool` or `duration`".into()
                                        }),
                                ),
                            },
                            value.span,
                        );
                        return None;
                    }
                },
                _ => {
                    self.wrong_type("type", "a string", value);
                    return None;
                }
            },
        };
        let description = keys
            .get("description")
            .and_then(|(_, v)| self.string("description", v))
            .map(|s| s.value);
        let secret = match keys.get("secret") {
            Some((_, value)) => match value.value {
                YamlValue::Bool(b) => b,
                _ => {
                    self.wrong_type("secret", "a boolean", value);
                    false
                }
            },
            None => false,
        };
        let env = keys
            .get("env")
            .and_then(|(_, v)| self.string("env", v))
            .map(|s| s.value);
        let pattern = keys
            .get("pattern")
            .and_then(|(_, v)| self.string("pattern", v));
        let regex =
            pattern
                .as_ref()
                .and_then(|p| match Regex::new(&crate::pattern::anchored(&p.value)) {
                    Ok(regex) => Some(regex),
                    Err(error) => {
                        self.problem(
                            ProblemKind::InvalidValue {
                                key: "pattern".into(),
                                reason: format!(
                                    "not a regular expression: {}",
                                    regex_message(&error)
                                ),
                                hint: None,
                            },
                            p.span,
                        );
                        None
                    }
                });
        let mut enum_values = Vec::new();
        if let Some((_, value)) = keys.get("enum") {
            match &value.value {
                YamlValue::Seq(items) if !items.is_empty() => {
                    for item in items {
                        if let Some(v) = self.typed_value("enum", ty, item) {
                            enum_values.push(v);
                        }
                    }
                }
                _ => self.wrong_type("enum", "a non-empty list", value),
            }
        }
        let default = match keys.get("default") {
            Some((_, value)) => {
                let typed = self.typed_value("default", ty, value);
                if let Some(v) = &typed {
                    if !enum_values.is_empty() && !enum_values.contains(v) {
                        self.problem(
                            ProblemKind::InvalidValue {
                                key: "default".into(),
                                reason: format!("{v} is not one of the `enum` values"),
                                hint: Some(format!(
                                    "allowed: {}",
                                    enum_values
                                        .iter()
                                        .map(Value::to_string)
                                        .collect::<Vec<_>>()
                                        .join(", ")
                                )),
                            },
                            value.span,
                        );
                    }
                    if let (Some(regex), Value::String(s)) = (&regex, v)
                        && !regex.is_match(s)
                    {
                        self.problem(
                            ProblemKind::InvalidValue {
                                key: "default".into(),
                                reason: format!("`{s}` does not match the parameter's `pattern`"),
                                hint: pattern.as_ref().map(|p| format!("pattern: `{}`", p.value)),
                            },
                            value.span,
                        );
                    }
                }
                typed
            }
            None => None,
        };
        if secret
            && default.is_some()
            && let Some((_, value)) = keys.get("default")
        {
            self.problem(
                    ProblemKind::InvalidValue {
                        key: "default".into(),
                        reason: "a secret parameter cannot have a default: it would sit in the runbook in clear".into(),
                        hint: Some("pass it with `-p`, `--params-file` or its `env` variable".into()),
                    },
                    value.span,
                );
        }
        Some(ParamDecl {
            name: name.value.clone(),
            ty,
            description,
            default,
            enum_values,
            pattern: pattern.map(|p| p.value),
            secret,
            env,
        })
    }

    /// A literal of a parameter type, as JSON.
    fn typed_value(&mut self, key: &str, ty: ValueType, value: &Yaml) -> Option<Value> {
        match (ty, &value.value) {
            (ValueType::String, YamlValue::Str(s)) => Some(Value::String(s.clone())),
            (ValueType::Int, YamlValue::Int(i)) => Some((*i).into()),
            (ValueType::Bool, YamlValue::Bool(b)) => Some((*b).into()),
            (ValueType::Duration, YamlValue::Str(s)) => match parse_duration(s) {
                Ok(_) => Some(Value::String(s.clone())),
                Err(error) => {
                    self.problem(
                        ProblemKind::InvalidDuration {
                            value: s.clone(),
                            reason: error.to_string(),
                        },
                        value.span,
                    );
                    None
                }
            },
            _ => {
                self.wrong_type(key, ty.describe(), value);
                None
            }
        }
    }

    fn steps(&mut self, value: &Yaml) -> Vec<StepDraft> {
        let YamlValue::Seq(items) = &value.value else {
            self.wrong_type("steps", "a list of steps", value);
            return Vec::new();
        };
        if items.is_empty() {
            self.problem(
                ProblemKind::InvalidValue {
                    key: "steps".into(),
                    reason: "a runbook needs at least one step".into(),
                    hint: Some("add a step: `- id: first\n    uses: noop`".into()),
                },
                value.span,
            );
        }
        if items.len() > MAX_STEPS {
            self.problem(
                ProblemKind::InvalidValue {
                    key: "steps".into(),
                    reason: format!(
                        "{} steps; a runbook may have at most {MAX_STEPS}",
                        items.len()
                    ),
                    hint: Some(
                        "split the work into runbooks, or run one runbook over many targets".into(),
                    ),
                },
                value.span,
            );
            return Vec::new();
        }
        let mut drafts: Vec<StepDraft> = Vec::new();
        let mut seen: HashMap<String, Span> = HashMap::new();
        for item in items {
            let Some(draft) = self.step(item) else {
                continue;
            };
            if let Some(first) = seen.get(&draft.id.value) {
                self.problem(
                    ProblemKind::DuplicateStep {
                        id: draft.id.value.clone(),
                        first: *first,
                    },
                    draft.id.span,
                );
                continue;
            }
            seen.insert(draft.id.value.clone(), draft.id.span);
            drafts.push(draft);
        }
        drafts
    }

    fn step(&mut self, item: &Yaml) -> Option<StepDraft> {
        let entries = self.map("step", item)?;
        let id_for_context = entries
            .iter()
            .find(|(k, _)| k.value == "id")
            .and_then(|(_, v)| match &v.value {
                YamlValue::Str(s) => Some(format!("step `{s}`")),
                _ => None,
            })
            .unwrap_or_else(|| "a step".to_owned());
        let keys = self.keys(entries, STEP_KEYS, &id_for_context);
        let missing = |this: &mut Self, key: &str| {
            this.problem(
                ProblemKind::MissingKey {
                    key: key.into(),
                    context: id_for_context.clone(),
                },
                Span::new(item.span.offset, 0),
            )
        };
        let id = match keys.get("id") {
            Some((_, v)) => self.string("id", v),
            None => {
                missing(self, "id");
                None
            }
        };
        // `--` joins a fragment step's id to its inner steps' ids (`setup--key`).
        if let Some(id) = &id
            && (!STEP_ID.is_match(&id.value) || id.value.contains("--"))
        {
            self.problem(
                ProblemKind::InvalidName {
                    what: "step id".into(),
                    name: id.value.clone(),
                },
                id.span,
            );
        }
        let uses = match keys.get("uses") {
            Some((_, v)) => self.string("uses", v),
            None => {
                missing(self, "uses");
                None
            }
        };
        let spec = uses
            .as_ref()
            .filter(|uses| uses.value != FRAGMENT_KIND)
            .and_then(|uses| match self.registry.get(&uses.value) {
                Some(kind) => Some(kind.spec()),
                None => {
                    self.problem(
                        ProblemKind::UnknownKind {
                            uses: uses.value.clone(),
                            suggestion: suggest(
                                &uses.value,
                                self.registry.names().chain([FRAGMENT_KIND]),
                            ),
                        },
                        uses.span,
                    );
                    None
                }
            });
        let description = keys
            .get("description")
            .and_then(|(_, v)| self.string("description", v))
            .map(|s| s.value);
        let needs = match keys.get("needs") {
            Some((_, value)) => match &value.value {
                YamlValue::Str(s) => vec![Spanned {
                    value: s.clone(),
                    span: value.span,
                }],
                YamlValue::Seq(items) => items
                    .iter()
                    .filter_map(|i| self.string("needs", i))
                    .collect(),
                _ => {
                    self.wrong_type("needs", "a step id or a list of step ids", value);
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let with = keys.get("with").and_then(|(_, value)| {
            self.map("with", value)?;
            Some((*value).clone())
        });
        if let (Some(spec), Some(with_key)) = (spec, keys.get("with")) {
            self.check_with(spec, with.as_ref(), with_key.0.span);
        } else if let (Some(spec), None) = (spec, keys.get("with")) {
            self.check_with(spec, None, Span::new(item.span.offset, 0));
        }
        let condition = keys.get("if").and_then(|(_, value)| match &value.value {
            // A plain string is always "truthy" text: `"False"`, `"no"` or `only when
            // production` would run the step. Only a template can decide at run time.
            YamlValue::Str(s) if !crate::template::is_template(s) => {
                self.problem(
                    ProblemKind::InvalidValue {
                        key: "if".into(),
                        reason: format!("`{s}` is a string, not a boolean or a template"),
                        hint: Some(
                            "write `true` or `false` unquoted, or a template that renders exactly `true` or `false`, e.g. `{{eq params.network_access 'Private'}}`".into(),
                        ),
                    },
                    value.span,
                );
                None
            }
            YamlValue::Str(s) => Some(Spanned {
                value: s.clone(),
                span: value.span,
            }),
            YamlValue::Bool(b) => Some(Spanned {
                value: b.to_string(),
                span: value.span,
            }),
            _ => {
                self.wrong_type("if", "a template or a boolean", value);
                None
            }
        });
        let retry = match keys.get("retry") {
            Some((_, value)) => self.retry(value),
            None => RetryPolicy::default(),
        };
        let timeout = keys
            .get("timeout")
            .and_then(|(_, v)| self.duration("timeout", v));
        let sensitive_outputs = match keys.get("sensitive_outputs") {
            Some((_, value)) => match &value.value {
                YamlValue::Seq(items) => items
                    .iter()
                    .filter_map(|i| self.string("sensitive_outputs", i))
                    .collect(),
                _ => {
                    self.wrong_type("sensitive_outputs", "a list of output names", value);
                    Vec::new()
                }
            },
            None => Vec::new(),
        };
        let fragment = match (&uses, &with) {
            (Some(uses), _) if uses.value == FRAGMENT_KIND => self.fragment(
                id.as_ref().map(|id| id.value.as_str()),
                with.as_ref(),
                keys.get("with").map_or(item.span, |(k, _)| k.span),
            ),
            _ => None,
        };
        Some(StepDraft {
            id: id?,
            uses: uses?,
            spec,
            fragment,
            description,
            needs,
            with,
            condition,
            retry,
            timeout,
            sensitive_outputs,
        })
    }

    fn duration(&mut self, key: &str, value: &Yaml) -> Option<std::time::Duration> {
        let text = self.string(key, value)?;
        match parse_duration(&text.value) {
            Ok(d) => Some(d),
            Err(error) => {
                self.problem(
                    ProblemKind::InvalidDuration {
                        value: text.value,
                        reason: error.to_string(),
                    },
                    value.span,
                );
                None
            }
        }
    }

    fn retry(&mut self, value: &Yaml) -> RetryPolicy {
        let mut policy = RetryPolicy::default();
        let Some(entries) = self.map("retry", value) else {
            return policy;
        };
        let keys = self.keys(entries, RETRY_KEYS, "`retry`");
        if let Some((_, v)) = keys.get("attempts") {
            match v.value {
                YamlValue::Int(n) if (1..=1000).contains(&n) => policy.attempts = n as u32,
                YamlValue::Int(_) => self.problem(
                    ProblemKind::InvalidValue {
                        key: "attempts".into(),
                        reason: "must be between 1 and 1000".into(),
                        hint: Some("`attempts` counts the first try too".into()),
                    },
                    v.span,
                ),
                _ => self.wrong_type("attempts", "an integer", v),
            }
        }
        if let Some((_, v)) = keys.get("backoff") {
            match &v.value {
                YamlValue::Str(s) if s == "exponential" => policy.backoff = Backoff::Exponential,
                YamlValue::Str(s) if s == "fixed" => policy.backoff = Backoff::Fixed,
                YamlValue::Str(s) => self.problem(
                    ProblemKind::InvalidValue {
                        key: "backoff".into(),
                        reason: format!("unknown backoff `{s}`"),
                        hint: Some("use `exponential` or `fixed`".into()),
                    },
                    v.span,
                ),
                _ => self.wrong_type("backoff", "a string", v),
            }
        }
        if let Some(d) = keys
            .get("initial")
            .and_then(|(_, v)| self.duration("initial", v))
        {
            policy.initial = d;
        }
        if let Some(d) = keys.get("max").and_then(|(_, v)| self.duration("max", v)) {
            policy.max = d;
        }
        policy
    }

    /// Checks `with:` against the kind's declared parameters: unknown and missing keys, and the
    /// types of values that are not templates (those are checked once rendered).
    fn check_with(&mut self, spec: &KindSpec, with: Option<&Yaml>, with_span: Span) {
        let entries = with.and_then(Yaml::as_map).unwrap_or(&[]);
        let allowed: Vec<&str> = spec.params.iter().map(|p| p.name).collect();
        let keys = self.keys(
            entries,
            &allowed,
            &format!("`with` of a `{}` step", spec.name),
        );
        for param in spec.params {
            let Some((_, value)) = keys.get(param.name) else {
                if param.required {
                    self.problem(
                        ProblemKind::MissingKey {
                            key: param.name.into(),
                            context: format!("`with` of a `{}` step", spec.name),
                        },
                        with_span,
                    );
                }
                continue;
            };
            if let YamlValue::Str(s) = &value.value
                && template::is_template(s)
            {
                continue;
            }
            let json = value.value.to_json();
            if let Err(reason) = crate::input::check_value(param, &json) {
                let kind = match (&param.ty, &value.value) {
                    (ValueType::Duration, YamlValue::Str(s)) => ProblemKind::InvalidDuration {
                        value: s.clone(),
                        reason,
                    },
                    _ => ProblemKind::InvalidValue {
                        key: param.name.into(),
                        reason,
                        hint: Some(param.description.to_owned()),
                    },
                };
                self.problem(kind, value.span);
            }
        }
    }

    /// Resolves references and `needs` into edges, rejects cycles, and orders the steps.
    fn resolve(
        &mut self,
        params: &[ParamDecl],
        lock: Option<&Spanned<String>>,
        drafts: &[StepDraft],
        outputs: &[(Spanned<String>, Spanned<String>)],
    ) -> Option<Vec<CompiledStep>> {
        let index: HashMap<&str, usize> = drafts
            .iter()
            .enumerate()
            .map(|(i, d)| (d.id.value.as_str(), i))
            .collect();
        let param_names: HashSet<&str> = params.iter().map(|p| p.name.as_str()).collect();
        let mut edges: Vec<(usize, usize)> = Vec::new();
        let mut reads: Vec<Vec<String>> = vec![Vec::new(); drafts.len()];

        if let Some(lock) = lock {
            for (path, span) in self.template_refs(&[site(lock)]) {
                if path.step().is_some() {
                    self.problem(ProblemKind::LockUsesSteps, span);
                    continue;
                }
                self.check_ref(&path, span, &param_names, drafts, &index);
                // A lock read from an empty value names nothing: every run left at that
                // default would share one lock with every other runbook's.
                if let Target::Param(name) = path.target()
                    && let Some(param) = params.iter().find(|p| p.name == name)
                    && param
                        .default
                        .as_ref()
                        .is_some_and(|d| d.as_str() == Some(""))
                {
                    self.problem(
                        ProblemKind::InvalidValue {
                            key: "lock".into(),
                            reason: format!("it reads `params.{name}`, whose default is empty"),
                            hint: Some(format!(
                                "give `{name}` a non-empty default or none (so a value is required), or lock on parameters that name the target"
                            )),
                        },
                        span,
                    );
                }
            }
        }
        for (position, draft) in drafts.iter().enumerate() {
            for need in &draft.needs {
                match index.get(need.value.as_str()) {
                    Some(&target) if target == position => self.problem(
                        ProblemKind::SelfDependency {
                            step: need.value.clone(),
                        },
                        need.span,
                    ),
                    Some(&target) => edges.push((target, position)),
                    None => self.problem(
                        ProblemKind::UnknownNeeds {
                            target: need.value.clone(),
                            suggestion: self.suggest(&need.value, index.keys().copied()),
                        },
                        need.span,
                    ),
                }
            }
            let mut sites = Vec::new();
            if let Some(with) = &draft.with {
                collect_templates(with, &mut sites);
            }
            if let Some(condition) = &draft.condition {
                sites.push(site(condition));
            }
            for (path, span) in self.template_refs(&sites) {
                if let Some(target) = self.check_ref(&path, span, &param_names, drafts, &index) {
                    edges.push((target, position));
                    let target_id = drafts[target].id.value.clone();
                    if !reads[position].contains(&target_id) {
                        reads[position].push(target_id);
                    }
                }
            }
        }
        let output_sites: Vec<TemplateSite> = outputs.iter().map(|(_, v)| site(v)).collect();
        for (path, span) in self.template_refs(&output_sites) {
            self.check_ref(&path, span, &param_names, drafts, &index);
        }
        let order = self.order(drafts, &edges);
        if !self.problems.is_empty() {
            return None;
        }
        let order = order?;
        let position_in_order: HashMap<usize, usize> =
            order.iter().enumerate().map(|(o, &i)| (i, o)).collect();
        let mut needs: Vec<Vec<usize>> = vec![Vec::new(); drafts.len()];
        for &(from, to) in &edges {
            if !needs[to].contains(&from) {
                needs[to].push(from);
            }
        }
        Some(
            order
                .iter()
                .map(|&i| {
                    let draft = &drafts[i];
                    let mut deps = needs[i].clone();
                    deps.sort_by_key(|d| position_in_order[d]);
                    CompiledStep {
                        id: draft.id.value.clone(),
                        uses: draft.uses.value.clone(),
                        description: draft.description.clone(),
                        with: draft
                            .with
                            .as_ref()
                            .map_or(Value::Object(Default::default()), |w| w.value.to_json()),
                        condition: draft.condition.as_ref().map(|c| c.value.clone()),
                        needs: deps.iter().map(|&d| drafts[d].id.value.clone()).collect(),
                        reads_outputs_of: reads[i].clone(),
                        retry: draft.retry,
                        timeout: draft.timeout,
                        may_be_irreversible: draft.spec.is_some_and(|s| s.may_be_irreversible),
                        sensitive_outputs: draft
                            .sensitive_outputs
                            .iter()
                            .map(|o| o.value.clone())
                            .collect(),
                    }
                })
                .collect(),
        )
    }

    /// Parses templates; reports syntax errors; returns every path with its span.
    fn template_refs(&mut self, sites: &[TemplateSite]) -> Vec<(PathRef, Span)> {
        let mut found = Vec::new();
        for site in sites {
            match template::references(&site.text) {
                Ok(paths) => {
                    for path in paths {
                        let span = self.span_of(site.span, &path.raw);
                        found.push((path, span));
                    }
                    for name in template::helpers(&site.text).unwrap_or_default() {
                        if !template::HELPERS.contains(&name.as_str()) {
                            let span = self.span_of(site.span, &name);
                            self.problem(
                                ProblemKind::UnknownHelper {
                                    suggestion: self
                                        .suggest(&name, template::HELPERS.iter().copied()),
                                    name,
                                },
                                span,
                            );
                        }
                    }
                }
                Err(error) => self.problem(
                    ProblemKind::TemplateSyntax {
                        message: template_message(&error.message),
                    },
                    site.span,
                ),
            }
        }
        found
    }

    /// The span of `needle` inside the source text of `within`, else `within`.
    fn span_of(&self, within: Span, needle: &str) -> Span {
        let text = self
            .source
            .text
            .get(within.offset..within.offset + within.len)
            .unwrap_or("");
        match text.find(needle) {
            Some(i) => Span::new(within.offset + i, needle.len()),
            None => within,
        }
    }

    /// Checks one path; returns the step it reads outputs of, if any.
    fn check_ref(
        &mut self,
        path: &PathRef,
        span: Span,
        params: &HashSet<&str>,
        drafts: &[StepDraft],
        index: &HashMap<&str, usize>,
    ) -> Option<usize> {
        match path.target() {
            Target::Param(name) => {
                if !params.contains(name) {
                    self.problem(
                        ProblemKind::UnknownParamRef {
                            param: name.to_owned(),
                            suggestion: self.suggest(name, params.iter().copied()),
                        },
                        span,
                    );
                }
                None
            }
            Target::StepOutput { step, output } => {
                let Some(&target) = index.get(step) else {
                    self.problem(
                        ProblemKind::UnknownStepRef {
                            step: step.to_owned(),
                            suggestion: self.suggest(step, index.keys().copied()),
                        },
                        span,
                    );
                    return None;
                };
                let draft = &drafts[target];
                let declared = declared_outputs(draft);
                if let Some(declared) = declared
                    && !declared.iter().any(|d| d == output)
                {
                    self.problem(
                        ProblemKind::UnknownOutput {
                            step: step.to_owned(),
                            uses: draft.uses.value.clone(),
                            output: output.to_owned(),
                            declared,
                        },
                        span,
                    );
                }
                Some(target)
            }
            Target::Run(field) if RUN_FIELDS.contains(&field) => None,
            Target::Run(_) | Target::Unknown if path.nested => None,
            Target::Run(_) | Target::Unknown => {
                if let Some(step) = path.step()
                    && !index.contains_key(step)
                {
                    self.problem(
                        ProblemKind::UnknownStepRef {
                            step: step.to_owned(),
                            suggestion: self.suggest(step, index.keys().copied()),
                        },
                        span,
                    );
                    return None;
                }
                self.problem(
                    ProblemKind::UnknownVariable {
                        path: path.raw.clone(),
                        hint: "templates read `params.<name>`, `steps.<id>.outputs.<name>`, `run.id` and `run.started_at`".into(),
                    },
                    span,
                );
                None
            }
        }
    }

    /// Kahn's algorithm, always taking the earliest-written ready step, so the order is
    /// deterministic and as close to the file as the edges allow. A leftover means a cycle.
    fn order(&mut self, drafts: &[StepDraft], edges: &[(usize, usize)]) -> Option<Vec<usize>> {
        let mut graph: DiGraph<usize, ()> = DiGraph::new();
        let nodes: Vec<NodeIndex> = (0..drafts.len()).map(|i| graph.add_node(i)).collect();
        for &(from, to) in edges {
            graph.update_edge(nodes[from], nodes[to], ());
        }
        let mut indegree: Vec<usize> = nodes
            .iter()
            .map(|&n| {
                graph
                    .neighbors_directed(n, petgraph::Direction::Incoming)
                    .count()
            })
            .collect();
        let mut ready: BinaryHeap<Reverse<usize>> = indegree
            .iter()
            .enumerate()
            .filter(|(_, d)| **d == 0)
            .map(|(i, _)| Reverse(i))
            .collect();
        let mut order = Vec::with_capacity(drafts.len());
        while let Some(Reverse(i)) = ready.pop() {
            order.push(i);
            for next in graph.neighbors_directed(nodes[i], petgraph::Direction::Outgoing) {
                let j = graph[next];
                indegree[j] -= 1;
                if indegree[j] == 0 {
                    ready.push(Reverse(j));
                }
            }
        }
        if order.len() == drafts.len() {
            return Some(order);
        }
        for component in petgraph::algo::tarjan_scc(&graph) {
            if component.len() < 2 {
                continue;
            }
            let members: HashSet<NodeIndex> = component.iter().copied().collect();
            let start = *component
                .iter()
                .min_by_key(|n| graph[**n])
                .expect("non-empty");
            let cycle = find_cycle(&graph, start, &members);
            let path: Vec<String> = cycle
                .iter()
                .map(|n| drafts[graph[*n]].id.value.clone())
                .collect();
            self.problem(ProblemKind::Cycle { path }, drafts[graph[start]].id.span);
        }
        None
    }
}

/// A path from `start` back to itself inside one strongly connected component, found by
/// depth-first search, always trying the earliest-written step first.
fn find_cycle(
    graph: &DiGraph<usize, ()>,
    start: NodeIndex,
    members: &HashSet<NodeIndex>,
) -> Vec<NodeIndex> {
    fn dfs(
        graph: &DiGraph<usize, ()>,
        node: NodeIndex,
        start: NodeIndex,
        members: &HashSet<NodeIndex>,
        path: &mut Vec<NodeIndex>,
        visited: &mut HashSet<NodeIndex>,
    ) -> bool {
        let mut next: Vec<NodeIndex> = graph
            .neighbors_directed(node, petgraph::Direction::Outgoing)
            .filter(|n| members.contains(n))
            .collect();
        next.sort_by_key(|n| graph[*n]);
        for n in next {
            if n == start {
                path.push(n);
                return true;
            }
            if visited.insert(n) {
                path.push(n);
                if dfs(graph, n, start, members, path, visited) {
                    return true;
                }
                path.pop();
            }
        }
        false
    }
    let mut path = vec![start];
    let mut visited = HashSet::from([start]);
    dfs(graph, start, start, members, &mut path, &mut visited);
    path
}

/// The outputs a step declares, or `None` if they cannot be known at compile time.
fn declared_outputs(draft: &StepDraft) -> Option<Vec<String>> {
    if let Some(fragment) = &draft.fragment {
        return Some(
            fragment
                .0
                .outputs
                .iter()
                .map(|(name, _)| name.clone())
                .collect(),
        );
    }
    let spec = draft.spec?;
    match spec.outputs {
        OutputsSpec::Fixed(outputs) => Some(outputs.iter().map(|o| o.name.to_owned()).collect()),
        OutputsSpec::KeysOf(param) => {
            let given = draft
                .with
                .as_ref()
                .and_then(Yaml::as_map)
                .and_then(|with| with.iter().find(|(k, _)| k.value == param));
            match given {
                // Absent: no outputs. Not a mapping (a template): unknown until rendered.
                None => Some(Vec::new()),
                Some((_, value)) => Some(
                    value
                        .as_map()?
                        .iter()
                        .map(|(k, _)| k.value.clone())
                        .collect(),
                ),
            }
        }
    }
}

fn site(text: &Spanned<String>) -> TemplateSite {
    TemplateSite {
        text: text.value.clone(),
        span: text.span,
    }
}

fn collect_templates(value: &Yaml, sites: &mut Vec<TemplateSite>) {
    match &value.value {
        YamlValue::Str(s) if template::is_template(s) => sites.push(TemplateSite {
            text: s.clone(),
            span: value.span,
        }),
        YamlValue::Seq(items) => items.iter().for_each(|i| collect_templates(i, sites)),
        YamlValue::Map(entries) => entries
            .iter()
            .for_each(|(_, v)| collect_templates(v, sites)),
        _ => {}
    }
}

/// Parameter patterns must match the whole value.
/// Handlebars' parser lists every token it could have accepted; say what is usually wrong.
fn template_message(message: &str) -> String {
    let message = first_line(message);
    if message.matches(", ").count() > 3 {
        "the template is not closed: every `{{` needs its `}}`, and every `{{#block}}` its `{{/block}}`".to_owned()
    } else {
        message
    }
}

/// The regex crate draws a caret diagram; keep its last line, which says what is wrong.
fn regex_message(error: &regex::Error) -> String {
    let text = error.to_string();
    text.lines()
        .rev()
        .find(|l| l.trim_start().starts_with("error:"))
        .map(|l| {
            l.trim_start()
                .trim_start_matches("error:")
                .trim()
                .to_owned()
        })
        .unwrap_or_else(|| first_line(&text))
}

fn first_line(text: &str) -> String {
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .unwrap_or(text)
        .to_owned()
}

/// The fragments of a runbook's steps, by step id.
fn drafts_fragments(
    drafts: &[StepDraft],
) -> HashMap<String, (CompiledRunbook, Map<String, Value>)> {
    drafts
        .iter()
        .filter_map(|d| Some((d.id.value.clone(), (*d.fragment.clone()?).clone())))
        .collect()
}

/// Whether a fragment path may be read: relative, inside the including runbook's folder (no
/// `..`, no root, no drive), and a YAML file.
pub fn confined_fragment_path(path: &str) -> Result<(), String> {
    let as_path = std::path::Path::new(path);
    if as_path.is_absolute() || path.starts_with(['/', '\\']) || path.contains(':') {
        return Err(format!(
            "`{path}` is absolute: fragments are read only from the including runbook's folder"
        ));
    }
    if as_path.components().any(|c| {
        !matches!(
            c,
            std::path::Component::Normal(_) | std::path::Component::CurDir
        )
    }) || path.split(['/', '\\']).any(|part| part == "..")
    {
        return Err(format!("`{path}` leaves the including runbook's folder"));
    }
    if !(path.ends_with(".yaml") || path.ends_with(".yml")) {
        return Err(format!(
            "`{path}` is not a runbook file (`.yaml` or `.yml`)"
        ));
    }
    Ok(())
}
