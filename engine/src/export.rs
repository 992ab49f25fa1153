//! The DAG of a compiled runbook as Graphviz dot, Mermaid, or JSON.

use serde_json::{Value, json};

use crate::runbook::CompiledRunbook;

fn quote(text: &str) -> String {
    format!("\"{}\"", text.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Graphviz dot: one node per step (id and kind), one edge per dependency.
pub fn to_dot(runbook: &CompiledRunbook) -> String {
    let mut out = format!(
        "digraph {} {{\n  rankdir=LR;\n  node [shape=box];\n",
        quote(&runbook.name)
    );
    for step in &runbook.steps {
        let shape = if step.may_be_irreversible {
            ", style=bold"
        } else {
            ""
        };
        out.push_str(&format!(
            "  {} [label={}{shape}];\n",
            quote(&step.id),
            quote(&format!("{}\n{}", step.id, step.uses))
        ));
    }
    for step in &runbook.steps {
        for need in &step.needs {
            out.push_str(&format!("  {} -> {};\n", quote(need), quote(&step.id)));
        }
    }
    out.push_str("}\n");
    out
}

/// Mermaid flowchart, left to right.
pub fn to_mermaid(runbook: &CompiledRunbook) -> String {
    // Mermaid node ids cannot hold `-`; number them and label with the step id.
    let mut out = String::from("flowchart LR\n");
    for (index, step) in runbook.steps.iter().enumerate() {
        out.push_str(&format!(
            "  s{index}[\"{}<br/><i>{}</i>\"]\n",
            step.id, step.uses
        ));
    }
    for (index, step) in runbook.steps.iter().enumerate() {
        for need in &step.needs {
            let from = runbook
                .position(need)
                .expect("needs name steps of the runbook");
            out.push_str(&format!("  s{from} --> s{index}\n"));
        }
    }
    out
}

/// JSON: `{name, steps: [{id, uses, needs}], edges: [[from, to]]}`.
pub fn to_json(runbook: &CompiledRunbook) -> Value {
    json!({
        "name": runbook.name,
        "steps": runbook.steps.iter().map(|s| json!({
            "id": s.id,
            "uses": s.uses,
            "needs": s.needs,
            "may_be_irreversible": s.may_be_irreversible,
        })).collect::<Vec<_>>(),
        "edges": runbook.steps.iter().flat_map(|s| s.needs.iter().map(move |n| json!([n, s.id]))).collect::<Vec<_>>(),
    })
}
