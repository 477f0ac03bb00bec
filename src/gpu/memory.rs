//! Memory planning: the buffer arena, flatten aliasing, per-batch
//! workspaces (values, tangents, adjoints, R-adjoints and each unit's own
//! state) and the budget that decides whether every batch keeps its own.

use crate::error::Result;
use crate::gpu::context::{GpuBuffer, GpuContext};
use crate::layers::{self, StateCx};
use crate::model::Model;

/// Every buffer the engine owns; steps name them by index.
#[derive(Default)]
pub struct Arena {
    pub buffers: Vec<GpuBuffer>,
    /// Per buffer: it holds one slice per tangent of a block product
    /// (`alloc_tangent`), which the R-pass kernels index by their tangent.
    pub tangent: Vec<bool>,
}

impl Arena {
    fn push(&mut self, b: GpuBuffer, tangent: bool) -> usize {
        self.buffers.push(b);
        self.tangent.push(tangent);
        self.buffers.len() - 1
    }
    /// A zeroed storage buffer of `len` floats named `name` in errors.
    pub fn alloc(&mut self, ctx: &GpuContext, name: String, len: usize) -> Result<usize> {
        let b = ctx.storage(&name, len)?;
        Ok(self.push(b, false))
    }
    /// A zeroed storage buffer of `kmax` slices of `len` floats, one per
    /// tangent of a block product (shaders/tangents.wgsl): exactly
    /// `kmax · len`, since the kernels find a slice's length by dividing.
    pub fn alloc_tangent(
        &mut self,
        ctx: &GpuContext,
        name: String,
        len: usize,
        kmax: usize,
    ) -> Result<usize> {
        let total = len.max(1).checked_mul(kmax).ok_or_else(|| {
            crate::Error::Gpu(format!("{name}: {kmax} slices of {len} floats overflow"))
        })?;
        let b = ctx.storage(&name, total)?;
        Ok(self.push(b, kmax > 1))
    }
    /// A parameter-shaped buffer that uniform weight windows may read.
    pub fn weights(&mut self, ctx: &GpuContext, name: &str, len: usize) -> Result<usize> {
        let b = ctx.weights(name, len)?;
        Ok(self.push(b, false))
    }
}

/// The tangent-side buffers of every value (R-forward values and
/// R-adjoints), one slice per tangent; shared by all batches, since the
/// R-pass of each batch writes them before it reads them.
pub struct TangentBufs {
    pub dact: Vec<usize>,
    pub radj: Vec<usize>,
}

/// Buffers of one batch's passes, by canonical value id or node index.
pub struct Workspace {
    pub labels: usize,
    pub probs: usize,
    pub sample_loss: usize,
    pub act: Vec<usize>,
    pub dact: Vec<usize>,
    pub adj: Vec<usize>,
    pub radj: Vec<usize>,
    /// Each node's unit state (`Layer::gpu_state`), in the unit's order.
    pub state: Vec<Vec<usize>>,
    /// The batch whose forward/backward results the buffers hold.
    pub resident: Option<usize>,
    /// The resident batch's adjoints are those of a zero loss adjoint
    /// (`BatchSteps::zero_adjoint`: what a Gauss–Newton R-pass reads), not
    /// the loss's own.
    pub zero_adjoint: bool,
}

/// The storage value of every value: flatten (an alias unit) shares its
/// input's buffer.
pub fn canonical_values(model: &Model) -> Vec<usize> {
    let nv = model.nodes.len() + 1;
    let mut canon: Vec<usize> = (0..nv).collect();
    for (i, node) in model.nodes.iter().enumerate() {
        if layers::unit(&node.op).is_alias() {
            canon[i + 1] = canon[node.inputs[0]];
        }
    }
    canon
}

fn value_len(model: &Model, v: usize, n: usize) -> usize {
    let s = if v == 0 {
        model.input
    } else {
        model.nodes[v - 1].out_shape
    };
    n * s.numel()
}

/// Bytes of one batch's cached workspace (values, adjoints and unit state,
/// whose R-pass parts hold `kmax` slices) for batches of up to `n`.
pub fn workspace_bytes(
    model: &Model,
    canon: &[usize],
    n: usize,
    cx: &StateCx,
    kmax: usize,
) -> usize {
    let values: usize = (0..canon.len())
        .filter(|&v| canon[v] == v)
        .map(|v| 2 * value_len(model, v, n))
        .sum();
    let state: usize = model
        .nodes
        .iter()
        .flat_map(|nd| layers::unit(&nd.op).gpu_state(nd, n, cx))
        .map(|s| if s.tangent { s.len * kmax } else { s.len })
        .sum();
    4 * (values + state)
}

/// Bytes of the shared tangent buffers (`TangentBufs`).
pub fn tangent_bytes(model: &Model, canon: &[usize], n: usize, kmax: usize) -> usize {
    let values: usize = (0..canon.len())
        .filter(|&v| canon[v] == v)
        .map(|v| 2 * value_len(model, v, n))
        .sum();
    4 * values * kmax
}

/// Allocates the shared tangent buffers for batches of up to `n` samples
/// and `kmax` tangents.
pub fn tangent_buffers(
    ctx: &GpuContext,
    arena: &mut Arena,
    model: &Model,
    canon: &[usize],
    n: usize,
    kmax: usize,
) -> Result<TangentBufs> {
    let nv = model.nodes.len() + 1;
    let mut dact = vec![usize::MAX; nv];
    let mut radj = vec![usize::MAX; nv];
    for vi in 0..nv {
        if canon[vi] != vi {
            continue;
        }
        let len = value_len(model, vi, n);
        let nm = value_name(model, vi);
        dact[vi] = arena.alloc_tangent(ctx, format!("R-forward of {nm}"), len, kmax)?;
        radj[vi] = arena.alloc_tangent(ctx, format!("R-adjoint of {nm}"), len, kmax)?;
    }
    Ok(TangentBufs { dact, radj })
}

fn value_name(model: &Model, vi: usize) -> String {
    if vi == 0 {
        "input".to_string()
    } else {
        let nd = &model.nodes[vi - 1];
        if nd.name.is_empty() {
            format!("{} output #{vi}", nd.kind())
        } else {
            format!("{} output", nd.name)
        }
    }
}

/// Allocates one workspace for batches of up to `n` samples over the
/// shared tangent buffers; `tag` is appended to every buffer name.
#[allow(clippy::too_many_arguments)]
pub fn workspace(
    ctx: &GpuContext,
    arena: &mut Arena,
    model: &Model,
    canon: &[usize],
    n: usize,
    cx: &StateCx,
    tag: &str,
    tangents: &TangentBufs,
    kmax: usize,
) -> Result<Workspace> {
    let nodes = &model.nodes;
    let nv = nodes.len() + 1;
    let mut act = vec![usize::MAX; nv];
    let mut adj = vec![usize::MAX; nv];
    for vi in 0..nv {
        if canon[vi] != vi {
            continue;
        }
        let len = value_len(model, vi, n);
        let nm = value_name(model, vi);
        act[vi] = arena.alloc(ctx, format!("{nm}{tag}"), len)?;
        adj[vi] = arena.alloc(ctx, format!("adjoint of {nm}{tag}"), len)?;
    }
    let mut state = Vec::with_capacity(nodes.len());
    for node in nodes {
        let mut ids = vec![];
        for s in layers::unit(&node.op).gpu_state(node, n, cx) {
            let name = format!("{} {}{tag}", node.name, s.name);
            let id = if s.tangent {
                arena.alloc_tangent(ctx, name, s.len, kmax)?
            } else {
                arena.alloc(ctx, name, s.len)?
            };
            if let Some(init) = &s.init {
                ctx.write_f32(&arena.buffers[id], 0, init)?;
            }
            ids.push(id);
        }
        state.push(ids);
    }
    let k = model.classes;
    let rows = n * layers::next_token::loss_rows(model);
    Ok(Workspace {
        labels: arena.alloc(ctx, format!("labels{tag}"), rows)?,
        probs: arena.alloc(ctx, format!("softmax{tag}"), rows * k)?,
        sample_loss: arena.alloc(ctx, format!("per-row loss{tag}"), rows)?,
        act,
        dact: tangents.dact.clone(),
        adj,
        radj: tangents.radj.clone(),
        state,
        resident: None,
        zero_adjoint: false,
    })
}
