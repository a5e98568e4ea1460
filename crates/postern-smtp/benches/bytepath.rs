//! The body's byte path, measured alone (issue 15): the DATA reader (end of data,
//! dot-unstuffing, line checks), the BDAT line checker and the dot-stuffer (the pieces of
//! the body a vectored write sends, as delivery does), on messages of 76-octet lines as mail is written, fed in 64 KiB reads as the session reads them.
//! A plain timing loop (no harness): `cargo bench -p postern-smtp --bench bytepath`.
//! Prints nanoseconds per octet, the best of five rounds.

use std::hint::black_box;
use std::time::{Duration, Instant};

use postern_smtp::client::Stuffed;
use postern_smtp::data::{DataReader, LineChecker};

/// A message of `size` octets: header lines, then text lines of 76 octets, one in
/// twenty starting with a dot (stuffed on the wire), then the end of data.
fn message(size: usize) -> (Vec<u8>, Vec<u8>) {
    let mut text = b"From: a@example.org\r\nTo: b@example.org\r\nSubject: bench\r\n\r\n".to_vec();
    let mut n = 0usize;
    while text.len() < size {
        let mut line = vec![b'a' + (n % 26) as u8; 74];
        if n.is_multiple_of(20) {
            line[0] = b'.';
        }
        text.extend_from_slice(&line);
        text.extend_from_slice(b"\r\n");
        n += 1;
    }
    let wire = Stuffed::new(&text).collect::<Vec<_>>().concat();
    (text, wire)
}

/// The best time per octet of `f` over five rounds of about 200 ms each.
fn best(octets: usize, mut f: impl FnMut()) -> f64 {
    let mut best = f64::MAX;
    for _ in 0..5 {
        let start = Instant::now();
        let mut rounds = 0u64;
        while start.elapsed() < Duration::from_millis(200) {
            f();
            rounds += 1;
        }
        let ns = start.elapsed().as_nanos() as f64 / (rounds as f64 * octets as f64);
        best = best.min(ns);
    }
    best
}

fn main() {
    for size in [4 * 1024, 100 * 1024] {
        let (text, wire) = message(size);
        let data = best(wire.len(), || {
            let mut reader = DataReader::new(10 << 20);
            for chunk in wire.chunks(64 * 1024) {
                let (_, done) = reader.feed(black_box(chunk));
                if done {
                    break;
                }
            }
            black_box(reader.finish());
        });
        let bdat = best(text.len(), || {
            let mut checker = LineChecker::default();
            for chunk in text.chunks(64 * 1024) {
                checker.feed(black_box(chunk));
            }
            black_box(checker.finish());
        });
        let stuff = best(text.len(), || {
            let sent: usize = Stuffed::new(black_box(&text)).map(<[u8]>::len).sum();
            black_box(sent);
        });
        println!(
            "{:>6} octets: DATA reader {data:.3} ns/octet, BDAT line checker {bdat:.3} ns/octet, \
             dot-stuffer {stuff:.3} ns/octet",
            text.len()
        );
    }
}
