//! Data-parallel training (issue 28, item 3): `train --devices cpu,cpu`
//! and `train` under `mpirun -n N` split each mini-batch over the workers.
//!
//! A mini-batch of B samples (in the epoch's order) is cut into W
//! contiguous parts, worker w taking samples ⌊w·B/W⌋..⌊(w+1)·B/W⌋ of it
//! ([`split`]: 5 samples over 2 workers are 2 + 3). Each worker runs the
//! float64 forward and backward on its part with the loss scaled by 1/B
//! (not by its own count), so the parts of the loss and of the gradient
//! simply add up to the mini-batch's mean loss and its gradient. Batch norm
//! normalises by the whole mini-batch's statistics, as PyTorch's
//! SyncBatchNorm: at each batch-norm layer the forward's per-channel Σx
//! (with the element count), then Σ(x − μ)² about that mean (the same two
//! rounds as one worker's), and the backward's Σgy and Σgy·x̂ are summed
//! over the workers (`ops::bn::batch_moments_synced`, `backward_synced`);
//! γ's and β's gradients stay each worker's own until the gradients are
//! summed. Every sum over workers adds the workers' partial vectors in
//! worker order, starting from zero, so every worker holds the same bits
//! and a run with threads and a run with MPI ranks agree bit for bit. The
//! running statistics move by the whole mini-batch's mean and variance
//! (the moments every worker got), as one worker's do.
//!
//! With one process ([`Workers::Threads`]) the workers are scoped threads
//! over the one trainer's float64 reference, and the trainer takes the
//! step once. Under MPI ([`Workers::Ranks`]) every rank runs the same
//! trainer on the same data and seed, computes its part, and — holding
//! the same summed gradient — takes the same optimizer step itself: no
//! broadcast of θ is needed (it would cost a vector per step and change
//! nothing), and the checkpoints rank 0 writes are every rank's state.
//!
//! What differs from one worker is the order of the sums over samples
//! (a worker's partial sum, then the sum of the partials), float64
//! rounding: a few units in the last place per step.

use crate::cpu::{BatchStep, CpuReference};
use crate::error::{Error, Result};
use std::ops::Range;
use std::sync::{Condvar, Mutex};

/// How a trainer's mini-batches are spread.
#[derive(Clone, Copy, Debug)]
pub enum Workers {
    /// This many threads of this process (`--devices cpu,cpu,...`).
    Threads(usize),
    /// This process is rank `rank` of `size` MPI ranks; `all_sum` returns
    /// the sum over the ranks of every rank's vector (in rank order, the
    /// same bits on every rank), and `agree` returns the lowest failing
    /// rank's error on every rank (Ok where none failed).
    Ranks {
        rank: usize,
        size: usize,
        all_sum: fn(&[f64]) -> Vec<f64>,
        agree: fn(Result<()>) -> Result<()>,
    },
}

impl Workers {
    /// The number of workers.
    pub fn count(&self) -> usize {
        match *self {
            Workers::Threads(n) => n,
            Workers::Ranks { size, .. } => size,
        }
    }

    /// Refuses a data set whose smallest mini-batch would leave a worker
    /// without a sample (`flag` names the setting, e.g. `--devices cpu,cpu`).
    pub fn check(&self, batches: &[(usize, usize)], batch: usize, flag: &str) -> Result<()> {
        let w = self.count();
        if w == 0 {
            return Err(Error::Argument {
                flag: flag.into(),
                msg: "no worker".into(),
            });
        }
        if let Some(&(_, least)) = batches.iter().min_by_key(|b| b.1) {
            if least < w {
                return Err(Error::Argument {
                    flag: flag.into(),
                    msg: format!(
                        "{w} workers split each mini-batch, and the smallest mini-batch \
                         (--batch {batch} over {} samples) holds {least}: every worker needs \
                         at least one sample; use fewer workers or another --batch",
                        batches.iter().map(|b| b.1).sum::<usize>()
                    ),
                });
            }
        }
        Ok(())
    }
}

/// Worker w's samples of a mini-batch of `count`: ⌊w·count/W⌋..⌊(w+1)·count/W⌋.
pub fn split(count: usize, workers: usize) -> Vec<Range<usize>> {
    let w = workers.max(1);
    (0..w).map(|i| i * count / w..(i + 1) * count / w).collect()
}

/// Σ of `parts` in order, from zero.
fn sum_in_order<'a>(len: usize, parts: impl IntoIterator<Item = &'a [f64]>) -> Vec<f64> {
    let mut out = vec![0.0; len];
    for p in parts {
        out.iter_mut().zip(p).for_each(|(o, x)| *o += x);
    }
    out
}

/// The sums over [`Workers::Ranks`]: every rank's vector gathered, added
/// in rank order (`crate::multi::mpi` provides the gather).
pub fn sum_gathered(gathered: &[f64], len: usize) -> Vec<f64> {
    sum_in_order(len, gathered.chunks(len.max(1)))
}

/// The all-sum of the threads of one step: each worker puts its vector in
/// its slot; the last to arrive adds the slots in worker order and wakes
/// the others, which all take that sum. A worker that leaves the step
/// early (an error or a panic: [`Leave`]) aborts the exchange, so the
/// others never wait for it: from then on every all-sum returns the
/// caller's own vector, and the step's result is discarded for the error.
struct Exchange {
    state: Mutex<Round>,
    woken: Condvar,
}

struct Round {
    slots: Vec<Vec<f64>>,
    arrived: usize,
    /// Completed rounds; a waiter leaves when it moves.
    round: u64,
    sum: Vec<f64>,
    aborted: bool,
}

impl Exchange {
    fn new(workers: usize) -> Exchange {
        Exchange {
            state: Mutex::new(Round {
                slots: vec![vec![]; workers],
                arrived: 0,
                round: 0,
                sum: vec![],
                aborted: false,
            }),
            woken: Condvar::new(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Round> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn all_sum(&self, worker: usize, part: &[f64]) -> Vec<f64> {
        let mut st = self.lock();
        if st.aborted {
            return part.to_vec();
        }
        st.slots[worker] = part.to_vec();
        st.arrived += 1;
        if st.arrived == st.slots.len() {
            st.sum = sum_in_order(part.len(), st.slots.iter().map(Vec::as_slice));
            st.arrived = 0;
            st.round += 1;
            self.woken.notify_all();
            return st.sum.clone();
        }
        let round = st.round;
        while st.round == round && !st.aborted {
            st = self.woken.wait(st).unwrap_or_else(|e| e.into_inner());
        }
        if st.round == round {
            return part.to_vec();
        }
        // The round this worker joined is complete: its sum stays until
        // every worker has arrived at the next, which this one has not.
        st.sum.clone()
    }

    fn abort(&self) {
        self.lock().aborted = true;
        self.woken.notify_all();
    }
}

/// Aborts the exchange when dropped armed: a worker thread that returns an
/// error or unwinds from a panic.
struct Leave<'a>(&'a Exchange, bool);

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        if self.1 {
            self.0.abort();
        }
    }
}

/// The mini-batch `start..start + count` of the reference's current order
/// over `workers`: its mean loss, gradient and batch-norm moments, as
/// [`CpuReference::batch_step`] gives them for one worker (to float64
/// rounding), the same bits on every worker.
pub fn step(
    cpu: &CpuReference,
    workers: &Workers,
    start: usize,
    count: usize,
) -> Result<BatchStep> {
    let n = cpu.problem.data.len();
    if count < workers.count() || start + count > n {
        return Err(Error::Invalid {
            what: "batch size",
            msg: format!(
                "samples {start}..{} of a data set of {n} over {} workers",
                start + count,
                workers.count()
            ),
        });
    }
    let np = cpu.problem.model.n_params;
    let st = match *workers {
        Workers::Threads(w) => {
            let ex = Exchange::new(w);
            let parts = split(count, w);
            let results: Vec<Result<BatchStep>> = std::thread::scope(|s| {
                let handles: Vec<_> = parts
                    .iter()
                    .enumerate()
                    .map(|(i, r)| {
                        let ex = &ex;
                        let r = r.clone();
                        s.spawn(move || {
                            let mut leave = Leave(ex, true);
                            let f = move |p: &[f64]| ex.all_sum(i, p);
                            let out =
                                cpu.batch_step_part(start + r.start, r.len(), count, Some(&f));
                            leave.1 = out.is_err();
                            out
                        })
                    })
                    .collect();
                handles
                    .into_iter()
                    .enumerate()
                    .map(|(i, h)| {
                        h.join().unwrap_or_else(|_| {
                            Err(Error::Worker {
                                worker: format!("training thread {i}"),
                                msg: "it panicked (see above)".into(),
                            })
                        })
                    })
                    .collect()
            });
            let parts: Vec<BatchStep> = results.into_iter().collect::<Result<_>>()?;
            let loss = parts.iter().fold(0.0, |a, p| a + p.loss);
            let grad = sum_in_order(np, parts.iter().map(|p| p.grad.as_slice()));
            let bn = parts.into_iter().next().map(|p| p.bn).unwrap_or_default();
            BatchStep { loss, grad, bn }
        }
        Workers::Ranks {
            rank,
            size,
            all_sum,
            agree,
        } => {
            let r = split(count, size)[rank].clone();
            // A fault injected for tests/mpi.rs: this rank fails its step.
            let fault = match std::env::var("HESSCOPE_TEST_FAIL_TRAIN_RANK") {
                Ok(v) if v == rank.to_string() => Err(Error::TooLarge(
                    "injected failure (HESSCOPE_TEST_FAIL_TRAIN_RANK)".into(),
                )),
                _ => Ok(()),
            };
            agree(fault)?;
            let f = move |p: &[f64]| all_sum(p);
            let mine = cpu.batch_step_part(start + r.start, r.len(), count, Some(&f))?;
            let mut buf = Vec::with_capacity(np + 1);
            buf.push(mine.loss);
            buf.extend_from_slice(&mine.grad);
            let mut total = all_sum(&buf);
            let grad = total.split_off(1);
            BatchStep {
                loss: total[0],
                grad,
                bn: mine.bn,
            }
        }
    };
    crate::cpu::finite_step(st, start, count)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Three workers sum in worker order; then one leaves with an error
    /// while the others wait in the next round: they are released with
    /// their own vectors, and later rounds do not wait either.
    #[test]
    fn a_worker_that_leaves_releases_the_others() {
        let ex = Exchange::new(3);
        let out: Vec<(Vec<f64>, Vec<f64>)> = std::thread::scope(|s| {
            let hs: Vec<_> = (0..3)
                .map(|i| {
                    let ex = &ex;
                    s.spawn(move || {
                        let first = ex.all_sum(i, &[i as f64, 1.0]);
                        if i == 1 {
                            let _leave = Leave(ex, true);
                            return (first, vec![]);
                        }
                        let second = ex.all_sum(i, &[10.0 + i as f64]);
                        let third = ex.all_sum(i, &[20.0 + i as f64]);
                        (first, [second, third].concat())
                    })
                })
                .collect();
            hs.into_iter().map(|h| h.join().unwrap()).collect()
        });
        for (i, (first, later)) in out.iter().enumerate() {
            assert_eq!(first, &vec![3.0, 3.0], "worker {i}");
            if i != 1 {
                assert_eq!(later, &vec![10.0 + i as f64, 20.0 + i as f64], "worker {i}");
            }
        }
    }
}
