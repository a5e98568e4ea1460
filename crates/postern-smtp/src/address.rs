//! Envelope addresses: RFC 5321 section 4.1.2 paths, parsed once into a canonical type
//! that records everything odd about them.
//!
//! Trust: the input is whatever a client typed after `MAIL FROM:` / `RCPT TO:`, so it is
//! fully untrusted. The parser is strict (it accepts the RFC grammar plus the RFC 6531
//! UTF-8 extension and a trailing dot on the domain, nothing else) and bounded (a path
//! is at most 256 octets, RFC 5321 4.5.3.1.3). Anything it does not understand is a
//! syntax error, never a best guess: guessing is how relay tricks get through.
//!
//! Canonical form: the domain is lower-cased, its trailing dot removed, and an address
//! literal is parsed into an `IpAddr` so `[127.0.0.1]` and `[IPv6:::1]` compare by value.
//! The local part keeps its case (RFC 5321 2.4: it may be case-sensitive) and is stored
//! unquoted. `AddressFlags` records a source route, a quoted local part and the routing
//! characters `%`, `!` and `@` inside the local part: the relay policy refuses such
//! "routed" addresses from clients it does not trust (see `Address::is_routed`).

use std::fmt;
use std::net::{IpAddr, Ipv6Addr};

/// RFC 5321 4.5.3.1.3: the longest path, including the angle brackets.
pub const MAX_PATH: usize = 256;
/// RFC 5321 4.5.3.1.1.
pub const MAX_LOCAL_PART: usize = 64;
/// RFC 5321 4.5.3.1.2.
pub const MAX_DOMAIN: usize = 255;

/// The part after the `@`.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Domain {
    /// A host or domain name, lower-cased, without trailing dot. May hold UTF-8 U-labels.
    Name(String),
    /// `[192.0.2.1]` or `[IPv6:2001:db8::1]`.
    Literal(IpAddr),
}

impl Domain {
    /// The name, if this is not an address literal.
    pub fn name(&self) -> Option<&str> {
        match self {
            Domain::Name(n) => Some(n),
            Domain::Literal(_) => None,
        }
    }

    /// The name in its one canonical form for comparisons: A-labels (IDNA, UTS 46
    /// processing, RFC 5891), lower case, so `bücher.example` and
    /// `xn--bcher-kva.example` are the same domain. A name IDNA refuses stays as written
    /// (it then matches nothing that was configured in a valid form).
    pub fn ascii_name(&self) -> Option<std::borrow::Cow<'_, str>> {
        self.name().map(ascii_domain)
    }
}

/// `domain` in A-label form, lower case (see [`Domain::ascii_name`]).
pub fn ascii_domain(domain: &str) -> std::borrow::Cow<'_, str> {
    use std::borrow::Cow;
    if domain.is_ascii() && !domain.bytes().any(|b| b.is_ascii_uppercase()) {
        return Cow::Borrowed(domain);
    }
    match idna::domain_to_ascii(domain) {
        Ok(a) => Cow::Owned(a),
        Err(_) => Cow::Owned(domain.to_lowercase()),
    }
}

impl fmt::Display for Domain {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Domain::Name(n) => f.write_str(n),
            Domain::Literal(IpAddr::V4(a)) => write!(f, "[{a}]"),
            Domain::Literal(IpAddr::V6(a)) => write!(f, "[IPv6:{a}]"),
        }
    }
}

/// What was unusual about an address as the client wrote it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct AddressFlags {
    /// `<@a.example,@b.example:user@c.example>`: an RFC 821 source route. RFC 5321 4.1.1.3
    /// and appendix C say to ignore it, which we do; the mailbox alone decides.
    pub source_route: bool,
    /// The local part was a quoted string.
    pub quoted: bool,
    /// The local part holds `%` (the "percent hack").
    pub percent: bool,
    /// The local part holds `!` (a UUCP bang path).
    pub bang: bool,
    /// The (quoted) local part holds `@`.
    pub at: bool,
}

/// A mailbox: `local@domain`, canonicalised.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Address {
    local: String,
    domain: Domain,
    flags: AddressFlags,
}

impl Address {
    pub fn local(&self) -> &str {
        &self.local
    }
    pub fn domain(&self) -> &Domain {
        &self.domain
    }
    pub fn flags(&self) -> AddressFlags {
        self.flags
    }

    /// True when both name the same mailbox: the same local part (as unquoted, so
    /// `"a"` is `a`) at the same domain in canonical form (IDNA A-labels), whatever
    /// source route or quoting either was written with.
    pub fn same_mailbox(&self, other: &Address) -> bool {
        self.local == other.local
            && match (&self.domain, &other.domain) {
                (Domain::Name(_), Domain::Name(_)) => {
                    self.domain.ascii_name() == other.domain.ascii_name()
                }
                (a, b) => a == b,
            }
    }

    /// True when the local part could be read as a further route by a next hop
    /// (`%`, `!`, `@` in it). Postfix calls these "routed" addresses (resolve.c).
    pub fn is_routed(&self) -> bool {
        self.flags.percent || self.flags.bang || self.flags.at
    }

    /// True when any part is outside ASCII, so it may only travel with SMTPUTF8 (RFC 6531).
    pub fn needs_smtputf8(&self) -> bool {
        !self.local.is_ascii() || self.domain.name().is_some_and(|n| !n.is_ascii())
    }

    /// Build an address for a domain-less `<Postmaster>` (RFC 5321 4.5.1). An empty
    /// `domain` marks the bare form until the session knows its own name.
    pub fn postmaster(domain: &str) -> Address {
        Address {
            local: "postmaster".into(),
            domain: Domain::Name(domain.to_ascii_lowercase()),
            flags: AddressFlags::default(),
        }
    }
}

impl fmt::Display for Address {
    /// The address in transmittable form: the local part re-quoted if it needs quoting.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if is_dot_string(&self.local) {
            f.write_str(&self.local)?;
        } else {
            f.write_str("\"")?;
            for c in self.local.chars() {
                if c == '"' || c == '\\' {
                    f.write_str("\\")?;
                }
                write!(f, "{c}")?;
            }
            f.write_str("\"")?;
        }
        write!(f, "@{}", self.domain)
    }
}

/// MAIL FROM's path: the null path `<>` or a mailbox.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReversePath {
    Null,
    Mailbox(Address),
}

impl fmt::Display for ReversePath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReversePath::Null => f.write_str("<>"),
            ReversePath::Mailbox(a) => write!(f, "<{a}>"),
        }
    }
}

/// Why an address was refused; the session maps every kind to 501 5.1.3 / 5.1.7.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum AddressError {
    /// Not of the RFC 5321 grammar.
    Syntax,
    /// Longer than the RFC 5321 4.5.3.1 limits.
    TooLong,
}

/// Parses a `Reverse-path` (`<>` or a path), RFC 5321 4.1.2.
pub fn parse_reverse_path(s: &str) -> Result<ReversePath, AddressError> {
    if s == "<>" {
        return Ok(ReversePath::Null);
    }
    parse_path(s).map(ReversePath::Mailbox)
}

/// Parses a `Forward-path` / `Path`: `"<" [ A-d-l ":" ] Mailbox ">"`. The source route,
/// if any, is checked for syntax, flagged and dropped (RFC 5321 4.1.1.3, appendix C).
pub fn parse_path(s: &str) -> Result<Address, AddressError> {
    if s.len() > MAX_PATH {
        return Err(AddressError::TooLong);
    }
    let inner = s
        .strip_prefix('<')
        .and_then(|r| r.strip_suffix('>'))
        .ok_or(AddressError::Syntax)?;
    let mut source_route = false;
    let mailbox = if inner.starts_with('@') {
        // A-d-l = At-domain *( "," At-domain ) ":" ; the colon cannot occur in a domain,
        // but it can in a quoted local part, so split at the first one only.
        let (route, rest) = inner.split_once(':').ok_or(AddressError::Syntax)?;
        for hop in route.split(',') {
            let d = hop.strip_prefix('@').ok_or(AddressError::Syntax)?;
            parse_domain(d)?;
        }
        source_route = true;
        rest
    } else {
        inner
    };
    let mut addr = parse_mailbox(mailbox)?;
    addr.flags.source_route = source_route;
    Ok(addr)
}

/// `Mailbox = Local-part "@" ( Domain / address-literal )`.
pub fn parse_mailbox(s: &str) -> Result<Address, AddressError> {
    let (local, quoted, rest) = if let Some(after) = s.strip_prefix('"') {
        let (local, consumed) = parse_quoted(after)?;
        (local, true, &after[consumed..])
    } else {
        // A Dot-string cannot contain '@', so the first '@' ends it. Whatever follows
        // must be a single domain: `user@other@accepted` fails in parse_domain.
        let at = s.find('@').ok_or(AddressError::Syntax)?;
        let local = &s[..at];
        if !is_dot_string(local) {
            return Err(AddressError::Syntax);
        }
        (local.to_string(), false, &s[at..])
    };
    let domain_text = rest.strip_prefix('@').ok_or(AddressError::Syntax)?;
    if local.len() > MAX_LOCAL_PART {
        return Err(AddressError::TooLong);
    }
    let domain = parse_domain_or_literal(domain_text)?;
    let flags = AddressFlags {
        source_route: false,
        quoted,
        percent: local.contains('%'),
        bang: local.contains('!'),
        at: local.contains('@'),
    };
    Ok(Address {
        local,
        domain,
        flags,
    })
}

/// Parses the body of a Quoted-string after its opening quote; returns the unquoted
/// text and how many bytes of `s` were consumed, closing quote included.
fn parse_quoted(s: &str) -> Result<(String, usize), AddressError> {
    let mut out = String::new();
    let mut chars = s.char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '"' => return Ok((out, i + 1)),
            // quoted-pairSMTP = %d92 %d32-126
            '\\' => match chars.next() {
                Some((_, q)) if (' '..='~').contains(&q) => out.push(q),
                _ => return Err(AddressError::Syntax),
            },
            // qtextSMTP = %d32-33 / %d35-91 / %d93-126, plus UTF8-non-ascii (RFC 6531 3.3)
            c if (' '..='~').contains(&c) || !c.is_ascii() => out.push(c),
            _ => return Err(AddressError::Syntax),
        }
    }
    Err(AddressError::Syntax)
}

/// atext (RFC 5322 3.2.3) extended with UTF8-non-ascii (RFC 6531 3.3).
fn is_atext(c: char) -> bool {
    c.is_ascii_alphanumeric() || "!#$%&'*+-/=?^_`{|}~".contains(c) || !c.is_ascii()
}

/// `Dot-string = Atom *("." Atom)`: no empty atoms, so no leading, trailing or double dot.
fn is_dot_string(s: &str) -> bool {
    !s.is_empty()
        && s.split('.')
            .all(|a| !a.is_empty() && a.chars().all(is_atext))
}

fn parse_domain_or_literal(s: &str) -> Result<Domain, AddressError> {
    if let Some(lit) = s.strip_prefix('[') {
        let lit = lit.strip_suffix(']').ok_or(AddressError::Syntax)?;
        return parse_address_literal(lit).map(Domain::Literal);
    }
    parse_domain(s).map(Domain::Name)
}

/// `IPv4-address-literal / IPv6-address-literal`; General-address-literal (RFC 5321
/// 4.1.3) names no standardised tag that we could deliver to, so it is refused.
fn parse_address_literal(s: &str) -> Result<IpAddr, AddressError> {
    if let Some(v6) = s.strip_prefix("IPv6:").or_else(|| s.strip_prefix("ipv6:")) {
        return v6
            .parse::<Ipv6Addr>()
            .map(IpAddr::V6)
            .map_err(|_| AddressError::Syntax);
    }
    // Only dotted quads: std's parser already refuses octal/hex forms like 0x7f.1.
    s.parse::<std::net::Ipv4Addr>()
        .map(IpAddr::V4)
        .map_err(|_| AddressError::Syntax)
}

/// `Domain = sub-domain *("." sub-domain)`, `sub-domain = Let-dig [Ldh-str]`, with
/// U-labels allowed (RFC 6531 3.3) and one trailing dot tolerated and removed.
/// Returns the canonical (lower-case) name.
pub fn parse_domain(s: &str) -> Result<String, AddressError> {
    let s = s.strip_suffix('.').unwrap_or(s);
    if s.is_empty() {
        return Err(AddressError::Syntax);
    }
    if s.len() > MAX_DOMAIN {
        return Err(AddressError::TooLong);
    }
    for label in s.split('.') {
        let ok = !label.is_empty()
            && label.len() <= 63
            && !label.starts_with('-')
            && !label.ends_with('-')
            && label
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || !c.is_ascii());
        if !ok {
            return Err(AddressError::Syntax);
        }
    }
    Ok(s.to_lowercase())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rcpt(s: &str) -> Result<Address, AddressError> {
        parse_path(s)
    }

    #[test]
    fn plain_and_canonical() {
        let a = rcpt("<John.Doe@Example.COM.>").unwrap();
        assert_eq!(a.local(), "John.Doe");
        assert_eq!(a.domain(), &Domain::Name("example.com".into()));
        assert!(!a.is_routed());
        assert_eq!(a.to_string(), "John.Doe@example.com");
    }

    #[test]
    fn literals_compare_by_value() {
        let a = rcpt("<u@[127.0.0.1]>").unwrap();
        assert_eq!(a.domain(), &Domain::Literal("127.0.0.1".parse().unwrap()));
        let b = rcpt("<u@[IPv6:0:0::1]>").unwrap();
        assert_eq!(b.domain(), &Domain::Literal("::1".parse().unwrap()));
        assert_eq!(b.to_string(), "u@[IPv6:::1]");
        assert!(rcpt("<u@[0x7f.0.0.1]>").is_err());
        assert!(rcpt("<u@[tag:whatever]>").is_err());
    }

    #[test]
    fn relay_tricks_are_flagged_or_refused() {
        // (input, Some(is_routed)) when it parses, None when it is a syntax error.
        let table: &[(&str, Option<bool>)] = &[
            ("<user%other.example@accepted.test>", Some(true)),
            ("<other.example!user@accepted.test>", Some(true)),
            ("<\"user@other.example\"@accepted.test>", Some(true)),
            ("<\"user%other\"@accepted.test>", Some(true)),
            ("<user@other.example@accepted.test>", None),
            ("<user@accepted.test@other.example>", None),
            ("<\"user\"@other@accepted.test>", None),
            ("<user@accepted.test:x>", None),
            ("<\"john smith\"@accepted.test>", Some(false)),
        ];
        for (input, want) in table {
            let got = rcpt(input).ok().map(|a| a.is_routed());
            assert_eq!(got, *want, "{input}");
        }
    }

    #[test]
    fn source_route_is_dropped_but_recorded() {
        let a = rcpt("<@accepted.test,@b.test:user@other.example>").unwrap();
        assert!(a.flags().source_route);
        assert_eq!(a.domain(), &Domain::Name("other.example".into()));
        assert!(rcpt("<@:user@x.test>").is_err());
        assert!(rcpt("<@a.test user@x.test>").is_err());
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "user@x.test",
            "<user>",
            "<@x.test>",
            "<.user@x.test>",
            "<us..er@x.test>",
            "<user.@x.test>",
            "<user@-x.test>",
            "<user@x..test>",
            "<user@>",
            "<user @x.test>",
            "<\"unterminated@x.test>",
            "<\"a\\\u{7}\"@x.test>",
            "<user@x_y.test>",
        ] {
            assert!(rcpt(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn limits() {
        let local = "a".repeat(65);
        assert_eq!(
            rcpt(&format!("<{local}@x.test>")),
            Err(AddressError::TooLong)
        );
        let long = format!("<u@{}.test>", "a".repeat(300));
        assert_eq!(rcpt(&long), Err(AddressError::TooLong));
    }

    #[test]
    fn utf8_addresses() {
        let a = rcpt("<用户@例子.广告>").unwrap();
        assert!(a.needs_smtputf8());
        assert!(!rcpt("<u@x.test>").unwrap().needs_smtputf8());
    }

    #[test]
    fn reverse_path() {
        assert_eq!(parse_reverse_path("<>"), Ok(ReversePath::Null));
        assert!(matches!(
            parse_reverse_path("<a@b.test>"),
            Ok(ReversePath::Mailbox(_))
        ));
    }

    #[test]
    fn display_requotes() {
        let a = rcpt("<\"john \\\"j\\\" smith\"@x.test>").unwrap();
        assert_eq!(a.local(), "john \"j\" smith");
        assert_eq!(a.to_string(), "\"john \\\"j\\\" smith\"@x.test");
    }
}
