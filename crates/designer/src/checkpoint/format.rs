//! The checkpoint file format (see [`crate::checkpoint`]): encoding,
//! decoding every length bounded, and what can be wrong with a file.

use std::fmt;
use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use mixnn_model::arith::ARITH_VERSION;
use mixnn_model::stage::StageState;
use mixnn_model::trainer::{EpochMetrics, TrainConfig};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

/// First bytes of every checkpoint file.
pub const MAGIC: &[u8; 8] = b"MIXNNCKP";
/// The format version this code writes and reads (2: the header names the
/// arithmetic, `arith`; version 1 files were computed before
/// `docs/arithmetic.md` and cannot be continued bit for bit).
pub const VERSION: u32 = 2;
/// Length of the SHA-256 trailer.
const TRAILER: usize = 32;
/// Magic, version and header length.
const PREFIX: usize = MAGIC.len() + 4 + 4;
/// Path used in errors of [`Checkpoint::decode`], which has no file.
const MEMORY: &str = "<memory>";

/// Why a checkpoint file cannot be used.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Defect {
    /// The file does not start with [`MAGIC`].
    BadMagic,
    /// Written by another version of the format.
    UnsupportedVersion(u32),
    /// Computed with another arithmetic than this build's
    /// ([`mixnn_model::arith::ARITH_VERSION`]): continuing it would not
    /// give the run the checkpoint belongs to.
    OtherArith(u32),
    /// The file ends before its structure does (a torn write, a full disk).
    Truncated {
        /// Bytes present.
        len: usize,
    },
    /// The SHA-256 trailer does not match the contents.
    ChecksumMismatch,
    /// The checksum matches but the contents do not parse or do not add up.
    Malformed(String),
}

impl fmt::Display for Defect {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Defect::BadMagic => write!(f, "bad magic (not a MixNN checkpoint)"),
            Defect::UnsupportedVersion(v) => {
                write!(f, "unsupported version {v} (this build reads {VERSION})")
            }
            Defect::OtherArith(a) => write!(
                f,
                "computed with arith {a}, this build computes arith {ARITH_VERSION} (docs/arithmetic.md)"
            ),
            Defect::Truncated { len } => write!(f, "truncated ({len} bytes)"),
            Defect::ChecksumMismatch => write!(f, "checksum mismatch"),
            Defect::Malformed(reason) => write!(f, "malformed: {reason}"),
        }
    }
}

/// Why reading or writing checkpoints failed.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum CheckpointError {
    /// A file system operation failed.
    #[error("{}: {what}: {source}", path.display())]
    Io {
        /// The file or directory.
        path: PathBuf,
        /// The operation ("create directory", "read", …).
        what: &'static str,
        /// The OS error.
        source: io::Error,
    },
    /// A checkpoint file is damaged (`path` is `<memory>` for
    /// [`Checkpoint::decode`]).
    #[error("checkpoint {}: {defect}", path.display())]
    Corrupt {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        defect: Defect,
    },
    /// Checkpoint files exist but none of them can be used.
    #[error("no usable checkpoint in {}: {}", path.display(), problems.join("; "))]
    NoneUsable {
        /// The directory.
        path: PathBuf,
        /// One line per file, newest first.
        problems: Vec<String>,
    },
    /// The checkpoint does not belong to this run.
    #[error("checkpoint does not fit this run: {reason}")]
    Mismatch {
        /// What differs.
        reason: String,
    },
    /// The checkpoint to write contradicts itself.
    #[error("refusing to write an inconsistent checkpoint: {reason}")]
    Inconsistent {
        /// What does not add up.
        reason: String,
    },
    /// [`crate::checkpoint::CheckpointDir::open`] was asked to keep fewer than two files.
    #[error("checkpoint dir {}: keep must be at least 2 (got {keep}), so that a corrupt newest file has one to fall back on", path.display())]
    Keep {
        /// The directory.
        path: PathBuf,
        /// The count asked for.
        keep: usize,
    },
}

/// A training checkpoint: everything needed to continue a run exactly.
#[derive(Debug, Clone, PartialEq)]
pub struct Checkpoint {
    /// Updates applied (global step).
    pub step: u64,
    /// 0-based epoch the next step belongs to; equals `done_epochs.len()`.
    pub epoch: u32,
    /// Batches of that epoch already trained; equals `epoch_losses.len()`.
    pub position: usize,
    /// Losses of those batches, in order (round-trip bit for bit).
    pub epoch_losses: Vec<f32>,
    /// Metrics of the finished epochs.
    pub done_epochs: Vec<EpochMetrics>,
    /// The run's settings.
    pub config: TrainConfig,
    /// Model name.
    pub model: String,
    /// Hex SHA-256 of the model description ([`model_digest`]), to refuse a
    /// checkpoint of another model.
    pub model_digest: String,
    /// Every stage, in model order.
    pub stages: Vec<StageState>,
}

/// Hex SHA-256 of a model description, for [`Checkpoint::model_digest`].
pub fn model_digest(description: &[u8]) -> String {
    hex::encode(Sha256::digest(description))
}

/// The header as stored: floats as bit patterns, sizes as `u64`.
#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Header {
    arith: u32,
    step: u64,
    epoch: u32,
    position: u64,
    model: String,
    model_digest: String,
    config: ConfigRecord,
    done_epochs: Vec<EpochRecord>,
    epoch_losses: Vec<u32>,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct ConfigRecord {
    epochs: u32,
    batch: u64,
    /// The optimiser in its binary form (`Optimizer::encode`), hex.
    optimizer: String,
    /// The run's secret seed (64 hex digits): the designer keeps it, no
    /// hop ever sees it.
    seed: mixnn_model::seed::RunSeed,
    micro_batches: u64,
}

#[derive(Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct EpochRecord {
    epoch: u32,
    train_s_bits: u64,
    loss_bits: u64,
    test_acc_bits: u64,
}

impl Checkpoint {
    /// Serialises the checkpoint (format in the module docs).
    pub fn encode(&self) -> Vec<u8> {
        let c = &self.config;
        let header = Header {
            arith: ARITH_VERSION,
            step: self.step,
            epoch: self.epoch,
            position: self.position as u64,
            model: self.model.clone(),
            model_digest: self.model_digest.clone(),
            config: ConfigRecord {
                epochs: c.epochs,
                batch: c.batch as u64,
                optimizer: hex::encode(c.optimizer.encode()),
                seed: c.seed,
                micro_batches: c.micro_batches as u64,
            },
            done_epochs: self
                .done_epochs
                .iter()
                .map(|m| EpochRecord {
                    epoch: m.epoch,
                    train_s_bits: m.train_s.to_bits(),
                    loss_bits: m.loss.to_bits(),
                    test_acc_bits: m.test_acc.to_bits(),
                })
                .collect(),
            epoch_losses: self.epoch_losses.iter().map(|l| l.to_bits()).collect(),
        };
        // Invariant: the header holds only integers, strings and vectors of
        // integers, which serde_json always serialises.
        #[allow(clippy::expect_used)]
        let json = serde_json::to_vec(&header).expect("header serialises");
        let mut out = Vec::with_capacity(PREFIX + json.len() + 4 + TRAILER);
        out.extend_from_slice(MAGIC);
        out.extend_from_slice(&VERSION.to_le_bytes());
        out.extend_from_slice(&(json.len() as u32).to_le_bytes());
        out.extend_from_slice(&json);
        out.extend_from_slice(&(self.stages.len() as u32).to_le_bytes());
        for s in &self.stages {
            let params = mixnn_proto::encode_params(&s.tensors);
            out.extend_from_slice(&s.steps.to_le_bytes());
            out.extend_from_slice(&(params.len() as u64).to_le_bytes());
            out.extend_from_slice(&params);
        }
        let sum = Sha256::digest(&out);
        out.extend_from_slice(&sum);
        out
    }

    /// Parses [`Checkpoint::encode`] output: magic, version and checksum
    /// first, then every length bounded by the bytes left. Errors name the
    /// path `<memory>`.
    pub fn decode(bytes: &[u8]) -> Result<Checkpoint, CheckpointError> {
        decode_defect(bytes).map_err(|defect| CheckpointError::Corrupt {
            path: PathBuf::from(MEMORY),
            defect,
        })
    }

    /// Reads and decodes one checkpoint file.
    pub fn read(path: &Path) -> Result<Checkpoint, CheckpointError> {
        let bytes = fs::read(path).map_err(|source| CheckpointError::Io {
            path: path.to_path_buf(),
            what: "read",
            source,
        })?;
        decode_defect(&bytes).map_err(|defect| CheckpointError::Corrupt {
            path: path.to_path_buf(),
            defect,
        })
    }

    /// Refuses a checkpoint of another model (`digest` as [`model_digest`]).
    pub fn ensure_model(&self, digest: &str) -> Result<(), CheckpointError> {
        if self.model_digest == digest {
            return Ok(());
        }
        Err(CheckpointError::Mismatch {
            reason: format!(
                "it is of model '{}' (digest {}), this run's model has digest {}",
                self.model, self.model_digest, digest
            ),
        })
    }

    /// Refuses a checkpoint taken with other training settings.
    pub fn ensure_config(&self, config: &TrainConfig) -> Result<(), CheckpointError> {
        if self.config == *config {
            return Ok(());
        }
        Err(CheckpointError::Mismatch {
            reason: format!(
                "it was trained with {:?}, this run asks for {:?}",
                self.config, config
            ),
        })
    }

    /// Checks the counters against the lists they count.
    pub(crate) fn consistency(&self) -> Result<(), String> {
        if self.epoch_losses.len() != self.position {
            return Err(format!(
                "{} losses for position {}",
                self.epoch_losses.len(),
                self.position
            ));
        }
        if self.done_epochs.len() != self.epoch as usize {
            return Err(format!(
                "{} finished epochs for epoch {}",
                self.done_epochs.len(),
                self.epoch
            ));
        }
        Ok(())
    }
}

/// Bounds-checked little-endian reader over a checksummed body.
struct Reader<'a> {
    bytes: &'a [u8],
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if n > self.bytes.len() {
            return None;
        }
        let (head, rest) = self.bytes.split_at(n);
        self.bytes = rest;
        Some(head)
    }
    fn u32(&mut self) -> Option<u32> {
        let b = self.take(4)?;
        Some(u32::from_le_bytes([b[0], b[1], b[2], b[3]]))
    }
    fn u64(&mut self) -> Option<u64> {
        let mut a = [0u8; 8];
        a.copy_from_slice(self.take(8)?);
        Some(u64::from_le_bytes(a))
    }
    /// A length field, bounded by the bytes left.
    fn len_u64(&mut self) -> Option<usize> {
        usize::try_from(self.u64()?)
            .ok()
            .filter(|n| *n <= self.bytes.len())
    }
}

/// Whether the stage records of a body lie within it (`None` if a length
/// points past the end).
fn stages_fit(body: &[u8]) -> Option<()> {
    let mut r = Reader { bytes: body };
    let count = r.u32()?;
    for _ in 0..count {
        r.u64()?;
        let len = r.len_u64()?;
        r.take(len)?;
    }
    Some(())
}

pub(crate) fn decode_defect(bytes: &[u8]) -> Result<Checkpoint, Defect> {
    let truncated = Defect::Truncated { len: bytes.len() };
    if bytes.len() < MAGIC.len() {
        return Err(if MAGIC.starts_with(bytes) {
            truncated
        } else {
            Defect::BadMagic
        });
    }
    if &bytes[..MAGIC.len()] != MAGIC {
        return Err(Defect::BadMagic);
    }
    let mut r = Reader {
        bytes: &bytes[MAGIC.len()..],
    };
    let version = r.u32().ok_or(truncated.clone())?;
    if version != VERSION {
        return Err(Defect::UnsupportedVersion(version));
    }
    if bytes.len() < PREFIX + 4 + TRAILER {
        return Err(truncated);
    }
    let (signed, trailer) = bytes.split_at(bytes.len() - TRAILER);
    if Sha256::digest(signed).as_slice() != trailer {
        // Tell a short file from a flipped byte: a torn write leaves lengths
        // that point past the end.
        let mut r = Reader {
            bytes: &signed[MAGIC.len() + 4..],
        };
        let fits = r
            .u32()
            .and_then(|n| r.take(n as usize))
            .and_then(|_| stages_fit(r.bytes));
        return Err(if fits.is_none() {
            truncated
        } else {
            Defect::ChecksumMismatch
        });
    }

    // The checksum holds: what follows is what encode wrote, unless the file
    // was made by hand; parse it without trusting any length.
    let malformed = |s: &str| Defect::Malformed(s.to_string());
    let mut r = Reader {
        bytes: &signed[MAGIC.len() + 4..],
    };
    let header_len = r.u32().ok_or_else(|| malformed("no header length"))? as usize;
    let json = r
        .take(header_len)
        .ok_or_else(|| malformed("header length past the end"))?;
    let header: Header =
        serde_json::from_slice(json).map_err(|e| Defect::Malformed(format!("header: {e}")))?;
    if header.arith != ARITH_VERSION {
        return Err(Defect::OtherArith(header.arith));
    }
    let mut stages = Vec::new();
    let mut body = Reader { bytes: r.bytes };
    let count = body.u32().ok_or_else(|| malformed("no stage count"))? as usize;
    for i in 0..count {
        let (steps, len) = match (body.u64(), body.len_u64()) {
            (Some(s), Some(l)) => (s, l),
            _ => return Err(Defect::Malformed(format!("stage {i} past the end"))),
        };
        let raw = body
            .take(len)
            .ok_or_else(|| Defect::Malformed(format!("stage {i} past the end")))?;
        let tensors = mixnn_proto::decode_params(raw)
            .map_err(|e| Defect::Malformed(format!("stage {i}: {e}")))?;
        stages.push(StageState { steps, tensors });
    }
    if !body.bytes.is_empty() {
        return Err(Defect::Malformed(format!(
            "{} bytes after the last stage",
            body.bytes.len()
        )));
    }
    let too_big = |what: &str| Defect::Malformed(format!("{what} does not fit in usize"));
    let c = header.config;
    let checkpoint = Checkpoint {
        step: header.step,
        epoch: header.epoch,
        position: usize::try_from(header.position).map_err(|_| too_big("position"))?,
        epoch_losses: header
            .epoch_losses
            .into_iter()
            .map(f32::from_bits)
            .collect(),
        done_epochs: header
            .done_epochs
            .into_iter()
            .map(|m| EpochMetrics {
                epoch: m.epoch,
                train_s: f64::from_bits(m.train_s_bits),
                loss: f64::from_bits(m.loss_bits),
                test_acc: f64::from_bits(m.test_acc_bits),
            })
            .collect(),
        config: TrainConfig {
            epochs: c.epochs,
            batch: usize::try_from(c.batch).map_err(|_| too_big("batch"))?,
            optimizer: decode_optimizer(&c.optimizer).map_err(Defect::Malformed)?,
            seed: c.seed,
            micro_batches: usize::try_from(c.micro_batches)
                .map_err(|_| too_big("micro_batches"))?,
        },
        model: header.model,
        model_digest: header.model_digest,
        stages,
    };
    checkpoint.consistency().map_err(Defect::Malformed)?;
    Ok(checkpoint)
}

fn decode_optimizer(text: &str) -> std::result::Result<mixnn_model::optim::Optimizer, String> {
    let bytes = hex::decode(text).map_err(|e| format!("optimiser: {e}"))?;
    match mixnn_model::optim::Optimizer::decode(&bytes) {
        Ok((opt, used)) if used == bytes.len() => Ok(opt),
        Ok(_) => Err("optimiser: trailing bytes".into()),
        Err(e) => Err(format!("optimiser: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stages_fit_rejects_lengths_past_the_end() {
        let mut body = 1u32.to_le_bytes().to_vec();
        body.extend_from_slice(&5u64.to_le_bytes());
        body.extend_from_slice(&3u64.to_le_bytes());
        assert_eq!(stages_fit(&body), None);
        body.extend_from_slice(&[1, 2, 3]);
        assert_eq!(stages_fit(&body), Some(()));
        let mut huge = u32::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(&[0; 16]);
        assert_eq!(stages_fit(&huge), None);
    }

    #[test]
    fn defects_read_as_one_line() {
        assert_eq!(Defect::ChecksumMismatch.to_string(), "checksum mismatch");
        assert_eq!(
            Defect::Truncated { len: 9 }.to_string(),
            "truncated (9 bytes)"
        );
        assert_eq!(
            Defect::UnsupportedVersion(7).to_string(),
            "unsupported version 7 (this build reads 2)"
        );
        let e = CheckpointError::Corrupt {
            path: PathBuf::from("/d/step-0000000001.ckpt"),
            defect: Defect::BadMagic,
        };
        assert_eq!(
            e.to_string(),
            "checkpoint /d/step-0000000001.ckpt: bad magic (not a MixNN checkpoint)"
        );
    }
}
