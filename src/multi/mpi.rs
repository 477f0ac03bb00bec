//! One engine per MPI rank (feature `mpi`, rsmpi over the system's MPI).
//!
//! Every rank runs the same command with the same arguments: it loads the
//! same model, weights and data, takes its run of whole batches
//! ([`super::shares`] over the ranks), and its products, weighted by its
//! share n_r/N, are summed over the ranks in float64 (MPI_Reduce to rank
//! 0, then MPI_Bcast of rank 0's sum, in chunks of at most 2^30 elements:
//! MPI counts are C ints). The broadcast makes every rank hold the same
//! bits, so the solvers above (Lanczos from the same seed, the same
//! reorthogonalisation, the same stopping tests) take the same steps on
//! every rank and call the same collectives in the same order: the
//! commands run unchanged, with no protocol between a master and workers
//! (rank 0 driving and broadcasting each vector would need every command
//! rewritten as a server loop on the other ranks, and would cost the same
//! one vector per product). Only rank 0 writes files, progress and stdout.
//!
//! Errors: every collective of a product is preceded by an all-reduced
//! status (the lowest failing rank), and the failing rank's message is
//! broadcast, so every rank returns the same error and ends normally (rank
//! 0 prints it). An error raised outside the products on some ranks only
//! (the binary's `main` cannot tell that it is shared) aborts the job
//! after printing it ([`abort`]): nothing waits forever.

use super::{merge_reports, DeviceSpec};
use crate::decisions::DecisionReport;
use crate::engine::{check_out_len, Curvature, Problem};
use crate::error::{Error, Result};
use crate::operator::Operator;
use crate::spectral::shard::Collective;
use crate::trace_grad::HoldsDecisions;
use mpi::collective::SystemOperation;
use mpi::datatype::PartitionMut;
use mpi::environment::Universe;
use mpi::topology::{Communicator, SimpleCommunicator};
use mpi::traits::*;

/// Elements per collective call (below 2^31, MPI's int count).
const CHUNK: usize = 1 << 30;

/// MPI for the life of the process: dropping it finalises MPI.
pub struct Session {
    _universe: Universe,
    /// The file descriptor of the original stderr (ranks above 0 send
    /// theirs to /dev/null), for the message before an abort.
    stderr: i32,
}

/// Whether this process was launched by an MPI launcher (mpirun,
/// mpiexec, srun with PMI/PMIx).
pub fn launched() -> bool {
    [
        "OMPI_COMM_WORLD_SIZE",
        "PMI_SIZE",
        "PMIX_RANK",
        "MPI_LOCALNRANKS",
    ]
    .iter()
    .any(|v| std::env::var_os(v).is_some())
}

/// Initialises MPI when launched by an MPI launcher (else None: a plain
/// run). Ranks above 0 send stdout and stderr to /dev/null: only rank 0
/// prints (an aborting rank prints its message on its original stderr).
pub fn init() -> Option<Session> {
    if !launched() {
        return None;
    }
    let (universe, _) = mpi::initialize_with_threading(mpi::Threading::Funneled)?;
    let world = universe.world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    super::set_world(rank, size);
    let mut stderr = 2;
    if rank > 0 {
        // SAFETY: plain POSIX calls on descriptors this process owns.
        unsafe {
            stderr = libc::dup(2);
            let null = libc::open(c"/dev/null".as_ptr(), libc::O_WRONLY);
            if null >= 0 {
                libc::dup2(null, 1);
                libc::dup2(null, 2);
                libc::close(null);
            }
        }
    }
    Some(Session {
        _universe: universe,
        stderr,
    })
}

impl Session {
    /// Prints `msg` on this rank's original stderr (prefixed with the rank
    /// where there are several) and ends every rank (MPI_Abort).
    pub fn abort(&self, msg: &str) -> ! {
        let (rank, size) = super::world();
        let text = if size > 1 {
            format!("rank {rank}: {msg}\n")
        } else {
            format!("{msg}\n")
        };
        // SAFETY: writes a buffer this function owns to a descriptor the
        // session holds.
        unsafe {
            libc::write(self.stderr, text.as_ptr().cast(), text.len());
        }
        SimpleCommunicator::world().abort(1)
    }
}

/// The ranks of MPI_COMM_WORLD as the [`Collective`] of a sharded Lanczos
/// basis (`spectral::shard`).
pub struct MpiRanks {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
}

impl MpiRanks {
    pub fn world() -> MpiRanks {
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        MpiRanks { world, rank, size }
    }
}

impl Collective for MpiRanks {
    fn rank(&self) -> usize {
        self.rank
    }

    fn size(&self) -> usize {
        self.size
    }

    /// MPI_Allgatherv in rounds of at most CHUNK / size values a rank, so
    /// that counts and displacements stay C ints for any n.
    fn all_gather(&self, mine: &[f64], counts: &[usize]) -> Result<Vec<f64>> {
        let per = (CHUNK / self.size.max(1)).max(1);
        let offsets: Vec<usize> = counts
            .iter()
            .scan(0, |at, &c| {
                let o = *at;
                *at += c;
                Some(o)
            })
            .collect();
        let mut out = vec![0.0; counts.iter().sum()];
        let rounds = counts.iter().max().copied().unwrap_or(0).div_ceil(per);
        for t in 0..rounds {
            let lo = t * per;
            let part: Vec<i32> = counts
                .iter()
                .map(|&c| c.saturating_sub(lo).min(per) as i32)
                .collect();
            let displs: Vec<i32> = part
                .iter()
                .scan(0i32, |at, &c| {
                    let d = *at;
                    *at += c;
                    Some(d)
                })
                .collect();
            let total: usize = part.iter().map(|&c| c as usize).sum();
            let mut buf = vec![0.0; total];
            let send = &mine[lo.min(mine.len())..(lo + per).min(mine.len())];
            {
                let mut recv = PartitionMut::new(&mut buf[..], &part[..], &displs[..]);
                self.world.all_gather_varcount_into(send, &mut recv);
            }
            for r in 0..part.len() {
                let (d, c) = (displs[r] as usize, part[r] as usize);
                out[offsets[r] + lo..offsets[r] + lo + c].copy_from_slice(&buf[d..d + c]);
            }
        }
        Ok(out)
    }

    fn describe(&self) -> String {
        format!("{} MPI ranks", self.size)
    }
}

/// This rank's engine over its batches, its products summed over ranks.
pub struct MpiEngine {
    world: SimpleCommunicator,
    rank: usize,
    size: usize,
    /// None where this rank got no batch (more ranks than batches).
    local: Option<Box<dyn HoldsDecisions>>,
    /// n_r / N.
    weight: f64,
    n_params: usize,
    theta: Vec<f64>,
    /// Per rank: its device, and its adapter's name.
    labels: Vec<String>,
    backends: Vec<String>,
    preferred_block: usize,
    kernel_paths: Option<String>,
}

impl MpiEngine {
    /// Every rank's engine: rank r takes `devices[r mod len]` and its
    /// run of batches, built by `make`. A failure on any rank is returned
    /// on every rank, naming the rank and its device.
    pub fn open(
        problem: &Problem,
        devices: &[DeviceSpec],
        make: impl FnOnce(DeviceSpec, Problem) -> Result<Box<dyn HoldsDecisions>>,
    ) -> Result<MpiEngine> {
        let world = SimpleCommunicator::world();
        let (rank, size) = (world.rank() as usize, world.size() as usize);
        let device = devices[rank % devices.len()];
        let batches = problem.data.batches(problem.batch);
        let share = super::shares(&batches, size).swap_remove(rank);
        let sub = super::sub_problem(problem, share);
        let weight = sub.as_ref().map_or(0.0, |s| s.1);
        let mut e = MpiEngine {
            world,
            rank,
            size,
            local: None,
            weight,
            n_params: problem.model.n_params,
            theta: problem.weights.theta.clone(),
            labels: vec![],
            backends: vec![],
            preferred_block: 1,
            kernel_paths: None,
        };
        let built = match sub {
            // A fault injected for tests/mpi.rs: this rank fails to build.
            _ if std::env::var("HESSCOPE_TEST_FAIL_RANK").ok() == Some(rank.to_string()) => Err(
                Error::TooLarge("injected failure (HESSCOPE_TEST_FAIL_RANK)".into()),
            ),
            Some((p, _)) => make(device, p).map(Some),
            None => Ok(None),
        };
        e.local = e.agree(built, &device.to_string())?;
        let mine = match &e.local {
            Some(l) => format!("{} ({device})", l.adapter()),
            None => format!("no batch ({device})"),
        };
        e.labels = e.gather(mine.into_bytes());
        let backend = e.local.as_ref().map_or("none".into(), |l| l.backend());
        e.backends = e.gather(backend.into_bytes());
        let block = e
            .local
            .as_ref()
            .map_or(u64::MAX, |l| l.preferred_block() as u64);
        let mut least = 0u64;
        e.world
            .all_reduce_into(&block, &mut least, SystemOperation::min());
        e.preferred_block = if least == u64::MAX {
            1
        } else {
            least.max(1) as usize
        };
        let paths = e.local.as_ref().and_then(|l| l.kernel_paths());
        e.kernel_paths = if e.rank == 0 { paths } else { None };
        // Every rank learns every device, so a mix is refused everywhere.
        let kinds: Vec<bool> = e
            .backends
            .iter()
            .filter(|b| *b != "none")
            .map(|b| b == "cpu")
            .collect();
        if kinds.iter().any(|&c| c) && kinds.iter().any(|&c| !c) {
            super::mark_agreed();
            return Err(Error::Argument {
                flag: "--devices".into(),
                msg: format!(
                    "the float64 CPU engine and float32 adapters do not mix over MPI ranks ({})",
                    e.labels.join(", ")
                ),
            });
        }
        Ok(e)
    }

    /// Whether every rank succeeded; if not, the lowest failing rank's
    /// error, on every rank.
    fn agree<T>(&self, local: Result<T>, device: &str) -> Result<T> {
        let code = (if local.is_err() { self.rank } else { self.size }) as u64;
        let mut first = 0u64;
        self.world
            .all_reduce_into(&code, &mut first, SystemOperation::min());
        let first = first as usize;
        if first == self.size {
            return local;
        }
        let mut msg = match &local {
            Err(e) if self.rank == first => format!("{device}: {e}").into_bytes(),
            _ => vec![],
        };
        self.broadcast_bytes(first, &mut msg);
        super::mark_agreed();
        Err(Error::Worker {
            worker: format!("MPI rank {first}"),
            msg: String::from_utf8_lossy(&msg).into_owned(),
        })
    }

    fn broadcast_bytes(&self, root: usize, bytes: &mut Vec<u8>) {
        let root = self.world.process_at_rank(root as i32);
        let mut len = bytes.len() as u64;
        root.broadcast_into(&mut len);
        bytes.resize(len as usize, 0);
        for c in bytes.chunks_mut(CHUNK) {
            root.broadcast_into(c);
        }
    }

    /// Every rank's `mine`, in rank order, on every rank.
    fn gather(&self, mine: Vec<u8>) -> Vec<String> {
        (0..self.size)
            .map(|r| {
                let mut b = if r == self.rank { mine.clone() } else { vec![] };
                self.broadcast_bytes(r, &mut b);
                String::from_utf8_lossy(&b).into_owned()
            })
            .collect()
    }

    /// v ← Σ_ranks v, the same bits on every rank: reduced to rank 0,
    /// then broadcast from it, chunk by chunk.
    fn sum(&self, v: &mut [f64]) {
        let root = self.world.process_at_rank(0);
        for c in v.chunks_mut(CHUNK) {
            if self.rank == 0 {
                let mut total = vec![0.0; c.len()];
                root.reduce_into_root(&*c, &mut total[..], SystemOperation::sum());
                c.copy_from_slice(&total);
            } else {
                root.reduce_into(&*c, SystemOperation::sum());
            }
            root.broadcast_into(c);
        }
    }

    fn device(&self) -> String {
        self.labels.get(self.rank).cloned().unwrap_or_default()
    }

    fn scale(&self, v: &mut [f64]) {
        v.iter_mut().for_each(|x| *x *= self.weight);
    }

    /// The ranks' devices, in rank order.
    pub fn labels(&self) -> &[String] {
        &self.labels
    }
}

impl Curvature for MpiEngine {
    fn n_params(&self) -> usize {
        self.n_params
    }

    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        let n = self.n_params;
        let r = match self.local.as_mut() {
            Some(l) => l.loss_grad(),
            None => Ok((0.0, vec![0.0; n])),
        };
        let (loss, grad) = self.agree(r, &self.device())?;
        let mut buf = Vec::with_capacity(n + 1);
        buf.push(loss);
        buf.extend_from_slice(&grad);
        self.scale(&mut buf);
        self.sum(&mut buf);
        Ok((buf[0], buf.split_off(1)))
    }

    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        check_out_len(out, self.n_params)?;
        let r = match self.local.as_mut() {
            Some(l) => l.hvp(v, out),
            None => {
                out.fill(0.0);
                check_out_len(v, self.n_params)
            }
        };
        self.agree(r, &self.device())?;
        self.scale(out);
        self.sum(out);
        Ok(())
    }

    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.product_block(Operator::Hessian, vs, outs)
    }

    /// Every rank's products of `op` over its batches, summed: the same
    /// reduction as the Hessian's (G and E are sums over batches as H is).
    fn product_block(&mut self, op: Operator, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        let r = match self.local.as_mut() {
            Some(l) => l.product_block(op, vs, outs),
            None => {
                outs.iter_mut().for_each(|o| o.fill(0.0));
                if vs.len() != outs.len() {
                    Err(Error::Invalid {
                        what: "output vectors",
                        msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
                    })
                } else {
                    Ok(())
                }
            }
        };
        self.agree(r, &self.device())?;
        for o in outs.iter_mut() {
            self.scale(o);
            self.sum(o);
        }
        Ok(())
    }

    fn preferred_block(&self) -> usize {
        self.preferred_block
    }

    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let n = self.n_params;
        let r = match self.local.as_mut() {
            Some(l) => l.loss_grad_hvp(v),
            None => Ok((0.0, vec![0.0; n], vec![0.0; n])),
        };
        let (loss, grad, mut hv) = self.agree(r, &self.device())?;
        let mut buf = Vec::with_capacity(n + 1);
        buf.push(loss);
        buf.extend_from_slice(&grad);
        self.scale(&mut buf);
        self.sum(&mut buf);
        self.scale(&mut hv);
        self.sum(&mut hv);
        Ok((buf[0], buf.split_off(1), hv))
    }

    fn decision_report(&mut self) -> Result<Option<DecisionReport>> {
        let r = match self.local.as_mut() {
            Some(l) => l.decision_report(),
            None => Ok(None),
        };
        let mine = self.agree(r, &self.device())?;
        let json = serde_json::to_vec(&mine).map_err(|e| Error::Numerical(e.to_string()))?;
        let all = self.gather(json);
        let reports = all
            .iter()
            .map(|s| serde_json::from_str::<Option<DecisionReport>>(s))
            .collect::<std::result::Result<Vec<_>, _>>()
            .map_err(|e| Error::Numerical(format!("a rank's decision report: {e}")))?;
        merge_reports(reports)
    }

    fn backend(&self) -> String {
        let mut b: Vec<&str> = self.backends.iter().map(String::as_str).collect();
        b.dedup();
        format!("mpi:{}x{}", self.size, b.join("+"))
    }

    fn adapter(&self) -> String {
        self.labels.join(" + ")
    }

    fn kernel_paths(&self) -> Option<String> {
        self.kernel_paths.clone()
    }

    /// Every rank holds a slice of a basis that does not fit one whole.
    fn basis_ranks(&self) -> Option<std::rc::Rc<dyn Collective>> {
        (self.size > 1).then(|| std::rc::Rc::new(MpiRanks::world()) as std::rc::Rc<dyn Collective>)
    }
}

impl HoldsDecisions for MpiEngine {
    fn theta(&self) -> Vec<f64> {
        self.theta.clone()
    }

    fn set_theta(&mut self, theta: &[f64]) -> Result<()> {
        let r = match self.local.as_mut() {
            Some(l) => l.set_theta(theta),
            None => Ok(()),
        };
        self.agree(r, &self.device())?;
        self.theta = theta.to_vec();
        Ok(())
    }

    fn hold_decisions(&mut self, hold: bool) -> Result<()> {
        let r = match self.local.as_mut() {
            Some(l) => l.hold_decisions(hold),
            None => Ok(()),
        };
        self.agree(r, &self.device())
    }
}

/// Every rank's `part` (the same length on every rank) summed in rank
/// order, the same bits on every rank: gathered chunk by chunk (each
/// rank's share of a chunk below 2^31 elements) and added from zero
/// (`super::train::sum_gathered`), so that a run over MPI ranks and one
/// over threads agree bit for bit. For data-parallel training, whose
/// collectives all run on the calling thread.
pub fn world_all_sum(part: &[f64]) -> Vec<f64> {
    let world = SimpleCommunicator::world();
    let size = world.size() as usize;
    let mut out = Vec::with_capacity(part.len());
    let per = (CHUNK / size.max(1)).max(1);
    for c in part.chunks(per) {
        let mut all = vec![0.0; c.len() * size];
        world.all_gather_into(c, &mut all[..]);
        out.extend(super::train::sum_gathered(&all, c.len()));
    }
    out
}

/// Ok on every rank where every rank's `local` is Ok; else the lowest
/// failing rank's error, on every rank (marked agreed: each ends normally).
pub fn world_agree(local: Result<()>) -> Result<()> {
    let world = SimpleCommunicator::world();
    let (rank, size) = (world.rank() as usize, world.size() as usize);
    let code = (if local.is_err() { rank } else { size }) as u64;
    let mut first = 0u64;
    world.all_reduce_into(&code, &mut first, SystemOperation::min());
    let first = first as usize;
    if first == size {
        return Ok(());
    }
    let mut msg = match &local {
        Err(e) if rank == first => e.to_string().into_bytes(),
        _ => vec![],
    };
    let root = world.process_at_rank(first as i32);
    let mut len = msg.len() as u64;
    root.broadcast_into(&mut len);
    msg.resize(len as usize, 0);
    for c in msg.chunks_mut(CHUNK) {
        root.broadcast_into(c);
    }
    super::mark_agreed();
    Err(Error::Worker {
        worker: format!("MPI rank {first}"),
        msg: String::from_utf8_lossy(&msg).into_owned(),
    })
}

/// This rank's place among the ranks for data-parallel training.
pub fn train_workers() -> super::train::Workers {
    let (rank, size) = super::world();
    super::train::Workers::Ranks {
        rank,
        size,
        all_sum: world_all_sum,
        agree: world_agree,
    }
}
