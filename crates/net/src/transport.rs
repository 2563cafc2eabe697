//! Sending and receiving cells on an established link.
//!
//! Every cell becomes one Noise transport message, framed as
//! `u16 len (big-endian) ‖ AEAD(cell)` with `len = cell_size + 16`, so every
//! frame on the wire has the same length. Each direction has its own nonce
//! counter starting at 0; nonces are implicit (TCP keeps order), so a
//! dropped, replayed or reordered frame fails to decrypt.
//!
//! Neither `send_cells` nor `recv_cell` is cancel-safe: dropping one of
//! their futures mid-frame marks that direction broken ([`NetError::Broken`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use snow::StatelessTransportState;
use tokio::io::{AsyncReadExt, AsyncWriteExt, BufReader};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

use crate::error::NetError;

/// Bytes the AEAD adds to each cell.
pub const TAG_LEN: usize = 16;

/// Bytes of the length prefix in front of each frame.
pub const LEN_PREFIX: usize = 2;

/// Largest cell a link can carry: a Noise message is at most 65535 bytes.
pub const MAX_CELL_SIZE: usize = 65535 - TAG_LEN;

/// `send_cells` writes at most this many bytes per socket write, bounding its
/// buffer for very long messages.
const MAX_BATCH_BYTES: usize = 256 * 1024;

/// Read buffer size: several frames per `read` syscall.
const READ_BUFFER_BYTES: usize = 128 * 1024;

/// Where one direction of a link stands.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum State {
    Ready,
    Closed,
    Broken,
}

/// Builds the two halves over an established stream.
pub(crate) fn split(
    stream: TcpStream,
    noise: StatelessTransportState,
    peer: SocketAddr,
    cell_size: usize,
) -> (LinkReader, LinkWriter) {
    let noise = Arc::new(noise);
    let (read, write) = stream.into_split();
    let frame_len = cell_size + TAG_LEN;
    let reader = LinkReader {
        stream: BufReader::with_capacity(READ_BUFFER_BYTES.max(LEN_PREFIX + frame_len), read),
        noise: Arc::clone(&noise),
        nonce: 0,
        frame: vec![0; frame_len],
        cell_size,
        peer,
        state: State::Ready,
        idle: None,
    };
    let writer = LinkWriter {
        stream: write,
        noise,
        nonce: 0,
        buf: Vec::new(),
        cell_size,
        peer,
        state: State::Ready,
    };
    (reader, writer)
}

/// The receiving half of a link.
pub struct LinkReader {
    stream: BufReader<OwnedReadHalf>,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
    frame: Vec<u8>,
    cell_size: usize,
    peer: SocketAddr,
    state: State,
    idle: Option<Duration>,
}

impl LinkReader {
    /// Bounds how long [`Self::recv_cell`] waits for a whole cell: past
    /// `idle` it fails with [`NetError::Idle`] and the reader is unusable
    /// (the caller drops the link). `None` (the default) waits for ever.
    /// A listener sets this so that idle, half-open or stalled links do not
    /// hold its link slots for good.
    pub fn set_idle_timeout(&mut self, idle: Option<Duration>) {
        self.idle = idle;
    }

    /// Reads exactly one cell into `out` (`out.len()` must be the cell size).
    ///
    /// A clean EOF between frames gives [`NetError::Closed`]; a frame of the
    /// wrong length gives [`NetError::FrameLength`]; a frame failing
    /// authentication gives [`NetError::Decrypt`]. After any error the reader
    /// is unusable; `out` may then hold garbage.
    pub async fn recv_cell(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        let Some(after) = self.idle else {
            return self.recv_cell_unbounded(out).await;
        };
        let peer = self.peer;
        match tokio::time::timeout(after, self.recv_cell_unbounded(out)).await {
            Ok(r) => r,
            Err(_) => {
                // Possibly mid-frame: unusable from here on.
                self.state = State::Broken;
                Err(NetError::Idle { peer, after })
            }
        }
    }

    async fn recv_cell_unbounded(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        if out.len() != self.cell_size {
            return Err(NetError::CellBufferLength {
                len: out.len(),
                cell_size: self.cell_size,
            });
        }
        match self.state {
            State::Ready => {}
            State::Closed => return Err(NetError::Closed { peer: self.peer }),
            State::Broken => return Err(NetError::Broken { peer: self.peer }),
        }
        // Broken until the frame has been fully read and authenticated.
        self.state = State::Broken;
        let peer = self.peer;
        let io_err = |source| NetError::LinkIo { peer, source };

        let mut prefix = [0u8; LEN_PREFIX];
        if self.stream.read(&mut prefix[..1]).await.map_err(io_err)? == 0 {
            self.state = State::Closed;
            return Err(NetError::Closed { peer });
        }
        self.stream
            .read_exact(&mut prefix[1..])
            .await
            .map_err(io_err)?;
        let len = usize::from(u16::from_be_bytes(prefix));
        if len != self.frame.len() {
            return Err(NetError::FrameLength {
                peer,
                expected: self.frame.len(),
                actual: len,
            });
        }
        self.stream
            .read_exact(&mut self.frame)
            .await
            .map_err(io_err)?;
        let nonce = self.nonce;
        match self.noise.read_message(nonce, &self.frame, out) {
            Ok(n) if n == self.cell_size => {}
            _ => return Err(NetError::Decrypt { peer, nonce }),
        }
        // Cannot overflow: snow refuses nonce u64::MAX, caught above.
        self.nonce += 1;
        self.state = State::Ready;
        Ok(())
    }

    /// Reads `out.len() / cell_size` cells into `out` (a non-zero multiple
    /// of the cell size).
    pub async fn recv_cells(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        if out.is_empty() || !out.len().is_multiple_of(self.cell_size) {
            return Err(NetError::CellBufferLength {
                len: out.len(),
                cell_size: self.cell_size,
            });
        }
        for cell in out.chunks_exact_mut(self.cell_size) {
            self.recv_cell(cell).await?;
        }
        Ok(())
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The link's cell size in bytes.
    pub fn cell_size(&self) -> usize {
        self.cell_size
    }
}

impl std::fmt::Debug for LinkReader {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkReader")
            .field("peer", &self.peer)
            .field("cell_size", &self.cell_size)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}

/// The sending half of a link.
pub struct LinkWriter {
    stream: OwnedWriteHalf,
    noise: Arc<StatelessTransportState>,
    nonce: u64,
    buf: Vec<u8>,
    cell_size: usize,
    peer: SocketAddr,
    state: State,
}

impl LinkWriter {
    /// Encrypts and sends `cells` (a non-zero multiple of the cell size),
    /// one Noise message per cell, with as few socket writes as possible.
    /// The bytes have been handed to the kernel when this returns.
    pub async fn send_cells(&mut self, cells: &[u8]) -> Result<(), NetError> {
        let cell_size = self.cell_size;
        if cells.is_empty() || !cells.len().is_multiple_of(cell_size) {
            return Err(NetError::CellBufferLength {
                len: cells.len(),
                cell_size,
            });
        }
        if self.state != State::Ready {
            return Err(NetError::Broken { peer: self.peer });
        }
        // Broken until every frame is out, so an error or a cancelled future
        // (stream mid-frame, nonces consumed) poisons the writer.
        self.state = State::Broken;
        let frame_len = LEN_PREFIX + cell_size + TAG_LEN;
        let cells_per_batch = (MAX_BATCH_BYTES / frame_len).max(1);
        // cell_size <= MAX_CELL_SIZE, so the frame length fits in u16.
        let prefix = ((cell_size + TAG_LEN) as u16).to_be_bytes();
        for batch in cells.chunks(cells_per_batch * cell_size) {
            let batch_bytes = batch.len() / cell_size * frame_len;
            if self.buf.len() < batch_bytes {
                self.buf.resize(batch_bytes, 0);
            }
            let out = &mut self.buf[..batch_bytes];
            for (cell, frame) in batch
                .chunks_exact(cell_size)
                .zip(out.chunks_exact_mut(frame_len))
            {
                frame[..LEN_PREFIX].copy_from_slice(&prefix);
                match self
                    .noise
                    .write_message(self.nonce, cell, &mut frame[LEN_PREFIX..])
                {
                    Ok(n) if n == cell_size + TAG_LEN => {}
                    // Only nonce exhaustion (2^64 - 1 messages) gets here.
                    _ => return Err(NetError::Broken { peer: self.peer }),
                }
                self.nonce += 1;
            }
            self.stream
                .write_all(out)
                .await
                .map_err(|source| NetError::LinkIo {
                    peer: self.peer,
                    source,
                })?;
        }
        self.state = State::Ready;
        Ok(())
    }

    /// Flushes the socket. `send_cells` already hands every byte to the
    /// kernel (and `TCP_NODELAY` is set), so this is cheap.
    pub async fn flush(&mut self) -> Result<(), NetError> {
        self.stream
            .flush()
            .await
            .map_err(|source| NetError::LinkIo {
                peer: self.peer,
                source,
            })
    }

    /// Closes the sending direction; the peer's reader then sees
    /// [`NetError::Closed`] after the cells already sent.
    pub async fn shutdown(&mut self) -> Result<(), NetError> {
        self.state = State::Closed;
        self.stream
            .shutdown()
            .await
            .map_err(|source| NetError::LinkIo {
                peer: self.peer,
                source,
            })
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// The link's cell size in bytes.
    pub fn cell_size(&self) -> usize {
        self.cell_size
    }
}

impl std::fmt::Debug for LinkWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("LinkWriter")
            .field("peer", &self.peer)
            .field("cell_size", &self.cell_size)
            .field("state", &self.state)
            .finish_non_exhaustive()
    }
}
