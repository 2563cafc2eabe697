//! Training checkpoints on disk: what the designer needs to continue a run
//! exactly where it stopped (issue 7), and a directory that keeps the last
//! few of them.
//!
//! A checkpoint file is
//!
//! ```text
//! "MIXNNCKP" ‖ version u32 ‖ header_len u32 ‖ header (JSON)
//!   ‖ stage_count u32 ‖ per stage: steps u64 ‖ len u64 ‖ encode_params(tensors)
//!   ‖ SHA-256 of everything before it (32 bytes)
//! ```
//!
//! all integers little-endian. Every float in the header is stored as its
//! bit pattern, so a checkpoint round-trips bit for bit (a resumed run must
//! end with byte-identical weights). [`CheckpointDir::write`] replaces files
//! atomically (temp file, fsync, rename, fsync of the directory), and
//! [`CheckpointDir::latest`] skips a corrupt or truncated newest file in
//! favour of the one before, with a warning.

mod dir;
mod format;
pub mod fuzzing;

pub use dir::{file_name, CheckpointDir};
pub use format::{model_digest, Checkpoint, CheckpointError, Defect, MAGIC, VERSION};
