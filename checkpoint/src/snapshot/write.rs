//! Writing snapshots: a full one copied while the guest runs and patched at the pause, or
//! an incremental one written at the pause.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{
    create_dir, io, memory_digest, regions, write_manifest, write_state, Kind, Manifest,
    SnapshotError, MEMORY, PAGES,
};
use crate::digest::{self, Digest, CHUNK};
use crate::dirty::{DirtySet, LogArm};
use crate::resident::Pagemap;
use crate::state::{MachineState, VmShape, FORMAT_VERSION};
use crate::{GuestMemory, PAGE_SIZE};

/// Where a RAM region lies in the memory file.
struct RegionAt {
    start: GuestAddress,
    len: u64,
    offset: u64,
    /// Index of its first chunk in [`FullSnapshot::chunks`].
    first_chunk: usize,
}

/// A full snapshot being written. Memory is copied while the guest runs (`begin_full`,
/// with dirty tracking already on), the pages written meanwhile are copied again at the
/// pause (`patch`), and the files are checked and sealed after the guest runs again
/// (`seal`). The pause holds only the re-copy and the state capture.
pub struct FullSnapshot {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    layout: Vec<RegionAt>,
    /// (offset in the file, length) of each chunk.
    spans: Vec<(u64, usize)>,
    /// The digest of each chunk as it was written.
    chunks: Vec<u64>,
    /// Chunks `patch` wrote into since: their digest is taken again from the file.
    stale: Vec<bool>,
    bytes: u64,
    buf: Vec<u8>,
}

/// Starts a full snapshot in `dir`: copies all of guest memory into it, taking each
/// chunk's digest on the way. The guest may run; what it writes meanwhile must be in the
/// dirty set given to `patch`. `arm`: the tracker started with every page dirty, and
/// each 32 MiB span is armed just before its first chunk is copied.
pub fn begin_full(
    dir: &Path,
    mem: &GuestMemory,
    mut arm: Option<&mut LogArm>,
) -> Result<FullSnapshot, SnapshotError> {
    create_dir(dir)?;
    let path = dir.join(MEMORY);
    // Read as well: `seal` takes the digest of patched chunks from the file.
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(true)
        .open(&path)
        .map_err(io(&path))?;
    let mut buf = vec![0u8; CHUNK];
    let (mut layout, mut spans, mut chunks) = (Vec::new(), Vec::new(), Vec::new());
    let mut pagemap = Pagemap::open();
    let mut zeros = digest::Zeros::default();
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr(), region.len());
        layout.push(RegionAt {
            start,
            len,
            offset,
            first_chunk: chunks.len(),
        });
        let host = region.as_ptr() as *const u8;
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(CHUNK as u64) as usize;
            spans.push((offset + done, n));
            // A log that started with every page dirty is armed a span ahead of the copy:
            // a write from then on is in the next dirty set, and the copy is later.
            if let Some(arm) = arm.as_deref_mut() {
                arm.before_copy(start, done, len)?;
            }
            // Memory never touched is zeros: a hole, without faulting it in to look. A
            // page the guest first writes after this look is in the dirty set.
            let at = host.wrapping_add(done as usize);
            if pagemap.as_mut().is_some_and(|p| !p.touched(at, n)) {
                chunks.push(zeros.digest(n));
                done += n as u64;
                continue;
            }
            let data = &mut buf[..n];
            // A volatile copy: the guest may be writing these pages right now. The digest
            // is of the copy, which is what goes into the file.
            mem.read_slice(data, start.unchecked_add(done))
                .map_err(|e| io(&path)(std::io::Error::other(e.to_string())))?;
            chunks.push(digest::of(data));
            // Pages of zeros stay holes in the file: most of a fresh guest's memory.
            for (i, run) in nonzero_runs(data) {
                file.write_all_at(run, offset + done + i as u64)
                    .map_err(io(&path))?;
            }
            done += n as u64;
        }
        offset += len;
    }
    file.set_len(offset).map_err(io(&path))?;
    Ok(FullSnapshot {
        dir: dir.to_path_buf(),
        path,
        file,
        layout,
        stale: vec![false; chunks.len()],
        spans,
        chunks,
        bytes: offset,
        buf,
    })
}

/// The runs of pages in `buf` that are not all zeros, as (offset, bytes).
fn nonzero_runs(buf: &[u8]) -> Vec<(usize, &[u8])> {
    let page = PAGE_SIZE as usize;
    let mut runs = Vec::new();
    let mut run_start: Option<usize> = None;
    for (i, p) in buf.chunks(page).enumerate() {
        let zero = p.iter().all(|&b| b == 0);
        match (zero, run_start) {
            (false, None) => run_start = Some(i * page),
            (true, Some(s)) => {
                runs.push((s, &buf[s..i * page]));
                run_start = None;
            }
            _ => {}
        }
    }
    if let Some(s) = run_start {
        runs.push((s, &buf[s..]));
    }
    runs
}

impl FullSnapshot {
    /// Copies the pages of `dirty` again. At the pause (vCPUs paused) this makes the file
    /// the memory of that instant; before it, while the guest runs, a page written again
    /// after its copy must be in a later dirty set. Returns how many.
    pub fn patch(&mut self, dirty: &DirtySet, mem: &GuestMemory) -> Result<u64, SnapshotError> {
        let mut pages = 0;
        for (at, n) in dirty.runs() {
            let bytes = n * PAGE_SIZE;
            let bad = || SnapshotError::BadPage {
                path: self.path.display().to_string(),
                addr: at.0,
            };
            let (r, rel) = self
                .layout
                .iter()
                .find_map(|r| {
                    let rel = at.0.checked_sub(r.start.0)?;
                    (rel + bytes <= r.len).then_some((r, rel))
                })
                .ok_or_else(bad)?;
            // A long run goes a chunk at a time: the buffer stays small.
            let mut done = 0;
            while done < bytes {
                let piece = (bytes - done).min(CHUNK as u64);
                self.buf.resize(piece as usize, 0);
                mem.read_slice(&mut self.buf, at.unchecked_add(done))
                    .map_err(|e| io(&self.path)(std::io::Error::other(e.to_string())))?;
                self.file
                    .write_all_at(&self.buf, r.offset + rel + done)
                    .map_err(io(&self.path))?;
                done += piece;
            }
            let first = r.first_chunk + (rel / CHUNK as u64) as usize;
            let last = r.first_chunk + ((rel + bytes - 1) / CHUNK as u64) as usize;
            self.stale[first..=last].fill(true);
            pages += n;
        }
        Ok(pages)
    }

    /// Makes the snapshot durable and whole: syncs, takes again the digest of the chunks
    /// patched at the pause (the checksum of the memory file, and the memory digest at the
    /// pause), writes the state, then the manifest.
    pub fn seal(
        mut self,
        state: &MachineState,
        shape: &VmShape,
    ) -> Result<Manifest, SnapshotError> {
        self.file.sync_all().map_err(io(&self.path))?;
        for (i, &(offset, len)) in self.spans.iter().enumerate() {
            if self.stale[i] {
                self.buf.resize(len, 0);
                self.file
                    .read_exact_at(&mut self.buf, offset)
                    .map_err(io(&self.path))?;
                self.chunks[i] = digest::of(&self.buf);
            }
        }
        let checksum = digest::of_chunks(self.chunks.iter().copied());
        let (state_bytes, state_checksum) = write_state(&self.dir, state)?;
        let m = Manifest {
            format_version: FORMAT_VERSION,
            kind: Kind::Full,
            parent: None,
            shape: shape.clone(),
            data_file: MEMORY.into(),
            data_bytes: self.bytes,
            data_checksum: checksum,
            state_bytes,
            state_checksum,
            memory_digest: checksum,
            pages: self.bytes / PAGE_SIZE,
        };
        write_manifest(&self.dir, &m)?;
        Ok(m)
    }
}

/// Writes an incremental snapshot into `dir`: the pages of `dirty` (written since the
/// snapshot in `parent`) and the whole state. The vCPUs must be paused.
pub fn write_incremental(
    dir: &Path,
    parent: &Path,
    dirty: &DirtySet,
    mem: &GuestMemory,
    state: &MachineState,
    shape: &VmShape,
) -> Result<Manifest, SnapshotError> {
    create_dir(dir)?;
    let parent = std::fs::canonicalize(parent).map_err(io(parent))?;
    let path = dir.join(PAGES);
    let mut out = BufWriter::with_capacity(1 << 20, File::create(&path).map_err(io(&path))?);
    let mut d = Digest::default();
    let mut pages = 0u64;
    // SAFETY: the caller has the vCPUs paused and is the device loop.
    let regions = unsafe { regions(mem) };
    for at in dirty.addresses() {
        let Some(page) = regions.iter().find_map(|(start, bytes)| {
            let off = at.0.checked_sub(start.0)? as usize;
            bytes.get(off..off + PAGE_SIZE as usize)
        }) else {
            return Err(SnapshotError::BadPage {
                path: path.display().to_string(),
                addr: at.0,
            });
        };
        let addr = at.0.to_le_bytes();
        d.update(&addr);
        d.update(page);
        out.write_all(&addr).map_err(io(&path))?;
        out.write_all(page).map_err(io(&path))?;
        pages += 1;
    }
    let file = out.into_inner().map_err(|e| io(&path)(e.into_error()))?;
    file.sync_all().map_err(io(&path))?;
    let (state_bytes, state_checksum) = write_state(dir, state)?;
    let m = Manifest {
        format_version: FORMAT_VERSION,
        kind: Kind::Incremental,
        parent: Some(parent),
        shape: shape.clone(),
        data_file: PAGES.into(),
        data_bytes: pages * (8 + PAGE_SIZE),
        data_checksum: d.finish(),
        state_bytes,
        state_checksum,
        memory_digest: memory_digest(mem),
        pages,
    };
    write_manifest(dir, &m)?;
    Ok(m)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runs_of_nonzero_pages() {
        let page = PAGE_SIZE as usize;
        let mut buf = vec![0u8; 6 * page];
        buf[page + 5] = 1; // page 1
        buf[2 * page] = 2; // page 2
        buf[6 * page - 1] = 3; // page 5, the last
        let runs: Vec<(usize, usize)> = nonzero_runs(&buf)
            .into_iter()
            .map(|(at, run)| (at, run.len()))
            .collect();
        assert_eq!(runs, vec![(page, 2 * page), (5 * page, page)]);
        assert!(nonzero_runs(&vec![0u8; 3 * page]).is_empty());
    }
}
