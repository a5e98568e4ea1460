//! Throughput and memory of the message screener (`postern::filter`).
//!
//! ```sh
//! cargo run --release --example screen_bench            # default rounds
//! cargo run --release --example screen_bench -- 5000    # rounds of the 50 KB message
//! ```
//!
//! 1. A typical 50 KB message (text + HTML alternative + two base64 attachments)
//!    against five rules that do not match it, so every rule is evaluated: messages/s
//!    and MB/s.
//! 2. One 25 MB message with 100 base64 attachments (one of them a ZIP), same rules:
//!    time per screen and peak RSS (`VmHWM` from /proc/self/status) against the RSS
//!    before the message was built.
//!
//! 3. With `--shape NAME`, instead: one hostile 25 MB message shaped to make a MIME parser
//!    build a large structure (see `too_complex` in `src/filter/extract.rs`): time and
//!    peak RSS. One shape per process, since the peak RSS is the process's.
//!
//! ```sh
//! for s in headers parts addresses nested edge-headers edge-parts edge-addresses edge-params; do
//!     cargo run --release --example screen_bench -- --shape $s
//! done
//! ```
//!
//! The inputs are generated (a fixed xorshift seed), so every run screens the same bytes.

use std::time::Instant;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use postern::config::{Filter, FilterAction};
use postern::filter::Screener;

fn main() {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if let [flag, name] = &args[..]
        && flag == "--shape"
    {
        return shape(name);
    }
    let rounds: usize = args.first().and_then(|a| a.parse().ok()).unwrap_or(2000);
    let screener = Screener::new(&rules());
    let mut rng = XorShift(0x2545_F491_4F6C_DD1D);

    let rss_start = rss_kib("VmRSS");
    let typical = typical_message(&mut rng);
    assert!(screener.screen("alice@example.com", &typical).is_none());
    // Warm up, then measure.
    for _ in 0..rounds / 10 {
        std::hint::black_box(screener.screen("alice@example.com", &typical));
    }
    let started = Instant::now();
    for _ in 0..rounds {
        std::hint::black_box(screener.screen("alice@example.com", std::hint::black_box(&typical)));
    }
    let secs = started.elapsed().as_secs_f64();
    println!(
        "typical message: {} bytes, 5 rules, {rounds} screens in {:.3} s: {:.0} messages/s, {:.1} MB/s, {:.1} µs/message",
        typical.len(),
        secs,
        rounds as f64 / secs,
        (typical.len() * rounds) as f64 / secs / 1e6,
        secs * 1e6 / rounds as f64
    );

    let big = big_message(&mut rng);
    let rss_built = rss_kib("VmRSS");
    let mut times = Vec::new();
    for _ in 0..3 {
        let started = Instant::now();
        let verdict = screener.screen("alice@example.com", &big);
        times.push(started.elapsed().as_secs_f64());
        assert!(verdict.is_none(), "{verdict:?}");
    }
    times.sort_by(f64::total_cmp);
    let peak = rss_kib("VmHWM");
    println!(
        "large message: {:.1} MB, 100 attachments, 5 rules: {:.0} ms per screen (best of 3; worst {:.0} ms), {:.0} MB/s",
        big.len() as f64 / 1e6,
        times[0] * 1e3,
        times[2] * 1e3,
        big.len() as f64 / times[0] / 1e6
    );
    println!(
        "memory: RSS {:.1} MiB at start, {:.1} MiB with the message built, peak {:.1} MiB: screening added {:.1} MiB = {:.2}x the message size",
        mib(rss_start),
        mib(rss_built),
        mib(peak),
        mib(peak.saturating_sub(rss_built)),
        (peak.saturating_sub(rss_built) * 1024) as f64 / big.len() as f64
    );
}

/// One hostile message of 25 MB: `headers`, `parts`, `addresses` and `nested` are far
/// over the screener's structure budget (so screened raw), the `edge-` ones just under it
/// (so parsed): the worst that reaches mail-parser.
fn shape(name: &str) {
    const SIZE: usize = 25_000_000;
    // The budget in `too_complex`: 20,000 units + 1 per 16 bytes; a header field or a
    // boundary line is 4 units, a `;` 4, a `,` or `@` 2.
    let budget = 20_000 + SIZE / 16;
    let mut m: Vec<u8> = Vec::with_capacity(SIZE + 100);
    let repeat = |m: &mut Vec<u8>, unit: &[u8], times: usize| {
        for _ in 0..times {
            m.extend_from_slice(unit);
        }
    };
    match name {
        "headers" => repeat(&mut m, b"X: y\r\n", SIZE / 6),
        "parts" => {
            m.extend_from_slice(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n");
            repeat(&mut m, b"--b\r\n\r\nx\r\n", SIZE / 10);
        }
        "addresses" => {
            m.extend_from_slice(b"From: ");
            repeat(&mut m, b"a@b.c,", SIZE / 6);
            m.extend_from_slice(b"\r\n\r\nbody\r\n");
        }
        "nested" => {
            let level = b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\n";
            repeat(&mut m, level, SIZE / level.len());
            m.extend_from_slice(b"Subject: bottom\r\n\r\nbody\r\n");
        }
        "edge-headers" => repeat(&mut m, b"X: y\r\n", budget / 4 - 1000),
        "edge-parts" => {
            m.extend_from_slice(b"Content-Type: multipart/mixed; boundary=b\r\n\r\n");
            repeat(&mut m, b"--b\r\n\r\nx\r\n", budget / 4 - 1000);
        }
        "edge-addresses" => {
            m.extend_from_slice(b"From: ");
            repeat(&mut m, b"a@b.c,", budget / 4 - 1000);
            m.extend_from_slice(b"\r\n");
        }
        "edge-params" => {
            m.extend_from_slice(b"Content-Type: application/octet-stream");
            repeat(&mut m, b";name=x", budget / 4 - 1000);
            m.extend_from_slice(b"\r\n");
        }
        other => panic!("unknown shape {other:?}"),
    }
    if m.len() < SIZE {
        // Pad the edge shapes with plain text, which costs no structure.
        if !m.ends_with(b"\r\n\r\n") {
            m.extend_from_slice(b"\r\n");
        }
        while m.len() < SIZE {
            m.extend_from_slice(b"Plain filler text without any punctuation at all\r\n");
        }
    }
    let screener = Screener::new(&rules());
    let built = rss_kib("VmRSS");
    let started = Instant::now();
    let verdict = screener.screen("alice@example.com", &m);
    let secs = started.elapsed().as_secs_f64();
    println!(
        "shape {name}: {:.1} MB in {:.0} ms, {verdict:?}; RSS {:.1} MiB with the message built, peak {:.1} MiB",
        m.len() as f64 / 1e6,
        secs * 1e3,
        mib(built),
        mib(rss_kib("VmHWM"))
    );
}

/// Five rules of the usual kinds, none of which matches the generated messages.
fn rules() -> Vec<Filter> {
    let list = |v: &[&str]| v.iter().map(|s| s.to_string()).collect::<Vec<_>>();
    let filter = |name: &str, attachments: &[&str], keywords: &[&str], senders: &[&str]| Filter {
        name: name.into(),
        attachments: list(attachments),
        keywords: list(keywords),
        senders: list(senders),
        action: FilterAction::Quarantine,
    };
    vec![
        filter(
            "blocked-senders",
            &[],
            &[],
            &["*@spam.example", "bad@evil.example"],
        ),
        filter(
            "no-executables",
            &["*.exe", "*.scr", "*.vbs", "*.js", "*.bat", "*.jar"],
            &[],
            &[],
        ),
        filter("project-x", &[], &["project x", "codename falcon"], &[]),
        filter("macros", &["*.docm", "*.xlsm"], &[], &[]),
        filter(
            "mixed",
            &["*.iso"],
            &["wire transfer urgent", "gift cards"],
            &["*@*.invalid"],
        ),
    ]
}

fn typical_message(rng: &mut XorShift) -> Vec<u8> {
    let text = words(rng, 700);
    let html = format!(
        "<html><body><p>{}</p><table><tr><td>{}</td><td>{}</td></tr></table><p>Regards,<br>Alice &amp; Bob&nbsp;&mdash;</p></body></html>",
        words(rng, 900),
        words(rng, 40),
        words(rng, 40)
    );
    let pdf = rng.bytes(15_000);
    let png = rng.bytes(12_000);
    let mut m = String::from(
        "Received: from client.example.com (client.example.com [192.0.2.10])\r\n\tby mx.example.org with ESMTP id 4F2A; Sun, 29 Nov 2026 09:00:00 +0000\r\n\
         From: Alice Example <alice@example.com>\r\nTo: Bob <bob@example.org>, carol@example.org\r\n\
         Subject: =?UTF-8?Q?Quarterly_report_=E2=80=93_draft?=\r\nDate: Sun, 29 Nov 2026 09:00:00 +0000\r\n\
         Message-ID: <20261129090000.4F2A@example.com>\r\nMIME-Version: 1.0\r\n\
         Content-Type: multipart/mixed; boundary=\"mixed-1\"\r\n\r\n\
         --mixed-1\r\nContent-Type: multipart/alternative; boundary=\"alt-1\"\r\n\r\n\
         --alt-1\r\nContent-Type: text/plain; charset=utf-8\r\nContent-Transfer-Encoding: quoted-printable\r\n\r\n",
    );
    m.push_str(&quoted_printable(&text));
    m.push_str("\r\n--alt-1\r\nContent-Type: text/html; charset=utf-8\r\nContent-Transfer-Encoding: base64\r\n\r\n");
    m.push_str(&base64_lines(html.as_bytes()));
    m.push_str("--alt-1--\r\n");
    m.push_str(&attachment("report.pdf", "application/pdf", &pdf));
    m.push_str(&attachment("chart.png", "image/png", &png));
    m.push_str("--mixed-1--\r\n");
    m.into_bytes()
}

fn big_message(rng: &mut XorShift) -> Vec<u8> {
    let mut m = String::with_capacity(26_000_000);
    m.push_str(
        "From: Alice Example <alice@example.com>\r\nTo: bob@example.org\r\nSubject: All the scans\r\n\
         MIME-Version: 1.0\r\nContent-Type: multipart/mixed; boundary=\"big\"\r\n\r\n\
         --big\r\nContent-Type: text/plain; charset=utf-8\r\n\r\nHere they are.\r\n",
    );
    for i in 0..100 {
        if i == 50 {
            // One archive, so the ZIP entry scan is part of the measurement.
            let mut zip = Vec::new();
            for n in 0..200 {
                let name = format!("scans/page-{n:03}.pdf");
                zip.extend_from_slice(b"PK\x03\x04");
                zip.extend_from_slice(&[20, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0]);
                zip.extend_from_slice(&[0; 8]);
                zip.extend_from_slice(&(name.len() as u16).to_le_bytes());
                zip.extend_from_slice(&[0, 0]);
                zip.extend_from_slice(name.as_bytes());
                zip.extend_from_slice(&rng.bytes(900));
            }
            m.push_str(&attachment("scans.zip", "application/zip", &zip));
        } else {
            let body = rng.bytes(185_000);
            m.push_str(&attachment(
                &format!("scan-{i:03}.pdf"),
                "application/pdf",
                &body,
            ));
        }
    }
    m.push_str("--big--\r\n");
    m.into_bytes()
}

fn attachment(name: &str, content_type: &str, body: &[u8]) -> String {
    format!(
        "--{}\r\nContent-Type: {content_type}; name=\"{name}\"\r\nContent-Disposition: attachment; filename=\"{name}\"\r\nContent-Transfer-Encoding: base64\r\n\r\n{}",
        if name.starts_with("scan") {
            "big"
        } else {
            "mixed-1"
        },
        base64_lines(body)
    )
}

fn base64_lines(data: &[u8]) -> String {
    let encoded = BASE64.encode(data);
    let mut out = String::with_capacity(encoded.len() + encoded.len() / 38);
    for chunk in encoded.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).expect("base64 is ASCII"));
        out.push_str("\r\n");
    }
    out
}

fn quoted_printable(text: &str) -> String {
    let mut out = String::new();
    let mut line = 0;
    for c in text.chars() {
        let piece = if c.is_ascii() && c != '=' {
            c.to_string()
        } else {
            let mut buf = [0; 4];
            c.encode_utf8(&mut buf)
                .bytes()
                .map(|b| format!("={b:02X}"))
                .collect()
        };
        if line + piece.len() > 75 {
            out.push_str("=\r\n");
            line = 0;
        }
        line += piece.len();
        out.push_str(&piece);
    }
    out
}

fn words(rng: &mut XorShift, n: usize) -> String {
    const WORDS: &[&str] = &[
        "the",
        "quarterly",
        "numbers",
        "look",
        "better",
        "than",
        "expected",
        "and",
        "we",
        "should",
        "discuss",
        "them",
        "über",
        "next",
        "week",
        "with",
        "the",
        "team",
        "projected",
        "growth",
        "is",
        "strong",
        "café",
        "budget",
        "review",
        "meeting",
        "agenda",
        "report",
    ];
    let mut out = String::new();
    for i in 0..n {
        if i > 0 {
            out.push(if i % 13 == 0 { '\n' } else { ' ' });
        }
        out.push_str(WORDS[(rng.next() as usize) % WORDS.len()]);
    }
    out
}

struct XorShift(u64);

impl XorShift {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    fn bytes(&mut self, n: usize) -> Vec<u8> {
        let mut out = Vec::with_capacity(n + 8);
        while out.len() < n {
            out.extend_from_slice(&self.next().to_le_bytes());
        }
        out.truncate(n);
        out
    }
}

/// A `Vm...` line of /proc/self/status, in KiB (0 where there is no /proc).
fn rss_kib(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or(0)
}

fn mib(kib: u64) -> f64 {
    kib as f64 / 1024.0
}
