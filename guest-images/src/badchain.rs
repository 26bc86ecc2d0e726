//! A misbehaving driver, on purpose: takes a virtio-blk device away from the kernel and
//! drives its virtio-mmio registers directly (through `/dev/mem`) to post requests no
//! honest driver would — a data buffer outside guest memory, a descriptor chain that loops
//! — then a good request on the same queue to see the device still serves it. Used by the
//! integration tests to prove that a guest cannot hurt the VMM with bad descriptors.

use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::atomic::{fence, Ordering};
use std::time::{Duration, Instant};

const MAGIC: u32 = 0x7472_6976;
const REG_MAGIC: usize = 0x000;
const REG_VERSION: usize = 0x004;
const REG_DEVICE_ID: usize = 0x008;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM_MAX: usize = 0x034;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_INTERRUPT_STATUS: usize = 0x060;
const REG_INTERRUPT_ACK: usize = 0x064;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_AVAIL: usize = 0x090;
const REG_QUEUE_USED: usize = 0x0a0;

const S_ACKNOWLEDGE: u32 = 1;
const S_DRIVER: u32 = 2;
const S_DRIVER_OK: u32 = 4;
const S_FEATURES_OK: u32 = 8;

const F_NEXT: u16 = 1;
const F_WRITE: u16 = 2;
const QUEUE_LEN: u16 = 8;
const PAGE: usize = 4096;
/// Far above any guest's memory.
const OUTSIDE: u64 = 1 << 46;

/// Which bad request to post.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// The data buffer lies outside guest memory.
    Outside,
    /// The chain's last descriptor points back at its first.
    Loop,
}

impl Kind {
    pub fn parse(s: &str) -> Option<Kind> {
        match s {
            "outside" => Some(Kind::Outside),
            "loop" => Some(Kind::Loop),
            _ => None,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Kind::Outside => "outside",
            Kind::Loop => "loop",
        }
    }
}

/// What the device did with the bad request and with the good one after it.
#[derive(Debug)]
pub struct Outcome {
    pub bad_status: u8,
    pub bad_used_len: u32,
    pub good_status: u8,
}

impl std::fmt::Display for Outcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "bad_status={} bad_used_len={} good_status={}",
            self.bad_status, self.bad_used_len, self.good_status
        )
    }
}

/// A mapping of `len` bytes, unmapped on drop.
struct Mapping {
    ptr: *mut u8,
    len: usize,
}

impl Mapping {
    fn anonymous(len: usize) -> Result<Mapping, String> {
        // SAFETY: a fresh private anonymous mapping; the kernel picks the address.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE,
                -1,
                0,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!("mmap: {}", std::io::Error::last_os_error()));
        }
        let m = Mapping {
            ptr: ptr.cast(),
            len,
        };
        // SAFETY: locks our own mapping so its frames stay where the device was told.
        if unsafe { libc::mlock(ptr, len) } != 0 {
            return Err(format!("mlock: {}", std::io::Error::last_os_error()));
        }
        Ok(m)
    }

    fn device(mem: &File, phys: u64) -> Result<Mapping, String> {
        // SAFETY: maps one page of /dev/mem (device registers) shared; the kernel checks
        // the offset.
        let ptr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                PAGE,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                mem.as_raw_fd(),
                phys as libc::off_t,
            )
        };
        if ptr == libc::MAP_FAILED {
            return Err(format!(
                "mmap /dev/mem at {phys:#x}: {}",
                std::io::Error::last_os_error()
            ));
        }
        Ok(Mapping {
            ptr: ptr.cast(),
            len: PAGE,
        })
    }

    fn write<T: Copy>(&self, offset: usize, v: T) {
        assert!(offset + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds (checked above) of a live mapping; volatile because a device
        // (or the VMM behind it) reads it.
        unsafe { std::ptr::write_volatile(self.ptr.add(offset).cast::<T>(), v) }
    }

    fn read<T: Copy>(&self, offset: usize) -> T {
        assert!(offset + std::mem::size_of::<T>() <= self.len);
        // SAFETY: in bounds of a live mapping; volatile because the device writes it.
        unsafe { std::ptr::read_volatile(self.ptr.add(offset).cast::<T>()) }
    }
}

impl Drop for Mapping {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly what was mapped.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// The guest-physical address of the page at `virt` (which must be mapped and locked).
fn physical(virt: *const u8) -> Result<u64, String> {
    let mut f = File::open("/proc/self/pagemap").map_err(|e| format!("pagemap: {e}"))?;
    f.seek(SeekFrom::Start((virt as u64 / PAGE as u64) * 8))
        .map_err(|e| format!("pagemap: {e}"))?;
    let mut entry = [0u8; 8];
    f.read_exact(&mut entry)
        .map_err(|e| format!("pagemap: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return Err("pagemap: page not present (or no permission to see frames)".into());
    }
    Ok(pfn * PAGE as u64)
}

/// The platform device (`virtio-mmio.N`) behind block device `disk`, and its register base.
fn mmio_device(disk: &str) -> Result<(String, u64), String> {
    let dev = std::fs::canonicalize(format!("/sys/block/{disk}/device"))
        .map_err(|e| format!("/sys/block/{disk}/device: {e}"))?;
    let name = dev
        .parent()
        .and_then(Path::file_name)
        .map(|n| n.to_string_lossy().into_owned())
        .filter(|n| n.starts_with("virtio-mmio."))
        .ok_or_else(|| format!("{disk} is not on a virtio-mmio device ({})", dev.display()))?;
    let iomem = std::fs::read_to_string("/proc/iomem").map_err(|e| format!("/proc/iomem: {e}"))?;
    let base = iomem
        .lines()
        .find(|l| l.trim_end().ends_with(&format!(": {name}")))
        .and_then(|l| l.trim().split('-').next())
        .and_then(|hex| u64::from_str_radix(hex, 16).ok())
        .ok_or_else(|| format!("{name} not in /proc/iomem"))?;
    Ok((name, base))
}

fn sysfs_write(path: &str, value: &str) -> Result<(), String> {
    std::fs::write(path, value).map_err(|e| format!("{path}: {e}"))
}

/// Takes `disk`'s device from the kernel, posts one `kind` request and one good read,
/// gives the device back to the kernel (which resets and probes it again).
pub fn run(disk: &str, kind: Kind) -> Result<Outcome, String> {
    let (name, base) = mmio_device(disk)?;
    sysfs_write("/sys/bus/platform/drivers/virtio-mmio/unbind", &name)?;
    let outcome = drive(base, kind);
    // Give the device back even if driving it failed: the probe resets it.
    let rebind = sysfs_write("/sys/bus/platform/drivers/virtio-mmio/bind", &name);
    let outcome = outcome?;
    rebind?;
    Ok(outcome)
}

fn drive(base: u64, kind: Kind) -> Result<Outcome, String> {
    let devmem = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mem")
        .map_err(|e| format!("/dev/mem: {e}"))?;
    let regs = Mapping::device(&devmem, base)?;
    let reg = |off: usize| regs.read::<u32>(off);
    if reg(REG_MAGIC) != MAGIC || reg(REG_VERSION) != 2 || reg(REG_DEVICE_ID) != 2 {
        return Err(format!("no virtio-mmio v2 block device at {base:#x}"));
    }

    // Page 0: descriptors, avail ring, used ring. Page 1: header and status. Page 2: data.
    let mem = Mapping::anonymous(3 * PAGE)?;
    let ring = physical(mem.ptr)?;
    // SAFETY: offsets inside the 3-page mapping.
    let req = physical(unsafe { mem.ptr.add(PAGE) })?;
    // SAFETY: as above.
    let data = physical(unsafe { mem.ptr.add(2 * PAGE) })?;
    let (desc_off, avail_off, used_off) = (0usize, 0x100usize, 0x200usize);
    let (hdr_off, status_off) = (PAGE, PAGE + 0x100);

    regs.write(REG_STATUS, 0u32);
    regs.write(REG_STATUS, S_ACKNOWLEDGE);
    regs.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER);
    regs.write(REG_DRIVER_FEATURES_SEL, 1u32);
    regs.write(REG_DRIVER_FEATURES, 1u32); // VIRTIO_F_VERSION_1
    regs.write(REG_DRIVER_FEATURES_SEL, 0u32);
    regs.write(REG_DRIVER_FEATURES, 0u32);
    regs.write(REG_STATUS, S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK);
    if reg(REG_STATUS) & S_FEATURES_OK == 0 {
        return Err("device refused the features".into());
    }
    regs.write(REG_QUEUE_SEL, 0u32);
    if reg(REG_QUEUE_NUM_MAX) < u32::from(QUEUE_LEN) {
        return Err("queue too small".into());
    }
    regs.write(REG_QUEUE_NUM, u32::from(QUEUE_LEN));
    for (reg_at, addr) in [
        (REG_QUEUE_DESC, ring + desc_off as u64),
        (REG_QUEUE_AVAIL, ring + avail_off as u64),
        (REG_QUEUE_USED, ring + used_off as u64),
    ] {
        regs.write(reg_at, addr as u32);
        regs.write(reg_at + 4, (addr >> 32) as u32);
    }
    regs.write(REG_QUEUE_READY, 1u32);
    regs.write(
        REG_STATUS,
        S_ACKNOWLEDGE | S_DRIVER | S_FEATURES_OK | S_DRIVER_OK,
    );

    let desc = |i: u16, addr: u64, len: u32, flags: u16, next: u16| {
        let at = desc_off + 16 * usize::from(i);
        mem.write(at, addr);
        mem.write(at + 8, len);
        mem.write(at + 12, flags);
        mem.write(at + 14, next);
    };
    // A read (type 0) of sector 0.
    mem.write(hdr_off, 0u32);
    mem.write(hdr_off + 8, 0u64);
    let submit = |n: u16| -> Result<u32, String> {
        mem.write(status_off, 0xffu8);
        mem.write(avail_off + 4 + 2 * usize::from(n % QUEUE_LEN), 0u16);
        fence(Ordering::SeqCst);
        mem.write(avail_off + 2, n + 1);
        fence(Ordering::SeqCst);
        regs.write(REG_QUEUE_NOTIFY, 0u32);
        let deadline = Instant::now() + Duration::from_secs(5);
        while mem.read::<u16>(used_off + 2) != n + 1 {
            if Instant::now() > deadline {
                return Err(format!("request {n}: no answer from the device in 5 s"));
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        fence(Ordering::SeqCst);
        regs.write(REG_INTERRUPT_ACK, reg(REG_INTERRUPT_STATUS));
        Ok(mem.read::<u32>(used_off + 4 + 8 * usize::from(n % QUEUE_LEN) + 4))
    };

    desc(0, req, 16, F_NEXT, 1);
    match kind {
        Kind::Outside => {
            desc(1, OUTSIDE, 512, F_WRITE | F_NEXT, 2);
            desc(2, req + 0x100, 1, F_WRITE, 0);
        }
        Kind::Loop => {
            desc(1, data, 512, F_WRITE | F_NEXT, 2);
            desc(2, req + 0x100, 1, F_WRITE | F_NEXT, 0);
        }
    }
    let bad_used_len = submit(0)?;
    let bad_status = mem.read::<u8>(status_off);

    desc(1, data, 512, F_WRITE | F_NEXT, 2);
    desc(2, req + 0x100, 1, F_WRITE, 0);
    submit(1)?;
    let good_status = mem.read::<u8>(status_off);
    regs.write(REG_STATUS, 0u32);
    Ok(Outcome {
        bad_status,
        bad_used_len,
        good_status,
    })
}
