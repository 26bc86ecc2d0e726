//! `mcvmm ctl snapshot DIR [incremental]`: pause, capture memory and the whole machine
//! state into DIR, resume. The first snapshot starts dirty tracking; each incremental one
//! holds the pages written since the snapshot before it (its parent) and the full state.

use std::path::{Path, PathBuf};
use std::sync::PoisonError;
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::{DirtyError, DirtyTracker};
use mcvmm_checkpoint::persist::{Persist, PersistError};
use mcvmm_checkpoint::snapshot::{begin_full, write_incremental, FullSnapshot, SnapshotError};
use mcvmm_checkpoint::state::CapturedState;
use serde_json::{json, Value};

use crate::cycle::{Ahead, Cycle, CycleError, KeepSet, Pages};
use crate::epochs::{start_for_copy, StartCopyError, PAUSE_LIMIT};
use crate::vcpu::PauseError;
use crate::vm::{Vm, VmError};
use crate::vm_state::InKernel;

/// Why the machine state could not be captured.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    #[error("capturing the vCPUs: {0}")]
    Vcpus(#[from] PauseError),
    #[error("capturing the in-kernel devices: {0}")]
    Vm(#[from] VmError),
    #[error("capturing the devices: {0}")]
    Device(#[from] PersistError),
}

/// Why a snapshot was not taken.
#[derive(Debug, thiserror::Error)]
pub enum TakeError {
    #[error("an incremental snapshot needs a full one before it in this process")]
    NoParent,
    #[error(transparent)]
    Start(#[from] StartCopyError),
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Files(#[from] SnapshotError),
    #[error(transparent)]
    State(#[from] StateError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
    /// What the code around it rules out.
    #[error("internal: {0}")]
    Internal(&'static str),
}

/// Rounds of copying again what the guest wrote meanwhile, at most, before the pause.
const PRECOPY_ROUNDS: usize = 5;
/// Pages few enough to leave to the pause (4 MiB).
const PRECOPY_DONE_PAGES: u64 = 1024;

/// Snapshots taken so far by this process.
#[derive(Default)]
pub struct Snapshots {
    /// Running since the first snapshot: what changed since the last one.
    tracker: Option<DirtyTracker>,
    last: Option<PathBuf>,
}

impl Snapshots {
    /// Whether dirty tracking belongs to the snapshots (nothing else may use KVM's log).
    pub fn tracking(&self) -> bool {
        self.tracker.is_some()
    }
}

/// Captures all but RAM: vCPUs, in-kernel devices, every device. The vCPUs must be paused.
/// The devices' states are encoded later ([`CapturedState::encode`]), once the guest runs.
pub fn capture_state(vm: &Vm) -> Result<CapturedState, StateError> {
    let vcpus = vm.vcpus.save(PAUSE_LIMIT)?;
    Ok(CapturedState {
        cmdline: vm.cmdline.clone(),
        vcpus,
        vm: InKernel(&vm.vm_fd).save()?,
        devices: vm
            .device_parts()
            .iter()
            .map(|(name, d)| {
                d.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .capture_as(name)
            })
            .collect::<Result<_, _>>()?,
    })
}

/// Starts a full snapshot's copy of memory: tracking is on (or a new epoch of it started)
/// before the copy, so that what the guest writes from here on is copied again at the
/// pause. Also returns how long turning the log on paused the vCPUs: briefly with every
/// page starting dirty; the old way for as long as write-protecting all of RAM takes.
fn begin_copy(
    vm: &Vm,
    snaps: &mut Snapshots,
    dir: &Path,
    paused: bool,
) -> Result<(FullSnapshot, Duration), TakeError> {
    let mut arm = None;
    let mut tracking_on = Duration::ZERO;
    match &mut snaps.tracker {
        Some(t) => {
            t.end_epoch(&vm.vm_fd, &vm.mem)?;
        }
        None => {
            let (tracker, a, pause) = start_for_copy(vm, paused)?;
            arm = a;
            tracking_on = pause;
            snaps.tracker = Some(tracker);
        }
    }
    Ok((begin_full(dir, &vm.mem, arm.as_mut())?, tracking_on))
}

/// Takes a snapshot into `dir`. `paused`: the VM is paused already (by `ctl pause`) and
/// stays so; otherwise it is paused for the capture only. A full snapshot copies memory
/// while the guest runs and, at the pause, only what was written meanwhile.
///
/// A snapshot that fails has taken dirty sets that no file holds: an incremental one
/// after it would miss their pages. So a failure ends the chain (and the tracking); the
/// next snapshot must be a full one.
pub fn take(
    vm: &Vm,
    snaps: &mut Snapshots,
    dir: &Path,
    incremental: bool,
    paused: bool,
) -> Result<Value, TakeError> {
    let taken = take_one(vm, snaps, dir, incremental, paused);
    if taken.is_err() {
        snaps.last = None;
        if let Some(t) = snaps.tracker.take() {
            // Logging left on would only cost the guest faults; the next full snapshot
            // starts it again either way. Slots change flags with the vCPUs paused.
            let _ = vm
                .vcpus
                .paused_for(paused, PAUSE_LIMIT, || t.stop(&vm.vm_fd, &vm.mem));
        }
    }
    taken
}

/// The cycle of a snapshot's pause. After a full copy, what the guest wrote during it is
/// copied again while it runs on, round after round, as long as that shrinks the set, so
/// the pause holds only the last few pages.
fn snapshot_cycle(full: bool, paused: bool) -> Cycle {
    Cycle {
        ahead: if full && !paused {
            Ahead::Shrinking {
                rounds: PRECOPY_ROUNDS,
                done_pages: PRECOPY_DONE_PAGES,
            }
        } else {
            Ahead::None
        },
        capture: true,
        // An incremental snapshot is written in the pause, after the cycle.
        resume: false,
        paused,
    }
}

fn take_one(
    vm: &Vm,
    snaps: &mut Snapshots,
    dir: &Path,
    incremental: bool,
    paused: bool,
) -> Result<Value, TakeError> {
    if incremental && snaps.last.is_none() {
        return Err(TakeError::NoParent);
    }
    let started = Instant::now();
    let (mut full, tracking_on) = if incremental {
        (None, Duration::ZERO)
    } else {
        let (f, pause) = begin_copy(vm, snaps, dir, paused)?;
        (Some(f), pause)
    };
    let tracker = snaps
        .tracker
        .as_mut()
        .ok_or(TakeError::Internal("dirty tracking is not running"))?;
    let cycle = snapshot_cycle(full.is_some(), paused);
    let before_cycle = started.elapsed();
    let mut keep = KeepSet::default();
    let pages: &mut dyn Pages = match full.as_mut() {
        Some(f) => f,
        None => &mut keep,
    };
    let ended = cycle.run(vm, tracker, pages, None);
    let t = Instant::now();
    let written = ended.map_err(TakeError::from).and_then(|ended| {
        let state = ended
            .state
            .ok_or(TakeError::Internal("no state captured"))?
            .encode()
            .map_err(StateError::from)?;
        let written = match keep.0.take() {
            Some(set) => {
                let parent = snaps.last.as_deref().ok_or(TakeError::NoParent)?;
                Some(write_incremental(
                    dir, parent, &set, &vm.mem, &state, &vm.shape,
                )?)
            }
            None => None,
        };
        Ok((ended.steps, ended.rounds, state, written))
    });
    if !paused {
        vm.vcpus.resume();
    }
    let (steps, rounds, state, written) = written?;
    let pause = Duration::from_micros(steps.pause) + t.elapsed();
    let t = Instant::now();
    let (manifest, pages) = match (full, written) {
        (Some(f), None) => (f.seal(&state, &vm.shape)?, steps.pages),
        (_, Some(m)) => {
            let pages = m.pages;
            (m, pages)
        }
        (None, None) => return Err(TakeError::Internal("full snapshot lost")),
    };
    snaps.last = Some(dir.to_path_buf());
    Ok(json!({
        "ok": true,
        "dir": dir.display().to_string(),
        "kind": if incremental { "incremental" } else { "full" },
        "pages": manifest.pages,
        "pages_in_pause": pages,
        "pause_ms": pause.as_secs_f64() * 1e3,
        "vcpu_stop_us": steps.stop,
        "state_capture_us": steps.state,
        "tracking_on_pause_ms": tracking_on.as_secs_f64() * 1e3,
        "precopy_ms": (before_cycle + Duration::from_micros(steps.ahead)).as_secs_f64() * 1e3,
        "precopy_rounds_pages": rounds,
        "seal_ms": t.elapsed().as_secs_f64() * 1e3,
        "total_ms": started.elapsed().as_secs_f64() * 1e3,
    }))
}
