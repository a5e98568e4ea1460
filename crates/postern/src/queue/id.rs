//! Queue ids: 16 uppercase hex digits, unique across restarts and sortable by arrival.
//!
//! An id is a `u64`: the high 52 bits count microseconds since the Unix epoch (enough until
//! the year 2112), the low 12 bits break ties. The generator never returns an id lower than
//! or equal to the previous one, so ids stay unique in a process even when the clock stalls
//! or steps back, and `Spool::open` seeds it with the highest id found on disk (in the log
//! and in the names of the files under `deferred/` and `quarantine/`) so that a clock
//! stepped back across a restart cannot reuse an id still on disk. As a second line of
//! defence, no spool file is ever created or renamed over an existing one (`durable.rs`).
//!
//! Parsing trusts nothing: exactly 16 hex digits (either case), nothing else.

use std::fmt;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

/// Bits below the microsecond timestamp, for ids handed out within the same microsecond.
const TIE_BITS: u32 = 12;
/// Microseconds fit in the remaining 52 bits.
const MICROS_MASK: u64 = (1 << (64 - TIE_BITS)) - 1;

/// A message's queue id, shown as 16 uppercase hex digits (`0187F3A2B4C5D6E7`).
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct QueueId(u64);

impl QueueId {
    /// The id with this numeric value.
    pub const fn from_u64(value: u64) -> QueueId {
        QueueId(value)
    }

    /// The numeric value (the 16 hex digits of the text form).
    pub const fn as_u64(self) -> u64 {
        self.0
    }
}

impl fmt::Display for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:016X}", self.0)
    }
}

impl fmt::Debug for QueueId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "QueueId({self})")
    }
}

/// The text is not a queue id (16 hex digits).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a queue id (16 hex digits): {0:?}")]
pub struct ParseQueueIdError(String);

impl FromStr for QueueId {
    type Err = ParseQueueIdError;

    fn from_str(s: &str) -> Result<QueueId, ParseQueueIdError> {
        // from_str_radix alone would accept a leading '+' and shorter strings.
        if s.len() != 16 || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(ParseQueueIdError(s.chars().take(40).collect()));
        }
        u64::from_str_radix(s, 16)
            .map(QueueId)
            .map_err(|_| ParseQueueIdError(s.to_string()))
    }
}

/// Hands out increasing ids; shared by all clones of a `Spool`.
#[derive(Debug)]
pub(crate) struct IdGen {
    last: AtomicU64,
}

impl IdGen {
    /// A generator whose ids will all be greater than `floor`.
    pub(crate) fn new(floor: u64) -> IdGen {
        IdGen {
            last: AtomicU64::new(floor),
        }
    }

    /// The highest id handed out so far (the floor it was made with, if none yet).
    pub(crate) fn high_water(&self) -> QueueId {
        QueueId(self.last.load(Ordering::Relaxed))
    }

    pub(crate) fn next(&self) -> QueueId {
        let now = (now_micros() & MICROS_MASK) << TIE_BITS;
        let mut last = self.last.load(Ordering::Relaxed);
        loop {
            let next = now.max(last.saturating_add(1));
            match self
                .last
                .compare_exchange_weak(last, next, Ordering::Relaxed, Ordering::Relaxed)
            {
                Ok(_) => return QueueId(next),
                Err(current) => last = current,
            }
        }
    }
}

fn now_micros() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as u64)
        .unwrap_or(0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn display_and_parse_round_trip() {
        let id = QueueId::from_u64(0x0187_F3A2_B4C5_D6E7);
        assert_eq!(id.to_string(), "0187F3A2B4C5D6E7");
        assert_eq!("0187F3A2B4C5D6E7".parse::<QueueId>().unwrap(), id);
        assert_eq!("0187f3a2b4c5d6e7".parse::<QueueId>().unwrap(), id);
        for bad in [
            "",
            "0187F3A2B4C5D6E",
            "+187F3A2B4C5D6E7",
            "0187F3A2B4C5D6E7 ",
            "G187F3A2B4C5D6E7",
        ] {
            assert!(bad.parse::<QueueId>().is_err(), "{bad:?}");
        }
    }

    #[test]
    fn ids_increase_and_respect_the_floor() {
        let ids = IdGen::new(0);
        let a = ids.next();
        let b = ids.next();
        assert!(b > a);
        let far = u64::MAX - 10;
        let ids = IdGen::new(far);
        assert!(ids.next().as_u64() > far);
    }
}
