//! Helpers shared by the integration tests.

pub mod crash_site;
pub mod drill;
pub mod etcd;
pub mod evidence;
pub mod failover_bench;
pub mod faults;
pub mod guest;
pub mod nemesis;
pub mod pair;
pub mod retry;
pub mod soak;

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

/// Starts a lab. A test host that failed while booting in a way that is the emulator's
/// (it died, hung, or its kernel reported a stuck CPU before it answered) is started
/// again if the retry policy grants it; any other failure is returned as it is.
pub fn start_lab(opts: &mcvmm_lab::LabOptions) -> Result<mcvmm_lab::Lab, mcvmm_lab::LabError> {
    loop {
        match mcvmm_lab::Lab::start(opts) {
            Err(mcvmm_lab::LabError::Host(e)) if failed_in_boot_by_the_lab(&e) => {
                if !retry::allow(retry::Cause::HostDied, &e.to_string()) {
                    return Err(e.into());
                }
            }
            other => return other,
        }
    }
}

fn failed_in_boot_by_the_lab(e: &mcvmm_lab::host::HostError) -> bool {
    use mcvmm_lab::host::HostError;
    match e {
        HostError::Died { .. } | HostError::Hung { .. } => true,
        HostError::BootTimeout { console, .. } => {
            mcvmm_lab::diagnose::stall_line(console).is_some()
        }
        _ => false,
    }
}

pub fn repo_root() -> PathBuf {
    mcvmm_lab::assets::workspace_root()
}

/// A KVM host with what guests need on it: the guest images under `guest/`, `mcvmm`,
/// `agentctl` and the shell helpers `guest.sh`.
pub fn guest_host(opts: &mcvmm_lab::HostOptions) -> Result<mcvmm_lab::KvmHost, String> {
    let e = |e: &dyn std::fmt::Display| e.to_string();
    let host = loop {
        match mcvmm_lab::KvmHost::acquire(opts) {
            Ok(host) => break host,
            Err(mcvmm_lab::LabError::Host(x)) if failed_in_boot_by_the_lab(&x) => {
                if !retry::allow(retry::Cause::HostDied, &x.to_string()) {
                    return Err(format!("no KVM host: {x}"));
                }
            }
            Err(x) => return Err(format!("no KVM host: {x}")),
        }
    };
    let images = mcvmm_lab::reference::GuestImages::locate().map_err(|x| e(&x))?;
    for (local, dest) in images.files() {
        host.put_file(&local, &dest).map_err(|x| e(&x))?;
    }
    for (name, dest) in [("mcvmm", "mcvmm"), ("mcvmm-agentctl", "agentctl")] {
        let bin = mcvmm_lab::assets::workspace_binary(name).map_err(|x| e(&x))?;
        host.put_binary(&bin, dest).map_err(|x| e(&x))?;
    }
    host.put_file(&repo_root().join("tests/scripts/guest.sh"), "guest.sh")
        .map_err(|x| e(&x))?;
    Ok(host)
}

/// Runs `script` on `host` within `secs`; its stdout, or an error with both streams when
/// it fails.
pub fn run_script(host: &mcvmm_lab::KvmHost, script: &str, secs: u64) -> Result<String, String> {
    let out = host
        .run(script, std::time::Duration::from_secs(secs))
        .map_err(|e| e.to_string())?;
    if !out.success() {
        return Err(format!(
            "script failed ({}):\n{}{}",
            out.status,
            out.stdout_text(),
            out.stderr_text()
        ));
    }
    Ok(out.stdout_text())
}

/// A small deterministic generator (xorshift): the drills print their seed, so a run can
/// be replayed.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed | 1)
    }

    /// A number below `n` (0 if `n` is 0).
    pub fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }

    /// A number from `lo` to `hi`, both included.
    pub fn between(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.below(hi - lo + 1)
    }
}
