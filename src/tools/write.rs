//! The tools that change a bucket, named as `gcloud storage` names them:
//! `cp` (upload as an appendable object, finalized unless `--no-finalize`; or
//! download), `append` (to an unfinalized object by takeover, from a file or
//! standard input), `rm` and `mv`.
//!
//! An upload reads its source in pieces of [`PIECE`] bytes and hands each to an
//! [`AppendableWriter`], which streams it in 2 MiB chunks with their CRC32C and
//! flushes every `flush_every` bytes. From standard input the writer also
//! flushes whenever the input goes quiet for [`IDLE_FLUSH`] (so
//! `tail -f log | zonalfs append - gs://b/log` persists lines as they come).
//! On a terminal, [`Progress`] shows bytes, rate and time left on stderr, as
//! `gcloud storage cp` does; elsewhere it stays silent.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt};

use super::{cat, CatOptions};
use crate::gcs::write::{AppendableWriter, WriteOptions};
use crate::gcs::{GcsClient, GcsError, MrdPool, ObjectInfo};

/// Bytes read from the source at a time.
pub const PIECE: usize = 8 << 20;

/// Standard input quiet this long: persist what came.
pub const IDLE_FLUSH: Duration = Duration::from_millis(200);

/// Progress of one copy on stderr, redrawn at most every 200 ms, only when
/// stderr is a terminal.
#[derive(Debug)]
pub struct Progress {
    enabled: bool,
    label: String,
    total: Option<u64>,
    done: u64,
    started: Instant,
    drawn: Option<Instant>,
}

/// `1.5 MiB`-style sizes.
fn human(n: f64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = n;
    let mut u = 0;
    while v >= 1024.0 && u + 1 < UNITS.len() {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{v:.0} {}", UNITS[u])
    } else {
        format!("{v:.1} {}", UNITS[u])
    }
}

fn clock(secs: f64) -> String {
    let s = secs.max(0.0).round() as u64;
    format!("{}:{:02}:{:02}", s / 3600, (s / 60) % 60, s % 60)
}

impl Progress {
    /// Progress of copying `label`, `total` bytes if known.
    pub fn new(label: &str, total: Option<u64>) -> Progress {
        Progress {
            enabled: std::io::stderr().is_terminal(),
            label: label.to_string(),
            total,
            done: 0,
            started: Instant::now(),
            drawn: None,
        }
    }

    /// The progress line after `elapsed`: bytes, rate and time left.
    pub fn line(&self, elapsed: Duration) -> String {
        let secs = elapsed.as_secs_f64().max(1e-3);
        let rate = self.done as f64 / secs;
        let mut line = format!("{}: {}", self.label, human(self.done as f64));
        if let Some(total) = self.total {
            line.push_str(&format!(" / {}", human(total as f64)));
        }
        line.push_str(&format!(" at {}/s", human(rate)));
        if let Some(total) = self.total {
            if rate > 0.0 {
                let left = total.saturating_sub(self.done) as f64 / rate;
                line.push_str(&format!(", {} left", clock(left)));
            }
        }
        line
    }

    pub fn advance(&mut self, n: u64) {
        self.done += n;
        if self.enabled
            && self
                .drawn
                .is_none_or(|t| t.elapsed() >= Duration::from_millis(200))
        {
            eprint!("\r\x1b[2K{}", self.line(self.started.elapsed()));
            self.drawn = Some(Instant::now());
        }
    }

    pub fn finish(&mut self) {
        if self.enabled {
            eprintln!("\r\x1b[2K{}", self.line(self.started.elapsed()));
        }
    }
}

/// How an upload ends and what it may replace.
#[derive(Debug, Clone)]
pub struct UploadOptions {
    /// Finalize the object at the end (else it stays appendable).
    pub finalize: bool,
    /// Refuse to replace an existing object (`cp -n`).
    pub no_clobber: bool,
    pub write: WriteOptions,
}

/// What an upload or append left behind.
#[derive(Debug, Clone)]
pub struct Uploaded {
    pub object: String,
    pub generation: i64,
    pub size: u64,
    pub finalized: bool,
}

fn local(what: &Path, e: std::io::Error) -> GcsError {
    GcsError::Other(format!("{}: {e}", what.display()))
}

/// Where an upload's bytes come from.
pub enum Source {
    /// A local file of `size` bytes (at open), read with `pread` straight into
    /// the buffers that go on the wire.
    File {
        file: std::sync::Arc<std::fs::File>,
        path: PathBuf,
        size: u64,
        offset: u64,
    },
    /// A stream (standard input), taken as it comes.
    Stream {
        reader: Box<dyn AsyncRead + Unpin + Send>,
        name: PathBuf,
    },
}

impl Source {
    /// A local file, opened; refuses directories.
    pub fn file(path: &Path) -> Result<Source, GcsError> {
        let file = std::fs::File::open(path).map_err(|e| local(path, e))?;
        let md = file.metadata().map_err(|e| local(path, e))?;
        if md.is_dir() {
            return Err(GcsError::InvalidArgument(format!(
                "{}: is a directory",
                path.display()
            )));
        }
        Ok(Source::File {
            file: std::sync::Arc::new(file),
            path: path.to_path_buf(),
            size: md.len(),
            offset: 0,
        })
    }

    /// A stream, e.g. standard input.
    pub fn stream(reader: impl AsyncRead + Unpin + Send + 'static, name: &str) -> Source {
        Source::Stream {
            reader: Box::new(reader),
            name: PathBuf::from(name),
        }
    }

    /// The size, when known up front.
    pub fn size(&self) -> Option<u64> {
        match self {
            Source::File { size, .. } => Some(*size),
            Source::Stream { .. } => None,
        }
    }

    fn name(&self) -> &Path {
        match self {
            Source::File { path, .. } => path,
            Source::Stream { name, .. } => name,
        }
    }
}

/// Copies the source into the writer until its end; with `idle_flush`,
/// persists whenever a stream source goes quiet that long.
async fn pump(
    src: &mut Source,
    w: &mut AppendableWriter,
    idle_flush: Option<Duration>,
    progress: &mut Progress,
) -> Result<(), GcsError> {
    let name = src.name().to_path_buf();
    loop {
        let (piece, ended) = match src {
            Source::File {
                file, size, offset, ..
            } => {
                let len = (*size - *offset).min(PIECE as u64) as usize;
                if len == 0 {
                    return Ok(());
                }
                let (f, at) = (file.clone(), *offset);
                let piece =
                    tokio::task::spawn_blocking(move || crate::fileio::pread_bytes(&f, at, len))
                        .await
                        .map_err(|e| GcsError::Other(format!("reading {}: {e}", name.display())))?
                        .map_err(|e| local(&name, e))?;
                *offset += len as u64;
                (piece, *offset == *size)
            }
            Source::Stream { reader, .. } => {
                let mut buf = BytesMut::with_capacity(PIECE);
                let mut ended = false;
                while buf.len() < PIECE {
                    let read = match idle_flush {
                        Some(idle) if w.persisted() < w.written() || !buf.is_empty() => {
                            match tokio::time::timeout(idle, reader.read_buf(&mut buf)).await {
                                Ok(r) => r,
                                // Quiet: send and persist what came.
                                Err(_) => break,
                            }
                        }
                        _ => reader.read_buf(&mut buf).await,
                    };
                    if read.map_err(|e| local(&name, e))? == 0 {
                        ended = true;
                        break;
                    }
                }
                (buf, ended)
            }
        };
        let n = piece.len() as u64;
        if n > 0 {
            w.write(piece.freeze()).await?;
            progress.advance(n);
        }
        if idle_flush.is_some() && !ended && w.persisted() < w.written() {
            w.flush().await?;
        }
        if ended {
            return Ok(());
        }
    }
}

/// `cp LOCAL gs://B/O`: uploads `src` as a new appendable object, finalized
/// unless told otherwise.
pub async fn upload(
    client: &GcsClient,
    src: &mut Source,
    object: &str,
    opts: &UploadOptions,
) -> Result<Uploaded, GcsError> {
    let size = src.size();
    let precondition = opts.no_clobber.then_some(0);
    let mut w = AppendableWriter::create(client, object, precondition, opts.write.clone()).await?;
    let mut progress = Progress::new(&format!("gs://{}/{object}", client.bucket()), size);
    pump(src, &mut w, None, &mut progress).await?;
    let generation = w.generation();
    let uploaded = if opts.finalize {
        let info = w.finalize().await?;
        Uploaded {
            object: object.to_string(),
            generation,
            size: info.size,
            finalized: true,
        }
    } else {
        let size = w.close().await?;
        Uploaded {
            object: object.to_string(),
            generation,
            size,
            finalized: false,
        }
    };
    progress.finish();
    Ok(uploaded)
}

/// `append SRC gs://B/O`: appends to an unfinalized object by takeover
/// (creating it if it does not exist), finalizing it at the end if asked.
/// `follow`: the source is a stream (standard input), persisted as it comes.
pub async fn append(
    client: &GcsClient,
    src: &mut Source,
    object: &str,
    finalize: bool,
    opts: WriteOptions,
) -> Result<Uploaded, GcsError> {
    let follow = matches!(src, Source::Stream { .. });
    let mut w = match AppendableWriter::append(client, object, None, opts.clone()).await {
        Ok(w) => w,
        Err(GcsError::NotFound(_)) => {
            AppendableWriter::create(client, object, Some(0), opts).await?
        }
        Err(e) => return Err(e),
    };
    let mut progress = Progress::new(&format!("gs://{}/{object}", client.bucket()), None);
    let idle = follow.then_some(IDLE_FLUSH);
    pump(src, &mut w, idle, &mut progress).await?;
    let generation = w.generation();
    let (size, finalized) = if finalize {
        (w.finalize().await?.size, true)
    } else {
        (w.close().await?, false)
    };
    progress.finish();
    Ok(Uploaded {
        object: object.to_string(),
        generation,
        size,
        finalized,
    })
}

/// The object an upload of `src` to `gs://B/PREFIX` writes: PREFIX itself, or
/// PREFIX + the file's name when PREFIX is empty or ends with `/`.
pub fn destination_object(prefix: &str, src: &Path) -> Result<String, GcsError> {
    if !prefix.is_empty() && !prefix.ends_with('/') {
        return Ok(prefix.to_string());
    }
    let name = src
        .file_name()
        .and_then(|n| n.to_str())
        .filter(|n| *n != "-")
        .ok_or_else(|| {
            GcsError::InvalidArgument(format!(
                "cannot name an object after {}: give the whole gs://BUCKET/OBJECT",
                src.display()
            ))
        })?;
    Ok(format!("{prefix}{name}"))
}

/// `cp gs://B/O LOCAL`: downloads the object's live version to `dest` (a
/// file, or a directory to put it in), through a temporary file renamed into
/// place once every byte is there.
pub async fn download(
    pool: &MrdPool,
    object: &str,
    dest: &Path,
) -> Result<(PathBuf, u64), GcsError> {
    let dest = if dest.is_dir() {
        let name = object.rsplit('/').next().unwrap_or(object);
        if name.is_empty() {
            return Err(GcsError::InvalidArgument(format!(
                "gs://{}/{object} names no object",
                pool.client().bucket()
            )));
        }
        dest.join(name)
    } else {
        dest.to_path_buf()
    };
    let mut tmp_name = dest.clone().into_os_string();
    tmp_name.push(".zonalfs-partial");
    let tmp = PathBuf::from(tmp_name);
    let file = tokio::fs::File::create(&tmp)
        .await
        .map_err(|e| local(&tmp, e))?;
    let mut out = tokio::io::BufWriter::with_capacity(1 << 20, file);
    let opts = CatOptions {
        offset: 0,
        length: None,
        window: 8 << 20,
        inflight: None,
    };
    let copied = match cat(pool, object, &opts, &mut out).await {
        Ok(n) => n,
        Err(e) => {
            let _ = tokio::fs::remove_file(&tmp).await;
            return Err(e);
        }
    };
    tokio::fs::rename(&tmp, &dest)
        .await
        .map_err(|e| local(&dest, e))?;
    Ok((dest, copied))
}

/// `rm gs://B/O`: deletes the object's live version.
pub async fn remove(client: &GcsClient, object: &str) -> Result<(), GcsError> {
    client.delete(object, None).await
}

/// `mv gs://B/A gs://B/B`: renames an object atomically, or a folder with
/// everything below it.
pub async fn rename(
    client: &GcsClient,
    from: &str,
    to: &str,
) -> Result<Option<ObjectInfo>, GcsError> {
    if !from.ends_with('/') {
        match client.move_object(from, to, None).await {
            Ok(info) => return Ok(Some(info)),
            Err(GcsError::NotFound(e)) => {
                if !client.folder_exists(from).await? {
                    return Err(GcsError::NotFound(e));
                }
            }
            Err(e) => return Err(e),
        }
    }
    client.rename_folder(from, to).await?;
    Ok(None)
}

/// Where a command's client connects, for any bucket.
pub type Connect<'a> = &'a (dyn Fn(&str) -> crate::gcs::client::ClientConfig + Sync);

/// `gs://B/O` split, with an object name required.
fn object_url(url: &str) -> Result<(String, String), GcsError> {
    let (bucket, object) = super::parse_gs_url(url)?;
    if object.is_empty() {
        return Err(GcsError::InvalidArgument(format!(
            "'{url}' names no object"
        )));
    }
    Ok((bucket, object))
}

/// Is standard input missing: closed, or /dev/null (which is what a closed
/// standard input becomes: the Rust runtime reopens it there at start)?
fn no_stdin() -> bool {
    use std::os::unix::fs::MetadataExt;
    let stdin = std::io::stdin();
    let fd = std::os::fd::AsFd::as_fd(&stdin);
    let Ok(owned) = fd.try_clone_to_owned() else {
        return true;
    };
    let (Ok(ours), Ok(null)) = (
        std::fs::File::from(owned).metadata(),
        std::fs::metadata("/dev/null"),
    ) else {
        return false;
    };
    ours.rdev() == null.rdev() && ours.dev() == null.dev() && ours.ino() == null.ino()
}

/// Standard input, if there is one to read: not closed (or /dev/null), not a
/// terminal.
fn stdin_source() -> Result<tokio::io::Stdin, GcsError> {
    if no_stdin() {
        return Err(GcsError::InvalidArgument(
            "'-' reads standard input, but there is none (closed, or /dev/null)".to_string(),
        ));
    }
    if std::io::stdin().is_terminal() {
        return Err(GcsError::InvalidArgument(
            "'-' reads standard input, which is a terminal: pipe the data in".to_string(),
        ));
    }
    Ok(tokio::io::stdin())
}

/// `zonalfs cp SRC DST`: an upload (SRC local or `-`, DST gs://) or a
/// download (SRC gs://, DST local). Returns the line to print.
pub async fn copy_command(
    connect: Connect<'_>,
    pool: crate::gcs::PoolConfig,
    src: &str,
    dst: &str,
    opts: &UploadOptions,
) -> Result<String, GcsError> {
    match (src.starts_with("gs://"), dst.starts_with("gs://")) {
        (true, true) => Err(GcsError::InvalidArgument(
            "copying from one object to another is not supported: use mv, or cp through a local file"
                .to_string(),
        )),
        (false, false) => Err(GcsError::InvalidArgument(format!(
            "neither '{src}' nor '{dst}' is a gs:// URL"
        ))),
        (true, false) => {
            let (bucket, object) = object_url(src)?;
            let client = GcsClient::connect(connect(&bucket)).await?;
            let pool = MrdPool::new(client, pool);
            let (path, n) = download(&pool, &object, Path::new(dst)).await?;
            Ok(format!("copied {src} to {} ({n} bytes)", path.display()))
        }
        (false, true) => {
            let (bucket, prefix) = super::parse_gs_url(dst)?;
            let src_path = Path::new(src);
            let object = destination_object(&prefix, src_path)?;
            let mut source = if src == "-" {
                Source::stream(stdin_source()?, "-")
            } else {
                Source::file(src_path)?
            };
            let client = GcsClient::connect(connect(&bucket)).await?;
            let up = upload(&client, &mut source, &object, opts).await?;
            Ok(format!(
                "copied {src} to gs://{bucket}/{} ({} bytes, generation {}, {})",
                up.object,
                up.size,
                up.generation,
                if up.finalized { "finalized" } else { "appendable" }
            ))
        }
    }
}

/// `zonalfs append SRC gs://B/O`. Returns the line to print.
pub async fn append_command(
    connect: Connect<'_>,
    src: &str,
    dst: &str,
    finalize: bool,
    opts: WriteOptions,
) -> Result<String, GcsError> {
    let (bucket, object) = object_url(dst)?;
    let mut source = if src == "-" {
        Source::stream(stdin_source()?, "-")
    } else {
        Source::file(Path::new(src))?
    };
    let client = GcsClient::connect(connect(&bucket)).await?;
    let up = append(&client, &mut source, &object, finalize, opts).await?;
    Ok(format!(
        "appended {src} to gs://{bucket}/{object} (now {} bytes, generation {}, {})",
        up.size,
        up.generation,
        if up.finalized {
            "finalized"
        } else {
            "appendable"
        }
    ))
}

/// `zonalfs rm URL...`: deletes each; the first failure ends the command.
pub async fn remove_command(
    connect: Connect<'_>,
    urls: &[String],
) -> Result<Vec<String>, GcsError> {
    let mut done = Vec::new();
    for url in urls {
        let (bucket, object) = object_url(url)?;
        let client = GcsClient::connect(connect(&bucket)).await?;
        remove(&client, &object).await?;
        done.push(format!("removed {url}"));
    }
    Ok(done)
}

/// `zonalfs mv gs://B/A gs://B/B` (one bucket: a rename in place).
pub async fn move_command(connect: Connect<'_>, src: &str, dst: &str) -> Result<String, GcsError> {
    let (bucket, from) = object_url(src)?;
    let (to_bucket, to) = object_url(dst)?;
    if bucket != to_bucket {
        return Err(GcsError::InvalidArgument(format!(
            "mv renames within one bucket; '{src}' and '{dst}' are in different buckets"
        )));
    }
    let client = GcsClient::connect(connect(&bucket)).await?;
    rename(&client, &from, &to).await?;
    Ok(format!("moved {src} to {dst}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn progress_lines() {
        let mut p = Progress::new("gs://b/o", Some(100 << 20));
        p.enabled = false;
        p.advance(25 << 20);
        assert_eq!(
            p.line(Duration::from_secs(1)),
            "gs://b/o: 25.0 MiB / 100.0 MiB at 25.0 MiB/s, 0:00:03 left"
        );
        let mut p = Progress::new("gs://b/o", None);
        p.enabled = false;
        p.advance(512);
        assert_eq!(p.line(Duration::from_secs(2)), "gs://b/o: 512 B at 256 B/s");
    }

    #[test]
    fn destination_names() {
        let f = Path::new("/tmp/x/data.bin");
        assert_eq!(destination_object("", f).unwrap(), "data.bin");
        assert_eq!(destination_object("dir/", f).unwrap(), "dir/data.bin");
        assert_eq!(destination_object("dir/o", f).unwrap(), "dir/o");
        assert!(destination_object("", Path::new("-")).is_err());
    }
}
