//! The intake stage: what happens to a message between the end of its transfer (DATA or
//! the last BDAT) and the spool. The session hands over the message (the envelope, the
//! client's facts and the body) and answers with the reply of the [`Outcome`]; the
//! metrics and the decision log read the outcome (in [`Intake::accept`]), never the
//! reply code.
//!
//! The steps, in order. Each either lets the message go on or ends the intake with an
//! outcome; only the spool step writes anything, so "250" still means "fsynced":
//! 1. **Memory** ([`Intake::reserve`]): reserve, from `max_message_memory`, the copies
//!    the later steps make (`452 4.3.1` when the budget cannot cover them: the client
//!    tries again later).
//! 2. **Screen** ([`Intake::screen`]): the `[[filter]]` screener, off the executor. It sees
//!    the message as the client sent it and can reject, discard, quarantine or redirect
//!    it; it never grants relay.
//! 3. **Authenticate** ([`Intake::authenticate`]): `[authentication]` (SPF, DKIM, DMARC)
//!    on mail from clients neither trusted nor authenticated, on the message as sent; our
//!    `Authentication-Results:` on top, forged ones removed; DMARC p=reject (or SPF fail
//!    with `spf_reject`) refused, p=quarantine held.
//! 4. **Milters** ([`Intake::milters`]): the session's `[[milter]]`s at end of message
//!    (`crate::milter`), in order, each seeing the message as the previous one left it
//!    (the authentication results included); they may change header fields, the envelope
//!    and the body, and reject, tempfail, discard or quarantine it. Also for a message
//!    bound for the quarantine: a release must deliver scanned mail.
//! 5. **Sign** ([`Intake::sign`]): DKIM signatures (`[[dkim]]`) for mail from trusted or
//!    authenticated clients, over the message as it will be stored and sent; after the
//!    milters and before the trace, so every change is covered (interface: "Mail
//!    authentication").
//! 6. **Trace** ([`Intake::trace`]): our `Received:` (and a redirect's
//!    `X-Postern-Redirected:`) put in front of the body in place, without a second copy.
//! 7. **Spool** ([`Intake::spool`]): the quarantine, or the queue (then delivery is told,
//!    after the outcome is logged).
//!
//! Trust: the body is the client's, bounded by the protocol core (`max_message_size`, line
//! rules) and by the memory budget; the envelope was checked by the core and, recipient by
//! recipient, by the relay policy.

use std::borrow::Cow;
use std::fmt::Display;
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

use postern_smtp::server::Message;
use postern_smtp::{Reply, ReversePath, catalogue};

use crate::authentication::{Action as AuthAction, Checker, ClientFacts, strip_forged};
use crate::budget::{MemoryBudget, Reservation};
use crate::config::FilterAction;
use crate::delivery;
use crate::dkim::Signer;
use crate::filter::{Screener, Verdict};
use crate::maillog;
use crate::metrics::{Metrics, Rejection};
use crate::milter::{self, Chain};
use crate::queue::{Envelope, QueueId, Spool, SpoolError, StoredMessage};

/// What became of a message handed to the intake; each carries the reply the client gets.
#[derive(Debug)]
pub enum Outcome {
    /// In the queue for its recipients (250).
    Queued {
        id: QueueId,
        /// Bytes stored, our trace fields included.
        size: usize,
        reply: Reply,
    },
    /// Held in the quarantine by a filter (250: the client's part is done).
    Quarantined { id: QueueId, reply: Reply },
    /// Dropped by a filter; the client is told it was queued (250).
    Discarded { id: QueueId, reply: Reply },
    /// In the queue for a filter's recipient instead of the envelope's (250).
    Redirected {
        id: QueueId,
        /// The recipient it now goes to.
        to: String,
        /// Bytes stored, our trace fields included.
        size: usize,
        reply: Reply,
    },
    /// Refused for good by a filter (550 5.7.1).
    Rejected { id: QueueId, reply: Reply },
    /// Refused by `[authentication]` enforcement (DMARC p=reject, or SPF fail with
    /// `spf_reject`): 550 5.7.1 / 550 5.7.23.
    AuthRefused { id: QueueId, reply: Reply },
    /// Refused by a milter, for good or for now (its reply, or 550 5.7.1 / 451 4.7.1).
    MilterRefused {
        id: QueueId,
        milter: String,
        reply: Reply,
    },
    /// Not taken now; the client sends it again later (452 or 451).
    Tempfailed { why: Tempfail, reply: Reply },
}

/// Why a message was not taken now.
#[derive(Debug)]
pub enum Tempfail {
    /// `max_message_memory` could not cover the copies the intake makes (452 4.3.1);
    /// `wanted` bytes more were asked for.
    Memory { wanted: u64 },
    /// Screening itself failed; unscreened mail is never accepted (451 4.3.0).
    Screening,
    /// Signing failed (451 4.3.0): a key could not sign, or the task failed; relayed
    /// mail is not sent unsigned because of a fault of ours.
    Signing,
    /// The quarantine or the spool could not write it (451 4.3.0).
    Store(SpoolError),
}

impl Outcome {
    /// The reply for the client.
    pub fn into_reply(self) -> Reply {
        match self {
            Outcome::Queued { reply, .. }
            | Outcome::Quarantined { reply, .. }
            | Outcome::Discarded { reply, .. }
            | Outcome::Redirected { reply, .. }
            | Outcome::Rejected { reply, .. }
            | Outcome::MilterRefused { reply, .. }
            | Outcome::AuthRefused { reply, .. }
            | Outcome::Tempfailed { reply, .. } => reply,
        }
    }
}

/// A step's result: `Ok` to go on with the next step, `Err` to end the intake with
/// this outcome.
type Step<T> = Result<T, Outcome>;

/// Where a screened message goes.
enum Route {
    /// The queue, for the envelope's recipients.
    Queue,
    /// The queue, for `to` instead (a filter's `redirect`, named `rule`).
    Redirect { to: String, rule: String },
    /// The quarantine (a filter's `quarantine`, named `rule`; a milter's is
    /// `milter:NAME`).
    Quarantine { rule: String, reason: String },
}

/// What the intake needs, shared by every session.
pub struct Intake {
    spool: Spool,
    delivery: delivery::Handle,
    screener: Arc<Screener>,
    metrics: Arc<Metrics>,
    budget: Arc<MemoryBudget>,
    /// DKIM signing keys (may be empty).
    signer: Arc<Signer>,
    /// `[authentication]`, when any check is on.
    checker: Option<Arc<Checker>>,
    /// Our name, for the `Received:` field.
    hostname: String,
}

/// What a configuration puts into the intake's steps (screen, authenticate, sign).
pub struct Steps {
    pub screener: Screener,
    /// `[authentication]`, when any check is on.
    pub checker: Option<Checker>,
    pub signer: Signer,
}

impl Default for Steps {
    /// No filter, no check, no key.
    fn default() -> Steps {
        Steps {
            screener: Screener::new(&[]),
            checker: None,
            signer: Signer::default(),
        }
    }
}

impl Intake {
    pub fn new(
        spool: Spool,
        delivery: delivery::Handle,
        steps: Steps,
        metrics: Arc<Metrics>,
        budget: Arc<MemoryBudget>,
        hostname: String,
    ) -> Intake {
        Intake {
            spool,
            delivery,
            screener: Arc::new(steps.screener),
            metrics,
            budget,
            signer: Arc::new(steps.signer),
            checker: steps.checker.map(Arc::new),
            hostname,
        }
    }

    /// Runs the steps (module header) on `message`, whose body `reservation` already
    /// covers; counts and logs the outcome and returns it. The reservation may have grown
    /// (the caller shrinks it when the session is done with the message). `milters`: the
    /// session's conversation with its milters; `relayed`: the client is trusted or
    /// authenticated (its mail is signed).
    pub async fn accept(
        &self,
        mut message: Message,
        reservation: &mut Reservation,
        milters: &mut Chain,
        relayed: bool,
    ) -> Outcome {
        let body = std::mem::take(&mut message.body);
        let (outcome, queued) = match self
            .run(&mut message, body, reservation, milters, relayed)
            .await
        {
            Ok(done) => done,
            Err(outcome) => (outcome, None),
        };
        self.report(&message, &outcome);
        if let Some((stored, text)) = queued {
            self.delivery.enqueue_with_text(stored, Some(text));
        }
        outcome
    }

    /// The steps, in order. A message for the queue comes back with the outcome (with
    /// the text stored, for its first attempt), to be handed to delivery once the
    /// outcome is logged.
    async fn run(
        &self,
        message: &mut Message,
        body: Vec<u8>,
        reservation: &mut Reservation,
        milters: &mut Chain,
        relayed: bool,
    ) -> Step<(Outcome, Option<(StoredMessage, Vec<u8>)>)> {
        self.reserve(body.len() as u64, reservation)?;
        let id = self.spool.new_id();
        let sender = sender_text(&message.sender);
        let (route, body) = self.screen(message, id, &sender, body).await?;
        let (route, body) = self
            .authenticate(message, id, route, relayed, body, reservation)
            .await?;
        let (route, body) = self
            .milters(message, id, route, body, reservation, milters)
            .await?;
        // A milter may have changed the sender.
        let sender = sender_text(&message.sender);
        let (body, signatures) = self.sign(id, relayed, body).await?;
        let body = self.trace(message, id, &route, &signatures, body);
        Ok(self.spool(message, id, sender, route, body).await)
    }

    /// Step 1. The body is held (and reserved) already; storing may need one more copy (a
    /// quarantined message's record is built whole; the queue's log writes the body where
    /// it is, but which way a message goes is known only later), screening up to about one
    /// more (decoded parts). Reserve both first.
    fn reserve(&self, size: u64, reservation: &mut Reservation) -> Step<()> {
        let copies = if self.screener.is_empty() { 1 } else { 2 };
        if reservation.resize(reservation.held() + copies * size) {
            return Ok(());
        }
        Err(Outcome::Tempfailed {
            why: Tempfail::Memory {
                wanted: copies * size,
            },
            reply: catalogue::insufficient_storage(),
        })
    }

    /// Step 2. The screener sees the message as the client sent it. Policy never reads
    /// content; filters never grant relay: they can only refuse, drop, hold or narrow
    /// delivery. The verdict is logged and counted here (a quarantine that then fails to
    /// write still was the filter's action).
    async fn screen(
        &self,
        message: &Message,
        id: QueueId,
        sender: &str,
        body: Vec<u8>,
    ) -> Step<(Route, Vec<u8>)> {
        let Some((verdict, body)) = screen(&self.screener, sender, body).await else {
            return Err(Outcome::Tempfailed {
                why: Tempfail::Screening,
                reply: catalogue::local_error(),
            });
        };
        let Some(v) = verdict else {
            return Ok((Route::Queue, body));
        };
        let id_text = id.to_string();
        maillog::filtered(
            &id_text,
            message.peer,
            &v.rule,
            v.action.as_str(),
            &v.reason,
            &message.sender,
            &message.recipients,
        );
        self.metrics.filter_action(&v.action);
        match v.action {
            FilterAction::Reject => Err(Outcome::Rejected {
                id,
                reply: catalogue::filter_rejected(),
            }),
            FilterAction::Discard => Err(Outcome::Discarded {
                id,
                reply: catalogue::queued(&id_text),
            }),
            FilterAction::Quarantine => Ok((
                Route::Quarantine {
                    rule: v.rule,
                    reason: v.reason,
                },
                body,
            )),
            FilterAction::Redirect(to) => Ok((Route::Redirect { to, rule: v.rule }, body)),
        }
    }

    /// Step 3. `[authentication]` on mail from clients neither trusted nor authenticated:
    /// SPF, DKIM and DMARC on the message as the client sent it (before any milter
    /// changes it, which would break the signatures it verifies); our
    /// `Authentication-Results:` on top and forged ones removed; DMARC or SPF enforcement.
    async fn authenticate(
        &self,
        message: &Message,
        id: QueueId,
        route: Route,
        relayed: bool,
        body: Vec<u8>,
        reservation: &mut Reservation,
    ) -> Step<(Route, Vec<u8>)> {
        let Some(checker) = self.checker.as_deref().filter(|_| !relayed) else {
            // Unchecked mail (a trusted or authenticated client, or no checks on) still
            // loses any Authentication-Results: field claiming to be ours (RFC 8601 5):
            // the internal server trusts our authserv-id.
            return match strip_forged(&body, &self.hostname) {
                Cow::Borrowed(_) => Ok((route, body)),
                Cow::Owned(stripped) => {
                    maillog::forged_results_removed(&id.to_string(), message.peer);
                    Ok((route, stripped))
                }
            };
        };
        let sender = match &message.sender {
            ReversePath::Null => None,
            ReversePath::Mailbox(a) => Some(a.to_string()),
        };
        let facts = ClientFacts {
            ip: message.peer.ip(),
            helo: &message.helo,
            mail_from: sender.as_deref(),
            hostname: &self.hostname,
        };
        let verdict = checker.check(&facts, &body).await;
        let id_text = id.to_string();
        maillog::authentication(&id_text, message.peer, &verdict.log_fields());
        self.metrics.authentication(&verdict);
        let route = match verdict.action {
            AuthAction::Accept => route,
            AuthAction::Reject(ref reply) => {
                maillog::authentication_refused(&id_text, message.peer, reply);
                return Err(Outcome::AuthRefused {
                    id,
                    reply: reply.clone(),
                });
            }
            AuthAction::Quarantine(ref reason) => match route {
                // A filter's quarantine stands; its rule says more.
                Route::Quarantine { .. } => route,
                _ => Route::Quarantine {
                    rule: "dmarc".to_string(),
                    reason: reason.clone(),
                },
            },
        };
        // The rewritten copy (our field on top, forged ones out) is one more body.
        let grown = reservation.held() + body.len() as u64 + verdict.header.len() as u64;
        if !reservation.resize(grown) {
            return Err(Outcome::Tempfailed {
                why: Tempfail::Memory {
                    wanted: body.len() as u64,
                },
                reply: catalogue::insufficient_storage(),
            });
        }
        Ok((route, verdict.rewrite(&body)))
    }

    /// Step 4. The milters at end of message (`crate::milter`). Their decisions are
    /// logged and counted where they are made; the outcome here.
    async fn milters(
        &self,
        message: &mut Message,
        id: QueueId,
        route: Route,
        mut body: Vec<u8>,
        reservation: &mut Reservation,
        milters: &mut Chain,
    ) -> Step<(Route, Vec<u8>)> {
        // Also for a message bound for the quarantine (a filter's or DMARC's): a person
        // may release it, and it must have been scanned then; a milter's reject or
        // discard wins over holding it.
        if milters.is_empty() {
            return Ok((route, body));
        }
        let id_text = id.to_string();
        let envelope = milter::Envelope {
            sender: &mut message.sender,
            params: &mut message.params,
            recipients: &mut message.recipients,
        };
        match milters
            .end_of_message(&id_text, envelope, &mut body, reservation)
            .await
        {
            milter::Verdict::Go { quarantine: None } => Ok((route, body)),
            // Already held (a filter's or DMARC's rule names it first).
            milter::Verdict::Go {
                quarantine: Some(_),
            } if matches!(route, Route::Quarantine { .. }) => Ok((route, body)),
            milter::Verdict::Go {
                quarantine: Some((milter, reason)),
            } => Ok((
                Route::Quarantine {
                    rule: format!("milter:{milter}"),
                    reason,
                },
                body,
            )),
            milter::Verdict::Refused { milter, reply } => {
                Err(Outcome::MilterRefused { id, milter, reply })
            }
            milter::Verdict::Discarded { .. } => Err(Outcome::Discarded {
                id,
                reply: catalogue::queued(&id_text),
            }),
            milter::Verdict::Memory { wanted } => Err(Outcome::Tempfailed {
                why: Tempfail::Memory { wanted },
                reply: catalogue::insufficient_storage(),
            }),
        }
    }

    /// Step 5. DKIM signatures for relayed mail: the `DKIM-Signature:` fields to put in
    /// front (empty when nothing is signed). Off the executor: an RSA signature costs
    /// about a millisecond of CPU.
    async fn sign(&self, id: QueueId, relayed: bool, body: Vec<u8>) -> Step<(Vec<u8>, String)> {
        if !relayed || self.signer.is_empty() {
            return Ok((body, String::new()));
        }
        let signer = Arc::clone(&self.signer);
        let signed = tokio::task::spawn_blocking(move || {
            let signed = signer.sign(&body);
            (body, signed)
        })
        .await;
        let Ok((body, signed)) = signed else {
            // The task panicked (mail-auth returns errors, so it should not): the body
            // went with it. Not taken now; the client sends it again.
            tracing::error!(id = %id, "DKIM signing failed unexpectedly; the message is refused with 451");
            return Err(Outcome::Tempfailed {
                why: Tempfail::Signing,
                reply: catalogue::local_error(),
            });
        };
        let id = id.to_string();
        for made in &signed.made {
            maillog::dkim_signed(&id, &made.domain, &made.selector, made.algorithm);
            self.metrics.dkim_signed(made.algorithm);
        }
        if let Some(why) = &signed.error {
            tracing::error!(id = %id, why = %why, "DKIM signing failed; the message is refused with 451");
            return Err(Outcome::Tempfailed {
                why: Tempfail::Signing,
                reply: catalogue::local_error(),
            });
        }
        if let Some(why) = &signed.failed {
            maillog::dkim_unsigned(&id, why);
            self.metrics.dkim_unsigned();
        }
        Ok((body, signed.fields))
    }

    /// Step 6. Our trace fields go in front of the body in place: no second copy of the
    /// message (and exactly the room they need, not a doubled buffer). The signatures
    /// come first, as a signing milter would add them (RFC 6376 5.6: at the top).
    fn trace(
        &self,
        message: &Message,
        id: QueueId,
        route: &Route,
        signatures: &str,
        body: Vec<u8>,
    ) -> Vec<u8> {
        let now = chrono::Local::now();
        let received = message.received_header(&self.hostname, &id.to_string(), &now.to_rfc2822());
        let note = match route {
            Route::Redirect { rule, .. } => redirect_header(rule, &message.recipients),
            Route::Queue | Route::Quarantine { .. } => String::new(),
        };
        let mut data = body;
        data.reserve_exact(signatures.len() + received.len() + note.len());
        data.splice(
            0..0,
            signatures
                .bytes()
                .chain(received.bytes())
                .chain(note.bytes()),
        );
        data
    }

    /// Step 7. Stores the message durably, in the quarantine or the queue; the reply is
    /// 250 only once it is on disk.
    async fn spool(
        &self,
        message: &Message,
        id: QueueId,
        sender: String,
        route: Route,
        data: Vec<u8>,
    ) -> (Outcome, Option<(StoredMessage, Vec<u8>)>) {
        let recipients = match &route {
            Route::Redirect { to, .. } => vec![to.clone()],
            Route::Queue | Route::Quarantine { .. } => {
                message.recipients.iter().map(|a| a.to_string()).collect()
            }
        };
        let envelope = Envelope {
            id,
            arrived: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_secs() as i64),
            client: message.peer.to_string(),
            helo: message.helo.clone(),
            auth: message.authenticated.clone(),
            sender,
            params: message.params.iter().map(|p| p.to_wire()).collect(),
            smtputf8: message.smtputf8,
            recipients,
        };
        let reply = catalogue::queued(&id.to_string());
        let size = data.len();
        let store_failed = |e| Outcome::Tempfailed {
            why: Tempfail::Store(e),
            reply: catalogue::local_error(),
        };
        match route {
            Route::Quarantine { rule, reason } => {
                match self.spool.quarantine(envelope, data, rule, reason).await {
                    Ok(()) => (Outcome::Quarantined { id, reply }, None),
                    Err(e) => (store_failed(e), None),
                }
            }
            Route::Queue => match self.spool.store_message(envelope, data).await {
                Ok((stored, data)) => (Outcome::Queued { id, size, reply }, Some((stored, data))),
                Err(e) => (store_failed(e), None),
            },
            Route::Redirect { to, .. } => match self.spool.store_message(envelope, data).await {
                Ok((stored, data)) => (
                    Outcome::Redirected {
                        id,
                        to,
                        size,
                        reply,
                    },
                    Some((stored, data)),
                ),
                Err(e) => (store_failed(e), None),
            },
        }
    }

    /// Counts the outcome and writes its decision-log line (a filter's verdict was logged
    /// when it was made, see `screen`).
    fn report(&self, message: &Message, outcome: &Outcome) {
        let peer = message.peer;
        let auth = message.authenticated.as_deref();
        match outcome {
            Outcome::Queued { id, size, .. } => {
                maillog::message_accepted(
                    &id.to_string(),
                    peer,
                    auth,
                    &message.sender,
                    &message.recipients,
                    *size,
                );
                self.metrics.message_accepted();
            }
            Outcome::Redirected { id, to, size, .. } => {
                maillog::message_accepted(
                    &id.to_string(),
                    peer,
                    auth,
                    &message.sender,
                    std::slice::from_ref(to),
                    *size,
                );
                self.metrics.message_accepted();
            }
            Outcome::Quarantined { .. } | Outcome::Discarded { .. } => {
                self.metrics.message_accepted();
            }
            Outcome::Rejected { .. } => self.metrics.message_rejected(Rejection::Filter),
            Outcome::MilterRefused { .. } => self.metrics.message_rejected(Rejection::Milter),
            Outcome::AuthRefused { .. } => self.metrics.message_rejected(Rejection::Authentication),
            Outcome::Tempfailed { why, .. } => match why {
                Tempfail::Memory { wanted } => {
                    maillog::memory_refused(peer, *wanted, self.budget.used());
                    self.metrics.message_rejected(Rejection::Memory);
                }
                // Logged where it failed (`screen`, the panic of a signing task).
                Tempfail::Screening | Tempfail::Signing => {
                    self.metrics.message_rejected(Rejection::StoreFailed)
                }
                Tempfail::Store(e) => {
                    maillog::message_store_failed(peer, &message.sender, e);
                    self.metrics.message_rejected(Rejection::StoreFailed);
                }
            },
        }
    }
}

fn sender_text(sender: &ReversePath) -> String {
    match sender {
        ReversePath::Null => String::new(),
        ReversePath::Mailbox(a) => a.to_string(),
    }
}

/// Runs the screener off the async executor (MIME parsing of a large message is real
/// work); returns its verdict and the body back, or None if screening itself failed
/// (then the message is refused with 451: unscreened mail is never accepted).
async fn screen(
    screener: &Arc<Screener>,
    sender: &str,
    body: Vec<u8>,
) -> Option<(Option<Verdict>, Vec<u8>)> {
    if screener.is_empty() {
        return Some((None, body));
    }
    let screener = Arc::clone(screener);
    let sender = sender.to_string();
    tokio::task::spawn_blocking(move || {
        let verdict = screener.screen(&sender, &body);
        (verdict, body)
    })
    .await
    .map_err(|e| tracing::error!(error = %e, "screener failed; message refused with 451"))
    .ok()
}

/// `X-Postern-Redirected:` naming the rule and the original recipients, folded one
/// address per line (RFC 5322 2.2.3) so no line nears the 998-octet limit; at most 50
/// addresses are listed (the log line has them all).
fn redirect_header<R: Display>(rule: &str, recipients: &[R]) -> String {
    let mut h = format!("X-Postern-Redirected: by filter {rule}; original recipients:");
    for r in recipients.iter().take(50) {
        h.push_str(&format!("\r\n <{r}>"));
    }
    if recipients.len() > 50 {
        h.push_str(&format!("\r\n and {} more", recipients.len() - 50));
    }
    h.push_str("\r\n");
    h
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Filter;
    use crate::queue::{SpoolOptions, quarantine};
    use postern_smtp::address::parse_mailbox;

    const BODY: &[u8] = b"Subject: project x\r\n\r\nhello\r\n";

    struct Fixture {
        _dir: tempfile::TempDir,
        spool: Spool,
        intake: Intake,
        enqueued: delivery::Enqueued,
        metrics: Arc<Metrics>,
        budget: Arc<MemoryBudget>,
    }

    /// An intake with one keyword filter (`project x`) doing `action`, if any.
    fn fixture(action: Option<FilterAction>, memory: u64) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let filters: Vec<Filter> = action
            .into_iter()
            .map(|action| Filter {
                name: "project-x".into(),
                attachments: vec![],
                keywords: vec!["project x".into()],
                senders: vec![],
                action,
            })
            .collect();
        let (handle, enqueued) = delivery::detached();
        let metrics = Arc::new(Metrics::new([]));
        let budget = MemoryBudget::new(memory);
        let intake = Intake::new(
            spool.clone(),
            handle,
            Steps {
                screener: Screener::new(&filters),
                ..Steps::default()
            },
            Arc::clone(&metrics),
            Arc::clone(&budget),
            "relay.test".into(),
        );
        Fixture {
            _dir: dir,
            spool,
            intake,
            enqueued,
            metrics,
            budget,
        }
    }

    fn message() -> Message {
        Message {
            helo: "client.test".into(),
            sender: ReversePath::Mailbox(parse_mailbox("a@b.test").unwrap()),
            params: vec![],
            smtputf8: false,
            recipients: vec![parse_mailbox("x@y.test").unwrap()],
            body: BODY.to_vec(),
            peer: "192.0.2.1:1234".parse().unwrap(),
            esmtp: true,
            tls: None,
            authenticated: None,
        }
    }

    /// Hands the message over the way the session does: with its body reserved.
    async fn accept(f: &Fixture) -> Outcome {
        let mut reservation = f.budget.reservation();
        assert!(reservation.resize(BODY.len() as u64));
        f.intake
            .accept(message(), &mut reservation, &mut Chain::none(), false)
            .await
    }

    fn counted(f: &Fixture, line: &str) -> bool {
        f.metrics.render(0).lines().any(|l| l == line)
    }

    #[tokio::test]
    async fn a_clean_message_is_queued_with_our_received_first() {
        let mut f = fixture(None, 1 << 20);
        let outcome = accept(&f).await;
        let Outcome::Queued { id, size, reply } = outcome else {
            panic!("{outcome:?}");
        };
        assert_eq!(reply.code, 250);
        let stored = f.enqueued.next().expect("handed to delivery");
        assert_eq!(stored.envelope.id, id);
        assert_eq!(stored.envelope.recipients, ["x@y.test"]);
        let body = f.spool.read_body(&stored).unwrap();
        assert_eq!(body.len(), size);
        assert!(body.starts_with(b"Received: from client.test"));
        assert!(body.ends_with(BODY));
        assert!(counted(&f, "postern_messages_accepted_total 1"));
    }

    #[tokio::test]
    async fn no_memory_for_the_copies_is_a_tempfail_counted_as_memory() {
        // Room for the body the session holds, not for the spool record's copy.
        let mut f = fixture(None, BODY.len() as u64);
        let outcome = accept(&f).await;
        let Outcome::Tempfailed {
            why: Tempfail::Memory { wanted },
            reply,
        } = outcome
        else {
            panic!("{outcome:?}");
        };
        assert_eq!((reply.code, wanted), (452, BODY.len() as u64));
        assert!(f.enqueued.next().is_none());
        assert!(counted(
            &f,
            "postern_messages_rejected_total{reason=\"memory\"} 1"
        ));
    }

    #[tokio::test]
    async fn each_filter_action_has_its_outcome() {
        let mut f = fixture(Some(FilterAction::Reject), 1 << 20);
        let outcome = accept(&f).await;
        assert!(matches!(&outcome, Outcome::Rejected { reply, .. } if reply.code == 550));
        assert!(f.enqueued.next().is_none());
        assert!(counted(
            &f,
            "postern_messages_rejected_total{reason=\"filter\"} 1"
        ));

        let mut f = fixture(Some(FilterAction::Discard), 1 << 20);
        let outcome = accept(&f).await;
        assert!(matches!(&outcome, Outcome::Discarded { reply, .. } if reply.code == 250));
        assert!(f.enqueued.next().is_none());
        assert!(counted(&f, "postern_messages_accepted_total 1"));

        let mut f = fixture(Some(FilterAction::Quarantine), 1 << 20);
        let outcome = accept(&f).await;
        let Outcome::Quarantined { id, .. } = outcome else {
            panic!("{outcome:?}");
        };
        assert!(f.enqueued.next().is_none());
        let (q, body) = quarantine::load(f.spool.dir(), id).unwrap();
        assert_eq!(q.rule, "project-x");
        assert!(body.starts_with(b"Received: "));

        let mut f = fixture(Some(FilterAction::Redirect("boss@y.test".into())), 1 << 20);
        let outcome = accept(&f).await;
        assert!(matches!(&outcome, Outcome::Redirected { to, .. } if to == "boss@y.test"));
        let stored = f.enqueued.next().expect("handed to delivery");
        assert_eq!(stored.envelope.recipients, ["boss@y.test"]);
        let body = f.spool.read_body(&stored).unwrap();
        let text = String::from_utf8_lossy(&body);
        assert!(
            text.contains(
                "X-Postern-Redirected: by filter project-x; original recipients:\r\n <x@y.test>\r\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn redirect_header_is_folded_and_capped() {
        let rcpts: Vec<String> = (0..60).map(|i| format!("user{i}@company.test")).collect();
        let h = redirect_header("project-x", &rcpts);
        assert!(h.ends_with("\r\n"));
        assert!(h.split("\r\n").all(|line| line.len() <= 78), "{h}");
        assert!(
            h.contains("\r\n <user49@company.test>\r\n and 10 more\r\n"),
            "{h}"
        );
        assert!(!h.contains("user50@"));
    }
}
