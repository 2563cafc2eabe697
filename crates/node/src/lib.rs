//! MixNN node daemon: accepts Noise links, reads whole messages, peels one
//! onion layer, runs its stage and sends the result on.
//!
//! ```text
//!  links ──► reader tasks (decrypt, peel, compute) ──► egress task ──► writer tasks ──► links
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
//! anything on it; a message that makes the stage code panic fails alone
//! (the session it was for is dropped, the node goes on); idle sessions
//! expire (the I/O layer ticks the core's [`Core::expire`] every second);
//! links that stay silent for [`NodeConfig::link_idle`] are closed; and the
//! replay tags of accepted inits are kept in the state directory
//! ([`NodeConfig::replay_file`]), so an init recorded before a restart is
//! refused after it.

pub mod announce;
pub mod audit;
pub mod core;
pub mod cover;
mod error;
pub mod limits;
mod replay_file;
mod routes;
mod session;
pub use mixnn_net::pacing;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::panic::AssertUnwindSafe;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use mixnn_net::{
    alias, recv_message, Link, LinkConfig, LinkKeypair, LinkListener, NodeKeys, PublicLinkKey,
};
use mixnn_wire::{Message, OnionSecret, CELL_SIZE};
use rand_core::RngCore;
use tokio::sync::{mpsc, Semaphore};

pub use crate::core::{Core, Limits, Now, Outbound};
pub use crate::error::NodeError;
#[cfg(feature = "adversary")]
pub use audit::{Adversary, AdversaryMode};

/// How a node runs.
#[derive(Debug, Clone)]
pub struct NodeConfig {
    /// Memory bounds of the core.
    pub limits: Limits,
    /// Most links (inbound) served at once.
    pub max_links: usize,
    /// An inbound link on which no cell arrives for this long (or whose
    /// handshake takes longer) is closed, so idle and half-open links do
    /// not hold the link slots for good. Links this node opens close
    /// themselves after half of it without anything to send (and reopen
    /// for the next message), so neighbours with the same setting never
    /// lose a message to a link the other end is closing.
    pub link_idle: Duration,
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
    pub adversary: Option<audit::Adversary>,
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
            max_links: 256,
            link_idle: Duration::from_secs(300),
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
    #[cfg(feature = "adversary")]
    core.set_adversary(config.adversary);
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
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outbound>();
    let sizes = Arc::new(cover::LinkSizes::default());
    let shared = Arc::new(Mutex::new(Shared {
        core,
        learned_file: config.learned_file.clone(),
        drop_after: config.drop_after,
        sizes: Arc::clone(&sizes),
        known: 0,
        handled: 0,
        tx: out_tx.clone(),
        replay,
    }));
    // Idle sessions expire even when no message arrives.
    let ticker = tokio::spawn({
        let shared = Arc::clone(&shared);
        async move {
            let mut tick = tokio::time::interval(Duration::from_secs(1));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                tick.tick().await;
                match shared.lock() {
                    Ok(mut s) => {
                        s.core.expire(Now::system());
                    }
                    Err(_) => return tracing::error!("core state poisoned by a panic"),
                }
            }
        }
    });
    let pace = config
        .link_rate
        .and_then(|r| pacing::LinkPace::new(r.per_second(), config.link_jitter))
        .map(|p| pacing::LinkPace {
            bound: config.link_queue_bound,
            ..p
        });
    let idle = config.link_idle;
    let egress = tokio::spawn(egress_loop(out_rx, keys.link().clone(), pace, idle));
    let mut cover_seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut cover_seed);
    let cover = tokio::spawn(cover::cover_loop(
        config.cover_rate,
        cover::CoverPeers::choose(config.cover_peers.clone(), config.cover_view.clone()),
        sizes,
        out_tx,
        cover_seed,
    ));
    let slots = Arc::new(Semaphore::new(config.max_links));
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
            let Ok(permit) = Arc::clone(&slots).try_acquire_owned() else {
                tracing::error!(
                    "link limit of {} reached: refusing {}",
                    config.max_links,
                    alias::peer(&pending.peer_addr())
                );
                continue;
            };
            let shared = Arc::clone(&shared);
            tokio::spawn(async move {
                let _permit = permit;
                let peer = alias::peer(&pending.peer_addr());
                // The handshake is bounded by the link config and by the
                // idle timeout, whichever is shorter.
                match tokio::time::timeout(idle, pending.handshake()).await {
                    Ok(Ok(link)) => read_loop(link, shared, idle).await,
                    Ok(Err(e @ mixnn_net::NetError::Probed { .. })) => tracing::debug!("{e}"),
                    Ok(Err(e)) => tracing::warn!("link from {peer}: {e}"),
                    Err(_) => tracing::warn!(
                        "link from {peer}: no handshake within {} s",
                        idle.as_secs_f64()
                    ),
                }
            });
        }
    };
    tokio::select! {
        () = accept => {}
        () = shutdown => tracing::info!("shutting down"),
    }
    egress.abort();
    cover.abort();
    ticker.abort();
    Ok(())
}

async fn read_loop(link: Link, shared: Arc<Mutex<Shared>>, idle: Duration) {
    let from = *link.remote_key().as_bytes();
    let peer = link.peer_addr();
    let who = alias::peer(&peer);
    let (mut reader, _writer) = link.into_split();
    reader.set_idle_timeout(Some(idle));
    let mut cell = vec![0u8; CELL_SIZE];
    loop {
        match recv_message(&mut reader, &mut cell).await {
            Ok(msg) => {
                let sent = match shared.lock() {
                    Ok(mut s) => s.handle(from, peer, msg),
                    Err(_) => return tracing::error!("core state poisoned by a panic"),
                };
                // Let the writers send what the core produced before this
                // task reads (and decrypts) the next message.
                if sent {
                    tokio::task::yield_now().await;
                }
            }
            Err(mixnn_net::NetError::Closed { .. }) => return,
            Err(mixnn_net::NetError::Idle { .. }) => {
                return tracing::debug!("closing the link from {who}: idle");
            }
            Err(e) => {
                tracing::warn!("dropping link from {who}: {e}");
                return;
            }
        }
    }
}

/// The core and what goes with it, shared by the reader tasks (which never
/// hold it across an await).
struct Shared {
    core: Core,
    learned_file: Option<PathBuf>,
    drop_after: Option<u64>,
    /// Cell counts of the real messages sent, per link (for cover).
    sizes: Arc<cover::LinkSizes>,
    /// Addresses already written to `learned_file`.
    known: usize,
    /// Session messages handled (for `drop_after`).
    handled: u64,
    tx: mpsc::UnboundedSender<Outbound>,
    /// Where accepted inits' replay tags are kept.
    replay: Option<replay_file::ReplayFile>,
}

impl Shared {
    /// Handles one message and queues what it produces; true when
    /// something was queued.
    fn handle(&mut self, from: [u8; 32], peer: SocketAddr, msg: Message) -> bool {
        let peer = alias::peer(&peer);
        let cover = msg.kind == mixnn_wire::CellKind::Cover;
        let mut sent = false;
        // The core drops the session of a message that panics in the
        // stage code; this catches anything else, so that the mutex is
        // never poisoned and the next message is served.
        let now = Now::system();
        let handled =
            std::panic::catch_unwind(AssertUnwindSafe(|| self.core.handle(from, msg, now)));
        let Ok(handled) = handled else {
            tracing::error!("message from {peer}: the node's core panicked; message dropped");
            return false;
        };
        // An accepted init's tag is on disk before anything it produced
        // leaves the node.
        self.persist_inits();
        match handled {
            Ok(outs) => {
                if !cover {
                    self.handled += 1;
                }
                if self.drop_after.is_none_or(|n| self.handled <= n) {
                    for o in outs {
                        self.sizes
                            .record((o.addr, o.expect), o.cells.len() / CELL_SIZE);
                        // The egress task lives as long as the node.
                        sent |= self.tx.send(o).is_ok();
                    }
                }
            }
            Err(e) => tracing::warn!("message from {peer} refused: {e}"),
        }
        self.write_learned();
        sent
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

async fn egress_loop(
    mut rx: mpsc::UnboundedReceiver<Outbound>,
    key: LinkKeypair,
    pace: Option<pacing::LinkPace>,
    idle: Duration,
) {
    let key = Arc::new(key);
    let mut links: HashMap<(SocketAddr, [u8; 32]), mpsc::UnboundedSender<Vec<u8>>> = HashMap::new();
    while let Some(o) = rx.recv().await {
        let slot = (o.addr, o.expect);
        let cells = match links.get(&slot) {
            Some(tx) => match tx.send(o.cells) {
                Ok(()) => continue,
                Err(mpsc::error::SendError(cells)) => cells,
            },
            None => o.cells,
        };
        let (tx, wrx) = mpsc::unbounded_channel();
        let _ = tx.send(cells);
        // Links that closed (idle, failed) leave no entry behind.
        links.retain(|_, tx| !tx.is_closed());
        links.insert(slot, tx);
        tokio::spawn(write_loop(
            o.addr,
            o.expect,
            Arc::clone(&key),
            wrx,
            pace,
            idle,
        ));
    }
}

async fn write_loop(
    addr: SocketAddr,
    expect: [u8; 32],
    key: Arc<LinkKeypair>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
    pace: Option<pacing::LinkPace>,
    idle: Duration,
) {
    let config = LinkConfig::mixnn();
    let to = alias::peer(&addr);
    let link =
        match Link::connect(addr, &key, Some(PublicLinkKey::from_bytes(expect)), config).await {
            Ok(l) => l,
            Err(e) => return tracing::warn!("cannot reach {to}: {e}"),
        };
    let (_reader, mut writer) = link.into_split();
    let Some(pace) = pace else {
        // With nothing to send for half the idle timeout, close the link
        // before the other end does: stop taking messages, send what came
        // meanwhile, go. The next message opens a new link.
        loop {
            let cells = match tokio::time::timeout(idle / 2, rx.recv()).await {
                Ok(Some(cells)) => cells,
                Ok(None) => return,
                Err(_) => {
                    rx.close();
                    while let Ok(cells) = rx.try_recv() {
                        if let Err(e) = writer.send_cells(&cells).await {
                            return tracing::warn!("link to {to} failed: {e}");
                        }
                    }
                    return tracing::debug!("closing the link to {to}: idle");
                }
            };
            if let Err(e) = writer.send_cells(&cells).await {
                return tracing::warn!("link to {to} failed: {e}");
            }
        }
    };
    // Constant rate: one whole message per tick, for as long as the link
    // and the node last.
    let mut seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut seed);
    let mut pacer = pacing::Pacer::new(addr, pace, rx, seed);
    while let Some(paced) = pacer.next().await {
        if let Err(e) = writer.send_cells(paced.cells()).await {
            let lost = pacer.queued() + usize::from(matches!(paced, pacing::Paced::Real(_)));
            return tracing::warn!(
                "link to {to} failed: {e}; {lost} queued messages to it are lost"
            );
        }
    }
}
