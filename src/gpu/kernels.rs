//! The WGSL kernels: which file and entry point, and the bind-group layout
//! each declares. Binding 0 is always the kernel's uniform parameters;
//! bindings 1.. are storage buffers or 64 KiB uniform windows of one. No
//! kernel binds more than 8 storage buffers (GL allows 16).

use std::sync::OnceLock;

pub const CONV: &str = include_str!("../../shaders/conv.wgsl");
pub const CONV_WEIGHT: &str = include_str!("../../shaders/conv_weight.wgsl");
pub const CONV_WEIGHTS_UNIFORM: &str = include_str!("../../shaders/conv_weights_uniform.wgsl");
pub const REDUCE: &str = include_str!("../../shaders/reduce.wgsl");
pub const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");
pub const BN: &str = include_str!("../../shaders/bn.wgsl");
pub const POOL: &str = include_str!("../../shaders/pool.wgsl");
pub const LOSS: &str = include_str!("../../shaders/loss.wgsl");

/// Threads per workgroup of every kernel.
pub const WORKGROUP: usize = 256;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Kernel {
    ConvForward,
    ConvBackwardData,
    /// ConvForward and ConvBackwardData reading the weights through uniform
    /// windows (`WINDOW_FLOATS` of θ and v from a step's window offset).
    ConvForwardWindowed,
    ConvBackwardDataWindowed,
    /// The four above for 3×3 taps at stride 1 (`conv_k3s1_applies`).
    ConvForwardK3,
    ConvBackwardDataK3,
    ConvForwardK3Windowed,
    ConvBackwardDataK3Windowed,
    ConvBackwardWeight,
    /// ConvBackwardWeight for 3×3, stride 1, output rows of a multiple of
    /// 4 columns (`conv_weight_k3_applies`).
    ConvBackwardWeightK3,
    ConvWeightSum,
    ChannelSums,
    BnParamSums,
    SumAll,
    ReluMask,
    Add,
    Copy,
    BnStats,
    BnForward,
    BnRForward,
    BnBackward,
    BnRBackward,
    MaxPoolForward,
    MaxPoolGather,
    MaxPoolBackward,
    GapForward,
    GapBackward,
    XentForwardBackward,
    XentRBackward,
}

/// How a kernel binds one buffer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Binding {
    /// Read-only storage.
    Read,
    /// Read-write storage.
    Write,
    /// A uniform window of `WINDOW_FLOATS` floats at the step's window offset.
    Window,
}

/// Floats in a uniform weight window (64 KiB, the binding size every
/// backend allows).
pub const WINDOW_FLOATS: usize = 16384;

const R: Binding = Binding::Read;
const W: Binding = Binding::Write;
const U: Binding = Binding::Window;

/// conv.wgsl with its storage weight bindings swapped for uniform windows.
pub fn conv_windowed_source() -> &'static str {
    static SRC: OnceLock<String> = OnceLock::new();
    SRC.get_or_init(|| {
        let begin = CONV
            .find("// BEGIN WEIGHTS")
            .expect("conv.wgsl marks its weights");
        let end = CONV
            .find("// END WEIGHTS")
            .expect("conv.wgsl marks its weights");
        format!("{}{}{}", &CONV[..begin], CONV_WEIGHTS_UNIFORM, &CONV[end..])
    })
}

impl Kernel {
    pub const ALL: [Kernel; 29] = [
        Kernel::ConvForward,
        Kernel::ConvBackwardData,
        Kernel::ConvForwardWindowed,
        Kernel::ConvBackwardDataWindowed,
        Kernel::ConvForwardK3,
        Kernel::ConvBackwardDataK3,
        Kernel::ConvForwardK3Windowed,
        Kernel::ConvBackwardDataK3Windowed,
        Kernel::ConvBackwardWeight,
        Kernel::ConvBackwardWeightK3,
        Kernel::ConvWeightSum,
        Kernel::ChannelSums,
        Kernel::BnParamSums,
        Kernel::SumAll,
        Kernel::ReluMask,
        Kernel::Add,
        Kernel::Copy,
        Kernel::BnStats,
        Kernel::BnForward,
        Kernel::BnRForward,
        Kernel::BnBackward,
        Kernel::BnRBackward,
        Kernel::MaxPoolForward,
        Kernel::MaxPoolGather,
        Kernel::MaxPoolBackward,
        Kernel::GapForward,
        Kernel::GapBackward,
        Kernel::XentForwardBackward,
        Kernel::XentRBackward,
    ];

    /// (file name, WGSL source).
    pub fn source(self) -> (&'static str, &'static str) {
        use Kernel::*;
        match self {
            ConvForward | ConvBackwardData | ConvForwardK3 | ConvBackwardDataK3 => {
                ("conv.wgsl", CONV)
            }
            ConvForwardWindowed
            | ConvBackwardDataWindowed
            | ConvForwardK3Windowed
            | ConvBackwardDataK3Windowed => (
                "conv.wgsl+conv_weights_uniform.wgsl",
                conv_windowed_source(),
            ),
            ConvBackwardWeight | ConvBackwardWeightK3 | ConvWeightSum => {
                ("conv_weight.wgsl", CONV_WEIGHT)
            }
            ChannelSums | BnParamSums | SumAll => ("reduce.wgsl", REDUCE),
            ReluMask | Add | Copy => ("elementwise.wgsl", ELEMENTWISE),
            BnStats | BnForward | BnRForward | BnBackward | BnRBackward => ("bn.wgsl", BN),
            MaxPoolForward | MaxPoolGather | MaxPoolBackward | GapForward | GapBackward => {
                ("pool.wgsl", POOL)
            }
            XentForwardBackward | XentRBackward => ("loss.wgsl", LOSS),
        }
    }

    pub fn entry(self) -> &'static str {
        use Kernel::*;
        match self {
            ConvForward | ConvForwardWindowed => "conv_forward",
            ConvBackwardData | ConvBackwardDataWindowed => "conv_backward_data",
            ConvForwardK3 | ConvForwardK3Windowed => "conv_forward_k3s1",
            ConvBackwardDataK3 | ConvBackwardDataK3Windowed => "conv_backward_data_k3s1",
            ConvBackwardWeight => "conv_backward_weight",
            ConvBackwardWeightK3 => "conv_backward_weight_k3s1",
            ConvWeightSum => "conv_weight_sum",
            ChannelSums => "channel_sums",
            BnParamSums => "bn_param_sums",
            SumAll => "sum_all",
            ReluMask => "relu_mask",
            Add => "add",
            Copy => "copy",
            BnStats => "bn_stats",
            BnForward => "bn_forward",
            BnRForward => "bn_r_forward",
            BnBackward => "bn_backward",
            BnRBackward => "bn_r_backward",
            MaxPoolForward => "maxpool_forward",
            MaxPoolGather => "maxpool_gather",
            MaxPoolBackward => "maxpool_backward",
            GapForward => "gap_forward",
            GapBackward => "gap_backward",
            XentForwardBackward => "xent_forward_backward",
            XentRBackward => "xent_r_backward",
        }
    }

    /// Bindings 1.., in order.
    pub fn bindings(self) -> &'static [Binding] {
        use Kernel::*;
        match self {
            ConvForward | ConvBackwardData | ConvForwardK3 | ConvBackwardDataK3
            | ConvBackwardWeight | ConvBackwardWeightK3 | ConvWeightSum => &[R, R, R, R, W],
            ConvForwardWindowed
            | ConvBackwardDataWindowed
            | ConvForwardK3Windowed
            | ConvBackwardDataK3Windowed => &[R, U, R, U, W],
            ChannelSums | SumAll | ReluMask | Add | Copy => &[R, R, W],
            BnParamSums => &[R, R, W, R, R, W],
            BnStats => &[R, W],
            BnForward => &[R, R, R, W, W],
            BnRForward => &[R, R, R, R, R, W, W],
            BnBackward => &[R, R, R, R, W],
            BnRBackward => &[R, R, R, R, R, R, R, W],
            MaxPoolForward => &[R, W, W],
            MaxPoolGather | MaxPoolBackward => &[R, R, W],
            GapForward | GapBackward => &[R, W],
            XentForwardBackward => &[R, R, W, W, W],
            XentRBackward => &[R, R, W],
        }
    }
}

/// Flags shared by the kernels' uniform `flags` fields.
pub mod flags {
    /// Add into the output instead of overwriting it.
    pub const CONV_ACC: u32 = 1;
    pub const CONV_PAIR_B: u32 = 2;
    pub const CONV_BIAS: u32 = 4;
    pub const SUMS_HAS_B: u32 = 1;
    pub const SUMS_ACC: u32 = 2;
    pub const SUMS_PAIR2: u32 = 4;
    pub const EW_ACC: u32 = 1;
    pub const BN_BATCH: u32 = 1;
    pub const BN_ACC: u32 = 2;
    pub const POOL_ACC: u32 = 1;
}

/// Rows of a batch-norm node's stats buffer (see shaders/bn.wgsl).
pub mod bn_rows {
    pub const MEAN: usize = 0;
    pub const S: usize = 1;
    pub const SUM_DX: usize = 2;
    pub const SUM_XHAT_DX: usize = 3;
    pub const SUM_GY: usize = 4;
    pub const SUM_GY_XHAT: usize = 5;
    pub const SUM_RGY: usize = 6;
    pub const SUM_RGY_XHAT: usize = 7;
    pub const SUM_GY_XHD: usize = 8;
    pub const COUNT: usize = 9;
}

/// A kernel's uniform block: 16 words (u32 or f32 bits), 64 bytes.
pub type Params = [u32; 16];

/// Params from the leading words; the rest are zero.
pub fn params(words: &[u32]) -> Params {
    let mut p = [0u32; 16];
    p[..words.len()].copy_from_slice(words);
    p
}

/// Threads of the per-element batch-norm kernels: one per 4 elements of a
/// (sample, channel) plane.
pub fn bn_threads(n: usize, c: usize, hw: usize) -> usize {
    n * c * hw.div_ceil(4)
}

/// Output channels and columns one conv thread computes (shaders/conv.wgsl).
pub const CONV_CB: usize = 8;
pub const CONV_XB: usize = 4;

/// A launch whose workgroups each take one channel block (so weight loads
/// are workgroup-uniform) and WORKGROUP of `spatial` threads.
fn channel_blocked_threads(cblocks: usize, spatial: usize) -> usize {
    cblocks * spatial.div_ceil(WORKGROUP) * WORKGROUP
}

/// Threads of conv_forward: per co block, one per (n, oy, ox block).
pub fn conv_forward_threads(n: usize, cout: usize, oh: usize, ow: usize) -> usize {
    channel_blocked_threads(cout.div_ceil(CONV_CB), n * oh * ow.div_ceil(CONV_XB))
}

/// Threads of conv_backward_data: per ci block, one per (n, phase
/// (iy mod s, ix mod s), row of the phase, block of XB phase columns);
/// at stride 1 the same as conv_backward_data_k3s1's (n, iy, ix block).
pub fn conv_backward_data_threads(n: usize, cin: usize, h: usize, w: usize, s: usize) -> usize {
    let s = s.max(1);
    let spatial = n * s * s * h.div_ceil(s) * w.div_ceil(s).div_ceil(CONV_XB);
    channel_blocked_threads(cin.div_ceil(CONV_CB), spatial)
}

/// Output channels per conv_backward_weight thread.
pub const CONV_WEIGHT_CB: usize = 4;

/// Workgroups of conv_backward_weight: a thread per (chunk, block of
/// CONV_WEIGHT_CB output channels, ci, ky).
pub fn conv_weight_groups(cout: usize, cin: usize, k: usize, chunks: usize) -> usize {
    (chunks * cout.div_ceil(CONV_WEIGHT_CB) * cin * k).div_ceil(WORKGROUP)
}

/// Whether the k3s1 forward and backward-data kernels apply (3×3 taps,
/// stride 1); their grids are the general kernels'.
pub fn conv_k3s1_applies(k: usize, stride: usize) -> bool {
    k == 3 && stride == 1
}

/// The conv forward or backward-data kernel the engine runs for a layer
/// given the general one (`ConvForward`, `ConvBackwardData`): the 3×3
/// stride-1 form where it applies, reading the weights through a uniform
/// window when `windowed`.
pub fn conv_variant(base: Kernel, k: usize, stride: usize, windowed: bool) -> Kernel {
    use Kernel::*;
    match (base, conv_k3s1_applies(k, stride), windowed) {
        (ConvForward, false, false) => ConvForward,
        (ConvForward, false, true) => ConvForwardWindowed,
        (ConvForward, true, false) => ConvForwardK3,
        (ConvForward, true, true) => ConvForwardK3Windowed,
        (ConvBackwardData, false, false) => ConvBackwardData,
        (ConvBackwardData, false, true) => ConvBackwardDataWindowed,
        (ConvBackwardData, true, false) => ConvBackwardDataK3,
        (ConvBackwardData, true, true) => ConvBackwardDataK3Windowed,
        _ => panic!("conv_variant of {base:?}"),
    }
}

/// The weight-gradient kernel (stage one) the engine runs for a layer.
pub fn conv_weight_variant(k: usize, stride: usize, ow: usize) -> Kernel {
    if conv_weight_k3_applies(k, stride, ow) {
        Kernel::ConvBackwardWeightK3
    } else {
        Kernel::ConvBackwardWeight
    }
}

/// Whether ConvBackwardWeightK3 computes this layer's weight gradient.
pub fn conv_weight_k3_applies(k: usize, stride: usize, ow: usize) -> bool {
    k == 3 && stride == 1 && ow.is_multiple_of(4)
}

/// Largest weight-gradient partials buffer, in floats (64 MiB).
pub const WEIGHT_PARTIALS_MAX: usize = 16 << 20;

/// How conv_backward_weight splits the n·oh output rows: (rows per chunk,
/// chunks), aiming at ~256 products per thread and at most
/// `WEIGHT_PARTIALS_MAX` partial sums. Its threads: `chunks` × the weights;
/// conv_weight_sum's: the weights.
pub fn conv_weight_chunks(n: usize, oh: usize, ow: usize, weights: usize) -> (usize, usize) {
    let rows = (n * oh).max(1);
    let mut per = 256usize.div_ceil(ow.max(1)).clamp(1, rows);
    let mut chunks = rows.div_ceil(per);
    if chunks * weights > WEIGHT_PARTIALS_MAX {
        chunks = (WEIGHT_PARTIALS_MAX / weights.max(1)).max(1);
        per = rows.div_ceil(chunks);
        chunks = rows.div_ceil(per);
    }
    (per, chunks)
}
