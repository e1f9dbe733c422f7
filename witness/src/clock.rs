//! The one place a witness reads the wall clock.
//!
//! Every time a decision depends on (when a site was last heard, when a lease was renewed and
//! when it expires, when a failover is decided) comes from the node's [`Clock`], so that:
//! - tests drive time by hand ([`ManualClock`]) and prove that nothing happens "whatever time
//!   passes" without sleeping through it;
//! - the lab can give one witness a clock that disagrees with the others ([`SystemClock`]
//!   with an offset, `ferry-witness --clock-offset`), the clock skew the failover rule's
//!   margin is there for (`docs/failover.md`).
//!
//! Raft's own ticks stay on the monotonic clock: they pace elections and heartbeats between
//! witnesses and decide nothing about sites (raft-rs counts ticks, not time).

use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};

/// A source of wall-clock time, in Unix milliseconds.
pub trait Clock: Send + Sync + std::fmt::Debug {
    /// Now, in milliseconds since the Unix epoch (UTC).
    fn now_ms(&self) -> i64;
}

/// A clock shared by the node thread, the detector and the gRPC services.
pub type SharedClock = Arc<dyn Clock>;

/// The system's wall clock, shifted by a fixed offset (0 in production; the lab sets one to
/// inject clock skew).
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock {
    /// Added to the system time, in milliseconds (negative: this clock runs behind).
    pub offset_ms: i64,
}

impl SystemClock {
    /// The system clock shifted by `offset_ms` milliseconds.
    pub fn with_offset_ms(offset_ms: i64) -> Self {
        SystemClock { offset_ms }
    }

    /// The system clock as a [`SharedClock`].
    pub fn shared(self) -> SharedClock {
        Arc::new(self)
    }
}

impl Clock for SystemClock {
    fn now_ms(&self) -> i64 {
        let system = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0);
        system.saturating_add(self.offset_ms)
    }
}

/// A clock that moves only when told to. Clones share the same time.
#[derive(Clone, Debug)]
pub struct ManualClock {
    now_ms: Arc<AtomicI64>,
}

impl ManualClock {
    /// A clock standing at `now_ms` (Unix milliseconds).
    pub fn at(now_ms: i64) -> Self {
        ManualClock {
            now_ms: Arc::new(AtomicI64::new(now_ms)),
        }
    }

    /// Moves the clock forward by `ms` milliseconds (backward when negative); returns the new
    /// time.
    pub fn advance_ms(&self, ms: i64) -> i64 {
        self.now_ms.fetch_add(ms, Ordering::SeqCst) + ms
    }

    /// This clock as a [`SharedClock`] (sharing its time with `self`).
    pub fn shared(&self) -> SharedClock {
        Arc::new(self.clone())
    }
}

impl Clock for ManualClock {
    fn now_ms(&self) -> i64 {
        self.now_ms.load(Ordering::SeqCst)
    }
}

/// Parses a signed clock offset: `+1500ms`, `-3s`, `2m` (humantime units; no sign means ahead).
///
/// # Errors
/// A message naming the value when it is not a humantime duration with an optional sign.
pub fn parse_offset_ms(s: &str) -> Result<i64, String> {
    let (sign, magnitude) = match s.strip_prefix('-') {
        Some(rest) => (-1, rest),
        None => (1, s.strip_prefix('+').unwrap_or(s)),
    };
    let d = humantime::parse_duration(magnitude.trim())
        .map_err(|e| format!("{s:?}: want a duration such as +2s or -1500ms ({e})"))?;
    Ok(sign * d.as_millis() as i64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn offsets_parse_with_and_without_sign() {
        assert_eq!(parse_offset_ms("+2s"), Ok(2_000));
        assert_eq!(parse_offset_ms("-1500ms"), Ok(-1_500));
        assert_eq!(parse_offset_ms("1m"), Ok(60_000));
        assert_eq!(parse_offset_ms("0s"), Ok(0));
        assert!(parse_offset_ms("soon").unwrap_err().contains("\"soon\""));
    }

    #[test]
    fn a_manual_clock_moves_only_when_advanced_and_clones_share_it() {
        let c = ManualClock::at(1_000);
        let shared = c.shared();
        assert_eq!(shared.now_ms(), 1_000);
        assert_eq!(c.advance_ms(500), 1_500);
        assert_eq!(shared.now_ms(), 1_500);
    }

    #[test]
    fn the_system_clock_applies_its_offset() {
        let ahead = SystemClock::with_offset_ms(3_600_000).now_ms();
        let system = SystemClock::default().now_ms();
        assert!((ahead - system - 3_600_000).abs() < 1_000);
    }
}
