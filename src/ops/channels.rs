//! Channel moves and the broadcast product in float64: concatenation and
//! narrowing along channels, ShuffleNet's channel shuffle, and y = a·b
//! with b per plane or per element. Layouts are [n, c, hw] per value.

/// Per sample, the inputs' [c_i, hw] blocks one after another:
/// torch.cat(dim=1). `xs` holds (values [n, c_i, hw], c_i).
pub fn concat(n: usize, hw: usize, xs: &[(&[f64], usize)]) -> Vec<f64> {
    let c: usize = xs.iter().map(|x| x.1).sum();
    let mut y = Vec::with_capacity(n * c * hw);
    for s in 0..n {
        for &(x, ci) in xs {
            y.extend_from_slice(&x[s * ci * hw..(s + 1) * ci * hw]);
        }
    }
    y
}

/// The transpose of [`concat`]: gy [n, Σc_i, hw] cut into the parts
/// [n, c_i, hw].
pub fn split(n: usize, hw: usize, parts: &[usize], gy: &[f64]) -> Vec<Vec<f64>> {
    let c: usize = parts.iter().sum();
    let mut off = 0;
    parts
        .iter()
        .map(|&ci| {
            let mut g = Vec::with_capacity(n * ci * hw);
            for s in 0..n {
                let b = (s * c + off) * hw;
                g.extend_from_slice(&gy[b..b + ci * hw]);
            }
            off += ci;
            g
        })
        .collect()
}

/// Channels [start, start + len) of x [n, c, hw].
pub fn narrow(n: usize, c: usize, hw: usize, start: usize, len: usize, x: &[f64]) -> Vec<f64> {
    let mut y = Vec::with_capacity(n * len * hw);
    for s in 0..n {
        let b = (s * c + start) * hw;
        y.extend_from_slice(&x[b..b + len * hw]);
    }
    y
}

/// The transpose of [`narrow`]: gy [n, len, hw] at channels [start,
/// start + len) of zeros [n, c, hw].
pub fn narrow_backward(
    n: usize,
    c: usize,
    hw: usize,
    start: usize,
    len: usize,
    gy: &[f64],
) -> Vec<f64> {
    let mut gx = vec![0.0; n * c * hw];
    for s in 0..n {
        let b = (s * c + start) * hw;
        gx[b..b + len * hw].copy_from_slice(&gy[s * len * hw..(s + 1) * len * hw]);
    }
    gx
}

/// The input channel that output channel `o` of a shuffle with `groups`
/// groups of `c` channels reads: (o mod g)·(c/g) + ⌊o/g⌋.
pub fn shuffle_source(o: usize, c: usize, groups: usize) -> usize {
    (o % groups) * (c / groups) + o / groups
}

/// Channel shuffle of x [n, c, hw]: view(n, g, c/g, hw), transpose(1, 2),
/// reshape(n, c, hw). Its transpose (and inverse) is the shuffle with
/// c/g groups.
pub fn shuffle(n: usize, c: usize, hw: usize, groups: usize, x: &[f64]) -> Vec<f64> {
    let mut y = Vec::with_capacity(n * c * hw);
    for s in 0..n {
        for o in 0..c {
            let b = (s * c + shuffle_source(o, c, groups)) * hw;
            y.extend_from_slice(&x[b..b + hw]);
        }
    }
    y
}

/// a[i]·b[⌊i/hw⌋]: b per plane of `hw` elements of a (hw = 1: elementwise).
pub fn mul(a: &[f64], b: &[f64], hw: usize) -> Vec<f64> {
    a.iter().enumerate().map(|(i, x)| x * b[i / hw]).collect()
}

/// Per plane of `hw` elements, Σ a·b (the adjoint of a broadcast factor).
pub fn plane_dot(a: &[f64], b: &[f64], hw: usize) -> Vec<f64> {
    a.chunks(hw)
        .zip(b.chunks(hw))
        .map(|(p, q)| p.iter().zip(q).map(|(x, y)| x * y).sum())
        .collect()
}

/// y = x·g of x [n, c, hw] and one factor per channel g [c], shared by
/// the samples (ConvNeXt's layer scale).
pub fn scale_channels(x: &[f64], g: &[f64], hw: usize) -> Vec<f64> {
    let c = g.len();
    x.iter()
        .enumerate()
        .map(|(i, v)| v * g[(i / hw) % c])
        .collect()
}

/// Per channel of [n, c, hw], Σ a·b over the samples and the plane: the
/// adjoint of [`scale_channels`]'s factor.
pub fn channel_dot(a: &[f64], b: &[f64], c: usize, hw: usize) -> Vec<f64> {
    let mut out = vec![0.0; c];
    for (pl, (p, q)) in a.chunks(hw).zip(b.chunks(hw)).enumerate() {
        out[pl % c] += p.iter().zip(q).map(|(x, y)| x * y).sum::<f64>();
    }
    out
}
