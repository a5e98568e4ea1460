//! Client-side TLS configurations for outbound delivery (STARTTLS, RFC 3207).
//!
//! Two kinds, matching a route's `tls` setting (interface, "Outbound TLS"):
//!
//! - [`required_config`]: the certificate must chain to a trust anchor and be valid for
//!   the name used to reach the host. The anchors are the PEM bundle in the route's
//!   `ca_file` (which *replaces* the system roots) or else the system's roots
//!   (rustls-native-certs), or, if the system has none, the Mozilla roots compiled in
//!   (webpki-roots).
//! - [`opportunistic_config`]: any certificate is accepted (RFC 7435 opportunistic
//!   security: encryption against passive eavesdroppers, no authentication). The
//!   handshake signatures are still checked, so the peer must hold the private key of
//!   the certificate it shows; what is not checked is who issued it and for which name.
//!
//! Every config uses the ring provider explicitly and offers TLS 1.2 and 1.3 only.
//!
//! Trust: `ca_file` is operator configuration (trusted, but errors name the file). The
//! certificates a remote server presents are untrusted and are judged by rustls/webpki.

use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, ServerName, UnixTime};
use rustls::{DigitallySignedStruct, RootCertStore, SignatureScheme};

/// Why a TLS client configuration could not be built.
#[derive(thiserror::Error, Debug)]
pub enum TlsConfigError {
    /// The CA file could not be read.
    #[error("cannot read CA file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    /// The CA file is not a PEM bundle of usable certificates.
    #[error("CA file {}: {reason}", path.display())]
    Parse { path: PathBuf, reason: String },
    /// The CA file holds no certificate at all.
    #[error("CA file {} contains no PEM certificate", path.display())]
    Empty { path: PathBuf },
    /// rustls refused the configuration (should not happen with the ring provider).
    #[error("TLS client configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// The ring provider, explicitly (the crate is built without rustls' default provider).
fn provider() -> Arc<CryptoProvider> {
    static PROVIDER: OnceLock<Arc<CryptoProvider>> = OnceLock::new();
    PROVIDER
        .get_or_init(|| Arc::new(rustls::crypto::ring::default_provider()))
        .clone()
}

/// A verifying client config for `TlsPolicy::Required`.
///
/// Roots come from `ca_file` (a PEM bundle; it REPLACES the system roots when given) or
/// else from the system (rustls-native-certs; if that yields none, webpki-roots). The
/// system roots are loaded once per process (reading them touches many files), so build
/// the config once per route, not per connection.
pub fn required_config(
    ca_file: Option<&Path>,
) -> Result<Arc<rustls::ClientConfig>, TlsConfigError> {
    let roots = match ca_file {
        Some(path) => Arc::new(roots_from_file(path)?),
        None => system_roots(),
    };
    let config = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    Ok(Arc::new(config))
}

/// The non-verifying config used for `TlsPolicy::Opportunistic` (RFC 7435): any
/// certificate is accepted, handshake signatures are still verified. Built once.
pub fn opportunistic_config() -> Arc<rustls::ClientConfig> {
    static CONFIG: OnceLock<Arc<rustls::ClientConfig>> = OnceLock::new();
    CONFIG
        .get_or_init(|| {
            let provider = provider();
            let verifier = Arc::new(AcceptAnyCertificate {
                provider: provider.clone(),
            });
            let config = rustls::ClientConfig::builder_with_provider(provider)
                .with_safe_default_protocol_versions()
                // The ring provider supports both default versions; this cannot fail.
                .expect("ring provider supports TLS 1.2 and 1.3")
                .dangerous()
                .with_custom_certificate_verifier(verifier)
                .with_no_client_auth();
            Arc::new(config)
        })
        .clone()
}

/// Reads a PEM bundle into a root store; every certificate in it must be usable, so a
/// damaged file is reported at start-up instead of failing deliveries later.
fn roots_from_file(path: &Path) -> Result<RootCertStore, TlsConfigError> {
    let pem = std::fs::read(path).map_err(|source| TlsConfigError::Read {
        path: path.to_owned(),
        source,
    })?;
    let mut roots = RootCertStore::empty();
    for (i, cert) in CertificateDer::pem_slice_iter(&pem).enumerate() {
        let parse_error = |reason: String| TlsConfigError::Parse {
            path: path.to_owned(),
            reason,
        };
        let cert = cert.map_err(|e| parse_error(format!("bad PEM: {e}")))?;
        roots
            .add(cert)
            .map_err(|e| parse_error(format!("certificate #{} unusable: {e}", i + 1)))?;
    }
    if roots.is_empty() {
        return Err(TlsConfigError::Empty {
            path: path.to_owned(),
        });
    }
    Ok(roots)
}

/// The system's trust anchors, loaded once; webpki-roots when the system has none.
fn system_roots() -> Arc<RootCertStore> {
    static ROOTS: OnceLock<Arc<RootCertStore>> = OnceLock::new();
    ROOTS
        .get_or_init(|| {
            let mut roots = RootCertStore::empty();
            let native = rustls_native_certs::load_native_certs();
            for error in &native.errors {
                tracing::warn!(%error, "while loading the system's TLS roots");
            }
            // Some system bundles hold certificates webpki cannot use; skip those.
            let (added, ignored) = roots.add_parsable_certificates(native.certs);
            if ignored > 0 {
                tracing::debug!(
                    added,
                    ignored,
                    "system TLS roots: some certificates ignored"
                );
            }
            if roots.is_empty() {
                tracing::warn!("no system TLS roots found; using the built-in Mozilla roots");
                roots.extend(webpki_roots::TLS_SERVER_ROOTS.iter().cloned());
            }
            Arc::new(roots)
        })
        .clone()
}

/// Accepts any server certificate (opportunistic TLS, RFC 7435) but still verifies the
/// handshake signatures with the provider's algorithms, so the session keys are bound to
/// the key of the certificate shown.
struct AcceptAnyCertificate {
    provider: Arc<CryptoProvider>,
}

impl fmt::Debug for AcceptAnyCertificate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AcceptAnyCertificate")
    }
}

impl ServerCertVerifier for AcceptAnyCertificate {
    fn verify_server_cert(
        &self,
        _end_entity: &CertificateDer<'_>,
        _intermediates: &[CertificateDer<'_>],
        _server_name: &ServerName<'_>,
        _ocsp_response: &[u8],
        _now: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.provider.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.provider
            .signature_verification_algorithms
            .supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_ca_file_is_named() {
        let err = required_config(Some(Path::new("/nonexistent/ca.pem"))).unwrap_err();
        assert!(err.to_string().contains("/nonexistent/ca.pem"), "{err}");
    }

    #[test]
    fn ca_file_without_certificates_is_an_error() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty.pem");
        std::fs::write(&path, "not a certificate\n").unwrap();
        let err = required_config(Some(&path)).unwrap_err();
        assert!(matches!(err, TlsConfigError::Empty { .. }), "{err}");
        assert!(err.to_string().contains("empty.pem"), "{err}");
    }

    #[test]
    fn system_roots_are_never_empty() {
        required_config(None).unwrap();
        assert!(!system_roots().is_empty());
    }

    #[test]
    fn opportunistic_config_is_shared() {
        assert!(Arc::ptr_eq(
            &opportunistic_config(),
            &opportunistic_config()
        ));
    }
}
