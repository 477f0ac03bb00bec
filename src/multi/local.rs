//! Several engines in one process (`--devices`): each worker builds its
//! engine on its own thread and keeps it there (a GPU engine holds wgpu
//! objects and `Rc`s and never crosses threads), serving requests sent
//! over a channel. A request goes to every worker before any answer is
//! read, so the adapters compute side by side; the answers are summed in
//! float64 in worker order (the same order every time).

use super::{merge_reports, weighted_sum, DeviceSpec};
use crate::decisions::DecisionReport;
use crate::engine::{check_out_len, Curvature, Problem};
use crate::error::{Error, Result};
use crate::operator::Operator;
use crate::trace_grad::HoldsDecisions;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Builds a worker's engine, on the worker's thread.
pub type Factory = Box<dyn FnOnce(Problem) -> Result<Box<dyn HoldsDecisions>> + Send>;

enum Cmd {
    LossGrad,
    Hvp(Arc<Vec<f64>>),
    Product(Operator, Arc<Vec<Vec<f64>>>),
    LossGradHvp(Arc<Vec<f64>>),
    Decisions,
    SetTheta(Arc<Vec<f64>>),
    Hold(bool),
}

enum Reply {
    LossGrad(f64, Vec<f64>),
    Vecs(Vec<Vec<f64>>),
    LossGradHvp(f64, Vec<f64>, Vec<f64>),
    Report(Option<DecisionReport>),
    Done,
}

/// What a worker's engine says about itself, once built.
#[derive(Clone, Debug)]
struct Info {
    adapter: String,
    preferred_block: usize,
    kernel_paths: Option<String>,
}

struct Worker {
    label: String,
    /// n_w / N.
    weight: f64,
    tx: Option<Sender<Cmd>>,
    rx: Receiver<Result<Reply>>,
    handle: Option<JoinHandle<()>>,
    info: Info,
}

/// One engine per device of `--devices`, each over a contiguous run of
/// whole batches, as one [`Curvature`].
pub struct MultiEngine {
    workers: Vec<Worker>,
    n_params: usize,
    /// θ as last set (`HoldsDecisions`).
    theta: Vec<f64>,
    devices: String,
}

fn serve(
    make: Factory,
    problem: Problem,
    ready: Sender<Result<Info>>,
    rx: Receiver<Cmd>,
    tx: Sender<Result<Reply>>,
) {
    let mut e = match make(problem) {
        Ok(e) => e,
        Err(err) => {
            let _ = ready.send(Err(err));
            return;
        }
    };
    let info = Info {
        adapter: e.adapter(),
        preferred_block: e.preferred_block(),
        kernel_paths: e.kernel_paths(),
    };
    if ready.send(Ok(info)).is_err() {
        return;
    }
    let n = e.n_params();
    while let Ok(cmd) = rx.recv() {
        let r = match cmd {
            Cmd::LossGrad => e.loss_grad().map(|(l, g)| Reply::LossGrad(l, g)),
            Cmd::Hvp(v) => {
                let mut out = vec![0.0; n];
                e.hvp(&v, &mut out).map(|_| Reply::Vecs(vec![out]))
            }
            Cmd::Product(op, vs) => {
                let refs: Vec<&[f64]> = vs.iter().map(Vec::as_slice).collect();
                let mut outs = vec![vec![0.0; n]; vs.len()];
                e.product_block(op, &refs, &mut outs)
                    .map(|_| Reply::Vecs(outs))
            }
            Cmd::LossGradHvp(v) => e
                .loss_grad_hvp(&v)
                .map(|(l, g, h)| Reply::LossGradHvp(l, g, h)),
            Cmd::Decisions => e.decision_report().map(Reply::Report),
            Cmd::SetTheta(t) => e.set_theta(&t).map(|_| Reply::Done),
            Cmd::Hold(h) => e.hold_decisions(h).map(|_| Reply::Done),
        };
        if tx.send(r).is_err() {
            break;
        }
    }
}

impl MultiEngine {
    /// Deals `problem`'s batches to `devices` ([`super::shares`]) and
    /// builds each worker's engine with `make(device)` on its own thread,
    /// all at once. A device that gets no batch (fewer batches than
    /// devices) is left out. Any worker's failure is returned naming its
    /// device.
    pub fn open(
        problem: &Problem,
        devices: &[DeviceSpec],
        mut make: impl FnMut(DeviceSpec) -> Factory,
    ) -> Result<MultiEngine> {
        if devices.is_empty() {
            return Err(Error::Argument {
                flag: "--devices".into(),
                msg: "no device named".into(),
            });
        }
        let batches = problem.data.batches(problem.batch);
        let shares = super::shares(&batches, devices.len());
        let mut pending = vec![];
        for (d, range) in devices.iter().zip(shares) {
            let Some((sub, weight)) = super::sub_problem(problem, range) else {
                continue;
            };
            let (ready_tx, ready_rx) = channel();
            let (cmd_tx, cmd_rx) = channel();
            let (rep_tx, rep_rx) = channel();
            let factory = make(*d);
            let label = d.to_string();
            let handle = std::thread::Builder::new()
                .name(format!("hesscope {label}"))
                .spawn(move || serve(factory, sub, ready_tx, cmd_rx, rep_tx))
                .map_err(|e| Error::Worker {
                    worker: label.clone(),
                    msg: format!("cannot start its thread: {e}"),
                })?;
            pending.push((label, weight, cmd_tx, rep_rx, handle, ready_rx));
        }
        let mut workers = vec![];
        let mut first_err = None;
        for (label, weight, tx, rx, handle, ready) in pending {
            match ready.recv() {
                Ok(Ok(info)) => workers.push(Worker {
                    label,
                    weight,
                    tx: Some(tx),
                    rx,
                    handle: Some(handle),
                    info,
                }),
                Ok(Err(e)) => {
                    let _ = handle.join();
                    first_err.get_or_insert(worker_error(&label, e));
                }
                Err(_) => {
                    let _ = handle.join();
                    first_err.get_or_insert(ended(&label));
                }
            }
        }
        let engine = MultiEngine {
            workers,
            n_params: problem.model.n_params,
            theta: problem.weights.theta.clone(),
            devices: devices
                .iter()
                .map(|d| d.to_string())
                .collect::<Vec<_>>()
                .join(","),
        };
        match first_err {
            Some(e) => Err(e),
            None => Ok(engine),
        }
    }

    /// The devices that hold batches, and each one's share n_w/N.
    pub fn shares(&self) -> Vec<(String, f64)> {
        self.workers
            .iter()
            .map(|w| (w.label.clone(), w.weight))
            .collect()
    }

    /// Sends `cmd()` to every worker, then reads every answer (in worker
    /// order; all of them, so the channels stay in step), returning the
    /// first failure.
    fn ask(&mut self, cmd: impl Fn() -> Cmd) -> Result<Vec<(f64, Reply)>> {
        let mut sent = vec![];
        for w in &self.workers {
            let ok = w.tx.as_ref().is_some_and(|tx| tx.send(cmd()).is_ok());
            sent.push(ok);
        }
        let mut out = vec![];
        let mut first_err = None;
        for (w, ok) in self.workers.iter().zip(sent) {
            let r = if ok {
                w.rx.recv().unwrap_or_else(|_| Err(ended(&w.label)))
            } else {
                Err(ended(&w.label))
            };
            match r {
                Ok(rep) => out.push((w.weight, rep)),
                Err(e) => {
                    first_err.get_or_insert(worker_error(&w.label, e));
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok(out),
        }
    }

    fn vecs(&mut self, cmd: impl Fn() -> Cmd, outs: &mut [Vec<f64>]) -> Result<()> {
        let replies = self.ask(cmd)?;
        let parts: Vec<(f64, Vec<Vec<f64>>)> = replies
            .into_iter()
            .map(|(w, r)| match r {
                Reply::Vecs(v) => Ok((w, v)),
                _ => Err(mixed()),
            })
            .collect::<Result<_>>()?;
        for (j, out) in outs.iter_mut().enumerate() {
            weighted_sum(parts.iter().map(|(w, v)| (*w, v[j].as_slice())), out);
        }
        Ok(())
    }
}

fn mixed() -> Error {
    Error::Numerical("a worker answered another request".into())
}

fn ended(label: &str) -> Error {
    Error::Worker {
        worker: label.to_string(),
        msg: "its engine's thread ended without an answer (a panic; see above)".into(),
    }
}

fn worker_error(label: &str, e: Error) -> Error {
    match e {
        e @ Error::Worker { .. } => e,
        e => Error::Worker {
            worker: label.to_string(),
            msg: e.to_string(),
        },
    }
}

impl Drop for MultiEngine {
    fn drop(&mut self) {
        for w in &mut self.workers {
            w.tx = None;
        }
        for w in &mut self.workers {
            if let Some(h) = w.handle.take() {
                let _ = h.join();
            }
        }
    }
}

impl Curvature for MultiEngine {
    fn n_params(&self) -> usize {
        self.n_params
    }

    fn loss_grad(&mut self) -> Result<(f64, Vec<f64>)> {
        let replies = self.ask(|| Cmd::LossGrad)?;
        let mut loss = 0.0;
        let mut parts = vec![];
        for (w, r) in replies {
            let Reply::LossGrad(l, g) = r else {
                return Err(mixed());
            };
            loss += w * l;
            parts.push((w, g));
        }
        let mut grad = vec![0.0; self.n_params];
        weighted_sum(parts.iter().map(|(w, g)| (*w, g.as_slice())), &mut grad);
        Ok((loss, grad))
    }

    fn hvp(&mut self, v: &[f64], out: &mut [f64]) -> Result<()> {
        check_out_len(out, self.n_params)?;
        let v = Arc::new(v.to_vec());
        let mut outs = vec![vec![0.0; self.n_params]];
        self.vecs(|| Cmd::Hvp(v.clone()), &mut outs)?;
        out.copy_from_slice(&outs[0]);
        Ok(())
    }

    fn hvp_block(&mut self, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        self.product_block(Operator::Hessian, vs, outs)
    }

    /// Each worker's products of `op` over its batches (the Hessian's
    /// through the worker's `hvp_block`), weighted and summed as the
    /// Hessian's: G and E are sums over batches as H is.
    fn product_block(&mut self, op: Operator, vs: &[&[f64]], outs: &mut [Vec<f64>]) -> Result<()> {
        if vs.len() != outs.len() {
            return Err(Error::Invalid {
                what: "output vectors",
                msg: format!("{} outputs for {} directions", outs.len(), vs.len()),
            });
        }
        for out in outs.iter() {
            check_out_len(out, self.n_params)?;
        }
        let vs = Arc::new(vs.iter().map(|v| v.to_vec()).collect::<Vec<_>>());
        self.vecs(|| Cmd::Product(op, vs.clone()), outs)
    }

    fn preferred_block(&self) -> usize {
        self.workers
            .iter()
            .map(|w| w.info.preferred_block)
            .min()
            .unwrap_or(1)
            .max(1)
    }

    fn loss_grad_hvp(&mut self, v: &[f64]) -> Result<(f64, Vec<f64>, Vec<f64>)> {
        let v = Arc::new(v.to_vec());
        let replies = self.ask(|| Cmd::LossGradHvp(v.clone()))?;
        let mut loss = 0.0;
        let mut parts = vec![];
        for (w, r) in replies {
            let Reply::LossGradHvp(l, g, h) = r else {
                return Err(mixed());
            };
            loss += w * l;
            parts.push((w, g, h));
        }
        let mut grad = vec![0.0; self.n_params];
        let mut hv = vec![0.0; self.n_params];
        weighted_sum(parts.iter().map(|(w, g, _)| (*w, g.as_slice())), &mut grad);
        weighted_sum(parts.iter().map(|(w, _, h)| (*w, h.as_slice())), &mut hv);
        Ok((loss, grad, hv))
    }

    fn decision_report(&mut self) -> Result<Option<DecisionReport>> {
        let replies = self.ask(|| Cmd::Decisions)?;
        let mut reports = vec![];
        for (_, r) in replies {
            let Reply::Report(r) = r else {
                return Err(mixed());
            };
            reports.push(r);
        }
        merge_reports(reports)
    }

    fn backend(&self) -> String {
        self.devices.clone()
    }

    fn adapter(&self) -> String {
        self.workers
            .iter()
            .map(|w| format!("{} ({})", w.info.adapter, w.label))
            .collect::<Vec<_>>()
            .join(" + ")
    }

    fn kernel_paths(&self) -> Option<String> {
        let paths: Vec<String> = self
            .workers
            .iter()
            .filter_map(|w| Some(format!("{}: {}", w.label, w.info.kernel_paths.as_ref()?)))
            .collect();
        (!paths.is_empty()).then(|| paths.join("; "))
    }
}

impl HoldsDecisions for MultiEngine {
    fn theta(&self) -> Vec<f64> {
        self.theta.clone()
    }

    fn set_theta(&mut self, theta: &[f64]) -> Result<()> {
        let t = Arc::new(theta.to_vec());
        self.ask(|| Cmd::SetTheta(t.clone()))?;
        self.theta = theta.to_vec();
        Ok(())
    }

    fn hold_decisions(&mut self, hold: bool) -> Result<()> {
        self.ask(|| Cmd::Hold(hold))?;
        Ok(())
    }
}
