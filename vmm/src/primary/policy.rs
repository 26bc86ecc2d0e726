//! When a primary's epoch ends, as plain data: what the link and the output gate say is
//! read by the caller and handed in, so the rules can be tested without a VM or a peer.

use std::time::{Duration, Instant};

/// The link's and the gate's state, read once.
#[derive(Debug, Clone, Copy, Default)]
pub struct LinkView {
    pub lost: bool,
    /// The initial sync is done.
    pub synced: bool,
    /// The previous checkpoint is still being sent.
    pub busy: bool,
    /// The last epoch the secondary acknowledged.
    pub acked: u64,
    /// The guest has output held for the running epoch.
    pub output_waiting: bool,
}

impl LinkView {
    fn free(&self) -> bool {
        !self.lost && self.synced && !self.busy
    }
}

/// What the rules remember between calls.
#[derive(Debug)]
pub struct EpochPolicy {
    /// An epoch with output waiting ends once it is this old (`--epoch-min-ms`).
    epoch_min: Option<Duration>,
    /// When the running epoch began (the end of the previous pause).
    began: Instant,
    /// The running epoch found the link busy when it was due: it ends as soon as the
    /// link is free.
    overdue: bool,
    /// Epochs that ran on for a busy link.
    pub stretched: u64,
    /// Epochs ended before their time for the guest's output.
    pub early_epochs: u64,
}

impl EpochPolicy {
    pub fn new(epoch_min: Option<Duration>, now: Instant) -> EpochPolicy {
        EpochPolicy {
            epoch_min,
            began: now,
            overdue: false,
            stretched: 0,
            early_epochs: 0,
        }
    }

    pub fn epoch_min(&self) -> Option<Duration> {
        self.epoch_min
    }

    /// How soon the running epoch (`epoch`) should end, if sooner than its regular end:
    /// at once when it ran on for a busy link that is free now; when the guest has
    /// output waiting for it and every earlier checkpoint is acknowledged, once it is
    /// `epoch_min` old. `None` when the link is busy (its going idle wakes the device
    /// loop), an ack is awaited (its arrival does), or nothing hurries. `link` is only
    /// read when the answer depends on it (it takes locks).
    ///
    /// Waiting for the acks bounds the pauses of a guest that sends all the time to one
    /// per round trip to the secondary (its output could not leave sooner anyway); a
    /// request/response client finds the previous checkpoint acknowledged, since that is
    /// what released the previous answer.
    pub fn end_soon(
        &self,
        epoch: u64,
        now: Instant,
        link: impl FnOnce() -> LinkView,
    ) -> Option<Duration> {
        if !self.overdue && self.epoch_min.is_none() {
            return None;
        }
        let link = link();
        if !link.free() {
            return None;
        }
        if self.overdue {
            return Some(Duration::ZERO);
        }
        let min = self.epoch_min?;
        (link.output_waiting && link.acked + 1 >= epoch)
            .then(|| min.saturating_sub(now.saturating_duration_since(self.began)))
    }

    /// Whether the epoch may end now, asked when it is due. A link still syncing or
    /// sending makes it run on; one that is merely busy counts it stretched, once.
    pub fn may_end(&mut self, link: &LinkView) -> bool {
        if link.free() {
            return true;
        }
        if !link.lost && link.synced && !self.overdue {
            self.stretched += 1;
            self.overdue = true;
        }
        false
    }

    /// An epoch ended at `now`; `early`: it was ended for the guest's output.
    pub fn ended(&mut self, now: Instant, early: bool) {
        if early && !self.overdue {
            self.early_epochs += 1;
        }
        self.overdue = false;
        self.began = now;
    }

    /// An attempt to end the epoch failed at `now`: the next one begins anyway.
    pub fn failed(&mut self, now: Instant) {
        self.overdue = false;
        self.began = now;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn free(acked: u64, output_waiting: bool) -> LinkView {
        LinkView {
            synced: true,
            acked,
            output_waiting,
            ..LinkView::default()
        }
    }

    fn busy() -> LinkView {
        LinkView {
            synced: true,
            busy: true,
            ..LinkView::default()
        }
    }

    #[test]
    fn fixed_epochs_never_end_early_and_never_read_the_link() {
        let p = EpochPolicy::new(None, Instant::now());
        let read = || -> LinkView { panic!("the link was read") };
        assert_eq!(p.end_soon(5, Instant::now(), read), None);
    }

    #[test]
    fn an_epoch_held_back_by_a_busy_link_ends_once_it_is_free_and_counts_once() {
        let t0 = Instant::now();
        let mut p = EpochPolicy::new(None, t0);
        assert!(!p.may_end(&busy()));
        assert!(!p.may_end(&busy()), "still busy at the next tick");
        assert_eq!(p.stretched, 1, "one stretched epoch, however many ticks");
        assert_eq!(
            p.end_soon(3, t0, busy),
            None,
            "the link's going idle wakes the loop"
        );
        assert_eq!(p.end_soon(3, t0, || free(2, false)), Some(Duration::ZERO));
        assert!(p.may_end(&free(2, false)));
        p.ended(t0, true);
        assert_eq!(p.early_epochs, 0, "an overdue epoch is not an early one");
        assert_eq!(p.end_soon(4, t0, || free(3, false)), None);
    }

    #[test]
    fn the_sync_and_a_lost_link_hold_the_epoch_without_stretching_it() {
        let mut p = EpochPolicy::new(None, Instant::now());
        let syncing = LinkView::default();
        assert!(!p.may_end(&syncing));
        let lost = LinkView {
            lost: true,
            synced: true,
            ..LinkView::default()
        };
        assert!(!p.may_end(&lost));
        assert_eq!(p.stretched, 0);
    }

    #[test]
    fn output_waits_for_the_minimum_epoch_and_for_the_acks_before_it() {
        let t0 = Instant::now();
        let min = Duration::from_millis(4);
        let p = EpochPolicy::new(Some(min), t0);
        let later = t0 + Duration::from_millis(1);
        // Epoch 7 runs; 6 is acknowledged: 3 ms to go.
        assert_eq!(
            p.end_soon(7, later, || free(6, true)),
            Some(Duration::from_millis(3))
        );
        assert_eq!(
            p.end_soon(7, t0 + Duration::from_millis(9), || free(6, true)),
            Some(Duration::ZERO)
        );
        assert_eq!(
            p.end_soon(7, later, || free(5, true)),
            None,
            "an ack awaited"
        );
        assert_eq!(p.end_soon(7, later, || free(6, false)), None, "no output");
        assert_eq!(p.end_soon(7, later, busy), None);
    }

    #[test]
    fn an_early_end_for_output_is_counted_and_starts_the_next_epoch() {
        let t0 = Instant::now();
        let mut p = EpochPolicy::new(Some(Duration::from_millis(4)), t0);
        let t1 = t0 + Duration::from_millis(5);
        p.ended(t1, true);
        assert_eq!(p.early_epochs, 1);
        assert_eq!(
            p.end_soon(8, t1 + Duration::from_millis(1), || free(7, true)),
            Some(Duration::from_millis(3))
        );
        p.failed(t1);
        assert_eq!(p.early_epochs, 1);
    }
}
