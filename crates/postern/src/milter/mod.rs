//! The milter driver: Postern talking to rspamd, clamav-milter, OpenDKIM and any other
//! Sendmail mail filter (interface: "Milters"; docs/milter.md), over the sans-IO codec
//! `postern_smtp::milter`.
//!
//! One [`Chain`] per SMTP session holds one connection to each configured milter
//! (`[[milter]]`, in file order), taken from its [`Endpoint`]'s pool of connections kept
//! from earlier sessions or opened. A connection is taken lazily, at the first MAIL of the
//! session that the milter's `clients` scope takes in: `clients` depends on AUTH, which
//! comes after the greeting, and a session that never sends MAIL (a probe, a scanner)
//! costs no milter anything. Then the conversation is replayed in order and follows the
//! session from there, as Sendmail and Postfix (src/milter/milter8.c) hold it:
//!
//! | SMTP                      | milter                                               |
//! |---------------------------|------------------------------------------------------|
//! | connect                   | `SMFIC_CONNECT` (macros `j`, `{daemon_name}`, `_`, `{client_addr}`, `{client_port}`, `{client_name}`), at the first MAIL |
//! | EHLO/HELO                 | `SMFIC_HELO` (`{tls_version}`, `{cipher}`), again if it changed |
//! | MAIL                      | `SMFIC_MAIL` (`{mail_addr}`, `{auth_authen}`, `{tls_version}`, `{cipher}`): a refusal is the reply to MAIL |
//! | RCPT (accepted by policy) | `SMFIC_RCPT` (`{rcpt_addr}`): a refusal is the reply to that RCPT |
//! | end of DATA/BDAT          | `SMFIC_DATA`, each header field, `SMFIC_EOH`, the body in 64 KiB chunks, `SMFIC_BODYEOB` (`i`: the queue id) |
//! | RSET, EHLO, STARTTLS, a refused message | `SMFIC_ABORT`, before Postern reads the next command |
//! | end of session            | the connection kept for the next session, which starts with `SMFIC_QUIT_NC` (module `pool`), or `SMFIC_QUIT` |
//!
//! A decision at CONNECT or HELO holds for the session: accept takes the milter out of
//! it, reject and tempfail become the reply to every MAIL (Postfix delays a connect-time
//! milter reject the same way, to a command that can carry it). The macro `i` (queue id)
//! is known only at end of message, so it is sent there only.
//!
//! End of message runs in the intake ([`Chain::end_of_message`], called by
//! `crate::intake` after the screener and before the trace header): milters in order,
//! each sent the message as the previous one left it; its changes (header fields,
//! envelope, body, quarantine) are collected with its decision and applied only if it
//! lets the message go on.
//!
//! Failure (connect timeout, reply timeout, protocol error, closed, not a milter):
//! `on_failure = "tempfail"`: 451 4.7.1 at the stage and at every later one of the
//! session (Postfix's milter8 enters its error state and answers with
//! milter_default_action); `"accept"`: the milter is skipped for the rest of the
//! session. Each failure is one log line. Nothing is lost: a tempfail leaves the message
//! with the client, and nothing is spooled before the milters answered.
//!
//! Trust: a milter is a network peer. The codec bounds packets (128 KiB) and checks each
//! reply against its stage; here, every wait is bounded by a timeout, and what a milter
//! adds at end of message (header fields, replacement body) may not take the message over
//! `max_message_size` and is reserved from the memory budget before it is applied.

mod conn;
mod message;
mod pool;

use std::net::SocketAddr;
use std::sync::Arc;

use postern_smtp::milter::{Action, ClientAddr, Decision, Phase};
use postern_smtp::server::SenderRequest;
use postern_smtp::{Address, Reply, ReversePath, Status, TlsInfo};

use crate::budget::Reservation;
use crate::config::OnFailure;
use crate::maillog;
use crate::metrics::{Metrics, MilterAction};
use conn::Conn;
pub use conn::Failure;
use message::Split;
pub use pool::Endpoint;

/// The milter's own reply, or ours: reject 550 5.7.1, tempfail 451 4.7.1 (Postfix's
/// milter8 defaults, "5.7.1 Command rejected" and "4.7.1 Service unavailable").
fn rejected() -> Reply {
    Reply::new(550, Some(Status(5, 7, 1)), "Command rejected")
}

fn tempfailed() -> Reply {
    Reply::new(
        451,
        Some(Status(4, 7, 1)),
        "Service unavailable - try again later",
    )
}

/// Where one milter stands in this session.
enum State {
    /// Not connected yet.
    Idle,
    Open(Box<Conn>),
    /// Out of this session: it accepted the connection, or failed with
    /// `on_failure = "accept"`.
    Done,
    /// Failed with `on_failure = "tempfail"`: every later stage gets 451 4.7.1.
    Failed,
    /// Refused the connection (at CONNECT or HELO): every MAIL gets this.
    Refused(Reply),
}

struct Link {
    ep: Arc<Endpoint>,
    state: State,
}

/// What the SMTP session tells the milters about itself.
#[derive(Clone, Debug)]
pub struct Client {
    pub peer: SocketAddr,
    /// Our host name (macro `j`).
    pub hostname: String,
    pub tls: Option<TlsInfo>,
}

/// What end of message made of the message (see [`Chain::end_of_message`]).
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Go on (to the trace header and the spool); `quarantine`: a milter asked to hold
    /// it (its name, its reason).
    Go {
        quarantine: Option<(String, String)>,
    },
    /// Refused by this milter with this reply (4xx or 5xx).
    Refused { milter: String, reply: Reply },
    /// Dropped by this milter (250 to the client).
    Discarded { milter: String },
    /// The memory budget cannot hold a milter's changes (452 4.3.1), `wanted` bytes.
    Memory { wanted: u64 },
}

/// The envelope a milter may change at end of message.
pub struct Envelope<'a> {
    pub sender: &'a mut ReversePath,
    pub params: &'a mut Vec<postern_smtp::command::Param>,
    pub recipients: &'a mut Vec<Address>,
}

/// The milters of one SMTP session (module documentation).
pub struct Chain {
    links: Vec<Link>,
    client: Client,
    metrics: Arc<Metrics>,
    max_message_size: u64,
    /// A milter discarded the message at MAIL or RCPT: its name.
    discard: Option<String>,
}

impl Chain {
    /// The milters `endpoints` for the session of `client`; nothing is opened yet.
    pub fn new(
        endpoints: &[Arc<Endpoint>],
        client: Client,
        metrics: Arc<Metrics>,
        max_message_size: u64,
    ) -> Chain {
        Chain {
            links: endpoints
                .iter()
                .map(|ep| Link {
                    ep: Arc::clone(ep),
                    state: State::Idle,
                })
                .collect(),
            client,
            metrics,
            max_message_size,
            discard: None,
        }
    }

    /// No milters (a session of a server without `[[milter]]`, tests).
    pub fn none() -> Chain {
        Chain::new(
            &[],
            Client {
                peer: SocketAddr::from(([0, 0, 0, 0], 0)),
                hostname: String::new(),
                tls: None,
            },
            Arc::new(Metrics::new([])),
            0,
        )
    }

    pub fn is_empty(&self) -> bool {
        self.links.is_empty()
    }

    /// TLS came up (STARTTLS): the next HELO carries its macros.
    pub fn tls_established(&mut self, tls: TlsInfo) {
        self.client.tls = Some(tls);
    }

    fn tls_macros(&self) -> Vec<(&'static str, String)> {
        match &self.client.tls {
            Some(t) => vec![
                ("{tls_version}", t.version.clone()),
                ("{cipher}", t.cipher.clone()),
            ],
            None => Vec::new(),
        }
    }

    /// MAIL, valid for the SMTP core: asks each milter in scope (`relayed`: the client
    /// is trusted or authenticated), opening the connections not open yet. `Err`: the
    /// reply to MAIL.
    pub async fn mail(&mut self, req: &SenderRequest, relayed: bool) -> Result<(), Reply> {
        self.reset().await;
        self.discard = None;
        let sender = match &req.sender {
            ReversePath::Null => String::new(),
            ReversePath::Mailbox(a) => a.to_string(),
        };
        let params: Vec<String> = req.params.iter().map(|p| p.to_wire()).collect();
        let args: Vec<&str> = params.iter().map(String::as_str).collect();
        let mut macros = vec![("{mail_addr}", sender.clone())];
        if let Some(user) = &req.authenticated {
            macros.push(("{auth_authen}", user.clone()));
        }
        macros.extend(self.tls_macros());
        for i in 0..self.links.len() {
            if !self.links[i].ep.config.clients.applies(relayed) {
                continue;
            }
            match &self.links[i].state {
                State::Done => continue,
                State::Failed => return Err(tempfailed()),
                State::Refused(r) => return Err(r.clone()),
                State::Idle | State::Open(_) => {}
            }
            // A connection from the pool that the milter closed while it was idle shows
            // at its first awaited answer: it is replaced by a new one, once.
            let mut pooled = true;
            loop {
                if matches!(self.links[i].state, State::Idle) && !self.open(i, pooled).await? {
                    pooled = false;
                    continue;
                }
                if !self.helo(i, &req.helo).await? {
                    pooled = false;
                    continue;
                }
                if !matches!(self.links[i].state, State::Open(_)) {
                    // It accepted the connection, or failed with on_failure = "accept".
                    break;
                }
                let list: Vec<(&str, &str)> =
                    macros.iter().map(|(k, v)| (*k, v.as_str())).collect();
                let result = self.ask(i, |c| c.mail(&list, &sender, &args)).await;
                if self.stale(i, &result) {
                    pooled = false;
                    continue;
                }
                self.decided(i, "mail", result)?;
                break;
            }
        }
        Ok(())
    }

    /// `result` is the first answer awaited on a connection taken from the pool, and
    /// the connection turned out closed: the milter closed it while it was idle (or
    /// restarted). It is dropped (link `i` is idle again), with no failure: `true`.
    /// A kept connection that got no answer at all in time is dropped the same way,
    /// and this milter's connections are no longer kept: a milter that takes
    /// `SMFIC_QUIT_NC` but then ignores the next CONNECT would otherwise cost every
    /// other session a reply timeout.
    fn stale(&mut self, i: usize, result: &Result<Decision, Failure>) -> bool {
        let State::Open(conn) = &self.links[i].state else {
            return false;
        };
        if !conn.unproven {
            return false;
        }
        let ep = &self.links[i].ep;
        match result {
            Err(Failure::Io(_) | Failure::Protocol(postern_smtp::milter::Error::Closed(_))) => {
                tracing::debug!(milter = %ep.config.name,
                    "a kept milter connection was closed by the milter; opening a new one");
            }
            Err(Failure::Timeout(_)) => ep.stop_reuse(),
            _ => return false,
        }
        self.links[i].state = State::Idle;
        true
    }

    /// Opens link `i` (a connection from the pool if `pooled` and there is one) and
    /// sends CONNECT; a decision there holds for the session. `Ok(false)`: the pooled
    /// connection was closed, try again without the pool.
    async fn open(&mut self, i: usize, pooled: bool) -> Result<bool, Reply> {
        let kept = if pooled {
            self.links[i].ep.take()
        } else {
            None
        };
        let conn = match kept {
            Some(c) => c,
            None => {
                let started = tokio::time::Instant::now();
                let opened = Conn::open(&self.links[i].ep.config).await;
                self.metrics
                    .milter_latency(&self.links[i].ep.config.name, started.elapsed());
                match opened {
                    Ok(c) => Box::new(c),
                    Err(e) => return self.failed::<()>(i, "connect", e).map(|()| true),
                }
            }
        };
        self.links[i].state = State::Open(conn);
        let peer = self.client.peer;
        let ip = match peer.ip() {
            std::net::IpAddr::V6(a) => a
                .to_ipv4_mapped()
                .map_or(std::net::IpAddr::V6(a), std::net::IpAddr::V4),
            v4 => v4,
        };
        let addr = ClientAddr::Inet(SocketAddr::new(ip, peer.port()));
        // No reverse lookup is made: the name is the address literal, as Sendmail sends
        // it for an unnamed client; {client_name} is "unknown", as Postfix sets it.
        let literal = format!("[{ip}]");
        let macros = [
            ("j", self.client.hostname.clone()),
            ("{daemon_name}", "postern".to_string()),
            ("_", format!("unknown {literal}")),
            ("{client_addr}", ip.to_string()),
            ("{client_port}", peer.port().to_string()),
            ("{client_name}", "unknown".to_string()),
        ];
        let list: Vec<(&str, &str)> = macros.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let result = self.ask(i, |c| c.connect(&list, &literal, &addr)).await;
        if self.stale(i, &result) {
            return Ok(false);
        }
        self.connection_decided(i, "connect", result).map(|()| true)
    }

    /// HELO to link `i` if it has not seen this one yet. `Ok(false)`: the connection
    /// came from the pool and was closed (see [`Chain::stale`]).
    async fn helo(&mut self, i: usize, name: &str) -> Result<bool, Reply> {
        let tls = self.client.tls.is_some();
        let State::Open(conn) = &self.links[i].state else {
            return Ok(true);
        };
        if conn
            .helo
            .as_ref()
            .is_some_and(|(n, t)| n == name && *t == tls)
        {
            return Ok(true);
        }
        let macros = self.tls_macros();
        let list: Vec<(&str, &str)> = macros.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let result = self.ask(i, |c| c.helo(&list, name)).await;
        if self.stale(i, &result) {
            return Ok(false);
        }
        if let State::Open(conn) = &mut self.links[i].state {
            conn.helo = Some((name.to_string(), tls));
        }
        self.connection_decided(i, "helo", result).map(|()| true)
    }

    /// A decision at CONNECT or HELO.
    fn connection_decided(
        &mut self,
        i: usize,
        stage: &'static str,
        result: Result<Decision, Failure>,
    ) -> Result<(), Reply> {
        let d = match result {
            Ok(d) => d,
            Err(e) => return self.failed(i, stage, e),
        };
        self.log_decision(i, stage, &d, "");
        match d {
            Decision::Continue | Decision::Skip => Ok(()),
            Decision::Accept => {
                self.close(i);
                Ok(())
            }
            other => {
                let reply = refusal(&other);
                self.close(i);
                self.links[i].state = State::Refused(reply.clone());
                Err(reply)
            }
        }
    }

    /// A decision at MAIL or RCPT.
    fn decided(
        &mut self,
        i: usize,
        stage: &'static str,
        result: Result<Decision, Failure>,
    ) -> Result<(), Reply> {
        let d = match result {
            Ok(d) => d,
            Err(e) => return self.failed(i, stage, e),
        };
        self.log_decision(i, stage, &d, "");
        match d {
            // Accept: this milter sees no more of the message (the codec skips it).
            Decision::Continue | Decision::Skip | Decision::Accept => Ok(()),
            Decision::Discard => {
                self.discard
                    .get_or_insert_with(|| self.links[i].ep.config.name.clone());
                Ok(())
            }
            Decision::ConnFail | Decision::Shutdown => {
                self.close(i);
                self.links[i].state = State::Failed;
                Err(tempfailed())
            }
            other => Err(refusal(&other)),
        }
    }

    /// A milter failed at `stage`: `on_failure` decides (module documentation).
    fn failed<T: Default>(
        &mut self,
        i: usize,
        stage: &'static str,
        e: Failure,
    ) -> Result<T, Reply> {
        let link = &mut self.links[i];
        let on_failure = link.ep.config.on_failure;
        maillog::milter_failed(
            &link.ep.config.name,
            stage,
            self.client.peer,
            &e,
            match on_failure {
                OnFailure::Tempfail => "tempfail",
                OnFailure::Accept => "accept",
            },
        );
        self.metrics
            .milter_action(&link.ep.config.name, MilterAction::Failed);
        // The connection is dropped without QUIT: it is broken or not a milter.
        match on_failure {
            OnFailure::Tempfail => {
                link.state = State::Failed;
                Err(tempfailed())
            }
            OnFailure::Accept => {
                link.state = State::Done;
                Ok(T::default())
            }
        }
    }

    fn close(&mut self, i: usize) {
        if let State::Open(conn) = std::mem::replace(&mut self.links[i].state, State::Done) {
            tokio::spawn(conn.quit());
        }
    }

    fn log_decision(&self, i: usize, stage: &str, d: &Decision, detail: &str) {
        let name = &self.links[i].ep.config.name;
        let action = MilterAction::of(d);
        self.metrics.milter_action(name, action);
        let reply = match d {
            Decision::Reply(r) => r.to_string(),
            _ => String::new(),
        };
        maillog::milter_decision(
            name,
            stage,
            action.as_str(),
            self.client.peer,
            detail,
            reply.trim_end(),
        );
    }

    /// Runs one stage on link `i`, if it is open: `f` calls the codec's stage method.
    async fn ask(
        &mut self,
        i: usize,
        f: impl FnOnce(
            &mut postern_smtp::milter::Session,
        ) -> Result<postern_smtp::milter::Sent, postern_smtp::milter::Error>,
    ) -> Result<Decision, Failure> {
        let ep = Arc::clone(&self.links[i].ep);
        let metrics = &self.metrics;
        let State::Open(conn) = &mut self.links[i].state else {
            return Ok(Decision::Continue);
        };
        let sent = f(&mut conn.codec);
        conn.step(sent, ep.config.timeout, 0, &mut Vec::new(), &mut |d| {
            metrics.milter_latency(&ep.config.name, d)
        })
        .await
    }

    /// An accepted RCPT (the relay policy said yes): asks each milter in the
    /// transaction. `Err`: the reply to this RCPT.
    pub async fn rcpt(&mut self, rcpt: &Address) -> Result<(), Reply> {
        let addr = rcpt.to_string();
        let macros = [("{rcpt_addr}", addr.as_str())];
        for i in 0..self.links.len() {
            match &self.links[i].state {
                State::Failed => return Err(tempfailed()),
                State::Open(c) if c.codec.phase() == Phase::Transaction => {}
                _ => continue,
            }
            let result = self.ask(i, |c| c.rcpt(&macros, &addr, &[])).await;
            self.decided(i, "rcpt", result)?;
        }
        Ok(())
    }

    /// The SMTP transaction is over without end of message (RSET, EHLO, STARTTLS, a
    /// refused DATA or message): `SMFIC_ABORT` to each milter still in it. The session
    /// calls this before reading more, whenever the SMTP core has no transaction.
    pub async fn reset(&mut self) {
        self.discard = None;
        for i in 0..self.links.len() {
            let timeout = self.links[i].ep.config.timeout;
            let State::Open(conn) = &mut self.links[i].state else {
                continue;
            };
            if !matches!(
                conn.codec.phase(),
                Phase::Transaction | Phase::MessageDecided
            ) {
                continue;
            }
            let sent = conn.codec.abort();
            if let Err(e) = conn
                .step(sent, timeout, 0, &mut Vec::new(), &mut |_| {})
                .await
            {
                let _ = self.failed::<()>(i, "abort", e);
            }
        }
    }

    /// The session is over: every open milter connection is kept for the next session
    /// (which sends `SMFIC_QUIT_NC` first) if it can be, else closed with QUIT (module
    /// `pool`). A
    /// transaction still open is aborted first (SMFIC_ABORT: the milter's abort
    /// callback runs), as Postfix's smtpd resets its milters before it disconnects them.
    pub async fn quit(&mut self) {
        for link in &mut self.links {
            if let State::Open(mut conn) = std::mem::replace(&mut link.state, State::Done) {
                if matches!(
                    conn.codec.phase(),
                    Phase::Transaction | Phase::MessageDecided
                ) {
                    let _ = conn.codec.abort();
                }
                link.ep.release(conn).await;
            }
        }
    }

    /// End of message, in the intake: each milter in the transaction, in order, sees the
    /// message as the previous one left it (`data`: the whole message, replaced when
    /// some milter changed it; `envelope`: changed in place). `id`: the queue id
    /// (macro `i`).
    pub async fn end_of_message(
        &mut self,
        id: &str,
        envelope: Envelope<'_>,
        data: &mut Vec<u8>,
        reservation: &mut Reservation,
    ) -> Verdict {
        if let Some(milter) = self.discard.take() {
            return Verdict::Discarded { milter };
        }
        let in_transaction = |s: &State| match s {
            State::Open(c) => c.codec.phase() == Phase::Transaction,
            State::Failed => true,
            _ => false,
        };
        if !self.links.iter().any(|l| in_transaction(&l.state)) {
            return Verdict::Go { quarantine: None };
        }
        let mut split = Split::parse(data);
        let mut quarantine = None;
        let mut env = envelope;
        for i in 0..self.links.len() {
            match &self.links[i].state {
                State::Failed => {
                    return Verdict::Refused {
                        milter: self.links[i].ep.config.name.clone(),
                        reply: tempfailed(),
                    };
                }
                State::Open(c) if c.codec.phase() == Phase::Transaction => {}
                _ => continue,
            }
            let limit = self.max_message_size;
            let mut actions = Vec::new();
            // The whole end of message (every header and body chunk, each reply within
            // `timeout`) within MAX_PROGRESS x `timeout`: a milter answering each 64 KiB
            // chunk just in time would otherwise hold a 25 MB message for hours.
            let whole = self.links[i]
                .ep
                .config
                .timeout
                .saturating_mul(conn::MAX_PROGRESS);
            let result = match tokio::time::timeout(
                whole,
                self.message(i, id, &split, data, limit, &mut actions),
            )
            .await
            {
                Ok(r) => r,
                Err(_) => Err(Failure::Timeout(postern_smtp::milter::Command::Eom)),
            };
            let (stage, d) = match result {
                Ok(x) => x,
                Err(e) => match self.failed::<()>(i, "eom", e) {
                    Ok(()) => continue,
                    Err(reply) => {
                        return Verdict::Refused {
                            milter: self.links[i].ep.config.name.clone(),
                            reply,
                        };
                    }
                },
            };
            let name = self.links[i].ep.config.name.clone();
            match &d {
                Decision::Continue | Decision::Accept | Decision::Skip => {}
                Decision::Discard => {
                    self.log_decision(i, stage, &d, "");
                    return Verdict::Discarded { milter: name };
                }
                Decision::ConnFail | Decision::Shutdown => {
                    self.log_decision(i, stage, &d, "");
                    self.close(i);
                    self.links[i].state = State::Failed;
                    return Verdict::Refused {
                        milter: name,
                        reply: tempfailed(),
                    };
                }
                other => {
                    self.log_decision(i, stage, &d, "");
                    return Verdict::Refused {
                        milter: name,
                        reply: refusal(other),
                    };
                }
            }
            // Its changes: reserved from the memory budget, tried, then taken.
            let wanted: u64 = actions.iter().map(conn::action_size).sum();
            if wanted > 0 && !reservation.resize(reservation.held() + 2 * wanted) {
                return Verdict::Memory { wanted };
            }
            let mut trial = split.trial();
            let mut asked = None;
            let summary = apply(&mut trial, &actions, &mut asked);
            let body = match &trial.new_body {
                Some(b) => b.len(),
                None => split.body(data).len(),
            };
            let size = trial.size_with(body);
            if size > self.max_message_size && size > split.size(data) {
                let e = Failure::TooBig(self.max_message_size);
                match self.failed::<()>(i, "eom", e) {
                    Ok(()) => continue,
                    Err(reply) => {
                        return Verdict::Refused {
                            milter: name,
                            reply,
                        };
                    }
                }
            }
            let envelope = apply_envelope(&mut env, &actions, &name, self.client.peer);
            let summary = [summary, envelope]
                .into_iter()
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join(", ");
            let summary = match &asked {
                // The milter's text, escaped: it goes into one log line.
                Some(reason) => format!("{summary}; quarantine: {}", reason.escape_debug()),
                None => summary,
            };
            self.log_decision(i, stage, &d, summary.trim_start_matches("; "));
            if env.recipients.is_empty() {
                // Every recipient was removed (SMFIR_DELRCPT): nobody to deliver to.
                return Verdict::Discarded { milter: name };
            }
            if let Some(reason) = asked {
                self.metrics.milter_action(&name, MilterAction::Quarantine);
                quarantine = Some((name.clone(), reason));
            }
            split.adopt(trial);
        }
        if split.changed {
            let rebuilt = split.rebuild(data);
            let grow = rebuilt.len() as u64;
            if !reservation.resize(reservation.held() + grow) {
                return Verdict::Memory { wanted: grow };
            }
            *data = rebuilt;
        }
        Verdict::Go { quarantine }
    }

    /// Sends the message to link `i`: DATA, the header fields, EOH, the body, EOM.
    /// Returns the stage that decided and the decision; the actions (at EOM) go to
    /// `actions`.
    async fn message(
        &mut self,
        i: usize,
        id: &str,
        split: &Split,
        data: &[u8],
        limit: u64,
        actions: &mut Vec<Action>,
    ) -> Result<(&'static str, Decision), Failure> {
        let ep = Arc::clone(&self.links[i].ep);
        let timeout = ep.config.timeout;
        let metrics = &self.metrics;
        let State::Open(conn) = &mut self.links[i].state else {
            return Ok(("eom", Decision::Continue));
        };
        let mut latency = |d| metrics.milter_latency(&ep.config.name, d);
        // Commands the milter does not answer wait in the buffer for the next one it
        // does (end of message at the latest): one write for all of them.
        let sent = conn.codec.data(&[]);
        let d = conn.step_batched(sent, timeout, &mut latency).await?;
        if d != Decision::Continue {
            return Ok(("data", d));
        }
        for f in &split.fields {
            let sent = conn.codec.header(&f.name, &f.value);
            let d = conn.step_batched(sent, timeout, &mut latency).await?;
            if d != Decision::Continue {
                return Ok(("header", d));
            }
        }
        let sent = conn.codec.eoh(&[]);
        let d = conn.step_batched(sent, timeout, &mut latency).await?;
        if d != Decision::Continue {
            return Ok(("eoh", d));
        }
        let mut body = split.body(data);
        while !body.is_empty() {
            let sent = conn.codec.body(body);
            let taken = sent.as_ref().map_or(body.len(), |(n, _)| *n);
            body = &body[taken.min(body.len())..];
            let d = conn
                .step_batched(sent.map(|(_, s)| s), timeout, &mut latency)
                .await?;
            match d {
                Decision::Continue => {}
                // SMFIR_SKIP: no more body; on to end of message.
                Decision::Skip => break,
                other => return Ok(("body", other)),
            }
        }
        let macros = [("i", id)];
        let sent = conn.codec.eom(&macros);
        let d = conn
            .step(sent, timeout, limit, actions, &mut latency)
            .await?;
        Ok(("eom", d))
    }
}

/// The client's reply for a refusing decision.
fn refusal(d: &Decision) -> Reply {
    match d {
        Decision::Reply(r) => r.clone(),
        Decision::Reject => rejected(),
        _ => tempfailed(),
    }
}

/// Applies a milter's header and body changes to `trial`; a quarantine it asked for
/// goes to `quarantine`. Returns a summary for the log line.
fn apply(trial: &mut Split, actions: &[Action], quarantine: &mut Option<String>) -> String {
    let mut headers = 0;
    let mut body = false;
    for a in actions {
        match a {
            Action::AddHeader { name, value } => {
                trial.add(name.clone(), value.clone());
                headers += 1;
            }
            Action::InsHeader { index, name, value } => {
                trial.insert(*index, name.clone(), value.clone());
                headers += 1;
            }
            Action::ChgHeader { index, name, value } => {
                trial.change(*index, name.clone(), value.clone());
                headers += 1;
            }
            Action::ReplBody(piece) => {
                trial.replace_body(piece, !body);
                body = true;
            }
            Action::Quarantine { reason } => *quarantine = Some(reason.clone()),
            Action::ChgFrom { .. }
            | Action::AddRcpt { .. }
            | Action::AddRcptPar { .. }
            | Action::DelRcpt { .. } => {}
        }
    }
    let mut parts = Vec::new();
    if headers > 0 {
        parts.push(format!("header changes={headers}"));
    }
    if body {
        parts.push("body replaced".to_string());
    }
    parts.join(", ")
}

/// Applies a milter's envelope changes; returns a summary for the log line. Postfix's
/// cleanup_milter takes an address a milter gives as it is; Postern's spool holds
/// checked mailboxes, so an address that does not parse is left out, with a log line.
/// Of the ESMTP arguments of a new sender, those Postern carries (BODY, SMTPUTF8) are
/// kept; others are dropped (logged).
fn apply_envelope(
    env: &mut Envelope<'_>,
    actions: &[Action],
    milter: &str,
    client: SocketAddr,
) -> String {
    let mut parts = Vec::new();
    let parse = |addr: &str| {
        let r = postern_smtp::address::parse_mailbox(addr);
        if r.is_err() {
            maillog::milter_bad_address(milter, client, addr);
        }
        r.ok()
    };
    for a in actions {
        match a {
            Action::ChgFrom { addr, args } => {
                let sender = if addr.is_empty() {
                    Some(ReversePath::Null)
                } else {
                    parse(addr).map(ReversePath::Mailbox)
                };
                if let Some(sender) = sender {
                    *env.sender = sender;
                    let mut params = Vec::new();
                    for arg in args {
                        let (k, v) = match arg.split_once('=') {
                            Some((k, v)) => (k.to_ascii_uppercase(), Some(v.to_string())),
                            None => (arg.to_ascii_uppercase(), None),
                        };
                        if k == "BODY" || k == "SMTPUTF8" {
                            params.push(postern_smtp::command::Param {
                                keyword: k,
                                value: v,
                            });
                        } else {
                            maillog::milter_bad_address(milter, client, arg);
                        }
                    }
                    *env.params = params;
                    parts.push(format!("sender={}", env.sender));
                }
            }
            Action::AddRcpt { addr } | Action::AddRcptPar { addr, .. } => {
                if let Some(a) = parse(addr)
                    && !env.recipients.iter().any(|r| r.same_mailbox(&a))
                {
                    parts.push(format!("added=<{a}>"));
                    env.recipients.push(a);
                }
            }
            Action::DelRcpt { addr } => {
                let before = env.recipients.len();
                match postern_smtp::address::parse_mailbox(addr) {
                    Ok(a) => env.recipients.retain(|r| !r.same_mailbox(&a)),
                    Err(_) => env
                        .recipients
                        .retain(|r| !r.to_string().eq_ignore_ascii_case(addr)),
                }
                if env.recipients.len() < before {
                    parts.push(format!("removed=<{}>", addr.escape_debug()));
                }
            }
            _ => {}
        }
    }
    parts.join(", ")
}

#[cfg(test)]
mod tests;
