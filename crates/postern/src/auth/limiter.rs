//! Failure counting and lockout for SMTP AUTH, as a pure data structure: no clock, no I/O,
//! no logging. Every method takes `now` from the caller, so the tests drive it with a fake
//! clock (interface "Precise semantics / Lockout", `docs/auth.md`).
//!
//! Trust: the keys are hostile. Client addresses and user names come from whoever connects,
//! so the tables are bounded (`Settings::capacity` entries each): a flood of distinct
//! addresses or names evicts old entries instead of growing memory. The caller only
//! records user names it knows (names in the users file), which keeps invented names out
//! of the user table altogether.
//!
//! Counting uses a fixed window per key: the window opens at the first failure and closes
//! `window` later; the failure that brings the count to `max_failures` within it starts a
//! lockout of `lockout`, and the key's next attempt is refused. When the lockout has run
//! out the key starts afresh. Durations are compared, never added to an `Instant`, so no
//! configured value can overflow the clock.

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::net::IpAddr;
use std::time::{Duration, Instant};

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
}

/// Default table size: 50,000 entries of under 100 bytes each, a few MB per table.
pub const DEFAULT_CAPACITY: usize = 50_000;

impl Settings {
    /// The settings of an `[auth]` section, with the default table capacity.
    pub fn from_config(auth: &crate::config::Auth) -> Settings {
        Settings {
            max_failures: auth.max_failures.max(1),
            window: auth.failure_window,
            lockout: auth.lockout,
            per_user: auth.per_user_lockout,
            capacity: DEFAULT_CAPACITY,
        }
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
    /// Failures of this client address in the current window, this one included (the
    /// tarpit grows with it).
    pub ip_failures: u32,
    /// Lockouts this failure started (per address, per user name, or both).
    pub started: Vec<Lockout>,
}

/// The failure counts of one address or one user name.
#[derive(Debug, Clone, Copy)]
struct Entry {
    failures: u32,
    window_start: Instant,
    /// When the current lockout began, if one is or was in force.
    locked_at: Option<Instant>,
    /// Last failure recorded; eviction removes the least recent first.
    last_seen: Instant,
}

impl Entry {
    fn new(now: Instant) -> Entry {
        Entry {
            failures: 0,
            window_start: now,
            locked_at: None,
            last_seen: now,
        }
    }

    /// Time left in the lockout, if one is in force at `now`.
    fn lockout_left(&self, s: &Settings, now: Instant) -> Option<Duration> {
        let elapsed = now.saturating_duration_since(self.locked_at?);
        s.lockout.checked_sub(elapsed).filter(|d| !d.is_zero())
    }

    /// Whether `now` is still inside the counting window.
    fn in_window(&self, s: &Settings, now: Instant) -> bool {
        now.saturating_duration_since(self.window_start) < s.window
    }

    /// An entry that neither locks nor counts anything any more can be dropped.
    fn is_expired(&self, s: &Settings, now: Instant) -> bool {
        self.lockout_left(s, now).is_none() && !(self.failures > 0 && self.in_window(s, now))
    }
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
        if e.locked_at.is_some() && e.lockout_left(s, now).is_none() {
            // The lockout ran out: start afresh.
            *e = Entry::new(now);
        }
        if !e.in_window(s, now) || e.failures == 0 {
            e.failures = 0;
            e.window_start = now;
        }
        e.failures = e.failures.saturating_add(1);
        e.last_seen = now;
        // A failure recorded while already locked out (an attempt that was checked before
        // the lockout began) does not extend it.
        let start = may_lock && e.locked_at.is_none() && e.failures >= s.max_failures;
        if start {
            e.locked_at = Some(now);
        }
        (e.failures, start)
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
            *e = Entry {
                locked_at: e.locked_at,
                ..Entry::new(now)
            };
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
    ips: Table<IpAddr>,
    users: Table<String>,
}

impl Limiter {
    pub fn new(settings: Settings) -> Limiter {
        Limiter {
            settings,
            ips: Table::new(),
            users: Table::new(),
        }
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Entries held: (addresses, user names).
    pub fn entries(&self) -> (usize, usize) {
        (self.ips.entries.len(), self.users.entries.len())
    }

    /// Whether an attempt from `ip` for `user` must be refused (454) without looking at the
    /// password. Trusted clients never are. The address is checked first, so a client that
    /// is locked out learns nothing about the name it tries.
    pub fn check(&self, ip: IpAddr, user: &str, trusted: bool, now: Instant) -> Option<Lockout> {
        if trusted {
            return None;
        }
        let s = &self.settings;
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
        let (count, started) = self.ips.fail(ip, !trusted, &s, now);
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

    /// Record a successful attempt: the failure counts of `ip` and `user` start again from
    /// zero. A lockout in force stays (only a trusted client can succeed during one).
    pub fn record_success(&mut self, ip: IpAddr, user: &str, now: Instant) {
        let s = self.settings;
        self.ips.clear(&ip, &s, now);
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
        // After the lockout the count starts at zero.
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
    fn limiter_success_clears_counts_but_not_an_active_lockout() {
        let mut l = Limiter::new(settings());
        let t = Clock::new();
        l.record_failure(ip(1), Some("alice"), false, t.now());
        l.record_failure(ip(1), Some("alice"), false, t.now());
        l.record_success(ip(1), "alice", t.now());
        // Two more failures do not reach three.
        l.record_failure(ip(1), Some("alice"), false, t.now());
        let o = l.record_failure(ip(1), Some("alice"), false, t.now());
        assert_eq!(o.ip_failures, 2);
        assert_eq!(l.check(ip(1), "alice", false, t.now()), None);

        // alice locked out from elsewhere, then logs in from a trusted address.
        for n in 2..5 {
            l.record_failure(ip(n), Some("alice"), false, t.now());
        }
        l.record_success(ip(9), "alice", t.now());
        assert_eq!(
            l.check(ip(5), "alice", false, t.now()).unwrap().scope,
            Scope::User
        );
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
