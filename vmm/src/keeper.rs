//! A killed mcvmm's peer hears of it at once instead of after the guest's memory is gone.
//!
//! When a process is killed, each of its threads releases the address space before the
//! descriptor table, and the last one to release the address space tears it down first:
//! all of the guest's RAM. Only then does the kernel close the replication connection,
//! so a secondary (or a primary losing its secondary) learns of the death that much
//! later: 220–290 ms for a 1 GiB guest in the lab, growing with the guest's size — all
//! of it added to a failover.
//!
//! The keeper is a second process sharing mcvmm's address space and nothing else: no
//! descriptors but the read end of a pipe only mcvmm can write to, every signal blocked.
//! It sleeps in a read of that pipe. While it lives, mcvmm's threads are never the last
//! users of the memory, so a killed mcvmm closes its descriptors right away; the pipe's
//! write end goes with them, the keeper's read ends, and the keeper exits and does the
//! teardown. (A parent-death signal would end it when mcvmm's main thread exits, which
//! can be before its other threads have closed anything.) `MCVMM_KEEPER=off` runs
//! without it, to measure the difference.

use std::ffi::c_void;
use std::os::fd::{AsRawFd, FromRawFd, IntoRawFd, OwnedFd};

/// The keeper's stack: it makes a few system calls.
const STACK_BYTES: usize = 64 << 10;

#[derive(Debug, thiserror::Error)]
pub enum KeeperError {
    #[error("starting the memory keeper process: {what}: {source}")]
    Os {
        what: &'static str,
        source: std::io::Error,
    },
}

/// What the keeper runs, with the read end of the pipe as `arg`. It shares the address
/// space, and the thread pointer of the thread that made it, so it uses raw system calls
/// only: no allocator, no locks. A call that fails writes `errno`, in that thread's
/// thread-local area, so the keeper ends at the first one (none fails on Linux ≥ 5.9;
/// its signals are blocked, so the read is never interrupted).
extern "C" fn keep(arg: *mut c_void) -> libc::c_int {
    let fd = arg as usize as libc::c_long;
    // SAFETY: system calls on this process alone: drop the copies of mcvmm's descriptors
    // (they would keep its connections open) except the pipe, then read the pipe into a
    // byte on this stack until every write end is closed.
    unsafe {
        if fd > 0 && libc::syscall(libc::SYS_close_range, 0, fd - 1, 0) != 0 {
            return 0;
        }
        if libc::syscall(
            libc::SYS_close_range,
            fd + 1,
            libc::c_long::from(u32::MAX),
            0,
        ) != 0
        {
            return 0;
        }
        let mut byte = 0u8;
        while libc::syscall(libc::SYS_read, fd, &raw mut byte, 1) > 0 {}
    }
    0
}

/// Starts the keeper (unless `MCVMM_KEEPER=off`); returns its pid. Call it before the
/// guest's threads exist: what they open later is never in its descriptor table anyway,
/// but the fewer descriptors it copies, the sooner it has dropped them.
pub fn start() -> Result<Option<libc::pid_t>, KeeperError> {
    if std::env::var("MCVMM_KEEPER").is_ok_and(|v| v == "off") {
        return Ok(None);
    }
    let os = |what| KeeperError::Os {
        what,
        source: std::io::Error::last_os_error(),
    };
    let mut ends = [0; 2];
    // SAFETY: pipe2 writes two descriptors into the array it is given. Close-on-exec, so
    // no program mcvmm starts holds the write end.
    if unsafe { libc::pipe2(ends.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(os("pipe2"));
    }
    // SAFETY: both descriptors are fresh and owned here alone.
    let (read_end, write_end) =
        unsafe { (OwnedFd::from_raw_fd(ends[0]), OwnedFd::from_raw_fd(ends[1])) };
    // Never freed: the keeper runs on it until it exits.
    let stack: &'static mut [u8] = Box::leak(vec![0u8; STACK_BYTES].into_boxed_slice());
    // The stack grows down from its end, 16-byte aligned.
    let top = (stack.as_mut_ptr() as usize + STACK_BYTES) & !15;
    // The keeper starts with every signal blocked (it inherits this thread's mask), so
    // none of mcvmm's handlers can ever run in it.
    // SAFETY: zeroed sigsets are valid to pass to sigfillset/pthread_sigmask.
    let (mut all, mut old): (libc::sigset_t, libc::sigset_t) =
        unsafe { (std::mem::zeroed(), std::mem::zeroed()) };
    // SAFETY: signal-mask calls on this thread with valid sets; the old mask is put back
    // right after the clone.
    unsafe {
        libc::sigfillset(&mut all);
        libc::pthread_sigmask(libc::SIG_SETMASK, &all, &mut old);
    }
    // SAFETY: `keep` runs on a stack of its own that is never freed and touches no memory
    // of this process but that stack; CLONE_VM without CLONE_FILES, CLONE_SIGHAND or
    // CLONE_THREAD gives it this address space, a copy of the descriptor table (which it
    // empties but for the pipe) and nothing else.
    let pid = unsafe {
        libc::clone(
            keep,
            top as *mut c_void,
            libc::CLONE_VM | libc::SIGCHLD,
            read_end.as_raw_fd() as usize as *mut c_void,
        )
    };
    let cloned = if pid < 0 { Err(os("clone")) } else { Ok(()) };
    // SAFETY: restores the mask saved above.
    unsafe { libc::pthread_sigmask(libc::SIG_SETMASK, &old, std::ptr::null_mut()) };
    cloned?;
    // The keeper has its own copy of the read end; this process keeps the write end
    // open until its descriptors are closed, by exit or by kill.
    drop(read_end);
    let _ = write_end.into_raw_fd();
    Ok(Some(pid))
}

#[cfg(test)]
mod tests {
    use std::io::Read;
    use std::os::unix::net::UnixStream;
    use std::time::{Duration, Instant};

    #[test]
    fn the_keeper_holds_no_descriptor_of_ours_but_its_pipe() {
        let (mine, peer) = UnixStream::pair().expect("socketpair");
        let pid = super::start().expect("keeper").expect("not turned off");
        // It drops its copies at once, but runs on its own schedule: give it a moment.
        let fds = format!("/proc/{pid}/fd");
        let deadline = Instant::now() + Duration::from_secs(5);
        let count = loop {
            let n = std::fs::read_dir(&fds)
                .map(|d| d.count())
                .unwrap_or(usize::MAX);
            if n == 1 || Instant::now() > deadline {
                break n;
            }
            std::thread::sleep(Duration::from_millis(10));
        };
        assert_eq!(count, 1, "the keeper's descriptors: {fds}");
        // Closing ours closes the connection: the keeper has no copy that keeps it open.
        drop(mine);
        peer.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("timeout");
        let mut buf = [0u8; 1];
        assert_eq!((&peer).read(&mut buf).expect("EOF, not a timeout"), 0);
        // SAFETY: signal 0 only checks that the process exists.
        assert_eq!(unsafe { libc::kill(pid, 0) }, 0, "the keeper is alive");
    }
}
