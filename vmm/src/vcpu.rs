//! vCPUs: CPUID and initial state, and one thread each running `KVM_RUN`, handling port
//! and MMIO exits through the buses, and reporting how the guest ended.

use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;

use kvm_bindings::CpuId;
use kvm_ioctls::{VcpuExit, VcpuFd};
use mcvmm_devices::bus::Bus;
use vmm_sys_util::eventfd::EventFd;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042) or a power-off: a clean end.
    GuestEnded(&'static str),
    /// A triple fault: the guest crashed.
    TripleFault { vcpu: u8 },
    /// KVM could not run the vCPU.
    Failed { vcpu: u8, why: String },
    /// SIGTERM/SIGINT or `ctl stop`.
    Stopped,
}

/// The first reason wins; the eventfd wakes the device loop.
pub struct VmExit {
    pub evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
}

impl VmExit {
    pub fn new() -> std::io::Result<VmExit> {
        Ok(VmExit {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
        })
    }

    pub fn set(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// This vCPU's CPUID: what KVM supports, with its APIC id, the CPU count and the
/// hypervisor bit.
pub fn cpuid_for(base: &CpuId, id: u8, cpus: u8) -> CpuId {
    let mut cpuid = base.clone();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX is valid
                }
                e.ecx |= 1 << 31; // running under a hypervisor
            }
            0xb | 0x1f => e.edx = u32::from(id),
            _ => {}
        }
    }
    cpuid
}

pub struct VcpuThread {
    #[allow(dead_code)]
    pub handle: JoinHandle<()>,
}

/// Starts vCPU `id`; it runs until the guest ends or fails, then reports to `exit`.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExit>,
) -> std::io::Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            let reason = run(id, &mut vcpu, &pio, &mmio);
            exit.set(reason);
        })?;
    Ok(VcpuThread { handle })
}

fn run(id: u8, vcpu: &mut VcpuFd, pio: &Bus, mmio: &Bus) -> ExitReason {
    loop {
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => return ExitReason::TripleFault { vcpu: id },
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                return ExitReason::GuestEnded("reset")
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return ExitReason::GuestEnded("power off")
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("VM entry failed (hardware reason {reason:#x})"),
                }
            }
            Ok(VcpuExit::InternalError) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: "KVM internal error (emulation failure)".into(),
                }
            }
            Ok(other) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("unexpected exit {other:?}"),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {}
            Err(e) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("KVM_RUN: {e}"),
                }
            }
        }
    }
}
