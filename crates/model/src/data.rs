//! IDX data (the MNIST layout), raw or gzip-compressed, and batch order.
//!
//! A data directory holds `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
//! `t10k-images-idx3-ubyte` and `t10k-labels-idx1-ubyte`, each optionally
//! with `.gz` — what torchvision, Debian's `dataset-fashion-mnist` and most
//! MNIST tools leave on disk.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;

use crate::error::{ModelError, Result};
use crate::init::rng;
use crate::seed::{Purpose, RunSeed};
use crate::tensor_bytes::pixel_to_f32;

/// Magic number of an IDX file of unsigned bytes with 3 dimensions (images).
pub const IMAGES_MAGIC: u32 = 0x0000_0803;
/// Magic number of an IDX file of unsigned bytes with 1 dimension (labels).
pub const LABELS_MAGIC: u32 = 0x0000_0801;
/// Where Debian's `dataset-fashion-mnist` installs its files.
pub const DEBIAN_FASHION_MNIST: &str = "/usr/share/datasets/fashion-mnist";

/// Images with their labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// Pixels, `len × rows × cols`, row-major.
    pub pixels: Vec<u8>,
    /// One class per image.
    pub labels: Vec<u8>,
    /// Image height.
    pub rows: usize,
    /// Image width.
    pub cols: usize,
}

/// The train and test halves of a data directory.
#[derive(Debug, Clone)]
pub struct Split {
    /// Training images.
    pub train: Dataset,
    /// Test images.
    pub test: Dataset,
    /// The directory they came from.
    pub dir: PathBuf,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no images.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Features per image.
    pub fn features(&self) -> usize {
        self.rows * self.cols
    }

    /// The shape of one image: `[1, rows, cols]`.
    pub fn shape(&self) -> crate::spec::Shape {
        crate::spec::Shape::image(1, self.rows, self.cols)
    }

    /// Whether a model taking samples of shape `input` can read these
    /// images: the image shape itself, or its values as flat features.
    pub fn fits(&self, input: &crate::spec::Shape) -> bool {
        *input == self.shape() || input.features() == Some(self.features())
    }

    /// The first `n` images (all if `n` is larger).
    pub fn truncate(mut self, n: usize) -> Self {
        let n = n.min(self.len());
        self.pixels.truncate(n * self.features());
        self.labels.truncate(n);
        self
    }

    /// Pixels of the images at `indices`, concatenated.
    pub fn gather_pixels(&self, indices: &[u32]) -> Vec<u8> {
        let f = self.features();
        let mut out = Vec::with_capacity(indices.len() * f);
        for &i in indices {
            let i = i as usize;
            out.extend_from_slice(&self.pixels[i * f..(i + 1) * f]);
        }
        out
    }

    /// Labels of the images at `indices`.
    pub fn gather_labels(&self, indices: &[u32]) -> Vec<u32> {
        indices
            .iter()
            .map(|&i| u32::from(self.labels[i as usize]))
            .collect()
    }

    /// Model input for the images at `indices`: `p / 255` as `f32`.
    pub fn gather_f32(&self, indices: &[u32]) -> Vec<f32> {
        self.gather_pixels(indices)
            .into_iter()
            .map(pixel_to_f32)
            .collect()
    }
}

/// The order in which an epoch visits the training images: a seeded
/// Fisher–Yates shuffle, different each epoch, the same every run.
pub fn epoch_order(seed: &RunSeed, epoch: u32, len: usize) -> Vec<u32> {
    let mut order: Vec<u32> = (0..len as u32).collect();
    let mut r = rng(seed.derive(Purpose::Order(u64::from(epoch))));
    order.shuffle(&mut r);
    order
}

/// Finds the data directory: `explicit` (`--data`), else `$MIXNN_DATA`,
/// else Debian's install path. Returns what was tried when none exists.
pub fn resolve_dir(explicit: Option<&Path>) -> std::result::Result<PathBuf, String> {
    if let Some(p) = explicit {
        return Ok(p.to_path_buf());
    }
    if let Some(p) = std::env::var_os("MIXNN_DATA") {
        return Ok(PathBuf::from(p));
    }
    let debian = PathBuf::from(DEBIAN_FASHION_MNIST);
    if debian.is_dir() {
        return Ok(debian);
    }
    Err(format!(
        "no data directory: pass --data DIR, set MIXNN_DATA, or install Debian's \
         dataset-fashion-mnist (to {DEBIAN_FASHION_MNIST})"
    ))
}

/// Loads the train and test sets of an IDX directory.
pub fn load_dir(dir: &Path) -> Result<Split> {
    let train = load_pair(dir, "train")?;
    let test = load_pair(dir, "t10k")?;
    if (train.rows, train.cols) != (test.rows, test.cols) {
        return Err(ModelError::Data {
            path: dir.to_path_buf(),
            message: format!(
                "train images are {}x{} but test images are {}x{}",
                train.rows, train.cols, test.rows, test.cols
            ),
        });
    }
    Ok(Split {
        train,
        test,
        dir: dir.to_path_buf(),
    })
}

/// Loads `{prefix}-images-idx3-ubyte[.gz]` and `{prefix}-labels-idx1-ubyte[.gz]`.
pub fn load_pair(dir: &Path, prefix: &str) -> Result<Dataset> {
    let images_path = find(dir, &format!("{prefix}-images-idx3-ubyte"))?;
    let labels_path = find(dir, &format!("{prefix}-labels-idx1-ubyte"))?;
    let (rows, cols, pixels, n_images) =
        parse_images(&read_maybe_gz(&images_path)?).map_err(|message| ModelError::Data {
            path: images_path.clone(),
            message,
        })?;
    let labels =
        parse_labels(&read_maybe_gz(&labels_path)?).map_err(|message| ModelError::Data {
            path: labels_path.clone(),
            message,
        })?;
    if labels.len() != n_images {
        return Err(ModelError::Data {
            path: labels_path,
            message: format!(
                "{} labels but {} images in {}",
                labels.len(),
                n_images,
                images_path.display()
            ),
        });
    }
    Ok(Dataset {
        pixels,
        labels,
        rows,
        cols,
    })
}

fn find(dir: &Path, stem: &str) -> Result<PathBuf> {
    for name in [stem.to_string(), format!("{stem}.gz")] {
        let p = dir.join(name);
        if p.is_file() {
            return Ok(p);
        }
    }
    Err(ModelError::Data {
        path: dir.join(stem),
        message: "missing (also tried .gz)".into(),
    })
}

fn read_maybe_gz(path: &Path) -> Result<Vec<u8>> {
    let io = |source| ModelError::Io {
        path: path.to_path_buf(),
        source,
    };
    let raw = std::fs::read(path).map_err(io)?;
    if raw.starts_with(&[0x1f, 0x8b]) {
        let mut out = Vec::new();
        flate2::read::GzDecoder::new(raw.as_slice())
            .read_to_end(&mut out)
            .map_err(|e| ModelError::Data {
                path: path.to_path_buf(),
                message: format!("corrupt gzip: {e}"),
            })?;
        Ok(out)
    } else {
        Ok(raw)
    }
}

fn be_u32(bytes: &[u8], at: usize) -> std::result::Result<u32, String> {
    bytes
        .get(at..at + 4)
        .map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
        .ok_or_else(|| format!("truncated header ({} bytes)", bytes.len()))
}

/// Parses an IDX3 image file: `(rows, cols, pixels, count)`.
pub fn parse_images(bytes: &[u8]) -> std::result::Result<(usize, usize, Vec<u8>, usize), String> {
    let magic = be_u32(bytes, 0)?;
    if magic != IMAGES_MAGIC {
        return Err(format!(
            "wrong magic {magic:#010x}, expected {IMAGES_MAGIC:#010x} (IDX3 unsigned bytes)"
        ));
    }
    let n = be_u32(bytes, 4)? as usize;
    let rows = be_u32(bytes, 8)? as usize;
    let cols = be_u32(bytes, 12)? as usize;
    let need = n
        .checked_mul(rows)
        .and_then(|v| v.checked_mul(cols))
        .ok_or_else(|| "dimensions overflow".to_string())?;
    let body = &bytes[16..];
    if body.len() != need {
        return Err(format!(
            "truncated or oversized: header says {n} images of {rows}x{cols} ({need} bytes), file has {}",
            body.len()
        ));
    }
    Ok((rows, cols, body.to_vec(), n))
}

/// Parses an IDX1 label file.
pub fn parse_labels(bytes: &[u8]) -> std::result::Result<Vec<u8>, String> {
    let magic = be_u32(bytes, 0)?;
    if magic != LABELS_MAGIC {
        return Err(format!(
            "wrong magic {magic:#010x}, expected {LABELS_MAGIC:#010x} (IDX1 unsigned bytes)"
        ));
    }
    let n = be_u32(bytes, 4)? as usize;
    let body = &bytes[8..];
    if body.len() != n {
        return Err(format!(
            "truncated or oversized: header says {n} labels, file has {}",
            body.len()
        ));
    }
    Ok(body.to_vec())
}

#[cfg(test)]
mod tests {
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
}
