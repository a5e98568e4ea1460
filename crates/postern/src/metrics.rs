//! The `[metrics]` endpoint: counters kept as atomics by the listener, the sessions and
//! delivery, served in the Prometheus text exposition format (version 0.0.4) at
//! `GET /metrics` over plain HTTP/1.1.
//!
//! The HTTP side is written here with tokio rather than with an HTTP crate: one GET on
//! one fixed path needs a request line and nothing else, and a full HTTP stack would be
//! more code to trust than the handful of lines below. A request is read up to the end
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

use std::io;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, watch};

use crate::config::FilterAction;
use crate::policy::Rule;
use crate::queue::Spool;

/// Request line and headers, at most.
const MAX_REQUEST: usize = 8 * 1024;
/// Reading the request, and separately writing the response, may take this long.
const READ_TIMEOUT: Duration = Duration::from_secs(5);
const WRITE_TIMEOUT: Duration = Duration::from_secs(5);
/// Connections served at once.
const MAX_SCRAPES: usize = 16;
const CONTENT_TYPE: &str = "text/plain; version=0.0.4";

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
}

const REJECTIONS: [(Rejection, &str); 7] = [
    (Rejection::Filter, "filter"),
    (Rejection::Size, "size"),
    (Rejection::BareLineEnding, "bare_line_ending"),
    (Rejection::LineTooLong, "line_too_long"),
    (Rejection::StoreFailed, "store_failed"),
    (Rejection::TooManyHops, "too_many_hops"),
    (Rejection::Memory, "memory"),
];

/// The outcome of one delivery attempt for one recipient.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DeliveryStatus {
    Delivered,
    Deferred,
    Failed,
}

const DELIVERY_STATUSES: [&str; 3] = ["delivered", "deferred", "failed"];
/// The connection limits, as `listener::ConnectionLimits::acquire` names them.
const LIMITS: [&str; 2] = ["max_connections", "per_ip_connections"];

/// The counters of one listener address.
#[derive(Debug)]
struct ListenerCounters {
    address: SocketAddr,
    connections: AtomicU64,
    refused: [AtomicU64; LIMITS.len()],
}

/// Every metric, shared (in an `Arc`) by the listeners, the sessions and delivery.
#[derive(Debug)]
pub struct Metrics {
    listeners: Vec<ListenerCounters>,
    connections_open: AtomicU64,
    messages_accepted: AtomicU64,
    messages_rejected: [AtomicU64; REJECTIONS.len()],
    /// Indexed by `Rule as usize` (accepting rules stay at zero and are not shown).
    recipients_refused: [AtomicU64; Rule::ALL.len()],
    auth_failures: AtomicU64,
    auth_successes: AtomicU64,
    deliveries: [AtomicU64; DELIVERY_STATUSES.len()],
    bounces: AtomicU64,
    queue_messages: AtomicU64,
    filter_actions: [AtomicU64; FilterAction::NAMES.len()],
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
        let mut counters: Vec<ListenerCounters> = Vec::new();
        for address in listeners {
            if !counters.iter().any(|l| l.address == address) {
                counters.push(ListenerCounters {
                    address,
                    connections: AtomicU64::new(0),
                    refused: Default::default(),
                });
            }
        }
        Metrics {
            listeners: counters,
            connections_open: AtomicU64::new(0),
            messages_accepted: AtomicU64::new(0),
            messages_rejected: Default::default(),
            recipients_refused: Default::default(),
            auth_failures: AtomicU64::new(0),
            auth_successes: AtomicU64::new(0),
            deliveries: Default::default(),
            bounces: AtomicU64::new(0),
            queue_messages: AtomicU64::new(0),
            filter_actions: Default::default(),
        }
    }

    fn listener(&self, address: SocketAddr) -> Option<&ListenerCounters> {
        self.listeners.iter().find(|l| l.address == address)
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
        let i = match status {
            DeliveryStatus::Delivered => 0,
            DeliveryStatus::Deferred => 1,
            DeliveryStatus::Failed => 2,
        };
        bump(&self.deliveries[i]);
    }

    /// A bounce was queued.
    pub fn bounce(&self) {
        bump(&self.bounces);
    }

    /// The delivery runner now holds `n` messages.
    pub fn set_queue_messages(&self, n: usize) {
        self.queue_messages.store(n as u64, Ordering::Relaxed);
    }

    pub fn filter_action(&self, action: &FilterAction) {
        bump(&self.filter_actions[action.index()]);
    }

    /// The text exposition format, version 0.0.4. `spool_fsyncs` comes from the spool
    /// ([`Spool::sync_count`]), which keeps its own count.
    pub fn render(&self, spool_fsyncs: u64) -> String {
        let get = |c: &AtomicU64| c.load(Ordering::Relaxed);
        let mut out = String::with_capacity(4096);
        let listener_label = |l: &ListenerCounters| l.address.to_string();

        family(
            &mut out,
            "postern_connections_total",
            "counter",
            "SMTP connections given a session, per listener.",
            self.listeners.iter().map(|l| {
                (
                    labels(&[("listener", &listener_label(l))]),
                    get(&l.connections),
                )
            }),
        );
        family(
            &mut out,
            "postern_connections_refused_total",
            "counter",
            "SMTP connections refused with 421 because a connection limit was full.",
            self.listeners.iter().flat_map(|l| {
                LIMITS.iter().zip(&l.refused).map(move |(limit, n)| {
                    (
                        labels(&[("listener", &listener_label(l)), ("limit", limit)]),
                        get(n),
                    )
                })
            }),
        );
        single(
            &mut out,
            "postern_connections_open",
            "gauge",
            "SMTP connections open now, all listeners.",
            get(&self.connections_open),
        );
        single(
            &mut out,
            "postern_messages_accepted_total",
            "counter",
            "Messages answered 250 (queued, quarantined or discarded by a filter).",
            get(&self.messages_accepted),
        );
        family(
            &mut out,
            "postern_messages_rejected_total",
            "counter",
            "Messages refused at or before the end of DATA/BDAT, by reason.",
            REJECTIONS
                .iter()
                .zip(&self.messages_rejected)
                .map(|((_, name), n)| (labels(&[("reason", name)]), get(n))),
        );
        family(
            &mut out,
            "postern_recipients_refused_total",
            "counter",
            "RCPT TO refused by the relay policy, by the rule that refused.",
            Rule::ALL
                .iter()
                .zip(&self.recipients_refused)
                .filter(|(rule, _)| rule.refuses())
                .map(|(rule, n)| (labels(&[("rule", rule.as_str())]), get(n))),
        );
        single(
            &mut out,
            "postern_auth_failures_total",
            "counter",
            "SMTP AUTH attempts answered 535 (wrong password or unknown user).",
            get(&self.auth_failures),
        );
        single(
            &mut out,
            "postern_auth_successes_total",
            "counter",
            "SMTP AUTH attempts answered 235.",
            get(&self.auth_successes),
        );
        family(
            &mut out,
            "postern_deliveries_total",
            "counter",
            "Delivery outcomes, one per recipient and attempt.",
            DELIVERY_STATUSES
                .iter()
                .zip(&self.deliveries)
                .map(|(status, n)| (labels(&[("status", status)]), get(n))),
        );
        single(
            &mut out,
            "postern_bounces_total",
            "counter",
            "Bounce messages (delivery status notifications) queued.",
            get(&self.bounces),
        );
        single(
            &mut out,
            "postern_queue_messages",
            "gauge",
            "Messages the delivery runner holds (waiting, deferred or being delivered).",
            get(&self.queue_messages),
        );
        single(
            &mut out,
            "postern_spool_fsyncs_total",
            "counter",
            "Spool fdatasyncs since start (one per group-committed batch).",
            spool_fsyncs,
        );
        family(
            &mut out,
            "postern_filter_actions_total",
            "counter",
            "Messages a [[filter]] matched, by its action.",
            FilterAction::NAMES
                .iter()
                .zip(&self.filter_actions)
                .map(|(action, n)| (labels(&[("action", action)]), get(n))),
        );
        out
    }
}

/// HELP, TYPE and one line per label set.
fn family(
    out: &mut String,
    name: &str,
    kind: &str,
    help: &str,
    series: impl Iterator<Item = (String, u64)>,
) {
    out.push_str(&format!("# HELP {name} {help}\n# TYPE {name} {kind}\n"));
    for (labels, value) in series {
        out.push_str(&format!("{name}{labels} {value}\n"));
    }
}

fn single(out: &mut String, name: &str, kind: &str, help: &str, value: u64) {
    family(
        out,
        name,
        kind,
        help,
        std::iter::once((String::new(), value)),
    );
}

/// `{a="x",b="y"}`, values escaped as the format requires.
fn labels(pairs: &[(&str, &str)]) -> String {
    let inner: Vec<String> = pairs
        .iter()
        .map(|(k, v)| {
            let v = v
                .replace('\\', "\\\\")
                .replace('"', "\\\"")
                .replace('\n', "\\n");
            format!("{k}=\"{v}\"")
        })
        .collect();
    format!("{{{}}}", inner.join(","))
}

/// Answers scrapes on `listener` until shutdown.
pub async fn serve(
    listener: TcpListener,
    metrics: Arc<Metrics>,
    spool: Spool,
    mut shutdown: watch::Receiver<bool>,
) {
    let slots = Arc::new(Semaphore::new(MAX_SCRAPES));
    loop {
        let accepted = tokio::select! {
            a = listener.accept() => a,
            _ = shutdown.wait_for(|stop| *stop) => break,
        };
        let stream = match accepted {
            Ok((s, _)) => s,
            Err(e) => {
                tracing::warn!(error = %e, "metrics: accept failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        // Over the limit: dropping the stream closes it.
        let Ok(slot) = Arc::clone(&slots).try_acquire_owned() else {
            continue;
        };
        let (metrics, spool) = (Arc::clone(&metrics), spool.clone());
        tokio::spawn(async move {
            let _ = answer(stream, &metrics, &spool).await;
            drop(slot);
        });
    }
}

/// One request, one response.
async fn answer(mut stream: TcpStream, metrics: &Metrics, spool: &Spool) -> io::Result<()> {
    let response = match tokio::time::timeout(READ_TIMEOUT, read_head(&mut stream)).await {
        Err(_) | Ok(Err(_)) | Ok(Ok(Head::Closed)) => return Ok(()),
        Ok(Ok(Head::TooLarge)) => response("431 Request Header Fields Too Large", "text/plain", ""),
        Ok(Ok(Head::Complete(head))) => match route(&head) {
            Route::Metrics => response("200 OK", CONTENT_TYPE, &metrics.render(spool.sync_count())),
            Route::NotFound => response("404 Not Found", "text/plain", "not found\n"),
            Route::BadRequest => response("400 Bad Request", "text/plain", "bad request\n"),
        },
    };
    tokio::time::timeout(WRITE_TIMEOUT, async {
        stream.write_all(&response).await?;
        stream.shutdown().await
    })
    .await
    .map_err(|_| io::Error::from(io::ErrorKind::TimedOut))?
}

enum Head {
    /// The request up to (not including) the empty line.
    Complete(Vec<u8>),
    TooLarge,
    /// The client closed before the end of the headers.
    Closed,
}

/// Reads until the empty line that ends the headers, within `MAX_REQUEST` octets.
async fn read_head(stream: &mut TcpStream) -> io::Result<Head> {
    let mut buf = vec![0u8; MAX_REQUEST];
    let mut len = 0;
    loop {
        if let Some(end) = head_end(&buf[..len]) {
            buf.truncate(end);
            return Ok(Head::Complete(buf));
        }
        if len == buf.len() {
            return Ok(Head::TooLarge);
        }
        match stream.read(&mut buf[len..]).await? {
            0 => return Ok(Head::Closed),
            n => len += n,
        }
    }
}

/// Where the headers end: the first empty line (CRLF CRLF, or bare LFs).
fn head_end(bytes: &[u8]) -> Option<usize> {
    let crlf = bytes.windows(4).position(|w| w == b"\r\n\r\n");
    let lf = bytes.windows(2).position(|w| w == b"\n\n");
    match (crlf, lf) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route {
    Metrics,
    NotFound,
    BadRequest,
}

/// The request line decides: `GET /metrics HTTP/1.x` (a query string is ignored).
fn route(head: &[u8]) -> Route {
    let line_end = head.iter().position(|&b| b == b'\n').unwrap_or(head.len());
    let Ok(line) = std::str::from_utf8(&head[..line_end]) else {
        return Route::BadRequest;
    };
    let mut parts = line.trim_end_matches('\r').split(' ');
    let (Some(method), Some(target), Some(version), None) =
        (parts.next(), parts.next(), parts.next(), parts.next())
    else {
        return Route::BadRequest;
    };
    if !version.starts_with("HTTP/1.") {
        return Route::BadRequest;
    }
    let path = target.split_once('?').map_or(target, |(p, _)| p);
    if method == "GET" && path == "/metrics" {
        Route::Metrics
    } else {
        Route::NotFound
    }
}

fn response(status: &str, content_type: &str, body: &str) -> Vec<u8> {
    format!(
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\n\
         Connection: close\r\n\r\n{body}",
        body.len()
    )
    .into_bytes()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Arc<Metrics> {
        let a: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let b: SocketAddr = "[::]:587".parse().unwrap();
        Arc::new(Metrics::new([a, b, a]))
    }

    #[test]
    fn renders_every_family_with_help_and_type() {
        let m = sample();
        let a: SocketAddr = "0.0.0.0:25".parse().unwrap();
        let open = m.connection_opened(a);
        let _second = m.connection_opened(a);
        drop(open);
        m.connection_refused(a, "per_ip_connections");
        m.message_accepted();
        m.message_rejected(Rejection::Filter);
        m.core_refusals(postern_smtp::Refusals {
            size: 2,
            bare_line_ending: 1,
            line_too_long: 0,
            too_many_hops: 0,
        });
        m.recipient_refused(Rule::RelayDenied);
        m.recipient_refused(Rule::AcceptedDomain); // never a refusal: not counted
        m.auth_failed();
        m.auth_failed();
        m.auth_succeeded();
        m.delivery(DeliveryStatus::Deferred);
        m.bounce();
        m.set_queue_messages(7);
        m.filter_action(&FilterAction::Redirect("x@y.test".into()));
        let text = m.render(42);

        for line in [
            "# HELP postern_connections_total SMTP connections given a session, per listener.\n",
            "# TYPE postern_connections_total counter\n",
            "postern_connections_total{listener=\"0.0.0.0:25\"} 2\n",
            "postern_connections_total{listener=\"[::]:587\"} 0\n",
            "postern_connections_refused_total{listener=\"0.0.0.0:25\",limit=\"per_ip_connections\"} 1\n",
            "postern_connections_refused_total{listener=\"0.0.0.0:25\",limit=\"max_connections\"} 0\n",
            "# TYPE postern_connections_open gauge\npostern_connections_open 1\n",
            "postern_messages_accepted_total 1\n",
            "postern_messages_rejected_total{reason=\"filter\"} 1\n",
            "postern_messages_rejected_total{reason=\"size\"} 2\n",
            "postern_messages_rejected_total{reason=\"bare_line_ending\"} 1\n",
            "postern_messages_rejected_total{reason=\"line_too_long\"} 0\n",
            "postern_messages_rejected_total{reason=\"store_failed\"} 0\n",
            "postern_recipients_refused_total{rule=\"relay_denied\"} 1\n",
            "postern_recipients_refused_total{rule=\"unknown_recipient\"} 0\n",
            "postern_auth_failures_total 2\n",
            "postern_auth_successes_total 1\n",
            "postern_deliveries_total{status=\"deferred\"} 1\n",
            "postern_deliveries_total{status=\"delivered\"} 0\n",
            "postern_bounces_total 1\n",
            "# TYPE postern_queue_messages gauge\npostern_queue_messages 7\n",
            "postern_spool_fsyncs_total 42\n",
            "postern_filter_actions_total{action=\"redirect\"} 1\n",
            "postern_filter_actions_total{action=\"reject\"} 0\n",
        ] {
            assert!(text.contains(line), "missing {line:?} in:\n{text}");
        }
        assert!(!text.contains("accepted_domain"), "{text}");
        // A shared address is one series, not two.
        assert_eq!(text.matches("postern_connections_total{").count(), 2);

        // Every sample line belongs to a family announced just before, with HELP and
        // TYPE once each, and every value is an integer.
        let mut families = Vec::new();
        let mut current = "";
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# HELP ") {
                current = rest.split(' ').next().unwrap();
                families.push(current);
            } else if let Some(rest) = line.strip_prefix("# TYPE ") {
                let (name, kind) = rest.split_once(' ').unwrap();
                assert_eq!(name, current);
                assert!(kind == "counter" || kind == "gauge", "{line}");
                assert_eq!(kind == "counter", name.ends_with("_total"), "{line}");
            } else {
                let (series, value) = line.rsplit_once(' ').unwrap();
                assert!(
                    series == current || series.starts_with(&format!("{current}{{")),
                    "{line} outside {current}"
                );
                value.parse::<u64>().unwrap();
            }
        }
        assert_eq!(families.len(), 13, "{families:?}");
        let mut unique = families.clone();
        unique.dedup();
        assert_eq!(unique, families);
    }

    #[test]
    fn rules_are_listed_at_their_index() {
        for (i, rule) in Rule::ALL.iter().enumerate() {
            assert_eq!(*rule as usize, i, "{rule}");
        }
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(
            labels(&[("a", "x\"y\\z\nw"), ("b", "c")]),
            r#"{a="x\"y\\z\nw",b="c"}"#
        );
    }

    #[test]
    fn only_get_metrics_is_served() {
        assert_eq!(route(b"GET /metrics HTTP/1.1\r\nHost: x"), Route::Metrics);
        assert_eq!(route(b"GET /metrics?x=1 HTTP/1.0"), Route::Metrics);
        assert_eq!(route(b"GET / HTTP/1.1\r\nHost: x"), Route::NotFound);
        assert_eq!(route(b"POST /metrics HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metrics/x HTTP/1.1"), Route::NotFound);
        assert_eq!(route(b"GET /metrics"), Route::BadRequest);
        assert_eq!(route(b"GET /metrics SMTP/1.0"), Route::BadRequest);
        assert_eq!(route(b"\xff\xfe"), Route::BadRequest);
    }

    #[test]
    fn headers_end_at_the_first_empty_line() {
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n\r\nrest"), Some(20));
        assert_eq!(head_end(b"GET / HTTP/1.1\n\n"), Some(14));
        assert_eq!(head_end(b"GET / HTTP/1.1\r\nA: b\r\n"), None);
    }
}
