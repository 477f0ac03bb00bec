//! Token and position embeddings and the class token, in float64:
//! `Op::Embedding` (a gather of weight rows by token id; the adjoint a
//! scatter-add), `Op::AddParam` (y = x + P[0..T·D]: GPT-2's learned
//! positions, ViT's position embedding) and `Op::ClsToken` (P prepended as
//! token 0). All three are affine in (x, θ), so the R-backward is the
//! backward of R(gy) and carries no curvature term of its own.
//! On the GPU `add_param` and `cls_token` are copies (shaders/elementwise
//! and channels); the embedding's gather and scatter-add are
//! shaders/embedding.wgsl.

use super::channels::block_copy;
use super::{CpuCx, Layer, Saved};
use crate::dispatch::kernels::{EmbParams, Kernel};
use crate::dispatch::plan::{NodeBufs, ParamChunk, Plan};
use crate::dispatch::step::Grid;
use crate::model::{Node, Op};

/// The R-backward of a unit affine in (x, θ): its backward of R(gy),
/// into hv (no curvature term of its own).
macro_rules! affine_r_backward {
    () => {
        fn r_backward(
            &self,
            cx: &CpuCx,
            node: &Node,
            xs: &[&[f64]],
            _dxs: &[&[f64]],
            saved: &Saved,
            _gy: &[f64],
            rgy: &[f64],
            _v: &[f64],
            hv: &mut [f64],
        ) -> Vec<Vec<f64>> {
            self.backward(cx, node, xs, saved, rgy, hv)
        }
    };
}

fn none() -> Saved {
    Box::new(())
}

/// nn.Embedding: y[t] = W[id_t].
pub struct EmbeddingUnit;

fn emb(node: &Node) -> (usize, usize) {
    match node.op {
        Op::Embedding { weight, dim, .. } => (weight, dim),
        _ => unreachable!("embedding unit on {}", node.kind()),
    }
}

/// y[r] = table[ids[r]] for every row r.
fn gather(ids: &[f64], table: &[f64], d: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(ids.len() * d);
    for &id in ids {
        let i = id as usize;
        y.extend_from_slice(&table[i * d..(i + 1) * d]);
    }
    y
}

/// table[ids[r]] += g[r] for every row r.
fn scatter_add(ids: &[f64], g: &[f64], table: &mut [f64], d: usize) {
    for (r, &id) in ids.iter().enumerate() {
        let i = id as usize;
        for (a, b) in table[i * d..(i + 1) * d]
            .iter_mut()
            .zip(&g[r * d..(r + 1) * d])
        {
            *a += b;
        }
    }
}

impl Layer for EmbeddingUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let (w, d) = emb(node);
        (gather(xs[0], cx.param(cx.theta, w), d), none())
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _dxs: &[&[f64]],
        v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        let (w, d) = emb(node);
        gather(xs[0], cx.param(v, w), d)
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let (w, d) = emb(node);
        scatter_add(xs[0], gy, cx.param_mut(grad, w), d);
        // Token ids are data: no adjoint flows into them.
        vec![vec![0.0; xs[0].len()]]
    }
    affine_r_backward!();
    // GPU: shaders/embedding.wgsl; ids are data, so no input adjoint. A
    // weight split by rows between bindings (`Plan::row_blocks`, shared
    // with a tied lm_head) runs one dispatch per row block: each gathers
    // the tokens whose id falls in its rows and scatter-adds into its own
    // window of the gradient or Hv.
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        for (ep, at) in windows(p, node) {
            let table = at.map_or(p.theta, |c| c.theta);
            plan_gather(p, &ep, io.x[0], table, io.y);
        }
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        for (ep, at) in windows(p, node) {
            let table = at.map_or(p.v, |c| c.v);
            plan_gather(p, &ep, io.x[0], table, io.dy);
        }
        false
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        for (ep, at) in windows(p, node) {
            let target = match at {
                Some(c) if r => c.hv,
                Some(c) => c.grad,
                None => p.target(r),
            };
            p.push(
                Kernel::EmbScatter,
                &ep,
                vec![io.x[0], io.gy, target],
                Grid::Threads((ep.rows * ep.d) as usize),
            );
        }
    }
}

/// The kernels' parameters per row window of the weight: the whole weight
/// in the node's bound chunk (None), or each row block of a weight split
/// by rows with the chunk holding it.
fn windows(p: &Plan, node: &Node) -> Vec<(EmbParams, Option<ParamChunk>)> {
    let (w, d) = emb(node);
    let vocab = match node.op {
        Op::Embedding { vocab, .. } => vocab,
        _ => unreachable!("embedding unit on {}", node.kind()),
    };
    let ep = |w_off: usize, r0: usize, rows: usize| EmbParams {
        tokens: (p.n * node.in_shape.tokens()) as u32,
        d: d as u32,
        vocab: vocab as u32,
        w_off: w_off as u32,
        r0: r0 as u32,
        rows: rows as u32,
        ..Default::default()
    };
    match p.row_blocks(w) {
        Some(blocks) => blocks
            .iter()
            .map(|b| (ep(b.off, b.r0, b.r1 - b.r0), Some(b.at)))
            .collect(),
        None => vec![(ep(p.param_off(w), 0, vocab), None)],
    }
}

/// dst = rows of the weight in `table` (θ or v) by token id, for the ids
/// in the window of `ep`.
fn plan_gather(p: &mut Plan, ep: &EmbParams, ids: usize, table: usize, dst: usize) {
    p.push(
        Kernel::EmbGather,
        ep,
        vec![ids, table, dst],
        Grid::Threads((ep.tokens * ep.d) as usize),
    );
}

/// y = x + P[0..T·D] for every sample (position embeddings).
pub struct AddParamUnit;

fn added(node: &Node) -> usize {
    match node.op {
        Op::AddParam { param, .. } => param,
        _ => unreachable!("add_param unit on {}", node.kind()),
    }
}

/// x + p (p repeated over the samples).
fn plus(x: &[f64], p: &[f64]) -> Vec<f64> {
    let m = p.len();
    x.iter().enumerate().map(|(i, a)| a + p[i % m]).collect()
}

/// dst += Σ over samples of g (sample length dst.len()).
fn sum_samples(g: &[f64], dst: &mut [f64]) {
    for chunk in g.chunks(dst.len()) {
        dst.iter_mut().zip(chunk).for_each(|(a, b)| *a += b);
    }
}

impl Layer for AddParamUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let m = node.out_shape.numel();
        let p = &cx.param(cx.theta, added(node))[..m];
        (plus(xs[0], p), none())
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        let m = node.out_shape.numel();
        plus(dxs[0], &cx.param(v, added(node))[..m])
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let m = node.out_shape.numel();
        sum_samples(gy, &mut cx.param_mut(grad, added(node))[..m]);
        vec![gy.to_vec()]
    }
    affine_r_backward!();
    // GPU: copies (shaders/elementwise.wgsl `copy`, with offsets): P
    // added to each sample, and the parameter's adjoint the samples' sum,
    // added in sample order (deterministic).
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let (m, off) = (node.out_shape.numel(), p.param_off(added(node)));
        p.copy(io.x[0], 0, io.y, 0, p.n * m, false);
        for s in 0..p.n {
            p.copy(p.theta, off, io.y, s * m, m, true);
        }
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let (m, off) = (node.out_shape.numel(), p.param_off(added(node)));
        for s in 0..p.n {
            p.copy(p.v, off, io.dy, s * m, m, false);
        }
        if !io.dx_zero[0] {
            p.copy(io.dx[0], 0, io.dy, 0, p.n * m, true);
        }
        false
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let (m, off) = (node.out_shape.numel(), p.param_off(added(node)));
        let target = p.target(r);
        for s in 0..p.n {
            p.copy(io.gy, s * m, target, off, m, true);
        }
        if io.needs_gx[0] {
            p.copy(io.gy, 0, io.gx[0], 0, p.n * m, io.acc[0]);
        }
    }
}

/// Prepends the parameter P [1, 1, D] as token 0 (torch.cat at dim 1).
pub struct ClsTokenUnit;

fn cls(node: &Node) -> usize {
    match node.op {
        Op::ClsToken { param } => param,
        _ => unreachable!("cls_token unit on {}", node.kind()),
    }
}

/// Per sample: p, then the sample's rows of x.
fn prepend(x: &[f64], p: &[f64], per: usize) -> Vec<f64> {
    let mut y = Vec::with_capacity(x.len() / per.max(1) * (per + p.len()) + p.len());
    for s in x.chunks(per) {
        y.extend_from_slice(p);
        y.extend_from_slice(s);
    }
    y
}

/// The adjoint of `prepend`: token 0 of every sample summed into `dst`,
/// the other rows returned.
fn split_first(g: &[f64], dst: &mut [f64], per_out: usize) -> Vec<f64> {
    let d = dst.len();
    let mut gx = Vec::with_capacity(g.len());
    for s in g.chunks(per_out) {
        dst.iter_mut().zip(&s[..d]).for_each(|(a, b)| *a += b);
        gx.extend_from_slice(&s[d..]);
    }
    gx
}

impl Layer for ClsTokenUnit {
    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let p = cx.param(cx.theta, cls(node));
        (prepend(xs[0], p, node.in_shape.numel()), none())
    }
    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        prepend(dxs[0], cx.param(v, cls(node)), node.in_shape.numel())
    }
    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let per = node.out_shape.numel();
        vec![split_first(gy, cx.param_mut(grad, cls(node)), per)]
    }
    affine_r_backward!();
    // GPU: block copies (shaders/channels.wgsl): the samples' rows after
    // P's; the adjoint of P the samples' token-0 rows, added in sample
    // order (deterministic).
    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        plan_prepend(p, node, io.x[0], p.theta, io.y);
    }
    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        // A zero ẋ is read as the zero buffer it is.
        plan_prepend(p, node, io.dx[0], p.v, io.dy);
        false
    }
    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let (per_in, per_out) = (node.in_shape.numel(), node.out_shape.numel());
        let (d, off) = (per_out - per_in, p.param_off(cls(node)));
        let target = p.target(r);
        for s in 0..p.n {
            p.copy(io.gy, s * per_out, target, off, d, true);
        }
        if io.needs_gx[0] {
            block_copy(
                p,
                io.gy,
                io.gx[0],
                p.n,
                per_in,
                (per_out, d),
                (per_in, 0),
                io.acc[0],
                false,
            );
        }
    }
}

/// dst = per sample, the parameter row of `params` then the sample's rows
/// of x.
fn plan_prepend(p: &mut Plan, node: &Node, x: usize, params: usize, dst: usize) {
    let (per_in, per_out) = (node.in_shape.numel(), node.out_shape.numel());
    let (d, off) = (per_out - per_in, p.param_off(cls(node)));
    block_copy(
        p,
        x,
        dst,
        p.n,
        per_in,
        (per_in, 0),
        (per_out, d),
        false,
        false,
    );
    block_copy(p, params, dst, p.n, d, (0, off), (per_out, 0), false, false);
}
