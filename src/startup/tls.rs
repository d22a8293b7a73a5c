//! TLS on the gRPC listener, done here rather than by tonic's fixed
//! `ServerTlsConfig` so the certificate can rotate: `--tls-cert`,
//! `--tls-key` and `--client-ca` are re-read every [`RELOAD_EVERY`] and on
//! SIGHUP (cert-manager and Kubernetes update mounted Secrets in place), and
//! each new handshake uses the files as last read. A new set that does not
//! make a valid configuration (unreadable, not PEM, key not matching the
//! certificate, no CA) is refused with one warning naming the problem, and
//! the current one stays. Connections that exist keep the certificate they
//! were made with.
//!
//! Each accepted connection gets [`super::TLS_HANDSHAKE_TIMEOUT`] to finish
//! its handshake, in a task of its own, so a slow or silent client holds up
//! nobody else; it then reaches tonic as a `TlsStream`, whose peer
//! certificates the service reads (mTLS identities).

use std::sync::{Arc, RwLock};
use std::time::Duration;

use rustls::RootCertStore;
use rustls::ServerConfig;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::WebPkiClientVerifier;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;
use tokio_rustls::server::TlsStream;
use tokio_stream::wrappers::ReceiverStream;
use tokio_util::sync::CancellationToken;

use crate::config::{TlsConfig, TlsFiles};

/// How often the TLS files are compared with what is in use.
const RELOAD_EVERY: Duration = Duration::from_secs(2);
/// Idle time before TCP keepalive probes on accepted connections.
const TCP_KEEPALIVE: Duration = Duration::from_secs(60);

/// The PEM bytes of a certificate chain, its key and the client CA.
type Pems = (Vec<u8>, Vec<u8>, Option<Vec<u8>>);

/// The TLS settings in use, and where they come from.
pub(super) struct Tls {
    current: RwLock<Arc<ServerConfig>>,
    files: Option<TlsFiles>,
    /// The PEM bytes last read (used or refused), so one change is acted
    /// on, and logged, once.
    last: std::sync::Mutex<Pems>,
}

impl Tls {
    /// From the PEMs read at startup; fails when they make no valid config.
    pub(super) fn new(config: &TlsConfig) -> Result<Self, String> {
        let server = server_config(&config.cert, &config.key, config.client_ca.as_deref())?;
        Ok(Self {
            current: RwLock::new(Arc::new(server)),
            files: config.files.clone(),
            last: std::sync::Mutex::new((
                config.cert.clone(),
                config.key.clone(),
                config.client_ca.clone(),
            )),
        })
    }

    fn current(&self) -> Arc<ServerConfig> {
        Arc::clone(&self.current.read().unwrap_or_else(|p| p.into_inner()))
    }

    /// Reads the files again and uses them if they changed and are valid.
    /// `Ok(true)`: now in use; `Ok(false)`: unchanged; `Err`: refused.
    fn reload(&self) -> Result<bool, String> {
        let Some(files) = &self.files else {
            return Ok(false);
        };
        let read = |path: &std::path::Path| {
            std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))
        };
        let cert = read(&files.cert)?;
        let key = read(&files.key)?;
        let ca = files.client_ca.as_deref().map(read).transpose()?;
        let fresh: Pems = (cert, key, ca);
        {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            if *last == fresh {
                return Ok(false);
            }
            *last = fresh.clone();
        }
        let server = server_config(&fresh.0, &fresh.1, fresh.2.as_deref())?;
        *self.current.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(server);
        Ok(true)
    }
}

/// A rustls server configuration: the certificate chain and key, client
/// certificates from `client_ca` required when given, HTTP/2 by ALPN.
fn server_config(
    cert: &[u8],
    key: &[u8],
    client_ca: Option<&[u8]>,
) -> Result<ServerConfig, String> {
    let provider = Arc::new(rustls::crypto::aws_lc_rs::default_provider());
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert)
        .collect::<Result<_, _>>()
        .map_err(|e| format!("--tls-cert: not a PEM certificate chain ({e})"))?;
    if chain.is_empty() {
        return Err("--tls-cert: no certificate in the file".into());
    }
    let key = PrivateKeyDer::from_pem_slice(key)
        .map_err(|e| format!("--tls-key: not a PEM private key ({e})"))?;
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?;
    let builder = match client_ca {
        None => builder.with_no_client_auth(),
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for c in CertificateDer::pem_slice_iter(ca) {
                let c = c.map_err(|e| format!("--client-ca: not a PEM certificate ({e})"))?;
                roots
                    .add(c)
                    .map_err(|e| format!("--client-ca: unusable CA certificate ({e})"))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .map_err(|e| format!("--client-ca: {e}"))?;
            builder.with_client_cert_verifier(verifier)
        }
    };
    let mut server = builder
        .with_single_cert(chain, key)
        .map_err(|e| format!("--tls-cert/--tls-key: {e}"))?;
    server.alpn_protocols = vec![b"h2".to_vec()];
    Ok(server)
}

/// Accepted connections, handshaken with the configuration current at
/// their accept, until `stop`.
pub(super) fn incoming(
    listener: TcpListener,
    tls: Arc<Tls>,
    handshake_timeout: Duration,
    stop: CancellationToken,
) -> ReceiverStream<std::io::Result<TlsStream<TcpStream>>> {
    let (tx, rx) = tokio::sync::mpsc::channel(64);
    tokio::spawn(async move {
        loop {
            let stream = tokio::select! {
                accepted = listener.accept() => match accepted {
                    Ok((stream, _)) => stream,
                    Err(e) => {
                        // Out of file descriptors and the like: pause, not spin.
                        tracing::warn!(error = %e, "gRPC listener: accept failed");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                        continue;
                    }
                },
                () = stop.cancelled() => return,
            };
            // As tonic's own TcpIncoming would set them (see `startup`).
            let _ = stream.set_nodelay(true);
            let keepalive = socket2::TcpKeepalive::new().with_time(TCP_KEEPALIVE);
            let _ = socket2::SockRef::from(&stream).set_tcp_keepalive(&keepalive);
            let acceptor = TlsAcceptor::from(tls.current());
            let tx = tx.clone();
            tokio::spawn(async move {
                match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                    Ok(Ok(tls_stream)) => {
                        let _ = tx.send(Ok(tls_stream)).await;
                    }
                    // A failed or slow handshake is the client's problem:
                    // its connection closes, the listener goes on.
                    Ok(Err(e)) => tracing::debug!(error = %e, "TLS handshake failed"),
                    Err(_) => tracing::debug!("TLS handshake timed out"),
                }
            });
        }
    });
    ReceiverStream::new(rx)
}

/// Re-reads the TLS files every [`RELOAD_EVERY`] and on SIGHUP, until aborted.
pub(super) async fn watch(tls: Arc<Tls>) {
    #[cfg(unix)]
    let mut hup = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::hangup()).ok();
    let mut tick = tokio::time::interval(RELOAD_EVERY);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        #[cfg(unix)]
        let hangup = async {
            match hup.as_mut() {
                Some(s) => {
                    s.recv().await;
                }
                None => std::future::pending().await,
            }
        };
        #[cfg(not(unix))]
        let hangup = std::future::pending::<()>();
        let by_signal = tokio::select! {
            _ = tick.tick() => false,
            () = hangup => true,
        };
        match tls.reload() {
            Ok(true) => tracing::info!("TLS certificate reloaded: new handshakes use it"),
            Ok(false) if by_signal => tracing::info!("SIGHUP: TLS files unchanged"),
            Ok(false) => {}
            Err(problem) => tracing::warn!(
                %problem,
                "TLS certificate reload refused; keeping the current certificate"
            ),
        }
    }
}
