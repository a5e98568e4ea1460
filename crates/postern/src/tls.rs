//! Server-side TLS: the certificate Postern presents for STARTTLS (RFC 3207) and implicit
//! TLS (RFC 8314), with the ring provider and TLS 1.2/1.3 only (rustls supports nothing
//! older, so TLS 1.0/1.1 clients are refused at the handshake).
//!
//! The certificate comes from `[tls] cert`/`key` (PEM: a chain, and a PKCS#8, PKCS#1 or
//! SEC1 key); without `[tls]` a self-signed certificate for `hostname` is generated at
//! first start and kept in `SPOOL/tls/` (logged, so the operator knows). Files are
//! checked for changes every few seconds and reloaded without a restart; a broken new
//! file is logged and the previous certificate stays in use.
//!
//! Trust: the files are the operator's; they are parsed strictly and a key that does not
//! match its certificate is refused.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use postern_smtp::TlsInfo;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::TlsAcceptor;

use crate::config::Config;

/// How often certificate files are checked for changes.
const RELOAD_INTERVAL: Duration = Duration::from_secs(5);

/// Why TLS could not be set up.
#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    /// A certificate or key file could not be read or parsed.
    #[error("{path}: {reason}")]
    File { path: PathBuf, reason: String },
    /// The key does not fit the certificate, or rustls refused them.
    #[error("certificate {cert} and key {key}: {reason}")]
    Pair {
        cert: PathBuf,
        key: PathBuf,
        reason: String,
    },
    /// The self-signed certificate could not be made or stored.
    #[error("self-signed certificate in {dir}: {reason}")]
    SelfSigned { dir: PathBuf, reason: String },
}

/// The server's TLS setup, shared by every listener.
pub struct ServerTls {
    acceptor: TlsAcceptor,
    resolver: Arc<Reloading>,
}

impl ServerTls {
    /// Loads the configured certificate, or makes/loads the self-signed one.
    pub fn load(config: &Config) -> Result<ServerTls, TlsError> {
        let (cert, key) = match &config.tls {
            Some(t) => (t.cert.clone(), t.key.clone()),
            None => self_signed(&config.spool_dir.join("tls"), &config.hostname)?,
        };
        let current = load_pair(&cert, &key)?;
        let stamp = stamp(&cert, &key);
        let resolver = Arc::new(Reloading {
            cert,
            key,
            current: RwLock::new((Arc::new(current), stamp)),
        });
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let server = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Pair {
                cert: resolver.cert.clone(),
                key: resolver.key.clone(),
                reason: e.to_string(),
            })?
            .with_no_client_auth()
            .with_cert_resolver(resolver.clone());
        Ok(ServerTls {
            acceptor: TlsAcceptor::from(Arc::new(server)),
            resolver,
        })
    }

    pub fn acceptor(&self) -> TlsAcceptor {
        self.acceptor.clone()
    }

    /// Watches the certificate files and reloads them when they change, for as long as
    /// this setup is in use (a configuration reload replaces it; the watcher then ends).
    pub fn spawn_reloader(&self) {
        let resolver = Arc::downgrade(&self.resolver);
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(RELOAD_INTERVAL);
            loop {
                tick.tick().await;
                let Some(r) = resolver.upgrade() else {
                    return;
                };
                let _ = tokio::task::spawn_blocking(move || r.reload_if_changed()).await;
            }
        });
    }
}

/// Identifies a version of the files on disk (modification time, size, inode).
type Stamp = Option<(i64, i64, u64, u64, u64, u64)>;

fn stamp(cert: &Path, key: &Path) -> Stamp {
    let c = fs::metadata(cert).ok()?;
    let k = fs::metadata(key).ok()?;
    Some((
        c.mtime(),
        c.mtime_nsec(),
        c.size() ^ c.ino(),
        k.mtime() as u64,
        k.size(),
        k.ino(),
    ))
}

/// The certificate resolver: always the current pair.
#[derive(Debug)]
struct Reloading {
    cert: PathBuf,
    key: PathBuf,
    current: RwLock<(Arc<CertifiedKey>, Stamp)>,
}

impl Reloading {
    fn reload_if_changed(&self) {
        let now = stamp(&self.cert, &self.key);
        if now.is_none() || self.current.read().map(|c| c.1 == now).unwrap_or(true) {
            return;
        }
        match load_pair(&self.cert, &self.key) {
            Ok(pair) => {
                if let Ok(mut c) = self.current.write() {
                    *c = (Arc::new(pair), now);
                }
                tracing::info!(cert = %self.cert.display(), "TLS certificate reloaded");
            }
            Err(e) => {
                // Keep serving the old one; remember the stamp so we log once per change.
                if let Ok(mut c) = self.current.write() {
                    c.1 = now;
                }
                tracing::error!(error = %e, "new TLS certificate not loaded; keeping the previous one");
            }
        }
    }
}

impl ResolvesServerCert for Reloading {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().map(|c| Arc::clone(&c.0))
    }
}

/// Reads a PEM chain and key and checks that they belong together.
fn load_pair(cert: &Path, key: &Path) -> Result<CertifiedKey, TlsError> {
    let file_err = |path: &Path, reason: String| TlsError::File {
        path: path.to_path_buf(),
        reason,
    };
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| file_err(cert, e.to_string()))?
        .collect::<Result<_, _>>()
        .map_err(|e| file_err(cert, e.to_string()))?;
    if chain.is_empty() {
        return Err(file_err(cert, "no certificate in the file".into()));
    }
    let private = PrivateKeyDer::from_pem_file(key).map_err(|e| {
        file_err(
            key,
            format!("{e} (expected a PKCS#8, PKCS#1 or SEC1 PEM key)"),
        )
    })?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain, private, &provider).map_err(|e| TlsError::Pair {
        cert: cert.to_path_buf(),
        key: key.to_path_buf(),
        reason: e.to_string(),
    })
}

/// The self-signed pair in `dir`, made on first use (key file mode 0600).
fn self_signed(dir: &Path, hostname: &str) -> Result<(PathBuf, PathBuf), TlsError> {
    let err = |reason: String| TlsError::SelfSigned {
        dir: dir.to_path_buf(),
        reason,
    };
    let cert = dir.join("selfsigned-cert.pem");
    let key = dir.join("selfsigned-key.pem");
    if cert.exists() && key.exists() {
        tracing::info!(cert = %cert.display(),
            "no [tls] configured: using the self-signed certificate made earlier");
        return Ok((cert, key));
    }
    fs::create_dir_all(dir).map_err(|e| err(e.to_string()))?;
    let pair = rcgen::KeyPair::generate().map_err(|e| err(e.to_string()))?;
    let params = rcgen::CertificateParams::new(vec![hostname.to_string()])
        .map_err(|e| err(e.to_string()))?;
    let made = params.self_signed(&pair).map_err(|e| err(e.to_string()))?;
    write_private(&key, pair.serialize_pem().as_bytes()).map_err(|e| err(e.to_string()))?;
    write_private(&cert, made.pem().as_bytes()).map_err(|e| err(e.to_string()))?;
    tracing::warn!(cert = %cert.display(), hostname,
        "no [tls] configured: generated a self-signed certificate (clients cannot verify it; \
         configure [tls] cert and key for a real one)");
    Ok((cert, key))
}

/// Writes a file durably and atomically, readable by the owner only.
fn write_private(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let options = crate::durable::Options {
        replace: crate::durable::Replace::Yes,
        mode: crate::durable::Mode::PRIVATE,
    };
    crate::durable::write(path, bytes, options).map_err(|e| e.source)
}

/// The negotiated protocol and cipher, for the Received: header (RFC 8314 4.3).
pub fn tls_info(conn: &rustls::ServerConnection) -> TlsInfo {
    let version = match conn.protocol_version() {
        Some(rustls::ProtocolVersion::TLSv1_3) => "TLSv1.3".to_string(),
        Some(rustls::ProtocolVersion::TLSv1_2) => "TLSv1.2".to_string(),
        Some(v) => format!("{v:?}"),
        None => "TLS".to_string(),
    };
    let cipher = conn
        .negotiated_cipher_suite()
        .map_or_else(|| "unknown".to_string(), |s| format!("{:?}", s.suite()));
    TlsInfo { version, cipher }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Makes a self-signed certificate with the openssl CLI, with the key in the given
    /// legacy or modern form, so we test the files operators really have.
    fn openssl_pair(dir: &Path, kind: &str) -> (PathBuf, PathBuf) {
        let cert = dir.join(format!("{kind}-cert.pem"));
        let key = dir.join(format!("{kind}-key.pem"));
        let (newkey, legacy): (&[&str], bool) = match kind {
            "rsa-pkcs1" => (&["-newkey", "rsa:2048"], true),
            "rsa-pkcs8" => (&["-newkey", "rsa:2048"], false),
            "ec-sec1" => (
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                true,
            ),
            _ => (
                &["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:P-256"],
                false,
            ),
        };
        let out = Command::new("openssl")
            .args([
                "req",
                "-x509",
                "-nodes",
                "-days",
                "2",
                "-subj",
                "/CN=relay.test",
            ])
            .args(newkey)
            .arg("-keyout")
            .arg(&key)
            .arg("-out")
            .arg(&cert)
            .output()
            .expect("openssl (installed by scripts/test)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        if legacy {
            // Rewrite the key in its traditional form (PKCS#1 / SEC1; `openssl ec`
            // writes SEC1 by default, `openssl rsa` needs -traditional for PKCS#1).
            let args: &[&str] = if kind.starts_with("rsa") {
                &["rsa", "-traditional", "-in"]
            } else {
                &["ec", "-in"]
            };
            let out = Command::new("openssl")
                .args(args)
                .arg(&key)
                .arg("-out")
                .arg(&key)
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        (cert, key)
    }

    #[test]
    fn loads_rsa_and_ecdsa_keys_in_every_pem_form() {
        let dir = tempfile::tempdir().unwrap();
        for (kind, marker) in [
            ("rsa-pkcs1", "BEGIN RSA PRIVATE KEY"),
            ("rsa-pkcs8", "BEGIN PRIVATE KEY"),
            ("ec-sec1", "BEGIN EC PRIVATE KEY"),
            ("ec-pkcs8", "BEGIN PRIVATE KEY"),
        ] {
            let (cert, key) = openssl_pair(dir.path(), kind);
            assert!(fs::read_to_string(&key).unwrap().contains(marker), "{kind}");
            load_pair(&cert, &key).unwrap_or_else(|e| panic!("{kind}: {e}"));
        }
    }

    #[test]
    fn mismatched_or_broken_files_are_refused_with_their_names() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, _) = openssl_pair(dir.path(), "ec-pkcs8");
        let (_, other_key) = openssl_pair(dir.path(), "rsa-pkcs8");
        let err = load_pair(&cert, &other_key).unwrap_err().to_string();
        assert!(err.contains("ec-pkcs8-cert.pem"), "{err}");
        let empty = dir.path().join("empty.pem");
        fs::write(&empty, "").unwrap();
        let err = load_pair(&empty, &other_key).unwrap_err().to_string();
        assert!(err.contains("empty.pem"), "{err}");
    }

    #[test]
    fn self_signed_is_made_once_and_kept() {
        let dir = tempfile::tempdir().unwrap();
        let (cert, key) = self_signed(dir.path(), "relay.test").unwrap();
        let first = fs::read(&cert).unwrap();
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(
            fs::metadata(&key).unwrap().permissions().mode() & 0o777,
            0o600
        );
        load_pair(&cert, &key).unwrap();
        let (cert2, _) = self_signed(dir.path(), "relay.test").unwrap();
        assert_eq!(fs::read(cert2).unwrap(), first);
    }
}
