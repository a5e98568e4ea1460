//! One delivery attempt of one message: group its pending recipients by next hop, find
//! the hosts (MX or fixed), talk SMTP, and write every final outcome to the spool before
//! anything else happens to the message (so a restart never re-sends to a recipient whose
//! delivery was recorded). Then: bounce what failed (RFC 3464), finish the message when
//! every recipient is final, or move it to its own file and say when to try again.
//!
//! Trust: the spooled message is ours; DNS answers and remote replies are not (they are
//! only compared, logged and quoted in bounces, never interpreted further).

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_smtp::Reply;
use tokio::sync::Semaphore;

use super::Handle;
use super::client::{ClientConfig, ConnectError, Connection, OutboundMessage, RcptResult};
use super::dsn;
use super::mx::Resolver;
use super::pool::{Pool, PoolKey};
use super::retry;
use super::route::{self, Destination, NextHopKey};
use crate::config::Route;
use crate::metrics::{DeliveryStatus, Metrics};
use crate::queue::{Envelope, Place, QueueId, RcptState, Spool, StoredMessage, unix_now};

/// Recipients per transaction (Postfix's smtp_destination_recipient_limit): RFC 5321
/// 4.5.3.1.8 only promises 100, and big transactions make one 4xx costly.
const RECIPIENTS_PER_TRANSACTION: usize = 50;
/// At most this many addresses are tried for one destination per attempt.
const MAX_ADDRESSES: usize = 10;

/// TLS/AUTH settings of one route, ready to connect with.
pub(crate) struct RouteClient {
    pub(crate) primary: ClientConfig,
    /// Opportunistic TLS: when the handshake fails, reconnect without TLS (RFC 7435).
    pub(crate) plaintext_fallback: Option<ClientConfig>,
}

/// What every attempt shares.
pub(crate) struct Context {
    pub(crate) spool: Spool,
    pub(crate) resolver: Resolver,
    pub(crate) routes: Vec<Route>,
    pub(crate) route_clients: Vec<RouteClient>,
    pub(crate) default_client: RouteClient,
    pub(crate) mx_port: u16,
    pub(crate) hostname: String,
    pub(crate) retry_schedule: Vec<Duration>,
    pub(crate) max_lifetime: Duration,
    pub(crate) global: Arc<Semaphore>,
    pub(crate) per_destination: Mutex<HashMap<Destination, Arc<Semaphore>>>,
    pub(crate) per_destination_limit: usize,
    pub(crate) pool: Pool,
    pub(crate) handle: Handle,
    pub(crate) metrics: Arc<Metrics>,
}

impl Context {
    fn client(&self, route: Option<usize>) -> &RouteClient {
        route
            .and_then(|i| self.route_clients.get(i))
            .unwrap_or(&self.default_client)
    }

    fn destination_slots(&self, d: &Destination) -> Arc<Semaphore> {
        let mut map = self
            .per_destination
            .lock()
            .unwrap_or_else(|e| e.into_inner());
        // Forget idle destinations so the map stays as small as the active queue.
        if map.len() > 10_000 {
            let limit = self.per_destination_limit;
            map.retain(|_, s| s.available_permits() < limit);
        }
        Arc::clone(
            map.entry(d.clone())
                .or_insert_with(|| Arc::new(Semaphore::new(self.per_destination_limit))),
        )
    }
}

/// The result for one recipient in this attempt.
#[derive(Clone, Debug)]
pub(crate) struct Outcome {
    pub(crate) kind: Kind,
    /// One line: the remote reply ("550 5.1.1 ...") or our own explanation.
    pub(crate) reply: String,
    /// Enhanced status code for the DSN.
    pub(crate) status: String,
    /// The host that answered, when one did.
    pub(crate) remote: Option<String>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Kind {
    Delivered,
    Deferred,
    Failed,
}

impl Outcome {
    fn local(kind: Kind, status: &str, text: String) -> Outcome {
        let code = match kind {
            Kind::Delivered => 250,
            Kind::Deferred => 451,
            Kind::Failed => 550,
        };
        Outcome {
            kind,
            reply: format!("{code} {status} {text}"),
            status: status.to_string(),
            remote: None,
        }
    }

    fn from_reply(kind: Kind, reply: &Reply, remote: &str) -> Outcome {
        let status = reply
            .status
            .map_or_else(|| format!("{}.0.0", reply.code / 100), |s| s.to_string());
        Outcome {
            kind,
            reply: reply.one_line(),
            status,
            remote: Some(remote.to_string()),
        }
    }
}

/// What the runner learns from an attempt.
pub(crate) enum Report {
    /// Every recipient is final; the message is gone from the spool.
    Finished(QueueId),
    /// Some recipients wait for another attempt.
    Pending(Box<Pending>),
}

/// A message that waits for another attempt.
pub(crate) struct Pending {
    pub(crate) msg: StoredMessage,
    pub(crate) attempts: u32,
    pub(crate) next: Instant,
    pub(crate) errors: Vec<Option<String>>,
}

/// The message body, read from the spool only once a delivery slot is held, so that
/// messages waiting for a busy or dead destination hold no body in memory.
struct Body {
    bytes: Option<Vec<u8>>,
}

impl Body {
    async fn get(&mut self, ctx: &Context, msg: &StoredMessage) -> Result<&[u8], String> {
        if self.bytes.is_none() {
            let spool = ctx.spool.clone();
            let m = msg.clone();
            let read = tokio::task::spawn_blocking(move || spool.read_body(&m))
                .await
                .map_err(|e| e.to_string())
                .and_then(|r| r.map_err(|e| e.to_string()));
            match read {
                Ok(b) => self.bytes = Some(b),
                Err(why) => {
                    tracing::error!(target: "maillog", id = %msg.envelope.id, error = %why,
                        "cannot read message from the spool");
                    return Err(why);
                }
            }
        }
        Ok(self.bytes.as_deref().unwrap_or_default())
    }
}

/// Runs one attempt for `msg` (which made `attempts` attempts before).
pub(crate) async fn run(ctx: Arc<Context>, mut msg: StoredMessage, attempts: u32) -> Report {
    let id = msg.envelope.id;
    let mut errors: Vec<Option<String>> = vec![None; msg.states.len()];
    let mut body = Body { bytes: None };

    let pending: Vec<(usize, String)> = msg
        .envelope
        .recipients
        .iter()
        .enumerate()
        .filter(|(i, _)| msg.states[*i] == RcptState::Pending)
        .map(|(i, r)| (i, r.clone()))
        .collect();
    let groups = route::group(
        &ctx.routes,
        ctx.mx_port,
        pending.iter().map(|(i, r)| (*i, r.as_str())),
    );
    // Failures are recorded only after their bounce is safely queued (below), so a
    // crash can repeat a bounce but never lose one.
    let mut failed_now: Vec<(usize, Outcome)> = Vec::new();
    for (key, indexes) in groups {
        for chunk in indexes.chunks(RECIPIENTS_PER_TRANSACTION) {
            let outcomes = deliver_group(&ctx, &key, &msg, &mut body, chunk).await;
            for (index, outcome) in chunk.iter().copied().zip(outcomes) {
                log_outcome(&ctx, &msg.envelope, index, &key, &outcome);
                match outcome.kind {
                    Kind::Delivered => {
                        record(&ctx, &msg, index, true, &outcome.reply).await;
                        msg.states[index] = RcptState::Delivered;
                    }
                    Kind::Failed => failed_now.push((index, outcome)),
                    Kind::Deferred => errors[index] = Some(outcome.reply),
                }
            }
        }
    }

    // RFC 5321 4.5.4.1: give up after the queue lifetime, with the last error.
    let age = Duration::from_secs((unix_now() - msg.envelope.arrived).max(0) as u64);
    if age >= ctx.max_lifetime {
        for (i, error) in errors.iter_mut().enumerate() {
            if msg.states[i] == RcptState::Pending && !failed_now.iter().any(|(f, _)| *f == i) {
                let last = error.take().unwrap_or_default();
                let outcome = Outcome::local(
                    Kind::Failed,
                    "4.4.7",
                    format!(
                        "message expired after {} in the queue; last error: {last}",
                        crate::config::format_duration(ctx.max_lifetime)
                    ),
                );
                tracing::info!(target: "maillog", id = %id,
                    to = %format_args!("<{}>", msg.envelope.recipients[i]),
                    status = "expired", "delivery failed: queue lifetime exceeded");
                ctx.metrics.delivery(DeliveryStatus::Failed);
                failed_now.push((i, outcome));
            }
        }
    }

    if !failed_now.is_empty() {
        let bounced = match body.get(&ctx, &msg).await {
            Ok(bytes) => bounce(&ctx, &msg.envelope, bytes, &failed_now).await,
            Err(_) => false,
        };
        if bounced {
            for (index, outcome) in &failed_now {
                record(&ctx, &msg, *index, false, &outcome.reply).await;
                msg.states[*index] = RcptState::Failed;
            }
        } else {
            // The bounce could not be queued: keep these recipients pending so the
            // failure (and its bounce) happens again on the next attempt.
            for (index, outcome) in failed_now {
                errors[index] = Some(outcome.reply);
            }
        }
    }
    if msg.states.iter().all(|s| *s != RcptState::Pending) {
        if let Err(e) = ctx.spool.finish(id, msg.place).await {
            tracing::error!(id = %id, error = %e, "cannot mark the message finished");
        }
        tracing::debug!(target: "maillog", id = %id, "message finished");
        return Report::Finished(id);
    }
    // Out of the log, so that a long wait does not pin the log's old segments.
    if matches!(msg.place, Place::Log(_))
        && let Ok(bytes) = body.get(&ctx, &msg).await
    {
        let bytes = bytes.to_vec();
        match ctx
            .spool
            .move_to_deferred(&msg.envelope, bytes, &msg.states)
            .await
        {
            Ok(()) => msg.place = Place::Deferred,
            Err(e) => tracing::error!(id = %id, error = %e, "cannot move the message to deferred/"),
        }
    }
    reschedule(&ctx, msg, attempts, errors)
}

fn reschedule(
    ctx: &Context,
    msg: StoredMessage,
    attempts: u32,
    errors: Vec<Option<String>>,
) -> Report {
    let attempts = attempts + 1;
    let jitter = rand::random::<f64>() * 2.0 - 1.0;
    let delay = retry::next_delay(attempts, &ctx.retry_schedule, jitter);
    tracing::info!(target: "maillog", id = %msg.envelope.id, attempts,
        retry_in = %crate::config::format_duration(Duration::from_secs(delay.as_secs().max(1))),
        "message deferred");
    Report::Pending(Box::new(Pending {
        msg,
        attempts,
        next: Instant::now() + delay,
        errors,
    }))
}

/// Writes a final outcome; a failure to record is logged (the recipient may then be
/// tried again after a restart: at-least-once, never lost).
async fn record(ctx: &Context, msg: &StoredMessage, index: usize, delivered: bool, reply: &str) {
    if let Err(e) = ctx
        .spool
        .record_final(msg.envelope.id, msg.place, index, delivered, reply)
        .await
    {
        tracing::error!(id = %msg.envelope.id, error = %e, "cannot record a delivery outcome");
    }
}

fn log_outcome(ctx: &Context, env: &Envelope, index: usize, key: &NextHopKey, o: &Outcome) {
    let (status, counted) = match o.kind {
        Kind::Delivered => ("delivered", DeliveryStatus::Delivered),
        Kind::Deferred => ("deferred", DeliveryStatus::Deferred),
        Kind::Failed => ("failed", DeliveryStatus::Failed),
    };
    ctx.metrics.delivery(counted);
    tracing::info!(target: "maillog", id = %env.id,
        to = %format_args!("<{}>", env.recipients[index]), relay = %key.destination,
        host = %o.remote.as_deref().unwrap_or("-"), status, reply = %o.reply, "delivery");
}

/// Sends the bounce for this attempt's failures to the sender, through the queue. Never
/// for a null-sender message (RFC 5321 4.5.5: no bounce loops).
/// Returns false only when a bounce was due and could not be queued.
async fn bounce(ctx: &Context, env: &Envelope, body: &[u8], failed: &[(usize, Outcome)]) -> bool {
    if env.sender.is_empty() {
        tracing::info!(target: "maillog", id = %env.id, "no bounce for a null-sender message");
        return true;
    }
    let now = unix_now();
    let recipients: Vec<dsn::RecipientStatus> = failed
        .iter()
        .map(|(i, o)| dsn::RecipientStatus {
            address: env.recipients[*i].clone(),
            action: dsn::Action::Failed,
            status: o.status.clone(),
            remote_mta: o.remote.clone(),
            diagnostic: Some(o.reply.clone()),
            last_attempt: Some(now),
        })
        .collect();
    let id = ctx.spool.new_id();
    let text = dsn::build(&dsn::DsnRequest {
        kind: dsn::DsnKind::Failure,
        reporting_mta: &ctx.hostname,
        queue_id: &env.id.to_string(),
        sender: &env.sender,
        arrival: env.arrived,
        now,
        original: body,
        recipients: &recipients,
        message_id: format!("<{id}.dsn@{}>", ctx.hostname),
    });
    let envelope = Envelope {
        id,
        arrived: now,
        client: "local".into(),
        helo: ctx.hostname.clone(),
        auth: None,
        sender: String::new(),
        // The report quotes 8-bit headers as they were (RFC 6152).
        params: if text.is_ascii() {
            Vec::new()
        } else {
            vec!["BODY=8BITMIME".to_string()]
        },
        smtputf8: !env.sender.is_ascii(),
        recipients: vec![env.sender.clone()],
    };
    match ctx.spool.store(&envelope, &text).await {
        Ok(loc) => {
            tracing::info!(target: "maillog", id = %id, original = %env.id,
                to = %format_args!("<{}>", env.sender), "bounce queued");
            ctx.metrics.bounce();
            ctx.handle.enqueue(StoredMessage {
                states: vec![RcptState::Pending],
                size: text.len() as u64,
                envelope,
                place: Place::Log(loc),
            });
            true
        }
        Err(e) => {
            tracing::error!(id = %env.id, error = %e, "cannot queue the bounce; will retry");
            false
        }
    }
}

/// Delivers `indexes` of `env` to one next hop; one outcome per index, in order.
async fn deliver_group(
    ctx: &Context,
    key: &NextHopKey,
    msg: &StoredMessage,
    body: &mut Body,
    indexes: &[usize],
) -> Vec<Outcome> {
    let env = &msg.envelope;
    let all = |o: Outcome| vec![o; indexes.len()];
    let _dest_slot = ctx
        .destination_slots(&key.destination)
        .acquire_owned()
        .await;
    let _slot = Arc::clone(&ctx.global).acquire_owned().await;
    let body = match body.get(ctx, msg).await {
        Ok(b) => b,
        Err(why) => {
            return all(Outcome::local(
                Kind::Deferred,
                "4.3.0",
                format!("cannot read the message from the spool: {why}"),
            ));
        }
    };
    let targets = match resolve(ctx, &key.destination).await {
        Ok(t) => t,
        Err(o) => return all(o),
    };
    let rcpts: Vec<String> = indexes.iter().map(|i| env.recipients[*i].clone()).collect();
    let eight_bit = env
        .params
        .iter()
        .any(|p| p.eq_ignore_ascii_case("BODY=8BITMIME"))
        || !body.is_ascii();
    let message = OutboundMessage {
        sender: &env.sender,
        recipients: &rcpts,
        body,
        smtputf8: env.smtputf8,
        eight_bit,
    };
    let client = ctx.client(key.route);
    let mut problem = String::from("no host could be reached");
    'hosts: for (addr, name) in targets {
        let pool_key = PoolKey {
            addr,
            server_name: name.clone(),
            route: key.route,
        };
        let (mut conn, mut reused) = match ctx.pool.take(&pool_key) {
            Some(c) => (c, true),
            None => match connect(client, addr, &name).await {
                Ok(c) => (c, false),
                Err(e) => {
                    problem = connect_problem(&name, addr, &e);
                    continue 'hosts;
                }
            },
        };
        loop {
            match conn.send(&message).await {
                Ok(results) => {
                    if conn.is_reusable() {
                        ctx.pool.put(pool_key, conn);
                    } else {
                        tokio::spawn(conn.quit());
                    }
                    return results
                        .iter()
                        .map(|r| match r {
                            RcptResult::Delivered(rep) => {
                                Outcome::from_reply(Kind::Delivered, rep, &name)
                            }
                            RcptResult::Deferred(rep) => {
                                Outcome::from_reply(Kind::Deferred, rep, &name)
                            }
                            RcptResult::Failed(rep) => {
                                Outcome::from_reply(Kind::Failed, rep, &name)
                            }
                        })
                        .collect();
                }
                // A cached connection may have been closed by the server while idle: one
                // fresh connection, then the error counts.
                Err(_) if reused => {
                    reused = false;
                    conn = match connect(client, addr, &name).await {
                        Ok(c) => c,
                        Err(e) => {
                            problem = connect_problem(&name, addr, &e);
                            continue 'hosts;
                        }
                    };
                }
                Err(e) => {
                    return all(Outcome::local(
                        Kind::Deferred,
                        "4.4.2",
                        format!("connection to {name}[{addr}] broke: {e}"),
                    ));
                }
            }
        }
    }
    all(Outcome::local(Kind::Deferred, "4.4.1", problem))
}

fn connect_problem(name: &str, addr: SocketAddr, e: &ConnectError) -> String {
    if let ConnectError::Auth(reply) = e {
        // A smart host refusing our credentials is a configuration fault: defer, and say
        // so loudly (interface: "A smart host's 535 defers the message").
        tracing::error!(host = %name, %addr, reply = %reply.one_line(),
            "the smart host refused our credentials: check auth_user / auth_password_file");
    } else {
        tracing::debug!(host = %name, %addr, error = %e, "connection failed");
    }
    format!("{name}[{addr}]: {e}")
}

async fn connect(
    client: &RouteClient,
    addr: SocketAddr,
    name: &str,
) -> Result<Connection, ConnectError> {
    match Connection::connect(addr, name, &client.primary).await {
        Err(ConnectError::TlsHandshake(why)) if client.plaintext_fallback.is_some() => {
            tracing::info!(host = %name, %addr, error = %why,
                "TLS handshake failed; opportunistic TLS: retrying without TLS");
            let fallback = client.plaintext_fallback.as_ref().expect("checked");
            Connection::connect(addr, name, fallback).await
        }
        other => other,
    }
}

/// The addresses to try, in order, each with the name its certificate must carry.
async fn resolve(ctx: &Context, d: &Destination) -> Result<Vec<(SocketAddr, String)>, Outcome> {
    match d {
        Destination::Ip(addr) => Ok(vec![(*addr, addr.ip().to_string())]),
        Destination::Host(host, port) => match ctx.resolver.host_addresses(host).await {
            Ok(addrs) if !addrs.is_empty() => Ok(addrs
                .into_iter()
                .take(MAX_ADDRESSES)
                .map(|ip| (SocketAddr::new(ip, *port), host.clone()))
                .collect()),
            Ok(_) => Err(Outcome::local(
                Kind::Deferred,
                "4.4.3",
                format!("next hop {host} has no address"),
            )),
            // A configured next hop that does not resolve is our problem, never the
            // sender's: defer.
            Err(e) => Err(Outcome::local(
                Kind::Deferred,
                "4.4.3",
                format!("next hop {host}: {e}"),
            )),
        },
        Destination::Mx(domain) => {
            let hosts = match ctx.resolver.mail_hosts(domain).await {
                Ok(h) => h,
                Err(e) if e.is_permanent() => {
                    return Err(Outcome::local(
                        Kind::Failed,
                        e.status(),
                        format!("{domain}: {e}"),
                    ));
                }
                Err(e) => {
                    return Err(Outcome::local(
                        Kind::Deferred,
                        e.status(),
                        format!("{domain}: {e}"),
                    ));
                }
            };
            let mut targets = Vec::new();
            let mut last_error = None;
            for h in &hosts {
                match ctx.resolver.host_addresses(&h.name).await {
                    Ok(addrs) => targets.extend(
                        addrs
                            .into_iter()
                            .map(|ip| (SocketAddr::new(ip, ctx.mx_port), h.name.clone())),
                    ),
                    Err(e) => {
                        // RFC 5321 5.1: no MX and no address means no mail for it.
                        if h.implicit && e.is_permanent() {
                            return Err(Outcome::local(
                                Kind::Failed,
                                e.status(),
                                format!("{domain}: {e}"),
                            ));
                        }
                        last_error = Some(e);
                    }
                }
                if targets.len() >= MAX_ADDRESSES {
                    break;
                }
            }
            targets.truncate(MAX_ADDRESSES);
            if targets.is_empty() {
                let why = last_error.map_or_else(|| "no address".to_string(), |e| e.to_string());
                return Err(Outcome::local(
                    Kind::Deferred,
                    "4.4.3",
                    format!("no address for the mail hosts of {domain}: {why}"),
                ));
            }
            Ok(targets)
        }
    }
}
