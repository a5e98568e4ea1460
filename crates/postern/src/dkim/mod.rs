//! DKIM (RFC 6376, RFC 8463 for Ed25519): the keys ([`key`]: load, make, publish, compare
//! with DNS) and signing accepted mail ([`sign`]). The cryptography and canonicalisation
//! are mail-auth's; what is signed, when, and with which key is decided here.

pub mod key;
pub mod sign;

pub use sign::{Made, Signed, Signer};

use std::fmt::Write as _;

use crate::config::Config;

/// `postern dkim check`: one line per `[[dkim]]` key, `published`, `missing`,
/// `mismatch (why)` or `error (why)`; true when every key is published.
pub async fn check(config: &Config) -> (String, bool) {
    let mut out = String::new();
    if config.dkim.is_empty() {
        return ("no [[dkim]] keys configured\n".to_string(), true);
    }
    let resolver = match crate::dns::Resolver::new(&config.delivery.dns_servers) {
        Ok(r) => r,
        Err(e) => return (format!("cannot set up DNS: {e}\n"), false),
    };
    let mut all = true;
    for d in &config.dkim {
        let name = format!("{}._domainkey.{}", d.selector, d.domain);
        let state = match key::load(&d.key) {
            Err(e) => format!("error ({e})"),
            Ok(k) => match resolver.txt(&name).await {
                Ok(records) => match key::compare(&records, &k) {
                    key::Published::Matches => "published".to_string(),
                    key::Published::Missing => "missing".to_string(),
                    key::Published::Mismatch(why) => format!("mismatch ({why})"),
                },
                Err(
                    crate::dns::ResolveError::NoSuchDomain | crate::dns::ResolveError::NoAddress,
                ) => "missing".to_string(),
                Err(e) => format!("error ({e})"),
            },
        };
        all &= state == "published";
        let _ = writeln!(out, "{name}: {state}");
    }
    (out, all)
}
