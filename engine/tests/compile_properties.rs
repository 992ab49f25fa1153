//! Property tests of the compiler: the order respects every edge, a back edge yields a cycle
//! error naming a real cycle, compiling is deterministic, and no input makes it panic.

use std::collections::{BTreeSet, HashMap};

use kmsflow_engine::{ProblemKind, Registry, RunbookSource, compile};
use proptest::prelude::*;

/// A random DAG: step `i` depends on some steps `j < i`, through `needs` or an output reference.
#[derive(Debug, Clone)]
struct Dag {
    n: usize,
    /// (dependency, dependent, by_reference)
    edges: Vec<(usize, usize, bool)>,
    /// The order the steps are written in the file.
    written: Vec<usize>,
}

fn dag() -> impl Strategy<Value = Dag> {
    (2usize..24)
        .prop_flat_map(|n| {
            let edges = proptest::collection::vec((0..n, 0..n, any::<bool>()), 0..n * 2);
            let written = Just((0..n).collect::<Vec<_>>()).prop_shuffle();
            (Just(n), edges, written)
        })
        .prop_map(|(n, raw, written)| {
            let mut seen = BTreeSet::new();
            let edges = raw
                .into_iter()
                .filter_map(|(a, b, r)| {
                    let (from, to) = (a.min(b), a.max(b));
                    (from != to && seen.insert((from, to))).then_some((from, to, r))
                })
                .collect();
            Dag { n, edges, written }
        })
}

fn render(dag: &Dag, extra: Option<(usize, usize)>) -> String {
    let mut text = String::from("name: generated\nsteps:\n");
    for &step in &dag.written {
        let mut needs: Vec<String> = Vec::new();
        let mut refs: Vec<String> = Vec::new();
        for &(from, to, by_reference) in &dag.edges {
            if to == step {
                if by_reference {
                    refs.push(format!("\"{{{{steps.s{from}.outputs.value}}}}\""));
                } else {
                    needs.push(format!("s{from}"));
                }
            }
        }
        if let Some((from, to)) = extra
            && to == step
        {
            needs.push(format!("s{from}"));
        }
        text.push_str(&format!("  - id: s{step}\n    uses: noop\n"));
        if !needs.is_empty() {
            text.push_str(&format!("    needs: [{}]\n", needs.join(", ")));
        }
        text.push_str("    with:\n      outputs:\n        value: x\n");
        for (index, reference) in refs.iter().enumerate() {
            text.push_str(&format!("        read{index}: {reference}\n"));
        }
    }
    text
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    #[test]
    fn order_respects_every_edge_and_is_deterministic(dag in dag()) {
        let registry = Registry::with_engine_kinds();
        let text = render(&dag, None);
        let source = RunbookSource::new("generated.yaml", text.as_str());
        let compiled = compile(&source, &registry).expect("a DAG compiles");
        let position: HashMap<String, usize> =
            compiled.steps.iter().enumerate().map(|(i, s)| (s.id.clone(), i)).collect();
        prop_assert_eq!(compiled.steps.len(), dag.n);
        for &(from, to, _) in &dag.edges {
            let (before, after) = (format!("s{from}"), format!("s{to}"));
            prop_assert!(position[&before] < position[&after], "{} must run before {}", before, after);
        }
        let again = compile(&RunbookSource::new("generated.yaml", text.as_str()), &registry).unwrap();
        prop_assert_eq!(compiled, again);
    }

    #[test]
    fn a_back_edge_is_reported_as_a_real_cycle(dag in dag(), pick in any::<prop::sample::Index>()) {
        prop_assume!(!dag.edges.is_empty());
        // Reverse an existing edge's direction by adding `to -> from`: a cycle of length two
        // at least, and longer ones through other paths.
        let (from, to, _) = dag.edges[pick.index(dag.edges.len())];
        let text = render(&dag, Some((to, from)));
        let diagnostics = compile(&RunbookSource::new("generated.yaml", text.as_str()), &Registry::with_engine_kinds())
            .expect_err("a back edge makes a cycle");
        let cycles: Vec<&Vec<String>> = diagnostics.problems.iter().filter_map(|p| match &p.kind {
            ProblemKind::Cycle { path } => Some(path),
            _ => None,
        }).collect();
        prop_assert!(!cycles.is_empty(), "no cycle reported: {:?}", diagnostics.problems);
        let mut all_edges: BTreeSet<(String, String)> =
            dag.edges.iter().map(|(f, t, _)| (format!("s{f}"), format!("s{t}"))).collect();
        all_edges.insert((format!("s{to}"), format!("s{from}")));
        for path in cycles {
            prop_assert!(path.len() >= 3, "{:?}", path);
            prop_assert_eq!(path.first(), path.last());
            for pair in path.windows(2) {
                prop_assert!(all_edges.contains(&(pair[0].clone(), pair[1].clone())),
                    "{} -> {} is not an edge", pair[0], pair[1]);
            }
        }
    }

    #[test]
    fn arbitrary_text_never_panics_and_spans_stay_inside(text in "(?s)[a-z:{}\\[\\]\"' \\n\\-#|>0-9.]{0,300}") {
        let source = RunbookSource::new("fuzz.yaml", text.as_str());
        if let Err(diagnostics) = compile(&source, &Registry::with_engine_kinds()) {
            for problem in diagnostics.problems {
                prop_assert!(problem.span.offset + problem.span.len <= text.len());
                prop_assert!(text.is_char_boundary(problem.span.offset));
            }
        }
    }
}
