//! Packet framing: a 4-octet big-endian length, one command or reply octet, the data.
//!
//! [`Decoder`] is fed the milter's bytes as they arrive, in any pieces, and hands out whole
//! packets. It never holds more than what it was fed plus one packet, and a packet longer
//! than its bound is an error as soon as its length is read, before any of it is stored:
//! a milter is a peer on the network and may be broken or hostile. The first bytes of a
//! connection are also checked for a peer that is not a milter at all (clamd, an HTTP
//! server, an SMTP server on the wrong port), whose text would otherwise read as a length
//! of hundreds of megabytes.

use std::fmt;

/// One packet, its length prefix removed.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Packet {
    /// The command (`SMFIC_*`) or reply (`SMFIR_*`) octet.
    pub code: u8,
    pub data: Vec<u8>,
}

/// What a peer that is not a milter looks like, from its first bytes.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Stranger {
    /// `UNKNOWN COMMAND`: ClamAV's clamd (its own protocol, not clamav-milter).
    Clamd,
    /// `HTTP/1.x ...`: a web server (rspamd's normal worker, not its proxy in milter mode).
    Http,
    /// `SPAMD/...`: SpamAssassin's spamd.
    Spamd,
    /// `220 ...` or another SMTP reply: an SMTP server.
    Smtp,
    /// Some other text; its first octets, made printable.
    Text(String),
}

impl fmt::Display for Stranger {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stranger::Clamd => f.write_str("this looks like clamd, not a milter"),
            Stranger::Http => f.write_str("this looks like an HTTP server, not a milter"),
            Stranger::Spamd => f.write_str("this looks like spamd, not a milter"),
            Stranger::Smtp => f.write_str("this looks like an SMTP server, not a milter"),
            Stranger::Text(t) => write!(f, "the peer answers with text ({t:?}), not a milter"),
        }
    }
}

/// Why the bytes are not a packet stream.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FrameError {
    /// The declared length (command octet included) is above the bound.
    TooLong { declared: u32, max: usize },
    /// A length of 0: a packet must at least hold its code.
    Empty,
    /// The peer is not a milter.
    NotAMilter(Stranger),
    /// The connection ended inside a packet: `have` of `want` octets (prefix included).
    Truncated { have: usize, want: usize },
}

impl fmt::Display for FrameError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            FrameError::TooLong { declared, max } => {
                write!(
                    f,
                    "packet of {declared} octets, more than the {max} allowed"
                )
            }
            FrameError::Empty => f.write_str("packet of length 0"),
            FrameError::NotAMilter(s) => s.fmt(f),
            FrameError::Truncated { have, want } => write!(
                f,
                "connection closed inside a packet ({have} of {want} octets)"
            ),
        }
    }
}

impl std::error::Error for FrameError {}

/// How many first octets decide whether a peer that sends text is a known stranger.
const SNIFF: usize = 16;

/// Incremental packet decoder (see the module documentation).
#[derive(Clone, Debug)]
pub struct Decoder {
    max: usize,
    buf: Vec<u8>,
    /// Where the next packet starts in `buf`.
    start: usize,
    /// Has a whole packet been decoded yet? Only the first bytes are sniffed.
    seen_packet: bool,
    failed: Option<FrameError>,
}

impl Decoder {
    /// A decoder for packets of at most `max` octets (code and data; the prefix not counted).
    pub fn new(max: usize) -> Decoder {
        Decoder {
            max,
            buf: Vec::new(),
            start: 0,
            seen_packet: false,
            failed: None,
        }
    }

    /// Appends bytes from the peer. After an error they are dropped.
    pub fn feed(&mut self, bytes: &[u8]) {
        if self.failed.is_none() {
            self.buf.extend_from_slice(bytes);
        }
    }

    /// Octets fed and not yet handed out.
    /// Drops capacity beyond `keep` octets when nothing is buffered (a connection kept
    /// idle after a big packet).
    pub fn shrink(&mut self, keep: usize) {
        if self.buffered() == 0 && self.buf.capacity() > keep {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// Octets of buffer memory held.
    pub fn capacity(&self) -> usize {
        self.buf.capacity()
    }

    pub fn buffered(&self) -> usize {
        self.buf.len() - self.start
    }

    /// The next whole packet, `Ok(None)` if more bytes are needed. An error is final: it
    /// is returned again on every later call.
    pub fn next_packet(&mut self) -> Result<Option<Packet>, FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        match self.decode() {
            Err(e) => {
                self.failed = Some(e.clone());
                self.buf = Vec::new();
                self.start = 0;
                Err(e)
            }
            ok => ok,
        }
    }

    /// The peer closed the connection: an error if that cut a packet (or showed a peer
    /// that is not a milter), `Ok` if it fell between packets.
    pub fn eof(&mut self) -> Result<(), FrameError> {
        if let Some(e) = &self.failed {
            return Err(e.clone());
        }
        let rest = &self.buf[self.start..];
        if rest.is_empty() {
            return Ok(());
        }
        let e = match (self.seen_packet, sniff(rest, true)) {
            (false, Some(Err(stranger))) => FrameError::NotAMilter(stranger),
            _ => FrameError::Truncated {
                have: rest.len(),
                want: match rest.get(..4) {
                    Some(p) => {
                        (u32::from_be_bytes([p[0], p[1], p[2], p[3]]) as usize).saturating_add(4)
                    }
                    None => 5,
                },
            },
        };
        self.failed = Some(e.clone());
        Err(e)
    }

    fn decode(&mut self) -> Result<Option<Packet>, FrameError> {
        let rest = &self.buf[self.start..];
        if !self.seen_packet {
            match sniff(rest, false) {
                Some(Err(stranger)) => return Err(FrameError::NotAMilter(stranger)),
                None => return Ok(None),
                Some(Ok(())) => {}
            }
        }
        let Some(prefix) = rest.get(..4) else {
            return Ok(None);
        };
        let declared = u32::from_be_bytes([prefix[0], prefix[1], prefix[2], prefix[3]]);
        let len = declared as usize;
        if len == 0 {
            return Err(FrameError::Empty);
        }
        if len > self.max {
            return Err(FrameError::TooLong {
                declared,
                max: self.max,
            });
        }
        let Some(body) = rest.get(4..4 + len) else {
            return Ok(None);
        };
        let packet = Packet {
            code: body[0],
            data: body[1..].to_vec(),
        };
        self.start += 4 + len;
        self.seen_packet = true;
        // Compact once the consumed part dominates, so the buffer stays near one packet.
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        } else if self.start > self.buf.len() / 2 {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        Ok(Some(packet))
    }
}

/// Looks at the first octets of a connection. `Some(Ok(()))`: they can be a milter's (a
/// packet length below 16 MiB starts with a zero octet); `Some(Err(_))`: a stranger;
/// `None`: not enough octets yet to tell. The answer depends only on the first [`SNIFF`]
/// octets (or all of them at `eof`), never on how they were split.
fn sniff(rest: &[u8], eof: bool) -> Option<Result<(), Stranger>> {
    let &first = rest.first()?;
    if first == 0 {
        return Some(Ok(()));
    }
    let window = &rest[..rest.len().min(SNIFF)];
    let is_text = |b: &u8| matches!(b, 0x20..=0x7e | b'\t' | b'\r' | b'\n');
    if !window.iter().all(is_text) {
        // Binary: let the length check speak (it is above 16 MiB, so too long).
        return Some(Ok(()));
    }
    if window.len() < SNIFF && !eof {
        return None;
    }
    let starts = |sig: &[u8]| window.starts_with(sig);
    Some(Err(if starts(b"HTTP/") {
        Stranger::Http
    } else if starts(b"UNKNOWN COMMAND") {
        Stranger::Clamd
    } else if starts(b"SPAMD/") {
        Stranger::Spamd
    } else if matches!(
        window,
        [
            b'2'..=b'5',
            b'0'..=b'9',
            b'0'..=b'9',
            b' ' | b'-' | b'\r',
            ..
        ]
    ) {
        Stranger::Smtp
    } else {
        Stranger::Text(
            String::from_utf8_lossy(window)
                .chars()
                .map(|c| if c.is_control() { '?' } else { c })
                .collect(),
        )
    }))
}

/// Writes one packet: `code` and whatever `fill` appends, with the length in front.
pub(crate) fn write_packet(out: &mut Vec<u8>, code: u8, fill: impl FnOnce(&mut Vec<u8>)) {
    let at = out.len();
    out.extend_from_slice(&[0, 0, 0, 0, code]);
    fill(out);
    // Our own data: its size comes from our limits (a body chunk, a header, an address),
    // far below 4 GiB; saturate rather than wrap if a caller ever passed more.
    let len = u32::try_from(out.len() - at - 4).unwrap_or(u32::MAX);
    out[at..at + 4].copy_from_slice(&len.to_be_bytes());
}

/// Appends a NUL-terminated string. A NUL inside it would end it early on the milter's
/// side and shift every later field, so NULs are dropped.
pub(crate) fn put_str(out: &mut Vec<u8>, s: &[u8]) {
    out.extend(s.iter().copied().filter(|&b| b != 0));
    out.push(0);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn packet(code: u8, data: &[u8]) -> Vec<u8> {
        let mut v = Vec::new();
        write_packet(&mut v, code, |o| o.extend_from_slice(data));
        v
    }

    #[test]
    fn framing_writes_length_code_data() {
        assert_eq!(packet(b'c', b""), b"\0\0\0\x01c");
        assert_eq!(packet(b'h', b"X\0y\0"), b"\0\0\0\x05hX\0y\0");
        let mut v = Vec::new();
        write_packet(&mut v, b'H', |o| put_str(o, b"a\0b"));
        assert_eq!(v, b"\0\0\0\x04Hab\0");
    }

    #[test]
    fn packets_decode_from_every_split() {
        let mut stream = packet(b'O', &[0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0]);
        stream.extend(packet(b'c', b""));
        stream.extend(packet(b'h', b"X-A\0b\0"));
        let want = vec![
            Packet {
                code: b'O',
                data: vec![0, 0, 0, 6, 0, 0, 0, 1, 0, 0, 0, 0],
            },
            Packet {
                code: b'c',
                data: vec![],
            },
            Packet {
                code: b'h',
                data: b"X-A\0b\0".to_vec(),
            },
        ];
        for a in 0..=stream.len() {
            for b in a..=stream.len() {
                let mut d = Decoder::new(100);
                let mut got = Vec::new();
                for piece in [&stream[..a], &stream[a..b], &stream[b..]] {
                    d.feed(piece);
                    while let Some(p) = d.next_packet().unwrap() {
                        got.push(p);
                    }
                }
                assert_eq!(got, want, "split at {a}, {b}");
                assert_eq!(d.buffered(), 0);
                assert_eq!(d.eof(), Ok(()));
            }
        }
    }

    #[test]
    fn a_long_declared_length_is_refused_before_storing() {
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 101]);
        assert_eq!(
            d.next_packet(),
            Err(FrameError::TooLong {
                declared: 101,
                max: 100
            })
        );
        // Final: later bytes are dropped and the error stays.
        d.feed(&[0; 1000]);
        assert_eq!(d.buffered(), 0);
        assert!(d.next_packet().is_err());
        // The bound itself is fine.
        let mut d = Decoder::new(100);
        d.feed(&packet(b'b', &[7; 99]));
        assert_eq!(d.next_packet().unwrap().unwrap().data.len(), 99);
        // The largest declared length from a binary peer.
        let mut d = Decoder::new(100);
        d.feed(&[0xff, 0xff, 0xff, 0xff, 0x01]);
        assert!(matches!(
            d.next_packet(),
            Err(FrameError::TooLong {
                declared: u32::MAX,
                ..
            })
        ));
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 0]);
        assert_eq!(d.next_packet(), Err(FrameError::Empty));
    }

    #[test]
    fn strangers_are_named_from_their_first_bytes() {
        let cases: &[(&[u8], Stranger)] = &[
            (b"UNKNOWN COMMAND\n", Stranger::Clamd),
            (b"HTTP/1.1 400 Bad Request\r\n\r\n", Stranger::Http),
            (b"HTTP/1.0 400 Bad request\r\n", Stranger::Http),
            (b"SPAMD/1.0 76 Bad header line\r\n", Stranger::Spamd),
            (b"220 mx.example.com ESMTP\r\n", Stranger::Smtp),
            (b"554-no\r\n554 go away\r\n", Stranger::Smtp),
            (
                b"+OK POP3 server ready\r\n",
                Stranger::Text("+OK POP3 server ".into()),
            ),
        ];
        for (input, want) in cases {
            for k in 0..=input.len() {
                let mut d = Decoder::new(1 << 17);
                d.feed(&input[..k]);
                let early = d.next_packet();
                d.feed(&input[k..]);
                let got = match early {
                    Ok(None) => d.next_packet(),
                    other => other,
                };
                assert_eq!(
                    got,
                    Err(FrameError::NotAMilter(want.clone())),
                    "{input:?} at {k}"
                );
            }
        }
        // Short text then close: named at eof.
        let mut d = Decoder::new(1 << 17);
        d.feed(b"UNKNOWN");
        assert_eq!(d.next_packet(), Ok(None));
        assert_eq!(
            d.eof(),
            Err(FrameError::NotAMilter(Stranger::Text("UNKNOWN".into())))
        );
        // A cut packet at eof.
        let mut d = Decoder::new(100);
        d.feed(&[0, 0, 0, 3, b'h']);
        assert_eq!(d.next_packet(), Ok(None));
        assert_eq!(d.eof(), Err(FrameError::Truncated { have: 5, want: 7 }));
    }
}
