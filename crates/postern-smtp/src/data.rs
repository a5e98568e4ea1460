//! The message body readers: DATA (dot-terminated, RFC 5321 4.1.1.4 and 4.5.2) and the
//! line checks shared with BDAT chunks (RFC 3030).
//!
//! Trust: the bytes are the client's, unbounded and possibly hostile. The reader keeps at
//! most `max` octets of body (beyond that it only scans for the end), and it ends a DATA
//! message only at CR LF "." CR LF. A bare CR or a bare LF never ends a line, never ends
//! the message and never starts a dot-stuffed line; a message that contains one is
//! refused when it ends (554 5.6.0). That closes the "SMTP smuggling" class
//! (CVE-2023-51764): a peer that treats `<LF>.<LF>` as the end could otherwise read a
//! second, smuggled message out of what we accepted as one.

/// What was wrong with a message body, discovered while reading it.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct BodyFaults {
    /// More than the size limit.
    pub too_big: bool,
    /// A line longer than 1000 octets including CRLF (RFC 5321 4.5.3.1.6).
    pub long_line: bool,
    /// A CR not followed by LF, or an LF not preceded by CR.
    pub bare_line_ending: bool,
}

/// RFC 5321 4.5.3.1.6: a text line is at most 1000 octets including the CRLF.
pub const MAX_TEXT_LINE: usize = 1000;

/// Past this, a body buffer grows by this much at a time instead of doubling, so what
/// a message holds ([`DataReader::held`]) stays within 1 MiB of its size and the
/// driver's memory budget counts what is really allocated.
const GROWTH_STEP: usize = 1 << 20;

/// Appends `bytes` to a body buffer, growing it by doubling up to 1 MiB, then by 1 MiB
/// steps (large reallocations are moved by the allocator's remapping, not copied).
pub fn extend_bounded(body: &mut Vec<u8>, bytes: &[u8]) {
    let target = capacity_after(body, bytes.len());
    if target > body.capacity() {
        body.reserve_exact(target - body.len());
    }
    body.extend_from_slice(bytes);
}

/// The capacity `body` has after [`extend_bounded`] appends `more` octets to it.
pub fn capacity_after(body: &Vec<u8>, more: usize) -> usize {
    let need = body.len().saturating_add(more);
    if need <= body.capacity() {
        body.capacity()
    } else if need <= GROWTH_STEP {
        need.next_power_of_two()
    } else {
        need.div_ceil(GROWTH_STEP).saturating_mul(GROWTH_STEP)
    }
}

/// Tracks line structure over a byte stream that arrives in arbitrary pieces.
#[derive(Clone, Debug, Default)]
pub struct LineChecker {
    /// Octets in the current line so far (CR included once seen).
    line_len: usize,
    /// The previous octet was a CR.
    after_cr: bool,
    faults: BodyFaults,
}

impl LineChecker {
    /// Feeds raw content (no dot-unstuffing: used for BDAT). In bulk: only CR and LF
    /// are looked at one by one (found by memchr2), the runs between them are counted.
    pub fn feed(&mut self, bytes: &[u8]) {
        let mut rest = bytes;
        while let Some(k) = memchr::memchr2(b'\r', b'\n', rest) {
            self.run(k);
            self.octet(rest[k]);
            rest = &rest[k + 1..];
        }
        self.run(rest.len());
    }

    /// `n` octets that are neither CR nor LF (what [`octet`](Self::octet) does for each).
    #[inline]
    fn run(&mut self, n: usize) {
        if n > 0 {
            if self.after_cr {
                self.faults.bare_line_ending = true;
            }
            self.line_len += n;
            self.after_cr = false;
        }
    }

    #[inline]
    fn octet(&mut self, b: u8) {
        if self.after_cr && b != b'\n' {
            self.faults.bare_line_ending = true;
        }
        match b {
            b'\n' => {
                if !self.after_cr {
                    self.faults.bare_line_ending = true;
                }
                if self.line_len + 1 > MAX_TEXT_LINE {
                    self.faults.long_line = true;
                }
                self.line_len = 0;
                self.after_cr = false;
            }
            _ => {
                self.line_len += 1;
                self.after_cr = b == b'\r';
            }
        }
    }

    /// True when the content so far ends at a line boundary (or is empty).
    pub fn at_line_start(&self) -> bool {
        self.line_len == 0
    }

    /// Ends the content: a trailing CR is bare.
    pub fn finish(mut self) -> BodyFaults {
        if self.after_cr {
            self.faults.bare_line_ending = true;
        }
        if self.line_len > MAX_TEXT_LINE {
            self.faults.long_line = true;
        }
        self.faults
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum DataState {
    /// At the start of a line (the CRLF before it has been seen).
    LineStart,
    /// A "." at the start of a line.
    Dot,
    /// "." CR at the start of a line: an LF now ends the message.
    DotCr,
    /// Inside a line.
    Middle,
    /// Inside a line, just after a CR.
    Cr,
}

/// Reads a DATA body: dot-unstuffing, end detection, size cap, line checks.
#[derive(Debug)]
pub struct DataReader {
    state: DataState,
    body: Vec<u8>,
    max: u64,
    /// Octets of unstuffed content seen, kept or not.
    size: u64,
    line_len: usize,
    faults: BodyFaults,
    /// Nothing more is kept (the driver refused to hold the body); the end is still
    /// looked for.
    discarding: bool,
}

impl DataReader {
    pub fn new(max: u64) -> DataReader {
        DataReader {
            state: DataState::LineStart,
            body: Vec::new(),
            max,
            size: 0,
            line_len: 0,
            faults: BodyFaults::default(),
            discarding: false,
        }
    }

    /// Memory the body holds once `more` further input octets are read (at most that
    /// many become content; nothing once discarding or over the size limit).
    pub fn held_after(&self, more: usize) -> usize {
        if self.discarding || self.faults.too_big {
            return self.body.capacity();
        }
        capacity_after(&self.body, more)
    }

    /// Drops what is held and keeps nothing more; the end is still found and the line
    /// checks still run.
    pub fn discard(&mut self) {
        self.discarding = true;
        self.body = Vec::new();
    }

    /// Consumes bytes from `input`. Returns how many were consumed and whether the
    /// terminating CRLF.CRLF was reached (then the rest of `input` is not touched: it is
    /// the next pipelined command).
    pub fn feed(&mut self, input: &[u8]) -> (usize, bool) {
        // Room for everything this input can add, at once: what `held_after` told the
        // driver, so the body grows once per read instead of once per doubling while its
        // lines are copied in.
        if !self.discarding && !self.faults.too_big {
            let target = capacity_after(&self.body, input.len());
            if target > self.body.capacity() {
                self.body.reserve_exact(target - self.body.len());
            }
        }
        let mut i = 0;
        while i < input.len() {
            if self.state == DataState::Middle {
                // Inside a line, in bulk: the run up to the next CR or LF (memchr2 scans
                // many octets per step), and an ordinary line end with it, so a line
                // costs one search and one copy.
                let Some(k) = memchr::memchr2(b'\r', b'\n', &input[i..]) else {
                    self.emit(&input[i..]);
                    return (input.len(), false);
                };
                let at = i + k;
                match (input[at], input.get(at + 1)) {
                    (b'\r', Some(b'\n')) => {
                        self.emit(&input[i..at + 2]);
                        self.end_line();
                        self.state = DataState::LineStart;
                        i = at + 2;
                    }
                    // A CR last in this input, or before something else: decided by
                    // the octet after it (below).
                    (b'\r', _) => {
                        self.emit(&input[i..=at]);
                        self.state = DataState::Cr;
                        i = at + 1;
                    }
                    _ => {
                        // Bare LF (RFC 5321 2.3.8): recorded, kept as content, and it
                        // does not start a line.
                        self.faults.bare_line_ending = true;
                        self.emit(&input[i..=at]);
                        i = at + 1;
                    }
                }
                continue;
            }
            let b = input[i];
            i += 1;
            self.state = match (self.state, b) {
                (DataState::LineStart, b'.') => DataState::Dot,
                (DataState::Dot, b'\r') => DataState::DotCr,
                (DataState::DotCr, b'\n') => return (i, true),
                (DataState::DotCr, _) => {
                    // ".\r" then something other than LF: the CR is bare. The leading dot
                    // was a stuffing dot (RFC 5321 4.5.2), so it is dropped.
                    self.faults.bare_line_ending = true;
                    self.emit(b"\r");
                    i -= 1;
                    DataState::Middle
                }
                // A dot-stuffed line: drop the first dot, keep the rest of the line.
                (DataState::Dot, _) => {
                    i -= 1;
                    DataState::Middle
                }
                (DataState::Cr, b'\n') => {
                    self.emit(b"\n");
                    self.end_line();
                    DataState::LineStart
                }
                (DataState::Cr, _) => {
                    self.faults.bare_line_ending = true;
                    i -= 1;
                    DataState::Middle
                }
                (_, b'\r') => {
                    self.emit(b"\r");
                    DataState::Cr
                }
                (_, b'\n') => {
                    // Bare LF: recorded, kept as content, and it does not start a line.
                    self.faults.bare_line_ending = true;
                    self.emit(b"\n");
                    DataState::Middle
                }
                // Anything else at the start of a line: the line's content, in bulk.
                (_, _) => {
                    i -= 1;
                    DataState::Middle
                }
            };
        }
        (i, false)
    }

    fn emit(&mut self, bytes: &[u8]) {
        self.line_len += bytes.len();
        self.size += bytes.len() as u64;
        if self.size > self.max {
            if !self.faults.too_big {
                self.faults.too_big = true;
                // Free what we hold: the message will be refused anyway.
                self.body = Vec::new();
            }
            return;
        }
        if !self.discarding {
            extend_bounded(&mut self.body, bytes);
        }
    }

    fn end_line(&mut self) {
        // The stuffing dot does not count: limits apply to the line as the user wrote it.
        if self.line_len > MAX_TEXT_LINE {
            self.faults.long_line = true;
        }
        self.line_len = 0;
    }

    /// The body and what was wrong with it.
    pub fn finish(self) -> (Vec<u8>, BodyFaults) {
        (self.body, self.faults)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn read_all(chunks: &[&[u8]], max: u64) -> (Vec<u8>, BodyFaults, usize, bool) {
        let mut r = DataReader::new(max);
        let mut used = 0;
        let mut done = false;
        for c in chunks {
            let (n, d) = r.feed(c);
            used += n;
            if d {
                done = true;
                break;
            }
        }
        let (body, faults) = r.finish();
        (body, faults, used, done)
    }

    #[test]
    fn simple_and_unstuffing() {
        let (body, f, used, done) = read_all(&[b"a\r\n..b\r\n.c\r\n.\r\nQUIT\r\n"], 100);
        assert!(done);
        assert_eq!(used, 15);
        assert_eq!(body, b"a\r\n.b\r\nc\r\n");
        assert_eq!(f, BodyFaults::default());
    }

    #[test]
    fn empty_message() {
        let (body, _, used, done) = read_all(&[b".\r\n"], 100);
        assert!(done && body.is_empty() && used == 3);
    }

    #[test]
    fn end_split_across_every_boundary() {
        let msg = b"Subject: x\r\n\r\nhello\r\n.\r\n";
        for cut in 0..msg.len() {
            let (body, f, used, done) = read_all(&[&msg[..cut], &msg[cut..]], 100);
            assert!(done, "cut {cut}");
            assert_eq!(used, msg.len());
            assert_eq!(body, b"Subject: x\r\n\r\nhello\r\n");
            assert_eq!(f, BodyFaults::default());
        }
    }

    #[test]
    fn smuggling_forms_never_end_the_message() {
        for trick in [
            &b"a\n.\nMAIL FROM:<x@y>\r\n"[..],
            b"a\n.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r.\r\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\nMAIL FROM:<x@y>\r\n",
            b"a\r\n.\rMAIL FROM:<x@y>\r\n",
            b"a\r.\rMAIL FROM:<x@y>\r\n",
        ] {
            let mut r = DataReader::new(1000);
            let (n, done) = r.feed(trick);
            assert!(!done, "{trick:?} ended the message");
            assert_eq!(n, trick.len());
            let (n, done) = r.feed(b".\r\n");
            assert!(done && n == 3);
            assert!(r.finish().1.bare_line_ending, "{trick:?}");
        }
    }

    #[test]
    fn size_cap_keeps_scanning() {
        let (body, f, _, done) = read_all(&[b"0123456789\r\n0123456789\r\n.\r\n"], 15);
        assert!(done && f.too_big && body.is_empty());
    }

    #[test]
    fn long_lines() {
        let mut msg = vec![b'x'; 998];
        msg.extend_from_slice(b"\r\n.\r\n");
        assert!(!read_all(&[&msg], 10_000).1.long_line);
        let mut msg = vec![b'x'; 999];
        msg.extend_from_slice(b"\r\n.\r\n");
        assert!(read_all(&[&msg], 10_000).1.long_line);
    }

    /// The DATA rules octet by octet, as plainly as they can be written: what the bulk
    /// reader must agree with.
    fn reference(input: &[u8], max: u64) -> (Vec<u8>, BodyFaults, usize, bool) {
        enum S {
            LineStart,
            Dot,
            DotCr,
            Middle,
            Cr,
        }
        let (mut body, mut faults) = (Vec::new(), BodyFaults::default());
        let (mut size, mut line) = (0u64, 0usize);
        let mut emit = |b: u8, body: &mut Vec<u8>, faults: &mut BodyFaults, line: &mut usize| {
            *line += 1;
            size += 1;
            if size > max {
                faults.too_big = true;
                body.clear();
            } else {
                body.push(b);
            }
        };
        let mut s = S::LineStart;
        let mut i = 0;
        while i < input.len() {
            let b = input[i];
            i += 1;
            s = match (s, b) {
                (S::LineStart, b'.') => S::Dot,
                (S::Dot, b'\r') => S::DotCr,
                (S::DotCr, b'\n') => return (body, faults, i, true),
                (S::DotCr, _) => {
                    faults.bare_line_ending = true;
                    emit(b'\r', &mut body, &mut faults, &mut line);
                    i -= 1;
                    S::Middle
                }
                (S::Cr, b'\n') => {
                    emit(b'\n', &mut body, &mut faults, &mut line);
                    if line > MAX_TEXT_LINE {
                        faults.long_line = true;
                    }
                    line = 0;
                    S::LineStart
                }
                (S::Dot, _) => {
                    i -= 1;
                    S::Middle
                }
                (S::Cr, _) => {
                    faults.bare_line_ending = true;
                    i -= 1;
                    S::Middle
                }
                (_, b'\r') => {
                    emit(b, &mut body, &mut faults, &mut line);
                    S::Cr
                }
                (_, b'\n') => {
                    faults.bare_line_ending = true;
                    emit(b, &mut body, &mut faults, &mut line);
                    S::Middle
                }
                (_, _) => {
                    emit(b, &mut body, &mut faults, &mut line);
                    S::Middle
                }
            };
        }
        if faults.too_big {
            body.clear();
        }
        (body, faults, i, false)
    }

    /// A small xorshift generator: the same cases on every run.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n as u64) as usize
        }
    }

    /// Input made of what matters to the reader (dots, CR, LF) between runs of text of
    /// any length (long lines too).
    fn tricky_input(rng: &mut Rng) -> Vec<u8> {
        let mut v = Vec::new();
        for _ in 0..rng.below(60) {
            match rng.below(8) {
                0 => v.push(b'.'),
                1 => v.push(b'\r'),
                2 => v.push(b'\n'),
                3 | 4 => v.extend_from_slice(b"\r\n"),
                5 => v.extend_from_slice(b"\r\n."),
                6 => v.extend(std::iter::repeat_n(b'x', rng.below(1100))),
                _ => v.extend_from_slice(b"text"),
            }
        }
        if rng.below(2) == 0 {
            v.extend_from_slice(b"\r\n.\r\nQUIT\r\n");
        }
        v
    }

    #[test]
    fn the_bulk_reader_agrees_with_the_octet_rules_however_the_input_is_cut() {
        let mut rng = Rng(0x9E37_79B9_7F4A_7C15);
        for case in 0..3000 {
            let input = tricky_input(&mut rng);
            let max = [u64::MAX, 64, 1000][case % 3];
            let want = reference(&input, max);
            // Whole, octet by octet, and cut at random places.
            let mut cuts: Vec<Vec<&[u8]>> = vec![vec![&input], input.chunks(1).collect()];
            let mut pieces = Vec::new();
            let mut rest = &input[..];
            while !rest.is_empty() {
                let n = 1 + rng.below(rest.len().min(300));
                pieces.push(&rest[..n]);
                rest = &rest[n..];
            }
            cuts.push(pieces);
            for chunks in cuts {
                let got = read_all(&chunks, max);
                assert_eq!(
                    got,
                    want,
                    "case {case}: {:?}",
                    String::from_utf8_lossy(&input)
                );
            }
            // The BDAT line checker: the same faults as a per-octet pass.
            let mut bulk = LineChecker::default();
            let mut octets = LineChecker::default();
            for piece in input.chunks(1 + rng.below(50)) {
                bulk.feed(piece);
            }
            for &b in &input {
                octets.octet(b);
            }
            assert_eq!(bulk.at_line_start(), octets.at_line_start());
            assert_eq!(bulk.finish(), octets.finish(), "case {case}");
        }
    }

    #[test]
    fn line_checker_across_chunks() {
        let mut c = LineChecker::default();
        c.feed(b"a\r");
        c.feed(b"\nb\r\n");
        assert!(c.at_line_start());
        assert_eq!(c.finish(), BodyFaults::default());
        let mut c = LineChecker::default();
        c.feed(b"a\nb");
        assert!(c.finish().bare_line_ending);
        let mut c = LineChecker::default();
        c.feed(b"a\r");
        assert!(c.finish().bare_line_ending);
    }
}
