//! What a server announces in its EHLO reply (RFC 5321 4.1.1.1: the first line is the
//! server's name, every further line an extension keyword and its parameters).
//!
//! Keywords are matched case-insensitively (RFC 5321 2.4); unknown ones are ignored.

use std::collections::HashSet;

use crate::reply::Reply;

/// What the server said it supports in its last EHLO reply (RFC 5321 4.1.1.1). Empty
/// after HELO.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Extensions {
    /// RFC 2920.
    pub pipelining: bool,
    /// RFC 1870: `Some(limit)` when SIZE is advertised; `Some(0)` means advertised
    /// without a fixed limit (RFC 1870 4).
    pub size: Option<u64>,
    /// RFC 6152.
    pub eight_bit_mime: bool,
    /// RFC 6531.
    pub smtputf8: bool,
    /// RFC 3207.
    pub starttls: bool,
    /// RFC 4954: the mechanisms offered, upper case.
    pub auth: Vec<String>,
    /// RFC 3030 (noted, not used: we send DATA).
    pub chunking: bool,
    /// RFC 2034.
    pub enhanced_status_codes: bool,
}

impl Extensions {
    /// Reads the keyword lines of an EHLO reply (the first line is the server's name).
    pub fn from_ehlo(reply: &Reply) -> Extensions {
        let mut ext = Extensions::default();
        // Mechanisms already listed: a hostile reply may repeat thousands of them, and a
        // search of the list for each would cost quadratic time.
        let mut seen = HashSet::new();
        for line in reply.lines.iter().skip(1) {
            let mut words = line.split_ascii_whitespace();
            let Some(keyword) = words.next() else {
                continue;
            };
            let keyword = keyword.to_ascii_uppercase();
            // "AUTH=LOGIN PLAIN" is the pre-standard form some servers still send.
            let keyword = match keyword.strip_prefix("AUTH=") {
                Some(first) => {
                    add_mechanisms(&mut ext.auth, &mut seen, std::iter::once(first));
                    "AUTH".to_string()
                }
                None => keyword,
            };
            match keyword.as_str() {
                "PIPELINING" => ext.pipelining = true,
                // A missing or unreadable limit means "no fixed limit" (RFC 1870 4).
                "SIZE" => ext.size = Some(words.next().and_then(|n| n.parse().ok()).unwrap_or(0)),
                "8BITMIME" => ext.eight_bit_mime = true,
                "SMTPUTF8" => ext.smtputf8 = true,
                "STARTTLS" => ext.starttls = true,
                "AUTH" => add_mechanisms(&mut ext.auth, &mut seen, words),
                "CHUNKING" => ext.chunking = true,
                "ENHANCEDSTATUSCODES" => ext.enhanced_status_codes = true,
                _ => {}
            }
        }
        ext
    }
}

/// RFC 4954 3: `AUTH` takes a space-separated list of SASL mechanism names; they are
/// kept upper case (RFC 4422 3.1 names are case-insensitive), each once, in order.
fn add_mechanisms<'a>(
    list: &mut Vec<String>,
    seen: &mut HashSet<String>,
    words: impl Iterator<Item = &'a str>,
) {
    for word in words {
        let mechanism = word.to_ascii_uppercase();
        if !mechanism.is_empty() && seen.insert(mechanism.clone()) {
            list.push(mechanism);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::client::reply::{ParsedReply, parse_reply};

    fn complete(input: &[u8]) -> Reply {
        match parse_reply(input) {
            Ok(ParsedReply::Complete(reply, _)) => reply,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn ehlo_extensions() {
        let reply = complete(
            b"250-mx.test greets you\r\n250-PIPELINING\r\n250-SIZE 35882577\r\n250-8bitmime\r\n\
              250-SMTPUTF8\r\n250-STARTTLS\r\n250-AUTH PLAIN login\r\n250-AUTH=LOGIN CRAM-MD5\r\n\
              250-CHUNKING\r\n250-X-UNKNOWN stuff\r\n250 ENHANCEDSTATUSCODES\r\n",
        );
        let ext = Extensions::from_ehlo(&reply);
        assert_eq!(
            ext,
            Extensions {
                pipelining: true,
                size: Some(35_882_577),
                eight_bit_mime: true,
                smtputf8: true,
                starttls: true,
                auth: vec!["PLAIN".into(), "LOGIN".into(), "CRAM-MD5".into()],
                chunking: true,
                enhanced_status_codes: true,
            }
        );
        // SIZE without a number: advertised, no fixed limit; the greeting line is no keyword
        let reply = complete(b"250-PIPELINING\r\n250 SIZE\r\n");
        let ext = Extensions::from_ehlo(&reply);
        assert_eq!((ext.pipelining, ext.size), (false, Some(0)));
    }

    #[test]
    fn mechanisms_are_listed_once_in_linear_time() {
        // 20,000 distinct names and as many repeats: a quadratic search would take
        // seconds here.
        let mut text = b"250-mx.test\r\n".to_vec();
        for line in 0..2 {
            text.extend_from_slice(b"250-AUTH");
            for i in 0..10_000 {
                text.extend_from_slice(format!(" m{line}x{i}").as_bytes());
            }
            text.extend_from_slice(b"\r\n");
        }
        text.extend_from_slice(b"250 AUTH=plain PLAIN\r\n");
        // Longer than a reply line may be: build the reply by hand.
        let mut reply = Reply::new(250, None, "mx.test");
        for line in text.split(|&b| b == b'\n').skip(1) {
            let line = String::from_utf8_lossy(line.get(4..).unwrap_or_default());
            reply.lines.push(line.trim_end().to_string().into());
        }
        let ext = Extensions::from_ehlo(&reply);
        assert_eq!(ext.auth.len(), 20_001);
        assert_eq!(ext.auth.last().map(String::as_str), Some("PLAIN"));
        assert_eq!(ext.auth[0], "M0X0");
    }
}
