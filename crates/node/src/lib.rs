//! MixNN node daemon: accepts Noise links, reads whole messages, peels one
//! onion layer, runs its stage and sends the result on.
//!
//! ```text
//!  door ──► reader tasks (first cell: admit; read, decrypt, peel, compute) ──► link queues ──► writer tasks ──► links
//! ```
//!
//! The [`core::Core`] state machine owns the onion key, the sessions and the
//! stages; it has no sockets and no clocks. Everything runs on the caller's
//! runtime (the `mixnn node` binary uses a single-threaded one): a reader
//! task hands each whole message to the core and the core's answers go to
//! the writer task of their link, so a message is decrypted, computed on,
//! encrypted and written by one thread while it is hot in that core's
//! cache. An earlier design ran the core on its own thread; moving every
//! message between threads twice cost more than the overlap it bought (see
//! the README, "Where the time goes"). The library exposes [`run`]; the
//! `mixnn node` binary only parses arguments, loads keys and sets up
//! logging.
//!
//! A node is bounded ([`Limits`], `SECURITY.md` "Node limits"): the core
//! checks every init and message against its limits before it spends
//! anything on it; one memory budget ([`memory`]) covers the sessions, the
//! messages being read (charged from their first cell, which the core
//! looks at before the rest is read: [`Core::admit`]) and the messages
//! queued for links (`egress.rs`); when it is reached the session holding
//! the oldest queued data is shed, never the node; writes that do not
//! drain close their link; connections that never authenticate, or never
//! deliver a whole accepted message, have slots of their own (`door.rs`);
//! a message that makes the stage code panic fails alone (the session it
//! was for is dropped, the node goes on); idle sessions expire (the I/O
//! layer ticks the core's [`Core::expire`] every second); links that stay
//! silent for [`NodeConfig::link_idle`] are closed; and the replay tags of
//! accepted inits are kept in the state directory
//! ([`NodeConfig::replay_file`]), so an init recorded before a restart is
//! refused after it.

mod adversary;
pub mod announce;
pub mod audit;
pub mod core;
pub mod cover;
pub mod door;
mod egress;
mod error;
mod ingress;
pub mod limits;
pub mod memory;
mod replay_file;
mod routes;
mod session;
pub use mixnn_net::pacing;

use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mixnn_net::{alias, LinkListener, NodeKeys};
use mixnn_wire::{CellKind, CellReader, Message, OnionSecret, CELL_SIZE};
use rand_core::RngCore;
use tokio::sync::mpsc;

pub use crate::core::{Admitted, Core, Limits, Now, Outbound};
pub use crate::door::DoorConfig;
use crate::door::{Door, Ticket};
use crate::egress::{Egress, EgressConfig, Queued};
pub use crate::error::NodeError;
use crate::ingress::{read_loop, Admission, Reading};
use crate::memory::Memory;
#[cfg(feature = "adversary")]
pub use adversary::{Adversary, AdversaryMode, Mutation, MutationKind};

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Memory bounds of the core, and the node's memory budget
    /// ([`Limits::max_memory`]).
    pub limits: Limits,
    /// Connection slots: handshakes and authenticated links
    /// ([`DoorConfig`]).
    pub door: DoorConfig,
    /// An inbound link on which no cell arrives for this long (or whose
    /// handshake takes longer) is closed, so idle and half-open links do
    /// not hold the link slots for good. Links this node opens close
    /// themselves after half of it without anything to send (and reopen
    /// for the next message), so neighbours with the same setting never
    /// lose a message to a link the other end is closing.
    pub link_idle: Duration,
    /// Every cell of a message must have arrived within this of its first
    /// cell, or the link is closed (a request that never finishes).
    pub request_timeout: Duration,
    /// A write to a link that does not drain within this closes the link
    /// and drops what it had queued (a peer that does not read).
    pub write_timeout: Duration,
    /// Where the replay tags of accepted inits are kept (`None`: in
    /// memory only, so a restart forgets them).
    pub replay_file: Option<PathBuf>,
    /// If set, the node writes every address it has learned (one per line)
    /// to this file after each change: an audit of what it knows, for
    /// debugging and tests only (`mixnn node --debug-record-peers`); `None`
    /// by default, so that nothing at rest names the node's peers.
    pub learned_file: Option<PathBuf>,
    /// Cover messages per second (Poisson), sent to random
    /// [`NodeConfig::cover_peers`]; `None` sends none.
    pub cover_rate: Option<pacing::Rate>,
    /// Where cover messages may go: address and link key of other nodes.
    /// When not empty, these win over [`NodeConfig::cover_view`].
    pub cover_peers: Vec<cover::CoverPeer>,
    /// Cover peers that change while the node runs: the latest list sent
    /// on this channel (the other nodes of the directory's view, see
    /// [`announce::CoverView`]). Used only when `cover_peers` is empty.
    pub cover_view: Option<tokio::sync::watch::Receiver<Vec<cover::CoverPeer>>>,
    /// Constant-rate links: messages per second on every outbound link,
    /// one whole message per tick (the oldest queued one, else a cover
    /// message; see [`pacing`]); `None` sends each message as soon as it
    /// is ready (no pacing).
    pub link_rate: Option<pacing::Rate>,
    /// On paced links, each message leaves at a uniformly random offset
    /// in `[0, link_jitter / link_rate)` after its tick (0: on the tick;
    /// see [`pacing::LinkPace::jitter`]).
    pub link_jitter: f64,
    /// Messages a paced link may queue before it logs an error (once);
    /// it never drops one.
    pub link_queue_bound: usize,
    /// Fault injection for tests: after this many session messages the
    /// node silently stops sending anything (a node that drops packets).
    /// `None` in production.
    pub drop_after: Option<u64>,
    /// Misbehaviour for tests of audits (feature `adversary` only).
    #[cfg(feature = "adversary")]
    pub adversary: Option<adversary::Adversary>,
    /// A curious hop (feature `adversary`, collusion tests): every byte
    /// string the node receives outside the model's tensors — raw headers
    /// and notes, its peeled notes and tags, commitment trailers, relayed
    /// bodies — is appended here.
    #[cfg(feature = "adversary")]
    pub record: Option<core::Record>,
    /// A curious hop that also writes down the model's tensors it sees
    /// (feature `adversary`, the adversary simulator): its stage, every
    /// forward, backward and test it runs (tensors in and out, step,
    /// labels) and its final state, each an encoded
    /// [`mixnn_proto::observed::Observation`].
    #[cfg(feature = "adversary")]
    pub observe: Option<core::Record>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            limits: Limits::default(),
            door: DoorConfig::default(),
            link_idle: Duration::from_secs(300),
            request_timeout: Duration::from_secs(30),
            write_timeout: Duration::from_secs(30),
            replay_file: None,
            learned_file: None,
            cover_rate: None,
            cover_peers: Vec::new(),
            cover_view: None,
            link_rate: None,
            link_jitter: 1.0,
            link_queue_bound: pacing::DEFAULT_QUEUE_BOUND,
            drop_after: None,
            #[cfg(feature = "adversary")]
            adversary: None,
            #[cfg(feature = "adversary")]
            record: None,
            #[cfg(feature = "adversary")]
            observe: None,
        }
    }
}

impl Now {
    /// The system's clocks.
    pub fn system() -> Now {
        Now {
            mono: Instant::now(),
            unix: SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_secs()),
        }
    }
}

/// Serves links on `listener` until `shutdown` completes.
pub async fn run(
    listener: LinkListener,
    keys: &NodeKeys,
    config: NodeConfig,
    shutdown: impl Future<Output = ()>,
) -> Result<(), NodeError> {
    let onion = OnionSecret::from_bytes(keys.onion().to_bytes());
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let mut core = Core::new(onion, seed, config.limits);
    let memory = Memory::for_budget(config.limits.max_memory);
    core.set_memory(Arc::clone(&memory));
    #[cfg(feature = "adversary")]
    core.set_adversary(config.adversary.clone());
    #[cfg(feature = "adversary")]
    core.set_record(config.record.clone());
    #[cfg(feature = "adversary")]
    core.set_observe(config.observe.clone());
    let replay = match &config.replay_file {
        Some(path) => {
            let state = |source| NodeError::State {
                path: path.clone(),
                source,
            };
            let (mut file, tags) = replay_file::ReplayFile::open(path).map_err(state)?;
            core.remember_inits(tags, Now::system());
            file.rewrite(&core.init_tags()).map_err(state)?;
            tracing::info!(
                "{} init replay tags from {}",
                core.init_tags().len(),
                path.display()
            );
            Some(file)
        }
        None => None,
    };
    let pace = config
        .link_rate
        .and_then(|r| pacing::LinkPace::new(r.per_second(), config.link_jitter))
        .map(|p| pacing::LinkPace {
            bound: config.link_queue_bound,
            ..p
        });
    let idle = config.link_idle;
    let egress = Egress::new(
        keys.link().clone(),
        EgressConfig {
            pace,
            idle,
            write_timeout: config.write_timeout,
        },
    );
    let sizes = Arc::new(cover::LinkSizes::default());
    let door = Arc::new(Door::new(config.door));
    let shared = Arc::new(Mutex::new(Shared {
        core,
        memory: Arc::clone(&memory),
        egress: Arc::clone(&egress),
        door: Arc::clone(&door),
        learned_file: config.learned_file.clone(),
        drop_after: config.drop_after,
        sizes: Arc::clone(&sizes),
        known: 0,
        handled: 0,
        replay,
    }));
    // Idle sessions expire even when no message arrives; a budget more
    // than half used is reported every 10 s.
    let ticker = tokio::spawn({
        let shared = Arc::clone(&shared);
        let memory = Arc::clone(&memory);
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut reported = Instant::now();
            loop {
                tick.tick().await;
                match shared.lock() {
                    Ok(mut s) => {
                        s.core.expire(Now::system());
                    }
                    Err(_) => return tracing::error!("core state poisoned by a panic"),
                }
                let used = memory.used();
                if used > memory.limit() / 2 && reported.elapsed() >= Duration::from_secs(10) {
                    reported = Instant::now();
                    tracing::info!(
                        "memory: {} of {} MiB in use ({} queued or being read, {} of shed sessions); resident {} MiB",
                        used >> 20,
                        memory.limit() >> 20,
                        memory.io() >> 20,
                        memory.doomed() >> 20,
                        memory::resident().map_or("?".into(), |r| (r >> 20).to_string())
                    );
                }
            }
        }
    });
    // Cover messages are charged like any other (to no session) and
    // dropped when the budget has no room for them.
    let (cover_tx, mut cover_rx) = mpsc::unbounded_channel::<Outbound>();
    let cover_out = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            while let Some(o) = cover_rx.recv().await {
                match shared.lock() {
                    Ok(mut s) => {
                        s.queue(o, Instant::now());
                    }
                    Err(_) => return,
                }
            }
        }
    });
    let mut cover_seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut cover_seed);
    let cover = tokio::spawn(cover::cover_loop(
        config.cover_rate,
        cover::CoverPeers::choose(config.cover_peers.clone(), config.cover_view.clone()),
        sizes,
        cover_tx,
        cover_seed,
    ));
    let reading = Reading {
        idle,
        request: config.request_timeout,
    };
    let accept = async {
        loop {
            let pending = match listener.accept().await {
                Ok(p) => p,
                Err(e) => {
                    tracing::error!("accept: {e}");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            };
            let ticket = door.arrive(pending.peer_addr().ip(), Instant::now());
            let shared = Arc::clone(&shared);
            let door_ = Arc::clone(&door);
            let task = tokio::spawn(async move {
                let peer = alias::peer(&pending.peer_addr());
                // The handshake is bounded by the link config and by the
                // idle timeout, whichever is shorter.
                let handshake = async {
                    if pending.readable().await.is_ok() {
                        door_.talking(ticket);
                    }
                    pending.handshake().await
                };
                match tokio::time::timeout(idle, handshake).await {
                    Ok(Ok(link)) => {
                        let key = *link.remote_key().as_bytes();
                        let named = match shared.lock() {
                            Ok(s) => s.core.session_keys(),
                            Err(_) => return tracing::error!("core state poisoned by a panic"),
                        };
                        match door_.authenticated(ticket, key, Instant::now(), &named) {
                            Ok(()) => read_loop(link, shared, &door_, ticket, reading).await,
                            Err(e) => tracing::warn!("link from {peer} refused: {}", e.0),
                        }
                    }
                    Ok(Err(e @ mixnn_net::NetError::Probed { .. })) => tracing::debug!("{e}"),
                    Ok(Err(e)) => tracing::warn!("link from {peer}: {e}"),
                    Err(_) => tracing::warn!(
                        "link from {peer}: no handshake within {} s",
                        idle.as_secs_f64()
                    ),
                }
                door_.gone(ticket);
            });
            door.serving(ticket, task.abort_handle());
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    cover.abort();
    cover_out.abort();
    ticker.abort();
    Ok(())
}

/// The core and what goes with it, shared by the reader tasks (which never
/// hold it across an await).
pub(crate) struct Shared {
    core: Core,
    memory: Arc<Memory>,
    egress: Arc<Egress>,
    door: Arc<Door>,
    learned_file: Option<PathBuf>,
    drop_after: Option<u64>,
    /// Cell counts of the real messages sent, per link (for cover).
    sizes: Arc<cover::LinkSizes>,
    /// Addresses already written to `learned_file`.
    known: usize,
    /// Session messages handled (for `drop_after`).
    handled: u64,
    /// Where accepted inits' replay tags are kept.
    replay: Option<replay_file::ReplayFile>,
}

impl Shared {
    /// What to do with the message whose first cell `msg` holds.
    pub(crate) fn admit(
        &mut self,
        from: &[u8; 32],
        msg: &CellReader,
        ticket: Ticket,
        now: Instant,
    ) -> Result<Admission, NodeError> {
        match self
            .core
            .admit(from, msg.kind(), msg.header(), msg.cells(), msg.body_len())?
        {
            Admitted::Cover => Ok(Admission::Skip),
            Admitted::Init => Ok(Admission::Keep(None)),
            Admitted::Session(id) => {
                let bytes = msg.body_len() as u64;
                self.make_room(bytes, now);
                let charge = self
                    .memory
                    .charge_read(Some(id), bytes, now, Some(ticket))
                    .map_err(|e| NodeError::Limit(e.to_string()))?;
                Ok(Admission::Keep(Some(charge)))
            }
        }
    }

    /// Sheds sessions until `bytes` fit the memory budget: the one whose
    /// message waits longest on a link that does not drain, else the one
    /// with the oldest queued or half-read data; none whose data is
    /// younger than [`memory::MIN_OFFENDING_AGE`].
    fn make_room(&mut self, bytes: u64, now: Instant) {
        while self.memory.available() < bytes {
            // A session whose messages wait on a link that does not drain
            // goes first (the peer does not read: an honest one does,
            // however slowly), then the one with the oldest data.
            let memory = Arc::clone(&self.memory);
            let stuck = self.egress.stuck(now, |s| memory.is_doomed(s));
            let Some(victim) = stuck.or_else(|| self.memory.oldest(now)) else {
                return;
            };
            let held = self.memory.held_by(&victim);
            for reader in self.memory.doom(&victim) {
                self.door.close(reader);
            }
            self.core.shed(&victim);
            let (messages, links) = self.egress.shed(&victim, now);
            tracing::warn!(
                session = %alias::id(&victim.0).tag(),
                "session shed: the node's memory budget of {} MiB was reached and it held the oldest queued data ({held} bytes; {messages} queued messages dropped, {links} stuck links closed)",
                self.memory.limit() >> 20
            );
        }
    }

    /// Queues `o` for its link, charged to its session; dropped (one log
    /// line) if the budget has no room for it even after shedding.
    fn queue(&mut self, o: Outbound, now: Instant) {
        let bytes = o.cells.len() as u64;
        self.make_room(bytes, now);
        match self.memory.charge(o.session, bytes, now) {
            Ok(charge) => {
                self.egress.send(
                    (o.addr, o.expect),
                    Queued {
                        cells: o.cells,
                        charge,
                    },
                );
            }
            Err(e) => {
                tracing::warn!("message to {} dropped: {e}", alias::peer(&o.addr));
            }
        }
    }

    /// Handles one message and queues what it produces; whether the core
    /// accepted it.
    pub(crate) fn handle(&mut self, from: [u8; 32], peer: SocketAddr, msg: Message) -> bool {
        let peer = alias::peer(&peer);
        let cover = msg.kind == CellKind::Cover;
        let session_cells = (msg.kind == CellKind::Session).then_some(msg.cells);
        let now = Now::system();
        // Room for what the message will make the core hold.
        if self.memory.available() < self.memory.limit() / 8 {
            self.make_room(self.memory.limit() / 8, now.mono);
        }
        // The core drops the session of a message that panics in the
        // stage code; this catches anything else, so that the mutex is
        // never poisoned and the next message is served.
        let handled =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.core.handle(from, msg, now)));
        let Ok(handled) = handled else {
            tracing::error!("message from {peer}: the node's core panicked; message dropped");
            return false;
        };
        // An accepted init's tag is on disk before anything it produced
        // leaves the node.
        self.persist_inits();
        let accepted = handled.is_ok();
        match handled {
            Ok(outs) => {
                if !cover {
                    self.handled += 1;
                }
                if let Some(cells) = session_cells {
                    self.sizes.record_heard(from, cells, now.mono);
                }
                if self.drop_after.is_none_or(|n| self.handled <= n) {
                    for o in outs {
                        let cells = o.cells.len() / CELL_SIZE;
                        if o.sizes_cover {
                            self.sizes.record((o.addr, o.expect), cells, now.mono);
                        } else {
                            self.sizes.record_overall(cells, now.mono);
                        }
                        self.queue(o, now.mono);
                    }
                }
            }
            Err(e) => tracing::warn!("message from {peer} refused: {e}"),
        }
        self.write_learned();
        accepted
    }

    fn persist_inits(&mut self) {
        let tags = self.core.take_accepted_inits();
        let Some(file) = self.replay.as_mut() else {
            return;
        };
        if let Err(e) = file.append(&tags) {
            tracing::error!(
                "cannot record {} init replay tags: {e}; after a restart their inits could be replayed",
                tags.len()
            );
        }
        // Tags past the window are forgotten by the core; drop them from
        // the file now and then.
        if file.records() > 4096 {
            let live = self.core.init_tags();
            if file.records() > 2 * live.len() + 1024 {
                if let Err(e) = file.rewrite(&live) {
                    tracing::warn!("cannot rewrite the init replay tags: {e}");
                }
            }
        }
    }

    fn write_learned(&mut self) {
        let Some(path) = &self.learned_file else {
            return;
        };
        if self.core.learned_addresses().len() == self.known {
            return;
        }
        self.known = self.core.learned_addresses().len();
        let text: String = self
            .core
            .learned_addresses()
            .iter()
            .map(|a| format!("{a}\n"))
            .collect();
        let tmp = path.with_extension("tmp");
        if let Err(e) = std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path)) {
            tracing::warn!("cannot write {}: {e}", path.display());
        }
    }
}
