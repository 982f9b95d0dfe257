//! The venv with the pinned official Python packages (tests/python/requirements.txt),
//! made once under the build directory and reused while the pins are unchanged.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

/// Creates (once) the venv with the pinned packages and returns its python.
pub fn python() -> &'static Path {
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
            "pip install of the pinned Python packages failed"
        );
        std::fs::write(&stamp, wanted).expect("stamp");
        py
    })
}
