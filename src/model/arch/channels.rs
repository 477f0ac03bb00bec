//! The channel layers of the architecture language: `concat(A, B, ...)`
//! and `mul(X, S)` (explicit edges only: they read several values),
//! `narrow [NAME] start=S len=L`, `shuffle [NAME] groups=G` and
//! `adaptive_avgpool [NAME] h=OH w=OW`.

use super::{show_shape, Parser};
use crate::error::Result;
use crate::model::graph::{Op, Shape};
use std::collections::BTreeMap;

impl Parser<'_> {
    /// A whole-number option that must be given.
    fn required_num(&self, kw: &str, kv: &BTreeMap<&str, &str>, key: &str) -> Result<usize> {
        let v = kv
            .get(key)
            .ok_or_else(|| self.e(format!("{kw}: {key}=N is required")))?;
        v.parse().map_err(|_| {
            self.e(format!(
                "{kw}: {key} must be a whole number from 0 to {}, got `{v}`",
                usize::MAX
            ))
        })
    }

    /// `narrow`, `shuffle` or `adaptive_avgpool` named `local` (or unnamed).
    pub(super) fn channel_line(
        &mut self,
        kw: &str,
        local: &str,
        kv: &BTreeMap<&str, &str>,
    ) -> Result<()> {
        let name = self.optional_name(local);
        let label = if name.is_empty() {
            kw.to_string()
        } else {
            format!("{kw} `{name}`")
        };
        match kw {
            "narrow" => {
                let (start, len) = (
                    self.required_num(kw, kv, "start")?,
                    self.required_num(kw, kv, "len")?,
                );
                let (v, s) = self.cur()?;
                if len == 0 || start.checked_add(len).is_none_or(|e| e > s.c) {
                    return Err(self.e(format!(
                        "{label}: channels [{start}, {start} + {len}) must be a nonempty range within \
                         its input's {} channels",
                        s.c
                    )));
                }
                let flat = self.is_flat(v);
                let out = Shape::new(len, s.h, s.w);
                self.push(name, Op::Narrow { start, len }, vec![v], out, flat)
            }
            "shuffle" => {
                let groups = self.required_num(kw, kv, "groups")?;
                let (v, s) = self.cur()?;
                if groups == 0 || !s.c.is_multiple_of(groups) {
                    return Err(self.e(format!(
                        "{label}: groups={groups} must divide its input's {} channels",
                        s.c
                    )));
                }
                let flat = self.is_flat(v);
                self.push(name, Op::ChannelShuffle { groups }, vec![v], s, flat)
            }
            "adaptive_avgpool" => {
                let (h, w) = (
                    self.required_num(kw, kv, "h")?,
                    self.required_num(kw, kv, "w")?,
                );
                let (v, s) = self.image_input(kw, "AdaptiveAvgPool2d")?;
                if h == 0 || w == 0 {
                    return Err(self.e(format!(
                        "{label}: the output size h={h} w={w} must be positive"
                    )));
                }
                let out = self.shape(&format!("the output of {label}"), s.c, h, w)?;
                self.push(name, Op::AdaptiveAvgPool { h, w }, vec![v], out, false)
            }
            _ => Err(self.e(format!("internal: `{kw}` is no channel layer"))),
        }
    }

    /// `name = concat(a, b, ...)`: two or more values of equal h, w (all
    /// images, or all flat) along channels.
    pub(super) fn concat_values(&mut self, name: &str, vals: &[(usize, Shape)]) -> Result<()> {
        if vals.len() < 2 {
            return Err(self.e(format!(
                "`{name} = concat(...)` needs at least two inputs, got {}",
                vals.len()
            )));
        }
        let (v0, s0) = vals[0];
        let flat = self.is_flat(v0);
        if let Some(&(v, s)) = vals[1..]
            .iter()
            .find(|(v, s)| (s.h, s.w) != (s0.h, s0.w) || self.is_flat(*v) != flat)
        {
            return Err(self.e(format!(
                "`{name} = concat(...)`: inputs {} and {} differ in height and width (or one \
                 is flat): concatenation along channels needs equal h, w",
                show_shape(s0, flat),
                show_shape(s, self.is_flat(v))
            )));
        }
        let c = vals
            .iter()
            .try_fold(0usize, |acc, (_, s)| acc.checked_add(s.c))
            .ok_or_else(|| self.e(format!("`{name} = concat(...)`: too many channels")))?;
        let out = self.shape(&format!("the output of concat `{name}`"), c, s0.h, s0.w)?;
        self.cur = Some(vals[0]);
        let ids = vals.iter().map(|v| v.0).collect();
        self.push(name.to_string(), Op::Concat, ids, out, flat)
    }

    /// `name = mul(x, s)`: s of x's shape, or s [C, 1, 1] broadcast over
    /// the image x [C, H, W] (either order; stored as (x, s)).
    pub(super) fn mul_values(&mut self, name: &str, vals: &[(usize, Shape)]) -> Result<()> {
        let [a, b] = vals else {
            return Err(self.e(format!(
                "`{name} = mul(...)` takes two inputs (x, s), got {}",
                vals.len()
            )));
        };
        let factor = |x: &(usize, Shape), s: &(usize, Shape)| {
            let (fx, fs) = (self.is_flat(x.0), self.is_flat(s.0));
            (x.1 == s.1 && fx == fs) || (!fx && !fs && s.1.c == x.1.c && s.1.h == 1 && s.1.w == 1)
        };
        let (x, s) = if factor(a, b) {
            (*a, *b)
        } else if factor(b, a) {
            (*b, *a)
        } else {
            return Err(self.e(format!(
                "`{name} = mul(...)`: {} times {}: the factor must have the other's shape or be \
                 [C, 1, 1] of an image [C, H, W]",
                show_shape(a.1, self.is_flat(a.0)),
                show_shape(b.1, self.is_flat(b.0))
            )));
        };
        let flat = self.is_flat(x.0);
        self.cur = Some(x);
        self.push(name.to_string(), Op::Mul, vec![x.0, s.0], x.1, flat)
    }
}
