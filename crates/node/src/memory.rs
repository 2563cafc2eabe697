//! One memory budget per node, in the spirit of Tor's `MaxMemInQueues`:
//! every place a client can make the node hold bytes draws from it — the
//! sessions (stages, caches, parked messages, pending gradients, audit
//! states and openings, fetched and loading states: what the core reports),
//! the messages being read (charged from their first cell, to the session
//! the first cell names) and the messages queued for a link (replies,
//! forwards, cover, paced links' queues).
//!
//! When a charge does not fit, the I/O layer sheds the session holding the
//! *oldest* queued or half-read data ([`Memory::oldest`]), as Tor's
//! out-of-memory handler closes the circuits with the oldest queued cells:
//! a client whose endpoint never reads (or that trickles a message in) is
//! the one whose data waits; an honest session's queue drains within a
//! moment, so it is never the oldest for long. Data younger than
//! [`MIN_OFFENDING_AGE`] never marks an offender: with no older data the
//! charge is refused instead, and nothing is shed. The sessions' state may
//! take three quarters of the budget ([`Memory::core_limit`]), so there is
//! always room for messages in flight; and new sessions are admitted only
//! while the state set up (a session's stage and the states its audits
//! keep, counted in full when it is set up) is under three quarters of
//! that, so running sessions always have room for what their steps hold.
//!
//! Charges are RAII ([`Charge`]): the bytes are released when the queued
//! message or the reassembly buffer is dropped, whichever way it goes
//! (written, skipped, its link closed).

use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mixnn_wire::SessionId;

/// Queued or half-read data younger than this never makes its session an
/// offender (an honest session's queue can wait this long behind a busy
/// node; a peer that does not read holds its data until the write
/// timeout).
pub const MIN_OFFENDING_AGE: Duration = Duration::from_secs(2);

/// The node's memory budget and what draws from it.
#[derive(Debug)]
pub struct Memory {
    limit: u64,
    ledger: Mutex<Ledger>,
}

#[derive(Debug, Default)]
struct Ledger {
    /// What the core's sessions hold, as it last reported.
    core: u64,
    /// Queued and half-read bytes of each session.
    sessions: HashMap<SessionId, Held>,
    /// Queued bytes of no session (cover).
    other: u64,
    /// All queued and half-read bytes of sessions not shed.
    io: u64,
    /// Queued and half-read bytes of shed sessions: their queues are
    /// emptied at once and the links holding the rest are being closed, so
    /// they no longer count.
    doomed: u64,
    next: u64,
}

/// One session's queued and half-read data.
#[derive(Debug, Default)]
struct Held {
    bytes: u64,
    /// Charge number → when it was made (numbers grow with time, so the
    /// first entry is the oldest).
    since: BTreeMap<u64, Instant>,
    /// Charge number → the connection reading that message.
    readers: BTreeMap<u64, u64>,
    /// Shed: its bytes are counted in `doomed`.
    doomed: bool,
}

/// Bytes charged to the budget, released on drop.
#[derive(Debug)]
pub struct Charge {
    memory: Arc<Memory>,
    session: Option<SessionId>,
    id: u64,
    bytes: u64,
}

impl Charge {
    /// The session charged, if any.
    pub fn session(&self) -> Option<SessionId> {
        self.session
    }

    /// The bytes charged.
    pub fn bytes(&self) -> u64 {
        self.bytes
    }

    /// Whether its session has been shed.
    pub fn doomed(&self) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| self.memory.is_doomed(s))
    }
}

impl Drop for Charge {
    fn drop(&mut self) {
        self.memory.release(self.session, self.id, self.bytes);
    }
}

/// A charge that does not fit: what is in use and the budget.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Over {
    /// Bytes asked for.
    pub asked: u64,
    /// Bytes in use.
    pub used: u64,
    /// The budget.
    pub limit: u64,
}

impl std::fmt::Display for Over {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} more bytes on top of {} in use would pass the node's memory budget of {}",
            self.asked, self.used, self.limit
        )
    }
}

impl Memory {
    /// The ledger of a node whose memory budget is `budget` bytes: the
    /// sessions, reads and queues may hold three quarters of it; the last
    /// quarter is the process's own (code, runtime, allocator, and the
    /// copies a message passes through while it is computed, sealed and
    /// encoded).
    pub fn for_budget(budget: u64) -> Arc<Memory> {
        Memory::new(budget - budget / 4)
    }

    /// A ledger of `limit` bytes.
    pub fn new(limit: u64) -> Arc<Memory> {
        Arc::new(Memory {
            limit,
            ledger: Mutex::new(Ledger::default()),
        })
    }

    /// The budget, in bytes.
    pub fn limit(&self) -> u64 {
        self.limit
    }

    /// What the sessions' state may take of the budget (three quarters):
    /// the rest is always there for messages being read and queued, so
    /// sessions that fill the node with state cannot make it refuse (or
    /// shed for) an honest session's messages.
    pub fn core_limit(&self) -> u64 {
        self.limit - self.limit / 4
    }

    fn ledger(&self) -> MutexGuard<'_, Ledger> {
        // The ledger's own code never panics while it holds the lock; a
        // poisoned lock still holds consistent counters.
        self.ledger.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Bytes in use: the core's, queued and half-read.
    pub fn used(&self) -> u64 {
        let l = self.ledger();
        l.core.saturating_add(l.io).saturating_add(l.other)
    }

    /// Bytes queued or half-read (not the core's).
    pub fn io(&self) -> u64 {
        let l = self.ledger();
        l.io.saturating_add(l.other)
    }

    /// Bytes still free.
    pub fn available(&self) -> u64 {
        self.limit.saturating_sub(self.used())
    }

    /// Records what the core's sessions hold now.
    pub fn set_core(&self, bytes: u64) {
        self.ledger().core = bytes;
    }

    /// Charges `bytes` to `session` (or to no session) at `now`, if they
    /// fit the budget.
    pub fn charge(
        self: &Arc<Self>,
        session: Option<SessionId>,
        bytes: u64,
        now: Instant,
    ) -> Result<Charge, Over> {
        self.charge_read(session, bytes, now, None)
    }

    /// The same for a message being read by connection `reader`, which
    /// [`Memory::doom`] names when the session is shed.
    pub fn charge_read(
        self: &Arc<Self>,
        session: Option<SessionId>,
        bytes: u64,
        now: Instant,
        reader: Option<u64>,
    ) -> Result<Charge, Over> {
        let mut l = self.ledger();
        if let Some(s) = &session {
            if l.sessions.get(s).is_some_and(|h| h.doomed) {
                return Err(Over {
                    asked: bytes,
                    used: 0,
                    limit: 0,
                });
            }
        }
        let used = l.core.saturating_add(l.io).saturating_add(l.other);
        if used.saturating_add(bytes) > self.limit {
            return Err(Over {
                asked: bytes,
                used,
                limit: self.limit,
            });
        }
        let id = l.next;
        l.next += 1;
        match session {
            Some(s) => {
                let held = l.sessions.entry(s).or_default();
                held.bytes = held.bytes.saturating_add(bytes);
                held.since.insert(id, now);
                if let Some(r) = reader {
                    held.readers.insert(id, r);
                }
                l.io = l.io.saturating_add(bytes);
            }
            None => l.other = l.other.saturating_add(bytes),
        }
        Ok(Charge {
            memory: Arc::clone(self),
            session,
            id,
            bytes,
        })
    }

    fn release(&self, session: Option<SessionId>, id: u64, bytes: u64) {
        let mut l = self.ledger();
        match session {
            Some(s) => {
                let (empty, doomed) = match l.sessions.get_mut(&s) {
                    Some(held) => {
                        held.bytes = held.bytes.saturating_sub(bytes);
                        held.since.remove(&id);
                        held.readers.remove(&id);
                        (held.since.is_empty(), held.doomed)
                    }
                    None => (false, false),
                };
                if doomed {
                    l.doomed = l.doomed.saturating_sub(bytes);
                } else {
                    l.io = l.io.saturating_sub(bytes);
                }
                if empty {
                    l.sessions.remove(&s);
                }
            }
            None => l.other = l.other.saturating_sub(bytes),
        }
    }

    /// Marks `session` shed: its queued and half-read bytes stop counting
    /// (the caller empties its queues and closes the links holding the
    /// rest) and it can be charged no more. Returns the connections
    /// reading a message of it, to close.
    pub fn doom(&self, session: &SessionId) -> Vec<u64> {
        let mut l = self.ledger();
        let Some(held) = l.sessions.get_mut(session) else {
            return Vec::new();
        };
        if held.doomed {
            return Vec::new();
        }
        held.doomed = true;
        let (bytes, readers) = (held.bytes, held.readers.values().copied().collect());
        l.io = l.io.saturating_sub(bytes);
        l.doomed = l.doomed.saturating_add(bytes);
        readers
    }

    /// Bytes of shed sessions not yet freed.
    pub fn doomed(&self) -> u64 {
        self.ledger().doomed
    }

    /// Whether `session` has been shed ([`Memory::doom`]) and still holds
    /// bytes not freed.
    pub fn is_doomed(&self, session: &SessionId) -> bool {
        self.ledger()
            .sessions
            .get(session)
            .is_some_and(|h| h.doomed)
    }

    /// The session holding the oldest queued or half-read data, if that
    /// data is at least [`MIN_OFFENDING_AGE`] old at `now`: the one to
    /// shed when a charge does not fit.
    pub fn oldest(&self, now: Instant) -> Option<SessionId> {
        let l = self.ledger();
        l.sessions
            .iter()
            .filter(|(_, h)| !h.doomed)
            .filter_map(|(s, h)| h.since.values().next().map(|t| (*s, *t)))
            .filter(|(_, t)| now.saturating_duration_since(*t) >= MIN_OFFENDING_AGE)
            .min_by_key(|(_, t)| *t)
            .map(|(s, _)| s)
    }

    /// Queued and half-read bytes of `session`.
    pub fn held_by(&self, session: &SessionId) -> u64 {
        self.ledger().sessions.get(session).map_or(0, |h| h.bytes)
    }
}

/// The process's resident memory, where the system tells it (Linux:
/// `/proc/self/statm`, in pages of 4 KiB).
pub fn resident() -> Option<u64> {
    let statm = std::fs::read_to_string("/proc/self/statm").ok()?;
    let pages: u64 = statm.split_whitespace().nth(1)?.parse().ok()?;
    Some(pages * 4096)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    #[test]
    fn charges_are_bounded_and_released_on_drop() {
        let m = Memory::new(1000);
        let now = Instant::now();
        let s = SessionId([1; 16]);
        m.set_core(300);
        let a = m.charge(Some(s), 500, now).unwrap();
        assert_eq!(m.used(), 800);
        let over = m.charge(None, 201, now).unwrap_err();
        assert_eq!((over.asked, over.used, over.limit), (201, 800, 1000));
        let b = m.charge(None, 200, now).unwrap();
        assert_eq!(m.available(), 0);
        drop(a);
        assert_eq!((m.used(), m.held_by(&s)), (500, 0));
        drop(b);
        assert_eq!(m.io(), 0);
    }

    #[test]
    fn the_oldest_data_names_the_offender_once_it_is_old_enough() {
        let m = Memory::new(1 << 20);
        let t0 = Instant::now();
        let (old, young) = (SessionId([1; 16]), SessionId([2; 16]));
        let _a = m.charge(Some(old), 10, t0).unwrap();
        let _b = m
            .charge(Some(young), 10_000, t0 + Duration::from_secs(2))
            .unwrap();
        assert_eq!(m.oldest(t0 + Duration::from_millis(100)), None);
        assert_eq!(m.oldest(t0 + Duration::from_secs(3)), Some(old));
        drop(_a);
        assert_eq!(m.oldest(t0 + Duration::from_secs(3)), None);
        assert_eq!(m.oldest(t0 + Duration::from_secs(5)), Some(young));
    }

    #[test]
    fn a_doomed_session_stops_counting_and_names_its_readers() {
        let m = Memory::new(1000);
        let now = Instant::now();
        let s = SessionId([3; 16]);
        let read = m.charge_read(Some(s), 600, now, Some(42)).unwrap();
        let queued = m.charge(Some(s), 100, now).unwrap();
        assert_eq!(m.doom(&s), vec![42]);
        assert_eq!((m.used(), m.doomed()), (0, 700));
        assert!(read.doomed());
        assert!(m.charge(Some(s), 1, now).is_err());
        assert_eq!(m.oldest(now + Duration::from_secs(9)), None);
        drop((read, queued));
        assert_eq!(m.doomed(), 0);
        // Its entry is gone: the id could be charged again.
        assert!(m.charge(Some(s), 1, now).is_ok());
    }
}
