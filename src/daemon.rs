//! `kmsflow schedule ...` and `kmsflow daemon`: what a schedule runs (one runbook, a fleet
//! check, or a rollout), and its notifications.

use std::sync::Arc;
use std::time::Duration;

use async_trait::async_trait;
use chrono::{DateTime, Utc};
use kmsflow_engine::RunbookSource;
use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Engine, Launcher, RunRequest};
use kmsflow_engine::params::{self, ParamSources};
use kmsflow_engine::progress::silent;
use kmsflow_engine::schedule::Firer;
use kmsflow_state::{RunStatus, ScheduleRecord};
use serde_json::{Map, Value, json};

use crate::failure::Failure;

/// Starts schedules' work in this process.
pub struct RunFirer {
    pub engine: Engine,
    /// How fires reach Azure beyond their steps: discovering a fleet.
    pub azure: kmsflow_steps::AzureConfig,
    pub http: reqwest::Client,
}

/// Checks a webhook URL for `schedule add`: https, or http on loopback (a local relay, a
/// test). The error never repeats the URL: it is a credential.
pub fn check_webhook(url: &str) -> Result<(), String> {
    let shown = kmsflow_state::mask_url(url);
    let parsed =
        url::Url::parse(url).map_err(|e| format!("the webhook `{shown}` is not a URL: {e}"))?;
    let loopback = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => ip.is_loopback(),
        Some(url::Host::Ipv6(ip)) => ip.is_loopback(),
        Some(url::Host::Domain(domain)) => domain == "localhost",
        None => false,
    };
    match parsed.scheme() {
        "https" => Ok(()),
        "http" if loopback => Ok(()),
        _ => Err(format!(
            "the webhook `{shown}` must use https (plain http only on loopback)"
        )),
    }
}

impl RunFirer {
    pub fn new(engine: Engine, azure: kmsflow_steps::AzureConfig) -> RunFirer {
        RunFirer {
            engine,
            azure,
            // A redirect could carry the payload (and, for Slack or Teams, whatever the URL
            // grants) to a host nobody configured.
            http: reqwest::Client::builder()
                .timeout(Duration::from_secs(10))
                .redirect(reqwest::redirect::Policy::none())
                .build()
                .expect("an HTTP client"),
        }
    }

    fn sources(schedule: &ScheduleRecord) -> ParamSources {
        let stored = schedule.params.as_object().cloned().unwrap_or_default();
        ParamSources {
            cli: stored
                .iter()
                .map(|(k, v)| {
                    (
                        k.clone(),
                        v.as_str().map_or_else(|| v.to_string(), str::to_owned),
                    )
                })
                .collect(),
            env: std::env::vars().collect(),
            ..Default::default()
        }
    }

    /// The schedule's runbook as it is now, compiled: (runbook, text, reference).
    fn runbook(
        &self,
        schedule: &ScheduleRecord,
    ) -> Result<(Arc<kmsflow_engine::CompiledRunbook>, String, String), String> {
        let (source, reference) =
            match crate::bundled::find(schedule.runbook.trim_start_matches("bundled:")) {
                Some(b) => (
                    RunbookSource::new(format!("bundled:{}", b.name), b.text),
                    format!("bundled:{}", b.name),
                ),
                None => match std::fs::read_to_string(&schedule.runbook) {
                    Ok(text) => (
                        RunbookSource::new(&schedule.runbook, text),
                        schedule.runbook.clone(),
                    ),
                    Err(error) => {
                        return Err(format!("cannot read `{}`: {error}", schedule.runbook));
                    }
                },
            };
        let compiled = kmsflow_engine::compile_with(
            &source,
            &self.engine.registry,
            &crate::bundled::Fragments,
        )
        .map_err(|diagnostics| diagnostics.to_string())?;
        Ok((Arc::new(compiled), source.text.to_string(), reference))
    }

    async fn run_one(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        run_id: &str,
    ) -> (Value, Option<String>) {
        let failed = |error: String| (json!({"error": error}), Some("fail".to_owned()));
        let (compiled, text, reference) = match self.runbook(schedule) {
            Ok(found) => found,
            Err(error) => return failed(error),
        };
        let bound = match params::bind(&compiled, &Self::sources(schedule)) {
            Ok(bound) => bound,
            Err(errors) => return failed(errors.to_string()),
        };
        if let Some(queue) = &schedule.queue {
            let queued = kmsflow_state::NewQueued {
                id: run_id.to_owned(),
                queue: queue.clone(),
                runbook: compiled.name.clone(),
                runbook_ref: reference,
                content_hash: compiled.content_hash.clone(),
                source: text,
                fragments: launch::storable_fragments(&compiled),
                params: bound.storable(),
                options: json!({"concurrency": ExecOptions::default().concurrency}),
                enqueued_at: Utc::now(),
            };
            return self.queue_one(schedule, occurrence, queued).await;
        }
        let request = RunRequest {
            runbook: compiled,
            runbook_ref: reference,
            source: text,
            params: bound,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: silent(),
        };
        // The fire turns `started` in the transaction that creates its run.
        let started = kmsflow_state::Write::FireStarted {
            schedule: schedule.name.clone(),
            occurrence,
            run_id: run_id.to_owned(),
        };
        match launch::start_with_id(&self.engine, request, run_id.to_owned(), vec![started]).await {
            Ok(summary) => ended(summary.status, summary.error, summary.outputs.as_ref()),
            Err(error) => failed(error.to_string()),
        }
    }

    /// Queues the fire's run for a worker, started in the transaction that queues it, then
    /// waits for a worker to end it (a worker that dies hands it to another after its lease).
    async fn queue_one(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        queued: kmsflow_state::NewQueued,
    ) -> (Value, Option<String>) {
        let failed = |error: String| (json!({"error": error}), Some("fail".to_owned()));
        let run_id = queued.id.clone();
        let started = kmsflow_state::Write::FireStarted {
            schedule: schedule.name.clone(),
            occurrence,
            run_id: run_id.clone(),
        };
        let (state, durability) = (self.engine.state.clone(), self.engine.durability);
        let store = tokio::task::spawn_blocking(move || {
            let mut store = kmsflow_state::Store::open(&state, durability)?;
            store.commit(&[kmsflow_state::Write::Enqueue(queued), started])?;
            Ok::<_, kmsflow_state::StoreError>(store)
        })
        .await
        .expect("queueing does not panic");
        let store = match store {
            Ok(store) => std::sync::Arc::new(std::sync::Mutex::new(store)),
            Err(error) => return failed(error.to_string()),
        };
        loop {
            let (store, id) = (store.clone(), run_id.clone());
            let end = tokio::task::spawn_blocking(move || {
                store
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .queued_end(&id)
            })
            .await
            .expect("reading the queue does not panic");
            match end {
                Ok(Some(kmsflow_state::QueuedEnd::Ran(run))) => {
                    return ended(run.status, run.error, run.outputs.as_ref());
                }
                Ok(Some(kmsflow_state::QueuedEnd::NotStarted { error })) => {
                    return failed(error.unwrap_or_else(|| "its worker could not start it".into()));
                }
                Ok(None) => {}
                // The store is away for a moment: the run goes on on its worker.
                Err(error) => tracing::warn!(%error, run = %run_id, "could not read the queue"),
            }
            tokio::time::sleep(Duration::from_millis(500)).await;
        }
    }

    /// The fleet's rows: its targets file as it is now, or the clusters discovered now.
    async fn fleet(
        &self,
        schedule: &ScheduleRecord,
        runbook: &kmsflow_engine::CompiledRunbook,
    ) -> Result<Vec<kmsflow_engine::rollout::TargetRow>, String> {
        match (&schedule.targets, &schedule.discover) {
            (Some(path), _) => {
                crate::targets::read_rows(std::path::Path::new(path)).map_err(|e| e.to_string())
            }
            (None, Some(spec)) => {
                let spec: crate::discover::DiscoverSpec = serde_json::from_value(spec.clone())
                    .map_err(|e| format!("the schedule's stored discovery: {e}"))?;
                crate::discover::rows(self.azure.clone(), &spec, runbook)
                    .await
                    .map_err(|e| e.to_string())
            }
            (None, None) => Err("the schedule names no fleet".into()),
        }
    }

    /// Where the fleet comes from, for messages.
    fn fleet_source(schedule: &ScheduleRecord) -> String {
        schedule
            .targets
            .as_ref()
            .map_or_else(|| "the discovered clusters".into(), |t| format!("`{t}`"))
    }

    /// A rollout of the schedule's runbook over its fleet, as `run --targets` (or
    /// `--discover`) would make it, under the id the fire claimed.
    async fn run_rollout(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        rollout_id: &str,
    ) -> (Value, Option<String>) {
        use kmsflow_engine::rollout::{self, Drive, Policy, RolloutRequest};
        let failed = |error: String| (json!({"error": error}), Some("fail".to_owned()));
        let (compiled, text, reference) = match self.runbook(schedule) {
            Ok(found) => found,
            Err(error) => return failed(error),
        };
        let sources = Self::sources(schedule);
        let rows = match self.fleet(schedule, &compiled).await {
            Ok(rows) => rows,
            Err(error) => return failed(error),
        };
        let bound = match rollout::bind_targets(&compiled, &sources, &rows) {
            Ok(bound) => bound,
            Err(problems) => {
                return failed(format!("{}: {problems}", Self::fleet_source(schedule)));
            }
        };
        let policy: Policy =
            match serde_json::from_value(schedule.policy.clone().unwrap_or_default()) {
                Ok(policy) => policy,
                Err(error) => return failed(format!("the schedule's stored policy: {error}")),
            };
        let launcher = match Launcher::open(&self.engine).await {
            Ok(launcher) => Arc::new(launcher),
            Err(error) => return failed(error.to_string()),
        };
        let request = RolloutRequest {
            runbook: compiled,
            runbook_ref: reference,
            source: text,
            shared: schedule.params.clone(),
            targets: bound,
            policy,
        };
        let drive = Drive {
            params: sources,
            options: ExecOptions::default(),
            signals: Signals::default(),
            progress: Arc::new(|_| {}),
            operator: format!("schedule `{}`", schedule.name).into(),
        };
        // The fire turns `started` in the transaction that creates the rollout.
        let started = kmsflow_state::Write::FireStarted {
            schedule: schedule.name.clone(),
            occurrence,
            run_id: rollout_id.to_owned(),
        };
        let result = rollout::start_with_id(
            &launcher,
            request,
            drive,
            rollout_id.to_owned(),
            vec![started],
        )
        .await;
        if let Ok(launcher) = Arc::try_unwrap(launcher) {
            launcher.close().await;
        }
        match result {
            Ok(summary) => {
                let worst = match summary.status {
                    RunStatus::Succeeded => "ok",
                    RunStatus::Waiting | RunStatus::Interrupted => "warn",
                    _ => "fail",
                };
                (
                    json!({"rollout_id": summary.rollout_id, "status": summary.status,
                           "error": summary.error, "counts": summary.counts, "worst": worst}),
                    Some(worst.to_owned()),
                )
            }
            Err(error) => failed(error.to_string()),
        }
    }

    async fn run_fleet(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        run_id: &str,
    ) -> (Value, Option<String>) {
        // A fleet's fire has no one run: it is started when the fleet is.
        let started = kmsflow_state::Write::FireStarted {
            schedule: schedule.name.clone(),
            occurrence,
            run_id: run_id.to_owned(),
        };
        if let Err(error) = kmsflow_state::Store::open(&self.engine.state, self.engine.durability)
            .and_then(|mut store| store.commit(&[started]))
        {
            tracing::warn!(%error, schedule = %schedule.name, "could not record the fleet fire as started");
        }
        let (runbook, source) = match crate::check::runbook() {
            Ok(found) => found,
            Err(error) => return (json!({"error": error.to_string()}), Some("fail".into())),
        };
        let targets = match self.fleet(schedule, &runbook).await.and_then(|rows| {
            crate::check::targets_of(rows, &Self::fleet_source(schedule)).map_err(|e| e.to_string())
        }) {
            Ok(targets) => targets,
            Err(error) => return (json!({"error": error}), Some("fail".into())),
        };
        let results = match crate::check::check_all(
            &self.engine,
            runbook,
            source,
            &Self::sources(schedule),
            targets,
            16,
        )
        .await
        {
            Ok(results) => results,
            Err(error) => return (json!({"error": error.to_string()}), Some("fail".into())),
        };
        let report = crate::check::report(&results);
        let worst = match crate::check::exit_code(&results) {
            0 => "ok",
            5 => "warn",
            _ => "fail",
        };
        // The clusters that are not ok, with their findings that are not: what on-call reads.
        let attention: Vec<Value> = report["clusters"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|c| c["worst"] != "ok")
            .map(|c| {
                let findings: Vec<&Value> = c["findings"]
                    .as_array()
                    .into_iter()
                    .flatten()
                    .filter(|f| f["severity"] != "ok")
                    .collect();
                json!({"target": c["target"], "worst": c["worst"], "findings": findings})
            })
            .collect();
        (
            json!({"summary": report["summary"], "worst": worst, "clusters": attention}),
            Some(worst.to_owned()),
        )
    }

    /// POSTs the summary, three tries at most; a failure is recorded, never raised.
    async fn post(&self, url: &str, payload: &Value) -> Value {
        let mut last_error = String::new();
        for attempt in 1..=3u32 {
            match self.http.post(url).json(payload).send().await {
                Ok(response) if response.status().is_success() => {
                    return json!({"sent": true, "attempts": attempt});
                }
                Ok(response) => last_error = format!("HTTP {}", response.status()),
                Err(error) => last_error = error.without_url().to_string(),
            }
            tokio::time::sleep(Duration::from_millis(500 * u64::from(attempt))).await;
        }
        tracing::warn!(error = %last_error, "a schedule notification could not be sent");
        json!({"sent": false, "error": last_error})
    }
}

#[async_trait]
impl Firer for RunFirer {
    async fn fire(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        run_id: &str,
    ) -> (Value, Option<String>) {
        let fleet = schedule.targets.is_some() || schedule.discover.is_some();
        match (fleet, &schedule.policy) {
            (true, Some(_)) => self.run_rollout(schedule, occurrence, run_id).await,
            (true, None) => self.run_fleet(schedule, occurrence, run_id).await,
            (false, _) => self.run_one(schedule, occurrence, run_id).await,
        }
    }

    fn fire_id(&self, schedule: &ScheduleRecord) -> String {
        match schedule.policy {
            Some(_) => kmsflow_engine::rollout::new_rollout_id(Utc::now()),
            None => launch::new_run_id(Utc::now()),
        }
    }

    async fn notify(
        &self,
        schedule: &ScheduleRecord,
        occurrence: DateTime<Utc>,
        run_id: &str,
        detail: &Value,
        worst: Option<&str>,
    ) -> Option<Value> {
        if let (Some(url), Some(worst)) = (&schedule.webhook, worst) {
            // On a change of state only (ok to warn or fail, warn to fail and back, recovery):
            // a fleet failing every hour pages once, not every hour.
            let last = schedule.last_worst.as_deref().unwrap_or("ok");
            let was_bad = last != "ok";
            let bad = worst != "ok";
            if worst != last {
                let payload = json!({
                    "schedule": schedule.name,
                    "occurrence": occurrence.to_rfc3339(),
                    "run_id": run_id,
                    "worst": worst,
                    "recovered": !bad && was_bad,
                    "detail": detail,
                });
                return Some(self.post(url, &payload).await);
            }
        }
        None
    }
}

/// A fire's record and worst severity, from how its run ended: the runbook's own `worst`
/// output (a check's), or its status.
fn ended(
    status: RunStatus,
    error: Option<String>,
    outputs: Option<&Value>,
) -> (Value, Option<String>) {
    let worst = outputs
        .and_then(|o| o["worst"].as_str().map(str::to_owned))
        .unwrap_or_else(|| {
            match status {
                RunStatus::Succeeded => "ok",
                RunStatus::Waiting | RunStatus::Interrupted => "warn",
                _ => "fail",
            }
            .to_owned()
        });
    (
        json!({"status": status, "error": error, "worst": worst}),
        Some(worst),
    )
}

/// The stored form of `schedule add`'s parameters: never a secret.
pub fn stored_params(
    runbook: &kmsflow_engine::CompiledRunbook,
    sources: &ParamSources,
) -> Result<Map<String, Value>, Failure> {
    let mut stored = sources.file.clone();
    for (key, value) in &sources.cli {
        stored.insert(key.clone(), Value::String(value.clone()));
    }
    for param in runbook.params.iter().filter(|p| p.secret) {
        if stored.contains_key(&param.name) {
            return Err(Failure::Usage(format!(
                "parameter `{}` is secret and is never stored: give it to the daemon through `KMSFLOW_PARAM_{}`",
                param.name,
                param.name.to_uppercase()
            )));
        }
    }
    let names: Vec<&str> = runbook.params.iter().map(|p| p.name.as_str()).collect();
    if let Some(unknown) = stored.keys().find(|k| !names.contains(&k.as_str())) {
        return Err(Failure::Usage(format!(
            "`{unknown}` is not a parameter of `{}`",
            runbook.name
        )));
    }
    Ok(stored)
}
