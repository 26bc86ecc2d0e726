//! The control socket, one server for every role: it is bound once, at start, and kept
//! for the life of the process. A secondary serves it from a thread while it receives
//! and hands it to the device loop when it takes over, so the socket never goes away
//! and is never bound anew while the process lives; whoever connects meanwhile waits in
//! the backlog and is answered by the role that runs next.

use std::os::fd::{AsRawFd, RawFd};
use std::os::linux::fs::MetadataExt;
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;

use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::api::{self, Request};
use crate::subscriber::{Registry, Source, Subscriber};

#[derive(Debug, thiserror::Error)]
#[error("control socket {path}: {source}")]
pub struct ControlError {
    path: String,
    source: std::io::Error,
}

/// The bound control socket. Dropping it removes the socket file, unless another
/// process has put its own at that path since.
pub struct ControlServer {
    listener: UnixListener,
    path: PathBuf,
    /// Device and inode of the socket file as bound.
    file: (u64, u64),
}

impl ControlServer {
    /// Binds `path`, replacing a socket file left there by a process that is gone.
    pub fn bind(path: &Path) -> Result<ControlServer, ControlError> {
        let error = |source| ControlError {
            path: path.display().to_string(),
            source,
        };
        let _ = std::fs::remove_file(path);
        let listener = UnixListener::bind(path).map_err(error)?;
        listener.set_nonblocking(true).map_err(error)?;
        let meta = std::fs::metadata(path).map_err(error)?;
        Ok(ControlServer {
            listener,
            path: path.to_path_buf(),
            file: (meta.st_dev(), meta.st_ino()),
        })
    }

    /// The next connection waiting, with its request read (bounded in time and size);
    /// `None` when nobody waits.
    pub fn next(&self) -> Option<(UnixStream, Request)> {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    let _ = stream.set_nonblocking(false);
                    let request = api::read_request(&stream);
                    return Some((stream, request));
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                Err(_) => return None,
            }
        }
    }

    /// Waits until a connection waits (true) or `stop` is written (false).
    fn wait(&self, stop: &EventFd) -> bool {
        let mut fds = [
            libc::pollfd {
                fd: self.listener.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
            libc::pollfd {
                fd: stop.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            },
        ];
        loop {
            // SAFETY: two valid pollfds on the stack, their count passed with them.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), fds.len() as libc::nfds_t, -1) };
            if n < 0 && std::io::Error::last_os_error().kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return n > 0 && fds[1].revents == 0;
        }
    }

    /// Serves the socket on a thread of its own with `handle`, until [`Serving::hand_over`].
    pub fn serve_on_thread<H>(self, name: &str, mut handle: H) -> std::io::Result<Serving>
    where
        H: FnMut(UnixStream, Request) + Send + 'static,
    {
        let stop = EventFd::new(EFD_NONBLOCK)?;
        let stop_here = stop.try_clone()?;
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                while self.wait(&stop_here) {
                    while let Some((stream, request)) = self.next() {
                        handle(stream, request);
                    }
                }
                self
            })?;
        Ok(Serving { stop, thread })
    }
}

impl Subscriber for ControlServer {
    fn register(&self, r: &Registry) -> std::io::Result<()> {
        r.watch(self.listener.as_raw_fd(), Source::Control)
    }
}

impl AsRawFd for ControlServer {
    fn as_raw_fd(&self) -> RawFd {
        self.listener.as_raw_fd()
    }
}

impl Drop for ControlServer {
    fn drop(&mut self) {
        let ours = std::fs::metadata(&self.path)
            .map(|m| (m.st_dev(), m.st_ino()) == self.file)
            .unwrap_or(false);
        if ours {
            let _ = std::fs::remove_file(&self.path);
        }
    }
}

/// A control socket served on a thread.
pub struct Serving {
    stop: EventFd,
    thread: JoinHandle<ControlServer>,
}

impl Serving {
    /// Stops serving after the request at hand, if any, and gives the socket back.
    /// `None` if the thread panicked (the socket is then gone).
    pub fn hand_over(self) -> Option<ControlServer> {
        let _ = self.stop.write(1);
        self.thread.join().ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::{answer, Answer};

    #[test]
    fn a_served_socket_is_handed_over_alive_and_removed_when_dropped() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.sock");
        let server = ControlServer::bind(&path).expect("bind");
        let serving = server
            .serve_on_thread("test-control", |stream, _| {
                answer(
                    &stream,
                    Ok(Answer::Report(serde_json::json!({"by": "thread"}))),
                )
            })
            .expect("serve");
        let on_thread = api::request(&path, "status").expect("thread answers");
        assert_eq!(on_thread["by"], "thread");
        let server = serving.hand_over().expect("handed over");
        // Nobody serves now: a client waits in the backlog until the next owner answers.
        let client = {
            let path = path.clone();
            std::thread::spawn(move || api::request(&path, "status"))
        };
        let (stream, request) = loop {
            if let Some(next) = server.next() {
                break next;
            }
            std::thread::sleep(std::time::Duration::from_millis(5));
        };
        assert!(matches!(request, Request::Status));
        answer(&stream, Ok(Answer::done()));
        let answered = client.join().expect("client").expect("answer");
        assert_eq!(answered["ok"], true);
        drop(server);
        assert!(!path.exists(), "the socket file is removed with the server");
    }

    #[test]
    fn a_socket_file_that_is_no_longer_ours_is_left_alone() {
        let dir = tempfile::tempdir().expect("dir");
        let path = dir.path().join("c.sock");
        let first = ControlServer::bind(&path).expect("bind");
        // Another process binds the same path after this one.
        let second = ControlServer::bind(&path).expect("bind again");
        drop(first);
        assert!(path.exists(), "the newer socket stays");
        drop(second);
        assert!(!path.exists());
    }
}
