//! Stage one: the configuration file exactly as written.
//!
//! These structs mirror the TOML, one field per key, and check nothing beyond TOML types and
//! key names (`deny_unknown_fields` turns a misspelt key into an error instead of a silently
//! ignored setting). Every value that stage two validates is kept `Spanned`, so a bad value
//! can be reported at its own line and column rather than at its section.
//!
//! Strings that need parsing (durations, sizes, addresses, networks) stay strings here: the
//! validator produces better messages than a serde error would.

use serde::Deserialize;
use toml::Spanned;

/// A spanned value; shorter to read in the field lists below.
pub(crate) type S<T> = Spanned<T>;

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawConfig {
    pub hostname: Option<S<String>>,
    pub spool_dir: Option<S<String>>,
    pub max_message_size: Option<S<RawSize>>,
    pub max_recipients: Option<S<i64>>,
    pub command_timeout: Option<S<String>>,
    pub max_errors: Option<S<i64>>,
    pub ipv6_prefix: Option<S<i64>>,
    pub max_hops: Option<S<i64>>,
    pub max_junk_commands: Option<S<i64>>,
    pub data_timeout: Option<S<String>>,
    pub max_message_memory: Option<S<RawSize>>,
    pub postmaster: Option<S<String>>,
    pub own_addresses: Option<Vec<S<String>>>,
    pub log_format: Option<S<RawLogFormat>>,
    pub user: Option<S<String>>,
    pub group: Option<S<String>>,
    pub allow_root: Option<S<bool>>,
    #[serde(default)]
    pub listener: Vec<S<RawListener>>,
    pub tls: Option<S<RawTls>>,
    pub relay: Option<RawRelay>,
    pub auth: Option<S<RawAuth>>,
    #[serde(default)]
    pub route: Vec<S<RawRoute>>,
    pub delivery: Option<RawDelivery>,
    #[serde(default)]
    pub filter: Vec<S<RawFilter>>,
    #[serde(default)]
    pub dkim: Vec<S<RawDkim>>,
    #[serde(default)]
    pub milter: Vec<S<RawMilter>>,
    pub authentication: Option<S<RawAuthentication>>,
    pub metrics: Option<S<RawMetrics>>,
    #[serde(default)]
    pub rate_limit: Vec<S<RawRateLimit>>,
    pub cluster: Option<S<RawCluster>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawListener {
    pub address: S<String>,
    pub tls: Option<S<RawTlsMode>>,
    pub require_tls: Option<S<bool>>,
    pub auth: Option<S<RawAuthMode>>,
    pub allow_plaintext_auth: Option<S<bool>>,
    pub max_connections: Option<S<i64>>,
    pub per_ip_connections: Option<S<i64>>,
    pub proxy_protocol: Option<S<bool>>,
    pub proxy_from: Option<S<Vec<S<String>>>>,
    pub connection_rate: Option<S<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawLogFormat {
    Text,
    Json,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawTlsMode {
    None,
    StartTls,
    Implicit,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawAuthMode {
    None,
    Optional,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawTls {
    pub cert: S<String>,
    pub key: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRelay {
    pub accepted_domains: Option<Vec<S<String>>>,
    pub trusted_networks: Option<Vec<S<String>>>,
    pub authenticated_relay: Option<bool>,
    pub open_relay: Option<bool>,
    pub recipients_file: Option<S<String>>,
    pub dnsbl: Option<Vec<S<String>>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuth {
    pub users_file: Option<S<String>>,
    pub mechanisms: Option<S<Vec<S<String>>>>,
    pub max_failures: Option<S<i64>>,
    pub failure_window: Option<S<String>>,
    pub lockout: Option<S<String>>,
    pub per_user_lockout: Option<bool>,
    pub restrict_senders: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRoute {
    pub domains: S<Vec<S<String>>>,
    pub next_hop: S<String>,
    pub tls: Option<S<RawRouteTls>>,
    pub ca_file: Option<S<String>>,
    pub auth_user: Option<S<String>>,
    pub auth_password_file: Option<S<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawRouteTls {
    None,
    Opportunistic,
    Required,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDelivery {
    pub dns_servers: Option<Vec<S<String>>>,
    pub mx_port: Option<S<i64>>,
    pub retry_schedule: Option<S<Vec<S<String>>>>,
    pub max_queue_lifetime: Option<S<String>>,
    pub max_concurrency: Option<S<i64>>,
    pub per_domain_concurrency: Option<S<i64>>,
    pub max_mx_addresses: Option<S<i64>>,
    pub max_mx_sessions: Option<S<i64>>,
    pub connect_timeout: Option<S<String>>,
    pub resolve_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawFilter {
    pub name: S<String>,
    pub attachments: Option<Vec<S<String>>>,
    pub keywords: Option<Vec<S<String>>>,
    pub senders: Option<Vec<S<String>>>,
    pub action: S<RawFilterAction>,
    pub redirect_to: Option<S<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawFilterAction {
    Reject,
    Discard,
    Quarantine,
    Redirect,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawDkim {
    pub domain: S<String>,
    pub selector: S<String>,
    pub key: S<String>,
    pub subdomains: Option<S<bool>>,
    pub headers: Option<Vec<S<String>>>,
    pub expire: Option<S<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMilter {
    pub name: S<String>,
    pub address: S<String>,
    pub clients: Option<S<RawMilterClients>>,
    pub connect_timeout: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub on_failure: Option<S<RawOnFailure>>,
    pub pool_size: Option<S<i64>>,
    pub pool_idle_timeout: Option<S<String>>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawMilterClients {
    Any,
    Untrusted,
    Relayed,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawOnFailure {
    Tempfail,
    Accept,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawRateLimit {
    pub name: S<String>,
    pub clients: Option<S<RawRateClients>>,
    pub per: S<RawRateKey>,
    pub messages: Option<S<i64>>,
    pub recipients: Option<S<i64>>,
    pub window: S<String>,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "lowercase")]
pub(crate) enum RawRateClients {
    Authenticated,
    Trusted,
    Untrusted,
    Any,
}

#[derive(Debug, Deserialize, Clone, Copy, PartialEq, Eq)]
#[serde(rename_all = "snake_case")]
pub(crate) enum RawRateKey {
    User,
    ClientIp,
    Sender,
    SenderDomain,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawAuthentication {
    pub spf: Option<S<bool>>,
    pub dkim: Option<S<bool>>,
    pub dmarc: Option<S<bool>>,
    pub dmarc_enforce: Option<S<bool>>,
    pub spf_reject: Option<S<bool>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawMetrics {
    pub address: S<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub(crate) struct RawCluster {
    pub redis: S<String>,
    pub node: Option<S<String>>,
    pub timeout: Option<S<String>>,
    pub ca_file: Option<S<String>>,
    pub cert_file: Option<S<String>>,
    pub key_file: Option<S<String>>,
    pub sentinels: Option<Vec<S<String>>>,
    pub sentinel_password: Option<S<String>>,
}

/// `max_message_size` is either a TOML integer (bytes) or a string with a unit.
#[derive(Debug)]
pub(crate) enum RawSize {
    Bytes(i64),
    Text(String),
}

impl<'de> Deserialize<'de> for RawSize {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct Visitor;
        impl serde::de::Visitor<'_> for Visitor {
            type Value = RawSize;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a size like \"25MB\" or a number of bytes")
            }
            fn visit_i64<E: serde::de::Error>(self, v: i64) -> Result<RawSize, E> {
                Ok(RawSize::Bytes(v))
            }
            fn visit_u64<E: serde::de::Error>(self, v: u64) -> Result<RawSize, E> {
                // TOML integers are i64, so this only guards against a future deserializer.
                i64::try_from(v)
                    .map(RawSize::Bytes)
                    .map_err(|_| E::custom("size is too large"))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<RawSize, E> {
                Ok(RawSize::Text(v.to_string()))
            }
        }
        deserializer.deserialize_any(Visitor)
    }
}
