//! One glibc setting for the whole process, applied by re-executing it.
//!
//! glibc copies blocks of 2 KiB and more with `rep movsb`. On the AMD EPYC
//! machines we measure on, `rep movsb` is 30 times slower when source and
//! destination are not equally aligned modulo 32 (16 KiB: 5.5 µs against
//! 0.17 µs), and that is the common case on our data path: a cell sits at
//! offset `2 + 16 402·k` of a link frame, a body at offset 8 247 of its
//! first cell. Copies were 11 % of the cascade's CPU time.
//! `glibc.cpu.x86_rep_movsb_threshold` moves those copies to glibc's vector
//! loop, which does not care about alignment; it cut the cascade's CPU time
//! by about 8 % (README, "Where the time goes").
//!
//! glibc reads `GLIBC_TUNABLES` once, before `main`, so [`tune`] sets it
//! and replaces the process image with a fresh copy of itself (same PID,
//! same arguments); the copy sees the setting already there and goes on.
//! Child processes inherit it. `MIXNN_NO_TUNABLES=1` turns this off.

/// The setting: never use `rep movsb` for copies.
#[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
const SETTING: &str = "glibc.cpu.x86_rep_movsb_threshold=4294967295";

/// Re-executes the process with [`SETTING`] in `GLIBC_TUNABLES` unless it
/// is there already (or turned off); returns only if it does not re-execute
/// (or the exec fails, which changes nothing but speed).
pub fn tune() {
    #[cfg(all(target_os = "linux", target_arch = "x86_64", target_env = "gnu"))]
    {
        use std::os::unix::process::CommandExt;
        if std::env::var_os("MIXNN_NO_TUNABLES").is_some_and(|v| v != "0") {
            return;
        }
        let current = std::env::var("GLIBC_TUNABLES").unwrap_or_default();
        if current.contains("x86_rep_movsb_threshold") {
            return;
        }
        let tunables = if current.is_empty() {
            SETTING.to_string()
        } else {
            format!("{current}:{SETTING}")
        };
        let Ok(exe) = std::env::current_exe() else {
            return;
        };
        let mut args = std::env::args_os();
        let mut cmd = std::process::Command::new(exe);
        if let Some(arg0) = args.next() {
            cmd.arg0(arg0);
        }
        // Only returns on failure; then run as we are.
        let err = cmd.args(args).env("GLIBC_TUNABLES", tunables).exec();
        tracing::debug!("cannot re-execute with GLIBC_TUNABLES: {err}");
    }
}
