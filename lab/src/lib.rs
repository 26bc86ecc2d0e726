//! The mcvmm lab: Linux test hosts under QEMU's TCG with nested SVM (a real `kvm_amd`
//! inside), for developing and testing a KVM VMM on machines whose own `/dev/kvm` cannot
//! boot Linux guests. How it works: docs/reference.md; what it has shown: docs/lab-notes.md.
//!
//! ```no_run
//! use std::time::Duration;
//! let lab = mcvmm_lab::Lab::start(&mcvmm_lab::LabOptions::default())?;
//! let out = lab.host(0).run("ls -l /dev/kvm", Duration::from_secs(10))?;
//! assert!(out.success());
//! # Ok::<(), mcvmm_lab::LabError>(())
//! ```

pub mod assets;
pub mod cleanup;
pub mod cpio;
pub mod diagnose;
pub mod emulator;
pub mod exec;
pub mod host;
pub mod kvm;
pub mod net;
pub mod reference;
pub mod wire;

use std::time::{Duration, Instant};

pub use emulator::Emulator;
pub use host::{HostOptions, Output, Stream, TestHost};
pub use kvm::KvmHost;
pub use net::LabNet;

use assets::HostKernel;

#[derive(Debug, thiserror::Error)]
pub enum LabError {
    #[error(transparent)]
    Asset(#[from] assets::AssetError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error(transparent)]
    Host(#[from] host::HostError),
    #[error(transparent)]
    Emulator(#[from] emulator::EmulatorError),
    #[error("{0}")]
    Check(String),
}

#[derive(Debug, Clone)]
pub struct LabOptions {
    pub hosts: usize,
    /// Join the hosts on a lab network (a bridge in a namespace the lab creates).
    pub network: bool,
    pub host: HostOptions,
}

impl Default for LabOptions {
    fn default() -> Self {
        LabOptions {
            hosts: 1,
            network: false,
            host: HostOptions::default(),
        }
    }
}

/// Test hosts, and the network joining them; all of it goes when this is dropped.
pub struct Lab {
    // Hosts before the network: QEMU holds the taps.
    hosts: Vec<TestHost>,
    net: Option<LabNet>,
    pub boot_time: Duration,
}

/// The cached test host kernel, downloaded when the cache has none or another release
/// than the one wanted (see `assets::PINNED_HOST_KERNEL`). When Debian no longer offers
/// the pinned release, the lab goes on with what it has, or with Debian's current cloud
/// kernel, and says so: a machine must not become unable to test because an old package
/// left the archive. A release named in `MCVMM_LAB_HOST_KERNEL` is that or nothing.
pub fn host_kernel() -> Result<HostKernel, LabError> {
    let (wanted, explicit) = assets::wanted_host_kernel();
    let cached = HostKernel::cached().ok();
    let had = match cached {
        Some(k) if k.release == wanted => return Ok(k),
        Some(ref k) => format!(" (the cache has {})", k.release),
        None => String::new(),
    };
    eprintln!("mcvmm-lab: downloading the test host kernel, Debian linux-image-{wanted}{had}");
    let e = match HostKernel::fetch(&wanted) {
        Ok(k) => return Ok(k),
        Err(e) if explicit => return Err(e.into()),
        Err(e) => e,
    };
    let instead = match cached {
        Some(k) => k,
        None => HostKernel::fetch(&HostKernel::current_release()?)?,
    };
    eprintln!(
        "mcvmm-lab: WARNING: {e}\nmcvmm-lab: WARNING: test hosts run {} instead of the pinned {wanted}",
        instead.release
    );
    Ok(instead)
}

impl Lab {
    pub fn start(opts: &LabOptions) -> Result<Lab, LabError> {
        if opts.hosts == 0 || opts.hosts > 8 {
            return Err(LabError::Check(format!(
                "{} test hosts: the lab runs 1 to 8",
                opts.hosts
            )));
        }
        // What the lab runs is there, or the error says how to get it, before anything
        // starts: the emulator (by its path), and the tools it runs by name.
        opts.host.emulator()?.command()?;
        let tools: &[&str] = if opts.network {
            &["ldd", "ip"]
        } else {
            &["ldd"]
        };
        for tool in tools {
            if !assets::in_path(tool) {
                return Err(LabError::Check(format!(
                    "{tool} not found in PATH (scripts/setup.sh installs what the lab needs)"
                )));
            }
        }
        cleanup::remove_stale();
        let kernel = host_kernel()?;
        let labd = assets::workspace_binary("mcvmm-labd")?;
        let net = if opts.network {
            Some(LabNet::create(opts.hosts)?)
        } else {
            None
        };
        let started = Instant::now();
        let results: Vec<Result<TestHost, host::HostError>> = std::thread::scope(|s| {
            let handles: Vec<_> = (0..opts.hosts)
                .map(|i| {
                    let (kernel, labd, net) = (&kernel, &labd, net.as_ref());
                    s.spawn(move || TestHost::boot(i, &opts.host, kernel, labd, net))
                })
                .collect();
            handles
                .into_iter()
                .map(|h| h.join().unwrap_or_else(|p| std::panic::resume_unwind(p)))
                .collect()
        });
        let mut hosts = Vec::new();
        for r in results {
            hosts.push(r?);
        }
        Ok(Lab {
            hosts,
            net,
            boot_time: started.elapsed(),
        })
    }

    pub fn host(&self, i: usize) -> &TestHost {
        &self.hosts[i]
    }

    pub fn hosts(&self) -> &[TestHost] {
        &self.hosts
    }

    pub fn net(&self) -> Option<&LabNet> {
        self.net.as_ref()
    }
}
