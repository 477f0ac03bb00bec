//! Lowering: the model walked once per batch into two fixed lists of kernel
//! dispatches — forward + loss + backward (the gradient), and R-forward +
//! R-loss + R-backward (Hv). The walker owns the bookkeeping every layer
//! shares — which buffer holds each value, tangent and adjoint, whether an
//! adjoint is first written or added into, which tangents are still zero,
//! flatten aliasing — and asks each layer's unit (`crate::layers`) for its
//! kernels.

use crate::gpu::kernels::{
    Binding, Consts, ConvTile, EwParams, Kernel, KernelParams, ReduceParams,
};
use crate::gpu::memory::Workspace;
use crate::gpu::program::{Grid, Step};
use crate::gpu::reduce::{self, SplitParams};
use crate::layers::{self, loss};
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
    block: Option<BlockPlan<'a>>,
    steps: Vec<Step>,
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

    fn take(&mut self) -> Vec<Step> {
        std::mem::take(&mut self.steps)
    }
}

/// The programs of one batch, as steps.
pub struct BatchSteps {
    pub forward_backward: Vec<Step>,
    pub r_pass: Vec<Step>,
    /// A frozen plan's forward pass that records the decisions the other
    /// two replay.
    pub record: Option<Vec<Step>>,
    /// The forward pass and the loss only (evaluation).
    pub forward_loss: Vec<Step>,
}

/// Plans one batch: `batch` indexes its slot in `losses`; `scale` is 1/N;
/// with `block` the R-pass serves that many tangents per dispatch.
pub fn plan_batch<'a>(
    mut p: Plan<'a>,
    ws: &Workspace,
    canon: &[usize],
    batch: usize,
    losses: usize,
    scale: f32,
    block: Option<BlockPlan<'a>>,
) -> BatchSteps {
    let model = p.model;
    let nodes = &model.nodes;
    let last = canon[nodes.len()];
    let lb = loss::LossBufs {
        logits: ws.act[last],
        dlogits: ws.dact[last],
        labels: ws.labels,
        probs: ws.probs,
        sample_loss: ws.sample_loss,
        adj: ws.adj[last],
        radj: ws.radj[last],
    };
    let k = model.classes;

    // A frozen plan's recording forward pass.
    let record = p.frozen.then(|| {
        p.recording = true;
        for (i, node) in nodes.iter().enumerate() {
            let unit = layers::unit(&node.op);
            if !unit.is_alias() {
                let io = node_bufs(&p, ws, canon, i, &[], false, &[]);
                unit.plan_forward(&mut p, node, &io);
            }
        }
        p.recording = false;
        p.take()
    });

    // Forward and loss; then again with the backward pass.
    let forward = |p: &mut Plan<'a>| {
        for (i, node) in nodes.iter().enumerate() {
            let unit = layers::unit(&node.op);
            if unit.is_alias() {
                continue;
            }
            let io = node_bufs(p, ws, canon, i, &[], false, &[]);
            unit.plan_forward(p, node, &io);
        }
        loss::plan_forward_backward(p, &lb, k, scale, batch, losses);
    };
    forward(&mut p);
    let forward_loss = p.take();
    forward(&mut p);
    backward(&mut p, ws, canon, false, &[]);
    let forward_backward = p.take();

    // R-forward (tracking which tangents are still zero: ẋ = 0 at the
    // input), R-loss, R-backward.
    p.block = block.filter(|b| b.kmax > 1);
    let mut zero = vec![false; nodes.len() + 1];
    zero[0] = true;
    for (i, node) in nodes.iter().enumerate() {
        let unit = layers::unit(&node.op);
        let out = canon[i + 1];
        if unit.is_alias() {
            zero[out] = zero[canon[node.inputs[0]]];
            continue;
        }
        let io = node_bufs(&p, ws, canon, i, &zero, false, &[]);
        zero[out] = unit.plan_r_forward(&mut p, node, &io);
    }
    loss::plan_r_backward(&mut p, &lb, k, scale);
    backward(&mut p, ws, canon, true, &zero);
    let r_pass = p.take();
    BatchSteps {
        forward_backward,
        r_pass,
        record,
        forward_loss,
    }
}

/// The buffers of node `i`; `written` says which adjoints hold a value.
fn node_bufs(
    p: &Plan,
    ws: &Workspace,
    canon: &[usize],
    i: usize,
    zero: &[bool],
    r: bool,
    written: &[bool],
) -> NodeBufs {
    let node = &p.model.nodes[i];
    let ins: Vec<usize> = node.inputs.iter().map(|&v| canon[v]).collect();
    let out = canon[i + 1];
    let adj = |v: usize| if r { ws.radj[v] } else { ws.adj[v] };
    // An input read twice (a + a) is written by its first use.
    let acc = ins
        .iter()
        .enumerate()
        .map(|(j, &v)| written.get(v).copied().unwrap_or(false) || ins[..j].contains(&v))
        .collect();
    NodeBufs {
        x: ins.iter().map(|&v| ws.act[v]).collect(),
        dx: ins.iter().map(|&v| ws.dact[v]).collect(),
        dx_zero: ins
            .iter()
            .map(|&v| zero.get(v).copied().unwrap_or(false))
            .collect(),
        y: ws.act[out],
        dy: ws.dact[out],
        gy: adj(out),
        g: ws.adj[out],
        gx: ins.iter().map(|&v| adj(v)).collect(),
        acc,
        needs_gx: ins.iter().map(|&v| v != 0).collect(),
        state: ws.state[i].clone(),
    }
}

/// Backward (`r = false`) or R-backward over the nodes in reverse.
fn backward(p: &mut Plan, ws: &Workspace, canon: &[usize], r: bool, zero: &[bool]) {
    let nodes = &p.model.nodes;
    let mut written = vec![false; nodes.len() + 1];
    written[canon[nodes.len()]] = true;
    for (i, node) in nodes.iter().enumerate().rev() {
        let unit = layers::unit(&node.op);
        if unit.is_alias() {
            continue;
        }
        let io = node_bufs(p, ws, canon, i, zero, r, &written);
        unit.plan_backward(p, node, &io, r);
        for (&v, &needs) in node.inputs.iter().zip(&io.needs_gx) {
            if needs {
                written[canon[v]] = true;
            }
        }
    }
}
