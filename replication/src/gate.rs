//! Output commit on the primary: frames the guest transmits in epoch n are held until the
//! secondary acknowledges checkpoint n, so no client ever sees an answer that the
//! surviving copy would not remember. Received frames are never held.

use std::collections::VecDeque;
use std::io;
use std::sync::{Mutex, MutexGuard, PoisonError};
use std::time::Instant;

use mcvmm_checkpoint::seams::OutputGate;

/// Most bytes held at once; past it frames are dropped, as a congested link would.
pub const MAX_HELD_BYTES: u64 = 64 << 20;

/// Sends a frame out (the tap).
pub type Transmit = Box<dyn Fn(&[u8]) -> io::Result<usize> + Send + Sync>;

#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GateStats {
    pub holding: bool,
    pub held_frames: u64,
    pub held_bytes: u64,
    pub released_frames: u64,
    pub dropped_frames: u64,
    /// Longest a released frame waited, microseconds.
    pub max_hold_us: u64,
    pub total_hold_us: u64,
}

struct Inner {
    holding: bool,
    /// Opened for good (the secondary is gone): nothing is held again.
    opened: bool,
    /// This node lost the fence: nothing is ever sent again.
    dropped: bool,
    /// The epoch now running: frames sent now belong to its checkpoint.
    epoch: u64,
    queue: VecDeque<(u64, Instant, Vec<u8>)>,
    stats: GateStats,
}

pub struct HeldOutput {
    inner: Mutex<Inner>,
    transmit: Transmit,
}

impl HeldOutput {
    /// A gate that lets everything through until `hold_from` is called.
    pub fn new(transmit: Transmit) -> HeldOutput {
        HeldOutput {
            inner: Mutex::new(Inner {
                holding: false,
                opened: false,
                dropped: false,
                epoch: 0,
                queue: VecDeque::new(),
                stats: GateStats::default(),
            }),
            transmit,
        }
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// From now on frames belong to `epoch` and wait for its acknowledgement. Called at
    /// each pause, while no device runs.
    pub fn hold_from(&self, epoch: u64) {
        let mut g = self.lock();
        // A pause that began before the link was lost must not start holding again: no
        // acknowledgement would ever release what it held.
        if g.opened {
            return;
        }
        g.holding = true;
        g.epoch = epoch;
        g.stats.holding = true;
    }

    /// Checkpoint `epoch` is committed on the secondary: its frames (and earlier ones) go.
    pub fn release_through(&self, epoch: u64) {
        let mut g = self.lock();
        while g.queue.front().is_some_and(|f| f.0 <= epoch) {
            if let Some((_, since, frame)) = g.queue.pop_front() {
                self.send(&mut g, since, &frame);
            }
        }
    }

    /// The secondary is gone: release everything held and stop holding.
    pub fn open(&self) {
        let mut g = self.lock();
        g.holding = false;
        g.opened = true;
        g.stats.holding = false;
        while let Some((_, since, frame)) = g.queue.pop_front() {
            self.send(&mut g, since, &frame);
        }
    }

    /// Another node runs the guest now: everything held is dropped unsent, and so is
    /// every frame from now on.
    pub fn discard(&self) {
        let mut g = self.lock();
        g.dropped = true;
        g.opened = true;
        g.holding = false;
        g.stats.holding = false;
        let n = g.queue.len() as u64;
        g.queue.clear();
        g.stats.dropped_frames += n;
        g.stats.held_frames = 0;
        g.stats.held_bytes = 0;
    }

    fn send(&self, g: &mut Inner, since: Instant, frame: &[u8]) {
        let waited = since.elapsed().as_micros() as u64;
        g.stats.held_frames -= 1;
        g.stats.held_bytes -= frame.len() as u64;
        match (self.transmit)(frame) {
            Ok(_) => {
                g.stats.released_frames += 1;
                g.stats.total_hold_us += waited;
                g.stats.max_hold_us = g.stats.max_hold_us.max(waited);
            }
            Err(_) => g.stats.dropped_frames += 1,
        }
    }

    /// Whether a frame of the running epoch waits: ending the epoch now is what lets it go.
    pub fn holds_running_epoch(&self) -> bool {
        let g = self.lock();
        g.holding && g.queue.back().is_some_and(|f| f.0 == g.epoch)
    }

    pub fn stats(&self) -> GateStats {
        self.lock().stats.clone()
    }
}

impl OutputGate for HeldOutput {
    fn hold(&self, frame: &[u8]) -> bool {
        let mut g = self.lock();
        if g.dropped {
            g.stats.dropped_frames += 1;
            return true;
        }
        if !g.holding {
            return false;
        }
        if g.stats.held_bytes + frame.len() as u64 > MAX_HELD_BYTES {
            g.stats.dropped_frames += 1;
            return true;
        }
        g.stats.held_frames += 1;
        g.stats.held_bytes += frame.len() as u64;
        let epoch = g.epoch;
        g.queue.push_back((epoch, Instant::now(), frame.to_vec()));
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn gate() -> (Arc<Mutex<Vec<Vec<u8>>>>, HeldOutput) {
        let sent = Arc::new(Mutex::new(Vec::new()));
        let s = sent.clone();
        let g = HeldOutput::new(Box::new(move |f: &[u8]| {
            s.lock().expect("lock").push(f.to_vec());
            Ok(f.len())
        }));
        (sent, g)
    }

    #[test]
    fn frames_wait_for_their_epoch() {
        let (sent, g) = gate();
        assert!(!g.hold(b"before"), "not holding yet: the device sends");
        g.hold_from(2);
        assert!(g.hold(b"a2"));
        g.hold_from(3);
        assert!(g.hold(b"b3"));
        g.release_through(1);
        assert!(sent.lock().expect("lock").is_empty());
        g.release_through(2);
        assert_eq!(*sent.lock().expect("lock"), vec![b"a2".to_vec()]);
        assert_eq!(g.stats().held_frames, 1);
        g.open();
        assert_eq!(sent.lock().expect("lock").len(), 2);
        assert!(!g.hold(b"after"), "open again: the device sends");
        assert_eq!(g.stats().released_frames, 2);
        g.hold_from(9);
        assert!(
            !g.hold(b"late"),
            "a pause racing the loss does not hold again"
        );
    }

    #[test]
    fn a_fenced_gate_sends_nothing_ever_again() {
        let (sent, g) = gate();
        g.hold_from(2);
        assert!(g.hold(b"a2"));
        g.discard();
        g.release_through(5);
        g.open();
        assert!(g.hold(b"after"), "swallowed, not sent");
        g.hold_from(7);
        assert!(g.hold(b"later"));
        assert!(sent.lock().expect("lock").is_empty());
        assert_eq!(g.stats().dropped_frames, 3);
        assert_eq!(g.stats().held_frames, 0);
    }

    #[test]
    fn only_output_of_the_running_epoch_hurries_its_end() {
        let (_, g) = gate();
        assert!(!g.holds_running_epoch(), "nothing held");
        g.hold_from(2);
        assert!(!g.holds_running_epoch());
        g.hold(b"a2");
        assert!(g.holds_running_epoch());
        g.hold_from(3);
        assert!(
            !g.holds_running_epoch(),
            "epoch 2's frame waits for its ack, not for epoch 3 to end"
        );
        g.hold(b"b3");
        assert!(g.holds_running_epoch());
        g.release_through(3);
        assert!(!g.holds_running_epoch());
        g.hold(b"c3");
        g.open();
        assert!(!g.holds_running_epoch(), "an open gate holds nothing");
    }
}
