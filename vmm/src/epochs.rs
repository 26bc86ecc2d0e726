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

use mcvmm_checkpoint::dirty::{DirtyError, DirtyTracker, LogArm, LogMode, Sources};
use mcvmm_checkpoint::shadow::{Shadow, ShadowError};
use mcvmm_checkpoint::staging::Staged;
use serde_json::{json, Value};

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

/// Mismatching pages named in the report (the count is always complete).
const EXAMPLES: usize = 16;

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
    State(#[from] crate::snapshot::StateError),
}

/// What each epoch does at its pause.
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

enum Work {
    Check {
        sources: Sources,
        shadow: Shadow,
        mismatches: u64,
        examples: Vec<String>,
    },
    Stage {
        staged: Staged,
    },
}

/// Durations of one pause's steps, in microseconds.
#[derive(Default, Clone, Copy)]
struct Steps {
    stop: u64,
    dirty: u64,
    copy: u64,
    state: u64,
    resume: u64,
    pause: u64,
    /// The epoch's dirty pages (copied ahead or in the pause).
    pages: u64,
    /// Pages copied in the pause.
    pause_pages: u64,
    /// The copy ahead, dirty log included, with the guest running.
    ahead: u64,
    copy_ahead: bool,
}

/// Epochs in progress: the device loop calls `epoch` when `interval` has gone by since the
/// previous pause ended.
pub struct EpochRun {
    pub interval: Duration,
    epochs: u32,
    done: u32,
    tracker: DirtyTracker,
    work: Work,
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
        let started = (|| {
            let sources = match req.mode {
                Mode::Check(s) => s,
                Mode::Stage => Sources::GuestAndVmm,
            };
            let tracker = DirtyTracker::start(&vm.vm_fd, &vm.mem, sources, log_mode())?;
            let work = match req.mode {
                Mode::Check(sources) => Work::Check {
                    sources,
                    shadow: Shadow::new(&vm.mem)?,
                    mismatches: 0,
                    examples: Vec::new(),
                },
                Mode::Stage => Work::Stage {
                    staged: Staged::default(),
                },
            };
            Ok::<_, EpochError>((tracker, work))
        })();
        vm.vcpus.resume();
        let (tracker, work) = started?;
        Ok(EpochRun {
            interval: req.interval,
            epochs: req.epochs,
            done: 0,
            tracker,
            work,
            reply_to,
            started: Instant::now(),
            steps: Vec::new(),
            memcpy_gbps,
        })
    }

    /// Ends one epoch (copy ahead on every other one, pause, dirty set, the mode's work,
    /// resume). Returns whether all epochs are done.
    pub fn epoch(&mut self, vm: &Vm) -> Result<bool, EpochError> {
        let mut s = Steps {
            copy_ahead: self.done % 2 == 1,
            ..Steps::default()
        };
        if s.copy_ahead {
            let t = Instant::now();
            let set = self.tracker.end_epoch(&vm.vm_fd, &vm.mem)?;
            match &mut self.work {
                Work::Stage { staged } => staged.stage(&set, &vm.mem)?,
                Work::Check { shadow, .. } => shadow.apply(&set, &vm.mem)?,
            }
            s.pages = set.pages();
            s.ahead = t.elapsed().as_micros() as u64;
        }
        let t0 = Instant::now();
        // Staging captures the vCPUs as they stop, as a replicating primary does.
        if matches!(self.work, Work::Stage { .. }) {
            vm.vcpus.pause_capturing(PAUSE_LIMIT)?;
        } else {
            vm.vcpus.pause(PAUSE_LIMIT)?;
        }
        s.stop = t0.elapsed().as_micros() as u64;
        let result = self.at_pause(vm, &mut s);
        let t = Instant::now();
        vm.vcpus.resume();
        s.resume = t.elapsed().as_micros() as u64;
        s.pause = t0.elapsed().as_micros() as u64;
        result?;
        self.steps.push(s);
        self.done += 1;
        Ok(self.done >= self.epochs)
    }

    fn at_pause(&mut self, vm: &Vm, s: &mut Steps) -> Result<(), EpochError> {
        let t = Instant::now();
        let set = self.tracker.end_epoch(&vm.vm_fd, &vm.mem)?;
        s.dirty = t.elapsed().as_micros() as u64;
        s.pause_pages = set.pages();
        let t = Instant::now();
        match &mut self.work {
            Work::Stage { staged } => {
                if s.copy_ahead {
                    staged.restage(&set, &vm.mem)?;
                } else {
                    staged.stage(&set, &vm.mem)?;
                }
                s.pages = staged.addrs.len() as u64;
                s.copy = t.elapsed().as_micros() as u64;
                let t = Instant::now();
                let state = crate::snapshot::machine_state(vm)?;
                std::hint::black_box(&state);
                s.state = t.elapsed().as_micros() as u64;
            }
            Work::Check {
                shadow,
                mismatches,
                examples,
                ..
            } => {
                // Pages in both sets count once; only the count is off, not the check.
                s.pages += s.pause_pages;
                shadow.apply(&set, &vm.mem)?;
                let bad = shadow.mismatches(&vm.mem)?;
                *mismatches += bad.len() as u64;
                let how = if s.copy_ahead { " (copied ahead)" } else { "" };
                for at in &bad {
                    if examples.len() < EXAMPLES {
                        examples.push(format!("epoch {}{how}: {:#x}", self.done + 1, at.0));
                    }
                }
                // Report each miss once: bring the shadow level again.
                shadow.refresh(&bad, &vm.mem)?;
                s.copy = t.elapsed().as_micros() as u64;
            }
        }
        Ok(())
    }

    /// Stops tracking and gives the report.
    pub fn finish(self, vm: &Vm) -> Value {
        let tracker = self.tracker;
        let dirty_log = if tracker.manual() { "manual" } else { "legacy" };
        let stopped = vm
            .vcpus
            .paused_for(false, PAUSE_LIMIT, || tracker.stop(&vm.vm_fd, &vm.mem))
            .map_err(|e| e.to_string())
            .and_then(|r| r.map_err(|e| e.to_string()));
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
            "error": stopped.err(),
        });
        match self.work {
            Work::Check {
                sources,
                mismatches,
                examples,
                ..
            } => {
                report["mode"] = json!("selfcheck");
                report["sources"] = json!(match sources {
                    Sources::GuestAndVmm => "guest+vmm",
                    Sources::GuestOnly => "guest-only",
                });
                report["mismatching_pages"] = json!(mismatches);
                report["examples"] = json!(examples);
            }
            Work::Stage { staged } => {
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
