//! The relay tricks: every way we know of to make a relay pass mail to a destination that
//! is not its own, in one list. `postern self-test` runs them through the configured
//! policy (`crate::simulate`), the policy's unit tests run them against a policy with
//! accepted domains, and the integration tests send them over real SMTP; all three read
//! [`TRICKS`], so a trick added here is tested everywhere.
//!
//! A trick is a MAIL FROM path and a RCPT TO argument, written as templates whose target
//! domains come from the configuration ([`Targets`]): `{a}` an accepted domain, `{o}` a
//! domain outside it, `{h}` our host name, and variants of them (below). A trick "is
//! relayed" when a recipient is accepted for a destination that is not one of our
//! accepted domains ([`is_relayed`]): accepting `user@accepted` is inbound mail, not
//! relaying; accepting `user%other@accepted` is relaying, because the next hop may read
//! the `%` as a route (RFC 1123 5.2.16 made the percent hack a convention).
//!
//! Trust: the templates are ours; the targets are the operator's configuration.

use postern_smtp::Address;

use super::{Decision, RelayPolicy};
use crate::config::Config;

/// One trick: how it is sent and what it tests.
#[derive(Clone, Copy, Debug)]
pub struct Trick {
    /// A short name, as `self-test` prints it.
    pub name: &'static str,
    /// The MAIL FROM path (template).
    pub from: &'static str,
    /// Exactly what follows `RCPT TO:` (template), angle brackets included when there.
    pub to: &'static str,
    /// What it tests, in words.
    pub tests: &'static str,
}

/// The sender most tricks use: an outside address, as a spammer's would be.
const FROM: &str = "<probe@{o}>";

/// Every trick. Template tokens: `{a}` / `{o}` an accepted / outside domain, `{A}` / `{O}`
/// the same in upper case, `{h}` our host name, `{a~}` the accepted domain with a Latin
/// letter replaced by its Cyrillic look-alike and `{a~idna}` that in A-label form,
/// `{a-wide}` its first letter in full width (IDNA maps it back), `{o。}` the outside
/// domain with ideographic full stops (U+3002, IDNA reads them as dots).
pub const TRICKS: &[Trick] = &[
    Trick {
        name: "plain outside domain",
        from: FROM,
        to: "<user@{o}>",
        tests: "the relay check itself (554 5.7.1)",
    },
    Trick {
        name: "outside domain, upper case",
        from: FROM,
        to: "<USER@{O}>",
        tests: "domains compared without case",
    },
    Trick {
        name: "outside domain, trailing dot",
        from: FROM,
        to: "<user@{o}.>",
        tests: "a trailing dot removed before the check",
    },
    Trick {
        name: "percent hack",
        from: FROM,
        to: "<user%{o}@{a}>",
        tests: "`%` in the local part routes onward (RFC 1123 5.2.16)",
    },
    Trick {
        name: "double percent hack",
        from: FROM,
        to: "<user%{o}%{a}@{a}>",
        tests: "nested percent routes",
    },
    Trick {
        name: "percent hack, upper case",
        from: FROM,
        to: "<USER%{O}@{A}>",
        tests: "routed local parts found whatever the case",
    },
    Trick {
        name: "bang path",
        from: FROM,
        to: "<{o}!user@{a}>",
        tests: "UUCP `host!user` in the local part",
    },
    Trick {
        name: "double bang path",
        from: FROM,
        to: "<{o}!{a}!user@{a}>",
        tests: "a longer UUCP path",
    },
    Trick {
        name: "quoted @",
        from: FROM,
        to: "<\"user@{o}\"@{a}>",
        tests: "an `@` inside a quoted local part",
    },
    Trick {
        name: "quoted percent",
        from: FROM,
        to: "<\"user%{o}\"@{a}>",
        tests: "a `%` inside a quoted local part",
    },
    Trick {
        name: "quoted bang",
        from: FROM,
        to: "<\"{o}!user\"@{a}>",
        tests: "a `!` inside a quoted local part",
    },
    Trick {
        name: "quoted-pair @",
        from: FROM,
        to: "<\"user\\@{o}\"@{a}>",
        tests: "an escaped `@` inside a quoted local part",
    },
    Trick {
        name: "quoted source route",
        from: FROM,
        to: "<\"@{o}:user\"@{a}>",
        tests: "a source route hidden in a quoted local part",
    },
    Trick {
        name: "two @",
        from: FROM,
        to: "<user@{o}@{a}>",
        tests: "`user@other@accepted` is a syntax error (501 5.1.3)",
    },
    Trick {
        name: "two @, reversed",
        from: FROM,
        to: "<user@{a}@{o}>",
        tests: "`user@accepted@other` is a syntax error",
    },
    Trick {
        name: "quoted local part, two @",
        from: FROM,
        to: "<\"user\"@{o}@{a}>",
        tests: "a second domain after a quoted local part",
    },
    Trick {
        name: "source route to outside",
        from: FROM,
        to: "<@{a}:user@{o}>",
        tests: "the route is ignored, the mailbox decides (RFC 5321 appendix C)",
    },
    Trick {
        name: "source route, two hops",
        from: FROM,
        to: "<@{a},@{a}:user@{o}>",
        tests: "a longer route, the mailbox decides",
    },
    Trick {
        name: "source route with percent hack",
        from: FROM,
        to: "<@{a}:user%{o}@{a}>",
        tests: "a route and a routed local part",
    },
    Trick {
        name: "address literal, IPv4",
        from: FROM,
        to: "<user@[192.0.2.99]>",
        tests: "a literal is an outside destination",
    },
    Trick {
        name: "address literal, IPv6",
        from: FROM,
        to: "<user@[IPv6:2001:db8::99]>",
        tests: "an IPv6 literal is an outside destination",
    },
    Trick {
        name: "address literal, IPv4-mapped IPv6",
        from: FROM,
        to: "<user@[IPv6:::ffff:192.0.2.99]>",
        tests: "a mapped IPv4 address in an IPv6 literal",
    },
    Trick {
        name: "address literal, loopback (ours)",
        from: FROM,
        to: "<user@[127.0.0.1]>",
        tests: "a literal that is this server (it would loop)",
    },
    Trick {
        name: "address literal, IPv6 loopback",
        from: FROM,
        to: "<user@[IPv6:::1]>",
        tests: "an IPv6 literal that is this server",
    },
    Trick {
        name: "address literal with percent hack",
        from: FROM,
        to: "<user%{o}@[127.0.0.1]>",
        tests: "a routed local part at a literal",
    },
    Trick {
        name: "address literal, decimal",
        from: FROM,
        to: "<user@[3221226083]>",
        tests: "a literal not in dotted-quad form is a syntax error",
    },
    Trick {
        name: "address literal holding a name",
        from: FROM,
        to: "<user@[{a}]>",
        tests: "a domain name in brackets is a syntax error",
    },
    Trick {
        name: "IP address as a domain name",
        from: FROM,
        to: "<user@192.0.2.99>",
        tests: "digits written as a name are not an accepted domain",
    },
    Trick {
        name: "subdomain of an accepted domain",
        from: FROM,
        to: "<user@sub.{a}>",
        tests: "accepted domains match exactly, not their subdomains",
    },
    Trick {
        name: "accepted domain as a prefix",
        from: FROM,
        to: "<user@{a}.{o}>",
        tests: "no prefix matching",
    },
    Trick {
        name: "accepted domain as a suffix",
        from: FROM,
        to: "<user@evil{a}>",
        tests: "no suffix matching without a dot",
    },
    Trick {
        name: "UTF-8 look-alike domain",
        from: FROM,
        to: "<user@{a~}>",
        tests: "a Cyrillic letter in place of a Latin one is another domain",
    },
    Trick {
        name: "IDNA look-alike domain",
        from: FROM,
        to: "<user@{a~idna}>",
        tests: "the same look-alike in A-label (xn--) form",
    },
    Trick {
        name: "full-width letter",
        from: FROM,
        to: "<user%{o}@{a-wide}>",
        tests: "a full-width letter IDNA maps back, with a routed local part",
    },
    Trick {
        name: "ideographic full stops",
        from: FROM,
        to: "<user@{o。}>",
        tests: "U+3002 dots IDNA reads as dots: still outside",
    },
    Trick {
        name: "empty path",
        from: FROM,
        to: "<>",
        tests: "`<>` is no recipient (501 5.1.3)",
    },
    Trick {
        name: "no angle brackets",
        from: FROM,
        to: "user@{o}",
        tests: "a bare address is a syntax error",
    },
    Trick {
        name: "space before the path",
        from: FROM,
        to: " <user@{o}>",
        tests: "the tolerated space after `TO:` changes nothing",
    },
    Trick {
        name: "bare postmaster",
        from: FROM,
        to: "<Postmaster>",
        tests: "RFC 5321 4.5.1 <Postmaster>: our own mailbox, or decided like any recipient",
    },
    Trick {
        name: "postmaster at an outside domain",
        from: FROM,
        to: "<postmaster@{o}>",
        tests: "only our own postmaster is accepted from anyone",
    },
    Trick {
        name: "postmaster with percent hack",
        from: FROM,
        to: "<postmaster%{o}@{a}>",
        tests: "the postmaster exemption does not cover a routed local part",
    },
    Trick {
        name: "postmaster at our host name, routed",
        from: FROM,
        to: "<postmaster%{o}@{h}>",
        tests: "nor at our host name",
    },
    Trick {
        name: "our host name with percent hack",
        from: FROM,
        to: "<user%{o}@{h}>",
        tests: "our own name is not a way through",
    },
    Trick {
        name: "localhost",
        from: FROM,
        to: "<user@localhost>",
        tests: "`localhost` is not an accepted domain",
    },
    Trick {
        name: "sender spoofing an accepted domain",
        from: "<user@{a}>",
        to: "<user@{o}>",
        tests: "MAIL FROM our own domain grants nothing",
    },
    Trick {
        name: "sender spoofing our postmaster",
        from: "<postmaster@{h}>",
        to: "<user@{o}>",
        tests: "MAIL FROM our postmaster grants nothing",
    },
    Trick {
        name: "null sender to outside",
        from: "<>",
        to: "<user@{o}>",
        tests: "a bounce-like `<>` sender grants nothing",
    },
    Trick {
        name: "sender with a source route",
        from: "<@{a}:user@{a}>",
        to: "<user@{o}>",
        tests: "a routed sender grants nothing",
    },
];

/// The domains a trick is aimed at.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Targets {
    /// One of our accepted domains (our host name when there is none).
    pub accepted: String,
    /// A domain that is not ours.
    pub outside: String,
    /// Our host name.
    pub hostname: String,
}

impl Targets {
    /// The first accepted domain of `config` (else its host name), and `outside.example`
    /// (RFC 2606), or another name if that one is accepted.
    pub fn from_config(config: &Config) -> Targets {
        let accepted = config
            .relay
            .accepted_domains
            .first()
            .cloned()
            .unwrap_or_else(|| config.hostname.clone());
        let ours = |d: &str| config.relay.accepted_domains.iter().any(|a| a == d);
        let outside = ["outside.example", "outside-relay-test.example"]
            .into_iter()
            .find(|d| !ours(d) && *d != config.hostname)
            .unwrap_or("outside.invalid")
            .to_string();
        Targets {
            accepted,
            outside,
            hostname: config.hostname.clone(),
        }
    }
}

impl Trick {
    /// The MAIL FROM path for `targets`.
    pub fn from_path(&self, targets: &Targets) -> String {
        expand(self.from, targets)
    }

    /// What to send after `RCPT TO:` for `targets`.
    pub fn to_path(&self, targets: &Targets) -> String {
        expand(self.to, targets)
    }
}

/// True when accepting `recipient` with `decision` relays: it was accepted, and it is
/// neither a plain mailbox of an accepted domain (a routed local part counts as
/// relaying: the next hop decides where it goes) nor the configured postmaster the
/// session put in place of `<Postmaster>` (`rewritten_postmaster`: the operator's own
/// mailbox, which the client cannot choose).
pub fn is_relayed(
    policy: &RelayPolicy,
    recipient: &Address,
    decision: &Decision,
    rewritten_postmaster: bool,
) -> bool {
    match decision {
        Decision::Refuse(..) => false,
        Decision::Accept(_) if rewritten_postmaster => false,
        Decision::Accept(_) => {
            recipient.is_routed() || !policy.is_accepted_domain(recipient.domain())
        }
    }
}

fn expand(template: &str, t: &Targets) -> String {
    template
        .replace(
            "{a~idna}",
            &postern_smtp::address::ascii_domain(&homoglyph(&t.accepted)),
        )
        .replace("{a~}", &homoglyph(&t.accepted))
        .replace("{a-wide}", &full_width_first(&t.accepted))
        .replace("{o。}", &t.outside.replace('.', "\u{3002}"))
        .replace("{a}", &t.accepted)
        .replace("{A}", &t.accepted.to_uppercase())
        .replace("{o}", &t.outside)
        .replace("{O}", &t.outside.to_uppercase())
        .replace("{h}", &t.hostname)
}

/// `domain` with its first a, c, e, o, p or x replaced by the Cyrillic letter that looks
/// the same (or a Cyrillic `а` put in front when it has none).
fn homoglyph(domain: &str) -> String {
    let swap = |c: char| match c {
        'a' => Some('\u{430}'),
        'c' => Some('\u{441}'),
        'e' => Some('\u{435}'),
        'o' => Some('\u{43e}'),
        'p' => Some('\u{440}'),
        'x' => Some('\u{445}'),
        _ => None,
    };
    match domain
        .char_indices()
        .find_map(|(i, c)| swap(c).map(|s| (i, c, s)))
    {
        Some((i, c, s)) => format!("{}{s}{}", &domain[..i], &domain[i + c.len_utf8()..]),
        None => format!("\u{430}{domain}"),
    }
}

/// `domain` with its first character in full width (U+FF01..U+FF5E), if it is ASCII.
fn full_width_first(domain: &str) -> String {
    let mut chars = domain.chars();
    match chars.next() {
        Some(c) if c.is_ascii_graphic() => {
            let wide = char::from_u32(c as u32 + 0xFEE0).unwrap_or(c);
            format!("{wide}{}", chars.as_str())
        }
        _ => domain.to_string(),
    }
}
