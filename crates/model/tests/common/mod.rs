//! Shared by the model tests: synthetic batches whose pixels give their
//! label away, so that training does something.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use mixnn_model::init::rng;
use mixnn_model::trainer::Batch;
use rand::RngCore;

/// `n` batches of `rows` images.
pub fn synthetic_batches(n: usize, rows: usize, seed: u64) -> Vec<Batch> {
    let mut r = rng(seed);
    (0..n)
        .map(|_| {
            let labels: Vec<u32> = (0..rows).map(|_| r.next_u32() % 10).collect();
            // Pixels correlated with the label so that training does something.
            let pixels = labels
                .iter()
                .flat_map(|l| {
                    let l = *l as usize;
                    (0..784).map(move |i| if i % 10 == l { 200u8 } else { 20 })
                })
                .zip(std::iter::repeat_with(|| r.next_u32()))
                .map(|(p, noise)| p.saturating_add((noise % 40) as u8))
                .collect();
            Batch {
                pixels,
                labels,
                rows,
            }
        })
        .collect()
}
