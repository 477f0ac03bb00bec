//! Add, Mul, Div, Erf and Constant: the residual add, and GELU's erf
//! form 0.5·x·(1 + erf(x/√2)) read whole (the exporters without a `Gelu`
//! op write it so); no other arithmetic is read.

use super::convert::{Attrs, Builder, GeluPart, Origin, Val, R};
use super::proto::NodeProto;
use super::tensor::{self, Tensor};
use crate::model::graph::{Activation, Op};
use std::rc::Rc;

fn scalar(t: &Tensor) -> Option<f64> {
    (t.numel() == 1).then(|| t.data[0])
}

fn near(x: Option<f64>, target: f64) -> bool {
    // float32 constants: within float32 rounding of the exact number.
    x.is_some_and(|x| (x - target).abs() <= 1e-6 * target.abs())
}

impl Builder<'_> {
    pub(super) fn add(&mut self, n: &NodeProto, module: String) -> R<()> {
        Attrs::only(n, &[])?;
        let (a, b) = (self.val(n, 0)?, self.val(n, 1)?);
        match (a, b) {
            (Val::Value(x), Val::Value(y)) => {
                let ((sx, fx), (sy, fy)) = (self.shapes[x], self.shapes[y]);
                if sx != sy || fx != fy {
                    return Err(format!(
                        "adds values of different shapes ({sx} and {sy}); hesscope adds two \
                         values of one shape (no broadcasting)"
                    ));
                }
                let id = self.push(module, Op::Add, vec![x, y], sx, fx)?;
                self.set(n, 0, Val::Value(id));
                Ok(())
            }
            (Val::Gelu(x, GeluPart::Erf), Val::Const(t, _))
            | (Val::Const(t, _), Val::Gelu(x, GeluPart::Erf))
                if scalar(&t) == Some(1.0) =>
            {
                self.set(n, 0, Val::Gelu(x, GeluPart::OnePlusErf(1.0)));
                Ok(())
            }
            _ => Err(
                "Add is supported of two values of one shape (a residual), as a Linear's bias \
                 after MatMul, or within GELU's erf form"
                    .into(),
            ),
        }
    }

    /// Div, Erf and Mul: only as GELU's erf form 0.5·x·(1 + erf(x/√2)).
    pub(super) fn gelu_piece(&mut self, n: &NodeProto, module: String) -> R<()> {
        Attrs::only(n, &[])?;
        let refuse = || {
            format!(
                "ONNX op {} is not supported (only within GELU's erf form 0.5·x·(1 + erf(x/√2)))",
                n.op_type
            )
        };
        let a = self.val(n, 0)?;
        let out = if n.op_type == "Erf" {
            match a {
                Val::Gelu(x, GeluPart::Scaled) => Val::Gelu(x, GeluPart::Erf),
                _ => return Err(refuse()),
            }
        } else {
            let b = self.val(n, 1)?;
            let sqrt2 = std::f64::consts::SQRT_2;
            let div = n.op_type == "Div";
            match (a, b) {
                (Val::Value(x), Val::Const(t, _)) if div && near(scalar(&t), sqrt2) => {
                    Val::Gelu(x, GeluPart::Scaled)
                }
                (Val::Value(x), Val::Const(t, _)) | (Val::Const(t, _), Val::Value(x))
                    if !div && near(scalar(&t), 1.0 / sqrt2) =>
                {
                    Val::Gelu(x, GeluPart::Scaled)
                }
                (Val::Gelu(x, GeluPart::OnePlusErf(k)), Val::Const(t, _))
                | (Val::Const(t, _), Val::Gelu(x, GeluPart::OnePlusErf(k)))
                    if !div && scalar(&t).is_some() =>
                {
                    Val::Gelu(x, GeluPart::OnePlusErf(k * scalar(&t).unwrap()))
                }
                (Val::Value(y), Val::Gelu(x, GeluPart::OnePlusErf(k)))
                | (Val::Gelu(x, GeluPart::OnePlusErf(k)), Val::Value(y))
                    if !div && x == y =>
                {
                    Val::Gelu(x, GeluPart::XTimes(k))
                }
                (Val::Gelu(x, GeluPart::XTimes(k)), Val::Const(t, _))
                | (Val::Const(t, _), Val::Gelu(x, GeluPart::XTimes(k)))
                    if !div && scalar(&t).is_some() =>
                {
                    Val::Gelu(x, GeluPart::XTimes(k * scalar(&t).unwrap()))
                }
                _ => return Err(refuse()),
            }
        };
        let out = match out {
            Val::Gelu(x, GeluPart::XTimes(0.5)) => {
                let (s, flat) = self.shapes[x];
                Val::Value(self.push(module, Op::Act(Activation::Gelu), vec![x], s, flat)?)
            }
            other => other,
        };
        self.set(n, 0, out);
        Ok(())
    }

    pub(super) fn constant(&mut self, n: &NodeProto) -> R<()> {
        let a = Attrs::only(
            n,
            &[
                "value",
                "value_float",
                "value_floats",
                "value_int",
                "value_ints",
            ],
        )?;
        let name = n.output.first().cloned().unwrap_or_default();
        let t = if let Some(t) = a.tensor("value") {
            let mut t = tensor::decode(t, self.dir).map_err(|e| format!("its value: {e}"))?;
            t.name = name;
            t
        } else {
            let attr = n.attribute.first().ok_or("Constant without a value")?;
            let (data, int): (Vec<f64>, bool) = match attr.name.as_str() {
                "value_float" => (vec![tensor::attr_f64(attr.f)], false),
                "value_floats" => (
                    attr.floats.iter().map(|&f| tensor::attr_f64(f)).collect(),
                    false,
                ),
                "value_int" => (vec![attr.i as f64], true),
                _ => (attr.ints.iter().map(|&i| i as f64).collect(), true),
            };
            let dims = if attr.name.ends_with('s') {
                vec![data.len()]
            } else {
                vec![]
            };
            Tensor {
                name,
                dims,
                data,
                int,
            }
        };
        self.set(n, 0, Val::Const(Rc::new(t), Origin::default()));
        Ok(())
    }
}
