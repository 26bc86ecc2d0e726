//! The primary role: keeps the guest protected by a secondary. Once connected (the
//! handshake happens before the VM is built, see `main`), the device loop ends an epoch
//! (through [`EpochClock`]) `--epoch-ms` after the previous pause, or sooner: once the
//! guest has output waiting for the checkpoint (and the epoch ran `--epoch-min-ms`), or
//! as soon as the link is free again for an epoch that had to run on. Ending an epoch:
//!
//! 1. read the dirty set so far (KVM log ∪ the VMM's own writes) and copy those pages
//!    into a buffer of our own, with the guest still running;
//! 2. pause the vCPUs (the device loop is this thread, so no device runs either), end
//!    the epoch's dirty set and copy the pages written since step 1;
//! 3. capture the machine state, take the disk writes forwarded during the epoch, and
//!    make the gate hold frames from now on for the next epoch;
//! 4. resume, and hand the checkpoint to the sender thread.
//!
//! Anything failing in 1–3 makes the dirty set unreliable: the link is dropped (the guest
//! goes on unprotected, loudly) rather than letting a checkpoint miss a page.

use std::fs::File;
use std::os::fd::{AsRawFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::DirtyTracker;
use mcvmm_checkpoint::snapshot::memory_digest;
use mcvmm_checkpoint::staging::Staged;
use mcvmm_replication::disk::file_digest;
use mcvmm_replication::gate::HeldOutput;
use mcvmm_replication::primary::{Capture, ForwardedWrites, Link, SyncSource};
use serde_json::{json, Value};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};
use vmm_sys_util::timerfd::TimerFd;

use crate::epochs::{start_for_copy, PAUSE_LIMIT};
use crate::protect::Settings;
use crate::snapshot::machine_state;
use crate::vm::Vm;

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
    #[error(transparent)]
    Dirty(#[from] mcvmm_checkpoint::dirty::DirtyError),
    #[error(transparent)]
    Staging(#[from] mcvmm_checkpoint::shadow::ShadowError),
    #[error(transparent)]
    Pause(#[from] crate::vcpu::PauseError),
    #[error(transparent)]
    State(#[from] crate::snapshot::StateError),
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
    /// An epoch with output waiting ends once it is this old (`--epoch-min-ms`, if set).
    epoch_min: Option<Duration>,
    /// When the running epoch began (the end of the previous pause).
    epoch_began: Instant,
    /// The running epoch found the link busy when it was due: it ends as soon as the
    /// link is free.
    overdue: bool,
    /// Epochs ended before `epoch_ms` for the guest's output.
    early_epochs: u64,
    tracker: Option<DirtyTracker>,
    hot_pages: u64,
    /// The epoch now running (its checkpoint is taken at the next pause).
    epoch: u64,
    stretched: u64,
    pauses_us: Vec<u64>,
    pause_total_us: u64,
    pause_count: u64,
    verify_next: Arc<AtomicBool>,
    unprotected_said: bool,
    started: Instant,
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
            epoch_min: settings.epoch_min_ms.map(Duration::from_millis),
            epoch_began: Instant::now(),
            overdue: false,
            early_epochs: 0,
            tracker: None,
            hot_pages: settings.hot_pages,
            epoch: 1,
            stretched: 0,
            pauses_us: Vec::new(),
            pause_total_us: 0,
            pause_count: 0,
            verify_next: Arc::new(AtomicBool::new(false)),
            unprotected_said: false,
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
                    "epochs stopped at {}; `mcvmm ctl protect HOST:PORT` protects this guest again with a new secondary",
                    self.epoch
                );
            }
            return false;
        }
        if !self.link.is_synced() || self.link.busy() {
            // The sync or the previous checkpoint is still on its way: the epoch runs on.
            if self.link.is_synced() && !self.overdue {
                self.stretched += 1;
                self.overdue = true;
            }
            return false;
        }
        let for_output = early && !self.overdue;
        match self.checkpoint(vm, false) {
            Ok(_) => {
                if for_output {
                    self.early_epochs += 1;
                }
                true
            }
            Err(why) => {
                self.link
                    .lose(&format!("checkpoint of epoch {}: {why}", self.epoch));
                false
            }
        }
    }

    /// How soon the running epoch should end, if sooner than `epoch_ms` after the last
    /// pause: at once when it ran on for a busy link that is free now; when the guest has
    /// output waiting for it and every earlier checkpoint is acknowledged, once it is
    /// `--epoch-min-ms` old. `None` when the link is busy (its going idle wakes the
    /// device loop), an ack is awaited (its arrival does), or nothing hurries.
    ///
    /// Waiting for the acks bounds the pauses of a guest that sends all the time to one
    /// per round trip to the secondary (its output could not leave sooner anyway); a
    /// request/response client finds the previous checkpoint acknowledged, since that is
    /// what released the previous answer.
    pub fn end_soon(&self) -> Option<Duration> {
        // Called after every round of the device loop's events: the common case (fixed
        // epochs, nothing overdue) returns before any lock.
        if !self.overdue && self.epoch_min.is_none() {
            return None;
        }
        if self.tracker.is_none()
            || self.link.is_lost()
            || !self.link.is_synced()
            || self.link.busy()
        {
            return None;
        }
        if self.overdue {
            return Some(Duration::ZERO);
        }
        let min = self.epoch_min?;
        (self.gate.holds_running_epoch() && self.link.acked() + 1 >= self.epoch)
            .then(|| min.saturating_sub(self.epoch_began.elapsed()))
    }

    /// Ends the running epoch and hands its checkpoint to the sender; `keep_paused` leaves
    /// the vCPUs stopped afterwards (a planned switch).
    pub fn checkpoint(&mut self, vm: &Vm, keep_paused: bool) -> Result<u64, PrimaryError> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Err(PrimaryError::NotTracking);
        };
        let epoch = self.epoch;
        // Most of the epoch's pages are copied ahead, with the guest running; the pause
        // copies those written since.
        let (addrs, data) = self.link.spare_buffers();
        let mut staged = Staged { addrs, data };
        let ahead = tracker.end_epoch(&vm.vm_fd, &vm.mem)?;
        // A set taken from the tracker and not sent must come back to it, or the next
        // checkpoint would miss its pages.
        if let Err(e) = staged.stage(&ahead, &vm.mem) {
            tracker.give_back(ahead);
            return Err(e.into());
        }
        let t0 = Instant::now();
        if let Err(e) = vm.vcpus.pause_capturing(PAUSE_LIMIT) {
            tracker.give_back(ahead);
            return Err(e.into());
        }
        let mut dirty = None;
        let captured = (|| {
            let dirty = dirty.insert(tracker.end_epoch(&vm.vm_fd, &vm.mem)?);
            staged.restage(dirty, &vm.mem)?;
            let state = machine_state(vm)?;
            let writes = self.writes.take();
            let (memory_digest, disk_digests) = if self.verify_next.swap(false, Ordering::SeqCst) {
                let mut digests = Vec::new();
                for d in &vm.config.disks {
                    let disk_err = |source| PrimaryError::Disk {
                        path: d.path.clone(),
                        source,
                    };
                    let f = open_disk(&d.path)?;
                    let size = f.metadata().map_err(disk_err)?.len();
                    digests.push(file_digest(&f, size).map_err(disk_err)?);
                }
                (Some(memory_digest(&vm.mem)), Some(digests))
            } else {
                (None, None)
            };
            // Frames sent from now on are the next epoch's.
            self.gate.hold_from(epoch + 1);
            Ok::<_, PrimaryError>(Capture {
                epoch,
                addrs: staged.addrs,
                data: staged.data,
                state,
                writes,
                memory_digest,
                disk_digests,
                taken: Instant::now(),
            })
        })();
        if !keep_paused {
            vm.vcpus.resume();
        }
        self.epoch_began = Instant::now();
        self.overdue = false;
        let pause = t0.elapsed().as_micros() as u64;
        let capture = match captured {
            Ok(c) => c,
            Err(e) => {
                tracker.give_back(ahead);
                if let Some(d) = dirty {
                    tracker.give_back(d);
                }
                return Err(e);
            }
        };
        self.record_pause(pause);
        self.epoch += 1;
        if !self.link.submit(capture) {
            return Err(PrimaryError::LinkGone);
        }
        Ok(epoch)
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
                vm.vcpus.resume();
                return Err(e);
            }
        };
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
        let protected = link.lost.is_none() && link.acked_epoch > 0;
        json!({
            "role": "primary",
            "protected": protected,
            "phase": if link.lost.is_some() { "unprotected (secondary lost)" }
                     else if !link.synced { "initial sync" }
                     else if link.acked_epoch == 0 { "first checkpoint" }
                     else { "protected" },
            "peer": link.peer,
            "epoch": self.epoch,
            "epoch_ms": self.epoch_ms,
            "epoch_min_ms": self.epoch_min.map_or(self.epoch_ms, |d| d.as_millis() as u64),
            "early_epochs": self.early_epochs,
            "last_sent_epoch": link.sent_epoch,
            "last_acked_epoch": link.acked_epoch,
            "last_committed_epoch": link.acked_epoch,
            "stretched_epochs": self.stretched,
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

/// The device loop's clock for a primary's epochs: a timer for `epoch_ms` after each
/// pause, one for an early end that must wait for `--epoch-min-ms`, and the link's
/// progress event.
pub struct EpochClock {
    every: Duration,
    regular: TimerFd,
    early: TimerFd,
    early_at: Option<Instant>,
    link_progress: EventFd,
}

impl EpochClock {
    pub fn new() -> std::io::Result<EpochClock> {
        Ok(EpochClock {
            every: Duration::ZERO,
            regular: TimerFd::new()?,
            early: TimerFd::new()?,
            early_at: None,
            link_progress: EventFd::new(EFD_NONBLOCK)?,
        })
    }

    /// The regular timer, the early timer and the link's progress event (all sent, or
    /// an ack), for the device loop's epoll.
    pub fn fds(&self) -> [RawFd; 3] {
        [
            self.regular.as_raw_fd(),
            self.early.as_raw_fd(),
            self.link_progress.as_raw_fd(),
        ]
    }

    /// Starts timing `p`'s epochs; the link wakes the loop whenever it has sent all or
    /// an ack arrives.
    pub fn start(&mut self, p: &Primary) -> std::io::Result<()> {
        let progress = self.link_progress.try_clone()?;
        p.link.on_progress(Box::new(move || {
            let _ = progress.write(1);
        }));
        self.every = Duration::from_millis(p.epoch_ms);
        self.regular_from_now()
    }

    fn regular_from_now(&mut self) -> std::io::Result<()> {
        Ok(self.regular.reset(self.every, None)?)
    }

    /// The regular timer fired: the epoch ends if it can, and the next one is due
    /// `epoch_ms` from now either way (an epoch that could not end ends once the link is
    /// free, see [`Primary::end_soon`]). `p` is `None` while the operator has the guest
    /// paused: its epoch runs on.
    pub fn on_regular(&mut self, p: Option<&mut Primary>, vm: &Vm) -> std::io::Result<()> {
        if self.regular.is_armed()? {
            // Re-armed (a new protection) after it fired, in the same round of events:
            // nothing is due, and a read would wait for the new expiry.
            return Ok(());
        }
        let _ = self.regular.wait();
        if let Some(p) = p {
            p.tick(vm, false);
        }
        self.regular_from_now()
    }

    /// The early timer or the link's progress event fired; what it means is looked at in
    /// [`EpochClock::after_events`].
    pub fn on_wake(&mut self, early: bool) {
        if early {
            if !matches!(self.early.is_armed(), Ok(true)) {
                let _ = self.early.wait();
            }
            self.early_at = None;
        } else {
            let _ = self.link_progress.read();
        }
    }

    /// After each round of events (a frame the guest sent may be waiting now): ends the
    /// epoch if it should end now, or arms the early timer for when it should.
    pub fn after_events(&mut self, p: &mut Primary, vm: &Vm) -> std::io::Result<()> {
        let Some(d) = p.end_soon() else {
            return Ok(());
        };
        if d.is_zero() {
            if p.tick(vm, true) {
                self.early_at = None;
                self.early.clear()?;
                self.regular_from_now()?;
            }
            return Ok(());
        }
        let at = Instant::now() + d;
        if self.early_at.is_none_or(|e| e > at) {
            self.early.reset(d, None)?;
            self.early_at = Some(at);
        }
        Ok(())
    }
}

fn open_disk(path: &std::path::Path) -> Result<File, PrimaryError> {
    File::open(path).map_err(|source| PrimaryError::Disk {
        path: path.to_path_buf(),
        source,
    })
}
