//! Designer side: builds init and session onions for a whole path.
//!
//! [`wrap_init`] runs one X25519 operation pair per hop and returns a
//! [`DesignerSession`] holding each hop's session secret. Every later packet
//! ([`DesignerSession::wrap`]) is built with symmetric crypto only: per hop,
//! one AES block for the counter field, one BLAKE3 key derivation, ChaCha20
//! over β and the notes, and one BLAKE3 MAC.

use curve25519_dalek::montgomery::MontgomeryPoint;
use rand_core::{CryptoRng, RngCore};
use zeroize::Zeroize;

use crate::block::{BlockPlaintext, Next, Op, RoutingBlock, SessionId};
use crate::constants::{BETA_LEN, BLOCK_LEN, MAC_LEN, MAX_HOPS, NOTES_LEN, PREFIX_LEN};
use crate::crypto::{self, HopKeys, SessionRoot};
use crate::error::WireError;
use crate::header::{Header, Onion};
use crate::layered;
use crate::notes;
use crate::peel::OnionPublic;

/// What the designer writes for one hop of one packet.
#[derive(Debug, Clone, Copy)]
pub struct HopLayer<'a> {
    /// The routing block this hop will learn.
    pub block: RoutingBlock,
    /// This hop's note (e.g. its stage spec at init, labels on forward).
    pub note: &'a [u8],
}

/// Per-hop inputs of the generic builder.
struct Plan {
    keys: HopKeys,
    prefix: [u8; PREFIX_LEN],
    /// Session hops learn the next prefix from their block; init hops blind α.
    prefix_in_block: bool,
    new_session: Option<SessionId>,
}

/// Checks lengths, ops and the hop/deliver shape of a path.
fn check_layers(layers: &[HopLayer<'_>], init: bool) -> Result<(), WireError> {
    let n = layers.len();
    if n == 0 || n > MAX_HOPS {
        return Err(WireError::PathLength {
            hops: n,
            max: MAX_HOPS,
        });
    }
    for (index, layer) in layers.iter().enumerate() {
        let op = layer.block.op;
        if (op == Op::Init) != init {
            let context = if init {
                "an init message"
            } else {
                "a session message"
            };
            return Err(WireError::OpMismatch { op, context });
        }
        match (layer.block.next, index + 1 == n) {
            (Next::Hop(_), false) | (Next::Deliver { .. }, true) => {}
            (Next::Hop(_), true) => {
                return Err(WireError::BadPath {
                    index,
                    reason: "the last layer must deliver to the designer",
                })
            }
            (Next::Deliver { .. }, false) => {
                return Err(WireError::BadPath {
                    index,
                    reason: "only the last layer may deliver",
                })
            }
        }
    }
    notes::check_fits(layers.iter().map(|l| l.note))
}

/// Builds header and notes from the innermost hop outwards.
fn build<R: RngCore + CryptoRng>(plans: &[Plan], layers: &[HopLayer<'_>], rng: &mut R) -> Onion {
    let n = plans.len();
    let mut notes_c = notes::build(plans.iter().map(|p| &p.keys), layers, rng);

    let streams: Vec<Vec<u8>> = plans
        .iter()
        .map(|p| layered::full_keystream(p.keys.beta_stream(), BETA_LEN + BLOCK_LEN))
        .collect();
    let lens = vec![BLOCK_LEN; n - 1];
    let phi = layered::filler(BETA_LEN, &streams[..n - 1], &lens);

    let mut beta = Vec::new();
    let mut mac = [0u8; MAC_LEN];
    for i in (0..n).rev() {
        let inner = i + 1 < n;
        let next_prefix = match plans.get(i + 1) {
            Some(next) if next.prefix_in_block => next.prefix,
            _ => [0; PREFIX_LEN],
        };
        let block = BlockPlaintext {
            block: layers[i].block,
            next_mac: if inner { mac } else { [0; MAC_LEN] },
            next_prefix,
            new_session: plans[i].new_session,
        }
        .encode();
        if inner {
            layered::wrap_layer(&block, &mut beta, &streams[i]);
        } else {
            beta = layered::innermost(BETA_LEN, &block, &streams[i], &phi, rng);
        }
        mac = plans[i]
            .keys
            .mac(&plans[i].prefix, &beta, notes_c[i].as_bytes());
    }

    let mut header = Header::zeroed();
    header.set_prefix(&plans[0].prefix);
    header.beta_mut().copy_from_slice(&beta);
    header.set_mac(&mac);
    let notes = notes_c.swap_remove(0); // n ≥ 1: checked by check_layers.
    Onion { header, notes }
}

/// One hop as the designer remembers it after init.
struct DesignerHop {
    sid: SessionId,
    root: SessionRoot,
    next_counter: u64,
}

/// The designer's per-cascade state after init: each hop's session id and
/// session secret (zeroized on drop), and a per-hop packet counter.
pub struct DesignerSession {
    hops: Vec<DesignerHop>,
}

impl std::fmt::Debug for DesignerSession {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "DesignerSession({} hops)", self.hops.len())
    }
}

/// Builds an init onion for `path` (one onion public key per hop, in order).
///
/// Every layer's op must be [`Op::Init`]; the last layer delivers to the
/// designer (its acknowledgement), the others forward. Returns the onion to
/// send to `path[0]` and the session used for every later packet.
pub fn wrap_init<R: RngCore + CryptoRng>(
    path: &[OnionPublic],
    layers: &[HopLayer<'_>],
    rng: &mut R,
) -> Result<(Onion, DesignerSession), WireError> {
    if path.len() != layers.len() {
        return Err(WireError::LayerCount {
            hops: path.len(),
            layers: layers.len(),
        });
    }
    check_layers(layers, true)?;
    let mut x = crypto::random_scalar(rng);
    let mut plans = Vec::with_capacity(path.len());
    let mut hops = Vec::with_capacity(path.len());
    for public in path {
        let alpha = MontgomeryPoint::mul_base(&x).to_bytes();
        let mut shared = (MontgomeryPoint(public.0) * x).to_bytes();
        if let Err(e) = crypto::check_contributory(&shared) {
            x.zeroize();
            return Err(e);
        }
        let sid = SessionId::random(rng);
        plans.push(Plan {
            keys: HopKeys::init(&shared),
            prefix: alpha,
            prefix_in_block: false,
            new_session: Some(sid),
        });
        hops.push(DesignerHop {
            sid,
            root: SessionRoot::from_shared(&shared),
            next_counter: 0,
        });
        x *= crypto::blinding(&alpha, &shared);
        shared.zeroize();
    }
    x.zeroize();
    Ok((build(&plans, layers, rng), DesignerSession { hops }))
}

impl DesignerSession {
    /// Number of hops set up by the init.
    pub fn hops(&self) -> usize {
        self.hops.len()
    }

    /// The session id hop `index` learned at init.
    pub fn session_id(&self, index: usize) -> Option<SessionId> {
        self.hops.get(index).map(|h| h.sid)
    }

    /// Builds a session onion (forward, backward, test, loop, …).
    ///
    /// `path[k]` is the index (in init order) of the k-th hop to visit and
    /// `layers[k]` what it learns: a forward pass is `0..n`, a backward pass
    /// `(0..n).rev()`. Symmetric crypto only; each visited hop's counter
    /// advances, so every packet is new to every hop.
    pub fn wrap<R: RngCore + CryptoRng>(
        &mut self,
        path: &[usize],
        layers: &[HopLayer<'_>],
        rng: &mut R,
    ) -> Result<Onion, WireError> {
        if path.len() != layers.len() {
            return Err(WireError::LayerCount {
                hops: path.len(),
                layers: layers.len(),
            });
        }
        check_layers(layers, false)?;
        let mut counters: Vec<u64> = self.hops.iter().map(|h| h.next_counter).collect();
        let mut plans = Vec::with_capacity(path.len());
        for &index in path {
            let hop = self.hops.get(index).ok_or(WireError::UnknownHop {
                index,
                hops: self.hops.len(),
            })?;
            let counter = counters[index];
            counters[index] = counter.checked_add(1).ok_or(WireError::CounterExhausted)?;
            let mut prefix = [0u8; PREFIX_LEN];
            prefix[..16].copy_from_slice(&hop.root.token(counter));
            prefix[16..].copy_from_slice(&hop.root.seal_counter(counter));
            plans.push(Plan {
                keys: HopKeys::session(&hop.root, counter),
                prefix,
                prefix_in_block: true,
                new_session: None,
            });
        }
        for (hop, counter) in self.hops.iter_mut().zip(counters) {
            hop.next_counter = counter;
        }
        Ok(build(&plans, layers, rng))
    }
}

const _: () = assert!(NOTES_LEN >= MAX_HOPS * crate::constants::NOTE_LEN_PREFIX);
