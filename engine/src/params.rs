//! Binding parameters: `-p key=value`, `--params-file`, environment, defaults.

use std::collections::{BTreeMap, HashMap};

use serde_json::{Map, Value};

use crate::diagnostic::suggest;
use crate::duration::parse_duration;
use crate::kind::ValueType;
use crate::runbook::{CompiledRunbook, ParamDecl};

/// Where parameter values come from, highest precedence first: `-p`, the params file, the
/// environment (`KMSFLOW_PARAM_<NAME>`, then the parameter's own `env`), then defaults.
#[derive(Debug, Clone, Default)]
pub struct ParamSources {
    /// `-p key=value`, as given.
    pub cli: Vec<(String, String)>,
    /// The mapping read from `--params-file`.
    pub file: Map<String, Value>,
    /// The environment (passed in, so binding stays testable and compile stays pure).
    pub env: HashMap<String, String>,
    /// Values from an earlier bind (resume), below the environment and above defaults.
    pub stored: Map<String, Value>,
    /// Defaults supplied by the caller for parameters without one (the sandbox's names).
    pub fallback: Map<String, Value>,
}

/// One parameter that could not be bound.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("parameter `{name}`: {reason}")]
pub struct BindError {
    pub name: String,
    pub reason: String,
}

/// Every parameter problem at once.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{}", errors.iter().map(ToString::to_string).collect::<Vec<_>>().join("\n"))]
pub struct BindErrors {
    pub errors: Vec<BindError>,
}

/// Bound parameter values, with the names of the secret ones.
#[derive(Clone, Default, PartialEq)]
pub struct BoundParams {
    values: BTreeMap<String, Value>,
    secret: Vec<String>,
}

impl std::fmt::Debug for BoundParams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_map().entries(self.redacted().iter()).finish()
    }
}

impl BoundParams {
    /// Every value, secrets included: only for the template context.
    pub fn values(&self) -> Map<String, Value> {
        self.values
            .iter()
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    }

    /// What may be stored: every parameter except the secret ones.
    pub fn storable(&self) -> Value {
        Value::Object(
            self.values
                .iter()
                .filter(|(k, _)| !self.secret.contains(k))
                .map(|(k, v)| (k.clone(), v.clone()))
                .collect(),
        )
    }

    /// What may be shown: secrets as `"***"`.
    pub fn redacted(&self) -> Map<String, Value> {
        self.values
            .iter()
            .map(|(k, v)| {
                let shown = if self.secret.contains(k) {
                    Value::String("***".into())
                } else {
                    v.clone()
                };
                (k.clone(), shown)
            })
            .collect()
    }

    /// The secret values, for scrubbing them from anything stored or printed.
    pub fn secret_values(&self) -> Vec<String> {
        self.secret
            .iter()
            .filter_map(|k| self.values.get(k))
            .map(secret_text)
            .collect()
    }

    pub fn get(&self, name: &str) -> Option<&Value> {
        self.values.get(name)
    }

    /// Whether `name` is a secret parameter.
    pub fn is_secret(&self, name: &str) -> bool {
        self.secret.iter().any(|s| s == name)
    }
}

/// The shortest secret parameter value bound: masking a shorter one reveals it.
pub const MIN_SECRET_CHARS: usize = 4;

/// A secret value as text, as it appears in what it is rendered into.
fn secret_text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    }
}

/// Binds and checks every declared parameter; reports every problem at once.
pub fn bind(runbook: &CompiledRunbook, sources: &ParamSources) -> Result<BoundParams, BindErrors> {
    let mut errors = Vec::new();
    let names: Vec<&str> = runbook.params.iter().map(|p| p.name.as_str()).collect();
    for (key, _) in &sources.cli {
        if !names.contains(&key.as_str()) {
            errors.push(unknown(key, &names));
        }
    }
    for key in sources.file.keys() {
        if !names.contains(&key.as_str()) {
            errors.push(unknown(key, &names));
        }
    }
    let mut bound = BoundParams::default();
    for param in &runbook.params {
        let raw = sources
            .cli
            .iter()
            .rev()
            .find(|(k, _)| k == &param.name)
            .map(|(_, v)| Value::String(v.clone()))
            .or_else(|| sources.file.get(&param.name).cloned())
            .or_else(|| {
                sources
                    .env
                    .get(&format!("KMSFLOW_PARAM_{}", param.name.to_uppercase()))
                    .or_else(|| param.env.as_ref().and_then(|e| sources.env.get(e)))
                    .map(|v| Value::String(v.clone()))
            })
            .or_else(|| {
                (!param.secret)
                    .then(|| sources.stored.get(&param.name).cloned())
                    .flatten()
            })
            .or_else(|| param.default.clone())
            .or_else(|| sources.fallback.get(&param.name).cloned());
        let Some(raw) = raw else {
            let mut reason = "is required".to_owned();
            if param.secret {
                reason.push_str(" (secret: never stored, so pass it again on resume)");
            }
            let mut ways = vec![format!("`-p {}=...`", param.name)];
            ways.push(format!("`KMSFLOW_PARAM_{}`", param.name.to_uppercase()));
            if let Some(env) = &param.env {
                ways.push(format!("`{env}`"));
            }
            reason.push_str(&format!("; set it with {}", ways.join(" or ")));
            errors.push(BindError {
                name: param.name.clone(),
                reason,
            });
            continue;
        };
        match check(param, raw) {
            Ok(value) if param.secret && secret_text(&value).chars().count() < MIN_SECRET_CHARS => {
                errors.push(BindError {
                    name: param.name.clone(),
                    reason: format!(
                        "a secret must be at least {MIN_SECRET_CHARS} characters: kmsflow masks a secret wherever it appears, and masking one this short would give it away (every `a` in a message turned to `***`)"
                    ),
                });
            }
            Ok(value) => {
                bound.values.insert(param.name.clone(), value);
                if param.secret {
                    bound.secret.push(param.name.clone());
                }
            }
            Err(reason) => errors.push(BindError {
                name: param.name.clone(),
                reason,
            }),
        }
    }
    if errors.is_empty() {
        Ok(bound)
    } else {
        Err(BindErrors { errors })
    }
}

const KEEP_STORED: &str = "resume and rollback act on what the run touched, so they keep the stored values; \
     drop the new values (unset the variable, remove the `-p`), or pass `--allow-param-change` \
     to move the run on purpose";

/// A value given now that differs from the one the run was started with.
#[derive(Debug, Clone, PartialEq)]
pub struct ParamConflict {
    pub name: String,
    pub stored: Value,
    pub given: Value,
    /// Where the new value came from: `-p`, the params file, or an environment variable.
    pub from: String,
}

/// Values given to resume or rollback that would move the run to another target.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}", conflicts.iter().map(|c| format!(
    "parameter `{}`: run `{run_id}` was started with {}, but {} says {}",
    c.name, shown(&c.stored), c.from, shown(&c.given)
)).chain([KEEP_STORED.to_owned()]).collect::<Vec<_>>().join("\n"))]
pub struct ParamConflicts {
    pub run_id: String,
    pub conflicts: Vec<ParamConflict>,
}

fn shown(value: &Value) -> String {
    match value {
        Value::String(s) => format!("`{s}`"),
        other => format!("`{other}`"),
    }
}

/// Why a stored run's parameters could not be bound again.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum RebindError {
    #[error(transparent)]
    Conflicts(ParamConflicts),
    #[error(transparent)]
    Invalid(BindErrors),
}

/// The value `sources` give `param` from `-p`, the params file or the environment (not
/// defaults), with where it came from.
fn given_value(param: &ParamDecl, sources: &ParamSources) -> Option<(Value, String)> {
    if let Some((_, v)) = sources.cli.iter().rev().find(|(k, _)| k == &param.name) {
        return Some((Value::String(v.clone()), format!("`-p {}`", param.name)));
    }
    if let Some(v) = sources.file.get(&param.name) {
        return Some((v.clone(), "the params file".to_owned()));
    }
    let prefixed = format!("KMSFLOW_PARAM_{}", param.name.to_uppercase());
    if let Some(v) = sources.env.get(&prefixed) {
        return Some((
            Value::String(v.clone()),
            format!("the environment (`{prefixed}`)"),
        ));
    }
    let env = param.env.as_ref()?;
    let v = sources.env.get(env)?;
    Some((
        Value::String(v.clone()),
        format!("the environment (`{env}`)"),
    ))
}

/// Binds the parameters of a stored run again (resume, rollback): the values it stored win,
/// and a different value given now is refused, naming it, unless `allow_change`. Secret
/// parameters, never stored, come from `given` as for a new run; so do parameters a changed
/// runbook adds.
pub fn rebind(
    runbook: &CompiledRunbook,
    run_id: &str,
    stored: &Map<String, Value>,
    given: &ParamSources,
    allow_change: bool,
) -> Result<BoundParams, RebindError> {
    let mut sources = given.clone();
    sources.stored = stored.clone();
    let mut conflicts = Vec::new();
    for param in runbook.params.iter().filter(|p| !p.secret) {
        let Some(stored_value) = stored.get(&param.name) else {
            continue;
        };
        if let Some((raw, from)) = given_value(param, given) {
            // Compared as bound (`"3"` given for an int is 3). A value that does not bind differs
            // from the stored one all the same: refused, or (when allowed) left for `bind` to
            // report, never silently dropped.
            let given_value = match check(param, raw.clone()) {
                Ok(value) if value == *stored_value => None,
                Ok(value) => Some(value),
                Err(_) => Some(raw),
            };
            match given_value {
                None => {}
                Some(_) if allow_change => continue,
                Some(given) => conflicts.push(ParamConflict {
                    name: param.name.clone(),
                    stored: stored_value.clone(),
                    given,
                    from,
                }),
            }
        }
        // The stored value is the one: nothing given now stands above it.
        sources.cli.retain(|(k, _)| k != &param.name);
        sources.file.remove(&param.name);
        sources
            .env
            .remove(&format!("KMSFLOW_PARAM_{}", param.name.to_uppercase()));
        if let Some(env) = &param.env {
            sources.env.remove(env);
        }
    }
    if !conflicts.is_empty() {
        return Err(RebindError::Conflicts(ParamConflicts {
            run_id: run_id.to_owned(),
            conflicts,
        }));
    }
    // A parameter the stored run has but a changed runbook dropped is not an error.
    let names: Vec<&str> = runbook.params.iter().map(|p| p.name.as_str()).collect();
    sources.stored.retain(|k, _| names.contains(&k.as_str()));
    bind(runbook, &sources).map_err(RebindError::Invalid)
}

fn unknown(key: &str, names: &[&str]) -> BindError {
    let mut reason = "is not a parameter of this runbook".to_owned();
    if let Some(s) = suggest(key, names.iter().copied()) {
        reason.push_str(&format!("; did you mean `{s}`?"));
    }
    BindError {
        name: key.to_owned(),
        reason,
    }
}

/// Converts text to the declared type and checks `enum` and `pattern`.
fn check(param: &ParamDecl, raw: Value) -> Result<Value, String> {
    let shown = |v: &Value| {
        if param.secret {
            "the given value".to_owned()
        } else {
            match v {
                Value::String(s) => format!("`{s}`"),
                other => format!("`{other}`"),
            }
        }
    };
    let value = match (param.ty, &raw) {
        (ValueType::String, Value::String(_)) => raw.clone(),
        (ValueType::String, Value::Number(_) | Value::Bool(_)) => Value::String(raw.to_string()),
        (ValueType::Int, Value::Number(n)) if n.is_i64() => raw.clone(),
        (ValueType::Int, Value::String(s)) => s
            .trim()
            .parse::<i64>()
            .map(Value::from)
            .map_err(|_| format!("{} is not an integer", shown(&raw)))?,
        (ValueType::Bool, Value::Bool(_)) => raw.clone(),
        (ValueType::Bool, Value::String(s)) => match s.trim() {
            "true" => Value::Bool(true),
            "false" => Value::Bool(false),
            _ => return Err(format!("{} is not `true` or `false`", shown(&raw))),
        },
        (ValueType::Duration, Value::String(s)) => {
            parse_duration(s).map_err(|e| e.to_string())?;
            raw.clone()
        }
        _ => {
            return Err(format!(
                "expected {}, found {}",
                param.ty.describe(),
                shown(&raw)
            ));
        }
    };
    if !param.enum_values.is_empty() && !param.enum_values.contains(&value) {
        return Err(format!(
            "{} is not one of {}",
            shown(&value),
            param
                .enum_values
                .iter()
                .map(|v| format!(
                    "`{}`",
                    v.as_str().map_or_else(|| v.to_string(), str::to_owned)
                ))
                .collect::<Vec<_>>()
                .join(", ")
        ));
    }
    if let (Some(pattern), Value::String(s)) = (&param.pattern, &value) {
        let regex = crate::pattern::whole(pattern).map_err(|e| format!("invalid pattern: {e}"))?;
        if !regex.is_match(s) {
            return Err(format!("{} does not match `{pattern}`", shown(&value)));
        }
    }
    Ok(value)
}

/// Parses `key=value` as given to `-p`.
pub fn parse_assignment(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.trim().is_empty() => {
            Ok((key.trim().to_owned(), value.to_owned()))
        }
        _ => Err(format!("`{text}` is not `key=value`")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::diagnostic::RunbookSource;
    use crate::kind::Registry;
    use serde_json::json;

    fn stored(pairs: &[(&str, Value)]) -> Map<String, Value> {
        pairs
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect()
    }

    #[test]
    fn rebinding_keeps_the_stored_values_and_refuses_different_ones() {
        let runbook = runbook();
        let stored = stored(&[
            ("cluster", json!("aks-1")),
            ("location", json!("eastus")),
            ("count", json!(3)),
        ]);
        let secret = HashMap::from([("MY_TOKEN".to_owned(), "s3cret".to_owned())]);
        // Nothing new given (but the secret): the stored values, whatever the defaults say.
        let bound = rebind(
            &runbook,
            "r1",
            &stored,
            &ParamSources {
                env: secret.clone(),
                ..Default::default()
            },
            false,
        )
        .unwrap();
        assert_eq!(bound.get("cluster"), Some(&json!("aks-1")));
        // The same values given again are fine, as bound: `"3"` is 3.
        let same = ParamSources {
            cli: vec![("count".into(), "3".into())],
            env: secret.clone(),
            ..Default::default()
        };
        rebind(&runbook, "r1", &stored, &same, false).unwrap();
        // A different value, from `-p` and from the environment: refused, both named.
        let mut env = secret.clone();
        env.insert("KMSFLOW_PARAM_CLUSTER".into(), "aks-other".into());
        let moved = ParamSources {
            cli: vec![("location".into(), "westeurope".into())],
            env,
            ..Default::default()
        };
        let RebindError::Conflicts(refused) =
            rebind(&runbook, "r1", &stored, &moved, false).unwrap_err()
        else {
            panic!("a conflict")
        };
        let text = refused.to_string();
        assert!(
            text.contains("parameter `cluster`: run `r1` was started with `aks-1`, but the environment (`KMSFLOW_PARAM_CLUSTER`) says `aks-other`"),
            "{text}"
        );
        assert!(text.contains("`-p location` says `westeurope`"), "{text}");
        assert!(text.contains("--allow-param-change"), "{text}");
        // A value that does not even bind is refused too, not dropped in silence.
        let invalid = ParamSources {
            cli: vec![("count".into(), "three".into())],
            env: secret.clone(),
            ..Default::default()
        };
        assert!(matches!(
            rebind(&runbook, "r1", &stored, &invalid, false),
            Err(RebindError::Conflicts(_))
        ));
        // On purpose: the new values win.
        let bound = rebind(&runbook, "r1", &stored, &moved, true).unwrap();
        assert_eq!(bound.get("cluster"), Some(&json!("aks-other")));
        assert_eq!(bound.get("location"), Some(&json!("westeurope")));
    }

    fn runbook() -> CompiledRunbook {
        let text = r#"
name: t
params:
  cluster: { type: string, pattern: '^[a-z0-9-]{1,63}$' }
  location: { type: string, default: eastus, enum: [eastus, westeurope] }
  count: { type: int, default: 3 }
  token: { type: string, secret: true, env: MY_TOKEN }
steps:
  - id: a
    uses: noop
"#;
        crate::compile::compile(
            &RunbookSource::new("t.yaml", text),
            &Registry::with_engine_kinds(),
        )
        .unwrap()
    }

    fn sources(cli: &[(&str, &str)]) -> ParamSources {
        ParamSources {
            cli: cli
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
            ..Default::default()
        }
    }

    #[test]
    fn binds_and_keeps_secrets_out_of_storage() {
        let mut s = sources(&[("cluster", "aks-1"), ("count", "5")]);
        s.env.insert("MY_TOKEN".into(), "s3cret".into());
        let bound = bind(&runbook(), &s).unwrap();
        assert_eq!(bound.get("count"), Some(&Value::from(5)));
        assert_eq!(bound.get("token"), Some(&Value::from("s3cret")));
        assert!(!bound.storable().to_string().contains("s3cret"));
        assert!(!format!("{bound:?}").contains("s3cret"));
        assert_eq!(bound.secret_values(), vec!["s3cret".to_owned()]);
    }

    #[test]
    fn reports_every_problem_naming_the_parameter() {
        let errors = bind(
            &runbook(),
            &sources(&[
                ("cluster", "Bad/Name"),
                ("count", "many"),
                ("location", "mars"),
                ("clustr", "x"),
            ]),
        )
        .unwrap_err();
        let text = errors.to_string();
        assert!(
            text.contains(
                "parameter `clustr`: is not a parameter of this runbook; did you mean `cluster`?"
            ),
            "{text}"
        );
        assert!(
            text.contains("parameter `cluster`: `Bad/Name` does not match"),
            "{text}"
        );
        assert!(
            text.contains("parameter `count`: `many` is not an integer"),
            "{text}"
        );
        assert!(
            text.contains("parameter `location`: `mars` is not one of `eastus`, `westeurope`"),
            "{text}"
        );
        assert!(
            text.contains("parameter `token`: is required (secret"),
            "{text}"
        );
    }
}
