//! The JSON Schema of the runbook format, for editors (yaml-language-server and friends).
//! Step kinds contribute the schema of their `with:` from their declared parameters.

use serde_json::{Value, json};

use crate::kind::{KindSpec, Registry, ValueType};

fn value_schema(ty: ValueType) -> Value {
    let template = json!({"type": "string", "pattern": "\\{\\{"});
    match ty {
        ValueType::String => json!({"type": "string"}),
        ValueType::Int => json!({"anyOf": [{"type": "integer"}, template]}),
        ValueType::Bool => json!({"anyOf": [{"type": "boolean"}, template]}),
        ValueType::Duration => {
            json!({"type": "string", "pattern": "^(\\d+(ms|s|m|h|d))+$|\\{\\{"})
        }
        ValueType::Map => json!({"type": "object"}),
        ValueType::List => json!({"anyOf": [{"type": "array"}, template]}),
        ValueType::Any => json!({}),
    }
}

fn with_schema(spec: &KindSpec) -> Value {
    let properties: serde_json::Map<String, Value> = spec
        .params
        .iter()
        .map(|p| {
            let mut schema = value_schema(p.ty);
            if !p.one_of.is_empty() {
                // A fixed choice, or a template that renders one (a fragment passes its
                // parameter on).
                let template = json!({"type": "string", "pattern": "\\{\\{"});
                schema = json!({"anyOf": [{"enum": p.one_of}, template]});
            }
            schema["description"] = json!(p.description);
            (p.name.to_owned(), schema)
        })
        .collect();
    let required: Vec<&str> = spec
        .params
        .iter()
        .filter(|p| p.required)
        .map(|p| p.name)
        .collect();
    json!({"type": "object", "additionalProperties": false, "properties": properties, "required": required})
}

/// The schema, as a JSON value.
pub fn runbook_schema(registry: &Registry) -> Value {
    // `runbook` includes a fragment; it is the compiler's, not a registered kind.
    let kinds: Vec<&str> = registry.names().chain(["runbook"]).collect();
    let mut per_kind: Vec<Value> = registry
        .specs()
        .map(|spec| {
            json!({
                "if": {"properties": {"uses": {"const": spec.name}}, "required": ["uses"]},
                "then": {"properties": {"with": with_schema(spec)}},
            })
        })
        .collect();
    per_kind.push(json!({
        "if": {"properties": {"uses": {"const": "runbook"}}, "required": ["uses"]},
        "then": {"properties": {"with": {
            "type": "object",
            "additionalProperties": false,
            "required": ["path"],
            "properties": {
                "path": {"type": "string", "description": "the fragment, relative to this runbook's folder"},
                "params": {"type": "object", "description": "the fragment's parameters"},
            },
        }}},
    }));
    let duration = json!({"type": "string", "pattern": "^(\\d+(ms|s|m|h|d))+$"});
    json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "title": "kmsflow runbook",
        "type": "object",
        "additionalProperties": false,
        "required": ["name", "steps"],
        "properties": {
            "name": {"type": "string"},
            "description": {"type": "string"},
            "lock": {"type": "string", "description": "runs with the same rendered key never overlap"},
            "params": {
                "type": "object",
                "propertyNames": {"pattern": "^[a-z][a-z0-9_]*$"},
                "additionalProperties": {
                    "type": "object",
                    "additionalProperties": false,
                    "properties": {
                        "type": {"enum": ["string", "int", "bool", "duration"]},
                        "description": {"type": "string"},
                        "default": {},
                        "enum": {"type": "array", "minItems": 1},
                        "pattern": {"type": "string"},
                        "secret": {"type": "boolean"},
                        "env": {"type": "string"},
                    },
                },
            },
            "steps": {
                "type": "array",
                "minItems": 1,
                "items": {
                    "type": "object",
                    "additionalProperties": false,
                    "required": ["id", "uses"],
                    "properties": {
                        "id": {"type": "string", "pattern": "^[A-Za-z][A-Za-z0-9_-]*$"},
                        "uses": {"enum": kinds},
                        "description": {"type": "string"},
                        "needs": {"anyOf": [{"type": "string"}, {"type": "array", "items": {"type": "string"}}]},
                        "with": {"type": "object"},
                        "if": {"type": ["string", "boolean"]},
                        "timeout": duration,
                        "sensitive_outputs": {"type": "array", "items": {"type": "string"}},
                        "retry": {
                            "type": "object",
                            "additionalProperties": false,
                            "properties": {
                                "attempts": {"type": "integer", "minimum": 1, "maximum": 1000},
                                "backoff": {"enum": ["exponential", "fixed"]},
                                "initial": duration,
                                "max": duration,
                            },
                        },
                    },
                    "allOf": per_kind,
                },
            },
            "outputs": {"type": "object", "additionalProperties": {"type": "string"}},
        },
    })
}
