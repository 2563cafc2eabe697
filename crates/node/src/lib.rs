//! MixNN node daemon: accepts Noise links, reads whole messages, peels one
//! onion layer, runs its stage and sends the result on.
//!
//! ```text
//!  links ──► reader tasks ──► core thread (peel, compute) ──► egress task ──► links
//! ```
//!
//! The [`core::Core`] state machine owns the onion key, the sessions and the
//! stages; it has no sockets and no clocks. Compute runs on its own OS
//! thread so that link I/O (Noise decryption, TCP) overlaps with it. The
//! library exposes [`run`]; the `mixnn node` binary only parses arguments,
//! loads keys and sets up logging.

pub mod announce;
pub mod audit;
pub mod core;
pub mod cover;
mod error;

use std::collections::HashMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use mixnn_net::{
    recv_message, Link, LinkConfig, LinkKeypair, LinkListener, NodeKeys, PublicLinkKey,
};
use mixnn_wire::{Message, OnionSecret, CELL_SIZE};
use rand_core::RngCore;
use tokio::sync::{mpsc, Semaphore};

pub use crate::core::{Core, Limits, Outbound};
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
    /// If set, the node writes every address it has learned (one per line)
    /// to this file after each change: an audit of what it knows.
    pub learned_file: Option<PathBuf>,
    /// Cover messages per second (Poisson), sent to random
    /// [`NodeConfig::cover_peers`]; 0 sends none.
    pub cover_rate: f64,
    /// Where cover messages may go: address and link key of other nodes.
    pub cover_peers: Vec<cover::CoverPeer>,
    /// Fault injection for tests: after this many session messages the
    /// node silently stops sending anything (a node that drops packets).
    /// `None` in production.
    pub drop_after: Option<u64>,
    /// Misbehaviour for tests of audits (feature `adversary` only).
    #[cfg(feature = "adversary")]
    pub adversary: Option<audit::Adversary>,
}

impl Default for NodeConfig {
    fn default() -> Self {
        NodeConfig {
            limits: Limits::default(),
            max_links: 256,
            learned_file: None,
            cover_rate: 0.0,
            cover_peers: Vec::new(),
            drop_after: None,
            #[cfg(feature = "adversary")]
            adversary: None,
        }
    }
}

/// The link configuration every MixNN endpoint uses.
pub fn link_config() -> Result<LinkConfig, NodeError> {
    Ok(LinkConfig::new(CELL_SIZE)?)
}

struct Inbound {
    from: [u8; 32],
    peer: SocketAddr,
    msg: Message,
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
    #[cfg_attr(not(feature = "adversary"), allow(unused_mut))]
    let mut core = Core::new(onion, seed, config.limits);
    #[cfg(feature = "adversary")]
    core.set_adversary(config.adversary);
    let (in_tx, in_rx) = mpsc::channel::<Inbound>(1024);
    let (out_tx, out_rx) = mpsc::unbounded_channel::<Outbound>();
    let sizes = Arc::new(cover::CellCounts::default());
    let settings = CoreSettings {
        learned_file: config.learned_file.clone(),
        drop_after: config.drop_after,
        sizes: Arc::clone(&sizes),
    };
    let core_tx = out_tx.clone();
    let core_thread = std::thread::Builder::new()
        .name("mixnn-core".into())
        .spawn(move || core_loop(core, in_rx, core_tx, settings))
        .map_err(|e| NodeError::Refused(format!("cannot start the core thread: {e}")))?;
    let egress = tokio::spawn(egress_loop(out_rx, keys.link().clone()));
    let mut cover_seed = [0u8; 32];
    rand_core::OsRng.fill_bytes(&mut cover_seed);
    let cover = tokio::spawn(cover::cover_loop(
        config.cover_rate,
        config.cover_peers.clone(),
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
                    pending.peer_addr()
                );
                continue;
            };
            let tx = in_tx.clone();
            tokio::spawn(async move {
                let _permit = permit;
                let peer = pending.peer_addr();
                match pending.handshake().await {
                    Ok(link) => read_loop(link, tx).await,
                    Err(e) => tracing::warn!("link from {peer}: {e}"),
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
    drop(in_tx);
    // The core thread ends when every reader has dropped its sender; do not
    // wait for readers blocked on idle links.
    drop(core_thread);
    Ok(())
}

async fn read_loop(link: Link, tx: mpsc::Sender<Inbound>) {
    let from = *link.remote_key().as_bytes();
    let peer = link.peer_addr();
    let (mut reader, _writer) = link.into_split();
    let mut cell = vec![0u8; CELL_SIZE];
    loop {
        match recv_message(&mut reader, &mut cell).await {
            Ok(msg) => {
                if tx.send(Inbound { from, peer, msg }).await.is_err() {
                    return;
                }
            }
            Err(mixnn_net::NetError::Closed { .. }) => return,
            Err(e) => {
                tracing::warn!("dropping link from {peer}: {e}");
                return;
            }
        }
    }
}

/// What the core thread needs besides the core.
struct CoreSettings {
    learned_file: Option<PathBuf>,
    drop_after: Option<u64>,
    sizes: Arc<cover::CellCounts>,
}

fn core_loop(
    mut core: Core,
    mut rx: mpsc::Receiver<Inbound>,
    tx: mpsc::UnboundedSender<Outbound>,
    settings: CoreSettings,
) {
    let mut known = 0;
    let mut handled = 0u64;
    while let Some(Inbound { from, peer, msg }) = rx.blocking_recv() {
        let cover = msg.kind == mixnn_wire::CellKind::Cover;
        match core.handle(from, msg) {
            Ok(outs) => {
                if !cover {
                    handled += 1;
                }
                if settings.drop_after.is_some_and(|n| handled > n) {
                    continue;
                }
                for o in outs {
                    settings.sizes.record(o.cells.len() / CELL_SIZE);
                    if tx.send(o).is_err() {
                        return;
                    }
                }
            }
            Err(e) => tracing::warn!("message from {peer} refused: {e}"),
        }
        if let Some(path) = &settings.learned_file {
            if core.learned_addresses().len() != known {
                known = core.learned_addresses().len();
                let text: String = core
                    .learned_addresses()
                    .iter()
                    .map(|a| format!("{a}\n"))
                    .collect();
                let tmp = path.with_extension("tmp");
                if let Err(e) =
                    std::fs::write(&tmp, text).and_then(|()| std::fs::rename(&tmp, path))
                {
                    tracing::warn!("cannot write {}: {e}", path.display());
                }
            }
        }
    }
}

async fn egress_loop(mut rx: mpsc::UnboundedReceiver<Outbound>, key: LinkKeypair) {
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
        links.insert(slot, tx);
        tokio::spawn(write_loop(o.addr, o.expect, Arc::clone(&key), wrx));
    }
}

async fn write_loop(
    addr: SocketAddr,
    expect: [u8; 32],
    key: Arc<LinkKeypair>,
    mut rx: mpsc::UnboundedReceiver<Vec<u8>>,
) {
    let config = match link_config() {
        Ok(c) => c,
        Err(e) => return tracing::error!("{e}"),
    };
    let link =
        match Link::connect(addr, &key, Some(PublicLinkKey::from_bytes(expect)), config).await {
            Ok(l) => l,
            Err(e) => return tracing::warn!("cannot reach {addr}: {e}"),
        };
    let (_reader, mut writer) = link.into_split();
    while let Some(cells) = rx.recv().await {
        if let Err(e) = writer.send_cells(&cells).await {
            return tracing::warn!("link to {addr} failed: {e}");
        }
    }
}
