//! Sliding-window counters, as a pure data structure: no clock, no I/O, no logging. Every
//! method takes `now` from the caller, so the tests drive it with a fake clock. Used by
//! `[[rate_limit]]` (`policy::rate`) and a listener's `connection_rate`.
//!
//! **The window.** A window of length `W` is cut into [`BUCKETS`] buckets of width
//! `w = W / BUCKETS`; bucket `n` holds what was counted between `n·w` and `(n+1)·w` after
//! the table's origin. The count at a moment in bucket `n` is the sum of buckets
//! `n - BUCKETS ..= n`: `BUCKETS + 1` buckets, which reach back at least `W` (at most
//! `W + w`). So no span of `W`, wherever it starts, ever holds more than the limit (there
//! is no burst at a window edge, as a fixed window would allow: twice the limit across
//! its boundary); the price is that counting errs toward refusing for at most one bucket
//! width (1/16 of the window). The Redis counters of `crate::cluster` use the same
//! arithmetic, so a node counts the same way with and without Redis.
//!
//! **Memory.** Keys are hostile (client addresses, sender addresses: whoever connects
//! chooses them), so a table holds at most `capacity` entries of a fixed size: the key is
//! kept as a 64-bit hash under a per-table random key (SipHash, as `HashMap` uses), not as
//! text, so an entry costs about 100 bytes whatever the key (10 MB for the default
//! 100,000). When the table is full, entries that count nothing any more go first; if that
//! is not enough, the smallest counts, until the table is down to 7/8 of its capacity. A flood of new keys
//! can so only push out keys that had used little of their limit (each gets back at most
//! what it had counted), never the busy ones the limit is there for. Clearing costs one
//! pass over the table per `capacity / 8` new keys: constant time per key, amortised.

use std::collections::HashMap;
use std::hash::{BuildHasher, Hash, RandomState};
use std::time::{Duration, Instant};

/// Buckets per window.
pub const BUCKETS: u32 = 16;

/// Slots kept per entry: the current bucket and the `BUCKETS` before it.
const SLOTS: usize = BUCKETS as usize + 1;

/// Default most entries per table.
pub const DEFAULT_CAPACITY: usize = 100_000;

/// The width of one bucket of `window`, in microseconds (at least 1).
pub fn bucket_width_us(window: Duration) -> u64 {
    let us = u64::try_from(window.as_micros()).unwrap_or(u64::MAX);
    (us / u64::from(BUCKETS)).max(1)
}

/// The counts of one key: `SLOTS` buckets in a ring, the newest being `newest`.
#[derive(Debug, Clone)]
struct Counter {
    newest: i64,
    slots: [u32; SLOTS],
}

fn slot(bucket: i64) -> usize {
    // rem_euclid of a positive modulus is in 0..SLOTS.
    bucket.rem_euclid(SLOTS as i64) as usize
}

impl Counter {
    fn new(bucket: i64) -> Counter {
        Counter {
            newest: bucket,
            slots: [0; SLOTS],
        }
    }

    /// Moves the ring forward to `bucket`, emptying the buckets that fall out of it. A
    /// `bucket` older than the newest (a clock read a hair out of order) counts in the
    /// newest, which can only lengthen how long it counts.
    fn advance(&mut self, bucket: i64) -> i64 {
        if bucket <= self.newest {
            return self.newest;
        }
        let gap = bucket.saturating_sub(self.newest);
        if gap >= SLOTS as i64 {
            self.slots = [0; SLOTS];
        } else {
            for b in self.newest + 1..=bucket {
                self.slots[slot(b)] = 0;
            }
        }
        self.newest = bucket;
        bucket
    }

    /// The count at a moment in `bucket`.
    fn count(&self, bucket: i64) -> u64 {
        let gap = bucket.saturating_sub(self.newest);
        if gap >= SLOTS as i64 {
            return 0;
        }
        // With gap > 0 the `gap` oldest slots are out of the window at `bucket`.
        let gap = gap.max(0) as usize;
        (0..SLOTS - gap)
            .map(|age| u64::from(self.slots[slot(self.newest - age as i64)]))
            .sum()
    }

    fn add(&mut self, bucket: i64, amount: u32) -> i64 {
        let at = self.advance(bucket);
        let s = &mut self.slots[slot(at)];
        *s = s.saturating_add(amount);
        at
    }

    /// Takes back `amount` from `bucket`, if it is still counted.
    fn refund(&mut self, bucket: i64, amount: u32) {
        if bucket <= self.newest && self.newest - bucket < SLOTS as i64 {
            let s = &mut self.slots[slot(bucket)];
            *s = s.saturating_sub(amount);
        }
    }
}

/// One window's counters per key, bounded.
#[derive(Debug)]
pub struct Table {
    origin: Instant,
    width_us: u64,
    capacity: usize,
    hasher: RandomState,
    entries: HashMap<u64, Counter>,
    /// Times `make_room` went over the table.
    sweeps: u64,
}

/// Where an amount was added: give it to [`Table::refund`] to take it back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Bucket(pub i64);

impl Table {
    /// A table for `window` holding at most `capacity` keys; `now` is its origin.
    pub fn new(window: Duration, capacity: usize, now: Instant) -> Table {
        Table {
            origin: now,
            width_us: bucket_width_us(window),
            capacity: capacity.max(1),
            hasher: RandomState::new(),
            entries: HashMap::new(),
            sweeps: 0,
        }
    }

    fn bucket(&self, now: Instant) -> i64 {
        let us = u64::try_from(now.saturating_duration_since(self.origin).as_micros())
            .unwrap_or(u64::MAX);
        i64::try_from(us / self.width_us).unwrap_or(i64::MAX)
    }

    fn hash<K: Hash + ?Sized>(&self, key: &K) -> u64 {
        self.hasher.hash_one(key)
    }

    /// What `key` has counted in the window that ends at `now`.
    pub fn count<K: Hash + ?Sized>(&self, key: &K, now: Instant) -> u64 {
        self.entries
            .get(&self.hash(key))
            .map_or(0, |c| c.count(self.bucket(now)))
    }

    /// Check and add: when what `key` counted plus `amount` stays within `limit`, adds it
    /// and says where; otherwise adds nothing and returns the count so far.
    pub fn add<K: Hash + ?Sized>(
        &mut self,
        key: &K,
        limit: u64,
        amount: u32,
        now: Instant,
    ) -> Result<Bucket, u64> {
        let count = self.count(key, now);
        if count.saturating_add(u64::from(amount)) > limit {
            return Err(count);
        }
        Ok(self.record(key, amount, now))
    }

    /// Adds `amount` whatever the count (what another counter, Redis, already allowed).
    pub fn record<K: Hash + ?Sized>(&mut self, key: &K, amount: u32, now: Instant) -> Bucket {
        let h = self.hash(key);
        let bucket = self.bucket(now);
        if !self.entries.contains_key(&h) {
            self.make_room(bucket);
        }
        let counter = self
            .entries
            .entry(h)
            .or_insert_with(|| Counter::new(bucket));
        Bucket(counter.add(bucket, amount))
    }

    /// Takes back `amount` added at `bucket` (a message that did not reach 250). Nothing
    /// happens when the bucket has left the window or the key was pushed out.
    pub fn refund<K: Hash + ?Sized>(&mut self, key: &K, bucket: Bucket, amount: u32) {
        if let Some(c) = self.entries.get_mut(&self.hash(key)) {
            c.refund(bucket.0, amount);
        }
    }

    /// Keys held.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// True when no key is held.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Room for one more key (module documentation, "Memory"): a full table is cut down
    /// to 7/8 of its capacity at once (keys that count nothing first, then the smallest
    /// counts), so the pass over the table runs once per `capacity / 8` new keys at most,
    /// whatever the keys.
    fn make_room(&mut self, bucket: i64) {
        if self.entries.len() < self.capacity {
            return;
        }
        self.sweeps += 1;
        let low_water = self.capacity - self.capacity / 8;
        self.entries.retain(|_, c| c.count(bucket) > 0);
        if self.entries.len() <= low_water.min(self.capacity - 1) {
            return;
        }
        let mut loads: Vec<(u64, u64)> = self
            .entries
            .iter()
            .map(|(k, c)| (c.count(bucket), *k))
            .collect();
        let drop = (loads.len() - low_water.min(self.capacity - 1)).clamp(1, loads.len());
        loads.select_nth_unstable(drop - 1);
        for (_, k) in &loads[..drop] {
            self.entries.remove(k);
        }
    }

    /// Passes over the whole table made to find room so far (for the tests).
    #[cfg(test)]
    fn sweeps(&self) -> u64 {
        self.sweeps
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const WINDOW: Duration = Duration::from_secs(16);
    const STEP: Duration = Duration::from_secs(1); // one bucket of WINDOW

    #[test]
    fn window_adds_up_to_the_limit_and_refuses_beyond() {
        let t0 = Instant::now();
        let mut t = Table::new(WINDOW, 100, t0);
        for _ in 0..3 {
            assert!(t.add("bob", 3, 1, t0).is_ok());
        }
        assert_eq!(t.add("bob", 3, 1, t0), Err(3));
        assert!(t.add("alice", 3, 1, t0).is_ok(), "each key counts apart");
        assert_eq!(t.add("bob", 10, 8, t0), Err(3), "an amount past the limit");
        assert_eq!(t.count("bob", t0), 3);
    }

    #[test]
    fn window_counts_expire_after_the_window_and_one_bucket() {
        let t0 = Instant::now();
        let mut t = Table::new(WINDOW, 100, t0);
        t.add("k", 1, 1, t0).unwrap();
        assert_eq!(t.add("k", 1, 1, t0 + WINDOW), Err(1), "still counted at W");
        assert!(
            t.add("k", 1, 1, t0 + WINDOW + STEP).is_ok(),
            "gone after W + w"
        );
        assert_eq!(t.count("k", t0 + WINDOW * 10), 0);
    }

    #[test]
    fn window_refund_takes_back_what_was_added() {
        let t0 = Instant::now();
        let mut t = Table::new(WINDOW, 100, t0);
        let b = t.add("k", 2, 2, t0).unwrap();
        t.add("k", 2, 1, t0 + STEP).unwrap_err();
        t.refund("k", b, 1);
        assert!(t.add("k", 2, 1, t0 + STEP).is_ok());
        t.refund("k", Bucket(b.0 - 100), 5); // long gone: nothing happens
        assert_eq!(t.count("k", t0 + STEP), 2);
    }

    /// The property the module promises: wherever a span of W starts, what was allowed in
    /// it never exceeds the limit (a fixed window would allow twice at its edge).
    #[test]
    fn window_no_span_holds_more_than_the_limit() {
        let t0 = Instant::now();
        let limit = 10;
        let mut t = Table::new(WINDOW, 100, t0);
        let mut allowed = Vec::new();
        // An attempt every 100 ms for 10 windows, bursts included.
        for i in 0..1600u64 {
            let at = t0 + Duration::from_millis(i * 100);
            let tries = if i % 37 == 0 { 20 } else { 1 };
            for _ in 0..tries {
                if t.add("k", limit, 1, at).is_ok() {
                    allowed.push(at);
                }
            }
        }
        assert!(allowed.len() as u64 > 5 * limit, "it lets some through");
        for (i, start) in allowed.iter().enumerate() {
            let inside = allowed[i..]
                .iter()
                .take_while(|a| a.duration_since(*start) < WINDOW)
                .count();
            assert!(inside as u64 <= limit, "{inside} in one window");
        }
    }

    #[test]
    fn window_tables_stay_bounded_and_keep_busy_keys() {
        let t0 = Instant::now();
        let mut t = Table::new(WINDOW, 64, t0);
        t.add("busy", 5, 5, t0).unwrap();
        for i in 0..10_000 {
            t.add(&format!("flood-{i}"), 5, 1, t0).unwrap();
            assert!(t.len() <= 64);
        }
        assert_eq!(t.add("busy", 5, 1, t0), Err(5), "the busy key was kept");
        // One pass per capacity/8 new keys at most, even when each new key's count is
        // given back at once (a MAIL and an RSET), so that every full pass frees room.
        let mut t = Table::new(WINDOW, 800, t0);
        for i in 0..800 {
            t.add(&format!("k{i}"), 5, 1, t0).unwrap();
        }
        for i in 0..8_000 {
            let key = format!("cycle-{i}");
            let b = t.add(&key, 5, 1, t0).unwrap();
            t.refund(&key, b, 1);
        }
        assert!(t.sweeps() <= 8_000 / 100 + 1, "{} passes", t.sweeps());
    }

    #[test]
    fn window_clock_out_of_order_and_huge_times_do_not_panic() {
        let t0 = Instant::now() + Duration::from_secs(1000);
        let mut t = Table::new(Duration::from_secs(u64::MAX / 4), 10, t0);
        t.add("k", 5, 1, t0).unwrap();
        t.add("k", 5, 1, t0 - Duration::from_secs(500)).unwrap();
        assert_eq!(t.count("k", t0), 2);
        let mut tiny = Table::new(Duration::ZERO, 10, t0);
        tiny.add("k", 1, 1, t0).unwrap();
        assert_eq!(tiny.count("k", t0 + Duration::from_secs(1)), 0);
        assert_eq!(bucket_width_us(Duration::ZERO), 1);
    }
}
