//! Where replacement nodes come from when a hop fails: a fixed list of
//! spares ([`Spares`]), or the directories
//! ([`crate::directory::DirectoryReplacements`]).

use std::collections::VecDeque;

use crate::cascade::HopInfo;
use crate::error::DesignerError;

/// Where replacement nodes come from when a hop fails.
pub trait Replacements: Send {
    /// One new node for each of `failed`, none of them in `in_use` (the
    /// rest of the cascade) nor one that failed before.
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError>;

    /// A failure the designer observed (a directory records it against the
    /// node). Nothing by default.
    fn report(&mut self, _failed: &HopInfo, _step: u64, _reason: &str) {}
}

/// Replacements from a fixed list of spare nodes, used in order.
#[derive(Debug, Clone)]
pub struct Spares {
    spares: VecDeque<HopInfo>,
}

impl Spares {
    /// Spare nodes, in the order they are to be used.
    pub fn new(spares: Vec<HopInfo>) -> Self {
        Spares {
            spares: spares.into(),
        }
    }
}

impl Replacements for Spares {
    fn replace(
        &mut self,
        failed: &[HopInfo],
        in_use: &[HopInfo],
    ) -> Result<Vec<HopInfo>, DesignerError> {
        let mut out = Vec::with_capacity(failed.len());
        for f in failed {
            loop {
                let Some(s) = self.spares.pop_front() else {
                    return Err(DesignerError::Config {
                        message: format!("no spare node left to replace {}", f.addr),
                    });
                };
                if !in_use.contains(&s) && !failed.contains(&s) {
                    out.push(s);
                    break;
                }
            }
        }
        Ok(out)
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]

    use super::*;

    fn hop(port: u16) -> HopInfo {
        HopInfo {
            addr: ([127, 0, 0, 1], port).into(),
            onion: "00".repeat(32),
            link: "00".repeat(32),
            arith: 1,
        }
    }

    #[test]
    fn spares_skip_nodes_in_use_and_run_out_with_a_clear_error() {
        let mut s = Spares::new(vec![hop(2), hop(3), hop(4)]);
        // Hop 2 is in the cascade already: 3 replaces 1.
        assert_eq!(s.replace(&[hop(1)], &[hop(2)]).unwrap(), vec![hop(3)]);
        assert_eq!(s.replace(&[hop(5)], &[]).unwrap(), vec![hop(4)]);
        let err = s.replace(&[hop(6)], &[]).unwrap_err().to_string();
        assert!(
            err.contains("no spare node left to replace 127.0.0.1:6"),
            "{err}"
        );
    }
}
