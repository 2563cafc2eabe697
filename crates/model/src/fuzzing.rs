//! Fuzz target bodies, one per decoder of untrusted bytes in this crate, as
//! plain functions (the pattern of `mixnn_wire::fuzzing`), and
//! [`mutate`], the byte-level mutator the stable property tests of every
//! crate apply to valid encodings.
//!
//! `fuzz/` calls the bodies under cargo-fuzz; `tests/decoders.rs` calls
//! them on stable. Each must return normally for every input: a panic is a
//! bug. Where a decoder accepts the bytes, what it returns must survive a
//! round trip.

use crate::data::{parse_cifar, parse_images, parse_labels};
use crate::optim::Optimizer;
use crate::spec::StageSpec;
use crate::tensor_bytes::TensorBytes;

/// Applies `edits` to `sample`, three bytes per edit (kind, position,
/// value; a short tail is ignored): flip bits, set a byte or a
/// little-endian `u32` to a boundary value, cut, insert, delete, or
/// repeat a run. What a fuzzer does to a valid encoding, so that the
/// result gets past the first length check and reaches the deeper ones.
pub fn mutate(sample: &[u8], edits: &[u8]) -> Vec<u8> {
    const BOUNDARY: [u32; 8] = [0, 1, 2, 0x7f, 0x80, 0xff, 0x7fff_ffff, u32::MAX];
    let mut b = sample.to_vec();
    for e in edits.chunks_exact(3) {
        let (kind, pos, v) = (e[0], usize::from(e[1]), e[2]);
        let at = if b.is_empty() { 0 } else { pos % b.len() };
        let boundary = BOUNDARY[usize::from(v) % BOUNDARY.len()];
        match kind % 7 {
            0 if !b.is_empty() => b[at] ^= v | 1,
            1 if !b.is_empty() => b[at] = boundary.to_le_bytes()[0],
            2 if b.len() >= at + 4 => b[at..at + 4].copy_from_slice(&boundary.to_le_bytes()),
            3 => b.truncate(at),
            4 => b.insert(at, v),
            5 if !b.is_empty() => {
                b.remove(at);
            }
            6 => {
                let end = (at + usize::from(v % 16) + 1).min(b.len());
                let run = b[at..end].to_vec();
                b.splice(at..at, run);
            }
            _ => {}
        }
    }
    b
}

/// `TensorBytes::decode`: the shape accounts for every value, and the
/// values re-encode (as `f32`) to a message that decodes to the same bits.
pub fn tensor_bytes(data: &[u8]) {
    let Ok(t) = TensorBytes::decode(data) else {
        return;
    };
    let count: usize = t.shape.iter().product();
    assert_eq!(count, t.values.len(), "shape and values agree");
    let back = TensorBytes::decode(&TensorBytes::encode_f32(&t.shape, &t.values));
    let Ok(back) = back else {
        panic!("a decoded tensor re-encodes to one that decodes");
    };
    assert_eq!(back.shape, t.shape, "tensor shape round trip");
    let bits = |v: &[f32]| -> Vec<u32> {
        v.iter()
            .map(|x| crate::arith::ops::canonical(*x).to_bits())
            .collect()
    };
    assert_eq!(
        bits(&back.values),
        bits(&t.values),
        "tensor values round trip"
    );
}

/// `StageSpec::decode` (the stage an init note carries), then
/// `StageSpec::check` and the shapes of what it decoded.
pub fn stage_spec(data: &[u8]) {
    let Ok((spec, used)) = StageSpec::decode(data) else {
        return;
    };
    assert!(used <= data.len(), "decode used bytes it was not given");
    let bytes = spec.encode();
    let again = StageSpec::decode(&bytes).map(|(s, n)| (s.encode(), n));
    assert_eq!(again, Ok((bytes.clone(), bytes.len())), "stage round trip");
    // Checked or not, asking a decoded stage its shapes must not panic
    // (a node logs them before it checks).
    let _ = spec.check(0, false);
    let _ = spec.check(0, true);
    let _ = spec.output();
    let _ = spec.shapes();
}

/// `Optimizer::decode`: what it accepts passes its own check and round
/// trips.
pub fn optimizer(data: &[u8]) {
    let Ok((opt, used)) = Optimizer::decode(data) else {
        return;
    };
    assert!(used <= data.len(), "decode used bytes it was not given");
    assert_eq!(opt.check(), Ok(()), "a decoded optimiser is a valid one");
    let bytes = opt.encode();
    assert_eq!(
        Optimizer::decode(&bytes).map(|(o, _)| o.encode()),
        Ok(bytes),
        "optimiser round trip"
    );
}

/// The dataset parsers (IDX images and labels, CIFAR-10 records): files a
/// user points `--data` at, possibly truncated or not what they claim.
pub fn datasets(data: &[u8]) {
    if let Ok((rows, cols, pixels, n)) = parse_images(data) {
        assert_eq!(rows * cols * n, pixels.len(), "images fill their header");
    }
    if let Ok(labels) = parse_labels(data) {
        assert!(labels.len() + 8 <= data.len(), "labels lie inside the file");
    }
    let _ = parse_cifar(data);
}
