//! The CPU state a kernel expects at its entry: a flat GDT, protected mode for PVH, long
//! mode with an identity map of the first GiB for the 64-bit entry; FPU, boot MSRs and
//! the local APIC's LINT pins.

use kvm_bindings::{kvm_fpu, kvm_msr_entry, kvm_regs, kvm_segment, kvm_sregs, Msrs};
use kvm_ioctls::VcpuFd;
use mcvmm_devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use super::Entry;
use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum RegsError {
    #[error("{what}: {source}")]
    Kvm {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("writing boot tables: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("KVM accepted {set} of {want} boot MSRs")]
    Msrs { set: usize, want: usize },
}

fn kvm(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> RegsError {
    move |source| RegsError::Kvm { what, source }
}

fn gdt_entry(flags: u16, base: u32, limit: u32) -> u64 {
    (u64::from(base & 0xff00_0000) << 32)
        | (u64::from(flags & 0xf0ff) << 40)
        | (u64::from(limit & 0x000f_0000) << 32)
        | (u64::from(base & 0x00ff_ffff) << 16)
        | u64::from(limit & 0xffff)
}

fn segment(entry: u64, index: u16) -> kvm_segment {
    let base = ((entry >> 16) & 0xff_ffff) | ((entry >> 32) & 0xff00_0000);
    let raw_limit = ((entry & 0xffff) | ((entry >> 32) & 0xf_0000)) as u32;
    let g = ((entry >> 55) & 1) as u8;
    kvm_segment {
        base,
        limit: if g == 1 {
            (raw_limit << 12) | 0xfff
        } else {
            raw_limit
        },
        selector: index * 8,
        type_: ((entry >> 40) & 0xf) as u8,
        present: ((entry >> 47) & 1) as u8,
        dpl: ((entry >> 45) & 3) as u8,
        db: ((entry >> 54) & 1) as u8,
        s: ((entry >> 44) & 1) as u8,
        l: ((entry >> 53) & 1) as u8,
        g,
        avl: ((entry >> 52) & 1) as u8,
        padding: 0,
        unusable: if (entry >> 47) & 1 == 1 { 0 } else { 1 },
    }
}

/// Registers and segments of the boot vCPU.
pub fn setup_boot_cpu(vcpu: &VcpuFd, mem: &GuestMemory, entry: Entry) -> Result<(), RegsError> {
    let mut sregs: kvm_sregs = vcpu.get_sregs().map_err(kvm("KVM_GET_SREGS"))?;
    let gdt: [u64; 4] = match entry {
        Entry::Pvh { .. } => [
            0,
            gdt_entry(0xc09b, 0, 0xffff_ffff),
            gdt_entry(0xc093, 0, 0xffff_ffff),
            gdt_entry(0x008b, 0, 0x67),
        ],
        Entry::Long { .. } => [
            0,
            gdt_entry(0xa09b, 0, 0xfffff),
            gdt_entry(0xc093, 0, 0xfffff),
            gdt_entry(0x808b, 0, 0xfffff),
        ],
    };
    for (i, e) in gdt.iter().enumerate() {
        mem.write_obj(*e, GuestAddress(GDT_ADDR + 8 * i as u64))?;
    }
    mem.write_obj(0u64, GuestAddress(IDT_ADDR))?;
    sregs.gdt.base = GDT_ADDR;
    sregs.gdt.limit = (gdt.len() * 8 - 1) as u16;
    sregs.idt.base = IDT_ADDR;
    sregs.idt.limit = 7;
    let code = segment(gdt[1], 1);
    let data = segment(gdt[2], 2);
    sregs.cs = code;
    sregs.ds = data;
    sregs.es = data;
    sregs.fs = data;
    sregs.gs = data;
    sregs.ss = data;
    sregs.tr = segment(gdt[3], 3);

    let mut regs = kvm_regs {
        rflags: 0x2,
        ..Default::default()
    };
    match entry {
        Entry::Pvh { entry } => {
            sregs.cr0 = 0x1 | 0x10; // PE, ET
            sregs.cr4 = 0;
            sregs.efer = 0;
            regs.rip = entry;
            regs.rbx = PVH_INFO_ADDR;
        }
        Entry::Long { entry } => {
            // Identity map of the first GiB with 2 MiB pages.
            mem.write_obj(PDPT_ADDR | 0x3, GuestAddress(PML4_ADDR))?;
            mem.write_obj(PD_ADDR | 0x3, GuestAddress(PDPT_ADDR))?;
            for i in 0..512u64 {
                mem.write_obj((i << 21) | 0x83, GuestAddress(PD_ADDR + i * 8))?;
            }
            sregs.cr3 = PML4_ADDR;
            sregs.cr4 |= 0x20; // PAE
            sregs.cr0 |= 0x1 | 0x8000_0000; // PE, PG
            sregs.efer |= 0x100 | 0x400; // LME, LMA
            regs.rip = entry;
            regs.rsp = BOOT_STACK;
            regs.rbp = BOOT_STACK;
            regs.rsi = ZERO_PAGE_ADDR;
        }
    }
    vcpu.set_sregs(&sregs).map_err(kvm("KVM_SET_SREGS"))?;
    vcpu.set_regs(&regs).map_err(kvm("KVM_SET_REGS"))?;
    Ok(())
}

const MSR_IA32_SYSENTER_CS: u32 = 0x174;
const MSR_IA32_SYSENTER_ESP: u32 = 0x175;
const MSR_IA32_SYSENTER_EIP: u32 = 0x176;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
const MSR_STAR: u32 = 0xc000_0081;
const MSR_LSTAR: u32 = 0xc000_0082;
const MSR_CSTAR: u32 = 0xc000_0083;
const MSR_SYSCALL_MASK: u32 = 0xc000_0084;
const MSR_KERNEL_GS_BASE: u32 = 0xc000_0102;

/// State every vCPU starts with: FPU defaults, boot MSRs (MTRRs on, write-back by
/// default, or the guest runs uncached), LINT0 as ExtINT and LINT1 as NMI.
pub fn setup_common(vcpu: &VcpuFd) -> Result<(), RegsError> {
    let fpu = kvm_fpu {
        fcw: 0x37f,
        mxcsr: 0x1f80,
        ..Default::default()
    };
    vcpu.set_fpu(&fpu).map_err(kvm("KVM_SET_FPU"))?;

    let entries: Vec<kvm_msr_entry> = [
        (MSR_IA32_SYSENTER_CS, 0),
        (MSR_IA32_SYSENTER_ESP, 0),
        (MSR_IA32_SYSENTER_EIP, 0),
        (MSR_STAR, 0),
        (MSR_CSTAR, 0),
        (MSR_KERNEL_GS_BASE, 0),
        (MSR_SYSCALL_MASK, 0),
        (MSR_LSTAR, 0),
        (MSR_IA32_TSC, 0),
        (MSR_MTRR_DEF_TYPE, (1 << 11) | 6),
    ]
    .iter()
    .map(|&(index, data)| kvm_msr_entry {
        index,
        data,
        ..Default::default()
    })
    .collect();
    let msrs = Msrs::from_entries(&entries).map_err(|_| RegsError::Msrs {
        set: 0,
        want: entries.len(),
    })?;
    let set = vcpu.set_msrs(&msrs).map_err(kvm("KVM_SET_MSRS"))?;
    if set != entries.len() {
        return Err(RegsError::Msrs {
            set,
            want: entries.len(),
        });
    }

    let mut lapic = vcpu.get_lapic().map_err(kvm("KVM_GET_LAPIC"))?;
    for (reg, mode) in [(0x350usize, 0x7u32), (0x360, 0x4)] {
        let bytes: Vec<u8> = lapic.regs[reg..reg + 4].iter().map(|b| *b as u8).collect();
        let v = u32::from_le_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]);
        let v = (v & !0x700) | (mode << 8);
        for (i, b) in v.to_le_bytes().iter().enumerate() {
            lapic.regs[reg + i] = *b as _;
        }
    }
    vcpu.set_lapic(&lapic).map_err(kvm("KVM_SET_LAPIC"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment() {
        let s = segment(gdt_entry(0xa09b, 0, 0xfffff), 1);
        assert_eq!(
            (s.base, s.limit, s.selector, s.type_, s.l, s.present, s.s),
            (0, 0xffff_ffff, 8, 0xb, 1, 1, 1)
        );
        let d = segment(gdt_entry(0xc093, 0, 0xfffff), 2);
        assert_eq!((d.db, d.g, d.type_, d.l), (1, 1, 3, 0));
    }
}
