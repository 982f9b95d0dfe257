//! Writing through a real mount with unmodified programs (issue 17):
//! `echo >` and `echo >>`, `cp` and `cp -r` in, `tar -x` into the mount,
//! Python write/fsync/read-back, `mkdir`, `mv`, `rm`, `rmdir`; writes that
//! cannot stream (`dd conv=notrunc`, `truncate`, seeking back, SQLite) go
//! through a staged copy; a second mount sees what the first wrote once it
//! is flushed, while the writer still has the file open; a read-only mount
//! refuses changes with EROFS. Every byte is checked in the emulator's
//! tree (the bucket itself), every mount detached by its guard.

mod common;

use std::os::unix::fs::MetadataExt;
use std::process::Command;

use common::mount::*;
use common::*;
use sha2::{Digest, Sha256};

fn sh(cmd: &str) {
    let out = Command::new("sh").args(["-c", cmd]).output().expect("sh");
    assert!(
        out.status.success(),
        "`{cmd}` failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Runs a Python program, which must succeed (`what` names it on failure).
fn python(program: &str, what: &str) {
    let out = Command::new("python3")
        .args(["-c", program])
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn appendable(tree: &Tree, object: &str) -> bool {
    tree.root()
        .join(zonalfs::emulator::store::APPENDABLE_DIR)
        .join(BUCKET)
        .join(object)
        .exists()
}

#[test]
fn programs_write_through_the_mount() {
    let tree = Tree::new();
    tree.put("old.txt", b"finalized\n");
    // An empty folder made elsewhere (not listed by this mount first).
    std::fs::create_dir(tree.path("made-elsewhere")).unwrap();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let metrics = free_addr();
    let m = MountGuard::mount(
        &ep,
        mnt.path(),
        &["--metadata-ttl", "0s", "--metrics-addr", &metrics],
    );
    let root = mnt.path();
    let r = root.display();

    std::fs::write(root.join("made-elsewhere/x"), b"x").expect("write into an empty folder");
    assert_eq!(std::fs::read(tree.path("made-elsewhere/x")).unwrap(), b"x");

    // echo > and echo >>: a new appendable object, then an append by
    // takeover (same generation), left unfinalized.
    sh(&format!("echo hello > {r}/greeting.txt"));
    assert_eq!(
        std::fs::read(tree.path("greeting.txt")).unwrap(),
        b"hello\n"
    );
    assert!(appendable(&tree, "greeting.txt"), "left unfinalized");
    let ino_before = std::fs::metadata(tree.path("greeting.txt")).unwrap().ino();
    sh(&format!("echo world >> {r}/greeting.txt"));
    assert_eq!(
        std::fs::read(tree.path("greeting.txt")).unwrap(),
        b"hello\nworld\n"
    );
    assert_eq!(
        std::fs::metadata(tree.path("greeting.txt")).unwrap().ino(),
        ino_before,
        "the append went to the same object version"
    );
    assert_eq!(
        std::fs::read(root.join("greeting.txt")).unwrap(),
        b"hello\nworld\n",
        "read back through the mount"
    );

    // cp of a large file (chunks, flushes), and cp -r of a tree.
    let src = tempfile::tempdir().expect("source");
    let big = pattern(9 * (1 << 20) + 77, 3);
    std::fs::write(src.path().join("big.bin"), &big).unwrap();
    std::fs::create_dir_all(src.path().join("tree/a/b")).unwrap();
    for (i, p) in ["tree/one", "tree/a/two", "tree/a/b/three"]
        .iter()
        .enumerate()
    {
        std::fs::write(src.path().join(p), pattern(1000 + i * 4000, i as u64)).unwrap();
    }
    sh(&format!("cp {}/big.bin {r}/big.bin", src.path().display()));
    assert_eq!(
        Sha256::digest(std::fs::read(tree.path("big.bin")).unwrap()),
        Sha256::digest(&big)
    );
    assert_eq!(
        sha_file(&root.join("big.bin")),
        Sha256::digest(&big).to_vec()
    );
    sh(&format!("cp -r {}/tree {r}/copied", src.path().display()));
    for p in ["one", "a/two", "a/b/three"] {
        assert_eq!(
            std::fs::read(tree.path(&format!("copied/{p}"))).unwrap(),
            std::fs::read(src.path().join("tree").join(p)).unwrap(),
            "{p}"
        );
    }

    // tar -x into the mount.
    let tarball = src.path().join("t.tar");
    sh(&format!(
        "tar -C {} -cf {} tree",
        src.path().display(),
        tarball.display()
    ));
    sh(&format!(
        "mkdir {r}/untar && tar -C {r}/untar -xf {}",
        tarball.display()
    ));
    assert_eq!(
        std::fs::read(tree.path("untar/tree/a/b/three")).unwrap(),
        std::fs::read(src.path().join("tree/a/b/three")).unwrap()
    );

    // Python: write, fsync, read back through the same file, close.
    let py = format!(
        "import os\n\
         with open('{r}/py.bin', 'w+b') as f:\n\
         \x20   f.write(b'abc' * 1000)\n\
         \x20   f.flush(); os.fsync(f.fileno())\n\
         \x20   f.seek(0)\n\
         \x20   assert f.read() == b'abc' * 1000\n\
         \x20   f.write(b'end')\n"
    );
    python(&py, "python");
    let mut want = b"abc".repeat(1000);
    want.extend_from_slice(b"end");
    assert_eq!(std::fs::read(tree.path("py.bin")).unwrap(), want);

    // Namespace: mkdir, mv (file: atomic, same object; directory: with
    // everything below), rm, rmdir.
    sh(&format!("mkdir {r}/d && mv {r}/big.bin {r}/d/big.bin"));
    assert!(!tree.path("big.bin").exists());
    assert_eq!(
        std::fs::read(tree.path("d/big.bin")).unwrap().len(),
        big.len()
    );
    sh(&format!("mv {r}/copied {r}/renamed"));
    assert!(tree.path("renamed/a/b/three").exists() && !tree.path("copied").exists());
    assert_eq!(
        std::fs::read(root.join("renamed/a/two")).unwrap(),
        std::fs::read(src.path().join("tree/a/two")).unwrap()
    );
    let e = std::fs::remove_dir(root.join("d")).expect_err("not empty");
    assert_eq!(e.raw_os_error(), Some(libc::ENOTEMPTY));
    sh(&format!("rm {r}/d/big.bin && rmdir {r}/d"));
    assert!(!tree.path("d").exists());
    sh(&format!("rm -r {r}/renamed"));
    assert!(!tree.path("renamed").exists());

    // Appending to a finalized object goes through a staged copy: a new
    // generation with the old bytes and the new ones.
    sh(&format!("echo more >> {r}/old.txt"));
    assert_eq!(
        std::fs::read(tree.path("old.txt")).unwrap(),
        b"finalized\nmore\n"
    );

    // The metrics count what happened.
    let text = scrape(&metrics);
    let written = metric(&text, "zonalfs_write_bytes_total");
    assert!(written >= big.len() as f64, "{written}");
    for name in [
        "zonalfs_write_flushes_total",
        "zonalfs_write_takeovers_total",
        "zonalfs_write_objects_created_total",
        "zonalfs_write_fallbacks_total",
        "zonalfs_write_staged_uploads_total",
        "zonalfs_fuse_op_seconds_count{op=\"write\"}",
        "zonalfs_fuse_op_seconds_count{op=\"rename\"}",
    ] {
        assert!(metric(&text, name) >= 1.0, "{name} in\n{text}");
    }

    // A second mount sees what the first wrote (and closed).
    let mnt2 = tempfile::tempdir().expect("mountpoint 2");
    let m2 = MountGuard::mount(&ep, mnt2.path(), &["--read-only", "--metadata-ttl", "0s"]);
    assert_eq!(
        std::fs::read(mnt2.path().join("greeting.txt")).unwrap(),
        b"hello\nworld\n"
    );
    assert_eq!(std::fs::read(mnt2.path().join("py.bin")).unwrap(), want);
    // ... and, mounted read-only, refuses changes.
    for (what, r) in [
        ("create", std::fs::write(mnt2.path().join("new"), b"x")),
        ("mkdir", std::fs::create_dir(mnt2.path().join("nd"))),
        ("unlink", std::fs::remove_file(mnt2.path().join("old.txt"))),
    ] {
        assert_eq!(
            r.expect_err(what).raw_os_error(),
            Some(libc::EROFS),
            "{what}"
        );
    }
    drop(m2);
    drop(m);
    assert!(!is_mounted(mnt.path()) && !is_mounted(mnt2.path()));
}

/// `--finalize-on-close`: a file written through the mount is finalized
/// when it is closed, with the whole object's CRC32C.
#[test]
fn finalize_on_close() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &["--finalize-on-close"],
    );
    let body = pattern(3 * (1 << 20) + 5, 9);
    std::fs::write(mnt.path().join("done.bin"), &body).unwrap();
    assert_eq!(std::fs::read(tree.path("done.bin")).unwrap(), body);
    assert!(!appendable(&tree, "done.bin"), "finalized at close");
    let out = zonalfs_cmd()
        .args(["stat", &format!("gs://{BUCKET}/done.bin")])
        .env("STORAGE_EMULATOR_HOST", &emu.addr)
        .output()
        .expect("zonalfs stat");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("finalized: true"), "{text}");
    assert!(
        text.contains(&format!("crc32c: {:08x}", crc32c::crc32c(&body))),
        "{text}"
    );
}

/// rsync into the mount (it writes a temporary file, sets its times and
/// mode, and renames it over the target), and the checkpoint pattern
/// (write a temporary file, fsync, rename it over the old checkpoint).
#[test]
fn rsync_and_the_checkpoint_pattern() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _m = MountGuard::mount(&format!("http://{}", emu.addr), mnt.path(), &[]);
    let root = mnt.path();
    let src = tempfile::tempdir().expect("source");
    std::fs::create_dir_all(src.path().join("data/sub")).unwrap();
    let files = [
        ("data/a.bin", 3 << 20),
        ("data/sub/b.txt", 1234),
        ("data/c", 0),
    ];
    for (i, (p, n)) in files.iter().enumerate() {
        std::fs::write(src.path().join(p), pattern(*n, i as u64)).unwrap();
    }
    sh(&format!(
        "rsync -a {}/data/ {}/synced/",
        src.path().display(),
        root.display()
    ));
    for (p, _) in files {
        let rel = p.trim_start_matches("data/");
        assert_eq!(
            std::fs::read(tree.path(&format!("synced/{rel}"))).unwrap(),
            std::fs::read(src.path().join(p)).unwrap(),
            "{p}"
        );
    }
    // A second rsync finds nothing to change, or rewrites to the same bytes.
    sh(&format!(
        "rsync -a {}/data/ {}/synced/",
        src.path().display(),
        root.display()
    ));
    assert_eq!(
        std::fs::read(tree.path("synced/a.bin")).unwrap(),
        std::fs::read(src.path().join("data/a.bin")).unwrap()
    );

    // The checkpoint pattern, three times over.
    let py = format!(
        "import os\n\
         for step in range(3):\n\
         \x20   tmp = '{r}/ckpt.tmp'\n\
         \x20   with open(tmp, 'wb') as f:\n\
         \x20       f.write(bytes([step]) * (1 << 20))\n\
         \x20       f.flush(); os.fsync(f.fileno())\n\
         \x20   os.replace(tmp, '{r}/ckpt')\n\
         \x20   with open('{r}/ckpt', 'rb') as f:\n\
         \x20       assert f.read() == bytes([step]) * (1 << 20), step\n",
        r = root.display()
    );
    python(&py, "python");
    assert_eq!(
        std::fs::read(tree.path("ckpt")).unwrap(),
        vec![2u8; 1 << 20]
    );
    assert!(!tree.path("ckpt.tmp").exists());
}

/// Crash safety: what fsync acknowledged survives SIGKILL of the daemon;
/// after `--force` (the systemd unit's restart) the object reads to its
/// persisted size, and can be appended to again.
#[test]
fn fsynced_bytes_survive_a_killed_daemon() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let mut m = MountGuard::mount(&ep, mnt.path(), &[]);
    let synced = pattern(5 * (1 << 20) + 3, 4);
    let mut f = std::fs::File::create(mnt.path().join("journal")).expect("create");
    std::io::Write::write_all(&mut f, &synced).unwrap();
    f.sync_all().expect("fsync");
    // Written after the fsync, never synced: may be lost.
    std::io::Write::write_all(&mut f, b"unsynced tail").unwrap();
    let child = m.child.take().expect("daemon");
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(child.id() as libc::pid_t, libc::SIGKILL) };
    let mut child = child;
    let _ = child.wait();
    drop(f);
    let on_disk = std::fs::read(tree.path("journal")).unwrap();
    assert!(
        on_disk.len() >= synced.len() && on_disk[..synced.len()] == synced[..],
        "fsynced bytes lost: {} bytes in the bucket, {} fsynced",
        on_disk.len(),
        synced.len()
    );
    drop(m);
    let _m = MountGuard::mount(&ep, mnt.path(), &["--force", "--metadata-ttl", "0s"]);
    let back = std::fs::read(mnt.path().join("journal")).expect("read after restart");
    assert_eq!(back, on_disk, "the object reads to its persisted size");
    let mut f = std::fs::OpenOptions::new()
        .append(true)
        .open(mnt.path().join("journal"))
        .expect("reopen to append");
    std::io::Write::write_all(&mut f, b"+after").unwrap();
    drop(f);
    let mut want = on_disk.clone();
    want.extend_from_slice(b"+after");
    assert_eq!(std::fs::read(tree.path("journal")).unwrap(), want);
}

/// Every write fault of the emulator, all together, under a mount: files
/// written with `cp` and appended to with `>>` are byte-exact in the bucket
/// (the writer reopened and resumed at the persisted size), and read back
/// through the mount.
#[test]
fn writes_through_the_mount_survive_write_faults() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(
        tree.root(),
        &[
            "--break-after-bytes",
            "5000000",
            "--redirect-every",
            "3",
            "--stall-after-bytes",
            "13000000",
            "--fail-open-rate",
            "0.2",
            "--seed",
            "11",
        ],
    );
    let mnt = tempfile::tempdir().expect("mountpoint");
    let _m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &["--read-stall-timeout", "1s", "--metadata-ttl", "0s"],
    );
    let src = tempfile::tempdir().expect("source");
    let body = pattern(21 * (1 << 20) + 9, 6);
    std::fs::write(src.path().join("f.bin"), &body).unwrap();
    let r = mnt.path().display();
    sh(&format!("cp {}/f.bin {r}/f.bin", src.path().display()));
    sh(&format!("cat {}/f.bin >> {r}/f.bin", src.path().display()));
    let whole = [body.as_slice(), body.as_slice()].concat();
    let got = std::fs::read(tree.path("f.bin")).unwrap();
    assert_eq!(got.len(), whole.len(), "bytes lost or written twice");
    assert!(got == whole, "the bytes differ");
    assert_eq!(
        sha_file(&mnt.path().join("f.bin")),
        Sha256::digest(&whole).to_vec()
    );
}

/// Writes that cannot stream, by unmodified programs: `dd conv=notrunc`
/// into the middle of a file, `truncate -s` up and down, Python seeking back
/// and writing a hole, and SQLite (pages rewritten in place, a journal, fsync)
/// — each through a staged copy in `--temp-dir`, uploaded as a new
/// generation at fsync and close, and nothing left in `--temp-dir`.
#[test]
fn programs_that_write_in_place() {
    let tree = Tree::new();
    tree.put("fixed.bin", &pattern(3 << 20, 1));
    let emu = EmuChild::spawn(tree.root(), &[]);
    let mnt = tempfile::tempdir().expect("mountpoint");
    let temp = tempfile::tempdir().expect("temp dir");
    let metrics = free_addr();
    let _m = MountGuard::mount(
        &format!("http://{}", emu.addr),
        mnt.path(),
        &[
            "--temp-dir",
            &temp.path().display().to_string(),
            "--metrics-addr",
            &metrics,
        ],
    );
    let root = mnt.path();
    let r = root.display();

    // dd into the middle of a finalized object.
    let mut want = pattern(3 << 20, 1);
    sh(&format!(
        "head -c 4096 /dev/zero | tr '\\0' 'Q' | dd of={r}/fixed.bin bs=4096 seek=100 conv=notrunc status=none"
    ));
    want[100 * 4096..101 * 4096].fill(b'Q');
    assert!(
        std::fs::read(tree.path("fixed.bin")).unwrap() == want,
        "dd conv=notrunc"
    );
    assert!(
        std::fs::read(root.join("fixed.bin")).unwrap() == want,
        "and through the mount"
    );

    // truncate down and up.
    sh(&format!("truncate -s 1000 {r}/fixed.bin"));
    assert_eq!(std::fs::read(tree.path("fixed.bin")).unwrap(), want[..1000]);
    sh(&format!("truncate -s 1500 {r}/fixed.bin"));
    let mut grown = want[..1000].to_vec();
    grown.resize(1500, 0);
    assert_eq!(std::fs::read(tree.path("fixed.bin")).unwrap(), grown);
    assert_eq!(
        std::fs::metadata(root.join("fixed.bin")).unwrap().len(),
        1500
    );

    // Python: a header written last (seek back), a hole, read back through
    // the same handle before close.
    let py = format!(
        "import os\n\
         with open('{r}/rec.bin', 'w+b') as f:\n\
         \x20   f.write(b'\\0' * 8)\n\
         \x20   f.write(b'body' * 1000)\n\
         \x20   f.seek(10000); f.write(b'tail')\n\
         \x20   f.seek(0); f.write(b'HEADER!!')\n\
         \x20   f.flush(); os.fsync(f.fileno())\n\
         \x20   f.seek(0); got = f.read()\n\
         \x20   assert got[:12] == b'HEADER!!body', got[:12]\n\
         \x20   assert len(got) == 10004, len(got)\n",
        r = r
    );
    python(&py, "python");
    let mut rec = b"HEADER!!".to_vec();
    rec.extend(b"body".repeat(1000));
    rec.resize(10000, 0);
    rec.extend_from_slice(b"tail");
    assert_eq!(std::fs::read(tree.path("rec.bin")).unwrap(), rec);

    // SQLite: a database built in the mount, then read back from the
    // bucket's own bytes.
    let py = format!(
        "import sqlite3\n\
         db = sqlite3.connect('{r}/app.db')\n\
         db.execute('create table t (k integer primary key, v text)')\n\
         for batch in range(5):\n\
         \x20   with db:\n\
         \x20       db.executemany('insert into t (v) values (?)', [('v%d-%d' % (batch, i),) for i in range(200)])\n\
         with db:\n\
         \x20   db.execute(\"update t set v = 'changed' where k % 7 = 0\")\n\
         db.close()\n",
        r = r
    );
    python(&py, "sqlite");
    let copy = temp.path().join("copy.db");
    std::fs::copy(tree.path("app.db"), &copy).unwrap();
    let check = format!(
        "import sqlite3\n\
         db = sqlite3.connect('{}')\n\
         assert db.execute('pragma integrity_check').fetchone()[0] == 'ok'\n\
         assert db.execute('select count(*) from t').fetchone()[0] == 1000\n\
         assert db.execute(\"select count(*) from t where v = 'changed'\").fetchone()[0] == 142\n\
         db.close()\n",
        copy.display()
    );
    python(&check, "the bucket's database");
    std::fs::remove_file(&copy).unwrap();
    assert!(
        !tree.path("app.db-journal").exists(),
        "the journal was removed"
    );

    let text = scrape(&metrics);
    assert!(
        metric(&text, "zonalfs_write_fallbacks_total") >= 4.0,
        "{text}"
    );
    assert!(
        metric(&text, "zonalfs_write_staged_uploads_total") >= 4.0,
        "{text}"
    );
    assert_eq!(
        std::fs::read_dir(temp.path()).unwrap().count(),
        0,
        "staged copies are unnamed: nothing is left in --temp-dir"
    );
}

/// Two mounts of one bucket: a writer, and a reader with metadata TTL 0. The
/// reader sees each fsync of the writer while the writer still has the file
/// open (its size and bytes), and the rest after the writer closes.
#[test]
fn a_second_mount_reads_what_a_live_writer_flushed() {
    let tree = Tree::new();
    let emu = EmuChild::spawn(tree.root(), &[]);
    let ep = format!("http://{}", emu.addr);
    let (mw, mr) = (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let _w = MountGuard::mount(&ep, mw.path(), &[]);
    let _r = MountGuard::mount(&ep, mr.path(), &["--read-only", "--metadata-ttl", "0s"]);
    let body = pattern(3 * (1 << 20) + 77, 5);
    let mut f = std::fs::File::create(mw.path().join("live.log")).unwrap();
    let mut written = 0;
    for part in body.chunks((1 << 20) + 11) {
        std::io::Write::write_all(&mut f, part).unwrap();
        f.sync_all().unwrap();
        written += part.len();
        let seen = std::fs::read(mr.path().join("live.log")).unwrap();
        assert_eq!(seen.len(), written, "the reader sees the flushed size");
        assert!(seen == body[..written], "and the flushed bytes");
    }
    std::io::Write::write_all(&mut f, b"after").unwrap();
    drop(f);
    let mut all = body.clone();
    all.extend_from_slice(b"after");
    assert!(
        std::fs::read(mr.path().join("live.log")).unwrap() == all,
        "closed: all of it"
    );
}
