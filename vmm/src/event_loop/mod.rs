//! The device loop: one thread that runs every device. It waits on what its subsystems
//! register (see [`crate::subscriber`]): the devices, the control socket, a primary's
//! epoch clock, and its own: the VM's exit event, SIGTERM/SIGINT, the timer of `ctl
//! epochs` and the end of a `protect`'s connection attempt.

use std::os::fd::{AsRawFd, RawFd};

use serde_json::json;
use vmm_sys_util::epoll::{Epoll, EpollEvent};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

mod devices;
mod fence;
mod reprotect;
mod requests;

use crate::api::{answer, Answer, Refusal, Yes};
use crate::control::ControlServer;
use crate::epochs::{EpochRun, PAUSE_LIMIT};
use crate::phase::Phase;
use crate::primary::{EpochClock, Primary};
use crate::protect::{Pending, Protectable};
use crate::snapshot::Snapshots;
use crate::subscriber::{Registry, Source, Subscriber, Wake};
use crate::vcpu::{ExitReason, PauseError};
use crate::vm::Vm;
use devices::Devices;

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
    /// Where the VM is in its guest's protection.
    pub fn phase(&self) -> Phase {
        match self {
            Role::Standalone => Phase::Standalone,
            Role::Primary(p) => p.phase(),
            Role::TookOver => Phase::TookOver,
        }
    }

    fn status(&self, v: &mut serde_json::Value) {
        let phase = self.phase();
        v["role"] = json!(phase.role());
        v["phase"] = json!(phase.name());
        v["protected"] = json!(phase.guest_protected());
        if let Role::Primary(p) = self {
            v["replication"] = p.status();
        }
    }
}

/// Runs the devices until the VM ends; returns why it ended.
pub fn run(
    vm: &Vm,
    signals: &SignalFd,
    api: Option<&ControlServer>,
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
    api: Option<&'a ControlServer>,
    role: &'a mut Role,
    protectable: &'a mut Protectable,
    epoll: Epoll,
    devices: Devices,
    /// `ctl epochs`/`selfcheck`: one shot, armed again after each pause.
    epoch_timer: TimerFd,
    clock: EpochClock,
    /// Written when a `protect`'s connection attempt is over.
    connected: EventFd,
    paused: bool,
    epochs: Option<EpochRun>,
    snaps: Snapshots,
    pending: Option<Pending>,
    claim: Option<fence::Claiming>,
    reprotect: Option<reprotect::Reprotect>,
}

impl<'a> DeviceLoop<'a> {
    fn new(
        vm: &'a Vm,
        signals: &SignalFd,
        api: Option<&'a ControlServer>,
        role: &'a mut Role,
        protectable: &'a mut Protectable,
    ) -> std::io::Result<DeviceLoop<'a>> {
        let epoll = Epoll::new()?;
        let r = Registry::new(&epoll);
        r.watch(vm.exit.evt.as_raw_fd(), Source::VmExit)?;
        r.watch(signals.0, Source::Signal)?;
        if let Some(c) = api {
            c.register(&r)?;
        }
        let epoch_timer = TimerFd::new()?;
        r.watch(epoch_timer.as_raw_fd(), Source::EpochRun)?;
        let mut clock = EpochClock::new()?;
        clock.register(&r)?;
        if let Role::Primary(p) = &*role {
            clock.start(p)?;
        }
        let connected = EventFd::new(EFD_NONBLOCK)?;
        r.watch(connected.as_raw_fd(), Source::Protected)?;
        let devices = Devices::new(vm)?;
        devices.register(&r)?;
        if let Some(f) = &protectable.fence {
            f.register(&r)?;
        }
        Ok(DeviceLoop {
            vm,
            api,
            role,
            protectable,
            epoll,
            devices,
            epoch_timer,
            clock,
            connected,
            paused: false,
            epochs: None,
            snaps: Snapshots::default(),
            pending: None,
            claim: None,
            reprotect: None,
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
            self.watch_fence();
            self.watch_reprotect()?;
        }
    }

    fn on_event(&mut self, token: u64) -> std::io::Result<Option<ExitReason>> {
        let Some(source) = Source::of(token) else {
            return Ok(None);
        };
        match source {
            Source::VmExit => {
                let _ = self.vm.exit.evt.read();
                // The i8042 writes the same eventfd without a reason: a guest reset.
                let reason = self
                    .vm
                    .exit
                    .reason()
                    .unwrap_or(ExitReason::GuestEnded(crate::vcpu::I8042_RESET));
                return Ok(Some(reason));
            }
            Source::Signal => return Ok(Some(ExitReason::Stopped)),
            Source::Control => return self.on_api(),
            Source::EpochRun => self.on_epoch_timer()?,
            Source::Clock(Wake::Regular) => {
                // A VM paused by the operator stays paused: its epoch runs on.
                let p = match (&mut *self.role, self.paused) {
                    (Role::Primary(p), false) => Some(&mut **p),
                    _ => None,
                };
                self.clock.on_regular(p, self.vm)?;
            }
            Source::Clock(wake) => self.clock.on_wake(wake),
            Source::Protected => {
                let _ = self.connected.read();
                self.on_connected()?;
            }
            Source::Fence => return Ok(self.on_fence()),
            Source::InterruptWatch => self.devices.on_interrupt_watch(self.vm, self.paused),
            Source::Devices => self.devices.on_ready(self.vm)?,
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
    /// the request gets why not (this node's own attempt is tried again later).
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
                self.reprotect = None;
                Ok(Answer::Protecting {
                    ok: Yes,
                    secondary: peer,
                    generation: self.protectable.generation,
                    syncing: true,
                })
            }
            Err(e) => {
                if let (None, Some(r)) = (&reply_to, self.reprotect.as_mut()) {
                    r.failed(&e.to_string());
                }
                Err(Refusal::failed(e))
            }
        };
        if let Some(s) = reply_to {
            answer(&s, outcome);
        }
        Ok(())
    }

    fn park_devices(&self, parked: bool) -> std::io::Result<()> {
        self.devices.park(&Registry::new(&self.epoll), parked)
    }
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

/// Each vCPU's summary, read at a pause of its own unless the VM is paused already.
fn vcpu_summaries(vm: &Vm, paused: bool) -> Result<Vec<serde_json::Value>, PauseError> {
    let states = vm
        .vcpus
        .paused_for(paused, PAUSE_LIMIT, || vm.vcpus.save(PAUSE_LIMIT))??;
    Ok(states.iter().map(crate::vcpu_state::summary).collect())
}
