//! A stand-in directory for PostgreSQL's `ldap` sign-in (simple bind only): the server hands
//! it the user's name and password, and the test decides whether they pass.
//!
//! This is how a test gets a real server to check a password it cannot know in advance: a
//! Microsoft Entra token, which Azure Database for PostgreSQL checks against Entra and which
//! a test checks against the sandbox that minted it. PostgreSQL 15 has no hook for that but
//! its external methods; LDAP is the one that passes a password of any length.
//!
//! Only what PostgreSQL's simple-bind mode sends is understood: a BindRequest, answered
//! `success` or `invalidCredentials`, then an UnbindRequest. BER as RFC 4511 has it, with
//! definite lengths.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};

/// Decides a bind: the distinguished name PostgreSQL made (`ldapprefix` + user +
/// `ldapsuffix`) and the password it was given.
pub type Check = dyn Fn(&str, &str) -> bool + Send + Sync;

/// One bind the directory answered.
#[derive(Debug, Clone)]
pub struct Bind {
    pub dn: String,
    pub password: String,
    pub accepted: bool,
}

/// A directory listening on a loopback port until the process ends.
pub struct Directory {
    port: u16,
    binds: Arc<Mutex<Vec<Bind>>>,
}

impl Directory {
    pub fn start(check: impl Fn(&str, &str) -> bool + Send + Sync + 'static) -> Directory {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind a loopback port");
        let port = listener.local_addr().expect("local address").port();
        let binds = Arc::new(Mutex::new(Vec::new()));
        let check: Arc<Check> = Arc::new(check);
        let kept = binds.clone();
        std::thread::Builder::new()
            .name("kmsflow-pgtest-ldap".into())
            .spawn(move || {
                for stream in listener.incoming().flatten() {
                    let (check, binds) = (check.clone(), kept.clone());
                    std::thread::spawn(move || {
                        let _ = answer(stream, &*check, &binds);
                    });
                }
            })
            .expect("start the directory's thread");
        Directory { port, binds }
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    /// Every bind answered so far, oldest first.
    pub fn binds(&self) -> Vec<Bind> {
        self.binds.lock().expect("binds").clone()
    }

    /// The `pg_hba.conf` line that sends `role`'s sign-ins on loopback here.
    pub fn hba_line(&self, role: &str) -> String {
        format!(
            "host all {role} 127.0.0.1/32 ldap ldapserver=127.0.0.1 ldapport={} \
             ldapprefix=\"cn=\" ldapsuffix=\",dc=kmsflow\"",
            self.port
        )
    }
}

/// A BER element: its tag and contents.
struct Element {
    tag: u8,
    value: Vec<u8>,
}

fn answer(mut stream: TcpStream, check: &Check, binds: &Mutex<Vec<Bind>>) -> std::io::Result<()> {
    loop {
        let Some(message) = read_element(&mut stream)? else {
            return Ok(());
        };
        let mut parts = elements(&message.value).into_iter();
        let (Some(id), Some(op)) = (parts.next(), parts.next()) else {
            return Ok(());
        };
        match op.tag {
            // BindRequest: version, name, simple [0] password.
            0x60 => {
                let fields = elements(&op.value);
                let text = |i: usize| {
                    fields
                        .get(i)
                        .map(|f| String::from_utf8_lossy(&f.value).into_owned())
                        .unwrap_or_default()
                };
                let (dn, password) = (text(1), text(2));
                let accepted =
                    fields.get(2).is_some_and(|f| f.tag == 0x80) && check(&dn, &password);
                binds.lock().expect("binds").push(Bind {
                    dn,
                    password,
                    accepted,
                });
                // resultCode: success (0) or invalidCredentials (49).
                let mut result = encode(0x0a, &[if accepted { 0 } else { 49 }]);
                result.extend(encode(0x04, b""));
                result.extend(encode(0x04, if accepted { b"" } else { b"refused" }));
                let mut reply = encode(0x02, &id.value);
                reply.extend(encode(0x61, &result));
                stream.write_all(&encode(0x30, &reply))?;
            }
            // UnbindRequest, or anything else: the session is over.
            _ => return Ok(()),
        }
    }
}

fn read_element(stream: &mut impl Read) -> std::io::Result<Option<Element>> {
    let mut tag = [0u8; 1];
    if stream.read(&mut tag)? == 0 {
        return Ok(None);
    }
    let mut first = [0u8; 1];
    stream.read_exact(&mut first)?;
    let length = if first[0] < 0x80 {
        usize::from(first[0])
    } else {
        let mut bytes = vec![0u8; usize::from(first[0] & 0x7f)];
        stream.read_exact(&mut bytes)?;
        bytes.iter().fold(0usize, |n, b| (n << 8) | usize::from(*b))
    };
    let mut value = vec![0u8; length];
    stream.read_exact(&mut value)?;
    Ok(Some(Element { tag: tag[0], value }))
}

/// The elements one after another in `bytes`.
fn elements(mut bytes: &[u8]) -> Vec<Element> {
    let mut found = Vec::new();
    while !bytes.is_empty() {
        match read_element(&mut bytes) {
            Ok(Some(element)) => found.push(element),
            _ => break,
        }
    }
    found
}

fn encode(tag: u8, value: &[u8]) -> Vec<u8> {
    let mut out = vec![tag];
    match value.len() {
        n if n < 0x80 => out.push(n as u8),
        n if n <= 0xff => out.extend([0x81, n as u8]),
        n => out.extend([0x82, (n >> 8) as u8, n as u8]),
    }
    out.extend(value);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn elements_round_trip_with_long_lengths() {
        let long = vec![7u8; 300];
        let mut both = encode(0x04, b"cn=ana");
        both.extend(encode(0x80, &long));
        let read = elements(&both);
        assert_eq!(read.len(), 2);
        assert_eq!(read[0].value, b"cn=ana");
        assert_eq!((read[1].tag, read[1].value.len()), (0x80, 300));
    }
}
