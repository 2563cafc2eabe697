use super::*;

fn images(n: u32, rows: u32, cols: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [IMAGES_MAGIC, n, rows, cols] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend((0..n * rows * cols).map(|i| (i % 251) as u8));
    v
}

fn labels(n: u32) -> Vec<u8> {
    let mut v = Vec::new();
    for x in [LABELS_MAGIC, n] {
        v.extend_from_slice(&x.to_be_bytes());
    }
    v.extend((0..n).map(|i| (i % 10) as u8));
    v
}

fn write_dir(dir: &Path, train_imgs: &[u8], train_lbls: &[u8]) {
    std::fs::write(dir.join("train-images-idx3-ubyte"), train_imgs).unwrap();
    std::fs::write(dir.join("train-labels-idx1-ubyte"), train_lbls).unwrap();
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &images(3, 2, 2)).unwrap();
    std::fs::write(dir.join("t10k-images-idx3-ubyte.gz"), gz.finish().unwrap()).unwrap();
    std::fs::write(dir.join("t10k-labels-idx1-ubyte"), labels(3)).unwrap();
}

#[test]
fn loads_raw_and_gzip_files() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &images(5, 2, 2), &labels(5));
    let split = load_dir(dir.path()).unwrap();
    assert_eq!(split.train.len(), 5);
    assert_eq!(split.test.len(), 3);
    assert_eq!(split.train.features(), 4);
    assert_eq!(split.train.pixels[5], 5);
}

#[test]
fn wrong_magic_is_one_line() {
    let dir = tempfile::tempdir().unwrap();
    let mut bad = images(5, 2, 2);
    bad[3] = 0x01;
    write_dir(dir.path(), &bad, &labels(5));
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("train-images-idx3-ubyte: wrong magic 0x00000801"),
        "{err}"
    );
    assert!(!err.contains('\n'));
}

#[test]
fn truncated_file_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    let mut t = images(5, 2, 2);
    t.truncate(t.len() - 1);
    write_dir(dir.path(), &t, &labels(5));
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.contains("truncated or oversized: header says 5 images"),
        "{err}"
    );
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &images(5, 2, 2)[..10], &labels(5));
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("truncated header"), "{err}");
}

#[test]
fn count_mismatch_and_missing_file_are_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &images(5, 2, 2), &labels(4));
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("4 labels but 5 images"), "{err}");
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
    std::fs::write(dir.path().join("train-labels-idx1-ubyte"), labels(5)).unwrap();
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(
        err.ends_with("t10k-labels-idx1-ubyte: missing (also tried .gz)"),
        "{err}"
    );
}

#[test]
fn corrupt_gzip_is_reported() {
    let dir = tempfile::tempdir().unwrap();
    write_dir(dir.path(), &images(5, 2, 2), &labels(5));
    let p = dir.path().join("t10k-images-idx3-ubyte.gz");
    let mut gz = std::fs::read(&p).unwrap();
    gz.truncate(gz.len() / 2);
    std::fs::write(&p, gz).unwrap();
    let err = load_dir(dir.path()).unwrap_err().to_string();
    assert!(err.contains("corrupt gzip"), "{err}");
}

#[test]
fn epoch_order_is_a_seeded_permutation() {
    let (one, two) = (RunSeed::from_number(1), RunSeed::from_number(2));
    let a = epoch_order(&one, 0, 100);
    assert_eq!(a, epoch_order(&one, 0, 100));
    assert_ne!(a, epoch_order(&one, 1, 100));
    assert_ne!(a, epoch_order(&two, 0, 100));
    let mut s = a.clone();
    s.sort_unstable();
    assert_eq!(s, (0..100).collect::<Vec<u32>>());
}

#[test]
fn the_cifar_fixture_loads_with_its_shape() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../fixtures/cifar10");
    assert_eq!(cifar_dir(&dir), Some(dir.clone()));
    let split = load_dir(&dir).unwrap();
    assert_eq!(split.train.len(), 128);
    assert_eq!(split.test.len(), 64);
    assert_eq!(split.train.shape(), crate::spec::Shape::image(3, 32, 32));
    assert_eq!(split.train.pixels.len(), 128 * 3072);
    assert!(split.train.labels.iter().all(|l| *l < 10));
    assert!(split.train.fits(&crate::spec::Shape::image(3, 32, 32)));
    assert!(!split.train.fits(&crate::spec::Shape::image(1, 28, 28)));
}

#[test]
fn broken_cifar_batches_are_one_line_errors() {
    let err = parse_cifar(&[0u8; CIFAR_RECORD + 1]).unwrap_err();
    assert!(err.contains("whole number"), "{err}");
    let mut rec = vec![0u8; CIFAR_RECORD];
    rec[0] = 10;
    assert!(parse_cifar(&rec).unwrap_err().contains("label 10"));
    assert!(parse_cifar(&[]).is_err());
}

#[test]
fn augmentation_crops_and_flips_from_its_stream_only() {
    let (c, h, w) = (2, 5, 4);
    let img: Vec<u8> = (0..(c * h * w) as u8).map(|v| v + 1).collect();
    let mut pixels = [img.clone(), img.clone(), img.clone()].concat();
    // No crop, no flip: unchanged.
    Augment {
        crop: 0,
        flip: false,
    }
    .apply(&mut rng(1), [c, h, w], &mut pixels);
    assert_eq!(&pixels[..img.len()], img.as_slice());
    // Flip only: each image is itself or its mirror.
    let mirror: Vec<u8> = (0..c * h * w)
        .map(|i| {
            let (plane, y, x) = (i / (h * w), (i / w) % h, i % w);
            img[(plane * h + y) * w + (w - 1 - x)]
        })
        .collect();
    let mut seen_flip = false;
    for seed in 0..8 {
        let mut p = img.clone();
        Augment {
            crop: 0,
            flip: true,
        }
        .apply(&mut rng(seed), [c, h, w], &mut p);
        assert!(p == img || p == mirror);
        seen_flip |= p == mirror;
    }
    assert!(seen_flip);
    // Crops: the same stream gives the same images; each output pixel
    // is an input pixel of its plane or a zero from the padding.
    let a = Augment {
        crop: 2,
        flip: true,
    };
    let mut p1 = pixels.clone();
    let mut p2 = pixels.clone();
    a.apply(&mut rng(5), [c, h, w], &mut p1);
    a.apply(&mut rng(5), [c, h, w], &mut p2);
    assert_eq!(p1, p2);
    for (i, v) in p1.iter().enumerate() {
        let plane = (i / (h * w)) % c;
        assert!(*v == 0 || img[plane * h * w..(plane + 1) * h * w].contains(v));
    }
    assert_ne!(p1, pixels);
}
