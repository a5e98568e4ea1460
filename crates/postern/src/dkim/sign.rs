//! Signing accepted mail (RFC 6376 5, RFC 8463): every `[[dkim]]` whose domain is the
//! domain of the message's `From:` (or a parent of it, with `subdomains`) adds one
//! `DKIM-Signature:`, relaxed/relaxed, over the configured header fields with `From:`
//! signed once more than it appears (RFC 6376 8.15: no `From:` can be added later).
//!
//! Signing happens once, when the message is accepted from a trusted or authenticated
//! client, on the bytes that are then stored and sent unchanged (our own delivery only
//! dot-stuffs on the wire, which the next hop undoes), so the signature survives.

use mail_auth::common::crypto::{Ed25519Key, RsaKey, Sha256, SigningKey};
use mail_auth::common::headers::HeaderWriter;
use mail_auth::dkim::{Canonicalization, DkimSigner, Done};
use mail_parser::{HeaderName, MessageParser};

use super::key::{self, Algorithm, Key, Private};
use crate::config::DkimSigning;

/// One `[[dkim]]`, ready to sign.
struct Signing {
    domain: String,
    selector: String,
    subdomains: bool,
    algorithm: Algorithm,
    bits: usize,
    signer: KeySigner,
}

/// mail-auth's signer, which owns its key, for each kind of key.
enum KeySigner {
    Rsa(DkimSigner<RsaKey<Sha256>, Done>),
    Ed25519(DkimSigner<Ed25519Key, Done>),
}

/// Every signing key of the configuration; empty when there is none.
#[derive(Default)]
pub struct Signer {
    keys: Vec<Signing>,
}

/// One signature made.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Made {
    pub domain: String,
    pub selector: String,
    pub algorithm: Algorithm,
}

/// What signing one message did.
#[derive(Debug, Default)]
pub struct Signed {
    /// The `DKIM-Signature:` fields to put in front of the message, CRLF-terminated.
    pub fields: String,
    /// Each signature made.
    pub made: Vec<Made>,
    /// The message's `From:` names a signing domain but could not be used: why.
    pub failed: Option<String>,
    /// A key that should have signed failed to (a fault of ours): why. The message is
    /// then not taken (451): relayed mail does not leave half-signed.
    pub error: Option<String>,
}

impl Signer {
    /// Loads every key; the error names the key file and what is wrong with it.
    pub fn new(config: &[DkimSigning]) -> Result<Signer, String> {
        let mut keys = Vec::new();
        for d in config {
            let Key {
                algorithm,
                private,
                bits,
                ..
            } = key::load(&d.key)?;
            // From once more than it appears (see `canonicalize` in mail-auth: a name
            // listed twice is signed for every instance, then once as absent).
            let mut headers = d.headers.clone();
            headers.push("From".to_string());
            let expire = d.expire.map_or(0, |x| x.as_secs());
            let signer = match private {
                Private::Rsa(k) => KeySigner::Rsa(template(k, d, &headers, expire)),
                Private::Ed25519(k) => KeySigner::Ed25519(template(k, d, &headers, expire)),
            };
            keys.push(Signing {
                domain: d.domain.clone(),
                selector: d.selector.clone(),
                subdomains: d.subdomains,
                algorithm,
                bits,
                signer,
            });
        }
        Ok(Signer { keys })
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Signs `message` (header and body, CRLF lines, not dot-stuffed) with every key for
    /// its `From:` domain. CPU-bound (an RSA-2048 signature is about a millisecond): run
    /// it off the executor.
    pub fn sign(&self, message: &[u8]) -> Signed {
        let mut signed = Signed::default();
        if self.keys.is_empty() {
            return signed;
        }
        let from = match from_domain(message) {
            Ok(d) => d,
            Err(why) => {
                // Not ours to sign unless the field names one of our domains; a message
                // whose From: cannot be read at all is reported only if it mentions one.
                if let Some(ours) = self.keys.iter().find(|k| mentions(message, &k.domain)) {
                    signed.failed = Some(format!("{why} (mentions {})", ours.domain));
                }
                return signed;
            }
        };
        for k in self.keys.iter().filter(|k| k.covers(&from)) {
            match k.signature(message) {
                Ok(field) => {
                    signed.fields.push_str(&field);
                    signed.made.push(Made {
                        domain: k.domain.clone(),
                        selector: k.selector.clone(),
                        algorithm: k.algorithm,
                    });
                }
                Err(e) => {
                    signed.error = Some(format!(
                        "signing with {} s={} failed: {e}",
                        k.domain, k.selector
                    ));
                }
            }
        }
        signed
    }

    /// `domain s=selector a=algorithm (bits)` per key, for check-config.
    pub fn describe(&self) -> Vec<String> {
        self.keys
            .iter()
            .map(|k| {
                format!(
                    "{}{} s={} {} ({} bits)",
                    k.domain,
                    if k.subdomains { " and subdomains" } else { "" },
                    k.selector,
                    k.algorithm.signature_name(),
                    k.bits
                )
            })
            .collect()
    }
}

impl Signing {
    fn covers(&self, from: &str) -> bool {
        from == self.domain
            || (self.subdomains
                && from
                    .strip_suffix(&self.domain)
                    .is_some_and(|head| head.ends_with('.')))
    }

    /// One `DKIM-Signature:` field, folded, CRLF-terminated.
    fn signature(&self, message: &[u8]) -> Result<String, String> {
        let signature = match &self.signer {
            KeySigner::Rsa(s) => s.sign(message),
            KeySigner::Ed25519(s) => s.sign(message),
        }
        .map_err(|e| e.to_string())?;
        let mut field = signature.to_header();
        if !field.ends_with("\r\n") {
            field.push_str("\r\n");
        }
        Ok(field)
    }
}

/// The signer for one `[[dkim]]`: relaxed/relaxed (RFC 6376 3.4), `x=` when `expire`.
fn template<T: SigningKey>(
    key: T,
    d: &DkimSigning,
    headers: &[String],
    expire: u64,
) -> DkimSigner<T, Done> {
    let s = DkimSigner::from_key(key)
        .domain(d.domain.clone())
        .selector(d.selector.clone())
        .headers(headers.iter().cloned())
        .header_canonicalization(Canonicalization::Relaxed)
        .body_canonicalization(Canonicalization::Relaxed);
    if expire > 0 { s.expiration(expire) } else { s }
}

/// The domain of the message's one `From:` field (RFC 5322 3.6.2), lower case, A-labels;
/// every mailbox it lists must be in that domain (RFC 7489 6.6.1 takes a field with
/// several domains as unusable, so does signing).
pub(crate) fn from_domain(message: &[u8]) -> Result<String, String> {
    let parsed = MessageParser::new()
        .parse_headers(message)
        .ok_or("the header cannot be parsed")?;
    let mut fields = parsed.header_values(HeaderName::From);
    let (Some(field), None) = (fields.next(), fields.next()) else {
        return Err("the message has no From: field, or more than one".to_string());
    };
    let address = field
        .as_address()
        .ok_or("the From: field holds no address")?;
    let mut domain: Option<String> = None;
    for addr in address.iter() {
        let Some(a) = addr.address.as_deref() else {
            continue;
        };
        let Some((_, d)) = a.rsplit_once('@') else {
            return Err(format!("From: <{a}> has no domain"));
        };
        let d = postern_smtp::address::ascii_domain(d.trim_end_matches('.')).into_owned();
        match &domain {
            None => domain = Some(d),
            Some(first) if *first == d => {}
            Some(first) => {
                return Err(format!("From: names two domains, {first} and {d}"));
            }
        }
    }
    domain.ok_or_else(|| "the From: field holds no address".to_string())
}

/// Whether the header section mentions `domain` at all (to report a From: we could not
/// read that may have been ours).
fn mentions(message: &[u8], domain: &str) -> bool {
    let end = memchr::memmem::find(message, b"\r\n\r\n").unwrap_or(message.len());
    let head = String::from_utf8_lossy(&message[..end]).to_ascii_lowercase();
    head.contains(&format!("@{domain}"))
}
