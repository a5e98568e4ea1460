//! `[cluster]`: the counters several Postern nodes share through one Redis (interface:
//! "Rate limits and shared state", `docs/cluster.md`): AUTH failure counts and lockouts
//! ([`lockout`]) and the sliding-window counters of the rate limits ([`Cluster::window_take`]).
//!
//! Mail never waits on Redis longer than `[cluster] timeout` (200 ms by default). The
//! client is in one of three states:
//! - starting: not yet answered (start-up never waits for Redis);
//! - up: calls go to Redis, each bounded by the timeout;
//! - down: a call failed or ran over the timeout. One warning line, and from then on
//!   every call returns `None` at once without touching Redis, so the callers count on
//!   this node alone. A probe (PING, bounded) runs every second in every state; when it
//!   answers, one info line and back to up.
//!
//! A Redis that answers a call with an error (a key of the wrong type, a script error)
//! is not down: that call is counted locally, the failure metric grows, and a warning is
//! logged at most once a minute. Flapping between up and down logs at most one
//! down/up pair a minute; the metrics count every change.
//!
//! Trust: Redis is ours but its replies are parsed as untrusted (any shape that is not
//! the expected one is a failed call, never a panic). Keys hold client addresses and user
//! names, which are hostile: they only ever go into keys as data, never into the scripts'
//! code. The URL's password is never printed (`config::redact_url`), and error texts are
//! scrubbed of it before they are logged.
//!
//! Not supported: Redis Cluster (the lockout script touches several keys that would
//! live in different slots). Redis Sentinel is: with `sentinels`, the probe asks them
//! where the master is and follows a failover (`Cluster::follow_master`).

pub mod lockout;
#[cfg(test)]
mod tests;

use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::{Duration, Instant};

use anyhow::Context;
use redis::aio::{ConnectionManager, ConnectionManagerConfig};
use redis::{ErrorKind, RedisError, ServerErrorKind, Value};

use crate::metrics::Metrics;

/// Every key Postern writes starts with this.
pub const KEY_PREFIX: &str = "postern:";
/// Buckets of a sliding window (the same as the rate limits' local table): the count is
/// the sum of the current bucket and the `BUCKETS` before it.
pub const BUCKETS: u32 = 16;
/// How often the probe asks Redis whether it answers.
const PROBE_EVERY: Duration = Duration::from_secs(1);
/// At most one down/up pair of log lines (and one "answered with an error") per this.
const LOG_EVERY: Duration = Duration::from_secs(60);
/// Durations sent to the scripts are capped here (about 300 years in microseconds), so
/// no configured value overflows a Redis expiry or loses precision in Lua's doubles.
const MAX_US: u128 = 10_000_000_000_000_000;

const STARTING: u8 = 0;
const UP: u8 = 1;
const DOWN: u8 = 2;

/// One counter of [`Cluster::window_take`].
#[derive(Debug, Clone, Copy)]
pub struct WindowCounter<'a> {
    /// Without [`KEY_PREFIX`], e.g. `rl:roaming-users:m:bob`.
    pub key: &'a str,
    pub window: Duration,
    pub limit: u64,
    pub amount: u64,
}

/// The answer of [`Cluster::window_take`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Taken {
    /// Every amount was added; where, per counter in order.
    Added(Vec<i64>),
    /// Counter `index` (0-based) would exceed its limit, at `count`; nothing was added.
    Over { index: usize, count: u64 },
}

/// The Lua scripts, each loaded once per connection by its hash (EVALSHA; the client
/// sends the script itself on NOSCRIPT).
struct Scripts {
    window_add: redis::Script,
    window_refund: redis::Script,
    auth_settle: redis::Script,
}

/// What the log lines last said, so that a flapping Redis does not flood the log.
#[derive(Default)]
struct LogGate {
    /// When the last "unreachable" line was written.
    last_down: Option<Instant>,
    /// Whether the current down spell was logged (its "answers again" is logged too).
    down_logged: bool,
    /// When the last "answered with an error" line was written.
    last_error: Option<Instant>,
}

/// The shared-counter client of one configuration; cheap to share (`Arc`).
pub struct Cluster {
    config: crate::config::Cluster,
    /// The URL with the password as `***`, for every log line.
    shown: String,
    /// The passwords (Redis's, the sentinels'), scrubbed from error texts before they
    /// are logged.
    secrets: Vec<String>,
    /// The connection to Redis (with `sentinels`: to the master they name; a failover
    /// swaps in a new one).
    manager: arc_swap::ArcSwap<ConnectionManager>,
    /// With `sentinels`: asks them where the master is, once a second (`probe_once`).
    sentinel: Option<Sentinel>,
    /// The settings every connection manager is made with.
    manager_config: ConnectionManagerConfig,
    /// What `ca_file`, `cert_file` and `key_file` held when this client was made (a
    /// reload that finds them changed makes a new client).
    tls_files: Option<u64>,
    state: AtomicU8,
    /// Replaced or removed by a reload: sessions that started before may still use it,
    /// but it no longer probes, logs its state or writes the shared gauge.
    retired: std::sync::atomic::AtomicBool,
    gate: Mutex<LogGate>,
    metrics: Arc<Metrics>,
    scripts: Scripts,
    /// Unique failure marks across nodes: a random prefix and a counter.
    nonce_prefix: u64,
    nonce: AtomicU64,
}

impl std::fmt::Debug for Cluster {
    /// The redacted URL and the state: never the password.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Cluster")
            .field("redis", &self.shown)
            .field("node", &self.config.node)
            .field("up", &self.is_up())
            .finish()
    }
}

impl Cluster {
    /// A client for `config` (validated: the URL parses). Never waits for Redis: the
    /// connection is made by the first probe, in the background, and until Redis has
    /// answered every call returns `None`. Needs a tokio runtime.
    pub fn new(
        config: &crate::config::Cluster,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<Arc<Cluster>> {
        // rediss:// builds its rustls config from the process default provider: ours is
        // ring (the only one compiled in). Installing it twice is harmless (an Err).
        let _ = rustls::crypto::ring::default_provider().install_default();
        let shown = config.shown_url();
        let certificates = tls_material(config)?;
        let client = match &certificates {
            // The PEM was parsed above: a file that holds no certificate (or key) is an
            // error at start and at reload, not a node that silently counts alone.
            Some(certs) => redis::Client::build_with_tls(config.redis.as_str(), certs.clone())
                .map_err(|e| anyhow::anyhow!("[cluster] TLS files: {e}"))?,
            None => redis::Client::open(config.redis.as_str())
                .with_context(|| format!("[cluster] redis {shown}"))?,
        };
        let secrets: Vec<String> = [
            client.get_connection_info().redis_settings().password(),
            config.sentinel_password.as_deref(),
        ]
        .into_iter()
        .flatten()
        .filter(|p| !p.is_empty())
        .map(str::to_string)
        .collect();
        let bound = config.timeout;
        let manager_config = ConnectionManagerConfig::new()
            .set_connection_timeout(Some(bound))
            .set_response_timeout(Some(bound))
            // Our probe retries every second; the manager need not retry on its own.
            .set_number_of_retries(1)
            .set_min_delay(Duration::from_millis(50))
            .set_max_delay(PROBE_EVERY);
        let sentinel = if config.sentinels.is_empty() {
            None
        } else {
            Some(
                Sentinel::new(config, &client, certificates.clone())
                    .with_context(|| format!("[cluster] sentinels for {shown}"))?,
            )
        };
        // With sentinels the URL's host is the master's name, not an address: the first
        // probe asks them and makes the real connection.
        let manager = ConnectionManager::new_lazy_with_config(client, manager_config.clone())
            .with_context(|| format!("[cluster] redis {shown}"))?;
        let cluster = Arc::new(Cluster {
            config: config.clone(),
            shown,
            secrets,
            manager: arc_swap::ArcSwap::from_pointee(manager),
            sentinel,
            tls_files: certificates.as_ref().map(tls_digest),
            manager_config,
            state: AtomicU8::new(STARTING),
            retired: std::sync::atomic::AtomicBool::new(false),
            gate: Mutex::new(LogGate::default()),
            metrics,
            scripts: Scripts {
                window_add: redis::Script::new(include_str!("window_add.lua")),
                window_refund: redis::Script::new(include_str!("window_refund.lua")),
                auth_settle: redis::Script::new(include_str!("auth_settle.lua")),
            },
            nonce_prefix: rand::random(),
            nonce: AtomicU64::new(0),
        });
        tokio::spawn(probe(Arc::downgrade(&cluster)));
        Ok(cluster)
    }

    /// This node's name (`[cluster] node`).
    pub fn node(&self) -> &str {
        &self.config.node
    }

    /// Whether calls go to Redis now (false while starting and while down).
    pub fn is_up(&self) -> bool {
        self.state.load(Ordering::Relaxed) == UP
    }

    /// The configuration this client was made for (a reload keeps the client when it
    /// is unchanged).
    pub fn config(&self) -> &crate::config::Cluster {
        &self.config
    }

    /// Whether a reload with `config` may keep this client: the same section, and the
    /// same contents in its TLS files (a certificate renewed in place needs a new
    /// client). A file that cannot be read now: not the same (the new client's error
    /// then fails the reload, naming it).
    pub fn serves(&self, config: &crate::config::Cluster) -> bool {
        if &self.config != config {
            return false;
        }
        match (&self.tls_files, tls_material(config)) {
            (None, Ok(None)) => true,
            (Some(old), Ok(Some(new))) => *old == tls_digest(&new),
            _ => false,
        }
    }

    /// The URL as it may be printed.
    pub fn shown_url(&self) -> &str {
        &self.shown
    }

    /// Check-and-add to several sliding-window counters at once, all or none (the
    /// `[[rate_limit]]`s of one MAIL or RCPT: one round trip, however many limits apply).
    /// Each counter's key is built by the caller (e.g. `rl:roaming-users:m:...`) and
    /// stored under [`KEY_PREFIX`]; its amount is added when the window's count plus it
    /// stays within its limit. `Added(buckets)`: every amount was
    /// added, `buckets[i]` is where counter `i`'s went; `Over { index, count }`: counter
    /// `index`, the first in order whose count plus amount is over its limit, holds
    /// `count`, and nothing was added anywhere. `None`: Redis is down, slow or failed.
    ///
    /// The window is [`BUCKETS`] buckets of `window / 16` (in microseconds, at least 1)
    /// by Redis's clock; bucket `n = floor(now_us / width)`, and the count is the sum of
    /// buckets `n - 16 ..= n`, which cover at least the whole window: no span of
    /// `window` ever holds more than `limit`, and counting errs towards refusing for at
    /// most one bucket width. Atomic (a Lua script); each key expires by itself `window +
    /// width` after its last add.
    pub async fn window_take(&self, counters: &[WindowCounter<'_>]) -> Option<Taken> {
        if counters.is_empty() {
            return Some(Taken::Added(Vec::new()));
        }
        let mut con = self.connection();
        let mut invocation = self.scripts.window_add.prepare_invoke();
        for c in counters {
            let (width, expire_ms) = window_math(c.window);
            invocation
                .key(format!("{KEY_PREFIX}{}", c.key))
                .arg(width)
                .arg(c.limit)
                .arg(c.amount)
                .arg(expire_ms);
        }
        let reply: Value = self
            .call("window_take", invocation.invoke_async(&mut con))
            .await?;
        match ints(&reply).as_deref() {
            Some([1, buckets @ ..]) if buckets.len() == counters.len() => {
                Some(Taken::Added(buckets.to_vec()))
            }
            Some([0, index, count]) if (1..=counters.len() as i64).contains(index) => {
                Some(Taken::Over {
                    index: usize::try_from(*index - 1).unwrap_or(0),
                    count: u64::try_from(*count).unwrap_or(0),
                })
            }
            _ => self.odd_reply("window_take", &reply),
        }
    }

    /// Takes back amounts added earlier (a transaction that did not reach 250), for
    /// several counters in one round trip: each `(key, bucket, amount)`, the bucket as
    /// [`Cluster::window_take`] gave it. Best effort and bounded like every call; never
    /// below zero.
    pub async fn window_give_back(&self, given: &[(&str, i64, u64)]) {
        if given.is_empty() {
            return;
        }
        let mut con = self.connection();
        let mut invocation = self.scripts.window_refund.prepare_invoke();
        for (key, bucket, amount) in given {
            invocation
                .key(format!("{KEY_PREFIX}{key}"))
                .arg(*bucket)
                .arg(*amount);
        }
        let _: Option<Value> = self
            .call("window_refund", invocation.invoke_async(&mut con))
            .await;
    }

    /// A unique name for one failure mark (unique across nodes and calls).
    fn nonce(&self) -> String {
        let n = self.nonce.fetch_add(1, Ordering::Relaxed);
        format!("{:x}.{n:x}", self.nonce_prefix)
    }

    /// A reload replaced or removed this client: from now on it stops probing and
    /// leaves the state gauge and the log to its successor (calls of the sessions that
    /// still hold it go on; once it is down it stays down, and they count locally).
    pub fn retire(&self) {
        self.retired.store(true, Ordering::Relaxed);
    }

    fn is_retired(&self) -> bool {
        self.retired.load(Ordering::Relaxed)
    }

    /// The most one command waits on Redis (`[cluster] timeout`).
    pub fn timeout(&self) -> Duration {
        self.config.timeout
    }

    /// Runs one Redis call within the bound, or not at all when Redis is not up.
    async fn call<T>(
        &self,
        what: &'static str,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        self.call_within(what, self.config.timeout, call).await
    }

    /// [`Cluster::call`] within `bound` (what is left of one command's bound when it
    /// makes more than one call); a call that runs over it marks Redis down, as a call
    /// over the whole bound does.
    async fn call_within<T>(
        &self,
        what: &'static str,
        bound: Duration,
        call: impl Future<Output = redis::RedisResult<T>>,
    ) -> Option<T> {
        if !self.is_up() || bound.is_zero() {
            return None;
        }
        let started = Instant::now();
        let result = tokio::time::timeout(bound, call).await;
        let took = started.elapsed();
        self.metrics.cluster_redis_latency(took);
        match result {
            Ok(Ok(v)) => Some(v),
            Ok(Err(e)) if answered(&e) => {
                self.metrics.cluster_redis_failure();
                self.log_error(what, &self.scrub(&e.to_string()));
                None
            }
            Ok(Err(e)) => {
                self.metrics.cluster_redis_failure();
                self.mark_down(&self.scrub(&e.to_string()));
                None
            }
            // Over what was left of a command's bound, but not over the whole bound (an
            // AUTH's settling after a slowish check): this call counts locally, Redis is
            // not called down for it.
            Err(_) if bound < self.config.timeout => {
                self.metrics.cluster_redis_failure();
                self.log_error(
                    what,
                    &format!(
                        "no answer within the {} left of this command's bound",
                        crate::config::format_duration(bound)
                    ),
                );
                None
            }
            Err(_) => {
                self.metrics.cluster_redis_failure();
                self.mark_down(&format!(
                    "{what}: no answer within {}",
                    crate::config::format_duration(bound)
                ));
                None
            }
        }
    }

    /// A reply of a shape the script never returns: counted locally, like an error.
    fn odd_reply<T>(&self, what: &'static str, reply: &Value) -> Option<T> {
        self.metrics.cluster_redis_failure();
        // Its shape, not its whole text: a hostile reply may be huge.
        let text = match reply {
            Value::Array(items) => format!("an array of {} items", items.len()),
            Value::BulkString(b) => format!("a string of {} octets", b.len()),
            Value::SimpleString(s) => format!("a status of {} octets", s.len()),
            Value::Int(n) => format!("the integer {n}"),
            Value::Nil => "nil".to_string(),
            _ => "a reply of another kind".to_string(),
        };
        self.log_error(what, &format!("unexpected reply {text}"));
        None
    }

    fn scrub(&self, text: &str) -> String {
        self.secrets
            .iter()
            .fold(text.to_string(), |t, s| t.replace(s.as_str(), "***"))
    }

    fn gate(&self) -> std::sync::MutexGuard<'_, LogGate> {
        self.gate.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Redis answered a call with an error: this call counts locally, Redis stays up.
    fn log_error(&self, what: &str, error: &str) {
        let now = Instant::now();
        let mut gate = self.gate();
        if gate
            .last_error
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
        {
            gate.last_error = Some(now);
            drop(gate);
            tracing::warn!(redis = %self.shown, node = %self.config.node, call = what,
                error = %error, "redis answered with an error, this call counted locally");
        }
    }

    fn mark_down(&self, error: &str) {
        if self.state.swap(DOWN, Ordering::Relaxed) == DOWN || self.is_retired() {
            return;
        }
        self.metrics.cluster_redis_up(false);
        let now = Instant::now();
        let mut gate = self.gate();
        let log = gate
            .last_down
            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
        gate.down_logged = log;
        if log {
            gate.last_down = Some(now);
        }
        drop(gate);
        if log {
            tracing::warn!(redis = %self.shown, node = %self.config.node, error = %error,
                "redis unreachable or slow, counting locally");
        } else {
            tracing::debug!(redis = %self.shown, error = %error, "redis down again");
        }
    }

    fn mark_up(&self) {
        let before = self.state.swap(UP, Ordering::Relaxed);
        if before == UP || self.is_retired() {
            return;
        }
        self.metrics.cluster_redis_up(true);
        let logged = std::mem::take(&mut self.gate().down_logged);
        if before == STARTING {
            tracing::info!(redis = %self.shown, node = %self.config.node,
                "redis answers, counters shared");
        } else if logged {
            tracing::info!(redis = %self.shown, node = %self.config.node,
                "redis answers again, counters shared");
        } else {
            tracing::debug!(redis = %self.shown, "redis up again");
        }
    }

    /// The connection calls go through now.
    pub(super) fn connection(&self) -> ConnectionManager {
        ConnectionManager::clone(&self.manager.load())
    }

    /// With `sentinels`: asks them where the master is and, when it has moved (a
    /// failover), connects there from now on. Off the mail path (the probe), so it has
    /// a bound of its own, [`SENTINEL_BOUND`]. When no sentinel answers, the connection
    /// in use stays: the PING that follows decides whether Redis is down.
    async fn follow_master(&self, sentinel: &Sentinel) {
        let client = match sentinel.master(SENTINEL_BOUND).await {
            Ok(client) => client,
            Err(e) => {
                self.log_error("sentinels", &self.scrub(&e));
                return;
            }
        };
        let addr = client.get_connection_info().addr().to_string();
        let mut current = sentinel.current.lock().unwrap_or_else(|p| p.into_inner());
        if current.as_deref() == Some(addr.as_str()) {
            return;
        }
        match ConnectionManager::new_lazy_with_config(client, self.manager_config.clone()) {
            Ok(manager) => {
                self.manager.store(Arc::new(manager));
                *current = Some(addr.clone());
                drop(current);
                if !self.is_retired() {
                    tracing::info!(redis = %self.shown, node = %self.config.node, master = %addr,
                        "redis master named by the sentinels");
                }
            }
            Err(e) => {
                drop(current);
                self.log_error("sentinels", &self.scrub(&e.to_string()));
            }
        }
    }

    /// One probe: PING within the bound (with `sentinels`, after asking them where the
    /// master is). Its answer decides the state.
    async fn probe_once(&self) {
        // The sentinels are asked whenever Redis is not up (a failover shows as a
        // master that is gone or refuses to write), and every SENTINEL_EVERY probes
        // otherwise: each answer costs a connection to the master they name.
        if let Some(sentinel) = &self.sentinel {
            let n = sentinel.probes.fetch_add(1, Ordering::Relaxed);
            if !self.is_up() || n % SENTINEL_EVERY == 0 {
                self.follow_master(sentinel).await;
            }
        }
        let mut con = self.connection();
        let started = Instant::now();
        let cmd = redis::cmd("PING");
        let ping = cmd.query_async::<String>(&mut con);
        let result = tokio::time::timeout(self.config.timeout, ping).await;
        self.metrics.cluster_redis_latency(started.elapsed());
        match result {
            Ok(Ok(pong)) if pong == "PONG" => self.mark_up(),
            Ok(Ok(other)) => {
                let other: String = other.chars().take(64).collect();
                self.mark_down(&format!("PING answered {other:?}"));
            }
            Ok(Err(e)) => self.mark_down(&self.scrub(&e.to_string())),
            Err(_) => self.mark_down(&format!(
                "PING: no answer within {}",
                crate::config::format_duration(self.config.timeout)
            )),
        }
        // Every second, not only on changes: a client made by a reload that then failed
        // (and was dropped) must not leave its state in the gauge.
        if !self.is_retired() {
            self.metrics.cluster_redis_up(self.is_up());
        }
    }
}

/// How long the probe may spend asking the sentinels where the master is.
const SENTINEL_BOUND: Duration = Duration::from_secs(1);
/// While Redis answers, the sentinels are asked once in this many probes (seconds).
const SENTINEL_EVERY: u64 = 10;

/// The sentinels of `[cluster] sentinels` and what they said last.
struct Sentinel {
    /// One client per sentinel, asked side by side: the first good answer wins, so one
    /// sentinel that hangs (its machine gone) holds nothing up.
    clients: Vec<Arc<tokio::sync::Mutex<redis::sentinel::SentinelClient>>>,
    /// The master's address the connection manager goes to now.
    current: Mutex<Option<String>>,
    /// Probes made, to ask the sentinels only every [`SENTINEL_EVERY`] while up.
    probes: AtomicU64,
}

impl Sentinel {
    /// The master is the URL's host name as the sentinels know it (`sentinel monitor
    /// NAME ...`); the URL's user, password, database and TLS (with `ca_file`,
    /// `cert_file`, `key_file`) apply to it; `sentinel_password` to the sentinels.
    fn new(
        config: &crate::config::Cluster,
        client: &redis::Client,
        certificates: Option<redis::TlsCertificates>,
    ) -> anyhow::Result<Self> {
        use redis::sentinel::{SentinelClientBuilder, SentinelServerType};
        let info = client.get_connection_info();
        let (name, tls) = match info.addr() {
            redis::ConnectionAddr::Tcp(host, _) => (host.clone(), false),
            redis::ConnectionAddr::TcpTls { host, .. } => (host.clone(), true),
            other => anyhow::bail!("the master's name must be the URL's host, not {other}"),
        };
        let settings = info.redis_settings();
        let mut clients = Vec::new();
        for address in &config.sentinels {
            let (host, port) = split_host_port(address)
                .ok_or_else(|| anyhow::anyhow!("{address}: not host:port"))?;
            let mut b = SentinelClientBuilder::new(
                [redis::ConnectionAddr::Tcp(host, port)],
                &name,
                SentinelServerType::Master,
            )?
            .set_client_to_redis_db(settings.db());
            if let Some(user) = settings.username() {
                b = b.set_client_to_redis_username(user);
            }
            if let Some(password) = settings.password() {
                b = b.set_client_to_redis_password(password);
            }
            if tls {
                b = b.set_client_to_redis_tls_mode(redis::TlsMode::Secure);
            }
            if let Some(certs) = &certificates {
                b = b.set_client_to_redis_certificates(certs.clone());
            }
            if let Some(password) = &config.sentinel_password {
                b = b.set_client_to_sentinel_password(password);
            }
            clients.push(Arc::new(tokio::sync::Mutex::new(b.build()?)));
        }
        Ok(Sentinel {
            clients,
            current: Mutex::new(None),
            probes: AtomicU64::new(0),
        })
    }

    /// A client for the master, from the first sentinel that names one within `bound`;
    /// otherwise why not (the last error).
    async fn master(&self, bound: Duration) -> Result<redis::Client, String> {
        let mut asking = tokio::task::JoinSet::new();
        for c in &self.clients {
            let c = Arc::clone(c);
            asking.spawn(async move {
                tokio::time::timeout(bound, async { c.lock().await.async_get_client().await }).await
            });
        }
        let mut why = format!("no answer within {}", crate::config::format_duration(bound));
        while let Some(answer) = asking.join_next().await {
            match answer {
                Ok(Ok(Ok(client))) => return Ok(client),
                Ok(Ok(Err(e))) => why = e.to_string(),
                Ok(Err(_)) | Err(_) => {}
            }
        }
        Err(why)
    }
}

/// `host:port` or `[v6]:port`, as validated by the configuration.
fn split_host_port(address: &str) -> Option<(String, u16)> {
    let (host, port) = address.rsplit_once(':')?;
    let host = host
        .strip_prefix('[')
        .and_then(|h| h.strip_suffix(']'))
        .unwrap_or(host);
    Some((host.to_string(), port.parse().ok()?))
}

/// Reads and checks `ca_file`, `cert_file` and `key_file`: `None` when none is set.
fn tls_material(config: &crate::config::Cluster) -> anyhow::Result<Option<redis::TlsCertificates>> {
    use rustls_pki_types::pem::PemObject;
    if config.ca_file.is_none() && config.client_cert.is_none() {
        return Ok(None);
    }
    let read = |key: &str, path: &std::path::Path| {
        std::fs::read(path).with_context(|| format!("[cluster] {key} {}", path.display()))
    };
    let certificates = |key: &str, path: &std::path::Path| -> anyhow::Result<Vec<u8>> {
        let pem = read(key, path)?;
        let n = rustls_pki_types::CertificateDer::pem_slice_iter(&pem)
            .collect::<Result<Vec<_>, _>>()
            .map_err(|e| anyhow::anyhow!("[cluster] {key} {}: {e}", path.display()))?
            .len();
        anyhow::ensure!(
            n > 0,
            "[cluster] {key} {}: no PEM certificate in it",
            path.display()
        );
        Ok(pem)
    };
    let root_cert = match &config.ca_file {
        Some(path) => Some(certificates("ca_file", path)?),
        None => None,
    };
    let client_tls = match &config.client_cert {
        Some((cert, key)) => {
            let client_key = read("key_file", key)?;
            rustls_pki_types::PrivateKeyDer::from_pem_slice(&client_key)
                .map_err(|e| anyhow::anyhow!("[cluster] key_file {}: {e}", key.display()))?;
            Some(redis::ClientTlsConfig {
                client_cert: certificates("cert_file", cert)?,
                client_key,
            })
        }
        None => None,
    };
    Ok(Some(redis::TlsCertificates {
        client_tls,
        root_cert,
    }))
}

/// A hash of the files' contents, to tell whether they changed (the key itself is not
/// kept twice in memory).
fn tls_digest(certs: &redis::TlsCertificates) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    certs.root_cert.hash(&mut h);
    if let Some(c) = &certs.client_tls {
        c.client_cert.hash(&mut h);
        c.client_key.hash(&mut h);
    }
    h.finish()
}

/// The probe task: every second for as long as the client is in use (it holds only a
/// weak reference, so a reload that replaces the client ends it).
async fn probe(cluster: Weak<Cluster>) {
    let mut every = tokio::time::interval(PROBE_EVERY);
    every.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        every.tick().await;
        let Some(c) = cluster.upgrade().filter(|c| !c.is_retired()) else {
            return;
        };
        c.probe_once().await;
    }
}

/// An error that Redis itself answered (the connection is fine): a script error, a key
/// of the wrong type, a reply of the wrong type, a command the ACL does not allow.
/// Anything else (I/O, timeouts, loading,
/// read-only replica, refused authentication) means this Redis cannot serve us now.
fn answered(e: &RedisError) -> bool {
    if e.is_io_error() || e.is_timeout() || e.is_connection_dropped() || e.is_connection_refusal() {
        return false;
    }
    matches!(
        e.kind(),
        ErrorKind::Server(ServerErrorKind::ResponseError)
            | ErrorKind::Server(ServerErrorKind::NoScript)
            // An ACL that lacks a command: PING still works, so "down" would flap.
            | ErrorKind::Server(ServerErrorKind::NoPerm)
            | ErrorKind::Extension
            | ErrorKind::Parse
            | ErrorKind::UnexpectedReturnType
    )
}

/// A reply that is an array of integers (or of strings holding integers).
fn ints(v: &Value) -> Option<Vec<i64>> {
    let Value::Array(items) = v else {
        return None;
    };
    items
        .iter()
        .map(|item| match item {
            Value::Int(n) => Some(*n),
            Value::BulkString(b) => std::str::from_utf8(b).ok()?.parse().ok(),
            Value::SimpleString(s) => s.parse().ok(),
            _ => None,
        })
        .collect()
}

/// A duration in whole microseconds, at least 1, at most [`MAX_US`].
fn micros(d: Duration) -> u64 {
    u64::try_from(d.as_micros().clamp(1, MAX_US)).unwrap_or(1)
}

/// A duration in whole milliseconds (rounded up), at least 1, at most `MAX_US / 1000`.
fn millis(d: Duration) -> u64 {
    micros(d).div_ceil(1000)
}

/// The bucket width (microseconds) of `window`, and the key's expiry (milliseconds):
/// the window plus one bucket, so the oldest bucket still counted is never lost early.
fn window_math(window: Duration) -> (u64, u64) {
    let whole = micros(window);
    let width = (whole / u64::from(BUCKETS)).max(1);
    (width, whole.saturating_add(width).div_ceil(1000).max(1))
}
