//! End-to-end tests of `postern serve`: the real binary on loopback ports, real
//! sockets, the real spool on disk.

use std::time::{Duration, Instant};

use crate::common::{Client, INSIDE, OUTSIDE, Server, message, run_cli};

/// Live messages in a spool, read the way `postern queue list` will.
fn spooled(server: &Server) -> Vec<postern::queue::StoredMessage> {
    postern::queue::scan(&server.spool()).unwrap()
}

#[test]
fn outside_client_inbound_only_inside_client_relays_anywhere() {
    let server = Server::start("", "");
    let mut outside = server.client(OUTSIDE);
    outside.hello();
    outside.expect("MAIL FROM:<a@outside.test>", 250);
    let r = outside.expect("RCPT TO:<user@other.test>", 554);
    assert!(r.text().contains("5.7.1"));
    outside.expect("RSET", 250);
    let r = outside.send_mail("a@outside.test", &["user@accepted.test"], &message("in"));
    assert_eq!(r.code, 250, "{}", r.text());

    let mut inside = server.client(INSIDE);
    inside.hello();
    let r = inside.send_mail("u@company.test", &["someone@other.test"], &message("out"));
    assert_eq!(r.code, 250, "{}", r.text());

    let msgs = spooled(&server);
    assert_eq!(msgs.len(), 2);
    let log = server.log();
    assert!(log.contains("recipient refused"), "{log}");
    assert!(log.contains("rule=relay_denied"), "{log}");
    assert!(log.contains("message accepted"), "{log}");
}

#[test]
fn received_header_and_envelope_are_stored() {
    let server = Server::start("", "");
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.send_mail("a@outside.test", &["user@accepted.test"], &message("trace"));
    let id = r.lines[0].rsplit(' ').next().unwrap().to_string();
    let msgs = spooled(&server);
    let m = msgs
        .iter()
        .find(|m| m.envelope.id.to_string() == id)
        .expect("queued id");
    assert_eq!(m.envelope.sender, "a@outside.test");
    assert_eq!(
        m.envelope.recipients,
        vec!["user@accepted.test".to_string()]
    );
    assert_eq!(m.envelope.helo, "client.test");
    let body = postern::queue::read_body_in(&server.spool(), m).unwrap();
    let text = String::from_utf8(body).unwrap();
    assert!(
        text.starts_with("Received: from client.test ([127.0.0.2])\r\n"),
        "{text}"
    );
    assert!(
        text.contains(&format!("by relay.test (Postern) with ESMTP id {id}")),
        "{text}"
    );
    assert!(text.contains("for <user@accepted.test>;"), "{text}");
    assert!(text.ends_with("\r\n\r\nHello.\r\n"), "{text}");
}

#[test]
fn two_hundred_concurrent_sessions() {
    let server = Server::start("", "");
    let addr = server.addr();
    let threads: Vec<_> = (0..200)
        .map(|i| {
            std::thread::spawn(move || {
                let mut c = Client::connect(OUTSIDE, addr);
                c.hello();
                let r = c.send_mail(
                    &format!("s{i}@outside.test"),
                    &["user@accepted.test", "other@company.test"],
                    &message(&format!("concurrent-{i}")),
                );
                assert_eq!(r.code, 250, "{}", r.text());
                c.expect("QUIT", 221);
            })
        })
        .collect();
    for t in threads {
        t.join().unwrap();
    }
    let msgs = spooled(&server);
    assert_eq!(msgs.len(), 200);
    let mut senders: Vec<_> = msgs.iter().map(|m| m.envelope.sender.clone()).collect();
    senders.sort();
    senders.dedup();
    assert_eq!(senders.len(), 200);
}

/// SIGKILL right after the 250: the message is on disk, whole, after a restart.
#[test]
fn kill_9_after_250_loses_nothing() {
    let mut server = Server::start("", "");
    let mut ids = Vec::new();
    for round in 0..3 {
        let mut c = server.client(OUTSIDE);
        c.hello();
        let body = format!(
            "{}{}\r\n",
            message(&format!("crash-{round}")),
            "x".repeat(900)
        );
        let r = c.send_mail("a@outside.test", &["user@accepted.test"], &body);
        assert_eq!(r.code, 250);
        ids.push((r.lines[0].rsplit(' ').next().unwrap().to_string(), body));
        server.kill9();
        server.spawn();
    }
    let msgs = spooled(&server);
    for (id, body) in &ids {
        let m = msgs
            .iter()
            .find(|m| &m.envelope.id.to_string() == id)
            .unwrap_or_else(|| panic!("{id} lost"));
        let stored = postern::queue::read_body_in(&server.spool(), m).unwrap();
        assert!(stored.ends_with(body.as_bytes()), "{id} altered");
    }
    // The queue is loaded in the background after the listener is up: wait for it.
    crate::common::wait_until("the restart to load all 3", Duration::from_secs(20), || {
        server.log().contains("messages=3")
    });
}

#[test]
fn sigterm_answers_421_and_exits_zero() {
    let mut server = Server::start("", "");
    let mut idle = server.client(OUTSIDE);
    idle.hello();
    let mut mid = server.client(OUTSIDE);
    mid.hello();
    mid.expect("MAIL FROM:<a@outside.test>", 250);
    let started = Instant::now();
    let status = server.terminate(Duration::from_secs(10));
    assert!(status.success(), "{status}");
    assert!(started.elapsed() < Duration::from_secs(10));
    for c in [&mut idle, &mut mid] {
        let r = c.reply();
        assert_eq!(r.code, 421, "{}", r.text());
        assert!(c.is_closed());
    }
    // Nothing listens any more.
    assert!(Client::try_connect(OUTSIDE, server.addr()).is_err());
    assert!(server.log().contains("postern stopped"));
}

#[test]
fn per_ip_connection_limit() {
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let text = crate::common::base_config(port, &dir.path().join("spool"), "", "")
        .replace("per_ip_connections = 500", "per_ip_connections = 3");
    let server = Server::start_with_config(dir, port, &text);
    let mut held: Vec<_> = (0..3)
        .map(|_| {
            let mut c = server.client(OUTSIDE);
            assert_eq!(c.reply().code, 220);
            c
        })
        .collect();
    let mut over = server.client(OUTSIDE);
    let r = over.reply();
    assert_eq!(r.code, 421, "{}", r.text());
    assert!(r.text().contains("4.7.0"));
    assert!(over.is_closed());
    // Another address is not affected.
    let mut other = server.client("127.0.0.3");
    assert_eq!(other.reply().code, 220);
    // A slot frees when a connection closes.
    held.pop().unwrap().expect("QUIT", 221);
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let mut c = server.client(OUTSIDE);
        if c.reply().code == 220 {
            break;
        }
        assert!(Instant::now() < deadline, "slot never freed");
        std::thread::sleep(Duration::from_millis(50));
    }
    assert!(server.log().contains("limit per_ip_connections=3 reached"));
}

#[test]
fn idle_session_times_out_with_421() {
    let server = Server::start("command_timeout = \"1s\"", "");
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.reply();
    assert_eq!(r.code, 421);
    assert!(r.text().contains("4.4.2"), "{}", r.text());
    assert!(c.is_closed());
}

#[test]
fn ipv6_listener() {
    if std::net::TcpListener::bind("[::1]:0").is_err() {
        eprintln!("no IPv6 loopback here; skipped");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let port = crate::common::free_port();
    let port6 = crate::common::free_port();
    let text = crate::common::base_config(port, &dir.path().join("spool"), "", "").replace(
        "[relay]",
        &format!("[[listener]]\naddress = \"[::1]:{port6}\"\n\n[relay]"),
    );
    let server = Server::start_with_config(dir, port, &text);
    let mut c = Client::connect("::1", format!("[::1]:{port6}").parse().unwrap());
    c.hello();
    // ::1 is not in trusted_networks (127.0.0.1/32): inbound only.
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<x@other.test>", 554);
    let r = c.cmd("RCPT TO:<x@accepted.test>");
    assert_eq!(r.code, 250);
    drop(server);
}

#[test]
fn python_smtplib_interop() {
    let server = Server::start("", "");
    let script = format!(
        r#"
import smtplib, sys
from email.message import EmailMessage
m = EmailMessage()
m["From"] = "a@outside.test"; m["To"] = "user@accepted.test"; m["Subject"] = "smtplib"
m.set_content("hello\n.leading dot\n")
with smtplib.SMTP("127.0.0.1", {port}, source_address=("127.0.0.2", 0), timeout=10) as s:
    s.ehlo("py.test")
    assert s.has_extn("pipelining") and s.has_extn("chunking") and s.has_extn("size")
    refused = s.send_message(m)
    assert refused == {{}}, refused
    try:
        s.sendmail("a@outside.test", ["x@other.test"], "Subject: no\r\n\r\nno\r\n")
        sys.exit("relay was allowed")
    except smtplib.SMTPRecipientsRefused as e:
        code = e.recipients["x@other.test"][0]
        assert code == 554, code
print("ok")
"#,
        port = server.port
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &script])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let msgs = spooled(&server);
    assert_eq!(msgs.len(), 1);
    let body = postern::queue::read_body_in(&server.spool(), &msgs[0]).unwrap();
    // smtplib dot-stuffed the line; we stored it unstuffed.
    assert!(
        String::from_utf8(body)
            .unwrap()
            .contains("\r\n.leading dot\r\n")
    );
}

#[test]
fn check_config_describes_policy_and_rejects_bad_files() {
    let dir = tempfile::tempdir().unwrap();
    let good = dir.path().join("good.toml");
    std::fs::write(
        &good,
        "[relay]\naccepted_domains = [\"a.test\", \"b.test\"]\ntrusted_networks = [\"10.0.0.0/8\"]\n",
    )
    .unwrap();
    let (code, out, err) = run_cli(&["check-config", "--config", good.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("open relay: NO"), "{out}");
    assert!(out.contains("a.test, b.test"), "{out}");

    let open = dir.path().join("open.toml");
    std::fs::write(&open, "[relay]\nopen_relay = true\n").unwrap();
    let (code, out, _) = run_cli(&["check-config", "--config", open.to_str().unwrap()]);
    assert_eq!(code, 0);
    assert!(out.contains("open relay: YES"), "{out}");

    let bad = dir.path().join("bad.toml");
    std::fs::write(&bad, "hostname = \"relay.test\"\nmax_recipent = 5\n").unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", bad.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("bad.toml:2"), "{err}");
    assert!(err.contains("max_recipent"), "{err}");

    let (code, out, _) = run_cli(&["version"]);
    assert_eq!(code, 0);
    assert!(out.starts_with("postern "));
}

#[test]
fn open_relay_is_loudly_logged() {
    let server = Server::start("", "open_relay = true");
    let log = server.log();
    assert!(log.contains("OPEN RELAY"), "{log}");
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<x@other.test>", 250);
    // ...and still no tricks.
    c.expect("RCPT TO:<x%third.test@other.test>", 554);
}

/// An example with `[[dkim]]` names key files that exist only once an admin made them
/// (check-config reads them): a copy of it whose keys are made by `postern dkim keygen`
/// in `dir`, as the example's comments say to.
fn with_keys_made(example: &std::path::Path, dir: &std::path::Path) -> std::path::PathBuf {
    let mut text = std::fs::read_to_string(example).unwrap();
    let keys: Vec<(String, String, String)> = text
        .split("[[dkim]]")
        .skip(1)
        .map(|section| {
            let value = |key: &str| {
                section
                    .lines()
                    .find_map(|l| l.trim().strip_prefix(key)?.trim().strip_prefix('='))
                    .map(|v| v.trim().split('"').nth(1).unwrap().to_string())
                    .unwrap()
            };
            (value("domain"), value("selector"), value("key"))
        })
        .collect();
    for (i, (domain, selector, key)) in keys.iter().enumerate() {
        let made = dir.join(format!("key{i}.pem"));
        let algorithm = if selector.ends_with('e') {
            "ed25519"
        } else {
            "rsa"
        };
        let (code, _, err) = run_cli(&[
            "dkim",
            "keygen",
            domain,
            selector,
            "--algorithm",
            algorithm,
            "--out",
            made.to_str().unwrap(),
        ]);
        assert_eq!(code, 0, "{err}");
        text = text.replace(key.as_str(), made.to_str().unwrap());
    }
    let copy = dir.join(example.file_name().unwrap());
    std::fs::write(&copy, text).unwrap();
    copy
}

#[test]
fn every_example_config_is_valid() {
    let dir = concat!(env!("CARGO_MANIFEST_DIR"), "/../../examples");
    let keys = tempfile::tempdir().unwrap();
    let mut n = 0;
    for entry in std::fs::read_dir(dir).unwrap() {
        let path = entry.unwrap().path();
        if path.extension().is_some_and(|e| e == "toml") {
            let path = if std::fs::read_to_string(&path).unwrap().contains("[[dkim]]") {
                with_keys_made(&path, keys.path())
            } else {
                path
            };
            let (code, out, err) = run_cli(&["check-config", "--config", path.to_str().unwrap()]);
            assert_eq!(code, 0, "{}: {out}{err}", path.display());
            assert!(out.contains("open relay: NO"), "{}: {out}", path.display());
            n += 1;
        }
    }
    assert!(n >= 3);
}

#[test]
fn metrics_endpoint_counts_sessions() {
    let metrics_port = crate::common::free_port();
    let server = Server::start(
        "",
        &format!("\n[metrics]\naddress = \"127.0.0.1:{metrics_port}\"\n"),
    );
    assert_ne!(metrics_port, server.port);
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<user@other.test>", 554);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    c.expect("DATA", 354);
    c.send(message("metrics").as_bytes());
    c.send(b".\r\n");
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);

    // The queue runner tries the message at once (a closed port: deferred); wait for it.
    let deadline = Instant::now() + Duration::from_secs(15);
    let body = loop {
        let (status, headers, body) = crate::common::http_get(metrics_port, "/metrics");
        assert_eq!(status, "HTTP/1.1 200 OK");
        assert!(
            headers
                .lines()
                .any(|h| h == "Content-Type: text/plain; version=0.0.4"),
            "{headers}"
        );
        assert!(
            headers.lines().any(|h| h == "Connection: close"),
            "{headers}"
        );
        if body.contains("postern_deliveries_total{status=\"deferred\"} 1\n") {
            break body;
        }
        assert!(Instant::now() < deadline, "no deferral counted:\n{body}");
        std::thread::sleep(Duration::from_millis(100));
    };
    for want in [
        "# TYPE postern_connections_total counter\n",
        "postern_messages_accepted_total 1\n",
        "postern_recipients_refused_total{rule=\"relay_denied\"} 1\n",
        "postern_recipients_refused_total{rule=\"unknown_recipient\"} 0\n",
        "postern_messages_rejected_total{reason=\"filter\"} 0\n",
        "postern_auth_failures_total 0\n",
        "postern_deliveries_total{status=\"delivered\"} 0\n",
        "postern_queue_messages 1\n",
        "postern_bounces_total 0\n",
    ] {
        assert!(body.contains(want), "missing {want:?} in:\n{body}");
    }
    let value = |series: &str| -> u64 {
        body.lines()
            .find_map(|l| l.strip_prefix(series)?.strip_prefix(' '))
            .unwrap_or_else(|| panic!("no {series} in:\n{body}"))
            .parse()
            .unwrap()
    };
    let listener = format!("listener=\"127.0.0.1:{}\"", server.port);
    // Our client and the start-up probe (or probes).
    assert!(value(&format!("postern_connections_total{{{listener}}}")) >= 2);
    assert!(
        body.contains(&format!(
            "postern_connections_refused_total{{{listener},limit=\"max_connections\"}} 0\n"
        )),
        "{body}"
    );
    assert!(value("postern_spool_fsyncs_total") >= 1, "{body}");

    let (status, _, _) = crate::common::http_get(metrics_port, "/");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
    let (status, _, _) = crate::common::http_get(metrics_port, "/metricsx");
    assert_eq!(status, "HTTP/1.1 404 Not Found");
}
