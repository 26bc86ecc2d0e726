//! Dirty tracking per epoch. KVM logs the pages the guest writes; the VMM's own writes
//! into guest memory (virtio-blk reads, virtio-net RX, used rings) never reach that log
//! and are recorded in each region's `AtomicBitmap` instead. An epoch's dirty set is the
//! union of both; missing either is silent corruption after a failover.
//!
//! Where KVM offers `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2`, reading the log and arming it
//! again (clearing the bits and write-protecting those pages) are separate calls, and the
//! log can start with every page marked dirty. Turning tracking on then write-protects
//! nothing, so its pause is short whatever the guest's size: a full copy arms each span
//! just before copying it ([`LogArm`]), and a page never armed is still reported.
//! Without it, turning the log on write-protects all of RAM at once. (The VMM changes the
//! slots' flags with the vCPUs paused either way: the lab's nested KVM was seen to lose a
//! guest to such a change under running vCPUs.)

use std::fs::File;
use std::os::fd::{AsRawFd, FromRawFd};

use kvm_bindings::{
    kvm_clear_dirty_log, kvm_enable_cap, kvm_userspace_memory_region,
    KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2, KVM_DIRTY_LOG_INITIALLY_SET, KVM_MEM_LOG_DIRTY_PAGES,
};
use kvm_ioctls::VmFd;
use vm_memory::bitmap::AtomicBitmap;
use vm_memory::{Address, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::{GuestMemory, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum DirtyError {
    #[error("{what} (slot {slot}): {source}")]
    Kvm {
        what: &'static str,
        slot: u32,
        source: kvm_ioctls::Error,
    },
    #[error("{what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
    #[error("cannot arm the dirty log for {len:#x} bytes at {gpa:#x}: {why}")]
    Range {
        gpa: u64,
        len: u64,
        why: &'static str,
    },
}

/// How KVM's log is read and armed again.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogMode {
    /// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` where KVM has it (else [`LogMode::Legacy`]):
    /// `KVM_GET_DIRTY_LOG` only reads, `KVM_CLEAR_DIRTY_LOG` arms again.
    Manual,
    /// `KVM_GET_DIRTY_LOG` reads, clears and write-protects in one call.
    Legacy,
}

/// `KVM_CLEAR_DIRTY_LOG`: `_IOWR(KVMIO, 0xc0, struct kvm_clear_dirty_log)`.
const KVM_CLEAR_DIRTY_LOG: libc::c_ulong = (3 << 30)
    | ((std::mem::size_of::<kvm_clear_dirty_log>() as libc::c_ulong) << 16)
    | (0xAE << 8)
    | 0xc0;

/// How much memory a full copy arms at once, ahead of copying it. Each arm is an ioctl
/// that takes KVM's locks and flushes the TLBs when it protects anything: a 2 GiB copy
/// makes 64 of them instead of 2048. A write between the arm and the copy of its page is
/// copied again in the next round, which a larger span makes a little more likely.
const ARM_SPAN: u64 = 32 << 20;

/// Pages per bitmap word: `KVM_CLEAR_DIRTY_LOG` takes ranges aligned to it.
const WORD_PAGES: u64 = 64;

/// Every this many epochs the pages kept writable ([`DirtyTracker::keep_hot`]) are armed
/// again, so that a page the guest stopped writing leaves the set within this many.
const HOT_REARM_EVERY: u64 = 8;

/// The `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` options this KVM has (0: none).
fn manual_caps(vm: &VmFd) -> u64 {
    let caps = vm.check_extension_raw(libc::c_ulong::from(KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2));
    u64::try_from(caps).unwrap_or(0)
}

/// Sets how the log of a slot whose logging is turned on from now behaves: `options` of
/// `KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2` (0 for the legacy behaviour).
fn set_manual(vm: &VmFd, options: u64) -> Result<(), DirtyError> {
    let mut cap = kvm_enable_cap {
        cap: KVM_CAP_MANUAL_DIRTY_LOG_PROTECT2,
        ..Default::default()
    };
    cap.args[0] = options;
    vm.enable_cap(&cap).map_err(|source| DirtyError::Kvm {
        what: "KVM_ENABLE_CAP(MANUAL_DIRTY_LOG_PROTECT2)",
        slot: 0,
        source,
    })
}

/// Arms KVM's log again on ranges of guest memory: clears their bits and write-protects
/// their pages, so that the next write to one is logged. A handle of its own on the VM,
/// so the thread that copies memory can hold it.
pub struct LogArm {
    vm: File,
    /// Each slot's (guest address, bytes), slot `i` at index `i`.
    slots: Vec<(u64, u64)>,
    /// All ones, for arming whole ranges.
    ones: Vec<u64>,
}

impl LogArm {
    fn new(vm: &VmFd, mem: &GuestMemory) -> Result<Self, DirtyError> {
        // SAFETY: dup of a descriptor this process owns for as long as `vm` lives; the
        // new one is owned by the returned File alone.
        let fd = unsafe { libc::dup(vm.as_raw_fd()) };
        if fd < 0 {
            return Err(DirtyError::Os {
                what: "dup of the VM descriptor",
                source: std::io::Error::last_os_error(),
            });
        }
        // SAFETY: `fd` is a fresh descriptor nobody else owns.
        let vm = unsafe { File::from_raw_fd(fd) };
        Ok(LogArm {
            vm,
            slots: mem.iter().map(|r| (r.start_addr().0, r.len())).collect(),
            ones: Vec::new(),
        })
    }

    /// Arms the log of `[gpa, gpa + len)`: call it before copying any of that range: a
    /// write from then on is in the next dirty set, one before it is in the copy. The
    /// range lies in one region and starts at a multiple of 64 pages from the region's
    /// start; its length is a multiple of 64 pages or it reaches the region's end.
    pub fn arm(&mut self, gpa: GuestAddress, len: u64) -> Result<(), DirtyError> {
        let bad = |why| DirtyError::Range {
            gpa: gpa.0,
            len,
            why,
        };
        let (slot, &(start, size)) = self
            .slots
            .iter()
            .enumerate()
            .find(|(_, &(s, l))| gpa.0 >= s && gpa.0 - s < l)
            .ok_or(bad("not in guest RAM"))?;
        let offset = gpa.0 - start;
        if len == 0 || len > size - offset {
            return Err(bad("not inside one region"));
        }
        let (first, pages) = (offset / PAGE_SIZE, len.div_ceil(PAGE_SIZE));
        if !offset.is_multiple_of(WORD_PAGES * PAGE_SIZE)
            || (!len.is_multiple_of(WORD_PAGES * PAGE_SIZE) && offset + len != size)
        {
            return Err(bad("not aligned to 64 pages"));
        }
        let words = pages.div_ceil(WORD_PAGES) as usize;
        if self.ones.len() < words {
            self.ones.resize(words, u64::MAX);
        }
        clear_log(&self.vm, slot as u32, first, pages, &self.ones[..words])
    }

    /// For a region copied in order from its start, in steps that divide 32 MiB: called
    /// before the step at `offset`, it arms the next 32 MiB (or what is left of the
    /// region) when `offset` begins one.
    pub fn before_copy(
        &mut self,
        region_start: GuestAddress,
        offset: u64,
        region_len: u64,
    ) -> Result<(), DirtyError> {
        if !offset.is_multiple_of(ARM_SPAN) {
            return Ok(());
        }
        self.arm(
            region_start.unchecked_add(offset),
            (region_len - offset).min(ARM_SPAN),
        )
    }
}

/// `KVM_CLEAR_DIRTY_LOG` on `vm` of the pages whose bits are set in `bits`, `bits[0]` bit
/// 0 being page `first` of the slot.
fn clear_log(
    vm: &impl AsRawFd,
    slot: u32,
    first: u64,
    pages: u64,
    bits: &[u64],
) -> Result<(), DirtyError> {
    let kvm_err = |source| DirtyError::Kvm {
        what: "KVM_CLEAR_DIRTY_LOG",
        slot,
        source,
    };
    let pages = u32::try_from(pages).map_err(|_| kvm_err(kvm_ioctls::Error::new(libc::EINVAL)))?;
    debug_assert!(bits.len() as u64 * WORD_PAGES >= u64::from(pages));
    let mut log = kvm_clear_dirty_log {
        slot,
        num_pages: pages,
        first_page: first,
        ..Default::default()
    };
    log.__bindgen_anon_1.dirty_bitmap = bits.as_ptr() as *mut libc::c_void;
    // SAFETY: KVM reads ceil(pages / 64) words from `bits`, which holds at least that many
    // and outlives the call; it writes nothing back.
    let rc = unsafe { libc::ioctl(vm.as_raw_fd(), KVM_CLEAR_DIRTY_LOG, &log) };
    if rc < 0 {
        return Err(kvm_err(kvm_ioctls::Error::last()));
    }
    Ok(())
}

/// `KVM_GET_DIRTY_LOG` of `slot` (`len` bytes of guest memory).
fn get_log(vm: &VmFd, slot: u32, len: usize) -> Result<Vec<u64>, DirtyError> {
    vm.get_dirty_log(slot, len)
        .map_err(|source| DirtyError::Kvm {
            what: "KVM_GET_DIRTY_LOG",
            slot,
            source,
        })
}

/// Registers every region of `mem` with KVM as slot 0, 1, ... in order, with `flags`.
/// Registering an existing slot again changes its flags in place (KVM keeps the memory).
pub fn register_slots(vm: &VmFd, mem: &GuestMemory, flags: u32) -> Result<(), DirtyError> {
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            flags,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
        };
        // SAFETY: the region is a live mapping owned by `mem`; the caller keeps `mem`
        // alive as long as the VM may use it (both live for the whole VM).
        unsafe { vm.set_user_memory_region(r) }.map_err(|source| DirtyError::Kvm {
            what: "KVM_SET_USER_MEMORY_REGION",
            slot: slot as u32,
            source,
        })?;
    }
    Ok(())
}

/// The whole bitmap of a region (the trait's `bitmap()` gives only a slice view of it).
fn vmm_bitmap(region: &vm_memory::GuestRegionMmap<AtomicBitmap>) -> &AtomicBitmap {
    std::ops::Deref::deref(region).bitmap()
}

/// The pages of one RAM region written during an epoch, one bit per page.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RegionDirty {
    pub start: GuestAddress,
    pub len: u64,
    pub bits: Vec<u64>,
}

impl RegionDirty {
    /// The guest address of every dirty page of this region, lowest first.
    fn addresses(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        // Only set bits are visited: an idle epoch over GiBs of RAM costs a pass over
        // the words, not one step per page.
        self.bits
            .iter()
            .enumerate()
            .filter(|(_, &word)| word != 0)
            .flat_map(move |(w, &word)| {
                let mut rest = word;
                std::iter::from_fn(move || {
                    (rest != 0).then(|| {
                        let b = u64::from(rest.trailing_zeros());
                        rest &= rest - 1;
                        self.start.unchecked_add((w as u64 * 64 + b) * PAGE_SIZE)
                    })
                })
            })
            .filter(move |a| a.0 < self.start.0 + self.len)
    }
}

/// The pages written during one epoch, region by region.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DirtySet {
    pub regions: Vec<RegionDirty>,
}

impl DirtySet {
    /// How many pages are dirty.
    pub fn pages(&self) -> u64 {
        self.regions
            .iter()
            .flat_map(|r| &r.bits)
            .map(|w| u64::from(w.count_ones()))
            .sum()
    }

    /// The guest address of every dirty page, lowest first.
    pub fn addresses(&self) -> impl Iterator<Item = GuestAddress> + '_ {
        self.regions.iter().flat_map(RegionDirty::addresses)
    }

    /// Runs of consecutive dirty pages as (first page, pages), lowest first; a run never
    /// crosses from one region into the next, so each is one slice of guest memory.
    pub fn runs(&self) -> impl Iterator<Item = (GuestAddress, u64)> + '_ {
        self.regions.iter().flat_map(|r| {
            let mut pages = r.addresses().peekable();
            std::iter::from_fn(move || {
                let first = pages.next()?;
                let mut n = 1;
                while pages.peek() == Some(&first.unchecked_add(n * PAGE_SIZE)) {
                    pages.next();
                    n += 1;
                }
                Some((first, n))
            })
        })
    }
}

/// Where the dirty set of an epoch comes from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Sources {
    /// KVM's log and the VMM's own writes: the only correct setting.
    GuestAndVmm,
    /// KVM's log alone. Wrong on purpose: the self-check uses it to prove it notices
    /// what the VMM's writes would have lost.
    GuestOnly,
}

/// Epoch-by-epoch dirty tracking of all of a VM's RAM.
pub struct DirtyTracker {
    sources: Sources,
    /// Manual protection: `end_epoch` arms the pages it read with `KVM_CLEAR_DIRTY_LOG`.
    manual: bool,
    hot: HotPages,
    /// Bits per slot that were taken from KVM or the VMM's bitmap but never reached a
    /// caller (an `end_epoch` that failed half-way, a set given back): the next set
    /// reports them. Dropping one would lose a page (invariant 1).
    carried: Vec<Vec<u64>>,
}

/// Pages written in two epochs running are likely written in the next too. Arming one
/// again costs a write-protect fault (a VM exit, and KVM's fault path) on its next write,
/// every epoch; left writable, it is simply reported dirty each epoch (KVM keeps its bit
/// until it is armed) and copied again, written or not. With manual protection only.
#[derive(Default)]
struct HotPages {
    /// At most this many pages are kept writable (0: none).
    limit: u64,
    /// KVM's bits of each slot as the previous `end_epoch` read them.
    prev: Vec<Vec<u64>>,
    /// `end_epoch` calls so far.
    ends: u64,
    /// Pages the last `end_epoch` left writable.
    kept: u64,
    /// The pages `arm_set` gave to arm.
    arm: Vec<u64>,
}

impl HotPages {
    /// The pages of `bits` (KVM's bits of `slot`, just read) to arm now: all of them but
    /// those also dirty in the previous epoch, while `budget` lasts (it is spent a whole
    /// bitmap word at a time). Remembers `bits` for the next epoch. Runs in the pause:
    /// both buffers are reused from epoch to epoch.
    fn arm_set(&mut self, slot: usize, bits: &[u64], budget: &mut u64) -> &[u64] {
        if self.prev.len() <= slot {
            self.prev.resize(slot + 1, Vec::new());
        }
        let prev = &mut self.prev[slot];
        prev.resize(bits.len(), 0);
        self.arm.clear();
        for (&w, p) in bits.iter().zip(prev.iter_mut()) {
            let hot = w & *p;
            let n = u64::from(hot.count_ones());
            if hot != 0 && n <= *budget {
                *budget -= n;
                self.kept += n;
                self.arm.push(w & !hot);
            } else {
                self.arm.push(w);
            }
            *p = w;
        }
        &self.arm
    }
}

impl DirtyTracker {
    /// Turns on KVM's dirty log on every RAM slot and forgets what the VMM wrote before:
    /// the first epoch starts now. The vCPUs should be paused (or the first epoch's set
    /// may include writes from just before): this write-protects all of RAM.
    pub fn start(
        vm: &VmFd,
        mem: &GuestMemory,
        sources: Sources,
        mode: LogMode,
    ) -> Result<Self, DirtyError> {
        let caps = manual_caps(vm);
        let manual = mode == LogMode::Manual && caps & 1 != 0;
        if manual {
            set_manual(vm, 1)?;
        } else if caps != 0 {
            set_manual(vm, 0)?;
        }
        Self::log_on(vm, mem, sources, manual)
    }

    /// Turns on KVM's dirty log with every page of RAM reported dirty until it is armed,
    /// which a full copy does span by span just before copying each ([`LogArm`]). Nothing
    /// is write-protected yet, so this is quick. `None` where KVM cannot start the log
    /// this way (or `mode` is legacy): use [`DirtyTracker::start`].
    pub fn start_all_dirty(
        vm: &VmFd,
        mem: &GuestMemory,
        sources: Sources,
        mode: LogMode,
    ) -> Result<Option<(Self, LogArm)>, DirtyError> {
        let want = 1 | u64::from(KVM_DIRTY_LOG_INITIALLY_SET);
        if mode != LogMode::Manual || manual_caps(vm) & want != want {
            return Ok(None);
        }
        set_manual(vm, want)?;
        let arm = LogArm::new(vm, mem)?;
        let tracker = Self::log_on(vm, mem, sources, true)?;
        Ok(Some((tracker, arm)))
    }

    fn log_on(
        vm: &VmFd,
        mem: &GuestMemory,
        sources: Sources,
        manual: bool,
    ) -> Result<Self, DirtyError> {
        register_slots(vm, mem, KVM_MEM_LOG_DIRTY_PAGES)?;
        for region in mem.iter() {
            vmm_bitmap(region).reset();
        }
        Ok(DirtyTracker {
            sources,
            manual,
            hot: HotPages::default(),
            carried: Vec::new(),
        })
    }

    /// Whether KVM's log is armed by separate calls (`KVM_CLEAR_DIRTY_LOG`).
    pub fn manual(&self) -> bool {
        self.manual
    }

    /// From the next epoch on, leaves up to `limit` pages that were dirty in the epoch
    /// before too writable instead of arming them (see [`HotPages`]); every
    /// `HOT_REARM_EVERY` epochs all are armed again. Each set stays exact or larger: a
    /// page kept writable is reported in every set until it is armed. Only with manual
    /// protection (the legacy log arms everything it reads); 0 turns it off.
    pub fn keep_hot(&mut self, limit: u64) {
        self.hot.limit = limit;
    }

    /// How many pages the last epoch's end left writable.
    pub fn hot_pages(&self) -> u64 {
        self.hot.kept
    }

    /// Ends the current epoch and starts the next: the pages written since the previous
    /// call (or `start`). Call it from the thread that runs the devices (a device write
    /// in flight would land in neither set). With the vCPUs out of KVM_RUN the set is
    /// exact; while they run, a page written during the call may be reported now or in
    /// the next set, and is writable without logging until the call returns, so a copy
    /// made after the call (a snapshot's copy-again round) misses nothing.
    ///
    /// If it fails, nothing taken is lost: the slots already read, and the one that
    /// failed as a whole, are reported by the next call.
    pub fn end_epoch(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<DirtySet, DirtyError> {
        self.end_epoch_with(
            mem,
            |slot, len| get_log(vm, slot, len),
            |slot, pages, bits| clear_log(vm, slot, 0, pages, bits),
        )
    }

    /// `end_epoch` with KVM's two calls passed in (so that a test can make one fail).
    fn end_epoch_with(
        &mut self,
        mem: &GuestMemory,
        mut read: impl FnMut(u32, usize) -> Result<Vec<u64>, DirtyError>,
        mut clear: impl FnMut(u32, u64, &[u64]) -> Result<(), DirtyError>,
    ) -> Result<DirtySet, DirtyError> {
        let mut regions: Vec<RegionDirty> = Vec::new();
        self.hot.ends += 1;
        self.hot.kept = 0;
        let mut hot_budget = if self.hot.ends.is_multiple_of(HOT_REARM_EVERY) {
            0
        } else {
            self.hot.limit
        };
        for (slot, region) in mem.iter().enumerate() {
            let len = region.len();
            let words = len.div_ceil(PAGE_SIZE).div_ceil(WORD_PAGES) as usize;
            let taken = read(slot as u32, len as usize).and_then(|mut bits| {
                // Without manual protection KVM cleared and armed the log in that call;
                // with it, the pages read are armed now, but for hot ones kept writable
                // (a page first written since the read keeps its bit for the next set).
                if self.manual {
                    let arm = if self.hot.limit == 0 {
                        &bits[..]
                    } else {
                        self.hot.arm_set(slot, &bits, &mut hot_budget)
                    };
                    if arm.iter().any(|&w| w != 0) {
                        clear(slot as u32, len.div_ceil(PAGE_SIZE), arm)?;
                    }
                }
                bits.resize(words, 0);
                Ok(bits)
            });
            let mut bits = match taken {
                Ok(bits) => bits,
                Err(e) => {
                    // What KVM still holds of this slot is unknown: all of it is dirty.
                    // The slots read before give their bits to the next set.
                    let mut all = vec![u64::MAX; words];
                    if let Some(last) = all.last_mut() {
                        let tail = len.div_ceil(PAGE_SIZE) % WORD_PAGES;
                        if tail != 0 {
                            *last = (1 << tail) - 1;
                        }
                    }
                    self.carry(slot, &all);
                    for (i, r) in regions.iter().enumerate() {
                        self.carry(i, &r.bits);
                    }
                    return Err(e);
                }
            };
            let vmm = vmm_bitmap(region).get_and_reset();
            if self.sources == Sources::GuestAndVmm {
                for (k, v) in bits.iter_mut().zip(vmm) {
                    *k |= v;
                }
            }
            if let Some(carried) = self.carried.get_mut(slot) {
                for (k, c) in bits.iter_mut().zip(carried.drain(..)) {
                    *k |= c;
                }
            }
            regions.push(RegionDirty {
                start: region.start_addr(),
                len,
                bits,
            });
        }
        Ok(DirtySet { regions })
    }

    /// Gives back a set that `end_epoch` returned but that could not be used (its copy
    /// or its checkpoint failed): the next set reports its pages too.
    pub fn give_back(&mut self, set: DirtySet) {
        for (slot, r) in set.regions.iter().enumerate() {
            self.carry(slot, &r.bits);
        }
    }

    fn carry(&mut self, slot: usize, bits: &[u64]) {
        if self.carried.len() <= slot {
            self.carried.resize(slot + 1, Vec::new());
        }
        let c = &mut self.carried[slot];
        if c.len() < bits.len() {
            c.resize(bits.len(), 0);
        }
        for (k, b) in c.iter_mut().zip(bits) {
            *k |= b;
        }
    }

    /// Turns KVM's dirty log off again.
    pub fn stop(self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
        register_slots(vm, mem, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_ioctls::{Kvm, VcpuExit, VcpuFd};
    use vm_memory::Bytes;

    /// A VM of 1 MiB with one vCPU in real mode: enough to see KVM log the guest's writes
    /// (the local /dev/kvm runs this much; no Linux needed).
    struct Tiny {
        vm: VmFd,
        vcpu: VcpuFd,
        mem: GuestMemory,
    }

    const CODE: u64 = 0x1000;

    impl Tiny {
        fn new() -> Tiny {
            Tiny::with_regions(&[(0, 1 << 20)])
        }

        /// A VM whose RAM is these (start, length) regions, slot 0, 1, ... in order.
        fn with_regions(regions: &[(u64, usize)]) -> Tiny {
            let kvm = Kvm::new().expect("these tests need /dev/kvm");
            let vm = kvm.create_vm().expect("KVM_CREATE_VM");
            let ranges: Vec<(GuestAddress, usize)> =
                regions.iter().map(|&(a, l)| (GuestAddress(a), l)).collect();
            let mem = GuestMemory::from_ranges(&ranges).expect("memory");
            register_slots(&vm, &mem, 0).expect("slots");
            let vcpu = vm.create_vcpu(0).expect("vcpu");
            let mut sregs = vcpu.get_sregs().expect("sregs");
            sregs.cs.base = 0;
            sregs.cs.selector = 0;
            sregs.ds.base = 0;
            sregs.ds.selector = 0;
            vcpu.set_sregs(&sregs).expect("sregs");
            Tiny { vm, vcpu, mem }
        }

        /// Runs `mov byte [page], 1` for each page below 64 KiB, then `hlt`.
        fn write_pages(&mut self, pages: &[u16]) {
            self.load(pages);
            self.go();
        }

        /// Loads the code `write_pages` runs, without running it.
        fn load(&self, pages: &[u16]) {
            let mut code = Vec::new();
            for &p in pages {
                let a = (p * 0x1000).to_le_bytes();
                code.extend_from_slice(&[0xc6, 0x06, a[0], a[1], 0x01]);
            }
            code.push(0xf4);
            // Written before the tracker starts, or seen as the VMM's own write.
            self.mem
                .write_slice(&code, GuestAddress(CODE))
                .expect("code");
        }

        fn go(&mut self) {
            let mut regs = self.vcpu.get_regs().expect("regs");
            regs.rip = CODE;
            regs.rflags = 2;
            self.vcpu.set_regs(&regs).expect("regs");
            for _ in 0..100 {
                match self.vcpu.run().expect("KVM_RUN") {
                    VcpuExit::Hlt => return,
                    other => eprintln!("exit {other:?}"),
                }
            }
            panic!("the guest did not halt");
        }

        fn pages(set: &DirtySet) -> Vec<u64> {
            set.addresses().map(|a| a.0 / PAGE_SIZE).collect()
        }
    }

    #[test]
    fn both_modes_log_the_guests_writes_and_arm_again_each_epoch() {
        for mode in [LogMode::Manual, LogMode::Legacy] {
            let mut t = Tiny::new();
            t.write_pages(&[]); // the code page, before tracking
            let mut d =
                DirtyTracker::start(&t.vm, &t.mem, Sources::GuestAndVmm, mode).expect("start");
            assert_eq!(
                d.manual(),
                mode == LogMode::Manual,
                "local KVM has manual protect"
            );
            t.go();
            assert_eq!(
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
                Vec::<u64>::new()
            );
            t.load(&[3, 8]);
            let _ = d.end_epoch(&t.vm, &t.mem).expect("end"); // the code write itself
            t.go();
            assert_eq!(
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
                vec![3, 8],
                "{mode:?}: the guest's writes"
            );
            // The same pages again: only an armed log sees the second write.
            t.go();
            assert_eq!(
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
                vec![3, 8]
            );
            t.mem
                .write_obj(7u8, GuestAddress(0x2_0000))
                .expect("vmm write");
            assert_eq!(
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
                vec![0x20],
                "the VMM's own write"
            );
            d.stop(&t.vm, &t.mem).expect("stop");
        }
    }

    #[test]
    fn a_failed_epoch_end_loses_no_page_and_a_set_given_back_comes_again() {
        for mode in [LogMode::Manual, LogMode::Legacy] {
            // Three slots: pages 0-3, 4-7 and 8-255.
            let mut t = Tiny::with_regions(&[(0, 0x4000), (0x4000, 0x4000), (0x8000, 0xf8000)]);
            t.write_pages(&[]);
            let mut d =
                DirtyTracker::start(&t.vm, &t.mem, Sources::GuestAndVmm, mode).expect("start");
            t.load(&[2, 5, 9]);
            let _ = d.end_epoch(&t.vm, &t.mem).expect("end"); // the code the VMM wrote
            t.go();
            t.mem
                .write_obj(7u8, GuestAddress(0x3_0000))
                .expect("vmm write");
            // The second slot's read fails after the first slot was read and armed.
            let vm = &t.vm;
            let failed = d.end_epoch_with(
                &t.mem,
                |slot, len| {
                    if slot == 1 {
                        return Err(DirtyError::Kvm {
                            what: "KVM_GET_DIRTY_LOG",
                            slot,
                            source: kvm_ioctls::Error::new(libc::EIO),
                        });
                    }
                    get_log(vm, slot, len)
                },
                |slot, pages, bits| clear_log(vm, slot, 0, pages, bits),
            );
            assert!(failed.is_err(), "{mode:?}: the injected failure");
            // Page 2 was taken from KVM before the failure, 5 is in the slot that failed
            // (reported whole), 9 and the VMM's 0x30 were never read.
            let next = Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end"));
            assert_eq!(next, vec![2, 4, 5, 6, 7, 9, 0x30], "{mode:?}");
            // Nothing written since: empty, unless given back.
            let set = d.end_epoch(&t.vm, &t.mem).expect("end");
            assert_eq!(Tiny::pages(&set), Vec::<u64>::new());
            t.go();
            let set = d.end_epoch(&t.vm, &t.mem).expect("end");
            assert_eq!(Tiny::pages(&set), vec![2, 5, 9]);
            d.give_back(set);
            assert_eq!(
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
                vec![2, 5, 9],
                "{mode:?}: a set given back"
            );
            d.stop(&t.vm, &t.mem).expect("stop");
        }
    }

    #[test]
    fn hot_pages_stay_writable_and_reported_until_armed_again() {
        for (limit, kept) in [(64, 2), (1, 0)] {
            let mut t = Tiny::new();
            t.write_pages(&[]);
            let mut d = DirtyTracker::start(&t.vm, &t.mem, Sources::GuestAndVmm, LogMode::Manual)
                .expect("start");
            d.keep_hot(limit);
            t.load(&[3, 8]);
            let end = |d: &mut DirtyTracker, t: &Tiny| {
                Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end"))
            };
            assert_eq!(end(&mut d, &t), vec![1], "the code the VMM wrote");
            let mut ends: u64 = 1;
            for _ in 0..2 {
                t.go();
                assert_eq!(end(&mut d, &t), vec![3, 8]);
                ends += 1;
            }
            assert_eq!(
                d.hot_pages(),
                kept,
                "dirty in two epochs running, limit {limit}"
            );
            if kept == 0 {
                assert_eq!(end(&mut d, &t), Vec::<u64>::new(), "over the limit: armed");
                continue;
            }
            // Not written again, still reported: nothing the guest writes to a page kept
            // writable can be missed.
            while !ends.is_multiple_of(HOT_REARM_EVERY) {
                assert_eq!(end(&mut d, &t), vec![3, 8], "kept at end {}", ends + 1);
                ends += 1;
            }
            assert_eq!(d.hot_pages(), 0, "all armed again at end {ends}");
            assert_eq!(
                end(&mut d, &t),
                Vec::<u64>::new(),
                "armed, not written: gone"
            );
            d.stop(&t.vm, &t.mem).expect("stop");
        }
    }

    #[test]
    fn all_dirty_start_reports_every_page_not_armed_yet() {
        let mut t = Tiny::new();
        t.write_pages(&[3]);
        let (mut d, mut arm) =
            DirtyTracker::start_all_dirty(&t.vm, &t.mem, Sources::GuestAndVmm, LogMode::Manual)
                .expect("start")
                .expect("local KVM has INITIALLY_SET");
        // The first 64 pages are copied (armed); the rest never were.
        arm.arm(GuestAddress(0), 64 * PAGE_SIZE).expect("arm");
        t.go();
        let first = Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end"));
        let mut want = vec![3];
        want.extend(64..256);
        assert_eq!(first, want);
        t.go();
        assert_eq!(
            Tiny::pages(&d.end_epoch(&t.vm, &t.mem).expect("end")),
            vec![3]
        );
        assert!(
            DirtyTracker::start_all_dirty(&t.vm, &t.mem, Sources::GuestAndVmm, LogMode::Legacy)
                .expect("legacy")
                .is_none(),
            "legacy mode never starts all dirty"
        );
    }

    #[test]
    fn arming_refuses_ranges_kvm_would_reject() {
        let t = Tiny::new();
        let (_d, mut arm) =
            DirtyTracker::start_all_dirty(&t.vm, &t.mem, Sources::GuestAndVmm, LogMode::Manual)
                .expect("start")
                .expect("local KVM has INITIALLY_SET");
        for (gpa, len) in [
            (PAGE_SIZE, 64 * PAGE_SIZE),        // start not on 64 pages
            (0, 3 * PAGE_SIZE),                 // short, not reaching the end
            (1 << 20, PAGE_SIZE),               // outside RAM
            (192 * PAGE_SIZE, 128 * PAGE_SIZE), // past the region's end
            (0, 0),
        ] {
            let e = arm.arm(GuestAddress(gpa), len).expect_err("refused");
            assert!(matches!(e, DirtyError::Range { .. }), "{e}");
        }
        // The region's tail may be shorter than 64 pages.
        arm.arm(GuestAddress(192 * PAGE_SIZE), 64 * PAGE_SIZE)
            .expect("tail");
    }

    #[test]
    fn clear_dirty_log_request_number_is_the_kernels() {
        assert_eq!(KVM_CLEAR_DIRTY_LOG, 0xc018_aec0);
    }

    #[test]
    fn addresses_follow_the_bits_and_stay_inside_the_region() {
        let set = DirtySet {
            regions: vec![
                RegionDirty {
                    start: GuestAddress(0),
                    len: 70 * PAGE_SIZE,
                    // bit 69 is the last page; bit 70 lies past the region's end.
                    bits: vec![0b101, (1 << 5) | (1 << 6)],
                },
                RegionDirty {
                    start: GuestAddress(1 << 32),
                    len: PAGE_SIZE,
                    bits: vec![1],
                },
            ],
        };
        let got: Vec<u64> = set.addresses().map(|a| a.0).collect();
        assert_eq!(got, vec![0, 2 * PAGE_SIZE, 69 * PAGE_SIZE, 1 << 32]);
        assert_eq!(set.pages(), 5, "pages counts bits");
        let runs: Vec<(u64, u64)> = set.runs().map(|(a, n)| (a.0, n)).collect();
        assert_eq!(
            runs,
            vec![
                (0, 1),
                (2 * PAGE_SIZE, 1),
                (69 * PAGE_SIZE, 1),
                (1 << 32, 1)
            ]
        );
    }

    #[test]
    fn runs_join_neighbours_across_words_but_not_regions() {
        let set = DirtySet {
            regions: vec![
                RegionDirty {
                    start: GuestAddress(0),
                    len: 128 * PAGE_SIZE,
                    // pages 62..=65 straddle a word; 127 ends the region.
                    bits: vec![3 << 62, 0b11 | (1 << 63)],
                },
                RegionDirty {
                    start: GuestAddress(128 * PAGE_SIZE),
                    len: PAGE_SIZE,
                    bits: vec![1],
                },
            ],
        };
        let runs: Vec<(u64, u64)> = set.runs().map(|(a, n)| (a.0 / PAGE_SIZE, n)).collect();
        assert_eq!(runs, vec![(62, 4), (127, 1), (128, 1)]);
    }
}
