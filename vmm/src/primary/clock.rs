//! When a primary's epochs end: the device loop's timers and the link's progress event.

use std::os::fd::AsRawFd;
use std::time::{Duration, Instant};

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use super::Primary;
use crate::subscriber::{Registry, Source, Subscriber, Wake};
use crate::vm::Vm;

/// The device loop's clock for a primary's epochs: a timer for `epoch_ms` after each
/// pause, one for an early end that must wait for `--epoch-min-ms`, and the link's
/// progress event.
pub struct EpochClock {
    every: Duration,
    regular: TimerFd,
    early: TimerFd,
    early_at: Option<Instant>,
    link_progress: EventFd,
}

impl Subscriber for EpochClock {
    /// The regular timer, the early timer and the link's progress event (all sent, or
    /// an ack).
    fn register(&self, r: &Registry) -> std::io::Result<()> {
        r.watch(self.regular.as_raw_fd(), Source::Clock(Wake::Regular))?;
        r.watch(self.early.as_raw_fd(), Source::Clock(Wake::Early))?;
        r.watch(
            self.link_progress.as_raw_fd(),
            Source::Clock(Wake::LinkProgress),
        )
    }
}

impl EpochClock {
    pub fn new() -> std::io::Result<EpochClock> {
        Ok(EpochClock {
            every: Duration::ZERO,
            regular: TimerFd::new()?,
            early: TimerFd::new()?,
            early_at: None,
            link_progress: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// Starts timing `p`'s epochs; the link wakes the loop whenever it has sent all or
    /// an ack arrives.
    pub fn start(&mut self, p: &Primary) -> std::io::Result<()> {
        let progress = self.link_progress.try_clone()?;
        p.link.on_progress(Box::new(move || {
            let _ = progress.write(1);
        }));
        self.every = Duration::from_millis(p.epoch_ms);
        self.regular_from_now()
    }

    fn regular_from_now(&mut self) -> std::io::Result<()> {
        Ok(self.regular.reset(self.every, None)?)
    }

    /// The regular timer fired: the epoch ends if it can, and the next one is due
    /// `epoch_ms` from now either way (an epoch that could not end ends once the link is
    /// free, see [`Primary::end_soon`]). `p` is `None` while the operator has the guest
    /// paused: its epoch runs on.
    pub fn on_regular(&mut self, p: Option<&mut Primary>, vm: &Vm) -> std::io::Result<()> {
        if self.regular.is_armed()? {
            // Re-armed (a new protection) after it fired, in the same round of events:
            // nothing is due, and a read would wait for the new expiry.
            return Ok(());
        }
        let _ = self.regular.wait();
        if let Some(p) = p {
            p.tick(vm, false);
        }
        self.regular_from_now()
    }

    /// The early timer or the link's progress event fired; what it means is looked at in
    /// [`EpochClock::after_events`].
    pub fn on_wake(&mut self, wake: Wake) {
        if wake == Wake::Early {
            if !matches!(self.early.is_armed(), Ok(true)) {
                let _ = self.early.wait();
            }
            self.early_at = None;
        } else {
            let _ = self.link_progress.read();
        }
    }

    /// After each round of events (a frame the guest sent may be waiting now): ends the
    /// epoch if it should end now, or arms the early timer for when it should.
    pub fn after_events(&mut self, p: &mut Primary, vm: &Vm) -> std::io::Result<()> {
        let Some(d) = p.end_soon() else {
            return Ok(());
        };
        if d.is_zero() {
            if p.tick(vm, true) {
                self.early_at = None;
                self.early.clear()?;
                self.regular_from_now()?;
            }
            return Ok(());
        }
        let at = Instant::now() + d;
        if self.early_at.is_none_or(|e| e > at) {
            self.early.reset(d, None)?;
            self.early_at = Some(at);
        }
        Ok(())
    }
}
