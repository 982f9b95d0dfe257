//! The `zonalfs` binary: parses the command line (`cli`), sets up logging and the
//! tokio runtime, and runs the chosen command. Errors end here as one line on
//! stderr, `zonalfs: error: MESSAGE`, and a non-zero exit code: 2 for bad
//! usage (flags, values, config file, `-o` options; and every emulator
//! failure), 1 for everything that fails later (mountpoint, endpoint,
//! credentials, bucket). docs/errors.md lists them.

use std::process::ExitCode;

use clap::Parser;
use zonalfs::cli::{
    network_threads, CatArgs, Cli, ClientArgs, Command, EmulatorArgs, LsArgs, MountArgs, StatArgs,
};
use zonalfs::emulator;
use zonalfs::fs::mountinfo::MountEntry;
use zonalfs::gcs::write::WriteOptions;
use zonalfs::gcs::{GcsClient, GcsError};
use zonalfs::mount::{Ended, Mount, MountError};
use zonalfs::tools;

/// Where logs go and how they look.
struct LogSpec {
    filter: String,
    json: bool,
    file: Option<std::path::PathBuf>,
}

impl LogSpec {
    fn plain(filter: &str) -> LogSpec {
        LogSpec {
            filter: filter.to_string(),
            json: false,
            file: None,
        }
    }
}

/// Sets up tracing; an unwritable log file is an error (one line, exit 2).
fn init_logging(spec: &LogSpec) -> Result<(), String> {
    let filter = tracing_subscriber::EnvFilter::try_new(&spec.filter)
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt().with_env_filter(filter);
    match &spec.file {
        Some(path) => {
            let f = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("--log-file {}: {e}", path.display()))?;
            let w = zonalfs::logsink::LogSink::spawn(Box::new(f), zonalfs::logsink::QUEUE_LINES)
                .map_err(|e| format!("cannot start the log writer: {e}"))?;
            zonalfs::logsink::install(&w);
            let b = builder.with_writer(w).with_ansi(false);
            if spec.json {
                b.json().init();
            } else {
                b.init();
            }
        }
        None => {
            let w = zonalfs::logsink::LogSink::spawn(
                Box::new(std::io::stderr()),
                zonalfs::logsink::QUEUE_LINES,
            )
            .map_err(|e| format!("cannot start the log writer: {e}"))?;
            zonalfs::logsink::install(&w);
            let b = builder.with_writer(w);
            if spec.json {
                b.json().init();
            } else {
                b.init();
            }
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    let code = run();
    // Log lines still queued are written before the process ends.
    zonalfs::logsink::flush();
    code
}

fn run() -> ExitCode {
    tune_malloc();
    let argv: Vec<String> = std::env::args().collect();
    let invoked_as = argv
        .first()
        .and_then(|a| std::path::Path::new(a).file_name())
        .and_then(|n| n.to_str())
        .unwrap_or("");
    let argv = if invoked_as == "mount.zonalfs" {
        // mount(8) helper: `mount -t zonalfs BUCKET DIR -o ...` and fstab.
        match zonalfs::cli::helper_args(&argv[1..]) {
            Ok(args) => args,
            Err(e) => {
                eprintln!("mount.zonalfs: error: {e}");
                return ExitCode::from(2);
            }
        }
    } else {
        argv
    };
    // `zonalfs mount ... -o opt[,opt=val]` takes the fstab-style options too.
    let argv = if argv.get(1).map(String::as_str) == Some("mount") {
        let mut out = Vec::with_capacity(argv.len());
        let mut it = argv.into_iter();
        while let Some(a) = it.next() {
            let opts = if a == "-o" {
                it.next()
            } else {
                a.strip_prefix("-o")
                    .filter(|o| !o.is_empty())
                    .map(str::to_string)
            };
            match opts {
                Some(o) => match zonalfs::cli::expand_mount_options(&o) {
                    Ok(flags) => out.extend(flags),
                    Err(e) => return usage_failure(&e),
                },
                None => out.push(a),
            }
        }
        out
    } else {
        argv
    };
    if let Some(path) = zonalfs::config::config_path(&argv) {
        match zonalfs::config::read(std::path::Path::new(&path)) {
            Ok(settings) => {
                for (env, value) in settings {
                    if std::env::var_os(&env).is_none() {
                        // Single-threaded still: nothing reads the environment concurrently.
                        std::env::set_var(env, value);
                    }
                }
            }
            Err(e) => return usage_failure(&e),
        }
    }
    let cli = match Cli::try_parse_from(&argv) {
        Ok(cli) => cli,
        Err(e) => {
            use clap::error::ErrorKind;
            if matches!(
                e.kind(),
                ErrorKind::DisplayHelp
                    | ErrorKind::DisplayVersion
                    | ErrorKind::DisplayHelpOnMissingArgumentOrSubcommand
            ) {
                e.exit();
            }
            return usage_failure(&zonalfs::cli::usage_error_line(&e, &argv));
        }
    };
    match cli.command {
        Command::Emulator(args) => run_emulator(args),
        Command::Mount(args) if args.foreground => run_tool(
            &mount_log(&args),
            Some(network_threads(args.network_threads)),
            || mount(args, None),
        ),
        Command::Mount(args) => daemonize(args),
        Command::InstallHelper(args) => install_helper(&args.dir),
        Command::Unmount(args) => match zonalfs::fs::fuse::unmount_path(&args.mountpoint) {
            Ok(()) => ExitCode::SUCCESS,
            Err(e) if e.raw_os_error() == Some(libc::EINVAL) => failure(&format!(
                "unmount {}: not a mount point",
                args.mountpoint.display()
            )),
            Err(e) => failure(&format!("unmount {}: {e}", args.mountpoint.display())),
        },
        Command::Cat(args) => run_tool(&LogSpec::plain(&args.log_level), None, || cat(args)),
        Command::Ls(args) => run_tool(&LogSpec::plain(&args.log_level), None, || ls(args)),
        Command::Stat(args) => run_tool(&LogSpec::plain(&args.log_level), None, || stat(args)),
        Command::Cp(args) => run_tool(&LogSpec::plain(&args.log_level), None, || async move {
            let opts = tools::write::UploadOptions {
                finalize: !args.no_finalize,
                no_clobber: args.no_clobber,
                write: WriteOptions {
                    flush_every: args.flush_every,
                },
            };
            let connect = |b: &str| args.client.client_config(b);
            let pool = args.client.pool_config();
            let line = tools::write::copy_command(&connect, pool, &args.src, &args.dst, &opts);
            eprintln!("{}", line.await?);
            Ok::<_, GcsError>(())
        }),
        Command::Append(args) => run_tool(&LogSpec::plain(&args.log_level), None, || async move {
            let opts = WriteOptions {
                flush_every: args.flush_every,
            };
            let connect = |b: &str| args.client.client_config(b);
            let line =
                tools::write::append_command(&connect, &args.src, &args.dst, args.finalize, opts);
            eprintln!("{}", line.await?);
            Ok::<_, GcsError>(())
        }),
        Command::Rm(args) => run_tool(&LogSpec::plain(&args.log_level), None, || async move {
            let connect = |b: &str| args.client.client_config(b);
            for line in tools::write::remove_command(&connect, &args.urls).await? {
                eprintln!("{line}");
            }
            Ok::<_, GcsError>(())
        }),
        Command::Mv(args) => run_tool(&LogSpec::plain(&args.log_level), None, || async move {
            let connect = |b: &str| args.client.client_config(b);
            eprintln!(
                "{}",
                tools::write::move_command(&connect, &args.src, &args.dst).await?
            );
            Ok::<_, GcsError>(())
        }),
    }
}

/// `zonalfs install-helper`: links DIR/mount.zonalfs to this binary so that
/// `mount -t zonalfs` and fstab lines work.
fn install_helper(dir: &std::path::Path) -> ExitCode {
    let link = dir.join("mount.zonalfs");
    let result = std::env::current_exe().and_then(|exe| {
        if link.symlink_metadata().is_ok() {
            std::fs::remove_file(&link)?;
        }
        std::os::unix::fs::symlink(exe, &link)
    });
    match result {
        Ok(()) => {
            println!("installed {}", link.display());
            ExitCode::SUCCESS
        }
        Err(e) => failure(&format!("install-helper {}: {e}", link.display())),
    }
}

/// A bad command line, config file or option (or an emulator that cannot
/// serve): one line, exit 2.
fn usage_failure(msg: &str) -> ExitCode {
    zonalfs::logsink::flush();
    eprintln!("zonalfs: error: {}", one_line(msg));
    ExitCode::from(2)
}

/// Anything that failed after the command line was accepted: one line, exit 1.
fn failure(msg: &str) -> ExitCode {
    zonalfs::logsink::flush();
    eprintln!("zonalfs: error: {}", one_line(msg));
    ExitCode::FAILURE
}

/// `msg` on one line: line breaks (a mount point may contain them) written
/// as `\n` and `\r`, trailing ones dropped.
fn one_line(msg: &str) -> String {
    msg.trim_end_matches(['\n', '\r'])
        .replace('\n', "\\n")
        .replace('\r', "\\r")
}

/// Runs a client tool (or the mount) on a fresh runtime of `threads`
/// workers (None: one per CPU, for the tools, which have no FUSE threads);
/// errors become one line and exit 1.
fn run_tool<F, Fut, E>(log: &LogSpec, threads: Option<usize>, f: F) -> ExitCode
where
    F: FnOnce() -> Fut,
    Fut: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    if let Err(e) = init_logging(log) {
        return usage_failure(&e);
    }
    let mut builder = tokio::runtime::Builder::new_multi_thread();
    if let Some(n) = threads {
        builder.worker_threads(n);
    }
    let runtime = match builder.enable_all().build() {
        Ok(r) => r,
        Err(e) => return failure(&format!("cannot start the runtime: {e}")),
    };
    match runtime.block_on(f()) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => failure(&e.to_string()),
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

fn mount_log(args: &MountArgs) -> LogSpec {
    LogSpec {
        filter: args.log_level.clone(),
        json: args.log_format == zonalfs::cli::LogFormat::Json,
        file: args.log_file.clone(),
    }
}

/// Runs the mount in a child process and exits 0 once the child reported the
/// mount serving and this process sees it mounted too, or 1 with the child's
/// error (or how it died). The fork happens before any thread exists.
fn daemonize(args: MountArgs) -> ExitCode {
    use std::io::{Read, Write};
    use std::os::fd::FromRawFd;
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 fills two fds we then own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return failure(&format!("pipe: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: single-threaded here (no runtime, no logging threads yet).
    let pid = unsafe { libc::fork() };
    if pid < 0 {
        return failure(&format!("fork: {}", std::io::Error::last_os_error()));
    }
    if pid > 0 {
        // SAFETY: fds[1] is ours and not used again in the parent.
        unsafe { libc::close(fds[1]) };
        // SAFETY: fds[0] is an open pipe end we own from here on.
        let mut r = unsafe { std::fs::File::from_raw_fd(fds[0]) };
        let mut msg = Vec::new();
        let _ = r.read_to_end(&mut msg);
        return match Readiness::decode(&msg) {
            Readiness::Serving(ours) => match zonalfs::fs::mountinfo::read() {
                Ok(m) if m.iter().any(|e| e.same_mount(&ours)) => ExitCode::SUCCESS,
                Ok(_) => failure(&format!(
                    "the mount daemon reported {} serving, but it is not mounted",
                    ours.mount_point.display()
                )),
                Err(e) => failure(&format!(
                    "cannot check the mount: {}: {e}",
                    zonalfs::fs::mountinfo::MOUNTINFO
                )),
            },
            Readiness::Failed(e) => {
                // It exits right after reporting its error: reap it.
                let _ = reap(pid, REAP_BOUND);
                failure(&e)
            }
            // Nothing written: the daemon died (only its exit closes the pipe
            // without a word).
            Readiness::Died => failure(&format!(
                "the mount daemon exited before it was ready ({})",
                reap(pid, REAP_BOUND).unwrap_or_else(|| "it did not end".into())
            )),
        };
    }
    // The daemon: own session, stdio detached.
    // SAFETY: fds[0] is the parent's end, closed here; setsid has no preconditions.
    unsafe {
        libc::close(fds[0]);
        libc::setsid();
    }
    if let Ok(null) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/null")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds from a valid open fd.
            unsafe { libc::dup2(null.as_raw_fd(), fd) };
        }
    }
    // SAFETY: fds[1] is the write end we own.
    let mut ready = unsafe { std::fs::File::from_raw_fd(fds[1]) };
    let log = mount_log(&args);
    let (tx, rx) = std::sync::mpsc::channel::<Result<MountEntry, String>>();
    // Tell the parent as soon as the mount serves (or failed); closing the pipe
    // without a word means the daemon died.
    let reporter = std::thread::spawn(move || {
        if let Ok(r) = rx.recv() {
            let _ = match r {
                Ok(ours) => ready.write_all(&Readiness::encode_serving(&ours)),
                Err(e) => ready.write_all(e.as_bytes()),
            };
        }
    });
    let threads = network_threads(args.network_threads);
    let code = run_tool(&log, Some(threads), || mount(args, Some(tx)));
    // An error is sent just before the mount returns: the process must not
    // exit (ending the reporter thread) before it reached the parent. The
    // sender is gone by now, so the thread ends either way.
    let _ = reporter.join();
    code
}

/// What the mount daemon told the waiting parent through the pipe.
#[derive(Debug, PartialEq)]
enum Readiness {
    /// `ok`, the mount verified live: which mount (its mountinfo id, device and
    /// mount point), for the parent to find it in mountinfo too.
    Serving(MountEntry),
    /// The error that stopped it.
    Failed(String),
    /// Nothing: it died first.
    Died,
}

impl Readiness {
    /// `ok NUL ID NUL MAJ:MIN NUL MOUNTPOINT` (a path holds no NUL).
    fn encode_serving(ours: &MountEntry) -> Vec<u8> {
        let mut m = format!("ok\0{}\0{}\0", ours.mount_id, ours.dev()).into_bytes();
        m.extend_from_slice(ours.mount_point.as_os_str().as_encoded_bytes());
        m
    }

    fn decode(msg: &[u8]) -> Readiness {
        use std::os::unix::ffi::OsStringExt;
        if msg.is_empty() {
            return Readiness::Died;
        }
        let Some(rest) = msg.strip_prefix(b"ok\0") else {
            return Readiness::Failed(String::from_utf8_lossy(msg).trim_end().to_string());
        };
        let mut parts = rest.splitn(3, |b| *b == 0);
        let (id, dev, path) = (parts.next(), parts.next(), parts.next());
        let parse = || {
            let id = std::str::from_utf8(id?).ok()?.parse().ok()?;
            let (major, minor) = std::str::from_utf8(dev?).ok()?.split_once(':')?;
            Some(MountEntry {
                mount_id: id,
                major: major.parse().ok()?,
                minor: minor.parse().ok()?,
                mount_point: std::ffi::OsString::from_vec(path?.to_vec()).into(),
                fstype: "fuse".into(),
            })
        };
        match parse() {
            Some(ours) => Readiness::Serving(ours),
            None => Readiness::Failed("the mount daemon sent a garbled readiness message".into()),
        }
    }
}

/// How long a daemon parent waits for a child that failed to end.
const REAP_BOUND: std::time::Duration = std::time::Duration::from_secs(5);

/// Waits, at most `within`, for the ending child `pid` and says how it ended
/// (`None`: still running, or not ours to wait for). Bounded, so that a child
/// slow to shut down never holds up the command's answer.
fn reap(pid: libc::pid_t, within: std::time::Duration) -> Option<String> {
    let deadline = std::time::Instant::now() + within;
    let mut status = 0;
    loop {
        // SAFETY: waitpid on our own child, which nothing else waits for.
        match unsafe { libc::waitpid(pid, &mut status, libc::WNOHANG) } {
            0 if std::time::Instant::now() < deadline => {
                std::thread::sleep(std::time::Duration::from_millis(5))
            }
            r if r == pid => break,
            _ => return None,
        }
    }
    Some(if libc::WIFSIGNALED(status) {
        format!("killed by signal {}", libc::WTERMSIG(status))
    } else {
        format!("exit status {}", libc::WEXITSTATUS(status))
    })
}

/// Reports readiness, the mount verified live (or the error that prevented
/// it), to a waiting parent.
type ReadyTx = std::sync::mpsc::Sender<Result<MountEntry, String>>;

async fn mount(args: MountArgs, ready: Option<ReadyTx>) -> Result<(), MountError> {
    let result = serve_mount(args, ready.clone()).await;
    if let (Err(e), Some(tx)) = (&result, ready) {
        let _ = tx.send(Err(e.to_string()));
    }
    result
}

async fn serve_mount(args: MountArgs, ready: Option<ReadyTx>) -> Result<(), MountError> {
    let m = Mount::start(&args.mount_config(), args.objects()).await?;
    let mp = m.mountpoint().to_path_buf();
    eprintln!("zonalfs: mounted gs://{} at {}", args.bucket, mp.display());
    if let Err(e) = zonalfs::fs::fuse::notify_ready() {
        tracing::warn!(error = %e, "could not notify systemd");
    }
    if let Some(tx) = ready {
        let _ = tx.send(Ok(m.entry().clone()));
    }
    if m.run_until(shutdown_signal()).await? == Ended::UnmountedOutside {
        eprintln!("zonalfs: {} was unmounted", mp.display());
    }
    eprintln!("zonalfs: unmounted {}", mp.display());
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
    if let Err(e) = init_logging(&LogSpec::plain(&args.log_level)) {
        return usage_failure(&e);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => return usage_failure(&format!("emulator: cannot start the runtime: {e}")),
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
        Err(e) => usage_failure(&format!("emulator: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::ffi::OsStrExt;

    fn entry(path: &[u8]) -> MountEntry {
        MountEntry {
            mount_id: 612,
            major: 0,
            minor: 75,
            mount_point: std::ffi::OsStr::from_bytes(path).into(),
            fstype: "fuse".into(),
        }
    }

    #[test]
    fn readiness_carries_any_mount_point() {
        for path in [
            &b"/mnt/with space"[..],
            b"/mnt/new\nline\\040 ",
            b"/mnt/donn\xc3\xa9es-\xff",
        ] {
            let ours = entry(path);
            match Readiness::decode(&Readiness::encode_serving(&ours)) {
                Readiness::Serving(got) => assert!(got.same_mount(&ours), "{got:?}"),
                other => panic!("{other:?}"),
            }
        }
    }

    #[test]
    fn readiness_errors_and_death() {
        assert_eq!(Readiness::decode(b""), Readiness::Died);
        assert_eq!(
            Readiness::decode(b"bucket \"x\" not found\n"),
            Readiness::Failed("bucket \"x\" not found".into())
        );
        for garbled in [&b"ok\0"[..], b"ok\x0012\x00", b"ok\0x\x000:1\0/m"] {
            assert!(
                matches!(Readiness::decode(garbled), Readiness::Failed(ref m) if m.contains("garbled")),
                "{garbled:?}"
            );
        }
    }

    #[test]
    fn errors_stay_on_one_line() {
        assert_eq!(
            one_line("mountpoint /a\nb: gone\n"),
            "mountpoint /a\\nb: gone"
        );
        assert_eq!(one_line("x\r\ny"), "x\\r\\ny");
        assert_eq!(one_line("données \t ok"), "données \t ok");
    }
}
