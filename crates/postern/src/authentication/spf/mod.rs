//! Our SPF evaluator (RFC 7208): `check_host()` (4) over any [`Dns`], so the tests run it
//! on a fake one and the relay on `crate::dns::Resolver` (hickory, its bounded cache keeping
//! each answer within its TTL).
//!
//! - [`record`]: which TXT record is the SPF record (4.5) and its syntax (4.6, 12);
//! - [`macros`]: macro-strings and domain-specs, and their expansion (7);
//! - [`eval`]: the evaluation (4.6-4.8, 5, 6) with the limits of 4.6.4: 10 terms that query
//!   DNS, 2 void lookups, 10 names per `mx` and `ptr`, and a time budget.
//!
//! Nothing here panics on any record or answer; every limit gives a permerror (or, for
//! time, a temperror) with a sentence that says which.

pub mod eval;
pub mod macros;
pub mod record;

#[cfg(test)]
mod tests;

use std::future::Future;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

pub use eval::{Evaluation, Request, check_host};

/// The results of 2.6.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SpfResult {
    None,
    Neutral,
    Pass,
    Fail,
    SoftFail,
    TempError,
    PermError,
}

impl SpfResult {
    pub fn as_str(self) -> &'static str {
        match self {
            SpfResult::None => "none",
            SpfResult::Neutral => "neutral",
            SpfResult::Pass => "pass",
            SpfResult::Fail => "fail",
            SpfResult::SoftFail => "softfail",
            SpfResult::TempError => "temperror",
            SpfResult::PermError => "permerror",
        }
    }
}

/// Why a lookup gave no answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DnsFailure {
    /// NXDOMAIN (RCODE 3), or a name DNS cannot represent: a void lookup (4.6.4).
    NxDomain,
    /// SERVFAIL, timeout and the like (2.6.7: temperror).
    Temporary(String),
}

/// A lookup's records; `Ok` with none is NOERROR/NODATA, also a void lookup.
pub type Answer<T> = Result<Vec<T>, DnsFailure>;

/// The DNS questions SPF asks. Names are as expanded, without a trailing dot; answers'
/// names normalised (lower case, no trailing dot).
pub trait Dns: Sync {
    /// TXT records, each record's strings joined without spaces (3.3).
    fn txt(&self, name: &str) -> impl Future<Output = Answer<String>> + Send;
    fn a(&self, name: &str) -> impl Future<Output = Answer<Ipv4Addr>> + Send;
    fn aaaa(&self, name: &str) -> impl Future<Output = Answer<Ipv6Addr>> + Send;
    /// MX exchanges, no implicit MX (5.4), a null MX's root left out.
    fn mx(&self, name: &str) -> impl Future<Output = Answer<String>> + Send;
    /// PTR names of `ip`.
    fn ptr(&self, ip: IpAddr) -> impl Future<Output = Answer<String>> + Send;
}

fn from_resolve<T>(r: Result<Vec<T>, crate::dns::ResolveError>) -> Answer<T> {
    use crate::dns::ResolveError;
    match r {
        Ok(v) => Ok(v),
        Err(ResolveError::Temporary(why)) => Err(DnsFailure::Temporary(why)),
        Err(ResolveError::NoSuchDomain | ResolveError::NoAddress | ResolveError::NullMx) => {
            Err(DnsFailure::NxDomain)
        }
    }
}

impl Dns for crate::dns::Resolver {
    async fn txt(&self, name: &str) -> Answer<String> {
        from_resolve(crate::dns::Resolver::txt(self, name).await)
    }

    async fn a(&self, name: &str) -> Answer<Ipv4Addr> {
        from_resolve(self.ipv4_addresses(name).await)
    }

    async fn aaaa(&self, name: &str) -> Answer<Ipv6Addr> {
        from_resolve(self.ipv6_addresses(name).await)
    }

    async fn mx(&self, name: &str) -> Answer<String> {
        from_resolve(self.mx_names(name).await)
    }

    async fn ptr(&self, ip: IpAddr) -> Answer<String> {
        from_resolve(self.ptr_names(ip).await)
    }
}
