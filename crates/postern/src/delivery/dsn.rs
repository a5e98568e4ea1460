//! Delivery status notifications: the bounce (or delay warning) sent back to the original
//! envelope sender (RFC 3464, RFC 3461 section 6, RFC 3834, RFC 6533).
//!
//! [`build`] is a pure function: no clock, no I/O. It returns a complete RFC 5322 message,
//! `multipart/report; report-type=delivery-status` (RFC 6522) with three parts:
//! a human explanation (text/plain, UTF-8), the machine-readable `message/delivery-status`
//! (RFC 3464 section 2) and the original's header section as `text/rfc822-headers`
//! (never its body: RFC 3461 section 6 lets the MTA return headers only, and it keeps
//! bounces small and avoids reflecting content).
//!
//! Trust: the request's own fields (host name, queue id, addresses) come from Postern itself
//! and are merely stripped of control characters so they can never break a line. The remote
//! reply (`diagnostic`) and the original message are untrusted: the reply is flattened to one
//! logical line, capped and folded; the original's header lines are copied as bytes but bare
//! CRs, NULs and lines over 998 octets are repaired, the copy stops at the first empty line
//! (or 64 KiB), and the MIME boundary is checked against everything it encloses.
//!
//! Output guarantees: CRLF line endings only, no line longer than 998 octets (RFC 5322
//! section 2.1.1), a boundary that occurs nowhere in the content (RFC 2046 section 5.1.1).
//! The `message/delivery-status` part is always 7-bit (non-ASCII recipients use the RFC 6533
//! `utf-8` address type in its 7-bit `utf-8-addr-xtext` form). The text part and the copied
//! headers are 8-bit only when they contain non-ASCII; the result is then marked
//! `Content-Transfer-Encoding: 8bit`, and the caller must send it with BODY=8BITMIME (or
//! SMTPUTF8 when the sender address itself is non-ASCII): `build(..).is_ascii()` tells.

use std::fmt::Write as _;

use chrono::{DateTime, Utc};

/// Which notification.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DsnKind {
    /// Delivery failed permanently for the listed recipients (bounce).
    Failure,
    /// Delivery is delayed; the queue keeps trying (warning).
    Delay,
    /// A message with the null sender (itself a bounce or another notification) failed:
    /// there is nobody to return it to, so the postmaster gets this notice instead (like
    /// Postfix's "2bounce" notice). The report has the same parts as a bounce.
    PostmasterNotice,
}

/// RFC 3464 section 2.3.3 action for one recipient.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// `failed`: given up.
    Failed,
    /// `delayed`: still being retried.
    Delayed,
}

/// What happened to one recipient.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecipientStatus {
    /// The envelope recipient (RCPT TO), without angle brackets. May be UTF-8.
    pub address: String,
    /// Failed or delayed.
    pub action: Action,
    /// Enhanced status code (RFC 3463), e.g. `"5.1.1"`. A malformed code is replaced by
    /// `5.0.0` / `4.0.0` according to `action`.
    pub status: String,
    /// The host that gave the reply, when one did (`Remote-MTA: dns; host`).
    pub remote_mta: Option<String>,
    /// The remote reply as it was received, e.g. `"550 5.1.1 <x@y>: user unknown"`
    /// (`Diagnostic-Code: smtp; ...`, RFC 3464 2.3.6). Only a remote server's reply:
    /// a reason of our own goes in `explanation`.
    pub diagnostic: Option<String>,
    /// Our own explanation for the people reading the report ("delivery time expired
    /// after 5d", "domain publishes a null MX"), shown in the text part before the reply.
    pub explanation: Option<String>,
    /// Last delivery attempt, unix seconds.
    pub last_attempt: Option<i64>,
}

/// Everything [`build`] needs; no clock inside, so tests choose `now`.
#[derive(Debug, Clone)]
pub struct DsnRequest<'a> {
    /// Failure (bounce) or delay warning.
    pub kind: DsnKind,
    /// Our host name: `Reporting-MTA` and the From address domain.
    pub reporting_mta: &'a str,
    /// The queue id of the original message (`X-Postern-Queue-ID`, boundary seed).
    pub queue_id: &'a str,
    /// The report's recipient: the original envelope sender, or for a
    /// [`DsnKind::PostmasterNotice`] the postmaster. Never empty: the caller never bounces
    /// a bounce (RFC 3461 section 6.1 / RFC 5321 section 4.5.5).
    pub sender: &'a str,
    /// When the original arrived, unix seconds.
    pub arrival: i64,
    /// Now, unix seconds (the Date header).
    pub now: i64,
    /// The original message as queued; only its header section is used.
    pub original: &'a [u8],
    /// The recipients to report on (only these; delivered ones are not listed).
    pub recipients: &'a [RecipientStatus],
    /// A unique Message-ID, e.g. `"<ID.dsn@host>"` (brackets added if missing).
    pub message_id: String,
}

/// Longest physical line allowed by RFC 5322 section 2.1.1, without CRLF.
const MAX_LINE: usize = 998;
/// Fold our own header fields and wrap text at this width when possible (RFC 5322 2.1.1 SHOULD).
const FOLD_WIDTH: usize = 78;
/// Words longer than this are cut so that, with any prefix we use, a line stays <= 998.
const MAX_WORD: usize = 900;
/// Cap on the copied header section of the original.
const HEADER_CAP: usize = 64 * 1024;
/// Cap on one remote reply as quoted in the DSN (characters).
const DIAGNOSTIC_CAP: usize = 2000;

/// Builds the complete DSN message (see the module documentation for the guarantees).
pub fn build(req: &DsnRequest) -> Vec<u8> {
    let text = human_part(req);
    let status = status_part(req);
    let headers = original_headers(req.original);
    let boundary = choose_boundary(
        req.queue_id,
        &[text.as_bytes(), status.as_bytes(), &headers],
    );
    let eight_bit = !text.is_ascii() || !headers.is_ascii() || !req.sender.is_ascii();

    let reporting_mta = clean(req.reporting_mta);
    let subject = match req.kind {
        DsnKind::Failure => "Undelivered Mail Returned to Sender",
        DsnKind::Delay => "Delayed Mail (still being retried)",
        DsnKind::PostmasterNotice => "Postmaster Notice: Undelivered Mail Without a Return Address",
    };
    let message_id = {
        let id = clean(&req.message_id).replace(' ', "");
        if id.starts_with('<') {
            id
        } else {
            format!("<{id}>")
        }
    };

    let mut out = String::with_capacity(text.len() + status.len() + 1024);
    push_field(
        &mut out,
        "From",
        &format!("Mail Delivery System <MAILER-DAEMON@{reporting_mta}>"),
    );
    push_field(&mut out, "To", &format!("<{}>", clean_address(req.sender)));
    push_field(&mut out, "Subject", subject);
    push_field(&mut out, "Date", &rfc5322_date(req.now));
    push_field(&mut out, "Message-ID", &message_id);
    push_field(&mut out, "MIME-Version", "1.0");
    // RFC 3834 section 5: a DSN is a response to a message, hence "auto-replied"; the
    // postmaster's notice answers nobody: "auto-generated".
    let auto = match req.kind {
        DsnKind::PostmasterNotice => "auto-generated",
        DsnKind::Failure | DsnKind::Delay => "auto-replied",
    };
    push_field(&mut out, "Auto-Submitted", auto);
    push_field(
        &mut out,
        "Content-Type",
        &format!("multipart/report; report-type=delivery-status; boundary=\"{boundary}\""),
    );
    push_field(
        &mut out,
        "Content-Transfer-Encoding",
        if eight_bit { "8bit" } else { "7bit" },
    );
    out.push_str("\r\n");
    out.push_str("This is a MIME-encapsulated delivery status notification.\r\n\r\n");

    // Part 1: for people.
    let _ = write!(out, "--{boundary}\r\n");
    push_field(&mut out, "Content-Description", "Notification");
    push_field(&mut out, "Content-Type", "text/plain; charset=utf-8");
    push_field(
        &mut out,
        "Content-Transfer-Encoding",
        if text.is_ascii() { "7bit" } else { "8bit" },
    );
    out.push_str("\r\n");
    out.push_str(&text);

    // Part 2: for programs (RFC 3464 section 2).
    let _ = write!(out, "\r\n--{boundary}\r\n");
    push_field(&mut out, "Content-Description", "Delivery report");
    push_field(&mut out, "Content-Type", "message/delivery-status");
    out.push_str("\r\n");
    out.push_str(&status);

    // Part 3: the original's header section (RFC 6522 section 3: text/rfc822-headers).
    let _ = write!(out, "\r\n--{boundary}\r\n");
    push_field(
        &mut out,
        "Content-Description",
        "Undelivered message headers",
    );
    push_field(&mut out, "Content-Type", "text/rfc822-headers");
    push_field(
        &mut out,
        "Content-Transfer-Encoding",
        if headers.is_ascii() { "7bit" } else { "8bit" },
    );
    out.push_str("\r\n");

    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(&headers);
    bytes.extend_from_slice(format!("\r\n--{boundary}--\r\n").as_bytes());
    bytes
}

/// The text/plain part, CRLF lines, ending with CRLF.
fn human_part(req: &DsnRequest) -> String {
    let host = clean(req.reporting_mta);
    let mut paras: Vec<Vec<String>> = Vec::new();
    paras.push(wrap(
        "",
        "",
        &format!("This is the mail delivery system at {host}."),
        FOLD_WIDTH,
    ));
    let intro = match req.kind {
        DsnKind::Failure => format!(
            "Your message (queue id {}), received {}, could not be delivered to the \
             recipients listed below. The mail system has given up on them.",
            clean(req.queue_id),
            rfc5322_date(req.arrival)
        ),
        DsnKind::Delay => format!(
            "Your message (queue id {}), received {}, has not yet been delivered to the \
             recipients listed below. The mail system is still trying; you do not need \
             to send it again. You will be told if delivery finally fails.",
            clean(req.queue_id),
            rfc5322_date(req.arrival)
        ),
        DsnKind::PostmasterNotice => format!(
            "A message with the null sender <> (a bounce or another notification), queue \
             id {}, received {}, could not be delivered to the recipients listed below. It \
             has no return address, so it was not returned to anyone; this copy of the \
             report is for the postmaster.",
            clean(req.queue_id),
            rfc5322_date(req.arrival)
        ),
    };
    paras.push(wrap("", "", &intro, FOLD_WIDTH));

    for r in req.recipients {
        let mut lines = Vec::new();
        let address = clean(&r.address);
        if let Some(why) = &r.explanation {
            // Our reason first, then the last thing a server said, if one did.
            let head = format!("<{address}>: {}", cap_chars(&clean(why), DIAGNOSTIC_CAP));
            lines.extend(wrap("", "    ", &head, FOLD_WIDTH));
            if let Some(d) = &r.diagnostic {
                let said = match &r.remote_mta {
                    Some(mta) => format!("host {} said: ", clean(mta)),
                    None => String::new(),
                };
                let detail = format!("{said}{}", cap_chars(&clean(d), DIAGNOSTIC_CAP));
                lines.extend(wrap("    ", "    ", &detail, FOLD_WIDTH));
            }
            paras.push(lines);
            continue;
        }
        let head = match (&r.remote_mta, &r.diagnostic) {
            (Some(mta), Some(_)) => format!("<{address}>: host {} said:", clean(mta)),
            (Some(mta), None) => format!("<{address}>: delivery to host {} failed", clean(mta)),
            (None, _) => format!("<{address}>:"),
        };
        lines.extend(wrap("", "    ", &head, FOLD_WIDTH));
        let detail = match &r.diagnostic {
            Some(d) => cap_chars(&clean(d), DIAGNOSTIC_CAP),
            None => format!("status {}", status_code(r)),
        };
        lines.extend(wrap("    ", "    ", &detail, FOLD_WIDTH));
        paras.push(lines);
    }
    paras.push(wrap(
        "",
        "",
        "The header of your message is attached below; a machine-readable report precedes it.",
        FOLD_WIDTH,
    ));

    let mut out = String::new();
    for (i, para) in paras.iter().enumerate() {
        if i > 0 {
            out.push_str("\r\n");
        }
        for line in para {
            out.push_str(line);
            out.push_str("\r\n");
        }
    }
    out
}

/// The message/delivery-status body (RFC 3464 section 2.1): per-message fields, then one
/// block per recipient, blocks separated by empty lines. ASCII only.
fn status_part(req: &DsnRequest) -> String {
    let mut out = String::new();
    // RFC 3464 section 2.2.
    push_field(
        &mut out,
        "Reporting-MTA",
        &format!("dns; {}", ascii(req.reporting_mta)),
    );
    // An extension field (RFC 3464 section 2.1, "X-" prefix).
    push_field(&mut out, "X-Postern-Queue-ID", &ascii(req.queue_id));
    push_field(&mut out, "Arrival-Date", &rfc5322_date(req.arrival));
    for r in req.recipients {
        out.push_str("\r\n");
        // RFC 3464 section 2.3.2; RFC 6533 section 3 for non-ASCII addresses.
        push_field(&mut out, "Final-Recipient", &typed_address(&r.address));
        push_field(
            &mut out,
            "Action",
            match r.action {
                Action::Failed => "failed",
                Action::Delayed => "delayed",
            },
        );
        push_field(&mut out, "Status", status_code(r));
        if let Some(mta) = &r.remote_mta {
            push_field(&mut out, "Remote-MTA", &format!("dns; {}", ascii(mta)));
        }
        if let Some(diag) = &r.diagnostic {
            // RFC 3464 section 2.3.6: "smtp" diagnostic type, the reply as received.
            let reply = cap_chars(&ascii(diag), DIAGNOSTIC_CAP);
            push_field(&mut out, "Diagnostic-Code", &format!("smtp; {reply}"));
        }
        if let Some(t) = r.last_attempt {
            push_field(&mut out, "Last-Attempt-Date", &rfc5322_date(t));
        }
    }
    out
}

/// `rfc822; addr` for ASCII addresses, else `utf-8; addr` in the 7-bit utf-8-addr-xtext form
/// of RFC 6533 section 3: every character outside QCHAR (non-ASCII, controls, space, `\`,
/// `+`, `=`) written as `\x{HEX}`, upper-case hex without leading zeros beyond two digits.
fn typed_address(address: &str) -> String {
    let address = clean_address(address);
    if address.is_ascii() {
        return format!("rfc822; {}", cap_chars(&address, MAX_WORD));
    }
    let mut xtext = String::with_capacity(address.len() * 2);
    for c in address.chars() {
        let qchar = matches!(c, '\x21'..='\x7e') && !matches!(c, '\\' | '+' | '=');
        let piece = if qchar {
            c.to_string()
        } else {
            format!("\\x{{{:02X}}}", u32::from(c))
        };
        // One word: it must fit on a line, so cut (never split an escape).
        if xtext.len() + piece.len() > MAX_WORD {
            break;
        }
        xtext.push_str(&piece);
    }
    format!("utf-8; {xtext}")
}

/// The recipient's status if it is a well-formed enhanced code (RFC 3463 section 2:
/// class 2/4/5, subject 1-3 digits, detail 1-3 digits), else a generic one for the action.
fn status_code(r: &RecipientStatus) -> &str {
    let s = r.status.trim();
    let parts: Vec<&str> = s.split('.').collect();
    let digits = |p: &str, max: usize| {
        !p.is_empty() && p.len() <= max && p.bytes().all(|b| b.is_ascii_digit())
    };
    let valid = parts.len() == 3
        && matches!(parts[0], "2" | "4" | "5")
        && digits(parts[1], 3)
        && digits(parts[2], 3);
    if valid {
        s
    } else {
        match r.action {
            Action::Failed => "5.0.0",
            Action::Delayed => "4.0.0",
        }
    }
}

/// The original's header section: lines up to (not including) the first empty line, at most
/// [`HEADER_CAP`] bytes (whole lines only), each ending in CRLF, none over 998 octets.
/// Bare CR and NUL inside a line become spaces (a line ending is LF or CRLF).
fn original_headers(original: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for raw in original.split(|&b| b == b'\n') {
        let line = raw.strip_suffix(b"\r").unwrap_or(raw);
        if line.is_empty() {
            break;
        }
        let repaired: Vec<u8> = line
            .iter()
            .map(|&b| if b == b'\r' || b == 0 { b' ' } else { b })
            .collect();
        let folded = fold_raw_line(&repaired);
        if out.len() + folded.len() > HEADER_CAP {
            break;
        }
        out.extend_from_slice(&folded);
    }
    out
}

/// One header line (no line ending) -> CRLF-terminated physical lines of <= 998 octets.
/// Folds before whitespace when possible (RFC 5322 section 2.2.3, lossless); otherwise cuts
/// and starts the continuation with a space (alters the value, keeps the message valid).
fn fold_raw_line(line: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(line.len() + 8);
    let mut rest = line;
    let mut prefix: &[u8] = b"";
    loop {
        if prefix.len() + rest.len() <= MAX_LINE {
            out.extend_from_slice(prefix);
            out.extend_from_slice(rest);
            out.extend_from_slice(b"\r\n");
            return out;
        }
        let room = MAX_LINE - prefix.len();
        // Last whitespace at index >= 1 within the room: fold before it.
        let cut = match rest[1..room].iter().rposition(|&b| b == b' ' || b == b'\t') {
            Some(i) => (i + 1, b"" as &[u8]),
            None => {
                // Hard cut at room - 1 (the continuation needs a leading space), backing off
                // so that a UTF-8 sequence is not split.
                let mut at = room - 1;
                let mut back = 0;
                while back < 3 && at > 1 && (rest[at] & 0xC0) == 0x80 {
                    at -= 1;
                    back += 1;
                }
                (at, b" " as &[u8])
            }
        };
        out.extend_from_slice(prefix);
        out.extend_from_slice(&rest[..cut.0]);
        out.extend_from_slice(b"\r\n");
        rest = &rest[cut.0..];
        prefix = cut.1;
    }
}

/// A boundary derived from the queue id that occurs in none of `parts` (RFC 2046 5.1.1:
/// at most 70 characters from bchars; ours are alphanumerics, `=`, `_`).
fn choose_boundary(queue_id: &str, parts: &[&[u8]]) -> String {
    let seed: String = queue_id
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .take(32)
        .collect();
    (0u64..)
        .map(|n| format!("=_postern_{seed}_{n}"))
        .find(|b| !parts.iter().any(|p| contains(p, b.as_bytes())))
        .expect("some boundary is absent from finite content")
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// Appends `Name: value` folded at spaces (<= 78 columns when the words allow, never > 998).
/// `value` must already be clean (no control characters).
fn push_field(out: &mut String, name: &str, value: &str) {
    for line in wrap(&format!("{name}: "), " ", value, FOLD_WIDTH) {
        out.push_str(&line);
        out.push_str("\r\n");
    }
}

/// Greedy word wrap: the first line starts with `first`, the others with `cont`; words over
/// [`MAX_WORD`] bytes are cut. With prefixes under 98 bytes no line exceeds 998 octets.
fn wrap(first: &str, cont: &str, text: &str, width: usize) -> Vec<String> {
    let mut lines = Vec::new();
    let mut line = first.to_string();
    let mut has_word = false;
    for word in text.split(' ').filter(|w| !w.is_empty()) {
        for piece in split_word(word, MAX_WORD) {
            if has_word && line.len() + 1 + piece.len() > width {
                lines.push(std::mem::replace(&mut line, cont.to_string()));
                has_word = false;
            }
            if has_word {
                line.push(' ');
            }
            line.push_str(piece);
            has_word = true;
        }
    }
    lines.push(line);
    lines
}

/// `word` in pieces of at most `max` bytes, cut at character boundaries.
fn split_word(word: &str, max: usize) -> Vec<&str> {
    let mut pieces = Vec::new();
    let mut rest = word;
    while rest.len() > max {
        let mut at = max;
        while !rest.is_char_boundary(at) {
            at -= 1;
        }
        pieces.push(&rest[..at]);
        rest = &rest[at..];
    }
    pieces.push(rest);
    pieces
}

/// Control characters (CR and LF first) and runs of whitespace become one space; trimmed.
fn clean(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        let c = if c.is_control() || c.is_whitespace() {
            ' '
        } else {
            c
        };
        if c == ' ' && (out.is_empty() || out.ends_with(' ')) {
            continue;
        }
        out.push(c);
    }
    if out.ends_with(' ') {
        out.pop();
    }
    out
}

/// [`clean`], then non-ASCII replaced by `?`: for the 7-bit delivery-status fields.
fn ascii(s: &str) -> String {
    clean(s)
        .chars()
        .map(|c| if c.is_ascii() { c } else { '?' })
        .collect()
}

/// An address as one word: no whitespace, controls or angle brackets.
fn clean_address(s: &str) -> String {
    s.chars()
        .filter(|c| !c.is_control() && !c.is_whitespace() && *c != '<' && *c != '>')
        .collect()
}

/// At most `max` characters.
fn cap_chars(s: &str, max: usize) -> String {
    match s.char_indices().nth(max) {
        Some((i, _)) => s[..i].to_string(),
        None => s.to_string(),
    }
}

/// RFC 5322 section 3.3 date-time in UTC; out-of-range times become the epoch.
fn rfc5322_date(unix: i64) -> String {
    DateTime::<Utc>::from_timestamp(unix, 0)
        .unwrap_or(DateTime::UNIX_EPOCH)
        .format("%a, %d %b %Y %H:%M:%S +0000")
        .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    const ORIGINAL: &[u8] = b"Received: from client.example ([192.0.2.1])\r\n\
        \tby mx.postern.test with ESMTP id Q123; Thu, 1 Jan 2026 00:00:00 +0000\r\n\
        From: Alice <alice@client.example>\r\n\
        To: bob@remote.example\r\n\
        Subject: lunch\r\n\
        \r\n\
        SECRET BODY LINE\r\n\
        more body\r\n";

    fn failed(address: &str) -> RecipientStatus {
        RecipientStatus {
            address: address.to_string(),
            action: Action::Failed,
            status: "5.1.1".to_string(),
            remote_mta: Some("mx.remote.example".to_string()),
            diagnostic: Some("550 5.1.1 <bob@remote.example>: user unknown".to_string()),
            explanation: None,
            last_attempt: Some(1_767_225_700),
        }
    }

    fn request<'a>(recipients: &'a [RecipientStatus], original: &'a [u8]) -> DsnRequest<'a> {
        DsnRequest {
            kind: DsnKind::Failure,
            reporting_mta: "mx.postern.test",
            queue_id: "Q123",
            sender: "alice@client.example",
            arrival: 1_767_225_600,
            now: 1_767_225_900,
            original,
            recipients,
            message_id: "<Q123.dsn@mx.postern.test>".to_string(),
        }
    }

    /// A tiny MIME reader, enough to check the structure.
    struct Parsed {
        headers: Vec<(String, String)>,
        parts: Vec<(Vec<(String, String)>, String)>,
        boundary: String,
    }

    fn header_section(text: &str) -> (Vec<(String, String)>, &str) {
        let (head, body) = text.split_once("\r\n\r\n").unwrap_or((text, ""));
        let mut fields: Vec<(String, String)> = Vec::new();
        for line in head.split("\r\n").filter(|l| !l.is_empty()) {
            if line.starts_with(' ') || line.starts_with('\t') {
                fields.last_mut().unwrap().1.push_str(line);
            } else {
                let (name, value) = line.split_once(':').expect("field has a colon");
                fields.push((name.to_string(), value.trim().to_string()));
            }
        }
        (fields, body)
    }

    fn get<'a>(fields: &'a [(String, String)], name: &str) -> Option<&'a str> {
        fields
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }

    fn parse(msg: &[u8]) -> Parsed {
        let text = String::from_utf8(msg.to_vec()).expect("utf-8 in tests");
        let (headers, body) = header_section(&text);
        let ctype = get(&headers, "Content-Type").unwrap().to_string();
        let boundary = ctype
            .split("boundary=\"")
            .nth(1)
            .unwrap()
            .split('"')
            .next()
            .unwrap()
            .to_string();
        let delim = format!("\r\n--{boundary}");
        let close = format!("\r\n--{boundary}--\r\n");
        assert!(body.ends_with(&close), "closing delimiter at the end");
        let body = &body[..body.len() - close.len()];
        let mut chunks = body.split(&delim);
        let _preamble = chunks.next().unwrap();
        let parts = chunks
            .map(|c| {
                let c = c
                    .strip_prefix("\r\n")
                    .expect("delimiter line ends with CRLF");
                let (h, b) = header_section(c);
                (h, b.to_string())
            })
            .collect();
        Parsed {
            headers,
            parts,
            boundary,
        }
    }

    fn assert_wire_clean(msg: &[u8]) {
        for (i, line) in msg.split(|&b| b == b'\n').enumerate() {
            let is_last = i == msg.split(|&b| b == b'\n').count() - 1;
            if is_last {
                assert!(line.is_empty(), "message ends with CRLF");
                continue;
            }
            assert_eq!(line.last(), Some(&b'\r'), "LF without CR in line {i}");
            let content = &line[..line.len() - 1];
            assert!(!content.contains(&b'\r'), "bare CR in line {i}");
            assert!(content.len() <= 998, "line {i} is {} octets", content.len());
        }
    }

    #[test]
    fn failure_structure_and_fields() {
        let rcpts = [failed("bob@remote.example")];
        let msg = build(&request(&rcpts, ORIGINAL));
        assert_wire_clean(&msg);
        assert!(msg.is_ascii());
        let p = parse(&msg);

        assert_eq!(
            get(&p.headers, "From"),
            Some("Mail Delivery System <MAILER-DAEMON@mx.postern.test>")
        );
        assert_eq!(get(&p.headers, "To"), Some("<alice@client.example>"));
        assert_eq!(
            get(&p.headers, "Subject"),
            Some("Undelivered Mail Returned to Sender")
        );
        assert_eq!(
            get(&p.headers, "Date"),
            Some("Thu, 01 Jan 2026 00:05:00 +0000")
        );
        assert_eq!(
            get(&p.headers, "Message-ID"),
            Some("<Q123.dsn@mx.postern.test>")
        );
        assert_eq!(get(&p.headers, "MIME-Version"), Some("1.0"));
        assert_eq!(get(&p.headers, "Auto-Submitted"), Some("auto-replied"));
        let ctype = get(&p.headers, "Content-Type").unwrap();
        assert!(ctype.starts_with("multipart/report; report-type=delivery-status;"));
        assert!(p.boundary.contains("Q123"));
        assert!(p.boundary.len() <= 70);

        assert_eq!(p.parts.len(), 3);
        let (h1, text) = &p.parts[0];
        assert_eq!(get(h1, "Content-Type"), Some("text/plain; charset=utf-8"));
        assert!(text.contains("<bob@remote.example>"));
        assert!(text.contains("mx.remote.example"));
        assert!(text.contains("550 5.1.1 <bob@remote.example>: user unknown"));

        let (h2, status) = &p.parts[1];
        assert_eq!(get(h2, "Content-Type"), Some("message/delivery-status"));
        let blocks: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(blocks.len(), 2, "per-message block and one recipient block");
        let (msg_fields, _) = header_section(blocks[0]);
        assert_eq!(
            get(&msg_fields, "Reporting-MTA"),
            Some("dns; mx.postern.test")
        );
        assert_eq!(get(&msg_fields, "X-Postern-Queue-ID"), Some("Q123"));
        assert_eq!(
            get(&msg_fields, "Arrival-Date"),
            Some("Thu, 01 Jan 2026 00:00:00 +0000")
        );
        let (r, _) = header_section(blocks[1]);
        assert_eq!(
            get(&r, "Final-Recipient"),
            Some("rfc822; bob@remote.example")
        );
        assert_eq!(get(&r, "Action"), Some("failed"));
        assert_eq!(get(&r, "Status"), Some("5.1.1"));
        assert_eq!(get(&r, "Remote-MTA"), Some("dns; mx.remote.example"));
        assert_eq!(
            get(&r, "Diagnostic-Code"),
            Some("smtp; 550 5.1.1 <bob@remote.example>: user unknown")
        );
        assert_eq!(
            get(&r, "Last-Attempt-Date"),
            Some("Thu, 01 Jan 2026 00:01:40 +0000")
        );

        let (h3, headers) = &p.parts[2];
        assert_eq!(get(h3, "Content-Type"), Some("text/rfc822-headers"));
        assert!(headers.starts_with("Received: from client.example"));
        assert!(headers.contains("Subject: lunch\r\n"));
        assert!(!headers.contains("SECRET"));
        assert!(!String::from_utf8_lossy(&msg).contains("SECRET BODY"));
        assert!(!String::from_utf8_lossy(&msg).contains("more body"));
    }

    #[test]
    fn delay_and_several_recipients() {
        let rcpts = [
            RecipientStatus {
                address: "carol@slow.example".into(),
                action: Action::Delayed,
                status: "4.4.1".into(),
                remote_mta: None,
                diagnostic: None,
                explanation: None,
                last_attempt: None,
            },
            RecipientStatus {
                address: "dave@slow.example".into(),
                action: Action::Delayed,
                status: "bogus".into(),
                remote_mta: Some("mx.slow.example".into()),
                diagnostic: Some("421 4.3.2 try later".into()),
                explanation: None,
                last_attempt: Some(1_767_225_800),
            },
        ];
        let mut req = request(&rcpts, ORIGINAL);
        req.kind = DsnKind::Delay;
        let msg = build(&req);
        assert_wire_clean(&msg);
        let p = parse(&msg);
        assert_eq!(
            get(&p.headers, "Subject"),
            Some("Delayed Mail (still being retried)")
        );
        let status = &p.parts[1].1;
        let blocks: Vec<&str> = status.trim_end().split("\r\n\r\n").collect();
        assert_eq!(blocks.len(), 3);
        let (c, _) = header_section(blocks[1]);
        assert_eq!(get(&c, "Action"), Some("delayed"));
        assert_eq!(get(&c, "Status"), Some("4.4.1"));
        assert_eq!(get(&c, "Remote-MTA"), None);
        assert_eq!(get(&c, "Diagnostic-Code"), None);
        let (d, _) = header_section(blocks[2]);
        assert_eq!(
            get(&d, "Status"),
            Some("4.0.0"),
            "malformed status replaced"
        );
        assert!(p.parts[0].1.contains("<carol@slow.example>"));
        assert!(p.parts[0].1.contains("421 4.3.2 try later"));
    }

    #[test]
    fn non_ascii_recipient_uses_utf8_type_in_7bit_form() {
        let rcpts = [failed("jürgen+tag@bücher.example")];
        let msg = build(&request(&rcpts, ORIGINAL));
        assert_wire_clean(&msg);
        let p = parse(&msg);
        let (h2, status) = &p.parts[1];
        assert!(status.is_ascii(), "delivery-status stays 7-bit");
        assert!(get(h2, "Content-Transfer-Encoding").is_none_or(|v| v == "7bit"));
        assert!(
            status.contains(
                "Final-Recipient: utf-8; j\\x{FC}rgen\\x{2B}tag@b\\x{FC}cher.example\r\n"
            ),
            "{status}"
        );
        // People read it as it is, in the UTF-8 text part, marked 8bit.
        let (h1, text) = &p.parts[0];
        assert!(text.contains("<jürgen+tag@bücher.example>"));
        assert_eq!(get(h1, "Content-Transfer-Encoding"), Some("8bit"));
        assert_eq!(get(&p.headers, "Content-Transfer-Encoding"), Some("8bit"));
    }

    #[test]
    fn xtext_escapes() {
        assert_eq!(typed_address("a@b.example"), "rfc822; a@b.example");
        assert_eq!(typed_address("a+b@c.example"), "rfc822; a+b@c.example");
        assert_eq!(
            typed_address("δ=\\@x.example"),
            "utf-8; \\x{3B4}\\x{3D}\\x{5C}@x.example"
        );
        assert_eq!(typed_address("😀@x.example"), "utf-8; \\x{1F600}@x.example");
    }

    #[test]
    fn long_header_lines_are_folded_or_cut() {
        let mut original = Vec::new();
        original.extend_from_slice(b"Subject: ");
        for i in 0..400 {
            original.extend_from_slice(format!("word{i} ").as_bytes());
        }
        original.extend_from_slice(b"\r\nX-Blob: ");
        original.extend(std::iter::repeat_n(b'A', 5000));
        original.extend_from_slice(b"\r\nX-Mixed: ");
        original.extend(std::iter::repeat_n("é".as_bytes(), 1500).flatten());
        original.extend_from_slice(b"\r\nX-Bare: a\rb\0c\r\n\r\nbody\r\n");
        let rcpts = [failed("bob@remote.example")];
        let msg = build(&request(&rcpts, &original));
        assert_wire_clean(&msg);
        let p = parse(&msg);
        let headers = &p.parts[2].1;
        // The whitespace-folded Subject unfolds to the original exactly.
        let (fields, _) = header_section(headers);
        let subject = get(&fields, "Subject").unwrap();
        assert!(subject.starts_with("word0 word1"));
        assert!(subject.trim_end().ends_with("word399"));
        assert_eq!(subject.split_whitespace().count(), 400);
        // Nothing lost from the blob, only cut into lines.
        let blob = get(&fields, "X-Blob").unwrap();
        assert_eq!(blob.chars().filter(|&c| c == 'A').count(), 5000);
        // UTF-8 not split.
        let mixed = get(&fields, "X-Mixed").unwrap();
        assert_eq!(mixed.chars().filter(|&c| c == 'é').count(), 1500);
        assert_eq!(get(&fields, "X-Bare"), Some("a b c"));
        assert!(!headers.contains("body"));
    }

    #[test]
    fn long_diagnostic_and_odd_fields_stay_valid() {
        let mut r = failed("bob@remote.example");
        r.diagnostic = Some(format!(
            "550-5.7.1 first line\r\n550 5.7.1 {} {}",
            "x".repeat(3000),
            "tail ".repeat(100)
        ));
        r.remote_mta = Some("evil\r\nInjected: yes".into());
        let rcpts = [r];
        let mut req = request(&rcpts, ORIGINAL);
        req.queue_id = "Q\r\n123";
        let msg = build(&req);
        assert_wire_clean(&msg);
        let p = parse(&msg);
        assert!(!p.parts[1].1.contains("\r\nInjected"));
        assert!(!p.parts[0].1.contains("\r\nInjected"));
        let (r, _) = header_section(p.parts[1].1.trim_end().split("\r\n\r\n").nth(1).unwrap());
        let diag = get(&r, "Diagnostic-Code").unwrap();
        assert!(diag.starts_with("smtp; 550-5.7.1 first line 550 5.7.1 xxx"));
    }

    #[test]
    fn no_empty_line_means_whole_thing_capped() {
        let mut original = Vec::new();
        for i in 0..10_000 {
            original.extend_from_slice(format!("X-Header-{i}: value\n").as_bytes());
        }
        let rcpts = [failed("bob@remote.example")];
        let msg = build(&request(&rcpts, &original));
        assert_wire_clean(&msg);
        let p = parse(&msg);
        let headers = &p.parts[2].1;
        assert!(headers.len() <= HEADER_CAP + 2);
        assert!(headers.starts_with("X-Header-0: value\r\n"));
        assert!(headers.contains("X-Header-100: value\r\n"));
        assert!(!headers.contains("X-Header-9999:"));
        // Whole lines only.
        assert!(headers.trim_end().ends_with("value"));
    }

    #[test]
    fn boundary_avoids_content() {
        // The original already contains the first candidate boundary.
        let original = b"X-Trap: --=_postern_Q123_0\r\nX-Trap2: =_postern_Q123_1\r\n\r\nbody";
        let rcpts = [failed("bob@remote.example")];
        let msg = build(&request(&rcpts, original));
        let p = parse(&msg);
        assert_eq!(p.boundary, "=_postern_Q123_2");
        assert_eq!(p.parts.len(), 3);
        assert!(p.parts[2].1.contains("X-Trap: --=_postern_Q123_0"));
    }

    #[test]
    fn empty_original_and_bare_lf() {
        let rcpts = [failed("bob@remote.example")];
        let msg = build(&request(&rcpts, b""));
        assert_wire_clean(&msg);
        assert_eq!(parse(&msg).parts.len(), 3);
        let msg = build(&request(&rcpts, b"Subject: x\nFrom: y\n\nbody\n"));
        assert_wire_clean(&msg);
        assert_eq!(parse(&msg).parts[2].1, "Subject: x\r\nFrom: y\r\n");
    }

    #[test]
    fn message_id_gets_brackets() {
        let rcpts = [failed("bob@remote.example")];
        let mut req = request(&rcpts, ORIGINAL);
        req.message_id = "abc@host".into();
        let p = parse(&build(&req));
        assert_eq!(get(&p.headers, "Message-ID"), Some("<abc@host>"));
    }

    #[test]
    fn expired_message_keeps_the_status_and_the_reply_consistent() {
        // RFC 3463 4.4.7 with action failed (as Postfix sends for "delivery time
        // expired"); the Diagnostic-Code is the last remote reply as it was.
        let rcpts = [RecipientStatus {
            address: "bob@remote.example".into(),
            action: Action::Failed,
            status: "4.4.7".into(),
            remote_mta: Some("mx.remote.example".into()),
            diagnostic: Some("451 4.3.0 try again later".into()),
            explanation: Some("delivery time expired: not delivered within 5d".into()),
            last_attempt: Some(1_767_225_700),
        }];
        let msg = build(&request(&rcpts, ORIGINAL));
        assert_wire_clean(&msg);
        let text = String::from_utf8_lossy(&msg).into_owned();
        assert!(text.contains("Status: 4.4.7\r\n"), "{text}");
        assert!(text.contains("Action: failed\r\n"), "{text}");
        assert!(
            text.contains("Diagnostic-Code: smtp; 451 4.3.0 try again later\r\n"),
            "{text}"
        );
        assert!(!text.contains("550 4.4.7"), "{text}");
        assert!(
            text.contains("<bob@remote.example>: delivery time expired"),
            "{text}"
        );
        assert!(
            text.contains("host mx.remote.example said: 451 4.3.0"),
            "{text}"
        );

        // No remote reply at all: no Diagnostic-Code, the reason only in the text.
        let rcpts = [RecipientStatus {
            remote_mta: None,
            diagnostic: None,
            explanation: Some("delivery time expired; last problem: no host answered".into()),
            ..rcpts[0].clone()
        }];
        let text = String::from_utf8_lossy(&build(&request(&rcpts, ORIGINAL))).into_owned();
        assert!(!text.contains("Diagnostic-Code"), "{text}");
        assert!(!text.contains("Remote-MTA"), "{text}");
        assert!(text.contains("last problem: no host answered"), "{text}");
    }

    #[test]
    fn postmaster_notice() {
        let rcpts = [failed("bob@remote.example")];
        let mut req = request(&rcpts, ORIGINAL);
        req.kind = DsnKind::PostmasterNotice;
        req.sender = "postmaster@mx.postern.test";
        let msg = build(&req);
        assert_wire_clean(&msg);
        let text = String::from_utf8_lossy(&msg).into_owned();
        assert!(
            text.contains("To: <postmaster@mx.postern.test>\r\n"),
            "{text}"
        );
        assert!(text.contains("Subject: Postmaster Notice"), "{text}");
        assert!(
            text.contains("Auto-Submitted: auto-generated\r\n"),
            "{text}"
        );
        assert!(text.contains("null sender"), "{text}");
        assert!(text.contains("Status: 5.1.1"), "{text}");
        assert!(
            text.contains("Subject: lunch"),
            "the original header is attached"
        );
    }
}
