//! The Lanczos process with full reorthogonalisation against every earlier
//! vector: two passes of classical Gram–Schmidt with compensated dot
//! products and updates (`compensated.rs`). The bases live in host memory,
//! as much of it as a [`BasisBudget`] allows (by default half of what the
//! host has available): in f64 while they fit, else in f32 — resnet18's
//! 11.7M parameters × 91 vectors take 4.3 GB in f32, 8.5 GB in f64 — with
//! every product still accumulated in f64, so orthogonality stays at f32
//! storage rounding (≈ 1e-7), not at the accumulated error of f32
//! arithmetic. Bases that do not fit even in f32 are refused before any
//! product is computed.
//!
//! Or they live on the operator's device ([`BasisDevice`], offered by a
//! GPU engine through [`SymOperator::basis_device`]): stored in f32, the
//! two products of each pass (c = Qᵀw, Q·c) run there with compensated
//! sums, and only w, c and Q·c cross the bus. The recurrence itself (its
//! three-term update, norms, T) stays on the host in f64. This is for
//! models whose reorthogonalisation would otherwise dominate a GPU run:
//! at resnet18's size the host's products take ~0.9 s per step on two
//! cores (BENCHMARKS.md, "The host's side of Lanczos").

use crate::error::{Error, Result};
use crate::spectral::compensated::{dot, norm, subtract_combination};
use crate::spectral::operator::SymOperator;
pub use crate::spectral::shard::{Collective, ShardedBasis};
use crate::spectral::tridiagonal::{tridiagonal_eigen, TridiagEigen};
use rand::SeedableRng;
use rand_distr::{Distribution, StandardNormal};

/// The basis budget where the host's available memory cannot be read.
pub const FALLBACK_BASIS_BYTES: usize = 2 << 30;

/// Host memory (bytes) the Lanczos bases of one solve may take together.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BasisBudget(pub usize);

impl BasisBudget {
    /// Half the host's available memory (`host::available_memory`), or
    /// `FALLBACK_BASIS_BYTES` where that cannot be read.
    pub fn host_default() -> BasisBudget {
        BasisBudget(
            crate::host::available_memory()
                .map(|b| b / 2)
                .unwrap_or(FALLBACK_BASIS_BYTES),
        )
    }
}

/// "a Lanczos basis" or "N Lanczos bases", for refusals.
fn bases_phrase(bases: usize) -> String {
    if bases > 1 {
        format!("{bases} Lanczos bases")
    } else {
        "a Lanczos basis".to_string()
    }
}

/// The verb agreeing with `bases_phrase`.
fn need(bases: usize) -> &'static str {
    if bases > 1 {
        "need"
    } else {
        "needs"
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BasisPrecision {
    F64,
    F32,
}

impl BasisPrecision {
    /// For one basis of `steps` + 1 vectors of n entries.
    pub fn for_size(n: usize, steps: usize, budget: BasisBudget) -> Result<BasisPrecision> {
        BasisPrecision::for_bases(n, steps, 1, budget)
    }

    /// For `bases` such bases held at once (recurrences in lockstep): f64
    /// while all of them together fit in the budget, f32 while they fit in
    /// it so; refused (naming the sizes) when they do not fit even in f32.
    pub fn for_bases(
        n: usize,
        steps: usize,
        bases: usize,
        budget: BasisBudget,
    ) -> Result<BasisPrecision> {
        let entries = n
            .saturating_mul(steps.saturating_add(1))
            .saturating_mul(bases.max(1));
        if entries.saturating_mul(8) <= budget.0 {
            Ok(BasisPrecision::F64)
        } else if entries.saturating_mul(4) <= budget.0 {
            Ok(BasisPrecision::F32)
        } else {
            Err(Error::Invalid {
                what: "basis budget",
                msg: format!(
                    "{} of {} vectors × {n} entries {} {} even in f32, over the budget of \
                     {} of host memory (by default half of what is available): take fewer \
                     steps, fewer runs in lockstep (the block), or a larger budget",
                    bases_phrase(bases),
                    steps.saturating_add(1),
                    need(bases),
                    crate::host::bytes_text(entries.saturating_mul(4) as u64),
                    crate::host::bytes_text(budget.0 as u64)
                ),
            })
        }
    }
}

// Defined beside `SymOperator`, which offers them; the old paths stay.
pub use crate::spectral::operator::{BasisDevice, DeviceBasis};

/// Bytes a device basis of `vectors` vectors of `n` entries takes: the
/// f32 vectors and two vectors of workspace (w, Q·c).
pub fn device_basis_bytes(n: usize, vectors: usize) -> usize {
    n.saturating_mul(vectors.saturating_add(2))
        .saturating_mul(4)
}

/// Where the bases of one solve live.
#[derive(Clone)]
pub enum BasisPlan {
    Host(BasisPrecision),
    Device(std::rc::Rc<dyn BasisDevice>),
    /// A slice of every vector on each rank (`shard.rs`).
    Sharded(BasisPrecision, std::rc::Rc<dyn Collective>),
}

impl std::fmt::Debug for BasisPlan {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}", self.describe())
    }
}

impl BasisPlan {
    /// For `bases` bases of `steps` + 1 vectors of n entries, on
    /// `device` where one is offered and they fit in its budget (refused
    /// where it is required and they do not), else in host memory by
    /// `BasisPrecision::for_bases`.
    pub fn choose(
        device: Option<std::rc::Rc<dyn BasisDevice>>,
        n: usize,
        steps: usize,
        bases: usize,
        budget: BasisBudget,
    ) -> Result<BasisPlan> {
        BasisPlan::choose_among(device, None, n, steps, bases, budget)
    }

    /// As [`BasisPlan::choose`] for an operator whose products are summed
    /// over the ranks of `ranks` (MPI; None or one rank: as `choose`).
    /// `budget` is per rank. Whole in f64 where that fits (today's bits);
    /// else, over several ranks, sharded: each rank keeps its slice of
    /// every vector, in f64 where the largest slice fits, else in f32;
    /// refused where even f32 slices do not fit. Sharding comes before a
    /// whole f32 basis: it keeps f64 storage for one allgather of partial
    /// dot products per pass.
    pub fn choose_for(
        op: &dyn SymOperator,
        steps: usize,
        bases: usize,
        budget: BasisBudget,
    ) -> Result<BasisPlan> {
        BasisPlan::choose_among(
            op.basis_device(),
            op.basis_ranks(),
            op.dim(),
            steps,
            bases,
            budget,
        )
    }

    /// The choice of [`BasisPlan::choose_for`], from its parts.
    pub fn choose_among(
        device: Option<std::rc::Rc<dyn BasisDevice>>,
        ranks: Option<std::rc::Rc<dyn Collective>>,
        n: usize,
        steps: usize,
        bases: usize,
        budget: BasisBudget,
    ) -> Result<BasisPlan> {
        if let Some(comm) = ranks.filter(|c| c.size() > 1) {
            let vectors = steps.saturating_add(1).saturating_mul(bases.max(1));
            if n.saturating_mul(vectors).saturating_mul(8) > budget.0 {
                let size = comm.size();
                let f64_bytes = crate::spectral::shard::shard_bytes(n, vectors, size, 8);
                if f64_bytes <= budget.0 {
                    return Ok(BasisPlan::Sharded(BasisPrecision::F64, comm));
                }
                if f64_bytes / 2 <= budget.0 {
                    return Ok(BasisPlan::Sharded(BasisPrecision::F32, comm));
                }
                return Err(Error::Invalid {
                    what: "basis budget",
                    msg: format!(
                        "{} of {} vectors × {n} entries {} {} a rank even in f32 sharded \
                         over {}, over the budget of {} a rank: take fewer steps, fewer runs \
                         in lockstep (the block), more ranks, or a larger budget",
                        bases_phrase(bases),
                        steps.saturating_add(1),
                        need(bases),
                        crate::host::bytes_text((f64_bytes / 2) as u64),
                        comm.describe(),
                        crate::host::bytes_text(budget.0 as u64)
                    ),
                });
            }
        }
        if let Some(dev) = device {
            let bytes = device_basis_bytes(n, steps.saturating_add(1)).saturating_mul(bases.max(1));
            if bytes <= dev.budget() {
                return Ok(BasisPlan::Device(dev));
            }
            if dev.required() {
                return Err(Error::Invalid {
                    what: "device basis budget",
                    msg: format!(
                        "{} of {} vectors × {n} entries {} {} on {}, over its basis budget \
                         of {}: take fewer steps, fewer runs in lockstep (the block), or keep \
                         the basis on the host",
                        bases_phrase(bases),
                        steps.saturating_add(1),
                        need(bases),
                        crate::host::bytes_text(bytes as u64),
                        dev.name(),
                        crate::host::bytes_text(dev.budget() as u64)
                    ),
                });
            }
        }
        Ok(BasisPlan::Host(BasisPrecision::for_bases(
            n, steps, bases, budget,
        )?))
    }

    /// An empty basis with room for `vectors` vectors of n entries.
    pub fn basis(&self, n: usize, vectors: usize) -> Result<Basis> {
        Ok(match self {
            BasisPlan::Host(p) => Basis::new(*p),
            BasisPlan::Device(dev) => Basis::Device(dev.allocate(n, vectors)?),
            BasisPlan::Sharded(p, comm) => Basis::Sharded(ShardedBasis::new(
                comm.clone(),
                n,
                *p == BasisPrecision::F32,
            )),
        })
    }

    /// "host f64", "host f32" or "<device> f32", for reports.
    pub fn describe(&self) -> String {
        match self {
            BasisPlan::Host(BasisPrecision::F64) => "host f64".into(),
            BasisPlan::Host(BasisPrecision::F32) => "host f32".into(),
            BasisPlan::Device(d) => format!("{} f32", d.name()),
            BasisPlan::Sharded(p, comm) => format!(
                "host {} sharded over {}",
                if *p == BasisPrecision::F64 {
                    "f64"
                } else {
                    "f32"
                },
                comm.describe()
            ),
        }
    }
}

/// Orthonormal vectors kept in f64 or f32 on the host, or on a device,
/// with compensated products; or a slice of each on every MPI rank.
///
/// The products take *local* vectors: the whole vector, except in a
/// sharded basis, where they take this rank's slice ([`Basis::range`];
/// [`Basis::local`] cuts it, [`Basis::assemble`] gathers it whole).
/// `get` and `combine` return whole vectors.
pub enum Basis {
    F64(Vec<Vec<f64>>),
    F32(Vec<Vec<f32>>),
    Device(Box<dyn DeviceBasis>),
    Sharded(ShardedBasis),
}

impl Basis {
    pub fn new(precision: BasisPrecision) -> Basis {
        match precision {
            BasisPrecision::F64 => Basis::F64(vec![]),
            BasisPrecision::F32 => Basis::F32(vec![]),
        }
    }
    pub fn len(&self) -> usize {
        match self {
            Basis::F64(v) => v.len(),
            Basis::F32(v) => v.len(),
            Basis::Device(d) => d.len(),
            Basis::Sharded(s) => s.len(),
        }
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// The entries of an n-vector this process works on: all of them,
    /// or its slice where sharded.
    pub fn range(&self, n: usize) -> std::ops::Range<usize> {
        match self {
            Basis::Sharded(s) => s.range(),
            _ => 0..n,
        }
    }
    /// This process's part of a whole vector (the vector itself unless
    /// sharded).
    pub fn local(&self, whole: Vec<f64>) -> Vec<f64> {
        match self {
            Basis::Sharded(s) => whole[s.range()].to_vec(),
            _ => whole,
        }
    }
    /// The whole vector from the local parts (every rank's, gathered,
    /// where sharded; else the vector itself).
    pub fn assemble(&self, local: Vec<f64>) -> Result<Vec<f64>> {
        match self {
            Basis::Sharded(s) => s.assemble(&local),
            _ => Ok(local),
        }
    }
    /// a · b of two local vectors, compensated (summed over the ranks
    /// where sharded).
    pub fn dot(&self, a: &[f64], b: &[f64]) -> Result<f64> {
        match self {
            Basis::Sharded(s) => s.dot(a, b),
            _ => Ok(dot(a, b)),
        }
    }
    /// ‖w‖ of a local vector.
    pub fn norm(&self, w: &[f64]) -> Result<f64> {
        match self {
            Basis::Sharded(s) => Ok(s.dot(w, w)?.sqrt()),
            _ => Ok(norm(w)),
        }
    }
    /// Stores local q and returns it as stored (rounded to f32 if so
    /// kept), so the recurrence runs on exactly the vectors that are kept.
    pub fn push(&mut self, q: Vec<f64>) -> Result<Vec<f64>> {
        Ok(match self {
            Basis::F64(v) => {
                v.push(q.clone());
                q
            }
            Basis::F32(v) => {
                let s: Vec<f32> = q.iter().map(|&x| x as f32).collect();
                let back = s.iter().map(|&x| x as f64).collect();
                v.push(s);
                back
            }
            Basis::Device(d) => d.push(&q)?,
            Basis::Sharded(s) => s.push(q)?,
        })
    }
    /// Stored vector j, whole.
    pub fn get(&mut self, j: usize) -> Result<Vec<f64>> {
        Ok(match self {
            Basis::F64(v) => v[j].clone(),
            Basis::F32(v) => v[j].iter().map(|&x| x as f64).collect(),
            Basis::Device(d) => d.get(j)?,
            Basis::Sharded(s) => s.get(j)?,
        })
    }
    /// q_j · w for every stored q_j, w local.
    pub fn dots(&mut self, w: &[f64]) -> Result<Vec<f64>> {
        Ok(match self {
            Basis::F64(v) => v.iter().map(|q| dot(w, q)).collect(),
            Basis::F32(v) => v.iter().map(|q| dot(w, q)).collect(),
            Basis::Device(d) => d.dots(w)?,
            Basis::Sharded(s) => s.dots(w)?,
        })
    }
    /// w -= Σ_j c_j q_j, w local.
    pub fn subtract(&mut self, w: &mut [f64], c: &[f64]) -> Result<()> {
        match self {
            Basis::F64(v) => {
                subtract_combination(w, c, &v.iter().map(|q| q.as_slice()).collect::<Vec<_>>())
            }
            Basis::F32(v) => {
                subtract_combination(w, c, &v.iter().map(|q| q.as_slice()).collect::<Vec<_>>())
            }
            Basis::Device(d) => {
                let y = d.combination(c)?;
                w.iter_mut().zip(&y).for_each(|(x, y)| *x -= y);
            }
            Basis::Sharded(s) => s.subtract(w, c),
        }
        Ok(())
    }
    /// Local w ⟂ every stored vector: two passes of classical Gram–Schmidt.
    pub fn orthogonalize(&mut self, w: &mut [f64]) -> Result<()> {
        for _ in 0..2 {
            let c = self.dots(w)?;
            self.subtract(w, &c)?;
        }
        Ok(())
    }
    /// Σ_j y_j q_j over the first y.len() stored vectors, whole.
    pub fn combine(&mut self, y: &[f64], n: usize) -> Result<Vec<f64>> {
        let k = y.len().min(self.len());
        let neg: Vec<f64> = y[..k].iter().map(|x| -x).collect();
        let mut out = vec![0.0; n];
        match self {
            Basis::F64(v) => subtract_combination(
                &mut out,
                &neg,
                &v[..k].iter().map(|q| q.as_slice()).collect::<Vec<_>>(),
            ),
            Basis::F32(v) => subtract_combination(
                &mut out,
                &neg,
                &v[..k].iter().map(|q| q.as_slice()).collect::<Vec<_>>(),
            ),
            Basis::Device(d) => return d.combination(&y[..k]),
            Basis::Sharded(s) => return s.combine(&y[..k]),
        }
        Ok(out)
    }
}

/// The state of one Lanczos recurrence, without the operator: a step is
/// split into the vector to multiply ([`Recurrence::pending`]) and the
/// absorption of its product ([`Recurrence::absorb`]), so that several
/// recurrences can share one block product per step (`slq` in lockstep).
/// [`Lanczos`] couples it to an operator for one-vector-at-a-time use.
pub struct Recurrence {
    basis: Basis,
    /// T's diagonal.
    pub alpha: Vec<f64>,
    /// T's off-diagonal: beta[j] couples q_j and q_{j+1}; 0 after a breakdown.
    pub beta: Vec<f64>,
    /// The newest basis vector, whole (the next product's input).
    current: Vec<f64>,
    /// The one before, local (`Basis::local`: whole unless sharded).
    previous: Option<Vec<f64>>,
    rng: rand::rngs::StdRng,
    /// Invariant subspaces found (β ≈ 0), each restarted from a fresh
    /// random vector orthogonal to the basis.
    pub breakdowns: usize,
    exhausted: bool,
    scale: f64,
}

/// A Lanczos process that can be continued step by step.
pub struct Lanczos<'a> {
    op: &'a mut dyn SymOperator,
    rec: Recurrence,
}

impl std::ops::Deref for Lanczos<'_> {
    type Target = Recurrence;
    fn deref(&self) -> &Recurrence {
        &self.rec
    }
}

impl std::ops::DerefMut for Lanczos<'_> {
    fn deref_mut(&mut self) -> &mut Recurrence {
        &mut self.rec
    }
}

/// A unit Gaussian vector.
pub fn gaussian_unit(n: usize, rng: &mut rand::rngs::StdRng) -> Vec<f64> {
    let mut v: Vec<f64> = (0..n).map(|_| StandardNormal.sample(rng)).collect();
    let s = norm(&v);
    v.iter_mut().for_each(|x| *x /= s);
    v
}

impl<'a> Lanczos<'a> {
    pub fn new(
        op: &'a mut dyn SymOperator,
        start: &[f64],
        precision: BasisPrecision,
        seed: u64,
    ) -> Result<Lanczos<'a>> {
        Lanczos::with_basis(op, start, Basis::new(precision), seed)
    }

    /// As `new`, keeping the vectors in `basis` (empty; e.g. from
    /// `BasisPlan::basis`).
    pub fn with_basis(
        op: &'a mut dyn SymOperator,
        start: &[f64],
        basis: Basis,
        seed: u64,
    ) -> Result<Lanczos<'a>> {
        let rec = Recurrence::with_basis(op.dim(), start, basis, seed)?;
        Ok(Lanczos { op, rec })
    }

    /// One Lanczos step. Returns false once the basis spans the whole space.
    pub fn step(&mut self) -> Result<bool> {
        let Some(q) = self.rec.pending() else {
            return Ok(false);
        };
        let mut w = vec![0.0; q.len()];
        self.op.apply(q, &mut w)?;
        self.rec.absorb(w)
    }

    /// The operator itself, for residual checks during the process.
    pub fn apply(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        self.op.apply(v, out)
    }
}

impl Recurrence {
    /// A recurrence from `start` (normalised here) for an operator of
    /// dimension `n`; `seed` drives the restarts after breakdowns.
    pub fn new(
        n: usize,
        start: &[f64],
        precision: BasisPrecision,
        seed: u64,
    ) -> Result<Recurrence> {
        Recurrence::with_basis(n, start, Basis::new(precision), seed)
    }

    /// As `new`, keeping the vectors in `basis`, which must be empty.
    pub fn with_basis(n: usize, start: &[f64], mut basis: Basis, seed: u64) -> Result<Recurrence> {
        if !basis.is_empty() {
            return Err(Error::Numerical(
                "a Lanczos recurrence must start from an empty basis".into(),
            ));
        }
        if start.len() != n {
            return Err(Error::Numerical(format!(
                "start vector of {} for an operator of dimension {n}",
                start.len()
            )));
        }
        let s = norm(start);
        if !(s > 0.0 && s.is_finite()) {
            return Err(Error::Numerical(
                "the Lanczos start vector is zero or not finite".into(),
            ));
        }
        let q = basis.local(start.iter().map(|x| x / s).collect());
        let stored = basis.push(q)?;
        let current = basis.assemble(stored)?;
        Ok(Recurrence {
            basis,
            alpha: vec![],
            beta: vec![],
            current,
            previous: None,
            rng: rand::rngs::StdRng::seed_from_u64(seed ^ 0x1a2c05),
            breakdowns: 0,
            exhausted: false,
            scale: 0.0,
        })
    }

    pub fn dim(&self) -> usize {
        self.current.len()
    }

    pub fn steps(&self) -> usize {
        self.alpha.len()
    }

    /// The vector the next step multiplies by the operator (the newest
    /// basis vector, as stored); `None` once the basis spans the space.
    pub fn pending(&self) -> Option<&[f64]> {
        (!self.exhausted).then_some(self.current.as_slice())
    }

    /// The rest of a step, given w = A·[`Recurrence::pending`]: the
    /// three-term update, full reorthogonalisation, and the next basis
    /// vector. Returns false once the basis spans the whole space (or
    /// already did: then `w` is ignored).
    pub fn absorb(&mut self, w: Vec<f64>) -> Result<bool> {
        if self.exhausted {
            return Ok(false);
        }
        let n = self.dim();
        if w.len() != n {
            return Err(Error::Numerical(format!(
                "a product of {} values for an operator of dimension {n}",
                w.len()
            )));
        }
        if let Some(i) = w.iter().position(|x| !x.is_finite()) {
            return Err(Error::Numerical(format!(
                "the operator returned {} at entry {i}",
                w[i]
            )));
        }
        // From here on w is local: this rank's slice where sharded.
        let mut w = self.basis.local(w);
        let current = &self.current[self.basis.range(n)];
        if let (Some(prev), Some(&b)) = (&self.previous, self.beta.last()) {
            w.iter_mut().zip(prev).for_each(|(x, p)| *x -= b * p);
        }
        let a = self.basis.dot(&w, current)?;
        w.iter_mut().zip(current).for_each(|(x, q)| *x -= a * q);
        self.basis.orthogonalize(&mut w)?;
        self.alpha.push(a);
        self.scale = self
            .scale
            .max(a.abs())
            .max(self.beta.last().copied().unwrap_or(0.0));
        if self.alpha.len() >= n {
            self.exhausted = true;
            return Ok(false);
        }
        let mut b = self.basis.norm(&w)?;
        // β ≈ 0: the Krylov space is invariant. Continue from a random
        // vector orthogonal to it, with a zero coupling (T splits).
        if b <= 1e-10 * self.scale.max(f64::MIN_POSITIVE) {
            self.breakdowns += 1;
            w = self.basis.local(gaussian_unit(n, &mut self.rng));
            self.basis.orthogonalize(&mut w)?;
            let r = self.basis.norm(&w)?;
            if r < 1e-8 {
                self.exhausted = true;
                return Ok(false);
            }
            w.iter_mut().for_each(|x| *x /= r);
            b = 0.0;
        } else {
            w.iter_mut().for_each(|x| *x /= b);
        }
        self.beta.push(b);
        let stored = self.basis.push(w)?;
        let next = self.basis.assemble(stored)?;
        let old = std::mem::replace(&mut self.current, next);
        self.previous = Some(self.basis.local(old));
        Ok(true)
    }

    /// Eigen-decomposition of T over the steps taken.
    pub fn ritz(&self) -> Result<TridiagEigen> {
        let m = self.alpha.len();
        tridiagonal_eigen(&self.alpha, &self.beta[..m.saturating_sub(1)])
    }

    /// The coupling to the next, not yet used, Lanczos vector: Ritz residual
    /// estimates are |β_m · y_m|.
    pub fn last_beta(&self) -> f64 {
        if self.beta.len() >= self.alpha.len() {
            self.beta[self.alpha.len() - 1]
        } else {
            0.0
        }
    }

    /// Σ_j y_j q_j over the first y.len() basis vectors.
    pub fn combine(&mut self, y: &[f64]) -> Result<Vec<f64>> {
        let n = self.dim();
        self.basis.combine(y, n)
    }

    /// max |QᵀQ − I| over the stored basis (for tests; O(m² n)).
    pub fn orthogonality_loss(&mut self) -> Result<f64> {
        let m = self.basis.len();
        let mut worst: f64 = 0.0;
        for i in 0..m {
            let qi = self.basis.get(i)?;
            let qi = self.basis.local(qi);
            for (j, d) in self.basis.dots(&qi)?.into_iter().enumerate() {
                let target = if i == j { 1.0 } else { 0.0 };
                worst = worst.max((d - target).abs());
            }
        }
        Ok(worst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::rc::Rc;

    /// A device of `budget` bytes that stores nothing (only the choice is
    /// tested here; tests/gpu_basis.rs runs real ones).
    struct Fake {
        budget: usize,
        required: bool,
    }

    impl BasisDevice for Fake {
        fn budget(&self) -> usize {
            self.budget
        }
        fn required(&self) -> bool {
            self.required
        }
        fn name(&self) -> String {
            "fake".into()
        }
        fn allocate(&self, _: usize, _: usize) -> Result<Box<dyn DeviceBasis>> {
            Err(Error::Numerical("not for allocation".into()))
        }
    }

    #[test]
    fn bases_go_to_the_device_where_they_fit_and_are_refused_where_required() {
        // 2 bases of 13 vectors of 100 entries + 2 workspace vectors each.
        let need = device_basis_bytes(100, 13) * 2;
        assert_eq!(need, 100 * 15 * 4 * 2);
        let host = BasisBudget(1 << 30);
        let plan = |budget, required| {
            let dev: Rc<dyn BasisDevice> = Rc::new(Fake { budget, required });
            BasisPlan::choose(Some(dev), 100, 12, 2, host)
        };
        assert_eq!(plan(need, false).unwrap().describe(), "fake f32");
        assert_eq!(plan(need, true).unwrap().describe(), "fake f32");
        assert_eq!(plan(need - 1, false).unwrap().describe(), "host f64");
        let err = plan(need - 1, true).unwrap_err().to_string();
        assert!(
            err.contains("device basis budget") && err.contains("13 vectors × 100"),
            "{err}"
        );
        let none = BasisPlan::choose(None, 100, 12, 2, host).unwrap();
        assert_eq!(none.describe(), "host f64");
    }
}
