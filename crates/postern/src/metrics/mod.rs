//! The `[metrics]` endpoint: counters kept as atomics by the listener, the sessions and
//! delivery, served in the Prometheus text exposition format (version 0.0.4) at
//! `GET /metrics` over plain HTTP/1.1.
//!
//! The HTTP side is written here with tokio rather than with an HTTP crate: one GET on
//! one fixed path needs a request line and nothing else, and a full HTTP stack would be
//! more code to trust than the handful of lines in `http.rs`. A request is read up to the end
//! of its headers, at most `MAX_REQUEST` octets within `READ_TIMEOUT`; the answer is one
//! response with `Connection: close`. `GET /metrics` gets the metrics, anything else 404.
//! At most `MAX_SCRAPES` connections are served at once; more are closed unanswered.
//!
//! Cardinality: every label value is fixed at start (the configured listener addresses,
//! closed lists of reasons, rules, statuses and actions). Nothing a client sends becomes
//! a label, so no client can grow the number of series (or the memory they take).
//!
//! Trust: the endpoint has no authentication and shows counts only, never addresses or
//! names; bind it to loopback or a management network.
//!
//! Laid out in three parts: the counters (here), their rendering in the text format
//! ([`render`]), and the HTTP endpoint ([`http`]).

mod http;
mod render;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use arc_swap::ArcSwap;

use crate::config::FilterAction;
pub use crate::delivery::DeliveryStatus;
use crate::dkim::key::Algorithm;
use crate::policy::Rule;

pub use http::serve;

/// Why a message got no 250 (`postern_messages_rejected_total{reason}`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rejection {
    /// A `[[filter]]` with `action = "reject"` (550 5.7.1).
    Filter,
    /// Over `max_message_size` (552 5.3.4).
    Size,
    /// A bare CR or LF (554 5.6.0).
    BareLineEnding,
    /// A text line over 1000 octets (500 5.5.6).
    LineTooLong,
    /// It could not be screened or written to disk (451 4.3.0).
    StoreFailed,
    /// Too many `Received:` fields, a mail loop (554 5.4.6).
    TooManyHops,
    /// `max_message_memory` was in use (452 4.3.1).
    Memory,
    /// A milter refused it at end of message (its reply, or 550 5.7.1 / 451 4.7.1).
    Milter,
    /// `[authentication]`: DMARC p=reject enforced (550 5.7.1) or SPF fail with
    /// `spf_reject` (550 5.7.23).
    Authentication,
}

const REJECTIONS: [(Rejection, &str); 9] = [
    (Rejection::Filter, "filter"),
    (Rejection::Size, "size"),
    (Rejection::BareLineEnding, "bare_line_ending"),
    (Rejection::LineTooLong, "line_too_long"),
    (Rejection::StoreFailed, "store_failed"),
    (Rejection::TooManyHops, "too_many_hops"),
    (Rejection::Memory, "memory"),
    (Rejection::Milter, "milter"),
    (Rejection::Authentication, "authentication"),
];

/// What a milter decided (`postern_milter_actions_total{milter,action}`): its reply at
/// a stage, or `failed` (connect, timeout, protocol error: `on_failure` applied).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MilterAction {
    Continue,
    Accept,
    Reject,
    Tempfail,
    Discard,
    /// Asked to quarantine the message (at end of message, beside its decision).
    Quarantine,
    Skip,
    Failed,
}

impl MilterAction {
    pub const ALL: [MilterAction; 8] = [
        MilterAction::Continue,
        MilterAction::Accept,
        MilterAction::Reject,
        MilterAction::Tempfail,
        MilterAction::Discard,
        MilterAction::Quarantine,
        MilterAction::Skip,
        MilterAction::Failed,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            MilterAction::Continue => "continue",
            MilterAction::Accept => "accept",
            MilterAction::Reject => "reject",
            MilterAction::Tempfail => "tempfail",
            MilterAction::Discard => "discard",
            MilterAction::Quarantine => "quarantine",
            MilterAction::Skip => "skip",
            MilterAction::Failed => "failed",
        }
    }

    /// The action of a decision (a milter's own reply by its code).
    pub fn of(d: &postern_smtp::milter::Decision) -> MilterAction {
        use postern_smtp::milter::Decision as D;
        match d {
            D::Continue => MilterAction::Continue,
            D::Accept => MilterAction::Accept,
            D::Reject => MilterAction::Reject,
            D::Reply(r) if r.code >= 500 => MilterAction::Reject,
            D::Tempfail | D::Reply(_) | D::ConnFail | D::Shutdown => MilterAction::Tempfail,
            D::Discard => MilterAction::Discard,
            D::Skip => MilterAction::Skip,
        }
    }
}

/// Upper bounds (seconds) of the milter latency histogram's buckets, `+Inf` aside.
pub const MILTER_LATENCY_BUCKETS: [f64; 10] =
    [0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1.0, 5.0];

/// Upper bounds (seconds) of the Redis latency histogram's buckets, `+Inf` aside; the
/// default `[cluster] timeout` (200 ms) is one of them.
pub const REDIS_LATENCY_BUCKETS: [f64; 10] = [
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5,
];

/// `[cluster]`: the Redis client's state and round trips.
#[derive(Debug, Default)]
struct ClusterCounters {
    /// 0: no `[cluster]` (the series are not shown), 1: Redis down, 2: up.
    state: AtomicU64,
    /// Cumulative counts, one per bucket, and one for +Inf.
    buckets: [AtomicU64; REDIS_LATENCY_BUCKETS.len() + 1],
    /// Microseconds.
    sum_us: AtomicU64,
    failures: AtomicU64,
}

/// The series of one milter (by name: the configuration's, fixed at load or reload).
#[derive(Debug, Default)]
struct MilterCounters {
    actions: [AtomicU64; MilterAction::ALL.len()],
    /// Cumulative counts, one per bucket, and one for +Inf.
    buckets: [AtomicU64; MILTER_LATENCY_BUCKETS.len() + 1],
    /// Microseconds.
    sum_us: AtomicU64,
}

/// The checks of `[authentication]`, and their results (RFC 8601 names).
pub(crate) const AUTH_CHECKS: [&str; 3] = ["spf", "dkim", "dmarc"];
pub(crate) const AUTH_RESULTS: [&str; 7] = [
    "pass",
    "fail",
    "softfail",
    "neutral",
    "none",
    "temperror",
    "permerror",
];

/// The connection limits, as `listener::ConnectionLimits::acquire` names them.
const LIMITS: [&str; 3] = ["max_connections", "per_ip_connections", "connection_rate"];

/// The counters of one listener address.
#[derive(Debug)]
struct ListenerCounters {
    address: SocketAddr,
    connections: AtomicU64,
    refused: [AtomicU64; LIMITS.len()],
    /// Connections of a `proxy_protocol` listener closed without a banner (peer outside
    /// `proxy_from`, or no valid PROXY header).
    proxy_refused: AtomicU64,
}

/// Every metric, shared (in an `Arc`) by the listeners, the sessions and delivery.
#[derive(Debug)]
pub struct Metrics {
    /// One entry per listener address; a reload adds the new ones (and keeps the series
    /// of removed ones: counters never go back).
    listeners: ArcSwap<Vec<Arc<ListenerCounters>>>,
    connections_open: AtomicU64,
    messages_accepted: AtomicU64,
    messages_rejected: [AtomicU64; REJECTIONS.len()],
    /// Indexed by `Rule as usize` (accepting rules stay at zero and are not shown).
    recipients_refused: [AtomicU64; Rule::ALL.len()],
    auth_failures: AtomicU64,
    auth_successes: AtomicU64,
    deliveries: [AtomicU64; DeliveryStatus::ALL.len()],
    bounces: AtomicU64,
    queue_messages: AtomicU64,
    queue_in_flight: AtomicU64,
    queue_oldest_age: AtomicU64,
    queue_loading: AtomicU64,
    /// The destinations with the most waiting messages (name, messages, suspended), and
    /// how many destinations are suspended.
    queue_destinations: std::sync::Mutex<(Vec<DestinationBacklog>, usize)>,
    filter_actions: [AtomicU64; FilterAction::NAMES.len()],
    /// `[authentication]` results, per check (spf, dkim, dmarc) and result.
    auth_results: [[AtomicU64; AUTH_RESULTS.len()]; 3],
    /// DKIM signatures made, rsa-sha256 then ed25519-sha256.
    dkim_signatures: [AtomicU64; 2],
    /// Relayed messages from a signing domain that left unsigned.
    dkim_unsigned: AtomicU64,
    /// Per milter name, in the order first seen; a reload keeps the series of milters it
    /// removes (counters never go back).
    milters: std::sync::Mutex<Vec<(String, Arc<MilterCounters>)>>,
    /// MAILs and RCPTs refused per `[[rate_limit]]` name, in the order first seen (a
    /// reload keeps the series of limits it removes).
    rate_limits: std::sync::Mutex<Vec<(String, Arc<AtomicU64>)>>,
    cluster: ClusterCounters,
}

/// One destination's waiting messages, for `postern_queue_destination_messages`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DestinationBacklog {
    pub destination: String,
    pub messages: usize,
    pub suspended: bool,
}

/// Held for the life of a session; `postern_connections_open` counts these.
#[derive(Debug)]
pub struct OpenConnection(Arc<Metrics>);

impl Drop for OpenConnection {
    fn drop(&mut self) {
        self.0.connections_open.fetch_sub(1, Ordering::Relaxed);
    }
}

fn bump(counter: &AtomicU64) {
    counter.fetch_add(1, Ordering::Relaxed);
}

impl Metrics {
    /// All counters at zero, with one label value per listener address (listeners that
    /// share an address, port 0 ones in tests, share their series).
    pub fn new(listeners: impl IntoIterator<Item = SocketAddr>) -> Metrics {
        let metrics = Metrics {
            listeners: ArcSwap::from_pointee(Vec::new()),
            connections_open: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            messages_rejected: Default::default(),
            recipients_refused: Default::default(),
            auth_failures: AtomicU64::new(0),
            auth_successes: AtomicU64::new(0),
            deliveries: Default::default(),
            bounces: AtomicU64::new(0),
            queue_messages: AtomicU64::new(0),
            queue_in_flight: AtomicU64::new(0),
            queue_oldest_age: AtomicU64::new(0),
            queue_loading: AtomicU64::new(0),
            queue_destinations: Default::default(),
            filter_actions: Default::default(),
            auth_results: Default::default(),
            dkim_signatures: Default::default(),
            dkim_unsigned: AtomicU64::new(0),
            milters: Default::default(),
            rate_limits: Default::default(),
            cluster: ClusterCounters::default(),
        };
        metrics.add_listeners(listeners);
        metrics
    }

    /// Series for listeners not seen yet (a reload that adds listeners).
    pub fn add_listeners(&self, addresses: impl IntoIterator<Item = SocketAddr>) {
        let addresses: Vec<SocketAddr> = addresses.into_iter().collect();
        self.listeners.rcu(|current| {
            let mut next = Vec::clone(current);
            for &address in &addresses {
                if !next.iter().any(|l| l.address == address) {
                    next.push(Arc::new(ListenerCounters {
                        address,
                        connections: AtomicU64::new(0),
                        refused: Default::default(),
                        proxy_refused: AtomicU64::new(0),
                    }));
                }
            }
            next
        });
    }

    fn listener(&self, address: SocketAddr) -> Option<Arc<ListenerCounters>> {
        self.listeners
            .load()
            .iter()
            .find(|l| l.address == address)
            .cloned()
    }

    /// A connection on `listener` got a session; open until the guard is dropped.
    pub fn connection_opened(self: &Arc<Self>, listener: SocketAddr) -> OpenConnection {
        if let Some(l) = self.listener(listener) {
            bump(&l.connections);
        }
        bump(&self.connections_open);
        OpenConnection(Arc::clone(self))
    }

    /// A connection on `listener` was refused because `limit` was full.
    pub fn connection_refused(&self, listener: SocketAddr, limit: &str) {
        let i = LIMITS.iter().position(|l| *l == limit);
        debug_assert!(i.is_some(), "unknown limit {limit}");
        if let (Some(l), Some(i)) = (self.listener(listener), i) {
            bump(&l.refused[i]);
        }
    }

    /// A connection on the proxy listener `listener` was closed without a banner.
    pub fn proxy_refused(&self, listener: SocketAddr) {
        if let Some(l) = self.listener(listener) {
            bump(&l.proxy_refused);
        }
    }

    /// A message was answered 250.
    pub fn message_accepted(&self) {
        bump(&self.messages_accepted);
    }

    pub fn message_rejected(&self, why: Rejection) {
        if let Some(i) = REJECTIONS.iter().position(|(r, _)| *r == why) {
            bump(&self.messages_rejected[i]);
        }
    }

    /// Adds the refusals the protocol core made by itself (size, line endings).
    pub fn core_refusals(&self, refusals: postern_smtp::Refusals) {
        for (why, n) in [
            (Rejection::Size, refusals.size),
            (Rejection::BareLineEnding, refusals.bare_line_ending),
            (Rejection::LineTooLong, refusals.line_too_long),
            (Rejection::TooManyHops, refusals.too_many_hops),
        ] {
            if n > 0
                && let Some(i) = REJECTIONS.iter().position(|(r, _)| *r == why)
            {
                self.messages_rejected[i].fetch_add(n, Ordering::Relaxed);
            }
        }
    }

    /// A recipient was refused by `rule`.
    pub fn recipient_refused(&self, rule: Rule) {
        if rule.refuses() {
            bump(&self.recipients_refused[rule as usize]);
        }
    }

    /// An AUTH was answered 235.
    pub fn auth_succeeded(&self) {
        bump(&self.auth_successes);
    }

    /// An AUTH was answered 535 (a 454 during a lockout is not a failure).
    pub fn auth_failed(&self) {
        bump(&self.auth_failures);
    }

    pub fn delivery(&self, status: DeliveryStatus) {
        bump(&self.deliveries[status as usize]);
    }

    /// A bounce was queued.
    pub fn bounce(&self) {
        bump(&self.bounces);
    }

    /// The delivery runner now holds `n` messages.
    pub fn set_queue_messages(&self, n: usize) {
        self.queue_messages.store(n as u64, Ordering::Relaxed);
    }

    /// Attempts running.
    pub fn set_queue_in_flight(&self, n: usize) {
        self.queue_in_flight.store(n as u64, Ordering::Relaxed);
    }

    /// The oldest queued message's age, in seconds (0 for an empty queue).
    pub fn set_queue_oldest_age(&self, seconds: u64) {
        self.queue_oldest_age.store(seconds, Ordering::Relaxed);
    }

    /// The backlog found in the spool at start is still being loaded.
    pub fn set_queue_loading(&self, loading: bool) {
        self.queue_loading
            .store(u64::from(loading), Ordering::Relaxed);
    }

    /// The destinations with the most waiting messages (at most a handful: fixed
    /// cardinality), and how many destinations are suspended.
    pub fn set_queue_destinations(&self, top: Vec<DestinationBacklog>, suspended: usize) {
        *self
            .queue_destinations
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = (top, suspended);
    }

    pub fn filter_action(&self, action: &FilterAction) {
        bump(&self.filter_actions[action.index()]);
    }

    /// The results of the inbound checks on one message.
    pub fn authentication(&self, verdict: &crate::authentication::Verdict) {
        for (i, result) in [verdict.spf, verdict.dkim, verdict.dmarc]
            .into_iter()
            .enumerate()
        {
            if let Some(r) = result
                && let Some(j) = AUTH_RESULTS.iter().position(|n| *n == r.as_str())
            {
                bump(&self.auth_results[i][j]);
            }
        }
    }

    /// A DKIM signature was made.
    pub fn dkim_signed(&self, algorithm: Algorithm) {
        bump(&self.dkim_signatures[algorithm as usize]);
    }

    /// A relayed message from one of our signing domains left unsigned.
    pub fn dkim_unsigned(&self) {
        bump(&self.dkim_unsigned);
    }

    /// The series of the milter `name`, made at first use. Names come from the
    /// configuration only, never from the network.
    fn milter(&self, name: &str) -> Arc<MilterCounters> {
        let mut all = self.milters.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
            return Arc::clone(c);
        }
        let c = Arc::new(MilterCounters::default());
        all.push((name.to_string(), Arc::clone(&c)));
        c
    }

    /// Series for the configured milters, at zero, so that they show before any mail.
    pub fn add_milters<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            self.milter(name);
        }
    }

    /// The hit counter of the rate limit `name` (from the configuration only).
    fn rate_limit(&self, name: &str) -> Arc<AtomicU64> {
        let mut all = self.rate_limits.lock().unwrap_or_else(|e| e.into_inner());
        if let Some((_, c)) = all.iter().find(|(n, _)| n == name) {
            return Arc::clone(c);
        }
        let c = Arc::new(AtomicU64::new(0));
        all.push((name.to_string(), Arc::clone(&c)));
        c
    }

    /// Series for the configured rate limits, at zero.
    pub fn add_rate_limits<'a>(&self, names: impl IntoIterator<Item = &'a str>) {
        for name in names {
            self.rate_limit(name);
        }
    }

    /// A MAIL or RCPT refused by the rate limit `name`.
    pub fn rate_limit_hit(&self, name: &str) {
        bump(&self.rate_limit(name));
    }

    pub fn milter_action(&self, name: &str, action: MilterAction) {
        let c = self.milter(name);
        if let Some(i) = MilterAction::ALL.iter().position(|a| *a == action) {
            bump(&c.actions[i]);
        }
    }

    /// How long the milter took to answer one command (or to connect and negotiate).
    pub fn milter_latency(&self, name: &str, took: std::time::Duration) {
        let c = self.milter(name);
        let secs = took.as_secs_f64();
        for (bound, n) in MILTER_LATENCY_BUCKETS.iter().zip(&c.buckets) {
            if secs <= *bound {
                bump(n);
            }
        }
        bump(&c.buckets[MILTER_LATENCY_BUCKETS.len()]);
        c.sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// `[cluster]` is set and Redis answers (`true`) or does not (`false`).
    pub fn cluster_redis_up(&self, up: bool) {
        self.cluster
            .state
            .store(if up { 2 } else { 1 }, Ordering::Relaxed);
    }

    /// `[cluster]` is no longer set (a reload removed it): its series are not shown.
    pub fn cluster_off(&self) {
        self.cluster.state.store(0, Ordering::Relaxed);
    }

    /// One Redis round trip (a call or a probe) took `took` (or was given up after it).
    pub fn cluster_redis_latency(&self, took: std::time::Duration) {
        let c = &self.cluster;
        let secs = took.as_secs_f64();
        for (bound, n) in REDIS_LATENCY_BUCKETS.iter().zip(&c.buckets) {
            if secs <= *bound {
                bump(n);
            }
        }
        bump(&c.buckets[REDIS_LATENCY_BUCKETS.len()]);
        c.sum_us.fetch_add(
            u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
            Ordering::Relaxed,
        );
    }

    /// A Redis call failed or ran over the bound: it was counted locally.
    pub fn cluster_redis_failure(&self) {
        bump(&self.cluster.failures);
    }
}
