//! The systemd unit is valid: `systemd-analyze verify` accepts it (with the
//! binary path pointed at the one this build made).

use std::path::Path;
use std::process::Command;

#[test]
fn unit_verifies() {
    let manifest = Path::new(env!("CARGO_MANIFEST_DIR"));
    let unit = std::fs::read_to_string(manifest.join("systemd/zonalfs@.service")).expect("unit");
    assert!(unit.contains("Type=notify"));
    let unit = unit.replace("/usr/local/bin/zonalfs", env!("CARGO_BIN_EXE_zonalfs"));
    let dir = tempfile::tempdir().expect("tmp");
    let path = dir.path().join("zonalfs@test-bucket.service");
    std::fs::write(&path, unit).expect("write unit");
    let out = Command::new("systemd-analyze")
        .arg("verify")
        .arg(&path)
        .output()
        .expect("systemd-analyze (Debian package systemd) must be installed");
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let ours: Vec<&str> = text.lines().filter(|l| l.contains("zonalfs")).collect();
    assert!(out.status.success(), "{text}");
    assert!(ours.is_empty(), "systemd-analyze complained: {ours:?}");
}
