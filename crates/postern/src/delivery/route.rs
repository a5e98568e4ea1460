//! Routing: which next hop a recipient's domain goes to (`[[route]]`, first match wins,
//! unmatched domains by MX), and the grouping of a message's recipients by next hop so
//! that each destination gets one transaction for all of its recipients.
//!
//! Trust: recipients come from our own spool, canonicalised by the SMTP parser when they
//! were accepted (`local@domain`, domain lower-case, literals as `[ip]`/`[IPv6:ip]`).

use std::net::{IpAddr, SocketAddr};

use crate::config::{NextHop, Route};

/// Where to connect for a group of recipients.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum Destination {
    /// Look up the domain's MX records (RFC 5321 5.1) and use `mx_port`.
    Mx(String),
    /// A fixed host (A/AAAA, no MX lookup) and port.
    Host(String, u16),
    /// A fixed address (`[ip]:port`, or an address-literal recipient domain).
    Ip(SocketAddr),
}

impl std::fmt::Display for Destination {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Destination::Mx(d) => write!(f, "{d} (MX)"),
            Destination::Host(h, p) => write!(f, "{h}:{p}"),
            Destination::Ip(a) => write!(f, "{a}"),
        }
    }
}

/// A destination plus the route whose TLS/AUTH settings apply (`None`: the default
/// route, MX with opportunistic TLS).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct NextHopKey {
    pub route: Option<usize>,
    pub destination: Destination,
}

/// The domain of a canonical recipient (after the last `@`: a quoted local part may
/// hold another).
pub fn domain_of(recipient: &str) -> &str {
    recipient.rsplit_once('@').map_or("", |(_, d)| d)
}

/// The next hop for a recipient domain.
pub fn next_hop(routes: &[Route], domain: &str, mx_port: u16) -> NextHopKey {
    // An address literal names its host: no lookup and no route can apply.
    if let Some(ip) = parse_literal(domain) {
        return NextHopKey {
            route: None,
            destination: Destination::Ip(SocketAddr::new(ip, mx_port)),
        };
    }
    // Routes, MX lookups and connection grouping all use the A-label form (IDNA), so a
    // U-label recipient domain meets the same route and the same DNS name.
    let domain = &*postern_smtp::address::ascii_domain(domain);
    for (i, route) in routes.iter().enumerate() {
        if route.matches(domain) {
            let destination = match &route.next_hop {
                NextHop::Mx => Destination::Mx(domain.to_string()),
                NextHop::Host { host, port } => Destination::Host(host.clone(), *port),
                NextHop::Ip(addr) => Destination::Ip(*addr),
            };
            return NextHopKey {
                route: Some(i),
                destination,
            };
        }
    }
    NextHopKey {
        route: None,
        destination: Destination::Mx(domain.to_string()),
    }
}

fn parse_literal(domain: &str) -> Option<IpAddr> {
    let inner = domain.strip_prefix('[')?.strip_suffix(']')?;
    let inner = inner.strip_prefix("IPv6:").unwrap_or(inner);
    inner.parse().ok()
}

/// Groups recipient indexes by next hop, keeping first-seen order.
pub fn group<'a>(
    routes: &[Route],
    mx_port: u16,
    recipients: impl Iterator<Item = (usize, &'a str)>,
) -> Vec<(NextHopKey, Vec<usize>)> {
    let mut groups: Vec<(NextHopKey, Vec<usize>)> = Vec::new();
    for (index, rcpt) in recipients {
        let key = next_hop(routes, domain_of(rcpt), mx_port);
        match groups.iter_mut().find(|(k, _)| *k == key) {
            Some((_, v)) => v.push(index),
            None => groups.push((key, vec![index])),
        }
    }
    groups
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;
    use std::path::Path;

    fn routes() -> Vec<Route> {
        let text = r#"
[[route]]
domains = ["internal.test", "company.test"]
next_hop = "[10.0.0.5]:25"
[[route]]
domains = ["partner.test"]
next_hop = "smtp.partner.test:587"
[[route]]
domains = ["*"]
next_hop = "mx"
"#;
        Config::from_str(text, Path::new("t.toml")).unwrap().routes
    }

    #[test]
    fn first_match_wins_and_default_is_mx() {
        let r = routes();
        let hop = next_hop(&r, "company.test", 25);
        assert_eq!(hop.route, Some(0));
        assert_eq!(
            hop.destination,
            Destination::Ip("10.0.0.5:25".parse().unwrap())
        );
        let hop = next_hop(&r, "partner.test", 25);
        assert_eq!(
            hop.destination,
            Destination::Host("smtp.partner.test".into(), 587)
        );
        let hop = next_hop(&r, "other.test", 2525);
        assert_eq!(hop.route, Some(2));
        assert_eq!(hop.destination, Destination::Mx("other.test".into()));
        assert_eq!(next_hop(&[], "x.test", 25).route, None);
    }

    #[test]
    fn literals_go_straight_to_the_address() {
        let hop = next_hop(&routes(), "[IPv6:::1]", 2525);
        assert_eq!(
            hop.destination,
            Destination::Ip("[::1]:2525".parse().unwrap())
        );
        assert_eq!(domain_of("\"a@b\"@c.test"), "c.test");
    }

    #[test]
    fn grouping_per_next_hop() {
        let r = routes();
        let rcpts = [
            "a@internal.test",
            "b@other.test",
            "c@company.test",
            "d@other.test",
            "e@third.test",
        ];
        let groups = group(&r, 25, rcpts.iter().copied().enumerate());
        let shape: Vec<Vec<usize>> = groups.into_iter().map(|(_, v)| v).collect();
        assert_eq!(shape, vec![vec![0, 2], vec![1, 3], vec![4]]);
    }
}
