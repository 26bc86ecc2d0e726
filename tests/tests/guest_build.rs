//! guest-images/build.sh says which step failed when something is missing.

use std::path::Path;
use std::process::Command;

use mcvmm_tests::{expect_one_line_failure, repo_root};

fn build_sh() -> Command {
    let mut c = Command::new("bash");
    c.arg(repo_root().join("guest-images/build.sh"));
    c
}

#[test]
fn a_missing_tool_names_the_step_and_the_package() {
    // A PATH with every tool the script needs except flex.
    let bin = std::env::temp_dir().join(format!("mcvmm-build-test-{}", std::process::id()));
    std::fs::create_dir_all(&bin).expect("dir");
    for tool in [
        "make",
        "gcc",
        "bison",
        "bc",
        "gzip",
        "xz",
        "tar",
        "sha256sum",
        "readelf",
        "cargo",
        "dirname",
        "bash",
        "nproc",
    ] {
        let found = ["/usr/bin", "/bin", "/root/.cargo/bin"]
            .iter()
            .map(|d| Path::new(d).join(tool))
            .find(|p| p.exists());
        if let Some(p) = found {
            let _ = std::os::unix::fs::symlink(p, bin.join(tool));
        }
    }
    let out = build_sh().env("PATH", &bin).output().expect("bash");
    let _ = std::fs::remove_dir_all(&bin);
    expect_one_line_failure(
        &out,
        "step \"check tools\" failed — 'flex' not found; install Debian package 'flex'",
    );
}

#[test]
fn no_space_for_the_kernel_build_names_the_step() {
    let dir = std::env::temp_dir().join(format!("mcvmm-build-nospace-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("dir");
    let mounted = Command::new("mount")
        .args(["-t", "tmpfs", "-o", "size=8m", "tmpfs"])
        .arg(&dir)
        .status()
        .expect("mount");
    assert!(
        mounted.success(),
        "mounting a small tmpfs needs root (CI runs as root)"
    );
    let out = build_sh().env("MCVMM_CACHE", &dir).output().expect("bash");
    let _ = Command::new("umount").arg(&dir).status();
    let _ = std::fs::remove_dir_all(&dir);
    expect_one_line_failure(&out, "step \"check disk space\" failed — only");
}
