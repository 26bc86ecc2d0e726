//! Everything of a VM that is not RAM, as plain data: what a checkpoint carries besides
//! pages. Live objects (vCPU fds, devices) produce and consume these; nothing here knows
//! how. The whole is versioned by [`FORMAT_VERSION`]; a change to any type here must bump
//! it.

use kvm_bindings::{
    kvm_clock_data, kvm_cpuid_entry2, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state,
    kvm_pit_state2, kvm_regs, kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave,
};
use serde::{Deserialize, Serialize};

use crate::persist::{Captured, DeviceState, PersistError};

/// Version of the state types and of the snapshot layout (2: memory checksums and digests
/// are taken chunk by chunk; 3: devices' states are parts named and versioned by each
/// device; 4: a part's data is bincode, not JSON).
pub const FORMAT_VERSION: u32 = 4;

/// What a VM must look like for a checkpoint to fit it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VmShape {
    pub mem_mib: u64,
    pub vcpus: u8,
    pub disks: Vec<DiskShape>,
    /// The NIC's MAC, if the VM has one.
    pub net: Option<[u8; 6]>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskShape {
    pub size_bytes: u64,
    pub read_only: bool,
}

impl VmShape {
    /// Why `other` (the VM being restored into) differs, if it does.
    pub fn mismatch(&self, other: &VmShape) -> Option<String> {
        if self.mem_mib != other.mem_mib {
            return Some(format!(
                "memory: the checkpoint has {} MiB, this VM {} MiB",
                self.mem_mib, other.mem_mib
            ));
        }
        if self.vcpus != other.vcpus {
            return Some(format!(
                "vCPUs: the checkpoint has {}, this VM {}",
                self.vcpus, other.vcpus
            ));
        }
        if self.disks.len() != other.disks.len() {
            return Some(format!(
                "disks: the checkpoint has {}, this VM {}",
                self.disks.len(),
                other.disks.len()
            ));
        }
        for (i, (a, b)) in self.disks.iter().zip(&other.disks).enumerate() {
            if a != b {
                return Some(format!(
                    "disk {}: the checkpoint's is {} bytes{}, this one {} bytes{}",
                    i + 1,
                    a.size_bytes,
                    if a.read_only { " read-only" } else { "" },
                    b.size_bytes,
                    if b.read_only { " read-only" } else { "" },
                ));
            }
        }
        if self.net.is_some() != other.net.is_some() {
            return Some(format!(
                "network: the checkpoint {} a NIC, this VM {}",
                if self.net.is_some() { "has" } else { "has no" },
                if other.net.is_some() {
                    "has one"
                } else {
                    "has none"
                }
            ));
        }
        None
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct Msr {
    pub index: u32,
    pub data: u64,
}

/// One vCPU, complete: what KVM needs to continue it exactly.
#[derive(Debug, Serialize, Deserialize)]
pub struct VcpuState {
    pub id: u8,
    pub cpuid: Vec<kvm_cpuid_entry2>,
    pub tsc_khz: Option<u32>,
    pub mp_state: kvm_mp_state,
    pub regs: kvm_regs,
    pub sregs: kvm_sregs,
    pub xsave: kvm_xsave,
    pub xcrs: kvm_xcrs,
    pub debugregs: kvm_debugregs,
    pub lapic: kvm_lapic_state,
    pub msrs: Vec<Msr>,
    pub events: kvm_vcpu_events,
}

/// The in-kernel devices of the VM.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct VmState {
    pub pic_master: kvm_irqchip,
    pub pic_slave: kvm_irqchip,
    pub ioapic: kvm_irqchip,
    pub pit: kvm_pit_state2,
    pub clock: kvm_clock_data,
}

/// All of a VM's state but RAM. (The default, with no vCPUs and every device at zeros,
/// is no machine that runs; tests use it where only the RAM matters.)
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct MachineState {
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    /// Every device's state, as each device saves it (see [`crate::persist`]).
    pub devices: Vec<DeviceState>,
}

/// A [`MachineState`] as captured in a pause: the devices' states not yet encoded.
pub struct CapturedState {
    pub cmdline: String,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub devices: Vec<Box<dyn Captured>>,
}

impl CapturedState {
    /// Encodes the devices' states: after the pause, with the guest running.
    pub fn encode(self) -> Result<MachineState, PersistError> {
        Ok(MachineState {
            cmdline: self.cmdline,
            vcpus: self.vcpus,
            vm: self.vm,
            devices: self
                .devices
                .into_iter()
                .map(|d| d.encode())
                .collect::<Result<_, _>>()?,
        })
    }
}
