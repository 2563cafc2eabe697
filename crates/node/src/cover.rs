//! Link cover traffic (paper §2.2): a node sends messages of random content
//! to random peers at Poisson times; receivers drop them on arrival.
//!
//! A cover message must look like a data message to a link observer: it is
//! [`CellKind::Cover`](mixnn_wire::CellKind::Cover) (inside the link
//! encryption), of the cell count that *this link's* real messages have
//! most often, recently ([`LinkSizes`]): a link is one (address, link key)
//! pair, and what the node sends on other links (another designer's
//! sessions, with messages of another size) never changes the size of
//! cover on this one; nor do messages of sessions whose peer on this link
//! has never sent a message of them (a client naming the link's peer).
//! A link that has carried no real message yet gets the cell count the node
//! sends most often over all links. A node sends no cover before it has
//! sent one real message, so that no cover message is of a size no cascade
//! uses.
//!
//! Why the most common count (the mode) and not a draw from the link's
//! distribution: with `uniform` padding (the default) every message of a
//! session has one cell count, so a link carrying one cascade has one
//! count and the two agree; with several sessions of different sizes on
//! one link, the mode puts cover in the size of most of the link's
//! messages, and a draw would make cover of a rare size at times when that
//! size's session is idle (which would stand out). Paced links choose
//! their cover the same way ([`mixnn_net::pacing`]).
//!
//! The peers are given by hand ([`CoverPeers::Fixed`]) or are the other
//! nodes of the directory's signed view ([`CoverPeers::Live`], kept up to
//! date by [`crate::announce`] with [`peers_from_view`]); the cover loop
//! reads the latest list before each message, so a changed list takes
//! effect without a restart.

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixnn_directory::VerifiedView;
pub use mixnn_net::pacing::{cover_message, poisson_gap, CellCounts, Rate};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::sync::{mpsc, watch};

use crate::core::Outbound;

/// A peer cover traffic may go to: its address and link key.
pub type CoverPeer = (SocketAddr, [u8; 32]);

/// Where a node's cover messages go.
#[derive(Debug, Clone)]
pub enum CoverPeers {
    /// A list that never changes (`--cover-peer`, given by hand).
    Fixed(Vec<CoverPeer>),
    /// The latest list sent on the channel (the other nodes of the
    /// directory's view, refreshed while the node runs).
    Live(watch::Receiver<Vec<CoverPeer>>),
}

impl CoverPeers {
    /// The peers a node uses: the hand-given ones if there are any (they
    /// win), else the live list if there is one, else none.
    pub fn choose(hand: Vec<CoverPeer>, live: Option<watch::Receiver<Vec<CoverPeer>>>) -> Self {
        match live {
            Some(live) if hand.is_empty() => CoverPeers::Live(live),
            _ => CoverPeers::Fixed(hand),
        }
    }

    /// The peers as they are now.
    pub fn current(&self) -> Vec<CoverPeer> {
        match self {
            CoverPeers::Fixed(peers) => peers.clone(),
            CoverPeers::Live(live) => live.borrow().clone(),
        }
    }

    /// One peer drawn uniformly from the current list; `None` while it is
    /// empty.
    pub fn pick(&self, rng: &mut impl RngCore) -> Option<CoverPeer> {
        let draw = |peers: &[CoverPeer], rng: &mut dyn RngCore| {
            if peers.is_empty() {
                return None;
            }
            Some(peers[(rng.next_u64() % peers.len() as u64) as usize])
        };
        match self {
            CoverPeers::Fixed(peers) => draw(peers, rng),
            CoverPeers::Live(live) => draw(&live.borrow(), rng),
        }
    }

    /// Whether this list can never hold a peer (a fixed, empty one).
    fn never_any(&self) -> bool {
        matches!(self, CoverPeers::Fixed(p) if p.is_empty())
    }
}

/// The cover peers of a verified directory view: address and link key of
/// every node in it except the node itself (recognised by its identity key
/// `me` or its link key `my_link`), in the view's order.
pub fn peers_from_view(view: &VerifiedView, me: &[u8; 32], my_link: &[u8; 32]) -> Vec<CoverPeer> {
    view.nodes
        .iter()
        .map(|n| &n.descriptor)
        .filter(|d| &d.identity != me && &d.link != my_link)
        .map(|d| (d.addr, d.link))
        .collect()
}

/// Links whose sizes a node keeps at most; past it the link with the
/// fewest messages is forgotten (so anyone who sets up sessions with many
/// made-up neighbours costs the node bounded memory, and a cascade's busy
/// link is the last to go).
pub const MAX_LINKS_SIZED: usize = 4096;

/// A message's weight in the counts halves every this long, so what a link
/// carried long ago (an attacker's burst) stops deciding its cover size.
pub const SIZE_HALF_LIFE: Duration = Duration::from_secs(60);

/// The cell counts of the real messages a node has sent, per link (an
/// address and the link key it was sent to) and over all links. Only
/// messages of sessions the link's peer has itself sent a message of are
/// recorded for their link ([`crate::core::Outbound::sizes_cover`]): a
/// client that names a victim link's peer as its session's next hop,
/// which that peer never answers, cannot set the cover size of a link its
/// cascade uses. Every real message counts over all links, and what each
/// peer sends this node is kept too ([`LinkSizes::record_heard`]), for
/// links without real messages of their own.
#[derive(Debug, Default)]
pub struct LinkSizes {
    inner: Mutex<Sizes>,
}

#[derive(Debug, Default)]
struct Sizes {
    links: HashMap<CoverPeer, Counts>,
    /// What each peer (by link key) has sent this node in its sessions.
    heard: HashMap<[u8; 32], Counts>,
    all: Counts,
}

/// Records `cells` under `key` in `map`, making room (the entry that
/// weighs least goes) when it holds [`MAX_LINKS_SIZED`] keys.
fn record_in<K: std::hash::Hash + Eq + Copy>(
    map: &mut HashMap<K, Counts>,
    key: K,
    cells: usize,
    now: Instant,
) {
    if !map.contains_key(&key) && map.len() >= MAX_LINKS_SIZED {
        let fewest = map
            .iter()
            .min_by(|a, b| a.1.weight(now).total_cmp(&b.1.weight(now)))
            .map(|(l, _)| *l);
        if let Some(l) = fewest {
            map.remove(&l);
        }
    }
    map.entry(key).or_default().record(cells, now);
}

/// Messages per cell count, and how many in all, each weighing
/// `0.5^(age / SIZE_HALF_LIFE)`.
#[derive(Debug, Default)]
struct Counts {
    by_cells: BTreeMap<usize, f64>,
    total: f64,
    at: Option<Instant>,
}

impl Counts {
    /// Brings the weights to `now`.
    fn decay(&mut self, now: Instant) {
        if let Some(at) = self.at {
            let age = now.saturating_duration_since(at);
            if !age.is_zero() {
                let f = 0.5f64.powf(age.as_secs_f64() / SIZE_HALF_LIFE.as_secs_f64());
                for w in self.by_cells.values_mut() {
                    *w *= f;
                }
                self.by_cells.retain(|_, w| *w > 1e-9);
                self.total *= f;
            }
        }
        self.at = Some(self.at.map_or(now, |at| at.max(now)));
    }

    fn record(&mut self, cells: usize, now: Instant) {
        self.decay(now);
        *self.by_cells.entry(cells).or_insert(0.0) += 1.0;
        self.total += 1.0;
    }

    /// The total weight as of `now`, without changing anything.
    fn weight(&self, now: Instant) -> f64 {
        let age = self
            .at
            .map_or(Duration::ZERO, |at| now.saturating_duration_since(at));
        self.total * 0.5f64.powf(age.as_secs_f64() / SIZE_HALF_LIFE.as_secs_f64())
    }

    /// The most common count; ties go to the larger count of cells. 0
    /// before any message.
    fn mode(&self) -> usize {
        self.by_cells
            .iter()
            .max_by(|a, b| a.1.total_cmp(b.1).then(a.0.cmp(b.0)))
            .map_or(0, |(c, _)| *c)
    }
}

impl LinkSizes {
    /// Records one real message of `cells` cells sent on `link` at `now`.
    pub fn record(&self, link: CoverPeer, cells: usize, now: Instant) {
        let Ok(mut s) = self.inner.lock() else {
            return;
        };
        record_in(&mut s.links, link, cells, now);
        s.all.record(cells, now);
    }

    /// Records one session message of `cells` cells that the peer of link
    /// key `from` sent this node at `now` (the link is authenticated: no
    /// one else can speak for that peer). A link to it that has carried no
    /// real message of this node's yet sends cover of that size, the
    /// size its cascade uses (before, the node's first hops of a cascade
    /// that had only sent loops on sent no cover back at all).
    pub fn record_heard(&self, from: [u8; 32], cells: usize, now: Instant) {
        if let Ok(mut s) = self.inner.lock() {
            record_in(&mut s.heard, from, cells, now);
        }
    }

    /// Records one real message of `cells` cells sent on a link it does
    /// not size ([`crate::core::Outbound::sizes_cover`] false: its peer
    /// has sent nothing of the session yet, as the next hop of a cascade
    /// that has only sent loops): it counts only over all links.
    pub fn record_overall(&self, cells: usize, now: Instant) {
        if let Ok(mut s) = self.inner.lock() {
            s.all.record(cells, now);
        }
    }

    /// The cell count of a cover message on `link` at `now`: the most
    /// common count of that link's own recent real messages; for a link
    /// without any, of what its peer has sent this node in sessions; else
    /// the most common over all links; 0 before any real message.
    pub fn cover_cells(&self, link: &CoverPeer, now: Instant) -> usize {
        let Ok(mut s) = self.inner.lock() else {
            return 0;
        };
        if let Some(c) = s.links.get_mut(link) {
            c.decay(now);
            if c.total > 1e-9 {
                return c.mode();
            }
        }
        if let Some(c) = s.heard.get_mut(&link.1) {
            c.decay(now);
            if c.total > 1e-9 {
                return c.mode();
            }
        }
        s.all.decay(now);
        s.all.mode()
    }

    /// Links with sizes recorded.
    pub fn links(&self) -> usize {
        self.inner.lock().map_or(0, |s| s.links.len())
    }
}

/// Sends cover messages at `rate` (none if `None`) to peers drawn
/// uniformly from `peers` (read anew for every message; none while it is
/// empty), until `tx` closes; each of the cell count of its link
/// ([`LinkSizes::cover_cells`]). `seed` seeds the times, the peers and the
/// content.
pub(crate) async fn cover_loop(
    rate: Option<Rate>,
    peers: CoverPeers,
    sizes: Arc<LinkSizes>,
    tx: mpsc::UnboundedSender<Outbound>,
    seed: [u8; 32],
) {
    let mut rng = ChaCha8Rng::from_seed(seed);
    if peers.never_any() {
        return;
    }
    while let Some(gap) = rate.and_then(|r| poisson_gap(r.per_second(), &mut rng)) {
        tokio::time::sleep(gap).await;
        let Some((addr, expect)) = peers.pick(&mut rng) else {
            continue;
        };
        let cells = sizes.cover_cells(&(addr, expect), Instant::now());
        if cells == 0 {
            continue;
        }
        let cells = match cover_message(cells, &mut rng) {
            Ok(c) => c,
            Err(e) => return tracing::error!("cover: {e}"),
        };
        if tx
            .send(Outbound {
                addr,
                expect,
                cells,
                session: None,
                sizes_cover: false,
            })
            .is_err()
        {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used, clippy::expect_used)]

    use super::*;

    use mixnn_directory::ed25519_dalek::SigningKey;
    use mixnn_directory::{sign_descriptor, Capabilities, Descriptor, ViewNode, PROTOCOL_VERSION};

    /// Node `i`: identity from seed `i`, link key `[i; 32]`, port 7000 + i.
    fn view_node(i: u8) -> ViewNode {
        let key = SigningKey::from_bytes(&[i; 32]);
        let descriptor = Descriptor {
            addr: ([127, 0, 0, 1], 7000 + u16::from(i)).into(),
            identity: key.verifying_key().to_bytes(),
            onion: [i; 32],
            link: [i; 32],
            version: PROTOCOL_VERSION,
            arith: mixnn_model::arith::ARITH_VERSION,
            capabilities: Capabilities {
                cores: 1,
                memory_mb: 1,
                price_per_hour: 0.0,
                location: String::new(),
            },
            published: 1_000,
            family: Vec::new(),
        };
        ViewNode {
            signed: sign_descriptor(&key, &descriptor).unwrap(),
            descriptor,
            uptime_fraction: 1.0,
            missed_heartbeats: 0,
            recent_failures: 0,
            report_penalty: 0.0,
            weight: 1.0,
        }
    }

    fn view(ids: &[u8]) -> VerifiedView {
        VerifiedView {
            directory: [0; 32],
            issued: 1_000,
            valid_until: 2_000,
            nodes: ids.iter().map(|&i| view_node(i)).collect(),
        }
    }

    fn peer(i: u8) -> CoverPeer {
        (([127, 0, 0, 1], 7000 + u16::from(i)).into(), [i; 32])
    }

    fn identity(i: u8) -> [u8; 32] {
        SigningKey::from_bytes(&[i; 32]).verifying_key().to_bytes()
    }

    #[test]
    fn view_peers_are_the_other_nodes() {
        let v = view(&[1, 2, 3]);
        assert_eq!(
            peers_from_view(&v, &identity(2), &[2; 32]),
            vec![peer(1), peer(3)]
        );
        // Not in the view: every node is a peer.
        assert_eq!(peers_from_view(&v, &identity(9), &[9; 32]).len(), 3);
        // Recognised by either key alone.
        assert_eq!(
            peers_from_view(&v, &identity(1), &[9; 32]),
            vec![peer(2), peer(3)]
        );
        assert_eq!(
            peers_from_view(&v, &identity(9), &[3; 32]),
            vec![peer(1), peer(2)]
        );
        // Alone in the view: no peers.
        assert!(peers_from_view(&view(&[4]), &identity(4), &[4; 32]).is_empty());
    }

    #[test]
    fn hand_given_peers_win_over_the_view() {
        let (tx, rx) = watch::channel(vec![peer(1), peer(2)]);
        let peers = CoverPeers::choose(vec![peer(7)], Some(rx.clone()));
        assert_eq!(peers.current(), vec![peer(7)]);
        tx.send_replace(vec![peer(3)]);
        assert_eq!(peers.current(), vec![peer(7)]);
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        assert_eq!(peers.pick(&mut rng), Some(peer(7)));
        // No hand-given peers: the live list, as it changes.
        let live = CoverPeers::choose(Vec::new(), Some(rx));
        assert_eq!(live.current(), vec![peer(3)]);
        // Neither: none, for good.
        let none = CoverPeers::choose(Vec::new(), None);
        assert!(none.never_any() && none.pick(&mut rng).is_none());
        assert!(!live.never_any());
    }

    #[test]
    fn a_refreshed_view_replaces_the_list() {
        let (tx, rx) = watch::channel(Vec::new());
        let peers = CoverPeers::choose(Vec::new(), Some(rx));
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        assert_eq!(peers.pick(&mut rng), None, "no peers yet");
        tx.send_replace(peers_from_view(&view(&[1, 2, 3]), &identity(1), &[1; 32]));
        let drawn: std::collections::BTreeSet<_> =
            (0..100).filter_map(|_| peers.pick(&mut rng)).collect();
        assert_eq!(drawn, [peer(2), peer(3)].into_iter().collect());
        // Node 2 left, node 4 came: only the new list is drawn from.
        tx.send_replace(peers_from_view(&view(&[1, 3, 4]), &identity(1), &[1; 32]));
        let drawn: std::collections::BTreeSet<_> =
            (0..100).filter_map(|_| peers.pick(&mut rng)).collect();
        assert_eq!(drawn, [peer(3), peer(4)].into_iter().collect());
    }

    #[tokio::test]
    async fn the_cover_loop_follows_a_changing_list() {
        let (peers_tx, peers_rx) = watch::channel(Vec::new());
        let sizes = Arc::new(LinkSizes::default());
        sizes.record(peer(9), 2, Instant::now());
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cover = tokio::spawn(cover_loop(
            Rate::new(1_000.0),
            CoverPeers::choose(Vec::new(), Some(peers_rx)),
            sizes,
            tx,
            [3; 32],
        ));
        // No peers yet: nothing is sent, and the loop keeps running.
        tokio::time::sleep(Duration::from_millis(50)).await;
        assert!(rx.try_recv().is_err());
        assert!(!cover.is_finished());
        peers_tx.send_replace(vec![peer(1)]);
        let first = rx.recv().await.unwrap();
        assert_eq!((first.addr, first.expect), peer(1));
        assert_eq!(first.cells.len(), 2 * mixnn_wire::CELL_SIZE);
        peers_tx.send_replace(vec![peer(2)]);
        // Drain what was queued before the change, then only peer 2.
        tokio::time::sleep(Duration::from_millis(20)).await;
        while rx.try_recv().is_ok() {}
        for _ in 0..5 {
            let o = rx.recv().await.unwrap();
            assert_eq!((o.addr, o.expect), peer(2));
        }
        cover.abort();
    }

    /// Cell counts of the first `n` cover messages the loop sends, per
    /// peer.
    async fn cover_cells(
        sizes: Arc<LinkSizes>,
        peers: Vec<CoverPeer>,
        n: usize,
    ) -> std::collections::BTreeMap<CoverPeer, Vec<usize>> {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let cover = tokio::spawn(cover_loop(
            Rate::new(2_000.0),
            CoverPeers::Fixed(peers),
            sizes,
            tx,
            [5; 32],
        ));
        let mut got = std::collections::BTreeMap::<CoverPeer, Vec<usize>>::new();
        for _ in 0..n {
            let o = rx.recv().await.unwrap();
            assert_eq!(o.cells.len() % mixnn_wire::CELL_SIZE, 0);
            got.entry((o.addr, o.expect))
                .or_default()
                .push(o.cells.len() / mixnn_wire::CELL_SIZE);
        }
        cover.abort();
        got
    }

    /// The attack of issue #17: a cascade sends 3-cell messages on the
    /// victim link; an attacker's session through the same node sends
    /// many more 1-cell messages on another link. With one count per node
    /// (before) every cover message on the victim link was 1 cell (40 of
    /// 40), so an observer of that link could drop cover by its size.
    /// Per link, the victim link's cover is 3 cells whatever the attacker
    /// sends elsewhere.
    #[tokio::test]
    async fn another_links_traffic_does_not_change_a_links_cover_size() {
        let (victim, attacker, idle) = (peer(1), peer(2), peer(3));
        let sizes = Arc::new(LinkSizes::default());
        let now = Instant::now();
        for _ in 0..10 {
            sizes.record(victim, 3, now);
        }
        for _ in 0..50 {
            sizes.record(attacker, 1, now);
        }
        let got = cover_cells(Arc::clone(&sizes), vec![victim], 40).await;
        assert_eq!(got[&victim], vec![3; 40], "cover on the victim link");
        // The attacker's own link gets its own size; a link with no real
        // message the node's most common one.
        let got = cover_cells(Arc::clone(&sizes), vec![victim, attacker, idle], 90).await;
        assert!(got[&victim].iter().all(|c| *c == 3), "{got:?}");
        assert!(got[&attacker].iter().all(|c| *c == 1), "{got:?}");
        assert!(got[&idle].iter().all(|c| *c == 1), "{got:?}");
        // Even a flood of the attacker's messages later leaves it alone.
        for _ in 0..10_000 {
            sizes.record(attacker, 1, now);
        }
        assert_eq!(sizes.cover_cells(&victim, now), 3);
    }

    /// Counts decay: a link that carried a burst of one size long ago
    /// takes the size of what it carries now.
    #[test]
    fn old_traffic_stops_deciding_a_links_cover_size() {
        let s = LinkSizes::default();
        let t0 = Instant::now();
        for _ in 0..1000 {
            s.record(peer(1), 1, t0);
        }
        assert_eq!(s.cover_cells(&peer(1), t0), 1);
        // Twelve half-lives later the burst weighs 1000 / 4096 messages.
        let later = t0 + SIZE_HALF_LIFE * 12;
        for _ in 0..3 {
            s.record(peer(1), 3, later);
        }
        assert_eq!(s.cover_cells(&peer(1), later), 3);
    }

    #[test]
    fn link_sizes_take_each_links_mode_and_stay_bounded() {
        let s = LinkSizes::default();
        let t = Instant::now();
        assert_eq!(s.cover_cells(&peer(1), t), 0, "nothing sent yet: no cover");
        s.record(peer(1), 4, t);
        s.record(peer(1), 1, t);
        s.record(peer(1), 4, t);
        assert_eq!(s.cover_cells(&peer(1), t), 4);
        // Ties go to the larger count; an unknown link takes the node's.
        s.record(peer(2), 2, t);
        s.record(peer(2), 5, t);
        assert_eq!(s.cover_cells(&peer(2), t), 5);
        assert_eq!(s.cover_cells(&peer(3), t), 4);
        // The same address with another link key is another link.
        let other_key: CoverPeer = (peer(1).0, [9; 32]);
        s.record(other_key, 7, t);
        assert_eq!(s.cover_cells(&other_key, t), 7);
        assert_eq!(s.cover_cells(&peer(1), t), 4);
        // Many made-up links: bounded, and the busy link stays.
        for _ in 0..100 {
            s.record(peer(1), 4, t);
        }
        for i in 0..(MAX_LINKS_SIZED as u32 + 500) {
            let link: CoverPeer = (
                SocketAddr::from(([10, (i >> 16) as u8, (i >> 8) as u8, i as u8], 1)),
                [0xee; 32],
            );
            s.record(link, 1, t);
        }
        assert_eq!(s.links(), MAX_LINKS_SIZED);
        assert_eq!(s.cover_cells(&peer(1), t), 4);
    }
}
