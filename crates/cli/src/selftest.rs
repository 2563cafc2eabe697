//! `mixnn selftest`: the arithmetic self-test on every kernel path this
//! machine supports, and which one is active.

use anyhow::bail;
use clap::Args;
use mixnn_model::arith::{dispatch, KernelPath, ARITH_VERSION};
use mixnn_model::selftest::{self, EXPECTED_SHA256};

/// `mixnn selftest`.
#[derive(Debug, Args)]
pub struct SelfTestArgs {}

/// Prints one line per supported path and fails if any differs.
pub fn run(_args: &SelfTestArgs) -> anyhow::Result<()> {
    let active = dispatch::configure_from_env()?;
    println!("arith {ARITH_VERSION}, expected digest {EXPECTED_SHA256}");
    let mut failed = Vec::new();
    for path in KernelPath::supported_paths() {
        let t = selftest::run_on(path)?;
        let mark = if path == active { " (active)" } else { "" };
        let verdict = if t.passed() { "ok" } else { "FAILED" };
        println!("{path:<7} {verdict:<6} {}{mark}", t.digest);
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
/// active path (`MIXNN_KERNELS` or the best supported) must pass.
pub fn check_active() -> anyhow::Result<KernelPath> {
    dispatch::configure_from_env()?;
    let t = selftest::check()?;
    tracing::info!(path = %t.path, "arithmetic self-test passed");
    Ok(t.path)
}
