//! The optimiser's recipe and the order and augmentation of each epoch's
//! samples (see the module docs of `crate::train`).

use crate::data::Dataset;
use crate::error::{Error, Result};
use crate::model::Shape;
use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};

/// The optimiser and schedule.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Recipe {
    pub epochs: usize,
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
    /// Epochs (1-based counts of finished epochs) after which lr is
    /// multiplied by `lr_gamma`; strictly increasing, each ≥ 1.
    pub milestones: Vec<usize>,
    pub lr_gamma: f64,
    /// A permutation of the data per epoch from `seed`; else file order.
    pub shuffle: bool,
    pub seed: u64,
}

pub(super) fn invalid(what: &'static str, msg: impl Into<String>) -> Error {
    Error::Invalid {
        what,
        msg: msg.into(),
    }
}

impl Recipe {
    pub fn check(&self) -> Result<()> {
        if self.epochs == 0 {
            return Err(invalid("epochs", "must be at least 1"));
        }
        if !(self.lr.is_finite() && self.lr > 0.0) {
            return Err(invalid(
                "learning rate",
                format!("{} is not a finite positive number", self.lr),
            ));
        }
        if !(self.momentum.is_finite() && (0.0..1.0).contains(&self.momentum)) {
            return Err(invalid(
                "momentum",
                format!("{} is not in [0, 1)", self.momentum),
            ));
        }
        if !(self.weight_decay.is_finite() && self.weight_decay >= 0.0) {
            return Err(invalid(
                "weight decay",
                format!("{} is not a finite number ≥ 0", self.weight_decay),
            ));
        }
        if !(self.lr_gamma.is_finite() && self.lr_gamma > 0.0) {
            return Err(invalid(
                "learning-rate gamma",
                format!("{} is not a finite positive number", self.lr_gamma),
            ));
        }
        if self.milestones.first() == Some(&0) {
            return Err(invalid(
                "milestones",
                "epochs are counted from 1: a milestone is at least 1",
            ));
        }
        if self.milestones.windows(2).any(|w| w[0] >= w[1]) {
            return Err(invalid(
                "milestones",
                format!("{:?} is not strictly increasing", self.milestones),
            ));
        }
        Ok(())
    }

    /// The learning rate of epoch `e` (0-based).
    pub fn lr_at(&self, e: usize) -> f64 {
        let k = self.milestones.iter().filter(|&&m| m <= e).count();
        self.lr * self.lr_gamma.powi(k as i32)
    }
}

/// The sample order of epoch `epoch` (0-based) under `seed`: 0..n shuffled
/// by rand's `SliceRandom::shuffle` (Fisher–Yates) with `StdRng` (rand 0.9,
/// ChaCha12) seeded by `seed_from_u64(seed ^ 0x7472_6169_6e00_0000 ^
/// epoch·0x9E37_79B9_7F4A_7C15)`, a fresh generator per epoch, so any
/// epoch's order depends only on the seed and the epoch.
pub fn permutation(n: usize, seed: u64, epoch: usize) -> Vec<usize> {
    let s = seed ^ 0x7472_6169_6e00_0000 ^ (epoch as u64).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    let mut p: Vec<usize> = (0..n).collect();
    p.shuffle(&mut rng);
    p
}

/// Data augmentation applied to the training samples each epoch.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Augment {
    /// The samples as they are.
    #[default]
    None,
    /// torchvision's `RandomCrop(H×W, padding=4)` (zero padding) then
    /// `RandomHorizontalFlip(0.5)`, per sample and epoch ([`crop_flip_draws`]).
    CropFlip,
}

/// Zero padding on each side before the random crop.
pub const CROP_PAD: usize = 4;

impl Augment {
    /// Whether it applies to samples of `shape`: a crop of an image with
    /// H or W ≤ [`CROP_PAD`] (a flat input is 1×1) can hold no pixel of
    /// it, only padding.
    pub fn check(&self, shape: Shape) -> Result<()> {
        if *self == Augment::CropFlip && (shape.h <= CROP_PAD || shape.w <= CROP_PAD) {
            return Err(invalid(
                "augment",
                format!(
                    "crop-flip pads {CROP_PAD} zeros on each side and crops an H×W window: \
                     on {}×{}×{} samples{} a crop can hold nothing of the image",
                    shape.c,
                    shape.h,
                    shape.w,
                    if shape.h == 1 && shape.w == 1 {
                        " (a flat input)"
                    } else {
                        ""
                    }
                ),
            ));
        }
        Ok(())
    }
}

/// One sample's crop and flip: the crop's top-left corner in the padded
/// image (`dy`, `dx` in 0..=2·[`CROP_PAD`]; 4, 4 is the original window)
/// and whether it is then mirrored left-right.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CropFlip {
    pub dy: usize,
    pub dx: usize,
    pub flip: bool,
}

/// The crop and flip of each of `n` samples (indexed in file order) in
/// epoch `epoch` (0-based): `StdRng::seed_from_u64(seed ^ 0x6175_676d_0000_0000
/// ^ epoch·0xD1B5_4A32_D192_ED03)`, per sample in file order dy, dx uniform
/// in 0..=8 (`random_range`), then flip = `random::<bool>()` (probability
/// 1/2), as torchvision draws the crop before the flip. A sample's draw
/// depends on the seed, the epoch and its index only, not on the order the
/// epoch visits it in.
pub fn crop_flip_draws(n: usize, seed: u64, epoch: usize) -> Vec<CropFlip> {
    let s = seed ^ 0x6175_676d_0000_0000 ^ (epoch as u64).wrapping_mul(0xD1B5_4A32_D192_ED03);
    let mut rng = rand::rngs::StdRng::seed_from_u64(s);
    (0..n)
        .map(|_| {
            let dy = rng.random_range(0..=2 * CROP_PAD);
            let dx = rng.random_range(0..=2 * CROP_PAD);
            CropFlip {
                dy,
                dx,
                flip: rng.random::<bool>(),
            }
        })
        .collect()
}

/// One C×H×W image cropped and flipped: out[c][y][x] = padded[c][y+dy][x'+dx]
/// with x' = W−1−x when flipped (else x), where the padded image is the
/// input with [`CROP_PAD`] zeros on every side (so padded[y][x] =
/// img[y−4][x−4] inside, 0 outside).
pub fn crop_flip(img: &[f32], shape: Shape, t: CropFlip, out: &mut [f32]) {
    let (h, w) = (shape.h as isize, shape.w as isize);
    let pad = CROP_PAD as isize;
    for c in 0..shape.c {
        let plane = &img[c * shape.spatial()..(c + 1) * shape.spatial()];
        let dst = &mut out[c * shape.spatial()..(c + 1) * shape.spatial()];
        for y in 0..h {
            let sy = y + t.dy as isize - pad;
            for x in 0..w {
                let xs = if t.flip { w - 1 - x } else { x };
                let sx = xs + t.dx as isize - pad;
                dst[(y * w + x) as usize] = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                    plane[(sy * w + sx) as usize]
                } else {
                    0.0
                };
            }
        }
    }
}

/// Samples `start..start + count` of a data set, as a data set.
pub fn samples(data: &Dataset, start: usize, count: usize) -> Dataset {
    let d = data.shape.numel();
    Dataset {
        x: data.x[start * d..(start + count) * d].to_vec(),
        y: data.y[start..start + count].to_vec(),
        shape: data.shape,
        source: data.source.clone(),
    }
}

/// The data set with its samples in the order `perm`, each augmented by
/// `draws[j]` (indexed by the sample's file position j) when given.
pub(super) fn permuted(data: &Dataset, perm: &[usize], draws: Option<&[CropFlip]>) -> Dataset {
    let d = data.shape.numel();
    let mut out = data.clone();
    for (i, &j) in perm.iter().enumerate() {
        let src = &data.x[j * d..(j + 1) * d];
        let dst = &mut out.x[i * d..(i + 1) * d];
        match draws {
            Some(t) => crop_flip(src, data.shape, t[j], dst),
            None => dst.copy_from_slice(src),
        }
        out.y[i] = data.y[j];
    }
    out
}
