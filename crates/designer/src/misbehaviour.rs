//! "This hop misbehaved": the one error every check of what a hop sends
//! ends in ([`crate::DesignerError::Misbehaved`]), with what was found,
//! at which step, and whom it can be pinned on ([`Culprit`]).
//!
//! The designer only blames what it can prove. A value a hop wrote
//! itself (its own slot, under a key only it and the designer hold; a
//! sealed body that opens under its reply key; a delivery from an end of
//! the cascade, which only that end can make) that contradicts another
//! such value, the designer's own records or a re-execution is that
//! hop's doing: [`Culprit::Hop`], replaced and reported. What passed
//! between two hops (one says it sent X, the next that it received Y; a
//! trailer layer spoiled in the next hop's hands) can be either one's
//! lie, and no third party can tell which: [`Culprit::Pair`]. A sealed
//! transfer that does not open was changed by its hop or by one of the
//! hops that relayed it: [`Culprit::Route`]. Neither of the last two is
//! replaced or reported: the run goes back to a checkpoint and tries
//! again, and stops, naming the suspects, if the same ones are found
//! again (see `runner`).

use std::fmt;
use std::net::SocketAddr;

/// Whom a misbehaviour is pinned on (positions in the cascade).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Culprit {
    /// This hop, and no other, could have done it.
    Hop(usize),
    /// One of these two adjacent hops: the first sent, the second
    /// received, and they disagree on what passed.
    Pair(usize, usize),
    /// Hop `hop` (≥ 1) or one of the hops that relayed its transfer
    /// (`0..hop`).
    Route {
        /// The hop the transfer was from or for.
        hop: usize,
    },
}

impl Culprit {
    /// The one hop it is pinned on, if it is pinned on one.
    pub fn hop(self) -> Option<usize> {
        match self {
            Culprit::Hop(j) => Some(j),
            _ => None,
        }
    }

    /// Every hop that may have done it.
    pub fn suspects(self) -> Vec<usize> {
        match self {
            Culprit::Hop(j) => vec![j],
            Culprit::Pair(a, b) => vec![a, b],
            Culprit::Route { hop } => (0..=hop).collect(),
        }
    }
}

impl fmt::Display for Culprit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Culprit::Hop(j) => write!(f, "hop {j}"),
            Culprit::Pair(a, b) => write!(f, "hop {a} or hop {b}"),
            Culprit::Route { hop } => write!(f, "hop {hop} or a hop relaying it (0..{hop})"),
        }
    }
}

/// What a hop did wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum MisbehaviourKind {
    /// Its opening of a step does not match what its slots said, the
    /// re-execution does not reproduce it, or it refused to open.
    Audit,
    /// The state a step ran on is not the state it (or the designer's
    /// load) left: its state digests do not chain.
    Chain,
    /// A state it handed over is not the state it committed to.
    FalseState,
    /// What one side says passed between two hops (or between a hop and
    /// the designer) is not what the other side says.
    Boundary,
    /// A trailer layer that does not verify.
    Trailer,
    /// An answer that does not parse or does not fit what was asked
    /// (a short trailer, a tensor that does not decode, a chunk beyond
    /// the announced total, a sealed body that does not open).
    Malformed,
    /// Something it was not asked for, or more than it may send.
    Unsolicited,
}

impl MisbehaviourKind {
    /// Whether the hop's state, and so every step from the one found, is
    /// suspect: the run goes back to a checkpoint before that step that a
    /// local re-execution reproduces. Otherwise only an answer was bad,
    /// and the last checkpoint is good.
    pub fn taints_state(self) -> bool {
        matches!(
            self,
            MisbehaviourKind::Audit
                | MisbehaviourKind::Chain
                | MisbehaviourKind::Boundary
                | MisbehaviourKind::Trailer
        )
    }

    fn words(self) -> &'static str {
        match self {
            MisbehaviourKind::Audit => "audit failed",
            MisbehaviourKind::Chain => "state changed between steps",
            MisbehaviourKind::FalseState => "false state",
            MisbehaviourKind::Boundary => "boundary",
            MisbehaviourKind::Trailer => "trailer",
            MisbehaviourKind::Malformed => "malformed answer",
            MisbehaviourKind::Unsolicited => "unsolicited",
        }
    }
}

impl fmt::Display for MisbehaviourKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.words())
    }
}

/// One misbehaviour found: by whom, of what kind, at which step, why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Misbehaviour {
    /// Whom it is pinned on.
    pub culprit: Culprit,
    /// The addresses of [`Culprit::suspects`], in the same order (from
    /// the designer's own cascade).
    pub addrs: Vec<SocketAddr>,
    /// The step concerned (the first step known bad when the kind
    /// [taints the state](MisbehaviourKind::taints_state)).
    pub step: u64,
    /// What was found.
    pub kind: MisbehaviourKind,
    /// In words, for the error and the log.
    pub reason: String,
}

impl Misbehaviour {
    /// A misbehaviour pinned on `culprit` (addresses filled in later by
    /// [`Misbehaviour::at`]).
    pub fn new(
        culprit: Culprit,
        step: u64,
        kind: MisbehaviourKind,
        reason: impl Into<String>,
    ) -> Self {
        Misbehaviour {
            culprit,
            addrs: Vec::new(),
            step,
            kind,
            reason: reason.into(),
        }
    }

    /// The same, with the suspects' addresses from `hops` (the cascade's,
    /// in position order).
    pub fn at(mut self, hops: &[SocketAddr]) -> Self {
        self.addrs = self
            .culprit
            .suspects()
            .iter()
            .filter_map(|j| hops.get(*j).copied())
            .collect();
        self
    }

    /// The hop it is pinned on, if one.
    pub fn blamed(&self) -> Option<usize> {
        self.culprit.hop()
    }
}

impl fmt::Display for Misbehaviour {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}", self.culprit)?;
        if !self.addrs.is_empty() {
            let addrs: Vec<String> = self.addrs.iter().map(ToString::to_string).collect();
            write!(f, " ({})", addrs.join(", "))?;
        }
        write!(
            f,
            " misbehaved at step {} ({}): {}",
            self.step, self.kind, self.reason
        )?;
        if self.culprit.hop().is_none() {
            write!(f, "; it cannot be pinned on one hop, so none is replaced")?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_misbehaviour_names_its_suspects_and_whether_one_is_blamed() {
        let hops: Vec<SocketAddr> = (1..=4)
            .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
            .collect();
        let m = Misbehaviour::new(Culprit::Hop(2), 7, MisbehaviourKind::Audit, "x").at(&hops);
        assert_eq!(m.blamed(), Some(2));
        assert_eq!(
            m.to_string(),
            "hop 2 (127.0.0.1:3) misbehaved at step 7 (audit failed): x"
        );
        let p =
            Misbehaviour::new(Culprit::Pair(1, 2), 3, MisbehaviourKind::Boundary, "y").at(&hops);
        assert_eq!(p.blamed(), None);
        assert_eq!(p.addrs.len(), 2);
        assert!(p.to_string().contains("none is replaced"), "{p}");
        assert_eq!(Culprit::Route { hop: 2 }.suspects(), vec![0, 1, 2]);
        assert!(MisbehaviourKind::Chain.taints_state());
        assert!(!MisbehaviourKind::Malformed.taints_state());
    }
}
