//! `SMFIR_REPLYCODE`: the milter's own SMTP reply, checked before a client sees it.
//!
//! The data is one reply as libmilter's `smfi_setreply` / `smfi_setmlreply` build it:
//! `550 5.7.1 text` or, multi-line, `550-5.7.1 one\r\n550 5.7.1 two`, NUL-terminated. The
//! rules follow Postfix's `milter8_valid_smtp_reply` (src/milter/milter8.c), a little
//! stricter where a client could be misled:
//! - every line is `ddd-text` but the last, `ddd text` (or just `ddd`); lines are separated
//!   by CRLF (one CRLF after the last line is tolerated); no NUL, no bare CR or LF;
//! - the code is 4xx or 5xx (a milter can only refuse; 2xx/3xx are not its to give), its
//!   second digit 0-5 (RFC 5321 4.2), the same on every line;
//! - a line whose text starts with a digit must start with the code's class: an enhanced
//!   status of another class (`550 4.7.1`) is an error, not corrected, since we cannot
//!   tell which of the two the milter meant;
//! - `%%` becomes `%` and a lone `%` is dropped (Sendmail uses the text as a format
//!   string, so libmilter tells milters to double `%`; Postfix undoes it the same way);
//! - at most [`MAX_LINES`] lines (libmilter allows 32).
//!
//! The enhanced status code of the first line becomes [`Reply::status`] and is removed from
//! every line that repeats it; other text is decoded lossily as UTF-8.

use std::borrow::Cow;

use crate::reply::{Reply, Status};

/// Most lines in one milter reply.
pub const MAX_LINES: usize = 100;

/// Parses the data of an `SMFIR_REPLYCODE` packet; the error says what is wrong.
pub fn parse_replycode(data: &[u8]) -> Result<Reply, &'static str> {
    let data = data.strip_suffix(b"\0").unwrap_or(data);
    if data.contains(&0) {
        return Err("NUL inside the reply");
    }
    let data = data.strip_suffix(b"\r\n").unwrap_or(data);
    let mut lines: Vec<&[u8]> = Vec::new();
    let mut rest = data;
    loop {
        match memchr::memchr2(b'\r', b'\n', rest) {
            None => {
                lines.push(rest);
                break;
            }
            Some(i) => {
                if rest.get(i..i + 2) != Some(b"\r\n") {
                    return Err("bare CR or LF in the reply");
                }
                lines.push(&rest[..i]);
                rest = &rest[i + 2..];
            }
        }
        if lines.len() > MAX_LINES {
            return Err("more than 100 lines in the reply");
        }
    }
    if lines.len() > MAX_LINES {
        return Err("more than 100 lines in the reply");
    }
    let last = lines.len() - 1;
    let mut code = None;
    let mut texts = Vec::with_capacity(lines.len());
    for (i, line) in lines.iter().enumerate() {
        let (c, text) = match line {
            [
                a @ (b'4' | b'5'),
                b @ b'0'..=b'5',
                c @ b'0'..=b'9',
                rest @ ..,
            ] => {
                let c = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
                let text: &[u8] = match (rest, i == last) {
                    ([], true) => b"",
                    ([b' ', t @ ..], true) | ([b'-', t @ ..], false) => t,
                    _ => return Err("a reply line must be ddd-text, the last ddd text"),
                };
                (c, text)
            }
            [b'2' | b'3', ..] => return Err("a milter reply code must be 4xx or 5xx"),
            _ => return Err("a reply line must start with a 4xx or 5xx code"),
        };
        match code {
            None => code = Some(c),
            Some(first) if first != c => return Err("the reply code changes between lines"),
            Some(_) => {}
        }
        if let Some(&d) = text.first()
            && d.is_ascii_digit()
            && u16::from(d - b'0') != c / 100
        {
            return Err("enhanced status code of another class than the reply code");
        }
        texts.push(text);
    }
    let code = code.ok_or("empty reply")?;
    let class = (code / 100) as u8;
    let status = texts.first().and_then(|t| status_prefix(t, class));
    let lines = texts
        .iter()
        .map(|text| {
            let text = match status {
                Some((_, n)) if text.get(..n) == texts[0].get(..n) => match &text[n..] {
                    [] => &[][..],
                    [b' ', rest @ ..] => rest,
                    _ => text,
                },
                _ => text,
            };
            Cow::Owned(crate::client::reply::clean_text(&unpercent(text)))
        })
        .collect();
    Ok(Reply {
        code,
        status: status.map(|(s, _)| s),
        lines,
    })
}

/// `class.subject.detail` at the start of `text` and its length: the SMTP client's
/// parser (RFC 3463 2), one rule for replies from next hops and from milters.
fn status_prefix(text: &[u8], class: u8) -> Option<(Status, usize)> {
    crate::client::reply::parse_status(text, class).map(|(status, token)| (status, token.len()))
}

/// `%%` → `%`, a lone `%` dropped.
fn unpercent(text: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(text.len());
    let mut it = text.iter().copied().peekable();
    while let Some(b) = it.next() {
        if b == b'%' {
            if it.peek() == Some(&b'%') {
                it.next();
                out.push(b'%');
            }
        } else {
            out.push(b);
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn good_replies() {
        type Case = (&'static [u8], u16, Option<Status>, &'static [&'static str]);
        let st = |c, s, d| Some(Status(c, s, d));
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (b"550 5.7.1 Spam detected\0", 550, st(5, 7, 1), &["Spam detected"]),
            (b"451 4.7.1 Try later\0", 451, st(4, 7, 1), &["Try later"]),
            (b"554 no status\0", 554, None, &["no status"]),
            (b"550\0", 550, None, &[""]),
            (b"550 5.7.1\0", 550, st(5, 7, 1), &[""]),
            // without its NUL, and with a trailing CRLF: tolerated
            (b"550 5.7.1 x", 550, st(5, 7, 1), &["x"]),
            (b"550 5.7.1 x\r\n\0", 550, st(5, 7, 1), &["x"]),
            // smfi_setmlreply's form
            (b"550-5.7.0 Spammer access rejected\r\n550-5.7.0 Please see our policy at:\r\n550 5.7.0 http://www.example.com/spampolicy.html\0",
             550, st(5, 7, 0), &["Spammer access rejected", "Please see our policy at:", "http://www.example.com/spampolicy.html"]),
            (b"451-first\r\n451 second\0", 451, None, &["first", "second"]),
            (b"550-5.1.1 a\r\n550 b\0", 550, st(5, 1, 1), &["a", "b"]),
            // printf escapes undone
            (b"550 5.7.1 100%% spam, 50% sure\0", 550, st(5, 7, 1), &["100% spam, 50 sure"]),
            // hostile text made harmless
            (b"550 5.7.1 a\x1bb\tc\0", 550, st(5, 7, 1), &["a?b?c"]),
            (b"421 4.3.2 closing\0", 421, st(4, 3, 2), &["closing"]),
        ];
        for &(input, code, status, lines) in cases {
            let r = parse_replycode(input).unwrap_or_else(|e| panic!("{input:?}: {e}"));
            assert_eq!((r.code, r.status), (code, status), "{input:?}");
            assert_eq!(r.lines, lines, "{input:?}");
        }
    }

    #[test]
    fn bad_replies() {
        let cases: &[(&[u8], &str)] = &[
            (b"250 2.0.0 ok\0", "a milter reply code must be 4xx or 5xx"),
            (b"354 go\0", "a milter reply code must be 4xx or 5xx"),
            (b"650 x\0", "a reply line must start with a 4xx or 5xx code"),
            (b"560 x\0", "a reply line must start with a 4xx or 5xx code"),
            (b"\0", "a reply line must start with a 4xx or 5xx code"),
            (b"hello\0", "a reply line must start with a 4xx or 5xx code"),
            (b"55 x\0", "a reply line must start with a 4xx or 5xx code"),
            (
                b"550-x\0",
                "a reply line must be ddd-text, the last ddd text",
            ),
            (
                b"550 a\r\n550 b\0",
                "a reply line must be ddd-text, the last ddd text",
            ),
            (
                b"550x\0",
                "a reply line must be ddd-text, the last ddd text",
            ),
            (
                b"550 4.7.1 wrong class\0",
                "enhanced status code of another class than the reply code",
            ),
            (
                b"451 5.7.1 wrong class\0",
                "enhanced status code of another class than the reply code",
            ),
            (
                b"550-5.7.1 a\r\n550 4.7.1 b\0",
                "enhanced status code of another class than the reply code",
            ),
            (b"550-a\r\n551 b\0", "the reply code changes between lines"),
            (b"550-a\r\n451 b\0", "the reply code changes between lines"),
            (b"550 a\nb\0", "bare CR or LF in the reply"),
            (b"550 a\rb\0", "bare CR or LF in the reply"),
            (b"550 a\0b\0", "NUL inside the reply"),
        ];
        for &(input, why) in cases {
            assert_eq!(parse_replycode(input), Err(why), "{input:?}");
        }
        let many = [b"550-x\r\n".repeat(MAX_LINES), b"550 y\0".to_vec()].concat();
        assert_eq!(
            parse_replycode(&many),
            Err("more than 100 lines in the reply")
        );
        let most = [b"550-x\r\n".repeat(MAX_LINES - 1), b"550 y\0".to_vec()].concat();
        assert_eq!(parse_replycode(&most).unwrap().lines.len(), MAX_LINES);
    }
}
