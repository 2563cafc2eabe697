//! Announcing a node to a directory authority: register its signed
//! descriptor, then heartbeat until told to stop.
//!
//! ```text
//!  register ──(refused / unreachable: warn, back off, retry)──► heartbeat every interval
//!      ▲                                                              │
//!      └──────────────── directory forgot the node (404) ─────────────┘
//! ```
//!
//! The directory client is blocking (`ureq`), so [`announce`] runs on its own
//! thread ([`spawn`]) and sleeps by waiting on its shutdown channel: dropping
//! the [`Announcer`] (or calling [`Announcer::stop`]) wakes it at once. A
//! directory that is down or refuses the node never stops the node: every
//! failure is logged as a warning and retried.
//!
//! With a [`CoverView`], the loop also fetches the directory's signed view
//! after each accepted registration or heartbeat, verifies it against the
//! pinned directory keys and publishes the other nodes in it as the node's
//! cover peers ([`crate::cover::peers_from_view`]). A view that cannot be
//! fetched or verified is logged and the previous peers are kept.

use std::net::SocketAddr;
use std::sync::mpsc::{self, RecvTimeoutError};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::Duration;

use mixnn_directory::ed25519_dalek::SigningKey;
use mixnn_directory::{
    sign_descriptor, sign_heartbeat, Capabilities, Clock, Descriptor, DirectoryError,
    PROTOCOL_VERSION,
};
use mixnn_directory_client::DirectoryClient;
use mixnn_net::NodeKeys;
use tokio::sync::watch;

use crate::cover::{peers_from_view, CoverPeer};
use crate::error::NodeError;

/// What a node tells the directory about itself, besides its keys and the
/// publication time.
#[derive(Debug, Clone, PartialEq)]
pub struct Announcement {
    /// The address designers reach the node at (its advertised address).
    pub addr: SocketAddr,
    /// X25519 onion public key.
    pub onion: [u8; 32],
    /// Noise static link public key.
    pub link: [u8; 32],
    /// What the node offers.
    pub capabilities: Capabilities,
    /// The identity keys of the operator's other nodes
    /// ([`Descriptor::family`]; each must list this one too).
    pub family: Vec<[u8; 32]>,
}

impl Announcement {
    /// The announcement of a node with `keys`, reachable at `addr`.
    pub fn new(keys: &NodeKeys, addr: SocketAddr, capabilities: Capabilities) -> Self {
        let public = keys.public();
        Self {
            addr,
            onion: *public.onion.as_bytes(),
            link: *public.link.as_bytes(),
            capabilities,
            family: Vec::new(),
        }
    }

    /// The descriptor to sign, published at `now`.
    pub fn descriptor(&self, identity: &SigningKey, now: u64) -> Descriptor {
        Descriptor {
            addr: self.addr,
            identity: identity.verifying_key().to_bytes(),
            onion: self.onion,
            link: self.link,
            version: PROTOCOL_VERSION,
            arith: mixnn_model::arith::ARITH_VERSION,
            capabilities: self.capabilities.clone(),
            published: now,
            family: self.family.clone(),
        }
    }
}

/// Timing of the announce loop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AnnounceConfig {
    /// Time between heartbeats (the directory expects 10 s by default).
    pub heartbeat: Duration,
    /// First wait after a failed registration; doubled after each failure.
    pub retry_min: Duration,
    /// Longest wait between registration attempts.
    pub retry_max: Duration,
}

impl Default for AnnounceConfig {
    fn default() -> Self {
        Self {
            heartbeat: Duration::from_secs(10),
            retry_min: Duration::from_millis(500),
            retry_max: Duration::from_secs(30),
        }
    }
}

/// What an announce loop did, returned when it stops.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct AnnounceStats {
    /// Registrations the directory accepted.
    pub registrations: u64,
    /// Heartbeats the directory accepted.
    pub heartbeats: u64,
    /// Requests that failed (unreachable directory or refusal).
    pub failures: u64,
    /// Views fetched, verified and turned into cover peers.
    pub views: u64,
    /// Views that could not be fetched or did not verify.
    pub view_failures: u64,
}

/// Cover peers from the directory: the announce loop fetches the signed
/// view after each accepted registration or heartbeat, verifies it with
/// `pinned`, and sends the other nodes in it on the channel that
/// [`crate::NodeConfig::cover_view`] reads.
#[derive(Debug)]
pub struct CoverView {
    /// Directory keys a view must be signed by (the node refuses any
    /// other view).
    pub pinned: Vec<[u8; 32]>,
    /// Where each verified view's peers go.
    pub peers: watch::Sender<Vec<CoverPeer>>,
}

impl CoverView {
    /// A cover view verified with `pinned`, and the receiving end for
    /// [`crate::NodeConfig::cover_view`] (empty until the first view).
    pub fn new(pinned: Vec<[u8; 32]>) -> (Self, watch::Receiver<Vec<CoverPeer>>) {
        let (peers, rx) = watch::channel(Vec::new());
        (Self { pinned, peers }, rx)
    }

    /// Fetches and verifies the view and publishes its nodes other than
    /// `node` (signed by `identity`) as cover peers; returns how many.
    fn refresh(
        &self,
        client: &DirectoryClient,
        clock: &dyn Clock,
        identity: &SigningKey,
        node: &Announcement,
    ) -> Result<usize, DirectoryError> {
        let view = client.view()?.verify(&self.pinned, clock.now())?;
        let peers = peers_from_view(&view, &identity.verifying_key().to_bytes(), &node.link);
        let n = peers.len();
        let old = self.peers.send_replace(peers);
        if old.len() != n {
            tracing::info!("cover peers from the directory's view: {n} nodes");
        }
        Ok(n)
    }
}

/// Registers the node with the directory behind `client` and heartbeats
/// every `config.heartbeat` until `shutdown` receives a message or its
/// sender is dropped. Never fails: every failure is logged as a warning and
/// retried (registration with exponential backoff between
/// `config.retry_min` and `config.retry_max`). If the directory answers a
/// heartbeat with *unknown node* (its database was replaced), the node
/// registers again. With `cover`, the view is fetched after each accepted
/// registration or heartbeat (see [`CoverView`]). Blocking; see [`spawn`].
pub fn announce(
    identity: &SigningKey,
    node: &Announcement,
    client: &DirectoryClient,
    clock: &dyn Clock,
    config: AnnounceConfig,
    cover: Option<&CoverView>,
    shutdown: &mpsc::Receiver<()>,
) -> AnnounceStats {
    let url = client.url();
    let mut stats = AnnounceStats::default();
    let mut backoff = config.retry_min;
    let mut registered = false;
    let mut last_heartbeat = 0;
    loop {
        let mut accepted = false;
        let wait = if registered {
            let timestamp = clock.now();
            if timestamp <= last_heartbeat {
                // Heartbeats carry whole seconds and must increase; a
                // sub-second interval skips a beat rather than run ahead.
                config.heartbeat
            } else {
                match heartbeat(client, identity, timestamp) {
                    Ok(()) => {
                        accepted = true;
                        stats.heartbeats += 1;
                        last_heartbeat = timestamp;
                        tracing::debug!(timestamp, "heartbeat accepted by {url}");
                    }
                    Err(DirectoryError::Refused { status: 404, .. }) => {
                        stats.failures += 1;
                        tracing::warn!(
                            "directory {url} no longer knows this node; registering again"
                        );
                        registered = false;
                        backoff = config.retry_min;
                        continue;
                    }
                    Err(e) => {
                        stats.failures += 1;
                        tracing::warn!("heartbeat to directory failed: {e}");
                    }
                }
                config.heartbeat
            }
        } else {
            let descriptor = node.descriptor(identity, clock.now());
            match sign_descriptor(identity, &descriptor).and_then(|d| client.register(&d)) {
                Ok(status) => {
                    accepted = true;
                    stats.registrations += 1;
                    registered = true;
                    tracing::info!(addr = %node.addr, ?status, "registered with directory {url}");
                    config.heartbeat
                }
                Err(e) => {
                    stats.failures += 1;
                    tracing::warn!(
                        "registration with directory failed (retrying in {:.1} s): {e}",
                        backoff.as_secs_f64()
                    );
                    let wait = backoff;
                    backoff = (backoff * 2).min(config.retry_max);
                    wait
                }
            }
        };
        if let Some(cover) = cover.filter(|_| accepted) {
            match cover.refresh(client, clock, identity, node) {
                Ok(n) => {
                    stats.views += 1;
                    tracing::debug!("directory view verified: {n} cover peers");
                }
                Err(e) => {
                    stats.view_failures += 1;
                    tracing::warn!(
                        "cover peers: directory view refused, keeping the previous {} peers: {e}",
                        cover.peers.borrow().len()
                    );
                }
            }
        }
        match shutdown.recv_timeout(wait) {
            Err(RecvTimeoutError::Timeout) => {}
            Ok(()) | Err(RecvTimeoutError::Disconnected) => {
                tracing::debug!("announce loop stopped");
                return stats;
            }
        }
    }
}

fn heartbeat(
    client: &DirectoryClient,
    identity: &SigningKey,
    timestamp: u64,
) -> Result<(), DirectoryError> {
    client.heartbeat(&sign_heartbeat(identity, timestamp)?)
}

/// A running announce loop on its own thread; dropping it stops the loop
/// without waiting for it.
#[derive(Debug)]
pub struct Announcer {
    stop: mpsc::Sender<()>,
    done: mpsc::Receiver<AnnounceStats>,
    thread: JoinHandle<()>,
}

/// Starts [`announce`] on a thread named `mixnn-announce`. The identity key
/// is copied into the thread (and zeroized when it ends).
pub fn spawn(
    identity: &SigningKey,
    node: Announcement,
    client: DirectoryClient,
    clock: Arc<dyn Clock>,
    config: AnnounceConfig,
    cover: Option<CoverView>,
) -> Result<Announcer, NodeError> {
    let identity = identity.clone();
    let (stop, shutdown) = mpsc::channel();
    let (done_tx, done) = mpsc::channel();
    let thread = std::thread::Builder::new()
        .name("mixnn-announce".into())
        .spawn(move || {
            let stats = announce(
                &identity,
                &node,
                &client,
                &*clock,
                config,
                cover.as_ref(),
                &shutdown,
            );
            let _ = done_tx.send(stats);
        })
        .map_err(|e| NodeError::Refused(format!("cannot start the announce thread: {e}")))?;
    Ok(Announcer { stop, done, thread })
}

impl Announcer {
    /// Stops the loop and waits up to `grace` for it to finish (a request
    /// in flight may take up to the client's timeout). Returns its stats,
    /// or `None` if it did not finish in time (the thread is then left to
    /// end by itself).
    pub fn stop(self, grace: Duration) -> Option<AnnounceStats> {
        let _ = self.stop.send(());
        let stats = self.done.recv_timeout(grace).ok()?;
        let _ = self.thread.join();
        Some(stats)
    }
}

/// CPU cores available to this process (1 if unknown).
pub fn available_cores() -> u32 {
    std::thread::available_parallelism()
        .map(|n| u32::try_from(n.get()).unwrap_or(u32::MAX))
        .unwrap_or(1)
}

/// Total memory in MiB from `/proc/meminfo` (0 if unknown, e.g. not Linux).
pub fn total_memory_mb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|text| parse_meminfo_total_mb(&text))
        .unwrap_or(0)
}

/// `MemTotal` of a `/proc/meminfo` text, in MiB.
pub fn parse_meminfo_total_mb(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find_map(|l| l.strip_prefix("MemTotal:"))?;
    let mut fields = line.split_whitespace();
    let value: u64 = fields.next()?.parse().ok()?;
    match fields.next() {
        Some("kB") | None => Some(value / 1024),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use mixnn_directory::ManualClock;
    use rand_chacha::rand_core::SeedableRng;

    use super::*;

    fn keys(seed: u64) -> NodeKeys {
        NodeKeys::generate(&mut rand_chacha::ChaCha20Rng::seed_from_u64(seed))
    }

    fn capabilities() -> Capabilities {
        Capabilities {
            cores: 2,
            memory_mb: 1024,
            price_per_hour: 0.5,
            location: "test".into(),
        }
    }

    #[test]
    fn meminfo_total_is_read_in_mib() {
        let text = "MemTotal:       16318540 kB\nMemFree:         1000 kB\n";
        assert_eq!(parse_meminfo_total_mb(text), Some(15936));
        assert_eq!(parse_meminfo_total_mb("MemFree: 1 kB\n"), None);
        assert_eq!(parse_meminfo_total_mb("MemTotal: lots kB\n"), None);
        assert!(available_cores() >= 1);
    }

    #[test]
    fn announcement_carries_the_node_keys() {
        let k = keys(1);
        let addr: SocketAddr = "10.0.0.1:7000".parse().unwrap();
        let d = Announcement::new(&k, addr, capabilities()).descriptor(k.identity(), 42);
        let public = k.public();
        assert_eq!(d.addr, addr);
        assert_eq!(&d.identity, public.identity.as_bytes());
        assert_eq!(&d.onion, public.onion.as_bytes());
        assert_eq!(&d.link, public.link.as_bytes());
        assert_eq!(d.published, 42);
        d.check_fields().unwrap();
    }

    #[test]
    fn unreachable_directory_is_retried_until_stopped() {
        // Nothing listens on port 1.
        let client = DirectoryClient::new("http://127.0.0.1:1").unwrap();
        let k = keys(3);
        let node = Announcement::new(&k, "127.0.0.1:7101".parse().unwrap(), capabilities());
        let config = AnnounceConfig {
            heartbeat: Duration::from_secs(1),
            retry_min: Duration::from_millis(10),
            retry_max: Duration::from_millis(40),
        };
        let clock = Arc::new(ManualClock::new(1_000));
        let announcer = spawn(k.identity(), node, client, clock, config, None).unwrap();
        std::thread::sleep(Duration::from_millis(300));
        let stats = announcer.stop(Duration::from_secs(5)).unwrap();
        assert_eq!(stats.registrations, 0);
        assert!(stats.failures >= 3, "{stats:?}");
    }
}
