//! Who "we" are on the network: our host name and the addresses our listeners answer on,
//! so that delivery never hands a message back to ourselves (a mail loop).
//!
//! RFC 5321 5.1: "if the SMTP client finds its own host name or address in the MX list it
//! MUST discard that and all records of equal or worse preference". Delivery asks
//! [`Ourselves::is_our_name`] for every MX host and [`Ourselves::is_us`] for each of its
//! addresses (with `mx_port`); the SMTP server may ask `is_us` for an address literal in
//! `RCPT TO:<user@[ip]>`.
//!
//! Trust: the configuration is ours; the names and addresses asked about come from DNS or
//! from a client and are untrusted, but they are only compared, never used otherwise.
//! The port matters: a delivery to 127.0.0.1:2526 while we listen on 127.0.0.1:2525 is not
//! a loop (tests run their sinks exactly like that).

use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::{Duration, Instant};

use crate::config::Config;

/// How long the list of interface addresses is reused before it is read again (addresses
/// come and go with DHCP, VPNs, containers; reading them is one system call).
const INTERFACES_TTL: Duration = Duration::from_secs(60);

/// Our host name and listeners, built once from the configuration; cheap to query and
/// safe to share between tasks (`Send + Sync`).
#[derive(Debug)]
pub struct Ourselves {
    /// `config.hostname`: ASCII, lower case, without a trailing dot.
    hostname: String,
    /// The listeners' addresses, IPv4-mapped IPv6 addresses canonicalised to IPv4.
    listeners: Vec<SocketAddr>,
    /// The local interface addresses and when they were read (`None`: not yet).
    interfaces: Mutex<Option<(Instant, Vec<IpAddr>)>>,
    /// `own_addresses`: ours on any port (NAT, port forwarding).
    extra: Vec<IpAddr>,
}

impl Ourselves {
    /// From the configuration: `hostname` and every `[[listener]]` address. A listener on
    /// port 0 (an ephemeral port, used in tests only) matches no address.
    pub fn from_config(config: &Config) -> Ourselves {
        let mut us = Ourselves::new(&config.hostname, config.listeners.iter().map(|l| l.address));
        us.extra = config.own_addresses.clone();
        us
    }

    /// From a host name and listener addresses (what [`Ourselves::from_config`] uses).
    pub fn new(hostname: &str, listeners: impl IntoIterator<Item = SocketAddr>) -> Ourselves {
        Ourselves {
            hostname: normalise_name(hostname),
            listeners: listeners
                .into_iter()
                .map(|a| SocketAddr::new(a.ip().to_canonical(), a.port()))
                .collect(),
            interfaces: Mutex::new(None),
            extra: Vec::new(),
        }
    }

    /// True when `host` is our host name: ASCII case-insensitive, a trailing dot ignored.
    pub fn is_our_name(&self, host: &str) -> bool {
        normalise_name(host) == self.hostname
    }

    /// True when a connection to `addr` would reach one of our own listeners:
    /// - an address in `own_addresses` (NAT, port forwarding), on any port;
    /// - a listener bound to exactly that address and port;
    /// - a listener on the unspecified address (`0.0.0.0` or `[::]`, same family) on that
    ///   port, when the IP is loopback, unspecified, or the address of a local interface;
    /// - a listener on any loopback address on that port, when the IP is loopback.
    ///
    /// IPv4-mapped IPv6 addresses (`::ffff:127.0.0.1`) count as the IPv4 address. The
    /// unspecified address as a destination counts as loopback (connecting to `0.0.0.0`
    /// reaches the local host).
    pub fn is_us(&self, addr: SocketAddr) -> bool {
        let ip = addr.ip().to_canonical();
        // Addresses forwarded to us (NAT): the outside port need not be ours.
        if self.extra.contains(&ip) {
            return true;
        }
        let loopback = ip.is_loopback() || ip.is_unspecified();
        let mut local_checked = None;
        for l in self.listeners.iter().filter(|l| l.port() == addr.port()) {
            let lip = l.ip();
            if lip == ip || (loopback && lip.is_loopback()) {
                return true;
            }
            // Our IPv6 listeners are IPV6_V6ONLY (listener::bind): [::] does not take IPv4.
            if lip.is_unspecified() && lip.is_ipv4() == ip.is_ipv4() {
                if loopback {
                    return true;
                }
                let local = *local_checked.get_or_insert_with(|| self.is_local_address(ip));
                if local {
                    return true;
                }
            }
        }
        false
    }

    /// Whether `ip` is the address of one of this host's interfaces.
    fn is_local_address(&self, ip: IpAddr) -> bool {
        let mut cached = self.interfaces.lock().unwrap_or_else(|e| e.into_inner());
        let fresh = matches!(&*cached, Some((at, _)) if at.elapsed() < INTERFACES_TTL);
        if !fresh {
            let addrs = match if_addrs::get_if_addrs() {
                Ok(list) => list.iter().map(|i| i.ip().to_canonical()).collect(),
                Err(e) => {
                    // Without the list only exact and loopback matches are found; say so
                    // rather than guess.
                    tracing::warn!(error = %e, "cannot list the local interface addresses");
                    Vec::new()
                }
            };
            *cached = Some((Instant::now(), addrs));
        }
        cached
            .as_ref()
            .is_some_and(|(_, addrs)| addrs.contains(&ip))
    }
}

/// ASCII lower case without a trailing dot.
fn normalise_name(name: &str) -> String {
    let name = name.trim();
    name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> SocketAddr {
        s.parse().unwrap()
    }

    #[test]
    fn names_ignore_case_and_the_trailing_dot() {
        let us = Ourselves::new("relay.example", []);
        assert!(us.is_our_name("relay.example"));
        assert!(us.is_our_name("Relay.EXAMPLE."));
        assert!(!us.is_our_name("mx.relay.example"));
        assert!(!us.is_our_name("relay.example.org"));
        assert!(!us.is_our_name(""));
    }

    #[test]
    fn exact_listener_and_the_port_matters() {
        let us = Ourselves::new("h.test", [a("192.0.2.7:25"), a("127.0.0.1:2525")]);
        assert!(us.is_us(a("192.0.2.7:25")));
        assert!(!us.is_us(a("192.0.2.7:26")));
        assert!(!us.is_us(a("192.0.2.8:25")));
        assert!(us.is_us(a("127.0.0.1:2525")));
        // A sink on another port of the same address is somebody else.
        assert!(!us.is_us(a("127.0.0.1:2526")));
    }

    #[test]
    fn any_loopback_address_reaches_a_loopback_listener() {
        let us = Ourselves::new("h.test", [a("127.0.0.1:2525")]);
        assert!(us.is_us(a("127.0.0.53:2525")));
        assert!(us.is_us(a("[::ffff:127.0.0.1]:2525")), "IPv4-mapped");
        assert!(us.is_us(a("[::1]:2525")));
        assert!(us.is_us(a("0.0.0.0:2525")), "0.0.0.0 is the local host");
        assert!(!us.is_us(a("127.0.0.53:25")));
        let us6 = Ourselves::new("h.test", [a("[::1]:25")]);
        assert!(us6.is_us(a("127.0.0.1:25")));
        assert!(us6.is_us(a("[::1]:25")));
    }

    #[test]
    fn unspecified_listener_covers_loopback_and_local_interfaces() {
        let us = Ourselves::new("h.test", [a("0.0.0.0:25")]);
        assert!(us.is_us(a("127.0.0.1:25")));
        assert!(us.is_us(a("127.9.9.9:25")));
        assert!(!us.is_us(a("127.0.0.1:26")));
        // An address that is surely not ours (TEST-NET-3).
        assert!(!us.is_us(a("203.0.113.77:25")));
        // Every interface address of this machine (whatever it has) is us.
        for iface in if_addrs::get_if_addrs().unwrap_or_default() {
            let ip = iface.ip().to_canonical();
            if ip.is_ipv4() {
                assert!(us.is_us(SocketAddr::new(ip, 25)), "{ip}");
            }
        }
        // IPv6 listeners take no IPv4 (IPV6_V6ONLY), and 0.0.0.0 takes no IPv6.
        let v6 = Ourselves::new("h.test", [a("[::]:25")]);
        assert!(v6.is_us(a("[::1]:25")));
        assert!(!v6.is_us(a("203.0.113.77:25")));
        assert!(!us.is_us(a("[2001:db8::1]:25")));
    }

    #[test]
    fn no_listener_on_the_port_is_never_us() {
        let us = Ourselves::new("h.test", [a("0.0.0.0:0")]);
        assert!(!us.is_us(a("127.0.0.1:25")));
        assert!(!Ourselves::new("h.test", []).is_us(a("127.0.0.1:25")));
    }
}
