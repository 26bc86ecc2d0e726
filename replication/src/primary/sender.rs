//! The sender thread: the initial sync, then each checkpoint as the device loop hands it
//! over, heartbeats when idle, and the takeover of a planned switch.

use std::io::{BufWriter, Write};
use std::net::TcpStream;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, RecvTimeoutError};
use std::time::{Duration, Instant};

use mcvmm_checkpoint::resident::Pagemap;
use mcvmm_checkpoint::{digest, staging, PAGE_SIZE};
use vm_memory::{Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::coding::{page_run, Coder};
use super::link::{Job, Link};
use super::{Capture, SyncSource, HEARTBEAT};
use crate::messages::{self, End, Goodbye, MAX_RUN_PAGES};
use crate::wire::{self, Kind};

pub(super) fn sender(
    link: &Link,
    rx: &Receiver<Job>,
    w: &mut BufWriter<TcpStream>,
) -> std::io::Result<()> {
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
            Ok(Job::Goodbye(why)) => {
                wire::write_frame(w, Kind::Goodbye, 0, &[&messages::encode(&Goodbye { why })])?;
                w.flush()?;
                w.get_ref().shutdown(std::net::Shutdown::Write)?;
                link.goodbye_said(why);
                return Ok(());
            }
            Err(RecvTimeoutError::Timeout) => {
                wire::write_frame(w, Kind::Heartbeat, 0, &[])?;
                w.flush()?;
            }
            Err(RecvTimeoutError::Disconnected) => return Ok(()),
        }
    }
}

/// The initial sync: all of RAM that is not zeros, then the disk chunks whose digest
/// differs from the secondary's, then `SyncDone`.
fn sync(
    link: &Link,
    src: &mut SyncSource,
    w: &mut BufWriter<TcpStream>,
    coder: &mut Coder,
) -> std::io::Result<()> {
    let ram: u64 = src.mem.iter().map(|r| r.len()).sum();
    let disks: Vec<u64> = src
        .disks
        .iter()
        .map(|f| f.metadata().map(|m| m.len()))
        .collect::<std::io::Result<_>>()?;
    let total = ram + disks.iter().sum::<u64>();
    link.stats().sync_total_bytes = total;
    let mut progress = SyncProgress::new(link, total);
    send_ram(src, w, coder, &mut progress)?;
    send_disks(src, &disks, w, &mut progress)?;
    let sent = wire::write_frame(w, Kind::SyncDone, 0, &[])?;
    w.flush()?;
    progress.report(true);
    let mut s = link.stats();
    s.bytes_sent += sent as u64;
    s.sync_skipped_bytes = progress.skipped;
    s.sync_ms = progress.started.elapsed().as_millis() as u64;
    s.synced = true;
    tracing::info!(
        "initial sync done in {} ms ({} MiB on the wire, {} MiB skipped: zero pages and disk chunks the secondary had)",
        s.sync_ms,
        s.bytes_sent >> 20,
        progress.skipped >> 20
    );
    Ok(())
}

/// How far the sync is: the link's counters for `status`, a log line a second, and the
/// heartbeat the secondary must hear at least every [`HEARTBEAT`].
struct SyncProgress<'a> {
    link: &'a Link,
    started: Instant,
    total: u64,
    done: u64,
    skipped: u64,
    last_report: Instant,
    last_flush: Instant,
}

impl<'a> SyncProgress<'a> {
    fn new(link: &'a Link, total: u64) -> SyncProgress<'a> {
        let now = Instant::now();
        SyncProgress {
            link,
            started: now,
            total,
            done: 0,
            skipped: 0,
            last_report: now,
            last_flush: now,
        }
    }

    /// `n` more bytes of RAM or disk gone through; `sent`: a frame was written for them.
    fn advance(&mut self, w: &mut BufWriter<TcpStream>, n: u64, sent: bool) -> std::io::Result<()> {
        self.alive(w, sent)?;
        self.done += n;
        self.report(false);
        Ok(())
    }

    /// Long stretches of zero pages send nothing, and frames that were sent may still sit
    /// in the buffer (a mostly-zero guest fills 1 MiB slowly): a heartbeat, or a flush,
    /// keeps the secondary from taking the silence for a lost primary.
    fn alive(&mut self, w: &mut BufWriter<TcpStream>, sent: bool) -> std::io::Result<()> {
        if self.link.is_lost() {
            return Err(std::io::Error::other("the secondary is gone"));
        }
        if self.last_flush.elapsed() >= HEARTBEAT {
            if !sent {
                wire::write_frame(w, Kind::Heartbeat, 0, &[])?;
            }
            w.flush()?;
            self.last_flush = Instant::now();
        }
        Ok(())
    }

    fn report(&mut self, force: bool) {
        let (done, total) = (self.done, self.total);
        let secs = self.started.elapsed().as_secs_f64().max(1e-3);
        let rate = done as f64 / secs;
        let mut s = self.link.stats();
        s.sync_sent_bytes = done;
        s.sync_percent = 100.0 * done as f64 / total.max(1) as f64;
        s.sync_rate_mib_s = rate / (1 << 20) as f64;
        s.sync_eta_s = (total - done) as f64 / rate.max(1.0);
        if force || self.last_report.elapsed() >= Duration::from_secs(1) {
            self.last_report = Instant::now();
            tracing::info!(
                "sync {:.0}% ({} of {} MiB, {:.0} MiB/s, ETA {:.1} s)",
                s.sync_percent,
                done >> 20,
                total >> 20,
                s.sync_rate_mib_s,
                s.sync_eta_s
            );
        }
    }
}

/// RAM: runs of non-zero pages (the secondary's image starts zeroed).
fn send_ram(
    src: &mut SyncSource,
    w: &mut BufWriter<TcpStream>,
    coder: &mut Coder,
    progress: &mut SyncProgress,
) -> std::io::Result<()> {
    let batch = MAX_RUN_PAGES as usize * PAGE_SIZE as usize;
    let mut buf = vec![0u8; batch];
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
                progress.skipped += n as u64;
                progress.advance(w, n as u64, false)?;
                at += n as u64;
                continue;
            }
            src.mem
                .read_slice(&mut buf[..n], GuestAddress(start + at))
                .map_err(|e| std::io::Error::other(format!("reading guest memory: {e}")))?;
            let any = send_runs(&buf[..n], start + at, w, coder, progress)?;
            progress.advance(w, n as u64, any)?;
            at += n as u64;
        }
    }
    Ok(())
}

/// The non-zero pages of `buf` (guest memory from `gpa`) as runs; whether any was sent.
fn send_runs(
    buf: &[u8],
    gpa: u64,
    w: &mut BufWriter<TcpStream>,
    coder: &mut Coder,
    progress: &mut SyncProgress,
) -> std::io::Result<bool> {
    let pages: Vec<bool> = buf
        .chunks_exact(PAGE_SIZE as usize)
        .map(|p| !is_zero(p))
        .collect();
    let mut any = false;
    let mut i = 0;
    while i < pages.len() {
        if !pages[i] {
            progress.skipped += PAGE_SIZE;
            i += 1;
            continue;
        }
        let j = (i..pages.len()).find(|&k| !pages[k]).unwrap_or(pages.len());
        let bytes = &buf[i * PAGE_SIZE as usize..j * PAGE_SIZE as usize];
        let sent = page_run(w, 0, gpa + i as u64 * PAGE_SIZE, bytes, coder)?;
        progress.link.stats().bytes_sent += sent as u64;
        any = true;
        i = j;
    }
    Ok(any)
}

/// Disks: only the chunks whose digest differs from the secondary's.
fn send_disks(
    src: &SyncSource,
    sizes: &[u64],
    w: &mut BufWriter<TcpStream>,
    progress: &mut SyncProgress,
) -> std::io::Result<()> {
    let mut chunk = vec![0u8; src.chunk as usize];
    for (d, (file, size)) in src.disks.iter().zip(sizes).enumerate() {
        let theirs = src.theirs.get(d);
        let mut offset = 0u64;
        let mut i = 0;
        while offset < *size {
            let n = (size - offset).min(src.chunk) as usize;
            file.read_exact_at(&mut chunk[..n], offset)?;
            let same = theirs.and_then(|t| t.get(i)) == Some(&digest::of(&chunk[..n]));
            if same {
                progress.skipped += n as u64;
            } else {
                let h = messages::disk_header(d as u32, offset);
                let sent = wire::write_frame(w, Kind::DiskChunk, 0, &[&h, &chunk[..n]])?;
                progress.link.stats().bytes_sent += sent as u64;
            }
            progress.advance(w, n as u64, !same)?;
            offset += n as u64;
            i += 1;
        }
    }
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
