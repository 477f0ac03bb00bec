//! Parser for the `.arch` architecture files under `models/`.
//!
//! One layer per line; `#` starts a comment. Layer names are the PyTorch
//! module names, so tensor names follow (`<name>.weight`, `<name>.bias`,
//! `<name>.running_mean`, ...). Inside `residual NAME ... end`, names are
//! prefixed by `NAME.`. See README.md, "Architecture files".
//!
//! ```text
//! model   NAME
//! input   C H W
//! classes K
//! conv    NAME COUT k=K [stride=S] [pad=P] [bias=true|false]
//! bn      NAME
//! relu    [NAME]
//! maxpool [NAME] k=K [stride=S] [pad=P]
//! gap     [NAME]
//! flatten [NAME]
//! linear  NAME DOUT [bias=true|false]
//! residual NAME        # main branch from the block input ...
//! shortcut             # ... optional projection branch from the same input
//! end                  # out = main + shortcut (identity when absent)
//! basicblock NAME COUT [stride=S] [bn=true|false] [shortcut=NAME]
//! ```
//! `basicblock` expands to the ResNet BasicBlock of the spec, including its
//! final ReLU.

use super::graph::{BufferSpec, Init, Node, Op, ParamSpec, Shape};
use super::Model;
use crate::error::{Error, Result};
use std::collections::HashMap;

struct Parser<'a> {
    file: &'a str,
    line: usize,
    name: Option<String>,
    input: Option<Shape>,
    classes: Option<usize>,
    nodes: Vec<Node>,
    params: Vec<ParamSpec>,
    buffers: Vec<BufferSpec>,
    /// (value id, shape) of the current tensor.
    cur: Option<(usize, Shape)>,
    /// Open residual blocks: (prefix, block input, main-branch end once `shortcut` is seen).
    blocks: Vec<Block>,
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

    fn cur(&self) -> Result<(usize, Shape)> {
        self.cur
            .ok_or_else(|| self.e("`input C H W` must come before the first layer"))
    }

    fn add_param(&mut self, name: String, shape: Vec<usize>, init: Init) -> Result<usize> {
        if self.params.iter().any(|p| p.name == name) {
            return Err(self.e(format!("duplicate tensor name `{name}`")));
        }
        let offset = self
            .params
            .last()
            .map(|p| p.offset + p.numel())
            .unwrap_or(0);
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

    fn push(&mut self, name: String, op: Op, inputs: Vec<usize>, out_shape: Shape) -> Result<()> {
        let in_shape = self.cur()?.1;
        self.nodes.push(Node {
            name,
            op,
            inputs,
            in_shape,
            out_shape,
        });
        self.cur = Some((self.nodes.len(), out_shape));
        Ok(())
    }

    fn conv(
        &mut self,
        local: &str,
        cout: usize,
        k: usize,
        stride: usize,
        pad: usize,
        bias: bool,
    ) -> Result<()> {
        let (v, s) = self.cur()?;
        if k == 0 || stride == 0 || cout == 0 {
            return Err(self.e("conv needs positive COUT, k and stride"));
        }
        if s.h + 2 * pad < k || s.w + 2 * pad < k {
            return Err(self.e(format!("conv kernel {k} larger than padded input {s}")));
        }
        let name = self.full_name(local);
        let fan_in = s.c * k * k;
        let weight = self.add_param(
            format!("{name}.weight"),
            vec![cout, s.c, k, k],
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
        let out = Shape::new(
            cout,
            (s.h + 2 * pad - k) / stride + 1,
            (s.w + 2 * pad - k) / stride + 1,
        );
        let op = Op::Conv {
            weight,
            bias,
            cin: s.c,
            cout,
            k,
            stride,
            pad,
        };
        self.push(name, op, vec![v], out)
    }

    fn bn(&mut self, local: &str) -> Result<()> {
        let (v, s) = self.cur()?;
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
        };
        self.push(name, op, vec![v], s)
    }

    fn relu(&mut self, local: &str) -> Result<()> {
        let (v, s) = self.cur()?;
        let name = if local.is_empty() {
            String::new()
        } else {
            self.full_name(local)
        };
        self.push(name, Op::Relu, vec![v], s)
    }

    fn basicblock(
        &mut self,
        local: &str,
        cout: usize,
        stride: usize,
        bn: bool,
        sc_name: &str,
    ) -> Result<()> {
        let (_, s) = self.cur()?;
        self.open_block(local)?;
        self.conv("conv1", cout, 3, stride, 1, !bn)?;
        if bn {
            self.bn("bn1")?;
        }
        self.relu("")?;
        self.conv("conv2", cout, 3, 1, 1, !bn)?;
        if bn {
            self.bn("bn2")?;
        }
        if stride != 1 || s.c != cout {
            self.open_shortcut()?;
            self.conv(&format!("{sc_name}.0"), cout, 1, stride, 0, !bn)?;
            if bn {
                self.bn(&format!("{sc_name}.1"))?;
            }
        }
        self.close_block()?;
        self.relu("")
    }

    fn open_block(&mut self, local: &str) -> Result<()> {
        let input = self.cur()?;
        self.blocks.push(Block {
            prefix: local.to_string(),
            input,
            main: None,
        });
        Ok(())
    }

    fn open_shortcut(&mut self) -> Result<()> {
        let cur = self.cur()?;
        let b = self
            .blocks
            .last_mut()
            .ok_or_else(|| err(self.file, self.line, "`shortcut` outside `residual`"))?;
        if b.main.is_some() {
            return Err(err(self.file, self.line, "second `shortcut` in one block"));
        }
        b.main = Some(cur);
        self.cur = Some(b.input);
        Ok(())
    }

    fn close_block(&mut self) -> Result<()> {
        let b = self
            .blocks
            .pop()
            .ok_or_else(|| self.e("`end` without `residual`"))?;
        let cur = self.cur()?;
        let (main, short) = match b.main {
            Some(m) => (m, cur),
            None => (cur, b.input),
        };
        if main.1 != short.1 {
            return Err(self.e(format!(
                "residual `{}`: main branch gives {} but shortcut gives {}",
                b.prefix, main.1, short.1
            )));
        }
        let name = self.full_name(&b.prefix);
        self.cur = Some(main);
        self.push(name, Op::Add, vec![main.0, short.0], main.1)
    }

    fn line(&mut self, words: &[&str]) -> Result<()> {
        let (kw, rest) = (words[0], &words[1..]);
        const KEYWORDS: &[&str] = &[
            "model",
            "input",
            "classes",
            "conv",
            "bn",
            "relu",
            "maxpool",
            "gap",
            "flatten",
            "linear",
            "residual",
            "shortcut",
            "end",
            "basicblock",
        ];
        if !KEYWORDS.contains(&kw) {
            return Err(self.e(format!(
                "unknown layer `{kw}` (known: {})",
                KEYWORDS.join(", ")
            )));
        }
        let mut pos = Vec::new();
        let mut kv = HashMap::new();
        for w in rest {
            match w.split_once('=') {
                Some((k, v)) => {
                    kv.insert(k.to_string(), v.to_string());
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
                    format!("{kw}: {what} must be a whole number, got `{s}`"),
                )
            })
        };
        let opt = |key: &str, default: usize| -> Result<usize> {
            kv.get(key).map(|v| num(v, key)).unwrap_or(Ok(default))
        };
        let flag = |key: &str, default: bool| -> Result<bool> {
            match kv.get(key).map(|s| s.as_str()) {
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
        let allowed: &[&str] = match kw {
            "conv" => &["k", "stride", "pad", "bias"],
            "maxpool" => &["k", "stride", "pad"],
            "linear" => &["bias"],
            "basicblock" => &["stride", "bn", "shortcut"],
            _ => &[],
        };
        if let Some(k) = kv.keys().find(|k| !allowed.contains(&k.as_str())) {
            return Err(err(file, line, format!("{kw}: unknown option `{k}`")));
        }
        let need = |n: usize, usage: &str| -> Result<()> {
            if pos.len() == n {
                Ok(())
            } else {
                Err(err(file, line, format!("usage: {usage}")))
            }
        };
        let name_opt = |pos: &[&str]| -> Result<String> {
            match pos {
                [] => Ok(String::new()),
                [n] => Ok(n.to_string()),
                _ => Err(err(file, line, format!("usage: {kw} [NAME]"))),
            }
        };
        match kw {
            "model" => {
                need(1, "model NAME")?;
                self.name = Some(pos[0].to_string());
            }
            "input" => {
                need(3, "input C H W")?;
                if self.cur.is_some() {
                    return Err(self.e("`input` given twice"));
                }
                let s = Shape::new(num(pos[0], "C")?, num(pos[1], "H")?, num(pos[2], "W")?);
                if s.numel() == 0 {
                    return Err(self.e("input shape must be positive"));
                }
                self.input = Some(s);
                self.cur = Some((0, s));
            }
            "classes" => {
                need(1, "classes K")?;
                self.classes = Some(num(pos[0], "K")?);
            }
            "conv" => {
                need(2, "conv NAME COUT k=K [stride=S] [pad=P] [bias=true|false]")?;
                let k = kv.get("k").ok_or_else(|| self.e("conv: k=K is required"))?;
                let k = num(k, "k")?;
                let cout = num(pos[1], "COUT")?;
                self.conv(
                    pos[0],
                    cout,
                    k,
                    opt("stride", 1)?,
                    opt("pad", 0)?,
                    flag("bias", true)?,
                )?;
            }
            "bn" => {
                need(1, "bn NAME")?;
                self.bn(pos[0])?;
            }
            "relu" => {
                let n = name_opt(&pos)?;
                self.relu(&n)?;
            }
            "maxpool" => {
                let n = name_opt(&pos)?;
                let k = kv
                    .get("k")
                    .ok_or_else(|| self.e("maxpool: k=K is required"))?;
                let k = num(k, "k")?;
                let (stride, pad) = (opt("stride", k)?, opt("pad", 0)?);
                let (v, s) = self.cur()?;
                if k == 0 || stride == 0 || s.h + 2 * pad < k || s.w + 2 * pad < k || 2 * pad > k {
                    return Err(self.e(format!(
                        "maxpool k={k} stride={stride} pad={pad} does not fit input {s}"
                    )));
                }
                let out = Shape::new(
                    s.c,
                    (s.h + 2 * pad - k) / stride + 1,
                    (s.w + 2 * pad - k) / stride + 1,
                );
                let name = if n.is_empty() { n } else { self.full_name(&n) };
                self.push(name, Op::MaxPool { k, stride, pad }, vec![v], out)?;
            }
            "gap" => {
                let n = name_opt(&pos)?;
                let (v, s) = self.cur()?;
                self.push(n, Op::GlobalAvgPool, vec![v], Shape::new(s.c, 1, 1))?;
            }
            "flatten" => {
                let n = name_opt(&pos)?;
                let (v, s) = self.cur()?;
                self.push(n, Op::Flatten, vec![v], Shape::new(s.numel(), 1, 1))?;
            }
            "linear" => {
                need(2, "linear NAME DOUT [bias=true|false]")?;
                let (v, s) = self.cur()?;
                if s.h * s.w != 1 {
                    return Err(self.e(format!(
                        "linear needs a flat input, got {s}: add `flatten` or `gap`"
                    )));
                }
                let dout = num(pos[1], "DOUT")?;
                let name = self.full_name(pos[0]);
                let din = s.c;
                let weight = self.add_param(
                    format!("{name}.weight"),
                    vec![dout, din],
                    Init::UniformFanIn(din),
                )?;
                let bias = if flag("bias", true)? {
                    Some(self.add_param(
                        format!("{name}.bias"),
                        vec![dout],
                        Init::UniformFanIn(din),
                    )?)
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
                    Shape::new(dout, 1, 1),
                )?;
            }
            "residual" => {
                need(1, "residual NAME")?;
                self.open_block(pos[0])?;
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
                let sc = kv
                    .get("shortcut")
                    .cloned()
                    .unwrap_or_else(|| "shortcut".into());
                let cout = num(pos[1], "COUT")?;
                self.basicblock(pos[0], cout, opt("stride", 1)?, flag("bn", true)?, &sc)?;
            }
            _ => unreachable!("keyword list and match disagree on `{kw}`"),
        }
        Ok(())
    }
}

/// Parse an architecture file's text. `file` names it in errors.
pub fn parse(file: &str, text: &str) -> Result<Model> {
    let mut p = Parser {
        file,
        line: 0,
        name: None,
        input: None,
        classes: None,
        nodes: vec![],
        params: vec![],
        buffers: vec![],
        cur: None,
        blocks: vec![],
    };
    for (i, raw) in text.lines().enumerate() {
        p.line = i + 1;
        let content = raw.split('#').next().unwrap_or("");
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
    let out = p.cur()?.1;
    if out.numel() != classes || out.spatial() != 1 {
        return Err(p.e(format!(
            "the last layer gives {out}, but the model has {classes} classes"
        )));
    }
    if classes < 2 {
        return Err(p.e("a classifier needs at least 2 classes"));
    }
    Ok(Model::new(
        name, input, classes, p.nodes, p.params, p.buffers,
    ))
}
