//! SMTP replies and the one catalogue of every reply Postern sends.
//!
//! Every reply a client can see is built here, so that the codes match the table in
//! `docs/configuration.md` / the interface contract and no literal reply text is scattered
//! through the code. Enhanced status codes follow RFC 3463 and are sent on every line of
//! every reply except the greeting and the EHLO/HELO answer (RFC 2034 section 3).
//!
//! Trust: replies are built from our own strings plus, in a few places, values that came
//! from the network (a queue id, a byte count). Those never contain CR or LF: callers
//! pass only values the parser has already checked, and `write_to` replaces any stray
//! control character with '?' as a last line of defence against reply injection.

use std::borrow::Cow;
use std::fmt;
use std::io::Write as _;

/// An enhanced status code (RFC 3463): class.subject.detail, e.g. 5.7.1.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Status(pub u8, pub u16, pub u16);

impl fmt::Display for Status {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// One SMTP reply: a three-digit code, an optional enhanced status code and one or more
/// lines of text (multi-line replies use `code-text` continuation lines, RFC 5321 4.2.1).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reply {
    pub code: u16,
    pub status: Option<Status>,
    pub lines: Vec<Cow<'static, str>>,
}

impl Reply {
    pub fn new(code: u16, status: Option<Status>, text: impl Into<Cow<'static, str>>) -> Reply {
        Reply {
            code,
            status,
            lines: vec![text.into()],
        }
    }

    /// 2xx or 3xx.
    pub fn is_positive(&self) -> bool {
        self.code < 400
    }

    /// 4xx: the client may try again later.
    pub fn is_transient(&self) -> bool {
        (400..500).contains(&self.code)
    }

    /// Appends the wire form (CRLF-terminated lines) to `out`.
    pub fn write_to(&self, out: &mut Vec<u8>) {
        let last = self.lines.len().saturating_sub(1);
        for (i, line) in self.lines.iter().enumerate() {
            // Formatted into `out` directly (no String per line); writing to a Vec
            // cannot fail.
            let _ = write!(out, "{}", self.code);
            out.push(if i == last { b' ' } else { b'-' });
            if let Some(st) = self.status {
                let _ = write!(out, "{st} ");
            }
            out.extend(
                line.bytes()
                    .map(|b| if b < 0x20 || b == 0x7f { b'?' } else { b }),
            );
            out.extend_from_slice(b"\r\n");
        }
    }

    /// The reply as one line of text (for logs and DSNs): "554 5.7.1 Relay access denied".
    pub fn one_line(&self) -> String {
        let mut s = self.code.to_string();
        if let Some(st) = self.status {
            s.push(' ');
            s.push_str(&st.to_string());
        }
        for line in &self.lines {
            s.push(' ');
            s.push_str(line);
        }
        s
    }
}

impl fmt::Display for Reply {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.one_line())
    }
}

/// The catalogue: one function per situation a client can meet.
///
/// The situations and codes follow the interface contract's "What a client sees" table;
/// RFC sections are cited where the code is not obvious.
pub mod catalogue {
    use super::{Reply, Status};

    const fn st(c: u8, s: u16, d: u16) -> Option<Status> {
        Some(Status(c, s, d))
    }

    // --- connection level ---------------------------------------------------------------

    /// 220 greeting (RFC 5321 4.3.1; no enhanced code on the greeting, RFC 2034 3).
    pub fn greeting(hostname: &str) -> Reply {
        Reply::new(220, None, format!("{hostname} ESMTP Postern"))
    }
    /// 221 after QUIT.
    pub fn closing() -> Reply {
        Reply::new(221, st(2, 0, 0), "Bye")
    }
    /// 421: idle longer than the command timeout.
    pub fn timeout() -> Reply {
        Reply::new(421, st(4, 4, 2), "Timeout exceeded, closing connection")
    }
    /// 421: the client made too many protocol errors.
    pub fn too_many_errors() -> Reply {
        Reply::new(421, st(4, 7, 0), "Too many errors, closing connection")
    }
    /// 421: the server is stopping (SIGTERM).
    pub fn shutting_down() -> Reply {
        Reply::new(421, st(4, 3, 2), "Service shutting down, try again later")
    }
    /// 421: a connection limit was hit; `which` names it for the client.
    pub fn too_many_connections(which: &'static str) -> Reply {
        Reply::new(
            421,
            st(4, 7, 0),
            format!("Too many connections {which}, try again later"),
        )
    }

    // --- greeting commands --------------------------------------------------------------

    /// 250 answer to HELO.
    pub fn helo(hostname: &str) -> Reply {
        Reply::new(250, None, hostname.to_string())
    }
    /// 250 multi-line answer to EHLO: our name, then one line per extension.
    pub fn ehlo(hostname: &str, extensions: &[String]) -> Reply {
        let mut lines = Vec::with_capacity(extensions.len() + 1);
        lines.push(hostname.to_string().into());
        lines.extend(extensions.iter().map(|e| e.clone().into()));
        Reply {
            code: 250,
            status: None,
            lines,
        }
    }
    /// 501 for EHLO/HELO without a usable argument.
    pub fn helo_syntax(cmd: &'static str) -> Reply {
        Reply::new(501, st(5, 5, 4), format!("Syntax: {cmd} hostname"))
    }

    // --- transaction ----------------------------------------------------------------------

    pub fn ok() -> Reply {
        Reply::new(250, st(2, 0, 0), "Ok")
    }
    pub fn sender_ok() -> Reply {
        Reply::new(250, st(2, 1, 0), "Sender ok")
    }
    pub fn recipient_ok() -> Reply {
        Reply::new(250, st(2, 1, 5), "Recipient ok")
    }
    /// 354 after DATA (RFC 5321 4.1.1.4).
    pub fn start_data() -> Reply {
        Reply::new(354, None, "End data with <CR><LF>.<CR><LF>")
    }
    /// 250 after a non-final BDAT chunk (RFC 3030 2).
    pub fn chunk_ok(octets: u64) -> Reply {
        Reply::new(250, st(2, 0, 0), format!("{octets} octets received"))
    }
    /// 250 after DATA/BDAT LAST: the message is durably queued.
    pub fn queued(id: &str) -> Reply {
        Reply::new(250, st(2, 0, 0), format!("Ok: queued as {id}"))
    }
    pub fn reset() -> Reply {
        Reply::new(250, st(2, 0, 0), "Reset")
    }
    /// 252 to VRFY: we never disclose which users exist (RFC 5321 3.5.3, 7.3).
    pub fn vrfy() -> Reply {
        Reply::new(
            252,
            st(2, 5, 0),
            "Cannot VRFY user, but will accept message and attempt delivery",
        )
    }
    /// 502 to EXPN: lists are never expanded for a client (RFC 5321 7.3).
    pub fn expn_disabled() -> Reply {
        Reply::new(502, st(5, 5, 1), "EXPN not available")
    }
    pub fn help() -> Reply {
        Reply::new(
            214,
            st(2, 0, 0),
            "Commands: EHLO HELO MAIL RCPT DATA BDAT RSET NOOP VRFY HELP QUIT",
        )
    }

    // --- refusals -------------------------------------------------------------------------

    /// 503: command out of sequence; `what` says what was expected.
    pub fn bad_sequence(what: &'static str) -> Reply {
        Reply::new(503, st(5, 5, 1), what)
    }
    /// 500: not a command we know.
    pub fn unrecognized() -> Reply {
        Reply::new(500, st(5, 5, 2), "Syntax error, command unrecognized")
    }
    /// 502: a command we know but do not offer on this connection.
    pub fn not_implemented() -> Reply {
        Reply::new(502, st(5, 5, 1), "Command not implemented")
    }
    /// 501: arguments of a known command are malformed.
    pub fn syntax(text: &'static str) -> Reply {
        Reply::new(501, st(5, 5, 4), text)
    }
    /// 500 5.5.2: command line longer than 512 octets (RFC 5321 4.5.3.1.4).
    pub fn command_too_long() -> Reply {
        Reply::new(500, st(5, 5, 2), "Line too long")
    }
    /// 500 5.5.6: a text line of the message exceeded 1000 octets (RFC 5321 4.5.3.1.6).
    pub fn text_line_too_long() -> Reply {
        Reply::new(
            500,
            st(5, 5, 6),
            "Message has a line longer than 1000 octets (RFC 5321 4.5.3.1.6)",
        )
    }
    /// 554 5.6.0: the message has a CR or LF that is not part of a CRLF pair. We refuse
    /// such messages instead of guessing where lines end (SMTP smuggling, CVE-2023-51764).
    pub fn bare_line_ending() -> Reply {
        Reply::new(
            554,
            st(5, 6, 0),
            "Message contains a bare CR or LF; lines must end with CRLF (RFC 5321 2.3.8)",
        )
    }
    /// 501 5.1.7: MAIL FROM path is malformed.
    pub fn bad_sender_syntax() -> Reply {
        Reply::new(501, st(5, 1, 7), "Bad sender address syntax")
    }
    /// 501 5.1.3: RCPT TO path is malformed (this is where `user@other@accepted` ends).
    pub fn bad_recipient_syntax() -> Reply {
        Reply::new(501, st(5, 1, 3), "Bad recipient address syntax")
    }
    /// 555 5.5.4: MAIL/RCPT parameter we do not support or with a bad value (RFC 5321 4.1.1.11).
    pub fn bad_parameter(text: &'static str) -> Reply {
        Reply::new(555, st(5, 5, 4), text)
    }
    /// 553 5.6.7: non-ASCII address without SMTPUTF8 (RFC 6531 3.7.4.1).
    pub fn needs_smtputf8() -> Reply {
        Reply::new(
            553,
            st(5, 6, 7),
            "Non-ASCII address requires the SMTPUTF8 parameter",
        )
    }
    /// 552 5.3.4: message (or declared SIZE) over max_message_size (RFC 1870 6).
    pub fn message_too_big() -> Reply {
        Reply::new(552, st(5, 3, 4), "Message size exceeds fixed limit")
    }
    /// 452 4.5.3: more recipients than max_recipients (RFC 5321 4.5.3.1.8).
    pub fn too_many_recipients() -> Reply {
        Reply::new(452, st(4, 5, 3), "Too many recipients")
    }
    /// 554 5.5.1: DATA/BDAT with no accepted recipient (RFC 2920 3.1).
    pub fn no_valid_recipients() -> Reply {
        Reply::new(554, st(5, 5, 1), "No valid recipients")
    }
    /// 554 5.7.1: the client may not relay to this recipient.
    pub fn relay_denied() -> Reply {
        Reply::new(554, st(5, 7, 1), "Relay access denied")
    }
    /// 550 5.7.1: a `[[filter]]` with action "reject" matched (at the end of DATA or
    /// BDAT LAST); nothing was queued.
    pub fn filter_rejected() -> Reply {
        Reply::new(550, st(5, 7, 1), "Message rejected by content policy")
    }
    /// 550 5.7.1: the message fails DMARC (RFC 7489) and the From: domain's policy is
    /// p=reject (`[authentication] dmarc_enforce`).
    pub fn dmarc_rejected(domain: &str) -> Reply {
        Reply::new(
            550,
            st(5, 7, 1),
            format!("DMARC policy of {domain} says reject"),
        )
    }
    /// 550 5.7.23 (RFC 7372): SPF says "fail" for the client (`[authentication]
    /// spf_reject`).
    pub fn spf_rejected(domain: &str, ip: std::net::IpAddr) -> Reply {
        Reply::new(
            550,
            st(5, 7, 23),
            format!("SPF check failed: {ip} is not allowed to send mail for {domain}"),
        )
    }
    /// 554 5.7.1: the client is on a DNS blocklist; the reply names the list.
    pub fn dnsbl_listed(ip: std::net::IpAddr, zone: &str) -> Reply {
        Reply::new(
            554,
            st(5, 7, 1),
            format!("Service unavailable; client [{ip}] blocked using {zone}"),
        )
    }
    /// 553 5.7.1: an authenticated user's MAIL FROM is not one of their addresses.
    pub fn sender_not_owned() -> Reply {
        Reply::new(
            553,
            st(5, 7, 1),
            "Sender address rejected: not owned by the authenticated user",
        )
    }
    /// 550 5.1.1: recipient in an accepted domain that does not exist.
    pub fn unknown_user() -> Reply {
        Reply::new(550, st(5, 1, 1), "Recipient address rejected: user unknown")
    }
    /// 554 5.4.6: the message carries too many trace fields, a mail loop (RFC 5321 6.3;
    /// RFC 3463 X.4.6 "routing loop detected").
    pub fn too_many_hops() -> Reply {
        Reply::new(554, st(5, 4, 6), "Too many hops: mail loop detected")
    }
    /// 452 4.3.1: no memory left for one more message right now (RFC 1870 6.1 uses 452
    /// for insufficient storage); the client tries again later.
    pub fn insufficient_storage() -> Reply {
        Reply::new(
            452,
            st(4, 3, 1),
            "Insufficient system resources, try again later",
        )
    }
    /// 550 5.4.6: an address literal that is this server: there is no local delivery,
    /// so relaying it would loop back here.
    pub fn literal_is_us() -> Reply {
        Reply::new(
            550,
            st(5, 4, 6),
            "Address literal is this server: mail would loop back to myself",
        )
    }
    /// 451 4.3.0: we could not do our part (spool write failed, ...).
    pub fn local_error() -> Reply {
        Reply::new(
            451,
            st(4, 3, 0),
            "Local error in processing, try again later",
        )
    }
    /// 530 5.7.0: require_tls and no STARTTLS yet (RFC 3207 4).
    pub fn tls_required() -> Reply {
        Reply::new(530, st(5, 7, 0), "Must issue a STARTTLS command first")
    }
    /// 530 5.7.0: auth = "required" and no successful AUTH yet (RFC 4954 6).
    pub fn auth_required() -> Reply {
        Reply::new(530, st(5, 7, 0), "Authentication required")
    }
    /// 538 5.7.11: AUTH over an unencrypted connection (RFC 4954 6).
    pub fn encryption_required_for_auth() -> Reply {
        Reply::new(
            538,
            st(5, 7, 11),
            "Encryption required for requested authentication mechanism",
        )
    }
    /// 504 5.5.4: a SASL mechanism we do not offer (RFC 4954 4).
    pub fn unknown_mechanism() -> Reply {
        Reply::new(504, st(5, 5, 4), "Unrecognized authentication type")
    }
    /// 334: a SASL challenge (base64, possibly empty).
    pub fn sasl_challenge(challenge: &'static str) -> Reply {
        Reply::new(334, None, challenge)
    }
    /// 501 5.7.0: the client cancelled the exchange with `*` (RFC 4954 4).
    pub fn auth_cancelled() -> Reply {
        Reply::new(501, st(5, 7, 0), "Authentication cancelled")
    }
    /// 501 5.5.2: a SASL response that is not valid base64 or not valid for the mechanism.
    pub fn bad_sasl_response() -> Reply {
        Reply::new(
            501,
            st(5, 5, 2),
            "Cannot decode the authentication response",
        )
    }
    /// 235 2.7.0: AUTH succeeded (RFC 4954 6).
    pub fn auth_ok() -> Reply {
        Reply::new(235, st(2, 7, 0), "Authentication successful")
    }
    /// 535 5.7.8: wrong user name or password (RFC 4954 6).
    pub fn auth_failed() -> Reply {
        Reply::new(535, st(5, 7, 8), "Authentication credentials invalid")
    }
    /// 454 4.7.0: AUTH refused for now: the client address or user name is locked out
    /// after too many failures, or the check could not be made (RFC 4954 6).
    pub fn auth_temporarily_refused() -> Reply {
        Reply::new(
            454,
            st(4, 7, 0),
            "Temporary authentication failure, try again later",
        )
    }
    /// 500 5.5.6: a SASL response line over 12288 octets (RFC 4954 4).
    pub fn auth_line_too_long() -> Reply {
        Reply::new(500, st(5, 5, 6), "Authentication exchange line is too long")
    }
    /// 451 4.7.1: a rate limit would be exceeded by this MAIL or RCPT; the client tries
    /// again later (RFC 5321 4.2.5: transient, nothing bounces; RFC 3463 X.7.1).
    pub fn rate_limited() -> Reply {
        Reply::new(451, st(4, 7, 1), "Rate limit exceeded, try again later")
    }
    /// 421 4.7.0: too many new connections from this address lately (`connection_rate`);
    /// the connection is closed after it.
    pub fn connection_rate_exceeded() -> Reply {
        Reply::new(
            421,
            st(4, 7, 0),
            "Too many connections from your address lately, try again later",
        )
    }
    /// 220 after STARTTLS (RFC 3207 4).
    pub fn ready_for_tls() -> Reply {
        Reply::new(220, st(2, 0, 0), "Ready to start TLS")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn wire(r: &Reply) -> String {
        let mut v = Vec::new();
        r.write_to(&mut v);
        String::from_utf8(v).unwrap()
    }

    #[test]
    fn single_line_with_status() {
        assert_eq!(
            wire(&catalogue::relay_denied()),
            "554 5.7.1 Relay access denied\r\n"
        );
    }

    #[test]
    fn multi_line_continuations() {
        let r = catalogue::ehlo("mx.test", &["PIPELINING".into(), "8BITMIME".into()]);
        assert_eq!(
            wire(&r),
            "250-mx.test\r\n250-PIPELINING\r\n250 8BITMIME\r\n"
        );
    }

    #[test]
    fn control_characters_cannot_inject_lines() {
        let r = Reply::new(250, None, "a\r\n250 b".to_string());
        assert_eq!(wire(&r), "250 a??250 b\r\n");
    }
}
