//! `train --devices LIST` and `train` under `mpirun -n N`: data-parallel
//! steps (`hesscope::multi::train`), each mini-batch split over the
//! workers with batch norm synchronised and the gradients summed. The
//! workers are the float64 engine (`cpu`): threads of this process, or one
//! per MPI rank; or GPU adapters of this process for models without batch
//! norm (`hesscope::multi::train_gpu`).

use super::train_cmd::TrainArgs;
#[cfg(not(feature = "mpi"))]
use anyhow::bail;
use anyhow::Result;
use hesscope::multi::{self, train::Workers};

/// A run's data-parallel workers.
pub enum Plan {
    /// Float64 threads or MPI ranks.
    Float64(Workers),
    /// GPU adapters of this process.
    Gpu(Vec<multi::DeviceSpec>),
}

impl Plan {
    /// Hands the workers to the trainer (`flag` names them in errors).
    pub fn apply(self, tr: &mut hesscope::train::Trainer, flag: &str) -> hesscope::Result<()> {
        match self {
            Plan::Float64(w) => tr.set_workers(w, flag),
            Plan::Gpu(d) => tr.set_gpu_workers(&d, flag),
        }
    }
}

/// The data-parallel workers of a run (None: one worker, as before), and
/// the setting that asked for them (for errors and the report). Every MPI
/// rank reaches the same answer from the same arguments, so a refusal is
/// agreed (each rank ends normally, rank 0 printing it).
pub fn workers(a: &TrainArgs) -> Result<Option<(Plan, String)>> {
    let (_, ranks) = multi::world();
    #[cfg(feature = "mpi")]
    let refuse = |flag: String, msg: &str| -> Result<Option<(Plan, String)>> {
        if ranks > 1 {
            multi::mark_agreed();
        }
        Err(hesscope::Error::Argument {
            flag,
            msg: msg.into(),
        }
        .into())
    };
    let devices = match &a.inputs.devices {
        Some(list) => Some((
            list.clone(),
            multi::parse_devices(list, &hesscope::gpu::list_adapters()).map_err(|e| {
                if ranks > 1 {
                    multi::mark_agreed();
                }
                anyhow::Error::new(e)
            })?,
        )),
        None => None,
    };
    if ranks > 1 {
        #[cfg(feature = "mpi")]
        {
            let flag = format!("{ranks} MPI ranks");
            match &devices {
                Some((list, d)) if d.len() > 1 || !d[0].is_cpu() => {
                    return refuse(
                        format!("--devices {list}"),
                        "under MPI each rank is one float64 worker: name cpu or no device \
                         (GPU adapters train data-parallel in one process)",
                    )
                }
                Some(_) => {}
                None => {
                    if let Some((b, i)) = a
                        .inputs
                        .backend
                        .resolve(a.inputs.adapter, hesscope::device::Need::Engine)?
                    {
                        return refuse(
                            format!(
                                "--backend {} ({})",
                                a.inputs.backend.name(),
                                multi::DeviceSpec::Adapter(b, i)
                            ),
                            "data-parallel training over MPI ranks runs on the float64 CPU \
                             engine: use --backend cpu",
                        );
                    }
                }
            }
            return Ok(Some((Plan::Float64(multi::mpi::train_workers()), flag)));
        }
        #[cfg(not(feature = "mpi"))]
        bail!("{ranks} MPI ranks, but this hesscope was built without the `mpi` feature");
    }
    Ok(devices.map(|(list, d)| {
        let flag = format!("--devices {list}");
        // `parse_devices` refused a mix of cpu and adapters.
        match d.iter().all(|d| d.is_cpu()) {
            true => (Plan::Float64(Workers::Threads(d.len())), flag),
            false => (Plan::Gpu(d), flag),
        }
    }))
}
