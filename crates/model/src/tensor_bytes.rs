//! How activations and gradients cross a stage boundary: a shape plus
//! little-endian element bytes, nothing else.
//!
//! ```text
//! dtype: u8 | rank: u8 | dims: rank × u32 LE | elements
//! ```
//!
//! `dtype` 0 is `f32` (4 bytes LE per element). `dtype` 1 is a pixel: one
//! `u8` per element standing for the `f32` value `p / 255` (how the designer
//! ships raw images to the first stage: four times smaller, and decoded to
//! exactly the bits the local trainer computes).

use crate::arith::matrix::Matrix;
use crate::arith::ops::canonical;
use crate::error::{ModelError, Result};

/// Element encodings of [`TensorBytes`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum DType {
    /// 32-bit float, little-endian.
    F32 = 0,
    /// `u8` pixel meaning `p / 255` as `f32`.
    Pixel = 1,
}

/// Largest rank accepted from the wire.
pub const MAX_RANK: usize = 6;
/// Largest element count accepted from the wire (64 Mi elements).
pub const MAX_ELEMENTS: usize = 64 << 20;

/// Converts a pixel to the `f32` the model sees. The one place this
/// happens, so designer, nodes and local trainer agree bit for bit.
#[inline]
pub fn pixel_to_f32(p: u8) -> f32 {
    f32::from(p) / 255.0
}

/// A decoded tensor message: shape and `f32` values, row-major.
#[derive(Debug, Clone, PartialEq)]
pub struct TensorBytes {
    /// Dimensions, outermost first.
    pub shape: Vec<usize>,
    /// Elements, row-major.
    pub values: Vec<f32>,
}

impl TensorBytes {
    /// Encodes `f32` values with their shape; every NaN is written as the
    /// canonical NaN (`docs/arithmetic.md`), so honest senders on any CPU
    /// send the same bytes.
    pub fn encode_f32(shape: &[usize], values: &[f32]) -> Vec<u8> {
        let mut out = header(DType::F32, shape, values.len() * 4);
        for v in values {
            out.extend_from_slice(&canonical(*v).to_le_bytes());
        }
        out
    }

    /// Encodes `u8` pixels with their shape (dtype [`DType::Pixel`]).
    pub fn encode_pixels(shape: &[usize], pixels: &[u8]) -> Vec<u8> {
        let mut out = header(DType::Pixel, shape, pixels.len());
        out.extend_from_slice(pixels);
        out
    }

    /// Encodes a matrix as a rank-2 message.
    pub fn encode_matrix(m: &Matrix) -> Vec<u8> {
        Self::encode_f32(&m.dims(), m.as_slice())
    }

    /// Decodes a message; every byte may come from an attacker.
    pub fn decode(bytes: &[u8]) -> Result<Self> {
        let bad = |m: String| ModelError::TensorBytes(m);
        if bytes.len() < 2 {
            return Err(bad(format!("{} bytes, need at least 2", bytes.len())));
        }
        let dtype = match bytes[0] {
            0 => DType::F32,
            1 => DType::Pixel,
            other => return Err(bad(format!("unknown dtype {other}"))),
        };
        let rank = usize::from(bytes[1]);
        if rank == 0 || rank > MAX_RANK {
            return Err(bad(format!("rank {rank} outside 1..={MAX_RANK}")));
        }
        let dims_end = 2 + 4 * rank;
        let dims_bytes = bytes
            .get(2..dims_end)
            .ok_or_else(|| bad(format!("truncated shape: {} bytes", bytes.len())))?;
        let mut shape = Vec::with_capacity(rank);
        let mut count: usize = 1;
        for chunk in dims_bytes.chunks_exact(4) {
            let d = u32::from_le_bytes([chunk[0], chunk[1], chunk[2], chunk[3]]) as usize;
            count = count
                .checked_mul(d)
                .filter(|c| *c <= MAX_ELEMENTS)
                .ok_or_else(|| bad(format!("more than {MAX_ELEMENTS} elements")))?;
            shape.push(d);
        }
        let body = &bytes[dims_end..];
        let width = match dtype {
            DType::F32 => 4,
            DType::Pixel => 1,
        };
        if body.len() != count * width {
            return Err(bad(format!(
                "shape {shape:?} needs {} element bytes, got {}",
                count * width,
                body.len()
            )));
        }
        let values = match dtype {
            DType::F32 => body
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::Pixel => body.iter().copied().map(pixel_to_f32).collect(),
        };
        Ok(TensorBytes { shape, values })
    }

    /// Turns the message into a `[batch, values]` matrix, checking that
    /// the dimensions after the batch axis are `sample`'s.
    pub fn into_batch(self, sample: &crate::spec::Shape) -> Result<Matrix> {
        match self.shape.split_first() {
            Some((rows, dims)) if dims == sample.dims() => {
                Matrix::new(*rows, sample.numel(), self.values)
            }
            _ => Err(ModelError::Shape {
                context: "tensor message",
                expected: format!(
                    "[batch, {}]",
                    sample
                        .dims()
                        .iter()
                        .map(ToString::to_string)
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
                actual: format!("{:?}", self.shape),
            }),
        }
    }

    /// Turns the message into a `[first dimension, rest]` matrix, whatever
    /// its shape (what an identity stage passes through).
    pub fn into_rows(self) -> Result<Matrix> {
        match self.shape.split_first() {
            Some((rows, dims)) => {
                let cols = dims.iter().product::<usize>();
                Matrix::new(*rows, cols, self.values)
            }
            None => Err(ModelError::TensorBytes(
                "a message without dimensions".into(),
            )),
        }
    }

    /// Turns the message into a `[batch, features]` matrix.
    pub fn into_matrix(self) -> Result<Matrix> {
        let [rows, cols] = match self.shape.as_slice() {
            [r, c] => [*r, *c],
            other => {
                return Err(ModelError::Shape {
                    context: "tensor message",
                    expected: "[batch, features]".into(),
                    actual: format!("{other:?}"),
                })
            }
        };
        Matrix::new(rows, cols, self.values)
    }
}

/// The dimensions a tensor message announces, read from its header only
/// (the body is checked when the message is decoded); `None` for a header
/// that is not well formed.
pub fn peek_shape(bytes: &[u8]) -> Option<Vec<usize>> {
    let rank = usize::from(*bytes.get(1)?);
    if !matches!(bytes.first()?, 0 | 1) || rank == 0 || rank > MAX_RANK {
        return None;
    }
    bytes
        .get(2..2 + 4 * rank)?
        .chunks_exact(4)
        .map(|c| Some(u32::from_le_bytes([c[0], c[1], c[2], c[3]]) as usize))
        .collect()
}

/// Bytes of the `f32` message of `shape` ([`TensorBytes::encode_f32`]).
pub fn f32_message_len(shape: &[usize]) -> u64 {
    shape
        .iter()
        .fold(4u64, |n, d| n.saturating_mul(*d as u64))
        .saturating_add(2 + 4 * shape.len() as u64)
}

fn header(dtype: DType, shape: &[usize], body: usize) -> Vec<u8> {
    let mut out = Vec::with_capacity(2 + 4 * shape.len() + body);
    out.push(dtype as u8);
    // Ranks come from our own tensors (at most MAX_RANK), so this fits a u8.
    out.push(shape.len() as u8);
    for d in shape {
        out.extend_from_slice(&(*d as u32).to_le_bytes());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn f32_round_trips_bit_for_bit() {
        let vals = [1.0f32, -0.0, f32::MIN_POSITIVE, 3.5e-39, f32::MAX, 0.1];
        let bytes = TensorBytes::encode_f32(&[2, 3], &vals);
        let back = TensorBytes::decode(&bytes).unwrap();
        assert_eq!(back.shape, vec![2, 3]);
        let a: Vec<u32> = vals.iter().map(|v| v.to_bits()).collect();
        let b: Vec<u32> = back.values.iter().map(|v| v.to_bits()).collect();
        assert_eq!(a, b);
    }

    #[test]
    fn pixels_decode_as_p_over_255() {
        let bytes = TensorBytes::encode_pixels(&[1, 3], &[0, 128, 255]);
        let back = TensorBytes::decode(&bytes).unwrap();
        assert_eq!(back.values, vec![0.0, 128.0 / 255.0, 1.0]);
    }

    #[test]
    fn decode_rejects_truncated_and_oversized() {
        let bytes = TensorBytes::encode_f32(&[2, 2], &[1.0, 2.0, 3.0, 4.0]);
        for cut in 0..bytes.len() {
            assert!(TensorBytes::decode(&bytes[..cut]).is_err(), "cut {cut}");
        }
        let mut extra = bytes.clone();
        extra.push(0);
        assert!(TensorBytes::decode(&extra).is_err());
        let nan = TensorBytes::encode_f32(&[1, 2], &[f32::from_bits(0xffc0_0000), 1.0]);
        assert_eq!(&nan[10..14], &0x7fc0_0000u32.to_le_bytes());
        let mut huge = vec![0u8, 2];
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        huge.extend_from_slice(&u32::MAX.to_le_bytes());
        let err = TensorBytes::decode(&huge).unwrap_err().to_string();
        assert!(err.contains("elements"), "{err}");
        assert!(TensorBytes::decode(&[9, 1, 0, 0, 0, 0]).is_err());
        assert!(TensorBytes::decode(&[0, 0]).is_err());
    }
}
