//! The parameter-sized arrays of an engine (θ, v, the gradient, Hv) and
//! their host reads and writes. Where each fits in one storage binding
//! (`max_storage_buffer_binding_size`) they are one buffer each, exactly
//! as before. Where one does not (wide_resnet50_2's 275 MB of θ on lavapipe's
//! 128 MiB bindings), each is held as several buffers split between nodes,
//! so that every node's parameters lie in one chunk: the walker binds the
//! chunk of the node being planned and rebases its parameter offsets
//! (`Plan::enter_node`, `Plan::param_off`), and the kernels, their
//! parameters' layout and the arithmetic stay those of the single buffer.
//! A linear layer (flat, or nn.Linear on a sequence) or a token embedding
//! whose own parameters exceed a binding is split by rows
//! (`layers::linear_rows`, `layers::embedding`; a tied weight such as
//! GPT-2's wte/lm_head when every node reading it runs so); any other
//! node is refused, naming its largest tensor.

use crate::error::{Error, Result};
use crate::gpu::context::{GpuBuffer, GpuContext};
use crate::gpu::kernels::WINDOW_FLOATS;
use crate::gpu::memory::Arena;
use crate::gpu::plan::{ParamChunk, ParamSplit};
use crate::model::{Model, Op};

pub struct ParamBufs {
    /// One chunk (the whole vector) unless split.
    pub chunks: Vec<ParamChunk>,
    pub split: Option<ParamSplit>,
}

/// Floats a storage binding may hold on this device.
fn binding_floats(ctx: &GpuContext) -> usize {
    (ctx.limits.max_storage_buffer_binding_size / 4) as usize
}

/// Whether today's single buffers fit: θ and v (padded by a uniform
/// window) and `kmax` slices of v and Hv.
pub fn fits(ctx: &GpuContext, np: usize, kmax: usize) -> bool {
    let lim = binding_floats(ctx);
    np.max(1) + WINDOW_FLOATS <= lim && np.max(1).saturating_mul(kmax) <= lim
}

/// The parameter ranges that must not be split: each parameter tensor
/// (each row of a weight in `rows`, given with its row length), and every
/// node's parameters together (its passes bind one chunk) but for those
/// split by rows, merged where they overlap; sorted, as `(start, end,
/// largest tensor)`.
fn segments(
    model: &Model,
    node_params: &[Vec<usize>],
    rows: &[(usize, usize)],
) -> Vec<(usize, usize, usize)> {
    let mut iv: Vec<(usize, usize, usize)> = vec![];
    let span = |i: usize| {
        let p = &model.params[i];
        (p.offset, p.offset + p.numel())
    };
    for (i, _) in model.params.iter().enumerate() {
        let (a, b) = span(i);
        match rows.iter().find(|r| r.0 == i) {
            Some(&(_, cols)) => iv.extend((a..b).step_by(cols).map(|r| (r, r + cols, i))),
            None => iv.push((a, b, i)),
        }
    }
    let split = |ps: &Vec<usize>| ps.iter().any(|i| rows.iter().any(|r| r.0 == *i));
    for ps in node_params.iter().filter(|ps| !ps.is_empty() && !split(ps)) {
        let a = ps.iter().map(|&i| span(i).0).min().unwrap_or(0);
        let b = ps.iter().map(|&i| span(i).1).max().unwrap_or(0);
        let big = *ps.iter().max_by_key(|&&i| span(i).1 - span(i).0).unwrap();
        iv.push((a, b, big));
    }
    iv.sort();
    let mut out: Vec<(usize, usize, usize)> = vec![];
    for (a, b, big) in iv {
        match out.last_mut() {
            Some(last) if a < last.1 => {
                let size = |i: usize| model.params[i].numel();
                if size(big) > size(last.2) {
                    last.2 = big;
                }
                last.1 = last.1.max(b);
            }
            _ => out.push((a, b, big)),
        }
    }
    out
}

/// The weight a node can run by blocks of its rows, with the row length:
/// a flat linear layer's, a sequence nn.Linear's (not a Conv1D's: its
/// stored rows are input features) and a token embedding's.
fn row_weight(op: &Op) -> Option<(usize, usize)> {
    match *op {
        Op::Linear { weight, din, .. } => Some((weight, din)),
        Op::SeqLinear {
            weight,
            din,
            transposed: false,
            ..
        } => Some((weight, din)),
        Op::Embedding { weight, dim, .. } => Some((weight, dim)),
        _ => None,
    }
}

/// The weights to be split by rows: those of the layers whose parameters
/// exceed `cap` floats that run by row blocks (`row_weight`), with their
/// row length. A weight another node also reads (a tied one) is split
/// only where every node reading it runs by row blocks of the same rows
/// (GPT-2's token embedding and lm_head).
fn row_split(model: &Model, node_params: &[Vec<usize>], cap: usize) -> Vec<(usize, usize)> {
    let mut out: Vec<(usize, usize)> = vec![];
    for (i, node) in model.nodes.iter().enumerate() {
        let Some((weight, cols)) = row_weight(&node.op) else {
            continue;
        };
        let total: usize = node_params[i]
            .iter()
            .map(|&p| model.params[p].numel())
            .sum();
        let readers_split = node_params.iter().enumerate().all(|(j, ps)| {
            !ps.contains(&weight) || row_weight(&model.nodes[j].op) == Some((weight, cols))
        });
        if total > cap && readers_split && cols > 0 && !out.iter().any(|r| r.0 == weight) {
            out.push((weight, cols));
        }
    }
    out
}

/// Splits `0..np` at segment bounds into chunks whose buffers, from the
/// chunk's start rounded down to `align`, hold at most `cap` floats.
fn chunk_spans(
    model: &Model,
    segs: &[(usize, usize, usize)],
    cap: usize,
    align: usize,
    kmax: usize,
    limit: u64,
) -> Result<Vec<(usize, usize)>> {
    let mut spans = vec![];
    let mut start = 0;
    let mut i = 0;
    while i < segs.len() {
        let mut end = start;
        let base = start / align * align;
        while i < segs.len() && segs[i].1 - base <= cap {
            end = segs[i].1;
            i += 1;
        }
        if end == start {
            let (a, b, big) = segs[i];
            let p = &model.params[big];
            let what = if b - a == p.numel() {
                format!("{} (one tensor: a binding cannot split it)", p.name)
            } else {
                format!(
                    "the parameters of one layer with {} (its passes bind them together)",
                    p.name
                )
            };
            return Err(Error::DeviceLimit {
                tensor: what,
                bytes: 4 * ((b - base) + WINDOW_FLOATS).max((b - base) * kmax) as u64,
                limit_name: "max_storage_buffer_binding_size",
                limit,
            });
        }
        spans.push((start, end - start));
        start = end;
    }
    if spans.is_empty() {
        spans.push((0, model.n_params));
    }
    Ok(spans)
}

impl ParamBufs {
    /// Allocates θ, v, the gradient and Hv for `kmax` tangents: one buffer
    /// each where they fit, else chunks (`node_params` says which
    /// parameters each node addresses; asked only then). With a block size
    /// chosen for the user (`shrink`), one too large for the largest
    /// chunk is lowered. Returns the buffers and the block size.
    pub fn new(
        ctx: &GpuContext,
        arena: &mut Arena,
        model: &Model,
        n: usize,
        kmax: usize,
        shrink: bool,
        node_params: impl FnOnce() -> Vec<Vec<usize>>,
    ) -> Result<(ParamBufs, usize)> {
        let np = model.n_params;
        if fits(ctx, np, kmax) {
            let theta = arena.weights(ctx, "parameters θ", np)?;
            // A block product reads v from storage (one slice per tangent).
            let v = if kmax > 1 {
                arena.alloc_tangent(ctx, "directions v".into(), np, kmax)?
            } else {
                arena.weights(ctx, "direction v", np)?
            };
            let grad = arena.alloc(ctx, "gradient".into(), np)?;
            let hv = arena.alloc_tangent(ctx, "Hv".into(), np, kmax)?;
            let chunks = vec![ParamChunk {
                base: 0,
                start: 0,
                len: np,
                theta,
                v,
                grad,
                hv,
            }];
            return Ok((
                ParamBufs {
                    chunks,
                    split: None,
                },
                kmax,
            ));
        }
        let node_params = node_params();
        let lim = binding_floats(ctx);
        let limit = ctx.limits.max_storage_buffer_binding_size;
        let align = ctx.window_alignment();
        let rows = row_split(
            model,
            &node_params,
            lim.saturating_sub(WINDOW_FLOATS + align),
        );
        let segs = segments(model, &node_params, &rows);
        let largest = segs.iter().map(|s| s.1 - s.0).max().unwrap_or(1).max(1);
        let kmax = match (rows.first(), shrink) {
            (Some(_), true) => 1,
            (Some(&(w, _)), false) if kmax > 1 => {
                return Err(Error::DeviceLimit {
                    tensor: format!(
                        "{} (split by rows between bindings: block products take one tangent here)",
                        model.params[w].name
                    ),
                    bytes: 4 * (model.params[w].numel() * kmax) as u64,
                    limit_name: "max_storage_buffer_binding_size",
                    limit,
                })
            }
            (_, true) => kmax.min(lim / (largest + align)).max(1),
            _ => kmax,
        };
        let cap = (lim.saturating_sub(WINDOW_FLOATS)).min(lim / kmax);
        let spans = chunk_spans(model, &segs, cap, align, kmax, limit)?;
        let mut chunks = vec![];
        for (c, &(start, len)) in spans.iter().enumerate() {
            let tag = format!(
                " (part {} of {}, floats {start}..{})",
                c + 1,
                spans.len(),
                start + len
            );
            let base = start / align * align;
            let blen = start + len - base;
            let theta = arena.weights(ctx, &format!("parameters θ{tag}"), blen)?;
            let v = if kmax > 1 {
                arena.alloc_tangent(ctx, format!("directions v{tag}"), blen, kmax)?
            } else {
                arena.weights(ctx, &format!("direction v{tag}"), blen)?
            };
            let grad = arena.alloc(ctx, format!("gradient{tag}"), blen)?;
            let hv = arena.alloc_tangent(ctx, format!("Hv{tag}"), blen, kmax)?;
            chunks.push(ParamChunk {
                base,
                start,
                len,
                theta,
                v,
                grad,
                hv,
            });
        }
        let is_split = |ps: &Vec<usize>| ps.iter().any(|i| rows.iter().any(|r| r.0 == *i));
        let node_chunk = node_params
            .iter()
            .map(|ps| {
                if is_split(ps) {
                    return None;
                }
                let first = *ps.first()?;
                let off = model.params[first].offset;
                chunks
                    .iter()
                    .position(|c| off >= c.start && off < c.start + c.len.max(1))
            })
            .collect();
        let mut blocks = vec![];
        for &(w, cols) in &rows {
            let (a, b) = (
                model.params[w].offset,
                model.params[w].offset + model.params[w].numel(),
            );
            let mut list = vec![];
            for (ci, c) in chunks.iter().enumerate() {
                let (lo, hi) = (a.max(c.start), b.min(c.start + c.len));
                if lo < hi {
                    list.push(((lo - a) / cols, (hi - a) / cols, ci));
                }
            }
            blocks.push((w, list));
        }
        // A block's outputs for every sample (every token of a sequence).
        let samples = |w: usize| {
            model
                .nodes
                .iter()
                .map(|nd| match nd.op {
                    Op::Linear { weight, .. } if weight == w => n,
                    Op::SeqLinear { weight, .. } if weight == w => n * nd.in_shape.tokens(),
                    _ => 0,
                })
                .max()
                .unwrap_or(0)
        };
        let scratch = blocks
            .iter()
            .flat_map(|b| b.1.iter().map(|r| (r.1 - r.0) * samples(b.0)))
            .max()
            .unwrap_or(0)
            .max(1);
        let row_scratch = [
            arena.alloc(ctx, "row-block scratch a".into(), scratch)?,
            arena.alloc(ctx, "row-block scratch b".into(), scratch)?,
        ];
        let split = Some(ParamSplit {
            chunks: chunks.clone(),
            node_chunk,
            rows: blocks,
            row_scratch,
        });
        Ok((ParamBufs { chunks, split }, kmax))
    }

    /// Floats of the weight-gradient partial sums: each unit's
    /// `gpu_scratch`, a row block's for a linear layer split by rows (a
    /// sequence one's over the batch's samples · tokens; an embedding
    /// needs none).
    pub fn partial_floats(&self, model: &Model, n: usize) -> usize {
        let rows = self.split.as_ref().map_or(&[][..], |s| &s.rows[..]);
        let split_rows = |w: usize| rows.iter().find(|r| r.0 == w).map(|r| &r.1);
        model
            .nodes
            .iter()
            .map(|nd| {
                let blocks = row_weight(&nd.op).and_then(|(w, _)| split_rows(w));
                let (din, m) = match nd.op {
                    Op::Linear { din, .. } => (din, n),
                    Op::SeqLinear { din, .. } => (din, n * nd.in_shape.tokens()),
                    _ => (0, 0),
                };
                match blocks {
                    Some(_) if din == 0 => 0,
                    Some(r) => r
                        .iter()
                        .map(|b| crate::layers::linear_rows::partial_floats((b.1 - b.0) * din, m))
                        .max()
                        .unwrap_or(0),
                    None => crate::layers::unit(&nd.op).gpu_scratch(nd, n),
                }
            })
            .max()
            .unwrap_or(0)
            .max(1)
    }

    /// The buffers a plan starts from (the first chunk's).
    pub fn first(&self) -> ParamChunk {
        self.chunks[0]
    }

    /// Writes θ.
    pub fn write_theta(&self, ctx: &GpuContext, arena: &Arena, theta: &[f32]) -> Result<()> {
        for c in &self.chunks {
            let part = &theta[c.start..c.start + c.len];
            ctx.write_f32(&arena.buffers[c.theta], c.start - c.base, part)?;
        }
        Ok(())
    }

    /// Writes direction `v` into tangent slice `k`.
    pub fn write_v(&self, ctx: &GpuContext, arena: &Arena, k: usize, v: &[f32]) -> Result<()> {
        for c in &self.chunks {
            let part = &v[c.start..c.start + c.len];
            let blen = c.start + c.len - c.base;
            ctx.write_f32(&arena.buffers[c.v], k * blen + c.start - c.base, part)?;
        }
        Ok(())
    }

    /// Zeroes the gradient and/or Hv.
    pub fn clear(&self, enc: &mut wgpu::CommandEncoder, arena: &Arena, grad: bool, hv: bool) {
        for c in &self.chunks {
            if grad {
                enc.clear_buffer(&arena.buffers[c.grad].buffer, 0, None);
            }
            if hv {
                enc.clear_buffer(&arena.buffers[c.hv].buffer, 0, None);
            }
        }
    }

    /// The read ranges of the gradient (`hv` false) or of the first
    /// `tangents` slices of Hv, in the order of the flat vector(s).
    pub fn ranges<'b>(
        &self,
        arena: &'b Arena,
        hv: bool,
        tangents: usize,
    ) -> Vec<(&'b GpuBuffer, usize, usize)> {
        if let [c] = self.chunks[..] {
            let b = if hv { c.hv } else { c.grad };
            return vec![(&arena.buffers[b], 0, tangents * c.len)];
        }
        let mut out = vec![];
        for k in 0..tangents {
            for c in &self.chunks {
                let b = if hv { c.hv } else { c.grad };
                let blen = c.start + c.len - c.base;
                out.push((&arena.buffers[b], k * blen + c.start - c.base, c.len));
            }
        }
        out
    }
}

/// `plan::node_params` for an engine's model at batches of up to `n`.
pub fn probe(
    model: &Model,
    canon: &[usize],
    n: usize,
    scx: &crate::layers::StateCx,
) -> Vec<Vec<usize>> {
    let probe = std::cell::RefCell::new(vec![]);
    let mut p = crate::gpu::plan::Plan::new(model, n, 0, 0, 0, 0, 0, 0, scx.batch_mode, None);
    p.frozen = scx.frozen;
    p.probe = Some(&probe);
    let state: Vec<usize> = model
        .nodes
        .iter()
        .map(|nd| crate::layers::unit(&nd.op).gpu_state(nd, n, scx).len())
        .collect();
    crate::gpu::plan::node_params(p, canon, &state)
}
