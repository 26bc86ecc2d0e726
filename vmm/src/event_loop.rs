//! The device loop: one thread that runs every device. It waits on the queue notifies
//! (ioeventfds) and taps — nested in an epoll of their own, so that parking the devices
//! is one change — the control socket, the epoch timer, the VM's exit event and
//! SIGTERM/SIGINT.

use std::io::Write;
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::time::{Duration, Instant};

use mcvmm_devices::virtio::mmio::MmioTransport;
use serde_json::json;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};
use vmm_sys_util::timerfd::TimerFd;

use crate::api::{self, Request};
use crate::epochs::{EpochRun, PAUSE_LIMIT};
use crate::primary::{EpochClock, Primary};
use crate::protect::{self, Pending, Protectable};
use crate::snapshot::{self, Snapshots};
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

fn reply(stream: &UnixStream, value: &serde_json::Value) {
    let mut w = stream;
    let _ = writeln!(w, "{value}");
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
    let epoll = Epoll::new()?;
    add(&epoll, vm.exit.evt.as_raw_fd(), TOKEN_EXIT)?;
    add(&epoll, signals.0, TOKEN_SIGNAL)?;
    if let Some(l) = api {
        l.set_nonblocking(true)?;
        add(&epoll, l.as_raw_fd(), TOKEN_API)?;
    }
    let mut timer = TimerFd::new()?;
    add(&epoll, timer.as_raw_fd(), TOKEN_EPOCH)?;
    let mut clock = EpochClock::new()?;
    for (fd, token) in
        clock
            .fds()
            .into_iter()
            .zip([TOKEN_REPLICATION, TOKEN_EPOCH_EARLY, TOKEN_LINK_PROGRESS])
    {
        add(&epoll, fd, token)?;
    }
    if let Role::Primary(p) = role {
        clock.start(p)?;
    }
    let mut replicating = matches!(role, Role::Primary(_));
    let mut pending: Option<Pending> = None;
    let mut interrupt_watch = TimerFd::new()?;
    add(&epoll, interrupt_watch.as_raw_fd(), TOKEN_INTERRUPT_WATCH)?;
    interrupt_watch.reset(INTERRUPT_WATCH, Some(INTERRUPT_WATCH))?;
    let devices = Epoll::new()?;
    add(&epoll, devices.as_raw_fd(), TOKEN_DEVICES)?;
    let mut io_watched = Vec::new();
    for (i, dev) in vm.devices.iter().enumerate() {
        let t = dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (q, evt) in t.queue_events.iter().enumerate() {
            add(
                &devices,
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
        sync_io(&devices, i, &t, &mut io_watched)?;
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
        sync_io(&devices, i, &t, &mut io_watched)?;
    }

    let mut paused = false;
    let mut check: Option<EpochRun> = None;
    let mut snaps = Snapshots::default();
    let mut events = vec![EpollEvent::default(); 64];
    let mut device_events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            match ev.data() {
                TOKEN_EXIT => {
                    let _ = vm.exit.evt.read();
                    if let Some(reason) = vm.exit.reason() {
                        return Ok(reason);
                    }
                    // The i8042 writes the same eventfd without a reason: a guest reset.
                    return Ok(ExitReason::GuestEnded(crate::vcpu::I8042_RESET));
                }
                TOKEN_SIGNAL => return Ok(ExitReason::Stopped),
                TOKEN_API => {
                    let Some(l) = api else { continue };
                    while let Ok((stream, _)) = l.accept() {
                        let _ = stream.set_nonblocking(false);
                        match api::read_request(&stream) {
                            Request::Stop => {
                                reply(&stream, &json!({"ok": true}));
                                return Ok(ExitReason::Stopped);
                            }
                            Request::Pause if !paused => {
                                let t0 = Instant::now();
                                match vm.vcpus.pause(PAUSE_LIMIT) {
                                    Ok(()) => {
                                        park_devices(&epoll, &devices, true)?;
                                        paused = true;
                                        reply(
                                            &stream,
                                            &json!({"ok": true, "pause_us": t0.elapsed().as_micros() as u64}),
                                        );
                                    }
                                    Err(e) => reply(&stream, &json!({"error": e.to_string()})),
                                }
                            }
                            Request::Resume if paused => {
                                vm.vcpus.resume();
                                park_devices(&epoll, &devices, false)?;
                                paused = false;
                                reply(&stream, &json!({"ok": true}));
                            }
                            Request::Pause | Request::Resume => reply(
                                &stream,
                                &json!({"error": if paused { "already paused" } else { "not paused" }}),
                            ),
                            Request::Snapshot { .. } | Request::Epochs(_) if replicating => reply(
                                &stream,
                                &json!({"error": "replication owns dirty tracking: no snapshots or epoch runs on a primary"}),
                            ),
                            Request::Verify => match role {
                                Role::Primary(p) => {
                                    let epoch = p.verify_next();
                                    reply(&stream, &json!({"ok": true, "epoch": epoch}))
                                }
                                _ => reply(&stream, &json!({"error": "not a replicating primary"})),
                            },
                            Request::Failover => match role {
                                Role::Primary(p) if !paused => match p.hand_over(vm) {
                                    Ok(epoch) => {
                                        reply(
                                            &stream,
                                            &json!({"ok": true, "handed_over_at_epoch": epoch}),
                                        );
                                        return Ok(ExitReason::HandedOver(epoch));
                                    }
                                    Err(e) => reply(&stream, &json!({"error": e.to_string()})),
                                },
                                Role::Primary(_) => {
                                    reply(&stream, &json!({"error": "resume the VM first"}))
                                }
                                _ => reply(
                                    &stream,
                                    &json!({"error": "not a replicating primary: nothing to fail over to"}),
                                ),
                            },
                            Request::Snapshot { .. } if check.is_some() => reply(
                                &stream,
                                &json!({"error": "epochs are running; snapshot after them"}),
                            ),
                            Request::Snapshot { dir, incremental } => {
                                let r = snapshot::take(vm, &mut snaps, &dir, incremental, paused);
                                match r {
                                    Ok(v) => {
                                        tracing::info!(
                                            "snapshot {} ({}, {} pages, pause {:.1} ms)",
                                            dir.display(),
                                            v["kind"],
                                            v["pages"],
                                            v["pause_ms"].as_f64().unwrap_or(0.0)
                                        );
                                        reply(&stream, &v)
                                    }
                                    Err(e) => reply(
                                        &stream,
                                        &json!({"error": format!("snapshot {}: {e}", dir.display())}),
                                    ),
                                }
                            }
                            Request::Epochs(_) if paused || check.is_some() || snaps.tracking() => {
                                reply(
                                    &stream,
                                    &json!({"error": "the VM is paused, epochs run already, or snapshots track dirty pages"}),
                                )
                            }
                            Request::Epochs(req) => {
                                match EpochRun::start(vm, req, stream.try_clone()?) {
                                    Ok(c) => {
                                        // One shot, armed again after each pause.
                                        timer.reset(c.interval, None)?;
                                        check = Some(c);
                                    }
                                    Err(e) => reply(&stream, &json!({"error": e.to_string()})),
                                }
                            }
                            Request::Vcpus => {
                                let v = match vcpu_summaries(vm, paused) {
                                    Ok(v) => json!({"vcpus": v}),
                                    Err(e) => json!({"error": e.to_string()}),
                                };
                                reply(&stream, &v);
                            }
                            Request::Status => {
                                let mut v = api::status(vm);
                                v["state"] = json!(if paused { "paused" } else { "running" });
                                role.status(&mut v);
                                v["generation"] = json!(protectable.generation);
                                if let Some(t) = &protectable.took_over {
                                    v["took_over"] = t.clone();
                                }
                                if let Some(p) = &pending {
                                    v["connecting_to_secondary"] = json!(p.peer);
                                }
                                reply(&stream, &v);
                            }
                            Request::Protect { peer, generation } => {
                                let busy = match &*role {
                                    Role::Primary(p) if !p.link.is_lost() => Some(
                                        "already protected (`status` names its secondary)"
                                            .to_string(),
                                    ),
                                    _ => None,
                                }
                                .or_else(|| {
                                    pending.as_ref().map(|p| {
                                        format!("already connecting to a secondary at {}", p.peer)
                                    })
                                })
                                .or_else(|| {
                                    cannot_protect(paused, check.is_some(), snaps.tracking())
                                        .map(str::to_string)
                                });
                                match busy {
                                    Some(why) => reply(&stream, &json!({"error": why})),
                                    None => {
                                        let generation =
                                            generation.unwrap_or(protectable.generation);
                                        pending = Some(protect::connect(
                                            vm,
                                            protectable,
                                            peer,
                                            generation,
                                            stream,
                                        ));
                                    }
                                }
                            }
                            Request::Invalid(why) => reply(&stream, &json!({"error": why})),
                        }
                    }
                }
                TOKEN_EPOCH => {
                    let _ = timer.wait();
                    let Some(c) = check.as_mut() else { continue };
                    if paused {
                        // The operator's pause holds; the epoch waits for the resume.
                        timer.reset(c.interval, None)?;
                        continue;
                    }
                    let outcome = c.epoch(vm);
                    if matches!(outcome, Ok(false)) {
                        timer.reset(c.interval, None)?;
                    } else {
                        timer.clear()?;
                        if let Some(c) = check.take() {
                            let stream = c.reply_to.try_clone();
                            let mut report = c.finish(vm);
                            if let Err(e) = outcome {
                                report["error"] = json!(e.to_string());
                            }
                            if let Ok(s) = stream {
                                reply(&s, &report);
                            }
                        }
                    }
                }
                TOKEN_REPLICATION => {
                    // A VM paused by the operator stays paused: its epoch runs on.
                    let p = match (&mut *role, paused) {
                        (Role::Primary(p), false) => Some(&mut **p),
                        _ => None,
                    };
                    clock.on_regular(p, vm)?;
                }
                TOKEN_EPOCH_EARLY | TOKEN_LINK_PROGRESS => {
                    clock.on_wake(ev.data() == TOKEN_EPOCH_EARLY);
                }
                TOKEN_INTERRUPT_WATCH => {
                    let _ = interrupt_watch.wait();
                    if pending.as_ref().is_some_and(Pending::is_finished) {
                        if let Some(p) = pending.take() {
                            let peer = p.peer.clone();
                            let refuse = cannot_protect(paused, check.is_some(), snaps.tracking());
                            let (result, reply_to) = p.finish(vm, protectable, refuse);
                            match result {
                                Ok(primary) => {
                                    clock.start(&primary)?;
                                    *role = Role::Primary(Box::new(primary));
                                    replicating = true;
                                    reply(
                                        &reply_to,
                                        &json!({"ok": true, "secondary": peer, "generation": protectable.generation, "syncing": true}),
                                    );
                                }
                                Err(e) => reply(&reply_to, &json!({"error": e.to_string()})),
                            }
                        }
                    }
                    if !paused {
                        raise_ignored_interrupts(vm);
                    }
                }
                TOKEN_DEVICES => {
                    let n = match devices.wait(0, &mut device_events) {
                        Ok(n) => n,
                        Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                        Err(e) => return Err(e),
                    };
                    for dev_ev in &device_events[..n] {
                        run_device(vm, &devices, dev_ev.data(), &mut io_watched)?;
                    }
                }
                _ => {}
            }
        }
        if let (Role::Primary(p), false) = (&mut *role, paused) {
            clock.after_events(p, vm)?;
        }
    }
}

/// Why the guest cannot start being protected now, if it cannot.
fn cannot_protect(
    paused: bool,
    epochs_running: bool,
    snapshots_track: bool,
) -> Option<&'static str> {
    if paused {
        Some("the guest is paused: resume it first")
    } else if epochs_running {
        Some("epochs are running: protect after them")
    } else if snapshots_track {
        Some("incremental snapshots own dirty tracking in this process")
    } else {
        None
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
