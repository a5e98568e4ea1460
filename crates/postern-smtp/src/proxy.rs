//! The PROXY protocol header a load balancer sends before the client's first byte, sans I/O.
//!
//! Spec: haproxy's `doc/proxy-protocol.txt` (the PROXY protocol, versions 1 and 2). The
//! caller keeps the first bytes of a connection in a buffer of at most [`MAX_HEADER`]
//! octets and calls [`parse`] after every read: [`Parse::Partial`] means "read more",
//! [`Parse::Complete`] gives the header and how many octets it took (the rest belongs to
//! the SMTP session), [`Parse::Error`] means close the connection.
//!
//! Strict on purpose: the peer is trusted to tell us the client's address, not to send
//! anything it likes. TLVs (v2, section 2.2) are checked for framing and skipped; nothing
//! in them is believed, in particular not `PP2_TYPE_SSL` (a client is "over TLS" only if
//! *we* terminated TLS).

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

/// Longest v1 header, CRLF included (spec 2.1: "a 107-character buffer").
pub const V1_MAX: usize = 107;
/// Longest v2 header we accept: the 16-octet fixed part and at most 520 octets of
/// addresses and TLVs, 536 in all (spec 2.2: a receiver must accept at least 216 octets
/// for the address block; 536 is the minimum TCP MSS, so one segment always holds it).
pub const V2_MAX: usize = 536;
/// The most octets a caller ever needs to buffer before [`parse`] decides.
pub const MAX_HEADER: usize = V2_MAX;

/// The v2 signature (spec 2.2).
pub const V2_SIGNATURE: &[u8; 12] = b"\r\n\r\n\0\r\nQUIT\n";
const V1_PREFIX: &[u8] = b"PROXY ";

/// A parsed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// 1 or 2.
    pub version: u8,
    pub command: Command,
}

impl Header {
    /// The client's address the header carries, if it carries one: `None` for v2 `LOCAL`
    /// and for `UNKNOWN`/`UNSPEC`, where the spec says to use the connection's own
    /// endpoints.
    pub fn source(&self) -> Option<SocketAddr> {
        match self.command {
            Command::Proxy { source, .. } => Some(source),
            Command::Local | Command::Unknown => None,
        }
    }
}

/// What the header says about the connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    /// A relayed TCP connection from `source` to `destination`.
    Proxy {
        source: SocketAddr,
        destination: SocketAddr,
    },
    /// v2 `LOCAL` (spec 2.2: health checks from the proxy itself); use the real peer.
    Local,
    /// v1 `UNKNOWN` or v2 `PROXY` with family `UNSPEC`: no address; use the real peer.
    Unknown,
}

/// Why a header is refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Error {
    /// The connection does not start with `PROXY ` nor the v2 signature.
    NotProxy,
    /// Longer than [`V1_MAX`] or [`V2_MAX`].
    TooLong,
    /// The header is framed but its content is wrong; the text says what.
    Malformed(&'static str),
}

impl fmt::Display for Error {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Error::NotProxy => f.write_str("no PROXY protocol header"),
            Error::TooLong => f.write_str("PROXY header too long"),
            Error::Malformed(why) => write!(f, "malformed PROXY header: {why}"),
        }
    }
}

impl std::error::Error for Error {}

/// The outcome of [`parse`] over the bytes received so far.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Parse {
    /// The header, and how many octets of the input it took.
    Complete {
        header: Header,
        consumed: usize,
    },
    /// Not enough bytes yet to decide (never returned once `input` holds
    /// [`MAX_HEADER`] octets).
    Partial,
    Error(Error),
}

/// Parses the first bytes of a connection (all of them so far, from the first octet).
pub fn parse(input: &[u8]) -> Parse {
    if input.is_empty() {
        return Parse::Partial;
    }
    if input[0] == b'P' {
        return parse_v1(input);
    }
    if input[0] == b'\r' {
        return parse_v2(input);
    }
    Parse::Error(Error::NotProxy)
}

/// Is `input` a prefix of `whole` or does it start with it? `Some(true)` if it starts
/// with it, `Some(false)` if it is a shorter prefix, `None` if they differ.
fn starts(input: &[u8], whole: &[u8]) -> Option<bool> {
    let n = input.len().min(whole.len());
    (input[..n] == whole[..n]).then_some(input.len() >= whole.len())
}

/// Spec 2.1, the human-readable header format.
fn parse_v1(input: &[u8]) -> Parse {
    match starts(input, V1_PREFIX) {
        None => return Parse::Error(Error::NotProxy),
        Some(false) => return Parse::Partial,
        Some(true) => {}
    }
    let window = &input[..input.len().min(V1_MAX)];
    let lf = window.iter().position(|&b| b == b'\n');
    // Every octet before the LF must be printable, but for the CR just before it.
    let body = &window[..lf.unwrap_or(window.len())];
    // A CR as the last octet may be the CR of the CRLF (or, without LF yet, be followed
    // by it). The text is checked first, so that a bad octet is reported the same way
    // however the bytes arrive.
    let text_end = body.len() - usize::from(body.last() == Some(&b'\r'));
    if let Some(&b) = body[..text_end]
        .iter()
        .find(|&&b| !(0x20..0x7f).contains(&b))
    {
        return Parse::Error(Error::Malformed(if b == b'\r' {
            "CR without LF"
        } else {
            "not a text line"
        }));
    }
    let Some(lf) = lf else {
        return if input.len() >= V1_MAX {
            Parse::Error(Error::TooLong)
        } else {
            Parse::Partial
        };
    };
    if text_end == lf {
        return Parse::Error(Error::Malformed("line not ended by CRLF"));
    }
    let line = &window[..text_end];
    // Printable ASCII, so valid UTF-8.
    let Ok(line) = std::str::from_utf8(line) else {
        return Parse::Error(Error::Malformed("not a text line"));
    };
    match v1_fields(line) {
        Ok(command) => Parse::Complete {
            header: Header {
                version: 1,
                command,
            },
            consumed: lf + 1,
        },
        Err(why) => Parse::Error(Error::Malformed(why)),
    }
}

fn v1_fields(line: &str) -> Result<Command, &'static str> {
    // Spec 2.1: fields separated by exactly one space.
    let mut fields = line.split(' ');
    fields.next(); // "PROXY", checked by the caller.
    let family = fields.next().ok_or("no protocol")?;
    match family {
        // "the receiver must ignore anything presented before the CRLF is found".
        "UNKNOWN" => return Ok(Command::Unknown),
        "TCP4" | "TCP6" => {}
        _ => return Err("protocol is not TCP4, TCP6 or UNKNOWN"),
    }
    let (Some(src), Some(dst), Some(sport), Some(dport), None) = (
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
        fields.next(),
    ) else {
        return Err("expected four fields after the protocol");
    };
    let ip = |s: &str| -> Result<IpAddr, &'static str> {
        if family == "TCP4" {
            s.parse::<Ipv4Addr>()
                .map(IpAddr::V4)
                .map_err(|_| "not an IPv4 address")
        } else {
            s.parse::<Ipv6Addr>()
                .map(IpAddr::V6)
                .map_err(|_| "not an IPv6 address")
        }
    };
    let source = SocketAddr::new(ip(src)?, port(sport)?);
    let destination = SocketAddr::new(ip(dst)?, port(dport)?);
    Ok(Command::Proxy {
        source,
        destination,
    })
}

/// A decimal port, 0-65535, without leading zeros (spec 2.1).
fn port(s: &str) -> Result<u16, &'static str> {
    let digits = !s.is_empty() && s.len() <= 5 && s.bytes().all(|b| b.is_ascii_digit());
    if !digits || (s.len() > 1 && s.starts_with('0')) {
        return Err("bad port");
    }
    s.parse::<u16>().map_err(|_| "bad port")
}

/// Spec 2.2, the binary header format.
fn parse_v2(input: &[u8]) -> Parse {
    match starts(input, V2_SIGNATURE) {
        None => return Parse::Error(Error::NotProxy),
        Some(false) => return Parse::Partial,
        Some(true) => {}
    }
    // The 13th octet: version (high nibble, must be 2) and command (low nibble).
    let Some(&ver_cmd) = input.get(12) else {
        return Parse::Partial;
    };
    if ver_cmd >> 4 != 2 {
        return Parse::Error(Error::Malformed("version is not 2"));
    }
    let local = match ver_cmd & 0x0f {
        0x0 => true,
        0x1 => false,
        _ => return Parse::Error(Error::Malformed("command is not LOCAL or PROXY")),
    };
    let Some(&fam) = input.get(13) else {
        return Parse::Partial;
    };
    let Some(len) = input.get(14..16) else {
        return Parse::Partial;
    };
    let len = usize::from(u16::from_be_bytes([len[0], len[1]]));
    let total = 16 + len;
    if total > V2_MAX {
        return Parse::Error(Error::TooLong);
    }
    let Some(block) = input.get(16..total) else {
        return Parse::Partial;
    };
    let done = |command| Parse::Complete {
        header: Header {
            version: 2,
            command,
        },
        consumed: total,
    };
    if local {
        // "the receiver must accept this connection as valid and must use the real
        // connection endpoints and discard the protocol block including the family".
        return done(Command::Local);
    }
    let addr_len = match fam {
        // UNSPEC: "the receiver should ignore address information".
        0x00 => return done(Command::Unknown),
        0x11 => 12,
        0x21 => 36,
        _ => {
            return Parse::Error(Error::Malformed(
                "family/protocol is not TCP4, TCP6 or UNSPEC",
            ));
        }
    };
    let Some(addrs) = block.get(..addr_len) else {
        return Parse::Error(Error::Malformed("address block shorter than its family"));
    };
    let command = if fam == 0x11 {
        let ip = |o: usize| {
            IpAddr::V4(Ipv4Addr::new(
                addrs[o],
                addrs[o + 1],
                addrs[o + 2],
                addrs[o + 3],
            ))
        };
        let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
        Command::Proxy {
            source: SocketAddr::new(ip(0), port(8)),
            destination: SocketAddr::new(ip(4), port(10)),
        }
    } else {
        let ip = |o: usize| {
            let mut a = [0u8; 16];
            a.copy_from_slice(&addrs[o..o + 16]);
            IpAddr::V6(Ipv6Addr::from(a))
        };
        let port = |o: usize| u16::from_be_bytes([addrs[o], addrs[o + 1]]);
        Command::Proxy {
            source: SocketAddr::new(ip(0), port(32)),
            destination: SocketAddr::new(ip(16), port(34)),
        }
    };
    if !tlvs_framed(&block[addr_len..]) {
        return Parse::Error(Error::Malformed("TLV overruns the header"));
    }
    done(command)
}

/// Spec 2.2.1-2.2.8: type (1 octet), length (2, big-endian), value. Only the framing is
/// checked; no value is used.
fn tlvs_framed(mut rest: &[u8]) -> bool {
    while !rest.is_empty() {
        let Some(head) = rest.get(..3) else {
            return false;
        };
        let len = usize::from(u16::from_be_bytes([head[1], head[2]]));
        let Some(after) = rest.get(3 + len..) else {
            return false;
        };
        rest = after;
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    fn proxy(version: u8, src: &str, dst: &str) -> Header {
        Header {
            version,
            command: Command::Proxy {
                source: sa(src),
                destination: sa(dst),
            },
        }
    }

    fn v2(cmd: u8, fam: u8, body: &[u8]) -> Vec<u8> {
        let mut v = V2_SIGNATURE.to_vec();
        v.push(cmd);
        v.push(fam);
        v.extend_from_slice(&u16::try_from(body.len()).unwrap().to_be_bytes());
        v.extend_from_slice(body);
        v
    }

    fn v2_tcp4(extra: &[u8]) -> Vec<u8> {
        let mut b = vec![192, 0, 2, 7, 10, 0, 0, 1];
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        b.extend_from_slice(extra);
        v2(0x21, 0x11, &b)
    }

    fn v2_tcp6() -> Vec<u8> {
        let mut b = "2001:db8::7".parse::<Ipv6Addr>().unwrap().octets().to_vec();
        b.extend_from_slice(&"2001:db8::1".parse::<Ipv6Addr>().unwrap().octets());
        b.extend_from_slice(&40000u16.to_be_bytes());
        b.extend_from_slice(&25u16.to_be_bytes());
        v2(0x21, 0x21, &b)
    }

    /// Valid transcripts: the header bytes and what they parse to.
    fn valid() -> Vec<(Vec<u8>, Header)> {
        // An SSL TLV claiming a verified client certificate: framed, skipped, not believed.
        let ssl_tlv = [0x20, 0x00, 0x05, 0x07, 0x00, 0x00, 0x00, 0x00];
        let noop_tlv = [0x04, 0x00, 0x03, 0, 0, 0];
        vec![
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\r\n".to_vec(),
                proxy(1, "192.0.2.7:40000", "10.0.0.1:25"),
            ),
            (
                b"PROXY TCP4 255.255.255.255 255.255.255.255 65535 65535\r\n".to_vec(),
                proxy(1, "255.255.255.255:65535", "255.255.255.255:65535"),
            ),
            (
                b"PROXY TCP4 0.0.0.0 0.0.0.0 0 0\r\n".to_vec(),
                proxy(1, "0.0.0.0:0", "0.0.0.0:0"),
            ),
            (
                b"PROXY TCP6 2001:db8::7 2001:db8::1 40000 25\r\n".to_vec(),
                proxy(1, "[2001:db8::7]:40000", "[2001:db8::1]:25"),
            ),
            (
                b"PROXY UNKNOWN\r\n".to_vec(),
                Header {
                    version: 1,
                    command: Command::Unknown,
                },
            ),
            (
                b"PROXY UNKNOWN ffff:f...f:ffff ffff:f...f:ffff 65535 65535\r\n".to_vec(),
                Header {
                    version: 1,
                    command: Command::Unknown,
                },
            ),
            (v2_tcp4(&[]), proxy(2, "192.0.2.7:40000", "10.0.0.1:25")),
            (
                v2_tcp4(&ssl_tlv),
                proxy(2, "192.0.2.7:40000", "10.0.0.1:25"),
            ),
            (
                v2_tcp4(&[&ssl_tlv[..], &noop_tlv[..]].concat()),
                proxy(2, "192.0.2.7:40000", "10.0.0.1:25"),
            ),
            (
                v2_tcp6(),
                proxy(2, "[2001:db8::7]:40000", "[2001:db8::1]:25"),
            ),
            (
                v2(0x20, 0x00, &[]),
                Header {
                    version: 2,
                    command: Command::Local,
                },
            ),
            // LOCAL discards the block whatever the family says.
            (
                v2(0x20, 0x11, &[1, 2, 3]),
                Header {
                    version: 2,
                    command: Command::Local,
                },
            ),
            (
                v2(0x21, 0x00, &[]),
                Header {
                    version: 2,
                    command: Command::Unknown,
                },
            ),
            // The largest v2 header we take.
            (
                v2(0x21, 0x00, &[0; V2_MAX - 16]),
                Header {
                    version: 2,
                    command: Command::Unknown,
                },
            ),
        ]
    }

    #[test]
    fn valid_headers_parse_at_every_split() {
        let session = b"EHLO client.example\r\n";
        for (header, want) in valid() {
            let mut input = header.clone();
            input.extend_from_slice(session);
            for k in 0..=input.len() {
                let got = parse(&input[..k]);
                if k < header.len() {
                    assert_eq!(got, Parse::Partial, "{header:?} cut at {k}");
                } else {
                    assert_eq!(
                        got,
                        Parse::Complete {
                            header: want,
                            consumed: header.len()
                        },
                        "{header:?} cut at {k}"
                    );
                }
            }
            assert_eq!(&input[header.len()..], session);
        }
    }

    #[test]
    fn bad_headers_are_refused_and_never_complete() {
        let too_long_v1 = {
            let mut v = b"PROXY UNKNOWN ".to_vec();
            v.resize(V1_MAX, b'x');
            v.extend_from_slice(b"\r\n");
            v
        };
        let cases: Vec<(Vec<u8>, Error)> = vec![
            (b"EHLO x\r\n".to_vec(), Error::NotProxy),
            (b"\r\nEHLO x\r\n".to_vec(), Error::NotProxy),
            (b"PROXX TCP4".to_vec(), Error::NotProxy),
            (
                b"proxy TCP4 1.2.3.4 1.2.3.4 1 1\r\n".to_vec(),
                Error::NotProxy,
            ),
            (too_long_v1, Error::TooLong),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\n".to_vec(),
                Error::Malformed("line not ended by CRLF"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25\rX\r\n".to_vec(),
                Error::Malformed("CR without LF"),
            ),
            (
                b"PROXY TCP4 192.0.2.7\x00 10.0.0.1 1 2\r\n".to_vec(),
                Error::Malformed("not a text line"),
            ),
            (
                b"PROXY UDP4 192.0.2.7 10.0.0.1 1 2\r\n".to_vec(),
                Error::Malformed("protocol is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                b"PROXY \r\n".to_vec(),
                Error::Malformed("protocol is not TCP4, TCP6 or UNKNOWN"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000\r\n".to_vec(),
                Error::Malformed("expected four fields after the protocol"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 25 x\r\n".to_vec(),
                Error::Malformed("expected four fields after the protocol"),
            ),
            (
                b"PROXY TCP4  192.0.2.7 10.0.0.1 40000 25\r\n".to_vec(),
                Error::Malformed("expected four fields after the protocol"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 040000 25\r\n".to_vec(),
                Error::Malformed("bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 00 25\r\n".to_vec(),
                Error::Malformed("bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 65536 25\r\n".to_vec(),
                Error::Malformed("bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 +1 25\r\n".to_vec(),
                Error::Malformed("bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.7 10.0.0.1 40000 \r\n".to_vec(),
                Error::Malformed("bad port"),
            ),
            (
                b"PROXY TCP4 192.0.2.07 10.0.0.1 1 2\r\n".to_vec(),
                Error::Malformed("not an IPv4 address"),
            ),
            (
                b"PROXY TCP4 2001:db8::7 10.0.0.1 1 2\r\n".to_vec(),
                Error::Malformed("not an IPv4 address"),
            ),
            (
                b"PROXY TCP6 192.0.2.7 2001:db8::1 1 2\r\n".to_vec(),
                Error::Malformed("not an IPv6 address"),
            ),
            (
                b"PROXY TCP6 [2001:db8::7] 2001:db8::1 1 2\r\n".to_vec(),
                Error::Malformed("not an IPv6 address"),
            ),
            (
                v2(0x11, 0x11, &[0; 12]),
                Error::Malformed("version is not 2"),
            ),
            (
                v2(0x22, 0x11, &[0; 12]),
                Error::Malformed("command is not LOCAL or PROXY"),
            ),
            (
                v2(0x21, 0x12, &[0; 12]),
                Error::Malformed("family/protocol is not TCP4, TCP6 or UNSPEC"),
            ),
            (
                v2(0x21, 0x31, &[0; 216]),
                Error::Malformed("family/protocol is not TCP4, TCP6 or UNSPEC"),
            ),
            (
                v2(0x21, 0x11, &[0; 11]),
                Error::Malformed("address block shorter than its family"),
            ),
            (
                v2(0x21, 0x21, &[0; 35]),
                Error::Malformed("address block shorter than its family"),
            ),
            (
                v2_tcp4(&[0x20, 0x00]),
                Error::Malformed("TLV overruns the header"),
            ),
            (
                v2_tcp4(&[0x20, 0x00, 0x05, 0]),
                Error::Malformed("TLV overruns the header"),
            ),
            (v2(0x21, 0x00, &[0; V2_MAX - 15]), Error::TooLong),
            (v2(0x21, 0x00, &[0; 65535]), Error::TooLong),
        ];
        for (input, want) in cases {
            assert_eq!(parse(&input), Parse::Error(want), "{input:?}");
            for k in 0..input.len() {
                match parse(&input[..k]) {
                    Parse::Partial => {}
                    Parse::Error(e) => assert_eq!(e, want, "{input:?} cut at {k}"),
                    other => panic!("{input:?} cut at {k}: {other:?}"),
                }
            }
        }
    }

    #[test]
    fn partial_is_bounded() {
        // A peer that never ends its v1 line is refused once 107 octets are in.
        let mut v = b"PROXY TCP4 ".to_vec();
        v.resize(V1_MAX - 1, b'1');
        assert_eq!(parse(&v), Parse::Partial);
        v.push(b'1');
        assert_eq!(parse(&v), Parse::Error(Error::TooLong));
        // A v2 header is decided once MAX_HEADER octets are in.
        let v = v2(0x21, 0x00, &[0; V2_MAX - 16]);
        assert_eq!(v.len(), MAX_HEADER);
        assert!(matches!(parse(&v), Parse::Complete { .. }));
        assert_eq!(parse(b""), Parse::Partial);
    }

    #[test]
    fn source_is_the_carried_address_only_for_proxy() {
        assert_eq!(
            proxy(1, "192.0.2.7:1", "10.0.0.1:25").source(),
            Some(sa("192.0.2.7:1"))
        );
        let local = Header {
            version: 2,
            command: Command::Local,
        };
        assert_eq!(local.source(), None);
    }
}
