//! Shape arithmetic, folded to constants: the legacy exporter computes
//! some reshape targets and slice ends from the input's shape (Shape,
//! Gather, Unsqueeze, Concat on axis 0, and Add/Sub/Mul/Div of integers:
//! ShuffleNetV2's `x.chunk(2, dim=1)`). The image's C, H and W are fixed
//! numbers; the batch is the input's declared one, or −1 where it is
//! dynamic (which Reshape reads as "the batch").

use super::convert::{Attrs, Builder, Origin, Val, R};
use super::proto::NodeProto;
use super::tensor::Tensor;
use std::rc::Rc;

/// The largest constant shape tensor folded (shapes have a handful of
/// elements; this bounds the work a hostile file can ask for).
const MAX_FOLD: usize = 64;

fn konst(name: &str, dims: Vec<usize>, data: Vec<f64>, int: bool) -> Val {
    Val::Const(
        Rc::new(Tensor {
            name: name.to_string(),
            dims,
            data,
            int,
        }),
        Origin::default(),
    )
}

impl Builder<'_> {
    fn out_name(n: &NodeProto) -> String {
        n.output.first().cloned().unwrap_or_default()
    }

    /// Shape of a value: [N, C, H, W] (or [N, D] of a flat one).
    pub(super) fn shape_of(&mut self, n: &NodeProto) -> R<()> {
        Attrs::only(n, &[])?;
        let (_, s, flat) = self.value(n, 0)?;
        let b = self.batch.map(|b| b as f64).unwrap_or(-1.0);
        let data = if flat {
            vec![b, s.c as f64]
        } else {
            vec![b, s.c as f64, s.h as f64, s.w as f64]
        };
        let v = konst(&Self::out_name(n), vec![data.len()], data, true);
        self.set(n, 0, v);
        Ok(())
    }

    /// An integer constant input (a shape, axes, indices).
    fn int_const(&mut self, n: &NodeProto, i: usize) -> R<Rc<Tensor>> {
        let (t, _) = self.konst(n, i)?;
        if !t.int {
            return Err(format!(
                "input {} (`{}`) of {} must be an integer constant",
                i + 1,
                n.input[i],
                n.op_type
            ));
        }
        if t.numel() > MAX_FOLD {
            return Err(format!(
                "input {} (`{}`) has {} elements; hesscope folds shape tensors of at most \
                 {MAX_FOLD}",
                i + 1,
                n.input[i],
                t.numel()
            ));
        }
        Ok(t)
    }

    /// Gather on axis 0 of a 1-d integer constant.
    pub(super) fn gather(&mut self, n: &NodeProto) -> R<()> {
        let axis = Attrs::only(n, &["axis"])?.int("axis", 0);
        let data = self.int_const(n, 0)?;
        let idx = self.int_const(n, 1)?;
        if axis != 0 || data.dims.len() != 1 {
            return Err(format!(
                "Gather is supported only of a 1-d integer constant (a shape) on axis 0, not \
                 of dims {:?} on axis {axis}",
                data.dims
            ));
        }
        let len = data.data.len() as i64;
        let mut out = Vec::with_capacity(idx.data.len());
        for &i in &idx.data {
            let i = i as i64;
            let j = if i < 0 { i + len } else { i };
            if !(0..len).contains(&j) {
                return Err(format!(
                    "index {i} is outside the {len} elements of `{}`",
                    n.input[0]
                ));
            }
            out.push(data.data[j as usize]);
        }
        let v = konst(&Self::out_name(n), idx.dims.clone(), out, true);
        self.set(n, 0, v);
        Ok(())
    }

    /// Unsqueeze of an integer constant (axes from input 2, opset 13).
    pub(super) fn unsqueeze(&mut self, n: &NodeProto) -> R<()> {
        Attrs::only(n, &[])?;
        let data = self.int_const(n, 0)?;
        let axes = self.int_const(n, 1)?;
        let rank = data.dims.len() + axes.data.len();
        let mut norm: Vec<usize> = vec![];
        for &a in &axes.data {
            let a = a as i64;
            let j = if a < 0 { a + rank as i64 } else { a };
            if !(0..rank as i64).contains(&j) || norm.contains(&(j as usize)) {
                return Err(format!("axes {:?} do not fit rank {rank}", axes.data));
            }
            norm.push(j as usize);
        }
        let mut dims = vec![];
        let mut rest = data.dims.iter();
        for j in 0..rank {
            if norm.contains(&j) {
                dims.push(1);
            } else {
                dims.push(*rest.next().unwrap_or(&1));
            }
        }
        let v = konst(&Self::out_name(n), dims, data.data.clone(), true);
        self.set(n, 0, v);
        Ok(())
    }

    /// Concat on axis 0 of 1-d integer constants (a shape built up).
    pub(super) fn concat_consts(&mut self, n: &NodeProto) -> R<()> {
        let axis = Attrs::only(n, &["axis"])?.int("axis", 0);
        let mut data = vec![];
        for i in 0..n.input.len() {
            let t = self.int_const(n, i)?;
            if t.dims.len() != 1 || axis != 0 {
                return Err(format!(
                    "Concat of constants is supported only of 1-d integer ones (shapes) on axis \
                     0, not of dims {:?} on axis {axis}",
                    t.dims
                ));
            }
            data.extend_from_slice(&t.data);
        }
        if data.len() > MAX_FOLD {
            return Err(format!("a shape of {} elements", data.len()));
        }
        let v = konst(&Self::out_name(n), vec![data.len()], data, true);
        self.set(n, 0, v);
        Ok(())
    }

    /// Whether inputs 1 and 2 of `n` are both integer constants (then an
    /// Add, Sub, Mul or Div of them is shape arithmetic, folded).
    pub(super) fn both_int_consts(&mut self, n: &NodeProto) -> bool {
        if n.input.len() != 2 {
            return false;
        }
        [0, 1].iter().all(
            |&i| matches!(self.val(n, i), Ok(Val::Const(t, _)) if t.int && t.numel() <= MAX_FOLD),
        )
    }

    /// Add, Sub, Mul or Div of two integer constants (Div truncates, as
    /// ONNX's integer division), one of them a scalar or both of a shape.
    pub(super) fn int_arith(&mut self, n: &NodeProto) -> R<()> {
        Attrs::only(n, &[])?;
        let a = self.int_const(n, 0)?;
        let b = self.int_const(n, 1)?;
        let (dims, len) = if a.dims == b.dims || b.numel() == 1 {
            (a.dims.clone(), a.numel())
        } else if a.numel() == 1 {
            (b.dims.clone(), b.numel())
        } else {
            return Err(format!(
                "{} of integer constants of dims {:?} and {:?} (no broadcasting beyond a scalar)",
                n.op_type, a.dims, b.dims
            ));
        };
        let at = |t: &Tensor, i: usize| t.data[if t.numel() == 1 { 0 } else { i }] as i64;
        let mut out = Vec::with_capacity(len);
        for i in 0..len {
            let (x, y) = (at(&a, i), at(&b, i));
            let r = match n.op_type.as_str() {
                "Add" => x.checked_add(y),
                "Sub" => x.checked_sub(y),
                "Mul" => x.checked_mul(y),
                _ => x.checked_div(y),
            }
            .ok_or_else(|| format!("{} of {x} and {y} overflows or divides by 0", n.op_type))?;
            out.push(r as f64);
        }
        let v = konst(&Self::out_name(n), dims, out, true);
        self.set(n, 0, v);
        Ok(())
    }

    /// Cast of an integer constant to an integer type (int32, int64:
    /// what the exporter writes around shape arithmetic).
    pub(super) fn cast(&mut self, n: &NodeProto) -> R<()> {
        let to = Attrs::only(n, &["saturate", "to"])?.int("to", 0);
        let t = match self.val(n, 0)? {
            Val::Const(t, _) if t.int && matches!(to, 6 | 7) => t,
            _ => {
                return Err(format!(
                    "Cast is supported only of an integer constant (shape arithmetic) to int32 \
                     or int64, not to type {to}"
                ))
            }
        };
        let v = konst(&Self::out_name(n), t.dims.clone(), t.data.clone(), true);
        self.set(n, 0, v);
        Ok(())
    }
}
