//! `check_host()` (RFC 7208 4): record lookup and selection (4.4, 4.5), evaluation of the
//! directives left to right (4.6.2, 5), `redirect=` (6.1), and the limits of 4.6.4.

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::time::Duration;

use super::macros::{self, Context, Letter, MacroString};
use super::record::{self, Mechanism, Qualifier, Record};
use super::{Dns, DnsFailure, SpfResult};

/// 4.6.4: terms that query DNS (include, a, mx, ptr, exists, redirect), in all.
pub const MAX_LOOKUPS: usize = 10;
/// 4.6.4: terms whose query answered NXDOMAIN or nothing ("void lookups"), in all.
pub const MAX_VOID_LOOKUPS: usize = 2;
/// 4.6.4: MX names looked up per `mx`; more is a permerror.
pub const MAX_MX_NAMES: usize = 10;
/// 4.6.4: PTR names looked at per `ptr` (and for `%{p}`); the rest are ignored.
pub const MAX_PTR_NAMES: usize = 10;
/// Nesting of include/redirect. The 10-lookup limit already bounds it; this is a guard.
const MAX_DEPTH: usize = MAX_LOOKUPS + 1;

/// What `check_host()` is asked (4.1).
#[derive(Debug, Clone, Copy)]
pub struct Request<'a> {
    /// `<ip>`; an IPv4-mapped IPv6 address is taken as the IPv4 address.
    pub ip: IpAddr,
    /// `<domain>`: the sender's domain, or the HELO name.
    pub domain: &'a str,
    /// `<sender>`: `local@domain`; a missing local-part becomes "postmaster" (4.3).
    pub sender: &'a str,
    /// The HELO/EHLO name (`%{h}`).
    pub helo: &'a str,
    /// Our own name (`%{r}`).
    pub receiver: &'a str,
}

/// The result, and for permerror and temperror what went wrong.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Evaluation {
    pub result: SpfResult,
    pub detail: Option<String>,
}

/// Runs `check_host()` for `req` over `dns`, at most `budget` in all (past it, temperror:
/// the DNS was too slow, 2.6.7).
pub async fn check_host<D: Dns>(dns: &D, req: &Request<'_>, budget: Duration) -> Evaluation {
    let (local, sender_domain) = match req.sender.rsplit_once('@') {
        Some((l, d)) => (l, d),
        None => ("", req.sender),
    };
    // 4.3: no local-part: "postmaster".
    let local = if local.is_empty() {
        "postmaster"
    } else {
        local
    };
    let mut eval = Eval {
        dns,
        ip: req.ip.to_canonical(),
        local: local.to_string(),
        sender_domain: sender_domain.to_string(),
        helo: req.helo.to_string(),
        receiver: req.receiver.to_string(),
        lookups: 0,
        voids: 0,
        validated: None,
    };
    let domain = ascii_domain(req.domain);
    let outcome = tokio::time::timeout(budget, eval.check_host(domain, 0)).await;
    match outcome {
        Ok(Ok(result)) => Evaluation {
            result,
            detail: None,
        },
        Ok(Err(Abort::Temp(why))) => Evaluation {
            result: SpfResult::TempError,
            detail: Some(why),
        },
        Ok(Err(Abort::Perm(why))) => Evaluation {
            result: SpfResult::PermError,
            detail: Some(why),
        },
        Err(_) => Evaluation {
            result: SpfResult::TempError,
            detail: Some(format!(
                "the DNS did not answer within {} s",
                budget.as_secs()
            )),
        },
    }
}

/// The domain in A-labels, lower case, without a trailing dot (a UTF-8 domain of an
/// SMTPUTF8 sender is looked up as DNS has it). One IDNA cannot convert is kept as it is
/// and fails the check of 4.3.
fn ascii_domain(domain: &str) -> String {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    if d.is_ascii() {
        d.to_ascii_lowercase()
    } else {
        idna::domain_to_ascii(d).unwrap_or_else(|_| d.to_string())
    }
}

/// 4.3: a name check_host() can look up: at most 253 characters, labels of 1 to 63, at
/// least two of them, visible ASCII only (no address literal).
fn valid_domain(domain: &str) -> bool {
    let d = domain.strip_suffix('.').unwrap_or(domain);
    d.len() <= macros::MAX_DOMAIN
        && d.bytes()
            .all(|b| b.is_ascii_graphic() && b != b'[' && b != b']')
        && d.split('.').count() >= 2
        && d.split('.').all(|l| !l.is_empty() && l.len() <= 63)
}

/// Why evaluation stopped before a result of its own.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Abort {
    Temp(String),
    Perm(String),
}

type Step<T> = Result<T, Abort>;

struct Eval<'d, D> {
    dns: &'d D,
    ip: IpAddr,
    local: String,
    sender_domain: String,
    helo: String,
    receiver: String,
    /// Terms that queried DNS so far (4.6.4).
    lookups: usize,
    /// Void lookups so far (4.6.4).
    voids: usize,
    /// `%{p}`'s validated names, looked up once when a macro first needs them.
    validated: Option<Vec<String>>,
}

impl<'d, D: Dns> Eval<'d, D> {
    /// `check_host()` for `domain`: `Ok` is none, neutral, pass, fail or softfail; errors
    /// abort the whole evaluation (an include of a temperror or permerror is the same,
    /// 5.2). Boxed: include and redirect recurse.
    fn check_host(
        &mut self,
        domain: String,
        depth: usize,
    ) -> Pin<Box<dyn Future<Output = Step<SpfResult>> + Send + '_>> {
        Box::pin(async move {
            if depth > MAX_DEPTH {
                return Err(Abort::Perm("includes nested too deeply".to_string()));
            }
            // 4.3: a malformed domain has no record.
            if !valid_domain(&domain) {
                return Ok(SpfResult::None);
            }
            let Some(record) = self.record(&domain).await? else {
                return Ok(SpfResult::None);
            };
            for d in &record.directives {
                if self.matches(&d.mechanism, &domain, depth).await? {
                    // 4.6.2: the first match gives the qualifier's result.
                    return Ok(match d.qualifier {
                        Qualifier::Pass => SpfResult::Pass,
                        Qualifier::Fail => SpfResult::Fail,
                        Qualifier::SoftFail => SpfResult::SoftFail,
                        Qualifier::Neutral => SpfResult::Neutral,
                    });
                }
            }
            // 6.1: redirect= only when nothing matched, and never with an "all" (which
            // always matches, so this is only a guard).
            let has_all = record
                .directives
                .iter()
                .any(|d| d.mechanism == Mechanism::All);
            if let Some(target) = &record.redirect
                && !has_all
            {
                self.count_lookup()?;
                let target = self.expand(target, &domain).await?;
                return match self.check_host(target.clone(), depth + 1).await? {
                    // 6.1: a redirect to a domain without a record is a permerror.
                    SpfResult::None => Err(Abort::Perm(format!(
                        "redirect={} has no SPF record",
                        shorten(&target)
                    ))),
                    r => Ok(r),
                };
            }
            // 4.7: nothing matched, no redirect.
            Ok(SpfResult::Neutral)
        })
    }

    /// 4.4, 4.5, 4.6: the one SPF record at `domain`, parsed; `None` when there is none.
    async fn record(&mut self, domain: &str) -> Step<Option<Record>> {
        let texts = match self.dns.txt(domain).await {
            Ok(t) => t,
            // 4.4: NXDOMAIN is "none".
            Err(DnsFailure::NxDomain) => return Ok(None),
            Err(DnsFailure::Temporary(why)) => return Err(temp(domain, &why)),
        };
        let mut found = texts.iter().filter(|t| record::is_spf(t));
        let Some(text) = found.next() else {
            return Ok(None);
        };
        if found.next().is_some() {
            // 4.5: more than one record is a permerror.
            return Err(Abort::Perm(format!(
                "more than one SPF record at {}",
                shorten(domain)
            )));
        }
        record::parse(text).map(Some).map_err(|e| {
            Abort::Perm(format!(
                "syntax error in the SPF record of {}: {e}",
                shorten(domain)
            ))
        })
    }

    /// Whether one mechanism matches (5).
    async fn matches(&mut self, m: &Mechanism, domain: &str, depth: usize) -> Step<bool> {
        if m.queries_dns() {
            self.count_lookup()?;
        }
        match m {
            Mechanism::All => Ok(true),
            Mechanism::Ip4(net, len) => Ok(match self.ip {
                IpAddr::V4(ip) => in_v4(ip, *net, *len),
                IpAddr::V6(_) => false,
            }),
            Mechanism::Ip6(net, len) => Ok(match self.ip {
                IpAddr::V6(ip) => in_v6(ip, *net, *len),
                IpAddr::V4(_) => false,
            }),
            Mechanism::Include(spec) => {
                let target = self.expand(spec, domain).await?;
                // 5.2: the table of include results.
                match self.check_host(target.clone(), depth + 1).await? {
                    SpfResult::Pass => Ok(true),
                    SpfResult::None => Err(Abort::Perm(format!(
                        "include:{} has no SPF record",
                        shorten(&target)
                    ))),
                    _ => Ok(false),
                }
            }
            Mechanism::A {
                domain: spec,
                v4,
                v6,
            } => {
                let target = self.target(spec.as_ref(), domain).await?;
                // 5.3: the address type of the connection.
                let addrs = match self.addresses(&target).await {
                    Ok(a) => a,
                    Err(DnsFailure::NxDomain) => Vec::new(),
                    Err(DnsFailure::Temporary(why)) => return Err(temp(&target, &why)),
                };
                if addrs.is_empty() {
                    self.count_void()?;
                }
                Ok(addrs.iter().any(|a| self.in_cidr(*a, *v4, *v6)))
            }
            Mechanism::Mx {
                domain: spec,
                v4,
                v6,
            } => {
                let target = self.target(spec.as_ref(), domain).await?;
                let names = match self.dns.mx(&target).await {
                    Ok(n) => n,
                    Err(DnsFailure::NxDomain) => Vec::new(),
                    Err(DnsFailure::Temporary(why)) => return Err(temp(&target, &why)),
                };
                if names.is_empty() {
                    self.count_void()?;
                    return Ok(false);
                }
                // 4.6.4: at most 10 MX names get their addresses looked up.
                if names.len() > MAX_MX_NAMES {
                    return Err(Abort::Perm(format!(
                        "more than {MAX_MX_NAMES} MX names at {} (RFC 7208 4.6.4)",
                        shorten(&target)
                    )));
                }
                // 5.4: each exchange's addresses. A host whose lookup failed may have
                // been the one: temperror, unless another host matches.
                let mut failed = None;
                for name in &names {
                    match self.addresses(name).await {
                        Ok(addrs) => {
                            if addrs.iter().any(|a| self.in_cidr(*a, *v4, *v6)) {
                                return Ok(true);
                            }
                        }
                        Err(DnsFailure::NxDomain) => {}
                        Err(DnsFailure::Temporary(why)) => failed = Some(temp(name, &why)),
                    }
                }
                match failed {
                    Some(e) => Err(e),
                    None => Ok(false),
                }
            }
            Mechanism::Ptr(spec) => {
                let target = self.target(spec.as_ref(), domain).await?;
                let names = match self.dns.ptr(self.ip).await {
                    Ok(n) => n,
                    Err(DnsFailure::NxDomain) => Vec::new(),
                    // 5.5: a DNS error on the PTR lookup: no match.
                    Err(DnsFailure::Temporary(_)) => return Ok(false),
                };
                if names.is_empty() {
                    self.count_void()?;
                    return Ok(false);
                }
                // 5.5: the first 10 names (4.6.4), those under the target, validated by
                // a forward lookup (an error there skips the name).
                for name in names.iter().take(MAX_PTR_NAMES) {
                    if is_within(name, &target) && self.validates(name).await {
                        return Ok(true);
                    }
                }
                Ok(false)
            }
            Mechanism::Exists(spec) => {
                let target = self.expand(spec, domain).await?;
                // 5.7: an A lookup, whatever the connection's address type.
                match self.dns.a(&target).await {
                    Ok(a) if !a.is_empty() => Ok(true),
                    Ok(_) | Err(DnsFailure::NxDomain) => {
                        self.count_void()?;
                        Ok(false)
                    }
                    Err(DnsFailure::Temporary(why)) => Err(temp(&target, &why)),
                }
            }
        }
    }

    fn count_lookup(&mut self) -> Step<()> {
        self.lookups += 1;
        if self.lookups > MAX_LOOKUPS {
            return Err(Abort::Perm(format!(
                "too many DNS lookups (more than {MAX_LOOKUPS}, RFC 7208 4.6.4)"
            )));
        }
        Ok(())
    }

    fn count_void(&mut self) -> Step<()> {
        self.voids += 1;
        if self.voids > MAX_VOID_LOOKUPS {
            return Err(Abort::Perm(format!(
                "too many void lookups (more than {MAX_VOID_LOOKUPS}, RFC 7208 4.6.4)"
            )));
        }
        Ok(())
    }

    /// The target of a/mx/ptr: the domain-spec expanded, or `<domain>`.
    async fn target(&mut self, spec: Option<&MacroString>, domain: &str) -> Step<String> {
        match spec {
            Some(s) => self.expand(s, domain).await,
            None => Ok(domain.to_string()),
        }
    }

    /// A domain-spec expanded (7), trimmed to 253 characters (7.3), without a trailing
    /// dot.
    async fn expand(&mut self, spec: &MacroString, domain: &str) -> Step<String> {
        if spec.uses(Letter::Validated) && self.validated.is_none() {
            let names = self.validated_names().await;
            self.validated = Some(names);
        }
        let validated = self
            .validated
            .as_deref()
            .and_then(|v| pick_validated(v, domain));
        let ctx = Context {
            local: &self.local,
            sender_domain: &self.sender_domain,
            domain,
            ip: self.ip,
            helo: &self.helo,
            validated,
            receiver: &self.receiver,
            now: std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        };
        let expanded = macros::expand(spec, &ctx).map_err(Abort::Perm)?;
        let trimmed = macros::trim_domain(&expanded);
        Ok(trimmed.strip_suffix('.').unwrap_or(trimmed).to_string())
    }

    /// 7.2 `%{p}`, 5.5: the PTR names of `<ip>` (the first 10) that resolve back to it.
    /// A failed PTR lookup gives none ("unknown"); a name whose forward lookup fails is
    /// skipped, as for `ptr` (5.5). Not a term, so not counted toward 4.6.4's limits; it
    /// is done at most once per evaluation.
    async fn validated_names(&self) -> Vec<String> {
        let Ok(names) = self.dns.ptr(self.ip).await else {
            return Vec::new();
        };
        let mut out = Vec::new();
        for name in names.into_iter().take(MAX_PTR_NAMES) {
            if self.validates(&name).await {
                out.push(name);
            }
        }
        out
    }

    /// 5.5: whether `name`'s addresses of `<ip>`'s family include `<ip>`.
    async fn validates(&self, name: &str) -> bool {
        self.addresses(name)
            .await
            .is_ok_and(|addrs| addrs.contains(&self.ip))
    }

    /// The A or AAAA records of `name`, as the client's address is IPv4 or IPv6.
    async fn addresses(&self, name: &str) -> Result<Vec<IpAddr>, DnsFailure> {
        Ok(match self.ip {
            IpAddr::V4(_) => self
                .dns
                .a(name)
                .await?
                .into_iter()
                .map(IpAddr::V4)
                .collect(),
            IpAddr::V6(_) => self
                .dns
                .aaaa(name)
                .await?
                .into_iter()
                .map(IpAddr::V6)
                .collect(),
        })
    }

    /// Whether `addr` (of the client's family) covers the client with the dual CIDR
    /// lengths (5.3, 5.4).
    fn in_cidr(&self, addr: IpAddr, v4: u8, v6: u8) -> bool {
        match (self.ip, addr) {
            (IpAddr::V4(ip), IpAddr::V4(net)) => in_v4(ip, net, v4),
            (IpAddr::V6(ip), IpAddr::V6(net)) => in_v6(ip, net, v6),
            _ => false,
        }
    }
}

/// 7.2 `%{p}`: `<domain>` if validated, else a subdomain of it, else any validated name.
fn pick_validated<'a>(names: &'a [String], domain: &str) -> Option<&'a str> {
    names
        .iter()
        .find(|n| n.eq_ignore_ascii_case(domain))
        .or_else(|| names.iter().find(|n| is_within(n, domain)))
        .or_else(|| names.first())
        .map(String::as_str)
}

/// `name` is `domain` or a subdomain of it (case-insensitive, trailing dots ignored).
fn is_within(name: &str, domain: &str) -> bool {
    let name = name.strip_suffix('.').unwrap_or(name).to_ascii_lowercase();
    let domain = domain
        .strip_suffix('.')
        .unwrap_or(domain)
        .to_ascii_lowercase();
    name == domain
        || (name.len() > domain.len()
            && name.ends_with(&domain)
            && name.as_bytes()[name.len() - domain.len() - 1] == b'.')
}

fn in_v4(ip: Ipv4Addr, net: Ipv4Addr, len: u8) -> bool {
    let mask = u32::MAX
        .checked_shl(32 - u32::from(len.min(32)))
        .unwrap_or(0);
    u32::from(ip) & mask == u32::from(net) & mask
}

fn in_v6(ip: Ipv6Addr, net: Ipv6Addr, len: u8) -> bool {
    let mask = u128::MAX
        .checked_shl(128 - u32::from(len.min(128)))
        .unwrap_or(0);
    u128::from(ip) & mask == u128::from(net) & mask
}

/// 2.6.7: a DNS error is a temperror.
fn temp(name: &str, why: &str) -> Abort {
    Abort::Temp(format!("lookup of {} failed: {why}", shorten(name)))
}

/// A name for a sentence: at most 80 characters (reasons are cut at 200).
fn shorten(name: &str) -> String {
    if name.len() <= 80 {
        return name.to_string();
    }
    let mut cut = name.len() - 77;
    while !name.is_char_boundary(cut) {
        cut += 1;
    }
    format!("...{}", &name[cut..])
}

#[cfg(test)]
mod unit {
    use super::*;

    #[test]
    fn cidr_matching() {
        let ip = Ipv4Addr::new(192, 0, 2, 130);
        assert!(in_v4(ip, Ipv4Addr::new(192, 0, 2, 0), 24));
        assert!(in_v4(ip, Ipv4Addr::new(192, 0, 2, 128), 25));
        assert!(!in_v4(ip, Ipv4Addr::new(192, 0, 2, 0), 25));
        assert!(in_v4(ip, Ipv4Addr::new(10, 0, 0, 0), 0));
        assert!(in_v4(ip, ip, 32));
        assert!(!in_v4(ip, Ipv4Addr::new(192, 0, 2, 131), 32));
        let ip6: Ipv6Addr = "2001:db8::cb01".parse().unwrap();
        assert!(in_v6(ip6, "2001:db8::".parse().unwrap(), 32));
        assert!(in_v6(ip6, "::".parse().unwrap(), 0));
        assert!(in_v6(ip6, ip6, 128));
        assert!(!in_v6(ip6, "2001:db9::".parse().unwrap(), 32));
    }

    #[test]
    fn domains() {
        assert!(valid_domain("example.com"));
        assert!(valid_domain("example.com."));
        assert!(valid_domain("_spf.example.com"));
        assert!(!valid_domain("localhost"));
        assert!(!valid_domain("example..com"));
        assert!(!valid_domain(".example.com"));
        assert!(!valid_domain("[192.0.2.1]"));
        assert!(!valid_domain(&format!("{}.com", "a".repeat(64))));
        assert!(!valid_domain(&format!("{}com", "a.".repeat(127))));
        assert!(is_within("mx.example.com", "example.com"));
        assert!(is_within("Example.COM.", "example.com"));
        assert!(!is_within("badexample.com", "example.com"));
        assert!(!is_within("com", "example.com"));
        assert_eq!(ascii_domain("Bücher.Example."), "xn--bcher-kva.example");
        assert_eq!(ascii_domain("A.Example."), "a.example");
    }

    #[test]
    fn validated_name_preference() {
        let names = vec![
            "other.example".to_string(),
            "mx.a.example".to_string(),
            "a.example".to_string(),
        ];
        assert_eq!(pick_validated(&names, "a.example"), Some("a.example"));
        assert_eq!(
            pick_validated(&names[..2], "a.example"),
            Some("mx.a.example")
        );
        assert_eq!(
            pick_validated(&names[..1], "a.example"),
            Some("other.example")
        );
        assert_eq!(pick_validated(&[], "a.example"), None);
    }

    #[test]
    fn long_names_are_shortened() {
        let long = "x".repeat(300);
        assert_eq!(shorten(&long).len(), 80);
        assert_eq!(shorten("a.example"), "a.example");
    }
}
