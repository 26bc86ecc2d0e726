//! Which parts of guest RAM have never been given memory. Guest RAM is private anonymous
//! memory: a page the guest (or the VMM) never touched has no page behind it and reads as
//! zeros. Copying such a page is pure cost (a page fault each, under nested paging a slow
//! one) and a big, mostly idle guest is mostly such pages. `/proc/self/pagemap` tells
//! them apart without touching them: neither present nor swapped out.

use std::fs::File;
use std::os::unix::fs::FileExt;

use crate::PAGE_SIZE;

/// pagemap entry bits (Documentation/admin-guide/mm/pagemap.rst).
const PRESENT: u64 = 1 << 63;
const SWAPPED: u64 = 1 << 62;

/// This process's page map.
pub struct Pagemap {
    file: File,
    entries: Vec<u8>,
}

impl Pagemap {
    /// Opens `/proc/self/pagemap`. Without it (no procfs), every page counts as touched.
    pub fn open() -> Option<Pagemap> {
        File::open("/proc/self/pagemap").ok().map(|file| Pagemap {
            file,
            entries: Vec::new(),
        })
    }

    /// Whether any page of `[addr, addr + len)` of this process's private anonymous
    /// memory may hold something other than zeros: is present or swapped out. Errors
    /// count as "yes", so a failure costs a copy, never a page.
    pub fn touched(&mut self, addr: *const u8, len: usize) -> bool {
        let first = addr as u64 / PAGE_SIZE;
        let last = (addr as u64 + len as u64).div_ceil(PAGE_SIZE);
        self.entries.resize(((last - first) * 8) as usize, 0);
        if self
            .file
            .read_exact_at(&mut self.entries, first * 8)
            .is_err()
        {
            return true;
        }
        self.entries.chunks_exact(8).any(|e| {
            let mut word = [0u8; 8];
            word.copy_from_slice(e);
            u64::from_ne_bytes(word) & (PRESENT | SWAPPED) != 0
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::GuestMemory;
    use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

    #[test]
    fn untouched_memory_is_seen_as_such_and_a_written_page_is_not() {
        let Some(mut map) = Pagemap::open() else {
            panic!("no /proc/self/pagemap");
        };
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 << 20)]).expect("memory");
        let region = mem.iter().next().expect("a region");
        let base = region.as_ptr() as *const u8;
        assert!(!map.touched(base, 8 << 20), "fresh memory");
        mem.write_obj(1u8, GuestAddress((6 << 20) + 5))
            .expect("write");
        assert!(map.touched(base, 8 << 20));
        assert!(map.touched(base.wrapping_add(6 << 20), 1 << 20));
        // A transparent huge page may back the 2 MiB around the write, no more.
        assert!(
            !map.touched(base, 4 << 20),
            "the first MiBs are still untouched"
        );
    }
}
