//! What a test host is made of: Debian's cloud kernel and its modules (downloaded once and
//! cached), busybox, the lab daemon, and the initramfs layers built from them.

use std::collections::BTreeSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::cpio::CpioWriter;

/// Modules a test host loads at boot, dependencies first (checked against `depends=`).
const HOST_MODULES: &[&str] = &[
    "irqbypass",
    "kvm",
    "kvm-amd",
    "virtio_ring",
    "virtio",
    "virtio_pci_legacy_dev",
    "virtio_pci_modern_dev",
    "virtio_pci",
    "virtio_console",
    "failover",
    "net_failover",
    "virtio_net",
    "virtio_blk",
    "llc",
    "stp",
    "bridge",
    "tun",
    "veth",
    // netem, for tests that slow a test host's link (`tc qdisc ... netem delay`).
    "sch_netem",
    // A disk that starts failing: a file system on a device-mapper device over a loop
    // device, whose table is switched to `error` (the replica EIO test).
    "loop",
    "dm-mod",
];

/// Firmware QEMU needs for `-M microvm` with `-kernel`.
const QEMU_DATA: &[&str] = &[
    "/usr/share/qemu/qboot.rom",
    "/usr/share/qemu/bios-microvm.bin",
    "/usr/share/qemu/pvh.bin",
    "/usr/share/qemu/linuxboot_dma.bin",
];

#[derive(Debug, thiserror::Error)]
pub enum AssetError {
    #[error("{what} not found at {path}; {fix}")]
    Missing {
        what: &'static str,
        path: PathBuf,
        fix: &'static str,
    },
    #[error("{0}")]
    Fetch(String),
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("module {module}: {why}")]
    Module { module: String, why: String },
}

fn io_err(path: &Path) -> impl FnOnce(std::io::Error) -> AssetError + '_ {
    move |source| AssetError::Io {
        path: path.to_path_buf(),
        source,
    }
}

/// Root of everything cached between runs (`MCVMM_CACHE`, default `~/.cache/mcvmm`).
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MCVMM_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/var/cache"));
    base.join("mcvmm")
}

/// The workspace root, for finding `guest-images/out` and `target/` from any binary.
pub fn workspace_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// A binary of this workspace, next to the running executable (or one level up, for test
/// executables in `target/*/deps`). `MCVMM_<NAME>` overrides, e.g. `MCVMM_LABD`.
pub fn workspace_binary(name: &str) -> Result<PathBuf, AssetError> {
    let var = format!(
        "MCVMM_{}",
        name.trim_start_matches("mcvmm-")
            .to_uppercase()
            .replace('-', "_")
    );
    if let Some(p) = std::env::var_os(&var) {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe().unwrap_or_default();
    let mut dir = exe.parent();
    for _ in 0..2 {
        let Some(d) = dir else { break };
        let candidate = d.join(name);
        if candidate.is_file() {
            return Ok(candidate);
        }
        dir = d.parent();
    }
    Err(AssetError::Missing {
        what: "workspace binary",
        path: PathBuf::from(name),
        fix: "run `cargo build --workspace` first, or set the MCVMM_* variable naming it",
    })
}

/// Is `tool` an executable file in one of the PATH folders?
pub fn in_path(tool: &str) -> bool {
    std::env::var_os("PATH")
        .is_some_and(|paths| std::env::split_paths(&paths).any(|d| d.join(tool).is_file()))
}

/// The test hosts' kernel release: one Debian cloud kernel, pinned, so that every machine
/// and every CI run tests on the same nested KVM and a failure is not read against a lab
/// that changed by itself. 6.1.0-48 (6.1.172-1) is the release the lab was first verified
/// with. The pin does not cure test host freezes: a newer release froze too
/// (docs/lab-notes.md, "The kernel pin"). `MCVMM_LAB_HOST_KERNEL` names another release.
pub const PINNED_HOST_KERNEL: &str = "6.1.0-48-cloud-amd64";

/// The release the lab uses, and whether the operator named it: `MCVMM_LAB_HOST_KERNEL`,
/// else the pin.
pub fn wanted_host_kernel() -> (String, bool) {
    match std::env::var("MCVMM_LAB_HOST_KERNEL") {
        Ok(r) if !r.trim().is_empty() => (r.trim().to_string(), true),
        _ => (PINNED_HOST_KERNEL.to_string(), false),
    }
}

/// The test hosts' kernel: Debian's `linux-image-RELEASE`, unpacked in the cache.
pub struct HostKernel {
    pub vmlinuz: PathBuf,
    pub modules: PathBuf,
    pub release: String,
}

impl HostKernel {
    pub fn dir() -> PathBuf {
        cache_dir().join("lab").join("host-kernel")
    }

    /// The cached kernel, if `fetch` ran before (whatever its release).
    pub fn cached() -> Result<HostKernel, AssetError> {
        let dir = Self::dir();
        let release = std::fs::read_to_string(dir.join("release"))
            .map_err(|_| AssetError::Missing {
                what: "test host kernel",
                path: dir.clone(),
                fix: "run `mcvmm-lab setup` (it downloads the pinned Debian cloud kernel)",
            })?
            .trim()
            .to_string();
        Ok(HostKernel {
            vmlinuz: dir.join("boot").join(format!("vmlinuz-{release}")),
            modules: dir.join("lib/modules").join(&release),
            release,
        })
    }

    /// The release Debian's `linux-image-cloud-amd64` metapackage names now.
    pub fn current_release() -> Result<String, AssetError> {
        let out = Command::new("apt-cache")
            .args(["depends", "--no-recommends", "linux-image-cloud-amd64"])
            .output()
            .map_err(|e| AssetError::Fetch(format!("apt-cache: {e} (is it installed?)")))?;
        String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| l.trim().strip_prefix("Depends: linux-image-"))
            .find(|r| r.ends_with("-cloud-amd64"))
            .map(str::to_string)
            .ok_or_else(|| {
                AssetError::Fetch(
                    "apt knows no linux-image-cloud-amd64 (run apt-get update)".into(),
                )
            })
    }

    /// Downloads and unpacks Debian's `linux-image-RELEASE` (through apt) into the cache,
    /// in place of what was there.
    pub fn fetch(release: &str) -> Result<HostKernel, AssetError> {
        let dir = Self::dir();
        let dl = cache_dir().join("lab").join("download");
        std::fs::create_dir_all(&dl).map_err(io_err(&dl))?;
        let run = |args: &[&str], cwd: &Path| -> Result<String, AssetError> {
            let out = Command::new(args[0])
                .args(&args[1..])
                .current_dir(cwd)
                .output()
                .map_err(|e| AssetError::Fetch(format!("{}: {e} (is it installed?)", args[0])))?;
            if !out.status.success() {
                return Err(AssetError::Fetch(format!(
                    "`{}` failed: {}",
                    args.join(" "),
                    String::from_utf8_lossy(&out.stderr).trim()
                )));
            }
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        };
        let package = format!("linux-image-{release}");
        run(&["apt-get", "download", &package], &dl).map_err(|e| {
            AssetError::Fetch(format!(
                "{e} (apt-get update first; `apt-cache search linux-image-6.1.0` lists the releases apt has, for MCVMM_LAB_HOST_KERNEL)"
            ))
        })?;
        let deb = std::fs::read_dir(&dl)
            .map_err(io_err(&dl))?
            .flatten()
            .map(|e| e.path())
            .find(|p| {
                p.file_name()
                    .and_then(|n| n.to_str())
                    .is_some_and(|n| n.starts_with(&format!("{package}_")) && n.ends_with(".deb"))
            })
            .ok_or_else(|| AssetError::Fetch(format!("apt-get download {package} left no .deb")))?;
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io_err(&dir))?;
        run(
            &[
                "dpkg-deb",
                "-x",
                &deb.to_string_lossy(),
                &dir.to_string_lossy(),
            ],
            &dl,
        )?;
        std::fs::write(dir.join("release"), release).map_err(io_err(&dir))?;
        let _ = std::fs::remove_dir_all(&dl);
        Self::cached()
    }

    fn module_path(&self, name: &str) -> Result<PathBuf, AssetError> {
        let file = format!("{name}.ko");
        let alt = format!("{}.ko", name.replace('-', "_"));
        find_file(&self.modules.join("kernel"), &[&file, &alt]).ok_or_else(|| AssetError::Module {
            module: name.into(),
            why: format!("not in {}", self.modules.display()),
        })
    }
}

fn find_file(dir: &Path, names: &[&str]) -> Option<PathBuf> {
    for entry in std::fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        if p.is_dir() {
            if let Some(found) = find_file(&p, names) {
                return Some(found);
            }
        } else if p
            .file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| names.contains(&n))
        {
            return Some(p);
        }
    }
    None
}

/// The `depends=` list of a module, read from its `.modinfo` strings.
fn module_depends(ko: &[u8]) -> Vec<String> {
    ko.split(|&b| b == 0)
        .find_map(|s| s.strip_prefix(b"depends="))
        .map(|d| {
            String::from_utf8_lossy(d)
                .split(',')
                .filter(|s| !s.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default()
}

/// A binary and the shared libraries `ldd` says it loads, as (path in the image, host path).
pub fn with_libraries(binary: &Path) -> Result<Vec<PathBuf>, AssetError> {
    if !binary.is_file() {
        return Err(AssetError::Missing {
            what: "file to copy",
            path: binary.to_path_buf(),
            fix: "check the path",
        });
    }
    let mut files = vec![binary.to_path_buf()];
    let out = Command::new("ldd")
        .arg(binary)
        .output()
        .map_err(|e| AssetError::Fetch(format!("ldd: {e}")))?;
    // ldd exits non-zero for static binaries ("not a dynamic executable"): nothing to add.
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let path = match line.split_once("=>") {
            Some((_, rest)) => rest.split_whitespace().next(),
            None => line
                .split_whitespace()
                .next()
                .filter(|p| p.starts_with('/')),
        };
        if let Some(p) = path.filter(|p| p.starts_with('/')) {
            files.push(PathBuf::from(p));
        }
    }
    Ok(files)
}

/// Builds initramfs layers; concatenated, they are one initramfs to the kernel.
pub struct ImageBuilder<W: Write> {
    cpio: CpioWriter<W>,
    added: BTreeSet<String>,
}

impl<W: Write> ImageBuilder<W> {
    pub fn new(out: W) -> Self {
        ImageBuilder {
            cpio: CpioWriter::new(out),
            added: BTreeSet::new(),
        }
    }

    /// Copies a host file into the image (symlinks followed, contents stored).
    pub fn copy(&mut self, host: &Path, dest: &str, mode: u32) -> Result<(), AssetError> {
        if !self.added.insert(dest.to_string()) {
            return Ok(());
        }
        let data = std::fs::read(host).map_err(io_err(host))?;
        self.cpio.file(dest, mode, &data).map_err(io_err(host))
    }

    /// A binary at `dest` with its libraries at their host paths.
    pub fn binary(&mut self, host: &Path, dest: &str) -> Result<(), AssetError> {
        let files = with_libraries(host)?;
        self.copy(&files[0], dest, 0o755)?;
        for lib in &files[1..] {
            self.copy(lib, &lib.to_string_lossy(), 0o755)?;
        }
        Ok(())
    }

    pub fn data(&mut self, dest: &str, mode: u32, data: &[u8]) -> Result<(), AssetError> {
        self.added.insert(dest.to_string());
        self.cpio
            .file(dest, mode, data)
            .map_err(io_err(Path::new(dest)))
    }

    pub fn finish(self) -> Result<W, AssetError> {
        self.cpio.finish().map_err(io_err(Path::new("initramfs")))
    }

    /// The base of every test host: busybox, iproute2, kernel modules, labd, /init.
    pub fn base(&mut self, kernel: &HostKernel, labd: &Path) -> Result<(), AssetError> {
        let busybox = Path::new("/bin/busybox");
        if !busybox.is_file() {
            return Err(AssetError::Missing {
                what: "busybox",
                path: busybox.into(),
                fix: "install Debian package busybox-static (scripts/setup.sh does)",
            });
        }
        self.copy(busybox, "/bin/busybox", 0o755)?;
        self.binary(Path::new("/usr/sbin/ip"), "/usr/sbin/ip")?;
        self.binary(Path::new("/usr/sbin/tc"), "/usr/sbin/tc")?;
        self.binary(Path::new("/usr/sbin/dmsetup"), "/usr/sbin/dmsetup")?;
        // busybox's own sh runs its applets before anything in PATH (so `ip` would be
        // busybox's, without netns or tuntap): commands get dash as /bin/sh instead.
        self.binary(Path::new("/bin/dash"), "/bin/sh")?;
        self.binary(labd, "/usr/bin/mcvmm-labd")?;
        self.cpio
            .char_dev("/dev/console", 0o600, 5, 1)
            .map_err(io_err(Path::new("/dev/console")))?;
        let mut loaded: Vec<&str> = Vec::new();
        for name in HOST_MODULES {
            let path = kernel.module_path(name)?;
            let ko = std::fs::read(&path).map_err(io_err(&path))?;
            for dep in module_depends(&ko) {
                if !loaded
                    .iter()
                    .any(|l| l.replace('-', "_") == dep.replace('-', "_"))
                {
                    return Err(AssetError::Module {
                        module: name.to_string(),
                        why: format!("depends on {dep}, which is not loaded before it"),
                    });
                }
            }
            self.data(&format!("/lib/modules/{name}.ko"), 0o644, &ko)?;
            loaded.push(name);
        }
        self.data("/etc/lab/modules", 0o644, loaded.join("\n").as_bytes())?;
        self.data("/init", 0o755, HOST_INIT.as_bytes())
    }

    /// QEMU and its firmware, for the reference VMM inside a test host.
    pub fn qemu(&mut self) -> Result<(), AssetError> {
        let qemu = Path::new("/usr/bin/qemu-system-x86_64");
        if !qemu.is_file() {
            return Err(AssetError::Missing {
                what: "QEMU",
                path: qemu.into(),
                fix: "install Debian package qemu-system-x86 (scripts/setup.sh does)",
            });
        }
        self.binary(qemu, "/usr/bin/qemu-system-x86_64")?;
        for f in QEMU_DATA {
            self.copy(Path::new(f), f, 0o644)?;
        }
        Ok(())
    }
}

/// PID 1 of a test host (busybox sh). Kernel parameters: `lab.name=`, `lab.ip=A.B.C.D/N`.
const HOST_INIT: &str = r#"#!/bin/busybox sh
export PATH=/usr/sbin:/usr/bin:/sbin:/bin
/bin/busybox mkdir -p /proc /sys /dev /tmp /run /work /sbin /usr/bin /usr/sbin /var
/bin/busybox --install -s
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev 2>/dev/null
mkdir -p /dev/pts /dev/shm /run/netns
mount -t devpts devpts /dev/pts
mount -t tmpfs tmpfs /dev/shm
mount -t tmpfs tmpfs /run
mkdir -p /run/netns
ln -s /run /var/run
for m in $(cat /etc/lab/modules); do
    insmod /lib/modules/$m.ko || echo "lab-host: insmod $m failed"
done
# The guests' KVM exits, kept for a lost guest's evidence: at a triple fault AMD's KVM
# resets the vCPU before its VMM can read it, and only this trace keeps where it was.
# Shutdown exits go to an instance of their own, so that later exits never push them out.
t=/sys/kernel/tracing
mount -t tracefs nodev $t 2>/dev/null
if [ -d $t/events/kvm/kvm_exit ]; then
    mkdir -p $t/instances/shutdowns
    echo 'exit_reason == 127' > $t/instances/shutdowns/events/kvm/kvm_exit/filter
    echo 1 > $t/instances/shutdowns/events/kvm/kvm_exit/enable
    echo 512 > $t/buffer_size_kb
    for e in kvm_exit kvm_inj_virq kvm_inj_exception kvm_userspace_exit; do
        echo 1 > $t/events/kvm/$e/enable
    done
else
    echo "lab-host: no KVM trace events: a lost guest's evidence will lack its last exits"
fi
arg() { sed -n "s/.*$1=\([^ ]*\).*/\1/p" /proc/cmdline; }
hostname "$(arg lab.name)"
ip=/usr/sbin/ip
$ip link set lo up
addr=$(arg lab.ip)
if [ -n "$addr" ]; then
    # eth0 joins a bridge so that taps added to br0 later (guests) are on the lab network.
    # Its address is eth0's for good: a bridge otherwise takes the lowest of its ports'
    # addresses, and a tap added later with a lower one would change the host's MAC
    # under its neighbours' ARP caches (seen: connections to a host failing for 20-30 s
    # after a guest's tap was added there).
    $ip link add br0 address "$(cat /sys/class/net/eth0/address)" type bridge forward_delay 0 stp_state 0
    $ip link set eth0 master br0
    $ip link set eth0 up
    $ip addr add "$addr" dev br0
    $ip link set br0 up
fi
if [ -c /dev/kvm ]; then kvm=ready; else kvm=missing; fi
echo "lab-host: $(hostname) up, /dev/kvm $kvm, npt=$(cat /sys/module/kvm_amd/parameters/npt 2>/dev/null)"
exec /usr/bin/mcvmm-labd --init
"#;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_module_depends() {
        let ko = b"\x7fELF junk\0license=GPL\0depends=virtio,virtio_ring\0intree=Y\0";
        assert_eq!(module_depends(ko), vec!["virtio", "virtio_ring"]);
        assert!(module_depends(b"depends=\0").is_empty());
    }

    #[test]
    fn libraries_of_a_dynamic_binary_include_libc() {
        let files = with_libraries(Path::new("/bin/sh")).expect("sh");
        assert!(
            files
                .iter()
                .any(|p| p.to_string_lossy().contains("libc.so")),
            "{files:?}"
        );
        assert!(with_libraries(Path::new("/no/such/file")).is_err());
    }
}
