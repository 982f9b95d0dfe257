//! Memory files: a whole small object held in an anonymous memory file
//! (`memfd_create`), so that the kernel can serve its reads itself (FUSE
//! passthrough) while the daemon fills it like any buffer.
//!
//! A [`MemFile`] reserves its size (rounded up to pages) in the daemon's
//! [`Budget`] for as long as it lives, is truncated to the object's exact size
//! (so reads through it see the right end of file), and is mapped shared while
//! the daemon writes the object's verified chunks into it through the mapping
//! (one copy, as into any buffer). Dropping it unmaps it, closes the
//! descriptor and gives the budget back; a kernel file opened on it keeps the
//! pages alive until that file is closed too.

use std::os::fd::{AsFd, BorrowedFd, FromRawFd, OwnedFd};
use std::ptr::NonNull;
use std::sync::Arc;

use super::{page_size, Budget};

/// An anonymous memory file of a fixed size, mapped for writing.
pub struct MemFile {
    fd: OwnedFd,
    ptr: NonNull<u8>,
    /// Mapped (and reserved) bytes: the size rounded up to pages.
    mapped: usize,
    size: usize,
    budget: Arc<Budget>,
}

// SAFETY: a MemFile is the only owner of its mapping and descriptor; writes
// through it are coordinated by its holder (see read::buffer::Block).
unsafe impl Send for MemFile {}
// SAFETY: as above; shared references only hand out the pointer and the fd.
unsafe impl Sync for MemFile {}

impl std::fmt::Debug for MemFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemFile").field("size", &self.size).finish()
    }
}

impl MemFile {
    /// A memory file of `size` bytes (at least one), if the budget has room
    /// for it now; None when it has not (or the kernel refused).
    pub fn new(budget: &Arc<Budget>, size: usize) -> Option<MemFile> {
        let page = page_size();
        let mapped = size.max(1).div_ceil(page) * page;
        if !budget.try_reserve(mapped as u64) {
            return None;
        }
        let made = Self::create(size, mapped);
        if made.is_none() {
            budget.release(mapped as u64);
        }
        made.map(|(fd, ptr)| MemFile {
            fd,
            ptr,
            mapped,
            size,
            budget: budget.clone(),
        })
    }

    fn create(size: usize, mapped: usize) -> Option<(OwnedFd, NonNull<u8>)> {
        // SAFETY: the name is a NUL-terminated string; the flags are valid.
        let raw = unsafe { libc::memfd_create(c"zonalfs-object".as_ptr(), libc::MFD_CLOEXEC) };
        if raw < 0 {
            return None;
        }
        // SAFETY: memfd_create returned a new descriptor that nothing else owns.
        let fd = unsafe { OwnedFd::from_raw_fd(raw) };
        let len = libc::off_t::try_from(size).ok()?;
        // SAFETY: fd is a valid memfd; ftruncate only sets its size.
        if unsafe { libc::ftruncate(raw, len) } != 0 {
            return None;
        }
        // SAFETY: a shared mapping of the memfd just sized; the kernel picks
        // the address. Bytes past `size` in the last page are never written.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                mapped,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                raw,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return None;
        }
        NonNull::new(p.cast::<u8>()).map(|ptr| (fd, ptr))
    }

    /// The object's size (the file's size).
    pub fn size(&self) -> usize {
        self.size
    }

    /// The first byte of the mapping (page-aligned).
    pub fn as_ptr(&self) -> *mut u8 {
        self.ptr.as_ptr()
    }
}

impl AsFd for MemFile {
    fn as_fd(&self) -> BorrowedFd<'_> {
        self.fd.as_fd()
    }
}

impl Drop for MemFile {
    fn drop(&mut self) {
        // SAFETY: ptr/mapped are exactly what mmap returned, unmapped once.
        unsafe {
            libc::munmap(self.ptr.as_ptr().cast(), self.mapped);
        }
        self.budget.release(self.mapped as u64);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;

    #[test]
    fn a_memory_file_holds_what_was_written_and_its_budget() {
        let budget = Budget::new(1 << 20);
        let m = MemFile::new(&budget, 5000).expect("room");
        assert_eq!(budget.used(), 8192, "two pages reserved");
        assert_eq!(m.as_ptr() as usize % 4096, 0);
        let data: Vec<u8> = (0..5000u32).map(|i| (i % 251) as u8).collect();
        // SAFETY: 5000 bytes fit the mapping.
        unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), m.as_ptr(), data.len()) };
        // Read back through the descriptor, as the kernel serves a reader.
        let dup = m.as_fd().try_clone_to_owned().expect("dup");
        let mut f = std::fs::File::from(dup);
        let mut back = Vec::new();
        f.read_to_end(&mut back).expect("read");
        assert_eq!(back, data, "its size is the object's, its bytes ours");
        assert!(MemFile::new(&budget, 1 << 20).is_none(), "no room left");
        drop(m);
        assert_eq!(budget.used(), 0);
        assert_eq!(back.len(), 5000);
    }
}
