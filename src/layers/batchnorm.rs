//! BatchNorm2d over [n, c, h·w], in batch mode (the batch's own statistics,
//! which depend on x) or running mode (an affine map). The derivation of
//! every pass is in `crate::ops::bn`; the kernels are shaders/bn.wgsl and
//! the statistics rows of shaders/reduce.wgsl (`kernels::bn_rows`).

use super::{saved, CpuCx, Layer, Saved, StateBuf, StateCx};
use crate::dispatch::kernels::{self, bn_rows, BnParams, Consts, Kernel, ReduceParams};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::model::{Node, Op};
use crate::ops::bn;

pub struct BatchNormUnit;

struct Bn {
    gamma: usize,
    beta: usize,
    running_mean: usize,
    running_var: usize,
    c: usize,
    eps: f64,
}

/// A batch-norm node's running-mode statistics rows as the GPU kernels
/// read them: the running mean, then 1/√(running var + ε), in float32,
/// from the model's buffers (`Model::buffers` order).
pub fn running_rows(node: &Node, buffers: &[Vec<f64>]) -> Vec<f32> {
    let b = of(node);
    let (m, inv) = bn::running_stats_eps(&buffers[b.running_mean], &buffers[b.running_var], b.eps);
    m.iter().chain(&inv).map(|&x| x as f32).collect()
}

/// A batch-mode node's float64 state as a replaying GPU plan reads it
/// instead of computing it (`Plan::bn_float64`), from the node's float64
/// input `x` of `n` samples, each value rounded once to float32: x̂, and
/// the statistics rows MEAN and S (μ, then 1/√(σ² + ε): `2c` floats from
/// the buffer's start) and VAR (σ², `c` floats at `bn_rows::VAR · c`).
/// Float32 arithmetic would take x − μ with the rounding of x relative to
/// |x|, and where a channel's spread σ is small against its values (tiny
/// late-stage maps times a small batch) that is amplified by |x|/σ
/// (BENCHMARKS.md, "torchvision's fifteen CNNs").
pub fn float64_state(node: &Node, n: usize, x: &[f64]) -> (Vec<f32>, Vec<f32>, Vec<f32>) {
    let b = of(node);
    let g = bn::BnGeom {
        n,
        c: b.c,
        hw: node.in_shape.spatial(),
    };
    let (mean, var) = bn::batch_moments(&g, x);
    let s = bn::scales_eps(&var, b.eps);
    let hw = g.hw.max(1);
    let xhat = x
        .iter()
        .enumerate()
        .map(|(i, &v)| {
            let ch = (i / hw) % g.c;
            ((v - mean[ch]) * s[ch]) as f32
        })
        .collect();
    let rows = mean.iter().chain(&s).map(|&v| v as f32).collect();
    (xhat, rows, var.iter().map(|&v| v as f32).collect())
}

fn of(node: &Node) -> Bn {
    match node.op {
        Op::BatchNorm {
            gamma,
            beta,
            running_mean,
            running_var,
            c,
            eps,
        } => Bn {
            gamma,
            beta,
            running_mean,
            running_var,
            c,
            eps,
        },
        _ => unreachable!("batch-norm unit on {}", node.kind()),
    }
}

fn geom(cx: &CpuCx, node: &Node) -> bn::BnGeom {
    bn::BnGeom {
        n: cx.n,
        c: of(node).c,
        hw: node.in_shape.spatial(),
    }
}

/// The float64 forward's state; the R-forward adds x̂̇ and mean(x̂ẋ).
struct BnSaved {
    s: Vec<f64>,
    /// Batch mode: the batch's per-channel mean and biased variance, which
    /// training folds into the running buffers ([`batch_moments`]).
    moments: Option<(Vec<f64>, Vec<f64>)>,
    /// Elements per channel of the whole batch (over every worker where
    /// `CpuCx::sync` spread it).
    count: f64,
    xhat: Vec<f64>,
    r: Option<(Vec<f64>, Vec<f64>)>,
}

fn add_into(dst: &mut [f64], src: &[f64]) {
    dst.iter_mut().zip(src).for_each(|(a, b)| *a += b);
}

/// A batch-mode forward's per-channel (mean, biased variance) over the
/// n·h·w elements of each channel, from the state it saved; `None` in
/// running mode or for another unit's state.
pub fn batch_moments(sv: &Saved) -> Option<(&[f64], &[f64])> {
    sv.downcast_ref::<BnSaved>()
        .and_then(|st| st.moments.as_ref())
        .map(|(m, v)| (m.as_slice(), v.as_slice()))
}

/// The per-channel reductions run one workgroup per channel along x only
/// (whole, or a split's second stage; src/dispatch/reduce.rs).
pub const MAX_CHANNELS: usize = 65_535;

impl Layer for BatchNormUnit {
    fn check(&self, node: &Node) -> crate::error::Result<()> {
        let c = of(node).c;
        if c > MAX_CHANNELS {
            return Err(super::unsupported(
                node,
                format!("{c} channels; the GPU batch-norm reductions take at most {MAX_CHANNELS}"),
            ));
        }
        Ok(())
    }

    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let b = of(node);
        let g = geom(cx, node);
        let mut count = g.n as f64 * g.hw as f64;
        let (mean, s, moments) = if cx.batch_mode {
            let (mean, var) = match cx.sync {
                Some(all_sum) => {
                    let (mean, var, m) = bn::batch_moments_synced(&g, xs[0], all_sum);
                    count = m;
                    (mean, var)
                }
                None => bn::batch_moments(&g, xs[0]),
            };
            let s = bn::scales_eps(&var, b.eps);
            (mean.clone(), s, Some((mean, var)))
        } else {
            let (mean, s) = bn::running_stats_eps(
                &cx.buffers[b.running_mean],
                &cx.buffers[b.running_var],
                b.eps,
            );
            (mean, s, None)
        };
        let (xhat, y) = bn::forward(
            &g,
            xs[0],
            &mean,
            &s,
            cx.param(cx.theta, b.gamma),
            cx.param(cx.theta, b.beta),
        );
        (
            y,
            Box::new(BnSaved {
                s,
                moments,
                count,
                xhat,
                r: None,
            }),
        )
    }

    fn r_forward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        v: &[f64],
        sv: &mut Saved,
    ) -> Vec<f64> {
        let b = of(node);
        let g = geom(cx, node);
        let st = sv
            .downcast_mut::<BnSaved>()
            .expect("batch-norm forward saved its state");
        let (xhd, dy, mxx) = bn::r_forward(
            &g,
            cx.batch_mode,
            dxs[0],
            &st.xhat,
            &st.s,
            cx.param(cx.theta, b.gamma),
            cx.param(v, b.gamma),
            cx.param(v, b.beta),
        );
        st.r = Some((xhd, mxx));
        dy
    }

    fn backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        sv: &Saved,
        gy: &[f64],
        grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let b = of(node);
        let st: &BnSaved = saved(sv, node);
        let gm = cx.param(cx.theta, b.gamma);
        let g = geom(cx, node);
        let (gx, dg, db) = match cx.sync {
            Some(all_sum) if cx.batch_mode => {
                bn::backward_synced(&g, gy, &st.xhat, &st.s, gm, st.count, all_sum)
            }
            _ => bn::backward(&g, cx.batch_mode, gy, &st.xhat, &st.s, gm),
        };
        add_into(cx.param_mut(grad, b.gamma), &dg);
        add_into(cx.param_mut(grad, b.beta), &db);
        vec![gx]
    }

    fn r_backward(
        &self,
        cx: &CpuCx,
        node: &Node,
        _xs: &[&[f64]],
        _dxs: &[&[f64]],
        sv: &Saved,
        gy: &[f64],
        rgy: &[f64],
        v: &[f64],
        hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        let b = of(node);
        let st: &BnSaved = saved(sv, node);
        let (xhd, mxx) = st.r.as_ref().expect("R-forward ran before R-backward");
        let (rgx, rdg, rdb) = bn::r_backward(
            &geom(cx, node),
            cx.batch_mode,
            gy,
            rgy,
            &st.xhat,
            xhd,
            &st.s,
            mxx,
            cx.param(cx.theta, b.gamma),
            cx.param(v, b.gamma),
        );
        add_into(cx.param_mut(hv, b.gamma), &rdg);
        add_into(cx.param_mut(hv, b.beta), &rdb);
        vec![rgx]
    }

    /// x̂, R(x̂) and the statistics rows (running mode: mean and 1/√(var+ε)
    /// written once).
    fn gpu_state(&self, node: &Node, n: usize, cx: &StateCx) -> Vec<StateBuf> {
        let b = of(node);
        let len = n * node.in_shape.numel();
        let init = (!cx.batch_mode).then(|| running_rows(node, cx.buffers));
        vec![
            StateBuf {
                name: "x̂",
                len,
                init: None,
                tangent: false,
            },
            StateBuf {
                name: "R(x̂)",
                len,
                init: None,
                tangent: true,
            },
            StateBuf {
                name: "statistics",
                len: bn_rows::COUNT * b.c,
                init,
                // Rows μ, s, Σgy, Σgy·x̂ in slice 0; every tangent's R rows
                // in its own slice (shaders/bn.wgsl).
                tangent: true,
            },
        ]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let b = of(node);
        let (xhat, stats) = (io.state[0], io.state[2]);
        let hw = node.in_shape.spatial();
        let bp = bn_params(p, b.c, hw, &b);
        let x = io.x[0];
        // x̂ and the statistics rows uploaded from the float64 forward pass
        // (`GpuEngine` with float64 decisions): y = γx̂ + β alone.
        let given = p.batch_mode && p.bn_float64 && p.replaying();
        if p.batch_mode && !given {
            let count = p.n * hw;
            p.reduction(
                Kernel::BnStats,
                Consts::default(),
                bp,
                vec![x, stats],
                b.c,
                count,
            );
        }
        p.push_with(
            Kernel::BnForward,
            Consts::new(&[("GIVEN", given as u32)]),
            &bp,
            vec![x, stats, p.theta, xhat, io.y],
            Grid::Threads(kernels::bn_threads(p.n, b.c, hw)),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let b = of(node);
        let (xhat, xhd, stats) = (io.state[0], io.state[1], io.state[2]);
        let hw = node.in_shape.spatial();
        // A zero ẋ is read as the zero buffer it is (see `NodeBufs::dx`).
        let dx = io.dx[0];
        if p.batch_mode {
            p.channel_sums(
                dx,
                Some(xhat),
                p.n,
                b.c,
                hw,
                stats,
                bn_rows::SUM_DX * b.c,
                bn_rows::SUM_XHAT_DX * b.c,
                false,
            );
        }
        let bp = bn_params(p, b.c, hw, &b);
        p.push_with(
            Kernel::BnRForward,
            Consts::new(&[("BATCH", p.batch_mode as u32)]),
            &bp,
            vec![dx, xhat, stats, p.theta, p.v, xhd, io.dy],
            Grid::Threads(kernels::bn_threads(p.n, b.c, hw)),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        let b = of(node);
        let (xhat, xhd, stats) = (io.state[0], io.state[1], io.state[2]);
        let hw = node.in_shape.spatial();
        let (goff, boff) = (p.param_off(b.gamma), p.param_off(b.beta));
        let target = p.target(r);
        let (gy, g) = (io.gy, io.g);
        let c = b.c;
        // The statistics rows the input gradient needs, with γ's and β's
        // gradient (or Hv) added into `target`: Σgy and Σgy·x̂; the
        // R-pass's ΣR(gy), ΣR(gy)·x̂ and Σgy·x̂̇.
        let d = p.dummy;
        let (rows, (c2, d2), pair2) = if r {
            (
                [bn_rows::SUM_RGY, bn_rows::SUM_RGY_XHAT, bn_rows::SUM_GY_XHD],
                (g, xhd),
                true,
            )
        } else {
            ([bn_rows::SUM_GY, bn_rows::SUM_GY_XHAT, 0], (d, d), false)
        };
        let sums = ReduceParams {
            n: p.n as u32,
            c: c as u32,
            hw: hw as u32,
            out_a: (rows[0] * c) as u32,
            out_b: (rows[1] * c) as u32,
            out_d: (rows[2] * c) as u32,
            t_a: boff as u32,
            t_b: goff as u32,
            ..Default::default()
        };
        p.reduction(
            Kernel::BnParamSums,
            Consts::new(&[("PAIR2", pair2 as u32)]),
            sums,
            vec![gy, xhat, stats, c2, d2, target],
            c,
            p.n * hw,
        );
        if !io.needs_gx[0] {
            return;
        }
        let bp = bn_params(p, c, hw, &b);
        let consts = Consts::bn(p.batch_mode, io.acc[0]);
        let grid = Grid::Threads(kernels::bn_threads(p.n, c, hw));
        if r {
            p.push_with(
                Kernel::BnRBackward,
                consts,
                &bp,
                vec![g, gy, xhat, xhd, stats, p.theta, p.v, io.gx[0]],
                grid,
            );
        } else {
            p.push_with(
                Kernel::BnBackward,
                consts,
                &bp,
                vec![gy, xhat, stats, p.theta, io.gx[0]],
                grid,
            );
        }
    }
}

fn bn_params(p: &Plan, c: usize, hw: usize, b: &Bn) -> BnParams {
    BnParams {
        n: p.n as u32,
        c: c as u32,
        hw: hw as u32,
        gamma_off: p.param_off(b.gamma) as u32,
        beta_off: p.param_off(b.beta) as u32,
        eps: b.eps as f32,
        ..Default::default()
    }
}
