//! Setting up links: TCP listen/connect and the Noise XX handshake.
//!
//! The initiator calls [`Link::connect`]. A listener's [`LinkListener::accept`]
//! returns a [`PendingLink`] at once, without any handshake, so a slow or
//! hostile client cannot stall the accept loop; the caller spawns
//! [`PendingLink::handshake`] per connection and logs its error, if any.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use snow::{Builder, HandshakeState};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};

use crate::error::NetError;
use crate::keys::{LinkKeypair, NodeKeys};
use crate::probe::{Challenge, ProbeResponder, ProbeTarget};
use crate::pubkey::PublicLinkKey;
use crate::transport::{LinkReader, LinkWriter, MAX_CELL_SIZE};

/// The Noise protocol of every link. AES-GCM (via ring, with AES-NI and
/// PCLMULQDQ) beat ChaCha20-Poly1305 for 16 KiB cells; see the crate README.
pub const NOISE_PROTOCOL: &str = "Noise_XX_25519_AESGCM_SHA256";

/// Label mixed into the handshake prologue, together with the cell size.
const PROLOGUE_LABEL: &[u8] = b"mixnn-link/1";

/// Largest handshake message we accept. XX messages with empty payloads are
/// 32, 96 and 64 bytes; anything much larger is not our protocol.
const MAX_HANDSHAKE_MSG: usize = 256;

/// Default limit for TCP connect plus handshake.
pub const DEFAULT_HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// Per-link settings both ends must agree on (the cell size is bound into
/// the handshake, so a mismatch fails the handshake).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct LinkConfig {
    cell_size: usize,
    handshake_timeout: Duration,
}

impl LinkConfig {
    /// A config for cells of `cell_size` bytes (`1..=MAX_CELL_SIZE`) with the
    /// default handshake timeout.
    pub fn new(cell_size: usize) -> Result<Self, NetError> {
        if cell_size == 0 || cell_size > MAX_CELL_SIZE {
            return Err(NetError::InvalidCellSize {
                cell_size,
                max: MAX_CELL_SIZE,
            });
        }
        Ok(Self {
            cell_size,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        })
    }

    /// The configuration every MixNN endpoint (node and designer) uses:
    /// cells of [`mixnn_wire::CELL_SIZE`] bytes, the default handshake
    /// timeout. Both ends of a link must agree on it, so it lives here,
    /// below both.
    pub fn mixnn() -> Self {
        const _: () = assert!(mixnn_wire::CELL_SIZE > 0 && mixnn_wire::CELL_SIZE <= MAX_CELL_SIZE);
        Self {
            cell_size: mixnn_wire::CELL_SIZE,
            handshake_timeout: DEFAULT_HANDSHAKE_TIMEOUT,
        }
    }

    /// Sets the limit for TCP connect plus handshake.
    #[must_use]
    pub fn with_handshake_timeout(mut self, timeout: Duration) -> Self {
        self.handshake_timeout = timeout;
        self
    }

    /// The cell size in bytes.
    pub fn cell_size(&self) -> usize {
        self.cell_size
    }

    /// The connect-plus-handshake time limit.
    pub fn handshake_timeout(&self) -> Duration {
        self.handshake_timeout
    }

    fn prologue(&self) -> Vec<u8> {
        let mut prologue = PROLOGUE_LABEL.to_vec();
        // `new` bounds cell_size by MAX_CELL_SIZE < 2^32.
        prologue.extend_from_slice(&(self.cell_size as u32).to_be_bytes());
        prologue
    }
}

/// An authenticated, encrypted link carrying fixed-size cells.
#[derive(Debug)]
pub struct Link {
    reader: LinkReader,
    writer: LinkWriter,
    remote_key: PublicLinkKey,
}

impl Link {
    /// Connects to `addr` as the Noise initiator. If `expected_remote` is
    /// given and the responder proves a different static key, fails with
    /// [`NetError::UnexpectedPeer`] before revealing our own static key.
    pub async fn connect(
        addr: SocketAddr,
        key: &LinkKeypair,
        expected_remote: Option<PublicLinkKey>,
        config: LinkConfig,
    ) -> Result<Link, NetError> {
        let setup = async {
            let stream = TcpStream::connect(addr)
                .await
                .map_err(|source| NetError::Connect { addr, source })?;
            handshake(
                stream,
                addr,
                key,
                expected_remote,
                config,
                Role::Initiator,
                None,
            )
            .await
        };
        tokio::time::timeout(config.handshake_timeout, setup)
            .await
            .map_err(|_| NetError::HandshakeTimeout { peer: addr })?
    }

    /// The static link key the peer proved it holds.
    pub fn remote_key(&self) -> PublicLinkKey {
        self.remote_key
    }

    /// The peer's socket address.
    pub fn peer_addr(&self) -> SocketAddr {
        self.reader.peer_addr()
    }

    /// The link's cell size in bytes.
    pub fn cell_size(&self) -> usize {
        self.reader.cell_size()
    }

    /// Splits into halves that can be used from separate tasks.
    pub fn into_split(self) -> (LinkReader, LinkWriter) {
        (self.reader, self.writer)
    }

    /// See [`LinkWriter::send_cells`].
    pub async fn send_cells(&mut self, cells: &[u8]) -> Result<(), NetError> {
        self.writer.send_cells(cells).await
    }

    /// See [`LinkReader::recv_cell`].
    pub async fn recv_cell(&mut self, out: &mut [u8]) -> Result<(), NetError> {
        self.reader.recv_cell(out).await
    }
}

/// Listens for links; see the module docs for the accept pattern.
#[derive(Debug)]
pub struct LinkListener {
    listener: TcpListener,
    key: Arc<LinkKeypair>,
    config: LinkConfig,
    probes: Option<Arc<ProbeResponder>>,
}

impl LinkListener {
    /// Binds a TCP listener on `addr` (port 0 picks a free port).
    pub async fn bind(
        addr: SocketAddr,
        key: LinkKeypair,
        config: LinkConfig,
    ) -> Result<Self, NetError> {
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|source| NetError::Bind { addr, source })?;
        Ok(Self {
            listener,
            key: Arc::new(key),
            config,
            probes: None,
        })
    }

    /// Answers directory probes ([`mod@crate::probe`]) with `keys`' onion key:
    /// a connection that opens with a probe gets its proof and ends with
    /// [`NetError::Probed`] instead of becoming a link. `keys` must be the
    /// node whose link key this listener holds.
    #[must_use]
    pub fn answer_probes(mut self, keys: &NodeKeys) -> Self {
        self.probes = Some(Arc::new(ProbeResponder::new(keys)));
        self
    }

    /// The address actually bound.
    pub fn local_addr(&self) -> Result<SocketAddr, NetError> {
        self.listener
            .local_addr()
            .map_err(|source| NetError::Accept { source })
    }

    /// Waits for the next TCP connection. Returns quickly; the handshake is
    /// done by [`PendingLink::handshake`]. An error here concerns the
    /// listening socket (e.g. out of file descriptors): back off and retry.
    pub async fn accept(&self) -> Result<PendingLink, NetError> {
        let (stream, peer) = self
            .listener
            .accept()
            .await
            .map_err(|source| NetError::Accept { source })?;
        Ok(PendingLink {
            stream,
            peer,
            key: Arc::clone(&self.key),
            config: self.config,
            probes: self.probes.clone(),
        })
    }
}

/// An accepted TCP connection whose handshake has not run yet.
#[derive(Debug)]
pub struct PendingLink {
    stream: TcpStream,
    peer: SocketAddr,
    key: Arc<LinkKeypair>,
    config: LinkConfig,
    probes: Option<Arc<ProbeResponder>>,
}

impl PendingLink {
    /// The connecting peer's address (unauthenticated).
    pub fn peer_addr(&self) -> SocketAddr {
        self.peer
    }

    /// Completes once the peer has sent something (or closed): a client
    /// that connects and stays silent can be told from one that started
    /// its handshake.
    pub async fn readable(&self) -> Result<(), NetError> {
        self.stream
            .readable()
            .await
            .map_err(|source| NetError::LinkIo {
                peer: self.peer,
                source,
            })
    }

    /// Runs the responder side of the handshake, bounded by the configured
    /// timeout. Any error concerns this connection only. The caller decides
    /// whether [`Link::remote_key`] is allowed to talk to it. A directory
    /// probe answered here ends with [`NetError::Probed`].
    pub async fn handshake(self) -> Result<Link, NetError> {
        let Self {
            stream,
            peer,
            key,
            config,
            probes,
        } = self;
        let setup = handshake(
            stream,
            peer,
            &key,
            None,
            config,
            Role::Responder,
            probes.as_deref(),
        );
        tokio::time::timeout(config.handshake_timeout, setup)
            .await
            .map_err(|_| NetError::HandshakeTimeout { peer })?
    }
}

#[derive(Clone, Copy, PartialEq, Eq)]
enum Role {
    Initiator,
    Responder,
}

fn noise_state(
    peer: SocketAddr,
    key: &LinkKeypair,
    config: LinkConfig,
    role: Role,
) -> Result<HandshakeState, NetError> {
    let noise_err = |e: snow::Error| NetError::Handshake {
        peer,
        reason: e.to_string(),
    };
    let params = NOISE_PROTOCOL.parse().map_err(noise_err)?;
    let prologue = config.prologue();
    let builder = Builder::new(params)
        .local_private_key(key.secret_bytes())
        .and_then(|b| b.prologue(&prologue))
        .map_err(noise_err)?;
    match role {
        Role::Initiator => builder.build_initiator(),
        Role::Responder => builder.build_responder(),
    }
    .map_err(noise_err)
}

/// The directory's side of a probe (see [`mod@crate::probe`]): messages 1 and
/// 2 of the handshake, then close.
pub(crate) async fn probe(target: &ProbeTarget, config: LinkConfig) -> Result<(), NetError> {
    let peer = target.addr;
    let run = async {
        let mut stream = TcpStream::connect(peer)
            .await
            .map_err(|source| NetError::Connect { addr: peer, source })?;
        let io_err = |source| NetError::LinkIo { peer, source };
        let noise_err = |e: snow::Error| NetError::Handshake {
            peer,
            reason: e.to_string(),
        };
        stream.set_nodelay(true).map_err(io_err)?;
        // A throwaway static key: the third message, which would reveal
        // it, is never sent.
        let key = LinkKeypair::generate_os();
        let mut hs = noise_state(peer, &key, config, Role::Initiator)?;
        let challenge = Challenge::new(target)?;
        let mut msg = [0u8; MAX_HANDSHAKE_MSG];
        let mut payload = [0u8; MAX_HANDSHAKE_MSG];
        let len = hs
            .write_message(&challenge.payload, &mut msg)
            .map_err(noise_err)?;
        write_handshake_frame(&mut stream, &msg[..len])
            .await
            .map_err(io_err)?;
        let len = read_handshake_frame(&mut stream, &mut msg, peer).await?;
        let n = hs
            .read_message(&msg[..len], &mut payload)
            .map_err(noise_err)?;
        check_remote(&hs, peer, Some(PublicLinkKey::from_bytes(target.link)))?;
        challenge.check(peer, &payload[..n])
    };
    tokio::time::timeout(config.handshake_timeout, run)
        .await
        .map_err(|_| NetError::HandshakeTimeout { peer })?
}

/// Runs the three XX messages (`-> e`, `<- e, ee, s, es`, `-> s, se`) and
/// builds the link. A responder with `probes` answers a probe in message 2
/// and stops there.
async fn handshake(
    mut stream: TcpStream,
    peer: SocketAddr,
    key: &LinkKeypair,
    expected_remote: Option<PublicLinkKey>,
    config: LinkConfig,
    role: Role,
    probes: Option<&ProbeResponder>,
) -> Result<Link, NetError> {
    let noise_err = |e: snow::Error| NetError::Handshake {
        peer,
        reason: e.to_string(),
    };
    let io_err = |source| NetError::LinkIo { peer, source };
    stream.set_nodelay(true).map_err(io_err)?;
    let mut hs = noise_state(peer, key, config, role)?;

    let mut msg = [0u8; MAX_HANDSHAKE_MSG];
    let mut payload = [0u8; MAX_HANDSHAKE_MSG];
    let mut proof: Option<[u8; 32]> = None;
    let mut our_turn = role == Role::Initiator;
    while !hs.is_handshake_finished() {
        if our_turn {
            let out: &[u8] = proof.as_ref().map_or(&[], |p| p.as_slice());
            let len = hs.write_message(out, &mut msg).map_err(noise_err)?;
            write_handshake_frame(&mut stream, &msg[..len])
                .await
                .map_err(io_err)?;
            if proof.is_some() {
                return Err(NetError::Probed { peer });
            }
        } else {
            let len = read_handshake_frame(&mut stream, &mut msg, peer).await?;
            let n = hs
                .read_message(&msg[..len], &mut payload)
                .map_err(noise_err)?;
            if role == Role::Responder && n > 0 && !hs.is_handshake_finished() {
                proof = probes.and_then(|p| p.answer(&payload[..n], key.public().as_bytes()));
            }
            // Check the responder's key as soon as we learn it, before our
            // own static key goes out in the last message.
            check_remote(&hs, peer, expected_remote)?;
        }
        our_turn = !our_turn;
    }

    let remote_key =
        check_remote(&hs, peer, expected_remote)?.ok_or_else(|| NetError::Handshake {
            peer,
            reason: "peer sent no static key".to_owned(),
        })?;
    let transport = hs.into_stateless_transport_mode().map_err(noise_err)?;
    let (reader, writer) = crate::transport::split(stream, transport, peer, config.cell_size());
    Ok(Link {
        reader,
        writer,
        remote_key,
    })
}

/// Returns the peer's static key if known, failing if it is not the
/// expected one.
fn check_remote(
    hs: &HandshakeState,
    peer: SocketAddr,
    expected: Option<PublicLinkKey>,
) -> Result<Option<PublicLinkKey>, NetError> {
    let Some(raw) = hs.get_remote_static() else {
        return Ok(None);
    };
    let bytes: [u8; 32] = raw.try_into().map_err(|_| NetError::Handshake {
        peer,
        reason: "remote static key has the wrong length".to_owned(),
    })?;
    let actual = PublicLinkKey::from_bytes(bytes);
    match expected {
        Some(expected) if expected != actual => Err(NetError::UnexpectedPeer {
            peer,
            expected: crate::alias::key(expected.as_bytes()).tag().to_string(),
            actual: crate::alias::key(actual.as_bytes()).tag().to_string(),
        }),
        _ => Ok(Some(actual)),
    }
}

async fn write_handshake_frame(stream: &mut TcpStream, msg: &[u8]) -> std::io::Result<()> {
    // msg.len() <= MAX_HANDSHAKE_MSG, which fits in u16.
    let mut frame = [0u8; 2 + MAX_HANDSHAKE_MSG];
    frame[..2].copy_from_slice(&(msg.len() as u16).to_be_bytes());
    frame[2..2 + msg.len()].copy_from_slice(msg);
    stream.write_all(&frame[..2 + msg.len()]).await
}

async fn read_handshake_frame(
    stream: &mut TcpStream,
    buf: &mut [u8; MAX_HANDSHAKE_MSG],
    peer: SocketAddr,
) -> Result<usize, NetError> {
    let io_err = |source| NetError::LinkIo { peer, source };
    let len = usize::from(stream.read_u16().await.map_err(io_err)?);
    if len > MAX_HANDSHAKE_MSG {
        return Err(NetError::Handshake {
            peer,
            reason: format!("handshake message of {len} bytes exceeds {MAX_HANDSHAKE_MSG}"),
        });
    }
    stream.read_exact(&mut buf[..len]).await.map_err(io_err)?;
    Ok(len)
}
