//! Reading local files at an offset without an extra copy or a memset: the
//! emulator serves objects from files with these, and the upload tools read
//! their sources with them (into buffers that go on the wire as they are).

use std::fs::File;
use std::os::unix::fs::FileExt;

/// Reads exactly `len` bytes at `off` into a new buffer (left uninitialized
/// until `pread` fills it: no memset on the serving path), or fails if the file
/// is shorter.
pub fn pread_bytes(file: &File, off: u64, len: usize) -> std::io::Result<bytes::BytesMut> {
    use std::os::fd::AsRawFd;
    let mut buf = bytes::BytesMut::with_capacity(len);
    while buf.len() < len {
        let done = buf.len();
        let spare = buf.spare_capacity_mut();
        let want = len - done;
        let at = libc::off_t::try_from(off + done as u64)
            .map_err(|_| std::io::Error::from(std::io::ErrorKind::InvalidInput))?;
        // SAFETY: `spare` is writable memory of at least `want` bytes owned by `buf`;
        // pread writes at most `want` bytes into it and the fd stays open (borrowed
        // from `file`) for the duration of the call.
        let n = unsafe { libc::pread(file.as_raw_fd(), spare.as_mut_ptr().cast(), want, at) };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object shrank while being read",
            ));
        }
        // SAFETY: pread initialized the next `n` (<= want) bytes after `done`.
        unsafe { buf.set_len(done + n as usize) };
    }
    Ok(buf)
}

/// Reads exactly `buf.len()` bytes at `off`, or fails if the file is shorter.
pub fn read_exact_at(file: &File, buf: &mut [u8], mut off: u64) -> std::io::Result<()> {
    let mut done = 0;
    while done < buf.len() {
        let n = file.read_at(&mut buf[done..], off)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "object shrank while being read",
            ));
        }
        done += n;
        off += n as u64;
    }
    Ok(())
}
