//! End-to-end delivery: the real binary, a DNS responder and SMTP sinks on loopback
//! (`postern-testkit`). Postern's `mx_port` is shared by every MX host, so MX sinks
//! listen on the same port at different loopback addresses (127.0.0.10, .11, ...).

use std::net::Ipv4Addr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{INSIDE, Server, message, route_to, run_cli, sink_on, wait_until};
use postern_testkit::ca::TestCa;
use postern_testkit::dns::DnsServer;
use postern_testkit::sink::{Sink, SinkConfig};

/// A port free on the whole loopback net (checked on 127.0.0.1 and the MX addresses).
fn shared_port() -> u16 {
    loop {
        let p = crate::common::free_port();
        let ok =
            (10..16).all(|i| std::net::TcpListener::bind((Ipv4Addr::new(127, 0, 0, i), p)).is_ok());
        if ok {
            return p;
        }
    }
}

/// A relay whose DNS is `dns`, MX port `mx_port`, retry every second, plus `extra`
/// (routes and top-level keys go in `top` / `extra`).
fn relay(dns: &DnsServer, mx_port: u16, top: &str, extra: &str) -> Server {
    let extra = format!(
        "{extra}\n[delivery]\ndns_servers = [\"{}\"]\nmx_port = {mx_port}\nretry_schedule = [\"1s\"]\n",
        dns.addr()
    );
    Server::start(top, &extra)
}

/// Sends one message from the trusted side (relays anywhere); returns its queue id.
fn submit(server: &Server, from: &str, to: &[&str], subject: &str) -> String {
    crate::common::submit_body(server, from, to, &message(subject))
}

fn queue_list(server: &Server) -> String {
    let (code, out, err) = run_cli(&["queue", "list", "--config", server.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    out
}

#[test]
fn mx_by_preference_with_fallback_to_the_next_host() {
    let dns = DnsServer::start();
    let port = shared_port();
    dns.add_mx("mx.test", 10, "mx1.mx.test");
    dns.add_mx("mx.test", 20, "mx2.mx.test");
    dns.add_a("mx1.mx.test", Ipv4Addr::new(127, 0, 0, 10)); // nothing listens there
    dns.add_a("mx2.mx.test", Ipv4Addr::new(127, 0, 0, 11));
    let backup = sink_on([127, 0, 0, 11], port, SinkConfig::default());
    let server = relay(&dns, port, "", "");
    submit(&server, "a@company.test", &["user@mx.test"], "fallback");
    let got = backup.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpt_to, vec!["user@mx.test".to_string()]);
    assert_eq!(got[0].helo, "relay.test");

    // With the primary up, it gets the mail.
    let primary = sink_on([127, 0, 0, 10], port, SinkConfig::default());
    submit(&server, "a@company.test", &["user2@mx.test"], "primary");
    primary.wait_for(1, Duration::from_secs(20));
    assert_eq!(backup.messages().len(), 1);
    // A 4xx greeting also means "try the next host" (RFC 5321 5.1).
    dns.add_mx("busy.test", 10, "mx3.busy.test");
    dns.add_mx("busy.test", 20, "mx2.mx.test");
    dns.add_a("mx3.busy.test", Ipv4Addr::new(127, 0, 0, 13));
    let busy = sink_on(
        [127, 0, 0, 13],
        port,
        SinkConfig {
            greeting: "421 mx3 busy".into(),
            ..SinkConfig::default()
        },
    );
    submit(&server, "a@company.test", &["user3@busy.test"], "busy");
    backup.wait_for(2, Duration::from_secs(20));
    assert_eq!(busy.connections(), 1);
    assert!(busy.messages().is_empty());
}

#[test]
fn implicit_mx_from_a_record_and_null_mx_bounce() {
    let dns = DnsServer::start();
    let port = shared_port();
    dns.add_a("plain.test", Ipv4Addr::new(127, 0, 0, 12));
    dns.null_mx("nomail.test");
    let plain = sink_on([127, 0, 0, 12], port, SinkConfig::default());
    let home = Sink::start(SinkConfig::default());
    // Bounces to company.test senders go to `home`.
    let route = route_to(&["company.test"], &home);
    let server = relay(&dns, port, "", &route);
    submit(&server, "a@company.test", &["user@plain.test"], "implicit");
    plain.wait_for(1, Duration::from_secs(20));

    submit(
        &server,
        "sender@company.test",
        &["user@nomail.test"],
        "nullmx",
    );
    let bounce = home.wait_for(1, Duration::from_secs(20));
    assert_eq!(bounce[0].mail_from, "");
    assert_eq!(bounce[0].rcpt_to, vec!["sender@company.test".to_string()]);
    let text = String::from_utf8_lossy(&bounce[0].data);
    assert!(text.contains("multipart/report"), "{text}");
    assert!(
        text.contains("Final-Recipient: rfc822; user@nomail.test"),
        "{text}"
    );
    assert!(text.contains("Status: 5.1.10"), "{text}");
    assert!(plain.messages().len() == 1);
}

#[test]
fn temporary_failure_is_retried_then_delivered() {
    let dns = DnsServer::start();
    let tries = Arc::new(AtomicUsize::new(0));
    let t = Arc::clone(&tries);
    let sink = Sink::start(SinkConfig {
        rcpt_reply: Arc::new(move |_| {
            if t.fetch_add(1, Ordering::SeqCst) == 0 {
                "451 4.7.1 greylisted, try again".to_string()
            } else {
                "250 2.1.5 Ok".to_string()
            }
        }),
        ..SinkConfig::default()
    });
    let route = route_to(&["accepted.test"], &sink);
    let server = relay(&dns, 25, "", &route);
    let id = submit(&server, "a@outside.test", &["user@accepted.test"], "grey");
    // The deferral is visible in the queue with its reason before the retry lands.
    wait_until("the first attempt", Duration::from_secs(10), || {
        tries.load(Ordering::SeqCst) >= 1
    });
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert!(tries.load(Ordering::SeqCst) >= 2);
    assert_eq!(got.len(), 1);
    wait_until("an empty queue", Duration::from_secs(10), || {
        queue_list(&server).contains("queue is empty")
    });
    assert!(server.log().contains(&format!("id={id}")));
    assert!(server.log().contains("greylisted"));
}

#[test]
fn permanent_failure_sends_one_dsn_to_the_sender() {
    let dns = DnsServer::start();
    let target = Sink::start(SinkConfig {
        rcpt_reply: Arc::new(|addr| {
            if addr.starts_with("nobody@") {
                "550 5.1.1 <nobody@accepted.test>: user unknown".to_string()
            } else {
                "250 2.1.5 Ok".to_string()
            }
        }),
        ..SinkConfig::default()
    });
    let home = Sink::start(SinkConfig::default());
    let routes = route_to(&["accepted.test"], &target) + &route_to(&["company.test"], &home);
    let server = relay(&dns, 25, "", &routes);
    let id = submit(
        &server,
        "sender@company.test",
        &["nobody@accepted.test", "somebody@accepted.test"],
        "dsn",
    );
    let delivered = target.wait_for(1, Duration::from_secs(20));
    assert_eq!(
        delivered[0].rcpt_to,
        vec!["somebody@accepted.test".to_string()]
    );
    let dsn = home.wait_for(1, Duration::from_secs(20));
    let text = String::from_utf8_lossy(&dsn[0].data).replace("\r\n", "\n");
    assert_eq!(dsn[0].mail_from, "", "a DSN has the null sender");
    for needle in [
        "Content-Type: multipart/report",
        "report-type=delivery-status",
        "Final-Recipient: rfc822; nobody@accepted.test",
        "Action: failed",
        "Status: 5.1.1",
        "Diagnostic-Code: smtp; 550 5.1.1",
        "Auto-Submitted: auto-replied",
        "Subject: dsn",
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    assert!(
        !text.contains("Final-Recipient: rfc822; somebody@"),
        "{text}"
    );
    assert!(
        !text.contains("Hello."),
        "the original body must not be returned:\n{text}"
    );
    assert!(text.contains(&id));
    // And nothing is left.
    wait_until("an empty queue", Duration::from_secs(10), || {
        queue_list(&server).contains("queue is empty")
    });
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(home.messages().len(), 1, "exactly one DSN");
}

#[test]
fn null_sender_failures_are_never_bounced() {
    let dns = DnsServer::start();
    let target = Sink::start(SinkConfig {
        rcpt_reply: Arc::new(|_| "550 5.1.1 unknown".to_string()),
        ..SinkConfig::default()
    });
    let route = route_to(&["*"], &target);
    let server = relay(&dns, 25, "", &route);
    let mut c = server.client(INSIDE);
    c.hello();
    let r = c.send_mail("", &["x@accepted.test"], &message("bounce-of-bounce"));
    assert_eq!(r.code, 250);
    wait_until("the failure to be logged", Duration::from_secs(20), || {
        server.log().contains("no bounce for a null-sender message")
    });
    wait_until("an empty queue", Duration::from_secs(10), || {
        queue_list(&server).contains("queue is empty")
    });
    assert!(target.connections() >= 1);
}

/// kill -9 with deliveries pending: after the restart every recipient gets the message
/// exactly once (the one already delivered is not sent again).
#[test]
fn kill_9_with_pending_deliveries_is_exactly_once_per_recipient() {
    let dns = DnsServer::start();
    let good = Sink::start(SinkConfig::default());
    let flaky = Sink::start(SinkConfig {
        rcpt_reply: Arc::new(|_| "451 4.3.0 not now".to_string()),
        ..SinkConfig::default()
    });
    let routes = route_to(&["accepted.test"], &good) + &route_to(&["company.test"], &flaky);
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let text = crate::common::base_config(port, &dir.path().join("spool"), "", &routes)
        + &format!(
            "\n[delivery]\ndns_servers = [\"{}\"]\nretry_schedule = [\"1h\"]\n",
            dns.addr()
        );
    let mut server = Server::start_with_config(dir, port, &text);
    let mut ids = Vec::new();
    for i in 0..5 {
        ids.push(submit(
            &server,
            "a@outside.test",
            &["one@accepted.test", "two@company.test"],
            &format!("once-{i}"),
        ));
    }
    good.wait_for(5, Duration::from_secs(20));
    wait_until("five deferrals", Duration::from_secs(20), || {
        server.log().matches("message deferred").count() >= 5
    });
    server.kill9();
    flaky.set_config(SinkConfig::default());
    server.spawn();
    let second = flaky.wait_for(5, Duration::from_secs(20));
    wait_until("an empty queue", Duration::from_secs(10), || {
        queue_list(&server).contains("queue is empty")
    });
    std::thread::sleep(Duration::from_millis(500));
    let firsts = good.messages();
    assert_eq!(firsts.len(), 5, "one@ got a duplicate after the restart");
    assert_eq!(flaky.messages().len(), 5);
    for m in second.iter().chain(firsts.iter()) {
        assert_eq!(m.rcpt_to.len(), 1);
    }
    for id in ids {
        let count = firsts
            .iter()
            .filter(|m| String::from_utf8_lossy(&m.data).contains(&id))
            .count();
        assert_eq!(count, 1, "{id}");
    }
}

#[test]
fn required_tls_is_never_downgraded() {
    let dns = DnsServer::start();
    let ca = TestCa::new();
    let certs = tempfile::tempdir().unwrap();
    let ca_file = certs.path().join("ca.pem");
    std::fs::write(&ca_file, ca.ca_pem()).unwrap();
    // First the next hop offers no STARTTLS at all.
    let sink = Sink::start(SinkConfig::default());
    let route = format!(
        "[[route]]\ndomains = [\"accepted.test\"]\nnext_hop = \"127.0.0.1:{}\"\ntls = \"required\"\nca_file = \"{}\"\n",
        sink.addr().port(),
        ca_file.display()
    );
    dns.add_a("127.0.0.1", Ipv4Addr::LOCALHOST);
    let server = relay(&dns, 25, "", &route.replace("127.0.0.1:", "[127.0.0.1]:"));
    submit(&server, "a@outside.test", &["user@accepted.test"], "tls");
    wait_until("a deferral", Duration::from_secs(20), || {
        server.log().contains("message deferred")
    });
    // A certificate for another name: still refused.
    sink.set_config(SinkConfig {
        tls: Some(ca.issue(&["other.test"])),
        ..SinkConfig::default()
    });
    std::thread::sleep(Duration::from_secs(3));
    assert!(sink.messages().is_empty());
    assert!(
        !sink
            .transcript()
            .iter()
            .any(|l| l.to_ascii_uppercase().starts_with("MAIL")),
        "MAIL was sent without TLS: {:?}",
        sink.transcript()
    );
    // The right certificate: delivered, over TLS.
    sink.set_config(SinkConfig {
        tls: Some(ca.issue(&["127.0.0.1"])),
        ..SinkConfig::default()
    });
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert!(got[0].tls);
}

#[test]
fn a_dead_destination_does_not_hold_up_the_rest() {
    let dns = DnsServer::start();
    let slow = Sink::start(SinkConfig {
        delay: Some(Duration::from_secs(4)),
        ..SinkConfig::default()
    });
    let fast = Sink::start(SinkConfig::default());
    let routes = route_to(&["slow.test"], &slow) + &route_to(&["fast.test"], &fast);
    let server = relay(&dns, 25, "", &routes);
    for i in 0..6 {
        submit(
            &server,
            "a@outside.test",
            &[&format!("u{i}@slow.test")],
            "slow",
        );
    }
    let start = Instant::now();
    for i in 0..6 {
        submit(
            &server,
            "a@outside.test",
            &[&format!("u{i}@fast.test")],
            "fast",
        );
    }
    fast.wait_for(6, Duration::from_secs(20));
    assert!(
        start.elapsed() < Duration::from_secs(4),
        "fast deliveries waited for the slow host ({:?})",
        start.elapsed()
    );
    assert!(slow.messages().len() < 6);
    slow.wait_for(6, Duration::from_secs(60));
}

#[test]
fn connections_are_reused_and_recipients_grouped() {
    let dns = DnsServer::start();
    let sink = Sink::start(SinkConfig::default());
    let route = route_to(&["accepted.test", "company.test"], &sink);
    let server = relay(&dns, 25, "", &route);
    submit(
        &server,
        "a@outside.test",
        &["a@accepted.test", "b@company.test", "c@accepted.test"],
        "grouped",
    );
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpt_to.len(), 3, "one transaction for one next hop");
    for i in 0..5 {
        submit(
            &server,
            "a@outside.test",
            &["a@accepted.test"],
            &format!("reuse-{i}"),
        );
    }
    sink.wait_for(6, Duration::from_secs(20));
    assert!(
        sink.connections() < 6,
        "{} connections for 6 messages",
        sink.connections()
    );
}

#[test]
fn queue_list_flush_and_delete() {
    let dns = DnsServer::start();
    // The reply changes through a flag, not set_config: a cached connection keeps the
    // config it was opened with.
    let full = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let f = Arc::clone(&full);
    let sink = Sink::start(SinkConfig {
        rcpt_reply: Arc::new(move |_| {
            if f.load(Ordering::SeqCst) {
                "452 4.2.2 mailbox full".to_string()
            } else {
                "250 2.1.5 Ok".to_string()
            }
        }),
        ..SinkConfig::default()
    });
    let route = route_to(&["accepted.test"], &sink);
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let text = crate::common::base_config(port, &dir.path().join("spool"), "", &route)
        + &format!(
            "\n[delivery]\ndns_servers = [\"{}\"]\nretry_schedule = [\"1h\"]\n",
            dns.addr()
        );
    let server = Server::start_with_config(dir, port, &text);
    let keep = submit(&server, "a@outside.test", &["k@accepted.test"], "keep");
    let drop_id = submit(&server, "a@outside.test", &["d@accepted.test"], "drop");
    wait_until("two deferrals", Duration::from_secs(20), || {
        server.log().matches("message deferred").count() >= 2
    });
    let list = queue_list(&server);
    assert!(list.contains(&keep) && list.contains(&drop_id), "{list}");
    assert!(list.contains("452 4.2.2 mailbox full"), "{list}");
    assert!(list.contains("next in"), "{list}");
    let cfg = server.config.to_str().unwrap();
    let (code, out, _) = run_cli(&["queue", "show", &keep, "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(out.contains("Subject: keep"), "{out}");

    let (code, out, _) = run_cli(&["queue", "delete", &drop_id, "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    assert!(!queue_list(&server).contains(&drop_id));

    full.store(false, Ordering::SeqCst);
    let (code, out, _) = run_cli(&["queue", "flush", "--config", cfg]);
    assert_eq!(code, 0, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(10));
    assert!(String::from_utf8_lossy(&got[0].data).contains("Subject: keep"));
    wait_until("an empty queue", Duration::from_secs(10), || {
        queue_list(&server).contains("queue is empty")
    });
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(
        sink.messages().len(),
        1,
        "the deleted message was delivered"
    );
}

/// A smart host that needs AUTH: the password file's trailing newline is not part of
/// the password, AUTH happens only after STARTTLS with a verified certificate (route
/// credentials need `tls = "required"`), and a 535 defers (never bounces).
#[test]
fn smart_host_auth_over_tls_and_535_defers() {
    let dns = DnsServer::start();
    let ca = TestCa::new();
    let sink = Sink::start(SinkConfig {
        tls: Some(ca.issue(&["127.0.0.1"])),
        auth: Some(("relay".into(), "s3cret pass".into())),
        require_auth: true,
        ..SinkConfig::default()
    });
    for (password, delivered) in [("s3cret pass\n", true), ("wrong\n", false)] {
        let dir = tempfile::tempdir().unwrap();
        let pass_file = dir.path().join("smarthost.pass");
        std::fs::write(&pass_file, password).unwrap();
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.ca_pem()).unwrap();
        let route = format!(
            "[[route]]\ndomains = [\"*\"]\nnext_hop = \"[127.0.0.1]:{}\"\ntls = \"required\"\n\
             ca_file = \"{}\"\nauth_user = \"relay\"\nauth_password_file = \"{}\"\n",
            sink.addr().port(),
            ca_file.display(),
            pass_file.display()
        );
        let before = sink.messages().len();
        let server = relay(&dns, 25, "", &route);
        submit(
            &server,
            "a@company.test",
            &["x@elsewhere.test"],
            "smarthost",
        );
        if delivered {
            let got = sink.wait_for(before + 1, Duration::from_secs(20));
            let m = got.last().unwrap();
            assert_eq!(m.auth.as_deref(), Some("relay"));
            assert!(m.tls, "AUTH must only happen over TLS");
        } else {
            wait_until("the credentials error", Duration::from_secs(20), || {
                server.log().contains("refused our credentials")
            });
            wait_until("a deferral", Duration::from_secs(20), || {
                server.log().contains("message deferred")
            });
            assert!(!server.log().contains("bounce queued"));
            assert_eq!(sink.messages().len(), before);
        }
    }
}
