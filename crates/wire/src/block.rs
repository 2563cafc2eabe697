//! Routing blocks: what one hop learns when it peels its onion layer.
//!
//! A block is [`BLOCK_LEN`] bytes of plaintext at a fixed layout:
//!
//! ```text
//! off  len  field
//!   0    1  op                      (Op as u8)
//!   1    1  next kind               (0 = hop, 1 = deliver to the designer)
//!   2    1  flags                   (bit 0: carries the hop's new session id; init only)
//!   3   19  address                 (HopAddr: family ‖ ip[16] ‖ port BE)
//!  22   16  tag                     (per-hop tag: matches backward to forward)
//!  38   16  next MAC γ'             (next hop's MAC; zero when delivering)
//!  54   32  next prefix             (next hop's `sid ‖ ctr`; session hops only)
//!  86   16  reply id                (deliver only)
//! 102   16  new session id          (init only)
//! 118   10  reserved, zero
//! ```
//!
//! Decoding is strict: unknown ops, unknown flags, non-zero reserved bytes and
//! malformed addresses are errors, so `encode(decode(b)) == b` for every block
//! that decodes.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};

use crate::constants::{BLOCK_LEN, ID_LEN, MAC_LEN, PREFIX_LEN};
use crate::error::WireError;

/// What a hop does with a packet. Same cell size for every op.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
#[repr(u8)]
pub enum Op {
    /// Build the stage from the note and keep the session (paper: op = 0).
    Init = 0,
    /// Forward propagation (paper: op = 1).
    Forward = 1,
    /// Backward propagation (paper: op = 2).
    Backward = 2,
    /// Testing / inference, one way (paper: op = 3).
    Test = 3,
    /// Loop message: the designer's own traffic through the cascade.
    Loop = 4,
    /// Ask the stage for its parameters.
    Fetch = 5,
    /// Cover traffic, dropped by the hop that reads this op.
    Cover = 6,
    /// Load a checkpointed state (parameters, momentum, step) into the
    /// stage, one chunk per message (crash recovery).
    Load = 7,
    /// Open a past step for an audit: the hop returns what it committed to
    /// (state before, input, output, gradients), one chunk per message.
    Audit = 8,
    /// End the session: the hop passes the message on along its path and
    /// drops its state for the session; the last hop acknowledges to the
    /// designer.
    Close = 9,
}

impl Op {
    /// Every op this version knows, in byte order.
    pub const ALL: [Op; 10] = [
        Op::Init,
        Op::Forward,
        Op::Backward,
        Op::Test,
        Op::Loop,
        Op::Fetch,
        Op::Cover,
        Op::Load,
        Op::Audit,
        Op::Close,
    ];
}

impl TryFrom<u8> for Op {
    type Error = WireError;

    fn try_from(byte: u8) -> Result<Self, WireError> {
        Op::ALL
            .get(usize::from(byte))
            .copied()
            .ok_or(WireError::UnknownOp { byte })
    }
}

macro_rules! id_type {
    ($(#[$doc:meta])* $name:ident) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash)]
        pub struct $name(pub [u8; ID_LEN]);

        impl $name {
            /// A fresh random id.
            pub fn random<R: rand_core::RngCore + rand_core::CryptoRng>(rng: &mut R) -> Self {
                let mut id = [0u8; ID_LEN];
                rng.fill_bytes(&mut id);
                Self(id)
            }
        }

        impl std::fmt::Debug for $name {
            // Identifiers link packets: never print them whole.
            fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
                write!(f, concat!(stringify!($name), "({:02x}{:02x}…)"), self.0[0], self.0[1])
            }
        }
    };
}

id_type!(
    /// Per-hop, per-batch tag: the designer puts the same tag in a hop's
    /// forward and backward blocks so the hop can find the activations it
    /// cached on the forward pass.
    HopTag
);
id_type!(
    /// A hop's session id, learned at init, prefixing its session headers.
    SessionId
);
id_type!(
    /// Lets the designer match a delivered message to the request it sent.
    ReplyId
);

/// Bytes of an encoded [`HopAddr`]: family ‖ ip\[16\] ‖ port (BE).
pub const ADDR_LEN: usize = 19;

/// A hop's (or the designer's) network address, encoded in fixed bytes.
///
/// IPv6 flow info and scope id are not carried (they decode as 0).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct HopAddr(pub SocketAddr);

impl HopAddr {
    /// Encodes to [`ADDR_LEN`] bytes.
    pub fn encode(&self) -> [u8; ADDR_LEN] {
        let mut out = [0u8; ADDR_LEN];
        match self.0.ip() {
            IpAddr::V4(ip) => {
                out[0] = 4;
                out[1..5].copy_from_slice(&ip.octets());
            }
            IpAddr::V6(ip) => {
                out[0] = 6;
                out[1..17].copy_from_slice(&ip.octets());
            }
        }
        out[17..19].copy_from_slice(&self.0.port().to_be_bytes());
        out
    }

    /// Decodes [`ADDR_LEN`] bytes; strict (unused IPv4 bytes must be zero).
    pub fn decode(bytes: &[u8; ADDR_LEN]) -> Result<Self, WireError> {
        let bad = |reason| WireError::Malformed {
            what: "address",
            reason,
        };
        let mut ip16 = [0u8; 16];
        ip16.copy_from_slice(&bytes[1..17]);
        let ip = match bytes[0] {
            4 => {
                if ip16[4..].iter().any(|&b| b != 0) {
                    return Err(bad("non-zero padding after IPv4 address"));
                }
                IpAddr::V4(Ipv4Addr::new(ip16[0], ip16[1], ip16[2], ip16[3]))
            }
            6 => IpAddr::V6(Ipv6Addr::from(ip16)),
            _ => return Err(bad("unknown address family")),
        };
        let port = u16::from_be_bytes([bytes[17], bytes[18]]);
        Ok(Self(SocketAddr::new(ip, port)))
    }
}

impl From<SocketAddr> for HopAddr {
    fn from(addr: SocketAddr) -> Self {
        Self(addr)
    }
}

/// Where a hop sends the packet after peeling.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Next {
    /// Forward the peeled header to the hop at this address.
    Hop(HopAddr),
    /// Deliver the result to the designer at `addr`.
    Deliver {
        /// The designer's address.
        addr: HopAddr,
        /// Echoed back so the designer can match the reply.
        reply_id: ReplyId,
    },
}

/// The routing information one hop learns: what the designer writes for it
/// and exactly what [`crate::Peeled::block`] gives back at that hop.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RoutingBlock {
    /// What to do.
    pub op: Op,
    /// Where to send the result.
    pub next: Next,
    /// Per-hop tag (same in a hop's forward and backward blocks of a batch).
    pub tag: HopTag,
}

const FLAG_NEW_SESSION: u8 = 1;
const NEXT_HOP: u8 = 0;
const NEXT_DELIVER: u8 = 1;
const OFF_ADDR: usize = 3;
const OFF_TAG: usize = OFF_ADDR + ADDR_LEN;
const OFF_MAC: usize = OFF_TAG + ID_LEN;
const OFF_PREFIX: usize = OFF_MAC + MAC_LEN;
const OFF_REPLY: usize = OFF_PREFIX + PREFIX_LEN;
const OFF_SESSION: usize = OFF_REPLY + ID_LEN;
const OFF_RESERVED: usize = OFF_SESSION + ID_LEN;
const _: () = assert!(OFF_RESERVED <= BLOCK_LEN);

/// A routing block with the fields the format adds for the hop's own use:
/// the next hop's MAC and prefix, and at init the hop's new session id.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct BlockPlaintext {
    /// What the designer wrote for this hop.
    pub block: RoutingBlock,
    /// MAC γ of the next hop's header (zero when delivering).
    pub next_mac: [u8; MAC_LEN],
    /// Prefix of the next hop's session header (zero at init and when delivering).
    pub next_prefix: [u8; PREFIX_LEN],
    /// The hop's new session id (init messages only).
    pub new_session: Option<SessionId>,
}

impl BlockPlaintext {
    /// Encodes to the fixed [`BLOCK_LEN`]-byte layout.
    pub fn encode(&self) -> [u8; BLOCK_LEN] {
        let mut out = [0u8; BLOCK_LEN];
        out[0] = self.block.op as u8;
        let (kind, addr) = match self.block.next {
            Next::Hop(addr) => (NEXT_HOP, addr),
            Next::Deliver { addr, reply_id } => {
                out[OFF_REPLY..OFF_SESSION].copy_from_slice(&reply_id.0);
                (NEXT_DELIVER, addr)
            }
        };
        out[1] = kind;
        out[OFF_ADDR..OFF_TAG].copy_from_slice(&addr.encode());
        out[OFF_TAG..OFF_MAC].copy_from_slice(&self.block.tag.0);
        out[OFF_MAC..OFF_PREFIX].copy_from_slice(&self.next_mac);
        out[OFF_PREFIX..OFF_REPLY].copy_from_slice(&self.next_prefix);
        if let Some(sid) = self.new_session {
            out[2] = FLAG_NEW_SESSION;
            out[OFF_SESSION..OFF_RESERVED].copy_from_slice(&sid.0);
        }
        out
    }

    /// Decodes a block; strict, so re-encoding gives back the same bytes.
    pub fn decode(bytes: &[u8; BLOCK_LEN]) -> Result<Self, WireError> {
        let bad = |reason| WireError::Malformed {
            what: "routing block",
            reason,
        };
        let op = Op::try_from(bytes[0])?;
        let flags = bytes[2];
        if flags & !FLAG_NEW_SESSION != 0 {
            return Err(bad("unknown flag"));
        }
        if bytes[OFF_RESERVED..].iter().any(|&b| b != 0) {
            return Err(bad("non-zero reserved bytes"));
        }
        let mut addr = [0u8; ADDR_LEN];
        addr.copy_from_slice(&bytes[OFF_ADDR..OFF_TAG]);
        let addr = HopAddr::decode(&addr)?;
        let reply = id_at(bytes, OFF_REPLY);
        let next = match bytes[1] {
            NEXT_HOP if reply == [0; ID_LEN] => Next::Hop(addr),
            NEXT_HOP => return Err(bad("reply id on a forwarding block")),
            NEXT_DELIVER => Next::Deliver {
                addr,
                reply_id: ReplyId(reply),
            },
            _ => return Err(bad("unknown next kind")),
        };
        let new_session = if flags & FLAG_NEW_SESSION != 0 {
            Some(SessionId(id_at(bytes, OFF_SESSION)))
        } else if id_at(bytes, OFF_SESSION) != [0; ID_LEN] {
            return Err(bad("session id without its flag"));
        } else {
            None
        };
        let mut next_mac = [0u8; MAC_LEN];
        next_mac.copy_from_slice(&bytes[OFF_MAC..OFF_PREFIX]);
        let mut next_prefix = [0u8; PREFIX_LEN];
        next_prefix.copy_from_slice(&bytes[OFF_PREFIX..OFF_REPLY]);
        Ok(Self {
            block: RoutingBlock {
                op,
                next,
                tag: HopTag(id_at(bytes, OFF_TAG)),
            },
            next_mac,
            next_prefix,
            new_session,
        })
    }
}

fn id_at(bytes: &[u8; BLOCK_LEN], off: usize) -> [u8; ID_LEN] {
    let mut id = [0u8; ID_LEN];
    id.copy_from_slice(&bytes[off..off + ID_LEN]);
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample(next: Next, new_session: Option<SessionId>) -> BlockPlaintext {
        BlockPlaintext {
            block: RoutingBlock {
                op: Op::Backward,
                next,
                tag: HopTag([7; ID_LEN]),
            },
            next_mac: [9; MAC_LEN],
            next_prefix: [3; PREFIX_LEN],
            new_session,
        }
    }

    #[test]
    fn block_round_trips_for_every_next_kind() {
        let v4 = HopAddr("10.1.2.3:7000".parse().unwrap());
        let v6 = HopAddr("[2001:db8::1]:443".parse().unwrap());
        for b in [
            sample(Next::Hop(v4), None),
            sample(Next::Hop(v6), Some(SessionId([5; ID_LEN]))),
            sample(
                Next::Deliver {
                    addr: v6,
                    reply_id: ReplyId([1; ID_LEN]),
                },
                None,
            ),
        ] {
            assert_eq!(BlockPlaintext::decode(&b.encode()).unwrap(), b);
        }
    }

    #[test]
    fn decode_rejects_unknown_op_and_reserved_bytes() {
        let mut raw = sample(Next::Hop(HopAddr("1.2.3.4:5".parse().unwrap())), None).encode();
        raw[BLOCK_LEN - 1] = 1;
        assert!(matches!(
            BlockPlaintext::decode(&raw),
            Err(WireError::Malformed { .. })
        ));
        raw[BLOCK_LEN - 1] = 0;
        raw[0] = 200;
        assert_eq!(
            BlockPlaintext::decode(&raw),
            Err(WireError::UnknownOp { byte: 200 })
        );
    }

    #[test]
    fn addr_decode_rejects_unknown_family_and_ipv4_padding() {
        let mut raw = HopAddr("1.2.3.4:5".parse().unwrap()).encode();
        raw[10] = 1;
        assert!(HopAddr::decode(&raw).is_err());
        raw[10] = 0;
        raw[0] = 5;
        assert!(HopAddr::decode(&raw).is_err());
    }

    #[test]
    fn op_bytes_match_the_paper() {
        assert_eq!(Op::Init as u8, 0);
        assert_eq!(Op::Forward as u8, 1);
        assert_eq!(Op::Backward as u8, 2);
        assert_eq!(Op::Test as u8, 3);
        for op in Op::ALL {
            assert_eq!(Op::try_from(op as u8), Ok(op));
        }
    }
}
