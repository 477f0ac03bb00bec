//! `hesscope selftest`: the correctness checks of `hesscope::selftest` on
//! one adapter, as text or one JSON object; the exit status is non-zero
//! when any check fails.

use crate::cli::common::{backend_flag, Backend};
use crate::cli::output::{emit, line};
use anyhow::{bail, Context, Result};
use clap::Args;
use hesscope::device::Need;
use hesscope::gpu::GpuContext;
use hesscope::selftest::SelftestReport;
use std::path::PathBuf;

#[derive(Args, Debug)]
pub struct SelftestArgs {
    /// The folder of PyTorch-made fixtures (`<model>/ref-<bn>/...`, as in
    /// the repository's ../shared/fixtures). Default: $HESSCOPE_FIXTURES,
    /// else ../shared/fixtures.
    #[arg(long, value_name = "DIR")]
    pub fixtures: Option<PathBuf>,
    /// The GPU backend to check (`auto`: a GPU adapter, else a CPU
    /// emulator; `cpu` is refused: the float64 reference is what the GPU
    /// is checked against).
    #[arg(long, value_enum, default_value_t = Backend::Auto)]
    pub backend: Backend,
    /// Which adapter of the backend (see `hesscope devices`).
    #[arg(long, default_value_t = 0, allow_hyphen_values = true)]
    pub adapter: usize,
    /// Print one JSON object on stdout instead of prose.
    #[arg(long, help_heading = "Output")]
    pub json: bool,
}

fn fixtures_dir(a: &SelftestArgs) -> PathBuf {
    a.fixtures
        .clone()
        .or_else(|| std::env::var_os("HESSCOPE_FIXTURES").map(PathBuf::from))
        .unwrap_or_else(|| PathBuf::from("../shared/fixtures"))
}

fn text(r: &SelftestReport) -> Result<()> {
    line(format!(
        "selftest on {} ({}, {}), fixtures {}",
        r.adapter,
        r.backend,
        r.device_type,
        r.fixtures.display()
    ))?;
    for c in &r.checks {
        let err = c
            .error
            .map(|e| format!("{e:.2e}"))
            .unwrap_or_else(|| "-".into());
        let note = c
            .note
            .as_deref()
            .map(|n| format!("  ({n})"))
            .unwrap_or_default();
        line(format!(
            "{}  {:<20} {:<11} {:<13} error {:>8}  tolerance {:.0e}{}",
            if c.passed { "pass" } else { "FAIL" },
            c.fixture,
            c.engine,
            c.quantity,
            err,
            c.tolerance,
            note
        ))?;
    }
    for s in &r.skipped {
        line(format!("skipped  {}: {}", s.fixture, s.reason))?;
    }
    line(format!(
        "{} of {} checks failed ({:.1} s)",
        r.failed,
        r.checks.len(),
        r.seconds
    ))
}

pub fn selftest_cmd(a: SelftestArgs) -> Result<()> {
    if a.backend == Backend::Cpu {
        bail!(
            "--backend cpu: selftest checks a GPU adapter against the float64 references; \
             name a GPU backend (auto, vulkan, metal, dx12, gl)"
        );
    }
    // `auto`: a GPU, else an emulator (an adapter is what is checked).
    let Some((choice, adapter)) = a.backend.resolve(a.adapter, Need::Adapter)? else {
        bail!("selftest: no adapter to check (see `hesscope devices`)");
    };
    let root = fixtures_dir(&a);
    let ctx = GpuContext::open(choice, adapter).with_context(|| {
        format!(
            "--backend {} --adapter {} ({} adapter {adapter})",
            a.backend.name(),
            a.adapter,
            backend_flag(choice)
        )
    })?;
    let report = hesscope::selftest::run(&ctx, &root)
        .with_context(|| format!("--fixtures {}", root.display()))?;
    if a.json {
        emit(true, &report)?;
    } else {
        text(&report)?;
    }
    if !report.passed {
        bail!(
            "selftest: {} of {} checks failed on {} ({})",
            report.failed,
            report.checks.len(),
            report.adapter,
            report.backend
        );
    }
    Ok(())
}
