//! The connection's I/O: the stream (plain TCP, or TLS after STARTTLS), buffered reads
//! of replies and writes of commands and the message body, each bounded in time.
//!
//! The wire format is `postern_smtp::client`'s (the reply parser, the command builder,
//! dot-stuffing); this file only moves its bytes. Trust: the reply parser bounds what a
//! server can make us buffer ([`postern_smtp::client::MAX_REPLY_SIZE`] per reply), and
//! bytes the server sends without being asked are refused before the next write.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use postern_smtp::Reply;
use postern_smtp::client::{ClientCommand, ParsedReply, ReplyParser, Stuffed};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use super::{ConnectError, SessionError};

/// How much we ask the socket for at a time.
const READ_CHUNK: usize = 8 * 1024;
/// Message data is written in chunks of about this size: few system calls and TLS
/// records, and memory stays bounded whatever the message size.
const WRITE_CHUNK: usize = 64 * 1024;
/// At most this many parts of a body go in one vectored write. Every part but the
/// copied runs is at least [`SHORT_PIECE`] long, so a write still carries about
/// [`WRITE_CHUNK`] octets whatever the body.
const MAX_SLICES: usize = 256;
/// Pieces of a stuffed body shorter than this are copied (gathered with their short
/// neighbours into one part) rather than sent from where they are.
const SHORT_PIECE: usize = 512;

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

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            Stream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            Stream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
            Stream::Detached => Poll::Ready(Err(detached())),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            Stream::Plain(s) => s.is_write_vectored(),
            Stream::Tls(s) => s.is_write_vectored(),
            Stream::Detached => false,
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
pub(super) enum Failure {
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

/// The stream, the bytes read from it but not yet parsed, and the reply parser's state
/// over them.
pub(super) struct Io {
    stream: Stream,
    buf: Vec<u8>,
    parser: ReplyParser,
    /// Command lines on their way out (kept between commands: no allocation per line).
    out: Vec<u8>,
}

impl Io {
    pub(super) fn new(tcp: TcpStream) -> Io {
        Io {
            stream: Stream::Plain(tcp),
            buf: Vec::new(),
            parser: ReplyParser::new(),
            out: Vec::new(),
        }
    }

    /// True once STARTTLS succeeded.
    pub(super) fn is_tls(&self) -> bool {
        matches!(self.stream, Stream::Tls(_))
    }

    /// The server sent octets we have not parsed yet (after the last complete reply).
    pub(super) fn has_unread(&self) -> bool {
        !self.buf.is_empty()
    }

    /// Hands the TCP stream over for a TLS handshake; `None` on a TLS session. Until
    /// [`Io::set_tls`], every read and write fails.
    pub(super) fn take_plain(&mut self) -> Option<TcpStream> {
        match std::mem::replace(&mut self.stream, Stream::Detached) {
            Stream::Plain(tcp) => Some(tcp),
            other => {
                self.stream = other;
                None
            }
        }
    }

    pub(super) fn set_tls(&mut self, tls: TlsStream<TcpStream>) {
        self.stream = Stream::Tls(Box::new(tls));
    }

    /// Closes the stream (TLS close_notify included) within `timeout`; errors ignored.
    pub(super) async fn shutdown(&mut self, timeout: Duration) {
        let _ = tokio::time::timeout(timeout, self.stream.shutdown()).await;
    }

    /// Reads one reply; the whole reply, not each read, must arrive within `timeout`
    /// (a server trickling one byte a minute cannot hold us).
    pub(super) async fn read_reply(
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
            // The parser remembers how far it got in `buf`, so each read costs only the
            // new octets.
            match self.parser.parse(&self.buf) {
                Ok(ParsedReply::Complete(reply, used)) => {
                    self.buf.drain(..used);
                    return Ok(reply);
                }
                Ok(ParsedReply::Partial) => {}
                Err(e) => return Err(Failure::Protocol(e.to_string())),
            }
            // `read_buf` appends to the spare capacity, so a timeout that cancels this
            // future mid-read leaves `buf` (and the parser's state over it) consistent.
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
        stream: &mut Stream,
        unread: &[u8],
        bytes: &[u8],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), Failure> {
        let mut one = [io::IoSlice::new(bytes)];
        Io::write_vectored(stream, unread, &mut one, timeout, phase).await
    }

    /// Sends command lines in one write (several only with PIPELINING, RFC 2920 3.1);
    /// the phase is the first command's verb.
    pub(super) async fn commands(
        &mut self,
        commands: &[ClientCommand<'_>],
        timeout: Duration,
    ) -> Result<(), Failure> {
        let phase = commands.first().map_or("command", ClientCommand::verb);
        self.out.clear();
        for command in commands {
            tracing::trace!(phase, command = %command, "smtp client >>>");
            command.write_to(&mut self.out);
        }
        let Io {
            stream, buf, out, ..
        } = self;
        Io::write(stream, buf, out, timeout, phase).await
    }

    /// Sends one command line (its `Display` is what the trace log shows).
    pub(super) async fn command(
        &mut self,
        command: ClientCommand<'_>,
        timeout: Duration,
    ) -> Result<(), Failure> {
        self.commands(&[command], timeout).await
    }

    /// A command and its reply.
    pub(super) async fn exchange(
        &mut self,
        command: ClientCommand<'_>,
        timeout: Duration,
    ) -> Result<Reply, Failure> {
        self.command(command, timeout).await?;
        self.read_reply(timeout, command.verb()).await
    }

    /// The body, dot-stuffed (RFC 5321 4.5.2), in vectored writes of about
    /// [`WRITE_CHUNK`] octets each: the long pieces of [`Stuffed`] straight from the
    /// message's own buffer, the short ones (lines that start with a dot, close together)
    /// gathered into one scratch buffer, so that a body of dotted short lines does not
    /// turn into many tiny writes and TLS records. The final dot goes in the same write
    /// as the last piece. An empty body is the lone ".CRLF" of an empty message.
    pub(super) async fn send_body(
        &mut self,
        body: &[u8],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), Failure> {
        /// Where a part of the next write is: in the body, or copied into `scratch`.
        enum Part<'a> {
            Body(&'a [u8]),
            Copied(std::ops::Range<usize>),
        }
        let mut pieces = Stuffed::new(body);
        // What did not fit in the previous write.
        let mut rest: &[u8] = &[];
        let mut parts: Vec<Part<'_>> = Vec::new();
        let mut scratch: Vec<u8> = Vec::new();
        loop {
            let mut len = 0;
            while parts.len() < MAX_SLICES && len < WRITE_CHUNK {
                let piece = if rest.is_empty() {
                    match pieces.next() {
                        Some(piece) => piece,
                        None => break,
                    }
                } else {
                    std::mem::take(&mut rest)
                };
                let (now, later) = piece.split_at(piece.len().min(WRITE_CHUNK - len));
                rest = later;
                len += now.len();
                if now.len() >= SHORT_PIECE {
                    parts.push(Part::Body(now));
                    continue;
                }
                let from = scratch.len();
                scratch.extend_from_slice(now);
                match parts.last_mut() {
                    Some(Part::Copied(run)) => run.end = scratch.len(),
                    _ => parts.push(Part::Copied(from..scratch.len())),
                }
            }
            if parts.is_empty() {
                break;
            }
            let mut slices: Vec<io::IoSlice<'_>> = parts
                .iter()
                .map(|part| match part {
                    Part::Body(bytes) => io::IoSlice::new(bytes),
                    Part::Copied(run) => io::IoSlice::new(&scratch[run.clone()]),
                })
                .collect();
            Io::write_vectored(&mut self.stream, &self.buf, &mut slices, timeout, phase).await?;
            parts.clear();
            scratch.clear();
        }
        tracing::trace!(
            octets = body.len(),
            "smtp client >>> message body and final dot"
        );
        Ok(())
    }

    /// Writes all of `slices` (emptied as they go out) within `timeout`; see [`Io::write`].
    async fn write_vectored(
        stream: &mut Stream,
        unread: &[u8],
        slices: &mut [io::IoSlice<'_>],
        timeout: Duration,
        phase: &'static str,
    ) -> Result<(), Failure> {
        if !unread.is_empty() {
            return Err(Failure::Protocol(format!(
                "server sent {} unexpected octets before {phase}",
                unread.len()
            )));
        }
        let write = async {
            let mut bufs = slices;
            while !bufs.is_empty() {
                match stream.write_vectored(bufs).await? {
                    0 => return Err(io::ErrorKind::WriteZero.into()),
                    n => io::IoSlice::advance_slices(&mut bufs, n),
                }
            }
            stream.flush().await
        };
        tokio::time::timeout(timeout, write)
            .await
            .map_err(|_| Failure::Timeout(phase))?
            .map_err(Failure::Io)
    }
}
