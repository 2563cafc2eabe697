//! The arithmetic every node must compute: version [`ARITH_VERSION`] of
//! `docs/arithmetic.md`.
//!
//! The designer audits a hop by re-running its step and comparing bits, and
//! a cascade must end with the weights one process computes, so the
//! arithmetic is part of the protocol, like the wire format. Every output
//! value is a fixed sequence of IEEE-754 binary32 operations (round to
//! nearest even, no fused multiply-add, gradual underflow, NaNs made
//! canonical where they leave a stage): nothing depends on the instruction
//! set, vector width, cache sizes, thread count, alignment or allocator.
//!
//! - [`matrix`]: the engine's one tensor type.
//! - [`gemm`]: matrix products, one sequential reduction per output,
//!   vectorised across outputs.
//! - [`dispatch`]: which kernel path runs them (the fastest, timed at
//!   start, or `MIXNN_KERNELS`).
//! - [`threads`]: how many threads share the outputs (`MIXNN_THREADS`).
//! - [`math`]: `exp` and `ln` without libm.
//! - [`ops`]: the elementwise ops, `linear`, the loss, SGD.
//! - [`conv`], [`pool`], [`norm`]: `conv2d`, pooling, `batch_norm2d`.

pub mod conv;
pub mod dispatch;
pub mod gemm;
pub mod math;
pub mod matrix;
pub mod norm;
pub mod ops;
pub mod pool;
pub mod threads;

pub use dispatch::{KernelPath, ALL_PATHS};
pub use matrix::Matrix;

/// The version of `docs/arithmetic.md` this engine implements. Nodes and
/// designers that compute different versions cannot be in one cascade:
/// descriptors, init notes and checkpoints carry it.
pub const ARITH_VERSION: u32 = 2;
