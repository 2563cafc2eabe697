//! Messages out: one queue and one writer task per link (an address and
//! the link key its peer must prove), the link opened by the first
//! message for it.
//!
//! Every queued message carries its [`Charge`] on the node's memory budget
//! ([`crate::memory`]), released when it is written or dropped. A write
//! that does not drain within the write timeout closes its link and drops
//! what the link had queued, so a peer that never reads costs the node at
//! most one timeout's worth of queue. When the budget is reached, the I/O
//! layer sheds the session with the oldest queued data: [`Egress::shed`]
//! takes its messages out of every queue at once and closes the links
//! stuck writing one of them.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use mixnn_net::pacing::{self, PacedQueue, Taken};
use mixnn_net::{alias, Link, LinkConfig, LinkKeypair, NetError, PublicLinkKey};
use mixnn_wire::SessionId;
use rand_core::RngCore;
use tokio::sync::Notify;

use crate::memory::{Charge, MIN_OFFENDING_AGE};

/// Tries at opening a link before its queued messages are given up.
const CONNECT_TRIES: u32 = 3;

/// A link: where, and the key its peer must prove.
pub(crate) type LinkId = (SocketAddr, [u8; 32]);

/// A message waiting for its link, with its charge on the budget.
#[derive(Debug)]
pub(crate) struct Queued {
    pub(crate) cells: Vec<u8>,
    pub(crate) charge: Charge,
}

impl AsRef<[u8]> for Queued {
    fn as_ref(&self) -> &[u8] {
        &self.cells
    }
}

/// How links are written.
#[derive(Debug, Clone, Copy)]
pub(crate) struct EgressConfig {
    /// Constant-rate links, or `None`.
    pub(crate) pace: Option<pacing::LinkPace>,
    /// A link with nothing to send for half of this closes itself.
    pub(crate) idle: Duration,
    /// A write that does not drain within this closes its link.
    pub(crate) write_timeout: Duration,
}

/// One link's queue, shared by the writer task and [`Egress`].
#[derive(Debug, Default)]
struct LinkQueue {
    state: Mutex<QueueState>,
    notify: Notify,
}

#[derive(Debug, Default)]
struct QueueState {
    items: VecDeque<Queued>,
    closed: bool,
    /// The session of the message being written, and since when.
    writing: Option<(Option<SessionId>, Instant)>,
    task: Option<tokio::task::AbortHandle>,
}

impl LinkQueue {
    fn lock(&self) -> MutexGuard<'_, QueueState> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `q`, or gives it back if the link has closed.
    fn push(&self, q: Queued) -> Result<(), Queued> {
        let mut s = self.lock();
        if s.closed {
            return Err(q);
        }
        s.items.push_back(q);
        drop(s);
        self.notify.notify_one();
        Ok(())
    }

    /// Closes the link: nothing more is queued, what was is dropped.
    fn close(&self) -> usize {
        let mut s = self.lock();
        s.closed = true;
        let dropped = s.items.len();
        s.items.clear();
        dropped
    }

    /// The next message, waiting for one up to `idle`; `None` (and the
    /// link closed) when none came.
    async fn next(&self, idle: Duration) -> Option<Queued> {
        let deadline = tokio::time::Instant::now() + idle;
        loop {
            // Registered before the check, so a push in between wakes it.
            let notified = self.notify.notified();
            {
                let mut s = self.lock();
                if let Some(q) = s.items.pop_front() {
                    return Some(q);
                }
                if s.closed {
                    return None;
                }
            }
            if tokio::time::timeout_at(deadline, notified).await.is_err() {
                let mut s = self.lock();
                if let Some(q) = s.items.pop_front() {
                    return Some(q);
                }
                s.closed = true;
                return None;
            }
        }
    }

    fn writing(&self, q: Option<&Queued>) {
        self.lock().writing = q.map(|q| (q.charge.session(), Instant::now()));
    }
}

/// A paced link's source: its queue ([`PacedQueue`]).
struct Source(Arc<LinkQueue>);

impl PacedQueue for Source {
    type Item = Queued;

    fn take(&mut self) -> Taken<Queued> {
        let mut s = self.0.lock();
        match s.items.pop_front() {
            Some(q) => Taken::Item(q),
            None if s.closed => Taken::Closed,
            None => Taken::Empty,
        }
    }

    fn len(&self) -> usize {
        self.0.lock().items.len()
    }
}

/// The node's outbound links.
pub(crate) struct Egress {
    links: Mutex<HashMap<LinkId, Arc<LinkQueue>>>,
    key: Arc<LinkKeypair>,
    config: EgressConfig,
}

impl Egress {
    pub(crate) fn new(key: LinkKeypair, config: EgressConfig) -> Arc<Egress> {
        Arc::new(Egress {
            links: Mutex::new(HashMap::new()),
            key: Arc::new(key),
            config,
        })
    }

    fn links(&self) -> MutexGuard<'_, HashMap<LinkId, Arc<LinkQueue>>> {
        self.links.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues `q` for the link `to`, opening it if it is not open. Must be
    /// called within the runtime (a new link's writer is spawned).
    pub(crate) fn send(self: &Arc<Self>, to: LinkId, q: Queued) {
        let mut links = self.links();
        let q = match links.get(&to) {
            Some(link) => match link.push(q) {
                Ok(()) => return,
                Err(q) => q,
            },
            None => q,
        };
        // Links that closed (idle, failed) leave no entry behind.
        links.retain(|_, l| !l.lock().closed);
        let link = Arc::new(LinkQueue::default());
        // A new queue is open.
        let _ = link.push(q);
        links.insert(to, Arc::clone(&link));
        drop(links);
        let task = tokio::spawn(write_loop(
            to,
            Arc::clone(&link),
            Arc::clone(&self.key),
            self.config,
        ));
        link.lock().task = Some(task.abort_handle());
    }

    /// The session whose message has waited longest to be written on a
    /// link that does not drain (its write pending for at least
    /// [`MIN_OFFENDING_AGE`]), among those `skip` does not exclude: the
    /// first to shed, since an honest peer reads what it is sent.
    pub(crate) fn stuck(
        &self,
        now: Instant,
        skip: impl Fn(&SessionId) -> bool,
    ) -> Option<SessionId> {
        self.links()
            .values()
            .filter_map(|l| {
                let s = l.lock();
                match s.writing {
                    Some((Some(session), since))
                        if !s.closed
                            && !skip(&session)
                            && now.saturating_duration_since(since) >= MIN_OFFENDING_AGE =>
                    {
                        Some((session, since))
                    }
                    _ => None,
                }
            })
            .min_by_key(|(_, since)| *since)
            .map(|(session, _)| session)
    }

    /// Takes every queued message of `session` out of the queues, and
    /// closes the links stuck writing one of its messages (for more than
    /// [`MIN_OFFENDING_AGE`]); returns the messages and links dropped.
    pub(crate) fn shed(&self, session: &SessionId, now: Instant) -> (usize, usize) {
        let (mut messages, mut closed) = (0, 0);
        for link in self.links().values() {
            let mut s = link.lock();
            let before = s.items.len();
            s.items
                .retain(|q| q.charge.session().as_ref() != Some(session));
            messages += before - s.items.len();
            let stuck = matches!(s.writing, Some((Some(w), since))
                if &w == session && now.saturating_duration_since(since) >= MIN_OFFENDING_AGE);
            if stuck {
                s.closed = true;
                messages += s.items.len() + 1;
                s.items.clear();
                if let Some(t) = s.task.take() {
                    t.abort();
                }
                closed += 1;
            }
        }
        (messages, closed)
    }
}

async fn write_loop(
    to: LinkId,
    queue: Arc<LinkQueue>,
    key: Arc<LinkKeypair>,
    config: EgressConfig,
) {
    let (addr, expect) = to;
    let who = alias::peer(&addr);
    // A connection can fail for a moment (the peer's handshake slots
    // taken by a flood, a busy peer): a few tries before its messages are
    // given up. A peer proving another key is not tried again.
    let mut tries = 0;
    let link = loop {
        tries += 1;
        match Link::connect(
            addr,
            &key,
            Some(PublicLinkKey::from_bytes(expect)),
            LinkConfig::mixnn(),
        )
        .await
        {
            Ok(l) => break l,
            Err(e) if tries < CONNECT_TRIES && !matches!(e, NetError::UnexpectedPeer { .. }) => {
                tracing::debug!("cannot reach {who} (try {tries}): {e}");
                tokio::time::sleep(Duration::from_millis(500) * tries).await;
            }
            Err(e) => {
                let lost = queue.close();
                return tracing::warn!(
                    "cannot reach {who}: {e}; {lost} queued messages to it dropped"
                );
            }
        }
    };
    let (_reader, mut writer) = link.into_split();
    let timeout = config.write_timeout;
    let Some(pace) = config.pace else {
        // With nothing to send for half the idle timeout, close the link
        // before the other end does; the next message opens a new one.
        while let Some(q) = queue.next(config.idle / 2).await {
            queue.writing(Some(&q));
            let wrote = tokio::time::timeout(timeout, writer.send_cells(&q.cells)).await;
            queue.writing(None);
            drop(q);
            match wrote {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    let lost = queue.close();
                    return tracing::warn!(
                        "link to {who} failed: {e}; {lost} queued messages dropped"
                    );
                }
                Err(_) => {
                    let lost = queue.close();
                    return tracing::warn!(
                        "link to {who} closed: a write did not drain within {} s (the peer does not read); {lost} queued messages dropped",
                        timeout.as_secs_f64()
                    );
                }
            }
        }
        return tracing::debug!("closing the link to {who}: idle");
    };
    // Constant rate: one whole message per tick, for as long as the link
    // and the node last.
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let mut pacer = pacing::Pacer::new(addr, pace, Source(Arc::clone(&queue)), seed);
    while let Some(paced) = pacer.next().await {
        if let pacing::Paced::Real(q) = &paced {
            queue.writing(Some(q));
        }
        let wrote = tokio::time::timeout(timeout, writer.send_cells(paced.cells())).await;
        queue.writing(None);
        let failed = match wrote {
            Ok(Ok(())) => continue,
            Ok(Err(e)) => e.to_string(),
            Err(_) => format!(
                "a write did not drain within {} s (the peer does not read)",
                timeout.as_secs_f64()
            ),
        };
        let lost = queue.close() + usize::from(matches!(paced, pacing::Paced::Real(_)));
        return tracing::warn!("link to {who} failed: {failed}; {lost} queued messages dropped");
    }
}
