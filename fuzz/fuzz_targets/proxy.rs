//! Arbitrary first bytes of a connection into the PROXY header parser, at every cut:
//! it must never panic, decide within `MAX_HEADER` octets, never consume more than it
//! was given, and give the same answer however the bytes arrived.
#![no_main]

use libfuzzer_sys::fuzz_target;
use postern_smtp::proxy::{MAX_HEADER, Parse, parse};

fuzz_target!(|data: &[u8]| {
    let input = &data[..data.len().min(MAX_HEADER + 64)];
    let whole = parse(input);
    if input.len() >= MAX_HEADER {
        assert!(!matches!(whole, Parse::Partial), "undecided after MAX_HEADER");
    }
    for k in 0..input.len() {
        match (parse(&input[..k]), whole) {
            (Parse::Partial, _) => {}
            // Once decided, more bytes change nothing.
            (Parse::Complete { consumed, .. }, w) => {
                assert!(consumed <= k);
                assert_eq!(parse(&input[..k]), w);
            }
            (Parse::Error(e), w) => assert_eq!(Parse::Error(e), w),
        }
    }
});
