//! Arbitrary server bytes into the SMTP client's reply parser, in arbitrary pieces, the
//! way `delivery/client/io.rs` drives it (a growing buffer, complete replies drained),
//! and every complete reply into the EHLO capability parser: whatever a server sends,
//! neither may panic, the buffer stays bounded, and the parser resuming over pieces must
//! agree with one parse of the same bytes.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_smtp::client::{
    Extensions, MAX_REPLY_LINES, MAX_REPLY_SIZE, ParsedReply, ReplyParser, parse_reply,
};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the size of the pieces the bytes arrive in.
    let (chunk, input) = data.split_first().unwrap_or((&1, &[]));
    let size = usize::from(*chunk).max(1);
    let mut parser = ReplyParser::new();
    let mut buf: Vec<u8> = Vec::new();
    for piece in input.chunks(size) {
        buf.extend_from_slice(piece);
        loop {
            let resumed = parser.parse(&buf);
            // One whole parse per answer, not per piece: that would be quadratic.
            if resumed != Ok(ParsedReply::Partial) {
                assert_eq!(
                    resumed,
                    parse_reply(&buf),
                    "resuming differs from one parse"
                );
            }
            match resumed {
                Ok(ParsedReply::Complete(reply, used)) => {
                    assert!(used > 0 && used <= buf.len() && used <= MAX_REPLY_SIZE);
                    assert!((200..600).contains(&reply.code));
                    assert!(!reply.lines.is_empty() && reply.lines.len() <= MAX_REPLY_LINES);
                    assert!(reply.lines.iter().all(|l| !l.chars().any(char::is_control)));
                    let ext = Extensions::from_ehlo(&reply);
                    assert!(ext.auth.iter().all(|m| !m.is_empty()));
                    buf.drain(..used);
                }
                Ok(ParsedReply::Partial) => {
                    assert!(buf.len() < MAX_REPLY_SIZE);
                    break;
                }
                // The client drops the connection here: nothing more to read.
                Err(_) => return,
            }
        }
    }
    assert_eq!(parse_reply(&buf), Ok(ParsedReply::Partial));
});
