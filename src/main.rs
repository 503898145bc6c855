//! The `sendable-keys` binary: parse the command line, set up logging, run. Everything else
//! lives in the library (`app::run`).

use std::process::ExitCode;

use clap::Parser;
use sendable_keys::config::{Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    let args = match cli.command {
        Some(Command::Serve(args)) => args,
        None => cli.serve,
    };
    if let Err(err) = sendable_keys::telemetry::init(args.log_format, &args.log) {
        eprintln!("sendable-keys: {err}");
        return ExitCode::from(2);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("sendable-keys: cannot start the async runtime: {err}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(sendable_keys::app::run(args)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            tracing::error!(error = %err, "sendable-keys failed");
            eprintln!("sendable-keys: {err}");
            ExitCode::FAILURE
        }
    }
}
