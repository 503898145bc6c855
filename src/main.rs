//! The `sendable-keys` binary: parse the command line, set up logging, run. Everything else
//! lives in the library (`app::run`, `cli`).

use std::process::ExitCode;

/// mimalloc instead of the system allocator: the request path (h2 frames, protobuf messages,
/// Redis replies) allocates and frees many small buffers across threads, where glibc malloc
/// spent about a fifth of the service's CPU in the VerifyKey profile (see BENCHMARKS.md).
#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

use clap::Parser;
use sendable_keys::config::{Cli, Command, ServeArgs};

fn runtime(worker_threads: Option<usize>) -> Result<tokio::runtime::Runtime, ExitCode> {
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = worker_threads {
        builder.worker_threads(n);
    }
    builder.enable_all().build().map_err(|err| {
        eprintln!("sendable-keys: cannot start the async runtime: {err}");
        ExitCode::FAILURE
    })
}

fn serve(args: ServeArgs) -> ExitCode {
    let runtime = match runtime(args.worker_threads.map(usize::from)) {
        Ok(runtime) => runtime,
        Err(code) => return code,
    };
    runtime.block_on(async {
        // Inside the runtime: the OTLP exporter's gRPC client runs on it.
        let telemetry = match sendable_keys::telemetry::init(args.log_format, &args.log) {
            Ok(guard) => guard,
            Err(err) => {
                eprintln!("sendable-keys: {err}");
                return ExitCode::from(2);
            }
        };
        let exported = telemetry.tracing_exported();
        match sendable_keys::app::run(args, exported).await {
            Ok(()) => ExitCode::SUCCESS,
            Err(err) => {
                tracing::error!(error = %err, "sendable-keys failed");
                eprintln!("sendable-keys: {err}");
                ExitCode::FAILURE
            }
        }
    })
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match cli.command {
        None => serve(cli.serve),
        Some(Command::Serve(args)) => serve(*args),
        Some(Command::Health(args)) => match runtime(Some(1)) {
            Ok(runtime) => runtime.block_on(sendable_keys::cli::health(&args)),
            Err(code) => code,
        },
        Some(Command::HashToken(args)) => sendable_keys::cli::hash_token(&args),
    }
}
