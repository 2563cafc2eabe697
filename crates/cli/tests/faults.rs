#![allow(clippy::unwrap_used, clippy::expect_used)]
//! Fault injection (issue #27): a node of the cascade killed (SIGKILL) at
//! a random moment from the designer's start to its last step — set-up,
//! the init loop, training, audits, checkpoints, the test phase, the final
//! fetch — is replaced from the spares and the run ends byte-identical to
//! `--local`. Seeded: a failing trial replays with its seed.
//!
//! CI runs two trials (one killed during set-up, one at a random moment);
//! the long run is
//! `MIXNN_FAULT_TRIALS=50 cargo test -p mixnn --test faults -- --ignored --nocapture`,
//! which prints each trial and the distribution of kill moments and
//! recovery times.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod common;
use common::*;

/// 2 epochs of 10 steps, a checkpoint every 4 steps, audits at 0.2.
const RUN: &[&str] = &[
    "--train-limit",
    "640",
    "--test-limit",
    "256",
    "--epochs",
    "2",
    "--seed",
    "5",
];

fn splitmix(x: u64) -> u64 {
    let mut z = x.wrapping_add(0x9e37_79b9_7f4a_7c15);
    z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    z ^ (z >> 31)
}

fn unix_ms() -> u128 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis()
}

fn hop_file(nodes: &Nodes, from: usize, to: usize, path: &Path) -> PathBuf {
    let mut text = String::new();
    for h in &nodes.hops[from..to] {
        text.push_str(&format!(
            "[[hop]]\naddr = \"{}\"\nonion = \"{}\"\nlink = \"{}\"\n\n",
            h.addr, h.onion, h.link
        ));
    }
    std::fs::write(path, text).unwrap();
    path.to_path_buf()
}

/// What one trial saw.
struct Trial {
    seed: u64,
    victim: usize,
    /// Milliseconds from the designer's start to the kill.
    kill_ms: u64,
    /// Where the run was: `set-up`, `training (step N)` or `test and
    /// final fetch`.
    phase: String,
    /// Milliseconds from the kill to its detection, and seconds from
    /// detection to training again (`None`: no recovery was needed).
    detected_ms: Option<i64>,
    recovery_s: Option<f64>,
}

/// The Unix milliseconds of a log line's RFC 3339 timestamp.
fn line_ms(line: &str) -> Option<u128> {
    let ts = line.split_whitespace().next()?;
    let (date, time) = ts.strip_suffix('Z')?.split_once('T')?;
    let mut d = date.split('-').map(|v| v.parse::<i64>().ok());
    let (y, m, day) = (d.next()??, d.next()??, d.next()??);
    let (hms, frac) = time.split_once('.').unwrap_or((time, "0"));
    let mut t = hms.split(':').map(|v| v.parse::<i64>().ok());
    let (h, min, s) = (t.next()??, t.next()??, t.next()??);
    let ms: i64 = format!("{frac:0<3}")[..3].parse().ok()?;
    // Days from the civil date (Howard Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let doy = (153 * (m + if m > 2 { -3 } else { 9 }) + 2) / 5 + day - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    let days = era * 146_097 + doe - 719_468;
    u128::try_from(((days * 24 + h) * 60 + min) * 60_000 + s * 1000 + ms).ok()
}

/// Where the designer was at `at` (Unix ms), from its `-v` log: `set-up`
/// (before the cascade was initialised), `training (from step N)` (the
/// last checkpoint before), `test` (the last epoch's test phase),
/// `final fetch`, or `done` (after the last checkpoint of the run, the
/// test and the fetch: the killed node was not needed any more).
fn phase_at(log: &str, at: u128) -> String {
    let before: Vec<&str> = log
        .lines()
        .filter(|l| line_ms(l).is_some_and(|t| t <= at))
        .collect();
    let has = |what: &str| before.iter().any(|l| l.contains(what));
    if !has("cascade initialised") {
        return "set-up".into();
    }
    if has("fetching the final weights") {
        return "final fetch".into();
    }
    if before.iter().filter(|l| l.contains("testing")).count() >= 2 {
        return "test".into();
    }
    let step = before
        .iter()
        .rev()
        .filter(|l| l.contains("checkpoint written"))
        .find_map(|l| {
            l.split_whitespace()
                .find_map(|f| f.strip_prefix("step="))
                .and_then(|s| s.parse::<u64>().ok())
        });
    match step {
        Some(s) => format!("training (from step {s})"),
        None => "training (first checkpoint)".into(),
    }
}

/// When each phase of the unkilled run began (ms after the designer
/// started): set-up, training, the last test, the final fetch, the end.
#[derive(Debug, Clone, Copy)]
struct Phases([u64; 5]);

impl Phases {
    fn from_log(log: &str, start_ms: u128, end_ms: u64) -> Phases {
        let at = |what: &str, nth: usize| {
            log.lines()
                .filter(|l| l.contains(what))
                .nth(nth)
                .and_then(line_ms)
                .map_or(0, |t| (t.saturating_sub(start_ms)) as u64)
        };
        Phases([
            0,
            at("cascade initialised", 0),
            at("testing", 1),
            at("fetching the final weights", 0),
            end_ms,
        ])
    }

    /// A moment in phase `k` (0 set-up, 1 training, 2 the last test, 3
    /// the final fetch and the end), drawn with `x`: by time for set-up
    /// (its first half, since its length varies from run to run) and
    /// training, by the designer's log for the short ones.
    fn moment(&self, k: usize, x: u64) -> When {
        let span = |from: u64, to: u64| x % to.saturating_sub(from).max(1);
        match k {
            0 => When::At(span(0, self.0[1] / 2)),
            1 => When::At(self.0[1] + span(self.0[1], self.0[2])),
            2 => When::After("testing", 1, span(self.0[2], self.0[3])),
            _ => When::After("fetching the final weights", 0, span(0, 40)),
        }
    }
}

/// One trial with `seed`: 7 fresh nodes (5 in the cascade, 2 spares),
/// the designer started, cascade node `victim` killed `kill_ms` after.
/// When a trial kills its node.
#[derive(Debug, Clone, Copy)]
enum When {
    /// This many ms after the designer started.
    At(u64),
    /// This many ms after the designer logged the `nth` line (0-based)
    /// containing the text: phases too short to hit by time alone.
    After(&'static str, usize, u64),
}

fn trial(dir: &Path, local: &Run, seed: u64, when: When) -> Trial {
    let dir = dir.join(format!("trial-{seed}"));
    std::fs::create_dir_all(&dir).unwrap();
    let mut nodes = Nodes::start(&dir, 7);
    let cascade = hop_file(&nodes, 0, 5, &dir.join("cascade.toml"));
    let spares = hop_file(&nodes, 5, 7, &dir.join("spares.toml"));
    let victim = (splitmix(seed) % 5) as usize;
    let log = dir.join("designer.log");
    let started = Instant::now();
    let start_ms = unix_ms();
    let designer = train_cmd(
        &dir,
        "cascade",
        &["--cascade", cascade.to_str().unwrap()],
        &[
            RUN,
            &[
                "-v",
                "--spares",
                spares.to_str().unwrap(),
                "--checkpoints",
                dir.join("ckpt").to_str().unwrap(),
                "--checkpoint-every",
                "4",
                "--audit-rate",
                "0.2",
                "--timeout",
                "10",
            ],
        ]
        .concat(),
    )
    .stdout(Stdio::piped())
    .stderr(std::fs::File::create(&log).unwrap())
    .spawn()
    .unwrap();
    match when {
        When::At(ms) => {
            std::thread::sleep(Duration::from_millis(ms).saturating_sub(started.elapsed()))
        }
        When::After(what, nth, ms) => {
            let deadline = Instant::now() + Duration::from_secs(120);
            while std::fs::read_to_string(&log)
                .unwrap_or_default()
                .lines()
                .filter(|l| l.contains(what))
                .count()
                <= nth
            {
                assert!(Instant::now() < deadline, "seed {seed}: no {what:?} logged");
                std::thread::sleep(Duration::from_millis(1));
            }
            std::thread::sleep(Duration::from_millis(ms));
        }
    }
    let killed_at = unix_ms();
    nodes.kill_hard(victim);
    let out = designer.wait_with_output().unwrap();
    let said = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        std::fs::read_to_string(&log).unwrap_or_default()
    );
    assert!(
        out.status.success(),
        "seed {seed}: node {victim} killed {} ms in ({when:?}): the run failed: {said}",
        killed_at - start_ms
    );
    let run = Run::load(&dir, "cascade");
    assert_same_run(local, &run);
    let recovered = said.lines().find(|l| l.contains("recovered:"));
    let detected_ms = recovered.and_then(|l| {
        let at = l.split("detected at unix ms ").nth(1)?.split(')').next()?;
        Some(at.parse::<i64>().ok()? - killed_at as i64)
    });
    let recovery_s = recovered.and_then(|l| {
        let s = l.rsplit(" in ").next()?.trim().strip_suffix(" s")?;
        s.parse().ok()
    });
    if let Some(l) = recovered {
        let victim_addr = nodes.hops[victim].addr.to_string();
        assert!(
            l.contains(&victim_addr) || l.contains("replaced []"),
            "seed {seed}: another node replaced: {l}"
        );
    }
    let trial = Trial {
        seed,
        victim,
        kill_ms: (killed_at - start_ms) as u64,
        phase: phase_at(&said, killed_at),
        detected_ms,
        recovery_s,
    };
    let _ = std::fs::remove_dir_all(&dir);
    trial
}

/// The local run, and the phases of an unkilled cascade run.
fn baseline(dir: &Path) -> (Run, Phases) {
    let local = train(dir, "local", &["--local"], RUN);
    let nodes = Nodes::start(dir, 5);
    let cascade = nodes.cascade_file("plain.toml");
    let log = dir.join("plain.log");
    let started = Instant::now();
    let start_ms = unix_ms();
    let out = train_cmd(
        dir,
        "plain",
        &["--cascade", cascade.to_str().unwrap()],
        &[
            RUN,
            &["-v", "--audit-rate", "0.2", "--checkpoint-every", "4"],
        ]
        .concat(),
    )
    .stderr(std::fs::File::create(&log).unwrap())
    .output()
    .unwrap();
    let took = started.elapsed().as_millis() as u64;
    said_ok(&out, "the unkilled run");
    assert_same_run(&local, &Run::load(dir, "plain"));
    let phases = Phases::from_log(&std::fs::read_to_string(&log).unwrap(), start_ms, took);
    eprintln!("unkilled run: phases begin at {:?} ms", phases.0);
    (local, phases)
}

/// Prints every trial and the distribution.
fn summary(trials: &[Trial], run: Phases) {
    eprintln!("seed | node | killed at (ms) | phase | detected after (ms) | recovery (s)");
    for t in trials {
        eprintln!(
            "{} | {} | {} | {} | {} | {}",
            t.seed,
            t.victim,
            t.kill_ms,
            t.phase,
            t.detected_ms.map_or("-".into(), |d| d.to_string()),
            t.recovery_s.map_or("-".into(), |r| format!("{r:.2}"))
        );
    }
    let mut phases: Vec<(String, usize)> = Vec::new();
    for t in trials {
        let p = t.phase.split(" (").next().unwrap_or(&t.phase).to_string();
        match phases.iter_mut().find(|(q, _)| *q == p) {
            Some((_, n)) => *n += 1,
            None => phases.push((p, 1)),
        }
    }
    let mut rec: Vec<f64> = trials.iter().filter_map(|t| t.recovery_s).collect();
    let mut det: Vec<i64> = trials.iter().filter_map(|t| t.detected_ms).collect();
    rec.sort_by(f64::total_cmp);
    det.sort_unstable();
    let q = |v: &[f64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    let qi = |v: &[i64], p: f64| {
        v.get(((v.len() as f64 - 1.0) * p).round() as usize)
            .copied()
    };
    let mut kills: Vec<u64> = trials.iter().map(|t| t.kill_ms).collect();
    kills.sort_unstable();
    eprintln!(
        "{} trials, all byte-identical to --local; unkilled run {} ms, phases from {:?} ms",
        trials.len(),
        run.0[4],
        run.0
    );
    eprintln!("kill moments (ms after the designer started): {kills:?}");
    eprintln!("by phase: {phases:?}");
    eprintln!(
        "{} recovered; detection after the kill (ms): min {:?} median {:?} max {:?}; recovery (s from detection to training again): min {:?} median {:?} max {:?}",
        rec.len(),
        qi(&det, 0.0),
        qi(&det, 0.5),
        qi(&det, 1.0),
        q(&rec, 0.0),
        q(&rec, 0.5),
        q(&rec, 1.0)
    );
}

/// CI: one node killed during set-up (the harness of issue #27 killed at
/// 0.05–0.5 s, and 6 of 6 runs failed where the kill hit the init loop),
/// one at a random moment of the run. (`crates/integration/tests/setup.rs`
/// fails a node in the init loop every time.)
#[test]
fn a_node_killed_in_set_up_or_at_a_random_moment_is_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let (local, phases) = baseline(tmp.path());
    let seed: u64 = std::env::var("MIXNN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(0x6661_756c);
    let early = phases.moment(0, splitmix(seed + 1));
    let any = When::At(splitmix(seed + 2) % phases.0[4].max(1));
    let trials = vec![
        trial(tmp.path(), &local, seed, early),
        trial(tmp.path(), &local, seed + 1, any),
    ];
    summary(&trials, phases);
}

/// The long run: `MIXNN_FAULT_TRIALS` (default 50) seeded trials, each
/// killing one of the five cascade nodes at a moment drawn within one
/// phase, the phases in turn (set-up, training with its audits and
/// checkpoints, the last test, the final fetch and the end): by time for
/// the first two (from an unkilled run's phases), after the designer logs
/// the phase's start for the short ones, so that they are hit as often as
/// long ones.
#[test]
#[ignore = "long: MIXNN_FAULT_TRIALS=50 cargo test -p mixnn --test faults -- --ignored --nocapture"]
fn nodes_killed_at_random_moments_are_survived() {
    let tmp = tempfile::tempdir().unwrap();
    let (local, phases) = baseline(tmp.path());
    let n: u64 = std::env::var("MIXNN_FAULT_TRIALS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(50);
    let first: u64 = std::env::var("MIXNN_TEST_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1000);
    let trials: Vec<Trial> = (first..first + n)
        .map(|seed| {
            let at = phases.moment((seed % 4) as usize, splitmix(seed ^ 0x6b));
            let t = trial(tmp.path(), &local, seed, at);
            eprintln!(
                "seed {seed}: node {} killed at {} ms ({}): recovered in {:?} s",
                t.victim, t.kill_ms, t.phase, t.recovery_s
            );
            t
        })
        .collect();
    summary(&trials, phases);
}
