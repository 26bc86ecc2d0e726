//! The secondary role: runs no vCPU; receives the initial sync and the checkpoints of one
//! primary, and when that primary is gone for good or hands over, builds the VM from the
//! last committed checkpoint — its memory handed to KVM as it is — and runs it as an
//! unprotected primary on its own tap, announcing the guest's MAC.
//!
//! When is a primary gone for good? (`verdict`)
//! - It said goodbye: never. The guest ended (this process ends too), or protection
//!   ended on purpose (wait for the next primary).
//! - It sent something malformed: never; a primary that talks is alive. It is dropped
//!   with the reason, and the secondary waits for a new one.
//! - Its connection closed while its frames were still arriving (within
//!   `--failover-timeout-ms`): its process died.
//! - With `--etcd`: also when it is silent past `--failover-timeout-ms`, or its
//!   connection closes after a silence; the fence then decides, and only a node that
//!   won the next generation takes over.
//! - Without: a silence proves nothing, and a close after one neither. The secondary
//!   keeps its last commit and waits: for the primary to speak again, for a new primary,
//!   or for the operator's `ctl failover`.

use std::io::Write;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mcvmm_fence::{Fence, Owner};
use mcvmm_replication::disk::{DiskError, Disks, Replica};
use mcvmm_replication::messages::{self, Hello};
use mcvmm_replication::secondary::{check_hello, Expect, Progress};
use mcvmm_replication::wire::{self, Kind, WireError};
use serde_json::Value;

use mcvmm_devices::virtio::tap::{Tap, TapError};

mod control;
mod listen;
mod receive;
mod takeover;
mod verdict;

use listen::{next_primary, Held};
use receive::{receive, Received};
pub use takeover::refuse_stale_primaries;
use takeover::{claim, prepare_in_background, take_over, Detected, Preparing};

use crate::control::{ControlServer, Serving};
use crate::fencing::FenceStatus;

use crate::protect::Hooks;
use crate::vm::{self, DiskConfig, SerialOut, Vm, VmError};
use mcvmm_devices::GuestMemory;

pub struct SecondaryConfig {
    pub listen: String,
    pub disks: Vec<DiskConfig>,
    pub tap: Option<String>,
    pub serial: SerialOut,
    pub timeout: Duration,
    pub generation: u64,
    /// `--etcd`: a takeover must win the next generation first.
    pub fence: Option<Fence>,
}

/// Why the secondary ended without a guest to run, or could not start it.
#[derive(Debug, thiserror::Error)]
pub enum SecondaryError {
    #[error("secondary disks: {0}")]
    Disks(DiskError),
    #[error("--tap {name}: {source}")]
    Tap { name: String, source: TapError },
    #[error("listening on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("accepting a primary: {0}")]
    Accept(std::io::Error),
    #[error("serving the control socket: {0}")]
    ControlThread(std::io::Error),
    #[error("the connection to primary {peer}: {source}")]
    Connection {
        peer: String,
        source: std::io::Error,
    },
    #[error("guest memory for the replica: {0}")]
    Memory(VmError),
    #[error(
        "{why}, before the first checkpoint committed: no consistent guest to run, not taking over"
    )]
    NothingCommitted { why: String },
    #[error("the committed checkpoint has no machine state")]
    NoState,
    #[error("syncing the replicas: {0}")]
    SyncReplicas(DiskError),
    #[error("preparing the VM: a second handle on the tap: {0}")]
    PrepareTap(std::io::Error),
    #[error("preparing the VM: {0}")]
    Prepare(VmError),
    #[error("preparing the VM: the thread panicked")]
    PreparePanicked,
    #[error("starting the VM from the committed checkpoint: {0}")]
    Start(VmError),
    #[error("fence: {0}")]
    Fence(mcvmm_fence::FenceError),
}

/// Why a connection was not a primary's Hello.
#[derive(Debug, thiserror::Error)]
pub enum HelloError {
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("{0}")]
    Wire(#[from] WireError),
    #[error("expected Hello, got {0:?}")]
    NotHello(Kind),
}

/// What the control socket sees of the secondary while it receives.
struct Shared {
    progress: Arc<Mutex<Progress>>,
    primary: Mutex<Option<(String, TcpStream)>>,
    generation: AtomicU64,
    operator_takeover: AtomicBool,
    receiving: AtomicBool,
    /// The epoch of a commit kept from a primary that went silent (no fence): `ctl
    /// failover` may still run it. 0: none.
    orphaned: AtomicU64,
    started: Instant,
    /// What `status` shows of the fence (none without one): a claim etcd has not decided
    /// yet, and etcd's last error meanwhile.
    fence: Mutex<Option<FenceStatus>>,
}

impl Shared {
    fn new(generation: u64) -> Shared {
        Shared {
            progress: Arc::new(Mutex::new(Progress {
                phase: "waiting for a primary",
                ..Progress::default()
            })),
            primary: Mutex::new(None),
            generation: AtomicU64::new(generation),
            operator_takeover: AtomicBool::new(false),
            receiving: AtomicBool::new(true),
            orphaned: AtomicU64::new(0),
            started: Instant::now(),
            fence: Mutex::new(None),
        }
    }

    fn set_phase(&self, phase: &'static str) {
        *self.progress.lock().unwrap_or_else(PoisonError::into_inner) = Progress {
            phase,
            ..Progress::default()
        };
    }

    fn fence_status(&self, update: impl FnOnce(&mut FenceStatus)) {
        let mut f = self.fence.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(f) = f.as_mut() {
            update(f);
        }
    }

    fn set_primary(&self, primary: Option<(String, TcpStream)>) {
        *self.primary.lock().unwrap_or_else(PoisonError::into_inner) = primary;
    }
}

/// A VM built from the committed checkpoint, ready for the device loop.
pub struct TookOver {
    pub vm: Vm,
    /// The VM's primary seams, idle until `ctl protect` gives it a new secondary.
    pub hooks: Hooks,
    pub info: Value,
    pub listener: TcpListener,
    pub generation: u64,
    /// The control socket, served here until the takeover: the device loop's from now.
    pub control: Option<ControlServer>,
    /// The fence, and this node's win that allowed the takeover.
    pub fence: Option<(Fence, Owner)>,
}

/// How the secondary ended.
pub enum Outcome {
    /// It runs the guest now.
    TookOver(Box<TookOver>),
    /// The primary said the guest ended: nothing is left to protect.
    GuestEnded(String),
}

fn refuse(mut stream: &TcpStream, why: &str) {
    let _ = wire::write_frame(&mut stream, Kind::Refuse, 0, &[why.as_bytes()]);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads a primary's Hello (bounded in time).
fn read_hello(stream: &mut TcpStream) -> Result<Hello, HelloError> {
    stream.set_read_timeout(Some(Duration::from_secs(10)))?;
    let mut payload = Vec::new();
    let h = wire::read_frame(stream, &mut payload)?;
    if h.kind != Kind::Hello {
        return Err(HelloError::NotHello(h.kind));
    }
    Ok(messages::decode(&h, &payload)?)
}

/// A primary whose Hello was accepted, and the VM being built for it.
struct Session {
    stream: TcpStream,
    peer: String,
    hello: Hello,
    mem: GuestMemory,
    prepared: Preparing,
    hooks: Hooks,
}

/// Receives from primaries until one is gone for good after a commit (or hands over, or
/// the operator says so); then builds the VM. `control` is served meanwhile, and handed
/// on with the VM. A signal or `ctl stop` before that ends the process.
pub fn run(
    mut cfg: SecondaryConfig,
    control: Option<ControlServer>,
) -> Result<Outcome, SecondaryError> {
    let (replicas, tap, listener) = open(&cfg)?;
    let mut fence = cfg.fence.take();
    let shared = Arc::new(Shared::new(cfg.generation));
    if let Some(f) = &fence {
        *shared.fence.lock().unwrap_or_else(PoisonError::into_inner) = Some(FenceStatus {
            key: f.key().to_string(),
            node: f.node().to_string(),
            ..FenceStatus::default()
        });
    }
    let serving = control
        .map(|c| {
            let s = shared.clone();
            c.serve_on_thread("secondary-control", move |stream, request| {
                control::handle(&s, stream, request)
            })
        })
        .transpose()
        .map_err(SecondaryError::ControlThread)?;
    let mut held = Held::Free(Disks::new(replicas));
    loop {
        let Some((stream, addr)) = next_primary(&listener, &shared)? else {
            // The operator runs the commit kept from a silent primary.
            shared.operator_takeover.store(false, Ordering::SeqCst);
            match held {
                Held::Orphan { session, rx, why } => {
                    shared.orphaned.store(0, Ordering::SeqCst);
                    shared.receiving.store(false, Ordering::SeqCst);
                    let how = Detected {
                        why: format!("operator asked for failover ({why})"),
                        at: Instant::now(),
                        claim_ms: None,
                    };
                    let took = take_over(&cfg, session, how, *rx, listener, None)?;
                    return Ok(Outcome::TookOver(Box::new(with_control(took, serving))));
                }
                free => {
                    held = free;
                    continue;
                }
            }
        };
        let seen = Welcome {
            disks: held.disks(),
            tap: tap.as_ref(),
            fence: fence.as_ref(),
        };
        let Some(session) = welcome(stream, addr, &cfg, &shared, seen)? else {
            continue;
        };
        shared.orphaned.store(0, Ordering::SeqCst);
        let disks = held.into_disks();
        let fenced = fence.is_some();
        match receive(&session, &cfg, &shared, &listener, fenced, disks)? {
            Received::Dropped(d) => {
                held = Held::Free(d);
                drop(session.prepared.join());
            }
            Received::GuestEnded(why) => return Ok(Outcome::GuestEnded(why)),
            Received::Orphaned { why, rx } => {
                tracing::warn!(
                    "{why}; keeping the commit of epoch {} and waiting for a primary",
                    rx.committed()
                );
                shared.orphaned.store(rx.committed(), Ordering::SeqCst);
                shared.set_phase("primary gone, holding its last commit");
                held = Held::Orphan { session, rx, why };
            }
            Received::Gone { why, detected, rx } => {
                let claimed = Instant::now();
                let won = match &fence {
                    Some(f) if rx.committed() > 0 => {
                        let next = session.hello.generation + 1;
                        let Some(owner) = claim(f, next, &shared, &why)? else {
                            held = Held::Free(rx.disks);
                            drop(session.prepared.join());
                            continue;
                        };
                        Some(owner)
                    }
                    _ => None,
                };
                shared.receiving.store(false, Ordering::SeqCst);
                let fence_won = won.and_then(|o| fence.take().map(|f| (f, o)));
                let claim_ms = fence_won
                    .as_ref()
                    .map(|_| claimed.elapsed().as_secs_f64() * 1e3);
                let how = Detected {
                    why,
                    at: detected,
                    claim_ms,
                };
                let took = take_over(&cfg, session, how, *rx, listener, fence_won)?;
                return Ok(Outcome::TookOver(Box::new(with_control(took, serving))));
            }
        }
    }
}

/// The secondary's replicas, its tap and its listener (polled, so that the operator is
/// heard between connections), opened before any primary comes.
fn open(cfg: &SecondaryConfig) -> Result<(Vec<Replica>, Option<Tap>, TcpListener), SecondaryError> {
    let replicas = cfg
        .disks
        .iter()
        .map(|d| Replica::open(&d.path))
        .collect::<Result<Vec<_>, _>>()
        .map_err(SecondaryError::Disks)?;
    // Attached now, not at takeover: a tap that comes up at takeover starts in a bridge
    // port that is not yet forwarding, and the guest's first frames and announcements
    // would be lost there. A missing tap is also better told now than at failover.
    let tap = match &cfg.tap {
        Some(name) => Some(Tap::open(name).map_err(|source| SecondaryError::Tap {
            name: name.clone(),
            source,
        })?),
        None => None,
    };
    let listen_err = |source| SecondaryError::Listen {
        addr: cfg.listen.clone(),
        source,
    };
    let listener = TcpListener::bind(&cfg.listen).map_err(listen_err)?;
    // Polled, so that the operator can be heard between connections.
    listener.set_nonblocking(true).map_err(listen_err)?;
    tracing::info!(
        "secondary listening on {} ({} disk(s), {}, {})",
        cfg.listen,
        cfg.disks.len(),
        cfg.tap
            .as_deref()
            .map_or("no tap".to_string(), |t| format!("tap {t}")),
        cfg.fence.as_ref().map_or(
            "no fence: takes over only a primary whose process died, or when told".to_string(),
            |f| format!("fenced by {}", f.key())
        )
    );
    Ok((replicas, tap, listener))
}

fn with_control(mut took: TookOver, serving: Option<Serving>) -> TookOver {
    took.control = serving.and_then(Serving::hand_over);
    took
}

/// What a new primary is welcomed with.
struct Welcome<'a> {
    disks: &'a Disks,
    tap: Option<&'a Tap>,
    fence: Option<&'a Fence>,
}

/// Reads a new connection's Hello and accepts the primary if it fits; starts building
/// its VM. `None`: the connection was refused or went away, wait for the next.
fn welcome(
    mut stream: TcpStream,
    addr: SocketAddr,
    cfg: &SecondaryConfig,
    shared: &Shared,
    with: Welcome,
) -> Result<Option<Session>, SecondaryError> {
    let Welcome { disks, tap, fence } = with;
    let peer = addr.to_string();
    let hello = match read_hello(&mut stream) {
        Ok(h) => h,
        Err(why) => {
            tracing::warn!("connection from {peer} dropped: {why}");
            refuse(&stream, &why.to_string());
            return Ok(None);
        }
    };
    let expect = Expect {
        disk_sizes: disks.replicas().iter().map(|r| r.size).collect(),
        has_tap: cfg.tap.is_some(),
        generation: shared.generation.load(Ordering::SeqCst),
        disks,
    };
    let accept = match check_hello(&hello, &expect) {
        Ok(a) => a,
        Err(why) => {
            tracing::warn!("refused primary {peer}: {why}");
            refuse(&stream, &why.0);
            return Ok(None);
        }
    };
    // The fence's view of the key now, while the primary waits for its answer anyway: a
    // takeover's claim then goes in one round trip to etcd (see `Fence::claim`). If etcd
    // does not answer now, the claim reads first.
    if let Some(f) = fence {
        if let Err(e) = f.owner() {
            tracing::warn!("fence: reading {}: {e}", f.key());
        }
    }
    let mem = vm::guest_memory(hello.shape.mem_mib).map_err(SecondaryError::Memory)?;
    // The VM around the replica memory is built now, while the checkpoints come in:
    // a takeover then only restores the committed state into it.
    let (prepared, hooks) = prepare_in_background(cfg, &hello, &peer, &mem, tap);
    if wire::write_frame(&mut stream, Kind::Accept, 0, &[&messages::encode(&accept)])
        .and_then(|_| stream.flush())
        .is_err()
    {
        drop(prepared.join());
        return Ok(None);
    }
    tracing::info!(
        "primary {peer} accepted: {} MiB, {} vCPU(s), {} disk(s), generation {}",
        hello.shape.mem_mib,
        hello.shape.vcpus,
        hello.shape.disks.len(),
        hello.generation
    );
    Ok(Some(Session {
        stream,
        peer,
        hello,
        mem,
        prepared,
        hooks,
    }))
}
