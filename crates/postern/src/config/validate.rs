//! Stage two: turn the raw file into a [`Config`], or explain, at a line, why not.
//!
//! Every default lives here as a constant, every rule as a few lines in the order the keys
//! appear in the file, so the first error reported is the first one an operator reading
//! top-down would hit. Validation stops at the first error: a relay configuration is short,
//! and one precise message beats a cascade of consequences.

use std::collections::HashMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

use ipnet::IpNet;

use super::error::ConfigError;
use super::raw::{
    RawAuth, RawAuthMode, RawAuthentication, RawCluster, RawConfig, RawDelivery, RawDkim,
    RawFilter, RawFilterAction, RawListener, RawLogFormat, RawMilter, RawMilterClients,
    RawOnFailure, RawRateClients, RawRateKey, RawRateLimit, RawRelay, RawRoute, RawRouteTls,
    RawSize, RawTls, RawTlsMode, S,
};
use super::units::{format_size, parse_duration, parse_size};
use super::{
    Auth, AuthMode, Authentication, Cluster, Config, DKIM_HEADERS, Delivery, DkimSigning, Filter,
    FilterAction, Listener, LogFormat, Mechanism, Metrics, Milter, MilterAddress, MilterClients,
    NextHop, OnFailure, Privileges, Rate, RateClients, RateKey, RateLimit, Relay, Route, RouteTls,
    Tls, TlsMode,
};

pub(crate) const DEFAULT_SPOOL_DIR: &str = "./postern-spool";
pub(crate) const DEFAULT_MAX_MESSAGE_SIZE: u64 = 25 << 20;
pub(crate) const DEFAULT_MAX_RECIPIENTS: usize = 100;
pub(crate) const DEFAULT_COMMAND_TIMEOUT: Duration = Duration::from_secs(5 * 60);
pub(crate) const DEFAULT_MAX_ERRORS: u32 = 20;
pub(crate) const DEFAULT_DATA_TIMEOUT: Duration = Duration::from_secs(10 * 60);
pub(crate) const DEFAULT_MAX_MESSAGE_MEMORY: u64 = 512 << 20;
pub(crate) const DEFAULT_MAX_CONNECTIONS: usize = 1000;
pub(crate) const DEFAULT_PER_IP_CONNECTIONS: usize = 20;
pub(crate) const DEFAULT_MAX_FAILURES: u32 = 5;
pub(crate) const DEFAULT_FAILURE_WINDOW: Duration = Duration::from_secs(10 * 60);
pub(crate) const DEFAULT_LOCKOUT: Duration = Duration::from_secs(15 * 60);
pub(crate) const DEFAULT_MX_PORT: u16 = 25;
/// `[cluster] timeout`: the most mail ever waits on Redis (interface: "Rate limits and
/// shared state"), and the most it may be set to.
pub(crate) const DEFAULT_CLUSTER_TIMEOUT: Duration = Duration::from_millis(200);
const MAX_CLUSTER_TIMEOUT: Duration = Duration::from_secs(5);
pub(crate) const DEFAULT_MAX_QUEUE_LIFETIME: Duration = Duration::from_secs(5 * 86_400);
pub(crate) const DEFAULT_MAX_CONCURRENCY: usize = 100;
pub(crate) const DEFAULT_PER_DOMAIN_CONCURRENCY: usize = 10;
/// Postfix's smtp_mx_address_limit and smtp_mx_session_limit.
pub(crate) const DEFAULT_MAX_MX_ADDRESSES: usize = 5;
pub(crate) const DEFAULT_MAX_MX_SESSIONS: usize = 2;
/// Shorter than RFC 5321's suggestion for commands: a dead address must not hold an
/// attempt (and its slots) for long, and a live server answers a SYN in well under 10 s.
pub(crate) const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
pub(crate) const DEFAULT_RESOLVE_TIMEOUT: Duration = Duration::from_secs(30);
/// More would defeat the point of the caps (DNS and connection amplification).
const MAX_MX_LIMIT: i64 = 100;
/// Below this a message cannot even hold its headers; a smaller value is surely a typo.
pub(crate) const MIN_MESSAGE_SIZE: u64 = 1 << 10;

pub(crate) fn default_retry_schedule() -> Vec<Duration> {
    [60, 5 * 60, 15 * 60, 3600, 4 * 3600]
        .into_iter()
        .map(Duration::from_secs)
        .collect()
}

pub(crate) fn default_trusted_networks() -> Vec<IpNet> {
    ["127.0.0.0/8", "::1/128"]
        .into_iter()
        .map(|n| n.parse().expect("literal networks are valid"))
        .collect()
}

/// The system host name if it is a usable domain name, else "localhost": a host name
/// with, say, an underscore must not end up in our EHLO.
pub(crate) fn default_hostname() -> String {
    let name = gethostname::gethostname();
    name.to_str()
        .and_then(|name| normalize_hostname(name).ok())
        .unwrap_or_else(|| "localhost".to_string())
}

/// Validate a domain name. Returns it in lower case without a trailing dot, in A-label
/// form. The grammar is the wire parser's (`postern_smtp::address::parse_domain`, RFC 5321
/// 4.1.2 with RFC 6531 U-labels): one definition of a domain for the file and the
/// network, so nothing configured can fail to match what a client may send.
pub(crate) fn normalize_domain(name: &str) -> Result<String, String> {
    let lower = postern_smtp::address::parse_domain(name).map_err(|_| explain_bad_domain(name))?;
    // An all-numeric last label means an IP address was written where a name belongs;
    // no top-level domain is numeric, and accepting it would let "10.0.0.5" pass as a domain.
    if lower
        .rsplit('.')
        .next()
        .is_some_and(|tld| tld.chars().all(|c| c.is_ascii_digit()))
    {
        return Err("looks like an IP address".to_string());
    }
    // One canonical form for every comparison with what clients send: A-labels
    // (IDNA, UTS 46), so `bücher.example` in the file matches `xn--bcher-kva.example`
    // on the wire and the other way round.
    match idna::domain_to_ascii(&lower) {
        Ok(ascii) if !ascii.is_empty() => Ok(ascii),
        _ => Err("is not a valid internationalised domain name (IDNA)".to_string()),
    }
}

/// Why the wire parser refused `name`, in words for the configuration's error message.
fn explain_bad_domain(name: &str) -> String {
    let trimmed = name.strip_suffix('.').unwrap_or(name);
    if trimmed.is_empty() {
        return "empty domain name".to_string();
    }
    if trimmed.len() > postern_smtp::address::MAX_DOMAIN {
        return "longer than 255 characters".to_string();
    }
    for label in trimmed.split('.') {
        if label.is_empty() {
            return "empty label (leading dot or two dots in a row)".to_string();
        }
        if label.len() > 63 {
            return format!("label `{label}` is longer than 63 octets");
        }
        if let Some(c) = label
            .chars()
            .find(|&c| !(c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii()))
        {
            return format!("`{c}` is not allowed (letters, digits, hyphens and dots only)");
        }
        if label.starts_with('-') || label.ends_with('-') {
            return format!("label `{label}` starts or ends with a hyphen");
        }
    }
    "not of the RFC 5321 domain grammar".to_string()
}

/// A domain name that goes on the wire before any SMTPUTF8 negotiation: ASCII only.
fn normalize_hostname(name: &str) -> Result<String, String> {
    if !name.is_ascii() {
        return Err("must be ASCII (write an internationalised name in its xn-- form)".into());
    }
    normalize_domain(name)
}

/// Parse a route's `next_hop`.
pub(crate) fn parse_next_hop(s: &str) -> Result<NextHop, String> {
    const EXPECTED: &str = "expected \"mx\", \"host:port\", \"[ip]:port\" or \"[ipv6]:port\"";
    let t = s.trim();
    if t.eq_ignore_ascii_case("mx") {
        return Ok(NextHop::Mx);
    }
    if let Some(rest) = t.strip_prefix('[') {
        let Some((ip, port)) = rest.split_once("]:") else {
            return Err(format!("`{s}`: missing `]:port` ({EXPECTED})"));
        };
        let ip: IpAddr = ip
            .parse()
            .map_err(|_| format!("`{ip}` is not an IP address ({EXPECTED})"))?;
        return Ok(NextHop::Ip(SocketAddr::new(ip, parse_port(port, s)?)));
    }
    let Some((host, port)) = t.rsplit_once(':') else {
        return Err(format!("`{s}` has no port ({EXPECTED})"));
    };
    if host.contains(':') {
        return Err(format!(
            "`{s}`: an IPv6 address must be in brackets, like [2001:db8::1]:25"
        ));
    }
    let port = parse_port(port, s)?;
    // A literal IPv4 host is an address, not a name to resolve.
    if let Ok(ip) = host.parse::<Ipv4Addr>() {
        return Ok(NextHop::Ip(SocketAddr::new(ip.into(), port)));
    }
    let host = normalize_hostname(host)
        .map_err(|e| format!("`{host}` is not a host name: {e} ({EXPECTED})"))?;
    Ok(NextHop::Host { host, port })
}

fn parse_port(port: &str, whole: &str) -> Result<u16, String> {
    match port.parse::<u16>() {
        Ok(0) | Err(_) => Err(format!("`{whole}`: `{port}` is not a port (1-65535)")),
        Ok(port) => Ok(port),
    }
}

/// A trusted network: CIDR, or a bare address meaning that one host.
pub(crate) fn parse_network(s: &str) -> Result<IpNet, String> {
    let t = s.trim();
    if let Ok(net) = t.parse::<IpNet>() {
        // Host bits ("10.1.2.3/8") are dropped: the prefix length says what was meant.
        return Ok(unmapped(net.trunc()));
    }
    if let Ok(ip) = t.parse::<IpAddr>() {
        return Ok(unmapped(IpNet::from(ip)));
    }
    Err(format!(
        "`{s}` is not a network (expected CIDR like 10.0.0.0/8, or an IP address)"
    ))
}

/// An IPv4-mapped IPv6 network (`::ffff:10.0.0.0/104`, RFC 4291 2.5.5.2) as the IPv4
/// network it stands for: clients are compared by their canonical address (a mapped
/// client address is its IPv4 address), so the mapped form would never match.
fn unmapped(net: IpNet) -> IpNet {
    match net {
        IpNet::V6(v6) if v6.prefix_len() >= 96 => match v6.addr().to_ipv4_mapped() {
            Some(v4) => ipnet::Ipv4Net::new(v4, v6.prefix_len() - 96).map_or(net, IpNet::V4),
            None => net,
        },
        _ => net,
    }
}

/// A mailbox `local@domain`, checked loosely: the filter module does the real parsing,
/// this only catches what cannot possibly be an address.
fn check_address(s: &str) -> Result<String, String> {
    let t = s.trim();
    let Some((local, domain)) = t.rsplit_once('@') else {
        return Err(format!("`{s}` is not an address (expected user@domain)"));
    };
    if local.is_empty() || local.chars().any(|c| c.is_whitespace() || c.is_control()) {
        return Err(format!("`{s}` is not an address (expected user@domain)"));
    }
    let domain = normalize_domain(domain).map_err(|e| format!("`{s}`: domain {e}"))?;
    Ok(format!("{local}@{domain}"))
}

/// Holds what every check needs to report an error and resolve a path.
struct Validator<'a> {
    text: &'a str,
    origin: &'a Path,
    /// The config file's directory; relative paths in the file are relative to it.
    base_dir: PathBuf,
}

type Result<T, E = ConfigError> = std::result::Result<T, E>;

impl Validator<'_> {
    fn err<T>(&self, span: std::ops::Range<usize>, key: &str, msg: impl Into<String>) -> Result<T> {
        Err(ConfigError::invalid(self.origin, self.text, span, key, msg))
    }

    /// Apply `parse` to a spanned string, reporting its error at the value.
    fn parse<T>(
        &self,
        value: &S<String>,
        key: &str,
        parse: impl FnOnce(&str) -> std::result::Result<T, String>,
    ) -> Result<T> {
        parse(value.get_ref()).or_else(|msg| self.err(value.span(), key, msg))
    }

    fn resolve(&self, path: &str) -> PathBuf {
        let path = Path::new(path);
        if path.is_absolute() || self.base_dir.as_os_str().is_empty() {
            path.to_path_buf()
        } else {
            // "./spool" next to /etc/postern/postern.toml reads better as
            // /etc/postern/spool than as /etc/postern/./spool.
            self.base_dir.join(path.strip_prefix(".").unwrap_or(path))
        }
    }

    fn path(&self, value: &S<String>, key: &str) -> Result<PathBuf> {
        if value.get_ref().trim().is_empty() {
            return self.err(value.span(), key, "path must not be empty");
        }
        Ok(self.resolve(value.get_ref()))
    }

    fn opt_path(&self, value: Option<&S<String>>, key: &str) -> Result<Option<PathBuf>> {
        value.map(|v| self.path(v, key)).transpose()
    }

    /// A size of at least `min` bytes.
    fn size(&self, value: Option<&S<RawSize>>, key: &str, min: u64, default: u64) -> Result<u64> {
        let Some(size) = value else {
            return Ok(default);
        };
        let bytes = match size.get_ref() {
            RawSize::Bytes(n) => {
                u64::try_from(*n).or_else(|_| self.err(size.span(), key, "must not be negative"))?
            }
            RawSize::Text(s) => parse_size(s).or_else(|e| self.err(size.span(), key, e))?,
        };
        if bytes < min {
            return self.err(
                size.span(),
                key,
                format!(
                    "{bytes} bytes is too small (at least {}; sizes without a unit are bytes)",
                    format_size(min)
                ),
            );
        }
        Ok(bytes)
    }

    /// A duration that must be greater than zero.
    fn duration(
        &self,
        value: Option<&S<String>>,
        key: &str,
        default: Duration,
    ) -> Result<Duration> {
        let Some(value) = value else {
            return Ok(default);
        };
        let d = self.parse(value, key, parse_duration)?;
        if d.is_zero() {
            return self.err(value.span(), key, "must be greater than zero");
        }
        Ok(d)
    }

    /// An integer in `min..=max`, converted to the type the program uses.
    fn int<T: TryFrom<i64>>(
        &self,
        value: Option<&S<i64>>,
        key: &str,
        min: i64,
        max: i64,
        default: T,
    ) -> Result<T> {
        let Some(value) = value else {
            return Ok(default);
        };
        let n = *value.get_ref();
        if n < min {
            return self.err(
                value.span(),
                key,
                format!("must be at least {min} (is {n})"),
            );
        }
        if n > max {
            return self.err(value.span(), key, format!("must be at most {max} (is {n})"));
        }
        match T::try_from(n) {
            Ok(n) => Ok(n),
            Err(_) => self.err(value.span(), key, format!("{n} is too large")),
        }
    }

    fn socket_addr(&self, value: &S<String>, key: &str) -> Result<SocketAddr> {
        self.parse(value, key, |s| {
            s.trim().parse::<SocketAddr>().map_err(|_| {
                format!("`{s}` is not an address (expected IP:port like 0.0.0.0:25 or [::]:25)")
            })
        })
    }

    /// A list of strings that must each be non-empty.
    fn strings(&self, values: Option<&Vec<S<String>>>, key: &str) -> Result<Vec<String>> {
        let mut out = Vec::new();
        for v in values.into_iter().flatten() {
            let t = v.get_ref().trim();
            if t.is_empty() {
                return self.err(v.span(), key, "entries must not be empty");
            }
            out.push(t.to_string());
        }
        Ok(out)
    }
}

/// Usize maximum as the i64 bound for counts; configuration counts never get near it.
const MAX_COUNT: i64 = i64::MAX;

/// The memory budget one message of `size` bytes can need while it is stored: its buffer
/// (the size rounded up to the 1 MiB growth step, plus one 64 KiB read reserved ahead),
/// the spool record's copy and the screener's decoded parts.
fn memory_for(size: u64) -> u64 {
    size.saturating_mul(3).saturating_add(2 << 20)
}

pub(crate) fn validate(raw: RawConfig, text: &str, origin: &Path) -> Result<Config> {
    let v = Validator {
        text,
        origin,
        base_dir: origin.parent().map(Path::to_path_buf).unwrap_or_default(),
    };

    let hostname = match &raw.hostname {
        Some(h) => v.parse(h, "hostname", normalize_hostname)?,
        None => default_hostname(),
    };
    let spool_dir = match &raw.spool_dir {
        Some(p) => v.path(p, "spool_dir")?,
        // The default is relative too, so it follows the same rule as everything else.
        None => v.resolve(DEFAULT_SPOOL_DIR),
    };
    let max_message_size = v.size(
        raw.max_message_size.as_ref(),
        "max_message_size",
        MIN_MESSAGE_SIZE,
        DEFAULT_MAX_MESSAGE_SIZE,
    )?;
    let max_message_memory = v.size(
        raw.max_message_memory.as_ref(),
        "max_message_memory",
        MIN_MESSAGE_SIZE,
        // Unset: room for a largest-size message whatever max_message_size is.
        DEFAULT_MAX_MESSAGE_MEMORY.max(memory_for(max_message_size)),
    )?;
    let max_recipients = v.int(
        raw.max_recipients.as_ref(),
        "max_recipients",
        1,
        MAX_COUNT,
        DEFAULT_MAX_RECIPIENTS,
    )?;
    let command_timeout = v.duration(
        raw.command_timeout.as_ref(),
        "command_timeout",
        DEFAULT_COMMAND_TIMEOUT,
    )?;
    let max_errors = v.int(
        raw.max_errors.as_ref(),
        "max_errors",
        1,
        i64::from(u32::MAX),
        DEFAULT_MAX_ERRORS,
    )?;

    let ipv6_prefix = v.int(
        raw.ipv6_prefix.as_ref(),
        "ipv6_prefix",
        16,
        128,
        crate::policy::DEFAULT_IPV6_PREFIX,
    )?;
    // A message being stored is held up to three times (the body, the spool record, the
    // screener's decoded parts): the budget must fit one message of the largest size.
    if max_message_memory < memory_for(max_message_size)
        && let Some(m) = &raw.max_message_memory
    {
        return v.err(
            m.span(),
            "max_message_memory",
            format!(
                "must be at least 3 x max_message_size + 2MB ({}): storing a message of \
                 the largest size needs that much",
                format_size(memory_for(max_message_size))
            ),
        );
    }
    let max_hops = v.int(
        raw.max_hops.as_ref(),
        "max_hops",
        1,
        1000,
        postern_smtp::server::DEFAULT_MAX_HOPS,
    )?;
    let max_junk_commands = v.int(
        raw.max_junk_commands.as_ref(),
        "max_junk_commands",
        0,
        i64::from(u32::MAX),
        postern_smtp::server::DEFAULT_MAX_JUNK_COMMANDS,
    )?;
    let data_timeout = v.duration(
        raw.data_timeout.as_ref(),
        "data_timeout",
        DEFAULT_DATA_TIMEOUT,
    )?;
    let mut own_addresses = Vec::new();
    for a in raw.own_addresses.iter().flatten() {
        let ip: IpAddr = v.parse(a, "own_addresses", |s| {
            s.trim()
                .parse::<IpAddr>()
                .map_err(|_| format!("`{s}` is not an IP address"))
        })?;
        own_addresses.push(ip.to_canonical());
    }
    let privileges = privileges(&v, &raw)?;
    let postmaster_given = match &raw.postmaster {
        Some(p) => Some(v.parse(p, "postmaster", check_address)?),
        None => None,
    };

    let tls = raw.tls.as_ref().map(|t| tls_section(&v, t)).transpose()?;
    let auth = match &raw.auth {
        Some(a) => auth_section(&v, a)?,
        None => Auth::default_auth(),
    };
    let listeners = listeners(&v, &raw.listener, &auth)?;
    let relay = match &raw.relay {
        Some(r) => relay_section(&v, r)?,
        None => Relay::default_relay(),
    };
    let routes = routes(&v, &raw.route)?;
    // postmaster@hostname is a usable default only when a route takes our own name to
    // another host: by MX it would come back here and bounce as a loop.
    let postmaster = postmaster_given.or_else(|| {
        routes
            .iter()
            .find(|r| r.matches(&hostname))
            .filter(|r| r.next_hop != NextHop::Mx)
            .map(|_| format!("postmaster@{hostname}"))
    });
    let delivery = match &raw.delivery {
        Some(d) => delivery_section(&v, d)?,
        None => Delivery::default_delivery(),
    };
    let filters = filters(&v, &raw.filter)?;
    let dkim = dkim_keys(&v, &raw.dkim)?;
    let milters = milters(&v, &raw.milter)?;
    let rate_limits = rate_limits(&v, &raw.rate_limit)?;
    let authentication = match &raw.authentication {
        Some(a) => authentication_section(&v, a.get_ref())?,
        None => Authentication::default(),
    };
    let metrics = match &raw.metrics {
        None => None,
        Some(m) => {
            let address = v.socket_addr(&m.get_ref().address, "metrics.address")?;
            if address.port() != 0 && listeners.iter().any(|l| l.address == address) {
                return v.err(
                    m.get_ref().address.span(),
                    "metrics.address",
                    format!("{address} is already an SMTP listener"),
                );
            }
            Some(Metrics { address })
        }
    };

    let cluster = raw
        .cluster
        .as_ref()
        .map(|k| cluster_section(&v, k.get_ref()))
        .transpose()?;

    Ok(Config {
        source: Some(origin.to_path_buf()),
        hostname,
        spool_dir,
        max_message_size,
        max_recipients,
        command_timeout,
        max_errors,
        ipv6_prefix,
        postmaster,
        own_addresses,
        max_hops,
        max_junk_commands,
        data_timeout,
        max_message_memory,
        log_format: match raw.log_format.as_ref().map(|f| *f.get_ref()) {
            None | Some(RawLogFormat::Text) => LogFormat::Text,
            Some(RawLogFormat::Json) => LogFormat::Json,
        },
        privileges,
        listeners,
        tls,
        relay,
        auth,
        routes,
        delivery,
        filters,
        dkim,
        milters,
        authentication,
        metrics,
        rate_limits,
        cluster,
    })
}

/// `[cluster]`: the URL must be one the Redis client can use (checked here, so a typo is
/// an error at the line, not a node that silently counts alone). Messages never quote
/// the URL: it may hold the password.
fn cluster_section(v: &Validator, k: &RawCluster) -> Result<Cluster> {
    let url = k.redis.get_ref().trim();
    if !(url.starts_with("redis://") || url.starts_with("rediss://")) {
        return v.err(
            k.redis.span(),
            "cluster.redis",
            "expected a redis://[user:password@]host:port/db or rediss:// (TLS) URL",
        );
    }
    if url.contains('#') {
        // The client reads `#insecure` as "do not verify the certificate".
        return v.err(
            k.redis.span(),
            "cluster.redis",
            "a URL fragment (`#insecure`) is not supported: the certificate of a rediss:// \
             server is always verified (write a `#` in a password as %23)",
        );
    }
    if let Err(e) = redis::IntoConnectionInfo::into_connection_info(url) {
        // The client's message names the part it did not like, never the password.
        let why = e.to_string();
        return v.err(
            k.redis.span(),
            "cluster.redis",
            format!("not a usable Redis URL ({why})"),
        );
    }
    let node = match &k.node {
        Some(n) => v.parse(n, "cluster.node", |s| {
            let s = s.trim();
            if s.is_empty() || s.len() > 64 {
                return Err("1 to 64 characters".to_string());
            }
            if !s
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
            {
                return Err(
                    "letters, digits, `-`, `_` and `.` only (it is a log field)".to_string()
                );
            }
            Ok(s.to_string())
        })?,
        None => default_hostname(),
    };
    let timeout = v.duration(
        k.timeout.as_ref(),
        "cluster.timeout",
        DEFAULT_CLUSTER_TIMEOUT,
    )?;
    if timeout > MAX_CLUSTER_TIMEOUT
        && let Some(t) = &k.timeout
    {
        return v.err(
            t.span(),
            "cluster.timeout",
            "must be at most 5s: mail waits this long on a slow Redis",
        );
    }
    let tls_only = |value: &Option<S<String>>, key: &str| -> Result<Option<PathBuf>> {
        match value {
            Some(p) if !url.starts_with("rediss://") => v.err(
                p.span(),
                key,
                "only for a rediss:// (TLS) URL: a redis:// connection has no certificates",
            ),
            other => v.opt_path(other.as_ref(), key),
        }
    };
    let ca_file = tls_only(&k.ca_file, "cluster.ca_file")?;
    let client_cert = match (
        tls_only(&k.cert_file, "cluster.cert_file")?,
        tls_only(&k.key_file, "cluster.key_file")?,
    ) {
        (Some(cert), Some(key)) => Some((cert, key)),
        (None, None) => None,
        (Some(_), None) | (None, Some(_)) => {
            let span = k
                .cert_file
                .as_ref()
                .or(k.key_file.as_ref())
                .map_or(0..0, |s| s.span());
            return v.err(
                span,
                "cluster.cert_file",
                "cert_file and key_file go together (a client certificate and its key)",
            );
        }
    };
    let mut sentinels: Vec<String> = Vec::new();
    for a in k.sentinels.iter().flatten() {
        let addr = v.parse(a, "cluster.sentinels", |s| {
            let s = s.trim();
            if s.contains('@') {
                // It may hold a password: never repeat it.
                return Err("a sentinel address holds no user or password (`@`): give \
                            host:port, and the password as sentinel_password"
                    .to_string());
            }
            let bad =
                || format!("`{s}` is not a sentinel address (expected host:port or [IPv6]:port)");
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            let host = match host.strip_prefix('[').and_then(|h| h.strip_suffix(']')) {
                Some(v6) if v6.parse::<std::net::Ipv6Addr>().is_ok() => v6,
                Some(_) => return Err(bad()),
                None => host,
            };
            if host.is_empty()
                || (host.contains(':') && !s.starts_with('['))
                || !host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || "-._:".contains(c))
            {
                return Err(bad());
            }
            match port.parse::<u16>() {
                Ok(p) if p != 0 => Ok(s.to_ascii_lowercase()),
                _ => Err(bad()),
            }
        })?;
        if !sentinels.contains(&addr) {
            if sentinels.len() == 16 {
                return v.err(a.span(), "cluster.sentinels", "at most 16 sentinels");
            }
            sentinels.push(addr);
        }
    }
    if k.sentinels.as_ref().is_some_and(|s| s.is_empty()) {
        return v.err(
            k.redis.span(),
            "cluster.sentinels",
            "an empty list: give the sentinels' addresses, or leave the key out",
        );
    }
    let sentinel_password = match &k.sentinel_password {
        Some(p) if sentinels.is_empty() => {
            return v.err(p.span(), "cluster.sentinel_password", "only with sentinels");
        }
        Some(p) => Some(p.get_ref().clone()),
        None => None,
    };
    Ok(Cluster {
        redis: url.to_string(),
        node,
        timeout,
        ca_file,
        client_cert,
        sentinels,
        sentinel_password,
    })
}

/// `[authentication]`: a setting that another one makes meaningless is an error, not
/// silently idle (DMARC is computed from the SPF and DKIM results, RFC 7489 4).
fn authentication_section(v: &Validator, a: &RawAuthentication) -> Result<Authentication> {
    let get = |b: &Option<S<bool>>| b.as_ref().is_some_and(|b| *b.get_ref());
    let out = Authentication {
        spf: get(&a.spf),
        dkim: get(&a.dkim),
        dmarc: get(&a.dmarc),
        dmarc_enforce: get(&a.dmarc_enforce),
        spf_reject: get(&a.spf_reject),
    };
    if out.dmarc
        && !(out.spf && out.dkim)
        && let Some(d) = &a.dmarc
    {
        return v.err(
            d.span(),
            "authentication.dmarc",
            "DMARC needs both checks it is made of: set spf = true and dkim = true",
        );
    }
    if out.dmarc_enforce
        && !out.dmarc
        && let Some(d) = &a.dmarc_enforce
    {
        return v.err(
            d.span(),
            "authentication.dmarc_enforce",
            "nothing to enforce without dmarc = true",
        );
    }
    if out.spf_reject
        && !out.spf
        && let Some(d) = &a.spf_reject
    {
        return v.err(
            d.span(),
            "authentication.spf_reject",
            "SPF is not checked: set spf = true",
        );
    }
    Ok(out)
}

/// `[[dkim]]`: the key is read and parsed now, so that a key that cannot sign is a
/// configuration error (at its line) rather than unsigned mail later.
fn dkim_keys(v: &Validator, raw: &[S<RawDkim>]) -> Result<Vec<DkimSigning>> {
    let mut out: Vec<DkimSigning> = Vec::new();
    for d in raw {
        let d = d.get_ref();
        let domain = v.parse(&d.domain, "dkim.domain", normalize_domain)?;
        let selector = v.parse(&d.selector, "dkim.selector", check_selector)?;
        if out
            .iter()
            .any(|o| o.domain == domain && o.selector == selector)
        {
            return v.err(
                d.selector.span(),
                "dkim.selector",
                format!("{selector}._domainkey.{domain} is configured twice"),
            );
        }
        let key = v.path(&d.key, "dkim.key")?;
        if let Err(why) = crate::dkim::key::load(&key) {
            return v.err(d.key.span(), "dkim.key", why);
        }
        let mut headers = match &d.headers {
            None => DKIM_HEADERS.iter().map(|h| h.to_string()).collect(),
            Some(list) => {
                let mut names = Vec::new();
                for h in list {
                    names.push(v.parse(h, "dkim.headers", check_field_name)?);
                }
                names
            }
        };
        // RFC 6376 5.4: From MUST be signed.
        if !headers.iter().any(|h| h.eq_ignore_ascii_case("from")) {
            headers.insert(0, "From".to_string());
        }
        let expire = match &d.expire {
            None => None,
            Some(_) => Some(v.duration(d.expire.as_ref(), "dkim.expire", Duration::ZERO)?),
        };
        out.push(DkimSigning {
            domain,
            selector,
            key,
            subdomains: d.subdomains.as_ref().is_some_and(|b| *b.get_ref()),
            headers,
            expire,
        });
    }
    Ok(out)
}

/// A selector is one or more DNS labels (RFC 6376 3.1: `sub-domain *("." sub-domain)`).
fn check_selector(s: &str) -> std::result::Result<String, String> {
    let t = s.trim();
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.len() <= 63
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if t.split('.').all(label_ok) {
        Ok(t.to_ascii_lowercase())
    } else {
        Err(format!(
            "`{s}` is not a selector (letters, digits and hyphens, labels separated by dots)"
        ))
    }
}

/// A header field name (RFC 5322 3.6.8: printable ASCII except `:`).
fn check_field_name(s: &str) -> std::result::Result<String, String> {
    let t = s.trim();
    if !t.is_empty() && t.bytes().all(|b| (33..=126).contains(&b) && b != b':') {
        Ok(t.to_string())
    } else {
        Err(format!("`{s}` is not a header field name"))
    }
}

/// `user`, `group`, `allow_root`. Only the syntax and the combinations are checked here;
/// whether the user exists, and whether we are root, is `crate::privileges`' business at
/// start (and `check-config`'s), since the file alone cannot say.
fn privileges(v: &Validator, raw: &RawConfig) -> Result<Privileges> {
    let name = |value: Option<&S<String>>, key: &str| -> Result<Option<String>> {
        value
            .map(|n| v.parse(n, key, check_account_name))
            .transpose()
    };
    let user = name(raw.user.as_ref(), "user")?;
    let group = name(raw.group.as_ref(), "group")?;
    let allow_root = raw.allow_root.as_ref().is_some_and(|a| *a.get_ref());
    if let Some(g) = &raw.group
        && user.is_none()
    {
        return v.err(
            g.span(),
            "group",
            "group needs user: Postern changes its group only when it drops root for user",
        );
    }
    if let Some(a) = &raw.allow_root
        && allow_root
        && user.is_some()
    {
        return v.err(
            a.span(),
            "allow_root",
            "allow_root = true has no effect with user set (Postern then never runs as \
             root after start); remove one of them",
        );
    }
    Ok(Privileges {
        user,
        group,
        allow_root,
    })
}

/// A user or group name as the system's tools accept it (useradd(8), "CAVEATS": at most
/// 32 characters; letters, digits, `_`, `-`, `.`, a trailing `$`; not starting with `-`).
/// An all-digit name is refused: it would read as a numeric id to some tools and as a
/// name to us.
fn check_account_name(name: &str) -> std::result::Result<String, String> {
    let body = name.strip_suffix('$').unwrap_or(name);
    if body.is_empty() {
        return Err("must not be empty".into());
    }
    if name.len() > 32 {
        return Err(format!("`{name}` is longer than 32 characters"));
    }
    if let Some(c) = body
        .chars()
        .find(|c| !(c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.')))
    {
        return Err(format!(
            "`{name}`: `{c}` is not allowed in a user or group name (letters, digits, \
             `_`, `-`, `.`)"
        ));
    }
    if name.starts_with('-') {
        return Err(format!("`{name}` must not start with `-`"));
    }
    if body.chars().all(|c| c.is_ascii_digit()) {
        return Err(format!(
            "`{name}` is a number: give the name, not the numeric id"
        ));
    }
    Ok(name.to_string())
}

fn tls_section(v: &Validator, t: &S<RawTls>) -> Result<Tls> {
    let t = t.get_ref();
    Ok(Tls {
        cert: v.path(&t.cert, "tls.cert")?,
        key: v.path(&t.key, "tls.key")?,
    })
}

fn listeners(v: &Validator, raw: &[S<RawListener>], auth: &Auth) -> Result<Vec<Listener>> {
    if raw.is_empty() {
        return Ok(vec![Listener::default_listener()]);
    }
    let mut out: Vec<Listener> = Vec::new();
    let mut seen: HashMap<SocketAddr, u32> = HashMap::new();
    for l in raw {
        let l = l.get_ref();
        let address = v.socket_addr(&l.address, "listener.address")?;
        // Port 0 asks the kernel for a free port, so several of them never collide.
        if address.port() != 0 {
            if let Some(line) = seen.get(&address) {
                return v.err(
                    l.address.span(),
                    "listener.address",
                    format!("{address} is already used by the listener on line {line}"),
                );
            }
            let line = super::Location::at(v.origin, v.text, l.address.span().start)
                .line
                .unwrap_or(0);
            seen.insert(address, line);
        }

        // STARTTLS by default (safe by default); without [tls] a self-signed certificate
        // is generated at start.
        let tls = match l.tls.as_ref().map(|t| *t.get_ref()) {
            None | Some(RawTlsMode::StartTls) => TlsMode::StartTls,
            Some(RawTlsMode::None) => TlsMode::None,
            Some(RawTlsMode::Implicit) => TlsMode::Implicit,
        };
        let require_tls = l.require_tls.as_ref().is_some_and(|r| *r.get_ref());
        if let Some(r) = &l.require_tls
            && require_tls
            && tls == TlsMode::None
        {
            return v.err(
                r.span(),
                "listener.require_tls",
                "require_tls = true needs tls = \"starttls\" or \"implicit\" on this listener",
            );
        }

        let auth_mode = match l.auth.as_ref().map(|a| *a.get_ref()) {
            None | Some(RawAuthMode::None) => AuthMode::None,
            Some(RawAuthMode::Optional) => AuthMode::Optional,
            Some(RawAuthMode::Required) => AuthMode::Required,
        };
        let allow_plaintext_auth = l
            .allow_plaintext_auth
            .as_ref()
            .is_some_and(|a| *a.get_ref());
        if let Some(a) = &l.auth
            && auth_mode != AuthMode::None
        {
            if auth.users_file.is_none() {
                return v.err(
                    a.span(),
                    "listener.auth",
                    "AUTH needs users: set users_file in the [auth] section",
                );
            }
            // AUTH is offered only over TLS unless plaintext is allowed; without either,
            // nobody could ever authenticate, and auth = "required" would refuse all mail.
            if tls == TlsMode::None && !allow_plaintext_auth {
                return v.err(
                    a.span(),
                    "listener.auth",
                    "AUTH is offered only over TLS, and this listener has tls = \"none\": \
                     enable tls, or set allow_plaintext_auth = true",
                );
            }
        }

        let max_connections = v.int(
            l.max_connections.as_ref(),
            "listener.max_connections",
            1,
            MAX_COUNT,
            DEFAULT_MAX_CONNECTIONS,
        )?;
        let per_ip_connections = v.int(
            l.per_ip_connections.as_ref(),
            "listener.per_ip_connections",
            1,
            MAX_COUNT,
            DEFAULT_PER_IP_CONNECTIONS,
        )?;
        let proxy_protocol = l.proxy_protocol.as_ref().is_some_and(|p| *p.get_ref());
        let mut proxy_from: Vec<IpNet> = Vec::new();
        for n in l.proxy_from.iter().flat_map(|list| list.get_ref()) {
            let net = v.parse(n, "listener.proxy_from", parse_network)?;
            // Anyone could then claim any address, 127.0.0.1 included: an open relay.
            if net.prefix_len() == 0 {
                return v.err(
                    n.span(),
                    "listener.proxy_from",
                    format!(
                        "{net} lets every host on the Internet send a PROXY header and claim \
                         any address (a trusted one too); name the load balancers' networks"
                    ),
                );
            }
            if !proxy_from.contains(&net) {
                proxy_from.push(net);
            }
        }
        match (&l.proxy_protocol, &l.proxy_from) {
            (Some(p), None) if proxy_protocol => {
                return v.err(
                    p.span(),
                    "listener.proxy_protocol",
                    "proxy_protocol = true needs proxy_from, the networks of the load \
                     balancers allowed to send the PROXY header",
                );
            }
            (_, Some(list)) if proxy_protocol && proxy_from.is_empty() => {
                return v.err(
                    list.span(),
                    "listener.proxy_from",
                    "proxy_from is empty: no peer could ever connect to this listener",
                );
            }
            (_, Some(list)) if !proxy_protocol => {
                return v.err(
                    list.span(),
                    "listener.proxy_from",
                    "proxy_from has no effect without proxy_protocol = true on this listener",
                );
            }
            _ => {}
        }
        out.push(Listener {
            address,
            tls,
            require_tls,
            auth: auth_mode,
            allow_plaintext_auth,
            max_connections,
            per_ip_connections,
            proxy_protocol,
            proxy_from,
            connection_rate: l
                .connection_rate
                .as_ref()
                .map(|r| v.parse(r, "listener.connection_rate", parse_rate))
                .transpose()?,
        });
    }
    Ok(out)
}

/// `"60/1m"`: a count of at least 1 per a window greater than zero.
pub(crate) fn parse_rate(s: &str) -> std::result::Result<Rate, String> {
    let bad = || format!("`{s}` is not a rate (expected a count per window, like \"60/1m\")");
    let (count, window) = s.trim().split_once('/').ok_or_else(bad)?;
    let count: u64 = count.trim().parse().map_err(|_| bad())?;
    if count == 0 {
        return Err("the count must be at least 1".into());
    }
    let window = parse_duration(window.trim())?;
    if window.is_zero() {
        return Err("the window must be greater than zero".into());
    }
    Ok(Rate { count, window })
}

/// Most `[[rate_limit]]` sections: each is a table (or Redis keys) per client.
const MAX_RATE_LIMITS: usize = 16;
/// The longest window: a counter is kept that long after its last use.
const MAX_RATE_WINDOW: Duration = Duration::from_secs(7 * 24 * 3600);

fn rate_limits(v: &Validator, raw: &[S<RawRateLimit>]) -> Result<Vec<RateLimit>> {
    let mut out: Vec<RateLimit> = Vec::new();
    for (i, r) in raw.iter().enumerate() {
        if i == MAX_RATE_LIMITS {
            return v.err(
                r.span(),
                "rate_limit",
                format!("at most {MAX_RATE_LIMITS} rate limits"),
            );
        }
        let span = r.span();
        let r = r.get_ref();
        let name = r.name.get_ref().trim().to_string();
        if name.is_empty()
            || !name
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return v.err(
                r.name.span(),
                "rate_limit.name",
                "letters, digits, `-`, `_` and `.` only, not empty (it is a metrics label and a \
                 log field)",
            );
        }
        if out.iter().any(|other| other.name == name) {
            return v.err(
                r.name.span(),
                "rate_limit.name",
                format!("another rate limit is already named `{name}`"),
            );
        }
        let clients = match r.clients.as_ref().map(|c| *c.get_ref()) {
            Some(RawRateClients::Authenticated) => RateClients::Authenticated,
            Some(RawRateClients::Trusted) => RateClients::Trusted,
            Some(RawRateClients::Untrusted) => RateClients::Untrusted,
            None | Some(RawRateClients::Any) => RateClients::Any,
        };
        let per = match *r.per.get_ref() {
            RawRateKey::User => RateKey::User,
            RawRateKey::ClientIp => RateKey::ClientIp,
            RawRateKey::Sender => RateKey::Sender,
            RawRateKey::SenderDomain => RateKey::SenderDomain,
        };
        if per == RateKey::User && clients != RateClients::Authenticated {
            return v.err(
                r.per.span(),
                "rate_limit.per",
                "per = \"user\" counts authenticated users: it needs clients = \"authenticated\"",
            );
        }
        let count = |value: &Option<S<i64>>, key: &str| -> Result<Option<u64>> {
            value
                .as_ref()
                .map(|n| v.int(Some(n), key, 1, i64::from(u32::MAX), 0u64))
                .transpose()
        };
        let messages = count(&r.messages, "rate_limit.messages")?;
        let recipients = count(&r.recipients, "rate_limit.recipients")?;
        if messages.is_none() && recipients.is_none() {
            return v.err(
                span,
                "rate_limit",
                format!("rate limit `{name}` limits nothing: give messages, recipients or both"),
            );
        }
        let window = v.duration(Some(&r.window), "rate_limit.window", Duration::ZERO)?;
        if window > MAX_RATE_WINDOW {
            return v.err(r.window.span(), "rate_limit.window", "at most 7d");
        }
        out.push(RateLimit {
            name,
            clients,
            per,
            messages,
            recipients,
            window,
        });
    }
    Ok(out)
}

fn relay_section(v: &Validator, r: &RawRelay) -> Result<Relay> {
    let mut accepted_domains: Vec<String> = Vec::new();
    for d in r.accepted_domains.iter().flatten() {
        let domain = v.parse(d, "relay.accepted_domains", |s| {
            normalize_domain(s.trim()).map_err(|e| format!("`{s}` is not a domain name: {e}"))
        })?;
        if !accepted_domains.contains(&domain) {
            accepted_domains.push(domain);
        }
    }
    let trusted_networks = match &r.trusted_networks {
        None => default_trusted_networks(),
        Some(list) => {
            let mut nets: Vec<IpNet> = Vec::new();
            for n in list {
                let net = v.parse(n, "relay.trusted_networks", parse_network)?;
                if !nets.contains(&net) {
                    nets.push(net);
                }
            }
            nets
        }
    };
    let mut dnsbl = Vec::new();
    for zone in r.dnsbl.iter().flatten() {
        dnsbl.push(v.parse(zone, "relay.dnsbl", |s| {
            normalize_hostname(s.trim()).map_err(|e| format!("`{s}` is not a DNS zone: {e}"))
        })?);
    }
    Ok(Relay {
        accepted_domains,
        trusted_networks,
        authenticated_relay: r.authenticated_relay.unwrap_or(true),
        open_relay: r.open_relay.unwrap_or(false),
        recipients_file: v.opt_path(r.recipients_file.as_ref(), "relay.recipients_file")?,
        dnsbl,
    })
}

fn auth_section(v: &Validator, a: &S<RawAuth>) -> Result<Auth> {
    let a = a.get_ref();
    let mechanisms = match &a.mechanisms {
        None => vec![Mechanism::Plain, Mechanism::Login],
        Some(list) => {
            let mut out = Vec::new();
            for m in list.get_ref() {
                let mech = v.parse(m, "auth.mechanisms", |s| {
                    match s.trim().to_ascii_uppercase().as_str() {
                        "PLAIN" => Ok(Mechanism::Plain),
                        "LOGIN" => Ok(Mechanism::Login),
                        _ => Err(format!(
                            "unknown mechanism `{s}` (expected \"PLAIN\" or \"LOGIN\")"
                        )),
                    }
                })?;
                if !out.contains(&mech) {
                    out.push(mech);
                }
            }
            if out.is_empty() {
                return v.err(
                    list.span(),
                    "auth.mechanisms",
                    "at least one mechanism is needed (\"PLAIN\", \"LOGIN\")",
                );
            }
            out
        }
    };
    Ok(Auth {
        users_file: v.opt_path(a.users_file.as_ref(), "auth.users_file")?,
        mechanisms,
        max_failures: v.int(
            a.max_failures.as_ref(),
            "auth.max_failures",
            1,
            i64::from(u32::MAX),
            DEFAULT_MAX_FAILURES,
        )?,
        failure_window: v.duration(
            a.failure_window.as_ref(),
            "auth.failure_window",
            DEFAULT_FAILURE_WINDOW,
        )?,
        lockout: v.duration(a.lockout.as_ref(), "auth.lockout", DEFAULT_LOCKOUT)?,
        per_user_lockout: a.per_user_lockout.unwrap_or(true),
        restrict_senders: a.restrict_senders.unwrap_or(false),
    })
}

fn routes(v: &Validator, raw: &[S<RawRoute>]) -> Result<Vec<Route>> {
    let mut out = Vec::new();
    // Domain -> line of the route that claims it first; a later claim is dead config.
    let mut claimed: HashMap<String, u32> = HashMap::new();
    for r in raw {
        let r = r.get_ref();
        let line_of = |span: std::ops::Range<usize>| {
            super::Location::at(v.origin, v.text, span.start)
                .line
                .unwrap_or(0)
        };
        if let Some(line) = claimed.get("*") {
            return v.err(
                r.domains.span(),
                "route.domains",
                format!(
                    "this route can never match: the route on line {line} matches every \
                     domain (\"*\") and the first matching route wins"
                ),
            );
        }
        if r.domains.get_ref().is_empty() {
            return v.err(
                r.domains.span(),
                "route.domains",
                "list at least one domain, or \"*\" for any domain",
            );
        }
        let mut domains = Vec::new();
        for d in r.domains.get_ref() {
            let domain = if d.get_ref().trim() == "*" {
                "*".to_string()
            } else {
                v.parse(d, "route.domains", |s| {
                    normalize_domain(s.trim())
                        .map_err(|e| format!("`{s}` is not a domain name or \"*\": {e}"))
                })?
            };
            if let Some(line) = claimed.get(&domain) {
                return v.err(
                    d.span(),
                    "route.domains",
                    format!(
                        "`{domain}` is already routed on line {line}; the first matching \
                         route wins, so this entry would never be used"
                    ),
                );
            }
            claimed.insert(domain.clone(), line_of(d.span()));
            domains.push(domain);
        }

        let next_hop = v.parse(&r.next_hop, "route.next_hop", parse_next_hop)?;
        let tls = match r.tls.as_ref().map(|t| *t.get_ref()) {
            None | Some(RawRouteTls::Opportunistic) => RouteTls::Opportunistic,
            Some(RawRouteTls::None) => RouteTls::None,
            Some(RawRouteTls::Required) => RouteTls::Required,
        };
        let ca_file = v.opt_path(r.ca_file.as_ref(), "route.ca_file")?;
        if let Some(ca) = &r.ca_file
            && tls != RouteTls::Required
        {
            // Opportunistic TLS verifies nothing; accepting a CA file there would suggest
            // a protection that is not in force.
            return v.err(
                ca.span(),
                "route.ca_file",
                "ca_file is used only with tls = \"required\" (certificates are not verified \
                 otherwise)",
            );
        }
        let auth_user = match &r.auth_user {
            None => None,
            Some(u) => {
                let user = u.get_ref();
                if user.is_empty() || user.chars().any(char::is_control) {
                    return v.err(
                        u.span(),
                        "route.auth_user",
                        "must be a non-empty name without control characters",
                    );
                }
                Some(user.clone())
            }
        };
        let auth_password_file =
            v.opt_path(r.auth_password_file.as_ref(), "route.auth_password_file")?;
        match (&r.auth_user, &r.auth_password_file) {
            (Some(u), None) => {
                return v.err(
                    u.span(),
                    "route.auth_user",
                    "auth_user needs auth_password_file in the same route",
                );
            }
            (None, Some(p)) => {
                return v.err(
                    p.span(),
                    "route.auth_password_file",
                    "auth_password_file needs auth_user in the same route",
                );
            }
            // Opportunistic TLS verifies no certificate: it protects against passive
            // eavesdropping only (RFC 7435), so anyone on the path could present one and
            // collect the password. Only a verified server gets credentials.
            (Some(u), Some(_)) if tls != RouteTls::Required => {
                return v.err(
                    u.span(),
                    "route.auth_user",
                    "auth_user needs tls = \"required\": the password would go to any server \
                     presenting any certificate",
                );
            }
            _ => {}
        }
        out.push(Route {
            domains,
            next_hop,
            tls,
            ca_file,
            auth_user,
            auth_password_file,
        });
    }
    Ok(out)
}

fn delivery_section(v: &Validator, d: &RawDelivery) -> Result<Delivery> {
    let mut dns_servers = Vec::new();
    for s in d.dns_servers.iter().flatten() {
        dns_servers.push(v.parse(s, "delivery.dns_servers", |s| {
            let t = s.trim();
            // A bare address means the standard DNS port.
            t.parse::<SocketAddr>()
                .or_else(|_| t.parse::<IpAddr>().map(|ip| SocketAddr::new(ip, 53)))
                .map_err(|_| format!("`{s}` is not a DNS server address (expected IP or IP:port)"))
        })?);
    }
    let retry_schedule = match &d.retry_schedule {
        None => default_retry_schedule(),
        Some(list) => {
            if list.get_ref().is_empty() {
                return v.err(
                    list.span(),
                    "delivery.retry_schedule",
                    "list at least one interval, e.g. [\"1m\", \"5m\", \"1h\"]",
                );
            }
            let mut out = Vec::new();
            for item in list.get_ref() {
                out.push(v.duration(Some(item), "delivery.retry_schedule", Duration::ZERO)?);
            }
            out
        }
    };
    Ok(Delivery {
        dns_servers,
        mx_port: v.int(
            d.mx_port.as_ref(),
            "delivery.mx_port",
            1,
            i64::from(u16::MAX),
            DEFAULT_MX_PORT,
        )?,
        retry_schedule,
        max_queue_lifetime: v.duration(
            d.max_queue_lifetime.as_ref(),
            "delivery.max_queue_lifetime",
            DEFAULT_MAX_QUEUE_LIFETIME,
        )?,
        max_concurrency: v.int(
            d.max_concurrency.as_ref(),
            "delivery.max_concurrency",
            1,
            MAX_COUNT,
            DEFAULT_MAX_CONCURRENCY,
        )?,
        per_domain_concurrency: v.int(
            d.per_domain_concurrency.as_ref(),
            "delivery.per_domain_concurrency",
            1,
            MAX_COUNT,
            DEFAULT_PER_DOMAIN_CONCURRENCY,
        )?,
        max_mx_addresses: v.int(
            d.max_mx_addresses.as_ref(),
            "delivery.max_mx_addresses",
            1,
            MAX_MX_LIMIT,
            DEFAULT_MAX_MX_ADDRESSES,
        )?,
        max_mx_sessions: v.int(
            d.max_mx_sessions.as_ref(),
            "delivery.max_mx_sessions",
            1,
            MAX_MX_LIMIT,
            DEFAULT_MAX_MX_SESSIONS,
        )?,
        connect_timeout: v.duration(
            d.connect_timeout.as_ref(),
            "delivery.connect_timeout",
            DEFAULT_CONNECT_TIMEOUT,
        )?,
        resolve_timeout: v.duration(
            d.resolve_timeout.as_ref(),
            "delivery.resolve_timeout",
            DEFAULT_RESOLVE_TIMEOUT,
        )?,
    })
}

fn filters(v: &Validator, raw: &[S<RawFilter>]) -> Result<Vec<Filter>> {
    let mut out: Vec<Filter> = Vec::new();
    for f in raw {
        let span = f.span();
        let f = f.get_ref();
        let name = f.name.get_ref().trim().to_string();
        if name.is_empty() {
            return v.err(f.name.span(), "filter.name", "must not be empty");
        }
        if out.iter().any(|other| other.name == name) {
            return v.err(
                f.name.span(),
                "filter.name",
                format!("another filter is already named `{name}`"),
            );
        }
        let attachments = v.strings(f.attachments.as_ref(), "filter.attachments")?;
        let keywords = v.strings(f.keywords.as_ref(), "filter.keywords")?;
        let senders = v.strings(f.senders.as_ref(), "filter.senders")?;
        if attachments.is_empty() && keywords.is_empty() && senders.is_empty() {
            return v.err(
                span,
                "filter",
                format!(
                    "filter `{name}` matches nothing: give at least one of attachments, \
                     keywords, senders"
                ),
            );
        }
        let action = match (*f.action.get_ref(), &f.redirect_to) {
            (RawFilterAction::Redirect, Some(to)) => {
                FilterAction::Redirect(v.parse(to, "filter.redirect_to", check_address)?)
            }
            (RawFilterAction::Redirect, None) => {
                return v.err(
                    f.action.span(),
                    "filter.action",
                    "action = \"redirect\" needs redirect_to = \"user@domain\"",
                );
            }
            (_, Some(to)) => {
                return v.err(
                    to.span(),
                    "filter.redirect_to",
                    "redirect_to is used only with action = \"redirect\"",
                );
            }
            (RawFilterAction::Reject, None) => FilterAction::Reject,
            (RawFilterAction::Discard, None) => FilterAction::Discard,
            (RawFilterAction::Quarantine, None) => FilterAction::Quarantine,
        };
        out.push(Filter {
            name,
            attachments,
            keywords,
            senders,
            action,
        });
    }
    Ok(out)
}

/// Defaults of `[[milter]]` (interface: "Milters"), Postfix's milter_connect_timeout and
/// a reply timeout like its milter_command_timeout (30s).
pub const DEFAULT_MILTER_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_MILTER_TIMEOUT: Duration = Duration::from_secs(30);
/// Idle milter connections kept per `[[milter]]`: room for the sessions that end while
/// others begin (each session holds its own connection while it runs).
pub const DEFAULT_MILTER_POOL_SIZE: usize = 32;
/// Below the idle timeouts milters apply themselves (clamav-milter's ReadTimeout 120 s,
/// libmilter's default 7210 s), so that it is Postern that closes an idle connection.
pub const DEFAULT_MILTER_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(10);
/// The longest `pool_idle_timeout`.
const MAX_MILTER_POOL_IDLE_TIMEOUT: Duration = Duration::from_secs(3600);

fn milters(v: &Validator, raw: &[S<RawMilter>]) -> Result<Vec<Milter>> {
    let mut out: Vec<Milter> = Vec::new();
    for m in raw {
        let m = m.get_ref();
        let name = m.name.get_ref().trim().to_string();
        if name.is_empty() {
            return v.err(m.name.span(), "milter.name", "must not be empty");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(&b))
        {
            return v.err(
                m.name.span(),
                "milter.name",
                "letters, digits, `-`, `_` and `.` only (it is a metrics label and a log field)",
            );
        }
        if out.iter().any(|other| other.name == name) {
            return v.err(
                m.name.span(),
                "milter.name",
                format!("another milter is already named `{name}`"),
            );
        }
        let address = v.parse(&m.address, "milter.address", |s| {
            let s = s.trim();
            if let Some(path) = s.strip_prefix("unix:") {
                if path.is_empty() {
                    return Err("`unix:` needs a socket path, like unix:/run/milter.sock".into());
                }
                return Ok(MilterAddress::Unix(v.resolve(path)));
            }
            let bad = || {
                format!(
                    "`{s}` is not a milter address (expected host:port like 127.0.0.1:11332, \
                     or unix:/path/to/socket)"
                )
            };
            let (host, port) = s.rsplit_once(':').ok_or_else(bad)?;
            let host = host
                .strip_prefix('[')
                .and_then(|h| h.strip_suffix(']'))
                .unwrap_or(host);
            if host.is_empty() || host.contains(char::is_whitespace) {
                return Err(bad());
            }
            match port.parse::<u16>() {
                Ok(p) if p != 0 => Ok(MilterAddress::Tcp(s.to_string())),
                _ => Err(bad()),
            }
        })?;
        out.push(Milter {
            name,
            address,
            clients: match m.clients.as_ref().map(|c| *c.get_ref()) {
                None | Some(RawMilterClients::Any) => MilterClients::Any,
                Some(RawMilterClients::Untrusted) => MilterClients::Untrusted,
                Some(RawMilterClients::Relayed) => MilterClients::Relayed,
            },
            connect_timeout: v.duration(
                m.connect_timeout.as_ref(),
                "milter.connect_timeout",
                DEFAULT_MILTER_CONNECT_TIMEOUT,
            )?,
            timeout: v.duration(m.timeout.as_ref(), "milter.timeout", DEFAULT_MILTER_TIMEOUT)?,
            on_failure: match m.on_failure.as_ref().map(|c| *c.get_ref()) {
                None | Some(RawOnFailure::Tempfail) => OnFailure::Tempfail,
                Some(RawOnFailure::Accept) => OnFailure::Accept,
            },
            pool_size: v.int(
                m.pool_size.as_ref(),
                "milter.pool_size",
                0,
                1000,
                DEFAULT_MILTER_POOL_SIZE,
            )?,
            pool_idle_timeout: {
                let d = v.duration(
                    m.pool_idle_timeout.as_ref(),
                    "milter.pool_idle_timeout",
                    DEFAULT_MILTER_POOL_IDLE_TIMEOUT,
                )?;
                if d > MAX_MILTER_POOL_IDLE_TIMEOUT
                    && let Some(value) = &m.pool_idle_timeout
                {
                    return v.err(
                        value.span(),
                        "milter.pool_idle_timeout",
                        "must be at most 1h (a milter closes idle connections itself)",
                    );
                }
                d
            },
        });
    }
    Ok(out)
}
