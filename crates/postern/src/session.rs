//! Drives one SMTP session: moves bytes between the socket and the sans-IO
//! `postern_smtp::Session`, performs the TLS handshakes it asks for (STARTTLS, RFC 3207;
//! implicit TLS, RFC 8314), and answers its questions: credentials for AUTH, the relay
//! policy for each recipient, the intake (`crate::intake`) for each message.
//!
//! Trust: the socket is the network. The protocol core bounds what it buffers; this
//! driver bounds time: every read and every write waits at most `command_timeout`
//! (a client that stops reading our replies cannot hold a task forever).

use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_smtp::server::{Peer, SessionConfig};
use postern_smtp::{Domain, Event, ReversePath, Session, catalogue};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio_rustls::server::TlsStream;

use crate::auth::Authenticator;
use crate::budget::{MemoryBudget, Reservation};
use crate::config::{AuthMode, Config, Listener, TlsMode};
use crate::intake::Intake;
use crate::maillog;
use crate::metrics::{Metrics, Rejection};
use crate::milter::{self, Chain};
use crate::policy::dnsbl::Dnsbl;
use crate::policy::rate::{Counted, Exceeded, Hold, RateLimits, RecipientHolds, Who};
use crate::policy::{Client, Decision, Facts, RelayPolicy, Rule};
use crate::tls::ServerTls;
use std::sync::Arc;

/// What every session shares: read-only configuration and policy, the intake (screener,
/// spool, delivery), the metrics, and (when some listener uses them) TLS and the
/// authenticator.
pub struct Shared {
    pub policy: RelayPolicy,
    /// Where a message goes at the end of its transfer.
    pub intake: Intake,
    pub tls: Option<ServerTls>,
    pub auth: Option<Arc<Authenticator>>,
    pub dnsbl: Option<Dnsbl>,
    pub metrics: Arc<Metrics>,
    /// Message bodies held in memory by all sessions (`max_message_memory`).
    pub budget: Arc<MemoryBudget>,
    /// Our own addresses, to refuse address literals that are us.
    pub ourselves: crate::ourselves::Ourselves,
    /// The `[[milter]]`s, in order, with their pools of kept connections: each
    /// session talks to them (`crate::milter`).
    pub milters: Vec<Arc<milter::Endpoint>>,
    /// The `[[rate_limit]]`s (`policy::rate`).
    pub rate_limits: Arc<RateLimits>,
    /// `[cluster]`: counters shared with the other nodes through Redis (AUTH lockouts,
    /// rate limits); `None`: this node counts alone.
    pub cluster: Option<Arc<crate::cluster::Cluster>>,
}

/// First read buffer: small, so that 10,000 idle sessions stay cheap. A read that
/// fills it (a message body streaming in) grows it, up to `MAX_READ_BUFFER`.
const READ_BUFFER: usize = 1024;
const MAX_READ_BUFFER: usize = 64 * 1024;
/// A TLS handshake must complete within this (or the command timeout, if shorter).
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(60);

/// The connection, before or after TLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
}

/// What a session on one listener needs, derived once at start from the configuration
/// (as ripgrep derives its high-level arguments): sessions never reach the whole `Config`.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The protocol core's settings (name, limits, STARTTLS, AUTH, postmaster).
    pub protocol: SessionConfig,
    /// Implicit TLS (RFC 8314): the handshake comes before the greeting.
    pub implicit_tls: bool,
    /// Every read and write waits at most this.
    pub command_timeout: Duration,
    /// A TLS handshake must complete within this.
    pub handshake_timeout: Duration,
    /// A whole DATA or BDAT message must arrive within this.
    pub data_timeout: Duration,
    /// The port a delivery to an address literal uses (to recognise ourselves).
    pub mx_port: u16,
}

impl Settings {
    /// The settings of `listener`; `tls` and `auth`: the server has a certificate and an
    /// authenticator (without them STARTTLS and AUTH are not offered).
    pub fn new(config: &Config, listener: &Listener, tls: bool, auth: bool) -> Settings {
        let auth_mechanisms = if listener.auth == AuthMode::None || !auth {
            Vec::new()
        } else {
            config
                .auth
                .mechanisms
                .iter()
                .map(|m| m.name().to_string())
                .collect()
        };
        let protocol = SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: config.max_message_size,
            max_recipients: config.max_recipients,
            max_errors: config.max_errors,
            starttls: listener.tls == TlsMode::StartTls && tls,
            require_tls: listener.require_tls,
            auth_mechanisms,
            auth_required: listener.auth == AuthMode::Required,
            allow_plaintext_auth: listener.allow_plaintext_auth,
            max_junk_commands: config.max_junk_commands,
            max_hops: config.max_hops,
            // Validated at load.
            postmaster: config
                .postmaster
                .as_deref()
                .and_then(|p| postern_smtp::address::parse_mailbox(p).ok()),
        };
        Settings {
            protocol,
            implicit_tls: listener.tls == TlsMode::Implicit,
            command_timeout: config.command_timeout,
            handshake_timeout: HANDSHAKE_TIMEOUT.min(config.command_timeout),
            data_timeout: config.data_timeout,
            mx_port: config.delivery.mx_port,
        }
    }
}

/// Runs a session on an accepted TCP connection until it ends.
pub async fn run(
    tcp: TcpStream,
    peer: SocketAddr,
    settings: &Settings,
    shared: &Shared,
    shutdown: watch::Receiver<bool>,
) {
    // Replies are written once per batch of pipelined commands, so Nagle would only
    // add delayed-ACK stalls (~40 ms per message).
    let _ = tcp.set_nodelay(true);
    let handshake_timeout = settings.handshake_timeout;
    // Implicit TLS (RFC 8314): the handshake comes before the greeting.
    let (mut stream, tls) = if settings.implicit_tls {
        let Some(server_tls) = &shared.tls else {
            maillog::disconnected(peer, "no TLS configured");
            return;
        };
        match handshake(server_tls, tcp, handshake_timeout).await {
            Ok((s, info)) => (Stream::Tls(Box::new(s)), Some(info)),
            Err(why) => {
                maillog::tls_failed(peer, &why);
                maillog::disconnected(peer, "TLS handshake failed");
                return;
            }
        }
    } else {
        (Stream::Plain(tcp), None)
    };
    let mut milters = Chain::new(
        &shared.milters,
        milter::Client {
            peer,
            hostname: settings.protocol.hostname.clone(),
            tls: tls.clone(),
        },
        Arc::clone(&shared.metrics),
        settings.protocol.max_message_size,
    );
    let mut session = Session::new(settings.protocol.clone(), Peer { addr: peer, tls });
    if !milters.is_empty() || !shared.rate_limits.is_empty() {
        session.ask_sender();
    }
    // The DNSBL answer for this client, looked up at most once per connection.
    let mut dnsbl: Option<Option<String>> = None;
    let reason = loop {
        match drive(
            &mut stream,
            &mut session,
            settings,
            shared,
            &mut dnsbl,
            &mut milters,
            shutdown.clone(),
        )
        .await
        {
            Ended::Done(reason) => break reason,
            Ended::StartTls => {
                let (Stream::Plain(tcp), Some(server_tls)) = (stream, &shared.tls) else {
                    break "STARTTLS without TLS";
                };
                match handshake(server_tls, tcp, handshake_timeout).await {
                    Ok((s, info)) => {
                        milters.tls_established(info.clone());
                        session.tls_established(info);
                        stream = Stream::Tls(Box::new(s));
                    }
                    Err(why) => {
                        maillog::tls_failed(peer, &why);
                        break "TLS handshake failed";
                    }
                }
            }
        }
    };
    milters.quit().await;
    maillog::disconnected(peer, reason);
}

async fn handshake(
    tls: &ServerTls,
    tcp: TcpStream,
    timeout: Duration,
) -> Result<(TlsStream<TcpStream>, postern_smtp::TlsInfo), String> {
    match tokio::time::timeout(timeout, tls.acceptor().accept(tcp)).await {
        Ok(Ok(s)) => {
            let info = crate::tls::tls_info(s.get_ref().1);
            Ok((s, info))
        }
        Ok(Err(e)) => Err(e.to_string()),
        Err(_) => Err("handshake timed out".to_string()),
    }
}

/// Why `drive` returned.
enum Ended {
    Done(&'static str),
    /// The client asked for STARTTLS and our 220 has been sent.
    StartTls,
}

/// The event loop; returns when the session ends or TLS must start.
async fn drive<S: AsyncRead + AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    settings: &Settings,
    shared: &Shared,
    dnsbl: &mut Option<Option<String>>,
    milters: &mut Chain,
    mut shutdown: watch::Receiver<bool>,
) -> Ended {
    let timeout = settings.command_timeout;
    // Read into the vector's spare capacity (`read_buf`): no zeroing of a buffer that
    // the next read overwrites anyway; its capacity is how much one read may bring.
    let mut buf: Vec<u8> = Vec::with_capacity(READ_BUFFER);
    // This session's share of the memory budget for message bodies.
    let mut reservation = shared.budget.reservation();
    // When the transfer in progress (DATA or BDAT) must be over (tokio's clock, so that
    // tests can run it paused).
    let mut transfer_deadline: Option<tokio::time::Instant> = None;
    // The message the transaction in progress took from the rate limits at MAIL: kept
    // at its 250, given back (dropped) otherwise.
    let mut message_hold: Option<Hold> = None;
    // The recipients it took at their RCPT 250.
    let mut recipient_holds = RecipientHolds::default();
    loop {
        let event = session.poll();
        shared.metrics.core_refusals(session.take_refusals());
        match event {
            Event::Flush => {
                if flush(stream, session, timeout).await.is_err() {
                    return Ended::Done("write failed");
                }
            }
            Event::NeedInput => {
                if flush(stream, session, timeout).await.is_err() {
                    return Ended::Done("write failed");
                }
                if *shutdown.borrow() {
                    session.shutdown();
                    continue;
                }
                // RSET, EHLO, STARTTLS or a refused message ended the transaction: the
                // milters still in it are told (SMFIC_ABORT) before the next command.
                if !session.in_transaction() {
                    milters.reset().await;
                    message_hold = None;
                    recipient_holds.settle();
                }
                let mut wait = timeout;
                if session.in_message() {
                    let deadline = *transfer_deadline
                        .get_or_insert_with(|| tokio::time::Instant::now() + settings.data_timeout);
                    let left = deadline.saturating_duration_since(tokio::time::Instant::now());
                    if left.is_zero() {
                        maillog::transfer_timeout(session.peer(), settings.data_timeout);
                        session.timeout();
                        continue;
                    }
                    wait = wait.min(left);
                    if reserve_for_read(session, &mut reservation, buf.capacity(), shared) {
                        // Its 452 is a 4xx at the end: the client sends it again, with
                        // the same recipients (`RecipientHolds`).
                        recipient_holds.give_back();
                    }
                } else {
                    transfer_deadline = None;
                    reservation.resize(0);
                }
                buf.clear();
                tokio::select! {
                    read = tokio::time::timeout(wait, stream.read_buf(&mut buf)) => match read {
                        Ok(Ok(0)) => return Ended::Done("client closed"),
                        Ok(Ok(n)) => {
                            session.receive(&buf[..n]);
                            let size = buf.capacity();
                            if n == size && size < MAX_READ_BUFFER {
                                buf.clear();
                                buf.reserve_exact(size * 4);
                            } else if size > READ_BUFFER && !session.in_transfer() {
                                // Back to idle after a big transfer: give the memory back.
                                buf = Vec::with_capacity(READ_BUFFER);
                            }
                        }
                        Ok(Err(_)) => return Ended::Done("read failed"),
                        Err(_) => session.timeout(),
                    },
                    _ = shutdown.wait_for(|stop| *stop) => session.shutdown(),
                }
            }
            Event::Sender(req) => {
                // A new MAIL: whatever an earlier transaction held is over (an RSET in
                // the same pipelined batch comes here without a NeedInput).
                message_hold = None;
                recipient_holds.settle();
                let ip = session.peer().ip();
                let trusted = shared.policy.is_trusted(ip);
                let who = Who {
                    ip,
                    trusted,
                    user: req.authenticated.as_deref(),
                    sender: &req.sender,
                };
                let answer = match shared.rate_limits.take(Counted::Messages, &who).await {
                    Err(over) => Err(rate_limited(shared, session.peer(), &req.sender, &over)),
                    Ok(hold) => {
                        let relayed = req.authenticated.is_some() || trusted;
                        let answer = milters.mail(&req, relayed).await;
                        if answer.is_ok() {
                            message_hold = Some(hold);
                        }
                        answer
                    }
                };
                session.answer_sender(answer);
            }
            Event::Recipient(req) => {
                let ip = session.peer().ip();
                if let Some(lists) = &shared.dnsbl
                    && dnsbl.is_none()
                    && !shared.policy.dnsbl_exempt(ip, req.authenticated.is_some())
                {
                    *dnsbl = Some(lists.check(ip).await);
                }
                let client = Client {
                    ip,
                    authenticated: req.authenticated.as_deref(),
                    dnsbl: dnsbl.as_ref().and_then(|d| d.as_deref()),
                };
                let mut decision = RecipientCheck {
                    policy: &shared.policy,
                    auth: shared.auth.as_deref(),
                    ourselves: &shared.ourselves,
                    mx_port: settings.mx_port,
                }
                .decide(client, &req);
                // The limits count what the relay rules accepted, and only that.
                let mut recipient_hold = None;
                if let Decision::Accept(_) = decision {
                    let who = Who {
                        ip,
                        trusted: shared.policy.is_trusted(ip),
                        user: req.authenticated.as_deref(),
                        sender: &req.sender,
                    };
                    match shared.rate_limits.take(Counted::Recipients, &who).await {
                        Ok(hold) => recipient_hold = Some(hold),
                        Err(over) => {
                            let reply = rate_limited(shared, session.peer(), &req.sender, &over);
                            decision = Decision::Refuse(Rule::RateLimit, reply);
                        }
                    }
                }
                match &decision {
                    Decision::Accept(rule) => {
                        maillog::recipient_accepted(session.peer(), &req.recipient, *rule)
                    }
                    Decision::Refuse(rule, reply) => {
                        shared.metrics.recipient_refused(*rule);
                        maillog::recipient_refused(
                            session.peer(),
                            req.authenticated.as_deref(),
                            &req.sender,
                            &req.recipient,
                            *rule,
                            reply,
                        )
                    }
                }
                let mut answer = decision.into_result();
                if answer.is_ok() {
                    answer = milters.rcpt(&req.recipient).await;
                }
                // Counted at RCPT 250; a milter's refusal gives it back (the drop).
                if answer.is_ok()
                    && let Some(hold) = recipient_hold
                {
                    recipient_holds.push(hold);
                }
                session.answer_recipient(answer);
            }
            Event::Authenticate(req) => {
                let answer = match &shared.auth {
                    Some(auth) => {
                        let ip = session.peer().ip();
                        let trusted = shared.policy.is_trusted(ip);
                        auth.authenticate(ip, trusted, &req).await
                    }
                    None => Err(catalogue::auth_temporarily_refused()),
                };
                match &answer {
                    Ok(_) => shared.metrics.auth_succeeded(),
                    Err(reply) if reply.code == 535 => shared.metrics.auth_failed(),
                    Err(_) => {}
                }
                session.answer_auth(answer);
            }
            Event::Message(message) => {
                transfer_deadline = None;
                // The intake counts and logs what became of it.
                // Trusted or authenticated: its mail is signed (`[[dkim]]`).
                let relayed =
                    message.authenticated.is_some() || shared.policy.is_trusted(message.peer.ip());
                let hold = message_hold.take();
                let outcome = shared
                    .intake
                    .accept(*message, &mut reservation, milters, relayed)
                    .await;
                reservation.resize(0);
                let reply = outcome.into_reply();
                // Counted at 250 (discarded and quarantined mail too: the client was told
                // it was taken); any other answer gives the message back.
                if reply.is_positive()
                    && let Some(hold) = hold
                {
                    hold.keep();
                }
                if reply.is_transient() {
                    recipient_holds.give_back();
                } else {
                    recipient_holds.settle();
                }
                session.answer_message(reply);
            }
            Event::StartTls => {
                // The 220 must reach the client before the handshake starts.
                if flush(stream, session, timeout).await.is_err() {
                    return Ended::Done("write failed");
                }
                return Ended::StartTls;
            }
            Event::Close => {
                let _ = flush(stream, session, timeout).await;
                linger(stream, &mut buf).await;
                return Ended::Done(if *shutdown.borrow() {
                    "shutdown"
                } else {
                    "closed"
                });
            }
        }
    }
}

/// A `[[rate_limit]]` said no: logged with the limit and the key, counted, answered 451.
fn rate_limited(
    shared: &Shared,
    client: SocketAddr,
    sender: &ReversePath,
    over: &Exceeded,
) -> postern_smtp::Reply {
    maillog::rate_limited(client, sender, over);
    shared.metrics.rate_limit_hit(&over.limit);
    catalogue::rate_limited()
}

/// Before reading up to `read` more octets of a message: grows the session's reservation
/// to what the body will hold then. When the budget cannot cover it, the message is
/// dropped as it arrives and answered 452 4.3.1 at its end (memory stays bounded, the
/// client tries again later).
/// True when it refused the body now.
fn reserve_for_read(
    session: &mut Session,
    reservation: &mut Reservation,
    read: usize,
    shared: &Shared,
) -> bool {
    let want = session.body_bytes_after(read) as u64;
    if want <= reservation.held() || reservation.resize(want) {
        return false;
    }
    maillog::memory_refused(session.peer(), want, shared.budget.used());
    shared.metrics.message_rejected(Rejection::Memory);
    session.refuse_body(catalogue::insufficient_storage());
    reservation.resize(session.body_bytes_after(0) as u64);
    true
}

/// What deciding a recipient needs beside the request: the policy, the authenticator
/// (for `restrict_senders`), our own addresses (for address literals) and the port a
/// literal would be delivered to. The session and the policy simulator
/// (`crate::simulate`, behind `postern check-policy` and `postern self-test`) both
/// decide through [`RecipientCheck::decide`], so they cannot disagree.
pub struct RecipientCheck<'a> {
    pub policy: &'a RelayPolicy,
    pub auth: Option<&'a Authenticator>,
    pub ourselves: &'a crate::ourselves::Ourselves,
    pub mx_port: u16,
}

impl RecipientCheck<'_> {
    /// Finds out what the policy cannot (it does no I/O), then asks it.
    pub fn decide(&self, client: Client<'_>, req: &postern_smtp::RecipientRequest) -> Decision {
        let sender_not_owned = match (client.authenticated, self.auth) {
            (Some(identity), Some(auth)) => {
                let sender = match &req.sender {
                    ReversePath::Null => String::new(),
                    ReversePath::Mailbox(a) => a.to_string(),
                };
                !auth.may_send_as(identity, &sender)
            }
            _ => false,
        };
        let literal_is_us = match req.recipient.domain() {
            Domain::Literal(ip) => self.ourselves.is_us(SocketAddr::new(*ip, self.mx_port)),
            Domain::Name(_) => false,
        };
        let facts = Facts {
            sender_not_owned,
            postmaster: req.postmaster,
            literal_is_us,
        };
        self.policy.decide_with(client, &req.recipient, facts)
    }
}

/// Closes our side, then reads and drops what the client still sends for a moment.
/// Closing a socket with unread input makes the kernel send a reset, which can destroy
/// our last reply (the 421 or 221) before the client reads it.
async fn linger<S: AsyncRead + AsyncWrite + Unpin>(stream: &mut S, buf: &mut Vec<u8>) {
    let _ = stream.shutdown().await;
    // The session's read buffer, read into its spare capacity (its length may be 0).
    buf.reserve(READ_BUFFER);
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let mut budget = 256 * 1024usize;
        while budget > 0 {
            buf.clear();
            match stream.read_buf(buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => budget = budget.saturating_sub(n),
            }
        }
    })
    .await;
}

/// Sends whatever replies are pending, within the timeout.
async fn flush<S: AsyncWrite + Unpin>(
    stream: &mut S,
    session: &mut Session,
    timeout: Duration,
) -> Result<(), ()> {
    if !session.has_output() {
        return Ok(());
    }
    let out = session.take_output();
    match tokio::time::timeout(timeout, stream.write_all(&out)).await {
        Ok(Ok(())) => Ok(()),
        _ => Err(()),
    }
}

/// The driver over scripted I/O: an in-memory duplex stream instead of a socket, and
/// tokio's paused clock (it jumps ahead whenever every task waits), so time limits are
/// tested exactly and at once.
#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use crate::ourselves::Ourselves;
    use crate::queue::{Spool, SpoolOptions};
    use tokio::io::{DuplexStream, duplex};

    struct Fixture {
        _dir: tempfile::TempDir,
        shared: Shared,
        settings: Settings,
        _enqueued: crate::delivery::Enqueued,
    }

    /// A server with `config` (built-in defaults changed by the caller), loopback
    /// trusted, a spool in a temp directory, delivery detached.
    fn fixture(change: impl FnOnce(&mut Config)) -> Fixture {
        let dir = tempfile::tempdir().unwrap();
        let mut config = Config::builtin_defaults();
        config.hostname = "relay.test".into();
        change(&mut config);
        let (spool, _) = Spool::open(dir.path(), SpoolOptions::default()).unwrap();
        let (handle, enqueued) = crate::delivery::detached();
        let metrics = Arc::new(Metrics::new([]));
        let budget = MemoryBudget::new(config.max_message_memory);
        let intake = Intake::new(
            spool,
            handle,
            crate::intake::Steps::default(),
            Arc::clone(&metrics),
            Arc::clone(&budget),
            config.hostname.clone(),
        );
        let listener = config.listeners[0].clone();
        let settings = Settings::new(&config, &listener, false, false);
        let shared = Shared {
            policy: RelayPolicy::new(&config.relay, None),
            intake,
            tls: None,
            auth: None,
            dnsbl: None,
            metrics,
            budget,
            ourselves: Ourselves::from_config(&config),
            milters: Vec::new(),
            rate_limits: Default::default(),
            cluster: None,
        };
        Fixture {
            _dir: dir,
            shared,
            settings,
            _enqueued: enqueued,
        }
    }

    /// Runs the driver on one end of a duplex stream until the session ends; returns the
    /// client's end.
    fn start(f: Fixture) -> (DuplexStream, tokio::task::JoinHandle<&'static str>) {
        let (client, mut server) = duplex(64 * 1024);
        let task = tokio::spawn(async move {
            let peer: SocketAddr = "127.0.0.1:40000".parse().unwrap();
            let mut session = Session::new(
                f.settings.protocol.clone(),
                Peer {
                    addr: peer,
                    tls: None,
                },
            );
            let (_stop, shutdown) = watch::channel(false);
            let mut dnsbl = None;
            let mut milters = Chain::none();
            match drive(
                &mut server,
                &mut session,
                &f.settings,
                &f.shared,
                &mut dnsbl,
                &mut milters,
                shutdown,
            )
            .await
            {
                Ended::Done(why) => why,
                Ended::StartTls => "starttls",
            }
        });
        (client, task)
    }

    /// Reads until `pattern` has arrived (or the stream ends); returns all that came.
    async fn read_until(client: &mut DuplexStream, pattern: &str) -> String {
        let mut seen = String::new();
        let mut buf = [0u8; 4096];
        while !seen.contains(pattern) {
            match client.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => seen.push_str(&String::from_utf8_lossy(&buf[..n])),
            }
        }
        seen
    }

    const ENVELOPE: &[u8] = b"EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\n";

    #[tokio::test(start_paused = true)]
    async fn data_timeout_bounds_a_dripping_message_not_each_read() {
        let f = fixture(|c| {
            c.command_timeout = Duration::from_secs(300);
            c.data_timeout = Duration::from_secs(60);
        });
        let (mut client, task) = start(f);
        client.write_all(ENVELOPE).await.unwrap();
        client.write_all(b"DATA\r\n").await.unwrap();
        read_until(&mut client, "354 ").await;
        let started = tokio::time::Instant::now();
        // A line every 50 s: each read well inside command_timeout.
        let mut got = String::new();
        for _ in 0..10 {
            tokio::time::sleep(Duration::from_secs(50)).await;
            if client.write_all(b"Subject: slow\r\n").await.is_err() {
                break;
            }
            let mut probe = [0u8; 256];
            if let Ok(Ok(n)) =
                tokio::time::timeout(Duration::from_millis(1), client.read(&mut probe)).await
            {
                got.push_str(&String::from_utf8_lossy(&probe[..n]));
                break;
            }
        }
        let rest = got + &read_until(&mut client, "\r\n").await;
        assert!(rest.contains("421 4.4.2"), "{rest}");
        let elapsed = started.elapsed();
        assert!(
            elapsed >= Duration::from_secs(60) && elapsed < Duration::from_secs(110),
            "{elapsed:?}"
        );
        assert_eq!(task.await.unwrap(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_client_is_closed_after_command_timeout() {
        let f = fixture(|c| c.command_timeout = Duration::from_secs(300));
        let (mut client, task) = start(f);
        let started = tokio::time::Instant::now();
        let all = read_until(&mut client, "421 ").await;
        assert!(all.starts_with("220 relay.test"), "{all}");
        assert!(all.contains("421 4.4.2"), "{all}");
        assert_eq!(started.elapsed(), Duration::from_secs(300));
        assert_eq!(task.await.unwrap(), "closed");
    }

    #[tokio::test(start_paused = true)]
    async fn a_message_over_the_memory_budget_is_answered_452_and_the_next_fits() {
        // 3 x 64 KB + 2 MB is the least the configuration allows for 64 KB messages;
        // here the budget is set lower directly, to make one message not fit.
        let f = fixture(|c| {
            c.max_message_size = 64 * 1024;
            c.max_message_memory = 16 * 1024;
        });
        let metrics = Arc::clone(&f.shared.metrics);
        let (mut client, _task) = start(f);
        client.write_all(ENVELOPE).await.unwrap();
        client.write_all(b"DATA\r\n").await.unwrap();
        read_until(&mut client, "354 ").await;
        let line = format!("{}\r\n", "x".repeat(70));
        client.write_all(line.repeat(400).as_bytes()).await.unwrap();
        client.write_all(b".\r\n").await.unwrap();
        let got = read_until(&mut client, "452 ").await;
        assert!(got.contains("452 4.3.1"), "{got}");
        // A small one fits.
        client
            .write_all(b"MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n")
            .await
            .unwrap();
        read_until(&mut client, "354 ").await;
        client
            .write_all(b"Subject: small\r\n\r\nhi\r\n.\r\n")
            .await
            .unwrap();
        let got = read_until(&mut client, "250 2.0.0 Ok").await;
        assert!(got.contains("250 2.0.0 Ok: queued as"), "{got}");
        assert!(
            metrics
                .render(0)
                .contains("postern_messages_rejected_total{reason=\"memory\"} 1")
        );
    }
}
