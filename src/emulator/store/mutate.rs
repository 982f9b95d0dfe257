//! Changes to the emulator's tree: new objects and their bytes, finalization,
//! delete, move, and folders (the directories of a bucket).
//!
//! A new object is staged in `ROOT/.staging` and gets a fresh generation number
//! (microseconds since the epoch, strictly increasing), written to its
//! generation record. An appendable object is renamed into place at once, with
//! its `.appendable` marker, so readers see it grow as its writer persists
//! bytes; any other object waits in staging until its writer finishes and then
//! replaces the live version in one rename. Finalizing records the file's last
//! version and removes the marker, so the generation stays what it was.
//!
//! Every change takes the store's one change lock, so a precondition
//! (`if_generation_match`, "the folder is empty") and the change it guards are
//! one step for every other change. Reads take no lock: a reader holds an open
//! file, which keeps serving its version whatever happens to the path.

use std::fs::File;
use std::os::unix::fs::{FileExt, MetadataExt};
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;

use super::{mtime_ns, system_time, ObjectMeta, Record, Store, APPENDABLE_DIR, STAGING_DIR};
use crate::emulator::EmuError;

/// Generation and metageneration preconditions of a request, as sent.
#[derive(Debug, Clone, Copy, Default)]
pub struct Preconditions {
    pub if_generation_match: Option<i64>,
    pub if_generation_not_match: Option<i64>,
    pub if_metageneration_match: Option<i64>,
    pub if_metageneration_not_match: Option<i64>,
}

impl Preconditions {
    /// Checks them against the live version (None: there is none). Generation
    /// 0 stands for "no live version", as in the service: `if_generation_match
    /// = 0` means the object must not exist.
    pub fn check(&self, live: Option<&ObjectMeta>) -> Result<(), EmuError> {
        let generation = live.map_or(0, |m| m.generation);
        let failed = |what: &str| {
            Err(EmuError::FailedPrecondition(format!(
                "At least one of the pre-conditions you specified did not hold ({what})"
            )))
        };
        if self.if_generation_match.is_some_and(|g| g != generation) {
            return failed("if_generation_match");
        }
        if self.if_generation_not_match == Some(generation) {
            return failed("if_generation_not_match");
        }
        // Every object here is at metageneration 1.
        let metageneration = live.map_or(0, |_| 1);
        if self
            .if_metageneration_match
            .is_some_and(|m| m != metageneration)
        {
            return failed("if_metageneration_match");
        }
        if self.if_metageneration_not_match == Some(metageneration) {
            return failed("if_metageneration_not_match");
        }
        Ok(())
    }
}

/// An object version being written: its file, open for writing, and where it
/// is until it is finalized.
#[derive(Debug)]
pub struct Written {
    pub bucket: String,
    pub name: String,
    pub generation: i64,
    pub file: File,
    /// The staging path of an object that is not appendable (it replaces the
    /// live version when finalized); None once it is in place.
    staged: Option<PathBuf>,
    created: SystemTime,
}

impl Written {
    /// Is this an appendable object (visible, growing)?
    pub fn appendable(&self) -> bool {
        self.staged.is_none()
    }

    /// Writes persisted bytes at `offset`.
    pub fn write_at(&self, offset: u64, parts: &[Bytes]) -> std::io::Result<()> {
        let mut at = offset;
        for p in parts {
            self.file.write_all_at(p, at)?;
            at += p.len() as u64;
        }
        Ok(())
    }

    /// The bytes persisted so far (the file's size).
    pub fn persisted(&self) -> std::io::Result<u64> {
        Ok(self.file.metadata()?.size())
    }

    /// The object's metadata as a writer's response carries it.
    pub fn meta(&self, finalized: bool, crc32c: Option<u32>) -> std::io::Result<ObjectMeta> {
        let md = self.file.metadata()?;
        Ok(ObjectMeta {
            bucket: self.bucket.clone(),
            name: self.name.clone(),
            generation: self.generation,
            size: md.size(),
            finalized,
            mtime: system_time(md.mtime(), md.mtime_nsec()),
            ctime: self.created,
            crc32c,
        })
    }
}

/// A folder (a directory of a bucket).
#[derive(Debug, Clone)]
pub struct FolderMeta {
    pub bucket: String,
    /// The folder's path below the bucket, ending with `/`.
    pub path: String,
    pub ctime: SystemTime,
    pub mtime: SystemTime,
}

/// Creates the parent directories of `path`; a file where a directory must
/// be is an object the emulator cannot hold beside this name.
fn make_parents(path: &Path, name: &str) -> Result<(), EmuError> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent).map_err(|e| match e.kind() {
            std::io::ErrorKind::NotADirectory | std::io::ErrorKind::AlreadyExists => {
                EmuError::FailedPrecondition(format!(
                    "The emulator cannot hold {name:?}: a parent folder of it is an object"
                ))
            }
            _ => EmuError::Io(e),
        })?;
    }
    Ok(())
}

/// Removes a file if it is there.
fn remove_if_there(path: &Path) -> std::io::Result<()> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

/// Renames a file or directory if it is there, making the target's parents.
fn rename_if_there(from: &Path, to: &Path) -> std::io::Result<()> {
    if std::fs::symlink_metadata(from).is_err() {
        return Ok(());
    }
    if let Some(parent) = to.parent() {
        std::fs::create_dir_all(parent)?;
    }
    std::fs::rename(from, to)
}

/// A folder id as sent (`a/b` or `a/b/`), checked: its path with a trailing `/`.
pub fn folder_path(id: &str) -> Result<String, EmuError> {
    let trimmed = id.strip_suffix('/').unwrap_or(id);
    if trimmed.is_empty()
        || trimmed
            .split('/')
            .any(|s| s.is_empty() || s == "." || s == ".." || s.len() > 255)
        || trimmed.contains('\0')
    {
        return Err(EmuError::InvalidArgument(format!(
            "Invalid folder name: {id:?}"
        )));
    }
    Ok(format!("{trimmed}/"))
}

impl Store {
    fn lock_changes(&self) -> std::sync::MutexGuard<'_, ()> {
        // A panic while changing leaves nothing half-done that the lock
        // protects (each change is checked again by the next), so a poisoned
        // lock is taken as it is.
        self.changing
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// A new generation number: microseconds since the epoch, strictly
    /// greater than any given before by this store.
    pub fn next_generation(&self) -> i64 {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(1, |d| d.as_micros() as i64);
        let mut last = self.last_generation.load(Ordering::Relaxed);
        loop {
            let next = now.max(last + 1);
            match self.last_generation.compare_exchange(
                last,
                next,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return next,
                Err(seen) => last = seen,
            }
        }
    }

    fn live(&self, bucket: &str, name: &str) -> Result<Option<ObjectMeta>, EmuError> {
        match self.stat(bucket, name, 0) {
            Ok(m) => Ok(Some(m)),
            Err(EmuError::NotFound(_)) => Ok(None),
            Err(e) => Err(e),
        }
    }

    fn write_record(&self, bucket: &str, name: &str, record: Record) -> Result<(), EmuError> {
        let path = self.record_path(bucket, name);
        make_parents(&path, name)?;
        std::fs::write(path, record.render())?;
        Ok(())
    }

    /// Creates a new generation of an object, empty, if `pre` holds against
    /// the live one. Appendable: in place at once (replacing the live version)
    /// and growing as bytes are persisted; otherwise staged until
    /// [`Store::finalize`].
    pub fn create(
        &self,
        bucket: &str,
        name: &str,
        pre: &Preconditions,
        appendable: bool,
    ) -> Result<Written, EmuError> {
        let path = self.object_path(bucket, name)?;
        let staging = self.root.join(STAGING_DIR);
        std::fs::create_dir_all(&staging)?;
        let generation = self.next_generation();
        let staged = staging.join(format!("{generation}"));
        let file = File::options()
            .read(true)
            .write(true)
            .create_new(true)
            .open(&staged)?;
        let created = SystemTime::now();
        let _changing = self.lock_changes();
        let placed = (|| {
            pre.check(self.live(bucket, name)?.as_ref())?;
            if !appendable {
                return Ok(());
            }
            make_parents(&path, name)?;
            if std::fs::symlink_metadata(&path).is_ok_and(|m| m.is_dir()) {
                return Err(EmuError::FailedPrecondition(format!(
                    "The emulator cannot hold {name:?}: a folder has that name"
                )));
            }
            let record = Record {
                generation,
                ino: file.metadata()?.ino(),
                mtime_ns: 0,
                size: 0,
            };
            self.write_record(bucket, name, record)?;
            let marker = self.marker_path(bucket, name);
            make_parents(&marker, name)?;
            std::fs::write(&marker, b"")?;
            std::fs::rename(&staged, &path)?;
            Ok(())
        })();
        if let Err(e) = placed {
            let _ = std::fs::remove_file(&staged);
            return Err(e);
        }
        Ok(Written {
            bucket: bucket.to_string(),
            name: name.to_string(),
            generation,
            file,
            staged: (!appendable).then_some(staged),
            created,
        })
    }

    /// Opens an unfinalized object to append to it (a takeover): its live
    /// version, which must be `generation` unless that is 0.
    pub fn reopen_appendable(
        &self,
        bucket: &str,
        name: &str,
        generation: i64,
    ) -> Result<(Written, ObjectMeta), EmuError> {
        let (meta, file) = self.open_as(
            bucket,
            name,
            generation,
            File::options().read(true).write(true),
        )?;
        if meta.finalized {
            return Err(EmuError::FailedPrecondition(format!(
                "The object {bucket}/{name} is finalized: it cannot be appended to"
            )));
        }
        Ok((
            Written {
                bucket: bucket.to_string(),
                name: name.to_string(),
                generation: meta.generation,
                file,
                staged: None,
                created: meta.ctime,
            },
            meta,
        ))
    }

    /// Is `w` still the live version of its object (not replaced or deleted)?
    pub fn is_live(&self, w: &Written) -> bool {
        if !w.appendable() {
            return true;
        }
        let Ok(path) = self.object_path(&w.bucket, &w.name) else {
            return false;
        };
        match (std::fs::symlink_metadata(path), w.file.metadata()) {
            (Ok(a), Ok(b)) => a.ino() == b.ino() && a.dev() == b.dev(),
            _ => false,
        }
    }

    /// Finalizes an object being written, whose whole CRC32C is `crc32c`:
    /// an appendable one keeps its generation and stops growing; a staged one
    /// replaces the live version now (if `pre` still holds).
    pub fn finalize(
        &self,
        w: &mut Written,
        crc32c: u32,
        pre: &Preconditions,
    ) -> Result<ObjectMeta, EmuError> {
        let path = self.object_path(&w.bucket, &w.name)?;
        let _changing = self.lock_changes();
        if w.staged.is_some() {
            pre.check(self.live(&w.bucket, &w.name)?.as_ref())?;
            make_parents(&path, &w.name)?;
        } else if !self.is_live(w) {
            return Err(EmuError::NotFound(format!(
                "No such object: {}/{}#{}",
                w.bucket, w.name, w.generation
            )));
        }
        let md = w.file.metadata()?;
        let record = Record {
            generation: w.generation,
            ino: md.ino(),
            mtime_ns: mtime_ns(&md),
            size: md.size(),
        };
        self.write_record(&w.bucket, &w.name, record)?;
        remove_if_there(&self.marker_path(&w.bucket, &w.name))?;
        if let Some(staged) = w.staged.take() {
            std::fs::rename(&staged, &path)?;
        }
        if let Ok(mut cache) = self.crc_cache.lock() {
            cache.insert((w.bucket.clone(), w.name.clone(), w.generation), crc32c);
        }
        Ok(w.meta(true, Some(crc32c))?)
    }

    /// Throws away a staged object that was never finalized.
    pub fn abandon(&self, w: &Written) {
        if let Some(staged) = &w.staged {
            let _ = std::fs::remove_file(staged);
        }
    }

    /// Deletes an object's live version (which must be `generation` unless
    /// that is 0), if `pre` holds.
    pub fn delete(
        &self,
        bucket: &str,
        name: &str,
        generation: i64,
        pre: &Preconditions,
    ) -> Result<(), EmuError> {
        let path = self.object_path(bucket, name)?;
        let _changing = self.lock_changes();
        let live = self.stat(bucket, name, generation)?;
        pre.check(Some(&live))?;
        std::fs::remove_file(&path).map_err(|_| Self::not_found(bucket, name))?;
        remove_if_there(&self.marker_path(bucket, name))?;
        remove_if_there(&self.record_path(bucket, name))?;
        Ok(())
    }

    /// Renames an object in place, atomically, keeping its generation: the
    /// source must satisfy `source_pre`, the destination's live version (if
    /// any, which it replaces) `pre`.
    pub fn rename(
        &self,
        bucket: &str,
        from: &str,
        to: &str,
        source_pre: &Preconditions,
        pre: &Preconditions,
    ) -> Result<ObjectMeta, EmuError> {
        let src = self.object_path(bucket, from)?;
        let dst = self.object_path(bucket, to)?;
        let _changing = self.lock_changes();
        let source = self.stat(bucket, from, 0)?;
        source_pre.check(Some(&source))?;
        pre.check(self.live(bucket, to)?.as_ref())?;
        if from == to {
            return Ok(source);
        }
        make_parents(&dst, to)?;
        if std::fs::symlink_metadata(&dst).is_ok_and(|m| m.is_dir()) {
            return Err(EmuError::FailedPrecondition(format!(
                "The emulator cannot hold {to:?}: a folder has that name"
            )));
        }
        remove_if_there(&self.marker_path(bucket, to))?;
        remove_if_there(&self.record_path(bucket, to))?;
        rename_if_there(
            &self.marker_path(bucket, from),
            &self.marker_path(bucket, to),
        )?;
        rename_if_there(
            &self.record_path(bucket, from),
            &self.record_path(bucket, to),
        )?;
        std::fs::rename(&src, &dst)?;
        self.stat(bucket, to, 0)
    }

    fn folder_meta(&self, bucket: &str, path: &str) -> Result<FolderMeta, EmuError> {
        let dir = self.bucket_dir(bucket)?.join(path.trim_end_matches('/'));
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => Ok(FolderMeta {
                bucket: bucket.to_string(),
                path: path.to_string(),
                ctime: system_time(md.ctime(), md.ctime_nsec()),
                mtime: system_time(md.mtime(), md.mtime_nsec()),
            }),
            _ => Err(EmuError::NotFound(format!(
                "The folder {path} does not exist in bucket {bucket}"
            ))),
        }
    }

    /// A folder (`path` ends with `/`).
    pub fn folder(&self, bucket: &str, path: &str) -> Result<FolderMeta, EmuError> {
        self.folder_meta(bucket, path)
    }

    /// Creates a folder; `recursive` creates missing parents too, otherwise
    /// the parent must exist.
    pub fn create_folder(
        &self,
        bucket: &str,
        path: &str,
        recursive: bool,
    ) -> Result<FolderMeta, EmuError> {
        let dir = self.bucket_dir(bucket)?.join(path.trim_end_matches('/'));
        let _changing = self.lock_changes();
        match std::fs::symlink_metadata(&dir) {
            Ok(md) if md.is_dir() => {
                return Err(EmuError::AlreadyExists(format!(
                    "The folder {path} already exists in bucket {bucket}"
                )))
            }
            Ok(_) => {
                return Err(EmuError::FailedPrecondition(format!(
                    "The emulator cannot hold folder {path}: an object has that name"
                )))
            }
            Err(_) => {}
        }
        let made = if recursive {
            std::fs::create_dir_all(&dir)
        } else {
            std::fs::create_dir(&dir)
        };
        made.map_err(|e| match e.kind() {
            std::io::ErrorKind::NotFound => EmuError::NotFound(format!(
                "The parent folder of {path} does not exist in bucket {bucket}"
            )),
            std::io::ErrorKind::NotADirectory => EmuError::FailedPrecondition(format!(
                "The emulator cannot hold folder {path}: a parent of it is an object"
            )),
            _ => EmuError::Io(e),
        })?;
        self.folder_meta(bucket, path)
    }

    /// Deletes an empty folder.
    pub fn delete_folder(&self, bucket: &str, path: &str) -> Result<(), EmuError> {
        let _changing = self.lock_changes();
        self.folder_meta(bucket, path)?;
        let dir = self.bucket_dir(bucket)?.join(path.trim_end_matches('/'));
        std::fs::remove_dir(&dir).map_err(|e| match e.kind() {
            std::io::ErrorKind::DirectoryNotEmpty => {
                EmuError::FailedPrecondition(format!("The folder {path} is not empty"))
            }
            _ => EmuError::Io(e),
        })?;
        let _ = std::fs::remove_dir(
            self.root
                .join(APPENDABLE_DIR)
                .join(bucket)
                .join(path.trim_end_matches('/')),
        );
        Ok(())
    }

    /// Renames a folder and everything below it; the destination must not
    /// exist, and its parent is created if missing.
    pub fn rename_folder(
        &self,
        bucket: &str,
        from: &str,
        to: &str,
    ) -> Result<FolderMeta, EmuError> {
        let base = self.bucket_dir(bucket)?;
        let (src, dst) = (from.trim_end_matches('/'), to.trim_end_matches('/'));
        let _changing = self.lock_changes();
        self.folder_meta(bucket, from)?;
        if std::fs::symlink_metadata(base.join(dst)).is_ok() {
            return Err(EmuError::AlreadyExists(format!(
                "The folder {to} already exists in bucket {bucket}"
            )));
        }
        if to.starts_with(from) {
            return Err(EmuError::InvalidArgument(format!(
                "Cannot rename folder {from} into itself ({to})"
            )));
        }
        make_parents(&base.join(dst), to)?;
        for side in [APPENDABLE_DIR, super::GENERATIONS_DIR] {
            let root = self.root.join(side).join(bucket);
            rename_if_there(&root.join(src), &root.join(dst))?;
        }
        std::fs::rename(base.join(src), base.join(dst))?;
        self.folder_meta(bucket, to)
    }
}
