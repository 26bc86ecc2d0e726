//! The primary role: keeps the guest protected by a secondary. Once connected (the
//! handshake happens before the VM is built, see `main`), the device loop calls
//! [`Primary::tick`] every `--epoch-ms`; each tick that finds the previous checkpoint
//! sent ends an epoch:
//!
//! 1. pause the vCPUs (the device loop is this thread, so no device runs either);
//! 2. end the epoch's dirty set (KVM log ∪ the VMM's own writes) and copy those pages
//!    into a buffer of our own;
//! 3. capture the machine state, take the disk writes forwarded during the epoch, and
//!    make the gate hold frames from now on for the next epoch;
//! 4. resume, and hand the checkpoint to the sender thread.
//!
//! Anything failing in 2–3 makes the dirty set unreliable: the link is dropped (the guest
//! goes on unprotected, loudly) rather than letting a checkpoint miss a page.

use std::fs::File;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::{DirtyTracker, Sources};
use mcvmm_checkpoint::snapshot::memory_digest;
use mcvmm_checkpoint::staging::Staged;
use mcvmm_replication::disk::file_digest;
use mcvmm_replication::gate::HeldOutput;
use mcvmm_replication::primary::{Capture, ForwardedWrites, Link, SyncSource};
use serde_json::{json, Value};

use crate::epochs::PAUSE_LIMIT;
use crate::snapshot::machine_state;
use crate::vm::Vm;

/// Pause times kept for the percentiles in `status`.
const PAUSES_KEPT: usize = 2000;

pub struct Primary {
    pub link: Arc<Link>,
    pub gate: Arc<HeldOutput>,
    pub writes: Arc<ForwardedWrites>,
    pub epoch_ms: u64,
    tracker: Option<DirtyTracker>,
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
        epoch_ms: u64,
    ) -> Primary {
        Primary {
            link,
            gate,
            writes,
            epoch_ms,
            tracker: None,
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
    pub fn start(&mut self, vm: &Vm, theirs: Vec<Vec<u64>>, chunk: u64) -> Result<(), String> {
        let disks = vm
            .config
            .disks
            .iter()
            .map(|d| File::open(&d.path).map_err(|e| format!("{}: {e}", d.path.display())))
            .collect::<Result<Vec<File>, String>>()?;
        // Tracking must be on before the copy starts: whatever the guest writes from here
        // on is in the first checkpoint.
        vm.vcpus.pause(PAUSE_LIMIT).map_err(|e| e.to_string())?;
        let tracker = DirtyTracker::start(&vm.vm_fd, &vm.mem, Sources::GuestAndVmm);
        // Writes before this point are in the disks the sync copies; from here on each
        // is forwarded.
        self.writes.record(true);
        vm.vcpus.resume();
        self.tracker = Some(tracker.map_err(|e| e.to_string())?);
        self.started = Instant::now();
        if !self.link.start_sync(SyncSource {
            mem: vm.mem.clone(),
            disks,
            theirs,
            chunk,
        }) {
            return Err("the link to the secondary is gone".into());
        }
        Ok(())
    }

    /// Asks for digests of memory and disks with the next checkpoint.
    pub fn verify_next(&self) -> u64 {
        self.verify_next.store(true, Ordering::SeqCst);
        self.epoch
    }

    /// Called every `epoch_ms` by the device loop.
    pub fn tick(&mut self, vm: &Vm) {
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
                eprintln!(
                    "mcvmm: epochs stopped at {}; `mcvmm ctl protect HOST:PORT` protects this guest again with a new secondary",
                    self.epoch
                );
            }
            return;
        }
        if !self.link.is_synced() || self.link.busy() {
            // The sync or the previous checkpoint is still on its way: the epoch runs on.
            if self.link.is_synced() {
                self.stretched += 1;
            }
            return;
        }
        if let Err(why) = self.checkpoint(vm, false) {
            self.link
                .lose(&format!("checkpoint of epoch {}: {why}", self.epoch));
        }
    }

    /// Ends the running epoch and hands its checkpoint to the sender; `keep_paused` leaves
    /// the vCPUs stopped afterwards (a planned switch).
    pub fn checkpoint(&mut self, vm: &Vm, keep_paused: bool) -> Result<u64, String> {
        let Some(tracker) = self.tracker.as_mut() else {
            return Err("dirty tracking is off".into());
        };
        let epoch = self.epoch;
        let t0 = Instant::now();
        vm.vcpus
            .pause_capturing(PAUSE_LIMIT)
            .map_err(|e| e.to_string())?;
        let captured = (|| {
            let dirty = tracker
                .end_epoch(&vm.vm_fd, &vm.mem)
                .map_err(|e| e.to_string())?;
            let (addrs, data) = self.link.spare_buffers();
            let mut staged = Staged { addrs, data };
            staged.stage(&dirty, &vm.mem).map_err(|e| e.to_string())?;
            let state = machine_state(vm)?;
            let writes = self.writes.take();
            let (memory_digest, disk_digests) = if self.verify_next.swap(false, Ordering::SeqCst) {
                let mut digests = Vec::new();
                for d in &vm.config.disks {
                    let f = File::open(&d.path).map_err(|e| e.to_string())?;
                    let size = f.metadata().map_err(|e| e.to_string())?.len();
                    digests.push(file_digest(&f, size).map_err(|e| e.to_string())?);
                }
                (Some(memory_digest(&vm.mem)), Some(digests))
            } else {
                (None, None)
            };
            // Frames sent from now on are the next epoch's.
            self.gate.hold_from(epoch + 1);
            Ok::<_, String>(Capture {
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
        let pause = t0.elapsed().as_micros() as u64;
        let capture = captured?;
        self.record_pause(pause);
        self.epoch += 1;
        if !self.link.submit(capture) {
            return Err("the link to the secondary is gone".into());
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
    pub fn hand_over(&mut self, vm: &Vm) -> Result<u64, String> {
        if self.link.is_lost() || !self.link.is_synced() {
            return Err("not protected: no secondary to hand over to".into());
        }
        if !self.drain(Duration::from_secs(10)) {
            return Err("the previous checkpoint did not get through".into());
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
        Err(format!(
            "the secondary did not take epoch {epoch} over; the guest goes on here"
        ))
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
