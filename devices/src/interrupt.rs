//! A device's interrupt line: an edge on the device's GSI, raised through a [`Line`]
//! (the VMM's is an irqfd), plus the virtio-mmio InterruptStatus bits the driver reads
//! and acknowledges.
//!
//! The line behaves as a level one would (as QEMU's does): it is up while any status bit
//! is set. So an edge goes to the guest when the status goes from clear to set, or when an
//! acknowledgement leaves a bit set, and not for an event that finds the status still set:
//! the guest's handler, yet to acknowledge, takes that one with the rest. An edge for each
//! event made the guest run its handler again for nothing (two exits to the VMM, reading
//! a status already acknowledged).

use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

pub const INT_USED_RING: u32 = 1;
pub const INT_CONFIG: u32 = 2;

/// `Interrupt::watch` when the status was clear at the last look.
const NOT_PENDING: u64 = u64::MAX;

/// How an edge reaches the guest's interrupt controller.
pub trait Line: Send + Sync {
    /// One edge on the line; called from the device loop and from vCPU threads, so an
    /// implementation must not let two pulses overlap (they would make one edge).
    fn pulse(&self) -> std::io::Result<()>;
}

/// A line that only counts its edges, for tests.
#[derive(Default)]
pub struct CountingLine(AtomicU64);

impl CountingLine {
    /// Edges since the last call.
    pub fn take(&self) -> u64 {
        self.0.swap(0, Ordering::SeqCst)
    }
}

impl Line for CountingLine {
    fn pulse(&self) -> std::io::Result<()> {
        self.0.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

pub struct Interrupt {
    pub gsi: u32,
    line: Arc<dyn Line>,
    status: AtomicU32,
    /// Acknowledgements that cleared a set bit, so a watchdog can tell "still set" from
    /// "set again".
    acks: AtomicU64,
    /// `acks` when the watchdog last saw the status set, or `NOT_PENDING`.
    watch: AtomicU64,
    raised_again: AtomicU64,
}

impl Interrupt {
    pub fn new(gsi: u32, line: Arc<dyn Line>) -> Interrupt {
        Interrupt {
            gsi,
            line,
            status: AtomicU32::new(0),
            acks: AtomicU64::new(0),
            watch: AtomicU64::new(NOT_PENDING),
            raised_again: AtomicU64::new(0),
        }
    }

    /// Sets `bits` in the status register; raises the line if it was down.
    pub fn trigger(&self, bits: u32) {
        if self.status.fetch_or(bits, Ordering::SeqCst) == 0 {
            self.edge();
        }
    }

    /// One edge, whatever the status says (the UART, which has no status here, and a
    /// restored device re-raising what its driver had not acknowledged).
    pub fn raise(&self) -> std::io::Result<()> {
        self.line.pulse()
    }

    fn edge(&self) {
        // An edge that fails (an eventfd counter full: never seen) leaves the status set
        // and unacknowledged, which the watchdog raises again.
        let _ = self.raise();
    }

    pub fn status(&self) -> u32 {
        self.status.load(Ordering::SeqCst)
    }

    /// The driver acknowledged `bits`. Bits it did not (set after it read the status)
    /// keep the line up: the guest is told again.
    pub fn ack(&self, bits: u32) {
        let before = self.status.fetch_and(!bits, Ordering::SeqCst);
        if before & bits != 0 {
            self.acks.fetch_add(1, Ordering::SeqCst);
            if before & !bits != 0 {
                self.edge();
            }
        }
    }

    pub fn set_status(&self, bits: u32) {
        self.status.store(bits, Ordering::SeqCst);
    }

    /// The watchdog's look, called at a steady interval while the guest runs. An edge
    /// the guest never takes leaves the status set for good, and a virtio queue whose
    /// driver waits for that interrupt stalls for good (a NIC stops receiving). So a
    /// status that stayed set, with no acknowledgement at all, since the previous look
    /// is raised again; a spurious edge costs the guest one handler run. Returns true if
    /// it raised the line.
    pub fn raise_if_ignored(&self) -> bool {
        let acks = self.acks.load(Ordering::SeqCst);
        let pending = self.status() != 0;
        let seen = self
            .watch
            .swap(if pending { acks } else { NOT_PENDING }, Ordering::SeqCst);
        if !pending || seen != acks {
            return false;
        }
        self.edge();
        self.raised_again.fetch_add(1, Ordering::SeqCst);
        true
    }

    /// How often the watchdog raised the line again.
    pub fn raised_again(&self) -> u64 {
        self.raised_again.load(Ordering::SeqCst)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn interrupt() -> (Interrupt, Arc<CountingLine>) {
        let line = Arc::new(CountingLine::default());
        (Interrupt::new(5, line.clone()), line)
    }

    #[test]
    fn only_a_status_left_set_without_any_ack_is_raised_again() {
        let (i, line) = interrupt();
        assert!(!i.raise_if_ignored(), "nothing pending");
        i.trigger(INT_USED_RING);
        assert_eq!(line.take(), 1);
        assert!(!i.raise_if_ignored(), "set since less than one interval");
        assert!(i.raise_if_ignored(), "set for a whole interval, no ack");
        assert_eq!(line.take(), 1);
        assert!(i.raise_if_ignored(), "still ignored");
        // The guest acknowledges and the device raises again at once: a new interrupt,
        // not an ignored one.
        i.ack(INT_USED_RING);
        i.trigger(INT_USED_RING);
        assert!(!i.raise_if_ignored());
        i.ack(INT_USED_RING);
        assert!(!i.raise_if_ignored());
        assert!(!i.raise_if_ignored());
        assert_eq!(i.raised_again(), 2);
    }

    #[test]
    fn the_line_is_raised_when_it_goes_up_not_for_each_event() {
        let (i, line) = interrupt();
        i.trigger(INT_USED_RING);
        i.trigger(INT_USED_RING);
        assert_eq!(line.take(), 1, "a second event before the ack");
        i.trigger(INT_CONFIG);
        assert_eq!(line.take(), 0, "still up");
        // The driver read only the used-ring bit before the config change came.
        i.ack(INT_USED_RING);
        assert_eq!(line.take(), 1, "the config bit keeps the line up");
        i.ack(INT_CONFIG);
        assert_eq!(line.take(), 0);
        i.trigger(INT_USED_RING);
        assert_eq!(line.take(), 1, "up again");
    }

    #[test]
    fn an_ack_of_a_clear_bit_does_not_count() {
        let (i, _) = interrupt();
        i.trigger(INT_USED_RING);
        assert!(!i.raise_if_ignored());
        i.ack(INT_CONFIG);
        assert!(i.raise_if_ignored());
    }
}
