//! The primary role: keeps the guest protected by a secondary. Once connected (the
//! handshake happens before the VM is built, see `main`), the device loop ends an epoch
//! (through [`EpochClock`]) `--epoch-ms` after the previous pause, or sooner: once the
//! guest has output waiting for the checkpoint (and the epoch ran `--epoch-min-ms`), or
//! as soon as the link is free again for an epoch that had to run on. Ending an epoch:
//!
//! 1. the epoch's cycle (`crate::cycle`): read the dirty set so far (KVM log ∪ the
//!    VMM's own writes) and copy those pages into a buffer of our own, with the guest
//!    still running; pause the vCPUs (the device loop is this thread, so no device runs
//!    either), end the epoch's dirty set, copy the pages written since, capture the
//!    machine state;
//! 2. still paused: take the disk writes forwarded during the epoch, and make the gate
//!    hold frames from now on for the next epoch;
//! 3. resume, and hand the checkpoint to the sender thread.
//!
//! `ctl selfcheck` on a primary attaches the self-check's verifier to that cycle.
//!
//! Anything failing in 1–2 makes the dirty set unreliable: the link is dropped (the guest
//! goes on unprotected, loudly) rather than letting a checkpoint miss a page.

use std::fs::File;
use std::io::Write;
use std::os::unix::net::UnixStream;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::DirtyTracker;
use mcvmm_checkpoint::snapshot::memory_digest;
use mcvmm_checkpoint::staging::Staged;
use mcvmm_replication::disk::file_digest;
use mcvmm_replication::gate::HeldOutput;
use mcvmm_replication::primary::{
    Capture, Forwarded, ForwardedWrites, Link, LinkStats, SyncSource,
};
use serde_json::{json, Value};

use crate::cycle::{Ahead, Cycle, CycleError, Verifier};
use crate::epochs::{start_for_copy, PAUSE_LIMIT};
use crate::phase::Phase;
use crate::protect::Settings;
use crate::vm::Vm;

mod clock;
mod policy;
pub use clock::EpochClock;
use policy::{EpochPolicy, LinkView};

/// Why a primary could not start its sync, take a checkpoint or hand over.
#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("{path}: {source}")]
    Disk {
        path: std::path::PathBuf,
        source: std::io::Error,
    },
    #[error(transparent)]
    Start(#[from] crate::epochs::StartCopyError),
    #[error("dirty tracking is off")]
    NotTracking,
    #[error("the epoch's cycle captured no machine state")]
    NoState,
    #[error("encoding the devices' states: {0}")]
    Encode(#[from] mcvmm_checkpoint::persist::PersistError),
    #[error(transparent)]
    Cycle(#[from] CycleError),
    #[error("the self-check's copy of memory: {0}")]
    Check(#[from] mcvmm_checkpoint::shadow::ShadowError),
    #[error("the link to the secondary is gone")]
    LinkGone,
    #[error("not protected: no secondary to hand over to")]
    NotProtected,
    #[error("the previous checkpoint did not get through")]
    NotDrained,
    #[error("the secondary did not take epoch {0} over; the guest goes on here")]
    NotTakenOver(u64),
}

/// Pause times kept for the percentiles in `status`.
const PAUSES_KEPT: usize = 2000;

pub struct Primary {
    pub link: Arc<Link>,
    pub gate: Arc<HeldOutput>,
    pub writes: Arc<ForwardedWrites>,
    pub epoch_ms: u64,
    /// When the running epoch ends (pure rules, see `policy`).
    policy: EpochPolicy,
    tracker: Option<DirtyTracker>,
    hot_pages: u64,
    /// The epoch now running (its checkpoint is taken at the next pause).
    epoch: u64,
    pauses_us: Vec<u64>,
    pause_total_us: u64,
    pause_count: u64,
    verify_next: Arc<AtomicBool>,
    unprotected_said: bool,
    /// With a fence: the loss of the secondary is settled (this node won the fence).
    pub fence_settled: bool,
    /// `ctl unprotect` ended this protection: it is not started again on its own.
    pub ended_on_purpose: bool,
    started: Instant,
    check: Option<AttachedCheck>,
}

/// `ctl selfcheck` on this primary: its verifier rides on the checkpoints' cycle.
struct AttachedCheck {
    epochs: u64,
    /// Made at the first pause after the request (a copy of all of memory, the vCPUs
    /// paused, where an epoch begins).
    verifier: Option<Verifier>,
    reply_to: UnixStream,
    began: Instant,
}

impl AttachedCheck {
    fn report(self, epoch_ms: u64, error: Option<String>) {
        let (checked, mismatches, examples) = match &self.verifier {
            Some(v) => (v.epochs(), v.mismatches, v.examples.clone()),
            None => (0, 0, Vec::new()),
        };
        let report = json!({
            "mode": "selfcheck",
            "on": "replicating primary",
            "sources": "guest+vmm",
            "epochs": checked,
            "epoch_ms": epoch_ms,
            "seconds": self.began.elapsed().as_secs_f64(),
            "mismatching_pages": mismatches,
            "examples": examples,
            "error": error,
        });
        let mut w = &self.reply_to;
        let _ = writeln!(w, "{report}");
    }
}

impl Primary {
    pub fn new(
        link: Arc<Link>,
        gate: Arc<HeldOutput>,
        writes: Arc<ForwardedWrites>,
        settings: &Settings,
    ) -> Primary {
        Primary {
            link,
            gate,
            writes,
            epoch_ms: settings.epoch_ms,
            policy: EpochPolicy::new(
                settings.epoch_min_ms.map(Duration::from_millis),
                Instant::now(),
            ),
            tracker: None,
            hot_pages: settings.hot_pages,
            epoch: 1,
            pauses_us: Vec::new(),
            pause_total_us: 0,
            pause_count: 0,
            verify_next: Arc::new(AtomicBool::new(false)),
            unprotected_said: false,
            fence_settled: false,
            ended_on_purpose: false,
            check: None,
            started: Instant::now(),
        }
    }

    /// Turns dirty tracking on and starts the initial sync (RAM and disks, guest running).
    /// `theirs`: the secondary's disk chunk digests; `chunk`: their chunk size.
    pub fn start(
        &mut self,
        vm: &Vm,
        theirs: Vec<Vec<u64>>,
        chunk: u64,
    ) -> Result<(), PrimaryError> {
        let disks = vm
            .config
            .disks
            .iter()
            .map(|d| open_disk(&d.path))
            .collect::<Result<Vec<File>, PrimaryError>>()?;
        // Tracking must be on before the copy starts: whatever the guest writes from here
        // on is in the first checkpoint. Started with every page dirty, the sync arms
        // each span just before it reads it, and the guest runs on; the old way
        // write-protects all of RAM with the vCPUs paused, a pause that grows with the
        // guest, worth seeing.
        let (mut tracker, arm, pause) = start_for_copy(vm, false)?;
        tracker.keep_hot(self.hot_pages);
        if arm.is_some() {
            tracing::info!(
                "dirty tracking on, every page dirty until the sync reads it ({:.1} ms with the vCPUs paused)",
                pause.as_secs_f64() * 1e3
            );
        } else {
            tracing::info!(
                "dirty tracking on ({:.1} ms with the vCPUs paused)",
                pause.as_secs_f64() * 1e3
            );
        }
        // This runs on the device loop, so no guest disk write is half done: the ones
        // before are in the disks the sync copies, and from here on each is forwarded.
        self.writes.record(true);
        self.tracker = Some(tracker);
        self.started = Instant::now();
        if !self.link.start_sync(SyncSource {
            mem: vm.mem.clone(),
            disks,
            theirs,
            chunk,
            arm,
        }) {
            return Err(PrimaryError::LinkGone);
        }
        Ok(())
    }

    /// Asks for digests of memory and disks with the next checkpoint.
    pub fn verify_next(&self) -> u64 {
        self.verify_next.store(true, Ordering::SeqCst);
        self.epoch
    }

    /// Ends the running epoch if it can (see [`EpochClock`]); `early` is for an epoch
    /// ended before `epoch_ms` for its output. Returns whether it ended.
    pub fn tick(&mut self, vm: &Vm, early: bool) -> bool {
        if self.link.is_lost() {
            if let Some(c) = self.check.take() {
                c.report(
                    self.epoch_ms,
                    Some("the link to the secondary was lost".into()),
                );
            }
            if let Some(t) = self.tracker.take() {
                let _ = vm
                    .vcpus
                    .paused_for(false, PAUSE_LIMIT, || t.stop(&vm.vm_fd, &vm.mem));
                // Nobody will take them: an unprotected guest's writes are not kept.
                self.writes.record(false);
            }
            if !self.unprotected_said {
                self.unprotected_said = true;
                tracing::warn!(
                    "epochs stopped at {}; the guest is protected again once its secondary answers (or `mcvmm ctl protect HOST:PORT` with another)",
                    self.epoch
                );
            }
            return false;
        }
        // The sync or the previous checkpoint still on its way: the epoch runs on.
        if !self.policy.may_end(&self.link_view()) {
            return false;
        }
        match self.checkpoint(vm, false) {
            Ok(_) => {
                self.policy.ended(Instant::now(), early);
                true
            }
            Err(why) => {
                self.policy.failed(Instant::now());
                self.link
                    .lose(&format!("checkpoint of epoch {}: {why}", self.epoch));
                false
            }
        }
    }

    fn link_view(&self) -> LinkView {
        LinkView {
            lost: self.link.is_lost(),
            synced: self.link.is_synced(),
            busy: self.link.busy(),
            acked: self.link.acked(),
            output_waiting: self.gate.holds_running_epoch(),
        }
    }

    /// How soon the running epoch should end, if sooner than `epoch_ms` after the last
    /// pause (see [`EpochPolicy::end_soon`]).
    pub fn end_soon(&self) -> Option<Duration> {
        self.tracker.as_ref()?;
        self.policy
            .end_soon(self.epoch, Instant::now(), || self.link_view())
    }

    /// Ends the running epoch and hands its checkpoint to the sender; `keep_paused` leaves
    /// the vCPUs stopped afterwards (a planned switch).
    pub fn checkpoint(&mut self, vm: &Vm, keep_paused: bool) -> Result<u64, PrimaryError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Err(PrimaryError::NotTracking);
        };
        let epoch = self.epoch;
        let (addrs, data) = self.link.spare_buffers();
        let mut staged = Staged { addrs, data };
        // Most of the epoch's pages are copied ahead, with the guest running; the pause
        // copies those written since.
        let cycle = Cycle {
            ahead: Ahead::Once,
            capture: true,
            resume: false,
            paused: false,
        };
        let verifier = self.check.as_mut().and_then(|c| c.verifier.as_mut());
        let ended = match cycle.run(vm, tracker, &mut staged, verifier) {
            Ok(ended) => ended,
            Err(e) => {
                // The cycle gave its sets back and let the vCPUs run again.
                return Err(self.failed(e.into()));
            }
        };
        let t = Instant::now();
        let rest = self.in_pause(vm, epoch);
        if !keep_paused || rest.is_err() {
            vm.vcpus.resume();
        }
        let pause = ended.steps.pause + t.elapsed().as_micros() as u64;
        // The devices' states are encoded with the guest running again.
        let encoded = ended
            .state
            .ok_or(PrimaryError::NoState)
            .and_then(|s| s.encode().map_err(PrimaryError::from));
        let ((digests, writes), state) = match rest.and_then(|r| Ok((r, encoded?))) {
            Ok(r) => r,
            Err(e) => {
                if let Some(tracker) = self.tracker.as_mut() {
                    for set in ended.sets {
                        tracker.give_back(set);
                    }
                }
                return Err(self.failed(e));
            }
        };
        self.record_pause(pause);
        self.epoch += 1;
        let (memory_digest, disk_digests) = match digests {
            Some((m, d)) => (Some(m), Some(d)),
            None => (None, None),
        };
        let capture = Capture {
            epoch,
            addrs: staged.addrs,
            data: staged.data,
            state,
            writes,
            memory_digest,
            disk_digests,
            taken: Instant::now(),
        };
        self.end_check_if_done();
        if !self.link.submit(capture) {
            return Err(PrimaryError::LinkGone);
        }
        Ok(epoch)
    }

    /// What else belongs to this epoch's checkpoint, taken while the guest is still
    /// paused: the digests asked for, a self-check's verifier, and last (as nothing after
    /// them may fail) the disk writes forwarded during the epoch; frames sent from now
    /// on are the next epoch's.
    fn in_pause(
        &mut self,
        vm: &Vm,
        epoch: u64,
    ) -> Result<(Option<Digests>, Vec<Forwarded>), PrimaryError> {
        let digests = if self.verify_next.swap(false, Ordering::SeqCst) {
            Some(digests(vm)?)
        } else {
            None
        };
        if let Some(c) = self.check.as_mut().filter(|c| c.verifier.is_none()) {
            c.verifier = Some(Verifier::new(&vm.mem)?);
        }
        let writes = self.writes.take();
        self.gate.hold_from(epoch + 1);
        Ok((digests, writes))
    }

    /// Reports an attached self-check once it has verified the epochs it was asked for.
    fn end_check_if_done(&mut self) {
        let checked = self
            .check
            .as_ref()
            .is_some_and(|c| c.verifier.as_ref().is_some_and(|v| v.epochs() >= c.epochs));
        if checked {
            if let Some(c) = self.check.take() {
                c.report(self.epoch_ms, None);
            }
        }
    }

    /// Ends an attached self-check with `e`, which it returns.
    fn failed(&mut self, e: PrimaryError) -> PrimaryError {
        if let Some(c) = self.check.take() {
            c.report(self.epoch_ms, Some(e.to_string()));
        }
        e
    }

    /// Runs the self-check on the next `epochs` checkpoints; the report goes to
    /// `reply_to` when they are done (or the link is lost).
    pub fn attach_check(&mut self, epochs: u32, reply_to: UnixStream) -> Result<(), &'static str> {
        if self.check.is_some() {
            return Err("a self-check is running on this primary already");
        }
        if self.tracker.is_none() {
            return Err("not protected: no checkpoints to check");
        }
        self.check = Some(AttachedCheck {
            epochs: u64::from(epochs),
            verifier: None,
            reply_to,
            began: Instant::now(),
        });
        Ok(())
    }

    fn record_pause(&mut self, us: u64) {
        if self.pauses_us.len() == PAUSES_KEPT {
            self.pauses_us.remove(0);
        }
        self.pauses_us.push(us);
        self.pause_total_us += us;
        self.pause_count += 1;
    }

    /// Waits (bounded) for the sender to have written every checkpoint handed to it.
    pub fn drain(&self, limit: Duration) -> bool {
        let t = Instant::now();
        while self.link.busy() && !self.link.is_lost() {
            if t.elapsed() > limit {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        !self.link.is_lost()
    }

    /// A planned switch: the guest stops here, its last checkpoint is committed on the
    /// secondary, which is told to take over. Returns the epoch it continues from; on
    /// failure the guest goes on here.
    pub fn hand_over(&mut self, vm: &Vm) -> Result<u64, PrimaryError> {
        if self.link.is_lost() || !self.link.is_synced() {
            return Err(PrimaryError::NotProtected);
        }
        if !self.drain(Duration::from_secs(10)) {
            return Err(PrimaryError::NotDrained);
        }
        let epoch = match self.checkpoint(vm, true) {
            Ok(n) => n,
            Err(e) => {
                self.policy.failed(Instant::now());
                vm.vcpus.resume();
                return Err(e);
            }
        };
        self.policy.ended(Instant::now(), false);
        let t = Instant::now();
        if self.link.takeover(epoch) {
            // The secondary closes the link as soon as it has the takeover: a closed link
            // after the takeover went out is the switch succeeding, so that is looked at
            // first (a loop that stopped at the closed link resumed this guest while the
            // secondary was starting it: the same guest running twice).
            while t.elapsed() < Duration::from_secs(15) {
                if self.link.handed_over() {
                    return Ok(epoch);
                }
                if self.link.is_lost() {
                    // The sender marks the handover just after its write: look once more.
                    std::thread::sleep(Duration::from_millis(50));
                    if self.link.handed_over() {
                        return Ok(epoch);
                    }
                    break;
                }
                std::thread::sleep(Duration::from_millis(2));
            }
        }
        vm.vcpus.resume();
        Err(PrimaryError::NotTakenOver(epoch))
    }

    /// Whether this primary lost its secondary (or said goodbye to it) and must win the
    /// fence before its held output goes (or the guest goes on).
    pub fn needs_claim(&self) -> bool {
        self.link.is_fenced()
            && self.link.is_lost()
            && !self.link.handed_over()
            && !self.fence_settled
    }

    /// Where this primary is in its guest's protection.
    pub fn phase(&self) -> Phase {
        phase_of(&self.link.snapshot(), self.needs_claim())
    }

    /// The `status` fields of the primary role.
    pub fn status(&self) -> Value {
        let link = self.link.snapshot();
        let mut sorted = self.pauses_us.clone();
        sorted.sort_unstable();
        let pct = |p: f64| -> u64 {
            if sorted.is_empty() {
                0
            } else {
                sorted[((sorted.len() - 1) as f64 * p).round() as usize]
            }
        };
        let phase = phase_of(&link, self.needs_claim());
        let protected = phase.guest_protected();
        json!({
            "role": phase.role(),
            "protected": protected,
            "phase": phase.name(),
            "peer": link.peer,
            "epoch": self.epoch,
            "epoch_ms": self.epoch_ms,
            "epoch_min_ms": self
                .policy
                .epoch_min()
                .map_or(self.epoch_ms, |d| d.as_millis() as u64),
            "early_epochs": self.policy.early_epochs,
            "last_sent_epoch": link.sent_epoch,
            "last_acked_epoch": link.acked_epoch,
            "last_committed_epoch": link.acked_epoch,
            "stretched_epochs": self.policy.stretched,
            "pause_us": {
                "last": self.pauses_us.last().copied().unwrap_or(0),
                "avg": self.pause_total_us.checked_div(self.pause_count).unwrap_or(0),
                "p50": pct(0.5),
                "p99": pct(0.99),
                "max": sorted.last().copied().unwrap_or(0),
                "count": self.pause_count,
                "histogram_ms": pause_histogram(&sorted),
            },
            "bytes_per_epoch": {
                "last_wire": link.last_epoch_wire_bytes,
                "last_pages": link.last_epoch_page_bytes,
                "avg_wire": link.total_epoch_wire_bytes.checked_div(link.sent_epoch).unwrap_or(0),
                "avg_pages": link.total_epoch_page_bytes.checked_div(link.sent_epoch).unwrap_or(0),
                "total_wire": link.total_epoch_wire_bytes,
                "total_pages": link.total_epoch_page_bytes,
            },
            "last_ack_latency_us": link.last_ack_latency_us,
            "hot_pages": {
                "limit": self.hot_pages,
                "last": self.tracker.as_ref().map_or(0, DirtyTracker::hot_pages),
                "unchanged_not_sent": link.unchanged_pages,
            },
            "output": self.gate.stats(),
            "sync": {
                "done": link.synced,
                "percent": link.sync_percent,
                "sent_bytes": link.sync_sent_bytes,
                "total_bytes": link.sync_total_bytes,
                "skipped_bytes": link.sync_skipped_bytes,
                "rate_mib_s": link.sync_rate_mib_s,
                "eta_s": link.sync_eta_s,
                "ms": link.sync_ms,
            },
            "bytes_sent": link.bytes_sent,
            "lost": link.lost,
            "protected_for_ms": if protected { self.started.elapsed().as_millis() as u64 } else { 0 },
        })
    }
}

/// Upper bounds (ms) of the pause histogram's buckets; the last bucket is open.
const PAUSE_BUCKETS_MS: [u64; 8] = [1, 2, 5, 10, 20, 50, 100, 200];

/// How many of the kept pauses fall in each bucket, as `{"<=1": n, ..., ">200": n}`.
fn pause_histogram(sorted_us: &[u64]) -> Value {
    let mut counts = [0u64; PAUSE_BUCKETS_MS.len() + 1];
    for us in sorted_us {
        let b = PAUSE_BUCKETS_MS
            .iter()
            .position(|ms| *us <= ms * 1000)
            .unwrap_or(PAUSE_BUCKETS_MS.len());
        counts[b] += 1;
    }
    let mut m = serde_json::Map::new();
    for (ms, n) in PAUSE_BUCKETS_MS.iter().zip(counts) {
        m.insert(format!("<={ms}"), json!(n));
    }
    m.insert(
        format!(">{}", PAUSE_BUCKETS_MS[PAUSE_BUCKETS_MS.len() - 1]),
        json!(counts[PAUSE_BUCKETS_MS.len()]),
    );
    Value::Object(m)
}

/// The digest of all guest memory, and each disk's chunk digests.
type Digests = (u64, Vec<u64>);

/// Digests of all of memory and of each disk (vCPUs paused), for `ctl verify`.
fn digests(vm: &Vm) -> Result<Digests, PrimaryError> {
    let mut disks = Vec::new();
    for d in &vm.config.disks {
        let disk_err = |source| PrimaryError::Disk {
            path: d.path.clone(),
            source,
        };
        let f = open_disk(&d.path)?;
        let size = f.metadata().map_err(disk_err)?.len();
        disks.push(file_digest(&f, size).map_err(disk_err)?);
    }
    Ok((memory_digest(&vm.mem), disks))
}

fn open_disk(path: &std::path::Path) -> Result<File, PrimaryError> {
    File::open(path).map_err(|source| PrimaryError::Disk {
        path: path.to_path_buf(),
        source,
    })
}

/// Where a primary whose link reads `link` is in its guest's protection; `claiming`:
/// the link is lost and the fence not yet won.
fn phase_of(link: &LinkStats, claiming: bool) -> Phase {
    if claiming {
        Phase::Fencing
    } else if link.lost.is_some() {
        Phase::Unprotected
    } else if !link.synced {
        Phase::Syncing
    } else if link.acked_epoch == 0 {
        Phase::FirstCheckpoint
    } else {
        Phase::Protected
    }
}
