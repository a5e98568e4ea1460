//! The server side of an SMTP session as a sans-IO state machine.
//!
//! Bytes go in with [`Session::receive`]; [`Session::poll`] runs the protocol over what
//! is buffered and returns the next [`Event`]: read more input, answer a question (may
//! this recipient be accepted? store this message), start TLS, or close. Replies
//! accumulate in an output buffer the driver sends with [`Session::take_output`];
//! because the driver flushes only when the session needs more input, pipelined
//! commands (RFC 2920) get their replies in one write. There is no socket and no clock
//! here: timeouts and shutdown come in as calls ([`Session::timeout`],
//! [`Session::shutdown`]).
//!
//! Trust: every byte from the client is hostile. Memory is bounded by the 512-octet
//! command line (RFC 5321 4.5.3.1.4; longer lines are discarded up to their end and
//! answered, the session carries on), `max_message_size` for bodies, and
//! `max_recipients`. Nothing here panics on input.

use std::net::{IpAddr, SocketAddr};

use crate::address::{Address, ReversePath};
use crate::command::{self, Command, POSTMASTER_MARKER, Param};
use crate::data::{BodyFaults, DataReader, LineChecker};
use crate::reply::{Reply, catalogue};

/// RFC 5321 4.5.3.1.4: a command line is at most 512 octets including CRLF.
pub const MAX_COMMAND_LINE: usize = 512;
/// RFC 4954 4: the AUTH command and SASL responses may be up to 12288 octets.
pub const MAX_AUTH_LINE: usize = 12288;
/// Replies waiting to be sent beyond which no further command is read: the driver is
/// asked to flush first ([`Event::Flush`]). A pipelined batch of cheap commands (EHLO
/// gives ~20 times its size in reply) can then never pile up output for a client that
/// does not read it.
pub const MAX_PENDING_OUTPUT: usize = 16 * 1024;
/// Default for [`SessionConfig::max_junk_commands`] (Postfix's smtpd_junk_command_limit).
pub const DEFAULT_MAX_JUNK_COMMANDS: u32 = 100;
/// Default for [`SessionConfig::max_hops`] (Postfix's hopcount_limit).
pub const DEFAULT_MAX_HOPS: usize = 50;

/// Per-listener settings the protocol needs.
#[derive(Clone, Debug)]
pub struct SessionConfig {
    /// Our name in the greeting, EHLO reply and Received: header.
    pub hostname: String,
    /// Advertised with SIZE (RFC 1870); larger messages get 552 5.3.4.
    pub max_message_size: u64,
    /// Per transaction; more get 452 4.5.3.
    pub max_recipients: usize,
    /// Protocol errors (syntax, sequence, over-long lines) before 421 and close.
    pub max_errors: u32,
    /// Offer STARTTLS (RFC 3207): the driver can perform a handshake.
    pub starttls: bool,
    /// MAIL and AUTH get 530 5.7.0 until TLS is active.
    pub require_tls: bool,
    /// SASL mechanisms offered with AUTH (RFC 4954), e.g. ["PLAIN", "LOGIN"]; empty: no AUTH.
    pub auth_mechanisms: Vec<String>,
    /// MAIL gets 530 5.7.0 until AUTH succeeded.
    pub auth_required: bool,
    /// Offer and accept AUTH without TLS (credentials in clear: off by default).
    pub allow_plaintext_auth: bool,
    /// Commands that do no mail work (NOOP, RSET, VRFY, HELP, EXPN, and every EHLO/HELO
    /// after the first) allowed per session; beyond, each one counts toward
    /// `max_errors`. The count restarts after each message accepted.
    pub max_junk_commands: u32,
    /// RFC 5321 6.3: a message whose header already holds this many `Received:` (and
    /// `Delivered-To:`) fields is looping; it is refused with 554 5.4.6.
    pub max_hops: usize,
    /// Where `<Postmaster>` and `postmaster@hostname` go (RFC 5321 4.5.1): they are then
    /// accepted from anyone. `None`: there is no deliverable postmaster mailbox; a bare
    /// `<Postmaster>` becomes `postmaster@hostname` and is decided like any recipient.
    pub postmaster: Option<Address>,
}

impl SessionConfig {
    /// A plain receiving session: no TLS, no AUTH.
    pub fn new(hostname: impl Into<String>, max_message_size: u64, max_recipients: usize) -> Self {
        SessionConfig {
            hostname: hostname.into(),
            max_message_size,
            max_recipients,
            max_errors: 20,
            starttls: false,
            require_tls: false,
            auth_mechanisms: Vec::new(),
            auth_required: false,
            allow_plaintext_auth: false,
            max_junk_commands: DEFAULT_MAX_JUNK_COMMANDS,
            max_hops: DEFAULT_MAX_HOPS,
            postmaster: None,
        }
    }
}

/// The negotiated TLS parameters, for the Received: header (RFC 8314 4.3 recommends
/// recording them).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TlsInfo {
    pub version: String,
    pub cipher: String,
}

/// Who is on the other end, as the driver knows it.
#[derive(Clone, Debug)]
pub struct Peer {
    pub addr: SocketAddr,
    /// The connection is already TLS (implicit TLS, RFC 8314).
    pub tls: Option<TlsInfo>,
}

/// A question the driver must answer with [`Session::answer_recipient`]: may `recipient`
/// be accepted in this transaction?
#[derive(Clone, Debug)]
pub struct RecipientRequest {
    pub sender: ReversePath,
    pub recipient: Address,
    /// Identity established by SMTP AUTH, if any.
    pub authenticated: Option<String>,
    /// The client wrote `<Postmaster>` or `postmaster@` our hostname: RFC 5321 4.5.1
    /// says it must be accepted (from anyone); `recipient` is then the address it goes
    /// to ([`SessionConfig::postmaster`]).
    pub postmaster: bool,
}

/// A MAIL command the core found valid, which the driver must answer with
/// [`Session::answer_sender`] (asked only after [`Session::ask_sender`]).
#[derive(Clone, Debug)]
pub struct SenderRequest {
    pub sender: ReversePath,
    /// MAIL parameters as received (validated; AUTH= dropped).
    pub params: Vec<Param>,
    /// The EHLO/HELO argument.
    pub helo: String,
    /// Identity established by SMTP AUTH, if any.
    pub authenticated: Option<String>,
}

/// Credentials the driver must check, then call [`Session::answer_auth`].
#[derive(Clone)]
pub struct AuthRequest {
    /// "PLAIN" or "LOGIN".
    pub mechanism: &'static str,
    /// PLAIN's authorization identity when the client sent one (RFC 4616 2).
    pub authzid: Option<String>,
    pub username: String,
    pub password: String,
}

impl std::fmt::Debug for AuthRequest {
    /// Never prints the password: requests end up in debug logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AuthRequest")
            .field("mechanism", &self.mechanism)
            .field("authzid", &self.authzid)
            .field("username", &self.username)
            .field("password", &"<redacted>")
            .finish()
    }
}

/// A complete message the driver must screen and store, then answer with
/// [`Session::answer_message`] (250 only once it is durably stored).
#[derive(Debug)]
pub struct Message {
    pub helo: String,
    pub sender: ReversePath,
    /// MAIL parameters as received (validated), for the spool.
    pub params: Vec<Param>,
    pub smtputf8: bool,
    pub recipients: Vec<Address>,
    /// The content, dot-unstuffed, every line ending in CRLF, without our Received:.
    pub body: Vec<u8>,
    pub peer: SocketAddr,
    pub esmtp: bool,
    pub tls: Option<TlsInfo>,
    pub authenticated: Option<String>,
}

impl Message {
    /// RFC 3848 / RFC 6531 3.7.3 protocol name for the Received: `with` clause.
    pub fn protocol(&self) -> &'static str {
        match (
            self.smtputf8,
            self.esmtp,
            self.tls.is_some(),
            self.authenticated.is_some(),
        ) {
            (_, false, _, _) => "SMTP",
            (false, true, false, false) => "ESMTP",
            (false, true, true, false) => "ESMTPS",
            (false, true, false, true) => "ESMTPA",
            (false, true, true, true) => "ESMTPSA",
            (true, true, false, false) => "UTF8SMTP",
            (true, true, true, false) => "UTF8SMTPS",
            (true, true, false, true) => "UTF8SMTPA",
            (true, true, true, true) => "UTF8SMTPSA",
        }
    }

    /// The trace header (RFC 5321 4.4) this hop prepends, CRLF-terminated and folded.
    /// `date` is an RFC 5322 date-time supplied by the caller (this crate has no clock).
    pub fn received_header(&self, by: &str, id: &str, date: &str) -> String {
        let ip = match self.peer.ip() {
            IpAddr::V4(a) => format!("[{a}]"),
            IpAddr::V6(a) => match a.to_ipv4_mapped() {
                Some(v4) => format!("[{v4}]"),
                None => format!("[IPv6:{a}]"),
            },
        };
        let mut h = format!("Received: from {} ({ip})\r\n", header_safe_helo(&self.helo));
        if let Some(tls) = &self.tls {
            h.push_str(&format!(
                "\t(using {} with cipher {})\r\n",
                tls.version, tls.cipher
            ));
        }
        // No SASL login name (Postfix's smtpd_sasl_authenticated_header = no): the
        // header travels with the message and would tell every recipient which account
        // to guess the password of. `with ESMTPA` says that AUTH was used.
        h.push_str(&format!(
            "\tby {by} (Postern) with {} id {id}",
            self.protocol()
        ));
        // Name the recipient only when there is one: more would disclose the list.
        if let [only] = self.recipients.as_slice() {
            h.push_str(&format!("\r\n\tfor <{only}>"));
        }
        h.push_str(&format!(";\r\n\t{date}\r\n"));
        h
    }
}

/// The HELO/EHLO argument as it may appear in our `Received:` header: the client typed
/// it, so anything but the characters of a domain name or an address literal becomes
/// `?` and it is cut to 255 octets. It can then neither forge further trace fields
/// (no CR, LF, `;` or parentheses) nor make a 7-bit message 8-bit.
pub fn header_safe_helo(helo: &str) -> String {
    const MAX: usize = 255;
    let mut out: String = helo
        .chars()
        .take(MAX)
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '.' | '-' | '_' | ':' | '[' | ']' => c,
            _ => '?',
        })
        .collect();
    if out.is_empty() {
        out.push('?');
    }
    out
}

/// Counts the trace fields (`Received:` and `Delivered-To:`, RFC 5321 6.3) in the
/// header section of `message`, stopping at the first empty line or at `limit`.
pub fn count_hops(message: &[u8], limit: usize) -> usize {
    let mut hops = 0;
    for line in message.split(|&b| b == b'\n') {
        if line.is_empty() || line == b"\r" || hops >= limit {
            break;
        }
        let name = line.split(|&b| b == b':').next().unwrap_or_default();
        if name.eq_ignore_ascii_case(b"Received") || name.eq_ignore_ascii_case(b"Delivered-To") {
            hops += 1;
        }
    }
    hops
}

/// What the driver must do next.
#[derive(Debug)]
pub enum Event {
    /// Everything buffered has been processed: send the output, then read more input.
    NeedInput,
    /// Replies have piled up ([`MAX_PENDING_OUTPUT`]): send the output, then poll again
    /// without reading (more commands are already buffered).
    Flush,
    /// Answer with [`Session::answer_sender`] before polling again. Only when the driver
    /// asked for it ([`Session::ask_sender`]: it has milters to consult at MAIL).
    Sender(SenderRequest),
    /// Answer with [`Session::answer_recipient`] before polling again.
    Recipient(RecipientRequest),
    /// Store (or refuse) the message, then call [`Session::answer_message`].
    Message(Box<Message>),
    /// Check the credentials, then call [`Session::answer_auth`].
    Authenticate(AuthRequest),
    /// Send the output, perform the TLS handshake, then call
    /// [`Session::tls_established`] (or close on failure).
    StartTls,
    /// Send the output and close the connection.
    Close,
}

/// Messages a session refused by itself, with no [`Event::Message`] for the driver to
/// answer: counts for the driver's metrics, collected with [`Session::take_refusals`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Refusals {
    /// 552 5.3.4: over `max_message_size`, declared (MAIL SIZE=, BDAT) or found at the end.
    pub size: u64,
    /// 554 5.6.0: a bare CR or LF in the message.
    pub bare_line_ending: u64,
    /// 500 5.5.6: a text line over 1000 octets.
    pub line_too_long: u64,
    /// 554 5.4.6: too many `Received:` fields (a mail loop, RFC 5321 6.3).
    pub too_many_hops: u64,
}

/// The connection-level state, in RFC 5321 order:
///
/// ```text
/// greeting ─▶ Connected ─EHLO/HELO─▶ Ready ─MAIL─▶ Transaction ─RCPT…─▶ Transaction
///                  ▲                   ▲                 │
///                  │ STARTTLS          │ end of message  ├─DATA─▶ Data ─.─▶ AwaitMessage
///                  │ (RFC 3207 4.2)    │ RSET, EHLO      └─BDAT─▶ Bdat ─LAST─▶ AwaitMessage
/// ```
/// `AwaitRecipient` and `AwaitMessage` hold the session while the driver answers a
/// question; `Closed` is final. The transaction itself lives apart, in `Transaction`.
#[derive(Debug)]
enum State {
    Connected,
    Ready,
    Transaction,
    AwaitSender,
    AwaitRecipient,
    Data(DataReader),
    /// Reading a BDAT chunk: `remaining` octets still to come.
    Bdat {
        remaining: u64,
        last: bool,
    },
    AwaitMessage,
    AwaitTls,
    /// In an AUTH exchange, waiting for the client's next SASL response line.
    Sasl(Sasl),
    AwaitAuth,
    Closed,
}

/// Where an AUTH exchange stands (RFC 4954 4; PLAIN is RFC 4616, LOGIN is the
/// long-deployed draft-murchison-sasl-login).
#[derive(Debug)]
enum Sasl {
    Plain,
    LoginUser,
    LoginPassword { user: String },
}

/// The mail transaction: from MAIL to the end of the message or RSET.
#[derive(Debug)]
struct Transaction {
    sender: ReversePath,
    params: Vec<Param>,
    smtputf8: bool,
    recipients: Vec<Address>,
    /// Set once BDAT is used (DATA is then out of sequence, RFC 3030 3).
    chunks: Option<Chunks>,
}

#[derive(Debug, Default)]
struct Chunks {
    body: Vec<u8>,
    checker: LineChecker,
}

/// One SMTP server session.
#[derive(Debug)]
pub struct Session {
    config: SessionConfig,
    peer: Peer,
    state: State,
    /// EHLO/HELO argument, and whether it was EHLO.
    greeting: Option<(String, bool)>,
    transaction: Option<Transaction>,
    /// The recipient waiting for the driver's decision.
    pending_recipient: Option<Address>,
    /// Ask the driver about each MAIL ([`Event::Sender`]).
    ask_sender: bool,
    /// The transaction MAIL would open, waiting for the driver's decision.
    pending_transaction: Option<Transaction>,
    authenticated: Option<String>,
    input: Vec<u8>,
    /// Start of unprocessed input.
    pos: usize,
    /// The DATA reader saw the end of the message in input handed to it directly by
    /// [`Session::receive`]; the next [`Session::poll`] ends the message.
    data_ended: bool,
    /// Discarding the rest of an over-long command line.
    discarding: bool,
    /// A BDAT chunk that failed before its data was read (answer after the chunk).
    bdat_failure: Option<Reply>,
    output: Vec<u8>,
    errors: u32,
    /// Commands that did no mail work (see [`SessionConfig::max_junk_commands`]).
    junk: u32,
    /// The driver could not hold more of this message in memory: it is read to its end
    /// and answered with this reply.
    body_refusal: Option<Reply>,
    refusals: Refusals,
}

impl Session {
    /// Starts a session; the greeting is queued as the first output.
    pub fn new(config: SessionConfig, peer: Peer) -> Session {
        let mut s = Session {
            state: State::Connected,
            greeting: None,
            transaction: None,
            pending_recipient: None,
            ask_sender: false,
            pending_transaction: None,
            authenticated: None,
            input: Vec::new(),
            pos: 0,
            data_ended: false,
            discarding: false,
            bdat_failure: None,
            output: Vec::new(),
            errors: 0,
            junk: 0,
            body_refusal: None,
            refusals: Refusals::default(),
            peer,
            config,
        };
        s.reply(catalogue::greeting(&s.config.hostname));
        s
    }

    // --- getters ---------------------------------------------------------------------------

    /// The client's address.
    pub fn peer(&self) -> SocketAddr {
        self.peer.addr
    }

    /// True once the session is over (after QUIT, too many errors, timeout, shutdown).
    pub fn is_closed(&self) -> bool {
        matches!(self.state, State::Closed)
    }

    /// True while a message is being received (DATA or BDAT chunks). Used by the driver
    /// to let a transfer finish during shutdown.
    pub fn in_transfer(&self) -> bool {
        matches!(
            self.state,
            State::Data(_) | State::Bdat { .. } | State::AwaitMessage
        )
    }

    /// Bytes of memory the message being received will hold once `more` further octets
    /// of it are read (its buffer's capacity then): what the driver reserves from its
    /// global budget before reading `more`. Zero outside a transfer and once the body
    /// is being dropped ([`Session::refuse_body`], a size refusal).
    pub fn body_bytes_after(&self, more: usize) -> usize {
        if let State::Data(reader) = &self.state {
            return reader.held_after(more);
        }
        // BDAT chunks received so far stay held between chunks, too.
        let Some(chunks) = self.transaction.as_ref().and_then(|t| t.chunks.as_ref()) else {
            return 0;
        };
        match self.state {
            State::Bdat { .. } if self.bdat_failure.is_none() => {
                crate::data::capacity_after(&chunks.body, more)
            }
            _ => chunks.body.capacity(),
        }
    }

    /// True from the start of a message's content (DATA's 354, or the first BDAT) until
    /// it is answered: the span `data_timeout` bounds. Unlike [`Session::in_transfer`]
    /// it stays true between BDAT chunks.
    pub fn in_message(&self) -> bool {
        self.in_transfer()
            || self
                .transaction
                .as_ref()
                .is_some_and(|t| t.chunks.is_some())
    }

    // --- inputs ----------------------------------------------------------------------------

    /// The driver cannot hold more of the message being received (its memory budget is
    /// spent): what is buffered is dropped, the rest is read and dropped, and the message
    /// is answered with `reply` at its end (for BDAT: at the end of this chunk).
    pub fn refuse_body(&mut self, reply: Reply) {
        match &mut self.state {
            State::Data(reader) => {
                reader.discard();
                self.body_refusal.get_or_insert(reply);
            }
            State::Bdat { .. } => {
                if let Some(c) = self.transaction.as_mut().and_then(|t| t.chunks.as_mut()) {
                    c.body = Vec::new();
                }
                self.bdat_failure.get_or_insert(reply);
            }
            _ => {}
        }
    }

    /// Buffers bytes read from the client. Call [`Session::poll`] afterwards.
    pub fn receive(&mut self, bytes: &[u8]) {
        // A message body streaming in with nothing buffered before it goes straight to
        // the DATA reader, not through the input buffer first (one copy of the body
        // less); only what follows its end (pipelined commands) is kept for `poll`.
        if self.pos >= self.input.len()
            && !self.data_ended
            && let State::Data(reader) = &mut self.state
        {
            let (used, done) = reader.feed(bytes);
            self.data_ended = done;
            self.input.clear();
            self.pos = 0;
            self.input.extend_from_slice(&bytes[used..]);
            return;
        }
        if self.pos > 0 {
            self.input.drain(..self.pos);
            self.pos = 0;
        }
        self.input.extend_from_slice(bytes);
    }

    /// From now on, each valid MAIL is put to the driver as [`Event::Sender`] before it
    /// is answered (the driver has milters that may refuse it).
    pub fn ask_sender(&mut self) {
        self.ask_sender = true;
    }

    /// The driver's answer to [`Event::Sender`]: `Ok` opens the transaction (250), `Err`
    /// refuses MAIL with the given reply, counted toward `max_errors` as a refused RCPT
    /// is (Postfix's error limits count every refusal: a client cannot make the driver
    /// ask its milters without end). A 421 closes the session after it (RFC 5321 3.8).
    pub fn answer_sender(&mut self, decision: Result<(), Reply>) {
        let State::AwaitSender = self.state else {
            debug_assert!(false, "answer_sender without a question");
            return;
        };
        self.state = State::Ready;
        let Some(t) = self.pending_transaction.take() else {
            return;
        };
        match decision {
            Ok(()) => {
                self.transaction = Some(t);
                self.state = State::Transaction;
                self.reply(catalogue::sender_ok());
            }
            Err(reply) if reply.code == 421 => self.close_with(reply),
            Err(reply) => self.protocol_error(reply),
        }
    }

    /// A mail transaction is open (MAIL accepted, not yet ended by the end of the
    /// message, RSET, EHLO/HELO or STARTTLS).
    pub fn in_transaction(&self) -> bool {
        self.transaction.is_some()
    }

    /// The driver's answer to [`Event::Recipient`]: `Ok` accepts, `Err` refuses with
    /// the given reply.
    pub fn answer_recipient(&mut self, decision: Result<(), Reply>) {
        let State::AwaitRecipient = self.state else {
            debug_assert!(false, "answer_recipient without a question");
            return;
        };
        self.state = State::Transaction;
        let Some(rcpt) = self.pending_recipient.take() else {
            return;
        };
        match decision {
            Ok(()) => {
                if let Some(t) = self.transaction.as_mut() {
                    t.recipients.push(rcpt);
                }
                self.reply(catalogue::recipient_ok());
            }
            // Refusals count toward the error limit, as Postfix's hard error limit
            // does: a client cannot probe recipients or relay without end.
            Err(reply) => self.protocol_error(reply),
        }
    }

    /// The driver's answer to [`Event::Message`]: 250 once stored, or a refusal.
    pub fn answer_message(&mut self, reply: Reply) {
        let State::AwaitMessage = self.state else {
            debug_assert!(false, "answer_message without a question");
            return;
        };
        if reply.is_positive() {
            // A client doing real work gets a fresh allowance of junk commands.
            self.junk = 0;
        }
        self.reply(reply);
        self.state = State::Ready;
    }

    /// The TLS handshake after STARTTLS succeeded. RFC 3207 4.2: the client must start
    /// over with EHLO, and nothing it sent before the handshake may be acted on.
    pub fn tls_established(&mut self, info: TlsInfo) {
        self.peer.tls = Some(info);
        self.greeting = None;
        self.authenticated = None;
        self.transaction = None;
        self.input.clear();
        self.pos = 0;
        self.discarding = false;
        self.state = State::Connected;
    }

    /// The driver's answer to [`Event::Authenticate`]: `Ok(identity)` (235) or the
    /// refusal to send (535 5.7.8, 454 4.7.0).
    pub fn answer_auth(&mut self, result: Result<String, Reply>) {
        let State::AwaitAuth = self.state else {
            debug_assert!(false, "answer_auth without a question");
            return;
        };
        self.state = State::Ready;
        match result {
            Ok(identity) => {
                self.authenticated = Some(identity);
                self.reply(catalogue::auth_ok());
            }
            Err(reply) => self.reply(reply),
        }
    }

    /// The identity established by SMTP AUTH, if any.
    pub fn authenticated(&self) -> Option<&str> {
        self.authenticated.as_deref()
    }

    /// True once TLS is active (implicit, or after STARTTLS).
    pub fn is_tls(&self) -> bool {
        self.peer.tls.is_some()
    }

    /// The client was silent longer than the command timeout.
    pub fn timeout(&mut self) {
        self.close_with(catalogue::timeout());
    }

    /// The server is stopping.
    pub fn shutdown(&mut self) {
        self.close_with(catalogue::shutting_down());
    }

    // --- outputs ---------------------------------------------------------------------------

    /// Takes the bytes to send to the client.
    pub fn take_output(&mut self) -> Vec<u8> {
        std::mem::take(&mut self.output)
    }

    /// True when there are bytes to send.
    pub fn has_output(&self) -> bool {
        !self.output.is_empty()
    }

    /// Takes the counts of messages refused since the last call (see [`Refusals`]).
    pub fn take_refusals(&mut self) -> Refusals {
        std::mem::take(&mut self.refusals)
    }

    /// Runs the protocol over the buffered input until something needs the driver.
    pub fn poll(&mut self) -> Event {
        loop {
            match &mut self.state {
                State::Closed => return Event::Close,
                State::AwaitSender
                | State::AwaitRecipient
                | State::AwaitMessage
                | State::AwaitTls
                | State::AwaitAuth => {
                    // A driver bug, not something input can cause: refuse to go on.
                    debug_assert!(false, "poll while a question is pending");
                    return Event::Close;
                }
                State::Data(reader) => {
                    let done = if std::mem::take(&mut self.data_ended) {
                        true
                    } else {
                        let (used, done) = reader.feed(&self.input[self.pos..]);
                        self.pos += used;
                        done
                    };
                    if !done {
                        return Event::NeedInput;
                    }
                    let State::Data(reader) = std::mem::replace(&mut self.state, State::Ready)
                    else {
                        unreachable!("state checked above")
                    };
                    let (body, faults) = reader.finish();
                    if let Some(event) = self.end_of_message(body, faults) {
                        return event;
                    }
                }
                State::Bdat { remaining, last } => {
                    let available = self.input.len() - self.pos;
                    let take = (*remaining).min(available as u64) as usize;
                    let last = *last;
                    *remaining -= take as u64;
                    let done = *remaining == 0;
                    let chunk = self.pos..self.pos + take;
                    self.pos += take;
                    self.bdat_data(chunk);
                    if !done {
                        return Event::NeedInput;
                    }
                    if let Some(event) = self.bdat_end(last) {
                        return event;
                    }
                }
                State::Sasl(_) | State::Connected | State::Ready | State::Transaction
                    if self.output.len() >= MAX_PENDING_OUTPUT && self.pos < self.input.len() =>
                {
                    return Event::Flush;
                }
                State::Sasl(_) => match self.next_line() {
                    None => return Event::NeedInput,
                    Some(Err(())) => {
                        // RFC 4954 4: 500 5.5.6 and the exchange is over.
                        self.state = State::Ready;
                        self.protocol_error(catalogue::auth_line_too_long());
                    }
                    Some(Ok((start, end))) => {
                        let line = String::from_utf8_lossy(&self.input[start..end]).into_owned();
                        if let Some(event) = self.sasl_response(&line) {
                            return event;
                        }
                    }
                },
                _ => match self.next_line() {
                    None => return Event::NeedInput,
                    Some(Err(())) => self.protocol_error(catalogue::command_too_long()),
                    Some(Ok((start, end))) => {
                        let parsed = command::parse(&self.input[start..end]);
                        if let Some(event) = self.command(parsed) {
                            return event;
                        }
                    }
                },
            }
        }
    }

    // --- internals -------------------------------------------------------------------------

    fn reply(&mut self, reply: Reply) {
        reply.write_to(&mut self.output);
    }

    fn close_with(&mut self, reply: Reply) {
        if !self.is_closed() {
            self.reply(reply);
            self.state = State::Closed;
        }
    }

    /// A reply that counts toward `max_errors`.
    fn protocol_error(&mut self, reply: Reply) {
        self.reply(reply);
        self.errors += 1;
        if self.errors >= self.config.max_errors {
            self.close_with(catalogue::too_many_errors());
        }
    }

    /// The next command line as a range of `input` without its line ending, or
    /// `Err` for a line over the limit (already consumed up to its LF).
    fn next_line(&mut self) -> Option<Result<(usize, usize), ()>> {
        let avail = &self.input[self.pos..];
        // AUTH lines carry base64 credentials and may be longer (RFC 4954 4).
        let limit = if matches!(self.state, State::Sasl(_))
            || avail
                .get(..5)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"AUTH "))
        {
            MAX_AUTH_LINE
        } else {
            MAX_COMMAND_LINE
        };
        match avail.iter().position(|&b| b == b'\n') {
            Some(lf) => {
                let start = self.pos;
                self.pos += lf + 1;
                if std::mem::take(&mut self.discarding) || lf + 1 > limit {
                    return Some(Err(()));
                }
                // Commands may end in a bare LF: harmless here (unlike in DATA) and
                // common from hand-typed sessions.
                let end = if lf > 0 && avail[lf - 1] == b'\r' {
                    start + lf - 1
                } else {
                    start + lf
                };
                Some(Ok((start, end)))
            }
            None => {
                if avail.len() >= limit {
                    // Keep memory bounded: drop what we have, answer at the line's end.
                    self.discarding = true;
                    self.pos = self.input.len();
                }
                None
            }
        }
    }

    fn esmtp(&self) -> bool {
        self.greeting.as_ref().is_some_and(|(_, e)| *e)
    }

    fn command(&mut self, parsed: Result<Command, Reply>) -> Option<Event> {
        let cmd = match parsed {
            Ok(c) => c,
            Err(reply) => {
                self.protocol_error(reply);
                return None;
            }
        };
        let junk = match &cmd {
            Command::Noop | Command::Rset | Command::Vrfy | Command::Expn | Command::Help => true,
            Command::Ehlo(_) | Command::Helo(_) => self.greeting.is_some(),
            _ => false,
        };
        if junk {
            self.junk = self.junk.saturating_add(1);
            if self.junk > self.config.max_junk_commands {
                // Answered as usual, but counted like an error, as Postfix does: a
                // client that only idles or probes is closed after max_errors more.
                self.errors += 1;
                if self.errors >= self.config.max_errors {
                    self.close_with(catalogue::too_many_errors());
                    return Some(Event::Close);
                }
            }
        }
        match cmd {
            Command::Ehlo(name) => self.hello(name, true),
            Command::Helo(name) => self.hello(name, false),
            Command::Mail { from, params } => {
                self.mail(from, params);
                return self.sender_question();
            }
            Command::Rcpt { to, params } => return self.rcpt(to, params),
            Command::Data => self.data(),
            Command::Bdat { size, last } => self.bdat(size, last),
            Command::Rset => {
                self.reset_transaction();
                self.reply(catalogue::reset());
            }
            Command::Noop => self.reply(catalogue::ok()),
            Command::Vrfy => self.reply(catalogue::vrfy()),
            Command::Expn => self.reply(catalogue::expn_disabled()),
            Command::Help => self.reply(catalogue::help()),
            Command::Quit => {
                self.close_with(catalogue::closing());
                return Some(Event::Close);
            }
            Command::StartTls => return self.starttls(),
            Command::Auth { mechanism, initial } => return self.auth(mechanism, initial),
        }
        None
    }

    fn hello(&mut self, name: String, esmtp: bool) {
        // RFC 5321 4.1.4: EHLO/HELO mid-session resets any transaction.
        self.reset_transaction();
        let reply = if esmtp {
            catalogue::ehlo(&self.config.hostname, &self.extensions())
        } else {
            catalogue::helo(&self.config.hostname)
        };
        self.greeting = Some((name, esmtp));
        self.state = State::Ready;
        self.reply(reply);
    }

    /// The EHLO keywords we advertise.
    fn extensions(&self) -> Vec<String> {
        let mut ext = vec![
            "PIPELINING".to_string(),
            format!("SIZE {}", self.config.max_message_size),
        ];
        if self.config.starttls && self.peer.tls.is_none() {
            ext.push("STARTTLS".into());
        }
        if self.auth_offered() {
            ext.push(format!("AUTH {}", self.config.auth_mechanisms.join(" ")));
        }
        ext.extend(["ENHANCEDSTATUSCODES", "8BITMIME", "SMTPUTF8", "CHUNKING"].map(String::from));
        ext
    }

    fn mail(&mut self, from: ReversePath, params: Vec<Param>) {
        if self.greeting.is_none() {
            return self.protocol_error(catalogue::bad_sequence("Send EHLO/HELO first"));
        }
        if self.transaction.is_some() {
            return self.protocol_error(catalogue::bad_sequence("Nested MAIL command"));
        }
        if self.config.require_tls && self.peer.tls.is_none() {
            return self.reply(catalogue::tls_required());
        }
        if self.config.auth_required && self.authenticated.is_none() {
            return self.reply(catalogue::auth_required());
        }
        let mut smtputf8 = false;
        let mut seen: Vec<&str> = Vec::new();
        for p in &params {
            // RFC 5321 4.1.1.11: parameters only after EHLO; each at most once.
            if !self.esmtp() {
                return self.protocol_error(catalogue::bad_parameter("MAIL parameters need EHLO"));
            }
            if seen.contains(&p.keyword.as_str()) {
                return self.protocol_error(catalogue::bad_parameter("Duplicate MAIL parameter"));
            }
            seen.push(&p.keyword);
            match (p.keyword.as_str(), p.value.as_deref()) {
                // RFC 1870 6: a declared size over the limit is refused up front.
                ("SIZE", Some(v)) => match v.parse::<u64>() {
                    Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) => {
                        if n > self.config.max_message_size {
                            self.refusals.size += 1;
                            return self.reply(catalogue::message_too_big());
                        }
                    }
                    _ => {
                        return self.protocol_error(catalogue::bad_parameter("Bad SIZE parameter"));
                    }
                },
                // RFC 6152 2: 7BIT or 8BITMIME (BINARYMIME is not offered).
                ("BODY", Some(v))
                    if v.eq_ignore_ascii_case("7BIT") || v.eq_ignore_ascii_case("8BITMIME") => {}
                ("SMTPUTF8", None) => smtputf8 = true,
                // RFC 4954 5: accepted only when AUTH is offered; we never pass it on
                // (we do not vouch for another server's authentication), so it is
                // validated and dropped below.
                ("AUTH", Some(v)) if !self.config.auth_mechanisms.is_empty() && is_xtext(v) => {}
                _ => {
                    return self
                        .protocol_error(catalogue::bad_parameter("Unsupported MAIL parameter"));
                }
            }
        }
        if let ReversePath::Mailbox(a) = &from
            && a.needs_smtputf8()
            && !smtputf8
        {
            return self.reply(catalogue::needs_smtputf8());
        }
        let params = params.into_iter().filter(|p| p.keyword != "AUTH").collect();
        let t = Transaction {
            sender: from,
            params,
            smtputf8,
            recipients: Vec::new(),
            chunks: None,
        };
        if self.ask_sender {
            // Answered in `answer_sender`; `command` hands out the question.
            self.pending_transaction = Some(t);
            self.state = State::AwaitSender;
            return;
        }
        self.transaction = Some(t);
        self.state = State::Transaction;
        self.reply(catalogue::sender_ok());
    }

    /// The [`Event::Sender`] for a MAIL that `mail` left waiting, if it did.
    fn sender_question(&self) -> Option<Event> {
        let (State::AwaitSender, Some(t)) = (&self.state, &self.pending_transaction) else {
            return None;
        };
        Some(Event::Sender(SenderRequest {
            sender: t.sender.clone(),
            params: t.params.clone(),
            helo: self
                .greeting
                .as_ref()
                .map(|g| g.0.clone())
                .unwrap_or_default(),
            authenticated: self.authenticated.clone(),
        }))
    }

    fn rcpt(&mut self, to: Address, params: Vec<Param>) -> Option<Event> {
        let Some(t) = self.transaction.as_ref() else {
            self.protocol_error(catalogue::bad_sequence("Need MAIL command"));
            return None;
        };
        if !params.is_empty() {
            self.protocol_error(catalogue::bad_parameter("Unsupported RCPT parameter"));
            return None;
        }
        if to.needs_smtputf8() && !t.smtputf8 {
            self.reply(catalogue::needs_smtputf8());
            return None;
        }
        // RFC 5321 4.5.1: <Postmaster> (bare, any case) and postmaster@ our own name
        // must be accepted; they go to the configured postmaster.
        let bare = to.domain().name() == Some(POSTMASTER_MARKER);
        let ours = bare
            || (to.local().eq_ignore_ascii_case("postmaster")
                && to.domain().ascii_name().as_deref()
                    == Some(crate::address::ascii_domain(&self.config.hostname).as_ref()));
        let (to, postmaster) = match (ours, &self.config.postmaster) {
            (true, Some(address)) => (address.clone(), true),
            (_, None) if bare => (Address::postmaster(&self.config.hostname), false),
            _ => (to, false),
        };
        // Compared as mailboxes: `<"a"@x>`, `<a@x>` and `<@r:a@x>` are one recipient.
        if t.recipients.iter().any(|r| r.same_mailbox(&to)) {
            // Already accepted in this transaction: accept again, deliver once.
            self.reply(catalogue::recipient_ok());
            return None;
        }
        if t.recipients.len() >= self.config.max_recipients {
            self.reply(catalogue::too_many_recipients());
            return None;
        }
        let request = RecipientRequest {
            sender: t.sender.clone(),
            recipient: to.clone(),
            authenticated: self.authenticated.clone(),
            postmaster,
        };
        self.pending_recipient = Some(to);
        self.state = State::AwaitRecipient;
        Some(Event::Recipient(request))
    }

    fn data(&mut self) {
        match &self.transaction {
            None => self.protocol_error(catalogue::bad_sequence("Need MAIL command")),
            Some(t) if t.chunks.is_some() => {
                self.protocol_error(catalogue::bad_sequence("DATA not allowed after BDAT"))
            }
            Some(t) if t.recipients.is_empty() => self.reply(catalogue::no_valid_recipients()),
            Some(_) => {
                self.reply(catalogue::start_data());
                self.body_refusal = None;
                self.data_ended = false;
                self.state = State::Data(DataReader::new(self.config.max_message_size));
            }
        }
    }

    /// BDAT (RFC 3030): the chunk's octets follow the command whatever we think of it,
    /// so even a refused BDAT reads (and drops) them before answering.
    fn bdat(&mut self, size: u64, last: bool) {
        let failure = match &mut self.transaction {
            None => Some(catalogue::bad_sequence("Need MAIL command")),
            Some(t) if t.recipients.is_empty() => Some(catalogue::no_valid_recipients()),
            Some(t) => {
                let chunks = t.chunks.get_or_insert_with(Chunks::default);
                let total = chunks.body.len() as u64 + size;
                if total > self.config.max_message_size {
                    chunks.body = Vec::new();
                    self.refusals.size += 1;
                    Some(catalogue::message_too_big())
                } else {
                    // No reservation ahead of the data: the buffer grows as the octets
                    // arrive, within what the driver has budgeted for.
                    None
                }
            }
        };
        self.bdat_failure = failure;
        self.state = State::Bdat {
            remaining: size,
            last,
        };
    }

    fn bdat_data(&mut self, range: std::ops::Range<usize>) {
        if self.bdat_failure.is_some() {
            return;
        }
        if let Some(chunks) = self.transaction.as_mut().and_then(|t| t.chunks.as_mut()) {
            let bytes = &self.input[range];
            chunks.checker.feed(bytes);
            crate::data::extend_bounded(&mut chunks.body, bytes);
        }
    }

    fn bdat_end(&mut self, last: bool) -> Option<Event> {
        self.state = State::Transaction;
        if let Some(reply) = self.bdat_failure.take() {
            // RFC 3030 2: the transaction has failed; chunks already pipelined behind
            // this one will find no transaction and be read and dropped.
            let sequence = reply.code == 503;
            self.reset_transaction();
            if sequence {
                self.protocol_error(reply);
            } else {
                self.reply(reply);
            }
            return None;
        }
        let chunks = self.transaction.as_mut()?.chunks.as_mut()?;
        if !last {
            let n = chunks.body.len() as u64;
            self.reply(catalogue::chunk_ok(n));
            return None;
        }
        let Chunks {
            mut body, checker, ..
        } = self.transaction.as_mut()?.chunks.take()?;
        // Keep the stored message whole lines: a final line without CRLF gets one (a
        // DATA transfer could not have produced anything else).
        if !checker.at_line_start() {
            body.extend_from_slice(b"\r\n");
        }
        let faults = checker.finish();
        self.state = State::Ready;
        self.end_of_message(body, faults)
    }

    /// The message has been read completely (DATA's dot or BDAT LAST).
    fn end_of_message(&mut self, body: Vec<u8>, faults: BodyFaults) -> Option<Event> {
        let transaction = self.transaction.take();
        self.state = State::Ready;
        let refusal = if faults.too_big {
            self.refusals.size += 1;
            Some(catalogue::message_too_big())
        } else if let Some(reply) = self.body_refusal.take() {
            Some(reply)
        } else if faults.bare_line_ending {
            self.refusals.bare_line_ending += 1;
            Some(catalogue::bare_line_ending())
        } else if faults.long_line {
            self.refusals.line_too_long += 1;
            Some(catalogue::text_line_too_long())
        } else if count_hops(&body, self.config.max_hops) >= self.config.max_hops {
            // RFC 5321 6.3: a message that has passed this many relays is in a loop.
            self.refusals.too_many_hops += 1;
            Some(catalogue::too_many_hops())
        } else {
            None
        };
        if let Some(reply) = refusal {
            self.reply(reply);
            return None;
        }
        let t = transaction?;
        let (helo, esmtp) = self.greeting.clone().unwrap_or_default();
        self.state = State::AwaitMessage;
        Some(Event::Message(Box::new(Message {
            helo,
            sender: t.sender,
            params: t.params,
            smtputf8: t.smtputf8,
            recipients: t.recipients,
            body,
            peer: self.peer.addr,
            esmtp,
            tls: self.peer.tls.clone(),
            authenticated: self.authenticated.clone(),
        })))
    }

    /// AUTH is advertised and accepted: offered, and TLS is up unless plaintext AUTH is
    /// allowed (RFC 4954 4 "SHOULD NOT advertise ... without a security layer").
    fn auth_offered(&self) -> bool {
        !self.config.auth_mechanisms.is_empty()
            && (self.peer.tls.is_some()
                || (self.config.allow_plaintext_auth && !self.config.require_tls))
    }

    fn auth(&mut self, mechanism: String, initial: Option<String>) -> Option<Event> {
        if self.config.auth_mechanisms.is_empty() {
            self.protocol_error(catalogue::not_implemented());
            return None;
        }
        if !self.esmtp() {
            self.protocol_error(catalogue::bad_sequence("Send EHLO first"));
            return None;
        }
        if self.config.require_tls && self.peer.tls.is_none() {
            self.reply(catalogue::tls_required());
            return None;
        }
        if !self.auth_offered() {
            self.reply(catalogue::encryption_required_for_auth());
            return None;
        }
        if self.authenticated.is_some() {
            self.protocol_error(catalogue::bad_sequence("Already authenticated"));
            return None;
        }
        if self.transaction.is_some() {
            self.protocol_error(catalogue::bad_sequence(
                "AUTH not allowed during a mail transaction",
            ));
            return None;
        }
        if !self.config.auth_mechanisms.contains(&mechanism) {
            self.protocol_error(catalogue::unknown_mechanism());
            return None;
        }
        match (mechanism.as_str(), initial) {
            ("PLAIN", None) => {
                self.reply(catalogue::sasl_challenge(""));
                self.state = State::Sasl(Sasl::Plain);
                None
            }
            ("PLAIN", Some(response)) => self.sasl_plain(&response),
            ("LOGIN", None) => {
                self.reply(catalogue::sasl_challenge("VXNlcm5hbWU6")); // "Username:"
                self.state = State::Sasl(Sasl::LoginUser);
                None
            }
            ("LOGIN", Some(response)) => {
                self.state = State::Sasl(Sasl::LoginUser);
                self.sasl_response(&response)
            }
            _ => {
                self.protocol_error(catalogue::unknown_mechanism());
                None
            }
        }
    }

    /// One client line inside an AUTH exchange.
    fn sasl_response(&mut self, line: &str) -> Option<Event> {
        let State::Sasl(step) = std::mem::replace(&mut self.state, State::Ready) else {
            return None;
        };
        if line == "*" {
            self.reply(catalogue::auth_cancelled());
            return None;
        }
        match step {
            Sasl::Plain => self.sasl_plain(line),
            Sasl::LoginUser => match decode_text(line) {
                Some(user) if !user.is_empty() => {
                    self.reply(catalogue::sasl_challenge("UGFzc3dvcmQ6")); // "Password:"
                    self.state = State::Sasl(Sasl::LoginPassword { user });
                    None
                }
                _ => {
                    self.protocol_error(catalogue::bad_sasl_response());
                    None
                }
            },
            Sasl::LoginPassword { user } => match decode_text(line) {
                Some(password) => self.ask_auth(AuthRequest {
                    mechanism: "LOGIN",
                    authzid: None,
                    username: user,
                    password,
                }),
                None => {
                    self.protocol_error(catalogue::bad_sasl_response());
                    None
                }
            },
        }
    }

    /// RFC 4616 2: `[authzid] NUL authcid NUL passwd`, all UTF-8.
    fn sasl_plain(&mut self, response: &str) -> Option<Event> {
        let parts = decode_text(response).and_then(|text| {
            let mut it = text.splitn(3, '\0');
            let (z, c, p) = (it.next()?, it.next()?, it.next()?);
            (!c.is_empty() && !p.contains('\0')).then(|| {
                (
                    (!z.is_empty()).then(|| z.to_string()),
                    c.to_string(),
                    p.to_string(),
                )
            })
        });
        match parts {
            Some((authzid, username, password)) => self.ask_auth(AuthRequest {
                mechanism: "PLAIN",
                authzid,
                username,
                password,
            }),
            None => {
                self.protocol_error(catalogue::bad_sasl_response());
                None
            }
        }
    }

    fn ask_auth(&mut self, request: AuthRequest) -> Option<Event> {
        self.state = State::AwaitAuth;
        Some(Event::Authenticate(request))
    }

    fn starttls(&mut self) -> Option<Event> {
        if !self.config.starttls {
            self.protocol_error(catalogue::not_implemented());
            return None;
        }
        if self.peer.tls.is_some() {
            self.protocol_error(catalogue::bad_sequence("TLS already active"));
            return None;
        }
        self.reply(catalogue::ready_for_tls());
        // Anything pipelined after STARTTLS arrived in plaintext and must never be
        // executed after the handshake (RFC 3207 4.2, CVE-2011-0411).
        self.input.clear();
        self.pos = 0;
        self.state = State::AwaitTls;
        Some(Event::StartTls)
    }

    fn reset_transaction(&mut self) {
        self.transaction = None;
        self.body_refusal = None;
        if !matches!(self.state, State::Connected) {
            self.state = State::Ready;
        }
    }
}

/// Decodes a base64 SASL response into UTF-8 text; `=` is the empty response
/// (RFC 4954 4).
fn decode_text(b64: &str) -> Option<String> {
    use base64::Engine;
    if b64 == "=" {
        return Some(String::new());
    }
    let bytes = base64::engine::general_purpose::STANDARD.decode(b64).ok()?;
    String::from_utf8(bytes).ok()
}

/// RFC 3461 4: `xtext = *( xchar / hexchar )`, used by MAIL's AUTH= parameter, or `<>`.
fn is_xtext(v: &str) -> bool {
    if v == "<>" {
        return true;
    }
    let b = v.as_bytes();
    let mut i = 0;
    while i < b.len() {
        match b[i] {
            b'+' => {
                let hex = b.get(i + 1..i + 3);
                if !hex.is_some_and(|h| {
                    h.iter()
                        .all(|c| c.is_ascii_hexdigit() && !c.is_ascii_lowercase())
                }) {
                    return false;
                }
                i += 3;
            }
            b'!'..=b'~' if b[i] != b'=' => i += 1,
            _ => return false,
        }
    }
    !b.is_empty()
}

#[cfg(test)]
mod tests;
