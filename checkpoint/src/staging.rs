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
        for (at, page) in self
            .addrs
            .iter()
            .zip(self.data.chunks_exact_mut(PAGE_SIZE as usize))
        {
            mem.read_slice(page, *at)
                .map_err(|source| ShadowError::Read { addr: at.0, source })?;
        }
        Ok(())
    }

    pub fn capacity(&self) -> usize {
        self.data.capacity()
    }
}
