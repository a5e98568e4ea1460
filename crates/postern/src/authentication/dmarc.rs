//! The pure parts of DMARC (RFC 7489): the policy record, the organisational domain and
//! identifier alignment. Looking the record up and deciding the result is in `mod.rs`.
//!
//! Why not mail-auth's `verify_dmarc`: mail-auth 0.13 follows DMARCbis (RFC 9989), which
//! finds the organisational domain by a DNS tree walk over `_dmarc` names, ignores `pct`
//! (DMARCbis removed it) and adds `np`/`psd`/`t`. Issue 10 and the contract ask for RFC
//! 7489: the organisational domain from the Public Suffix List, shipped with Postern (the
//! `psl` crate compiles the list in; updating it is a dependency update), and `pct`
//! honoured. The record parser is here for the same reason (mail-auth's drops `pct`).

/// `p=` / `sp=` (RFC 7489 6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Policy {
    None,
    Quarantine,
    Reject,
}

impl Policy {
    pub fn as_str(self) -> &'static str {
        match self {
            Policy::None => "none",
            Policy::Quarantine => "quarantine",
            Policy::Reject => "reject",
        }
    }

    fn parse(s: &str) -> Option<Policy> {
        match s.to_ascii_lowercase().as_str() {
            "none" => Some(Policy::None),
            "quarantine" => Some(Policy::Quarantine),
            "reject" => Some(Policy::Reject),
            _ => None,
        }
    }

    /// The next less strict policy, for a message left out by `pct` (RFC 7489 6.6.4:
    /// not sampled under "reject" it is treated as "quarantine", under "quarantine" as
    /// "none").
    pub fn weaker(self) -> Policy {
        match self {
            Policy::Reject => Policy::Quarantine,
            Policy::Quarantine | Policy::None => Policy::None,
        }
    }
}

/// `adkim=` / `aspf=` (RFC 7489 3.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Alignment {
    Relaxed,
    Strict,
}

/// A DMARC policy record, the tags the receiver acts on (reports are not sent).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Record {
    pub p: Policy,
    /// For subdomains of the domain the record was found at; `p` when absent.
    pub sp: Policy,
    /// 0..=100; 100 when absent or invalid.
    pub pct: u8,
    pub adkim: Alignment,
    pub aspf: Alignment,
}

/// Whether a TXT record is a DMARC record at all (RFC 7489 6.6.3 step 2: records that do
/// not start with `v=DMARC1` are discarded).
pub fn is_dmarc(text: &str) -> bool {
    let mut tags = text.split(';');
    tags.next()
        .and_then(tag)
        .is_some_and(|(k, v)| k == "v" && v == "DMARC1")
}

/// Parses a record that [`is_dmarc`]. RFC 7489 6.3 (tags), 6.4 (syntax), 6.6.3 step 6:
/// a record without a valid `p` (or with an invalid `sp`) counts as `p=none` when it has
/// a `rua`, and is no policy at all otherwise (`None`). Unknown tags are ignored; an
/// invalid `pct`, `adkim` or `aspf` takes its default.
pub fn parse(text: &str) -> Option<Record> {
    if !is_dmarc(text) {
        return None;
    }
    let (mut p, mut sp, mut pct, mut adkim, mut aspf) = (None, None, 100u8, None, None);
    let mut p_invalid = false;
    let mut rua = false;
    for (k, v) in text.split(';').skip(1).filter_map(tag) {
        match k.to_ascii_lowercase().as_str() {
            "p" => {
                p = Policy::parse(v);
                p_invalid |= p.is_none();
            }
            "sp" => {
                sp = Policy::parse(v);
                p_invalid |= sp.is_none();
            }
            "pct" => {
                pct = v
                    .parse::<u8>()
                    .ok()
                    .filter(|n| *n <= 100 && v.len() <= 3)
                    .unwrap_or(100)
            }
            "adkim" => adkim = alignment(v),
            "aspf" => aspf = alignment(v),
            "rua" => rua = v.contains(':'),
            _ => {}
        }
    }
    let (p, sp) = match p {
        Some(p) if !p_invalid => (p, sp.unwrap_or(p)),
        _ if rua => (Policy::None, Policy::None),
        _ => return None,
    };
    Some(Record {
        p,
        sp,
        pct,
        adkim: adkim.unwrap_or(Alignment::Relaxed),
        aspf: aspf.unwrap_or(Alignment::Relaxed),
    })
}

fn tag(t: &str) -> Option<(&str, &str)> {
    let (k, v) = t.split_once('=')?;
    let k = k.trim();
    (!k.is_empty()).then(|| (k, v.trim()))
}

fn alignment(v: &str) -> Option<Alignment> {
    match v {
        "r" | "R" => Some(Alignment::Relaxed),
        "s" | "S" => Some(Alignment::Strict),
        _ => None,
    }
}

/// The organisational domain (RFC 7489 3.2): the public suffix of `domain` from the
/// Public Suffix List plus one label; `domain` itself when it is a public suffix or has
/// fewer labels. Names not under a listed suffix fall under the list's default rule
/// (`*`: the last label is the suffix). `domain` is lower case, A-labels.
pub fn organizational_domain(domain: &str) -> &str {
    let d = domain.trim_end_matches('.');
    psl::domain_str(d).unwrap_or(d)
}

/// Identifier alignment (RFC 7489 3.1.1, 3.1.2): strict, the same name; relaxed, the
/// same organisational domain. Both lower case, A-labels.
pub fn aligned(identifier: &str, from: &str, mode: Alignment) -> bool {
    let (a, b) = (identifier.trim_end_matches('.'), from.trim_end_matches('.'));
    if a.eq_ignore_ascii_case(b) {
        return true;
    }
    mode == Alignment::Relaxed
        && organizational_domain(&a.to_ascii_lowercase())
            == organizational_domain(&b.to_ascii_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_tags() {
        let r = parse("v=DMARC1; p=reject; sp=quarantine; pct=20; adkim=s").unwrap();
        assert_eq!(
            r,
            Record {
                p: Policy::Reject,
                sp: Policy::Quarantine,
                pct: 20,
                adkim: Alignment::Strict,
                aspf: Alignment::Relaxed,
            }
        );
        // sp defaults to p, pct to 100; spaces and case of tag names do not matter.
        let r = parse("v=DMARC1;P = quarantine ;  aspf=s").unwrap();
        assert_eq!(
            (r.p, r.sp, r.pct),
            (Policy::Quarantine, Policy::Quarantine, 100)
        );
        assert_eq!(r.aspf, Alignment::Strict);
        // An invalid pct is its default, not an error.
        assert_eq!(parse("v=DMARC1; p=none; pct=250").unwrap().pct, 100);
        assert_eq!(parse("v=DMARC1; p=none; pct=0").unwrap().pct, 0);
    }

    #[test]
    fn records_that_are_no_policy() {
        // v= must come first and be exactly DMARC1 (RFC 7489 6.3).
        assert_eq!(parse("p=reject; v=DMARC1"), None);
        assert_eq!(parse("v=dmarc1; p=reject"), None);
        assert_eq!(parse("v=spf1 -all"), None);
        // No valid p: none at all, unless rua= is there (then p=none, 6.6.3 step 6).
        assert_eq!(parse("v=DMARC1; p=bounce"), None);
        let r = parse("v=DMARC1; p=bounce; rua=mailto:d@a.example").unwrap();
        assert_eq!((r.p, r.sp), (Policy::None, Policy::None));
    }

    #[test]
    fn organizational_domains_from_the_public_suffix_list() {
        assert_eq!(organizational_domain("a.b.example.co.uk"), "example.co.uk");
        assert_eq!(organizational_domain("example.co.uk"), "example.co.uk");
        // A public suffix is its own organisational domain.
        assert_eq!(organizational_domain("co.uk"), "co.uk");
        assert_eq!(organizational_domain("mail.a.example"), "a.example");
        assert_eq!(organizational_domain("x.y.example.com."), "example.com");
    }

    #[test]
    fn alignment_modes() {
        assert!(aligned("a.example", "A.Example", Alignment::Strict));
        assert!(!aligned("mail.a.example", "a.example", Alignment::Strict));
        assert!(aligned("mail.a.example", "a.example", Alignment::Relaxed));
        assert!(aligned(
            "bounce.example.co.uk",
            "news.example.co.uk",
            Alignment::Relaxed
        ));
        // Under one public suffix, two registrants are not aligned.
        assert!(!aligned("other.co.uk", "example.co.uk", Alignment::Relaxed));
        assert!(!aligned("b.example", "a.example", Alignment::Relaxed));
    }
}
