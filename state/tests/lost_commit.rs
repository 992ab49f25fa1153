//! A checkpoint whose COMMIT is in flight when the session breaks: the writer asks the server,
//! on a new session, whether that transaction committed, and does exactly what the answer
//! says. Committed: acknowledged, never written again. Rolled back: written again, once.
//!
//! The faults come from a proxy between the store and a real PostgreSQL server, made at
//! protocol events (the server's answer to COMMIT, the client's COMMIT itself), not after
//! sleeps.

use std::io::{Read, Write as _};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use chrono::Utc;
use kmsflow_state::{
    Durability, Location, LockOwner, Outcome, StepStatus, Store, StoreError, Write,
};
use serde_json::json;

mod support;
use support::{commit_together, new_run};

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Fault {
    None,
    /// The server commits; its answer to COMMIT never reaches the store.
    LoseCommitAnswer,
    /// The store's COMMIT never reaches the server, once the answers to every statement
    /// before it have reached the store.
    WithholdCommit,
}

/// A TCP proxy to the test server that makes one fault when armed, on one connection.
struct Proxy {
    port: u16,
    fault: Arc<Mutex<Fault>>,
    made: Arc<AtomicUsize>,
}

impl Proxy {
    fn start(server_port: u16) -> Proxy {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let fault = Arc::new(Mutex::new(Fault::None));
        let made = Arc::new(AtomicUsize::new(0));
        let (armed, count) = (fault.clone(), made.clone());
        std::thread::spawn(move || {
            for client in listener.incoming() {
                let Ok(client) = client else { return };
                let server = TcpStream::connect(("127.0.0.1", server_port)).unwrap();
                Connection::start(client, server, armed.clone(), count.clone());
            }
        });
        Proxy { port, fault, made }
    }

    fn arm(&self, fault: Fault) {
        *self.fault.lock().unwrap() = fault;
    }

    fn faults_made(&self) -> usize {
        self.made.load(Ordering::SeqCst)
    }
}

/// One proxied session: what it has passed on, so a fault waits for the right moment.
struct Connection {
    client: TcpStream,
    server: TcpStream,
    fault: Arc<Mutex<Fault>>,
    made: Arc<AtomicUsize>,
    /// The name the client prepared COMMIT under.
    commit_statement: Mutex<Option<Vec<u8>>>,
    /// Messages passed to the server that each get one ReadyForQuery, and the ReadyForQuery
    /// answers passed back: equal once the client has every answer to what it sent.
    syncs: AtomicUsize,
    ready: AtomicUsize,
}

/// One protocol message: its type byte (none for the startup message) and its body.
fn read_message(from: &mut TcpStream, typed: bool) -> Option<(u8, Vec<u8>)> {
    let mut kind = [0u8; 1];
    if typed {
        from.read_exact(&mut kind).ok()?;
    }
    let mut length = [0u8; 4];
    from.read_exact(&mut length).ok()?;
    let mut body = vec![0u8; (u32::from_be_bytes(length) as usize).checked_sub(4)?];
    from.read_exact(&mut body).ok()?;
    Some((kind[0], body))
}

fn write_message(to: &mut TcpStream, kind: u8, typed: bool, body: &[u8]) -> Option<()> {
    let mut out = Vec::with_capacity(body.len() + 5);
    if typed {
        out.push(kind);
    }
    out.extend_from_slice(&(body.len() as u32 + 4).to_be_bytes());
    out.extend_from_slice(body);
    to.write_all(&out).ok()
}

/// The NUL-terminated strings at the start of a message's body.
fn strings(body: &[u8], n: usize) -> Vec<&[u8]> {
    body.split(|b| *b == 0).take(n).collect()
}

impl Connection {
    fn start(
        client: TcpStream,
        server: TcpStream,
        fault: Arc<Mutex<Fault>>,
        made: Arc<AtomicUsize>,
    ) {
        let connection = Arc::new(Connection {
            client,
            server,
            fault,
            made,
            commit_statement: Mutex::new(None),
            syncs: AtomicUsize::new(0),
            ready: AtomicUsize::new(0),
        });
        let up = connection.clone();
        std::thread::spawn(move || up.client_to_server());
        std::thread::spawn(move || connection.server_to_client());
    }

    /// Takes the armed fault if it is `fault`.
    fn take(&self, fault: Fault) -> bool {
        let mut armed = self.fault.lock().unwrap();
        if *armed != fault {
            return false;
        }
        *armed = Fault::None;
        self.made.fetch_add(1, Ordering::SeqCst);
        true
    }

    fn cut(&self) {
        let _ = self.client.shutdown(Shutdown::Both);
        let _ = self.server.shutdown(Shutdown::Both);
    }

    fn client_to_server(&self) {
        let (mut from, mut to) = (
            self.client.try_clone().unwrap(),
            self.server.try_clone().unwrap(),
        );
        let mut typed = false;
        while let Some((kind, body)) = read_message(&mut from, typed) {
            match kind {
                b'P' if typed => {
                    let fields = strings(&body, 2);
                    if fields.get(1) == Some(&&b"COMMIT"[..]) {
                        *self.commit_statement.lock().unwrap() = Some(fields[0].to_vec());
                    }
                }
                b'B' if typed => {
                    let statement = strings(&body, 2).get(1).map(|s| s.to_vec());
                    let is_commit =
                        statement.is_some() && *self.commit_statement.lock().unwrap() == statement;
                    if is_commit && self.take(Fault::WithholdCommit) {
                        // Only once the store has its answers to everything before COMMIT
                        // (the transaction's id among them) does the session break.
                        let asked = Instant::now();
                        while self.ready.load(Ordering::SeqCst) < self.syncs.load(Ordering::SeqCst)
                            && asked.elapsed() < Duration::from_secs(10)
                        {
                            std::thread::sleep(Duration::from_millis(1));
                        }
                        self.cut();
                        return;
                    }
                }
                _ => {}
            }
            if write_message(&mut to, kind, typed, &body).is_none() {
                return;
            }
            // Each of these gets one ReadyForQuery: the startup message, a Sync, a simple query.
            if !typed || kind == b'S' || kind == b'Q' {
                self.syncs.fetch_add(1, Ordering::SeqCst);
            }
            typed = true;
        }
        self.cut();
    }

    fn server_to_client(&self) {
        let (mut from, mut to) = (
            self.server.try_clone().unwrap(),
            self.client.try_clone().unwrap(),
        );
        while let Some((kind, body)) = read_message(&mut from, true) {
            if kind == b'C'
                && strings(&body, 1).first() == Some(&&b"COMMIT"[..])
                && self.take(Fault::LoseCommitAnswer)
            {
                // The server has committed; the store never hears it.
                self.cut();
                return;
            }
            if write_message(&mut to, kind, true, &body).is_none() {
                return;
            }
            if kind == b'Z' {
                self.ready.fetch_add(1, Ordering::SeqCst);
            }
        }
        self.cut();
    }
}

const RUN: &str = "run-1";
const LOCK: &str = "cluster/aks-1";

/// A run of `steps` holding its lock, in a fresh database; the database's URL, the proxy in
/// front of the server, and the lock's token.
fn setup(steps: &[&str]) -> (String, Proxy, i64) {
    let server = kmsflow_pgtest::server();
    let url = server.database();
    let mut store = Store::open(&Location::parse(&url).unwrap(), Durability::Full).unwrap();
    store.commit(&[new_run(RUN, steps, Some(LOCK))]).unwrap();
    let owner = LockOwner {
        pid: 1,
        host: "here".into(),
    };
    let token = store
        .acquire_lock(LOCK, RUN, &owner, chrono::Duration::minutes(10))
        .unwrap()
        .unwrap()
        .token;
    (url, Proxy::start(server.port()), token)
}

fn through(proxy: &Proxy, url: &str) -> Location {
    let proxied = url.replace(
        &format!(":{}/", kmsflow_pgtest::server().port()),
        &format!(":{}/", proxy.port),
    );
    Location::parse(&proxied).unwrap()
}

fn checkpoint(step: &str, token: i64) -> Vec<Write> {
    vec![
        Write::CheckFence {
            key: LOCK.into(),
            run_id: RUN.into(),
            token,
        },
        Write::StepSucceeded {
            run_id: RUN.into(),
            step_id: step.into(),
            attempt: 1,
            outcome: Outcome::Updated,
            outputs: json!({"step": step}),
            at: Utc::now(),
        },
    ]
}

/// How many times `step` was recorded as succeeded, and where it stands.
fn recorded(url: &str, step: &str) -> (usize, StepStatus) {
    let store = Store::open(&Location::parse(url).unwrap(), Durability::Full).unwrap();
    let times = store
        .events(RUN)
        .unwrap()
        .into_iter()
        .filter(|e| e.kind == "step_succeeded" && e.step_id.as_deref() == Some(step))
        .count();
    let status = store
        .steps(RUN)
        .unwrap()
        .into_iter()
        .find(|s| s.step_id == step)
        .unwrap()
        .status;
    (times, status)
}

/// Commits `checkpoints` (given the run's lock token) together through the proxy with `fault`
/// armed, once the proxy made it; the database's URL and each checkpoint's result.
fn commit_with(
    fault: Fault,
    steps: &[&str],
    checkpoints: impl FnOnce(i64) -> Vec<Vec<Write>>,
) -> (String, Vec<Result<(), StoreError>>) {
    let (url, proxy, token) = setup(steps);
    proxy.arm(fault);
    let store = Store::open(&through(&proxy, &url), Durability::Full).unwrap();
    let results = commit_together(store, checkpoints(token));
    assert_eq!(proxy.faults_made(), 1, "{fault:?} was made");
    (url, results)
}

/// One checkpoint through `fault`: acknowledged, and stored exactly once.
fn stored_once_after(fault: Fault) {
    let (url, results) = commit_with(fault, &["a"], |token| vec![checkpoint("a", token)]);
    assert!(results[0].is_ok(), "{results:?}");
    assert_eq!(
        recorded(&url, "a"),
        (1, StepStatus::Succeeded),
        "stored once"
    );
}

#[test]
fn a_commit_whose_answer_was_lost_is_acknowledged_once_the_server_says_it_committed() {
    stored_once_after(Fault::LoseCommitAnswer);
}

#[test]
fn a_commit_that_never_reached_the_server_is_made_again_once() {
    stored_once_after(Fault::WithholdCommit);
}

/// A batch with a fenced checkpoint goes again with a savepoint each; when the answer to that
/// COMMIT is lost, each checkpoint still gets its own result, and the good one is stored once.
#[test]
fn a_lost_answer_after_savepoints_keeps_each_checkpoints_own_result() {
    let (url, results) = commit_with(Fault::LoseCommitAnswer, &["a", "b"], |token| {
        vec![checkpoint("a", token), checkpoint("b", token - 1)]
    });
    assert!(results[0].is_ok(), "{results:?}");
    assert!(
        matches!(&results[1], Err(StoreError::LeaseLost { .. })),
        "{results:?}"
    );
    assert_eq!(recorded(&url, "a"), (1, StepStatus::Succeeded));
    assert_eq!(recorded(&url, "b"), (0, StepStatus::Pending));
}
