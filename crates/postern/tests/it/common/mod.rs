//! Shared helpers for the integration tests: start the real `postern` binary on a
//! loopback port with a config written for the test, and talk SMTP to it with a small
//! blocking client that can bind to a chosen source address (127.0.0.2 plays the
//! outside world; trusted_networks is 127.0.0.1/32).
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{IpAddr, SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

pub const OUTSIDE: &str = "127.0.0.2";
pub const INSIDE: &str = "127.0.0.1";

/// A free loopback port (bound then released; the race is harmless in practice).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The config every test starts from; `extra` is appended (top-level keys must come
/// before any table, so tests put them in `top`).
pub fn base_config(port: u16, spool: &Path, top: &str, extra: &str) -> String {
    // Tests that set no routes must not reach real DNS or the Internet: everything goes
    // to a closed loopback port and stays queued (deferred).
    let fallback = if extra.contains("[[route]]") || extra.contains("[delivery]") {
        ""
    } else {
        "\n[[route]]\ndomains = [\"*\"]\nnext_hop = \"[127.0.0.1]:1\"\n"
    };
    format!(
        r#"hostname = "relay.test"
spool_dir = "{spool}"
max_message_size = "64KB"
max_recipients = 5
{top}

[[listener]]
address = "127.0.0.1:{port}"
tls = "none"
max_connections = 1000
per_ip_connections = 500

[relay]
accepted_domains = ["accepted.test", "company.test"]
trusted_networks = ["127.0.0.1/32"]
{extra}
{fallback}"#,
        spool = spool.display()
    )
}

pub struct Server {
    pub child: Option<Child>,
    pub port: u16,
    pub dir: tempfile::TempDir,
    pub config: PathBuf,
}

impl Server {
    /// Starts postern with the base config plus `top`/`extra`.
    pub fn start(top: &str, extra: &str) -> Server {
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let text = base_config(port, &dir.path().join("spool"), top, extra);
        Server::start_with_config(dir, port, &text)
    }

    /// Starts postern with exactly `text` as its config; `port` must be a listener.
    pub fn start_with_config(dir: tempfile::TempDir, port: u16, text: &str) -> Server {
        let config = dir.path().join("postern.toml");
        std::fs::write(&config, text).unwrap();
        let mut s = Server {
            child: None,
            port,
            dir,
            config,
        };
        s.spawn();
        s
    }

    pub fn spool(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("postern.log")
    }

    /// The server's log so far.
    pub fn log(&self) -> String {
        std::fs::read_to_string(self.log_path()).unwrap_or_default()
    }

    /// (Re)starts the process on the same config and spool; waits until it answers.
    pub fn spawn(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.log_path())
            .unwrap();
        let child = Command::new(env!("CARGO_BIN_EXE_postern"))
            .args(["serve", "--config"])
            .arg(&self.config)
            .env("RUST_LOG", "info,maillog=debug")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .unwrap();
        self.child = Some(child);
        self.wait_ready();
    }

    fn wait_ready(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Ok(mut s) = TcpStream::connect(("127.0.0.1", self.port)) {
                // Read the greeting so the probe is a clean session, then leave.
                s.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
                let mut buf = [0u8; 512];
                if let Ok(n) = s.read(&mut buf)
                    && buf[..n].starts_with(b"220 ")
                {
                    let _ = s.write_all(b"QUIT\r\n");
                    return;
                }
            }
            if let Some(status) = self.child.as_mut().unwrap().try_wait().unwrap() {
                panic!("postern exited early ({status}):\n{}", self.log());
            }
            assert!(
                Instant::now() < deadline,
                "postern did not start:\n{}",
                self.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    pub fn pid(&self) -> u32 {
        self.child.as_ref().unwrap().id()
    }

    /// kill -9: the crash case.
    pub fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            c.kill().unwrap();
            c.wait().unwrap();
        }
    }

    /// SIGTERM, then wait for the exit (at most `within`).
    pub fn terminate(&mut self, within: Duration) -> ExitStatus {
        let mut child = self.child.take().expect("running");
        let ok = Command::new("kill")
            .args(["-TERM", &child.id().to_string()])
            .status()
            .unwrap();
        assert!(ok.success());
        let deadline = Instant::now() + within;
        loop {
            if let Some(status) = child.try_wait().unwrap() {
                return status;
            }
            if Instant::now() > deadline {
                let _ = child.kill();
                panic!("postern did not exit within {within:?}:\n{}", self.log());
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn client(&self, from: &str) -> Client {
        Client::connect(from, self.addr())
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

/// Runs `postern` with arguments; returns (exit code, stdout, stderr).
pub fn run_cli(args: &[&str]) -> (i32, String, String) {
    let out = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .output()
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The client's connection, before or after TLS.
enum Conn {
    Plain(TcpStream),
    Tls(Box<rustls::StreamOwned<rustls::ClientConnection, TcpStream>>),
}

impl Read for Conn {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.read(buf),
            Conn::Tls(s) => s.read(buf),
        }
    }
}

impl Write for Conn {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        match self {
            Conn::Plain(s) => s.write(buf),
            Conn::Tls(s) => s.write(buf),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            Conn::Plain(s) => s.flush(),
            Conn::Tls(s) => s.flush(),
        }
    }
}

/// Runs `postern` with arguments, feeding `stdin` (for `--password-stdin`).
pub fn run_cli_stdin(args: &[&std::ffi::OsStr], stdin: &str) -> std::process::Output {
    let mut child = Command::new(env!("CARGO_BIN_EXE_postern"))
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // A command that refuses its arguments may exit before reading its input: a broken
    // pipe here is that, not a failure (its exit status and output say what happened).
    match child.stdin.take().unwrap().write_all(stdin.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => {}
        other => other.unwrap(),
    }
    child.wait_with_output().unwrap()
}

/// A minimal blocking SMTP client, byte-exact: it sends what it is told. It can start
/// TLS (STARTTLS or implicit) with a rustls client config the test provides.
pub struct Client {
    conn: Option<Conn>,
    /// Bytes read but not yet returned as lines.
    pending: Vec<u8>,
}

/// One reply: its code and all its lines (each without CRLF).
#[derive(Debug)]
pub struct Reply {
    pub code: u16,
    pub lines: Vec<String>,
}

impl Reply {
    pub fn text(&self) -> String {
        self.lines.join("\n")
    }
}

fn tcp_from(from: &str, to: SocketAddr) -> std::io::Result<TcpStream> {
    let ip: IpAddr = from.parse().unwrap();
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(to),
        socket2::Type::STREAM,
        None,
    )?;
    socket.bind(&SocketAddr::new(ip, 0).into())?;
    socket.connect_timeout(&to.into(), Duration::from_secs(5))?;
    let stream: TcpStream = socket.into();
    stream.set_read_timeout(Some(Duration::from_secs(15)))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// Runs a TLS handshake to completion over `tcp`.
fn tls_over(
    tcp: TcpStream,
    config: Arc<rustls::ClientConfig>,
    name: &str,
) -> std::io::Result<Conn> {
    let server_name = rustls_pki_types::ServerName::try_from(name.to_string())
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let conn = rustls::ClientConnection::new(config, server_name)
        .map_err(|e| std::io::Error::other(e.to_string()))?;
    let mut tls = rustls::StreamOwned::new(conn, tcp);
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock)?;
    }
    Ok(Conn::Tls(Box::new(tls)))
}

impl Client {
    /// Connects to `to` from source address `from` (e.g. OUTSIDE).
    pub fn connect(from: &str, to: SocketAddr) -> Client {
        Client::try_connect(from, to).expect("connect")
    }

    pub fn try_connect(from: &str, to: SocketAddr) -> std::io::Result<Client> {
        Ok(Client {
            conn: Some(Conn::Plain(tcp_from(from, to)?)),
            pending: Vec::new(),
        })
    }

    /// Implicit TLS (port 465 style): the handshake comes first.
    pub fn connect_tls(
        from: &str,
        to: SocketAddr,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> std::io::Result<Client> {
        Ok(Client {
            conn: Some(tls_over(tcp_from(from, to)?, config, name)?),
            pending: Vec::new(),
        })
    }

    /// After a 220 to STARTTLS: the handshake. Anything the server sent after the 220
    /// in plaintext would be an error (it must not be read as protected).
    pub fn start_tls(
        &mut self,
        config: Arc<rustls::ClientConfig>,
        name: &str,
    ) -> std::io::Result<()> {
        assert!(
            self.pending.is_empty(),
            "plaintext after the 220: {:?}",
            self.pending
        );
        let Some(Conn::Plain(tcp)) = self.conn.take() else {
            panic!("TLS already active");
        };
        self.conn = Some(tls_over(tcp, config, name)?);
        Ok(())
    }

    fn conn(&mut self) -> &mut Conn {
        self.conn.as_mut().expect("connection")
    }

    pub fn send(&mut self, bytes: &[u8]) {
        self.conn().write_all(bytes).unwrap();
        self.conn().flush().unwrap();
    }

    pub fn line(&mut self, text: &str) {
        self.send(format!("{text}\r\n").as_bytes());
    }

    /// Reads one line (with its CRLF removed); None at EOF.
    pub fn read_line(&mut self) -> Option<String> {
        loop {
            if let Some(lf) = self.pending.iter().position(|&b| b == b'\n') {
                let mut line: Vec<u8> = self.pending.drain(..=lf).collect();
                assert!(line.ends_with(b"\r\n"), "reply line without CRLF: {line:?}");
                line.truncate(line.len() - 2);
                return Some(String::from_utf8(line).unwrap());
            }
            let mut buf = [0u8; 4096];
            match self.conn().read(&mut buf) {
                Ok(0) => return None,
                Ok(n) => self.pending.extend_from_slice(&buf[..n]),
                // A signal to the test process (a child stopped or continued: the
                // cluster tests freeze redis-server) interrupts the read: read again.
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::ConnectionReset | std::io::ErrorKind::UnexpectedEof
                    ) =>
                {
                    return None;
                }
                Err(e) => panic!("read: {e}"),
            }
        }
    }

    /// Reads one whole (possibly multi-line) reply.
    pub fn reply(&mut self) -> Reply {
        let mut lines = Vec::new();
        loop {
            let line = self
                .read_line()
                .expect("connection closed while reading a reply");
            let code: u16 = line.get(..3).and_then(|c| c.parse().ok()).expect(&line);
            let more = line.as_bytes().get(3) == Some(&b'-');
            lines.push(line);
            if !more {
                return Reply { code, lines };
            }
        }
    }

    /// Sends a command, reads its reply.
    pub fn cmd(&mut self, text: &str) -> Reply {
        self.line(text);
        self.reply()
    }

    /// Sends a command and asserts the reply code.
    pub fn expect(&mut self, text: &str, code: u16) -> Reply {
        let r = self.cmd(text);
        assert_eq!(r.code, code, "{text} -> {}", r.text());
        r
    }

    /// True when the server has closed the connection (EOF).
    pub fn is_closed(&mut self) -> bool {
        self.read_line().is_none()
    }

    /// Greeting + EHLO; returns the EHLO reply.
    pub fn hello(&mut self) -> Reply {
        assert_eq!(self.reply().code, 220);
        self.expect("EHLO client.test", 250)
    }

    /// A whole transaction; returns the final reply after the dot.
    pub fn send_mail(&mut self, from: &str, to: &[&str], body: &str) -> Reply {
        self.expect(&format!("MAIL FROM:<{from}>"), 250);
        for t in to {
            self.expect(&format!("RCPT TO:<{t}>"), 250);
        }
        self.data(body)
    }

    /// DATA, the body (whole CRLF lines, not dot-stuffed), the dot; returns the reply.
    pub fn data(&mut self, body: &str) -> Reply {
        self.expect("DATA", 354);
        self.send(body.as_bytes());
        self.send(b".\r\n");
        self.reply()
    }
}

/// A small, well-formed message.
pub fn message(subject: &str) -> String {
    format!(
        "From: <sender@outside.test>\r\nTo: <user@accepted.test>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@outside.test>\r\n\r\nHello.\r\n"
    )
}

/// `postern user add NAME --password-stdin --config CONFIG`; panics unless it succeeds.
pub fn add_user(config: &Path, name: &str, password: &str) {
    use std::ffi::OsStr;
    let args = [
        OsStr::new("user"),
        OsStr::new("add"),
        OsStr::new(name),
        OsStr::new("--password-stdin"),
        OsStr::new("--config"),
        config.as_os_str(),
    ];
    let out = run_cli_stdin(&args, &format!("{password}\n"));
    assert!(
        out.status.success(),
        "user add {name}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A `[[route]]` sending `domains` to `sink` (no MX lookup; the route's default TLS,
/// opportunistic: plaintext unless the sink offers STARTTLS).
pub fn route_to(domains: &[&str], sink: &postern_testkit::sink::Sink) -> String {
    let list: Vec<String> = domains.iter().map(|d| format!("\"{d}\"")).collect();
    format!(
        "\n[[route]]\ndomains = [{}]\nnext_hop = \"[127.0.0.1]:{}\"\n",
        list.join(", "),
        sink.addr().port()
    )
}

/// An SMTP sink on `ip:port` (MX hosts share the relay's `mx_port`).
pub fn sink_on(
    ip: [u8; 4],
    port: u16,
    config: postern_testkit::sink::SinkConfig,
) -> postern_testkit::sink::Sink {
    postern_testkit::sink::Sink::start_on(SocketAddr::from((ip, port)), config).expect("sink bind")
}

/// Sends one message from the trusted side (relays anywhere); returns its queue id.
pub fn submit_body(server: &Server, from: &str, to: &[&str], body: &str) -> String {
    let mut c = server.client(INSIDE);
    c.hello();
    let r = c.send_mail(from, to, body);
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    r.lines[0].rsplit(' ').next().unwrap().to_string()
}

/// Polls `f` every 50 ms until it holds; fails the test after `timeout`.
pub fn wait_until(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// One plain HTTP/1.1 request; returns (status line, headers, body).
pub fn http_get(port: u16, path: &str) -> (String, String, String) {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    write!(s, "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").unwrap();
    let mut raw = String::new();
    s.read_to_string(&mut raw).unwrap();
    let (head, body) = raw.split_once("\r\n\r\n").expect("a whole response");
    let (status, headers) = head.split_once("\r\n").unwrap_or((head, ""));
    (status.to_string(), headers.to_string(), body.to_string())
}
