//! The secondary between primaries and while one is silent: the listener it polls (so
//! the operator is heard between connections), the disks it holds meanwhile, and the
//! rule a primary's silence is put to.

use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::fd::RawFd;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcvmm_replication::disk::Disks;
use mcvmm_replication::secondary::{GiveUp, Receiver};

use super::{SecondaryError, Session, Shared};

/// The disks while no primary streams: free, or in the receiver of a primary whose last
/// commit is kept.
pub(super) enum Held {
    Free(Disks),
    Orphan {
        session: Session,
        rx: Box<Receiver>,
        why: String,
    },
}

impl Held {
    pub(super) fn disks(&self) -> &Disks {
        match self {
            Held::Free(d) => d,
            Held::Orphan { rx, .. } => &rx.disks,
        }
    }

    pub(super) fn into_disks(self) -> Disks {
        match self {
            Held::Free(d) => d,
            Held::Orphan { session, rx, .. } => {
                tracing::warn!(
                    "a new primary: the commit of epoch {} kept from {} is dropped",
                    rx.committed(),
                    session.peer
                );
                drop(session.prepared.join());
                rx.disks
            }
        }
    }
}

/// The next connection on the (polled) listener; `None` when the operator asked for a
/// failover meanwhile.
pub(super) fn next_primary(
    listener: &TcpListener,
    shared: &Shared,
) -> Result<Option<(TcpStream, SocketAddr)>, SecondaryError> {
    loop {
        match listener.accept() {
            Ok(c) => return Ok(Some(c)),
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if shared.operator_takeover.load(Ordering::SeqCst) {
                    return Ok(None);
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
            Err(e) => return Err(SecondaryError::Accept(e)),
        }
    }
}

/// Whether a connection waits on the listener.
fn connection_waiting(listener: RawFd) -> bool {
    let mut pfd = libc::pollfd {
        fd: listener,
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one valid pollfd on the stack; a zero timeout.
    unsafe { libc::poll(&mut pfd, 1, 0) > 0 }
}

/// The rule a primary's silence is put to: with a fence, give up on it at once (the
/// fence decides); without, only for the operator or for a new primary that is waiting.
/// Either way the silence is logged every few seconds.
pub(super) fn silence_rule(shared: Arc<Shared>, listener: RawFd, fenced: bool) -> GiveUp {
    let mut said: Option<Instant> = None;
    Box::new(move |silent: Duration| {
        let operator = shared.operator_takeover.load(Ordering::SeqCst);
        let give_up = fenced || operator || connection_waiting(listener);
        if !give_up && said.is_none_or(|t| t.elapsed() >= crate::fencing::SAY_EVERY) {
            said = Some(Instant::now());
            tracing::warn!(
                "primary silent for {:.1} s: not taking over (without --etcd a silence proves nothing; `ctl failover` only if you know it is dead)",
                silent.as_secs_f64()
            );
        }
        give_up
    })
}
