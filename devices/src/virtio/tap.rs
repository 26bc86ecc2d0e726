//! A tap device: an existing one by name, or one created (and brought up) if none exists.

use std::fs::{File, OpenOptions};
use std::io::{Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::fs::OpenOptionsExt;

const TUNSETIFF: libc::Ioctl = 0x4004_54ca;
const IFF_TAP: libc::c_short = 0x0002;
const IFF_NO_PI: libc::c_short = 0x1000;

#[derive(Debug, thiserror::Error)]
pub enum TapError {
    #[error("tap name {0:?} is empty or longer than 15 bytes")]
    Name(String),
    #[error("opening /dev/net/tun: {0} (needs the tun module and CAP_NET_ADMIN)")]
    OpenTun(std::io::Error),
    #[error("attaching to tap {name}: {source}")]
    Attach {
        name: String,
        source: std::io::Error,
    },
    #[error("bringing tap {name} up: {source}")]
    Up {
        name: String,
        source: std::io::Error,
    },
}

pub struct Tap {
    file: File,
    pub name: String,
}

fn ifreq(name: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (d, s) in req.ifr_name.iter_mut().zip(name.bytes()) {
        *d = s as libc::c_char;
    }
    req
}

impl Tap {
    /// A tap over any file, for tests that need a device but no network.
    #[cfg(test)]
    pub(crate) fn from_file(file: File, name: &str) -> Tap {
        Tap {
            file,
            name: name.into(),
        }
    }

    pub fn open(name: &str) -> Result<Tap, TapError> {
        if name.is_empty() || name.len() >= libc::IFNAMSIZ {
            return Err(TapError::Name(name.into()));
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(libc::O_NONBLOCK | libc::O_CLOEXEC)
            .open("/dev/net/tun")
            .map_err(TapError::OpenTun)?;
        let mut req = ifreq(name);
        req.ifr_ifru.ifru_flags = IFF_TAP | IFF_NO_PI;
        // SAFETY: a valid ifreq for the duration of the call, as TUNSETIFF expects.
        if unsafe { libc::ioctl(file.as_raw_fd(), TUNSETIFF, &mut req) } < 0 {
            return Err(TapError::Attach {
                name: name.into(),
                source: std::io::Error::last_os_error(),
            });
        }
        let tap = Tap {
            file,
            name: name.into(),
        };
        tap.up()?;
        Ok(tap)
    }

    /// A tap mcvmm created is down; one that exists may be too. Either way it must be up.
    fn up(&self) -> Result<(), TapError> {
        let err = |source| TapError::Up {
            name: self.name.clone(),
            source,
        };
        // SAFETY: plain syscall with constant arguments.
        let sock = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
        if sock < 0 {
            return Err(err(std::io::Error::last_os_error()));
        }
        let mut req = ifreq(&self.name);
        // SAFETY: a valid ifreq for the call; `sock` is ours.
        let mut rc = unsafe { libc::ioctl(sock, libc::SIOCGIFFLAGS, &mut req) };
        if rc >= 0 {
            // SAFETY: SIOCGIFFLAGS filled the flags member of the union.
            unsafe { req.ifr_ifru.ifru_flags |= libc::IFF_UP as libc::c_short };
            // SAFETY: as above.
            rc = unsafe { libc::ioctl(sock, libc::SIOCSIFFLAGS, &mut req) };
        }
        let e = std::io::Error::last_os_error();
        // SAFETY: closing our own socket.
        unsafe { libc::close(sock) };
        if rc < 0 {
            return Err(err(e));
        }
        Ok(())
    }

    pub fn read_frame(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        self.file.read(buf)
    }

    pub fn write_frame(&mut self, frame: &[u8]) -> std::io::Result<usize> {
        self.file.write(frame)
    }

    /// Throws away every frame queued on the tap; returns how many. A tap held open
    /// before its guest runs (a secondary waiting to take over) collects floods and
    /// broadcasts no guest should see late.
    pub fn drain(&mut self) -> usize {
        let mut buf = vec![0u8; 65536];
        let mut n = 0;
        // The tap is non-blocking: WouldBlock (or any error) ends the queue.
        while matches!(self.file.read(&mut buf), Ok(len) if len > 0) {
            n += 1;
        }
        n
    }

    /// A second handle on the same tap and queue, under the same name.
    pub fn try_clone(&self) -> std::io::Result<Tap> {
        Ok(Tap {
            file: self.file.try_clone()?,
            name: self.name.clone(),
        })
    }

    /// A second handle on the same queue, for sending from another thread (held output
    /// released when its checkpoint is acknowledged).
    pub fn writer(&self) -> std::io::Result<std::fs::File> {
        self.file.try_clone()
    }
}

impl AsRawFd for Tap {
    fn as_raw_fd(&self) -> RawFd {
        self.file.as_raw_fd()
    }
}
