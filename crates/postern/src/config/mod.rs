//! The relay's configuration: read the TOML file, validate it, and hand the rest of the
//! program one [`Config`] in which every value is already parsed, checked and defaulted.
//!
//! Trust: a configuration file is operator input, trusted in intent and untrusted in syntax.
//! We never second-guess what a well-formed file asks for (an open relay is allowed, and
//! only [`Config::describe`] shouts about it), but every typo, wrong type, impossible
//! combination and unknown key is an error that names file, line, column and key. Nothing
//! is silently ignored, because an ignored line in a relay's configuration is usually a
//! security setting the operator believes is in force.
//!
//! Two stages (see `docs/configuration.md` for the operator's view):
//! - [`raw`]: serde structs mirroring the file, with spans;
//! - [`validate`]: raw → [`Config`], the only type other modules see.
//!
//! The module reads the file and nothing else: it does not check that referenced files
//! (certificates, users file, ...) exist, since they may be created after a `check-config`
//! and are opened, with their own errors, by the modules that use them.

mod changes;
mod describe;
mod error;
mod raw;
mod units;
mod unsupported;
mod validate;

#[cfg(test)]
mod tests;

use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::Duration;

pub use changes::{Changes, changes};
pub use error::{ConfigError, Location};
pub use units::{format_duration, format_size, parse_duration, parse_size};
pub(crate) use validate::normalize_domain;

/// Name of the file `postern serve` reads from the working directory when given no `--config`.
pub const DEFAULT_CONFIG_FILE: &str = "postern.toml";

/// The validated configuration.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Config {
    /// File it was read from; `None` = built-in defaults.
    pub source: Option<PathBuf>,
    /// Our name in the banner, EHLO reply, Received: headers and bounces. ASCII, lower case.
    pub hostname: String,
    /// Durable queue and quarantine.
    pub spool_dir: PathBuf,
    /// Largest message accepted, in bytes (advertised in EHLO SIZE).
    pub max_message_size: u64,
    /// Recipients per transaction.
    pub max_recipients: usize,
    /// Idle time allowed between client commands before 421 4.4.2 and close.
    pub command_timeout: Duration,
    /// Protocol errors per session before 421 and close.
    pub max_errors: u32,
    /// IPv6 clients are counted per block of this many leading bits (per-IP connection
    /// limits, AUTH lockout): one site holds a whole /64.
    pub ipv6_prefix: u8,
    /// Where mail to `<Postmaster>` (RFC 5321 4.5.1) and double-bounce notices go.
    /// Unset: `postmaster@` + `hostname` when a route takes `hostname` to another host;
    /// otherwise `None` (it would go by MX to this very host and bounce as a loop, so
    /// `<Postmaster>` is then left to the relay policy and notices are only logged).
    pub postmaster: Option<String>,
    /// Addresses that reach this server from outside though no interface has them (NAT,
    /// a load balancer, port forwarding): an MX host or an address literal with one of
    /// them is us, whatever the port (Postfix's proxy_interfaces).
    pub own_addresses: Vec<IpAddr>,
    /// RFC 5321 6.3: a message already carrying this many `Received:`/`Delivered-To:`
    /// fields is refused (554 5.4.6).
    pub max_hops: usize,
    /// NOOP, RSET, VRFY, HELP, EXPN and repeated EHLO/HELO allowed per session (per
    /// message accepted) before each counts as an error.
    pub max_junk_commands: u32,
    /// The longest a whole DATA or BDAT transfer may take (421 4.4.2 after).
    pub data_timeout: Duration,
    /// Bytes of message bodies all sessions together may hold in memory while
    /// receiving and storing; a message that does not fit gets 452 4.3.1.
    pub max_message_memory: u64,
    /// How log lines are written (stderr). Read once at start: changing it needs a
    /// restart (a reload says so, see `changes.rs`).
    pub log_format: LogFormat,
    /// Whom to run as once the listeners are bound (`user`, `group`, `allow_root`).
    pub privileges: Privileges,
    /// Never empty.
    pub listeners: Vec<Listener>,
    pub tls: Option<Tls>,
    pub relay: Relay,
    pub auth: Auth,
    /// In file order; the first route whose domains match wins. Empty = everything by MX.
    pub routes: Vec<Route>,
    pub delivery: Delivery,
    /// In file order; the first filter that matches acts.
    pub filters: Vec<Filter>,
    /// DKIM signing keys (`[[dkim]]`), in file order.
    pub dkim: Vec<DkimSigning>,
    /// In file order, after the filters; each sees the message as the previous left it.
    pub milters: Vec<Milter>,
    /// Inbound checks (`[authentication]`) on mail from clients neither trusted nor
    /// authenticated; all off when the section is absent.
    pub authentication: Authentication,
    pub metrics: Option<Metrics>,
    /// `[[rate_limit]]`s, in file order; each counts in its own window (`policy::rate`).
    pub rate_limits: Vec<RateLimit>,
    /// `[cluster]`: counters shared with the other nodes through Redis; `None`: this
    /// node counts alone.
    pub cluster: Option<Cluster>,
}

/// Whom `postern serve` runs as after it has bound its listeners, opened the spool and
/// read its keys (interface: "Operations"; carried out by `crate::privileges`).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Privileges {
    /// A user name from the system's user database; `None`: stay who we were started as.
    pub user: Option<String>,
    /// A group name; `None`: the user's primary group. Only set together with `user`.
    pub group: Option<String>,
    /// Root may keep running as root with a listener off loopback (otherwise refused).
    pub allow_root: bool,
}

/// One address the relay accepts SMTP connections on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listener {
    pub address: SocketAddr,
    pub tls: TlsMode,
    /// MAIL and AUTH get 530 5.7.0 until STARTTLS succeeded.
    pub require_tls: bool,
    pub auth: AuthMode,
    /// Offer and accept AUTH without TLS.
    pub allow_plaintext_auth: bool,
    pub max_connections: usize,
    pub per_ip_connections: usize,
    /// Every connection starts with a PROXY protocol v1 or v2 header whose source address
    /// is the client's (interface: "Listeners behind a load balancer").
    pub proxy_protocol: bool,
    /// The peers allowed to send that header; empty unless `proxy_protocol`.
    pub proxy_from: Vec<ipnet::IpNet>,
    /// New connections allowed per client address (IPv6: per `ipv6_prefix` block) in a
    /// sliding window (`connection_rate = "60/1m"`); beyond: 421 4.7.0 and close.
    pub connection_rate: Option<Rate>,
}

/// So many per window (`"60/1m"`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rate {
    pub count: u64,
    pub window: Duration,
}

impl std::fmt::Display for Rate {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.count, units::format_duration(self.window))
    }
}

/// One `[[rate_limit]]` (interface: "Rate limits and shared state").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateLimit {
    /// Unique; in the log and the metrics' `limit` label.
    pub name: String,
    pub clients: RateClients,
    pub per: RateKey,
    /// Messages accepted per window (counted at 250).
    pub messages: Option<u64>,
    /// Recipients accepted per window (counted at RCPT 250).
    pub recipients: Option<u64>,
    pub window: Duration,
}

/// Which sessions a rate limit counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateClients {
    /// Sessions that authenticated (SMTP AUTH).
    Authenticated,
    /// Clients in `trusted_networks`, authenticated or not.
    Trusted,
    /// Clients neither trusted nor authenticated.
    Untrusted,
    Any,
}

impl RateClients {
    pub fn as_str(self) -> &'static str {
        match self {
            RateClients::Authenticated => "authenticated",
            RateClients::Trusted => "trusted",
            RateClients::Untrusted => "untrusted",
            RateClients::Any => "any",
        }
    }
}

/// What a rate limit counts per.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RateKey {
    /// The authenticated user name.
    User,
    /// The client address (IPv6: its `ipv6_prefix` block).
    ClientIp,
    /// The MAIL FROM address, compared without regard to case (`<>` is one key).
    Sender,
    /// The MAIL FROM domain, in A-label form (`<>` is one key).
    SenderDomain,
}

impl RateKey {
    pub fn as_str(self) -> &'static str {
        match self {
            RateKey::User => "user",
            RateKey::ClientIp => "client_ip",
            RateKey::Sender => "sender",
            RateKey::SenderDomain => "sender_domain",
        }
    }
}

/// `log_format`: how log lines are written.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
pub enum LogFormat {
    /// `key=value` text lines (the default).
    #[default]
    Text,
    /// One JSON object per line, with the same fields.
    Json,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum TlsMode {
    /// Plain SMTP, STARTTLS not offered.
    None,
    /// Plain SMTP, STARTTLS offered.
    StartTls,
    /// TLS from the first byte (port 465 style).
    Implicit,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum AuthMode {
    /// AUTH not offered.
    None,
    /// AUTH offered; anonymous clients may still send to accepted domains.
    Optional,
    /// MAIL gets 530 5.7.0 until AUTH succeeded.
    Required,
}

/// The server certificate for listeners with TLS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Tls {
    /// PEM chain.
    pub cert: PathBuf,
    /// PEM private key.
    pub key: PathBuf,
}

/// Who may send where; evaluated per RCPT TO.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Relay {
    /// Anyone may send to these. Lower case, no trailing dot, no duplicates.
    pub accepted_domains: Vec<String>,
    /// Clients here may relay anywhere without AUTH.
    pub trusted_networks: Vec<ipnet::IpNet>,
    /// Clients that passed AUTH may relay anywhere.
    pub authenticated_relay: bool,
    /// Anyone may relay anywhere.
    pub open_relay: bool,
    /// Valid recipients in the accepted domains.
    pub recipients_file: Option<PathBuf>,
    /// DNS blocklist zones, lower case.
    pub dnsbl: Vec<String>,
}

impl Relay {
    /// True when anyone on the Internet may relay: `open_relay`, or trusted networks that
    /// together cover every IPv4 or every IPv6 address, which amounts to the same thing.
    pub fn is_open_relay(&self) -> bool {
        self.open_relay || !self.trusted_everyone().is_empty()
    }

    /// The address families ("IPv4", "IPv6") of which `trusted_networks`, taken together,
    /// hold every address: `0.0.0.0/0` alone, but also `0.0.0.0/1` + `128.0.0.0/1`, or any
    /// other set of networks that merges into a `/0`.
    pub fn trusted_everyone(&self) -> Vec<&'static str> {
        let merged = ipnet::IpNet::aggregate(&self.trusted_networks);
        let mut families = Vec::new();
        if merged
            .iter()
            .any(|n| matches!(n, ipnet::IpNet::V4(v4) if v4.prefix_len() == 0))
        {
            families.push("IPv4");
        }
        if merged
            .iter()
            .any(|n| matches!(n, ipnet::IpNet::V6(v6) if v6.prefix_len() == 0))
        {
            families.push("IPv6");
        }
        families
    }
}

/// "every IPv4 address", "every IPv4 address and every IPv6 address": for messages about
/// [`Relay::trusted_everyone`].
pub(crate) fn every_address_of(families: &[&str]) -> String {
    families
        .iter()
        .map(|f| format!("every {f} address"))
        .collect::<Vec<_>>()
        .join(" and ")
}

/// SMTP AUTH for clients.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Auth {
    pub users_file: Option<PathBuf>,
    /// Offered in this order; never empty.
    pub mechanisms: Vec<Mechanism>,
    pub max_failures: u32,
    pub failure_window: Duration,
    pub lockout: Duration,
    pub per_user_lockout: bool,
    /// An authenticated user may use as MAIL FROM only its own name (when it is an
    /// address) and the addresses listed for it in the users file.
    pub restrict_senders: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Mechanism {
    Plain,
    Login,
}

impl Mechanism {
    /// The SASL name, as advertised in EHLO.
    pub fn name(self) -> &'static str {
        match self {
            Mechanism::Plain => "PLAIN",
            Mechanism::Login => "LOGIN",
        }
    }
}

/// Where mail for some domains goes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Route {
    /// Lower case; `"*"` matches any domain.
    pub domains: Vec<String>,
    pub next_hop: NextHop,
    pub tls: RouteTls,
    /// Trust anchors replacing the system roots; only with `tls = Required`.
    pub ca_file: Option<PathBuf>,
    /// Set together with `auth_password_file`.
    pub auth_user: Option<String>,
    pub auth_password_file: Option<PathBuf>,
}

impl Route {
    /// Whether this route applies to `domain` (already lower case, no trailing dot);
    /// compared in A-label form (IDNA), which is how route domains are stored.
    pub fn matches(&self, domain: &str) -> bool {
        let domain = postern_smtp::address::ascii_domain(domain);
        self.domains.iter().any(|d| d == "*" || *d == domain)
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum NextHop {
    /// Look up the recipient domain's MX records.
    Mx,
    /// A fixed host name, resolved by A/AAAA (no MX lookup).
    Host { host: String, port: u16 },
    /// A fixed address, written `[ip]:port` (or `ipv4:port`).
    Ip(SocketAddr),
}

impl std::fmt::Display for NextHop {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            NextHop::Mx => f.write_str("MX"),
            NextHop::Host { host, port } => write!(f, "{host}:{port}"),
            NextHop::Ip(addr) => write!(f, "{addr}"),
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum RouteTls {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not verified, plaintext otherwise.
    Opportunistic,
    /// STARTTLS with a verified certificate, or defer.
    Required,
}

/// Outbound delivery.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Delivery {
    /// Empty = the system resolver.
    pub dns_servers: Vec<SocketAddr>,
    pub mx_port: u16,
    /// Delays between attempts; after the last, repeat the last. Never empty.
    pub retry_schedule: Vec<Duration>,
    /// Then bounce.
    pub max_queue_lifetime: Duration,
    pub max_concurrency: usize,
    pub per_domain_concurrency: usize,
    /// Addresses tried per destination and attempt; an MX host whose lookup fails counts
    /// as one (Postfix's smtp_mx_address_limit).
    pub max_mx_addresses: usize,
    /// SMTP sessions (connections that got past the greeting) per destination and
    /// attempt (Postfix's smtp_mx_session_limit).
    pub max_mx_sessions: usize,
    /// TCP connect, per address.
    pub connect_timeout: Duration,
    /// Finding the addresses of one destination (MX and address lookups), per attempt.
    pub resolve_timeout: Duration,
}

/// A message screener.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Filter {
    pub name: String,
    /// File-name globs, case-insensitive.
    pub attachments: Vec<String>,
    /// Case-insensitive phrases.
    pub keywords: Vec<String>,
    /// Address globs (envelope and header From:).
    pub senders: Vec<String>,
    pub action: FilterAction,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FilterAction {
    Reject,
    Discard,
    Quarantine,
    /// Deliver only to this address.
    Redirect(String),
}

impl FilterAction {
    /// Every action's name, in [`FilterAction::index`] order: the words of the
    /// configuration file, the decision log and the metrics' `action` label.
    pub const NAMES: [&'static str; 4] = ["reject", "discard", "quarantine", "redirect"];

    /// The position of this action's name in [`FilterAction::NAMES`].
    pub fn index(&self) -> usize {
        match self {
            FilterAction::Reject => 0,
            FilterAction::Discard => 1,
            FilterAction::Quarantine => 2,
            FilterAction::Redirect(_) => 3,
        }
    }

    pub fn as_str(&self) -> &'static str {
        Self::NAMES[self.index()]
    }
}

/// One `[[dkim]]`: a key that signs mail relayed for trusted or authenticated clients
/// whose `From:` is in `domain`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DkimSigning {
    /// `d=`, lower case, A-labels.
    pub domain: String,
    /// `s=`.
    pub selector: String,
    /// PEM private key (RSA or Ed25519); checked when the configuration is loaded.
    pub key: PathBuf,
    /// Also sign for subdomains of `domain` (still as `d=domain`).
    pub subdomains: bool,
    /// Header fields to sign; `From` is always among them.
    pub headers: Vec<String>,
    /// `x=`: signatures expire this long after signing.
    pub expire: Option<Duration>,
}

/// The default `[[dkim]] headers` (interface: "Mail authentication").
pub const DKIM_HEADERS: &[&str] = &[
    "From",
    "To",
    "Cc",
    "Subject",
    "Date",
    "Message-ID",
    "Reply-To",
    "In-Reply-To",
    "References",
    "MIME-Version",
    "Content-Type",
    "Content-Transfer-Encoding",
];
/// A mail filter spoken to over the milter protocol (`[[milter]]`, docs/milter.md).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Milter {
    /// Unique; in the log and the metrics' `milter` label.
    pub name: String,
    pub address: MilterAddress,
    pub clients: MilterClients,
    /// Opening the connection (and option negotiation) must take at most this.
    pub connect_timeout: Duration,
    /// Each reply of the milter must come within this (`SMFIR_PROGRESS` restarts it).
    pub timeout: Duration,
    pub on_failure: OnFailure,
    /// Connections kept open between SMTP sessions for the next one (`SMFIC_QUIT_NC`),
    /// at most; 0: a new connection for every session.
    pub pool_size: usize,
    /// A kept connection unused for this long is closed.
    pub pool_idle_timeout: Duration,
}

/// Where a milter listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum MilterAddress {
    /// `host:port`: a name or an address (IPv6 in brackets) and a port.
    Tcp(String),
    /// `unix:/path`: a Unix domain socket.
    Unix(PathBuf),
}

impl std::fmt::Display for MilterAddress {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            MilterAddress::Tcp(a) => f.write_str(a),
            MilterAddress::Unix(p) => write!(f, "unix:{}", p.display()),
        }
    }
}

/// Which sessions a milter sees.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MilterClients {
    /// Every client.
    Any,
    /// Clients neither in `trusted_networks` nor authenticated.
    Untrusted,
    /// Trusted or authenticated clients (mail being relayed out).
    Relayed,
}

impl MilterClients {
    /// Does a milter with this scope see a client that is (or is not) trusted or
    /// authenticated?
    pub fn applies(self, relayed: bool) -> bool {
        match self {
            MilterClients::Any => true,
            MilterClients::Untrusted => !relayed,
            MilterClients::Relayed => relayed,
        }
    }
}

/// What a milter that is down, too slow or broken means for the mail.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OnFailure {
    /// 451 4.7.1 at the stage: the client tries again later.
    Tempfail,
    /// Go on without that milter for the rest of the session (logged).
    Accept,
}

/// `[authentication]`: which inbound checks run (`crate::authentication`) and what their
/// results may refuse. Every key defaults to false: a relay that is only a smart host
/// for its own network never needs them, and turning them on adds DNS lookups and a
/// header to every message, which an upgrade must not do unasked.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Authentication {
    /// SPF (RFC 7208) for the MAIL FROM identity, or the HELO identity for `<>`.
    pub spf: bool,
    /// DKIM (RFC 6376): every signature verified.
    pub dkim: bool,
    /// DMARC (RFC 7489); only together with `spf` and `dkim` (validated).
    pub dmarc: bool,
    /// A DMARC failure under p=reject refuses the message (550 5.7.1), under
    /// p=quarantine holds it in the quarantine; false: results in the header only.
    /// Only with `dmarc`.
    pub dmarc_enforce: bool,
    /// SPF "fail" refuses the message (550 5.7.23). Only with `spf`.
    pub spf_reject: bool,
}

impl Authentication {
    /// Whether any check runs.
    pub fn any(&self) -> bool {
        self.spf || self.dkim || self.dmarc
    }
}

/// The Prometheus endpoint.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metrics {
    pub address: SocketAddr,
}

/// `[cluster]`: where the shared counters live (`crate::cluster`, `docs/cluster.md`).
#[derive(Clone, PartialEq, Eq)]
pub struct Cluster {
    /// The Redis URL as written, password included: never print it, print
    /// [`Cluster::shown_url`].
    pub redis: String,
    /// This node's name (logs, `check-config`); default: the host name.
    pub node: String,
    /// The longest any Redis call may take before this node counts locally.
    pub timeout: Duration,
    /// `rediss://` only: the trust anchors (PEM) the server's certificate is checked
    /// against, in place of the system roots.
    pub ca_file: Option<PathBuf>,
    /// `rediss://` only: this node's certificate chain and key (PEM), for a Redis that
    /// wants client certificates (`tls-auth-clients yes`, its default).
    pub client_cert: Option<(PathBuf, PathBuf)>,
    /// Redis Sentinel addresses (`host:port`); when given, the host of `redis` is the
    /// name of the master they watch, and they say where it is.
    pub sentinels: Vec<String>,
    /// The password the sentinels ask for (their `requirepass`); never printed.
    pub sentinel_password: Option<String>,
}

impl Cluster {
    /// The URL with its password (and a bare user-info part, which may be one) as `***`.
    pub fn shown_url(&self) -> String {
        redact_url(&self.redis)
    }
}

/// Never the password, even in a debug print of the whole configuration.
impl std::fmt::Debug for Cluster {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.shown_url())
            .field("node", &self.node)
            .field("timeout", &self.timeout)
            .field("ca_file", &self.ca_file)
            .field("client_cert", &self.client_cert)
            .field("sentinels", &self.sentinels)
            .field(
                "sentinel_password",
                &self.sentinel_password.as_ref().map(|_| "***"),
            )
            .finish()
    }
}

/// `scheme://user:password@host...` as `scheme://user:***@host...`, and
/// `scheme://secret@host` (user-info without a colon: Redis would take it as a user name,
/// but it is often a misplaced password) as `scheme://***@host`. The user-info ends at
/// the last `@`, as URL parsers read it, so a password holding a raw `@` is hidden whole.
pub fn redact_url(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        // Not a URL: it cannot be told apart from a password, so show nothing of it.
        return "***".to_string();
    };
    let Some(at) = rest.rfind('@') else {
        return url.to_string();
    };
    let (userinfo, host) = rest.split_at(at);
    match userinfo.split_once(':') {
        Some((user, _)) => format!("{scheme}://{user}:***{host}"),
        None => format!("{scheme}://***{host}"),
    }
}

impl Config {
    /// The configuration used when there is no file: listen on 127.0.0.1:2525, trust
    /// loopback only, accept mail for no domain, never an open relay.
    pub fn builtin_defaults() -> Config {
        Config {
            source: None,
            hostname: validate::default_hostname(),
            spool_dir: PathBuf::from(validate::DEFAULT_SPOOL_DIR),
            max_message_size: validate::DEFAULT_MAX_MESSAGE_SIZE,
            max_recipients: validate::DEFAULT_MAX_RECIPIENTS,
            command_timeout: validate::DEFAULT_COMMAND_TIMEOUT,
            max_errors: validate::DEFAULT_MAX_ERRORS,
            ipv6_prefix: crate::policy::DEFAULT_IPV6_PREFIX,
            postmaster: None,
            own_addresses: Vec::new(),
            max_hops: postern_smtp::server::DEFAULT_MAX_HOPS,
            max_junk_commands: postern_smtp::server::DEFAULT_MAX_JUNK_COMMANDS,
            data_timeout: validate::DEFAULT_DATA_TIMEOUT,
            max_message_memory: validate::DEFAULT_MAX_MESSAGE_MEMORY,
            log_format: LogFormat::Text,
            privileges: Privileges::default(),
            listeners: vec![Listener::default_listener()],
            tls: None,
            relay: Relay::default_relay(),
            auth: Auth::default_auth(),
            routes: Vec::new(),
            delivery: Delivery::default_delivery(),
            filters: Vec::new(),
            dkim: Vec::new(),
            milters: Vec::new(),
            authentication: Authentication::default(),
            metrics: None,
            rate_limits: Vec::new(),
            cluster: None,
        }
    }

    /// Read and validate `path`.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Io {
            path: path.to_path_buf(),
            source,
        })?;
        Config::from_str(&text, path)
    }

    /// Validate `text` as if read from `origin`, which names the file in error messages and
    /// anchors relative paths (they resolve against `origin`'s directory).
    pub fn from_str(text: &str, origin: &Path) -> Result<Config, ConfigError> {
        let raw: raw::RawConfig =
            toml::from_str(text).map_err(|e| ConfigError::from_toml(&e, text, origin))?;
        validate::validate(raw, text, origin)
    }

    /// What `postern serve` uses: `path` if given, else `./postern.toml` if it exists, else
    /// the built-in defaults.
    pub fn load_default_or_file(path: Option<&Path>) -> Result<Config, ConfigError> {
        match path {
            Some(path) => Config::load(path),
            None => {
                let default = Path::new(DEFAULT_CONFIG_FILE);
                // `exists` rather than "try to open": a file that is there but unreadable
                // must be an error, not a silent fall-back to the defaults.
                if default.exists() {
                    Config::load(default)
                } else {
                    Ok(Config::builtin_defaults())
                }
            }
        }
    }

    /// The effective relay policy and settings in plain words, one fact per line, for
    /// `postern check-config`.
    pub fn describe(&self) -> String {
        describe::describe(self)
    }

    /// The first listener (SMTP, then metrics) whose address is not loopback: reachable
    /// from other hosts, so a root process behind it needs `user` or `allow_root`.
    /// `0.0.0.0` and `[::]` are every interface, so never loopback.
    pub fn off_loopback(&self) -> Option<SocketAddr> {
        self.listeners
            .iter()
            .map(|l| l.address)
            .chain(self.metrics.as_ref().map(|m| m.address))
            .find(|a| !a.ip().to_canonical().is_loopback())
    }

    /// Features this configuration asks for that this build does not implement yet, each a
    /// sentence naming the key. `serve` refuses to start when the list is not empty.
    pub fn unsupported_features(&self) -> Vec<String> {
        unsupported::unsupported_features(self)
    }
}

impl Listener {
    /// The listener used when the configuration has none.
    pub fn default_listener() -> Listener {
        Listener {
            address: SocketAddr::from(([127, 0, 0, 1], 2525)),
            tls: TlsMode::StartTls,
            require_tls: false,
            auth: AuthMode::None,
            allow_plaintext_auth: false,
            max_connections: validate::DEFAULT_MAX_CONNECTIONS,
            per_ip_connections: validate::DEFAULT_PER_IP_CONNECTIONS,
            proxy_protocol: false,
            proxy_from: Vec::new(),
            connection_rate: None,
        }
    }
}

impl Relay {
    /// No accepted domains, loopback trusted, authenticated relay, not open.
    pub fn default_relay() -> Relay {
        Relay {
            accepted_domains: Vec::new(),
            trusted_networks: validate::default_trusted_networks(),
            authenticated_relay: true,
            open_relay: false,
            recipients_file: None,
            dnsbl: Vec::new(),
        }
    }
}

impl Auth {
    /// No users file, PLAIN and LOGIN, 5 failures in 10 minutes lock out for 15 minutes,
    /// senders not restricted.
    pub fn default_auth() -> Auth {
        Auth {
            users_file: None,
            mechanisms: vec![Mechanism::Plain, Mechanism::Login],
            max_failures: validate::DEFAULT_MAX_FAILURES,
            failure_window: validate::DEFAULT_FAILURE_WINDOW,
            lockout: validate::DEFAULT_LOCKOUT,
            per_user_lockout: true,
            restrict_senders: false,
        }
    }
}

impl Delivery {
    /// System resolver, port 25, retries 1m 5m 15m 1h 4h, bounce after 5 days.
    pub fn default_delivery() -> Delivery {
        Delivery {
            dns_servers: Vec::new(),
            mx_port: validate::DEFAULT_MX_PORT,
            retry_schedule: validate::default_retry_schedule(),
            max_queue_lifetime: validate::DEFAULT_MAX_QUEUE_LIFETIME,
            max_concurrency: validate::DEFAULT_MAX_CONCURRENCY,
            per_domain_concurrency: validate::DEFAULT_PER_DOMAIN_CONCURRENCY,
            max_mx_addresses: validate::DEFAULT_MAX_MX_ADDRESSES,
            max_mx_sessions: validate::DEFAULT_MAX_MX_SESSIONS,
            connect_timeout: validate::DEFAULT_CONNECT_TIMEOUT,
            resolve_timeout: validate::DEFAULT_RESOLVE_TIMEOUT,
        }
    }
}
