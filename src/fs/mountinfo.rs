//! `/proc/self/mountinfo`, decoded. The one place that reads it: every
//! question about what is mounted where ([`find`], [`is_mounted`]) goes
//! through [`MountEntry::parse`].
//!
//! A line reads (proc(5)):
//!
//! ```text
//! 36 35 98:0 /mnt1 /mnt2 rw,noatime master:1 - ext3 /dev/root rw,errors=continue
//! (1)(2)(3)   (4)   (5)      (6)      (7)   (8) (9)   (10)         (11)
//! ```
//!
//! Fields are separated by single spaces, so the kernel escapes space, tab,
//! newline and backslash inside a field as three-digit octal (`\040`, `\011`,
//! `\012`, `\134`); every other byte, non-ASCII included, appears as it is.
//! A mount point must be unescaped before it can be compared with a path.

use std::ffi::OsString;
use std::io;
use std::os::unix::ffi::OsStringExt;
use std::path::{Path, PathBuf};

/// Where the kernel lists this process's mounts.
pub const MOUNTINFO: &str = "/proc/self/mountinfo";

/// One mount: the fields of its mountinfo line that zonalfs compares.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MountEntry {
    /// The mount's id (field 1), unique while it is mounted.
    pub mount_id: u64,
    /// The filesystem's device number (field 3, `MAJ:MIN`): `st_dev` of its
    /// files, and its name under `/sys/class/bdi`.
    pub major: u32,
    pub minor: u32,
    /// Where it is mounted (field 5), unescaped.
    pub mount_point: PathBuf,
    /// The filesystem type (the first field after `-`), unescaped; a zonalfs
    /// mount is `fuse` (or `fuse.zonalfs` if fusermount made it).
    pub fstype: String,
}

impl MountEntry {
    /// Parses one line (without its newline); `None` if it is not a
    /// well-formed mountinfo line.
    pub fn parse(line: &[u8]) -> Option<MountEntry> {
        let mut fields = line.split(|b| *b == b' ');
        let mount_id = std::str::from_utf8(fields.next()?).ok()?.parse().ok()?;
        let _parent_id = fields.next()?;
        let (major, minor) = std::str::from_utf8(fields.next()?).ok()?.split_once(':')?;
        let (major, minor) = (major.parse().ok()?, minor.parse().ok()?);
        let _root = fields.next()?;
        let mount_point = PathBuf::from(OsString::from_vec(unescape(fields.next()?)));
        let _options = fields.next()?;
        // Zero or more optional fields (`shared:1`, `master:2`...), then `-`.
        fields.find(|f| *f == b"-")?;
        let fstype = String::from_utf8_lossy(&unescape(fields.next()?)).into_owned();
        Some(MountEntry {
            mount_id,
            major,
            minor,
            mount_point,
            fstype,
        })
    }

    /// `MAJ:MIN`, as mountinfo and `/sys/class/bdi` spell the device.
    pub fn dev(&self) -> String {
        format!("{}:{}", self.major, self.minor)
    }

    /// Is `other` this very mount (same id, device and place)?
    pub fn same_mount(&self, other: &MountEntry) -> bool {
        self.mount_id == other.mount_id
            && (self.major, self.minor) == (other.major, other.minor)
            && self.mount_point == other.mount_point
    }
}

/// Undoes the kernel's escaping of one field: a backslash and three octal
/// digits (at most `\377`) stand for that byte; anything else, a backslash
/// that does not start such an escape included, is kept as it is.
pub fn unescape(field: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(field.len());
    let mut i = 0;
    while i < field.len() {
        if field[i] == b'\\' {
            if let Some(b) = field.get(i + 1..i + 4).and_then(octal_byte) {
                out.push(b);
                i += 4;
                continue;
            }
        }
        out.push(field[i]);
        i += 1;
    }
    out
}

/// Three octal digits as one byte, if they are that and fit in one.
fn octal_byte(digits: &[u8]) -> Option<u8> {
    let mut v: u32 = 0;
    for d in digits {
        if !(b'0'..=b'7').contains(d) {
            return None;
        }
        v = v * 8 + u32::from(d - b'0');
    }
    u8::try_from(v).ok()
}

/// Every well-formed line of a mountinfo text, in order (parents before the
/// mounts on top of them).
pub fn parse_all(text: &[u8]) -> Vec<MountEntry> {
    // A newline inside a field is escaped, so lines are lines.
    text.split(|b| *b == b'\n')
        .filter_map(MountEntry::parse)
        .collect()
}

/// This process's mounts, now.
pub fn read() -> io::Result<Vec<MountEntry>> {
    Ok(parse_all(&std::fs::read(MOUNTINFO)?))
}

/// The mount that `path` shows, in `mounts`: the last (topmost) one whose
/// mount point is `path`.
pub fn find_in(mounts: &[MountEntry], path: &Path) -> Option<MountEntry> {
    mounts.iter().rev().find(|m| m.mount_point == path).cloned()
}

/// The mount that `path` (absolute, symlinks resolved) shows now, if it is a
/// mount point.
pub fn find(path: &Path) -> io::Result<Option<MountEntry>> {
    Ok(find_in(&read()?, path))
}

/// Is `path` (absolute, symlinks resolved) a mount point now? An unreadable
/// mountinfo counts as no.
pub fn is_mounted(path: &Path) -> bool {
    find(path).is_ok_and(|m| m.is_some())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(line: &str) -> MountEntry {
        MountEntry::parse(line.as_bytes()).expect("parses")
    }

    #[test]
    fn the_four_escapes_decode() {
        assert_eq!(unescape(b"a\\040b"), b"a b");
        assert_eq!(unescape(b"a\\011b"), b"a\tb");
        assert_eq!(unescape(b"a\\012b"), b"a\nb");
        assert_eq!(unescape(b"a\\134b"), b"a\\b");
        assert_eq!(unescape(b"\\040\\040"), b"  ");
        assert_eq!(unescape(b"end\\040"), b"end ");
        assert_eq!(unescape(b""), b"");
    }

    #[test]
    fn non_ascii_bytes_pass_through() {
        // The kernel does not escape them: UTF-8 stays UTF-8...
        let s = "/mnt/données-日本";
        assert_eq!(unescape(s.as_bytes()), s.as_bytes());
        // ...and bytes that are not UTF-8 stay what they are.
        assert_eq!(unescape(b"/mnt/\xff\xfe\\040x"), b"/mnt/\xff\xfe x");
        let e = MountEntry::parse(
            b"40 30 0:52 / /mnt/\xffdonn\xc3\xa9es rw - fuse.zonalfs zonalfs:b ro",
        )
        .expect("parses");
        assert_eq!(
            e.mount_point.as_os_str().as_encoded_bytes(),
            b"/mnt/\xffdonn\xc3\xa9es"
        );
    }

    #[test]
    fn literal_backslashes() {
        // A backslash in a path is itself escaped, so the text `\040` in a
        // name comes as `\134040` and decodes to `\040`, not to a space.
        assert_eq!(unescape(b"a\\134040b"), b"a\\040b");
        assert_eq!(unescape(b"\\134\\134"), b"\\\\");
        // A backslash that starts no escape (never written by the kernel) is
        // kept, as is one whose digits run out or overflow a byte.
        assert_eq!(unescape(b"a\\b"), b"a\\b");
        assert_eq!(unescape(b"a\\08"), b"a\\08");
        assert_eq!(unescape(b"a\\04"), b"a\\04");
        assert_eq!(unescape(b"a\\"), b"a\\");
        assert_eq!(unescape(b"a\\400"), b"a\\400");
        assert_eq!(unescape(b"\\377"), b"\xff");
        let e = entry("41 30 0:53 / /mnt/back\\134slash\\040 rw - fuse.zonalfs z ro");
        assert_eq!(e.mount_point, Path::new("/mnt/back\\slash "));
    }

    #[test]
    fn parses_fields_with_and_without_optional_ones() {
        let e = entry(
            "36 35 98:0 /mnt1 /mnt/with\\040space rw,noatime master:1 shared:7 - ext3 /dev/root rw",
        );
        assert_eq!(e.mount_id, 36);
        assert_eq!((e.major, e.minor), (98, 0));
        assert_eq!(e.dev(), "98:0");
        assert_eq!(e.mount_point, Path::new("/mnt/with space"));
        assert_eq!(e.fstype, "ext3");
        let e = entry(
            "612 29 0:75 / /tmp/t\\011ab\\012nl rw,nosuid,nodev,relatime - fuse.zonalfs zonalfs:b ro,user_id=0",
        );
        assert_eq!(e.mount_point, Path::new("/tmp/t\tab\nnl"));
        assert_eq!(e.fstype, "fuse.zonalfs");
        for bad in [
            "",
            "36 35 98:0 /mnt1 /mnt2 rw",
            "x 35 98:0 / /m rw - ext3 s rw",
            "36 35 98 / /m rw - ext3 s rw",
            "36 35 98:0 / /m rw master:1",
        ] {
            assert_eq!(MountEntry::parse(bad.as_bytes()), None, "{bad:?}");
        }
    }

    #[test]
    fn the_topmost_mount_at_a_path_wins() {
        let text = b"1 0 8:1 / / rw - ext4 /dev/sda1 rw\n\
            50 1 0:60 / /mnt/a\\040b rw - fuse.zonalfs zonalfs:x ro\n\
            51 50 0:61 / /mnt/a\\040b rw - fuse.zonalfs zonalfs:y ro\n\
            52 1 0:62 / /mnt/a rw - tmpfs tmpfs rw\n";
        let all = parse_all(text);
        assert_eq!(all.len(), 4);
        let top = find_in(&all, Path::new("/mnt/a b")).expect("mounted");
        assert_eq!((top.mount_id, top.dev()), (51, "0:61".to_string()));
        assert!(top.same_mount(&all[2]) && !top.same_mount(&all[1]));
        // The raw (escaped) text is no mount point; nor is a prefix.
        assert_eq!(find_in(&all, Path::new("/mnt/a\\040b")), None);
        assert_eq!(find_in(&all, Path::new("/mnt/a ")), None);
        assert_eq!(
            find_in(&all, Path::new("/mnt/a")).map(|m| m.mount_id),
            Some(52)
        );
    }

    #[test]
    fn this_process_root_is_listed() {
        let mounts = read().expect("mountinfo");
        assert!(find_in(&mounts, Path::new("/")).is_some(), "{mounts:?}");
    }
}
