//! `kmsflow worker` and `kmsflow run --queue`: runs asked for on one machine and driven on
//! others, through the team's store.
//!
//! `run --queue NAME` binds the runbook's parameters where it is asked (and refuses secrets,
//! which the store never holds), queues the run under a fresh id, then waits and prints its
//! transitions as the worker records them (or with `--detach`, prints the id and returns).
//! A worker claims queued runs (a lease by the store's clock, renewed by a heartbeat), starts
//! each, or resumes it when an earlier worker stopped part-way, and gives each back to the
//! queue when it is drained (SIGTERM, Ctrl-C) before the run ends.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use chrono::Utc;
use kmsflow_engine::executor::{ExecOptions, Signals};
use kmsflow_engine::launch::{self, Continuation, Engine, LaunchError, Launcher, RunRequest};
use kmsflow_engine::params::ParamSources;

use crate::commands::bind;
use kmsflow_state::{LockOwner, NewQueued, QueueStatus, QueuedRun, RunStatus, Store, Write};
use serde_json::json;

use crate::commands::Context;
use crate::failure::{Failure, code, status_code};

/// How long a claim lasts without a heartbeat: the run lock's lease, so a worker's claims and
/// its runs' locks run out together.
fn claim_lease() -> chrono::Duration {
    kmsflow_engine::lease::lease()
}

/// What `run --queue` was asked.
pub struct Enqueue<'a> {
    pub runbook: &'a str,
    pub params: &'a crate::cli::ParamArgs,
    pub queue: String,
    pub concurrency: u16,
    pub yes: bool,
    pub detach: bool,
}

/// `kmsflow run RUNBOOK --queue NAME`.
pub async fn enqueue(context: &Context, asked: Enqueue<'_>) -> Result<u8, Failure> {
    let loaded = crate::commands::load(asked.runbook)?;
    let compiled = crate::commands::compile_loaded(&loaded)?;
    let bound = bind(
        &compiled,
        &crate::commands::param_sources(context, asked.params)?,
    )?;
    if !bound.secret_values().is_empty() {
        return Err(Failure::Usage(format!(
            "`{}` takes secret parameters, and a queued run would have to keep them in the \
             store, which never holds a secret: run it with `kmsflow run` where the secret is",
            loaded.reference
        )));
    }
    let engine = context.engine()?;
    crate::commands::confirm_run(&compiled, &bound, &engine, asked.yes, false).await?;
    let now = Utc::now();
    let id = launch::new_run_id(now);
    let queued = NewQueued {
        id: id.clone(),
        queue: asked.queue.clone(),
        runbook: compiled.name.clone(),
        runbook_ref: loaded.reference.clone(),
        content_hash: compiled.content_hash.clone(),
        source: loaded.source.text.to_string(),
        fragments: launch::storable_fragments(&compiled),
        params: bound.storable(),
        options: json!({"concurrency": asked.concurrency}),
        enqueued_at: now,
    };
    let mut store = Store::open(&engine.state, engine.durability)?;
    store.commit(&[Write::Enqueue(queued)])?;
    if asked.detach {
        println!("{id}");
        crate::output::note!(
            "queued run {id} on `{}`; `kmsflow show {id}` follows it",
            asked.queue
        );
        return Ok(code::SUCCESS);
    }
    crate::output::note!("queued run {id} on `{}`; waiting for a worker", asked.queue);
    follow(&store, &id).await
}

/// Prints a queued run's transitions as workers record them, until it ends; its exit code.
async fn follow(store: &Store, id: &str) -> Result<u8, Failure> {
    let mut seen = 0;
    loop {
        let fresh: Vec<_> = store
            .events(id)?
            .into_iter()
            .filter(|e| e.seq > seen)
            .collect();
        for entry in fresh {
            seen = entry.seq;
            match (&entry.step_id, entry.kind.as_str()) {
                (_, "queue_claimed") => crate::output::note!(
                    "{id}: taken by worker {}",
                    entry.detail["worker"].as_str().unwrap_or("?")
                ),
                (Some(step), kind) => crate::output::note!("{id}: {step} {kind}"),
                (None, kind) => crate::output::note!("{id}: {kind}"),
            }
        }
        let queued = store.queued(id)?;
        if queued.as_ref().map(|q| q.status) == Some(QueueStatus::Done) {
            let run = store.run(id)?;
            if let Some(error) = &run.error {
                crate::output::note!("{id}: {error}");
            }
            return Ok(status_code(run.status));
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
}

/// `kmsflow worker`.
pub async fn worker(context: &Context, queue: String, concurrency: usize) -> Result<u8, Failure> {
    let engine = context.engine()?;
    let owner = LockOwner::current();
    let name = format!("{}/{}", owner.host, owner.pid);
    let signals = crate::signals::install();
    let store = Arc::new(Mutex::new(Store::open(&engine.state, engine.durability)?));
    // One launcher for every run this worker drives: their checkpoints share commits (and on
    // PostgreSQL a connection), instead of a login or two per run.
    let launcher = Arc::new(Launcher::open(&engine).await?);
    crate::output::note!(
        "worker {name} taking runs of queue `{queue}` from {}, {concurrency} at once",
        engine.state
    );
    // Runs take the worker's slots; a rollout's drive takes none (it only queues its
    // targets and waits for them), so a worker whose slots a rollout fills is never left
    // waiting on itself.
    let (mut running, mut driving) = (tokio::task::JoinSet::new(), tokio::task::JoinSet::new());
    while !signals.drain.is_cancelled() {
        while running.try_join_next().is_some() {}
        while driving.try_join_next().is_some() {}
        let free = concurrency.saturating_sub(running.len());
        if free > 0 {
            let claimed = {
                let (store, queue, name) = (store.clone(), queue.clone(), name.clone());
                tokio::task::spawn_blocking(move || {
                    store
                        .lock()
                        .unwrap_or_else(|p| p.into_inner())
                        .claim_queued(&queue, &name, claim_lease(), free)
                })
                .await
                .expect("claims do not panic")
            };
            match claimed {
                Ok(claimed) => {
                    for queued in claimed {
                        let drive = Drive {
                            engine: engine.clone(),
                            launcher: launcher.clone(),
                            worker: name.clone(),
                            signals: signals.clone(),
                        };
                        if crate::rollouts::is_rollout(&queued.id) {
                            driving.spawn(drive.run(queued));
                        } else {
                            running.spawn(drive.run(queued));
                        }
                    }
                }
                Err(error) => tracing::warn!(%error, "could not claim queued runs; trying again"),
            }
        }
        // A run that ends frees its slot: claim the next at once rather than at the next look.
        tokio::select! {
            () = signals.drain.cancelled() => {}
            () = tokio::time::sleep(Duration::from_millis(250)) => {}
            Some(_) = running.join_next(), if !running.is_empty() => {}
        }
    }
    crate::output::note!(
        "worker {name} draining: {} runs finish their running steps",
        running.len()
    );
    while running.join_next().await.is_some() {}
    while driving.join_next().await.is_some() {}
    if let Ok(launcher) = Arc::try_unwrap(launcher) {
        launcher.close().await;
    }
    crate::output::note!("worker {name} stopped");
    Ok(code::SUCCESS)
}

/// One claimed run, driven to its end (or to the drain).
struct Drive {
    engine: Engine,
    launcher: Arc<Launcher>,
    worker: String,
    signals: Signals,
}

impl Drive {
    async fn run(self, queued: QueuedRun) {
        let id = queued.id.clone();
        let heartbeat = self.heartbeat(&id);
        let outcome = self.execute(&queued).await;
        heartbeat.abort();
        let status = match &outcome {
            Ok(status) => Some(*status),
            Err(error) => {
                tracing::warn!(run = %id, %error, "the queued run stopped");
                crate::output::note!("{id}: {error}");
                None
            }
        };
        // The entry is done once its run reached an end a worker cannot take further (an
        // approval, a failure, success); a drained run goes back to the queue, and so does one
        // whose lock another run holds.
        let done = match &outcome {
            Ok(status) => !matches!(status, RunStatus::Interrupted | RunStatus::Running),
            Err(Failure::LockHeld(_) | Failure::Launch(LaunchError::Store(_))) => false,
            Err(_) => true,
        };
        if let Some(status) = status {
            crate::output::note!("{id}: {status}");
        }
        let release = Write::QueueRelease {
            id: id.clone(),
            worker: self.worker.clone(),
            done,
            error: outcome.as_ref().err().map(ToString::to_string),
            at: Utc::now(),
        };
        // Through the worker's own writer: its session, and a commit shared with the runs'
        // checkpoints, rather than a new database session for every run that ends.
        let released = self.launcher.checkpoints().commit(vec![release]).await;
        if let Err(error) = released {
            // The claim runs out on its own and another worker resumes the run.
            tracing::warn!(run = %id, %error, "could not give the queued run back");
        }
    }

    /// Renews the claim every quarter of its lease while the run goes on.
    fn heartbeat(&self, id: &str) -> tokio::task::JoinHandle<()> {
        let (engine, id, worker) = (self.engine.clone(), id.to_owned(), self.worker.clone());
        tokio::spawn(async move {
            let every = kmsflow_engine::lease::lock_lease() / 4;
            loop {
                tokio::time::sleep(every).await;
                let beat = Write::QueueHeartbeat {
                    id: id.clone(),
                    worker: worker.clone(),
                    lease: claim_lease(),
                };
                let engine = engine.clone();
                let renewed = tokio::task::spawn_blocking(move || {
                    Store::open(&engine.state, engine.durability)?.commit(&[beat])
                })
                .await
                .expect("a heartbeat does not panic");
                if let Err(error) = renewed {
                    // The run's own lock fences it if another worker took over.
                    tracing::warn!(run = %id, %error, "heartbeat failed");
                }
            }
        })
    }

    /// Starts the run, or resumes it where an earlier worker left it; drives a rollout.
    async fn execute(&self, queued: &QueuedRun) -> Result<RunStatus, Failure> {
        if crate::rollouts::is_rollout(&queued.id) {
            self.drive_rollout(&self.launcher, queued).await
        } else {
            self.execute_on(&self.launcher, queued).await
        }
    }

    /// Drives a distributed rollout: its targets' runs go to the queue, for any worker.
    async fn drive_rollout(
        &self,
        launcher: &Arc<Launcher>,
        queued: &QueuedRun,
    ) -> Result<RunStatus, Failure> {
        let resumed = queued.claims > 1;
        crate::output::note!(
            "{}: {} the rollout of {}",
            queued.id,
            if resumed { "taking over" } else { "driving" },
            queued.runbook_ref
        );
        let drive = kmsflow_engine::rollout::Drive {
            params: ParamSources::default(),
            options: options_of(queued),
            signals: self.signals.clone(),
            progress: Arc::new(|_: &kmsflow_engine::rollout::RolloutProgress| {}),
            operator: format!("worker {}", self.worker).into(),
        };
        let summary =
            kmsflow_engine::rollout::drive_stored(launcher, &queued.id, drive, resumed).await?;
        Ok(summary.status)
    }

    async fn execute_on(
        &self,
        launcher: &Launcher,
        queued: &QueuedRun,
    ) -> Result<RunStatus, Failure> {
        let options = options_of(queued);
        let id = queued.id.clone();
        let exists = launcher
            .on_store(move |store| Ok(store.run(&id).is_ok()))
            .await?;
        let summary = if exists {
            crate::output::note!("{}: resuming where the previous worker stopped", queued.id);
            launcher
                .resume(Continuation {
                    run_id: queued.id.clone(),
                    params: ParamSources::default(),
                    allow_param_change: false,
                    changed_runbook: None,
                    options,
                    signals: self.signals.clone(),
                    progress: kmsflow_engine::progress::silent(),
                    from: None,
                    operator: format!("worker {}", self.worker).into(),
                })
                .await?
        } else {
            crate::output::note!("{}: starting {}", queued.id, queued.runbook_ref);
            let runbook = launcher.compile_stored(
                &queued.id,
                &queued.runbook_ref,
                &queued.source,
                &queued.fragments,
            )?;
            // Exactly the values bound where the run was asked: nothing of this worker's
            // environment is bound in (it could point the run at another target).
            let sources = ParamSources {
                file: queued.params.as_object().cloned().unwrap_or_default(),
                ..ParamSources::default()
            };
            let params = bind(&runbook, &sources)?;
            let request = RunRequest {
                runbook,
                runbook_ref: queued.runbook_ref.clone(),
                source: queued.source.clone(),
                params,
                options,
                signals: self.signals.clone(),
                progress: kmsflow_engine::progress::silent(),
            };
            // A distributed rollout's target: linked to its run as the run is created.
            let link = queued.options["target"]["rollout_id"]
                .as_str()
                .zip(queued.options["target"]["position"].as_u64())
                .map(|(rollout_id, position)| Write::RolloutTargetStarted {
                    rollout_id: rollout_id.to_owned(),
                    position: position as usize,
                    run_id: queued.id.clone(),
                    at: Utc::now(),
                });
            launcher
                .start_with_id(request, queued.id.clone(), link.into_iter().collect())
                .await?
        };
        Ok(summary.status)
    }
}

/// How a queued entry asked to be driven.
fn options_of(queued: &QueuedRun) -> ExecOptions {
    ExecOptions {
        concurrency: queued.options["concurrency"].as_u64().unwrap_or(8).max(1) as usize,
        ..ExecOptions::default()
    }
}
