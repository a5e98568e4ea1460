//! Byte-level SMTP transcripts (testdata/transcripts/*.txt), each run two ways from the
//! same file: in memory against the sans-IO core with the real relay policy, and over
//! TCP against `postern serve`. Both must produce the same replies.
//!
//! Format, one step per line:
//!   `# client: IP`   source address (default 127.0.0.2, an outside client)
//!   `C: text`        send text + CRLF; consecutive C/C! lines go out in ONE write
//!   `C! text`        send text without CRLF
//!   `S: prefix`      the next reply line starts with prefix
//!   `CLOSED`         the server closed the connection
//! In text, `\r` `\n` `\\` `\xHH` are escapes and `{N*TEXT}` repeats TEXT N times.
//! Other `#` lines are comments.

use std::net::SocketAddr;
use std::path::Path;

use crate::common::{Client, Server, base_config};
use postern::config::Config;
use postern::policy::{Client as PolicyClient, RelayPolicy};
use postern_smtp::server::{Peer, SessionConfig};
use postern_smtp::{Event, Session, catalogue};

#[derive(Debug)]
enum Step {
    Send(Vec<u8>),
    Expect(String),
    Closed,
}

struct Transcript {
    name: String,
    client: String,
    steps: Vec<Step>,
}

fn unescape(text: &str) -> Vec<u8> {
    // Expand {N*TEXT} first.
    let mut expanded = String::new();
    let mut rest = text;
    while let Some(open) = rest.find('{') {
        let Some(close) = rest[open..].find('}') else {
            break;
        };
        let inner = &rest[open + 1..open + close];
        match inner
            .split_once('*')
            .and_then(|(n, t)| Some((n.parse::<usize>().ok()?, t)))
        {
            Some((n, t)) => {
                expanded.push_str(&rest[..open]);
                expanded.push_str(&t.repeat(n));
            }
            None => expanded.push_str(&rest[..=open + close]),
        }
        rest = &rest[open + close + 1..];
    }
    expanded.push_str(rest);
    let b = expanded.as_bytes();
    let mut out = Vec::new();
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 1 < b.len() {
            match b[i + 1] {
                b'r' => out.push(b'\r'),
                b'n' => out.push(b'\n'),
                b'\\' => out.push(b'\\'),
                b'x' => {
                    let hex = std::str::from_utf8(&b[i + 2..i + 4]).unwrap();
                    out.push(u8::from_str_radix(hex, 16).unwrap());
                    i += 2;
                }
                other => panic!("unknown escape \\{}", other as char),
            }
            i += 2;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    out
}

fn load(path: &Path) -> Transcript {
    let text = std::fs::read_to_string(path).unwrap();
    let mut t = Transcript {
        name: path.file_name().unwrap().to_string_lossy().into_owned(),
        client: crate::common::OUTSIDE.to_string(),
        steps: Vec::new(),
    };
    for line in text.lines() {
        if let Some(ip) = line.strip_prefix("# client: ") {
            t.client = ip.trim().to_string();
        } else if line.starts_with('#') || line.trim().is_empty() {
        } else if let Some(c) = line.strip_prefix("C: ").or((line == "C:").then_some("")) {
            let mut bytes = unescape(c);
            bytes.extend_from_slice(b"\r\n");
            push_send(&mut t.steps, bytes);
        } else if let Some(c) = line.strip_prefix("C! ") {
            push_send(&mut t.steps, unescape(c));
        } else if let Some(s) = line.strip_prefix("S: ") {
            t.steps.push(Step::Expect(s.to_string()));
        } else if line.trim() == "CLOSED" {
            t.steps.push(Step::Closed);
        } else {
            panic!("{}: bad line {line:?}", t.name);
        }
    }
    t
}

/// Consecutive sends merge into one write: that is how pipelining is exercised.
fn push_send(steps: &mut Vec<Step>, bytes: Vec<u8>) {
    if let Some(Step::Send(prev)) = steps.last_mut() {
        prev.extend_from_slice(&bytes);
    } else {
        steps.push(Step::Send(bytes));
    }
}

fn transcripts() -> Vec<Transcript> {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/transcripts");
    let mut paths: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "txt"))
        .collect();
    paths.sort();
    let all: Vec<_> = paths.iter().map(|p| load(p)).collect();
    assert!(all.len() >= 8, "transcripts missing");
    all
}

/// The in-memory driver: the same answers the daemon gives, without sockets.
struct Memory {
    session: Session,
    policy: RelayPolicy,
    output: Vec<u8>,
    closed: bool,
}

impl Memory {
    fn pump(&mut self) {
        while !self.closed {
            match self.session.poll() {
                Event::NeedInput => break,
                Event::Flush => self.output.extend(self.session.take_output()),
                Event::Sender(_) => self.session.answer_sender(Ok(())),
                Event::Recipient(r) => {
                    let client = PolicyClient {
                        ip: self.session.peer().ip(),
                        authenticated: r.authenticated.as_deref(),
                        dnsbl: None,
                    };
                    let d = self.policy.decide(client, &r.recipient);
                    self.session.answer_recipient(d.into_result());
                }
                Event::Message(_) => self.session.answer_message(catalogue::queued("MEMORY")),
                Event::StartTls => panic!("STARTTLS is not offered"),
                Event::Authenticate(_) => panic!("AUTH is not offered"),
                Event::Close => self.closed = true,
            }
        }
        self.output.extend(self.session.take_output());
    }

    fn next_line(&mut self) -> Option<String> {
        let lf = self.output.windows(2).position(|w| w == b"\r\n")?;
        let line = String::from_utf8(self.output[..lf].to_vec()).unwrap();
        self.output.drain(..lf + 2);
        Some(line)
    }
}

fn run_in_memory(t: &Transcript) {
    let text = base_config(2525, Path::new("/nonexistent"), "", "");
    let config = Config::from_str(&text, Path::new("transcript.toml")).unwrap();
    let session = Session::new(
        SessionConfig {
            hostname: config.hostname.clone(),
            max_message_size: config.max_message_size,
            max_recipients: config.max_recipients,
            max_errors: config.max_errors,
            ..SessionConfig::new(config.hostname.clone(), 0, 0)
        },
        Peer {
            addr: SocketAddr::new(t.client.parse().unwrap(), 40000),
            tls: None,
        },
    );
    let mut m = Memory {
        session,
        policy: RelayPolicy::new(&config.relay, None),
        output: Vec::new(),
        closed: false,
    };
    m.pump();
    for (i, step) in t.steps.iter().enumerate() {
        match step {
            Step::Send(bytes) => {
                m.session.receive(bytes);
                m.pump();
            }
            Step::Expect(prefix) => {
                let line = m.next_line();
                assert!(
                    line.as_deref()
                        .is_some_and(|l| l.starts_with(prefix.as_str())),
                    "{} (memory) step {i}: want {prefix:?}, got {line:?}",
                    t.name
                );
            }
            Step::Closed => assert!(
                m.closed && m.output.is_empty(),
                "{} (memory) step {i}: expected close",
                t.name
            ),
        }
    }
}

fn run_over_tcp(server: &Server, t: &Transcript) {
    let mut c = Client::connect(&t.client, server.addr());
    for (i, step) in t.steps.iter().enumerate() {
        match step {
            Step::Send(bytes) => c.send(bytes),
            Step::Expect(prefix) => {
                let line = c.read_line();
                assert!(
                    line.as_deref()
                        .is_some_and(|l| l.starts_with(prefix.as_str())),
                    "{} (tcp) step {i}: want {prefix:?}, got {line:?}",
                    t.name
                );
            }
            Step::Closed => assert!(c.is_closed(), "{} (tcp) step {i}: expected close", t.name),
        }
    }
}

#[test]
fn transcripts_in_memory() {
    for t in transcripts() {
        run_in_memory(&t);
    }
}

#[test]
fn transcripts_over_tcp() {
    let server = Server::start("", "");
    for t in transcripts() {
        run_over_tcp(&server, &t);
    }
}
