//! Float64 reference kernels, one file per op family. They are the ground
//! truth every GPU kernel is tested against. Convolutions and linear
//! layers run as GEMMs (`gemm`), checked against the plain loops of
//! `conv` and `linear`. Layouts are PyTorch's (NCHW, weights [cout, cin, k, k]).

pub mod activation;
pub mod adaptive_pool;
pub mod bn;
pub mod channels;
pub mod conv;
pub mod gemm;
pub mod linear;
pub mod loss;
pub mod pool;

/// Output positions `o` in `0..out_len` whose input `o * stride + off`
/// lies inside `0..in_len`, as a half-open range.
pub fn valid_range(out_len: usize, in_len: usize, stride: usize, off: isize) -> (usize, usize) {
    let s = stride as isize;
    let lo = if off >= 0 { 0 } else { ((-off) + s - 1) / s };
    let hi = if in_len as isize - 1 - off < 0 {
        0
    } else {
        (((in_len as isize - 1 - off) / s) + 1).min(out_len as isize)
    };
    (lo as usize, (hi.max(lo)) as usize)
}
