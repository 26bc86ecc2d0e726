//! Interrupt edges for the in-kernel IOAPIC, through an irqfd per GSI.
//!
//! For an IOAPIC pin, which is what virtio-mmio devices and the UART have, KVM injects an
//! irqfd from a work item, so each interrupt costs a kworker's context switch. Raising
//! the line with `KVM_IRQ_LINE` from the raising thread, as QEMU does, was faster in the
//! lab, and was withdrawn when guests were lost with it, though they were lost with the
//! irqfd too (docs/lab-notes.md, "Findings once in source comments"). The irqfd stays:
//! the design asks for the transport's interrupts through irqfds.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use mcvmm_devices::interrupt::Line;
use vmm_sys_util::eventfd::EventFd;

use crate::vm::{kvm_call, VmError};

/// An eventfd KVM turns into an edge on one GSI of the VM's in-kernel irqchip.
pub struct IrqfdLine(EventFd);

impl IrqfdLine {
    pub fn register(vm: &VmFd, gsi: u32) -> Result<Arc<IrqfdLine>, VmError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK)?;
        vm.register_irqfd(&fd, gsi).map_err(kvm_call("KVM_IRQFD"))?;
        Ok(Arc::new(IrqfdLine(fd)))
    }
}

impl Line for IrqfdLine {
    /// KVM's work item for an irqfd pulses the pin up and down, one at a time, so edges
    /// from several threads never overlap.
    fn pulse(&self) -> std::io::Result<()> {
        // A full counter (never in practice) still has the edge on its way.
        self.0.write(1)
    }
}
