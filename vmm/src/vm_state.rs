//! The in-kernel devices' state (both PICs, the IOAPIC, the PIT, kvmclock), saved with
//! a checkpoint and restored into a VM before its vCPUs run.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use mcvmm_checkpoint::state::VmState;

use crate::vm::{kvm_call, VmError};

/// The in-kernel devices' state: both PICs, the IOAPIC, the PIT, kvmclock. The vCPUs
/// must be paused.
pub fn save_vm_state(vm: &VmFd) -> Result<VmState, VmError> {
    let chip = |id: u32| -> Result<kvm_irqchip, VmError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(kvm_call("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_call("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_call("KVM_GET_CLOCK"))?,
    })
}

pub fn restore_vm_state(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_call("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm_call("KVM_SET_PIT2"))?;
    // Only KVM_CLOCK_REALTIME may be passed back: with it KVM moves the clock on by the
    // real time that went by since the capture, so the guest's clock goes on. A
    // checkpoint from another host whose real-time clock is ahead of this one's would move
    // the guest's clock backwards, and a guest that trusts kvmclock then sleeps through
    // its timers: in that case the clock goes on from the captured value instead.
    let mut flags = s.clock.flags & KVM_CLOCK_REALTIME;
    if flags != 0 && realtime_ns() < s.clock.realtime {
        tracing::warn!(
            "the checkpoint's real-time clock is {} ms ahead of this host's; the guest's clock is not moved back",
            (s.clock.realtime - realtime_ns()) / 1_000_000
        );
        flags = 0;
    }
    let clock = kvm_clock_data { flags, ..s.clock };
    vm.set_clock(&clock).map_err(kvm_call("KVM_SET_CLOCK"))?;
    Ok(())
}

/// This host's CLOCK_REALTIME in nanoseconds (what KVM compares a clock's `realtime` with).
fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
