//! Layer units: one op family, one place.
//!
//! Each unit holds its four passes twice over — as float64 reference
//! arithmetic (the calls into `crate::ops`) and as a GPU plan (which WGSL
//! kernels, on which buffers, with which parameters) — behind the one
//! [`Layer`] trait. The two executors (`crate::cpu` and `crate::gpu`) are
//! generic walkers over the lowered graph: they own values, tangents,
//! adjoints and their accumulation, the zero tangent at the input and
//! aliasing (flatten), and call the units for the mathematics.
//!
//! Passes (Pearlmutter's R-operator, forward over reverse):
//! - forward: y = f(x; θ), keeping what later passes need;
//! - R-forward: ẏ = ∂f/∂x·ẋ + ∂f/∂θ·v;
//! - backward: gx = (∂f/∂x)ᵀ·gy, and ∂L/∂θ accumulated into the gradient;
//! - R-backward: R(gx) = (∂f/∂x)ᵀ·R(gy) + R(∂f/∂x)ᵀ·gy, and the layer's
//!   block of Hv accumulated.
//!
//! Adding an op: a unit here (its f64 passes, its GPU plan, its `check`),
//! its kernels in `shaders/` registered in `crate::dispatch::kernels`, an `Op`
//! variant with its `.arch` keyword, and one line in [`unit`].

#[macro_use]
mod cpu_only;

pub mod activation;
pub mod adaptive_pool;
pub mod add;
pub mod attention;
pub mod batchnorm;
pub mod channels;
pub mod conv;
pub mod conv_split;
pub mod embedding;
pub mod flatten;
pub mod layer_scale;
pub mod layernorm;
pub mod linear_rows;
pub mod loss;
pub mod mul;
pub mod next_token;
pub mod pool;
pub mod seq;

use crate::dispatch::plan::{NodeBufs, Plan};
use crate::error::{Error, Result};
use crate::model::{Model, Node, Op};
use std::any::Any;

/// What a unit's float64 forward keeps for the later passes of a batch.
pub type Saved = Box<dyn Any + Send + Sync>;

/// What a unit's float64 passes read besides their inputs.
pub struct CpuCx<'a> {
    pub model: &'a Model,
    /// Samples in the batch.
    pub n: usize,
    pub theta: &'a [f64],
    /// Non-trainable buffers (BN running statistics), by `Model::buffers` index.
    pub buffers: &'a [Vec<f64>],
    /// Batch norm by batch statistics (PyTorch train()) or running ones.
    pub batch_mode: bool,
    /// A ReLU/LeakyReLU mask (input on the positive side) to use instead
    /// of the sign of the f64 input: the activation then computes the
    /// chosen linear piece, y = x or slope·x (tests use the GPU's masks to
    /// separate kernel error from kink flips; frozen [`Decision`]s hold the
    /// pieces of another θ).
    pub mask: Option<&'a [bool]>,
    /// A max-pool argmax to use instead of the windows' own maxima.
    pub argmax: Option<&'a [u32]>,
    /// The piece of each input of a three-piece activation (ReLU6,
    /// Hardswish, Hardsigmoid: `ops::activation::piece`) to use instead of
    /// the input's own: the activation then computes that piece's
    /// polynomial at the input (frozen [`Decision`]s).
    pub pieces: Option<&'a [u8]>,
    /// Data-parallel training (issue 28): the batch's samples are spread
    /// over workers and batch norm's per-channel sums are summed over them
    /// with this (`crate::ops::bn::AllSum`), as PyTorch's SyncBatchNorm.
    /// Only the forward and backward passes take it (training needs no
    /// R-passes); None: the batch is all here.
    pub sync: Option<crate::ops::bn::AllSum<'a>>,
}

/// The piecewise choice a node made in one batch's forward pass: which
/// side of the kink each ReLU/LeakyReLU input is on, which piece of a
/// ReLU6/Hardswish/Hardsigmoid, which element each max-pool window picked. Smooth ops (tanh, GELU, batch norm, average
/// pools) make none. Recorded at one θ and replayed at another, they make
/// the loss a smooth function of θ that agrees with the real one on the
/// piece holding the recording θ — the function autograd differentiates.
#[derive(Clone, Debug, PartialEq)]
pub enum Decision {
    None,
    /// Input > 0, per element.
    Mask(Vec<bool>),
    /// Each window's maximum, as an index within its input plane.
    Argmax(Vec<u32>),
    /// The piece of a three-piece activation (ReLU6, Hardswish,
    /// Hardsigmoid) per element: 0 at or below the lower kink, 1 between
    /// the kinks, 2 at or above the upper one.
    Piece(Vec<u8>),
}

impl CpuCx<'_> {
    /// The slice of a parameter-shaped vector holding parameter `idx`.
    pub fn param<'b>(&self, vec: &'b [f64], idx: usize) -> &'b [f64] {
        let p = &self.model.params[idx];
        &vec[p.offset..p.offset + p.numel()]
    }
    /// The mutable slice of a parameter-shaped vector holding parameter `idx`.
    pub fn param_mut<'b>(&self, vec: &'b mut [f64], idx: usize) -> &'b mut [f64] {
        let p = &self.model.params[idx];
        &mut vec[p.offset..p.offset + p.numel()]
    }
}

/// The contents of a unit's state buffer, as its kernels read them.
#[derive(Clone, Debug, PartialEq)]
pub enum StateWords {
    F32(Vec<f32>),
    U32(Vec<u32>),
}

/// A buffer a unit keeps per batch workspace on the GPU.
pub struct StateBuf {
    /// Appended to the node's name in errors (`bn1 x̂`).
    pub name: &'static str,
    pub len: usize,
    /// Written once when the buffer is allocated (BN running statistics).
    pub init: Option<Vec<f32>>,
    /// The R-passes write it: a block product keeps one slice of `len`
    /// per tangent (shaders/tangents.wgsl); the forward passes use slice 0.
    pub tangent: bool,
}

/// One op family's passes on both executors.
pub trait Layer: Sync {
    /// Refuses a node the unit's GPU kernels cannot compute right (the
    /// shapes their tests cover), naming the layer and the limit; the GPU
    /// executor calls it when it is built. The float64 passes take any
    /// shape the model parser accepts.
    fn check(&self, _node: &Node) -> Result<()> {
        Ok(())
    }
    /// The output is the input's storage seen with another shape (flatten):
    /// the executors alias it and run no pass for it.
    fn is_alias(&self) -> bool {
        false
    }

    // ---- float64 reference ----
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved);
    /// ẏ; may store what the R-backward needs in `saved`.
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        saved: &mut Saved,
    ) -> Vec<f64>;
    /// gx for each input; ∂L/∂θ of the layer's parameters added into `grad`.
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        saved: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>>;
    /// R(gx) for each input; the layer's block of Hv added into `hv`.
    #[allow(clippy::too_many_arguments)]
    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        saved: &Saved,
        gy: &[f64],
        rgy: &[f64],
        v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>>;

    // ---- piecewise decisions (crate::decisions) ----
    /// Whether the unit takes piecewise decisions on this node.
    fn decides(&self, _node: &Node) -> bool {
        false
    }
    /// A piecewise unit (ReLU/LeakyReLU, max pool): the decisions its
    /// forward takes on input `x` (a batch of `cx.n` samples, in whatever
    /// precision it was computed, here as f64), and each decision's
    /// margin: how far its deciding quantity lies from the threshold where
    /// it would flip (|x| at a kink; the window's best minus its runner-up
    /// for a max pool; 0 on a tie, NaN where undecidable). Smooth units
    /// take none: `None`.
    fn decide(&self, _cx: &CpuCx, _node: &Node, _x: &[f64]) -> Option<(Decision, Vec<f64>)> {
        None
    }
    /// What a replaying GPU plan (`Plan::replaying`) reads in the unit's
    /// first state buffer to take decision `d`; None for smooth units.
    fn decision_words(&self, _node: &Node, _d: &Decision) -> Option<StateWords> {
        None
    }

    // ---- GPU plan ----
    /// Buffers kept per workspace for a batch of up to `n` samples.
    fn gpu_state(&self, _node: &Node, _n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        vec![]
    }
    /// Floats of shared scratch one pass needs (weight-gradient partials).
    fn gpu_scratch(&self, _node: &Node, _n: usize) -> usize {
        0
    }
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs);
    /// Pushes the R-forward; returns whether ẏ is identically zero (and
    /// nothing was written), which lets later layers skip a term.
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool;
    /// Backward (`r = false`) or R-backward (`r = true`): writes (or, where
    /// `io.acc[i]`, adds into) the adjoint of each input with `io.needs_gx[i]`.
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool);
}

/// A unit linear in its one input once its forward's state is fixed (the
/// pools: y = A·x, A depending on the argmax for max pooling). The
/// R-forward is then A·ẋ and the R-backward Aᵀ·R(gy), so the unit gives A
/// and Aᵀ and the [`Layer`] passes follow (blanket impl below).
pub trait LinearUnit: Sync {
    fn check(&self, _node: &Node) -> Result<()> {
        Ok(())
    }
    /// y = A·x and the state A depends on (nothing by default).
    fn forward(&self, cx: &CpuCx, node: &Node, x: &[f64]) -> (Vec<f64>, Saved) {
        let s: Saved = Box::new(());
        (self.apply(cx, node, &s, x), s)
    }
    /// A·x at the forward's state.
    fn apply(&self, cx: &CpuCx, node: &Node, saved: &Saved, x: &[f64]) -> Vec<f64>;
    /// Aᵀ·g.
    fn transpose(&self, cx: &CpuCx, node: &Node, saved: &Saved, g: &[f64]) -> Vec<f64>;

    /// As [`Layer::decides`].
    fn decides(&self, _node: &Node) -> bool {
        false
    }
    /// As [`Layer::decide`]: the decisions the state A depends on.
    fn decide(&self, _cx: &CpuCx, _node: &Node, _x: &[f64]) -> Option<(Decision, Vec<f64>)> {
        None
    }
    /// As [`Layer::decision_words`].
    fn decision_words(&self, _node: &Node, _d: &Decision) -> Option<StateWords> {
        None
    }

    fn gpu_state(&self, _node: &Node, _n: usize, _cx: &StateCx) -> Vec<StateBuf> {
        vec![]
    }
    /// The forward on the GPU (A·x by default).
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        self.plan_apply(p, node, io, io.x[0], io.y);
    }
    /// Pushes dst = A·src.
    fn plan_apply(&self, p: &mut Plan, node: &Node, io: &NodeBufs, src: usize, dst: usize);
    /// Pushes dst = Aᵀ·src, or dst += Aᵀ·src with `acc`.
    fn plan_transpose(
        &self,
        p: &mut Plan,
        node: &Node,
        io: &NodeBufs,
        src: usize,
        dst: usize,
        acc: bool,
    );
}

impl<T: LinearUnit> Layer for T {
    fn check(&self, node: &Node) -> Result<()> {
        LinearUnit::check(self, node)
    }
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        LinearUnit::forward(self, cx, node, xs[0])
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        saved: &mut Saved,
    ) -> Vec<f64> {
        self.apply(cx, node, saved, dxs[0])
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        saved: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        vec![self.transpose(cx, node, saved, gy)]
    }
    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _dxs: &[&[f64]],
        saved: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        vec![self.transpose(cx, node, saved, rgy)]
    }
    fn decides(&self, node: &Node) -> bool {
        LinearUnit::decides(self, node)
    }
    fn decide(&self, cx: &CpuCx, node: &Node, x: &[f64]) -> Option<(Decision, Vec<f64>)> {
        LinearUnit::decide(self, cx, node, x)
    }
    fn decision_words(&self, node: &Node, d: &Decision) -> Option<StateWords> {
        LinearUnit::decision_words(self, node, d)
    }
    fn gpu_state(&self, node: &Node, n: usize, cx: &StateCx) -> Vec<StateBuf> {
        LinearUnit::gpu_state(self, node, n, cx)
    }
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        LinearUnit::plan_forward(self, p, node, io)
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero[0] {
            return true;
        }
        self.plan_apply(p, node, io, io.dx[0], io.dy);
        false
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        if io.needs_gx[0] {
            self.plan_transpose(p, node, io, io.gy, io.gx[0], io.acc[0]);
        }
    }
}

/// What `Layer::gpu_state` may read.
pub struct StateCx<'a> {
    pub model: &'a Model,
    pub buffers: &'a [Vec<f64>],
    pub batch_mode: bool,
    /// The engine replays recorded piecewise decisions (`Plan::frozen`):
    /// units that make them keep what they need to replay them.
    pub frozen: bool,
}

/// The unit that computes an op: the registration table.
pub fn unit(op: &Op) -> &'static dyn Layer {
    match op {
        Op::Conv { .. } | Op::Linear { .. } => &conv::ConvUnit,
        Op::BatchNorm { .. } => &batchnorm::BatchNormUnit,
        Op::Act(_) => &activation::ActivationUnit,
        Op::MaxPool { .. } => &pool::MaxPoolUnit,
        Op::AvgPool { .. } => &pool::AvgPoolUnit,
        Op::GlobalAvgPool => &pool::GlobalAvgPoolUnit,
        Op::Flatten => &flatten::FlattenUnit,
        Op::Add => &add::AddUnit,
        Op::Concat => &channels::ConcatUnit,
        Op::Narrow { .. } => &channels::NarrowUnit,
        Op::ChannelShuffle { .. } => &channels::ShuffleUnit,
        Op::Mul => &mul::MulUnit,
        Op::AdaptiveAvgPool { .. } => &adaptive_pool::AdaptiveAvgPoolUnit,
        Op::Embedding { .. } => &embedding::EmbeddingUnit,
        Op::AddParam { .. } => &embedding::AddParamUnit,
        Op::ClsToken { .. } => &embedding::ClsTokenUnit,
        Op::Tokens => &seq::TokensUnit,
        Op::Untokens { .. } => &seq::UntokensUnit,
        Op::MulParam { .. } => &layer_scale::MulParamUnit,
        Op::Select { .. } => &seq::SelectUnit,
        Op::SeqLinear { .. } => &seq::SeqLinearUnit,
        Op::LayerNorm { .. } => &layernorm::LayerNormUnit,
        Op::Mha { .. } => &attention::MhaUnit,
    }
}

/// Checks every node of a model against its unit's GPU envelope, and the
/// graph ([`check_graph`]).
pub fn check_model(model: &Model) -> Result<()> {
    check_graph(model)?;
    model.nodes.iter().try_for_each(|n| unit(&n.op).check(n))?;
    Ok(())
}

/// Checks what both executors need of the channel layers' shapes (the
/// parser makes no other; a hand-built graph may): the inputs of the
/// nodes that read several against their output, and a narrow's range,
/// a shuffle's groups and an adaptive pool's output size.
pub fn check_graph(model: &Model) -> Result<()> {
    model.nodes.iter().try_for_each(|n| match n.op {
        Op::Concat => channels::check_concat(model, n),
        Op::Mul => mul::check_mul(model, n),
        Op::Narrow { .. } | Op::ChannelShuffle { .. } | Op::AdaptiveAvgPool { .. } => {
            unit(&n.op).check(n)
        }
        _ => Ok(()),
    })
}

/// The saved state of a unit, downcast; a mismatch is an internal error.
pub fn saved<'a, T: 'static>(s: &'a Saved, node: &Node) -> &'a T {
    s.downcast_ref::<T>().unwrap_or_else(|| {
        panic!(
            "internal: layer `{}` ({}) saved another state",
            node.name,
            node.kind()
        )
    })
}

/// The layer's name for errors: its module name, or its kind.
pub fn layer_name(node: &Node) -> String {
    if node.name.is_empty() {
        node.kind().to_string()
    } else {
        node.name.clone()
    }
}

/// An `Unsupported` error for a node.
pub fn unsupported(node: &Node, msg: impl Into<String>) -> Error {
    Error::Unsupported {
        layer: layer_name(node),
        msg: msg.into(),
    }
}

/// Element-wise a + b.
pub(crate) fn add_vecs(a: &[f64], b: &[f64]) -> Vec<f64> {
    a.iter().zip(b).map(|(p, q)| p + q).collect()
}
