//! Configuration this build accepts as valid but cannot act on yet.
//!
//! The file format is the full v1 contract (`docs/configuration.md`), so a configuration
//! written today keeps working as features land. Until then `postern serve` refuses to start
//! rather than run without a filter, TLS or AUTH the operator asked for: a relay that
//! silently skips a security setting is worse than one that does not start.
//!
//! This is the one place to shrink as features are implemented; keep
//! "Not yet available in this version" in `docs/configuration.md` in step with it.

use super::{AuthMode, Config, TlsMode};

pub(crate) fn unsupported_features(c: &Config) -> Vec<String> {
    let mut out = Vec::new();

    for l in &c.listeners {
        if l.tls != TlsMode::None {
            out.push(format!(
                "listener {}: tls = \"{}\" is not available in this version (only \"none\")",
                l.address,
                match l.tls {
                    TlsMode::StartTls => "starttls",
                    TlsMode::Implicit => "implicit",
                    TlsMode::None => "none",
                }
            ));
        }
        if l.auth != AuthMode::None {
            out.push(format!(
                "listener {}: auth = \"{}\" is not available in this version (only \"none\")",
                l.address,
                match l.auth {
                    AuthMode::Optional => "optional",
                    AuthMode::Required => "required",
                    AuthMode::None => "none",
                }
            ));
        }
    }
    if c.tls.is_some() {
        out.push("[tls]: server TLS certificates are not available in this version".into());
    }
    if c.auth.users_file.is_some() {
        out.push("[auth] users_file: SMTP AUTH is not available in this version".into());
    }
    if !c.relay.dnsbl.is_empty() {
        out.push("relay.dnsbl: DNS blocklists are not available in this version".into());
    }
    for f in &c.filters {
        out.push(format!(
            "[[filter]] `{}`: message filters are not available in this version",
            f.name
        ));
    }
    if c.metrics.is_some() {
        out.push("[metrics]: the metrics endpoint is not available in this version".into());
    }
    out
}
