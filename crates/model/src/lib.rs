//! MixNN's model side, pure (no sockets): the model description, the stage
//! engine every node runs, IDX data, and the deterministic single-process
//! trainer that every cascade run is compared with bit for bit.
//!
//! - [`spec`]: a model is a list of stages, a stage a list of ops (TOML).
//! - [`arith`]: the arithmetic every node computes bit for bit on any CPU
//!   (`docs/arithmetic.md`, [`arith::ARITH_VERSION`]): matrix kernels with a
//!   fixed order of operations, `exp`/`ln` without libm, the self-test.
//! - [`stage`]: forward/backward of one stage, with explicit per-op
//!   gradients (`layer`) and the optimisers ([`optim`]).
//! - [`tensor_bytes`]: the only form in which activations and gradients
//!   cross a stage boundary (shape + little-endian bytes).
//! - [`data`]: IDX files and the seeded batch order.
//! - [`trainer`]: the training loop shared by local and cascade runs.
//! - [`weights`]: safetensors export named by stage and op.
//!
//! ```
//! use mixnn_model::{seed::RunSeed, spec::ModelSpec, stage::Sgd, trainer::{LocalModel, Batch}};
//! let model = ModelSpec::parse(
//!     "input = 4\n[[stage]]\nops = [{ op = \"linear\", in = 4, out = 3 }]\n\
//!      [[stage]]\nops = [{ op = \"log_softmax\" }, { op = \"nll_loss\" }]\n",
//!     "example",
//! ).unwrap();
//! let mut local = LocalModel::new(&model, &RunSeed::from_number(42), Sgd::default());
//! let batch = Batch { pixels: vec![0, 64, 128, 255, 255, 128, 64, 0], labels: vec![0, 2], rows: 2 };
//! let loss = local.train_step(&batch).unwrap();
//! assert!(loss > 0.0);
//! ```

pub mod arith;
pub mod data;
pub mod error;
pub mod fuzzing;
pub mod init;
pub(crate) mod layer;
pub mod optim;
pub mod seed;
pub mod selftest;
pub mod spec;
pub mod stage;
pub mod tensor_bytes;
pub mod trainer;
pub mod weights;

pub use error::{ModelError, Result};
