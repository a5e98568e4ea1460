//! Whole-message tests of the screener: messages built here as byte strings.

use std::time::{Duration, Instant};

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;

use super::sniff::tests::{tiny_pe, tiny_zip};
use super::*;

fn rule(name: &str, attachments: &[&str], keywords: &[&str], senders: &[&str]) -> Filter {
    let own = |v: &[&str]| v.iter().map(|s| s.to_string()).collect();
    Filter {
        name: name.to_owned(),
        attachments: own(attachments),
        keywords: own(keywords),
        senders: own(senders),
        action: FilterAction::Quarantine,
    }
}

fn screener(rules: &[Filter]) -> Screener {
    Screener::new(rules)
}

/// LF → CRLF, as the message arrives from DATA.
fn crlf(s: &str) -> Vec<u8> {
    s.replace("\r\n", "\n").replace('\n', "\r\n").into_bytes()
}

/// Base64 in 76-character lines.
fn b64(data: &[u8]) -> String {
    let encoded = BASE64.encode(data);
    let mut out = String::new();
    for chunk in encoded.as_bytes().chunks(76) {
        out.push_str(std::str::from_utf8(chunk).unwrap());
        out.push('\n');
    }
    out
}

fn reason(s: &Screener, sender: &str, message: &[u8]) -> Option<String> {
    s.screen(sender, message)
        .map(|v| format!("{}: {}", v.rule, v.reason))
}

const PLAIN: &str = "From: Alice <alice@example.com>
To: bob@example.org
Subject: Lunch
Date: Sun, 29 Nov 2026 09:00:00 +0000
Message-ID: <1@example.com>

Shall we meet at noon?
";

fn with_attachment(headers: &str, body: &str) -> Vec<u8> {
    crlf(&format!(
        "From: Alice <alice@example.com>
To: bob@example.org
Subject: Files
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=\"b1\"

--b1
Content-Type: text/plain; charset=utf-8

See attached.
--b1
{headers}

{body}
--b1--
"
    ))
}

#[test]
fn screener_is_send_and_sync() {
    fn check<T: Send + Sync>() {}
    check::<Screener>();
    check::<Verdict>();
}

#[test]
fn empty_screener_matches_nothing() {
    let s = screener(&[]);
    assert!(s.is_empty());
    assert_eq!(s.screen("a@b.example", &crlf(PLAIN)), None);
    assert!(!screener(&[rule("x", &["*.exe"], &[], &[])]).is_empty());
}

#[test]
fn no_match_returns_none() {
    let s = screener(&[
        rule("exe", &["*.exe"], &[], &[]),
        rule("kw", &[], &["project x"], &[]),
        rule("from", &[], &[], &["*@evil.example"]),
    ]);
    assert_eq!(s.screen("alice@example.com", &crlf(PLAIN)), None);
    let pdf = with_attachment(
        "Content-Type: application/pdf\nContent-Disposition: attachment; filename=\"report.pdf\"\nContent-Transfer-Encoding: base64",
        &b64(b"%PDF-1.7 not really"),
    );
    assert_eq!(s.screen("alice@example.com", &pdf), None);
}

#[test]
fn multipart_mixed_exe_attachment() {
    let s = screener(&[rule("no-exe", &["*.pdf", "*.exe"], &[], &[])]);
    let m = with_attachment(
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=\"invoice.pdf.exe\"\nContent-Transfer-Encoding: base64",
        &b64(b"not really a program"),
    );
    let v = s.screen("alice@example.com", &m).expect("match");
    assert_eq!(v.rule, "no-exe");
    assert_eq!(v.action, FilterAction::Quarantine);
    assert_eq!(v.reason, "attachment \"invoice.pdf.exe\" matches *.exe");
    // Windows drops trailing dots and blanks; so do we, when matching.
    let dotted = with_attachment(
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=\"setup.EXE.\"",
        "xx",
    );
    assert_eq!(
        reason(&s, "", &dotted).as_deref(),
        Some("no-exe: attachment \"setup.EXE.\" matches *.exe")
    );
}

#[test]
fn name_on_content_type_only() {
    let s = screener(&[rule("scr", &["*.scr"], &[], &[])]);
    let m = with_attachment(
        "Content-Type: application/octet-stream; name=\"screensaver.scr\"\nContent-Transfer-Encoding: base64",
        &b64(b"zzz"),
    );
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("scr: attachment \"screensaver.scr\" matches *.scr")
    );
    // Both names are checked when they differ.
    let both = with_attachment(
        "Content-Type: application/octet-stream; name=\"x.scr\"\nContent-Disposition: attachment; filename=\"x.txt\"",
        "zzz",
    );
    assert_eq!(
        reason(&s, "", &both).as_deref(),
        Some("scr: attachment \"x.scr\" matches *.scr")
    );
    // A text body part with a name is an attachment too.
    let inline = with_attachment("Content-Type: text/plain; name=\"notes.scr\"", "hello");
    assert!(s.screen("", &inline).is_some());
}

#[test]
fn rfc2231_filename_with_charset_and_continuations() {
    let s = screener(&[rule("exe", &["*.exe"], &[], &[])]);
    let m = with_attachment(
        "Content-Type: application/octet-stream\nContent-Disposition: attachment;\n filename*0*=UTF-8''%E2%82%AC-Rech;\n filename*1*=nung%20%C3%BC.e;\n filename*2=xe",
        "xx",
    );
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("exe: attachment \"€-Rechnung ü.exe\" matches *.exe")
    );
}

#[test]
fn rfc2047_encoded_filename() {
    let s = screener(&[rule("exe", &["*.exe"], &[], &[])]);
    let m = with_attachment(
        "Content-Type: application/octet-stream; name=\"=?UTF-8?B?w7xiZXIuZXhl?=\"\nContent-Disposition: attachment",
        "xx",
    );
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("exe: attachment \"über.exe\" matches *.exe")
    );
}

fn nest(inner: &str) -> Vec<u8> {
    crlf(&format!(
        "From: Carol <carol@example.net>
To: bob@example.org
Subject: Fwd: files
MIME-Version: 1.0
Content-Type: multipart/mixed; boundary=\"outer\"

--outer
Content-Type: text/plain

Forwarding this.
--outer
Content-Type: message/rfc822
Content-Disposition: attachment; filename=\"forwarded.eml\"

{inner}
--outer--
"
    ))
}

#[test]
fn nested_message_carrying_the_attachment() {
    let s = screener(&[rule("no-exe", &["*.exe"], &[], &[])]);
    let inner = String::from_utf8(with_attachment(
        "Content-Type: application/octet-stream; name=\"tool.exe\"\nContent-Transfer-Encoding: base64",
        &b64(b"binary"),
    ))
    .unwrap();
    let m = nest(&inner);
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("no-exe: attachment \"tool.exe\" matches *.exe (in an attached message)")
    );
    // Twice nested, the inner message base64-encoded.
    let twice = nest(&format!(
        "From: x@example.com\nSubject: again\nMIME-Version: 1.0\nContent-Type: multipart/mixed; boundary=\"mid\"\n\n--mid\nContent-Type: message/rfc822\nContent-Transfer-Encoding: base64\n\n{}--mid--\n",
        b64(inner.as_bytes())
    ));
    assert_eq!(
        reason(&s, "", &twice).as_deref(),
        Some("no-exe: attachment \"tool.exe\" matches *.exe (in an attached message)")
    );
    // And a keyword in the nested message's subject and text.
    let k = screener(&[rule("kw", &[], &["files"], &[])]);
    let inner_kw = "From: x@example.com\nSubject: Secret FILES\n\nbody\n";
    let outer = String::from_utf8(nest(inner_kw))
        .unwrap()
        .replace("Subject: Fwd: files", "Subject: Fwd");
    assert_eq!(
        reason(&k, "", outer.as_bytes()).as_deref(),
        Some("kw: keyword \"files\" in the subject of an attached message")
    );
    let inner_text = "From: x@example.com\nSubject: hi\n\nthe FILES are here\n";
    let outer = String::from_utf8(nest(inner_text))
        .unwrap()
        .replace("Subject: Fwd: files", "Subject: Fwd");
    assert_eq!(
        reason(&k, "", outer.as_bytes()).as_deref(),
        Some("kw: keyword \"files\" in a text part of an attached message")
    );
}

#[test]
fn keyword_in_base64_text() {
    let s = screener(&[rule("px", &[], &["Project X"], &[])]);
    let body = b64("Über das project\r\n   x, streng geheim.".as_bytes());
    let m = crlf(&format!(
        "From: a@example.com\nSubject: hi\nMIME-Version: 1.0\nContent-Type: text/plain; charset=utf-8\nContent-Transfer-Encoding: base64\n\n{body}"
    ));
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("px: keyword \"Project X\" in a text part")
    );
}

#[test]
fn keyword_in_quoted_printable_split_by_soft_break() {
    let s = screener(&[rule("px", &[], &["projekt über"], &[])]);
    // ISO-8859-1: ü = FC; the keyword is split by a soft line break.
    let m = crlf(
        "From: a@example.com\nSubject: hi\nMIME-Version: 1.0\nContent-Type: text/plain; charset=iso-8859-1\nContent-Transfer-Encoding: quoted-printable\n\nDas PROJ=\nEKT =FC=\nber alles.\n",
    );
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("px: keyword \"projekt über\" in a text part")
    );
}

#[test]
fn keyword_in_rfc2047_subject() {
    let s = screener(&[
        rule("px", &[], &["project x"], &[]),
        rule("ü", &[], &["grüße"], &[]),
    ]);
    let utf8 = BASE64.encode("Re: Project X status".as_bytes());
    let m = crlf(&format!(
        "From: a@example.com\nSubject: =?UTF-8?B?{utf8}?=\n\nnothing here\n"
    ));
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("px: keyword \"project x\" in the subject")
    );
    let latin =
        crlf("From: a@example.com\nSubject: =?ISO-8859-1?Q?Viele_Gr=FC=DFe?=\n\nnothing here\n");
    assert_eq!(
        reason(&s, "", &latin).as_deref(),
        Some("ü: keyword \"grüße\" in the subject")
    );
    // Encoded words split across a folded line still join.
    let folded =
        crlf("From: a@example.com\nSubject: =?UTF-8?Q?Project?=\n =?UTF-8?Q?_X?=\n\nnothing\n");
    assert!(s.screen("", &folded).is_some());
}

#[test]
fn keyword_in_html_only_body() {
    let s = screener(&[rule("px", &[], &["project x"], &[])]);
    let html = "<html><body><p>Status of <b>Pro</b><i>ject</i>&nbsp;&#88;:</p></body></html>";
    let m = crlf(&format!(
        "From: a@example.com\nSubject: status\nMIME-Version: 1.0\nContent-Type: text/html; charset=utf-8\nContent-Transfer-Encoding: base64\n\n{}",
        b64(html.as_bytes())
    ));
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("px: keyword \"project x\" in an HTML part")
    );
    // Attribute values are not text.
    let hidden = crlf(
        "From: a@example.com\nSubject: s\nContent-Type: text/html\n\n<a title=\"project x\" href=\"#\">link</a>\n",
    );
    assert_eq!(s.screen("", &hidden), None);
}

#[test]
fn sender_globs_on_envelope_and_header_from() {
    let s = screener(&[rule(
        "evil",
        &[],
        &[],
        &["*@evil.example", "bad@worse.example"],
    )]);
    assert_eq!(
        reason(&s, "Bad@Evil.Example", &crlf(PLAIN)).as_deref(),
        Some("evil: sender Bad@Evil.Example matches *@evil.example (envelope)")
    );
    let header = crlf(&PLAIN.replace("Alice <alice@example.com>", "\"Bad\" <BAD@worse.example>"));
    assert_eq!(
        reason(&s, "alice@example.com", &header).as_deref(),
        Some("evil: sender BAD@worse.example matches bad@worse.example (header From:)")
    );
    // A second From: header, and a group, are looked at too.
    let second = crlf(&PLAIN.replace("To: bob", "From: someone@evil.example\nTo: bob"));
    assert!(s.screen("alice@example.com", &second).is_some());
    let list = crlf(&PLAIN.replace(
        "Alice <alice@example.com>",
        "alice@example.com, Mallory <m@evil.example>",
    ));
    assert!(s.screen("alice@example.com", &list).is_some());
    // The null sender is not matched; an attached message's From: is not a sender.
    assert_eq!(s.screen("", &crlf(PLAIN)), None);
    let fwd = nest("From: m@evil.example\nSubject: x\n\nbody\n");
    assert_eq!(s.screen("", &fwd), None);
}

#[test]
fn first_matching_rule_wins() {
    let a = rule("a-keyword", &[], &["lunch"], &[]);
    let b = rule("b-sender", &[], &[], &["*@example.com"]);
    let c = rule("c-never", &["*.exe"], &[], &[]);
    let m = crlf(PLAIN);
    let s = screener(&[c.clone(), a.clone(), b.clone()]);
    assert_eq!(s.screen("alice@example.com", &m).unwrap().rule, "a-keyword");
    let s = screener(&[b, a, c]);
    assert_eq!(s.screen("alice@example.com", &m).unwrap().rule, "b-sender");
}

#[test]
fn actions_are_passed_through() {
    let mut r = rule("redir", &[], &["lunch"], &[]);
    r.action = FilterAction::Redirect("security@company.example".into());
    let v = screener(&[r]).screen("", &crlf(PLAIN)).unwrap();
    assert_eq!(
        v.action,
        FilterAction::Redirect("security@company.example".into())
    );
}

fn exe_rule() -> Filter {
    rule("no-exe", &["*.exe", "*.scr"], &[], &[])
}

fn pdf_rule() -> Filter {
    rule("no-pdf", &["*.pdf"], &[], &[])
}

#[test]
fn renamed_executable_is_caught_by_content() {
    let exe = screener(&[exe_rule()]);
    let pdf = screener(&[pdf_rule()]);
    let m = with_attachment(
        "Content-Type: application/octet-stream\nContent-Disposition: attachment; filename=\"report.txt\"\nContent-Transfer-Encoding: base64",
        &b64(&tiny_pe()),
    );
    assert_eq!(
        reason(&exe, "", &m).as_deref(),
        Some("no-exe: executable content (Windows PE) in attachment \"report.txt\"")
    );
    assert_eq!(pdf.screen("", &m), None);

    // Labelled text/plain, so mail-parser converts it (lossily) to UTF-8: we recover the
    // bytes from the raw part.
    let as_text = with_attachment(
        "Content-Type: text/plain; charset=us-ascii; name=\"report.txt\"\nContent-Transfer-Encoding: base64",
        &b64(&tiny_pe()),
    );
    assert_eq!(
        reason(&exe, "", &as_text).as_deref(),
        Some("no-exe: executable content (Windows PE) in attachment \"report.txt\"")
    );

    // ELF, unnamed inline part.
    let elf = with_attachment(
        "Content-Type: application/octet-stream\nContent-Transfer-Encoding: base64",
        &b64(b"\x7fELF\x02\x01\x01\0\0\0\0\0\0\0\0\0"),
    );
    assert_eq!(
        reason(&exe, "", &elf).as_deref(),
        Some("no-exe: executable content (ELF) in an unnamed part")
    );

    // A shell script named notes.txt.
    let script = with_attachment(
        "Content-Type: text/plain; name=\"notes.txt\"\nContent-Disposition: attachment",
        "#!/bin/sh\nrm -rf ~\n",
    );
    assert_eq!(
        reason(&exe, "", &script).as_deref(),
        Some("no-exe: executable content (#! script) in attachment \"notes.txt\"")
    );
    // ... but a body that starts with a pasted script is not an attachment.
    let body = crlf("From: a@example.com\nSubject: how to\n\n#!/bin/sh\necho hello\n");
    assert_eq!(exe.screen("", &body), None);
}

#[test]
fn zip_with_executable_entry() {
    let exe = screener(&[exe_rule()]);
    let pdf = screener(&[pdf_rule()]);
    let zip = tiny_zip(&["README.txt", "bin/Setup.EXE"]);
    let m = with_attachment(
        "Content-Type: application/zip\nContent-Disposition: attachment; filename=\"docs.zip\"\nContent-Transfer-Encoding: base64",
        &b64(&zip),
    );
    assert_eq!(
        reason(&exe, "", &m).as_deref(),
        Some("no-exe: attachment \"docs.zip\" contains \"bin/Setup.EXE\" matching *.exe")
    );
    assert_eq!(pdf.screen("", &m), None);
    let harmless = with_attachment(
        "Content-Type: application/zip; name=\"docs.zip\"\nContent-Transfer-Encoding: base64",
        &b64(&tiny_zip(&["a.pdf", "b.txt"])),
    );
    assert_eq!(exe.screen("", &harmless), None);
    // A jar renamed .txt, caught by a rule naming *.jar.
    let jar = screener(&[rule("no-jar", &["*.jar"], &[], &[])]);
    let renamed = with_attachment(
        "Content-Type: application/octet-stream; name=\"data.txt\"\nContent-Transfer-Encoding: base64",
        &b64(&tiny_zip(&["META-INF/MANIFEST.MF", "com/x/Main.class"])),
    );
    assert_eq!(
        reason(&jar, "", &renamed).as_deref(),
        Some("no-jar: attachment \"data.txt\" is a Java archive")
    );
}

#[test]
fn names_in_reasons_are_escaped_and_cut() {
    let s = screener(&[rule("exe", &["*.exe"], &[], &[])]);
    let long = format!("{}\u{7}.exe", "a".repeat(300));
    let m = with_attachment(
        &format!("Content-Type: application/octet-stream; name=\"{long}\""),
        "x",
    );
    let r = s.screen("", &m).unwrap().reason;
    assert!(r.starts_with("attachment \"aaaa"), "{r}");
    assert!(r.contains("…\" matches *.exe"), "{r}");
    assert!(!r.chars().any(char::is_control), "{r}");
}

#[test]
fn broken_mime_never_panics() {
    let s = screener(&fuzz_rules());
    let cases: Vec<Vec<u8>> = vec![
        Vec::new(),
        b"\r\n".to_vec(),
        b"garbage \x00\xff\xfe without any headers".to_vec(),
        crlf("Subject: x\nContent-Type: multipart/mixed\n\n--\nno boundary parameter\n--\n"),
        crlf(
            "Subject: x\nContent-Type: multipart/mixed; boundary=\"b\"\n\n--b\nContent-Type: text/plain\n\nunterminated multipart",
        ),
        crlf(
            "Subject: x\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\naGVsbG8gd29y",
        ),
        crlf("Subject: x\nContent-Type: message/rfc822\n\n"),
        crlf("Subject: x\nContent-Type: multipart/mixed; boundary=\"\"\n\n--\n\n--\n"),
        crlf(
            "Content-Type: multipart/mixed; boundary=a\n\n--a\nContent-Type: multipart/mixed; boundary=a\n\n--a\n--a--\n",
        ),
        crlf(
            "Content-Disposition: attachment; filename*0*=UTF-8''%; filename*1*=%Z; filename*99999999999=x\n\nx",
        ),
        crlf("Content-Type: text/html\n\n<a href=\"x\n&#xFFFFFFFF;&#;<!--"),
        b"From: \xff\xfe@\r\nSubject: =?UTF-8?B?****?= =?X?Q?=ZZ?=\r\n\r\n".to_vec(),
        b"\n\n\n\r\r\r:::::".to_vec(),
    ];
    for m in &cases {
        let _ = s.screen("", m);
        let _ = s.screen("<>", m);
    }
}

#[test]
fn truncated_base64_and_missing_boundary_are_still_searched() {
    let s = screener(&[rule("px", &[], &["project x"], &[])]);
    // The base64 stops mid-group (and mid-word): what decodes is searched.
    let encoded = BASE64.encode(b"status of project x and more text here");
    let cut = &encoded[..encoded.len() - 6];
    let m = crlf(&format!(
        "Subject: s\nContent-Type: text/plain\nContent-Transfer-Encoding: base64\n\n{cut}*\n"
    ));
    assert!(s.screen("", &m).is_some(), "truncated base64");
    // multipart without a boundary parameter: the body is still read somehow.
    let m = crlf(
        "Subject: s\nContent-Type: multipart/mixed\n\n--x\nContent-Type: text/plain\n\nproject x\n--x--\n",
    );
    assert!(s.screen("", &m).is_some(), "missing boundary");
    // Unterminated multipart.
    let m = crlf(
        "Subject: s\nContent-Type: multipart/mixed; boundary=b\n\n--b\nContent-Type: text/plain\n\nproject x",
    );
    assert!(s.screen("", &m).is_some(), "unterminated multipart");
}

#[test]
fn deep_nesting_beyond_the_limit_is_searched_raw() {
    let exe = screener(&[rule("no-exe", &["*.exe"], &[], &[])]);
    let kw = screener(&[rule("kw", &[], &["needle phrase"], &[])]);
    let mut m = "From: x@example.com\nSubject: bottom\nContent-Type: application/octet-stream; name=\"deep.exe\"\n\nthe needle\n  phrase\n".to_owned();
    for _ in 0..(MAX_DEPTH + 5) {
        m = format!("From: x@example.com\nSubject: level\nContent-Type: message/rfc822\n\n{m}");
    }
    let m = crlf(&m);
    let started = Instant::now();
    assert!(exe.screen("", &m).is_some());
    assert_eq!(
        reason(&kw, "", &m).as_deref(),
        Some("kw: keyword \"needle phrase\" in raw content beyond the screening limits")
    );
    assert!(started.elapsed() < Duration::from_secs(5));
}

#[test]
fn too_many_parts_the_rest_is_searched_raw() {
    let exe = screener(&[rule("no-exe", &["*.exe"], &[], &[])]);
    let mut m = String::from(
        "From: x@example.com\nSubject: many\nContent-Type: multipart/mixed; boundary=b\n\n",
    );
    for i in 0..(MAX_PARTS + 50) {
        m.push_str(&format!("--b\nContent-Type: text/plain\n\npart {i}\n"));
    }
    m.push_str("--b\nContent-Type: application/octet-stream; name=\"late.exe\"\n\nxx\n--b--\n");
    let m = crlf(&m);
    let v = exe.screen("", &m).expect("late attachment found");
    assert_eq!(v.reason, "attachment \"late.exe\" matches *.exe");
}

/// The fuzz target's body (`fuzz/fuzz_targets/screen.rs`) over pseudo-random and mutated
/// messages, for when cargo-fuzz is not at hand: it must return, without panicking, in
/// bounded time.
#[test]
fn pseudo_random_inputs_never_panic() {
    let s = Screener::new(&fuzz_rules());
    let seeds: Vec<Vec<u8>> = vec![
        crlf(PLAIN),
        with_attachment(
            "Content-Type: application/octet-stream; name=\"a.exe\"\nContent-Transfer-Encoding: base64",
            &b64(&tiny_pe()),
        ),
        nest(
            "From: a@b.example\nSubject: =?UTF-8?Q?x?=\nContent-Type: text/html\n\n<p>project&nbsp;x</p>\n",
        ),
        with_attachment(
            "Content-Type: application/zip; name*0*=UTF-8''a%20b; name*1=.zip\nContent-Transfer-Encoding: base64",
            &b64(&tiny_zip(&["x.exe"])),
        ),
    ];
    // xorshift64*, fixed seed: the same inputs on every run.
    let mut state: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = move || {
        state ^= state >> 12;
        state ^= state << 25;
        state ^= state >> 27;
        state.wrapping_mul(0x2545_F491_4F6C_DD1D)
    };
    const TOKENS: &[&[u8]] = &[
        b"\r\n",
        b"--b1",
        b"--outer--",
        b"Content-Type: multipart/mixed; boundary=b1\r\n",
        b"Content-Type: message/rfc822\r\n\r\n",
        b"Content-Transfer-Encoding: base64\r\n",
        b"Content-Transfer-Encoding: quoted-printable\r\n",
        b"=?UTF-8?B?",
        b"?=",
        b"filename*0*=UTF-8''%E2",
        b"=\r\n",
        b"<",
        b"&#x",
        b"\x00",
        b"\xff",
        b"MZ",
        b"PK\x03\x04",
    ];
    let started = Instant::now();
    for round in 0..400 {
        let mut input = if round % 10 == 0 {
            // Pure noise.
            let len = (next() % 2048) as usize;
            (0..len).map(|_| next() as u8).collect()
        } else {
            seeds[round % seeds.len()].clone()
        };
        for _ in 0..(1 + next() % 8) {
            let at = if input.is_empty() {
                0
            } else {
                (next() as usize) % input.len()
            };
            match next() % 4 {
                0 if !input.is_empty() => input[at] = next() as u8,
                1 => {
                    let t = TOKENS[(next() as usize) % TOKENS.len()];
                    input.splice(at..at, t.iter().copied());
                }
                2 => {
                    let end = (at + (next() % 64) as usize).min(input.len());
                    input.drain(at..end);
                }
                _ => {
                    let end = (at + (next() % 256) as usize).min(input.len());
                    let chunk = input[at..end].to_vec();
                    input.splice(at..at, chunk);
                }
            }
        }
        let _ = s.screen("fuzz@example.org", &input);
    }
    assert!(
        started.elapsed() < Duration::from_secs(60),
        "{:?}",
        started.elapsed()
    );
}

/// mail-parser follows unencoded `message/rfc822` nesting without limit, spends ~1.5 KB
/// per level and returns a tree as deep, whose recursive drop overflows the stack (an
/// abort, not a panic) at around 100,000 levels. Such a message is not parsed (too many
/// declared messages); what is parsed is dismantled iteratively anyway.
#[test]
fn a_hundred_thousand_nested_messages_are_screened_raw() {
    let s = screener(&fuzz_rules());
    let level = b"Subject: x\r\nContent-Type: message/rfc822\r\n\r\n";
    let mut m = Vec::with_capacity(level.len() * 100_000 + 64);
    for _ in 0..100_000 {
        m.extend_from_slice(level);
    }
    m.extend_from_slice(b"Subject: bottom\r\n\r\nproject x\r\n");
    let started = Instant::now();
    let v = s
        .screen("", &m)
        .expect("the keyword at the bottom, via the raw fallback");
    assert_eq!(
        v.reason,
        "keyword \"project x\" in the raw message (not parsed as MIME)"
    );
    assert!(
        started.elapsed() < Duration::from_secs(30),
        "{:?}",
        started.elapsed()
    );
    // Just under the limit of declared messages: parsed, walked to MAX_DEPTH, dropped
    // without recursion.
    let mut m = Vec::new();
    for _ in 0..900 {
        m.extend_from_slice(level);
    }
    m.extend_from_slice(b"Subject: bottom\r\n\r\nproject x\r\n");
    let v = s.screen("", &m).expect("found");
    assert_eq!(
        v.reason,
        "keyword \"project x\" in raw content beyond the screening limits"
    );
}

/// Messages whose shape would make mail-parser build a structure many times their
/// size are screened as raw bytes; ordinary ones are parsed.
#[test]
fn structure_budget() {
    use super::extract::too_complex;
    let mut headers = Vec::new();
    while headers.len() < 200_000 {
        headers.extend_from_slice(b"X: y\r\n");
    }
    assert!(too_complex(&headers));
    let mut parts = b"Content-Type: multipart/mixed; boundary=b\r\n\r\n".to_vec();
    while parts.len() < 200_000 {
        parts.extend_from_slice(b"--b\r\n\r\nx\r\n");
    }
    assert!(too_complex(&parts));
    let mut from = b"From: ".to_vec();
    while from.len() < 200_000 {
        from.extend_from_slice(b"a@b.c,");
    }
    assert!(too_complex(&from));
    for ordinary in [
        crlf(PLAIN),
        with_attachment(
            "Content-Type: application/pdf; name=\"a.pdf\"\nContent-Transfer-Encoding: base64",
            &b64(&vec![0x55; 3_000_000]),
        ),
        crlf(
            &"Dear all, this is a long text; is it? Yes: it is, mail@example.com.\n".repeat(50_000),
        ),
    ] {
        assert!(!too_complex(&ordinary));
    }
    // And the screener still finds things in a message it does not parse.
    let s = screener(&[rule("evil", &["*.exe"], &["needle"], &["*@evil.example"])]);
    let mut m = b"From: Mallory <m@evil.example>\r\nContent-Type: application/octet-stream; name=\"x.exe\"\r\n".to_vec();
    m.extend_from_slice(&headers);
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("evil: sender m@evil.example matches *@evil.example (header From:)")
    );
    let s = screener(&[rule("exe", &["*.exe"], &[], &[])]);
    assert_eq!(
        reason(&s, "", &m).as_deref(),
        Some("exe: attachment \"x.exe\" matches *.exe")
    );
}
