//! Snapshots on disk. A snapshot is a directory:
//!
//! * `memory` (full) — all guest RAM, region after region; or `pages` (incremental) —
//!   records of an 8-byte little-endian guest address and the 4 KiB page there;
//! * `state.json` — the [`MachineState`];
//! * `manifest.json` — version, kind, parent (incremental), the VM's shape, the size and
//!   checksum of every file, and the digest of all guest memory at the pause. It is
//!   written last (renamed into place), so a directory without it is not a snapshot.
//!
//! Loading checks the manifests, versions, the shape along the chain, file sizes and the
//! state's checksum; applying (before any vCPU runs) checks each data file's checksum as
//! it reads it, in the same pass, and the digest of all memory after a chain.

use std::fs::File;
use std::io::{BufReader, BufWriter, Read, Write};
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{Address, Bytes, GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::digest::{self, Digest};
use crate::dirty::DirtySet;
use crate::state::{MachineState, VmShape, FORMAT_VERSION};
use crate::{GuestMemory, PAGE_SIZE};

const MANIFEST: &str = "manifest.json";
const STATE: &str = "state.json";
const MEMORY: &str = "memory";
const PAGES: &str = "pages";
/// Longest chain of increments followed.
const MAX_CHAIN: usize = 10_000;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("{path}: {source}")]
    Io {
        path: String,
        source: std::io::Error,
    },
    #[error("{path}: not a snapshot manifest: {why}")]
    Manifest { path: String, why: String },
    #[error("{path}: snapshot format version {found}, this mcvmm reads version {FORMAT_VERSION}")]
    Version { path: String, found: u32 },
    #[error("{path}: {bytes} bytes, the manifest says {expected} (truncated or replaced)")]
    Size {
        path: String,
        bytes: u64,
        expected: u64,
    },
    #[error("{path}: checksum mismatch (the file is corrupted)")]
    Checksum { path: String },
    #[error("{path}: the state does not parse: {why}")]
    State { path: String, why: String },
    #[error("{path}: does not fit its parent {parent}: {why}")]
    Chain {
        path: String,
        parent: String,
        why: String,
    },
    #[error("{path}: more than {MAX_CHAIN} snapshots in the chain (a loop?)")]
    ChainTooLong { path: String },
    #[error("{path}: page address {addr:#x} is not a page of guest RAM")]
    BadPage { path: String, addr: u64 },
    #[error("memory after applying {path} does not match the digest taken at the pause")]
    Digest { path: String },
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |source| SnapshotError::Io {
        path: path.display().to_string(),
        source,
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    Full,
    Incremental,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Manifest {
    pub format_version: u32,
    pub kind: Kind,
    /// The snapshot this one applies on top of (incremental only), as an absolute path.
    pub parent: Option<PathBuf>,
    pub shape: VmShape,
    /// `memory` or `pages`.
    pub data_file: String,
    pub data_bytes: u64,
    pub data_checksum: u64,
    pub state_bytes: u64,
    pub state_checksum: u64,
    /// Digest of all guest RAM at the pause (regions in order).
    pub memory_digest: u64,
    /// Pages in the data file.
    pub pages: u64,
}

/// Views every region of `mem` as bytes.
///
/// # Safety
/// Nothing may write guest memory while the returned slices live (vCPUs paused, the
/// device loop the caller).
unsafe fn regions(mem: &GuestMemory) -> Vec<(GuestAddress, &[u8])> {
    mem.iter()
        .map(|r| {
            // SAFETY: a live mapping of `len` bytes owned by `mem`; the caller keeps
            // writers away.
            let bytes = unsafe { std::slice::from_raw_parts(r.as_ptr(), r.len() as usize) };
            (r.start_addr(), bytes)
        })
        .collect()
}

/// The digest of all guest RAM. Same contract as for capture: nothing writes meanwhile.
pub fn memory_digest(mem: &GuestMemory) -> u64 {
    let mut d = Digest::default();
    // SAFETY: see this function's contract (the vCPUs are paused by the caller).
    for (_, bytes) in unsafe { regions(mem) } {
        d.update(bytes);
    }
    d.finish()
}

fn write_state(dir: &Path, state: &MachineState) -> Result<(u64, u64), SnapshotError> {
    let path = dir.join(STATE);
    let json = serde_json::to_vec(state).map_err(|e| SnapshotError::State {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    std::fs::write(&path, &json).map_err(io(&path))?;
    Ok((json.len() as u64, digest::of(&json)))
}

fn write_manifest(dir: &Path, m: &Manifest) -> Result<(), SnapshotError> {
    let path = dir.join(MANIFEST);
    let tmp = dir.join("manifest.json.partial");
    let json = serde_json::to_vec_pretty(m).map_err(|e| SnapshotError::Manifest {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&json).map_err(io(&tmp))?;
    f.sync_all().map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

fn create_dir(dir: &Path) -> Result<(), SnapshotError> {
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    // A manifest left from an older snapshot in the same place must not vouch for
    // the new files while they are written.
    let old = dir.join(MANIFEST);
    match std::fs::remove_file(&old) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(io(&old)(e)),
        _ => Ok(()),
    }
}

/// A full snapshot being written. Memory is copied while the guest runs (`begin_full`,
/// with dirty tracking already on), the pages written meanwhile are copied again at the
/// pause (`patch`), and the files are checked and sealed after the guest runs again
/// (`seal`). The pause holds only the re-copy and the state capture.
pub struct FullSnapshot {
    dir: PathBuf,
    path: PathBuf,
    file: File,
    /// (guest start, length, offset in the file) of each region.
    layout: Vec<(GuestAddress, u64, u64)>,
    bytes: u64,
}

/// Starts a full snapshot in `dir`: copies all of guest memory into it. The guest may run;
/// what it writes meanwhile must be in the dirty set given to `patch`.
pub fn begin_full(dir: &Path, mem: &GuestMemory) -> Result<FullSnapshot, SnapshotError> {
    use std::os::unix::fs::FileExt;
    create_dir(dir)?;
    let path = dir.join(MEMORY);
    let file = File::create(&path).map_err(io(&path))?;
    let mut buf = vec![0u8; 1 << 20];
    let mut layout = Vec::new();
    let mut offset = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr(), region.len());
        layout.push((start, len, offset));
        let mut done = 0u64;
        while done < len {
            let n = (len - done).min(buf.len() as u64) as usize;
            // A volatile copy: the guest may be writing these pages right now.
            mem.read_slice(&mut buf[..n], start.unchecked_add(done))
                .map_err(|e| io(&path)(std::io::Error::other(e.to_string())))?;
            // Pages of zeros stay holes in the file: most of a fresh guest's memory.
            for (i, run) in nonzero_runs(&buf[..n]) {
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
        bytes: offset,
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
    /// Copies the pages of `dirty` again, now that they hold still (vCPUs paused).
    /// Returns how many.
    pub fn patch(&mut self, dirty: &DirtySet, mem: &GuestMemory) -> Result<u64, SnapshotError> {
        use std::os::unix::fs::FileExt;
        let mut page = vec![0u8; PAGE_SIZE as usize];
        let mut pages = 0;
        for at in dirty.addresses() {
            let offset = self
                .layout
                .iter()
                .find_map(|&(start, len, off)| {
                    let rel = at.0.checked_sub(start.0)?;
                    (rel < len).then_some(off + rel)
                })
                .ok_or(SnapshotError::BadPage {
                    path: self.path.display().to_string(),
                    addr: at.0,
                })?;
            mem.read_slice(&mut page, at)
                .map_err(|e| io(&self.path)(std::io::Error::other(e.to_string())))?;
            self.file
                .write_all_at(&page, offset)
                .map_err(io(&self.path))?;
            pages += 1;
        }
        Ok(pages)
    }

    /// Makes the snapshot durable and whole: syncs, checksums the memory file (its digest
    /// is the memory digest at the pause), writes the state, then the manifest.
    pub fn seal(self, state: &MachineState, shape: &VmShape) -> Result<Manifest, SnapshotError> {
        self.file.sync_all().map_err(io(&self.path))?;
        let checksum = file_digest(&self.path)?;
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

/// A snapshot chain, checked and ready to apply: the full snapshot first.
pub struct Loaded {
    pub chain: Vec<(PathBuf, Manifest)>,
    /// The state of the last snapshot in the chain.
    pub state: MachineState,
}

impl Loaded {
    pub fn shape(&self) -> &VmShape {
        // A chain always has at least its own snapshot.
        &self.chain[self.chain.len() - 1].1.shape
    }
}

fn read_manifest(dir: &Path) -> Result<Manifest, SnapshotError> {
    let path = dir.join(MANIFEST);
    let text = std::fs::read(&path).map_err(io(&path))?;
    // The version first, so an old or new format says so rather than failing to parse.
    let version = serde_json::from_slice::<serde_json::Value>(&text)
        .ok()
        .and_then(|v| v.get("format_version")?.as_u64());
    match version {
        Some(v) if v == u64::from(FORMAT_VERSION) => {}
        Some(v) => {
            return Err(SnapshotError::Version {
                path: path.display().to_string(),
                found: v as u32,
            })
        }
        None => {
            return Err(SnapshotError::Manifest {
                path: path.display().to_string(),
                why: "no format_version".into(),
            })
        }
    }
    serde_json::from_slice(&text).map_err(|e| SnapshotError::Manifest {
        path: path.display().to_string(),
        why: e.to_string(),
    })
}

/// The digest of a whole file.
fn file_digest(path: &Path) -> Result<u64, SnapshotError> {
    let mut r = BufReader::with_capacity(1 << 20, File::open(path).map_err(io(path))?);
    let mut d = Digest::default();
    let mut buf = vec![0u8; 1 << 20];
    loop {
        let n = r.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            return Ok(d.finish());
        }
        d.update(&buf[..n]);
    }
}

/// Checks `path`'s size and checksum.
fn checked_file(path: &Path, bytes: u64, checksum: u64) -> Result<(), SnapshotError> {
    let len = std::fs::metadata(path).map_err(io(path))?.len();
    if len != bytes {
        return Err(SnapshotError::Size {
            path: path.display().to_string(),
            bytes: len,
            expected: bytes,
        });
    }
    if file_digest(path)? != checksum {
        return Err(SnapshotError::Checksum {
            path: path.display().to_string(),
        });
    }
    Ok(())
}

/// Loads the snapshot in `dir` and every parent it builds on, and checks what can be
/// checked without reading the memory data (see `apply`).
pub fn load(dir: &Path) -> Result<Loaded, SnapshotError> {
    let mut chain: Vec<(PathBuf, Manifest)> = Vec::new();
    let mut at = dir.to_path_buf();
    loop {
        if chain.len() >= MAX_CHAIN {
            return Err(SnapshotError::ChainTooLong {
                path: dir.display().to_string(),
            });
        }
        let m = read_manifest(&at)?;
        let data = at.join(&m.data_file);
        let expected = if m.kind == Kind::Full { MEMORY } else { PAGES };
        if m.data_file != expected || (m.kind == Kind::Full) != m.parent.is_none() {
            return Err(SnapshotError::Manifest {
                path: at.join(MANIFEST).display().to_string(),
                why: "kind, data file and parent disagree".into(),
            });
        }
        if m.kind == Kind::Full && m.data_bytes != m.shape.mem_mib << 20 {
            return Err(SnapshotError::Size {
                path: data.display().to_string(),
                bytes: m.data_bytes,
                expected: m.shape.mem_mib << 20,
            });
        }
        // Sizes now; checksums as the data is read in (`apply`), in one pass.
        let len = std::fs::metadata(&data).map_err(io(&data))?.len();
        if len != m.data_bytes {
            return Err(SnapshotError::Size {
                path: data.display().to_string(),
                bytes: len,
                expected: m.data_bytes,
            });
        }
        let parent = m.parent.clone();
        if let Some((child, cm)) = chain.last() {
            if let Some(why) = m.shape.mismatch(&cm.shape) {
                return Err(SnapshotError::Chain {
                    path: child.display().to_string(),
                    parent: at.display().to_string(),
                    why,
                });
            }
        }
        chain.push((at.clone(), m));
        match parent {
            Some(p) => at = p,
            None => break,
        }
    }
    chain.reverse();
    let (top, m) = &chain[chain.len() - 1];
    let path = top.join(STATE);
    checked_file(&path, m.state_bytes, m.state_checksum)?;
    let text = std::fs::read(&path).map_err(io(&path))?;
    let state = serde_json::from_slice(&text).map_err(|e| SnapshotError::State {
        path: path.display().to_string(),
        why: e.to_string(),
    })?;
    Ok(Loaded { chain, state })
}

/// Fills `mem` from the chain (full memory, then each increment's pages) and checks the
/// result against the digest taken at the last snapshot's pause. `mem` must be freshly
/// allocated (all zeros) with the chain's shape, and no vCPU may run yet.
pub fn apply(loaded: &Loaded, mem: &GuestMemory) -> Result<(), SnapshotError> {
    let mut regions: Vec<(GuestAddress, &mut [u8])> = mem
        .iter()
        .map(|r| {
            // SAFETY: a live mapping of `len` bytes owned by `mem`; no vCPU runs and no
            // device is active before the restore finishes, so this is the only user.
            let bytes = unsafe { std::slice::from_raw_parts_mut(r.as_ptr(), r.len() as usize) };
            (r.start_addr(), bytes)
        })
        .collect();
    for (dir, m) in &loaded.chain {
        let path = dir.join(&m.data_file);
        let mut r = BufReader::with_capacity(1 << 20, File::open(&path).map_err(io(&path))?);
        let mut d = Digest::default();
        match m.kind {
            Kind::Full => {
                // Guest memory is fresh (all zeros): copy only pages that are not, so a
                // mostly empty guest is neither copied nor faulted in whole.
                let mut buf = vec![0u8; 1 << 20];
                for (_, bytes) in regions.iter_mut() {
                    for chunk in bytes.chunks_mut(1 << 20) {
                        let data = &mut buf[..chunk.len()];
                        r.read_exact(data).map_err(io(&path))?;
                        d.update(data);
                        for (i, run) in nonzero_runs(data) {
                            chunk[i..i + run.len()].copy_from_slice(run);
                        }
                    }
                }
            }
            Kind::Incremental => {
                for _ in 0..m.pages {
                    let mut addr = [0u8; 8];
                    r.read_exact(&mut addr).map_err(io(&path))?;
                    d.update(&addr);
                    let addr = u64::from_le_bytes(addr);
                    let page = regions.iter_mut().find_map(|(start, bytes)| {
                        let off = addr.checked_sub(start.0)? as usize;
                        if addr % PAGE_SIZE != 0 {
                            return None;
                        }
                        bytes.get_mut(off..off + PAGE_SIZE as usize)
                    });
                    let Some(page) = page else {
                        return Err(SnapshotError::BadPage {
                            path: path.display().to_string(),
                            addr,
                        });
                    };
                    r.read_exact(page).map_err(io(&path))?;
                    d.update(page);
                }
            }
        }
        if d.finish() != m.data_checksum {
            return Err(SnapshotError::Checksum {
                path: path.display().to_string(),
            });
        }
    }
    drop(regions);
    // A full snapshot's checksum is the digest of memory itself; a chain is checked whole.
    let (top, m) = &loaded.chain[loaded.chain.len() - 1];
    if loaded.chain.len() > 1 && memory_digest(mem) != m.memory_digest {
        return Err(SnapshotError::Digest {
            path: top.display().to_string(),
        });
    }
    Ok(())
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
