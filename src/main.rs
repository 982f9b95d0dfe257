//! The `zonalfs` binary: parses the command line (`cli`), sets up logging and the
//! tokio runtime, and runs the chosen command. Errors end here as one line on
//! stderr and a non-zero exit code.

use std::process::ExitCode;

use clap::Parser;
use zonalfs::cli::{CatArgs, Cli, ClientArgs, Command, EmulatorArgs, LsArgs, StatArgs};
use zonalfs::emulator;
use zonalfs::gcs::{GcsClient, GcsError};
use zonalfs::tools;

fn init_logging(filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .init();
}

fn main() -> ExitCode {
    tune_malloc();
    let cli = Cli::parse();
    match cli.command {
        Command::Emulator(args) => run_emulator(args),
        Command::Cat(args) => run_tool(&args.log_level.clone(), || cat(args)),
        Command::Ls(args) => run_tool(&args.log_level.clone(), || ls(args)),
        Command::Stat(args) => run_tool(&args.log_level.clone(), || stat(args)),
    }
}

/// Runs a client tool on a fresh runtime; errors become one line and exit 1.
fn run_tool<F, Fut>(log_level: &str, f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), GcsError>>,
{
    init_logging(log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zonalfs: cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("zonalfs: {e}");
            ExitCode::FAILURE
        }
    }
}

async fn connect(client: &ClientArgs, bucket: &str) -> Result<GcsClient, GcsError> {
    GcsClient::connect(client.client_config(bucket)).await
}

async fn cat(args: CatArgs) -> Result<(), GcsError> {
    let (bucket, object) = tools::parse_gs_url(&args.url)?;
    if object.is_empty() {
        return Err(GcsError::InvalidArgument(format!(
            "'{}' names no object",
            args.url
        )));
    }
    let client = connect(&args.client, &bucket).await?;
    let pool = tools::pool(client, args.client.pool_config());
    let opts = tools::CatOptions {
        offset: args.offset,
        length: args.length,
        window: args.window,
        inflight: args.inflight,
    };
    let mut out = tokio::io::stdout();
    tools::cat(&pool, &object, &opts, &mut out).await?;
    Ok(())
}

async fn ls(args: LsArgs) -> Result<(), GcsError> {
    let (bucket, prefix) = tools::parse_gs_url(&args.url)?;
    let client = connect(&args.client, &bucket).await?;
    for line in tools::ls(&client, &prefix, args.long).await? {
        println!("{line}");
    }
    Ok(())
}

async fn stat(args: StatArgs) -> Result<(), GcsError> {
    let (bucket, object) = tools::parse_gs_url(&args.url)?;
    let client = connect(&args.client, &bucket).await?;
    print!("{}", tools::describe(&bucket, &client.stat(&object).await?));
    Ok(())
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    match (
        signal(SignalKind::interrupt()),
        signal(SignalKind::terminate()),
    ) {
        (Ok(mut int), Ok(mut term)) => {
            tokio::select! {
                _ = int.recv() => {}
                _ = term.recv() => {}
            }
        }
        _ => {
            let _ = tokio::signal::ctrl_c().await;
        }
    }
}

/// Keeps large (chunk- and window-sized) allocations in the heap for reuse
/// instead of mapping and faulting in fresh pages for every 2 MiB chunk or 8 MiB
/// window (glibc's default mmap threshold would do that); measured in
/// docs/benchmarks.md.
fn tune_malloc() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    {
        // SAFETY: mallopt only changes allocator tuning parameters; it is called
        // before any other thread exists.
        unsafe {
            libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
            libc::mallopt(libc::M_TRIM_THRESHOLD, 128 << 20);
        }
    }
}

fn run_emulator(args: EmulatorArgs) -> ExitCode {
    init_logging(&args.log_level);
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("zonalfs emulator: cannot start the runtime: {e}");
            return ExitCode::from(2);
        }
    };
    let result = runtime.block_on(async {
        let emu = emulator::Emulator::new(&args.root, args.config())?;
        let listener = emulator::bind(&args.listen).await?;
        let addr = listener.local_addr()?;
        println!("listening on {addr}");
        tracing::info!(%addr, root = %args.root.display(), "emulator serving");
        emulator::serve(emu.clone(), listener, shutdown_signal()).await?;
        Ok::<_, emulator::EmuError>(emu)
    });
    match result {
        Ok(emu) => {
            eprintln!("{}", emu.counters.to_json());
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("zonalfs emulator: {e}");
            ExitCode::from(2)
        }
    }
}
