//! ConvNeXt's channels-last layers in the architecture language:
//! `untokens [NAME] h=H w=W` (sequence [H·W, C] -> image [C, H, W], the
//! inverse of `tokens`: a LayerNorm2d is `tokens`, `layernorm`,
//! `untokens`, and the block's Linear layers on the channels are
//! `linear`s between them) and `mul_param [NAME] PARAM [init=1e-6]` (the
//! image times a raw parameter PARAM [C, 1, 1], torchvision's
//! `layer_scale`, initialised to the constant `init` as
//! torchvision's `layer_scale` argument).

use super::Parser;
use crate::error::Result;
use crate::model::graph::{Init, Node, Op};
use crate::model::Model;
use std::collections::BTreeMap;

/// torchvision ConvNeXt's default layer scale (`layer_scale=1e-6`).
pub const LAYER_SCALE_INIT: f64 = 1e-6;

impl Parser<'_> {
    /// `untokens [NAME] h=H w=W`.
    pub(super) fn untokens(&mut self, name: String, kv: &BTreeMap<&str, &str>) -> Result<()> {
        let label = label("untokens", &name);
        let dim = |k: &str| -> Result<usize> {
            let s = kv
                .get(k)
                .ok_or_else(|| self.e(format!("{label}: {k}=N is required")))?;
            s.parse::<usize>().ok().filter(|&v| v > 0).ok_or_else(|| {
                self.e(format!(
                    "{label}: {k} must be a positive whole number, got `{s}`"
                ))
            })
        };
        let (h, w) = (dim("h")?, dim("w")?);
        let (v, s) = self.seq_input(&label)?;
        if h.checked_mul(w) != Some(s.tokens()) {
            return Err(self.e(format!(
                "{label}: h={h} w={w} make {} positions, but the input has {} tokens",
                h as u128 * w as u128,
                s.tokens()
            )));
        }
        let out = self.shape(&format!("the output of {label}"), s.features(), h, w)?;
        self.push(name, Op::Untokens { h, w }, vec![v], out, false)
    }

    /// `mul_param [NAME] PARAM [init=1e-6]`.
    pub(super) fn mul_param(
        &mut self,
        name: String,
        param: String,
        kv: &BTreeMap<&str, &str>,
    ) -> Result<()> {
        let label = label("mul_param", &name);
        let init = match kv.get("init") {
            None => LAYER_SCALE_INIT,
            Some(s) => s
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .ok_or_else(|| {
                    self.e(format!("{label}: init must be a finite number, got `{s}`"))
                })?,
        };
        let (v, s) = self.cur()?;
        if self.is_flat(v) || !s.is_image() {
            let got = if self.is_flat(v) {
                format!("flat [{}]", s.c)
            } else {
                s.to_string()
            };
            return Err(self.e(format!(
                "{label} scales the channels of an image [C, H, W], but its input is {got}"
            )));
        }
        let p = self.add_param(param, vec![s.c, 1, 1], Init::Const(init))?;
        self.push(name, Op::MulParam { param: p }, vec![v], s, false)
    }
}

fn label(kw: &str, name: &str) -> String {
    if name.is_empty() {
        kw.to_string()
    } else {
        format!("{kw} `{name}`")
    }
}

/// The explicit-form arguments of `untokens` and `mul_param`.
pub(super) fn channels_last_args(model: &Model, node: &Node) -> Option<String> {
    match node.op {
        Op::Untokens { h, w } => Some(format!(" h={h} w={w}")),
        Op::MulParam { param } => {
            let p = &model.params[param];
            let init = match p.init {
                Init::Const(c) if c != LAYER_SCALE_INIT => format!(" init={c:e}"),
                _ => String::new(),
            };
            Some(format!(" {}{init}", p.name))
        }
        _ => None,
    }
}
