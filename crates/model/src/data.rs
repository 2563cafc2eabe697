//! Image data, raw or gzip-compressed, batch order and augmentation.
//!
//! A data directory holds either IDX files — `train-images-idx3-ubyte`,
//! `train-labels-idx1-ubyte`, `t10k-images-idx3-ubyte` and
//! `t10k-labels-idx1-ubyte`, each optionally with `.gz`, what torchvision,
//! Debian's `dataset-fashion-mnist` and most MNIST tools leave on disk —
//! or CIFAR-10's binary batches (`data_batch_1.bin` … `data_batch_5.bin`
//! and `test_batch.bin`, in the directory or its `cifar-10-batches-bin/`,
//! as the official `cifar-10-binary.tar.gz` unpacks): per image one label
//! byte, then 1024 red, 1024 green and 1024 blue bytes, row-major 32 × 32.

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::seq::SliceRandom;
use serde::{Deserialize, Serialize};

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
    /// Colour planes per image (1 for IDX, 3 for CIFAR-10), stored one
    /// after the other (`[c, rows, cols]`).
    pub channels: usize,
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
        self.channels * self.rows * self.cols
    }

    /// The shape of one image: `[channels, rows, cols]`.
    pub fn shape(&self) -> crate::spec::Shape {
        crate::spec::Shape::image(self.channels, self.rows, self.cols)
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

/// Training-time augmentation of images, as torchvision's `RandomCrop(h,
/// padding)` followed by `RandomHorizontalFlip()`: drawn from the run
/// seed, so a local run and a cascade see the same images.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Augment {
    /// Zero pixels added on every side before a random crop back to the
    /// image's size (0: no crop).
    #[serde(default)]
    pub crop: usize,
    /// Mirror each image left to right with probability 1/2.
    #[serde(default)]
    pub flip: bool,
}

impl Augment {
    /// Augments `pixels` (`count` images of `[c, h, w]`, in batch order)
    /// in place: for each image, in order, `dy`, `dx` uniform in
    /// `0..=2·crop` then a flip bit, from one ChaCha8 stream of the epoch
    /// (`next_u32 % (2·crop + 1)` twice, then `next_u32 & 1`); the image
    /// becomes `out[c][y][x] = padded[c][y + dy][x' + dx]` with
    /// `x' = w − 1 − x` when flipped, `padded` the image with `crop` zero
    /// pixels on every side.
    pub fn apply(&self, rng: &mut impl rand::RngCore, shape: [usize; 3], pixels: &mut [u8]) {
        let [c, h, w] = shape;
        let len = c * h * w;
        if len == 0 || (self.crop == 0 && !self.flip) {
            return;
        }
        let span = 2 * self.crop as u32 + 1;
        let mut out = vec![0u8; len];
        for img in pixels.chunks_exact_mut(len) {
            let dy = (rng.next_u32() % span) as isize - self.crop as isize;
            let dx = (rng.next_u32() % span) as isize - self.crop as isize;
            let flip = self.flip && rng.next_u32() & 1 == 1;
            for ci in 0..c {
                for y in 0..h {
                    for x in 0..w {
                        let xs = if flip { w - 1 - x } else { x };
                        let (sy, sx) = (y as isize + dy, xs as isize + dx);
                        out[(ci * h + y) * w + x] =
                            if sy >= 0 && sx >= 0 && (sy as usize) < h && (sx as usize) < w {
                                img[(ci * h + sy as usize) * w + sx as usize]
                            } else {
                                0
                            };
                    }
                }
            }
            img.copy_from_slice(&out);
        }
    }
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

/// Loads the train and test sets of an IDX or CIFAR-10 directory.
pub fn load_dir(dir: &Path) -> Result<Split> {
    if let Some(cifar) = cifar_dir(dir) {
        return load_cifar(&cifar);
    }
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
        channels: 1,
    })
}

/// Bytes of one CIFAR-10 record: a label and 3 × 32 × 32 pixels.
pub const CIFAR_RECORD: usize = 1 + 3 * 32 * 32;

/// The directory holding CIFAR-10's binary batches, if `dir` is one or
/// contains `cifar-10-batches-bin/`.
pub fn cifar_dir(dir: &Path) -> Option<PathBuf> {
    [dir.to_path_buf(), dir.join("cifar-10-batches-bin")]
        .into_iter()
        .find(|d| find(d, "test_batch.bin").is_ok() && find(d, "data_batch_1.bin").is_ok())
}

/// Loads CIFAR-10's binary batches: `data_batch_1.bin` … (as many as
/// there are, in order, up to 5) for training, `test_batch.bin` for test.
pub fn load_cifar(dir: &Path) -> Result<Split> {
    let mut train: Option<Dataset> = None;
    for i in 1..=5 {
        let Ok(path) = find(dir, &format!("data_batch_{i}.bin")) else {
            break;
        };
        let part = parse_cifar(&read_maybe_gz(&path)?).map_err(|message| ModelError::Data {
            path: path.clone(),
            message,
        })?;
        train = Some(match train {
            None => part,
            Some(mut t) => {
                t.pixels.extend_from_slice(&part.pixels);
                t.labels.extend_from_slice(&part.labels);
                t
            }
        });
    }
    let path = find(dir, "test_batch.bin")?;
    let test = parse_cifar(&read_maybe_gz(&path)?).map_err(|message| ModelError::Data {
        path: path.clone(),
        message,
    })?;
    let train = train.ok_or_else(|| ModelError::Data {
        path: dir.join("data_batch_1.bin"),
        message: "missing".into(),
    })?;
    Ok(Split {
        train,
        test,
        dir: dir.to_path_buf(),
    })
}

/// Parses one CIFAR-10 binary batch (records of [`CIFAR_RECORD`] bytes).
pub fn parse_cifar(bytes: &[u8]) -> std::result::Result<Dataset, String> {
    if bytes.is_empty() || !bytes.len().is_multiple_of(CIFAR_RECORD) {
        return Err(format!(
            "{} bytes is not a whole number of {CIFAR_RECORD}-byte CIFAR-10 records",
            bytes.len()
        ));
    }
    let n = bytes.len() / CIFAR_RECORD;
    let mut pixels = Vec::with_capacity(n * (CIFAR_RECORD - 1));
    let mut labels = Vec::with_capacity(n);
    for (i, record) in bytes.chunks_exact(CIFAR_RECORD).enumerate() {
        if record[0] > 9 {
            return Err(format!("record {i}: label {} outside 0..=9", record[0]));
        }
        labels.push(record[0]);
        pixels.extend_from_slice(&record[1..]);
    }
    Ok(Dataset {
        pixels,
        labels,
        rows: 32,
        cols: 32,
        channels: 3,
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
mod tests;
