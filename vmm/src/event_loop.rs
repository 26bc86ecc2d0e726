//! The device loop: one thread that runs every device. It waits on the queue notifies
//! (ioeventfds), taps, the control socket, the VM's exit event and SIGTERM/SIGINT.

use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixListener;

use mcvmm_devices::virtio::mmio::MmioTransport;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use crate::api::{self, Action};
use crate::vcpu::ExitReason;
use crate::vm::Vm;

const TOKEN_EXIT: u64 = 1;
const TOKEN_SIGNAL: u64 = 2;
const TOKEN_API: u64 = 3;
const TOKEN_QUEUE: u64 = 1 << 32;
const TOKEN_IO: u64 = 2 << 32;

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

/// Runs the devices until the VM ends; returns why it ended.
pub fn run(vm: &Vm, signals: &SignalFd, api: Option<&UnixListener>) -> std::io::Result<ExitReason> {
    let epoll = Epoll::new()?;
    add(&epoll, vm.exit.evt.as_raw_fd(), TOKEN_EXIT)?;
    add(&epoll, signals.0, TOKEN_SIGNAL)?;
    if let Some(l) = api {
        l.set_nonblocking(true)?;
        add(&epoll, l.as_raw_fd(), TOKEN_API)?;
    }
    let mut io_watched = Vec::new();
    for (i, dev) in vm.devices.iter().enumerate() {
        let t = dev
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for (q, evt) in t.queue_events.iter().enumerate() {
            add(
                &epoll,
                evt.as_raw_fd(),
                TOKEN_QUEUE | (i as u64) << 8 | q as u64,
            )?;
        }
        if let Some(fd) = t.device().io_fd() {
            // Watched once the driver is up (see below): before that nobody takes input.
            epoll.ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), TOKEN_IO | i as u64),
            )?;
        }
        io_watched.push(false);
    }

    let mut events = vec![EpollEvent::default(); 64];
    loop {
        let n = match epoll.wait(-1, &mut events) {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        for ev in &events[..n] {
            let token = ev.data();
            match token {
                TOKEN_EXIT => {
                    let _ = vm.exit.evt.read();
                    if let Some(reason) = vm.exit.reason() {
                        return Ok(reason);
                    }
                    // The i8042 writes the same eventfd without a reason: a guest reset.
                    return Ok(ExitReason::GuestEnded("reset (i8042)"));
                }
                TOKEN_SIGNAL => return Ok(ExitReason::Stopped),
                TOKEN_API => {
                    if let Some(l) = api {
                        while let Ok((stream, _)) = l.accept() {
                            let _ = stream.set_nonblocking(false);
                            if let Action::Stop = api::handle(vm, stream) {
                                return Ok(ExitReason::Stopped);
                            }
                        }
                    }
                }
                t if t & TOKEN_QUEUE != 0 && t < TOKEN_IO => {
                    let (i, q) = (((t >> 8) & 0xff) as usize, (t & 0xff) as usize);
                    let mut dev = vm.devices[i]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    let _ = dev.queue_events[q].read();
                    dev.notify(q);
                    sync_io(&epoll, i, &dev, &mut io_watched)?;
                }
                t if t & TOKEN_IO != 0 => {
                    let i = (t & 0xff) as usize;
                    let mut dev = vm.devices[i]
                        .lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner);
                    dev.io_ready();
                    sync_io(&epoll, i, &dev, &mut io_watched)?;
                }
                _ => {}
            }
        }
    }
}
