//! A second, minimal client of the node protocol for the abuse suite: it
//! makes its own Noise links (mixnn-net), builds its own onions
//! (mixnn-wire) and notes (mixnn-proto), and listens for what a node
//! delivers to it. It speaks to a node from outside, as an attacker who
//! has read the source and knows the node's public keys would.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::net::SocketAddr;
use std::str::FromStr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};

use mixnn_net::{
    recv_message, Link, LinkConfig, LinkKeypair, LinkListener, LinkReader, LinkWriter, NetError,
    PublicLinkKey, PublicOnionKey,
};
use mixnn_wire::{
    encode_cells, wrap_init, CellKind, DesignerSession, HopAddr, HopLayer, HopTag, Next,
    OnionPublic, Op, PaddingPolicy, ReplyId, RoutingBlock, CELL_SIZE,
};
use rand_chacha::rand_core::SeedableRng;
use rand_chacha::ChaCha20Rng;

use crate::common::Hop;

pub mod notes;

/// A node as the probe sees it: its address and public keys.
#[derive(Debug, Clone, Copy)]
pub struct Target {
    pub addr: SocketAddr,
    pub onion: OnionPublic,
    pub link: [u8; 32],
}

impl Target {
    pub fn of(hop: &Hop) -> Target {
        Target {
            addr: hop.addr,
            onion: OnionPublic(*PublicOnionKey::from_str(&hop.onion).unwrap().as_bytes()),
            link: *PublicLinkKey::from_str(&hop.link).unwrap().as_bytes(),
        }
    }
}

/// Something a node delivered to the probe's listener.
#[derive(Debug)]
pub struct Delivery {
    /// The link key the sender proved.
    pub from: [u8; 32],
    /// The reply id (the first 16 header bytes).
    pub rid: [u8; 16],
    pub body: Vec<u8>,
    pub cells: usize,
}

/// One outbound link from the probe to a node.
pub struct Conn {
    pub writer: LinkWriter,
    pub reader: LinkReader,
    /// The link key the probe proved on it.
    pub key: [u8; 32],
}

/// The probe: a runtime for its outbound links, a listener (on its own
/// thread) for deliveries, and a seeded RNG for its onions.
pub struct Probe {
    pub rt: tokio::runtime::Runtime,
    /// The key of the listener (the "designer" key of its sessions).
    pub key: LinkKeypair,
    /// Where the listener is.
    pub addr: SocketAddr,
    deliveries: mpsc::Receiver<Delivery>,
    /// Bytes of cells received by the listener, over all its links.
    pub received: Arc<AtomicU64>,
    pub rng: ChaCha20Rng,
}

pub fn link_config() -> LinkConfig {
    LinkConfig::new(CELL_SIZE).unwrap()
}

impl Probe {
    pub fn new(seed: u64) -> Probe {
        let mut rng = ChaCha20Rng::seed_from_u64(seed);
        let key = LinkKeypair::generate(&mut rng);
        let (tx, deliveries) = mpsc::channel();
        let (addr_tx, addr_rx) = mpsc::channel();
        let received = Arc::new(AtomicU64::new(0));
        let counted = Arc::clone(&received);
        let listen_key = key.clone();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l =
                    LinkListener::bind("127.0.0.1:0".parse().unwrap(), listen_key, link_config())
                        .await
                        .unwrap();
                addr_tx.send(l.local_addr().unwrap()).unwrap();
                while let Ok(pending) = l.accept().await {
                    let tx = tx.clone();
                    let counted = Arc::clone(&counted);
                    tokio::spawn(async move {
                        let Ok(link) = pending.handshake().await else {
                            return;
                        };
                        let from = *link.remote_key().as_bytes();
                        let (mut reader, _writer) = link.into_split();
                        let mut cell = vec![0u8; CELL_SIZE];
                        while let Ok(m) = recv_message(&mut reader, &mut cell).await {
                            counted.fetch_add((m.cells * CELL_SIZE) as u64, Ordering::Relaxed);
                            let mut rid = [0u8; 16];
                            rid.copy_from_slice(&m.onion.header.prefix()[..16]);
                            let d = Delivery {
                                from,
                                rid,
                                body: m.body,
                                cells: m.cells,
                            };
                            if tx.send(d).is_err() {
                                return;
                            }
                        }
                    });
                }
            });
        });
        let addr = addr_rx.recv_timeout(Duration::from_secs(10)).unwrap();
        Probe {
            rt: tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap(),
            key,
            addr,
            deliveries,
            received,
            rng,
        }
    }

    /// A listener that completes every handshake and then never reads:
    /// its address and link key (the "designer" of sessions whose
    /// answers should pile up at the node).
    pub fn sink(&mut self) -> (SocketAddr, [u8; 32]) {
        let key = LinkKeypair::generate(&mut self.rng);
        let public = *key.public().as_bytes();
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            rt.block_on(async move {
                let l = LinkListener::bind("127.0.0.1:0".parse().unwrap(), key, link_config())
                    .await
                    .unwrap();
                tx.send(l.local_addr().unwrap()).unwrap();
                let mut held = Vec::new();
                while let Ok(pending) = l.accept().await {
                    if let Ok(link) = pending.handshake().await {
                        held.push(link);
                    }
                }
            });
        });
        (rx.recv_timeout(Duration::from_secs(10)).unwrap(), public)
    }

    /// A fresh link key (for attacks from many keys).
    pub fn fresh_key(&mut self) -> LinkKeypair {
        LinkKeypair::generate(&mut self.rng)
    }

    /// Opens a link to `to` proving `key`.
    pub fn connect(&self, to: &Target, key: &LinkKeypair) -> Result<Conn, NetError> {
        let link = self.rt.block_on(Link::connect(
            to.addr,
            key,
            Some(PublicLinkKey::from_bytes(to.link)),
            link_config(),
        ))?;
        let (reader, writer) = link.into_split();
        Ok(Conn {
            writer,
            reader,
            key: *key.public().as_bytes(),
        })
    }

    pub fn send(&self, conn: &mut Conn, cells: &[u8]) -> Result<(), NetError> {
        self.rt.block_on(conn.writer.send_cells(cells))
    }

    /// Where the probe's sessions deliver.
    pub fn deliver(&mut self) -> (Next, ReplyId) {
        let rid = ReplyId::random(&mut self.rng);
        (
            Next::Deliver {
                addr: HopAddr(self.addr),
                reply_id: rid,
            },
            rid,
        )
    }

    /// An init onion for a one-hop session at `to` carrying `note`,
    /// delivered back to the probe; its cells under `policy` (an honest
    /// designer pads an init with `PaddingPolicy::for_init`).
    pub fn init(
        &mut self,
        to: &Target,
        note: &[u8],
        policy: &PaddingPolicy,
    ) -> (Vec<u8>, DesignerSession, ReplyId) {
        self.init_to(to, note, policy, self.addr)
    }

    /// The same, acknowledged to `designer` instead of the probe.
    pub fn init_to(
        &mut self,
        to: &Target,
        note: &[u8],
        policy: &PaddingPolicy,
        designer: SocketAddr,
    ) -> (Vec<u8>, DesignerSession, ReplyId) {
        let rid = ReplyId::random(&mut self.rng);
        let next = Next::Deliver {
            addr: HopAddr(designer),
            reply_id: rid,
        };
        let block = RoutingBlock {
            op: Op::Init,
            next,
            tag: HopTag::random(&mut self.rng),
        };
        let (onion, session) =
            wrap_init(&[to.onion], &[HopLayer { block, note }], &mut self.rng).unwrap();
        let cells = encode_cells(CellKind::Init, &onion, &[], policy).unwrap();
        (cells, session, rid)
    }

    /// An init for a two-hop session: `to` first, then a hop the probe
    /// makes up (with onion key `fake`, at `fake_addr`), which delivers.
    pub fn init_two(
        &mut self,
        to: &Target,
        note: &[u8],
        fake: OnionPublic,
        fake_addr: SocketAddr,
        policy: &PaddingPolicy,
    ) -> (Vec<u8>, DesignerSession, ReplyId) {
        let (next, rid) = self.deliver();
        let blocks = [
            RoutingBlock {
                op: Op::Init,
                next: Next::Hop(HopAddr(fake_addr)),
                tag: HopTag::random(&mut self.rng),
            },
            RoutingBlock {
                op: Op::Init,
                next,
                tag: HopTag::random(&mut self.rng),
            },
        ];
        let layers = [
            HopLayer {
                block: blocks[0],
                note,
            },
            HopLayer {
                block: blocks[1],
                note: b"",
            },
        ];
        let (onion, session) = wrap_init(&[to.onion, fake], &layers, &mut self.rng).unwrap();
        let cells = encode_cells(CellKind::Init, &onion, &[], policy).unwrap();
        (cells, session, rid)
    }

    /// A session message for hop 0 of `session` (and `more` hops after
    /// it): `op` with `note`, `next` its routing; cells under `policy`.
    pub fn session_msg(
        &mut self,
        session: &mut DesignerSession,
        layers: &[(Op, HopTag, Next, Vec<u8>)],
        body: &[u8],
        policy: &PaddingPolicy,
    ) -> Vec<u8> {
        let hops: Vec<HopLayer<'_>> = layers
            .iter()
            .map(|(op, tag, next, note)| HopLayer {
                block: RoutingBlock {
                    op: *op,
                    next: *next,
                    tag: *tag,
                },
                note,
            })
            .collect();
        let path: Vec<usize> = (0..hops.len()).collect();
        let onion = session.wrap(&path, &hops, &mut self.rng).unwrap();
        encode_cells(CellKind::Session, &onion, body, policy).unwrap()
    }

    /// The delivery with reply id `rid`, if one comes within `within`;
    /// other deliveries are dropped.
    pub fn wait(&self, rid: ReplyId, within: Duration) -> Option<Delivery> {
        let deadline = Instant::now() + within;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.deliveries.recv_timeout(left) {
                Ok(d) if d.rid == rid.0 => return Some(d),
                Ok(_) => {}
                Err(_) => return None,
            }
        }
    }

    /// Every delivery within `within` (waiting `quiet` after the last).
    pub fn drain(&self, within: Duration, quiet: Duration) -> Vec<Delivery> {
        let deadline = Instant::now() + within;
        let mut got = Vec::new();
        loop {
            let left = deadline
                .saturating_duration_since(Instant::now())
                .min(quiet);
            match self.deliveries.recv_timeout(left) {
                Ok(d) => got.push(d),
                Err(_) => return got,
            }
        }
    }
}
