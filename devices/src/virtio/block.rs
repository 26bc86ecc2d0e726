//! virtio-blk on a raw file. Requests run synchronously on the device loop.
//!
//! Every request is checked before any byte moves: a header in a readable descriptor,
//! data in descriptors of the right direction, a status byte in a writable one, sectors
//! inside the disk, guest addresses inside guest memory. A bad request fails alone
//! (status IOERR, or nothing if there is no place for the status); the VMM goes on.

use std::fs::File;
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::sync::Arc;

use mcvmm_checkpoint::persist::Persist;
use mcvmm_checkpoint::seams::DiskWriteSink;
use serde::{Deserialize, Serialize};

use virtio_queue::{Queue, QueueT};
use vm_memory::bitmap::Bitmap;
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend};

use super::{chain, DeviceError, VirtioDevice, TYPE_BLOCK};
use crate::interrupt::{Interrupt, INT_USED_RING};
use crate::GuestMemory;

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
// Chains are walked in a table of at most this many descriptors.
const _: () = assert!(QUEUE_SIZE as usize <= chain::MAX_QUEUE_SIZE);

const F_SEG_MAX: u64 = 1 << 2;
const F_RO: u64 = 1 << 5;
const F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

const ID_LEN: usize = 20;
const SEG_MAX: u32 = 128;
/// The most data one request may move. Linux sends at most its `max_sectors_kb` (1280 KiB
/// by default); the bound is what a replicated write may make the device loop allocate
/// (its data is copied out of guest memory once), and keeps the used length in a u32.
const MAX_REQUEST_BYTES: u64 = 128 << 20;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct BlockStats {
    pub reads: u64,
    pub writes: u64,
    pub flushes: u64,
    pub read_bytes: u64,
    pub write_bytes: u64,
    pub errors: u64,
}

/// iovecs handed to one `preadv`/`pwritev` at most (the kernel's `UIO_MAXIOV`).
const MAX_IOVECS: usize = 1024;

/// Moves a request's data between the file at `offset` and the guest buffers of `data`,
/// straight (one copy), with one `preadv`/`pwritev` for the whole request unless the
/// kernel does only part of it: a syscall per descriptor cost a 512 KiB request 128 of
/// them. The guest pages a read fills are marked in the bitmap, also when it fails part
/// way (they may have been written).
fn transfer(
    file: &File,
    data: &[(GuestAddress, u32, bool)],
    offset: u64,
    read: bool,
    mem: &GuestMemory,
) -> std::io::Result<()> {
    let mut slices = Vec::with_capacity(data.len());
    for &(addr, len, _) in data {
        for slice in mem.get_slices(addr, len as usize) {
            slices.push(slice.map_err(|e| std::io::Error::other(e.to_string()))?);
        }
    }
    // The guards keep each slice's pointer valid until the syscalls are done.
    let guards: Vec<_> = slices.iter().map(|s| s.ptr_guard_mut()).collect();
    let mut iov: Vec<libc::iovec> = guards
        .iter()
        .map(|g| libc::iovec {
            iov_base: g.as_ptr().cast(),
            iov_len: g.len(),
        })
        .collect();
    let moved = move_all(file, &mut iov, offset, read);
    if read {
        for s in &slices {
            s.bitmap().mark_dirty(0, s.len());
        }
    }
    moved
}

/// `preadv`/`pwritev` until every iovec is done, resuming after a short transfer.
fn move_all(
    file: &File,
    iov: &mut [libc::iovec],
    mut offset: u64,
    read: bool,
) -> std::io::Result<()> {
    let mut first = 0;
    while first < iov.len() {
        if iov[first].iov_len == 0 {
            first += 1;
            continue;
        }
        let end = (first + MAX_IOVECS).min(iov.len());
        let pos = libc::off_t::try_from(offset).map_err(std::io::Error::other)?;
        let batch = &iov[first..end];
        // SAFETY: every iovec points into guest memory that a live guard keeps mapped, for
        // its length; the fd is open. A guest may touch its buffers meanwhile: that changes
        // the bytes moved, never memory outside them.
        let n = unsafe {
            if read {
                libc::preadv(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
            } else {
                libc::pwritev(file.as_raw_fd(), batch.as_ptr(), batch.len() as i32, pos)
            }
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        let mut n = n as usize;
        offset += n as u64;
        while n > 0 {
            let v = &mut iov[first];
            if n >= v.iov_len {
                n -= v.iov_len;
                first += 1;
            } else {
                v.iov_base = v.iov_base.cast::<u8>().wrapping_add(n).cast();
                v.iov_len -= n;
                n = 0;
            }
        }
    }
    Ok(())
}

pub struct Block {
    file: File,
    path: String,
    sectors: u64,
    read_only: bool,
    id: [u8; ID_LEN],
    stats: BlockStats,
    /// Replication: this disk's index and where its writes are forwarded.
    sink: Option<(usize, Arc<dyn DiskWriteSink>)>,
}

impl Block {
    /// `file` must be open for reading (and writing unless `read_only`).
    pub fn new(file: File, path: String, read_only: bool, id: &str) -> std::io::Result<Block> {
        let len = file.metadata()?.len();
        let mut id_bytes = [0u8; ID_LEN];
        for (d, s) in id_bytes.iter_mut().zip(id.bytes()) {
            *d = s;
        }
        Ok(Block {
            file,
            path,
            sectors: len / SECTOR_SIZE,
            read_only,
            id: id_bytes,
            stats: BlockStats::default(),
            sink: None,
        })
    }

    /// Forwards every completed write of this disk (index `disk`) to `sink`.
    pub fn forward_writes(&mut self, disk: usize, sink: Arc<dyn DiskWriteSink>) {
        self.sink = Some((disk, sink));
    }

    /// A replicated write: the data is read out of guest memory once, and the same bytes
    /// go to the file and to the sink, so a guest that changes its buffer meanwhile cannot
    /// make the two copies differ.
    fn write_forwarded(
        &self,
        data: &[(GuestAddress, u32, bool)],
        start: u64,
        total: u64,
        mem: &GuestMemory,
    ) -> bool {
        let Some((disk, sink)) = &self.sink else {
            return false;
        };
        let mut buf = vec![0u8; total as usize];
        let mut at = 0;
        for &(addr, len, _) in data {
            let end = at + len as usize;
            if mem.read_slice(&mut buf[at..end], addr).is_err() {
                return false;
            }
            at = end;
        }
        if self.file.write_all_at(&buf, start).is_err() {
            return false;
        }
        sink.written(*disk, start, buf);
        true
    }

    pub fn path(&self) -> &str {
        &self.path
    }

    pub fn size_bytes(&self) -> u64 {
        self.sectors * SECTOR_SIZE
    }

    /// Executes one request; returns (bytes written into guest memory, status address).
    fn execute(
        &mut self,
        descs: &[(GuestAddress, u32, bool)],
        mem: &GuestMemory,
    ) -> (u32, Option<GuestAddress>, u8) {
        let Some(&(status_addr, status_len, status_w)) = descs.last() else {
            return (0, None, S_IOERR);
        };
        if descs.len() < 2 || !status_w || status_len < 1 {
            return (0, None, S_IOERR);
        }
        let status_at = status_addr.checked_add(u64::from(status_len) - 1);
        let (hdr_addr, hdr_len, hdr_w) = descs[0];
        if hdr_w || hdr_len < 16 {
            return (0, status_at, S_IOERR);
        }
        let mut hdr = [0u8; 16];
        if mem.read_slice(&mut hdr, hdr_addr).is_err() {
            return (0, status_at, S_IOERR);
        }
        let rtype = u32::from_le_bytes([hdr[0], hdr[1], hdr[2], hdr[3]]);
        let sector = u64::from_le_bytes([
            hdr[8], hdr[9], hdr[10], hdr[11], hdr[12], hdr[13], hdr[14], hdr[15],
        ]);
        let data = &descs[1..descs.len() - 1];
        match rtype {
            T_IN | T_OUT => {
                let (used, status) = self.read_write(rtype == T_IN, sector, data, mem);
                (used, status_at, status)
            }
            T_FLUSH => {
                self.stats.flushes += 1;
                match self.file.sync_data() {
                    Ok(()) => (1, status_at, S_OK),
                    Err(_) => (1, status_at, S_IOERR),
                }
            }
            T_GET_ID => {
                let Some(&(addr, len, true)) = data.first() else {
                    return (0, status_at, S_IOERR);
                };
                let n = (len as usize).min(ID_LEN);
                if mem.write_slice(&self.id[..n], addr).is_err() {
                    return (0, status_at, S_IOERR);
                }
                (n as u32 + 1, status_at, S_OK)
            }
            _ => (1, status_at, S_UNSUPP),
        }
    }

    /// A read (`read`) or a write of `data` at `sector`: the bytes the device wrote into
    /// the chain (the status byte included) and the status.
    fn read_write(
        &mut self,
        read: bool,
        sector: u64,
        data: &[(GuestAddress, u32, bool)],
        mem: &GuestMemory,
    ) -> (u32, u8) {
        // A read's buffers are all device-writable, a write's none.
        if data.iter().any(|d| d.2 != read) {
            return (0, S_IOERR);
        }
        if !read && self.read_only {
            return (0, S_IOERR);
        }
        let total: u64 = data.iter().map(|d| u64::from(d.1)).sum();
        let start = sector.checked_mul(SECTOR_SIZE);
        let in_range = start
            .and_then(|s| s.checked_add(total))
            .is_some_and(|end| end <= self.size_bytes());
        if !in_range || !total.is_multiple_of(SECTOR_SIZE) || total > MAX_REQUEST_BYTES {
            return (0, S_IOERR);
        }
        let start = start.unwrap_or(0);
        // A sink that is not recording (a guest not protected now) gets nothing:
        // the write goes the direct way.
        let forwarding = self.sink.as_ref().is_some_and(|(_, s)| s.recording());
        if !read && forwarding {
            if !self.write_forwarded(data, start, total, mem) {
                return (0, S_IOERR);
            }
            self.stats.writes += 1;
            self.stats.write_bytes += total;
            return (1, S_OK);
        }
        if transfer(&self.file, data, start, read, mem).is_err() {
            return (0, S_IOERR);
        }
        if read {
            self.stats.reads += 1;
            self.stats.read_bytes += total;
            ((total as u32).saturating_add(1), S_OK)
        } else {
            self.stats.writes += 1;
            self.stats.write_bytes += total;
            (1, S_OK)
        }
    }
}

/// virtio-blk keeps no state of its own between requests: the queues are the
/// transport's, the disk's contents travel apart from the device's state (in a
/// snapshot's disk files, or as forwarded writes), and its size and identity are
/// configuration, checked against the checkpoint's [`mcvmm_checkpoint::state::VmShape`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct BlockState {}

impl Persist for Block {
    type State = BlockState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&mut self) -> Result<BlockState, Self::Error> {
        Ok(BlockState {})
    }

    fn restore(&mut self, _: &BlockState) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        F_FLUSH | F_SEG_MAX | if self.read_only { F_RO } else { 0 }
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // capacity (u64, sectors), size_max (u32, unused), seg_max (u32)
        let mut config = [0u8; 16];
        config[..8].copy_from_slice(&self.sectors.to_le_bytes());
        config[12..16].copy_from_slice(&SEG_MAX.to_le_bytes());
        super::copy_config(&config, offset, data);
    }

    fn activate(&mut self, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let queue = &mut queues[index];
        let table_at = GuestAddress(queue.desc_table());
        let mut table = vec![0u8; usize::from(queue.size()) * chain::DESC_SIZE];
        let used_any = super::drain_queue(queue, mem, |chain| {
            // The table was inside guest memory when the driver made the queue ready
            // (the transport checks); a table that is not gives no chain, so no status.
            let (descs, broken) = match mem.read_slice(&mut table, table_at) {
                Ok(()) => chain::from_table(&table, chain.head_index(), SEG_MAX as usize + 3),
                Err(_) => (Vec::new(), true),
            };
            let (len, status_at, status) = if broken || descs.len() > SEG_MAX as usize + 2 {
                // A broken or over-long chain is refused whole. The status goes to the
                // last byte of the last descriptor kept, if the device may write it: for
                // a loop, the descriptor before the loop closes, where a driver put its
                // status; for other breaks, a buffer of the guest's own.
                let last = descs.last().copied();
                let at = last
                    .filter(|d| d.2 && d.1 > 0)
                    .and_then(|d| d.0.checked_add(u64::from(d.1) - 1));
                (0, at, S_IOERR)
            } else {
                self.execute(&descs, mem)
            };
            if status != S_OK {
                self.stats.errors += 1;
            }
            if let Some(at) = status_at {
                // Outside guest memory: nowhere to report; the request still completes.
                let _ = mem.write_obj(status, at);
            }
            len
        })?;
        if used_any && queue.needs_notification(mem)? {
            interrupt.trigger(INT_USED_RING);
        }
        Ok(())
    }

    fn reset(&mut self) {}

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "path": self.path,
            "size_bytes": self.size_bytes(),
            "read_only": self.read_only,
            "io": self.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingLine;
    use mcvmm_checkpoint::persist::Part;
    use std::sync::mpsc;
    use std::time::Duration;

    /// A queue of 16 at fixed places in 64 KiB of guest memory, ready.
    fn queue(mem: &GuestMemory) -> Queue {
        let mut q = Queue::new(16).expect("queue");
        q.set_desc_table_address(Some(0x0), Some(0));
        q.set_avail_ring_address(Some(0x1000), Some(0));
        q.set_used_ring_address(Some(0x2000), Some(0));
        q.set_ready(true);
        assert!(q.is_valid(mem));
        q
    }

    /// Writes descriptor `i` of the table at 0x0: (addr, len, flags, next).
    fn desc(mem: &GuestMemory, i: u16, addr: u64, len: u32, flags: u16, next: u16) {
        let at = GuestAddress(u64::from(i) * 16);
        mem.write_obj(addr, at).expect("addr");
        mem.write_obj(len, at.unchecked_add(8)).expect("len");
        mem.write_obj(flags, at.unchecked_add(12)).expect("flags");
        mem.write_obj(next, at.unchecked_add(14)).expect("next");
    }

    const NEXT: u16 = 1;
    const WRITE: u16 = 2;

    /// A disk of `len` bytes, sector 0 filled with 0xab.
    fn disk(len: u64) -> Block {
        let file = tempfile::tempfile().expect("disk");
        file.set_len(len).expect("disk size");
        file.write_all_at(&[0xab; 512], 0).expect("sector 0");
        Block::new(file, "disk".into(), false, "d").expect("block")
    }

    /// Makes the chains at `heads` available and lets the device take them.
    fn serve(mem: &GuestMemory, block: &mut Block, heads: &[u16]) {
        for (slot, head) in heads.iter().enumerate() {
            mem.write_obj(*head, GuestAddress(0x1004 + 2 * slot as u64))
                .expect("avail ring");
        }
        mem.write_obj(heads.len() as u16, GuestAddress(0x1002))
            .expect("avail idx");
        let interrupt = Interrupt::new(5, Arc::new(CountingLine::default()));
        let mut queues = [queue(mem)];
        block
            .process_queue(0, &mut queues, mem, &interrupt)
            .expect("the queue goes on");
    }

    #[test]
    fn a_chain_that_comes_back_to_itself_fails_alone() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let mut block = disk(1 << 20);
        // Request 1 (head 0): header, two data buffers, status, then back to the first
        // data buffer. A loop of three: a chain cut by a length limit rather than seen
        // to close would end on another descriptor than the status one.
        mem.write_obj(0u32, GuestAddress(0x4000)).expect("type in");
        desc(&mem, 0, 0x4000, 16, NEXT, 1);
        desc(&mem, 1, 0x5000, 512, NEXT | WRITE, 2);
        desc(&mem, 2, 0x5200, 512, NEXT | WRITE, 3);
        desc(&mem, 3, 0x6000, 1, NEXT | WRITE, 1);
        // Request 2 (head 4): the same read, well formed.
        desc(&mem, 4, 0x4000, 16, NEXT, 5);
        desc(&mem, 5, 0x7000, 512, NEXT | WRITE, 6);
        desc(&mem, 6, 0x6010, 1, WRITE, 0);
        mem.write_obj(0xffu8, GuestAddress(0x6000))
            .expect("status 1");
        mem.write_obj(0xffu8, GuestAddress(0x6010))
            .expect("status 2");
        serve(&mem, &mut block, &[0, 4]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).ok(), Some(S_IOERR));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6010)).ok(), Some(S_OK));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x7000)).ok(), Some(0xab));
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x5000)).ok(), Some(0));
        assert_eq!(block.stats.errors, 1);
    }

    #[test]
    fn a_request_over_the_size_limit_fails_before_anything_moves() {
        // Buffers that are all valid guest memory, so only the limit can refuse them.
        let mem =
            GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000 + (64 << 20))]).expect("memory");
        let mut block = disk(1 << 30);
        // A read of 128 MiB and one sector, into buffers that overlap (as a hostile
        // driver may make them): inside the disk, over the limit.
        mem.write_obj(0u32, GuestAddress(0x4000)).expect("type in");
        desc(&mem, 0, 0x4000, 16, NEXT, 1);
        desc(&mem, 1, 0x10000, 64 << 20, NEXT | WRITE, 2);
        desc(&mem, 2, 0x10000, 64 << 20, NEXT | WRITE, 3);
        desc(&mem, 3, 0x10000, 512, NEXT | WRITE, 4);
        desc(&mem, 4, 0x6000, 1, WRITE, 0);
        serve(&mem, &mut block, &[0]);
        assert_eq!(mem.read_obj::<u8>(GuestAddress(0x6000)).ok(), Some(S_IOERR));
        assert_eq!(block.stats.read_bytes, 0);
    }

    #[test]
    fn an_avail_index_that_runs_ahead_of_the_ring_does_not_spin_the_device_loop() {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 0x10000)]).expect("memory");
        let file = tempfile::tempfile().expect("disk");
        file.set_len(1 << 20).expect("disk size");
        let mut block = Block::new(file, "disk".into(), false, "d").expect("block");
        let interrupt = Interrupt::new(5, Arc::new(CountingLine::default()));
        // More buffers than the ring holds: the queue refuses to walk it, and "more has
        // been added" stays true however often it is asked.
        mem.write_obj(100u16, GuestAddress(0x1002))
            .expect("avail idx");
        let (done, finished) = mpsc::channel();
        std::thread::spawn(move || {
            let mut queues = [queue(&mem)];
            let r = block.process_queue(0, &mut queues, &mem, &interrupt);
            let _ = done.send(r.is_ok());
        });
        assert!(
            finished.recv_timeout(Duration::from_secs(10)).is_ok(),
            "the device loop is still going round the broken queue"
        );
    }

    #[test]
    fn state_restores_into_a_fresh_disk_device() {
        let part = disk(4096).save_as("virtio-blk").expect("save");
        let mut fresh = disk(4096);
        fresh.restore_from("virtio-blk", &part).expect("restore");
        assert_eq!(fresh.save_as("virtio-blk").expect("save again"), part);
        let mut newer = part;
        newer.version += 1;
        assert!(fresh.restore_from("virtio-blk", &newer).is_err());
    }
}
