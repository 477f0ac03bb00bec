//! Flatten `[n, c, h, w] -> [n, c·h·w]`: the same storage, row-major, so
//! both executors alias the output to the input and run no pass for it.

use super::{CpuCx, Layer, Saved};
use crate::dispatch::plan::{NodeBufs, Plan};
use crate::model::Node;

pub struct FlattenUnit;

impl Layer for FlattenUnit {
    fn is_alias(&self) -> bool {
        true
    }
    fn forward(&self, _cx: &CpuCx, _node: &Node, xs: &[&[f64]]) -> (Vec<f64>, Saved) {
        (xs[0].to_vec(), Box::new(()))
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
        dxs[0].to_vec()
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
        vec![gy.to_vec()]
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
        vec![rgy.to_vec()]
    }
    // The GPU walker aliases flatten and never plans it.
    fn plan_forward(&self, _p: &mut Plan, _node: &Node, _io: &NodeBufs) {}
    fn plan_r_forward(&self, _p: &mut Plan, _node: &Node, io: &NodeBufs) -> bool {
        io.dx_zero[0]
    }
    fn plan_backward(&self, _p: &mut Plan, _node: &Node, _io: &NodeBufs, _r: bool) {}
}
