//! Conformance with a client nobody here wrote: the official Python client
//! (google-cloud-storage's asyncio AsyncMultiRangeDownloader, versions pinned in
//! tests/python/requirements.txt) reads objects from the emulator binary over a
//! plaintext channel and compares every byte (tests/python/conformance.py).
//! The venv is made under the build directory on first use (tests/common/python.rs).

mod common;

use std::path::Path;
use std::process::Command;

use common::python::python;
use common::*;

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
