//! Protection for a guest that runs unprotected: one started standalone, one whose
//! secondary was lost, or one this node took over. Every VM is built with the seams a
//! primary needs (an output gate that lets frames through, a disk-write sink that keeps
//! nothing), so that `mcvmm ctl protect HOST:PORT` can start replicating it to a new
//! secondary while it runs: the same handshake, live initial sync and epochs as
//! `run --primary`, without restarting the guest.
//!
//! The connection and handshake happen on a thread of their own (a secondary may take a
//! while to read its disks' digests); the device loop looks at it on its next tick and
//! then turns dirty tracking on and starts the sync.

use std::fs::File;
use std::os::unix::net::UnixStream;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use vmm_sys_util::eventfd::EventFd;

use mcvmm_checkpoint::seams::OutputGate;
use mcvmm_checkpoint::state::{VmShape, FORMAT_VERSION};
use mcvmm_replication::gate::{HeldOutput, Transmit};
use mcvmm_replication::messages::{Accept, Hello, PROTOCOL_VERSION};
use mcvmm_replication::primary::{self as replication, ForwardedWrites, Link};

use crate::primary::Primary;
use crate::vm::{Seams, Vm};

/// Disk chunk size for the initial sync's digests.
pub const SYNC_CHUNK: u64 = 1 << 20;

/// The gate the NIC asks: that of the protection now running. Each protection gets a
/// gate of its own, so that a lost link opening its gate late cannot open the next one.
pub struct CurrentGate(Mutex<Arc<HeldOutput>>);

impl OutputGate for CurrentGate {
    fn hold(&self, frame: &[u8]) -> bool {
        self.0
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hold(frame)
    }
}

/// The primary's seams: the gate that holds output per epoch and the sink that collects
/// disk writes for the secondary.
pub struct Hooks {
    gate: Arc<CurrentGate>,
    pub writes: Arc<ForwardedWrites>,
    /// Filled with a handle on the tap when the VM is built; gates release through it.
    tap_out: Arc<OnceLock<File>>,
}

impl Hooks {
    /// Idle seams: disk writes are recorded once a protection starts (`Primary::start`).
    pub fn new() -> Hooks {
        let tap_out: Arc<OnceLock<File>> = Arc::new(OnceLock::new());
        let writes = Arc::new(ForwardedWrites::default());
        let first = Arc::new(HeldOutput::new(transmit_to(tap_out.clone())));
        Hooks {
            gate: Arc::new(CurrentGate(Mutex::new(first))),
            writes,
            tap_out,
        }
    }

    /// A gate for a new protection, in place from now on. It lets frames through until
    /// its first checkpoint's pause.
    pub fn fresh_gate(&self) -> Arc<HeldOutput> {
        let gate = Arc::new(HeldOutput::new(transmit_to(self.tap_out.clone())));
        *self.gate.0.lock().unwrap_or_else(PoisonError::into_inner) = gate.clone();
        gate
    }

    /// The seams the VM's devices are built with.
    pub fn seams(&self) -> Seams {
        Seams {
            disk_writes: Some(self.writes.clone()),
            output: Some(self.gate.clone()),
            tap_writer: Some(self.tap_out.clone()),
            ..Seams::default()
        }
    }
}

fn transmit_to(tap_out: Arc<OnceLock<File>>) -> Transmit {
    Box::new(move |frame: &[u8]| {
        use std::io::Write;
        match tap_out.get() {
            Some(mut f) => f.write(frame),
            None => Err(std::io::Error::other("no tap")),
        }
    })
}

/// How this node replicates, from its `run` flags.
#[derive(Clone, Copy)]
pub struct Settings {
    pub epoch_ms: u64,
    /// An epoch whose guest output waits ends once it is this old; `None`: at
    /// `epoch_ms` like any other.
    pub epoch_min_ms: Option<u64>,
    pub timeout: Duration,
    pub coding: replication::PageCoding,
    /// Pages the dirty log may leave writable (see `DirtyTracker::keep_hot`).
    pub hot_pages: u64,
    /// How long a connection attempt waits for the secondary to be reachable.
    pub peer_wait: Duration,
    /// `--etcd`: a lost secondary's held output waits for this node to win the fence.
    pub fenced: bool,
    /// A primary that has reached neither its secondary nor etcd for this long pauses
    /// its guest until it wins the fence.
    pub fence_timeout: Duration,
}

/// What the device loop needs to protect its guest again.
pub struct Protectable {
    pub hooks: Hooks,
    pub settings: Settings,
    /// The generation this node runs the guest at; a new secondary gets it (or the
    /// operator's) in the handshake.
    pub generation: u64,
    /// What this node took over from, kept in `status` after it protects the guest again.
    pub took_over: Option<serde_json::Value>,
    /// `--etcd`: the claims that decide which node runs the guest.
    pub fence: Option<crate::fencing::Fencing>,
}

/// What a primary says of its VM in the handshake.
pub fn hello(shape: VmShape, generation: u64) -> Hello {
    Hello {
        protocol: PROTOCOL_VERSION,
        state_format: FORMAT_VERSION,
        shape,
        generation,
        chunk_bytes: SYNC_CHUNK,
    }
}

/// Why the guest could not be protected by a new secondary.
#[derive(Debug, thiserror::Error)]
pub enum ProtectError {
    #[error(transparent)]
    Connect(#[from] replication::PrimaryError),
    #[error("starting replication to {peer}: {source}")]
    Link {
        peer: String,
        source: std::io::Error,
    },
    #[error("the connecting thread panicked")]
    Panicked,
    #[error("{0}")]
    Refused(String),
    #[error("the VM built differs from the shape agreed with the secondary")]
    Shape,
    #[error("starting the initial sync: {0}")]
    Sync(#[from] crate::primary::PrimaryError),
}

/// A secondary that accepted the VM, its link running: the first half of becoming a
/// primary, the same at `run --primary` (before the VM is built) and at `ctl protect`
/// (off the device loop). [`Connection::into_primary`] is the second.
pub struct Connection {
    shape: VmShape,
    link: Arc<Link>,
    gate: Arc<HeldOutput>,
    accept: Accept,
}

/// Connects to the secondary at `peer`, agrees on the VM `hello` describes, and starts
/// the link's threads at once, so that the secondary hears heartbeats from the handshake
/// on (its silence timer runs from then) while the VM is built or the device loop is busy.
/// `gate` is the protection's output gate ([`Hooks::fresh_gate`]).
pub fn open(
    peer: &str,
    hello: &Hello,
    gate: Arc<HeldOutput>,
    s: &Settings,
) -> Result<Connection, ProtectError> {
    let (stream, accept) = replication::connect(peer, hello, s.peer_wait)?;
    let link = replication::start(stream, peer, gate.clone(), s.timeout, s.coding, s.fenced)
        .map_err(|source| ProtectError::Link {
            peer: peer.to_string(),
            source,
        })?;
    Ok(Connection {
        shape: hello.shape.clone(),
        link,
        gate,
        accept,
    })
}

impl Connection {
    /// The VM's primary role, its initial sync started. `refuse` is why the guest cannot
    /// be protected right now (an operator's pause, dirty tracking in other use): the
    /// secondary is told, as it is of any failure here.
    pub fn into_primary(
        self,
        vm: &Vm,
        hooks: &Hooks,
        s: &Settings,
        refuse: Option<&str>,
    ) -> Result<Primary, ProtectError> {
        let refused = match refuse {
            Some(why) => Some(ProtectError::Refused(why.to_string())),
            None => (vm.shape != self.shape).then_some(ProtectError::Shape),
        };
        if let Some(e) = refused {
            self.link.lose(&e.to_string());
            return Err(e);
        }
        let mut primary = Primary::new(self.link.clone(), self.gate, hooks.writes.clone(), s);
        match primary.start(vm, self.accept.disk_digests, SYNC_CHUNK) {
            Ok(()) => Ok(primary),
            Err(e) => {
                self.link.lose(&e.to_string());
                Err(e.into())
            }
        }
    }
}

/// A connection to a new secondary being made off the device loop.
pub struct Pending {
    pub peer: String,
    pub generation: u64,
    /// Who asked (`ctl protect`); `None`: this node's own attempt to protect again.
    pub reply_to: Option<UnixStream>,
    handle: JoinHandle<Result<Connection, ProtectError>>,
}

/// Starts connecting to the secondary at `peer`, for `ctl protect` (`reply_to`) or for
/// this node's own attempt (one try, no wait for the secondary to come up); the eventfd
/// `done` is written when the attempt ends, however it ends.
pub fn connect(
    vm: &Vm,
    p: &Protectable,
    peer: String,
    generation: u64,
    reply_to: Option<UnixStream>,
    done: EventFd,
) -> Pending {
    let hello = hello(vm.shape.clone(), generation);
    let gate = p.hooks.fresh_gate();
    let mut s = p.settings;
    if reply_to.is_none() {
        s.peer_wait = Duration::ZERO;
    }
    let to = peer.clone();
    tracing::info!(
        "protecting the guest: connecting to a secondary at {peer} (generation {generation})"
    );
    let handle = std::thread::spawn(move || {
        // The device loop hears of the end however it comes (an error returned early).
        let _done = Signal(done);
        open(&to, &hello, gate, &s)
    });
    Pending {
        peer,
        generation,
        reply_to,
        handle,
    }
}

/// Writes its eventfd when dropped.
struct Signal(EventFd);

impl Drop for Signal {
    fn drop(&mut self) {
        let _ = self.0.write(1);
    }
}

impl Pending {
    /// The connected secondary as this node's new primary role, its initial sync started.
    /// Call once the eventfd given to [`connect`] was written (the thread is ending:
    /// this waits for it); `refuse` is why the guest cannot be protected
    /// right now (an operator's pause, dirty tracking in other use), checked last.
    pub fn finish(
        self,
        vm: &Vm,
        p: &mut Protectable,
        refuse: Option<&str>,
    ) -> (Result<Primary, ProtectError>, Option<UnixStream>) {
        let result = self
            .handle
            .join()
            .unwrap_or_else(|_| Err(ProtectError::Panicked))
            .and_then(|c| c.into_primary(vm, &p.hooks, &p.settings, refuse));
        if result.is_ok() {
            p.generation = self.generation;
        }
        match &result {
            Ok(_) => tracing::info!(
                "secondary {} accepted the VM (generation {}); initial sync started",
                self.peer,
                self.generation
            ),
            Err(e) => tracing::warn!(
                "protecting the guest at {} failed: {e}; it runs on unprotected",
                self.peer
            ),
        }
        (result, self.reply_to)
    }
}
