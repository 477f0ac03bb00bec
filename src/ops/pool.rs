//! Max pooling and global average pooling in float64.

/// Max pool over [n·c planes of h×w]; returns y and, per output, the flat
/// input index (within the plane) of the first maximum in row-major window
/// order, as PyTorch picks it. Padding never wins.
#[allow(clippy::too_many_arguments)]
pub fn maxpool_forward(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    x: &[f64],
) -> (Vec<f64>, Vec<u32>) {
    let mut y = vec![f64::NEG_INFINITY; planes * oh * ow];
    let mut arg = vec![u32::MAX; planes * oh * ow];
    let plane = h * w;
    each_window_tap(planes, h, w, k, stride, pad, oh, ow, |o, i| {
        let (v, best) = (x[i], y[o]);
        // NaN-propagating like PyTorch: a NaN always wins.
        if v > best || arg[o] == u32::MAX || v.is_nan() && !best.is_nan() {
            y[o] = v;
            arg[o] = (i % plane) as u32;
        }
    });
    (y, arg)
}

/// Per window of a max pool (as `maxpool_forward` walks them): its
/// maximum minus the runner-up over the window's in-bounds elements (0 on
/// a tie, +∞ for a window of one element or a tie of exact zeros, NaN
/// where a NaN takes part):
/// how far the argmax is from changing.
#[allow(clippy::too_many_arguments)]
pub fn maxpool_margins(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    x: &[f64],
) -> Vec<f64> {
    let n = planes * oh * ow;
    let (mut best, mut second) = (vec![f64::NEG_INFINITY; n], vec![f64::NEG_INFINITY; n]);
    let mut nan = vec![false; n];
    each_window_tap(planes, h, w, k, stride, pad, oh, ow, |o, i| {
        let v = x[i];
        nan[o] |= v.is_nan();
        if v > best[o] {
            second[o] = best[o];
            best[o] = v;
        } else if v > second[o] {
            second[o] = v;
        }
    });
    // A tie of exact zeros (a ReLU's floor) is exact in any precision: no
    // rounding can break it.
    (0..n)
        .map(|o| {
            let (b, s) = (best[o], second[o]);
            if nan[o] {
                f64::NAN
            } else if s == f64::NEG_INFINITY || (b == 0.0 && s == 0.0) {
                f64::INFINITY
            } else {
                b - s
            }
        })
        .collect()
}

/// Gather through the argmax (R-forward): out[o] = x[arg[o]].
pub fn maxpool_gather(
    planes: usize,
    in_plane: usize,
    out_plane: usize,
    arg: &[u32],
    x: &[f64],
) -> Vec<f64> {
    (0..planes * out_plane)
        .map(|o| x[(o / out_plane) * in_plane + arg[o] as usize])
        .collect()
}

/// Scatter-add through the argmax (backward).
pub fn maxpool_scatter(
    planes: usize,
    in_plane: usize,
    out_plane: usize,
    arg: &[u32],
    gy: &[f64],
) -> Vec<f64> {
    let mut gx = vec![0.0; planes * in_plane];
    for (o, g) in gy.iter().enumerate() {
        gx[(o / out_plane) * in_plane + arg[o] as usize] += g;
    }
    gx
}

pub fn gap_forward(planes: usize, hw: usize, x: &[f64]) -> Vec<f64> {
    x.chunks(hw)
        .take(planes)
        .map(|p| p.iter().sum::<f64>() / hw as f64)
        .collect()
}

pub fn gap_backward(planes: usize, hw: usize, gy: &[f64]) -> Vec<f64> {
    let mut gx = vec![0.0; planes * hw];
    for (p, chunk) in gx.chunks_mut(hw).enumerate() {
        chunk.iter_mut().for_each(|v| *v = gy[p] / hw as f64);
    }
    gx
}

/// Calls `f(output index, input index)` for every input inside every
/// k×k window (zero padding has no index), over [n·c planes of h×w].
#[allow(clippy::too_many_arguments)]
fn each_window_tap(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    mut f: impl FnMut(usize, usize),
) {
    for p in 0..planes {
        for r in 0..oh {
            for c in 0..ow {
                let o = (p * oh + r) * ow + c;
                for kh in 0..k {
                    let ir = (r * stride + kh) as isize - pad as isize;
                    if ir < 0 || ir >= h as isize {
                        continue;
                    }
                    for kw in 0..k {
                        let ic = (c * stride + kw) as isize - pad as isize;
                        if ic < 0 || ic >= w as isize {
                            continue;
                        }
                        f(o, p * h * w + ir as usize * w + ic as usize);
                    }
                }
            }
        }
    }
}

/// Per output position of an average pool (one plane, row-major): its
/// window's element count inside the padded input, PyTorch's
/// count_include_pad divisor. k·k for every window unless ceil_mode let
/// the last ones run past the padded edge: (min(y0 + k, h + 2·pad) − y0)
/// times the same along x, y0 = oy·stride in padded coordinates.
#[allow(clippy::too_many_arguments)]
pub fn avgpool_divisors(
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
) -> Vec<f64> {
    let span = |o: usize, size: usize| (o * stride + k).min(size + 2 * pad) - o * stride;
    (0..oh * ow)
        .map(|i| (span(i / ow, h) * span(i % ow, w)) as f64)
        .collect()
}

/// Average pool over [n·c planes of h×w] with zero padding counted in the
/// divisor (count_include_pad): every window divides by its element count
/// inside the padded input (`avgpool_divisors`; k·k without ceil_mode).
#[allow(clippy::too_many_arguments)]
pub fn avgpool_forward(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    x: &[f64],
) -> Vec<f64> {
    let mut y = vec![0.0; planes * oh * ow];
    let div = avgpool_divisors(h, w, k, stride, pad, oh, ow);
    each_window_tap(planes, h, w, k, stride, pad, oh, ow, |o, i| y[o] += x[i]);
    y.iter_mut()
        .enumerate()
        .for_each(|(o, v)| *v /= div[o % (oh * ow)]);
    y
}

/// The transpose of `avgpool_forward`: each output's adjoint spread over
/// its window's inputs, divided by the window's divisor.
#[allow(clippy::too_many_arguments)]
pub fn avgpool_backward(
    planes: usize,
    h: usize,
    w: usize,
    k: usize,
    stride: usize,
    pad: usize,
    oh: usize,
    ow: usize,
    gy: &[f64],
) -> Vec<f64> {
    let mut gx = vec![0.0; planes * h * w];
    let div = avgpool_divisors(h, w, k, stride, pad, oh, ow);
    each_window_tap(planes, h, w, k, stride, pad, oh, ow, |o, i| {
        gx[i] += gy[o] / div[o % (oh * ow)]
    });
    gx
}
