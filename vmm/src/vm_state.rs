//! The in-kernel devices' state (both PICs, the IOAPIC, the PIT, kvmclock), saved with
//! a checkpoint and restored into a VM before its vCPUs run.

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::VmFd;
use mcvmm_checkpoint::persist::Persist;
use mcvmm_checkpoint::state::VmState;

use crate::vm::{kvm_call, VmError};

/// The VM's own state, KVM's in-kernel devices: both PICs, the IOAPIC, the PIT and
/// kvmclock. Saved with the vCPUs paused; restored before they first run.
pub struct InKernel<'a>(pub &'a VmFd);

impl Persist for InKernel<'_> {
    type State = VmState;
    type Error = VmError;
    // Carried as a typed part of every checkpoint: its version is the checkpoint's.
    const STATE_VERSION: u32 = mcvmm_checkpoint::state::FORMAT_VERSION;

    fn save(&mut self) -> Result<VmState, VmError> {
        save_vm_state(self.0)
    }

    fn restore(&mut self, state: &VmState) -> Result<(), VmError> {
        restore_vm_state(self.0, state)
    }
}

fn save_vm_state(vm: &VmFd) -> Result<VmState, VmError> {
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

fn restore_vm_state(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
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

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_pit_config;
    use kvm_ioctls::Kvm;

    fn vm(kvm: &Kvm) -> VmFd {
        let vm = kvm.create_vm().expect("KVM_CREATE_VM");
        vm.create_irq_chip().expect("KVM_CREATE_IRQCHIP");
        vm.create_pit2(kvm_pit_config::default())
            .expect("KVM_CREATE_PIT2");
        vm
    }

    /// The state as text, without what moves on with host time between two saves:
    /// kvmclock, and when each PIT channel's count was loaded (a host timestamp KVM
    /// sets anew on restore).
    fn comparable(s: &VmState) -> String {
        let mut s = s.clone();
        s.clock = kvm_clock_data::default();
        for c in s.pit.channels.iter_mut() {
            c.count_load_time = 0;
        }
        serde_json::to_string(&s).expect("json")
    }

    #[test]
    fn in_kernel_state_restores_into_a_fresh_vm() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let first = vm(&kvm);
        let mut ioapic = kvm_irqchip {
            chip_id: KVM_IRQCHIP_IOAPIC,
            ..Default::default()
        };
        first.get_irqchip(&mut ioapic).expect("get IOAPIC");
        // SAFETY: reading and writing the IOAPIC member of the union KVM filled for
        // chip_id IOAPIC.
        unsafe {
            ioapic.chip.ioapic.id = 3;
            ioapic.chip.ioapic.redirtbl[4].bits = 0x1_0023;
        }
        first.set_irqchip(&ioapic).expect("set IOAPIC");
        let saved = InKernel(&first).save().expect("save");

        let fresh = vm(&kvm);
        InKernel(&fresh).restore(&saved).expect("restore");
        let again = InKernel(&fresh).save().expect("save again");
        assert_eq!(comparable(&again), comparable(&saved));
        assert!(
            again.clock.clock >= saved.clock.clock,
            "kvmclock goes on from the saved value"
        );
    }
}
