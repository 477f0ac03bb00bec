//! The GPU engine's `Curvature`: loss and gradient, Hessian products one
//! or a block at a time, and the Gauss–Newton and residual products
//! (`crate::operator`): G·v is the Hessian R-pass run on a workspace whose
//! plain adjoints were computed from a zero loss adjoint
//! (`plan::BatchSteps::zero_adjoint`), E·v = H·v − G·v two sweeps.

use super::*;
use crate::operator::Operator;

impl Curvature for GpuEngine {
    fn n_params(&self) -> usize {
        self.model.n_params
    }

    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        self.run(true, false)?;
        self.read_loss_grad()
    }

    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        check_out_len(out, self.model.n_params)?;
        self.upload_v(v)?;
        self.run(false, true)?;
        let r = self.read_hv(1)?;
        if r[0].iter().any(|x| !x.is_finite()) {
            self.diagnose(true)?;
        }
        self.check_finite("Hv", &r[0])?;
        out.iter_mut().zip(&r[0]).for_each(|(o, &x)| *o = x as f64);
        Ok(())
    }

    /// One sweep over the data per `block()` directions: the forward pass,
    /// its caches and the weights are shared by the tangents, each layer's
    /// R-pass kernels take them together (one dispatch per layer).
    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        let np = self.model.n_params;
        for o in outs.iter() {
            check_out_len(o, np)?;
        }
        for (vc, oc) in vs.chunks(self.kmax).zip(outs.chunks_mut(self.kmax)) {
            for (k, v) in vc.iter().enumerate() {
                self.upload_v_at(v, k)?;
            }
            self.run_block(false, true, vc.len())?;
            let r = self.read_hv(vc.len())?;
            if r[0].iter().any(|x| !x.is_finite()) {
                self.diagnose(true)?;
            }
            self.check_finite("Hv", &r[0])?;
            for (o, hv) in oc.iter_mut().zip(r[0].chunks(np)) {
                o.iter_mut().zip(hv).for_each(|(a, &b)| *a = b as f64);
            }
        }
        Ok(())
    }

    /// G (`run_sweep` on zero-adjoint workspaces), E = H − G (a Hessian
    /// sweep and a Gauss–Newton sweep per block: a workspace holds the
    /// adjoints of one, so the other recomputes its forward/backward), or
    /// H (`hvp_block`).
    fn product_block(&mut self, op: Operator, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        match op {
            Operator::Hessian => self.hvp_block(vs, outs),
            Operator::Ggn => self.ggn_block(vs, outs),
            Operator::Residual => {
                self.hvp_block(vs, outs)?;
                let mut g: Vec<Vec<f64>> = outs.iter().map(|o| vec![0.0; o.len()]).collect();
                self.ggn_block(vs, &mut g)?;
                for (o, g) in outs.iter_mut().zip(&g) {
                    o.iter_mut().zip(g).for_each(|(a, b)| *a -= b);
                }
                Ok(())
            }
        }
    }

    fn preferred_block(&self) -> usize {
        self.kmax
    }

    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        self.upload_v(v)?;
        self.run(true, true)?;
        let (loss, grad) = self.read_loss_grad()?;
        let r = self.read_hv(1)?;
        self.check_finite("Hv", &r[0])?;
        Ok((loss, grad, r[0].iter().map(|&x| x as f64).collect()))
    }

    fn backend(&self) -> String {
        self.ctx.info.backend.clone()
    }

    fn adapter(&self) -> String {
        self.ctx.info.name.clone()
    }

    fn kernel_paths(&self) -> Option<String> {
        Some(self.kernel_paths.clone())
    }

    fn decision_report(&mut self) -> Result<Option<crate::decisions::DecisionReport>> {
        self.decisions_report()
    }

    /// This GPU, by `EngineOptions::basis_place`: offered (and preferred)
    /// for `Auto` unless it is a CPU emulator, required for `Device`.
    fn basis_device(&self) -> Option<Rc<dyn BasisDevice>> {
        let required = match self.basis_place {
            BasisPlace::Host => return None,
            BasisPlace::Auto if self.ctx.is_cpu_adapter() => return None,
            BasisPlace::Auto => false,
            BasisPlace::Device => true,
        };
        let budget = self
            .basis_budget
            .unwrap_or_else(|| device_basis_budget(self.ctx.info.device_memory));
        let ctx = self.basis_ctx.get_or_init(|| Rc::new(self.ctx.share()));
        Some(Rc::new(GpuBasisDevice::new(ctx.clone(), budget, required)))
    }
}

impl GpuEngine {
    /// Compiles every batch's zero-adjoint forward/backward (first use).
    pub(super) fn compile_zero_adjoint(&mut self) -> Result<()> {
        for bi in 0..self.programs.len() {
            let p = &mut self.programs[bi];
            if p.zero_adjoint_compiled.is_none() {
                p.zero_adjoint_compiled = Some(Compiled::build(
                    &self.ctx,
                    &format!("batch {bi} zero-adjoint forward/backward"),
                    &p.zero_adjoint,
                    &self.arena.buffers,
                )?);
            }
        }
        Ok(())
    }

    /// outs[j] = G vs[j], `block()` directions per sweep: the Hessian's
    /// R-pass on the adjoints of a zero loss adjoint.
    fn ggn_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        let np = self.model.n_params;
        for o in outs.iter() {
            check_out_len(o, np)?;
        }
        for (vc, oc) in vs.chunks(self.kmax).zip(outs.chunks_mut(self.kmax)) {
            for (k, v) in vc.iter().enumerate() {
                self.upload_v_at(v, k)?;
            }
            self.run_sweep(false, true, vc.len(), true)?;
            let r = self.read_hv(vc.len())?;
            if r[0].iter().any(|x| !x.is_finite()) {
                self.diagnose(true)?;
            }
            self.check_finite("Gv", &r[0])?;
            for (o, gv) in oc.iter_mut().zip(r[0].chunks(np)) {
                o.iter_mut().zip(gv).for_each(|(a, &b)| *a = b as f64);
            }
        }
        Ok(())
    }
}
