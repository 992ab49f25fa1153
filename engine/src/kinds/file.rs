use std::path::PathBuf;

use async_trait::async_trait;
use serde::Deserialize;
use serde_json::{Map, Value, json};

use crate::kind::*;

/// Ensures a local file has some content (or appends to it); undone from its before image.
/// Useful for runbooks that render configuration, for journals, and for drills of resume and
/// rollback on a machine without cloud access.
pub struct File;

#[derive(Deserialize, PartialEq, Eq, Clone, Copy)]
#[serde(rename_all = "snake_case")]
enum Mode {
    Write,
    Append,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Params {
    path: PathBuf,
    content: String,
    #[serde(default = "write")]
    mode: Mode,
}

fn write() -> Mode {
    Mode::Write
}

static SPEC: KindSpec = KindSpec {
    name: "file",
    summary: "Ensures the file at `path` holds `content` (mode `write`, idempotent) or appends `content` to it (mode `append`, once per successful apply). Rollback deletes a created file, restores an overwritten one, or truncates what was appended.",
    params: &[
        ParamSpec::required(
            "path",
            ValueType::String,
            "the file, relative to the working directory",
        ),
        ParamSpec::required(
            "content",
            ValueType::String,
            "the content to write or append",
        ),
        ParamSpec::optional("mode", ValueType::String, "`write` (default) or `append`")
            .one_of(&["write", "append"]),
    ],
    outputs: OutputsSpec::Fixed(&[
        OutputSpec {
            name: "path",
            description: "the file's path",
        },
        OutputSpec {
            name: "bytes",
            description: "the file's size after the step",
        },
    ]),
    may_be_irreversible: false,
};

fn outputs(path: &std::path::Path, bytes: u64) -> Map<String, Value> {
    let mut map = Map::new();
    map.insert("path".into(), json!(path.display().to_string()));
    map.insert("bytes".into(), json!(bytes));
    map
}

fn digest(bytes: &[u8]) -> String {
    use sha2::Digest;
    sha2::Sha256::digest(bytes)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

/// Writes a fresh file, private (0600) when it holds a secret.
async fn write_new(path: &std::path::Path, bytes: &[u8], private: bool) -> std::io::Result<()> {
    use tokio::io::AsyncWriteExt;
    let _ = tokio::fs::remove_file(path).await;
    let mut options = tokio::fs::OpenOptions::new();
    options.write(true).create_new(true);
    #[cfg(unix)]
    if private {
        options.mode(0o600);
    }
    #[cfg(not(unix))]
    let _ = private;
    let mut file = options.open(path).await?;
    file.write_all(bytes).await?;
    file.sync_all().await
}

fn io_error(action: &str, path: &std::path::Path, error: std::io::Error) -> StepError {
    StepError::permanent(format!("cannot {action} `{}`: {error}", path.display()))
}

#[async_trait]
impl StepKind for File {
    fn spec(&self) -> &'static KindSpec {
        &SPEC
    }

    async fn observe(&self, cx: &StepContext<'_>) -> Result<Value, StepError> {
        let params: Params = cx.params()?;
        match tokio::fs::read(&params.path).await {
            // A file written with a secret may hold an earlier secret: the before image keeps
            // only its digest (and rollback cannot put the old content back).
            Ok(bytes) if params.mode == Mode::Write && cx.input_has_secrets => Ok(json!({
                "exists": true,
                "len": bytes.len(),
                "sha256": digest(&bytes),
            })),
            Ok(bytes) => Ok(match params.mode {
                Mode::Write => json!({
                    "exists": true,
                    "len": bytes.len(),
                    "content": String::from_utf8_lossy(&bytes),
                }),
                Mode::Append => json!({"exists": true, "len": bytes.len()}),
            }),
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => {
                Ok(json!({"exists": false, "len": 0}))
            }
            Err(error) => Err(io_error("read", &params.path, error)),
        }
    }

    fn plan(&self, cx: &StepContext<'_>, before: &Value) -> Result<StepPlan, StepError> {
        let params: Params = cx.params()?;
        let exists = before["exists"].as_bool().unwrap_or(false);
        let path = params.path.display();
        Ok(match params.mode {
            Mode::Append => StepPlan::change(Change::Action {
                summary: format!("append {} bytes to {path}", params.content.len()),
            }),
            Mode::Write if !exists => StepPlan::change(Change::Create {
                summary: format!("create {path} ({} bytes)", params.content.len()),
            }),
            Mode::Write
                if before["content"].as_str() == Some(params.content.as_str())
                    || before["sha256"].as_str()
                        == Some(digest(params.content.as_bytes()).as_str()) =>
            {
                StepPlan::unchanged(outputs(&params.path, params.content.len() as u64))
            }
            Mode::Write => StepPlan::change(Change::Update {
                summary: format!("rewrite {path}"),
                fields: vec![FieldChange {
                    path: "content".into(),
                    from: json!(format!("{} bytes", before["len"])),
                    to: json!(format!("{} bytes", params.content.len())),
                }],
            }),
        })
    }

    async fn apply(
        &self,
        cx: &StepContext<'_>,
        _before: &Value,
        _plan: &StepPlan,
    ) -> Result<Applied, StepError> {
        let params: Params = cx.params()?;
        if let Some(parent) = params.path.parent().filter(|p| !p.as_os_str().is_empty()) {
            tokio::fs::create_dir_all(parent)
                .await
                .map_err(|e| io_error("create the folder of", &params.path, e))?;
        }
        match params.mode {
            Mode::Write => {
                // Write beside, then rename: a crash never leaves half a file.
                let temporary = params.path.with_extension("kmsflow-tmp");
                write_new(&temporary, params.content.as_bytes(), cx.input_has_secrets)
                    .await
                    .map_err(|e| io_error("write", &temporary, e))?;
                tokio::fs::rename(&temporary, &params.path)
                    .await
                    .map_err(|e| io_error("replace", &params.path, e))?;
            }
            Mode::Append => {
                use tokio::io::AsyncWriteExt;
                let mut options = tokio::fs::OpenOptions::new();
                options.create(true).append(true);
                #[cfg(unix)]
                if cx.input_has_secrets {
                    options.mode(0o600);
                }
                let mut file = options
                    .open(&params.path)
                    .await
                    .map_err(|e| io_error("open", &params.path, e))?;
                file.write_all(params.content.as_bytes())
                    .await
                    .map_err(|e| io_error("append to", &params.path, e))?;
                file.sync_all()
                    .await
                    .map_err(|e| io_error("sync", &params.path, e))?;
            }
        }
        let bytes = tokio::fs::metadata(&params.path)
            .await
            .map_err(|e| io_error("stat", &params.path, e))?
            .len();
        Ok(outputs(&params.path, bytes).into())
    }

    async fn rollback(
        &self,
        cx: &StepContext<'_>,
        before: &Value,
        outcome: Outcome,
    ) -> Result<Undo, StepError> {
        let params: Params = cx.params()?;
        let existed = before["exists"].as_bool().unwrap_or(false);
        match outcome {
            Outcome::Unchanged => Ok(Undo::NothingToUndo),
            _ if !existed => match tokio::fs::remove_file(&params.path).await {
                Ok(()) => Ok(Undo::Done),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Undo::Done),
                Err(e) => Err(io_error("delete", &params.path, e)),
            },
            Outcome::Updated | Outcome::Created if before.get("content").is_none() => {
                Ok(Undo::Irreversible(format!(
                    "`{}` was overwritten with content holding a secret; its earlier content (which may hold one too) was not kept, so it cannot be put back",
                    params.path.display()
                )))
            }
            Outcome::Updated | Outcome::Created => {
                let content = before["content"].as_str().unwrap_or_default();
                tokio::fs::write(&params.path, content)
                    .await
                    .map_err(|e| io_error("restore", &params.path, e))?;
                Ok(Undo::Done)
            }
            Outcome::Invoked => {
                let len = before["len"].as_u64().unwrap_or(0);
                let file = tokio::fs::OpenOptions::new()
                    .write(true)
                    .open(&params.path)
                    .await
                    .map_err(|e| io_error("open", &params.path, e))?;
                file.set_len(len)
                    .await
                    .map_err(|e| io_error("truncate", &params.path, e))?;
                Ok(Undo::Done)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::kinds::test_support::Harness;

    #[tokio::test]
    async fn write_is_idempotent_and_rolls_back() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.txt");
        let harness = Harness::new(json!({"path": path, "content": "hello"}));
        let cx = harness.cx(1);
        let before = File.observe(&cx).await.unwrap();
        let plan = File.plan(&cx, &before).unwrap();
        assert_eq!(plan.change.outcome(), Outcome::Created);
        File.apply(&cx, &before, &plan).await.unwrap();
        let again = File.observe(&cx).await.unwrap();
        assert_eq!(File.plan(&cx, &again).unwrap().change, Change::Unchanged);
        let undo = File.rollback(&cx, &before, Outcome::Created).await.unwrap();
        assert_eq!(undo, Undo::Done);
        assert!(!path.exists());
    }

    #[tokio::test]
    async fn append_rolls_back_by_truncating() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("log.txt");
        std::fs::write(&path, "first\n").unwrap();
        let harness = Harness::new(json!({"path": path, "content": "second\n", "mode": "append"}));
        let cx = harness.cx(1);
        let before = File.observe(&cx).await.unwrap();
        let plan = File.plan(&cx, &before).unwrap();
        File.apply(&cx, &before, &plan).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\nsecond\n");
        File.rollback(&cx, &before, Outcome::Invoked).await.unwrap();
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "first\n");
    }
}
