//! The designer's I/O: its runtime, its listener and accept loop, its two
//! links into the cascade (to the first hop and to the last), and waiting
//! for replies until a deadline. It knows nothing of steps, routes or
//! sessions: it moves cells and reply bodies, nothing else.
//!
//! Replies arrive on links that the two ends of the cascade open to the
//! designer. The designer faces each end with its own link key and its own
//! listening address ([`Driver::ends`]), so the first and the last hop
//! share nothing that names the designer beyond its IP address. Each
//! accept loop hands on each message's [`ReplyId`]
//! ([`mixnn_wire::Header::reply_id`]) and body, and is bounded like a node
//! ([`Inbound`]): only the live session's hop at its end may deliver
//! there (its link key; a link of a hop replaced since is closed at its
//! next message), at most [`Inbound::links`] links and
//! [`Inbound::handshakes`] handshakes at once per end, at most
//! [`Inbound::queued`] bytes of replies waiting for the designer (past it
//! the links wait, and TCP holds the hops back), and a link silent for
//! [`Inbound::idle`] is closed.

use std::collections::{HashMap, VecDeque};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixnn_net::pacing::LinkPace;
use mixnn_net::{recv_message, Link, LinkConfig, LinkKeypair, LinkListener, PublicLinkKey};
use mixnn_wire::{ReplyId, CELL_SIZE};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::runtime::Runtime;
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};

use crate::cascade::HopInfo;
use crate::error::DesignerError;
use crate::plan::route::Entry;

mod out;

use out::OutLink;

/// How long opening a link to a hop may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The bounds of the designer's two listeners.
#[derive(Debug, Clone, Copy)]
pub struct Inbound {
    /// Links at once per end (the end's hop has one; a second while it
    /// reconnects). A new link of the allowed hop closes the oldest.
    pub links: usize,
    /// Handshakes at once per end; past it a connection is closed at once.
    pub handshakes: usize,
    /// Bytes of replies received and not yet taken by the designer; past
    /// it the links stop reading until the designer catches up.
    pub queued: usize,
    /// A link on which nothing arrives for this long is closed.
    pub idle: Duration,
}

impl Default for Inbound {
    fn default() -> Self {
        Inbound {
            links: 2,
            handshakes: 8,
            queued: 256 << 20,
            idle: Duration::from_secs(600),
        }
    }
}

/// A reply, holding its bytes' share of [`Inbound::queued`] until the
/// designer takes it.
type Reply = (ReplyId, Vec<u8>, OwnedSemaphorePermit);

/// What the accept loop of one end shares with the driver.
#[derive(Default)]
struct End {
    /// The link key of the live session's hop at this end.
    allowed: Mutex<Option<[u8; 32]>>,
    /// Every connection's task, by number.
    tasks: Mutex<HashMap<u64, tokio::task::AbortHandle>>,
    /// The connections of the allowed hop, oldest first.
    links: Mutex<VecDeque<u64>>,
}

impl End {
    fn allowed(&self) -> Option<[u8; 32]> {
        *self.allowed.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn abort(&self, id: u64) {
        if let Some(t) = self
            .tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id)
        {
            t.abort();
        }
    }

    /// Connection `id` proved the allowed hop's key: it is a link of this
    /// end, and past `max` the oldest link closes.
    fn admit(&self, id: u64, max: usize) {
        let mut links = self.links.lock().unwrap_or_else(|e| e.into_inner());
        links.push_back(id);
        while links.len() > max.max(1) {
            if let Some(old) = links.pop_front() {
                self.abort(old);
            }
        }
    }

    /// Connection `id` ended.
    fn gone(&self, id: u64) {
        self.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(&id);
        self.links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .retain(|l| *l != id);
    }

    /// Another hop holds this end now: its links close.
    fn replace(&self, key: [u8; 32]) {
        let mut allowed = self.allowed.lock().unwrap_or_else(|e| e.into_inner());
        if *allowed == Some(key) {
            return;
        }
        *allowed = Some(key);
        let old: Vec<u64> = self
            .links
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .drain(..)
            .collect();
        for id in old {
            self.abort(id);
        }
    }
}

/// The designer's sockets and runtime.
pub struct Driver {
    rt: Runtime,
    /// The link keys the designer shows the first and the last hop.
    keys: [LinkKeypair; 2],
    config: LinkConfig,
    /// Who may deliver at each end.
    ends: [Arc<End>; 2],
    /// Where the first and the last hop deliver.
    me: [SocketAddr; 2],
    replies: mpsc::UnboundedReceiver<Reply>,
    links: Option<(OutLink, OutLink)>,
    pace: Option<LinkPace>,
    rng: ChaCha8Rng,
    /// The slowest link set-up so far (connect and handshake).
    slowest_connect: Duration,
}

impl Driver {
    /// Starts the runtime and listens on `listen`; links are paced as
    /// `pace` says. `seed` seeds the link key and the pacing.
    pub fn start(
        listen: SocketAddr,
        pace: Option<LinkPace>,
        seed: [u8; 32],
    ) -> Result<Self, DesignerError> {
        Driver::start_bounded(listen, pace, seed, Inbound::default())
    }

    /// The same, with the listeners bounded as `inbound` says.
    pub fn start_bounded(
        listen: SocketAddr,
        pace: Option<LinkPace>,
        seed: [u8; 32],
        inbound: Inbound,
    ) -> Result<Self, DesignerError> {
        // Paced links need their ticks on time while the designer's thread
        // builds onions: one worker thread runs the runtime's tasks then.
        let rt = if pace.is_some() {
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
        } else {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
        }
        .map_err(|e| DesignerError::Config {
            message: format!("cannot start the runtime: {e}"),
        })?;
        let mut rng = ChaCha8Rng::from_seed(seed);
        let keys = [
            LinkKeypair::generate(&mut rng),
            LinkKeypair::generate(&mut rng),
        ];
        let config = LinkConfig::mixnn();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        // The last hop's end listens on the next port (any port if `listen`
        // names none).
        let second = SocketAddr::new(
            listen.ip(),
            if listen.port() == 0 {
                0
            } else {
                listen.port().wrapping_add(1)
            },
        );
        let ends = [0, 1].map(|_| Arc::new(End::default()));
        // Permits of 1 KiB: a reply of n bytes holds ceil(n / 1 KiB).
        let budget = Arc::new(Semaphore::new((inbound.queued >> 10).max(1)));
        let mut me = [listen; 2];
        for (i, at) in [listen, second].into_iter().enumerate() {
            let (listener, addr) = rt.block_on(async {
                let l = LinkListener::bind(at, keys[i].clone(), config)
                    .await
                    .map_err(DesignerError::Listen)?;
                let addr = l.local_addr().map_err(DesignerError::Listen)?;
                Ok::<_, DesignerError>((l, addr))
            })?;
            me[i] = addr;
            rt.spawn(accept_loop(
                listener,
                reply_tx.clone(),
                Arc::clone(&ends[i]),
                Arc::clone(&budget),
                inbound,
            ));
        }
        Ok(Driver {
            rt,
            keys,
            config,
            ends,
            me,
            replies,
            links: None,
            pace,
            rng,
            slowest_connect: Duration::ZERO,
        })
    }

    /// The slowest link set-up to a hop so far (TCP connect and Noise
    /// handshake): the init loop's detection bound scales with it.
    pub fn slowest_connect(&self) -> Duration {
        self.slowest_connect
    }

    /// The address the designer listens on for the first hop.
    pub fn listen_addr(&self) -> SocketAddr {
        self.me[0]
    }

    /// What the designer shows the first and the last hop: where each
    /// delivers and the designer's link key it checks.
    pub fn ends(&self) -> [(SocketAddr, [u8; 32]); 2] {
        [0, 1].map(|i| (self.me[i], *self.keys[i].public().as_bytes()))
    }

    /// Opens links to the first and last of `hops` (replacing any links
    /// open) and lets those two deliver to the designer, each at its own
    /// end; links of the hops before are closed at their next message.
    pub fn connect(&mut self, hops: &[HopInfo]) -> Result<(), DesignerError> {
        let (Some(first), Some(last)) = (hops.first(), hops.last()) else {
            return Err(DesignerError::Config {
                message: "a cascade of no hops".into(),
            });
        };
        for (end, hop) in self.ends.iter().zip([first, last]) {
            end.replace(hop.link_key()?);
        }
        let ([first_key, last_key], config) = (&self.keys, self.config);
        let (a, z) = self
            .rt
            .block_on(async {
                let connect = |h: &HopInfo, key: &LinkKeypair| {
                    let key = key.clone();
                    let addr = h.addr;
                    let expect = h.link_key().map(PublicLinkKey::from_bytes);
                    async move {
                        let link = tokio::time::timeout(CONNECT_TIMEOUT, async {
                            Link::connect(addr, &key, Some(expect?), config)
                                .await
                                .map_err(|source| DesignerError::Link { addr, source })
                        })
                        .await
                        .map_err(|_| DesignerError::NoLink {
                            addr,
                            secs: CONNECT_TIMEOUT.as_secs(),
                        })??;
                        Ok::<_, DesignerError>(link.into_split().1)
                    }
                };
                let started = Instant::now();
                let a = connect(first, first_key).await?;
                let took_a = started.elapsed();
                let z = connect(last, last_key).await?;
                Ok::<_, DesignerError>((a, z, took_a.max(started.elapsed() - took_a)))
            })
            .map(|(a, z, took)| {
                self.slowest_connect = self.slowest_connect.max(took);
                (a, z)
            })?;
        let mut seed = || {
            let mut s = [0u8; 32];
            self.rng.fill_bytes(&mut s);
            s
        };
        let (sa, sz) = (seed(), seed());
        self.links = Some((
            OutLink::new(&self.rt, first.addr, a, self.pace, sa),
            OutLink::new(&self.rt, last.addr, z, self.pace, sz),
        ));
        Ok(())
    }

    /// Sends one whole message on `entry`.
    pub fn send(&mut self, entry: Entry, cells: &[u8]) -> Result<(), DesignerError> {
        let (first, last) = self.links.as_mut().ok_or(DesignerError::LinksClosed)?;
        let link = match entry {
            Entry::First => first,
            Entry::Last => last,
        };
        link.send(&self.rt, cells)
    }

    /// The next reply, waiting until `deadline`; `None` when it passed.
    pub fn recv(&mut self, deadline: Instant) -> Result<Option<(ReplyId, Vec<u8>)>, DesignerError> {
        let deadline = tokio::time::Instant::from_std(deadline);
        let replies = &mut self.replies;
        match self
            .rt
            .block_on(async { tokio::time::timeout_at(deadline, replies.recv()).await })
        {
            // The reply's share of the queue budget goes back here.
            Ok(Some((rid, body, _permit))) => Ok(Some((rid, body))),
            Ok(None) => Err(DesignerError::LinksClosed),
            Err(_) => Ok(None),
        }
    }
}

async fn accept_loop(
    listener: LinkListener,
    tx: mpsc::UnboundedSender<Reply>,
    end: Arc<End>,
    budget: Arc<Semaphore>,
    inbound: Inbound,
) {
    let handshakes = Arc::new(Semaphore::new(inbound.handshakes.max(1)));
    let mut next = 0u64;
    loop {
        let pending = match listener.accept().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("designer accept: {e}");
                return;
            }
        };
        let peer = mixnn_net::alias::peer(&pending.peer_addr());
        let Ok(slot) = Arc::clone(&handshakes).try_acquire_owned() else {
            tracing::warn!(
                "link from {peer} refused: {} handshakes already",
                inbound.handshakes
            );
            continue;
        };
        let (tx, end_, budget) = (tx.clone(), Arc::clone(&end), Arc::clone(&budget));
        let id = next;
        next += 1;
        let task = tokio::spawn(async move {
            struct Gone(Arc<End>, u64);
            impl Drop for Gone {
                fn drop(&mut self) {
                    self.0.gone(self.1);
                }
            }
            let _gone = Gone(Arc::clone(&end_), id);
            let link = pending.handshake().await;
            drop(slot);
            let link = match link {
                Ok(l) => l,
                Err(e) => return tracing::warn!("link from {peer}: {e}"),
            };
            let key = *link.remote_key().as_bytes();
            if end_.allowed() != Some(key) {
                return tracing::warn!(
                    "link from {peer} refused: not the live session's hop at this end"
                );
            }
            end_.admit(id, inbound.links);
            let (mut reader, _w) = link.into_split();
            reader.set_idle_timeout(Some(inbound.idle));
            let mut cell = vec![0u8; CELL_SIZE];
            loop {
                let msg = match recv_message(&mut reader, &mut cell).await {
                    Ok(msg) => msg,
                    Err(mixnn_net::NetError::Closed { .. }) => return,
                    Err(e) => return tracing::warn!("link from {peer}: {e}"),
                };
                // A hop replaced since (or of a session rebuilt without
                // it) delivers no more.
                if end_.allowed() != Some(key) {
                    return tracing::debug!("link from {peer} closed: its hop was replaced");
                }
                let kib = u32::try_from(msg.body.len().div_ceil(1024).max(1)).unwrap_or(u32::MAX);
                let Ok(permit) = Arc::clone(&budget).acquire_many_owned(kib).await else {
                    return;
                };
                if tx
                    .send((msg.onion.header.reply_id(), msg.body, permit))
                    .is_err()
                {
                    return;
                }
            }
        });
        end.tasks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .insert(id, task.abort_handle());
        // A task that ended before it was entered (another worker thread)
        // left nothing to remove; remove it here.
        if task.is_finished() {
            end.gone(id);
        }
    }
}
