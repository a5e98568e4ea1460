//! The checks against the test kit's DNS responder: every SPF result, DKIM with messages
//! signed by Postern's own signer (then tampered), DMARC policies and alignment.

use std::net::{IpAddr, Ipv4Addr};
use std::path::PathBuf;

use postern_testkit::DnsServer;

use super::*;
use crate::config::{Authentication, Config, DKIM_HEADERS, DkimSigning};
use crate::dkim::Signer;
use crate::dkim::key::{self, Algorithm};

const HOST: &str = "relay.example.net";
const GOOD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1));
const BAD_IP: IpAddr = IpAddr::V4(Ipv4Addr::new(198, 51, 100, 7));

const ALL: Authentication = Authentication {
    spf: true,
    dkim: true,
    dmarc: true,
    dmarc_enforce: true,
    spf_reject: false,
};

fn checker(dns: &DnsServer, settings: Authentication) -> Checker {
    let mut c = Config::builtin_defaults();
    c.delivery.dns_servers = vec![dns.addr()];
    c.authentication = settings;
    Checker::new(&c).unwrap()
}

fn facts<'a>(ip: IpAddr, helo: &'a str, mail_from: Option<&'a str>) -> ClientFacts<'a> {
    ClientFacts {
        ip,
        helo,
        mail_from,
        hostname: HOST,
    }
}

fn message(from: &str) -> Vec<u8> {
    format!(
        "From: Alice <alice@{from}>\r\nTo: bob@company.example\r\nSubject: test\r\n\
         Date: Wed, 2 Dec 2026 01:00:00 +0000\r\nMessage-ID: <1@{from}>\r\n\r\nHello\r\n"
    )
    .into_bytes()
}

/// An Ed25519 `[[dkim]]` for `domain`, its key published in `dns`.
struct Signing {
    signer: Signer,
    _dir: tempfile::TempDir,
}

fn signing(dns: &DnsServer, domain: &str, selector: &str, subdomains: bool) -> Signing {
    let dir = tempfile::tempdir().unwrap();
    let (pem, k) = key::generate(Algorithm::Ed25519, 0).unwrap();
    let path: PathBuf = dir.path().join("key.pem");
    std::fs::write(&path, pem).unwrap();
    dns.add_txt(
        &format!("{selector}._domainkey.{domain}"),
        &key::record_text(&k),
    );
    let signer = Signer::new(&[DkimSigning {
        domain: domain.to_string(),
        selector: selector.to_string(),
        key: path,
        subdomains,
        headers: DKIM_HEADERS.iter().map(|h| h.to_string()).collect(),
        expire: None,
    }])
    .unwrap();
    Signing { signer, _dir: dir }
}

fn signed(s: &Signing, msg: &[u8]) -> Vec<u8> {
    let out = s.signer.sign(msg);
    assert_eq!(out.made.len(), 1, "{:?}", out.failed);
    let mut v = out.fields.into_bytes();
    v.extend_from_slice(msg);
    v
}

fn spf_only() -> Authentication {
    Authentication {
        spf: true,
        ..Authentication::default()
    }
}

async fn spf_result(dns: &DnsServer, ip: IpAddr) -> Verdict {
    checker(dns, spf_only())
        .check(
            &facts(ip, "mta.a.example", Some("alice@a.example")),
            &message("a.example"),
        )
        .await
}

// ---- SPF ----

#[tokio::test]
async fn spf_pass_and_fail_with_reason() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.0/24 -all");
    let v = spf_result(&dns, GOOD_IP).await;
    assert_eq!(v.spf, Some(Outcome::Pass));
    assert_eq!(
        v.header,
        "Authentication-Results: relay.example.net;\r\n\tspf=pass smtp.mailfrom=a.example\r\n"
    );
    assert_eq!(v.log_fields(), "spf=pass dkim=off dmarc=off");
    let v = spf_result(&dns, BAD_IP).await;
    assert_eq!(v.spf, Some(Outcome::Fail));
    assert_eq!(
        v.header,
        "Authentication-Results: relay.example.net;\r\n\tspf=fail reason=\"198.51.100.7 is \
         not allowed by a.example's SPF record\" smtp.mailfrom=a.example\r\n"
    );
    // Without spf_reject, a fail is only reported.
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn spf_softfail_neutral_none() {
    for (record, expected) in [
        (Some("v=spf1 ip4:203.0.113.0/24 ~all"), Outcome::SoftFail),
        (Some("v=spf1 ip4:203.0.113.0/24 ?all"), Outcome::Neutral),
        // No SPF record, only another TXT: none.
        (Some("some-site-verification=abc"), Outcome::None),
        (None, Outcome::None),
    ] {
        let dns = DnsServer::start();
        dns.add_a("a.example", Ipv4Addr::new(203, 0, 113, 9));
        if let Some(r) = record {
            dns.add_txt("a.example", r);
        }
        let v = spf_result(&dns, GOOD_IP).await;
        assert_eq!(v.spf, Some(expected), "{record:?}: {}", v.header);
        assert!(
            v.header.contains(&format!("spf={}", expected.as_str())),
            "{}",
            v.header
        );
    }
}

#[tokio::test]
async fn spf_permerror_for_syntax_and_too_many_lookups() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4 -all");
    let v = spf_result(&dns, GOOD_IP).await;
    assert_eq!(v.spf, Some(Outcome::PermError), "{}", v.header);
    assert!(
        v.header
            .contains("reason=\"a.example's SPF record cannot be evaluated")
    );

    // RFC 7208 4.6.4: eleven mechanisms that each need a lookup.
    let dns = DnsServer::start();
    let mut record = "v=spf1".to_string();
    for i in 1..=11 {
        let h = format!("h{i}.a.example");
        dns.add_a(&h, Ipv4Addr::new(203, 0, 113, i));
        record.push_str(&format!(" a:{h}"));
    }
    record.push_str(" ip4:192.0.2.1 -all");
    dns.add_txt("a.example", &record);
    let v = spf_result(&dns, GOOD_IP).await;
    assert_eq!(v.spf, Some(Outcome::PermError), "{}", v.header);
    assert!(
        v.header.contains(
            "reason=\"a.example's SPF record cannot be evaluated: too many DNS lookups \
             (more than 10, RFC 7208 4.6.4)\""
        ),
        "{}",
        v.header
    );

    // An unknown mechanism, and an ip4 prefix over 32 (mail-auth took both).
    for record in ["v=spf1 foo:a.example -all", "v=spf1 ip4:192.0.2.0/33 +all"] {
        dns.clear("a.example");
        dns.add_txt("a.example", record);
        let v = spf_result(&dns, GOOD_IP).await;
        assert_eq!(v.spf, Some(Outcome::PermError), "{record}: {}", v.header);
        assert!(
            v.header
                .contains("cannot be evaluated: syntax error in the SPF record of a.example"),
            "{}",
            v.header
        );
    }
}

#[tokio::test]
async fn spf_temperror_is_never_refused() {
    let dns = DnsServer::start();
    dns.servfail("a.example");
    let settings = Authentication {
        spf_reject: true,
        ..spf_only()
    };
    let v = checker(&dns, settings)
        .check(
            &facts(GOOD_IP, "mta.a.example", Some("alice@a.example")),
            &message("a.example"),
        )
        .await;
    assert_eq!(v.spf, Some(Outcome::TempError));
    assert!(
        v.header.contains(
            "spf=temperror reason=\"a DNS lookup failed temporarily while evaluating \
             a.example's SPF record (lookup of a.example failed: "
        ),
        "{}",
        v.header
    );
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn spf_reject_refuses_a_fail() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.0/24 -all");
    let settings = Authentication {
        spf_reject: true,
        ..spf_only()
    };
    let c = checker(&dns, settings);
    let v = c
        .check(
            &facts(BAD_IP, "mta.a.example", Some("alice@a.example")),
            &message("a.example"),
        )
        .await;
    let Action::Reject(reply) = &v.action else {
        panic!("{:?}", v.action)
    };
    assert_eq!(
        reply.one_line(),
        "550 5.7.23 SPF check failed: 198.51.100.7 is not allowed to send mail for a.example"
    );
    // softfail is not refused.
    dns.clear("a.example");
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.0/24 ~all");
    let v = c
        .check(
            &facts(BAD_IP, "mta.a.example", Some("alice@a.example")),
            &message("a.example"),
        )
        .await;
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn spf_helo_identity_for_the_null_sender() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 -all");
    dns.add_txt("mta.b.example", "v=spf1 ip4:192.0.2.1 -all");
    let c = checker(&dns, spf_only());
    let v = c
        .check(
            &facts(GOOD_IP, "mta.b.example", None),
            &message("a.example"),
        )
        .await;
    assert_eq!(v.spf, Some(Outcome::Pass), "{}", v.header);
    assert!(
        v.header.contains("spf=pass smtp.helo=mta.b.example"),
        "{}",
        v.header
    );
    let v = c
        .check(&facts(BAD_IP, "mta.b.example", None), &message("a.example"))
        .await;
    assert_eq!(v.spf, Some(Outcome::Fail));
    assert!(v.header.contains("smtp.helo=mta.b.example"), "{}", v.header);
}

/// Every lookup kind through `crate::dns` against the responder: MX without an
/// implicit MX, PTR validated forward, AAAA for an IPv6 client, the void limit.
#[tokio::test]
async fn spf_mechanisms_through_the_resolver() {
    let dns = DnsServer::start();
    dns.add_mx("mx.example", 10, "out.mx.example");
    dns.add_a("out.mx.example", Ipv4Addr::new(192, 0, 2, 1));
    dns.add_txt("mx.example", "v=spf1 mx -all");
    // An A record but no MX: `mx` does not match (RFC 7208 5.4).
    dns.add_a("nomx.example", Ipv4Addr::new(192, 0, 2, 1));
    dns.add_txt("nomx.example", "v=spf1 mx -all");
    dns.add_ptr("1.2.0.192.in-addr.arpa", "host.ptr.example");
    dns.add_a("host.ptr.example", Ipv4Addr::new(192, 0, 2, 1));
    dns.add_txt("ptr.example", "v=spf1 ptr -all");
    dns.add_aaaa("six.example", "2001:db8::1".parse().unwrap());
    dns.add_txt("six.example", "v=spf1 a//64 -all");
    dns.add_txt(
        "void.example",
        "v=spf1 exists:a.nx.example exists:b.nx.example exists:c.nx.example +all",
    );
    let c = checker(&dns, spf_only());
    let six: IpAddr = "2001:db8::beef".parse().unwrap();
    for (ip, domain, expected) in [
        (GOOD_IP, "mx.example", Outcome::Pass),
        (BAD_IP, "mx.example", Outcome::Fail),
        (GOOD_IP, "nomx.example", Outcome::Fail),
        (GOOD_IP, "ptr.example", Outcome::Pass),
        (BAD_IP, "ptr.example", Outcome::Fail),
        (six, "six.example", Outcome::Pass),
        (GOOD_IP, "six.example", Outcome::Fail),
        (GOOD_IP, "void.example", Outcome::PermError),
    ] {
        let from = format!("x@{domain}");
        let v = c
            .check(&facts(ip, "mta.example", Some(&from)), &message(domain))
            .await;
        assert_eq!(v.spf, Some(expected), "{ip} {domain}: {}", v.header);
    }
}

// ---- DKIM ----

fn dkim_only() -> Authentication {
    Authentication {
        dkim: true,
        ..Authentication::default()
    }
}

#[tokio::test]
async fn dkim_pass_fail_none() {
    let dns = DnsServer::start();
    let s = signing(&dns, "a.example", "s1", false);
    let c = checker(&dns, dkim_only());
    let f = facts(GOOD_IP, "mta.a.example", Some("alice@a.example"));
    let good = signed(&s, &message("a.example"));

    let v = c.check(&f, &good).await;
    assert_eq!(v.dkim, Some(Outcome::Pass), "{}", v.header);
    assert_eq!(
        v.header,
        "Authentication-Results: relay.example.net;\r\n\tdkim=pass header.d=a.example \
         header.s=s1\r\n"
    );

    // The body changed after signing.
    let mut body = good.clone();
    body.splice(body.len() - 7.., b"Hellx\r\n".iter().copied());
    let v = c.check(&f, &body).await;
    assert_eq!(v.dkim, Some(Outcome::Fail), "{}", v.header);
    assert!(
        v.header.contains("reason=\"the body hash does not match"),
        "{}",
        v.header
    );

    // A signed header changed.
    let text = String::from_utf8(good.clone()).unwrap();
    let v = c
        .check(
            &f,
            text.replace("Subject: test", "Subject: tesT").as_bytes(),
        )
        .await;
    assert_eq!(v.dkim, Some(Outcome::Fail), "{}", v.header);
    assert!(
        v.header
            .contains("dkim=fail reason=\"the signature does not verify")
    );

    // Not signed at all.
    let v = c.check(&f, &message("a.example")).await;
    assert_eq!(v.dkim, Some(Outcome::None));
    assert!(v.header.ends_with("\tdkim=none\r\n"), "{}", v.header);
}

/// Signs `msg` with dkimpy (testdata/dkim/sign.py), an RSA-2048 key made here and
/// published in `dns`.
fn signed_by_dkimpy(dns: &DnsServer, domain: &str, selector: &str, msg: &[u8]) -> Vec<u8> {
    use std::io::Write;
    use std::process::{Command, Stdio};
    let dir = tempfile::tempdir().unwrap();
    let (pem, k) = key::generate(Algorithm::Rsa, 2048).unwrap();
    let path = dir.path().join("key.pem");
    std::fs::write(&path, pem).unwrap();
    dns.add_txt(
        &format!("{selector}._domainkey.{domain}"),
        &key::record_text(&k),
    );
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../testdata/dkim/sign.py");
    let mut child = Command::new("/usr/bin/python3")
        .arg(script)
        .arg(&path)
        .arg(domain)
        .arg(selector)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .expect("python3-dkim (scripts/test installs it)");
    child.stdin.take().unwrap().write_all(msg).unwrap();
    let out = child.wait_with_output().unwrap();
    assert!(out.status.success(), "sign.py failed");
    assert!(out.stdout.starts_with(b"DKIM-Signature:"));
    out.stdout
}

#[tokio::test]
async fn dkim_verifies_an_independent_signer() {
    let dns = DnsServer::start();
    let msg = signed_by_dkimpy(&dns, "a.example", "py", &message("a.example"));
    let c = checker(&dns, dkim_only());
    let f = facts(GOOD_IP, "mta.a.example", None);
    let v = c.check(&f, &msg).await;
    assert_eq!(v.dkim, Some(Outcome::Pass), "{}", v.header);
    assert!(
        v.header
            .contains("dkim=pass header.d=a.example header.s=py")
    );
    let tampered = String::from_utf8(msg).unwrap().replace("Hello", "Hullo");
    let v = c.check(&f, tampered.as_bytes()).await;
    assert_eq!(v.dkim, Some(Outcome::Fail), "{}", v.header);
}

#[tokio::test]
async fn dkim_missing_key_and_dns_failure() {
    let dns = DnsServer::start();
    let s = signing(&dns, "a.example", "s1", false);
    let c = checker(&dns, dkim_only());
    let f = facts(GOOD_IP, "mta.a.example", Some("alice@a.example"));
    let msg = signed(&s, &message("a.example"));
    dns.clear("s1._domainkey.a.example");
    let v = c.check(&f, &msg).await;
    assert_eq!(v.dkim, Some(Outcome::PermError), "{}", v.header);
    assert!(
        v.header
            .contains("reason=\"no usable key at s1._domainkey.a.example\"")
    );
    dns.servfail("s1._domainkey.a.example");
    let v = c.check(&f, &msg).await;
    assert_eq!(v.dkim, Some(Outcome::TempError), "{}", v.header);
}

#[tokio::test]
async fn every_signature_is_reported() {
    let dns = DnsServer::start();
    let a = signing(&dns, "a.example", "s1", false);
    let b = signing(&dns, "a.example", "s2", false);
    let msg = signed(&b, &signed(&a, &message("a.example")));
    // The s2 key no longer matches: one pass, one fail.
    dns.clear("s2._domainkey.a.example");
    let other = signing(&dns, "a.example", "s2", false);
    drop(other);
    let v = checker(&dns, dkim_only())
        .check(&facts(GOOD_IP, "mta.a.example", None), &msg)
        .await;
    assert_eq!(v.dkim, Some(Outcome::Pass));
    assert_eq!(v.header.matches("dkim=").count(), 2, "{}", v.header);
    assert!(
        v.header
            .contains("dkim=pass header.d=a.example header.s=s1")
    );
    assert!(v.header.contains("dkim=fail reason="), "{}", v.header);
}

#[tokio::test]
async fn signatures_beyond_the_limit_are_not_verified() {
    let dns = DnsServer::start();
    let s = signing(&dns, "a.example", "s1", false);
    let mut msg = message("a.example");
    for _ in 0..MAX_SIGNATURES + 3 {
        msg = signed(&s, &msg);
    }
    let v = checker(&dns, dkim_only())
        .check(&facts(GOOD_IP, "mta.a.example", None), &msg)
        .await;
    assert_eq!(v.dkim, Some(Outcome::Pass));
    assert_eq!(
        v.header.matches("dkim=pass").count(),
        MAX_SIGNATURES,
        "{}",
        v.header
    );
    assert!(
        v.header
            .contains("dkim=neutral reason=\"3 more signatures not verified (at most 10)\""),
        "{}",
        v.header
    );
    let key_lookups = dns
        .queries()
        .iter()
        .filter(|(n, _)| n == "s1._domainkey.a.example")
        .count();
    assert!(key_lookups <= MAX_SIGNATURES, "{key_lookups}");
}

/// Malformed signatures (mail-auth reports each one as a result of its own) count toward
/// the same limit: thousands of them make a field of a bounded size.
#[tokio::test]
async fn malformed_signatures_do_not_grow_the_field() {
    let dns = DnsServer::start();
    let bad =
        "DKIM-Signature: v=1; a=rsa-sha256; d=a.example; s=s1; h=from; bh=AAAA; b=AAAA; l=5\r\n";
    let msg = [bad.repeat(5000).into_bytes(), message("a.example")].concat();
    let v = checker(&dns, dkim_only())
        .check(&facts(GOOD_IP, "mta.a.example", None), &msg)
        .await;
    assert!(
        v.header.matches("dkim=").count() <= MAX_SIGNATURES + 1,
        "{}",
        v.header.len()
    );
    assert!(v.header.len() < 8 * 1024, "{}", v.header.len());
}

// ---- DMARC ----

async fn dmarc_check(
    dns: &DnsServer,
    settings: Authentication,
    ip: IpAddr,
    mail_from: &str,
    msg: &[u8],
) -> Verdict {
    checker(dns, settings)
        .check(&facts(ip, "mta.example", Some(mail_from)), msg)
        .await
}

#[tokio::test]
async fn dmarc_pass_through_aligned_spf() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.1 -all");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    let v = dmarc_check(
        &dns,
        ALL,
        GOOD_IP,
        "bounce@a.example",
        &message("a.example"),
    )
    .await;
    assert_eq!(v.dmarc, Some(Outcome::Pass), "{}", v.header);
    assert_eq!(v.action, Action::Accept);
    assert_eq!(
        v.header,
        "Authentication-Results: relay.example.net;\r\n\tspf=pass smtp.mailfrom=a.example;\r\n\
         \tdkim=none;\r\n\tdmarc=pass header.from=a.example\r\n"
    );
    assert_eq!(v.log_fields(), "spf=pass dkim=none dmarc=pass");
}

#[tokio::test]
async fn dmarc_pass_through_aligned_dkim_when_spf_fails() {
    let dns = DnsServer::start();
    // Forwarded: the forwarder's address is not in the SPF record, the signature holds.
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.1 -all");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    let s = signing(&dns, "a.example", "s1", false);
    let msg = signed(&s, &message("a.example"));
    let v = dmarc_check(&dns, ALL, BAD_IP, "alice@a.example", &msg).await;
    assert_eq!(v.spf, Some(Outcome::Fail));
    assert_eq!(v.dkim, Some(Outcome::Pass));
    assert_eq!(v.dmarc, Some(Outcome::Pass), "{}", v.header);
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn dmarc_reject_enforced_or_only_reported() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.1 -all");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    // SPF passes for another domain: not aligned.
    dns.add_txt("other.example", "v=spf1 ip4:198.51.100.7 -all");
    let msg = message("a.example");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.spf, Some(Outcome::Pass));
    assert_eq!(v.dmarc, Some(Outcome::Fail), "{}", v.header);
    assert!(
        v.header.contains(
            "dmarc=fail reason=\"no SPF or DKIM pass aligned with a.example; its DMARC \
             policy is reject\" header.from=a.example"
        ),
        "{}",
        v.header
    );
    let Action::Reject(reply) = &v.action else {
        panic!("{:?}", v.action)
    };
    assert_eq!(
        reply.one_line(),
        "550 5.7.1 DMARC policy of a.example says reject"
    );

    let report_only = Authentication {
        dmarc_enforce: false,
        ..ALL
    };
    let v = dmarc_check(&dns, report_only, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.dmarc, Some(Outcome::Fail));
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn dmarc_quarantine_and_pct() {
    let dns = DnsServer::start();
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=quarantine");
    let msg = message("a.example");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(
        v.action,
        Action::Quarantine("DMARC policy of a.example says quarantine".to_string())
    );

    // pct=0: no message is sampled; reject becomes quarantine, quarantine none (RFC 7489
    // 6.6.4).
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject; pct=0");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert!(matches!(v.action, Action::Quarantine(_)), "{:?}", v.action);
    assert!(
        v.header.contains("pct=0: this message not sampled"),
        "{}",
        v.header
    );
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=quarantine; pct=0");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.dmarc, Some(Outcome::Fail));
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn dmarc_subdomain_policy() {
    let dns = DnsServer::start();
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject; sp=none");
    let sub = message("news.a.example");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &sub).await;
    assert_eq!(v.dmarc, Some(Outcome::Fail), "{}", v.header);
    assert!(v.header.contains("header.from=news.a.example"));
    assert_eq!(v.action, Action::Accept);
    // The organisational domain itself still gets p.
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &message("a.example")).await;
    assert!(matches!(v.action, Action::Reject(_)), "{:?}", v.action);

    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=none; sp=reject");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &sub).await;
    let Action::Reject(reply) = &v.action else {
        panic!("{:?}", v.action)
    };
    assert_eq!(
        reply.one_line(),
        "550 5.7.1 DMARC policy of news.a.example says reject"
    );
    // A subdomain's own record wins over the organisational domain's.
    dns.add_txt("_dmarc.news.a.example", "v=DMARC1; p=none");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &sub).await;
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn dmarc_relaxed_and_strict_alignment() {
    let dns = DnsServer::start();
    // Signed as d=a.example, From: news.a.example.
    let s = signing(&dns, "a.example", "s1", true);
    let msg = signed(&s, &message("news.a.example"));
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.dkim, Some(Outcome::Pass));
    assert_eq!(v.dmarc, Some(Outcome::Pass), "{}", v.header);
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject; adkim=s");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.dmarc, Some(Outcome::Fail), "{}", v.header);
    assert!(matches!(v.action, Action::Reject(_)));

    // SPF for a subdomain of the From: domain: relaxed aligns, aspf=s does not.
    dns.add_txt("bounce.a.example", "v=spf1 ip4:192.0.2.1 -all");
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    let plain = message("a.example");
    let v = dmarc_check(&dns, ALL, GOOD_IP, "x@bounce.a.example", &plain).await;
    assert_eq!(v.dmarc, Some(Outcome::Pass), "{}", v.header);
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject; aspf=s");
    let v = dmarc_check(&dns, ALL, GOOD_IP, "x@bounce.a.example", &plain).await;
    assert_eq!(v.dmarc, Some(Outcome::Fail), "{}", v.header);
}

#[tokio::test]
async fn dmarc_organizational_domain_under_a_multi_label_suffix() {
    let dns = DnsServer::start();
    dns.add_txt("_dmarc.example.co.uk", "v=DMARC1; p=reject");
    dns.add_txt("bounce.example.co.uk", "v=spf1 ip4:192.0.2.1 -all");
    let msg = message("a.b.example.co.uk");
    let v = dmarc_check(&dns, ALL, GOOD_IP, "x@bounce.example.co.uk", &msg).await;
    assert_eq!(v.dmarc, Some(Outcome::Pass), "{}", v.header);
    // Looked up at the From: domain, then at its organisational domain, never at co.uk.
    let asked: Vec<String> = dns
        .queries()
        .into_iter()
        .filter(|(n, t)| t == "TXT" && n.starts_with("_dmarc."))
        .map(|(n, _)| n)
        .collect();
    assert!(
        asked.contains(&"_dmarc.a.b.example.co.uk".to_string()),
        "{asked:?}"
    );
    assert!(
        asked.contains(&"_dmarc.example.co.uk".to_string()),
        "{asked:?}"
    );
    assert!(
        !asked
            .iter()
            .any(|n| n == "_dmarc.co.uk" || n == "_dmarc.b.example.co.uk")
    );
    // Not aligned: the record found at the organisational domain applies (sp = p).
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert!(matches!(v.action, Action::Reject(_)), "{:?}", v.action);
}

#[tokio::test]
async fn dmarc_dns_failures_are_temperror_and_never_refused() {
    let dns = DnsServer::start();
    dns.servfail("_dmarc.a.example");
    let msg = message("a.example");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &msg).await;
    assert_eq!(v.dmarc, Some(Outcome::TempError), "{}", v.header);
    assert_eq!(v.action, Action::Accept);

    // The aligned SPF check could not be done: no DMARC verdict either.
    dns.clear("_dmarc.a.example");
    dns.add_txt("_dmarc.a.example", "v=DMARC1; p=reject");
    dns.servfail("a.example");
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@a.example", &msg).await;
    assert_eq!(v.spf, Some(Outcome::TempError));
    assert_eq!(v.dmarc, Some(Outcome::TempError), "{}", v.header);
    assert_eq!(v.action, Action::Accept);
}

#[tokio::test]
async fn dmarc_none_without_a_record() {
    let dns = DnsServer::start();
    let v = dmarc_check(&dns, ALL, BAD_IP, "x@other.example", &message("a.example")).await;
    assert_eq!(v.dmarc, Some(Outcome::None));
    assert!(
        v.header.ends_with("\tdmarc=none header.from=a.example\r\n"),
        "{}",
        v.header
    );
    assert_eq!(v.action, Action::Accept);
}

// ---- DNS ----

#[tokio::test]
async fn spf_and_dkim_lookups_run_concurrently() {
    let dns = DnsServer::start();
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.1 -all");
    let s = signing(&dns, "a.example", "s1", false);
    let msg = signed(&s, &message("a.example"));
    let slow = std::time::Duration::from_millis(1000);
    dns.delay("a.example", slow);
    dns.delay("s1._domainkey.a.example", slow);
    let settings = Authentication {
        spf: true,
        dkim: true,
        ..Authentication::default()
    };
    let c = checker(&dns, settings);
    let started = std::time::Instant::now();
    let v = c
        .check(&facts(GOOD_IP, "mta.a.example", Some("x@a.example")), &msg)
        .await;
    let took = started.elapsed();
    assert_eq!((v.spf, v.dkim), (Some(Outcome::Pass), Some(Outcome::Pass)));
    // One after the other would take twice the delay at least.
    assert!(took >= slow && took < slow * 2, "{took:?}");
}

#[tokio::test]
async fn answers_are_cached_within_their_ttl() {
    let dns = DnsServer::start();
    dns.set_ttl(300);
    dns.add_txt("a.example", "v=spf1 ip4:192.0.2.1 -all");
    let c = checker(&dns, spf_only());
    let f = facts(GOOD_IP, "mta.a.example", Some("x@a.example"));
    for _ in 0..3 {
        assert_eq!(
            c.check(&f, &message("a.example")).await.spf,
            Some(Outcome::Pass)
        );
    }
    let asked = dns
        .queries()
        .iter()
        .filter(|(n, _)| n == "a.example")
        .count();
    assert_eq!(asked, 1);
}

// ---- The stored message ----

#[tokio::test]
async fn rewrite_puts_ours_on_top_and_drops_forgeries() {
    let dns = DnsServer::start();
    let c = checker(&dns, spf_only());
    let mut msg = b"Authentication-Results: relay.example.net; spf=pass\r\n\
                    Authentication-Results: mx.other.example; spf=pass\r\n"
        .to_vec();
    msg.extend_from_slice(&message("a.example"));
    let v = c
        .check(&facts(BAD_IP, "mta.a.example", Some("x@a.example")), &msg)
        .await;
    let out = String::from_utf8(v.rewrite(&msg)).unwrap();
    assert!(out.starts_with(&v.header));
    assert_eq!(out.matches("relay.example.net").count(), 1, "{out}");
    assert!(out.contains("Authentication-Results: mx.other.example; spf=pass\r\n"));
    assert!(out.ends_with("\r\n\r\nHello\r\n"));
}

#[test]
fn checker_is_send_sync_and_check_is_send() {
    fn send_sync<T: Send + Sync>() {}
    send_sync::<Checker>();
    fn is_send<T: Send>(_: &T) {}
    let c = checker(&DnsServer::start(), ALL);
    let f = facts(GOOD_IP, "h.example", None);
    let fut = c.check(&f, b"");
    is_send(&fut);
}
