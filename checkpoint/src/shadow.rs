//! The epoch self-check: a shadow copy of guest memory that is updated *only* from the
//! dirty sets. If tracking is complete, the shadow equals guest memory at every pause; a
//! page that differs was written without showing in any dirty set.

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::dirty::DirtySet;
use crate::{GuestMemory, PAGE_SIZE};

#[derive(Debug, thiserror::Error)]
pub enum ShadowError {
    #[error("reading guest memory at {addr:#x}: {source}")]
    Read {
        addr: u64,
        source: vm_memory::GuestMemoryError,
    },
    #[error("the dirty set names {0:#x}, which is not in the shadow")]
    Outside(u64),
}

/// A copy of all of guest RAM, region by region.
pub struct Shadow {
    regions: Vec<(GuestAddress, Vec<u8>)>,
}

fn read(mem: &GuestMemory, at: GuestAddress, buf: &mut [u8]) -> Result<(), ShadowError> {
    mem.read_slice(buf, at)
        .map_err(|source| ShadowError::Read { addr: at.0, source })
}

impl Shadow {
    /// Copies all of `mem` (vCPUs paused, tracking started at the same pause).
    pub fn new(mem: &GuestMemory) -> Result<Shadow, ShadowError> {
        let mut regions = Vec::new();
        for region in mem.iter() {
            let mut copy = vec![0u8; region.len() as usize];
            read(mem, region.start_addr(), &mut copy)?;
            regions.push((region.start_addr(), copy));
        }
        Ok(Shadow { regions })
    }

    fn page_mut(&mut self, at: GuestAddress) -> Option<&mut [u8]> {
        self.regions.iter_mut().find_map(|(start, data)| {
            let off = at.0.checked_sub(start.0)? as usize;
            data.get_mut(off..off + PAGE_SIZE as usize)
        })
    }

    /// Brings the dirty pages of `set` over from `mem`.
    pub fn apply(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), ShadowError> {
        let pages: Vec<GuestAddress> = set.addresses().collect();
        self.refresh(&pages, mem)
    }

    /// Copies the pages at `pages` over from `mem` (after a mismatch was reported, so the
    /// next comparison names only new ones).
    pub fn refresh(
        &mut self,
        pages: &[GuestAddress],
        mem: &GuestMemory,
    ) -> Result<(), ShadowError> {
        for &at in pages {
            let page = self.page_mut(at).ok_or(ShadowError::Outside(at.0))?;
            read(mem, at, page)?;
        }
        Ok(())
    }

    /// The pages where the shadow and `mem` differ. The vCPUs must be paused and the
    /// device loop be the caller: guest memory is compared in place, and nothing may
    /// write it meanwhile.
    pub fn mismatches(&self, mem: &GuestMemory) -> Result<Vec<GuestAddress>, ShadowError> {
        let mut bad = Vec::new();
        for ((start, copy), region) in self.regions.iter().zip(mem.iter()) {
            if region.start_addr() != *start || region.len() != copy.len() as u64 {
                return Err(ShadowError::Outside(region.start_addr().0));
            }
            // SAFETY: the region's mapping is live for as long as `mem` and spans
            // `len` bytes; per this function's contract nothing writes guest memory
            // while the shared view exists (it ends with this loop iteration).
            let real = unsafe { std::slice::from_raw_parts(region.as_ptr(), copy.len()) };
            const CHUNK: usize = 1 << 16;
            for (c, (r, s)) in real.chunks(CHUNK).zip(copy.chunks(CHUNK)).enumerate() {
                if r == s {
                    continue;
                }
                let pages = r
                    .chunks(PAGE_SIZE as usize)
                    .zip(s.chunks(PAGE_SIZE as usize));
                for (i, (rp, sp)) in pages.enumerate() {
                    if rp != sp {
                        bad.push(start.unchecked_add((c * CHUNK) as u64 + i as u64 * PAGE_SIZE));
                    }
                }
            }
        }
        Ok(bad)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dirty::RegionDirty;

    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), 16 * PAGE_SIZE as usize)]).expect("memory")
    }

    #[test]
    fn a_write_outside_the_dirty_set_is_a_mismatch_and_one_inside_is_not() {
        let mem = memory();
        let mut shadow = Shadow::new(&mem).expect("shadow");
        mem.write_obj(0xabu8, GuestAddress(3 * PAGE_SIZE + 7))
            .expect("write");
        mem.write_obj(0xcdu8, GuestAddress(9 * PAGE_SIZE))
            .expect("write");
        let set = DirtySet {
            regions: vec![RegionDirty {
                start: GuestAddress(0),
                len: 16 * PAGE_SIZE,
                bits: vec![1 << 3],
            }],
        };
        shadow.apply(&set, &mem).expect("apply");
        assert_eq!(
            shadow.mismatches(&mem).expect("compare"),
            vec![GuestAddress(9 * PAGE_SIZE)]
        );
    }
}
