//! Where a session's messages may go: only to the addresses, with the link
//! keys, that its init note named: the previous hop (backward traffic),
//! the next hop (everything else that goes on) and the designer
//! (deliveries). Every routing block a hop peels must name one of them, so
//! a session cannot make the node connect anywhere else. Only the first and
//! the last hop of a cascade are told the designer's address (and key):
//! a middle hop has no place to deliver to. Kept in one place: a later
//! version may send deliveries back over the designer's own link.

use std::net::{IpAddr, SocketAddr};

use mixnn_proto::InitNote;
use mixnn_wire::Op;

use crate::error::NodeError;

/// One neighbour: where it is (if this hop may send to it) and the link
/// key it must prove.
#[derive(Debug, Clone, Copy)]
struct Peer {
    addr: Option<SocketAddr>,
    link: [u8; 32],
}

/// A session's neighbours, from its init note.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Routes {
    prev: Peer,
    next: Peer,
    designer: Peer,
}

/// An address a node may connect to: not unspecified, multicast or
/// broadcast, and not port 0. (Loopback and private addresses are fine:
/// cascades run there.)
fn usable(addr: SocketAddr) -> bool {
    let ip_ok = match addr.ip() {
        IpAddr::V4(ip) => !(ip.is_unspecified() || ip.is_multicast() || ip.is_broadcast()),
        IpAddr::V6(ip) => !(ip.is_unspecified() || ip.is_multicast()),
    };
    ip_ok && addr.port() != 0
}

impl Routes {
    /// The routes an init note names; refuses addresses no node should
    /// connect to.
    pub(crate) fn from_note(note: &InitNote) -> Result<Routes, NodeError> {
        for addr in [note.prev_addr, note.next_addr, note.designer_addr]
            .into_iter()
            .flatten()
        {
            if !usable(addr) {
                return Err(NodeError::Refused(
                    "init names a neighbour address no node connects to".into(),
                ));
            }
        }
        Ok(Routes {
            prev: Peer {
                addr: note.prev_addr,
                link: note.prev_link,
            },
            next: Peer {
                addr: note.next_addr,
                link: note.next_link,
            },
            designer: Peer {
                addr: note.designer_addr,
                link: note.designer_link,
            },
        })
    }

    /// Whether a link with key `key` may send this session's messages.
    pub(crate) fn is_neighbour(&self, key: &[u8; 32]) -> bool {
        // A middle hop's note names no designer (no address, a zero key):
        // then no link speaks for one.
        let designer = self.designer.addr.is_some() && *key == self.designer.link;
        designer || [self.prev.link, self.next.link].contains(key)
    }

    /// The link keys this session's messages may come over.
    pub(crate) fn keys(&self) -> impl Iterator<Item = [u8; 32]> + '_ {
        let designer = self.designer.addr.is_some().then_some(self.designer.link);
        [self.prev.link, self.next.link].into_iter().chain(designer)
    }

    /// The designer's link key (deliveries go to it).
    pub(crate) fn designer_key(&self) -> [u8; 32] {
        self.designer.link
    }

    /// Whether a message for the link key `key` goes on to the next hop
    /// (forward through the cascade).
    pub(crate) fn is_next(&self, key: &[u8; 32]) -> bool {
        self.next.addr.is_some() && self.next.link == *key
    }

    /// The link key of the hop that `op`, passed on to `addr`, goes to, if
    /// `addr` is where the init said that hop is: backward traffic goes
    /// back, forward, test, init and close traffic on, and loops and
    /// transfers (fetch, load, audit) either way (they go out to a hop and
    /// come back along the cascade to the first hop, which delivers).
    pub(crate) fn pass_on(&self, op: Op, addr: SocketAddr) -> Result<[u8; 32], NodeError> {
        let either = matches!(op, Op::Loop | Op::Fetch | Op::Load | Op::Audit);
        if either && self.prev.addr == Some(addr) {
            return Ok(self.prev.link);
        }
        let (peer, which) = if op == Op::Backward {
            (self.prev, "previous")
        } else if either {
            (self.next, "neighbour")
        } else {
            (self.next, "next")
        };
        if peer.addr != Some(addr) {
            return Err(NodeError::Refused(format!(
                "a routing block names a {which} hop other than the one the session's init named"
            )));
        }
        Ok(peer.link)
    }

    /// The designer's link key, if `addr` is where the init said the
    /// designer is.
    pub(crate) fn deliver(&self, addr: SocketAddr) -> Result<[u8; 32], NodeError> {
        if self.designer.addr != Some(addr) {
            return Err(NodeError::Refused(
                "a routing block delivers to an address other than the designer's in the session's init"
                    .into(),
            ));
        }
        Ok(self.designer.link)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mixnn_model::spec::StageSpec;
    use mixnn_model::stage::Sgd;
    use mixnn_wire::PaddingPolicy;

    fn note() -> InitNote {
        InitNote {
            arith: mixnn_model::arith::ARITH_VERSION,
            stage: StageSpec::identity(mixnn_model::spec::Shape::flat(4)),
            optimizer: Sgd::default().into(),
            seed: 0,
            start_step: 0,
            padding: PaddingPolicy::default(),
            issued_at: 0,
            prev_link: [1; 32],
            next_link: [2; 32],
            designer_link: [3; 32],
            prev_addr: Some("127.0.0.1:1001".parse().unwrap()),
            next_addr: Some("127.0.0.1:1002".parse().unwrap()),
            designer_addr: None,
            reply_key: [0x5e; 32],
            audit_key: None,
        }
    }

    #[test]
    fn only_the_named_neighbours_are_reachable() {
        let r = Routes::from_note(&note()).unwrap();
        let (prev, next) = note().prev_addr.zip(note().next_addr).unwrap();
        assert_eq!(r.pass_on(Op::Forward, next).unwrap(), [2; 32]);
        assert_eq!(r.pass_on(Op::Backward, prev).unwrap(), [1; 32]);
        assert!(r.pass_on(Op::Forward, prev).is_err());
        assert!(r
            .pass_on(Op::Loop, "127.0.0.1:22".parse().unwrap())
            .is_err());
        // Loops and transfers go either way, to the named neighbours only;
        // training passes one way.
        for op in [Op::Loop, Op::Fetch, Op::Load, Op::Audit] {
            assert_eq!(r.pass_on(op, prev).unwrap(), [1; 32]);
            assert_eq!(r.pass_on(op, next).unwrap(), [2; 32]);
        }
        for op in [Op::Forward, Op::Test, Op::Init, Op::Close] {
            assert!(r.pass_on(op, prev).is_err(), "{op:?}");
        }
        assert!(r.pass_on(Op::Backward, next).is_err());
        // No designer address (a middle hop): no delivery at all, and no
        // link speaks for the designer, whatever key the note holds.
        assert!(r.deliver(next).is_err());
        assert!(!r.is_neighbour(&[3; 32]) && !r.is_neighbour(&[4; 32]));
        assert!(r.is_neighbour(&[1; 32]) && r.is_neighbour(&[2; 32]));
        let end = Routes::from_note(&InitNote {
            designer_addr: Some("127.0.0.1:9000".parse().unwrap()),
            ..note()
        })
        .unwrap();
        assert!(end.is_neighbour(&[3; 32]));
        assert_eq!(
            end.deliver("127.0.0.1:9000".parse().unwrap()).unwrap(),
            [3; 32]
        );
    }

    #[test]
    fn addresses_no_node_connects_to_are_refused_at_init() {
        for bad in [
            "0.0.0.0:7000",
            "224.0.0.1:7000",
            "255.255.255.255:7000",
            "127.0.0.1:0",
        ] {
            let n = InitNote {
                designer_addr: Some(bad.parse().unwrap()),
                ..note()
            };
            assert!(Routes::from_note(&n).is_err(), "{bad}");
        }
    }
}
