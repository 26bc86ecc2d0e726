//! The secondary's receiver: holds the last committed checkpoint and applies the next one
//! only when it has arrived whole.
//!
//! States and the frames each accepts (anything else drops the connection, with the
//! reason, and applies nothing of the epoch in progress):
//!
//! ```text
//! Syncing    Pages(0) DiskChunk(0) → written straight into the image / replicas
//!            DiskWrite(n)          → held for epoch n
//!            SyncDone              → Ready
//! Ready      DiskWrite(n)          → held for epoch n (n > committed)
//!            Begin(n), n = committed + 1 → Staging(n)
//!            Takeover(n), n = committed  → take over (planned switch)
//! Staging(n) Pages(n)              → staged (checked against guest memory first)
//!            DiskWrite(m)          → held for epoch m (m >= n)
//!            State(n)              → staged (decoded, so a bad one is refused now)
//!            End(n)                → counts checked; pages copied into the image, held
//!                                    writes of n applied and synced, state kept;
//!                                    committed = n; Ack(n) sent → Ready
//! any        Heartbeat             → nothing (the peer is alive)
//!            Goodbye               → the primary ended the connection on purpose
//! ```
//!
//! The primary's stream is read through [`Patient`]: a silence is put to the caller's
//! rule (take over, or wait on) instead of tearing a frame.
//!
//! The image is guest memory in the form `vmm` hands to KVM at failover, so taking over
//! copies nothing. Until the first commit the image is not a consistent guest, and the
//! secondary refuses to take over.

use std::io::{Read, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use mcvmm_checkpoint::snapshot::memory_digest;
use mcvmm_checkpoint::state::{MachineState, FORMAT_VERSION};
use mcvmm_checkpoint::{GuestMemory, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend};

use crate::disk::{DiskError, Disks};
use crate::messages::{
    self, Accept, End, Farewell, Goodbye, Hello, PageEncoding, PROTOCOL_VERSION,
};
use crate::wire::{self, Header, Kind, WireError};

#[derive(Debug, thiserror::Error)]
pub enum ReceiveError {
    #[error(transparent)]
    Wire(#[from] WireError),
    #[error(transparent)]
    Disk(#[from] DiskError),
    #[error("{kind:?} frame of epoch {epoch} out of order: {why}")]
    Order { kind: Kind, epoch: u64, why: String },
    #[error("pages at {gpa:#x} (+{len} bytes) lie outside guest memory")]
    OutsideMemory { gpa: u64, len: u64 },
    #[error("epoch {epoch} ended with {got} {what}, the primary counted {want}")]
    Count {
        epoch: u64,
        what: &'static str,
        got: u64,
        want: u64,
    },
    #[error("epoch {0} ended without its machine state")]
    NoState(u64),
    #[error("writing to guest memory: {0}")]
    Memory(String),
    #[error("{0}: no checkpoint is acknowledged any more")]
    ReplicaSync(String),
}

impl ReceiveError {
    /// The stream stopped (primary gone) rather than carried something wrong.
    pub fn is_loss(&self) -> bool {
        matches!(self, ReceiveError::Wire(w) if w.is_loss())
    }
}

/// Why a handshake was refused; the text goes back to the primary too.
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct Refusal(pub String);

/// What the secondary checks the primary's `Hello` against.
pub struct Expect<'a> {
    pub disk_sizes: Vec<u64>,
    pub has_tap: bool,
    pub generation: u64,
    pub disks: &'a Disks,
}

/// Checks a `Hello`; returns the `Accept` to send, or the reason to refuse.
pub fn check_hello(hello: &Hello, want: &Expect) -> Result<Accept, Refusal> {
    if let Some(why) = want.disks.failed() {
        return Err(Refusal(format!(
            "a replica of this secondary failed ({why}), so it cannot be trusted to hold what was written to it: restart this secondary on disks that work"
        )));
    }
    if hello.protocol != PROTOCOL_VERSION {
        return Err(Refusal(format!(
            "protocol version {} (this secondary speaks {PROTOCOL_VERSION})",
            hello.protocol
        )));
    }
    if hello.state_format != FORMAT_VERSION {
        return Err(Refusal(format!(
            "checkpoint format version {} (this secondary has {FORMAT_VERSION})",
            hello.state_format
        )));
    }
    if hello.generation < want.generation {
        return Err(Refusal(format!(
            "stale primary: generation {} but this side is at generation {}",
            hello.generation, want.generation
        )));
    }
    let disks = &hello.shape.disks;
    if disks.len() != want.disk_sizes.len() {
        return Err(Refusal(format!(
            "disks: the primary has {}, this secondary {}",
            disks.len(),
            want.disk_sizes.len()
        )));
    }
    for (i, (d, size)) in disks.iter().zip(&want.disk_sizes).enumerate() {
        if d.size_bytes != *size {
            return Err(Refusal(format!(
                "disk {}: the primary's is {} bytes, this secondary's {} bytes",
                i + 1,
                d.size_bytes,
                size
            )));
        }
    }
    if hello.shape.net.is_some() && !want.has_tap {
        return Err(Refusal(
            "the guest has a NIC, and this secondary has no --tap to give it at failover".into(),
        ));
    }
    if !(4096..=(64 << 20)).contains(&hello.chunk_bytes) {
        return Err(Refusal(format!(
            "disk chunk size {} (4 KiB..64 MiB)",
            hello.chunk_bytes
        )));
    }
    let disk_digests = want
        .disks
        .digests(hello.chunk_bytes)
        .map_err(|e| Refusal(format!("reading this secondary's disks: {e}")))?;
    Ok(Accept { disk_digests })
}

/// What the secondary reports (`status`) while it receives.
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct Progress {
    pub phase: &'static str,
    pub committed_epoch: u64,
    pub sync_bytes: u64,
    pub sync_pages: u64,
    pub sync_disk_bytes: u64,
    pub bytes_received: u64,
    pub last_epoch_bytes: u64,
    pub disk_bytes_committed: u64,
    pub verified_epochs: u64,
    pub verify_failures: u64,
    pub last_verify_error: Option<String>,
}

/// How the stream from the primary ended.
#[derive(Debug)]
pub enum Ended {
    /// The connection closed (or was reset, or ended inside a frame) without a goodbye.
    Closed(ReceiveError),
    /// The primary was silent, and the caller's rule gave up on it (see [`Patient`]).
    Silent(ReceiveError),
    /// An acknowledgement could not be written: the primary does not read.
    ReplyFailed(std::io::Error),
    /// The primary misbehaved; it may well be alive.
    Refused(ReceiveError),
    /// A planned switch: take over at the committed epoch.
    Takeover(u64),
    /// The primary ended the connection on purpose, and said why.
    Goodbye(Farewell),
}

/// The rule a silence is put to: called with how long the primary has been silent
/// (at least the timeout); `true` gives up on it.
pub type GiveUp = Box<dyn FnMut(Duration) -> bool + Send>;

/// The primary's stream, read so that a silence does not tear a frame: the socket's own
/// read timeout is a short poll, and once the primary has been silent for `timeout` the
/// silence is put to `give_up`, again at each poll, until it says yes (the read fails
/// with `TimedOut`) or bytes come. A poll that itself came late (this process was
/// frozen) starts the count again: that silence was not the primary's.
pub struct Patient<R> {
    inner: R,
    last_byte: Instant,
    last_poll: Instant,
    timeout: Duration,
    /// A poll later than this after the previous one: this process was frozen.
    late_poll: Duration,
    give_up: GiveUp,
}

impl<R> Patient<R> {
    pub fn new(inner: R, timeout: Duration, give_up: GiveUp) -> Patient<R> {
        let now = Instant::now();
        Patient {
            inner,
            last_byte: now,
            last_poll: now,
            timeout,
            late_poll: Self::poll_interval(timeout) + timeout,
            give_up,
        }
    }

    /// How long since the last byte came.
    pub fn silent_for(&self) -> Duration {
        self.last_byte.elapsed()
    }

    /// The poll interval to set as the socket's read timeout.
    pub fn poll_interval(timeout: Duration) -> Duration {
        timeout.min(Duration::from_millis(100))
    }
}

impl<R: Read> Read for Patient<R> {
    fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
        loop {
            match self.inner.read(buf) {
                Ok(n) => {
                    self.last_byte = Instant::now();
                    self.last_poll = self.last_byte;
                    return Ok(n);
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    let now = Instant::now();
                    if now.duration_since(self.last_poll) > self.late_poll {
                        self.last_byte = now;
                    }
                    self.last_poll = now;
                    let silent = now.duration_since(self.last_byte);
                    if silent >= self.timeout && (self.give_up)(silent) {
                        return Err(std::io::ErrorKind::TimedOut.into());
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

struct Stage {
    epoch: u64,
    addrs: Vec<u64>,
    data: Vec<u8>,
    state: Option<MachineState>,
}

/// The committed checkpoint and what is arriving for the next.
pub struct Receiver {
    pub mem: GuestMemory,
    pub disks: Disks,
    committed: u64,
    state: Option<MachineState>,
    stage: Option<Stage>,
    synced: bool,
    scratch: Vec<u8>,
    /// The committed pages a delta run is rebuilt from.
    base: Vec<u8>,
    pub progress: Arc<Mutex<Progress>>,
}

impl Receiver {
    /// `mem` is zeroed guest memory of the primary's shape.
    pub fn new(mem: GuestMemory, disks: Disks, progress: Arc<Mutex<Progress>>) -> Receiver {
        Receiver {
            mem,
            disks,
            committed: 0,
            state: None,
            stage: None,
            synced: false,
            scratch: Vec::new(),
            base: Vec::new(),
            progress,
        }
    }

    pub fn committed(&self) -> u64 {
        self.committed
    }

    /// The committed checkpoint's machine state; `None` before the first commit.
    pub fn take_state(&mut self) -> Option<MachineState> {
        self.state.take()
    }

    fn progress(&self) -> std::sync::MutexGuard<'_, Progress> {
        self.progress.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Receives until the stream ends. `replies` carries acks back (shared with the
    /// heartbeat sender). Whatever ends it, the epoch in progress is discarded.
    pub fn run<R: Read, W: Write>(
        &mut self,
        reader: &mut R,
        replies: &Mutex<W>,
        timeout: Duration,
    ) -> Ended {
        self.progress().phase = "syncing";
        let mut payload = Vec::new();
        let ended = loop {
            let h = match wire::read_frame_within(reader, &mut payload, timeout) {
                Ok(h) => h,
                Err(e @ WireError::TimedOut(_)) => break Ended::Silent(e.into()),
                Err(e) if e.is_loss() => break Ended::Closed(e.into()),
                Err(e) => break Ended::Refused(e.into()),
            };
            self.progress().bytes_received += u64::from(h.len) + 24;
            match self.handle(&h, &payload) {
                Ok(Some(Reply::Ack(n))) => {
                    let mut w = replies.lock().unwrap_or_else(PoisonError::into_inner);
                    if let Err(e) =
                        wire::write_frame(&mut *w, Kind::Ack, n, &[]).and_then(|_| w.flush())
                    {
                        break Ended::ReplyFailed(e);
                    }
                }
                Ok(Some(Reply::Takeover(n))) => break Ended::Takeover(n),
                Ok(Some(Reply::Goodbye(why))) => break Ended::Goodbye(why),
                Ok(None) => {}
                Err(e) => break Ended::Refused(e),
            }
        };
        self.stage = None;
        let dropped = self.disks.discard_uncommitted();
        if dropped > 0 {
            tracing::info!("discarded {dropped} disk writes of uncommitted epochs");
        }
        ended
    }

    fn order(h: &Header, why: impl Into<String>) -> ReceiveError {
        ReceiveError::Order {
            kind: h.kind,
            epoch: h.epoch,
            why: why.into(),
        }
    }

    fn check_pages(&self, gpa: u64, len: u64) -> Result<(), ReceiveError> {
        let fits = usize::try_from(len)
            .ok()
            .is_some_and(|l| self.mem.check_range(GuestAddress(gpa), l));
        if fits {
            Ok(())
        } else {
            Err(ReceiveError::OutsideMemory { gpa, len })
        }
    }

    fn handle(&mut self, h: &Header, p: &[u8]) -> Result<Option<Reply>, ReceiveError> {
        match h.kind {
            Kind::Heartbeat => {}
            Kind::Pages => self.pages(h, p)?,
            Kind::DiskChunk => {
                if self.synced || h.epoch != 0 {
                    return Err(Self::order(h, "disk chunks belong to the initial sync"));
                }
                let (disk, offset, data) = messages::parse_disk(h, p)?;
                self.disks.write_chunk(disk, offset, data)?;
                let mut pr = self.progress();
                pr.sync_disk_bytes += data.len() as u64;
                pr.sync_bytes += data.len() as u64;
            }
            Kind::DiskWrite => {
                if h.epoch == 0 {
                    return Err(Self::order(h, "a guest write must belong to an epoch"));
                }
                let (disk, offset, data) = messages::parse_disk(h, p)?;
                self.disks.hold(h.epoch, disk, offset, data)?;
            }
            Kind::SyncDone => {
                if self.synced {
                    return Err(Self::order(h, "the sync ended twice"));
                }
                self.synced = true;
                self.progress().phase = "synced";
            }
            Kind::Begin => self.begin(h)?,
            Kind::State => {
                let state: MachineState = messages::decode(h, p)?;
                match &mut self.stage {
                    Some(s) if s.epoch == h.epoch && s.state.is_none() => s.state = Some(state),
                    _ => {
                        return Err(Self::order(
                            h,
                            "no checkpoint of that epoch waits for state",
                        ))
                    }
                }
            }
            Kind::End => {
                let end: End = messages::decode(h, p)?;
                let stage = match self.stage.take() {
                    Some(s) if s.epoch == h.epoch => s,
                    _ => return Err(Self::order(h, "no checkpoint of that epoch is open")),
                };
                return self.commit(stage, &end).map(|()| Some(Reply::Ack(h.epoch)));
            }
            Kind::Takeover => {
                if self.stage.is_some() || h.epoch != self.committed || self.committed == 0 {
                    return Err(Self::order(
                        h,
                        format!(
                            "takeover at epoch {} (committed {})",
                            h.epoch, self.committed
                        ),
                    ));
                }
                return Ok(Some(Reply::Takeover(h.epoch)));
            }
            Kind::Goodbye => {
                let bye: Goodbye = messages::decode(h, p)?;
                return Ok(Some(Reply::Goodbye(bye.why)));
            }
            Kind::Hello | Kind::Accept | Kind::Refuse | Kind::Ack => {
                return Err(Self::order(
                    h,
                    "not expected from a primary after the handshake",
                ))
            }
        }
        Ok(None)
    }

    /// A run of pages: into the replica's memory during the initial sync, into the open
    /// checkpoint's stage after it.
    fn pages(&mut self, h: &Header, p: &[u8]) -> Result<(), ReceiveError> {
        let run = messages::parse_pages(h, p)?;
        let len = u64::from(run.count) * PAGE_SIZE;
        self.check_pages(run.gpa, len)?;
        let bytes = if run.encoding == PageEncoding::Delta {
            if h.epoch == 0 {
                return Err(Self::order(h, "a delta run in the initial sync"));
            }
            if self.stage.as_ref().is_none_or(|s| s.epoch != h.epoch) {
                return Err(Self::order(h, "no checkpoint of that epoch is open"));
            }
            // The committed image changes only at a commit, and a checkpoint
            // names each page once: it is the base the primary encoded against.
            self.base.resize(len as usize, 0);
            self.mem
                .read_slice(&mut self.base, GuestAddress(run.gpa))
                .map_err(|e| ReceiveError::Memory(e.to_string()))?;
            run.rebuild(h, &self.base, &mut self.scratch)?
        } else {
            run.bytes(h, &mut self.scratch)?
        };
        if h.epoch == 0 {
            if self.synced {
                return Err(Self::order(h, "initial sync pages after the sync ended"));
            }
            self.mem
                .write_slice(bytes, GuestAddress(run.gpa))
                .map_err(|e| ReceiveError::Memory(e.to_string()))?;
            let mut pr = self.progress();
            pr.sync_pages += u64::from(run.count);
            pr.sync_bytes += len;
        } else {
            let stage = match &mut self.stage {
                Some(s) if s.epoch == h.epoch => s,
                _ => return Err(Self::order(h, "no checkpoint of that epoch is open")),
            };
            for i in 0..u64::from(run.count) {
                stage.addrs.push(run.gpa + i * PAGE_SIZE);
            }
            stage.data.extend_from_slice(bytes);
        }
        Ok(())
    }

    /// A checkpoint opens: only after the sync, one at a time, epochs in order.
    fn begin(&mut self, h: &Header) -> Result<(), ReceiveError> {
        if !self.synced {
            return Err(Self::order(h, "a checkpoint before the initial sync ended"));
        }
        if self.stage.is_some() {
            return Err(Self::order(h, "the previous checkpoint did not end"));
        }
        if h.epoch != self.committed + 1 {
            return Err(Self::order(
                h,
                format!("expected epoch {}", self.committed + 1),
            ));
        }
        self.stage = Some(Stage {
            epoch: h.epoch,
            addrs: Vec::new(),
            data: Vec::new(),
            state: None,
        });

        Ok(())
    }

    /// Applies a complete checkpoint: nothing of it is applied unless all of it arrived.
    fn commit(&mut self, stage: Stage, end: &End) -> Result<(), ReceiveError> {
        // A replica that failed a write or a sync (also the background one) holds no
        // acknowledged checkpoint any more: nothing is committed, so nothing acknowledged.
        if let Some(why) = self.disks.failed() {
            return Err(ReceiveError::ReplicaSync(why));
        }
        let epoch = stage.epoch;
        let count = |what, got, want| ReceiveError::Count {
            epoch,
            what,
            got,
            want,
        };
        if stage.addrs.len() as u64 != end.pages {
            return Err(count("pages", stage.addrs.len() as u64, end.pages));
        }
        let writes = self.disks.held_in(epoch);
        if writes != end.disk_writes {
            return Err(count("disk writes", writes, end.disk_writes));
        }
        let state = stage.state.ok_or(ReceiveError::NoState(epoch))?;
        for (gpa, page) in stage
            .addrs
            .iter()
            .zip(stage.data.chunks_exact(PAGE_SIZE as usize))
        {
            self.mem
                .write_slice(page, GuestAddress(*gpa))
                .map_err(|e| ReceiveError::Memory(e.to_string()))?;
        }
        let disk_bytes = self.disks.commit(epoch)?;
        self.committed = epoch;
        self.state = Some(state);
        let verify = self.verify(end);
        let mut pr = self.progress();
        pr.phase = "protected";
        pr.committed_epoch = epoch;
        pr.last_epoch_bytes = stage.data.len() as u64;
        pr.disk_bytes_committed += disk_bytes;
        match verify {
            None => {}
            Some(Ok(())) => {
                tracing::info!("verified epoch {epoch}: memory and disks match the primary's");
                pr.verified_epochs += 1;
            }
            Some(Err(why)) => {
                tracing::error!("VERIFY FAILED at epoch {epoch}: {why}");
                pr.verify_failures += 1;
                pr.last_verify_error = Some(why);
            }
        }
        Ok(())
    }

    /// Compares the committed image and replicas with the primary's digests, if it sent
    /// them.
    fn verify(&self, end: &End) -> Option<Result<(), String>> {
        if end.memory_digest.is_none() && end.disk_digests.is_none() {
            return None;
        }
        if let Some(want) = end.memory_digest {
            let got = memory_digest(&self.mem);
            if got != want {
                return Some(Err(format!(
                    "memory digest {got:016x}, the primary's {want:016x}"
                )));
            }
        }
        if let Some(want) = &end.disk_digests {
            match self.disks.file_digests() {
                Ok(got) if &got == want => {}
                Ok(got) => {
                    return Some(Err(format!(
                        "disk digests {got:016x?}, the primary's {want:016x?}"
                    )))
                }
                Err(e) => return Some(Err(e.to_string())),
            }
        }
        Some(Ok(()))
    }
}

enum Reply {
    Ack(u64),
    Takeover(u64),
    Goodbye(Farewell),
}

/// Sends a heartbeat every `every` until the connection fails or `stop` is set, so the
/// primary can tell a slow secondary from a lost one.
pub fn heartbeats<W: Write + Send + 'static>(
    replies: Arc<Mutex<W>>,
    every: Duration,
    stop: Arc<std::sync::atomic::AtomicBool>,
) -> std::thread::JoinHandle<()> {
    std::thread::spawn(move || {
        let mut last = Instant::now();
        while !stop.load(std::sync::atomic::Ordering::Relaxed) {
            std::thread::sleep(every.saturating_sub(last.elapsed()));
            last = Instant::now();
            let mut w = replies.lock().unwrap_or_else(PoisonError::into_inner);
            if wire::write_frame(&mut *w, Kind::Heartbeat, 0, &[])
                .and_then(|_| w.flush())
                .is_err()
            {
                return;
            }
        }
    })
}
