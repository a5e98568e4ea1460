//! Configuration reload (interface: "Operations"): `postern reload` and SIGHUP re-read the
//! file; new sessions get the new policy, listeners, routes, limits and certificates,
//! sessions in progress finish on the old ones, a bad file changes nothing, and the
//! queue is untouched.

use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use postern_testkit::ca::TestCa;
use postern_testkit::sink::{Sink, SinkConfig};

use crate::common::{
    Client, OUTSIDE, Server, base_config, free_port, message, route_to, run_cli, submit_body,
    wait_until,
};

/// `postern reload --config` of the server's own file: (exit code, stdout, stderr).
fn reload(server: &Server) -> (i32, String, String) {
    run_cli(&["reload", "--config", server.config.to_str().unwrap()])
}

/// Replaces the server's config file with the base config plus `top`/`extra`.
fn rewrite(server: &Server, top: &str, extra: &str) {
    let text = base_config(server.port, &server.spool(), top, extra);
    std::fs::write(&server.config, text).unwrap();
}

/// The reply an outside client gets for RCPT TO:<to> in a fresh session.
fn rcpt_reply(addr: SocketAddr, to: &str) -> u16 {
    let mut c = Client::connect(OUTSIDE, addr);
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    let code = c.cmd(&format!("RCPT TO:<{to}>")).code;
    c.expect("QUIT", 221);
    code
}

#[test]
fn reload_applies_a_new_policy_to_new_sessions_only() {
    let server = Server::start("", "");
    assert_eq!(rcpt_reply(server.addr(), "u@new.test"), 554);

    // A session open across the reload keeps the policy it started with.
    let mut old = server.client(OUTSIDE);
    old.hello();
    old.expect("MAIL FROM:<a@outside.test>", 250);

    let text = std::fs::read_to_string(&server.config).unwrap().replace(
        "accepted_domains = [\"accepted.test\", \"company.test\"]",
        "accepted_domains = [\"accepted.test\", \"company.test\", \"new.test\"]",
    );
    std::fs::write(&server.config, text).unwrap();

    let (code, out, err) = reload(&server);
    assert_eq!(code, 0, "stdout {out} stderr {err}");
    assert!(out.contains("relay.accepted_domains"), "{out}");
    assert_eq!(rcpt_reply(server.addr(), "u@new.test"), 250);

    let r = old.cmd("RCPT TO:<u@new.test>");
    assert_eq!(
        r.code,
        554,
        "the open session kept its policy: {}",
        r.text()
    );
    old.expect("RCPT TO:<u@accepted.test>", 250);
    let r = old.data(&message("across a reload"));
    assert_eq!(r.code, 250, "{}", r.text());
    old.expect("QUIT", 221);
    assert!(
        server
            .log()
            .contains("configuration reloaded: changed: relay.accepted_domains")
    );
}

#[test]
fn an_invalid_file_changes_nothing_and_reload_says_why() {
    let server = Server::start("", "");
    let good = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(&server.config, format!("{good}\nmax_recipientz = 3\n")).unwrap();

    let (code, out, err) = reload(&server);
    assert_eq!(code, 1, "stdout {out} stderr {err}");
    assert!(err.contains("max_recipientz"), "{err}");
    // The server was not even asked: the CLI checks the file first.
    assert!(!server.log().contains("reloading the configuration"));

    // An error only the server finds (the recipients file is missing), and SIGHUP.
    std::fs::write(
        &server.config,
        good.replace(
            "[relay]\n",
            "[relay]\nrecipients_file = \"/nonexistent/recipients\"\n",
        ),
    )
    .unwrap();
    // check-config does not read the file, so the CLI passes it to the server.
    let (code, _, err) = reload(&server);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("/nonexistent/recipients"), "{err}");
    assert!(
        server
            .log()
            .contains("reload failed, the configuration in use is unchanged")
    );

    sighup(&server);
    wait_until("the SIGHUP reload to fail", Duration::from_secs(10), || {
        server
            .log()
            .matches("reload failed, the configuration in use is unchanged")
            .count()
            >= 2
    });
    // Still serving, on the old policy.
    assert_eq!(rcpt_reply(server.addr(), "u@accepted.test"), 250);
    assert_eq!(rcpt_reply(server.addr(), "u@other.test"), 554);
}

fn sighup(server: &Server) {
    let ok = Command::new("kill")
        .args(["-HUP", &server.pid().to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

#[test]
fn sighup_reloads() {
    let server = Server::start("", "");
    let text = std::fs::read_to_string(&server.config)
        .unwrap()
        .replace("max_recipients = 5", "max_recipients = 1");
    std::fs::write(&server.config, text).unwrap();
    sighup(&server);
    wait_until("the SIGHUP reload", Duration::from_secs(10), || {
        server.log().contains("configuration reloaded")
    });
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<a@accepted.test>", 250);
    c.expect("RCPT TO:<b@accepted.test>", 452);
}

#[test]
fn listeners_are_added_and_removed_without_closing_the_others() {
    let server = Server::start("", "");
    let second = free_port();
    let listener =
        |port: u16| format!("[[listener]]\naddress = \"127.0.0.1:{port}\"\ntls = \"none\"\n");
    let base = std::fs::read_to_string(&server.config).unwrap();
    std::fs::write(
        &server.config,
        base.replace("[relay]\n", &format!("{}\n[relay]\n", listener(second))),
    )
    .unwrap();
    let (code, out, err) = reload(&server);
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.contains(&format!("listener 127.0.0.1:{second} added")),
        "{out}"
    );
    let second_addr = SocketAddr::from(([127, 0, 0, 1], second));
    assert_eq!(rcpt_reply(second_addr, "u@accepted.test"), 250);

    // A session on the first listener, open while that listener is removed.
    let mut open = server.client(OUTSIDE);
    open.hello();

    // Only the second listener is left (the readiness probe of the harness is done).
    let only_second = base.replace(
        &format!("address = \"127.0.0.1:{}\"", server.port),
        &format!("address = \"127.0.0.1:{second}\""),
    );
    std::fs::write(&server.config, only_second).unwrap();
    let (code, out, err) = reload(&server);
    assert_eq!(code, 0, "{out} {err}");
    assert!(
        out.contains(&format!("listener 127.0.0.1:{} removed", server.port)),
        "{out}"
    );
    wait_until(
        "the first listener to close",
        Duration::from_secs(5),
        || std::net::TcpStream::connect(server.addr()).is_err(),
    );
    assert_eq!(rcpt_reply(second_addr, "u@accepted.test"), 250);
    // The open session still works and can send its message.
    let r = open.send_mail(
        "a@outside.test",
        &["u@accepted.test"],
        &message("still open"),
    );
    assert_eq!(r.code, 250, "{}", r.text());
    open.expect("QUIT", 221);
}

#[test]
fn the_queue_is_untouched_and_new_routes_deliver_it() {
    let server = Server::start("", "");
    // Queued to the closed port of the base config's fallback route.
    let id = submit_body(
        &server,
        "a@inside.test",
        &["x@remote.test"],
        &message("queued"),
    );
    let sink = Sink::start(SinkConfig::default());
    rewrite(&server, "", &route_to(&["remote.test"], &sink));
    let (code, out, err) = reload(&server);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("route"), "{out}");
    let (code, out, _) = run_cli(&[
        "queue",
        "flush",
        "--config",
        server.config.to_str().unwrap(),
    ]);
    assert_eq!(code, 0, "{out}");
    let got = sink.wait_for(1, Duration::from_secs(20));
    assert!(got[0].data_str().contains("Subject: queued"));
    // The same message, queued before the reload.
    assert!(server.log().contains(&format!("id={id}")));
}

#[test]
fn spool_dir_cannot_change_on_reload() {
    let server = Server::start("", "");
    let elsewhere = server.dir.path().join("other-spool");
    let text = std::fs::read_to_string(&server.config).unwrap().replace(
        &format!("spool_dir = \"{}\"", server.spool().display()),
        &format!("spool_dir = \"{}\"", elsewhere.display()),
    );
    std::fs::write(&server.config, text).unwrap();
    // The CLI finds the server through the old spool: SIGHUP is the way here.
    sighup(&server);
    wait_until("the reload to fail", Duration::from_secs(10), || {
        server.log().contains("spool_dir cannot change on reload")
    });
    assert!(!elsewhere.exists());
    assert_eq!(rcpt_reply(server.addr(), "u@accepted.test"), 250);
}

/// A new certificate file named by the new configuration is served to new sessions.
#[test]
fn reload_switches_certificates() {
    let dir = tempfile::tempdir().unwrap();
    let port = free_port();
    let tls_config = |cert: &Path, key: &Path| {
        format!(
            "[[listener]]\naddress = \"127.0.0.1:{port}\"\ntls = \"implicit\"\n\
             [tls]\ncert = \"{}\"\nkey = \"{}\"\n",
            cert.display(),
            key.display(),
        )
    };
    let first_ca = TestCa::new();
    let a = dir.path().join("a");
    std::fs::create_dir_all(&a).unwrap();
    let (cert_a, key_a) = first_ca.issue(&["relay.test"]).write_to(&a);
    let plain = free_port();
    let spool = dir.path().join("spool");
    let text = |extra: String| base_config(plain, &spool, "", &extra);
    let first = text(tls_config(&cert_a, &key_a));
    let server = Server::start_with_config(dir, plain, &first);
    let tls_addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut c =
        Client::connect_tls(OUTSIDE, tls_addr, first_ca.client_config(), "relay.test").unwrap();
    c.hello();

    let second_ca = TestCa::new();
    let b = server.dir.path().join("b");
    std::fs::create_dir_all(&b).unwrap();
    let (cert_b, key_b) = second_ca.issue(&["relay.test"]).write_to(&b);
    std::fs::write(&server.config, text(tls_config(&cert_b, &key_b))).unwrap();
    let (code, out, err) = reload(&server);
    assert_eq!(code, 0, "{out} {err}");
    assert!(out.contains("tls"), "{out}");
    let mut n =
        Client::connect_tls(OUTSIDE, tls_addr, second_ca.client_config(), "relay.test").unwrap();
    assert_eq!(n.reply().code, 220);
    assert!(
        Client::connect_tls(OUTSIDE, tls_addr, first_ca.client_config(), "relay.test").is_err()
    );
    // The session from before the reload is still up on the old certificate.
    c.expect("NOOP", 250);
    c.expect("QUIT", 221);
}

/// The start's refusal to run as root with a listener reachable from other hosts (and
/// no `user`) holds for a reload too.
#[test]
fn a_reload_cannot_add_a_public_listener_to_a_root_server_without_user() {
    if crate::service::euid() != 0 {
        eprintln!("skipped: needs root (CI runs as root)");
        return;
    }
    let server = Server::start("", "");
    let public = free_port();
    let text = std::fs::read_to_string(&server.config).unwrap().replace(
        "[relay]\n",
        &format!("[[listener]]\naddress = \"0.0.0.0:{public}\"\ntls = \"none\"\n\n[relay]\n"),
    );
    std::fs::write(&server.config, text).unwrap();
    // Through the control socket (the server refuses, the CLI says so), then by SIGHUP.
    let (code, _, err) = reload(&server);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("refusing to run as root"), "{err}");
    sighup(&server);
    wait_until(
        "the SIGHUP reload to be refused too",
        Duration::from_secs(10),
        || server.log().matches("refusing to run as root").count() >= 2,
    );
    assert!(std::net::TcpStream::connect(("127.0.0.1", public)).is_err());
}
