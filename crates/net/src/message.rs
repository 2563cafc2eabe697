//! Whole MixNN messages over a link: read the first cell, learn from its
//! preamble how many cells follow, read those, reassemble.

use mixnn_wire::{CellReader, Message, CELL_SIZE};

use crate::error::NetError;
use crate::transport::LinkReader;

/// Reads one whole message. `cell` is a scratch buffer of [`CELL_SIZE`]
/// bytes reused across calls. The announced cell count is only checked for
/// consistency here; the receiver checks it against the session's padding
/// policy once it knows the session.
pub async fn recv_message(reader: &mut LinkReader, cell: &mut [u8]) -> Result<Message, NetError> {
    if cell.len() != CELL_SIZE {
        return Err(NetError::CellBufferLength {
            len: cell.len(),
            cell_size: CELL_SIZE,
        });
    }
    reader.recv_cell(cell).await?;
    let peer = reader.peer_addr();
    let wire = |source| NetError::Message { peer, source };
    let mut msg = CellReader::any_policy(cell).map_err(wire)?;
    while msg.remaining() > 0 {
        reader.recv_cell(cell).await?;
        msg.push(cell).map_err(wire)?;
    }
    msg.finish().map_err(wire)
}
