//! The `mixnn` command: one thin binary over the workspace's crates.
//!
//! `main` only parses arguments, sets up logging and turns an error into one
//! line on stderr (`error: …`, the `anyhow` chain joined with `": "`, each
//! cause once) and exit code 1. Each subcommand lives in its own module.

mod adversary;
mod bench;
mod cascade;
mod demo;
mod directory;
mod fetch;
mod memcpy;
mod netns;
mod node;
mod plot;
mod prepared;
mod progress;
mod selftest;
mod train;

use std::process::ExitCode;

/// mimalloc instead of glibc malloc: glibc gives the large activation and
/// gradient buffers of a node's core thread back to the kernel after each
/// step (madvise) and faults them in again on the next, which cost a node
/// more time than its matrix products (measured with `perf`; see README,
/// "Where the time goes").
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::{Parser, Subcommand};
use tracing_subscriber::EnvFilter;

/// Train a neural network cut into stages across a cascade of untrusted
/// servers (MixNN), or locally in one process for comparison.
#[derive(Debug, Parser)]
#[command(name = "mixnn", version, about, propagate_version = true)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace);
    /// `RUST_LOG` overrides it.
    #[arg(short, long, global = true, action = clap::ArgAction::Count)]
    verbose: u8,

    /// Threads the kernels may use in this process (default:
    /// `MIXNN_THREADS`, else every core). Any count gives the same bits.
    #[arg(long, global = true, value_name = "N", value_parser = clap::value_parser!(u32).range(1..=1024))]
    threads: Option<u32>,

    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Train a model and report per-epoch loss, time and test accuracy.
    Train(train::TrainCmd),
    /// Time training runs: the single-process baseline, and single process
    /// vs. cascade over emulated WAN round-trip times.
    #[command(subcommand)]
    Bench(bench::BenchCmd),
    /// Draw the paper's Figure 3 from a metrics JSON file.
    Plot(plot::PlotArgs),
    /// Run the paper's experiment: single-process and through a local
    /// cascade of node processes, compared epoch by epoch, with Figure 3.
    Demo(demo::DemoArgs),
    /// Run a node: serve stages of cascades to designers.
    Node(node::NodeArgs),
    /// Run a directory authority: nodes register and heartbeat, designers
    /// fetch the signed view of the live nodes.
    Directory(directory::DirectoryArgs),
    /// What colluding hops can steal: train through recording nodes, mount
    /// the attacks on what they saw, report accuracy and agreement of the
    /// stolen models against the from-scratch baseline (needs a build
    /// with `--features adversary`).
    Adversary(adversary::AdversaryArgs),
    /// Check that this machine computes the MixNN arithmetic (every kernel
    /// path it supports) and show which path is active.
    Selftest(selftest::SelfTestArgs),
}

fn main() -> ExitCode {
    memcpy::tune();
    let cli = Cli::parse();
    init_logging(cli.verbose);
    if let Some(n) = cli.threads {
        if let Err(e) = mixnn_model::arith::threads::configure(n as usize) {
            eprintln!("error: {e}");
            return ExitCode::FAILURE;
        }
    }
    match run(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        // Interrupted: the signal handler is stopping the nodes and ends
        // the process with 130; the error is only their links closing.
        Err(_) if cascade::interrupted() => {
            std::thread::sleep(std::time::Duration::from_secs(10));
            ExitCode::from(130)
        }
        Err(e) => {
            eprintln!("error: {}", error_line(&e));
            ExitCode::FAILURE
        }
    }
}

fn run(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Train(cmd) => train::run(&cmd),
        Command::Bench(cmd) => bench::run(&cmd),
        Command::Plot(args) => plot::run(&args),
        Command::Demo(args) => demo::run(&args),
        Command::Node(args) => node::run(&args),
        Command::Directory(args) => directory::run(&args),
        Command::Selftest(args) => selftest::run(&args),
        Command::Adversary(args) => adversary::run(&args),
    }
}

/// Logs go to stderr; `RUST_LOG` wins over `-v`.
fn init_logging(verbose: u8) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(log_filter(verbose)));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

/// The log filter of `-v` given `verbose` times: `-v` turns on info,
/// `-vv` debug, `-vvv` trace, for MixNN's own crates (targets `mixnn…`)
/// only. Other crates (HTTP clients, the runtime) stay at `warn`: their
/// debug lines name the addresses they connect to, and MixNN's own logs
/// show other processes' addresses only as aliases (`mixnn_net::alias`).
/// `RUST_LOG` overrides this, third-party lines included.
fn log_filter(verbose: u8) -> String {
    let ours = match verbose {
        0 => return "warn".into(),
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    format!("warn,mixnn={ours}")
}

/// The error and its causes on one line, joined with `": "`, each cause
/// once: many error types show their source in their own message and also
/// return it from `source()` (thiserror's `#[error("…: {source}")]`), so
/// a cause whose text an outer message already holds is left out.
fn error_line(e: &anyhow::Error) -> String {
    let mut parts: Vec<String> = Vec::new();
    for cause in e.chain() {
        let text = one_line(&cause.to_string());
        if !text.is_empty() && !parts.iter().any(|p| p.contains(&text)) {
            parts.push(text);
        }
    }
    parts.join(": ")
}

/// Folds a message onto one line (some library messages carry newlines).
fn one_line(message: &str) -> String {
    message
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .collect::<Vec<_>>()
        .join(" ")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn one_line_folds_newlines() {
        assert_eq!(one_line("a: b\n  c\n\nd"), "a: b c d");
    }

    #[test]
    fn error_line_says_each_cause_once() {
        let refused = || std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        // A type that displays its source and returns it from `source()`,
        // inside another one that does the same, inside a context.
        let net = mixnn_net::NetError::Connect {
            addr: "127.0.0.1:9".parse().unwrap(),
            source: refused(),
        };
        let e = anyhow::Error::new(net).context("starting the run");
        let io = refused().to_string();
        assert_eq!(
            error_line(&e),
            format!(
                "starting the run: cannot connect to {}: {io}",
                mixnn_net::alias::peer(&"127.0.0.1:9".parse().unwrap())
            )
        );
        assert_eq!(format!("{e:#}").matches(&io).count(), 2, "{e:#}");
        // Causes that their outer message does not show are all kept.
        let e = anyhow::Error::new(refused())
            .context("cannot connect")
            .context("link to hop 1");
        assert_eq!(
            error_line(&e),
            format!("link to hop 1: cannot connect: {io}")
        );
        // Multi-line messages are folded.
        let e = anyhow::anyhow!("a\n  b").context("c");
        assert_eq!(error_line(&e), "c: a b");
    }

    #[test]
    fn verbosity_reaches_our_crates_only() {
        assert_eq!(log_filter(0), "warn");
        assert_eq!(log_filter(2), "warn,mixnn=debug");
        let f = EnvFilter::new(log_filter(2));
        assert_eq!(
            f.max_level_hint(),
            Some(tracing::level_filters::LevelFilter::DEBUG)
        );
        assert_eq!(log_filter(5), "warn,mixnn=trace");
    }

    #[test]
    fn cli_definition_is_consistent() {
        use clap::CommandFactory;
        Cli::command().debug_assert();
    }
}
