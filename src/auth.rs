//! Who is calling, and whether it may use an account: the caller's identity
//! from a bearer token (stored only as SHA-256, compared in constant time),
//! its mTLS client certificate (URI SAN, SPIFFE style, else DNS SAN), or the
//! identity header a service mesh's sidecar set (`--mesh-identity-header`);
//! the account's `allowed_callers`; and the caller as a bounded metric label.
//! With none configured, callers are anonymous and may name themselves with
//! `x-caller` for fair shares only.
//!
//! Each source has its own namespace, so one can never pass for another:
//! `token:NAME`, `dns:NAME` (a certificate's DNS SAN), a URI SAN as it is
//! (`spiffe://…`), `mesh:VALUE`. A token wins over a certificate, which wins
//! over the mesh header.
//!
//! A mechanism: imports `config` and `domain` only.

use std::collections::HashSet;
use std::num::NonZeroU32;
use std::sync::Arc;

use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;
use tonic::metadata::MetadataMap;
use x509_parser::extensions::GeneralName;
use x509_parser::prelude::{FromDer, X509Certificate};

use crate::config::{AccountConfig, AuthConfig, TokenCaller};
use crate::domain::Caller;

/// Longest `x-caller` name kept for fairness.
const MAX_CALLER_NAME: usize = 128;
/// Longest mesh identity accepted (a SPIFFE ID is at most 2048 bytes by its
/// spec; meshes issue far shorter ones).
const MAX_MESH_IDENTITY: usize = 512;
/// The header Envoy (Istio) forwards the client certificate's details in.
const XFCC: &str = "x-forwarded-client-cert";

/// Why a call was not let in.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AuthError {
    #[error("the call carries no valid caller credentials")]
    Unauthenticated,
    #[error("caller {0} may not use this account")]
    NotAllowed(String),
}

/// How callers are identified and which may use what.
#[derive(Debug, Clone, Default)]
pub(crate) struct Authenticator {
    /// Client certificates are required and verified by the TLS layer.
    mtls: bool,
    /// Each token caller with its identity (`token:NAME`).
    tokens: Vec<(TokenCaller, Arc<str>)>,
    /// The mesh identity header, lowercase.
    mesh_header: Option<String>,
    /// Caller names that may appear as metric labels (configured ones).
    known_callers: HashSet<String>,
}

/// An identified caller: its fairness key, and whether it was authenticated.
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) caller: Caller,
    pub(crate) authenticated: bool,
}

impl Authenticator {
    /// From the checked configuration: mTLS when a client CA is set, tokens
    /// from the accounts file; the callers the accounts name are known labels.
    pub(crate) fn new(config: &AuthConfig, accounts: &[AccountConfig]) -> Self {
        let tokens: Vec<(TokenCaller, Arc<str>)> = config
            .callers
            .iter()
            .map(|t| (t.clone(), Arc::from(format!("token:{}", t.name))))
            .collect();
        let known_callers = tokens
            .iter()
            .map(|(_, id)| id.to_string())
            .chain(
                accounts
                    .iter()
                    .flat_map(|a| a.allowed_callers.iter().flatten().cloned()),
            )
            .collect();
        Self {
            mtls: config.mtls(),
            tokens,
            mesh_header: config.mesh_header.clone(),
            known_callers,
        }
    }

    /// True when calls must prove who they are.
    fn required(&self) -> bool {
        self.mtls || !self.tokens.is_empty() || self.mesh_header.is_some()
    }

    /// Whether `identity` may use an account open to `allowed` (`None`: any
    /// caller); the refusal names the caller by its label.
    pub(crate) fn authorize(
        &self,
        identity: &Identity,
        allowed: Option<&[String]>,
    ) -> Result<(), AuthError> {
        match allowed {
            Some(allowed)
                if !(identity.authenticated
                    && allowed.iter().any(|c| **c == *identity.caller.id)) =>
            {
                Err(AuthError::NotAllowed(self.label(identity).to_owned()))
            }
            _ => Ok(()),
        }
    }

    /// The caller as a bounded label: configured names, `anonymous`, or `unlisted`.
    pub(crate) fn label<'a>(&self, identity: &'a Identity) -> &'a str {
        if !identity.authenticated {
            "anonymous"
        } else if self.known_callers.contains(&*identity.caller.id) {
            &identity.caller.id
        } else {
            "unlisted"
        }
    }

    /// Identifies the caller of a call from its metadata and TLS peer chain.
    pub(crate) fn identify(
        &self,
        metadata: &MetadataMap,
        peer_certs: Option<&[impl AsRef<[u8]>]>,
    ) -> Result<Identity, AuthError> {
        if !self.required() {
            return Ok(Identity {
                caller: anonymous(metadata),
                authenticated: false,
            });
        }
        if let Some((caller, id)) = bearer(metadata).and_then(|token| self.token_caller(token)) {
            return Ok(Identity {
                caller: Caller::new(Arc::clone(id), caller.weight),
                authenticated: true,
            });
        }
        let from_cert = self
            .mtls
            .then(|| {
                peer_certs
                    .and_then(|c| c.first())
                    .and_then(|c| cert_identity(c.as_ref()))
            })
            .flatten();
        let from_mesh = || {
            let header = self.mesh_header.as_deref()?;
            mesh_identity(header, metadata.get(header)?.to_str().ok()?)
        };
        let name = from_cert
            .map(Arc::from)
            .or_else(from_mesh)
            .ok_or(AuthError::Unauthenticated)?;
        Ok(Identity {
            caller: Caller::new(name, NonZeroU32::MIN),
            authenticated: true,
        })
    }

    /// The configured caller whose token hashes to the presented one. Every
    /// candidate is compared, in constant time, whatever matches.
    fn token_caller(&self, token: &str) -> Option<&(TokenCaller, Arc<str>)> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for entry in &self.tokens {
            if bool::from(entry.0.token_sha256.ct_eq(&digest)) {
                found = Some(entry);
            }
        }
        found
    }
}

/// `authorization: Bearer <token>`.
fn bearer(metadata: &MetadataMap) -> Option<&str> {
    let value = metadata.get("authorization")?.to_str().ok()?;
    let (scheme, token) = value.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim())
        .filter(|t| !t.is_empty())
}

/// The fairness key of an anonymous call: its `x-caller` metadata, else
/// `anonymous`.
fn anonymous(metadata: &MetadataMap) -> Caller {
    metadata
        .get("x-caller")
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|name| !name.is_empty())
        .map(|name| {
            let name: String = name.chars().take(MAX_CALLER_NAME).collect();
            Caller::new(name, NonZeroU32::MIN)
        })
        .unwrap_or_else(Caller::anonymous)
}

/// The identity a client certificate names: its first URI SAN (SPIFFE ID)
/// as it is (`uri:` before one without `://`, so it cannot pass for
/// another source's name), else its first DNS SAN as `dns:NAME`.
fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) if uri.contains("://") => Some(uri.to_string()),
            GeneralName::URI(uri) => Some(format!("uri:{uri}")),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some(format!("dns:{dns}")),
                _ => None,
            })
        })
}

/// The caller a mesh sidecar's identity header names, as `mesh:VALUE`:
/// `x-forwarded-client-cert` is Envoy's list of certificates' details (the
/// last entry is the one the nearest proxy added; its `URI=`, else its
/// `DNS=`); any other header (`l5d-client-id`) is the identity itself.
fn mesh_identity(header: &str, value: &str) -> Option<Arc<str>> {
    let identity = if header == XFCC {
        let last = split_unquoted(value, ',').pop()?;
        let pairs: Vec<(String, String)> = split_unquoted(last, ';')
            .into_iter()
            .filter_map(|pair| {
                let (k, v) = pair.split_once('=')?;
                Some((k.trim().to_ascii_uppercase(), unquote(v.trim())))
            })
            .collect();
        let find = |key: &str| pairs.iter().find(|(k, _)| k == key).map(|(_, v)| v.clone());
        find("URI").or_else(|| find("DNS"))?
    } else {
        value.to_owned()
    };
    let identity = identity.trim();
    let printable = identity.bytes().all(|b| b.is_ascii_graphic());
    (!identity.is_empty() && identity.len() <= MAX_MESH_IDENTITY && printable)
        .then(|| Arc::from(format!("mesh:{identity}")))
}

/// `s` split on `sep` outside double quotes.
fn split_unquoted(s: &str, sep: char) -> Vec<&str> {
    let (mut parts, mut start, mut quoted, mut escaped) = (Vec::new(), 0, false, false);
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if quoted => escaped = true,
            '"' => quoted = !quoted,
            c if c == sep && !quoted => {
                parts.push(&s[start..i]);
                start = i + c.len_utf8();
            }
            _ => {}
        }
    }
    parts.push(&s[start..]);
    parts
}

/// A value without its surrounding quotes and escapes.
fn unquote(v: &str) -> String {
    match v.strip_prefix('"').and_then(|v| v.strip_suffix('"')) {
        Some(inner) => inner.replace("\\\"", "\"").replace("\\\\", "\\"),
        None => v.to_owned(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn md(pairs: &[(&'static str, &str)]) -> MetadataMap {
        let mut m = MetadataMap::new();
        for (k, v) in pairs {
            m.insert(*k, v.parse().unwrap());
        }
        m
    }

    fn tokens() -> Authenticator {
        let billing =
            TokenCaller::with_token("billing", "billing-token", NonZeroU32::new(3).unwrap());
        let config = AuthConfig {
            tls: None,
            callers: vec![billing],
            mesh_header: None,
        };
        Authenticator::new(&config, &[])
    }

    const NO_CERTS: Option<&[Vec<u8>]> = None;

    #[test]
    fn anonymous_callers_may_name_themselves_for_fairness() {
        let auth = Authenticator::default();
        let id = auth
            .identify(&md(&[("x-caller", "orders")]), NO_CERTS)
            .unwrap();
        assert_eq!(&*id.caller.id, "orders");
        assert!(!id.authenticated);
        let id = auth.identify(&md(&[]), NO_CERTS).unwrap();
        assert_eq!(&*id.caller.id, "anonymous");
    }

    #[test]
    fn bearer_tokens_identify_their_caller() {
        let auth = tokens();
        let id = auth
            .identify(&md(&[("authorization", "Bearer billing-token")]), NO_CERTS)
            .unwrap();
        assert_eq!(&*id.caller.id, "token:billing");
        assert_eq!(id.caller.weight.get(), 3);
        for bad in [
            &[("authorization", "Bearer wrong")][..],
            &[("x-caller", "billing")],
            &[],
        ] {
            assert_eq!(
                auth.identify(&md(bad), NO_CERTS).unwrap_err(),
                AuthError::Unauthenticated
            );
        }
    }

    #[test]
    fn the_mesh_header_names_the_caller_in_its_own_namespace() {
        let l5d = "web.default.serviceaccount.identity.linkerd.cluster.local";
        assert_eq!(
            mesh_identity("l5d-client-id", l5d).as_deref(),
            Some(&*format!("mesh:{l5d}"))
        );
        // Envoy's XFCC: the last entry (the nearest proxy's), URI before DNS,
        // quotes and the separators inside them respected.
        let xfcc = r#"By=spiffe://c/ns/a/sa/gw;URI=spiffe://c/ns/far/sa/x,By=spiffe://c/ns/g/sa/gw;Hash=ab;Subject="CN=x,O=y;z";DNS=orders.svc;URI=spiffe://c/ns/orders/sa/orders"#;
        assert_eq!(
            mesh_identity(XFCC, xfcc).as_deref(),
            Some("mesh:spiffe://c/ns/orders/sa/orders")
        );
        assert_eq!(
            mesh_identity(XFCC, "Hash=ab;DNS=orders.svc").as_deref(),
            Some("mesh:orders.svc")
        );
        for bad in ["", "  ", "two words", &"x".repeat(MAX_MESH_IDENTITY + 1)] {
            assert_eq!(mesh_identity("l5d-client-id", bad), None, "{bad:?}");
        }
        assert_eq!(mesh_identity(XFCC, "Hash=ab;Subject=\"CN=x\""), None);
        // Outside quotes a backslash is an ordinary character.
        assert_eq!(
            mesh_identity(XFCC, r"Hash=a\;URI=spiffe://c/ns/orders/sa/orders").as_deref(),
            Some("mesh:spiffe://c/ns/orders/sa/orders")
        );
        // A quoted value (escaped quotes too) cannot smuggle in a URI of its
        // own, across either separator.
        for subject in [
            r#""CN=x,URI=spiffe://evil""#,
            r#""CN=x;URI=spiffe://evil""#,
            r#""CN=\"x,URI=spiffe://evil\"""#,
        ] {
            let xfcc = format!("Hash=ab;Subject={subject};DNS=orders.svc");
            assert_eq!(
                mesh_identity(XFCC, &xfcc).as_deref(),
                Some("mesh:orders.svc"),
                "{xfcc}"
            );
        }
    }

    /// A self-signed certificate's DER with these SANs.
    fn cert_with(sans: Vec<rcgen::SanType>) -> Vec<u8> {
        let mut params = rcgen::CertificateParams::default();
        params.subject_alt_names = sans;
        let key = rcgen::KeyPair::generate().unwrap();
        params.self_signed(&key).unwrap().der().to_vec()
    }

    #[test]
    fn a_certificate_names_its_uri_san_as_it_is_only_with_a_scheme_else_its_dns_san() {
        use rcgen::SanType::{DnsName, URI};
        let uri = |u: &str| URI(u.try_into().unwrap());
        let dns = |d: &str| DnsName(d.try_into().unwrap());
        let spiffe = "spiffe://cluster.test/ns/orders/sa/orders";
        for (sans, want) in [
            (vec![uri(spiffe)], Some(spiffe.to_owned())),
            // Without `://` the URI is marked, so `dns:x` in a URI SAN
            // cannot pass for the DNS SAN `x`.
            (
                vec![uri("dns:orders.svc")],
                Some("uri:dns:orders.svc".into()),
            ),
            (vec![dns("orders.svc")], Some("dns:orders.svc".into())),
            // The URI SAN first, wherever it stands.
            (
                vec![dns("orders.svc"), uri(spiffe)],
                Some(spiffe.to_owned()),
            ),
            (vec![], None),
        ] {
            let what = format!("{sans:?}");
            assert_eq!(cert_identity(&cert_with(sans)), want, "{what}");
        }
        assert_eq!(cert_identity(b"not a certificate"), None);
    }

    #[test]
    fn a_token_a_certificate_and_the_mesh_header_never_share_a_name() {
        let billing = TokenCaller::with_token("billing", "t", NonZeroU32::MIN);
        let config = AuthConfig {
            tls: None,
            callers: vec![billing],
            mesh_header: Some("l5d-client-id".into()),
        };
        let auth = Authenticator::new(&config, &[]);
        let id = |pairs: &[(&'static str, &str)]| {
            auth.identify(&md(pairs), NO_CERTS)
                .map(|i| i.caller.id.to_string())
        };
        assert_eq!(id(&[("l5d-client-id", "billing")]).unwrap(), "mesh:billing");
        assert_eq!(
            id(&[("authorization", "Bearer t")]).unwrap(),
            "token:billing"
        );
        // A token wins over the header.
        assert_eq!(
            id(&[("authorization", "Bearer t"), ("l5d-client-id", "x")]).unwrap(),
            "token:billing"
        );
        assert_eq!(id(&[]).unwrap_err(), AuthError::Unauthenticated);
        assert_eq!(
            id(&[("x-caller", "billing")]).unwrap_err(),
            AuthError::Unauthenticated
        );
    }
}
