//! The primary's side of the stream: the handshake, then a sender thread that writes the
//! initial sync and each epoch's checkpoint, and a reader thread that takes the
//! secondary's acks (releasing held output) and notices when it is gone.
//!
//! The device loop makes a [`Capture`] at each pause and hands it over with
//! [`Link::submit`]; it never waits for the network. If the previous checkpoint is still
//! being written when the next epoch ends, the loop lets the epoch run on (it stretches).

use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError, SyncSender, TrySendError};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mcvmm_checkpoint::dirty::LogArm;
use mcvmm_checkpoint::resident::Pagemap;
use mcvmm_checkpoint::seams::DiskWriteSink;
use mcvmm_checkpoint::staging;
use mcvmm_checkpoint::state::MachineState;
use mcvmm_checkpoint::{GuestMemory, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::delta::SentPages;
use crate::gate::HeldOutput;
use crate::messages::{self, Accept, End, Hello, PageEncoding, MAX_RUN_PAGES};
use crate::wire::{self, Kind, WireError};
use mcvmm_checkpoint::digest;

/// Idle time after which the sender says it is alive.
pub const HEARTBEAT: Duration = Duration::from_millis(50);

#[derive(Debug, thiserror::Error)]
pub enum PrimaryError {
    #[error("secondary {peer}: {source}")]
    Connect {
        peer: String,
        #[source]
        source: std::io::Error,
    },
    #[error("secondary {peer}: no answer to the handshake: {source}")]
    Handshake {
        peer: String,
        #[source]
        source: WireError,
    },
    #[error("secondary {peer} refused: {reason}")]
    Refused { peer: String, reason: String },
    #[error("secondary {peer}: unexpected {kind:?} frame in the handshake")]
    Unexpected { peer: String, kind: Kind },
}

/// A guest write forwarded to the secondary.
pub struct Forwarded {
    pub disk: u32,
    pub offset: u64,
    pub data: Vec<u8>,
}

/// Collects the guest's disk writes of the epoch in progress, while recording (from the
/// start of a protection until its secondary is lost; `Default` is not recording).
#[derive(Default)]
pub struct ForwardedWrites {
    writes: Mutex<Vec<Forwarded>>,
    recording: AtomicBool,
}

impl ForwardedWrites {
    /// The writes since the last call (at a pause: those of the epoch that just ended).
    pub fn take(&self) -> Vec<Forwarded> {
        std::mem::take(&mut *self.writes.lock().unwrap_or_else(PoisonError::into_inner))
    }

    /// Starts or stops recording; either way what was kept is dropped (at the start of a
    /// sync the disks themselves are copied; after the loss nobody will take it).
    pub fn record(&self, on: bool) {
        self.recording.store(on, Ordering::SeqCst);
        drop(self.take());
    }
}

impl DiskWriteSink for ForwardedWrites {
    fn recording(&self) -> bool {
        self.recording.load(Ordering::SeqCst)
    }

    fn written(&self, disk: usize, offset: u64, data: Vec<u8>) {
        if !self.recording() {
            return;
        }
        self.writes
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(Forwarded {
                disk: disk as u32,
                offset,
                data,
            });
    }
}

/// One epoch's checkpoint, taken at its pause.
pub struct Capture {
    pub epoch: u64,
    pub addrs: Vec<GuestAddress>,
    pub data: Vec<u8>,
    pub state: MachineState,
    pub writes: Vec<Forwarded>,
    pub memory_digest: Option<u64>,
    pub disk_digests: Option<Vec<u64>>,
    pub taken: Instant,
}

/// What the initial sync copies: all RAM (while the guest runs; pages written meanwhile
/// are in the first checkpoint) and every disk chunk whose digest differs from the
/// secondary's.
pub struct SyncSource {
    pub mem: GuestMemory,
    pub disks: Vec<File>,
    pub theirs: Vec<Vec<u64>>,
    pub chunk: u64,
    /// A dirty log started with every page dirty: each span is armed just before it is
    /// read. `None`: the log was armed all at once before the sync began.
    pub arm: Option<LogArm>,
}

enum Job {
    Sync(Box<SyncSource>),
    Epoch(Box<Capture>),
    Takeover(u64),
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
    stats: Mutex<LinkStats>,
    lost: AtomicBool,
    acked: AtomicU64,
    /// Epochs handed over whose checkpoint is not completely written yet.
    in_flight: AtomicU64,
    taken: Mutex<Vec<(u64, Instant)>>,
    handed_over: AtomicBool,
    gate: Arc<HeldOutput>,
    jobs: Mutex<Option<SyncSender<Job>>>,
    coding: PageCoding,
    /// Page buffers of checkpoints already sent, for the next captures: memory the VMM
    /// has touched before costs no page faults inside a pause.
    spare: Mutex<Vec<(Vec<GuestAddress>, Vec<u8>)>>,
    /// Called each time the sender has nothing left to write (a checkpoint or the
    /// initial sync is out) and each time an ack arrives: the device loop may end an
    /// epoch that waited for that.
    on_progress: Mutex<Option<Box<dyn Fn() + Send + Sync>>>,
}

impl Link {
    fn stats(&self) -> MutexGuard<'_, LinkStats> {
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

    fn recycle(&self, mut addrs: Vec<GuestAddress>, mut data: Vec<u8>) {
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

    fn progress(&self) {
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

    /// The secondary is gone: say so loudly, release held output, go on unprotected.
    pub fn lose(&self, why: &str) {
        if self.lost.swap(true, Ordering::SeqCst) {
            return;
        }
        if self.handed_over() {
            // The secondary runs the guest now; closing the link is what it does next.
            return;
        }
        eprintln!(
            "mcvmm: SECONDARY LOST ({why}): held output released; the guest runs UNPROTECTED"
        );
        self.stats().lost = Some(why.to_string());
        self.gate.open();
        // Dropping the channel ends the sender thread.
        self.jobs
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take();
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

/// Connects to the secondary (retrying until `wait` is over: it may be starting) and
/// does the handshake.
pub fn connect(
    peer: &str,
    hello: &Hello,
    wait: Duration,
) -> Result<(TcpStream, Accept), PrimaryError> {
    let started = Instant::now();
    let connect_err = |source| PrimaryError::Connect {
        peer: peer.to_string(),
        source,
    };
    let mut said = false;
    let mut stream = loop {
        let addrs: Vec<_> = peer.to_socket_addrs().map_err(connect_err)?.collect();
        let attempt = addrs
            .first()
            .ok_or_else(|| connect_err(std::io::Error::other("no address")))
            .and_then(|a| {
                TcpStream::connect_timeout(a, Duration::from_secs(2)).map_err(connect_err)
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if started.elapsed() >= wait => return Err(e),
            Err(e) => {
                if !said {
                    eprintln!("mcvmm: waiting for the secondary ({e})");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let hs = |source| PrimaryError::Handshake {
        peer: peer.to_string(),
        source,
    };
    wire::write_frame(&mut stream, Kind::Hello, 0, &[&messages::encode(hello)])
        .map_err(|e| hs(WireError::Io(e)))?;
    // Reading its disks' digests takes the secondary a while.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(connect_err)?;
    let mut payload = Vec::new();
    let h = wire::read_frame(&mut stream, &mut payload).map_err(hs)?;
    match h.kind {
        Kind::Accept => Ok((stream, messages::decode(&h, &payload).map_err(hs)?)),
        Kind::Refuse => Err(PrimaryError::Refused {
            peer: peer.to_string(),
            reason: String::from_utf8_lossy(&payload).into_owned(),
        }),
        kind => Err(PrimaryError::Unexpected {
            peer: peer.to_string(),
            kind,
        }),
    }
}

/// Starts the sender and reader threads on a connection that passed the handshake.
pub fn start(
    stream: TcpStream,
    peer: &str,
    gate: Arc<HeldOutput>,
    timeout: Duration,
    coding: PageCoding,
) -> std::io::Result<Arc<Link>> {
    let (tx, rx) = mpsc::sync_channel(2);
    let link = Arc::new(Link {
        stats: Mutex::new(LinkStats {
            peer: peer.to_string(),
            ..LinkStats::default()
        }),
        lost: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        taken: Mutex::new(Vec::new()),
        handed_over: AtomicBool::new(false),
        gate,
        jobs: Mutex::new(Some(tx)),
        coding,
        spare: Mutex::new(Vec::new()),
        on_progress: Mutex::new(None),
    });
    let mut reader = stream.try_clone()?;
    reader.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_secs(5))))?;
    let l = link.clone();
    std::thread::Builder::new()
        .name("repl-send".into())
        .spawn(move || {
            let mut w = BufWriter::with_capacity(1 << 20, stream);
            if let Err(e) = sender(&l, &rx, &mut w) {
                l.lose(&format!("sending: {e}"));
            }
        })?;
    let l = link.clone();
    std::thread::Builder::new()
        .name("repl-recv".into())
        .spawn(move || {
            let why = acks(&l, &mut reader, timeout);
            l.lose(&why);
        })?;
    Ok(link)
}

fn sender(link: &Link, rx: &Receiver<Job>, w: &mut BufWriter<TcpStream>) -> std::io::Result<()> {
    let mut coder = Coder::new(link.coding);
    loop {
        match rx.recv_timeout(HEARTBEAT) {
            Ok(Job::Sync(mut src)) => {
                coder.fit(src.mem.iter().map(|r| r.len()).sum());
                sync(link, &mut src, w, &mut coder)?;
                link.progress();
            }
            Ok(Job::Epoch(c)) => {
                let r = epoch(link, &c, w, &mut coder);
                link.in_flight.fetch_sub(1, Ordering::SeqCst);
                r?;
                link.recycle(c.addrs, c.data);
                link.progress();
            }
            Ok(Job::Takeover(n)) => {
                let waited = Instant::now();
                while link.acked() < n && !link.is_lost() {
                    if waited.elapsed() > Duration::from_secs(10) {
                        return Err(std::io::Error::other(format!(
                            "no ack of epoch {n} to hand over at"
                        )));
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
                wire::write_frame(w, Kind::Takeover, n, &[])?;
                w.flush()?;
                link.handed_over.store(true, Ordering::SeqCst);
            }
            Err(RecvTimeoutError::Timeout) => {
                wire::write_frame(w, Kind::Heartbeat, 0, &[])?;
                w.flush()?;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// How pages go on the wire.
#[derive(Debug, Clone, Copy)]
pub struct PageCoding {
    /// LZ4 where it saves an eighth or more.
    pub lz4: bool,
    /// Pages sent before are kept (up to this many MiB) so a checkpoint can send a page
    /// as its difference from the version the secondary holds ([`delta`]); 0 for none.
    /// Only with `lz4`.
    pub delta_cache_mib: u64,
}

/// The sender's page encoder and its buffers.
struct Coder {
    coding: PageCoding,
    /// Made at the initial sync, when the guest's size is known.
    sent: Option<SentPages>,
    out: Vec<u8>,
    xor: Vec<u8>,
}

impl Coder {
    fn new(coding: PageCoding) -> Coder {
        Coder {
            coding,
            sent: None,
            out: Vec::new(),
            xor: Vec::new(),
        }
    }

    /// Whether a checkpoint's page at `gpa` is the version last sent. The primary copies
    /// pages it was not told are unchanged (those kept writable by the dirty log, written
    /// or not), and the secondary's image holds exactly what was sent: such a page needs
    /// no bytes at all, as a delta would be all zeros.
    fn unchanged(&self, gpa: u64, page: &[u8]) -> bool {
        self.sent.as_ref().is_some_and(|s| s.unchanged(gpa, page))
    }

    /// Sizes the delta cache for a guest of `ram` bytes: never more than the guest.
    fn fit(&mut self, ram: u64) {
        let c = self.coding;
        let mib = c.delta_cache_mib.min(ram.div_ceil(1 << 20));
        self.sent = (c.lz4 && mib > 0).then(|| SentPages::new(mib));
    }
}

/// Writes a run of pages: as a delta against what the secondary holds if that pays and
/// this is a checkpoint (epoch > 0), else LZ4 if that pays, else raw.
fn page_run(
    w: &mut impl Write,
    epoch: u64,
    gpa: u64,
    data: &[u8],
    c: &mut Coder,
) -> std::io::Result<usize> {
    let count = (data.len() as u64 / PAGE_SIZE) as u32;
    let mut encoding = PageEncoding::Raw;
    if let Some(sent) = c.sent.as_mut() {
        if epoch > 0 && sent.encode(gpa, data, &mut c.xor, &mut c.out) {
            encoding = PageEncoding::Delta;
        }
        sent.put(gpa, data);
    }
    if encoding == PageEncoding::Raw && c.coding.lz4 {
        c.out
            .resize(lz4_flex::block::get_maximum_output_size(data.len()), 0);
        if let Ok(n) = lz4_flex::block::compress_into(data, &mut c.out) {
            if n < data.len() - data.len() / 8 {
                c.out.truncate(n);
                encoding = PageEncoding::Lz4;
            }
        }
    }
    let h = messages::pages_header(gpa, count, encoding);
    let body = if encoding == PageEncoding::Raw {
        data
    } else {
        &c.out
    };
    wire::write_frame(w, Kind::Pages, epoch, &[&h, body])
}

fn sync(
    link: &Link,
    src: &mut SyncSource,
    w: &mut BufWriter<TcpStream>,
    coder: &mut Coder,
) -> std::io::Result<()> {
    let started = Instant::now();
    let ram: u64 = src.mem.iter().map(|r| r.len()).sum();
    let disks: Vec<u64> = src
        .disks
        .iter()
        .map(|f| f.metadata().map(|m| m.len()))
        .collect::<std::io::Result<_>>()?;
    let total = ram + disks.iter().sum::<u64>();
    link.stats().sync_total_bytes = total;
    let mut done = 0u64;
    let mut last_report = Instant::now();
    let mut report = |link: &Link, done: u64, force: bool| {
        let secs = started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let mut s = link.stats();
        s.sync_sent_bytes = done;
        s.sync_percent = 100.0 * done as f64 / total.max(1) as f64;
        s.sync_rate_mib_s = rate / (1 << 20) as f64;
        s.sync_eta_s = (total - done) as f64 / rate.max(1.0);
        if force || last_report.elapsed() >= Duration::from_secs(1) {
            last_report = Instant::now();
            eprintln!(
                "mcvmm: sync {:.0}% ({} of {} MiB, {:.0} MiB/s, ETA {:.1} s)",
                s.sync_percent,
                done >> 20,
                total >> 20,
                s.sync_rate_mib_s,
                s.sync_eta_s
            );
        }
    };
    // RAM: runs of non-zero pages (the secondary's image starts zeroed).
    let batch = MAX_RUN_PAGES as usize * PAGE_SIZE as usize;
    let mut buf = vec![0u8; batch];
    let mut skipped = 0u64;
    // The secondary must hear from us at least every HEARTBEAT: long stretches of zero
    // pages send nothing, and frames that were sent may still sit in the buffer (a
    // mostly-zero guest fills 1 MiB slowly: a secondary once gave up after 500 ms of
    // silence in the middle of a sync that was sending).
    let mut last_flush = Instant::now();
    let mut alive = |w: &mut BufWriter<TcpStream>, sent: bool| -> std::io::Result<()> {
        if link.is_lost() {
            return Err(std::io::Error::other("the secondary is gone"));
        }
        if last_flush.elapsed() >= HEARTBEAT {
            if !sent {
                wire::write_frame(w, Kind::Heartbeat, 0, &[])?;
            }
            w.flush()?;
            last_flush = Instant::now();
        }
        Ok(())
    };
    let mut pagemap = Pagemap::open();
    let mut arm = src.arm.take();
    for region in src.mem.iter() {
        let (start, len) = (region.start_addr().0, region.len());
        let host = region.as_ptr() as *const u8;
        let mut at = 0;
        while at < len {
            let n = (len - at).min(batch as u64) as usize;
            // Armed a span ahead: from then on a write to these pages is in the first
            // checkpoint, and the read below comes after.
            if let Some(arm) = arm.as_mut() {
                arm.before_copy(GuestAddress(start), at, len)
                    .map_err(|e| std::io::Error::other(e.to_string()))?;
            }
            // Memory never touched is zeros, known without faulting it in; a page first
            // written after this look is in the first checkpoint's dirty set.
            if pagemap
                .as_mut()
                .is_some_and(|p| !p.touched(host.wrapping_add(at as usize), n))
            {
                skipped += n as u64;
                alive(w, false)?;
                at += n as u64;
                done += n as u64;
                report(link, done, false);
                continue;
            }
            src.mem
                .read_slice(&mut buf[..n], GuestAddress(start + at))
                .map_err(|e| std::io::Error::other(format!("reading guest memory: {e}")))?;
            let pages: Vec<bool> = buf[..n]
                .chunks_exact(PAGE_SIZE as usize)
                .map(|p| !is_zero(p))
                .collect();
            let mut any = false;
            let mut i = 0;
            while i < pages.len() {
                if !pages[i] {
                    skipped += PAGE_SIZE;
                    i += 1;
                    continue;
                }
                let j = (i..pages.len()).find(|&k| !pages[k]).unwrap_or(pages.len());
                let bytes = &buf[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
                let sent = page_run(w, 0, start + at + i as u64 * PAGE_SIZE, bytes, coder)?;
                link.stats().bytes_sent += sent as u64;
                any = true;
                i = j;
            }
            alive(w, any)?;
            at += n as u64;
            done += n as u64;
            report(link, done, false);
        }
    }
    // Disks: only the chunks whose digest differs from the secondary's.
    let mut chunk = vec![0u8; src.chunk as usize];
    for (d, (file, size)) in src.disks.iter().zip(&disks).enumerate() {
        let theirs = src.theirs.get(d);
        let mut offset = 0u64;
        let mut i = 0;
        while offset < *size {
            let n = (size - offset).min(src.chunk) as usize;
            file.read_exact_at(&mut chunk[..n], offset)?;
            let same = theirs.and_then(|t| t.get(i)) == Some(&digest::of(&chunk[..n]));
            if same {
                skipped += n as u64;
            } else {
                let h = messages::disk_header(d as u32, offset);
                let sent = wire::write_frame(w, Kind::DiskChunk, 0, &[&h, &chunk[..n]])?;
                link.stats().bytes_sent += sent as u64;
            }
            alive(w, !same)?;
            offset += n as u64;
            i += 1;
            done += n as u64;
            report(link, done, false);
        }
    }
    let sent = wire::write_frame(w, Kind::SyncDone, 0, &[])?;
    w.flush()?;
    report(link, done, true);
    let mut s = link.stats();
    s.bytes_sent += sent as u64;
    s.sync_skipped_bytes = skipped;
    s.sync_ms = started.elapsed().as_millis() as u64;
    s.synced = true;
    eprintln!(
        "mcvmm: initial sync done in {} ms ({} MiB on the wire, {} MiB skipped: zero pages and disk chunks the secondary had)",
        s.sync_ms,
        s.bytes_sent >> 20,
        skipped >> 20
    );
    Ok(())
}

fn is_zero(page: &[u8]) -> bool {
    page.chunks_exact(8)
        .all(|w| u64::from_ne_bytes([w[0], w[1], w[2], w[3], w[4], w[5], w[6], w[7]]) == 0)
}

fn epoch(
    link: &Link,
    c: &Capture,
    w: &mut BufWriter<TcpStream>,
    coder: &mut Coder,
) -> std::io::Result<()> {
    let mut wire_bytes = 0;
    for fw in &c.writes {
        let h = messages::disk_header(fw.disk, fw.offset);
        wire_bytes += wire::write_frame(w, Kind::DiskWrite, c.epoch, &[&h, &fw.data])?;
    }
    wire_bytes += wire::write_frame(w, Kind::Begin, c.epoch, &[])?;
    let page = PAGE_SIZE as usize;
    let (mut sent_pages, mut unchanged) = (0, 0);
    for run in staging::runs(&c.addrs, MAX_RUN_PAGES as usize) {
        // The run is sent as the stretches of it that changed: [i, j) up to the next page
        // the secondary holds already (j), which is skipped.
        let mut i = run.start;
        while i < run.end {
            let mut j = i;
            while j < run.end && !coder.unchanged(c.addrs[j].0, &c.data[j * page..][..page]) {
                j += 1;
            }
            if j > i {
                let bytes = &c.data[i * page..j * page];
                wire_bytes += page_run(w, c.epoch, c.addrs[i].0, bytes, coder)?;
                sent_pages += (j - i) as u64;
            }
            unchanged += u64::from(j < run.end);
            i = j + 1;
        }
    }
    wire_bytes += wire::write_frame(w, Kind::State, c.epoch, &[&messages::encode(&c.state)])?;
    let end = End {
        pages: sent_pages,
        disk_writes: c.writes.len() as u64,
        memory_digest: c.memory_digest,
        disk_digests: c.disk_digests.clone(),
    };
    wire_bytes += wire::write_frame(w, Kind::End, c.epoch, &[&messages::encode(&end)])?;
    w.flush()?;
    let mut s = link.stats();
    s.sent_epoch = c.epoch;
    s.bytes_sent += wire_bytes as u64;
    s.last_epoch_wire_bytes = wire_bytes as u64;
    s.last_epoch_page_bytes = c.data.len() as u64;
    s.total_epoch_wire_bytes += wire_bytes as u64;
    s.total_epoch_page_bytes += c.data.len() as u64;
    s.unchanged_pages += unchanged;
    Ok(())
}

/// Reads the secondary's frames until it is gone; returns why.
fn acks(link: &Link, r: &mut impl Read, timeout: Duration) -> String {
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_are_kept_only_while_recording() {
        let w = ForwardedWrites::default();
        assert!(!w.recording());
        w.written(0, 0, vec![1]);
        assert!(w.take().is_empty(), "idle: nothing kept");
        w.record(true);
        w.written(1, 512, vec![2; 512]);
        let taken = w.take();
        assert_eq!(taken.len(), 1);
        assert_eq!((taken[0].disk, taken[0].offset), (1, 512));
        w.written(0, 0, vec![3]);
        w.record(false);
        assert!(w.take().is_empty(), "stopping drops what nobody will send");
        w.written(0, 0, vec![4]);
        assert!(w.take().is_empty());
    }
}
