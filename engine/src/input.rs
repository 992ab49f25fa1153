//! Checking a step's input against its kind's declared parameters, before and after rendering.

use serde_json::Value;

use crate::duration::parse_duration;
use crate::kind::{KindSpec, ParamSpec, ValueType};

/// Checks one value against its declared parameter: type, allowed values and pattern.
pub fn check_value(param: &ParamSpec, value: &Value) -> Result<(), String> {
    let type_ok = match (param.ty, value) {
        (ValueType::Any, _) => true,
        (ValueType::String, Value::String(_)) => true,
        (ValueType::Int, Value::Number(n)) => n.is_i64() || n.is_u64(),
        (ValueType::Bool, Value::Bool(_)) => true,
        (ValueType::Map, Value::Object(_)) => true,
        (ValueType::List, Value::Array(_)) => true,
        (ValueType::Duration, Value::String(s)) => {
            return parse_duration(s).map(|_| ()).map_err(|e| e.to_string());
        }
        _ => false,
    };
    if !type_ok {
        return Err(format!(
            "expected {}, found {}",
            param.ty.describe(),
            json_type(value)
        ));
    }
    if let Value::String(s) = value {
        if !param.one_of.is_empty() && !param.one_of.contains(&s.as_str()) {
            return Err(format!(
                "`{s}` is not one of {}",
                param
                    .one_of
                    .iter()
                    .map(|v| format!("`{v}`"))
                    .collect::<Vec<_>>()
                    .join(", ")
            ));
        }
        if let Some(pattern) = param.pattern
            && !crate::pattern::whole(pattern)
                .expect("step kind patterns are valid")
                .is_match(s)
        {
            return Err(format!("`{s}` does not match `{pattern}`"));
        }
    }
    Ok(())
}

/// Coerces rendered text to the declared types (`"3"` for an int parameter becomes `3`) and
/// checks every parameter. Rendered values are checked here, at bind time, so a parameter can
/// never smuggle a `/` or `?` into a name that ends up in a URL.
pub fn prepare_input(spec: &KindSpec, rendered: Value) -> Result<Value, String> {
    let Value::Object(mut entries) = rendered else {
        return Err("`with` must be a mapping".into());
    };
    for param in spec.params {
        let Some(value) = entries.get_mut(param.name) else {
            if param.required {
                return Err(format!("missing `{}`", param.name));
            }
            continue;
        };
        if let Value::String(text) = value {
            let coerced = match param.ty {
                ValueType::Int => text.trim().parse::<i64>().ok().map(Value::from),
                ValueType::Bool => match text.trim() {
                    "true" => Some(Value::Bool(true)),
                    "false" => Some(Value::Bool(false)),
                    _ => None,
                },
                _ => None,
            };
            if let Some(coerced) = coerced {
                *value = coerced;
            }
        }
        check_value(param, value).map_err(|reason| format!("`{}`: {reason}", param.name))?;
    }
    Ok(Value::Object(entries))
}

fn json_type(value: &Value) -> &'static str {
    match value {
        Value::Null => "nothing",
        Value::Bool(_) => "a boolean",
        Value::Number(n) if n.is_f64() => "a number",
        Value::Number(_) => "an integer",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "a mapping",
    }
}
