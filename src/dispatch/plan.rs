//! What a layer's unit plans against (`Layer::gpu_*`): the batch, the
//! shared buffers, the steps pushed so far. The walker that lowers a whole
//! model into these steps is `gpu::plan`.

use crate::dispatch::kernels::{
    Binding, Consts, ConvTile, EwParams, Kernel, KernelParams, ReduceParams,
};
use crate::dispatch::reduce::{self, SplitParams};
use crate::dispatch::step::{Grid, Step};
use crate::model::Model;
use std::cell::RefCell;

/// Parameter-sized arrays (θ, v, the gradient, Hv) held as several
/// buffers, each within the device's storage binding limit, split between
/// nodes (`gpu::executor::param_bufs`). A node's passes address the chunk
/// holding its parameters, at offsets rebased to the chunk's start
/// (`Plan::enter_node`, `Plan::param_off`).
pub struct ParamSplit {
    pub chunks: Vec<ParamChunk>,
    /// Per node: the chunk holding every parameter its passes address
    /// (None for a linear layer split by rows, and parameter-free nodes).
    pub node_chunk: Vec<Option<usize>>,
    /// Linear weights larger than a binding, split by rows between chunks:
    /// (parameter, its row blocks `(r0, r1, chunk)`).
    pub rows: Vec<(usize, Vec<RowSpan>)>,
    /// Two scratch buffers of a row block's outputs or adjoints for every
    /// sample (`layers::linear_rows`).
    pub row_scratch: [usize; 2],
}

/// Rows `r0..r1` of a split linear weight and the chunk holding them.
pub type RowSpan = (usize, usize, usize);

/// Rows `r0..r1` of a linear weight split by rows: the buffers of the
/// chunk holding them and the offset of row `r0` there.
#[derive(Clone, Copy, Debug)]
pub struct RowBlock {
    pub r0: usize,
    pub r1: usize,
    pub at: ParamChunk,
    pub off: usize,
}

/// One chunk: floats `start..start + len` of the parameter vector, and
/// its buffers (arena indices), whose float 0 is the vector's `base`
/// (`start` rounded down to the uniform window alignment, so that every
/// offset keeps its remainder and each layer's kernels, windows included,
/// are those of the single buffer).
#[derive(Clone, Copy, Debug)]
pub struct ParamChunk {
    pub base: usize,
    pub start: usize,
    pub len: usize,
    pub theta: usize,
    pub v: usize,
    pub grad: usize,
    pub hv: usize,
}

/// The buffers (arena indices) one node's passes read and write.
pub struct NodeBufs {
    /// Values of the node's inputs.
    pub x: Vec<usize>,
    /// Tangents ẋ of the inputs. A tangent that is identically zero
    /// (`dx_zero`) is never written by any pass, so its buffer holds zeros.
    pub dx: Vec<usize>,
    pub dx_zero: Vec<bool>,
    pub y: usize,
    pub dy: usize,
    /// The output's adjoint in the pass being planned: gy, or R(gy) in the
    /// R-backward.
    pub gy: usize,
    /// The output's plain adjoint gy (the same as `gy` outside the R-pass).
    pub g: usize,
    /// The inputs' adjoints in the pass being planned.
    pub gx: Vec<usize>,
    /// Add into `gx[i]` (another consumer of the input wrote it first).
    pub acc: Vec<bool>,
    /// Whether input i needs an adjoint at all (not the data).
    pub needs_gx: Vec<bool>,
    /// The unit's own per-workspace buffers (`Layer::gpu_state`).
    pub state: Vec<usize>,
}

/// What a unit plans against: the batch size, the shared buffers, the
/// steps pushed so far.
pub struct Plan<'a> {
    pub model: &'a Model,
    /// Samples in this batch.
    pub n: usize,
    pub theta: usize,
    pub v: usize,
    pub grad: usize,
    pub hv: usize,
    /// A small buffer bound where a kernel's binding is unused.
    pub dummy: usize,
    /// Scratch for weight-gradient partial sums.
    pub partials: usize,
    pub batch_mode: bool,
    /// The alignment (floats) of uniform weight windows, where the device
    /// allows them.
    pub window_alignment: Option<usize>,
    /// Convolutions run the tiled kernels (shaders/conv_tiled.wgsl;
    /// `executor::ConvPath`); false (`new`): the emulator kernels.
    pub conv_tiled: bool,
    /// Conv/linear forward and backward-data steps whose reduction would
    /// pass a CPU emulator's loop limit run as several dispatches
    /// (src/layers/conv_split.rs); false (`new`, GPUs): never split.
    pub split_loops: bool,
    /// The adapter's tile for them, narrowed per layer
    /// (`ConvTile::for_rows`).
    pub conv_tile: ConvTile,
    /// Piecewise units (ReLU/LeakyReLU, max pool) replay the decisions
    /// recorded by the batch's `record` program instead of making their
    /// own: the loss is then the smooth continuation of the piece holding
    /// the recording θ (`GpuEngine::hold_decisions`). Units that need it
    /// keep state for it (`StateCx::frozen`).
    pub frozen: bool,
    /// Set while planning the `record` program of a frozen plan: the plain
    /// forward pass, each piecewise unit also storing its decisions.
    pub recording: bool,
    /// Batch mode with float64 decisions: batch norm's statistics and x̂
    /// are uploaded from the float64 forward pass (`GpuEngine`'s decisions
    /// module) and its replaying forward computes y alone.
    pub bn_float64: bool,
    /// Per-channel reductions split in segments of this many elements,
    /// with that buffer (arena index) for their partials
    /// (`reduce::stages`); None (`new`): a workgroup per channel.
    pub reduce_split: Option<(usize, usize)>,
    /// Set while planning the R-pass of a block product.
    pub(crate) block: Option<BlockPlan<'a>>,
    pub(crate) steps: Vec<Step>,
    /// Parameter-sized arrays split in chunks; None: one buffer each.
    pub split: Option<&'a ParamSplit>,
    /// Records (node, parameter) for every `param_off` (`gpu::plan::node_params`).
    pub probe: Option<&'a RefCell<Vec<(usize, usize)>>>,
    /// The node being planned and the chunk its parameters lie in.
    node: usize,
    chunk: usize,
}

/// The R-pass of a block product: every step serves up to `kmax` tangents
/// in one dispatch (its workgroup z index), and each binding of a buffer
/// marked in `tangent` (by arena index) is read and written at the
/// tangent's slice (shaders/tangents.wgsl). Units plan as for one tangent.
#[derive(Clone, Copy)]
pub struct BlockPlan<'a> {
    pub kmax: usize,
    pub tangent: &'a [bool],
}

impl<'a> Plan<'a> {
    #[allow(clippy::too_many_arguments)]
    pub fn new(
        model: &'a Model,
        n: usize,
        theta: usize,
        v: usize,
        grad: usize,
        hv: usize,
        dummy: usize,
        partials: usize,
        batch_mode: bool,
        window_alignment: Option<usize>,
    ) -> Plan<'a> {
        Plan {
            model,
            n,
            theta,
            v,
            grad,
            hv,
            dummy,
            partials,
            batch_mode,
            window_alignment,
            conv_tiled: false,
            split_loops: false,
            conv_tile: ConvTile::DEFAULT,
            frozen: false,
            recording: false,
            bn_float64: false,
            reduce_split: None,
            block: None,
            steps: vec![],
            split: None,
            probe: None,
            node: 0,
            chunk: 0,
        }
    }

    /// Called by the walker before a node's unit plans: with split
    /// parameter arrays, θ, v, the gradient and Hv become the buffers of
    /// the chunk holding the node's parameters.
    pub fn enter_node(&mut self, i: usize) {
        self.node = i;
        if let Some(c) = self
            .split
            .and_then(|s| s.node_chunk[i].map(|c| (c, s.chunks[c])))
        {
            self.chunk = c.0;
            (self.theta, self.v, self.grad, self.hv) = (c.1.theta, c.1.v, c.1.grad, c.1.hv);
        }
    }

    /// The accumulator of parameter derivatives: the gradient, or Hv.
    pub fn target(&self, r: bool) -> usize {
        if r {
            self.hv
        } else {
            self.grad
        }
    }

    /// A linear weight split by rows (`ParamSplit::rows`): its blocks.
    pub fn row_blocks(&self, weight: usize) -> Option<Vec<RowBlock>> {
        let s = self.split?;
        let (_, blocks) = s.rows.iter().find(|r| r.0 == weight)?;
        let spec = &self.model.params[weight];
        let cols = spec.numel() / spec.shape[0].max(1);
        let blocks = blocks
            .iter()
            .map(|&(r0, r1, c)| {
                let at = s.chunks[c];
                let off = spec.offset + r0 * cols - at.base;
                RowBlock { r0, r1, at, off }
            })
            .collect();
        Some(blocks)
    }

    /// The chunk holding parameter `idx` and its offset there (the whole
    /// buffers and the parameter's offset when not split).
    pub fn param_at(&self, idx: usize) -> (ParamChunk, usize) {
        let off = self.model.params[idx].offset;
        match self.split {
            Some(s) => {
                let c = s
                    .chunks
                    .iter()
                    .find(|c| off >= c.start && off < c.start + c.len)
                    .expect("internal: a parameter outside every chunk");
                (*c, off - c.base)
            }
            None => {
                let c = ParamChunk {
                    base: 0,
                    start: 0,
                    len: self.model.n_params,
                    theta: self.theta,
                    v: self.v,
                    grad: self.grad,
                    hv: self.hv,
                };
                (c, off)
            }
        }
    }

    /// The two row-block scratch buffers (`ParamSplit::row_scratch`).
    pub fn row_scratch(&self) -> [usize; 2] {
        self.split.map_or([self.dummy; 2], |s| s.row_scratch)
    }

    /// Where parameter `idx` starts in θ, v, the gradient and Hv as bound
    /// for the node being planned (rebased to its chunk when split).
    pub fn param_off(&self, idx: usize) -> usize {
        let spec = &self.model.params[idx];
        if let Some(probe) = self.probe {
            probe.borrow_mut().push((self.node, idx));
        }
        match self.split {
            None => spec.offset,
            Some(s) => {
                let c = &s.chunks[self.chunk];
                assert!(
                    s.node_chunk[self.node] == Some(self.chunk)
                        && spec.offset >= c.start
                        && spec.offset + spec.numel() <= c.start + c.len,
                    "internal: parameter {} outside the chunk of node {}",
                    spec.name,
                    self.node
                );
                spec.offset - c.base
            }
        }
    }

    pub fn push<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        p: &P,
        buffers: Vec<usize>,
        grid: Grid,
    ) {
        self.push_with(kernel, Consts::default(), p, buffers, grid);
    }

    /// A step of a kernel specialised by override constants.
    pub fn push_with<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        consts: Consts,
        p: &P,
        buffers: Vec<usize>,
        grid: Grid,
    ) {
        self.push_step(kernel, consts, p, buffers, grid, 0);
    }

    /// Whether piecewise units replay recorded decisions in the pass
    /// being planned (a frozen plan, outside its `record` program).
    pub fn replaying(&self) -> bool {
        self.frozen && !self.recording
    }

    /// Whether the R-pass of a block product is being planned.
    pub fn in_block(&self) -> bool {
        self.block.is_some()
    }

    /// A step; in a block product's R-pass, with the constants that make
    /// each binding of a tangent buffer read and write the tangent's slice.
    fn push_step<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        consts: Consts,
        p: &P,
        buffers: Vec<usize>,
        grid: Grid,
        window: usize,
    ) {
        let consts = match self.block {
            Some(b) => {
                let kinds = kernel.bindings();
                let mut kb = 0u32;
                for (j, &id) in buffers.iter().enumerate() {
                    if b.tangent[id] {
                        assert!(
                            kinds[j] != Binding::Window,
                            "internal: {kernel:?} reads tangent slices through a uniform window"
                        );
                        kb |= 1 << (j + 1);
                    }
                }
                consts.with("KB", kb).with("KMAX", b.kmax as u32)
            }
            None => consts,
        };
        let mut s = Step::new(kernel, consts, p, buffers, grid);
        s.window = window;
        self.steps.push(s);
    }

    /// A step whose uniform windows start at `window` floats.
    pub fn push_windowed<P: KernelParams>(
        &mut self,
        kernel: Kernel,
        consts: Consts,
        p: &P,
        buffers: Vec<usize>,
        grid: Grid,
        window: usize,
    ) {
        self.push_step(kernel, consts, p, buffers, grid, window);
    }

    /// dst[dst_off..][..len] (+)= src[src_off..][..len].
    pub fn copy(
        &mut self,
        src: usize,
        src_off: usize,
        dst: usize,
        dst_off: usize,
        len: usize,
        acc: bool,
    ) {
        self.push_with(
            Kernel::Copy,
            Consts::acc(acc),
            &EwParams {
                len: len as u32,
                a_off: src_off as u32,
                out_off: dst_off as u32,
                _p0: 0,
            },
            vec![src, dst],
            Grid::Threads(len),
        );
    }

    /// Per-channel sums of `a` (and of a·b) over [n, c, hw] into
    /// `out[out_a..]` (and `out[out_b..]`).
    #[allow(clippy::too_many_arguments)]
    pub fn channel_sums(
        &mut self,
        a: usize,
        b: Option<usize>,
        n: usize,
        c: usize,
        hw: usize,
        out: usize,
        out_a: usize,
        out_b: usize,
        acc: bool,
    ) {
        let d = self.dummy;
        let consts = Consts::new(&[("HAS_B", b.is_some() as u32), ("ACC", acc as u32)]);
        self.reduction(
            Kernel::ChannelSums,
            consts,
            ReduceParams {
                n: n as u32,
                c: c as u32,
                hw: hw as u32,
                out_a: out_a as u32,
                out_b: out_b as u32,
                ..Default::default()
            },
            vec![a, b.unwrap_or(d), out],
            c,
            n * hw,
        );
    }

    /// A per-channel reduction (ChannelSums, BnParamSums, BnStats) over
    /// `c` channels of `count` elements, given as its whole-channel
    /// dispatch: that, or split in two (`reduce_split`).
    #[allow(clippy::too_many_arguments)]
    pub fn reduction<P: SplitParams>(
        &mut self,
        kernel: Kernel,
        consts: Consts,
        p: P,
        buffers: Vec<usize>,
        c: usize,
        count: usize,
    ) {
        let split = self.reduce_split;
        for s in reduce::stages(kernel, consts, p, &buffers, c, count, split) {
            self.push_with(kernel, s.consts, &s.params, s.buffers, s.grid);
        }
    }

    pub(crate) fn take(&mut self) -> Vec<Step> {
        std::mem::take(&mut self.steps)
    }
}
