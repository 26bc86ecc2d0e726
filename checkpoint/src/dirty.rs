//! Dirty tracking per epoch. KVM logs the pages the guest writes; the VMM's own writes
//! into guest memory (virtio-blk reads, virtio-net RX, used rings) never reach that log
//! and are recorded in each region's `AtomicBitmap` instead. An epoch's dirty set is the
//! union of both; missing either is silent corruption after a failover.

use kvm_bindings::{kvm_userspace_memory_region, KVM_MEM_LOG_DIRTY_PAGES};
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
}

impl DirtyTracker {
    /// Turns on KVM's dirty log on every RAM slot and forgets what the VMM wrote before:
    /// the first epoch starts now. The vCPUs should be paused (or the first epoch's set
    /// may include writes from just before).
    pub fn start(vm: &VmFd, mem: &GuestMemory, sources: Sources) -> Result<Self, DirtyError> {
        register_slots(vm, mem, KVM_MEM_LOG_DIRTY_PAGES)?;
        for region in mem.iter() {
            vmm_bitmap(region).reset();
        }
        Ok(DirtyTracker { sources })
    }

    /// Ends the current epoch and starts the next: the pages written since the previous
    /// call (or `start`). Call it from the thread that runs the devices (a device write
    /// in flight would land in neither set). With the vCPUs out of KVM_RUN the set is
    /// exact; while they run, a page written during the call may be reported now or in
    /// the next set, and is writable without logging until the call returns, so a copy
    /// made after the call (a snapshot's copy-again round) misses nothing.
    pub fn end_epoch(&mut self, vm: &VmFd, mem: &GuestMemory) -> Result<DirtySet, DirtyError> {
        let mut regions = Vec::new();
        for (slot, region) in mem.iter().enumerate() {
            let len = region.len();
            // Without manual protection KVM hands over the log and clears it in one call.
            let mut bits = vm
                .get_dirty_log(slot as u32, len as usize)
                .map_err(|source| DirtyError::Kvm {
                    what: "KVM_GET_DIRTY_LOG",
                    slot: slot as u32,
                    source,
                })?;
            let vmm = vmm_bitmap(region).get_and_reset();
            if self.sources == Sources::GuestAndVmm {
                for (k, v) in bits.iter_mut().zip(vmm) {
                    *k |= v;
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

    /// Turns KVM's dirty log off again.
    pub fn stop(self, vm: &VmFd, mem: &GuestMemory) -> Result<(), DirtyError> {
        register_slots(vm, mem, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

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
