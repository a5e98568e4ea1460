//! The memory budget for message bodies: one counter for the whole server, so that the
//! bodies all sessions hold while receiving and storing stay under `max_message_memory`
//! whatever the number of connections (25 MB × 1000 connections would otherwise be
//! 25 GB).
//!
//! A session holds a [`Reservation`] and grows it before it reads more of a message;
//! when the budget cannot cover the growth, the session drops the body, reads the rest
//! and answers `452 4.3.1` (the client tries again later: nothing is lost). Dropping a
//! reservation gives its bytes back.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

/// Bytes of bodies the server may hold, and how many it holds now.
#[derive(Debug)]
pub struct MemoryBudget {
    /// Changed by a reload; reservations already held are kept, new growth obeys it.
    limit: AtomicU64,
    used: AtomicU64,
}

impl MemoryBudget {
    pub fn new(limit: u64) -> Arc<MemoryBudget> {
        Arc::new(MemoryBudget {
            limit: AtomicU64::new(limit),
            used: AtomicU64::new(0),
        })
    }

    /// An empty reservation against this budget.
    pub fn reservation(self: &Arc<Self>) -> Reservation {
        Reservation {
            budget: Arc::clone(self),
            held: 0,
        }
    }

    /// A reload's new `max_message_memory`.
    pub fn set_limit(&self, limit: u64) {
        self.limit.store(limit, Ordering::Release);
    }

    /// Bytes reserved now, by every session.
    pub fn used(&self) -> u64 {
        self.used.load(Ordering::Acquire)
    }

    fn take(&self, n: u64) -> bool {
        let limit = self.limit.load(Ordering::Acquire);
        self.used
            .fetch_update(Ordering::AcqRel, Ordering::Acquire, |used| {
                used.checked_add(n).filter(|&total| total <= limit)
            })
            .is_ok()
    }

    fn give(&self, n: u64) {
        self.used.fetch_sub(n, Ordering::AcqRel);
    }
}

/// One session's share of the budget; released when dropped.
#[derive(Debug)]
pub struct Reservation {
    budget: Arc<MemoryBudget>,
    held: u64,
}

impl Reservation {
    /// Makes the reservation exactly `bytes` (growing or shrinking it). Returns false,
    /// changing nothing, when the budget cannot cover the growth.
    pub fn resize(&mut self, bytes: u64) -> bool {
        if bytes > self.held {
            if !self.budget.take(bytes - self.held) {
                return false;
            }
        } else {
            self.budget.give(self.held - bytes);
        }
        self.held = bytes;
        true
    }

    /// Bytes held now.
    pub fn held(&self) -> u64 {
        self.held
    }
}

impl Drop for Reservation {
    fn drop(&mut self) {
        self.budget.give(self.held);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reservations_share_one_limit_and_give_back_on_drop() {
        let budget = MemoryBudget::new(100);
        let mut a = budget.reservation();
        let mut b = budget.reservation();
        assert!(a.resize(60));
        assert!(!b.resize(41), "over the limit");
        assert_eq!(b.held(), 0);
        assert!(b.resize(40));
        assert_eq!(budget.used(), 100);
        assert!(a.resize(10), "shrinking always works");
        assert_eq!(budget.used(), 50);
        drop(a);
        drop(b);
        assert_eq!(budget.used(), 0);
    }
}
