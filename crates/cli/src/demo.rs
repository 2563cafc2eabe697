//! `mixnn demo`: the paper's experiment.
//!
//! A stub for now: it runs the single-process half (`train --local` on the
//! paper's protocol). The cascade half and Figure 3 come with the designer.

use clap::Args;

use crate::progress::{self, say, Progress};
use crate::train::{self, TrainArgs};

/// `mixnn demo`.
#[derive(Debug, Args)]
pub struct DemoArgs {
    #[command(flatten)]
    pub train: TrainArgs,
}

/// `mixnn demo`.
pub fn run(args: &DemoArgs) -> anyhow::Result<()> {
    say("MixNN demo: single-process run on the paper's protocol");
    let prepared = args.train.prepare()?;
    let mut observer = Progress::with_label("local");
    let (metrics, weights) = train::run_local(&prepared, &mut observer)?;
    drop(observer);
    say(&progress::summary(&metrics));
    train::write_outputs(&args.train, &metrics, &weights)?;
    say("the cascade run (5 local nodes) and Figure 3 are not wired in yet");
    Ok(())
}
