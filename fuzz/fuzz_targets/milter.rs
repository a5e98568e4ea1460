//! Arbitrary milter bytes into the MTA side of the milter protocol
//! (`postern_smtp::milter::Session`), in pieces of the size the first byte picks, with a
//! driver that goes on through the SMTP stages as each decision comes (the second byte
//! picks the offered options). Whatever the milter sends: no panic, at most one packet
//! buffered beyond what is decoded, nothing after an error, every SMTP reply a checked
//! 4xx/5xx, and the same events however the bytes were split.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_smtp::milter::{ClientAddr, Config, Decision, Error, Event, Session};

/// Feeds `input` in pieces of `size`, driving the stages; returns every event.
fn run(config: &Config, input: &[u8], size: usize) -> Vec<Result<Event, Error>> {
    let mut s = Session::new(config.clone());
    let mut got = Vec::new();
    let mut step = 0usize;
    for piece in input.chunks(size.max(1)) {
        s.feed(piece);
        while let Some(e) = s.poll_event() {
            if let Ok(Event::Negotiated | Event::Decision(_)) = &e {
                step += 1;
                // Errors here are the driver's own (a stage skipped, busy): ignore them.
                let _ = match step % 9 {
                    1 => s.connect(&[("j", "mx")], "c.test", &ClientAddr::Unknown),
                    2 => s.helo(&[], "c.test"),
                    3 => s.mail(&[("i", "Q")], "a@b.test", &["SIZE=1"]),
                    4 => s.rcpt(&[], "c@d.test", &[]),
                    5 => s.data(&[]),
                    6 => s.header("Subject", b" hi"),
                    7 => s.body(b"body\r\n").map(|(_, sent)| sent),
                    8 => s.eom(&[]),
                    _ => s.abort(),
                };
            }
            if let Ok(Event::Decision(Decision::Reply(r))) = &e {
                assert!((400..600).contains(&r.code));
                assert!(!r.lines.is_empty() && r.lines.len() <= 100);
                assert!(r.lines.iter().all(|l| !l.chars().any(char::is_control)));
            }
            let failed = e.is_err();
            got.push(e);
            if failed {
                assert!(s.poll_event().is_none(), "an event after an error");
            }
        }
        assert!(s.buffered() <= config.max_packet.max(65536) + 4 + size);
    }
    got
}

fuzz_target!(|data: &[u8]| {
    let [size, options, input @ ..] = data else {
        return;
    };
    let mut config = Config::default();
    if options & 1 != 0 {
        config.actions = u32::from(*options) << 1;
    }
    if options & 2 != 0 {
        config.protocol &= !0x000f_f080; // no SMFIP_NR_*: every stage answered
    }
    let whole = run(&config, input, input.len().max(1));
    let pieces = run(&config, input, usize::from(*size));
    assert_eq!(whole, pieces, "the events depend on how the bytes were split");
});
