//! Hessian-vector sweeps of the float64 engine: H·v for one or several
//! directions over the whole data set, each batch's forward state — its
//! values, the units' saved states, every node's output adjoint and the
//! softmax — computed once per θ and, where the memory allows, kept
//! between products (as the GPU engine keeps its forward per batch): an
//! HVP sweep over the same batches then runs only the R-forward and the
//! R-backward per product.
//!
//! The cache is keyed on everything the forward reads (θ, the buffers,
//! the data, the batch size, the BN mode, the forced decisions and masks),
//! compared in full before each use, so a caller that moves θ or swaps the
//! data (the trainer, trace-grad's finite differences) gets a fresh
//! forward, never a stale one. Every sum is taken in the order of
//! [`CpuReference::pass`], so a cached product equals an uncached one bit
//! for bit (tests/cpu_fast.rs).

use super::{add_into, slices, CpuReference};
use crate::engine::BnMode;
use crate::error::{Error, Result};
use crate::layers::{self, next_token, Decision, Saved};
use crate::operator::Operator;

/// What a batch's R-passes read at one θ: its forward and plain backward.
pub(super) struct BatchState {
    /// The input, then every node's output.
    vals: Vec<Vec<f64>>,
    /// Each node's saved state (batch norm adds its R-forward's per tangent).
    saved: Vec<Saved>,
    /// Each node's output adjoint; None where no adjoint reaches it.
    gys: Vec<Option<Vec<f64>>>,
    /// The softmax of the logits.
    p: Vec<f64>,
    /// The batch's loss (times 1/N).
    loss: f64,
}

impl BatchState {
    /// Bytes held, estimated: the values and adjoints exactly, and what
    /// the units save as one more float per value (batch norm's x̂ and its
    /// R-forward's x̂̇ on its nodes, masks elsewhere).
    fn bytes(&self) -> u64 {
        let vals: usize = self.vals.iter().map(Vec::len).sum();
        let gys: usize = self.gys.iter().flatten().map(Vec::len).sum();
        ((2 * vals + gys + self.p.len()) * 8) as u64
    }
}

/// Everything a batch's forward state depends on.
struct Key {
    theta: Vec<f64>,
    buffers: Vec<Vec<f64>>,
    x: Vec<f32>,
    y: Vec<u32>,
    batch: usize,
    bn: BnMode,
    relu_masks: Option<Vec<Vec<Vec<bool>>>>,
    frozen: Option<Vec<Vec<Decision>>>,
}

impl Key {
    fn of(r: &CpuReference) -> Key {
        let pr = &r.problem;
        Key {
            theta: pr.weights.theta.clone(),
            buffers: pr.weights.buffers.clone(),
            x: pr.data.x.clone(),
            y: pr.data.y.clone(),
            batch: pr.batch,
            bn: pr.bn,
            relu_masks: r.relu_masks.clone(),
            frozen: r.frozen.clone(),
        }
    }

    fn matches(&self, r: &CpuReference) -> bool {
        let pr = &r.problem;
        self.batch == pr.batch
            && self.bn == pr.bn
            && self.theta == pr.weights.theta
            && self.buffers == pr.weights.buffers
            && self.y == pr.data.y
            && self.x == pr.data.x
            && self.relu_masks == r.relu_masks
            && self.frozen == r.frozen
    }
}

/// The batches' forward states at one θ (a prefix of them where memory
/// runs short: the rest are recomputed per product).
#[derive(Default)]
pub(super) struct SweepCache {
    key: Option<Key>,
    batches: Vec<Option<BatchState>>,
    /// Bytes the cache may still take.
    room: u64,
}

/// Whether the products cache their forward states, by default: yes,
/// unless `HESSCOPE_CPU_CACHE=0` (for measuring what the cache saves).
fn cache_enabled() -> bool {
    !matches!(std::env::var("HESSCOPE_CPU_CACHE").as_deref(), Ok("0"))
}

impl CpuReference {
    /// H·vs[j] for every j over one sweep: per batch its forward state
    /// (one forward pass and one plain backward pass, its adjoints kept
    /// per node; from the cache when θ and the data are those it was
    /// taken at), then per tangent an R-forward and an R-backward that
    /// reuse it. Each tangent's R-forward runs right before its own
    /// R-backward (a unit's R-forward may leave state for its R-backward,
    /// as batch norm does), and every sum is taken in the order of
    /// [`CpuReference::pass`], so each output equals a single `hvp` bit for
    /// bit.
    pub fn hv_block(&self, vs: &[&[f64]]) -> Result<Vec<Vec<f64>>> {
        self.products(vs, Operator::Hessian)
    }

    /// [`CpuReference::hv_block`] for any curvature matrix
    /// (`crate::operator`): per tangent one R-forward pass; for H its
    /// R-backward, for G = Jᵀ H_L J a plain backward pass of the loss
    /// Hessian's product at the logits (the R-adjoint there) with the
    /// forward's saved states, for E = H − G both from that one R-forward.
    pub fn products(&self, vs: &[&[f64]], op: Operator) -> Result<Vec<Vec<f64>>> {
        let pr = &self.problem;
        let np = pr.model.n_params;
        for v in vs {
            if v.len() != np {
                return Err(Error::Invalid {
                    what: "direction v",
                    msg: format!("{} values for {np} parameters", v.len()),
                });
            }
        }
        let mut hvs = vec![vec![0.0; np]; vs.len()];
        if vs.is_empty() {
            return Ok(hvs);
        }
        let scale = 1.0 / pr.data.len() as f64;
        let mut total = 0.0;
        let batches = pr.data.batches(pr.batch);
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        let mut enabled = cache_enabled();
        if !enabled || !cache.key.as_ref().is_some_and(|k| k.matches(self)) {
            *cache = SweepCache::default();
            // Half of what the host has left beyond the passes' own peak,
            // less the key's copies of θ and the data; no cache (and no
            // copies) where that would not hold one batch.
            let have = crate::host::available_memory().unwrap_or(0) as u64;
            let room = have.saturating_sub(Self::host_bytes(pr)) / 2;
            let key_bytes = 4 * (pr.data.x.len() + pr.data.y.len()) as u64
                + 8 * (pr.weights.theta.len() as u64);
            let one =
                (Self::values_per_sample(&pr.model) * pr.batch.min(pr.data.len()) * 24) as u64;
            enabled &= room >= key_bytes.saturating_add(one);
            if enabled {
                cache.room = room - key_bytes;
                cache.key = Some(Key::of(self));
            }
            cache.batches = (0..batches.len()).map(|_| None).collect();
        }
        for (bi, &(start, count)) in batches.iter().enumerate() {
            let mut fresh = None;
            let st = match cache.batches[bi].as_mut() {
                Some(st) => st,
                None => fresh.insert(self.batch_state(bi, start, count, scale)),
            };
            total += st.loss;
            self.tangents(st, count, scale, vs, &mut hvs, op);
            if let Some(st) = fresh {
                let b = st.bytes();
                if enabled && b <= cache.room {
                    cache.room -= b;
                    cache.batches[bi] = Some(st);
                }
            }
        }
        if !total.is_finite() {
            return Err(Error::Numerical(format!(
                "the loss is {total}: the weights or data overflow in float64"
            )));
        }
        Ok(hvs)
    }

    /// Drops the cached forward states (they are also dropped, and
    /// retaken, whenever θ, the data or the forced decisions change).
    pub fn clear_cache(&self) {
        *self.cache.lock().unwrap_or_else(|e| e.into_inner()) = SweepCache::default();
    }

    /// A batch's forward state: its forward pass, loss and plain backward
    /// (every node's output adjoint kept; the gradient itself discarded).
    fn batch_state(&self, bi: usize, start: usize, count: usize, scale: f64) -> BatchState {
        let pr = &self.problem;
        let nodes = &pr.model.nodes;
        let cx = self.cx(count, None, None, None);
        let (vals, saved) = self.forward(Some(bi), start, count);
        let nv = vals.len();
        let (loss, gz, p) =
            next_token::forward_backward(&pr.model, &pr.data, start, count, &vals[nv - 1], scale);
        let mut adj: Vec<Option<Vec<f64>>> = vec![None; nv];
        adj[nv - 1] = Some(gz);
        let mut gys: Vec<Option<Vec<f64>>> = vec![None; nodes.len()];
        let mut grad = vec![0.0; pr.model.n_params];
        for (ni, node) in nodes.iter().enumerate().rev() {
            let Some(gy) = adj[ni + 1].take() else {
                continue;
            };
            let xs = slices(&node.inputs, &vals);
            let gxs = layers::unit(&node.op).backward(&cx, node, &xs, &saved[ni], &gy, &mut grad);
            for (&i, g) in node.inputs.iter().zip(gxs) {
                add_into(&mut adj[i], g);
            }
            gys[ni] = Some(gy);
        }
        BatchState {
            vals,
            saved,
            gys,
            p,
            loss,
        }
    }

    /// Per tangent of a batch: its R-forward, then its R-backward, H·vs[j]
    /// of the batch added into `hvs[j]`.
    fn tangents(
        &self,
        st: &mut BatchState,
        count: usize,
        scale: f64,
        vs: &[&[f64]],
        hvs: &mut [Vec<f64>],
        op: Operator,
    ) {
        let pr = &self.problem;
        let nodes = &pr.model.nodes;
        let cx = self.cx(count, None, None, None);
        let nv = st.vals.len();
        let vals = &st.vals;
        for (v, hv) in vs.iter().zip(hvs.iter_mut()) {
            let mut dvals: Vec<Vec<f64>> = Vec::with_capacity(nv);
            dvals.push(vec![0.0; vals[0].len()]);
            for (ni, node) in nodes.iter().enumerate() {
                let dy = layers::unit(&node.op).r_forward(
                    &cx,
                    node,
                    &slices(&node.inputs, vals),
                    &slices(&node.inputs, &dvals),
                    v,
                    &mut st.saved[ni],
                );
                dvals.push(dy);
            }
            // H_L·(J v) at the logits: the loss's R-adjoint.
            let rz = next_token::r_backward(&pr.model, count, &st.p, &dvals[nv - 1], scale);
            if op != Operator::Hessian {
                // Jᵀ(H_L J v): the plain backward pass of that adjoint.
                let mut g = vec![0.0; hv.len()];
                let target: &mut [f64] = if op == Operator::Ggn {
                    &mut hv[..]
                } else {
                    &mut g[..]
                };
                let mut adj: Vec<Option<Vec<f64>>> = vec![None; nv];
                adj[nv - 1] = Some(rz.clone());
                for (ni, node) in nodes.iter().enumerate().rev() {
                    let Some(gy) = adj[ni + 1].take() else {
                        continue;
                    };
                    let xs = slices(&node.inputs, vals);
                    let gxs =
                        layers::unit(&node.op).backward(&cx, node, &xs, &st.saved[ni], &gy, target);
                    for (&i, g) in node.inputs.iter().zip(gxs) {
                        add_into(&mut adj[i], g);
                    }
                }
                if op == Operator::Ggn {
                    continue;
                }
                // E = H − G: G of this batch taken off before H is added.
                hv.iter_mut().zip(&g).for_each(|(a, b)| *a -= b);
            }
            let mut radj: Vec<Option<Vec<f64>>> = vec![None; nv];
            radj[nv - 1] = Some(rz);
            for (ni, node) in nodes.iter().enumerate().rev() {
                let (Some(gy), Some(rgy)) = (st.gys[ni].as_deref(), radj[ni + 1].take()) else {
                    continue;
                };
                let rgxs = layers::unit(&node.op).r_backward(
                    &cx,
                    node,
                    &slices(&node.inputs, vals),
                    &slices(&node.inputs, &dvals),
                    &st.saved[ni],
                    gy,
                    &rgy,
                    v,
                    hv,
                );
                for (&i, r) in node.inputs.iter().zip(rgxs) {
                    add_into(&mut radj[i], r);
                }
            }
        }
    }
}
