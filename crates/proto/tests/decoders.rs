//! The decoders of untrusted bytes in this crate under the fuzz target
//! bodies of `mixnn_proto::fuzzing`, on stable: arbitrary bytes, and valid
//! encodings (init notes of every shipped model's stages, a session note of
//! every op, openings, observations, states, honest trailers, a sealed
//! body) mutated the way a fuzzer would (`mixnn_model::fuzzing::mutate`).
#![allow(clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::fuzzing::mutate;
use mixnn_model::optim::Optimizer;
use mixnn_model::spec::ModelSpec;
use mixnn_model::stage::{NamedParam, StageState};
use mixnn_proto::audit::Opening;
use mixnn_proto::fuzzing::{self, SESSION_OPS};
use mixnn_proto::observed::Observation;
use mixnn_proto::reply::{ReplyKey, Sealed};
use mixnn_proto::{
    encode_params, encode_state, AuditNote, BackwardNote, ChunkNote, ForwardNote, InitNote, Micro,
    Opens, ParamChunk, SessionNote,
};
use mixnn_wire::PaddingPolicy;
use proptest::prelude::*;

fn init_samples() -> Vec<Vec<u8>> {
    let models = [
        include_str!("../../../models/paper-mlp.toml"),
        include_str!("../../../models/vgg-fmnist.toml"),
    ];
    let mut out = Vec::new();
    for (i, text) in models.iter().enumerate() {
        let model = ModelSpec::parse(text, "model").unwrap();
        for (k, stage) in model.stages.iter().enumerate() {
            let note = InitNote {
                arith: mixnn_model::arith::ARITH_VERSION,
                stage: stage.clone(),
                optimizer: Optimizer::default(),
                seed: 99 + k as u64,
                start_step: 7 * i as u64,
                padding: if k % 2 == 0 {
                    PaddingPolicy::Uniform { max_body: 50_000 }
                } else {
                    PaddingPolicy::Classes { max_body: 1 << 20 }
                },
                issued_at: 1_700_000_000,
                prev_link: [1; 32],
                next_link: [2; 32],
                designer_link: [3; 32],
                prev_addr: (k > 0).then(|| "10.0.0.1:7001".parse().unwrap()),
                next_addr: Some("[::1]:7002".parse().unwrap()),
                designer_addr: (k == 0).then(|| "127.0.0.1:9".parse().unwrap()),
                reply_key: [5; 32],
                audit_key: (k % 2 == 1).then_some([6; 32]),
            };
            out.push(note.encode());
        }
    }
    out
}

fn session_samples() -> Vec<Vec<u8>> {
    let notes = [
        SessionNote::Forward(ForwardNote {
            step: 3,
            micro: Micro::new(1, 4).unwrap(),
            batch_rows: 16,
            labels: vec![1, 9, 0, 4],
        }),
        SessionNote::Backward(BackwardNote {
            step: 3,
            micro: Micro::WHOLE,
            need_input_grad: true,
        }),
        SessionNote::Test { step: 5, batch: 2 },
        SessionNote::Loop { step: 5 },
        SessionNote::Fetch(ChunkNote { step: 6, chunk: 1 }),
        SessionNote::Load(ChunkNote { step: 6, chunk: 0 }),
        SessionNote::Audit(AuditNote {
            step: 6,
            chunk: 2,
            opens: Opens::Test { batch: 1 },
        }),
        SessionNote::Close { step: 9 },
    ];
    notes
        .iter()
        .map(|n| {
            let sel = SESSION_OPS.iter().position(|op| *op == n.op()).unwrap() as u8;
            [&[sel][..], &n.encode()].concat()
        })
        .collect()
}

fn state() -> StageState {
    StageState {
        steps: 9,
        tensors: vec![
            NamedParam {
                name: "0.weight".into(),
                shape: vec![2, 3],
                values: vec![0.5, -1.0, 2.0, 0.0, f32::MIN_POSITIVE, 7.0],
            },
            NamedParam {
                name: "0.weight.velocity".into(),
                shape: vec![2, 3],
                values: vec![0.25; 6],
            },
        ],
    }
}

fn opening_samples() -> Vec<Vec<u8>> {
    let o = Opening {
        step: 9,
        before: encode_state(&state()),
        x: vec![4; 10],
        y: vec![5; 7],
        g_in: Vec::new(),
        g_out: vec![6; 3],
        after: [7; 32],
    };
    vec![o.encode()]
}

fn observations() -> Vec<Observation> {
    fuzzing::observation_samples()
}

/// A record file of two observations: `len u32 LE ‖ record` each.
fn record_file() -> Vec<u8> {
    let mut file = Vec::new();
    for o in &observations()[1..3] {
        let r = o.encode();
        file.extend_from_slice(&(r.len() as u32).to_le_bytes());
        file.extend_from_slice(&r);
    }
    file
}

fn observation_samples() -> Vec<Vec<u8>> {
    let mut out: Vec<Vec<u8>> = observations().iter().map(Observation::encode).collect();
    out.push(record_file());
    out
}

fn state_samples() -> Vec<Vec<u8>> {
    let s = state();
    vec![
        encode_state(&s),
        encode_params(&s.tensors),
        ParamChunk {
            total: 300,
            bytes: vec![3; 40],
        }
        .encode(),
    ]
}

fn trailer_samples() -> Vec<Vec<u8>> {
    (0..16).map(fuzzing::trailer_sample).collect()
}

/// Every sample is valid, so mutations start from bytes that get past
/// the first checks; each passes its target body.
#[test]
fn the_samples_decode_and_pass_their_bodies() {
    for s in init_samples() {
        InitNote::decode(&s).unwrap();
        fuzzing::init_note(&s);
    }
    for s in session_samples() {
        SessionNote::decode(SESSION_OPS[usize::from(s[0])], &s[1..]).unwrap();
        fuzzing::session_note(&s);
    }
    for s in opening_samples() {
        Opening::decode(&s).unwrap();
        fuzzing::opening(&s);
    }
    for o in observations() {
        assert_eq!(Observation::decode(&o.encode()).unwrap(), o);
        fuzzing::observation(&o.encode());
    }
    let file = record_file();
    assert_eq!(
        mixnn_proto::observed::split_records(&file).unwrap().len(),
        2
    );
    fuzzing::observation(&file);
    let states = state_samples();
    assert_eq!(mixnn_proto::decode_state(&states[0]).unwrap(), state());
    assert_eq!(
        mixnn_proto::decode_params(&states[1]).unwrap(),
        state().tensors
    );
    ParamChunk::decode(&states[2]).unwrap();
    for s in &states {
        fuzzing::state(s);
    }
    for s in trailer_samples() {
        fuzzing::trailer(&s);
    }
    fuzzing::sealed(&fuzzing::sealed_sample());
}

/// The sealed body's property has teeth: the genuine body opens under
/// its kind, step and chunk, one changed byte does not.
#[test]
fn the_sealed_sample_opens_and_a_changed_one_does_not() {
    let genuine = fuzzing::sealed_sample();
    let key = ReplyKey([7; 32]);
    assert!(key.open(Sealed::Audit, 3, 0, &genuine).is_ok());
    let mut changed = genuine.clone();
    changed[30] ^= 1;
    assert!(key.open(Sealed::Audit, 3, 0, &changed).is_err());
    fuzzing::sealed(&changed);
}

fn edits() -> impl Strategy<Value = Vec<u8>> {
    proptest::collection::vec(any::<u8>(), 3..24)
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..600)) {
        fuzzing::init_note(&bytes);
        fuzzing::session_note(&bytes);
        fuzzing::opening(&bytes);
        fuzzing::observation(&bytes);
        fuzzing::state(&bytes);
        fuzzing::trailer(&bytes);
        fuzzing::sealed(&bytes);
    }

    #[test]
    fn mutated_init_notes_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::init_note(&mutate(pick.get::<Vec<u8>>(&init_samples()), &e));
    }

    #[test]
    fn mutated_session_notes_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::session_note(&mutate(pick.get::<Vec<u8>>(&session_samples()), &e));
    }

    #[test]
    fn mutated_openings_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::opening(&mutate(pick.get::<Vec<u8>>(&opening_samples()), &e));
    }

    #[test]
    fn mutated_observations_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::observation(&mutate(pick.get::<Vec<u8>>(&observation_samples()), &e));
    }

    #[test]
    fn mutated_states_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::state(&mutate(pick.get::<Vec<u8>>(&state_samples()), &e));
    }

    #[test]
    fn mutated_trailers_never_panic(pick in any::<prop::sample::Index>(), e in edits()) {
        fuzzing::trailer(&mutate(pick.get::<Vec<u8>>(&trailer_samples()), &e));
    }

    #[test]
    fn mutated_sealed_bodies_open_only_unchanged(e in edits()) {
        fuzzing::sealed(&mutate(&fuzzing::sealed_sample(), &e));
    }
}
