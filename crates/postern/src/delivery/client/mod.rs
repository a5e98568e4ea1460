//! The outbound SMTP client: delivers messages over one connection to one host.
//!
//! [`Connection::connect`] opens TCP, reads the greeting, says EHLO (HELO when EHLO is
//! refused), upgrades with STARTTLS per [`TlsPolicy`] and authenticates per
//! [`Credentials`]; [`Connection::send`] then runs one mail transaction per call (the
//! queue runner reuses the connection for several messages) and returns one
//! [`RcptResult`] per recipient; [`Connection::quit`] ends the session.
//!
//! The conversation, per RFC 5321 3.3 and 4.1 (one `send` is one MAIL..final-dot):
//!
//! ```text
//! connect → 220 greeting → EHLO (→ HELO) → [STARTTLS → 220 → TLS → EHLO] → [AUTH → 235]
//!         → { MAIL → RCPT.. → DATA → 354 → body → final dot → 250 }* → QUIT → 221
//! ```
//!
//! Trust: the remote server is untrusted. Replies are read with limits enforced where the
//! bytes arrive ([`MAX_REPLY_LINE`] octets per line, [`MAX_REPLY_LINES`] lines per reply);
//! anything malformed ends the connection with a protocol error; every read and write is
//! bounded in time; reply text is kept only after control characters are replaced, so it
//! can go into logs and bounces as is. Data the server sends without being asked is an
//! error (at STARTTLS it would be a command-injection attempt). Credentials go only over
//! TLS and never into a log. The message and envelope come from our own spool (trusted
//! to be CRLF text), but addresses with control characters are still refused here rather
//! than written into a command line.
//!
//! Layout: this file is the conversation (what to send when, what a reply means for each
//! recipient); `io.rs` moves bytes (buffered reads and writes, timeouts, the TLS switch);
//! the wire format itself (reply parser, EHLO capabilities, command lines, dot-stuffing)
//! is sans-IO code in [`postern_smtp::client`].

mod io;

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use postern_smtp::Reply;
use postern_smtp::client::{ClientCommand, MailParams, wire_size};
use rustls::pki_types::ServerName;
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;

use super::DeliveryStatus;
use super::tls;
use io::{Failure, Io};

/// The wire format lives in the protocol core; these names stay here for callers.
pub use postern_smtp::client::{
    Extensions, MAX_REPLY_LINE, MAX_REPLY_LINES, ParsedReply, ReplyError, parse_reply,
};

/// How long QUIT (and its 221) may take: it is a courtesy, nothing depends on it.
const QUIT_TIMEOUT: Duration = Duration::from_secs(5);

// --- configuration --------------------------------------------------------------------

/// How one outbound connection behaves.
#[derive(Clone, Debug)]
pub struct ClientConfig {
    /// Our host name, sent in EHLO/HELO.
    pub helo_name: String,
    /// TCP connect.
    pub connect_timeout: Duration,
    /// Every command reply and every write (RFC 5321 4.5.3.2 gives 5 min for the greeting,
    /// MAIL and RCPT, 2 for DATA, 3 per data block; we use one value for all of them).
    pub command_timeout: Duration,
    /// The reply to the final dot (RFC 5321 4.5.3.2.6: 10 min): the server may be
    /// filtering or fsyncing the message.
    pub data_timeout: Duration,
    pub tls: TlsPolicy,
    /// AUTH to a smart host; sent only over TLS.
    pub auth: Option<Credentials>,
}

impl ClientConfig {
    /// The RFC 5321 4.5.3.2 defaults: connect 30 s, commands 5 min, final dot 10 min,
    /// opportunistic TLS, no AUTH.
    pub fn new(helo_name: impl Into<String>) -> ClientConfig {
        ClientConfig {
            helo_name: helo_name.into(),
            connect_timeout: Duration::from_secs(30),
            command_timeout: Duration::from_secs(5 * 60),
            data_timeout: Duration::from_secs(10 * 60),
            tls: TlsPolicy::Opportunistic,
            auth: None,
        }
    }
}

/// STARTTLS behaviour (RFC 3207), a route's `tls` setting.
#[derive(Clone, Debug)]
pub enum TlsPolicy {
    /// Never STARTTLS.
    None,
    /// STARTTLS when offered, certificate not verified (RFC 7435). A failed handshake is
    /// [`ConnectError::TlsHandshake`]; the caller may then reconnect with `None`. A
    /// STARTTLS refused with 454 etc. continues in plaintext on the same connection.
    Opportunistic,
    /// STARTTLS must be offered and succeed with a certificate that the config verifies
    /// (see [`tls::required_config`]); otherwise the connection fails, never plaintext.
    Required(Arc<rustls::ClientConfig>),
}

/// AUTH credentials for a smart host. `Debug` does not show the password.
#[derive(Clone)]
pub struct Credentials {
    pub user: String,
    pub password: String,
}

impl fmt::Debug for Credentials {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Credentials")
            .field("user", &self.user)
            .field("password", &"<redacted>")
            .finish()
    }
}

// --- what goes in, what comes out ---------------------------------------------------

/// One message to deliver: the envelope and the spooled body.
#[derive(Clone, Copy, Debug)]
pub struct OutboundMessage<'a> {
    /// Reverse path without angle brackets; "" is the null sender (bounces).
    pub sender: &'a str,
    /// Forward paths without angle brackets.
    pub recipients: &'a [String],
    /// The message as spooled: CRLF lines, not dot-stuffed.
    pub body: &'a [u8],
    /// The client declared SMTPUTF8 (RFC 6531). Only a wish: SMTPUTF8 is *needed* when an
    /// address or a header field is non-ASCII UTF-8 (RFC 6531 3.2, RFC 6532), and a
    /// declared but unneeded SMTPUTF8 is dropped for a server that does not offer it.
    pub smtputf8: bool,
    /// The client declared BODY=8BITMIME (RFC 6152). Also only a wish: what is sent
    /// follows the bytes (octets above 127), so 7-bit mail declared 8-bit goes anywhere.
    pub eight_bit: bool,
    /// What the body needs of a server: [`Content::of`] the body, found once for all
    /// the hosts and connections an attempt goes through.
    pub content: Content,
}

/// What a message body needs of the server it goes to, and its size on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Content {
    /// An octet above 127: 8BITMIME is needed (RFC 6152 2).
    eight_bit: bool,
    /// A header field in UTF-8: SMTPUTF8 is needed (RFC 6532 3).
    utf8_header: bool,
    /// The SIZE the body takes (RFC 1870 6, [`wire_size`]).
    wire_size: u64,
}

impl Content {
    /// One pass over `body` (and one more over its header section only when it is
    /// 8-bit).
    pub fn of(body: &[u8]) -> Content {
        let eight_bit = !body.is_ascii();
        Content {
            eight_bit,
            // An all-ASCII body has no UTF-8 header field to look for.
            utf8_header: eight_bit && utf8_in_header(body),
            wire_size: wire_size(body),
        }
    }
}

/// The outcome for one recipient: the remote's reply, or one we made up (its text then
/// ends in "(local)").
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RcptResult {
    pub status: DeliveryStatus,
    pub reply: Reply,
}

impl RcptResult {
    fn delivered(reply: Reply) -> RcptResult {
        RcptResult {
            status: DeliveryStatus::Delivered,
            reply,
        }
    }
    fn deferred(reply: Reply) -> RcptResult {
        RcptResult {
            status: DeliveryStatus::Deferred,
            reply,
        }
    }
    fn failed(reply: Reply) -> RcptResult {
        RcptResult {
            status: DeliveryStatus::Failed,
            reply,
        }
    }

    pub fn reply(&self) -> &Reply {
        &self.reply
    }
}

/// The connection could not be used; the caller tries the next host or defers.
#[derive(thiserror::Error, Debug)]
pub enum ConnectError {
    /// TCP connect, read or write failed.
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    /// The named phase took longer than its timeout.
    #[error("timeout during {0}")]
    Timeout(&'static str),
    /// A 4xx/5xx greeting: try the next MX (RFC 5321 5.1).
    #[error("greeting refused: {0}")]
    Greeting(Reply),
    /// EHLO and HELO were both refused (or EHLO got 4xx).
    #[error("EHLO/HELO refused: {0}")]
    Ehlo(Reply),
    /// TLS is required but the server does not offer STARTTLS.
    #[error("TLS required but STARTTLS not offered")]
    TlsUnavailable,
    /// The TLS handshake failed (certificate, protocol, timeout). With
    /// [`TlsPolicy::Opportunistic`] the caller may reconnect in plaintext; with
    /// [`TlsPolicy::Required`] it defers.
    #[error("TLS handshake failed: {0}")]
    TlsHandshake(String),
    /// STARTTLS answered with something other than 220 (with TLS required, or 421).
    #[error("STARTTLS refused: {0}")]
    StartTlsRefused(Reply),
    /// AUTH failed (535 etc.): a configuration fault; the message is deferred, not bounced.
    #[error("AUTH failed: {0}")]
    Auth(Reply),
    /// Credentials are configured but the session is not TLS-protected, or the server
    /// offers neither PLAIN nor LOGIN. Nothing was sent.
    #[error("AUTH not possible: no TLS, or no supported mechanism (PLAIN, LOGIN) offered")]
    AuthUnavailable,
    /// A malformed or unexpected reply.
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The connection broke mid-transaction: every recipient without a final answer is
/// deferred by the caller, and the connection must be dropped.
#[derive(thiserror::Error, Debug)]
pub enum SessionError {
    #[error("I/O error: {0}")]
    Io(#[from] std::io::Error),
    #[error("timeout during {0}")]
    Timeout(&'static str),
    /// A malformed or unexpected reply, or `send` on a connection that is no longer
    /// reusable (see [`Connection::is_reusable`]).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// The replies we make up when we decide without asking the server; the "(local)"
/// suffix tells a reader of a bounce that the next hop never said this.
mod local {
    use postern_smtp::{Reply, Status};

    fn reply(code: u16, status: Status, text: String) -> Reply {
        Reply::new(code, Some(status), format!("{text} (local)"))
    }
    /// RFC 1870 6: the message is larger than the next hop's SIZE.
    pub fn too_big(server: &str, size: u64, limit: u64) -> Reply {
        reply(
            552,
            Status(5, 3, 4),
            format!("Message size {size} exceeds the limit of {limit} announced by {server}"),
        )
    }
    /// RFC 6152 3: we do not downgrade 8-bit content to 7 bit.
    pub fn no_8bitmime(server: &str) -> Reply {
        reply(
            554,
            Status(5, 6, 3),
            format!("Conversion to 7 bit not supported; {server} does not offer 8BITMIME"),
        )
    }
    /// RFC 6531 3.2: an internationalised envelope needs a server with SMTPUTF8.
    pub fn no_smtputf8(server: &str) -> Reply {
        reply(
            553,
            Status(5, 6, 7),
            format!("Message needs SMTPUTF8, which {server} does not offer"),
        )
    }
    pub fn bad_sender() -> Reply {
        reply(
            553,
            Status(5, 1, 7),
            "Sender address contains control characters".into(),
        )
    }
    pub fn bad_recipient() -> Reply {
        reply(
            553,
            Status(5, 1, 3),
            "Recipient address contains control characters".into(),
        )
    }
    /// Should not happen: a recipient the transaction logic left without an outcome.
    pub fn no_outcome() -> Reply {
        reply(
            451,
            Status(4, 3, 0),
            "No outcome recorded for this recipient".into(),
        )
    }
}

// --- the connection -------------------------------------------------------------------

/// One SMTP session with one server, ready for transactions.
pub struct Connection {
    io: Io,
    peer: SocketAddr,
    server_name: String,
    extensions: Extensions,
    command_timeout: Duration,
    data_timeout: Duration,
    /// False once the session state is unknown (a failed RSET, a 421, an I/O error).
    reusable: bool,
    /// Per recipient of the last `send`: the message body was sent for it, so its outcome
    /// is the final dot's reply (see [`Connection::took_message`]).
    took_message: Vec<bool>,
}

impl fmt::Debug for Connection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Connection")
            .field("peer", &self.peer)
            .field("server_name", &self.server_name)
            .field("tls", &self.is_tls())
            .field("reusable", &self.reusable)
            .field("extensions", &self.extensions)
            .finish()
    }
}

impl Connection {
    /// Connects (TCP_NODELAY on), reads the greeting, says EHLO (HELO when EHLO gets a
    /// 5xx, RFC 5321 4.1.1.1 and 3.2), does STARTTLS per policy and then EHLO again
    /// (RFC 3207 4.2), and AUTH when credentials are configured (RFC 4954).
    ///
    /// `server_name`: the name to verify the certificate against and send as SNI: an MX
    /// host name, the host of host:port, or the IP of \[ip\]:port (brackets and an
    /// "IPv6:" tag are accepted and removed).
    pub async fn connect(
        addr: SocketAddr,
        server_name: &str,
        config: &ClientConfig,
    ) -> Result<Connection, ConnectError> {
        if config.helo_name.is_empty() || config.helo_name.bytes().any(|b| b <= b' ' || b == 0x7f) {
            return Err(ConnectError::Protocol(format!(
                "local configuration: unusable HELO name {:?}",
                config.helo_name
            )));
        }
        let tcp = tokio::time::timeout(config.connect_timeout, TcpStream::connect(addr))
            .await
            .map_err(|_| ConnectError::Timeout("connect"))??;
        // Commands and the final dot go out in whole writes; Nagle would only hold the
        // last segment back waiting for an ACK (RFC 2920 leaves batching to us).
        tcp.set_nodelay(true)?;
        let mut conn = Connection {
            io: Io::new(tcp),
            peer: addr,
            server_name: server_name.to_owned(),
            extensions: Extensions::default(),
            command_timeout: config.command_timeout,
            data_timeout: config.data_timeout,
            reusable: true,
            took_message: Vec::new(),
        };
        match conn.open(config).await {
            Ok(()) => {
                tracing::debug!(peer = %addr, server = server_name, tls = conn.is_tls(), "smtp client connected");
                Ok(conn)
            }
            Err(e) => {
                // RFC 5321 3.1/4.1.1.10: after a refusal the polite end is QUIT. After a
                // broken exchange the session state is unknown and we just close.
                let polite = matches!(
                    e,
                    ConnectError::Greeting(_)
                        | ConnectError::Ehlo(_)
                        | ConnectError::TlsUnavailable
                        | ConnectError::StartTlsRefused(_)
                        | ConnectError::Auth(_)
                        | ConnectError::AuthUnavailable
                );
                if polite {
                    conn.quit().await;
                }
                Err(e)
            }
        }
    }

    async fn open(&mut self, config: &ClientConfig) -> Result<(), ConnectError> {
        // RFC 5321 4.3.1/3.1: 220 is the only greeting that opens a session; 554 (or a
        // 421) means "not here", and the caller tries the next MX (5.1).
        let greeting = self.io.read_reply(self.command_timeout, "greeting").await?;
        match greeting.code {
            220 => {}
            400..=599 => return Err(ConnectError::Greeting(greeting)),
            _ => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected greeting: {greeting}"
                )));
            }
        }
        self.hello(&config.helo_name).await?;
        match &config.tls {
            TlsPolicy::None => {}
            TlsPolicy::Opportunistic => {
                if self.extensions.starttls {
                    self.starttls(tls::opportunistic_config(), false, &config.helo_name)
                        .await?;
                }
            }
            TlsPolicy::Required(tls_config) => {
                if !self.extensions.starttls {
                    return Err(ConnectError::TlsUnavailable);
                }
                self.starttls(tls_config.clone(), true, &config.helo_name)
                    .await?;
            }
        }
        if let Some(credentials) = &config.auth {
            self.authenticate(credentials).await?;
        }
        Ok(())
    }

    /// EHLO, or HELO when EHLO is refused with 5xx (RFC 5321 4.1.1.1, 3.2: an old server
    /// answers 500/502 to EHLO). Sets the extensions from the reply.
    async fn hello(&mut self, helo_name: &str) -> Result<(), ConnectError> {
        let t = self.command_timeout;
        let ehlo = self.io.exchange(ClientCommand::Ehlo(helo_name), t).await?;
        match ehlo.code {
            200..=299 => {
                self.extensions = Extensions::from_ehlo(&ehlo);
                return Ok(());
            }
            500..=599 => {}
            400..=499 => return Err(ConnectError::Ehlo(ehlo)),
            _ => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected reply to EHLO: {ehlo}"
                )));
            }
        }
        let helo = self.io.exchange(ClientCommand::Helo(helo_name), t).await?;
        match helo.code {
            200..=299 => {
                self.extensions = Extensions::default();
                Ok(())
            }
            400..=599 => Err(ConnectError::Ehlo(helo)),
            _ => Err(ConnectError::Protocol(format!(
                "unexpected reply to HELO: {helo}"
            ))),
        }
    }

    /// STARTTLS (RFC 3207): 220, handshake, forget the extensions, EHLO again (4.2).
    async fn starttls(
        &mut self,
        tls_config: Arc<rustls::ClientConfig>,
        required: bool,
        helo_name: &str,
    ) -> Result<(), ConnectError> {
        let name = match tls_server_name(&self.server_name) {
            Some(name) => name,
            // Checked before STARTTLS is sent: nothing to verify a certificate against.
            None if required => {
                return Err(ConnectError::TlsHandshake(format!(
                    "{:?} is not a valid TLS server name",
                    self.server_name
                )));
            }
            // Opportunistic: nothing is verified anyway; an IP sends no SNI.
            None => ServerName::IpAddress(self.peer.ip().into()),
        };
        let t = self.command_timeout;
        let reply = self.io.exchange(ClientCommand::StartTls, t).await?;
        match reply.code {
            220 => {}
            // RFC 3207 4: after a refusal the session goes on unencrypted, which
            // opportunistic TLS accepts (RFC 7435) unless the server is closing.
            400..=599 if !required && reply.code != 421 => {
                tracing::info!(server = %self.server_name, reply = %reply, "STARTTLS refused; continuing without TLS");
                return Ok(());
            }
            400..=599 => return Err(ConnectError::StartTlsRefused(reply)),
            _ => {
                return Err(ConnectError::Protocol(format!(
                    "unexpected reply to STARTTLS: {reply}"
                )));
            }
        }
        // Anything after the 220 was sent before the handshake, in the clear, and would
        // otherwise be read as if it came over TLS (the CVE-2011-0411 family).
        if self.io.has_unread() {
            return Err(ConnectError::Protocol(
                "server sent data after its STARTTLS reply (command injection?)".into(),
            ));
        }
        let Some(tcp) = self.io.take_plain() else {
            return Err(ConnectError::Protocol("STARTTLS on a TLS session".into()));
        };
        let handshake = TlsConnector::from(tls_config).connect(name, tcp);
        let tls = match tokio::time::timeout(t, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(ConnectError::TlsHandshake(e.to_string())),
            Err(_) => return Err(ConnectError::TlsHandshake(format!("timed out after {t:?}"))),
        };
        self.io.set_tls(tls);
        // RFC 3207 4.2: discard all knowledge obtained before TLS.
        self.extensions = Extensions::default();
        self.hello(helo_name).await
    }

    /// AUTH (RFC 4954), only over TLS: PLAIN with an initial response (RFC 4616), else
    /// LOGIN. 235 is success; any other reply is [`ConnectError::Auth`].
    async fn authenticate(&mut self, credentials: &Credentials) -> Result<(), ConnectError> {
        if !self.is_tls() {
            // Never credentials in the clear, whatever the TLS policy.
            return Err(ConnectError::AuthUnavailable);
        }
        let t = self.command_timeout;
        let mechanisms = &self.extensions.auth;
        let reply = if mechanisms.iter().any(|m| m == "PLAIN") {
            let plain = ClientCommand::AuthPlain {
                user: &credentials.user,
                password: &credentials.password,
            };
            self.io.exchange(plain, t).await?
        } else if mechanisms.iter().any(|m| m == "LOGIN") {
            let reply = self.io.exchange(ClientCommand::AuthLogin, t).await?;
            if reply.code != 334 {
                return Err(ConnectError::Auth(reply));
            }
            let user = ClientCommand::AuthLoginUser(&credentials.user);
            let reply = self.io.exchange(user, t).await?;
            if reply.code != 334 {
                return Err(ConnectError::Auth(reply));
            }
            let password = ClientCommand::AuthLoginPassword(&credentials.password);
            self.io.exchange(password, t).await?
        } else {
            return Err(ConnectError::AuthUnavailable);
        };
        if reply.code == 235 {
            Ok(())
        } else {
            Err(ConnectError::Auth(reply))
        }
    }

    /// One mail transaction. Returns one result per recipient, in the order of
    /// `message.recipients`. An error means the connection broke: recipients have no
    /// final outcome and the connection must be dropped.
    ///
    /// Checks made without asking the server (synthesised replies end in "(local)"): the
    /// ones of [`Connection::refusal`], which depend on this server, and an address with
    /// control characters → 553, which does not.
    pub async fn send(
        &mut self,
        message: &OutboundMessage<'_>,
    ) -> Result<Vec<RcptResult>, SessionError> {
        if !self.reusable {
            return Err(SessionError::Protocol(
                "connection is no longer reusable (RSET failed or the server is closing)".into(),
            ));
        }
        let mut results: Vec<Option<RcptResult>> = vec![None; message.recipients.len()];
        self.took_message = vec![false; message.recipients.len()];
        if let Some(reply) = self.refuse_locally(message) {
            return Ok(vec![RcptResult::failed(reply); message.recipients.len()]);
        }
        for (result, rcpt) in results.iter_mut().zip(message.recipients) {
            if has_control(rcpt) {
                *result = Some(RcptResult::failed(local::bad_recipient()));
            }
        }
        if results.iter().all(Option::is_some) {
            return Ok(finish(results));
        }
        match self.transaction(message, &mut results).await {
            Ok(()) => Ok(finish(results)),
            Err(e) => {
                self.reusable = false;
                Err(e.into())
            }
        }
    }

    /// A reply for every recipient when the message cannot go to any server.
    fn refuse_locally(&self, message: &OutboundMessage<'_>) -> Option<Reply> {
        if has_control(message.sender) {
            return Some(local::bad_sender());
        }
        self.refusal(message)
    }

    /// Why *this* server cannot take the message as it is, decided from its EHLO
    /// extensions without sending anything: another host of the same destination may
    /// well take it, so the caller tries the next one. `None`: go ahead.
    ///
    /// SMTPUTF8 needed (a non-ASCII address or header field, RFC 6531 3.2) but not
    /// offered → 553 5.6.7; octets above 127 and no 8BITMIME → 554 5.6.3 (RFC 6152 3: we
    /// never downgrade); larger than the announced SIZE → 552 5.3.4 (RFC 1870 6). What
    /// the client merely declared (`smtputf8`, `eight_bit`) never causes a refusal.
    pub fn refusal(&self, message: &OutboundMessage<'_>) -> Option<Reply> {
        let ext = &self.extensions;
        if needs_smtputf8(message) && !ext.smtputf8 {
            return Some(local::no_smtputf8(&self.server_name));
        }
        if needs_8bitmime(message) && !ext.eight_bit_mime {
            return Some(local::no_8bitmime(&self.server_name));
        }
        let size = message.content.wire_size;
        match ext.size {
            Some(limit) if limit > 0 && size > limit => {
                Some(local::too_big(&self.server_name, size, limit))
            }
            _ => None,
        }
    }

    /// MAIL, RCPT.., DATA, body, final dot; fills `results` for every recipient still
    /// `None`. With PIPELINING (RFC 2920 3.1) MAIL, the RCPTs and DATA go in one write and
    /// the replies are read in order; without it, one command at a time.
    async fn transaction(
        &mut self,
        message: &OutboundMessage<'_>,
        results: &mut [Option<RcptResult>],
    ) -> Result<(), Failure> {
        let t = self.command_timeout;
        let mail = self.mail_command(message);
        let pending: Vec<usize> = (0..results.len())
            .filter(|&i| results[i].is_none())
            .collect();
        let rcpt = |i: usize| ClientCommand::Rcpt(&message.recipients[i]);
        let pipelining = self.extensions.pipelining;

        // MAIL
        let mail_reply = if pipelining {
            let mut batch = Vec::with_capacity(pending.len() + 2);
            batch.push(mail);
            batch.extend(pending.iter().map(|&i| rcpt(i)));
            batch.push(ClientCommand::Data);
            self.io.commands(&batch, t).await?;
            self.io.read_reply(t, "MAIL").await?
        } else {
            self.io.exchange(mail, t).await?
        };
        if self.closing(&mail_reply, results) {
            return Ok(());
        }
        let mail_ok = match mail_reply.code {
            200..=299 => true,
            400..=599 => false,
            _ => return Err(unexpected("MAIL", &mail_reply)),
        };
        if !mail_ok {
            // RFC 5321 4.1.1.2: a refused MAIL refuses the whole transaction; every
            // recipient gets that reply.
            for &i in &pending {
                results[i] = Some(outcome(&mail_reply));
            }
        }

        // RCPT: with PIPELINING their replies are waiting; without, only after MAIL 250.
        let mut accepted = Vec::with_capacity(pending.len());
        if pipelining || mail_ok {
            for &i in &pending {
                let reply = if pipelining {
                    self.io.read_reply(t, "RCPT").await?
                } else {
                    self.io.exchange(rcpt(i), t).await?
                };
                if !mail_ok {
                    continue; // the RCPTs of a refused MAIL get 503s; MAIL's reply stands
                }
                if self.closing(&reply, results) {
                    return Ok(());
                }
                match reply.code {
                    200..=299 => accepted.push(i),
                    400..=599 => results[i] = Some(outcome(&reply)),
                    _ => return Err(unexpected("RCPT", &reply)),
                }
            }
        }
        let go = mail_ok && !accepted.is_empty();

        // DATA
        let data_reply = if pipelining {
            Some(self.io.read_reply(t, "DATA").await?)
        } else if go {
            Some(self.io.exchange(ClientCommand::Data, t).await?)
        } else {
            None
        };
        let Some(data_reply) = data_reply else {
            return self.reset().await;
        };
        if self.closing(&data_reply, results) {
            return Ok(());
        }
        match (data_reply.code, go) {
            (354, true) => {}
            (354, false) => {
                // RFC 2920 3.1: a server must refuse DATA when no RCPT succeeded, but one
                // said 354. An empty message ends the data phase; its reply is
                // meaningless (it has no recipients), then RSET.
                tracing::debug!(server = %self.server_name, "354 without recipients; sending an empty message");
                self.io.send_body(b"", t, "DATA").await?;
                let _ignored = self.io.read_reply(self.data_timeout, "final dot").await?;
                return self.reset().await;
            }
            (400..=599, true) => {
                for &i in &accepted {
                    results[i] = Some(outcome(&data_reply));
                }
                return self.reset().await;
            }
            (400..=599, false) => return self.reset().await,
            _ => return Err(unexpected("DATA", &data_reply)),
        }

        // The message, then the final dot's reply (RFC 5321 4.1.1.4): it decides for
        // every recipient accepted at RCPT.
        self.io
            .send_body(message.body, self.command_timeout, "message body")
            .await?;
        for &i in &accepted {
            self.took_message[i] = true;
        }
        let final_reply = self.io.read_reply(self.data_timeout, "final dot").await?;
        match final_reply.code {
            200..=299 | 400..=599 => {
                let result = match final_reply.code {
                    200..=299 => RcptResult::delivered(final_reply.clone()),
                    _ => outcome(&final_reply),
                };
                for &i in &accepted {
                    results[i] = Some(result.clone());
                }
                if final_reply.code == 421 {
                    self.reusable = false;
                }
                // The transaction is over either way (4.1.1.4): no RSET needed.
                Ok(())
            }
            _ => Err(unexpected("final dot", &final_reply)),
        }
    }

    /// MAIL FROM and the parameters this message and this server call for.
    fn mail_command<'m>(&self, message: &OutboundMessage<'m>) -> ClientCommand<'m> {
        let params = MailParams {
            // RFC 1870 6: announce the size wherever SIZE is offered.
            size: self.extensions.size.map(|_| message.content.wire_size),
            // RFC 6152 2: declare what the content is, not what the client said it was.
            eight_bit_mime: needs_8bitmime(message),
            // A declared SMTPUTF8 is kept where the server offers it (the next hop may
            // care for other reasons), and dropped where it does not but nothing needs it.
            smtputf8: needs_smtputf8(message) || (message.smtputf8 && self.extensions.smtputf8),
        };
        ClientCommand::Mail {
            sender: message.sender,
            params,
        }
    }

    /// 421 (RFC 5321 3.8): the server is closing the connection. Every recipient without
    /// an outcome is deferred with that reply; the connection is not used again.
    fn closing(&mut self, reply: &Reply, results: &mut [Option<RcptResult>]) -> bool {
        if reply.code != 421 {
            return false;
        }
        self.reusable = false;
        for result in results.iter_mut().filter(|r| r.is_none()) {
            *result = Some(RcptResult::deferred(reply.clone()));
        }
        true
    }

    /// RSET after a transaction that did not reach the final dot. If it does not get a
    /// 2xx, the session state is unknown and the connection is not reused. An I/O error
    /// here does not undo the outcomes already recorded.
    async fn reset(&mut self) -> Result<(), Failure> {
        match self
            .io
            .exchange(ClientCommand::Rset, self.command_timeout)
            .await
        {
            Ok(reply) if (200..300).contains(&reply.code) => {}
            Ok(reply) => {
                tracing::debug!(server = %self.server_name, reply = %reply, "RSET refused; connection not reused");
                self.reusable = false;
            }
            Err(e) => {
                tracing::debug!(server = %self.server_name, error = ?e, "RSET failed; connection not reused");
                self.reusable = false;
            }
        }
        Ok(())
    }

    /// QUIT, wait briefly for 221, close (TLS close_notify included). Errors are ignored:
    /// every outcome is already known.
    pub async fn quit(mut self) {
        let t = self.command_timeout.min(QUIT_TIMEOUT);
        if self.io.exchange(ClientCommand::Quit, t).await.is_ok() {
            self.io.shutdown(t).await;
        }
    }

    /// True once STARTTLS succeeded.
    pub fn is_tls(&self) -> bool {
        self.io.is_tls()
    }

    /// Per recipient of the last [`Connection::send`], in the order of its recipients:
    /// true when the message body was sent for it, so its result is the final dot's
    /// reply. A deferred recipient with `false` was refused before any data (4xx or 421
    /// at MAIL, RCPT or DATA), so another host may be tried for it at once.
    pub fn took_message(&self) -> &[bool] {
        &self.took_message
    }

    /// False when the connection must not be used for another `send` (a failed RSET, a
    /// 421, an error); the caller then drops it.
    pub fn is_reusable(&self) -> bool {
        self.reusable
    }

    pub fn peer(&self) -> SocketAddr {
        self.peer
    }

    pub fn server_name(&self) -> &str {
        &self.server_name
    }

    /// The extensions of the last EHLO (after STARTTLS: the one over TLS).
    pub fn extensions(&self) -> &Extensions {
        &self.extensions
    }
}

/// 4xx → deferred, 5xx → failed (RFC 5321 4.2.1).
fn outcome(reply: &Reply) -> RcptResult {
    if reply.is_transient() {
        RcptResult::deferred(reply.clone())
    } else {
        RcptResult::failed(reply.clone())
    }
}

fn unexpected(phase: &str, reply: &Reply) -> Failure {
    Failure::Protocol(format!("unexpected reply to {phase}: {reply}"))
}

fn finish(results: Vec<Option<RcptResult>>) -> Vec<RcptResult> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| RcptResult::deferred(local::no_outcome())))
        .collect()
}

fn has_control(address: &str) -> bool {
    address.bytes().any(|b| b < b' ' || b == 0x7f)
}

/// SMTPUTF8 is needed for a non-ASCII address (RFC 6531 3.2, 3.4) or a header field in
/// UTF-8 (RFC 6532 3). What the client declared does not matter here.
fn needs_smtputf8(message: &OutboundMessage<'_>) -> bool {
    !message.sender.is_ascii()
        || message.recipients.iter().any(|r| !r.is_ascii())
        || message.content.utf8_header
}

/// 8BITMIME is needed when the content has an octet above 127 (RFC 6152 2), whatever
/// BODY= the client declared.
fn needs_8bitmime(message: &OutboundMessage<'_>) -> bool {
    message.content.eight_bit
}

/// Whether the header section (up to the first empty line) holds non-ASCII text that is
/// valid UTF-8: an internationalised header (RFC 6532). Other 8-bit octets there are
/// legacy raw 8-bit and need only 8BITMIME.
fn utf8_in_header(body: &[u8]) -> bool {
    let end = if body.starts_with(b"\r\n") {
        0 // no header section at all
    } else {
        memchr::memmem::find(body, b"\r\n\r\n").map_or(body.len(), |i| i + 2)
    };
    let header = &body[..end];
    !header.is_ascii() && std::str::from_utf8(header).is_ok()
}

/// The name to verify and send as SNI: a DNS name, or an IP address (an address literal
/// "[192.0.2.1]" or "[IPv6:2001:db8::1]" is accepted too).
fn tls_server_name(name: &str) -> Option<ServerName<'static>> {
    let name = name
        .strip_prefix('[')
        .and_then(|n| n.strip_suffix(']'))
        .unwrap_or(name);
    let name = match name.get(..5) {
        Some(tag) if tag.eq_ignore_ascii_case("IPv6:") => &name[5..],
        _ => name,
    };
    if let Ok(ip) = name.parse::<IpAddr>() {
        return Some(ServerName::IpAddress(ip.into()));
    }
    ServerName::try_from(name).ok().map(|n| n.to_owned())
}

#[cfg(test)]
mod tests;
