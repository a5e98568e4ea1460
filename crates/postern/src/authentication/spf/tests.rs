//! `check_host()` over a fake DNS: include and redirect semantics (RFC 7208 5.2, 6.1), the
//! limits of 4.6.4, every mechanism, dual CIDR lengths, temperror propagation.

use std::collections::{HashMap, HashSet};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::sync::Mutex;
use std::time::Duration;

use super::*;

/// Records by name; a name with no records of any type is NXDOMAIN, `temp` names fail.
#[derive(Default)]
struct Fake {
    txt: HashMap<String, Vec<String>>,
    a: HashMap<String, Vec<Ipv4Addr>>,
    aaaa: HashMap<String, Vec<Ipv6Addr>>,
    mx: HashMap<String, Vec<String>>,
    ptr: HashMap<IpAddr, Vec<String>>,
    temp: HashSet<String>,
    slow: HashSet<String>,
    asked: Mutex<Vec<String>>,
}

impl Fake {
    fn txt(mut self, name: &str, text: &str) -> Self {
        self.txt.entry(name.into()).or_default().push(text.into());
        self
    }
    fn a(mut self, name: &str, ip: [u8; 4]) -> Self {
        self.a.entry(name.into()).or_default().push(ip.into());
        self
    }
    fn aaaa(mut self, name: &str, ip: &str) -> Self {
        self.aaaa
            .entry(name.into())
            .or_default()
            .push(ip.parse().unwrap());
        self
    }
    fn mx(mut self, name: &str, host: &str) -> Self {
        self.mx.entry(name.into()).or_default().push(host.into());
        self
    }
    fn ptr(mut self, ip: &str, name: &str) -> Self {
        self.ptr
            .entry(ip.parse().unwrap())
            .or_default()
            .push(name.into());
        self
    }
    fn temp(mut self, name: &str) -> Self {
        self.temp.insert(name.into());
        self
    }
    fn slow(mut self, name: &str) -> Self {
        self.slow.insert(name.into());
        self
    }

    fn exists(&self, name: &str) -> bool {
        self.txt.contains_key(name)
            || self.a.contains_key(name)
            || self.aaaa.contains_key(name)
            || self.mx.contains_key(name)
    }

    async fn answer<T: Clone>(
        &self,
        kind: &str,
        name: &str,
        map: &HashMap<String, Vec<T>>,
    ) -> Answer<T> {
        self.asked.lock().unwrap().push(format!("{kind} {name}"));
        if self.slow.contains(name) {
            tokio::time::sleep(Duration::from_secs(3600)).await;
        }
        if self.temp.contains(name) {
            return Err(DnsFailure::Temporary("SERVFAIL".into()));
        }
        if !self.exists(name) {
            return Err(DnsFailure::NxDomain);
        }
        Ok(map.get(name).cloned().unwrap_or_default())
    }

    fn asked(&self) -> Vec<String> {
        self.asked.lock().unwrap().clone()
    }
}

impl Dns for Fake {
    async fn txt(&self, name: &str) -> Answer<String> {
        self.answer("TXT", name, &self.txt).await
    }
    async fn a(&self, name: &str) -> Answer<Ipv4Addr> {
        self.answer("A", name, &self.a).await
    }
    async fn aaaa(&self, name: &str) -> Answer<Ipv6Addr> {
        self.answer("AAAA", name, &self.aaaa).await
    }
    async fn mx(&self, name: &str) -> Answer<String> {
        self.answer("MX", name, &self.mx).await
    }
    async fn ptr(&self, ip: IpAddr) -> Answer<String> {
        self.asked.lock().unwrap().push(format!("PTR {ip}"));
        match self.ptr.get(&ip) {
            Some(n) => Ok(n.clone()),
            None => Err(DnsFailure::NxDomain),
        }
    }
}

const V4: &str = "192.0.2.3";
const V6: &str = "2001:db8::cb01";

async fn run_as(dns: &Fake, ip: &str, sender: &str) -> Evaluation {
    let domain = sender.rsplit_once('@').map_or(sender, |(_, d)| d);
    let req = Request {
        ip: ip.parse().unwrap(),
        domain,
        sender,
        helo: "mta.example.org",
        receiver: "relay.example.net",
    };
    check_host(dns, &req, Duration::from_secs(20)).await
}

async fn run(dns: &Fake, ip: &str) -> Evaluation {
    run_as(dns, ip, "strong-bad@email.example.com").await
}

async fn result(dns: &Fake, ip: &str) -> SpfResult {
    run(dns, ip).await.result
}

const D: &str = "email.example.com";

#[tokio::test]
async fn basic_results_and_qualifiers() {
    for (record, expected) in [
        ("v=spf1 ip4:192.0.2.0/24 -all", SpfResult::Pass),
        ("v=spf1 -ip4:192.0.2.3 +all", SpfResult::Fail),
        ("v=spf1 ~all", SpfResult::SoftFail),
        ("v=spf1 ?all", SpfResult::Neutral),
        ("v=spf1", SpfResult::Neutral),
        ("v=spf1 ip4:198.51.100.0/24", SpfResult::Neutral),
        ("V=SPF1 IP4:192.0.2.3 -ALL", SpfResult::Pass),
        ("v=spf1 ip6:2001:db8::/32 -all", SpfResult::Fail),
        ("v=spf1 foo=bar ip4:192.0.2.3 -all", SpfResult::Pass),
        ("v=spf1 -all exp=explain.%{d}", SpfResult::Fail),
    ] {
        let dns = Fake::default().txt(D, record);
        assert_eq!(result(&dns, V4).await, expected, "{record}");
    }
}

#[tokio::test]
async fn record_selection() {
    // No record, other TXT only, NXDOMAIN: none.
    let dns = Fake::default().txt(D, "google-site-verification=x");
    assert_eq!(result(&dns, V4).await, SpfResult::None);
    assert_eq!(result(&Fake::default(), V4).await, SpfResult::None);
    let dns = Fake::default().txt(D, "v=spf10 +all");
    assert_eq!(result(&dns, V4).await, SpfResult::None);
    // Two: permerror.
    let dns = Fake::default().txt(D, "v=spf1 +all").txt(D, "v=spf1 -all");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert!(e.detail.unwrap().contains("more than one SPF record"));
    // A syntax error anywhere, even after a match: permerror (4.6).
    let dns = Fake::default().txt(D, "v=spf1 +all foo");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert!(
        e.detail
            .unwrap()
            .starts_with("syntax error in the SPF record of email.example.com")
    );
    let dns = Fake::default().txt(D, "v=spf1 ip4:192.0.2.3/33 -all");
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
}

#[tokio::test]
async fn invalid_check_domains_are_none() {
    let dns = Fake::default().txt("localhost", "v=spf1 +all");
    for sender in [
        "x@localhost",
        "x@[192.0.2.1]",
        "x@a..example",
        &format!("x@{}.example", "a".repeat(64)),
    ] {
        let e = run_as(&dns, V4, sender).await;
        assert_eq!(e.result, SpfResult::None, "{sender}");
    }
    assert!(dns.asked().is_empty(), "{:?}", dns.asked());
}

#[tokio::test]
async fn ipv4_mapped_client_is_ipv4() {
    let dns = Fake::default().txt(D, "v=spf1 ip4:192.0.2.3 -all");
    assert_eq!(result(&dns, "::ffff:192.0.2.3").await, SpfResult::Pass);
}

#[tokio::test]
async fn include_semantics() {
    // 5.2: pass matches; fail, softfail, neutral do not.
    for (inner, expected) in [
        ("v=spf1 +all", SpfResult::Pass),
        ("v=spf1 -all", SpfResult::SoftFail),
        ("v=spf1 ~all", SpfResult::SoftFail),
        ("v=spf1 ?all", SpfResult::SoftFail),
        ("v=spf1", SpfResult::SoftFail),
    ] {
        let dns = Fake::default()
            .txt(D, "v=spf1 include:inc.example ~all")
            .txt("inc.example", inner);
        assert_eq!(result(&dns, V4).await, expected, "{inner}");
    }
    // none (no record, or no such name): permerror.
    let dns = Fake::default()
        .txt(D, "v=spf1 include:inc.example ~all")
        .a("inc.example", [192, 0, 2, 3]);
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert_eq!(e.detail.unwrap(), "include:inc.example has no SPF record");
    let dns = Fake::default().txt(D, "v=spf1 include:nowhere.example ~all");
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
    // temperror and permerror of the included record are the result.
    let dns = Fake::default()
        .txt(D, "v=spf1 include:inc.example +all")
        .temp("inc.example");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::TempError);
    assert!(e.detail.unwrap().contains("inc.example"));
    let dns = Fake::default()
        .txt(D, "v=spf1 include:inc.example +all")
        .txt("inc.example", "v=spf1 bogus");
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
    // %{d} inside the included record is the included domain.
    let dns = Fake::default()
        .txt(D, "v=spf1 include:inc.example -all")
        .txt("inc.example", "v=spf1 a:%{d} -all")
        .a("inc.example", [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
}

#[tokio::test]
async fn redirect_semantics() {
    let dns = Fake::default()
        .txt(D, "v=spf1 ip4:198.51.100.1 redirect=_spf.example.com")
        .txt("_spf.example.com", "v=spf1 ip4:192.0.2.3 -all");
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    assert_eq!(result(&dns, "198.51.100.2").await, SpfResult::Fail);
    // A match before it wins; redirect is not even looked up.
    assert_eq!(result(&dns, "198.51.100.1").await, SpfResult::Pass);
    // The redirected record's neutral is the result (not our default).
    let dns = Fake::default()
        .txt(D, "v=spf1 redirect=_spf.example.com")
        .txt("_spf.example.com", "v=spf1 ?all");
    assert_eq!(result(&dns, V4).await, SpfResult::Neutral);
    // 6.1: ignored with an "all".
    let dns = Fake::default()
        .txt(D, "v=spf1 -all redirect=_spf.example.com")
        .txt("_spf.example.com", "v=spf1 +all");
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
    assert!(!dns.asked().iter().any(|q| q.contains("_spf")));
    // A target without a record: permerror.
    let dns = Fake::default().txt(D, "v=spf1 redirect=_spf.example.com");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert_eq!(
        e.detail.unwrap(),
        "redirect=_spf.example.com has no SPF record"
    );
    // temperror on the way.
    let dns = Fake::default()
        .txt(D, "v=spf1 redirect=_spf.example.com")
        .temp("_spf.example.com");
    assert_eq!(result(&dns, V4).await, SpfResult::TempError);
}

#[tokio::test]
async fn loops_end_in_permerror() {
    let dns = Fake::default()
        .txt(D, "v=spf1 include:loop.example -all")
        .txt("loop.example", "v=spf1 include:email.example.com -all");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert!(e.detail.unwrap().contains("too many DNS lookups"));
    let dns = Fake::default().txt(D, "v=spf1 redirect=email.example.com");
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
}

/// A record with `n` terms that each cost a lookup, then the client's address.
fn with_lookups(n: usize) -> Fake {
    let mut dns = Fake::default();
    let mut record = "v=spf1".to_string();
    for i in 0..n {
        let h = format!("h{i}.example.com");
        dns = dns.a(&h, [203, 0, 113, 1]);
        record.push_str(&format!(" a:{h}"));
    }
    record.push_str(" ip4:192.0.2.3 -all");
    dns.txt(D, &record)
}

#[tokio::test]
async fn ten_lookups_are_allowed_eleven_are_not() {
    assert_eq!(result(&with_lookups(10), V4).await, SpfResult::Pass);
    let e = run(&with_lookups(11), V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert_eq!(
        e.detail.unwrap(),
        "too many DNS lookups (more than 10, RFC 7208 4.6.4)"
    );
    // Counted across includes: 5 here, the include, 4 there = 10.
    let mut dns = with_lookups(5);
    dns.txt.clear();
    let dns = dns
        .txt(
            D,
            "v=spf1 a:h0.example.com a:h1.example.com a:h2.example.com a:h3.example.com \
             a:h4.example.com include:inc.example ip4:192.0.2.3 -all",
        )
        .txt(
            "inc.example",
            "v=spf1 a:h0.example.com a:h1.example.com a:h2.example.com a:h3.example.com",
        );
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    let mut dns = dns;
    dns.txt.insert(
        "inc.example".into(),
        vec![
            "v=spf1 a:h0.example.com a:h1.example.com a:h2.example.com \
              a:h3.example.com a:h4.example.com"
                .into(),
        ],
    );
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
    // And redirect is one: 9 and the redirect are 10, 10 and the redirect 11.
    for (n, expected) in [(9, SpfResult::Pass), (10, SpfResult::PermError)] {
        let mut dns = with_lookups(n);
        let record = dns.txt.remove(D).unwrap().remove(0);
        let record = record.replace(" ip4:192.0.2.3 -all", " redirect=r.example");
        let dns = dns
            .txt(D, &record)
            .txt("r.example", "v=spf1 ip4:192.0.2.3 -all");
        assert_eq!(result(&dns, V4).await, expected, "{n}");
    }
}

#[tokio::test]
async fn terms_without_dns_do_not_count() {
    let mut record = "v=spf1".to_string();
    for i in 0..50 {
        record.push_str(&format!(" ip4:198.51.100.{i}"));
    }
    record.push_str(" ip4:192.0.2.3 -all");
    let dns = Fake::default().txt(D, &record);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
}

#[tokio::test]
async fn two_void_lookups_are_allowed_three_are_not() {
    let dns = Fake::default().txt(
        D,
        "v=spf1 a:gone1.example mx:gone2.example ip4:192.0.2.3 -all",
    );
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    let dns = Fake::default().txt(
        D,
        "v=spf1 a:gone1.example mx:gone2.example exists:gone3.example ip4:192.0.2.3 -all",
    );
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert_eq!(
        e.detail.unwrap(),
        "too many void lookups (more than 2, RFC 7208 4.6.4)"
    );
    // NODATA counts as well as NXDOMAIN, across includes.
    let dns = Fake::default()
        .txt(
            D,
            "v=spf1 a:txt1.example include:inc.example ip4:192.0.2.3 -all",
        )
        .txt("txt1.example", "no address here")
        .txt("inc.example", "v=spf1 a:txt1.example a/24 ?all");
    assert_eq!(result(&dns, V4).await, SpfResult::PermError);
}

#[tokio::test]
async fn a_and_mx_with_dual_cidr() {
    let dns = Fake::default()
        .txt(D, "v=spf1 a/24//64 -all")
        .a(D, [192, 0, 2, 200])
        .aaaa(D, "2001:db8::1");
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    assert_eq!(result(&dns, V6).await, SpfResult::Pass);
    assert_eq!(result(&dns, "192.0.3.3").await, SpfResult::Fail);
    assert_eq!(result(&dns, "2001:db8:0:1::1").await, SpfResult::Fail);
    // No CIDR: exact address; AAAA asked for an IPv6 client only.
    let dns = Fake::default()
        .txt(D, "v=spf1 a -all")
        .a(D, [192, 0, 2, 200])
        .aaaa(D, V6);
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
    assert_eq!(result(&dns, V6).await, SpfResult::Pass);
    let asked = dns.asked();
    assert!(
        asked.contains(&"A email.example.com".to_string()),
        "{asked:?}"
    );
    assert_eq!(
        asked
            .iter()
            .filter(|q| *q == "AAAA email.example.com")
            .count(),
        1,
        "{asked:?}"
    );

    let dns = Fake::default()
        .txt(D, "v=spf1 mx:mail.example/30//120 -all")
        .mx("mail.example", "mx1.mail.example")
        .mx("mail.example", "mx2.mail.example")
        .a("mx1.mail.example", [198, 51, 100, 1])
        .a("mx2.mail.example", [192, 0, 2, 1])
        .aaaa("mx2.mail.example", "2001:db8::cb00");
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    assert_eq!(result(&dns, V6).await, SpfResult::Pass);
    assert_eq!(result(&dns, "192.0.2.9").await, SpfResult::Fail);
    // No MX: no implicit MX (5.4), the domain's own A does not count.
    let dns = Fake::default()
        .txt(D, "v=spf1 mx -all")
        .a(D, [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
}

#[tokio::test]
async fn mx_names_limit() {
    let build = |n: usize| {
        let mut dns = Fake::default().txt(D, "v=spf1 mx -all");
        for i in 0..n {
            let h = format!("mx{i}.example.com");
            dns = dns.mx(D, &h).a(&h, [198, 51, 100, i as u8]);
        }
        let last = format!("mx{}.example.com", n - 1);
        dns.a(&last, [192, 0, 2, 3])
    };
    assert_eq!(result(&build(10), V4).await, SpfResult::Pass);
    let e = run(&build(11), V4).await;
    assert_eq!(e.result, SpfResult::PermError);
    assert!(e.detail.unwrap().contains("more than 10 MX names"));
}

#[tokio::test]
async fn mx_host_failures() {
    // A failing host, but another matches: pass; none matches: temperror.
    let dns = Fake::default()
        .txt(D, "v=spf1 mx -all")
        .mx(D, "bad.example")
        .mx(D, "good.example")
        .a("good.example", [192, 0, 2, 3])
        .temp("bad.example");
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    assert_eq!(result(&dns, "192.0.2.4").await, SpfResult::TempError);
    // A host that does not exist is only skipped.
    let dns = Fake::default()
        .txt(D, "v=spf1 mx -all")
        .mx(D, "gone.example")
        .mx(D, "good.example")
        .a("good.example", [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
}

#[tokio::test]
async fn ptr_is_validated_by_a_forward_lookup() {
    let dns = Fake::default()
        .txt(D, "v=spf1 ptr -all")
        .ptr(V4, "mx.email.example.com")
        .a("mx.email.example.com", [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    // A PTR name that does not resolve back is not validated.
    let dns = Fake::default()
        .txt(D, "v=spf1 ptr -all")
        .ptr(V4, "mx.email.example.com")
        .a("mx.email.example.com", [192, 0, 2, 4]);
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
    // Not under the target domain.
    let dns = Fake::default()
        .txt(D, "v=spf1 ptr:example.net -all")
        .ptr(V4, "mx.email.example.com")
        .a("mx.email.example.com", [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
    // Only the first 10 names are looked at.
    let mut dns = Fake::default().txt(D, "v=spf1 ptr -all");
    for i in 0..10 {
        dns = dns.ptr(V4, &format!("h{i}.other.example"));
    }
    let dns = dns
        .ptr(V4, "mx.email.example.com")
        .a("mx.email.example.com", [192, 0, 2, 3]);
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
    // IPv6, with an error on one forward lookup (skipped).
    let dns = Fake::default()
        .txt(D, "v=spf1 ptr -all")
        .ptr(V6, "a.email.example.com")
        .ptr(V6, "b.email.example.com")
        .temp("a.email.example.com")
        .aaaa("b.email.example.com", V6);
    assert_eq!(result(&dns, V6).await, SpfResult::Pass);
    // No PTR at all: no match (a void lookup).
    let dns = Fake::default().txt(D, "v=spf1 ptr -all");
    assert_eq!(result(&dns, V4).await, SpfResult::Fail);
}

#[tokio::test]
async fn exists_with_macros() {
    let dns = Fake::default()
        .txt(D, "v=spf1 exists:%{ir}.%{l1r-}.lp._spf.%{d2} -all")
        .a("3.2.0.192.strong.lp._spf.example.com", [127, 0, 0, 2]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    assert_eq!(result(&dns, "192.0.2.4").await, SpfResult::Fail);
    // Always an A lookup, also for an IPv6 client (5.7).
    let dns = Fake::default()
        .txt(D, "v=spf1 exists:%{i}.ip.example -all")
        .a(
            "2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.b.0.1.ip.example",
            [127, 0, 0, 2],
        );
    assert_eq!(result(&dns, V6).await, SpfResult::Pass);
    // A temporary failure is temperror (2.6.7).
    let dns = Fake::default()
        .txt(D, "v=spf1 exists:x.example -all")
        .temp("x.example");
    assert_eq!(result(&dns, V4).await, SpfResult::TempError);
}

#[tokio::test]
async fn validated_name_macro() {
    let dns = Fake::default()
        .txt(D, "v=spf1 exists:%{p}.names.example -all")
        .ptr(V4, "mx.example.org")
        .a("mx.example.org", [192, 0, 2, 3])
        .a("mx.example.org.names.example", [127, 0, 0, 2]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
    let dns = Fake::default()
        .txt(D, "v=spf1 exists:%{p}.names.example -all")
        .a("unknown.names.example", [127, 0, 0, 2]);
    assert_eq!(result(&dns, V4).await, SpfResult::Pass);
}

#[tokio::test]
async fn empty_local_part_is_postmaster_and_long_names_are_trimmed() {
    let dns = Fake::default()
        .txt("example.com", "v=spf1 exists:%{l}.%{o}.names.example -all")
        .a("postmaster.example.com.names.example", [127, 0, 0, 2]);
    assert_eq!(
        run_as(&dns, V4, "@example.com").await.result,
        SpfResult::Pass
    );
    // 7.3: more than 253 characters lose labels from the left.
    let dns = Fake::default().txt(
        D,
        &format!(
            "v=spf1 exists:{}.%{{d}} -all",
            ["abcdefghijklmnop"; 15].join(".")
        ),
    );
    let _ = run(&dns, V4).await;
    let asked = dns.asked();
    let q = asked.iter().find(|q| q.starts_with("A ")).unwrap();
    assert!(q.len() - 2 <= 253, "{q}");
    assert!(q.ends_with(".email.example.com"), "{q}");
}

#[tokio::test]
async fn temperror_for_the_record_itself() {
    let dns = Fake::default().temp(D);
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::TempError);
    assert_eq!(
        e.detail.unwrap(),
        "lookup of email.example.com failed: SERVFAIL"
    );
    // a: with a failing lookup.
    let dns = Fake::default()
        .txt(D, "v=spf1 a:x.example -all")
        .temp("x.example");
    assert_eq!(result(&dns, V4).await, SpfResult::TempError);
}

#[tokio::test(start_paused = true)]
async fn slow_dns_is_temperror_after_the_budget() {
    let dns = Fake::default()
        .txt(D, "v=spf1 a:slow.example -all")
        .slow("slow.example");
    let e = run(&dns, V4).await;
    assert_eq!(e.result, SpfResult::TempError);
    assert!(e.detail.unwrap().contains("20 s"));
}

/// Records put together from SPF-ish pieces (a fixed xorshift seed, the same every run),
/// parsed and evaluated, for an IPv4 and an IPv6 client: never a panic, and a result
/// within the limits. The fuzz target `spf` does the same with arbitrary bytes.
#[test]
fn pseudo_random_records_never_panic() {
    const TOKENS: &[&str] = &[
        " ",
        "v=spf1",
        "+",
        "-",
        "~",
        "?",
        "all",
        "include:",
        "a",
        "mx",
        "ptr",
        "exists:",
        "ip4:",
        "ip6:",
        "redirect=",
        "exp=",
        "foo=",
        ":",
        "/",
        "//",
        "24",
        "64",
        "33",
        "129",
        "0",
        "192.0.2.3",
        "2001:db8::",
        "a.example",
        "b.example",
        "email.example.com",
        ".",
        "%{d}",
        "%{i}",
        "%{ir}",
        "%{l1r-}",
        "%{p}",
        "%{S}",
        "%{c}",
        "%{d2}",
        "%{d0}",
        "%%",
        "%_",
        "%-",
        "%",
        "{",
        "}",
        "=",
        "\u{e9}",
        "\t",
    ];
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    let record = |next: &mut dyn FnMut() -> u64| {
        let mut r = "v=spf1".to_string();
        let n = next() % 12;
        for _ in 0..n {
            r.push(' ');
            for _ in 0..1 + next() % 4 {
                r.push_str(TOKENS[(next() % TOKENS.len() as u64) as usize]);
            }
        }
        r
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .unwrap();
    let mut parsed = 0;
    for _ in 0..3000 {
        let top = record(&mut next);
        let a = record(&mut next);
        let b = record(&mut next);
        if record::parse(&top).is_ok() {
            parsed += 1;
        }
        let dns = Fake::default()
            .txt(D, &top)
            .txt("a.example", &a)
            .txt("b.example", &b)
            .a("a.example", [192, 0, 2, 3])
            .aaaa("b.example", V6)
            .mx("a.example", "b.example")
            .ptr(V4, "a.example");
        for ip in [V4, V6] {
            let e = rt.block_on(run(&dns, ip));
            if matches!(e.result, SpfResult::PermError | SpfResult::TempError) {
                assert!(e.detail.is_some(), "{top:?}");
            }
            // The record, at most 10 terms of at most 1 + 10 lookups, %{p}'s 1 + 10.
            let asked = std::mem::take(&mut *dns.asked.lock().unwrap());
            assert!(asked.len() <= 1 + 10 * 11 + 11, "{top:?}: {}", asked.len());
        }
    }
    // The pieces make enough valid records for the evaluation to be exercised.
    assert!(parsed > 100, "{parsed}");
}
