//! The channel ops of torchvision's lighter CNNs: Concat along channels
//! (SqueezeNet, ShuffleNet), Slice and Split along channels (`chunk`),
//! ShuffleNet's channel shuffle (Reshape, Transpose, Reshape), Mul of two
//! values (squeeze-and-excitation), and the activations Clip(0, 6) (ReLU6),
//! HardSigmoid and HardSwish.

use super::convert::{Attrs, Builder, Val, R};
use super::proto::NodeProto;
use crate::model::graph::{Activation, Op, Shape};

/// Within float32 rounding of `target` (ONNX stores float attributes as
/// float32).
fn near(x: f64, target: f64) -> bool {
    (x - target).abs() <= 1e-6 * target.abs().max(1e-30)
}

impl Builder<'_> {
    /// A scalar constant input, when there is one.
    fn scalar_input(&mut self, n: &NodeProto, i: usize) -> R<Option<f64>> {
        if !Builder::has_input(n, i) {
            return Ok(None);
        }
        let (t, _) = self.konst(n, i)?;
        if t.numel() != 1 {
            return Err(format!(
                "input {} (`{}`) of {} must be a scalar, not of dims {:?}",
                i + 1,
                n.input[i],
                n.op_type,
                t.dims
            ));
        }
        Ok(Some(t.data[0]))
    }

    /// The channel axis: 1 (or −3 of an image).
    fn channel_axis(axis: i64, what: &str) -> R<()> {
        if axis == 1 || axis == -3 {
            Ok(())
        } else {
            Err(format!(
                "{what} along axis {axis} is not supported (only along the channels, axis 1)"
            ))
        }
    }

    /// Concat: of values along channels (torch.cat(dim=1)), or of shape
    /// constants (folded).
    pub(super) fn concat(&mut self, n: &NodeProto, module: String) -> R<()> {
        if n.input.is_empty() {
            return Err("Concat without inputs".into());
        }
        if let Val::Const(..) = self.val(n, 0)? {
            return self.concat_consts(n);
        }
        let axis = Attrs::only(n, &["axis"])?.int("axis", 1);
        Builder::channel_axis(axis, "Concat")?;
        let mut ids = vec![];
        let mut c = 0usize;
        let mut hw = None;
        for i in 0..n.input.len() {
            let (v, s) = self.image(n, i)?;
            if *hw.get_or_insert((s.h, s.w)) != (s.h, s.w) {
                return Err(format!(
                    "concatenates images of different sizes ({}×{} and {}×{})",
                    hw.unwrap().0,
                    hw.unwrap().1,
                    s.h,
                    s.w
                ));
            }
            c = c.checked_add(s.c).ok_or("too many channels")?;
            ids.push(v);
        }
        let (h, w) = hw.unwrap_or((1, 1));
        let out = if ids.len() == 1 {
            ids[0]
        } else {
            self.push(module, Op::Concat, ids, Shape::new(c, h, w), false)?
        };
        self.set(n, 0, Val::Value(out));
        Ok(())
    }

    fn narrow(&mut self, module: &str, v: usize, s: Shape, start: usize, len: usize) -> R<usize> {
        if start == 0 && len == s.c {
            return Ok(v);
        }
        self.push(
            module.to_string(),
            Op::Narrow { start, len },
            vec![v],
            Shape::new(len, s.h, s.w),
            false,
        )
    }

    /// Slice of an image along channels with step 1: torch.narrow, or one
    /// part of `chunk`.
    pub(super) fn slice(&mut self, n: &NodeProto, module: &str) -> R<()> {
        Attrs::only(n, &[])?;
        let (v, s) = self.image(n, 0)?;
        let one = |b: &mut Self, i: usize, what: &str| -> R<i64> {
            let (t, _) = b.konst(n, i)?;
            match t.data[..] {
                [x] if t.int => Ok(x as i64),
                _ => Err(format!(
                    "{what} `{}` must be one integer (a slice along one axis), not {:?}",
                    n.input[i], t.data
                )),
            }
        };
        let start = one(self, 1, "starts")?;
        let end = one(self, 2, "ends")?;
        if !Builder::has_input(n, 3) {
            return Err(
                "Slice without axes is not supported (only along the channels, axis 1)".into(),
            );
        }
        Builder::channel_axis(one(self, 3, "axes")?, "Slice")?;
        if Builder::has_input(n, 4) && one(self, 4, "steps")? != 1 {
            return Err("only Slice with step 1 is supported".into());
        }
        let c = s.c as i64;
        let clamp = |x: i64| if x < 0 { (x + c).max(0) } else { x.min(c) };
        let (a, b) = (clamp(start), clamp(end));
        if b <= a {
            return Err(format!(
                "channels [{start}, {end}) of {c} are empty; hesscope reads non-empty slices"
            ));
        }
        let id = self.narrow(module, v, s, a as usize, (b - a) as usize)?;
        self.set(n, 0, Val::Value(id));
        Ok(())
    }

    /// Split of an image along channels into its outputs (by the `split`
    /// input, or equally).
    pub(super) fn split(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(n, &["axis", "num_outputs"])?;
        Builder::channel_axis(a.int("axis", 0), "Split")?;
        let (v, s) = self.image(n, 0)?;
        let parts = n.output.len();
        let sizes: Vec<usize> = if Builder::has_input(n, 1) {
            let (t, _) = self.konst(n, 1)?;
            if !t.int || t.data.iter().any(|&x| x < 1.0) {
                return Err(format!(
                    "split sizes {:?} must be positive integers",
                    t.data
                ));
            }
            t.data.iter().map(|&x| x as usize).collect()
        } else {
            let k = s.c.div_ceil(parts.max(1));
            (0..parts)
                .map(|j| k.min(s.c.saturating_sub(j * k)))
                .collect()
        };
        if sizes.len() != parts || sizes.iter().sum::<usize>() != s.c || sizes.contains(&0) {
            return Err(format!(
                "split sizes {sizes:?} into {parts} outputs do not cover the {} channels",
                s.c
            ));
        }
        let mut start = 0;
        for (j, &len) in sizes.iter().enumerate() {
            let id = self.narrow(module, v, s, start, len)?;
            self.set(n, j, Val::Value(id));
            start += len;
        }
        Ok(())
    }

    /// The channel shuffle's Reshape steps: an image to [N, G, C/G, H, W],
    /// and its transposed form back to [N, C, H, W]. `None`: not one.
    pub(super) fn shuffle_reshape(
        &mut self,
        n: &NodeProto,
        module: &str,
        target: &[i64],
        batch_ok: bool,
    ) -> R<Option<()>> {
        match (self.val(n, 0)?, target) {
            (Val::Value(v), [_, g, cg, h, w]) if batch_ok => {
                let (s, flat) = self.shapes[v];
                let (g, cg) = (*g, *cg);
                let groups_ok =
                    g >= 1 && (s.c as i64) % g == 0 && (cg == -1 || cg * g == s.c as i64);
                if flat || !groups_ok || *h != s.h as i64 || *w != s.w as i64 {
                    return Err(format!(
                        "Reshape of an image {s} to {target:?} is not supported (only the \
                         channel shuffle's [N, G, C/G, H, W], and the flatten to [N, C·H·W])"
                    ));
                }
                let groups = g as usize;
                self.set(
                    n,
                    0,
                    Val::Shuffle {
                        v,
                        groups,
                        transposed: false,
                    },
                );
                Ok(Some(()))
            }
            (
                Val::Shuffle {
                    v,
                    groups,
                    transposed: true,
                },
                [_, c, h, w],
            ) if batch_ok => {
                let s = self.shapes[v].0;
                if !(*c == s.c as i64 || *c == -1) || *h != s.h as i64 || *w != s.w as i64 {
                    return Err(format!(
                        "the channel shuffle of {s} reshaped to {target:?}, not back to [N, {}, \
                         {}, {}]",
                        s.c, s.h, s.w
                    ));
                }
                let id = self.push(
                    module.to_string(),
                    Op::ChannelShuffle { groups },
                    vec![v],
                    s,
                    false,
                )?;
                self.set(n, 0, Val::Value(id));
                Ok(Some(()))
            }
            (Val::Shuffle { .. }, _) => Err(format!(
                "Reshape to {target:?} within a channel shuffle (only Transpose perm [0, 2, 1, \
                 3, 4] and the Reshape back to [N, C, H, W] are)"
            )),
            _ => Ok(None),
        }
    }

    /// The channel shuffle's Transpose: perm [0, 2, 1, 3, 4] of its
    /// reshaped form. `None`: not one.
    pub(super) fn shuffle_transpose(
        &mut self,
        n: &NodeProto,
        perm: Option<&[i64]>,
    ) -> R<Option<()>> {
        match self.val(n, 0)? {
            Val::Shuffle {
                v,
                groups,
                transposed: false,
            } if perm == Some(&[0, 2, 1, 3, 4][..]) => {
                self.set(
                    n,
                    0,
                    Val::Shuffle {
                        v,
                        groups,
                        transposed: true,
                    },
                );
                Ok(Some(()))
            }
            Val::Shuffle { .. } => Err(format!(
                "Transpose with perm {:?} within a channel shuffle (only [0, 2, 1, 3, 4] is \
                 supported)",
                perm.unwrap_or_default()
            )),
            _ => Ok(None),
        }
    }

    /// Mul of two values: x·s with s of x's shape, or s [N, C, 1, 1]
    /// broadcast over x's H and W (squeeze-and-excitation; either order).
    /// `None`: not two values (a piece of GELU's erf form, maybe).
    pub(super) fn mul_values(&mut self, n: &NodeProto, module: &str) -> R<Option<()>> {
        let (Val::Value(a), Val::Value(b)) = (self.val(n, 0)?, self.val(n, 1)?) else {
            return Ok(None);
        };
        Attrs::only(n, &[])?;
        let ((sa, fa), (sb, fb)) = (self.shapes[a], self.shapes[b]);
        let squeeze = |s: Shape, f: bool| !f && s.h == 1 && s.w == 1;
        let (x, s) = if (sa == sb && fa == fb) || (!fa && squeeze(sb, fb) && sb.c == sa.c) {
            (a, b)
        } else if !fb && squeeze(sa, fa) && sa.c == sb.c {
            (b, a)
        } else {
            return Err(format!(
                "multiplies values of shapes {sa} and {sb}; hesscope multiplies two values of \
                 one shape, or an image [C, H, W] by a [C, 1, 1] (squeeze-and-excitation)"
            ));
        };
        let (out, flat) = self.shapes[x];
        let id = self.push(module.to_string(), Op::Mul, vec![x, s], out, flat)?;
        self.set(n, 0, Val::Value(id));
        Ok(Some(()))
    }

    /// Clip(min 0, max 6) is ReLU6 (min 0 and no max: ReLU); its bounds
    /// are inputs (opset 11 and later).
    pub(super) fn clip(&mut self, n: &NodeProto, module: &str) -> R<()> {
        Attrs::only(n, &[])?;
        let lo = self.scalar_input(n, 1)?;
        let hi = self.scalar_input(n, 2)?;
        let act = match (lo, hi) {
            (Some(l), Some(h)) if l == 0.0 && h == 6.0 => Activation::Relu6,
            (Some(0.0), None) => Activation::Relu,
            _ => {
                return Err(format!(
                    "Clip to [{}, {}] is not supported (only [0, 6], ReLU6, and [0, ∞), ReLU)",
                    lo.map_or("-∞".into(), |x| x.to_string()),
                    hi.map_or("∞".into(), |x| x.to_string())
                ))
            }
        };
        self.act(n, module, &[], act)
    }

    /// HardSigmoid max(0, min(1, αx + β)) with PyTorch's α = 1/6, β = 1/2.
    pub(super) fn hardsigmoid(&mut self, n: &NodeProto, module: &str) -> R<()> {
        let a = Attrs::only(n, &["alpha", "beta"])?;
        let (alpha, beta) = (a.float("alpha", 0.2), a.float("beta", 0.5));
        if !near(alpha, 1.0 / 6.0) || beta != 0.5 {
            return Err(format!(
                "alpha={alpha}, beta={beta}: only PyTorch's Hardsigmoid (alpha=1/6, beta=0.5) \
                 is supported"
            ));
        }
        self.act(n, module, &["alpha", "beta"], Activation::Hardsigmoid)
    }
}
