//! Fuzz target bodies, one per decoder of untrusted bytes in this crate, as
//! plain functions (the pattern of `mixnn_wire::fuzzing`).
//!
//! `fuzz/` calls them under cargo-fuzz; `tests/decoders.rs` calls them on
//! stable with arbitrary bytes and with mutations of valid encodings (so
//! the mutated bytes get past the first length check). Each must return
//! normally for every input: a panic is a bug. Where a decoder accepts
//! the bytes, what it returns must survive a round trip: encoding it and
//! decoding that gives the same encoding again.

use mixnn_wire::Op;

use crate::audit::{self, Opening};
use crate::observed::{self, Observation};
use crate::reply::{ReplyKey, Sealed};
use crate::trailer::{self, Pass, SlotContext, TrailerKeys};
use crate::{decode_params, decode_state, encode_params, encode_state, ParamChunk};
use crate::{InitNote, SessionNote};
use mixnn_model::spec::{OpSpec, Shape, StageSpec};
use mixnn_model::stage::{NamedParam, StageState};

/// The ops a session note is decoded for.
pub const SESSION_OPS: [Op; 8] = [
    Op::Forward,
    Op::Backward,
    Op::Test,
    Op::Loop,
    Op::Fetch,
    Op::Load,
    Op::Audit,
    Op::Close,
];

/// `InitNote::decode`: what it accepts re-encodes to a note that decodes
/// to the same.
pub fn init_note(data: &[u8]) {
    if let Ok(note) = InitNote::decode(data) {
        let again = InitNote::decode(&note.encode());
        assert_eq!(again.as_ref(), Ok(&note), "init note round trip");
    }
}

/// `SessionNote::decode` for the op the first byte picks.
pub fn session_note(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let op = SESSION_OPS[usize::from(sel) % SESSION_OPS.len()];
    if let Ok(note) = SessionNote::decode(op, rest) {
        assert_eq!(note.op(), op, "a note decoded for {op:?} is one");
        let again = SessionNote::decode(op, &note.encode());
        assert_eq!(again.as_ref(), Ok(&note), "session note round trip");
    }
}

/// `Opening::decode` (its layout is canonical: what decodes re-encodes
/// to the same bytes), `audit::split` and the opening's checks against
/// slots made of the same bytes.
pub fn opening(data: &[u8]) {
    if let Ok((body, trailer)) = audit::split(data) {
        assert_eq!(body.len() + trailer.len(), data.len(), "split keeps bytes");
    }
    if let Ok(o) = Opening::decode(data) {
        assert_eq!(o.encode(), data, "opening round trip");
        let slot = trailer::Slot {
            digest: audit::state_digest(&o.before),
            input: audit::hash_tensor(&o.x),
            output: audit::hash_tensor(&o.y),
        };
        let back = trailer::Slot {
            digest: o.after,
            input: audit::hash_tensor(&o.g_in),
            output: audit::hash_tensor(&o.g_out),
        };
        assert_eq!(
            o.check(&slot, &back),
            Ok(()),
            "an opening fits its own slots"
        );
        let _ = o.check_test(&slot);
    }
}

/// One observation of each kind, valid (the seeds of [`observation`]'s
/// mutations, and the samples of `observed`'s own tests).
pub fn observation_samples() -> Vec<Observation> {
    vec![
        Observation::Stage {
            spec: StageSpec {
                input: Shape::flat(4),
                ops: vec![OpSpec::Linear {
                    input: 4,
                    output: 3,
                }],
            },
            first: true,
            last: false,
        },
        Observation::Forward {
            step: 7,
            micro: 1,
            at_us: 1_700_000_000_000_000,
            labels: vec![3, 1, 4],
            input: vec![1, 2, 3],
            output: vec![9; 40],
        },
        Observation::Backward {
            step: 7,
            micro: 0,
            at_us: 5,
            grad: Vec::new(),
            input_grad: vec![6; 12],
        },
        Observation::Test {
            step: 9,
            at_us: 6,
            input: vec![0],
            output: vec![1, 1],
        },
        Observation::Final(StageState {
            steps: 9,
            tensors: vec![NamedParam {
                name: "0.weight".into(),
                shape: vec![2],
                values: vec![0.5, -1.0],
            }],
        }),
    ]
}

/// `Observation::decode` and `observed::split_records` (a curious hop's
/// record file, read by the adversary simulator).
pub fn observation(data: &[u8]) {
    if let Ok(o) = Observation::decode(data) {
        let bytes = o.encode();
        let again = Observation::decode(&bytes).map(|o| o.encode());
        assert_eq!(again.as_ref(), Ok(&bytes), "observation round trip");
    }
    if let Ok(records) = observed::split_records(data) {
        assert!(
            records.iter().map(|r| r.len()).sum::<usize>() <= data.len(),
            "records lie inside the file"
        );
        for r in records {
            let _ = observed::test_step(r);
        }
    }
}

/// The state decoders: `ParamChunk::decode`, `decode_params`,
/// `decode_state`.
pub fn state(data: &[u8]) {
    if let Ok(chunk) = ParamChunk::decode(data) {
        let again = ParamChunk::decode(&chunk.encode());
        assert_eq!(again.as_ref(), Ok(&chunk), "param chunk round trip");
    }
    if let Ok(params) = decode_params(data) {
        let bytes = encode_params(&params);
        let again = decode_params(&bytes).map(|p| encode_params(&p));
        assert_eq!(again.as_ref(), Ok(&bytes), "params round trip");
    }
    if let Ok(s) = decode_state(data) {
        let bytes = encode_state(&s);
        let again = decode_state(&bytes).map(|s| encode_state(&s));
        assert_eq!(again.as_ref(), Ok(&bytes), "state round trip");
    }
}

/// The keys of three hops, fixed.
fn hops() -> [TrailerKeys; 3] {
    [
        TrailerKeys::new(&[1; 32]),
        TrailerKeys::new(&[2; 32]),
        TrailerKeys::new(&[3; 32]),
    ]
}

/// The slot every hop of [`trailer()`] states.
const SLOT: trailer::Slot = trailer::Slot {
    digest: [4; 32],
    input: [5; 32],
    output: [6; 32],
};

/// What selector byte `sel` of [`trailer()`] picks: the message's context and
/// how many of the three hops it visited.
fn trailer_case(sel: u8) -> (SlotContext, usize) {
    let pass = [Pass::Forward, Pass::Backward, Pass::Test][usize::from(sel % 3)];
    let ctx = SlotContext {
        step: u64::from(sel),
        pass,
        index: u32::from(sel >> 4),
    };
    (ctx, usize::from(sel >> 2) % 4)
}

/// The trailer the designer sends for case `sel`, and the one that comes
/// back when every hop it visits adds its layer honestly.
fn honest_trailer(sel: u8) -> (Vec<u8>, Vec<u8>) {
    let (ctx, n) = trailer_case(sel);
    let keys = hops();
    let visited: Vec<&TrailerKeys> = keys.iter().take(n).collect();
    let Ok(sent) = trailer::fill(&visited, &ctx, &[9; 32]) else {
        panic!("three hops fit a trailer");
    };
    let mut t = sent.clone();
    for k in &visited {
        let Ok(next) = trailer::add_layer(k, &ctx, &SLOT, &t) else {
            panic!("a hop refused the designer's own trailer");
        };
        t = next;
    }
    (sent, t)
}

/// A valid input of [`trailer()`]: selector `sel` and the honest trailer.
pub fn trailer_sample(sel: u8) -> Vec<u8> {
    [&[sel][..], &honest_trailer(sel).1].concat()
}

/// A trailer that came back (the designer's `trailer::open`) and one that
/// arrives at a hop (`trailer::check_received`, `trailer::add_layer`):
/// every byte of it from the fuzzer; the first picks the pass and how many
/// hops it visited. The honest trailer opens to every hop's slot.
pub fn trailer(data: &[u8]) {
    let Some((&sel, rest)) = data.split_first() else {
        return;
    };
    let (ctx, n) = trailer_case(sel);
    let keys = hops();
    let visited: Vec<&TrailerKeys> = keys.iter().take(n).collect();
    let (sent, honest) = honest_trailer(sel);
    if let Ok(opened) = trailer::open(&visited, &ctx, rest, &sent) {
        assert_eq!(opened.slots.len(), n, "one slot per visited hop");
        if rest == honest.as_slice() {
            assert!(
                opened.slots.iter().all(|s| *s == Ok(SLOT)),
                "an honest trailer opens to its slots"
            );
        }
    }
    let checked = trailer::check_received(&keys[0], &ctx, rest);
    let layered = trailer::add_layer(&keys[0], &ctx, &SLOT, rest);
    assert_eq!(checked.is_ok(), layered.is_ok(), "add_layer checks first");
    if let Ok(out) = layered {
        assert_eq!(out.len(), trailer::TRAILER_LEN, "a layer keeps the length");
    }
}

/// The one body [`sealed`] accepts: chunk 0 of an audit opening at step
/// 3, sealed under its key.
pub fn sealed_sample() -> Vec<u8> {
    ReplyKey([7; 32]).seal(Sealed::Audit, 3, 0, b"an opening", [8; 24])
}

/// `ReplyKey::open` on a sealed body from the fuzzer: it opens exactly the
/// body the key sealed ([`sealed_sample`]) for that kind, step and chunk,
/// and nothing else (no changed byte, no other kind, step or chunk).
pub fn sealed(data: &[u8]) {
    let key = ReplyKey([7; 32]);
    let genuine = data == sealed_sample().as_slice();
    for (kind, step, chunk) in [
        (Sealed::Audit, 3, 0),
        (Sealed::Audit, 3, 1),
        (Sealed::Audit, 4, 0),
        (Sealed::Fetch, 3, 0),
        (Sealed::Load, 3, 0),
        (Sealed::AuditTest { batch: 0 }, 3, 0),
    ] {
        let opened = key.open(kind, step, chunk, data);
        let expected = genuine && (kind, step, chunk) == (Sealed::Audit, 3, 0);
        assert_eq!(opened.is_ok(), expected, "{kind:?} {step} {chunk} opened");
        if let Ok(plain) = opened {
            assert_eq!(plain, b"an opening", "the sealed plaintext");
        }
    }
}
