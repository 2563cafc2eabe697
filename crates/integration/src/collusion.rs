//! What two colluding hops' records have in common: the check of the
//! collusion tests, in-process (`tests/collusion.rs`) and with `mixnn node`
//! processes (`crates/cli/tests/collusion.rs`).
//!
//! Every hop records every byte string it receives outside the model's
//! tensors (the node's `record`). Two colluders may share 8-byte strings
//! only where every participant knows them anyway: all-zero runs, the
//! public protocol values (step numbers, micro-batch and chunk indices,
//! batch sizes, the model's description and optimiser settings, the
//! padding), the wall clock, the host all test nodes share, and — for hops
//! two apart — the link key and address of the neighbour they share.

use std::collections::HashSet;
use std::net::SocketAddr;

use mixnn_model::spec::{ModelSpec, StageSpec};
use mixnn_model::stage::Sgd;
use mixnn_proto::{BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, SessionNote};
use mixnn_wire::{HopAddr, PaddingPolicy};

/// An 8-byte window.
pub type Window = [u8; 8];

/// Every 8-byte window of `records`.
pub fn windows<'a>(records: impl IntoIterator<Item = &'a [u8]>) -> HashSet<Window> {
    records
        .into_iter()
        .flat_map(|bytes| bytes.windows(8).map(|w| w.try_into().unwrap()))
        .collect()
}

/// Parses a `mixnn node --record-received` file: `len u32 LE ‖ bytes`
/// records.
pub fn parse_record_file(bytes: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut rest = bytes;
    while rest.len() >= 4 {
        let len = u32::from_le_bytes(rest[..4].try_into().unwrap()) as usize;
        assert!(rest.len() >= 4 + len, "truncated record file");
        out.push(rest[4..4 + len].to_vec());
        rest = &rest[4 + len..];
    }
    assert!(rest.is_empty(), "trailing bytes in a record file");
    out
}

/// One run's records and what is public about it.
pub struct Colluders<'a> {
    /// The windows each hop received, by position.
    pub records: Vec<HashSet<Window>>,
    /// Each hop's address and link key, by position.
    pub hops: Vec<(SocketAddr, [u8; 32])>,
    /// The model trained.
    pub model: &'a ModelSpec,
    /// Its optimiser.
    pub sgd: Sgd,
    /// The cascade's padding.
    pub padding: PaddingPolicy,
    /// Training steps of the run (test batches included, as an upper
    /// bound on every step number sent).
    pub steps: u64,
    /// The wall-clock range of the run (Unix seconds).
    pub time: (u64, u64),
}

/// The 8-byte windows of what every participant knows: the notes a
/// designer sends at every step (their public fields), init notes of the
/// model's stages (and identity stages of its widths) with every key zero
/// at every second of the run, the padding and the optimiser.
fn public(c: &Colluders<'_>) -> HashSet<Window> {
    let mut p = Vec::new();
    for step in 0..=c.steps + 2 {
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
    let mut stages = c.model.stages.clone();
    let mut widths: Vec<usize> = c
        .model
        .stages
        .iter()
        .flat_map(|s| [s.input, s.output()])
        .collect();
    widths.sort_unstable();
    widths.dedup();
    stages.extend(widths.into_iter().map(StageSpec::identity));
    let (t0, t1) = c.time;
    for stage in &stages {
        for issued_at in t0.saturating_sub(40)..=t1 {
            p.push(
                InitNote {
                    arith: mixnn_model::arith::ARITH_VERSION,
                    stage: stage.clone(),
                    sgd: c.sgd,
                    seed: 0,
                    start_step: 0,
                    padding: c.padding,
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
    }
    let mut public = windows(p.iter().map(Vec::as_slice));
    // Every test node runs on one host: its IP, as an address field
    // starts, is no secret of anyone's. Addresses on it differ in their
    // two port bytes only, so two of them (or "no address", a zero byte,
    // next to one) agree in a window that holds at most one port byte by
    // chance; a whole port in common still counts.
    let ip = c.hops[0].0.ip();
    let host = HopAddr(SocketAddr::new(ip, 0)).encode();
    for port in 0..=u16::MAX {
        let a = HopAddr(SocketAddr::new(ip, port)).encode();
        // 0 ‖ address ‖ the next address's family and IP.
        let s = [&[0u8][..], &a[..], &host[..17]].concat();
        for (i, w) in s.windows(8).enumerate() {
            let port_bytes = (i..i + 8).filter(|j| (18..20).contains(j)).count();
            if port_bytes <= 1 {
                public.insert(w.try_into().unwrap());
            }
        }
    }
    public
}

/// Windows that only say what the clock said: a Unix time around the
/// run (the init's issue time, jittered per hop).
fn is_time(w: &Window, (t0, t1): (u64, u64)) -> bool {
    let v = u64::from_le_bytes(*w);
    (t0.saturating_sub(3600)..=t1 + 3600).contains(&v)
}

/// The windows of what two hops that share a neighbour both know of it
/// by talking to it: its link key and its address.
fn neighbour((addr, key): (SocketAddr, [u8; 32])) -> HashSet<Window> {
    // Its address, between two other addresses on the same host (every
    // node of these tests is on 127.0.0.1, so the fields around it in a
    // note start with the same bytes).
    let host = HopAddr(SocketAddr::new(addr.ip(), 0)).encode();
    let addr = [&host[..], &HopAddr(addr).encode(), &host[..]].concat();
    windows([&key[..], &addr[..]])
}

/// Asserts that the colluders at positions {1, 3}, {2, 4}, {1, 5}
/// (1-based) and both ends share no window beyond the public ones.
pub fn assert_nothing_common(c: &Colluders<'_>, label: &str) {
    if let Err(e) = check_nothing_common(c) {
        panic!("{label}: {e}");
    }
}

/// [`assert_nothing_common`], as a result: what the first pair of
/// colluders found in common.
pub fn check_nothing_common(c: &Colluders<'_>) -> Result<(), String> {
    let public = public(c);
    let last = c.records.len() - 1;
    for (a, b) in [(0, 2), (1, 3), (0, 4), (0, last)] {
        // Hops two apart share a neighbour; both know who it is.
        let shared = if b == a + 2 {
            neighbour(c.hops[a + 1])
        } else {
            HashSet::new()
        };
        let common: Vec<Window> = c.records[a]
            .intersection(&c.records[b])
            .filter(|w| w.iter().any(|&x| x != 0))
            .filter(|w| !public.contains(*w))
            .filter(|w| !is_time(w, c.time))
            .filter(|w| !shared.contains(*w))
            .copied()
            .collect();
        if !common.is_empty() {
            return Err(format!(
                "hops {} and {} received {} common 8-byte strings, e.g. {:02x?}",
                a + 1,
                b + 1,
                common.len(),
                &common[..common.len().min(4)]
            ));
        }
        if c.records[a].len() <= 1000 || c.records[b].len() <= 1000 {
            return Err(format!("records of hops {} and {} too small", a + 1, b + 1));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use rand_core::{RngCore, SeedableRng};

    use super::*;

    #[test]
    fn a_record_file_parses_back() {
        let mut f = Vec::new();
        for r in [&b"abc"[..], b"", b"0123456789"] {
            f.extend_from_slice(&(r.len() as u32).to_le_bytes());
            f.extend_from_slice(r);
        }
        let got = parse_record_file(&f);
        assert_eq!(
            got,
            vec![b"abc".to_vec(), Vec::new(), b"0123456789".to_vec()]
        );
    }

    #[test]
    fn a_shared_secret_is_found() {
        let model = ModelSpec::parse(crate::NARROW, "narrow").unwrap();
        let addr: SocketAddr = "127.0.0.1:9".parse().unwrap();
        let mut secret = [0u8; 32];
        rand_chacha::ChaCha8Rng::seed_from_u64(99).fill_bytes(&mut secret);
        // Five hops' records of their own random bytes, and one secret
        // that hops 2 and 4 both received.
        let mut records: Vec<HashSet<Window>> = (0..5)
            .map(|i| {
                let mut own = vec![0u8; 2000];
                rand_chacha::ChaCha8Rng::seed_from_u64(i).fill_bytes(&mut own);
                windows([&own[..]])
            })
            .collect();
        records[1].extend(windows([&secret[..]]));
        records[3].extend(windows([&secret[..]]));
        let c = Colluders {
            records,
            hops: vec![(addr, [7; 32]); 5],
            model: &model,
            sgd: Sgd::default(),
            padding: PaddingPolicy::Uniform { max_body: 100 },
            steps: 4,
            time: (1_000_000, 1_000_010),
        };
        let err = check_nothing_common(&c).unwrap_err();
        assert!(err.contains("hops 2 and 4 received 25 common"), "{err}");
        // Without it, nothing.
        let mut c = c;
        c.records[3] = {
            let mut own = vec![0u8; 2000];
            rand_chacha::ChaCha8Rng::seed_from_u64(3).fill_bytes(&mut own);
            windows([&own[..]])
        };
        assert_eq!(check_nothing_common(&c), Ok(()));
    }
}
