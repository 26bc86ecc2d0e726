//! The primary's side of the stream: the handshake, then a sender thread that writes the
//! initial sync and each epoch's checkpoint, and a reader thread that takes the
//! secondary's acks (releasing held output) and notices when it is gone.
//!
//! The device loop makes a [`Capture`] at each pause and hands it over with
//! [`Link::submit`]; it never waits for the network. If the previous checkpoint is still
//! being written when the next epoch ends, the loop lets the epoch run on (it stretches).
//!
//! `link` holds the shared state and the reader of acks, `handshake` connects and starts
//! the two threads, `sender` writes the sync and the checkpoints, `coding` decides how
//! each run of pages goes on the wire.

mod coding;
mod handshake;
mod link;
mod sender;

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::LogArm;
use mcvmm_checkpoint::seams::DiskWriteSink;
use mcvmm_checkpoint::state::MachineState;
use mcvmm_checkpoint::GuestMemory;
use vm_memory::GuestAddress;

use crate::wire::{Kind, WireError};

pub use coding::PageCoding;
pub use handshake::{connect, start};
pub use link::{Link, LinkStats};

/// Idle time after which the sender says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("secondary {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secondary {peer}: no answer to the handshake: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("secondary {peer} refused: {reason}")]
    Refused { peer: String, reason: String },
    #[error("secondary {peer}: unexpected {kind:?} frame in the handshake")]
    Unexpected { peer: String, kind: Kind },
}

/// A guest write forwarded to the secondary.
pub struct Forwarded {
    pub disk: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Collects the guest's disk writes of the epoch in progress, while recording (from the
/// start of a protection until its secondary is lost; `Default` is not recording).
#[derive(Default)]
pub struct ForwardedWrites {
    writes: Mutex<Vec<Forwarded>>,
    recording: AtomicBool,
}

impl ForwardedWrites {
    /// The writes since the last call (at a pause: those of the epoch that just ended).
    pub fn take(&self) -> Vec<Forwarded> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts or stops recording; either way what was kept is dropped (at the start of a
    /// sync the disks themselves are copied; after the loss nobody will take it).
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::SeqCst);
        drop(self.take());
    }
}

impl DiskWriteSink for ForwardedWrites {
    fn recording(&self) -> bool {
        self.recording.load(Ordering::SeqCst)
    }

    fn written(&self, disk: usize, offset: u64, data: Vec<u8>) {
        if !self.recording() {
            return;
        }
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Forwarded {
                disk: disk as u32,
                offset,
                data,
            });
    }
}

/// One epoch's checkpoint, taken at its pause.
pub struct Capture {
    pub epoch: u64,
    pub addrs: Vec<GuestAddress>,
    pub data: Vec<u8>,
    pub state: MachineState,
    pub writes: Vec<Forwarded>,
    pub memory_digest: Option<u64>,
    pub disk_digests: Option<Vec<u64>>,
    pub taken: Instant,
}

/// What the initial sync copies: all RAM (while the guest runs; pages written meanwhile
/// are in the first checkpoint) and every disk chunk whose digest differs from the
/// secondary's.
pub struct SyncSource {
    pub mem: GuestMemory,
    pub disks: Vec<File>,
    pub theirs: Vec<Vec<u64>>,
    pub chunk: u64,
    /// A dirty log started with every page dirty: each span is armed just before it is
    /// read. `None`: the log was armed all at once before the sync began.
    pub arm: Option<LogArm>,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_kept_only_while_recording() {
        let w = ForwardedWrites::default();
        assert!(!w.recording());
        w.written(0, 0, vec![1]);
        assert!(w.take().is_empty(), "idle: nothing kept");
        w.record(true);
        w.written(1, 512, vec![2; 512]);
        let taken = w.take();
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].disk, taken[0].offset), (1, 512));
        w.written(0, 0, vec![3]);
        w.record(false);
        assert!(w.take().is_empty(), "stopping drops what nobody will send");
        w.written(0, 0, vec![4]);
        assert!(w.take().is_empty());
    }
}
