//! SMTP command lines (RFC 5321 4.1.1) parsed into `Command`s.
//!
//! Trust: the line comes straight from the network. The framing layer has already
//! bounded it to 512 octets and removed the line ending; this module checks the syntax
//! and turns every error into the reply the client should see, from the catalogue.

use crate::address::{self, Address, ReversePath};
use crate::reply::{Reply, catalogue};

/// One parsed command. Parameters are validated by the session, which knows what was
/// advertised; here they are only split into `KEYWORD[=value]` pairs.
#[derive(Debug, PartialEq, Eq)]
pub enum Command {
    Ehlo(String),
    Helo(String),
    Mail {
        from: ReversePath,
        params: Vec<Param>,
    },
    Rcpt {
        to: Address,
        params: Vec<Param>,
    },
    Data,
    /// RFC 3030: `BDAT chunk-size [LAST]`.
    Bdat {
        size: u64,
        last: bool,
    },
    Rset,
    Noop,
    Vrfy,
    Expn,
    Help,
    Quit,
    StartTls,
    /// RFC 4954: `AUTH mechanism [initial-response]`; mechanism upper-cased.
    Auth {
        mechanism: String,
        initial: Option<String>,
    },
}

/// An ESMTP parameter (RFC 5321 4.1.2 `esmtp-param`); keyword upper-cased.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Param {
    pub keyword: String,
    pub value: Option<String>,
}

impl Param {
    /// The parameter as it appeared, for the spool envelope: `KEY=value` or `KEY`.
    pub fn to_wire(&self) -> String {
        match &self.value {
            Some(v) => format!("{}={}", self.keyword, v),
            None => self.keyword.clone(),
        }
    }
}

/// Parses one command line (without CRLF). `Err` carries the reply to send.
pub fn parse(line: &[u8]) -> Result<Command, Reply> {
    // Commands are ASCII; only MAIL/RCPT paths may carry UTF-8 (RFC 6531), which the
    // address parser handles. Invalid UTF-8 is therefore never a valid command.
    let line = std::str::from_utf8(line).map_err(|_| catalogue::unrecognized())?;
    let (verb, rest) = match line.find(' ') {
        Some(i) => (&line[..i], &line[i + 1..]),
        None => (line, ""),
    };
    if verb.len() > 8 || !verb.is_ascii() {
        return Err(catalogue::unrecognized());
    }
    let no_args = |cmd: Command| {
        if rest.trim().is_empty() {
            Ok(cmd)
        } else {
            Err(catalogue::syntax("Syntax error: no arguments allowed"))
        }
    };
    match verb.to_ascii_uppercase().as_str() {
        "EHLO" => greeting_arg(rest, "EHLO").map(Command::Ehlo),
        "HELO" => greeting_arg(rest, "HELO").map(Command::Helo),
        "MAIL" => {
            let (path, params) = split_path(rest, "FROM:")
                .ok_or(catalogue::syntax("Syntax: MAIL FROM:<address>"))?;
            let from =
                address::parse_reverse_path(path).map_err(|_| catalogue::bad_sender_syntax())?;
            Ok(Command::Mail {
                from,
                params: parse_params(params)?,
            })
        }
        "RCPT" => {
            let (path, params) =
                split_path(rest, "TO:").ok_or(catalogue::syntax("Syntax: RCPT TO:<address>"))?;
            Ok(Command::Rcpt {
                to: parse_forward_path(path)?,
                params: parse_params(params)?,
            })
        }
        "DATA" => no_args(Command::Data),
        "BDAT" => parse_bdat(rest),
        "RSET" => no_args(Command::Rset),
        // RFC 5321 4.1.1.9: NOOP may carry a string, which is ignored.
        "NOOP" => Ok(Command::Noop),
        "VRFY" if rest.trim().is_empty() => Err(catalogue::syntax("Syntax: VRFY address")),
        "VRFY" => Ok(Command::Vrfy),
        "EXPN" => Ok(Command::Expn),
        "HELP" => Ok(Command::Help),
        "QUIT" => no_args(Command::Quit),
        "STARTTLS" => no_args(Command::StartTls),
        "AUTH" => parse_auth(rest),
        _ => Err(catalogue::unrecognized()),
    }
}

/// RCPT TO's path, with RFC 5321 4.5.1's domain-less `<Postmaster>` kept apart.
fn parse_forward_path(path: &str) -> Result<Address, Reply> {
    if path.eq_ignore_ascii_case("<postmaster>") {
        // The session fills in the domain; use a marker domain that cannot be typed.
        return Ok(Address::postmaster(POSTMASTER_MARKER));
    }
    address::parse_path(path).map_err(|_| catalogue::bad_recipient_syntax())
}

/// Stands in for "our own domain" in a bare `<Postmaster>`: the empty name, which the
/// address parser never produces, so no typed address can be mistaken for it. The
/// session replaces it with its hostname.
pub(crate) const POSTMASTER_MARKER: &str = "";

fn greeting_arg(rest: &str, cmd: &'static str) -> Result<String, Reply> {
    // Take the first word: clients commonly send exactly one; extra words are ignored
    // as Postfix does. The name is recorded in Received:, so it must be printable.
    let word = rest.split_whitespace().next().unwrap_or("");
    if word.is_empty() || word.chars().any(|c| c.is_control()) {
        return Err(catalogue::helo_syntax(cmd));
    }
    Ok(word.to_string())
}

/// Splits `FROM:<path> params` into the path and the parameter text. A space after the
/// colon is tolerated (common in the wild, harmless); the angle brackets are required.
fn split_path<'a>(rest: &'a str, keyword: &str) -> Option<(&'a str, &'a str)> {
    let head = rest.get(..keyword.len())?;
    if !head.eq_ignore_ascii_case(keyword) {
        return None;
    }
    let after = rest[keyword.len()..].trim_start_matches(' ');
    if !after.starts_with('<') {
        return None;
    }
    // The path ends at the first '>' that is not inside a quoted local part.
    let mut in_quote = false;
    let mut escaped = false;
    for (i, c) in after.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' if in_quote => escaped = true,
            '"' => in_quote = !in_quote,
            '>' if !in_quote => return Some((&after[..=i], &after[i + 1..])),
            _ => {}
        }
    }
    None
}

/// `Mail-parameters = esmtp-param *(SP esmtp-param)`; `esmtp-keyword = (ALPHA / DIGIT)
/// *(ALPHA / DIGIT / "-")`; `esmtp-value = 1*(%d33-60 / %d62-126)`, plus UTF-8 for
/// SMTPUTF8 (RFC 6531 3.3).
fn parse_params(text: &str) -> Result<Vec<Param>, Reply> {
    if !text.is_empty() && !text.starts_with(' ') {
        return Err(catalogue::syntax("Syntax error in parameters"));
    }
    let mut params = Vec::new();
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        let (k, v) = match word.split_once('=') {
            Some((k, v)) => (k, Some(v)),
            None => (word, None),
        };
        let key_ok = k.chars().next().is_some_and(|c| c.is_ascii_alphanumeric())
            && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '-');
        let value_ok = v
            .is_none_or(|v| !v.is_empty() && v.chars().all(|c| c > ' ' && c != '=' && c != '\x7f'));
        if !key_ok || !value_ok {
            return Err(catalogue::syntax("Syntax error in parameters"));
        }
        params.push(Param {
            keyword: k.to_ascii_uppercase(),
            value: v.map(str::to_string),
        });
    }
    Ok(params)
}

/// `AUTH SP sasl-mech [SP initial-response]` (RFC 4954 4); `sasl-mech` is 1-20
/// characters of upper-case letters, digits, `-` and `_` (RFC 4422 3.1).
fn parse_auth(rest: &str) -> Result<Command, Reply> {
    let mut words = rest.split(' ');
    let mechanism = words.next().unwrap_or("").to_ascii_uppercase();
    let ok = (1..=20).contains(&mechanism.len())
        && mechanism
            .bytes()
            .all(|b| b.is_ascii_uppercase() || b.is_ascii_digit() || b == b'-' || b == b'_');
    if !ok {
        return Err(catalogue::syntax(
            "Syntax: AUTH mechanism [initial-response]",
        ));
    }
    let initial = words.next().map(str::to_string);
    if words.next().is_some() || initial.as_deref() == Some("") {
        return Err(catalogue::syntax(
            "Syntax: AUTH mechanism [initial-response]",
        ));
    }
    Ok(Command::Auth { mechanism, initial })
}

/// `BDAT SP chunk-size [ SP end-marker ]` (RFC 3030 4).
fn parse_bdat(rest: &str) -> Result<Command, Reply> {
    let mut words = rest.split(' ');
    let size = words
        .next()
        .filter(|s| !s.is_empty() && s.len() <= 19 && s.bytes().all(|b| b.is_ascii_digit()))
        .and_then(|s| s.parse::<u64>().ok())
        .ok_or(catalogue::syntax("Syntax: BDAT size [LAST]"))?;
    let last = match words.next() {
        None => false,
        Some(w) if w.eq_ignore_ascii_case("LAST") => true,
        Some(_) => return Err(catalogue::syntax("Syntax: BDAT size [LAST]")),
    };
    if words.next().is_some() {
        return Err(catalogue::syntax("Syntax: BDAT size [LAST]"));
    }
    Ok(Command::Bdat { size, last })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn p(s: &str) -> Result<Command, u16> {
        parse(s.as_bytes()).map_err(|r| r.code)
    }

    #[test]
    fn table() {
        assert_eq!(
            p("EHLO client.test"),
            Ok(Command::Ehlo("client.test".into()))
        );
        assert_eq!(p("helo  x"), Ok(Command::Helo("x".into())));
        assert_eq!(p("EHLO"), Err(501));
        assert_eq!(p("DATA"), Ok(Command::Data));
        assert_eq!(p("data x"), Err(501));
        assert_eq!(p("NOOP anything"), Ok(Command::Noop));
        assert_eq!(
            p("BDAT 100 LAST"),
            Ok(Command::Bdat {
                size: 100,
                last: true
            })
        );
        assert_eq!(
            p("BDAT 0"),
            Ok(Command::Bdat {
                size: 0,
                last: false
            })
        );
        assert_eq!(p("BDAT -1"), Err(501));
        assert_eq!(p("BDAT 99999999999999999999999"), Err(501));
        assert_eq!(p("BDAT 1 LAST x"), Err(501));
        assert_eq!(p("FOO"), Err(500));
        assert_eq!(p("VRFY"), Err(501));
        assert_eq!(p(""), Err(500));
        assert_eq!(
            p("auth plain AGEAYg=="),
            Ok(Command::Auth {
                mechanism: "PLAIN".into(),
                initial: Some("AGEAYg==".into())
            })
        );
        assert_eq!(
            p("AUTH LOGIN"),
            Ok(Command::Auth {
                mechanism: "LOGIN".into(),
                initial: None
            })
        );
        assert_eq!(p("AUTH"), Err(501));
        assert_eq!(p("AUTH PLAIN a b"), Err(501));
        assert_eq!(p("AUTH PL@IN"), Err(501));
    }

    #[test]
    fn mail_and_rcpt() {
        match p("MAIL FROM:<a@b.test> SIZE=100 body=8bitmime SMTPUTF8") {
            Ok(Command::Mail { from, params }) => {
                assert_eq!(from.to_string(), "<a@b.test>");
                let kw: Vec<_> = params.iter().map(Param::to_wire).collect();
                assert_eq!(kw, ["SIZE=100", "BODY=8bitmime", "SMTPUTF8"]);
            }
            other => panic!("{other:?}"),
        }
        assert!(matches!(
            p("mail from: <>"),
            Ok(Command::Mail {
                from: ReversePath::Null,
                ..
            })
        ));
        assert_eq!(p("MAIL FROM:a@b.test"), Err(501));
        assert_eq!(p("MAIL TO:<a@b.test>"), Err(501));
        assert_eq!(p("MAIL FROM:<a@b.test>SIZE=1"), Err(501));
        assert_eq!(p("MAIL FROM:<a@b.test> SIZE="), Err(501));
        assert_eq!(p("RCPT TO:<a@b@c.test>"), Err(501));
        assert!(matches!(
            p("RCPT TO:<\"a>b\"@c.test>"),
            Ok(Command::Rcpt { .. })
        ));
        match p("RCPT TO:<Postmaster>") {
            Ok(Command::Rcpt { to, .. }) => assert_eq!(to.local(), "postmaster"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn invalid_utf8_is_unrecognized() {
        assert_eq!(parse(b"EHLO \xff").map_err(|r| r.code), Err(500));
    }
}
