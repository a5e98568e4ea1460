//! When to try again: the retry schedule as small pure functions (no clock, no queue).
//!
//! `retry_schedule = ["1m", "5m", "15m", "1h", "4h"]`: after the first failed attempt wait
//! 1m, after the second 5m, ..., then every last interval. Each delay gets up to ±10 %
//! jitter so that a destination that comes back is not hit by the whole queue at once.

use std::time::Duration;

/// The delay after `attempts` attempts (1 = the first one just failed). `jitter` is a
/// number in [-1, 1] (random in production, fixed in tests).
pub fn next_delay(attempts: u32, schedule: &[Duration], jitter: f64) -> Duration {
    let Some(last) = schedule.last() else {
        return Duration::from_secs(300);
    };
    let index = (attempts.max(1) - 1) as usize;
    let base = schedule.get(index).unwrap_or(last);
    let factor = 1.0 + 0.1 * jitter.clamp(-1.0, 1.0);
    base.mul_f64(factor)
}

/// How many attempts a message of this age has probably had, for messages found in the
/// spool at start: we do not persist attempt counts, and restarting the schedule at "1m"
/// for a day-old message would hammer its destination.
pub fn attempts_for_age(age: Duration, schedule: &[Duration]) -> u32 {
    let mut elapsed = Duration::ZERO;
    let mut attempts = 0u32;
    let last = schedule.last().copied().unwrap_or(Duration::from_secs(300));
    while elapsed <= age && attempts < 10_000 {
        attempts += 1;
        elapsed += schedule.get(attempts as usize - 1).copied().unwrap_or(last);
    }
    attempts.saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    #[test]
    fn schedule_then_last_interval() {
        let sched = [s(60), s(300), s(900)];
        assert_eq!(next_delay(1, &sched, 0.0), s(60));
        assert_eq!(next_delay(2, &sched, 0.0), s(300));
        assert_eq!(next_delay(3, &sched, 0.0), s(900));
        assert_eq!(next_delay(9, &sched, 0.0), s(900));
        assert_eq!(next_delay(0, &sched, 0.0), s(60));
    }

    #[test]
    fn jitter_is_bounded() {
        let sched = [s(100)];
        assert_eq!(next_delay(1, &sched, 1.0), s(110));
        assert_eq!(next_delay(1, &sched, -1.0), s(90));
        assert_eq!(next_delay(1, &sched, 7.0), s(110));
    }

    #[test]
    fn attempts_from_age() {
        let sched = [s(60), s(300), s(900)];
        assert_eq!(attempts_for_age(s(0), &sched), 0);
        assert_eq!(attempts_for_age(s(59), &sched), 0);
        assert_eq!(attempts_for_age(s(60), &sched), 1);
        assert_eq!(attempts_for_age(s(400), &sched), 2);
        assert_eq!(attempts_for_age(s(60 + 300 + 900 * 3), &sched), 5);
    }
}
