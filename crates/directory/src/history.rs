//! A node's history: the raw counters the store keeps, and what they mean
//! as of a given time (uptime fraction, missed heartbeats).

use serde::{Deserialize, Serialize};

use crate::descriptor::SignedDescriptor;
use crate::signed::hex32;

/// A node's reliability history as of some time `now`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct History {
    /// First registration (directory clock, unix s).
    pub first_seen: u64,
    /// Last registration or heartbeat (directory clock).
    pub last_seen: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Timestamp of the last accepted heartbeat.
    pub last_heartbeat: Option<u64>,
    /// Seconds known up: heartbeat gaps no longer than twice the interval.
    pub uptime_secs: u64,
    /// Uptime over time since `first_seen`, in [0, 1]; 1 for a node seen
    /// less than one interval ago.
    pub uptime_fraction: f64,
    /// Heartbeats expected since `first_seen` (one per interval) but not
    /// received.
    pub missed_heartbeats: u64,
    /// Failure reports ever.
    pub failures: u64,
    /// Failure reports received within the failure window.
    pub recent_failures: u64,
}

/// One stored failure report.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FailureRecord {
    /// The designer's key.
    #[serde(with = "hex32")]
    pub reporter: [u8; 32],
    /// Training step.
    pub step: u64,
    /// Why.
    pub reason: String,
    /// Reporter's timestamp.
    pub timestamp: u64,
}

/// A node's descriptor and history (`GET /v1/nodes/{identity}`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct NodeRecord {
    /// The registered descriptor, as signed.
    pub descriptor: SignedDescriptor,
    /// Its history.
    pub history: History,
    /// The latest failure reports (at most 20, newest first).
    pub recent_reports: Vec<FailureRecord>,
}

/// The raw counters of one node, as a store keeps them, before they are
/// read against the clock ([`Counters::history`]).
#[derive(Debug, Clone, Copy)]
pub struct Counters {
    /// First registration (directory clock, unix s).
    pub first_seen: u64,
    /// Last registration or heartbeat.
    pub last_seen: u64,
    /// Heartbeats accepted.
    pub heartbeats: u64,
    /// Timestamp of the last accepted heartbeat.
    pub last_heartbeat: Option<u64>,
    /// Seconds known up.
    pub uptime_secs: u64,
    /// Failure reports ever.
    pub failures: u64,
    /// Failure reports within the failure window.
    pub recent_failures: u64,
}

impl Counters {
    /// Derives uptime fraction and missed heartbeats as of `now`, with
    /// heartbeats expected every `interval` seconds.
    pub fn history(self, now: u64, interval: u64) -> History {
        let interval = interval.max(1);
        let observed = now.saturating_sub(self.first_seen);
        // The node is presumed up since its last heartbeat while that is
        // recent enough to count as an unbroken gap.
        let since_last = self
            .last_heartbeat
            .map_or(u64::MAX, |l| now.saturating_sub(l));
        let current = if since_last <= 2 * interval {
            since_last
        } else {
            0
        };
        let up = self.uptime_secs.saturating_add(current);
        let uptime_fraction = if observed < interval {
            1.0
        } else {
            (up as f64 / observed as f64).clamp(0.0, 1.0)
        };
        History {
            first_seen: self.first_seen,
            last_seen: self.last_seen,
            heartbeats: self.heartbeats,
            last_heartbeat: self.last_heartbeat,
            uptime_secs: self.uptime_secs,
            uptime_fraction,
            missed_heartbeats: (observed / interval).saturating_sub(self.heartbeats),
            failures: self.failures,
            recent_failures: self.recent_failures,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn counters(heartbeats: u64, last_heartbeat: Option<u64>, uptime_secs: u64) -> Counters {
        Counters {
            first_seen: 1000,
            last_seen: 1000,
            heartbeats,
            last_heartbeat,
            uptime_secs,
            failures: 0,
            recent_failures: 0,
        }
    }

    #[test]
    fn a_new_node_has_full_uptime() {
        let h = counters(0, None, 0).history(1005, 10);
        assert_eq!((h.uptime_fraction, h.missed_heartbeats), (1.0, 0));
    }

    #[test]
    fn a_silent_node_misses_one_heartbeat_per_interval() {
        let h = counters(0, None, 0).history(1100, 10);
        assert_eq!((h.uptime_fraction, h.missed_heartbeats), (0.0, 10));
    }

    #[test]
    fn time_since_a_recent_heartbeat_counts_as_up() {
        // Up 1000..1050 by heartbeats, last one at 1050, now 1065.
        let h = counters(5, Some(1050), 50).history(1065, 10);
        assert_eq!(h.uptime_fraction, 1.0);
        assert_eq!(h.missed_heartbeats, 1);
        // Now 1100: the last 50 s are not counted.
        let h = counters(5, Some(1050), 50).history(1100, 10);
        assert_eq!(h.uptime_fraction, 0.5);
    }
}
