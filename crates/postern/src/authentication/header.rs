//! The `Authentication-Results:` field (RFC 8601): writing ours, and removing those that
//! claim to be ours (RFC 8601 5).

use std::borrow::Cow;

/// The field name.
pub const FIELD: &str = "Authentication-Results";

/// Longest `reason=` text; longer ones are cut (the field must stay under 998 octets a
/// line, RFC 5322 2.1.1, and a DNS-supplied text must not make it grow).
const MAX_REASON: usize = 200;

/// Builds one field: `Authentication-Results: ID;` then one result per line.
pub struct Builder {
    text: String,
    results: usize,
}

impl Builder {
    pub fn new(authserv_id: &str) -> Builder {
        Builder {
            text: format!("{FIELD}: {}", value(authserv_id)),
            results: 0,
        }
    }

    /// One `method=result [reason="..."] ptype.property=value ...` (RFC 8601 2.2: the
    /// reason comes before the properties).
    pub fn result(
        &mut self,
        method: &str,
        result: &str,
        reason: Option<&str>,
        props: &[(&str, &str)],
    ) {
        self.results += 1;
        self.text.push_str(";\r\n\t");
        self.text.push_str(method);
        self.text.push('=');
        self.text.push_str(result);
        if let Some(r) = reason {
            self.text.push_str(" reason=");
            self.text.push_str(&quoted(r, MAX_REASON));
        }
        for (name, v) in props {
            self.text.push(' ');
            self.text.push_str(name);
            self.text.push('=');
            self.text.push_str(&value(v));
        }
    }

    /// The whole field, CRLF-terminated; `ID; none` when no result was added (RFC 8601
    /// 2.2, no-result).
    pub fn finish(mut self) -> String {
        if self.results == 0 {
            self.text.push_str("; none");
        }
        self.text.push_str("\r\n");
        self.text
    }
}

/// A property value or authserv-id: as it is when it is a plain name, otherwise a
/// quoted-string (RFC 8601 2.2 `pvalue`, RFC 2045 `value`).
fn value(v: &str) -> String {
    let plain = !v.is_empty()
        && v.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'));
    if plain {
        v.to_string()
    } else {
        quoted(v, MAX_REASON)
    }
}

/// A quoted-string of printable ASCII (RFC 5322 3.2.4): `"` and `\` escaped, anything
/// else (control characters, CR, LF, 8-bit) becomes `?`, so nothing from DNS or the
/// client can end the field or add one.
fn quoted(s: &str, max: usize) -> String {
    let mut out = String::with_capacity(s.len().min(max) + 2);
    out.push('"');
    for (n, c) in s.chars().enumerate() {
        if n == max {
            out.push_str("...");
            break;
        }
        match c {
            '"' | '\\' => {
                out.push('\\');
                out.push(c);
            }
            ' '..='~' => out.push(c),
            _ => out.push('?'),
        }
    }
    out.push('"');
    out
}

/// `message` without the `Authentication-Results:` fields whose authserv-id is
/// `authserv_id` (compared without regard to case): RFC 8601 5 says a receiver MUST
/// remove, or rename, such fields arriving from outside, since they would otherwise
/// pass for our own results. Other `Authentication-Results:` fields are kept (they are
/// other hosts' claims, RFC 8601 5 lets them be). Folded fields go whole. Only the header
/// section is looked at; without such a field nothing is copied.
pub fn strip_forged<'a>(message: &'a [u8], authserv_id: &str) -> Cow<'a, [u8]> {
    let mut drop: Vec<(usize, usize)> = Vec::new();
    let mut at = 0;
    while at < message.len() {
        let end = field_end(message, at);
        let field = &message[at..end];
        // An empty line (or a line that starts with a space: broken input) ends the
        // header section for this purpose.
        if field.first().is_none_or(|b| matches!(b, b'\r' | b'\n')) {
            break;
        }
        if is_ours(field, authserv_id) {
            drop.push((at, end));
        }
        at = end;
    }
    if drop.is_empty() {
        return Cow::Borrowed(message);
    }
    let mut out = Vec::with_capacity(message.len());
    let mut from = 0;
    for (start, end) in drop {
        out.extend_from_slice(&message[from..start]);
        from = end;
    }
    out.extend_from_slice(&message[from..]);
    Cow::Owned(out)
}

/// Where the field starting at `start` ends: after the LF of its last line, its
/// continuation lines (starting with SP or HTAB, RFC 5322 2.2.3) included.
fn field_end(message: &[u8], start: usize) -> usize {
    let mut at = start;
    loop {
        match memchr::memchr(b'\n', &message[at..]) {
            None => return message.len(),
            Some(i) => at += i + 1,
        }
        if !matches!(message.get(at), Some(b' ' | b'\t')) {
            return at;
        }
    }
}

/// Whether one whole field is an `Authentication-Results:` naming `authserv_id`.
fn is_ours(field: &[u8], authserv_id: &str) -> bool {
    let Some(colon) = memchr::memchr(b':', field) else {
        return false;
    };
    // RFC 5322 4.5.3 (obsolete syntax): blanks may stand before the colon.
    let name = field[..colon].trim_ascii_end();
    if !name.eq_ignore_ascii_case(FIELD.as_bytes()) {
        return false;
    }
    match authserv_id_of(&field[colon + 1..]) {
        Some(id) => id.eq_ignore_ascii_case(authserv_id.as_bytes()),
        None => false,
    }
}

/// The authserv-id at the start of a field body (RFC 8601 2.2: `[CFWS] authserv-id`,
/// a token or a quoted-string), unquoted.
fn authserv_id_of(body: &[u8]) -> Option<Cow<'_, [u8]>> {
    let mut i = skip_cfws(body, 0);
    if body.get(i) == Some(&b'"') {
        let mut out = Vec::new();
        i += 1;
        while let Some(&b) = body.get(i) {
            match b {
                b'"' => return Some(Cow::Owned(out)),
                b'\\' => {
                    if let Some(&next) = body.get(i + 1) {
                        out.push(next);
                    }
                    i += 2;
                }
                b'\r' | b'\n' => i += 1,
                _ => {
                    out.push(b);
                    i += 1;
                }
            }
        }
        return None;
    }
    let start = i;
    while let Some(&b) = body.get(i) {
        if b.is_ascii_whitespace() || matches!(b, b';' | b'(' | b'"') {
            break;
        }
        i += 1;
    }
    (i > start).then(|| Cow::Borrowed(&body[start..i]))
}

/// Skips folding white space and comments (nested, with quoted pairs; RFC 5322 3.2.2).
fn skip_cfws(s: &[u8], mut i: usize) -> usize {
    let mut depth = 0usize;
    while let Some(&b) = s.get(i) {
        match b {
            b'(' => depth += 1,
            b')' if depth > 0 => depth -= 1,
            b'\\' if depth > 0 => i += 1,
            b' ' | b'\t' | b'\r' | b'\n' => {}
            _ if depth > 0 => {}
            _ => return i,
        }
        i += 1;
    }
    i
}

#[cfg(test)]
mod tests {
    use super::*;

    const ID: &str = "relay.example.net";

    fn strip(m: &str) -> String {
        String::from_utf8(strip_forged(m.as_bytes(), ID).into_owned()).unwrap()
    }

    #[test]
    fn builds_the_field() {
        let mut b = Builder::new(ID);
        b.result(
            "spf",
            "fail",
            Some("192.0.2.1 is not allowed by a.example's SPF record"),
            &[("smtp.mailfrom", "a.example")],
        );
        b.result("dkim", "none", None, &[]);
        assert_eq!(
            b.finish(),
            "Authentication-Results: relay.example.net;\r\n\tspf=fail reason=\"192.0.2.1 is \
             not allowed by a.example's SPF record\" smtp.mailfrom=a.example;\r\n\tdkim=none\r\n"
        );
        assert_eq!(
            Builder::new(ID).finish(),
            "Authentication-Results: relay.example.net; none\r\n"
        );
    }

    #[test]
    fn values_cannot_break_the_field() {
        let mut b = Builder::new(ID);
        b.result(
            "spf",
            "fail",
            Some("evil\r\nX-Injected: yes \"q\" \\"),
            &[("smtp.helo", "a b\r\n")],
        );
        let f = b.finish();
        assert_eq!(f.matches("\r\n").count(), 2, "{f}");
        assert!(
            f.contains(r#"reason="evil??X-Injected: yes \"q\" \\""#),
            "{f}"
        );
        assert!(f.contains(r#"smtp.helo="a b??""#), "{f}");
        let mut b = Builder::new(ID);
        b.result("spf", "fail", Some(&"x".repeat(5000)), &[]);
        assert!(b.finish().len() < 300);
    }

    #[test]
    fn strips_only_our_fields() {
        let m = "Received: from x\r\n\
                 Authentication-Results: relay.example.net; spf=pass\r\n\
                 Authentication-Results: other.example; dkim=pass\r\n\
                 authentication-results:   RELAY.Example.NET;\r\n\tdkim=pass\r\n header.d=a\r\n\
                 Authentication-Results: (comment (nested)) relay.example.net 1; none\r\n\
                 Authentication-Results: \"relay.example.net\"; none\r\n\
                 Authentication-Results : relay.example.net; none\r\n\
                 Subject: hi\r\n\
                 \r\n\
                 Authentication-Results: relay.example.net; in the body\r\n";
        assert_eq!(
            strip(m),
            "Received: from x\r\n\
             Authentication-Results: other.example; dkim=pass\r\n\
             Subject: hi\r\n\
             \r\n\
             Authentication-Results: relay.example.net; in the body\r\n"
        );
    }

    #[test]
    fn similar_ids_and_other_fields_are_kept() {
        let m = "Authentication-Results: relay.example.net.evil; spf=pass\r\n\
                 Authentication-Results: mx.relay.example.net; spf=pass\r\n\
                 X-Authentication-Results: relay.example.net; spf=pass\r\n\
                 \r\nbody";
        assert!(matches!(strip_forged(m.as_bytes(), ID), Cow::Borrowed(_)));
        // LF-only lines, a last field without a line end, no body.
        assert_eq!(
            strip("A: 1\nAuthentication-Results: relay.example.net;\n none\nB: 2\n"),
            "A: 1\nB: 2\n"
        );
        assert_eq!(
            strip("A: 1\r\nAuthentication-Results: relay.example.net"),
            "A: 1\r\n"
        );
        assert_eq!(strip(""), "");
    }
}
