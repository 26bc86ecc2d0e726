//! KVM's coalesced port I/O for the UART's data port: the guest's writes there go into a
//! ring page shared with KVM instead of exiting, and the serial device replays them before
//! its next access (`mcvmm_devices::serial::HeldWrites`).

use std::ptr::NonNull;
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::Arc;

use kvm_bindings::{kvm_coalesced_mmio, kvm_coalesced_mmio_ring, KVM_COALESCED_MMIO_PAGE_OFFSET};
use kvm_ioctls::{Cap, IoEventAddress, Kvm, VcpuFd, VmFd};
use mcvmm_devices::serial::HeldWrites;

#[derive(Debug, thiserror::Error)]
pub enum CoalescedError {
    #[error("mapping KVM's coalesced I/O ring: {0}")]
    Map(std::io::Error),
    #[error("KVM_REGISTER_COALESCED_MMIO (port {port:#x}): {source}")]
    Register {
        port: u64,
        source: kvm_ioctls::Error,
    },
}

/// Writes to one port held in KVM's ring, until `stop`.
pub struct CoalescedPort {
    vm: Arc<VmFd>,
    port: u64,
    ring: NonNull<kvm_coalesced_mmio_ring>,
    page: usize,
    /// Entries the ring holds (KVM's `KVM_COALESCED_MMIO_MAX`).
    slots: u32,
    registered: bool,
}

// SAFETY: the ring mapping is owned by this value and only touched through `&mut self`;
// KVM's side of it is written by the kernel, which does not care which thread reads.
unsafe impl Send for CoalescedPort {}

impl CoalescedPort {
    /// Starts holding the guest's one-byte writes to `port`; None where KVM cannot
    /// (without `KVM_CAP_COALESCED_PIO` every write exits, as before). `vcpu` is any of
    /// the VM's vCPUs: the ring is the VM's, reached through a vCPU's mapping.
    pub fn start(
        kvm: &Kvm,
        vm: &Arc<VmFd>,
        vcpu: &VcpuFd,
        port: u64,
    ) -> Result<Option<CoalescedPort>, CoalescedError> {
        if !kvm.check_extension(Cap::CoalescedPio) {
            return Ok(None);
        }
        // SAFETY: sysconf with a valid name has no other effect.
        let page = match unsafe { libc::sysconf(libc::_SC_PAGESIZE) } {
            n if n > 0 => n as usize,
            _ => return Err(CoalescedError::Map(std::io::Error::last_os_error())),
        };
        let offset = libc::off_t::from(KVM_COALESCED_MMIO_PAGE_OFFSET) * page as libc::off_t;
        // SAFETY: a fresh shared mapping of one page of the vCPU fd, where KVM keeps the
        // ring when it has the capability checked above; the result is checked.
        let at = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                page,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                std::os::fd::AsRawFd::as_raw_fd(vcpu),
                offset,
            )
        };
        if at == libc::MAP_FAILED {
            return Err(CoalescedError::Map(std::io::Error::last_os_error()));
        }
        let Some(ring) = NonNull::new(at.cast::<kvm_coalesced_mmio_ring>()) else {
            return Err(CoalescedError::Map(std::io::Error::other("mmap gave NULL")));
        };
        let slots = ((page - std::mem::size_of::<kvm_coalesced_mmio_ring>())
            / std::mem::size_of::<kvm_coalesced_mmio>()) as u32;
        let mut held = CoalescedPort {
            vm: vm.clone(),
            port,
            ring,
            page,
            slots,
            registered: false,
        };
        vm.register_coalesced_mmio(IoEventAddress::Pio(port), 1)
            .map_err(|source| CoalescedError::Register { port, source })?;
        held.registered = true;
        Ok(Some(held))
    }

    /// The ring's two indices, shared with KVM: `first` is ours to advance, `last` KVM's.
    fn indices(&self) -> (&AtomicU32, &AtomicU32) {
        let r = self.ring.as_ptr();
        // SAFETY: both fields are aligned u32s in the mapped page, which lives as long as
        // `self`; KVM and this reader access them only as whole words.
        unsafe {
            (
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*r).first)),
                AtomicU32::from_ptr(std::ptr::addr_of_mut!((*r).last)),
            )
        }
    }
}

impl HeldWrites for CoalescedPort {
    fn replay(&mut self, write: &mut dyn FnMut(u8, u8)) {
        let (first, last) = self.indices();
        let mut at = first.load(Ordering::Relaxed);
        let end = last.load(Ordering::Acquire);
        // Indices out of range would be KVM's bug; nothing is read through them.
        if at >= self.slots || end >= self.slots {
            return;
        }
        while at != end {
            // SAFETY: `at` < `slots`, so the entry lies inside the mapped page; KVM wrote
            // it before publishing `last` (the Acquire load above).
            let e: kvm_coalesced_mmio = unsafe {
                std::ptr::addr_of!((*self.ring.as_ptr()).coalesced_mmio)
                    .cast::<kvm_coalesced_mmio>()
                    .add(at as usize)
                    .read_volatile()
            };
            // Only this port's one-byte writes are held; anything else is not ours.
            if e.len == 1 && e.phys_addr == self.port {
                write(0, e.data[0]);
            }
            at = (at + 1) % self.slots;
            first.store(at, Ordering::Release);
        }
    }

    fn stop(&mut self) -> bool {
        if self.registered {
            // Failing, the writes go on being held and replayed at every access: slower
            // interrupts for the guest's transmit path, never lost bytes.
            match self
                .vm
                .unregister_coalesced_mmio(IoEventAddress::Pio(self.port), 1)
            {
                Ok(()) => self.registered = false,
                Err(e) => tracing::warn!("KVM_UNREGISTER_COALESCED_MMIO: {e}"),
            }
        }
        !self.registered
    }
}

impl Drop for CoalescedPort {
    fn drop(&mut self) {
        self.stop();
        // SAFETY: the page was mapped in `start` and nothing refers to it after this.
        unsafe { libc::munmap(self.ring.as_ptr().cast(), self.page) };
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::VcpuExit;
    use mcvmm_checkpoint::dirty::register_slots;
    use mcvmm_checkpoint::GuestMemory;
    use vm_memory::{Bytes, GuestAddress};

    const CODE: u64 = 0x1000;
    const PORT: u64 = 0x3f8;
    const OTHER_PORT: u16 = 0x2f8;

    /// `out` of each byte of `text` to the held port, one `out` to another port, `hlt`.
    fn program(text: &[u8]) -> Vec<u8> {
        let mut code = vec![0xba, PORT as u8, (PORT >> 8) as u8]; // mov dx, PORT
        for &b in text {
            code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
        }
        let o = OTHER_PORT.to_le_bytes();
        code.extend_from_slice(&[0xba, o[0], o[1], 0xee, 0xf4]);
        code
    }

    /// Runs `code` in real mode to its `hlt`; returns the ports of the exits it took.
    fn run(vcpu: &mut VcpuFd, mem: &GuestMemory, code: &[u8]) -> Vec<u16> {
        mem.write_slice(code, GuestAddress(CODE)).expect("code");
        let mut sregs = vcpu.get_sregs().expect("sregs");
        sregs.cs.base = 0;
        sregs.cs.selector = 0;
        vcpu.set_sregs(&sregs).expect("sregs");
        let mut regs = vcpu.get_regs().expect("regs");
        regs.rip = CODE;
        regs.rflags = 2;
        vcpu.set_regs(&regs).expect("regs");
        let mut ports = Vec::new();
        for _ in 0..100 {
            match vcpu.run().expect("KVM_RUN") {
                VcpuExit::Hlt => return ports,
                VcpuExit::IoOut(port, _) => ports.push(port),
                other => panic!("unexpected exit {other:?}"),
            }
        }
        panic!("the guest did not halt");
    }

    #[test]
    fn writes_to_the_port_wait_in_the_ring_in_order_until_stopped() {
        let kvm = Kvm::new().expect("this test needs /dev/kvm");
        let vm = Arc::new(kvm.create_vm().expect("KVM_CREATE_VM"));
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        register_slots(&vm, &mem, 0).expect("slots");
        let mut vcpu = vm.create_vcpu(0).expect("vCPU");
        let mut port = CoalescedPort::start(&kvm, &vm, &vcpu, PORT)
            .expect("start")
            .expect("this KVM has no KVM_CAP_COALESCED_PIO");
        let mut seen = Vec::new();
        let mut replay = |port: &mut CoalescedPort| {
            seen.clear();
            port.replay(&mut |off, b| {
                assert_eq!(off, 0);
                seen.push(b);
            });
            seen.clone()
        };
        // Only the other port exits; the ring keeps the rest, in order, across its end.
        assert_eq!(run(&mut vcpu, &mem, &program(b"hello")), vec![OTHER_PORT]);
        assert_eq!(replay(&mut port), b"hello");
        assert_eq!(replay(&mut port), b"", "each write is replayed once");
        let long: Vec<u8> = (0..port.slots as usize + 40)
            .map(|i| b'a' + (i % 26) as u8)
            .collect();
        // The ring holds one fewer than its slots; a write that finds it full exits (the
        // serial device replays the ring before it handles that write).
        let exits = run(&mut vcpu, &mem, &program(&long));
        assert_eq!(exits.iter().filter(|&&p| u64::from(p) == PORT).count(), 41);
        assert_eq!(replay(&mut port), &long[..port.slots as usize - 1]);
        assert_eq!(run(&mut vcpu, &mem, &program(b"ab")), vec![OTHER_PORT]);
        assert_eq!(replay(&mut port), b"ab");
        assert!(port.stop());
        assert_eq!(
            run(&mut vcpu, &mem, &program(b"x")),
            vec![PORT as u16, OTHER_PORT]
        );
        assert_eq!(replay(&mut port), b"");
    }
}
