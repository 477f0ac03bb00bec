//! The float64 CPU reference executor: forward, R-forward, backward and
//! R-backward (Pearlmutter's forward-over-reverse) over the model graph.

use crate::engine::{BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::model::{Node, Op};
use crate::ops::{bn, conv, linear, loss, pool};

/// What the forward pass keeps for the later passes.
enum Saved {
    None,
    Bn { s: Vec<f64>, xhat: Vec<f64> },
    Mask(Vec<bool>),
    Arg(Vec<u32>),
}

pub struct CpuReference {
    pub problem: Problem,
    /// ReLU masks to use instead of the sign of the f64 pre-activation,
    /// per batch then per node (empty for non-ReLU nodes): lets a test
    /// isolate kernel error from f32/f64 kink flips.
    pub relu_masks: Option<Vec<Vec<Vec<bool>>>>,
}

/// Results of one pass over the data set.
pub struct PassOutput {
    pub loss: f64,
    pub grad: Vec<f64>,
    pub hv: Option<Vec<f64>>,
}

fn conv_geom(node: &Node, n: usize) -> conv::ConvGeom {
    let Op::Conv {
        cin,
        cout,
        k,
        stride,
        pad,
        ..
    } = node.op
    else {
        unreachable!("conv_geom on {}", node.kind())
    };
    conv::ConvGeom {
        n,
        cin,
        h: node.in_shape.h,
        w: node.in_shape.w,
        cout,
        k,
        stride,
        pad,
        oh: node.out_shape.h,
        ow: node.out_shape.w,
    }
}

fn add_into(dst: &mut Option<Vec<f64>>, src: Vec<f64>) {
    match dst {
        Some(d) => d.iter_mut().zip(&src).for_each(|(a, b)| *a += b),
        None => *dst = Some(src),
    }
}

impl CpuReference {
    pub fn new(problem: Problem) -> CpuReference {
        CpuReference {
            problem,
            relu_masks: None,
        }
    }

    fn slice<'a>(&self, theta: &'a [f64], idx: usize) -> &'a [f64] {
        let p = &self.problem.model.params[idx];
        &theta[p.offset..p.offset + p.numel()]
    }

    /// One pass over every batch: loss, gradient, and Hv when `v` is given.
    pub fn pass(&self, v: Option<&[f64]>) -> Result<PassOutput> {
        let pr = &self.problem;
        let np = pr.model.n_params;
        if let Some(v) = v {
            if v.len() != np {
                return Err(Error::Argument {
                    flag: "--vector".into(),
                    msg: format!("{} values for {np} parameters", v.len()),
                });
            }
        }
        let mut grad = vec![0.0; np];
        let mut hv = v.map(|_| vec![0.0; np]);
        let mut total = 0.0;
        let scale = 1.0 / pr.data.len() as f64;
        for (bi, (start, count)) in pr.data.batches(pr.batch).into_iter().enumerate() {
            total += self.batch_pass(bi, start, count, scale, v, &mut grad, hv.as_deref_mut())?;
        }
        if !total.is_finite() {
            return Err(Error::Numerical(format!(
                "the loss is {total}: the weights or data overflow in float64"
            )));
        }
        Ok(PassOutput {
            loss: total,
            grad,
            hv,
        })
    }

    /// The ReLU masks (input > 0) of every batch, per node.
    pub fn relu_mask_of(&self) -> Vec<Vec<Vec<bool>>> {
        let pr = &self.problem;
        pr.data
            .batches(pr.batch)
            .into_iter()
            .map(|(start, count)| {
                let (vals, _) = self.forward(usize::MAX, start, count);
                pr.model
                    .nodes
                    .iter()
                    .map(|n| match n.op {
                        Op::Relu => vals[n.inputs[0]].iter().map(|x| *x > 0.0).collect(),
                        _ => vec![],
                    })
                    .collect()
            })
            .collect()
    }

    fn forward(&self, bi: usize, start: usize, count: usize) -> (Vec<Vec<f64>>, Vec<Saved>) {
        let pr = &self.problem;
        let theta = &pr.weights.theta;
        let d = pr.model.input.numel();
        let mut vals: Vec<Vec<f64>> = Vec::with_capacity(pr.model.nodes.len() + 1);
        vals.push(
            pr.data.x[start * d..(start + count) * d]
                .iter()
                .map(|&v| v as f64)
                .collect(),
        );
        let mut saved = Vec::with_capacity(pr.model.nodes.len());
        for (ni, node) in pr.model.nodes.iter().enumerate() {
            let x = &vals[node.inputs[0]];
            let out_len = count * node.out_shape.numel();
            let (y, s) = match node.op {
                Op::Conv {
                    weight, bias, cout, ..
                } => {
                    let g = conv_geom(node, count);
                    let mut y = vec![0.0; out_len];
                    conv::forward_acc(&g, x, self.slice(theta, weight), &mut y);
                    if let Some(b) = bias {
                        conv::bias_acc(
                            count,
                            cout,
                            node.out_shape.spatial(),
                            self.slice(theta, b),
                            &mut y,
                        );
                    }
                    (y, Saved::None)
                }
                Op::Linear {
                    weight,
                    bias,
                    din,
                    dout,
                } => {
                    let mut y = vec![0.0; out_len];
                    linear::forward_acc(count, din, dout, x, self.slice(theta, weight), &mut y);
                    if let Some(b) = bias {
                        conv::bias_acc(count, dout, 1, self.slice(theta, b), &mut y);
                    }
                    (y, Saved::None)
                }
                Op::BatchNorm {
                    gamma,
                    beta,
                    running_mean,
                    running_var,
                    c,
                } => {
                    let g = bn::BnGeom {
                        n: count,
                        c,
                        hw: node.in_shape.spatial(),
                    };
                    let (mean, s) = match pr.bn {
                        BnMode::Batch => bn::batch_stats(&g, x),
                        BnMode::Running => bn::running_stats(
                            &pr.weights.buffers[running_mean],
                            &pr.weights.buffers[running_var],
                        ),
                    };
                    let (xhat, y) = bn::forward(
                        &g,
                        x,
                        &mean,
                        &s,
                        self.slice(theta, gamma),
                        self.slice(theta, beta),
                    );
                    (y, Saved::Bn { s, xhat })
                }
                Op::Relu => {
                    let mask: Vec<bool> = match &self.relu_masks {
                        Some(m) if bi != usize::MAX => m[bi][ni].clone(),
                        _ => x.iter().map(|v| *v > 0.0).collect(),
                    };
                    let y = x
                        .iter()
                        .zip(&mask)
                        .map(|(v, m)| if *m { *v } else { 0.0 })
                        .collect();
                    (y, Saved::Mask(mask))
                }
                Op::MaxPool { k, stride, pad } => {
                    let (s, o) = (node.in_shape, node.out_shape);
                    let (y, arg) =
                        pool::maxpool_forward(count * s.c, s.h, s.w, k, stride, pad, o.h, o.w, x);
                    (y, Saved::Arg(arg))
                }
                Op::GlobalAvgPool => {
                    let s = node.in_shape;
                    (pool::gap_forward(count * s.c, s.spatial(), x), Saved::None)
                }
                Op::Flatten => (x.clone(), Saved::None),
                Op::Add => {
                    let b = &vals[node.inputs[1]];
                    (x.iter().zip(b).map(|(p, q)| p + q).collect(), Saved::None)
                }
            };
            vals.push(y);
            saved.push(s);
        }
        (vals, saved)
    }

    #[allow(clippy::too_many_arguments)]
    fn batch_pass(
        &self,
        bi: usize,
        start: usize,
        count: usize,
        scale: f64,
        v: Option<&[f64]>,
        grad: &mut [f64],
        mut hv: Option<&mut [f64]>,
    ) -> Result<f64> {
        let pr = &self.problem;
        let theta = &pr.weights.theta;
        let nodes = &pr.model.nodes;
        let batch_mode = pr.bn == BnMode::Batch;
        let (vals, saved) = self.forward(bi, start, count);

        // R-forward: the directional derivative of every value along v.
        let mut dvals: Vec<Vec<f64>> = Vec::new();
        let mut bn_rf: Vec<Option<(Vec<f64>, Vec<f64>)>> = Vec::new(); // (x̂̇, mean(x̂ẋ))
        if let Some(v) = v {
            dvals.push(vec![0.0; vals[0].len()]);
            for (node, sv) in nodes.iter().zip(&saved) {
                let x = &vals[node.inputs[0]];
                let dx = &dvals[node.inputs[0]];
                let out_len = count * node.out_shape.numel();
                let mut rf = None;
                let dy = match (&node.op, sv) {
                    (
                        Op::Conv {
                            weight, bias, cout, ..
                        },
                        _,
                    ) => {
                        let g = conv_geom(node, count);
                        let mut y = vec![0.0; out_len];
                        conv::forward_acc(&g, dx, self.slice(theta, *weight), &mut y);
                        conv::forward_acc(&g, x, self.slice(v, *weight), &mut y);
                        if let Some(b) = bias {
                            conv::bias_acc(
                                count,
                                *cout,
                                node.out_shape.spatial(),
                                self.slice(v, *b),
                                &mut y,
                            );
                        }
                        y
                    }
                    (
                        Op::Linear {
                            weight,
                            bias,
                            din,
                            dout,
                        },
                        _,
                    ) => {
                        let mut y = vec![0.0; out_len];
                        linear::forward_acc(
                            count,
                            *din,
                            *dout,
                            dx,
                            self.slice(theta, *weight),
                            &mut y,
                        );
                        linear::forward_acc(count, *din, *dout, x, self.slice(v, *weight), &mut y);
                        if let Some(b) = bias {
                            conv::bias_acc(count, *dout, 1, self.slice(v, *b), &mut y);
                        }
                        y
                    }
                    (Op::BatchNorm { gamma, beta, c, .. }, Saved::Bn { s, xhat }) => {
                        let g = bn::BnGeom {
                            n: count,
                            c: *c,
                            hw: node.in_shape.spatial(),
                        };
                        let (xhd, dy, mxx) = bn::r_forward(
                            &g,
                            batch_mode,
                            dx,
                            xhat,
                            s,
                            self.slice(theta, *gamma),
                            self.slice(v, *gamma),
                            self.slice(v, *beta),
                        );
                        rf = Some((xhd, mxx));
                        dy
                    }
                    (Op::Relu, Saved::Mask(m)) => dx
                        .iter()
                        .zip(m)
                        .map(|(d, m)| if *m { *d } else { 0.0 })
                        .collect(),
                    (Op::MaxPool { .. }, Saved::Arg(arg)) => {
                        let (s, o) = (node.in_shape, node.out_shape);
                        pool::maxpool_gather(count * s.c, s.spatial(), o.spatial(), arg, dx)
                    }
                    (Op::GlobalAvgPool, _) => {
                        pool::gap_forward(count * node.in_shape.c, node.in_shape.spatial(), dx)
                    }
                    (Op::Flatten, _) => dx.clone(),
                    (Op::Add, _) => dx
                        .iter()
                        .zip(&dvals[node.inputs[1]])
                        .map(|(p, q)| p + q)
                        .collect(),
                    _ => unreachable!("forward saved the wrong state for {}", node.kind()),
                };
                dvals.push(dy);
                bn_rf.push(rf);
            }
        }

        // Loss, its gradient and (with v) its R-gradient.
        let k = pr.model.classes;
        let z = vals.last().unwrap();
        let y = &pr.data.y[start..start + count];
        let (l, gz, p) = loss::forward_backward(count, k, z, y, scale);
        let nv = vals.len();
        let mut adj: Vec<Option<Vec<f64>>> = vec![None; nv];
        let mut radj: Vec<Option<Vec<f64>>> = vec![None; nv];
        adj[nv - 1] = Some(gz);
        if v.is_some() {
            radj[nv - 1] = Some(loss::r_backward(count, k, &p, dvals.last().unwrap(), scale));
        }

        // Backward and R-backward, node by node in reverse.
        for (ni, node) in nodes.iter().enumerate().rev() {
            let Some(gy) = adj[ni + 1].take() else {
                continue;
            };
            let rgy = radj[ni + 1].take();
            let x = &vals[node.inputs[0]];
            let in_len = count * node.in_shape.numel();
            let mut gx = vec![0.0; in_len];
            let mut rgx = rgy.as_ref().map(|_| vec![0.0; in_len]);
            match (&node.op, &saved[ni]) {
                (
                    Op::Conv {
                        weight, bias, cout, ..
                    },
                    _,
                ) => {
                    let g = conv_geom(node, count);
                    let w = self.slice(theta, *weight);
                    let p = &pr.model.params[*weight];
                    conv::backward_data_acc(&g, &gy, w, &mut gx);
                    conv::backward_weight_acc(
                        &g,
                        &gy,
                        x,
                        &mut grad[p.offset..p.offset + p.numel()],
                    );
                    let plane = node.out_shape.spatial();
                    if let Some(b) = bias {
                        let pb = &pr.model.params[*b];
                        conv::bias_grad_acc(
                            count,
                            *cout,
                            plane,
                            &gy,
                            &mut grad[pb.offset..pb.offset + pb.numel()],
                        );
                    }
                    if let (Some(rgy), Some(rgx), Some(hv), Some(v)) =
                        (&rgy, &mut rgx, hv.as_deref_mut(), v)
                    {
                        conv::backward_data_acc(&g, rgy, w, rgx);
                        conv::backward_data_acc(&g, &gy, self.slice(v, *weight), rgx);
                        let hw = &mut hv[p.offset..p.offset + p.numel()];
                        conv::backward_weight_acc(&g, rgy, x, hw);
                        conv::backward_weight_acc(&g, &gy, &dvals[node.inputs[0]], hw);
                        if let Some(b) = bias {
                            let pb = &pr.model.params[*b];
                            conv::bias_grad_acc(
                                count,
                                *cout,
                                plane,
                                rgy,
                                &mut hv[pb.offset..pb.offset + pb.numel()],
                            );
                        }
                    }
                }
                (
                    Op::Linear {
                        weight,
                        bias,
                        din,
                        dout,
                    },
                    _,
                ) => {
                    let (din, dout) = (*din, *dout);
                    let w = self.slice(theta, *weight);
                    let p = &pr.model.params[*weight];
                    linear::backward_data_acc(count, din, dout, &gy, w, &mut gx);
                    linear::backward_weight_acc(
                        count,
                        din,
                        dout,
                        &gy,
                        x,
                        &mut grad[p.offset..p.offset + p.numel()],
                    );
                    if let Some(b) = bias {
                        let pb = &pr.model.params[*b];
                        conv::bias_grad_acc(
                            count,
                            dout,
                            1,
                            &gy,
                            &mut grad[pb.offset..pb.offset + pb.numel()],
                        );
                    }
                    if let (Some(rgy), Some(rgx), Some(hv), Some(v)) =
                        (&rgy, &mut rgx, hv.as_deref_mut(), v)
                    {
                        linear::backward_data_acc(count, din, dout, rgy, w, rgx);
                        linear::backward_data_acc(
                            count,
                            din,
                            dout,
                            &gy,
                            self.slice(v, *weight),
                            rgx,
                        );
                        let hw = &mut hv[p.offset..p.offset + p.numel()];
                        linear::backward_weight_acc(count, din, dout, rgy, x, hw);
                        linear::backward_weight_acc(
                            count,
                            din,
                            dout,
                            &gy,
                            &dvals[node.inputs[0]],
                            hw,
                        );
                        if let Some(b) = bias {
                            let pb = &pr.model.params[*b];
                            conv::bias_grad_acc(
                                count,
                                dout,
                                1,
                                rgy,
                                &mut hv[pb.offset..pb.offset + pb.numel()],
                            );
                        }
                    }
                }
                (Op::BatchNorm { gamma, beta, c, .. }, Saved::Bn { s, xhat }) => {
                    let g = bn::BnGeom {
                        n: count,
                        c: *c,
                        hw: node.in_shape.spatial(),
                    };
                    let gm = self.slice(theta, *gamma);
                    let (bgx, dg, db) = bn::backward(&g, batch_mode, &gy, xhat, s, gm);
                    gx = bgx;
                    let (pg, pb) = (&pr.model.params[*gamma], &pr.model.params[*beta]);
                    grad[pg.offset..pg.offset + *c]
                        .iter_mut()
                        .zip(&dg)
                        .for_each(|(a, b)| *a += b);
                    grad[pb.offset..pb.offset + *c]
                        .iter_mut()
                        .zip(&db)
                        .for_each(|(a, b)| *a += b);
                    if let (Some(rgy), Some(hv), Some(v)) = (&rgy, hv.as_deref_mut(), v) {
                        let (xhd, mxx) = bn_rf[ni].as_ref().unwrap();
                        let (r, rdg, rdb) = bn::r_backward(
                            &g,
                            batch_mode,
                            &gy,
                            rgy,
                            xhat,
                            xhd,
                            s,
                            mxx,
                            gm,
                            self.slice(v, *gamma),
                        );
                        rgx = Some(r);
                        hv[pg.offset..pg.offset + *c]
                            .iter_mut()
                            .zip(&rdg)
                            .for_each(|(a, b)| *a += b);
                        hv[pb.offset..pb.offset + *c]
                            .iter_mut()
                            .zip(&rdb)
                            .for_each(|(a, b)| *a += b);
                    }
                }
                (Op::Relu, Saved::Mask(m)) => {
                    gx = gy
                        .iter()
                        .zip(m)
                        .map(|(g, m)| if *m { *g } else { 0.0 })
                        .collect();
                    rgx = rgy.as_ref().map(|r| {
                        r.iter()
                            .zip(m)
                            .map(|(g, m)| if *m { *g } else { 0.0 })
                            .collect()
                    });
                }
                (Op::MaxPool { .. }, Saved::Arg(arg)) => {
                    let (s, o) = (node.in_shape, node.out_shape);
                    let planes = count * s.c;
                    gx = pool::maxpool_scatter(planes, s.spatial(), o.spatial(), arg, &gy);
                    rgx = rgy
                        .as_ref()
                        .map(|r| pool::maxpool_scatter(planes, s.spatial(), o.spatial(), arg, r));
                }
                (Op::GlobalAvgPool, _) => {
                    let s = node.in_shape;
                    gx = pool::gap_backward(count * s.c, s.spatial(), &gy);
                    rgx = rgy
                        .as_ref()
                        .map(|r| pool::gap_backward(count * s.c, s.spatial(), r));
                }
                (Op::Flatten, _) => {
                    gx = gy.clone();
                    rgx = rgy.clone();
                }
                (Op::Add, _) => {
                    add_into(&mut adj[node.inputs[1]], gy.clone());
                    if let Some(r) = &rgy {
                        add_into(&mut radj[node.inputs[1]], r.clone());
                    }
                    gx = gy;
                    rgx = rgy;
                }
                _ => unreachable!("forward saved the wrong state for {}", node.kind()),
            }
            add_into(&mut adj[node.inputs[0]], gx);
            if let Some(r) = rgx {
                add_into(&mut radj[node.inputs[0]], r);
            }
        }
        Ok(l)
    }
}

impl Curvature for CpuReference {
    fn n_params(&self) -> usize {
        self.problem.model.n_params
    }
    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        let o = self.pass(None)?;
        Ok((o.loss, o.grad))
    }
    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        let o = self.pass(Some(v))?;
        out.copy_from_slice(&o.hv.unwrap());
        Ok(())
    }
    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let o = self.pass(Some(v))?;
        Ok((o.loss, o.grad, o.hv.unwrap()))
    }
    fn backend(&self) -> String {
        "cpu".into()
    }
    fn adapter(&self) -> String {
        "float64 reference".into()
    }
}
