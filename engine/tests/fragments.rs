//! Runbook fragments: included into the same DAG, run step by step, outputs exposed to the
//! caller, and problems reported in the fragment's own file.

use std::collections::HashMap;
use std::sync::Arc;

use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Engine, RunRequest};
use kmsflow_engine::params::{ParamSources, bind};
use kmsflow_engine::progress::silent;
use kmsflow_engine::{FragmentResolver, ProblemKind, Registry, RunbookSource, compile_with};
use kmsflow_state::{Durability, RunStatus, Store};

struct Files(HashMap<&'static str, &'static str>);

impl FragmentResolver for Files {
    fn resolve(&self, _including: &str, path: &str) -> Option<RunbookSource> {
        self.0.get(path).map(|text| RunbookSource::new(path, *text))
    }
}

const FRAGMENT: &str = r#"
name: make-key
params:
  vault: { type: string }
  size: { type: int, default: 2048 }
steps:
  - id: vault
    uses: noop
    with: { outputs: { uri: "https://{{params.vault}}.vault.azure.net" } }
  - id: key
    uses: noop
    with: { outputs: { kid: "{{steps.vault.outputs.uri}}/keys/k", size: "{{params.size}}" } }
outputs:
  key_id: "{{steps.key.outputs.kid}}"
  size: "{{steps.key.outputs.size}}"
"#;

const PARENT: &str = r#"
name: parent
params:
  cluster: { type: string, default: aks-1 }
steps:
  - id: name
    uses: noop
    with: { outputs: { vault: "kv-{{params.cluster}}" } }
  - id: primary
    uses: runbook
    with:
      path: fragments/make-key.yaml
      params: { vault: "{{steps.name.outputs.vault}}" }
  - id: secondary
    uses: runbook
    with:
      path: fragments/make-key.yaml
      params: { vault: "{{steps.name.outputs.vault}}-dr", size: 4096 }
  - id: use
    uses: noop
    with: { outputs: { both: "{{steps.primary.outputs.key_id}} {{steps.secondary.outputs.key_id}}" } }
outputs:
  both: "{{steps.use.outputs.both}}"
  size: "{{steps.secondary.outputs.size}}"
"#;

fn files() -> Files {
    Files(HashMap::from([("fragments/make-key.yaml", FRAGMENT)]))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fragments_compile_into_one_dag_and_run_step_by_step() {
    let registry = Registry::with_engine_kinds();
    let compiled = compile_with(
        &RunbookSource::new("parent.yaml", PARENT),
        &registry,
        &files(),
    )
    .unwrap();
    let ids: Vec<&str> = compiled.steps.iter().map(|s| s.id.as_str()).collect();
    for id in [
        "primary--params",
        "primary--vault",
        "primary--key",
        "primary",
        "secondary--key",
        "use",
    ] {
        assert!(ids.contains(&id), "{id} missing from {ids:?}");
    }
    let position = |id: &str| ids.iter().position(|i| *i == id).unwrap();
    assert!(position("name") < position("primary--params"));
    assert!(position("primary--key") < position("primary"));
    assert!(position("primary") < position("use") && position("secondary") < position("use"));

    let dir = tempfile::tempdir().unwrap();
    let engine = Engine {
        registry,
        state: dir.path().join("state.db").into(),
        durability: Durability::Normal,
    };
    let params = bind(&compiled, &ParamSources::default()).unwrap();
    let summary = launch::start(
        &engine,
        RunRequest {
            runbook: Arc::new(compiled),
            runbook_ref: "parent.yaml".into(),
            source: PARENT.into(),
            params,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
        },
    )
    .await
    .unwrap();
    assert_eq!(summary.status, RunStatus::Succeeded, "{:?}", summary.error);
    let outputs = summary.outputs.unwrap();
    assert_eq!(
        outputs["both"],
        "https://kv-aks-1.vault.azure.net/keys/k https://kv-aks-1-dr.vault.azure.net/keys/k"
    );
    assert_eq!(outputs["size"], 4096);
    let steps = Store::open(&engine.state, Durability::Normal)
        .unwrap()
        .steps(&summary.run_id)
        .unwrap();
    assert_eq!(
        steps.len(),
        10,
        "every fragment step is checkpointed on its own"
    );
}

#[test]
fn problems_in_a_fragment_point_into_the_fragment_and_calls_are_checked() {
    let broken = FRAGMENT.replace(
        "uses: noop\n    with: { outputs: { kid",
        "uses: noopp\n    with: { outputs: { kid",
    );
    let resolver = Files(HashMap::from([(
        "fragments/make-key.yaml",
        Box::leak(broken.into_boxed_str()) as &str,
    )]));
    let registry = Registry::with_engine_kinds();
    let diagnostics = compile_with(
        &RunbookSource::new("parent.yaml", PARENT),
        &registry,
        &resolver,
    )
    .unwrap_err();
    let problem = diagnostics
        .problems
        .iter()
        .find(|p| matches!(p.kind, ProblemKind::UnknownKind { .. }))
        .unwrap();
    assert_eq!(problem.source.name, "fragments/make-key.yaml");
    assert!(
        problem
            .location()
            .starts_with("fragments/make-key.yaml:11:"),
        "{}",
        problem.location()
    );

    let bad_call = PARENT.replace("size: 4096", "sise: 4096").replace(
        "params: { vault: \"{{steps.name.outputs.vault}}\" }",
        "params: {}",
    );
    let diagnostics = compile_with(
        &RunbookSource::new("parent.yaml", bad_call.as_str()),
        &registry,
        &files(),
    )
    .unwrap_err();
    let text = format!(
        "{:?}",
        diagnostics
            .problems
            .iter()
            .map(|p| p.kind.to_string())
            .collect::<Vec<_>>()
    );
    assert!(
        text.contains("unknown key `sise` in the parameters of fragment"),
        "{text}"
    );
    assert!(
        text.contains("missing key `vault` in the parameters of fragment"),
        "{text}"
    );

    let missing = PARENT.replace("fragments/make-key.yaml", "fragments/nope.yaml");
    let diagnostics = compile_with(
        &RunbookSource::new("parent.yaml", missing.as_str()),
        &registry,
        &files(),
    )
    .unwrap_err();
    assert!(
        diagnostics.problems[0]
            .kind
            .to_string()
            .contains("no runbook fragment `fragments/nope.yaml`")
    );

    let selfish = r#"
name: loop
steps:
  - id: again
    uses: runbook
    with: { path: loop.yaml }
"#;
    let resolver = Files(HashMap::from([("loop.yaml", selfish)]));
    let diagnostics = compile_with(
        &RunbookSource::new("loop.yaml", selfish),
        &registry,
        &resolver,
    )
    .unwrap_err();
    assert!(
        matches!(&diagnostics.problems[0].kind, ProblemKind::Cycle { path } if path == &["loop.yaml", "loop.yaml"])
    );
}
