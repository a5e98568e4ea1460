//! Inbound checks through a real session (interface: "Mail authentication"): SPF and
//! DMARC against records in the test DNS responder, enforcement at the end of DATA, one
//! `Authentication-Results:` on top with forged ones removed, DNS failure never a
//! refusal, trusted clients not checked.

use std::time::Duration;

use postern_testkit::dns::DnsServer;
use postern_testkit::sink::{Sink, SinkConfig};

use crate::common::{INSIDE, OUTSIDE, Server, route_to, run_cli, wait_until};

fn start(dns: &DnsServer, sink: &Sink) -> Server {
    let extra = format!(
        "\n[delivery]\ndns_servers = [\"{}\"]\n\n[authentication]\nspf = true\ndkim = true\n\
         dmarc = true\ndmarc_enforce = true\n{}",
        dns.addr(),
        route_to(&["*"], sink)
    );
    Server::start("", &extra)
}

fn message(from: &str, subject: &str, extra_headers: &str) -> String {
    format!(
        "{extra_headers}From: <{from}>\r\nTo: <user@accepted.test>\r\nSubject: {subject}\r\n\
         Date: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@x>\r\n\r\nhello\r\n"
    )
}

/// Sends one message from `client`; the reply to the final dot.
fn send(server: &Server, client: &str, from: &str, subject: &str, headers: &str) -> (u16, String) {
    let mut c = server.client(client);
    c.hello();
    c.expect(&format!("MAIL FROM:<{from}>"), 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let r = c.data(&message(from, subject, headers));
    c.expect("QUIT", 221);
    (r.code, r.text())
}

fn delivered(sink: &Sink, n: usize, subject: &str) -> String {
    sink.wait_for(n, Duration::from_secs(20))
        .iter()
        .map(|m| m.data_str())
        .find(|d| d.contains(&format!("Subject: {subject}\r\n")))
        .unwrap_or_else(|| panic!("no message {subject}"))
}

#[test]
fn spf_and_dmarc_are_checked_enforced_and_reported() {
    let dns = DnsServer::start();
    // 127.0.0.2 (the outside client) may send for good.example, not for bad.example.
    dns.add_txt("good.example", "v=spf1 ip4:127.0.0.2 -all");
    dns.add_txt("_dmarc.good.example", "v=DMARC1; p=reject");
    dns.add_txt("bad.example", "v=spf1 ip4:192.0.2.9 -all");
    dns.add_txt("_dmarc.bad.example", "v=DMARC1; p=reject");
    dns.add_txt("held.example", "v=spf1 -all");
    dns.add_txt("_dmarc.held.example", "v=DMARC1; p=quarantine");
    dns.servfail("broken.example");
    dns.servfail("_dmarc.broken.example");
    let sink = Sink::start(SinkConfig::default());
    let server = start(&dns, &sink);

    // p=reject and no aligned pass: refused at the end of DATA.
    let (code, text) = send(&server, OUTSIDE, "a@bad.example", "bad", "");
    assert_eq!(code, 550, "{text}");
    assert!(
        text.contains("5.7.1") && text.contains("bad.example"),
        "{text}"
    );

    // Aligned SPF pass: delivered with our results on top; a forged field with our
    // authserv-id is gone, another server's stays.
    let forged = "Authentication-Results: relay.test; dmarc=pass header.from=bad.example\r\n\
                  Authentication-Results: mx.other.test; spf=pass\r\n";
    let (code, text) = send(&server, OUTSIDE, "a@good.example", "good", forged);
    assert_eq!(code, 250, "{text}");
    let data = delivered(&sink, 1, "good");
    // On top of the message as it came (under our own Received:, the trace of this hop).
    let ours = data
        .find("Authentication-Results: relay.test;")
        .expect("our field");
    assert!(data.starts_with("Received: from client.test"), "{data}");
    assert!(
        ours < data.find("Authentication-Results: mx.other.test").unwrap(),
        "{data}"
    );
    let unfolded = data.replace("\r\n\t", " ").replace("\r\n ", " ");
    assert!(
        unfolded.contains("spf=pass") && unfolded.contains("dmarc=pass"),
        "{data}"
    );
    assert_eq!(
        data.matches("Authentication-Results: relay.test").count(),
        1,
        "{data}"
    );
    assert!(data.contains("Authentication-Results: mx.other.test; spf=pass"));

    // p=quarantine: held, not delivered.
    let (code, _) = send(&server, OUTSIDE, "a@held.example", "held", "");
    assert_eq!(code, 250);
    let cfg = server.config.to_str().unwrap();
    wait_until("the quarantined message", Duration::from_secs(10), || {
        run_cli(&["quarantine", "list", "--config", cfg])
            .1
            .contains("rule dmarc")
    });

    // DNS failing: temperror, never a refusal.
    let (code, text) = send(&server, OUTSIDE, "a@broken.example", "broken", "");
    assert_eq!(code, 250, "{text}");
    let data = delivered(&sink, 2, "broken");
    assert!(
        data.replace("\r\n\t", " ").contains("spf=temperror"),
        "{data}"
    );

    // A trusted client is not checked: relayed, no results added; a field in our name
    // is removed all the same (the internal server trusts it).
    let forged = "Authentication-Results: RELAY.test (comment);\r\n\tdmarc=pass\r\n";
    let (code, _) = send(&server, INSIDE, "a@bad.example", "inside", forged);
    assert_eq!(code, 250);
    let data = delivered(&sink, 3, "inside");
    assert!(!data.contains("Authentication-Results:"), "{data}");
    assert!(
        server
            .log()
            .contains("forged Authentication-Results removed")
    );

    let log = server.log();
    assert!(log.contains("authentication spf=fail"), "{log}");
    assert!(
        log.contains("message refused by authentication checks"),
        "{log}"
    );
}

/// RFC 7208 4.6.4: more than two lookups that find nothing make the record a permerror
/// (even though its `ip4` would pass), reported in the field; only "fail" is ever
/// refused, so the message is delivered even with `spf_reject`.
#[test]
fn spf_void_lookup_limit_is_a_permerror_and_not_refused() {
    let dns = DnsServer::start();
    dns.add_txt(
        "void.example",
        "v=spf1 a:gone1.void.example a:gone2.void.example a:gone3.void.example \
         ip4:127.0.0.2 -all",
    );
    dns.add_txt(
        "two.example",
        "v=spf1 a:gone1.two.example a:gone2.two.example ip4:127.0.0.2 -all",
    );
    let sink = Sink::start(SinkConfig::default());
    let extra = format!(
        "\n[delivery]\ndns_servers = [\"{}\"]\n\n[authentication]\nspf = true\n\
         spf_reject = true\n{}",
        dns.addr(),
        route_to(&["*"], &sink)
    );
    let server = Server::start("", &extra);

    let (code, text) = send(&server, OUTSIDE, "a@void.example", "void", "");
    assert_eq!(code, 250, "{text}");
    let data = delivered(&sink, 1, "void");
    let unfolded = data.replace("\r\n\t", " ").replace("\r\n ", " ");
    assert!(
        unfolded.contains(
            "spf=permerror reason=\"void.example's SPF record cannot be evaluated: too many \
             void lookups (more than 2, RFC 7208 4.6.4)\" smtp.mailfrom=void.example"
        ),
        "{data}"
    );

    // Two are allowed: the ip4 passes.
    let (code, text) = send(&server, OUTSIDE, "a@two.example", "two", "");
    assert_eq!(code, 250, "{text}");
    let data = delivered(&sink, 2, "two");
    assert!(
        data.replace("\r\n\t", " ")
            .contains("spf=pass smtp.mailfrom=two.example"),
        "{data}"
    );
    let log = server.log();
    assert!(log.contains("authentication spf=permerror"), "{log}");
}
