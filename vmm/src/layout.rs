//! Where things are in guest physical memory (x86_64).
//!
//! ```text
//! 0x0000_0500  GDT            0x0000_9000  PML4, PDPT, PD (identity map of the first GiB)
//! 0x0000_6000  PVH start_info 0x0002_0000  kernel command line
//! 0x0000_7000  boot_params    0x0009_fc00  MP table (last KiB of base memory, reserved)
//! 0x0010_0000  kernel         ...          initrd, at the top of low RAM
//! 0xc000_0000  MMIO hole: virtio-mmio windows, then IOAPIC (0xfec0_0000), LAPIC (0xfee0_0000)
//! 0x1_0000_0000 RAM above 3 GiB continues here
//! ```

pub const GDT_ADDR: u64 = 0x500;
pub const IDT_ADDR: u64 = 0x520;
pub const PVH_INFO_ADDR: u64 = 0x6000;
pub const PVH_MEMMAP_ADDR: u64 = 0x6040;
pub const PVH_MODLIST_ADDR: u64 = 0x6400;
pub const ZERO_PAGE_ADDR: u64 = 0x7000;
pub const BOOT_STACK: u64 = 0x8ff0;
pub const PML4_ADDR: u64 = 0x9000;
pub const PDPT_ADDR: u64 = 0xa000;
pub const PD_ADDR: u64 = 0xb000;
pub const CMDLINE_ADDR: u64 = 0x20000;
pub const CMDLINE_MAX: usize = 2048;
pub const MPTABLE_ADDR: u64 = 0x9fc00;
pub const EBDA_END: u64 = 0xa0000;
pub const HIMEM_START: u64 = 0x10_0000;

pub const MMIO_HOLE_START: u64 = 0xc000_0000;
pub const MMIO_HOLE_END: u64 = 0x1_0000_0000;
pub const VIRTIO_MMIO_BASE: u64 = 0xd000_0000;
pub const IOAPIC_ADDR: u32 = 0xfec0_0000;
pub const LAPIC_ADDR: u32 = 0xfee0_0000;
pub const TSS_ADDR: u64 = 0xfffb_d000;
pub const IDENTITY_MAP_ADDR: u64 = 0xfffb_c000;

/// First GSI for virtio devices (0 timer, 1 i8042, 4 serial, 8 RTC stay free).
pub const VIRTIO_IRQ_BASE: u32 = 5;
pub const IOAPIC_PINS: u32 = 24;

/// Guest RAM ranges for `mem` bytes, split around the MMIO hole.
pub fn ram_ranges(mem: u64) -> Vec<(u64, u64)> {
    if mem <= MMIO_HOLE_START {
        vec![(0, mem)]
    } else {
        vec![(0, MMIO_HOLE_START), (MMIO_HOLE_END, mem - MMIO_HOLE_START)]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ram_goes_around_the_hole() {
        assert_eq!(ram_ranges(256 << 20), vec![(0, 256 << 20)]);
        assert_eq!(ram_ranges(3 << 30), vec![(0, 3 << 30)]);
        assert_eq!(ram_ranges(4 << 30), vec![(0, 3 << 30), (4 << 30, 1 << 30)]);
    }
}
