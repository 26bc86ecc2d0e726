//! Loading a Linux kernel: an ELF vmlinux (PVH entry if it has one, else the 64-bit entry)
//! or a bzImage (64-bit boot protocol), with an initrd and a command line, an e820 map and
//! an MP table. No firmware, no ACPI.

pub mod mptable;
pub mod regs;

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use std::time::Instant;

use linux_loader::loader::bootparam::boot_params;
use linux_loader::loader::elf::start_info::{
    hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info,
};
use linux_loader::loader::{BzImage, Elf, KernelLoader, KernelLoaderResult, PvhBootCapability};
use mcvmm_devices::GuestMemory;
use vm_memory::{Bytes, GuestAddress};

use crate::layout::*;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("{0} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel(String),
    #[error("loading the kernel: {0} (is the memory large enough for it?)")]
    Load(linux_loader::loader::Error),
    #[error("initrd {path}: {source}")]
    Initrd {
        path: String,
        source: std::io::Error,
    },
    #[error(
        "{mib} MiB of memory is too small: the kernel and initrd need at least {need_mib} MiB"
    )]
    TooSmall { mib: u64, need_mib: u64 },
    #[error("kernel command line is {0} bytes; the limit is {CMDLINE_MAX}")]
    CmdlineTooLong(usize),
    #[error("writing boot data into guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
    #[error("{0} CPUs: the MP table holds at most {max}", max = mptable::MAX_CPUS)]
    TooManyCpus(u8),
    #[error("loading the kernel: {0}")]
    Loader(&'static str),
}

/// How vCPU 0 enters the kernel.
#[derive(Debug, Clone, Copy)]
pub enum Entry {
    /// 32-bit protected mode at `entry`, `rbx` = PVH start_info.
    Pvh { entry: u64 },
    /// 64-bit mode at `entry`, `rsi` = boot_params.
    Long { entry: u64 },
}

const E820_RAM: u32 = 1;
const E820_RESERVED: u32 = 2;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KEEP_SEGMENTS: u8 = 0x40;
const CAN_USE_HEAP: u8 = 0x80;

fn e820(mem_size: u64) -> Vec<(u64, u64, u32)> {
    let mut map = vec![
        (0, MPTABLE_ADDR, E820_RAM),
        (MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, E820_RESERVED),
    ];
    for (start, len) in ram_ranges(mem_size) {
        if start == 0 {
            map.push((HIMEM_START, len - HIMEM_START, E820_RAM));
        } else {
            map.push((start, len, E820_RAM));
        }
    }
    map
}

/// Reads the first bytes to tell an ELF from a bzImage.
fn kind(file: &mut File) -> std::io::Result<Option<bool>> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0))?;
    let n = file.read(&mut head)?;
    if n >= 4 && &head[..4] == b"\x7fELF" {
        return Ok(Some(true));
    }
    if n >= 0x206
        && u32::from_le_bytes([head[0x202], head[0x203], head[0x204], head[0x205]])
            == KERNEL_HDR_MAGIC
    {
        return Ok(Some(false));
    }
    Ok(None)
}

/// What the kernel and initrd files put into guest memory; `write_boot_data` completes the
/// boot from it once the command line is known.
pub struct Images {
    is_elf: bool,
    loaded: KernelLoaderResult,
    /// Guest address and size of the initrd.
    initrd: Option<(u64, u64)>,
}

/// Loads the kernel and the initrd into guest memory. This is most of the time a VM takes
/// to build (the first touch of each page it fills), and needs nothing of the VM but its
/// memory, so it can run while KVM and the devices are set up.
fn load_images(
    mem: &GuestMemory,
    kernel: &Path,
    initrd: Option<&Path>,
    mem_size: u64,
) -> Result<Images, BootError> {
    let kpath = kernel.display().to_string();
    let mut kfile = File::open(kernel).map_err(|source| BootError::Open {
        path: kpath.clone(),
        source,
    })?;
    let is_elf = kind(&mut kfile)
        .map_err(|source| BootError::Open {
            path: kpath.clone(),
            source,
        })?
        .ok_or_else(|| BootError::NotAKernel(kpath.clone()))?;
    let low_end = ram_ranges(mem_size)[0].1;
    let too_small = |need: u64| BootError::TooSmall {
        mib: mem_size >> 20,
        need_mib: need.div_ceil(1 << 20),
    };
    let loaded = if is_elf {
        Elf::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
    } else {
        BzImage::load(mem, None, &mut kfile, Some(GuestAddress(HIMEM_START)))
    }
    .map_err(|e| match e {
        linux_loader::loader::Error::Elf(_) | linux_loader::loader::Error::Bzimage(_)
            if kfile.metadata().map(|m| m.len()).unwrap_or(0) + HIMEM_START > low_end =>
        {
            too_small(kfile.metadata().map(|m| m.len()).unwrap_or(0) + HIMEM_START)
        }
        e => BootError::Load(e),
    })?;
    let kernel_end = loaded.kernel_end;

    // The initrd goes at the top of low RAM, page aligned, above the kernel. It is read
    // straight into guest memory: a copy through the heap first touched as many pages
    // again, and a page's first touch is what loading costs.
    let mut placed = None;
    if let Some(path) = initrd {
        let err = |source| BootError::Initrd {
            path: path.display().to_string(),
            source,
        };
        let mut file = File::open(path).map_err(err)?;
        let size = file.metadata().map_err(err)?.len();
        let mut top = low_end;
        if let Some(hdr) = &loaded.setup_header {
            let max = u64::from(hdr.initrd_addr_max) + 1;
            if max > HIMEM_START {
                top = top.min(max);
            }
        }
        let addr = top
            .checked_sub(size)
            .map(|a| a & !0xfff)
            .filter(|a| *a >= kernel_end);
        let Some(addr) = addr else {
            return Err(too_small(kernel_end + size + (1 << 20)));
        };
        let len = usize::try_from(size).map_err(|_| err(std::io::Error::other("too large")))?;
        mem.read_exact_volatile_from(GuestAddress(addr), &mut file, len)
            .map_err(|e| err(std::io::Error::other(e)))?;
        placed = Some((addr, size));
    }
    Ok(Images {
        is_elf,
        loaded,
        initrd: placed,
    })
}

/// [`load_images`] on a thread of its own, so that the rest of a VM is built meanwhile:
/// with a second CPU, a boot saves the shorter of the two.
pub struct Loading {
    thread: JoinHandle<Result<(Images, f64), BootError>>,
}

impl Loading {
    pub fn start(
        mem: GuestMemory,
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        mem_size: u64,
    ) -> std::io::Result<Loading> {
        let thread = std::thread::Builder::new()
            .name("kernel-load".into())
            .spawn(move || {
                let started = Instant::now();
                load_images(&mem, &kernel, initrd.as_deref(), mem_size)
                    .map(|images| (images, started.elapsed().as_secs_f64() * 1e3))
            })?;
        Ok(Loading { thread })
    }

    /// The loaded images, and how long loading took (ms).
    pub fn wait(self) -> Result<(Images, f64), BootError> {
        self.thread
            .join()
            .map_err(|_| BootError::Loader("its thread panicked"))?
    }
}

/// Writes the command line, the MP table and the boot information (PVH start info or
/// boot_params with the e820 map) for loaded images; returns how vCPU 0 enters.
pub fn write_boot_data(
    mem: &GuestMemory,
    images: &Images,
    cmdline: &str,
    cpus: u8,
    mem_size: u64,
) -> Result<Entry, BootError> {
    if cmdline.len() + 1 > CMDLINE_MAX {
        return Err(BootError::CmdlineTooLong(cmdline.len()));
    }
    if cpus > mptable::MAX_CPUS {
        return Err(BootError::TooManyCpus(cpus));
    }
    let (is_elf, loaded, initrd) = (images.is_elf, &images.loaded, images.initrd);
    let mut cmdline = cmdline.as_bytes().to_vec();
    cmdline.push(0);
    mem.write_slice(&cmdline, GuestAddress(CMDLINE_ADDR))?;
    mem.write_slice(&mptable::build(cpus), GuestAddress(MPTABLE_ADDR))?;
    let map = e820(mem_size);

    if let (true, PvhBootCapability::PvhEntryPresent(entry)) = (is_elf, loaded.pvh_boot_cap) {
        write_pvh(mem, &map, initrd)?;
        return Ok(Entry::Pvh { entry: entry.0 });
    }

    // SAFETY: boot_params is plain old data; all-zero is its documented initial state.
    let mut params: boot_params = unsafe { std::mem::zeroed() };
    if let Some(hdr) = loaded.setup_header {
        params.hdr = hdr;
    } else {
        params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
        params.hdr.header = KERNEL_HDR_MAGIC;
        params.hdr.kernel_alignment = 0x0100_0000;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.loadflags |= KEEP_SEGMENTS | CAN_USE_HEAP;
    params.hdr.heap_end_ptr = 0xfe00;
    params.hdr.cmd_line_ptr = CMDLINE_ADDR as u32;
    params.hdr.cmdline_size = cmdline.len() as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        params.e820_table[i].addr = *addr;
        params.e820_table[i].size = *size;
        params.e820_table[i].r#type = *kind;
    }
    params.e820_entries = map.len() as u8;
    // SAFETY: boot_params is a packed repr(C) struct of integers, fully initialized above
    // (zeroed, then fields set); viewing it as bytes reads no padding.
    let bytes = unsafe {
        std::slice::from_raw_parts(
            (&params as *const boot_params).cast::<u8>(),
            std::mem::size_of::<boot_params>(),
        )
    };
    mem.write_slice(bytes, GuestAddress(ZERO_PAGE_ADDR))?;
    let entry = if is_elf {
        loaded.kernel_load.0
    } else {
        // 64-bit entry of a bzImage: startup_64, 0x200 into the protected-mode kernel.
        loaded.kernel_load.0 + 0x200
    };
    Ok(Entry::Long { entry })
}

fn pod_bytes<T: Copy>(v: &T) -> Vec<u8> {
    // SAFETY: only used on the PVH structs below: repr(C), integer fields, no padding
    // (their sizes are asserted in linux-loader), so every byte is initialized.
    unsafe { std::slice::from_raw_parts((v as *const T).cast::<u8>(), std::mem::size_of::<T>()) }
        .to_vec()
}

fn write_pvh(
    mem: &GuestMemory,
    map: &[(u64, u64, u32)],
    initrd: Option<(u64, u64)>,
) -> Result<(), BootError> {
    let mut info = hvm_start_info {
        magic: 0x336e_c578,
        version: 1,
        cmdline_paddr: CMDLINE_ADDR,
        memmap_paddr: PVH_MEMMAP_ADDR,
        memmap_entries: map.len() as u32,
        ..Default::default()
    };
    for (i, (addr, size, kind)) in map.iter().enumerate() {
        let e = hvm_memmap_table_entry {
            addr: *addr,
            size: *size,
            type_: *kind,
            reserved: 0,
        };
        mem.write_slice(
            &pod_bytes(&e),
            GuestAddress(PVH_MEMMAP_ADDR + 24 * i as u64),
        )?;
    }
    if let Some((addr, size)) = initrd {
        let m = hvm_modlist_entry {
            paddr: addr,
            size,
            ..Default::default()
        };
        mem.write_slice(&pod_bytes(&m), GuestAddress(PVH_MODLIST_ADDR))?;
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_ADDR;
    }
    mem.write_slice(&pod_bytes(&info), GuestAddress(PVH_INFO_ADDR))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_reserves_the_mp_table_and_skips_the_hole() {
        let m = e820(4 << 30);
        assert!(m.contains(&(MPTABLE_ADDR, EBDA_END - MPTABLE_ADDR, E820_RESERVED)));
        assert!(m.contains(&(HIMEM_START, (3 << 30) - HIMEM_START, E820_RAM)));
        assert!(m.contains(&(4 << 30, 1 << 30, E820_RAM)));
    }

    #[test]
    fn a_load_that_fails_on_its_thread_reports_the_file() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 64 << 20)]).expect("memory");
        let missing = std::env::temp_dir().join(format!("mcvmm-nokernel-{}", std::process::id()));
        let loading = Loading::start(mem, missing.clone(), None, 64 << 20).expect("thread");
        match loading.wait() {
            Err(BootError::Open { path, .. }) => assert_eq!(path, missing.display().to_string()),
            other => panic!(
                "expected the missing kernel, got {:?}",
                other.map(|(_, ms)| ms)
            ),
        }
    }

    #[test]
    fn rejects_what_is_not_a_kernel() {
        let path = std::env::temp_dir().join(format!("mcvmm-notkernel-{}", std::process::id()));
        std::fs::write(&path, b"just some text, not a kernel at all").expect("write");
        let mut f = File::open(&path).expect("open");
        assert_eq!(kind(&mut f).expect("read"), None);
        let _ = std::fs::remove_file(&path);
    }
}
