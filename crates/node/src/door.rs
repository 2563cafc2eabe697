//! Who gets a connection slot: the node's inbound connections in two
//! pools, so that connections that never authenticate, or authenticate and
//! never finish a request, cannot lock honest peers out (as Tor keeps
//! circuit creation apart from the circuits that carry traffic).
//!
//! * **Handshakes** (unauthenticated): at most `max_handshakes` at once,
//!   each bounded by the handshake timeout. When the pool is full, a new
//!   connection takes the place of the oldest pending handshake of the
//!   source address holding the most of them: an honest handshake takes
//!   milliseconds, so it is never the oldest for long.
//! * **Links** (authenticated): at most `max_links`, at most
//!   `max_links_per_key` with one link key. A link is *unproven* until the
//!   core accepts a whole message from it. When the pool is full, a new
//!   link takes the place of a link whose key no live session names (a
//!   neighbour's or a designer's): the oldest unproven one, failing that
//!   the proven one idle the longest if idle for
//!   [`DoorConfig::idle_evict`]; failing that it is refused. A link whose
//!   key a session names is never closed for another: a designer opens its
//!   link to the last hop at set-up and may send nothing on it for a while.
//!   (An earlier version also closed every link that delivered no accepted
//!   message within 10 s: under the soak's load that closed designers'
//!   silent links to the last hop, and an honest run lost a message.)
//!
//! The door only decides; the I/O layer closes the connections it names
//! (their tasks' abort handles).

use std::collections::{HashMap, HashSet};
use std::net::IpAddr;
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::task::AbortHandle;

/// The door's limits.
#[derive(Debug, Clone, Copy)]
pub struct DoorConfig {
    /// Connections whose handshake has not finished.
    pub max_handshakes: usize,
    /// Authenticated links.
    pub max_links: usize,
    /// Authenticated links with one link key.
    pub max_links_per_key: usize,
    /// A proven link idle for this long may give its slot to a new link
    /// when every slot is taken.
    pub idle_evict: Duration,
}

impl Default for DoorConfig {
    fn default() -> Self {
        DoorConfig {
            max_handshakes: 64,
            max_links: 256,
            max_links_per_key: 8,
            idle_evict: Duration::from_secs(30),
        }
    }
}

/// A pending handshake younger than this gives its place to a new one
/// only if every pending one is as young.
const EVICTABLE: Duration = Duration::from_millis(250);

/// A connection's number at the door.
pub(crate) type Ticket = u64;

#[derive(Debug)]
struct Pending {
    ip: IpAddr,
    since: Instant,
    /// The peer has sent something (its handshake began).
    talking: bool,
    task: Option<AbortHandle>,
}

#[derive(Debug)]
struct Slot {
    key: [u8; 32],
    since: Instant,
    proven: bool,
    last: Instant,
    task: Option<AbortHandle>,
}

#[derive(Debug, Default)]
struct State {
    next: Ticket,
    pending: HashMap<Ticket, Pending>,
    links: HashMap<Ticket, Slot>,
}

/// The node's inbound connection slots.
#[derive(Debug)]
pub(crate) struct Door {
    config: DoorConfig,
    state: Mutex<State>,
}

/// Why a link got no slot.
#[derive(Debug)]
pub(crate) struct NoSlot(pub(crate) String);

impl Door {
    pub(crate) fn new(config: DoorConfig) -> Door {
        Door {
            config,
            state: Mutex::new(State::default()),
        }
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new connection from `ip` at `now`: its ticket, making room in the
    /// handshake pool if it is full (the connection whose place it takes
    /// is closed).
    pub(crate) fn arrive(&self, ip: IpAddr, now: Instant) -> Ticket {
        let mut s = self.lock();
        if s.pending.len() >= self.config.max_handshakes.max(1) {
            let mut per_ip: HashMap<IpAddr, usize> = HashMap::new();
            for p in s.pending.values() {
                *per_ip.entry(p.ip).or_default() += 1;
            }
            // An honest handshake takes milliseconds: one pending for less
            // than EVICTABLE is never the one to go (a burst of new
            // connections cannot push it out), unless every one is that
            // young; and a connection that has sent nothing goes before
            // one whose handshake began (on a busy node that can take
            // longer).
            let victim = s
                .pending
                .iter()
                .max_by_key(|(_, p)| {
                    (
                        now.saturating_duration_since(p.since) >= EVICTABLE,
                        !p.talking,
                        per_ip[&p.ip],
                        std::cmp::Reverse(p.since),
                    )
                })
                .map(|(t, _)| *t);
            if let Some(t) = victim {
                if let Some(p) = s.pending.remove(&t) {
                    if let Some(task) = p.task {
                        task.abort();
                    }
                    tracing::debug!("handshake pool full: closed the oldest pending handshake");
                }
            }
        }
        let t = s.next;
        s.next += 1;
        s.pending.insert(
            t,
            Pending {
                ip,
                since: now,
                talking: false,
                task: None,
            },
        );
        t
    }

    /// Connection `t`'s peer has sent something: its handshake began.
    pub(crate) fn talking(&self, t: Ticket) {
        if let Some(p) = self.lock().pending.get_mut(&t) {
            p.talking = true;
        }
    }

    /// The task serving connection `t` (closed if the door evicts it).
    pub(crate) fn serving(&self, t: Ticket, task: AbortHandle) {
        let mut s = self.lock();
        if let Some(p) = s.pending.get_mut(&t) {
            p.task = Some(task);
        } else if let Some(l) = s.links.get_mut(&t) {
            l.task = Some(task);
        } else {
            // Already evicted, or done.
            task.abort();
        }
    }

    /// Connection `t` finished its handshake proving `key` at `now`: it
    /// gets a link slot, or why not.
    ///
    /// `named` holds the link keys the live sessions name: links with them
    /// are never closed to make room.
    pub(crate) fn authenticated(
        &self,
        t: Ticket,
        key: [u8; 32],
        now: Instant,
        named: &HashSet<[u8; 32]>,
    ) -> Result<(), NoSlot> {
        let mut s = self.lock();
        let task = s.pending.remove(&t).and_then(|p| p.task);
        let same_key: Vec<(Ticket, Instant)> = s
            .links
            .iter()
            .filter(|(_, l)| l.key == key)
            .map(|(t, l)| (*t, l.since))
            .collect();
        if same_key.len() >= self.config.max_links_per_key.max(1) {
            // The newest link of a key is the one in use (a designer or a
            // neighbour that reconnected): the oldest gives way.
            if let Some((old, _)) = same_key.iter().min_by_key(|(_, since)| *since) {
                evict(&mut s, *old);
            }
        }
        if s.links.len() >= self.config.max_links.max(1) {
            let unnamed = |l: &&Slot| !named.contains(&l.key);
            let unproven = s
                .links
                .iter()
                .filter(|(_, l)| !l.proven && unnamed(l))
                .min_by_key(|(_, l)| l.since)
                .map(|(t, _)| *t);
            let idle = s
                .links
                .iter()
                .filter(|(_, l)| l.proven && unnamed(l))
                .min_by_key(|(_, l)| l.last)
                .filter(|(_, l)| now.saturating_duration_since(l.last) >= self.config.idle_evict)
                .map(|(t, _)| *t);
            match unproven.or(idle) {
                Some(victim) => evict(&mut s, victim),
                None => {
                    return Err(NoSlot(format!(
                        "all {} link slots hold links of live sessions or links that carried traffic within {} s",
                        self.config.max_links,
                        self.config.idle_evict.as_secs()
                    )))
                }
            }
        }
        s.links.insert(
            t,
            Slot {
                key,
                since: now,
                proven: false,
                last: now,
                task,
            },
        );
        Ok(())
    }

    /// The core accepted a message from link `t` at `now`.
    pub(crate) fn active(&self, t: Ticket, now: Instant) {
        if let Some(l) = self.lock().links.get_mut(&t) {
            l.proven = true;
            l.last = now;
        }
    }

    /// Connection `t` is gone.
    pub(crate) fn gone(&self, t: Ticket) {
        let mut s = self.lock();
        s.pending.remove(&t);
        s.links.remove(&t);
    }

    /// Closes connection `t` (its session was shed while it read).
    pub(crate) fn close(&self, t: Ticket) {
        let mut s = self.lock();
        let task = match s.links.remove(&t) {
            Some(l) => l.task,
            None => s.pending.remove(&t).and_then(|p| p.task),
        };
        if let Some(task) = task {
            task.abort();
        }
    }

    /// Pending handshakes and links, now.
    #[cfg(test)]
    pub(crate) fn counts(&self) -> (usize, usize) {
        let s = self.lock();
        (s.pending.len(), s.links.len())
    }
}

fn evict(s: &mut State, t: Ticket) {
    if let Some(l) = s.links.remove(&t) {
        if let Some(task) = l.task {
            task.abort();
        }
        tracing::debug!(
            proven = l.proven,
            "link slots full: closed a link to make room for a new one"
        );
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    fn door(handshakes: usize, links: usize) -> Door {
        Door::new(DoorConfig {
            max_handshakes: handshakes,
            max_links: links,
            max_links_per_key: 2,
            idle_evict: Duration::from_secs(30),
        })
    }

    #[test]
    fn a_full_handshake_pool_drops_the_oldest_of_the_busiest_source() {
        let d = door(3, 10);
        let t0 = Instant::now();
        let (a, b) = ("10.0.0.1".parse().unwrap(), "10.0.0.2".parse().unwrap());
        let first_a = d.arrive(a, t0);
        d.arrive(b, t0 + Duration::from_millis(1));
        d.arrive(a, t0 + Duration::from_millis(2));
        d.arrive(b, t0 + Duration::from_millis(3));
        // a held two of three: its oldest went.
        assert_eq!(d.counts(), (3, 0));
        assert!(!d.lock().pending.contains_key(&first_a));
        // A second later b's pending ones are old; a burst from a cannot
        // push out a handshake of a's younger than 250 ms before them.
        let later = t0 + Duration::from_secs(1);
        let young = d.arrive(a, later);
        d.arrive(a, later + Duration::from_millis(1));
        d.arrive(a, later + Duration::from_millis(2));
        assert!(d.lock().pending.contains_key(&young));
        // Once all are old, one that began its handshake outlasts the
        // silent ones, older or not.
        d.talking(young);
        let much_later = later + Duration::from_secs(1);
        d.arrive(b, much_later);
        d.arrive(b, much_later + Duration::from_secs(1));
        assert!(d.lock().pending.contains_key(&young));
    }

    #[test]
    fn unproven_links_give_way_then_idle_ones_then_new_links_are_refused() {
        let none = HashSet::new();
        let d = door(10, 2);
        let t0 = Instant::now();
        let ip = "10.0.0.1".parse().unwrap();
        let (x, y, z) = (d.arrive(ip, t0), d.arrive(ip, t0), d.arrive(ip, t0));
        d.authenticated(x, [1; 32], t0, &none).unwrap();
        d.authenticated(y, [2; 32], t0, &none).unwrap();
        d.active(y, t0);
        // x is unproven: z takes its place.
        d.authenticated(z, [3; 32], t0, &none).unwrap();
        assert!(!d.lock().links.contains_key(&x));
        d.active(z, t0 + Duration::from_secs(40));
        // Both proven; y idle 40 s: a new link takes its slot.
        let w = d.arrive(ip, t0);
        d.authenticated(w, [4; 32], t0 + Duration::from_secs(40), &none)
            .unwrap();
        assert!(!d.lock().links.contains_key(&y));
        d.active(w, t0 + Duration::from_secs(40));
        // Both busy: refused.
        let v = d.arrive(ip, t0);
        assert!(d
            .authenticated(v, [5; 32], t0 + Duration::from_secs(41), &none)
            .is_err());
    }

    #[test]
    fn one_key_holds_a_few_links_at_most() {
        let none = HashSet::new();
        let d = door(10, 10);
        let t0 = Instant::now();
        let ip = "10.0.0.1".parse().unwrap();
        let ts: Vec<Ticket> = (0..3).map(|_| d.arrive(ip, t0)).collect();
        for (i, t) in ts.iter().enumerate() {
            d.authenticated(*t, [7; 32], t0 + Duration::from_secs(i as u64), &none)
                .unwrap();
        }
        assert_eq!(d.counts(), (0, 2));
        assert!(!d.lock().links.contains_key(&ts[0]));
    }
}

#[cfg(test)]
mod named {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    /// A designer's link to the last hop sends nothing for a while after
    /// set-up: a flood of new links never closes it, since a live session
    /// names its key; links of unnamed keys give way.
    #[test]
    fn a_link_a_session_names_is_never_closed_for_another() {
        let d = Door::new(DoorConfig {
            max_handshakes: 10,
            max_links: 2,
            max_links_per_key: 2,
            idle_evict: Duration::from_secs(30),
        });
        let t0 = Instant::now();
        let ip = "10.0.0.1".parse().unwrap();
        let named: HashSet<[u8; 32]> = [[1; 32]].into_iter().collect();
        let designer = d.arrive(ip, t0);
        d.authenticated(designer, [1; 32], t0, &named).unwrap();
        for k in 0..10u8 {
            let t = d.arrive(ip, t0);
            let _ = d.authenticated(t, [100 + k; 32], t0 + Duration::from_secs(60), &named);
        }
        assert!(d.lock().links.contains_key(&designer));
        assert_eq!(d.counts().1, 2);
    }
}
