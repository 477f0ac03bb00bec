//! Per-channel reductions over [n, c, hw] — reduce.wgsl's `channel_sums`
//! and `bn_param_sums`, bn.wgsl's `bn_stats` — as one workgroup per
//! channel, or split in segments.
//!
//! One workgroup per channel suits a CPU emulator, which pays for every
//! barrier and dispatch more than for the adds, but it leaves a GPU mostly
//! idle: resnet20's first stage at batch 128 has 16 channels of 131,072
//! elements, i.e. 16 workgroups for an H200's 132 SMs, each thread walking
//! 512 elements one memory latency after another. Split, a first dispatch
//! (`STAGE` 1) runs a workgroup per (channel, segment of `span` elements)
//! and writes partial results to a scratch buffer; a second (`STAGE` 2),
//! one workgroup per channel, combines the partials and finishes as the
//! whole-channel kernel does. Both are f32 sums of the same terms in a
//! different order (tests/gpu_kernels.rs holds both to the float64
//! reference); batch statistics stay two-pass within each segment, and
//! their merge keeps each segment's residual Σ(x − mₛ) (shaders/bn.wgsl),
//! so neither a large mean nor an f32 segment mean spoils the variance.

use crate::dispatch::is_gpu_type;
use crate::dispatch::kernels::{Binding, Consts, Kernel};
use crate::dispatch::params::{BnParams, KernelParams, ReduceParams};
use crate::dispatch::step::Grid;
use crate::model::Model;
use crate::{Error, Result};

/// Elements per segment where a GPU splits its reductions: 16 per thread
/// of a 256-thread workgroup, enough loads in flight to hide latency,
/// while resnet20's first stage at batch 128 gets 32 segments (512
/// workgroups).
pub const GPU_SPAN: usize = 4096;

/// Segments per channel at most: a wider split takes longer segments.
pub const MAX_SEGMENTS: usize = 1024;

/// Partial rows a split reduction writes per channel and segment (Σa,
/// Σa·b, Σc·d; bn_stats: mean mₛ, Σ(x − mₛ)² and Σ(x − mₛ)).
pub const PARTIAL_ROWS: usize = 3;

/// How an engine runs its per-channel reductions.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum ReducePath {
    /// Split at `GPU_SPAN` on GPUs (discrete, integrated, virtual); one
    /// workgroup per channel on CPU adapters (lavapipe, llvmpipe) and
    /// unknown ones, as `ConvPath::Auto` chooses its kernels.
    #[default]
    Auto,
    /// One workgroup per channel everywhere.
    Whole,
    /// Segments of this many elements everywhere (at least 1; channels of
    /// at most this many elements stay whole).
    Split(usize),
}

impl ReducePath {
    /// Elements per segment on an adapter of `device_type` (wgpu's
    /// `DeviceType`, as `AdapterReport::device_type` names it); None: one
    /// workgroup per channel.
    pub fn span_on(self, device_type: &str) -> Result<Option<usize>> {
        match self {
            ReducePath::Auto => Ok(is_gpu_type(device_type).then_some(GPU_SPAN)),
            ReducePath::Whole => Ok(None),
            ReducePath::Split(0) => Err(Error::Invalid {
                what: "reduction split",
                msg: "segments need at least one element".into(),
            }),
            ReducePath::Split(s) => Ok(Some(s)),
        }
    }
}

/// How reductions at `span` run, in words (`kernel_paths`, `devices`).
pub fn describe(span: Option<usize>) -> String {
    match span {
        Some(s) => format!("split in segments of {s}"),
        None => "a workgroup per channel".into(),
    }
}

/// (segments, elements per segment) of a channel of `count` elements split
/// at `span`, widened so that there are at most `MAX_SEGMENTS`; None where
/// one segment would hold them all.
pub fn segments(count: usize, span: usize) -> Option<(usize, usize)> {
    let span = span.max(count.div_ceil(MAX_SEGMENTS)).max(1);
    let seg = count.div_ceil(span);
    (seg > 1).then_some((seg, span))
}

/// Floats of partials (per tangent) one reduction over `c` channels of
/// `count` elements needs split at `span` (None: not split); at least 1,
/// a buffer to bind.
pub fn partials_for(c: usize, count: usize, span: Option<usize>) -> usize {
    span.and_then(|s| segments(count, s))
        .map_or(1, |(seg, _)| PARTIAL_ROWS * c * seg)
}

/// Floats of partials (per tangent) the reductions of `model` at batch `n`
/// need when split at `span`: every batch norm's and every biased conv's
/// channels (`partials_for` over every node's input and output shape).
pub fn partial_floats(model: &Model, n: usize, span: usize) -> usize {
    model
        .nodes
        .iter()
        .flat_map(|nd| [nd.in_shape, nd.out_shape])
        .map(|s| partials_for(s.c, n * s.spatial(), Some(span)))
        .max()
        .unwrap_or(1)
}

/// Params of a kernel that can be split: where it records its segments.
pub trait SplitParams: KernelParams {
    fn set_split(&mut self, seg: usize, span: usize);
}

impl SplitParams for ReduceParams {
    fn set_split(&mut self, seg: usize, span: usize) {
        self.seg = seg as u32;
        self.span = span as u32;
    }
}

impl SplitParams for BnParams {
    fn set_split(&mut self, seg: usize, span: usize) {
        self.seg = seg as u32;
        self.span = span as u32;
    }
}

/// One dispatch of a reduction.
#[derive(Clone, Debug)]
pub struct Stage<P, B> {
    pub consts: Consts,
    pub params: P,
    pub buffers: Vec<B>,
    pub grid: Grid,
}

/// The dispatches of one reduction of `kernel` (ChannelSums, BnParamSums,
/// BnStats) over `c` channels of `count` elements each, given its
/// whole-channel constants, params and bindings: that one dispatch, or
/// with `split = Some((span, partials))` and more than one segment, stage
/// one with `partials` in place of the first writable binding and stage
/// two with it in place of the first read-only one (the other bindings
/// stay bound, unread or unwritten, so no buffer changes how it is used
/// within a dispatch). `partials` must hold `c · PARTIAL_ROWS · segments`
/// floats per tangent (`partial_floats`).
pub fn stages<P: SplitParams, B: Copy>(
    kernel: Kernel,
    consts: Consts,
    params: P,
    buffers: &[B],
    c: usize,
    count: usize,
    split: Option<(usize, B)>,
) -> Vec<Stage<P, B>> {
    assert!(
        matches!(
            kernel,
            Kernel::ChannelSums | Kernel::BnParamSums | Kernel::BnStats
        ),
        "internal: {kernel:?} is not a per-channel reduction"
    );
    let whole = |consts, params, buffers: &[B]| Stage {
        consts,
        params,
        buffers: buffers.to_vec(),
        grid: Grid::Groups(c),
    };
    let Some((span, partials)) = split else {
        return vec![whole(consts, params, buffers)];
    };
    let Some((seg, span)) = segments(count, span) else {
        return vec![whole(consts, params, buffers)];
    };
    let mut p = params;
    p.set_split(seg, span);
    let kinds = kernel.bindings();
    let first = |b: Binding| {
        kinds
            .iter()
            .position(|&k| k == b)
            .expect("a reduction reads and writes storage")
    };
    let mut one = buffers.to_vec();
    one[first(Binding::Write)] = partials;
    let mut two = buffers.to_vec();
    two[first(Binding::Read)] = partials;
    vec![
        Stage {
            consts: consts.with("STAGE", 1),
            params: p,
            buffers: one,
            grid: Grid::Groups(c * seg),
        },
        whole(consts.with("STAGE", 2), p, &two),
    ]
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segments_cover_the_channel_and_stay_bounded() {
        assert_eq!(segments(4096, 4096), None);
        assert_eq!(segments(4097, 4096), Some((2, 4096)));
        assert_eq!(segments(131_072, 4096), Some((32, 4096)));
        // Wider than MAX_SEGMENTS: longer segments instead.
        let (seg, span) = segments(100_000_000, 4096).unwrap();
        assert!(seg <= MAX_SEGMENTS && seg * span >= 100_000_000);
        assert!((seg - 1) * span < 100_000_000, "no empty segment");
        for count in 1..300 {
            for span in 1..40 {
                if let Some((seg, sp)) = segments(count, span) {
                    assert!(seg > 1 && (seg - 1) * sp < count && seg * sp >= count);
                }
            }
        }
    }

    #[test]
    fn auto_splits_on_gpus_only() {
        for t in ["DiscreteGpu", "IntegratedGpu", "VirtualGpu"] {
            assert_eq!(ReducePath::Auto.span_on(t).unwrap(), Some(GPU_SPAN));
        }
        for t in ["Cpu", "Other"] {
            assert_eq!(ReducePath::Auto.span_on(t).unwrap(), None);
            assert_eq!(ReducePath::Split(7).span_on(t).unwrap(), Some(7));
        }
        assert_eq!(ReducePath::Whole.span_on("DiscreteGpu").unwrap(), None);
        assert!(ReducePath::Split(0).span_on("Cpu").is_err());
    }

    #[test]
    fn a_split_rebinds_the_first_output_then_the_first_input() {
        let p = ReduceParams::default();
        let s = stages(
            Kernel::BnParamSums,
            Consts::default(),
            p,
            &[1, 2, 3, 4, 5, 6],
            8,
            10_000,
            Some((4096, 99)),
        );
        assert_eq!(s.len(), 2);
        assert_eq!(s[0].buffers, vec![1, 2, 99, 4, 5, 6]);
        assert_eq!(s[1].buffers, vec![99, 2, 3, 4, 5, 6]);
        assert_eq!((s[0].params.seg, s[0].params.span), (3, 4096));
        assert!(matches!(s[0].grid, Grid::Groups(24)));
        assert!(matches!(s[1].grid, Grid::Groups(8)));
        assert_eq!(s[0].consts.get("STAGE"), Some(1));
        assert_eq!(s[1].consts.get("STAGE"), Some(2));
        // Small enough, or no split asked: the one dispatch.
        let one = stages(
            Kernel::BnStats,
            Consts::default(),
            BnParams::default(),
            &[1, 2],
            8,
            4096,
            Some((4096, 99)),
        );
        assert_eq!(one.len(), 1);
        assert_eq!(one[0].consts.get("STAGE"), None);
    }
}
