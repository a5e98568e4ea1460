//! Issue 12, operations: `postern check-policy` and `postern self-test` run as the real
//! binary against configuration files; `log_format = "json"`; `queue list --json` and
//! `quarantine list --json` against a running server and offline. And the relay tricks
//! of `policy::tricks::TRICKS`, the list `self-test` runs, sent over real SMTP from the
//! outside (127.0.0.2): the server must answer each exactly as the simulator predicts,
//! and never accept one for a destination that is not ours.

use std::path::{Path, PathBuf};
use std::time::Duration;

use postern::policy::tricks::{TRICKS, Targets};
use postern::simulate::{Probe, Simulator};

use crate::common::{OUTSIDE, Server, base_config, message, run_cli, wait_until};

/// Writes `text` as `postern.toml` in a new temp dir; returns both.
fn config_file(text: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

/// The base test config (accepted.test, company.test; 127.0.0.1 trusted) with a route
/// for company.test, written to a file (no server runs).
fn routed_config(top: &str, extra: &str) -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let text = base_config(
        25250,
        &dir.path().join("spool"),
        top,
        &format!("{extra}\n[[route]]\ndomains = [\"company.test\"]\nnext_hop = \"10.0.0.5:25\"\n"),
    );
    let path = dir.path().join("postern.toml");
    std::fs::write(&path, text).unwrap();
    (dir, path)
}

fn s(p: &Path) -> &str {
    p.to_str().unwrap()
}

#[test]
fn check_policy_prints_each_recipients_reply_and_rule() {
    let (_dir, cfg) = routed_config("", "");
    let (code, out, err) = run_cli(&[
        "check-policy",
        "--config",
        s(&cfg),
        "--client",
        "192.0.2.1",
        "--from",
        "someone@outside.example",
        "--to",
        "bob@company.test",
        "--to",
        "x@gmail.example",
        "--to",
        "<user%x@accepted.test>",
        "--to",
        "u@x.example@accepted.test",
    ]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "<bob@company.test>: 250 accepted (rule accepted_domain) -> route company.test 10.0.0.5:25\n\
         <x@gmail.example>: 554 5.7.1 refused (rule relay_denied)\n\
         <user%x@accepted.test>: 554 5.7.1 refused (rule routed_address)\n\
         <u@x.example@accepted.test>: 501 5.1.3 refused (rule syntax)\n"
    );
    // From the trusted network: relayed, by MX (not looked up).
    let (code, out, _) = run_cli(&[
        "check-policy",
        "--config",
        s(&cfg),
        "--client",
        "127.0.0.1",
        "--from",
        "",
        "--to",
        "x@gmail.example",
    ]);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "<x@gmail.example>: 250 accepted (rule trusted_network) -> MX lookup for gmail.example\n"
    );
}

#[test]
fn check_policy_with_auth_applies_relay_and_sender_ownership() {
    let dir = tempfile::tempdir().unwrap();
    let users = dir.path().join("users");
    let text = format!(
        "{}\n[auth]\nusers_file = \"{}\"\nrestrict_senders = true\n",
        base_config(25251, &dir.path().join("spool"), "", "")
            .replace("tls = \"none\"", "tls = \"starttls\"\nauth = \"optional\""),
        users.display()
    );
    let cfg = dir.path().join("postern.toml");
    std::fs::write(&cfg, text).unwrap();
    let out = crate::common::run_cli_stdin(
        &[
            "user".as_ref(),
            "add".as_ref(),
            "bob".as_ref(),
            "--password-stdin".as_ref(),
            "--address".as_ref(),
            "bob@accepted.test".as_ref(),
            "--config".as_ref(),
            cfg.as_os_str(),
        ],
        "pw-bob-1\n",
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let ask = |from: &str, tls: bool| {
        let mut args = vec![
            "check-policy",
            "--config",
            s(&cfg),
            "--client",
            "192.0.2.1",
            "--auth",
            "bob",
            "--from",
            from,
            "--to",
            "x@other.test",
        ];
        if tls {
            args.push("--tls");
        }
        run_cli(&args)
    };
    let (code, out, err) = ask("bob@accepted.test", true);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "<x@other.test>: 250 accepted (rule authenticated_relay) -> route * 127.0.0.1:1\n"
    );
    let (code, out, _) = ask("alice@accepted.test", true);
    assert_eq!(code, 0);
    assert_eq!(
        out,
        "<x@other.test>: 553 5.7.1 refused (rule sender_not_owned)\n"
    );
    // Without TLS this listener takes no AUTH (allow_plaintext_auth is off): an error.
    let (code, out, err) = ask("bob@accepted.test", false);
    assert_eq!(code, 1, "{out}");
    assert!(err.contains("--tls"), "{err}");
}

#[test]
fn check_policy_argument_and_config_errors() {
    let (_dir, cfg) = routed_config("", "");
    // clap: a missing required argument is a usage error.
    let (code, _, err) = run_cli(&["check-policy", "--config", s(&cfg), "--client", "192.0.2.1"]);
    assert_eq!(code, 2, "{err}");
    let (code, _, _) = run_cli(&[
        "check-policy",
        "--config",
        s(&cfg),
        "--client",
        "not-an-ip",
        "--from",
        "a@b.test",
        "--to",
        "c@d.test",
    ]);
    assert_eq!(code, 2);
    // AUTH on a listener that offers none; a control character in an address.
    for extra in [["--auth", "bob"], ["--helo", "x\ty"]] {
        let mut args = vec![
            "check-policy",
            "--config",
            s(&cfg),
            "--client",
            "192.0.2.1",
            "--from",
            "a@b.test",
            "--to",
            "c@accepted.test",
        ];
        args.extend(extra);
        let (code, out, err) = run_cli(&args);
        assert_eq!(code, 1, "{extra:?}: {out}{err}");
        assert!(out.is_empty() && err.starts_with("postern: "), "{err}");
    }
    let (_bad_dir, bad) = config_file("max_recipent = 5\n");
    let (code, _, err) = run_cli(&[
        "check-policy",
        "--config",
        s(&bad),
        "--client",
        "192.0.2.1",
        "--from",
        "a@b.test",
        "--to",
        "c@d.test",
    ]);
    assert_eq!(code, 1);
    assert!(err.contains("postern.toml:1"), "{err}");
}

#[test]
fn self_test_reports_no_open_relay_for_the_test_config() {
    let (_dir, cfg) = routed_config("", "");
    let (code, out, err) = run_cli(&["self-test", "--config", s(&cfg)]);
    assert_eq!(code, 0, "{out}{err}");
    assert!(
        out.contains(&format!(
            "open relay: NO (0 of {} tricks relayed)",
            TRICKS.len()
        )),
        "{out}"
    );
    assert!(!out.contains("RELAYED"), "{out}");
}

#[test]
fn self_test_reports_an_open_relay_and_a_trusted_client() {
    let (_dir, cfg) = routed_config("", "open_relay = true");
    let (code, out, _) = run_cli(&["self-test", "--config", s(&cfg)]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("open relay: YES ("), "{out}");
    assert!(
        out.contains("RELAYED plain outside domain on 127.0.0.1:25250: MAIL FROM:<probe@outside.example> RCPT TO:<user@outside.example>: 250 accepted (rule open_relay)"),
        "{out}"
    );
    // The routed tricks stay refused even on an open relay.
    assert!(!out.contains("RELAYED percent hack "), "{out}");

    let (_dir, cfg) = routed_config("", "");
    let (code, out, _) = run_cli(&["self-test", "--config", s(&cfg), "--client", "127.0.0.1"]);
    assert_eq!(code, 1, "{out}");
    assert!(out.contains("(rule trusted_network)"), "{out}");
    assert!(out.contains("open relay: YES ("), "{out}");
}

/// Every trick over real SMTP from the outside: the reply is the one the simulator
/// predicts, and no trick is accepted for somebody else's destination.
#[test]
fn every_relay_trick_over_smtp_is_answered_as_simulated_and_none_relays() {
    let server = Server::start("max_errors = 1000", "");
    let config = postern::config::Config::load(&server.config).unwrap();
    let sim = Simulator::new(&config).unwrap();
    let targets = Targets::from_config(&config);
    let probe = Probe {
        client: OUTSIDE.parse().unwrap(),
        helo: "client.test",
        auth: None,
        tls: false,
        dnsbl: None,
        listener: 0,
    };
    let mut c = server.client(OUTSIDE);
    c.hello();
    let mut mismatches = Vec::new();
    for trick in TRICKS {
        let (from, to) = (trick.from_path(&targets), trick.to_path(&targets));
        let utf8 = if from.is_ascii() && to.is_ascii() {
            ""
        } else {
            " SMTPUTF8"
        };
        let mail = c.cmd(&format!("MAIL FROM:{from}{utf8}"));
        assert_eq!(mail.code, 250, "{}: {}", trick.name, mail.text());
        let got = c.cmd(&format!("RCPT TO:{to}"));
        let want = sim.check(&probe, &from, &to).unwrap();
        if got.code != want.reply.code {
            mismatches.push(format!(
                "{}: server {} simulator {}",
                trick.name,
                got.text(),
                want.line()
            ));
        }
        assert!(
            !want.relayed(sim.policy()),
            "{}: {}",
            trick.name,
            want.line()
        );
        assert!(
            !(200..300).contains(&got.code) || !want.relayed(sim.policy()),
            "{} relayed",
            trick.name
        );
        c.expect("RSET", 250);
    }
    assert!(mismatches.is_empty(), "{}", mismatches.join("\n"));
    c.expect("QUIT", 221);
}

#[test]
fn json_log_lines_parse_and_carry_the_decision_fields() {
    let server = Server::start("log_format = \"json\"", "");
    let mut c = server.client(OUTSIDE);
    c.hello();
    c.expect("MAIL FROM:<a@outside.test>", 250);
    c.expect("RCPT TO:<x@other.test>", 554);
    c.expect("RSET", 250);
    let r = c.send_mail("a@outside.test", &["user@accepted.test"], &message("json"));
    assert_eq!(r.code, 250, "{}", r.text());
    let id = r.lines[0].rsplit(' ').next().unwrap().to_string();
    c.expect("QUIT", 221);
    wait_until(
        "message accepted in the log",
        Duration::from_secs(10),
        || server.log().contains("message accepted"),
    );
    let log = server.log();
    let lines: Vec<serde_json::Value> = log
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    assert!(lines.len() > 3, "{log}");
    let accepted = lines
        .iter()
        .find(|v| v["message"] == "message accepted")
        .expect("message accepted");
    assert_eq!(accepted["target"], "maillog");
    assert_eq!(accepted["level"], "INFO");
    assert_eq!(accepted["id"], id.as_str());
    assert_eq!(accepted["from"], "<a@outside.test>");
    assert_eq!(accepted["to"], "<user@accepted.test>");
    assert_eq!(accepted["nrcpt"], 1);
    assert!(
        accepted["client"]
            .as_str()
            .unwrap()
            .starts_with("127.0.0.2:")
    );
    assert!(accepted["size"].as_u64().unwrap() > 0);
    assert!(accepted["timestamp"].is_string());
    let refused = lines
        .iter()
        .find(|v| v["message"] == "recipient refused")
        .expect("recipient refused");
    assert_eq!(refused["rule"], "relay_denied");
    assert_eq!(refused["to"], "<x@other.test>");
    assert_eq!(refused["auth"], "-");
}

/// `postern ARGS... --json --config CONFIG`, every line parsed as JSON.
fn json_lines(args: &[&str], config: &Path) -> Vec<serde_json::Value> {
    let mut all = args.to_vec();
    all.extend(["--json", "--config", s(config)]);
    let (code, out, err) = run_cli(&all);
    assert_eq!(code, 0, "{args:?}: {out}{err}");
    out.lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect()
}

fn is_rfc3339(v: &serde_json::Value) -> bool {
    v.as_str()
        .is_some_and(|t| chrono::DateTime::parse_from_rfc3339(t).is_ok())
}

#[test]
fn queue_list_json_online_and_offline() {
    let mut server = Server::start("", "");
    let id = crate::common::submit_body(
        &server,
        "sender@company.test",
        &["far@other.test", "near@other.test"],
        &message("queued"),
    );
    // The fallback route is a closed port: the first attempt fails and is recorded.
    wait_until("a deferral", Duration::from_secs(20), || {
        server.log().contains("message deferred")
    });
    let online = json_lines(&["queue", "list"], &server.config);
    assert_eq!(online.len(), 1, "{online:?}");
    let m = &online[0];
    assert_eq!(m["id"], id.as_str());
    assert_eq!(m["sender"], "sender@company.test");
    assert_eq!(m["recipients"][0]["address"], "far@other.test");
    assert_eq!(m["recipients"][1]["address"], "near@other.test");
    assert_eq!(m["recipients"][0]["state"], "pending");
    assert!(m["recipients"][0]["last_error"].is_string(), "{m}");
    assert!(m["last_error"].is_string(), "{m}");
    assert!(m["attempts"].as_u64().unwrap() >= 1, "{m}");
    assert!(
        is_rfc3339(&m["arrival"]) && is_rfc3339(&m["next_attempt"]),
        "{m}"
    );
    assert!(m["size"].as_u64().unwrap() > 0);

    server.terminate(Duration::from_secs(15));
    let offline = json_lines(&["queue", "list"], &server.config);
    assert_eq!(offline.len(), 1, "{offline:?}");
    assert_eq!(offline[0]["id"], id.as_str());
    assert_eq!(offline[0]["arrival"], m["arrival"]);
    assert_eq!(offline[0]["size"], m["size"]);
    assert!(offline[0]["next_attempt"].is_null());
}

#[test]
fn quarantine_list_json_online_and_offline() {
    let filter =
        "\n[[filter]]\nname = \"hold-it\"\nkeywords = [\"hold me\"]\naction = \"quarantine\"\n";
    let mut server = Server::start("", filter);
    let mut c = server.client(OUTSIDE);
    c.hello();
    let r = c.send_mail(
        "a@outside.test",
        &["user@accepted.test"],
        "Subject: please hold me\r\n\r\nhold me\r\n",
    );
    assert_eq!(r.code, 250, "{}", r.text());
    c.expect("QUIT", 221);
    let check = |list: &[serde_json::Value]| {
        assert_eq!(list.len(), 1, "{list:?}");
        let q = &list[0];
        assert_eq!(q["filter"], "hold-it");
        assert!(!q["reason"].as_str().unwrap().is_empty(), "{q}");
        assert_eq!(q["sender"], "a@outside.test");
        assert_eq!(q["recipients"][0], "user@accepted.test");
        assert_eq!(q["subject"], "please hold me");
        assert!(
            is_rfc3339(&q["quarantined"]) && is_rfc3339(&q["arrival"]),
            "{q}"
        );
        q["id"].as_str().unwrap().to_string()
    };
    let online = check(&json_lines(&["quarantine", "list"], &server.config));
    server.terminate(Duration::from_secs(15));
    let offline = check(&json_lines(&["quarantine", "list"], &server.config));
    assert_eq!(online, offline);
    // The text listing names the same message.
    let (_, text, _) = run_cli(&["quarantine", "list", "--config", s(&server.config)]);
    assert!(text.contains(&online), "{text}");
}

#[test]
fn check_policy_queries_the_blocklists_only_with_dnsbl() {
    let dns = postern_testkit::dns::DnsServer::start();
    dns.add_a("1.2.0.192.zen.test", std::net::Ipv4Addr::new(127, 0, 0, 2));
    let (_dir, cfg) = routed_config(
        "",
        &format!(
            "dnsbl = [\"zen.test\"]\n\n[delivery]\ndns_servers = [\"{}\"]\n",
            dns.addr()
        ),
    );
    let ask = |more: &[&str]| {
        let mut args = vec![
            "check-policy",
            "--config",
            s(&cfg),
            "--client",
            "192.0.2.1",
            "--from",
            "a@outside.example",
            "--to",
            "user@accepted.test",
        ];
        args.extend(more);
        run_cli(&args)
    };
    let (code, out, err) = ask(&[]);
    assert_eq!(code, 0, "{out}{err}");
    // [delivery] in the file: no fallback route, so by MX (not looked up either).
    assert_eq!(
        out,
        "<user@accepted.test>: 250 accepted (rule accepted_domain) -> MX lookup for accepted.test\n"
    );
    assert!(err.contains("not queried"), "{err}");
    assert!(dns.queries().is_empty(), "{:?}", dns.queries());
    let (code, out, err) = ask(&["--dnsbl"]);
    assert_eq!(code, 0, "{out}{err}");
    assert_eq!(
        out,
        "<user@accepted.test>: 554 5.7.1 refused (rule dnsbl)\n"
    );
    assert!(!dns.queries().is_empty());
}
