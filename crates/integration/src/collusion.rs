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
//! two apart — the link key and address of the neighbour they share. A
//! window that is 7 bytes of such a value and one byte more is not
//! counted (that byte agrees by chance 1 time in 256 where a known field
//! meets a secret one: a stage seed after the optimiser settings).

use std::collections::HashSet;
use std::net::SocketAddr;

use mixnn_model::optim::Optimizer;
use mixnn_model::spec::{ModelSpec, Shape, StageSpec};
use mixnn_proto::{
    AuditNote, BackwardNote, ChunkNote, ForwardNote, InitNote, Micro, Opens, SessionNote,
};
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
    /// What each hop received (its records), by position.
    pub records: Vec<Vec<Vec<u8>>>,
    /// Each hop's address and link key, by position.
    pub hops: Vec<(SocketAddr, [u8; 32])>,
    /// The model trained.
    pub model: &'a ModelSpec,
    /// Its optimiser.
    pub optimizer: Optimizer,
    /// The cascade's padding.
    pub padding: PaddingPolicy,
    /// Training steps of the run (test batches included, as an upper
    /// bound on every step number sent).
    pub steps: u64,
    /// The wall-clock range of the run (Unix seconds).
    pub time: (u64, u64),
}

/// What some participants know: its 8-byte windows, and its 7-byte ones.
/// A common window that is 7 bytes of a known string and one more byte
/// says no more than that byte, which two records share by chance one
/// time in 256 where a known field meets a secret one (a seed after the
/// optimiser settings, a key after a zero byte); it is not counted.
#[derive(Default)]
struct Known {
    windows: HashSet<Window>,
    sevens: HashSet<[u8; 7]>,
}

impl Known {
    fn of<'a>(strings: impl IntoIterator<Item = &'a [u8]>) -> Known {
        let mut k = Known::default();
        for s in strings {
            k.windows
                .extend(s.windows(8).map(|w| <Window>::try_from(w).unwrap()));
            k.sevens
                .extend(s.windows(7).map(|w| <[u8; 7]>::try_from(w).unwrap()));
        }
        k
    }

    /// `w` is known, or all but its first or last byte is.
    fn explains(&self, w: &Window) -> bool {
        self.windows.contains(w)
            || self.sevens.contains(<&[u8; 7]>::try_from(&w[..7]).unwrap())
            || self.sevens.contains(<&[u8; 7]>::try_from(&w[1..]).unwrap())
    }
}

/// What every participant knows: the notes a designer sends at every step
/// (their public fields), init notes of the model's stages (split where a
/// dummy takes a stage's last op, and identity stages of its widths) with
/// every key zero at every second of the run,
/// the padding and the optimiser, and the test host's addresses.
fn public(c: &Colluders<'_>) -> Known {
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
        // Chunk indices are counters every hop sees run up from zero.
        for chunk in 0..256 {
            p.push(SessionNote::Fetch(ChunkNote { step, chunk }).encode());
            p.push(
                SessionNote::Audit(AuditNote {
                    step,
                    chunk,
                    opens: Opens::Step,
                })
                .encode(),
            );
        }
        // Test batches (and their audits) are counted like steps; an
        // audited test batch's opening runs to as many chunks as a step's
        // (the run of `crates/cli/tests/collusion.rs` reached chunk 16).
        for batch in 0..64 {
            p.push(SessionNote::Test { step, batch }.encode());
        }
        for batch in 0..16 {
            for chunk in 0..256 {
                p.push(
                    SessionNote::Audit(AuditNote {
                        step,
                        chunk,
                        opens: Opens::Test { batch },
                    })
                    .encode(),
                );
            }
        }
    }
    let mut stages = c.model.stages.clone();
    // A dummy hop may take the last op of the real stage before it: both
    // halves of every such split are as public as the stage itself.
    for stage in &c.model.stages {
        if stage.ops.len() >= 2 {
            let mut kept = stage.clone();
            if let Some(last) = kept.ops.pop() {
                stages.push(StageSpec {
                    input: kept.output(),
                    ops: vec![last],
                });
                stages.push(kept);
            }
        }
    }
    let mut shapes: Vec<Shape> = c
        .model
        .stages
        .iter()
        .flat_map(|s| [s.input.clone(), s.output()])
        .collect();
    shapes.sort_by(|a, b| a.dims().cmp(b.dims()));
    shapes.dedup();
    stages.extend(shapes.into_iter().map(StageSpec::identity));
    let (t0, t1) = c.time;
    for stage in &stages {
        for issued_at in t0.saturating_sub(40)..=t1 {
            p.push(
                InitNote {
                    arith: mixnn_model::arith::ARITH_VERSION,
                    stage: stage.clone(),
                    optimizer: c.optimizer,
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
    let mut public = Known::of(p.iter().map(Vec::as_slice));
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
                public.windows.insert(w.try_into().unwrap());
            }
        }
        for (i, w) in s.windows(7).enumerate() {
            let port_bytes = (i..i + 7).filter(|j| (18..20).contains(j)).count();
            if port_bytes <= 1 {
                public.sevens.insert(w.try_into().unwrap());
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

/// What two hops that share a neighbour both know of it by talking to
/// it: its link key and its address.
fn neighbour((addr, key): (SocketAddr, [u8; 32])) -> Known {
    // Its address, between two other addresses on the same host (every
    // node of these tests is on 127.0.0.1, so the fields around it in a
    // note start with the same bytes).
    let host = HopAddr(SocketAddr::new(addr.ip(), 0)).encode();
    let addr = [&host[..], &HopAddr(addr).encode(), &host[..]].concat();
    Known::of([&key[..], &addr[..]])
}

/// Asserts that the colluders at positions {1, 3}, {2, 4}, {1, 5}
/// (1-based) and both ends share no window beyond the public ones; on
/// failure it says where each common window is in every hop's records.
pub fn assert_nothing_common(c: &Colluders<'_>, label: &str) {
    if let Err((e, common)) = check(c) {
        let places: Vec<String> = common.iter().flat_map(|w| whereabouts(c, w)).collect();
        panic!("{label}: {e}\n{}", places.join("\n"));
    }
}

/// [`assert_nothing_common`], as a result: what the first pair of
/// colluders found in common.
pub fn check_nothing_common(c: &Colluders<'_>) -> Result<(), String> {
    check(c).map_err(|(e, _)| e)
}

/// Where window `w` is in every hop's records: hop, record, its length
/// and first bytes, offset and the bytes around.
fn whereabouts(c: &Colluders<'_>, w: &Window) -> Vec<String> {
    let mut out = Vec::new();
    for (pos, records) in c.records.iter().enumerate() {
        for (k, r) in records.iter().enumerate() {
            if let Some(at) = r.windows(8).position(|x| x == w) {
                let (lo, hi) = (at.saturating_sub(16), (at + 24).min(r.len()));
                out.push(format!(
                    "{w:02x?} at hop {} record {k} (len {}, starts {:02x?}), offset {at}: {:02x?}",
                    pos + 1,
                    r.len(),
                    &r[..r.len().min(8)],
                    &r[lo..hi]
                ));
            }
        }
    }
    out
}

fn check(c: &Colluders<'_>) -> Result<(), (String, Vec<Window>)> {
    let public = public(c);
    let all: Vec<HashSet<Window>> = c
        .records
        .iter()
        .map(|r| windows(r.iter().map(Vec::as_slice)))
        .collect();
    let last = all.len() - 1;
    for (a, b) in [(0, 2), (1, 3), (0, 4), (0, last)] {
        // Hops two apart share a neighbour; both know who it is.
        let shared = if b == a + 2 {
            neighbour(c.hops[a + 1])
        } else {
            Known::default()
        };
        let common: Vec<Window> = all[a]
            .intersection(&all[b])
            .filter(|w| w.iter().any(|&x| x != 0))
            .filter(|w| !public.explains(w))
            .filter(|w| !is_time(w, c.time))
            .filter(|w| !shared.explains(w))
            .copied()
            .collect();
        if !common.is_empty() {
            let e = format!(
                "hops {} and {} received {} common 8-byte strings, e.g. {:02x?}",
                a + 1,
                b + 1,
                common.len(),
                &common[..common.len().min(4)]
            );
            return Err((e, common.into_iter().take(4).collect()));
        }
        if all[a].len() <= 1000 || all[b].len() <= 1000 {
            let e = format!("records of hops {} and {} too small", a + 1, b + 1);
            return Err((e, Vec::new()));
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
        let own = |i: u64| {
            let mut own = vec![0u8; 2000];
            rand_chacha::ChaCha8Rng::seed_from_u64(i).fill_bytes(&mut own);
            own
        };
        let mut records: Vec<Vec<Vec<u8>>> = (0..5).map(|i| vec![own(i)]).collect();
        records[1].push(secret.to_vec());
        records[3].push(secret.to_vec());
        let c = Colluders {
            records,
            hops: vec![(addr, [7; 32]); 5],
            model: &model,
            optimizer: Optimizer::default(),
            padding: PaddingPolicy::Uniform { max_body: 100 },
            steps: 4,
            time: (1_000_000, 1_000_010),
        };
        let err = check_nothing_common(&c).unwrap_err();
        assert!(err.contains("hops 2 and 4 received 25 common"), "{err}");
        // Without it, nothing.
        let mut c = c;
        c.records[3] = vec![own(3)];
        assert_eq!(check_nothing_common(&c), Ok(()));
        // Seven bytes of the neighbour's key after a byte that agrees by
        // chance (the key after a zero byte in both): not counted.
        let mut key = [0u8; 32];
        rand_chacha::ChaCha8Rng::seed_from_u64(5).fill_bytes(&mut key);
        c.hops[2].1 = key;
        let mut chance = vec![0u8];
        chance.extend_from_slice(&key[..7]);
        c.records[1].push(chance.clone());
        c.records[3].push(chance);
        assert_eq!(check_nothing_common(&c), Ok(()));
        // Two such bytes are counted.
        let mut two = vec![0x5a, 0xa5];
        two.extend_from_slice(&key[..6]);
        c.records[1].push(two.clone());
        c.records[3].push(two);
        assert!(check_nothing_common(&c).is_err());
    }
}
