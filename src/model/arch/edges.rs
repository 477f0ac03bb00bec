//! Explicit edges: the architecture language's graph form, one line per
//! value, `NAME = OP(INPUT, ...) [ARGS]`, in which a value may feed several
//! layers, `add` and `concat` take two or more and `mul` two. `OP` and `ARGS` are those of the
//! sequential form (`conv1 = conv(input) 64 k=3 pad=1 bias=false`);
//! `input` is the model's input; a value named by a sequential line
//! (`conv conv1 ...`) can be read by name too, and a sequential line after
//! an explicit one continues from it. [`to_text`] writes any model in this
//! form, which reads back to the same model.

use super::{is_module_name, show_shape, Parser};
use crate::error::Result;
use crate::model::graph::{Activation, Op, Shape};
use crate::model::Model;

/// Keywords whose lines are not layers: no explicit form.
const NOT_LAYERS: &[&str] = &["model", "input", "classes", "residual", "shortcut", "end"];

impl Parser<'_> {
    /// Reads `content` if it is an explicit-edge line (`NAME = OP(...)`);
    /// false for any other line.
    pub(super) fn edge_line(&mut self, content: &str) -> Result<bool> {
        let Some((lhs, rhs)) = content.split_once('=') else {
            return Ok(false);
        };
        let name = lhs.trim();
        let rhs = rhs.trim_start();
        let Some(open) = rhs.find('(') else {
            return Ok(false);
        };
        let op = rhs[..open].trim_end();
        let word = |s: &str| !s.is_empty() && !s.contains(char::is_whitespace);
        if !word(name) || !word(op) || !op.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
            return Ok(false);
        }
        let close = rhs
            .find(')')
            .ok_or_else(|| self.e(format!("`{name} = {op}(`: missing `)`")))?;
        let inputs: Vec<&str> = rhs[open + 1..close].split(',').map(str::trim).collect();
        let args: Vec<&str> = rhs[close + 1..].split_whitespace().collect();
        if !self.blocks.is_empty() {
            return Err(self.e(format!(
                "`{name} = {op}(...)` inside `residual`: explicit edges stand outside blocks \
                 (write the sum as `NAME = add(A, B)`)"
            )));
        }
        if !is_module_name(name) {
            return Err(self.e(format!(
                "`{name}` is not a PyTorch module name (ASCII letters, digits, `_` and `-`, parts \
                 separated by `.`)"
            )));
        }
        if self.cur.is_none() {
            return Err(self.e("`input C H W` must come before the first layer"));
        }
        if self.value(name)?.is_some() {
            return Err(self.e(format!("value `{name}` is defined twice")));
        }
        let mut vals = Vec::with_capacity(inputs.len());
        for i in &inputs {
            if i.is_empty() {
                return Err(self.e(format!("`{name} = {op}(...)`: an empty input name")));
            }
            let v = self.value(i)?.ok_or_else(|| {
                self.e(format!(
                    "`{name} = {op}(...)`: no value named `{i}` before this line (`input` is the \
                     model's input)"
                ))
            })?;
            vals.push(v);
        }
        if matches!(op, "concat" | "mul") {
            if let Some((_, s)) = vals.iter().find(|(_, s)| !s.is_image()) {
                return Err(self.e(format!(
                    "`{name} = {op}(...)`: {op} takes images or flat values, not the {s}"
                )));
            }
        }
        match op {
            "add" => self.add_values(name, &vals)?,
            "concat" => self.concat_values(name, &vals)?,
            "mul" => self.mul_values(name, &vals)?,
            _ if NOT_LAYERS.contains(&op) || !super::KEYWORDS.contains(&op) => {
                return Err(self.e(format!(
                    "`{name} = {op}(...)`: `{op}` is not a layer (known: add, concat, mul, {})",
                    super::KEYWORDS
                        .iter()
                        .filter(|k| !NOT_LAYERS.contains(k))
                        .copied()
                        .collect::<Vec<_>>()
                        .join(", ")
                )));
            }
            _ => {
                if op == "mha" && vals.len() == 3 {
                    self.pending = vals[1..].to_vec();
                } else if vals.len() != 1 {
                    return Err(self.e(format!(
                        "`{name} = {op}(...)`: {op} takes one input, got {}",
                        vals.len()
                    )));
                }
                self.cur = Some(vals[0]);
                let mut words = vec![op, name];
                words.extend(args);
                self.line(&words)?;
            }
        }
        let out = self.cur()?.0;
        self.names.insert(name.to_string(), out);
        Ok(true)
    }

    /// The value called `name`: `input`, one defined by an explicit line,
    /// or the output of the one node a sequential line gave that name.
    fn value(&self, name: &str) -> Result<Option<(usize, Shape)>> {
        let shape = |v: usize| {
            if v == 0 {
                self.input.expect("an input before any value")
            } else {
                self.nodes[v - 1].out_shape
            }
        };
        if name == "input" {
            return Ok(self.input.map(|s| (0, s)));
        }
        if let Some(&v) = self.names.get(name) {
            return Ok(Some((v, shape(v))));
        }
        let mut found = self
            .nodes
            .iter()
            .enumerate()
            .filter(|(_, n)| n.name == name);
        match (found.next(), found.next()) {
            (None, _) => Ok(None),
            (Some((i, _)), None) => Ok(Some((i + 1, shape(i + 1)))),
            (Some(_), Some(_)) => Err(self.e(format!(
                "`{name}` names several layers: an explicit line (`{name} = OP(...)`) names one value"
            ))),
        }
    }

    /// `name = add(a, b, ...)`: the sum of two or more values of one shape,
    /// as a chain of two-input adds (the last named `name`).
    fn add_values(&mut self, name: &str, vals: &[(usize, Shape)]) -> Result<()> {
        if vals.len() < 2 {
            return Err(self.e(format!(
                "`{name} = add(...)` needs at least two inputs, got {}",
                vals.len()
            )));
        }
        let (v0, s0) = vals[0];
        let flat = self.is_flat(v0);
        if let Some(&(v, s)) = vals[1..]
            .iter()
            .find(|(v, s)| *s != s0 || self.is_flat(*v) != flat)
        {
            return Err(self.e(format!(
                "`{name} = add(...)`: inputs of different shapes ({} and {})",
                show_shape(s0, flat),
                show_shape(s, self.is_flat(v))
            )));
        }
        let mut acc = v0;
        for (j, &(v, _)) in vals[1..].iter().enumerate() {
            let last = j + 2 == vals.len();
            self.cur = Some((acc, s0));
            let n = if last {
                name.to_string()
            } else {
                String::new()
            };
            self.push(n, Op::Add, vec![acc, v], s0, flat)?;
            acc = self.cur()?.0;
        }
        Ok(())
    }
}

/// The model in the explicit-edge form: one line per node, every value
/// named (a node's own name where it has a unique one, else its kind and
/// index), every option written out. Parsing it gives the same
/// parameters, buffers and graph.
pub fn to_text(model: &Model) -> String {
    let mut names: Vec<String> = vec!["input".into()];
    for (i, node) in model.nodes.iter().enumerate() {
        let unique = !node.name.is_empty()
            && node.name != "input"
            && model.nodes.iter().filter(|n| n.name == node.name).count() == 1;
        let mut n = if unique {
            node.name.clone()
        } else {
            format!("{}_{}", node.kind(), i + 1)
        };
        while !unique && model.nodes.iter().any(|m| m.name == n) {
            n.push('_');
        }
        names.push(n);
    }
    let s = model.input;
    let input = if s.kind == crate::model::Kind::Ids {
        format!("tokens {}", s.c)
    } else {
        format!("{} {} {}", s.c, s.h, s.w)
    };
    let mut out = format!(
        "# {} in the explicit-edge form: NAME = OP(INPUTS) ARGS\nmodel {}\ninput {input}\nclasses {}\n",
        model.name, model.name, model.classes
    );
    let mut skip = 0;
    for (i, node) in model.nodes.iter().enumerate() {
        if skip > 0 {
            skip -= 1;
            continue;
        }
        let ins: Vec<&str> = node.inputs.iter().map(|&v| names[v].as_str()).collect();
        if let Some((prefix, line)) = super::seq::attention_text(model, i, &ins.join(", ")) {
            out.push_str(&line);
            names[i + 3] = prefix;
            skip = 2;
            continue;
        }
        let args = match node.op {
            Op::Conv {
                cout,
                k,
                stride,
                pad,
                bias,
                groups,
                dilation,
                ..
            } => {
                let mut a = format!(
                    " {cout} k={k} stride={stride} pad={pad} bias={}",
                    bias.is_some()
                );
                if groups != 1 {
                    a.push_str(&format!(" groups={groups}"));
                }
                if dilation != 1 {
                    a.push_str(&format!(" dilation={dilation}"));
                }
                a
            }
            Op::Linear { dout, bias, .. } => format!(" {dout} bias={}", bias.is_some()),
            Op::MaxPool {
                k,
                stride,
                pad,
                ceil,
            }
            | Op::AvgPool {
                k,
                stride,
                pad,
                ceil,
            } => {
                let c = if ceil { " ceil=true" } else { "" };
                format!(" k={k} stride={stride} pad={pad}{c}")
            }
            Op::Act(Activation::LeakyRelu { slope }) => format!(" slope={slope}"),
            Op::Narrow { start, len } => format!(" start={start} len={len}"),
            Op::ChannelShuffle { groups } => format!(" groups={groups}"),
            Op::AdaptiveAvgPool { h, w } => format!(" h={h} w={w}"),
            Op::BatchNorm { eps, .. } if eps != crate::model::graph::BN_EPS => {
                format!(" eps={eps}")
            }
            _ => super::seq::seq_args(model, node),
        };
        let op = match node.op {
            Op::Add => "add",
            _ => node.kind(),
        };
        out.push_str(&format!(
            "{} = {op}({}){args}\n",
            names[i + 1],
            ins.join(", ")
        ));
    }
    out
}
