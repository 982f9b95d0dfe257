//! The filesystem layer's errors and the one place they become errnos.
//!
//! [`FsError`] keeps the errors of the layers below whole (kind and source
//! chain) until [`FsError::errno`] turns them into what a program sees.

use crate::gcs::GcsError;
use crate::read::ReadError;

/// Errors of the filesystem layer: its own (a name or handle that is not
/// there) and those of the layers below, kept whole (kind and source chain)
/// until [`FsError::errno`] turns them into what a program sees.
#[derive(Debug, Clone, thiserror::Error)]
pub enum FsError {
    #[error("no such file or directory")]
    NotFound,
    #[error("read-only file system")]
    ReadOnly,
    #[error("is a directory")]
    IsDir,
    #[error("not a directory")]
    NotDir,
    #[error("stale file handle: {0}")]
    Stale(String),
    #[error("bad file handle")]
    BadHandle,
    #[error("invalid name")]
    InvalidName,
    #[error("file exists")]
    Exists,
    #[error("directory not empty")]
    NotEmpty,
    /// An operation the mount does not do.
    #[error("operation not supported: {0}")]
    Unsupported(String),
    /// The local copy of a write that cannot stream (`--temp-dir`): no room
    /// (ENOSPC, past `--temp-dir-limit` or the disk full) or another local
    /// failure, with its errno.
    #[error("{msg}")]
    Staging { msg: String, errno: i32 },
    /// A write handle whose upload failed: every later write and flush on it
    /// reports this (the bytes since the last successful flush are not in
    /// the bucket).
    #[error("write failed: {0}")]
    WriteFailed(String),
    /// What the service said of an object cannot be right (e.g. an appendable
    /// object that shrank).
    #[error("I/O error: {0}")]
    Inconsistent(String),
    #[error(transparent)]
    Read(ReadError),
    #[error(transparent)]
    Gcs(GcsError),
}

impl FsError {
    /// The errno a program sees: the one place errors become errnos.
    pub fn errno(&self) -> i32 {
        match self {
            FsError::NotFound => libc::ENOENT,
            FsError::ReadOnly => libc::EROFS,
            FsError::IsDir => libc::EISDIR,
            FsError::NotDir => libc::ENOTDIR,
            FsError::Stale(_) | FsError::Read(ReadError::Stale { .. }) => libc::ESTALE,
            // The version an open handle pinned is gone.
            FsError::Read(ReadError::Gcs(GcsError::NotFound(_))) => libc::ESTALE,
            FsError::BadHandle => libc::EBADF,
            FsError::InvalidName => libc::EINVAL,
            FsError::Exists => libc::EEXIST,
            FsError::NotEmpty => libc::ENOTEMPTY,
            FsError::Unsupported(_) => libc::EOPNOTSUPP,
            FsError::Staging { errno, .. } => *errno,
            FsError::WriteFailed(_) => libc::EIO,
            FsError::Inconsistent(_)
            | FsError::Read(ReadError::Short { .. })
            | FsError::Read(ReadError::Shrank { .. }) => libc::EIO,
            FsError::Read(ReadError::Gcs(g)) | FsError::Gcs(g) => gcs_errno(g),
        }
    }
}

/// A client error's errno, by its kind: a missing object is ENOENT, a refusal
/// (by the service, or credentials that can no longer get a token) EACCES;
/// everything else (the service unavailable past the retry deadline, a
/// protocol violation, a cancelled call) is EIO.
fn gcs_errno(e: &GcsError) -> i32 {
    match e {
        GcsError::NotFound(_) => libc::ENOENT,
        GcsError::AlreadyExists(_) => libc::EEXIST,
        e if e.is_denied() => libc::EACCES,
        _ => libc::EIO,
    }
}

impl From<GcsError> for FsError {
    fn from(e: GcsError) -> Self {
        match e {
            GcsError::NotFound(_) => FsError::NotFound,
            other => FsError::Gcs(other),
        }
    }
}

impl From<ReadError> for FsError {
    fn from(e: ReadError) -> Self {
        FsError::Read(e)
    }
}
