//! The server's replies, parsed as they arrive (RFC 5321 4.2, 4.2.1).
//!
//! [`ReplyParser`] is a push parser in the manner of httparse: the caller appends what
//! it reads to one buffer and hands the parser the whole buffer each time; the answer is
//! [`ParsedReply::Complete`] (the reply and how many octets it took) or
//! [`ParsedReply::Partial`] (read more). Unlike a one-shot parse it remembers the lines
//! it has already checked, so a server that trickles a long reply in tiny pieces costs
//! linear, not quadratic, work.
//!
//! Bounds, enforced on the bytes as they arrive, before a reply is complete: a line
//! without its LF within [`MAX_REPLY_LINE`] octets, or more than [`MAX_REPLY_LINES`] lines,
//! is an error, so one reply never holds more than [`MAX_REPLY_SIZE`] octets of input and
//! [`MAX_REPLY_LINES`] line ranges. The parser never panics, whatever the input.

use std::borrow::Cow;
use std::fmt;
use std::ops::Range;

use crate::reply::{Reply, Status};

/// Longest reply line we accept, CRLF included. RFC 5321 4.5.3.1.5 allows 512; servers
/// exceed that with long EHLO keywords and texts, so we are generous but bounded.
pub const MAX_REPLY_LINE: usize = 4096;
/// Most lines in one (multi-line) reply.
pub const MAX_REPLY_LINES: usize = 100;
/// The most input one reply can take: the two limits above together.
pub const MAX_REPLY_SIZE: usize = MAX_REPLY_LINE * MAX_REPLY_LINES;

/// Result of parsing the bytes received so far.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ParsedReply {
    /// One whole reply, and how many input octets it took.
    Complete(Reply, usize),
    /// The reply is not complete yet: read more.
    Partial,
}

/// Why bytes from the server are not a reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ReplyError {
    LineTooLong,
    TooManyLines,
    /// The start of the offending line (at most 80 octets), made printable.
    Malformed(String),
    /// The first code, then the one that differs.
    CodeChanged(u16, u16),
}

impl fmt::Display for ReplyError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ReplyError::LineTooLong => write!(f, "reply line longer than {MAX_REPLY_LINE} octets"),
            ReplyError::TooManyLines => write!(f, "reply longer than {MAX_REPLY_LINES} lines"),
            ReplyError::Malformed(line) => write!(f, "malformed reply line {line:?}"),
            ReplyError::CodeChanged(a, b) => write!(
                f,
                "reply code changes within a multi-line reply ({a} then {b})"
            ),
        }
    }
}

impl std::error::Error for ReplyError {}

/// Parses the first reply in `input` at once; see [`ReplyParser::parse`] for the rules.
pub fn parse_reply(input: &[u8]) -> Result<ParsedReply, ReplyError> {
    ReplyParser::new().parse(input)
}

/// Parses one reply at a time from a growing buffer (see the module documentation).
///
/// The state describes a prefix of the buffer: call [`ReplyParser::parse`] again with
/// the same bytes plus whatever arrived since. After `Complete` or an error the parser
/// starts afresh, so the next call expects the buffer to begin at the next reply (drop
/// the octets `Complete` reported first). A buffer shorter than the last one also starts
/// it afresh, so a misuse gives a wrong answer at worst, never a panic.
#[derive(Clone, Debug, Default)]
pub struct ReplyParser {
    /// Where the first line not yet complete starts.
    line_start: usize,
    /// How many octets of that line have been searched for its LF already.
    searched: usize,
    /// The code of the first line.
    code: Option<u16>,
    /// The text of every complete line (after code and separator), as input ranges.
    texts: Vec<Range<usize>>,
}

impl ReplyParser {
    pub fn new() -> ReplyParser {
        ReplyParser::default()
    }

    /// Forgets a reply in progress.
    pub fn reset(&mut self) {
        self.line_start = 0;
        self.searched = 0;
        self.code = None;
        self.texts.clear();
    }

    /// Parses the reply at the start of `input` (RFC 5321 4.2, 4.2.1):
    ///
    /// ```text
    /// Reply-line = *( Reply-code "-" [ textstring ] CRLF ) Reply-code [ SP textstring ] CRLF
    /// ```
    ///
    /// The code's first digit must be 2-5 and its second 0-5 (4.2.1); every line of a
    /// multi-line reply must carry the same code. A bare LF is accepted as a line end (we
    /// are the client: being lenient about the server's line ends smuggles nothing). An
    /// enhanced status code (RFC 3463, RFC 2034) at the start of the first line, of the
    /// same class as the reply code, becomes `Reply::status` and is removed from every
    /// line that repeats it. Text is decoded lossily as UTF-8 and control characters
    /// become '?'. Bytes after the reply (pipelined replies, RFC 2920 3.1) are left alone.
    pub fn parse(&mut self, input: &[u8]) -> Result<ParsedReply, ReplyError> {
        let result = self.advance(input);
        if !matches!(result, Ok(ParsedReply::Partial)) {
            self.reset();
        }
        result
    }

    fn advance(&mut self, input: &[u8]) -> Result<ParsedReply, ReplyError> {
        if input.len() < self.line_start + self.searched {
            self.reset();
        }
        loop {
            let rest = &input[self.line_start..];
            let window = &rest[..rest.len().min(MAX_REPLY_LINE)];
            let from = self.searched.min(window.len());
            let Some(lf) = memchr::memchr(b'\n', &window[from..]).map(|i| from + i) else {
                if rest.len() >= MAX_REPLY_LINE {
                    return Err(ReplyError::LineTooLong);
                }
                self.searched = window.len();
                return Ok(ParsedReply::Partial);
            };
            let start = self.line_start;
            let line = &rest[..lf];
            let line = line.strip_suffix(b"\r").unwrap_or(line);
            let (this_code, last, text_at) = parse_reply_line(line)?;
            self.line_start += lf + 1;
            self.searched = 0;
            match self.code {
                None => self.code = Some(this_code),
                Some(first) if first != this_code => {
                    return Err(ReplyError::CodeChanged(first, this_code));
                }
                Some(_) => {}
            }
            self.texts.push(start + text_at..start + line.len());
            if last {
                let texts: Vec<&[u8]> = self.texts.iter().map(|r| &input[r.clone()]).collect();
                return Ok(ParsedReply::Complete(
                    build_reply(this_code, &texts),
                    self.line_start,
                ));
            }
            if self.texts.len() >= MAX_REPLY_LINES {
                return Err(ReplyError::TooManyLines);
            }
        }
    }
}

/// One line without its line end: (code, is it the last line, where its text starts).
fn parse_reply_line(line: &[u8]) -> Result<(u16, bool, usize), ReplyError> {
    let malformed = || ReplyError::Malformed(clean_text(&line[..line.len().min(80)]));
    let [a, b, c, rest @ ..] = line else {
        return Err(malformed());
    };
    if !(b'2'..=b'5').contains(a) || !(b'0'..=b'5').contains(b) || !c.is_ascii_digit() {
        return Err(malformed());
    }
    let code = u16::from(a - b'0') * 100 + u16::from(b - b'0') * 10 + u16::from(c - b'0');
    match rest {
        [] => Ok((code, true, 3)),
        [b' ', ..] => Ok((code, true, 4)),
        [b'-', ..] => Ok((code, false, 4)),
        _ => Err(malformed()),
    }
}

fn build_reply(code: u16, texts: &[&[u8]]) -> Reply {
    let class = (code / 100) as u8;
    let status = texts.first().and_then(|t| parse_status(t, class));
    let lines = texts
        .iter()
        .map(|text| {
            let text = match status {
                Some((_, prefix)) if text.starts_with(prefix) => strip_status(text, prefix.len()),
                _ => text,
            };
            Cow::Owned(clean_text(text))
        })
        .collect();
    Reply {
        code,
        status: status.map(|(s, _)| s),
        lines,
    }
}

/// "class.subject.detail" (RFC 3463 2: 1-3 digits for subject and detail) followed by
/// a space or the end of the text; the class must match the reply code's.
pub(crate) fn parse_status(text: &[u8], class: u8) -> Option<(Status, &[u8])> {
    let end = text.iter().position(|&b| b == b' ').unwrap_or(text.len());
    let token = &text[..end];
    let mut parts = token.split(|&b| b == b'.');
    let mut number = |max_len: usize| -> Option<u16> {
        let part = parts.next()?;
        if part.is_empty() || part.len() > max_len || !part.iter().all(u8::is_ascii_digit) {
            return None;
        }
        std::str::from_utf8(part).ok()?.parse().ok()
    };
    let (c, s, d) = (number(1)?, number(3)?, number(3)?);
    if parts.next().is_some() || c != u16::from(class) {
        return None;
    }
    Some((Status(class, s, d), token))
}

/// The text after a status prefix of `len` octets and the space that follows it.
fn strip_status(text: &[u8], len: usize) -> &[u8] {
    match &text[len..] {
        [] => b"",
        [b' ', rest @ ..] => rest,
        _ => text, // a longer token that merely starts like the status: keep it
    }
}

/// Reply text fit for logs and bounces: lossy UTF-8, control characters as '?'.
pub(crate) fn clean_text(text: &[u8]) -> String {
    String::from_utf8_lossy(text)
        .chars()
        .map(|c| if c.is_control() { '?' } else { c })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn complete(input: &[u8]) -> (Reply, usize) {
        match parse_reply(input) {
            Ok(ParsedReply::Complete(reply, used)) => (reply, used),
            other => panic!("{:?}: {other:?}", String::from_utf8_lossy(input)),
        }
    }

    #[test]
    fn reply_parsing_table() {
        // input, code, status, lines, octets used
        type Case = (
            &'static [u8],
            u16,
            Option<Status>,
            &'static [&'static str],
            usize,
        );
        let st = |c, s, d| Some(Status(c, s, d));
        #[rustfmt::skip]
        let cases: &[Case] = &[
            (b"250 OK\r\n", 250, None, &["OK"], 8),
            (b"250\r\n", 250, None, &[""], 5),
            (b"250 \r\n", 250, None, &[""], 6),
            (b"220 mx.test ESMTP\n", 220, None, &["mx.test ESMTP"], 18),
            (b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n", 250, None, &["mx.test", "PIPELINING", "SIZE 100"], 43),
            (b"250-\r\n250 last\r\n", 250, None, &["", "last"], 16),
            (b"550 5.1.1 User unknown\r\n", 550, st(5, 1, 1), &["User unknown"], 24),
            (b"550-5.1.1 first\r\n550 5.1.1 second\r\n", 550, st(5, 1, 1), &["first", "second"], 35),
            (b"550-5.1.1 first\r\n550 second\r\n", 550, st(5, 1, 1), &["first", "second"], 29),
            (b"250 2.0.0\r\n", 250, st(2, 0, 0), &[""], 11),
            (b"451 4.7.123 greylisted\r\n", 451, st(4, 7, 123), &["greylisted"], 24),
            // the class must match the code, and the token must be exactly x.y.z
            (b"550 4.1.1 odd\r\n", 550, None, &["4.1.1 odd"], 15),
            (b"250 2.0.0ok\r\n", 250, None, &["2.0.0ok"], 13),
            (b"250 2.0.1000 x\r\n", 250, None, &["2.0.1000 x"], 16),
            (b"250 2.0 x\r\n", 250, None, &["2.0 x"], 11),
            // pipelined replies: only the first is taken
            (b"250 OK\r\n354 go\r\n", 250, None, &["OK"], 8),
            // hostile text is made harmless
            (b"250 a\x1bb\x00c\r\n", 250, None, &["a?b?c"], 11),
            (b"250 \xff\xfe\r\n", 250, None, &["\u{fffd}\u{fffd}"], 8),
            (b"250 a\rb\r\n", 250, None, &["a?b"], 9),
        ];
        for &(input, code, status, lines, used) in cases {
            let (reply, n) = complete(input);
            let what = String::from_utf8_lossy(input);
            assert_eq!(reply.code, code, "{what:?}");
            assert_eq!(reply.status, status, "{what:?}");
            assert_eq!(reply.lines, lines, "{what:?}");
            assert_eq!(n, used, "{what:?}");
        }
    }

    #[test]
    fn incomplete_replies_ask_for_more() {
        for input in [
            &b""[..],
            b"2",
            b"250",
            b"250 OK",
            b"250 OK\r",
            b"250-a\r\n",
            b"250-a\r\n250 b",
        ] {
            assert_eq!(
                parse_reply(input),
                Ok(ParsedReply::Partial),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
    }

    #[test]
    fn malformed_replies_are_errors() {
        for input in [
            &b"25O OK\r\n"[..],
            b"099 x\r\n",
            b"150 x\r\n",
            b"600 x\r\n",
            b"260 x\r\n",
            b"250_x\r\n",
            b"25\r\n",
            b"\r\n",
            b"hello\r\n",
            b" 250 x\r\n",
            b"250-a\r\nxyz\r\n",
        ] {
            assert!(
                matches!(parse_reply(input), Err(ReplyError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(input)
            );
        }
        assert_eq!(
            parse_reply(b"250-a\r\n251 b\r\n"),
            Err(ReplyError::CodeChanged(250, 251))
        );
    }

    #[test]
    fn reply_limits() {
        // A line may be MAX_REPLY_LINE octets including CRLF, not one more.
        let mut line = b"250 ".to_vec();
        line.resize(MAX_REPLY_LINE - 2, b'x');
        line.extend_from_slice(b"\r\n");
        assert_eq!(complete(&line).1, MAX_REPLY_LINE);
        let mut long = b"250 ".to_vec();
        long.resize(MAX_REPLY_LINE - 1, b'x');
        long.extend_from_slice(b"\r\n");
        assert_eq!(parse_reply(&long), Err(ReplyError::LineTooLong));
        // Detected before the line ends: a server cannot make us buffer without bound.
        let mut endless = b"250 ".to_vec();
        endless.resize(MAX_REPLY_LINE - 1, b'x');
        assert_eq!(parse_reply(&endless), Ok(ParsedReply::Partial));
        endless.push(b'x');
        assert_eq!(parse_reply(&endless), Err(ReplyError::LineTooLong));

        let many = |continuations: usize| {
            let mut r = b"250-x\r\n".repeat(continuations);
            r.extend_from_slice(b"250 end\r\n");
            r
        };
        assert_eq!(
            complete(&many(MAX_REPLY_LINES - 1)).0.lines.len(),
            MAX_REPLY_LINES
        );
        assert_eq!(
            parse_reply(&many(MAX_REPLY_LINES)),
            Err(ReplyError::TooManyLines)
        );
        assert_eq!(
            parse_reply(&b"250-x\r\n".repeat(MAX_REPLY_LINES)),
            Err(ReplyError::TooManyLines)
        );
    }

    #[test]
    fn any_split_gives_the_same_answer() {
        // The parser resumes where it stopped; feeding a growing buffer in any pieces
        // must give what one parse of the whole gives.
        for input in [
            &b"250-mx.test\r\n250-PIPELINING\r\n250 SIZE 100\r\n354 next\r\n"[..],
            b"550-5.1.1 first\r\n550 second\r\n",
            b"250-a\r\n251 b\r\n",
            b"250-a\r\nxyz\r\n",
            b"220 mx.test ESMTP\n",
        ] {
            let whole = parse_reply(input);
            for split in 0..=input.len() {
                let mut parser = ReplyParser::new();
                let first = parser.parse(&input[..split]);
                let answer = match first {
                    Ok(ParsedReply::Partial) => parser.parse(input),
                    done => done,
                };
                assert_eq!(answer, whole, "{input:?} split at {split}");
            }
            let mut parser = ReplyParser::new();
            let mut answer = Ok(ParsedReply::Partial);
            for end in 0..=input.len() {
                answer = parser.parse(&input[..end]);
                if answer != Ok(ParsedReply::Partial) {
                    break;
                }
            }
            assert_eq!(answer, whole, "{input:?} octet by octet");
        }
    }

    #[test]
    fn the_parser_starts_afresh_after_a_reply_or_a_misuse() {
        let mut parser = ReplyParser::new();
        assert_eq!(parser.parse(b"250-a\r\n250"), Ok(ParsedReply::Partial));
        // a shorter buffer than before: not a panic, a fresh parse
        assert_eq!(parser.parse(b"25"), Ok(ParsedReply::Partial));
        let (reply, used) = match parser.parse(b"250 ok\r\n221 bye\r\n") {
            Ok(ParsedReply::Complete(reply, used)) => (reply, used),
            other => panic!("{other:?}"),
        };
        assert_eq!((reply.code, used), (250, 8));
        match parser.parse(b"221 bye\r\n") {
            Ok(ParsedReply::Complete(reply, 9)) => assert_eq!(reply.lines, ["bye"]),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn errors_read_well() {
        assert_eq!(
            ReplyError::LineTooLong.to_string(),
            "reply line longer than 4096 octets"
        );
        assert_eq!(
            ReplyError::CodeChanged(250, 251).to_string(),
            "reply code changes within a multi-line reply (250 then 251)"
        );
    }
}
