//! The runner's timetable: which waiting message is attempted next, destination by
//! destination. Pure bookkeeping (no clock of its own, no I/O), so that every operation
//! costs O(log n) in the number of waiting messages, whatever the queue holds.
//!
//! - Each destination (MX domain, smart host, address) has its own waiting lines: new
//!   mail (never attempted) and retries (deferred, or found in the spool at start), and
//!   a count of running attempts, at most `per_destination` of them. A message to several
//!   destinations waits in each of their lines and runs once, counting in all of them.
//! - `heads` holds, for each destination that may start an attempt now or later, its
//!   first waiting message, so the next attempt is found without looking at any other:
//!   new mail first (`fresh`), then the retry due first. One destination's backlog,
//!   however long, is one entry here: it never delays mail to another.
//! - A destination where an attempt reached no host (connection refused, timed out, no
//!   address) is suspended, as Postfix marks a site dead: its messages wait without
//!   attempts until the suspension ends, then one attempt probes it; a probe that
//!   reaches a host ends the suspension, one that does not doubles it. The first
//!   suspension is the retry schedule's first interval (at most `FIRST_SUSPENSION`), the
//!   longest its last (at most `MAX_SUSPENSION`): never slower than the schedule. A million messages to a dead next hop cost nothing while it is
//!   down. (Expiry does not wait for the probe: the runner attempts a message that has
//!   outlived `max_queue_lifetime` whatever its destination's state, so that it bounces.)

use std::collections::{BTreeSet, HashMap};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::route::Destination;
use crate::queue::QueueId;

/// The first suspension of a destination that reached no host.
pub(crate) const FIRST_SUSPENSION: Duration = Duration::from_secs(60);
/// The longest suspension (the probes' period for a destination down for long).
pub(crate) const MAX_SUSPENSION: Duration = Duration::from_secs(30 * 60);

/// A destination, interned: messages carry these (8 bytes), not names.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub(crate) struct DestId(u64);

/// A message's place in a waiting line: when it is due, then arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub(crate) struct Slot {
    pub(crate) at: Instant,
    pub(crate) id: QueueId,
}

/// What an attempt found at a destination.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) enum Contact {
    /// A host answered (whatever it said).
    Reached,
    /// No host could be reached: why.
    Unreachable(Arc<str>),
}

/// Which line a message waits in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Line {
    /// Never attempted: goes before every retry.
    Fresh,
    /// Deferred before, or found in the spool at start.
    Retry,
}

/// Why and until when a destination is suspended.
#[derive(Clone, Debug)]
struct Suspension {
    until: Instant,
    length: Duration,
    reason: Arc<str>,
    /// A probe attempt is running.
    probing: bool,
}

struct Queue {
    name: Arc<Destination>,
    fresh: BTreeSet<Slot>,
    retry: BTreeSet<Slot>,
    running: usize,
    /// Queued messages whose destinations include this one ([`Schedule::hold`]).
    refs: usize,
    suspended: Option<Suspension>,
    /// What this queue has in `heads` (the line and key), to take it out again.
    head: Option<(Line, Slot)>,
}

impl Queue {
    fn waiting(&self) -> usize {
        self.fresh.len() + self.retry.len()
    }

    /// Its entry in `heads`, if it may start an attempt (now or at the entry's time).
    fn wanted_head(&self, cap: usize) -> Option<(Line, Slot)> {
        let fresh = self.fresh.first().copied();
        let first = fresh.or_else(|| self.retry.first().copied())?;
        match &self.suspended {
            None if self.running >= cap => None,
            None => Some((
                if fresh.is_some() {
                    Line::Fresh
                } else {
                    Line::Retry
                },
                first,
            )),
            // New mail to a suspended destination is deferred at once with its reason,
            // without contacting it (as Postfix's "delivery temporarily suspended").
            Some(_) if fresh.is_some() && self.running < cap => Some((Line::Fresh, first)),
            // One probe at a time, when the suspension ends; it waits with the retries.
            Some(s) if s.probing => None,
            Some(s) => Some((
                Line::Retry,
                Slot {
                    at: s.until.max(first.at),
                    id: first.id,
                },
            )),
        }
    }
}

pub(crate) struct Schedule {
    queues: HashMap<DestId, Queue>,
    names: HashMap<Arc<Destination>, DestId>,
    next_dest: u64,
    /// One entry per queue that may start an attempt: new mail, then retries.
    fresh_heads: BTreeSet<(Slot, DestId)>,
    retry_heads: BTreeSet<(Slot, DestId)>,
    per_destination: usize,
    first_suspension: Duration,
    max_suspension: Duration,
}

/// An attempt to start: the message, and whether it probes a suspended destination.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct Start {
    pub(crate) id: QueueId,
    pub(crate) probe: bool,
}

impl Schedule {
    pub(crate) fn new(per_destination: usize, retry_schedule: &[Duration]) -> Schedule {
        let mut s = Schedule {
            queues: HashMap::new(),
            names: HashMap::new(),
            next_dest: 0,
            fresh_heads: BTreeSet::new(),
            retry_heads: BTreeSet::new(),
            per_destination: 1,
            first_suspension: FIRST_SUSPENSION,
            max_suspension: MAX_SUSPENSION,
        };
        s.configure(per_destination, retry_schedule);
        s
    }

    /// New limits (a reload): running attempts per destination, and the retry schedule
    /// the suspensions follow.
    pub(crate) fn configure(&mut self, per_destination: usize, retry_schedule: &[Duration]) {
        let second = Duration::from_secs(1);
        self.first_suspension = retry_schedule
            .first()
            .copied()
            .unwrap_or(FIRST_SUSPENSION)
            .clamp(second, FIRST_SUSPENSION);
        self.max_suspension = retry_schedule
            .last()
            .copied()
            .unwrap_or(MAX_SUSPENSION)
            .clamp(self.first_suspension, MAX_SUSPENSION);
        self.per_destination = per_destination.max(1);
        let ids: Vec<DestId> = self.queues.keys().copied().collect();
        for d in ids {
            self.refresh(d);
        }
    }

    /// The id of a destination for a queued message: counted until the message lets it
    /// go ([`release`](Schedule::release)); a destination no message holds and nothing
    /// runs for is forgotten (with its suspension).
    pub(crate) fn hold(&mut self, name: &Destination) -> DestId {
        let d = self.intern(name);
        if let Some(q) = self.queues.get_mut(&d) {
            q.refs += 1;
        }
        d
    }

    /// A message no longer goes to `dests` (finished, deleted, or its recipients
    /// there are done).
    pub(crate) fn release(&mut self, dests: &[DestId]) {
        for &d in dests {
            if let Some(q) = self.queues.get_mut(&d) {
                q.refs = q.refs.saturating_sub(1);
            }
            self.forget_if_idle(d);
        }
    }

    /// The id of a known destination.
    pub(crate) fn find(&self, name: &Destination) -> Option<DestId> {
        self.names.get(name).copied()
    }

    /// The id of a destination (made on first use).
    pub(crate) fn intern(&mut self, name: &Destination) -> DestId {
        if let Some(&d) = self.names.get(name) {
            return d;
        }
        let d = DestId(self.next_dest);
        self.next_dest += 1;
        let name = Arc::new(name.clone());
        self.names.insert(Arc::clone(&name), d);
        self.queues.insert(
            d,
            Queue {
                name,
                fresh: BTreeSet::new(),
                retry: BTreeSet::new(),
                running: 0,
                refs: 0,
                suspended: None,
                head: None,
            },
        );
        d
    }

    /// A destination's name.
    pub(crate) fn name(&self, d: DestId) -> Option<&Arc<Destination>> {
        self.queues.get(&d).map(|q| &q.name)
    }

    /// Puts a message in the lines of its destinations.
    pub(crate) fn add(&mut self, line: Line, slot: Slot, dests: &[DestId]) {
        for &d in dests {
            if let Some(q) = self.queues.get_mut(&d) {
                match line {
                    Line::Fresh => q.fresh.insert(slot),
                    Line::Retry => q.retry.insert(slot),
                };
                self.refresh(d);
            }
        }
    }

    /// Takes a waiting message out of its destinations' lines.
    pub(crate) fn remove(&mut self, line: Line, slot: Slot, dests: &[DestId]) {
        for &d in dests {
            if let Some(q) = self.queues.get_mut(&d) {
                match line {
                    Line::Fresh => q.fresh.remove(&slot),
                    Line::Retry => q.retry.remove(&slot),
                };
                self.refresh(d);
            }
        }
    }

    /// The next attempt to start at `now`, if one is due, and the destination whose
    /// line it was first in: the caller then calls [`started`](Schedule::started) with
    /// the message's destinations (which takes it out of every line). New mail first.
    pub(crate) fn next(&mut self, now: Instant) -> Option<(Start, Line, Slot, DestId)> {
        let (slot, d, fresh) = match self.fresh_heads.first() {
            Some(&(slot, d)) if slot.at <= now => (slot, d, true),
            _ => match self.retry_heads.first() {
                Some(&(slot, d)) if slot.at <= now => (slot, d, false),
                _ => return None,
            },
        };
        let q = self.queues.get_mut(&d)?;
        // The message itself: the first in the queue's lines (the head's key may be the
        // suspension's end).
        let (line, first) = q
            .fresh
            .first()
            .map(|s| (Line::Fresh, *s))
            .or_else(|| q.retry.first().map(|s| (Line::Retry, *s)))?;
        debug_assert_eq!(first.id, slot.id);
        // From the retries of a suspended destination: the probe.
        let probe = match &mut q.suspended {
            Some(s) if !fresh => {
                s.probing = true;
                true
            }
            _ => false,
        };
        Some((
            Start {
                id: first.id,
                probe,
            },
            line,
            first,
            d,
        ))
    }

    /// A message from [`next`](Schedule::next) (or one started outside the timetable,
    /// for expiry) is running: out of every line of its destinations, counted in each.
    pub(crate) fn started(&mut self, line: Line, slot: Slot, dests: &[DestId]) {
        for &d in dests {
            if let Some(q) = self.queues.get_mut(&d) {
                match line {
                    Line::Fresh => q.fresh.remove(&slot),
                    Line::Retry => q.retry.remove(&slot),
                };
                q.running += 1;
                self.refresh(d);
            }
        }
    }

    /// An attempt ended. `contacts`: what it found at (some of) `dests`. One that
    /// reached no host is suspended (longer if it already was); one where a host
    /// answered is resumed; one not tried (skipped, or no recipient left for it) stays
    /// as it is.
    pub(crate) fn finished(
        &mut self,
        dests: &[DestId],
        contacts: &[(DestId, Contact)],
        now: Instant,
    ) {
        for &d in dests {
            let Some(q) = self.queues.get_mut(&d) else {
                continue;
            };
            q.running = q.running.saturating_sub(1);
            match contacts.iter().find(|(c, _)| *c == d).map(|(_, c)| c) {
                // Not tried (skipped while suspended, or no recipient left for it).
                None => {}
                Some(Contact::Unreachable(reason)) => {
                    let length = match &q.suspended {
                        Some(s) if s.probing || now >= s.until => {
                            (s.length * 2).min(self.max_suspension)
                        }
                        Some(s) => s.length,
                        None => self.first_suspension,
                    };
                    let until = match &q.suspended {
                        // An attempt that started before the suspension: keep it.
                        Some(s) if !s.probing && now < s.until => s.until,
                        _ => now + length,
                    };
                    q.suspended = Some(Suspension {
                        until,
                        length,
                        reason: Arc::clone(reason),
                        probing: false,
                    });
                }
                Some(Contact::Reached) => q.suspended = None,
            }
            self.refresh(d);
        }
    }

    /// A probe ended without a word about its destination (the attempt failed
    /// unexpectedly): another may start.
    pub(crate) fn abandon_probe(&mut self, dests: &[DestId]) {
        for &d in dests {
            if let Some(q) = self.queues.get_mut(&d)
                && let Some(s) = &mut q.suspended
            {
                s.probing = false;
                self.refresh(d);
            }
        }
    }

    /// Why a destination is suspended (attempts skip it), if it is.
    pub(crate) fn suspended(&self, d: DestId) -> Option<Arc<str>> {
        self.queues
            .get(&d)?
            .suspended
            .as_ref()
            .map(|s| Arc::clone(&s.reason))
    }

    /// Every suspension ends now (`queue flush`).
    pub(crate) fn resume_all(&mut self) {
        let ids: Vec<DestId> = self.queues.keys().copied().collect();
        for d in ids {
            if let Some(q) = self.queues.get_mut(&d)
                && q.suspended.as_ref().is_some_and(|s| !s.probing)
            {
                q.suspended = None;
                self.refresh(d);
            }
        }
    }

    /// When the next attempt falls due, if any waits.
    pub(crate) fn wake(&self) -> Option<Instant> {
        let fresh = self.fresh_heads.first().map(|(s, _)| s.at);
        let retry = self.retry_heads.first().map(|(s, _)| s.at);
        fresh.into_iter().chain(retry).min()
    }

    /// The `n` destinations with the most waiting messages, most first (for metrics):
    /// one pass over the destinations, not the messages.
    pub(crate) fn largest(&self, n: usize) -> Vec<(Arc<Destination>, usize, bool)> {
        let mut all: Vec<(Arc<Destination>, usize, bool)> = self
            .queues
            .values()
            .filter(|q| q.waiting() > 0)
            .map(|q| (Arc::clone(&q.name), q.waiting(), q.suspended.is_some()))
            .collect();
        all.sort_unstable_by(|a, b| {
            b.1.cmp(&a.1)
                .then_with(|| a.0.to_string().cmp(&b.0.to_string()))
        });
        all.truncate(n);
        all
    }

    /// Destinations known, and how many are suspended.
    pub(crate) fn counts(&self) -> (usize, usize) {
        let suspended = self
            .queues
            .values()
            .filter(|q| q.suspended.is_some())
            .count();
        (self.queues.len(), suspended)
    }

    /// Puts a queue's entry in `heads` in line with its state.
    fn refresh(&mut self, d: DestId) {
        let Some(q) = self.queues.get_mut(&d) else {
            return;
        };
        let wanted = q.wanted_head(self.per_destination);
        if q.head == wanted {
            return;
        }
        if let Some((line, slot)) = q.head.take() {
            match line {
                Line::Fresh => self.fresh_heads.remove(&(slot, d)),
                Line::Retry => self.retry_heads.remove(&(slot, d)),
            };
        }
        if let Some((line, slot)) = wanted {
            match line {
                Line::Fresh => self.fresh_heads.insert((slot, d)),
                Line::Retry => self.retry_heads.insert((slot, d)),
            };
        }
        q.head = wanted;
    }

    /// Drops a destination no message holds and nothing runs for.
    fn forget_if_idle(&mut self, d: DestId) {
        let idle = self
            .queues
            .get(&d)
            .is_some_and(|q| q.refs == 0 && q.waiting() == 0 && q.running == 0);
        if idle && let Some(q) = self.queues.remove(&d) {
            self.names.remove(&q.name);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn id(n: u64) -> QueueId {
        QueueId::from_u64(n)
    }

    fn dest(name: &str) -> Destination {
        Destination::Mx(name.to_string())
    }

    fn slot(at: Instant, n: u64) -> Slot {
        Slot { at, id: id(n) }
    }

    /// Starts whatever is due, like the runner; returns the ids.
    fn drain(s: &mut Schedule, now: Instant, dests: &HashMap<QueueId, Vec<DestId>>) -> Vec<u64> {
        let mut out = Vec::new();
        while let Some((start, line, slot, _)) = s.next(now) {
            s.started(line, slot, &dests[&start.id]);
            out.push(start.id.as_u64());
        }
        out
    }

    #[test]
    fn new_mail_goes_before_due_retries_and_destinations_are_independent() {
        let t0 = Instant::now();
        let mut s = Schedule::new(2, &[]);
        let (a, b) = (s.intern(&dest("a.example")), s.intern(&dest("b.example")));
        let mut dests = HashMap::new();
        for n in 1..=5 {
            s.add(Line::Retry, slot(t0, n), &[a]);
            dests.insert(id(n), vec![a]);
        }
        s.add(Line::Fresh, slot(t0 + Duration::from_secs(1), 9), &[a]);
        s.add(Line::Fresh, slot(t0 + Duration::from_secs(1), 10), &[b]);
        dests.insert(id(9), vec![a]);
        dests.insert(id(10), vec![b]);
        let now = t0 + Duration::from_secs(2);
        // a takes two (the new one first), b its one; a's other retries wait for a slot.
        assert_eq!(drain(&mut s, now, &dests), vec![9, 10, 1]);
        s.finished(&[a], &[], now);
        assert_eq!(drain(&mut s, now, &dests), vec![2]);
        assert_eq!(s.largest(5)[0].1, 3);
    }

    #[test]
    fn retries_wait_for_their_time() {
        let t0 = Instant::now();
        let mut s = Schedule::new(10, &[]);
        let a = s.intern(&dest("a.example"));
        let dests = HashMap::from([(id(1), vec![a]), (id(2), vec![a])]);
        s.add(Line::Retry, slot(t0 + Duration::from_secs(60), 1), &[a]);
        s.add(Line::Retry, slot(t0 + Duration::from_secs(30), 2), &[a]);
        assert_eq!(s.wake(), Some(t0 + Duration::from_secs(30)));
        assert!(drain(&mut s, t0, &dests).is_empty());
        assert_eq!(drain(&mut s, t0 + Duration::from_secs(30), &dests), vec![2]);
        assert_eq!(drain(&mut s, t0 + Duration::from_secs(61), &dests), vec![1]);
        assert_eq!(s.wake(), None);
    }

    #[test]
    fn an_unreachable_destination_is_suspended_then_probed_once() {
        let t0 = Instant::now();
        let mut s = Schedule::new(3, &[]);
        let (dead, live) = (
            s.intern(&dest("dead.example")),
            s.intern(&dest("live.example")),
        );
        let mut dests = HashMap::new();
        for n in 1..=1000 {
            s.add(Line::Retry, slot(t0, n), &[dead]);
            dests.insert(id(n), vec![dead]);
        }
        assert_eq!(drain(&mut s, t0, &dests), vec![1, 2, 3]);
        let why: Arc<str> = "connection refused".into();
        s.finished(
            &[dead],
            &[(dead, Contact::Unreachable(Arc::clone(&why)))],
            t0,
        );
        assert_eq!(s.suspended(dead).as_deref(), Some("connection refused"));
        // The other two report unreachable too: still one suspension, not longer.
        s.finished(
            &[dead],
            &[(dead, Contact::Unreachable(Arc::clone(&why)))],
            t0,
        );
        s.finished(
            &[dead],
            &[(dead, Contact::Unreachable(Arc::clone(&why)))],
            t0,
        );
        assert!(drain(&mut s, t0 + Duration::from_secs(59), &dests).is_empty());
        // Mail to another destination is not held up.
        s.add(Line::Fresh, slot(t0, 5000), &[live]);
        dests.insert(id(5000), vec![live]);
        assert_eq!(
            drain(&mut s, t0 + Duration::from_secs(1), &dests),
            vec![5000]
        );
        // New mail to the suspended one is let through, not as a probe (the runner
        // defers it at once, without contact), and goes back to the retries.
        s.add(Line::Fresh, slot(t0, 6000), &[dead]);
        dests.insert(id(6000), vec![dead]);
        let (start, line, sl, _) = s.next(t0 + Duration::from_secs(1)).unwrap();
        assert_eq!((start.id, start.probe), (id(6000), false));
        s.started(line, sl, &[dead]);
        s.finished(&[dead], &[], t0 + Duration::from_secs(1));
        assert!(s.suspended(dead).is_some());
        s.add(
            Line::Retry,
            slot(t0 + Duration::from_secs(3600), 6000),
            &[dead],
        );
        // The suspension ends: one probe only.
        let t1 = t0 + FIRST_SUSPENSION;
        assert_eq!(s.wake(), Some(t1));
        let (start, line, sl, _) = s.next(t1).unwrap();
        assert!(start.probe);
        s.started(line, sl, &[dead]);
        assert!(s.next(t1 + Duration::from_secs(3600)).is_none());
        // It fails: twice as long.
        s.finished(&[dead], &[(dead, Contact::Unreachable(why))], t1);
        assert_eq!(s.wake(), Some(t1 + 2 * FIRST_SUSPENSION));
        // The next probe gets through: everything flows again, three at a time.
        let t2 = t1 + 2 * FIRST_SUSPENSION;
        let (start, line, sl, _) = s.next(t2).unwrap();
        assert!(start.probe);
        s.started(line, sl, &[dead]);
        s.finished(&[dead], &[(dead, Contact::Reached)], t2);
        assert!(s.suspended(dead).is_none());
        assert_eq!(drain(&mut s, t2, &dests).len(), 3);
    }

    #[test]
    fn a_message_to_two_destinations_runs_once_and_counts_in_both() {
        let t0 = Instant::now();
        let mut s = Schedule::new(1, &[]);
        let (a, b) = (s.hold(&dest("a.example")), s.hold(&dest("b.example")));
        assert_eq!(s.hold(&dest("b.example")), b);
        let dests = HashMap::from([(id(1), vec![a, b]), (id(2), vec![b])]);
        s.add(Line::Fresh, slot(t0, 1), &[a, b]);
        s.add(Line::Fresh, slot(t0, 2), &[b]);
        // 1 runs (via either line), and holds b's only slot.
        assert_eq!(drain(&mut s, t0, &dests), vec![1]);
        s.finished(&[a, b], &[], t0);
        s.release(&[a, b]);
        assert_eq!(drain(&mut s, t0, &dests), vec![2]);
        assert_eq!(s.counts(), (1, 0), "a is forgotten, b still runs");
        s.finished(&[b], &[], t0);
        s.release(&[b]);
        assert_eq!(s.counts(), (0, 0), "idle destinations are forgotten");
    }

    #[test]
    fn removed_messages_leave_no_trace_and_flush_resumes() {
        let t0 = Instant::now();
        let mut s = Schedule::new(1, &[]);
        let a = s.intern(&dest("a.example"));
        let dests = HashMap::from([(id(1), vec![a]), (id(2), vec![a])]);
        s.add(Line::Retry, slot(t0, 1), &[a]);
        s.add(Line::Retry, slot(t0, 2), &[a]);
        s.remove(Line::Retry, slot(t0, 1), &[a]);
        let (start, line, sl, _) = s.next(t0).unwrap();
        assert_eq!(start.id, id(2));
        s.started(line, sl, &[a]);
        s.finished(&[a], &[(a, Contact::Unreachable("down".into()))], t0);
        s.add(Line::Retry, slot(t0, 2), &[a]);
        assert!(s.next(t0).is_none());
        s.resume_all();
        assert_eq!(drain(&mut s, t0, &dests), vec![2]);
    }
}
