//! Dot-stuffing of a message body on its way out (RFC 5321 4.5.2) and the size a
//! server counts for it (RFC 1870 3).
//!
//! The body is scanned in bulk: [`memchr::memmem`] finds each "LF ." (the only place a
//! dot needs doubling, besides the very first octet), and the stuffed body is handed out
//! as the runs of the body between such dots, not copied. Where dots start lines closely
//! one after another, a memmem call per dot would cost more than it saves; there the
//! search goes on eight octets at a time in plain arithmetic instead (no call overhead),
//! so even a body where every line starts with a dot goes about as fast as an
//! octet-by-octet loop (measured: on par for 4-octet lines that all start with a dot,
//! faster from 20-octet lines on, 10-20x faster for text with few such lines).

/// A stuffed dot closer than this to the previous one switches to the word-at-a-time
/// search until the next gap this long.
const DENSE: usize = 256;

/// A whole body dot-stuffed (RFC 5321 4.5.2) and ended (CRLF if it did not end with one,
/// then ".CRLF"), as pieces of the body itself, for a vectored write: nothing is copied.
/// A doubled dot is the body's dot twice: one piece ends with it, the next begins with
/// it.
///
/// A dot is doubled at the start of every line; a "line start" is the start of the body
/// or any octet after LF. The spool holds CRLF lines only, so this is the RFC rule; if a
/// bare LF ever slipped through, doubling the dot after it as well means a next hop that
/// (wrongly) ends lines at LF can never see an end of data we did not send (SMTP
/// smuggling).
#[derive(Clone, Debug)]
pub struct Stuffed<'a> {
    body: &'a [u8],
    /// Where the next piece of the body starts.
    start: usize,
    /// Where the search for the next line-start dot goes on.
    from: usize,
    dense: bool,
    /// The first octet was looked at (a dot there starts a line too).
    began: bool,
    ended: bool,
}

impl<'a> Stuffed<'a> {
    pub fn new(body: &'a [u8]) -> Stuffed<'a> {
        Stuffed {
            body,
            start: 0,
            from: 0,
            dense: false,
            began: false,
            ended: false,
        }
    }

    /// The position of the next dot that starts a line.
    fn next_dot(&mut self) -> Option<usize> {
        if !self.began {
            self.began = true;
            if self.body.first() == Some(&b'.') {
                self.from = 1;
                return Some(0);
            }
        }
        let lf = if self.dense {
            find_line_dot_by_words(self.body, self.from)
        } else {
            memchr::memmem::find(&self.body[self.from..], b"\n.").map(|i| self.from + i)
        }?;
        self.dense = lf - self.from < DENSE;
        self.from = lf + 2;
        Some(lf + 1)
    }
}

impl<'a> Iterator for Stuffed<'a> {
    type Item = &'a [u8];

    fn next(&mut self) -> Option<&'a [u8]> {
        if self.ended {
            return None;
        }
        let body = self.body;
        if let Some(dot) = self.next_dot() {
            let piece = &body[self.start..=dot];
            self.start = dot;
            return Some(piece);
        }
        if self.start < body.len() {
            let piece = &body[self.start..];
            self.start = body.len();
            return Some(piece);
        }
        self.ended = true;
        Some(if body.is_empty() || body.ends_with(b"\r\n") {
            b".\r\n"
        } else {
            b"\r\n.\r\n"
        })
    }
}

const LOW7: u64 = 0x7f7f_7f7f_7f7f_7f7f;
const HIGH: u64 = 0x8080_8080_8080_8080;

/// The high bit of every octet of `word` that equals `octet` (exact: no carry crosses
/// an octet, since every addend is at most 0x7f).
fn octets_equal(word: u64, octet: u8) -> u64 {
    let v = word ^ (u64::from(octet) * 0x0101_0101_0101_0101);
    !(((v & LOW7) + LOW7) | v) & HIGH
}

/// Where the next "LF ." at or after `from` starts (the octet before `from` is not an
/// LF: it is the dot just doubled), eight octets at a time.
fn find_line_dot_by_words(input: &[u8], from: usize) -> Option<usize> {
    let haystack = input.get(from..)?;
    let mut words = haystack.chunks_exact(8);
    // The high bit of the octet before the current word, when that octet is an LF.
    let mut lf_before = 0u64;
    for (n, word) in words.by_ref().enumerate() {
        let word = u64::from_le_bytes(word.try_into().unwrap_or_default());
        let lf = octets_equal(word, b'\n');
        // Little-endian: octet i is bits 8i..8i+8, so `lf << 8` marks the octet after.
        let hits = ((lf << 8) | (lf_before >> 56)) & octets_equal(word, b'.');
        if hits != 0 {
            return Some(from + n * 8 + (hits.trailing_zeros() / 8) as usize - 1);
        }
        lf_before = lf & (0x80 << 56);
    }
    let tail = words.remainder();
    let start = haystack.len() - tail.len();
    let mut after_lf = lf_before != 0;
    for (i, &octet) in tail.iter().enumerate() {
        if after_lf && octet == b'.' {
            return Some(from + start + i - 1);
        }
        after_lf = octet == b'\n';
    }
    None
}

/// The size the server will count (RFC 1870 3: the message with CRLFs, without
/// stuffing and without the final dot).
pub fn wire_size(body: &[u8]) -> u64 {
    let extra = if body.is_empty() || body.ends_with(b"\r\n") {
        0
    } else {
        2
    };
    body.len() as u64 + extra
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dot_stuff(body: &[u8]) -> Vec<u8> {
        Stuffed::new(body).collect::<Vec<_>>().concat()
    }

    #[test]
    fn dot_stuffing_table() {
        let cases: &[(&[u8], &[u8])] = &[
            (b"", b".\r\n"),
            (b"hello\r\n", b"hello\r\n.\r\n"),
            (b".\r\n", b"..\r\n.\r\n"),
            (b".", b"..\r\n.\r\n"),
            (b"a\r\n.b\r\n..c\r\n", b"a\r\n..b\r\n...c\r\n.\r\n"),
            (b"a.\r\nb .\r\n", b"a.\r\nb .\r\n.\r\n"),
            (b"no line end", b"no line end\r\n.\r\n"),
            (b"\r\n.\r\n", b"\r\n..\r\n.\r\n"),
            // a bare LF still starts a line for stuffing (see Stuffed)
            (b"a\n.\n", b"a\n..\n\r\n.\r\n"),
            (b"a\r", b"a\r\r\n.\r\n"),
        ];
        for &(body, wire) in cases {
            assert_eq!(
                String::from_utf8_lossy(&dot_stuff(body)),
                String::from_utf8_lossy(wire),
                "{:?}",
                String::from_utf8_lossy(body)
            );
        }
    }

    #[test]
    fn size_counts_the_added_line_end() {
        assert_eq!(wire_size(b""), 0);
        assert_eq!(wire_size(b"ab\r\n"), 4);
        assert_eq!(wire_size(b"ab"), 4);
    }

    /// The rule octet by octet, as the reference.
    fn reference(body: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        let mut at_line_start = true;
        for &b in body {
            if at_line_start && b == b'.' {
                out.push(b'.');
            }
            out.push(b);
            at_line_start = b == b'\n';
        }
        if !body.is_empty() && !body.ends_with(b"\r\n") {
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b".\r\n");
        out
    }

    #[test]
    fn word_search_matches_the_octet_rule_on_long_bodies() {
        // Pseudo-random bodies (seeded xorshift: the same every run) long enough for
        // whole words, dense and sparse in dots.
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for _ in 0..3000 {
            let len = (next() % 600) as usize;
            let dots = next() % 3; // how often a line starts with a dot
            let mut body = Vec::with_capacity(len);
            while body.len() < len {
                match next() % 16 {
                    0..=2 => body.extend_from_slice(b"\r\n"),
                    3 => body.push(b'\n'),
                    4 if dots > 0 => body.push(b'.'),
                    5..=7 if dots > 1 => body.extend_from_slice(b"\r\n."),
                    _ => body.push(b'a'),
                }
            }
            assert_eq!(dot_stuff(&body), reference(&body), "{body:?}");
        }
    }

    #[test]
    fn word_search_finds_pairs_across_words() {
        // "LF ." at every offset, including across the 8-octet word boundary.
        for at in 0..40 {
            let mut hay = vec![b'a'; 48];
            hay[at] = b'\n';
            hay[at + 1] = b'.';
            assert_eq!(find_line_dot_by_words(&hay, 0), Some(at), "at {at}");
            assert_eq!(find_line_dot_by_words(&hay, at + 1), None, "after {at}");
        }
        assert_eq!(find_line_dot_by_words(b"ab", 5), None);
        assert_eq!(find_line_dot_by_words(b"\n", 0), None);
    }

    #[test]
    fn bulk_scan_matches_the_octet_rule() {
        // Every body over the alphabet {'.', '\r', '\n', 'a'} up to six octets.
        let alphabet = [b'.', b'\r', b'\n', b'a'];
        let mut bodies = vec![Vec::new()];
        for len in 1..=6u32 {
            for n in 0..4usize.pow(len) {
                let body = (0..len)
                    .map(|i| alphabet[n / 4usize.pow(i) % 4])
                    .collect::<Vec<u8>>();
                bodies.push(body);
            }
        }
        for body in &bodies {
            assert_eq!(dot_stuff(body), reference(body), "{body:?}");
        }
    }
}
