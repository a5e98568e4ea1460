//! One delivery attempt of one message: group its pending recipients by next hop, find
//! the hosts (MX or fixed), talk SMTP, and write every final outcome to the spool before
//! anything else happens to the message (so a restart never re-sends to a recipient whose
//! delivery was recorded). Then: bounce what failed (RFC 3464), finish the message when
//! every recipient is final, or move it to its own file and say when to try again.
//!
//! Trust: the spooled message is ours; DNS answers and remote replies are not (they are
//! only compared, logged and quoted in bounces, never interpreted further).

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use postern_smtp::Reply;
use tokio::sync::Semaphore;

use super::DeliveryStatus;
use super::Handle;
use super::client::{ClientConfig, ConnectError, Connection, Content, OutboundMessage};
use super::dsn;
use super::pool::{Pool, PoolKey};
use super::retry;
use super::route::{self, Destination, NextHopKey};
use crate::config::Route;
use crate::dns::{MailHost, ResolveError, Resolver};
use crate::maillog;
use crate::metrics::Metrics;
use crate::ourselves::Ourselves;
use crate::queue::{Durability, Envelope, QueueId, RcptState, Spool, StoredMessage, unix_now};

/// Recipients per transaction (Postfix's smtp_destination_recipient_limit): RFC 5321
/// 4.5.3.1.8 only promises 100, and big transactions make one 4xx costly.
const RECIPIENTS_PER_TRANSACTION: usize = 50;
/// The envelope `client` of a postmaster notice (a failed null-sender message reported to
/// the postmaster): a notice that fails is only logged, never reported again (no loops).
pub(crate) const NOTICE_CLIENT: &str = "local-postmaster-notice";
/// The envelope `client` of a bounce we generate.
const BOUNCE_CLIENT: &str = "local";

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
    /// Where reports on failed null-sender messages go.
    /// `None`: no deliverable postmaster address is configured; notices are logged only.
    pub(crate) postmaster: Option<String>,
    /// Our name and listeners: an MX that is us is never used (RFC 5321 5.1).
    pub(crate) ourselves: Ourselves,
    /// Addresses tried per destination and attempt (a failed host lookup counts as one).
    pub(crate) max_mx_addresses: usize,
    /// Sessions (connections past the greeting) per destination and attempt.
    pub(crate) max_mx_sessions: usize,
    /// All DNS lookups of one destination in one attempt.
    pub(crate) resolve_timeout: Duration,
    pub(crate) retry_schedule: Vec<Duration>,
    pub(crate) max_lifetime: Duration,
    pub(crate) max_concurrency: usize,
    pub(crate) global: Arc<Semaphore>,
    pub(crate) per_destination: Arc<Mutex<HashMap<Destination, Arc<Semaphore>>>>,
    pub(crate) per_destination_limit: usize,
    pub(crate) pool: Pool,
    pub(crate) handle: Handle,
    pub(crate) metrics: Arc<Metrics>,
}

impl Context {
    /// Attempts the runner keeps running at once. More than `max_concurrency` (the
    /// deliveries, a semaphore taken once the hosts are known), so that destinations whose
    /// DNS is slow hold attempts, not delivery slots; bounded, so that a big backlog
    /// never becomes a task per message.
    pub(crate) fn max_attempts(&self) -> usize {
        self.max_concurrency.saturating_mul(4).max(256)
    }

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
    pub(crate) kind: DeliveryStatus,
    /// One line: the remote reply ("550 5.1.1 ...") or our own explanation.
    pub(crate) reply: String,
    /// Enhanced status code for the DSN.
    pub(crate) status: String,
    /// The host that answered, when one did.
    pub(crate) remote: Option<String>,
    /// The remote reply as it was, for the DSN's Diagnostic-Code (RFC 3464 2.3.6);
    /// `None` for a reason of our own.
    pub(crate) diagnostic: Option<String>,
    /// Our own reason in words (no reply code), for the DSN's text part.
    pub(crate) explanation: Option<String>,
}

impl Outcome {
    fn local(kind: DeliveryStatus, status: &str, text: String) -> Outcome {
        let code = match kind {
            DeliveryStatus::Delivered => 250,
            DeliveryStatus::Deferred => 451,
            DeliveryStatus::Failed => 550,
        };
        Outcome {
            kind,
            reply: format!("{code} {status} {text}"),
            status: status.to_string(),
            remote: None,
            diagnostic: None,
            explanation: Some(text),
        }
    }

    /// A recipient given up after `max_queue_lifetime`, from its last outcome (RFC 5321
    /// 4.5.4.1). Status 4.4.7 "delivery time expired" (RFC 3463) with action `failed`, as
    /// Postfix reports it. The Diagnostic-Code carries the last remote reply exactly as
    /// it was, or is absent: never a 5xx made up to go with a 4.x.x status.
    fn expired(lifetime: Duration, last: Option<Outcome>) -> Outcome {
        let limit = crate::config::format_duration(lifetime);
        let mut explanation =
            format!("delivery time expired: not delivered within {limit} (max_queue_lifetime)");
        let (remote, diagnostic) = match last {
            Some(o) if o.remote.is_some() => (o.remote, o.diagnostic.or(Some(o.reply))),
            Some(o) => {
                let why = o.explanation.unwrap_or(o.reply);
                explanation.push_str(&format!("; last problem: {why}"));
                (None, None)
            }
            None => (None, None),
        };
        let reply = match (&remote, &diagnostic) {
            (Some(host), Some(d)) => format!("4.4.7 {explanation}; last reply from {host}: {d}"),
            _ => format!("4.4.7 {explanation}"),
        };
        Outcome {
            kind: DeliveryStatus::Failed,
            reply,
            status: "4.4.7".to_string(),
            remote,
            diagnostic,
            explanation: Some(explanation),
        }
    }

    fn from_reply(kind: DeliveryStatus, reply: &Reply, remote: &str) -> Outcome {
        let status = reply
            .status
            .map_or_else(|| format!("{}.0.0", reply.code / 100), |s| s.to_string());
        Outcome {
            kind,
            reply: reply.one_line(),
            status,
            remote: Some(remote.to_string()),
            diagnostic: Some(reply.one_line()),
            explanation: None,
        }
    }
}

/// What the runner learns from an attempt.
pub(crate) enum Report {
    /// Every recipient is final; the message is gone from the spool.
    Finished {
        id: QueueId,
        contacts: Vec<(Destination, Option<String>)>,
    },
    /// Some recipients wait for another attempt.
    Pending(Box<Pending>),
}

/// A message that waits for another attempt.
pub(crate) struct Pending {
    pub(crate) msg: StoredMessage,
    pub(crate) attempts: u32,
    pub(crate) next: Instant,
    pub(crate) errors: Vec<Option<String>>,
    /// Per destination tried: `None` if a host answered, else why none could be reached.
    pub(crate) contacts: Vec<(Destination, Option<String>)>,
}

/// The message body, read from the spool only once a delivery slot is held, so that
/// messages waiting for a busy or dead destination hold no body in memory (a fresh
/// message's first attempt may have it from its session already).
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
                    maillog::unreadable(&msg.envelope.id, &why);
                    return Err(why);
                }
            }
        }
        Ok(self.bytes.as_deref().unwrap_or_default())
    }
}

/// Runs one attempt for `msg` (which made `attempts` attempts before). Recipients at a
/// destination in `skip` (suspended: no host reached lately) are deferred with its
/// reason, without contacting it.
pub(crate) async fn run(
    ctx: Arc<Context>,
    mut msg: StoredMessage,
    attempts: u32,
    skip: Vec<(Destination, Arc<str>)>,
    text: Option<Vec<u8>>,
) -> Report {
    let id = msg.envelope.id;
    let mut errors: Vec<Option<String>> = vec![None; msg.states.len()];
    // This attempt's deferral per recipient, for an expiry report.
    let mut last: Vec<Option<Outcome>> = vec![None; msg.states.len()];
    // A fresh message's text came from its session: no read of the spool.
    let mut body = Body { bytes: text };

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
    let mut contacts: Vec<(Destination, Option<String>)> = Vec::new();
    for (key, indexes) in groups {
        let skipped = skip.iter().find(|(d, _)| *d == key.destination);
        for chunk in indexes.chunks(RECIPIENTS_PER_TRANSACTION) {
            let outcomes = match skipped {
                Some((d, why)) => {
                    let suspended = Outcome::local(
                        DeliveryStatus::Deferred,
                        "4.4.1",
                        format!("delivery to {d} suspended: {why}"),
                    );
                    vec![suspended; chunk.len()]
                }
                None => {
                    let (outcomes, reached) =
                        deliver_group(&ctx, &key, &msg, &mut body, chunk).await;
                    // `None`: nothing learnt about the destination (our own failure).
                    if let Some(reached) = reached {
                        match contacts.iter_mut().find(|(d, _)| *d == key.destination) {
                            // One chunk reaching a host is enough.
                            Some(c) if reached.is_none() => c.1 = None,
                            Some(_) => {}
                            None => contacts.push((key.destination.clone(), reached)),
                        }
                    }
                    outcomes
                }
            };
            for (index, outcome) in chunk.iter().copied().zip(outcomes) {
                log_outcome(&ctx, &msg.envelope, index, &key, &outcome);
                match outcome.kind {
                    DeliveryStatus::Delivered => {
                        record(&ctx, &msg, index, true, &outcome.reply).await;
                        msg.states[index] = RcptState::Delivered;
                    }
                    DeliveryStatus::Failed => failed_now.push((index, outcome)),
                    DeliveryStatus::Deferred => {
                        errors[index] = Some(outcome.reply.clone());
                        last[index] = Some(outcome);
                    }
                }
            }
        }
    }

    // RFC 5321 4.5.4.1: give up after the queue lifetime, with the last error.
    let age = Duration::from_secs((unix_now() - msg.envelope.arrived).max(0) as u64);
    if age >= ctx.max_lifetime {
        for (i, error) in errors.iter_mut().enumerate() {
            if msg.states[i] == RcptState::Pending && !failed_now.iter().any(|(f, _)| *f == i) {
                error.take();
                let outcome = Outcome::expired(ctx.max_lifetime, last[i].take());
                maillog::expired(&id, &msg.envelope.recipients[i]);
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
        if let Err(e) = ctx.spool.finish(id, msg.place, Durability::Written).await {
            tracing::error!(id = %id, error = %e, "cannot mark the message finished");
        }
        maillog::finished(&id);
        return Report::Finished { id, contacts };
    }
    // The message stays where it is in the log: a deferral writes nothing (the runner
    // keeps the schedule; after a restart every message is attempted again). A message
    // that waits long is carried forward by the runner's compaction when its segment is
    // otherwise finished (`Spool::relocate`).
    reschedule(&ctx, msg, attempts, errors, contacts)
}

fn reschedule(
    ctx: &Context,
    msg: StoredMessage,
    attempts: u32,
    errors: Vec<Option<String>>,
    contacts: Vec<(Destination, Option<String>)>,
) -> Report {
    let attempts = attempts + 1;
    let jitter = rand::random::<f64>() * 2.0 - 1.0;
    let delay = retry::next_delay(attempts, &ctx.retry_schedule, jitter);
    maillog::deferred(
        &msg.envelope.id,
        attempts,
        &crate::config::format_duration(Duration::from_secs(delay.as_secs().max(1))),
    );
    Report::Pending(Box::new(Pending {
        msg,
        attempts,
        next: Instant::now() + delay,
        errors,
        contacts,
    }))
}

/// Writes a final outcome; a failure to record is logged (the recipient may then be
/// tried again after a restart: at-least-once, never lost).
async fn record(ctx: &Context, msg: &StoredMessage, index: usize, delivered: bool, reply: &str) {
    if let Err(e) = ctx
        .spool
        .record_final(
            msg.envelope.id,
            msg.place,
            index,
            delivered,
            reply,
            Durability::Written,
        )
        .await
    {
        tracing::error!(id = %msg.envelope.id, error = %e, "cannot record a delivery outcome");
    }
}

fn log_outcome(ctx: &Context, env: &Envelope, index: usize, key: &NextHopKey, o: &Outcome) {
    let status = o.kind.as_str();
    ctx.metrics.delivery(o.kind);
    maillog::delivery(
        &env.id,
        &env.recipients[index],
        &key.destination,
        o.remote.as_deref().unwrap_or("-"),
        status,
        &o.reply,
    );
}

/// Sends the report on this attempt's failures, through the queue: a bounce to the
/// sender, or, for a null-sender message (itself a bounce or a notification), which RFC
/// 5321 4.5.5 forbids bouncing, a notice to the postmaster (like Postfix's "2bounce"
/// notice). A notice that fails is only logged: reporting it again could loop.
/// Returns false only when a report was due and could not be queued.
async fn bounce(ctx: &Context, env: &Envelope, body: &[u8], failed: &[(usize, Outcome)]) -> bool {
    let (kind, to, client) = if !env.sender.is_empty() {
        (dsn::DsnKind::Failure, env.sender.as_str(), BOUNCE_CLIENT)
    } else if env.client == NOTICE_CLIENT {
        maillog::no_bounce(
            &env.id,
            ": a postmaster notice could not be delivered; dropped",
        );
        return true;
    } else if let Some(postmaster) = &ctx.postmaster {
        (
            dsn::DsnKind::PostmasterNotice,
            postmaster.as_str(),
            NOTICE_CLIENT,
        )
    } else {
        maillog::no_bounce(
            &env.id,
            ", and no postmaster address to notify (set postmaster)",
        );
        return true;
    };
    let now = unix_now();
    let recipients: Vec<dsn::RecipientStatus> = failed
        .iter()
        .map(|(i, o)| dsn::RecipientStatus {
            address: env.recipients[*i].clone(),
            action: dsn::Action::Failed,
            status: o.status.clone(),
            remote_mta: o.remote.clone(),
            diagnostic: o.diagnostic.clone(),
            explanation: o.explanation.clone(),
            last_attempt: Some(now),
        })
        .collect();
    let id = ctx.spool.new_id();
    let text = dsn::build(&dsn::DsnRequest {
        kind,
        reporting_mta: &ctx.hostname,
        queue_id: &env.id.to_string(),
        sender: to,
        arrival: env.arrived,
        now,
        original: body,
        recipients: &recipients,
        message_id: format!("<{id}.dsn@{}>", ctx.hostname),
    });
    let envelope = Envelope {
        id,
        arrived: now,
        client: client.into(),
        helo: ctx.hostname.clone(),
        auth: None,
        sender: String::new(),
        // The report quotes 8-bit headers as they were (RFC 6152).
        params: if text.is_ascii() {
            Vec::new()
        } else {
            vec!["BODY=8BITMIME".to_string()]
        },
        smtputf8: !to.is_ascii(),
        recipients: vec![to.to_string()],
    };
    match ctx.spool.store_message(envelope, text).await {
        Ok((stored, _)) => {
            if kind == dsn::DsnKind::PostmasterNotice {
                maillog::report_queued(&id, &env.id, to, true);
            } else {
                maillog::report_queued(&id, &env.id, to, false);
            }
            ctx.metrics.bounce();
            ctx.handle.enqueue(stored);
            true
        }
        Err(e) => {
            tracing::error!(id = %env.id, error = %e, "cannot queue the bounce; will retry");
            false
        }
    }
}

/// Delivers `indexes` of `env` to one next hop; one outcome per index, in order.
///
/// The hosts are found first (DNS, bounded by `resolve_timeout`), and only then is a
/// global delivery slot taken: a destination whose DNS is slow holds its own
/// per-destination slot, never one that other destinations need. Then the hosts are tried
/// in order, at most `max_mx_sessions` sessions of them, for the recipients that have no
/// outcome yet (RFC 5321 5.1: a host that cannot take the mail is followed by the next):
/// - a host that cannot be reached, or refuses the greeting or EHLO: the next one;
/// - a host that cannot take the message as it is ([`Connection::refusal`]: no 8BITMIME,
///   SMTPUTF8 or a SIZE too small): the next one; the recipients fail only if every host
///   tried refused so;
/// - recipients refused with 4xx (or 421) at MAIL, RCPT or DATA, before any data was
///   sent: the next host for them, as Postfix does; the last 4xx stands if no host
///   takes them;
/// - once the message has been sent to a host, its answers are final for this attempt.
///
/// Also returns whether the destination was reached: `Some(None)` if a host answered (or
/// the destination's name answered for good), `Some(Some(why))` if none could be
/// (connections failed, DNS failed temporarily: the runner suspends such a destination),
/// `None` if the attempt learnt nothing about it (our own failure).
async fn deliver_group(
    ctx: &Context,
    key: &NextHopKey,
    msg: &StoredMessage,
    body: &mut Body,
    indexes: &[usize],
) -> (Vec<Outcome>, Option<Option<String>>) {
    let env = &msg.envelope;
    let all = |o: Outcome| {
        let unreachable = (o.kind == DeliveryStatus::Deferred).then(|| o.reply.clone());
        (vec![o; indexes.len()], Some(unreachable))
    };
    let _dest_slot = ctx
        .destination_slots(&key.destination)
        .acquire_owned()
        .await;
    let Targets {
        hosts: targets,
        complete,
    } = match resolve(ctx, key).await {
        Ok(t) => t,
        Err(o) => return all(o),
    };
    let total_targets = targets.len();
    let _slot = Arc::clone(&ctx.global).acquire_owned().await;
    let body = match body.get(ctx, msg).await {
        Ok(b) => b,
        Err(why) => {
            let outcome = Outcome::local(
                DeliveryStatus::Deferred,
                "4.3.0",
                format!("cannot read the message from the spool: {why}"),
            );
            // Our problem, not the destination's.
            return (vec![outcome; indexes.len()], None);
        }
    };
    let client = ctx.client(key.route);
    let declared_8bit = env
        .params
        .iter()
        .any(|p| p.eq_ignore_ascii_case("BODY=8BITMIME"));
    let mut outcomes: Vec<Option<Outcome>> = vec![None; indexes.len()];
    // Positions (in `indexes`) still without a final outcome, and the 4xx each got from a
    // host before any data was sent (it stands if no later host takes the recipient).
    let mut open: Vec<usize> = (0..indexes.len()).collect();
    let content = Content::of(body);
    let mut refused_before_data: Vec<Option<Outcome>> = vec![None; indexes.len()];
    let mut problem = String::from("no host could be reached");
    let mut unreachable = 0usize;
    let mut refusal: Option<Outcome> = None;
    let mut sessions = 0usize;
    // A host answered (past its greeting, or a refusal of its own: TLS, AUTH, EHLO).
    let mut answered = false;
    // Hosts this attempt got to (a host left out by the session cap might take it).
    let mut tried = 0usize;
    'hosts: for (addr, name) in targets {
        if open.is_empty() || sessions >= ctx.max_mx_sessions {
            break;
        }
        tried += 1;
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
                    answered |= !no_answer(&e);
                    unreachable += 1;
                    continue 'hosts;
                }
            },
        };
        sessions += 1;
        let rcpts: Vec<String> = open
            .iter()
            .map(|&p| env.recipients[indexes[p]].clone())
            .collect();
        let message = OutboundMessage {
            sender: &env.sender,
            recipients: &rcpts,
            body,
            smtputf8: env.smtputf8,
            eight_bit: declared_8bit,
            content,
        };
        if let Some(reply) = conn.refusal(&message) {
            maillog::host_cannot_take(&env.id, &name, addr, &reply.one_line());
            refusal = Some(Outcome::from_reply(DeliveryStatus::Failed, &reply, &name));
            // Nothing was sent: the connection is as good as before.
            ctx.pool.put(pool_key, conn);
            continue 'hosts;
        }
        loop {
            match conn.send(&message).await {
                Ok(results) => {
                    let took = conn.took_message().to_vec();
                    if conn.is_reusable() {
                        ctx.pool.put(pool_key, conn);
                    } else {
                        tokio::spawn(conn.quit());
                    }
                    let mut still_open = Vec::new();
                    for (n, (&p, result)) in open.iter().zip(results).enumerate() {
                        let outcome = Outcome::from_reply(result.status, &result.reply, &name);
                        if result.status == DeliveryStatus::Deferred
                            && !took.get(n).copied().unwrap_or(true)
                        {
                            refused_before_data[p] = Some(outcome);
                            still_open.push(p);
                            continue;
                        }
                        outcomes[p] = Some(outcome);
                    }
                    open = still_open;
                    continue 'hosts;
                }
                // A cached connection may have been closed by the server while idle: one
                // fresh connection, then the error counts. Only if no message data went
                // out on it: after the body the host may have taken the message, and
                // sending it again would deliver it twice.
                Err(_) if reused && !conn.took_message().iter().any(|&t| t) => {
                    reused = false;
                    conn = match connect(client, addr, &name).await {
                        Ok(c) => c,
                        Err(e) => {
                            problem = connect_problem(&name, addr, &e);
                            answered |= !no_answer(&e);
                            unreachable += 1;
                            continue 'hosts;
                        }
                    };
                }
                Err(e) => {
                    // The message may have reached the host before the break: no other
                    // host this attempt (a duplicate is worse than a wait).
                    let broke = Outcome::local(
                        DeliveryStatus::Deferred,
                        "4.4.2",
                        format!("connection to {name}[{addr}] broke: {e}"),
                    );
                    for p in open.drain(..) {
                        outcomes[p] = Some(broke.clone());
                    }
                    break 'hosts;
                }
            }
        }
    }
    for p in open {
        outcomes[p] = Some(match (refused_before_data[p].take(), &refusal) {
            (Some(o), _) => o,
            // Every host of the destination said it cannot take the message (RFC 6152
            // 3, RFC 6531 3.2, RFC 1870 6): that is final. Only every host: one that
            // could not be looked up, was left out by a cap or not reached may take it
            // at the next attempt.
            (None, Some(r)) if unreachable == 0 && complete && tried == total_targets => r.clone(),
            (None, Some(r)) => Outcome::local(
                DeliveryStatus::Deferred,
                "4.4.1",
                format!(
                    "{problem}; the hosts reached cannot take the message: {}",
                    r.reply
                ),
            ),
            (None, None) => Outcome::local(DeliveryStatus::Deferred, "4.4.1", problem.clone()),
        });
    }
    let outcomes = outcomes
        .into_iter()
        .map(|o| {
            o.unwrap_or_else(|| {
                Outcome::local(DeliveryStatus::Deferred, "4.3.0", "no outcome".into())
            })
        })
        .collect();
    let reached = (sessions == 0 && !answered && unreachable > 0).then_some(problem);
    (outcomes, Some(reached))
}

/// The host did not answer at all: no connection, no greeting, or a greeting refusal
/// (what marks a destination down; TLS, AUTH or EHLO trouble is a host that answered).
fn no_answer(e: &ConnectError) -> bool {
    matches!(
        e,
        ConnectError::Io(_) | ConnectError::Timeout(_) | ConnectError::Greeting(_)
    )
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

/// The addresses to try for one destination.
struct Targets {
    /// In order, each with the name its certificate must carry.
    hosts: Vec<(SocketAddr, String)>,
    /// Every host of the destination is in `hosts`: none failed to resolve, timed out or
    /// was left out by `max_mx_addresses`.
    complete: bool,
}

/// The addresses to try, in order, each with the name its certificate must carry; all
/// lookups of one destination within `resolve_timeout`.
async fn resolve(ctx: &Context, key: &NextHopKey) -> Result<Targets, Outcome> {
    let deadline = tokio::time::Instant::now() + ctx.resolve_timeout;
    let timed_out = |what: &str| {
        Outcome::local(
            DeliveryStatus::Deferred,
            "4.4.3",
            format!(
                "{what}: DNS lookups took longer than resolve_timeout ({})",
                crate::config::format_duration(ctx.resolve_timeout)
            ),
        )
    };
    match &key.destination {
        Destination::Ip(addr) => {
            if ctx.ourselves.is_us(*addr) {
                return Err(self_destination(&key.destination.to_string(), key.route));
            }
            Ok(Targets {
                hosts: vec![(*addr, addr.ip().to_string())],
                complete: true,
            })
        }
        Destination::Host(host, port) => {
            let lookup = tokio::time::timeout_at(deadline, ctx.resolver.host_addresses(host));
            match lookup.await {
                Err(_) => Err(timed_out(host)),
                Ok(Ok(addrs)) if !addrs.is_empty() => {
                    let complete = addrs.len() <= ctx.max_mx_addresses;
                    let addrs: Vec<SocketAddr> = interleave(addrs)
                        .into_iter()
                        .take(ctx.max_mx_addresses)
                        .map(|ip| SocketAddr::new(ip, *port))
                        .collect();
                    if addrs.iter().any(|a| ctx.ourselves.is_us(*a)) {
                        return Err(self_destination(&format!("{host}:{port}"), key.route));
                    }
                    Ok(Targets {
                        hosts: addrs.into_iter().map(|a| (a, host.clone())).collect(),
                        complete,
                    })
                }
                Ok(Ok(_)) => Err(Outcome::local(
                    DeliveryStatus::Deferred,
                    "4.4.3",
                    format!("next hop {host} has no address"),
                )),
                // A configured next hop that does not resolve is our problem, never the
                // sender's: defer.
                Ok(Err(e)) => Err(Outcome::local(
                    DeliveryStatus::Deferred,
                    "4.4.3",
                    format!("next hop {host}: {e}"),
                )),
            }
        }
        Destination::Mx(domain) => {
            let hosts =
                match tokio::time::timeout_at(deadline, ctx.resolver.mail_hosts(domain)).await {
                    Err(_) => return Err(timed_out(domain)),
                    Ok(Ok(h)) => h,
                    Ok(Err(e)) => {
                        let kind = if e.is_permanent() {
                            DeliveryStatus::Failed
                        } else {
                            DeliveryStatus::Deferred
                        };
                        return Err(Outcome::local(kind, e.status(), format!("{domain}: {e}")));
                    }
                };
            mx_targets(ctx, domain, &hosts, deadline).await
        }
    }
}

/// The addresses of a domain's MX hosts, in order, within the caps (RFC 5321 5.1).
///
/// At most `max_mx_addresses` addresses, where a host whose lookup fails counts as one
/// (so a domain listing a hundred MX names that do not resolve costs a handful of
/// queries, not a hundred). The first host that is us, by name or by any address on
/// `mx_port`, is dropped with every host of equal or worse preference (RFC 5321 5.1:
/// "if the SMTP client finds its own host name or address in the MX list it MUST
/// discard that and all records of equal or worse preference"); if no host is left, mail
/// for the domain would loop back to us: a permanent 5.4.6.
async fn mx_targets(
    ctx: &Context,
    domain: &str,
    hosts: &[MailHost],
    deadline: tokio::time::Instant,
) -> Result<Targets, Outcome> {
    // Names need no lookup: cut at the first one that is ours.
    let mut cut: Option<u16> = hosts
        .iter()
        .find(|h| ctx.ourselves.is_our_name(&h.name))
        .map(|h| h.preference);
    let mut targets: Vec<(SocketAddr, String, u16)> = Vec::new();
    let mut budget = ctx.max_mx_addresses;
    let mut last_error: Option<String> = None;
    let mut complete = true;
    for h in hosts {
        if cut.is_some_and(|c| h.preference >= c) {
            break;
        }
        if budget == 0 {
            complete = false;
            break;
        }
        let addrs =
            match tokio::time::timeout_at(deadline, ctx.resolver.host_addresses(&h.name)).await {
                Err(_) => {
                    last_error = Some(format!(
                        "{}: DNS lookups took longer than resolve_timeout",
                        h.name
                    ));
                    complete = false;
                    break;
                }
                Ok(Err(e)) => {
                    // RFC 5321 5.1: no MX and no address means no mail for it.
                    if h.implicit && e.is_permanent() {
                        return Err(Outcome::local(
                            DeliveryStatus::Failed,
                            e.status(),
                            format!("{domain}: {e}"),
                        ));
                    }
                    budget -= 1;
                    last_error = Some(host_error(&h.name, &e));
                    // A host that may resolve next time might take what others refuse.
                    if !e.is_permanent() {
                        complete = false;
                    }
                    continue;
                }
                Ok(Ok(addrs)) => addrs,
            };
        if addrs
            .iter()
            .any(|ip| ctx.ourselves.is_us(SocketAddr::new(*ip, ctx.mx_port)))
        {
            tracing::info!(domain, host = %h.name, preference = h.preference,
                "MX host is this server: it and every host of equal or worse preference are skipped");
            cut = Some(h.preference);
            targets.retain(|t| t.2 < h.preference);
            break;
        }
        if addrs.len() > budget {
            complete = false;
        }
        for ip in interleave(addrs).into_iter().take(budget) {
            targets.push((
                SocketAddr::new(ip, ctx.mx_port),
                h.name.clone(),
                h.preference,
            ));
            budget -= 1;
        }
    }
    if targets.is_empty() {
        if cut.is_some() {
            // RFC 3463 X.4.6 "routing loop detected"; permanent: a retry finds the same.
            maillog::mx_loop(domain);
            return Err(Outcome::local(
                DeliveryStatus::Failed,
                "5.4.6",
                format!("mail for {domain} loops back to myself"),
            ));
        }
        let why = last_error.unwrap_or_else(|| "no address".to_string());
        return Err(Outcome::local(
            DeliveryStatus::Deferred,
            "4.4.3",
            format!("no address for the mail hosts of {domain}: {why}"),
        ));
    }
    Ok(Targets {
        hosts: targets.into_iter().map(|(a, n, _)| (a, n)).collect(),
        complete,
    })
}

fn host_error(host: &str, e: &ResolveError) -> String {
    format!("{host}: {e}")
}

/// A next hop that is this server. For an address-literal recipient (`user@[ip]`, no
/// route) that is the mail's fault: 5.4.6. A configured route to ourselves is the
/// operator's: defer (4.4.6) and say so, so nothing is lost while the route is fixed.
fn self_destination(what: &str, route: Option<usize>) -> Outcome {
    match route {
        None => Outcome::local(
            DeliveryStatus::Failed,
            "5.4.6",
            format!("mail for {what} loops back to myself"),
        ),
        Some(_) => {
            tracing::error!(
                next_hop = what,
                "a route's next hop is this server itself: mail would loop; check [[route]] next_hop"
            );
            Outcome::local(
                DeliveryStatus::Deferred,
                "4.4.6",
                format!("the route's next hop {what} is this server (mail loop)"),
            )
        }
    }
}

/// IPv6 and IPv4 addresses alternated, each family in its own order (RFC 8305 4), so a
/// broken IPv6 path costs one connect timeout before IPv4 is tried, not one per address.
fn interleave(addrs: Vec<IpAddr>) -> Vec<IpAddr> {
    let (v6, v4): (Vec<IpAddr>, Vec<IpAddr>) = addrs.into_iter().partition(IpAddr::is_ipv6);
    let mut out = Vec::with_capacity(v6.len() + v4.len());
    let (mut a, mut b) = (v6.into_iter(), v4.into_iter());
    loop {
        match (a.next(), b.next()) {
            (None, None) => return out,
            (x, y) => out.extend(x.into_iter().chain(y)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn interleaving_alternates_families() {
        let ips: Vec<IpAddr> = ["::1", "::2", "::3", "10.0.0.1", "10.0.0.2"]
            .iter()
            .map(|s| s.parse().unwrap())
            .collect();
        let got: Vec<String> = interleave(ips).iter().map(|i| i.to_string()).collect();
        assert_eq!(got, ["::1", "10.0.0.1", "::2", "10.0.0.2", "::3"]);
        assert!(interleave(Vec::new()).is_empty());
    }

    #[test]
    fn expired_outcomes_never_mix_classes() {
        let day = Duration::from_secs(86_400);
        let remote = Outcome::from_reply(
            DeliveryStatus::Deferred,
            &Reply::new(451, Some(postern_smtp::Status(4, 3, 0)), "not now"),
            "mx.example",
        );
        let o = Outcome::expired(day, Some(remote));
        assert_eq!(
            (o.kind, o.status.as_str()),
            (DeliveryStatus::Failed, "4.4.7")
        );
        assert_eq!(o.diagnostic.as_deref(), Some("451 4.3.0 not now"));
        assert_eq!(o.remote.as_deref(), Some("mx.example"));
        assert!(!o.reply.starts_with("550"), "{}", o.reply);

        let local = Outcome::local(
            DeliveryStatus::Deferred,
            "4.4.1",
            "no host could be reached".into(),
        );
        let o = Outcome::expired(day, Some(local));
        assert_eq!(o.diagnostic, None);
        assert_eq!(o.remote, None);
        assert!(o.reply.starts_with("4.4.7 "), "{}", o.reply);
        assert!(
            o.explanation
                .unwrap()
                .ends_with("last problem: no host could be reached"),
        );
        assert_eq!(Outcome::expired(day, None).diagnostic, None);
    }
}
