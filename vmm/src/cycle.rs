//! One epoch's cycle, the same for every job that copies guest memory under dirty
//! tracking (a replicating primary's checkpoint, `ctl epochs` and `ctl selfcheck`, a
//! snapshot): copy ahead while the guest runs, pause, end the epoch, copy what was
//! written since, capture the machine state, resume. What the pages are copied into is
//! the job's ([`Pages`]); a [`Verifier`] attached to the cycle checks that the dirty sets
//! it hands out miss no page, so the self-check checks the path the job runs.

use std::time::Instant;

use mcvmm_checkpoint::dirty::{DirtyError, DirtySet, DirtyTracker};
use mcvmm_checkpoint::shadow::{Shadow, ShadowError};
use mcvmm_checkpoint::snapshot::{FullSnapshot, SnapshotError};
use mcvmm_checkpoint::staging::Staged;
use mcvmm_checkpoint::state::CapturedState;
use mcvmm_checkpoint::GuestMemory;

use crate::epochs::PAUSE_LIMIT;
use crate::snapshot::StateError;
use crate::vcpu::PauseError;
use crate::vm::Vm;

/// Mismatching pages a verifier names (the count is always complete).
const EXAMPLES: usize = 16;

#[derive(Debug, thiserror::Error)]
pub enum CycleError {
    #[error("pausing the vCPUs: {0}")]
    Pause(#[from] PauseError),
    #[error(transparent)]
    Dirty(#[from] DirtyError),
    #[error(transparent)]
    Copy(#[from] ShadowError),
    #[error(transparent)]
    Snapshot(#[from] SnapshotError),
    #[error(transparent)]
    State(#[from] StateError),
}

/// Where an epoch's pages go.
pub trait Pages {
    /// The epoch's pages as read ahead, with the guest running.
    fn ahead(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), CycleError>;
    /// At the pause: the pages written since the last `ahead` (`after_ahead`), or all of
    /// the epoch's. Returns how many pages the job now holds for the epoch.
    fn at_pause(
        &mut self,
        set: &DirtySet,
        mem: &GuestMemory,
        after_ahead: bool,
    ) -> Result<u64, CycleError>;
}

/// A replicating primary's and `ctl epochs`' staging buffer.
impl Pages for Staged {
    fn ahead(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), CycleError> {
        Ok(self.stage(set, mem)?)
    }

    fn at_pause(
        &mut self,
        set: &DirtySet,
        mem: &GuestMemory,
        after_ahead: bool,
    ) -> Result<u64, CycleError> {
        if after_ahead {
            self.restage(set, mem)?;
        } else {
            self.stage(set, mem)?;
        }
        Ok(self.addrs.len() as u64)
    }
}

/// A full snapshot's memory file, brought up to date page by page.
impl Pages for FullSnapshot {
    fn ahead(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), CycleError> {
        self.patch(set, mem)?;
        Ok(())
    }

    fn at_pause(
        &mut self,
        set: &DirtySet,
        mem: &GuestMemory,
        _after_ahead: bool,
    ) -> Result<u64, CycleError> {
        Ok(self.patch(set, mem)?)
    }
}

/// Keeps the set of the pause (an incremental snapshot writes it with the state).
#[derive(Default)]
pub struct KeepSet(pub Option<DirtySet>);

impl Pages for KeepSet {
    fn ahead(&mut self, _: &DirtySet, _: &GuestMemory) -> Result<(), CycleError> {
        Ok(())
    }

    fn at_pause(&mut self, set: &DirtySet, _: &GuestMemory, _: bool) -> Result<u64, CycleError> {
        self.0 = Some(set.clone());
        Ok(set.pages())
    }
}

/// The self-check's copy of guest memory, kept up to date from the dirty sets alone: at
/// each pause it must equal guest memory, or a page was written that no set reported.
pub struct Verifier {
    shadow: Shadow,
    epochs: u64,
    pub mismatches: u64,
    pub examples: Vec<String>,
}

impl Verifier {
    /// Copies all of guest memory. Call it where an epoch begins, vCPUs paused.
    pub fn new(mem: &GuestMemory) -> Result<Verifier, ShadowError> {
        Ok(Verifier {
            shadow: Shadow::new(mem)?,
            epochs: 0,
            mismatches: 0,
            examples: Vec::new(),
        })
    }

    /// Epochs checked so far.
    pub fn epochs(&self) -> u64 {
        self.epochs
    }

    fn ahead(&mut self, set: &DirtySet, mem: &GuestMemory) -> Result<(), ShadowError> {
        self.shadow.apply(set, mem)
    }

    fn at_pause(
        &mut self,
        set: &DirtySet,
        mem: &GuestMemory,
        after_ahead: bool,
    ) -> Result<(), ShadowError> {
        self.epochs += 1;
        self.shadow.apply(set, mem)?;
        let bad = self.shadow.mismatches(mem)?;
        self.mismatches += bad.len() as u64;
        let how = if after_ahead { " (copied ahead)" } else { "" };
        for at in &bad {
            if self.examples.len() < EXAMPLES {
                self.examples
                    .push(format!("epoch {}{how}: {:#x}", self.epochs, at.0));
            }
        }
        // Each miss is reported once: the shadow is brought level again.
        self.shadow.refresh(&bad, mem)
    }
}

/// How much is copied while the guest runs, before the pause.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ahead {
    /// Nothing: the pause copies the whole epoch.
    None,
    /// One round: the pause copies what was written during it.
    Once,
    /// Rounds while each finds at most three quarters of the pages of the one before and
    /// more than `done_pages`, at most `rounds`.
    Shrinking { rounds: usize, done_pages: u64 },
}

/// Durations of one epoch's steps (µs) and its pages.
#[derive(Debug, Default, Clone, Copy)]
pub struct Steps {
    /// Stopping the vCPUs.
    pub stop: u64,
    /// Ending the epoch in the pause (the dirty log).
    pub dirty: u64,
    /// Copying in the pause.
    pub copy: u64,
    /// Capturing the machine state.
    pub state: u64,
    pub resume: u64,
    /// The whole pause, resume included when the cycle resumes.
    pub pause: u64,
    /// The pages the job holds for the epoch at the end.
    pub pages: u64,
    /// Pages reported at the pause.
    pub pause_pages: u64,
    /// Copying ahead, dirty log included, with the guest running.
    pub ahead: u64,
    pub copy_ahead: bool,
}

/// What one epoch's cycle does.
#[derive(Debug, Clone, Copy)]
pub struct Cycle {
    pub ahead: Ahead,
    /// Capture the machine state (each vCPU as it stops, the rest in the pause).
    pub capture: bool,
    /// Let the vCPUs run again at the end; otherwise the caller does, after work of its
    /// own in the pause. After an error the vCPUs run again either way.
    pub resume: bool,
    /// The vCPUs are paused already (an operator's `ctl pause`) and stay so: the cycle
    /// neither pauses nor resumes them.
    pub paused: bool,
}

/// An epoch that ended.
pub struct Ended {
    pub steps: Steps,
    /// Pages of each round ahead.
    pub rounds: Vec<u64>,
    pub state: Option<CapturedState>,
    /// The sets the epoch was made of, for a job that cannot use them after all to give
    /// back to the tracker ([`DirtyTracker::give_back`]).
    pub sets: Vec<DirtySet>,
}

impl Cycle {
    /// Ends the epoch `tracker` is in. On failure every set taken goes back to the tracker
    /// (the next epoch reports its pages), so no page is lost.
    pub fn run(
        &self,
        vm: &Vm,
        tracker: &mut DirtyTracker,
        pages: &mut dyn Pages,
        verifier: Option<&mut Verifier>,
    ) -> Result<Ended, CycleError> {
        let mut sets = Vec::new();
        let mut steps = Steps::default();
        let mut rounds = Vec::new();
        let result = self.steps(
            vm,
            tracker,
            pages,
            verifier,
            (&mut sets, &mut rounds),
            &mut steps,
        );
        match result {
            Ok(state) => Ok(Ended {
                steps,
                rounds,
                state,
                sets,
            }),
            Err(e) => {
                for set in sets {
                    tracker.give_back(set);
                }
                Err(e)
            }
        }
    }

    fn steps(
        &self,
        vm: &Vm,
        tracker: &mut DirtyTracker,
        pages: &mut dyn Pages,
        mut verifier: Option<&mut Verifier>,
        (sets, rounds_pages): (&mut Vec<DirtySet>, &mut Vec<u64>),
        s: &mut Steps,
    ) -> Result<Option<CapturedState>, CycleError> {
        let t = Instant::now();
        let (rounds, done_pages) = match self.ahead {
            Ahead::None => (0, 0),
            Ahead::Once => (1, 0),
            Ahead::Shrinking { rounds, done_pages } => (rounds, done_pages),
        };
        while rounds_pages.len() < rounds {
            let set = tracker.end_epoch(&vm.vm_fd, &vm.mem)?;
            let n = set.pages();
            sets.push(set);
            let set = &sets[sets.len() - 1];
            pages.ahead(set, &vm.mem)?;
            if let Some(v) = verifier.as_deref_mut() {
                v.ahead(set, &vm.mem)?;
            }
            s.copy_ahead = true;
            let shrinking = rounds_pages.last().is_none_or(|&last| n * 4 < last * 3);
            rounds_pages.push(n);
            if n <= done_pages || !shrinking {
                break;
            }
        }
        s.ahead = t.elapsed().as_micros() as u64;
        let t0 = Instant::now();
        if self.paused {
        } else if self.capture {
            vm.vcpus.pause_capturing(PAUSE_LIMIT)?;
        } else {
            vm.vcpus.pause(PAUSE_LIMIT)?;
        }
        s.stop = t0.elapsed().as_micros() as u64;
        let in_pause = (|| {
            let t = Instant::now();
            let set = tracker.end_epoch(&vm.vm_fd, &vm.mem)?;
            s.dirty = t.elapsed().as_micros() as u64;
            s.pause_pages = set.pages();
            sets.push(set);
            let set = &sets[sets.len() - 1];
            let t = Instant::now();
            s.pages = pages.at_pause(set, &vm.mem, s.copy_ahead)?;
            if let Some(v) = verifier {
                v.at_pause(set, &vm.mem, s.copy_ahead)?;
            }
            s.copy = t.elapsed().as_micros() as u64;
            let t = Instant::now();
            let state = if self.capture {
                Some(crate::snapshot::capture_state(vm)?)
            } else {
                None
            };
            s.state = t.elapsed().as_micros() as u64;
            Ok::<_, CycleError>(state)
        })();
        if !self.paused && (self.resume || in_pause.is_err()) {
            let t = Instant::now();
            vm.vcpus.resume();
            s.resume = t.elapsed().as_micros() as u64;
        }
        s.pause = t0.elapsed().as_micros() as u64;
        in_pause
    }
}
