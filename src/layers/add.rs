//! The residual add y = a + b. Every pass is linear: ẏ = ȧ + ḃ, and the
//! adjoint (and R-adjoint) of y flows unchanged to both inputs.

use super::{add_vecs, CpuCx, Layer, Saved};
use crate::dispatch::kernels::{EwParams, Kernel};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::dispatch::step::Grid;
use crate::model::Node;

pub struct AddUnit;

impl Layer for AddUnit {
    fn forward(&self, _cx: &CpuCx, _node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        (add_vecs(xs[0], xs[1]), Box::new(()))
    }
    fn r_forward(
        &self,
        _cx: &CpuCx,
        _node: &Node,
        _xs: &[&[f64]],
        dxs: &[&[f64]],
        _v: &[f64],
        _saved: &mut Saved,
    ) -> Vec<f64> {
        add_vecs(dxs[0], dxs[1])
    }
    fn backward(
        &self,
        _cx: &CpuCx,
        _node: &Node,
        _xs: &[&[f64]],
        _saved: &Saved,
        gy: &[f64],
        _grad: &mut [f64],
    ) -> Vec<Vec<f64>> {
        vec![gy.to_vec(), gy.to_vec()]
    }
    fn r_backward(
        &self,
        _cx: &CpuCx,
        _node: &Node,
        _xs: &[&[f64]],
        _dxs: &[&[f64]],
        _saved: &Saved,
        _gy: &[f64],
        rgy: &[f64],
        _v: &[f64],
        _hv: &mut [f64],
    ) -> Vec<Vec<f64>> {
        vec![rgy.to_vec(), rgy.to_vec()]
    }

    fn plan_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) {
        let len = p.n * node.out_shape.numel();
        p.push(
            Kernel::Add,
            &EwParams {
                len: len as u32,
                ..Default::default()
            },
            vec![io.x[0], io.x[1], io.y],
            Grid::Threads(len),
        );
    }

    fn plan_r_forward(&self, p: &mut Plan, node: &Node, io: &NodeBufs) -> bool {
        let len = p.n * node.out_shape.numel();
        match (io.dx_zero[0], io.dx_zero[1]) {
            (true, true) => return true,
            (false, true) => p.copy(io.dx[0], 0, io.dy, 0, len, false),
            (true, false) => p.copy(io.dx[1], 0, io.dy, 0, len, false),
            (false, false) => p.push(
                Kernel::Add,
                &EwParams {
                    len: len as u32,
                    ..Default::default()
                },
                vec![io.dx[0], io.dx[1], io.dy],
                Grid::Threads(len),
            ),
        }
        false
    }

    fn plan_backward(&self, p: &mut Plan, node: &Node, io: &NodeBufs, _r: bool) {
        let len = p.n * node.out_shape.numel();
        for i in 0..2 {
            if io.needs_gx[i] {
                p.copy(io.gy, 0, io.gx[i], 0, len, io.acc[i]);
            }
        }
    }
}
