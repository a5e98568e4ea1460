//! Fuzz the message screener: any bytes as a message, screened against a fixed set of
//! rules covering every criterion (senders, attachment names, content sniffing, ZIP
//! entries, keywords). It must return, never panic, and stay within memory. The unit
//! test `filter::tests::pseudo_random_inputs_never_panic` runs the same body over
//! mutated inputs when cargo-fuzz is not available.
#![no_main]

use std::sync::LazyLock;

use libfuzzer_sys::fuzz_target;
use postern::filter::{Screener, fuzz_rules};

static SCREENER: LazyLock<Screener> = LazyLock::new(|| Screener::new(&fuzz_rules()));

fuzz_target!(|message: &[u8]| {
    let _ = SCREENER.screen("fuzz@example.org", message);
});
