//! Residual blocks of the architecture language: `residual NAME ...
//! [shortcut ...] end` and the `basicblock` that expands to ResNet's.

use super::{err, show_shape, Block, Parser};
use crate::error::Result;
use crate::model::graph::{Activation, Op, BN_EPS};

impl Parser<'_> {
    pub(super) fn basicblock(
        &mut self,
        local: &str,
        cout: usize,
        stride: usize,
        bn: bool,
        sc_name: &str,
    ) -> Result<()> {
        let (_, s) = self.image_input("basicblock", "Conv2d")?;
        self.open_block(local)?;
        self.conv("conv1", cout, 3, stride, 1, !bn)?;
        if bn {
            self.bn("bn1", BN_EPS)?;
        }
        self.act("", Activation::Relu)?;
        self.conv("conv2", cout, 3, 1, 1, !bn)?;
        if bn {
            self.bn("bn2", BN_EPS)?;
        }
        if stride != 1 || s.c != cout {
            self.open_shortcut()?;
            self.conv(&format!("{sc_name}.0"), cout, 1, stride, 0, !bn)?;
            if bn {
                self.bn(&format!("{sc_name}.1"), BN_EPS)?;
            }
        }
        self.close_block()?;
        self.act("", Activation::Relu)
    }

    pub(super) fn open_block(&mut self, local: &str) -> Result<()> {
        let input = self.cur()?;
        self.blocks.push(Block {
            prefix: local.to_string(),
            input,
            main: None,
        });
        Ok(())
    }

    pub(super) fn open_shortcut(&mut self) -> Result<()> {
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

    pub(super) fn close_block(&mut self) -> Result<()> {
        let b = self
            .blocks
            .pop()
            .ok_or_else(|| self.e("`end` without `residual`"))?;
        let cur = self.cur()?;
        let (main, short) = match b.main {
            Some(m) => (m, cur),
            None => (cur, b.input),
        };
        let (main_flat, short_flat) = (self.is_flat(main.0), self.is_flat(short.0));
        if main.1 != short.1 || main_flat != short_flat {
            return Err(self.e(format!(
                "residual `{}`: main branch gives {} but shortcut gives {}",
                b.prefix,
                show_shape(main.1, main_flat),
                show_shape(short.1, short_flat)
            )));
        }
        let name = self.full_name(&b.prefix);
        self.cur = Some(main);
        self.push(name, Op::Add, vec![main.0, short.0], main.1, main_flat)
    }
}
