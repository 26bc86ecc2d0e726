//! The device loop: one thread that runs every device. It waits on the queue notifies
//! (ioeventfds) and taps — nested in an epoll of their own, so that parking the devices
//! is one change — the control socket, the epoch timer, the VM's exit event and
//! SIGTERM/SIGINT.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;
use std::time::Duration;

use mcvmm_devices::virtio::mmio::MmioTransport;
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

mod requests;

use crate::api::{answer, Answer, Refusal, Yes};
use crate::epochs::{EpochRun, PAUSE_LIMIT};
use crate::primary::{EpochClock, Primary};
use crate::protect::{Pending, Protectable};
use crate::snapshot::Snapshots;
use crate::vcpu::{ExitReason, PauseError};
use crate::vm::Vm;

const TOKEN_EXIT: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_EPOCH: u64 = 4;
const TOKEN_DEVICES: u64 = 5;
const TOKEN_REPLICATION: u64 = 6;
const TOKEN_INTERRUPT_WATCH: u64 = 7;
const TOKEN_EPOCH_EARLY: u64 = 8;
const TOKEN_LINK_PROGRESS: u64 = 9;
const TOKEN_CONNECTED: u64 = 10;
const TOKEN_QUEUE: u64 = 1 << 32;
const TOKEN_IO: u64 = 2 << 32;

/// How often the device loop looks for interrupts the guest left unacknowledged. The
/// lab's nested KVM was seen to lose a virtio interrupt now and then, stalling that
/// device's queues for good; one left set for two looks is raised again.
const INTERRUPT_WATCH: Duration = Duration::from_millis(200);

/// signalfd for SIGTERM and SIGINT; both must already be blocked in every thread.
pub struct SignalFd(RawFd);

impl SignalFd {
    /// Blocks SIGTERM and SIGINT in this thread (and threads spawned after) and returns a
    /// descriptor that reads them.
    pub fn block_and_open() -> std::io::Result<SignalFd> {
        // SAFETY: sigset operations on a local set; sigprocmask and signalfd take valid
        // pointers to it.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::sigaddset(&mut set, libc::SIGINT);
            if libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
            let fd = libc::signalfd(-1, &set, libc::SFD_NONBLOCK | libc::SFD_CLOEXEC);
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            Ok(SignalFd(fd))
        }
    }
}

impl SignalFd {
    /// Waits up to `ms` for SIGTERM or SIGINT; true if one came (it is consumed).
    pub fn wait(&self, ms: i32) -> bool {
        let mut pfd = libc::pollfd {
            fd: self.0,
            events: libc::POLLIN,
            revents: 0,
        };
        // SAFETY: one valid pollfd on the stack.
        let n = unsafe { libc::poll(&mut pfd, 1, ms) };
        if n <= 0 {
            return false;
        }
        let mut info = [0u8; 128];
        // SAFETY: reads at most the buffer's size into it.
        unsafe { libc::read(self.0, info.as_mut_ptr().cast(), info.len()) };
        true
    }
}

impl Drop for SignalFd {
    fn drop(&mut self) {
        // SAFETY: our own descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn add(epoll: &Epoll, fd: RawFd, token: u64) -> std::io::Result<()> {
    epoll.ctl(
        ControlOperation::Add,
        fd,
        EpollEvent::new(EventSet::IN, token),
    )
}

/// Watches device `i`'s own fd (a tap) exactly while it can take input: a device with
/// nowhere to put input stops being woken for it until it has. Only a device the loop just
/// ran can change its mind, so only that one is looked at (a net device becomes active on
/// a vCPU thread, and its driver's first RX kick brings it here).
fn sync_io(
    epoll: &Epoll,
    i: usize,
    dev: &MmioTransport,
    io_watched: &mut [bool],
) -> std::io::Result<()> {
    let Some(fd) = dev.device().io_fd() else {
        return Ok(());
    };
    let want = dev.wants_io();
    if want != io_watched[i] {
        let set = if want {
            EventSet::IN
        } else {
            EventSet::empty()
        };
        epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(set, TOKEN_IO | i as u64),
        )?;
        io_watched[i] = want;
    }
    Ok(())
}

/// Parks or unparks every device: while parked, the device fds (nested in their own
/// epoll) are not watched, so no device runs and nothing is lost (their events wait).
fn park_devices(epoll: &Epoll, devices: &Epoll, parked: bool) -> std::io::Result<()> {
    let set = if parked {
        EventSet::empty()
    } else {
        EventSet::IN
    };
    epoll.ctl(
        ControlOperation::Modify,
        devices.as_raw_fd(),
        EpollEvent::new(set, TOKEN_DEVICES),
    )
}

/// What this VMM is to its guest's protection.
pub enum Role {
    Standalone,
    /// Replicating to a secondary.
    Primary(Box<Primary>),
    /// A secondary that took over: an unprotected primary (`Protectable::took_over` says
    /// from what).
    TookOver,
}

impl Role {
    fn status(&self, v: &mut serde_json::Value) {
        match self {
            Role::Standalone => {
                v["role"] = json!("standalone");
                v["protected"] = json!(false);
            }
            Role::Primary(p) => {
                let r = p.status();
                v["role"] = json!("primary");
                v["protected"] = r["protected"].clone();
                v["replication"] = r;
            }
            Role::TookOver => {
                v["role"] = json!("primary");
                v["protected"] = json!(false);
            }
        }
    }
}

/// Runs the devices until the VM ends; returns why it ended.
pub fn run(
    vm: &Vm,
    signals: &SignalFd,
    api: Option<&UnixListener>,
    role: &mut Role,
    protectable: &mut Protectable,
) -> std::io::Result<ExitReason> {
    DeviceLoop::new(vm, signals, api, role, protectable)?.run()
}

/// The job that owns KVM's dirty log: only one may at a time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum LogOwner {
    Nobody,
    /// A primary's replication (also once its secondary is lost: until a restart).
    Replication,
    /// `ctl epochs` or `ctl selfcheck`.
    Epochs,
    /// Snapshots, since the first one (an incremental one needs every page since).
    Snapshots,
}

/// The device loop's state: what it waits on and what the VM is doing.
struct DeviceLoop<'a> {
    vm: &'a Vm,
    api: Option<&'a UnixListener>,
    role: &'a mut Role,
    protectable: &'a mut Protectable,
    epoll: Epoll,
    /// The devices' own fds, nested: parking them all is one change.
    devices: Epoll,
    io_watched: Vec<bool>,
    /// `ctl epochs`/`selfcheck`: one shot, armed again after each pause.
    epoch_timer: TimerFd,
    clock: EpochClock,
    interrupt_watch: TimerFd,
    /// Written when a `protect`'s connection attempt is over.
    connected: EventFd,
    paused: bool,
    epochs: Option<EpochRun>,
    snaps: Snapshots,
    pending: Option<Pending>,
}

impl<'a> DeviceLoop<'a> {
    fn new(
        vm: &'a Vm,
        signals: &SignalFd,
        api: Option<&'a UnixListener>,
        role: &'a mut Role,
        protectable: &'a mut Protectable,
    ) -> std::io::Result<DeviceLoop<'a>> {
        let epoll = Epoll::new()?;
        add(&epoll, vm.exit.evt.as_raw_fd(), TOKEN_EXIT)?;
        add(&epoll, signals.0, TOKEN_SIGNAL)?;
        if let Some(l) = api {
            l.set_nonblocking(true)?;
            add(&epoll, l.as_raw_fd(), TOKEN_API)?;
        }
        let epoch_timer = TimerFd::new()?;
        add(&epoll, epoch_timer.as_raw_fd(), TOKEN_EPOCH)?;
        let mut clock = EpochClock::new()?;
        for (fd, token) in
            clock
                .fds()
                .into_iter()
                .zip([TOKEN_REPLICATION, TOKEN_EPOCH_EARLY, TOKEN_LINK_PROGRESS])
        {
            add(&epoll, fd, token)?;
        }
        if let Role::Primary(p) = &*role {
            clock.start(p)?;
        }
        let mut interrupt_watch = TimerFd::new()?;
        add(&epoll, interrupt_watch.as_raw_fd(), TOKEN_INTERRUPT_WATCH)?;
        interrupt_watch.reset(INTERRUPT_WATCH, Some(INTERRUPT_WATCH))?;
        let connected = EventFd::new(EFD_NONBLOCK)?;
        add(&epoll, connected.as_raw_fd(), TOKEN_CONNECTED)?;
        let devices = Epoll::new()?;
        add(&epoll, devices.as_raw_fd(), TOKEN_DEVICES)?;
        let io_watched = watch_devices(vm, &devices)?;
        Ok(DeviceLoop {
            vm,
            api,
            role,
            protectable,
            epoll,
            devices,
            io_watched,
            epoch_timer,
            clock,
            interrupt_watch,
            connected,
            paused: false,
            epochs: None,
            snaps: Snapshots::default(),
            pending: None,
        })
    }

    fn run(&mut self) -> std::io::Result<ExitReason> {
        let mut events = vec![EpollEvent::default(); 64];
        loop {
            let n = match self.epoll.wait(-1, &mut events) {
                Ok(n) => n,
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            for ev in &events[..n] {
                if let Some(reason) = self.on_event(ev.data())? {
                    return Ok(reason);
                }
            }
            if let (Role::Primary(p), false) = (&mut *self.role, self.paused) {
                self.clock.after_events(p, self.vm)?;
            }
        }
    }

    fn on_event(&mut self, token: u64) -> std::io::Result<Option<ExitReason>> {
        match token {
            TOKEN_EXIT => {
                let _ = self.vm.exit.evt.read();
                // The i8042 writes the same eventfd without a reason: a guest reset.
                let reason = self
                    .vm
                    .exit
                    .reason()
                    .unwrap_or(ExitReason::GuestEnded(crate::vcpu::I8042_RESET));
                return Ok(Some(reason));
            }
            TOKEN_SIGNAL => return Ok(Some(ExitReason::Stopped)),
            TOKEN_API => return self.on_api(),
            TOKEN_EPOCH => self.on_epoch_timer()?,
            TOKEN_REPLICATION => {
                // A VM paused by the operator stays paused: its epoch runs on.
                let p = match (&mut *self.role, self.paused) {
                    (Role::Primary(p), false) => Some(&mut **p),
                    _ => None,
                };
                self.clock.on_regular(p, self.vm)?;
            }
            TOKEN_EPOCH_EARLY | TOKEN_LINK_PROGRESS => {
                self.clock.on_wake(token == TOKEN_EPOCH_EARLY);
            }
            TOKEN_CONNECTED => {
                let _ = self.connected.read();
                self.on_connected()?;
            }
            TOKEN_INTERRUPT_WATCH => {
                let _ = self.interrupt_watch.wait();
                if !self.paused {
                    raise_ignored_interrupts(self.vm);
                }
            }
            TOKEN_DEVICES => self.on_devices()?,
            _ => {}
        }
        Ok(None)
    }

    /// Who owns the dirty log now.
    fn log_owner(&self) -> LogOwner {
        if matches!(self.role, Role::Primary(_)) {
            LogOwner::Replication
        } else if self.epochs.is_some() {
            LogOwner::Epochs
        } else if self.snaps.tracking() {
            LogOwner::Snapshots
        } else {
            LogOwner::Nobody
        }
    }

    fn on_epoch_timer(&mut self) -> std::io::Result<()> {
        let _ = self.epoch_timer.wait();
        let Some(c) = self.epochs.as_mut() else {
            return Ok(());
        };
        if self.paused {
            // The operator's pause holds; the epoch waits for the resume.
            self.epoch_timer.reset(c.interval, None)?;
            return Ok(());
        }
        let outcome = c.epoch(self.vm);
        if matches!(outcome, Ok(false)) {
            self.epoch_timer.reset(c.interval, None)?;
            return Ok(());
        }
        self.epoch_timer.clear()?;
        if let Some(c) = self.epochs.take() {
            let stream = c.reply_to.try_clone();
            let mut report = c.finish(self.vm);
            if let Err(e) = outcome {
                report["error"] = json!(e.to_string());
            }
            if let Ok(s) = stream {
                answer(&s, Ok(Answer::Report(report)));
            }
        }
        Ok(())
    }

    /// A `protect`'s connection attempt is over: the guest is protected from now on, or
    /// the request gets why not.
    fn on_connected(&mut self) -> std::io::Result<()> {
        let Some(p) = self.pending.take() else {
            return Ok(());
        };
        let peer = p.peer.clone();
        let refuse = cannot_protect(self.paused, self.log_owner());
        let (result, reply_to) = p.finish(self.vm, self.protectable, refuse);
        let outcome = match result {
            Ok(primary) => {
                self.clock.start(&primary)?;
                *self.role = Role::Primary(Box::new(primary));
                Ok(Answer::Protecting {
                    ok: Yes,
                    secondary: peer,
                    generation: self.protectable.generation,
                    syncing: true,
                })
            }
            Err(e) => Err(Refusal::failed(e)),
        };
        answer(&reply_to, outcome);
        Ok(())
    }

    fn on_devices(&mut self) -> std::io::Result<()> {
        let mut events = [EpollEvent::default(); 64];
        let n = match self.devices.wait(0, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => return Ok(()),
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            run_device(self.vm, &self.devices, ev.data(), &mut self.io_watched)?;
        }
        Ok(())
    }

    fn park_devices(&self, parked: bool) -> std::io::Result<()> {
        park_devices(&self.epoll, &self.devices, parked)
    }
}

/// Adds every device's queue notifies and own fd to `devices`; returns which own fds
/// are watched.
fn watch_devices(vm: &Vm, devices: &Epoll) -> std::io::Result<Vec<bool>> {
    let mut io_watched = Vec::new();
    for (i, dev) in vm.devices.iter().enumerate() {
        let t = dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (q, evt) in t.queue_events.iter().enumerate() {
            add(
                devices,
                evt.as_raw_fd(),
                TOKEN_QUEUE | (i as u64) << 8 | q as u64,
            )?;
        }
        if let Some(fd) = t.device().io_fd() {
            // Watched once the driver is up (see below): before that nobody takes input.
            devices.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), TOKEN_IO | i as u64),
            )?;
        }
        io_watched.push(false);
        // A restored device may be active already, its driver's buffers posted long ago.
        sync_io(devices, i, &t, &mut io_watched)?;
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
        sync_io(devices, i, &t, &mut io_watched)?;
    }
    Ok(io_watched)
}

/// Why the guest cannot start being protected now, if it cannot.
fn cannot_protect(paused: bool, owner: LogOwner) -> Option<&'static str> {
    if paused {
        return Some("the guest is paused: resume it first");
    }
    match owner {
        LogOwner::Epochs => Some("epochs are running: protect after them"),
        LogOwner::Snapshots => Some("incremental snapshots own dirty tracking in this process"),
        LogOwner::Nobody | LogOwner::Replication => None,
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

/// Each vCPU's summary, read at a pause of its own unless the VM is paused already.
fn vcpu_summaries(vm: &Vm, paused: bool) -> Result<Vec<serde_json::Value>, PauseError> {
    let states = vm
        .vcpus
        .paused_for(paused, PAUSE_LIMIT, || vm.vcpus.save(PAUSE_LIMIT))??;
    Ok(states.iter().map(crate::vcpu_state::summary).collect())
}

/// Runs the device an event belongs to.
fn run_device(
    vm: &Vm,
    devices: &Epoll,
    token: u64,
    io_watched: &mut [bool],
) -> std::io::Result<()> {
    if token & TOKEN_QUEUE != 0 && token < TOKEN_IO {
        let (i, q) = (((token >> 8) & 0xff) as usize, (token & 0xff) as usize);
        let mut dev = vm.devices[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let _ = dev.queue_events[q].read();
        dev.notify(q);
        sync_io(devices, i, &dev, io_watched)?;
    } else if token & TOKEN_IO != 0 {
        let i = (token & 0xff) as usize;
        let mut dev = vm.devices[i]
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        dev.io_ready();
        sync_io(devices, i, &dev, io_watched)?;
    }
    Ok(())
}
