//! Listeners: bind the configured addresses, accept connections, enforce the
//! connection limits, and hand each connection to a session task.
//!
//! Limits count every connection from accept to close (interface: "Connections"), per
//! listener in total and per client IP. A connection over a limit gets one line,
//! `421 4.7.0`, written without waiting on the client, and is closed; the decision log
//! names the limit. IPv6 clients are counted per block of `ipv6_prefix` bits (a /64 by
//! default, `policy::client_block`): one site holds a whole /64, and counting per address
//! would give it 2^64 allowances. The per-IP table holds only blocks with open
//! connections, so it is bounded by `max_connections`.
//!
//! A `proxy_protocol` listener (interface: "Listeners behind a load balancer") takes
//! connections only from `proxy_from`, reads the PROXY header first (before any TLS and
//! any banner, within `command_timeout` and [`proxy::MAX_HEADER`] octets) and from then
//! on treats the address it carries as the client: the per-IP slot is taken for that
//! address, after the header. Anything wrong closes the connection without a word.
//!
//! `connection_rate` bounds the new connections per client (per block, as above) in a
//! sliding window (`policy::window`: bounded memory, no burst at a window edge), on this
//! node; the connection over it gets `421 4.7.0` and is closed before any TLS handshake
//! or banner, so a flood costs an accept and one write. Only connections that got a
//! session count. Clients in `trusted_networks` are exempt, as Postfix exempts
//! `$mynetworks` from its anvil limits (`smtpd_client_event_limit_exceptions`): the
//! internal servers a relay exists for make many connections. So are a load balancer's
//! own connections on a `proxy_protocol` listener (v2 LOCAL, v1 UNKNOWN: its health
//! checks, which would otherwise mark the node dead).

use std::collections::HashMap;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::sync::atomic::{AtomicU8, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use arc_swap::ArcSwap;
use ipnet::IpNet;
use postern_smtp::{catalogue, proxy};
use socket2::{Domain, Protocol, Socket, Type};
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_util::task::TaskTracker;

use crate::config::Rate;
use crate::maillog;
use crate::policy::client_block;
use crate::policy::window::{DEFAULT_CAPACITY, Table};
use crate::session::{self, Settings, Shared};

/// Binds a listening socket. IPv6 addresses are bound IPv6-only so that `[::]:25` and
/// `0.0.0.0:25` can be configured side by side.
pub fn bind(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    if addr.is_ipv6() {
        socket.set_only_v6(true)?;
    }
    // Restart without waiting for TIME_WAIT sockets of the previous run to expire.
    socket.set_reuse_address(true)?;
    socket.set_nonblocking(true)?;
    socket.bind(&addr.into())?;
    socket.listen(1024)?;
    TcpListener::from_std(socket.into())
}

/// Open connections of one listener.
#[derive(Debug)]
pub struct ConnectionLimits {
    /// The limits may change on a reload; open connections keep their slots.
    max_total: AtomicUsize,
    max_per_ip: AtomicUsize,
    /// IPv6 clients are counted per block of this many leading bits.
    ipv6_prefix: AtomicU8,
    total: AtomicUsize,
    per_ip: Mutex<HashMap<IpAddr, usize>>,
    /// Connections of a proxy listener still waiting for their PROXY header: they count
    /// toward `max_total` (interface: every connection from accept to close).
    waiting: AtomicUsize,
    /// `connection_rate` and the new connections per block in its window.
    rate: Mutex<Option<(Rate, Table)>>,
}

/// Held while a proxy connection's header is read; counts toward `max_connections`.
#[derive(Debug)]
pub struct Waiting {
    limits: Arc<ConnectionLimits>,
}

impl Drop for Waiting {
    fn drop(&mut self) {
        self.limits.waiting.fetch_sub(1, Ordering::AcqRel);
    }
}

/// Held for the life of a connection; releases its slots when dropped.
#[derive(Debug)]
pub struct ConnectionSlot {
    limits: Arc<ConnectionLimits>,
    /// The client's block (`client_block`), as counted.
    block: IpAddr,
}

impl ConnectionLimits {
    /// `max_per_ip` connections per client: per IPv4 address, per IPv6 block of
    /// `ipv6_prefix` bits.
    pub fn new(max_total: usize, max_per_ip: usize, ipv6_prefix: u8) -> Arc<ConnectionLimits> {
        Arc::new(ConnectionLimits {
            max_total: AtomicUsize::new(max_total),
            max_per_ip: AtomicUsize::new(max_per_ip),
            ipv6_prefix: AtomicU8::new(ipv6_prefix),
            total: AtomicUsize::new(0),
            per_ip: Mutex::new(HashMap::new()),
            waiting: AtomicUsize::new(0),
            rate: Mutex::new(None),
        })
    }

    /// New limits (a reload). Connections over them stay open; new ones wait for room.
    /// The connection-rate counts carry over while its window stays the same.
    pub fn set(&self, limits: &Limits) {
        let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
        *rate = match (rate.take(), limits.connection_rate) {
            (Some((old, table)), Some(new)) if old.window == new.window => Some((new, table)),
            (_, Some(new)) => Some((new, Table::new(new.window, DEFAULT_CAPACITY, rate_clock()))),
            (_, None) => None,
        };
        drop(rate);
        self.max_total
            .store(limits.max_connections, Ordering::Release);
        self.max_per_ip
            .store(limits.per_ip_connections, Ordering::Release);
        self.ipv6_prefix
            .store(limits.ipv6_prefix, Ordering::Release);
    }

    fn max_total(&self) -> usize {
        self.max_total.load(Ordering::Acquire)
    }

    /// Counts a connection whose client is not known yet (a PROXY header to read), or
    /// names the limit that is full.
    pub fn hold(self: &Arc<Self>) -> Result<Waiting, (&'static str, usize)> {
        let _guard = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let max_total = self.max_total();
        if self.in_use() >= max_total {
            return Err(("max_connections", max_total));
        }
        self.waiting.fetch_add(1, Ordering::AcqRel);
        Ok(Waiting {
            limits: Arc::clone(self),
        })
    }

    fn in_use(&self) -> usize {
        self.total.load(Ordering::Acquire) + self.waiting.load(Ordering::Acquire)
    }

    /// Takes a slot for a new connection from `ip`, or names the limit that is full.
    /// `trusted`: the client is in `trusted_networks` (exempt from `connection_rate`).
    pub fn acquire(
        self: &Arc<Self>,
        ip: IpAddr,
        trusted: bool,
    ) -> Result<ConnectionSlot, (&'static str, usize)> {
        let block = client_block(ip, self.ipv6_prefix.load(Ordering::Acquire));
        // Sessions of a proxy listener acquire from their own tasks, so the total is
        // checked and incremented under the lock; releases only make room.
        let mut per_ip = self.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        let max_total = self.max_total();
        if self.in_use() >= max_total {
            return Err(("max_connections", max_total));
        }
        let max_per_ip = self.max_per_ip.load(Ordering::Acquire);
        let n = per_ip.entry(block).or_insert(0);
        if *n >= max_per_ip {
            return Err(("per_ip_connections", max_per_ip));
        }
        if !trusted {
            let mut rate = self.rate.lock().unwrap_or_else(|e| e.into_inner());
            if let Some((limit, table)) = rate.as_mut()
                && table.add(&block, limit.count, 1, rate_clock()).is_err()
            {
                if *n == 0 {
                    per_ip.remove(&block);
                }
                return Err((
                    "connection_rate",
                    usize::try_from(limit.count).unwrap_or(usize::MAX),
                ));
            }
        }
        *n += 1;
        self.total.fetch_add(1, Ordering::AcqRel);
        drop(per_ip);
        Ok(ConnectionSlot {
            limits: Arc::clone(self),
            block,
        })
    }

    /// Open connections now.
    pub fn open(&self) -> usize {
        self.total.load(Ordering::Acquire)
    }
}

/// The clock of `connection_rate`: tokio's, so that tests with paused time control it.
fn rate_clock() -> std::time::Instant {
    tokio::time::Instant::now().into_std()
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        let mut per_ip = self.limits.per_ip.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(n) = per_ip.get_mut(&self.block) {
            *n -= 1;
            if *n == 0 {
                per_ip.remove(&self.block);
            }
        }
        self.limits.total.fetch_sub(1, Ordering::AcqRel);
    }
}

/// What an accept loop enforces, from its `[[listener]]` (and `ipv6_prefix`).
#[derive(Debug, Clone)]
pub struct Limits {
    pub address: SocketAddr,
    pub max_connections: usize,
    pub per_ip_connections: usize,
    pub ipv6_prefix: u8,
    /// `Some(proxy_from)` on a `proxy_protocol` listener.
    pub proxy_from: Option<Vec<IpNet>>,
    pub connection_rate: Option<Rate>,
}

/// What a new connection on a listener gets: the listener's limits and session
/// settings, and the state of the configuration they belong to. A reload replaces it;
/// sessions keep the one they started with.
pub struct Current {
    pub limits: Limits,
    pub settings: Arc<Settings>,
    pub shared: Arc<Shared>,
}

/// Accepts connections until `stop` (shutdown, or the listener was removed by a reload);
/// each session runs in its own task on `tracker` with the [`Current`] of its accept.
/// `shutdown` is the server's, handed to the sessions.
pub async fn run(
    listener: TcpListener,
    current: Arc<ArcSwap<Current>>,
    limits: Arc<ConnectionLimits>,
    mut stop: watch::Receiver<bool>,
    shutdown: watch::Receiver<bool>,
    tracker: TaskTracker,
) {
    let local = current.load().limits.address;
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = stop.wait_for(|stop| *stop) => break,
        };
        let (stream, peer) = match accepted {
            Ok(x) => x,
            Err(e) => {
                // EMFILE and friends: back off instead of spinning; sessions closing will
                // free descriptors.
                tracing::error!(listener = %local, error = %e, "accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let now = current.load_full();
        let (settings, shared) = (&now.settings, &now.shared);
        let Some(proxy_from) = &now.limits.proxy_from else {
            start(
                stream, peer, local, false, &limits, settings, shared, &shutdown, &tracker,
            );
            continue;
        };
        let peer_ip = peer.ip().to_canonical();
        if !proxy_from.iter().any(|net| net.contains(&peer_ip)) {
            maillog::proxy_refused(local, peer, "peer not in proxy_from");
            shared.metrics.proxy_refused(local);
            drop(stream);
            continue;
        }
        // Counted from accept, while the header is read (it may never come).
        let waiting = match limits.hold() {
            Ok(w) => w,
            Err((limit, value)) => {
                maillog::connection_refused(local, peer, limit, value);
                shared.metrics.connection_refused(local, limit);
                tracker.spawn(refuse(stream, limit));
                continue;
            }
        };
        let limits = Arc::clone(&limits);
        let settings = Arc::clone(settings);
        let shared = Arc::clone(shared);
        let shutdown = shutdown.clone();
        let inner = tracker.clone();
        tracker.spawn(async move {
            let mut stream = stream;
            let mut stop = shutdown.clone();
            let read =
                tokio::time::timeout(settings.command_timeout, read_proxy_header(&mut stream));
            // A header that has not come when the server stops is not waited for.
            let header = tokio::select! {
                r = read => r.unwrap_or_else(|_| Err("PROXY header timed out".to_string())),
                _ = stop.wait_for(|s| *s) => Err("shutting down".to_string()),
            };
            // The connection is counted by its session's slot from here on.
            drop(waiting);
            match header {
                Ok(header) => {
                    // v2 LOCAL and UNKNOWN/UNSPEC: the peer's own address (spec 2.1, 2.2).
                    let source = header.source();
                    let client =
                        source.map_or(peer, |s| SocketAddr::new(s.ip().to_canonical(), s.port()));
                    maillog::proxied(local, peer, client, &describe(&header));
                    // The load balancer's own connections (its health checks) are not
                    // a client's: `connection_rate` does not count them.
                    start(
                        stream,
                        client,
                        local,
                        source.is_none(),
                        &limits,
                        &settings,
                        &shared,
                        &shutdown,
                        &inner,
                    );
                }
                Err(why) => {
                    maillog::proxy_refused(local, peer, &why);
                    shared.metrics.proxy_refused(local);
                }
            }
        });
    }
}

/// Takes a connection slot for `client` and runs its session, or refuses it.
/// `health_check`: a proxy's own connection (v2 LOCAL, v1 UNKNOWN), exempt from
/// `connection_rate` as trusted clients are.
#[allow(clippy::too_many_arguments)]
fn start(
    stream: TcpStream,
    client: SocketAddr,
    local: SocketAddr,
    health_check: bool,
    limits: &Arc<ConnectionLimits>,
    settings: &Arc<Settings>,
    shared: &Arc<Shared>,
    shutdown: &watch::Receiver<bool>,
    tracker: &TaskTracker,
) {
    let exempt = health_check || shared.policy.is_trusted(client.ip());
    match limits.acquire(client.ip(), exempt) {
        Ok(slot) => {
            maillog::connected(local, client);
            let open = shared.metrics.connection_opened(local);
            let shared = Arc::clone(shared);
            let shutdown = shutdown.clone();
            let settings = Arc::clone(settings);
            tracker.spawn(async move {
                session::run(stream, client, &settings, &shared, shutdown).await;
                drop(slot);
                drop(open);
            });
        }
        Err((limit, value)) => {
            maillog::connection_refused(local, client, limit, value);
            shared.metrics.connection_refused(local, limit);
            tracker.spawn(refuse(stream, limit));
        }
    }
}

/// Reads the PROXY header off `stream` and nothing more: bytes are peeked, and only the
/// header's octets are taken, so whatever follows in the same segment (an early SMTP
/// command, a TLS ClientHello) stays in the socket for the session. Bounded by
/// [`proxy::MAX_HEADER`]; the caller bounds the time.
async fn read_proxy_header(stream: &mut TcpStream) -> Result<proxy::Header, String> {
    use tokio::io::AsyncReadExt;
    let mut taken: Vec<u8> = Vec::with_capacity(proxy::MAX_HEADER);
    let mut peeked = [0u8; proxy::MAX_HEADER];
    loop {
        let room = proxy::MAX_HEADER - taken.len();
        let n = stream
            .peek(&mut peeked[..room])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if n == 0 {
            return Err("closed before a complete PROXY header".to_string());
        }
        let start = taken.len();
        taken.extend_from_slice(&peeked[..n]);
        let parsed = proxy::parse(&taken);
        // Take off the socket the octets that belong to the header: all of them while it
        // is incomplete (an incomplete header is a prefix of everything seen so far).
        let take = match parsed {
            proxy::Parse::Complete { consumed, .. } => consumed - start,
            proxy::Parse::Partial => n,
            proxy::Parse::Error(e) => return Err(e.to_string()),
        };
        taken.truncate(start + take);
        let mut sink = [0u8; proxy::MAX_HEADER];
        stream
            .read_exact(&mut sink[..take])
            .await
            .map_err(|e| format!("reading the PROXY header: {e}"))?;
        if let proxy::Parse::Complete { header, .. } = parsed {
            return Ok(header);
        }
    }
}

/// The header, for the log: `v1 PROXY`, `v2 LOCAL`, ...
fn describe(header: &proxy::Header) -> String {
    let command = match header.command {
        proxy::Command::Proxy { .. } => "PROXY",
        proxy::Command::Local => "LOCAL",
        proxy::Command::Unknown => "UNKNOWN",
    };
    format!("v{} {command}", header.version)
}

/// Tells an over-limit client why, without letting it hold us up.
async fn refuse(mut stream: TcpStream, limit: &'static str) {
    let reply = match limit {
        "per_ip_connections" => catalogue::too_many_connections("from your address"),
        "connection_rate" => catalogue::connection_rate_exceeded(),
        _ => catalogue::too_many_connections("to this server"),
    };
    let mut out = Vec::new();
    reply.write_to(&mut out);
    let _ = tokio::time::timeout(Duration::from_secs(5), async {
        stream.write_all(&out).await?;
        stream.shutdown().await
    })
    .await;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test(start_paused = true)]
    async fn limits_connection_rate_counts_new_connections_per_block() {
        let limits = ConnectionLimits::new(100, 100, 64);
        let limits_of = |rate| Limits {
            address: "127.0.0.1:25".parse().unwrap(),
            max_connections: 100,
            per_ip_connections: 100,
            ipv6_prefix: 64,
            proxy_from: None,
            connection_rate: rate,
        };
        let rate = Rate {
            count: 2,
            window: Duration::from_secs(16),
        };
        limits.set(&limits_of(Some(rate)));
        let a: IpAddr = "2001:db8::1".parse().unwrap();
        let b: IpAddr = "2001:db8::2".parse().unwrap();
        drop(limits.acquire(a, false).unwrap());
        drop(limits.acquire(b, false).unwrap());
        assert_eq!(
            limits.acquire(a, false).unwrap_err(),
            ("connection_rate", 2)
        );
        assert_eq!(limits.open(), 0, "a refusal holds no slot");
        let _trusted = limits.acquire(a, true).unwrap();
        let _other = limits.acquire("192.0.2.1".parse().unwrap(), false).unwrap();
        // A reload with the same window keeps the counts; the window then slides on.
        limits.set(&limits_of(Some(rate)));
        assert!(limits.acquire(a, false).is_err());
        tokio::time::advance(Duration::from_secs(18)).await;
        drop(limits.acquire(a, false).unwrap());
        limits.set(&limits_of(None));
        for _ in 0..10 {
            drop(limits.acquire(a, false).unwrap());
        }
    }

    #[test]
    fn limits_count_and_release() {
        let limits = ConnectionLimits::new(3, 2, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let b: IpAddr = "192.0.2.2".parse().unwrap();
        let s1 = limits.acquire(a, false).unwrap();
        let _s2 = limits.acquire(a, false).unwrap();
        assert_eq!(
            limits.acquire(a, false).unwrap_err().0,
            "per_ip_connections"
        );
        // The mapped form of the same IPv4 address is the same client.
        let mapped: IpAddr = "::ffff:192.0.2.1".parse().unwrap();
        assert_eq!(
            limits.acquire(mapped, false).unwrap_err().0,
            "per_ip_connections"
        );
        let _s3 = limits.acquire(b, false).unwrap();
        assert_eq!(limits.acquire(b, false).unwrap_err().0, "max_connections");
        drop(s1);
        assert_eq!(limits.open(), 2);
        let _s4 = limits.acquire(b, false).unwrap();
        assert_eq!(limits.per_ip.lock().unwrap().get(&a), Some(&1));
    }

    #[test]
    fn connections_waiting_for_a_proxy_header_count_toward_the_total() {
        let limits = ConnectionLimits::new(2, 2, 64);
        let a: IpAddr = "192.0.2.1".parse().unwrap();
        let w1 = limits.hold().unwrap();
        let _w2 = limits.hold().unwrap();
        assert_eq!(limits.hold().unwrap_err().0, "max_connections");
        assert_eq!(limits.acquire(a, false).unwrap_err().0, "max_connections");
        // The header arrived: the waiting count becomes the session's slot.
        drop(w1);
        let _s = limits.acquire(a, false).unwrap();
        assert_eq!(limits.hold().unwrap_err().0, "max_connections");
    }

    #[test]
    fn limits_count_ipv6_clients_per_block() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let limits = ConnectionLimits::new(100, 2, 64);
        let _a = limits.acquire(v6("2001:db8:1:2::1"), false).unwrap();
        let _b = limits.acquire(v6("2001:db8:1:2::2"), false).unwrap();
        // A third address of the same /64 is the same client.
        let err = limits.acquire(v6("2001:db8:1:2:ffff:ffff:ffff:ffff"), false);
        assert_eq!(err.unwrap_err().0, "per_ip_connections");
        // The next /64 is another.
        let c = limits.acquire(v6("2001:db8:1:3::1"), false).unwrap();
        assert_eq!(limits.per_ip.lock().unwrap().len(), 2);
        drop(c);
        assert_eq!(limits.per_ip.lock().unwrap().len(), 1);
        // IPv4 addresses are counted one by one whatever the prefix.
        let _d = limits.acquire(v6("192.0.2.1"), false).unwrap();
        let _e = limits.acquire(v6("192.0.2.1"), false).unwrap();
        let _f = limits.acquire(v6("192.0.2.2"), false).unwrap();

        // ipv6_prefix = 128: per address.
        let limits = ConnectionLimits::new(100, 1, 128);
        let _a = limits.acquire(v6("2001:db8::1"), false).unwrap();
        let _b = limits.acquire(v6("2001:db8::2"), false).unwrap();
        assert!(limits.acquire(v6("2001:db8::1"), false).is_err());
    }
}
