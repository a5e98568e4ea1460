//! The secure and authenticating relay end to end: STARTTLS and implicit TLS with a
//! certificate from a test CA, require_tls, the STARTTLS injection case, AUTH PLAIN and
//! LOGIN, required AUTH, authenticated relay, brute-force lockout per IP and per user,
//! and interop with real clients (swaks, openssl s_client).

use std::process::Command;
use std::sync::Arc;
use std::time::Duration;

use crate::common::{Client, OUTSIDE, Server, message, run_cli};
use base64::Engine;
use postern_testkit::ca::TestCa;

fn b64(s: &str) -> String {
    base64::engine::general_purpose::STANDARD.encode(s)
}

struct Secure {
    server: Server,
    ca: TestCa,
    /// 25-style: STARTTLS offered, AUTH optional.
    smtp: u16,
    /// 587-style: STARTTLS required, AUTH required.
    submission: u16,
    /// 465-style: implicit TLS, AUTH required.
    smtps: u16,
}

impl Secure {
    fn tls_config(&self) -> Arc<rustls::ClientConfig> {
        self.ca.client_config()
    }

    fn addr(&self, port: u16) -> std::net::SocketAddr {
        std::net::SocketAddr::from(([127, 0, 0, 1], port))
    }

    /// A client on the submission port, after STARTTLS and EHLO.
    fn submission_client(&self, from: &str) -> Client {
        let mut c = Client::connect(from, self.addr(self.submission));
        c.hello();
        c.expect("STARTTLS", 220);
        c.start_tls(self.tls_config(), "relay.test").unwrap();
        c.expect("EHLO client.test", 250);
        c
    }

    fn spooled_body(&self, id: &str) -> String {
        let msgs = postern::queue::scan(&self.server.spool()).unwrap();
        let m = msgs
            .iter()
            .find(|m| m.envelope.id.to_string() == id)
            .unwrap();
        String::from_utf8(postern::queue::read_body_in(&self.server.spool(), m).unwrap()).unwrap()
    }
}

fn start(auth_extra: &str) -> Secure {
    start_with_users(auth_extra, &[])
}

/// Starts the server with alice and `users` (name, password, sender addresses) defined.
fn start_with_users(auth_extra: &str, extra_users: &[(&str, &str, &[&str])]) -> Secure {
    let dir = tempfile::tempdir().unwrap();
    let ca = TestCa::new();
    let (cert, key) = ca.issue(&["relay.test", "127.0.0.1"]).write_to(dir.path());
    let (smtp, submission, smtps) = (
        crate::common::free_port(),
        crate::common::free_port(),
        crate::common::free_port(),
    );
    let users = dir.path().join("users");
    let text = format!(
        r#"hostname = "relay.test"
spool_dir = "{spool}"

[[listener]]
address = "127.0.0.1:{smtp}"
tls = "starttls"
auth = "optional"

[[listener]]
address = "127.0.0.1:{submission}"
tls = "starttls"
require_tls = true
auth = "required"

[[listener]]
address = "127.0.0.1:{smtps}"
tls = "implicit"
auth = "required"

[tls]
cert = "{cert}"
key = "{key}"

[relay]
accepted_domains = ["accepted.test"]
trusted_networks = ["127.0.0.1/32"]

[auth]
users_file = "{users}"
max_failures = 3
failure_window = "10m"
lockout = "3s"
{auth_extra}

[[route]]
domains = ["*"]
next_hop = "[127.0.0.1]:1"
"#,
        spool = dir.path().join("spool").display(),
        cert = cert.display(),
        key = key.display(),
        users = users.display(),
    );
    let config = dir.path().join("postern.toml");
    std::fs::write(&config, &text).unwrap();
    add_user(&config, "alice", "correct horse", &[]);
    for (name, password, addresses) in extra_users {
        add_user(&config, name, password, addresses);
    }
    let server = Server::start_with_config(dir, smtp, &text);
    Secure {
        server,
        ca,
        smtp,
        submission,
        smtps,
    }
}

fn add_user(config: &std::path::Path, name: &str, password: &str, addresses: &[&str]) {
    use std::ffi::OsStr;
    let mut args: Vec<&OsStr> = ["user", "add", name, "--password-stdin", "--config"]
        .into_iter()
        .map(OsStr::new)
        .collect();
    args.push(config.as_os_str());
    for a in addresses {
        args.extend([OsStr::new("--address"), OsStr::new(a)]);
    }
    let out = crate::common::run_cli_stdin(&args, &format!("{password}\n"));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn starttls_then_auth_then_relay_with_trace_details() {
    let s = start("");
    let mut c = Client::connect(OUTSIDE, s.addr(s.smtp));
    let ehlo = c.hello();
    assert!(
        ehlo.lines.iter().any(|l| l.ends_with("STARTTLS")),
        "{ehlo:?}"
    );
    assert!(
        !ehlo.text().contains("AUTH"),
        "AUTH offered in clear: {ehlo:?}"
    );
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", b64("\0alice\0correct horse")))
            .code,
        538
    );
    c.expect("STARTTLS", 220);
    c.start_tls(s.tls_config(), "relay.test").unwrap();
    let ehlo = c.expect("EHLO client.test", 250);
    assert!(ehlo.text().contains("AUTH PLAIN LOGIN"), "{ehlo:?}");
    assert!(!ehlo.text().contains("STARTTLS"));
    // Unauthenticated: inbound only.
    c.expect("MAIL FROM:<alice@accepted.test>", 250);
    c.expect("RCPT TO:<friend@other.test>", 554);
    c.expect("RSET", 250);
    let r = c.expect(
        &format!("AUTH PLAIN {}", b64("\0alice\0correct horse")),
        235,
    );
    assert!(r.text().contains("2.7.0"));
    let r = c.send_mail(
        "alice@accepted.test",
        &["friend@other.test"],
        &message("roaming"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    let id = r.lines[0].rsplit(' ').next().unwrap().to_string();
    let body = s.spooled_body(&id);
    assert!(body.contains("with ESMTPSA id"), "{body}");
    assert!(body.contains("(using TLSv1.3 with cipher"), "{body}");
    // The login name stays out of the message (issue 8): the log has it.
    assert!(!body.contains("alice)"), "{body}");
    let log = s.server.log();
    assert!(log.contains("auth ok"), "{log}");
    assert!(!log.contains("correct horse"), "a password reached the log");
}

#[test]
fn submission_requires_tls_and_auth() {
    let s = start("");
    let mut c = Client::connect(OUTSIDE, s.addr(s.submission));
    let ehlo = c.hello();
    assert!(!ehlo.text().contains("AUTH"));
    let r = c.cmd("MAIL FROM:<a@accepted.test>");
    assert_eq!(r.code, 530, "{}", r.text());
    assert!(r.text().contains("5.7.0"));
    assert_eq!(
        c.cmd(&format!("AUTH PLAIN {}", b64("\0alice\0correct horse")))
            .code,
        530
    );
    let mut c = s.submission_client(OUTSIDE);
    let r = c.cmd("MAIL FROM:<a@accepted.test>");
    assert_eq!(r.code, 530, "auth required: {}", r.text());
    // LOGIN, then cancel, then the real thing.
    assert_eq!(c.cmd("AUTH LOGIN").lines[0], "334 VXNlcm5hbWU6");
    assert_eq!(c.cmd("*").code, 501);
    assert_eq!(c.cmd("AUTH LOGIN").code, 334);
    assert_eq!(c.cmd(&b64("alice")).lines[0], "334 UGFzc3dvcmQ6");
    assert_eq!(c.cmd(&b64("wrong")).code, 535);
    assert_eq!(c.cmd("AUTH LOGIN").code, 334);
    assert_eq!(c.cmd(&b64("alice")).code, 334);
    assert_eq!(c.cmd(&b64("correct horse")).code, 235);
    c.expect("MAIL FROM:<alice@accepted.test>", 250);
    c.expect("RCPT TO:<x@other.test>", 250);
}

#[test]
fn implicit_tls_greets_after_the_handshake() {
    let s = start("");
    let mut c =
        Client::connect_tls(OUTSIDE, s.addr(s.smtps), s.tls_config(), "relay.test").unwrap();
    let ehlo = c.hello();
    assert!(ehlo.text().contains("AUTH PLAIN LOGIN"));
    assert!(!ehlo.text().contains("STARTTLS"));
    c.expect(
        &format!("AUTH PLAIN {}", b64("alice\0alice\0correct horse")),
        235,
    );
    // A plaintext client on the implicit-TLS port gets no greeting: the bytes fail the
    // handshake and the connection is closed.
    let mut plain = Client::connect(OUTSIDE, s.addr(s.smtps));
    plain.send(b"EHLO x\r\n");
    assert!(plain.is_closed());
}

#[test]
fn commands_pipelined_behind_starttls_are_discarded() {
    let s = start("");
    let mut c = Client::connect(OUTSIDE, s.addr(s.smtp));
    c.hello();
    // CVE-2011-0411: the MAIL/RCPT after STARTTLS travel in plaintext and must be dropped.
    c.send(b"STARTTLS\r\nMAIL FROM:<evil@outside.test>\r\nRCPT TO:<victim@accepted.test>\r\n");
    assert_eq!(c.reply().code, 220);
    c.start_tls(s.tls_config(), "relay.test").unwrap();
    // The first reply after the handshake answers our EHLO, not the injected commands.
    let r = c.cmd("EHLO client.test");
    assert_eq!(r.code, 250, "{}", r.text());
    assert!(r.lines[0].starts_with("250-relay.test"), "{r:?}");
    let r = c.cmd("RCPT TO:<victim@accepted.test>");
    assert_eq!(r.code, 503, "the injected MAIL was executed: {}", r.text());
}

#[test]
fn lockout_per_ip_and_per_user_then_expiry() {
    let s = start("");
    let auth = |from: &str, user: &str, pass: &str| -> u16 {
        let mut c = s.submission_client(from);
        c.cmd(&format!("AUTH PLAIN {}", b64(&format!("\0{user}\0{pass}"))))
            .code
    };
    // Per IP: three failures with names that do not exist (no per-user count)...
    for i in 0..3 {
        assert_eq!(auth("127.0.0.2", &format!("nobody{i}"), "x"), 535);
    }
    // ...then even the right password from that IP is refused, and not from another IP.
    assert_eq!(auth("127.0.0.2", "alice", "correct horse"), 454);
    assert_eq!(auth("127.0.0.3", "alice", "correct horse"), 235);
    // Per user: failures for alice spread over several addresses lock alice everywhere.
    assert_eq!(auth("127.0.0.4", "alice", "guess1"), 535);
    assert_eq!(auth("127.0.0.5", "alice", "guess2"), 535);
    assert_eq!(auth("127.0.0.6", "alice", "guess3"), 535);
    assert_eq!(auth("127.0.0.7", "alice", "correct horse"), 454);
    // The trusted network is never locked out.
    assert_eq!(auth("127.0.0.1", "alice", "correct horse"), 235);
    // The lockout expires.
    std::thread::sleep(Duration::from_millis(3500));
    assert_eq!(auth("127.0.0.7", "alice", "correct horse"), 235);
    assert_eq!(auth("127.0.0.2", "alice", "correct horse"), 235);
    let log = s.server.log();
    assert!(
        log.contains("auth failed client=127.0.0.4 user=alice"),
        "{log}"
    );
}

#[test]
fn users_file_holds_no_plaintext() {
    let s = start("");
    let users = std::fs::read_to_string(s.server.dir.path().join("users")).unwrap();
    assert!(users.contains("alice:$argon2id$"), "{users}");
    assert!(!users.contains("correct horse"));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(s.server.dir.path().join("users"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o600);
    let (code, out, _) = run_cli(&[
        "user",
        "list",
        "--config",
        s.server.config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0);
    assert!(out.contains("alice") && !out.contains("argon2"), "{out}");
}

/// Interop: swaks with STARTTLS and AUTH LOGIN/PLAIN, as a roaming user would.
#[test]
fn swaks_submits_with_tls_and_auth() {
    if Command::new("swaks").arg("--version").output().is_err() {
        panic!("swaks is not installed (scripts/test installs it)");
    }
    let s = start("");
    for mech in ["LOGIN", "PLAIN"] {
        let out = Command::new("swaks")
            .args(["--server", &format!("127.0.0.1:{}", s.submission)])
            .args(["--tls", "--auth", mech, "--auth-user", "alice"])
            .args(["--auth-password", "correct horse"])
            .args(["--from", "alice@accepted.test", "--to", "friend@other.test"])
            .args(["--helo", "swaks.test", "--timeout", "20"])
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(out.status.success(), "swaks {mech} failed:\n{text}");
        assert!(text.contains("235 2.7.0"), "{text}");
        assert!(text.contains("250 2.0.0 Ok: queued as"), "{text}");
    }
}

/// Interop: openssl s_client negotiates STARTTLS and verifies the chain against the CA;
/// TLS 1.1 is refused.
#[test]
fn openssl_starttls_verifies_and_old_tls_is_refused() {
    let s = start("");
    let ca_file = s.server.dir.path().join("ca.pem");
    std::fs::write(&ca_file, s.ca.ca_pem()).unwrap();
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .arg("s_client")
            .args(args)
            .stdin(std::process::Stdio::null())
            .output()
            .unwrap();
        (
            out.status.success(),
            format!(
                "{}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            ),
        )
    };
    let (_, text) = run(&[
        "-connect",
        &format!("127.0.0.1:{}", s.smtp),
        "-starttls",
        "smtp",
        "-CAfile",
        ca_file.to_str().unwrap(),
        "-verify_hostname",
        "relay.test",
    ]);
    assert!(text.contains("Verify return code: 0 (ok)"), "{text}");
    assert!(text.contains("TLSv1.3"), "{text}");
    let (ok, text) = run(&[
        "-connect",
        &format!("127.0.0.1:{}", s.smtps),
        "-tls1_1",
        "-cipher",
        "DEFAULT@SECLEVEL=0",
    ]);
    assert!(!ok, "TLS 1.1 handshake succeeded:\n{text}");
    assert!(!text.contains("Cipher is ECDHE"), "{text}");
}

#[test]
fn restricted_senders() {
    let s = start_with_users(
        "restrict_senders = true",
        &[("bob", "pw-bob-1", &["bob@accepted.test"])],
    );
    let mut c = s.submission_client(OUTSIDE);
    c.expect(&format!("AUTH PLAIN {}", b64("\0bob\0pw-bob-1")), 235);
    c.expect("MAIL FROM:<alice@accepted.test>", 250);
    let r = c.cmd("RCPT TO:<x@other.test>");
    assert_eq!(r.code, 553, "{}", r.text());
    c.expect("RSET", 250);
    c.expect("MAIL FROM:<bob@accepted.test>", 250);
    c.expect("RCPT TO:<x@other.test>", 250);
}

/// Certificate files replaced on disk are served to new connections without a restart.
#[test]
fn renewed_certificate_is_picked_up_without_restart() {
    let s = start("");
    let dir = s.server.dir.path();
    let renewed = TestCa::new();
    // The new pair is written beside, then renamed over the configured files.
    let staging = dir.join("staging");
    std::fs::create_dir_all(&staging).unwrap();
    let (cert, key) = renewed.issue(&["relay.test"]).write_to(&staging);
    std::fs::rename(key, dir.join("key.pem")).unwrap();
    std::fs::rename(cert, dir.join("cert.pem")).unwrap();
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let attempt = Client::connect_tls(
            OUTSIDE,
            s.addr(s.smtps),
            renewed.client_config(),
            "relay.test",
        );
        if let Ok(mut c) = attempt {
            assert_eq!(c.reply().code, 220);
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the new certificate was never served"
        );
        std::thread::sleep(Duration::from_millis(500));
    }
    assert!(s.server.log().contains("TLS certificate reloaded"));
    // The old CA no longer verifies.
    assert!(Client::connect_tls(OUTSIDE, s.addr(s.smtps), s.tls_config(), "relay.test").is_err());
}
