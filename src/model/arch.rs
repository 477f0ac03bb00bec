//! Parser for the `.arch` architecture files under `models/`.
//!
//! One layer per line; `#` starts a comment. Layer names are the PyTorch
//! module names, so tensor names follow (`<name>.weight`, `<name>.bias`,
//! `<name>.running_mean`, ...). Inside `residual NAME ... end`, names are
//! prefixed by `NAME.`. See README.md, "Architecture files".
//!
//! ```text
//! model   NAME
//! input   C H W | input tokens T
//! classes K
//! conv    NAME COUT k=K [stride=1] [pad=0] [bias=true|false] [groups=1] [dilation=1]
//! bn      NAME [eps=1e-5]            # BatchNorm2d
//! relu    [NAME]
//! leaky_relu [NAME] [slope=0.01]
//! tanh | sigmoid | gelu | silu [NAME]
//! relu6 | hardswish | hardsigmoid [NAME]
//! maxpool [NAME] k=K [stride=K] [pad=0] [ceil=false]
//! avgpool [NAME] k=K [stride=K] [pad=0] [ceil=false]   # count_include_pad
//! gap     [NAME]                     # global average pool -> flat [C]
//! flatten [NAME]                     # -> flat [C*H*W]
//! narrow  [NAME] start=S len=L       # channels [S, S+L)
//! shuffle [NAME] groups=G            # ShuffleNet channel shuffle
//! adaptive_avgpool [NAME] h=OH w=OW  # AdaptiveAvgPool2d((OH, OW))
//! linear  NAME DOUT [bias=true|false]
//! residual NAME        # main branch from the block input ...
//! shortcut             # ... optional projection branch from the same input
//! end                  # out = main + shortcut (identity when absent)
//! basicblock NAME COUT [stride=1] [bn=true|false] [shortcut=NAME]
//! gelu_tanh [NAME]; embedding NAME V D; pos_embedding NAME ROWS;
//! add_param [NAME] PARAM; cls_token [NAME] PARAM; tokens [NAME];
//! select [NAME] index=I; layernorm NAME [eps=1e-5]; conv1d NAME DOUT;
//! mha [NAME] heads=H [causal=false]; attention NAME heads=H [causal=false]
//! untokens [NAME] h=H w=W; mul_param [NAME] PARAM [init=1e-6]  # ConvNeXt
//!                                    # sequences: see `seq`
//! NAME = OP(INPUT, ...) [ARGS]   # explicit edges: any layer above by
//!                                # its keyword, add(A, B, ...),
//!                                # concat(A, B, ...) or mul(X, S)
//! ```
//! Each sequential line reads the value the line before it made; an
//! explicit-edge line (`edges`) names its inputs, so a value may feed
//! several layers (`input` is the model's input).
//! `edges::to_text` writes any model in the explicit form.
//! `basicblock` expands to the ResNet BasicBlock of the spec, including its
//! final ReLU.
//!
//! The parser refuses what PyTorch would refuse to build or run: a conv,
//! batch norm or pool on a flat input (after `flatten`, `gap` or `linear`),
//! a `linear` on an image, a pool with pad > k/2, a kernel larger than its
//! padded input. Every shape is computed with checked arithmetic, and no
//! value (per sample) or parameter tensor may exceed
//! [`MAX_ELEMENTS`](super::MAX_ELEMENTS) elements, nor the model that many
//! parameters in all. A model without trainable parameters is an error.

mod blocks;
mod channels;
mod channels_last;
mod edges;
mod seq;
mod windows;

pub use edges::to_text;

use super::graph::{Activation, BufferSpec, Init, Node, Op, ParamSpec, Shape};
use super::{Model, MAX_ARCH_BYTES, MAX_ELEMENTS};
use crate::error::{Error, Result};
use std::collections::BTreeMap;

/// Every keyword of the format, in the order the usage lists them.
pub const KEYWORDS: &[&str] = &[
    "model",
    "input",
    "classes",
    "conv",
    "bn",
    "relu",
    "leaky_relu",
    "tanh",
    "sigmoid",
    "gelu",
    "silu",
    "relu6",
    "hardswish",
    "hardsigmoid",
    "maxpool",
    "avgpool",
    "gap",
    "flatten",
    "narrow",
    "shuffle",
    "adaptive_avgpool",
    "linear",
    "residual",
    "shortcut",
    "end",
    "basicblock",
    "gelu_tanh",
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

/// The `key=value` options each keyword takes.
fn options(kw: &str) -> &'static [&'static str] {
    match kw {
        "conv" => &["k", "stride", "pad", "bias", "groups", "dilation"],
        "bn" => &["eps"],
        "maxpool" | "avgpool" => &["k", "stride", "pad", "ceil"],
        "leaky_relu" => &["slope"],
        "linear" => &["bias", "tie"],
        "narrow" => &["start", "len"],
        "shuffle" => &["groups"],
        "adaptive_avgpool" => &["h", "w"],
        "basicblock" => &["stride", "bn", "shortcut"],
        _ => seq::seq_options(kw).unwrap_or(&[]),
    }
}

/// PyTorch's default LeakyReLU slope.
pub const DEFAULT_LEAKY_SLOPE: f64 = 0.01;

struct Parser<'a> {
    file: &'a str,
    line: usize,
    name: Option<String>,
    input: Option<Shape>,
    classes: Option<usize>,
    nodes: Vec<Node>,
    params: Vec<ParamSpec>,
    buffers: Vec<BufferSpec>,
    /// Elements of every trainable tensor so far (checked against the limit).
    n_params: usize,
    /// (value id, shape) of the current tensor.
    cur: Option<(usize, Shape)>,
    /// Per value id: whether it is flat (`[N, C]` in PyTorch: after
    /// `flatten`, `gap` or `linear`) rather than an image `[N, C, H, W]`.
    flat: Vec<bool>,
    /// Open residual blocks: (prefix, block input, main-branch end once `shortcut` is seen).
    blocks: Vec<Block>,
    /// Values defined by explicit-edge lines (`edges`), by name.
    names: std::collections::HashMap<String, usize>,
    /// Tied parameters: (second state_dict name, parameter index).
    tied: Vec<(String, usize)>,
    /// The inputs after the first of an explicit `mha(Q, K, V)` line.
    pending: Vec<(usize, Shape)>,
}

struct Block {
    prefix: String,
    input: (usize, Shape),
    main: Option<(usize, Shape)>,
}

fn err(file: &str, line: usize, msg: impl Into<String>) -> Error {
    Error::Architecture {
        file: file.to_string(),
        line,
        msg: msg.into(),
    }
}

/// A PyTorch module path: `.`-separated, non-empty parts of ASCII letters,
/// digits, `_` and `-` (`layer1.0.conv1`, `features.3`, RegNet's
/// `trunk_output.block1.block1-0`).
fn is_module_name(s: &str) -> bool {
    !s.is_empty()
        && s.split('.').all(|part| {
            !part.is_empty()
                && part
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-'))
        })
}

/// A value's shape in errors: `flat [C]` or the image `[C, H, W]`.
fn show_shape(s: Shape, flat: bool) -> String {
    if flat {
        format!("flat [{}]", s.c)
    } else {
        s.to_string()
    }
}

/// `a·b·…` with the operands written out, for errors.
fn product_text(parts: &[usize]) -> String {
    parts
        .iter()
        .map(|p| p.to_string())
        .collect::<Vec<_>>()
        .join("·")
}

impl<'a> Parser<'a> {
    fn e(&self, msg: impl Into<String>) -> Error {
        err(self.file, self.line, msg)
    }

    fn full_name(&self, local: &str) -> String {
        let mut s = String::new();
        for b in &self.blocks {
            s.push_str(&b.prefix);
            s.push('.');
        }
        s.push_str(local);
        s
    }

    /// The full name of an optional (parameter-free) layer name.
    fn optional_name(&self, local: &str) -> String {
        if local.is_empty() {
            String::new()
        } else {
            self.full_name(local)
        }
    }

    fn cur(&self) -> Result<(usize, Shape)> {
        self.cur
            .ok_or_else(|| self.e("`input C H W` must come before the first layer"))
    }

    fn is_flat(&self, value: usize) -> bool {
        self.flat.get(value).copied().unwrap_or(false)
    }

    /// The current value, which must be an image `[C, H, W]`: PyTorch's
    /// Conv2d, BatchNorm2d and the 2-d pools raise on a 2-D `[N, C]` input.
    fn image_input(&self, kw: &str, torch: &str) -> Result<(usize, Shape)> {
        let (v, s) = self.cur()?;
        if self.is_flat(v) {
            return Err(self.e(format!(
                "{kw} needs an image [C, H, W], but its input is flat [{}] (after `flatten`, \
                 `gap` or `linear`); PyTorch's {torch} raises on a 2-D input",
                s.c
            )));
        }
        if !s.is_image() {
            return Err(self.e(format!(
                "{kw} needs an image [C, H, W], but its input is the {s}; {torch} takes images"
            )));
        }
        Ok((v, s))
    }

    /// The product of `parts` as the element count of `what`, refusing
    /// overflow and anything above [`MAX_ELEMENTS`].
    fn elements(&self, what: &str, parts: &[usize]) -> Result<usize> {
        let n = parts
            .iter()
            .try_fold(1usize, |acc, &p| acc.checked_mul(p))
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                self.e(format!(
                    "{what} would have {} elements, above the limit of {MAX_ELEMENTS} \
                     elements per tensor",
                    product_text(parts)
                ))
            })?;
        Ok(n)
    }

    /// A per-sample shape, checked against the element limit.
    fn shape(&self, what: &str, c: usize, h: usize, w: usize) -> Result<Shape> {
        self.elements(what, &[c, h, w])?;
        Ok(Shape::new(c, h, w))
    }

    fn add_param(&mut self, name: String, shape: Vec<usize>, init: Init) -> Result<usize> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(self.e(format!("duplicate tensor name `{name}`")));
        }
        let numel = self.elements(&format!("parameter `{name}`"), &shape)?;
        let offset = self.n_params;
        self.n_params = offset
            .checked_add(numel)
            .filter(|&n| n <= MAX_ELEMENTS)
            .ok_or_else(|| {
                self.e(format!(
                    "`{name}` brings the model to {} parameters, above the limit of \
                     {MAX_ELEMENTS}",
                    offset as u128 + numel as u128
                ))
            })?;
        self.params.push(ParamSpec {
            name,
            shape,
            offset,
            init,
        });
        Ok(self.params.len() - 1)
    }

    fn add_buffer(&mut self, name: String, len: usize, init: f64) -> usize {
        self.buffers.push(BufferSpec { name, len, init });
        self.buffers.len() - 1
    }

    fn push(
        &mut self,
        name: String,
        op: Op,
        inputs: Vec<usize>,
        out_shape: Shape,
        flat: bool,
    ) -> Result<()> {
        let in_shape = self.cur()?.1;
        self.nodes.push(Node {
            name,
            op,
            inputs,
            in_shape,
            out_shape,
        });
        self.flat.push(flat);
        self.cur = Some((self.nodes.len(), out_shape));
        Ok(())
    }

    fn bn(&mut self, local: &str, eps: f64) -> Result<()> {
        let (v, s) = self.image_input("bn", "BatchNorm2d")?;
        let name = self.full_name(local);
        let gamma = self.add_param(format!("{name}.weight"), vec![s.c], Init::Const(1.0))?;
        let beta = self.add_param(format!("{name}.bias"), vec![s.c], Init::Const(0.0))?;
        let running_mean = self.add_buffer(format!("{name}.running_mean"), s.c, 0.0);
        let running_var = self.add_buffer(format!("{name}.running_var"), s.c, 1.0);
        let op = Op::BatchNorm {
            gamma,
            beta,
            running_mean,
            running_var,
            c: s.c,
            eps,
        };
        self.push(name, op, vec![v], s, false)
    }

    fn act(&mut self, local: &str, a: Activation) -> Result<()> {
        let (v, s) = self.cur()?;
        let name = self.optional_name(local);
        let flat = self.is_flat(v);
        self.push(name, Op::Act(a), vec![v], s, flat)
    }

    fn linear(&mut self, local: &str, dout: usize, bias: bool, tie: Option<&str>) -> Result<()> {
        let (v, s) = self.cur()?;
        if s.is_seq() {
            let a = seq::LinearArgs { dout, bias, tie };
            return self.seq_linear(local, a);
        }
        if !self.is_flat(v) {
            return Err(self.e(format!(
                "linear needs a flat input, got the image {s}: add `flatten` or `gap`"
            )));
        }
        if dout == 0 {
            return Err(self.e("linear needs a positive DOUT"));
        }
        let name = self.full_name(local);
        let din = s.c;
        let out = self.shape(&format!("the output of linear `{name}`"), dout, 1, 1)?;
        let label = format!("linear `{name}`");
        let weight =
            self.linear_weight(&label, &format!("{name}.weight"), vec![dout, din], din, tie)?;
        let bias = if bias {
            Some(self.add_param(format!("{name}.bias"), vec![dout], Init::UniformFanIn(din))?)
        } else {
            None
        };
        self.push(
            name,
            Op::Linear {
                weight,
                bias,
                din,
                dout,
            },
            vec![v],
            out,
            true,
        )
    }

    fn line(&mut self, words: &[&str]) -> Result<()> {
        let (kw, rest) = (words[0], &words[1..]);
        if !KEYWORDS.contains(&kw) {
            return Err(self.e(format!(
                "unknown layer `{kw}` (known: {})",
                KEYWORDS.join(", ")
            )));
        }
        let mut pos = Vec::new();
        let mut kv: BTreeMap<&str, &str> = BTreeMap::new();
        let allowed = options(kw);
        // `slope = 0.1`: an option split by spaces.
        if let Some(i) = rest
            .iter()
            .position(|w| w.starts_with('=') || w.ends_with('='))
        {
            let key = if rest[i] == "=" || rest[i].ends_with('=') {
                rest[i].trim_end_matches('=').to_string()
            } else {
                String::new()
            };
            let key = if key.is_empty() && i > 0 {
                rest[i - 1].to_string()
            } else {
                key
            };
            return Err(self.e(format!(
                "{kw}: an option is written key=value without spaces (`{key}=...`), \
                 not `{}`",
                rest[i.saturating_sub(1)..(i + 2).min(rest.len())].join(" ")
            )));
        }
        for w in rest {
            match w.split_once('=') {
                Some((k, v)) => {
                    if !allowed.contains(&k) {
                        return Err(self.e(if allowed.is_empty() {
                            format!("{kw}: unknown option `{k}` ({kw} takes no options)")
                        } else {
                            format!("{kw}: unknown option `{k}` (known: {})", allowed.join(", "))
                        }));
                    }
                    if kv.insert(k, v).is_some() {
                        return Err(self.e(format!("{kw}: option `{k}` is given twice")));
                    }
                }
                None => pos.push(*w),
            }
        }
        let (file, line) = (self.file, self.line);
        let num = |s: &str, what: &str| -> Result<usize> {
            s.parse().map_err(|_| {
                err(
                    file,
                    line,
                    format!(
                        "{kw}: {what} must be a whole number from 0 to {}, got `{s}`",
                        usize::MAX
                    ),
                )
            })
        };
        let opt = |key: &str, default: usize| -> Result<usize> {
            kv.get(key).map(|v| num(v, key)).unwrap_or(Ok(default))
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match kv.get(key).copied() {
                None => Ok(default),
                Some("true") => Ok(true),
                Some("false") => Ok(false),
                Some(v) => Err(err(
                    file,
                    line,
                    format!("{kw}: {key} must be true or false, got `{v}`"),
                )),
            }
        };
        let required = |key: &str| -> Result<usize> {
            let v = kv
                .get(key)
                .ok_or_else(|| err(file, line, format!("{kw}: {key}=K is required")))?;
            num(v, key)
        };
        let need = |n: usize, usage: &str| -> Result<()> {
            if pos.len() == n {
                Ok(())
            } else {
                Err(err(file, line, format!("usage: {usage}")))
            }
        };
        let module = |s: &str| -> Result<String> {
            if is_module_name(s) {
                Ok(s.to_string())
            } else {
                Err(err(
                    file,
                    line,
                    format!(
                        "{kw}: `{s}` is not a PyTorch module name (ASCII letters, digits, `_` and `-`, \
                         parts separated by `.`)"
                    ),
                ))
            }
        };
        let name_opt = |pos: &[&str]| -> Result<String> {
            match pos {
                [] => Ok(String::new()),
                [n] => module(n),
                _ => Err(err(file, line, format!("usage: {kw} [NAME]"))),
            }
        };
        match kw {
            "model" => {
                need(1, "model NAME")?;
                if self.name.is_some() {
                    return Err(self.e("`model` given twice"));
                }
                let n = pos[0];
                if !n
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '_' | '-' | '.'))
                {
                    return Err(self.e(format!(
                        "model name `{n}` may hold only ASCII letters, digits, `_`, `-` and `.`"
                    )));
                }
                self.name = Some(n.to_string());
            }
            "input" => {
                if self.cur.is_some() {
                    return Err(self.e("`input` given twice"));
                }
                if pos.first() == Some(&"tokens") {
                    need(2, "input tokens T")?;
                    let t = num(pos[1], "T")?;
                    if t < 2 {
                        return Err(self.e("input tokens T: T must be at least 2"));
                    }
                    self.shape("the input", t, 1, 1)?;
                    self.input = Some(Shape::ids(t));
                    self.cur = Some((0, Shape::ids(t)));
                    self.flat = vec![false];
                    return Ok(());
                }
                need(3, "input C H W")?;
                let (c, h, w) = (num(pos[0], "C")?, num(pos[1], "H")?, num(pos[2], "W")?);
                if c == 0 || h == 0 || w == 0 {
                    return Err(self.e("input shape must be positive"));
                }
                let s = self.shape("the input", c, h, w)?;
                self.input = Some(s);
                self.cur = Some((0, s));
                self.flat = vec![false];
            }
            "classes" => {
                need(1, "classes K")?;
                if self.classes.is_some() {
                    return Err(self.e("`classes` given twice"));
                }
                self.classes = Some(num(pos[0], "K")?);
            }
            "conv" => {
                need(
                    2,
                    "conv NAME COUT k=K [stride=S] [pad=P] [bias=true|false] [groups=G] \
                     [dilation=D]",
                )?;
                let name = module(pos[0])?;
                let args = windows::ConvArgs {
                    cout: num(pos[1], "COUT")?,
                    k: required("k")?,
                    stride: opt("stride", 1)?,
                    pad: opt("pad", 0)?,
                    bias: flag("bias", true)?,
                    groups: opt("groups", 1)?,
                    dilation: opt("dilation", 1)?,
                };
                self.conv_with(&name, args)?;
            }
            "bn" => {
                need(1, "bn NAME")?;
                let name = module(pos[0])?;
                let eps = match kv.get("eps") {
                    None => crate::model::graph::BN_EPS,
                    Some(s) => s
                        .parse::<f64>()
                        .ok()
                        .filter(|v| *v > 0.0 && v.is_finite())
                        .ok_or_else(|| {
                            self.e(format!("bn: eps must be a positive number, got `{s}`"))
                        })?,
                };
                self.bn(&name, eps)?;
            }
            "relu" | "tanh" | "sigmoid" | "gelu" | "silu" | "relu6" | "hardswish"
            | "hardsigmoid" | "leaky_relu" | "gelu_tanh" => {
                let n = name_opt(&pos)?;
                let a = match kw {
                    "relu" => Activation::Relu,
                    "tanh" => Activation::Tanh,
                    "sigmoid" => Activation::Sigmoid,
                    "gelu" => Activation::Gelu,
                    "gelu_tanh" => Activation::GeluTanh,
                    "silu" => Activation::Silu,
                    "relu6" => Activation::Relu6,
                    "hardswish" => Activation::Hardswish,
                    "hardsigmoid" => Activation::Hardsigmoid,
                    _ => {
                        let slope = match kv.get("slope") {
                            None => DEFAULT_LEAKY_SLOPE,
                            Some(s) => s.parse::<f64>().ok().filter(|v| v.is_finite()).ok_or_else(
                                || {
                                    self.e(format!(
                                        "leaky_relu: slope must be a finite number, got `{s}`"
                                    ))
                                },
                            )?,
                        };
                        Activation::LeakyRelu { slope }
                    }
                };
                self.act(&n, a)?;
            }
            "maxpool" | "avgpool" => {
                let n = name_opt(&pos)?;
                let k = required("k")?;
                let ceil = flag("ceil", false)?;
                self.pool(kw, &n, k, opt("stride", k)?, opt("pad", 0)?, ceil)?;
            }
            "gap" => {
                let n = name_opt(&pos)?;
                let (v, s) = self.image_input("gap", "the global average pool")?;
                let name = self.optional_name(&n);
                self.push(
                    name,
                    Op::GlobalAvgPool,
                    vec![v],
                    Shape::new(s.c, 1, 1),
                    true,
                )?;
            }
            "flatten" => {
                let n = name_opt(&pos)?;
                let (v, s) = self.cur()?;
                let name = self.optional_name(&n);
                // Shapes are checked when made, so c·h·w cannot overflow.
                self.push(
                    name,
                    Op::Flatten,
                    vec![v],
                    Shape::new(s.numel(), 1, 1),
                    true,
                )?;
            }
            "narrow" | "shuffle" | "adaptive_avgpool" => {
                let n = name_opt(&pos)?;
                self.channel_line(kw, &n, &kv)?;
            }
            "linear" => {
                need(2, "linear NAME DOUT [bias=true|false] [tie=PARAM]")?;
                let name = module(pos[0])?;
                let dout = num(pos[1], "DOUT")?;
                let tie = kv.get("tie").map(|t| module(t)).transpose()?;
                self.linear(&name, dout, flag("bias", true)?, tie.as_deref())?;
            }
            "residual" => {
                need(1, "residual NAME")?;
                let name = module(pos[0])?;
                self.open_block(&name)?;
            }
            "shortcut" => {
                need(0, "shortcut")?;
                self.open_shortcut()?;
            }
            "end" => {
                need(0, "end")?;
                self.close_block()?;
            }
            "basicblock" => {
                need(
                    2,
                    "basicblock NAME COUT [stride=S] [bn=true|false] [shortcut=NAME]",
                )?;
                let name = module(pos[0])?;
                let sc = match kv.get("shortcut") {
                    Some(s) => module(s)?,
                    None => "shortcut".into(),
                };
                let cout = num(pos[1], "COUT")?;
                self.basicblock(&name, cout, opt("stride", 1)?, flag("bn", true)?, &sc)?;
            }
            _ if seq::SEQ_KEYWORDS.contains(&kw) => self.seq_line(kw, &pos, &kv)?,
            _ => {
                return Err(self.e(format!(
                    "internal: keyword `{kw}` is listed but not handled"
                )))
            }
        }
        Ok(())
    }
}

/// Parse an architecture file's text. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Model> {
    if text.len() > MAX_ARCH_BYTES {
        return Err(err(
            file,
            0,
            format!(
                "{} bytes; architecture files are at most {MAX_ARCH_BYTES} bytes",
                text.len()
            ),
        ));
    }
    let mut p = Parser {
        file,
        line: 0,
        name: None,
        input: None,
        classes: None,
        nodes: vec![],
        params: vec![],
        buffers: vec![],
        n_params: 0,
        cur: None,
        flat: vec![],
        blocks: vec![],
        names: Default::default(),
        tied: vec![],
        pending: vec![],
    };
    for (i, raw) in text.lines().enumerate() {
        p.line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
        if p.edge_line(content)? {
            continue;
        }
        let words: Vec<&str> = content.split_whitespace().collect();
        if !words.is_empty() {
            p.line(&words)?;
        }
    }
    p.line = text.lines().count();
    if let Some(b) = p.blocks.last() {
        return Err(p.e(format!(
            "residual `{}` is never closed with `end`",
            b.prefix
        )));
    }
    let name = p.name.clone().ok_or_else(|| p.e("missing `model NAME`"))?;
    let input = p.input.ok_or_else(|| p.e("missing `input C H W`"))?;
    let classes = p.classes.ok_or_else(|| p.e("missing `classes K`"))?;
    if classes < 2 {
        return Err(p.e("a classifier needs at least 2 classes"));
    }
    let (last, out) = p.cur()?;
    let lm = input.kind == super::graph::Kind::Ids && out.is_seq() && out.features() == classes;
    if !lm && (!p.is_flat(last) || out.c != classes) {
        let got = if p.is_flat(last) {
            format!("flat [{}]", out.c)
        } else {
            format!("the {}{out}", if out.is_image() { "image " } else { "" })
        };
        return Err(p.e(format!(
            "the last layer gives {got}, but the model has {classes} classes: it must end in \
             flat logits [{classes}] (a `linear`, `gap` or `flatten`), or, reading token ids, \
             in logits [T, {classes}] (a language model)"
        )));
    }
    if p.params.is_empty() {
        return Err(p.e(format!(
            "model `{name}` has no trainable parameters (no conv, bn or linear layer): \
             its Hessian would be empty"
        )));
    }
    let mut model = Model::new(name, input, classes, p.nodes, p.params, p.buffers);
    model.tied = p.tied;
    Ok(model)
}
