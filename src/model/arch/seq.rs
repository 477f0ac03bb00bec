//! The sequence layers of the architecture language (transformers):
//! `input tokens T`, `embedding NAME V D`, `pos_embedding NAME ROWS`,
//! `add_param [NAME] PARAM`, `cls_token [NAME] PARAM`, `tokens [NAME]`,
//! `select [NAME] index=I`, `layernorm NAME [eps=1e-5]`, `linear` on a
//! sequence (with `tie=PARAM`), `conv1d NAME DOUT`, `mha [NAME] heads=H
//! [causal=false]` (one input [T, 3D] or, in the explicit form, three
//! [T, D]) and the `attention NAME heads=H [causal=false]` macro
//! (nn.MultiheadAttention: in_proj linear, mha, out_proj linear).

use super::Parser;
use crate::error::Result;
use crate::model::graph::{Init, Kind, Node, Op, Shape};
use crate::model::Model;
use std::collections::BTreeMap;

/// nn.LayerNorm's default eps.
pub const LAYERNORM_EPS: f64 = 1e-5;

/// The keywords this file parses.
pub(super) const SEQ_KEYWORDS: &[&str] = &[
    "embedding",
    "pos_embedding",
    "add_param",
    "cls_token",
    "tokens",
    "select",
    "layernorm",
    "conv1d",
    "mha",
    "attention",
    "untokens",
    "mul_param",
];

/// Their options.
pub(super) fn seq_options(kw: &str) -> Option<&'static [&'static str]> {
    Some(match kw {
        "select" => &["index"],
        "layernorm" => &["eps"],
        "mha" | "attention" => &["heads", "causal"],
        "untokens" => &["h", "w"],
        "mul_param" => &["init"],
        "embedding" | "pos_embedding" | "add_param" | "cls_token" | "tokens" | "conv1d" => &[],
        _ => return None,
    })
}

/// How a linear layer's weight comes: its own, or tied to a parameter.
pub(super) struct LinearArgs<'a> {
    pub dout: usize,
    pub bias: bool,
    pub tie: Option<&'a str>,
}

impl Parser<'_> {
    fn seq_num(&self, label: &str, s: &str, what: &str) -> Result<usize> {
        s.parse().map_err(|_| {
            self.e(format!(
                "{label}: {what} must be a whole number from 0 to {}, got `{s}`",
                usize::MAX
            ))
        })
    }

    /// The current value, which must be a sequence [T, F].
    pub(super) fn seq_input(&self, label: &str) -> Result<(usize, Shape)> {
        let (v, s) = self.cur()?;
        if !s.is_seq() {
            let got = if self.is_flat(v) {
                format!("flat [{}]", s.c)
            } else {
                s.to_string()
            };
            return Err(self.e(format!(
                "{label} needs a sequence [T, F] (after `embedding`, `tokens` or a layer on a \
                 sequence), but its input is {got}"
            )));
        }
        Ok((v, s))
    }

    /// A layer name: `label` for errors.
    fn label(kw: &str, name: &str) -> String {
        if name.is_empty() {
            kw.to_string()
        } else {
            format!("{kw} `{name}`")
        }
    }

    /// An already-declared parameter by its exact name, of `shape`.
    fn declared(&self, label: &str, param: &str, shape: &[usize]) -> Result<usize> {
        let i = self
            .params
            .iter()
            .position(|p| p.name == param)
            .ok_or_else(|| {
                self.e(format!(
                    "{label}: tie={param}: no parameter of that name is declared above"
                ))
            })?;
        if self.params[i].shape != shape {
            return Err(self.e(format!(
                "{label}: tie={param} has shape {:?}, the layer needs {shape:?}",
                self.params[i].shape
            )));
        }
        Ok(i)
    }

    /// A linear weight [dout, din] named `name`, or the tied parameter.
    pub(super) fn linear_weight(
        &mut self,
        label: &str,
        name: &str,
        shape: Vec<usize>,
        fan_in: usize,
        tie: Option<&str>,
    ) -> Result<usize> {
        match tie {
            None => self.add_param(name.to_string(), shape, Init::UniformFanIn(fan_in)),
            Some(param) => {
                if self.params.iter().any(|p| p.name == name)
                    || self.tied.iter().any(|(n, _)| n == name)
                {
                    return Err(self.e(format!("duplicate tensor name `{name}`")));
                }
                let i = self.declared(label, param, &shape)?;
                self.tied.push((name.to_string(), i));
                Ok(i)
            }
        }
    }

    /// `linear` on a sequence: the last dimension, [T, DIN] -> [T, DOUT].
    pub(super) fn seq_linear(&mut self, local: &str, a: LinearArgs) -> Result<()> {
        let name = self.full_name(local);
        let label = Self::label("linear", &name);
        let (weight, bias) = (format!("{name}.weight"), format!("{name}.bias"));
        self.seq_affine(&label, name, &weight, &bias, a, false)
    }

    /// A linear map on the last dimension with the given tensor names.
    fn seq_affine(
        &mut self,
        label: &str,
        name: String,
        weight_name: &str,
        bias_name: &str,
        a: LinearArgs,
        transposed: bool,
    ) -> Result<()> {
        let (v, s) = self.seq_input(label)?;
        if a.dout == 0 {
            return Err(self.e(format!("{label}: DOUT must be positive")));
        }
        let din = s.features();
        let t = s.tokens();
        self.elements(&format!("the output of {label}"), &[t, a.dout])?;
        let shape = if transposed {
            vec![din, a.dout]
        } else {
            vec![a.dout, din]
        };
        let weight = self.linear_weight(label, weight_name, shape, din, a.tie)?;
        // Hugging Face Conv1D: weight N(0, 0.02²), bias zeros.
        if transposed && a.tie.is_none() {
            self.params[weight].init = Init::Normal { std: 0.02 };
        }
        let bias_init = if transposed {
            Init::Const(0.0)
        } else {
            Init::UniformFanIn(din)
        };
        let bias = if a.bias {
            Some(self.add_param(bias_name.to_string(), vec![a.dout], bias_init)?)
        } else {
            None
        };
        let op = Op::SeqLinear {
            weight,
            bias,
            din,
            dout: a.dout,
            transposed,
        };
        self.push(name, op, vec![v], Shape::seq(t, a.dout), false)
    }

    /// A line of one of [`SEQ_KEYWORDS`].
    pub(super) fn seq_line(
        &mut self,
        kw: &str,
        pos: &[&str],
        kv: &BTreeMap<&str, &str>,
    ) -> Result<()> {
        let usage = |u: &str| self.e(format!("usage: {u}"));
        let module = |s: &str| -> Result<String> {
            if super::is_module_name(s) {
                Ok(s.to_string())
            } else {
                Err(self.e(format!(
                    "{kw}: `{s}` is not a PyTorch module or tensor name (ASCII letters, digits, \
                     `_` and `-`, parts separated by `.`)"
                )))
            }
        };
        match kw {
            "embedding" => {
                let [n, vocab, dim] = pos else {
                    return Err(usage("embedding NAME V D"));
                };
                let name = self.full_name(&module(n)?);
                let label = Self::label(kw, &name);
                let (vocab, dim) = (
                    self.seq_num(&label, vocab, "V")?,
                    self.seq_num(&label, dim, "D")?,
                );
                let (v, s) = self.cur()?;
                if s.kind != Kind::Ids {
                    return Err(self.e(format!(
                        "{label} reads token ids (`input tokens T`), but its input is {s}"
                    )));
                }
                if vocab == 0 || dim == 0 {
                    return Err(self.e(format!("{label}: V and D must be positive")));
                }
                self.elements(&format!("the output of {label}"), &[s.tokens(), dim])?;
                let weight = self.add_param(
                    format!("{name}.weight"),
                    vec![vocab, dim],
                    Init::Normal { std: 1.0 },
                )?;
                let op = Op::Embedding { weight, vocab, dim };
                self.push(name, op, vec![v], Shape::seq(s.tokens(), dim), false)
            }
            "pos_embedding" => {
                let [n, rows] = pos else {
                    return Err(usage("pos_embedding NAME ROWS"));
                };
                let name = self.full_name(&module(n)?);
                let label = Self::label(kw, &name);
                let rows = self.seq_num(&label, rows, "ROWS")?;
                let (v, s) = self.seq_input(&label)?;
                if s.tokens() > rows {
                    return Err(self.e(format!(
                        "{label}: {} tokens but only {rows} positions",
                        s.tokens()
                    )));
                }
                let param = self.add_param(
                    format!("{name}.weight"),
                    vec![rows, s.features()],
                    Init::Normal { std: 1.0 },
                )?;
                self.push(name, Op::AddParam { param, pos: true }, vec![v], s, false)
            }
            "add_param" | "cls_token" => {
                let (n, param) = match pos {
                    [p] => (module(p)?, module(p)?),
                    [n, p] => (self.full_name(&module(n)?), module(p)?),
                    _ => return Err(usage(&format!("{kw} [NAME] PARAM"))),
                };
                let label = Self::label(kw, &n);
                let (v, s) = self.seq_input(&label)?;
                let (t, d) = (s.tokens(), s.features());
                if kw == "add_param" {
                    // torchvision's ViT: pos_embedding.normal_(std=0.02).
                    let p = self.add_param(param, vec![1, t, d], Init::Normal { std: 0.02 })?;
                    self.push(
                        n,
                        Op::AddParam {
                            param: p,
                            pos: false,
                        },
                        vec![v],
                        s,
                        false,
                    )
                } else {
                    let out = t
                        .checked_add(1)
                        .ok_or_else(|| self.e(format!("{label}: too many tokens")))?;
                    self.elements(&format!("the output of {label}"), &[out, d])?;
                    let p = self.add_param(param, vec![1, 1, d], Init::Const(0.0))?;
                    self.push(
                        n,
                        Op::ClsToken { param: p },
                        vec![v],
                        Shape::seq(out, d),
                        false,
                    )
                }
            }
            "tokens" => {
                let name = match pos {
                    [] => String::new(),
                    [n] => self.full_name(&module(n)?),
                    _ => return Err(usage("tokens [NAME]")),
                };
                let label = Self::label(kw, &name);
                let (v, s) = self.cur()?;
                if !s.is_image() || self.is_flat(v) {
                    return Err(self.e(format!(
                        "{label} needs an image [C, H, W], but its input is {}",
                        if self.is_flat(v) {
                            format!("flat [{}]", s.c)
                        } else {
                            s.to_string()
                        }
                    )));
                }
                self.push(
                    name,
                    Op::Tokens,
                    vec![v],
                    Shape::seq(s.spatial(), s.c),
                    false,
                )
            }
            "untokens" => {
                let name = match pos {
                    [] => String::new(),
                    [n] => self.full_name(&module(n)?),
                    _ => return Err(usage("untokens [NAME] h=H w=W")),
                };
                self.untokens(name, kv)
            }
            "mul_param" => {
                let (n, param) = match pos {
                    [p] => (String::new(), module(p)?),
                    [n, p] => (self.full_name(&module(n)?), module(p)?),
                    _ => return Err(usage("mul_param [NAME] PARAM [init=1e-6]")),
                };
                self.mul_param(n, param, kv)
            }
            "select" => {
                let name = match pos {
                    [] => String::new(),
                    [n] => self.full_name(&module(n)?),
                    _ => return Err(usage("select [NAME] index=I")),
                };
                let label = Self::label(kw, &name);
                let index = kv
                    .get("index")
                    .ok_or_else(|| self.e(format!("{label}: index=I is required")))?;
                let index = self.seq_num(&label, index, "index")?;
                let (v, s) = self.seq_input(&label)?;
                if index >= s.tokens() {
                    return Err(self.e(format!(
                        "{label}: index={index} is past the input's {} tokens",
                        s.tokens()
                    )));
                }
                let out = Shape::new(s.features(), 1, 1);
                self.push(name, Op::Select { index }, vec![v], out, true)
            }
            "layernorm" => {
                let [n] = pos else {
                    return Err(usage("layernorm NAME [eps=1e-5]"));
                };
                let name = self.full_name(&module(n)?);
                let label = Self::label(kw, &name);
                let eps = match kv.get("eps") {
                    None => LAYERNORM_EPS,
                    Some(s) => s
                        .parse::<f64>()
                        .ok()
                        .filter(|v| *v > 0.0 && v.is_finite())
                        .ok_or_else(|| {
                            self.e(format!("{label}: eps must be a positive number, got `{s}`"))
                        })?,
                };
                let (v, s) = self.seq_input(&label)?;
                let dim = s.features();
                let weight =
                    self.add_param(format!("{name}.weight"), vec![dim], Init::Const(1.0))?;
                let bias = self.add_param(format!("{name}.bias"), vec![dim], Init::Const(0.0))?;
                let op = Op::LayerNorm {
                    weight,
                    bias,
                    dim,
                    eps,
                };
                self.push(name, op, vec![v], s, false)
            }
            "conv1d" => {
                let [n, dout] = pos else {
                    return Err(usage("conv1d NAME DOUT"));
                };
                let name = self.full_name(&module(n)?);
                let label = Self::label(kw, &name);
                let dout = self.seq_num(&label, dout, "DOUT")?;
                let (w, b) = (format!("{name}.weight"), format!("{name}.bias"));
                let a = LinearArgs {
                    dout,
                    bias: true,
                    tie: None,
                };
                self.seq_affine(&label, name, &w, &b, a, true)
            }
            "mha" | "attention" => {
                let name = match (kw, pos) {
                    ("mha", []) => String::new(),
                    (_, [n]) => self.full_name(&module(n)?),
                    _ => {
                        return Err(usage(&format!(
                            "{kw} {}heads=H [causal=true|false]",
                            if kw == "mha" { "[NAME] " } else { "NAME " }
                        )))
                    }
                };
                let label = Self::label(kw, &name);
                let heads = kv
                    .get("heads")
                    .ok_or_else(|| self.e(format!("{label}: heads=H is required")))?;
                let heads = self.seq_num(&label, heads, "heads")?;
                let causal = match kv.get("causal").copied() {
                    None | Some("false") => false,
                    Some("true") => true,
                    Some(c) => {
                        return Err(
                            self.e(format!("{label}: causal must be true or false, got `{c}`"))
                        )
                    }
                };
                if kw == "mha" {
                    self.mha(&label, name, heads, causal)
                } else {
                    self.attention(&label, name, heads, causal)
                }
            }
            _ => Err(self.e(format!("internal: `{kw}` is not a sequence keyword"))),
        }
    }

    /// `mha`: the current value [T, 3D], or it and the two pending
    /// values of an explicit `mha(Q, K, V)` line, each [T, D].
    fn mha(&mut self, label: &str, name: String, heads: usize, causal: bool) -> Result<()> {
        let extra = std::mem::take(&mut self.pending);
        let (v, s) = self.seq_input(label)?;
        let d = if extra.is_empty() {
            if !s.features().is_multiple_of(3) {
                return Err(self.e(format!(
                    "{label}: one input holds q | k | v, so its {} features must be 3·D",
                    s.features()
                )));
            }
            s.features() / 3
        } else {
            if let Some((_, o)) = extra.iter().find(|(_, o)| *o != s) {
                return Err(self.e(format!(
                    "{label}: q, k and v must have one shape, got {s} and {o}"
                )));
            }
            s.features()
        };
        if heads == 0 || d == 0 || !d.is_multiple_of(heads) {
            return Err(self.e(format!(
                "{label}: heads={heads} must divide the width D = {d}"
            )));
        }
        let mut inputs = vec![v];
        inputs.extend(extra.iter().map(|(v, _)| *v));
        let op = Op::Mha { heads, causal };
        self.push(name, op, inputs, Shape::seq(s.tokens(), d), false)
    }

    /// `attention NAME`: nn.MultiheadAttention(D, H) as self-attention,
    /// in_proj linear (NAME.in_proj_weight, NAME.in_proj_bias), mha,
    /// out_proj linear (NAME.out_proj.weight, NAME.out_proj.bias).
    fn attention(&mut self, label: &str, name: String, heads: usize, causal: bool) -> Result<()> {
        let (_, s) = self.seq_input(label)?;
        let d = s.features();
        if heads == 0 || !d.is_multiple_of(heads) {
            return Err(self.e(format!(
                "{label}: heads={heads} must divide the width D = {d}"
            )));
        }
        let a = |dout| LinearArgs {
            dout,
            bias: true,
            tie: None,
        };
        let (w, b) = (
            format!("{name}.in_proj_weight"),
            format!("{name}.in_proj_bias"),
        );
        self.seq_affine(label, format!("{name}.in_proj"), &w, &b, a(3 * d), false)?;
        // nn.MultiheadAttention._reset_parameters: xavier_uniform_ in_proj
        // weight, zero in_proj and out_proj biases.
        let bound = (6.0 / (4 * d) as f64).sqrt();
        self.set_init(&w, Init::Uniform { bound });
        self.set_init(&b, Init::Const(0.0));
        self.mha(label, name.clone(), heads, causal)?;
        let (w, b) = (
            format!("{name}.out_proj.weight"),
            format!("{name}.out_proj.bias"),
        );
        self.seq_affine(label, format!("{name}.out_proj"), &w, &b, a(d), false)?;
        self.set_init(&b, Init::Const(0.0));
        Ok(())
    }

    /// The default initialisation of the declared tensor `name`.
    fn set_init(&mut self, name: &str, init: Init) {
        if let Some(p) = self.params.iter_mut().find(|p| p.name == name) {
            p.init = init;
        }
    }
}

/// The explicit-form arguments of a sequence layer (empty for others).
pub(super) fn seq_args(model: &Model, node: &Node) -> String {
    let pname = |i: usize| model.params[i].name.as_str();
    if let Some(a) = super::channels_last::channels_last_args(model, node) {
        return a;
    }
    match node.op {
        Op::Embedding { vocab, dim, .. } => format!(" {vocab} {dim}"),
        Op::AddParam { param, pos: true } => format!(" {}", model.params[param].shape[0]),
        Op::AddParam { param, pos: false } | Op::ClsToken { param } => {
            format!(" {}", pname(param))
        }
        Op::Select { index } => format!(" index={index}"),
        Op::LayerNorm { eps, .. } => format!(" eps={eps:e}"),
        Op::SeqLinear {
            transposed: true,
            dout,
            ..
        } => format!(" {dout}"),
        Op::SeqLinear {
            weight, bias, dout, ..
        } => {
            let mut a = format!(" {dout} bias={}", bias.is_some());
            if pname(weight) != format!("{}.weight", node.name) {
                a.push_str(&format!(" tie={}", pname(weight)));
            }
            a
        }
        Op::Mha { heads, causal } => format!(" heads={heads} causal={causal}"),
        _ => String::new(),
    }
}

/// Nodes `i..i + 3` as one `attention` line, where they are the
/// expansion of one (in_proj linear, mha, out_proj linear, the two inner
/// values read by nothing else): (the layer's name, the line).
pub(super) fn attention_text(model: &Model, i: usize, input: &str) -> Option<(String, String)> {
    let ns = model.nodes.get(i..i + 3)?;
    let prefix = ns[0].name.strip_suffix(".in_proj")?;
    let Op::SeqLinear {
        weight,
        bias: Some(_),
        transposed: false,
        ..
    } = ns[0].op
    else {
        return None;
    };
    let Op::Mha { heads, causal } = ns[1].op else {
        return None;
    };
    let in_proj = model.params[weight].name == format!("{prefix}.in_proj_weight");
    let out_proj = matches!(
        ns[2].op,
        Op::SeqLinear {
            bias: Some(_),
            transposed: false,
            ..
        }
    ) && ns[2].name == format!("{prefix}.out_proj");
    let chained = ns[1].inputs == [i + 1] && ns[2].inputs == [i + 2] && ns[1].name == prefix;
    let private = model
        .nodes
        .iter()
        .enumerate()
        .filter(|(j, _)| *j != i + 1 && *j != i + 2)
        .all(|(_, n)| !n.inputs.iter().any(|&v| v == i + 1 || v == i + 2));
    let unique = model.nodes.iter().filter(|n| n.name == prefix).count() == 1;
    (in_proj && out_proj && chained && private && unique).then(|| {
        (
            prefix.to_string(),
            format!("{prefix} = attention({input}) heads={heads} causal={causal}\n"),
        )
    })
}
