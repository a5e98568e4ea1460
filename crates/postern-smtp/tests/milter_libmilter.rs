//! The milter codec against the reference libmilter: `testdata/milter/scripted.py`, a
//! milter on Debian's python3-milter (pymilter, which is libmilter underneath; scripts/test
//! installs it), started on a free loopback port and driven over a blocking TcpStream
//! (blocking I/O in this test only: the codec itself has none) through whole messages.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::process::{Child, Command as Process, Stdio};
use std::time::{Duration, Instant};

use postern_smtp::Reply;
use postern_smtp::milter::proto::*;
use postern_smtp::milter::{Action, ClientAddr, Config, Decision, Event, Sent, Session};
use postern_smtp::reply::Status;

struct Kill(Child);

impl Drop for Kill {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// Starts the scripted milter and connects to it.
fn start() -> (Kill, TcpStream) {
    let port = free_port();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata/milter/scripted.py");
    // Debian's package installs for Debian's interpreter, which a PATH may not put first.
    let python = if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    };
    let child = Process::new(python)
        .arg(&script)
        .arg(port.to_string())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with the Milter module (scripts/test installs python3-milter)");
    let child = Kill(child);
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        if let Ok(tcp) = TcpStream::connect(("127.0.0.1", port)) {
            tcp.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
            return (child, tcp);
        }
        assert!(
            Instant::now() < deadline,
            "the scripted milter did not start"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A minimal blocking driver.
struct Driver {
    session: Session,
    tcp: TcpStream,
}

impl Driver {
    fn flush(&mut self) {
        let out = self.session.take_output();
        self.tcp.write_all(&out).unwrap();
    }

    /// Sends what is pending and reads until the decision: the actions, then it.
    fn answer(&mut self) -> (Vec<Action>, Decision) {
        self.flush();
        let mut actions = Vec::new();
        let mut buf = [0u8; 4096];
        loop {
            while let Some(event) = self.session.poll_event() {
                match event.unwrap() {
                    Event::Action(a) => actions.push(a),
                    Event::Decision(d) => return (actions, d),
                    Event::Negotiated => return (actions, Decision::Continue),
                    Event::Progress => {}
                }
            }
            let n = self.tcp.read(&mut buf).unwrap();
            assert!(n > 0, "the milter closed the connection");
            self.session.feed(&buf[..n]);
        }
    }

    fn expect(&mut self, sent: Sent, decision: Decision) {
        assert_eq!(sent, Sent::AwaitReply);
        assert_eq!(self.answer(), (vec![], decision));
    }
}

#[test]
fn a_libmilter_milter_negotiates_answers_and_modifies() {
    let (_milter, tcp) = start();
    let mut d = Driver {
        session: Session::new(Config::default()),
        tcp,
    };
    assert_eq!(d.answer(), (vec![], Decision::Continue));
    let n = d.session.negotiated().expect("negotiated").clone();
    assert_eq!(n.version, 6);
    assert!(n.allows(SMFIF_ADDHDRS | SMFIF_CHGHDRS), "{n:?}");
    // What the script's callbacks imply: no HELO (none defined), no DATA, no reply to
    // CONNECT or to headers (@noreply).
    for flag in [SMFIP_NOHELO, SMFIP_NODATA, SMFIP_NR_CONN, SMFIP_NR_HDR] {
        assert_ne!(n.protocol & flag, 0, "flag 0x{flag:x} in {n:?}");
    }

    let s = &mut d.session;
    let addr = ClientAddr::Inet("192.0.2.7:4000".parse().unwrap());
    let macros = [
        ("j", "mx.test"),
        ("daemon_name", "postern"),
        ("client_addr", "192.0.2.7"),
    ];
    assert_eq!(s.connect(&macros, "client.test", &addr), Ok(Sent::NoReply));
    assert_eq!(s.helo(&[], "client.test"), Ok(Sent::Skipped));

    // A message whose second recipient is refused; the rest is accepted, with changes.
    let sent = d
        .session
        .mail(&[("i", "Q123")], "a@b.test", &["SIZE=70100"])
        .unwrap();
    d.expect(sent, Decision::Continue);
    let sent = d.session.rcpt(&[], "refuse@d.test", &[]).unwrap();
    d.expect(
        sent,
        Decision::Reply(Reply::new(550, Some(Status(5, 1, 1)), "no such user here")),
    );
    let sent = d.session.rcpt(&[], "c@d.test", &[]).unwrap();
    d.expect(sent, Decision::Continue);
    assert_eq!(d.session.data(&[]), Ok(Sent::Skipped));
    assert_eq!(d.session.header("Subject", b" hello"), Ok(Sent::NoReply));
    assert_eq!(d.session.header("From", b" <a@b.test>"), Ok(Sent::NoReply));
    let sent = d.session.eoh(&[]).unwrap();
    d.expect(sent, Decision::Continue);
    // Larger than one chunk: two BODY packets, each answered.
    let body = b"0123456789012345678\r\n".repeat(70_000 / 21 + 1);
    let mut rest = &body[..];
    let mut packets = 0;
    while !rest.is_empty() {
        let (n, sent) = d.session.body(rest).unwrap();
        d.expect(sent, Decision::Continue);
        rest = &rest[n..];
        packets += 1;
    }
    assert_eq!(packets, 2);
    assert_eq!(d.session.eom(&[]), Ok(Sent::AwaitReply));
    let (actions, decision) = d.answer();
    assert_eq!(decision, Decision::Accept);
    assert_eq!(
        actions,
        [
            Action::AddHeader {
                name: "X-Scripted".into(),
                value: format!(" client=192.0.2.7 i=Q123 bytes={}", body.len()),
            },
            Action::ChgHeader {
                index: 1,
                name: "Subject".into(),
                value: " [scripted] hello".into(),
            },
        ]
    );

    // The next message on the same connection is refused at its end, in two lines.
    let sent = d.session.mail(&[], "a@b.test", &[]).unwrap();
    d.expect(sent, Decision::Continue);
    let sent = d.session.rcpt(&[], "c@d.test", &[]).unwrap();
    d.expect(sent, Decision::Continue);
    let sent = d.session.eoh(&[]).unwrap();
    d.expect(sent, Decision::Continue);
    let (_, sent) = d.session.body(b"REJECTME\r\n").unwrap();
    d.expect(sent, Decision::Continue);
    assert_eq!(d.session.eom(&[]), Ok(Sent::AwaitReply));
    let (actions, decision) = d.answer();
    assert!(actions.is_empty(), "{actions:?}");
    assert_eq!(
        decision,
        Decision::Reply(Reply {
            code: 554,
            status: Some(Status(5, 7, 1)),
            lines: vec![
                "rejected by the scripted milter".into(),
                "second line".into()
            ],
        })
    );

    // And a sender it refuses at MAIL; then RSET and QUIT.
    let sent = d.session.mail(&[], "reject-sender@b.test", &[]).unwrap();
    d.expect(
        sent,
        Decision::Reply(Reply::new(
            550,
            Some(Status(5, 7, 1)),
            "sender refused by the scripted milter",
        )),
    );
    assert_eq!(d.session.abort(), Ok(Sent::Skipped));
    assert_eq!(d.session.quit(), Ok(Sent::NoReply));
    d.flush();
    // libmilter closes after QUIT, having sent nothing more.
    let mut rest = Vec::new();
    d.tcp.read_to_end(&mut rest).unwrap();
    assert!(rest.is_empty(), "{rest:?}");
    d.session.feed(&rest);
    assert_eq!(d.session.poll_event(), None);
    assert_eq!(d.session.handle_eof(), Ok(()));
}
