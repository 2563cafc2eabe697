//! Replay protection at a hop.
//!
//! * Session packets carry a per-hop counter. A [`ReplayWindow`] remembers
//!   the highest counter seen and a bitmap of the [`REPLAY_WINDOW`] counters
//!   behind it (as IPsec and WireGuard do): memory is bounded, a replay is
//!   always caught, and packets may arrive out of order within the window.
//! * Init packets carry no counter: an [`InitReplayCache`] remembers a tag
//!   derived from each accepted init's shared secret, up to a capacity.
//!   Past that the oldest tags are forgotten, so onion keys should be rotated
//!   well before a node has seen `capacity` inits.

use std::collections::{HashSet, VecDeque};

use crate::constants::REPLAY_WINDOW;
use crate::error::WireError;

const WORDS: usize = (REPLAY_WINDOW / 64) as usize;

/// Sliding-window replay filter over 64-bit counters.
#[derive(Debug, Clone, Default)]
pub struct ReplayWindow {
    highest: Option<u64>,
    bits: [u64; WORDS],
}

impl ReplayWindow {
    /// An empty window.
    pub fn new() -> Self {
        Self::default()
    }

    fn slot(counter: u64) -> (usize, u64) {
        let bit = counter % REPLAY_WINDOW;
        ((bit / 64) as usize, 1u64 << (bit % 64))
    }

    /// The highest counter recorded, if any.
    pub fn highest(&self) -> Option<u64> {
        self.highest
    }

    /// Would `counter` be accepted? Does not record it.
    pub fn check(&self, counter: u64) -> Result<(), WireError> {
        let Some(highest) = self.highest else {
            return Ok(());
        };
        if counter > highest {
            return Ok(());
        }
        if highest - counter >= REPLAY_WINDOW {
            return Err(WireError::Stale { counter, highest });
        }
        let (word, mask) = Self::slot(counter);
        if self.bits[word] & mask != 0 {
            Err(WireError::Replay)
        } else {
            Ok(())
        }
    }

    /// Records `counter`; call only after [`Self::check`] and the MAC passed.
    pub fn mark(&mut self, counter: u64) {
        match self.highest {
            Some(highest) if counter <= highest => {}
            Some(highest) if counter - highest < REPLAY_WINDOW => {
                // Forget the slots the window slides over.
                for c in highest + 1..=counter {
                    let (word, mask) = Self::slot(c);
                    self.bits[word] &= !mask;
                }
                self.highest = Some(counter);
            }
            _ => {
                self.bits = [0; WORDS];
                self.highest = Some(counter);
            }
        }
        let (word, mask) = Self::slot(counter);
        self.bits[word] |= mask;
    }
}

/// Bounded set of init replay tags (oldest forgotten first).
#[derive(Debug, Clone)]
pub struct InitReplayCache {
    capacity: usize,
    seen: HashSet<[u8; 16]>,
    order: VecDeque<[u8; 16]>,
}

impl InitReplayCache {
    /// A cache remembering at most `capacity` inits (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            order: VecDeque::new(),
        }
    }

    /// Fails with [`WireError::Replay`] if `tag` was seen.
    pub(crate) fn check(&self, tag: &[u8; 16]) -> Result<(), WireError> {
        if self.seen.contains(tag) {
            Err(WireError::Replay)
        } else {
            Ok(())
        }
    }

    /// Records `tag`, forgetting the oldest when full.
    pub(crate) fn insert(&mut self, tag: [u8; 16]) {
        if self.seen.insert(tag) {
            self.order.push_back(tag);
        }
        while self.order.len() > self.capacity {
            if let Some(old) = self.order.pop_front() {
                self.seen.remove(&old);
            }
        }
    }

    /// Number of remembered inits.
    pub fn len(&self) -> usize {
        self.order.len()
    }

    /// No init remembered yet.
    pub fn is_empty(&self) -> bool {
        self.order.is_empty()
    }
}

impl Default for InitReplayCache {
    /// Remembers 65 536 inits.
    fn default() -> Self {
        Self::new(1 << 16)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn accept(w: &mut ReplayWindow, c: u64) -> Result<(), WireError> {
        w.check(c)?;
        w.mark(c);
        Ok(())
    }

    #[test]
    fn window_rejects_replays_and_accepts_reordering() {
        let mut w = ReplayWindow::new();
        for c in [5, 3, 9, 4, 1000] {
            accept(&mut w, c).unwrap();
        }
        for c in [5, 3, 9, 4, 1000] {
            assert_eq!(accept(&mut w, c), Err(WireError::Replay));
        }
        accept(&mut w, 6).unwrap();
    }

    #[test]
    fn window_rejects_counters_behind_it() {
        let mut w = ReplayWindow::new();
        accept(&mut w, 10).unwrap();
        accept(&mut w, 10 + REPLAY_WINDOW).unwrap();
        assert!(matches!(accept(&mut w, 10), Err(WireError::Stale { .. })));
        accept(&mut w, 11).unwrap();
    }

    #[test]
    fn window_slides_without_keeping_old_bits() {
        let mut w = ReplayWindow::new();
        accept(&mut w, 0).unwrap();
        // Slot of 0 is reused by REPLAY_WINDOW: must be accepted once.
        accept(&mut w, REPLAY_WINDOW).unwrap();
        assert_eq!(accept(&mut w, REPLAY_WINDOW), Err(WireError::Replay));
        accept(&mut w, u64::MAX).unwrap();
        assert_eq!(accept(&mut w, u64::MAX), Err(WireError::Replay));
    }

    #[test]
    fn init_cache_forgets_oldest_past_capacity() {
        let mut c = InitReplayCache::new(2);
        c.insert([1; 16]);
        c.insert([2; 16]);
        assert_eq!(c.check(&[1; 16]), Err(WireError::Replay));
        c.insert([3; 16]);
        assert!(c.check(&[1; 16]).is_ok());
        assert_eq!(c.len(), 2);
    }
}
