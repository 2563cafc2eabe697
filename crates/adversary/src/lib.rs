//! MixNN's adversary simulator: what colluding hops can rebuild of the
//! designer's model from what they saw while it trained (issue #28; the
//! paper's Theorem 1 and §4.3, measured). Pure: record files and tensors
//! in, surrogates and scores out; no sockets.
//!
//! Nodes built with the `adversary` feature write down everything they
//! see of the model (`mixnn node --record-tensors FILE`, the format in
//! [`mixnn_proto::observed`]). This crate reads those records back
//! ([`view`]), plans the surrogate a set of colluders can assemble with
//! what they know ([`plan`]: positions known or not), fills the stages
//! they do not hold by the attacks of [`attack`] on the stage engine of
//! `mixnn-model` ([`chain`]), and scores each surrogate on images that
//! never went through the cascade: test accuracy, and agreement with the
//! designer's model. [`report`] gathers a sweep over colluding sets into
//! the extraction curve. `mixnn adversary` runs the cascades and drives
//! all of it; `docs/threat-model/extraction.md` describes the attacks.
//!
//! ```
//! use mixnn_adversary::report::{sweep_sets, SetKind};
//! // Five hops: 14 contiguous sets, hops {2, 4}, and both ends.
//! let sets = sweep_sets(5);
//! assert_eq!(sets.len(), 16);
//! assert!(sets.contains(&(SetKind::Alternating, vec![1, 3])));
//! ```

pub mod attack;
pub mod chain;
pub mod data;
pub mod error;
pub mod plan;
pub mod report;
pub mod view;

pub use attack::{Aux, Budgets, Inversion, Outcome, Scene, Score};
pub use error::{AdversaryError, Result};
pub use plan::{Positions, Truth, Unit};
