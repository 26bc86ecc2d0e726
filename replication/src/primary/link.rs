//! The connection's shared state: what the device loop hands over, what `status` shows,
//! and the reader thread that takes the secondary's acks and releases held output.

use std::io::Read;
use std::net::TcpStream;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use vm_memory::GuestAddress;

use super::{Capture, PageCoding, SyncSource};
use crate::gate::HeldOutput;
use crate::messages::Farewell;
use crate::wire::{self, Kind};

pub(super) enum Job {
    Sync(Box<SyncSource>),
    Epoch(Box<Capture>),
    Takeover(u64),
    /// The last frame: the sender writes it, shuts the connection down and ends.
    Goodbye(Farewell),
}

/// What `status` shows of the link.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct LinkStats {
    pub peer: String,
    pub lost: Option<String>,
    pub synced: bool,
    pub sync_total_bytes: u64,
    pub sync_sent_bytes: u64,
    pub sync_skipped_bytes: u64,
    pub sync_percent: f64,
    pub sync_rate_mib_s: f64,
    pub sync_eta_s: f64,
    pub sync_ms: u64,
    /// The goodbye this primary said, once it was written.
    pub goodbye: Option<Farewell>,
    pub sent_epoch: u64,
    pub acked_epoch: u64,
    pub bytes_sent: u64,
    pub last_epoch_wire_bytes: u64,
    pub last_epoch_page_bytes: u64,
    pub total_epoch_wire_bytes: u64,
    pub total_epoch_page_bytes: u64,
    /// Captured pages not sent because the secondary held that version already (see
    /// [`Coder::unchanged`]).
    pub unchanged_pages: u64,
    pub last_ack_latency_us: u64,
}

/// The connection to the secondary, shared by the device loop and the two threads.
pub struct Link {
    pub(super) stats: Mutex<LinkStats>,
    pub(super) lost: AtomicBool,
    pub(super) acked: AtomicU64,
    /// Epochs handed over whose checkpoint is not completely written yet.
    pub(super) in_flight: AtomicU64,
    pub(super) taken: Mutex<Vec<(u64, Instant)>>,
    pub(super) handed_over: AtomicBool,
    /// With a fence, a lost secondary leaves held output held: only winning the fence
    /// releases it (or losing it drops it).
    pub(super) fenced: bool,
    /// A handle that keeps the connection open while the guest runs: a secondary must
    /// not see it close unless this process is dead or said goodbye (a close it reads
    /// as this primary's death). Dropped after a goodbye; the kernel closes it at exit.
    pub(super) keep_open: Mutex<Option<TcpStream>>,
    pub(super) gate: Arc<HeldOutput>,
    pub(super) jobs: Mutex<Option<SyncSender<Job>>>,
    pub(super) coding: PageCoding,
    /// Page buffers of checkpoints already sent, for the next captures: memory the VMM
    /// has touched before costs no page faults inside a pause.
    pub(super) spare: Mutex<Vec<(Vec<GuestAddress>, Vec<u8>)>>,
    /// Called each time the sender has nothing left to write (a checkpoint or the
    /// initial sync is out) and each time an ack arrives: the device loop may end an
    /// epoch that waited for that.
    pub(super) on_progress: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Link {
    pub(super) fn stats(&self) -> MutexGuard<'_, LinkStats> {
        self.stats.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Buffers for the next capture's addresses and pages (empty, with their capacity).
    pub fn spare_buffers(&self) -> (Vec<GuestAddress>, Vec<u8>) {
        self.spare
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .pop()
            .unwrap_or_default()
    }

    pub(super) fn recycle(&self, mut addrs: Vec<GuestAddress>, mut data: Vec<u8>) {
        let mut spare = self.spare.lock().unwrap_or_else(PoisonError::into_inner);
        // One per checkpoint that can be queued, one being captured.
        if spare.len() < 3 {
            addrs.clear();
            data.clear();
            spare.push((addrs, data));
        }
    }

    /// Sets what the link calls each time the sender has written everything it was
    /// given and each time the secondary acknowledges a checkpoint.
    pub fn on_progress(&self, f: Box<dyn Fn() + Send + Sync>) {
        *self
            .on_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(f);
    }

    pub(super) fn progress(&self) {
        if let Some(f) = &*self
            .on_progress
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
        {
            f();
        }
    }

    pub fn snapshot(&self) -> LinkStats {
        self.stats().clone()
    }

    pub fn is_lost(&self) -> bool {
        self.lost.load(Ordering::SeqCst)
    }

    pub fn is_synced(&self) -> bool {
        self.stats().synced
    }

    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::SeqCst)
    }

    pub fn busy(&self) -> bool {
        self.in_flight.load(Ordering::SeqCst) > 0
    }

    pub fn handed_over(&self) -> bool {
        self.handed_over.load(Ordering::SeqCst)
    }

    /// Whether a goodbye was written and the connection shut down after it.
    pub fn said_goodbye(&self) -> bool {
        self.stats().goodbye.is_some()
    }

    pub fn is_fenced(&self) -> bool {
        self.fenced
    }

    /// The secondary is gone: say so loudly and go on unprotected. Held output is
    /// released now, or with a fence once this node wins it. The secondary is told
    /// goodbye if the sender can still write.
    pub fn lose(&self, why: &str) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.handed_over() {
            // The secondary runs the guest now; closing the link is what it does next.
            return;
        }
        self.stats().lost = Some(why.to_string());
        if self.fenced {
            tracing::error!(
                "SECONDARY LOST ({why}): held output stays held until this node wins the fence"
            );
        } else {
            tracing::error!(
                "SECONDARY LOST ({why}): held output released; the guest runs UNPROTECTED"
            );
            self.gate.open();
        }
        let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        // Not waited for: a sender stuck in a write never takes it, and the connection
        // then stays open (see `keep_open`).
        if let Some(j) = jobs.as_ref() {
            let _ = j.try_send(Job::Goodbye(Farewell::SecondaryDropped));
        }
        // Dropping the channel ends the sender thread (after the goodbye).
        jobs.take();
    }

    /// Ends the protection on purpose: the secondary is told why (it will not take
    /// over), and the link is lost from here on. Output still held stays held: the
    /// caller releases or drops it. Returns whether the goodbye was written within
    /// `wait`; if not, the connection stays open until the process ends.
    pub fn goodbye(&self, why: Farewell, wait: Duration) -> bool {
        if self.lost.swap(true, Ordering::SeqCst) {
            return false;
        }
        self.stats().lost = Some(format!("said goodbye: {}", why.says()));
        let deadline = Instant::now() + wait;
        let mut job = Job::Goodbye(why);
        {
            let mut jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
            let Some(tx) = jobs.take() else {
                return false;
            };
            loop {
                match tx.try_send(job) {
                    Ok(()) => break,
                    Err(TrySendError::Full(j)) if Instant::now() < deadline => {
                        job = j;
                        std::thread::sleep(Duration::from_millis(1));
                    }
                    Err(_) => return false,
                }
            }
        }
        while !self.said_goodbye() {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(1));
        }
        true
    }

    /// Called by the sender once the goodbye is out and the connection shut down.
    pub(super) fn goodbye_said(&self, why: Farewell) {
        self.keep_open
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
        self.stats().goodbye = Some(why);
    }

    fn send(&self, job: Job) -> bool {
        let jobs = self.jobs.lock().unwrap_or_else(PoisonError::into_inner);
        match jobs.as_ref().map(|j| j.try_send(job)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_))) | Some(Err(TrySendError::Disconnected(_))) | None => {
                false
            }
        }
    }

    /// Starts the initial sync.
    pub fn start_sync(&self, source: SyncSource) -> bool {
        self.send(Job::Sync(Box::new(source)))
    }

    /// Hands over a checkpoint; `false` if the link is gone (nothing will be sent).
    pub fn submit(&self, capture: Capture) -> bool {
        self.in_flight.fetch_add(1, Ordering::SeqCst);
        self.taken
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((capture.epoch, capture.taken));
        if self.send(Job::Epoch(Box::new(capture))) {
            true
        } else {
            self.in_flight.fetch_sub(1, Ordering::SeqCst);
            false
        }
    }

    /// Asks the secondary to take over once `epoch` is acknowledged.
    pub fn takeover(&self, epoch: u64) -> bool {
        self.send(Job::Takeover(epoch))
    }
}

impl Drop for Link {
    fn drop(&mut self) {
        // Still held: no goodbye was said. Closing it would read as this process's death
        // to a secondary that still listens on it: it stays open while the process lives.
        if let Some(s) = self
            .keep_open
            .get_mut()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            std::mem::forget(s);
        }
    }
}

/// Reads the secondary's frames until it is gone; returns why.
pub(super) fn acks(link: &Link, r: &mut impl Read, timeout: Duration) -> String {
    let mut payload = Vec::new();
    loop {
        let h = match wire::read_frame_within(r, &mut payload, timeout) {
            Ok(h) => h,
            Err(e) => return e.to_string(),
        };
        match h.kind {
            Kind::Ack => {
                let n = h.epoch;
                if n <= link.acked() {
                    return format!("ack of epoch {n} after epoch {}", link.acked());
                }
                link.acked.store(n, Ordering::SeqCst);
                link.gate.release_through(n);
                let mut taken = link.taken.lock().unwrap_or_else(PoisonError::into_inner);
                let latency = taken
                    .iter()
                    .find(|t| t.0 == n)
                    .map(|t| t.1.elapsed().as_micros() as u64);
                taken.retain(|t| t.0 > n);
                drop(taken);
                let mut s = link.stats();
                s.acked_epoch = n;
                if let Some(l) = latency {
                    s.last_ack_latency_us = l;
                }
                drop(s);
                link.progress();
            }
            Kind::Heartbeat => {}
            Kind::Refuse => {
                return format!(
                    "the secondary dropped the link: {}",
                    String::from_utf8_lossy(&payload)
                )
            }
            kind => return format!("unexpected {kind:?} frame from the secondary"),
        }
    }
}
