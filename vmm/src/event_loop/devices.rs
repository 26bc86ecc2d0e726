//! The devices as the device loop runs them: their queue notifies (ioeventfds) and taps,
//! nested in an epoll of their own so that parking every device is one change, and the
//! watch for interrupts the guest left unacknowledged.

use std::os::fd::AsRawFd;
use std::time::Duration;

use mcvmm_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::subscriber::{Registry, Source, Subscriber};
use crate::vm::Vm;

/// Tokens inside the devices' own epoll: a queue's notify (device, queue) or a device's
/// own fd (device).
const TOKEN_QUEUE: u64 = 1 << 32;
const TOKEN_IO: u64 = 2 << 32;

/// How often the device loop looks for interrupts the guest left unacknowledged. The
/// lab's nested KVM was seen to lose a virtio interrupt now and then, stalling that
/// device's queues for good; one left set for two looks is raised again.
const INTERRUPT_WATCH: Duration = Duration::from_millis(200);

pub(super) struct Devices {
    epoll: Epoll,
    /// Whether each device's own fd is watched now.
    io_watched: Vec<bool>,
    interrupt_watch: TimerFd,
}

impl Subscriber for Devices {
    fn register(&self, r: &Registry) -> std::io::Result<()> {
        r.watch(self.epoll.as_raw_fd(), Source::Devices)?;
        r.watch(self.interrupt_watch.as_raw_fd(), Source::InterruptWatch)
    }
}

impl Devices {
    /// Adds every device's queue notifies and own fd.
    pub(super) fn new(vm: &Vm) -> std::io::Result<Devices> {
        let mut interrupt_watch = TimerFd::new()?;
        interrupt_watch.reset(INTERRUPT_WATCH, Some(INTERRUPT_WATCH))?;
        let mut devices = Devices {
            epoll: Epoll::new()?,
            io_watched: Vec::new(),
            interrupt_watch,
        };
        for (i, dev) in vm.devices.iter().enumerate() {
            let t = dev
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (q, evt) in t.queue_events.iter().enumerate() {
                devices.epoll.ctl(
                    ControlOperation::Add,
                    evt.as_raw_fd(),
                    EpollEvent::new(EventSet::IN, TOKEN_QUEUE | (i as u64) << 8 | q as u64),
                )?;
            }
            if let Some(fd) = t.device().io_fd() {
                // Watched once the driver is up (see below): before that nobody takes input.
                devices.epoll.ctl(
                    ControlOperation::Add,
                    fd,
                    EpollEvent::new(EventSet::empty(), TOKEN_IO | i as u64),
                )?;
            }
            devices.io_watched.push(false);
            // A restored device may be active already, its driver's buffers posted long ago.
            devices.sync_io(i, &t)?;
        }
        // A restored guest may have notified a queue just before the capture, into the old
        // process's ioeventfd: look at every queue once, as if notified.
        for (i, dev) in vm.devices.iter().enumerate() {
            let mut t = dev
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for q in 0..t.queues.len() {
                t.notify(q);
            }
            devices.sync_io(i, &t)?;
        }
        Ok(devices)
    }

    /// Parks or unparks every device: while parked, the device fds are not watched, so
    /// no device runs and nothing is lost (their events wait).
    pub(super) fn park(&self, r: &Registry, parked: bool) -> std::io::Result<()> {
        r.set_watched(self.epoll.as_raw_fd(), Source::Devices, !parked)
    }

    /// Runs every device with work waiting.
    pub(super) fn on_ready(&mut self, vm: &Vm) -> std::io::Result<()> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.epoll.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            self.run_device(vm, ev.data())?;
        }
        Ok(())
    }

    /// The interrupt watch's timer fired: unless the guest is paused, raises again what
    /// it left unacknowledged.
    pub(super) fn on_interrupt_watch(&mut self, vm: &Vm, paused: bool) {
        let _ = self.interrupt_watch.wait();
        if !paused {
            raise_ignored_interrupts(vm);
        }
    }

    /// Runs the device an event belongs to.
    fn run_device(&mut self, vm: &Vm, token: u64) -> std::io::Result<()> {
        if token & TOKEN_QUEUE != 0 && token < TOKEN_IO {
            let (i, q) = (((token >> 8) & 0xff) as usize, (token & 0xff) as usize);
            let Some(dev) = vm.devices.get(i) else {
                return Ok(());
            };
            let mut dev = dev
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if let Some(evt) = dev.queue_events.get(q) {
                let _ = evt.read();
                dev.notify(q);
            }
            self.sync_io(i, &dev)?;
        } else if token & TOKEN_IO != 0 {
            let i = (token & 0xff) as usize;
            let Some(dev) = vm.devices.get(i) else {
                return Ok(());
            };
            let mut dev = dev
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            dev.io_ready();
            self.sync_io(i, &dev)?;
        }
        Ok(())
    }

    /// Watches device `i`'s own fd (a tap) exactly while it can take input: a device with
    /// nowhere to put input stops being woken for it until it has. Only a device the loop
    /// just ran can change its mind, so only that one is looked at (a net device becomes
    /// active on a vCPU thread, and its driver's first RX kick brings it here).
    fn sync_io(&mut self, i: usize, dev: &MmioTransport) -> std::io::Result<()> {
        let Some(fd) = dev.device().io_fd() else {
            return Ok(());
        };
        let want = dev.wants_io();
        if want != self.io_watched[i] {
            let set = if want {
                EventSet::IN
            } else {
                EventSet::empty()
            };
            self.epoll.ctl(
                ControlOperation::Modify,
                fd,
                EpollEvent::new(set, TOKEN_IO | i as u64),
            )?;
            self.io_watched[i] = want;
        }
        Ok(())
    }
}

/// Raises again each device interrupt the guest left set and unacknowledged since the
/// previous look, and says so: the first few times per device, then every hundredth.
fn raise_ignored_interrupts(vm: &Vm) {
    for dev in &vm.devices {
        let t = dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if t.interrupt.raise_if_ignored() {
            let n = t.interrupt.raised_again();
            if n <= 3 || n % 100 == 0 {
                tracing::warn!(
                    "virtio device type {} (GSI {}): interrupt unacknowledged for over {} ms, raised again ({n} so far)",
                    t.device().device_type(),
                    t.interrupt.gsi,
                    INTERRUPT_WATCH.as_millis()
                );
            }
        }
    }
}
