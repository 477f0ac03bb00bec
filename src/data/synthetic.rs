//! A learnable class-conditional data set: each class has a Gaussian
//! template image and samples are template plus noise, labels balanced and
//! shuffled (the recipe of the shared fixtures).

use super::{check_data_size, Dataset};
use crate::error::{Error, Result};
use crate::model::Shape;
use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// [`synthetic`] after checking the size: at least one sample and one
/// class, and no more than [`MAX_DATA_ELEMENTS`](super::MAX_DATA_ELEMENTS)
/// values in all (templates included).
pub fn try_synthetic(shape: Shape, classes: usize, n: usize, seed: u64) -> Result<Dataset> {
    if n == 0 {
        return Err(Error::Invalid {
            what: "samples",
            msg: "must be at least 1".into(),
        });
    }
    if classes == 0 {
        return Err(Error::Invalid {
            what: "classes",
            msg: "synthetic data needs at least one class".into(),
        });
    }
    check_data_size("synthetic data", n, shape)?;
    if classes as u128 * shape.numel() as u128 > super::MAX_DATA_ELEMENTS as u128 {
        return Err(Error::Invalid {
            what: "classes",
            msg: format!(
                "{classes} class templates of {shape} are above the limit of {} values",
                super::MAX_DATA_ELEMENTS
            ),
        });
    }
    Ok(synthetic(shape, classes, n, seed))
}

pub fn synthetic(shape: Shape, classes: usize, n: usize, seed: u64) -> Dataset {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed_da7a);
    let d = shape.numel();
    let mut normal = || -> f32 { StandardNormal.sample(&mut rng) };
    let templates: Vec<f32> = (0..classes * d).map(|_| normal()).collect();
    let mut y: Vec<u32> = (0..n).map(|i| (i % classes) as u32).collect();
    let mut rng2 = rand::rngs::StdRng::seed_from_u64(seed ^ 0x1abe1);
    y.shuffle(&mut rng2);
    let mut rng3 = rand::rngs::StdRng::seed_from_u64(seed ^ 0x0153);
    let mut x = Vec::with_capacity(n * d);
    for &c in &y {
        let t = &templates[c as usize * d..(c as usize + 1) * d];
        x.extend(t.iter().map(|&v| {
            let e: f32 = StandardNormal.sample(&mut rng3);
            v + 0.5 * e
        }));
    }
    Dataset {
        x,
        y,
        shape,
        source: format!("synthetic(seed={seed}, n={n})"),
    }
}
