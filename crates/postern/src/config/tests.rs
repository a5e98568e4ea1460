//! Tests for the configuration module. Bad configurations live as data in
//! `testdata/bad-configs/` (NAME.toml + NAME.expected, a substring of the error), so adding
//! a case needs no code.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::*;

fn testdata() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../../testdata")
}

fn secs(s: u64) -> Duration {
    Duration::from_secs(s)
}

fn parse(text: &str) -> Result<Config, ConfigError> {
    Config::from_str(text, Path::new("test.toml"))
}

fn parse_err(text: &str) -> String {
    match parse(text) {
        Ok(c) => panic!("expected an error, got {c:#?}"),
        Err(e) => e.to_string(),
    }
}

#[test]
fn config_durations() {
    let ok: &[(&str, Duration)] = &[
        ("30s", secs(30)),
        ("10m", secs(600)),
        ("4h", secs(4 * 3600)),
        ("5d", secs(5 * 86400)),
        ("500ms", Duration::from_millis(500)),
        ("0s", Duration::ZERO),
        (" 90 s ", secs(90)),
        ("007m", secs(420)),
    ];
    for (text, want) in ok {
        assert_eq!(parse_duration(text).as_ref(), Ok(want), "{text:?}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "empty"),
        ("   ", "empty"),
        ("-5m", "does not start with a number"),
        ("+5m", "does not start with a number"),
        ("1.5h", "unknown unit `.5h`"),
        ("m", "does not start with a number"),
        ("300", "has no unit"),
        ("5M", "unknown unit `M`"),
        ("5 minutes", "unknown unit `minutes`"),
        ("1h30m", "unknown unit `h30m`"),
        ("99999999999999999999s", "too large"),
        ("18446744073709551615d", "too large"),
    ];
    for (text, want) in bad {
        let err = parse_duration(text).expect_err(text);
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn config_sizes() {
    let ok: &[(&str, u64)] = &[
        ("25MB", 25 * 1024 * 1024),
        ("25mb", 25 * 1024 * 1024),
        ("25 MB", 25 * 1024 * 1024),
        ("512KB", 512 * 1024),
        ("512kib", 512 * 1024),
        ("1GB", 1 << 30),
        ("2GiB", 2 << 30),
        ("100B", 100),
        ("1000", 1000),
        ("0", 0),
    ];
    for (text, want) in ok {
        assert_eq!(parse_size(text), Ok(*want), "{text:?}");
    }
    let bad: &[(&str, &str)] = &[
        ("", "empty"),
        ("MB", "does not start with a number"),
        ("-1MB", "does not start with a number"),
        ("1.5MB", "unknown unit"),
        ("25XB", "unknown unit `XB`"),
        ("25M", "unknown unit `M`"),
        ("18446744073709551615GB", "too large"),
        ("99999999999999999999", "too large"),
    ];
    for (text, want) in bad {
        let err = parse_size(text).expect_err(text);
        assert!(err.contains(want), "{text:?}: {err}");
    }
}

#[test]
fn config_formatting_round_trips() {
    for text in ["30s", "10m", "4h", "5d", "500ms", "90s", "0s"] {
        assert_eq!(format_duration(parse_duration(text).unwrap()), text);
    }
    for text in ["25MB", "512KB", "1GB", "1000B", "1025B"] {
        assert_eq!(format_size(parse_size(text).unwrap()), text);
    }
}

#[test]
fn config_builtin_defaults_are_safe() {
    let c = Config::builtin_defaults();
    assert_eq!(c.source, None);
    assert!(!c.relay.open_relay);
    assert!(!c.relay.is_open_relay());
    assert!(c.relay.accepted_domains.is_empty());
    assert!(c.relay.authenticated_relay);
    let nets: Vec<String> = c
        .relay
        .trusted_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["127.0.0.0/8", "::1/128"]);
    assert_eq!(c.listeners.len(), 1);
    assert_eq!(
        c.listeners[0].address,
        "127.0.0.1:2525".parse::<SocketAddr>().unwrap()
    );
    assert_eq!(c.listeners[0].tls, TlsMode::StartTls);
    assert_eq!(c.listeners[0].auth, AuthMode::None);
    assert_eq!(c.spool_dir, PathBuf::from("./postern-spool"));
    assert_eq!(c.max_message_size, 25 * 1024 * 1024);
    assert_eq!(c.max_recipients, 100);
    assert_eq!(c.command_timeout, secs(300));
    assert_eq!(c.max_errors, 20);
    assert!(c.routes.is_empty());
    assert!(c.filters.is_empty());
    assert!(!c.hostname.is_empty());
    // The defaults must be runnable by this very build.
    assert_eq!(c.unsupported_features(), Vec::<String>::new());

    let text = c.describe();
    assert!(text.contains("open relay: NO\n"), "{text}");
    assert!(
        text.contains("anonymous inbound: none (no accepted domains)\n"),
        "{text}"
    );
    assert!(
        text.contains("relay for trusted networks: 127.0.0.0/8, ::1/128\n"),
        "{text}"
    );
    assert!(text.contains("route: all domains -> MX"), "{text}");
}

#[test]
fn config_empty_file_equals_defaults_except_paths() {
    let c = Config::from_str("", Path::new("/etc/postern/postern.toml")).unwrap();
    let mut d = Config::builtin_defaults();
    d.source = Some(PathBuf::from("/etc/postern/postern.toml"));
    // A file's default spool follows the relative-path rule: next to the file.
    d.spool_dir = PathBuf::from("/etc/postern/postern-spool");
    assert_eq!(c, d);
}

#[test]
fn config_full_example() {
    let path = testdata().join("configs/full.toml");
    let c = Config::load(&path).unwrap_or_else(|e| panic!("{e}"));
    let dir = path.parent().unwrap();
    let addr = |s: &str| s.parse::<SocketAddr>().unwrap();

    assert_eq!(c.source.as_deref(), Some(path.as_path()));
    assert_eq!(c.hostname, "relay.example.net");
    assert_eq!(c.spool_dir, PathBuf::from("/var/spool/postern"));
    assert_eq!(c.max_message_size, 25 << 20);
    assert_eq!(c.max_recipients, 100);
    assert_eq!(c.command_timeout, secs(300));
    assert_eq!(c.max_errors, 10);
    assert_eq!(
        c.privileges,
        Privileges {
            user: Some("postern".into()),
            group: Some("postern".into()),
            allow_root: false,
        }
    );

    assert_eq!(
        c.listeners,
        vec![
            Listener {
                address: addr("0.0.0.0:25"),
                tls: TlsMode::StartTls,
                require_tls: false,
                auth: AuthMode::None,
                allow_plaintext_auth: false,
                max_connections: 1000,
                per_ip_connections: 20,
                connection_rate: None,
                proxy_protocol: false,
                proxy_from: vec![],
            },
            Listener {
                address: addr("[::]:465"),
                tls: TlsMode::Implicit,
                require_tls: true,
                auth: AuthMode::Required,
                allow_plaintext_auth: false,
                max_connections: 200,
                per_ip_connections: 5,
                connection_rate: None,
                proxy_protocol: false,
                proxy_from: vec![],
            },
        ]
    );
    assert_eq!(
        c.tls,
        Some(Tls {
            cert: "/etc/postern/cert.pem".into(),
            key: "/etc/postern/key.pem".into(),
        })
    );
    assert_eq!(
        c.relay,
        Relay {
            accepted_domains: vec!["internal.net".into(), "company.com".into()],
            trusted_networks: vec![
                "10.0.0.0/8".parse().unwrap(),
                "192.0.2.7/32".parse().unwrap(),
                "2001:db8::/32".parse().unwrap(),
            ],
            authenticated_relay: true,
            open_relay: false,
            recipients_file: Some(dir.join("recipients.txt")),
            dnsbl: vec!["zen.spamhaus.org".into()],
        }
    );
    assert_eq!(
        c.auth,
        Auth {
            users_file: Some("/etc/postern/users".into()),
            mechanisms: vec![Mechanism::Plain, Mechanism::Login],
            max_failures: 5,
            failure_window: secs(600),
            lockout: secs(900),
            per_user_lockout: true,
            restrict_senders: false,
        }
    );
    assert_eq!(
        c.routes,
        vec![
            Route {
                domains: vec!["internal.net".into(), "company.com".into()],
                next_hop: NextHop::Ip(addr("10.0.0.5:25")),
                tls: RouteTls::Opportunistic,
                ca_file: None,
                auth_user: None,
                auth_password_file: None,
            },
            Route {
                domains: vec!["partner.example".into()],
                next_hop: NextHop::Host {
                    host: "smarthost.example.org".into(),
                    port: 587
                },
                tls: RouteTls::Required,
                ca_file: Some("/etc/postern/internal-ca.pem".into()),
                auth_user: Some("relay".into()),
                auth_password_file: Some(dir.join("smarthost.pass")),
            },
            Route {
                domains: vec!["*".into()],
                next_hop: NextHop::Mx,
                tls: RouteTls::Opportunistic,
                ca_file: None,
                auth_user: None,
                auth_password_file: None,
            },
        ]
    );
    assert!(c.routes[0].matches("company.com"));
    assert!(!c.routes[0].matches("other.example"));
    assert!(c.routes[2].matches("other.example"));
    assert_eq!(
        c.delivery,
        Delivery {
            dns_servers: vec![addr("127.0.0.1:5353"), addr("[::1]:53")],
            mx_port: 25,
            retry_schedule: vec![secs(60), secs(300), secs(900), secs(3600), secs(14400)],
            max_queue_lifetime: secs(5 * 86400),
            max_concurrency: 100,
            per_domain_concurrency: 10,
            max_mx_addresses: 4,
            max_mx_sessions: 3,
            connect_timeout: secs(8),
            resolve_timeout: secs(20),
        }
    );
    let actions: Vec<(&str, &FilterAction)> = c
        .filters
        .iter()
        .map(|f| (f.name.as_str(), &f.action))
        .collect();
    assert_eq!(
        actions,
        vec![
            ("no-executables", &FilterAction::Quarantine),
            (
                "project-x",
                &FilterAction::Redirect("security@company.com".into())
            ),
            ("blocked-senders", &FilterAction::Reject),
            ("newsletters", &FilterAction::Discard),
        ]
    );
    assert_eq!(
        c.filters[0].attachments,
        ["*.exe", "*.scr", "*.vbs", "*.js", "*.bat"]
    );
    assert_eq!(c.filters[1].keywords, ["project x"]);
    assert_eq!(c.filters[2].senders, ["*@spam.example", "bad@evil.example"]);
    assert_eq!(
        c.metrics,
        Some(Metrics {
            address: addr("127.0.0.1:9187")
        })
    );

    let text = c.describe();
    for want in [
        "open relay: NO\n",
        "anonymous inbound for: internal.net, company.com\n",
        "relay for trusted networks: 10.0.0.0/8, 192.0.2.7/32, 2001:db8::/32\n",
        "relay for authenticated users: yes\n",
        "recipients checked against: ",
        "listener 0.0.0.0:25: tls starttls, auth none, max 1000 connections, 20 per IP\n",
        "listener [::]:465: tls implicit, TLS required before MAIL/AUTH, auth required,",
        "route: internal.net, company.com -> 10.0.0.5:25 (tls opportunistic)\n",
        "route: partner.example -> smarthost.example.org:587 (tls required, CA file \
         /etc/postern/internal-ca.pem, AUTH as relay)\n",
        "route: any domain -> MX (tls opportunistic)\n",
        "filter project-x: keywords \"project x\" -> redirect to security@company.com\n",
        "spool: /var/spool/postern\n",
        "limits: messages up to 25MB (26214400 bytes), 100 recipients per transaction",
        "retry after 1m, 5m, 15m, 1h, 4h then every 4h, bounce after 5d",
        "metrics: http://127.0.0.1:9187/metrics\n",
    ] {
        assert!(text.contains(want), "missing {want:?} in:\n{text}");
    }
    assert!(!text.contains("all other domains"), "{text}");

    // This build runs every feature the full example uses, metrics included.
    assert_eq!(c.unsupported_features(), Vec::<String>::new());
}

#[test]
fn config_open_relay_is_loud() {
    let c = parse("[relay]\nopen_relay = true\n").unwrap();
    assert!(c.relay.is_open_relay());
    assert!(
        c.describe()
            .contains("open relay: YES -- DANGER: anyone on the Internet can relay"),
        "{}",
        c.describe()
    );

    // Trusting the whole Internet is an open relay by another name.
    let c = parse("[relay]\ntrusted_networks = [\"::/0\"]\n").unwrap();
    assert!(c.relay.is_open_relay());
    assert!(c.describe().contains("open relay: YES -- DANGER"));
}

#[test]
fn config_trusted_networks_that_cover_everything_together_are_an_open_relay() {
    let relay = |nets: &str| {
        parse(&format!("[relay]\ntrusted_networks = {nets}\n"))
            .unwrap()
            .relay
    };
    for (nets, families) in [
        (r#"["0.0.0.0/0"]"#, &["IPv4"][..]),
        (r#"["0.0.0.0/1", "128.0.0.0/1"]"#, &["IPv4"]),
        // Overlapping, unordered, with host bits, mixed with IPv6.
        (
            r#"["128.0.0.0/2", "10.1.2.3/8", "0.0.0.0/1", "192.0.0.0/2", "::1"]"#,
            &["IPv4"],
        ),
        (r#"["8000::/1", "::/1"]"#, &["IPv6"]),
        (r#"["0.0.0.0/1", "128.0.0.0/1", "::/0"]"#, &["IPv4", "IPv6"]),
        (r#"["0.0.0.0/1", "128.0.0.0/2", "::/1"]"#, &[]),
        (r#"["127.0.0.0/8", "::1/128"]"#, &[]),
        ("[]", &[]),
    ] {
        let r = relay(nets);
        assert_eq!(r.trusted_everyone(), families, "{nets}");
        assert_eq!(r.is_open_relay(), !families.is_empty(), "{nets}");
    }
    let c =
        parse("[relay]\ntrusted_networks = [\"0.0.0.0/1\", \"128.0.0.0/1\", \"::/0\"]\n").unwrap();
    let text = c.describe();
    assert!(
        text.contains("open relay: YES -- DANGER: relay.trusted_networks contains ::/0, so anyone"),
        "{text}"
    );
    let c = parse("[relay]\ntrusted_networks = [\"0.0.0.0/1\", \"128.0.0.0/1\"]\n").unwrap();
    let text = c.describe();
    assert!(
        text.contains(
            "open relay: YES -- DANGER: relay.trusted_networks together cover every IPv4 \
             address, so anyone on the Internet can relay through this server"
        ),
        "{text}"
    );
}

#[test]
fn config_relative_paths_follow_the_file() {
    let text = r#"
spool_dir = "spool"
[relay]
recipients_file = "../lists/recipients.txt"
[auth]
users_file = "/abs/users"
"#;
    let c = Config::from_str(text, Path::new("conf/postern.toml")).unwrap();
    assert_eq!(c.spool_dir, PathBuf::from("conf/spool"));
    assert_eq!(
        c.relay.recipients_file,
        Some(PathBuf::from("conf/../lists/recipients.txt"))
    );
    assert_eq!(c.auth.users_file, Some(PathBuf::from("/abs/users")));

    // A file named without a directory: paths stay relative to the working directory.
    let c = Config::from_str(text, Path::new("postern.toml")).unwrap();
    assert_eq!(c.spool_dir, PathBuf::from("spool"));
    let c = Config::from_str("spool_dir = \"./q\"", Path::new("/srv/p.toml")).unwrap();
    assert_eq!(c.spool_dir, PathBuf::from("/srv/q"));
    let c = Config::from_str("", Path::new("postern.toml")).unwrap();
    assert_eq!(c.spool_dir, PathBuf::from("./postern-spool"));
}

#[test]
fn config_normalises_values() {
    let text = r#"
hostname = "Relay.Example.NET."
max_message_size = 2048
[relay]
accepted_domains = ["Bücher.Example", "a.test", "A.TEST."]
trusted_networks = ["10.1.2.3/8", "::1"]
[[route]]
domains = ["*"]
next_hop = "[2001:db8::5]:2525"
tls = "none"
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.hostname, "relay.example.net");
    assert_eq!(c.max_message_size, 2048);
    assert_eq!(
        c.relay.accepted_domains,
        ["xn--bcher-kva.example", "a.test"]
    );
    let nets: Vec<String> = c
        .relay
        .trusted_networks
        .iter()
        .map(ToString::to_string)
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "::1/128"]);
    assert_eq!(
        c.routes[0].next_hop,
        NextHop::Ip("[2001:db8::5]:2525".parse().unwrap())
    );
    assert_eq!(c.routes[0].tls, RouteTls::None);
    assert!(
        c.describe()
            .contains("route: any domain -> [2001:db8::5]:2525 (tls none)")
    );
}

#[test]
fn config_next_hop_syntax() {
    use validate::parse_next_hop;
    let ip = |s: &str| NextHop::Ip(s.parse().unwrap());
    assert_eq!(parse_next_hop("mx"), Ok(NextHop::Mx));
    assert_eq!(parse_next_hop("MX"), Ok(NextHop::Mx));
    assert_eq!(parse_next_hop("10.0.0.5:25"), Ok(ip("10.0.0.5:25")));
    assert_eq!(parse_next_hop("[10.0.0.5]:25"), Ok(ip("10.0.0.5:25")));
    assert_eq!(parse_next_hop("[::1]:2525"), Ok(ip("[::1]:2525")));
    assert_eq!(
        parse_next_hop("Mail.Example.com:587"),
        Ok(NextHop::Host {
            host: "mail.example.com".into(),
            port: 587
        })
    );
    for bad in [
        "",
        "mail.example.com",
        "mail.example.com:",
        "mail.example.com:0",
        "mail.example.com:smtp",
        "[10.0.0.5]",
        "[mail.example.com]:25",
        "::1:25",
        "bad_host:25",
        "smtp://mail.example.com:25",
        "bücher.example:25",
    ] {
        assert!(parse_next_hop(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn config_domain_syntax() {
    use validate::normalize_domain;
    assert_eq!(
        normalize_domain("Example.COM.").as_deref(),
        Ok("example.com")
    );
    assert_eq!(normalize_domain("localhost").as_deref(), Ok("localhost"));
    assert_eq!(
        normalize_domain("xn--bcher-kva.example").as_deref(),
        Ok("xn--bcher-kva.example")
    );
    // Stored as A-labels (IDNA), the one form every comparison uses.
    assert_eq!(
        normalize_domain("MÜNCHEN.de").as_deref(),
        Ok("xn--mnchen-3ya.de")
    );
    for bad in [
        "",
        ".",
        ".example.com",
        "a..b",
        "-a.example",
        "a-.example",
        "a_b.example",
        "a b.example",
        "user@example.com",
        "10.0.0.1",
        "*.example.com",
        &format!("{}.example", "a".repeat(64)),
        &format!("{}example", "a.".repeat(127)),
    ] {
        assert!(normalize_domain(bad).is_err(), "{bad:?} accepted");
    }
}

#[test]
fn config_missing_file_is_an_io_error() {
    let err = Config::load(Path::new("/nonexistent/postern.toml")).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }), "{err:?}");
    assert!(
        err.to_string()
            .starts_with("/nonexistent/postern.toml: cannot read configuration:"),
        "{err}"
    );
    let err = Config::load_default_or_file(Some(Path::new("/nonexistent/x.toml"))).unwrap_err();
    assert!(matches!(err, ConfigError::Io { .. }));
}

#[test]
fn config_load_default_or_file_reads_the_given_file() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("relay.toml");
    std::fs::write(&path, "hostname = \"given.example\"\n").unwrap();
    let c = Config::load_default_or_file(Some(&path)).unwrap();
    assert_eq!(c.hostname, "given.example");
    assert_eq!(c.spool_dir, dir.path().join("postern-spool"));
}

#[test]
fn config_error_positions_count_characters() {
    // Column counts characters, not bytes, so a non-ASCII line still points at the right spot.
    let err = parse_err("# ü\nhostname = \"relay.example\" ; ü\n");
    assert!(err.starts_with("test.toml:2:"), "{err}");
    let err = parse_err("[relay]\naccepted_domains = [\"ü\", \"a_b\"]\n");
    assert!(
        err.starts_with("test.toml:2:26: relay.accepted_domains"),
        "{err}"
    );
}

#[test]
fn config_auth_listener_with_plaintext_is_valid() {
    let text = r#"
[auth]
users_file = "users"
mechanisms = ["plain"]
per_user_lockout = false
[[listener]]
address = "127.0.0.1:2587"
auth = "optional"
allow_plaintext_auth = true
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.auth.mechanisms, [Mechanism::Plain]);
    assert!(!c.auth.per_user_lockout);
    assert!(!c.auth.restrict_senders);
    assert_eq!(c.listeners[0].auth, AuthMode::Optional);
    assert!(c.unsupported_features().is_empty());
    assert!(
        c.describe().contains("per client IP only"),
        "{}",
        c.describe()
    );
}

#[test]
fn config_auth_restrict_senders() {
    let c = parse("[auth]\nusers_file = \"users\"\nrestrict_senders = true\n").unwrap();
    assert!(c.auth.restrict_senders);
    assert!(
        c.describe().contains("auth: senders restricted"),
        "{}",
        c.describe()
    );
    assert!(!parse("").unwrap().auth.restrict_senders);
    let err = parse_err("[auth]\nrestrict_senders = \"yes\"\n");
    assert!(err.starts_with("test.toml:2:"), "{err}");
}

#[test]
fn config_routes_and_delivery_are_supported() {
    let text = r#"
[[listener]]
address = "127.0.0.1:0"
[[listener]]
address = "127.0.0.1:0"
[[route]]
domains = ["example.com"]
next_hop = "[127.0.0.1]:2526"
tls = "none"
[delivery]
dns_servers = ["127.0.0.1"]
mx_port = 2526
retry_schedule = ["30s"]
"#;
    let c = parse(text).unwrap();
    assert_eq!(c.unsupported_features(), Vec::<String>::new());
    assert_eq!(c.delivery.dns_servers, ["127.0.0.1:53".parse().unwrap()]);
    assert!(c.describe().contains("route: all other domains -> MX"));
}

/// Every `testdata/bad-configs/NAME.toml` fails to load with an error containing the text
/// of `NAME.expected`.
#[test]
fn config_bad_configs() {
    let dir = testdata().join("bad-configs");
    let mut entries: Vec<PathBuf> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|x| x == "toml"))
        .collect();
    entries.sort();
    assert!(
        entries.len() >= 9,
        "too few bad configs in {}",
        dir.display()
    );

    let mut failures = Vec::new();
    for path in &entries {
        let expected_path = path.with_extension("expected");
        let expected = std::fs::read_to_string(&expected_path)
            .unwrap_or_else(|e| panic!("{}: {e}", expected_path.display()));
        let expected = expected.trim_end_matches(['\n', '\r']);
        match Config::load(path) {
            Ok(_) => failures.push(format!("{}: loaded without error", path.display())),
            Err(err) => {
                let shown = err.to_string();
                if !shown.contains(expected) {
                    failures.push(format!("{shown}\n    does not contain: {expected}"));
                }
                assert!(err.location().is_some(), "{shown}");
            }
        }
    }
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

/// The examples in the operator documentation must stay valid.
#[test]
fn config_docs_examples_parse() {
    let path = testdata().join("../docs/configuration.md");
    let doc = std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let mut blocks = 0;
    for (i, block) in doc.split("```toml\n").skip(1).enumerate() {
        let text = block.split("```").next().unwrap();
        Config::from_str(text, Path::new("/etc/postern/postern.toml"))
            .unwrap_or_else(|e| panic!("docs example {}: {e}", i + 1));
        blocks += 1;
    }
    assert!(blocks >= 1, "no ```toml example in {}", path.display());
}

#[test]
fn config_postmaster_defaults_only_when_deliverable() {
    let base = "hostname = \"relay.example.net\"\n";
    // By MX, postmaster@hostname would come back to this host: no default.
    assert_eq!(parse(base).unwrap().postmaster, None);
    let mx = format!("{base}[[route]]\ndomains = [\"*\"]\nnext_hop = \"mx\"\n");
    assert_eq!(parse(&mx).unwrap().postmaster, None);
    // A route taking our own name to a fixed host makes the default usable.
    let routed = format!("{base}[[route]]\ndomains = [\"*\"]\nnext_hop = \"10.0.0.5:25\"\n");
    assert_eq!(
        parse(&routed).unwrap().postmaster.as_deref(),
        Some("postmaster@relay.example.net")
    );
    let given = format!("postmaster = \"Admin@Company.COM\"\n{base}");
    assert_eq!(
        parse(&given).unwrap().postmaster.as_deref(),
        Some("Admin@company.com")
    );
}

#[test]
fn config_proxy_protocol_needs_proxy_from() {
    let c = parse(
        "[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_protocol = true\n\
         proxy_from = [\"10.0.0.0/8\", \"192.0.2.1\"]\n",
    )
    .unwrap();
    let l = &c.listeners[0];
    assert!(l.proxy_protocol);
    assert_eq!(
        l.proxy_from,
        [
            "10.0.0.0/8".parse().unwrap(),
            "192.0.2.1/32".parse().unwrap()
        ] as [ipnet::IpNet; 2]
    );
    assert!(
        c.describe()
            .contains("PROXY protocol from 10.0.0.0/8, 192.0.2.1/32"),
        "{}",
        c.describe()
    );
    assert!(!parse("").unwrap().listeners[0].proxy_protocol);

    let err = parse_err("[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_protocol = true\n");
    assert!(
        err.starts_with("test.toml:3:18: listener.proxy_protocol"),
        "{err}"
    );
    for everyone in ["0.0.0.0/0", "::/0"] {
        let err = parse_err(&format!(
            "[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_protocol = true\n\
             proxy_from = [\"{everyone}\"]\n"
        ));
        assert!(err.contains("listener.proxy_from"), "{err}");
        assert!(err.contains("every host on the Internet"), "{err}");
    }
    let err = parse_err(
        "[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_protocol = true\nproxy_from = []\n",
    );
    assert!(
        err.starts_with("test.toml:4:14: listener.proxy_from"),
        "{err}"
    );
    let err =
        parse_err("[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_from = [\"10.0.0.0/8\"]\n");
    assert!(
        err.starts_with("test.toml:3:14: listener.proxy_from"),
        "{err}"
    );
    let err = parse_err(
        "[[listener]]\naddress = \"0.0.0.0:2525\"\nproxy_protocol = true\nproxy_from = [\"10.0.0.0/33\"]\n",
    );
    assert!(
        err.starts_with("test.toml:4:15: listener.proxy_from"),
        "{err}"
    );
}

/// A mapped IPv6 network stands for its IPv4 network (clients are compared in canonical
/// form, so `::ffff:10.0.0.0/104` as such would never match anyone).
#[test]
fn config_ipv4_mapped_networks_are_ipv4_networks() {
    let c = parse(
        "[relay]\ntrusted_networks = [\"::ffff:10.0.0.0/104\", \"::ffff:192.0.2.7\", \"2001:db8::/32\"]\n",
    )
    .unwrap();
    let nets: Vec<String> = c
        .relay
        .trusted_networks
        .iter()
        .map(|n| n.to_string())
        .collect();
    assert_eq!(nets, ["10.0.0.0/8", "192.0.2.7/32", "2001:db8::/32"]);
    // ::ffff:0:0/96 is every IPv4 address: an open relay, said so.
    let c = parse("[relay]\ntrusted_networks = [\"::ffff:0.0.0.0/96\"]\n").unwrap();
    assert!(c.relay.is_open_relay());
}

#[test]
fn config_log_format() {
    assert_eq!(parse("").unwrap().log_format, LogFormat::Text);
    assert_eq!(
        parse("log_format = \"json\"").unwrap().log_format,
        LogFormat::Json
    );
    assert_eq!(
        parse("log_format = \"text\"").unwrap().log_format,
        LogFormat::Text
    );
    let err = parse_err("log_format = \"xml\"");
    assert!(
        err.contains("test.toml:1:") && err.contains("log_format"),
        "{err}"
    );
}

#[test]
fn config_privileges_keys() {
    let c = parse("user = \"postern\"\n").unwrap();
    assert_eq!(c.privileges.user.as_deref(), Some("postern"));
    assert_eq!(c.privileges.group, None);
    assert!(
        c.describe()
            .contains("then runs as user postern (its primary group)")
    );
    assert_eq!(parse("").unwrap().privileges, Privileges::default());
    // A machine account's trailing `$` is a valid name.
    assert!(parse("user = \"relay$\"\n").is_ok());
    for bad in ["", "-x", "a:b", "a/b", "$", "123"] {
        let e = parse_err(&format!("user = \"{bad}\"\n"));
        assert!(e.contains("user:"), "{bad}: {e}");
    }
    // Root with an Internet-facing listener is what check-config and serve warn about.
    let exposed = parse("[[listener]]\naddress = \"0.0.0.0:25\"\n").unwrap();
    assert_eq!(exposed.off_loopback(), Some("0.0.0.0:25".parse().unwrap()));
    assert!(
        exposed
            .describe()
            .contains("serve refuses to run (0.0.0.0:25 is not loopback)")
    );
    let local = parse("[[listener]]\naddress = \"[::ffff:127.0.0.1]:25\"\n").unwrap();
    assert_eq!(local.off_loopback(), None);
    let metrics = parse("[metrics]\naddress = \"192.0.2.1:9187\"\n").unwrap();
    assert_eq!(
        metrics.off_loopback(),
        Some("192.0.2.1:9187".parse().unwrap())
    );
    assert!(
        parse("allow_root = true\n[[listener]]\naddress = \"0.0.0.0:25\"\n")
            .unwrap()
            .describe()
            .contains("allow_root = true")
    );
}

#[test]
fn config_milters() {
    let c = parse(
        r#"
[[milter]]
name = "rspamd"
address = "127.0.0.1:11332"

[[milter]]
name = "clamav"
address = "unix:/run/clamav/clamav-milter.ctl"
clients = "untrusted"
connect_timeout = "2s"
timeout = "1m"
on_failure = "accept"
pool_size = 0
pool_idle_timeout = "2m"

[[milter]]
name = "dkim"
address = "[::1]:8891"
clients = "relayed"
"#,
    )
    .unwrap();
    assert_eq!(c.milters.len(), 3);
    let m = &c.milters[0];
    assert_eq!(m.address, MilterAddress::Tcp("127.0.0.1:11332".into()));
    assert_eq!(
        (m.clients, m.connect_timeout, m.timeout, m.on_failure),
        (MilterClients::Any, secs(5), secs(30), OnFailure::Tempfail)
    );
    assert_eq!((m.pool_size, m.pool_idle_timeout), (32, secs(10)));
    let m = &c.milters[1];
    assert_eq!(
        m.address,
        MilterAddress::Unix("/run/clamav/clamav-milter.ctl".into())
    );
    assert_eq!(
        (m.clients, m.connect_timeout, m.timeout, m.on_failure),
        (
            MilterClients::Untrusted,
            secs(2),
            secs(60),
            OnFailure::Accept
        )
    );
    assert_eq!((m.pool_size, m.pool_idle_timeout), (0, secs(120)));
    assert_eq!(c.milters[2].clients, MilterClients::Relayed);
    assert!(MilterClients::Relayed.applies(true) && !MilterClients::Relayed.applies(false));
    assert!(!MilterClients::Untrusted.applies(true) && MilterClients::Any.applies(true));
    assert!(Config::builtin_defaults().milters.is_empty());

    for (text, want) in [
        (
            "name = \"a\"\naddress = \"localhost\"",
            "not a milter address",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:0\"",
            "not a milter address",
        ),
        ("name = \"a\"\naddress = \"unix:\"", "needs a socket path"),
        (
            "name = \"\"\naddress = \"127.0.0.1:1\"",
            "must not be empty",
        ),
        (
            "name = \"a b\"\naddress = \"127.0.0.1:1\"",
            "letters, digits",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\ntimeout = \"0s\"",
            "greater than zero",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\nclients = \"some\"",
            "clients",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\non_failure = \"drop\"",
            "on_failure",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\nmacros = []",
            "unknown key `macros` in [milter]",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\npool_size = 1001",
            "milter.pool_size: must be at most 1000",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\npool_size = -1",
            "must be at least 0",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\npool_idle_timeout = \"0s\"",
            "greater than zero",
        ),
        (
            "name = \"a\"\naddress = \"127.0.0.1:1\"\npool_idle_timeout = \"2h\"",
            "must be at most 1h",
        ),
    ] {
        let err = parse_err(&format!("[[milter]]\n{text}\n"));
        assert!(err.contains(want), "{text}: {err}");
    }
    let err = parse_err(
        "[[milter]]\nname = \"a\"\naddress = \"127.0.0.1:1\"\n\
         [[milter]]\nname = \"a\"\naddress = \"127.0.0.1:2\"\n",
    );
    assert!(err.contains("another milter is already named `a`"), "{err}");
    assert!(err.contains("test.toml:5"), "{err}");
}

#[test]
fn config_authentication_defaults_off_and_is_described() {
    let c = parse("").unwrap();
    assert_eq!(c.authentication, Authentication::default());
    assert!(!c.authentication.any());
    assert!(
        c.describe()
            .contains("inbound checks (untrusted, unauthenticated clients): none")
    );
    let c = parse(
        "hostname = \"relay.example.net\"\n[authentication]\nspf = true\ndkim = true\n\
         dmarc = true\ndmarc_enforce = true\nspf_reject = false\n",
    )
    .unwrap();
    assert_eq!(
        c.authentication,
        Authentication {
            spf: true,
            dkim: true,
            dmarc: true,
            dmarc_enforce: true,
            spf_reject: false,
        }
    );
    assert!(c.describe().contains(
        "inbound checks (untrusted, unauthenticated clients): spf, dkim, dmarc (enforced: \
         p=reject refused, p=quarantine held); results in Authentication-Results: \
         relay.example.net"
    ));
    let err = parse_err("[authentication]\nspf_reject = true\n");
    assert!(
        err.contains("test.toml:2:14: authentication.spf_reject"),
        "{err}"
    );
    let old = parse("").unwrap();
    let new = parse("[authentication]\nspf = true\n").unwrap();
    assert_eq!(changes(&old, &new).changed, ["authentication"]);
    assert_eq!(new.unsupported_features(), Vec::<String>::new());
}

#[test]
fn config_cluster_section() {
    let c = parse(
        "[cluster]\nredis = \"rediss://postern:hunter2@redis.internal:6380/2\"\nnode = \"edge-1\"\n",
    )
    .unwrap();
    let k = c.cluster.as_ref().unwrap();
    assert_eq!(k.node, "edge-1");
    assert_eq!(k.timeout, Duration::from_millis(200));
    assert_eq!(k.shown_url(), "rediss://postern:***@redis.internal:6380/2");
    // Neither check-config's words nor a debug print of the whole configuration show it.
    assert!(!c.describe().contains("hunter2"), "{}", c.describe());
    assert!(
        c.describe()
            .contains("cluster: node edge-1, AUTH lockouts and rate-limit counters shared through rediss://postern:***@redis.internal:6380/2"),
        "{}",
        c.describe()
    );
    assert!(!format!("{c:?}").contains("hunter2"));
    // Nor an error about the URL.
    let err = parse_err("[cluster]\nredis = \"redis://:hunter2@/0\"\n");
    assert!(!err.contains("hunter2"), "{err}");

    let c = parse("[cluster]\nredis = \"redis://127.0.0.1:6379\"\ntimeout = \"50ms\"\n").unwrap();
    let k = c.cluster.unwrap();
    assert_eq!(k.node, validate::default_hostname());
    assert_eq!(k.timeout, Duration::from_millis(50));
    assert!(parse("").unwrap().cluster.is_none());
    assert!(parse("").unwrap().describe().contains("cluster: off"));
}

#[test]
fn config_redis_urls_are_redacted() {
    for (url, shown) in [
        ("redis://127.0.0.1:6379/0", "redis://127.0.0.1:6379/0"),
        ("redis://:pw@h:1/0", "redis://:***@h:1/0"),
        ("redis://user:pw@h:1/0", "redis://user:***@h:1/0"),
        ("rediss://user:p@ss:w@rd@h:1", "rediss://user:***@h:1"),
        ("redis://lonely@h", "redis://***@h"),
        ("no url at all", "***"),
    ] {
        assert_eq!(redact_url(url), shown, "{url}");
    }
}

#[test]
fn config_cluster_changes_are_noted() {
    let old = parse("").unwrap();
    let new = parse("[cluster]\nredis = \"redis://127.0.0.1:6379\"\n").unwrap();
    let c = changes(&old, &new);
    assert_eq!(c.changed, ["cluster"]);
    assert!(c.need_restart.is_empty());
}
