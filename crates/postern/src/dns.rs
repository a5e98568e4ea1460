//! Where to deliver a domain, and the other DNS questions Postern asks: MX lookup and host
//! addresses (RFC 5321 section 5.1, RFC 7505), and the A records of DNS blocklists (RFC 5782).
//!
//! [`Resolver::mail_hosts`] turns a recipient domain into the ordered list of hosts to try;
//! [`Resolver::host_addresses`] turns one of those hosts into IP addresses. Trying the hosts in
//! order, and deciding what a failure of one host means, is the caller's business. The
//! inbound checks ask the rest: TXT, and for SPF single-family addresses, MX names without
//! the implicit MX, and PTR names, each telling NXDOMAIN and NODATA apart from failures.
//!
//! Trust: everything that comes back from DNS is untrusted. MX exchanges are normalised (lower
//! case, no trailing dot) and deduplicated, a root exchange (`.`) never becomes a host, and DNS
//! failures are reduced to the four outcomes of [`ResolveError`], each with a fixed enhanced
//! status code. The domain passed in is expected to come from an already parsed address; it
//! may be UTF-8 (converted to A-labels here) but not an address literal (`[192.0.2.1]`).
//!
//! [`order_mx`] is the pure part (sorting, shuffling, null MX) and is tested without a network.

use std::collections::HashSet;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

use hickory_resolver::TokioResolver;
use hickory_resolver::config::{ConnectionConfig, NameServerConfig, ResolveHosts, ResolverConfig};
use hickory_resolver::lookup::Lookup;
use hickory_resolver::net::runtime::TokioRuntimeProvider;
use hickory_resolver::net::{DnsError, NetError};
use hickory_resolver::proto::op::ResponseCode;
use hickory_resolver::proto::rr::{Name, RData};
use rand::seq::SliceRandom;

/// Per-query timeout; with [`ATTEMPTS`] a dead server costs at most about 10 s per lookup.
const TIMEOUT: Duration = Duration::from_secs(5);
/// Attempts per query (hickory's retry count across the configured servers).
const ATTEMPTS: usize = 2;
/// Longest time a positive answer is cached, whatever its TTL: a delivery retry must see a
/// changed MX or address within minutes.
const MAX_POSITIVE_TTL: Duration = Duration::from_secs(5 * 60);
/// Longest time a negative answer (NXDOMAIN, NODATA) is cached: a domain that has just been
/// fixed must not keep bouncing.
const MAX_NEGATIVE_TTL: Duration = Duration::from_secs(30);

/// Resolves mail domains and hosts. Cheap to clone (the hickory resolver and its cache are
/// shared); `Send + Sync`.
#[derive(Clone)]
pub struct Resolver {
    inner: Arc<TokioResolver>,
}

/// One host to try for a domain.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MailHost {
    /// Host name in A-labels, lower case, without the trailing dot.
    pub name: String,
    /// MX preference (lower is tried first); 0 for the implicit MX.
    pub preference: u16,
    /// True when the domain has no MX records and its own address records are used
    /// (RFC 5321 section 5.1, "implicit MX").
    pub implicit: bool,
}

/// Why a domain or host could not be resolved.
#[derive(thiserror::Error, Debug, Clone, PartialEq, Eq)]
pub enum ResolveError {
    /// RFC 7505 null MX: the domain says it accepts no mail. Permanent, status 5.1.10
    /// (RFC 7505 section 4.2).
    #[error("domain publishes a null MX and accepts no mail")]
    NullMx,
    /// NXDOMAIN: the name does not exist (or is not a valid domain name). Permanent, 5.1.2.
    #[error("domain does not exist")]
    NoSuchDomain,
    /// The name exists but has no A or AAAA record. Status 5.4.4 ("unable to route").
    ///
    /// From [`Resolver::mail_hosts`] this means a domain without MX records whose implicit MX
    /// has no address: permanent, nothing else can be tried. From
    /// [`Resolver::host_addresses`] for one host of an MX list it is a per-host failure: the
    /// caller moves to the next host and, if no host works, defers the message (RFC 5321
    /// section 5.1). [`ResolveError::is_permanent`] answers for the `mail_hosts` case.
    #[error("no address records")]
    NoAddress,
    /// SERVFAIL, REFUSED, timeout, network error and the like: try again later. Status 4.4.3.
    #[error("temporary DNS failure: {0}")]
    Temporary(String),
}

impl ResolveError {
    /// Whether the message should be bounced rather than retried (see [`ResolveError::NoAddress`]
    /// for the one variant whose meaning depends on where it came from).
    pub fn is_permanent(&self) -> bool {
        !matches!(self, ResolveError::Temporary(_))
    }

    /// Enhanced status code (RFC 3463) for a DSN or a log line.
    pub fn status(&self) -> &'static str {
        match self {
            ResolveError::NullMx => "5.1.10",
            ResolveError::NoSuchDomain => "5.1.2",
            ResolveError::NoAddress => "5.4.4",
            ResolveError::Temporary(_) => "4.4.3",
        }
    }
}

/// The hickory resolver behind [`Resolver::new`] (same servers, timeouts and TTL caps),
/// also handed to mail-auth by `crate::authentication`, so both ask the same servers.
pub(crate) fn build(servers: &[SocketAddr]) -> Result<TokioResolver, ResolveError> {
    let provider = TokioRuntimeProvider::default();
    let mut builder = if servers.is_empty() {
        TokioResolver::builder(provider).map_err(|e| {
            ResolveError::Temporary(format!("cannot read the system DNS configuration: {e}"))
        })?
    } else {
        let name_servers = servers
            .iter()
            .map(|addr| {
                let connections = [ConnectionConfig::udp(), ConnectionConfig::tcp()]
                    .into_iter()
                    .map(|mut c| {
                        c.port = addr.port();
                        c
                    })
                    .collect();
                // Negative answers are trusted: NXDOMAIN from our own configured
                // server is final.
                NameServerConfig::new(addr.ip(), true, connections)
            })
            .collect();
        TokioResolver::builder_with_config(
            ResolverConfig::from_parts(None, vec![], name_servers),
            provider,
        )
    };
    let opts = builder.options_mut();
    opts.timeout = TIMEOUT;
    opts.attempts = ATTEMPTS;
    opts.positive_max_ttl = Some(MAX_POSITIVE_TTL);
    opts.negative_max_ttl = Some(MAX_NEGATIVE_TTL);
    opts.use_hosts_file = ResolveHosts::Never;
    // A truncated UDP answer is retried over TCP by hickory; also retry on UDP I/O errors.
    opts.try_tcp_on_error = true;
    builder
        .build()
        .map_err(|e| ResolveError::Temporary(format!("cannot set up the resolver: {e}")))
}

impl Resolver {
    /// Builds a resolver.
    ///
    /// `servers` empty: the system configuration (`/etc/resolv.conf`). Otherwise exactly these
    /// servers, each over UDP and TCP (tests point it at a responder on loopback).
    ///
    /// Timeout 5 s, 2 attempts; hickory's cache is kept but TTLs are capped (5 min positive,
    /// 30 s negative). `/etc/hosts` is never consulted: mail routing follows DNS only, as
    /// Postfix does by default, and tests stay hermetic.
    pub fn new(servers: &[SocketAddr]) -> Result<Resolver, ResolveError> {
        Ok(Resolver::from_hickory(build(servers)?))
    }

    /// A resolver over a hickory resolver from [`build`] (sharing its cache with others).
    pub(crate) fn from_hickory(inner: TokioResolver) -> Resolver {
        Resolver {
            inner: Arc::new(inner),
        }
    }

    /// The hosts to try for `domain`, in order (RFC 5321 section 5.1): MX hosts by preference,
    /// in random order among equal preferences (see [`order_mx`]). A domain that exists but
    /// has no MX records (NOERROR/NODATA) gets itself as the implicit MX, preference 0, but
    /// only if it has an A or AAAA record ([`ResolveError::NoAddress`] otherwise).
    ///
    /// `domain` may carry a trailing dot and may be UTF-8 (IDNA, converted to A-labels). It
    /// is always looked up as an absolute name: resolv.conf search domains do not apply.
    /// The MX hosts' own addresses are not checked here; see [`Resolver::host_addresses`].
    pub async fn mail_hosts(&self, domain: &str) -> Result<Vec<MailHost>, ResolveError> {
        let name = query_name(domain)?;
        match self.inner.mx_lookup(name.clone()).await {
            Ok(lookup) => {
                let records: Vec<(u16, String)> = rdata(&lookup)
                    .filter_map(|r| match r {
                        RData::MX(mx) => Some((mx.preference, mx.exchange.to_ascii())),
                        _ => None,
                    })
                    .collect();
                // Empty when the answer held only a CNAME chain without MX at its end:
                // treated like NODATA below. The thread rng lives only in this statement,
                // so the future stays `Send`.
                if !records.is_empty() {
                    return order_mx(records, &mut rand::rng());
                }
            }
            Err(e) => match classify(&e) {
                Negative::NxDomain => return Err(ResolveError::NoSuchDomain),
                Negative::NoData => {}
                Negative::Temporary(why) => return Err(ResolveError::Temporary(why)),
            },
        }
        // No MX: the implicit MX, if the domain has an address (RFC 5321 section 5.1).
        self.addresses_of(name.clone()).await?;
        Ok(vec![MailHost {
            name: display_name(&name),
            preference: 0,
            implicit: true,
        }])
    }

    /// The A and AAAA addresses of one host, both queried concurrently. Order: all IPv6
    /// addresses first, then all IPv4, each family in the order DNS returned it; nothing is
    /// dropped. The caller tries them in order and falls back on connection failure.
    ///
    /// If one family fails temporarily but the other answers, the answer is returned. Errors:
    /// both NXDOMAIN gives [`ResolveError::NoSuchDomain`], no records of either family
    /// [`ResolveError::NoAddress`], otherwise [`ResolveError::Temporary`].
    pub async fn host_addresses(&self, host: &str) -> Result<Vec<IpAddr>, ResolveError> {
        self.addresses_of(query_name(host)?).await
    }

    /// The A records of a name, nothing else (DNS blocklist queries, RFC 5782 2.1).
    pub async fn ipv4_addresses(
        &self,
        name: &str,
    ) -> Result<Vec<std::net::Ipv4Addr>, ResolveError> {
        match self.inner.ipv4_lookup(query_name(name)?).await {
            Ok(l) => Ok(ipv4(&l).collect()),
            Err(e) => no_records(&e),
        }
    }

    /// The AAAA records of a name, nothing else (SPF `a`, `mx` and `ptr` for an IPv6
    /// client, RFC 7208 5.3). No record of the type: an empty list; NXDOMAIN:
    /// [`ResolveError::NoSuchDomain`].
    pub async fn ipv6_addresses(
        &self,
        name: &str,
    ) -> Result<Vec<std::net::Ipv6Addr>, ResolveError> {
        match self.inner.ipv6_lookup(query_name(name)?).await {
            Ok(l) => Ok(rdata(&l)
                .filter_map(|r| match r {
                    RData::AAAA(a) => Some(a.0),
                    _ => None,
                })
                .collect()),
            Err(e) => no_records(&e),
        }
    }

    /// The MX exchanges of a name as published, normalised (lower case, no trailing dot),
    /// in answer order, the root exchange of a null MX left out; unlike
    /// [`Resolver::mail_hosts`] no implicit MX (SPF's `mx`, RFC 7208 5.4, has none). No
    /// record: an empty list; NXDOMAIN: [`ResolveError::NoSuchDomain`].
    pub async fn mx_names(&self, name: &str) -> Result<Vec<String>, ResolveError> {
        match self.inner.mx_lookup(query_name(name)?).await {
            Ok(l) => Ok(rdata(&l)
                .filter_map(|r| match r {
                    RData::MX(mx) => Some(normalise_host(&mx.exchange.to_ascii())),
                    _ => None,
                })
                .filter(|h| !h.is_empty())
                .collect()),
            Err(e) => no_records(&e),
        }
    }

    /// The PTR names of an address (`in-addr.arpa` / `ip6.arpa`), normalised, in answer
    /// order (SPF `ptr` and `%{p}`, RFC 7208 5.5). No record: an empty list; NXDOMAIN:
    /// [`ResolveError::NoSuchDomain`].
    pub async fn ptr_names(&self, ip: IpAddr) -> Result<Vec<String>, ResolveError> {
        match self.inner.reverse_lookup(Name::from(ip)).await {
            Ok(l) => Ok(rdata(&l)
                .filter_map(|r| match r {
                    RData::PTR(p) => Some(normalise_host(&p.0.to_ascii())),
                    _ => None,
                })
                .filter(|h| !h.is_empty())
                .collect()),
            Err(e) => no_records(&e),
        }
    }

    /// The TXT records of a name, each record's strings joined (RFC 6376 3.6.2.2, RFC 7208
    /// 3.3). No record of the type: an empty list.
    pub async fn txt(&self, name: &str) -> Result<Vec<String>, ResolveError> {
        match self.inner.txt_lookup(query_name(name)?).await {
            Ok(l) => Ok(rdata(&l)
                .filter_map(|r| match r {
                    RData::TXT(t) => Some(
                        t.txt_data
                            .iter()
                            .map(|part| String::from_utf8_lossy(part).into_owned())
                            .collect(),
                    ),
                    _ => None,
                })
                .collect()),
            Err(e) => no_records(&e),
        }
    }

    async fn addresses_of(&self, name: Name) -> Result<Vec<IpAddr>, ResolveError> {
        let (v6, v4) = tokio::join!(
            self.inner.ipv6_lookup(name.clone()),
            self.inner.ipv4_lookup(name.clone())
        );
        let mut out = Vec::new();
        let mut outcomes = Vec::with_capacity(2);
        match v6 {
            Ok(l) => out.extend(rdata(&l).filter_map(|r| match r {
                RData::AAAA(a) => Some(IpAddr::V6(a.0)),
                _ => None,
            })),
            Err(e) => outcomes.push(classify(&e)),
        }
        match v4 {
            Ok(l) => out.extend(ipv4(&l).map(IpAddr::V4)),
            Err(e) => outcomes.push(classify(&e)),
        }
        if !out.is_empty() {
            if !outcomes.is_empty() {
                tracing::debug!(host = %name, ?outcomes, "one address family failed, using the other");
            }
            return Ok(out);
        }
        if let Some(Negative::Temporary(why)) = outcomes
            .iter()
            .find(|o| matches!(o, Negative::Temporary(_)))
        {
            return Err(ResolveError::Temporary(why.clone()));
        }
        // Both families answered negatively (or with an empty set).
        if outcomes.len() == 2 && outcomes.iter().all(|o| *o == Negative::NxDomain) {
            Err(ResolveError::NoSuchDomain)
        } else {
            Err(ResolveError::NoAddress)
        }
    }
}

/// Orders raw MX records `(preference, exchange)` per RFC 5321 section 5.1: ascending
/// preference, random order among equal preferences (so load spreads over equal hosts).
///
/// Exchanges are normalised (ASCII lower case, trailing dot removed); a host listed twice is
/// kept once, at its lowest preference.
///
/// Null MX (RFC 7505 section 3): a domain that accepts no mail "advertises a single MX RR"
/// whose exchange is the root `.`; such a record set gives `Err(NullMx)` (whatever the
/// preference, since no host is left to try). Section 3 also says a domain with a null MX
/// "MUST NOT advertise any other MX RR", so a `.` among other records is not a null MX: it is
/// a broken record, and since "." is not a valid host name it is dropped and the remaining
/// hosts are returned. An empty input gives an empty list.
pub fn order_mx<R: rand::Rng + ?Sized>(
    records: Vec<(u16, String)>,
    rng: &mut R,
) -> Result<Vec<MailHost>, ResolveError> {
    let mut records: Vec<(u16, String)> = records
        .into_iter()
        .map(|(pref, exchange)| (pref, normalise_host(&exchange)))
        .collect();
    // Stable sort by preference, then keep each host's first (lowest) occurrence.
    records.sort_by_key(|(pref, _)| *pref);
    let mut seen = HashSet::new();
    records.retain(|(_, host)| seen.insert(host.clone()));

    if records.len() == 1 && records[0].1.is_empty() {
        return Err(ResolveError::NullMx);
    }
    records.retain(|(_, host)| !host.is_empty());

    let mut hosts: Vec<MailHost> = records
        .into_iter()
        .map(|(preference, name)| MailHost {
            name,
            preference,
            implicit: false,
        })
        .collect();
    // Shuffle each run of equal preferences (the list is sorted, so runs are contiguous).
    let mut start = 0;
    while start < hosts.len() {
        let pref = hosts[start].preference;
        let end = start
            + hosts[start..]
                .iter()
                .take_while(|h| h.preference == pref)
                .count();
        hosts[start..end].shuffle(rng);
        start = end;
    }
    Ok(hosts)
}

/// `"Example.COM."` -> `"example.com"`; the root `"."` -> `""`.
fn normalise_host(exchange: &str) -> String {
    let trimmed = exchange.trim();
    trimmed
        .strip_suffix('.')
        .unwrap_or(trimmed)
        .to_ascii_lowercase()
}

/// The absolute DNS name for a mail domain or host. ASCII names are taken as they are (so
/// odd but existing labels, e.g. with `_`, still resolve); UTF-8 names go through IDNA.
fn query_name(domain: &str) -> Result<Name, ResolveError> {
    let trimmed = domain.strip_suffix('.').unwrap_or(domain);
    if trimmed.is_empty() {
        return Err(ResolveError::NoSuchDomain);
    }
    let parsed = if trimmed.is_ascii() {
        Name::from_ascii(trimmed)
    } else {
        Name::from_utf8(trimmed)
    };
    // A name DNS cannot even represent does not exist, permanently.
    let mut name = parsed.map_err(|_| ResolveError::NoSuchDomain)?;
    name.set_fqdn(true);
    Ok(name)
}

/// A-label, lower case, no trailing dot.
fn display_name(name: &Name) -> String {
    normalise_host(&name.to_ascii())
}

/// What a failed hickory lookup means for mail.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Negative {
    /// NXDOMAIN: the name does not exist.
    NxDomain,
    /// NOERROR with no records of the asked type.
    NoData,
    /// Anything else, described.
    Temporary(String),
}

/// The records of an answer (a CNAME chain's own records are skipped by the callers'
/// type match).
fn rdata(lookup: &Lookup) -> impl Iterator<Item = &RData> {
    lookup.answers().iter().map(|r| &r.data)
}

fn ipv4(lookup: &Lookup) -> impl Iterator<Item = std::net::Ipv4Addr> + '_ {
    rdata(lookup).filter_map(|r| match r {
        RData::A(a) => Some(a.0),
        _ => None,
    })
}

/// In hickory 0.26 an empty answer arrives as `DnsError::NoRecordsFound` with the response
/// code (NXDOMAIN, or NOERROR for NODATA), SERVFAIL and REFUSED as
/// `DnsError::ResponseCode`; transport errors and timeouts are other kinds.
/// A failed lookup as the list it stands for: no record of the type is an empty list,
/// NXDOMAIN and temporary failures are errors.
fn no_records<T>(err: &NetError) -> Result<Vec<T>, ResolveError> {
    match classify(err) {
        Negative::Temporary(why) => Err(ResolveError::Temporary(why)),
        Negative::NxDomain => Err(ResolveError::NoSuchDomain),
        Negative::NoData => Ok(Vec::new()),
    }
}

fn classify(err: &NetError) -> Negative {
    match err {
        NetError::Dns(DnsError::NoRecordsFound(none)) => match none.response_code {
            ResponseCode::NXDomain => Negative::NxDomain,
            ResponseCode::NoError => Negative::NoData,
            code => Negative::Temporary(format!("DNS server answered {code}")),
        },
        NetError::Dns(DnsError::ResponseCode(code)) => {
            Negative::Temporary(format!("DNS server answered {code}"))
        }
        other => Negative::Temporary(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand::rngs::StdRng;

    fn rec(list: &[(u16, &str)]) -> Vec<(u16, String)> {
        list.iter().map(|(p, h)| (*p, h.to_string())).collect()
    }

    fn names(hosts: &[MailHost]) -> Vec<&str> {
        hosts.iter().map(|h| h.name.as_str()).collect()
    }

    #[test]
    fn sorted_by_preference_and_normalised() {
        let mut rng = StdRng::seed_from_u64(1);
        let hosts = order_mx(
            rec(&[(20, "B.example."), (10, "a.example."), (30, "c.Example")]),
            &mut rng,
        )
        .unwrap();
        assert_eq!(names(&hosts), ["a.example", "b.example", "c.example"]);
        assert_eq!(
            hosts.iter().map(|h| h.preference).collect::<Vec<_>>(),
            [10, 20, 30]
        );
        assert!(hosts.iter().all(|h| !h.implicit));
    }

    #[test]
    fn equal_preferences_are_shuffled_but_stay_in_their_group() {
        let mut rng = StdRng::seed_from_u64(7);
        let input = rec(&[
            (10, "a1."),
            (10, "a2."),
            (10, "a3."),
            (5, "first."),
            (20, "last."),
        ]);
        let mut first_of_group = std::collections::HashMap::new();
        for _ in 0..600 {
            let hosts = order_mx(input.clone(), &mut rng).unwrap();
            assert_eq!(hosts.len(), 5);
            assert_eq!(hosts[0].name, "first");
            assert_eq!(hosts[4].name, "last");
            let mut group = names(&hosts[1..4]).to_vec();
            *first_of_group.entry(group[0].to_string()).or_insert(0u32) += 1;
            group.sort();
            assert_eq!(group, ["a1", "a2", "a3"]);
        }
        // Each of the three comes first about 200 times out of 600.
        assert_eq!(first_of_group.len(), 3, "{first_of_group:?}");
        for (host, n) in &first_of_group {
            assert!((120..=280).contains(n), "{host} first {n} times");
        }
    }

    #[test]
    fn null_mx_alone_is_null_mx() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(
            order_mx(rec(&[(0, ".")]), &mut rng),
            Err(ResolveError::NullMx)
        );
        // Duplicated, it is still the only record.
        assert_eq!(
            order_mx(rec(&[(0, "."), (0, ".")]), &mut rng),
            Err(ResolveError::NullMx)
        );
        // Not preference 0 (out of spec), but still no host to try.
        assert_eq!(
            order_mx(rec(&[(10, ".")]), &mut rng),
            Err(ResolveError::NullMx)
        );
        // hickory renders the root name as "." (and an empty exchange means the same).
        assert_eq!(
            order_mx(rec(&[(0, "")]), &mut rng),
            Err(ResolveError::NullMx)
        );
    }

    #[test]
    fn null_mx_among_others_is_dropped() {
        let mut rng = StdRng::seed_from_u64(1);
        let hosts = order_mx(rec(&[(0, "."), (10, "mx.example.")]), &mut rng).unwrap();
        assert_eq!(names(&hosts), ["mx.example"]);
    }

    #[test]
    fn duplicates_keep_the_lowest_preference() {
        let mut rng = StdRng::seed_from_u64(1);
        let hosts = order_mx(
            rec(&[
                (20, "mx.example."),
                (10, "MX.example"),
                (10, "mx.example."),
                (15, "other.example."),
            ]),
            &mut rng,
        )
        .unwrap();
        assert_eq!(names(&hosts), ["mx.example", "other.example"]);
        assert_eq!(hosts[0].preference, 10);
    }

    #[test]
    fn empty_input_is_empty_output() {
        let mut rng = StdRng::seed_from_u64(1);
        assert_eq!(order_mx(Vec::new(), &mut rng), Ok(Vec::new()));
    }

    #[test]
    fn status_codes() {
        assert_eq!(ResolveError::NullMx.status(), "5.1.10");
        assert_eq!(ResolveError::NoSuchDomain.status(), "5.1.2");
        assert_eq!(ResolveError::NoAddress.status(), "5.4.4");
        assert_eq!(ResolveError::Temporary("x".into()).status(), "4.4.3");
        assert!(ResolveError::NullMx.is_permanent());
        assert!(!ResolveError::Temporary("x".into()).is_permanent());
    }

    #[test]
    fn query_names() {
        assert_eq!(
            query_name("Example.COM.").unwrap().to_ascii(),
            "Example.COM."
        );
        assert_eq!(
            display_name(&query_name("bücher.example").unwrap()),
            "xn--bcher-kva.example"
        );
        assert_eq!(query_name(""), Err(ResolveError::NoSuchDomain));
        assert_eq!(query_name("."), Err(ResolveError::NoSuchDomain));
    }

    // Against the testkit's DNS responder on loopback (RFC 5321 section 5.1 cases).

    use postern_testkit::DnsServer;
    use std::net::{Ipv4Addr, Ipv6Addr};

    fn resolver(dns: &DnsServer) -> Resolver {
        Resolver::new(&[dns.addr()]).unwrap()
    }

    fn host(name: &str, preference: u16, implicit: bool) -> MailHost {
        MailHost {
            name: name.to_string(),
            preference,
            implicit,
        }
    }

    #[tokio::test]
    async fn mx_hosts_in_preference_order() {
        let dns = DnsServer::start();
        dns.add_mx("two.test", 20, "B.two.test");
        dns.add_mx("two.test", 10, "a.two.test.");
        let hosts = resolver(&dns).mail_hosts("two.test").await.unwrap();
        assert_eq!(
            hosts,
            [host("a.two.test", 10, false), host("b.two.test", 20, false)]
        );
    }

    #[tokio::test]
    async fn implicit_mx_from_a_record() {
        let dns = DnsServer::start();
        dns.add_a("plain.test", Ipv4Addr::new(192, 0, 2, 7));
        let r = resolver(&dns);
        // Trailing dot and upper case are the same domain.
        let hosts = r.mail_hosts("Plain.TEST.").await.unwrap();
        assert_eq!(hosts, [host("plain.test", 0, true)]);
        assert_eq!(
            r.host_addresses(&hosts[0].name).await.unwrap(),
            [IpAddr::V4(Ipv4Addr::new(192, 0, 2, 7))]
        );
    }

    #[tokio::test]
    async fn implicit_mx_without_address_is_no_address() {
        let dns = DnsServer::start();
        dns.add_txt("txtonly.test", "v=spf1 -all");
        let err = resolver(&dns).mail_hosts("txtonly.test").await.unwrap_err();
        assert_eq!(err, ResolveError::NoAddress);
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn aaaa_and_a_both_returned_ipv6_first() {
        let dns = DnsServer::start();
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 25);
        dns.add_a("dual.test", Ipv4Addr::new(192, 0, 2, 25));
        dns.add_a("dual.test", Ipv4Addr::new(192, 0, 2, 26));
        dns.add_aaaa("dual.test", v6);
        let addrs = resolver(&dns).host_addresses("dual.test").await.unwrap();
        assert_eq!(addrs.len(), 3);
        assert_eq!(addrs[0], IpAddr::V6(v6));
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::new(192, 0, 2, 25))));
        assert!(addrs.contains(&IpAddr::V4(Ipv4Addr::new(192, 0, 2, 26))));
        let mut families: Vec<_> = dns.queries().into_iter().map(|(_, t)| t).collect();
        families.sort();
        assert_eq!(families, ["A", "AAAA"]);
    }

    #[tokio::test]
    async fn nxdomain_is_no_such_domain() {
        let dns = DnsServer::start();
        dns.add_a("exists.test", Ipv4Addr::LOCALHOST);
        let r = resolver(&dns);
        let err = r.mail_hosts("nope.test").await.unwrap_err();
        assert_eq!(err, ResolveError::NoSuchDomain);
        assert_eq!(err.status(), "5.1.2");
        assert_eq!(
            r.host_addresses("nope.test").await,
            Err(ResolveError::NoSuchDomain)
        );
    }

    #[tokio::test]
    async fn null_mx_is_null_mx() {
        let dns = DnsServer::start();
        dns.null_mx("nomail.test");
        // Its A record must not be used as an implicit MX (RFC 7505 section 4.2).
        dns.add_a("nomail.test", Ipv4Addr::new(192, 0, 2, 1));
        let err = resolver(&dns).mail_hosts("nomail.test").await.unwrap_err();
        assert_eq!(err, ResolveError::NullMx);
        assert_eq!(err.status(), "5.1.10");
        assert!(err.is_permanent());
    }

    #[tokio::test]
    async fn servfail_is_temporary() {
        let dns = DnsServer::start();
        dns.add_mx("broken.test", 10, "mx.broken.test");
        dns.servfail("broken.test");
        let err = resolver(&dns).mail_hosts("broken.test").await.unwrap_err();
        assert!(matches!(err, ResolveError::Temporary(_)), "{err:?}");
        assert!(!err.is_permanent());
        assert_eq!(err.status(), "4.4.3");
    }

    #[tokio::test]
    async fn servfail_for_host_addresses_is_temporary() {
        let dns = DnsServer::start();
        dns.add_a("half.test", Ipv4Addr::new(192, 0, 2, 9));
        dns.servfail("half.test");
        // SERVFAIL for both A and AAAA: temporary, not "no address".
        let r = resolver(&dns);
        assert!(matches!(
            r.host_addresses("half.test").await,
            Err(ResolveError::Temporary(_))
        ));
    }

    #[tokio::test]
    async fn utf8_domain_is_queried_as_a_labels() {
        let dns = DnsServer::start();
        dns.add_mx("xn--bcher-kva.test", 5, "mx.xn--bcher-kva.test");
        let hosts = resolver(&dns).mail_hosts("bücher.test").await.unwrap();
        assert_eq!(hosts, [host("mx.xn--bcher-kva.test", 5, false)]);
        assert_eq!(dns.queries()[0].0, "xn--bcher-kva.test");
    }

    #[tokio::test]
    async fn changes_are_seen_after_the_ttl() {
        let dns = DnsServer::start();
        dns.set_ttl(1);
        dns.add_mx("moving.test", 10, "old.moving.test");
        let r = resolver(&dns);
        assert_eq!(
            r.mail_hosts("moving.test").await.unwrap()[0].name,
            "old.moving.test"
        );
        dns.clear("moving.test");
        dns.add_mx("moving.test", 10, "new.moving.test");
        tokio::time::sleep(Duration::from_millis(1500)).await;
        assert_eq!(
            r.mail_hosts("moving.test").await.unwrap()[0].name,
            "new.moving.test"
        );
    }

    #[tokio::test]
    async fn mx_names_have_no_implicit_mx() {
        let dns = DnsServer::start();
        dns.add_mx("two.test", 20, "B.two.test.");
        dns.add_mx("two.test", 10, "a.two.test");
        dns.add_a("plain.test", Ipv4Addr::new(192, 0, 2, 7));
        dns.null_mx("nomail.test");
        let r = resolver(&dns);
        let mut names = r.mx_names("two.test").await.unwrap();
        names.sort();
        assert_eq!(names, ["a.two.test", "b.two.test"]);
        // No MX: nothing, not the domain itself; a null MX: nothing either.
        assert_eq!(r.mx_names("plain.test").await, Ok(Vec::new()));
        assert_eq!(r.mx_names("nomail.test").await, Ok(Vec::new()));
        assert_eq!(
            r.mx_names("nope.test").await,
            Err(ResolveError::NoSuchDomain)
        );
    }

    #[tokio::test]
    async fn ipv6_and_ptr_lookups() {
        let dns = DnsServer::start();
        let v6 = Ipv6Addr::new(0x2001, 0xdb8, 0, 0, 0, 0, 0, 25);
        dns.add_aaaa("six.test", v6);
        dns.add_a("four.test", Ipv4Addr::new(192, 0, 2, 1));
        dns.add_ptr("1.2.0.192.in-addr.arpa", "Mail.Four.Test.");
        dns.add_ptr(
            "9.1.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.0.8.b.d.0.1.0.0.2.ip6.arpa",
            "six.test",
        );
        let r = resolver(&dns);
        assert_eq!(r.ipv6_addresses("six.test").await, Ok(vec![v6]));
        assert_eq!(r.ipv6_addresses("four.test").await, Ok(Vec::new()));
        assert_eq!(
            r.ipv6_addresses("nope.test").await,
            Err(ResolveError::NoSuchDomain)
        );
        assert_eq!(
            r.ptr_names(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 1))).await,
            Ok(vec!["mail.four.test".to_string()])
        );
        assert_eq!(
            r.ptr_names(IpAddr::V6(Ipv6Addr::new(
                0x2001, 0xdb8, 0, 0, 0, 0, 0, 0x19
            )))
            .await,
            Ok(vec!["six.test".to_string()])
        );
        assert_eq!(
            r.ptr_names(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))).await,
            Err(ResolveError::NoSuchDomain)
        );
        dns.servfail("2.2.0.192.in-addr.arpa");
        assert!(matches!(
            r.ptr_names(IpAddr::V4(Ipv4Addr::new(192, 0, 2, 2))).await,
            Err(ResolveError::Temporary(_))
        ));
    }

    fn assert_send_sync<T: Send + Sync>() {}

    #[test]
    fn resolver_is_send_sync_and_futures_are_send() {
        assert_send_sync::<Resolver>();
        fn is_send<T: Send>(_: &T) {}
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        rt.block_on(async {
            let r = Resolver::new(&["127.0.0.1:9".parse().unwrap()]).unwrap();
            let f = r.mail_hosts("example.com");
            is_send(&f);
            let g = r.host_addresses("example.com");
            is_send(&g);
        });
    }
}
