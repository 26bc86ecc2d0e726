//! The pages of an epoch, copied at the pause into memory the VMM owns, so that the guest
//! can run on while they are sent or written. The buffer is reused epoch after epoch.

use vm_memory::{Bytes, GuestAddress};

use crate::dirty::DirtySet;
use crate::shadow::ShadowError;
use crate::{GuestMemory, PAGE_SIZE};

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
        let mut rest = &mut self.data[..];
        for (at, pages) in set.runs() {
            let (run, tail) = rest.split_at_mut((pages * PAGE_SIZE) as usize);
            mem.read_slice(run, at)
                .map_err(|source| ShadowError::Read { addr: at.0, source })?;
            rest = tail;
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
}
