//! The windowed layers of the architecture language: `conv` (with groups
//! and dilation) and the `maxpool` / `avgpool` pools (with ceil_mode), and
//! the output-size rule they share.

use super::Parser;
use crate::error::Result;
use crate::model::graph::{Init, Op, Shape};

/// A `conv` line's arguments.
#[derive(Clone, Copy, Debug)]
pub(super) struct ConvArgs {
    pub cout: usize,
    pub k: usize,
    pub stride: usize,
    pub pad: usize,
    pub bias: bool,
    /// Conv2d's groups: CIN and COUT must be multiples of it.
    pub groups: usize,
    /// Conv2d's dilation: the taps are `dilation` apart.
    pub dilation: usize,
}

impl Parser<'_> {
    /// Output length of a window of size `k`, `stride` and zero padding
    /// `pad` over `size` inputs: ⌊(size + 2·pad − k)/stride⌋ + 1, or with
    /// `ceil` (PyTorch's ceil_mode) ⌈…⌉ + 1, less one where the last window
    /// would start past the input and its left padding
    /// ((out − 1)·stride ≥ size + pad), as PyTorch's pooling_output_shape.
    pub(super) fn window_out(
        &self,
        layer: &str,
        size: usize,
        k: usize,
        stride: usize,
        pad: usize,
        ceil: bool,
    ) -> Result<usize> {
        let padded = pad
            .checked_mul(2)
            .and_then(|p| p.checked_add(size))
            .ok_or_else(|| self.e(format!("{layer}: pad={pad} is too large")))?;
        if padded < k {
            return Err(self.e(format!(
                "{layer}: kernel size {k} is larger than the padded input ({size} + 2·{pad} = {padded})"
            )));
        }
        if !ceil {
            return Ok((padded - k) / stride + 1);
        }
        let mut out = (padded - k).div_ceil(stride) + 1;
        if (out - 1) * stride >= size + pad {
            out -= 1;
        }
        Ok(out)
    }

    /// A dense conv (groups 1, dilation 1): `basicblock`'s.
    pub(super) fn conv(
        &mut self,
        local: &str,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<()> {
        let args = ConvArgs {
            cout,
            k,
            stride,
            pad,
            bias,
            groups: 1,
            dilation: 1,
        };
        self.conv_with(local, args)
    }

    pub(super) fn conv_with(&mut self, local: &str, a: ConvArgs) -> Result<()> {
        let ConvArgs {
            cout,
            k,
            stride,
            pad,
            bias,
            groups,
            dilation,
        } = a;
        let (v, s) = self.image_input("conv", "Conv2d")?;
        if k == 0 || stride == 0 || cout == 0 {
            return Err(self.e("conv needs positive COUT, k and stride"));
        }
        let name = self.full_name(local);
        if groups == 0 || dilation == 0 {
            return Err(self.e(format!(
                "conv `{name}`: groups and dilation must be at least 1 (groups={groups}, \
                 dilation={dilation})"
            )));
        }
        if !s.c.is_multiple_of(groups) || !cout.is_multiple_of(groups) {
            return Err(self.e(format!(
                "conv `{name}`: groups={groups} must divide both the input channels ({}) and \
                 COUT ({cout}), as PyTorch's Conv2d requires",
                s.c
            )));
        }
        // The window a dilated kernel spans: dilation·(k − 1) + 1.
        let span = (k - 1)
            .checked_mul(dilation)
            .and_then(|x| x.checked_add(1))
            .ok_or_else(|| self.e(format!("conv `{name}`: dilation={dilation} is too large")))?;
        let label = format!("conv `{name}`");
        let h = self.window_out(&label, s.h, span, stride, pad, false)?;
        let w = self.window_out(&label, s.w, span, stride, pad, false)?;
        let out = self.shape(&format!("the output of conv `{name}`"), cout, h, w)?;
        let cin_g = s.c / groups;
        let fan_in = self.elements(&format!("conv `{name}`'s fan-in"), &[cin_g, k, k])?;
        let weight = self.add_param(
            format!("{name}.weight"),
            vec![cout, cin_g, k, k],
            Init::UniformFanIn(fan_in),
        )?;
        let bias = if bias {
            Some(self.add_param(
                format!("{name}.bias"),
                vec![cout],
                Init::UniformFanIn(fan_in),
            )?)
        } else {
            None
        };
        let op = Op::Conv {
            weight,
            bias,
            cin: s.c,
            cout,
            k,
            stride,
            pad,
            groups,
            dilation,
        };
        self.push(name, op, vec![v], out, false)
    }

    pub(super) fn pool(
        &mut self,
        kw: &str,
        local: &str,
        k: usize,
        stride: usize,
        pad: usize,
        ceil: bool,
    ) -> Result<()> {
        let torch = if kw == "maxpool" {
            "MaxPool2d"
        } else {
            "AvgPool2d"
        };
        let (v, s) = self.image_input(kw, torch)?;
        if k == 0 || stride == 0 {
            return Err(self.e(format!("{kw} needs positive k and stride")));
        }
        // PyTorch: "pad should be at most half of effective kernel size".
        if pad > k / 2 {
            return Err(self.e(format!(
                "{kw} k={k} pad={pad}: pad should be at most half of effective kernel size \
                 (pad <= {}), as PyTorch's {torch} requires",
                k / 2
            )));
        }
        let name = self.optional_name(local);
        let mut label = format!("{kw} k={k} stride={stride} pad={pad}");
        if ceil {
            label.push_str(" ceil=true");
        }
        let h = self.window_out(&label, s.h, k, stride, pad, ceil)?;
        let w = self.window_out(&label, s.w, k, stride, pad, ceil)?;
        let out = Shape::new(s.c, h, w);
        let op = if kw == "maxpool" {
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
        self.push(name, op, vec![v], out, false)
    }
}
