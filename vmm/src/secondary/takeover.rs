//! Taking over: building the VM while a primary streams, claiming the guest in the fence
//! once that primary is gone, and starting the guest from the last committed checkpoint.

use std::net::TcpListener;
use std::sync::atomic::Ordering;
use std::thread::JoinHandle;
use std::time::Instant;

use mcvmm_checkpoint::state::MachineState;
use mcvmm_devices::virtio::tap::Tap;
use mcvmm_devices::GuestMemory;
use mcvmm_fence::{Claim, Fence, Owner};
use mcvmm_replication::messages::Hello;
use mcvmm_replication::secondary::Receiver;
use serde_json::json;

use super::{read_hello, refuse, SecondaryConfig, SecondaryError, Session, Shared, TookOver};
use crate::protect::Hooks;
use crate::vm::{self, Continue, DiskConfig, Prepared, Seams, Source, Vm, VmConfig};

/// Claims `generation` for a takeover until etcd decides. `None`: another node won; this
/// one goes back to waiting for a primary.
pub(super) fn claim(
    fence: &Fence,
    generation: u64,
    shared: &Shared,
    why: &str,
) -> Result<Option<Owner>, SecondaryError> {
    tracing::warn!("{why}; claiming generation {generation} in the fence before taking over");
    shared.set_phase("claiming the guest in the fence");
    let began = Instant::now();
    shared.fence_status(|s| s.claiming = Some(generation));
    let mut said = None;
    let claim = fence.claim_until_decided(generation, crate::fencing::RETRY, |e, waited| {
        shared.fence_status(|s| {
            s.etcd_error = Some(e.to_string());
            s.claiming_for_ms = waited.as_millis() as u64;
        });
        crate::fencing::say_undecided(generation, e, waited, &mut said)
    });
    shared.fence_status(|s| {
        s.claiming = None;
        s.etcd_error = None;
        s.claiming_for_ms = began.elapsed().as_millis() as u64;
        if let Ok(Claim::Won(o) | Claim::Lost { owner: Some(o) }) = &claim {
            s.owner = Some(o.clone());
        }
    });
    let claim = claim.map_err(SecondaryError::Fence)?;
    match claim {
        Claim::Won(owner) => Ok(Some(owner)),
        Claim::Lost { owner } => {
            let held = owner.as_ref().map_or(generation, |o| o.generation);
            shared.generation.fetch_max(held, Ordering::SeqCst);
            tracing::warn!(
                "fence: {} won: not taking over; waiting for a primary",
                owner.map_or_else(|| format!("generation {generation}"), |o| o.to_string())
            );
            shared.set_phase("waiting for a primary");
            Ok(None)
        }
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

pub(super) type Preparing = JoinHandle<Result<Prepared, SecondaryError>>;

/// Starts building the VM over `mem` on a thread of its own. It shares the tap the
/// secondary holds (a second handle), so a VM that is never used leaves the tap's bridge
/// port as it was.
pub(super) fn prepare_in_background(
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
        let prepared = tap.map_err(SecondaryError::PrepareTap).and_then(|tap| {
            let seams = Seams {
                tap,
                announce: true,
                ..hook_seams
            };
            vm::prepare(config, mem, seams).map_err(SecondaryError::Prepare)
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

/// Why a takeover happens, when the primary's end was seen, and how long the fence's
/// claim took after that (fenced only).
pub(super) struct Detected {
    pub(super) why: String,
    pub(super) at: Instant,
    pub(super) claim_ms: Option<f64>,
}

/// Runs the guest from the last committed checkpoint of the primary that is gone.
pub(super) fn take_over(
    cfg: &SecondaryConfig,
    session: Session,
    detected: Detected,
    rx: Receiver,
    listener: TcpListener,
    fence: Option<(Fence, Owner)>,
) -> Result<TookOver, SecondaryError> {
    let Detected {
        why,
        at: detected,
        claim_ms,
    } = detected;
    let epoch = rx.committed();
    if epoch == 0 {
        return Err(SecondaryError::NothingCommitted { why });
    }
    tracing::warn!("{why}; taking over from committed epoch {epoch}");
    let Session {
        hello,
        peer,
        prepared,
        hooks,
        ..
    } = session;
    let generation = hello.generation + 1;
    let vm = start_vm(cfg, &hello, &peer, epoch, rx, prepared)?;
    let ms = detected.elapsed().as_secs_f64() * 1e3;
    tracing::warn!(
        "TOOK OVER at epoch {epoch} in {ms:.1} ms; this is now an unprotected primary (generation {generation})"
    );
    let info = json!({
        "from_primary": peer,
        "epoch": epoch,
        "why": why,
        "build_ms": ms,
        "fence_claim_ms": claim_ms,
        "generation": generation,
    });
    // Stale primaries are refused on it by a thread that accepts blocking.
    let _ = listener.set_nonblocking(false);
    Ok(TookOver {
        vm,
        hooks,
        info,
        listener,
        generation,
        control: None,
        fence,
    })
}

/// The prepared VM, with the committed machine state restored into it and the replicas
/// on disk.
fn start_vm(
    cfg: &SecondaryConfig,
    hello: &Hello,
    peer: &str,
    epoch: u64,
    mut rx: Receiver,
    prepared: Preparing,
) -> Result<Vm, SecondaryError> {
    let state: MachineState = rx.take_state().ok_or(SecondaryError::NoState)?;
    let Receiver { disks, .. } = rx;
    // Committed writes are in the replicas (not yet synced, see `Disks::commit`); the
    // VM's disks are other handles on the same files.
    let t = Instant::now();
    disks.sync().map_err(SecondaryError::SyncReplicas)?;
    drop(disks);
    tracing::info!(
        "replicas synced in {:.1} ms",
        t.elapsed().as_secs_f64() * 1e3
    );
    let prepared = prepared
        .join()
        .map_err(|_| SecondaryError::PreparePanicked)??;
    let mut vm = vm::finish(prepared, Some(Continue::Image(&state, &hello.shape)))
        .map_err(SecondaryError::Start)?;
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
                    Err(e) => e.to_string(),
                };
                tracing::warn!("refused {peer}: {why}");
                refuse(&stream, &why);
            }
        });
}
