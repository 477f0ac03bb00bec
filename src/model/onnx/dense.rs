//! The dense end of a CNN: Flatten and Reshape to [N, C·H·W], and
//! PyTorch's Linear as Gemm or as MatMul by a constant (+ Add of its bias).

use super::convert::{Attrs, Builder, Origin, Val, R};
use super::proto::NodeProto;
use super::tensor::Tensor;
use crate::model::graph::{Init, Op, Shape};
use std::rc::Rc;

/// `rows × cols` row-major, transposed.
pub(super) fn transpose(data: &[f64], rows: usize, cols: usize) -> Vec<f64> {
    let mut out = vec![0.0; data.len()];
    for i in 0..rows {
        for j in 0..cols {
            out[j * rows + i] = data[i * cols + j];
        }
    }
    out
}

/// A bias of `dout` elements: dims [dout] or [1, dout].
fn bias_dims_ok(t: &Tensor, dout: usize) -> bool {
    t.dims == [dout] || t.dims == [1, dout]
}

impl Builder<'_> {
    pub(super) fn flatten(&mut self, n: &NodeProto, module: String) -> R<()> {
        let (v, s, flat) = self.value(n, 0)?;
        let id = if flat {
            v
        } else {
            self.push(
                module,
                Op::Flatten,
                vec![v],
                Shape::new(s.numel(), 1, 1),
                true,
            )?
        };
        self.set(n, 0, Val::Value(id));
        Ok(())
    }

    /// Reshape to [N, C·H·W] (`x.view(x.size(0), -1)`) is a flatten; no
    /// other reshape is supported.
    pub(super) fn reshape(&mut self, n: &NodeProto, module: String) -> R<()> {
        let allowzero = Attrs::only(n, &["allowzero"])?.int("allowzero", 0);
        let (t, _) = self.konst(n, 1)?;
        let target: Vec<i64> = t.data.iter().map(|&x| x as i64).collect();
        let batch = self.batch;
        let batch_ok =
            |d: i64| (d == 0 && allowzero == 0) || d == -1 || batch.is_some_and(|b| b as i64 == d);
        let first_ok = t.int && target.first().is_some_and(|&d| batch_ok(d));
        if self
            .shuffle_reshape(n, &module, &target, first_ok)?
            .is_some()
        {
            return Ok(());
        }
        let (_, s, _) = self.value(n, 0)?;
        let numel = s.numel() as i64;
        let ok = match target[..] {
            [b, -1] => b != -1 && batch_ok(b),
            [b, d] => d == numel && batch_ok(b),
            _ => false,
        };
        if !t.int || !ok {
            return Err(format!(
                "Reshape to {target:?} is not supported (only the flatten to [N, {numel}])"
            ));
        }
        self.flatten(n, module)
    }

    /// The Linear layer y = x·Wᵀ + b of PyTorch, whose weight [DOUT, DIN]
    /// is the parameter whichever layout the graph stores it in.
    #[allow(clippy::too_many_arguments)]
    pub(super) fn linear(
        &mut self,
        n: &NodeProto,
        module: &str,
        v: usize,
        din: usize,
        dout: usize,
        w: Vec<f64>,
        wo: &Origin,
        bias: Option<(Rc<Tensor>, Origin)>,
    ) -> R<usize> {
        let wname = self.param_name(&n.name, wo, module, "weight")?;
        let module = Builder::module_for(&wname);
        let bname = match &bias {
            Some((_, bo)) => Some(self.param_name(&n.name, bo, &module, "bias")?),
            None => None,
        };
        let weight = self.add_param(wname, vec![dout, din], Init::UniformFanIn(din), w)?;
        let bias = match (bname, bias) {
            (Some(name), Some((b, _))) => {
                Some(self.add_param(name, vec![dout], Init::UniformFanIn(din), b.data.clone())?)
            }
            _ => None,
        };
        let op = Op::Linear {
            weight,
            bias,
            din,
            dout,
        };
        self.push(module, op, vec![v], Shape::new(dout, 1, 1), true)
    }

    pub(super) fn flat_input(&mut self, n: &NodeProto) -> R<(usize, usize)> {
        let (v, s, flat) = self.value(n, 0)?;
        if !flat {
            return Err(format!(
                "{} needs a flat input [N, D], got the image [N, {}, {}, {}]",
                n.op_type, s.c, s.h, s.w
            ));
        }
        Ok((v, s.c))
    }

    pub(super) fn gemm(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(n, &["alpha", "beta", "transA", "transB"])?;
        if a.float("alpha", 1.0) != 1.0 || a.int("transA", 0) != 0 {
            return Err("only alpha=1 and transA=0 are supported (PyTorch's Linear)".into());
        }
        let (v, din) = self.flat_input(n)?;
        let (b, bo) = self.konst(n, 1)?;
        let trans = a.int("transB", 0) != 0;
        let [r, c] = b.dims[..] else {
            return Err(format!(
                "weight `{}` has dims {:?}; Gemm's is 2-d",
                b.name, b.dims
            ));
        };
        let (dout, k) = if trans { (r, c) } else { (c, r) };
        if k != din || dout == 0 {
            return Err(format!(
                "weight `{}` of dims {:?} (transB={}) does not take the input's {din} features",
                b.name, b.dims, trans as u8
            ));
        }
        let w = if trans {
            b.data.clone()
        } else {
            transpose(&b.data, r, c)
        };
        let bias = if Builder::has_input(n, 2) {
            if a.float("beta", 1.0) != 1.0 {
                return Err("only beta=1 is supported (PyTorch's Linear)".into());
            }
            let (t, o) = self.konst(n, 2)?;
            if !bias_dims_ok(&t, dout) {
                return Err(format!(
                    "bias `{}` has dims {:?}; only [{dout}] or [1, {dout}] is supported",
                    t.name, t.dims
                ));
            }
            Some((t, o))
        } else {
            None
        };
        let id = self.linear(n, module, v, din, dout, w, &bo, bias)?;
        self.set(n, 0, Val::Value(id));
        Ok(())
    }

    /// MatMul by a constant [DIN, DOUT], with the Add of a constant [DOUT]
    /// that follows it (its only reader) as the bias.
    pub(super) fn matmul(&mut self, n: &NodeProto, module: &str) -> R<()> {
        Attrs::only(n, &[])?;
        let (v, din) = self.flat_input(n)?;
        let (b, bo) = self.konst(n, 1)?;
        let [r, c] = b.dims[..] else {
            return Err(format!(
                "weight `{}` has dims {:?}; only a 2-d one is supported",
                b.name, b.dims
            ));
        };
        if r != din || c == 0 {
            return Err(format!(
                "weight `{}` of dims {:?} does not take the input's {din} features",
                b.name, b.dims
            ));
        }
        let dout = c;
        let w = transpose(&b.data, r, c);
        let mut bias = None;
        let readers = self
            .consumers
            .get(&n.output[0])
            .cloned()
            .unwrap_or_default();
        if let [j] = readers[..] {
            let g = self.graph;
            let add = &g.node[j];
            if add.op_type == "Add" && add.domain.is_empty() && add.input.len() == 2 {
                let other = if add.input[0] == n.output[0] {
                    &add.input[1]
                } else {
                    &add.input[0]
                };
                let known = self.vals.contains_key(other.as_str())
                    || self.inits.contains_key(other.as_str());
                if known && other != &n.output[0] {
                    if let Ok(Val::Const(t, o)) = self.named(&other.clone()) {
                        if bias_dims_ok(&t, dout) {
                            bias = Some((t, o, j));
                        }
                    }
                }
            }
        }
        let (bias, absorbed) = match bias {
            Some((t, o, j)) => (Some((t, o)), Some(j)),
            None => (None, None),
        };
        let id = self.linear(n, module, v, din, dout, w, &bo, bias)?;
        if let Some(j) = absorbed {
            self.absorbed.insert(j, id);
        }
        self.set(n, 0, Val::Value(id));
        Ok(())
    }
}
