//! Issue 13, rate limits against the real binary (one node; the shared counters of
//! `[cluster]` are in cluster.rs): `[[rate_limit]]` per user with AUTH, per client
//! address (127.0.0.2 against 127.0.0.3), per sender; windows of a few seconds; what
//! a refused or reset transaction gives back; `connection_rate` on a listener.
//!
//! AUTH runs on a plain-text listener (`allow_plaintext_auth`) to keep the tests short.

use std::time::Duration;

use base64::Engine;

use crate::common::{Client, OUTSIDE, Server, http_get, message, run_cli};

/// A server with a plain-text AUTH listener, users alice and bob, the metrics endpoint,
/// and `limits` appended; `listener` is added to its `[[listener]]`.
fn start(listener: &str, limits: &str) -> (Server, u16) {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let metrics = crate::common::free_port();
    let users = dir.path().join("users");
    let text = format!(
        r#"hostname = "relay.test"
spool_dir = "{spool}"
max_recipients = 20

[[listener]]
address = "127.0.0.1:{port}"
tls = "none"
auth = "optional"
allow_plaintext_auth = true
{listener}

[relay]
accepted_domains = ["accepted.test"]
trusted_networks = ["127.0.0.1/32"]

[auth]
users_file = "{users}"

[metrics]
address = "127.0.0.1:{metrics}"

[[route]]
domains = ["*"]
next_hop = "[127.0.0.1]:1"

{limits}
"#,
        spool = dir.path().join("spool").display(),
        users = users.display(),
    );
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, &text).unwrap();
    crate::common::add_user(&config, "alice", "correct horse");
    crate::common::add_user(&config, "bob", "battery staple");
    (Server::start_with_config(dir, port, &text), metrics)
}

fn login(s: &Server, from: &str, user: &str, pass: &str) -> Client {
    let mut c = s.client(from);
    c.hello();
    let plain = base64::engine::general_purpose::STANDARD.encode(format!("\0{user}\0{pass}"));
    c.expect(&format!("AUTH PLAIN {plain}"), 235);
    c
}

/// One whole message to `to`; the reply to MAIL if it was not 250, else to the dot.
fn send(c: &mut Client, from: &str, to: &str) -> u16 {
    let r = c.cmd(&format!("MAIL FROM:<{from}>"));
    if r.code != 250 {
        return r.code;
    }
    c.expect(&format!("RCPT TO:<{to}>"), 250);
    c.data(&message("rate")).code
}

fn hits(metrics: u16, limit: &str) -> String {
    let (_, _, body) = http_get(metrics, "/metrics");
    let series = format!("postern_rate_limit_hits_total{{limit=\"{limit}\"}} ");
    body.lines()
        .find_map(|l| l.strip_prefix(&series))
        .unwrap_or("missing")
        .to_string()
}

#[test]
fn a_user_over_the_message_limit_gets_451_at_mail_until_the_window_slides() {
    let (s, metrics) = start(
        "",
        r#"[[rate_limit]]
name = "roaming"
clients = "authenticated"
per = "user"
messages = 2
window = "3s"
"#,
    );
    assert_eq!(hits(metrics, "roaming"), "0");
    let mut alice = login(&s, OUTSIDE, "alice", "correct horse");
    assert_eq!(
        send(&mut alice, "alice@accepted.test", "x@remote.test"),
        250
    );
    assert_eq!(
        send(&mut alice, "alice@accepted.test", "x@remote.test"),
        250
    );
    let r = alice.cmd("MAIL FROM:<alice@accepted.test>");
    assert_eq!(r.code, 451, "{}", r.text());
    assert!(r.text().contains("4.7.1"), "{}", r.text());
    // Another user, and alice from another address, are counted apart / together.
    let mut bob = login(&s, OUTSIDE, "bob", "battery staple");
    assert_eq!(send(&mut bob, "bob@accepted.test", "x@remote.test"), 250);
    let mut again = login(&s, "127.0.0.3", "alice", "correct horse");
    assert_eq!(again.cmd("MAIL FROM:<alice@accepted.test>").code, 451);
    assert_eq!(hits(metrics, "roaming"), "2");
    let log = s.log();
    assert!(
        log.contains("rate limit exceeded")
            && log.contains("limit=roaming")
            && log.contains("key=alice"),
        "{log}"
    );
    // The window (3 s, plus at most one bucket of 3/16 s) slides past the two messages.
    std::thread::sleep(Duration::from_millis(3400));
    assert_eq!(
        send(&mut alice, "alice@accepted.test", "x@remote.test"),
        250
    );
}

#[test]
fn client_addresses_are_counted_apart_and_unaccepted_work_is_given_back() {
    let (s, _) = start(
        "",
        r#"[[rate_limit]]
name = "per-ip-recipients"
clients = "untrusted"
per = "client_ip"
recipients = 3
window = "1m"

[[rate_limit]]
name = "per-ip-messages"
clients = "untrusted"
per = "client_ip"
messages = 1
window = "1m"
"#,
    );
    let mut a = s.client(OUTSIDE);
    a.hello();
    // A transaction that is reset gives its message back.
    a.expect("MAIL FROM:<x@remote.test>", 250);
    a.expect("RSET", 250);
    // A refused recipient (relay denied) is not counted; accepted ones are.
    a.expect("MAIL FROM:<x@remote.test>", 250);
    assert_eq!(a.cmd("RCPT TO:<x@elsewhere.test>").code, 554);
    for i in 0..3 {
        a.expect(&format!("RCPT TO:<u{i}@accepted.test>"), 250);
    }
    let r = a.cmd("RCPT TO:<u3@accepted.test>");
    assert_eq!(r.code, 451, "{}", r.text());
    assert_eq!(a.data(&message("ip")).code, 250);
    // The one message of this address is used up; 127.0.0.3 is another client.
    assert_eq!(a.cmd("MAIL FROM:<x@remote.test>").code, 451);
    let mut b = s.client("127.0.0.3");
    b.hello();
    assert_eq!(send(&mut b, "x@remote.test", "u@accepted.test"), 250);
    // A message refused at the end of DATA (too many hops here) is given back.
    let mut c = s.client("127.0.0.4");
    c.hello();
    c.expect("MAIL FROM:<x@remote.test>", 250);
    c.expect("RCPT TO:<u@accepted.test>", 250);
    let looped = "Received: x\r\n".repeat(120) + &message("loop");
    assert_eq!(c.data(&looped).code, 554);
    assert_eq!(send(&mut c, "x@remote.test", "u@accepted.test"), 250);
    // The trusted network is not "untrusted": never counted here.
    let mut inside = s.client("127.0.0.1");
    inside.hello();
    for _ in 0..3 {
        assert_eq!(send(&mut inside, "a@accepted.test", "x@remote.test"), 250);
    }
    let log = s.log();
    assert!(
        log.contains("limit=per-ip-recipients") && log.contains("key=127.0.0.2"),
        "{log}"
    );
    assert!(log.contains("rule=rate_limit"), "{log}");
}

#[test]
fn a_sender_is_one_key_whatever_its_case() {
    let (s, _) = start(
        "",
        r#"[[rate_limit]]
name = "senders"
per = "sender"
messages = 1
window = "1m"
"#,
    );
    let mut a = s.client(OUTSIDE);
    a.hello();
    assert_eq!(send(&mut a, "news@remote.test", "u@accepted.test"), 250);
    assert_eq!(send(&mut a, "NEWS@Remote.TEST", "u@accepted.test"), 451);
    assert_eq!(send(&mut a, "other@remote.test", "u@accepted.test"), 250);
    // Bounces from the Internet share the key <>.
    assert_eq!(send(&mut a, "", "u@accepted.test"), 250);
    assert_eq!(send(&mut a, "", "u@accepted.test"), 451);
    assert!(s.log().contains("key=news@remote.test"), "{}", s.log());
}

#[test]
fn connection_rate_refuses_new_connections_over_it_with_421_before_the_banner() {
    let (s, metrics) = start("connection_rate = \"2/1m\"", "");
    for _ in 0..2 {
        let mut c = s.client(OUTSIDE);
        c.hello();
        c.expect("QUIT", 221);
    }
    let mut third = s.client(OUTSIDE);
    let r = third.reply();
    assert_eq!(r.code, 421, "{}", r.text());
    assert!(r.text().contains("4.7.0"), "{}", r.text());
    assert!(third.is_closed());
    // Another address, and the trusted network, still connect.
    s.client("127.0.0.3").hello();
    for _ in 0..3 {
        s.client("127.0.0.1").hello();
    }
    let (_, _, body) = http_get(metrics, "/metrics");
    assert!(
        body.contains(&format!(
            "postern_connections_refused_total{{listener=\"127.0.0.1:{}\",limit=\"connection_rate\"}} 1",
            s.port
        )),
        "{body}"
    );
}

#[test]
fn check_config_names_the_limits_and_refuses_nonsense() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.toml");
    let write = |limits: &str| {
        std::fs::write(
            &config,
            format!(
                "spool_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"none\"\n\
                 connection_rate = \"60/1m\"\n{limits}",
                dir.path().join("spool").display()
            ),
        )
        .unwrap();
    };
    write(
        "[[rate_limit]]\nname = \"r\"\nclients = \"authenticated\"\nper = \"user\"\nmessages = 100\nrecipients = 500\nwindow = \"1h\"\n",
    );
    let path = config.to_str().unwrap();
    let (code, out, err) = run_cli(&["check-config", "--config", path]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("rate limit r: 100 messages and 500 recipients per user per 1h"),
        "{out}"
    );
    assert!(
        out.contains("at most 60/1m new connections per IP"),
        "{out}"
    );
    for (bad, says) in [
        (
            "[[rate_limit]]\nname = \"r\"\nper = \"user\"\nmessages = 1\nwindow = \"1h\"\n",
            "needs clients = \"authenticated\"",
        ),
        (
            "[[rate_limit]]\nname = \"r\"\nper = \"sender\"\nwindow = \"1h\"\n",
            "limits nothing",
        ),
        (
            "[[rate_limit]]\nname = \"r\"\nper = \"ip\"\nmessages = 1\nwindow = \"1h\"\n",
            "unknown variant",
        ),
    ] {
        write(bad);
        let (code, _, err) = run_cli(&["check-config", "--config", path]);
        assert_ne!(code, 0, "{bad}");
        assert!(err.contains(says), "{bad}: {err}");
    }
}

#[test]
fn check_policy_names_the_limits_that_would_count() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\n[[listener]]\naddress = \"127.0.0.1:2525\"\ntls = \"none\"\n\
             [relay]\naccepted_domains = [\"company.test\"]\n\
             [[rate_limit]]\nname = \"inbound\"\nclients = \"untrusted\"\nper = \"sender_domain\"\n\
             recipients = 100\nwindow = \"1h\"\n\
             [[rate_limit]]\nname = \"internal\"\nclients = \"trusted\"\nper = \"client_ip\"\n\
             messages = 100\nwindow = \"1h\"\n",
            dir.path().join("spool").display()
        ),
    )
    .unwrap();
    let path = config.to_str().unwrap();
    let (code, out, err) = run_cli(&[
        "check-policy",
        "--config",
        path,
        "--client",
        "192.0.2.1",
        "--from",
        "a@Sender.example",
        "--to",
        "bob@company.test",
    ]);
    assert_eq!(code, 0, "{err}");
    assert!(
        out.contains("(rule accepted_domain)")
            && out.contains("; counted by rate limits inbound (key sender.example)")
            && !out.contains("internal"),
        "{out}"
    );
}

#[test]
fn parallel_sessions_of_one_user_get_exactly_the_limit_and_pipelined_rset_gives_back() {
    let (s, _) = start(
        "",
        r#"[[rate_limit]]
name = "roaming"
clients = "authenticated"
per = "user"
messages = 5
window = "1m"
"#,
    );
    let s = std::sync::Arc::new(s);
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let s = std::sync::Arc::clone(&s);
            std::thread::spawn(move || {
                let mut c = login(&s, OUTSIDE, "alice", "correct horse");
                send(&mut c, "alice@accepted.test", "x@remote.test")
            })
        })
        .collect();
    let codes: Vec<u16> = threads.into_iter().map(|t| t.join().unwrap()).collect();
    assert_eq!(codes.iter().filter(|&&c| c == 250).count(), 5, "{codes:?}");
    assert_eq!(codes.iter().filter(|&&c| c == 451).count(), 15, "{codes:?}");

    // bob, limit 5: MAIL, RSET, MAIL in one write; the reset message is given back at
    // once, so five whole messages still fit after it.
    let mut bob = login(&s, OUTSIDE, "bob", "battery staple");
    bob.send(b"MAIL FROM:<bob@accepted.test>\r\nRSET\r\nMAIL FROM:<bob@accepted.test>\r\n");
    for _ in 0..3 {
        assert_eq!(bob.reply().code, 250);
    }
    bob.expect("RSET", 250);
    for _ in 0..5 {
        assert_eq!(send(&mut bob, "bob@accepted.test", "x@remote.test"), 250);
    }
    assert_eq!(send(&mut bob, "bob@accepted.test", "x@remote.test"), 451);
}

/// Recipients are counted at RCPT 250 and stay counted after an RSET, but a message
/// answered 4xx at its end (here a milter's tempfail) gives its recipients back: the
/// client sends the same ones again.
#[test]
fn recipients_stay_counted_after_rset_but_come_back_after_a_4xx_at_the_end() {
    let milter = crate::common::free_port();
    let _scenario = crate::milter::scenario(&milter.to_string(), "scenario", "script");
    let (s, _) = start(
        "",
        &format!(
            r#"[[rate_limit]]
name = "rcpts"
per = "client_ip"
recipients = 3
window = "1m"

[[milter]]
name = "scenario"
address = "127.0.0.1:{milter}"
"#
        ),
    );
    let mut c = s.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<x@remote.test>", 250);
    c.expect("RCPT TO:<a@accepted.test>", 250);
    c.expect("RCPT TO:<b@accepted.test>", 250);
    let r = c.data(&message("tempfail-me"));
    assert_eq!(r.code, 451, "{}", r.text());
    // Given back: the same two fit again, and the message goes through.
    c.expect("MAIL FROM:<x@remote.test>", 250);
    c.expect("RCPT TO:<a@accepted.test>", 250);
    c.expect("RCPT TO:<b@accepted.test>", 250);
    assert_eq!(c.data(&message("fine")).code, 250);
    // An RSET gives nothing back: the third is counted, the fourth is over.
    c.expect("MAIL FROM:<x@remote.test>", 250);
    c.expect("RCPT TO:<c@accepted.test>", 250);
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<x@remote.test>", 250);
    assert_eq!(c.cmd("RCPT TO:<d@accepted.test>").code, 451);
}
