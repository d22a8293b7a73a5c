//! How callers are identified: TLS on the listener (mTLS with a client CA),
//! bearer-token callers, and the identity header a service mesh's sidecar
//! sets; and how configuration names a caller (one namespace per source).

use std::fmt;
use std::num::NonZeroU32;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use sha2::{Digest, Sha256};

use super::ConfigError;

/// TLS on the gRPC listener, read from PEM files at startup.
#[derive(Clone)]
pub struct TlsConfig {
    pub cert: Vec<u8>,
    pub key: Vec<u8>,
    /// Require client certificates signed by this CA (mTLS).
    pub client_ca: Option<Vec<u8>>,
    /// Where they were read from, to read again when they change (`None`:
    /// given as bytes, fixed).
    pub files: Option<TlsFiles>,
}

/// The files of `--tls-cert`, `--tls-key` and `--client-ca`.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub client_ca: Option<PathBuf>,
}

impl fmt::Debug for TlsConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TlsConfig")
            .field("mtls", &self.client_ca.is_some())
            .finish_non_exhaustive()
    }
}

impl TlsConfig {
    /// Reads the PEM files of `--tls-cert`, `--tls-key` and `--client-ca`.
    pub fn read(cert: &Path, key: &Path, client_ca: Option<&Path>) -> Result<Self, ConfigError> {
        Ok(Self {
            cert: read_pem("--tls-cert (GATEWAY_TLS_CERT)", cert)?,
            key: read_pem("--tls-key (GATEWAY_TLS_KEY)", key)?,
            client_ca: client_ca
                .map(|ca| read_pem("--client-ca (GATEWAY_CLIENT_CA)", ca))
                .transpose()?,
            files: Some(TlsFiles {
                cert: cert.to_owned(),
                key: key.to_owned(),
                client_ca: client_ca.map(Path::to_owned),
            }),
        })
    }
}

fn read_pem(setting: &'static str, path: &Path) -> Result<Vec<u8>, ConfigError> {
    let pem = std::fs::read(path)
        .map_err(|e| ConfigError::new(setting, format!("cannot read {}: {e}", path.display())))?;
    if !pem.windows(10).any(|w| w == b"-----BEGIN") {
        return Err(ConfigError::new(
            setting,
            format!("{} holds no PEM block", path.display()),
        ));
    }
    Ok(pem)
}

/// A bearer-token caller from the accounts file.
#[derive(Clone)]
pub struct TokenCaller {
    pub name: Arc<str>,
    pub token_sha256: [u8; 32],
    pub weight: NonZeroU32,
}

impl TokenCaller {
    /// A caller whose token is `token` (tests; the file holds only hashes).
    pub fn with_token(name: &str, token: &str, weight: NonZeroU32) -> Self {
        Self {
            name: name.into(),
            token_sha256: Sha256::digest(token.as_bytes()).into(),
            weight,
        }
    }
}

impl fmt::Debug for TokenCaller {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("TokenCaller")
            .field("name", &self.name)
            .field("weight", &self.weight)
            .finish_non_exhaustive()
    }
}

/// How callers are identified.
#[derive(Debug, Clone, Default)]
pub struct AuthConfig {
    pub tls: Option<TlsConfig>,
    /// Bearer-token callers from the accounts file.
    pub callers: Vec<TokenCaller>,
    /// The header (lowercase) a service mesh's sidecar sets to the verified
    /// identity of the caller (`l5d-client-id`, `x-forwarded-client-cert`).
    pub mesh_header: Option<String>,
}

impl AuthConfig {
    /// Client certificates are required (and verified by the TLS layer).
    pub fn mtls(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.client_ca.is_some())
    }

    /// True when calls must prove who they are.
    pub fn required(&self) -> bool {
        self.mtls() || !self.callers.is_empty() || self.mesh_header.is_some()
    }
}

/// Headers a mesh identity header may not be: the ones the gateway or gRPC
/// read for something else, which a caller sets itself.
const RESERVED_HEADERS: &[&str] = &[
    "authorization",
    "content-type",
    "te",
    "user-agent",
    "x-caller",
    "x-infobip-account",
    "traceparent",
    "tracestate",
    "baggage",
];

/// Checks `--mesh-identity-header`: a lowercase HTTP header name the gateway
/// does not read for anything else.
pub(super) fn check_mesh_header(name: &str) -> Result<(), String> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-');
    if !valid {
        return Err("must be a header name of a-z, 0-9, '-' (e.g. l5d-client-id)".into());
    }
    if name.starts_with("grpc-") || RESERVED_HEADERS.contains(&name) {
        return Err(format!(
            "{name} is read by gRPC or the gateway for something else"
        ));
    }
    Ok(())
}

/// Checks a caller as `allowed_callers` names it: identities from each
/// source live in their own namespace, so a certificate's DNS SAN `billing`
/// is never the token caller `billing`. `token:NAME` (a `[[callers]]`
/// token), `dns:NAME` (a client certificate's DNS SAN), `mesh:VALUE` (the
/// mesh identity header), or a URI (a certificate's URI SAN, e.g.
/// `spiffe://…`).
pub(crate) fn check_caller_name(name: &str) -> Result<(), String> {
    let namespaced = ["token:", "dns:", "mesh:", "uri:"].iter().any(|p| {
        name.strip_prefix(p)
            .is_some_and(|rest| !rest.trim().is_empty())
    }) || name.split_once("://").is_some_and(|(scheme, rest)| {
        !scheme.is_empty()
            && scheme
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"+-.".contains(&b))
            && !rest.is_empty()
    });
    if namespaced {
        Ok(())
    } else {
        Err(format!(
            "allowed_callers entry {name:?} names no identity source: write token:NAME (a [[callers]] token), \
             dns:NAME (a certificate's DNS SAN), mesh:VALUE (--mesh-identity-header) or a URI SAN (spiffe://…)"
        ))
    }
}
