//! DNS blocklists (RFC 5782): is the connecting client listed in one of `relay.dnsbl`?
//!
//! The client's address is looked up once per connection, when its first recipient is
//! checked, and only for clients that are neither trusted nor authenticated (the policy
//! never refuses those on a blocklist). IPv4 addresses are queried with their octets
//! reversed (`2.0.0.127.zen.example`), IPv6 with their 32 nibbles reversed (RFC 5782 2.4).
//! A listing is an A record in 127.0.0.0/8 other than 127.0.0.1 and the 127.255.255.0/24
//! block that some lists use to report errors (those, and lookup failures, count as "not
//! listed" and are logged: a broken list must not stop mail).
//!
//! Trust: DNS answers are hostile input; only the address class is looked at.

use std::fmt::Write as _;
use std::net::{IpAddr, Ipv4Addr};

use crate::dns::{ResolveError, Resolver};
use crate::policy::canonical_ip;

/// The configured zones and the resolver to ask.
pub struct Dnsbl {
    zones: Vec<String>,
    resolver: Resolver,
}

impl Dnsbl {
    pub fn new(zones: Vec<String>, resolver: Resolver) -> Dnsbl {
        Dnsbl { zones, resolver }
    }

    /// The first zone (in configuration order) listing `ip`, if any. Zones are queried
    /// concurrently.
    pub async fn check(&self, ip: IpAddr) -> Option<String> {
        let ip = canonical_ip(ip);
        let mut tasks = tokio::task::JoinSet::new();
        for (i, zone) in self.zones.iter().enumerate() {
            let (resolver, name) = (self.resolver.clone(), query_name(ip, zone));
            tasks.spawn(async move { (i, resolver.ipv4_addresses(&name).await) });
        }
        let mut results: Vec<_> = tasks.join_all().await;
        results.sort_by_key(|(i, _)| *i);
        let mut listed = None;
        for (i, result) in results {
            let zone = &self.zones[i];
            match result {
                Ok(addrs) => {
                    if addrs.iter().any(|a| is_listing(*a)) {
                        listed = listed.or_else(|| Some(zone.clone()));
                    } else if let Some(odd) = addrs.first() {
                        tracing::warn!(%ip, zone = %zone, answer = %odd,
                            "DNSBL answered with a non-listing code; treated as not listed");
                    }
                }
                Err(ResolveError::NoSuchDomain) | Err(ResolveError::NoAddress) => {}
                Err(e) => {
                    tracing::warn!(%ip, zone = %zone, error = %e,
                        "DNSBL lookup failed; treated as not listed");
                }
            }
        }
        listed
    }
}

fn is_listing(a: Ipv4Addr) -> bool {
    let o = a.octets();
    o[0] == 127 && a != Ipv4Addr::new(127, 0, 0, 1) && !(o[1] == 255 && o[2] == 255)
}

/// The DNS name to query for `ip` in `zone` (RFC 5782 2.1 and 2.4).
pub fn query_name(ip: IpAddr, zone: &str) -> String {
    let mut name = String::new();
    match ip {
        IpAddr::V4(v4) => {
            for octet in v4.octets().iter().rev() {
                let _ = write!(name, "{octet}.");
            }
        }
        IpAddr::V6(v6) => {
            for byte in v6.octets().iter().rev() {
                let _ = write!(name, "{:x}.{:x}.", byte & 0xf, byte >> 4);
            }
        }
    }
    name.push_str(zone.trim_end_matches('.'));
    name
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("192.0.2.99".parse().unwrap(), "zen.example."),
            "99.2.0.192.zen.example"
        );
        // RFC 5782 2.4's example.
        assert_eq!(
            query_name(
                "2001:db8:1:2:3:4:567:89ab".parse().unwrap(),
                "ugly.example.com"
            ),
            "b.a.9.8.7.6.5.0.4.0.0.0.3.0.0.0.2.0.0.0.1.0.0.0.8.b.d.0.1.0.0.2.ugly.example.com"
        );
    }

    #[test]
    fn listing_codes() {
        assert!(is_listing(Ipv4Addr::new(127, 0, 0, 2)));
        assert!(is_listing(Ipv4Addr::new(127, 0, 0, 10)));
        assert!(!is_listing(Ipv4Addr::new(127, 0, 0, 1)));
        assert!(!is_listing(Ipv4Addr::new(127, 255, 255, 254)));
        assert!(!is_listing(Ipv4Addr::new(10, 0, 0, 2)));
    }
}
