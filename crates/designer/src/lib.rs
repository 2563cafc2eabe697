//! MixNN designer: the model owner's side. Builds onions and drives init /
//! forward / backward / test through a cascade of nodes
//! ([`runner::CascadeRunner`]), which plugs into the same training loop as
//! the single-process trainer (`mixnn_model::trainer::run_training`), so
//! both runs see the same batches in the same order and can be compared
//! bit for bit.

pub mod cascade;
pub mod checkpoint;
pub mod directory;
mod error;
pub mod runner;

pub use cascade::{CascadeFile, HopInfo};
pub use error::DesignerError;
pub use runner::{CascadeOptions, CascadeRunner, Replacements, Spares};
