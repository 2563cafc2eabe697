//! The designer's two links into the cascade — to the first hop (forward
//! onions, the init loop, loops, fetches) and to the last hop (backward
//! onions) — sent on at once, or paced at a constant rate like the nodes'
//! links (`CascadeOptions::link_pacing`, [`mixnn_net::pacing`]).
//!
//! A paced link is a task on the designer's runtime that owns the link
//! writer and sends one whole message per tick: the oldest queued one,
//! else a cover message. The runtime then has a worker thread of its own
//! (see [`super::Driver::start`]), so ticks keep their time while the
//! designer's thread builds onions or runs kept stages.

use std::net::SocketAddr;

use mixnn_net::pacing::{LinkPace, Paced, Pacer};
use mixnn_net::LinkWriter;
use tokio::runtime::Runtime;
use tokio::sync::mpsc;

use crate::error::DesignerError;

/// One of the designer's outbound links.
pub(super) enum OutLink {
    /// Each message is written as soon as it is sent.
    Direct {
        /// The hop at the other end.
        addr: SocketAddr,
        /// The link.
        writer: LinkWriter,
    },
    /// Messages queue for the link's pacing task.
    Paced {
        /// The hop at the other end.
        addr: SocketAddr,
        /// The task's queue; closed when the link fails.
        tx: mpsc::UnboundedSender<Vec<u8>>,
    },
}

impl OutLink {
    /// The link to `addr` over `writer`, paced as `pace` says (`None`: not
    /// paced); a paced link's task starts on `rt` now.
    pub(super) fn new(
        rt: &Runtime,
        addr: SocketAddr,
        writer: LinkWriter,
        pace: Option<LinkPace>,
        seed: [u8; 32],
    ) -> OutLink {
        let Some(pace) = pace else {
            return OutLink::Direct { addr, writer };
        };
        let (tx, rx) = mpsc::unbounded_channel();
        // The pacer's timer needs the runtime.
        let pacer = {
            let _runtime = rt.enter();
            Pacer::new(addr, pace, rx, seed)
        };
        rt.spawn(paced(addr, writer, pacer));
        OutLink::Paced { addr, tx }
    }

    /// Sends one whole message (cells).
    pub(super) fn send(&mut self, rt: &Runtime, cells: &[u8]) -> Result<(), DesignerError> {
        match self {
            OutLink::Direct { addr, writer } => {
                let addr = *addr;
                rt.block_on(writer.send_cells(cells))
                    .map_err(|source| DesignerError::Link { addr, source })
            }
            OutLink::Paced { addr, tx } => tx
                .send(cells.to_vec())
                .map_err(|_| DesignerError::PacedLinkFailed { addr: *addr }),
        }
    }
}

/// Writes what `pacer` releases until the queue closes (the link was
/// replaced or the run ended) or the link fails.
async fn paced(addr: SocketAddr, mut writer: LinkWriter, mut pacer: Pacer) {
    while let Some(p) = pacer.next().await {
        if let Err(e) = writer.send_cells(p.cells()).await {
            let lost = pacer.queued() + usize::from(matches!(p, Paced::Real(_)));
            return tracing::warn!(
                "link to hop {} failed: {e}; {lost} queued messages lost",
                mixnn_net::alias::peer(&addr)
            );
        }
    }
}
