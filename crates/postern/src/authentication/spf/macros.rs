//! SPF macros (RFC 7208 7): parsing a `macro-string` or `domain-spec` of a record, and
//! expanding one for the current evaluation.

use std::fmt::Write as _;
use std::net::IpAddr;

/// Longest expansion of one macro-string. A record of at most
/// [`super::record::MAX_RECORD_LEN`] bytes full of `%{s}` could otherwise make hundreds of
/// kilobytes; anything this long is trimmed to 253 anyway (7.3).
pub const MAX_EXPANSION: usize = 8 * 1024;

/// Longest name after expansion (7.3: the limit of a domain name in text form).
pub const MAX_DOMAIN: usize = 253;

/// A macro letter (7.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Letter {
    /// `s`: `<sender>`.
    Sender,
    /// `l`: local-part of `<sender>`.
    Local,
    /// `o`: domain of `<sender>`.
    SenderDomain,
    /// `d`: `<domain>`, the domain being checked.
    Domain,
    /// `i`: `<ip>`, IPv6 as dotted nibbles.
    Ip,
    /// `p`: the validated domain name of `<ip>` (5.5), or "unknown".
    Validated,
    /// `v`: "in-addr" or "ip6".
    Version,
    /// `h`: the HELO/EHLO domain.
    Helo,
    /// `c`: the client IP in readable form (exp only).
    ClientIp,
    /// `r`: the receiving host (exp only).
    Receiver,
    /// `t`: the current timestamp (exp only).
    Timestamp,
}

impl Letter {
    fn from_char(c: char) -> Option<Letter> {
        Some(match c.to_ascii_lowercase() {
            's' => Letter::Sender,
            'l' => Letter::Local,
            'o' => Letter::SenderDomain,
            'd' => Letter::Domain,
            'i' => Letter::Ip,
            'p' => Letter::Validated,
            'v' => Letter::Version,
            'h' => Letter::Helo,
            'c' => Letter::ClientIp,
            'r' => Letter::Receiver,
            't' => Letter::Timestamp,
            _ => return None,
        })
    }

    /// 7.2: c, r and t are allowed only in "exp" text.
    fn exp_only(self) -> bool {
        matches!(
            self,
            Letter::ClientIp | Letter::Receiver | Letter::Timestamp
        )
    }
}

/// One `%{...}` (7.1).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Macro {
    pub letter: Letter,
    /// Upper-case letter: the expansion is URL-escaped (7.3).
    pub escape: bool,
    /// The digit transformer: keep this many right-hand parts (nonzero).
    pub keep: Option<usize>,
    /// The `r` transformer: reverse the parts first.
    pub reverse: bool,
    /// The delimiters to split on; empty means ".".
    pub delimiters: Vec<u8>,
}

/// A piece of a macro-string.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Piece {
    /// Literal text (visible ASCII except `%`).
    Literal(String),
    /// `%%`, `%_` or `%-`: a macro-expand (so a valid `domain-end`) standing for this text.
    Escape(&'static str),
    Macro(Macro),
}

/// A parsed macro-string.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct MacroString {
    pub pieces: Vec<Piece>,
}

impl MacroString {
    /// Whether `letter` appears (the evaluator looks up `%{p}` only when it is needed).
    pub fn uses(&self, letter: Letter) -> bool {
        self.pieces
            .iter()
            .any(|p| matches!(p, Piece::Macro(m) if m.letter == letter))
    }
}

/// Parses a `macro-string` (7.1). `exp_letters`: whether c, r and t may appear (only in
/// explanation text, 7.2).
pub fn parse_macro_string(text: &str, exp_letters: bool) -> Result<MacroString, String> {
    let mut pieces = Vec::new();
    let mut literal = String::new();
    let mut chars = text.char_indices().peekable();
    while let Some((at, c)) = chars.next() {
        if c != '%' {
            // macro-literal = %x21-24 / %x26-7E
            if !c.is_ascii_graphic() {
                return Err(format!("invalid character {:?} in {text:?}", c));
            }
            literal.push(c);
            continue;
        }
        let escape = match chars.next() {
            Some((_, '%')) => Some("%"),
            Some((_, '_')) => Some(" "),
            Some((_, '-')) => Some("%20"),
            Some((_, '{')) => None,
            _ => return Err(format!("a lone % at offset {at} in {text:?}")),
        };
        if !literal.is_empty() {
            pieces.push(Piece::Literal(std::mem::take(&mut literal)));
        }
        if let Some(e) = escape {
            pieces.push(Piece::Escape(e));
            continue;
        }
        // "%{" macro-letter transformers *delimiter "}"
        let Some((_, l)) = chars.next() else {
            return Err(format!("unterminated macro in {text:?}"));
        };
        let letter = Letter::from_char(l)
            .ok_or_else(|| format!("unknown macro letter {l:?} in {text:?}"))?;
        if letter.exp_only() && !exp_letters {
            return Err(format!(
                "macro %{{{l}}} is allowed only in explanation text (RFC 7208 7.2)"
            ));
        }
        let mut keep: Option<usize> = None;
        while let Some((_, d)) = chars.peek().copied()
            && d.is_ascii_digit()
        {
            chars.next();
            let digit = usize::from(d as u8 - b'0');
            // Saturating: more parts than there are keeps them all.
            keep = Some(keep.unwrap_or(0).saturating_mul(10).saturating_add(digit));
        }
        if keep == Some(0) {
            // 7.3: "If a DIGIT is specified, the value MUST be nonzero."
            return Err(format!("a zero digit transformer in {text:?}"));
        }
        let mut reverse = false;
        if let Some((_, 'r' | 'R')) = chars.peek() {
            chars.next();
            reverse = true;
        }
        let mut delimiters = Vec::new();
        loop {
            match chars.next() {
                Some((_, '}')) => break,
                Some((_, d)) if ".-+,/_=".contains(d) => delimiters.push(d as u8),
                Some((_, other)) => {
                    return Err(format!("invalid {other:?} in a macro of {text:?}"));
                }
                None => return Err(format!("unterminated macro in {text:?}")),
            }
        }
        pieces.push(Piece::Macro(Macro {
            letter,
            escape: l.is_ascii_uppercase(),
            keep,
            reverse,
            delimiters,
        }));
    }
    if !literal.is_empty() {
        pieces.push(Piece::Literal(literal));
    }
    Ok(MacroString { pieces })
}

/// Parses a `domain-spec` (7.1, 12): a macro-string ending in a macro-expand or in
/// `"." toplabel ["."]`.
pub fn parse_domain_spec(text: &str) -> Result<MacroString, String> {
    if text.is_empty() {
        return Err("an empty domain".to_string());
    }
    let ms = parse_macro_string(text, false)?;
    match ms.pieces.last() {
        Some(Piece::Macro(_) | Piece::Escape(_)) => Ok(ms),
        Some(Piece::Literal(tail)) => {
            let tail = tail.strip_suffix('.').unwrap_or(tail);
            match tail.rsplit_once('.') {
                Some((_, top)) if is_toplabel(top) => Ok(ms),
                _ => Err(format!("{text:?} does not end in a top-level label")),
            }
        }
        None => Err("an empty domain".to_string()),
    }
}

/// `toplabel = ( *alphanum ALPHA *alphanum ) / ( 1*alphanum "-" *( alphanum / "-" )
/// alphanum )`: letters, digits and inner hyphens, not all digits.
fn is_toplabel(label: &str) -> bool {
    let b = label.as_bytes();
    let (Some(first), Some(last)) = (b.first(), b.last()) else {
        return false;
    };
    first.is_ascii_alphanumeric()
        && last.is_ascii_alphanumeric()
        && b.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        && b.iter().any(|c| c.is_ascii_alphabetic() || *c == b'-')
}

/// What the macros stand for in one evaluation (7.2).
#[derive(Debug, Clone, Copy)]
pub struct Context<'a> {
    /// The local-part of `<sender>` ("postmaster" when it had none, 4.3).
    pub local: &'a str,
    /// The domain of `<sender>`.
    pub sender_domain: &'a str,
    /// `<domain>`, the domain whose record is being evaluated.
    pub domain: &'a str,
    pub ip: IpAddr,
    pub helo: &'a str,
    /// `%{p}`: the validated name, if the evaluator found one.
    pub validated: Option<&'a str>,
    /// `%{r}`: our own name.
    pub receiver: &'a str,
    /// `%{t}`: seconds since the epoch.
    pub now: u64,
}

/// Expands `ms` (7.3). Errors only for an expansion longer than [`MAX_EXPANSION`].
pub fn expand(ms: &MacroString, ctx: &Context<'_>) -> Result<String, String> {
    let mut out = String::new();
    for piece in &ms.pieces {
        match piece {
            Piece::Literal(t) => out.push_str(t),
            Piece::Escape(t) => out.push_str(t),
            Piece::Macro(m) => {
                let value = value(m.letter, ctx);
                let transformed = transform(&value, m);
                if m.escape {
                    url_escape(&transformed, &mut out);
                } else {
                    out.push_str(&transformed);
                }
            }
        }
        if out.len() > MAX_EXPANSION {
            return Err(format!(
                "a macro expansion longer than {MAX_EXPANSION} bytes"
            ));
        }
    }
    Ok(out)
}

/// 7.3: an expanded name over 253 characters loses labels from the left until it fits.
pub fn trim_domain(mut name: &str) -> &str {
    while name.len() > MAX_DOMAIN {
        match name.split_once('.') {
            Some((_, rest)) => name = rest,
            None => break,
        }
    }
    name
}

fn value(letter: Letter, ctx: &Context<'_>) -> String {
    match letter {
        Letter::Sender => format!("{}@{}", ctx.local, ctx.sender_domain),
        Letter::Local => ctx.local.to_string(),
        Letter::SenderDomain => ctx.sender_domain.to_string(),
        Letter::Domain => ctx.domain.to_string(),
        Letter::Ip => dotted(ctx.ip),
        Letter::Validated => ctx.validated.unwrap_or("unknown").to_string(),
        Letter::Version => match ctx.ip {
            IpAddr::V4(_) => "in-addr".to_string(),
            IpAddr::V6(_) => "ip6".to_string(),
        },
        Letter::Helo => ctx.helo.to_string(),
        Letter::ClientIp => ctx.ip.to_string(),
        Letter::Receiver => ctx.receiver.to_string(),
        Letter::Timestamp => ctx.now.to_string(),
    }
}

/// `%{i}`: IPv4 dotted-quad; IPv6 as 32 dot-separated nibbles (7.3).
fn dotted(ip: IpAddr) -> String {
    match ip {
        IpAddr::V4(v4) => v4.to_string(),
        IpAddr::V6(v6) => {
            let mut s = String::with_capacity(63);
            for (n, byte) in v6.octets().iter().enumerate() {
                if n > 0 {
                    s.push('.');
                }
                let _ = write!(s, "{:x}.{:x}", byte >> 4, byte & 0xf);
            }
            s
        }
    }
}

/// 7.3: split on the delimiters (default "."), reverse if asked, keep the right-hand
/// parts the digit says, join with ".".
fn transform(value: &str, m: &Macro) -> String {
    if m.keep.is_none() && !m.reverse && m.delimiters.is_empty() {
        return value.to_string();
    }
    let delimiters: &[u8] = if m.delimiters.is_empty() {
        b"."
    } else {
        &m.delimiters
    };
    let mut parts: Vec<&str> = value
        .split(|c: char| c.is_ascii() && delimiters.contains(&(c as u8)))
        .collect();
    if m.reverse {
        parts.reverse();
    }
    let keep = m.keep.unwrap_or(parts.len()).min(parts.len());
    parts[parts.len() - keep..].join(".")
}

/// 7.3: URL escaping of everything outside RFC 3986's unreserved set.
fn url_escape(s: &str, out: &mut String) {
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'.' | b'_' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// RFC 7208 7.4: the sender, the addresses.
    fn ctx(ip: &str) -> Context<'static> {
        Context {
            local: "strong-bad",
            sender_domain: "email.example.com",
            domain: "email.example.com",
            ip: ip.parse().unwrap(),
            helo: "mx.example.org",
            validated: Some("mx.example.org"),
            receiver: "relay.example.net",
            now: 1_700_000_000,
        }
    }

    fn x(spec: &str, ip: &str) -> String {
        let ms = parse_macro_string(spec, true).unwrap_or_else(|e| panic!("{spec}: {e}"));
        expand(&ms, &ctx(ip)).unwrap()
    }

    #[test]
    fn rfc_7208_7_4_examples() {
        let v4 = "192.0.2.3";
        for (spec, expected) in [
            ("%{s}", "strong-bad@email.example.com"),
            ("%{o}", "email.example.com"),
            ("%{d}", "email.example.com"),
            ("%{d4}", "email.example.com"),
            ("%{d3}", "email.example.com"),
            ("%{d2}", "example.com"),
            ("%{d1}", "com"),
            ("%{dr}", "com.example.email"),
            ("%{d2r}", "example.email"),
            ("%{l}", "strong-bad"),
            ("%{l-}", "strong.bad"),
            ("%{lr}", "strong-bad"),
            ("%{lr-}", "bad.strong"),
            ("%{l1r-}", "strong"),
            (
                "%{ir}.%{v}._spf.%{d2}",
                "3.2.0.192.in-addr._spf.example.com",
            ),
            ("%{lr-}.lp._spf.%{d2}", "bad.strong.lp._spf.example.com"),
            (
                "%{lr-}.lp.%{ir}.%{v}._spf.%{d2}",
                "bad.strong.lp.3.2.0.192.in-addr._spf.example.com",
            ),
            (
                "%{ir}.%{v}.%{l1r-}.lp._spf.%{d2}",
                "3.2.0.192.in-addr.strong.lp._spf.example.com",
            ),
            (
                "%{d2}.trusted-domains.example.net",
                "example.com.trusted-domains.example.net",
            ),
        ] {
            assert_eq!(x(spec, v4), expected, "{spec}");
        }
        assert_eq!(
            x("%{ir}.%{v}._spf.%{d2}", "2001:db8::cb01"),
            "1.0.b.c.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6._spf.example.com"
        );
    }

    #[test]
    fn other_letters_escapes_and_url_encoding() {
        let v4 = "192.0.2.3";
        assert_eq!(x("%{i}", v4), "192.0.2.3");
        assert_eq!(
            x("%{i}", "2001:db8::cb01"),
            "2.0.0.1.0.d.b.8.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.c.b.0.1"
        );
        assert_eq!(x("%{c}", "2001:db8::cb01"), "2001:db8::cb01");
        assert_eq!(x("%{h}", v4), "mx.example.org");
        assert_eq!(x("%{p}", v4), "mx.example.org");
        assert_eq!(x("%{r}", v4), "relay.example.net");
        assert_eq!(x("%{t}", v4), "1700000000");
        assert_eq!(x("%{v}", "2001:db8::1"), "ip6");
        assert_eq!(x("a%%b%_c%-d", v4), "a%b c%20d");
        // Upper case: URL-escaped after the transformers (7.3).
        assert_eq!(x("%{S}", v4), "strong-bad%40email.example.com");
        assert_eq!(x("%{L}", v4), "strong-bad");
        // Several delimiters; a big digit keeps everything.
        let mut c = ctx(v4);
        c.local = "a+b-c.d";
        let ms = parse_macro_string("%{l+-}|%{l99999999999999999999999r+-.}", false);
        let ms = ms.unwrap();
        assert_eq!(expand(&ms, &c).unwrap(), "a.b.c.d|d.c.b.a");
        // No validated name: "unknown".
        c.validated = None;
        let ms = parse_macro_string("%{p}", false).unwrap();
        assert_eq!(expand(&ms, &c).unwrap(), "unknown");
    }

    #[test]
    fn syntax_errors() {
        for bad in [
            "%", "a%", "%x", "%{", "%{s", "%{x}", "%{s0}", "%{s:}", "%{sr2}", "a b", "é",
        ] {
            assert!(parse_macro_string(bad, true).is_err(), "{bad:?}");
        }
        // 7.2: c, r and t only in explanation text.
        for exp_only in ["%{c}", "%{r}", "%{t}", "%{C}"] {
            assert!(parse_macro_string(exp_only, false).is_err(), "{exp_only}");
            assert!(parse_macro_string(exp_only, true).is_ok(), "{exp_only}");
        }
    }

    #[test]
    fn domain_specs() {
        for good in [
            "example.com",
            "example.com.",
            "_spf.example.com",
            "%{d}",
            "%{ir}.%{v}._spf.%{d2}",
            "x.%%",
            "%{d}.example-1.com",
            "a.1-2",
        ] {
            assert!(parse_domain_spec(good).is_ok(), "{good}");
        }
        for bad in [
            "",
            "com",
            "%{d}com",
            "example.123",
            "example.-com",
            "example.com-",
            "example.",
            "example.com..",
            "1.2.3.4",
            "example.c_m",
        ] {
            assert!(parse_domain_spec(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn long_names_are_trimmed_from_the_left() {
        let long = format!("{}.example.com", ["abcdefghi"; 30].join("."));
        assert!(long.len() > MAX_DOMAIN);
        let t = trim_domain(&long);
        assert!(t.len() <= MAX_DOMAIN, "{}", t.len());
        assert!(t.ends_with(".example.com") && t.starts_with("abcdefghi."));
        // Whole labels, no more than needed (each is 10 with its dot).
        assert!(t.len() > MAX_DOMAIN - 10, "{}", t.len());
        assert_eq!(trim_domain("a.example.com"), "a.example.com");
        let one = "x".repeat(300);
        assert_eq!(trim_domain(&one), one);
    }

    #[test]
    fn expansion_is_bounded() {
        let spec = "%{s}".repeat(1000);
        let ms = parse_macro_string(&spec, false).unwrap();
        assert!(expand(&ms, &ctx("192.0.2.3")).is_err());
    }
}
