//! Epochs run on a live guest from the control socket, one every INTERVAL_MS while the
//! guest goes on:
//!
//! INTERVAL_MS is the guest's run time between two pauses, counted from the end of a
//! pause: a pause that takes longer than the interval (a full-memory comparison does in
//! the lab) must not leave the guest starved, running only between back-to-back pauses.
//!
//! * `selfcheck EPOCHS INTERVAL_MS [guest-only]` keeps a shadow of guest memory updated
//!   only from the dirty sets and compares it with real memory at every pause. Any
//!   mismatching page was written without showing in a dirty set: a hole in invariant 1
//!   (DESIGN.md). `guest-only` leaves the VMM's own writes out of the dirty sets on
//!   purpose, to prove the check notices.
//! * `epochs EPOCHS INTERVAL_MS` does what a replicating primary does at each pause —
//!   collect the dirty set, copy those pages into a local staging buffer, capture the
//!   machine state — and reports how long each step took.
//!
//! Every other epoch copies ahead, as a replicating primary does: the pages dirtied so
//! far are copied with the guest still running, and the pause copies only those written
//! since (`Staged::restage`). The others copy everything in the pause, so that one run
//! compares the two. The self-check alternates the same way, and so checks both.

use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::{DirtyError, DirtySet, DirtyTracker, LogArm, LogMode, Sources};
use mcvmm_checkpoint::shadow::ShadowError;
use mcvmm_checkpoint::staging::Staged;
use mcvmm_checkpoint::GuestMemory;
use serde_json::{json, Value};

use crate::cycle::{Ahead, Cycle, CycleError, Pages, Steps, Verifier};
use crate::vcpu::PauseError;
use crate::vm::Vm;

/// Longest a pause may take to stop every vCPU.
pub const PAUSE_LIMIT: Duration = Duration::from_secs(2);
/// How KVM's dirty log is used: manual protection where KVM has it, unless the
/// environment has `MCVMM_DIRTY_LOG=legacy` (to measure the two side by side).
pub fn log_mode() -> LogMode {
    static MODE: std::sync::OnceLock<LogMode> = std::sync::OnceLock::new();
    *MODE.get_or_init(|| match std::env::var("MCVMM_DIRTY_LOG").as_deref() {
        Ok("legacy") => LogMode::Legacy,
        _ => LogMode::Manual,
    })
}

/// Turns dirty tracking on for a full copy of memory that starts right after it. Where
/// KVM can, every page starts dirty: nothing is write-protected, the copy arms each span
/// with the handle returned. Else the log write-protects all of RAM. Either way the
/// memory slots change their flags with the vCPUs paused (unless `paused`: they are
/// already; see `Vcpus::paused_for`), and the pause's length is returned.
pub fn start_for_copy(
    vm: &Vm,
    paused: bool,
) -> Result<(DirtyTracker, Option<LogArm>, Duration), StartCopyError> {
    let t = Instant::now();
    let (tracker, arm) = vm.vcpus.paused_for(paused, PAUSE_LIMIT, || {
        let (vm_fd, mem, sources, mode) = (&vm.vm_fd, &vm.mem, Sources::GuestAndVmm, log_mode());
        match DirtyTracker::start_all_dirty(vm_fd, mem, sources, mode)? {
            Some((tracker, arm)) => Ok((tracker, Some(arm))),
            None => DirtyTracker::start(vm_fd, mem, sources, mode).map(|t| (t, None)),
        }
    })??;
    Ok((tracker, arm, t.elapsed()))
}

/// Why dirty tracking could not start for a copy.
#[derive(Debug, thiserror::Error)]
pub enum StartCopyError {
    #[error("pausing the vCPUs to turn dirty tracking on: {0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
}

#[derive(Debug, thiserror::Error)]
pub enum EpochError {
    #[error("usage: {0} EPOCHS INTERVAL_MS (EPOCHS 1..=100000, INTERVAL_MS 1..=60000)")]
    Usage(&'static str),
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Shadow(#[from] ShadowError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error(transparent)]
    State(#[from] crate::snapshot::StateError),
}

/// What each epoch does at its pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Check(Sources),
    Stage,
}

/// Parsed arguments of an `epochs` or `selfcheck` request.
pub struct Request {
    pub epochs: u32,
    pub interval: Duration,
    pub mode: Mode,
}

impl Request {
    /// `args` of `selfcheck` (`check` true) or `epochs`.
    pub fn parse(args: &[&str], check: bool) -> Result<Request, EpochError> {
        let usage = EpochError::Usage(if check {
            "selfcheck [guest-only]"
        } else {
            "epochs"
        });
        let (epochs, interval, mode) = match (args, check) {
            ([e, i], true) => (e, i, Mode::Check(Sources::GuestAndVmm)),
            ([e, i, "guest-only"], true) => (e, i, Mode::Check(Sources::GuestOnly)),
            ([e, i], false) => (e, i, Mode::Stage),
            _ => return Err(usage),
        };
        let (Ok(epochs), Ok(ms)) = (epochs.parse::<u32>(), interval.parse::<u64>()) else {
            return Err(usage);
        };
        if !(1..=100_000).contains(&epochs) || !(1..=60_000).contains(&ms) {
            return Err(usage);
        }
        Ok(Request {
            epochs,
            interval: Duration::from_millis(ms),
            mode,
        })
    }
}

/// Where `ctl epochs` copies an epoch's pages; the self-check copies none, its verifier
/// keeps its own copy.
enum Work {
    Stage(Staged),
    Check(CountOnly),
}

/// Copies nothing; counts the pages of the epoch's sets (a page in both counts twice).
#[derive(Default)]
struct CountOnly(u64);

impl Pages for CountOnly {
    fn ahead(&mut self, set: &DirtySet, _: &GuestMemory) -> Result<(), CycleError> {
        self.0 += set.pages();
        Ok(())
    }

    fn at_pause(&mut self, set: &DirtySet, _: &GuestMemory, _: bool) -> Result<u64, CycleError> {
        Ok(std::mem::take(&mut self.0) + set.pages())
    }
}

/// Epochs in progress: the device loop calls `epoch` when `interval` has gone by since the
/// previous pause ended.
pub struct EpochRun {
    pub interval: Duration,
    epochs: u32,
    done: u32,
    tracker: DirtyTracker,
    work: Work,
    /// The self-check's, attached to the cycle.
    verifier: Option<Verifier>,
    sources: Sources,
    pub reply_to: UnixStream,
    started: Instant,
    steps: Vec<Steps>,
    memcpy_gbps: f64,
}

/// The host's memory copy bandwidth, GB/s: 64 MiB copied a few times, best kept.
fn memcpy_bandwidth() -> f64 {
    let src = vec![0x5au8; 64 << 20];
    let mut dst = vec![0u8; 64 << 20];
    let mut best = f64::MAX;
    for _ in 0..4 {
        let t = Instant::now();
        dst.copy_from_slice(&src);
        std::hint::black_box(&mut dst);
        best = best.min(t.elapsed().as_secs_f64());
    }
    (64 << 20) as f64 / best / 1e9
}

impl EpochRun {
    /// Pauses the guest, starts dirty tracking (and takes the shadow copy), resumes.
    pub fn start(vm: &Vm, req: Request, reply_to: UnixStream) -> Result<EpochRun, EpochError> {
        let memcpy_gbps = memcpy_bandwidth();
        vm.vcpus.pause(PAUSE_LIMIT)?;
        let sources = match req.mode {
            Mode::Check(s) => s,
            Mode::Stage => Sources::GuestAndVmm,
        };
        let started = (|| {
            let tracker = DirtyTracker::start(&vm.vm_fd, &vm.mem, sources, log_mode())?;
            let (work, verifier) = match req.mode {
                Mode::Check(_) => (
                    Work::Check(CountOnly::default()),
                    Some(Verifier::new(&vm.mem)?),
                ),
                Mode::Stage => (Work::Stage(Staged::default()), None),
            };
            Ok::<_, EpochError>((tracker, work, verifier))
        })();
        vm.vcpus.resume();
        let (tracker, work, verifier) = started?;
        Ok(EpochRun {
            interval: req.interval,
            epochs: req.epochs,
            done: 0,
            tracker,
            work,
            verifier,
            sources,
            reply_to,
            started: Instant::now(),
            steps: Vec::new(),
            memcpy_gbps,
        })
    }

    /// Ends one epoch through the cycle a replicating primary runs (copying ahead on every
    /// other one). Returns whether all epochs are done.
    pub fn epoch(&mut self, vm: &Vm) -> Result<bool, EpochError> {
        let (pages, capture): (&mut dyn Pages, bool) = match &mut self.work {
            Work::Stage(staged) => (staged, true),
            Work::Check(count) => (count, false),
        };
        let cycle = Cycle {
            ahead: if self.done % 2 == 1 {
                Ahead::Once
            } else {
                Ahead::None
            },
            capture,
            resume: true,
            paused: false,
        };
        let ended = cycle.run(vm, &mut self.tracker, pages, self.verifier.as_mut())?;
        // Encoded after the pause, as a primary does.
        if let Some(state) = ended.state {
            std::hint::black_box(state.encode().map_err(crate::snapshot::StateError::from)?);
        }
        self.steps.push(ended.steps);
        self.done += 1;
        Ok(self.done >= self.epochs)
    }

    /// Stops tracking and gives the report.
    pub fn finish(self, vm: &Vm) -> Value {
        let tracker = self.tracker;
        let dirty_log = if tracker.manual() { "manual" } else { "legacy" };
        let stopped = vm
            .vcpus
            .paused_for(false, PAUSE_LIMIT, || tracker.stop(&vm.vm_fd, &vm.mem))
            .map_err(EpochError::from)
            .and_then(|r| r.map_err(EpochError::from));
        let dist_of = |f: fn(&Steps) -> u64, keep: &dyn Fn(&Steps) -> bool| {
            let mut v: Vec<u64> = self.steps.iter().filter(|s| keep(s)).map(f).collect();
            v.sort_unstable();
            let at = |q: f64| {
                v.get(((v.len() as f64 - 1.0) * q).round() as usize)
                    .copied()
                    .unwrap_or(0)
            };
            json!({"median": at(0.5), "p99": at(0.99), "max": at(1.0)})
        };
        let dist = |f: fn(&Steps) -> u64| dist_of(f, &|_| true);
        let total_pages: u64 = self.steps.iter().map(|s| s.pages).sum();
        let mut report = json!({
            "epochs": self.done,
            "seconds": self.started.elapsed().as_secs_f64(),
            "dirty_pages": total_pages,
            "dirty_pages_per_epoch": dist(|s| s.pages),
            "max_dirty_pages_per_epoch": self.steps.iter().map(|s| s.pages).max().unwrap_or(0),
            "pause_us": dist(|s| s.pause),
            "vcpu_stop_us": dist(|s| s.stop),
            "dirty_log_us": dist(|s| s.dirty),
            "copy_us": dist(|s| s.copy),
            "state_us": dist(|s| s.state),
            "resume_us": dist(|s| s.resume),
            "memcpy_gbps": self.memcpy_gbps,
            "dirty_log": dirty_log,
            "error": stopped.err().map(|e| e.to_string()),
        });
        match (self.work, self.verifier) {
            (Work::Check(_), Some(v)) => {
                report["mode"] = json!("selfcheck");
                report["sources"] = json!(match self.sources {
                    Sources::GuestAndVmm => "guest+vmm",
                    Sources::GuestOnly => "guest-only",
                });
                report["mismatching_pages"] = json!(v.mismatches);
                report["examples"] = json!(v.examples);
            }
            (Work::Check(_), None) => report["mode"] = json!("selfcheck"),
            (Work::Stage(staged), _) => {
                report["mode"] = json!("stage");
                report["staging_capacity_bytes"] = json!(staged.capacity());
            }
        }
        // The two ways to copy, epoch for epoch in the same run.
        for (name, ahead) in [("all_in_pause", false), ("copy_ahead", true)] {
            let keep = move |s: &Steps| s.copy_ahead == ahead;
            report[name] = json!({
                "epochs": self.steps.iter().filter(|s| keep(s)).count(),
                "pause_us": dist_of(|s| s.pause, &keep),
                "dirty_pages_per_epoch": dist_of(|s| s.pages, &keep),
                "pause_pages": dist_of(|s| s.pause_pages, &keep),
                "vcpu_stop_us": dist_of(|s| s.stop, &keep),
                "dirty_log_us": dist_of(|s| s.dirty, &keep),
                "copy_us": dist_of(|s| s.copy, &keep),
                "state_us": dist_of(|s| s.state, &keep),
                "resume_us": dist_of(|s| s.resume, &keep),
                "ahead_us": dist_of(|s| s.ahead, &keep),
            });
        }
        report
    }
}
