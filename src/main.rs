mod cli;

use clap::Parser;
use std::process::ExitCode;

fn main() -> ExitCode {
    env_logger::Builder::from_env(env_logger::Env::default().default_filter_or("warn")).init();
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
            cli::output::notice(format!("error: {}", cli::errors::render(&e)));
            ExitCode::FAILURE
        }
    }
}
