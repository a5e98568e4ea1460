//! Fuzz the SPF record parser and macro expander: arbitrary bytes (as UTF-8, lossily)
//! after "v=spf1 ", parsed; every domain-spec of a record that parses is expanded for an
//! IPv4 and an IPv6 client. No panic, expansions bounded. The unit test
//! `authentication::spf::tests::pseudo_random_records_never_panic` also evaluates such
//! records over a fake DNS when cargo-fuzz is not available.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern::authentication::spf::macros::{self, Context, MAX_EXPANSION};
use postern::authentication::spf::record::{self, Mechanism};

fuzz_target!(|data: &[u8]| {
    let text = format!("v=spf1 {}", String::from_utf8_lossy(data));
    let Ok(r) = record::parse(&text) else {
        return;
    };
    let mut specs = Vec::new();
    for d in &r.directives {
        match &d.mechanism {
            Mechanism::Include(s) | Mechanism::Exists(s) => specs.push(s),
            Mechanism::A { domain: Some(s), .. }
            | Mechanism::Mx { domain: Some(s), .. }
            | Mechanism::Ptr(Some(s)) => specs.push(s),
            _ => {}
        }
    }
    specs.extend(r.redirect.iter());
    specs.extend(r.exp.iter());
    for ip in ["192.0.2.3", "2001:db8::cb01"] {
        let ctx = Context {
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            helo: "mx.example.org",
            validated: None,
            receiver: "relay.example.net",
            now: 0,
        };
        for s in &specs {
            if let Ok(x) = macros::expand(s, &ctx) {
                assert!(x.len() <= MAX_EXPANSION + 1024);
                assert!(macros::trim_domain(&x).len() <= x.len());
            }
        }
    }
});
