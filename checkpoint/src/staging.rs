//! The pages of an epoch, copied at the pause into memory the VMM owns, so that the guest
//! can run on while they are sent or written. The buffer is reused epoch after epoch.

use std::ops::Range;

use vm_memory::{Bytes, GuestAddress};

use crate::dirty::DirtySet;
use crate::shadow::ShadowError;
use crate::{GuestMemory, PAGE_SIZE};

/// The runs of consecutive pages in `addrs` (in address order), as index ranges of at
/// most `max` pages each.
pub fn runs(addrs: &[GuestAddress], max: usize) -> impl Iterator<Item = Range<usize>> + '_ {
    let mut i = 0;
    std::iter::from_fn(move || {
        if i >= addrs.len() {
            return None;
        }
        let start = i;
        i += 1;
        while i < addrs.len() && i - start < max && addrs[i].0 == addrs[i - 1].0 + PAGE_SIZE {
            i += 1;
        }
        Some(start..i)
    })
}

/// Dirty pages of one epoch: their addresses and contents, in address order.
#[derive(Default)]
pub struct Staged {
    pub addrs: Vec<GuestAddress>,
    pub data: Vec<u8>,
}

impl Staged {
    /// Replaces the contents with the pages of `set`, read from `mem` (vCPUs paused).
    pub fn stage(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), ShadowError> {
        self.addrs.clear();
        self.addrs.extend(set.addresses());
        let len = self.addrs.len() * PAGE_SIZE as usize;
        self.data.resize(len, 0);
        // One copy per run of neighbouring pages rather than per page: the address is
        // looked up once and the copy streams.
        let page = PAGE_SIZE as usize;
        for run in runs(&self.addrs, usize::MAX) {
            let at = self.addrs[run.start];
            mem.read_slice(&mut self.data[run.start * page..run.end * page], at)
                .map_err(|source| ShadowError::Read { addr: at.0, source })?;
        }
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::RegionDirty;
    use vm_memory::Address;

    #[test]
    fn staged_pages_follow_the_addresses_across_runs_and_regions() {
        let page = PAGE_SIZE as usize;
        let second = GuestAddress(1 << 20);
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 8 * page), (second, 2 * page)])
            .expect("memory");
        for p in 0..8u64 {
            mem.write_obj(p as u8 + 1, GuestAddress(p * PAGE_SIZE))
                .expect("write");
        }
        mem.write_obj(0x77u8, second.unchecked_add(PAGE_SIZE))
            .expect("write");
        let set = DirtySet {
            regions: vec![
                RegionDirty {
                    start: GuestAddress(0),
                    len: 8 * PAGE_SIZE,
                    bits: vec![0b1110_0101],
                },
                RegionDirty {
                    start: second,
                    len: 2 * PAGE_SIZE,
                    bits: vec![0b10],
                },
            ],
        };
        let mut staged = Staged::default();
        staged.stage(&set, &mem).expect("stage");
        let firsts: Vec<u8> = staged.data.chunks(page).map(|p| p[0]).collect();
        assert_eq!(firsts, vec![1, 3, 6, 7, 8, 0x77]);
        assert_eq!(staged.addrs.len(), 6);
        assert_eq!(staged.addrs[5], second.unchecked_add(PAGE_SIZE));
    }

    #[test]
    fn runs_are_consecutive_pages_cut_at_the_maximum() {
        let addrs: Vec<GuestAddress> = [0u64, 1, 2, 3, 4, 7, 9, 10]
            .iter()
            .map(|p| GuestAddress(p * PAGE_SIZE))
            .collect();
        let got: Vec<Range<usize>> = runs(&addrs, 3).collect();
        assert_eq!(got, vec![0..3, 3..5, 5..6, 6..8]);
        assert_eq!(runs(&addrs, usize::MAX).count(), 3);
        assert_eq!(runs(&[], 3).count(), 0);
    }
}
