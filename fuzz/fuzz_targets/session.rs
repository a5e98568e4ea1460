//! Arbitrary client bytes into the SMTP session state machine, in arbitrary pieces:
//! whatever arrives, the session must neither panic nor buffer without bound.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_smtp::server::{Peer, SessionConfig};
use postern_smtp::{Event, Session, TlsInfo, catalogue};

fuzz_target!(|data: &[u8]| {
    // The first byte picks the listener flavour; the second the chunk size.
    let (flags, rest) = data.split_first().unwrap_or((&0, &[]));
    let (chunk, input) = rest.split_first().unwrap_or((&1, &[]));
    let config = SessionConfig {
        starttls: flags & 1 != 0,
        require_tls: flags & 2 != 0,
        auth_mechanisms: if flags & 4 != 0 {
            vec!["PLAIN".into(), "LOGIN".into()]
        } else {
            vec![]
        },
        auth_required: flags & 8 != 0,
        allow_plaintext_auth: flags & 16 != 0,
        ..SessionConfig::new("fuzz.test", 4096, 5)
    };
    let tls = (flags & 32 != 0).then(|| TlsInfo {
        version: "TLSv1.3".into(),
        cipher: "X".into(),
    });
    let mut s = Session::new(config, Peer { addr: "192.0.2.1:1".parse().unwrap(), tls });
    if flags & 64 != 0 {
        s.ask_sender();
    }
    let size = usize::from(*chunk).max(1);
    let mut out = 0usize;
    'outer: for piece in input.chunks(size) {
        s.receive(piece);
        loop {
            match s.poll() {
                Event::NeedInput => break,
                Event::Flush => {
                    // Pending replies stay bounded, whatever was pipelined.
                    let n = s.take_output().len();
                    assert!(n <= postern_smtp::server::MAX_PENDING_OUTPUT + 2048);
                    out += n;
                }
                Event::Close => break 'outer,
                Event::Sender(r) => s.answer_sender(if r.sender.to_string().contains('x') {
                    Err(catalogue::relay_denied())
                } else {
                    Ok(())
                }),
                Event::Recipient(r) => s.answer_recipient(if r.recipient.is_routed() {
                    Err(catalogue::relay_denied())
                } else {
                    Ok(())
                }),
                Event::Message(m) => {
                    assert!(m.body.len() <= 4096 + 2);
                    s.answer_message(catalogue::queued("FUZZ"))
                }
                Event::Authenticate(_) => s.answer_auth(Err(catalogue::auth_failed())),
                Event::StartTls => s.tls_established(TlsInfo {
                    version: "TLSv1.3".into(),
                    cipher: "X".into(),
                }),
            }
        }
        out += s.take_output().len();
    }
    // Replies are bounded by what came in (a handful of lines per input line).
    assert!(out <= 1024 + input.len() * 64);
});
