#![allow(clippy::unwrap_used)]

use super::*;

#[test]
fn fillers_fit_the_shapes_of_the_vgg_and_mlp_cuts() {
    let img = |c, h| Shape::image(c, h, h);
    for (from, to) in [
        (img(1, 28), img(32, 14)),
        (img(32, 14), img(64, 7)),
        (img(1, 28), img(64, 7)),
        (img(64, 7), Shape::flat(128)),
        (Shape::flat(128), Shape::flat(64)),
        (img(1, 28), Shape::flat(128)),
    ] {
        let s = filler(&from, &to).unwrap();
        assert_eq!(s.output(), to, "{from} -> {to}");
    }
    assert!(filler(&Shape::flat(10), &img(1, 4)).is_err());
    assert!(filler(&img(1, 28), &img(8, 10)).is_err());
}

fn unit(spec: StageSpec, hop: Option<usize>) -> Unit {
    Unit { spec, hop }
}

#[test]
fn known_positions_fill_gaps_with_the_real_stages() {
    let lin = |i, o| StageSpec {
        input: Shape::flat(i),
        ops: vec![OpSpec::Linear {
            input: i,
            output: o,
        }],
    };
    let truth = Truth {
        units: vec![
            unit(lin(4, 4), None),
            unit(lin(4, 3), Some(0)),
            unit(lin(3, 3), Some(1)),
            unit(lin(3, 2), Some(2)),
            unit(loss(2), Some(3)),
            unit(StageSpec::identity(Shape::flat(1)), Some(4)),
        ],
        data_shape: Shape::flat(4),
        classes: 2,
        optimizer: Optimizer::default(),
    };
    assert_eq!(truth.function().len(), 5);
    let s = known(&truth, &[1, 3, 4]);
    assert_eq!(
        s.parts,
        vec![
            Part::Gap(Gap::Front, vec![lin(4, 4), lin(4, 3)], 0),
            Part::Held(1),
            Part::Gap(
                Gap::Inner {
                    after: 1,
                    before: 3
                },
                vec![lin(3, 2)],
                3
            ),
            Part::Held(3),
        ]
    );
    let s = known(&truth, &[]);
    assert_eq!(s.parts.len(), 1);
    assert!(matches!(&s.parts[0], Part::Gap(Gap::Front, v, 0) if v.len() == 5));
    let s = known(&truth, &[0]);
    assert!(matches!(&s.parts[2], Part::Gap(Gap::Back, v, 2) if v.len() == 3));
}
