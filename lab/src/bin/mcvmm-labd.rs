//! mcvmm-labd: runs inside a lab test host and answers the lab's requests (see
//! `mcvmm_lab::wire`) on the virtio-serial port named `mcvmm.lab`.
//!
//! Relative paths and commands are taken from `/work`.

use std::fs::{File, OpenOptions};
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use mcvmm_lab::exec;
use mcvmm_lab::wire::{self, Kind, WireError};
use mcvmm_lab::Stream;

const PORT_NAME: &str = "mcvmm.lab";
const WORK: &str = "/work";

fn find_port() -> Option<PathBuf> {
    for entry in std::fs::read_dir("/sys/class/virtio-ports").ok()?.flatten() {
        let name = std::fs::read_to_string(entry.path().join("name")).unwrap_or_default();
        if name.trim() == PORT_NAME {
            return Some(Path::new("/dev").join(entry.file_name()));
        }
    }
    None
}

fn main() {
    if std::env::args().nth(1).as_deref() == Some("--init") {
        reaper();
    }
    let start = Instant::now();
    let port = loop {
        if let Some(p) = find_port() {
            break p;
        }
        if start.elapsed() > Duration::from_secs(30) {
            eprintln!("mcvmm-labd: no virtio-serial port named {PORT_NAME}");
            std::process::exit(1);
        }
        std::thread::sleep(Duration::from_millis(20));
    };
    let _ = std::fs::create_dir_all(WORK);
    match hold_kvm_static_keys() {
        Ok(()) => {
            eprintln!("mcvmm-labd: holding a KVM VM with one vCPU open (see hold_kvm_static_keys)")
        }
        Err(e) => eprintln!("mcvmm-labd: WARNING: could not hold a KVM VM open: {e}"),
    }
    loop {
        let file = match OpenOptions::new().read(true).write(true).open(&port) {
            Ok(f) => f,
            Err(e) => {
                eprintln!("mcvmm-labd: open {}: {e}", port.display());
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        eprintln!("mcvmm-labd: serving on {}", port.display());
        match serve(file) {
            // The lab is not connected (yet, or any more): the port reads as end of file.
            Err(WireError::Closed) => std::thread::sleep(Duration::from_millis(50)),
            Err(e) => eprintln!("mcvmm-labd: {e}"),
            Ok(()) => {}
        }
    }
}

/// Keeps a VM with an in-kernel irqchip and one vCPU (never run) open for the host's
/// lifetime. The host kernel switches some static keys on its first VM and vCPU and off
/// after its last: the preempt notifiers tested in `__schedule`, the local APIC's
/// "software disabled" key. Each switch patches kernel code while the other CPU may be
/// running it, and TCG's multi-threaded emulation sometimes loses such a patch: both CPUs
/// were found spinning for good between `__schedule` and the int3 handler the patch left
/// there, after many starts of a VM that failed at once: the lab's "test host froze"
/// (docs/lab-notes.md). With a VM always open, the count never drops to zero and those
/// keys are never switched again.
fn hold_kvm_static_keys() -> std::io::Result<()> {
    const KVM_CREATE_VM: libc::c_ulong = 0xae01;
    const KVM_CREATE_IRQCHIP: libc::c_ulong = 0xae60;
    const KVM_CREATE_VCPU: libc::c_ulong = 0xae41;
    let kvm = OpenOptions::new().read(true).write(true).open("/dev/kvm")?;
    let ioctl = |fd: i32, request: libc::c_ulong| {
        // SAFETY: KVM ioctls that take an integer argument (0) and write no memory.
        let r = unsafe { libc::ioctl(fd, request, 0) };
        if r < 0 {
            Err(std::io::Error::last_os_error())
        } else {
            Ok(r)
        }
    };
    // SAFETY: KVM_CREATE_VM returned a fresh descriptor owned here alone.
    let vm = unsafe { OwnedFd::from_raw_fd(ioctl(kvm.as_raw_fd(), KVM_CREATE_VM)?) };
    ioctl(vm.as_raw_fd(), KVM_CREATE_IRQCHIP)?;
    // Both stay open until this process ends, with the host (KVM makes them close-on-exec,
    // so no command gets a copy).
    ioctl(vm.as_raw_fd(), KVM_CREATE_VCPU)?;
    let _ = vm.into_raw_fd();
    Ok(())
}

/// PID 1 of a test host: runs the server as a child and reaps every process orphaned to
/// it (a guest's QEMU started in the background by one command and waited for by the next
/// must not linger as a zombie).
fn reaper() -> ! {
    loop {
        let server = match std::process::Command::new("/usr/bin/mcvmm-labd").spawn() {
            Ok(child) => child.id() as libc::pid_t,
            Err(e) => {
                eprintln!("mcvmm-labd: starting the server: {e}");
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
        };
        loop {
            let mut status = 0;
            // SAFETY: `status` is a valid out pointer.
            let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
            if pid == server {
                eprintln!("mcvmm-labd: server exited (wait status {status:#x}), restarting");
                break;
            }
            if pid < 0 {
                std::thread::sleep(Duration::from_millis(100));
            }
        }
    }
}

fn serve(mut port: File) -> Result<(), WireError> {
    let mut out = port.try_clone()?;
    loop {
        let (kind, payload) = wire::read_frame(&mut port)?;
        match kind {
            Kind::Ping => {
                wire::write_frame(&mut out, Kind::Ok, &[env!("CARGO_PKG_VERSION").as_bytes()])?
            }
            Kind::Put => {
                let (mode, path, data) = wire::decode_put(&payload)?;
                reply(&mut out, put(&path, mode, data))?;
            }
            Kind::Get => {
                let path = String::from_utf8_lossy(&payload).into_owned();
                match std::fs::read(Path::new(WORK).join(&path)) {
                    Ok(data) => wire::write_frame(&mut out, Kind::Ok, &[&data])?,
                    Err(e) => wire::write_frame(
                        &mut out,
                        Kind::Err,
                        &[format!("{path}: {e}").as_bytes()],
                    )?,
                }
            }
            Kind::Run => {
                let (timeout_ms, cmd) = wire::decode_run(&payload)?;
                if let Err(e) = run(&mut out, &cmd, Duration::from_millis(timeout_ms.into())) {
                    wire::write_frame(&mut out, Kind::Err, &[e.as_bytes()])?;
                }
            }
            other => {
                let msg = format!("unexpected request {other:?}");
                wire::write_frame(&mut out, Kind::Err, &[msg.as_bytes()])?;
            }
        }
    }
}

fn reply(out: &mut File, r: Result<(), String>) -> Result<(), WireError> {
    match r {
        Ok(()) => wire::write_frame(out, Kind::Ok, &[]),
        Err(e) => wire::write_frame(out, Kind::Err, &[e.as_bytes()]),
    }
}

fn put(path: &str, mode: u32, data: &[u8]) -> Result<(), String> {
    let full = Path::new(WORK).join(path);
    if let Some(parent) = full.parent() {
        std::fs::create_dir_all(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    let tmp = full.with_extension("labd-partial");
    std::fs::write(&tmp, data).map_err(|e| format!("{}: {e}", full.display()))?;
    std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(mode))
        .map_err(|e| format!("{}: {e}", full.display()))?;
    std::fs::rename(&tmp, &full).map_err(|e| format!("{}: {e}", full.display()))
}

fn run(out: &mut File, cmd: &str, timeout: Duration) -> Result<(), String> {
    let (code, timed_out) = exec::run_shell(cmd, Path::new(WORK), timeout, &mut |stream, data| {
        let kind = match stream {
            Stream::Stdout => Kind::Stdout,
            Stream::Stderr => Kind::Stderr,
        };
        wire::write_frame(out, kind, &[data]).map_err(std::io::Error::other)
    })
    .map_err(|e| format!("running {cmd:?}: {e}"))?;
    wire::write_frame(out, Kind::Exit, &[&wire::encode_exit(code, timed_out)])
        .map_err(|e| e.to_string())
}
