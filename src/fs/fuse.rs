//! The thin fuser 0.18 adapter: every callback hands its work to the tokio
//! runtime and replies from the task (loop threads never block on the network;
//! a read whose bytes are already loaded is answered on the loop thread),
//! translating [`Fs`] results to FUSE replies and [`FsError`]s to errnos.
//!
//! Also the FUSE side of the mount's life cycle, which `crate::mount` drives:
//! [`mount`] mounts with several loop threads and kernel tuning
//! (`max_background` raised, 1 MiB requests, readahead raised through
//! `/sys/class/bdi` once the mount is up), [`serve_fd`] serves a descriptor
//! mounted by someone else; [`Mounted`] unmounts (or detaches) when dropped,
//! so no path (error, panic, signal) leaves the mountpoint behind.

use std::collections::HashMap;
use std::ffi::OsStr;
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, UNIX_EPOCH};

use fuser::{
    Errno, FileAttr, FileHandle, FileType, Filesystem, FopenFlags, Generation, INodeNo,
    KernelConfig, LockOwner, OpenAccMode, OpenFlags, RenameFlags, ReplyAttr, ReplyCreate,
    ReplyData, ReplyDirectory, ReplyDirectoryPlus, ReplyEmpty, ReplyEntry, ReplyOpen, ReplyStatfs,
    ReplyWrite, ReplyXattr, Request, TimeOrNow, WriteFlags,
};

use super::mountinfo::{self, MountEntry};
use super::{Attr, Fs, FsError};
use crate::metrics::FuseStats;
use crate::sync::lock;

/// Operations slower than this are logged.
const SLOW_OP: Duration = Duration::from_secs(1);

/// How long the kernel may cache the attributes and entries of directories
/// and appendable objects: at most this, and no longer than
/// `--metadata-ttl` (0 there: the kernel asks every time, so a growing
/// object's new size is seen at once, as gcsfuse does). A finalized object's
/// generation never changes: the kernel caches it as long as this mount
/// trusts its metadata ([`Attr::fresh_until`]), so a loader reading a
/// listed directory for longer than this costs no lookup per file.
pub const KERNEL_TTL: Duration = Duration::from_secs(1);

/// The fuser filesystem over [`Fs`].
pub struct FuseFs {
    fs: Arc<Fs>,
    rt: tokio::runtime::Handle,
    direct_io: bool,
    stats: Arc<FuseStats>,
    /// What the kernel may cache attributes and entries of directories and
    /// appendable objects for (see [`FuseFs::ttl_of`]).
    ttl: Duration,
    /// Asynchronous requests the kernel may have in flight.
    pub max_background: u16,
    /// Ask the kernel for FUSE passthrough (small files served from memory
    /// files by the kernel itself): `--passthrough`.
    pub passthrough: bool,
    /// The backing files registered for passthrough opens, by file handle,
    /// released with the handle.
    backings: Arc<Mutex<HashMap<u64, fuser::BackingId>>>,
}

impl FuseFs {
    pub fn new(
        fs: Arc<Fs>,
        rt: tokio::runtime::Handle,
        direct_io: bool,
        stats: Arc<FuseStats>,
    ) -> FuseFs {
        let ttl = KERNEL_TTL.min(fs.config().metadata_ttl);
        FuseFs {
            ttl,
            fs,
            rt,
            direct_io,
            stats,
            max_background: 64,
            passthrough: false,
            backings: Arc::new(Mutex::new(HashMap::new())),
        }
    }

    /// How long the kernel may cache `a`: a finalized object's until this
    /// mount's metadata of it expires, anything else [`KERNEL_TTL`] at most.
    fn ttl_of(ttl: Duration, a: &Attr) -> Duration {
        match a.fresh_until {
            Some(until) => until.saturating_duration_since(Instant::now()),
            None => ttl,
        }
    }

    /// An open directory's entries from `offset` (readdir and readdirplus).
    fn entries(
        &self,
        req: &Request,
        fh: FileHandle,
        offset: u64,
    ) -> Result<Vec<(u64, super::DirEntry)>, FsError> {
        let t = Instant::now();
        let r = self.fs.readdir(fh.0, offset);
        Self::done(&self.stats, "readdir", req.unique().0, t, r.as_ref().err());
        r
    }

    /// Runs `work` right here on the loop thread when it finishes without
    /// waiting (a read whose bytes are already in a loaded block: the common
    /// case of a sequential reader behind its prefetch; a lookup, getattr or
    /// open answered from the inode table), else hands it, as far as it got,
    /// to the runtime. Saves a task and a cross-thread wake-up per
    /// request; a read that must wait for the network never blocks the loop.
    fn now_or_spawn(&self, work: impl std::future::Future<Output = ()> + Send + 'static) {
        let _runtime = self.rt.enter();
        let mut work = Box::pin(work);
        let mut cx = std::task::Context::from_waker(std::task::Waker::noop());
        if work.as_mut().poll(&mut cx).is_pending() {
            // Polled again by the runtime, which registers its own waker.
            self.rt.spawn(work);
        }
    }

    /// fsync (`close`: false) and the flush at each close(2) (`close`:
    /// true): what a write handle wrote is persisted. A read handle has
    /// nothing to persist and is answered on the loop thread.
    fn persist(
        &self,
        op: &'static str,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        close: bool,
        reply: ReplyEmpty,
    ) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let id = req.unique().0;
        self.now_or_spawn(traced(op, id, ino.0, async move {
            let r = fs.flush(fh.0, close).await;
            Self::done(&stats, op, id, t, r.as_ref().err());
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    /// unlink, rmdir and rename: a name in a directory, an empty reply.
    fn namespace_op<F>(
        &self,
        req: &Request,
        op: &'static str,
        parent: INodeNo,
        name: &OsStr,
        reply: ReplyEmpty,
        work: F,
    ) where
        F: FnOnce(
                Arc<Fs>,
                u64,
                String,
            ) -> std::pin::Pin<
                Box<dyn std::future::Future<Output = Result<(), FsError>> + Send>,
            > + Send
            + 'static,
    {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let id = req.unique().0;
        self.rt.spawn(traced(op, id, parent.0, async move {
            let r = work(fs, parent.0, name).await;
            Self::done(&stats, op, id, t, r.as_ref().err());
            match r {
                Ok(()) => reply.ok(),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    /// Records one operation's outcome and latency; failed operations (other
    /// than a plain ENOENT) and slow ones are logged with the kernel's request
    /// id, so a user's report can be matched to the log.
    fn done(stats: &FuseStats, op: &str, req: u64, start: Instant, err: Option<&FsError>) {
        let took = start.elapsed();
        if let Some(s) = stats.op(op) {
            s.record(took, err.is_none());
        }
        match err {
            Some(FsError::NotFound) | None => {}
            Some(e) => tracing::warn!(req, op, error = %e, "operation failed"),
        }
        if took >= SLOW_OP {
            tracing::info!(req, op, ms = took.as_millis() as u64, "slow operation");
        }
    }
}

/// A request's work in a span that names it: the operation, the kernel's
/// request id and the inode, on every line logged inside it (down to the
/// read engine and the client), so nested logs can be followed
/// (`--log-level debug`; at the default level the span costs nothing).
fn traced<F: std::future::Future>(
    op: &'static str,
    req: u64,
    ino: u64,
    work: F,
) -> tracing::instrument::Instrumented<F> {
    use tracing::Instrument;
    work.instrument(tracing::debug_span!("fuse", op, req, ino))
}

fn errno(e: &FsError) -> Errno {
    Errno::from_i32(e.errno())
}

fn file_attr(a: &Attr) -> FileAttr {
    FileAttr {
        ino: INodeNo(a.ino),
        size: a.size,
        blocks: a.size.div_ceil(512),
        atime: a.mtime,
        mtime: a.mtime,
        ctime: a.ctime,
        crtime: UNIX_EPOCH,
        kind: if a.is_dir {
            FileType::Directory
        } else {
            FileType::RegularFile
        },
        perm: a.mode,
        nlink: a.nlink,
        uid: a.uid,
        gid: a.gid,
        rdev: 0,
        blksize: 4096,
        flags: 0,
    }
}

impl Filesystem for FuseFs {
    fn init(&mut self, _req: &Request, config: &mut KernelConfig) -> io::Result<()> {
        // Let one sequential reader keep many requests in flight, of 1 MiB each.
        let _ = config.set_max_background(self.max_background);
        let _ = config.set_max_readahead(1 << 20);
        // `ls -l` and friends get names and attributes in one round trip.
        let _ = config.add_capabilities(
            fuser::InitFlags::FUSE_DO_READDIRPLUS | fuser::InitFlags::FUSE_READDIRPLUS_AUTO,
        );
        // O_TRUNC comes with the open (a new generation in one step) instead
        // of a separate truncation first.
        let _ = config.add_capabilities(fuser::InitFlags::FUSE_ATOMIC_O_TRUNC);
        // Small finalized files are served by the kernel from memory files
        // (FUSE passthrough) where the kernel offers it (6.9 and later, with
        // CAP_SYS_ADMIN); with direct I/O every read must come to us.
        if self.passthrough && !self.direct_io {
            let offered = config.set_max_stack_depth(1).is_ok()
                && config
                    .add_capabilities(fuser::InitFlags::FUSE_PASSTHROUGH)
                    .is_ok();
            if offered {
                tracing::info!("FUSE passthrough on: small files are read by the kernel");
            } else {
                let _ = config.set_max_stack_depth(0);
                tracing::info!(
                    "FUSE passthrough not offered by this kernel: every read comes to the daemon"
                );
            }
            self.fs.set_passthrough(offered);
        }
        Ok(())
    }

    fn lookup(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEntry) {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::ENOENT);
        };
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let ttl = self.ttl;
        let id = req.unique().0;
        self.now_or_spawn(traced("lookup", id, parent.0, async move {
            let r = fs.lookup(parent.0, &name).await;
            Self::done(&stats, "lookup", id, t, r.as_ref().err());
            match r {
                Ok(a) => reply.entry(&Self::ttl_of(ttl, &a), &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn forget(&self, _req: &Request, ino: INodeNo, nlookup: u64) {
        self.fs.forget(ino.0, nlookup);
    }

    fn getattr(&self, req: &Request, ino: INodeNo, _fh: Option<FileHandle>, reply: ReplyAttr) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let ttl = self.ttl;
        let id = req.unique().0;
        self.now_or_spawn(traced("getattr", id, ino.0, async move {
            let r = fs.getattr(ino.0).await;
            Self::done(&stats, "getattr", id, t, r.as_ref().err());
            match r {
                Ok(a) => reply.attr(&Self::ttl_of(ttl, &a), &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn open(&self, req: &Request, ino: INodeNo, flags: OpenFlags, reply: ReplyOpen) {
        let write = !matches!(flags.acc_mode(), OpenAccMode::O_RDONLY)
            || flags.0 & (libc::O_TRUNC | libc::O_APPEND | libc::O_CREAT) != 0;
        let truncate = flags.0 & libc::O_TRUNC != 0;
        let (fs, direct) = (self.fs.clone(), self.direct_io);
        let (stats, t) = (self.stats.clone(), Instant::now());
        let id = req.unique().0;
        let backings = self.backings.clone();
        self.now_or_spawn(traced("open", id, ino.0, async move {
            let r = fs.open_file(ino.0, write, truncate).await;
            Self::done(&stats, "open", id, t, r.as_ref().err());
            let opened = match r {
                Ok(o) => o,
                Err(e) => return reply.error(errno(&e)),
            };
            stats.handle_opened(false);
            let fh = FileHandle(opened.fh);
            if let Some(file) = opened.passthrough.as_ref().and_then(|s| s.block.memfile()) {
                match reply.open_backing(file) {
                    Ok(id) => {
                        // No FOPEN_KEEP_CACHE: the kernel refuses it with
                        // passthrough (it reads the memory file's own cache).
                        reply.opened_passthrough(fh, FopenFlags::FOPEN_NOFLUSH, &id);
                        lock(&backings).insert(opened.fh, id);
                        stats.passthrough_opens.fetch_add(1, Ordering::Relaxed);
                        return;
                    }
                    Err(e) => {
                        tracing::warn!(error = %e, "FUSE passthrough refused a backing file; turning it off (every read comes to the daemon)");
                        fs.set_passthrough(false);
                    }
                }
            }
            // Keep the page cache across opens: the handle pins a generation,
            // and a new generation of the object gets an inode of its own.
            // An open for writing keeps none (its inode may stand for a new
            // generation from now on). A read handle has nothing to persist,
            // so its close(2) sends no FLUSH (FOPEN_NOFLUSH): one request,
            // and the reader's wait for it, fewer per file.
            let cache = if direct {
                FopenFlags::FOPEN_DIRECT_IO
            } else if write {
                FopenFlags::empty()
            } else {
                FopenFlags::FOPEN_KEEP_CACHE
            };
            let flush = if write {
                FopenFlags::empty()
            } else {
                FopenFlags::FOPEN_NOFLUSH
            };
            reply.opened(fh, cache | flush)
        }));
    }

    fn read(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        size: u32,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyData,
    ) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let id = req.unique().0;
        self.now_or_spawn(traced("read", id, ino.0, async move {
            let r = fs.read(fh.0, offset, size).await;
            Self::done(&stats, "read", id, t, r.as_ref().err());
            match r {
                Ok(data) => reply.data(data.as_slice()),
                Err(e) => {
                    tracing::debug!(error = %e, "read failed");
                    reply.error(errno(&e))
                }
            }
        }));
    }

    fn release(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        _flush: bool,
        reply: ReplyEmpty,
    ) {
        if let Some(w) = self.fs.release(fh.0) {
            // The upload ends off the loop thread (what was written was
            // persisted by the flush at close).
            let fs = self.fs.clone();
            self.rt.spawn(async move { fs.finish_write(w).await });
        }
        lock(&self.backings).remove(&fh.0);
        self.stats.handle_released(false);
        reply.ok();
    }

    fn create(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        flags: i32,
        reply: ReplyCreate,
    ) {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::EINVAL);
        };
        let exclusive = flags & libc::O_EXCL != 0;
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let ttl = self.ttl;
        let id = req.unique().0;
        self.rt.spawn(traced("create", id, parent.0, async move {
            let r = fs.create(parent.0, &name, exclusive).await;
            Self::done(&stats, "create", id, t, r.as_ref().err());
            match r {
                Ok((a, fh)) => {
                    stats.handle_opened(false);
                    reply.created(
                        &Self::ttl_of(ttl, &a),
                        &file_attr(&a),
                        Generation(0),
                        FileHandle(fh),
                        FopenFlags::empty(),
                    )
                }
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn write(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        data: &[u8],
        _write_flags: WriteFlags,
        _flags: OpenFlags,
        _lock_owner: Option<LockOwner>,
        reply: ReplyWrite,
    ) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let id = req.unique().0;
        // Most writes are copied straight into the handle's piece, here.
        match fs.write_now(fh.0, offset, data) {
            Some(Ok(n)) => {
                Self::done(&stats, "write", id, t, None);
                return reply.written(n);
            }
            Some(Err(e)) => {
                Self::done(&stats, "write", id, t, Some(&e));
                return reply.error(errno(&e));
            }
            None => {}
        }
        // Otherwise (a write that fills a piece, or a handle busy flushing)
        // the bytes must outlive the loop's request buffer: copied once more.
        let data = bytes::Bytes::copy_from_slice(data);
        self.now_or_spawn(traced("write", id, ino.0, async move {
            let r = fs.write(fh.0, offset, &data).await;
            Self::done(&stats, "write", id, t, r.as_ref().err());
            match r {
                Ok(n) => reply.written(n),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn fsync(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _datasync: bool,
        reply: ReplyEmpty,
    ) {
        self.persist("fsync", req, ino, fh, false, reply);
    }

    fn setattr(
        &self,
        req: &Request,
        ino: INodeNo,
        _mode: Option<u32>,
        _uid: Option<u32>,
        _gid: Option<u32>,
        size: Option<u64>,
        _atime: Option<TimeOrNow>,
        _mtime: Option<TimeOrNow>,
        _ctime: Option<std::time::SystemTime>,
        fh: Option<FileHandle>,
        _crtime: Option<std::time::SystemTime>,
        _chgtime: Option<std::time::SystemTime>,
        _bkuptime: Option<std::time::SystemTime>,
        _flags: Option<fuser::BsdFileFlags>,
        reply: ReplyAttr,
    ) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let ttl = self.ttl;
        let id = req.unique().0;
        self.rt.spawn(traced("setattr", id, ino.0, async move {
            let r = fs.setattr(ino.0, size, fh.map(|f| f.0)).await;
            Self::done(&stats, "setattr", id, t, r.as_ref().err());
            match r {
                Ok(a) => reply.attr(&Self::ttl_of(ttl, &a), &file_attr(&a)),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn mkdir(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        _mode: u32,
        _umask: u32,
        reply: ReplyEntry,
    ) {
        let Some(name) = name.to_str().map(str::to_string) else {
            return reply.error(Errno::EINVAL);
        };
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let ttl = self.ttl;
        let id = req.unique().0;
        self.rt.spawn(traced("mkdir", id, parent.0, async move {
            let r = fs.mkdir(parent.0, &name).await;
            Self::done(&stats, "mkdir", id, t, r.as_ref().err());
            match r {
                Ok(a) => reply.entry(&Self::ttl_of(ttl, &a), &file_attr(&a), Generation(0)),
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn unlink(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.namespace_op(req, "unlink", parent, name, reply, |fs, parent, name| {
            Box::pin(async move { fs.unlink(parent, &name).await })
        });
    }

    fn rmdir(&self, req: &Request, parent: INodeNo, name: &OsStr, reply: ReplyEmpty) {
        self.namespace_op(req, "rmdir", parent, name, reply, |fs, parent, name| {
            Box::pin(async move { fs.rmdir(parent, &name).await })
        });
    }

    fn rename(
        &self,
        req: &Request,
        parent: INodeNo,
        name: &OsStr,
        newparent: INodeNo,
        newname: &OsStr,
        flags: RenameFlags,
        reply: ReplyEmpty,
    ) {
        if flags.contains(RenameFlags::RENAME_EXCHANGE)
            || flags.contains(RenameFlags::RENAME_WHITEOUT)
        {
            return reply.error(Errno::from_i32(libc::EINVAL));
        }
        let Some(newname) = newname.to_str().map(str::to_string) else {
            return reply.error(Errno::EINVAL);
        };
        let noreplace = flags.contains(RenameFlags::RENAME_NOREPLACE);
        self.namespace_op(
            req,
            "rename",
            parent,
            name,
            reply,
            move |fs, parent, name| {
                Box::pin(async move {
                    fs.rename(parent, &name, newparent.0, &newname, noreplace)
                        .await
                })
            },
        );
    }

    fn opendir(&self, req: &Request, ino: INodeNo, _flags: OpenFlags, reply: ReplyOpen) {
        let (fs, stats, t) = (self.fs.clone(), self.stats.clone(), Instant::now());
        let id = req.unique().0;
        self.rt.spawn(traced("opendir", id, ino.0, async move {
            let r = fs.opendir(ino.0).await;
            Self::done(&stats, "opendir", id, t, r.as_ref().err());
            match r {
                Ok(fh) => {
                    stats.handle_opened(true);
                    reply.opened(FileHandle(fh), FopenFlags::empty())
                }
                Err(e) => reply.error(errno(&e)),
            }
        }));
    }

    fn readdir(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectory,
    ) {
        match self.entries(req, fh, offset) {
            Ok(entries) => {
                for (next, e) in entries {
                    let kind = if e.is_dir {
                        FileType::Directory
                    } else {
                        FileType::RegularFile
                    };
                    if reply.add(INodeNo(e.ino), next, kind, &e.name) {
                        break;
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn readdirplus(
        &self,
        req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        offset: u64,
        mut reply: ReplyDirectoryPlus,
    ) {
        match self.entries(req, fh, offset) {
            Ok(entries) => {
                for (next, e) in entries {
                    let Some(attr) = self.fs.cached_attr(e.ino) else {
                        continue;
                    };
                    if reply.add(
                        INodeNo(e.ino),
                        next,
                        &e.name,
                        &Self::ttl_of(self.ttl, &attr),
                        &file_attr(&attr),
                        Generation(0),
                    ) {
                        break;
                    }
                    // The kernel holds a lookup on every entry but . and ..
                    if e.name != "." && e.name != ".." {
                        self.fs.add_lookup(e.ino);
                    }
                }
                reply.ok();
            }
            Err(e) => reply.error(errno(&e)),
        }
    }

    fn releasedir(
        &self,
        _req: &Request,
        _ino: INodeNo,
        fh: FileHandle,
        _flags: OpenFlags,
        reply: ReplyEmpty,
    ) {
        self.fs.releasedir(fh.0);
        self.stats.handle_released(true);
        reply.ok();
    }

    fn flush(
        &self,
        req: &Request,
        ino: INodeNo,
        fh: FileHandle,
        _lock_owner: LockOwner,
        reply: ReplyEmpty,
    ) {
        // Each close(2): what a write handle wrote is persisted.
        self.persist("flush", req, ino, fh, true, reply);
    }

    fn getxattr(
        &self,
        _req: &Request,
        _ino: INodeNo,
        _name: &OsStr,
        _size: u32,
        reply: ReplyXattr,
    ) {
        reply.error(Errno::NO_XATTR);
    }

    fn listxattr(&self, _req: &Request, _ino: INodeNo, size: u32, reply: ReplyXattr) {
        if size == 0 {
            reply.size(0);
        } else {
            reply.data(&[]);
        }
    }

    fn statfs(&self, req: &Request, _ino: INodeNo, reply: ReplyStatfs) {
        // A bucket has no fixed capacity: report a large, empty, read-only one.
        Self::done(&self.stats, "statfs", req.unique().0, Instant::now(), None);
        reply.statfs(1 << 40, 0, 0, 1 << 20, 0, 4096, 255, 4096);
    }
}

/// A live mount: unmounted (and its session joined) when dropped.
pub struct Mounted {
    session: Option<fuser::BackgroundSession>,
    pub mountpoint: PathBuf,
    /// Served on a descriptor someone else mounted ([`serve_fd`]): the
    /// session does not own the mount, so unmounting detaches it by path.
    by_fd: bool,
}

impl Mounted {
    /// Unmounts now and waits for the session to end; a busy mount is
    /// detached lazily.
    pub fn unmount(mut self) -> io::Result<()> {
        if self.by_fd {
            // Detached, the mount ends once nothing uses it; the kernel
            // then ends the session.
            lazy_unmount(&self.mountpoint);
        }
        match self.session.take() {
            Some(s) => s.umount_and_join().or_else(|e| {
                tracing::warn!(error = %e, "unmount failed; detaching lazily");
                lazy_unmount(&self.mountpoint);
                Ok(())
            }),
            None => Ok(()),
        }
    }
}

/// Is `path` (absolute, symlinks resolved) a mount point right now?
pub fn is_mounted(path: &Path) -> bool {
    mountinfo::is_mounted(path)
}

/// The statfs type of every FUSE filesystem.
const FUSE_SUPER_MAGIC: i64 = 0x6573_5546;

/// Checks that the FUSE mount just made at `mountpoint` (absolute, symlinks
/// resolved) is live: listed in mountinfo as the topmost mount there, of a
/// FUSE type, and answering a request through that path (a
/// statfs, which the kernel holds until the session has answered `init`).
/// Returns its mountinfo entry. Blocks: call it off the FUSE loop threads and
/// off the runtime's workers.
pub fn verify_serving(mountpoint: &Path) -> io::Result<MountEntry> {
    let mounts = mountinfo::read().map_err(|e| {
        io::Error::new(
            e.kind(),
            format!("cannot read {}: {e}", mountinfo::MOUNTINFO),
        )
    })?;
    let entry = mountinfo::find_in(&mounts, mountpoint).ok_or_else(|| {
        io::Error::new(
            io::ErrorKind::NotFound,
            format!("not in {}", mountinfo::MOUNTINFO),
        )
    })?;
    // `fuse` when mounted directly, `fuse.zonalfs` through fusermount.
    if entry.fstype != "fuse" && !entry.fstype.starts_with("fuse.") {
        return Err(io::Error::other(format!(
            "{} lists a {} mount on top of it",
            mountinfo::MOUNTINFO,
            entry.fstype
        )));
    }
    let c = std::ffi::CString::new(mountpoint.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    let f_type =
        statfs_apart(&c).map_err(|e| io::Error::new(e.kind(), format!("does not answer: {e}")))?;
    if f_type != FUSE_SUPER_MAGIC {
        return Err(io::Error::other(format!(
            "statfs reports a filesystem of type {f_type:#x}, not FUSE"
        )));
    }
    Ok(entry)
}

/// The statfs type of `path`, asked by a child process. The daemon never
/// waits on its own mount in its own process: killed while such a request is
/// with its FUSE threads, one of its threads would wait, unkillable, for an
/// answer only the dead threads could give, so the process could never exit
/// and close `/dev/fuse` (a test that SIGKILLs a daemon just after its mount
/// caught this). The child keeps no descriptor of the daemon's, so a child
/// stuck so is freed when the daemon dies.
fn statfs_apart(path: &std::ffi::CStr) -> io::Result<i64> {
    let mut fds = [0i32; 2];
    // SAFETY: pipe2 writes two descriptors into the array we own.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    let (rd, wr) = (fds[0], fds[1]);
    // SAFETY: the child only calls async-signal-safe functions (statfs,
    // write, _exit) on memory prepared before the fork, then exits.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        // SAFETY: close_range closes the child's copies of every descriptor
        // but the pipe's write end (above all, `/dev/fuse`: held here, it
        // would keep the connection alive after the daemon dies, and this
        // child waiting on it); an all-zero statfs is a valid value of this
        // plain C struct; statfs gets a valid NUL-terminated path; write
        // sends the eight bytes of a local; _exit ends the child without
        // unwinding.
        unsafe {
            libc::syscall(
                libc::SYS_close_range,
                3u32,
                (wr as u32).saturating_sub(1),
                0u32,
            );
            libc::syscall(libc::SYS_close_range, wr as u32 + 1, u32::MAX, 0u32);
            let mut st: libc::statfs = std::mem::zeroed();
            #[allow(clippy::unnecessary_cast)] // f_type's width differs between targets.
            let answer: i64 = if libc::statfs(path.as_ptr(), &mut st) == 0 {
                st.f_type as i64
            } else {
                -i64::from(*libc::__errno_location())
            };
            libc::write(wr, (&answer as *const i64).cast(), 8);
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end, a descriptor we own.
    unsafe { libc::close(wr) };
    if pid < 0 {
        let e = io::Error::last_os_error();
        // SAFETY: closing the read end, a descriptor we own.
        unsafe { libc::close(rd) };
        return Err(e);
    }
    let mut answer = [0u8; 8];
    let mut got = 0;
    while got < 8 {
        // SAFETY: read into the rest of our 8-byte buffer.
        let n = unsafe { libc::read(rd, answer[got..].as_mut_ptr().cast(), 8 - got) };
        if n <= 0 {
            if n < 0 && io::Error::last_os_error().kind() == io::ErrorKind::Interrupted {
                continue;
            }
            break;
        }
        got += n as usize;
    }
    // SAFETY: closing the read end and reaping our own child.
    unsafe {
        libc::close(rd);
        libc::waitpid(pid, std::ptr::null_mut(), 0);
    }
    if got < 8 {
        return Err(io::Error::other("the statfs helper process gave no answer"));
    }
    match i64::from_ne_bytes(answer) {
        v if v < 0 => Err(io::Error::from_raw_os_error(-v as i32)),
        v => Ok(v),
    }
}

/// Resolves once the mount `ours` is gone from mountinfo (someone ran
/// `umount`). An unreadable mountinfo does not count as gone.
pub async fn unmounted(ours: &MountEntry) {
    loop {
        match mountinfo::read() {
            Ok(m) if !m.iter().any(|e| e.same_mount(ours)) => return,
            Ok(_) => {}
            Err(e) => tracing::warn!(error = %e, "cannot read {}", mountinfo::MOUNTINFO),
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// `zonalfs unmount`: unmounts `path`, detaching it lazily if it is busy.
pub fn unmount_path(path: &Path) -> io::Result<()> {
    let c = std::ffi::CString::new(path.as_os_str().as_encoded_bytes())
        .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
    // SAFETY: umount2 with a valid NUL-terminated path.
    if unsafe { libc::umount2(c.as_ptr(), 0) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EBUSY) {
        // SAFETY: as above.
        if unsafe { libc::umount2(c.as_ptr(), libc::MNT_DETACH) } == 0 {
            return Ok(());
        }
        return Err(io::Error::last_os_error());
    }
    Err(e)
}

/// Tells systemd (Type=notify) the mount is serving: `READY=1` to
/// `$NOTIFY_SOCKET`, if set (a path, or `@name` for an abstract socket).
pub fn notify_ready() -> io::Result<bool> {
    let Some(sock) = std::env::var_os("NOTIFY_SOCKET") else {
        return Ok(false);
    };
    let s = std::os::unix::net::UnixDatagram::unbound()?;
    let bytes = sock.as_encoded_bytes();
    if let Some(name) = bytes.strip_prefix(b"@") {
        use std::os::linux::net::SocketAddrExt;
        let addr = std::os::unix::net::SocketAddr::from_abstract_name(name)?;
        s.send_to_addr(b"READY=1", &addr)?;
    } else {
        s.send_to(b"READY=1", sock)?;
    }
    Ok(true)
}

impl Drop for Mounted {
    fn drop(&mut self) {
        if let Some(s) = self.session.take() {
            if self.by_fd {
                // The session does not own this mount: detached, it ends
                // once nothing uses it, and the session with it.
                lazy_unmount(&self.mountpoint);
            }
            if let Err(e) = s.umount_and_join() {
                tracing::warn!(mountpoint = %self.mountpoint.display(), error = %e, "unmount failed");
                // Last resort so that nothing is left mounted.
                lazy_unmount(&self.mountpoint);
            }
        }
    }
}

/// Detaches a mount even while it is busy (`umount -l`).
pub fn lazy_unmount(path: &Path) {
    if let Ok(c) = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()) {
        // SAFETY: umount2 with a valid NUL-terminated path; failure is harmless.
        unsafe {
            libc::umount2(c.as_ptr(), libc::MNT_DETACH);
        }
    }
}

/// Mount options for a zonalfs mount of `bucket` (`read_only`: `ro`).
pub fn config(bucket: &str, allow_other: bool, threads: usize, read_only: bool) -> fuser::Config {
    let mut c = fuser::Config::default();
    c.mount_options = vec![
        if read_only {
            fuser::MountOption::RO
        } else {
            fuser::MountOption::RW
        },
        fuser::MountOption::FSName(format!("zonalfs:{bucket}")),
        fuser::MountOption::Subtype("zonalfs".into()),
        fuser::MountOption::DefaultPermissions,
        fuser::MountOption::NoDev,
        fuser::MountOption::NoSuid,
    ];
    if allow_other {
        c.acl = fuser::SessionACL::All;
    }
    c.n_threads = Some(threads.max(1));
    c
}

/// Mounts `fs` at `mountpoint` with loop threads of its own.
pub fn mount(fs: FuseFs, mountpoint: &Path, cfg: &fuser::Config) -> io::Result<Mounted> {
    let session = fuser::spawn_mount(fs, mountpoint, cfg)?;
    Ok(Mounted {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        by_fd: false,
    })
}

/// Serves `fs` on `fd`, a `/dev/fuse` descriptor already mounted at
/// `mountpoint` (by a CSI node plugin, say), with loop threads of its own.
/// Blocks until the kernel's INIT request is answered.
pub fn serve_fd(
    fs: FuseFs,
    fd: std::os::fd::OwnedFd,
    mountpoint: &Path,
    cfg: fuser::Config,
) -> io::Result<Mounted> {
    let acl = cfg.acl;
    let session = fuser::Session::from_fd(fs, fd, acl, cfg)?.spawn()?;
    Ok(Mounted {
        session: Some(session),
        mountpoint: mountpoint.to_path_buf(),
        by_fd: true,
    })
}

/// Raises the kernel readahead of the mount `ours` (in KiB), through
/// `/sys/class/bdi/MAJ:MIN/read_ahead_kb` (it cannot be raised in `init`).
pub fn set_read_ahead_kb(ours: &MountEntry, kb: u32) -> io::Result<()> {
    std::fs::write(
        format!("/sys/class/bdi/{}/read_ahead_kb", ours.dev()),
        kb.to_string(),
    )
}

#[cfg(test)]
mod tests {
    use super::traced;
    use std::sync::{Arc, Mutex};

    /// Collects what a subscriber writes.
    #[derive(Clone, Default)]
    struct Lines(Arc<Mutex<Vec<u8>>>);

    impl std::io::Write for Lines {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            crate::sync::lock(&self.0).extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    /// A line logged inside a request's work (however deep) names the
    /// operation, the kernel's request id and the inode.
    #[test]
    fn logs_inside_a_request_name_it() {
        let out = Lines::default();
        let w = out.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::DEBUG)
            .with_ansi(false)
            .with_writer(move || w.clone())
            .finish();
        tracing::subscriber::with_default(subscriber, || {
            futures::executor::block_on(traced("read", 7, 42, async {
                tracing::warn!("deep inside");
            }));
            tracing::warn!("outside");
        });
        let text = String::from_utf8_lossy(&crate::sync::lock(&out.0)).to_string();
        let inside = text
            .lines()
            .find(|l| l.contains("deep inside"))
            .unwrap_or_default();
        for want in ["fuse{", "op=\"read\"", "req=7", "ino=42"] {
            assert!(inside.contains(want), "{want} not in {inside:?}");
        }
        let outside = text
            .lines()
            .find(|l| l.contains("outside"))
            .unwrap_or_default();
        assert!(!outside.contains("req=7"), "{outside:?}");
    }
}
