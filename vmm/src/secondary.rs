//! The secondary role: runs no vCPU; receives the initial sync and the checkpoints of one
//! primary, and when that primary is lost (connection closed, or silent past
//! `--failover-timeout-ms`) or hands over, builds the VM from the last committed
//! checkpoint — its memory handed to KVM as it is — and runs it as an unprotected
//! primary on its own tap, announcing the guest's MAC.
//!
//! A primary that sends something malformed is dropped with the reason and the secondary
//! waits for a new one: it does not take over, since a primary that talks is alive.

use std::io::{BufRead, BufReader, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::unix::net::UnixListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{bail, Context};
use mcvmm_checkpoint::state::MachineState;
use mcvmm_replication::disk::{Disks, Replica};
use mcvmm_replication::messages::{self, Hello};
use mcvmm_replication::secondary::{self, check_hello, Ended, Expect, Progress, Receiver};
use mcvmm_replication::wire::{self, Kind};
use serde_json::{json, Value};

use mcvmm_devices::virtio::tap::Tap;

use crate::protect::Hooks;
use crate::vm::{self, Continue, DiskConfig, Prepared, Seams, SerialOut, Source, Vm, VmConfig};
use mcvmm_devices::GuestMemory;

pub struct SecondaryConfig {
    pub listen: String,
    pub disks: Vec<DiskConfig>,
    pub tap: Option<String>,
    pub serial: SerialOut,
    pub api_sock: Option<PathBuf>,
    pub timeout: Duration,
    pub generation: u64,
}

/// What the control socket sees of the secondary while it receives.
struct Shared {
    progress: Arc<Mutex<Progress>>,
    primary: Mutex<Option<(String, TcpStream)>>,
    generation: AtomicU64,
    operator_takeover: AtomicBool,
    receiving: AtomicBool,
    started: Instant,
}

/// A VM built from the committed checkpoint, ready for the device loop.
pub struct TookOver {
    pub vm: Vm,
    /// The VM's primary seams, idle until `ctl protect` gives it a new secondary.
    pub hooks: Hooks,
    pub info: Value,
    pub listener: TcpListener,
    pub generation: u64,
}

fn refuse(stream: &mut TcpStream, why: &str) {
    let _ = wire::write_frame(stream, Kind::Refuse, 0, &[why.as_bytes()]);
    let _ = stream.flush();
    let _ = stream.shutdown(Shutdown::Both);
}

/// Reads a primary's Hello (bounded in time).
fn read_hello(stream: &mut TcpStream) -> Result<Hello, String> {
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .map_err(|e| e.to_string())?;
    let mut payload = Vec::new();
    let h = wire::read_frame(stream, &mut payload).map_err(|e| e.to_string())?;
    if h.kind != Kind::Hello {
        return Err(format!("expected Hello, got {:?}", h.kind));
    }
    messages::decode(&h, &payload).map_err(|e| e.to_string())
}

/// Receives from primaries until one is lost after a commit (or hands over); then builds
/// the VM. Returns `Ok(None)` if stopped (signal or `ctl stop`) before that.
pub fn run(cfg: SecondaryConfig) -> anyhow::Result<TookOver> {
    let replicas = cfg
        .disks
        .iter()
        .map(|d| Replica::open(&d.path))
        .collect::<Result<Vec<_>, _>>()
        .context("secondary disks")?;
    let mut disks = Disks::new(replicas);
    // Attached now, not at takeover: a tap that comes up at takeover starts in a bridge
    // port that is not yet forwarding, and the guest's first frames and announcements
    // would be lost there. A missing tap is also better told now than at failover.
    let tap = match &cfg.tap {
        Some(name) => Some(Tap::open(name).with_context(|| format!("--tap {name}"))?),
        None => None,
    };
    let listener =
        TcpListener::bind(&cfg.listen).with_context(|| format!("listening on {}", cfg.listen))?;
    tracing::info!(
        "secondary listening on {} ({} disk(s), {})",
        cfg.listen,
        cfg.disks.len(),
        cfg.tap
            .as_deref()
            .map_or("no tap".to_string(), |t| format!("tap {t}"))
    );
    let shared = Arc::new(Shared {
        progress: Arc::new(Mutex::new(Progress {
            phase: "waiting for a primary",
            ..Progress::default()
        })),
        primary: Mutex::new(None),
        generation: AtomicU64::new(cfg.generation),
        operator_takeover: AtomicBool::new(false),
        receiving: AtomicBool::new(true),
        started: Instant::now(),
    });
    if let Some(path) = &cfg.api_sock {
        let _ = std::fs::remove_file(path);
        let l = UnixListener::bind(path)
            .with_context(|| format!("control socket {}", path.display()))?;
        let s = shared.clone();
        std::thread::Builder::new()
            .name("secondary-api".into())
            .spawn(move || serve_api(&l, &s))?;
    }
    loop {
        let (mut stream, addr) = listener.accept().context("accepting a primary")?;
        let peer = addr.to_string();
        let hello = match read_hello(&mut stream) {
            Ok(h) => h,
            Err(why) => {
                tracing::warn!("connection from {peer} dropped: {why}");
                refuse(&mut stream, &why);
                continue;
            }
        };
        let expect = Expect {
            disk_sizes: disks.replicas().iter().map(|r| r.size).collect(),
            has_tap: cfg.tap.is_some(),
            generation: shared.generation.load(Ordering::SeqCst),
            disks: &disks,
        };
        let accept = match check_hello(&hello, &expect) {
            Ok(a) => a,
            Err(why) => {
                tracing::warn!("refused primary {peer}: {why}");
                refuse(&mut stream, &why.0);
                continue;
            }
        };
        let mem = vm::guest_memory(hello.shape.mem_mib)?;
        // The VM around the replica memory is built now, while the checkpoints come in:
        // a takeover then only restores the committed state into it.
        let (prepared, hooks) = prepare_in_background(&cfg, &hello, &peer, &mem, tap.as_ref());
        if wire::write_frame(&mut stream, Kind::Accept, 0, &[&messages::encode(&accept)])
            .and_then(|_| stream.flush())
            .is_err()
        {
            continue;
        }
        tracing::info!(
            "primary {peer} accepted: {} MiB, {} vCPU(s), {} disk(s), generation {}",
            hello.shape.mem_mib,
            hello.shape.vcpus,
            hello.shape.disks.len(),
            hello.generation
        );
        *shared
            .progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Progress {
            phase: "syncing",
            ..Progress::default()
        };
        let _ = stream.set_nodelay(true);
        stream.set_read_timeout(Some(cfg.timeout))?;
        stream.set_write_timeout(Some(cfg.timeout))?;
        *shared
            .primary
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((peer.clone(), stream.try_clone()?));
        let replies = Arc::new(Mutex::new(stream.try_clone()?));
        let stop_beats = Arc::new(AtomicBool::new(false));
        let beats = secondary::heartbeats(
            replies.clone(),
            mcvmm_replication::primary::HEARTBEAT,
            stop_beats.clone(),
        );
        let mut rx = Receiver::new(mem, disks, shared.progress.clone());
        let mut reader = BufReader::with_capacity(1 << 20, stream.try_clone()?);
        let ended = rx.run(&mut reader, &replies, cfg.timeout);
        let detected = Instant::now();
        stop_beats.store(true, Ordering::SeqCst);
        shared
            .primary
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        let why = match &ended {
            Ended::Refused(e) => {
                tracing::warn!(
                    "dropped primary {peer}: {e}; not taking over (it is alive); waiting for a primary"
                );
                refuse(&mut stream, &e.to_string());
                let _ = beats.join();
                let Receiver { disks: d, .. } = rx;
                disks = d;
                drop(prepared.join());
                continue;
            }
            Ended::Lost(e) if shared.operator_takeover.load(Ordering::SeqCst) => {
                format!("operator asked for failover ({e})")
            }
            Ended::Lost(e) => format!("primary lost: {e}"),
            Ended::Takeover(n) => format!("planned switch at epoch {n}"),
        };
        let _ = stream.shutdown(Shutdown::Both);
        // Not joined: it may be asleep until its next beat, and it ends by itself.
        drop(beats);
        let epoch = rx.committed();
        if epoch == 0 {
            bail!(
                "{why}, before the first checkpoint committed: no consistent guest to run, not taking over"
            );
        }
        shared.receiving.store(false, Ordering::SeqCst);
        tracing::warn!("{why}; taking over from committed epoch {epoch}");
        let generation = hello.generation + 1;
        let state = rx
            .take_state()
            .context("the committed checkpoint has no machine state")?;
        let took = take_over(&cfg, &hello, &peer, epoch, &state, rx, prepared)?;
        let ms = detected.elapsed().as_secs_f64() * 1e3;
        tracing::warn!(
            "TOOK OVER at epoch {epoch} in {ms:.1} ms; this is now an unprotected primary (generation {generation})"
        );
        let info = json!({
            "from_primary": peer,
            "epoch": epoch,
            "why": why,
            "build_ms": ms,
            "generation": generation,
        });
        return Ok(TookOver {
            vm: took,
            hooks,
            info,
            listener,
            generation,
        });
    }
}

/// The VM a takeover would run, for the primary `hello` describes.
fn replica_config(cfg: &SecondaryConfig, hello: &Hello, peer: &str, epoch: u64) -> VmConfig {
    let shape = &hello.shape;
    VmConfig {
        source: Source::Replica {
            primary: peer.to_string(),
            epoch,
        },
        disks: cfg
            .disks
            .iter()
            .zip(&shape.disks)
            .map(|(d, s)| DiskConfig {
                path: d.path.clone(),
                read_only: s.read_only,
            })
            .collect(),
        tap: shape.net.and(cfg.tap.clone()),
        mac: shape.net.unwrap_or([0x52, 0x54, 0, 0x12, 0x34, 0x56]),
        mem_mib: shape.mem_mib,
        vcpus: shape.vcpus,
        serial: cfg.serial.clone(),
    }
}

type Preparing = JoinHandle<Result<Prepared, String>>;

/// Starts building the VM over `mem` on a thread of its own. It shares the tap the
/// secondary holds (a second handle), so a VM that is never used leaves the tap's bridge
/// port as it was.
fn prepare_in_background(
    cfg: &SecondaryConfig,
    hello: &Hello,
    peer: &str,
    mem: &GuestMemory,
    tap: Option<&Tap>,
) -> (Preparing, Hooks) {
    let config = replica_config(cfg, hello, peer, 0);
    let hooks = Hooks::new();
    let hook_seams = hooks.seams();
    let tap = match (tap, hello.shape.net) {
        (Some(t), Some(_)) => t.try_clone().map(Some),
        _ => Ok(None),
    };
    let mem = mem.clone();
    let preparing = std::thread::spawn(move || {
        let t = Instant::now();
        let prepared = tap
            .map_err(|e| format!("a second handle on the tap: {e}"))
            .and_then(|tap| {
                let seams = Seams {
                    tap,
                    announce: true,
                    ..hook_seams
                };
                vm::prepare(config, mem, seams).map_err(|e| e.to_string())
            });
        // Said now, not only at a takeover that would then fail.
        match &prepared {
            Ok(_) => tracing::info!(
                "VM prepared for a takeover in {:.1} ms",
                t.elapsed().as_secs_f64() * 1e3
            ),
            Err(e) => tracing::error!("preparing the VM for a takeover failed: {e}"),
        }
        prepared
    });
    (preparing, hooks)
}

fn take_over(
    cfg: &SecondaryConfig,
    hello: &Hello,
    peer: &str,
    epoch: u64,
    state: &MachineState,
    rx: Receiver,
    prepared: Preparing,
) -> anyhow::Result<Vm> {
    let Receiver { disks, .. } = rx;
    // Committed writes are in the replicas (not yet synced, see `Disks::commit`); the
    // VM's disks are other handles on the same files.
    let t = Instant::now();
    disks.sync().context("syncing the replicas")?;
    drop(disks);
    tracing::info!(
        "replicas synced in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let prepared = prepared
        .join()
        .map_err(|_| anyhow::anyhow!("preparing the VM: the thread panicked"))?
        .map_err(|e| anyhow::anyhow!("preparing the VM: {e}"))?;
    let mut vm = vm::finish(prepared, Some(Continue::Image(state, &hello.shape)))
        .context("starting the VM from the committed checkpoint")?;
    vm.config = replica_config(cfg, hello, peer, epoch);
    Ok(vm)
}

/// After a takeover this node runs the guest: any primary that comes back is stale.
pub fn refuse_stale_primaries(listener: TcpListener, generation: u64) {
    let _ = std::thread::Builder::new()
        .name("stale-primaries".into())
        .spawn(move || {
            for conn in listener.incoming() {
                let Ok(mut stream) = conn else { continue };
                let peer = stream
                    .peer_addr()
                    .map(|a| a.to_string())
                    .unwrap_or_default();
                let why = match read_hello(&mut stream) {
                    Ok(h) => format!(
                        "stale primary: generation {} but this node took over and runs the guest at generation {generation}",
                        h.generation
                    ),
                    Err(e) => e,
                };
                tracing::warn!("refused {peer}: {why}");
                refuse(&mut stream, &why);
            }
        });
}

fn serve_api(listener: &UnixListener, shared: &Shared) {
    for conn in listener.incoming() {
        if !shared.receiving.load(Ordering::SeqCst) {
            // The device loop's socket takes over (same path, bound anew).
            return;
        }
        let Ok(stream) = conn else { continue };
        let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
        let mut line = String::new();
        if BufReader::new(&stream).read_line(&mut line).is_err() {
            continue;
        }
        let reply = match line.trim() {
            "status" => {
                let p = shared
                    .progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .clone();
                let primary = shared
                    .primary
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .as_ref()
                    .map(|p| p.0.clone());
                json!({
                    "role": "secondary",
                    "state": "receiving",
                    "pid": std::process::id(),
                    "protected": p.committed_epoch > 0 && primary.is_some(),
                    "primary": primary,
                    "generation": shared.generation.load(Ordering::SeqCst),
                    "last_committed_epoch": p.committed_epoch,
                    "uptime_ms": shared.started.elapsed().as_millis() as u64,
                    "progress": p,
                })
            }
            "failover" => {
                let committed = shared
                    .progress
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .committed_epoch;
                let primary = shared
                    .primary
                    .lock()
                    .unwrap_or_else(PoisonError::into_inner);
                match (&*primary, committed) {
                    (Some((_, s)), c) if c > 0 => {
                        shared.operator_takeover.store(true, Ordering::SeqCst);
                        let _ = s.shutdown(Shutdown::Both);
                        json!({"ok": true, "taking_over_from_epoch": c})
                    }
                    (None, _) => json!({"error": "no primary connected"}),
                    _ => json!({"error": "no checkpoint committed yet: nothing consistent to run"}),
                }
            }
            "stop" => {
                let mut w = &stream;
                let _ = writeln!(w, "{}", json!({"ok": true}));
                tracing::info!("stopped (secondary)");
                std::process::exit(0);
            }
            other => json!({"error": format!(
                "{other:?}: this is a secondary, no guest runs here yet; known: status, failover, stop"
            )}),
        };
        let mut w = &stream;
        let _ = writeln!(w, "{reply}");
    }
}
