//! Hop side: peel one onion layer, learn one routing block, forward the rest.
//!
//! * [`peel_init`] uses the hop's X25519 [`OnionSecret`] (one DH and one
//!   scalar multiplication) and yields a [`HopSession`].
//! * [`HopSession::peel`] (or [`SessionTable::peel`]) handles every later
//!   packet with symmetric crypto only.
//!
//! Both check the MAC γ over the whole header and the notes before parsing
//! anything, and both reject replays.

use std::collections::{HashMap, VecDeque};

use rand_core::{CryptoRng, RngCore};
use x25519_dalek::{PublicKey, StaticSecret};
use zeroize::Zeroizing;

use crate::block::{BlockPlaintext, HopAddr, HopTag, Next, Op, ReplyId, RoutingBlock, SessionId};
use crate::constants::{CTR_FIELD_LEN, ID_LEN, PREFIX_LEN, REPLAY_WINDOW, TOKEN_LOOKAHEAD};
use crate::crypto::{self, HopKeys, SessionRoot};
use crate::error::WireError;
use crate::header::{Header, Notes, Onion};
use crate::layered;
use crate::notes;
use crate::replay::{InitReplayCache, InitTag, ReplayWindow};

/// A node's published X25519 onion key.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct OnionPublic(pub [u8; 32]);

impl std::fmt::Debug for OnionPublic {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "OnionPublic(")?;
        for b in &self.0[..4] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "…)")
    }
}

/// A node's X25519 onion secret key (zeroized on drop, never printed).
pub struct OnionSecret(StaticSecret);

impl OnionSecret {
    /// A fresh key from the injected RNG.
    pub fn generate<R: RngCore + CryptoRng>(rng: &mut R) -> Self {
        Self(StaticSecret::random_from_rng(rng))
    }

    /// Loads a stored key.
    pub fn from_bytes(bytes: [u8; 32]) -> Self {
        Self(StaticSecret::from(bytes))
    }

    /// The key bytes, for storing (zeroized when dropped).
    pub fn to_bytes(&self) -> Zeroizing<[u8; 32]> {
        Zeroizing::new(self.0.to_bytes())
    }

    /// The public key to publish.
    pub fn public(&self) -> OnionPublic {
        OnionPublic(PublicKey::from(&self.0).to_bytes())
    }
}

impl std::fmt::Debug for OnionSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("OnionSecret(..)")
    }
}

/// A peeled packet to pass on to the next hop.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    /// What to do.
    pub op: Op,
    /// Per-hop tag.
    pub tag: HopTag,
    /// This hop's note.
    pub note: Vec<u8>,
    /// The next hop.
    pub next: HopAddr,
    /// Header and notes to send to `next` (same sizes as received).
    pub onion: Onion,
}

/// A peeled packet whose result goes back to the designer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Deliver {
    /// What to do.
    pub op: Op,
    /// Per-hop tag.
    pub tag: HopTag,
    /// This hop's note.
    pub note: Vec<u8>,
    /// The designer's address.
    pub addr: HopAddr,
    /// To echo back to the designer.
    pub reply_id: ReplyId,
}

/// The result of peeling one onion layer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Peeled {
    /// Pass the result on to another hop.
    Forward(Forward),
    /// Send the result to the designer.
    Deliver(Deliver),
}

impl Peeled {
    /// The routing block this hop learned, exactly as the designer wrote it.
    pub fn block(&self) -> RoutingBlock {
        match self {
            Peeled::Forward(f) => RoutingBlock {
                op: f.op,
                tag: f.tag,
                next: Next::Hop(f.next),
            },
            Peeled::Deliver(d) => RoutingBlock {
                op: d.op,
                tag: d.tag,
                next: Next::Deliver {
                    addr: d.addr,
                    reply_id: d.reply_id,
                },
            },
        }
    }

    /// The op.
    pub fn op(&self) -> Op {
        match self {
            Peeled::Forward(f) => f.op,
            Peeled::Deliver(d) => d.op,
        }
    }

    /// The per-hop tag.
    pub fn tag(&self) -> HopTag {
        match self {
            Peeled::Forward(f) => f.tag,
            Peeled::Deliver(d) => d.tag,
        }
    }

    /// This hop's note.
    pub fn note(&self) -> &[u8] {
        match self {
            Peeled::Forward(f) => &f.note,
            Peeled::Deliver(d) => &d.note,
        }
    }
}

/// Verified and decrypted, but not yet given the next prefix.
struct Raw {
    plain: BlockPlaintext,
    header: Header,
    notes: Notes,
    note: Vec<u8>,
}

fn peel_raw(keys: &HopKeys, header: &Header, notes: &Notes) -> Result<Raw, WireError> {
    keys.verify(
        &header.prefix(),
        header.beta(),
        notes.as_bytes(),
        header.mac(),
    )?;
    let mut next = Header::zeroed();
    let block = layered::peel_area(header.beta(), next.beta_mut(), keys.beta_stream(), |_| {
        Ok(crate::constants::BLOCK_LEN)
    })?;
    let block: [u8; crate::constants::BLOCK_LEN] =
        block.try_into().map_err(|_| WireError::Malformed {
            what: "routing block",
            reason: "wrong length",
        })?;
    let plain = BlockPlaintext::decode(&block)?;
    let (note, next_notes) = notes::peel(keys, notes)?;
    Ok(Raw {
        plain,
        header: next,
        notes: next_notes,
        note,
    })
}

fn finish(raw: Raw, next_prefix: impl FnOnce(&BlockPlaintext) -> [u8; PREFIX_LEN]) -> Peeled {
    let RoutingBlock { op, next, tag } = raw.plain.block;
    match next {
        Next::Hop(addr) => {
            let mut header = raw.header;
            header.set_prefix(&next_prefix(&raw.plain));
            header.set_mac(&raw.plain.next_mac);
            Peeled::Forward(Forward {
                op,
                tag,
                note: raw.note,
                next: addr,
                onion: Onion {
                    header,
                    notes: raw.notes,
                },
            })
        }
        Next::Deliver { addr, reply_id } => Peeled::Deliver(Deliver {
            op,
            tag,
            note: raw.note,
            addr,
            reply_id,
        }),
    }
}

/// Peels an init onion: X25519 with the hop's onion key, MAC, replay check.
///
/// Returns what the hop must do and the [`HopSession`] to keep for the
/// session packets that follow. The replay cache is only checked: the
/// caller records [`HopSession::init_tag`] in it once every check of its
/// own (note, limits) has passed, so a refused init takes no room.
pub fn peel_init(
    secret: &OnionSecret,
    seen: &InitReplayCache,
    header: &Header,
    notes: &Notes,
) -> Result<(Peeled, HopSession), WireError> {
    let alpha = header.prefix();
    let shared = Zeroizing::new(secret.0.diffie_hellman(&PublicKey::from(alpha)).to_bytes());
    crypto::check_contributory(&shared)?;
    let keys = HopKeys::init(&shared);
    let raw = peel_raw(&keys, header, notes)?;
    let tag = crypto::init_replay_tag(&shared);
    seen.check(&tag)?;
    let op = raw.plain.block.op;
    if op != Op::Init {
        return Err(WireError::OpMismatch {
            op,
            context: "an init message",
        });
    }
    let Some(id) = raw.plain.new_session else {
        return Err(WireError::Malformed {
            what: "routing block",
            reason: "init block without a session id",
        });
    };
    let session = HopSession {
        id,
        root: SessionRoot::from_shared(&shared),
        window: ReplayWindow::new(),
        init_tag: tag,
    };
    let b = crypto::blinding(&alpha, &shared);
    let peeled = finish(raw, |_| crypto::blind(&alpha, &b));
    Ok((peeled, session))
}

/// A hop's state for one cascade: session id, session secret, replay window.
///
/// The session id is the hop's own name for the session (chosen by the
/// designer at init, seen by no other hop); session headers do not carry
/// it. They carry a lookup token, a pseudo-random function of the packet
/// counter ([`SessionTable`] keeps the tokens of the counters it may see
/// next), so no two packets share header bytes.
pub struct HopSession {
    id: SessionId,
    root: SessionRoot,
    window: ReplayWindow,
    init_tag: InitTag,
}

impl std::fmt::Debug for HopSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HopSession")
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl HopSession {
    /// The session id (this hop's name for the session).
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The replay tag of the init that set this session up, to record in
    /// the [`InitReplayCache`] once the init is accepted.
    pub fn init_tag(&self) -> InitTag {
        self.init_tag
    }

    /// Peels a session onion: symmetric crypto only. The header's token
    /// must be this session's for the counter its counter field holds.
    pub fn peel(&mut self, header: &Header, notes: &Notes) -> Result<Peeled, WireError> {
        let counter = self.open(header)?;
        if header.token() != self.root.token(counter) {
            return Err(WireError::UnknownSession);
        }
        self.peel_counter(counter, header, notes)
    }

    fn open(&self, header: &Header) -> Result<u64, WireError> {
        let mut field = [0u8; CTR_FIELD_LEN];
        field.copy_from_slice(&header.prefix()[ID_LEN..]);
        self.root.open_counter(&field)
    }

    /// Peels a packet whose token named `counter`.
    fn peel_counter(
        &mut self,
        counter: u64,
        header: &Header,
        notes: &Notes,
    ) -> Result<Peeled, WireError> {
        if self.open(header)? != counter {
            return Err(WireError::BadCounter);
        }
        self.window.check(counter)?;
        let keys = HopKeys::session(&self.root, counter);
        let raw = peel_raw(&keys, header, notes)?;
        let op = raw.plain.block.op;
        if op == Op::Init {
            return Err(WireError::OpMismatch {
                op,
                context: "a session message",
            });
        }
        if raw.plain.new_session.is_some() {
            return Err(WireError::Malformed {
                what: "routing block",
                reason: "session id in a session block",
            });
        }
        self.window.mark(counter);
        Ok(finish(raw, |plain| plain.next_prefix))
    }

    /// The highest counter accepted so far.
    fn highest(&self) -> Option<u64> {
        self.window.highest()
    }

    /// A session straight from a shared secret (fuzzing and tests).
    pub(crate) fn from_shared(id: SessionId, shared: &[u8; 32]) -> Self {
        Self {
            id,
            root: SessionRoot::from_shared(shared),
            window: ReplayWindow::new(),
            init_tag: crypto::init_replay_tag(shared),
        }
    }
}

/// One session in a [`SessionTable`], with the tokens it is listed under.
#[derive(Debug)]
struct Listed {
    session: HopSession,
    /// Tokens of counters `from .. from + tokens.len()`.
    from: u64,
    tokens: VecDeque<[u8; ID_LEN]>,
}

/// A hop's sessions, found by the lookup token of each session header.
///
/// For every session the table keeps the tokens of the counters the
/// designer may send next: from [`REPLAY_WINDOW`] behind the highest
/// accepted counter to [`TOKEN_LOOKAHEAD`] ahead of it. A token is one AES
/// block, so keeping them costs about 40 bytes per counter and one AES
/// operation per packet.
#[derive(Debug, Default)]
pub struct SessionTable {
    sessions: HashMap<SessionId, Listed>,
    tokens: HashMap<[u8; ID_LEN], (SessionId, u64)>,
}

impl SessionTable {
    /// An empty table.
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds a session from [`peel_init`]; refuses to replace an existing id.
    pub fn insert(&mut self, session: HopSession) -> Result<(), WireError> {
        let id = session.id;
        if self.sessions.contains_key(&id) {
            return Err(WireError::DuplicateSession);
        }
        let mut listed = Listed {
            session,
            from: 0,
            tokens: VecDeque::new(),
        };
        self.extend(&mut listed, TOKEN_LOOKAHEAD);
        self.sessions.insert(id, listed);
        Ok(())
    }

    /// Lists tokens up to counter `until` (exclusive).
    fn extend(&mut self, listed: &mut Listed, until: u64) {
        let id = listed.session.id;
        let mut next = listed.from + listed.tokens.len() as u64;
        while next < until {
            let token = listed.session.root.token(next);
            // A 128-bit collision between two sessions' tokens is not
            // expected; if it happened, the older entry would win and the
            // newer packet would be refused as unknown (never misrouted:
            // the counter field and the MAC are checked with the session's
            // own keys).
            self.tokens.entry(token).or_insert((id, next));
            listed.tokens.push_back(token);
            next += 1;
        }
    }

    /// Forgets tokens below counter `from`.
    fn trim(&mut self, listed: &mut Listed, from: u64) {
        while listed.from < from {
            let Some(token) = listed.tokens.pop_front() else {
                listed.from = from;
                break;
            };
            if self
                .tokens
                .get(&token)
                .is_some_and(|(id, _)| *id == listed.session.id)
            {
                self.tokens.remove(&token);
            }
            listed.from += 1;
        }
    }

    /// Drops a session (its secret is zeroized) and its tokens.
    pub fn remove(&mut self, id: &SessionId) -> Option<HopSession> {
        let mut listed = self.sessions.remove(id)?;
        let end = listed.from + listed.tokens.len() as u64;
        self.trim(&mut listed, end);
        Some(listed.session)
    }

    /// Number of sessions.
    pub fn len(&self) -> usize {
        self.sessions.len()
    }

    /// Whether a session with id `id` is listed.
    pub fn contains(&self, id: &SessionId) -> bool {
        self.sessions.contains_key(id)
    }

    /// No sessions.
    pub fn is_empty(&self) -> bool {
        self.sessions.is_empty()
    }

    /// The session a session header's token names, without peeling (so a
    /// caller can check who sent it before the packet's counter is used).
    pub fn session_of(&self, header: &Header) -> Option<SessionId> {
        self.tokens.get(&header.token()).map(|(id, _)| *id)
    }

    /// Finds the session the header's token names and peels with it;
    /// returns the session's id with the result.
    pub fn peel(
        &mut self,
        header: &Header,
        notes: &Notes,
    ) -> Result<(SessionId, Peeled), WireError> {
        let (id, counter) = *self
            .tokens
            .get(&header.token())
            .ok_or(WireError::UnknownSession)?;
        let mut listed = self.sessions.remove(&id).ok_or(WireError::UnknownSession)?;
        let result = listed.session.peel_counter(counter, header, notes);
        if result.is_ok() {
            if let Some(highest) = listed.session.highest() {
                self.trim(&mut listed, (highest + 1).saturating_sub(REPLAY_WINDOW));
                self.extend(&mut listed, highest.saturating_add(1 + TOKEN_LOOKAHEAD));
            }
        }
        self.sessions.insert(id, listed);
        result.map(|p| (id, p))
    }
}

/// Peels a session onion with the matching session of `table`.
pub fn peel_session(
    table: &mut SessionTable,
    header: &Header,
    notes: &Notes,
) -> Result<Peeled, WireError> {
    table.peel(header, notes).map(|(_, p)| p)
}

#[cfg(test)]
mod tests;
