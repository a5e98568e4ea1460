//! The client's own checks, and whole conversations against the testkit's sink (a real
//! SMTP server on loopback) and against scripted hostile peers. The wire format's unit
//! tests are next to it, in `postern_smtp::client`.

use super::*;
use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use postern_smtp::Status;
use postern_testkit::{Sink, SinkConfig, TestCa, TlsIdentity};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};

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
        content: Content::of(body),
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
        .map(|r| {
            let c = match r.status {
                DeliveryStatus::Delivered => 'D',
                DeliveryStatus::Deferred => 'T',
                DeliveryStatus::Failed => 'F',
            };
            (c, r.reply.code)
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

/// Long runs without a line-start dot (sent from the body itself, across write chunks)
/// between short dotted lines (gathered into copies), in the clear and over TLS.
#[tokio::test]
async fn a_body_of_long_runs_and_dotted_lines_arrives_whole() {
    let mut body = Vec::new();
    for block in 0..12 {
        for i in 0..(block * 300) {
            body.extend_from_slice(
                format!("line {i} of block {block}, no dot here\r\n").as_bytes(),
            );
        }
        for i in 0..(block * 7 + 1) {
            body.extend_from_slice(format!(".{i}\r\n").as_bytes());
        }
        body.extend_from_slice(b"..\r\n.\r\n");
    }
    body.extend_from_slice(b".");
    for tls in [false, true] {
        let sink = Sink::start(SinkConfig {
            tls: tls.then(|| TlsIdentity::self_signed(&["mx.test"])),
            ..SinkConfig::default()
        });
        let policy = if tls {
            TlsPolicy::Opportunistic
        } else {
            TlsPolicy::None
        };
        let mut conn = connect(&sink, &config(policy)).await;
        assert_eq!(conn.is_tls(), tls);
        let to = rcpts(&["a@dest.test"]);
        let results = conn.send(&message(&to, &body)).await.unwrap();
        assert_eq!(codes(&results), [('D', 250)]);
        conn.quit().await;
        // The sink unstuffs; the body had no final CRLF, so one was added.
        let mut expected = body.clone();
        expected.extend_from_slice(b"\r\n");
        assert!(sink.wait_for(1, WAIT)[0].data == expected, "tls {tls}");
    }
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
    let sink =
        Sink::start(SinkConfig::default().with_data_reply(|_| "421 4.3.2 Shutting down".into()));
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
