//! From a message (as mail-parser read it) to the facts rules are checked against:
//! sender addresses, per-part file names and content kinds, and text to search.
//!
//! Trust: everything here comes from the hostile message. The walk is iterative (no
//! recursion on attacker-controlled nesting), stops following attached messages after
//! [`MAX_DEPTH`] levels and examining parts after [`MAX_PARTS`], and turns what it does
//! not walk into opaque regions for the raw fallback (see the `filter` module
//! documentation).

use std::borrow::Cow;

use mail_parser::{HeaderName, HeaderValue, Message, MessagePart, PartType};

use super::glob::{self, Glob};
use super::sniff::{self, Executable};
use super::text;

/// How many levels of attached `message/rfc822` messages are walked (the message
/// itself is level 0). Deeper messages are opaque.
pub const MAX_DEPTH: usize = 10;

/// How many MIME parts are examined in all, over every level. After that the whole
/// message is also searched as opaque bytes.
pub const MAX_PARTS: usize = 1000;

/// The structure budget of a message handed to mail-parser, in units of about 50
/// bytes of mail-parser memory: see [`too_complex`].
const MIN_STRUCTURE: usize = 20_000;
/// Bytes of message per unit of structure allowed above [`MIN_STRUCTURE`].
const BYTES_PER_STRUCTURE: usize = 16;
/// Units for a line that looks like a header field or a boundary (a header field or a
/// MIME part costs mail-parser ~120-180 bytes).
const LINE_UNITS: usize = 4;
/// Units for a `;` in a header-like line: it may start a parameter, which costs
/// mail-parser and our file-name list ~200 bytes.
const SEMICOLON_UNITS: usize = 4;
/// Units for a `,` `@` or `?` in a header-like line: each may start an address or an
/// encoded word (~100 bytes).
const MARK_UNITS: usize = 2;
/// Attached messages (and digests) a message may declare and still be parsed.
const MAX_DECLARED_MESSAGES: usize = 1_000;

/// Would mail-parser build a disproportionate structure out of this message?
///
/// mail-parser's memory is proportional to what it finds, not to the bytes: each header
/// field costs it ~120 bytes, each MIME part ~180, each address in a list ~50, each
/// attached message ~1.5 KB, however few bytes they take in the message. Measured on
/// 25 MB messages: `X: y` header lines, 10-byte MIME parts or a `From:` of `a@b.c,`
/// repeated reach 220-500 MiB, and 550,000 nested `message/rfc822` headers 800 MiB.
///
/// So before parsing, one linear pass over the lines counts what could become such
/// structure, in units of ~50 bytes: [`LINE_UNITS`] per line that looks like the start
/// of a header field or like a boundary (`--`...); [`SEMICOLON_UNITS`] per `;` and
/// [`MARK_UNITS`] per `,` `@` `?` in such field lines and in lines that start with a
/// blank (continuations): parameters, addresses, encoded words. Separately it counts
/// the fields that declare an attached message (`Content-Type: message/...` or
/// `multipart/digest`). A message over [`MIN_STRUCTURE`] + size / [`BYTES_PER_STRUCTURE`]
/// units, or declaring more than [`MAX_DECLARED_MESSAGES`] attached messages, is not
/// parsed but screened as opaque bytes.
///
/// Measured on 25 MB messages built to sit just under the budget (tiny header fields,
/// tiny parts, a huge address list, a huge parameter list): peak RSS 92-113 MiB, the
/// message itself included. Ordinary mail is far below: base64 and ordinary text lines
/// do not look like header fields; the 50 KB message of the benchmark has 162 units
/// against a budget of 23,201.
pub(crate) fn too_complex(raw: &[u8]) -> bool {
    let budget = MIN_STRUCTURE + raw.len() / BYTES_PER_STRUCTURE;
    structure(raw, budget).is_none()
}

/// The structure units of `raw`, or None as soon as they exceed `budget` or the
/// message declares too many attached messages.
fn structure(raw: &[u8], budget: usize) -> Option<usize> {
    let mut units = 0usize;
    let mut declared = 0usize;
    for line in lines(raw) {
        let field = field_name(line);
        if field.is_some() || line.starts_with(b"--") {
            units += LINE_UNITS;
        }
        if field.is_some() || matches!(line.first(), Some(b' ' | b'\t')) {
            units += line
                .iter()
                .map(|b| match b {
                    b';' => SEMICOLON_UNITS,
                    b',' | b'@' | b'?' => MARK_UNITS,
                    _ => 0,
                })
                .sum::<usize>();
        }
        if let Some(name) = field
            && name.eq_ignore_ascii_case(b"content-type")
        {
            let value = line[name.len() + 1..].trim_ascii_start();
            let starts = |prefix: &[u8]| {
                value
                    .get(..prefix.len())
                    .is_some_and(|v| v.eq_ignore_ascii_case(prefix))
            };
            if starts(b"message/") || starts(b"multipart/digest") {
                declared += 1;
            }
        }
        if units > budget || declared > MAX_DECLARED_MESSAGES {
            return None;
        }
    }
    Some(units)
}

/// The lines of `raw` (without their `\n`), found with a vectorised search: this pass
/// runs over every message, so it must be much cheaper than parsing.
fn lines(raw: &[u8]) -> impl Iterator<Item = &[u8]> {
    let mut start = 0;
    memchr::memchr_iter(b'\n', raw)
        .chain(std::iter::once(raw.len()))
        .map(move |end| {
            let line = &raw[start..end];
            start = end + 1;
            line
        })
}

/// If the line looks like the start of a header field (`Name:`), its name.
fn field_name(line: &[u8]) -> Option<&[u8]> {
    let colon = memchr::memchr(b':', &line[..line.len().min(80)])?;
    let name = &line[..colon];
    (!name.is_empty() && name.iter().all(|&b| (0x21..=0x7E).contains(&b))).then_some(name)
}

/// Which facts the rules need; nothing else is extracted.
#[derive(Debug, Clone, Copy, Default)]
pub(crate) struct Needs {
    pub(crate) senders: bool,
    pub(crate) names: bool,
    /// Content sniffing and ZIP entry names.
    pub(crate) content: bool,
    pub(crate) texts: bool,
}

pub(crate) struct Facts<'p> {
    pub(crate) senders: Vec<Sender>,
    pub(crate) parts: Vec<Part>,
    /// Unfolded; see [`Facts::fold_texts`].
    texts: Vec<Text<'p>>,
    /// The opaque regions taken so far (start address, length), so that none is
    /// searched twice: the work stays linear in the message size.
    opaque_seen: Vec<(usize, usize)>,
}

pub(crate) struct Sender {
    /// As found, for the reason.
    pub(crate) shown: String,
    pub(crate) folded: Vec<char>,
    /// "envelope" or "header From:".
    pub(crate) origin: &'static str,
}

/// A MIME part as far as attachment rules care.
#[derive(Default)]
pub(crate) struct Part {
    /// Its file names: every `filename` and `name` parameter.
    pub(crate) names: Vec<Name>,
    /// Inside an attached message.
    pub(crate) nested: bool,
    /// What its decoded body starts with (only with [`Needs::content`]).
    pub(crate) content: Option<Executable>,
    /// If it is a ZIP archive, its entry names (only with [`Needs::content`]).
    pub(crate) zip_entries: Vec<Name>,
    pub(crate) zip_is_jar: bool,
}

/// A file name from the message, with the spellings globs are tried against.
pub(crate) struct Name {
    pub(crate) shown: String,
    /// Folded: the name, without trailing dots and blanks, and its last path component.
    candidates: Vec<Vec<char>>,
}

impl Name {
    fn new(name: &str) -> Name {
        let trimmed = name.trim_end_matches(|c: char| c == '.' || c.is_whitespace());
        let base = |s: &str| s.rsplit(['/', '\\']).next().unwrap_or(s).to_owned();
        let mut candidates = vec![glob::fold(name)];
        for variant in [trimmed.to_owned(), base(name), base(trimmed)] {
            let folded = glob::fold(&variant);
            if !candidates.contains(&folded) {
                candidates.push(folded);
            }
        }
        Name {
            shown: name.to_owned(),
            candidates,
        }
    }

    pub(crate) fn matches(&self, glob: &Glob) -> bool {
        self.candidates.iter().any(|c| glob.matches(c))
    }
}

struct Text<'p> {
    origin: &'static str,
    body: Cow<'p, str>,
    html: bool,
}

/// A text, folded for keyword search, and where it came from ("the subject", ...).
pub(crate) struct FoldedText {
    pub(crate) origin: &'static str,
    pub(crate) folded: String,
}

impl<'p> Facts<'p> {
    /// `parsed` is mail-parser's reading of `raw`, or None if it could not read it
    /// or was not asked to (see [`too_complex`]).
    pub(crate) fn gather(
        envelope_sender: &str,
        raw: &'p [u8],
        parsed: Option<&'p Message<'p>>,
        needs: Needs,
    ) -> Facts<'p> {
        let mut facts = Facts {
            senders: Vec::new(),
            parts: Vec::new(),
            texts: Vec::new(),
            opaque_seen: Vec::new(),
        };
        if needs.senders {
            let envelope = envelope_sender
                .trim()
                .trim_start_matches('<')
                .trim_end_matches('>');
            if !envelope.is_empty() {
                facts.add_sender(envelope, "envelope");
            }
        }
        match parsed {
            Some(message) => facts.walk(message, raw, needs),
            None => {
                if needs.senders {
                    for address in raw_from_addresses(raw) {
                        facts.add_sender(&address, "header From:");
                    }
                }
                facts.opaque(raw, "the raw message (not parsed as MIME)", needs);
            }
        }
        facts
    }

    /// Fold every text for keyword search (HTML reduced to text first).
    pub(crate) fn fold_texts(&self) -> Vec<FoldedText> {
        self.texts
            .iter()
            .map(|t| FoldedText {
                origin: t.origin,
                folded: if t.html {
                    text::fold(&text::html_to_text(&t.body))
                } else {
                    text::fold(&t.body)
                },
            })
            .collect()
    }

    /// (No deduplication: a header may hold a great many addresses, and a repeated one
    /// costs only a repeated match.)
    fn add_sender(&mut self, address: &str, origin: &'static str) {
        let address = address.trim();
        if !address.is_empty() {
            self.senders.push(Sender {
                shown: address.to_owned(),
                folded: glob::fold(address),
                origin,
            });
        }
    }

    /// Walk the message and its attached messages, without recursion.
    fn walk(&mut self, top: &'p Message<'p>, raw: &'p [u8], needs: Needs) {
        let mut budget = MAX_PARTS;
        let mut stack: Vec<(&'p Message<'p>, usize)> = vec![(top, 0)];
        while let Some((message, depth)) = stack.pop() {
            self.message_headers(message, depth, needs);
            for part in &message.parts {
                if budget == 0 {
                    // Too many parts to look at one by one: the rest is opaque, and the
                    // simplest sound "rest" is the whole message, once.
                    self.opaque(raw, "raw content beyond the screening limits", needs);
                    return;
                }
                budget -= 1;
                if let PartType::Message(inner) = &part.body {
                    if depth < MAX_DEPTH {
                        stack.push((inner, depth + 1));
                    } else {
                        self.opaque(
                            nested_raw(message, part, inner),
                            "raw content beyond the screening limits",
                            needs,
                        );
                    }
                }
                self.part(message, part, depth, needs);
            }
        }
    }

    /// The header fields of a message that rules look at: `Subject:` (keywords) and,
    /// for the message itself only, `From:` (senders).
    fn message_headers(&mut self, message: &'p Message<'p>, depth: usize, needs: Needs) {
        let Some(root) = message.parts.first() else {
            return;
        };
        for header in &root.headers {
            match (&header.name, &header.value) {
                (HeaderName::Subject, value) if needs.texts => {
                    let subject = match value {
                        HeaderValue::Text(s) => s.as_ref(),
                        _ => continue,
                    };
                    self.texts.push(Text {
                        origin: if depth == 0 {
                            "the subject"
                        } else {
                            "the subject of an attached message"
                        },
                        body: Cow::Borrowed(subject),
                        html: false,
                    });
                }
                (HeaderName::From, value) if needs.senders && depth == 0 => {
                    let before = self.senders.len();
                    if let HeaderValue::Address(address) = value {
                        for addr in address.iter() {
                            if let Some(a) = &addr.address {
                                self.add_sender(a, "header From:");
                            }
                        }
                    }
                    if self.senders.len() == before {
                        // mail-parser found no address in this field: match the @-words
                        // of its raw text, which is likely what a mail client shows.
                        let start = header.offset_start as usize;
                        let end = header.offset_end as usize;
                        if let Some(field) = message.raw_message.get(start..end) {
                            let field = String::from_utf8_lossy(field);
                            for word in at_words(&field) {
                                self.add_sender(word, "header From:");
                            }
                        }
                    }
                }
                _ => {}
            }
        }
    }

    /// One MIME part: its names, its content kind, its text.
    fn part(
        &mut self,
        message: &'p Message<'p>,
        part: &'p MessagePart<'p>,
        depth: usize,
        needs: Needs,
    ) {
        let nested = depth > 0;
        if needs.texts {
            let (text_origin, html_origin) = if nested {
                (
                    "a text part of an attached message",
                    "an HTML part of an attached message",
                )
            } else {
                ("a text part", "an HTML part")
            };
            match &part.body {
                PartType::Text(t) => self.texts.push(Text {
                    origin: text_origin,
                    body: Cow::Borrowed(t.as_ref()),
                    html: false,
                }),
                PartType::Html(t) => self.texts.push(Text {
                    origin: html_origin,
                    body: Cow::Borrowed(t.as_ref()),
                    html: true,
                }),
                _ => {}
            }
            if part.is_encoding_problem
                && matches!(part.body, PartType::Text(_) | PartType::Html(_))
            {
                // mail-parser gave up on the transfer encoding (truncated base64, say):
                // decode what is there ourselves and search that too.
                let bytes = decode_raw_body(message, part, usize::MAX);
                self.texts.push(Text {
                    origin: "a part with a broken transfer encoding",
                    body: Cow::Owned(String::from_utf8_lossy(&bytes).into_owned()),
                    html: matches!(part.body, PartType::Html(_)),
                });
            }
        }
        if let PartType::Binary(b) | PartType::InlineBinary(b) = &part.body
            && is_container(part)
        {
            // A multipart without a (usable) boundary, or an attached message mail-parser
            // could not read: opaque, but searched.
            self.opaque(b.as_ref(), "a part mail-parser could not take apart", needs);
        }
        if !needs.names && !needs.content {
            return;
        }
        let mut names: Vec<Name> = Vec::new();
        let mut disposition_attachment = false;
        for header in &part.headers {
            let (attribute, ct) = match (&header.name, &header.value) {
                (HeaderName::ContentDisposition, HeaderValue::ContentType(ct)) => {
                    disposition_attachment |= ct.ctype().eq_ignore_ascii_case("attachment");
                    ("filename", ct)
                }
                (HeaderName::ContentType, HeaderValue::ContentType(ct)) => ("name", ct),
                _ => continue,
            };
            // Every occurrence: a repeated parameter is another name a client may use.
            // (mail-parser lower-cases parameter names and joins RFC 2231 pieces.)
            let values = ct
                .attributes()
                .unwrap_or_default()
                .iter()
                .filter(|a| a.name == attribute);
            for value in values.map(|a| a.value.as_ref()) {
                if !value.is_empty() {
                    names.push(Name::new(value));
                }
            }
        }
        let mut facts = Part {
            nested,
            ..Part::default()
        };
        if needs.content {
            let scripts = !names.is_empty() || disposition_attachment;
            let named_zip = names
                .iter()
                .any(|n| n.shown.to_ascii_lowercase().ends_with(".zip"));
            let body: Cow<'p, [u8]> = match &part.body {
                PartType::Binary(b) | PartType::InlineBinary(b) => Cow::Borrowed(b.as_ref()),
                // Text parts reach us converted to UTF-8, lossily: recover the bytes.
                PartType::Text(_) | PartType::Html(_) => {
                    decode_raw_body(message, part, sniff::PREFIX)
                }
                PartType::Message(_) | PartType::Multipart(_) => Cow::Borrowed(&[]),
            };
            facts.content = sniff::executable(&body, scripts);
            if sniff::looks_like_zip(&body) || (named_zip && !body.is_empty()) {
                let whole = if matches!(part.body, PartType::Text(_) | PartType::Html(_)) {
                    decode_raw_body(message, part, usize::MAX)
                } else {
                    body
                };
                let entries = sniff::zip_entry_names(&whole);
                facts.zip_is_jar = sniff::looks_like_jar(&entries);
                facts.zip_entries = entries.iter().map(|e| Name::new(e)).collect();
            }
        }
        facts.names = names;
        if !facts.names.is_empty() || facts.content.is_some() || !facts.zip_entries.is_empty() {
            self.parts.push(facts);
        }
    }

    /// Bytes we could not walk: search their raw text for keywords and their raw
    /// `name=` / `filename=` parameters for attachment names.
    fn opaque(&mut self, bytes: &'p [u8], origin: &'static str, needs: Needs) {
        let region = (bytes.as_ptr() as usize, bytes.len());
        if self.opaque_seen.contains(&region) {
            return;
        }
        self.opaque_seen.push(region);
        if needs.texts {
            self.texts.push(Text {
                origin,
                body: String::from_utf8_lossy(bytes),
                html: false,
            });
        }
        if needs.names {
            let names: Vec<Name> = raw_parameter_names(bytes)
                .iter()
                .map(|n| Name::new(n))
                .collect();
            if !names.is_empty() {
                self.parts.push(Part {
                    names,
                    nested: false,
                    ..Part::default()
                });
            }
        }
    }
}

/// The most addresses read from raw `From:` fields.
const MAX_RAW_FROM: usize = 100;

/// The @-words of the `From:` fields (with their continuation lines) of the top header
/// block, read without a parser: for messages that are not parsed.
fn raw_from_addresses(raw: &[u8]) -> Vec<String> {
    let mut addresses = Vec::new();
    let mut in_from = false;
    for line in lines(raw) {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        if line.is_empty() {
            break; // end of the header block
        }
        if !matches!(line[0], b' ' | b'\t') {
            in_from = field_name(line).is_some_and(|n| n.eq_ignore_ascii_case(b"from"));
        }
        if !in_from {
            continue;
        }
        let text = String::from_utf8_lossy(line);
        let value = if matches!(line[0], b' ' | b'\t') {
            &text[..]
        } else {
            &text[5..]
        };
        for word in at_words(value) {
            if addresses.len() < MAX_RAW_FROM && !addresses.iter().any(|a| a == word) {
                addresses.push(word.to_owned());
            }
        }
    }
    addresses
}

/// The words of a header field that contain an `@`.
fn at_words(field: &str) -> impl Iterator<Item = &str> {
    field
        .split(|c: char| c.is_whitespace() || matches!(c, '<' | '>' | ',' | ';' | '"' | '(' | ')'))
        .filter(|w| w.contains('@'))
}

/// Drop a parsed message without recursion. mail-parser builds attached messages as a
/// tree (`PartType::Message` holds a `Message`) and reads unencoded nesting without a
/// depth limit, so a hostile message of a million nested `message/rfc822` headers
/// becomes a tree a million levels deep, whose ordinary (recursive) drop would overflow
/// the stack and abort the whole process. Detach the children level by level instead.
pub(crate) fn dismantle(message: Message<'_>) {
    let mut pending = vec![message];
    while let Some(mut message) = pending.pop() {
        for part in &mut message.parts {
            if let PartType::Message(inner) = &mut part.body {
                pending.push(std::mem::take(inner));
            }
        }
        // `message` now holds no attached messages: its drop is shallow.
    }
}

/// Is the part declared `multipart/*` or `message/*`? (Then a binary body means
/// mail-parser could not parse what it holds.)
fn is_container(part: &MessagePart<'_>) -> bool {
    part.headers.iter().any(|h| match (&h.name, &h.value) {
        (HeaderName::ContentType, HeaderValue::ContentType(ct)) => {
            ct.ctype().eq_ignore_ascii_case("multipart")
                || ct.ctype().eq_ignore_ascii_case("message")
        }
        _ => false,
    })
}

/// The raw bytes of an attached message. mail-parser gives an unencoded attached message
/// the whole outer buffer as its `raw_message` (its offsets point into that), so take
/// the attaching part's body range instead; an encoded one has its own decoded buffer.
fn nested_raw<'p>(
    outer: &'p Message<'p>,
    part: &'p MessagePart<'p>,
    inner: &'p Message<'p>,
) -> &'p [u8] {
    let outer_raw: &'p [u8] = &outer.raw_message;
    let inner_raw: &'p [u8] = &inner.raw_message;
    if std::ptr::eq(outer_raw.as_ptr(), inner_raw.as_ptr()) {
        let start = part.offset_body as usize;
        let end = (part.offset_end as usize).max(start);
        outer_raw.get(start..end).unwrap_or_default()
    } else {
        inner_raw
    }
}

/// A part's body bytes, transfer-decoded leniently from the raw message (at most
/// `limit` bytes; borrowed when there is no transfer encoding to undo).
fn decode_raw_body<'p>(
    message: &'p Message<'p>,
    part: &MessagePart<'_>,
    limit: usize,
) -> Cow<'p, [u8]> {
    let start = part.offset_body as usize;
    let end = part.offset_end as usize;
    let raw: &'p [u8] = &message.raw_message;
    let Some(raw) = raw.get(start..end.max(start)) else {
        return Cow::Borrowed(&[]);
    };
    // The header, not `part.encoding`: mail-parser resets that to None when it could
    // not decode the body, which is exactly when we need to.
    let encoding = part.headers.iter().find_map(|h| match (&h.name, &h.value) {
        (HeaderName::ContentTransferEncoding, HeaderValue::Text(t)) => Some(t.trim()),
        _ => None,
    });
    match encoding {
        Some(e) if e.eq_ignore_ascii_case("base64") => {
            Cow::Owned(sniff::base64_lenient(raw, limit))
        }
        Some(e) if e.eq_ignore_ascii_case("quoted-printable") => {
            Cow::Owned(sniff::quoted_printable_lenient(raw, limit))
        }
        _ => Cow::Borrowed(&raw[..raw.len().min(limit)]),
    }
}

/// The most raw parameter names read from one opaque region.
const MAX_RAW_NAMES: usize = 10_000;

/// Values of `name=` and `filename=` parameters (also `name*=` / `name*0=` forms, with
/// an RFC 2231 `charset''` prefix removed and %-escapes decoded) found anywhere in raw
/// bytes. A heuristic for opaque regions: continuations are not joined, RFC 2047 words
/// are not decoded.
fn raw_parameter_names(bytes: &[u8]) -> Vec<String> {
    let mut names = Vec::new();
    let mut at = 0;
    while names.len() < MAX_RAW_NAMES {
        let Some(p) = find_ascii_ci(bytes, at, b"name") else {
            break;
        };
        at = p + 4;
        // `name`, optional `*N`, optional `*`, then `=`.
        let mut i = at;
        let mut extended = false;
        while let Some(&b) = bytes.get(i) {
            match b {
                b'*' => extended = true,
                b'0'..=b'9' if extended => {}
                _ => break,
            }
            i += 1;
        }
        if bytes.get(i) != Some(&b'=') {
            continue;
        }
        i += 1;
        let value: &[u8] = if bytes.get(i) == Some(&b'"') {
            let rest = &bytes[i + 1..];
            let len = rest
                .iter()
                .position(|&b| b == b'"' || b == b'\n')
                .unwrap_or(rest.len());
            &rest[..len]
        } else {
            let rest = &bytes[i..];
            let len = rest
                .iter()
                .position(|&b| b == b';' || b.is_ascii_whitespace())
                .unwrap_or(rest.len());
            &rest[..len]
        };
        if value.is_empty() {
            continue;
        }
        let value = String::from_utf8_lossy(value);
        let value = if extended {
            let encoded = match value.splitn(3, '\'').nth(2) {
                Some(v) => v,
                None => value.as_ref(),
            };
            percent_decode(encoded)
        } else {
            value.into_owned()
        };
        names.push(value);
    }
    names
}

/// The first case-insensitive occurrence of the (lower-case ASCII) `needle` at or after
/// `from`.
fn find_ascii_ci(haystack: &[u8], from: usize, needle: &[u8]) -> Option<usize> {
    let rest = haystack.get(from..)?;
    let first = needle.first()?;
    memchr::memchr2_iter(*first, first.to_ascii_uppercase(), rest)
        .find(|&p| {
            rest.get(p..p + needle.len())
                .is_some_and(|w| w.eq_ignore_ascii_case(needle))
        })
        .map(|p| from + p)
}

fn percent_decode(s: &str) -> String {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        match (b[i], b.get(i + 1), b.get(i + 2)) {
            (b'%', Some(h), Some(l)) if h.is_ascii_hexdigit() && l.is_ascii_hexdigit() => {
                let hex = |c: u8| (c as char).to_digit(16).unwrap_or(0) as u8;
                out.push((hex(*h) << 4) | hex(*l));
                i += 3;
            }
            (c, _, _) => {
                out.push(c);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn name_variants() {
        let g = Glob::new("*.exe");
        assert!(Name::new("evil.exe. ").matches(&g));
        assert!(Name::new("EVIL.EXE").matches(&g));
        assert!(!Name::new("evil.exe.txt").matches(&g));
        assert!(Name::new("C:\\tmp\\setup.exe").matches(&Glob::new("setup.exe")));
        assert!(Name::new("dir/setup.exe").matches(&Glob::new("setup.exe")));
    }

    #[test]
    fn raw_names() {
        let raw = b"junk; filename=\"a.exe\"\r\nContent-Type: x; name=b.scr;\r\n\
                    filename*=UTF-8''%E2%82%ACuro.js name*0*=iso-8859-1''x%41.vbs names= rename=\"\"";
        assert_eq!(
            raw_parameter_names(raw),
            ["a.exe", "b.scr", "€uro.js", "xA.vbs"]
        );
        assert!(raw_parameter_names(b"name").is_empty());
        assert!(raw_parameter_names(b"name=\"").is_empty());
    }
}
