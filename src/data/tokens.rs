//! Token data for language models: `x` int64 [N, T] token ids in a
//! safetensors file (`y` [N] optional: with none the loss is next-token
//! cross-entropy and `y` holds zeros nobody reads), and a deterministic
//! synthetic token set.

use super::{check_data_size, Dataset};
use crate::error::{Error, Result};
use crate::model::{tensorio, Model, Shape};
use rand::{Rng, SeedableRng};

/// The largest token id held exactly by the f32 data store (2^24).
pub const MAX_TOKEN_ID: usize = 1 << 24;

/// Loads `x` [N, T] (integer) and the optional `y` [N] of a file whose
/// layout was read; `samples` keeps the first ones.
pub(super) fn load_tokens(file: &tensorio::File, samples: Option<usize>) -> Result<Dataset> {
    let label = file.label.clone();
    let err = |msg: String| Error::Data {
        file: label.clone(),
        msg,
    };
    let layout = file.layout();
    let x = &layout["x"];
    let (available, t) = (x.shape[0], x.shape[1]);
    if t < 2 {
        return Err(err(format!(
            "`x` holds token ids [N, T] with T = {t}: a language model needs at least 2 tokens"
        )));
    }
    let n = samples.unwrap_or(available);
    if n > available {
        return Err(Error::Invalid {
            what: "samples",
            msg: format!("{n} is more than the {available} samples in {label}"),
        });
    }
    let shape = Shape::ids(t);
    check_data_size(&label, n, shape)?;
    let y = match layout.get("y") {
        None => vec![0; n],
        Some(yl) => {
            if !tensorio::is_integer(yl.dtype) || yl.shape != [available] {
                return Err(err(format!(
                    "`y` must be integer labels [N] with N = {available} like `x`, got {} {:?}",
                    yl.dtype, yl.shape
                )));
            }
            let yt = file.tensor_first("y", n)?;
            let mut labels = Vec::with_capacity(n);
            for (i, &v) in yt.data.iter().take(n).enumerate() {
                if v < 0.0 || v > u32::MAX as f64 {
                    return Err(err(format!("label {v} of sample {i} is not a class index")));
                }
                labels.push(v as u32);
            }
            labels
        }
    };
    let xt = file.tensor_first("x", n * t)?;
    if let Some(i) = xt
        .data
        .iter()
        .take(n * t)
        .position(|&v| v < 0.0 || v >= MAX_TOKEN_ID as f64)
    {
        return Err(err(format!(
            "`x`[{}, {}] = {} is not a token id (0 to {})",
            i / t,
            i % t,
            xt.data[i],
            MAX_TOKEN_ID - 1
        )));
    }
    Ok(Dataset {
        x: xt.data.iter().take(n * t).map(|&v| v as f32).collect(),
        y,
        shape,
        source: label,
    })
}

/// Refuses a token id at or above the model's vocabulary, naming the
/// first bad position.
pub(super) fn check_ids(data: &Dataset, model: &Model) -> Result<()> {
    let Some(vocab) = model.vocab() else {
        return Ok(());
    };
    let t = data.shape.tokens();
    if let Some(i) = data.x.iter().position(|&v| v as usize >= vocab) {
        return Err(Error::Data {
            file: data.source.clone(),
            msg: format!(
                "`x`[{}, {}] = {} is out of range: {} has a vocabulary of {vocab} tokens \
                 (0..{})",
                i / t,
                i % t,
                data.x[i],
                model.name,
                vocab - 1
            ),
        });
    }
    Ok(())
}

/// `n` sequences of `t` token ids below `vocab`, deterministic in
/// `seed`: a random walk with a fixed preferred successor per token
/// (followed 3 times in 4), so next-token prediction has something to
/// learn. `y` holds zeros (the next-token loss reads none).
pub fn synthetic_tokens(t: usize, vocab: usize, n: usize, seed: u64) -> Result<Dataset> {
    if n == 0 || vocab == 0 || t < 2 {
        return Err(Error::Invalid {
            what: "samples",
            msg: format!(
                "synthetic tokens need at least 1 sample, 1 token id and 2 tokens, got {n}, \
                 {vocab}, {t}"
            ),
        });
    }
    let shape = Shape::ids(t);
    check_data_size("synthetic tokens", n, shape)?;
    let vocab = vocab.min(MAX_TOKEN_ID);
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x70ce_5eed);
    let next: Vec<usize> = (0..vocab).map(|_| rng.random_range(0..vocab)).collect();
    let mut x = Vec::with_capacity(n * t);
    for _ in 0..n {
        let mut tok = rng.random_range(0..vocab);
        for _ in 0..t {
            x.push(tok as f32);
            tok = if rng.random_range(0..4) < 3 {
                next[tok]
            } else {
                rng.random_range(0..vocab)
            };
        }
    }
    Ok(Dataset {
        x,
        y: vec![0; n],
        shape,
        source: format!("synthetic tokens(seed={seed}, n={n})"),
    })
}
