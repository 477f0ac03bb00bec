mod cli;

use clap::Parser;
use std::process::ExitCode;

/// Mesa's Vulkan device-selection layer (an implicit layer that orders
/// adapters for a display) connects to Wayland at instance creation and,
/// where XDG_RUNTIME_DIR is unset (a server, a container, CI), prints
/// `error: XDG_RUNTIME_DIR is invalid or not set in the environment.`
/// twice before anything else. hesscope lists and picks adapters itself,
/// so there the layer is switched off (its own `NODEVICE_SELECT`) unless
/// the user configured it. Set before any thread starts.
fn quiet_display_probe() {
    use std::env::{set_var, var_os};
    if var_os("XDG_RUNTIME_DIR").is_none()
        && var_os("MESA_VK_DEVICE_SELECT").is_none()
        && var_os("NODEVICE_SELECT").is_none()
    {
        set_var("NODEVICE_SELECT", "1");
    }
}

fn main() -> ExitCode {
    quiet_display_probe();
    // wgpu's GL backend logs its EGL probing as errors where a display
    // driver is missing (`EGL 'eglInitialize' code 0x3001: DRI2: failed to
    // load driver` on a server with llvmpipe), though the adapter then
    // opens: every `auto` run lists the adapters, and a driver's complaint
    // must not greet the user. Real GL faults still come back as errors.
    // RUST_LOG overrides.
    env_logger::Builder::from_env(
        env_logger::Env::default().default_filter_or("warn,wgpu_hal::gles=off"),
    )
    .init();
    // MPI ranks (feature `mpi`, under mpirun): MPI ends with `_mpi`.
    #[cfg(feature = "mpi")]
    let _mpi = hesscope::multi::mpi::init();
    let args = match cli::Cli::try_parse() {
        Ok(a) => a,
        Err(e) => {
            // Help and version go to stdout, usage errors to stderr; a
            // closed stream is not worth a panic.
            let _ = e.print();
            return ExitCode::from(e.exit_code().clamp(0, 255) as u8);
        }
    };
    match cli::run(args) {
        Ok(()) => ExitCode::SUCCESS,
        // The reader of stdout is gone (`| head`): stop quietly.
        Err(e) if cli::errors::is_broken_pipe(&e) => ExitCode::SUCCESS,
        Err(e) => {
            let text = format!("error: {}", cli::errors::render(&e));
            // An error not raised alike on every rank ends them all (the
            // others may wait in a collective); an agreed one ends each
            // rank normally, rank 0 printing it.
            #[cfg(feature = "mpi")]
            if let Some(m) = &_mpi {
                if hesscope::multi::world().1 > 1 && !hesscope::multi::error_agreed() {
                    m.abort(&text);
                }
            }
            cli::output::notice(text);
            ExitCode::FAILURE
        }
    }
}
