//! Long-running cluster operations: their progress, status and results.

use super::*;

#[derive(Debug, Clone, Serialize, Deserialize)]
pub(crate) struct Operation {
    pub(crate) cluster: String,
    #[serde(with = "stamp")]
    pub(crate) started: Instant,
    #[serde(with = "stamp")]
    pub(crate) done_at: Instant,
    /// Set when the operation will fail: (code, message).
    pub(crate) failure: Option<(String, String)>,
    /// The cluster body to show once it succeeds.
    pub(crate) result: Value,
    /// The body to go back to if it fails.
    pub(crate) previous: Option<Value>,
    pub(crate) finished: bool,
    /// A delete: the cluster is removed when it ends.
    #[serde(default)]
    pub(crate) deletes: bool,
}

impl Operation {
    /// An operation on `cluster` that starts `now` and takes `takes`, succeeding with nothing
    /// to show: callers set what it makes (or undoes).
    pub(crate) fn on_cluster(cluster: &str, now: Instant, takes: Duration) -> Operation {
        Operation {
            cluster: cluster.to_owned(),
            started: now,
            done_at: now + takes,
            failure: None,
            result: Value::Null,
            previous: None,
            finished: false,
            deletes: false,
        }
    }
}

impl World {
    /// Finishes cluster operations whose time has come.
    pub(crate) fn settle(&mut self, now: Instant) {
        let due: Vec<String> = self
            .operations
            .iter()
            .filter(|(_, op)| !op.finished && now >= op.done_at)
            .map(|(id, _)| id.clone())
            .collect();
        for id in due {
            let op = self.operations.get_mut(&id).expect("listed");
            op.finished = true;
            let cluster_key = op.cluster.clone();
            if op.deletes {
                self.resources.remove(&cluster_key);
                continue;
            }
            let body = match &op.failure {
                None => {
                    let mut body = op.result.clone();
                    body["properties"]["provisioningState"] = json!("Succeeded");
                    body
                }
                Some(_) => {
                    let mut body = op.previous.clone().unwrap_or_else(|| op.result.clone());
                    body["properties"]["provisioningState"] = json!("Failed");
                    body
                }
            };
            self.resources.insert(cluster_key, body);
        }
    }

    pub(crate) fn operation_status(&mut self, req: &Req, operation: &str) -> Resp {
        let Some(op) = self.operations.get(operation) else {
            return Resp::arm_error(
                404,
                "OperationNotFound",
                format!("Operation '{operation}' was not found."),
            );
        };
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        let start = chrono::Utc::now()
            - chrono::Duration::from_std(Instant::now() - op.started).unwrap_or_default();
        let mut status = json!({"name": operation, "startTime": start.to_rfc3339()});
        match (&op.failure, op.finished) {
            (_, false) => {
                status["status"] = json!("InProgress");
                let total = (op.done_at - op.started).as_secs_f64().max(0.001);
                status["percentComplete"] =
                    json!(((Instant::now() - op.started).as_secs_f64() / total * 100.0).min(99.0));
            }
            (None, true) => {
                status["status"] = json!("Succeeded");
                status["endTime"] = json!(chrono::Utc::now().to_rfc3339());
            }
            (Some((code, message)), true) => {
                status["status"] = json!("Failed");
                status["error"] = json!({"code": code, "message": message});
            }
        }
        Resp::json(200, status).header("Retry-After", "1")
    }

    /// A cluster operation's `Location`: 202 while it runs, then 204 (it succeeded) or its
    /// error.
    pub(crate) fn cluster_operation_result(&mut self, req: &Req, operation: &str) -> Resp {
        if req.method != "GET" {
            return method_not_allowed(req);
        }
        match self.operations.get(operation) {
            None => Resp::arm_error(
                404,
                "OperationNotFound",
                format!("Operation '{operation}' was not found."),
            ),
            Some(op) if !op.finished => Resp::empty(202)
                .header(
                    "Location",
                    format!(
                        "{}{}?api-version={}",
                        req.origin,
                        req.path,
                        req.query.get("api-version").cloned().unwrap_or_default()
                    ),
                )
                .header("Retry-After", "1"),
            Some(Operation {
                failure: Some((code, message)),
                ..
            }) => Resp::arm_error(400, code, message.clone()),
            Some(_) => Resp::empty(204),
        }
    }
}
