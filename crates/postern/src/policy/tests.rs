//! The policy checked against the golden table in testdata/policy/relay.golden.

use super::*;
use crate::config::Relay;

fn list(s: &str) -> Vec<&str> {
    if s == "-" {
        Vec::new()
    } else {
        s.split(',').collect()
    }
}

fn policy_from(line: &str) -> RelayPolicy {
    let mut relay = Relay {
        accepted_domains: Vec::new(),
        trusted_networks: Vec::new(),
        authenticated_relay: false,
        open_relay: false,
        recipients_file: None,
        dnsbl: Vec::new(),
    };
    let mut recipients = None;
    for field in line.split_whitespace().skip(1) {
        let (k, v) = field.split_once('=').expect("key=value");
        match k {
            "accepted" => relay.accepted_domains = list(v).iter().map(|s| s.to_string()).collect(),
            "trusted" => {
                relay.trusted_networks = list(v).iter().map(|s| s.parse().unwrap()).collect()
            }
            "auth_relay" => relay.authenticated_relay = v == "yes",
            "open" => relay.open_relay = v == "yes",
            "recipients" if v != "-" => {
                recipients = Some(RecipientList::parse(&list(v).join("\n")).unwrap())
            }
            "recipients" => {}
            other => panic!("unknown policy key {other}"),
        }
    }
    RelayPolicy::new(&relay, recipients)
}

fn outcome(d: &Decision) -> String {
    match d {
        Decision::Accept(rule) => format!("accept {rule}"),
        Decision::Refuse(rule, reply) => {
            format!("{} {} {rule}", reply.code, reply.status.unwrap())
        }
    }
}

#[test]
fn golden_table() {
    let path = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../../testdata/policy/relay.golden"
    );
    let text = std::fs::read_to_string(path).unwrap();
    let mut policy = None;
    let mut cases = 0;
    let mut failures = Vec::new();
    for (n, line) in text.lines().enumerate() {
        let line = line.trim();
        if line.is_empty() || line.starts_with('#') {
            continue;
        }
        if line.starts_with("policy ") {
            policy = Some(policy_from(line));
            continue;
        }
        let (case, want) = line.split_once(" -> ").expect("case -> outcome");
        let mut ip = None;
        let mut auth = None;
        let mut dnsbl = None;
        // The path is last and may hold spaces (a quoted local part).
        let (case, rcpt) = case.split_once(" rcpt=").expect("rcpt= last");
        for field in case.split_whitespace() {
            let (k, v) = field.split_once('=').unwrap();
            match k {
                "client" => ip = Some(v.parse::<IpAddr>().unwrap()),
                "auth" => auth = (v != "-").then_some(v),
                "dnsbl" => dnsbl = (v != "-").then_some(v),
                other => panic!("line {}: unknown field {other}", n + 1),
            }
        }
        let addr = postern_smtp::address::parse_path(rcpt)
            .unwrap_or_else(|e| panic!("line {}: {rcpt}: {e:?}", n + 1));
        let client = Client {
            ip: ip.unwrap(),
            authenticated: auth,
            dnsbl,
        };
        let got = outcome(
            &policy
                .as_ref()
                .expect("policy line first")
                .decide(client, &addr),
        );
        cases += 1;
        if got != want {
            failures.push(format!(
                "line {}: {case}\n   want {want}\n    got {got}",
                n + 1
            ));
        }
    }
    assert!(cases > 30, "only {cases} cases read");
    assert!(failures.is_empty(), "\n{}", failures.join("\n"));
}

#[test]
fn recipient_list_errors_name_the_line() {
    let err = RecipientList::parse("# c\nalice@a.test\nnot an address\n").unwrap_err();
    assert_eq!(err.0, 3);
    assert!(RecipientList::parse("@bad..domain").is_err());
}

#[test]
fn client_block_keeps_ipv4_and_masks_ipv6() {
    use super::client_block;
    let ip = |s: &str| s.parse::<std::net::IpAddr>().unwrap();
    assert_eq!(client_block(ip("192.0.2.7"), 64), ip("192.0.2.7"));
    assert_eq!(client_block(ip("::ffff:192.0.2.7"), 64), ip("192.0.2.7"));
    assert_eq!(
        client_block(ip("2001:db8:1:2:3:4:5:6"), 64),
        ip("2001:db8:1:2::")
    );
    assert_eq!(
        client_block(ip("2001:db8:1:2:3:4:5:6"), 48),
        ip("2001:db8:1::")
    );
    assert_eq!(client_block(ip("2001:db8::1"), 128), ip("2001:db8::1"));
    assert_eq!(client_block(ip("2001:db8::1"), 0), ip("::"));
}

#[test]
fn facts_come_first_in_their_order() {
    let policy = policy_from(
        "policy accepted=accepted.test trusted=10.0.0.0/8 auth_relay=yes open=no recipients=-",
    );
    let rcpt = postern_smtp::address::parse_path("<u@other.test>").unwrap();
    let client = Client {
        ip: "10.0.0.1".parse().unwrap(),
        authenticated: Some("alice"),
        dnsbl: None,
    };
    let rule = |facts: Facts| policy.decide_with(client, &rcpt, facts).rule();
    assert_eq!(rule(Facts::default()), Rule::TrustedNetwork);
    let all = Facts {
        sender_not_owned: true,
        postmaster: true,
        literal_is_us: true,
    };
    assert_eq!(rule(all), Rule::SenderNotOwned);
    assert_eq!(
        rule(Facts {
            sender_not_owned: false,
            ..all
        }),
        Rule::Postmaster
    );
    assert_eq!(
        rule(Facts {
            literal_is_us: true,
            ..Facts::default()
        }),
        Rule::LiteralIsUs
    );
}

/// The RCPT TO argument as the session's command parser reads it (None: a syntax
/// error, refused before any policy is asked).
fn rcpt_address(to: &str) -> Option<postern_smtp::Address> {
    match postern_smtp::command::parse(format!("RCPT TO:{to}").as_bytes()) {
        Ok(postern_smtp::command::Command::Rcpt { to, .. }) => Some(to),
        _ => None,
    }
}

#[test]
fn no_relay_trick_is_relayed_by_a_policy_with_accepted_domains() {
    use super::tricks::{TRICKS, Targets, is_relayed};
    let policy = policy_from(
        "policy accepted=accepted.test,company.test trusted=10.0.0.0/8 auth_relay=yes open=no recipients=-",
    );
    let targets = Targets {
        accepted: "accepted.test".into(),
        outside: "outside.example".into(),
        hostname: "relay.test".into(),
    };
    let outsider = Client {
        ip: "192.0.2.1".parse().unwrap(),
        authenticated: None,
        dnsbl: None,
    };
    let mut decided = 0;
    let mut relayed = Vec::new();
    for trick in TRICKS {
        let to = trick.to_path(&targets);
        let Some(addr) = rcpt_address(&to) else {
            continue;
        };
        let decision = policy.decide(outsider, &addr);
        decided += 1;
        if is_relayed(&policy, &addr, &decision, false) {
            relayed.push(format!("{}: {to} -> {decision:?}", trick.name));
        }
    }
    assert!(relayed.is_empty(), "relayed:\n{}", relayed.join("\n"));
    // Most tricks reach the policy (the rest are syntax errors at the SMTP layer).
    assert!(decided >= 30, "only {decided} of {} decided", TRICKS.len());

    // The check can fail: the same tricks through an open relay, or from a trusted
    // client, are relayed.
    let open =
        policy_from("policy accepted=accepted.test trusted=- auth_relay=no open=yes recipients=-");
    let trusted = Client {
        ip: "10.0.0.1".parse().unwrap(),
        ..outsider
    };
    let count = |policy: &RelayPolicy, client: Client<'_>| {
        TRICKS
            .iter()
            .filter_map(|t| rcpt_address(&t.to_path(&targets)))
            .filter(|a| is_relayed(policy, a, &policy.decide(client, a), false))
            .count()
    };
    assert!(count(&open, outsider) >= 10, "open relay");
    assert!(count(&policy, trusted) >= 20, "trusted client");
}

#[test]
fn accepting_a_plain_mailbox_of_an_accepted_domain_is_not_relaying() {
    use super::tricks::is_relayed;
    let policy =
        policy_from("policy accepted=accepted.test trusted=- auth_relay=no open=no recipients=-");
    let accept = Decision::Accept(Rule::AcceptedDomain);
    let addr = |s: &str| postern_smtp::address::parse_path(s).unwrap();
    assert!(!is_relayed(
        &policy,
        &addr("<u@Accepted.Test.>"),
        &accept,
        false
    ));
    assert!(!is_relayed(
        &policy,
        &addr("<@other.test:u@accepted.test>"),
        &accept,
        false
    ));
    assert!(is_relayed(
        &policy,
        &addr("<u%other.test@accepted.test>"),
        &accept,
        false
    ));
    assert!(is_relayed(
        &policy,
        &addr("<\"u@other.test\"@accepted.test>"),
        &accept,
        false
    ));
    assert!(is_relayed(&policy, &addr("<u@other.test>"), &accept, false));
    assert!(is_relayed(
        &policy,
        &addr("<u@[192.0.2.1]>"),
        &accept,
        false
    ));
    // The configured postmaster the session put in place of <Postmaster>.
    assert!(!is_relayed(
        &policy,
        &addr("<admin@other.test>"),
        &accept,
        true
    ));
    let refuse = Decision::Refuse(Rule::RelayDenied, catalogue::relay_denied());
    assert!(!is_relayed(
        &policy,
        &addr("<u@other.test>"),
        &refuse,
        false
    ));
}

#[test]
fn trick_targets_are_filled_in() {
    use super::tricks::{TRICKS, Targets};
    let t = Targets {
        accepted: "accepted.test".into(),
        outside: "outside.example".into(),
        hostname: "relay.test".into(),
    };
    let to = |name: &str| TRICKS.iter().find(|x| x.name == name).unwrap().to_path(&t);
    assert_eq!(to("percent hack"), "<user%outside.example@accepted.test>");
    assert_eq!(to("UTF-8 look-alike domain"), "<user@\u{430}ccepted.test>");
    assert!(to("IDNA look-alike domain").starts_with("<user@xn--"));
    assert_eq!(
        to("ideographic full stops"),
        "<user@outside\u{3002}example>"
    );
    for trick in TRICKS {
        let (from, to) = (trick.from_path(&t), trick.to_path(&t));
        assert!(!from.contains('{') && !to.contains('{'), "{}", trick.name);
        assert!(!trick.tests.is_empty());
    }
    let names: std::collections::HashSet<_> = TRICKS.iter().map(|t| t.name).collect();
    assert_eq!(names.len(), TRICKS.len(), "names are unique");
}
