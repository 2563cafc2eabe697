//! `mixnn selftest`: the arithmetic self-test on every kernel path this
//! machine supports, each path's time on the calibration workload, and
//! which one is active (the fastest, or the one `MIXNN_KERNELS` forces).

use anyhow::bail;
use clap::Args;
use mixnn_model::arith::{dispatch, threads, KernelPath, ARITH_VERSION};
use mixnn_model::selftest::{self, EXPECTED_SHA256};

/// `mixnn selftest`.
#[derive(Debug, Args)]
pub struct SelfTestArgs {}

/// Prints one line per supported path and fails if any differs.
pub fn run(_args: &SelfTestArgs) -> anyhow::Result<()> {
    let choice = dispatch::choice()?;
    let active = choice.path;
    // The process's choice does not time the paths when one is forced:
    // time them here all the same, to show them.
    let timings = if choice.forced {
        dispatch::calibrate()
    } else {
        choice.timings.clone()
    };
    println!("arith {ARITH_VERSION}, expected digest {EXPECTED_SHA256}");
    let mut failed = Vec::new();
    for path in KernelPath::supported_paths() {
        let t = selftest::run_on(path)?;
        let mark = match (path == active, choice.forced) {
            (true, true) => " (active: MIXNN_KERNELS)",
            (true, false) => " (active: fastest)",
            _ => "",
        };
        let verdict = if t.passed() { "ok" } else { "FAILED" };
        let time = timings.iter().find(|t| t.path == path).map_or_else(
            || "-".to_string(),
            |t| format!("{:.1} µs", t.time.as_secs_f64() * 1e6),
        );
        println!("{path:<7} {verdict:<6} {} {time:>10}{mark}", t.digest);
        if !t.passed() {
            failed.push(path.name());
        }
    }
    if !failed.is_empty() {
        bail!(
            "arithmetic self-test failed on {}: this build or CPU does not compute arith {ARITH_VERSION}",
            failed.join(", ")
        );
    }
    Ok(())
}

/// The check a node and a designer run before they compute anything: the
/// active path (`MIXNN_KERNELS` or the fastest supported) must pass.
pub fn check_active() -> anyhow::Result<KernelPath> {
    threads::check_env()?;
    let choice = dispatch::choice()?;
    let timings: Vec<String> = choice
        .timings
        .iter()
        .map(|t| format!("{} {:.1} µs", t.path, t.time.as_secs_f64() * 1e6))
        .collect();
    tracing::info!(
        path = %choice.path,
        forced = choice.forced,
        threads = threads::configured(),
        timings = %timings.join(", "),
        "kernel path chosen"
    );
    let t = selftest::check()?;
    tracing::info!(path = %t.path, "arithmetic self-test passed");
    Ok(t.path)
}
