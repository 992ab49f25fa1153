//! A throwaway PostgreSQL server for tests and benchmarks: a real server, never a mock.
//!
//! [`server`] starts one per test process, the first time a test asks: `initdb` in a fresh
//! folder under the system's temporary directory, `postgres` on a free loopback port (and a
//! Unix socket in that folder), fsync on, trust authentication for the `kmsflow` user on
//! loopback only. Each test takes a database of its own with [`Server::database`], so tests
//! running at once never see each other's rows.
//!
//! The server is a child of a thread that lives as long as the process, and is asked to quit
//! when that thread's process ends (`PR_SET_PDEATHSIG`), so a test binary that exits, panics or
//! is killed leaves no server behind; folders of processes that are gone are swept at the next
//! start. Binaries come from `KMSFLOW_PG_BINDIR`, else the newest `/usr/lib/postgresql/*/bin`
//! (Debian's `postgresql` package, which `.ci/run` installs), else `PATH`.

pub mod ldap;

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::mpsc;
use std::sync::{Mutex, OnceLock};
use std::time::{Duration, Instant};

/// The server of this test process, started on first use and shared by its tests.
pub fn server() -> &'static Server {
    static SERVER: OnceLock<Server> = OnceLock::new();
    SERVER.get_or_init(|| Server::start(None).unwrap_or_else(|e| panic!("{e}")))
}

/// A server of the caller's own, stopped when dropped: for a test that restarts or stops it,
/// which would cut the sessions of every other test on the shared one.
pub fn private_server() -> Server {
    Server::start(None).unwrap_or_else(|e| panic!("{e}"))
}

/// A server of the caller's own that listens on `address` too (with loopback), where clients
/// on another network (a namespace's veth) reach it. Nobody is trusted from there until the
/// caller says so ([`Server::authenticate_first`] with a `host ... trust` line).
pub fn private_server_also_on(address: std::net::IpAddr) -> Server {
    Server::start(Some(address)).unwrap_or_else(|e| panic!("{e}"))
}

/// A running server.
pub struct Server {
    port: u16,
    folder: PathBuf,
    bindir: PathBuf,
    owner: Option<(u32, u32)>,
    keeper: Mutex<mpsc::Sender<Ask>>,
}

enum Ask {
    /// Stop the server (fast shutdown: sessions are cut) and start it again on the same port.
    Restart(mpsc::Sender<Result<(), String>>),
    Stop(mpsc::Sender<()>),
    Start(mpsc::Sender<Result<(), String>>),
}

const USER: &str = "kmsflow";

impl Server {
    fn start(also_on: Option<std::net::IpAddr>) -> Result<Server, String> {
        let bindir = bindir().ok_or(
            "no PostgreSQL server binaries (initdb, postgres): install Debian's `postgresql` \
             package (`.ci/run` does), or set KMSFLOW_PG_BINDIR",
        )?;
        sweep_stale_folders();
        static STARTED: AtomicUsize = AtomicUsize::new(0);
        let folder = std::env::temp_dir().join(format!(
            "kmsflow-pg-{}-{}",
            std::process::id(),
            STARTED.fetch_add(1, Ordering::SeqCst)
        ));
        let _ = std::fs::remove_dir_all(&folder);
        std::fs::create_dir_all(&folder).map_err(|e| format!("{}: {e}", folder.display()))?;
        // PostgreSQL refuses to run as root: then it runs as the `postgres` user.
        let owner = if unsafe { libc::geteuid() } == 0 {
            let ids = user_ids("postgres")
                .ok_or("running as root, and there is no `postgres` user to run the server as")?;
            std::os::unix::fs::chown(&folder, Some(ids.0), Some(ids.1))
                .map_err(|e| format!("chown {}: {e}", folder.display()))?;
            Some(ids)
        } else {
            None
        };
        let data = folder.join("data");
        let mut initdb = Command::new(bindir.join("initdb"));
        initdb
            .args([
                "--auth=trust",
                "--username",
                USER,
                "--encoding=UTF8",
                "--no-locale",
            ])
            .arg("-D")
            .arg(&data)
            .stdout(Stdio::null())
            .stderr(Stdio::piped());
        as_owner(&mut initdb, owner);
        let out = initdb.output().map_err(|e| format!("initdb: {e}"))?;
        if !out.status.success() {
            return Err(format!(
                "initdb failed: {}",
                String::from_utf8_lossy(&out.stderr)
            ));
        }
        let port = free_port()?;
        let (keeper, asks) = mpsc::channel();
        let (ready, started) = mpsc::channel();
        let launch = Launch {
            listen: match also_on {
                Some(address) => format!("127.0.0.1,{address}"),
                None => "127.0.0.1".to_owned(),
            },
            bindir: bindir.clone(),
            data,
            folder: folder.clone(),
            port,
            owner,
        };
        std::thread::Builder::new()
            .name("kmsflow-pgtest".into())
            .spawn(move || keep(launch, asks, ready))
            .map_err(|e| e.to_string())?;
        started.recv().map_err(|e| e.to_string())??;
        let server = Server {
            port,
            folder,
            bindir,
            owner,
            keeper: Mutex::new(keeper),
        };
        Ok(server)
    }

    /// The port the server listens on, on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// A new, empty database of its own for a test; its URL.
    pub fn database(&self) -> String {
        static MADE: AtomicUsize = AtomicUsize::new(0);
        let name = format!(
            "t{}_{}",
            std::process::id(),
            MADE.fetch_add(1, Ordering::SeqCst)
        );
        // From template0, which nothing connects to: CREATE DATABASE refuses a template with
        // another session on it, and autovacuum visits template1 when it likes. A refusal for
        // that reason is still tried again, a few times.
        for attempt in 1.. {
            let mut createdb = Command::new(self.bindir.join("createdb"));
            createdb
                .args([
                    "-h",
                    "127.0.0.1",
                    "-p",
                    &self.port.to_string(),
                    "-U",
                    USER,
                    "-T",
                    "template0",
                    &name,
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::piped());
            as_owner(&mut createdb, self.owner);
            let out = createdb.output().expect("run createdb");
            if out.status.success() {
                break;
            }
            let error = String::from_utf8_lossy(&out.stderr);
            assert!(
                error.contains("is being accessed by other users") && attempt < 20,
                "createdb {name}: {error}"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        self.url(&name)
    }

    /// The URL of database `name`.
    pub fn url(&self, name: &str) -> String {
        format!("postgres://{USER}@127.0.0.1:{}/{name}", self.port)
    }

    /// Runs `query` in database `name` with `psql` and returns its output, unaligned and
    /// without headers (`1|abc` a row): what a test asks the server about itself.
    pub fn sql(&self, name: &str, query: &str) -> String {
        let mut psql = Command::new(self.bindir.join("psql"));
        psql.args([
            "-X",
            "-qAt",
            "-h",
            "127.0.0.1",
            "-p",
            &self.port.to_string(),
        ])
        .args(["-U", USER, "-d", name, "-c", query])
        .stderr(Stdio::piped());
        as_owner(&mut psql, self.owner);
        let out = psql.output().expect("run psql");
        assert!(
            out.status.success(),
            "psql {query}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).trim().to_owned()
    }

    /// Puts `line` first in the server's `pg_hba.conf` and reloads it, so a role named in it
    /// signs in that way (a password, LDAP) while everyone else stays trusted.
    pub fn authenticate_first(&self, line: &str) {
        let hba = self.folder.join("data").join("pg_hba.conf");
        let old = std::fs::read_to_string(&hba).expect("read pg_hba.conf");
        std::fs::write(&hba, format!("{line}\n{old}")).expect("write pg_hba.conf");
        let asked = self.sql("postgres", "SELECT now()");
        assert_eq!(self.sql("postgres", "SELECT pg_reload_conf()"), "t");
        // The postmaster rereads the file when it handles the signal, after the call returns;
        // a new session (each `sql` is one) carries the postmaster's time of the last load.
        let deadline = Instant::now() + Duration::from_secs(10);
        while self.sql(
            "postgres",
            &format!("SELECT pg_conf_load_time() >= '{asked}'::timestamptz"),
        ) != "t"
        {
            assert!(
                Instant::now() < deadline,
                "the server did not reload pg_hba.conf"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Stops the server (fast shutdown: every session is cut, as a crash or a restart does)
    /// and starts it again on the same port, with everything committed still there.
    pub fn restart(&self) {
        let (done, finished) = mpsc::channel();
        self.ask(Ask::Restart(done));
        finished
            .recv()
            .expect("the keeper answers")
            .expect("restart");
    }

    /// Stops the server until [`Server::start_again`].
    pub fn stop(&self) {
        let (done, finished) = mpsc::channel();
        self.ask(Ask::Stop(done));
        finished.recv().expect("the keeper answers");
    }

    /// Starts a stopped server again.
    pub fn start_again(&self) {
        let (done, finished) = mpsc::channel();
        self.ask(Ask::Start(done));
        finished.recv().expect("the keeper answers").expect("start");
    }

    fn ask(&self, ask: Ask) {
        self.keeper
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .send(ask)
            .expect("the keeper thread lives as long as the process");
    }

    /// The server's folder (data and socket).
    pub fn folder(&self) -> &Path {
        &self.folder
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        // Closing the channel ends the keeper, which stops the server and removes its folder.
        let (closed, _) = mpsc::channel();
        drop(std::mem::replace(
            self.keeper.get_mut().unwrap_or_else(|p| p.into_inner()),
            closed,
        ));
    }
}

struct Launch {
    /// `listen_addresses`.
    listen: String,
    bindir: PathBuf,
    data: PathBuf,
    folder: PathBuf,
    port: u16,
    owner: Option<(u32, u32)>,
}

impl Launch {
    fn spawn(&self) -> Result<Child, String> {
        let mut postgres = Command::new(self.bindir.join("postgres"));
        postgres
            .arg("-D")
            .arg(&self.data)
            .arg("-c")
            .arg(format!("listen_addresses={}", self.listen))
            .arg("-c")
            .arg(format!("port={}", self.port))
            .arg("-c")
            .arg(format!("unix_socket_directories={}", self.folder.display()))
            // Durable like a real server: every commit reaches the disk.
            .args(["-c", "fsync=on", "-c", "synchronous_commit=on"])
            .args(["-c", "max_connections=300", "-c", "shared_buffers=32MB"])
            .stdout(Stdio::null())
            .stderr(
                std::fs::File::create(self.folder.join("server.log"))
                    .map(Stdio::from)
                    .unwrap_or_else(|_| Stdio::null()),
            );
        as_owner(&mut postgres, self.owner);
        // SAFETY: prctl is async-signal-safe, and nothing else runs between fork and exec.
        unsafe {
            std::os::unix::process::CommandExt::pre_exec(&mut postgres, || {
                // Quit (immediate shutdown) when the thread that started the server ends,
                // which is when the test process ends.
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGQUIT);
                Ok(())
            });
        }
        let mut child = postgres.spawn().map_err(|e| format!("postgres: {e}"))?;
        let deadline = Instant::now() + Duration::from_secs(30);
        // Listening is not accepting: a server still starting up (replaying its log after an
        // immediate shutdown, say) answers `the database system is starting up`.
        while !self.accepting() {
            if let Ok(Some(status)) = child.try_wait() {
                let log =
                    std::fs::read_to_string(self.folder.join("server.log")).unwrap_or_default();
                return Err(format!("postgres exited ({status}): {log}"));
            }
            if Instant::now() > deadline {
                return Err("postgres did not accept connections within 30 s".into());
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        Ok(child)
    }

    /// Whether the server accepts connections now (`pg_isready` exits 0 only then).
    fn accepting(&self) -> bool {
        Command::new(self.bindir.join("pg_isready"))
            .args(["-q", "-h", "127.0.0.1", "-p", &self.port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|status| status.success())
    }
}

/// The thread that owns the server process: it lives until the test process ends.
fn keep(launch: Launch, asks: mpsc::Receiver<Ask>, ready: mpsc::Sender<Result<(), String>>) {
    let mut child = match launch.spawn() {
        Ok(child) => Some(child),
        Err(error) => {
            let _ = ready.send(Err(error));
            return;
        }
    };
    let _ = ready.send(Ok(()));
    let stop = |child: &mut Option<Child>| {
        if let Some(mut running) = child.take() {
            // SIGINT: fast shutdown, sessions cut, committed work kept.
            unsafe { libc::kill(running.id() as i32, libc::SIGINT) };
            let _ = running.wait();
        }
    };
    while let Ok(ask) = asks.recv() {
        match ask {
            Ask::Restart(done) => {
                stop(&mut child);
                let started = launch.spawn().map(|c| child = Some(c));
                let _ = done.send(started);
            }
            Ask::Stop(done) => {
                stop(&mut child);
                let _ = done.send(());
            }
            Ask::Start(done) => {
                let started = match child {
                    Some(_) => Ok(()),
                    None => launch.spawn().map(|c| child = Some(c)),
                };
                let _ = done.send(started);
            }
        }
    }
    // The server's owner dropped it (a private server; the shared one lives to the process's
    // end, and with it this thread, so its server's death signal waits for that end).
    stop(&mut child);
    let _ = std::fs::remove_dir_all(&launch.folder);
}

fn as_owner(command: &mut Command, owner: Option<(u32, u32)>) {
    if let Some((uid, gid)) = owner {
        std::os::unix::process::CommandExt::uid(command, uid);
        std::os::unix::process::CommandExt::gid(command, gid);
    }
}

fn free_port() -> Result<u16, String> {
    std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|listener| listener.local_addr())
        .map(|addr| addr.port())
        .map_err(|e| format!("no free loopback port: {e}"))
}

fn bindir() -> Option<PathBuf> {
    if let Some(dir) = std::env::var_os("KMSFLOW_PG_BINDIR") {
        return Some(PathBuf::from(dir));
    }
    let mut versions: Vec<(u32, PathBuf)> = std::fs::read_dir("/usr/lib/postgresql")
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|entry| {
            let version = entry.file_name().to_str()?.parse().ok()?;
            let bin = entry.path().join("bin");
            bin.join("initdb").exists().then_some((version, bin))
        })
        .collect();
    versions.sort();
    if let Some((_, bin)) = versions.pop() {
        return Some(bin);
    }
    std::env::var_os("PATH").and_then(|path| {
        std::env::split_paths(&path)
            .find(|dir| dir.join("initdb").exists() && dir.join("postgres").exists())
    })
}

fn user_ids(name: &str) -> Option<(u32, u32)> {
    let passwd = std::fs::read_to_string("/etc/passwd").ok()?;
    passwd.lines().find_map(|line| {
        let fields: Vec<&str> = line.split(':').collect();
        (fields.first() == Some(&name) && fields.len() > 3)
            .then(|| Some((fields[2].parse().ok()?, fields[3].parse().ok()?)))
            .flatten()
    })
}

/// Removes the folders of servers whose test process is gone.
fn sweep_stale_folders() {
    let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) else {
        return;
    };
    for entry in entries.flatten() {
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix("kmsflow-pg-")) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !Path::new(&format!("/proc/{pid}")).exists() {
            let _ = std::fs::remove_dir_all(entry.path());
        }
    }
}
