//! Runbook fragments: a `uses: runbook` step includes another runbook file, compiled into the
//! same DAG and checkpointed step by step.
//!
//! A call `S` to fragment `F` becomes, in the compiled runbook:
//! - `S--params`, a `noop` whose outputs are `F`'s parameters, rendered in the caller's context
//!   (it carries `S`'s `needs`, output references and `if`, so the fragment waits for what the
//!   call waits for, and is skipped with it);
//! - each step `T` of `F` as `S--T`, its templates rewritten: `params.x` reads
//!   `steps.S--params.outputs.x`, `steps.U.` reads `steps.S--U.`;
//! - `S` itself, a `noop` whose outputs are `F`'s outputs, after every step of `F`, so the
//!   caller's steps that read `steps.S.outputs.*` wait for the whole fragment.

use std::cmp::Reverse;
use std::collections::{BinaryHeap, HashMap};
use std::sync::LazyLock;

use regex::Regex;
use serde_json::{Map, Value, json};

use crate::runbook::{CompiledRunbook, CompiledStep, RetryPolicy};

static PATH: LazyLock<Regex> = LazyLock::new(|| {
    Regex::new(r"\b(?:params\.([A-Za-z0-9_]+)|steps\.([A-Za-z0-9_-]+)\.)").expect("valid regex")
});
static MUSTACHE: LazyLock<Regex> =
    LazyLock::new(|| Regex::new(r"\{\{.*?\}\}").expect("valid regex"));

/// Rewrites the paths inside every `{{...}}` of a template for fragment call `prefix`.
pub(crate) fn rewrite(text: &str, prefix: &str) -> String {
    MUSTACHE
        .replace_all(text, |block: &regex::Captures<'_>| {
            PATH.replace_all(&block[0], |path: &regex::Captures<'_>| {
                match (path.get(1), path.get(2)) {
                    (Some(param), _) => {
                        format!("steps.{prefix}--params.outputs.{}", param.as_str())
                    }
                    (_, Some(step)) => format!("steps.{prefix}--{}.", step.as_str()),
                    _ => path[0].to_owned(),
                }
            })
            .into_owned()
        })
        .into_owned()
}

fn rewrite_value(value: &Value, prefix: &str) -> Value {
    match value {
        Value::String(text) => Value::String(rewrite(text, prefix)),
        Value::Array(items) => {
            Value::Array(items.iter().map(|v| rewrite_value(v, prefix)).collect())
        }
        Value::Object(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.clone(), rewrite_value(v, prefix)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// Replaces every fragment call among `steps` by the fragment's steps, and orders the result.
pub(crate) fn expand(
    steps: Vec<CompiledStep>,
    fragments: &HashMap<String, (CompiledRunbook, Map<String, Value>)>,
) -> Vec<CompiledStep> {
    if fragments.is_empty() {
        return steps;
    }
    let mut expanded = Vec::with_capacity(steps.len());
    for step in steps {
        let Some((fragment, given)) = fragments.get(&step.id) else {
            expanded.push(step);
            continue;
        };
        let prefix = step.id.clone();
        let params_id = format!("{prefix}--params");
        expanded.push(CompiledStep {
            id: params_id.clone(),
            uses: "noop".into(),
            description: Some(format!("parameters of fragment `{}`", fragment.name)),
            with: json!({"outputs": given}),
            condition: step.condition.clone(),
            needs: step.needs.clone(),
            reads_outputs_of: step.reads_outputs_of.clone(),
            retry: RetryPolicy::default(),
            timeout: None,
            may_be_irreversible: false,
            sensitive_outputs: Vec::new(),
        });
        let inner_ids: Vec<String> = fragment
            .steps
            .iter()
            .map(|s| format!("{prefix}--{}", s.id))
            .collect();
        for inner in &fragment.steps {
            let mut needs = vec![params_id.clone()];
            needs.extend(inner.needs.iter().map(|n| format!("{prefix}--{n}")));
            let mut reads = vec![params_id.clone()];
            reads.extend(
                inner
                    .reads_outputs_of
                    .iter()
                    .map(|n| format!("{prefix}--{n}")),
            );
            expanded.push(CompiledStep {
                id: format!("{prefix}--{}", inner.id),
                uses: inner.uses.clone(),
                description: inner.description.clone(),
                with: rewrite_value(&inner.with, &prefix),
                condition: inner.condition.as_ref().map(|c| rewrite(c, &prefix)),
                needs,
                reads_outputs_of: reads,
                retry: inner.retry,
                timeout: inner.timeout,
                may_be_irreversible: inner.may_be_irreversible,
                sensitive_outputs: inner.sensitive_outputs.clone(),
            });
        }
        let outputs: Map<String, Value> = fragment
            .outputs
            .iter()
            .map(|(name, template)| (name.clone(), Value::String(rewrite(template, &prefix))))
            .collect();
        let reads: Vec<String> = inner_ids
            .iter()
            .filter(|id| {
                outputs.values().any(|t| {
                    t.as_str()
                        .is_some_and(|t| t.contains(&format!("steps.{id}.")))
                })
            })
            .cloned()
            .collect();
        expanded.push(CompiledStep {
            id: prefix,
            uses: "noop".into(),
            description: step
                .description
                .clone()
                .or_else(|| Some(format!("outputs of fragment `{}`", fragment.name))),
            with: json!({"outputs": outputs}),
            condition: None,
            needs: inner_ids,
            reads_outputs_of: reads,
            retry: RetryPolicy::default(),
            timeout: None,
            may_be_irreversible: false,
            // The call's own outputs are the fragment's: as sensitive as the call says.
            sensitive_outputs: step.sensitive_outputs.clone(),
        });
    }
    order(expanded)
}

/// Kahn's algorithm over `needs`, earliest first; the input is acyclic.
fn order(steps: Vec<CompiledStep>) -> Vec<CompiledStep> {
    let index: HashMap<&str, usize> = steps
        .iter()
        .enumerate()
        .map(|(i, s)| (s.id.as_str(), i))
        .collect();
    let mut waiting: Vec<usize> = steps.iter().map(|s| s.needs.len()).collect();
    let mut dependents: Vec<Vec<usize>> = vec![Vec::new(); steps.len()];
    for (i, step) in steps.iter().enumerate() {
        for need in &step.needs {
            dependents[index[need.as_str()]].push(i);
        }
    }
    let mut ready: BinaryHeap<Reverse<usize>> = (0..steps.len())
        .filter(|&i| waiting[i] == 0)
        .map(Reverse)
        .collect();
    let mut order = Vec::with_capacity(steps.len());
    while let Some(Reverse(i)) = ready.pop() {
        order.push(i);
        for &d in &dependents[i] {
            waiting[d] -= 1;
            if waiting[d] == 0 {
                ready.push(Reverse(d));
            }
        }
    }
    assert_eq!(
        order.len(),
        steps.len(),
        "fragment expansion keeps the DAG acyclic"
    );
    let mut slots: Vec<Option<CompiledStep>> = steps.into_iter().map(Some).collect();
    let mut ordered: Vec<CompiledStep> = order
        .iter()
        .map(|&i| slots[i].take().expect("each once"))
        .collect();
    // Keep `needs` in execution order, as compile does.
    let at: HashMap<String, usize> = ordered
        .iter()
        .enumerate()
        .map(|(o, s)| (s.id.clone(), o))
        .collect();
    for step in &mut ordered {
        step.needs.sort_by_key(|n| at[n]);
    }
    ordered
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rewrites_only_inside_mustaches() {
        assert_eq!(
            rewrite(
                "vault {{params.key_vault}} for {{steps.vault.outputs.id}} params.x",
                "setup"
            ),
            "vault {{steps.setup--params.outputs.key_vault}} for {{steps.setup--vault.outputs.id}} params.x"
        );
        assert_eq!(
            rewrite("{{eq params.mode 'CMK'}}", "s"),
            "{{eq steps.s--params.outputs.mode 'CMK'}}"
        );
        assert_eq!(rewrite("{{run.id}}", "s"), "{{run.id}}");
    }
}
