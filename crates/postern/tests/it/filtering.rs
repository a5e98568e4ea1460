//! The filtering relay end to end: each action of the screener at the end of DATA and
//! BDAT, the quarantine round trip through `postern quarantine`, a renamed executable,
//! and DNS blocklists against a DNS responder on loopback.

use std::time::{Duration, Instant};

use crate::common::{Client, INSIDE, OUTSIDE, Server, run_cli};
use base64::Engine;
use postern_testkit::dns::DnsServer;
use postern_testkit::sink::{Sink, SinkConfig};

fn b64_lines(data: &[u8]) -> String {
    let text = base64::engine::general_purpose::STANDARD.encode(data);
    text.as_bytes()
        .chunks(76)
        .map(|c| format!("{}\r\n", std::str::from_utf8(c).unwrap()))
        .collect()
}

/// A multipart/mixed message with a text part and one attachment.
fn with_attachment(subject: &str, name: &str, content: &[u8]) -> String {
    format!(
        "From: <sender@outside.test>\r\nTo: <user@accepted.test>\r\nSubject: {subject}\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nPlease see attached.\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"{name}\"\r\n\
         Content-Disposition: attachment; filename=\"{name}\"\r\n\
         Content-Transfer-Encoding: base64\r\n\r\n{}--b1--\r\n",
        b64_lines(content)
    )
}

/// A minimal Windows PE header: "MZ", the PE offset at 0x3C, "PE\0\0" there.
fn fake_pe() -> Vec<u8> {
    let mut v = vec![0u8; 256];
    v[0] = b'M';
    v[1] = b'Z';
    v[0x3c] = 0x80;
    v[0x80..0x84].copy_from_slice(b"PE\0\0");
    v
}

const FILTERS: &str = r#"
[[filter]]
name = "no-executables"
attachments = ["*.exe", "*.scr", "*.bat"]
action = "reject"

[[filter]]
name = "newsletters"
keywords = ["unsubscribe now"]
action = "discard"

[[filter]]
name = "hold-invoices"
keywords = ["urgent invoice"]
action = "quarantine"

[[filter]]
name = "project-x"
keywords = ["project x"]
action = "redirect"
redirect_to = "security@company.test"
"#;

fn filtering_relay(sink: &Sink) -> Server {
    let extra = format!(
        "{FILTERS}\n[[route]]\ndomains = [\"*\"]\nnext_hop = \"[127.0.0.1]:{}\"\n",
        sink.addr().port()
    );
    Server::start("", &extra)
}

fn send(server: &Server, body: &str) -> crate::common::Reply {
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.send_mail("sender@outside.test", &["user@accepted.test"], body)
}

fn wait_log(server: &Server, needle: &str) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !server.log().contains(needle) {
        assert!(
            Instant::now() < deadline,
            "log never showed {needle:?}:\n{}",
            server.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn reject_discard_redirect() {
    let sink = Sink::start(SinkConfig::default());
    let server = filtering_relay(&sink);

    let r = send(
        &server,
        &with_attachment("report", "Invoice.PDF.EXE", &fake_pe()),
    );
    assert_eq!(r.code, 550, "{}", r.text());
    assert!(r.text().contains("5.7.1"));
    wait_log(&server, "rule=no-executables action=reject");

    // A renamed executable is caught by its content.
    let r = send(&server, &with_attachment("notes", "notes.txt", &fake_pe()));
    assert_eq!(r.code, 550, "renamed executable accepted: {}", r.text());
    // ...and a harmless .txt is not.
    let r = send(
        &server,
        &with_attachment("notes", "notes.txt", b"just text\r\n"),
    );
    assert_eq!(r.code, 250, "{}", r.text());

    // The same rule at BDAT LAST.
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<sender@outside.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let body = with_attachment("chunked", "setup.scr", b"x");
    c.line(&format!("BDAT {} LAST", body.len()));
    c.send(body.as_bytes());
    assert_eq!(c.reply().code, 550);

    let r = send(
        &server,
        "Subject: News\r\n\r\nClick to UNSUBSCRIBE\r\n  now!\r\n",
    );
    assert_eq!(r.code, 250);
    wait_log(&server, "rule=newsletters action=discard");

    let r = send(&server, "Subject: About Project X\r\n\r\nDetails.\r\n");
    assert_eq!(r.code, 250);
    let got = sink.wait_for(2, Duration::from_secs(20));
    let redirected = got
        .iter()
        .find(|m| String::from_utf8_lossy(&m.data).contains("Project X"))
        .expect("redirected message delivered");
    assert_eq!(
        redirected.rcpt_to,
        vec!["security@company.test".to_string()]
    );
    assert!(
        String::from_utf8_lossy(&redirected.data).contains(
            "X-Postern-Redirected: by filter project-x; original recipients:\r\n <user@accepted.test>\r\n"
        ),
        "{}",
        String::from_utf8_lossy(&redirected.data)
    );
    std::thread::sleep(Duration::from_millis(500));
    // Only the harmless .txt and the redirected message got through.
    assert_eq!(sink.messages().len(), 2, "{:?}", sink.messages());
    let log = server.log();
    for action in ["reject", "discard", "redirect"] {
        assert!(
            log.contains(&format!("action={action}")),
            "no log line for {action}"
        );
    }
    assert!(
        log.contains("from=<sender@outside.test> to=<user@accepted.test>"),
        "{log}"
    );
}

#[test]
fn quarantine_list_show_release_delete() {
    let sink = Sink::start(SinkConfig::default());
    let server = filtering_relay(&sink);
    let cfg = server.config.to_str().unwrap().to_string();
    let held = send(&server, "Subject: URGENT invoice 4711\r\n\r\nPay now.\r\n");
    assert_eq!(held.code, 250);
    let held_id = held.lines[0].rsplit(' ').next().unwrap().to_string();
    let gone = send(&server, "Subject: another urgent invoice\r\n\r\nPay.\r\n");
    let gone_id = gone.lines[0].rsplit(' ').next().unwrap().to_string();

    let (code, out, err) = run_cli(&["quarantine", "list", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    for needle in [
        &held_id,
        &gone_id,
        "hold-invoices",
        "<sender@outside.test>",
        "URGENT invoice 4711",
        "<user@accepted.test>",
    ] {
        assert!(out.contains(needle), "{needle} missing:\n{out}");
    }
    let (code, out, _) = run_cli(&["quarantine", "show", &held_id, "--config", &cfg]);
    assert_eq!(code, 0);
    assert!(
        out.contains("keyword") && out.contains("Subject: URGENT invoice 4711"),
        "{out}"
    );
    // Nothing was delivered while held.
    std::thread::sleep(Duration::from_millis(500));
    assert!(sink.messages().is_empty());

    let (code, out, err) = run_cli(&["quarantine", "release", &held_id, "--config", &cfg]);
    assert_eq!(code, 0, "{out}{err}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert_eq!(got[0].rcpt_to, vec!["user@accepted.test".to_string()]);
    assert!(String::from_utf8_lossy(&got[0].data).contains("URGENT invoice 4711"));

    let (code, _, _) = run_cli(&["quarantine", "delete", &gone_id, "--config", &cfg]);
    assert_eq!(code, 0);
    let (_, out, _) = run_cli(&["quarantine", "list", "--config", &cfg]);
    assert!(out.contains("quarantine is empty"), "{out}");
    wait_log(&server, "released from quarantine");
}

#[test]
fn quarantine_survives_a_crash() {
    let sink = Sink::start(SinkConfig::default());
    let mut server = filtering_relay(&sink);
    let r = send(&server, "Subject: urgent invoice\r\n\r\nx\r\n");
    assert_eq!(r.code, 250);
    server.kill9();
    let (_, out, _) = run_cli(&[
        "quarantine",
        "list",
        "--config",
        server.config.to_str().unwrap(),
    ]);
    assert!(out.contains("hold-invoices"), "{out}");
}

#[test]
fn dnsbl_refuses_listed_clients_once_looked_up_per_connection() {
    let dns = DnsServer::start();
    dns.add_a("2.0.0.127.zen.test", std::net::Ipv4Addr::new(127, 0, 0, 2));
    dns.servfail("4.0.0.127.zen.test");
    let extra = format!(
        "dnsbl = [\"zen.test\"]\n\n[delivery]\ndns_servers = [\"{}\"]\n",
        dns.addr()
    );
    let server = Server::start("", &extra);
    // Listed: refused, naming the list; looked up once for two recipients.
    let mut c = server.client("127.0.0.2");
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    let r = c.expect("RCPT TO:<user@accepted.test>", 554);
    assert!(
        r.text().contains("5.7.1") && r.text().contains("zen.test"),
        "{}",
        r.text()
    );
    c.expect("RCPT TO:<other@accepted.test>", 554);
    let queries = dns
        .queries()
        .into_iter()
        .filter(|(n, _)| n == "2.0.0.127.zen.test")
        .count();
    assert_eq!(queries, 1, "{:?}", dns.queries());
    // Not listed: fine. A failing lookup counts as not listed, and is logged.
    let mut c = server.client("127.0.0.3");
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let mut c = server.client("127.0.0.4");
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    wait_log(&server, "DNSBL lookup failed");
    // The trusted network is never looked up.
    let mut c = Client::connect(INSIDE, server.addr());
    c.hello();
    c.expect("MAIL FROM:<a@company.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    assert!(
        !dns.queries()
            .iter()
            .any(|(n, _)| n.starts_with("1.0.0.127."))
    );
    assert!(server.log().contains("rule=dnsbl"));
}
