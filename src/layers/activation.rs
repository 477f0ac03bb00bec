//! Elementwise activations y = f(x) (`model::Activation`): ReLU, LeakyReLU,
//! Tanh, Sigmoid, GELU (exact and tanh form), SiLU, ReLU6, Hardswish, Hardsigmoid.
//!
//! R-forward: ẏ = f'(x)·ẋ. Backward: gx = f'(x)·gy.
//! R-backward: R(gx) = f'(x)·R(gy) + f''(x)·ẋ·gy — the second term is the
//! curvature of the activation itself, zero for the piecewise-linear ones.
//! f, f', f'' in float64: `crate::ops::activation`; kernels:
//! shaders/activation.wgsl, specialised per activation by the `ACT`
//! override constant (and `ACC` for accumulating adjoints).
//!
//! Replayed decisions on the GPU (`Plan::frozen`): a ReLU/LeakyReLU keeps
//! an input x₀ — its own from a float32 recording pass, or 1/0 for the
//! sides a float64 forward decided (`crate::decisions`) — and replays its
//! pieces as the linear map y = f'(x₀)·x (the R-forward kernel with x₀ in
//! place of x), while every other pass reads f'(x₀) where it read f'(x).
//! At a float32 recording θ this is the plain pass bit for bit (f' is
//! exactly 0, 1 or the slope).
//!
//! The three-piece activations (ReLU6, Hardswish, Hardsigmoid) decide a
//! piece per element (`Decision::Piece`) and keep x₀ likewise — recorded,
//! or a value inside the piece float64 decided — but their pieces are not
//! linear maps of x (ReLU6 is 6 above its upper kink; Hardswish is
//! quadratic between its kinks), so a replaying plan runs the
//! `act_replay_*` kernels, which evaluate the piece of x₀ at x.

use super::{CpuCx, Decision, Layer, Saved, StateBuf, StateCx, StateWords};
use crate::dispatch::kernels::{ActParams, Consts, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::model::{Activation, Node, Op};
use crate::ops::activation as act;

pub struct ActivationUnit;

fn of(node: &Node) -> Activation {
    match node.op {
        Op::Act(a) => a,
        _ => unreachable!("activation unit on {}", node.kind()),
    }
}

/// The slope of the chosen linear piece per element, where a forced mask
/// (tests, frozen decisions) picks the piece of a ReLU/LeakyReLU instead of
/// the sign of the f64 input: 1 where the mask is set, 0 (ReLU) or the
/// negative slope elsewhere. The activation is then y = s·x, exactly
/// linear: f' = s, f'' = 0.
fn forced_slopes(a: Activation, mask: Option<&[bool]>) -> Option<Vec<f64>> {
    let off = match a {
        Activation::Relu => 0.0,
        Activation::LeakyRelu { slope } => slope,
        _ => return None,
    };
    mask.map(|m| m.iter().map(|&on| if on { 1.0 } else { off }).collect())
}

/// The slopes of a forced mask, or the forced pieces of a three-piece
/// activation, if the forward had them.
struct ActSaved(Option<Vec<f64>>, Option<Vec<u8>>);

fn slopes(s: &Saved) -> Option<&[f64]> {
    s.downcast_ref::<ActSaved>().and_then(|a| a.0.as_deref())
}

fn forced_pieces(s: &Saved) -> Option<&[u8]> {
    s.downcast_ref::<ActSaved>().and_then(|a| a.1.as_deref())
}

/// The pieces a forward forces on a three-piece activation.
fn pieces_for<'a>(a: Activation, cx: &CpuCx<'a>) -> Option<&'a [u8]> {
    if three_piece(a) {
        cx.pieces
    } else {
        None
    }
}

/// A value strictly inside piece `p` of a three-piece activation (what a
/// replaying plan's x₀ holds for a float64 decision).
fn inside(a: Activation, p: u8) -> f32 {
    let (lo, hi) = act::kinks(a).expect("a three-piece activation");
    (match p {
        0 => lo - 1.0,
        1 => 0.5 * (lo + hi),
        _ => hi + 1.0,
    }) as f32
}

fn scaled(s: &[f64], x: &[f64]) -> Vec<f64> {
    s.iter().zip(x).map(|(a, b)| a * b).collect()
}

/// The input whose pieces the passes follow: the recorded x₀ while a
/// frozen plan replays a ReLU/LeakyReLU, else the input itself.
fn pieces_of(p: &Plan, node: &Node, io: &NodeBufs) -> usize {
    if p.replaying() && relu_like(of(node)) {
        io.state[0]
    } else {
        io.x[0]
    }
}

impl Layer for ActivationUnit {
    fn decides(&self, node: &Node) -> bool {
        piecewise(of(node))
    }

    /// ReLU/LeakyReLU: which side of the kink each input is on (x > 0,
    /// as the forward decides), with margin |x|. ReLU6, Hardswish,
    /// Hardsigmoid: the piece of each input, with margin its distance to
    /// the nearest kink.
    fn decide(&self, _cx: &CpuCx, node: &Node, x: &[f64]) -> Option<(Decision, Vec<f64>)> {
        let a = of(node);
        if three_piece(a) {
            let p = x.iter().map(|&v| act::piece(a, v)).collect();
            let m = x.iter().map(|&v| act::kink_margin(a, v)).collect();
            return Some((Decision::Piece(p), m));
        }
        if !relu_like(a) {
            return None;
        }
        let mask = x.iter().map(|&v| v > 0.0).collect();
        Some((Decision::Mask(mask), x.iter().map(|v| v.abs()).collect()))
    }

    /// The recorded-input buffer a replaying plan reads f'(x₀) from: 1
    /// on the positive side, 0 elsewhere (f'(0) is 0 for ReLU and the
    /// slope for LeakyReLU, as at a real x₀ ≤ 0); for a three-piece
    /// activation a value inside each element's piece.
    fn decision_words(&self, node: &Node, d: &Decision) -> Option<StateWords> {
        let a = of(node);
        match d {
            Decision::Mask(m) if relu_like(a) => Some(StateWords::F32(
                m.iter().map(|&on| if on { 1.0 } else { 0.0 }).collect(),
            )),
            Decision::Piece(p) if three_piece(a) => {
                Some(StateWords::F32(p.iter().map(|&q| inside(a, q)).collect()))
            }
            _ => None,
        }
    }

    fn gpu_state(&self, node: &Node, n: usize, cx: &StateCx) -> Vec<StateBuf> {
        if cx.frozen && piecewise(of(node)) {
            vec![StateBuf {
                name: "recorded input",
                len: n * node.in_shape.numel(),
                init: None,
                tangent: false,
            }]
        } else {
            vec![]
        }
    }

    fn forward(&self, cx: &CpuCx, node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        let a = of(node);
        let forced = forced_slopes(a, cx.mask);
        let pieces = pieces_for(a, cx);
        let y = match (&forced, pieces) {
            (Some(s), _) => scaled(s, xs[0]),
            (None, Some(p)) => act::forward_on(a, p, xs[0]),
            (None, None) => act::forward(a, xs[0]),
        };
        (y, Box::new(ActSaved(forced, pieces.map(<[u8]>::to_vec))))
    }

    fn r_forward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        saved: &mut Saved,
    ) -> Vec<f64> {
        if let Some(p) = forced_pieces(saved) {
            return act::derivative_on(of(node), p, xs[0], dxs[0]);
        }
        match slopes(saved) {
            Some(s) => scaled(s, dxs[0]),
            None => act::r_forward(of(node), xs[0], dxs[0]),
        }
    }

    fn backward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        saved: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        if let Some(s) = slopes(saved) {
            return vec![scaled(s, gy)];
        }
        if let Some(p) = forced_pieces(saved) {
            return vec![act::derivative_on(of(node), p, xs[0], gy)];
        }
        let mut gx = vec![0.0; xs[0].len()];
        act::backward_acc(of(node), xs[0], gy, &mut gx);
        vec![gx]
    }

    fn r_backward(
        &self,
        _cx: &CpuCx,
        node: &Node,
        xs: &[&[f64]],
        dxs: &[&[f64]],
        saved: &Saved,
        gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        if let Some(s) = slopes(saved) {
            return vec![scaled(s, rgy)];
        }
        if let Some(p) = forced_pieces(saved) {
            return vec![act::r_backward_on(of(node), p, xs[0], dxs[0], gy, rgy)];
        }
        let mut rgx = vec![0.0; xs[0].len()];
        act::r_backward_acc(of(node), xs[0], dxs[0], gy, rgy, &mut rgx);
        vec![rgx]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let len = p.n * node.out_shape.numel();
        let a = of(node);
        if p.replaying() && three_piece(a) {
            // y = f_{piece(x₀)}(x).
            p.push_with(
                Kernel::ActReplayForward,
                consts(a, None),
                &act_params(a, len),
                vec![io.state[0], io.x[0], io.y],
                Grid::Threads(len),
            );
            return;
        }
        if p.replaying() && relu_like(a) {
            // y = f'(x₀)·x.
            p.push_with(
                Kernel::ActRForward,
                consts(a, None),
                &act_params(a, len),
                vec![io.state[0], io.x[0], io.y],
                Grid::Threads(len),
            );
            return;
        }
        p.push_with(
            Kernel::ActForward,
            consts(a, None),
            &act_params(a, len),
            vec![io.x[0], io.y],
            Grid::Threads(len),
        );
        if p.recording && piecewise(a) {
            p.copy(io.x[0], 0, io.state[0], 0, len, false);
        }
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        if io.dx_zero[0] {
            return true;
        }
        let len = p.n * node.out_shape.numel();
        let a = of(node);
        if p.replaying() && three_piece(a) {
            p.push_with(
                Kernel::ActReplayRForward,
                consts(a, None),
                &act_params(a, len),
                vec![io.state[0], io.x[0], io.dx[0], io.dy],
                Grid::Threads(len),
            );
            return false;
        }
        p.push_with(
            Kernel::ActRForward,
            consts(a, None),
            &act_params(a, len),
            vec![pieces_of(p, node, io), io.dx[0], io.dy],
            Grid::Threads(len),
        );
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, r: bool) {
        if !io.needs_gx[0] {
            return;
        }
        let len = p.n * node.out_shape.numel();
        let a = of(node);
        let c = consts(a, Some(io.acc[0]));
        // The f''(x)·ẋ·gy term exists only for curved activations and a
        // non-zero ẋ; otherwise R(gx) = f'(x)·R(gy) is the plain backward.
        let curvature = r && curved(a) && !io.dx_zero[0];
        if p.replaying() && three_piece(a) {
            let (kernel, bufs) = if curvature {
                (
                    Kernel::ActReplayRBackward,
                    vec![io.state[0], io.x[0], io.dx[0], io.g, io.gy, io.gx[0]],
                )
            } else {
                (
                    Kernel::ActReplayBackward,
                    vec![io.state[0], io.x[0], io.gy, io.gx[0]],
                )
            };
            p.push_with(kernel, c, &act_params(a, len), bufs, Grid::Threads(len));
            return;
        }
        if curvature {
            p.push_with(
                Kernel::ActRBackward,
                c,
                &act_params(a, len),
                vec![io.x[0], io.dx[0], io.g, io.gy, io.gx[0]],
                Grid::Threads(len),
            );
        } else {
            p.push_with(
                Kernel::ActBackward,
                c,
                &act_params(a, len),
                vec![pieces_of(p, node, io), io.gy, io.gx[0]],
                Grid::Threads(len),
            );
        }
    }
}

/// Whether f'' is non-zero somewhere (off the kinks).
pub fn curved(a: Activation) -> bool {
    matches!(
        a,
        Activation::Tanh
            | Activation::Sigmoid
            | Activation::Gelu
            | Activation::GeluTanh
            | Activation::Silu
            | Activation::Hardswish
    )
}

/// ReLU and LeakyReLU: two pieces, each a linear map (a mask decides).
pub fn relu_like(a: Activation) -> bool {
    matches!(a, Activation::Relu | Activation::LeakyRelu { .. })
}

/// ReLU6, Hardswish, Hardsigmoid: three pieces (`Decision::Piece`).
pub fn three_piece(a: Activation) -> bool {
    act::kinks(a).is_some()
}

/// Whether the activation takes piecewise decisions.
pub fn piecewise(a: Activation) -> bool {
    relu_like(a) || three_piece(a)
}

/// The `ACT` override constant of shaders/activation.wgsl.
pub fn act_code(a: Activation) -> u32 {
    match a {
        Activation::Relu => 0,
        Activation::LeakyRelu { .. } => 1,
        Activation::Tanh => 2,
        Activation::Sigmoid => 3,
        Activation::Gelu => 4,
        Activation::Silu => 5,
        Activation::Relu6 => 6,
        Activation::Hardswish => 7,
        Activation::Hardsigmoid => 8,
        Activation::GeluTanh => 9,
    }
}

/// The override constants of a pass: `acc` only where the kernel has it.
pub fn consts(a: Activation, acc: Option<bool>) -> Consts {
    match acc {
        Some(acc) => Consts::new(&[("ACT", act_code(a)), ("ACC", acc as u32)]),
        None => Consts::new(&[("ACT", act_code(a))]),
    }
}

pub fn act_params(a: Activation, len: usize) -> ActParams {
    let slope = match a {
        Activation::LeakyRelu { slope } => slope as f32,
        _ => 0.0,
    };
    ActParams {
        len: len as u32,
        slope,
        ..Default::default()
    }
}
