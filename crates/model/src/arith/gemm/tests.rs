use super::*;

pub(crate) fn values(n: usize, seed: u32) -> Vec<f32> {
    // Mixed magnitudes and signs, so a reordered sum would show.
    (0..n as u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            let m = (x % 2001) as f32 / 1000.0 - 1.0;
            m * [1.0, 1e-3, 1e3, 0.5][(x % 4) as usize]
        })
        .collect()
}

pub(crate) fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

/// Shapes that leave partial tiles on every kernel.
pub(crate) const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (7, 13, 5),
    (64, 70, 33),
    (13, 1, 40),
    (6, 16, 16),
    (8, 32, 32),
    (17, 9, 65),
    (100, 200, 70),
];

/// `kernel` gives the reference's bits on every shape, plain and
/// transposed, from zero and accumulating.
pub(crate) fn check_kernel<K: Micro>(kernel: K) {
    for &(m, k, n) in SHAPES {
        let a = Matrix::new(m, k, values(m * k, 1)).unwrap();
        let b = Matrix::new(k, n, values(k * n, 2)).unwrap();
        let at = Matrix::new(k, m, values(m * k, 3)).unwrap();
        let start = values(m * n, 4);
        for (av, bv) in [
            (View::of(&a), View::of(&b)),
            (View::of(&at).t(), View::of(&b)),
        ] {
            for init in [Init::Zero, Init::Accumulate] {
                let mut want = start.clone();
                reference(av, bv, &mut want, init);
                let mut got = start.clone();
                gemm(kernel, av, bv, &mut got, init);
                assert_eq!(bits(&got), bits(&want), "{m}×{k}×{n} {init:?}");
            }
        }
    }
}

#[test]
fn portable_tiles_of_every_shape_equal_the_reference_bit_for_bit() {
    check_kernel(Portable::<SoftFma, 4, 8>::new());
    check_kernel(Portable::<SoftFma, 6, 16>::new());
    check_kernel(Portable::<SoftFma, 8, 32>::new());
}

#[test]
fn threads_do_not_change_a_bit() {
    // Large enough to be handed out.
    let (m, k, n) = (96, 160, 72);
    let a = Matrix::new(m, k, values(m * k, 5)).unwrap();
    let b = Matrix::new(k, n, values(k * n, 6)).unwrap();
    let mut want = vec![0.0; m * n];
    reference(View::of(&a), View::of(&b), &mut want, Init::Zero);
    for t in [1, 2, 3, 16] {
        let mut got = vec![9.0; m * n];
        threads::with_count(t, || {
            gemm(
                Portable::<SoftFma, 4, 8>::new(),
                View::of(&a),
                View::of(&b),
                &mut got,
                Init::Zero,
            )
        })
        .unwrap();
        assert_eq!(bits(&got), bits(&want), "{t} threads");
    }
}

#[test]
fn transposed_views_read_the_transpose() {
    let a = Matrix::new(2, 3, vec![1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).unwrap();
    let mut c = vec![0.0; 4];
    // A·Aᵀ
    gemm(
        Portable::<SoftFma, 4, 8>::new(),
        View::of(&a),
        View::of(&a).t(),
        &mut c,
        Init::Zero,
    );
    assert_eq!(c, vec![14.0, 32.0, 32.0, 77.0]);
    // Aᵀ·A is 3 × 3
    let mut c = vec![0.0; 9];
    reference(View::of(&a).t(), View::of(&a), &mut c, Init::Zero);
    assert_eq!(
        c,
        vec![17.0, 22.0, 27.0, 22.0, 29.0, 36.0, 27.0, 36.0, 45.0]
    );
}

#[test]
fn each_term_is_fused_not_rounded_twice() {
    // 1 + (1 + ε)·(−(1 − ε)) = ε²: a rounded product would be −1,
    // and 1 − 1 = 0; fused, the ε² survives.
    let e = f32::EPSILON;
    let a = Matrix::new(1, 2, vec![1.0, 1.0 + e]).unwrap();
    let b = Matrix::new(2, 1, vec![1.0, -(1.0 - e)]).unwrap();
    let mut c = vec![0.0; 1];
    reference(View::of(&a), View::of(&b), &mut c, Init::Zero);
    assert_eq!(c[0], e * e);
}

#[test]
fn accumulating_continues_the_sequence() {
    // Two products over halves of K, the second accumulating, equal
    // one product over all of K.
    let (m, k, n) = (9, 40, 11);
    let a = Matrix::new(m, k, values(m * k, 7)).unwrap();
    let b = Matrix::new(k, n, values(k * n, 8)).unwrap();
    let mut whole = vec![0.0; m * n];
    reference(View::of(&a), View::of(&b), &mut whole, Init::Zero);
    let half = |lo: usize, hi: usize| {
        let av: Vec<f32> = (0..m).flat_map(|i| a.row(i)[lo..hi].to_vec()).collect();
        let bv = b.as_slice()[lo * n..hi * n].to_vec();
        (
            Matrix::new(m, hi - lo, av).unwrap(),
            Matrix::new(hi - lo, n, bv).unwrap(),
        )
    };
    let (a1, b1) = half(0, 17);
    let (a2, b2) = half(17, k);
    let mut parts = vec![0.0; m * n];
    let kernel = Portable::<SoftFma, 4, 8>::new();
    gemm(kernel, View::of(&a1), View::of(&b1), &mut parts, Init::Zero);
    gemm(
        kernel,
        View::of(&a2),
        View::of(&b2),
        &mut parts,
        Init::Accumulate,
    );
    assert_eq!(bits(&parts), bits(&whole));
}

#[test]
fn the_order_is_sequential_not_pairwise() {
    // 1e8 + 1 − 1e8 + 1 … : sequential f32 sums lose each 1, a
    // pairwise or lane-split sum would keep some.
    let k = 8;
    let a = Matrix::new(1, k, vec![1.0; k]).unwrap();
    let b = Matrix::new(k, 1, vec![1e8, 1.0, -1e8, 1.0, 1.0, 1.0, 1.0, 1.0]).unwrap();
    let mut c = vec![0.0; 1];
    gemm(
        Portable::<SoftFma, 4, 8>::new(),
        View::of(&a),
        View::of(&b),
        &mut c,
        Init::Zero,
    );
    assert_eq!(c[0], 5.0);
}
