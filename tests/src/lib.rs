//! Helpers shared by the integration tests.

use std::path::PathBuf;
use std::process::{Command, Output};

/// Runs a workspace binary (built next to the test executables) with `args`.
pub fn workspace_command(name: &str) -> Command {
    match mcvmm_lab::assets::workspace_binary(name) {
        Ok(path) => Command::new(path),
        Err(e) => panic!("{e}"),
    }
}

/// Output of a command that is expected to fail with one clear line.
pub fn expect_one_line_failure(out: &Output, needle: &str) {
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success(), "succeeded; stderr: {stderr}");
    assert!(
        stderr.contains(needle),
        "stderr does not name {needle:?}:\n{stderr}"
    );
    assert!(!stderr.contains("panicked"), "panicked:\n{stderr}");
}

pub fn repo_root() -> PathBuf {
    mcvmm_lab::assets::workspace_root()
}
