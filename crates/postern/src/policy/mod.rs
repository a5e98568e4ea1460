//! The relay policy: may this client send to this recipient?
//!
//! A pure function over a small closed vocabulary (accepted domains, trusted networks,
//! authenticated relay, open relay, the recipients list), evaluated per RCPT TO. It
//! never reads message content (that is the filter's business, and a filter never
//! grants relay) and does no I/O: the recipients list is loaded once, beforehand.
//! Every decision names the rule that made it, for the log and for `check-config`.
//!
//! Trust: the recipient has already been parsed and canonicalised by
//! `postern_smtp::address` (domain lower-cased, trailing dot removed, literals parsed,
//! source route dropped, routing characters flagged). The client address comes from
//! the socket; the authenticated identity from a successful SMTP AUTH.

pub mod dnsbl;
pub mod rate;
pub mod tricks;
pub mod window;
mod recipients;

use std::collections::HashSet;
use std::fmt;
use std::net::IpAddr;

use ipnet::IpNet;
use postern_smtp::{Address, Domain, Reply, catalogue};

pub use recipients::{RecipientList, RecipientListError};

use crate::config::Relay;

/// Who is asking, as far as relaying is concerned.
#[derive(Clone, Copy, Debug)]
pub struct Client<'a> {
    pub ip: IpAddr,
    /// The SMTP AUTH identity, if the client authenticated.
    pub authenticated: Option<&'a str>,
    /// The `relay.dnsbl` zone that lists the client, if one does (looked up by the
    /// caller; only asked for clients that are neither trusted nor authenticated).
    pub dnsbl: Option<&'a str>,
}

/// What the caller found out about one RCPT beyond the address and the client (the
/// policy does no I/O: these come from the authenticator, the session and `ourselves`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// The authenticated client may not use this MAIL FROM (`[auth] restrict_senders`,
    /// Postfix's reject_sender_login_mismatch).
    pub sender_not_owned: bool,
    /// The client wrote `<Postmaster>` or `postmaster@` our hostname, and the session made
    /// it the configured postmaster address (RFC 5321 4.5.1).
    pub postmaster: bool,
    /// The recipient is an address literal that is this server.
    pub literal_is_us: bool,
}

/// The rule that decided, named in the log line for every RCPT.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Rule {
    /// The recipient is in an accepted domain (anonymous inbound).
    AcceptedDomain,
    /// The client is in `trusted_networks` (outbound relay for internal servers).
    TrustedNetwork,
    /// The client authenticated and `authenticated_relay` is on.
    Authenticated,
    /// `open_relay = true`.
    OpenRelay,
    /// A `%`, `!` or `@` in the local part from a client we do not trust: a next hop
    /// could read it as a further route (the percent hack, bang paths, quoted `@`).
    RoutedAddress,
    /// Not in `recipients_file`.
    UnknownRecipient,
    /// None of the above allows this destination.
    RelayDenied,
    /// The client is listed in a DNS blocklist (`relay.dnsbl`).
    Dnsbl,
    /// An authenticated user used a sender address that is not theirs
    /// (`[auth] restrict_senders`).
    SenderNotOwned,
    /// `<Postmaster>`, `postmaster@` our hostname or an accepted domain: RFC 5321 4.5.1
    /// says it must be accepted, from anyone, whatever `recipients_file` says.
    Postmaster,
    /// An address literal (`user@[ip]`) that is this server: with no local delivery,
    /// relaying it would loop back here.
    LiteralIsUs,
    /// A `[[rate_limit]]` would be exceeded (451 4.7.1; `policy::rate`). Decided in the
    /// session after the rules above accepted, never by `decide`.
    RateLimit,
}

impl Rule {
    /// Every rule, in declaration order (`rule as usize` is its index here): what the
    /// metrics, the decision log and `check-config` name.
    pub const ALL: [Rule; 12] = [
        Rule::AcceptedDomain,
        Rule::TrustedNetwork,
        Rule::Authenticated,
        Rule::OpenRelay,
        Rule::RoutedAddress,
        Rule::UnknownRecipient,
        Rule::RelayDenied,
        Rule::Dnsbl,
        Rule::SenderNotOwned,
        Rule::Postmaster,
        Rule::LiteralIsUs,
        Rule::RateLimit,
    ];

    /// True for the rules that refuse a recipient, false for those that accept one.
    pub fn refuses(self) -> bool {
        match self {
            Rule::RoutedAddress
            | Rule::UnknownRecipient
            | Rule::RelayDenied
            | Rule::Dnsbl
            | Rule::SenderNotOwned
            | Rule::LiteralIsUs
            | Rule::RateLimit => true,
            Rule::AcceptedDomain
            | Rule::TrustedNetwork
            | Rule::Authenticated
            | Rule::OpenRelay
            | Rule::Postmaster => false,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Rule::AcceptedDomain => "accepted_domain",
            Rule::TrustedNetwork => "trusted_network",
            Rule::Authenticated => "authenticated_relay",
            Rule::OpenRelay => "open_relay",
            Rule::RoutedAddress => "routed_address",
            Rule::UnknownRecipient => "unknown_recipient",
            Rule::RelayDenied => "relay_denied",
            Rule::SenderNotOwned => "sender_not_owned",
            Rule::Dnsbl => "dnsbl",
            Rule::Postmaster => "postmaster",
            Rule::LiteralIsUs => "literal_is_us",
            Rule::RateLimit => "rate_limit",
        }
    }
}

impl fmt::Display for Rule {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// The outcome of one check.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Decision {
    Accept(Rule),
    Refuse(Rule, Reply),
}

impl Decision {
    pub fn rule(&self) -> Rule {
        match self {
            Decision::Accept(r) | Decision::Refuse(r, _) => *r,
        }
    }

    /// The answer for the SMTP session.
    pub fn into_result(self) -> Result<(), Reply> {
        match self {
            Decision::Accept(_) => Ok(()),
            Decision::Refuse(_, reply) => Err(reply),
        }
    }
}

/// The relay rules, validated and ready to evaluate.
#[derive(Debug, Default)]
pub struct RelayPolicy {
    accepted_domains: HashSet<String>,
    trusted_networks: Vec<IpNet>,
    authenticated_relay: bool,
    open_relay: bool,
    recipients: Option<RecipientList>,
}

impl RelayPolicy {
    /// Builds the policy from the `[relay]` section and the loaded recipients list.
    pub fn new(relay: &Relay, recipients: Option<RecipientList>) -> RelayPolicy {
        RelayPolicy {
            accepted_domains: relay.accepted_domains.iter().cloned().collect(),
            trusted_networks: relay.trusted_networks.clone(),
            authenticated_relay: relay.authenticated_relay,
            open_relay: relay.open_relay,
            recipients,
        }
    }

    /// True when the client needs no DNSBL lookup: trusted, or authenticated.
    pub fn dnsbl_exempt(&self, ip: IpAddr, authenticated: bool) -> bool {
        authenticated || self.is_trusted(ip)
    }

    /// True when the client is in `trusted_networks`.
    pub fn is_trusted(&self, ip: IpAddr) -> bool {
        let ip = canonical_ip(ip);
        self.trusted_networks.iter().any(|n| n.contains(&ip))
    }

    /// True when `domain` is one we accept mail for from anyone.
    /// Compared in A-label form (IDNA), as the configuration stores them.
    pub fn is_accepted_domain(&self, domain: &Domain) -> bool {
        domain
            .ascii_name()
            .is_some_and(|d| self.accepted_domains.contains(d.as_ref()))
    }

    /// The decision for one RCPT TO. Rules, in order:
    /// -. `postmaster@` an accepted domain is accepted from anyone (RFC 5321 4.5.1);
    /// 0. a client neither trusted nor authenticated that a DNS blocklist lists is refused;
    /// 1. from a client neither trusted nor authenticated-with-relay, a routed local part
    ///    is refused whatever the domain (and even on an open relay);
    /// 2. an accepted domain is accepted from anyone, subject to `recipients_file`;
    /// 3. any other destination needs a trusted network, an authenticated client with
    ///    `authenticated_relay`, or `open_relay`;
    /// 4. otherwise 554 5.7.1.
    pub fn decide(&self, client: Client<'_>, recipient: &Address) -> Decision {
        self.decide_with(client, recipient, Facts::default())
    }

    /// [`RelayPolicy::decide`], with what the caller found out first, in this order: a
    /// sender the authenticated user does not own is refused (`sender_not_owned`); the
    /// postmaster is accepted from anyone (RFC 5321 4.5.1); an address literal that is
    /// this server is refused for every client, trusted ones too (`literal_is_us`: with no
    /// local delivery it would loop back here, RFC 5321 5.1).
    pub fn decide_with(&self, client: Client<'_>, recipient: &Address, facts: Facts) -> Decision {
        if facts.sender_not_owned {
            return Decision::Refuse(Rule::SenderNotOwned, catalogue::sender_not_owned());
        }
        if facts.postmaster {
            return Decision::Accept(Rule::Postmaster);
        }
        if facts.literal_is_us {
            return Decision::Refuse(Rule::LiteralIsUs, catalogue::literal_is_us());
        }
        self.relay(client, recipient)
    }

    /// The relay rules proper (see [`RelayPolicy::decide`]).
    fn relay(&self, client: Client<'_>, recipient: &Address) -> Decision {
        let privileged = if self.is_trusted(client.ip) {
            Some(Rule::TrustedNetwork)
        } else if client.authenticated.is_some() && self.authenticated_relay {
            Some(Rule::Authenticated)
        } else {
            None
        };
        // RFC 5321 4.5.1: postmaster is a valid mailbox of every domain we take mail
        // for, from anyone (a listed client may be writing to ask why), whether or not
        // the recipients list names it. Only the plain local part: `postmaster%x` is not.
        if recipient.local().eq_ignore_ascii_case("postmaster")
            && self.is_accepted_domain(recipient.domain())
        {
            return Decision::Accept(Rule::Postmaster);
        }
        // Interface: blocklists apply to neither trusted nor authenticated clients.
        if privileged.is_none()
            && client.authenticated.is_none()
            && let Some(zone) = client.dnsbl
        {
            return Decision::Refuse(Rule::Dnsbl, catalogue::dnsbl_listed(client.ip, zone));
        }
        if privileged.is_none() && recipient.is_routed() {
            return Decision::Refuse(Rule::RoutedAddress, catalogue::relay_denied());
        }
        if self.is_accepted_domain(recipient.domain()) {
            if let Some(list) = &self.recipients
                && !list.contains(recipient)
            {
                return Decision::Refuse(Rule::UnknownRecipient, catalogue::unknown_user());
            }
            return Decision::Accept(Rule::AcceptedDomain);
        }
        match privileged {
            Some(rule) => Decision::Accept(rule),
            None if self.open_relay => Decision::Accept(Rule::OpenRelay),
            None => Decision::Refuse(Rule::RelayDenied, catalogue::relay_denied()),
        }
    }
}

/// An IPv4 client seen on a dual-stack socket arrives as `::ffff:a.b.c.d`; networks
/// are written in IPv4, so compare in IPv4.
pub fn canonical_ip(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => v6.to_ipv4_mapped().map_or(ip, IpAddr::V4),
        v4 => v4,
    }
}

/// The block a client address is counted in for per-client limits (connections,
/// AUTH lockout): an IPv4 address alone, an IPv6 address with only its first
/// `ipv6_prefix` bits kept. One IPv6 end site usually holds a whole /64 (RFC 6177),
/// so counting per /128 would give an attacker 2^64 fresh "clients".
pub fn client_block(ip: IpAddr, ipv6_prefix: u8) -> IpAddr {
    match canonical_ip(ip) {
        IpAddr::V6(v6) => {
            let bits = u32::from(ipv6_prefix.min(128));
            let mask = u128::MAX.checked_shl(128 - bits).unwrap_or(0);
            IpAddr::V6((u128::from(v6) & mask).into())
        }
        v4 => v4,
    }
}

/// Default for `ipv6_prefix`: a /64, the usual IPv6 end-site subnet.
pub const DEFAULT_IPV6_PREFIX: u8 = 64;

#[cfg(test)]
mod tests;
