//! A scriptable receiving SMTP server for tests ("sink"): it speaks enough
//! ESMTP (EHLO/HELO, PIPELINING, SIZE, 8BITMIME, SMTPUTF8, CHUNKING/BDAT,
//! STARTTLS via rustls, AUTH PLAIN/LOGIN) to receive mail from Postern's
//! outbound delivery, records every command and accepted message, and lets a
//! test choose the replies. One std thread per connection; stops on drop.

use std::collections::HashMap;
use std::fmt;
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use rustls::{ServerConfig, ServerConnection, StreamOwned};

use crate::TlsIdentity;
use crate::lock;

/// The host name the sink uses in its EHLO and HELO replies.
const HOSTNAME: &str = "sink.test";
/// Idle time after which a connection is closed (as a real server would).
const IDLE_TIMEOUT: Duration = Duration::from_secs(300);

type AddrReply = Arc<dyn Fn(&str) -> String + Send + Sync>;
type DataReply = Arc<dyn Fn(&ReceivedMessage) -> String + Send + Sync>;

/// How a [`Sink`] behaves. Build with `SinkConfig { field: .., ..Default::default() }`
/// or the `with_*` helpers for the reply closures.
#[derive(Clone)]
pub struct SinkConfig {
    /// The greeting line(s), default "220 sink.test ESMTP". A greeting that
    /// does not start with '2' (e.g. "421 4.3.2 busy", "554 5.7.1 go away")
    /// is sent and the connection closed.
    pub greeting: String,
    /// false: EHLO gets "502 5.5.1", only HELO works. Default true.
    pub ehlo: bool,
    /// Advertise PIPELINING (default true).
    pub pipelining: bool,
    /// Advertise 8BITMIME (default true). When false, MAIL with BODY=8BITMIME gets 555.
    pub eight_bit_mime: bool,
    /// Advertise SMTPUTF8 (default true). When false, MAIL with SMTPUTF8 gets 555.
    pub smtputf8: bool,
    /// Advertise CHUNKING and accept BDAT (default false).
    pub chunking: bool,
    /// Advertise SIZE with this limit (default None: not advertised). When
    /// set, MAIL with a larger SIZE= and a larger message get 552 5.3.4.
    pub size: Option<u64>,
    /// Some: advertise STARTTLS and serve it with this identity.
    pub tls: Option<TlsIdentity>,
    /// Some((user, pass)): advertise AUTH PLAIN LOGIN (only after STARTTLS if
    /// `tls` is Some); 235 on a match, 535 5.7.8 otherwise.
    pub auth: Option<(String, String)>,
    /// MAIL before a successful AUTH gets 530 5.7.0.
    pub require_auth: bool,
    /// MAIL before STARTTLS gets 530 5.7.0 (default false).
    pub require_tls: bool,
    /// Reply to RCPT, given the address between <>; default "250 2.1.5 Ok".
    /// A reply starting with '2' accepts the recipient.
    pub rcpt_reply: AddrReply,
    /// Reply to MAIL, given the address between <>; default "250 2.1.0 Ok".
    pub mail_reply: AddrReply,
    /// Reply after the final dot (or BDAT LAST); default "250 2.0.0 Ok: queued".
    /// A reply starting with '2' records the message as accepted.
    pub data_reply: DataReply,
    /// Sleep this long before every reply (greeting, 334, 354 included).
    pub delay: Option<Duration>,
}

impl Default for SinkConfig {
    fn default() -> Self {
        SinkConfig {
            greeting: format!("220 {HOSTNAME} ESMTP"),
            ehlo: true,
            pipelining: true,
            eight_bit_mime: true,
            smtputf8: true,
            chunking: false,
            size: None,
            tls: None,
            auth: None,
            require_auth: false,
            require_tls: false,
            rcpt_reply: Arc::new(|_: &str| "250 2.1.5 Ok".to_string()),
            mail_reply: Arc::new(|_: &str| "250 2.1.0 Ok".to_string()),
            data_reply: Arc::new(|_: &ReceivedMessage| "250 2.0.0 Ok: queued".to_string()),
            delay: None,
        }
    }
}

impl SinkConfig {
    /// Sets `rcpt_reply` (saves spelling out the `Arc<dyn Fn>` type).
    pub fn with_rcpt_reply(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.rcpt_reply = Arc::new(f);
        self
    }

    /// Sets `mail_reply`.
    pub fn with_mail_reply(mut self, f: impl Fn(&str) -> String + Send + Sync + 'static) -> Self {
        self.mail_reply = Arc::new(f);
        self
    }

    /// Sets `data_reply`.
    pub fn with_data_reply(
        mut self,
        f: impl Fn(&ReceivedMessage) -> String + Send + Sync + 'static,
    ) -> Self {
        self.data_reply = Arc::new(f);
        self
    }
}

impl fmt::Debug for SinkConfig {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SinkConfig")
            .field("greeting", &self.greeting)
            .field("ehlo", &self.ehlo)
            .field("pipelining", &self.pipelining)
            .field("eight_bit_mime", &self.eight_bit_mime)
            .field("smtputf8", &self.smtputf8)
            .field("chunking", &self.chunking)
            .field("size", &self.size)
            .field("tls", &self.tls.is_some())
            .field("auth", &self.auth)
            .field("require_auth", &self.require_auth)
            .field("require_tls", &self.require_tls)
            .field("delay", &self.delay)
            .finish_non_exhaustive()
    }
}

/// A message the sink received.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ReceivedMessage {
    /// The EHLO/HELO argument in force (after STARTTLS: the second EHLO's).
    pub helo: String,
    /// The reverse path between <> ("" for the null sender).
    pub mail_from: String,
    /// MAIL parameters as sent, e.g. ["SIZE=123", "BODY=8BITMIME"].
    pub mail_params: Vec<String>,
    /// Accepted recipients only (rcpt_reply started with '2'), in order.
    pub rcpt_to: Vec<String>,
    /// The content: for DATA dot-unstuffed, lines as received (normally
    /// CRLF-terminated), without the final ".\r\n"; for BDAT the chunks concatenated.
    pub data: Vec<u8>,
    /// Received after STARTTLS.
    pub tls: bool,
    /// The authenticated user name, if AUTH succeeded on the connection.
    pub auth: Option<String>,
    /// 0-based index of the TCP connection it came on (see [`Sink::connections`]).
    pub connection: usize,
}

impl ReceivedMessage {
    /// The content as text (lossy UTF-8).
    pub fn data_str(&self) -> String {
        String::from_utf8_lossy(&self.data).into_owned()
    }
}

struct Shared {
    config: Mutex<SinkConfig>,
    messages: Mutex<Vec<ReceivedMessage>>,
    messages_cv: Condvar,
    transcript: Mutex<Vec<(usize, String)>>,
    connections: AtomicUsize,
    open: Mutex<HashMap<usize, TcpStream>>,
    stop: AtomicBool,
}

/// A receiving SMTP server on loopback. See [`SinkConfig`] for its behaviour.
pub struct Sink {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl fmt::Debug for Sink {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Sink")
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl Sink {
    /// Starts a sink on 127.0.0.1 with an ephemeral port.
    pub fn start(config: SinkConfig) -> Sink {
        Sink::start_on(SocketAddr::from(([127, 0, 0, 1], 0)), config)
            .expect("bind SMTP sink on 127.0.0.1")
    }

    /// Starts a sink on `addr` (e.g. 127.0.0.3:2525 or [::1]:0; port 0 picks one).
    pub fn start_on(addr: SocketAddr, config: SinkConfig) -> io::Result<Sink> {
        let listener = TcpListener::bind(addr)?;
        listener.set_nonblocking(true)?;
        let addr = listener.local_addr()?;
        let shared = Arc::new(Shared {
            config: Mutex::new(config),
            messages: Mutex::new(Vec::new()),
            messages_cv: Condvar::new(),
            transcript: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            open: Mutex::new(HashMap::new()),
            stop: AtomicBool::new(false),
        });
        let s = shared.clone();
        let accept_thread = thread::Builder::new()
            .name("testkit-sink-accept".into())
            .spawn(move || accept_loop(listener, s))?;
        Ok(Sink {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        })
    }

    /// The address the sink listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Replaces the configuration; connections accepted from now on use it
    /// (connections already open keep theirs).
    pub fn set_config(&self, config: SinkConfig) {
        *lock(&self.shared.config) = config;
    }

    /// The accepted messages (data reply started with '2'), in order.
    pub fn messages(&self) -> Vec<ReceivedMessage> {
        lock(&self.shared.messages).clone()
    }

    /// Waits until at least `n` messages were accepted and returns them all.
    /// Panics after `timeout` with the counts and the transcript.
    pub fn wait_for(&self, n: usize, timeout: Duration) -> Vec<ReceivedMessage> {
        let deadline = Instant::now() + timeout;
        let mut msgs = lock(&self.shared.messages);
        while msgs.len() < n {
            let now = Instant::now();
            if now >= deadline {
                let got = msgs.len();
                drop(msgs);
                panic!(
                    "sink {}: expected {n} accepted message(s) within {timeout:?}, got {got} \
                     over {} connection(s); commands received:\n{}",
                    self.addr,
                    self.connections(),
                    self.format_transcript()
                );
            }
            msgs = self
                .shared
                .messages_cv
                .wait_timeout(msgs, deadline - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
        msgs.clone()
    }

    /// The number of TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Every command line received (not message content, not AUTH
    /// continuation lines), in order of arrival over all connections.
    pub fn transcript(&self) -> Vec<String> {
        lock(&self.shared.transcript)
            .iter()
            .map(|(_, l)| l.clone())
            .collect()
    }

    /// The command lines received on one connection (0-based index).
    pub fn transcript_of(&self, connection: usize) -> Vec<String> {
        lock(&self.shared.transcript)
            .iter()
            .filter(|(c, _)| *c == connection)
            .map(|(_, l)| l.clone())
            .collect()
    }

    fn format_transcript(&self) -> String {
        let t = lock(&self.shared.transcript);
        if t.is_empty() {
            return "  (none)".to_string();
        }
        t.iter()
            .map(|(c, l)| format!("  [conn {c}] {l}"))
            .collect::<Vec<_>>()
            .join("\n")
    }
}

impl Drop for Sink {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        if let Some(t) = self.accept_thread.take() {
            let _ = t.join();
        }
        // End the open connections so their threads finish and peers see a close.
        for (_, s) in lock(&self.shared.open).drain() {
            let _ = s.shutdown(Shutdown::Both);
        }
    }
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    while !shared.stop.load(Ordering::SeqCst) {
        match listener.accept() {
            Ok((stream, _)) => {
                let id = shared.connections.fetch_add(1, Ordering::SeqCst);
                if let Ok(clone) = stream.try_clone() {
                    lock(&shared.open).insert(id, clone);
                }
                let config = lock(&shared.config).clone();
                let s = shared.clone();
                let spawned = thread::Builder::new()
                    .name(format!("testkit-sink-conn-{id}"))
                    .spawn(move || {
                        let _ = serve(stream, id, config, &s);
                        lock(&s.open).remove(&id);
                    });
                if spawned.is_err()
                    && let Some(s) = lock(&shared.open).remove(&id)
                {
                    let _ = s.shutdown(Shutdown::Both);
                }
            }
            Err(_) => thread::sleep(Duration::from_millis(5)),
        }
    }
}

/// The connection's byte stream, before or after STARTTLS.
enum Stream {
    Plain(TcpStream),
    Tls(Box<StreamOwned<ServerConnection, TcpStream>>),
}

impl Read for Stream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.read(buf),
            Stream::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Stream {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Stream::Plain(s) => s.write(buf),
            Stream::Tls(s) => s.write(buf),
        }
    }

    fn flush(&mut self) -> io::Result<()> {
        match self {
            Stream::Plain(s) => s.flush(),
            Stream::Tls(s) => s.flush(),
        }
    }
}

/// An open mail transaction.
struct Transaction {
    mail_from: String,
    mail_params: Vec<String>,
    rcpt_to: Vec<String>,
    /// BDAT chunks received so far (None until the first BDAT).
    chunks: Option<Vec<u8>>,
}

/// Per-connection state.
struct Session<'a> {
    shared: &'a Shared,
    config: SinkConfig,
    server_tls: Option<Arc<ServerConfig>>,
    id: usize,
    helo: Option<String>,
    tls: bool,
    auth: Option<String>,
    tx: Option<Transaction>,
}

type Conn = BufReader<Stream>;

impl Session<'_> {
    fn reply(&self, conn: &mut Conn, text: &str) -> io::Result<()> {
        if let Some(d) = self.config.delay {
            thread::sleep(d);
        }
        let mut out = String::new();
        for line in text.lines() {
            out.push_str(line);
            out.push_str("\r\n");
        }
        if out.is_empty() {
            out.push_str("\r\n");
        }
        let w = conn.get_mut();
        w.write_all(out.as_bytes())?;
        w.flush()
    }

    fn auth_offered(&self) -> bool {
        self.config.auth.is_some() && (self.config.tls.is_none() || self.tls)
    }

    fn ehlo_reply(&self, domain: &str) -> String {
        let c = &self.config;
        let mut lines = vec![format!("{HOSTNAME} Hello {domain}")];
        if c.pipelining {
            lines.push("PIPELINING".into());
        }
        if let Some(size) = c.size {
            lines.push(format!("SIZE {size}"));
        }
        if c.eight_bit_mime {
            lines.push("8BITMIME".into());
        }
        if c.smtputf8 {
            lines.push("SMTPUTF8".into());
        }
        if c.chunking {
            lines.push("CHUNKING".into());
        }
        if c.tls.is_some() && !self.tls {
            lines.push("STARTTLS".into());
        }
        if self.auth_offered() {
            lines.push("AUTH PLAIN LOGIN".into());
        }
        lines.push("ENHANCEDSTATUSCODES".into());
        let last = lines.len() - 1;
        lines
            .iter()
            .enumerate()
            .map(|(i, l)| format!("250{}{l}", if i == last { ' ' } else { '-' }))
            .collect::<Vec<_>>()
            .join("\r\n")
    }

    fn record(&self, line: &str) {
        lock(&self.shared.transcript).push((self.id, line.to_string()));
    }

    /// Builds the message, asks `data_reply`, records it if accepted, and
    /// returns the reply text.
    fn finish_message(&mut self, data: Vec<u8>) -> String {
        let Some(tx) = self.tx.take() else {
            return "503 5.5.1 No transaction".into();
        };
        let msg = ReceivedMessage {
            helo: self.helo.clone().unwrap_or_default(),
            mail_from: tx.mail_from,
            mail_params: tx.mail_params,
            rcpt_to: tx.rcpt_to,
            data,
            tls: self.tls,
            auth: self.auth.clone(),
            connection: self.id,
        };
        if let Some(limit) = self.config.size
            && limit > 0
            && msg.data.len() as u64 > limit
        {
            return "552 5.3.4 Message size exceeds fixed limit".into();
        }
        let reply = (self.config.data_reply)(&msg);
        if reply.starts_with('2') {
            lock(&self.shared.messages).push(msg);
            self.shared.messages_cv.notify_all();
        }
        reply
    }

    fn mail(&mut self, arg: &str) -> String {
        if self.helo.is_none() {
            return "503 5.5.1 Send HELO/EHLO first".into();
        }
        if self.tx.is_some() {
            return "503 5.5.1 Nested MAIL command".into();
        }
        if self.config.require_tls && !self.tls {
            return "530 5.7.0 Must issue a STARTTLS command first".into();
        }
        if self.config.require_auth && self.auth.is_none() {
            return "530 5.7.0 Authentication required".into();
        }
        let Some((addr, params)) = parse_path(arg, "FROM:") else {
            return "501 5.5.4 Syntax: MAIL FROM:<address>".into();
        };
        for p in &params {
            let (key, value) = p.split_once('=').unwrap_or((p.as_str(), ""));
            if key.eq_ignore_ascii_case("SMTPUTF8") && !self.config.smtputf8 {
                return "555 5.5.4 Unsupported option: SMTPUTF8".into();
            }
            if key.eq_ignore_ascii_case("BODY")
                && value.eq_ignore_ascii_case("8BITMIME")
                && !self.config.eight_bit_mime
            {
                return "555 5.5.4 Unsupported option: BODY=8BITMIME".into();
            }
            if key.eq_ignore_ascii_case("SIZE")
                && let (Some(limit), Ok(size)) = (self.config.size, value.parse::<u64>())
                && limit > 0
                && size > limit
            {
                return "552 5.3.4 Message size exceeds fixed limit".into();
            }
        }
        let reply = (self.config.mail_reply)(&addr);
        if reply.starts_with('2') {
            self.tx = Some(Transaction {
                mail_from: addr,
                mail_params: params,
                rcpt_to: Vec::new(),
                chunks: None,
            });
        }
        reply
    }

    fn rcpt(&mut self, arg: &str) -> String {
        if self.tx.is_none() {
            return "503 5.5.1 Need MAIL before RCPT".into();
        }
        let Some((addr, _params)) = parse_path(arg, "TO:") else {
            return "501 5.5.4 Syntax: RCPT TO:<address>".into();
        };
        let reply = (self.config.rcpt_reply)(&addr);
        if reply.starts_with('2')
            && let Some(tx) = self.tx.as_mut()
        {
            tx.rcpt_to.push(addr);
        }
        reply
    }

    /// AUTH; may read continuation lines. Returns the final reply.
    fn auth(&mut self, conn: &mut Conn, arg: &str) -> io::Result<String> {
        if !self.auth_offered() {
            return Ok("503 5.5.1 Error: authentication not enabled".into());
        }
        if self.helo.is_none() {
            return Ok("503 5.5.1 Send EHLO first".into());
        }
        if self.auth.is_some() {
            return Ok("503 5.5.1 Already authenticated".into());
        }
        if self.tx.is_some() {
            return Ok("503 5.5.1 AUTH not allowed during a mail transaction".into());
        }
        let mut parts = arg.split_whitespace();
        let mech = parts.next().unwrap_or("").to_ascii_uppercase();
        let initial = parts.next().map(str::to_string);
        let (user, pass) = match mech.as_str() {
            "PLAIN" => {
                let resp = match initial {
                    Some(r) => r,
                    None => match self.challenge(conn, "334 ")? {
                        Some(r) => r,
                        None => return Ok("501 5.0.0 Authentication aborted".into()),
                    },
                };
                let Some(decoded) = decode_b64(&resp) else {
                    return Ok("501 5.5.2 Cannot decode response".into());
                };
                let fields: Vec<&[u8]> = decoded.split(|b| *b == 0).collect();
                if fields.len() != 3 {
                    return Ok("501 5.5.2 Invalid PLAIN response".into());
                }
                (
                    String::from_utf8_lossy(fields[1]).into_owned(),
                    String::from_utf8_lossy(fields[2]).into_owned(),
                )
            }
            "LOGIN" => {
                let user = match initial {
                    Some(r) => r,
                    None => match self.challenge(conn, "334 VXNlcm5hbWU6")? {
                        Some(r) => r,
                        None => return Ok("501 5.0.0 Authentication aborted".into()),
                    },
                };
                let Some(user) = decode_b64(&user) else {
                    return Ok("501 5.5.2 Cannot decode response".into());
                };
                let Some(pass) = self.challenge(conn, "334 UGFzc3dvcmQ6")? else {
                    return Ok("501 5.0.0 Authentication aborted".into());
                };
                let Some(pass) = decode_b64(&pass) else {
                    return Ok("501 5.5.2 Cannot decode response".into());
                };
                (
                    String::from_utf8_lossy(&user).into_owned(),
                    String::from_utf8_lossy(&pass).into_owned(),
                )
            }
            _ => return Ok("504 5.5.4 Unrecognized authentication type".into()),
        };
        match &self.config.auth {
            Some((u, p)) if *u == user && *p == pass => {
                self.auth = Some(user);
                Ok("235 2.7.0 Authentication successful".into())
            }
            _ => Ok("535 5.7.8 Authentication credentials invalid".into()),
        }
    }

    /// Sends a 334 challenge and reads the answer; None if the client cancelled ("*").
    fn challenge(&self, conn: &mut Conn, prompt: &str) -> io::Result<Option<String>> {
        self.reply(conn, prompt)?;
        let line = read_line(conn)?.ok_or_else(eof)?;
        let line = line.trim().to_string();
        Ok(if line == "*" { None } else { Some(line) })
    }
}

fn eof() -> io::Error {
    io::Error::new(io::ErrorKind::UnexpectedEof, "client closed the connection")
}

fn decode_b64(s: &str) -> Option<Vec<u8>> {
    if s == "=" {
        return Some(Vec::new());
    }
    BASE64.decode(s.trim()).ok()
}

/// Reads one line (up to and including LF); None at a clean EOF.
fn read_line(conn: &mut Conn) -> io::Result<Option<String>> {
    let mut buf = Vec::new();
    let n = conn.read_until(b'\n', &mut buf)?;
    if n == 0 {
        return Ok(None);
    }
    while matches!(buf.last(), Some(b'\n' | b'\r')) {
        buf.pop();
    }
    Ok(Some(String::from_utf8_lossy(&buf).into_owned()))
}

/// Parses "FROM:<addr> PARAMS..." (or "TO:"): the address between <> and the params.
fn parse_path(arg: &str, keyword: &str) -> Option<(String, Vec<String>)> {
    let head = arg.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let rest = arg[keyword.len()..].trim_start();
    let rest = rest.strip_prefix('<')?;
    let end = rest.find('>')?;
    let addr = rest[..end].to_string();
    let params = rest[end + 1..]
        .split_whitespace()
        .map(str::to_string)
        .collect();
    Some((addr, params))
}

/// Serves one connection until QUIT, EOF or an error.
fn serve(stream: TcpStream, id: usize, config: SinkConfig, shared: &Shared) -> io::Result<()> {
    stream.set_nonblocking(false)?;
    stream.set_read_timeout(Some(IDLE_TIMEOUT))?;
    let server_tls = config.tls.as_ref().map(|t| t.server_config());
    let mut session = Session {
        shared,
        config,
        server_tls,
        id,
        helo: None,
        tls: false,
        auth: None,
        tx: None,
    };
    let mut conn: Conn = BufReader::new(Stream::Plain(stream));

    let greeting = session.config.greeting.clone();
    session.reply(&mut conn, &greeting)?;
    if !greeting.starts_with('2') {
        return Ok(());
    }

    loop {
        let Some(line) = read_line(&mut conn)? else {
            return Ok(());
        };
        session.record(&line);
        let (verb, arg) = match line.split_once(' ') {
            Some((v, a)) => (v.to_ascii_uppercase(), a.trim()),
            None => (line.trim().to_ascii_uppercase(), ""),
        };
        let reply: String = match verb.as_str() {
            "EHLO" if !session.config.ehlo => "502 5.5.1 Command not implemented".into(),
            "EHLO" | "HELO" if arg.is_empty() => format!("501 5.5.4 Syntax: {verb} hostname"),
            "EHLO" => {
                session.helo = Some(arg.to_string());
                session.tx = None;
                session.ehlo_reply(arg)
            }
            "HELO" => {
                session.helo = Some(arg.to_string());
                session.tx = None;
                format!("250 {HOSTNAME}")
            }
            "STARTTLS" => {
                let Some(server_config) = session.server_tls.clone() else {
                    session.reply(&mut conn, "502 5.5.1 STARTTLS not offered")?;
                    continue;
                };
                if session.tls {
                    session.reply(&mut conn, "503 5.5.1 TLS already active")?;
                    continue;
                }
                if !arg.is_empty() {
                    session.reply(&mut conn, "501 5.5.4 Syntax: STARTTLS")?;
                    continue;
                }
                session.reply(&mut conn, "220 2.0.0 Ready to start TLS")?;
                // Anything pipelined after STARTTLS is discarded (as RFC 3207 requires).
                let Stream::Plain(tcp) = conn.into_inner() else {
                    unreachable!("TLS not yet active");
                };
                let tls = ServerConnection::new(server_config).map_err(io::Error::other)?;
                conn = BufReader::new(Stream::Tls(Box::new(StreamOwned::new(tls, tcp))));
                session.tls = true;
                session.helo = None;
                session.auth = None;
                session.tx = None;
                continue;
            }
            "AUTH" => session.auth(&mut conn, arg)?,
            "MAIL" => session.mail(arg),
            "RCPT" => session.rcpt(arg),
            "DATA" => {
                let ready = match &session.tx {
                    None => Some("503 5.5.1 Need MAIL command"),
                    Some(tx) if tx.rcpt_to.is_empty() => Some("554 5.5.1 No valid recipients"),
                    Some(tx) if tx.chunks.is_some() => Some("503 5.5.1 DATA after BDAT"),
                    Some(_) => None,
                };
                if let Some(err) = ready {
                    err.into()
                } else {
                    session.reply(&mut conn, "354 End data with <CR><LF>.<CR><LF>")?;
                    let data = read_data(&mut conn)?;
                    session.finish_message(data)
                }
            }
            "BDAT" => {
                let mut parts = arg.split_whitespace();
                let size = parts.next().and_then(|s| s.parse::<u64>().ok());
                let last = parts.next().is_some_and(|s| s.eq_ignore_ascii_case("LAST"));
                match size {
                    None => "501 5.5.4 Syntax: BDAT size [LAST]".into(),
                    Some(size) => {
                        let mut chunk = Vec::new();
                        (&mut conn).take(size).read_to_end(&mut chunk)?;
                        if chunk.len() as u64 != size {
                            return Err(eof());
                        }
                        if !session.config.chunking {
                            "502 5.5.1 CHUNKING not offered".into()
                        } else {
                            match session.tx.as_mut() {
                                None => "503 5.5.1 Need MAIL command".into(),
                                Some(tx) if tx.rcpt_to.is_empty() => {
                                    session.tx = None;
                                    "554 5.5.1 No valid recipients".into()
                                }
                                Some(tx) => {
                                    let data = tx.chunks.get_or_insert_with(Vec::new);
                                    data.extend_from_slice(&chunk);
                                    if last {
                                        let data = std::mem::take(data);
                                        session.finish_message(data)
                                    } else {
                                        format!("250 2.0.0 {size} octets received")
                                    }
                                }
                            }
                        }
                    }
                }
            }
            "RSET" => {
                session.tx = None;
                "250 2.0.0 Ok".into()
            }
            "NOOP" => "250 2.0.0 Ok".into(),
            "VRFY" => "252 2.0.0 Cannot VRFY user".into(),
            "QUIT" => {
                session.reply(&mut conn, "221 2.0.0 Bye")?;
                if let Stream::Tls(tls) = conn.get_mut() {
                    tls.conn.send_close_notify();
                    let _ = tls.flush();
                }
                return Ok(());
            }
            _ => "500 5.5.2 Command not recognized".into(),
        };
        session.reply(&mut conn, &reply)?;
    }
}

/// Reads DATA content up to the lone dot, undoing dot-stuffing.
fn read_data(conn: &mut Conn) -> io::Result<Vec<u8>> {
    let mut data = Vec::new();
    loop {
        let mut line = Vec::new();
        if conn.read_until(b'\n', &mut line)? == 0 {
            return Err(eof());
        }
        if line == b".\r\n" || line == b".\n" {
            return Ok(data);
        }
        let content = line.strip_prefix(b".").unwrap_or(&line);
        data.extend_from_slice(content);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::TestCa;
    use rustls::pki_types::ServerName;
    use rustls::{ClientConnection, StreamOwned};

    /// A minimal SMTP client over any stream.
    struct Client<S: Read + Write> {
        r: BufReader<S>,
    }

    impl<S: Read + Write> Client<S> {
        fn send(&mut self, s: &str) {
            self.r.get_mut().write_all(s.as_bytes()).unwrap();
            self.r.get_mut().flush().unwrap();
        }

        /// Reads one (possibly multi-line) reply: (code, lines without the code).
        fn reply(&mut self) -> (u16, Vec<String>) {
            let mut lines = Vec::new();
            loop {
                let mut l = String::new();
                assert!(self.r.read_line(&mut l).unwrap() > 0, "unexpected EOF");
                let l = l.trim_end();
                let code: u16 = l[..3].parse().unwrap();
                lines.push(l.get(4..).unwrap_or("").to_string());
                if l.as_bytes().get(3) != Some(&b'-') {
                    return (code, lines);
                }
            }
        }

        fn cmd(&mut self, s: &str) -> (u16, Vec<String>) {
            self.send(&format!("{s}\r\n"));
            self.reply()
        }

        fn code(&mut self, s: &str) -> u16 {
            self.cmd(s).0
        }
    }

    fn connect(sink: &Sink) -> Client<TcpStream> {
        let s = TcpStream::connect(sink.addr()).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        Client {
            r: BufReader::new(s),
        }
    }

    const WAIT: Duration = Duration::from_secs(10);

    #[test]
    fn ehlo_pipelined_transaction_dot_unstuffing_rset_second_message() {
        let sink = Sink::start(SinkConfig {
            size: Some(1_000_000),
            ..Default::default()
        });
        let mut c = connect(&sink);
        assert_eq!(c.reply().0, 220);
        let (code, lines) = c.cmd("EHLO client.test");
        assert_eq!(code, 250);
        for ext in ["PIPELINING", "8BITMIME", "SMTPUTF8", "SIZE 1000000"] {
            assert!(lines.iter().any(|l| l == ext), "{ext} missing: {lines:?}");
        }
        assert!(
            !lines
                .iter()
                .any(|l| l == "STARTTLS" || l.starts_with("AUTH"))
        );
        // MAIL, RCPT x2, DATA in one write.
        c.send(
            "MAIL FROM:<a@client.test> SIZE=42 BODY=8BITMIME\r\n\
             RCPT TO:<b@sink.test>\r\nRCPT TO:<c@sink.test> NOTIFY=NEVER\r\nDATA\r\n",
        );
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 354);
        let (code, lines) = c.cmd("Subject: x\r\n\r\n..leading dot\r\n..\r\nlast line\r\n.");
        assert_eq!(code, 250, "{lines:?}");
        // A second transaction after RSET.
        assert_eq!(c.code("RSET"), 250);
        c.send("MAIL FROM:<>\r\nRCPT TO:<d@sink.test>\r\nDATA\r\n");
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 354);
        assert_eq!(c.code("hello\r\n."), 250);
        assert_eq!(c.code("QUIT"), 221);

        let msgs = sink.wait_for(2, WAIT);
        assert_eq!(msgs[0].helo, "client.test");
        assert_eq!(msgs[0].mail_from, "a@client.test");
        assert_eq!(msgs[0].mail_params, vec!["SIZE=42", "BODY=8BITMIME"]);
        assert_eq!(msgs[0].rcpt_to, vec!["b@sink.test", "c@sink.test"]);
        assert_eq!(
            msgs[0].data_str(),
            "Subject: x\r\n\r\n.leading dot\r\n.\r\nlast line\r\n"
        );
        assert!(!msgs[0].tls);
        assert_eq!(msgs[0].auth, None);
        assert_eq!(msgs[1].mail_from, "");
        assert_eq!(msgs[1].data, b"hello\r\n");
        assert_eq!(msgs[0].connection, 0);
        assert_eq!(msgs[1].connection, 0);
        assert_eq!(sink.connections(), 1);
        assert_eq!(
            sink.transcript(),
            vec![
                "EHLO client.test",
                "MAIL FROM:<a@client.test> SIZE=42 BODY=8BITMIME",
                "RCPT TO:<b@sink.test>",
                "RCPT TO:<c@sink.test> NOTIFY=NEVER",
                "DATA",
                "RSET",
                "MAIL FROM:<>",
                "RCPT TO:<d@sink.test>",
                "DATA",
                "QUIT",
            ]
        );
        assert_eq!(sink.transcript_of(0).len(), 10);
    }

    #[test]
    fn scripted_replies_and_rejections() {
        let sink = Sink::start(
            SinkConfig::default()
                .with_rcpt_reply(|a| {
                    if a.starts_with("busy") {
                        "450 4.2.1 Mailbox busy".into()
                    } else {
                        "250 2.1.5 Ok".into()
                    }
                })
                .with_data_reply(|m| {
                    if m.data_str().contains("reject me") {
                        "554 5.6.0 Rejected".into()
                    } else {
                        "250 2.0.0 Ok: queued".into()
                    }
                }),
        );
        let mut c = connect(&sink);
        c.reply();
        assert_eq!(c.code("MAIL FROM:<a@x.test>"), 503); // before EHLO
        c.cmd("EHLO client.test");
        assert_eq!(c.code("RCPT TO:<b@x.test>"), 503); // before MAIL
        assert_eq!(c.code("MAIL FROM:<a@x.test>"), 250);
        assert_eq!(c.code("RCPT TO:<busy@x.test>"), 450);
        assert_eq!(c.code("RCPT TO:<ok@x.test>"), 250);
        assert_eq!(c.code("DATA"), 354);
        assert_eq!(c.code("reject me\r\n."), 554);
        // Data before any accepted recipient.
        assert_eq!(c.code("MAIL FROM:<a@x.test>"), 250);
        assert_eq!(c.code("RCPT TO:<busy@x.test>"), 450);
        assert_eq!(c.code("DATA"), 554);
        assert_eq!(c.code("RSET"), 250);
        assert_eq!(c.code("MAIL FROM:<a@x.test>"), 250);
        assert_eq!(c.code("RCPT TO:<busy@x.test>"), 450);
        assert_eq!(c.code("RCPT TO:<ok@x.test>"), 250);
        assert_eq!(c.code("DATA"), 354);
        assert_eq!(c.code("fine\r\n."), 250);
        assert_eq!(c.code("BOGUS"), 500);
        let msgs = sink.wait_for(1, WAIT);
        assert_eq!(msgs.len(), 1);
        assert_eq!(msgs[0].rcpt_to, vec!["ok@x.test"]);
    }

    #[test]
    fn helo_only_mode_and_unadvertised_params() {
        let sink = Sink::start(SinkConfig {
            ehlo: false,
            smtputf8: false,
            eight_bit_mime: false,
            ..Default::default()
        });
        let mut c = connect(&sink);
        c.reply();
        let (code, lines) = c.cmd("EHLO client.test");
        assert_eq!(code, 502);
        assert!(lines[0].starts_with("5.5.1"));
        let (code, lines) = c.cmd("HELO client.test");
        assert_eq!((code, lines[0].as_str()), (250, "sink.test"));
        assert_eq!(c.code("MAIL FROM:<a@x.test> SMTPUTF8"), 555);
        assert_eq!(c.code("MAIL FROM:<a@x.test> BODY=8BITMIME"), 555);
        assert_eq!(c.code("MAIL FROM:<a@x.test> BODY=7BIT"), 250);
        assert_eq!(c.code("RCPT TO:<b@x.test>"), 250);
        assert_eq!(c.code("DATA"), 354);
        assert_eq!(c.code("x\r\n."), 250);
        assert_eq!(sink.wait_for(1, WAIT)[0].helo, "client.test");
    }

    #[test]
    fn greeting_421_closes() {
        let sink = Sink::start(SinkConfig {
            greeting: "421 4.3.2 Service not available".into(),
            ..Default::default()
        });
        let mut c = connect(&sink);
        let (code, lines) = c.reply();
        assert_eq!(code, 421);
        assert_eq!(lines[0], "4.3.2 Service not available");
        let mut rest = String::new();
        assert_eq!(
            c.r.read_line(&mut rest).unwrap(),
            0,
            "connection not closed"
        );
        assert_eq!(sink.connections(), 1);
    }

    #[test]
    fn set_config_applies_to_new_connections_and_disconnect_is_harmless() {
        let sink = Sink::start(SinkConfig::default());
        let mut c = connect(&sink);
        c.reply();
        c.cmd("EHLO a.test");
        c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\npartial");
        drop(c); // vanish mid-DATA
        sink.set_config(SinkConfig {
            greeting: "554 5.7.1 No thanks".into(),
            ..Default::default()
        });
        let mut c = connect(&sink);
        assert_eq!(c.reply().0, 554);
        sink.set_config(SinkConfig::default());
        let mut c = connect(&sink);
        assert_eq!(c.reply().0, 220);
        assert_eq!(sink.connections(), 3);
        assert!(sink.messages().is_empty());
    }

    #[test]
    fn bdat_chunking() {
        let sink = Sink::start(SinkConfig {
            chunking: true,
            ..Default::default()
        });
        let mut c = connect(&sink);
        c.reply();
        let (_, lines) = c.cmd("EHLO client.test");
        assert!(lines.iter().any(|l| l == "CHUNKING"));
        c.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nBDAT 7\r\n.a\r\nb\r\n");
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.reply().0, 250);
        c.send("BDAT 3 LAST\r\nxyz");
        assert_eq!(c.reply().0, 250);
        assert_eq!(c.code("QUIT"), 221);
        let msgs = sink.wait_for(1, WAIT);
        assert_eq!(msgs[0].data, b".a\r\nb\r\nxyz");
        assert_eq!(
            sink.transcript(),
            vec![
                "EHLO client.test",
                "MAIL FROM:<a@x.test>",
                "RCPT TO:<b@x.test>",
                "BDAT 7",
                "BDAT 3 LAST",
                "QUIT"
            ]
        );
    }

    #[test]
    #[should_panic(expected = "expected 1 accepted message")]
    fn wait_for_panics_usefully() {
        let sink = Sink::start(SinkConfig::default());
        sink.wait_for(1, Duration::from_millis(50));
    }

    fn tls_client(
        ca: &TestCa,
        sink: &Sink,
        name: &str,
    ) -> (
        Client<TcpStream>,
        Option<Client<StreamOwned<ClientConnection, TcpStream>>>,
    ) {
        let mut c = connect(sink);
        assert_eq!(c.reply().0, 220);
        let (_, lines) = c.cmd("EHLO client.test");
        assert!(lines.iter().any(|l| l == "STARTTLS"), "{lines:?}");
        assert_eq!(c.code("STARTTLS"), 220);
        let tcp = c.r.get_ref().try_clone().unwrap();
        let conn = ClientConnection::new(
            ca.client_config(),
            ServerName::try_from(name.to_string()).unwrap(),
        )
        .unwrap();
        let mut tls = Client {
            r: BufReader::new(StreamOwned::new(conn, tcp)),
        };
        // Drive the handshake.
        let s = tls.r.get_mut();
        match s.conn.complete_io(&mut s.sock) {
            Ok(_) if !s.conn.is_handshaking() => (c, Some(tls)),
            _ => (c, None),
        }
    }

    #[test]
    fn starttls_verified_by_ca_then_auth_plain() {
        let ca = TestCa::new();
        let sink = Sink::start(SinkConfig {
            tls: Some(ca.issue(&["mx.example.test", "127.0.0.1"])),
            auth: Some(("user".into(), "secret".into())),
            require_auth: true,
            ..Default::default()
        });
        // AUTH is not offered before TLS.
        {
            let mut c = connect(&sink);
            c.reply();
            let (_, lines) = c.cmd("EHLO client.test");
            assert!(!lines.iter().any(|l| l.starts_with("AUTH")));
            assert_eq!(c.code("AUTH PLAIN AHVzZXIAc2VjcmV0"), 503);
            assert_eq!(c.code("MAIL FROM:<a@x.test>"), 530);
        }
        let (_plain, tls) = tls_client(&ca, &sink, "mx.example.test");
        let mut t = tls.expect("TLS handshake with CA-issued certificate");
        let (code, lines) = t.cmd("EHLO client.test");
        assert_eq!(code, 250);
        assert!(!lines.iter().any(|l| l == "STARTTLS"));
        assert!(lines.iter().any(|l| l == "AUTH PLAIN LOGIN"), "{lines:?}");
        assert_eq!(t.code("MAIL FROM:<a@x.test>"), 530);
        let bad = BASE64.encode(b"\0user\0wrong");
        assert_eq!(t.code(&format!("AUTH PLAIN {bad}")), 535);
        // PLAIN without initial response.
        assert_eq!(t.code("AUTH PLAIN"), 334);
        let good = BASE64.encode(b"\0user\0secret");
        assert_eq!(t.code(&good), 235);
        t.send("MAIL FROM:<a@x.test>\r\nRCPT TO:<b@x.test>\r\nDATA\r\n");
        assert_eq!(t.reply().0, 250);
        assert_eq!(t.reply().0, 250);
        assert_eq!(t.reply().0, 354);
        assert_eq!(t.code("secure\r\n."), 250);
        assert_eq!(t.code("QUIT"), 221);
        let msgs = sink.wait_for(1, WAIT);
        assert!(msgs[0].tls);
        assert_eq!(msgs[0].auth.as_deref(), Some("user"));
        assert_eq!(msgs[0].connection, 1);
        let t1 = sink.transcript_of(1);
        assert_eq!(t1[..2], ["EHLO client.test", "STARTTLS"]);
        assert!(t1.iter().any(|l| l.starts_with("AUTH PLAIN")));
        // Also by IP address.
        let (_p, tls) = tls_client(&ca, &sink, "127.0.0.1");
        assert!(tls.is_some());
    }

    #[test]
    fn starttls_rejected_by_client_trusting_other_ca_and_auth_login() {
        let ca = TestCa::new();
        let sink = Sink::start(SinkConfig {
            tls: Some(TlsIdentity::self_signed(&["mx.example.test"])),
            auth: Some(("u".into(), "p".into())),
            ..Default::default()
        });
        let (_p, tls) = tls_client(&ca, &sink, "mx.example.test");
        assert!(
            tls.is_none(),
            "self-signed cert must not verify against the CA"
        );

        // Same sink, trusting the self-signed cert itself, to try AUTH LOGIN.
        let own = sink_self_ca(&sink);
        let mut c = connect(&sink);
        c.reply();
        c.cmd("EHLO client.test");
        assert_eq!(c.code("STARTTLS"), 220);
        let tcp = c.r.get_ref().try_clone().unwrap();
        let conn =
            ClientConnection::new(own, ServerName::try_from("mx.example.test").unwrap()).unwrap();
        let mut t = Client {
            r: BufReader::new(StreamOwned::new(conn, tcp)),
        };
        t.cmd("EHLO client.test");
        assert_eq!(t.code("AUTH LOGIN"), 334);
        assert_eq!(t.code(&BASE64.encode("u")), 334);
        assert_eq!(t.code(&BASE64.encode("p")), 235);
        assert_eq!(t.code("STARTTLS"), 503);
    }

    /// A client config trusting the sink's self-signed certificate.
    fn sink_self_ca(sink: &Sink) -> Arc<rustls::ClientConfig> {
        let id = lock(&sink.shared.config).tls.clone().unwrap();
        let mut roots = rustls::RootCertStore::empty();
        roots.add(id.cert_chain()[0].clone()).unwrap();
        Arc::new(
            rustls::ClientConfig::builder_with_provider(Arc::new(
                rustls::crypto::ring::default_provider(),
            ))
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_root_certificates(roots)
            .with_no_client_auth(),
        )
    }

    #[test]
    fn start_on_specific_loopback_and_drop_closes_connections() {
        let sink = Sink::start_on("127.0.0.3:0".parse().unwrap(), SinkConfig::default()).unwrap();
        assert_eq!(sink.addr().ip().to_string(), "127.0.0.3");
        let mut c = connect(&sink);
        assert_eq!(c.reply().0, 220);
        drop(sink);
        let mut rest = String::new();
        assert_eq!(c.r.read_line(&mut rest).unwrap_or(0), 0);
    }

    #[test]
    fn delay_slows_replies() {
        let sink = Sink::start(SinkConfig {
            delay: Some(Duration::from_millis(100)),
            ..Default::default()
        });
        let start = Instant::now();
        let mut c = connect(&sink);
        c.reply();
        c.cmd("NOOP");
        assert!(start.elapsed() >= Duration::from_millis(200));
    }
}
