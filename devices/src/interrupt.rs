//! A device's interrupt line: an eventfd KVM injects as an edge on the device's GSI
//! (irqfd), plus the virtio-mmio InterruptStatus bits the driver reads and acknowledges.

use std::sync::atomic::{AtomicU32, Ordering};

use vmm_sys_util::eventfd::EventFd;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

pub struct Interrupt {
    pub gsi: u32,
    pub irqfd: EventFd,
    status: AtomicU32,
}

impl Interrupt {
    pub fn new(gsi: u32) -> std::io::Result<Interrupt> {
        Ok(Interrupt {
            gsi,
            irqfd: EventFd::new(libc::EFD_NONBLOCK)?,
            status: AtomicU32::new(0),
        })
    }

    /// Raises the line with `bits` set in the status register.
    pub fn trigger(&self, bits: u32) {
        self.status.fetch_or(bits, Ordering::SeqCst);
        // A full eventfd counter (never in practice) still has the line raised.
        let _ = self.irqfd.write(1);
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    pub fn ack(&self, bits: u32) {
        self.status.fetch_and(!bits, Ordering::SeqCst);
    }

    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }
}
