//! Which compiled kernel path runs the matrix products.
//!
//! Every path computes the same function (the order of operations of
//! [`super::gemm`]); they differ only in how many outputs they compute per
//! instruction. The best path the CPU supports is chosen once; the
//! environment variable `MIXNN_KERNELS=scalar|sse2|avx2|avx512|neon` forces
//! one (an unknown or unsupported name is an error from
//! [`configure_from_env`]), and [`with_path`] forces one for the current
//! thread (tests, the self-test).

use std::cell::Cell;
use std::fmt;
use std::sync::OnceLock;

use crate::arith::gemm::{self, SoftFma, View};
use crate::error::{ModelError, Result};

/// One compiled implementation of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelPath {
    /// One output at a time, the specification as written: every CPU.
    Scalar,
    /// 4 × 8 register tiles, baseline x86-64 (SSE2), FMA in software.
    Sse2,
    /// 6 × 16 register tiles compiled for AVX2 and FMA3.
    Avx2,
    /// 8 × 32 register tiles compiled for AVX-512F (with its FMA).
    Avx512,
    /// 6 × 16 register tiles, baseline AArch64 (NEON, FMA).
    Neon,
}

/// Every path, slowest first.
pub const ALL_PATHS: [KernelPath; 5] = [
    KernelPath::Scalar,
    KernelPath::Sse2,
    KernelPath::Avx2,
    KernelPath::Avx512,
    KernelPath::Neon,
];

impl KernelPath {
    /// The name `MIXNN_KERNELS` takes.
    pub fn name(self) -> &'static str {
        match self {
            KernelPath::Scalar => "scalar",
            KernelPath::Sse2 => "sse2",
            KernelPath::Avx2 => "avx2",
            KernelPath::Avx512 => "avx512",
            KernelPath::Neon => "neon",
        }
    }

    /// Parses a name of [`KernelPath::name`].
    pub fn parse(name: &str) -> Result<Self> {
        ALL_PATHS
            .into_iter()
            .find(|p| p.name() == name)
            .ok_or_else(|| {
                ModelError::Kernels(format!(
                    "unknown kernel path {name:?} (known: {})",
                    ALL_PATHS.map(KernelPath::name).join(", ")
                ))
            })
    }

    /// Whether this build and this CPU can run the path.
    pub fn supported(self) -> bool {
        match self {
            KernelPath::Scalar => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Sse2 => true,
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => {
                std::arch::is_x86_feature_detected!("avx2")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => {
                std::arch::is_x86_feature_detected!("avx512f")
                    && std::arch::is_x86_feature_detected!("fma")
            }
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => true,
            #[allow(unreachable_patterns)]
            _ => false,
        }
    }

    /// The paths this machine supports, slowest first.
    pub fn supported_paths() -> Vec<KernelPath> {
        ALL_PATHS.into_iter().filter(|p| p.supported()).collect()
    }

    /// The fastest path this machine supports.
    pub fn best() -> KernelPath {
        ALL_PATHS
            .into_iter()
            .rev()
            .find(|p| p.supported())
            .unwrap_or(KernelPath::Scalar)
    }
}

impl fmt::Display for KernelPath {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.pad(self.name())
    }
}

static GLOBAL: OnceLock<KernelPath> = OnceLock::new();

thread_local! {
    static FORCED: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

/// Reads `MIXNN_KERNELS` once and fixes the process's path: the named one
/// (which must be known and supported), or [`KernelPath::best`] without
/// the variable. Later calls return the path fixed by the first.
pub fn configure_from_env() -> Result<KernelPath> {
    if let Some(p) = GLOBAL.get() {
        return Ok(*p);
    }
    let path = match std::env::var("MIXNN_KERNELS") {
        Ok(name) if !name.is_empty() => {
            let p = KernelPath::parse(&name)?;
            if !p.supported() {
                return Err(ModelError::Kernels(format!(
                    "MIXNN_KERNELS={name}: this CPU or build cannot run the {name} path \
                     (supported: {})",
                    supported_names()
                )));
            }
            p
        }
        _ => KernelPath::best(),
    };
    Ok(*GLOBAL.get_or_init(|| path))
}

fn supported_names() -> String {
    KernelPath::supported_paths()
        .into_iter()
        .map(KernelPath::name)
        .collect::<Vec<_>>()
        .join(", ")
}

/// The path the current thread computes with: the one [`with_path`]
/// forces, else the process's (see [`configure_from_env`]; without a call
/// to it, `MIXNN_KERNELS` is read here, and a bad value falls back to the
/// best path — binaries call [`configure_from_env`] first to report it).
pub fn active() -> KernelPath {
    FORCED
        .with(Cell::get)
        .unwrap_or_else(|| configure_from_env().unwrap_or_else(|_| KernelPath::best()))
}

/// Runs `f` with `path` forced on this thread.
pub fn with_path<R>(path: KernelPath, f: impl FnOnce() -> R) -> Result<R> {
    if !path.supported() {
        return Err(ModelError::Kernels(format!(
            "the {path} path is not supported here (supported: {})",
            supported_names()
        )));
    }
    let before = FORCED.with(|c| c.replace(Some(path)));
    let out = f();
    FORCED.with(|c| c.set(before));
    Ok(out)
}

/// `C = A·B` (see [`gemm`] for the order of operations) on the active path.
/// `c` is overwritten; shapes are the caller's to check.
pub(crate) fn gemm_into(a: View<'_>, b: View<'_>, c: &mut [f32]) {
    debug_assert_eq!(a.cols(), b.rows());
    debug_assert_eq!(c.len(), a.rows() * b.cols());
    match active() {
        KernelPath::Scalar => gemm::reference(a, b, c),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx512 if KernelPath::Avx512.supported() => x86::avx512(a, b, c),
        #[cfg(target_arch = "x86_64")]
        KernelPath::Avx2 if KernelPath::Avx2.supported() => x86::avx2(a, b, c),
        #[cfg(target_arch = "aarch64")]
        KernelPath::Neon => gemm::tiled::<gemm::HardFma, 6, 16>(a, b, c),
        // SSE2 is the x86-64 baseline; elsewhere this is plain code.
        _ => gemm::tiled::<SoftFma, 4, 8>(a, b, c),
    }
}

/// The x86-64 paths that need more than the baseline instruction set: the
/// same generic tile code, compiled with the wider vectors enabled. The
/// only `unsafe` of the engine is calling them, after checking the CPU.
#[cfg(target_arch = "x86_64")]
#[allow(unsafe_code)]
mod x86 {
    use super::gemm::{self, HardFma, View};

    pub(super) fn avx2(a: View<'_>, b: View<'_>, c: &mut [f32]) {
        #[target_feature(enable = "avx2,fma")]
        fn run(a: View<'_>, b: View<'_>, c: &mut [f32]) {
            gemm::tiled::<HardFma, 6, 16>(a, b, c)
        }
        debug_assert!(super::KernelPath::Avx2.supported());
        // SAFETY: callers reach this only after `is_x86_feature_detected!`
        // confirmed AVX2 and FMA (see `gemm_into`), so the instructions
        // `run` was compiled with exist on this CPU.
        unsafe { run(a, b, c) }
    }

    pub(super) fn avx512(a: View<'_>, b: View<'_>, c: &mut [f32]) {
        #[target_feature(enable = "avx512f,fma")]
        fn run(a: View<'_>, b: View<'_>, c: &mut [f32]) {
            gemm::tiled::<HardFma, 8, 32>(a, b, c)
        }
        debug_assert!(super::KernelPath::Avx512.supported());
        // SAFETY: as in `avx2`, for AVX-512F.
        unsafe { run(a, b, c) }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_and_unknown_names_are_refused() {
        for p in ALL_PATHS {
            assert_eq!(KernelPath::parse(p.name()).unwrap(), p);
        }
        let err = KernelPath::parse("avx3").unwrap_err().to_string();
        assert!(err.contains("avx3") && err.contains("scalar"), "{err}");
    }

    #[test]
    fn scalar_is_supported_everywhere_and_best_is_supported() {
        assert!(KernelPath::Scalar.supported());
        assert!(KernelPath::best().supported());
    }

    #[test]
    fn with_path_forces_and_restores() {
        let outer = active();
        let inner = with_path(KernelPath::Scalar, active).unwrap();
        assert_eq!(inner, KernelPath::Scalar);
        assert_eq!(active(), outer);
    }

    #[test]
    fn with_path_refuses_a_path_the_machine_lacks() {
        for p in ALL_PATHS.into_iter().filter(|p| !p.supported()) {
            assert!(with_path(p, || ()).is_err(), "{p}");
        }
    }
}
