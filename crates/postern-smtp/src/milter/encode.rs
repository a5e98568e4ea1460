//! Encoders for every command the MTA sends (`SMFIC_*`), each appending whole packets to a
//! buffer. They do not know what was negotiated; [`super::Session`] decides what to send.
//!
//! Strings go out NUL-terminated; a NUL inside one is dropped (see `frame::put_str`).

use std::net::SocketAddr;

use super::frame::{put_str, write_packet};
use super::proto::*;

/// Where the SMTP client is, for `SMFIC_CONNECT`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum ClientAddr {
    /// TCP over IPv4 (`SMFIA_INET`) or IPv6 (`SMFIA_INET6`): address and port.
    Inet(SocketAddr),
    /// A Unix socket (`SMFIA_UNIX`): its path; the port is sent as 0.
    Unix(String),
    /// Unknown (`SMFIA_UNKNOWN`): neither port nor address is sent.
    Unknown,
}

/// `SMFIC_OPTNEG`: our version, the actions we allow, the protocol flags we can honour.
pub fn optneg(out: &mut Vec<u8>, version: u32, actions: u32, protocol: u32) {
    write_packet(out, SMFIC_OPTNEG, |o| {
        o.extend_from_slice(&version.to_be_bytes());
        o.extend_from_slice(&actions.to_be_bytes());
        o.extend_from_slice(&protocol.to_be_bytes());
    });
}

/// The wire form of a macro name: one letter as is (`j`, `_`, `i`), a longer name in
/// braces (`{daemon_name}`), a name already in braces as is.
pub fn macro_name(name: &str) -> String {
    if name.len() <= 1 || (name.starts_with('{') && name.ends_with('}')) {
        name.to_string()
    } else {
        format!("{{{name}}}")
    }
}

/// `SMFIC_MACRO` for the command `stage` (its `SMFIC_*` code): name, value, name, value...
pub fn macros(out: &mut Vec<u8>, stage: u8, pairs: &[(&str, &str)]) {
    write_packet(out, SMFIC_MACRO, |o| {
        o.push(stage);
        for (name, value) in pairs {
            put_str(o, macro_name(name).as_bytes());
            put_str(o, value.as_bytes());
        }
    });
}

/// `SMFIC_CONNECT`: the client's host name (`[192.0.2.1]` when it has none), family, port,
/// address. IPv6 addresses go out in plain text form, as libmilter's `inet_pton` reads them.
pub fn connect(out: &mut Vec<u8>, hostname: &str, addr: &ClientAddr) {
    write_packet(out, SMFIC_CONNECT, |o| {
        put_str(o, hostname.as_bytes());
        match addr {
            ClientAddr::Inet(sa) => {
                o.push(if sa.is_ipv4() {
                    SMFIA_INET
                } else {
                    SMFIA_INET6
                });
                o.extend_from_slice(&sa.port().to_be_bytes());
                put_str(o, sa.ip().to_string().as_bytes());
            }
            ClientAddr::Unix(path) => {
                o.push(SMFIA_UNIX);
                o.extend_from_slice(&0u16.to_be_bytes());
                put_str(o, path.as_bytes());
            }
            ClientAddr::Unknown => o.push(SMFIA_UNKNOWN),
        }
    });
}

/// `SMFIC_HELO`: the HELO/EHLO argument.
pub fn helo(out: &mut Vec<u8>, name: &str) {
    write_packet(out, SMFIC_HELO, |o| put_str(o, name.as_bytes()));
}

fn envelope(out: &mut Vec<u8>, code: u8, addr: &str, args: &[&str]) {
    write_packet(out, code, |o| {
        put_str(o, format!("<{addr}>").as_bytes());
        for arg in args {
            put_str(o, arg.as_bytes());
        }
    });
}

/// `SMFIC_MAIL`: the sender (without angle brackets: they are added; empty for the null
/// sender), then each ESMTP parameter (`SIZE=1024`, `BODY=8BITMIME`).
pub fn mail(out: &mut Vec<u8>, sender: &str, args: &[&str]) {
    envelope(out, SMFIC_MAIL, sender, args);
}

/// `SMFIC_RCPT`: the recipient (without angle brackets), then each ESMTP parameter.
pub fn rcpt(out: &mut Vec<u8>, recipient: &str, args: &[&str]) {
    envelope(out, SMFIC_RCPT, recipient, args);
}

/// `SMFIC_DATA` (protocol version 4 and later).
pub fn data(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_DATA, |_| {});
}

/// `SMFIC_HEADER`: a header field's name and value, the value exactly as it goes on the
/// wire (the session strips the leading space and turns folds into LF as negotiated).
pub fn header(out: &mut Vec<u8>, name: &str, value: &[u8]) {
    write_packet(out, SMFIC_HEADER, |o| {
        put_str(o, name.as_bytes());
        put_str(o, value);
    });
}

/// `SMFIC_EOH`: end of the header section.
pub fn eoh(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_EOH, |_| {});
}

/// `SMFIC_BODY`: the body, as many packets as it takes, each of at most
/// [`MILTER_CHUNK_SIZE`] octets (CRLF line ends, as on the SMTP wire). Nothing for an empty
/// body. The number of packets written is returned.
pub fn body(out: &mut Vec<u8>, body: &[u8]) -> usize {
    let mut n = 0;
    for chunk in body.chunks(MILTER_CHUNK_SIZE) {
        write_packet(out, SMFIC_BODY, |o| o.extend_from_slice(chunk));
        n += 1;
    }
    n
}

/// `SMFIC_BODYEOB`: end of the message; the milter answers with its actions and decision.
pub fn bodyeob(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_BODYEOB, |_| {});
}

/// `SMFIC_ABORT`: forget the current message (RSET, or a transaction that ended early).
pub fn abort(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_ABORT, |_| {});
}

/// `SMFIC_QUIT`: the end of the conversation.
pub fn quit(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_QUIT, |_| {});
}

/// `SMFIC_QUIT_NC`: this SMTP connection is over, another will follow on the same milter
/// connection (version 6).
pub fn quit_nc(out: &mut Vec<u8>) {
    write_packet(out, SMFIC_QUIT_NC, |_| {});
}

#[cfg(test)]
mod tests {
    use super::*;

    fn one(f: impl FnOnce(&mut Vec<u8>)) -> Vec<u8> {
        let mut v = Vec::new();
        f(&mut v);
        v
    }

    #[test]
    fn every_command_on_the_wire() {
        #[rustfmt::skip]
        let cases: Vec<(Vec<u8>, &[u8])> = vec![
            (one(|o| optneg(o, 6, 0x1ff, 0x1f_f7ff)), b"\0\0\0\x0dO\0\0\0\x06\0\0\x01\xff\0\x1f\xf7\xff"),
            (one(|o| macros(o, b'C', &[("j", "mx.test"), ("daemon_name", "postern"), ("{if_addr}", "::1")])),
             b"\0\0\0\x30DCj\0mx.test\0{daemon_name}\0postern\0{if_addr}\0::1\0"),
            (one(|o| connect(o, "client.test", &ClientAddr::Inet("192.0.2.7:4000".parse().unwrap()))),
             b"\0\0\0\x1aCclient.test\x004\x0f\xa0192.0.2.7\0"),
            (one(|o| connect(o, "[2001:db8::7]", &ClientAddr::Inet("[2001:db8::7]:25".parse().unwrap()))),
             b"\0\0\0\x1eC[2001:db8::7]\x006\0\x192001:db8::7\0"),
            (one(|o| connect(o, "localhost", &ClientAddr::Unix("/run/s".into()))),
             b"\0\0\0\x15Clocalhost\0L\0\0/run/s\0"),
            (one(|o| connect(o, "localhost", &ClientAddr::Unknown)), b"\0\0\0\x0cClocalhost\0U"),
            (one(|o| helo(o, "client.test")), b"\0\0\0\x0dHclient.test\0"),
            (one(|o| mail(o, "a@b.test", &["SIZE=10", "BODY=8BITMIME"])),
             b"\0\0\0\x22M<a@b.test>\0SIZE=10\0BODY=8BITMIME\0"),
            (one(|o| mail(o, "", &[])), b"\0\0\0\x04M<>\0"),
            (one(|o| rcpt(o, "c@d.test", &[])), b"\0\0\0\x0cR<c@d.test>\0"),
            (one(data), b"\0\0\0\x01T"),
            (one(|o| header(o, "Subject", b"hi\0there")), b"\0\0\0\x11LSubject\0hithere\0"),
            (one(eoh), b"\0\0\0\x01N"),
            (one(|o| { body(o, b"line\r\n"); }), b"\0\0\0\x07Bline\r\n"),
            (one(bodyeob), b"\0\0\0\x01E"),
            (one(abort), b"\0\0\0\x01A"),
            (one(quit), b"\0\0\0\x01Q"),
            (one(quit_nc), b"\0\0\0\x01K"),
        ];
        for (got, want) in cases {
            assert_eq!(got, want, "{:?}", String::from_utf8_lossy(want));
        }
    }

    #[test]
    fn body_is_split_into_chunks_of_65535() {
        let big = vec![b'x'; MILTER_CHUNK_SIZE * 2 + 10];
        let mut out = Vec::new();
        assert_eq!(body(&mut out, &big), 3);
        let mut d = super::super::frame::Decoder::new(1 << 17);
        d.feed(&out);
        let sizes: Vec<usize> = std::iter::from_fn(|| d.next_packet().unwrap())
            .map(|p| {
                assert_eq!(p.code, SMFIC_BODY);
                p.data.len()
            })
            .collect();
        assert_eq!(sizes, [MILTER_CHUNK_SIZE, MILTER_CHUNK_SIZE, 10]);
        assert_eq!(body(&mut Vec::new(), b""), 0);
    }
}
