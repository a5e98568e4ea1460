//! Failure counting and lockout for SMTP AUTH, as a pure data structure: no clock, no I/O,
//! no logging. Every method takes `now` from the caller, so the tests drive it with a fake
//! clock (interface "Precise semantics / Lockout", `docs/auth.md`).
//!
//! Trust: the keys are hostile. Client addresses and user names come from whoever connects,
//! so the tables are bounded: at most `Settings::capacity` entries each, and each entry
//! keeps at most [`MAX_MARKS`] timestamps (fewer when `max_failures` is smaller), so a
//! table never holds more than about `capacity * (100 + 24 * MAX_MARKS)` bytes, plus the
//! text of the user names in the name table (about 25 MB at the default capacity, about
//! 10 MB with the default `max_failures` of 5).
//! A flood of distinct addresses or names evicts old entries instead of growing memory.
//! The caller only records user names it knows (names in the users file), which keeps
//! invented names out of the user table altogether. IPv6 clients are counted per block
//! (`policy::client_block`, a /64 by default), so one site cannot get fresh counts by
//! moving through the addresses of its own subnet.
//!
//! Counting uses a sliding window per key: a failure counts for exactly `window` after it
//! happened, and the failure that brings the count of failures in the last `window` to
//! `max_failures` starts a lockout of `lockout`; the key's next attempt is refused. So no
//! span of `window`, wherever it starts, holds more than `max_failures` failures that
//! were answered 535 (no burst at a window edge), as long as `lockout` is at least
//! `window`. When a lockout has run out, the failures still in the window keep counting,
//! so with a shorter `lockout` the next failure locks out again at once: one guess per
//! lockout, not `max_failures`. A success never clears the address's count (one valid account must not
//! buy unlimited guesses), only the user name's own. Durations are compared, never added
//! to an `Instant`, so no configured value can overflow the clock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

use crate::policy::client_block;

/// How many failures lock out, for how long, and how much the tables may hold.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Settings {
    /// Failures in `window` that start a lockout (at least 1).
    pub max_failures: u32,
    pub window: Duration,
    pub lockout: Duration,
    /// Count failures per user name too, and lock names out from any address.
    pub per_user: bool,
    /// Most entries per table (addresses, and user names).
    pub capacity: usize,
    /// IPv6 clients are counted per block of this many leading bits (`ipv6_prefix`).
    pub ipv6_prefix: u8,
}

/// Default table size: 50,000 entries of at most a few hundred bytes each.
pub const DEFAULT_CAPACITY: usize = 50_000;

/// Most timestamps one entry keeps. With `max_failures` up to this, every failure has its
/// own and the count is exact. Above it, the two marks closest in time are merged into
/// the later one: their failures then count until the later leaves the window, a little
/// longer than their own, never shorter. So counting may err on the side of a lockout,
/// never the other way.
pub const MAX_MARKS: usize = 16;

impl Settings {
    /// The settings of an `[auth]` section and the top-level `ipv6_prefix`, with the
    /// default table capacity.
    pub fn from_config(auth: &crate::config::Auth, ipv6_prefix: u8) -> Settings {
        Settings {
            max_failures: auth.max_failures.max(1),
            window: auth.failure_window,
            lockout: auth.lockout,
            per_user: auth.per_user_lockout,
            capacity: DEFAULT_CAPACITY,
            ipv6_prefix,
        }
    }

    /// How many marks an entry may keep.
    fn marks(&self) -> usize {
        usize::try_from(self.max_failures)
            .unwrap_or(MAX_MARKS)
            .clamp(1, MAX_MARKS)
    }
}

/// Which count a lockout belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scope {
    /// The client address.
    Ip,
    /// The user name (from any address).
    User,
}

impl Scope {
    /// The word used in log lines (`scope=ip`, `scope=user`).
    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Ip => "ip",
            Scope::User => "user",
        }
    }
}

/// A lockout in force: who, and for how much longer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Lockout {
    pub scope: Scope,
    /// Time left from the `now` the question was asked with.
    pub remaining: Duration,
}

/// What one recorded failure led to.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct FailureOutcome {
    /// Failures of this client address in the last `window`, this one included (the
    /// tarpit grows with it).
    pub ip_failures: u32,
    /// Lockouts this failure started (per address, per user name, or both).
    pub started: Vec<Lockout>,
}

/// `count` failures, the last of them at `at`.
#[derive(Debug, Clone, Copy)]
struct Mark {
    at: Instant,
    count: u32,
}

/// The failure counts of one address or one user name.
#[derive(Debug, Clone)]
struct Entry {
    /// Failures still in the window (once `forget_old` has run), oldest first; at most
    /// `Settings::marks()` of them.
    marks: Vec<Mark>,
    /// When the current lockout began, if one is or was in force.
    locked_at: Option<Instant>,
    /// Last failure recorded; eviction removes the least recent first.
    last_seen: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            marks: Vec::new(),
            locked_at: None,
            last_seen: now,
        }
    }

    /// Time left in the lockout, if one is in force at `now`.
    fn lockout_left(&self, s: &Settings, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.locked_at?);
        s.lockout.checked_sub(elapsed).filter(|d| !d.is_zero())
    }

    /// Failures in the window that ends at `now`.
    fn failures(&self, s: &Settings, now: Instant) -> u32 {
        self.marks
            .iter()
            .filter(|m| in_window(m, s, now))
            .fold(0u32, |n, m| n.saturating_add(m.count))
    }

    /// Drop the marks that have left the window (they are in time order).
    fn forget_old(&mut self, s: &Settings, now: Instant) {
        let old = self.marks.partition_point(|m| !in_window(m, s, now));
        self.marks.drain(..old);
    }

    /// Add one failure at `now`, keeping at most `limit` marks.
    fn push(&mut self, now: Instant, limit: usize) {
        // Clocks read on different threads may arrive a hair out of order: keep the marks
        // sorted by taking the later time (which can only lengthen a failure's count).
        let at = self.marks.last().map_or(now, |m| m.at.max(now));
        if let Some(last) = self.marks.last_mut()
            && last.at == at
        {
            last.count = last.count.saturating_add(1);
            return;
        }
        if self.marks.len() >= limit {
            // Merge the adjacent pair closest in time into its later mark.
            let i = (0..self.marks.len().saturating_sub(1))
                .min_by_key(|&i| {
                    self.marks[i + 1]
                        .at
                        .saturating_duration_since(self.marks[i].at)
                })
                .unwrap_or(0);
            let earlier = self.marks.remove(i);
            match self.marks.get_mut(i) {
                Some(later) => later.count = later.count.saturating_add(earlier.count),
                // limit 1: the single mark moves to now with its count.
                None => {
                    self.marks.push(Mark {
                        at,
                        count: earlier.count.saturating_add(1),
                    });
                    return;
                }
            }
        }
        if self.marks.len() == self.marks.capacity() {
            // Grow by doubling, but never past `limit`.
            let more = self.marks.capacity().max(1).min(limit - self.marks.len());
            self.marks.reserve_exact(more);
        }
        self.marks.push(Mark { at, count: 1 });
    }

    /// An entry that neither locks nor counts anything any more can be dropped.
    fn is_expired(&self, s: &Settings, now: Instant) -> bool {
        self.lockout_left(s, now).is_none() && self.failures(s, now) == 0
    }
}

/// Whether the failures of `m` still count at `now`.
fn in_window(m: &Mark, s: &Settings, now: Instant) -> bool {
    now.saturating_duration_since(m.at) < s.window
}

/// One bounded table of entries.
#[derive(Debug)]
struct Table<K> {
    entries: HashMap<K, Entry>,
}

impl<K: Hash + Eq + Clone> Table<K> {
    fn new() -> Table<K> {
        Table {
            entries: HashMap::new(),
        }
    }

    fn lockout<Q>(&self, key: &Q, s: &Settings, now: Instant) -> Option<Duration>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.entries.get(key)?.lockout_left(s, now)
    }

    /// Count one failure of `key`; returns the count in the window and whether it started
    /// a lockout (never when `may_lock` is false).
    fn fail(&mut self, key: K, may_lock: bool, s: &Settings, now: Instant) -> (u32, bool) {
        if !self.entries.contains_key(&key) {
            self.make_room(s, now);
        }
        let e = self.entries.entry(key).or_insert_with(|| Entry::new(now));
        // A failure recorded while already locked out (an attempt that was checked before
        // the lockout began) does not extend it. Once a lockout has run out, the failures
        // still in the window keep counting: with a lockout shorter than the window, the
        // next failure starts the next lockout.
        let running = e.lockout_left(s, now).is_some();
        e.forget_old(s, now);
        e.push(now, s.marks());
        e.last_seen = now;
        let failures = e.failures(s, now);
        let start = may_lock && !running && failures >= s.max_failures;
        if start {
            e.locked_at = Some(now);
        }
        (failures, start)
    }

    /// Forget the failures of `key`; an active lockout stays in force.
    fn clear<Q>(&mut self, key: &Q, s: &Settings, now: Instant)
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let Some(e) = self.entries.get_mut(key) else {
            return;
        };
        if e.lockout_left(s, now).is_some() {
            e.marks = Vec::new();
        } else {
            self.entries.remove(key);
        }
    }

    /// Make room for one new entry: drop expired entries, then, if the table is still full,
    /// the one whose last failure is oldest, unlocked entries before locked ones (so a
    /// flood of new keys does not free a key that is locked out). Scanning the table costs
    /// far less than the password hash every recorded failure has already cost.
    fn make_room(&mut self, s: &Settings, now: Instant) {
        if self.entries.len() < s.capacity {
            return;
        }
        self.entries.retain(|_, e| !e.is_expired(s, now));
        while self.entries.len() >= s.capacity.max(1) {
            let victim = self
                .entries
                .iter()
                .min_by_key(|(_, e)| (e.lockout_left(s, now).is_some(), e.last_seen))
                .map(|(k, _)| k.clone());
            match victim {
                Some(k) => self.entries.remove(&k),
                None => break,
            };
        }
    }
}

/// Failure counts and lockouts per client address and per user name.
#[derive(Debug)]
pub struct Limiter {
    settings: Settings,
    /// Clients outside trusted_networks, per address (IPv6: per block).
    ips: Table<IpAddr>,
    /// Trusted clients, per address: counted for the tarpit only. Kept apart so that a
    /// trusted host's failures never count toward an untrusted neighbour in its IPv6
    /// block, nor the other way round.
    trusted: Table<IpAddr>,
    users: Table<String>,
}

impl Limiter {
    pub fn new(settings: Settings) -> Limiter {
        Limiter {
            settings,
            ips: Table::new(),
            trusted: Table::new(),
            users: Table::new(),
        }
    }

    /// New settings (a reload); what was counted so far stays and is judged by them.
    pub fn set_settings(&mut self, settings: Settings) {
        self.settings = settings;
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Entries held: (addresses, user names). Trusted addresses are not included.
    pub fn entries(&self) -> (usize, usize) {
        (self.ips.entries.len(), self.users.entries.len())
    }

    /// Whether an attempt from `ip` for `user` must be refused (454) without looking at the
    /// password. Trusted clients never are. The address (its block, for IPv6) is checked
    /// first, so a client that is locked out learns nothing about the name it tries.
    pub fn check(&self, ip: IpAddr, user: &str, trusted: bool, now: Instant) -> Option<Lockout> {
        if trusted {
            return None;
        }
        let s = &self.settings;
        let ip = client_block(ip, s.ipv6_prefix);
        if let Some(remaining) = self.ips.lockout(&ip, s, now) {
            return Some(Lockout {
                scope: Scope::Ip,
                remaining,
            });
        }
        if s.per_user
            && let Some(remaining) = self.users.lockout(user, s, now)
        {
            return Some(Lockout {
                scope: Scope::User,
                remaining,
            });
        }
        None
    }

    /// Record a failed attempt (one answered 535). `known_user` is the user name when it is
    /// in the users file, `None` for an unknown name (never counted per name). A trusted
    /// client's failures are counted per address, for the tarpit, but lock nothing out and
    /// are not counted against the user name.
    pub fn record_failure(
        &mut self,
        ip: IpAddr,
        known_user: Option<&str>,
        trusted: bool,
        now: Instant,
    ) -> FailureOutcome {
        let s = self.settings;
        let mut outcome = FailureOutcome::default();
        let (count, started) = if trusted {
            let ip = crate::policy::canonical_ip(ip);
            self.trusted.fail(ip, false, &s, now)
        } else {
            self.ips
                .fail(client_block(ip, s.ipv6_prefix), true, &s, now)
        };
        outcome.ip_failures = count;
        if started {
            outcome.started.push(Lockout {
                scope: Scope::Ip,
                remaining: s.lockout,
            });
        }
        if let Some(user) = known_user
            && s.per_user
            && !trusted
        {
            let (_, started) = self.users.fail(user.to_string(), true, &s, now);
            if started {
                outcome.started.push(Lockout {
                    scope: Scope::User,
                    remaining: s.lockout,
                });
            }
        }
        outcome
    }

    /// Record a successful attempt: the failure count of `user` starts again from zero. The
    /// count of the client's address is left alone: it decays only with time, so logging
    /// in with one valid account between guesses (at other names, or at the same name
    /// with `per_user = false`) does not buy more guesses. A lockout in force stays (only
    /// a trusted client can succeed during one).
    pub fn record_success(&mut self, user: &str, now: Instant) {
        let s = self.settings;
        self.users.clear(user, &s, now);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MIN: Duration = Duration::from_secs(60);

    fn settings() -> Settings {
        Settings {
            max_failures: 3,
            window: 10 * MIN,
            lockout: 15 * MIN,
            per_user: true,
            capacity: 100,
            ipv6_prefix: 64,
        }
    }

    fn ip(last: u8) -> IpAddr {
        IpAddr::from([192, 0, 2, last])
    }

    /// A fake clock: a fixed origin plus an offset the test moves forward.
    struct Clock {
        origin: Instant,
        offset: Duration,
    }

    impl Clock {
        fn new() -> Clock {
            Clock {
                origin: Instant::now(),
                offset: Duration::ZERO,
            }
        }
        fn now(&self) -> Instant {
            self.origin + self.offset
        }
        fn advance(&mut self, d: Duration) {
            self.offset += d;
        }
    }

    #[test]
    fn limiter_counts_failures_and_locks_out_after_max() {
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        for n in 1..=2 {
            let o = l.record_failure(ip(7), Some("alice"), false, t.now());
            assert_eq!(o.ip_failures, n);
            assert!(o.started.is_empty());
            assert_eq!(l.check(ip(7), "alice", false, t.now()), None);
        }
        let o = l.record_failure(ip(7), Some("alice"), false, t.now());
        assert_eq!(o.ip_failures, 3);
        assert_eq!(
            o.started,
            [
                Lockout {
                    scope: Scope::Ip,
                    remaining: 15 * MIN
                },
                Lockout {
                    scope: Scope::User,
                    remaining: 15 * MIN
                }
            ]
        );
        // The next attempt is refused, whatever the name.
        let lock = l.check(ip(7), "bob", false, t.now()).unwrap();
        assert_eq!(lock.scope, Scope::Ip);
        assert_eq!(lock.remaining, 15 * MIN);
    }

    #[test]
    fn limiter_window_expiry_restarts_the_count() {
        let mut l = Limiter::new(settings());
        let mut t = Clock::new();
        l.record_failure(ip(7), None, false, t.now());
        l.record_failure(ip(7), None, false, t.now());
        t.advance(10 * MIN);
        // The window has closed: this is failure 1 of a new window, not failure 3.
        let o = l.record_failure(ip(7), None, false, t.now());
        assert_eq!(o.ip_failures, 1);
        assert!(o.started.is_empty());
        assert_eq!(l.check(ip(7), "x", false, t.now()), None);
        // Just inside the window still counts.
        t.advance(10 * MIN - Duration::from_millis(1));
        assert_eq!(l.record_failure(ip(7), None, false, t.now()).ip_failures, 2);
    }

    #[test]
    fn limiter_lockout_expires_and_counting_starts_afresh() {
        let mut l = Limiter::new(settings());
        let mut t = Clock::new();
        for _ in 0..3 {
            l.record_failure(ip(7), None, false, t.now());
        }
        t.advance(14 * MIN);
        assert_eq!(
            l.check(ip(7), "x", false, t.now()).map(|x| x.remaining),
            Some(MIN)
        );
        t.advance(MIN);
        assert_eq!(l.check(ip(7), "x", false, t.now()), None);
        // After the lockout the count starts at zero: the window (10 minutes) is shorter
        // than the lockout, so the old failures have left it.
        let o = l.record_failure(ip(7), None, false, t.now());
        assert_eq!(o.ip_failures, 1);
        assert!(o.started.is_empty());
        assert_eq!(l.check(ip(7), "x", false, t.now()), None);
    }

    #[test]
    fn limiter_failures_while_locked_do_not_extend_the_lockout() {
        let mut l = Limiter::new(settings());
        let mut t = Clock::new();
        for _ in 0..3 {
            l.record_failure(ip(7), None, false, t.now());
        }
        t.advance(5 * MIN);
        let o = l.record_failure(ip(7), None, false, t.now());
        assert!(o.started.is_empty());
        t.advance(10 * MIN);
        assert_eq!(l.check(ip(7), "x", false, t.now()), None);
    }

    #[test]
    fn limiter_per_user_counts_across_addresses() {
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        for n in 1..=3 {
            let o = l.record_failure(ip(n), Some("alice"), false, t.now());
            assert_eq!(o.ip_failures, 1, "each address failed once");
        }
        // A fourth address, never seen before, is refused for alice but not for bob.
        let lock = l.check(ip(99), "alice", false, t.now()).unwrap();
        assert_eq!(lock.scope, Scope::User);
        assert_eq!(l.check(ip(99), "bob", false, t.now()), None);
        // Unknown names are never counted per name.
        for n in 10..=13 {
            l.record_failure(ip(n), None, false, t.now());
        }
        assert_eq!(l.entries().1, 1);
    }

    #[test]
    fn limiter_without_per_user_lockout_counts_only_addresses() {
        let mut l = Limiter::new(Settings {
            per_user: false,
            ..settings()
        });
        let t = Clock::new();
        for n in 1..=5 {
            let o = l.record_failure(ip(n), Some("alice"), false, t.now());
            assert!(o.started.is_empty());
        }
        assert_eq!(l.check(ip(99), "alice", false, t.now()), None);
        assert_eq!(l.entries(), (5, 0));
        // The per-address count still works.
        for _ in 0..2 {
            l.record_failure(ip(1), Some("alice"), false, t.now());
        }
        assert_eq!(
            l.check(ip(1), "x", false, t.now()).unwrap().scope,
            Scope::Ip
        );
    }

    #[test]
    fn limiter_trusted_clients_are_never_locked_out() {
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        for n in 1..=10 {
            let o = l.record_failure(ip(1), Some("alice"), true, t.now());
            // Counted for the tarpit, never a lockout.
            assert_eq!(o.ip_failures, n);
            assert!(o.started.is_empty());
        }
        assert_eq!(l.check(ip(1), "alice", true, t.now()), None);
        assert_eq!(l.check(ip(1), "alice", false, t.now()), None);
        // Nor counted against the user name.
        assert_eq!(l.check(ip(2), "alice", false, t.now()), None);
        assert_eq!(l.entries().1, 0);

        // A user locked out by others can still log in from a trusted address.
        for n in 20..23 {
            l.record_failure(ip(n), Some("alice"), false, t.now());
        }
        assert!(l.check(ip(30), "alice", false, t.now()).is_some());
        assert_eq!(l.check(ip(1), "alice", true, t.now()), None);
    }

    #[test]
    fn limiter_success_clears_the_users_count_only() {
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        // alice mistypes twice from two addresses, then logs in from a third.
        l.record_failure(ip(1), Some("alice"), false, t.now());
        l.record_failure(ip(2), Some("alice"), false, t.now());
        l.record_success("alice", t.now());
        // Her count restarted: two more failures do not reach three.
        l.record_failure(ip(3), Some("alice"), false, t.now());
        l.record_failure(ip(4), Some("alice"), false, t.now());
        assert_eq!(l.check(ip(5), "alice", false, t.now()), None);

        // The address's count is not reset by a success, whoever logs in.
        let mut l = Limiter::new(Settings {
            per_user: false,
            ..settings()
        });
        for round in 1..=2 {
            let o = l.record_failure(ip(1), Some("bob"), false, t.now());
            assert_eq!(o.ip_failures, round);
            l.record_success("alice", t.now());
            l.record_success("bob", t.now());
        }
        let o = l.record_failure(ip(1), Some("bob"), false, t.now());
        assert_eq!(o.ip_failures, 3);
        assert_eq!(o.started.len(), 1);
        assert_eq!(
            l.check(ip(1), "alice", false, t.now()).unwrap().scope,
            Scope::Ip
        );

        // alice locked out from elsewhere, then logs in from a trusted address: the
        // lockout stays in force.
        let mut l = Limiter::new(settings());
        for n in 2..5 {
            l.record_failure(ip(n), Some("alice"), false, t.now());
        }
        l.record_success("alice", t.now());
        assert_eq!(
            l.check(ip(5), "alice", false, t.now()).unwrap().scope,
            Scope::User
        );
    }

    #[test]
    fn limiter_window_slides() {
        let mut l = Limiter::new(settings());
        let mut t = Clock::new();
        l.record_failure(ip(7), None, false, t.now());
        t.advance(6 * MIN);
        l.record_failure(ip(7), None, false, t.now());
        t.advance(5 * MIN);
        // 11 minutes: the first failure has left the window, the second has not.
        let o = l.record_failure(ip(7), None, false, t.now());
        assert_eq!(o.ip_failures, 2);
        assert!(o.started.is_empty());
        t.advance(MIN);
        // Three failures within 6 minutes, across the edge of the window the first one
        // opened: a fixed window would have restarted at 10 minutes and counted 2.
        let o = l.record_failure(ip(7), None, false, t.now());
        assert_eq!(o.ip_failures, 3);
        assert_eq!(o.started.len(), 1);
        assert!(l.check(ip(7), "x", false, t.now()).is_some());
    }

    /// An attacker who guesses as fast as the limiter lets him, following a fixed but
    /// irregular rhythm. Whatever `max_failures` is (exact counting or merged marks), no
    /// span of `window` holds more than `max_failures` failures that were not refused
    /// (with `lockout` >= `window`, as by default).
    #[test]
    fn limiter_no_window_holds_more_than_max_failures() {
        for max_failures in [1, 2, 3, 5, 16, 17, 20, 50] {
            let s = Settings {
                max_failures,
                lockout: 10 * MIN,
                ..settings()
            };
            let mut l = Limiter::new(s);
            let mut t = Clock::new();
            let mut allowed: Vec<Duration> = Vec::new();
            let mut seed = 12345u64 + u64::from(max_failures);
            for _ in 0..3000 {
                // Gaps from 0 to about 90 s (xorshift), so bursts and pauses alternate.
                seed ^= seed << 13;
                seed ^= seed >> 7;
                seed ^= seed << 17;
                t.advance(Duration::from_millis(seed % 90_000));
                if l.check(ip(1), "x", false, t.now()).is_none() {
                    l.record_failure(ip(1), None, false, t.now());
                    allowed.push(t.offset);
                }
            }
            assert!(allowed.len() > 100, "{max_failures}: {}", allowed.len());
            for (i, &end) in allowed.iter().enumerate() {
                let in_span = allowed[..=i]
                    .iter()
                    .filter(|&&a| end - a < s.window)
                    .count();
                assert!(
                    in_span <= max_failures as usize,
                    "max_failures {max_failures}: {in_span} failures in the window ending at {end:?}"
                );
            }
            for e in l.ips.entries.values() {
                assert!(e.marks.len() <= MAX_MARKS.min(max_failures as usize));
                assert!(e.marks.capacity() <= MAX_MARKS.min(max_failures as usize));
            }
        }
    }

    #[test]
    fn limiter_short_lockout_relocks_at_the_next_failure() {
        let mut l = Limiter::new(Settings {
            lockout: MIN,
            ..settings()
        });
        let mut t = Clock::new();
        for _ in 0..3 {
            l.record_failure(ip(1), Some("alice"), false, t.now());
        }
        t.advance(MIN);
        // The lockout has run out: the next attempt is checked...
        assert_eq!(l.check(ip(1), "alice", false, t.now()), None);
        // ...but its failure is the fourth in the window: locked out again at once.
        let o = l.record_failure(ip(1), Some("alice"), false, t.now());
        assert_eq!(o.ip_failures, 4);
        assert_eq!(o.started.len(), 2);
        assert!(l.check(ip(1), "alice", false, t.now()).is_some());
        // Once the old failures have left the window, counting is back to normal.
        t.advance(10 * MIN);
        assert_eq!(l.check(ip(1), "alice", false, t.now()), None);
        let o = l.record_failure(ip(1), Some("alice"), false, t.now());
        assert_eq!(o.ip_failures, 1);
        assert!(o.started.is_empty());
    }

    #[test]
    fn limiter_counts_exactly_up_to_max_marks_and_merges_beyond() {
        // max_failures = MAX_MARKS: one failure a minute for 10 minutes, then after a
        // pause one more: exactly those still in the window count.
        let mut l = Limiter::new(Settings {
            max_failures: MAX_MARKS as u32,
            ..settings()
        });
        let mut t = Clock::new();
        for _ in 0..10 {
            l.record_failure(ip(1), None, false, t.now());
            t.advance(MIN);
        }
        t.advance(5 * MIN - Duration::from_millis(1));
        // 14:59: failures from 5:00 on are in the window (5:00 .. 9:00, five of them).
        let o = l.record_failure(ip(1), None, false, t.now());
        assert_eq!(o.ip_failures, 6);

        // Beyond MAX_MARKS: counts stay exact while all failures are in the window, the
        // marks stay bounded, and the lockout starts at the max_failures-th failure.
        let mut l = Limiter::new(Settings {
            max_failures: 40,
            ..settings()
        });
        let mut t = Clock::new();
        for n in 1..40 {
            let o = l.record_failure(ip(1), None, false, t.now());
            assert_eq!(o.ip_failures, n);
            assert!(o.started.is_empty());
            t.advance(Duration::from_secs(1));
        }
        assert!(l.ips.entries.values().all(|e| e.marks.len() <= MAX_MARKS));
        let o = l.record_failure(ip(1), None, false, t.now());
        assert_eq!(o.started.len(), 1);
    }

    #[test]
    fn limiter_counts_ipv6_per_block() {
        let v6 = |s: &str| -> IpAddr { s.parse().unwrap() };
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        for a in ["2001:db8:1:2::1", "2001:db8:1:2::2", "2001:db8:1:2:ffff::1"] {
            l.record_failure(v6(a), None, false, t.now());
        }
        // The whole /64 is locked out, and only it.
        let lock = l.check(v6("2001:db8:1:2:abcd::9"), "x", false, t.now());
        assert_eq!(lock.unwrap().scope, Scope::Ip);
        assert_eq!(l.check(v6("2001:db8:1:3::1"), "x", false, t.now()), None);
        assert_eq!(l.entries().0, 1);
        // IPv4 addresses, also as mapped IPv6, are counted one by one.
        l.record_failure(ip(1), None, false, t.now());
        l.record_failure(v6("::ffff:192.0.2.1"), None, false, t.now());
        assert_eq!(
            l.record_failure(ip(1), None, false, t.now()).started.len(),
            1
        );
        assert_eq!(l.check(ip(2), "x", false, t.now()), None);

        // ipv6_prefix = 128: per address.
        let mut l = Limiter::new(Settings {
            ipv6_prefix: 128,
            ..settings()
        });
        for a in ["2001:db8::1", "2001:db8::2", "2001:db8::3"] {
            l.record_failure(v6(a), None, false, t.now());
        }
        assert_eq!(l.check(v6("2001:db8::4"), "x", false, t.now()), None);
        assert_eq!(l.entries().0, 3);
    }

    #[test]
    fn limiter_tables_stay_bounded() {
        let mut l = Limiter::new(Settings {
            capacity: 10,
            ..settings()
        });
        let mut t = Clock::new();
        // Lock one address out, then flood with new addresses and names.
        for _ in 0..3 {
            l.record_failure(ip(1), None, false, t.now());
        }
        for n in 0..1000u32 {
            t.advance(Duration::from_millis(10));
            let [_, _, a, b] = n.to_be_bytes();
            let addr = IpAddr::from([198, 51, a, b]);
            l.record_failure(addr, Some(&format!("user{n}")), false, t.now());
            let (ips, users) = l.entries();
            assert!(ips <= 10 && users <= 10, "{ips} {users}");
        }
        // The locked-out address was kept: unlocked entries are evicted first.
        assert_eq!(
            l.check(ip(1), "x", false, t.now()).unwrap().scope,
            Scope::Ip
        );

        // Expired entries go before live ones.
        t.advance(60 * MIN);
        l.record_failure(ip(2), None, false, t.now());
        assert_eq!(l.entries().0, 1);
    }

    #[test]
    fn limiter_huge_durations_do_not_overflow() {
        let mut l = Limiter::new(Settings {
            window: Duration::MAX,
            lockout: Duration::MAX,
            max_failures: 1,
            ..settings()
        });
        let mut t = Clock::new();
        l.record_failure(ip(1), None, false, t.now());
        t.advance(1000 * 24 * 60 * MIN);
        assert!(l.check(ip(1), "x", false, t.now()).is_some());
    }
}
