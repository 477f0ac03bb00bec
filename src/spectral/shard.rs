//! Lanczos bases sharded over MPI ranks (issue 28, item 4): where the
//! bases of a solve do not fit one rank's budget whole, rank r keeps
//! entries [lo_r, hi_r) of every basis vector ([`slice_bounds`]).
//!
//! The operator still takes whole vectors (every rank multiplies the
//! current vector over its own batches, and the products are summed over
//! the ranks as before), so each rank also holds the current Lanczos
//! vector whole, the same bits on every rank. Everything else of a step
//! runs on this rank's slice: the three-term update, the two compensated
//! Gram–Schmidt passes and the norm. A dot product over the basis is a
//! partial sum per rank (Neumaier-compensated over the slice, as the
//! whole store's are over the whole vector); the ranks' partials are
//! gathered (an allgather, which only copies: the order of MPI_Allreduce's
//! sum is unspecified) and summed in rank order with compensation, so
//! every rank gets the same bits. The new vector's slices are gathered
//! once a step to make it whole for the next product.
//!
//! The results differ from the whole store's by the order of the dot
//! products' partial sums (the slices' boundaries cut the compensated
//! chunks differently): rounding, not bits.

use crate::error::{Error, Result};
use crate::spectral::compensated::{dot, neumaier, subtract_combination};
use std::ops::Range;
use std::rc::Rc;

/// The collectives a sharded basis needs from its ranks.
pub trait Collective {
    /// This rank, in 0..size.
    fn rank(&self) -> usize;
    /// The number of ranks.
    fn size(&self) -> usize;
    /// Every rank's `mine`, concatenated in rank order, on every rank;
    /// rank r sends `counts[r]` values (`counts` the same on every rank).
    fn all_gather(&self, mine: &[f64], counts: &[usize]) -> Result<Vec<f64>>;
    /// The name of the ranks, for reports ("3 MPI ranks").
    fn describe(&self) -> String {
        format!("{} ranks", self.size())
    }
}

/// Rank r's entries of an n-vector over `size` ranks: [r·n/size,
/// (r+1)·n/size), so the slices differ by at most one entry.
pub fn slice_bounds(n: usize, rank: usize, size: usize) -> Range<usize> {
    let at = |r: usize| ((n as u128 * r as u128) / size.max(1) as u128) as usize;
    at(rank)..at(rank + 1)
}

/// Bytes the largest slice of `vectors` vectors of n entries takes on one
/// of `size` ranks, in `bytes_per` bytes an entry.
pub fn shard_bytes(n: usize, vectors: usize, size: usize, bytes_per: usize) -> usize {
    n.div_ceil(size.max(1))
        .saturating_mul(vectors)
        .saturating_mul(bytes_per)
}

enum Store {
    F64(Vec<Vec<f64>>),
    F32(Vec<Vec<f32>>),
}

/// Orthonormal vectors of which this rank keeps a slice.
pub struct ShardedBasis {
    comm: Rc<dyn Collective>,
    n: usize,
    range: Range<usize>,
    /// Every rank's slice length, in rank order.
    counts: Vec<usize>,
    store: Store,
}

impl ShardedBasis {
    /// Room for slices of n-vectors, kept in f32 if `single`, else f64.
    pub fn new(comm: Rc<dyn Collective>, n: usize, single: bool) -> ShardedBasis {
        let size = comm.size();
        let counts = (0..size).map(|r| slice_bounds(n, r, size).len()).collect();
        ShardedBasis {
            range: slice_bounds(n, comm.rank(), size),
            comm,
            n,
            counts,
            store: if single {
                Store::F32(vec![])
            } else {
                Store::F64(vec![])
            },
        }
    }

    /// This rank's entries of every vector.
    pub fn range(&self) -> Range<usize> {
        self.range.clone()
    }

    pub fn len(&self) -> usize {
        match &self.store {
            Store::F64(v) => v.len(),
            Store::F32(v) => v.len(),
        }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The whole vector from every rank's slice of it.
    pub fn assemble(&self, local: &[f64]) -> Result<Vec<f64>> {
        if local.len() != self.range.len() {
            return Err(Error::Numerical(format!(
                "a slice of {} entries where this rank holds {}",
                local.len(),
                self.range.len()
            )));
        }
        let whole = self.comm.all_gather(local, &self.counts)?;
        if whole.len() != self.n {
            return Err(Error::Numerical(format!(
                "the ranks' slices make {} entries, not {}",
                whole.len(),
                self.n
            )));
        }
        Ok(whole)
    }

    /// Σ over ranks of each rank's partials (k values a rank, the same k
    /// on every rank), summed in rank order with compensation.
    pub fn sum_partials(&self, partials: &[f64]) -> Result<Vec<f64>> {
        let k = partials.len();
        let size = self.comm.size();
        let all = self.comm.all_gather(partials, &vec![k; size])?;
        if all.len() != k * size {
            return Err(Error::Numerical(format!(
                "{} partial sums gathered from {size} ranks of {k}",
                all.len()
            )));
        }
        Ok((0..k)
            .map(|j| neumaier((0..size).map(|r| all[r * k + j])))
            .collect())
    }

    /// a · b over the whole vectors, given this rank's slices.
    pub fn dot(&self, a: &[f64], b: &[f64]) -> Result<f64> {
        Ok(self.sum_partials(&[dot(a, b)])?[0])
    }

    /// Stores this rank's slice of a vector and returns it as stored.
    pub fn push(&mut self, local: Vec<f64>) -> Result<Vec<f64>> {
        if local.len() != self.range.len() {
            return Err(Error::Numerical(format!(
                "a slice of {} entries where this rank holds {}",
                local.len(),
                self.range.len()
            )));
        }
        Ok(match &mut self.store {
            Store::F64(v) => {
                v.push(local.clone());
                local
            }
            Store::F32(v) => {
                let s: Vec<f32> = local.iter().map(|&x| x as f32).collect();
                let back = s.iter().map(|&x| x as f64).collect();
                v.push(s);
                back
            }
        })
    }

    /// This rank's slice of vector j.
    pub fn local(&self, j: usize) -> Vec<f64> {
        match &self.store {
            Store::F64(v) => v[j].clone(),
            Store::F32(v) => v[j].iter().map(|&x| x as f64).collect(),
        }
    }

    /// Vector j whole (gathered from every rank).
    pub fn get(&self, j: usize) -> Result<Vec<f64>> {
        self.assemble(&self.local(j))
    }

    /// q_j · w for every stored q_j, given this rank's slice of w: one
    /// gather of the partials.
    pub fn dots(&self, w: &[f64]) -> Result<Vec<f64>> {
        let partial: Vec<f64> = match &self.store {
            Store::F64(v) => v.iter().map(|q| dot(w, q)).collect(),
            Store::F32(v) => v.iter().map(|q| dot(w, q)).collect(),
        };
        self.sum_partials(&partial)
    }

    /// w -= Σ_j c_j q_j on this rank's slice of w (no communication).
    pub fn subtract(&self, w: &mut [f64], c: &[f64]) {
        match &self.store {
            Store::F64(v) => {
                subtract_combination(w, c, &v.iter().map(|q| q.as_slice()).collect::<Vec<_>>())
            }
            Store::F32(v) => {
                subtract_combination(w, c, &v.iter().map(|q| q.as_slice()).collect::<Vec<_>>())
            }
        }
    }

    /// Σ_j y_j q_j over the first y.len() stored vectors, whole (each
    /// rank combines its slices; the slices are gathered once).
    pub fn combine(&self, y: &[f64]) -> Result<Vec<f64>> {
        let k = y.len().min(self.len());
        let neg: Vec<f64> = y[..k].iter().map(|x| -x).collect();
        let mut out = vec![0.0; self.range.len()];
        match &self.store {
            Store::F64(v) => subtract_combination(
                &mut out,
                &neg,
                &v[..k].iter().map(|q| q.as_slice()).collect::<Vec<_>>(),
            ),
            Store::F32(v) => subtract_combination(
                &mut out,
                &neg,
                &v[..k].iter().map(|q| q.as_slice()).collect::<Vec<_>>(),
            ),
        }
        self.assemble(&out)
    }

    /// "over 3 ranks", for reports.
    pub fn describe(&self) -> String {
        format!("sharded over {}", self.comm.describe())
    }
}

/// Ranks as threads of one process, for tests without MPI: `group(p)`
/// gives p communicators, one for each thread; every collective waits for
/// all p threads.
pub mod threads {
    use super::Collective;
    use crate::error::Result;
    use std::sync::{Arc, Barrier, Mutex};

    struct Shared {
        slots: Mutex<Vec<Vec<f64>>>,
        barrier: Barrier,
    }

    /// One thread's end of a group.
    pub struct ThreadComm {
        rank: usize,
        size: usize,
        shared: Arc<Shared>,
    }

    /// p communicators over one shared exchange, rank r at index r.
    pub fn group(p: usize) -> Vec<ThreadComm> {
        let shared = Arc::new(Shared {
            slots: Mutex::new(vec![vec![]; p]),
            barrier: Barrier::new(p),
        });
        (0..p)
            .map(|rank| ThreadComm {
                rank,
                size: p,
                shared: shared.clone(),
            })
            .collect()
    }

    impl Collective for ThreadComm {
        fn rank(&self) -> usize {
            self.rank
        }
        fn size(&self) -> usize {
            self.size
        }
        fn all_gather(&self, mine: &[f64], counts: &[usize]) -> Result<Vec<f64>> {
            if mine.len() != counts[self.rank] {
                return Err(crate::error::Error::Numerical(format!(
                    "rank {} sends {} values, not {}",
                    self.rank,
                    mine.len(),
                    counts[self.rank]
                )));
            }
            self.shared.slots.lock().unwrap()[self.rank] = mine.to_vec();
            self.shared.barrier.wait();
            let all = self.shared.slots.lock().unwrap().concat();
            // Nobody writes the next round's slot before all have read.
            self.shared.barrier.wait();
            Ok(all)
        }
        fn describe(&self) -> String {
            format!("{} threads", self.size)
        }
    }
}
