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

use std::borrow::Cow;
use std::fmt;
use std::io;
use std::net::{IpAddr, SocketAddr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use postern_smtp::{Reply, Status};
use rustls::pki_types::ServerName;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;

use super::tls;

/// Longest reply line we accept, CRLF included. RFC 5321 4.5.3.1.5 allows 512; servers
/// exceed that with long EHLO keywords and texts, so we are generous but bounded.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one (multi-line) reply.
pub const MAX_REPLY_LINES: usize = 100;
/// How much we ask the socket for at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Message data is written in chunks of about this size: few system calls and TLS
/// records, and memory stays bounded whatever the message size.
const WRITE_CHUNK: usize = 64 * 1024;
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
}

/// The outcome for one recipient: the remote's reply, or one we made up (its text then
/// ends in "(local)").
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum RcptResult {
    /// 2xx to the final dot: the next hop has it.
    Delivered(Reply),
    /// 4xx somewhere: try again later.
    Deferred(Reply),
    /// 5xx somewhere: bounce.
    Failed(Reply),
}

impl RcptResult {
    pub fn reply(&self) -> &Reply {
        match self {
            RcptResult::Delivered(r) | RcptResult::Deferred(r) | RcptResult::Failed(r) => r,
        }
    }
}

/// The connection could not be used; the caller tries the next host or defers.
#[derive(thiserror::Error, Debug)]
pub enum ConnectError {
    /// TCP connect, read or write failed.
    #[error("I/O error: {0}")]
    Io(#[from] io::Error),
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
    Io(#[from] io::Error),
    #[error("timeout during {0}")]
    Timeout(&'static str),
    /// A malformed or unexpected reply, or `send` on a connection that is no longer
    /// reusable (see [`Connection::is_reusable`]).
    #[error("protocol error: {0}")]
    Protocol(String),
}

/// What the server said it supports in its last EHLO reply (RFC 5321 4.1.1.1). Empty
/// after HELO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870: `Some(limit)` when SIZE is advertised; `Some(0)` means advertised
    /// without a fixed limit (RFC 1870 4).
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 4954: the mechanisms offered, upper case.
    pub auth: Vec<String>,
    /// RFC 3030 (noted, not used: we send DATA).
    pub chunking: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
}

impl Extensions {
    /// Reads the keyword lines of an EHLO reply (the first line is the server's name).
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            // "AUTH=LOGIN PLAIN" is the pre-standard form some servers still send.
            let keyword = match keyword.strip_prefix("AUTH=") {
                Some(first) => {
                    add_mechanisms(&mut ext.auth, std::iter::once(first));
                    "AUTH".to_string()
                }
                None => keyword,
            };
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                // A missing or unreadable limit means "no fixed limit" (RFC 1870 4).
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "AUTH" => add_mechanisms(&mut ext.auth, words),
                "CHUNKING" => ext.chunking = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                _ => {}
            }
        }
        ext
    }
}

fn add_mechanisms<'a>(list: &mut Vec<String>, words: impl Iterator<Item = &'a str>) {
    for word in words {
        let mechanism = word.to_ascii_uppercase();
        if !mechanism.is_empty() && !list.contains(&mechanism) {
            list.push(mechanism);
        }
    }
}

// --- replies --------------------------------------------------------------------------

/// Result of [`parse_reply`] on the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedReply {
    /// One whole reply, and how many input bytes it took.
    Complete(Reply, usize),
    /// The reply is not complete yet: read more.
    Partial,
}

/// Why bytes from the server are not a reply.
#[derive(thiserror::Error, Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    #[error("reply line longer than {MAX_REPLY_LINE} octets")]
    LineTooLong,
    #[error("reply longer than {MAX_REPLY_LINES} lines")]
    TooManyLines,
    #[error("malformed reply line {0:?}")]
    Malformed(String),
    #[error("reply code changes within a multi-line reply ({0} then {1})")]
    CodeChanged(u16, u16),
}

/// Parses the first reply in `input` (RFC 5321 4.2, 4.2.1):
///
/// ```text
/// Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF
/// ```
///
/// The code's first digit must be 2-5 and its second 0-5 (4.2.1); every line of a
/// multi-line reply must carry the same code. A bare LF is accepted as a line end (we
/// are the client: being lenient about the server's line ends smuggles nothing). An
/// enhanced status code (RFC 3463, RFC 2034) at the start of the first line, of the same
/// class as the reply code, becomes `Reply::status` and is removed from every line that
/// repeats it. Text is decoded lossily as UTF-8 and control characters become '?'.
///
/// Limits are enforced here: a line without its LF within [`MAX_REPLY_LINE`] octets, or a
/// reply of more than [`MAX_REPLY_LINES`] lines, is an error even before it is complete.
pub fn parse_reply(input: &[u8]) -> Result<ParsedReply, ReplyError> {
    let mut pos = 0;
    let mut code = None;
    let mut texts: Vec<&[u8]> = Vec::new();
    loop {
        let rest = &input[pos..];
        let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
        let Some(lf) = window.iter().position(|&b| b == b'\n') else {
            return if rest.len() >= MAX_REPLY_LINE {
                Err(ReplyError::LineTooLong)
            } else {
                Ok(ParsedReply::Partial)
            };
        };
        let line = &rest[..lf];
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        pos += lf + 1;
        let (this_code, last, text) = parse_reply_line(line)?;
        match code {
            None => code = Some(this_code),
            Some(first) if first != this_code => {
                return Err(ReplyError::CodeChanged(first, this_code));
            }
            Some(_) => {}
        }
        texts.push(text);
        if last {
            return Ok(ParsedReply::Complete(build_reply(this_code, &texts), pos));
        }
        if texts.len() >= MAX_REPLY_LINES {
            return Err(ReplyError::TooManyLines);
        }
    }
}

/// One line without its line end: (code, is it the last line, text).
fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, &[u8]), ReplyError> {
    let malformed = || ReplyError::Malformed(clean_text(&line[..line.len().min(80)]));
    let [a, b, c, rest @ ..] = line else {
        return Err(malformed());
    };
    if !(b'2'..=b'5').contains(a) || !(b'0'..=b'5').contains(b) || !c.is_ascii_digit() {
        return Err(malformed());
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    match rest {
        [] => Ok((code, true, b"")),
        [b' ', text @ ..] => Ok((code, true, text)),
        [b'-', text @ ..] => Ok((code, false, text)),
        _ => Err(malformed()),
    }
}

fn build_reply(code: u16, texts: &[&[u8]]) -> Reply {
    let class = (code / 100) as u8;
    let status = texts.first().and_then(|t| parse_status(t, class));
    let lines = texts
        .iter()
        .map(|text| {
            let text = match status {
                Some((_, prefix)) if text.starts_with(prefix) => strip_status(text, prefix.len()),
                _ => text,
            };
            Cow::Owned(clean_text(text))
        })
        .collect();
    Reply {
        code,
        status: status.map(|(s, _)| s),
        lines,
    }
}

/// "class.subject.detail" (RFC 3463 2: 1-3 digits for subject and detail) followed by
/// a space or the end of the text; the class must match the reply code's.
fn parse_status(text: &[u8], class: u8) -> Option<(Status, &[u8])> {
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let token = &text[..end];
    let mut parts = token.split(|&b| b == b'.');
    let mut number = |max_len: usize| -> Option<u16> {
        let part = parts.next()?;
        if part.is_empty() || part.len() > max_len || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (c, s, d) = (number(1)?, number(3)?, number(3)?);
    if parts.next().is_some() || c != u16::from(class) {
        return None;
    }
    Some((Status(class, s, d), token))
}

/// The text after a status prefix of `len` octets and the space that follows it.
fn strip_status(text: &[u8], len: usize) -> &[u8] {
    match &text[len..] {
        [] => b"",
        [b' ', rest @ ..] => rest,
        _ => text, // a longer token that merely starts like the status: keep it
    }
}

/// Reply text fit for logs and bounces: lossy UTF-8, control characters as '?'.
fn clean_text(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
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

// --- the stream -------------------------------------------------------------------------

/// Plain TCP, or TLS after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<TlsStream<TcpStream>>),
    /// Only while the TCP stream is handed to the TLS handshake; a failed handshake
    /// leaves the connection here, and it is then dropped.
    Detached,
}

fn detached() -> io::Error {
    io::Error::new(
        io::ErrorKind::NotConnected,
        "stream lost in a failed TLS handshake",
    )
}

impl AsyncRead for Stream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }
}

impl AsyncWrite for Stream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_flush(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
            Stream::Detached => Poll::Ready(Ok(())),
        }
    }
}

/// Why an exchange with the server failed; becomes a [`ConnectError`] or a
/// [`SessionError`] depending on when it happened.
#[derive(Debug)]
enum Failure {
    Io(io::Error),
    Timeout(&'static str),
    Protocol(String),
}

impl From<Failure> for ConnectError {
    fn from(f: Failure) -> ConnectError {
        match f {
            Failure::Io(e) => ConnectError::Io(e),
            Failure::Timeout(phase) => ConnectError::Timeout(phase),
            Failure::Protocol(m) => ConnectError::Protocol(m),
        }
    }
}

impl From<Failure> for SessionError {
    fn from(f: Failure) -> SessionError {
        match f {
            Failure::Io(e) => SessionError::Io(e),
            Failure::Timeout(phase) => SessionError::Timeout(phase),
            Failure::Protocol(m) => SessionError::Protocol(m),
        }
    }
}

/// The stream and the bytes read from it but not yet parsed.
struct Io {
    stream: Stream,
    buf: Vec<u8>,
}

impl Io {
    /// Reads one reply; the whole reply, not each read, must arrive within `timeout`
    /// (a server trickling one byte a minute cannot hold us).
    async fn read_reply(
        &mut self,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, Failure> {
        let reply = tokio::time::timeout(timeout, self.read_reply_untimed())
            .await
            .map_err(|_| Failure::Timeout(phase))??;
        tracing::trace!(phase, reply = %reply, "smtp client <<<");
        Ok(reply)
    }

    async fn read_reply_untimed(&mut self) -> Result<Reply, Failure> {
        loop {
            match parse_reply(&self.buf) {
                Ok(ParsedReply::Complete(reply, used)) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(ParsedReply::Partial) => {}
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
            // `read_buf` appends to the spare capacity, so a timeout that cancels this
            // future mid-read leaves `buf` consistent.
            self.buf.reserve(READ_CHUNK);
            let n = self
                .stream
                .read_buf(&mut self.buf)
                .await
                .map_err(Failure::Io)?;
            if n == 0 {
                return Err(Failure::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed by the server",
                )));
            }
        }
    }

    /// Writes and flushes. The server must not have said anything we did not ask for:
    /// every reply to earlier commands has been read by now (RFC 2920 3.1 keeps replies
    /// in command order), so leftover bytes mean a confused or hostile server.
    async fn write(
        &mut self,
        bytes: &[u8],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), Failure> {
        if !self.buf.is_empty() {
            return Err(Failure::Protocol(format!(
                "server sent {} unexpected octets before {phase}",
                self.buf.len()
            )));
        }
        let write = async {
            self.stream.write_all(bytes).await?;
            self.stream.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| Failure::Timeout(phase))?
            .map_err(Failure::Io)
    }

    /// Sends one command line (CRLF added), logging it as `shown`.
    async fn command(
        &mut self,
        line: &str,
        shown: &str,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), Failure> {
        tracing::trace!(phase, command = shown, "smtp client >>>");
        let mut bytes = Vec::with_capacity(line.len() + 2);
        bytes.extend_from_slice(line.as_bytes());
        bytes.extend_from_slice(b"\r\n");
        self.write(&bytes, timeout, phase).await
    }

    /// A command and its reply.
    async fn exchange(
        &mut self,
        line: &str,
        timeout: Duration,
        phase: &'static str,
    ) -> Result<Reply, Failure> {
        self.command(line, line, timeout, phase).await?;
        self.read_reply(timeout, phase).await
    }
}

// --- dot-stuffing -----------------------------------------------------------------------

/// Dot-stuffs message text as it is written (RFC 5321 4.5.2), chunk by chunk.
///
/// A dot is doubled at the start of every line; a "line start" is the start of the body
/// or any octet after LF. The spool holds CRLF lines only, so this is the RFC rule; if a
/// bare LF ever slipped through, doubling the dot after it as well means a next hop that
/// (wrongly) ends lines at LF can never see an end of data we did not send (SMTP
/// smuggling).
struct DotStuffer {
    at_line_start: bool,
    /// The last two octets seen, to know whether the body ended with CRLF.
    tail: [u8; 2],
    seen: usize,
}

impl DotStuffer {
    fn new() -> DotStuffer {
        DotStuffer {
            at_line_start: true,
            tail: [0; 2],
            seen: 0,
        }
    }

    fn stuff(&mut self, input: &[u8], out: &mut Vec<u8>) {
        let mut copied = 0;
        for (i, &b) in input.iter().enumerate() {
            if self.at_line_start && b == b'.' {
                out.extend_from_slice(&input[copied..i]);
                out.push(b'.');
                copied = i;
            }
            self.at_line_start = b == b'\n';
        }
        out.extend_from_slice(&input[copied..]);
        match input {
            [] => {}
            [only] => self.tail = [self.tail[1], *only],
            [.., a, b] => self.tail = [*a, *b],
        }
        self.seen += input.len();
    }

    /// The end of data: CRLF first if the body did not end with one, then ".CRLF".
    fn finish(&self, out: &mut Vec<u8>) {
        if self.seen > 0 && self.tail != *b"\r\n" {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
    }
}

/// The size the server will count (RFC 1870 3: the message with CRLFs, without
/// stuffing and without the final dot).
fn wire_size(body: &[u8]) -> u64 {
    let extra = if body.is_empty() || body.ends_with(b"\r\n") {
        0
    } else {
        2
    };
    body.len() as u64 + extra
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
            io: Io {
                stream: Stream::Plain(tcp),
                buf: Vec::new(),
            },
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
        let ehlo = self
            .io
            .exchange(&format!("EHLO {helo_name}"), t, "EHLO")
            .await?;
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
        let helo = self
            .io
            .exchange(&format!("HELO {helo_name}"), t, "HELO")
            .await?;
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
        let reply = self.io.exchange("STARTTLS", t, "STARTTLS").await?;
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
        if !self.io.buf.is_empty() {
            return Err(ConnectError::Protocol(
                "server sent data after its STARTTLS reply (command injection?)".into(),
            ));
        }
        let Stream::Plain(tcp) = std::mem::replace(&mut self.io.stream, Stream::Detached) else {
            return Err(ConnectError::Protocol("STARTTLS on a TLS session".into()));
        };
        let handshake = TlsConnector::from(tls_config).connect(name, tcp);
        let tls = match tokio::time::timeout(t, handshake).await {
            Ok(Ok(tls)) => tls,
            Ok(Err(e)) => return Err(ConnectError::TlsHandshake(e.to_string())),
            Err(_) => return Err(ConnectError::TlsHandshake(format!("timed out after {t:?}"))),
        };
        self.io.stream = Stream::Tls(Box::new(tls));
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
            let token = format!("\0{}\0{}", credentials.user, credentials.password);
            let line = format!("AUTH PLAIN {}", BASE64.encode(token));
            self.io
                .command(&line, "AUTH PLAIN <redacted>", t, "AUTH")
                .await?;
            self.io.read_reply(t, "AUTH").await?
        } else if mechanisms.iter().any(|m| m == "LOGIN") {
            let reply = self.io.exchange("AUTH LOGIN", t, "AUTH").await?;
            if reply.code != 334 {
                return Err(ConnectError::Auth(reply));
            }
            let user = BASE64.encode(&credentials.user);
            self.io.command(&user, "<user name>", t, "AUTH").await?;
            let reply = self.io.read_reply(t, "AUTH").await?;
            if reply.code != 334 {
                return Err(ConnectError::Auth(reply));
            }
            let password = BASE64.encode(&credentials.password);
            self.io.command(&password, "<redacted>", t, "AUTH").await?;
            self.io.read_reply(t, "AUTH").await?
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
            return Ok(vec![RcptResult::Failed(reply); message.recipients.len()]);
        }
        for (result, rcpt) in results.iter_mut().zip(message.recipients) {
            if has_control(rcpt) {
                *result = Some(RcptResult::Failed(local::bad_recipient()));
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
        let size = wire_size(message.body);
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
        let rcpt = |i: usize| format!("RCPT TO:<{}>", message.recipients[i]);
        let pipelining = self.extensions.pipelining;

        // MAIL
        let mail_reply = if pipelining {
            let mut batch = String::with_capacity(64 * (pending.len() + 2));
            for line in std::iter::once(mail)
                .chain(pending.iter().map(|&i| rcpt(i)))
                .chain(std::iter::once("DATA".to_string()))
            {
                tracing::trace!(command = %line, "smtp client >>>");
                batch.push_str(&line);
                batch.push_str("\r\n");
            }
            self.io.write(batch.as_bytes(), t, "MAIL").await?;
            self.io.read_reply(t, "MAIL").await?
        } else {
            self.io.exchange(&mail, t, "MAIL").await?
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
                    self.io.exchange(&rcpt(i), t, "RCPT").await?
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
            Some(self.io.exchange("DATA", t, "DATA").await?)
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
                self.io.command(".", ".", t, "DATA").await?;
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
        self.send_body(message.body).await?;
        for &i in &accepted {
            self.took_message[i] = true;
        }
        let final_reply = self.io.read_reply(self.data_timeout, "final dot").await?;
        match final_reply.code {
            200..=299 | 400..=599 => {
                let result = match final_reply.code {
                    200..=299 => RcptResult::Delivered(final_reply.clone()),
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

    fn mail_command(&self, message: &OutboundMessage<'_>) -> String {
        let mut mail = format!("MAIL FROM:<{}>", message.sender);
        if self.extensions.size.is_some() {
            mail.push_str(&format!(" SIZE={}", wire_size(message.body)));
        }
        // RFC 6152 2: declare what the content is, not what the client said it was.
        if needs_8bitmime(message) {
            mail.push_str(" BODY=8BITMIME");
        }
        // A declared SMTPUTF8 is kept where the server offers it (the next hop may care
        // for other reasons), and dropped where it does not but nothing needs it.
        if needs_smtputf8(message) || (message.smtputf8 && self.extensions.smtputf8) {
            mail.push_str(" SMTPUTF8");
        }
        mail
    }

    /// 421 (RFC 5321 3.8): the server is closing the connection. Every recipient without
    /// an outcome is deferred with that reply; the connection is not used again.
    fn closing(&mut self, reply: &Reply, results: &mut [Option<RcptResult>]) -> bool {
        if reply.code != 421 {
            return false;
        }
        self.reusable = false;
        for result in results.iter_mut().filter(|r| r.is_none()) {
            *result = Some(RcptResult::Deferred(reply.clone()));
        }
        true
    }

    /// The body, dot-stuffed, in chunks of about [`WRITE_CHUNK`]; the final dot goes in
    /// the same write as the last chunk.
    async fn send_body(&mut self, body: &[u8]) -> Result<(), Failure> {
        let mut stuffer = DotStuffer::new();
        let mut out = Vec::with_capacity(WRITE_CHUNK + WRITE_CHUNK / 8);
        for chunk in body.chunks(WRITE_CHUNK) {
            stuffer.stuff(chunk, &mut out);
            if out.len() >= WRITE_CHUNK {
                self.io
                    .write(&out, self.command_timeout, "message body")
                    .await?;
                out.clear();
            }
        }
        stuffer.finish(&mut out);
        tracing::trace!(
            octets = body.len(),
            "smtp client >>> message body and final dot"
        );
        self.io
            .write(&out, self.command_timeout, "message body")
            .await
    }

    /// RSET after a transaction that did not reach the final dot. If it does not get a
    /// 2xx, the session state is unknown and the connection is not reused. An I/O error
    /// here does not undo the outcomes already recorded.
    async fn reset(&mut self) -> Result<(), Failure> {
        match self.io.exchange("RSET", self.command_timeout, "RSET").await {
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
        if self.io.exchange("QUIT", t, "QUIT").await.is_ok() {
            let _ = tokio::time::timeout(t, self.io.stream.shutdown()).await;
        }
    }

    /// True once STARTTLS succeeded.
    pub fn is_tls(&self) -> bool {
        matches!(self.io.stream, Stream::Tls(_))
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
        RcptResult::Deferred(reply.clone())
    } else {
        RcptResult::Failed(reply.clone())
    }
}

fn unexpected(phase: &str, reply: &Reply) -> Failure {
    Failure::Protocol(format!("unexpected reply to {phase}: {reply}"))
}

fn finish(results: Vec<Option<RcptResult>>) -> Vec<RcptResult> {
    results
        .into_iter()
        .map(|r| r.unwrap_or_else(|| RcptResult::Deferred(local::no_outcome())))
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
        || utf8_in_header(message.body)
}

/// 8BITMIME is needed when the content has an octet above 127 (RFC 6152 2), whatever
/// BODY= the client declared.
fn needs_8bitmime(message: &OutboundMessage<'_>) -> bool {
    !message.body.is_ascii()
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
mod tests {
    use super::*;

    fn complete(input: &[u8]) -> (Reply, usize) {
        match parse_reply(input) {
            Ok(ParsedReply::Complete(reply, used)) => (reply, used),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    #[test]
    fn reply_parsing_table() {
        // input, code, status, lines, octets used
        type Case = (
            &'static [u8],
            u16,
            Option<Status>,
            &'static [&'static str],
            usize,
        );
        let st = |c, s, d| Some(Status(c, s, d));
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (b"250 OK\r\n", 250, None, &["OK"], 8),
            (b"250\r\n", 250, None, &[""], 5),
            (b"250 \r\n", 250, None, &[""], 6),
            (b"220 mx.test ESMTP\n", 220, None, &["mx.test ESMTP"], 18),
            (b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n", 250, None, &["mx.test", "PIPELINING", "SIZE 100"], 43),
            (b"250-\r\n250 last\r\n", 250, None, &["", "last"], 16),
            (b"550 5.1.1 User unknown\r\n", 550, st(5, 1, 1), &["User unknown"], 24),
            (b"550-5.1.1 first\r\n550 5.1.1 second\r\n", 550, st(5, 1, 1), &["first", "second"], 35),
            (b"550-5.1.1 first\r\n550 second\r\n", 550, st(5, 1, 1), &["first", "second"], 29),
            (b"250 2.0.0\r\n", 250, st(2, 0, 0), &[""], 11),
            (b"451 4.7.123 greylisted\r\n", 451, st(4, 7, 123), &["greylisted"], 24),
            // the class must match the code, and the token must be exactly x.y.z
            (b"550 4.1.1 odd\r\n", 550, None, &["4.1.1 odd"], 15),
            (b"250 2.0.0ok\r\n", 250, None, &["2.0.0ok"], 13),
            (b"250 2.0.1000 x\r\n", 250, None, &["2.0.1000 x"], 16),
            (b"250 2.0 x\r\n", 250, None, &["2.0 x"], 11),
            // pipelined replies: only the first is taken
            (b"250 OK\r\n354 go\r\n", 250, None, &["OK"], 8),
            // hostile text is made harmless
            (b"250 a\x1bb\x00c\r\n", 250, None, &["a?b?c"], 11),
            (b"250 \xff\xfe\r\n", 250, None, &["\u{fffd}\u{fffd}"], 8),
            (b"250 a\rb\r\n", 250, None, &["a?b"], 9),
        ];
        for &(input, code, status, lines, used) in cases {
            let (reply, n) = complete(input);
            let what = String::from_utf8_lossy(input);
            assert_eq!(reply.code, code, "{what:?}");
            assert_eq!(reply.status, status, "{what:?}");
            assert_eq!(reply.lines, lines, "{what:?}");
            assert_eq!(n, used, "{what:?}");
        }
    }

    #[test]
    fn incomplete_replies_ask_for_more() {
        for input in [
            &b""[..],
            b"2",
            b"250",
            b"250 OK",
            b"250 OK\r",
            b"250-a\r\n",
            b"250-a\r\n250 b",
        ] {
            assert_eq!(
                parse_reply(input),
                Ok(ParsedReply::Partial),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for input in [
            &b"25O OK\r\n"[..],
            b"099 x\r\n",
            b"150 x\r\n",
            b"600 x\r\n",
            b"260 x\r\n",
            b"250_x\r\n",
            b"25\r\n",
            b"\r\n",
            b"hello\r\n",
            b" 250 x\r\n",
            b"250-a\r\nxyz\r\n",
        ] {
            assert!(
                matches!(parse_reply(input), Err(ReplyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeChanged(250, 251))
        );
    }

    #[test]
    fn reply_limits() {
        // A line may be MAX_REPLY_LINE octets including CRLF, not one more.
        let mut line = b"250 ".to_vec();
        line.resize(MAX_REPLY_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(complete(&line).1, MAX_REPLY_LINE);
        let mut long = b"250 ".to_vec();
        long.resize(MAX_REPLY_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
        // Detected before the line ends: a server cannot make us buffer without bound.
        let mut endless = b"250 ".to_vec();
        endless.resize(MAX_REPLY_LINE - 1, b'x');
        assert_eq!(parse_reply(&endless), Ok(ParsedReply::Partial));
        endless.push(b'x');
        assert_eq!(parse_reply(&endless), Err(ReplyError::LineTooLong));

        let many = |continuations: usize| {
            let mut r = b"250-x\r\n".repeat(continuations);
            r.extend_from_slice(b"250 end\r\n");
            r
        };
        assert_eq!(
            complete(&many(MAX_REPLY_LINES - 1)).0.lines.len(),
            MAX_REPLY_LINES
        );
        assert_eq!(
            parse_reply(&many(MAX_REPLY_LINES)),
            Err(ReplyError::TooManyLines)
        );
        assert_eq!(
            parse_reply(&b"250-x\r\n".repeat(MAX_REPLY_LINES)),
            Err(ReplyError::TooManyLines)
        );
    }

    fn dot_stuff(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut stuffer = DotStuffer::new();
        stuffer.stuff(body, &mut out);
        stuffer.finish(&mut out);
        out
    }

    #[test]
    fn dot_stuffing_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"hello\r\n", b"hello\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
            (b"a.\r\nb .\r\n", b"a.\r\nb .\r\n.\r\n"),
            (b"no line end", b"no line end\r\n.\r\n"),
            (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
            // a bare LF still starts a line for stuffing (see DotStuffer)
            (b"a\n.\n", b"a\n..\n\r\n.\r\n"),
            (b"a\r", b"a\r\r\n.\r\n"),
        ];
        for &(body, wire) in cases {
            assert_eq!(
                String::from_utf8_lossy(&dot_stuff(body)),
                String::from_utf8_lossy(wire),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn dot_stuffing_does_not_depend_on_chunk_boundaries() {
        let body = b".a\r\n..\r\nb\r\n.\r\n.x\r\n";
        let whole = dot_stuff(body);
        for split in 0..=body.len() {
            let mut out = Vec::new();
            let mut stuffer = DotStuffer::new();
            stuffer.stuff(&body[..split], &mut out);
            stuffer.stuff(&body[split..], &mut out);
            stuffer.finish(&mut out);
            assert_eq!(out, whole, "split at {split}");
        }
        // and byte by byte, including the CRLF test at the end
        for body in [&b"x\r\n"[..], b"x\r", b"x\n", b"x"] {
            let mut out = Vec::new();
            let mut stuffer = DotStuffer::new();
            for b in body.chunks(1) {
                stuffer.stuff(b, &mut out);
            }
            stuffer.finish(&mut out);
            assert_eq!(out, dot_stuff(body));
        }
    }

    #[test]
    fn size_counts_the_added_line_end() {
        assert_eq!(wire_size(b""), 0);
        assert_eq!(wire_size(b"ab\r\n"), 4);
        assert_eq!(wire_size(b"ab"), 4);
    }

    #[test]
    fn ehlo_extensions() {
        let (reply, _) = complete(
            b"250-mx.test greets you\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n250-8bitmime\r\n\
              250-SMTPUTF8\r\n250-STARTTLS\r\n250-AUTH PLAIN login\r\n250-AUTH=LOGIN CRAM-MD5\r\n\
              250-CHUNKING\r\n250-X-UNKNOWN stuff\r\n250 ENHANCEDSTATUSCODES\r\n",
        );
        let ext = Extensions::from_ehlo(&reply);
        assert_eq!(
            ext,
            Extensions {
                pipelining: true,
                size: Some(35_882_577),
                eight_bit_mime: true,
                smtputf8: true,
                starttls: true,
                auth: vec!["PLAIN".into(), "LOGIN".into(), "CRAM-MD5".into()],
                chunking: true,
                enhanced_status_codes: true,
            }
        );
        // SIZE without a number: advertised, no fixed limit; the greeting line is no keyword
        let (reply, _) = complete(b"250-PIPELINING\r\n250 SIZE\r\n");
        let ext = Extensions::from_ehlo(&reply);
        assert_eq!((ext.pipelining, ext.size), (false, Some(0)));
    }

    #[test]
    fn tls_server_names() {
        let ip = |s: &str| Some(ServerName::IpAddress(s.parse::<IpAddr>().unwrap().into()));
        assert_eq!(
            tls_server_name("mx.test"),
            Some(ServerName::try_from("mx.test").unwrap())
        );
        assert_eq!(
            tls_server_name("mx.test."),
            Some(ServerName::try_from("mx.test").unwrap())
        );
        assert_eq!(tls_server_name("127.0.0.1"), ip("127.0.0.1"));
        assert_eq!(tls_server_name("[127.0.0.1]"), ip("127.0.0.1"));
        assert_eq!(tls_server_name("[IPv6:2001:db8::1]"), ip("2001:db8::1"));
        assert_eq!(tls_server_name("::1"), ip("::1"));
        assert_eq!(tls_server_name("bad name"), None);
        assert_eq!(tls_server_name(""), None);
    }

    #[test]
    fn credentials_debug_hides_the_password() {
        let c = Credentials {
            user: "relay".into(),
            password: "hunter2".into(),
        };
        let shown = format!("{c:?}");
        assert!(
            shown.contains("relay") && !shown.contains("hunter2"),
            "{shown}"
        );
        let mut config = ClientConfig::new("client.test");
        config.auth = Some(c);
        assert!(!format!("{config:?}").contains("hunter2"));
    }
}

/// Whole conversations against the testkit's sink (a real SMTP server on loopback).
#[cfg(test)]
mod conversations {
    use super::*;
    use postern_testkit::{Sink, SinkConfig, TestCa, TlsIdentity};

    const WAIT: Duration = Duration::from_secs(10);

    fn config(tls: TlsPolicy) -> ClientConfig {
        ClientConfig {
            connect_timeout: Duration::from_secs(5),
            command_timeout: Duration::from_secs(10),
            data_timeout: Duration::from_secs(10),
            tls,
            ..ClientConfig::new("client.test")
        }
    }

    fn rcpts(list: &[&str]) -> Vec<String> {
        list.iter().map(|s| s.to_string()).collect()
    }

    fn message<'a>(recipients: &'a [String], body: &'a [u8]) -> OutboundMessage<'a> {
        OutboundMessage {
            sender: "sender@client.test",
            recipients,
            body,
            smtputf8: false,
            eight_bit: false,
        }
    }

    async fn connect(sink: &Sink, config: &ClientConfig) -> Connection {
        Connection::connect(sink.addr(), "mx.test", config)
            .await
            .unwrap_or_else(|e| panic!("connect: {e}; transcript {:?}", sink.transcript()))
    }

    fn codes(results: &[RcptResult]) -> Vec<(char, u16)> {
        results
            .iter()
            .map(|r| match r {
                RcptResult::Delivered(r) => ('D', r.code),
                RcptResult::Deferred(r) => ('T', r.code),
                RcptResult::Failed(r) => ('F', r.code),
            })
            .collect()
    }

    fn sent_mail(sink: &Sink) -> bool {
        sink.transcript().iter().any(|l| l.starts_with("MAIL"))
    }

    #[tokio::test]
    async fn pipelined_delivery_with_a_550_and_a_451() {
        let sink = Sink::start(SinkConfig::default().with_rcpt_reply(|addr| {
            match addr {
                "bad@dest.test" => "550 5.1.1 No such user",
                "later@dest.test" => "451 4.3.0 Try later",
                _ => "250 2.1.5 Ok",
            }
            .to_string()
        }));
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        assert!(conn.extensions().pipelining && !conn.is_tls());
        let to = rcpts(&["good@dest.test", "bad@dest.test", "later@dest.test"]);
        let body = b"Subject: hi\r\n\r\n.leading dot\r\n..two\r\nend\r\n";
        let results = conn.send(&message(&to, body)).await.unwrap();
        assert_eq!(codes(&results), [('D', 250), ('F', 550), ('T', 451)]);
        assert_eq!(results[1].reply().status, Some(Status(5, 1, 1)));
        assert_eq!(results[1].reply().lines, ["No such user"]);
        // Only the accepted recipient had the message sent for it; the 451 one may go to
        // another host at once.
        assert_eq!(conn.took_message(), [true, false, false]);
        assert!(conn.is_reusable());
        conn.quit().await;

        let msgs = sink.wait_for(1, WAIT);
        assert_eq!(msgs[0].rcpt_to, ["good@dest.test"]);
        assert_eq!(msgs[0].mail_from, "sender@client.test");
        assert_eq!(msgs[0].data, body, "dot-stuffing must be transparent");
        assert_eq!(msgs[0].helo, "client.test");
        assert_eq!(
            sink.transcript(),
            [
                "EHLO client.test",
                "MAIL FROM:<sender@client.test>",
                "RCPT TO:<good@dest.test>",
                "RCPT TO:<bad@dest.test>",
                "RCPT TO:<later@dest.test>",
                "DATA",
                "QUIT"
            ]
        );
    }

    #[tokio::test]
    async fn without_pipelining_and_without_final_crlf() {
        let sink = Sink::start(SinkConfig {
            pipelining: false,
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["a@dest.test", "b@dest.test"]);
        let results = conn
            .send(&message(&to, b"no final line end"))
            .await
            .unwrap();
        assert_eq!(codes(&results), [('D', 250), ('D', 250)]);
        conn.quit().await;
        assert_eq!(sink.wait_for(1, WAIT)[0].data, b"no final line end\r\n");
    }

    #[tokio::test]
    async fn rejected_mail_and_no_accepted_recipient_keep_the_connection() {
        for pipelining in [true, false] {
            let sink = Sink::start(
                SinkConfig {
                    pipelining,
                    ..SinkConfig::default()
                }
                .with_mail_reply(|from| {
                    if from == "blocked@client.test" {
                        "550 5.7.1 Sender blocked".into()
                    } else {
                        "250 2.1.0 Ok".into()
                    }
                })
                .with_rcpt_reply(|_| "550 5.1.1 No".into()),
            );
            let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
            let to = rcpts(&["a@dest.test", "b@dest.test"]);
            let mut msg = message(&to, b"x\r\n");
            msg.sender = "blocked@client.test";
            let results = conn.send(&msg).await.unwrap();
            assert_eq!(codes(&results), [('F', 550), ('F', 550)]);
            assert_eq!(results[0].reply().lines, ["Sender blocked"]);
            assert!(conn.is_reusable());

            msg.sender = "ok@client.test";
            let results = conn.send(&msg).await.unwrap();
            assert_eq!(results[1].reply().lines, ["No"]);
            assert!(conn.is_reusable());
            conn.quit().await;
            let transcript = sink.transcript();
            assert_eq!(
                transcript.iter().filter(|l| *l == "RSET").count(),
                2,
                "{transcript:?}"
            );
            // Without PIPELINING nothing is sent after a refused MAIL, and no DATA ever.
            let rcpt_lines = transcript.iter().filter(|l| l.starts_with("RCPT")).count();
            assert_eq!(rcpt_lines, if pipelining { 4 } else { 2 }, "{transcript:?}");
            assert_eq!(sink.messages().len(), 0);
        }
    }

    #[tokio::test]
    async fn data_rejection_applies_to_accepted_recipients() {
        let sink = Sink::start(
            SinkConfig::default()
                .with_rcpt_reply(|a| {
                    if a.starts_with("bad") {
                        "550 5.1.1 No"
                    } else {
                        "250 2.1.5 Ok"
                    }
                    .into()
                })
                .with_data_reply(|m| {
                    if m.data_str().contains("virus") {
                        "554 5.7.1 Rejected".into()
                    } else {
                        "452 4.3.1 Disk full".into()
                    }
                }),
        );
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["a@dest.test", "bad@dest.test", "c@dest.test"]);
        let results = conn.send(&message(&to, b"a virus\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('F', 554), ('F', 550), ('F', 554)]);
        let results = conn.send(&message(&to, b"clean\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('T', 452), ('F', 550), ('T', 452)]);
        assert!(conn.is_reusable());
        conn.quit().await;
    }

    #[tokio::test]
    async fn helo_fallback() {
        let sink = Sink::start(SinkConfig {
            ehlo: false,
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::Opportunistic)).await;
        assert_eq!(conn.extensions(), &Extensions::default());
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, b"hello\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        let transcript = sink.transcript();
        assert_eq!(transcript[..2], ["EHLO client.test", "HELO client.test"]);
        assert_eq!(sink.wait_for(1, WAIT)[0].mail_params, Vec::<String>::new());
    }

    #[tokio::test]
    async fn eight_bit_to_a_host_without_8bitmime_fails_cleanly() {
        let sink = Sink::start(SinkConfig {
            eight_bit_mime: false,
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["a@dest.test", "b@dest.test"]);
        let mut msg = message(&to, "caf\u{e9}\r\n".as_bytes());
        msg.eight_bit = true;
        let results = conn.send(&msg).await.unwrap();
        assert_eq!(codes(&results), [('F', 554), ('F', 554)]);
        assert_eq!(results[0].reply().status, Some(Status(5, 6, 3)));
        assert!(results[0].reply().one_line().ends_with("(local)"));
        assert!(!sent_mail(&sink));
        // The connection is untouched and still good for 7-bit mail, even when the
        // client declared it 8-bit: the bytes decide (RFC 6152 2).
        let mut msg = message(&to, b"plain\r\n");
        msg.eight_bit = true;
        assert!(conn.refusal(&msg).is_none());
        let results = conn.send(&msg).await.unwrap();
        assert_eq!(codes(&results), [('D', 250), ('D', 250)]);
        assert_eq!(conn.took_message(), [true, true]);
        conn.quit().await;
        assert_eq!(sink.wait_for(1, WAIT)[0].mail_params, Vec::<String>::new());
    }

    #[tokio::test]
    async fn eight_bit_with_8bitmime_declares_it() {
        let sink = Sink::start(SinkConfig {
            size: Some(1_000_000),
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["j\u{f6}rg@d\u{e9}st.test"]);
        let body = "caf\u{e9}\r\n".as_bytes();
        let mut msg = message(&to, body);
        msg.eight_bit = true;
        let results = conn.send(&msg).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        let received = &sink.wait_for(1, WAIT)[0];
        // A non-ASCII address implies SMTPUTF8 even when the flag was not set.
        assert_eq!(
            received.mail_params,
            ["SIZE=7", "BODY=8BITMIME", "SMTPUTF8"]
        );
        assert_eq!(received.data, body);
    }

    #[tokio::test]
    async fn smtputf8_needed_but_not_offered() {
        let sink = Sink::start(SinkConfig {
            smtputf8: false,
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["\u{fc}ser@dest.test"]);
        let results = conn.send(&message(&to, b"x\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('F', 553)]);
        assert_eq!(results[0].reply().status, Some(Status(5, 6, 7)));
        // A UTF-8 header field needs it too (RFC 6532), ...
        let to = rcpts(&["a@dest.test"]);
        let header = "Subject: \u{e9}t\u{e9}\r\n\r\nbody\r\n";
        let results = conn.send(&message(&to, header.as_bytes())).await.unwrap();
        assert_eq!(codes(&results), [('F', 553)]);
        assert!(!sent_mail(&sink));
        // ... a UTF-8 body does not (that is 8BITMIME's business), and neither does a
        // declared SMTPUTF8 that nothing needs (RFC 6531 3.2): sent without it.
        let mut msg = message(&to, "Subject: x\r\n\r\n\u{e9}t\u{e9}\r\n".as_bytes());
        msg.smtputf8 = true;
        assert!(conn.refusal(&msg).is_none());
        let results = conn.send(&msg).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        assert_eq!(sink.wait_for(1, WAIT)[0].mail_params, ["BODY=8BITMIME"]);
    }

    #[test]
    fn utf8_header_detection() {
        assert!(utf8_in_header("Subject: \u{e9}\r\n\r\nx\r\n".as_bytes()));
        assert!(!utf8_in_header("Subject: x\r\n\r\n\u{e9}\r\n".as_bytes()));
        assert!(
            !utf8_in_header(b"Subject: \xe9t\xe9\r\n\r\n"),
            "Latin-1 is not UTF-8"
        );
        assert!(
            !utf8_in_header("\r\n\u{e9}\r\n".as_bytes()),
            "no header section"
        );
        assert!(
            utf8_in_header("Subject: \u{e9}".as_bytes()),
            "header only, no body"
        );
    }

    #[tokio::test]
    async fn size_limit_below_the_message() {
        let sink = Sink::start(SinkConfig {
            size: Some(100),
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        assert_eq!(conn.extensions().size, Some(100));
        let to = rcpts(&["a@dest.test", "b@dest.test"]);
        let big = vec![b'x'; 200];
        let results = conn.send(&message(&to, &big)).await.unwrap();
        assert_eq!(codes(&results), [('F', 552), ('F', 552)]);
        assert_eq!(results[0].reply().status, Some(Status(5, 3, 4)));
        assert!(!sent_mail(&sink));
        let results = conn.send(&message(&to, b"small\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('D', 250), ('D', 250)]);
        conn.quit().await;
        assert_eq!(sink.wait_for(1, WAIT)[0].mail_params, ["SIZE=7"]);
    }

    #[tokio::test]
    async fn one_connection_for_two_messages() {
        let sink = Sink::start(SinkConfig::default());
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["a@dest.test"]);
        for body in [&b"first\r\n"[..], b"second\r\n"] {
            let results = conn.send(&message(&to, body)).await.unwrap();
            assert_eq!(codes(&results), [('D', 250)]);
        }
        conn.quit().await;
        let msgs = sink.wait_for(2, WAIT);
        assert_eq!(sink.connections(), 1);
        assert_eq!(
            (msgs[0].data_str().as_str(), msgs[1].data_str().as_str()),
            ("first\r\n", "second\r\n")
        );
        assert_eq!(msgs[1].connection, 0);
        // no RSET after a successful transaction
        assert!(!sink.transcript().iter().any(|l| l == "RSET"));
    }

    #[tokio::test]
    async fn large_body_crosses_write_chunks() {
        let sink = Sink::start(SinkConfig::default());
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let mut body = Vec::new();
        for i in 0..20_000 {
            body.extend_from_slice(format!(".line {i} with a leading dot\r\n").as_bytes());
        }
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, &body)).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        assert!(sink.wait_for(1, WAIT)[0].data == body);
    }

    #[tokio::test]
    async fn refused_greeting() {
        let sink = Sink::start(SinkConfig {
            greeting: "554 5.7.1 Go away".into(),
            ..SinkConfig::default()
        });
        let err = Connection::connect(sink.addr(), "mx.test", &config(TlsPolicy::None))
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::Greeting(r) if r.code == 554),
            "{err}"
        );
    }

    #[tokio::test]
    async fn opportunistic_starttls_with_a_self_signed_certificate() {
        let sink = Sink::start(SinkConfig {
            tls: Some(TlsIdentity::self_signed(&["somewhere.else"])),
            ..SinkConfig::default()
        });
        let mut conn = connect(&sink, &config(TlsPolicy::Opportunistic)).await;
        assert!(conn.is_tls());
        assert!(
            !conn.extensions().starttls,
            "extensions are those of the EHLO over TLS"
        );
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, b"secret\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        assert!(sink.wait_for(1, WAIT)[0].tls);
        assert_eq!(
            sink.transcript()[..3],
            ["EHLO client.test", "STARTTLS", "EHLO client.test"]
        );
    }

    #[tokio::test]
    async fn no_tls_policy_never_starts_tls() {
        let sink = Sink::start(SinkConfig {
            tls: Some(TlsIdentity::self_signed(&["mx.test"])),
            ..SinkConfig::default()
        });
        let conn = connect(&sink, &config(TlsPolicy::None)).await;
        assert!(!conn.is_tls() && conn.extensions().starttls);
        conn.quit().await;
        assert!(!sink.transcript().iter().any(|l| l == "STARTTLS"));
    }

    /// A sink with a certificate from a test CA, and a required-TLS policy trusting it.
    fn ca_setup(names: &[&str]) -> (Sink, TlsPolicy, tempfile::TempDir) {
        let ca = TestCa::new();
        let sink = Sink::start(SinkConfig {
            tls: Some(ca.issue(names)),
            ..SinkConfig::default()
        });
        let dir = tempfile::tempdir().unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        let policy = TlsPolicy::Required(tls::required_config(Some(&ca_file)).unwrap());
        (sink, policy, dir)
    }

    #[tokio::test]
    async fn required_tls_with_the_test_ca() {
        let (sink, policy, _dir) = ca_setup(&["mx.test", "127.0.0.1"]);
        let config = config(policy);
        let mut conn = connect(&sink, &config).await;
        assert!(conn.is_tls());
        let to = rcpts(&["a@dest.test"]);
        assert_eq!(
            codes(&conn.send(&message(&to, b"x\r\n")).await.unwrap()),
            [('D', 250)]
        );
        conn.quit().await;
        // The IP of [ip]:port is verified as an IP address.
        let conn = Connection::connect(sink.addr(), "127.0.0.1", &config)
            .await
            .unwrap();
        assert!(conn.is_tls());
        conn.quit().await;
        assert!(sink.wait_for(1, WAIT)[0].tls);
    }

    #[tokio::test]
    async fn required_tls_with_the_wrong_name_fails_without_plaintext() {
        let (sink, policy, _dir) = ca_setup(&["mx.test"]);
        let config = config(policy);
        for name in ["other.test", "127.0.0.1"] {
            let err = Connection::connect(sink.addr(), name, &config)
                .await
                .unwrap_err();
            assert!(
                matches!(err, ConnectError::TlsHandshake(_)),
                "{name}: {err}"
            );
        }
        assert!(!sent_mail(&sink), "{:?}", sink.transcript());
    }

    #[tokio::test]
    async fn required_tls_rejects_an_untrusted_certificate() {
        let (_sink, policy, _dir) = ca_setup(&["mx.test"]);
        let stranger = Sink::start(SinkConfig {
            tls: Some(TlsIdentity::self_signed(&["mx.test"])),
            ..SinkConfig::default()
        });
        let err = Connection::connect(stranger.addr(), "mx.test", &config(policy))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::TlsHandshake(_)), "{err}");
        assert!(!sent_mail(&stranger));
    }

    #[tokio::test]
    async fn required_tls_without_starttls_offered() {
        let (_ca_sink, policy, _dir) = ca_setup(&["mx.test"]);
        let sink = Sink::start(SinkConfig::default());
        let err = Connection::connect(sink.addr(), "mx.test", &config(policy))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::TlsUnavailable), "{err}");
        assert!(!sent_mail(&sink));
        assert_eq!(sink.transcript().last().map(String::as_str), Some("QUIT"));
    }

    fn with_auth(policy: TlsPolicy, user: &str, password: &str) -> ClientConfig {
        ClientConfig {
            auth: Some(Credentials {
                user: user.into(),
                password: password.into(),
            }),
            ..config(policy)
        }
    }

    fn auth_sink(tls: bool) -> Sink {
        Sink::start(SinkConfig {
            tls: tls.then(|| TlsIdentity::self_signed(&["mx.test"])),
            auth: Some(("relay".into(), "s3cret".into())),
            require_auth: true,
            ..SinkConfig::default()
        })
    }

    #[tokio::test]
    async fn auth_plain_over_tls() {
        let sink = auth_sink(true);
        let config = with_auth(TlsPolicy::Opportunistic, "relay", "s3cret");
        let mut conn = connect(&sink, &config).await;
        let to = rcpts(&["a@dest.test"]);
        assert_eq!(
            codes(&conn.send(&message(&to, b"x\r\n")).await.unwrap()),
            [('D', 250)]
        );
        conn.quit().await;
        let received = &sink.wait_for(1, WAIT)[0];
        assert_eq!(received.auth.as_deref(), Some("relay"));
        assert!(
            sink.transcript()
                .iter()
                .any(|l| l.starts_with("AUTH PLAIN "))
        );
    }

    #[tokio::test]
    async fn auth_with_a_wrong_password() {
        let sink = auth_sink(true);
        let config = with_auth(TlsPolicy::Opportunistic, "relay", "wrong");
        let err = Connection::connect(sink.addr(), "mx.test", &config)
            .await
            .unwrap_err();
        assert!(
            matches!(&err, ConnectError::Auth(r) if r.code == 535),
            "{err}"
        );
        assert!(!sent_mail(&sink));
    }

    #[tokio::test]
    async fn credentials_are_never_sent_without_tls() {
        // The sink offers AUTH in plaintext; we must not use it.
        let sink = auth_sink(false);
        for policy in [TlsPolicy::None, TlsPolicy::Opportunistic] {
            let config = with_auth(policy, "relay", "s3cret");
            let err = Connection::connect(sink.addr(), "mx.test", &config)
                .await
                .unwrap_err();
            assert!(matches!(err, ConnectError::AuthUnavailable), "{err}");
        }
        let transcript = sink.transcript();
        assert!(
            !transcript
                .iter()
                .any(|l| l.to_ascii_uppercase().starts_with("AUTH")),
            "{transcript:?}"
        );
        assert!(!transcript.iter().any(|l| l.contains("s3cret")));
    }

    #[tokio::test]
    async fn send_after_a_broken_connection_is_an_error() {
        let sink = Sink::start(
            SinkConfig::default().with_data_reply(|_| "421 4.3.2 Shutting down".into()),
        );
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["a@dest.test", "b@dest.test"]);
        let results = conn.send(&message(&to, b"x\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('T', 421), ('T', 421)]);
        assert!(!conn.is_reusable());
        assert!(matches!(
            conn.send(&message(&to, b"x\r\n")).await,
            Err(SessionError::Protocol(_))
        ));
    }

    #[tokio::test]
    async fn control_characters_in_addresses_are_refused_locally() {
        let sink = Sink::start(SinkConfig::default());
        let mut conn = connect(&sink, &config(TlsPolicy::None)).await;
        let to = rcpts(&["ok@dest.test", "evil@dest.test>\r\nRSET"]);
        let results = conn.send(&message(&to, b"x\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('D', 250), ('F', 553)]);
        conn.quit().await;
        assert!(!sink.transcript().iter().any(|l| l.contains("evil")));
    }

    type Log = Arc<std::sync::Mutex<Vec<String>>>;

    /// A hostile or broken peer the sink cannot imitate: writes `greeting`, then one
    /// scripted reply per command line read, and closes when the script is exhausted.
    async fn scripted(greeting: &'static [u8], replies: Vec<&'static [u8]>) -> (SocketAddr, Log) {
        scripted_tls(greeting, replies, None).await
    }

    /// Like [`scripted`]; with `tls`, a 220 reply to STARTTLS is followed by a TLS
    /// handshake with that identity and the script goes on over TLS.
    async fn scripted_tls(
        greeting: &'static [u8],
        replies: Vec<&'static [u8]>,
        tls: Option<TlsIdentity>,
    ) -> (SocketAddr, Log) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let seen: Log = Arc::default();
        let log = seen.clone();
        tokio::spawn(async move {
            let (mut stream, _) = listener.accept().await.unwrap();
            if stream.write_all(greeting).await.is_err() {
                return;
            }
            let mut replies = replies.into_iter();
            let Some(stream) = play(stream, &mut replies, &log, tls.is_some()).await else {
                return;
            };
            let acceptor = tokio_rustls::TlsAcceptor::from(tls.unwrap().server_config());
            if let Ok(stream) = acceptor.accept(stream).await {
                play(stream, &mut replies, &log, false).await;
            }
        });
        (addr, seen)
    }

    /// Plays the script; returns the stream after a 220 to STARTTLS when `until_tls`.
    async fn play<S: AsyncRead + AsyncWrite + Unpin>(
        stream: S,
        replies: &mut std::vec::IntoIter<&'static [u8]>,
        log: &Log,
        until_tls: bool,
    ) -> Option<S> {
        use tokio::io::AsyncBufReadExt;
        let mut reader = tokio::io::BufReader::new(stream);
        for reply in replies.by_ref() {
            let mut line = String::new();
            if reader.read_line(&mut line).await.ok()? == 0 {
                return None;
            }
            let line = line.trim_end().to_string();
            log.lock().unwrap().push(line.clone());
            reader.get_mut().write_all(reply).await.ok()?;
            if until_tls && line == "STARTTLS" && reply.starts_with(b"220") {
                return Some(reader.into_inner());
            }
        }
        None
    }

    fn quick(tls: TlsPolicy) -> ClientConfig {
        ClientConfig {
            command_timeout: Duration::from_millis(500),
            ..config(tls)
        }
    }

    const EHLO_STARTTLS: &[u8] = b"250-peer.test\r\n250 STARTTLS\r\n";

    #[tokio::test]
    async fn data_injected_after_the_starttls_reply_is_refused() {
        let (addr, _) = scripted(
            b"220 peer.test\r\n",
            vec![EHLO_STARTTLS, b"220 go\r\n250-PIPELINING\r\n"],
        )
        .await;
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::Opportunistic))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn a_failed_opportunistic_handshake_is_distinguishable() {
        let (addr, _) = scripted(b"220 peer.test\r\n", vec![EHLO_STARTTLS, b"220 go\r\n"]).await;
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::Opportunistic))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::TlsHandshake(_)), "{err}");
    }

    #[tokio::test]
    async fn opportunistic_continues_in_plaintext_after_a_refused_starttls() {
        let (addr, seen) = scripted(
            b"220 peer.test\r\n",
            vec![
                EHLO_STARTTLS,
                b"454 4.7.0 TLS not available\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let conn = Connection::connect(addr, "peer.test", &quick(TlsPolicy::Opportunistic))
            .await
            .unwrap();
        assert!(!conn.is_tls());
        conn.quit().await;
        assert_eq!(
            *seen.lock().unwrap(),
            ["EHLO client.test", "STARTTLS", "QUIT"]
        );
    }

    #[tokio::test]
    async fn malformed_and_slow_replies() {
        let (addr, _) = scripted(b"hello there\r\n", vec![]).await;
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Protocol(_)), "{err}");

        let (addr, _) = scripted(b"220-peer.test\r\n", vec![]).await;
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap_err();
        assert!(
            matches!(err, ConnectError::Io(_) | ConnectError::Timeout("greeting")),
            "{err}"
        );

        let (addr, _) = scripted(b"220 peer.test\r\n", vec![b"250-peer.test\r\n251 odd\r\n"]).await;
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Protocol(_)), "{err}");
    }

    #[tokio::test]
    async fn greeting_timeout() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let _hold = tokio::spawn(async move {
            let accepted = listener.accept().await;
            tokio::time::sleep(Duration::from_secs(5)).await;
            drop(accepted);
        });
        let err = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::Timeout("greeting")), "{err}");
    }

    #[tokio::test]
    async fn pipelined_354_without_recipients_gets_a_lone_dot_then_rset() {
        let (addr, seen) = scripted(
            b"220 peer.test\r\n",
            vec![
                b"250-peer.test\r\n250 PIPELINING\r\n",
                b"250 2.1.0 ok\r\n",
                b"550 5.1.1 no\r\n",
                b"354 go ahead anyway\r\n",
                b"554 5.5.1 no recipients\r\n",
                b"250 2.0.0 reset\r\n",
                b"221 bye\r\n",
            ],
        )
        .await;
        let mut conn = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap();
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, b"never sent\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('F', 550)]);
        assert!(conn.is_reusable());
        conn.quit().await;
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "EHLO client.test",
                "MAIL FROM:<sender@client.test>",
                "RCPT TO:<a@dest.test>",
                "DATA",
                ".",
                "RSET",
                "QUIT"
            ]
        );
    }

    #[tokio::test]
    async fn a_failed_rset_makes_the_connection_unusable() {
        let (addr, _) = scripted(
            b"220 peer.test\r\n",
            vec![b"250 peer.test\r\n", b"451 4.3.0 busy\r\n", b"500 what\r\n"],
        )
        .await;
        let mut conn = Connection::connect(addr, "peer.test", &quick(TlsPolicy::None))
            .await
            .unwrap();
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, b"x\r\n")).await.unwrap();
        assert_eq!(codes(&results), [('T', 451)]);
        assert!(!conn.is_reusable());
        assert!(conn.send(&message(&to, b"x\r\n")).await.is_err());
    }

    #[tokio::test]
    async fn auth_login_when_plain_is_not_offered() {
        let (addr, seen) = scripted_tls(
            b"220 peer.test\r\n",
            vec![
                EHLO_STARTTLS,
                b"220 go\r\n",
                b"250-peer.test\r\n250 AUTH LOGIN CRAM-MD5\r\n",
                b"334 VXNlcm5hbWU6\r\n",
                b"334 UGFzc3dvcmQ6\r\n",
                b"235 2.7.0 ok\r\n",
                b"221 bye\r\n",
            ],
            Some(TlsIdentity::self_signed(&["peer.test"])),
        )
        .await;
        let config = ClientConfig {
            command_timeout: Duration::from_secs(5),
            ..with_auth(TlsPolicy::Opportunistic, "relay", "s3cret")
        };
        let conn = Connection::connect(addr, "peer.test", &config)
            .await
            .unwrap();
        assert!(conn.is_tls());
        assert_eq!(conn.extensions().auth, ["LOGIN", "CRAM-MD5"]);
        conn.quit().await;
        let user = BASE64.encode("relay");
        let password = BASE64.encode("s3cret");
        assert_eq!(
            *seen.lock().unwrap(),
            [
                "EHLO client.test",
                "STARTTLS",
                "EHLO client.test",
                "AUTH LOGIN",
                &user,
                &password,
                "QUIT"
            ]
        );
    }

    #[tokio::test]
    async fn auth_without_a_supported_mechanism() {
        let (addr, seen) = scripted_tls(
            b"220 peer.test\r\n",
            vec![
                EHLO_STARTTLS,
                b"220 go\r\n",
                b"250-peer.test\r\n250 AUTH CRAM-MD5\r\n",
                b"221 bye\r\n",
            ],
            Some(TlsIdentity::self_signed(&["peer.test"])),
        )
        .await;
        let config = with_auth(TlsPolicy::Opportunistic, "relay", "s3cret");
        let err = Connection::connect(addr, "peer.test", &config)
            .await
            .unwrap_err();
        assert!(matches!(err, ConnectError::AuthUnavailable), "{err}");
        assert_eq!(
            *seen.lock().unwrap(),
            ["EHLO client.test", "STARTTLS", "EHLO client.test", "QUIT"]
        );
    }
}
