//! One connection to one milter: the socket (TCP or Unix), the codec
//! (`postern_smtp::milter::Session`) and the clock. Everything here is bounded in time
//! (`connect_timeout` for the connection and option negotiation, `timeout` for each reply
//! and each write) and in memory (what the milter asks to add at end of message may not
//! exceed the limit the caller gives).

use std::fmt;
use std::time::Duration;

use postern_smtp::milter::{self as codec, Action, Command, Decision, Event, Sent};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;

use crate::config::{Milter, MilterAddress};

/// The socket, whichever kind.
pub(super) trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}

/// Why a milter is out of the conversation; `on_failure` decides what that means.
#[derive(Debug)]
pub enum Failure {
    /// The connection could not be opened (refused, no such socket, timed out).
    Connect(String),
    /// No reply to this command within `timeout` (or `connect_timeout` in negotiation).
    Timeout(Command),
    /// The milter broke the protocol, closed the connection, or is not a milter at all
    /// (the codec's error names clamd or an HTTP server: `frame::Stranger`).
    Protocol(codec::Error),
    /// A read or write failed.
    Io(String),
    /// Its changes at end of message would take the message over `max_message_size`.
    TooBig(u64),
    /// More than [`MAX_ACTIONS`] header and envelope changes for one message.
    TooManyActions,
}

/// Header and envelope changes one milter may make to one message (body replacement
/// chunks are bounded by size instead). Each change is applied with a scan of the header
/// or the recipients, so an unbounded number would be quadratic work on the executor;
/// real milters make a handful (rspamd's headers, OpenDKIM's one signature).
pub(super) const MAX_ACTIONS: usize = 1000;

/// What one change costs in memory beyond its text (the entry, its strings' headers):
/// counted against the size limit, so that tiny changes cannot add up unseen.
const ACTION_OVERHEAD: u64 = 128;

impl fmt::Display for Failure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Failure::Connect(e) => write!(f, "cannot connect: {e}"),
            Failure::Timeout(c) => write!(f, "no reply to {c} in time"),
            Failure::Protocol(e) => e.fmt(f),
            Failure::Io(e) => write!(f, "connection failed: {e}"),
            Failure::TooBig(limit) => write!(
                f,
                "its changes would make the message larger than max_message_size ({limit} bytes)"
            ),
            Failure::TooManyActions => write!(
                f,
                "it sent more than {MAX_ACTIONS} header and envelope changes for one message"
            ),
        }
    }
}

/// An open, negotiated connection.
pub(super) struct Conn {
    io: Box<dyn Io>,
    pub(super) codec: codec::Session,
    buf: Vec<u8>,
    /// The HELO last sent (name, and whether TLS was up): sent again when it changes
    /// (a second EHLO, EHLO after STARTTLS).
    pub(super) helo: Option<(String, bool)>,
    /// Taken from the pool and not answered anything yet in this session: if it turns
    /// out closed, the milter closed it while it was idle (`Chain::mail` opens a new one).
    pub(super) unproven: bool,
    /// The milter answered with a tempfail in this session: not kept for the next one.
    tainted: bool,
}

/// A reply extended by `SMFIR_PROGRESS` may take at most this many `timeout`s.
pub const MAX_PROGRESS: u32 = 10;

/// How long each wait for a reply took, for the latency histogram.
pub(super) type Latency<'a> = &'a mut (dyn FnMut(Duration) + Send);

impl Conn {
    /// Connects and negotiates options, all within `connect_timeout` (Postfix's
    /// milter_connect_timeout covers the same: milter8_connect sends SMFIC_OPTNEG at
    /// once).
    pub(super) async fn open(m: &Milter) -> Result<Conn, Failure> {
        let deadline = Instant::now() + m.connect_timeout;
        let io: Box<dyn Io> = match &m.address {
            MilterAddress::Tcp(addr) => {
                let tcp = tokio::time::timeout_at(
                    deadline,
                    tokio::net::TcpStream::connect(addr.as_str()),
                )
                .await
                .map_err(|_| Failure::Connect("timed out (connect_timeout)".into()))?
                .map_err(|e| Failure::Connect(e.to_string()))?;
                // Small packets both ways, each awaited: Nagle would only add delay.
                let _ = tcp.set_nodelay(true);
                Box::new(tcp)
            }
            MilterAddress::Unix(path) => Box::new(
                tokio::time::timeout_at(deadline, tokio::net::UnixStream::connect(path))
                    .await
                    .map_err(|_| Failure::Connect("timed out (connect_timeout)".into()))?
                    .map_err(|e| Failure::Connect(e.to_string()))?,
            ),
        };
        let mut conn = Conn {
            io,
            codec: codec::Session::new(codec::Config::default()),
            buf: vec![0; 8192],
            helo: None,
            unproven: false,
            tainted: false,
        };
        let left = deadline.saturating_duration_since(Instant::now());
        conn.answer(left, 0, &mut Vec::new(), &mut |_| {}).await?;
        Ok(conn)
    }

    /// Writes what the codec has for the milter, within `timeout`, in one write (the
    /// codec's buffer keeps its capacity for the next command).
    pub(super) async fn flush(&mut self, timeout: Duration) -> Result<(), Failure> {
        if !self.codec.has_output() {
            return Ok(());
        }
        let written = tokio::time::timeout(timeout, self.io.write_all(self.codec.output())).await;
        self.codec.clear_output();
        match written {
            Ok(Ok(())) => Ok(()),
            Ok(Err(e)) => Err(Failure::Io(e.to_string())),
            Err(_) => Err(Failure::Timeout(
                self.codec.awaiting().unwrap_or(Command::Quit),
            )),
        }
    }

    /// Taken from the pool for a new SMTP session: nothing of the last one holds.
    pub(super) fn resume(&mut self) {
        self.helo = None;
        self.unproven = true;
        self.tainted = false;
    }

    /// Idle and still open: a read would block (nothing from the milter, no EOF, no
    /// error). Polled once, never waited on.
    pub(super) fn is_quiet(&mut self) -> bool {
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        let mut byte = [0u8; 1];
        let mut buf = tokio::io::ReadBuf::new(&mut byte);
        std::pin::Pin::new(&mut self.io)
            .poll_read(&mut cx, &mut buf)
            .is_pending()
    }

    /// May it serve the next SMTP session (see `pool`)?
    pub(super) fn reusable(&self) -> bool {
        !self.tainted && self.codec.can_quit_nc()
    }

    /// Gives back a big message's buffer memory before the connection goes idle.
    pub(super) fn shrink_buffers(&mut self) {
        self.codec.shrink_buffers();
    }

    /// `SMFIC_QUIT_NC`, to go out with the next command.
    pub(super) fn quit_nc(&mut self) -> Result<(), Failure> {
        self.codec.quit_nc().map(|_| ()).map_err(Failure::Protocol)
    }

    /// After a stage method: sends its packets and, when the milter answers that
    /// command, reads until its decision. Actions (only at end of message) go to
    /// `actions`, their octets counted against `limit`.
    pub(super) async fn step(
        &mut self,
        sent: Result<Sent, codec::Error>,
        timeout: Duration,
        limit: u64,
        actions: &mut Vec<Action>,
        latency: Latency<'_>,
    ) -> Result<Decision, Failure> {
        match sent.map_err(Failure::Protocol)? {
            Sent::AwaitReply => self.answer(timeout, limit, actions, latency).await,
            Sent::NoReply | Sent::Skipped => {
                self.flush(timeout).await?;
                Ok(Decision::Continue)
            }
        }
    }

    /// As [`Conn::step`] inside a message, where an answered command always follows
    /// (end of message at the latest): packets the milter does not answer
    /// (`SMFIP_NR_HDR`, `SMFIP_NR_BODY`, ...) are not written at once but go out with
    /// the next answered command, in the same write (a message's header fields in one
    /// write instead of one each).
    pub(super) async fn step_batched(
        &mut self,
        sent: Result<Sent, codec::Error>,
        timeout: Duration,
        latency: Latency<'_>,
    ) -> Result<Decision, Failure> {
        match sent.map_err(Failure::Protocol)? {
            Sent::AwaitReply => self.answer(timeout, 0, &mut Vec::new(), latency).await,
            Sent::NoReply | Sent::Skipped => Ok(Decision::Continue),
        }
    }

    /// Sends what is pending, then reads until the decision (or, in negotiation, its
    /// end: read as `Continue`). `SMFIR_PROGRESS` restarts the timeout, as libmilter's
    /// smfi_progress is meant to and Postfix's milter8_event does; but however often it
    /// comes, one reply may take at most [`MAX_PROGRESS`] times `timeout` (neither
    /// Sendmail nor Postfix caps it; a milter stuck in a progress loop would otherwise
    /// hold the SMTP session forever).
    async fn answer(
        &mut self,
        timeout: Duration,
        limit: u64,
        actions: &mut Vec<Action>,
        latency: Latency<'_>,
    ) -> Result<Decision, Failure> {
        self.flush(timeout).await?;
        let started = Instant::now();
        let mut deadline = started + timeout;
        let last = started + timeout.saturating_mul(MAX_PROGRESS);
        let mut held: u64 = actions.iter().map(action_size).sum();
        let is_change = |a: &Action| !matches!(a, Action::ReplBody(_));
        let mut changes = actions.iter().filter(|a| is_change(a)).count();
        loop {
            while let Some(event) = self.codec.poll_event() {
                match event.map_err(Failure::Protocol)? {
                    Event::Negotiated => {
                        latency(started.elapsed());
                        self.unproven = false;
                        return Ok(Decision::Continue);
                    }
                    Event::Progress => deadline = (Instant::now() + timeout).min(last),
                    Event::Action(a) => {
                        held += action_size(&a);
                        if held > limit {
                            return Err(Failure::TooBig(limit));
                        }
                        if is_change(&a) {
                            changes += 1;
                            if changes > MAX_ACTIONS {
                                return Err(Failure::TooManyActions);
                            }
                        }
                        actions.push(a);
                    }
                    Event::Decision(d) => {
                        latency(started.elapsed());
                        self.unproven = false;
                        if matches!(&d, Decision::Tempfail)
                            || matches!(&d, Decision::Reply(r) if r.code < 500)
                        {
                            self.tainted = true;
                        }
                        return Ok(d);
                    }
                }
            }
            let awaited = self.codec.awaiting().unwrap_or(Command::OptNeg);
            let n = match tokio::time::timeout_at(deadline, self.io.read(&mut self.buf)).await {
                Err(_) => return Err(Failure::Timeout(awaited)),
                Ok(Err(e)) => return Err(Failure::Io(e.to_string())),
                Ok(Ok(0)) => {
                    self.codec.handle_eof().map_err(Failure::Protocol)?;
                    // Nothing was awaited after all: the codec has handed out an event.
                    return Err(Failure::Protocol(codec::Error::Closed(awaited)));
                }
                Ok(Ok(n)) => n,
            };
            self.codec.feed(&self.buf[..n]);
        }
    }

    /// QUIT and close, without waiting long: the session is over either way. A
    /// transaction still open is aborted first (ABORT, then QUIT), so that the milter's
    /// abort callback runs, as Postfix's smtpd resets its milters before it disconnects
    /// them.
    pub(super) async fn quit(mut self) {
        if matches!(
            self.codec.phase(),
            codec::Phase::Transaction | codec::Phase::MessageDecided
        ) {
            let _ = self.codec.abort();
        }
        if self.codec.quit().is_ok() {
            let _ = self.flush(Duration::from_secs(1)).await;
        }
        let _ = tokio::time::timeout(Duration::from_secs(1), self.io.shutdown()).await;
    }
}

/// The octets an action holds, for the bound on what a milter may add.
pub(super) fn action_size(a: &Action) -> u64 {
    let n = match a {
        Action::AddHeader { name, value }
        | Action::InsHeader { name, value, .. }
        | Action::ChgHeader { name, value, .. } => name.len() + value.len() + 4,
        Action::ChgFrom { addr, args } | Action::AddRcptPar { addr, args } => {
            addr.len() + args.iter().map(|a| a.len() + 1).sum::<usize>()
        }
        Action::AddRcpt { addr } | Action::DelRcpt { addr } => addr.len(),
        Action::ReplBody(b) => b.len(),
        Action::Quarantine { reason } => reason.len(),
    };
    n as u64 + ACTION_OVERHEAD
}
