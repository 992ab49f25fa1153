//! A network of the test's own: a namespace joined to this one by a veth pair, so that a
//! process inside reaches a server here over a real link, and the test can cut that link
//! (`ip link set down`) as a partition does: packets dropped without a word, nothing closed.

use std::io::Write;
use std::net::{Ipv4Addr, Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::process::Command;

/// The namespace and its link; both are removed when dropped.
pub struct Namespace {
    name: String,
    /// The link's end on this side.
    link: String,
    /// This side's address on the link.
    pub here: Ipv4Addr,
    /// The namespace's address on the link.
    pub there: Ipv4Addr,
}

fn ip(args: &[&str]) -> Result<(), String> {
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| format!("ip: {e}"))?;
    if out.status.success() {
        Ok(())
    } else {
        Err(format!(
            "ip {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }
}

impl Namespace {
    /// Makes the namespace and its link, or says why this machine cannot (not root, no `ip`,
    /// a kernel or container without network namespaces).
    pub fn make() -> Result<Namespace, String> {
        let id = std::process::id();
        let subnet = (id % 250) as u8 + 1;
        let namespace = Namespace {
            name: format!("kmsflow-{id}"),
            link: format!("kf{}", id % 1_000_000),
            here: Ipv4Addr::new(10, 213, subnet, 1),
            there: Ipv4Addr::new(10, 213, subnet, 2),
        };
        ip(&["netns", "add", &namespace.name])?;
        // From here on, dropping `namespace` removes what was made.
        let peer = format!("{}n", namespace.link);
        let (here, there) = (
            format!("{}/30", namespace.here),
            format!("{}/30", namespace.there),
        );
        let (name, link) = (namespace.name.as_str(), namespace.link.as_str());
        ip(&[
            "link", "add", link, "type", "veth", "peer", "name", &peer, "netns", name,
        ])?;
        ip(&["addr", "add", &here, "dev", link])?;
        ip(&["link", "set", link, "up"])?;
        ip(&["-n", name, "addr", "add", &there, "dev", &peer])?;
        ip(&["-n", name, "link", "set", &peer, "up"])?;
        ip(&["-n", name, "link", "set", "lo", "up"])?;
        Ok(namespace)
    }

    /// The partition: the link goes down, and what is sent across is lost.
    pub fn cut(&self) {
        ip(&["link", "set", &self.link, "down"]).unwrap();
    }

    pub fn heal(&self) {
        ip(&["link", "set", &self.link, "up"]).unwrap();
    }

    /// `command` (its program, arguments, environment and folder), run inside the namespace.
    pub fn inside(&self, command: &Command) -> Command {
        let mut inside = Command::new("ip");
        inside
            .args(["netns", "exec", &self.name])
            .arg(command.get_program())
            .args(command.get_args());
        for (name, value) in command.get_envs() {
            match value {
                Some(value) => inside.env(name, value),
                None => inside.env_remove(name),
            };
        }
        if let Some(dir) = command.get_current_dir() {
            inside.current_dir(dir);
        }
        inside
    }

    /// Makes `127.0.0.1:port` inside the namespace lead to `127.0.0.1:port` here: the
    /// sandbox answers only on loopback, and a process inside must still reach it while the
    /// link to the database is cut. A thread enters the namespace just long enough to listen
    /// there (a socket keeps the namespace it was made in), and connects out from here.
    pub fn forward_loopback(&self, port: u16) {
        let home = std::fs::File::open("/proc/thread-self/ns/net").unwrap();
        let away = std::fs::File::open(format!("/run/netns/{}", self.name)).unwrap();
        let (ready, listening) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            let enter = |namespace: &std::fs::File| {
                // SAFETY: setns only moves this thread; the descriptor is open.
                let moved =
                    unsafe { nix::libc::setns(namespace.as_raw_fd(), nix::libc::CLONE_NEWNET) };
                assert_eq!(moved, 0, "setns: {}", std::io::Error::last_os_error());
            };
            enter(&away);
            let listener = TcpListener::bind((Ipv4Addr::LOCALHOST, port)).unwrap();
            enter(&home);
            ready.send(()).unwrap();
            for inbound in listener.incoming().flatten() {
                if let Ok(outbound) = TcpStream::connect((Ipv4Addr::LOCALHOST, port)) {
                    pipe(inbound, outbound);
                }
            }
        });
        listening.recv().unwrap();
    }
}

/// Copies both ways until each side closes.
fn pipe(a: TcpStream, b: TcpStream) {
    let (mut a_in, mut b_out) = (a.try_clone().unwrap(), b.try_clone().unwrap());
    let (mut b_in, mut a_out) = (b, a);
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut a_in, &mut b_out);
        let _ = b_out.flush();
        let _ = b_out.shutdown(Shutdown::Write);
    });
    std::thread::spawn(move || {
        let _ = std::io::copy(&mut b_in, &mut a_out);
        let _ = a_out.shutdown(Shutdown::Write);
    });
}

impl Drop for Namespace {
    fn drop(&mut self) {
        let _ = ip(&["link", "del", &self.link]);
        let _ = ip(&["netns", "del", &self.name]);
    }
}
