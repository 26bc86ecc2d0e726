//! Interrupt edges for the in-kernel IOAPIC, through an irqfd per GSI.
//!
//! For an IOAPIC pin, which is what virtio-mmio devices and the UART have, KVM injects an
//! irqfd from a work item, so each interrupt costs a kworker's context switch (seen in
//! the test host's trace). Raising the line with `KVM_IRQ_LINE` from the raising thread
//! instead, as QEMU does, was faster (2026-12-03, one test host, 4 rotating rounds:
//! request/response 1625 against 1905 µs, disk read 304 against 285 MB/s), but guests
//! under checkpoint epochs were lost more often in the lab: the self-check test lost a
//! guest in each of 2 runs with the ioctl and in none of 2 with the irqfd, alternating,
//! and a CI run with the ioctl lost 3 in a row. Until that is understood, the irqfd.

use std::sync::Arc;

use kvm_ioctls::VmFd;
use mcvmm_devices::interrupt::Line;
use vmm_sys_util::eventfd::EventFd;

/// An eventfd KVM turns into an edge on one GSI of the VM's in-kernel irqchip.
pub struct IrqfdLine(EventFd);

impl IrqfdLine {
    pub fn register(vm: &VmFd, gsi: u32) -> Result<Arc<IrqfdLine>, IrqfdError> {
        let fd = EventFd::new(libc::EFD_NONBLOCK).map_err(IrqfdError::EventFd)?;
        vm.register_irqfd(&fd, gsi)
            .map_err(|source| IrqfdError::Register { gsi, source })?;
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

#[derive(Debug, thiserror::Error)]
pub enum IrqfdError {
    #[error("creating an eventfd for an interrupt line: {0}")]
    EventFd(std::io::Error),
    #[error("KVM_IRQFD (GSI {gsi}): {source}")]
    Register { gsi: u32, source: kvm_ioctls::Error },
}
