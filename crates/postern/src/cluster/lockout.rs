//! AUTH failure counts and lockouts in Redis, with the semantics of `auth::limiter`
//! (a failure counts for exactly `window`, the failure that brings the count to
//! `max_failures` starts a lockout of `lockout`, failures while locked neither count nor
//! extend it, a success clears only the user name's count, IPv6 per block), so that a
//! lockout earned on one node holds on every node. Trusted clients never come here: they
//! are never locked out, and their tarpit is counted on the node alone.
//!
//! Keys (all expire by themselves): `postern:auth:fail:{ip,user}:<key>`, a sorted set of
//! failure marks scored by Redis time, at most [`MAX_MARKS`](crate::auth::limiter::MAX_MARKS)
//! members; `postern:auth:lock:{ip,user}:<key>`, a string with the lockout as its expiry.
//! One round trip per operation: the check is two PTTLs in one pipeline, the settling of
//! a checked attempt one Lua script (`auth_settle.lua`).

use std::net::IpAddr;
use std::time::Duration;

use redis::Value;

use super::{Cluster, KEY_PREFIX, ints, micros, millis};
use crate::auth::limiter::{FailureOutcome, Lockout, MAX_MARKS, Scope, Settings};
use crate::policy::client_block;

/// What Redis made of a checked attempt.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Settled {
    /// A lockout is in force (begun by another attempt, on any node): answer 454.
    Refused(Lockout),
    /// A success: the user's failures are cleared.
    Granted,
    /// A failure, counted.
    Failed(FailureOutcome),
}

/// The four keys of an attempt: the address's failures and lock, the user's.
struct Keys {
    ip_fail: String,
    ip_lock: String,
    user_fail: String,
    user_lock: String,
}

impl Keys {
    fn new(ip: IpAddr, user: &str, s: &Settings) -> Keys {
        let block = client_block(ip, s.ipv6_prefix);
        Keys {
            ip_fail: format!("{KEY_PREFIX}auth:fail:ip:{block}"),
            ip_lock: format!("{KEY_PREFIX}auth:lock:ip:{block}"),
            user_fail: format!("{KEY_PREFIX}auth:fail:user:{user}"),
            user_lock: format!("{KEY_PREFIX}auth:lock:user:{user}"),
        }
    }
}

/// A PTTL reply as a lockout in force.
fn lock(scope: Scope, pttl_ms: i64) -> Option<Lockout> {
    let ms = u64::try_from(pttl_ms).ok().filter(|&ms| ms > 0)?;
    Some(Lockout {
        scope,
        remaining: std::time::Duration::from_millis(ms),
    })
}

impl Cluster {
    /// Whether an attempt from `ip` (an untrusted client) for `user` is locked out on
    /// the cluster: the address (its block) first, then the user name when
    /// `per_user`, as `Limiter::check`. `None`: Redis cannot say (count locally).
    /// Waits at most `bound` (one AUTH's check and settle share `[cluster] timeout`).
    pub async fn auth_check(
        &self,
        ip: IpAddr,
        user: &str,
        s: &Settings,
        bound: Duration,
    ) -> Option<Option<Lockout>> {
        let keys = Keys::new(ip, user, s);
        let mut pipe = redis::pipe();
        pipe.cmd("PTTL").arg(&keys.ip_lock);
        if s.per_user {
            pipe.cmd("PTTL").arg(&keys.user_lock);
        }
        let mut con = self.connection();
        let reply: Value = self
            .call_within("auth_check", bound, pipe.query_async(&mut con))
            .await?;
        match ints(&reply).as_deref() {
            Some([ip_ms, rest @ ..]) if rest.len() == usize::from(s.per_user) => Some(
                lock(Scope::Ip, *ip_ms)
                    .or_else(|| rest.first().and_then(|&ms| lock(Scope::User, ms))),
            ),
            _ => self.odd_reply("auth_check", &reply),
        }
    }

    /// Settles a checked attempt of an untrusted client: refused if a lockout began
    /// meanwhile (on any node), else a success clears `user`'s failures, or a failure is
    /// counted for the address and, when `known` (in the users file) and `per_user`, for
    /// the name. `None`: Redis cannot say (count locally). Waits at most `bound`.
    pub async fn auth_settle(
        &self,
        ip: IpAddr,
        user: &str,
        known: bool,
        success: bool,
        s: &Settings,
        bound: Duration,
    ) -> Option<Settled> {
        let keys = Keys::new(ip, user, s);
        let keep = usize::try_from(s.max_failures)
            .unwrap_or(MAX_MARKS)
            .clamp(1, MAX_MARKS);
        let flag = |b: bool| if b { "1" } else { "0" };
        let mut invocation = self.scripts.auth_settle.key(&keys.ip_fail);
        invocation
            .key(&keys.ip_lock)
            .key(&keys.user_fail)
            .key(&keys.user_lock)
            .arg(if success { "ok" } else { "fail" })
            .arg(micros(s.window))
            .arg(s.max_failures.max(1))
            .arg(keep)
            .arg(millis(s.lockout))
            .arg(self.nonce())
            .arg(flag(s.per_user))
            .arg(flag(s.per_user && known));
        let mut con = self.connection();
        let reply: Value = self
            .call_within("auth_settle", bound, invocation.invoke_async(&mut con))
            .await?;
        let scope = |n: i64| if n == 1 { Scope::User } else { Scope::Ip };
        match ints(&reply).as_deref() {
            // None when it expired between the PTTL and now: as good as not locked, but
            // this attempt was not counted; the local count decides.
            Some([1, which, ms]) => lock(scope(*which), *ms).map(Settled::Refused),
            Some([0, _, _, _]) if success => Some(Settled::Granted),
            Some([0, count, ip_started, user_started]) => {
                let mut started = Vec::new();
                for (flag, scope) in [(ip_started, Scope::Ip), (user_started, Scope::User)] {
                    if *flag == 1 {
                        started.push(Lockout {
                            scope,
                            remaining: s.lockout,
                        });
                    }
                }
                Some(Settled::Failed(FailureOutcome {
                    ip_failures: u32::try_from(*count).unwrap_or(u32::MAX),
                    started,
                }))
            }
            _ => self.odd_reply("auth_settle", &reply),
        }
    }
}
