//! `--augment crop-flip`: zero-pad 4, random H×W crop, horizontal flip
//! with probability 1/2, per sample and epoch from the seed: the transform
//! against an independent pad-crop-flip of a known image, the draws'
//! distribution, and that training sees exactly the augmented samples.
//! (Resume with augmentation on: tests/htr.rs.)

mod common;
use common::*;
use hesscope::data::Dataset;
use hesscope::model::{Model, Shape, Weights};
use hesscope::train::{
    crop_flip, crop_flip_draws, initial_counts, permutation, Augment, CropFlip, Recipe, Trainer,
    CROP_PAD,
};

/// Pad with zeros, crop at (dy, dx), then mirror: written out the slow way.
fn by_hand(img: &[f32], s: Shape, t: CropFlip) -> Vec<f32> {
    let p = CROP_PAD;
    let (ph, pw) = (s.h + 2 * p, s.w + 2 * p);
    let mut out = vec![];
    for c in 0..s.c {
        let mut padded = vec![vec![0.0f32; pw]; ph];
        for y in 0..s.h {
            for x in 0..s.w {
                padded[y + p][x + p] = img[(c * s.h + y) * s.w + x];
            }
        }
        let crop: Vec<Vec<f32>> = (0..s.h)
            .map(|y| (0..s.w).map(|x| padded[y + t.dy][x + t.dx]).collect())
            .collect();
        for row in crop {
            let mut row = row;
            if t.flip {
                row.reverse();
            }
            out.extend(row);
        }
    }
    out
}

#[test]
fn crop_and_flip_of_a_known_image() {
    let s = Shape::new(2, 5, 6);
    let img: Vec<f32> = (0..s.numel()).map(|i| 1.0 + i as f32).collect();
    let mut out = vec![f32::NAN; s.numel()];
    // The centre crop is the image; flipped, each row reversed.
    let centre = CropFlip {
        dy: 4,
        dx: 4,
        flip: false,
    };
    crop_flip(&img, s, centre, &mut out);
    assert_eq!(out, img);
    crop_flip(
        &img,
        s,
        CropFlip {
            flip: true,
            ..centre
        },
        &mut out,
    );
    assert_eq!(&out[..6], &[6.0, 5.0, 4.0, 3.0, 2.0, 1.0]);
    // The top-left corner of the padded image: 4 rows and 4 columns of
    // zeros, then the image's top-left 1×2 block.
    crop_flip(
        &img,
        s,
        CropFlip {
            dy: 0,
            dx: 0,
            flip: false,
        },
        &mut out,
    );
    assert!(out[..4 * 6].iter().all(|v| *v == 0.0));
    assert_eq!(&out[4 * 6..5 * 6], &[0.0, 0.0, 0.0, 0.0, 1.0, 2.0]);
    assert_eq!(out[30 + 4 * 6 + 4], 31.0, "channel 1 starts at 31");
    // Every offset and flip against the slow construction.
    for dy in 0..=2 * CROP_PAD {
        for dx in 0..=2 * CROP_PAD {
            for flip in [false, true] {
                let t = CropFlip { dy, dx, flip };
                crop_flip(&img, s, t, &mut out);
                assert_eq!(out, by_hand(&img, s, t), "{t:?}");
            }
        }
    }
}

#[test]
fn draws_are_uniform_offsets_and_fair_flips_per_seed_and_epoch() {
    let n = 9000;
    let d = crop_flip_draws(n, 3, 0);
    assert_eq!(d.len(), n);
    assert_eq!(d, crop_flip_draws(n, 3, 0), "deterministic");
    assert_ne!(d, crop_flip_draws(n, 3, 1), "per epoch");
    assert_ne!(d, crop_flip_draws(n, 4, 0), "per seed");
    // A sample's draw does not depend on how many samples there are.
    assert_eq!(&crop_flip_draws(100, 3, 0)[..], &d[..100]);
    // Fractions within 5 standard deviations of the binomial (a check
    // that fails with probability < 1e-6 per count for a correct sampler;
    // the seeds are fixed, so it is deterministic either way).
    let within = |count: usize, p: f64| {
        let sd = (n as f64 * p * (1.0 - p)).sqrt();
        (count as f64 - n as f64 * p).abs() <= 5.0 * sd
    };
    let flips = d.iter().filter(|t| t.flip).count();
    assert!(within(flips, 0.5), "{flips} flips of {n}");
    for v in 0..=2 * CROP_PAD {
        let ys = d.iter().filter(|t| t.dy == v).count();
        let xs = d.iter().filter(|t| t.dx == v).count();
        assert!(
            within(ys, 1.0 / 9.0) && within(xs, 1.0 / 9.0),
            "{v}: {ys} {xs}"
        );
    }
    assert!(d.iter().all(|t| t.dy <= 8 && t.dx <= 8));
    // dy and dx are not the same draw.
    assert!(d.iter().filter(|t| t.dy == t.dx).count() < n / 5);
}

fn trainer(shuffle: bool, augment: Augment) -> (Trainer, Dataset) {
    let dir = fixtures_dir().join("cnn-tiny");
    let m = Model::load("cnn-tiny").unwrap();
    let wpath = dir.join("weights.safetensors");
    let data = Dataset::load(&dir.join("data.safetensors")).unwrap();
    let r = Recipe {
        epochs: 2,
        lr: 0.05,
        momentum: 0.9,
        weight_decay: 0.0,
        milestones: vec![],
        lr_gamma: 0.1,
        shuffle,
        seed: 9,
    };
    let counts = initial_counts(&m, Some(&wpath)).unwrap();
    let w = Weights::load(&m, &wpath).unwrap();
    let mut t = Trainer::new(m, w, data.clone(), 32, r, counts).unwrap();
    t.augment = augment;
    (t, data)
}

#[test]
fn training_sees_each_epochs_augmented_samples() {
    for shuffle in [false, true] {
        let (mut t, data) = trainer(shuffle, Augment::CropFlip);
        let (mut plain, _) = trainer(shuffle, Augment::None);
        let s = data.shape;
        let d = s.numel();
        for e in 0..2 {
            let r = t.epoch().unwrap();
            let p = plain.epoch().unwrap();
            assert_ne!(r.losses, p.losses, "augmentation changed nothing");
            // The epoch's data: sample i of the order is file sample
            // perm[i], transformed by its own draw.
            let perm = if shuffle {
                permutation(data.len(), 9, e)
            } else {
                (0..data.len()).collect()
            };
            let draws = crop_flip_draws(data.len(), 9, e);
            let seen = &t.cpu.problem.data;
            assert_eq!(seen.shape, s);
            assert_eq!(seen.x.len(), data.x.len());
            let mut out = vec![0.0f32; d];
            for (i, &j) in perm.iter().enumerate() {
                crop_flip(&data.x[j * d..(j + 1) * d], s, draws[j], &mut out);
                assert_eq!(
                    &seen.x[i * d..(i + 1) * d],
                    &out[..],
                    "epoch {e} sample {i}"
                );
                assert_eq!(seen.y[i], data.y[j]);
            }
            // The file-order data the trainer keeps is untouched.
            assert_eq!(t.data().x, data.x);
        }
    }
}
