//! Session tests without sockets: TLS and AUTH sequences, driven byte by byte.

use super::*;
use crate::Status;
use base64::Engine;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

/// A little driver: feeds input, answers AUTH with `check`, records what it saw.
struct Driver {
    session: Session,
    out: String,
    auths: Vec<AuthRequest>,
    messages: Vec<Message>,
    starttls: bool,
    check: fn(&AuthRequest) -> Result<String, Reply>,
    /// The size of each output the session asked to have flushed early.
    flushes: Vec<usize>,
    /// The recipient requests seen.
    recipients: Vec<RecipientRequest>,
    /// The answer to each [`Event::Sender`] (after `ask_sender`): a refusal, or `None`.
    sender_answer: Option<Reply>,
    /// The sender requests seen.
    senders: Vec<SenderRequest>,
}

fn good(r: &AuthRequest) -> Result<String, Reply> {
    if r.username == "alice" && r.password == "secret" {
        Ok("alice".into())
    } else {
        Err(catalogue::auth_failed())
    }
}

impl Driver {
    fn new(config: SessionConfig, tls: bool) -> Driver {
        let peer = Peer {
            addr: "192.0.2.7:4000".parse().unwrap(),
            tls: tls.then(|| TlsInfo {
                version: "TLSv1.3".into(),
                cipher: "TLS13_AES_128_GCM_SHA256".into(),
            }),
        };
        let mut d = Driver {
            session: Session::new(config, peer),
            out: String::new(),
            auths: Vec::new(),
            messages: Vec::new(),
            starttls: false,
            check: good,
            flushes: Vec::new(),
            recipients: Vec::new(),
            sender_answer: None,
            senders: Vec::new(),
        };
        d.pump();
        d
    }

    fn pump(&mut self) {
        loop {
            match self.session.poll() {
                Event::NeedInput | Event::Close => break,
                Event::Flush => {
                    let out = self.session.take_output();
                    self.flushes.push(out.len());
                    self.out.push_str(&String::from_utf8(out).unwrap());
                }
                Event::Sender(r) => {
                    self.senders.push(r);
                    let answer = self.sender_answer.clone().map_or(Ok(()), Err);
                    self.session.answer_sender(answer);
                }
                Event::Recipient(r) => {
                    self.recipients.push(r);
                    self.session.answer_recipient(Ok(()));
                }
                Event::Message(m) => {
                    self.messages.push(*m);
                    self.session.answer_message(catalogue::queued("T"));
                }
                Event::Authenticate(r) => {
                    let answer = (self.check)(&r);
                    self.auths.push(r);
                    self.session.answer_auth(answer);
                }
                Event::StartTls => {
                    self.starttls = true;
                    break;
                }
            }
        }
        self.out
            .push_str(&String::from_utf8(self.session.take_output()).unwrap());
    }

    /// Sends lines, returns the reply lines produced.
    fn send(&mut self, input: &str) -> Vec<String> {
        self.out.clear();
        self.session.receive(input.as_bytes());
        self.pump();
        self.out.lines().map(str::to_string).collect()
    }

    fn codes(&mut self, input: &str) -> Vec<String> {
        self.send(input)
            .into_iter()
            .filter(|l| l.as_bytes().get(3) == Some(&b' '))
            .map(|l| {
                l.split(' ')
                    .take(2)
                    .collect::<Vec<_>>()
                    .join(" ")
                    .trim_end()
                    .to_string()
            })
            .collect()
    }
}

fn auth_config() -> SessionConfig {
    SessionConfig {
        starttls: true,
        auth_mechanisms: vec!["PLAIN".into(), "LOGIN".into()],
        ..SessionConfig::new("mx.test", 10_000, 10)
    }
}

#[test]
fn auth_is_neither_offered_nor_accepted_without_tls() {
    let mut d = Driver::new(auth_config(), false);
    let ehlo = d.send("EHLO c.test\r\n");
    assert!(ehlo.iter().any(|l| l.ends_with("STARTTLS")));
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")), "{ehlo:?}");
    let plain = b64("\0alice\0secret");
    assert_eq!(d.codes(&format!("AUTH PLAIN {plain}\r\n")), ["538 5.7.11"]);
    assert!(
        d.auths.is_empty(),
        "credentials must not be checked in clear"
    );
}

#[test]
fn plaintext_auth_when_explicitly_allowed() {
    let config = SessionConfig {
        allow_plaintext_auth: true,
        ..auth_config()
    };
    let mut d = Driver::new(config, false);
    assert!(
        d.send("EHLO c.test\r\n")
            .iter()
            .any(|l| l == "250-AUTH PLAIN LOGIN")
    );
    let plain = b64("\0alice\0secret");
    assert_eq!(d.codes(&format!("AUTH PLAIN {plain}\r\n")), ["235 2.7.0"]);
}

#[test]
fn plain_with_and_without_initial_response() {
    let mut d = Driver::new(auth_config(), true);
    let ehlo = d.send("EHLO c.test\r\n");
    assert!(ehlo.iter().any(|l| l == "250-AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0wrong"))),
        ["535 5.7.8"]
    );
    assert_eq!(d.codes("AUTH PLAIN\r\n"), ["334"]);
    assert_eq!(
        d.codes(&format!("{}\r\n", b64("alice\0alice\0secret"))),
        ["235 2.7.0"]
    );
    assert_eq!(d.session.authenticated(), Some("alice"));
    assert_eq!(d.auths[1].authzid.as_deref(), Some("alice"));
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret"))),
        ["503 5.5.1"]
    );
    // The identity reaches the message and its Received: header.
    d.send("MAIL FROM:<alice@c.test> AUTH=<>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nhi\r\n.\r\n");
    let m = &d.messages[0];
    assert!(
        m.params.is_empty(),
        "AUTH= must not be passed on: {:?}",
        m.params
    );
    assert_eq!(m.protocol(), "ESMTPSA");
    let h = m.received_header("mx.test", "ID", "date");
    // The login name is never written into the message (Postfix's default).
    assert!(!h.contains("alice"), "{h}");
    assert!(h.contains("with ESMTPSA"), "{h}");
    assert!(
        h.contains("using TLSv1.3 with cipher TLS13_AES_128_GCM_SHA256"),
        "{h}"
    );
}

#[test]
fn login_exchange_and_cancel() {
    let mut d = Driver::new(auth_config(), true);
    d.send("EHLO c.test\r\n");
    assert_eq!(d.send("AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"]);
    assert_eq!(d.codes("*\r\n"), ["501 5.7.0"]);
    assert_eq!(d.send("AUTH LOGIN\r\n"), ["334 VXNlcm5hbWU6"]);
    assert_eq!(
        d.send(&format!("{}\r\n", b64("alice"))),
        ["334 UGFzc3dvcmQ6"]
    );
    assert_eq!(d.codes(&format!("{}\r\n", b64("secret"))), ["235 2.7.0"]);
    assert_eq!(d.auths[0].mechanism, "LOGIN");
    // with the user name as initial response
    let mut d = Driver::new(auth_config(), true);
    d.send("EHLO c.test\r\n");
    assert_eq!(
        d.send(&format!("AUTH LOGIN {}\r\n", b64("alice"))),
        ["334 UGFzc3dvcmQ6"]
    );
    assert_eq!(d.codes(&format!("{}\r\n", b64("secret"))), ["235 2.7.0"]);
}

#[test]
fn malformed_auth_exchanges() {
    let mut d = Driver::new(auth_config(), true);
    assert_eq!(d.codes("AUTH PLAIN\r\n"), ["503 5.5.1"], "before EHLO");
    d.send("EHLO c.test\r\n");
    assert_eq!(d.codes("AUTH CRAM-MD5\r\n"), ["504 5.5.4"]);
    assert_eq!(d.codes("AUTH PLAIN !!!notbase64\r\n"), ["501 5.5.2"]);
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("nonul"))),
        ["501 5.5.2"]
    );
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("\0\0pw"))),
        ["501 5.5.2"]
    );
    assert_eq!(d.codes("AUTH PLAIN =\r\n"), ["501 5.5.2"]);
    // a long (but legal) initial response is not a "line too long"
    let long = b64(&format!("\0alice\0{}", "p".repeat(3000)));
    assert_eq!(d.codes(&format!("AUTH PLAIN {long}\r\n")), ["535 5.7.8"]);
    // an over-long SASL line ends the exchange with 500 5.5.6
    d.send("AUTH PLAIN\r\n");
    assert_eq!(
        d.codes(&format!("{}\r\n", "A".repeat(13_000))),
        ["500 5.5.6"]
    );
    assert_eq!(d.codes("NOOP\r\n"), ["250 2.0.0"]);
    // AUTH inside a transaction
    d.send("MAIL FROM:<a@c.test>\r\n");
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret"))),
        ["503 5.5.1"]
    );
}

#[test]
fn auth_required_listener() {
    let config = SessionConfig {
        auth_required: true,
        ..auth_config()
    };
    let mut d = Driver::new(config, true);
    d.send("EHLO c.test\r\n");
    assert_eq!(d.codes("MAIL FROM:<a@c.test>\r\n"), ["530 5.7.0"]);
    d.send(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret")));
    assert_eq!(d.codes("MAIL FROM:<a@c.test>\r\n"), ["250 2.1.0"]);
}

#[test]
fn require_tls_and_starttls_discards_pipelined_plaintext() {
    let config = SessionConfig {
        require_tls: true,
        ..auth_config()
    };
    let mut d = Driver::new(config, false);
    let ehlo = d.send("EHLO c.test\r\n");
    assert!(!ehlo.iter().any(|l| l.contains("AUTH")));
    assert_eq!(d.codes("MAIL FROM:<a@c.test>\r\n"), ["530 5.7.0"]);
    assert_eq!(
        d.codes(&format!("AUTH PLAIN {}\r\n", b64("\0alice\0secret"))),
        ["530 5.7.0"]
    );
    // CVE-2011-0411: commands pipelined behind STARTTLS are never executed.
    let r = d.send("STARTTLS\r\nMAIL FROM:<evil@c.test>\r\nRCPT TO:<x@y.test>\r\n");
    assert_eq!(r, ["220 2.0.0 Ready to start TLS"]);
    assert!(d.starttls);
    d.session.tls_established(TlsInfo {
        version: "TLSv1.2".into(),
        cipher: "X".into(),
    });
    d.pump();
    assert_eq!(
        d.codes("MAIL FROM:<a@c.test>\r\n"),
        ["503 5.5.1"],
        "EHLO again first"
    );
    let ehlo = d.send("EHLO c.test\r\n");
    assert!(ehlo.iter().any(|l| l == "250-AUTH PLAIN LOGIN"));
    assert!(!ehlo.iter().any(|l| l.contains("STARTTLS")));
    assert_eq!(d.codes("STARTTLS\r\n"), ["503 5.5.1"]);
    assert_eq!(d.codes("MAIL FROM:<a@c.test>\r\n"), ["250 2.1.0"]);
}

#[test]
fn auth_request_debug_hides_the_password() {
    let r = AuthRequest {
        mechanism: "PLAIN",
        authzid: None,
        username: "alice".into(),
        password: "hunter2".into(),
    };
    assert!(!format!("{r:?}").contains("hunter2"));
}

#[test]
fn xtext() {
    assert!(is_xtext("<>"));
    assert!(is_xtext("alice+40example.com"));
    assert!(!is_xtext("a+4"));
    assert!(!is_xtext("a+4g"));
    assert!(!is_xtext("a b"));
    assert!(!is_xtext(""));
}

#[test]
fn refusals_are_counted_and_taken() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100, 10), false);
    d.codes("EHLO c.test\r\n");
    // Declared too big at MAIL.
    assert_eq!(d.codes("MAIL FROM:<a@b.test> SIZE=101\r\n"), ["552 5.3.4"]);
    // Too big, found while reading.
    d.codes("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@c.test>\r\nDATA\r\n");
    let big = format!("{}\r\n.\r\n", "x".repeat(200));
    assert_eq!(d.codes(&big), ["552 5.3.4"]);
    // A bare LF.
    d.codes("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@c.test>\r\nDATA\r\n");
    assert_eq!(d.codes("a\nb\r\n.\r\n"), ["554 5.6.0"]);
    // BDAT over the limit.
    d.codes("MAIL FROM:<a@b.test>\r\nRCPT TO:<u@c.test>\r\n");
    let chunk = format!("BDAT 150 LAST\r\n{}", "y".repeat(150));
    assert_eq!(d.codes(&chunk), ["552 5.3.4"]);
    assert!(d.messages.is_empty());
    assert_eq!(
        d.session.take_refusals(),
        Refusals {
            size: 3,
            bare_line_ending: 1,
            line_too_long: 0,
            too_many_hops: 0,
        }
    );
    assert_eq!(d.session.take_refusals(), Refusals::default());
}

#[test]
fn pipelined_output_is_flushed_before_more_input_is_read() {
    let config = SessionConfig {
        max_junk_commands: u32::MAX,
        ..SessionConfig::new("mx.test", 10_000, 10)
    };
    let d = Driver::new(config, false);
    // 2,000 pipelined EHLOs (26 KB) give ~300 KB of replies.
    let batch = "EHLO c.test\r\n".repeat(2000);
    let mut s = d.session;
    s.receive(batch.as_bytes());
    let mut flushes = 0;
    loop {
        match s.poll() {
            Event::Flush => {
                let out = s.take_output();
                assert!(
                    out.len() < MAX_PENDING_OUTPUT + 1024,
                    "{} bytes pending",
                    out.len()
                );
                flushes += 1;
            }
            Event::NeedInput => break,
            Event::Close => break,
            other => panic!("{other:?}"),
        }
    }
    assert!(flushes > 10, "{flushes}");
    assert!(!s.is_closed());
    assert!(s.take_output().len() < MAX_PENDING_OUTPUT + 1024);
}

#[test]
fn junk_commands_count_as_errors_past_the_limit() {
    let config = SessionConfig {
        max_junk_commands: 5,
        max_errors: 3,
        ..SessionConfig::new("mx.test", 10_000, 10)
    };
    let mut d = Driver::new(config, false);
    d.send("EHLO c.test\r\n");
    for _ in 0..5 {
        assert_eq!(d.codes("NOOP\r\n"), ["250 2.0.0"]);
    }
    // Over the limit: still answered, but counted; the third error closes.
    assert_eq!(d.codes("RSET\r\n"), ["250 2.0.0"]);
    assert_eq!(d.codes("VRFY x\r\n")[0].split(' ').next(), Some("252"));
    assert_eq!(d.codes("HELP\r\n"), ["421 4.7.0"]);
    assert!(d.session.is_closed());

    // A message accepted gives a fresh allowance; the first EHLO is not junk.
    let config = SessionConfig {
        max_junk_commands: 2,
        max_errors: 1,
        ..SessionConfig::new("mx.test", 10_000, 10)
    };
    let mut d = Driver::new(config, false);
    d.send("EHLO c.test\r\nNOOP\r\nNOOP\r\n");
    d.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\nhi\r\n.\r\n");
    assert_eq!(d.messages.len(), 1);
    assert_eq!(d.codes("NOOP\r\nNOOP\r\n"), ["250 2.0.0", "250 2.0.0"]);
    assert_eq!(d.codes("NOOP\r\n"), ["421 4.7.0"]);
}

#[test]
fn too_many_received_fields_is_a_loop() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO c.test\r\n");
    let message = |n: usize| {
        let mut m = String::new();
        for i in 0..n {
            if i % 2 == 0 {
                m.push_str(&format!("Received: from h{i} by h{i}; date\r\n"));
            } else {
                m.push_str(&format!("delivered-to: u{i}@d.test\r\n"));
            }
        }
        m.push_str("Subject: x\r\n\r\nReceived: in the body does not count\r\n.\r\n");
        m
    };
    d.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n");
    assert_eq!(d.codes(&message(49)), ["250 2.0.0"]);
    d.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n");
    assert_eq!(d.codes(&message(50)), ["554 5.4.6"]);
    assert_eq!(d.messages.len(), 1);
    assert_eq!(d.session.take_refusals().too_many_hops, 1);
}

#[test]
fn received_header_sanitises_helo() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO x;by(forged)\u{e9}t\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\nhi\r\n.\r\n");
    let h = d.messages[0].received_header("mx.test", "ID", "date");
    assert!(
        h.starts_with("Received: from x?by?forged??t ([192.0.2.7])\r\n"),
        "{h}"
    );
    assert!(h.is_ascii());
    assert_eq!(header_safe_helo("[192.0.2.1]"), "[192.0.2.1]");
    assert_eq!(header_safe_helo("mail.example.com"), "mail.example.com");
    assert_eq!(header_safe_helo(&"a".repeat(300)).len(), 255);
}

#[test]
fn duplicate_recipients_are_compared_as_mailboxes() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test> SMTPUTF8\r\n");
    let codes = d.codes(
        "RCPT TO:<a@x.test>\r\nRCPT TO:<\"a\"@x.test>\r\nRCPT TO:<@r.test:a@x.test>\r\n\
         RCPT TO:<a@X.TEST.>\r\nRCPT TO:<u@b\u{fc}cher.example>\r\nRCPT TO:<u@xn--bcher-kva.example>\r\n",
    );
    assert_eq!(codes, ["250 2.1.5"; 6]);
    // Asked about (and stored) once each.
    assert_eq!(d.recipients.len(), 2, "{:?}", d.recipients);
    d.send("DATA\r\nhi\r\n.\r\n");
    assert_eq!(d.messages[0].recipients.len(), 2);
}

#[test]
fn postmaster_goes_to_the_configured_address() {
    let config = SessionConfig {
        postmaster: Some(crate::address::parse_mailbox("admin@corp.test").unwrap()),
        ..SessionConfig::new("mx.test", 100_000, 10)
    };
    let mut d = Driver::new(config, false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\n");
    d.send("RCPT TO:<Postmaster>\r\nRCPT TO:<POSTMASTER@MX.test>\r\nRCPT TO:<postmaster@other.test>\r\n");
    let asked: Vec<(String, bool)> = d
        .recipients
        .iter()
        .map(|r| (r.recipient.to_string(), r.postmaster))
        .collect();
    assert_eq!(
        asked,
        [
            ("admin@corp.test".to_string(), true),
            ("postmaster@other.test".to_string(), false)
        ]
    );
    // Without a deliverable postmaster, <Postmaster> is an ordinary recipient.
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<Postmaster>\r\n");
    assert_eq!(d.recipients[0].recipient.to_string(), "postmaster@mx.test");
    assert!(!d.recipients[0].postmaster);
}

#[test]
fn a_refused_body_is_read_to_its_end_and_answered_452() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n");
    d.send("first part\r\n");
    assert!(d.session.body_bytes_after(0) > 0);
    d.session.refuse_body(catalogue::insufficient_storage());
    assert_eq!(d.session.body_bytes_after(65536), 0);
    assert_eq!(d.codes("more\r\n.\r\nNOOP\r\n"), ["452 4.3.1", "250 2.0.0"]);
    assert!(d.messages.is_empty());
    // BDAT: the chunk in progress fails, the transaction with it.
    d.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nBDAT 20\r\n12345");
    d.session.refuse_body(catalogue::insufficient_storage());
    assert_eq!(d.codes("678901234567890"), ["452 4.3.1"]);
    assert_eq!(d.codes("BDAT 1 LAST\r\nx"), ["503 5.5.1"]);
    // The next message is fine.
    d.send("MAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\nDATA\r\n");
    assert_eq!(d.codes("ok\r\n.\r\n"), ["250 2.0.0"]);
}

#[test]
fn body_buffers_grow_in_bounded_steps() {
    use crate::data::{capacity_after, extend_bounded};
    let mut v = Vec::new();
    extend_bounded(&mut v, &[0; 100]);
    assert_eq!(v.capacity(), 128);
    let chunk = vec![0u8; 300_000];
    for _ in 0..10 {
        let predicted = capacity_after(&v, chunk.len());
        extend_bounded(&mut v, &chunk);
        assert_eq!(v.capacity(), predicted);
        assert!(v.capacity() - v.len() <= 1 << 20);
    }
    assert_eq!(v.capacity(), 3 << 20);
}

#[test]
fn bdat_chunks_stay_counted_between_chunks() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 100_000, 10), false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRCPT TO:<b@d.test>\r\n");
    assert!(!d.session.in_message());
    let lines = format!("{}\r\n", "x".repeat(998)).repeat(3);
    assert_eq!(d.codes(&format!("BDAT 3000\r\n{lines}")), ["250 2.0.0"]);
    // Between chunks: nothing being read, but 3000 octets held and the message open.
    assert!(!d.session.in_transfer());
    assert!(d.session.in_message());
    assert!(d.session.body_bytes_after(0) >= 3000);
    assert_eq!(d.codes("BDAT 2 LAST\r\nyy"), ["250 2.0.0"]);
    assert!(!d.session.in_message());
    assert_eq!(d.session.body_bytes_after(0), 0);
}

#[test]
fn mail_is_put_to_the_driver_only_when_it_asks() {
    let mut d = Driver::new(SessionConfig::new("mx.test", 1000, 10), false);
    d.send("EHLO c.test\r\nMAIL FROM:<a@c.test>\r\nRSET\r\n");
    assert!(d.senders.is_empty());
    assert!(d.out.contains("250 2.1.0"), "{}", d.out);

    d.session.ask_sender();
    d.sender_answer = Some(Reply::new(
        550,
        Some(Status(5, 7, 1)),
        "sender refused by a milter",
    ));
    d.out.clear();
    d.send("MAIL FROM:<b@c.test> BODY=8BITMIME\r\nRCPT TO:<x@y.test>\r\n");
    assert_eq!(d.senders.len(), 1);
    assert_eq!(d.senders[0].sender.to_string(), "<b@c.test>");
    assert_eq!(d.senders[0].helo, "c.test");
    assert_eq!(d.senders[0].params[0].to_wire(), "BODY=8BITMIME");
    assert!(
        d.out
            .starts_with("550 5.7.1 sender refused by a milter\r\n503 "),
        "{}",
        d.out
    );
    assert!(!d.session.in_transaction());

    d.sender_answer = None;
    d.out.clear();
    d.send("MAIL FROM:<b@c.test>\r\n");
    assert!(d.out.starts_with("250 2.1.0"), "{}", d.out);
    assert!(d.session.in_transaction());
    d.send("RSET\r\n");
    assert!(!d.session.in_transaction());

    // A 421 ends the session.
    d.sender_answer = Some(Reply::new(
        421,
        Some(Status(4, 7, 0)),
        "milter says go away",
    ));
    d.out.clear();
    d.send("MAIL FROM:<b@c.test>\r\nNOOP\r\n");
    assert_eq!(d.out, "421 4.7.0 milter says go away\r\n");
    assert!(d.session.is_closed());
}

/// A body handed straight to the DATA reader by `receive` (nothing buffered before it)
/// must read exactly as one that went through the input buffer: however the bytes are
/// cut, with commands pipelined after the end (RFC 2920) and a second message after
/// that, the same messages, the same replies, and nothing after the end taken as body.
#[test]
fn a_body_read_straight_from_the_socket_reads_as_a_buffered_one() {
    let session = "EHLO c\r\nMAIL FROM:<a@b.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\n";
    let rest = "Subject: one\r\n\r\nline\r\n..dot\r\n.\r\nMAIL FROM:<c@d.test>\r\nRCPT TO:<x@y.test>\r\nDATA\r\nbody two\r\n.\r\nQUIT\r\n";
    let run = |cut: usize| {
        let mut d = Driver::new(SessionConfig::new("mx.test", 10_000, 10), false);
        d.send(session);
        let (a, b) = rest.as_bytes().split_at(cut);
        let mut replies = d.send(std::str::from_utf8(a).unwrap());
        replies.extend(d.send(std::str::from_utf8(b).unwrap()));
        let bodies: Vec<Vec<u8>> = d.messages.iter().map(|m| m.body.clone()).collect();
        (replies, bodies)
    };
    let (replies, bodies) = run(0);
    assert_eq!(
        bodies,
        vec![
            b"Subject: one\r\n\r\nline\r\n.dot\r\n".to_vec(),
            b"body two\r\n".to_vec()
        ]
    );
    assert!(replies.last().unwrap().starts_with("221"), "{replies:?}");
    for cut in 1..rest.len() {
        assert_eq!(run(cut), (replies.clone(), bodies.clone()), "cut at {cut}");
    }
}
