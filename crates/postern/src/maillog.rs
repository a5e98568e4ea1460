//! The decision log: one line per decision an operator may need to find later
//! (message accepted, recipient refused, connection refused, message refused), apart
//! from debug traces. Lines go through `tracing` with target `maillog`, so they can be
//! filtered on their own (`RUST_LOG=maillog=info`), and use fixed `key=value` fields so
//! that grep, awk and fail2ban can read them.
//!
//! Nothing secret is ever passed here: no passwords, no message content.

use std::fmt::Display;
use std::net::{IpAddr, SocketAddr};

use postern_smtp::{Address, Reply, ReversePath};

use crate::policy::Rule;

/// A connection was refused before the greeting because a limit was hit.
pub fn connection_refused(listener: SocketAddr, client: SocketAddr, limit: &str, value: usize) {
    tracing::warn!(target: "maillog", %listener, %client, limit = %limit, value,
        "connection refused: limit {limit}={value} reached");
}

/// A connection to a `proxy_protocol` listener was closed without a banner: its peer is
/// outside `proxy_from`, or its PROXY header was missing, malformed or late.
pub fn proxy_refused(listener: SocketAddr, peer: SocketAddr, why: &str) {
    tracing::warn!(target: "maillog", %listener, %peer, error = %why,
        "connection closed without a banner: {why}");
}

/// A PROXY header named the client of a connection from a load balancer (`client` is
/// the peer itself for v2 LOCAL and UNKNOWN).
pub fn proxied(listener: SocketAddr, peer: SocketAddr, client: SocketAddr, header: &str) {
    tracing::debug!(target: "maillog", %listener, %peer, %client, header = %header,
        "PROXY header");
}

/// A session started.
pub fn connected(listener: SocketAddr, client: SocketAddr) {
    tracing::debug!(target: "maillog", %listener, %client, "connect");
}

/// A session ended; `reason` says how (quit, client closed, timeout, shutdown, error).
pub fn disconnected(client: SocketAddr, reason: &str) {
    tracing::debug!(target: "maillog", %client, reason = %reason, "disconnect");
}

/// A TLS handshake failed (STARTTLS or implicit TLS).
pub fn tls_failed(client: SocketAddr, why: &str) {
    tracing::info!(target: "maillog", %client, error = %why, "TLS handshake failed");
}

/// A DATA or BDAT transfer ran past `data_timeout`; the session is closed (421 4.4.2).
pub fn transfer_timeout(client: SocketAddr, limit: std::time::Duration) {
    tracing::info!(
        target: "maillog",
        %client,
        limit_s = limit.as_secs(),
        "message transfer too slow (data_timeout); closing"
    );
}

/// A message did not fit in `max_message_memory`; it is answered 452 4.3.1.
pub fn memory_refused(client: SocketAddr, wanted: u64, in_use: u64) {
    tracing::warn!(
        target: "maillog",
        %client,
        wanted,
        in_use,
        "message refused for now: max_message_memory is in use (452 4.3.1)"
    );
}

/// A recipient was refused by the relay policy.
pub fn recipient_refused(
    client: SocketAddr,
    auth: Option<&str>,
    sender: &ReversePath,
    rcpt: &Address,
    rule: Rule,
    reply: &Reply,
) {
    tracing::info!(target: "maillog", %client, auth = %auth.unwrap_or("-"), from = %sender,
        to = %format_args!("<{rcpt}>"), rule = %rule.as_str(), reply = %reply.one_line(),
        "recipient refused");
}

/// A recipient was accepted (debug level: the accepted message line lists them all).
/// A MAIL or RCPT over a `[[rate_limit]]` (451 4.7.1): which limit, which key.
pub fn rate_limited(
    client: SocketAddr,
    sender: &ReversePath,
    over: &crate::policy::rate::Exceeded,
) {
    tracing::info!(target: "maillog", %client, from = %sender, limit = %over.limit,
        key = %over.key, counted = over.counted.as_str(), max = over.max,
        window = %crate::config::format_duration(over.window), rule = "rate_limit",
        "rate limit exceeded");
}

pub fn recipient_accepted(client: SocketAddr, rcpt: &Address, rule: Rule) {
    tracing::debug!(target: "maillog", %client, to = %format_args!("<{rcpt}>"),
        rule = %rule.as_str(), "recipient accepted");
}

/// A message is durably queued.
pub fn message_accepted<R: std::fmt::Display>(
    id: &str,
    client: SocketAddr,
    auth: Option<&str>,
    sender: &ReversePath,
    recipients: &[R],
    size: usize,
) {
    let to = recipients
        .iter()
        .map(|r| format!("<{r}>"))
        .collect::<Vec<_>>()
        .join(",");
    tracing::info!(target: "maillog", id = %id, %client, auth = %auth.unwrap_or("-"), from = %sender,
        to = %to, nrcpt = recipients.len(), size,
        "message accepted");
}

/// `[authentication]`'s results for one message: `spf=... dkim=... dmarc=...`.
pub fn authentication(id: &str, client: SocketAddr, results: &str) {
    tracing::info!(target: "maillog", id = %id, %client, "authentication {results}");
}

/// A message from a client that is not checked carried an Authentication-Results: field
/// with our authserv-id; it was removed.
pub fn forged_results_removed(id: &str, client: SocketAddr) {
    tracing::info!(target: "maillog", id = %id, %client,
        "forged Authentication-Results removed");
}

/// `[authentication]` enforcement refused a message.
pub fn authentication_refused(id: &str, client: SocketAddr, reply: &Reply) {
    tracing::info!(target: "maillog", id = %id, %client, reply = %reply.one_line(),
        "message refused by authentication checks");
}

/// A relayed message was signed with one `[[dkim]]` key.
pub fn dkim_signed(id: &str, domain: &str, selector: &str, algorithm: crate::dkim::key::Algorithm) {
    tracing::info!(target: "maillog", id = %id, d = %domain, s = %selector,
        a = algorithm.signature_name(), "dkim signed");
}

/// A relayed message from one of our signing domains left unsigned, and why (there
/// should be none: the `postern_dkim_unsigned_total` counter says whether there were).
pub fn dkim_unsigned(id: &str, why: &str) {
    tracing::warn!(target: "maillog", id = %id, why = %why, "dkim not signed");
}

/// A filter acted on a message (interface: every action logs the rule, the message id,
/// the sender and the recipients).
pub fn filtered(
    id: &str,
    client: SocketAddr,
    rule: &str,
    action: &str,
    reason: &str,
    sender: &ReversePath,
    recipients: &[Address],
) {
    tracing::info!(target: "maillog", id = %id, %client, rule = %rule, action = %action,
        reason = %reason, from = %sender, to = %RecipientList(recipients),
        "message filtered");
}

/// A milter's decision at a stage (`connect`, `helo`, `mail`, `rcpt`, `data`, `header`,
/// `eoh`, `body`, `eom`): `continue` at debug level, every other at info. `changes`
/// summarises what it changed at end of message; `reply` is its own SMTP reply, if it
/// gave one.
pub fn milter_decision(
    milter: &str,
    stage: &str,
    action: &str,
    client: SocketAddr,
    changes: &str,
    reply: &str,
) {
    if action == "continue" && changes.is_empty() {
        tracing::debug!(target: "maillog", milter = %milter, stage = %stage, action = %action,
            %client, "milter decision");
    } else {
        tracing::info!(target: "maillog", milter = %milter, stage = %stage, action = %action,
            %client, changes = %changes, reply = %reply, "milter decision");
    }
}

/// A milter failed (connect, timeout, protocol error, closed, not a milter);
/// `on_failure` says what became of the mail.
pub fn milter_failed(
    milter: &str,
    stage: &str,
    client: SocketAddr,
    error: &dyn Display,
    on_failure: &str,
) {
    tracing::warn!(target: "maillog", milter = %milter, stage = %stage, %client,
        %error, on_failure = %on_failure,
        "milter failed: {error}; on_failure={on_failure}");
}

/// A milter gave an address (or an ESMTP argument) Postern cannot carry; it was left out.
pub fn milter_bad_address(milter: &str, client: SocketAddr, value: &str) {
    let value: String = value.chars().take(200).collect();
    tracing::warn!(target: "maillog", milter = %milter, %client, value = %value.escape_debug(),
        "milter change ignored: not a mailbox or ESMTP argument Postern carries");
}

/// A message could not be stored; the client got a 4xx and will retry.
pub fn message_store_failed(
    client: SocketAddr,
    sender: &ReversePath,
    error: &dyn std::fmt::Display,
) {
    tracing::error!(target: "maillog", %client, from = %sender, %error,
        "message not accepted: spool write failed");
}

/// Formats recipients as `<a@x>,<b@y>`.
struct RecipientList<'a>(&'a [Address]);

impl std::fmt::Display for RecipientList<'_> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        for (i, a) in self.0.iter().enumerate() {
            if i > 0 {
                f.write_str(",")?;
            }
            write!(f, "<{a}>")?;
        }
        Ok(())
    }
}

// --- SMTP AUTH ----------------------------------------------------------------------------
// `user` is the name as the client gave it, already made safe for a log line by the
// caller (auth::LogName); `until` says how long a lockout lasts.

/// AUTH succeeded (235).
pub fn auth_ok(client: IpAddr, user: &dyn Display, mechanism: &str) {
    tracing::info!(target: "maillog", client = %client, user = %user, mechanism = %mechanism, "auth ok");
}

/// AUTH failed (535); `reason` is "unknown user" or "wrong password".
pub fn auth_failed(client: IpAddr, user: &dyn Display, reason: &str) {
    tracing::warn!(target: "maillog", client = %client, user = %user, reason = %reason, "auth failed");
}

/// A failure started a lockout of `scope` ("ip" or "user").
pub fn auth_lockout(client: IpAddr, user: &dyn Display, scope: &str, until: &dyn Display) {
    tracing::warn!(target: "maillog", client = %client, user = %user, scope = %scope,
        until = %until, "auth lockout");
}

/// AUTH answered 454 because of a lockout in force.
pub fn auth_refused(client: IpAddr, user: &dyn Display, scope: &str, until: &dyn Display) {
    tracing::info!(target: "maillog", client = %client, user = %user, scope = %scope,
        until = %until, "auth refused: locked out");
}

// --- the spool ------------------------------------------------------------------------------

/// Replay skipped damaged bytes of a segment.
pub fn spool_corruption(segment: &str, offset: u64, skipped: u64) {
    tracing::warn!(target: "maillog", segment = %segment, offset, bytes_skipped = skipped,
        "spool corruption: {skipped} bytes skipped in segment {segment}");
}

/// `postern quarantine release` put a held message back in the queue.
pub fn released(id: &dyn Display, rule: &str, sender: &str, nrcpt: usize) {
    tracing::info!(target: "maillog", id = %id, rule = %rule, from = %format_args!("<{sender}>"),
        nrcpt, "released from quarantine");
}

/// `postern queue delete` removed a message.
pub fn message_deleted(id: &dyn Display) {
    tracing::info!(target: "maillog", id = %id, "message deleted by the operator");
}

// --- delivery -------------------------------------------------------------------------------
// `id` is a queue id; `to` a recipient as stored (without angle brackets).

/// A message's body could not be read back from the spool for an attempt.
pub fn unreadable(id: &dyn Display, why: &dyn Display) {
    tracing::error!(target: "maillog", id = %id, error = %why, "cannot read message from the spool");
}

/// A recipient failed because the message outlived `max_queue_lifetime`.
pub fn expired(id: &dyn Display, to: &str) {
    tracing::info!(target: "maillog", id = %id, to = %format_args!("<{to}>"),
        status = "expired", "delivery failed: queue lifetime exceeded");
}

/// Every recipient of a message is final.
pub fn finished(id: &dyn Display) {
    tracing::debug!(target: "maillog", id = %id, "message finished");
}

/// Some recipients wait for the next attempt.
pub fn deferred(id: &dyn Display, attempts: u32, retry_in: &str) {
    tracing::info!(target: "maillog", id = %id, attempts, retry_in = %retry_in, "message deferred");
}

/// The outcome of one attempt for one recipient.
pub fn delivery(
    id: &dyn Display,
    to: &str,
    relay: &dyn Display,
    host: &str,
    status: &str,
    reply: &str,
) {
    tracing::info!(target: "maillog", id = %id, to = %format_args!("<{to}>"), relay = %relay,
        host = %host, status, reply = %reply, "delivery");
}

/// A failed null-sender message gets no bounce (RFC 5321 4.5.5); `why` says what became
/// of it instead.
pub fn no_bounce(id: &dyn Display, why: &str) {
    tracing::warn!(target: "maillog", id = %id, "no bounce for a null-sender message{why}");
}

/// A report on failed recipients was queued: a bounce to the sender, or a notice to the
/// postmaster.
pub fn report_queued(id: &dyn Display, original: &dyn Display, to: &str, notice: bool) {
    if notice {
        tracing::info!(target: "maillog", id = %id, original = %original, to = %format_args!("<{to}>"),
            "no bounce for a null-sender message; postmaster notice queued");
    } else {
        tracing::info!(target: "maillog", id = %id, original = %original, to = %format_args!("<{to}>"),
            "bounce queued");
    }
}

/// A host cannot take this message (SIZE, 8BITMIME, SMTPUTF8); the next one is tried.
pub fn host_cannot_take(id: &dyn Display, host: &str, addr: SocketAddr, reply: &str) {
    tracing::info!(target: "maillog", id = %id, host = %host, %addr, reply = %reply,
        "host cannot take this message; trying the next");
}

/// The best MX host of a domain is this server (RFC 5321 5.1).
pub fn mx_loop(domain: &str) {
    tracing::warn!(target: "maillog", domain, "mail for the domain loops back to this server (best MX is us)");
}
