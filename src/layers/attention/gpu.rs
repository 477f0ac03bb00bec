//! The GPU plan of multi-head attention: shaders/attention.wgsl, a
//! workgroup per (sample, head, query row) for the forward, the R-forward
//! and the row halves of the two backward passes (gq, R(gq)), and per
//! (sample, head, key column) for their column halves (gk, gv and their
//! R-forms), which would otherwise need atomics.
//!
//! The kernels read q | k | v fused ([T, 3D], the single-input form). The
//! three-input form packs its inputs into that layout first (block copies
//! into state buffers, tangents likewise) and unpacks the adjoints after,
//! so one input given twice (`mha(x, x, x)`) adds its adjoints in turn.
//!
//! State per workspace: P [n, H, T, T]; per tangent Ṗ; the three-input
//! form's packed values, tangents and adjoints. gS and R(gS), which pass
//! only from a backward's rows kernel to its columns kernel, live in the
//! layers' shared scratch (`Plan::partials`, a slice per tangent).

use crate::dispatch::kernels::{AttnParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::error::Result;
use crate::layers::channels::block_copy;
use crate::layers::{unsupported, StateBuf};
use crate::model::{Node, Op};

/// Longest sequence: a row of scores sits in workgroup memory (`TMAX`).
pub const T_MAX: usize = 1024;
/// Widest head: a row of q (or gO) sits in workgroup memory.
pub const E_MAX: usize = 256;

/// (tokens, width D, heads, head width, causal, fused).
fn geo(node: &Node) -> (usize, usize, usize, usize, bool, bool) {
    let Op::Mha { heads, causal } = node.op else {
        unreachable!("mha unit on {}", node.kind())
    };
    let (t, d) = (node.out_shape.tokens(), node.out_shape.features());
    (t, d, heads, d / heads, causal, node.inputs.len() == 1)
}

/// The shapes the kernels compute: at most `T_MAX` tokens and heads of at
/// most `E_MAX` features.
pub fn check(node: &Node) -> Result<()> {
    let (t, _, heads, e, _, _) = geo(node);
    if t > T_MAX {
        return Err(unsupported(
            node,
            format!(
                "{t} tokens: the GPU attention kernels hold a row of scores in \
                 workgroup memory, at most {T_MAX} tokens (--backend cpu computes it)"
            ),
        ));
    }
    if e > E_MAX {
        return Err(unsupported(
            node,
            format!(
                "heads of {e} features ({heads} heads): the GPU attention kernels take \
                 at most {E_MAX} (--backend cpu computes it)"
            ),
        ));
    }
    Ok(())
}

/// The kernels' parameters for this batch.
pub fn params(n: usize, node: &Node) -> AttnParams {
    let (t, d, heads, e, causal, _) = geo(node);
    AttnParams {
        n: n as u32,
        t: t as u32,
        d: d as u32,
        heads: heads as u32,
        e: e as u32,
        causal: causal as u32,
        pt: (n * heads * t * t) as u32,
        scale: (1.0 / (e as f64).sqrt()) as f32,
    }
}

/// Workgroups of every attention kernel: one per (sample, head, token).
pub fn grid(ap: &AttnParams) -> Grid {
    Grid::Groups((ap.n * ap.heads * ap.t) as usize)
}

/// Floats of shared scratch: gS, then R(gS).
pub fn scratch(node: &Node, n: usize) -> usize {
    let (t, _, heads, ..) = geo(node);
    2 * n * heads * t * t
}

/// P; Ṗ per tangent; the three-input form's packed q | k | v, its tangent
/// and its adjoint.
pub fn state(node: &Node, n: usize) -> Vec<StateBuf> {
    let (t, d, heads, _, _, fused) = geo(node);
    let pt = n * heads * t * t;
    let mut s = vec![
        StateBuf {
            name: "P",
            len: pt,
            init: None,
            tangent: false,
        },
        StateBuf {
            name: "Ṗ",
            len: pt,
            init: None,
            tangent: true,
        },
    ];
    if !fused {
        let len = n * t * 3 * d;
        s.push(StateBuf {
            name: "q | k | v",
            len,
            init: None,
            tangent: false,
        });
        for name in ["R(q | k | v)", "adjoint of q | k | v"] {
            s.push(StateBuf {
                name,
                len,
                init: None,
                tangent: true,
            });
        }
    }
    s
}

/// Copies the three inputs `src` ([T, D] each) into `dst` as q | k | v.
fn pack(p: &mut Plan, node: &Node, src: &[usize], dst: usize) {
    let (t, d, ..) = geo(node);
    let rows = p.n * t;
    for (w, &s) in src.iter().enumerate() {
        block_copy(p, s, dst, rows, d, (d, 0), (3 * d, w * d), false, false);
    }
}

/// The fused values, packed first in the three-input form.
fn values(p: &mut Plan, node: &Node, io: &NodeBufs, pack_now: bool) -> usize {
    if io.x.len() == 1 {
        return io.x[0];
    }
    if pack_now {
        pack(p, node, &io.x, io.state[2]);
    }
    io.state[2]
}

pub fn forward(p: &mut Plan, node: &Node, io: &NodeBufs) {
    let ap = params(p.n, node);
    let x = values(p, node, io, true);
    p.push(
        Kernel::AttnForward,
        &ap,
        vec![x, io.state[0], io.y],
        grid(&ap),
    );
}

/// ẏ, and Ṗ for the R-backward: always computed (a zero ẋ is read as the
/// zeros its buffer holds), so never reported zero.
pub fn r_forward(p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
    let ap = params(p.n, node);
    let x = values(p, node, io, false);
    let dx = if io.dx.len() == 1 {
        io.dx[0]
    } else {
        pack(p, node, &io.dx, io.state[3]);
        io.state[3]
    };
    p.push(
        Kernel::AttnRForward,
        &ap,
        vec![x, dx, io.state[0], io.state[1], io.dy],
        grid(&ap),
    );
    false
}

pub fn backward(p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
    if !io.needs_gx.iter().any(|&b| b) {
        return;
    }
    let ap = params(p.n, node);
    let fused = io.x.len() == 1;
    let x = values(p, node, io, false);
    let (dx, gx, acc) = if fused {
        (io.dx[0], io.gx[0], io.acc[0])
    } else {
        (io.state[3], io.state[4], false)
    };
    let (ps, pd, sc) = (io.state[0], io.state[1], p.partials);
    let g = grid(&ap);
    let with = |which: u32| Consts::acc(acc).with("WHICH", which);
    if r {
        p.push_with(
            Kernel::AttnRBackwardRows,
            Consts::acc(acc),
            &ap,
            vec![x, dx, ps, pd, io.g, io.gy, sc, gx],
            g,
        );
        for which in 0..2 {
            p.push_with(
                Kernel::AttnRBackwardCols,
                with(which),
                &ap,
                vec![x, dx, ps, pd, io.g, io.gy, sc, gx],
                g,
            );
        }
    } else {
        p.push_with(
            Kernel::AttnBackwardRows,
            Consts::acc(acc),
            &ap,
            vec![x, ps, io.gy, sc, gx],
            g,
        );
        for which in 0..2 {
            p.push_with(
                Kernel::AttnBackwardCols,
                with(which),
                &ap,
                vec![x, ps, io.gy, sc, gx],
                g,
            );
        }
    }
    if !fused {
        let (t, d, ..) = geo(node);
        for w in 0..3 {
            if io.needs_gx[w] {
                let n = p.n;
                block_copy(
                    p,
                    gx,
                    io.gx[w],
                    n * t,
                    d,
                    (3 * d, w * d),
                    (d, 0),
                    io.acc[w],
                    false,
                );
            }
        }
    }
}
