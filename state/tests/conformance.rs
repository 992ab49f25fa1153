//! One store conformance suite, run on both backends: every scenario runs once on a SQLite
//! file and once on a database of a real PostgreSQL server (a throwaway one, see
//! `kmsflow-pgtest`). A backend passes only what the other passes.

use std::sync::mpsc;

use chrono::{Duration, Utc};
use kmsflow_state::{
    Durability, FireOutcome, FireRecord, Location, LockGrant, LockOwner, NewRollout, NewTarget,
    Overlap, RunStatus, ScheduleRecord, StepStatus, Store, StoreError, Write, Writer,
};
use serde_json::json;

mod support;
use support::{commit_together, new_run};

/// A fresh, empty store of each kind; the folder keeps a SQLite file alive.
struct Fresh {
    location: Location,
    _dir: tempfile::TempDir,
}

fn sqlite() -> Fresh {
    let dir = tempfile::tempdir().unwrap();
    Fresh {
        location: Location::File(dir.path().join("state.db")),
        _dir: dir,
    }
}

fn postgres() -> Fresh {
    let url = kmsflow_pgtest::server().database();
    Fresh {
        location: Location::parse(&url).unwrap(),
        _dir: tempfile::tempdir().unwrap(),
    }
}

impl Fresh {
    fn open(&self) -> Store {
        Store::open(&self.location, Durability::Full).unwrap()
    }
}

/// Each scenario, once per backend.
macro_rules! on_both_backends {
    ($($scenario:ident),* $(,)?) => {
        mod on_sqlite {
            $(#[test] fn $scenario() { super::$scenario(super::sqlite()) })*
        }
        mod on_postgres {
            $(#[test] fn $scenario() { super::$scenario(super::postgres()) })*
        }
    };
}

on_both_backends!(
    a_run_its_steps_and_journal_read_back_as_written,
    a_runs_steps_are_recorded_in_order_and_a_changed_runbook_renumbers_them,
    run_ids_resolve_by_prefix_and_ambiguity_is_named,
    a_failed_checkpoint_in_a_batch_fails_alone_and_stores_nothing_of_itself,
    a_lock_is_held_against_others_and_every_takeover_raises_the_token,
    a_fence_refuses_a_former_holder_and_the_checkpoint_it_leads,
    a_fenced_checkpoint_in_a_batch_is_never_committed_and_its_neighbours_are,
    a_fence_says_why_in_the_same_words_on_both_backends,
    a_check_left_out_of_a_batch_is_never_one_made_after_a_lock_changed,
    a_batchs_journal_rows_keep_the_order_they_were_written_in,
    a_batchs_step_outcomes_land_in_the_order_they_were_written,
    a_fenced_checkpoint_at_the_end_of_a_long_batch_is_never_committed,
    approvals_are_decided_once,
    an_occurrence_is_claimed_by_exactly_one_of_many_stores,
    schedules_round_trip_and_pause,
    a_rollout_links_each_target_to_one_run,
    journal_sequence_numbers_grow_in_commit_order,
    many_processes_migrating_at_once_are_safe,
    a_whole_history_is_copied_once_into_an_empty_store,
    queued_runs_are_claimed_once_and_a_stopped_workers_claims_pass_on,
    a_queued_run_whose_workers_keep_stopping_is_quarantined_and_its_siblings_go_on,
);

fn a_run_its_steps_and_journal_read_back_as_written(fresh: Fresh) {
    let mut store = fresh.open();
    let at = Utc::now();
    store
        .commit(&[
            new_run("run-1", &["a", "b"], Some("cluster/aks-1")),
            Write::StepApplying {
                run_id: "run-1".into(),
                step_id: "a".into(),
                attempt: 1,
                before_image: json!({"mode": "pmk"}),
                planned_outcome: kmsflow_state::Outcome::Updated,
                at,
            },
            Write::StepSucceeded {
                run_id: "run-1".into(),
                step_id: "a".into(),
                attempt: 2,
                outcome: kmsflow_state::Outcome::Updated,
                outputs: json!({"key": "v1"}),
                at,
            },
            Write::StepSkipped {
                run_id: "run-1".into(),
                step_id: "b".into(),
                reason: "if was false".into(),
                at,
            },
            Write::RunFinished {
                run_id: "run-1".into(),
                status: RunStatus::Succeeded,
                error: None,
                outputs: Some(json!({"done": true})),
                at,
            },
        ])
        .unwrap();
    let run = store.run("run-1").unwrap();
    assert_eq!(run.status, RunStatus::Succeeded);
    assert_eq!(run.source, "name: t");
    assert_eq!(run.params, json!({"cluster": "aks-1"}));
    assert_eq!(run.secret_params, ["token"]);
    assert_eq!(run.lock_key.as_deref(), Some("cluster/aks-1"));
    assert_eq!(run.outputs, Some(json!({"done": true})));
    let steps = store.steps("run-1").unwrap();
    assert_eq!(steps.len(), 2);
    assert_eq!(steps[0].status, StepStatus::Succeeded);
    assert_eq!(steps[0].attempts, 2, "the larger attempt is kept");
    assert_eq!(steps[0].before_image, Some(json!({"mode": "pmk"})));
    assert_eq!(steps[0].outputs, Some(json!({"key": "v1"})));
    assert_eq!(steps[1].status, StepStatus::Skipped);
    // Microseconds survive, on both.
    assert_eq!(
        steps[0].finished_at.map(|t| t.timestamp_micros()),
        Some(at.timestamp_micros())
    );
    let kinds: Vec<String> = store
        .events("run-1")
        .unwrap()
        .into_iter()
        .map(|e| e.kind)
        .collect();
    assert_eq!(
        kinds,
        [
            "run_created",
            "step_applying",
            "step_succeeded",
            "step_skipped",
            "run_succeeded"
        ]
    );
    assert_eq!(store.runs(10).unwrap().len(), 1);
    assert_eq!(store.runs_outside_rollouts(10).unwrap().len(), 1);
    // A second store on the same location sees it (another process, another machine).
    assert_eq!(fresh.open().run("run-1").unwrap(), run);
}

/// Step rows go in one statement on PostgreSQL (a JSON array the server unpacks): ids that
/// need quoting, and many of them, come back exactly, in runbook order; a resume whose runbook
/// changed keeps what a step recorded and gives it its new place.
fn a_runs_steps_are_recorded_in_order_and_a_changed_runbook_renumbers_them(fresh: Fresh) {
    let mut store = fresh.open();
    let mut ids: Vec<String> = (0..1_200).map(|i| format!("s{i}")).collect();
    ids[7] = "it's \"quoted\" \\ and ünïcode, {\"not\": \"json\"}".into();
    let id_refs: Vec<&str> = ids.iter().map(String::as_str).collect();
    let at = Utc::now();
    store
        .commit(&[
            new_run("run-1", &id_refs, None),
            Write::StepSucceeded {
                run_id: "run-1".into(),
                step_id: ids[7].clone(),
                attempt: 1,
                outcome: kmsflow_state::Outcome::Created,
                outputs: json!({"id": "x"}),
                at,
            },
        ])
        .unwrap();
    let steps = store.steps("run-1").unwrap();
    let read: Vec<&str> = steps.iter().map(|s| s.step_id.as_str()).collect();
    assert_eq!(read, id_refs, "every step, in runbook order");
    assert!(steps.iter().all(|s| s.uses == "noop"));
    assert_eq!(steps[7].status, StepStatus::Succeeded);

    // The changed runbook puts a new step first and the quoted one last.
    let mut changed: Vec<(String, String)> = vec![("new".into(), "file".into())];
    changed.extend(
        ids.iter()
            .filter(|id| **id != ids[7])
            .map(|id| (id.clone(), "noop".into())),
    );
    changed.push((ids[7].clone(), "noop".into()));
    store
        .commit(&[Write::RunResumed {
            run_id: "run-1".into(),
            at,
            new_source: None,
            steps: changed.clone(),
            reset: Vec::new(),
            operator: json!({}),
        }])
        .unwrap();
    let steps = store.steps("run-1").unwrap();
    let read: Vec<(&str, &str)> = steps
        .iter()
        .map(|s| (s.step_id.as_str(), s.uses.as_str()))
        .collect();
    let expected: Vec<(&str, &str)> = changed
        .iter()
        .map(|(id, uses)| (id.as_str(), uses.as_str()))
        .collect();
    assert_eq!(read, expected, "the new order, the new step pending");
    let quoted = steps.last().unwrap();
    assert_eq!(quoted.status, StepStatus::Succeeded, "its record is kept");
    assert_eq!(quoted.outputs, Some(json!({"id": "x"})));
    assert_eq!(steps[0].status, StepStatus::Pending);
}

fn run_ids_resolve_by_prefix_and_ambiguity_is_named(fresh: Fresh) {
    let mut store = fresh.open();
    store
        .commit(&[
            new_run("abc-1", &[], None),
            new_run("abc-2", &[], None),
            new_run("xyz-1", &[], None),
        ])
        .unwrap();
    assert_eq!(store.resolve_run_id("xyz").unwrap(), "xyz-1");
    assert_eq!(store.resolve_run_id("abc-2").unwrap(), "abc-2");
    match store.resolve_run_id("abc") {
        Err(StoreError::AmbiguousRunId { candidates, .. }) => {
            assert_eq!(candidates, ["abc-1", "abc-2"])
        }
        other => panic!("{other:?}"),
    }
    assert!(matches!(
        store.resolve_run_id("nope"),
        Err(StoreError::RunNotFound(_))
    ));
}

fn a_failed_checkpoint_in_a_batch_fails_alone_and_stores_nothing_of_itself(fresh: Fresh) {
    let store = fresh.open();
    let (writer, thread) = Writer::spawn(store);
    // Hold the writer busy so the three checkpoints below are committed as one batch.
    let (release, hold) = mpsc::channel::<()>();
    writer.run(Box::new(move |_| {
        let _ = hold.recv();
    }));
    let mut results = Vec::new();
    for writes in [
        vec![new_run("ok-1", &["a"], None)],
        // The second write breaks the primary key: the whole checkpoint fails, the event
        // before it included.
        vec![
            Write::Event {
                run_id: "dup".into(),
                step_id: None,
                kind: "marker".into(),
                detail: json!({}),
                at: Utc::now(),
            },
            new_run("ok-1", &["a"], None),
        ],
        vec![new_run("ok-2", &["a"], None)],
    ] {
        let (done, result) = mpsc::channel();
        writer.submit(writes, Box::new(move |r| done.send(r).unwrap()));
        results.push(result);
    }
    release.send(()).unwrap();
    let results: Vec<_> = results.into_iter().map(|r| r.recv().unwrap()).collect();
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(results[1].is_err());
    drop(writer);
    thread.join();
    let store = fresh.open();
    assert!(store.run("ok-1").is_ok() && store.run("ok-2").is_ok());
    assert!(
        store.events("dup").unwrap().is_empty(),
        "nothing of the failed one"
    );
}

fn elsewhere(pid: u32) -> LockOwner {
    LockOwner {
        pid,
        host: "another-machine".into(),
    }
}

/// `run` takes `key` for `lease_s` seconds (negative: already run out), as process `pid` on
/// another machine; the lock must be free or expired.
fn granted(store: &mut Store, key: &str, run: &str, pid: u32, lease_s: i64) -> LockGrant {
    store
        .acquire_lock(key, run, &elsewhere(pid), Duration::seconds(lease_s))
        .unwrap()
        .unwrap()
}

fn a_lock_is_held_against_others_and_every_takeover_raises_the_token(fresh: Fresh) {
    let mut one = fresh.open();
    let mut two = fresh.open();
    let first = one
        .acquire_lock(
            "cluster/aks-1",
            "run-1",
            &elsewhere(1),
            Duration::seconds(60),
        )
        .unwrap()
        .unwrap();
    let held = two
        .acquire_lock(
            "cluster/aks-1",
            "run-2",
            &elsewhere(2),
            Duration::seconds(60),
        )
        .unwrap()
        .unwrap_err();
    assert_eq!((held.run_id.as_str(), held.pid), ("run-1", 1));
    assert!(one.driven_now("cluster/aks-1", "run-1").unwrap());
    // An expired lease (by the store's clock) is taken over, with a larger token.
    let stale = two
        .acquire_lock(
            "cluster/aks-2",
            "run-1",
            &elsewhere(1),
            Duration::seconds(-1),
        )
        .unwrap()
        .unwrap();
    assert!(!two.driven_now("cluster/aks-2", "run-1").unwrap());
    let taken = one
        .acquire_lock(
            "cluster/aks-2",
            "run-2",
            &elsewhere(2),
            Duration::seconds(60),
        )
        .unwrap()
        .unwrap();
    assert_eq!(taken.token, stale.token + 1);
    assert!(first.token >= 1);
}

fn a_fence_refuses_a_former_holder_and_the_checkpoint_it_leads(fresh: Fresh) {
    let mut store = fresh.open();
    store.commit(&[new_run("run-1", &["a"], None)]).unwrap();
    let old = granted(&mut store, "k", "run-1", 1, -1);
    let new = granted(&mut store, "k", "run-2", 2, 60);
    let fenced = store.commit(&[
        Write::CheckFence {
            key: "k".into(),
            run_id: "run-1".into(),
            token: old.token,
        },
        Write::StepApplying {
            run_id: "run-1".into(),
            step_id: "a".into(),
            attempt: 1,
            before_image: json!({}),
            planned_outcome: kmsflow_state::Outcome::Updated,
            at: Utc::now(),
        },
    ]);
    match fenced {
        Err(StoreError::LeaseLost { taken_by, .. }) => {
            assert_eq!(taken_by.as_deref(), Some("run-2"))
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(
        store.steps("run-1").unwrap()[0].status,
        StepStatus::Pending,
        "nothing after a failed fence is applied"
    );
    // Renewal is compare and swap on the token.
    let renewal = store.commit(&[Write::RenewLock {
        key: "k".into(),
        run_id: "run-1".into(),
        token: old.token,
        lease: Duration::seconds(60),
    }]);
    assert!(matches!(renewal, Err(StoreError::LeaseLost { .. })));
    store
        .commit(&[
            Write::RenewLock {
                key: "k".into(),
                run_id: "run-2".into(),
                token: new.token,
                lease: Duration::seconds(60),
            },
            Write::CheckFence {
                key: "k".into(),
                run_id: "run-2".into(),
                token: new.token,
            },
        ])
        .unwrap();
}

/// The fencing check, a step's update and its journal row travel together (one round trip on
/// PostgreSQL): a checkpoint whose check fails must still leave nothing behind, wherever it
/// sits in a batch, and its neighbours (before and after, fenced fine) must commit.
fn a_fenced_checkpoint_in_a_batch_is_never_committed_and_its_neighbours_are(fresh: Fresh) {
    let mut store = fresh.open();
    store
        .commit(&[
            new_run("run-old", &["a"], None),
            new_run("run-1", &["a"], None),
            new_run("run-2", &["a"], None),
        ])
        .unwrap();
    let old = granted(&mut store, "k", "run-old", 1, -1);
    let new = granted(&mut store, "k", "run-1", 2, 60);
    let other = granted(&mut store, "k2", "run-2", 3, 60);
    let applying = |run: &str| Write::StepApplying {
        run_id: run.into(),
        step_id: "a".into(),
        attempt: 1,
        before_image: json!({"run": run}),
        planned_outcome: kmsflow_state::Outcome::Updated,
        at: Utc::now(),
    };
    let fence = |key: &str, run: &str, token: i64| Write::CheckFence {
        key: key.into(),
        run_id: run.into(),
        token,
    };
    let results = commit_together(
        store,
        vec![
            vec![fence("k", "run-1", new.token), applying("run-1")],
            vec![fence("k", "run-old", old.token), applying("run-old")],
            vec![fence("k2", "run-2", other.token), applying("run-2")],
        ],
    );
    assert!(results[0].is_ok() && results[2].is_ok(), "{results:?}");
    assert!(
        matches!(&results[1], Err(StoreError::LeaseLost { taken_by, .. }) if taken_by.as_deref() == Some("run-1")),
        "{:?}",
        results[1]
    );
    let store = fresh.open();
    let status = |run: &str| store.steps(run).unwrap()[0].status;
    assert_eq!(
        status("run-old"),
        StepStatus::Pending,
        "nothing of the fenced one"
    );
    assert!(
        !store
            .events("run-old")
            .unwrap()
            .iter()
            .any(|e| e.kind == "step_applying"),
        "no journal row of the fenced one"
    );
    assert_eq!(status("run-1"), StepStatus::Running);
    assert_eq!(status("run-2"), StepStatus::Running);
}

/// Checkpoints committed together may share one fencing check (the writer leaves out a
/// check the same as one already made in the transaction), but never across a write that
/// changed a lock: here the run frees its lock mid-batch, and its next fenced checkpoint
/// must fail alone while the ones before it commit.
fn a_check_left_out_of_a_batch_is_never_one_made_after_a_lock_changed(fresh: Fresh) {
    let mut store = fresh.open();
    store
        .commit(&[new_run("run-1", &["a", "b", "c"], None)])
        .unwrap();
    let held = granted(&mut store, "k", "run-1", 1, 60);
    let fence = || Write::CheckFence {
        key: "k".into(),
        run_id: "run-1".into(),
        token: held.token,
    };
    let applying = |step: &str| Write::StepApplying {
        run_id: "run-1".into(),
        step_id: step.into(),
        attempt: 1,
        before_image: json!({}),
        planned_outcome: kmsflow_state::Outcome::Updated,
        at: Utc::now(),
    };
    let results = commit_together(
        store,
        vec![
            vec![fence(), applying("a")],
            vec![fence(), applying("b")],
            vec![Write::ReleaseLock {
                key: "k".into(),
                run_id: "run-1".into(),
            }],
            vec![fence(), applying("c")],
        ],
    );
    assert!(results[..3].iter().all(Result::is_ok), "{results:?}");
    assert!(
        matches!(&results[3], Err(StoreError::LeaseLost { why, .. }) if why == "the lock is not held"),
        "{:?}",
        results[3]
    );
    let statuses: Vec<StepStatus> = fresh
        .open()
        .steps("run-1")
        .unwrap()
        .iter()
        .map(|s| s.status)
        .collect();
    assert_eq!(
        statuses,
        [
            StepStatus::Running,
            StepStatus::Running,
            StepStatus::Pending
        ]
    );
}

/// Journal rows of checkpoints committed together go to PostgreSQL as one statement: their
/// sequence numbers must still follow the order they were written in, across runs.
fn a_batchs_journal_rows_keep_the_order_they_were_written_in(fresh: Fresh) {
    let mut store = fresh.open();
    let steps: Vec<String> = (0..40).map(|i| format!("s{i}")).collect();
    let step_refs: Vec<&str> = steps.iter().map(String::as_str).collect();
    store
        .commit(&[
            new_run("run-1", &step_refs, None),
            new_run("run-2", &step_refs, None),
        ])
        .unwrap();
    let mut written = Vec::new();
    let mut checkpoints = Vec::new();
    for (i, step) in steps.iter().enumerate() {
        // Alternating runs; every third checkpoint adds a row of its own kind.
        let run = if i % 2 == 0 { "run-1" } else { "run-2" };
        let mut writes = vec![Write::StepSucceeded {
            run_id: run.into(),
            step_id: step.clone(),
            attempt: 1,
            outcome: kmsflow_state::Outcome::Unchanged,
            outputs: json!({}),
            at: Utc::now(),
        }];
        written.push((
            run.to_owned(),
            "step_succeeded".to_owned(),
            Some(step.clone()),
        ));
        if i % 3 == 0 {
            writes.push(Write::Event {
                run_id: run.into(),
                step_id: None,
                kind: format!("note-{i}"),
                detail: json!({"i": i}),
                at: Utc::now(),
            });
            written.push((run.to_owned(), format!("note-{i}"), None));
        }
        checkpoints.push(writes);
    }
    for result in commit_together(store, checkpoints) {
        result.unwrap();
    }
    let store = fresh.open();
    let mut read: Vec<_> = ["run-1", "run-2"]
        .into_iter()
        .flat_map(|run| store.events(run).unwrap())
        .filter(|e| e.kind != "run_created")
        .collect();
    read.sort_by_key(|e| e.seq);
    let read: Vec<_> = read
        .into_iter()
        .map(|e| (e.run_id, e.kind, e.step_id))
        .collect();
    assert_eq!(read, written);
}

/// Steps' outcomes of checkpoints committed together go to PostgreSQL as few statements: each
/// step must still end as the last write to it says, whatever lies between (another kind of
/// write to the same step, a second outcome for it, another run's step of the same id, a
/// fencing check), exactly as when each goes alone.
fn a_batchs_step_outcomes_land_in_the_order_they_were_written(fresh: Fresh) {
    let mut store = fresh.open();
    let steps = ["a", "b", "c", "d", "e"];
    let lock =
        |store: &mut Store, run: &str| granted(store, &format!("cluster/{run}"), run, 7, 600);
    store
        .commit(&[
            new_run("run-1", &steps, Some("cluster/run-1")),
            new_run("run-2", &steps, Some("cluster/run-2")),
        ])
        .unwrap();
    let (one, two) = (lock(&mut store, "run-1"), lock(&mut store, "run-2"));
    let fence = |run: &str, grant: &LockGrant| Write::CheckFence {
        key: format!("cluster/{run}"),
        run_id: run.into(),
        token: grant.token,
    };
    let succeeded = |run: &str, step: &str, attempt: u32, outcome, n: i64| Write::StepSucceeded {
        run_id: run.into(),
        step_id: step.into(),
        attempt,
        outcome,
        outputs: json!({"n": n}),
        at: Utc::now(),
    };
    use kmsflow_state::Outcome::{Created, Unchanged, Updated};
    let applying = |step: &str, attempt: u32, was: &str| Write::StepApplying {
        run_id: "run-1".into(),
        step_id: step.into(),
        attempt,
        before_image: json!({ "was": was }),
        planned_outcome: Updated,
        at: Utc::now(),
    };
    let checkpoints = vec![
        vec![
            fence("run-1", &one),
            succeeded("run-1", "a", 1, Unchanged, 1),
        ],
        vec![fence("run-1", &one), succeeded("run-1", "b", 1, Created, 2)],
        // Another run's step of the same id, behind that run's first fencing check: the check
        // may leave before the outcomes gathered so far, which it does not read.
        vec![fence("run-2", &two), succeeded("run-2", "a", 1, Created, 3)],
        // The same step again, by another kind of write: it must come after the outcome.
        vec![
            fence("run-1", &one),
            Write::StepFailed {
                run_id: "run-1".into(),
                step_id: "a".into(),
                attempt: 2,
                error: "failed after it succeeded".into(),
                refused: false,
                at: Utc::now(),
            },
        ],
        vec![
            fence("run-1", &one),
            succeeded("run-1", "c", 1, Unchanged, 4),
        ],
        // A second outcome for the same step: the later one stands.
        vec![fence("run-1", &one), succeeded("run-1", "c", 3, Updated, 5)],
        vec![
            fence("run-2", &two),
            succeeded("run-2", "b", 2, Unchanged, 6),
        ],
        // Another kind of write to the same step, before its outcome.
        vec![
            fence("run-1", &one),
            applying("d", 1, "pmk"),
            succeeded("run-1", "d", 1, Updated, 7),
        ],
        // And one after it, sent without waiting like the outcome: it must still come after.
        vec![
            fence("run-1", &one),
            succeeded("run-1", "e", 1, Unchanged, 8),
        ],
        vec![fence("run-1", &one), applying("e", 2, "cmk")],
    ];
    for result in commit_together(store, checkpoints) {
        result.unwrap();
    }
    // A batch with a fenced checkpoint: it fails alone, the batch goes again without
    // gathering, and the others must land the same way.
    let results = commit_together(
        fresh.open(),
        vec![
            vec![
                fence("run-2", &two),
                succeeded("run-2", "d", 1, Unchanged, 10),
            ],
            vec![
                Write::CheckFence {
                    key: "cluster/run-2".into(),
                    run_id: "run-2".into(),
                    token: two.token - 1,
                },
                succeeded("run-2", "c", 1, Created, 9),
            ],
            vec![
                fence("run-2", &two),
                succeeded("run-2", "e", 1, Created, 11),
            ],
        ],
    );
    let failed: Vec<bool> = results.iter().map(Result::is_err).collect();
    assert_eq!(failed, [false, true, false], "{results:?}");
    let store = fresh.open();
    let found = |run: &str| {
        store
            .steps(run)
            .unwrap()
            .into_iter()
            .map(|s| {
                (
                    s.step_id, s.status, s.attempts, s.outcome, s.outputs, s.error,
                )
            })
            .collect::<Vec<_>>()
    };
    let ended = |step: &str, attempts, outcome, n: i64| {
        (
            step.to_owned(),
            StepStatus::Succeeded,
            attempts,
            Some(outcome),
            Some(json!({"n": n})),
            None,
        )
    };
    let pending = |step: &str| (step.to_owned(), StepStatus::Pending, 0, None, None, None);
    let a = found("run-1").remove(0);
    assert_eq!(
        (a.1, a.2, a.5.as_deref()),
        (StepStatus::Failed, 2, Some("failed after it succeeded")),
        "the failure written after the outcome stands: {a:?}"
    );
    assert_eq!(
        found("run-1")[1..],
        [
            ended("b", 1, Created, 2),
            ended("c", 3, Updated, 5),
            ended("d", 1, Updated, 7),
            (
                "e".to_owned(),
                StepStatus::Running,
                2,
                Some(Unchanged),
                Some(json!({"n": 8})),
                None
            ),
        ]
    );
    assert_eq!(
        found("run-2"),
        [
            ended("a", 1, Created, 3),
            ended("b", 2, Unchanged, 6),
            pending("c"),
            ended("d", 1, Unchanged, 10),
            ended("e", 1, Created, 11),
        ]
    );
    let d = &store.steps("run-1").unwrap()[3];
    assert_eq!(d.before_image, Some(json!({"was": "pmk"})));
}

/// The fence is the server's own check on PostgreSQL (a function that raises) and a read
/// checked here on SQLite: what a stopped run tells its operator must not depend on which.
fn a_fence_says_why_in_the_same_words_on_both_backends(fresh: Fresh) {
    let mut store = fresh.open();
    store
        .commit(&[new_run("run-1", &[], None), new_run("run-2", &[], None)])
        .unwrap();
    let fence = |run: &str, token: i64| {
        vec![Write::CheckFence {
            key: "k".into(),
            run_id: run.into(),
            token,
        }]
    };
    let refusal = |result: Result<(), StoreError>| match result {
        Err(StoreError::LeaseLost {
            key,
            run_id,
            why,
            taken_by,
        }) => {
            assert_eq!(key, "k");
            (run_id, why, taken_by)
        }
        other => panic!("a fence refusal, not {other:?}"),
    };
    let old = granted(&mut store, "k", "run-1", 1, -1);
    let (run, why, taken_by) = refusal(store.commit(&fence("run-1", old.token)));
    assert_eq!((run.as_str(), taken_by), ("run-1", None));
    assert!(
        why.starts_with("its lease ran out at 20") && why.ends_with(" UTC"),
        "{why}"
    );
    let new = granted(&mut store, "k", "run-2", 2, 60);
    let (_, why, taken_by) = refusal(store.commit(&fence("run-1", old.token)));
    assert_eq!(
        why,
        format!("run `run-2` holds it now, with fencing token {}", new.token)
    );
    assert_eq!(taken_by.as_deref(), Some("run-2"));
    // Its own run with a stale token: nobody else took it.
    let (_, why, taken_by) = refusal(store.commit(&fence("run-2", new.token - 1)));
    assert_eq!(
        why,
        format!("run `run-2` holds it now, with fencing token {}", new.token)
    );
    assert_eq!(taken_by, None);
    store
        .commit(&[Write::ReleaseLock {
            key: "k".into(),
            run_id: "run-2".into(),
        }])
        .unwrap();
    let (_, why, _) = refusal(store.commit(&fence("run-2", new.token)));
    assert_eq!(why, "the lock is not held");
}

/// On PostgreSQL a batch's statements and its COMMIT leave together, hundreds of them: the
/// COMMIT must still be the last the server runs, or the statements behind it would each
/// commit alone. A fenced checkpoint last in a long batch must leave nothing behind, and every
/// checkpoint before it must be stored.
fn a_fenced_checkpoint_at_the_end_of_a_long_batch_is_never_committed(fresh: Fresh) {
    const RUNS: usize = 150;
    let mut store = fresh.open();
    let runs: Vec<String> = (0..RUNS).map(|i| format!("run-{i}")).collect();
    let mut creations: Vec<Write> = runs.iter().map(|id| new_run(id, &["a"], None)).collect();
    creations.push(new_run("run-old", &["a"], None));
    store.commit(&creations).unwrap();
    let old = granted(&mut store, "k", "run-old", 1, -1);
    let new = granted(&mut store, "k", "run-0", 2, 60);
    let checkpoint = |run: &str, token: i64| {
        vec![
            Write::CheckFence {
                key: "k".into(),
                run_id: run.into(),
                token,
            },
            Write::StepApplying {
                run_id: run.into(),
                step_id: "a".into(),
                attempt: 1,
                before_image: json!({}),
                planned_outcome: kmsflow_state::Outcome::Updated,
                at: Utc::now(),
            },
        ]
    };
    let (writer, thread) = Writer::spawn(store);
    let (release, hold) = mpsc::channel::<()>();
    writer.run(Box::new(move |_| {
        let _ = hold.recv();
    }));
    let mut results = Vec::new();
    // Each checkpoint carries run-0's fence, which passes, and moves its own run's step.
    for run in &runs {
        let mut writes = checkpoint("run-0", new.token);
        if let Write::StepApplying { run_id, .. } = &mut writes[1] {
            *run_id = run.clone();
        }
        let (done, result) = mpsc::channel();
        writer.submit(writes, Box::new(move |r| done.send(r).unwrap()));
        results.push(result);
    }
    let (done, fenced) = mpsc::channel();
    writer.submit(
        checkpoint("run-old", old.token),
        Box::new(move |r| done.send(r).unwrap()),
    );
    release.send(()).unwrap();
    for result in results {
        result.recv().unwrap().unwrap();
    }
    assert!(matches!(
        fenced.recv().unwrap(),
        Err(StoreError::LeaseLost { .. })
    ));
    drop(writer);
    thread.join();
    let store = fresh.open();
    for run in &runs {
        assert_eq!(store.steps(run).unwrap()[0].status, StepStatus::Running);
    }
    assert_eq!(
        store.steps("run-old").unwrap()[0].status,
        StepStatus::Pending,
        "nothing of the fenced checkpoint, however late in the batch"
    );
    assert!(
        !store
            .events("run-old")
            .unwrap()
            .iter()
            .any(|e| e.kind == "step_applying")
    );
}

fn approvals_are_decided_once(fresh: Fresh) {
    let mut store = fresh.open();
    store
        .commit(&[
            new_run("run-1", &["gate"], None),
            Write::RunFinished {
                run_id: "run-1".into(),
                status: RunStatus::Waiting,
                error: None,
                outputs: None,
                at: Utc::now(),
            },
        ])
        .unwrap();
    let approve = Write::Approve {
        run_id: "run-1".into(),
        step_id: "gate".into(),
        approved_by: "ana".into(),
        at: Utc::now(),
    };
    store.commit(std::slice::from_ref(&approve)).unwrap();
    let again = store.commit(&[approve]).unwrap_err();
    assert!(
        matches!(again, StoreError::Decided { approved: true, .. }),
        "{again}"
    );
    assert_eq!(store.approvals("run-1").unwrap()[0].approved_by, "ana");
}

fn an_occurrence_is_claimed_by_exactly_one_of_many_stores(fresh: Fresh) {
    let mut store = fresh.open();
    store.add_schedule(&schedule("s")).unwrap();
    let occurrence = Utc::now();
    let claims: Vec<bool> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..4)
            .map(|_| {
                let fresh = &fresh;
                scope.spawn(move || {
                    let mut daemon = fresh.open();
                    (0..20)
                        .map(|i| {
                            daemon
                                .claim_fire(&FireRecord {
                                    schedule: "s".into(),
                                    occurrence: occurrence + Duration::seconds(i),
                                    fired_at: Utc::now(),
                                    outcome: FireOutcome::Claimed,
                                    run_id: None,
                                    detail: None,
                                })
                                .unwrap()
                        })
                        .collect::<Vec<bool>>()
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    assert_eq!(claims.iter().filter(|c| **c).count(), 20, "each of 20 once");
    assert_eq!(store.fires("s").unwrap().len(), 20);
}

fn schedule(name: &str) -> ScheduleRecord {
    ScheduleRecord {
        name: name.into(),
        runbook: "rotation-check".into(),
        params: json!({"cluster": "aks-1"}),
        targets: None,
        policy: Some(json!({"concurrency": 4})),
        discover: None,
        queue: Some("east".into()),
        cron: "0 * * * *".into(),
        overlap: Overlap::Skip,
        catchup_ms: 60_000,
        jitter_ms: 0,
        webhook: Some("https://hooks.example/secret".into()),
        paused: false,
        created_at: Utc::now(),
        last_seen_at: Utc::now(),
        last_worst: None,
    }
}

fn schedules_round_trip_and_pause(fresh: Fresh) {
    let mut store = fresh.open();
    assert!(store.add_schedule(&schedule("s")).unwrap());
    assert!(
        !store.add_schedule(&schedule("s")).unwrap(),
        "a name is taken once"
    );
    assert!(store.set_schedule_paused("s", true).unwrap());
    let found = store.schedules().unwrap();
    assert_eq!(found.len(), 1);
    assert!(found[0].paused);
    assert_eq!(found[0].policy, Some(json!({"concurrency": 4})));
    assert_eq!(found[0].catchup_ms, 60_000);
    assert!(store.remove_schedule("s").unwrap());
    assert!(store.schedules().unwrap().is_empty());
}

fn a_rollout_links_each_target_to_one_run(fresh: Fresh) {
    let mut store = fresh.open();
    let id = "rollout-1234";
    store
        .commit(&[Write::CreateRollout(NewRollout {
            id: id.into(),
            runbook: "t".into(),
            runbook_ref: "t.yaml".into(),
            content_hash: "hash-t".into(),
            source: "name: t".into(),
            fragments: json!([]),
            params: json!({}),
            secret_params: vec![],
            policy: json!({"concurrency": 2}),
            started_at: Utc::now(),
            targets: (0..3)
                .map(|i| NewTarget {
                    label: format!("rg/aks-{i}"),
                    params: json!({"cluster": format!("aks-{i}")}),
                    wave: 1 + i,
                })
                .collect(),
        })])
        .unwrap();
    let link = |position: usize, run: &str| {
        vec![
            new_run(run, &["a"], None),
            Write::RolloutTargetStarted {
                rollout_id: id.into(),
                position,
                run_id: run.into(),
                at: Utc::now(),
            },
        ]
    };
    store.commit(&link(0, "run-a")).unwrap();
    assert!(
        store.commit(&link(0, "run-b")).is_err(),
        "a target runs once"
    );
    assert!(
        store.run("run-b").is_err(),
        "and the refused run is not created"
    );
    let targets = store.rollout_targets(id).unwrap();
    assert_eq!(targets.len(), 3);
    assert_eq!(targets[0].run_id.as_deref(), Some("run-a"));
    assert_eq!(targets[2].wave, 3);
    assert_eq!(store.rollout(id).unwrap().targets, 3);
    assert_eq!(store.resolve_rollout_id("rollout-12").unwrap(), id);
    assert!(store.runs_outside_rollouts(10).unwrap().is_empty());
}

fn journal_sequence_numbers_grow_in_commit_order(fresh: Fresh) {
    let stores: Vec<Store> = (0..3).map(|_| fresh.open()).collect();
    std::thread::scope(|scope| {
        for (n, mut store) in stores.into_iter().enumerate() {
            scope.spawn(move || {
                for i in 0..30 {
                    store
                        .commit(&[Write::Event {
                            run_id: format!("r{n}"),
                            step_id: None,
                            kind: "cancel_requested".into(),
                            detail: json!({"i": i}),
                            at: Utc::now(),
                        }])
                        .unwrap();
                }
            });
        }
    });
    let store = fresh.open();
    let seen = store.events_of_kind_after("cancel_requested", 0).unwrap();
    assert_eq!(seen.len(), 90);
    assert!(seen.windows(2).all(|w| w[0].0 < w[1].0));
    let last = store.last_event_seq().unwrap();
    assert_eq!(
        store
            .events_of_kind_after("cancel_requested", last)
            .unwrap(),
        []
    );
}

fn many_processes_migrating_at_once_are_safe(fresh: Fresh) {
    // Sixteen stores open an empty location at the same instant: each migrates or finds it
    // migrated, none fails for finding another at it.
    let together = std::sync::Barrier::new(16);
    std::thread::scope(|scope| {
        for _ in 0..16 {
            scope.spawn(|| {
                together.wait();
                fresh.open().runs(1).unwrap()
            });
        }
    });
    fresh.open().commit(&[new_run("after", &[], None)]).unwrap();
}

/// `state migrate`: a SQLite file's history into this backend, all of it, once.
fn a_whole_history_is_copied_once_into_an_empty_store(fresh: Fresh) {
    let old = sqlite();
    let mut file = old.open();
    file.commit(&[
        new_run("run-1", &["a"], None),
        Write::Event {
            run_id: "run-1".into(),
            step_id: Some("a".into()),
            kind: "note".into(),
            detail: json!({"n": 1}),
            at: Utc::now(),
        },
    ])
    .unwrap();
    file.add_schedule(&schedule("hourly")).unwrap();
    let mut target = fresh.open();
    let copied = target.copy_from(&file).unwrap();
    assert!(copied.tables.contains(&("runs", 1)) && copied.tables.contains(&("events", 2)));
    assert_eq!(target.run("run-1").unwrap(), file.run("run-1").unwrap());
    assert_eq!(
        target.events("run-1").unwrap(),
        file.events("run-1").unwrap()
    );
    assert_eq!(target.schedules().unwrap(), file.schedules().unwrap());
    // New journal entries follow the copied ones.
    target
        .commit(&[Write::Event {
            run_id: "run-2".into(),
            step_id: None,
            kind: "note".into(),
            detail: json!({}),
            at: Utc::now(),
        }])
        .unwrap();
    assert!(target.events("run-2").unwrap()[0].seq > file.last_event_seq().unwrap());
    let again = target.copy_from(&file).unwrap_err();
    assert!(
        again.to_string().contains("already holds 1 runs"),
        "{again}"
    );
}

fn queued(id: &str) -> Write {
    Write::Enqueue(kmsflow_state::NewQueued {
        id: id.into(),
        queue: "east".into(),
        runbook: "t".into(),
        runbook_ref: "t.yaml".into(),
        content_hash: "hash-t".into(),
        source: "name: t".into(),
        fragments: json!([]),
        params: json!({"cluster": id}),
        options: json!({"concurrency": 4}),
        enqueued_at: Utc::now(),
    })
}

fn a_queued_run_whose_workers_keep_stopping_is_quarantined_and_its_siblings_go_on(fresh: Fresh) {
    let mut store = fresh.open();
    store.commit(&[queued("q-poison")]).unwrap();
    // Three workers take it, and each dies with it (its claim runs out, by the store's clock).
    for worker in ["w1", "w2", "w3"] {
        let got = store
            .claim_queued("east", worker, Duration::seconds(-1), 1)
            .unwrap();
        assert_eq!(got[0].id, "q-poison", "{worker}");
    }
    store.commit(&[queued("q-sibling")]).unwrap();
    // The next worker is not given it; the sibling queued behind it is.
    let next = store
        .claim_queued("east", "w4", Duration::seconds(60), 10)
        .unwrap();
    let ids: Vec<&str> = next.iter().map(|q| q.id.as_str()).collect();
    assert_eq!(ids, ["q-sibling"]);
    let entry = store.queued("q-poison").unwrap().unwrap();
    assert_eq!(entry.status, kmsflow_state::QueueStatus::Poisoned);
    let poisoned = store
        .events("q-poison")
        .unwrap()
        .into_iter()
        .find(|e| e.kind == "queue_poisoned")
        .expect("the journal says why");
    assert_eq!(poisoned.detail["claims"], 3);
    assert!(
        poisoned.detail["reason"]
            .as_str()
            .unwrap()
            .contains("(last: w3)"),
        "{}",
        poisoned.detail
    );
    // It has ended as far as those waiting for it know, with the reason.
    assert_eq!(
        store.queued_ended(&["q-poison".to_owned()]).unwrap(),
        vec!["q-poison".to_owned()]
    );
    match store.queued_end("q-poison").unwrap() {
        Some(kmsflow_state::QueuedEnd::NotStarted { error: Some(error) }) => {
            assert!(error.contains("taken by a worker 3 times"), "{error}")
        }
        other => panic!("{other:?}"),
    }
    assert!(
        store
            .claim_queued("east", "w5", Duration::seconds(60), 10)
            .unwrap()
            .is_empty(),
        "never taken again"
    );
}

fn queued_runs_are_claimed_once_and_a_stopped_workers_claims_pass_on(fresh: Fresh) {
    let mut store = fresh.open();
    let ids: Vec<String> = (0..30).map(|i| format!("q-{i:02}")).collect();
    store
        .commit(&ids.iter().map(|id| queued(id)).collect::<Vec<_>>())
        .unwrap();
    // Three workers asking at once, a few at a time, until the queue is empty.
    let claimed: Vec<(String, String)> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..3)
            .map(|w| {
                let fresh = &fresh;
                scope.spawn(move || {
                    let mut worker = fresh.open();
                    let name = format!("worker-{w}");
                    let mut mine = Vec::new();
                    loop {
                        let got = worker
                            .claim_queued("east", &name, Duration::seconds(60), 4)
                            .unwrap();
                        if got.is_empty() {
                            return mine;
                        }
                        mine.extend(got.into_iter().map(|q| (q.id, name.clone())));
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let mut seen: Vec<&String> = claimed.iter().map(|(id, _)| id).collect();
    seen.sort();
    assert_eq!(
        seen,
        ids.iter().collect::<Vec<_>>(),
        "each entry claimed exactly once"
    );
    // Another queue's workers see none of them.
    assert!(
        store
            .claim_queued("west", "w", Duration::seconds(60), 10)
            .unwrap()
            .is_empty()
    );

    // A worker that stopped: its claim runs out (by the store's clock) and passes on.
    store.commit(&[queued("q-late")]).unwrap();
    let first = store
        .claim_queued("east", "dead", Duration::seconds(-1), 1)
        .unwrap();
    assert_eq!(first[0].id, "q-late");
    let second = store
        .claim_queued("east", "alive", Duration::seconds(60), 1)
        .unwrap();
    assert_eq!((second[0].id.as_str(), second[0].claims), ("q-late", 2));
    assert_eq!(second[0].params, json!({"cluster": "q-late"}));
    assert_eq!(second[0].source, "name: t");
    let stale = store.commit(&[Write::QueueHeartbeat {
        id: "q-late".into(),
        worker: "dead".into(),
        lease: Duration::seconds(60),
    }]);
    match stale {
        Err(StoreError::LeaseLost { taken_by, .. }) => {
            assert_eq!(taken_by.as_deref(), Some("alive"))
        }
        other => panic!("{other:?}"),
    }
    store
        .commit(&[
            Write::QueueHeartbeat {
                id: "q-late".into(),
                worker: "alive".into(),
                lease: Duration::seconds(60),
            },
            Write::QueueRelease {
                id: "q-late".into(),
                worker: "alive".into(),
                done: true,
                error: None,
                at: Utc::now(),
            },
        ])
        .unwrap();
    assert_eq!(
        store.queued("q-late").unwrap().unwrap().status,
        kmsflow_state::QueueStatus::Done
    );
    // What a rollout's driver asks of all its targets at once: which have ended (done, or in
    // no queue), not the ones still claimed; the rest are looked at one by one.
    let asked: Vec<String> = ["q-late", "q-00", "nowhere", "q-01"]
        .map(str::to_owned)
        .into();
    let mut ended = store.queued_ended(&asked).unwrap();
    ended.sort();
    assert_eq!(ended, ["nowhere", "q-late"]);
    assert!(store.queued_ended(&[]).unwrap().is_empty());
    assert!(
        store
            .claim_queued("east", "w", Duration::seconds(60), 10)
            .unwrap()
            .is_empty()
    );

    // Put back (a resumed rollout's failed target): claimed once more, by one worker.
    let requeue = Write::Requeue {
        id: "q-late".into(),
        at: Utc::now(),
    };
    store.commit(std::slice::from_ref(&requeue)).unwrap();
    let again = store
        .claim_queued("east", "w", Duration::seconds(60), 10)
        .unwrap();
    assert_eq!((again.len(), again[0].claims), (1, 3));
    // An entry still claimed is left as it is: its worker keeps it.
    store.commit(&[requeue]).unwrap();
    assert!(
        store
            .claim_queued("east", "other", Duration::seconds(60), 10)
            .unwrap()
            .is_empty()
    );
}
