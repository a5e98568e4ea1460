//! DKIM signing keys: loading (PEM: RSA in PKCS#1 or PKCS#8, Ed25519 in PKCS#8), making
//! new ones (`postern dkim keygen`), and the public key as DNS publishes it (RFC 6376
//! 3.6.1: `p=` is the base64 of the key; for RSA the DER SubjectPublicKeyInfo that
//! `openssl rsa -pubout` writes, for Ed25519 the bare 32-octet key, RFC 8463 4.2).
//!
//! Signing is done by ring through mail-auth. ring signs with RSA keys of 2048 to 8192
//! bits only, so a 1024-bit key (which RFC 8301 3.2 still allows verifiers to accept) is
//! refused when it is loaded, with that reason. Key generation for RSA uses the `rsa`
//! crate (ring cannot make RSA keys); it is never used to sign.

use std::path::Path;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256};
use rsa::pkcs1::DecodeRsaPrivateKey;
use rsa::pkcs8::{DecodePrivateKey, EncodePrivateKey, EncodePublicKey};
use rustls_pki_types::PrivateKeyDer;
use rustls_pki_types::pem::PemObject;

/// The signing algorithm, which follows the key.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Algorithm {
    /// rsa-sha256 (RFC 6376 3.3.1).
    Rsa,
    /// ed25519-sha256 (RFC 8463).
    Ed25519,
}

impl Algorithm {
    /// Every algorithm (`algorithm as usize` is its index).
    pub const ALL: [Algorithm; 2] = [Algorithm::Rsa, Algorithm::Ed25519];

    /// The `a=` tag's value.
    pub fn signature_name(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa-sha256",
            Algorithm::Ed25519 => "ed25519-sha256",
        }
    }

    /// The key record's `k=` tag.
    pub fn key_type(self) -> &'static str {
        match self {
            Algorithm::Rsa => "rsa",
            Algorithm::Ed25519 => "ed25519",
        }
    }
}

/// The private half, ready to sign with.
pub enum Private {
    Rsa(RsaKey<Sha256>),
    Ed25519(Ed25519Key),
}

/// A loaded signing key.
pub struct Key {
    pub algorithm: Algorithm,
    pub private: Private,
    /// What `p=` must carry (decoded).
    pub public: Vec<u8>,
    /// RSA modulus size; 256 for Ed25519.
    pub bits: usize,
}

/// The smallest RSA key ring signs with.
pub const MIN_RSA_BITS: usize = 2048;

/// Reads and checks the PEM key at `path`; the error says what is wrong (never the key).
pub fn load(path: &Path) -> Result<Key, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    parse_pem(&pem).map_err(|e| format!("{}: {e}", path.display()))
}

fn parse_pem(pem: &[u8]) -> Result<Key, String> {
    let der = PrivateKeyDer::from_pem_slice(pem)
        .map_err(|_| "no PEM private key in the file (PKCS#1 or PKCS#8)".to_string())?;
    match der {
        PrivateKeyDer::Pkcs1(d) => rsa_key(d.secret_pkcs1_der(), true),
        PrivateKeyDer::Pkcs8(d) => {
            let bytes = d.secret_pkcs8_der();
            match Ed25519Key::from_pkcs8_maybe_unchecked_der(bytes) {
                Ok(private) => {
                    let public = private.public_key();
                    Ok(Key {
                        algorithm: Algorithm::Ed25519,
                        private: Private::Ed25519(private),
                        public,
                        bits: 256,
                    })
                }
                Err(_) => rsa_key(bytes, false),
            }
        }
        _ => Err("an EC key: DKIM signs with RSA or Ed25519 only".to_string()),
    }
}

fn rsa_key(der: &[u8], pkcs1: bool) -> Result<Key, String> {
    let parsed = if pkcs1 {
        rsa::RsaPrivateKey::from_pkcs1_der(der).map_err(|e| e.to_string())
    } else {
        rsa::RsaPrivateKey::from_pkcs8_der(der).map_err(|e| e.to_string())
    }
    .map_err(|e| format!("not an RSA or Ed25519 private key ({e})"))?;
    let bits = rsa::traits::PublicKeyParts::size(&parsed) * 8;
    if bits < MIN_RSA_BITS {
        return Err(format!(
            "an RSA key of {bits} bits; at least {MIN_RSA_BITS} are needed (make one with \
             `postern dkim keygen`)"
        ));
    }
    let public = parsed
        .to_public_key()
        .to_public_key_der()
        .map_err(|e| e.to_string())?
        .into_vec();
    let der_key = if pkcs1 {
        PrivateKeyDer::Pkcs1(der.to_vec().into())
    } else {
        PrivateKeyDer::Pkcs8(der.to_vec().into())
    };
    let private = RsaKey::<Sha256>::from_key_der(der_key).map_err(|e| e.to_string())?;
    Ok(Key {
        algorithm: Algorithm::Rsa,
        private: Private::Rsa(private),
        public,
        bits,
    })
}

/// A new key: its PEM (PKCS#8) and the loaded form.
pub fn generate(algorithm: Algorithm, bits: usize) -> Result<(String, Key), String> {
    let pem = match algorithm {
        Algorithm::Ed25519 => {
            let der = Ed25519Key::generate_pkcs8().map_err(|e| e.to_string())?;
            pem_encode("PRIVATE KEY", &der)
        }
        Algorithm::Rsa => {
            if !(MIN_RSA_BITS..=8192).contains(&bits) {
                return Err(format!(
                    "RSA keys of {MIN_RSA_BITS} to 8192 bits only (asked for {bits})"
                ));
            }
            let key = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, bits)
                .map_err(|e| e.to_string())?;
            let der = key.to_pkcs8_der().map_err(|e| e.to_string())?;
            pem_encode("PRIVATE KEY", der.as_bytes())
        }
    };
    let key = parse_pem(pem.as_bytes())?;
    Ok((pem, key))
}

/// RFC 7468 textual encoding: base64 in lines of 64.
fn pem_encode(label: &str, der: &[u8]) -> String {
    let b64 = BASE64.encode(der);
    let mut out = format!("-----BEGIN {label}-----\n");
    for line in b64.as_bytes().chunks(64) {
        out.push_str(std::str::from_utf8(line).unwrap_or_default());
        out.push('\n');
    }
    out.push_str(&format!("-----END {label}-----\n"));
    out
}

/// The key record's text: `v=DKIM1; k=rsa; p=...` (RFC 6376 3.6.1).
pub fn record_text(key: &Key) -> String {
    format!(
        "v=DKIM1; k={}; p={}",
        key.algorithm.key_type(),
        BASE64.encode(&key.public)
    )
}

/// The zone-file line to publish: `SELECTOR._domainkey.DOMAIN. IN TXT "..."`, the text
/// split into strings of at most 255 octets (RFC 1035 3.3.14; RFC 6376 3.6.2.2 joins them).
pub fn zone_line(domain: &str, selector: &str, key: &Key) -> String {
    let text = record_text(key);
    let strings: Vec<String> = text
        .as_bytes()
        .chunks(255)
        .map(|c| format!("\"{}\"", String::from_utf8_lossy(c)))
        .collect();
    format!(
        "{selector}._domainkey.{domain}. IN TXT {}",
        strings.join(" ")
    )
}

/// How a published key record compares with our key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    /// A record whose `p=` is our public key.
    Matches,
    /// No DKIM key record (no TXT, or none with `p=`).
    Missing,
    /// A record with another key (or a revoked, empty `p=`): the reason.
    Mismatch(String),
}

/// Compares the TXT strings at `SELECTOR._domainkey.DOMAIN` with `key` (RFC 6376 3.6.1
/// tags; an RSA key published as a bare PKCS#1 RSAPublicKey counts too, as verifiers
/// take both).
pub fn compare(records: &[String], key: &Key) -> Published {
    let mut seen_other = None;
    for record in records {
        let tags = tags(record);
        let Some(p) = tags.iter().find(|(k, _)| *k == "p").map(|(_, v)| v) else {
            continue;
        };
        let p: String = p.chars().filter(|c| !c.is_whitespace()).collect();
        if p.is_empty() {
            seen_other = Some("the record's p= is empty (the key is revoked)".to_string());
            continue;
        }
        let Ok(public) = BASE64.decode(p.as_bytes()) else {
            seen_other = Some("the record's p= is not base64".to_string());
            continue;
        };
        let k = tags
            .iter()
            .find(|(k, _)| *k == "k")
            .map_or("rsa", |(_, v)| v.as_str());
        if k != key.algorithm.key_type() {
            seen_other = Some(format!(
                "the record is for k={k}, the key is {}",
                key.algorithm.key_type()
            ));
            continue;
        }
        if public == key.public || rsa_spki_tail(&key.public) == Some(public.as_slice()) {
            return Published::Matches;
        }
        seen_other = Some("the record holds another public key".to_string());
    }
    match seen_other {
        Some(why) => Published::Mismatch(why),
        None => Published::Missing,
    }
}

/// The PKCS#1 RSAPublicKey inside an RSA SubjectPublicKeyInfo, if it is one: the BIT
/// STRING's content after its unused-bits octet.
fn rsa_spki_tail(spki: &[u8]) -> Option<&[u8]> {
    // The algorithm identifier of rsaEncryption (1.2.840.113549.1.1.1) with NULL params.
    const ALG: &[u8] = &[
        0x30, 0x0d, 0x06, 0x09, 0x2a, 0x86, 0x48, 0x86, 0xf7, 0x0d, 0x01, 0x01, 0x01, 0x05, 0x00,
    ];
    let at = spki.windows(ALG.len()).position(|w| w == ALG)? + ALG.len();
    let rest = spki.get(at..)?;
    // BIT STRING, long-form length of one or two octets, then the unused-bits octet 0.
    match rest {
        [0x03, 0x81, _, 0x00, body @ ..] | [0x03, 0x82, _, _, 0x00, body @ ..] => Some(body),
        _ => None,
    }
}

/// `tag=value` pairs of a DKIM record (RFC 6376 3.2), names lower case, values trimmed.
fn tags(record: &str) -> Vec<(String, String)> {
    record
        .split(';')
        .filter_map(|t| {
            let (k, v) = t.split_once('=')?;
            Some((k.trim().to_ascii_lowercase(), v.trim().to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ed25519_keys_round_trip_and_publish_the_bare_key() {
        let (pem, key) = generate(Algorithm::Ed25519, 0).unwrap();
        assert!(pem.starts_with("-----BEGIN PRIVATE KEY-----\n"));
        assert_eq!(key.algorithm, Algorithm::Ed25519);
        assert_eq!(key.public.len(), 32);
        let again = parse_pem(pem.as_bytes()).unwrap();
        assert_eq!(again.public, key.public);
        let line = zone_line("example.com", "s1", &key);
        assert!(line.starts_with("s1._domainkey.example.com. IN TXT \"v=DKIM1; k=ed25519; p="));
        assert_eq!(compare(&[record_text(&key)], &key), Published::Matches);
    }

    #[test]
    fn rsa_keys_publish_spki_in_255_octet_strings() {
        let (pem, key) = generate(Algorithm::Rsa, 2048).unwrap();
        assert_eq!(key.bits, 2048);
        assert_eq!(parse_pem(pem.as_bytes()).unwrap().public, key.public);
        // SubjectPublicKeyInfo, as `openssl rsa -pubout` writes it.
        assert_eq!(&key.public[..4], &[0x30, 0x82, 0x01, 0x22]);
        let line = zone_line("example.com", "s1", &key);
        let strings: Vec<&str> = line.split('"').skip(1).step_by(2).collect();
        assert!(strings.len() >= 2, "{line}");
        assert!(strings.iter().all(|s| s.len() <= 255));
        assert_eq!(strings.concat(), record_text(&key));
        // Published as the bare PKCS#1 key: the same key.
        let pkcs1 = rsa_spki_tail(&key.public).unwrap();
        let bare = format!("v=DKIM1; p={}", BASE64.encode(pkcs1));
        assert_eq!(compare(&[bare], &key), Published::Matches);
    }

    #[test]
    fn compare_names_missing_and_mismatched_records() {
        let (_, key) = generate(Algorithm::Ed25519, 0).unwrap();
        let (_, other) = generate(Algorithm::Ed25519, 0).unwrap();
        assert_eq!(compare(&[], &key), Published::Missing);
        assert_eq!(
            compare(&["v=spf1 -all".to_string()], &key),
            Published::Missing
        );
        assert!(matches!(
            compare(&[record_text(&other)], &key),
            Published::Mismatch(_)
        ));
        assert!(matches!(
            compare(&["v=DKIM1; k=ed25519; p=".to_string()], &key),
            Published::Mismatch(w) if w.contains("revoked")
        ));
    }

    #[test]
    fn bad_keys_are_refused_with_a_reason() {
        let err = |pem: &[u8]| parse_pem(pem).err().expect("refused");
        assert!(err(b"not a key").contains("no PEM private key"));
        let small = rsa::RsaPrivateKey::new(&mut rsa::rand_core::OsRng, 1024).unwrap();
        let pem = small.to_pkcs8_pem(rsa::pkcs8::LineEnding::LF).unwrap();
        let why = err(pem.as_bytes());
        assert!(why.contains("1024 bits"), "{why}");
    }
}
