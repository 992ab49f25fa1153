//! `kmsflow sandbox serve` in another process, and the binary pointed at it: what the
//! end-to-end tests that watch the sandbox's request log share.

#![allow(dead_code)]

pub mod netns;

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Child, Command, Stdio};

use serde_json::Value;

/// The arguments, with `--yes` after `run` and `rollback`: these tests have no terminal, where
/// both refuse to pass a point of no return or delete without it, as a CI job must say it.
/// (`tests/confirm.rs` holds the refusal and the prompt.)
pub fn consenting(args: &[&str]) -> Vec<String> {
    let mut args: Vec<String> = args.iter().map(|a| (*a).to_owned()).collect();
    let acts = matches!(args.first().map(String::as_str), Some("run" | "rollback"))
        && !args.iter().any(|a| a == "--dry-run");
    if acts {
        args.insert(1, "--yes".to_owned());
    }
    args
}

/// The bundled runbooks that change or verify a cluster's KMS encryption (every scenario of
/// the seed), in the order the README lists them.
pub const KMS_RUNBOOKS: &[&str] = &[
    "pmk-new-cluster",
    "pmk-existing-cluster",
    "cmk-private-vault-new-cluster",
    "cmk-private-vault-existing-cluster",
    "cmk-public-vault-new-cluster",
    "cmk-public-vault-existing-cluster",
    "verify-kms",
    "migrate-pmk-to-cmk",
    "migrate-cmk-to-pmk",
];

/// A sandbox serving in another process; killed when dropped.
pub struct Served {
    child: Child,
    /// What a client needs (`AZURE_SUBSCRIPTION_ID`, `IDENTITY_ENDPOINT`, ...).
    pub env: HashMap<String, String>,
    /// Resource Manager's endpoint (`https://management.sandbox.localhost:PORT` with `--tls`).
    pub arm_endpoint: String,
    /// `http://127.0.0.1:PORT`: the control endpoints, with or without `--tls`.
    pub base_url: String,
    /// Where the binary keeps its state: `None` for `state.db` in the test's folder, or a
    /// `postgres://` URL.
    pub state: Option<String>,
}

impl Drop for Served {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `kmsflow sandbox serve <args>`.
pub fn serve(args: &[&str]) -> Served {
    let mut child = Command::new(env!("CARGO_BIN_EXE_kmsflow"))
        .args(["sandbox", "serve"])
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let arm_endpoint = lines.next().unwrap().unwrap();
    let tls = args.contains(&"--tls");
    assert!(
        arm_endpoint.starts_with(if tls {
            "https://management.sandbox.localhost:"
        } else {
            "http://127.0.0.1:"
        }),
        "{arm_endpoint}"
    );
    // With TLS, the cloud profile and the authority's two variables follow.
    let env: HashMap<String, String> = lines
        .by_ref()
        .take(if tls { 9 } else { 6 })
        .map(|line| {
            let line = line.unwrap();
            let (name, value) = line.split_once('=').expect("NAME=value");
            (name.to_owned(), value.to_owned())
        })
        .collect();
    let base_url = env["IDENTITY_ENDPOINT"]
        .trim_end_matches("/msi/token")
        .to_owned();
    Served {
        child,
        env,
        arm_endpoint,
        base_url,
        state: None,
    }
}

impl Served {
    /// The binary, pointed at this sandbox, with its state in `dir`.
    pub fn kmsflow(&self, dir: &Path, args: &[&str]) -> Command {
        let mut command = Command::new(env!("CARGO_BIN_EXE_kmsflow"));
        command
            .args(consenting(args))
            .current_dir(dir)
            .envs(&self.env)
            .env(
                "KMSFLOW_STATE",
                self.state
                    .clone()
                    .unwrap_or_else(|| dir.join("state.db").display().to_string()),
            )
            .stdin(Stdio::null());
        command
    }

    fn get(&self, path: &str) -> Value {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("{}{path}", self.base_url);
        runtime.block_on(async { reqwest::get(url).await.unwrap().json().await.unwrap() })
    }

    /// Replaces the sandbox's faults (YAML, as `--faults` takes).
    pub fn set_faults(&self, yaml: &str) {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let url = format!("{}/_sandbox/faults", self.base_url);
        let status = runtime.block_on(async {
            reqwest::Client::new()
                .post(url)
                .body(yaml.to_owned())
                .send()
                .await
                .unwrap()
                .status()
        });
        assert_eq!(status.as_u16(), 204, "the sandbox took the faults");
    }

    /// Every request served so far, oldest first.
    pub fn requests(&self) -> Vec<Value> {
        self.get("/_sandbox/requests")
            .as_array()
            .cloned()
            .unwrap_or_default()
    }

    /// How many writes were served so far.
    pub fn writes(&self) -> usize {
        self.requests()
            .iter()
            .filter(|r| r["write"] == true)
            .count()
    }

    /// The world as it is now.
    pub fn world(&self) -> Value {
        self.get("/_sandbox/world")
    }

    /// Requests whose path contains `part` (case-insensitively), as `METHOD path`.
    pub fn requests_to(&self, part: &str) -> Vec<String> {
        self.requests()
            .iter()
            .filter(|r| {
                r["path"]
                    .as_str()
                    .unwrap()
                    .to_lowercase()
                    .contains(&part.to_lowercase())
            })
            .map(|r| {
                format!(
                    "{} {}",
                    r["method"].as_str().unwrap(),
                    r["path"].as_str().unwrap()
                )
            })
            .collect()
    }
}
