//! Adaptive average pooling in float64: PyTorch's AdaptiveAvgPool2d for
//! any input and output size (upsampling included).

/// The input range [start, end) that output `i` of `out_len` averages
/// over `in_len` inputs: [⌊i·in/out⌋, ⌈(i+1)·in/out⌉), never empty.
pub fn window(i: usize, in_len: usize, out_len: usize) -> (usize, usize) {
    (i * in_len / out_len, ((i + 1) * in_len).div_ceil(out_len))
}

/// y [planes, oh, ow] from x [planes, h, w].
pub fn forward(planes: usize, h: usize, w: usize, oh: usize, ow: usize, x: &[f64]) -> Vec<f64> {
    let mut y = Vec::with_capacity(planes * oh * ow);
    for p in 0..planes {
        let plane = &x[p * h * w..(p + 1) * h * w];
        for oy in 0..oh {
            let (y0, y1) = window(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = window(ox, w, ow);
                let mut s = 0.0;
                for iy in y0..y1 {
                    s += plane[iy * w + x0..iy * w + x1].iter().sum::<f64>();
                }
                y.push(s / ((y1 - y0) * (x1 - x0)) as f64);
            }
        }
    }
    y
}

/// The transpose of [`forward`]: each output's adjoint spread evenly over
/// its window, windows that overlap adding.
pub fn backward(planes: usize, h: usize, w: usize, oh: usize, ow: usize, gy: &[f64]) -> Vec<f64> {
    let mut gx = vec![0.0; planes * h * w];
    for p in 0..planes {
        for oy in 0..oh {
            let (y0, y1) = window(oy, h, oh);
            for ox in 0..ow {
                let (x0, x1) = window(ox, w, ow);
                let g = gy[(p * oh + oy) * ow + ox] / ((y1 - y0) * (x1 - x0)) as f64;
                for iy in y0..y1 {
                    for ix in x0..x1 {
                        gx[(p * h + iy) * w + ix] += g;
                    }
                }
            }
        }
    }
    gx
}
