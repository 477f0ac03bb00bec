//! The ONNX operators hesscope reads, each onto the IR's ops. Anything
//! else is refused naming the node and its op type; so are attributes
//! that would change what an op computes in a way hesscope does not
//! (asymmetric padding, dilated pools, ...).

use super::convert::{is_module_name, module_of, Attrs, Builder, Origin, Val, R};
use super::dense::transpose;
use super::proto::NodeProto;
use super::tensor::Tensor;
use crate::model::graph::{Activation, Init, Op, Shape};
use std::rc::Rc;

/// A square window: kernel, stride, symmetric padding, dilation.
#[derive(Clone, Copy, Debug)]
struct Win {
    k: usize,
    stride: usize,
    pad: usize,
    dilation: usize,
}

fn pair(a: &Attrs, name: &str, default: usize, what: &str) -> R<usize> {
    let Some(v) = a.ints(name) else {
        return Ok(default);
    };
    match v {
        [x, y] if x == y && *x >= 1 => Ok(*x as usize),
        [x, y] if x == y => Err(format!("{name}={v:?}: must be at least 1")),
        [_, _] => Err(format!(
            "{name}={v:?}: only square {what} are supported (equal height and width)"
        )),
        _ => Err(format!("{name}={v:?}: a 2-d {what} needs two values")),
    }
}

/// The window of a Conv or pool: `kernel` from the weight (Conv) or the
/// `kernel_shape` attribute (pools, which must have it).
fn window(a: &Attrs, kernel: Option<(usize, usize)>) -> R<Win> {
    let k = match (a.ints("kernel_shape"), kernel) {
        (Some(ks), Some((kh, kw))) if ks != [kh as i64, kw as i64] => {
            return Err(format!(
                "kernel_shape={ks:?} differs from the weight's kernel [{kh}, {kw}]"
            ))
        }
        (_, Some((kh, kw))) if kh != kw => {
            return Err(format!(
                "kernel [{kh}, {kw}]: only square kernels are supported"
            ))
        }
        (_, Some((kh, _))) => kh,
        (Some(_), None) => pair(a, "kernel_shape", 0, "kernels")?,
        (None, None) => return Err("kernel_shape is required".into()),
    };
    if k == 0 {
        return Err("an empty kernel".into());
    }
    let stride = pair(a, "strides", 1, "strides")?;
    let dilation = pair(a, "dilations", 1, "dilations")?;
    let pads = a.ints("pads").unwrap_or(&[0, 0, 0, 0]);
    let pad = match pads {
        [p, rest @ ..] if rest.len() == 3 && rest.iter().all(|q| q == p) && *p >= 0 => *p as usize,
        [_, _, _, _] => {
            return Err(format!(
                "pads={pads:?}: only equal padding on every side is supported \
                 ([top, left, bottom, right] all alike)"
            ))
        }
        _ => return Err(format!("pads={pads:?}: a 2-d window needs four values")),
    };
    match a.string("auto_pad", "NOTSET").as_str() {
        "NOTSET" | "" => {}
        "VALID" if pad == 0 => {}
        "VALID" => return Err(format!("auto_pad=VALID with pads={pads:?}")),
        other => {
            return Err(format!(
                "auto_pad={other} is not supported: export with explicit pads (PyTorch's \
                 exporters do)"
            ))
        }
    }
    Ok(Win {
        k,
        stride,
        pad,
        dilation,
    })
}

/// ⌊(size + 2·pad − dilation·(k − 1) − 1)/stride⌋ + 1, refusing a window
/// larger than its padded input.
fn out_len(size: usize, w: Win) -> R<usize> {
    out_len_mode(size, w, false)
}

/// [`out_len`], or with `ceil` (ceil_mode) ⌈…⌉ + 1 less one where the last
/// window would start past the input and its left padding, as PyTorch
/// (whose exports these are) and the `.arch` parser size it.
fn out_len_mode(size: usize, w: Win, ceil: bool) -> R<usize> {
    let eff = w
        .dilation
        .checked_mul(w.k - 1)
        .and_then(|e| e.checked_add(1))
        .ok_or("the kernel is too large")?;
    let padded = w
        .pad
        .checked_mul(2)
        .and_then(|p| p.checked_add(size))
        .ok_or("the padding is too large")?;
    if padded < eff {
        return Err(format!(
            "the kernel ({eff}) is larger than the padded input ({size} + 2·{})",
            w.pad
        ));
    }
    if !ceil {
        return Ok((padded - eff) / w.stride + 1);
    }
    let mut out = (padded - eff).div_ceil(w.stride) + 1;
    if (out - 1) * w.stride >= size + w.pad {
        out -= 1;
    }
    Ok(out)
}

/// The IR's convolution (grouped, depthwise and dilated included).
fn conv_op(
    weight: usize,
    bias: Option<usize>,
    cin: usize,
    cout: usize,
    win: Win,
    groups: usize,
) -> R<Op> {
    Ok(Op::Conv {
        groups,
        dilation: win.dilation,
        weight,
        bias,
        cin,
        cout,
        k: win.k,
        stride: win.stride,
        pad: win.pad,
    })
}

impl Builder<'_> {
    /// Reads node `idx`.
    pub fn node(&mut self, idx: usize, n: &NodeProto) -> R<()> {
        if let Some(&lin) = self.absorbed.get(&idx) {
            self.set(n, 0, Val::Value(lin));
            return Ok(());
        }
        if n.output.first().is_none_or(|o| o.is_empty()) {
            return Err("its first output has no name".into());
        }
        if !n.domain.is_empty() && n.domain != "ai.onnx" {
            return Err(format!(
                "ONNX op {}.{} is not supported",
                n.domain, n.op_type
            ));
        }
        let module = module_of(&n.name);
        if self.is_random(n) {
            return self.random(n);
        }
        match n.op_type.as_str() {
            "Conv" => self.conv(n, &module),
            "BatchNormalization" => self.bn(n, &module),
            "Relu" => self.act(n, &module, &[], Activation::Relu),
            "LeakyRelu" => {
                let slope = Attrs::only(n, &["alpha"])?.float("alpha", 0.01);
                if !slope.is_finite() {
                    return Err(format!("alpha={slope}: must be finite"));
                }
                self.act(n, &module, &["alpha"], Activation::LeakyRelu { slope })
            }
            "Tanh" => self.act(n, &module, &[], Activation::Tanh),
            "Sigmoid" => self.act(n, &module, &[], Activation::Sigmoid),
            "Gelu" => {
                let approx = Attrs::only(n, &["approximate"])?.string("approximate", "none");
                if approx != "none" {
                    return Err(format!(
                        "approximate={approx}: only the exact (erf) GELU is supported"
                    ));
                }
                self.act(n, &module, &["approximate"], Activation::Gelu)
            }
            "MaxPool" | "AveragePool" => self.pool(n, &module),
            "GlobalAveragePool" => {
                Attrs::only(n, &[])?;
                let (v, s) = self.image(n, 0)?;
                let id = self.push(
                    module,
                    Op::GlobalAvgPool,
                    vec![v],
                    Shape::new(s.c, 1, 1),
                    false,
                )?;
                self.set(n, 0, Val::Value(id));
                Ok(())
            }
            "ReduceMean" => self.reduce_mean(n, &module),
            "Flatten" => {
                let axis = Attrs::only(n, &["axis"])?.int("axis", 1);
                if axis != 1 {
                    return Err(format!(
                        "axis={axis}: only the flatten to [N, C·H·W] (axis=1) is supported"
                    ));
                }
                self.flatten(n, module)
            }
            "Reshape" => self.reshape(n, module),
            "Gemm" => self.gemm(n, &module),
            "MatMul" => self.matmul(n, &module),
            "Add" if !self.both_int_consts(n) => self.add(n, module),
            "Add" | "Sub" | "Mul" | "Div" if self.both_int_consts(n) => self.int_arith(n),
            "Mul" if self.mul_values(n, &module)?.is_some() => Ok(()),
            "Mul" | "Div" | "Erf" => self.gelu_piece(n, module),
            "Concat" => self.concat(n, module),
            "Slice" => self.slice(n, &module),
            "Split" => self.split(n, &module),
            "Shape" => self.shape_of(n),
            "Gather" => self.gather(n),
            "Unsqueeze" => self.unsqueeze(n),
            "Cast" => self.cast(n),
            "Clip" => self.clip(n, &module),
            "HardSigmoid" => self.hardsigmoid(n, &module),
            "HardSwish" => self.act(n, &module, &[], Activation::Hardswish),
            "Identity" | "Dropout" => {
                // Dropout is the identity, as in eval().
                Attrs::only(
                    n,
                    if n.op_type == "Dropout" {
                        &["seed"]
                    } else {
                        &[]
                    },
                )?;
                let v = match self.val(n, 0)? {
                    // An eval-mode export merges initializers of equal
                    // values (SqueezeNet's zero biases) into one, which
                    // Identity nodes hand on under each parameter's own
                    // name: each is a parameter of its own (tied
                    // parameters are read directly, with no Identity).
                    Val::Const(t, o) if n.op_type == "Identity" && o.init.is_some() => {
                        let out = &n.output[0];
                        let torch_name = is_module_name(out) && out.contains('.');
                        let init = if torch_name {
                            Some(out.clone())
                        } else {
                            o.init
                        };
                        Val::Const(t, Origin { init, ..o })
                    }
                    v => v,
                };
                self.set(n, 0, v);
                self.unread_from(n, 1, &["Dropout's mask"]);
                Ok(())
            }
            "Constant" => self.constant(n),
            "Transpose" => {
                let a = Attrs::only(n, &["perm"])?;
                if self.shuffle_transpose(n, a.ints("perm"))?.is_some() {
                    return Ok(());
                }
                let (t, o) = self.konst(n, 0)?;
                if t.dims.len() != 2 || a.ints("perm").is_some_and(|p| p != [1, 0]) {
                    return Err(format!(
                        "Transpose is supported only of a 2-d constant (a weight), not of dims \
                         {:?} with perm {:?}",
                        t.dims,
                        a.ints("perm")
                    ));
                }
                let (r, c) = (t.dims[0], t.dims[1]);
                let out = Tensor {
                    name: t.name.clone(),
                    dims: vec![c, r],
                    data: transpose(&t.data, r, c),
                    int: t.int,
                };
                let o = Origin {
                    init: o.init,
                    transposed: !o.transposed,
                };
                self.set(n, 0, Val::Const(Rc::new(out), o));
                Ok(())
            }
            op => Err(format!("ONNX op {op} is not supported")),
        }
    }

    pub(super) fn act(
        &mut self,
        n: &NodeProto,
        module: &str,
        attrs: &[&str],
        a: Activation,
    ) -> R<()> {
        Attrs::only(n, attrs)?;
        let (v, s, flat) = self.value(n, 0)?;
        let id = self.push(module.to_string(), Op::Act(a), vec![v], s, flat)?;
        self.set(n, 0, Val::Value(id));
        Ok(())
    }

    fn conv(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(
            n,
            &[
                "auto_pad",
                "dilations",
                "group",
                "kernel_shape",
                "pads",
                "strides",
            ],
        )?;
        let (v, s) = self.image(n, 0)?;
        let (w, wo) = self.konst(n, 1)?;
        let [cout, cpg, kh, kw] = w.dims[..] else {
            return Err(format!(
                "weight `{}` has dims {:?}; a 2-d convolution's is [COUT, CIN/group, K, K]",
                w.name, w.dims
            ));
        };
        let groups = a.int("group", 1);
        let groups = usize::try_from(groups)
            .ok()
            .filter(|&g| g >= 1)
            .ok_or_else(|| format!("group={groups}: must be at least 1"))?;
        if cpg.checked_mul(groups) != Some(s.c) || cout % groups != 0 || cout == 0 {
            return Err(format!(
                "weight `{}` of dims {:?} with group={groups} does not take the input's {} \
                 channels",
                w.name, w.dims, s.c
            ));
        }
        let win = window(&a, Some((kh, kw)))?;
        let (h, ww) = (out_len(s.h, win)?, out_len(s.w, win)?);
        let wname = self.param_name(&n.name, &wo, module, "weight")?;
        let module = Builder::module_for(&wname);
        let fan_in = cpg * kh * kw;
        let bias = if Builder::has_input(n, 2) {
            let (b, bo) = self.konst(n, 2)?;
            if b.dims != [cout] {
                return Err(format!(
                    "bias `{}` has dims {:?}, not [{cout}]",
                    b.name, b.dims
                ));
            }
            Some((self.param_name(&n.name, &bo, &module, "bias")?, b))
        } else {
            None
        };
        let weight = self.add_param(
            wname,
            vec![cout, cpg, kh, kw],
            Init::UniformFanIn(fan_in),
            w.data.clone(),
        )?;
        let bias = match bias {
            Some((name, b)) => Some(self.add_param(
                name,
                vec![cout],
                Init::UniformFanIn(fan_in),
                b.data.clone(),
            )?),
            None => None,
        };
        let op = conv_op(weight, bias, s.c, cout, win, groups)?;
        let id = self.push(module, op, vec![v], Shape::new(cout, h, ww), false)?;
        self.set(n, 0, Val::Value(id));
        Ok(())
    }

    fn bn(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(n, &["epsilon", "momentum", "training_mode", "spatial"])?;
        if a.int("spatial", 1) != 1 {
            return Err("spatial=0 is not supported".into());
        }
        // ONNX stores epsilon as a float32: its shortest decimal form is the
        // PyTorch module's eps (1e-5, MobileNetV3's 1e-3), as float64.
        let eps32 = a.float("epsilon", 1e-5) as f32;
        let eps: f64 = eps32.to_string().parse().unwrap_or(f64::NAN);
        if !(eps.is_finite() && eps > 0.0) {
            return Err(format!("epsilon={eps32}: must be a positive number"));
        }
        let (v, s) = self.image(n, 0)?;
        let mut ts = Vec::with_capacity(4);
        for i in 1..5 {
            let (t, o) = self.konst(n, i)?;
            if t.dims != [s.c] {
                return Err(format!(
                    "`{}` has dims {:?}; the input has {} channels",
                    t.name, t.dims, s.c
                ));
            }
            ts.push((t, o));
        }
        if let Some(bad) = ts[3].0.data.iter().find(|x| **x < 0.0) {
            return Err(format!(
                "running variance `{}` holds {bad}; a variance must not be negative",
                ts[3].0.name
            ));
        }
        let gname = self.param_name(&n.name, &ts[0].1, module, "weight")?;
        let module = Builder::module_for(&gname);
        let bname = self.param_name(&n.name, &ts[1].1, &module, "bias")?;
        let mname = self.param_name(&n.name, &ts[2].1, &module, "running_mean")?;
        let vname = self.param_name(&n.name, &ts[3].1, &module, "running_var")?;
        let c = s.c;
        let gamma = self.add_param(gname, vec![c], Init::Const(1.0), ts[0].0.data.clone())?;
        let beta = self.add_param(bname, vec![c], Init::Const(0.0), ts[1].0.data.clone())?;
        let running_mean = self.add_buffer(mname, ts[2].0.data.clone(), 0.0)?;
        let running_var = self.add_buffer(vname, ts[3].0.data.clone(), 1.0)?;
        let op = Op::BatchNorm {
            gamma,
            beta,
            running_mean,
            running_var,
            c,
            eps,
        };
        let id = self.push(module, op, vec![v], s, false)?;
        self.set(n, 0, Val::Value(id));
        self.unread_from(
            n,
            1,
            &[
                "batch norm's updated running mean",
                "batch norm's updated running variance",
            ],
        );
        Ok(())
    }

    fn pool(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let max = n.op_type == "MaxPool";
        let a = if max {
            Attrs::only(
                n,
                &[
                    "auto_pad",
                    "ceil_mode",
                    "dilations",
                    "kernel_shape",
                    "pads",
                    "storage_order",
                    "strides",
                ],
            )?
        } else {
            Attrs::only(
                n,
                &[
                    "auto_pad",
                    "ceil_mode",
                    "count_include_pad",
                    "dilations",
                    "kernel_shape",
                    "pads",
                    "strides",
                ],
            )?
        };
        let ceil = match a.int("ceil_mode", 0) {
            0 => false,
            1 => true,
            c => return Err(format!("ceil_mode={c}: must be 0 or 1")),
        };
        if a.int("storage_order", 0) != 0 {
            return Err("storage_order=1 is not supported".into());
        }
        let (v, s) = self.image(n, 0)?;
        let win = window(&a, None)?;
        if win.dilation != 1 {
            return Err(format!(
                "dilations=[{0}, {0}]: dilated pools are not supported",
                win.dilation
            ));
        }
        if 2 * win.pad > win.k {
            return Err(format!(
                "pads of {} exceed half the kernel {} (PyTorch's limit, which hesscope's pools share)",
                win.pad, win.k
            ));
        }
        if !max && win.pad > 0 && a.int("count_include_pad", 0) == 0 {
            return Err(
                "count_include_pad=0 with padding: hesscope's average pool divides every window \
                 by k·k, padding included (PyTorch's default count_include_pad=True)"
                    .into(),
            );
        }
        let out = Shape::new(
            s.c,
            out_len_mode(s.h, win, ceil)?,
            out_len_mode(s.w, win, ceil)?,
        );
        let (k, stride, pad) = (win.k, win.stride, win.pad);
        let op = if max {
            Op::MaxPool {
                k,
                stride,
                pad,
                ceil,
            }
        } else {
            Op::AvgPool {
                k,
                stride,
                pad,
                ceil,
            }
        };
        let id = self.push(module.to_string(), op, vec![v], out, false)?;
        self.set(n, 0, Val::Value(id));
        self.unread_from(n, 1, &["the max-pool indices"]);
        Ok(())
    }

    /// ReduceMean over the two spatial axes: the global average pool
    /// (what the dynamo exporter writes for `AdaptiveAvgPool2d(1)`).
    fn reduce_mean(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(n, &["axes", "keepdims", "noop_with_empty_axes"])?;
        let (v, s) = self.image(n, 0)?;
        let axes: Vec<i64> = match a.ints("axes") {
            Some(ax) => ax.to_vec(),
            None if Builder::has_input(n, 1) => {
                let (t, _) = self.konst(n, 1)?;
                t.data.iter().map(|&x| x as i64).collect()
            }
            None => vec![],
        };
        let mut norm: Vec<i64> = axes
            .iter()
            .map(|&x| if x < 0 { x + 4 } else { x })
            .collect();
        norm.sort_unstable();
        if norm != [2, 3] {
            return Err(format!(
                "ReduceMean over axes {axes:?} is not supported (only over [2, 3], the global \
                 average pool)"
            ));
        }
        let flat = a.int("keepdims", 1) == 0;
        let id = self.push(
            module.to_string(),
            Op::GlobalAvgPool,
            vec![v],
            Shape::new(s.c, 1, 1),
            flat,
        )?;
        self.set(n, 0, Val::Value(id));
        Ok(())
    }
}
