//! Delivery hardening (issue 8), end to end: the real binary, the testkit's DNS responder
//! and SMTP sinks, all on loopback. Postern's `mx_port` is shared by every MX host, so MX
//! sinks listen on one port at different loopback addresses (127.0.0.20, .21, ...).
//!
//! - mail loops: an MX (or implicit MX) that is Postern itself bounces with 5.4.6;
//! - caps: MX addresses and sessions per attempt, failed lookups counted, slow DNS for
//!   one domain does not starve the others;
//! - route credentials need verified TLS (`check-config` and `serve` refuse otherwise);
//! - pre-send refusals: decided from the bytes, and a refusing host or a 4xx/421 at
//!   MAIL/RCPT passes the mail to the next MX in the same attempt;
//! - a failed null-sender message is reported to the postmaster, a failed report is not;
//! - an expired message reports 4.4.7 with the last remote reply as it was.

use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::common::{INSIDE, Server, route_to, run_cli, sink_on, wait_until};
use postern_testkit::dns::DnsServer;
use postern_testkit::sink::{Sink, SinkConfig};

const WAIT: Duration = Duration::from_secs(20);

/// A port free on 127.0.0.1 and on 127.0.0.`ips`.
fn shared_port(ips: std::ops::Range<u8>) -> u16 {
    loop {
        let p = crate::common::free_port();
        let ok = ips
            .clone()
            .all(|i| std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, i), p)).is_ok());
        if ok {
            return p;
        }
    }
}

/// The `[delivery]` section: our DNS, `mx_port`, `retry`, plus `more` keys.
fn delivery(dns: &DnsServer, mx_port: u16, retry: &str, more: &str) -> String {
    format!(
        "\n[delivery]\ndns_servers = [\"{}\"]\nmx_port = {mx_port}\nretry_schedule = [\"{retry}\"]\n{more}\n",
        dns.addr()
    )
}

fn message(subject: &str, body: &str) -> String {
    format!(
        "From: <sender@company.test>\r\nTo: <user@remote.test>\r\nSubject: {subject}\r\n\
         Message-ID: <{subject}@company.test>\r\n\r\n{body}\r\n"
    )
}

/// One message from the trusted side with the given MAIL line; returns its queue id.
fn submit_raw(server: &Server, mail: &str, to: &[&str], text: &str) -> String {
    let mut c = server.client(INSIDE);
    c.hello();
    c.expect(mail, 250);
    for t in to {
        c.expect(&format!("RCPT TO:<{t}>"), 250);
    }
    c.expect("DATA", 354);
    c.send(text.as_bytes());
    c.send(b".\r\n");
    let r = c.reply();
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    r.lines[0].rsplit(' ').next().unwrap().to_string()
}

fn submit(server: &Server, from: &str, to: &[&str], subject: &str) -> String {
    submit_raw(
        server,
        &format!("MAIL FROM:<{from}>"),
        to,
        &message(subject, "Hello."),
    )
}

fn queue_is_empty(server: &Server) -> bool {
    let (code, out, err) = run_cli(&["queue", "list", "--config", server.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    out.contains("queue is empty")
}

fn text_of(m: &postern_testkit::ReceivedMessage) -> String {
    m.data_str().replace("\r\n", "\n")
}

// --- A: mail loops ------------------------------------------------------------------

/// The best MX of a domain is Postern itself (its own listener address and port): the
/// recipient bounces at once with 5.4.6, a worse-preference MX is not tried, and nothing
/// is delivered to ourselves. The same for an implicit MX (A record) that is us, and for
/// an MX named like our `hostname`. A sink on 127.0.0.1 at another port is not us.
#[test]
fn a_mail_loop_through_our_own_mx_bounces_with_5_4_6() {
    let dns = DnsServer::start();
    let port = shared_port(20..22);
    dns.add_mx("loop.test", 10, "self.loop.test");
    dns.add_a("self.loop.test", Ipv4Addr::LOCALHOST);
    dns.add_mx("loop.test", 20, "backup.loop.test");
    dns.add_a("backup.loop.test", Ipv4Addr::new(127, 0, 0, 21));
    dns.add_a("implicit.test", Ipv4Addr::LOCALHOST);
    dns.add_mx("named.test", 10, "RELAY.test.");
    let backup = sink_on([127, 0, 0, 21], port, SinkConfig::default());
    let home = Sink::start(SinkConfig::default());

    let dir = tempfile::tempdir().unwrap();
    // mx_port is postern's own listener port: every MX on loopback would reach us.
    let extra = route_to(&["company.test"], &home) + &delivery(&dns, port, "1s", "");
    let text = crate::common::base_config(port, &dir.path().join("spool"), "", &extra);
    let server = Server::start_with_config(dir, port, &text);
    let id = submit(
        &server,
        "sender@company.test",
        &["u1@loop.test", "u2@implicit.test", "u3@named.test"],
        "loop",
    );
    let got = home.wait_for(1, WAIT);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["sender@company.test"]);
    let dsn = text_of(&got[0]);
    for rcpt in ["u1@loop.test", "u2@implicit.test", "u3@named.test"] {
        assert!(
            dsn.contains(&format!("Final-Recipient: rfc822; {rcpt}")),
            "{rcpt}:\n{dsn}"
        );
    }
    assert_eq!(dsn.matches("Status: 5.4.6").count(), 3, "{dsn}");
    assert!(
        dsn.contains("mail for loop.test loops back to myself"),
        "{dsn}"
    );
    assert!(
        dsn.contains("mail for implicit.test loops back to myself"),
        "{dsn}"
    );
    assert!(dsn.contains(&id), "{dsn}");
    wait_until("an empty queue", WAIT, || queue_is_empty(&server));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(backup.connections(), 0, "a worse-preference MX was tried");
    assert_eq!(home.messages().len(), 1, "exactly one bounce");
    // Nothing came back in: the one message accepted is the one submitted.
    assert_eq!(server.log().matches("message accepted").count(), 1);
    // No address lookup for a host named like us.
    assert!(!dns.queries().iter().any(|(n, _)| n == "relay.test"));
}

// --- B: caps and starvation ---------------------------------------------------------

/// Twelve MX hosts whose names do not resolve: failed lookups count toward
/// `max_mx_addresses`, so only five are looked up in one attempt. Four MX hosts that
/// all answer 451 at RCPT: only `max_mx_sessions` (2) of them get a session.
#[test]
fn mx_hosts_per_attempt_are_capped() {
    let dns = DnsServer::start();
    let port = shared_port(40..44);
    for i in 0..12 {
        dns.add_mx("many.test", 10 + i, &format!("h{i}.many.test"));
    }
    let busy: Vec<Sink> = (0..4u8)
        .map(|i| {
            dns.add_mx("busy.test", 10, &format!("b{i}.busy.test"));
            dns.add_a(&format!("b{i}.busy.test"), Ipv4Addr::new(127, 0, 0, 40 + i));
            sink_on(
                [127, 0, 0, 40 + i],
                port,
                SinkConfig::default().with_rcpt_reply(|_| "451 4.7.1 try later".to_string()),
            )
        })
        .collect();
    let server = Server::start("", &delivery(&dns, port, "1h", ""));
    submit(&server, "a@company.test", &["x@many.test"], "many");
    submit(&server, "a@company.test", &["x@busy.test"], "busy");
    wait_until("two deferrals", WAIT, || {
        server.log().matches("message deferred").count() >= 2
    });
    let looked_up: std::collections::BTreeSet<String> = dns
        .queries()
        .into_iter()
        .map(|(n, _)| n)
        .filter(|n| n.ends_with(".many.test"))
        .collect();
    assert_eq!(looked_up.len(), 5, "{looked_up:?}");
    let sessions: usize = busy.iter().map(Sink::connections).sum();
    assert_eq!(sessions, 2, "sessions per attempt");
    for s in &busy {
        assert!(s.messages().is_empty());
    }
}

/// One domain's MX lookup takes 3 s; with one global delivery slot, another
/// destination is still delivered at once: DNS is resolved before a global slot is
/// taken. The slow domain is delivered too, once its answer arrives.
#[test]
fn slow_dns_for_one_domain_does_not_starve_the_others() {
    let dns = DnsServer::start();
    let port = shared_port(50..51);
    dns.add_mx("slow.test", 10, "mx.slow.test");
    dns.add_a("mx.slow.test", Ipv4Addr::new(127, 0, 0, 50));
    dns.delay("slow.test", Duration::from_secs(3));
    let slow = sink_on([127, 0, 0, 50], port, SinkConfig::default());
    let fast = Sink::start(SinkConfig::default());
    let extra =
        route_to(&["fast.test"], &fast) + &delivery(&dns, port, "1s", "max_concurrency = 1");
    let server = Server::start("", &extra);
    submit(&server, "a@company.test", &["x@slow.test"], "slow");
    std::thread::sleep(Duration::from_millis(200));
    let start = Instant::now();
    submit(&server, "a@company.test", &["y@fast.test"], "fast");
    fast.wait_for(1, WAIT);
    assert!(
        start.elapsed() < Duration::from_millis(2000),
        "the fast destination waited for the slow DNS ({:?})",
        start.elapsed()
    );
    assert!(slow.messages().is_empty());
    slow.wait_for(1, WAIT);
}

/// A destination whose DNS never answers is deferred after `resolve_timeout`, not held
/// for the resolver's own retries.
#[test]
fn resolve_timeout_bounds_the_lookups() {
    let dns = DnsServer::start();
    dns.add_mx("mute.test", 10, "mx.mute.test");
    dns.ignore("mute.test");
    let server = Server::start("", &delivery(&dns, 25, "1h", "resolve_timeout = \"1s\""));
    let start = Instant::now();
    submit(&server, "a@company.test", &["x@mute.test"], "mute");
    wait_until("a deferral", Duration::from_secs(5), || {
        server.log().contains("message deferred")
    });
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "{:?}",
        start.elapsed()
    );
    assert!(server.log().contains("resolve_timeout"), "{}", server.log());
}

// --- C: credentials need verified TLS -----------------------------------------------

#[test]
fn route_credentials_without_required_tls_are_a_config_error() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("pass"), "secret\n").unwrap();
    let spool = dir.path().join("spool");
    for (tls, line) in [("tls = \"opportunistic\"\n", 14), ("", 13)] {
        let text = format!(
            "hostname = \"relay.test\"\nspool_dir = \"{}\"\n\n[[listener]]\naddress = \"127.0.0.1:{}\"\ntls = \"none\"\n\n\
             [[route]]\ndomains = [\"*\"]\nnext_hop = \"smarthost.test:587\"\n{tls}\
             auth_password_file = \"pass\"\n\nauth_user = \"relay\"\n",
            spool.display(),
            crate::common::free_port()
        );
        let path = dir.path().join("postern.toml");
        std::fs::write(&path, &text).unwrap();
        let expected = format!(
            "{}:{line}:13: route.auth_user: auth_user needs tls = \"required\": the password \
             would go to any server presenting any certificate",
            path.display()
        );
        let (code, out, err) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "{out}{err}");
        assert!(err.contains(&expected), "{err}\nexpected: {expected}");
        let (code, out, err) = run_cli(&["serve", "--config", path.to_str().unwrap()]);
        assert_eq!(code, 1, "serve started: {out}{err}");
        assert!(err.contains(&expected), "{err}");
    }
}

// --- D: pre-send refusals -----------------------------------------------------------

/// The preferred MX offers neither 8BITMIME nor SMTPUTF8: 8-bit mail and mail with a
/// UTF-8 address go to the next MX in the same attempt instead of bouncing.
#[test]
fn a_host_that_cannot_take_the_message_passes_it_to_the_next_mx() {
    let dns = DnsServer::start();
    let port = shared_port(60..62);
    dns.add_mx("eight.test", 10, "old.eight.test");
    dns.add_mx("eight.test", 20, "new.eight.test");
    dns.add_a("old.eight.test", Ipv4Addr::new(127, 0, 0, 60));
    dns.add_a("new.eight.test", Ipv4Addr::new(127, 0, 0, 61));
    let old = sink_on(
        [127, 0, 0, 60],
        port,
        SinkConfig {
            eight_bit_mime: false,
            smtputf8: false,
            ..SinkConfig::default()
        },
    );
    let new = sink_on([127, 0, 0, 61], port, SinkConfig::default());
    let home = Sink::start(SinkConfig::default());
    // One hour between attempts: whatever arrives came in the first attempt.
    let extra = route_to(&["company.test"], &home) + &delivery(&dns, port, "1h", "");
    let server = Server::start("", &extra);
    submit_raw(
        &server,
        "MAIL FROM:<a@company.test> BODY=8BITMIME",
        &["x@eight.test"],
        &message("eightbit", "caf\u{e9}"),
    );
    submit_raw(
        &server,
        "MAIL FROM:<a@company.test> SMTPUTF8",
        &["j\u{f6}rg@eight.test"],
        &message("utf8", "Hello."),
    );
    let got = new.wait_for(2, WAIT);
    assert!(
        got.iter()
            .any(|m| m.mail_params.contains(&"BODY=8BITMIME".into()))
    );
    assert!(
        got.iter()
            .any(|m| m.mail_params.contains(&"SMTPUTF8".into()))
    );
    assert!(old.messages().is_empty());
    assert!(old.connections() >= 1, "the preferred MX was not asked");
    assert!(
        !old.transcript().iter().any(|l| l.starts_with("MAIL")),
        "{:?}",
        old.transcript()
    );
    std::thread::sleep(Duration::from_millis(300));
    assert!(home.messages().is_empty(), "bounced: {:?}", home.messages());
}

/// A refusal is final only when every host of the destination refused: with a backup MX
/// whose name does not resolve right now (SERVFAIL), the message is deferred, not
/// bounced (the backup may take it at the next attempt).
#[test]
fn a_refusal_is_not_final_while_a_host_could_not_be_looked_up() {
    let dns = DnsServer::start();
    let port = shared_port(62..63);
    dns.add_mx("eight.test", 10, "old.eight.test");
    dns.add_mx("eight.test", 20, "backup.eight.test");
    dns.add_a("old.eight.test", Ipv4Addr::new(127, 0, 0, 62));
    dns.servfail("backup.eight.test");
    let old = sink_on(
        [127, 0, 0, 62],
        port,
        SinkConfig {
            eight_bit_mime: false,
            ..SinkConfig::default()
        },
    );
    let home = Sink::start(SinkConfig::default());
    let extra = route_to(&["company.test"], &home) + &delivery(&dns, port, "1h", "");
    let server = Server::start("", &extra);
    let id = submit_raw(
        &server,
        "MAIL FROM:<a@company.test> BODY=8BITMIME",
        &["x@eight.test"],
        &message("eightbit", "caf\u{e9}"),
    );
    let start = std::time::Instant::now();
    while old.connections() == 0 && start.elapsed() < WAIT {
        std::thread::sleep(Duration::from_millis(50));
    }
    std::thread::sleep(Duration::from_millis(500));
    assert!(old.messages().is_empty());
    assert!(home.messages().is_empty(), "bounced: {:?}", home.messages());
    let (code, out, _) = run_cli(&[
        "queue",
        "show",
        &id,
        "--config",
        server.config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("4.4."), "{out}");
}

/// What the client declared is not what decides: 7-bit mail declared BODY=8BITMIME, and
/// ASCII mail declared SMTPUTF8, go to a host that offers neither, without them.
#[test]
fn declared_but_unneeded_8bitmime_and_smtputf8_are_dropped() {
    let dns = DnsServer::start();
    let plain = Sink::start(SinkConfig {
        eight_bit_mime: false,
        smtputf8: false,
        ..SinkConfig::default()
    });
    let home = Sink::start(SinkConfig::default());
    let extra = route_to(&["company.test"], &home)
        + &route_to(&["plain.test"], &plain)
        + &delivery(&dns, 25, "1h", "");
    let server = Server::start("", &extra);
    submit_raw(
        &server,
        "MAIL FROM:<a@company.test> BODY=8BITMIME",
        &["x@plain.test"],
        &message("seven", "plain ASCII"),
    );
    submit_raw(
        &server,
        "MAIL FROM:<a@company.test> SMTPUTF8",
        &["y@plain.test"],
        &message("ascii", "plain ASCII"),
    );
    let got = plain.wait_for(2, WAIT);
    for m in &got {
        assert_eq!(m.mail_params, Vec::<String>::new(), "{m:?}");
    }
    std::thread::sleep(Duration::from_millis(300));
    assert!(home.messages().is_empty(), "bounced: {:?}", home.messages());
}

/// A 451 at MAIL, or a 421 at RCPT, from the preferred MX: the next MX gets the mail in
/// the same attempt (as Postfix does), not an hour later.
#[test]
fn a_4xx_or_421_at_mail_or_rcpt_tries_the_next_mx_at_once() {
    let dns = DnsServer::start();
    let port = shared_port(70..73);
    for (domain, first) in [("mail451.test", 70u8), ("rcpt421.test", 71)] {
        dns.add_mx(domain, 10, &format!("mx1.{domain}"));
        dns.add_a(&format!("mx1.{domain}"), Ipv4Addr::new(127, 0, 0, first));
        dns.add_mx(domain, 20, "backup.test");
    }
    dns.add_a("backup.test", Ipv4Addr::new(127, 0, 0, 72));
    let mail451 = sink_on(
        [127, 0, 0, 70],
        port,
        SinkConfig::default().with_mail_reply(|_| "451 4.3.2 not now".to_string()),
    );
    let rcpt421 = sink_on(
        [127, 0, 0, 71],
        port,
        SinkConfig::default().with_rcpt_reply(|_| "421 4.3.2 closing".to_string()),
    );
    let backup = sink_on([127, 0, 0, 72], port, SinkConfig::default());
    let server = Server::start("", &delivery(&dns, port, "1h", ""));
    submit(&server, "a@company.test", &["x@mail451.test"], "m451");
    submit(&server, "a@company.test", &["y@rcpt421.test"], "r421");
    let got = backup.wait_for(2, WAIT);
    let mut rcpts: Vec<&str> = got.iter().map(|m| m.rcpt_to[0].as_str()).collect();
    rcpts.sort();
    assert_eq!(rcpts, ["x@mail451.test", "y@rcpt421.test"]);
    assert_eq!(mail451.connections(), 1);
    assert_eq!(rcpt421.connections(), 1);
    assert!(
        !server.log().contains("message deferred"),
        "{}",
        server.log()
    );
}

// --- E: double bounces --------------------------------------------------------------

/// A null-sender message that fails permanently is reported to `postmaster` (from <>,
/// with the failure report and the original header); nothing goes back to <>.
#[test]
fn a_failed_null_sender_message_is_reported_to_the_postmaster() {
    let dns = DnsServer::start();
    let target = Sink::start(
        SinkConfig::default().with_rcpt_reply(|_| "550 5.1.1 no such user".to_string()),
    );
    let home = Sink::start(SinkConfig::default());
    let extra = route_to(&["company.test"], &home)
        + &route_to(&["accepted.test"], &target)
        + &delivery(&dns, 25, "1s", "");
    let server = Server::start("postmaster = \"pm@company.test\"", &extra);
    let id = submit_raw(
        &server,
        "MAIL FROM:<>",
        &["gone@accepted.test"],
        &message("bounce-of-something", "a bounce"),
    );
    let got = home.wait_for(1, WAIT);
    assert_eq!(got[0].mail_from, "");
    assert_eq!(got[0].rcpt_to, ["pm@company.test"]);
    let text = text_of(&got[0]);
    for needle in [
        "Subject: Postmaster Notice",
        "Final-Recipient: rfc822; gone@accepted.test",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1 no such user",
        "Subject: bounce-of-something",
        "Auto-Submitted: auto-generated",
    ] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }
    assert!(text.contains(&id));
    wait_until("an empty queue", WAIT, || queue_is_empty(&server));
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(home.messages().len(), 1);
}

/// When the postmaster notice itself fails, it is only logged: no notice about the
/// notice, no loop.
#[test]
fn a_failed_postmaster_notice_is_only_logged() {
    let dns = DnsServer::start();
    let target = Sink::start(
        SinkConfig::default().with_rcpt_reply(|_| "550 5.1.1 no such user".to_string()),
    );
    let extra = route_to(&["*"], &target) + &delivery(&dns, 25, "1s", "");
    let server = Server::start("postmaster = \"pm@accepted.test\"", &extra);
    submit_raw(
        &server,
        "MAIL FROM:<>",
        &["gone@accepted.test"],
        &message("double", "a bounce"),
    );
    wait_until("the notice to fail", WAIT, || {
        server
            .log()
            .contains("a postmaster notice could not be delivered; dropped")
    });
    wait_until("an empty queue", WAIT, || queue_is_empty(&server));
    let rcpts_seen = || {
        target
            .transcript()
            .iter()
            .filter(|l| l.starts_with("RCPT"))
            .count()
    };
    let seen = rcpts_seen();
    std::thread::sleep(Duration::from_secs(2));
    assert_eq!(seen, 2, "{:?}", target.transcript());
    assert_eq!(rcpts_seen(), seen, "more reports followed");
    assert!(target.messages().is_empty());
}

// --- F: expiry ----------------------------------------------------------------------

/// A message that expires reports Action: failed, Status: 4.4.7, and the last remote
/// reply as it was: never "550 4.4.7".
#[test]
fn an_expired_message_reports_4_4_7_with_the_last_reply_as_it_was() {
    let dns = DnsServer::start();
    let target = Sink::start(
        SinkConfig::default().with_rcpt_reply(|_| "451 4.3.0 mailbox busy".to_string()),
    );
    let home = Sink::start(SinkConfig::default());
    let extra = route_to(&["company.test"], &home)
        + &route_to(&["accepted.test"], &target)
        + &delivery(&dns, 25, "1s", "max_queue_lifetime = \"2s\"");
    let server = Server::start("", &extra);
    submit(
        &server,
        "sender@company.test",
        &["slow@accepted.test"],
        "expiring",
    );
    let got = home.wait_for(1, WAIT);
    let text = text_of(&got[0]);
    for needle in [
        "Final-Recipient: rfc822; slow@accepted.test",
        "Action: failed",
        "Status: 4.4.7",
        "Diagnostic-Code: smtp; 451 4.3.0 mailbox busy",
        "delivery time expired",
    ] {
        assert!(text.contains(needle), "{needle}:\n{text}");
    }
    assert!(!text.contains("550 4.4.7"), "{text}");
    assert!(!text.contains("Diagnostic-Code: smtp; 550"), "{text}");
    wait_until("an empty queue", WAIT, || queue_is_empty(&server));
}
