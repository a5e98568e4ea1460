//! Test certificate authority and TLS identities for tests: a self-signed CA
//! generated at test time with rcgen, leaf certificates it signs, and rustls
//! configurations built from them with the ring provider (never the process
//! default provider).

use std::fs;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};
use rustls::{ClientConfig, RootCertStore, ServerConfig};
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The crypto provider used for every rustls configuration made here.
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A certificate authority made at test time. Its certificate is valid from
/// 1975 to 4096 (rcgen's defaults), so clock skew never matters.
pub struct TestCa {
    issuer: CertifiedIssuer<'static, KeyPair>,
}

impl std::fmt::Debug for TestCa {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TestCa").finish_non_exhaustive()
    }
}

impl Default for TestCa {
    fn default() -> Self {
        Self::new()
    }
}

impl TestCa {
    /// Generates a new self-signed CA (ECDSA P-256, CN "Postern Test CA").
    pub fn new() -> TestCa {
        let mut params =
            CertificateParams::new(Vec::<String>::new()).expect("empty CA params are valid");
        let mut dn = DistinguishedName::new();
        dn.push(DnType::CommonName, "Postern Test CA");
        dn.push(DnType::OrganizationName, "postern-testkit");
        params.distinguished_name = dn;
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::CrlSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let key = KeyPair::generate().expect("generate CA key");
        let issuer = CertifiedIssuer::self_signed(params, key).expect("self-sign CA");
        TestCa { issuer }
    }

    /// The CA certificate in PEM (the only thing a verifying client should trust).
    pub fn ca_pem(&self) -> String {
        self.issuer.pem()
    }

    /// The CA certificate in DER.
    pub fn ca_der(&self) -> CertificateDer<'static> {
        self.issuer.der().clone()
    }

    /// A root store holding only this CA.
    pub fn root_store(&self) -> RootCertStore {
        let mut roots = RootCertStore::empty();
        roots.add(self.ca_der()).expect("add test CA to root store");
        roots
    }

    /// A rustls client configuration (ring provider) that trusts only this CA.
    pub fn client_config(&self) -> Arc<ClientConfig> {
        let config = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_root_certificates(self.root_store())
            .with_no_client_auth();
        Arc::new(config)
    }

    /// Issues a leaf certificate signed by this CA for `names`: each entry
    /// that parses as an [`std::net::IpAddr`] becomes an IP SAN, every other
    /// one a DNS SAN. The first name is also the subject CN. The identity's
    /// `cert_pem` holds the leaf only (not the CA).
    pub fn issue(&self, names: &[&str]) -> TlsIdentity {
        let mut params = leaf_params(names);
        params.use_authority_key_identifier_extension = true;
        let key = KeyPair::generate().expect("generate leaf key");
        let cert = params
            .signed_by(&key, &self.issuer)
            .expect("sign leaf certificate");
        TlsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }
}

fn leaf_params(names: &[&str]) -> CertificateParams {
    let sans: Vec<String> = names.iter().map(|n| n.to_string()).collect();
    let mut params = CertificateParams::new(sans).expect("valid certificate names");
    let mut dn = DistinguishedName::new();
    dn.push(
        DnType::CommonName,
        names.first().copied().unwrap_or("postern test leaf"),
    );
    params.distinguished_name = dn;
    params.is_ca = IsCa::ExplicitNoCa;
    params.key_usages = vec![
        KeyUsagePurpose::DigitalSignature,
        KeyUsagePurpose::KeyEncipherment,
    ];
    params.extended_key_usages = vec![
        ExtendedKeyUsagePurpose::ServerAuth,
        ExtendedKeyUsagePurpose::ClientAuth,
    ];
    params
}

/// A certificate and its private key, both PEM. `cert_pem` holds the leaf
/// certificate only (no chain): a verifier must be given the CA separately.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsIdentity {
    pub cert_pem: String,
    pub key_pem: String,
}

impl TlsIdentity {
    /// A self-signed certificate (not a CA, not trusted by any [`TestCa`])
    /// for `names` (IP addresses become IP SANs).
    pub fn self_signed(names: &[&str]) -> TlsIdentity {
        let key = KeyPair::generate().expect("generate key");
        let cert = leaf_params(names)
            .self_signed(&key)
            .expect("self-sign certificate");
        TlsIdentity {
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    /// Writes `cert.pem` and `key.pem` into `dir` (overwriting them) and
    /// returns their paths, certificate first. Panics on I/O errors.
    pub fn write_to(&self, dir: &Path) -> (PathBuf, PathBuf) {
        let cert = dir.join("cert.pem");
        let key = dir.join("key.pem");
        fs::write(&cert, &self.cert_pem)
            .unwrap_or_else(|e| panic!("write {}: {e}", cert.display()));
        fs::write(&key, &self.key_pem).unwrap_or_else(|e| panic!("write {}: {e}", key.display()));
        (cert, key)
    }

    /// The certificates of `cert_pem`, in DER.
    pub fn cert_chain(&self) -> Vec<CertificateDer<'static>> {
        CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .expect("parse certificate PEM")
    }

    /// The private key of `key_pem`, in DER.
    pub fn private_key(&self) -> PrivateKeyDer<'static> {
        PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).expect("parse private key PEM")
    }

    /// A rustls server configuration (ring provider, TLS 1.2 and 1.3, no
    /// client authentication) serving this identity.
    pub fn server_config(&self) -> Arc<ServerConfig> {
        let config = ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .expect("ring supports the default protocol versions")
            .with_no_client_auth()
            .with_single_cert(self.cert_chain(), self.private_key())
            .expect("certificate and key match");
        Arc::new(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, ServerConnection, StreamOwned};
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::thread;

    /// Serves one TLS connection that echoes a line; returns the client's result.
    fn handshake(
        server: Arc<ServerConfig>,
        client: Arc<ClientConfig>,
        name: &str,
    ) -> std::io::Result<Vec<u8>> {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap();
        let t = thread::spawn(move || {
            let (s, _) = listener.accept().unwrap();
            let conn = ServerConnection::new(server).unwrap();
            let mut tls = StreamOwned::new(conn, s);
            let mut buf = [0u8; 5];
            if tls.read_exact(&mut buf).is_ok() {
                let _ = tls.write_all(&buf);
                let _ = tls.flush();
            }
        });
        let sock = TcpStream::connect(addr).unwrap();
        let conn =
            ClientConnection::new(client, ServerName::try_from(name.to_string()).unwrap()).unwrap();
        let mut tls = StreamOwned::new(conn, sock);
        let result = (|| {
            tls.write_all(b"hello")?;
            tls.flush()?;
            let mut buf = vec![0u8; 5];
            tls.read_exact(&mut buf)?;
            Ok(buf)
        })();
        drop(tls);
        t.join().unwrap();
        result
    }

    #[test]
    fn issued_cert_verifies_against_ca_for_dns_and_ip() {
        let ca = TestCa::new();
        assert!(ca.ca_pem().starts_with("-----BEGIN CERTIFICATE-----"));
        let id = ca.issue(&["mx.example.test", "127.0.0.1"]);
        assert_eq!(id.cert_chain().len(), 1);
        let out = handshake(id.server_config(), ca.client_config(), "mx.example.test").unwrap();
        assert_eq!(out, b"hello");
        let out = handshake(id.server_config(), ca.client_config(), "127.0.0.1").unwrap();
        assert_eq!(out, b"hello");
    }

    #[test]
    fn wrong_name_or_other_ca_is_rejected() {
        let ca = TestCa::new();
        let id = ca.issue(&["mx.example.test"]);
        assert!(handshake(id.server_config(), ca.client_config(), "other.test").is_err());
        let other = TestCa::new();
        assert!(handshake(id.server_config(), other.client_config(), "mx.example.test").is_err());
        let selfsigned = TlsIdentity::self_signed(&["mx.example.test"]);
        assert!(
            handshake(
                selfsigned.server_config(),
                ca.client_config(),
                "mx.example.test"
            )
            .is_err()
        );
    }

    #[test]
    fn write_to_writes_pem_files() {
        let dir = std::env::temp_dir().join(format!("postern-testkit-ca-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let id = TestCa::new().issue(&["a.test"]);
        let (c, k) = id.write_to(&dir);
        assert_eq!(fs::read_to_string(&c).unwrap(), id.cert_pem);
        assert_eq!(fs::read_to_string(&k).unwrap(), id.key_pem);
        fs::remove_dir_all(&dir).unwrap();
    }
}
