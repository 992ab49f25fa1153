//! Snapshot tests of runbook diagnostics: every file under `tests/fixtures/invalid/` is
//! rejected, and what `kmsflow validate` prints for it is pinned.

use std::path::Path;

use kmsflow_engine::{Registry, RunbookSource, compile};
use miette::{GraphicalReportHandler, GraphicalTheme};

fn render(name: &str, text: &str) -> String {
    let source = RunbookSource::new(name, text);
    let diagnostics = compile(&source, &Registry::with_engine_kinds())
        .expect_err("every fixture under tests/fixtures/invalid must be rejected");
    let handler =
        GraphicalReportHandler::new_themed(GraphicalTheme::unicode_nocolor()).with_width(100);
    let mut out = diagnostics.render(&handler);
    out.push_str(&format!("{diagnostics}\n"));
    for problem in &diagnostics.problems {
        out.push_str(&format!("at {}\n", problem.location()));
    }
    out
}

#[test]
fn invalid_runbooks_are_rejected_with_located_diagnostics() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    let mut files: Vec<_> = std::fs::read_dir(&folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 26, "the corpus has {} files", files.len());
    for path in files {
        let name = path.file_name().unwrap().to_str().unwrap().to_owned();
        let text = std::fs::read_to_string(&path).unwrap();
        let rendered = render(&format!("tests/fixtures/invalid/{name}"), &text);
        let problems = rendered.matches("\nat tests/").count();
        if name == "many-problems.yaml" {
            assert!(
                problems >= 10,
                "{name} reports only {problems} problems:\n{rendered}"
            );
        } else {
            assert_eq!(
                problems, 1,
                "{name} must have exactly one problem:\n{rendered}"
            );
        }
        insta::assert_snapshot!(name.trim_end_matches(".yaml"), rendered);
    }
}

/// `validate --output json` (and SARIF) carry each problem's file, line and column: the same
/// place the drawn diagnostic points at, for every fixture.
#[test]
fn problems_as_data_point_where_the_drawings_do() {
    let folder = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/invalid");
    for entry in std::fs::read_dir(&folder).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_none_or(|e| e != "yaml") {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        let source = RunbookSource::new(path.display().to_string(), text);
        let diagnostics = compile(&source, &Registry::with_engine_kinds()).unwrap_err();
        let data = diagnostics.to_json();
        assert_eq!(data.len(), diagnostics.problems.len());
        for (problem, entry) in diagnostics.problems.iter().zip(&data) {
            let at = format!(
                "{}:{}:{}",
                entry["file"].as_str().unwrap(),
                entry["line"],
                entry["column"]
            );
            assert_eq!(at, problem.location(), "{}", path.display());
            assert_eq!(entry["message"], problem.to_string());
        }
    }
}

/// Anchors, aliases and `<<` merge keys work: an alias is its anchor's block, and a merge
/// adds what the mapping does not set itself.
#[test]
fn anchors_aliases_and_merge_keys_reuse_blocks() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/valid-anchors.yaml");
    let text = std::fs::read_to_string(path).unwrap();
    let compiled = compile(
        &RunbookSource::new("valid-anchors.yaml", text),
        &Registry::with_engine_kinds(),
    )
    .expect("a runbook with anchors compiles");
    let (a, b) = (compiled.step("a").unwrap(), compiled.step("b").unwrap());
    assert_eq!(a.with, b.with, "the alias is the anchored block");
    assert_eq!(a.retry.attempts, 3);
    assert_eq!(
        b.retry.attempts, 5,
        "the mapping's own key wins over the merge"
    );
    assert_eq!(
        b.retry.initial, a.retry.initial,
        "the rest comes from the merge"
    );
}
