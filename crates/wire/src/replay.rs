//! Replay protection at a hop.
//!
//! * Session packets carry a per-hop counter. A [`ReplayWindow`] remembers
//!   the highest counter seen and a bitmap of the [`REPLAY_WINDOW`] counters
//!   behind it (as IPsec and WireGuard do): memory is bounded, a replay is
//!   always caught, and packets may arrive out of order within the window.
//! * Init packets carry no counter: an [`InitReplayCache`] remembers a tag
//!   derived from each accepted init's shared secret with the time the init
//!   was issued at. The hop refuses inits issued outside a window around
//!   its clock, so tags older than the window can be forgotten; within it
//!   none is, and a full cache refuses new inits instead. The caller
//!   persists the tags (a node restart must not forget them).

use std::collections::{BTreeSet, HashSet};

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

/// What identifies an accepted init at a hop: derived from the init's
/// shared secret, so a replayed init has the same tag and a new one (fresh
/// ephemeral key) a different one. Stored by the hop, never sent.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct InitTag(pub [u8; 16]);

impl std::fmt::Debug for InitTag {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "InitTag({:02x}{:02x}…)", self.0[0], self.0[1])
    }
}

/// The tags of the inits a hop accepted, each with the time its init was
/// issued at (seconds, the caller's clock).
///
/// A hop accepts an init only if it was issued within a window around its
/// clock, so a tag issued before `now − window` can be forgotten: its init
/// is refused by the window anyway ([`Self::forget_before`]). Within the
/// window nothing is forgotten: when the cache holds `capacity` tags,
/// [`Self::check`] refuses every new init ([`WireError::ReplayCacheFull`])
/// until old ones leave the window, rather than forgetting a tag and
/// letting its init be replayed.
///
/// [`crate::peel_init`] only checks the cache; the caller records the tag
/// ([`Self::insert`]) once every other check of the init has passed, so
/// inits that are refused for any reason take no room.
#[derive(Debug, Clone)]
pub struct InitReplayCache {
    capacity: usize,
    seen: HashSet<InitTag>,
    by_time: BTreeSet<(u64, InitTag)>,
}

impl InitReplayCache {
    /// A cache remembering at most `capacity` inits (at least 1).
    pub fn new(capacity: usize) -> Self {
        Self {
            capacity: capacity.max(1),
            seen: HashSet::new(),
            by_time: BTreeSet::new(),
        }
    }

    /// Fails with [`WireError::Replay`] if `tag` was seen, with
    /// [`WireError::ReplayCacheFull`] if no new tag fits.
    pub fn check(&self, tag: &InitTag) -> Result<(), WireError> {
        if self.seen.contains(tag) {
            return Err(WireError::Replay);
        }
        if self.seen.len() >= self.capacity {
            return Err(WireError::ReplayCacheFull {
                capacity: self.capacity,
            });
        }
        Ok(())
    }

    /// Records `tag` of an init issued at `issued_at`, after
    /// [`Self::check`] passed (and fails as it would otherwise).
    pub fn insert(&mut self, tag: InitTag, issued_at: u64) -> Result<(), WireError> {
        self.check(&tag)?;
        self.seen.insert(tag);
        self.by_time.insert((issued_at, tag));
        Ok(())
    }

    /// Forgets the tags of inits issued before `t`; returns how many.
    pub fn forget_before(&mut self, t: u64) -> usize {
        let mut n = 0;
        while let Some(&(at, tag)) = self.by_time.first() {
            if at >= t {
                break;
            }
            self.by_time.pop_first();
            self.seen.remove(&tag);
            n += 1;
        }
        n
    }

    /// Every remembered tag with its issue time, oldest first (to persist).
    pub fn tags(&self) -> impl Iterator<Item = (InitTag, u64)> + '_ {
        self.by_time.iter().map(|&(at, tag)| (tag, at))
    }

    /// Number of remembered inits.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    /// No init remembered yet.
    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    /// Most inits remembered at once.
    pub fn capacity(&self) -> usize {
        self.capacity
    }
}

impl Default for InitReplayCache {
    /// Remembers 65 536 inits.
    fn default() -> Self {
        Self::new(DEFAULT_INIT_REPLAY_CAPACITY)
    }
}

/// Inits an [`InitReplayCache`] remembers by default.
pub const DEFAULT_INIT_REPLAY_CAPACITY: usize = 1 << 16;

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
    fn init_cache_refuses_new_tags_when_full_and_forgets_by_time() {
        let mut c = InitReplayCache::new(2);
        c.insert(InitTag([1; 16]), 100).unwrap();
        c.insert(InitTag([2; 16]), 50).unwrap();
        assert_eq!(c.check(&InitTag([1; 16])), Err(WireError::Replay));
        assert_eq!(
            c.insert(InitTag([3; 16]), 120),
            Err(WireError::ReplayCacheFull { capacity: 2 })
        );
        // Nothing issued before 50: nothing forgotten.
        assert_eq!(c.forget_before(50), 0);
        assert_eq!(c.forget_before(51), 1);
        assert!(c.check(&InitTag([2; 16])).is_ok());
        assert_eq!(c.check(&InitTag([1; 16])), Err(WireError::Replay));
        c.insert(InitTag([3; 16]), 120).unwrap();
        let tags: Vec<(InitTag, u64)> = c.tags().collect();
        assert_eq!(tags, vec![(InitTag([1; 16]), 100), (InitTag([3; 16]), 120)]);
    }
}
