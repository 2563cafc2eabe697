//! Where checkpoints go once taken: kept in memory by the policy
//! ([`Checkpoints`]) and, with a checkpoint directory, written to disk
//! ([`CheckpointDir::write`]). The I/O half of checkpointing.

use std::time::Instant;

use crate::checkpoint::{Checkpoint, CheckpointDir};
use crate::error::DesignerError;
use crate::plan::recovery::Checkpoints;

/// The checkpoint policy, the directory, and how long checkpoints took.
#[derive(Debug)]
pub struct Saver {
    /// What to keep and when.
    pub policy: Checkpoints,
    dir: Option<CheckpointDir>,
    seconds: Vec<f64>,
}

impl Saver {
    /// Checkpoints as `policy` says, written to `dir` when given.
    pub fn new(policy: Checkpoints, dir: Option<CheckpointDir>) -> Self {
        Saver {
            policy,
            dir,
            seconds: Vec::new(),
        }
    }

    /// Writes `c` (with a directory) and keeps it; `started` is when its
    /// fetch began.
    pub fn save(&mut self, c: Checkpoint, started: Instant) -> Result<(), DesignerError> {
        if let Some(dir) = &self.dir {
            let path = dir.write(&c)?;
            tracing::info!(step = c.step, path = %path.display(), "checkpoint written");
        }
        self.policy.keep(c);
        self.seconds.push(started.elapsed().as_secs_f64());
        Ok(())
    }

    /// Seconds each checkpoint took (fetch and write).
    pub fn seconds(&self) -> &[f64] {
        &self.seconds
    }
}
