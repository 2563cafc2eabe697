//! The one tensor type of the engine: a row-major `rows × cols` matrix of
//! `f32`, `[batch, features]` for activations.

use crate::error::{ModelError, Result};

/// A row-major `rows × cols` matrix of binary32 values.
#[derive(Debug, Clone, PartialEq)]
pub struct Matrix {
    rows: usize,
    cols: usize,
    data: Vec<f32>,
}

impl Matrix {
    /// A matrix from row-major values; `data.len()` must be `rows × cols`.
    pub fn new(rows: usize, cols: usize, data: Vec<f32>) -> Result<Self> {
        if rows.checked_mul(cols) != Some(data.len()) {
            return Err(ModelError::Shape {
                context: "matrix",
                expected: format!("{rows} × {cols} values"),
                actual: format!("{} values", data.len()),
            });
        }
        Ok(Matrix { rows, cols, data })
    }

    /// A `rows × cols` matrix of `+0.0`.
    pub fn zeros(rows: usize, cols: usize) -> Self {
        Matrix {
            rows,
            cols,
            data: vec![0.0; rows * cols],
        }
    }

    /// A `1 × 1` matrix holding `v` (the loss).
    pub fn scalar(v: f32) -> Self {
        Matrix {
            rows: 1,
            cols: 1,
            data: vec![v],
        }
    }

    /// Rows (the batch axis of an activation).
    pub fn rows(&self) -> usize {
        self.rows
    }

    /// Columns (the feature axis of an activation).
    pub fn cols(&self) -> usize {
        self.cols
    }

    /// `[rows, cols]`.
    pub fn dims(&self) -> [usize; 2] {
        [self.rows, self.cols]
    }

    /// The values, row-major.
    pub fn as_slice(&self) -> &[f32] {
        &self.data
    }

    /// The values, row-major, for in-place kernels.
    pub fn as_mut_slice(&mut self) -> &mut [f32] {
        &mut self.data
    }

    /// The values, row-major.
    pub fn into_vec(self) -> Vec<f32> {
        self.data
    }

    /// Row `i`.
    pub fn row(&self, i: usize) -> &[f32] {
        &self.data[i * self.cols..(i + 1) * self.cols]
    }

    /// The first value (the loss of a `1 × 1` loss output).
    pub fn first(&self) -> Option<f32> {
        self.data.first().copied()
    }

    /// Applies `f` to every value, in place.
    pub fn map_in_place(&mut self, f: impl Fn(f32) -> f32) {
        for v in &mut self.data {
            *v = f(*v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn new_refuses_a_length_that_does_not_match_the_shape() {
        assert!(Matrix::new(2, 3, vec![0.0; 5]).is_err());
        assert!(Matrix::new(usize::MAX, 2, vec![]).is_err());
        let m = Matrix::new(2, 3, (0..6).map(|v| v as f32).collect()).unwrap();
        assert_eq!(m.row(1), &[3.0, 4.0, 5.0]);
        assert_eq!(m.dims(), [2, 3]);
    }
}
