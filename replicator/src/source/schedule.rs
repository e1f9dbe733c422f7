//! When to start the next sync: from the RPO and the measured durations of recent syncs, not
//! from a cron schedule.
//!
//! The lag at time `t` is `t − capture time of the newest committed generation`. A sync that
//! captures at `s` and takes `d` brings the lag down to `d` at `s + d`; until then the lag keeps
//! growing from the previous capture `c`. To keep the lag under the RPO `r`, the next sync must
//! commit by `c + r`, so it starts at `c + r − margin`, where the margin covers the slowest
//! recent sync twice over and never less than a fifth of the RPO. A sync that takes longer than
//! that is an RPO miss, which the caller reports and keeps going.

use std::collections::VecDeque;
use std::time::{Duration, SystemTime};

/// Recent syncs remembered for the estimate.
const HISTORY: usize = 8;

/// The RPO-driven schedule of one pair.
#[derive(Debug, Clone)]
pub struct RpoSchedule {
    rpo: Duration,
    recent: VecDeque<Duration>,
}

impl RpoSchedule {
    /// A schedule for `rpo` with no history (the first sync starts at once).
    pub fn new(rpo: Duration) -> Self {
        Self {
            rpo,
            recent: VecDeque::with_capacity(HISTORY),
        }
    }

    /// Changes the RPO (the spec changed); the history stays.
    pub fn set_rpo(&mut self, rpo: Duration) {
        self.rpo = rpo;
    }

    /// The RPO.
    pub fn rpo(&self) -> Duration {
        self.rpo
    }

    /// Records how long a sync took, from capture to commit.
    pub fn record(&mut self, duration: Duration) {
        if self.recent.len() == HISTORY {
            self.recent.pop_front();
        }
        self.recent.push_back(duration);
    }

    /// The slowest recent sync, or a quarter of the RPO before any was measured.
    pub fn estimate(&self) -> Duration {
        self.recent.iter().max().copied().unwrap_or(self.rpo / 4)
    }

    /// How long before the RPO deadline the next sync starts.
    pub fn margin(&self) -> Duration {
        (self.estimate() * 2).max(self.rpo / 5)
    }

    /// When the next sync should start, given the capture time of the newest committed
    /// generation (`None`: nothing committed yet, start now). Never earlier than `now`.
    pub fn next_start(&self, last_capture: Option<SystemTime>, now: SystemTime) -> SystemTime {
        let Some(captured) = last_capture else {
            return now;
        };
        let deadline = captured + self.rpo;
        match deadline.checked_sub(self.margin()) {
            Some(start) if start > now => start,
            _ => now,
        }
    }

    /// Whether the lag is within the RPO at `now`.
    pub fn rpo_met(&self, last_capture: Option<SystemTime>, now: SystemTime) -> bool {
        last_capture.is_some_and(|c| now.duration_since(c).unwrap_or_default() <= self.rpo)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T0: Duration = Duration::from_secs(1_000_000);

    fn at(secs: u64) -> SystemTime {
        SystemTime::UNIX_EPOCH + T0 + Duration::from_secs(secs)
    }

    #[test]
    fn first_sync_starts_at_once() {
        let s = RpoSchedule::new(Duration::from_secs(30));
        assert_eq!(s.next_start(None, at(5)), at(5));
    }

    #[test]
    fn starts_early_enough_for_the_slowest_recent_sync() {
        let mut s = RpoSchedule::new(Duration::from_secs(30));
        s.record(Duration::from_secs(2));
        // Margin is max(2 × 2 s, 30 s / 5) = 6 s: start at 24 s after the capture.
        assert_eq!(s.next_start(Some(at(0)), at(1)), at(24));
        s.record(Duration::from_secs(10));
        // Slow syncs move the start earlier: margin 20 s.
        assert_eq!(s.next_start(Some(at(0)), at(1)), at(10));
    }

    #[test]
    fn an_overdue_sync_starts_now_and_the_rpo_is_reported_missed() {
        let mut s = RpoSchedule::new(Duration::from_secs(30));
        s.record(Duration::from_secs(40));
        assert_eq!(s.next_start(Some(at(0)), at(3)), at(3));
        assert!(s.rpo_met(Some(at(0)), at(30)));
        assert!(!s.rpo_met(Some(at(0)), at(31)));
        assert!(!s.rpo_met(None, at(0)));
    }

    #[test]
    fn history_is_bounded() {
        let mut s = RpoSchedule::new(Duration::from_secs(60));
        s.record(Duration::from_secs(50));
        for _ in 0..HISTORY {
            s.record(Duration::from_secs(1));
        }
        assert_eq!(s.estimate(), Duration::from_secs(1));
    }
}
