//! How the device loop learns what to wait on: each subsystem registers its own
//! descriptors, each under the [`Source`] the loop hands its events back by, so the loop
//! knows the subsystems, not their descriptors (Firecracker's subscriber model, kept to
//! what one loop on one thread needs).

use std::os::fd::RawFd;

use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

/// Whose descriptor an event is for.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The VM ended (a vCPU's exit, or the keyboard controller's reset).
    VmExit,
    /// SIGTERM or SIGINT.
    Signal,
    /// A client on the control socket.
    Control,
    /// `ctl epochs`/`selfcheck`: the next epoch is due.
    EpochRun,
    /// A primary's epoch clock.
    Clock(Wake),
    /// A device has work: a queue notified, or its tap has input.
    Devices,
    /// Time to look for interrupts the guest left unacknowledged.
    InterruptWatch,
    /// A `protect`'s connection attempt is over.
    Protected,
    /// etcd decided a claim of the fence.
    Fence,
}

/// What woke a primary's epoch clock.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Wake {
    /// `epoch_ms` went by.
    Regular,
    /// An early end may come now (`--epoch-min-ms` passed).
    Early,
    /// The link sent all it had, or an ack came.
    LinkProgress,
}

const SOURCES: [Source; 11] = [
    Source::VmExit,
    Source::Signal,
    Source::Control,
    Source::EpochRun,
    Source::Clock(Wake::Regular),
    Source::Clock(Wake::Early),
    Source::Clock(Wake::LinkProgress),
    Source::Devices,
    Source::InterruptWatch,
    Source::Protected,
    Source::Fence,
];

impl Source {
    fn token(self) -> u64 {
        SOURCES.iter().position(|s| *s == self).unwrap_or(0) as u64
    }

    /// The source an epoll event's data names; `None` for data no registration wrote.
    pub fn of(token: u64) -> Option<Source> {
        SOURCES.get(usize::try_from(token).ok()?).copied()
    }
}

/// The loop's epoll as subsystems see it.
pub struct Registry<'a>(&'a Epoll);

impl<'a> Registry<'a> {
    pub fn new(epoll: &'a Epoll) -> Registry<'a> {
        Registry(epoll)
    }

    /// Watches `fd` for input, its events handed back as `source`.
    pub fn watch(&self, fd: RawFd, source: Source) -> std::io::Result<()> {
        self.0.ctl(
            ControlOperation::Add,
            fd,
            EpollEvent::new(EventSet::IN, source.token()),
        )
    }

    /// Stops or starts watching `fd`, registered before as `source`.
    pub fn set_watched(&self, fd: RawFd, source: Source, watched: bool) -> std::io::Result<()> {
        let set = if watched {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        self.0.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(set, source.token()),
        )
    }
}

/// A subsystem with descriptors of its own for the device loop to wait on.
pub trait Subscriber {
    /// Registers each of its descriptors under the source its events belong to.
    fn register(&self, r: &Registry) -> std::io::Result<()>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_source_comes_back_from_its_token_and_nothing_else_does() {
        for s in SOURCES {
            assert_eq!(Source::of(s.token()), Some(s));
        }
        assert_eq!(Source::of(SOURCES.len() as u64), None);
        assert_eq!(Source::of(u64::MAX), None);
    }

    #[test]
    fn a_registered_descriptor_wakes_the_loop_as_its_source_until_unwatched() {
        use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
        let epoll = Epoll::new().expect("epoll");
        let r = Registry::new(&epoll);
        let evt = EventFd::new(EFD_NONBLOCK).expect("eventfd");
        use std::os::fd::AsRawFd;
        r.watch(evt.as_raw_fd(), Source::Protected).expect("watch");
        evt.write(1).expect("write");
        let mut events = [EpollEvent::default(); 4];
        let n = epoll.wait(0, &mut events).expect("wait");
        assert_eq!(n, 1);
        assert_eq!(Source::of(events[0].data()), Some(Source::Protected));
        r.set_watched(evt.as_raw_fd(), Source::Protected, false)
            .expect("unwatch");
        assert_eq!(epoll.wait(0, &mut events).expect("wait"), 0);
    }
}
