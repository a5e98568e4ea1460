//! SPF records: which TXT record is one (RFC 7208 4.5), and parsing it by the ABNF of
//! 4.6, 5, 6 and 12. Any syntax error anywhere in the record is a permerror before
//! anything is evaluated (4.6).

use std::net::{Ipv4Addr, Ipv6Addr};

use super::macros::{MacroString, parse_domain_spec, parse_macro_string};

/// Longest record taken (all the strings of the TXT record joined). 3.4 asks publishers
/// to stay under 450 bytes for UDP; this only bounds the work a sender can ask for.
pub const MAX_RECORD_LEN: usize = 4096;

/// Most terms (directives and modifiers) in one record.
pub const MAX_TERMS: usize = 100;

/// The qualifier of a directive (4.6.2): what a match means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Qualifier {
    /// `+` (the default).
    Pass,
    /// `-`
    Fail,
    /// `~`
    SoftFail,
    /// `?`
    Neutral,
}

/// A mechanism (5). Domains are unexpanded domain-specs; `None` means `<domain>`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Mechanism {
    All,
    Include(MacroString),
    /// `a[:domain][/v4][//v6]`
    A {
        domain: Option<MacroString>,
        v4: u8,
        v6: u8,
    },
    /// `mx[:domain][/v4][//v6]`
    Mx {
        domain: Option<MacroString>,
        v4: u8,
        v6: u8,
    },
    Ptr(Option<MacroString>),
    Ip4(Ipv4Addr, u8),
    Ip6(Ipv6Addr, u8),
    Exists(MacroString),
}

impl Mechanism {
    /// 4.6.4: the mechanisms that query DNS count toward the limit of 10.
    pub fn queries_dns(&self) -> bool {
        !matches!(
            self,
            Mechanism::All | Mechanism::Ip4(..) | Mechanism::Ip6(..)
        )
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Directive {
    pub qualifier: Qualifier,
    pub mechanism: Mechanism,
}

/// A parsed record.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Record {
    pub directives: Vec<Directive>,
    /// `redirect=` (6.1).
    pub redirect: Option<MacroString>,
    /// `exp=` (6.2): parsed, but the explanation is never fetched (we do not refuse with
    /// the sender's text).
    pub exp: Option<MacroString>,
}

/// 4.5: a record is an SPF record when it begins with "v=spf1" (case-insensitive)
/// followed by a space or its end.
pub fn is_spf(text: &str) -> bool {
    let b = text.as_bytes();
    b.len() >= 6 && b[..6].eq_ignore_ascii_case(b"v=spf1") && matches!(b.get(6), None | Some(b' '))
}

/// Parses an SPF record (one for which [`is_spf`] holds). The error says what is wrong.
pub fn parse(text: &str) -> Result<Record, String> {
    if text.len() > MAX_RECORD_LEN {
        return Err(format!("longer than {MAX_RECORD_LEN} bytes"));
    }
    if !is_spf(text) {
        return Err("not an SPF record".to_string());
    }
    let mut record = Record::default();
    // 12: terms = *( 1*SP ( directive / modifier ) ), then *SP.
    for (n, term) in text[6..].split(' ').filter(|t| !t.is_empty()).enumerate() {
        if n >= MAX_TERMS {
            return Err(format!("more than {MAX_TERMS} terms"));
        }
        if let Some((name, value)) = modifier(term) {
            match name.to_ascii_lowercase().as_str() {
                // 6: redirect and exp MUST NOT appear more than once each.
                "redirect" => {
                    if record.redirect.is_some() {
                        return Err("more than one redirect=".to_string());
                    }
                    record.redirect = Some(parse_domain_spec(value).map_err(|e| in_term(term, e))?);
                }
                "exp" => {
                    if record.exp.is_some() {
                        return Err("more than one exp=".to_string());
                    }
                    record.exp = Some(parse_domain_spec(value).map_err(|e| in_term(term, e))?);
                }
                // 6: unknown modifiers are ignored, but must still be well formed.
                _ => {
                    parse_macro_string(value, true).map_err(|e| in_term(term, e))?;
                }
            }
            continue;
        }
        record
            .directives
            .push(directive(term).map_err(|e| in_term(term, e))?);
    }
    Ok(record)
}

fn in_term(term: &str, e: String) -> String {
    let shown: String = term.chars().take(64).collect();
    format!("{e} (in {shown:?})")
}

/// `modifier = name "=" macro-string`, `name = ALPHA *( ALPHA / DIGIT / "-" / "_" / "." )`
/// (12): the name and the value, when the term is one.
fn modifier(term: &str) -> Option<(&str, &str)> {
    let (name, value) = term.split_once('=')?;
    let b = name.as_bytes();
    let ok = b.first().is_some_and(u8::is_ascii_alphabetic)
        && b.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'-' | b'_' | b'.'));
    ok.then_some((name, value))
}

fn directive(term: &str) -> Result<Directive, String> {
    let (qualifier, rest) = match term.as_bytes().first() {
        Some(b'+') => (Qualifier::Pass, &term[1..]),
        Some(b'-') => (Qualifier::Fail, &term[1..]),
        Some(b'~') => (Qualifier::SoftFail, &term[1..]),
        Some(b'?') => (Qualifier::Neutral, &term[1..]),
        _ => (Qualifier::Pass, term),
    };
    let split = rest.find([':', '/']).unwrap_or(rest.len());
    let (name, args) = rest.split_at(split);
    // 4.6.1: mechanism names are case-insensitive.
    let mechanism = match name.to_ascii_lowercase().as_str() {
        "all" if args.is_empty() => Mechanism::All,
        "include" => Mechanism::Include(required_domain(args)?),
        "exists" => Mechanism::Exists(required_domain(args)?),
        "ptr" => Mechanism::Ptr(optional_domain(args)?),
        "a" | "mx" => {
            let (args, v4, v6) = dual_cidr(args)?;
            let domain = optional_domain(args)?;
            if name.eq_ignore_ascii_case("a") {
                Mechanism::A { domain, v4, v6 }
            } else {
                Mechanism::Mx { domain, v4, v6 }
            }
        }
        "ip4" => {
            let value = args.strip_prefix(':').ok_or("ip4 without an address")?;
            let (net, len) = split_cidr(value);
            let net: Ipv4Addr = net
                .parse()
                .map_err(|_| format!("{net:?} is not an IPv4 address"))?;
            let prefix = match len {
                Some(l) => cidr(l, 32)?,
                None => 32,
            };
            Mechanism::Ip4(net, prefix)
        }
        "ip6" => {
            let value = args.strip_prefix(':').ok_or("ip6 without an address")?;
            let (net, len) = split_cidr(value);
            let net: Ipv6Addr = net
                .parse()
                .map_err(|_| format!("{net:?} is not an IPv6 address"))?;
            let prefix = match len {
                Some(l) => cidr(l, 128)?,
                None => 128,
            };
            Mechanism::Ip6(net, prefix)
        }
        // 5: an unknown mechanism is a permerror.
        _ => return Err("an unknown mechanism".to_string()),
    };
    Ok(Directive {
        qualifier,
        mechanism,
    })
}

/// `":" domain-spec`, required.
fn required_domain(args: &str) -> Result<MacroString, String> {
    let spec = args.strip_prefix(':').ok_or("a domain is required")?;
    parse_domain_spec(spec)
}

/// `[ ":" domain-spec ]`
fn optional_domain(args: &str) -> Result<Option<MacroString>, String> {
    if args.is_empty() {
        return Ok(None);
    }
    required_domain(args).map(Some)
}

/// `ip4-network [ ip4-cidr-length ]`: the network and the digits after "/".
fn split_cidr(value: &str) -> (&str, Option<&str>) {
    match value.split_once('/') {
        Some((net, len)) => (net, Some(len)),
        None => (value, None),
    }
}

/// `dual-cidr-length = [ ip4-cidr-length ] [ "/" ip6-cidr-length ]` at the end of `args`:
/// what is left, and the two prefixes (32 and 128 when absent).
fn dual_cidr(args: &str) -> Result<(&str, u8, u8), String> {
    let mut rest = args;
    let mut v6 = 128;
    let mut v4 = 32;
    if let Some((before, digits)) = trailing_number(rest)
        && before.ends_with("//")
    {
        v6 = cidr(digits, 128)?;
        rest = &before[..before.len() - 2];
    }
    if let Some((before, digits)) = trailing_number(rest)
        && before.ends_with('/')
        && !before.ends_with("//")
    {
        v4 = cidr(digits, 32)?;
        rest = &before[..before.len() - 1];
    }
    if rest.contains('/') && !rest.starts_with(':') {
        return Err("a malformed CIDR length".to_string());
    }
    Ok((rest, v4, v6))
}

/// The digits at the end of `s`, if any, and what comes before them.
fn trailing_number(s: &str) -> Option<(&str, &str)> {
    let start = s.trim_end_matches(|c: char| c.is_ascii_digit()).len();
    (start < s.len()).then(|| s.split_at(start))
}

/// `"0" / %x31-39 0*1DIGIT` (ip4, at most 32) or `0*2DIGIT` (ip6, at most 128): no
/// leading zeros.
fn cidr(digits: &str, max: u8) -> Result<u8, String> {
    let well_formed = !digits.is_empty()
        && digits.len() <= 3
        && digits.bytes().all(|b| b.is_ascii_digit())
        && (digits == "0" || !digits.starts_with('0'));
    let value: u16 = if well_formed {
        digits.parse().unwrap_or(u16::MAX)
    } else {
        u16::MAX
    };
    if value > u16::from(max) {
        return Err(format!("a CIDR length /{digits} (at most {max})"));
    }
    Ok(value as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(term: &str) -> Directive {
        let r = parse(&format!("v=spf1 {term}")).unwrap_or_else(|e| panic!("{term}: {e}"));
        assert_eq!(r.directives.len(), 1, "{term}");
        r.directives.into_iter().next().unwrap()
    }

    fn mech(term: &str) -> Mechanism {
        one(term).mechanism
    }

    fn spec(s: &str) -> MacroString {
        parse_domain_spec(s).unwrap()
    }

    #[test]
    fn selection() {
        assert!(is_spf("v=spf1"));
        assert!(is_spf("v=spf1 -all"));
        assert!(is_spf("V=SPF1 -all"));
        assert!(!is_spf("v=spf10 -all"));
        assert!(!is_spf("v=spf1-all"));
        assert!(!is_spf(" v=spf1 -all"));
        assert!(!is_spf("v=spf"));
        assert!(!is_spf("spf2.0/pra -all"));
    }

    #[test]
    fn every_mechanism() {
        assert_eq!(mech("all"), Mechanism::All);
        assert_eq!(mech("ALL"), Mechanism::All);
        assert_eq!(
            mech("include:_spf.example.com"),
            Mechanism::Include(spec("_spf.example.com"))
        );
        assert_eq!(
            mech("a"),
            Mechanism::A {
                domain: None,
                v4: 32,
                v6: 128
            }
        );
        assert_eq!(
            mech("a:mail.example.com/24//64"),
            Mechanism::A {
                domain: Some(spec("mail.example.com")),
                v4: 24,
                v6: 64
            }
        );
        assert_eq!(
            mech("a/24"),
            Mechanism::A {
                domain: None,
                v4: 24,
                v6: 128
            }
        );
        assert_eq!(
            mech("a//0"),
            Mechanism::A {
                domain: None,
                v4: 32,
                v6: 0
            }
        );
        assert_eq!(
            mech("mx:%{d}/30"),
            Mechanism::Mx {
                domain: Some(spec("%{d}")),
                v4: 30,
                v6: 128
            }
        );
        assert_eq!(
            mech("MX"),
            Mechanism::Mx {
                domain: None,
                v4: 32,
                v6: 128
            }
        );
        assert_eq!(mech("ptr"), Mechanism::Ptr(None));
        assert_eq!(
            mech("ptr:example.com"),
            Mechanism::Ptr(Some(spec("example.com")))
        );
        assert_eq!(
            mech("ip4:192.0.2.0/24"),
            Mechanism::Ip4(Ipv4Addr::new(192, 0, 2, 0), 24)
        );
        assert_eq!(
            mech("ip4:192.0.2.1"),
            Mechanism::Ip4(Ipv4Addr::new(192, 0, 2, 1), 32)
        );
        assert_eq!(
            mech("ip4:0.0.0.0/0"),
            Mechanism::Ip4(Ipv4Addr::UNSPECIFIED, 0)
        );
        assert_eq!(
            mech("ip6:2001:db8::/32"),
            Mechanism::Ip6("2001:db8::".parse().unwrap(), 32)
        );
        assert_eq!(
            mech("ip6:2001:db8::1"),
            Mechanism::Ip6("2001:db8::1".parse().unwrap(), 128)
        );
        assert_eq!(
            mech("exists:%{ir}.%{v}._spf.%{d2}"),
            Mechanism::Exists(spec("%{ir}.%{v}._spf.%{d2}"))
        );
    }

    #[test]
    fn qualifiers() {
        assert_eq!(one("all").qualifier, Qualifier::Pass);
        assert_eq!(one("+all").qualifier, Qualifier::Pass);
        assert_eq!(one("-all").qualifier, Qualifier::Fail);
        assert_eq!(one("~all").qualifier, Qualifier::SoftFail);
        assert_eq!(one("?all").qualifier, Qualifier::Neutral);
    }

    #[test]
    fn modifiers() {
        let r =
            parse("v=spf1 redirect=_spf.example.com exp=explain.%{d} foo=bar%{c} x.y-z_=").unwrap();
        assert!(r.directives.is_empty());
        assert_eq!(r.redirect, Some(spec("_spf.example.com")));
        assert!(r.exp.is_some());
        // Spaces: several, trailing.
        let r = parse("v=spf1   ip4:192.0.2.1   -all  ").unwrap();
        assert_eq!(r.directives.len(), 2);
        assert_eq!(parse("v=spf1").unwrap(), Record::default());
    }

    #[test]
    fn every_permerror() {
        for bad in [
            // Unknown mechanisms, or known ones misspelt or misused.
            "foo",
            "ipv4:192.0.2.1",
            "all:example.com",
            "all/24",
            "+redirect=example.com",
            "include",
            "include:",
            "exists",
            "exists:",
            "ptr/24",
            "ptr:",
            "a:",
            "mx:",
            // Bad domains.
            "include:com",
            "a:example.123",
            "a:1.2.3.4",
            "include:%{x}.example.com",
            "include:%{c}.example.com",
            "exists:%{s0}.example.com",
            "a:exa mple.com",
            // Bad addresses and prefixes.
            "ip4",
            "ip4:",
            "ip4:192.0.2",
            "ip4:192.0.2.1/33",
            "ip4:192.0.2.1/",
            "ip4:192.0.2.1/024",
            "ip4:192.0.2.1//64",
            "ip4:2001:db8::1",
            "ip4:192.0.2.01",
            "ip6:2001:db8::/129",
            "ip6:192.0.2.1",
            "ip6:2001:db8::/",
            "ip6:2001:db8::/1280",
            "a/33",
            "a//129",
            "a/24/64",
            "mx/abc",
            "a:example.com/",
            // Modifiers.
            "redirect=",
            "redirect=com",
            "exp=",
            "redirect=a.example redirect=b.example",
            "exp=a.example exp=b.example",
            "foo=%{",
            "foo=%x",
        ] {
            let r = parse(&format!("v=spf1 {bad}"));
            assert!(r.is_err(), "{bad:?} parsed as {r:?}");
        }
        let many = format!("v=spf1{}", " ip4:192.0.2.1".repeat(MAX_TERMS + 1));
        assert!(parse(&many).unwrap_err().contains("terms"));
        let long = format!("v=spf1 a:{}.example.com", "x".repeat(MAX_RECORD_LEN));
        assert!(parse(&long).is_err());
        assert!(parse("v=spf1 \u{e9}").is_err());
        assert!(parse("v=spf1\t-all").is_err());
    }

    #[test]
    fn query_counting_mechanisms() {
        for (term, counts) in [
            ("all", false),
            ("ip4:192.0.2.1", false),
            ("ip6:::1", false),
            ("a", true),
            ("mx", true),
            ("ptr", true),
            ("include:a.example", true),
            ("exists:a.example", true),
        ] {
            assert_eq!(mech(term).queries_dns(), counts, "{term}");
        }
    }
}
