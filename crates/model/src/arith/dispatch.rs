//! Which compiled kernel path runs the matrix products.
//!
//! Every path computes the same function (the order of operations of
//! [`super::gemm`]); they differ only in how many outputs they compute per
//! instruction, so choosing among them by speed is safe. Once per process
//! [`configure_from_env`] times a short fixed workload on every supported
//! path ([`calibrate`]: a few milliseconds, most of it the scalar path) and
//! keeps the fastest: the widest vectors are not always the fastest (a CPU
//! that splits 512-bit instructions in two, or lowers its clock for them).
//! The environment variable `MIXNN_KERNELS=scalar|sse2|avx2|avx512|neon`
//! forces one (an unknown or unsupported name is an error), and
//! [`with_path`] forces one for the current thread (tests, the self-test).

use std::cell::Cell;
use std::fmt;
use std::hint::black_box;
use std::sync::OnceLock;
use std::time::{Duration, Instant};

use crate::arith::gemm::{self, Init, View};
use crate::error::{ModelError, Result};

/// One compiled implementation of the kernels.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum KernelPath {
    /// One output at a time, the specification as written: every CPU.
    Scalar,
    /// 4 × 8 register tiles, baseline x86-64 (SSE2), FMA in software,
    /// two outputs per instruction.
    Sse2,
    /// 6 × 16 register tiles in AVX2 `ymm` registers, FMA3.
    Avx2,
    /// 8 × 32 register tiles in AVX-512F `zmm` registers, with its FMA.
    Avx512,
    /// 6 × 16 register tiles, baseline AArch64 (NEON, FMA), portable code.
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
            KernelPath::Sse2 => gemm::x86::Sse2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => gemm::x86::Avx2::detect().is_some(),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => gemm::x86::Avx512::detect().is_some(),
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

    /// The widest path this machine supports (not always the fastest:
    /// [`calibrate`]).
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

static GLOBAL: OnceLock<Choice> = OnceLock::new();

thread_local! {
    static FORCED: Cell<Option<KernelPath>> = const { Cell::new(None) };
}

/// How long one path took on the calibration workload.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PathTiming {
    /// The path.
    pub path: KernelPath,
    /// The fastest of its runs.
    pub time: Duration,
}

/// The process's kernel path and how it was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Choice {
    /// The path every product of the process uses.
    pub path: KernelPath,
    /// Named by `MIXNN_KERNELS` (no calibration ran).
    pub forced: bool,
    /// Every supported path's time on the calibration workload (empty
    /// when forced), fastest first.
    pub timings: Vec<PathTiming>,
}

/// The calibration workload's shape: a product and one with a transposed
/// operand (as a weight gradient reads it), 2 · 32 × 128 × 64
/// multiply-adds, too small to be shared between threads.
const WORKLOAD: (usize, usize, usize) = (32, 128, 64);
/// The first round's smaller product, 1/32 of the work: enough to rank
/// software and hardware FMAs, so the slow paths run only this.
const PROBE: (usize, usize, usize) = (8, 32, 64);

fn workload((m, k, n): (usize, usize, usize)) -> impl FnMut() {
    let values = |len: usize, seed: u32| -> Vec<f32> {
        (0..len as u32)
            .map(|i| ((i.wrapping_mul(2_654_435_761) ^ seed) >> 9) as f32 * 1.0e-6 - 2.0)
            .collect()
    };
    let (a, b, at) = (values(m * k, 1), values(k * n, 2), values(k * m, 3));
    let mut c = vec![0.0f32; m * n];
    move || {
        gemm_into(
            View::rows_of(&a, m, k),
            View::rows_of(&b, k, n),
            &mut c,
            Init::Zero,
        );
        gemm_into(
            View::rows_of(&at, k, m).t(),
            View::rows_of(&b, k, n),
            &mut c,
            Init::Accumulate,
        );
        black_box(&mut c);
    }
}

/// Times the calibration workload on every supported path, interleaved
/// over a few rounds (the best run of each counts), fastest first. A
/// first round times a product 32 times smaller on every path; only the
/// paths within four times of the best go on to the full workload (the
/// others' time is the probe's, scaled by 32: the software-FMA paths
/// are tens of times slower, so a probe ranks them). Takes about a
/// millisecond.
pub fn calibrate() -> Vec<PathTiming> {
    let paths = KernelPath::supported_paths();
    let time = |path: KernelPath, shape| {
        let mut run = workload(shape);
        with_path(path, || {
            run(); // warm: caches, the first use of wide registers
            let start = Instant::now();
            run();
            start.elapsed()
        })
        .ok()
    };
    let scale = |(m, k, n): (usize, usize, usize)| (m * k * n) as u32;
    let factor = scale(WORKLOAD) / scale(PROBE);
    let probes: Vec<Option<Duration>> = paths.iter().map(|p| time(*p, PROBE)).collect();
    let lead = probes.iter().flatten().min().copied();
    let mut best: Vec<Option<Duration>> = probes
        .iter()
        .map(|t| match (t, lead) {
            (Some(t), Some(lead)) if *t > lead * 4 => Some(*t * factor),
            _ => None,
        })
        .collect();
    let finalists: Vec<usize> = (0..paths.len()).filter(|i| best[*i].is_none()).collect();
    for _ in 0..4 {
        for &i in &finalists {
            if let Some(t) = time(paths[i], WORKLOAD) {
                best[i] = Some(best[i].map_or(t, |s| s.min(t)));
            }
        }
    }
    let mut out: Vec<PathTiming> = paths
        .into_iter()
        .zip(best)
        .filter_map(|(path, t)| t.map(|time| PathTiming { path, time }))
        .collect();
    // Ties (and a sort that keeps the order) favour the wider path.
    out.reverse();
    out.sort_by_key(|t| t.time);
    out
}

/// Fixes the process's path once: the one `MIXNN_KERNELS` names (which
/// must be known and supported), or the fastest by [`calibrate`]. Later
/// calls return the first choice.
pub fn configure_from_env() -> Result<KernelPath> {
    choice().map(|c| c.path)
}

/// The process's choice (see [`configure_from_env`]), made on first use.
pub fn choice() -> Result<&'static Choice> {
    if let Some(c) = GLOBAL.get() {
        return Ok(c);
    }
    let chosen = match std::env::var("MIXNN_KERNELS") {
        Ok(name) if !name.is_empty() => {
            let p = KernelPath::parse(&name)?;
            if !p.supported() {
                return Err(ModelError::Kernels(format!(
                    "MIXNN_KERNELS={name}: this CPU or build cannot run the {name} path \
                     (supported: {})",
                    supported_names()
                )));
            }
            Choice {
                path: p,
                forced: true,
                timings: Vec::new(),
            }
        }
        _ => {
            let timings = calibrate();
            Choice {
                path: timings.first().map_or_else(KernelPath::best, |t| t.path),
                forced: false,
                timings,
            }
        }
    };
    Ok(GLOBAL.get_or_init(|| chosen))
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
/// to it, the choice is made here, and a bad `MIXNN_KERNELS` falls back to
/// the widest path — binaries call [`configure_from_env`] first to report
/// it).
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

/// `C = A·B`, or `C` continued by `A·B` ([`Init`]; see [`gemm`] for the
/// order of operations), on the active path. Shapes are the caller's to
/// check (`c.len()` must be `A.rows × B.cols`).
pub(crate) fn gemm_into(a: View<'_>, b: View<'_>, c: &mut [f32], init: Init) {
    Gemm::active().run(a, b, c, init)
}

/// The kernel path of the calling thread, captured so that work handed to
/// other threads computes with it too (a path forced with [`with_path`]
/// is the calling thread's alone).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Gemm(KernelPath);

impl Gemm {
    /// The calling thread's path ([`active`]).
    pub(crate) fn active() -> Self {
        Gemm(active())
    }

    /// Runs `task` with this path's micro-kernel (the scalar path's is a
    /// one-output tile with the software FMA: the specification's
    /// sequence, one output at a time).
    pub(crate) fn task<T: gemm::KernelTask>(self, task: T) -> T::Output {
        match self.0 {
            KernelPath::Scalar => task.run(gemm::Portable::<gemm::SoftFma, 1, 1>::new()),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => match gemm::x86::Avx512::detect() {
                Some(k) => task.run(k),
                None => task.run(sse2_kernel()),
            },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => match gemm::x86::Avx2::detect() {
                Some(k) => task.run(k),
                None => task.run(sse2_kernel()),
            },
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => task.run(gemm::Portable::<gemm::HardFma, 6, 16>::new()),
            #[cfg(target_arch = "x86_64")]
            _ => task.run(sse2_kernel()),
            #[cfg(not(target_arch = "x86_64"))]
            _ => task.run(gemm::Portable::<gemm::SoftFma, 4, 8>::new()),
        }
    }

    /// `C = A·B` or `C` continued by `A·B` on this path.
    pub(crate) fn run(self, a: View<'_>, b: View<'_>, c: &mut [f32], init: Init) {
        match self.0 {
            KernelPath::Scalar => gemm::reference(a, b, c, init),
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx512 => match gemm::x86::Avx512::detect() {
                Some(k) => gemm::gemm(k, a, b, c, init),
                None => sse2(a, b, c, init),
            },
            #[cfg(target_arch = "x86_64")]
            KernelPath::Avx2 => match gemm::x86::Avx2::detect() {
                Some(k) => gemm::gemm(k, a, b, c, init),
                None => sse2(a, b, c, init),
            },
            #[cfg(target_arch = "aarch64")]
            KernelPath::Neon => {
                gemm::gemm(gemm::Portable::<gemm::HardFma, 6, 16>::new(), a, b, c, init)
            }
            #[cfg(target_arch = "x86_64")]
            _ => sse2(a, b, c, init),
            #[cfg(not(target_arch = "x86_64"))]
            _ => gemm::gemm(gemm::Portable::<gemm::SoftFma, 4, 8>::new(), a, b, c, init),
        }
    }
}

#[cfg(target_arch = "x86_64")]
fn sse2_kernel() -> gemm::x86::Sse2 {
    gemm::x86::Sse2::baseline()
}

#[cfg(target_arch = "x86_64")]
fn sse2(a: View<'_>, b: View<'_>, c: &mut [f32], init: Init) {
    gemm::gemm(sse2_kernel(), a, b, c, init)
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
    fn calibration_times_every_supported_path_fastest_first() {
        let t = calibrate();
        let mut timed: Vec<KernelPath> = t.iter().map(|t| t.path).collect();
        timed.sort_by_key(|p| p.name());
        let mut supported = KernelPath::supported_paths();
        supported.sort_by_key(|p| p.name());
        assert_eq!(timed, supported);
        assert!(t.windows(2).all(|w| w[0].time <= w[1].time));
    }

    #[test]
    fn with_path_refuses_a_path_the_machine_lacks() {
        for p in ALL_PATHS.into_iter().filter(|p| !p.supported()) {
            assert!(with_path(p, || ()).is_err(), "{p}");
        }
    }
}
