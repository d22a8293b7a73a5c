//! Who is calling, and whether it may use an account: the caller's identity
//! from its mTLS client certificate (URI SAN, SPIFFE style, else DNS SAN) or
//! from a bearer token (stored only as SHA-256, compared in constant time);
//! the account's `allowed_callers`; and the caller as a bounded metric label.
//! With neither configured, callers are anonymous and may name themselves
//! with `x-caller` for fair shares only.
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
    tokens: Vec<TokenCaller>,
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
        let known_callers = config
            .callers
            .iter()
            .map(|t| t.name.to_string())
            .chain(
                accounts
                    .iter()
                    .flat_map(|a| a.allowed_callers.iter().flatten().cloned()),
            )
            .collect();
        Self {
            mtls: config.mtls(),
            tokens: config.callers.clone(),
            known_callers,
        }
    }

    /// True when calls must prove who they are.
    fn required(&self) -> bool {
        self.mtls || !self.tokens.is_empty()
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
        let from_token = bearer(metadata).and_then(|token| self.token_caller(token));
        let from_cert = self
            .mtls
            .then(|| {
                peer_certs
                    .and_then(|c| c.first())
                    .and_then(|c| cert_identity(c.as_ref()))
            })
            .flatten();
        let name: Arc<str> = from_token
            .or(from_cert.map(Arc::from))
            .ok_or(AuthError::Unauthenticated)?;
        let weight = self
            .tokens
            .iter()
            .find(|t| t.name == name)
            .map_or(NonZeroU32::MIN, |t| t.weight);
        Ok(Identity {
            caller: Caller::new(name, weight),
            authenticated: true,
        })
    }

    /// The configured caller whose token hashes to the presented one. Every
    /// candidate is compared, in constant time, whatever matches.
    fn token_caller(&self, token: &str) -> Option<Arc<str>> {
        let digest: [u8; 32] = Sha256::digest(token.as_bytes()).into();
        let mut found = None;
        for caller in &self.tokens {
            if bool::from(caller.token_sha256.ct_eq(&digest)) {
                found = Some(Arc::clone(&caller.name));
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

/// The identity a client certificate names: its first URI SAN (SPIFFE ID),
/// else its first DNS SAN.
fn cert_identity(der: &[u8]) -> Option<String> {
    let (_, cert) = X509Certificate::from_der(der).ok()?;
    let san = cert.subject_alternative_name().ok()??;
    let names = &san.value.general_names;
    names
        .iter()
        .find_map(|n| match n {
            GeneralName::URI(uri) => Some(uri.to_string()),
            _ => None,
        })
        .or_else(|| {
            names.iter().find_map(|n| match n {
                GeneralName::DNSName(dns) => Some(dns.to_string()),
                _ => None,
            })
        })
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
        assert_eq!(&*id.caller.id, "billing");
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
}
