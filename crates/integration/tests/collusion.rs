//! Colluding hops learn only what the model shows them.
//!
//! Every node of a real cascade (in-process nodes, real links and onions,
//! a real designer with audits at 0.2 and checkpoints every 4 steps, so
//! commitment trailers, openings and state fetches all flow) records every
//! byte string it receives outside the model's tensors: raw headers and
//! notes, the link key of the sender, its peeled notes and tags, trailers,
//! relayed and transferred bodies (the `adversary` feature's `record`).
//! For colluders at positions {1, 3}, {2, 4}, {1, 5} and both ends, with and without
//! dummy hops, no 8-byte string is common to two colluders' records beyond
//! what every participant knows anyway: all-zero runs, the public protocol
//! values (step numbers, micro-batch and chunk indices, batch sizes, the
//! model's description and optimiser settings), the wall clock, the host
//! all test nodes share, and — for hops two apart — the link key and
//! address of the neighbour they share. Failed before the designer faced
//! the two ends with keys of their own: the first and the last hop shared
//! its 32-byte link key (25 common windows).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::collections::HashSet;
use std::num::NonZeroU64;
use std::sync::{Arc, Mutex};

use mixnn_designer::{AuditRate, CascadeOptions, CascadeRunner, Checkpoints, HopInfo};
use mixnn_integration::{dataset, start_node_with};
use mixnn_model::seed::RunSeed;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::Sgd;
use mixnn_model::trainer::{run_training, Quiet, TrainConfig};
use mixnn_node::NodeConfig;
use mixnn_proto::{BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::PaddingPolicy;

use mixnn_integration::NARROW as MODEL;

const STEPS: u64 = 24;
const BATCH: u32 = 16;

type Record = Arc<Mutex<Vec<Vec<u8>>>>;

/// Runs a cascade of 5 stages and `dummies`; returns each hop's record and
/// the wall-clock range of the run (Unix seconds).
struct Run {
    records: Vec<Record>,
    hops: Vec<HopInfo>,
    model: ModelSpec,
    padding: PaddingPolicy,
    time: (u64, u64),
}

fn run(base: u64, dummies: &[usize]) -> Run {
    let model = ModelSpec::parse(MODEL, "narrow").unwrap();
    let cfg = TrainConfig {
        epochs: 1,
        batch: BATCH as usize,
        sgd: Sgd::default(),
        seed: RunSeed::random(),
        micro_batches: 1,
    };
    let (train, test) = (dataset(STEPS as usize * BATCH as usize, 1), dataset(64, 2));
    let n = 5 + dummies.len();
    let records: Vec<Record> = (0..n).map(|_| Arc::default()).collect();
    let hops: Vec<HopInfo> = records
        .iter()
        .enumerate()
        .map(|(i, r)| {
            start_node_with(
                base + i as u64,
                NodeConfig {
                    record: Some(r.clone()),
                    ..NodeConfig::default()
                },
            )
        })
        .collect();
    let t0 = now();
    let mut runner = CascadeRunner::builder(&model, &cfg, hops.clone())
        .options(CascadeOptions {
            audit_rate: AuditRate::new(0.2),
            dummies: dummies.to_vec(),
            ..CascadeOptions::default()
        })
        .checkpoints(Checkpoints {
            dir: None,
            every: NonZeroU64::new(4),
        })
        .connect()
        .unwrap();
    run_training(&mut runner, &model, &train, &test, &cfg, &mut Quiet).unwrap();
    let padding = runner.policy();
    let stats = runner.audit_stats().clone();
    assert!(stats.audits > 0 && stats.failures.is_empty(), "{stats:?}");
    runner.close().unwrap();
    drop(runner);
    Run {
        records,
        hops,
        model,
        padding,
        time: (t0, now()),
    }
}

fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs()
}

fn windows(record: &Record) -> HashSet<[u8; 8]> {
    let r = record.lock().unwrap();
    r.iter()
        .flat_map(|bytes| bytes.windows(8).map(|w| w.try_into().unwrap()))
        .collect()
}

/// The 8-byte windows of what every participant knows: the notes a
/// designer sends at every step (their public fields), the model's stages
/// and optimiser settings, the cascade's padding and the clock as an init
/// note writes them.
fn public(model: &ModelSpec, padding: PaddingPolicy, time: (u64, u64)) -> HashSet<[u8; 8]> {
    let mut p = Vec::new();
    for step in 0..=STEPS + 2 {
        for rows in 1..=64 {
            p.push(
                SessionNote::Forward(ForwardNote {
                    step,
                    micro: Micro::WHOLE,
                    batch_rows: rows,
                    labels: Vec::new(),
                })
                .encode(),
            );
        }
        for need_input_grad in [false, true] {
            p.push(
                SessionNote::Backward(BackwardNote {
                    step,
                    micro: Micro::WHOLE,
                    need_input_grad,
                })
                .encode(),
            );
        }
        for chunk in 0..64 {
            p.push(SessionNote::Fetch(ChunkNote { step, chunk }).encode());
        }
    }
    let mut stages = model.stages.clone();
    for w in [16, 10, 784] {
        stages.push(mixnn_model::spec::StageSpec::identity(w));
    }
    for (stage, issued_at) in stages
        .iter()
        .flat_map(|s| (time.0.saturating_sub(40)..=time.1).map(move |t| (s.clone(), t)))
    {
        p.push(
            InitNote {
                arith: mixnn_model::arith::ARITH_VERSION,
                stage,
                sgd: Sgd::default(),
                seed: 0,
                start_step: 0,
                padding,
                issued_at,
                prev_link: [0; 32],
                next_link: [0; 32],
                designer_link: [0; 32],
                prev_addr: None,
                next_addr: None,
                designer_addr: None,
                reply_key: [0; 32],
                audit_key: None,
            }
            .encode(),
        );
    }
    p.iter()
        .flat_map(|b| b.windows(8).map(|w| w.try_into().unwrap()))
        .collect()
}

/// Windows that only say what the clock said: a Unix time in the run's
/// range (the init's issue time, jittered per hop).
fn is_time(w: &[u8; 8], (t0, t1): (u64, u64)) -> bool {
    let v = u64::from_le_bytes(*w);
    (t0.saturating_sub(3600)..=t1 + 3600).contains(&v)
}

/// The windows of what two hops that share neighbour `k` both know of it
/// by talking to it: its link key and its address.
fn neighbour(hop: &HopInfo) -> HashSet<[u8; 8]> {
    let key = hex::decode(&hop.link).unwrap();
    // Its address, between two other addresses on the same host (every
    // node of this test is on 127.0.0.1, so the fields around it in a note
    // start with the same bytes).
    let host = mixnn_wire::HopAddr(std::net::SocketAddr::new(hop.addr.ip(), 0)).encode();
    let addr = [
        &host[..],
        &mixnn_wire::HopAddr(hop.addr).encode(),
        &host[..],
    ]
    .concat();
    [key, addr]
        .iter()
        .flat_map(|b| b.windows(8).map(|w| w.try_into().unwrap()))
        .collect()
}

fn assert_nothing_common(r: Run, label: &str) {
    let Run {
        records,
        hops,
        model,
        padding,
        time,
    } = r;
    let mut public = public(&model, padding, time);
    // Every node of this test runs on one host: its IP, as an address
    // field starts, is no secret of anyone's.
    // Addresses on it differ in their two port bytes only, so two of them
    // (or "no address", a zero byte, next to one) agree in a window that
    // holds at most one port byte by chance; a whole port in common still
    // counts.
    let ip = hops[0].addr.ip();
    for port in 0..=u16::MAX {
        let a = mixnn_wire::HopAddr(std::net::SocketAddr::new(ip, port)).encode();
        let host = mixnn_wire::HopAddr(std::net::SocketAddr::new(ip, 0)).encode();
        // 0 ‖ address ‖ the next address's family and IP.
        let s = [&[0u8][..], &a[..], &host[..17]].concat();
        for (i, w) in s.windows(8).enumerate() {
            let port_bytes = (i..i + 8).filter(|j| (18..20).contains(j)).count();
            if port_bytes <= 1 {
                public.insert(w.try_into().unwrap());
            }
        }
    }
    let all: Vec<HashSet<[u8; 8]>> = records.iter().map(windows).collect();
    // Positions {1, 3}, {2, 4}, {1, 5} (1-based), and both ends.
    let last = records.len() - 1;
    for (a, b) in [(0, 2), (1, 3), (0, 4), (0, last)] {
        // Hops two apart share a neighbour; both know who it is.
        let shared = if b == a + 2 {
            neighbour(&hops[a + 1])
        } else {
            HashSet::new()
        };
        let common: Vec<[u8; 8]> = all[a]
            .intersection(&all[b])
            .filter(|w| w.iter().any(|&x| x != 0))
            .filter(|w| !public.contains(*w))
            .filter(|w| !is_time(w, time))
            .filter(|w| !shared.contains(*w))
            .copied()
            .collect();
        assert!(
            common.is_empty(),
            "{label}: hops {} and {} received {} common 8-byte strings, e.g. {:02x?}",
            a + 1,
            b + 1,
            common.len(),
            &common[..common.len().min(4)]
        );
        assert!(
            all[a].len() > 1000 && all[b].len() > 1000,
            "{label}: records too small"
        );
    }
}

#[test]
fn colluding_hops_share_no_byte_string_but_public_ones() {
    assert_nothing_common(run(700, &[]), "five hops");
}

#[test]
fn colluding_hops_share_no_byte_string_but_public_ones_with_dummies() {
    assert_nothing_common(run(720, &[1, 4]), "five hops and two dummies");
}
