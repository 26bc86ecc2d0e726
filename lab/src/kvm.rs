//! "On a KVM host": where tests that need hardware-assisted KVM run their commands.
//!
//! Directly on this machine when its `/dev/kvm` is hardware KVM (`kvm_intel` or `kvm_amd`
//! loaded), inside a lab test host otherwise; the test's code is the same either way.
//! The unit of work is a shell command run in a work folder with files put there first:
//! commands are what can run in both places.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::cleanup::{self, Registered, Resource};
use crate::host::{HostOptions, Output, Stream};
use crate::{Lab, LabError, LabOptions};

/// Is this machine's `/dev/kvm` backed by VMX/SVM (not a software backend such as kvm_pvm)?
pub fn hardware_kvm() -> bool {
    Path::new("/dev/kvm").exists()
        && (Path::new("/sys/module/kvm_intel").exists()
            || Path::new("/sys/module/kvm_amd").exists())
}

pub enum KvmHost {
    Local { work: PathBuf, _dir: Registered },
    Lab(Lab),
}

impl KvmHost {
    /// Local hardware KVM if there is one (unless `MCVMM_LAB=1` forces the lab), else a
    /// lab test host with `opts`.
    pub fn acquire(opts: &HostOptions) -> Result<KvmHost, LabError> {
        let forced = std::env::var("MCVMM_LAB").is_ok_and(|v| v == "1");
        if hardware_kvm() && !forced {
            let work = std::env::temp_dir().join(format!("{}local", cleanup::prefix()));
            std::fs::create_dir_all(&work)
                .map_err(|e| LabError::Check(format!("{}: {e}", work.display())))?;
            return Ok(KvmHost::Local {
                _dir: cleanup::register(Resource::Dir(work.clone())),
                work,
            });
        }
        let lab = Lab::start(&LabOptions {
            hosts: 1,
            network: false,
            host: opts.clone(),
        })?;
        let kvm = lab
            .host(0)
            .run("test -c /dev/kvm", Duration::from_secs(10))?;
        if !kvm.success() {
            return Err(LabError::Check(format!(
                "the test host has no /dev/kvm; console:\n{}",
                lab.host(0).console_tail()
            )));
        }
        Ok(KvmHost::Lab(lab))
    }

    pub fn describe(&self) -> &'static str {
        match self {
            KvmHost::Local { .. } => "local hardware KVM",
            KvmHost::Lab(_) => "lab test host (nested KVM under TCG)",
        }
    }

    pub fn run_streaming(
        &self,
        command: &str,
        timeout: Duration,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<Output, LabError> {
        match self {
            KvmHost::Lab(lab) => Ok(lab.host(0).run_streaming(command, timeout, on_output)?),
            KvmHost::Local { work, .. } => {
                let (mut stdout, mut stderr) = (Vec::new(), Vec::new());
                let (status, timed_out) =
                    crate::exec::run_shell(command, work, timeout, &mut |s, d| {
                        on_output(s, d);
                        match s {
                            Stream::Stdout => stdout.extend_from_slice(d),
                            Stream::Stderr => stderr.extend_from_slice(d),
                        }
                        Ok(())
                    })
                    .map_err(|e| LabError::Check(format!("running {command:?}: {e}")))?;
                Ok(Output {
                    status,
                    timed_out,
                    stdout,
                    stderr,
                })
            }
        }
    }

    pub fn run(&self, command: &str, timeout: Duration) -> Result<Output, LabError> {
        self.run_streaming(command, timeout, &mut |_, _| {})
    }

    /// The end of the test host's console (nothing for local KVM).
    pub fn console_tail(&self) -> String {
        match self {
            KvmHost::Local { .. } => String::new(),
            KvmHost::Lab(lab) => lab.host(0).console_tail(),
        }
    }

    /// The test hosts behind this (none for local KVM).
    pub fn test_hosts(&self) -> &[crate::TestHost] {
        match self {
            KvmHost::Local { .. } => &[],
            KvmHost::Lab(lab) => lab.hosts(),
        }
    }

    /// Whether the test host's kernel reported a CPU stuck in it (see
    /// `TestHost::kernel_stall`); local KVM is trusted.
    pub fn kernel_stall(&self) -> Option<String> {
        match self {
            KvmHost::Local { .. } => None,
            KvmHost::Lab(lab) => lab.host(0).kernel_stall(),
        }
    }

    fn local_path(work: &Path, dest: &str) -> Result<PathBuf, LabError> {
        if dest.starts_with('/') || dest.split('/').any(|c| c == "..") {
            return Err(LabError::Check(format!(
                "{dest}: files on a KVM host go under its work folder (relative paths only)"
            )));
        }
        Ok(work.join(dest))
    }

    /// Copies a local file into the work folder.
    pub fn put_file(&self, local: &Path, dest: &str) -> Result<(), LabError> {
        match self {
            KvmHost::Lab(lab) => Ok(lab.host(0).put_file(local, dest)?),
            KvmHost::Local { work, .. } => {
                let to = Self::local_path(work, dest)?;
                if let Some(p) = to.parent() {
                    std::fs::create_dir_all(p)
                        .map_err(|e| LabError::Check(format!("{}: {e}", p.display())))?;
                }
                std::fs::copy(local, &to)
                    .map(|_| ())
                    .map_err(|e| LabError::Check(format!("copying {}: {e}", local.display())))
            }
        }
    }

    /// Copies a binary in with the libraries it needs there.
    pub fn put_binary(&self, local: &Path, dest: &str) -> Result<(), LabError> {
        match self {
            KvmHost::Lab(lab) => Ok(lab.host(0).put_binary(local, dest)?),
            KvmHost::Local { .. } => self.put_file(local, dest),
        }
    }

    pub fn get(&self, path: &str) -> Result<Vec<u8>, LabError> {
        match self {
            KvmHost::Lab(lab) => Ok(lab.host(0).get(path)?),
            KvmHost::Local { work, .. } => {
                let p = Self::local_path(work, path)?;
                std::fs::read(&p).map_err(|e| LabError::Check(format!("{}: {e}", p.display())))
            }
        }
    }
}
