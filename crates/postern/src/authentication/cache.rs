//! DKIM key records for mail-auth's `verify_dkim`, kept until their TTL runs out and never
//! more than a fixed number of them, so that a sender cannot grow the memory of the relay
//! by making us look up names of its choosing (every selector is chosen by the sender).
//! SPF and DMARC look up through `crate::dns`, whose hickory cache is bounded the same way.
//!
//! mail-auth asks its [`ResolverCache`] before each lookup and stores each answer with the
//! instant it stops being valid (the TTL of the answer, as hickory computed it). Here that
//! instant is also capped at [`MAX_TTL`], and when the map is full, expired entries go
//! first, then the entry that expires soonest (a scan, done only when full).

use std::borrow::Borrow;
use std::collections::HashMap;
use std::hash::Hash;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mail_auth::ResolverCache;

/// Longest an answer is kept whatever its TTL: a changed SPF record or rotated DKIM key
/// is seen within minutes (the same cap as `crate::dns`).
pub const MAX_TTL: Duration = Duration::from_secs(5 * 60);

/// A bounded map of answers with their expiry. `Send + Sync`.
pub struct TtlCache<K, V> {
    capacity: usize,
    entries: Mutex<HashMap<K, (V, Instant)>>,
}

impl<K: Hash + Eq + Clone, V: Clone> TtlCache<K, V> {
    /// An empty cache holding at most `capacity` answers (at least one).
    pub fn new(capacity: usize) -> Self {
        TtlCache {
            capacity: capacity.max(1),
            entries: Mutex::new(HashMap::new()),
        }
    }

    /// How many answers are held (expired ones included until they are pushed out).
    pub fn len(&self) -> usize {
        self.lock().len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<K, (V, Instant)>> {
        // A panic elsewhere while holding the lock leaves a map that is still whole.
        self.entries.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn insert_at(&self, key: K, value: V, valid_until: Instant, now: Instant) {
        let valid_until = valid_until.min(now + MAX_TTL);
        if valid_until <= now {
            return;
        }
        let mut map = self.lock();
        if map.len() >= self.capacity && !map.contains_key(&key) {
            map.retain(|_, (_, until)| *until > now);
            if map.len() >= self.capacity {
                let soonest = map
                    .iter()
                    .min_by_key(|(_, (_, until))| *until)
                    .map(|(k, _)| k.clone());
                if let Some(k) = soonest {
                    map.remove(&k);
                }
            }
        }
        map.insert(key, (value, valid_until));
    }

    fn get_at<Q>(&self, key: &Q, now: Instant) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        let mut map = self.lock();
        match map.get(key) {
            Some((value, until)) if *until > now => Some(value.clone()),
            Some(_) => {
                map.remove(key);
                None
            }
            None => None,
        }
    }
}

impl<K: Hash + Eq + Clone, V: Clone> ResolverCache<K, V> for TtlCache<K, V> {
    fn get<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.get_at(name, Instant::now())
    }

    fn remove<Q>(&self, name: &Q) -> Option<V>
    where
        K: Borrow<Q>,
        Q: Hash + Eq + ?Sized,
    {
        self.lock().remove(name).map(|(v, _)| v)
    }

    fn insert(&self, key: K, value: V, valid_until: Instant) {
        self.insert_at(key, value, valid_until, Instant::now());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_live_until_their_ttl() {
        let c: TtlCache<Box<str>, u32> = TtlCache::new(10);
        let now = Instant::now();
        c.insert_at("a.".into(), 1, now + Duration::from_secs(60), now);
        assert_eq!(c.get_at("a.", now + Duration::from_secs(59)), Some(1));
        assert_eq!(c.get_at("a.", now + Duration::from_secs(60)), None);
        // The expired entry is gone, not just hidden.
        assert!(c.is_empty());
    }

    #[test]
    fn ttl_is_capped_and_zero_ttl_is_not_stored() {
        let c: TtlCache<Box<str>, u32> = TtlCache::new(10);
        let now = Instant::now();
        c.insert_at("long.".into(), 1, now + Duration::from_secs(86_400), now);
        assert_eq!(
            c.get_at("long.", now + MAX_TTL - Duration::from_secs(1)),
            Some(1)
        );
        assert_eq!(c.get_at("long.", now + MAX_TTL), None);
        c.insert_at("zero.".into(), 2, now, now);
        assert!(c.is_empty());
    }

    #[test]
    fn never_holds_more_than_its_capacity() {
        let c: TtlCache<Box<str>, u32> = TtlCache::new(100);
        let now = Instant::now();
        for i in 0..10_000u32 {
            let until = now + Duration::from_secs(10 + u64::from(i % 50));
            c.insert_at(format!("n{i}.attacker.example.").into(), i, until, now);
            assert!(c.len() <= 100);
        }
        assert_eq!(c.len(), 100);
        // The last answer stored is there; the soonest-expiring went first.
        assert_eq!(c.get_at("n9999.attacker.example.", now), Some(9999));
    }

    #[test]
    fn expired_entries_make_room_first() {
        let c: TtlCache<Box<str>, u32> = TtlCache::new(2);
        let now = Instant::now();
        c.insert_at("old.".into(), 1, now + Duration::from_secs(1), now);
        c.insert_at("keep.".into(), 2, now + Duration::from_secs(100), now);
        let later = now + Duration::from_secs(2);
        c.insert_at("new.".into(), 3, later + Duration::from_secs(100), later);
        assert_eq!(c.get_at("keep.", later), Some(2));
        assert_eq!(c.get_at("new.", later), Some(3));
        assert_eq!(c.get_at("old.", later), None);
    }
}
