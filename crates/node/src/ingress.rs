//! Messages in: a link's reader task. The first cell of every message is
//! shown to the core before anything more is kept ([`crate::Core::admit`]);
//! the body of a session message is charged to its session on the memory
//! budget while it is read; a refused message (or cover) is read to its end
//! and dropped; every cell of a message must come within the request
//! timeout; a link's accepted messages keep its slot ([`crate::door`]).

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mixnn_net::{alias, Link, LinkReader};
use mixnn_wire::{CellReader, Message, CELL_SIZE};

use crate::door::{Door, Ticket};
use crate::Shared;

/// How long reading may take.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Reading {
    /// Between two cells.
    pub(crate) idle: Duration,
    /// From a message's first cell to its last.
    pub(crate) request: Duration,
}

/// Why a read loop ends.
enum Stop {
    /// The peer closed the link.
    Closed,
    /// Nothing arrived for the idle timeout.
    Idle,
    /// Why else, in one line.
    Other(String),
}

pub(crate) async fn read_loop(
    link: Link,
    shared: Arc<Mutex<Shared>>,
    door: &Door,
    ticket: Ticket,
    reading: Reading,
) {
    let from = *link.remote_key().as_bytes();
    let peer = link.peer_addr();
    let who = alias::peer(&peer);
    let (mut reader, _writer) = link.into_split();
    reader.set_idle_timeout(Some(reading.idle));
    let mut cell = vec![0u8; CELL_SIZE];
    loop {
        let first = reader.recv_cell(&mut cell).await;
        let stop = match first {
            Ok(()) => match read_rest(&mut reader, &cell, from, ticket, &shared, reading).await {
                Ok(Some(msg)) => {
                    let accepted = match shared.lock() {
                        Ok(mut s) => s.handle(from, peer, msg),
                        Err(_) => return tracing::error!("core state poisoned by a panic"),
                    };
                    if accepted {
                        door.active(ticket, Instant::now());
                    }
                    // Let the writers send what the core produced, and
                    // the other links have their turn, before this task
                    // reads (and decrypts) its next message: one link with
                    // many messages queued does not hold the node.
                    tokio::task::yield_now().await;
                    continue;
                }
                Ok(None) => {
                    tokio::task::yield_now().await;
                    continue;
                }
                Err(stop) => stop,
            },
            Err(mixnn_net::NetError::Closed { .. }) => Stop::Closed,
            Err(mixnn_net::NetError::Idle { .. }) => Stop::Idle,
            Err(e) => Stop::Other(e.to_string()),
        };
        match stop {
            Stop::Closed => return,
            Stop::Idle => return tracing::debug!("closing the link from {who}: idle"),
            Stop::Other(e) => return tracing::warn!("dropping link from {who}: {e}"),
        }
    }
}

/// Reads the rest of the message whose first cell is `first`: the core
/// looks at the first cell before anything more is kept ([`Core::admit`]),
/// and the body of a session message is charged to its session on the
/// memory budget while it is read. A refused message is read to its end
/// and dropped (`Ok(None)`, one log line); every cell must come within the
/// request timeout.
async fn read_rest(
    reader: &mut LinkReader,
    first: &[u8],
    from: [u8; 32],
    ticket: Ticket,
    shared: &Arc<Mutex<Shared>>,
    reading: Reading,
) -> Result<Option<Message>, Stop> {
    let who = alias::peer(&reader.peer_addr());
    let mut msg = CellReader::any_policy(first).map_err(|e| Stop::Other(e.to_string()))?;
    let cells = msg.cells();
    let admitted = {
        let mut s = shared
            .lock()
            .map_err(|_| Stop::Other("core state poisoned".into()))?;
        s.admit(&from, &msg, ticket, Instant::now())
    };
    let deadline = tokio::time::Instant::now() + reading.request;
    let mut scratch = vec![0u8; CELL_SIZE];
    let charge = match admitted {
        Ok(Admission::Keep(charge)) => charge,
        Ok(Admission::Skip) | Err(_) => {
            // Nothing of it is kept: not even the buffer the first cell
            // sized.
            drop(msg);
            match &admitted {
                Err(e) => tracing::warn!("message from {who} refused: {e}"),
                Ok(_) => tracing::debug!(
                    from = %alias::key(&from),
                    cells,
                    "cover message dropped"
                ),
            }
            for _ in 1..cells {
                recv_by(reader, &mut scratch, deadline, reading.request).await?;
            }
            return Ok(None);
        }
    };
    while msg.remaining() > 0 {
        recv_by(reader, &mut scratch, deadline, reading.request).await?;
        if charge.as_ref().is_some_and(|c| c.doomed()) {
            return Err(Stop::Other(
                "its session was shed while the message was read".into(),
            ));
        }
        msg.push(&scratch).map_err(|e| Stop::Other(e.to_string()))?;
    }
    let msg = msg.finish().map_err(|e| Stop::Other(e.to_string()))?;
    drop(charge);
    Ok(Some(msg))
}

/// The next cell, by `deadline` (the request timeout of the message).
async fn recv_by(
    reader: &mut LinkReader,
    cell: &mut [u8],
    deadline: tokio::time::Instant,
    request: Duration,
) -> Result<(), Stop> {
    match tokio::time::timeout_at(deadline, reader.recv_cell(cell)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(mixnn_net::NetError::Closed { .. })) => Err(Stop::Closed),
        Ok(Err(mixnn_net::NetError::Idle { .. })) => Err(Stop::Idle),
        Ok(Err(e)) => Err(Stop::Other(e.to_string())),
        Err(_) => Err(Stop::Other(format!(
            "a message not complete within {} s of its first cell",
            request.as_secs_f64()
        ))),
    }
}

/// What [`Shared::admit`] decided about a message from its first cell.
pub(crate) enum Admission {
    /// Read it, keeping its body, charged to its session (`None`: an init,
    /// whose body is empty).
    Keep(Option<crate::memory::Charge>),
    /// Read it to its end without keeping anything (cover).
    Skip,
}
