//! `--devices` and MPI ranks: a sweeping command's engine over several
//! workers (`hesscope::multi`), each over whole batches, their products
//! summed in float64.

use super::common::{gib_bytes, DecisionsArg, Inputs};
use anyhow::{Context, Result};
use hesscope::cpu::CpuReference;
use hesscope::device::Need;
use hesscope::engine::Problem;
use hesscope::gpu::EngineOptions;
use hesscope::multi::{self, DeviceSpec, MultiEngine};
use hesscope::trace_grad::HoldsDecisions;

/// The engine over several workers where `--devices` is given or the
/// process is one of several MPI ranks (None: one engine, as before), and
/// whether every worker is the float64 engine.
pub fn engine(
    inputs: &Inputs,
    problem: &Problem,
    options: EngineOptions,
) -> Result<Option<(Box<dyn HoldsDecisions>, bool)>> {
    let (_, ranks) = multi::world();
    let devices = match &inputs.devices {
        Some(list) => Some(
            multi::parse_devices(list, &hesscope::gpu::list_adapters())
                .map_err(anyhow::Error::new)?,
        ),
        None => None,
    };
    if ranks <= 1 && devices.is_none() {
        return Ok(None);
    }
    let devices = match devices {
        Some(d) => d,
        // One MPI rank per process, each on --backend and --adapter.
        None => match inputs.backend.resolve(inputs.adapter, Need::Engine)? {
            Some((b, i)) => vec![DeviceSpec::Adapter(b, i)],
            None => vec![DeviceSpec::Cpu],
        },
    };
    let float64 = devices.iter().all(|d| d.is_cpu());
    if float64 && inputs.decisions == DecisionsArg::Float32 {
        anyhow::bail!(
            "invalid --decisions float32 with the float64 CPU engine (cpu): it takes every \
             decision in float64; name GPU adapters"
        );
    }
    let mut opts = options;
    opts.decisions = inputs.decisions.into();
    opts.bn_state = inputs.bn_state.into();
    if let Some(gib) = inputs.cache_budget {
        opts.cache_budget = Some(gib_bytes("--cache-budget", gib, true)?);
    }
    let make = move |d: DeviceSpec, p: Problem| -> hesscope::Result<Box<dyn HoldsDecisions>> {
        Ok(match d {
            DeviceSpec::Cpu => Box::new(CpuReference::checked(p)?),
            DeviceSpec::Adapter(b, i) => Box::new(hesscope::gpu::open_with(&p, b, i, opts)?),
        })
    };
    let list = devices
        .iter()
        .map(|d| d.to_string())
        .collect::<Vec<_>>()
        .join(",");
    if ranks > 1 {
        #[cfg(feature = "mpi")]
        {
            let e = multi::mpi::MpiEngine::open(problem, &devices, make)
                .with_context(|| format!("{ranks} MPI ranks on {list}"))?;
            return Ok(Some((Box::new(e), float64)));
        }
    }
    let e = MultiEngine::open(problem, &devices, |d| Box::new(move |p| make(d, p)))
        .with_context(|| format!("--devices {list}"))?;
    Ok(Some((Box::new(e), float64)))
}
