//! Data-parallel training on GPU adapters (`train --devices vulkan:0,gl:0`)
//! for models without batch norm: each mini-batch split over the adapters
//! as [`super::train::split`] says, each adapter's loss and gradient of its
//! part (float32 passes, the mean over its samples) weighted by its share
//! n_w/B and summed in float64 on the host in worker order, and the SGD
//! step taken once on the host in float64 (the float64 trainer's update).
//!
//! Batch norm in batch mode would need the per-channel sums of every
//! adapter in the middle of each forward and backward pass (a host round
//! trip per layer and pass inside the GPU programs, which run whole); it is
//! refused naming the layer ([`check_model`]). Each adapter keeps its
//! context and engines on its own thread (wgpu objects are not `Send`),
//! one engine per part size (the last mini-batch's parts are smaller).

use super::{train::split, DeviceSpec};
use crate::data::Dataset;
use crate::engine::{BnMode, Curvature, Problem};
use crate::error::{Error, Result};
use crate::model::{Model, Op, Weights};
use std::collections::HashMap;
use std::sync::mpsc::{channel, Receiver, Sender};
use std::sync::Arc;
use std::thread::JoinHandle;

/// Refuses a model with batch norm for GPU workers, naming the layer.
pub fn check_model(model: &Model, flag: &str) -> Result<()> {
    for n in &model.nodes {
        if matches!(n.op, Op::BatchNorm { .. }) {
            return Err(Error::Unsupported {
                layer: n.name.clone(),
                msg: format!(
                    "batch norm in batch mode over several GPU adapters ({flag}) would need \
                     every adapter's per-channel sums inside each pass; train it on one \
                     adapter, or data-parallel on the float64 engine (--devices cpu,cpu)"
                ),
            });
        }
    }
    Ok(())
}

struct Job {
    x: Vec<f32>,
    y: Vec<u32>,
    theta: Arc<Vec<f64>>,
}

struct Worker {
    label: String,
    tx: Option<Sender<Job>>,
    rx: Receiver<Result<(f64, Vec<f64>)>>,
    handle: Option<JoinHandle<()>>,
}

/// One thread per adapter, each computing its part's loss and gradient.
pub struct GpuWorkers {
    workers: Vec<Worker>,
    n_params: usize,
}

fn serve(
    device: DeviceSpec,
    model: Model,
    buffers: Vec<Vec<f64>>,
    shape: crate::model::Shape,
    ready: Sender<Result<()>>,
    rx: Receiver<Job>,
    tx: Sender<Result<(f64, Vec<f64>)>>,
) {
    let DeviceSpec::Adapter(backend, index) = device else {
        let _ = ready.send(Err(Error::Invalid {
            what: "device",
            msg: "the float64 engine is no GPU worker".into(),
        }));
        return;
    };
    let ctx = match crate::gpu::GpuContext::open(backend, index) {
        Ok(c) => c,
        Err(e) => {
            let _ = ready.send(Err(e));
            return;
        }
    };
    if ready.send(Ok(())).is_err() {
        return;
    }
    let mut engines: HashMap<usize, crate::gpu::GpuEngine> = HashMap::new();
    while let Ok(job) = rx.recv() {
        let n = job.y.len();
        let r = (|| -> Result<(f64, Vec<f64>)> {
            let e = match engines.entry(n) {
                std::collections::hash_map::Entry::Occupied(e) => {
                    let e = e.into_mut();
                    e.set_samples(&job.x, &job.y)?;
                    e
                }
                std::collections::hash_map::Entry::Vacant(v) => {
                    let data = Dataset {
                        x: job.x.clone(),
                        y: job.y.clone(),
                        shape,
                        source: format!("a training part on {device}"),
                    };
                    let weights = Weights {
                        theta: job.theta.to_vec(),
                        buffers: buffers.clone(),
                    };
                    let p = Problem::new(model.clone(), weights, data, n, BnMode::Batch)?;
                    // The GPU's own decisions, as the GPU trainer takes.
                    let options = crate::gpu::EngineOptions {
                        cache_budget: Some(0),
                        block: Some(1),
                        decisions: crate::decisions::DecisionSource::Float32,
                        ..Default::default()
                    };
                    v.insert(crate::gpu::GpuEngine::with_options(
                        ctx.share(),
                        &p,
                        options,
                    )?)
                }
            };
            e.set_theta(&job.theta)?;
            e.loss_grad()
        })();
        if tx.send(r).is_err() {
            break;
        }
    }
}

impl GpuWorkers {
    /// Opens every adapter on its own thread (a failure names the device).
    pub fn open(
        model: &Model,
        weights: &Weights,
        shape: crate::model::Shape,
        devices: &[DeviceSpec],
    ) -> Result<GpuWorkers> {
        let mut pending = vec![];
        for &d in devices {
            let (ready_tx, ready_rx) = channel();
            let (job_tx, job_rx) = channel();
            let (res_tx, res_rx) = channel();
            let (m, b) = (model.clone(), weights.buffers.clone());
            let label = d.to_string();
            let handle = std::thread::Builder::new()
                .name(format!("hesscope train {label}"))
                .spawn(move || serve(d, m, b, shape, ready_tx, job_rx, res_tx))
                .map_err(|e| Error::Worker {
                    worker: label.clone(),
                    msg: format!("cannot start its thread: {e}"),
                })?;
            pending.push((label, job_tx, res_rx, handle, ready_rx));
        }
        let mut workers = vec![];
        let mut first_err = None;
        for (label, tx, rx, handle, ready) in pending {
            match ready.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    first_err.get_or_insert(Error::Worker {
                        worker: label.clone(),
                        msg: e.to_string(),
                    });
                }
                Err(_) => {
                    first_err.get_or_insert(Error::Worker {
                        worker: label.clone(),
                        msg: "its thread ended before opening the adapter".into(),
                    });
                }
            }
            workers.push(Worker {
                label,
                tx: Some(tx),
                rx,
                handle: Some(handle),
            });
        }
        let w = GpuWorkers {
            workers,
            n_params: model.n_params,
        };
        match first_err {
            Some(e) => Err(e),
            None => Ok(w),
        }
    }

    pub fn count(&self) -> usize {
        self.workers.len()
    }

    /// The mean loss and gradient of samples `start..start + count` of
    /// `data` at `theta`: every adapter's part sent before any answer is
    /// read, the parts weighted by n_w/count and summed in worker order.
    pub fn loss_grad(
        &self,
        data: &Dataset,
        start: usize,
        count: usize,
        theta: &[f64],
    ) -> Result<(f64, Vec<f64>)> {
        let d = data.shape.numel();
        let theta = Arc::new(theta.to_vec());
        let parts = split(count, self.workers.len());
        let mut sent = vec![];
        for (w, r) in self.workers.iter().zip(&parts) {
            let (a, b) = (start + r.start, start + r.end);
            let job = Job {
                x: data.x[a * d..b * d].to_vec(),
                y: data.y[a..b].to_vec(),
                theta: theta.clone(),
            };
            sent.push(w.tx.as_ref().is_some_and(|tx| tx.send(job).is_ok()));
        }
        let mut loss = 0.0;
        let mut grad = vec![0.0; self.n_params];
        let mut first_err = None;
        for ((w, r), ok) in self.workers.iter().zip(&parts).zip(sent) {
            let got = if ok {
                w.rx.recv().unwrap_or_else(|_| Err(ended()))
            } else {
                Err(ended())
            };
            match got {
                Ok((l, g)) => {
                    let weight = r.len() as f64 / count as f64;
                    loss += weight * l;
                    grad.iter_mut().zip(&g).for_each(|(o, x)| *o += weight * x);
                }
                Err(e) => {
                    first_err.get_or_insert(Error::Worker {
                        worker: w.label.clone(),
                        msg: e.to_string(),
                    });
                }
            }
        }
        match first_err {
            Some(e) => Err(e),
            None => Ok((loss, grad)),
        }
    }
}

fn ended() -> Error {
    Error::Numerical("its training thread ended without an answer (a panic; see above)".into())
}

impl Drop for GpuWorkers {
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
