//! The designer's I/O: its runtime, its listener and accept loop, its two
//! links into the cascade (to the first hop and to the last), and waiting
//! for replies until a deadline. It knows nothing of steps, routes or
//! sessions: it moves cells and reply bodies, nothing else.
//!
//! Replies arrive on links that the hops open to the designer; the accept
//! loop takes only hops of the current cascade (by link key) and hands on
//! each message's [`ReplyId`] ([`mixnn_wire::Header::reply_id`]) and body.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixnn_net::pacing::LinkPace;
use mixnn_net::{recv_message, Link, LinkConfig, LinkKeypair, LinkListener, PublicLinkKey};
use mixnn_wire::{ReplyId, CELL_SIZE};
use rand_chacha::ChaCha8Rng;
use rand_core::{RngCore, SeedableRng};
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::cascade::HopInfo;
use crate::error::DesignerError;
use crate::plan::route::Entry;

mod out;

use out::OutLink;

/// How long opening a link to a hop may take.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);

/// The designer's sockets and runtime.
pub struct Driver {
    rt: Runtime,
    key: LinkKeypair,
    config: LinkConfig,
    /// Link keys of the hops allowed to deliver to the designer.
    allowed: Arc<Mutex<Vec<[u8; 32]>>>,
    me: SocketAddr,
    replies: mpsc::UnboundedReceiver<(ReplyId, Vec<u8>)>,
    links: Option<(OutLink, OutLink)>,
    pace: Option<LinkPace>,
    rng: ChaCha8Rng,
}

impl Driver {
    /// Starts the runtime and listens on `listen`; links are paced as
    /// `pace` says. `seed` seeds the link key and the pacing.
    pub fn start(
        listen: SocketAddr,
        pace: Option<LinkPace>,
        seed: [u8; 32],
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
        let key = LinkKeypair::generate(&mut rng);
        let config = LinkConfig::mixnn();
        let (reply_tx, replies) = mpsc::unbounded_channel();
        let (listener, me) = rt.block_on(async {
            let l = LinkListener::bind(listen, key.clone(), config)
                .await
                .map_err(DesignerError::Listen)?;
            let addr = l.local_addr().map_err(DesignerError::Listen)?;
            Ok::<_, DesignerError>((l, addr))
        })?;
        let allowed = Arc::new(Mutex::new(Vec::new()));
        rt.spawn(accept_loop(listener, reply_tx, allowed.clone()));
        Ok(Driver {
            rt,
            key,
            config,
            allowed,
            me,
            replies,
            links: None,
            pace,
            rng,
        })
    }

    /// The address the designer listens on.
    pub fn listen_addr(&self) -> SocketAddr {
        self.me
    }

    /// The designer's link key (the hops check it).
    pub fn link_key(&self) -> [u8; 32] {
        *self.key.public().as_bytes()
    }

    /// Opens links to the first and last of `hops` (replacing any links
    /// open) and lets all of them deliver to the designer.
    pub fn connect(&mut self, hops: &[HopInfo]) -> Result<(), DesignerError> {
        let keys: Vec<[u8; 32]> = hops
            .iter()
            .map(HopInfo::link_key)
            .collect::<Result<_, _>>()?;
        if let Ok(mut a) = self.allowed.lock() {
            for k in &keys {
                if !a.contains(k) {
                    a.push(*k);
                }
            }
        }
        let (Some(first), Some(last)) = (hops.first(), hops.last()) else {
            return Err(DesignerError::Config {
                message: "a cascade of no hops".into(),
            });
        };
        let (key, config) = (&self.key, self.config);
        let (a, z) = self.rt.block_on(async {
            let connect = |h: &HopInfo| {
                let addr = h.addr;
                let expect = h.link_key().map(PublicLinkKey::from_bytes);
                async move {
                    let link = tokio::time::timeout(CONNECT_TIMEOUT, async {
                        Link::connect(addr, key, Some(expect?), config)
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
            let a = connect(first).await?;
            let z = connect(last).await?;
            Ok::<_, DesignerError>((a, z))
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
            Ok(Some(r)) => Ok(Some(r)),
            Ok(None) => Err(DesignerError::LinksClosed),
            Err(_) => Ok(None),
        }
    }
}

async fn accept_loop(
    listener: LinkListener,
    tx: mpsc::UnboundedSender<(ReplyId, Vec<u8>)>,
    allowed: Arc<Mutex<Vec<[u8; 32]>>>,
) {
    loop {
        let pending = match listener.accept().await {
            Ok(p) => p,
            Err(e) => {
                tracing::error!("designer accept: {e}");
                return;
            }
        };
        let tx = tx.clone();
        let allowed = allowed.clone();
        tokio::spawn(async move {
            let peer = mixnn_net::alias::peer(&pending.peer_addr());
            let link = match pending.handshake().await {
                Ok(l) => l,
                Err(e) => return tracing::warn!("link from {peer}: {e}"),
            };
            let known = allowed
                .lock()
                .map(|a| a.contains(link.remote_key().as_bytes()))
                .unwrap_or(false);
            if !known {
                return tracing::warn!("link from {peer} refused: not a hop of this cascade");
            }
            let (mut reader, _w) = link.into_split();
            let mut cell = vec![0u8; CELL_SIZE];
            loop {
                match recv_message(&mut reader, &mut cell).await {
                    Ok(msg) => {
                        if tx.send((msg.onion.header.reply_id(), msg.body)).is_err() {
                            return;
                        }
                    }
                    Err(mixnn_net::NetError::Closed { .. }) => return,
                    Err(e) => return tracing::warn!("link from {peer}: {e}"),
                }
            }
        });
    }
}
