//! How the designer runs a cascade: typed options, with no "0 means off"
//! and no booleans that only make sense in pairs.

use std::net::SocketAddr;
use std::num::NonZeroU64;
use std::str::FromStr;
use std::time::Duration;

use mixnn_model::spec::ModelSpec;
use mixnn_net::pacing::LinkPace;
pub use mixnn_net::pacing::Rate;

use crate::checkpoint::CheckpointDir;

/// Which stages the designer runs in its own process (paper §5.1–5.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Keep {
    /// Every stage runs on a hop.
    #[default]
    None,
    /// The first stage runs in the designer (§5.2: no hop sees the data).
    First,
    /// The last stage runs in the designer (§5.1: no hop sees the labels).
    Last,
    /// Both.
    Both,
}

impl Keep {
    /// From the two flags.
    pub fn from_flags(first: bool, last: bool) -> Keep {
        match (first, last) {
            (false, false) => Keep::None,
            (true, false) => Keep::First,
            (false, true) => Keep::Last,
            (true, true) => Keep::Both,
        }
    }

    /// The first stage is kept.
    pub fn first(self) -> bool {
        matches!(self, Keep::First | Keep::Both)
    }

    /// The last stage is kept.
    pub fn last(self) -> bool {
        matches!(self, Keep::Last | Keep::Both)
    }

    /// Stages kept (0, 1 or 2).
    pub fn count(self) -> usize {
        usize::from(self.first()) + usize::from(self.last())
    }
}

impl FromStr for Keep {
    type Err = String;

    /// `first`, `last`, `first,last` (either order); empty keeps nothing.
    fn from_str(s: &str) -> Result<Keep, String> {
        let (mut first, mut last) = (false, false);
        for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            match part {
                "first" => first = true,
                "last" => last = true,
                other => {
                    return Err(format!(
                        "--keep takes first, last or first,last, not {other:?}"
                    ))
                }
            }
        }
        Ok(Keep::from_flags(first, last))
    }
}

/// How messages are padded on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Padding {
    /// Every message as large as the cascade's largest (the paper's rule).
    #[default]
    Uniform,
    /// Power-of-two size classes.
    Classes,
}

impl FromStr for Padding {
    type Err = String;

    fn from_str(s: &str) -> Result<Padding, String> {
        match s {
            "uniform" => Ok(Padding::Uniform),
            "classes" => Ok(Padding::Classes),
            other => Err(format!("--padding takes uniform or classes, not {other:?}")),
        }
    }
}

/// A probability in (0, 1]: how often the designer audits a given hop in
/// a given step. Audits that may be off are an `Option<AuditRate>`.
#[derive(Debug, Clone, Copy, PartialEq, PartialOrd)]
pub struct AuditRate(f64);

impl AuditRate {
    /// `p` if it is in (0, 1].
    pub fn new(p: f64) -> Option<AuditRate> {
        (p > 0.0 && p <= 1.0).then_some(AuditRate(p))
    }

    /// From a command line where 0 turns audits off: `Err` outside [0, 1].
    pub fn or_off(p: f64) -> Result<Option<AuditRate>, String> {
        if p == 0.0 {
            return Ok(None);
        }
        AuditRate::new(p)
            .map(Some)
            .ok_or_else(|| format!("audit rate {p} is not a probability"))
    }

    /// The probability.
    pub fn probability(self) -> f64 {
        self.0
    }
}

/// Constant-rate links into the cascade ([`mixnn_net::pacing`]).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct LinkPacing {
    /// Messages per second on each of the designer's links.
    pub rate: Rate,
    /// Random offset of each message within its slot, as a fraction of the
    /// period, in [0, 1] ([`LinkPace::jitter`]).
    pub jitter: f64,
}

impl LinkPacing {
    /// The pacing of a link.
    pub fn pace(self) -> Option<LinkPace> {
        LinkPace::new(self.rate.per_second(), self.jitter)
    }
}

/// How the designer runs a cascade.
#[derive(Debug, Clone)]
pub struct CascadeOptions {
    /// Stages run in the designer process.
    pub keep: Keep,
    /// Training steps in flight at once (at least 1; a kept first stage
    /// runs one at a time).
    pub window: usize,
    /// Time bound T on any answer from the cascade.
    pub timeout: Duration,
    /// How messages are padded.
    pub padding: Padding,
    /// Address the designer listens on for the first hop's deliveries;
    /// the last hop delivers to the next port (any free port when this
    /// names port 0), so the two ends share no address of the designer.
    pub listen: SocketAddr,
    /// Positions (in the cascade's hop list) of dummy hops: they run an
    /// identity stage, see and send the same cells as real hops, and
    /// change nothing in the result (paper §2.2).
    pub dummies: Vec<usize>,
    /// Loops (Poisson) the designer sends through the whole cascade and
    /// back while it runs; a loop not back within the detection bound
    /// fails the run (see [`crate::plan::loops`]).
    pub loop_rate: Option<Rate>,
    /// Audits of Byzantine hops: the probability that the designer audits
    /// a given hop (with parameters) for a given step; `None` turns
    /// commitments and audits off (see [`crate::plan::audit`]). Needs one
    /// micro-batch per step.
    pub audit_rate: Option<AuditRate>,
    /// Seed of the audit draws, for tests; `None` (the default) draws it
    /// from the OS, so that no node can predict which steps are audited.
    pub audit_seed: Option<u64>,
    /// Constant-rate links to the first and the last hop; `None` sends
    /// each message at once.
    pub link_pacing: Option<LinkPacing>,
}

impl Default for CascadeOptions {
    fn default() -> Self {
        CascadeOptions {
            keep: Keep::None,
            window: 4,
            timeout: Duration::from_secs(10),
            padding: Padding::Uniform,
            listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            dummies: Vec::new(),
            loop_rate: None,
            audit_rate: None,
            audit_seed: None,
            link_pacing: None,
        }
    }
}

impl CascadeOptions {
    /// Stages of `model` that run on hops (dummies not counted).
    pub fn remote_stages(&self, model: &ModelSpec) -> usize {
        model.stages.len().saturating_sub(self.keep.count())
    }
}

/// When the designer takes checkpoints (paper §4.1).
#[derive(Debug, Clone)]
pub struct Checkpoints {
    /// Where they are written; `None` keeps them in memory only.
    pub dir: Option<CheckpointDir>,
    /// A checkpoint every this many steps, besides those at the start and
    /// at the end of each epoch's training; `None`: only those.
    pub every: Option<NonZeroU64>,
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    #[test]
    fn keep_parses_what_the_command_line_takes() {
        assert_eq!("".parse::<Keep>().unwrap(), Keep::None);
        assert_eq!("first".parse::<Keep>().unwrap(), Keep::First);
        assert_eq!(" last ".parse::<Keep>().unwrap(), Keep::Last);
        assert_eq!("last,first".parse::<Keep>().unwrap(), Keep::Both);
        assert_eq!(Keep::Both.count(), 2);
        assert!("middle".parse::<Keep>().unwrap_err().contains("\"middle\""));
    }

    #[test]
    fn rates_are_positive_or_off() {
        assert_eq!(Rate::or_off(0.0).unwrap(), None);
        assert_eq!(Rate::or_off(2.5).unwrap().unwrap().per_second(), 2.5);
        assert!(Rate::or_off(-1.0).is_err());
        assert!(Rate::or_off(f64::INFINITY).is_err());
        assert!(Rate::new(f64::NAN).is_none());
        assert_eq!(AuditRate::or_off(0.0).unwrap(), None);
        assert!(AuditRate::or_off(1.5).is_err());
        assert!(AuditRate::new(1.0).is_some());
    }

    #[test]
    fn padding_parses_its_two_names() {
        assert_eq!("classes".parse::<Padding>().unwrap(), Padding::Classes);
        assert!("fixed".parse::<Padding>().is_err());
    }
}
