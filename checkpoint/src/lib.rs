//! The checkpoint engine: which guest pages changed in an epoch (KVM's dirty log merged
//! with the VMM's own writes), and the tools that prove that set complete.
//!
//! Depends on rust-vmm crates only; `devices/` and `vmm/` build on it.

pub mod digest;
pub mod dirty;
pub mod persist;
pub mod resident;
pub mod seams;
pub mod shadow;
pub mod snapshot;
pub mod staging;
pub mod state;

use vm_memory::bitmap::AtomicBitmap;
use vm_memory::GuestMemoryMmap;

/// Guest memory as every part of mcvmm sees it: each region carries a bitmap in which the
/// VMM's own writes (DMA by devices, used rings) mark their pages.
pub type GuestMemory = GuestMemoryMmap<AtomicBitmap>;

/// Guest page size for dirty tracking.
pub const PAGE_SIZE: u64 = 4096;
