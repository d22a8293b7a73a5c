//! Certificates made in the test (rcgen): a CA, server and client leaves.

use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair, SanType};

pub struct Ca {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

/// A certificate and its private key, PEM.
pub struct Leaf {
    pub cert: String,
    pub key: String,
}

impl Ca {
    pub fn new(name: &str) -> Self {
        let mut params = CertificateParams::new(Vec::<String>::new()).unwrap();
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        Self {
            issuer: CertifiedIssuer::self_signed(params, KeyPair::generate().unwrap()).unwrap(),
        }
    }

    pub fn pem(&self) -> String {
        self.issuer.as_ref().pem()
    }

    /// The gateway's certificate: localhost and 127.0.0.1.
    pub fn server(&self) -> Leaf {
        self.leaf(vec![
            SanType::DnsName("localhost".try_into().unwrap()),
            SanType::IpAddress("127.0.0.1".parse().unwrap()),
        ])
    }

    /// A client certificate naming `uri` (a SPIFFE ID) as its URI SAN.
    pub fn client(&self, uri: &str) -> Leaf {
        self.leaf(vec![SanType::URI(uri.try_into().unwrap())])
    }

    /// A client certificate whose only SAN is the DNS name `dns`.
    pub fn client_dns(&self, dns: &str) -> Leaf {
        self.leaf(vec![SanType::DnsName(dns.try_into().unwrap())])
    }

    /// A client certificate naming both `uri` (URI SAN) and `dns` (DNS SAN).
    pub fn client_uri_and_dns(&self, uri: &str, dns: &str) -> Leaf {
        self.leaf(vec![
            SanType::DnsName(dns.try_into().unwrap()),
            SanType::URI(uri.try_into().unwrap()),
        ])
    }

    fn leaf(&self, sans: Vec<SanType>) -> Leaf {
        let key = KeyPair::generate().unwrap();
        let mut params = CertificateParams::default();
        params.subject_alt_names = sans;
        let cert = params.signed_by(&key, &self.issuer).unwrap();
        Leaf {
            cert: cert.pem(),
            key: key.serialize_pem(),
        }
    }
}
