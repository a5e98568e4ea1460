//! Milters end to end (issue 11): the real binary talking to milters on the reference
//! libmilter (`testdata/milter/scenario.py` on Debian's python3-milter), to real
//! clamav-milter + clamd and to OpenDKIM, all started by the tests on free loopback
//! ports or sockets in a temp dir. Messages the milters let through are checked at a
//! testkit sink they are routed to.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::{INSIDE, OUTSIDE, Server, free_port, http_get, route_to, run_cli};
use postern_testkit::sink::{ReceivedMessage, Sink, SinkConfig};

/// A process killed when the test ends.
pub(crate) struct Proc(Child);

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// Debian's interpreter: its python3-milter and python3-dkim are installed for it,
/// whatever python3 comes first on PATH.
fn python() -> &'static str {
    if Path::new("/usr/bin/python3").exists() {
        "/usr/bin/python3"
    } else {
        "python3"
    }
}

fn testdata(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("../../testdata/milter")
        .join(name)
}

/// Waits until something accepts connections on `address` ("port" or "unix:/path").
fn wait_listening(address: &str, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let up = match address.strip_prefix("unix:") {
            Some(path) => std::os::unix::net::UnixStream::connect(path).is_ok(),
            None => TcpStream::connect(("127.0.0.1", address.parse::<u16>().unwrap())).is_ok(),
        };
        if up {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "{what} did not start on {address}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Starts `scenario.py ADDRESS NAME MODE`; returns it once it listens.
pub(crate) fn scenario(address: &str, name: &str, mode: &str) -> Proc {
    let child = Command::new(python())
        .arg(testdata("scenario.py"))
        .args([address, name, mode])
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("python3 with the Milter module (scripts/test installs python3-milter)");
    let p = Proc(child);
    wait_listening(address, "the scenario milter");
    p
}

/// A `[[milter]]` section.
fn milter_section(name: &str, address: &str, more: &str) -> String {
    format!("\n[[milter]]\nname = \"{name}\"\naddress = \"{address}\"\n{more}\n")
}

/// A relay routing accepted.test to `sink`, with `milters` (sections).
fn relay(sink: &Sink, milters: &str) -> Server {
    Server::start(
        "",
        &format!("{}{milters}", route_to(&["accepted.test"], sink)),
    )
}

fn message(subject: &str, extra_headers: &str) -> String {
    format!(
        "From: <sender@outside.test>\r\nTo: <user@accepted.test>\r\nSubject: {subject}\r\n\
         {extra_headers}Message-ID: <{subject}@outside.test>\r\n\r\nHello from the test.\r\n"
    )
}

/// One message from `from` (an address to connect from) to user@accepted.test.
fn send(server: &Server, from_ip: &str, sender: &str, subject: &str, extra: &str) -> (u16, String) {
    let mut c = server.client(from_ip);
    c.hello();
    c.expect(&format!("MAIL FROM:<{sender}>"), 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let r = c.data(&message(subject, extra));
    c.cmd("QUIT");
    (r.code, r.text())
}

/// The message the sink got with this subject (waits for it).
fn delivered(sink: &Sink, subject: &str) -> ReceivedMessage {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if let Some(m) = sink
            .messages()
            .into_iter()
            .find(|m| m.data_str().contains(subject))
        {
            return m;
        }
        assert!(
            Instant::now() < deadline,
            "{subject:?} was not delivered; got {:?}",
            sink.messages()
                .iter()
                .map(ReceivedMessage::data_str)
                .collect::<Vec<_>>()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn wait_log(server: &Server, needle: &str) -> String {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let log = server.log();
        if log.contains(needle) {
            return log;
        }
        assert!(
            Instant::now() < deadline,
            "log never showed {needle:?}:\n{log}"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn not_delivered(sink: &Sink, subject: &str) {
    std::thread::sleep(Duration::from_millis(300));
    assert!(
        !sink
            .messages()
            .iter()
            .any(|m| m.data_str().contains(subject)),
        "{subject} was delivered"
    );
}

#[test]
fn every_stage_and_action_of_a_libmilter_milter() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port().to_string();
    let _milter = scenario(&port, "scenario", "script");
    let metrics = free_port();
    let server = relay(
        &sink,
        &format!(
            "{}\n[metrics]\naddress = \"127.0.0.1:{metrics}\"\n",
            milter_section("scenario", &format!("127.0.0.1:{port}"), "")
        ),
    );

    // MAIL: the milter's own reply, and the default tempfail.
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.cmd("MAIL FROM:<mail-reject@outside.test>");
    assert_eq!(r.text(), "550 5.7.0 custom sender refusal");
    let r = c.cmd("MAIL FROM:<mail-tempfail@outside.test>");
    assert_eq!(r.code, 451, "{}", r.text());
    assert!(r.text().starts_with("451 4.7.1 "), "{}", r.text());
    // RCPT: per recipient; the transaction goes on.
    c.expect("MAIL FROM:<sender@outside.test>", 250);
    let r = c.cmd("RCPT TO:<rcpt-reject@accepted.test>");
    assert_eq!(r.text(), "553 5.1.3 custom recipient refusal");
    let r = c.cmd("RCPT TO:<rcpt-tempfail@accepted.test>");
    assert!(r.text().starts_with("451 4.7.1 "), "{}", r.text());
    // A recipient the relay policy refuses never reaches the milter.
    assert_eq!(c.cmd("RCPT TO:<x@elsewhere.test>").code, 554);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let r = c.data(&message("plain", ""));
    assert_eq!(r.code, 250, "{}", r.text());
    let id = r.lines[0].rsplit(' ').next().unwrap().to_string();
    // RSET aborts a transaction; the next one works.
    c.expect("MAIL FROM:<sender@outside.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    c.expect("RSET", 250);
    let r = c.send_mail(
        "sender@outside.test",
        &["user@accepted.test"],
        &message("after-rset", ""),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.cmd("QUIT");

    let m = delivered(&sink, "Subject: plain");
    let text = m.data_str();
    assert!(
        text.contains(&format!(
            "X-Scenario: scenario i={id} client=127.0.0.2 mail=sender@outside.test \
             rcpts=user@accepted.test\r\n"
        )),
        "{text}"
    );
    // Our Received: comes after the milters, first in the message.
    assert!(text.starts_with("Received: from client.test"), "{text}");
    delivered(&sink, "after-rset");

    // BDAT ends a message as DATA does.
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<sender@outside.test>", 250);
    c.expect("RCPT TO:<user@accepted.test>", 250);
    let body = message("bdat-chunks", "");
    let (first, second) = body.split_at(40);
    c.line(&format!("BDAT {}", first.len()));
    c.send(first.as_bytes());
    assert_eq!(c.reply().code, 250);
    c.line(&format!("BDAT {} LAST", second.len()));
    c.send(second.as_bytes());
    let r = c.reply();
    assert_eq!(r.code, 250, "{}", r.text());
    c.cmd("QUIT");
    let text = delivered(&sink, "bdat-chunks").data_str();
    assert!(text.contains("X-Scenario: scenario i="), "{text}");

    // End of message: reject (multi-line), tempfail, discard.
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "reject-me", "");
    assert_eq!(
        (code, text.as_str()),
        (554, "554-5.7.1 custom body refusal\n554 5.7.1 second line")
    );
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "tempfail-me", "");
    assert!(code == 451 && text.starts_with("451 4.7.1 "), "{text}");
    let (code, _) = send(&server, OUTSIDE, "sender@outside.test", "discard-me", "");
    assert_eq!(code, 250);
    let (code, _) = send(
        &server,
        OUTSIDE,
        "mail-discard@outside.test",
        "discard-at-mail",
        "",
    );
    assert_eq!(code, 250);
    let log = wait_log(&server, "stage=eom action=discard");
    assert!(
        log.contains("milter=scenario stage=mail action=discard"),
        "{log}"
    );
    assert!(
        log.contains("milter=scenario stage=eom action=reject"),
        "{log}"
    );

    // Header changes.
    let (code, _) = send(
        &server,
        OUTSIDE,
        "sender@outside.test",
        "edit-headers",
        "X-Remove: this goes\r\n",
    );
    assert_eq!(code, 250);
    let text = delivered(&sink, "edit-headers").data_str();
    let (header, _) = text.split_once("\r\n\r\n").unwrap();
    assert!(
        header.contains("\r\nSubject: [edited] edit-headers\r\n"),
        "{header}"
    );
    assert!(
        header.contains("\r\nX-Added: added by scenario\r\n"),
        "{header}"
    );
    assert!(!header.contains("X-Remove"), "{header}");
    // Inserted at index 0 of the fields the milter saw: right after our Received:.
    let after_received = header
        .split("\r\n")
        .find(|l| !l.starts_with(['\t', ' ']) && !l.starts_with("Received:"));
    assert_eq!(after_received, Some("X-Inserted: first"), "{header}");

    // Envelope and body changes.
    send(&server, OUTSIDE, "sender@outside.test", "change-sender", "");
    assert_eq!(
        delivered(&sink, "change-sender").mail_from,
        "new-sender@outside.test"
    );
    send(&server, OUTSIDE, "sender@outside.test", "change-rcpts", "");
    assert_eq!(
        delivered(&sink, "change-rcpts").rcpt_to,
        ["added@accepted.test"]
    );
    send(&server, OUTSIDE, "sender@outside.test", "replace-body", "");
    let text = delivered(&sink, "replace-body").data_str();
    assert!(
        text.ends_with("\r\n\r\nThis body was replaced by the milter.\r\n"),
        "{text}"
    );

    // A milter's changes count against max_message_size (64 KB here): a failure.
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "bloat-body", "");
    assert!(code == 451 && text.starts_with("451 4.7.1 "), "{text}");
    wait_log(&server, "larger than max_message_size");
    not_delivered(&sink, "bloat-body");

    // Quarantine: held with the milter's reason, shown by `postern quarantine list`.
    let (code, _) = send(&server, OUTSIDE, "sender@outside.test", "quarantine-me", "");
    assert_eq!(code, 250);
    let cfg = server.config.to_str().unwrap().to_string();
    let (code, out, err) = run_cli(&["quarantine", "list", "--config", &cfg]);
    assert_eq!(code, 0, "{err}");
    assert!(out.contains("milter:scenario"), "{out}");
    assert!(out.contains("scenario says hold"), "{out}");
    not_delivered(&sink, "quarantine-me");
    not_delivered(&sink, "discard-me");
    not_delivered(&sink, "discard-at-mail");
    not_delivered(&sink, "reject-me");

    // The decision lines name milter, stage and action; the metrics count them.
    let log = server.log();
    assert!(
        log.contains("milter=scenario stage=rcpt action=reject"),
        "{log}"
    );
    assert!(
        log.contains("milter=scenario stage=mail action=tempfail"),
        "{log}"
    );
    let (_, _, body) = http_get(metrics, "/metrics");
    for line in [
        "postern_milter_actions_total{milter=\"scenario\",action=\"quarantine\"} 1\n",
        "postern_milter_actions_total{milter=\"scenario\",action=\"discard\"} 2\n",
        "postern_milter_actions_total{milter=\"scenario\",action=\"failed\"} 1\n",
        "postern_messages_rejected_total{reason=\"milter\"} 3\n",
    ] {
        assert!(body.contains(line), "{line} missing:\n{body}");
    }
    let count = body
        .lines()
        .find_map(|l| l.strip_prefix("postern_milter_latency_seconds_count{milter=\"scenario\"} "))
        .and_then(|n| n.parse::<u64>().ok())
        .unwrap_or(0);
    assert!(count > 20, "{body}");
}

#[test]
fn two_milters_in_order_over_tcp_and_a_unix_socket() {
    let sink = Sink::start(SinkConfig::default());
    let dir = tempfile::tempdir().unwrap();
    let port = free_port().to_string();
    let socket = format!("unix:{}", dir.path().join("second.sock").display());
    let _a = scenario(&port, "first", "tag");
    let _b = scenario(&socket, "second", "tag");
    let server = relay(
        &sink,
        &format!(
            "{}{}",
            milter_section("first", &format!("127.0.0.1:{port}"), ""),
            milter_section("second", &socket, "")
        ),
    );
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "ordered", "");
    assert_eq!(code, 250, "{text}");
    let text = delivered(&sink, "ordered").data_str();
    assert!(text.contains("X-Order: first after none\r\n"), "{text}");
    // The second saw the first one's header.
    assert!(
        text.contains("X-Order: second after first after none\r\n"),
        "{text}"
    );
}

#[test]
fn clients_scope_which_sessions_a_milter_sees() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port().to_string();
    let _m = scenario(&port, "scoped", "script");
    let server = relay(
        &sink,
        &milter_section(
            "scoped",
            &format!("127.0.0.1:{port}"),
            "clients = \"untrusted\"",
        ),
    );
    send(&server, OUTSIDE, "sender@outside.test", "from-outside", "");
    send(&server, INSIDE, "sender@outside.test", "from-inside", "");
    assert!(
        delivered(&sink, "from-outside")
            .data_str()
            .contains("X-Scenario: scoped")
    );
    assert!(
        !delivered(&sink, "from-inside")
            .data_str()
            .contains("X-Scenario")
    );
}

#[test]
fn a_slow_milter_times_out_into_on_failure_and_progress_keeps_it_alive() {
    let sink = Sink::start(SinkConfig::default());
    let slow = free_port().to_string();
    let patient = free_port().to_string();
    let _slow = scenario(&slow, "slow", "sleep");
    let _patient = scenario(&patient, "patient", "progress");
    // The same sleeping milter twice: for untrusted clients on_failure = tempfail, for
    // relayed ones accept. The progressing one outlives its 1 s timeout by far.
    let server = relay(
        &sink,
        &format!(
            "{}{}{}",
            milter_section(
                "slow-tempfail",
                &format!("127.0.0.1:{slow}"),
                "clients = \"untrusted\"\ntimeout = \"1s\""
            ),
            milter_section(
                "slow-accept",
                &format!("127.0.0.1:{slow}"),
                "clients = \"relayed\"\ntimeout = \"1s\"\non_failure = \"accept\""
            ),
            milter_section(
                "patient",
                &format!("127.0.0.1:{patient}"),
                "timeout = \"1s\""
            )
        ),
    );
    let started = Instant::now();
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "slow-outside", "");
    assert!(code == 451 && text.starts_with("451 4.7.1 "), "{text}");
    assert!(
        started.elapsed() < Duration::from_secs(8),
        "{:?}",
        started.elapsed()
    );
    let (code, text) = send(&server, INSIDE, "sender@outside.test", "slow-inside", "");
    assert_eq!(code, 250, "{text}");
    let m = delivered(&sink, "slow-inside");
    assert!(
        m.data_str().contains("X-Progress: patient"),
        "{}",
        m.data_str()
    );
    not_delivered(&sink, "slow-outside");
    let log = server.log();
    assert!(
        log.contains("milter=slow-tempfail stage=eom")
            && log.contains("no reply to SMFIC_BODYEOB in time")
            && log.contains("on_failure=tempfail"),
        "{log}"
    );
    assert!(log.contains("milter=slow-accept stage=eom"), "{log}");
    assert!(log.contains("on_failure=accept"), "{log}");
}

#[test]
fn a_milter_killed_mid_message_is_a_failure_and_nothing_is_lost() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port().to_string();
    let mut m = scenario(&port, "doomed", "sleep");
    let server = relay(
        &sink,
        &milter_section("doomed", &format!("127.0.0.1:{port}"), ""),
    );
    let pid = m.0.id();
    let killer = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(800));
        let _ = Command::new("kill").args(["-9", &pid.to_string()]).status();
    });
    let started = Instant::now();
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "killed", "");
    killer.join().unwrap();
    let _ = m.0.wait();
    assert!(code == 451 && text.starts_with("451 4.7.1 "), "{text}");
    // Well before the 30 s reply timeout: the closed connection is seen at once.
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    wait_log(&server, "milter=doomed stage=eom");
    // The milter is down now: the next session is tempfailed at MAIL.
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.cmd("MAIL FROM:<sender@outside.test>");
    assert!(r.text().starts_with("451 4.7.1 "), "{}", r.text());
    wait_log(&server, "milter=doomed stage=connect");
    not_delivered(&sink, "killed");
}

/// A TCP server that answers like `reply` to anything, then closes.
fn stranger(reply: &'static [u8]) -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut conn) = conn else { continue };
            let mut buf = [0u8; 256];
            let _ = conn.read(&mut buf);
            let _ = conn.write_all(reply);
        }
    });
    port
}

#[test]
fn a_peer_that_is_not_a_milter_is_named_in_the_log() {
    let sink = Sink::start(SinkConfig::default());
    let http = stranger(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n");
    let clamd = stranger(b"UNKNOWN COMMAND\n");
    let server = relay(
        &sink,
        &format!(
            "{}{}",
            milter_section(
                "web",
                &format!("127.0.0.1:{http}"),
                "on_failure = \"accept\""
            ),
            milter_section(
                "clamd",
                &format!("127.0.0.1:{clamd}"),
                "on_failure = \"accept\""
            )
        ),
    );
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "strangers", "");
    assert_eq!(code, 250, "{text}");
    delivered(&sink, "strangers");
    let log = server.log();
    assert!(
        log.contains("this looks like an HTTP server, not a milter"),
        "{log}"
    );
    assert!(log.contains("this looks like clamd, not a milter"), "{log}");
}

// --- ClamAV ---------------------------------------------------------------------------

/// The EICAR test file (a standard harmless string every scanner detects).
const EICAR: &str = r"X5O!P%@AP[4\PZX54(P^)7CC)7}$EICAR-STANDARD-ANTIVIRUS-TEST-FILE!$H+H*";

fn which(cmd: &str) -> Option<PathBuf> {
    ["/usr/sbin", "/usr/bin", "/sbin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(cmd))
        .find(|p| p.exists())
}

#[test]
fn clamav_milter_rejects_eicar_and_passes_clean_mail() {
    let (Some(clamd), Some(clamav_milter)) = (which("clamd"), which("clamav-milter")) else {
        panic!(
            "clamd and clamav-milter are needed (scripts/test installs clamav-daemon clamav-milter)"
        );
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let db = d.join("db");
    std::fs::create_dir(&db).unwrap();
    // A one-signature database, written by the test (no download): an .ndb body
    // signature, Name:TargetType:Offset:HexSignature, for the EICAR string anywhere.
    let hex: String = EICAR.bytes().map(|b| format!("{b:02x}")).collect();
    std::fs::write(
        db.join("test.ndb"),
        format!("Postern.Test.EICAR:0:*:{hex}\n"),
    )
    .unwrap();
    let clamd_sock = d.join("clamd.sock");
    let milter_sock = d.join("milter.sock");
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        d.join("clamd.conf"),
        format!(
            "Foreground yes\nLocalSocket {}\nDatabaseDirectory {}\nLogFile {}\n\
             PidFile {}\nUser {user}\nLogVerbose yes\n",
            clamd_sock.display(),
            db.display(),
            d.join("clamd.log").display(),
            d.join("clamd.pid").display(),
        ),
    )
    .unwrap();
    std::fs::write(
        d.join("clamav-milter.conf"),
        format!(
            "Foreground yes\nMilterSocket unix:{}\nClamdSocket unix:{}\nUser {user}\n\
             PidFile {}\nOnInfected Reject\nOnFail Defer\nAddHeader Replace\n\
             LogFile {}\nLogVerbose yes\nRejectMsg Virus %v found\n",
            milter_sock.display(),
            clamd_sock.display(),
            d.join("milter.pid").display(),
            d.join("milter.log").display(),
        ),
    )
    .unwrap();
    let _clamd = Proc(
        Command::new(&clamd)
            .arg("-c")
            .arg(d.join("clamd.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    wait_listening(&format!("unix:{}", clamd_sock.display()), "clamd");
    let _milter = Proc(
        Command::new(&clamav_milter)
            .arg("-c")
            .arg(d.join("clamav-milter.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap(),
    );
    let address = format!("unix:{}", milter_sock.display());
    wait_listening(&address, "clamav-milter");

    let sink = Sink::start(SinkConfig::default());
    let server = relay(&sink, &milter_section("clamav", &address, ""));
    let infected = format!(
        "From: <sender@outside.test>\r\nTo: <user@accepted.test>\r\nSubject: infected\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"b1\"\r\n\r\n\
         --b1\r\nContent-Type: text/plain\r\n\r\nSee attached.\r\n\
         --b1\r\nContent-Type: application/octet-stream; name=\"eicar.com\"\r\n\
         Content-Disposition: attachment; filename=\"eicar.com\"\r\n\r\n{EICAR}\r\n--b1--\r\n"
    );
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.send_mail("sender@outside.test", &["user@accepted.test"], &infected);
    assert_eq!(r.code, 550, "{}", r.text());
    assert!(r.text().contains("Postern.Test.EICAR"), "{}", r.text());
    let r = c.send_mail(
        "sender@outside.test",
        &["user@accepted.test"],
        &message("clean", ""),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.cmd("QUIT");
    let text = delivered(&sink, "Subject: clean").data_str();
    // clamav-milter's AddHeader: it scanned it.
    assert!(text.contains("X-Virus-Scanned: clamav-milter"), "{text}");
    assert!(text.contains("X-Virus-Status: Clean"), "{text}");
    not_delivered(&sink, "Subject: infected");
}

// --- OpenDKIM -------------------------------------------------------------------------

#[test]
fn opendkim_signs_and_the_signature_verifies() {
    let Some(opendkim) = which("opendkim") else {
        panic!("opendkim is needed (scripts/test installs opendkim opendkim-tools)");
    };
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let key = d.join("test.private");
    let ok = Command::new("openssl")
        .args(["genrsa", "-out"])
        .arg(&key)
        .arg("2048")
        .stderr(Stdio::null())
        .status()
        .unwrap();
    assert!(ok.success());
    let public = Command::new("openssl")
        .args(["rsa", "-pubout", "-outform", "DER", "-in"])
        .arg(&key)
        .stderr(Stdio::null())
        .output()
        .unwrap();
    assert!(public.status.success());
    use base64::Engine;
    let p = base64::engine::general_purpose::STANDARD.encode(&public.stdout);
    let port = free_port();
    let user = std::env::var("USER").unwrap_or_else(|_| "root".into());
    std::fs::write(
        d.join("opendkim.conf"),
        format!(
            "Domain outside.test\nSelector sel\nKeyFile {}\nSocket inet:{port}@127.0.0.1\n\
             Mode s\nCanonicalization relaxed/relaxed\nInternalHosts 127.0.0.0/8\n\
             UserID {user}\nPidFile {}\nSyslog no\nRequireSafeKeys no\n",
            key.display(),
            d.join("opendkim.pid").display(),
        ),
    )
    .unwrap();
    let _dkim = Proc(
        Command::new(&opendkim)
            .args(["-f", "-x"])
            .arg(d.join("opendkim.conf"))
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap(),
    );
    wait_listening(&port.to_string(), "opendkim");

    let sink = Sink::start(SinkConfig::default());
    let server = relay(
        &sink,
        &milter_section("opendkim", &format!("127.0.0.1:{port}"), ""),
    );
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "signed", "");
    assert_eq!(code, 250, "{text}");
    let m = delivered(&sink, "signed");
    let text = m.data_str();
    assert!(text.contains("DKIM-Signature: "), "{text}");
    assert!(text.contains("d=outside.test"), "{text}");

    // python3-dkim verifies it, the key record coming from the test, not DNS.
    let msg = d.join("message.eml");
    std::fs::write(&msg, &m.data).unwrap();
    let script = format!(
        "import dkim,sys\n\
         rec=b'v=DKIM1; k=rsa; p={p}'\n\
         def dns(name, timeout=5):\n\
         \x20   return rec if name == b'sel._domainkey.outside.test.' else None\n\
         data=open(sys.argv[1],'rb').read()\n\
         sys.exit(0 if dkim.verify(data, dnsfunc=dns) else 1)\n"
    );
    let out = Command::new(python())
        .arg("-c")
        .arg(&script)
        .arg(&msg)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "the signature does not verify: {}\n{text}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[test]
fn a_reload_that_adds_a_milter_applies_to_new_sessions() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port().to_string();
    let _m = scenario(&port, "late", "script");
    let server = relay(&sink, "");
    // Open across the reload: keeps the (no) milters it started with.
    let mut old = server.client(OUTSIDE);
    old.hello();

    let text = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(
        &server.config,
        format!(
            "{text}{}",
            milter_section("late", &format!("127.0.0.1:{port}"), "")
        ),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["reload", "--config", server.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(out.contains("milter"), "{out}");

    let mut new = server.client(OUTSIDE);
    new.hello();
    let r = new.cmd("MAIL FROM:<mail-reject@outside.test>");
    assert_eq!(r.text(), "550 5.7.0 custom sender refusal");
    old.expect("MAIL FROM:<mail-reject@outside.test>", 250);
}

/// A message a filter holds is still scanned: released later, it must have been seen by
/// the milters; a milter's reject wins over holding it.
#[test]
fn held_mail_still_goes_through_the_milters() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port().to_string();
    let _milter = scenario(&port, "scenario", "script");
    let filter = "\n[[filter]]\nname = \"hold-all\"\nkeywords = [\"Hello from the test\"]\naction = \"quarantine\"\n";
    let server = relay(
        &sink,
        &format!(
            "{filter}{}",
            milter_section("scenario", &format!("127.0.0.1:{port}"), "")
        ),
    );
    // The filter would hold it; the milter refuses it.
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "reject-me", "");
    assert_eq!(code, 554, "{text}");
    // Held, and scanned (the milter's header is on the held copy).
    let (code, _) = send(&server, OUTSIDE, "sender@outside.test", "plain", "");
    assert_eq!(code, 250);
    let cfg = server.config.to_str().unwrap();
    let (_, list, _) = run_cli(&["quarantine", "list", "--config", cfg]);
    assert!(list.contains("rule hold-all"), "{list}");
    let id = list.split_whitespace().next().unwrap();
    let (_, shown, _) = run_cli(&["quarantine", "show", id, "--config", cfg]);
    assert!(shown.contains("X-Scenario: scenario"), "{shown}");
}

// --- connections kept between sessions ---------------------------------------------

/// A TCP proxy in front of a milter on `target` that counts the connections it takes;
/// when the milter closes one, the proxy closes it on the relay's side too.
fn counting_proxy(target: u16) -> (u16, Arc<AtomicUsize>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let count = Arc::new(AtomicUsize::new(0));
    let n = Arc::clone(&count);
    std::thread::spawn(move || {
        for down in listener.incoming() {
            let Ok(down) = down else { continue };
            n.fetch_add(1, Ordering::SeqCst);
            let Ok(up) = TcpStream::connect(("127.0.0.1", target)) else {
                continue;
            };
            let (mut d1, mut d2) = (down.try_clone().unwrap(), down);
            let (mut u1, mut u2) = (up.try_clone().unwrap(), up);
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut d1, &mut u1);
                let _ = u1.shutdown(std::net::Shutdown::Both);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut u2, &mut d2);
                let _ = d2.shutdown(std::net::Shutdown::Both);
            });
        }
    });
    (port, count)
}

#[test]
fn milter_connections_are_kept_between_sessions_and_replaced_when_closed() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port();
    let mut m = scenario(&port.to_string(), "kept", "continue");
    let (proxy, connections) = counting_proxy(port);
    let server = relay(
        &sink,
        &milter_section("kept", &format!("127.0.0.1:{proxy}"), ""),
    );
    // Three SMTP sessions, from two clients: one milter connection, and each session's
    // own macros (libmilter clears them at QUIT_NC and CONNECT).
    for (n, from) in [OUTSIDE, INSIDE, OUTSIDE].into_iter().enumerate() {
        let subject = format!("kept-{n}");
        let (code, text) = send(&server, from, "sender@outside.test", &subject, "");
        assert_eq!(code, 250, "{text}");
        let text = delivered(&sink, &subject).data_str();
        assert!(
            text.contains("X-Scenario: kept i=") && text.contains(&format!("client={from} ")),
            "{text}"
        );
    }
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    // The milter restarts: the kept connection is closed under Postern, which opens a
    // new one instead of failing the message.
    drop(m);
    m = scenario(&port.to_string(), "kept", "continue");
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "after-restart", "");
    assert_eq!(code, 250, "{text}");
    delivered(&sink, "after-restart");
    assert_eq!(connections.load(Ordering::SeqCst), 2);
    assert!(!server.log().contains("milter failed"), "{}", server.log());
    drop(m);
}

/// A libmilter milter that accepts at end of message is back in its HELO state, where
/// it would drop SMFIC_QUIT_NC and the CONNECT after it unanswered: it gets QUIT and a
/// new connection per session, and no session waits for a timeout.
#[test]
fn a_milter_that_accepts_at_end_of_message_gets_a_new_connection_each_session() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port();
    let _m = scenario(&port.to_string(), "accepting", "tag");
    let (proxy, connections) = counting_proxy(port);
    let server = relay(
        &sink,
        &milter_section(
            "accepting",
            &format!("127.0.0.1:{proxy}"),
            "timeout = \"20s\"",
        ),
    );
    let started = Instant::now();
    for n in 0..3 {
        let subject = format!("accepted-{n}");
        let (code, text) = send(&server, OUTSIDE, "sender@outside.test", &subject, "");
        assert_eq!(code, 250, "{text}");
        delivered(&sink, &subject);
    }
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert_eq!(connections.load(Ordering::SeqCst), 3);
}

/// A reload starts new pools: a connection negotiated under the old `[[milter]]` is not
/// used under the new one; the new pool keeps its own.
#[test]
fn a_reload_starts_new_milter_pools() {
    let sink = Sink::start(SinkConfig::default());
    let port = free_port();
    let _m = scenario(&port.to_string(), "kept", "continue");
    let (proxy, connections) = counting_proxy(port);
    let server = relay(
        &sink,
        &milter_section("kept", &format!("127.0.0.1:{proxy}"), ""),
    );
    let (code, text) = send(&server, OUTSIDE, "sender@outside.test", "before-reload", "");
    assert_eq!(code, 250, "{text}");
    assert_eq!(connections.load(Ordering::SeqCst), 1);

    let text = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(
        &server.config,
        text.replace("name = \"kept\"\n", "name = \"kept\"\ntimeout = \"20s\"\n"),
    )
    .unwrap();
    let (code, out, err) = run_cli(&["reload", "--config", server.config.to_str().unwrap()]);
    assert_eq!(code, 0, "{out}{err}");
    for subject in ["after-reload-1", "after-reload-2"] {
        let (code, text) = send(&server, OUTSIDE, "sender@outside.test", subject, "");
        assert_eq!(code, 250, "{text}");
        delivered(&sink, subject);
    }
    assert_eq!(connections.load(Ordering::SeqCst), 2);
}
