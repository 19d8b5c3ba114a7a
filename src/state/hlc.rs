//! Hybrid logical clock: orders grid-wide writes across servers.
//!
//! A timestamp is (physical milliseconds, logical counter). The clock never
//! goes backwards, even when the wall clock does (NTP step, bad RTC): the
//! physical part then stays put and the logical counter grows. Receiving a
//! timestamp from a peer moves the clock past it, so a write made after
//! seeing another write is always ordered after it. Physical time is an
//! argument: the clock itself reads nothing.

use serde::{Deserialize, Serialize};

/// A hybrid logical clock timestamp. Ordered by physical time, then counter.
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize,
)]
pub struct Hlc {
    pub physical_ms: u64,
    pub logical: u32,
}

/// How far ahead of our wall clock a peer's timestamp may be before we refuse
/// to follow it: a peer with a clock a day in the future must not drag every
/// server's clock along (its writes would win every conflict for a day).
pub const MAX_FORWARD_DRIFT_MS: u64 = 60 * 60 * 1000;

/// A peer's timestamp was too far in the future to accept.
#[derive(Debug, Clone, Copy, PartialEq, Eq, thiserror::Error)]
#[error(
    "remote clock is {ahead_ms} ms ahead of ours, more than the {MAX_FORWARD_DRIFT_MS} ms allowed"
)]
pub struct ClockDriftError {
    pub ahead_ms: u64,
}

/// The clock of one server.
#[derive(Debug, Clone, Default)]
pub struct HlcClock {
    last: Hlc,
}

impl HlcClock {
    /// A clock that has issued nothing yet.
    pub fn new() -> Self {
        Self::default()
    }

    /// A clock that continues after `last` (e.g. the newest stamp in recovered state).
    pub fn starting_after(last: Hlc) -> Self {
        Self { last }
    }

    /// The last timestamp issued or observed.
    pub fn last(&self) -> Hlc {
        self.last
    }

    /// A new timestamp for a local event, strictly greater than every one before.
    pub fn tick(&mut self, wall_ms: u64) -> Hlc {
        self.last = if wall_ms > self.last.physical_ms {
            Hlc {
                physical_ms: wall_ms,
                logical: 0,
            }
        } else {
            self.successor_of(self.last)
        };
        self.last
    }

    /// Moves the clock past a timestamp received from a peer.
    pub fn observe(&mut self, remote: Hlc, wall_ms: u64) -> Result<(), ClockDriftError> {
        let ahead_ms = remote.physical_ms.saturating_sub(wall_ms);
        if ahead_ms > MAX_FORWARD_DRIFT_MS {
            return Err(ClockDriftError { ahead_ms });
        }
        if remote > self.last {
            self.last = remote;
        }
        Ok(())
    }

    fn successor_of(&self, hlc: Hlc) -> Hlc {
        match hlc.logical.checked_add(1) {
            Some(logical) => Hlc {
                physical_ms: hlc.physical_ms,
                logical,
            },
            // 4 billion events in one millisecond: borrow the next millisecond.
            None => Hlc {
                physical_ms: hlc.physical_ms + 1,
                logical: 0,
            },
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn follows_the_wall_clock_when_it_advances() {
        let mut clock = HlcClock::new();
        assert_eq!(
            clock.tick(1_000),
            Hlc {
                physical_ms: 1_000,
                logical: 0
            }
        );
        assert_eq!(
            clock.tick(2_000),
            Hlc {
                physical_ms: 2_000,
                logical: 0
            }
        );
    }

    #[test]
    fn stays_monotonic_when_the_wall_clock_goes_backwards() {
        let mut clock = HlcClock::new();
        let before = clock.tick(10_000);
        let after_step_back = clock.tick(5_000);
        assert!(after_step_back > before);
        assert_eq!(
            after_step_back,
            Hlc {
                physical_ms: 10_000,
                logical: 1
            }
        );
        assert_eq!(
            clock.tick(10_000),
            Hlc {
                physical_ms: 10_000,
                logical: 2
            }
        );
        assert_eq!(
            clock.tick(10_001),
            Hlc {
                physical_ms: 10_001,
                logical: 0
            }
        );
    }

    #[test]
    fn observing_a_later_peer_orders_our_next_event_after_it() {
        let mut clock = HlcClock::new();
        clock.tick(1_000);
        let remote = Hlc {
            physical_ms: 1_500,
            logical: 7,
        };
        clock.observe(remote, 1_000).unwrap();
        assert!(clock.tick(1_000) > remote);
    }

    #[test]
    fn refuses_a_peer_far_in_the_future() {
        let mut clock = HlcClock::new();
        let far = Hlc {
            physical_ms: 10 * MAX_FORWARD_DRIFT_MS,
            logical: 0,
        };
        assert!(clock.observe(far, 0).is_err());
        assert_eq!(clock.last(), Hlc::default());
    }

    #[test]
    fn logical_overflow_borrows_the_next_millisecond() {
        let mut clock = HlcClock::starting_after(Hlc {
            physical_ms: 5,
            logical: u32::MAX,
        });
        assert_eq!(
            clock.tick(0),
            Hlc {
                physical_ms: 6,
                logical: 0
            }
        );
    }

    proptest! {
        /// Whatever the wall clock does, timestamps strictly increase.
        #[test]
        fn ticks_strictly_increase_for_any_wall_clock(walls in proptest::collection::vec(0u64..1_000_000, 1..200)) {
            let mut clock = HlcClock::new();
            let mut previous = None;
            for wall in walls {
                let now = clock.tick(wall);
                if let Some(previous) = previous {
                    prop_assert!(now > previous);
                }
                prop_assert!(now.physical_ms >= wall);
                previous = Some(now);
            }
        }
    }
}
