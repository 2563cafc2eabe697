//! MixNN designer: the model owner's side. It cuts the model into stages,
//! builds the onions that drive init / forward / backward / test through a
//! cascade of nodes, and plugs into the same training loop as the
//! single-process trainer (`mixnn_model::trainer::run_training`), so both
//! runs see the same batches in the same order and can be compared bit for
//! bit.
//!
//! Like the node (a pure `core` and an I/O `lib`), the designer is a pure
//! planning layer under a thin I/O layer:
//!
//! ```text
//!  run            the run's wiring: checkpoints on disk, resume, replacements, post-run checks
//!   └ runner      CascadeRunner: recovery across sessions; StepRunner for the training loop
//!      └ session  one session: init, steps in flight, tests, fetches, loads, audits; kept stages
//!         └ exchange   send a route, wait for replies (loops while waiting), transfers, probes
//!            ├ driver  runtime, listener and accept loop, the two links, deadlines   (I/O)
//!            └ plan    layout, route, pending, window, transfer, loops, audit, ledger, opening, recovery   (pure)
//! ```
//!
//! [`plan`] holds every decision and is tested without sockets; everything
//! above it strings decisions and I/O together in order. Every check of
//! what a hop sends ends in one error, [`DesignerError::Misbehaved`]
//! ([`Misbehaviour`]: whom it is pinned on, [`Culprit`]; what, [`MisbehaviourKind`]).
//!
//! # Example
//!
//! ```no_run
//! # fn demo(model: mixnn_model::spec::ModelSpec, hops: Vec<mixnn_designer::HopInfo>,
//! #         train: mixnn_model::data::Dataset, test: mixnn_model::data::Dataset)
//! #         -> Result<(), mixnn_designer::DesignerError> {
//! use mixnn_designer::{CascadeOptions, CascadeRunner, Keep};
//! use mixnn_model::trainer::{run_training, Quiet, TrainConfig};
//!
//! let cfg = TrainConfig::default();
//! let opts = CascadeOptions { keep: Keep::Last, ..CascadeOptions::default() };
//! let mut runner = CascadeRunner::builder(&model, &cfg, hops).options(opts).connect()?;
//! let (metrics, weights) = run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet)?;
//! # let _ = (metrics, weights);
//! # Ok(())
//! # }
//! ```

pub mod cascade;
pub mod checkpoint;
pub mod directory;
mod driver;
mod error;
mod exchange;
mod misbehaviour;
pub mod options;
pub mod plan;
pub mod replacements;
pub mod run;
pub mod runner;
mod saver;
mod session;

pub use cascade::{CascadeFile, HopInfo};
pub use error::{BadReply, DesignerError, RecoveryError};
pub use misbehaviour::{Culprit, Misbehaviour, MisbehaviourKind};
pub use options::{AuditRate, CascadeOptions, Checkpoints, Keep, LinkPacing, Padding, Rate};
pub use plan::audit::{AuditStats, ACCURACY_DROP};
pub use plan::loops::LoopStats;
pub use plan::pending::{Await, Expected};
pub use plan::recovery::RecoveryEvent;
pub use replacements::{Replacements, Spares};
pub use runner::{CascadeBuilder, CascadeRunner};
