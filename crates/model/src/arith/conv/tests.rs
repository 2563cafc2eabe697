use super::*;
use crate::arith::math;

fn values(n: usize, seed: u32) -> Vec<f32> {
    (0..n as u32)
        .map(|i| {
            let x = i.wrapping_mul(2_654_435_761).wrapping_add(seed) >> 8;
            (x % 2001) as f32 / 1000.0 - 1.0
        })
        .collect()
}

/// The definitions, literally: one output at a time.
fn naive_forward(x: &[f32], w: &[f32], b: Option<&[f32]>, g: &ConvGeom, batch: usize) -> Vec<f32> {
    let xp = |n: usize, c: usize, iy: isize, ix: isize| {
        if iy < 0 || ix < 0 || iy >= g.h as isize || ix >= g.w as isize {
            0.0
        } else {
            x[n * g.in_len() + (c * g.h + iy as usize) * g.w + ix as usize]
        }
    };
    let mut out = Vec::new();
    for n in 0..batch {
        for o in 0..g.o {
            for y in 0..g.ho {
                for xx in 0..g.wo {
                    let mut s = 0.0f32;
                    for c in 0..g.c {
                        for ky in 0..g.k {
                            for kx in 0..g.k {
                                let iy = (y * g.s + ky) as isize - g.p as isize;
                                let ix = (xx * g.s + kx) as isize - g.p as isize;
                                s = math::fma(
                                    w[((o * g.c + c) * g.k + ky) * g.k + kx],
                                    xp(n, c, iy, ix),
                                    s,
                                );
                            }
                        }
                    }
                    out.push(b.map_or(s, |b| s + b[o]));
                }
            }
        }
    }
    out
}

fn naive_dw(x: &[f32], dy: &[f32], g: &ConvGeom, batch: usize) -> Vec<f32> {
    let mut dw = vec![0.0f32; g.o * g.patch()];
    for o in 0..g.o {
        for c in 0..g.c {
            for ky in 0..g.k {
                for kx in 0..g.k {
                    let mut s = 0.0f32;
                    for n in 0..batch {
                        for y in 0..g.ho {
                            for xx in 0..g.wo {
                                let iy = (y * g.s + ky) as isize - g.p as isize;
                                let ix = (xx * g.s + kx) as isize - g.p as isize;
                                let xv = if iy < 0
                                    || ix < 0
                                    || iy >= g.h as isize
                                    || ix >= g.w as isize
                                {
                                    0.0
                                } else {
                                    x[n * g.in_len() + (c * g.h + iy as usize) * g.w + ix as usize]
                                };
                                s = math::fma(
                                    dy[n * g.out_len() + (o * g.ho + y) * g.wo + xx],
                                    xv,
                                    s,
                                );
                            }
                        }
                    }
                    dw[((o * g.c + c) * g.k + ky) * g.k + kx] = s;
                }
            }
        }
    }
    dw
}

fn naive_dx(dy: &[f32], w: &[f32], g: &ConvGeom, batch: usize) -> Vec<f32> {
    let q = (g.k - 1 - g.p) as isize;
    let d = |n: usize, o: usize, i: isize, j: isize| -> f32 {
        // D[o, i, j] = dY[o, (i−q)/s, (j−q)/s] where that divides.
        let (a, b) = (i - q, j - q);
        if a < 0 || b < 0 || a % g.s as isize != 0 || b % g.s as isize != 0 {
            return 0.0;
        }
        let (y, x) = ((a / g.s as isize) as usize, (b / g.s as isize) as usize);
        if y >= g.ho || x >= g.wo {
            return 0.0;
        }
        dy[n * g.out_len() + (o * g.ho + y) * g.wo + x]
    };
    let mut dx = Vec::new();
    for n in 0..batch {
        for c in 0..g.c {
            for i in 0..g.h {
                for j in 0..g.w {
                    let mut s = 0.0f32;
                    for o in 0..g.o {
                        for ky2 in 0..g.k {
                            for kx2 in 0..g.k {
                                let wv = w[((o * g.c + c) * g.k + (g.k - 1 - ky2)) * g.k
                                    + (g.k - 1 - kx2)];
                                s = math::fma(
                                    wv,
                                    d(n, o, (i + ky2) as isize, (j + kx2) as isize),
                                    s,
                                );
                            }
                        }
                    }
                    dx.push(s);
                }
            }
        }
    }
    dx
}

fn bits(v: &[f32]) -> Vec<u32> {
    v.iter().map(|x| x.to_bits()).collect()
}

#[test]
fn every_product_equals_its_definition_bit_for_bit() {
    let batch = 3;
    for (c, h, w, o, k, s, p) in [
        (2, 5, 6, 3, 3, 1, 1),
        (1, 7, 7, 4, 3, 2, 1),
        (3, 6, 5, 2, 2, 2, 0),
        (2, 4, 4, 5, 1, 1, 0),
        (2, 9, 8, 3, 5, 3, 2),
    ] {
        let g = ConvGeom::new(c, h, w, o, k, s, p).unwrap();
        let x = Matrix::new(batch, g.in_len(), values(batch * g.in_len(), 1)).unwrap();
        let wv = values(g.o * g.patch(), 2);
        let b = values(g.o, 3);
        let dy = Matrix::new(batch, g.out_len(), values(batch * g.out_len(), 4)).unwrap();
        for (t, path) in [1, 2].into_iter().flat_map(|t| {
            crate::arith::KernelPath::supported_paths()
                .into_iter()
                .map(move |p| (t, p))
        }) {
            threads::with_count(t, || {
                crate::arith::dispatch::with_path(path, || {
                    let y = conv2d_forward(&x, &wv, Some(&b), &g);
                    assert_eq!(
                        bits(y.as_slice()),
                        bits(&naive_forward(x.as_slice(), &wv, Some(&b), &g, batch)),
                        "forward {g:?}"
                    );
                    let (dw, db) = conv2d_backward_weight(&x, &dy, &g, true);
                    assert_eq!(
                        bits(&dw),
                        bits(&naive_dw(x.as_slice(), dy.as_slice(), &g, batch)),
                        "dW {g:?}"
                    );
                    let db = db.unwrap();
                    for (oi, v) in db.iter().enumerate() {
                        let mut sum = 0.0f32;
                        for n in 0..batch {
                            for e in &dy.row(n)[oi * g.ho * g.wo..(oi + 1) * g.ho * g.wo] {
                                sum += *e;
                            }
                        }
                        assert_eq!(v.to_bits(), sum.to_bits());
                    }
                    let dx = conv2d_backward_input(&dy, &wv, &g);
                    assert_eq!(
                        bits(dx.as_slice()),
                        bits(&naive_dx(dy.as_slice(), &wv, &g, batch)),
                        "dX {g:?} {path}"
                    );
                })
            })
            .unwrap()
            .unwrap();
        }
    }
}

#[test]
fn the_input_gradient_is_the_adjoint_of_the_forward() {
    // <conv(x), dy> = <x, conv_input_grad(dy)> up to rounding.
    let g = ConvGeom::new(2, 7, 6, 3, 3, 2, 1).unwrap();
    let x = Matrix::new(1, g.in_len(), values(g.in_len(), 5)).unwrap();
    let wv = values(g.o * g.patch(), 6);
    let dy = Matrix::new(1, g.out_len(), values(g.out_len(), 7)).unwrap();
    let y = conv2d_forward(&x, &wv, None, &g);
    let dx = conv2d_backward_input(&dy, &wv, &g);
    let lhs: f64 = y
        .as_slice()
        .iter()
        .zip(dy.as_slice())
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    let rhs: f64 = x
        .as_slice()
        .iter()
        .zip(dx.as_slice())
        .map(|(a, b)| f64::from(*a) * f64::from(*b))
        .sum();
    assert!(
        (lhs - rhs).abs() < 1e-4 * lhs.abs().max(1.0),
        "{lhs} vs {rhs}"
    );
}

/// The weight gradient keeps its padded inputs and packed gradients from
/// one call to the next on a thread: calls of other geometries in between
/// (larger, smaller, other padding) change no bit of the result, which is
/// the one a fresh thread computes.
#[test]
fn weight_gradients_do_not_depend_on_earlier_calls_on_the_thread() {
    let case = |c, h, w, o, k, s, p, seed: u32| {
        let g = ConvGeom::new(c, h, w, o, k, s, p).unwrap();
        let batch = 3;
        let val =
            |i: usize| (((i as u32).wrapping_mul(2654435761) ^ seed) % 1000) as f32 / 250.0 - 2.0;
        let x = Matrix::new(batch, c * h * w, (0..batch * c * h * w).map(val).collect()).unwrap();
        let dy_len = g.out_len();
        let dy = Matrix::new(
            batch,
            dy_len,
            (0..batch * dy_len).map(|i| val(i + 7)).collect(),
        )
        .unwrap();
        (x, dy, g)
    };
    let cases = [
        case(3, 9, 8, 5, 3, 1, 1, 1),
        case(6, 14, 14, 9, 3, 1, 1, 2),
        case(2, 5, 5, 4, 3, 1, 0, 3),
        case(4, 11, 7, 3, 3, 2, 1, 4),
    ];
    let run = |(x, dy, g): &(Matrix, Matrix, ConvGeom)| conv2d_backward_weight(x, dy, g, true);
    let fresh: Vec<_> = cases
        .iter()
        .map(|c| std::thread::scope(|s| s.spawn(|| run(c)).join().unwrap()))
        .collect();
    // One thread, every case after every other, twice over.
    for order in [[0, 1, 2, 3], [3, 2, 1, 0]] {
        for &i in &order {
            let got = run(&cases[i]);
            let bits = |v: &[f32]| v.iter().map(|x| x.to_bits()).collect::<Vec<_>>();
            assert_eq!(bits(&got.0), bits(&fresh[i].0), "case {i}: weight gradient");
            assert_eq!(
                got.1.map(|b| bits(&b)),
                fresh[i].1.as_ref().map(|b| bits(b)),
                "case {i}: bias"
            );
        }
    }
}
