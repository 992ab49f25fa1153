//! https for the sandbox: a certificate authority made for each run, a server certificate for
//! the host names Azure's surfaces have here, and a listener that speaks TLS and plain HTTP on
//! one port.
//!
//! Plain HTTP stays on the same port for the managed-identity token endpoint: App Service's
//! `IDENTITY_ENDPOINT` is plain http on loopback in Azure too, and clients (azure-identity in
//! Rust and Python) fetch their tokens there with their own HTTP stack, which does not trust
//! the sandbox's authority.

use std::net::SocketAddr;
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DnType, ExtendedKeyUsagePurpose, IsCa,
    KeyPair, KeyUsagePurpose,
};
use rustls::pki_types::{CertificateDer, PrivateKeyDer, PrivatePkcs8KeyDer};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;

/// The first byte of a TLS record carrying a handshake: how a TLS client's first bytes differ
/// from an HTTP request line's.
const TLS_HANDSHAKE: u8 = 0x16;

/// The authority and the server's certificate chain and key.
pub struct Certificates {
    /// The authority's certificate, PEM: what clients are told to trust.
    pub ca_pem: String,
    config: Arc<rustls::ServerConfig>,
}

impl Certificates {
    /// A fresh authority, and a server certificate it signed for `names` (DNS names, wildcards
    /// such as `*.vault.example` included) and the loopback addresses.
    pub fn generate(names: &[String]) -> Result<Certificates, String> {
        let failed = |e: rcgen::Error| format!("cannot make the sandbox's certificate: {e}");
        let mut ca = CertificateParams::new(Vec::<String>::new()).map_err(failed)?;
        ca.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca.distinguished_name.push(
            DnType::CommonName,
            "kmsflow sandbox authority (this run only)",
        );
        ca.key_usages = vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign];
        let ca = CertifiedIssuer::self_signed(ca, KeyPair::generate().map_err(failed)?)
            .map_err(failed)?;

        let mut alt_names: Vec<String> = names.to_vec();
        alt_names.extend(["localhost".into(), "127.0.0.1".into(), "::1".into()]);
        let mut server = CertificateParams::new(alt_names).map_err(failed)?;
        server
            .distinguished_name
            .push(DnType::CommonName, "kmsflow sandbox");
        server.key_usages = vec![KeyUsagePurpose::DigitalSignature];
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate().map_err(failed)?;
        let server_cert = server.signed_by(&server_key, &ca).map_err(failed)?;

        let chain = vec![
            server_cert.der().clone(),
            CertificateDer::from(ca.der().to_vec()),
        ];
        let key = PrivateKeyDer::Pkcs8(PrivatePkcs8KeyDer::from(server_key.serialize_der()));
        let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
            rustls::crypto::aws_lc_rs::default_provider(),
        ))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("cannot configure TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(chain, key)
        .map_err(|e| format!("cannot configure TLS: {e}"))?;
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        Ok(Certificates {
            ca_pem: ca.pem(),
            config: Arc::new(config),
        })
    }
}

/// A connection, and whether it came over TLS.
pub enum Connection {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::server::TlsStream<TcpStream>>),
}

impl Connection {
    pub fn is_tls(&self) -> bool {
        matches!(self, Connection::Tls(_))
    }
}

impl AsyncRead for Connection {
    fn poll_read(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => std::pin::Pin::new(s).poll_read(cx, buf),
            Connection::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Connection {
    fn poll_write(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Connection::Plain(s) => std::pin::Pin::new(s).poll_write(cx, buf),
            Connection::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_flush(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => std::pin::Pin::new(s).poll_flush(cx),
            Connection::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        match self.get_mut() {
            Connection::Plain(s) => std::pin::Pin::new(s).poll_shutdown(cx),
            Connection::Tls(s) => std::pin::Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// Accepts connections and sorts them: TLS ones are handshaken (each on a task of its own, so
/// a slow or broken client holds up no other), plain ones pass as they are.
pub struct Listener {
    accepted: mpsc::Receiver<(Connection, SocketAddr)>,
    address: SocketAddr,
}

impl Listener {
    /// Serves `listener`; with `tls`, TLS clients are answered with its certificate, without,
    /// every connection is plain.
    pub fn new(listener: TcpListener, tls: Option<&Certificates>) -> std::io::Result<Listener> {
        let address = listener.local_addr()?;
        let (sender, accepted) = mpsc::channel(64);
        let acceptor = tls.map(|c| tokio_rustls::TlsAcceptor::from(c.config.clone()));
        tokio::spawn(async move {
            loop {
                let Ok((stream, peer)) = listener.accept().await else {
                    // Out of descriptors, say: wait rather than spin.
                    tokio::time::sleep(std::time::Duration::from_millis(10)).await;
                    continue;
                };
                if sender.is_closed() {
                    return;
                }
                let sender = sender.clone();
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let connection = match acceptor {
                        Some(acceptor) if starts_with_handshake(&stream).await => {
                            match tokio::time::timeout(
                                std::time::Duration::from_secs(10),
                                acceptor.accept(stream),
                            )
                            .await
                            {
                                Ok(Ok(tls)) => Connection::Tls(Box::new(tls)),
                                // A client that does not trust the authority hangs up here;
                                // that is its answer to give, not the sandbox's.
                                _ => return,
                            }
                        }
                        _ => Connection::Plain(stream),
                    };
                    let _ = sender.send((connection, peer)).await;
                });
            }
        });
        Ok(Listener { accepted, address })
    }
}

async fn starts_with_handshake(stream: &TcpStream) -> bool {
    let mut first = [0u8; 1];
    matches!(
        tokio::time::timeout(std::time::Duration::from_secs(10), stream.peek(&mut first)).await,
        Ok(Ok(1)) if first[0] == TLS_HANDSHAKE
    )
}

impl axum::serve::Listener for Listener {
    type Io = Connection;
    type Addr = SocketAddr;

    async fn accept(&mut self) -> (Self::Io, Self::Addr) {
        match self.accepted.recv().await {
            Some(accepted) => accepted,
            // The accept loop only ends when this listener is gone.
            None => std::future::pending().await,
        }
    }

    fn local_addr(&self) -> std::io::Result<Self::Addr> {
        Ok(self.address)
    }
}

/// Whether a request came over TLS, for the handlers: absolute URLs use the scheme the client
/// used.
#[derive(Debug, Clone, Copy)]
pub struct Transport {
    pub tls: bool,
}

impl axum::extract::connect_info::Connected<axum::serve::IncomingStream<'_, Listener>>
    for Transport
{
    fn connect_info(stream: axum::serve::IncomingStream<'_, Listener>) -> Self {
        Transport {
            tls: stream.io().is_tls(),
        }
    }
}
