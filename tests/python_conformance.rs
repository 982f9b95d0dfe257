//! Conformance with a client nobody here wrote: the official Python client
//! (google-cloud-storage's asyncio AsyncMultiRangeDownloader, versions pinned in
//! tests/python/requirements.txt) reads objects from the emulator binary over a
//! plaintext channel and compares every byte (tests/python/conformance.py).
//! The venv is made under the build directory on first use.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use common::*;

/// Creates (once) the venv with the pinned client and returns its python.
fn python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
        let reqs = manifest.join("tests/python/requirements.txt");
        let venv = Path::new(env!("CARGO_TARGET_TMPDIR")).join("conformance-venv");
        let py = venv.join("bin/python");
        let stamp = venv.join(".requirements-installed");
        let wanted = std::fs::read_to_string(&reqs).expect("requirements.txt");
        if std::fs::read_to_string(&stamp).ok().as_deref() == Some(wanted.as_str()) {
            return py;
        }
        let st = Command::new("python3")
            .args(["-m", "venv", "--clear"])
            .arg(&venv)
            .status()
            .expect("python3 -m venv");
        assert!(st.success(), "creating the venv failed");
        let st = Command::new(&py)
            .args([
                "-m",
                "pip",
                "install",
                "--quiet",
                "--disable-pip-version-check",
                "-r",
            ])
            .arg(&reqs)
            .status()
            .expect("pip install");
        assert!(
            st.success(),
            "pip install of the pinned Python client failed"
        );
        std::fs::write(&stamp, wanted).expect("stamp");
        py
    })
}

fn conformance(extra_emulator_args: &[&str], extra_script_args: &[&str]) {
    let py = python();
    let tree = Tree::new();
    // Over two chunks, with an odd tail, plus an empty object.
    tree.put("dir/object.bin", &pattern(9 * (1 << 20) + 3, 42));
    tree.put("empty", b"");
    let emu = EmuChild::spawn(tree.root(), extra_emulator_args);
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/python/conformance.py");
    for object in ["dir/object.bin", "empty"] {
        let out = Command::new(py)
            .arg(&script)
            .args([
                "--endpoint",
                &emu.addr,
                "--bucket",
                BUCKET,
                "--object",
                object,
            ])
            .arg("--source")
            .arg(tree.path(object))
            .args(extra_script_args)
            .output()
            .expect("run conformance.py");
        let stdout = String::from_utf8_lossy(&out.stdout);
        println!("{stdout}");
        assert!(
            out.status.success(),
            "conformance failed for {object} ({}):\n{stdout}\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
        assert!(stdout.contains("OK   all checks passed"), "{stdout}");
    }
}

#[test]
fn official_python_client_reads_correct_bytes() {
    conformance(&[], &[]);
}

#[test]
fn official_python_client_follows_redirects() {
    conformance(&["--redirect-every", "1"], &["--expect-redirects"]);
}
