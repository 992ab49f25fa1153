//! `kmsflow schema` describes the runbook format editors and CI check against: every bundled
//! runbook and fragment is valid under it (a JSON Schema validator says so), and a mistake
//! is not.

use std::path::Path;
use std::process::Command;

use serde_json::Value;

fn schema() -> Value {
    let output = Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .arg("schema")
        .output()
        .unwrap();
    assert!(output.status.success());
    serde_json::from_slice(&output.stdout).unwrap()
}

fn yaml_files(folder: &Path) -> Vec<std::path::PathBuf> {
    let mut files: Vec<_> = std::fs::read_dir(folder)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    files
}

#[test]
fn every_bundled_runbook_and_fragment_is_valid_under_the_schema() {
    let validator = jsonschema::validator_for(&schema()).unwrap();
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("runbooks");
    let files: Vec<_> = yaml_files(&root)
        .into_iter()
        .chain(yaml_files(&root.join("fragments")))
        .collect();
    assert!(files.len() >= 13, "{files:?}");
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let document: Value = serde_yaml::from_str(&text).unwrap();
        let errors: Vec<String> = validator
            .iter_errors(&document)
            .map(|e| format!("{} at {}", e, e.instance_path))
            .collect();
        assert!(errors.is_empty(), "{}: {errors:#?}", file.display());
    }
    let wrong: Value = serde_yaml::from_str(
        "name: x\nsteps:\n  - id: a\n    uses: azure.keyvault_key\n    with: { vault_uri: u, name: k, kty: AES }\n",
    )
    .unwrap();
    assert!(
        !validator.is_valid(&wrong),
        "an unknown key type is refused"
    );
}
