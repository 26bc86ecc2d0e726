//! The pages of an epoch, copied into memory the VMM owns, so that the guest can run on
//! while they are sent or written. The buffer is reused epoch after epoch.
//!
//! Most of an epoch's pages can be copied *ahead*, with the guest still running: the
//! dirty set read then is copied, and at the pause only the pages written since (the
//! next dirty set, usually a small part) are copied again or added ([`Staged::restage`]).
//! What is staged at the end of the pause is then exactly guest memory at the pause for
//! every page of the union of both sets.

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

/// Dirty pages of one epoch: their addresses and contents, each page once; in address
/// order after [`Staged::stage`], followed by the pages [`Staged::restage`] added.
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

    /// Brings the pages of `set` up to date on top of a `stage` done earlier (nothing
    /// else in between): a page already staged is copied again in its place, a new one
    /// is added after the others. Returns how many pages it copied.
    pub fn restage(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<u64, ShadowError> {
        let page = PAGE_SIZE as usize;
        let ahead = self.addrs.len();
        // Both lists are in address order: one walk finds each page's place. Neighbouring
        // pages whose places are neighbours too are copied in one go.
        let mut next = 0;
        let mut copied = 0;
        let mut pending: Option<(GuestAddress, usize, usize)> = None;
        for at in set.addresses() {
            while next < ahead && self.addrs[next] < at {
                next += 1;
            }
            let slot = if next < ahead && self.addrs[next] == at {
                next
            } else {
                self.addrs.push(at);
                self.data.resize(self.addrs.len() * page, 0);
                self.addrs.len() - 1
            };
            copied += 1;
            pending = match pending {
                Some((first, from, n))
                    if first.0 + (n * page) as u64 == at.0 && from + n == slot =>
                {
                    Some((first, from, n + 1))
                }
                done => {
                    if let Some(done) = done {
                        self.copy_in(mem, done)?;
                    }
                    Some((at, slot, 1))
                }
            };
        }
        if let Some(done) = pending {
            self.copy_in(mem, done)?;
        }
        Ok(copied)
    }

    /// Copies `n` pages from guest address `first` into the places from `slot` on.
    fn copy_in(
        &mut self,
        mem: &GuestMemory,
        (first, slot, n): (GuestAddress, usize, usize),
    ) -> Result<(), ShadowError> {
        let page = PAGE_SIZE as usize;
        mem.read_slice(&mut self.data[slot * page..(slot + n) * page], first)
            .map_err(|source| ShadowError::Read {
                addr: first.0,
                source,
            })
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

    fn set_of(mem_pages: u64, pages: &[u64]) -> DirtySet {
        let mut bits = vec![0u64; mem_pages.div_ceil(64) as usize];
        for &p in pages {
            bits[(p / 64) as usize] |= 1 << (p % 64);
        }
        DirtySet {
            regions: vec![RegionDirty {
                start: GuestAddress(0),
                len: mem_pages * PAGE_SIZE,
                bits,
            }],
        }
    }

    #[test]
    fn restaging_after_a_copy_ahead_gives_memory_at_the_pause_for_both_sets() {
        let page = PAGE_SIZE as usize;
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 16 * page)]).expect("memory");
        let fill = |p: u64, v: u8| {
            mem.write_slice(&[v; PAGE_SIZE as usize], GuestAddress(p * PAGE_SIZE))
                .expect("write")
        };
        for p in 0..16 {
            fill(p, p as u8);
        }
        let mut staged = Staged::default();
        staged
            .stage(&set_of(16, &[2, 3, 4, 8, 12]), &mem)
            .expect("stage");
        // The guest runs on: it writes some staged pages again and some new ones.
        for (p, v) in [
            (3, 0xa3),
            (4, 0xa4),
            (5, 0xa5),
            (6, 0xa6),
            (12, 0xac),
            (15, 0xaf),
        ] {
            fill(p, v);
        }
        let copied = staged
            .restage(&set_of(16, &[3, 4, 5, 6, 12, 15]), &mem)
            .expect("restage");
        assert_eq!(copied, 6);
        let mut got: Vec<(u64, u8)> = staged
            .addrs
            .iter()
            .zip(staged.data.chunks(page))
            .map(|(a, d)| {
                assert!(d.iter().all(|&b| b == d[0]), "a whole page copied");
                (a.0 / PAGE_SIZE, d[0])
            })
            .collect();
        // Staged ahead first, in place; then the new pages.
        assert_eq!(got[..5], [(2, 2), (3, 0xa3), (4, 0xa4), (8, 8), (12, 0xac)]);
        got.sort_unstable();
        assert_eq!(
            got,
            [
                (2, 2),
                (3, 0xa3),
                (4, 0xa4),
                (5, 0xa5),
                (6, 0xa6),
                (8, 8),
                (12, 0xac),
                (15, 0xaf)
            ]
        );
        // Nothing written since the copy ahead: nothing copied, nothing added.
        staged.stage(&set_of(16, &[1, 9]), &mem).expect("stage");
        assert_eq!(staged.restage(&set_of(16, &[]), &mem).expect("restage"), 0);
        assert_eq!(
            staged.addrs,
            [GuestAddress(PAGE_SIZE), GuestAddress(9 * PAGE_SIZE)]
        );
        assert_eq!(staged.data.len(), 2 * page);
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
