//! What a layer's unit plans against (`Layer::gpu_*`): the batch, the
//! shared buffers, the steps pushed so far. The walker that lowers a whole
//! model into these steps is `gpu::plan`.

use crate::dispatch::kernels::{
    Binding, Consts, ConvTile, EwParams, Kernel, KernelParams, ReduceParams,
};
use crate::dispatch::reduce::{self, SplitParams};
use crate::dispatch::step::{Grid, Step};
use crate::model::Model;

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
            conv_tile: ConvTile::DEFAULT,
            frozen: false,
            recording: false,
            bn_float64: false,
            reduce_split: None,
            block: None,
            steps: vec![],
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

    pub fn param_off(&self, idx: usize) -> usize {
        self.model.params[idx].offset
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
