//! The WGSL kernels: which file and entry point, and the bind-group layout
//! each declares. Binding 0 is always the kernel's uniform parameters;
//! bindings 1.. are storage buffers or 64 KiB uniform windows of one. No
//! kernel binds more than 8 storage buffers (GL allows 16).

use std::sync::OnceLock;

pub const CONV: &str = include_str!("../../shaders/conv.wgsl");
pub const CONV_WEIGHT: &str = include_str!("../../shaders/conv_weight.wgsl");
/// Convolution as tiled implicit GEMM (GPUs; `ConvPath::Tiled`).
pub const CONV_TILED: &str = include_str!("../../shaders/conv_tiled.wgsl");
pub const CONV_WEIGHTS_UNIFORM: &str = include_str!("../../shaders/conv_weights_uniform.wgsl");
/// Direct convolution for grouped (depthwise included) and dilated layers.
pub const CONV_DIRECT: &str = include_str!("../../shaders/conv_direct.wgsl");
pub const REDUCE: &str = include_str!("../../shaders/reduce.wgsl");
pub const ELEMENTWISE: &str = include_str!("../../shaders/elementwise.wgsl");
pub const BN: &str = include_str!("../../shaders/bn.wgsl");
pub const POOL: &str = include_str!("../../shaders/pool.wgsl");
/// Concat, narrow, channel shuffle and the broadcast product.
pub const CHANNELS: &str = include_str!("../../shaders/channels.wgsl");
pub const ADAPTIVE_POOL: &str = include_str!("../../shaders/adaptive_pool.wgsl");
/// LayerNorm over the last dimension (sequences).
pub const LAYERNORM: &str = include_str!("../../shaders/layernorm.wgsl");
/// nn.Embedding's gather and its deterministic scatter-add.
pub const EMBEDDING: &str = include_str!("../../shaders/embedding.wgsl");
/// Multi-head softmax attention's four passes.
pub const ATTENTION: &str = include_str!("../../shaders/attention.wgsl");
pub const LOSS: &str = include_str!("../../shaders/loss.wgsl");
pub const ACTIVATION: &str = include_str!("../../shaders/activation.wgsl");
/// Training's SGD and running-statistics updates.
pub const OPTIM: &str = include_str!("../../shaders/optim.wgsl");
/// A Lanczos basis on the device: Qᵀw and Q·c, compensated.
pub const BASIS: &str = include_str!("../../shaders/basis.wgsl");
/// Block products' tangent slices (`KB`, `KMAX`, `kslice`): prepended to
/// every module.
pub const TANGENTS: &str = include_str!("../../shaders/tangents.wgsl");

/// Threads per workgroup of every kernel.
pub const WORKGROUP: usize = 256;

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

/// Block `which` ("A" or "B") of a source's weights, between its markers.
fn weight_block(src: &str, which: &str) -> (usize, usize) {
    let begin = src
        .find(&format!("// BEGIN WEIGHTS {which}"))
        .expect("the conv sources mark their weight blocks");
    let end_marker = format!("// END WEIGHTS {which}");
    let end = src
        .find(&end_marker)
        .expect("the conv sources mark their weight blocks")
        + end_marker.len();
    (begin, end)
}

/// conv.wgsl with weight block A (and with `both`, B) swapped for
/// uniform windows (conv_weights_uniform.wgsl).
fn conv_with_windows(both: bool) -> String {
    let mut src = CONV.to_string();
    for which in if both { &["A", "B"][..] } else { &["A"][..] } {
        let (b, e) = weight_block(&src, which);
        let (ub, ue) = weight_block(CONV_WEIGHTS_UNIFORM, which);
        src.replace_range(b..e, &CONV_WEIGHTS_UNIFORM[ub..ue]);
    }
    src
}

/// conv.wgsl with its storage weight bindings swapped for uniform windows.
pub fn conv_windowed_source() -> &'static str {
    static SRC: OnceLock<String> = OnceLock::new();
    SRC.get_or_init(|| conv_with_windows(true))
}

/// conv.wgsl with the first pair's weights (θ) in a uniform window and the
/// second pair's (each tangent's v) in storage: block products.
pub fn conv_half_windowed_source() -> &'static str {
    static SRC: OnceLock<String> = OnceLock::new();
    SRC.get_or_init(|| conv_with_windows(false))
}

/// Pipeline-overridable constants a step specialises its kernel with
/// (WGSL `override`), e.g. `ACC` (add into the output) or `ACT` (which
/// activation): no dispatch computes or branches on a term that is absent.
/// At most `MAX_CONSTS` per kernel; part of the pipeline cache key.
/// The most override constants one kernel takes (conv_direct.wgsl's
/// forward: PAIR_B, BIAS, ACC, RED0, RED1, DIL, WT, KB, KMAX).
pub const MAX_CONSTS: usize = 10;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash)]
pub struct Consts {
    items: [(&'static str, u32); MAX_CONSTS],
    len: u8,
}

impl Consts {
    pub fn new(items: &[(&'static str, u32)]) -> Consts {
        assert!(
            items.len() <= MAX_CONSTS,
            "at most {MAX_CONSTS} override constants"
        );
        let mut c = Consts::default();
        c.items[..items.len()].copy_from_slice(items);
        c.len = items.len() as u8;
        c
    }
    /// (name, value) pairs, as wgpu takes them.
    pub fn pairs(&self) -> Vec<(&'static str, f64)> {
        self.items[..self.len as usize]
            .iter()
            .map(|&(k, v)| (k, v as f64))
            .collect()
    }
    /// The value of constant `name`, if set.
    pub fn get(&self, name: &str) -> Option<u32> {
        self.items[..self.len as usize]
            .iter()
            .find(|p| p.0 == name)
            .map(|p| p.1)
    }
    pub fn names(&self) -> impl Iterator<Item = &'static str> + '_ {
        self.items[..self.len as usize].iter().map(|p| p.0)
    }
}

/// A WGSL module the kernels come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Module {
    Conv,
    /// conv.wgsl with its weight bindings swapped for uniform windows.
    ConvWindowed,
    /// conv.wgsl with the first pair's weights in a uniform window.
    ConvHalfWindowed,
    ConvWeight,
    /// conv_tiled.wgsl: the tiled implicit-GEMM convolutions.
    ConvTiled,
    /// conv_direct.wgsl: grouped and dilated convolutions.
    ConvDirect,
    Reduce,
    Elementwise,
    Bn,
    Pool,
    Loss,
    Activation,
    Optim,
    Basis,
    Channels,
    AdaptivePool,
    LayerNorm,
    Embedding,
    Attention,
}

impl Module {
    const ALL: [Module; 19] = [
        Module::Conv,
        Module::ConvWindowed,
        Module::ConvHalfWindowed,
        Module::ConvWeight,
        Module::ConvTiled,
        Module::ConvDirect,
        Module::Reduce,
        Module::Elementwise,
        Module::Bn,
        Module::Pool,
        Module::Loss,
        Module::Activation,
        Module::Optim,
        Module::Basis,
        Module::Channels,
        Module::AdaptivePool,
        Module::LayerNorm,
        Module::Embedding,
        Module::Attention,
    ];

    /// (file name, the file's own WGSL).
    fn file(self) -> (&'static str, &'static str) {
        match self {
            Module::Conv => ("conv.wgsl", CONV),
            Module::ConvWindowed => (
                "conv.wgsl+conv_weights_uniform.wgsl",
                conv_windowed_source(),
            ),
            Module::ConvHalfWindowed => (
                "conv.wgsl+conv_weights_uniform.wgsl (A)",
                conv_half_windowed_source(),
            ),
            Module::ConvWeight => ("conv_weight.wgsl", CONV_WEIGHT),
            Module::ConvTiled => ("conv_tiled.wgsl", CONV_TILED),
            Module::ConvDirect => ("conv_direct.wgsl", CONV_DIRECT),
            Module::Reduce => ("reduce.wgsl", REDUCE),
            Module::Elementwise => ("elementwise.wgsl", ELEMENTWISE),
            Module::Bn => ("bn.wgsl", BN),
            Module::Pool => ("pool.wgsl", POOL),
            Module::Loss => ("loss.wgsl", LOSS),
            Module::Activation => ("activation.wgsl", ACTIVATION),
            Module::Optim => ("optim.wgsl", OPTIM),
            Module::Basis => ("basis.wgsl", BASIS),
            Module::Channels => ("channels.wgsl", CHANNELS),
            Module::AdaptivePool => ("adaptive_pool.wgsl", ADAPTIVE_POOL),
            Module::LayerNorm => ("layernorm.wgsl", LAYERNORM),
            Module::Embedding => ("embedding.wgsl", EMBEDDING),
            Module::Attention => ("attention.wgsl", ATTENTION),
        }
    }

    /// (file name, WGSL source as compiled: tangents.wgsl + the file).
    pub fn source(self) -> (&'static str, &'static str) {
        static SRC: OnceLock<Vec<String>> = OnceLock::new();
        let all = SRC.get_or_init(|| {
            Module::ALL
                .iter()
                .map(|m| format!("{TANGENTS}{}", m.file().1))
                .collect()
        });
        let i = Module::ALL.iter().position(|&m| m == self).unwrap();
        (self.file().0, &all[i])
    }
}

/// Everything the host must agree on with one WGSL entry point.
#[derive(Debug)]
pub struct KernelSpec {
    pub module: Module,
    pub entry: &'static str,
    /// Bindings 1.., in order (binding 0 is the params block).
    pub bindings: &'static [Binding],
    /// The WGSL name of the params struct at binding 0.
    pub params: &'static str,
    /// The override constants a step may set.
    pub overrides: &'static [&'static str],
}

macro_rules! kernels {
    ($($(#[$doc:meta])* $name:ident => $module:ident :: $entry:literal, [$($b:ident),*], $params:ident, [$($o:literal),*];)*) => {
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
        pub enum Kernel {
            $($(#[$doc])* $name),*
        }
        impl Kernel {
            pub const ALL: &'static [Kernel] = &[$(Kernel::$name),*];
            pub fn spec(self) -> &'static KernelSpec {
                match self {
                    $(Kernel::$name => &KernelSpec {
                        module: Module::$module,
                        entry: $entry,
                        bindings: &[$($b),*],
                        params: <$params as KernelParams>::WGSL_NAME,
                        overrides: &[$($o),*],
                    }),*
                }
            }
        }
    };
}

kernels! {
    ConvForward => Conv::"conv_forward", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvBackwardData => Conv::"conv_backward_data", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    /// ConvForward and ConvBackwardData reading the weights through uniform
    /// windows (`WINDOW_FLOATS` of θ and v from a step's window offset).
    ConvForwardWindowed => ConvWindowed::"conv_forward", [R, U, R, U, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1"];
    ConvBackwardDataWindowed => ConvWindowed::"conv_backward_data", [R, U, R, U, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1"];
    /// The four above for 3×3 taps at stride 1 (`conv_k3s1_applies`).
    ConvForwardK3 => Conv::"conv_forward_k3s1", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvBackwardDataK3 => Conv::"conv_backward_data_k3s1", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvForwardK3Windowed => ConvWindowed::"conv_forward_k3s1", [R, U, R, U, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1"];
    ConvBackwardDataK3Windowed => ConvWindowed::"conv_backward_data_k3s1", [R, U, R, U, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1"];
    ConvForwardHalfWindowed => ConvHalfWindowed::"conv_forward", [R, U, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvBackwardDataHalfWindowed => ConvHalfWindowed::"conv_backward_data", [R, U, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvForwardK3HalfWindowed => ConvHalfWindowed::"conv_forward_k3s1", [R, U, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvBackwardDataK3HalfWindowed => ConvHalfWindowed::"conv_backward_data_k3s1", [R, U, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "KB", "KMAX"];
    ConvBackwardWeight => ConvWeight::"conv_backward_weight", [R, R, R, R, W], ConvParams, ["PAIR_B", "KB", "KMAX"];
    /// ConvBackwardWeight for 3×3, stride 1, output rows of a multiple of
    /// 4 columns (`conv_weight_k3_applies`).
    ConvBackwardWeightK3 => ConvWeight::"conv_backward_weight_k3s1", [R, R, R, R, W], ConvParams, ["PAIR_B", "KB", "KMAX"];
    ConvWeightSum => ConvWeight::"conv_weight_sum", [R, W], ConvParams, ["KB", "KMAX"];
    /// Tiled implicit GEMM (conv_tiled.wgsl): ConvForward, ConvBackwardData
    /// and ConvBackwardWeight's stage one for GPUs, at a `ConvTile`
    /// (`ConvTile::groups`).
    ConvTiledForward => ConvTiled::"conv_tiled_forward", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "TM", "TN", "TK", "KB", "KMAX"];
    ConvTiledBackwardData => ConvTiled::"conv_tiled_backward_data", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "TM", "TN", "TK", "KB", "KMAX"];
    ConvTiledBackwardWeight => ConvTiled::"conv_tiled_backward_weight", [R, R, R, R, W], ConvParams, ["PAIR_B", "TM", "TN", "TK", "KB", "KMAX"];
    /// Grouped and dilated layers (conv_direct.wgsl), on either conv path,
    /// and Conv1D (`WT`: the weight read transposed, [cin, cout]):
    /// forward, backward data and the weight gradient's stage one, a
    /// thread per output, input element, and (chunk, weight); `DIL` the
    /// dilation.
    ConvDirectForward => ConvDirect::"conv_direct_forward", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "DIL", "WT", "KB", "KMAX"];
    ConvDirectBackwardData => ConvDirect::"conv_direct_backward_data", [R, R, R, R, W], ConvParams, ["PAIR_B", "BIAS", "ACC", "RED0", "RED1", "DIL", "WT", "KB", "KMAX"];
    ConvDirectBackwardWeight => ConvDirect::"conv_direct_backward_weight", [R, R, R, R, W], ConvParams, ["PAIR_B", "DIL", "WT", "KB", "KMAX"];
    ChannelSums => Reduce::"channel_sums", [R, R, W], ReduceParams, ["HAS_B", "ACC", "STAGE", "KB", "KMAX"];
    BnParamSums => Reduce::"bn_param_sums", [R, R, W, R, R, W], ReduceParams, ["PAIR2", "STAGE", "KB", "KMAX"];
    SumAll => Reduce::"sum_all", [R, W], ReduceParams, [];
    Add => Elementwise::"add", [R, R, W], EwParams, ["ACC", "KB", "KMAX"];
    Copy => Elementwise::"copy", [R, W], EwParams, ["ACC", "KB", "KMAX"];
    BnStats => Bn::"bn_stats", [R, W], BnParams, ["STAGE"];
    BnForward => Bn::"bn_forward", [R, R, R, W, W], BnParams, ["GIVEN"];
    BnRForward => Bn::"bn_r_forward", [R, R, R, R, R, W, W], BnParams, ["BATCH", "KB", "KMAX"];
    BnBackward => Bn::"bn_backward", [R, R, R, R, W], BnParams, ["BATCH", "ACC"];
    BnRBackward => Bn::"bn_r_backward", [R, R, R, R, R, R, R, W], BnParams, ["BATCH", "ACC", "KB", "KMAX"];
    MaxPoolForward => Pool::"maxpool_forward", [R, W, W], PoolParams, [];
    MaxPoolGather => Pool::"maxpool_gather", [R, R, W], PoolParams, ["KB", "KMAX"];
    MaxPoolBackward => Pool::"maxpool_backward", [R, R, W], PoolParams, ["ACC", "KB", "KMAX"];
    AvgPoolForward => Pool::"avgpool_forward", [R, W], PoolParams, ["KB", "KMAX"];
    AvgPoolBackward => Pool::"avgpool_backward", [R, W], PoolParams, ["ACC", "KB", "KMAX"];
    GapForward => Pool::"gap_forward", [R, W], PoolParams, ["KB", "KMAX"];
    GapBackward => Pool::"gap_backward", [R, W], PoolParams, ["ACC", "KB", "KMAX"];
    AdaptiveAvgPoolForward => AdaptivePool::"adaptive_avgpool_forward", [R, W], PoolParams, ["KB", "KMAX"];
    AdaptiveAvgPoolBackward => AdaptivePool::"adaptive_avgpool_backward", [R, W], PoolParams, ["ACC", "KB", "KMAX"];
    /// Strided block copies (concat, narrow): `FILL` zeroes the rest of
    /// each destination block.
    BlockCopy => Channels::"block_copy", [R, W], ChannelParams, ["ACC", "FILL", "KB", "KMAX"];
    ChannelShuffle => Channels::"channel_shuffle", [R, W], ChannelParams, ["ACC", "KB", "KMAX"];
    /// a·b (+ c·d), b and d per plane of `hw` elements (`B_PARAM`: a
    /// parameter per channel at `src_off`, shared by the samples).
    Mul => Channels::"mul", [R, R, R, R, W], ChannelParams, ["PAIR_B", "ACC", "B_PARAM", "KB", "KMAX"];
    /// Per plane, Σ a·b (+ c·d): a workgroup per plane (`Grid::Groups`).
    PlaneDot => Channels::"plane_dot", [R, R, R, R, W], ChannelParams, ["PAIR_B", "ACC", "KB", "KMAX"];
    /// Per channel of [blocks, c, hw], Σ a·b (+ c·d) into out[dst_off +
    /// ch]: a workgroup per channel (`Grid::Groups(c)`).
    ChannelDot => Channels::"channel_dot", [R, R, R, R, W], ChannelParams, ["PAIR_B", "ACC", "KB", "KMAX"];
    /// LayerNorm over rows of `d` (shaders/layernorm.wgsl): a workgroup
    /// per row (`Grid::Groups(rows)`); the parameter sums a thread per
    /// feature.
    LnForward => LayerNorm::"ln_forward", [R, R, W, W], LnParams, [];
    LnRForward => LayerNorm::"ln_r_forward", [R, R, R, R, W, W], LnParams, ["KB", "KMAX"];
    LnBackward => LayerNorm::"ln_backward", [R, R, R, W], LnParams, ["ACC"];
    LnRBackward => LayerNorm::"ln_r_backward", [R, R, R, R, R, R, W], LnParams, ["ACC", "KB", "KMAX"];
    LnParamSums => LayerNorm::"ln_param_sums", [R, R, R, R, W], LnParams, ["PAIR2", "KB", "KMAX"];
    /// nn.Embedding (shaders/embedding.wgsl): the gather a thread per
    /// output, the scatter-add a thread per weight element.
    EmbGather => Embedding::"emb_gather", [R, R, W], EmbParams, ["KB", "KMAX"];
    EmbScatter => Embedding::"emb_scatter", [R, R, W], EmbParams, ["KB", "KMAX"];
    /// Multi-head attention (shaders/attention.wgsl): a workgroup per
    /// (sample, head, query row), `Grid::Groups(n·heads·t)`; the `Cols`
    /// kernels one per key column, `WHICH` 0 the k adjoint, 1 the v one;
    /// gS and R(gS) pass from the rows kernel to the columns one through
    /// the shared scratch (`Plan::partials`).
    AttnForward => Attention::"attn_forward", [R, W, W], AttnParams, [];
    AttnRForward => Attention::"attn_r_forward", [R, R, R, W, W], AttnParams, ["KB", "KMAX"];
    AttnBackwardRows => Attention::"attn_backward_rows", [R, R, R, W, W], AttnParams, ["ACC"];
    AttnBackwardCols => Attention::"attn_backward_cols", [R, R, R, R, W], AttnParams, ["WHICH", "ACC"];
    AttnRBackwardRows => Attention::"attn_r_backward_rows", [R, R, R, R, R, R, W, W], AttnParams, ["ACC", "KB", "KMAX"];
    AttnRBackwardCols => Attention::"attn_r_backward_cols", [R, R, R, R, R, R, R, W], AttnParams, ["WHICH", "ACC", "KB", "KMAX"];
    XentForwardBackward => Loss::"xent_forward_backward", [R, R, W, W, W], LossParams, [];
    XentRBackward => Loss::"xent_r_backward", [R, R, W], LossParams, ["KB", "KMAX"];
    /// The two above with a workgroup per row (CPU emulators: a thread's
    /// loops over a large vocabulary would pass llvmpipe's loop limit).
    XentForwardBackwardRows => Loss::"xent_forward_backward_rows", [R, R, W, W, W], LossParams, [];
    XentRBackwardRows => Loss::"xent_r_backward_rows", [R, R, W], LossParams, ["KB", "KMAX"];
    /// y = f(x) for the activation `ACT` (see `layers::activation`).
    ActForward => Activation::"act_forward", [R, W], ActParams, ["ACT"];
    ActRForward => Activation::"act_r_forward", [R, R, W], ActParams, ["ACT", "KB", "KMAX"];
    ActBackward => Activation::"act_backward", [R, R, W], ActParams, ["ACT", "ACC", "KB", "KMAX"];
    ActRBackward => Activation::"act_r_backward", [R, R, R, R, W], ActParams, ["ACT", "ACC", "KB", "KMAX"];
    /// The three-piece activations (ReLU6, Hardswish, Hardsigmoid) of a
    /// replaying plan: each element's piece from the recorded x₀ (the
    /// first binding), the value of that piece at x.
    ActReplayForward => Activation::"act_replay_forward", [R, R, W], ActParams, ["ACT"];
    ActReplayRForward => Activation::"act_replay_r_forward", [R, R, R, W], ActParams, ["ACT", "KB", "KMAX"];
    ActReplayBackward => Activation::"act_replay_backward", [R, R, R, W], ActParams, ["ACT", "ACC", "KB", "KMAX"];
    ActReplayRBackward => Activation::"act_replay_r_backward", [R, R, R, R, R, W], ActParams, ["ACT", "ACC", "KB", "KMAX"];
    /// Training: θ and the momentum buffer from the gradient (torch's SGD).
    Sgd => Optim::"sgd", [R, W, W], SgdParams, [];
    /// Training: a batch norm's running mean and variance from its batch
    /// statistics rows.
    BnRunning => Optim::"bn_running", [R, W], BnRunningParams, [];
    /// Training's divergence check: the first non-finite element of a
    /// buffer into a flag slot (`out_off`), as 0xffffffff − index.
    FirstNonFinite => Optim::"first_nonfinite", [R, W], EwParams, [];
    /// A device-resident Lanczos basis: (sum, error) pairs of Qᵀw per
    /// segment of rows (shaders/basis.wgsl).
    BasisDots => Basis::"basis_dots", [R, R, W], BasisParams, [];
    /// A device-resident Lanczos basis: Q·c, compensated over the vectors.
    BasisCombine => Basis::"basis_combine", [R, R, W], BasisParams, [];
}

impl Kernel {
    /// (file name, WGSL source).
    pub fn source(self) -> (&'static str, &'static str) {
        self.spec().module.source()
    }
    pub fn entry(self) -> &'static str {
        self.spec().entry
    }
    /// Bindings 1.., in order.
    pub fn bindings(self) -> &'static [Binding] {
        self.spec().bindings
    }
}

/// Override-constant assignments the engine, `bench` and the tests share.
impl Consts {
    /// Conv forward / backward data: second pair, bias, accumulate.
    pub fn conv(pair_b: bool, bias: bool, acc: bool) -> Consts {
        Consts::new(&[
            ("PAIR_B", pair_b as u32),
            ("BIAS", bias as u32),
            ("ACC", acc as u32),
        ])
    }
    /// These constants and one more.
    pub fn with(mut self, name: &'static str, value: u32) -> Consts {
        assert!(
            (self.len as usize) < MAX_CONSTS,
            "at most {MAX_CONSTS} override constants"
        );
        self.items[self.len as usize] = (name, value);
        self.len += 1;
        self
    }
    /// These constants with `name` set to `value` (replaced if present).
    pub fn set(mut self, name: &'static str, value: u32) -> Consts {
        match self.items[..self.len as usize]
            .iter_mut()
            .find(|p| p.0 == name)
        {
            Some(p) => {
                p.1 = value;
                self
            }
            None => self.with(name, value),
        }
    }
    /// Just `ACC` (add into the output).
    pub fn acc(acc: bool) -> Consts {
        Consts::new(&[("ACC", acc as u32)])
    }
    /// Batch-norm passes: batch statistics, accumulate.
    pub fn bn(batch: bool, acc: bool) -> Consts {
        Consts::new(&[("BATCH", batch as u32), ("ACC", acc as u32)])
    }
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
    /// Batch mode: the biased batch variance (bn_stats), for training's
    /// running-variance update.
    pub const VAR: usize = 9;
    pub const COUNT: usize = 10;
}

pub use crate::dispatch::params::{
    ActParams, AttnParams, BasisParams, BnParams, BnRunningParams, ChannelParams, ConvParams,
    EmbParams, EwParams, KernelParams, LnParams, LossParams, Params, PoolParams, ReduceParams,
    SgdParams,
};

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

/// Whether a conv layer runs on conv_direct.wgsl's kernels (grouped or
/// dilated) rather than the dense ones of either conv path.
pub fn conv_direct_applies(groups: usize, dilation: usize) -> bool {
    groups != 1 || dilation != 1
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
    let w = if windowed {
        WeightsVia::Windows
    } else {
        WeightsVia::Storage
    };
    conv_variant_via(base, k, stride, w)
}

/// How a conv forward / backward-data kernel reads its two weight pairs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WeightsVia {
    Storage,
    /// Both pairs through uniform windows.
    Windows,
    /// The first pair (θ) through a window, the second (v) from storage.
    HalfWindows,
}

pub fn conv_variant_via(base: Kernel, k: usize, stride: usize, via: WeightsVia) -> Kernel {
    use Kernel::*;
    use WeightsVia::*;
    match (base, conv_k3s1_applies(k, stride), via) {
        (ConvForward, false, Storage) => ConvForward,
        (ConvForward, false, Windows) => ConvForwardWindowed,
        (ConvForward, false, HalfWindows) => ConvForwardHalfWindowed,
        (ConvForward, true, Storage) => ConvForwardK3,
        (ConvForward, true, Windows) => ConvForwardK3Windowed,
        (ConvForward, true, HalfWindows) => ConvForwardK3HalfWindowed,
        (ConvBackwardData, false, Storage) => ConvBackwardData,
        (ConvBackwardData, false, Windows) => ConvBackwardDataWindowed,
        (ConvBackwardData, false, HalfWindows) => ConvBackwardDataHalfWindowed,
        (ConvBackwardData, true, Storage) => ConvBackwardDataK3,
        (ConvBackwardData, true, Windows) => ConvBackwardDataK3Windowed,
        (ConvBackwardData, true, HalfWindows) => ConvBackwardDataK3HalfWindowed,
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

/// Loop iterations one shader invocation may run on llvmpipe (the CPU
/// driver behind lavapipe and Mesa's GL): gallivm's loop limiter
/// (`LP_MAX_TGSI_LOOP_ITERATIONS`) ends every loop of an invocation once
/// 65535 iterations have run in all, silently, so a longer loop leaves a
/// partial sum and a wrong answer.
pub const EMULATOR_LOOP_LIMIT: usize = 65_535;

/// Iterations counted per channel (or feature) a conv/linear kernel's
/// thread loops over, per tap: measured on lavapipe and llvmpipe (Mesa
/// 22.3), a 1×1 convolution (a linear layer) went wrong above about
/// 65535/6 = 10922 input features (10800 right, 11000 wrong) and a 3×3 one
/// at stride 2 above 2700..4000 channels (≤ 24 per channel, against the
/// 54 taken here): 6 per channel and tap bounds both from above. The
/// guard (`gpu::executor::check_emulator_loops`) and the split
/// (src/layers/conv_split.rs) use the same rate.
pub const ITERATIONS_PER_TAP: usize = 6;

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

/// A tile of conv_tiled.wgsl's implicit GEMMs (its override constants):
/// a workgroup computes a `tm` × `tn` tile of C, staging `tk`-deep slabs
/// of A and B in workgroup memory; each of its 256 threads owns a 4 × 4
/// register micro-tile.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConvTile {
    pub tm: u32,
    pub tn: u32,
    pub tk: u32,
}

/// Floats in each of conv_tiled.wgsl's workgroup-memory slabs (`CAP`).
pub const CONV_TILE_CAP: u32 = 1024;

impl ConvTile {
    /// The shader's defaults, and the widest tile the host chooses.
    pub const DEFAULT: ConvTile = ConvTile {
        tm: 64,
        tn: 64,
        tk: 16,
    };

    /// The tiles the shader computes right, or why not: `tm` and `tn`
    /// multiples of the 4 × 4 micro-tile with at most 256 micro-tiles
    /// (the workgroup's threads), each slab (`tk`·`tm`, `tk`·`tn`) within
    /// `CONV_TILE_CAP`, `tk` ≥ 1.
    pub fn check(self) -> std::result::Result<(), String> {
        let ConvTile { tm, tn, tk } = self;
        if tm == 0 || tn == 0 || tm % 4 != 0 || tn % 4 != 0 {
            return Err(format!(
                "{self}: the tile's sides must be positive multiples of 4"
            ));
        }
        if (tm / 4) * (tn / 4) > 256 {
            return Err(format!(
                "{self}: more than 256 4×4 micro-tiles (tm·tn > 4096)"
            ));
        }
        if tk == 0 || tk * tm > CONV_TILE_CAP || tk * tn > CONV_TILE_CAP {
            return Err(format!(
                "{self}: the slab depth must be at least 1 with tk·tm and tk·tn at most {CONV_TILE_CAP}"
            ));
        }
        Ok(())
    }

    /// The constants that specialise a tiled kernel to this tile.
    pub fn consts(self, c: Consts) -> Consts {
        c.with("TM", self.tm)
            .with("TN", self.tn)
            .with("TK", self.tk)
    }

    /// The tile for a GEMM with `m` rows, from this (the adapter's) one:
    /// rows narrowed to the smallest of 16, 32, 64 that holds `m` (a
    /// 16-row layer in 64-row tiles computes four rows for every one it
    /// keeps), columns widened to keep the 256 threads busy, the slab
    /// depth to what workgroup memory holds.
    pub fn for_rows(self, m: usize) -> ConvTile {
        let mut tm = self.tm;
        while tm > 16 && m as u32 <= tm / 2 {
            tm /= 2;
        }
        if tm == self.tm {
            return self;
        }
        let tn = (self.tm * self.tn / tm).min(CONV_TILE_CAP);
        let tk = self.tk.min(CONV_TILE_CAP / tn).max(1);
        ConvTile { tm, tn, tk }
    }

    /// Workgroups of a tiled conv kernel: one per (chunk, tile of the
    /// m × n result). Forward: m = cout, n = batch·oh·ow; backward data:
    /// m = cin, n = batch·h·w; weight gradient: m = cout, n = cin·k·k,
    /// `chunks` of conv_weight_chunks.
    pub fn groups(self, m: usize, n: usize, chunks: usize) -> usize {
        m.div_ceil(self.tm as usize) * n.div_ceil(self.tn as usize) * chunks
    }
}

impl std::fmt::Display for ConvTile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}x{}x{}", self.tm, self.tn, self.tk)
    }
}

impl std::str::FromStr for ConvTile {
    type Err = String;
    /// `TMxTNxTK`, e.g. `64x64x16`, checked.
    fn from_str(s: &str) -> std::result::Result<ConvTile, String> {
        let parts: Vec<&str> = s.split('x').collect();
        let bad = || format!("`{s}`: expected TMxTNxTK, e.g. 64x64x16");
        if parts.len() != 3 {
            return Err(bad());
        }
        let n = |t: &str| t.trim().parse::<u32>().map_err(|_| bad());
        let tile = ConvTile {
            tm: n(parts[0])?,
            tn: n(parts[1])?,
            tk: n(parts[2])?,
        };
        tile.check()?;
        Ok(tile)
    }
}
