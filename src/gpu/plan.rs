//! Lowering: the model walked once per batch into two fixed lists of kernel
//! dispatches — forward + loss + backward (the gradient), and R-forward +
//! R-loss + R-backward (Hv). The walker owns the bookkeeping every layer
//! shares — which buffer holds each value, tangent and adjoint, whether an
//! adjoint is first written or added into, which tangents are still zero,
//! flatten aliasing — and asks each layer's unit (`crate::layers`) for its
//! kernels.

use crate::gpu::memory::Workspace;
use crate::gpu::program::Step;
use crate::layers::{self, loss};

pub use crate::dispatch::plan::{BlockPlan, NodeBufs, ParamChunk, ParamSplit, Plan};

/// The programs of one batch, as steps.
pub struct BatchSteps {
    pub forward_backward: Vec<Step>,
    /// `forward_backward` with a zero loss adjoint (the loss's scale 0;
    /// the softmax the R-loss reads is the same): every plain adjoint, and
    /// every unit state the backward derives from them, is then zero, and
    /// `r_pass` after it computes the Gauss–Newton product G·v = Jᵀ H_L J v
    /// (the R-backward is linear in the pair (gy, R(gy)): with gy = 0 it is
    /// the plain backward of R(gy)). The loss and gradient it leaves are
    /// zero.
    pub zero_adjoint: Vec<Step>,
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
    let rows = layers::next_token::loss_rows(model);
    let scale = layers::next_token::row_scale(model, scale as f64) as f32;

    // A frozen plan's recording forward pass.
    let record = p.frozen.then(|| {
        p.recording = true;
        for (i, node) in nodes.iter().enumerate() {
            let unit = layers::unit(&node.op);
            if !unit.is_alias() {
                p.enter_node(i);
                let io = node_bufs(&p, ws, canon, i, &[], false, &[]);
                unit.plan_forward(&mut p, node, &io);
            }
        }
        p.recording = false;
        p.take()
    });

    // Forward and loss; then again with the backward pass.
    let forward = |p: &mut Plan<'a>, scale: f32| {
        for (i, node) in nodes.iter().enumerate() {
            let unit = layers::unit(&node.op);
            if unit.is_alias() {
                continue;
            }
            p.enter_node(i);
            let io = node_bufs(p, ws, canon, i, &[], false, &[]);
            unit.plan_forward(p, node, &io);
        }
        loss::plan_forward_backward(p, &lb, k, scale, batch, losses, rows);
    };
    forward(&mut p, scale);
    let forward_loss = p.take();
    forward(&mut p, scale);
    backward(&mut p, ws, canon, false, &[]);
    let forward_backward = p.take();
    forward(&mut p, 0.0);
    backward(&mut p, ws, canon, false, &[]);
    let zero_adjoint = p.take();

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
        p.enter_node(i);
        let io = node_bufs(&p, ws, canon, i, &zero, false, &[]);
        zero[out] = unit.plan_r_forward(&mut p, node, &io);
    }
    loss::plan_r_backward(&mut p, &lb, k, scale, rows);
    backward(&mut p, ws, canon, true, &zero);
    let r_pass = p.take();
    BatchSteps {
        forward_backward,
        zero_adjoint,
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
        p.enter_node(i);
        let io = node_bufs(p, ws, canon, i, zero, r, &written);
        unit.plan_backward(p, node, &io, r);
        for (&v, &needs) in node.inputs.iter().zip(&io.needs_gx) {
            if needs {
                written[canon[v]] = true;
            }
        }
    }
}

/// Which parameters each node's passes address (`Plan::param_off`): the
/// model planned once for one batch against placeholder buffers. `p` is a
/// plan with the engine's flags and `probe` set; `state` is each node's
/// count of state buffers (`Layer::gpu_state`).
pub fn node_params(p: Plan, canon: &[usize], state: &[usize]) -> Vec<Vec<usize>> {
    let nv = p.model.nodes.len() + 1;
    let probe = p.probe.expect("internal: node_params without a probe");
    let ws = Workspace {
        labels: 0,
        probs: 0,
        sample_loss: 0,
        act: vec![0; nv],
        dact: vec![0; nv],
        adj: vec![0; nv],
        radj: vec![0; nv],
        state: state.iter().map(|&k| vec![0; k]).collect(),
        zero_adjoint: false,
        resident: None,
    };
    plan_batch(p, &ws, canon, 0, 0, 1.0, None);
    let mut out = vec![vec![]; nv - 1];
    for &(node, idx) in probe.borrow().iter() {
        if !out[node].contains(&idx) {
            out[node].push(idx);
        }
    }
    out
}
