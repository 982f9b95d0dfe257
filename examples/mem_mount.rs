//! The FUSE ceiling for the benchmark suite (scripts/bench.sh): zonalfs's own
//! filesystem — the same `Fs`, read engine, block pool and FUSE adapter as
//! `zonalfs mount` — over an in-memory object client instead of the network.
//!
//! ```text
//! mem_mount DIR MOUNTPOINT [KERNEL_READAHEAD_KB]
//! ```
//! Every file under DIR (recursively) becomes an object named by its relative
//! path, held in memory (a symbolic link is followed, so a tree of links to
//! some directories serves just those). The mount is read-only and configured
//! as the daemon's defaults are (page cache, 1 MiB kernel readahead, 4 loop
//! threads, consumed blocks released, prefetch across 16 files). Prints
//! `mounted` when ready; unmounts and exits on SIGTERM or SIGINT, or when
//! someone unmounts it.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use zonalfs::gcs::mem::MemClient;
use zonalfs::mount::{Mount, MountConfig, Objects};

type Error = Box<dyn std::error::Error + Send + Sync>;

fn load(client: &MemClient, root: &Path, dir: &Path) -> Result<u64, Error> {
    let mut n = 0;
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        if p.is_dir() {
            n += load(client, root, &p)?;
        } else {
            let name = p
                .strip_prefix(root)?
                .to_str()
                .ok_or("non-UTF-8 file name")?
                .to_string();
            client.put(&name, std::fs::read(&p)?, true);
            n += 1;
        }
    }
    Ok(n)
}

async fn run(dir: PathBuf, mp: PathBuf, readahead_kb: u32) -> Result<(), Error> {
    let client = MemClient::new(Duration::ZERO);
    let n = load(&client, &dir, &dir)?;
    let cfg = MountConfig {
        kernel_readahead_kb: readahead_kb,
        ..MountConfig::new("memory", &mp)
    };
    let m = Mount::start(&cfg, Objects::Client(client)).await?;
    println!("mounted {n} objects");
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    m.run_until(async {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
    })
    .await?;
    Ok(())
}

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: mem_mount DIR MOUNTPOINT [KERNEL_READAHEAD_KB]");
        return ExitCode::from(2);
    }
    let kb = args.get(3).and_then(|s| s.parse().ok()).unwrap_or(1024);
    let rt = match tokio::runtime::Runtime::new() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("mem_mount: {e}");
            return ExitCode::FAILURE;
        }
    };
    match rt.block_on(run(args[1].clone().into(), args[2].clone().into(), kb)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("mem_mount: {e}");
            ExitCode::FAILURE
        }
    }
}
