//! DKIM signing (interface: "Mail authentication"): keys made by `postern dkim keygen`,
//! mail from trusted clients signed with RSA and Ed25519 and verified at the next hop by
//! an independent verifier (dkimpy, Debian's python3-dkim: testdata/dkim/verify.py), the
//! signature surviving Postern's own delivery (dot-stuffing, 8-bit, long lines, BDAT);
//! outside clients' mail never signed; `postern dkim check` against a DNS responder.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::Duration;

use postern_testkit::dns::DnsServer;
use postern_testkit::sink::{Sink, SinkConfig};

use crate::common::{INSIDE, OUTSIDE, Server, route_to, run_cli};

/// `postern dkim keygen`: the key file and the record text to publish (the quoted
/// strings of the zone line, joined).
fn keygen(dir: &Path, selector: &str, algorithm: &str) -> (PathBuf, String) {
    let out = dir.join(format!("{selector}.pem"));
    let (code, stdout, stderr) = run_cli(&[
        "dkim",
        "keygen",
        "company.test",
        selector,
        "--algorithm",
        algorithm,
        "--out",
        out.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{stderr}");
    let line = stdout.trim();
    assert!(
        line.starts_with(&format!("{selector}._domainkey.company.test. IN TXT \"")),
        "{line}"
    );
    let record: String = line.split('"').skip(1).step_by(2).collect();
    (out, record)
}

fn dkim_section(selector: &str, key: &Path, subdomains: bool) -> String {
    format!(
        "\n[[dkim]]\ndomain = \"company.test\"\nselector = \"{selector}\"\nkey = \"{}\"\n\
         subdomains = {subdomains}\n",
        key.display()
    )
}

/// Runs the independent verifier on `message`; (all signatures pass, its output).
fn verify(message: &str, records: &[(&str, &str)]) -> (bool, String) {
    let args: Vec<String> = records
        .iter()
        .map(|(s, r)| format!("{s}._domainkey.company.test={r}"))
        .collect();
    let mut child = Command::new("/usr/bin/python3")
        .arg(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/../../testdata/dkim/verify.py"
        ))
        .args(&args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("python3-dkim (scripts/test installs it)");
    use std::io::Write;
    child
        .stdin
        .take()
        .unwrap()
        .write_all(message.as_bytes())
        .unwrap();
    let out = child.wait_with_output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out.status.success(), text)
}

/// A message whose transfer tests the byte path: lines starting with a dot (stuffed on
/// the wire both ways), 8-bit UTF-8, a 990-octet line, trailing spaces.
fn tricky_message(from: &str, subject: &str) -> String {
    format!(
        "From: Alice <{from}>\r\nTo: <bob@example.net>\r\nSubject: {subject}\r\n\
         Date: Tue, 1 Dec 2026 12:00:00 +0000\r\nMessage-ID: <{subject}@company.test>\r\n\
         MIME-Version: 1.0\r\nContent-Type: text/plain; charset=utf-8\r\n\
         Content-Transfer-Encoding: 8bit\r\n\r\n\
         Grüße aus Köln   \r\n.a line that starts with a dot\r\n..two dots\r\n\
         {}\r\nend\r\n",
        "x".repeat(990)
    )
}

struct Signing {
    _keys: tempfile::TempDir,
    server: Server,
    sink: Sink,
    rsa: String,
    ed25519: String,
}

/// A relay signing company.test with an RSA key (s1) and an Ed25519 key (s2, also for
/// subdomains), everything routed to a sink.
fn start_signing() -> Signing {
    let keys = tempfile::tempdir().unwrap();
    let (rsa_key, rsa) = keygen(keys.path(), "s1", "rsa");
    let (ed_key, ed25519) = keygen(keys.path(), "s2", "ed25519");
    let sink = Sink::start(SinkConfig::default());
    let extra = format!(
        "{}{}{}",
        dkim_section("s1", &rsa_key, false),
        dkim_section("s2", &ed_key, true),
        route_to(&["*"], &sink)
    );
    let server = Server::start("", &extra);
    Signing {
        _keys: keys,
        server,
        sink,
        rsa,
        ed25519,
    }
}

#[test]
fn relayed_mail_is_signed_with_rsa_and_ed25519_and_verifies_at_the_next_hop() {
    let s = start_signing();
    let mut c = s.server.client(INSIDE);
    c.hello();
    let r = c.send_mail(
        "alice@company.test",
        &["bob@example.net"],
        &tricky_message("alice@company.test", "signed"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    let got = s.sink.wait_for(1, Duration::from_secs(20));
    let data = got[0].data_str();
    assert_eq!(data.matches("DKIM-Signature:").count(), 2, "{data}");
    assert!(data.starts_with("DKIM-Signature:"), "signatures at the top");
    let records = [("s1", s.rsa.as_str()), ("s2", s.ed25519.as_str())];
    let (ok, out) = verify(&data, &records);
    assert!(ok, "{out}\n{data}");
    assert!(
        out.contains("a=rsa-sha256") && out.contains("a=ed25519-sha256"),
        "{out}"
    );
    // From: is oversigned: one more From than the message has, in each h= list.
    let unfolded = data.replace("\r\n\t", "").replace("\r\n ", "");
    let lists: Vec<&str> = unfolded
        .split(";h=")
        .skip(1)
        .map(|h| &h[..h.find(';').unwrap()])
        .collect();
    assert_eq!(lists.len(), 2, "{unfolded}");
    for list in lists {
        assert_eq!(
            list.split(':').filter(|n| *n == "From").count(),
            2,
            "{list}"
        );
    }
    let log = s.server.log();
    assert!(log.contains("dkim signed"), "{log}");

    // The verifier does fail: one changed character in the body.
    let tampered = data.replace("Köln", "Kiln");
    let (ok, out) = verify(&tampered, &records);
    assert!(!ok, "a tampered body still verified: {out}");
    // And a From: added after signing breaks it too (oversigning).
    let added = data.replacen("Subject:", "From: <mallory@evil.test>\r\nSubject:", 1);
    assert!(!verify(&added, &records).0);
}

#[test]
fn bdat_transfers_are_signed_and_verify() {
    let s = start_signing();
    let body = tricky_message("alice@company.test", "bdat");
    let mut c = s.server.client(INSIDE);
    c.hello();
    c.expect("MAIL FROM:<alice@company.test>", 250);
    c.expect("RCPT TO:<bob@example.net>", 250);
    let (a, b) = body.split_at(body.len() / 2);
    c.send(format!("BDAT {}\r\n{a}", a.len()).as_bytes());
    assert_eq!(c.reply().code, 250);
    c.send(format!("BDAT {} LAST\r\n{b}", b.len()).as_bytes());
    assert_eq!(c.reply().code, 250);
    c.expect("QUIT", 221);
    let data = s.sink.wait_for(1, Duration::from_secs(20))[0].data_str();
    let (ok, out) = verify(&data, &[("s1", &s.rsa), ("s2", &s.ed25519)]);
    assert!(ok, "{out}\n{data}");
}

#[test]
fn subdomains_and_outside_clients() {
    let s = start_signing();
    // sub.company.test: only the key with subdomains = true signs, still as d=company.test.
    let mut c = s.server.client(INSIDE);
    c.hello();
    let r = c.send_mail(
        "alice@sub.company.test",
        &["bob@example.net"],
        &tricky_message("alice@sub.company.test", "sub"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    let data = s.sink.wait_for(1, Duration::from_secs(20))[0].data_str();
    assert_eq!(data.matches("DKIM-Signature:").count(), 1, "{data}");
    let (ok, out) = verify(&data, &[("s2", &s.ed25519)]);
    assert!(
        ok && out.contains("s=s2") && out.contains("d=company.test"),
        "{out}"
    );

    // An outside client writing as company.test to an accepted domain: never signed.
    let mut c = s.server.client(OUTSIDE);
    c.hello();
    let r = c.send_mail(
        "alice@company.test",
        &["user@accepted.test"],
        &tricky_message("alice@company.test", "outside"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    let got = s.sink.wait_for(2, Duration::from_secs(20));
    let outside = got
        .iter()
        .map(|m| m.data_str())
        .find(|d| d.contains("Subject: outside"))
        .unwrap();
    assert!(!outside.contains("DKIM-Signature:"), "{outside}");

    // Another domain from inside: not ours to sign, and not counted as unsigned.
    let mut c = s.server.client(INSIDE);
    c.hello();
    let r = c.send_mail(
        "carol@other.test",
        &["bob@example.net"],
        &tricky_message("carol@other.test", "other"),
    );
    assert_eq!(r.code, 250);
    let got = s.sink.wait_for(3, Duration::from_secs(20));
    assert!(
        got.iter().all(|m| !m.data_str().contains("Subject: other")
            || !m.data_str().contains("DKIM-Signature:"))
    );
    assert!(!s.server.log().contains("dkim not signed"));
}

#[test]
fn dkim_check_reports_published_missing_and_mismatch() {
    let dir = tempfile::tempdir().unwrap();
    let (k1, r1) = keygen(dir.path(), "s1", "ed25519");
    let (k2, _) = keygen(dir.path(), "s2", "ed25519");
    let (_, other) = keygen(dir.path(), "s3", "ed25519");
    let dns = DnsServer::start();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\n[delivery]\ndns_servers = [\"{}\"]\n{}{}",
            dir.path().join("spool").display(),
            dns.addr(),
            dkim_section("s1", &k1, false),
            dkim_section("s2", &k2, false),
        ),
    )
    .unwrap();
    dns.add_txt("s1._domainkey.company.test", &r1);
    let cfg = config.to_str().unwrap();
    let (code, out, _) = run_cli(&["dkim", "check", "--config", cfg]);
    assert_eq!(code, 1, "{out}");
    assert!(
        out.contains("s1._domainkey.company.test: published"),
        "{out}"
    );
    assert!(out.contains("s2._domainkey.company.test: missing"), "{out}");
    dns.add_txt("s2._domainkey.company.test", &other);
    let (code, out, _) = run_cli(&["dkim", "check", "--config", cfg]);
    assert_eq!(code, 1);
    assert!(
        out.contains("s2._domainkey.company.test: mismatch"),
        "{out}"
    );
}

#[test]
fn a_key_that_cannot_sign_is_a_config_error_with_file_and_reason() {
    let dir = tempfile::tempdir().unwrap();
    let key = dir.path().join("bad.pem");
    std::fs::write(
        &key,
        "-----BEGIN PRIVATE KEY-----\nAAAA\n-----END PRIVATE KEY-----\n",
    )
    .unwrap();
    let config = dir.path().join("postern.toml");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\n{}",
            dir.path().join("spool").display(),
            dkim_section("s1", &key, false)
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("postern.toml:6:") && err.contains("dkim.key"),
        "{err}"
    );
    assert!(err.contains("bad.pem"), "{err}");
    let missing = dir.path().join("missing.pem");
    std::fs::write(
        &config,
        format!(
            "spool_dir = \"{}\"\n{}",
            dir.path().join("spool").display(),
            dkim_section("s1", &missing, false)
        ),
    )
    .unwrap();
    let (code, _, err) = run_cli(&["check-config", "--config", config.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("cannot read") && err.contains("missing.pem"),
        "{err}"
    );
}

/// Signing comes after the milters (interface: "Mail authentication"): a message whose
/// Subject, headers and body a milter changed is signed as it leaves them, so the
/// signature covers the milter's changes and verifies at the next hop.
#[test]
fn a_message_a_milter_changed_is_signed_as_the_milter_left_it() {
    let keys = tempfile::tempdir().unwrap();
    let (key, record) = keygen(keys.path(), "s1", "ed25519");
    let sink = Sink::start(SinkConfig::default());
    let port = crate::common::free_port();
    let _milter = crate::milter::scenario(&port.to_string(), "scenario", "script");
    let extra = format!(
        "{}{}\n[[milter]]\nname = \"scenario\"\naddress = \"127.0.0.1:{port}\"\n",
        dkim_section("s1", &key, false),
        route_to(&["*"], &sink)
    );
    let server = Server::start("", &extra);
    let mut c = server.client(INSIDE);
    c.hello();
    let body = "From: <alice@company.test>\r\nTo: <bob@example.net>\r\n\
                Subject: edit-headers replace-body\r\nX-Remove: gone\r\n\
                Message-ID: <milter-signed@company.test>\r\n\r\nThe original body.\r\n";
    let r = c.send_mail("alice@company.test", &["bob@example.net"], body);
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    let got = sink.wait_for(1, Duration::from_secs(20));
    let data = got[0].data_str();
    for change in [
        "Subject: [edited] edit-headers replace-body",
        "X-Added: added by scenario",
        "This body was replaced by the milter.",
    ] {
        assert!(data.contains(change), "{change} missing:\n{data}");
    }
    assert!(
        !data.contains("X-Remove") && !data.contains("The original body"),
        "{data}"
    );
    let (ok, out) = verify(&data, &[("s1", record.as_str())]);
    assert!(ok, "{out}\n{data}");
    // The signature covers the milter's Subject: the one the client wrote fails.
    let original = data.replace("Subject: [edited] ", "Subject: ");
    assert!(!verify(&original, &[("s1", record.as_str())]).0, "{data}");
}
