//! Reading snapshots back: a chain is loaded and checked as far as it can be without its
//! memory data, then applied into fresh guest memory, each data file checked as it is
//! read.

use std::fs::File;
use std::io::{BufReader, Read};
use std::os::fd::AsRawFd;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use super::{io, memory_digest, read_manifest, Kind, Manifest, SnapshotError};
use super::{MANIFEST, MAX_CHAIN, MEMORY, PAGES, STATE};
use crate::digest::{self, Digest, CHUNK};
use crate::state::MachineState;
use crate::state::VmShape;
use crate::{GuestMemory, PAGE_SIZE};

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
        let file = File::open(&path).map_err(io(&path))?;
        let checksum = match m.kind {
            Kind::Full => apply_memory(&file, &mut regions),
            Kind::Incremental => apply_pages(file, m.pages, &mut regions),
        }
        .map_err(|e| e.at(&path))?;
        if checksum != m.data_checksum {
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

/// Why a data file could not be applied, before its path is known.
enum ApplyError {
    Io(std::io::Error),
    BadPage(u64),
}

impl ApplyError {
    fn at(self, path: &Path) -> SnapshotError {
        match self {
            ApplyError::Io(source) => io(path)(source),
            ApplyError::BadPage(addr) => SnapshotError::BadPage {
                path: path.display().to_string(),
                addr,
            },
        }
    }
}

impl From<std::io::Error> for ApplyError {
    fn from(e: std::io::Error) -> Self {
        ApplyError::Io(e)
    }
}

/// Reads a full snapshot's memory file into `regions` (all zeros before) and returns its
/// checksum. Only the file's data extents are read, straight into guest memory, so a
/// mostly empty guest is neither read nor faulted in whole; a chunk that is all hole has
/// the digest of zeros without a look at it.
fn apply_memory(file: &File, regions: &mut [(GuestAddress, &mut [u8])]) -> Result<u64, ApplyError> {
    let mut zeros = digest::Zeros::default();
    let mut chunks = Vec::new();
    let mut offset = 0u64;
    for (_, bytes) in regions.iter_mut() {
        for chunk in bytes.chunks_mut(CHUNK) {
            let end = offset + chunk.len() as u64;
            let mut pos = offset;
            let mut read = false;
            while let Some((data, hole)) = next_data(file, pos, end)? {
                let into = &mut chunk[(data - offset) as usize..(hole - offset) as usize];
                file.read_exact_at(into, data)?;
                read = true;
                pos = hole;
            }
            chunks.push(if read {
                digest::of(chunk)
            } else {
                zeros.digest(chunk.len())
            });
            offset = end;
        }
    }
    Ok(digest::of_chunks(chunks))
}

/// The first data extent of `file` in `[pos, end)`, as (start, end), or None if the rest
/// of that range is a hole.
fn next_data(file: &File, pos: u64, end: u64) -> std::io::Result<Option<(u64, u64)>> {
    let fd = file.as_raw_fd();
    // SAFETY: lseek on a descriptor `file` keeps open; it moves only the file offset,
    // which no read here uses (they are positioned).
    let data = unsafe { libc::lseek(fd, pos as libc::off_t, libc::SEEK_DATA) };
    if data < 0 {
        let e = std::io::Error::last_os_error();
        return match e.raw_os_error() {
            // No data from `pos` to the end of the file.
            Some(libc::ENXIO) => Ok(None),
            // A kernel without SEEK_DATA: everything is data.
            Some(libc::EINVAL) => Ok(Some((pos, end))),
            _ => Err(e),
        };
    }
    let data = data as u64;
    if data >= end {
        return Ok(None);
    }
    // SAFETY: as above.
    let hole = unsafe { libc::lseek(fd, data as libc::off_t, libc::SEEK_HOLE) };
    if hole < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let hole = (hole as u64).min(end);
    // An answer out of order (the file changing under us) must neither loop nor index
    // outside the chunk: then the rest of the range is read as data.
    if data < pos || hole <= data {
        return Ok(Some((pos, end)));
    }
    Ok(Some((data, hole)))
}

/// Applies an incremental snapshot's page records to `regions` and returns the file's
/// checksum.
fn apply_pages(
    file: File,
    pages: u64,
    regions: &mut [(GuestAddress, &mut [u8])],
) -> Result<u64, ApplyError> {
    let mut r = BufReader::with_capacity(1 << 20, file);
    let mut d = Digest::default();
    for _ in 0..pages {
        let mut addr = [0u8; 8];
        r.read_exact(&mut addr)?;
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
            return Err(ApplyError::BadPage(addr));
        };
        r.read_exact(page)?;
        d.update(page);
    }
    Ok(d.finish())
}

#[cfg(test)]
mod tests {
    use super::super::begin_full;
    use super::*;
    use crate::dirty::{DirtySet, RegionDirty};
    use vm_memory::{Address, Bytes};

    const SECOND: GuestAddress = GuestAddress(1 << 32);

    /// 2.5 MiB and 1.5 MiB: chunks of both lengths, and a region boundary.
    fn memory() -> GuestMemory {
        GuestMemory::from_ranges(&[(GuestAddress(0), (5 << 20) / 2), (SECOND, (3 << 20) / 2)])
            .expect("memory")
    }

    fn shape() -> VmShape {
        VmShape {
            mem_mib: 4,
            vcpus: 1,
            disks: Vec::new(),
            net: None,
        }
    }

    /// A full snapshot of memory with data in chunk 0 and the second region only, then
    /// patched with pages written "while it was copied": one into a chunk that was a
    /// hole, one over data.
    fn snapshot(dir: &Path) -> GuestMemory {
        let mem = memory();
        mem.write_slice(&[0xa5; 5000], GuestAddress(4000))
            .expect("write");
        mem.write_obj(0x3cu8, SECOND.unchecked_add((1 << 20) + 17))
            .expect("write");
        let mut full = begin_full(dir, &mem, None).expect("begin");
        let page = PAGE_SIZE;
        mem.write_obj(7u8, GuestAddress((2 << 20) + 3 * page))
            .expect("write");
        mem.write_obj(9u8, GuestAddress(page + 1)).expect("write");
        // A run longer than a chunk, across a chunk boundary.
        mem.write_slice(&[0x11; 300 * 4096], GuestAddress(128 * page))
            .expect("write");
        let mut first = vec![0u64; 10];
        for p in [1].into_iter().chain(128..428).chain([512 + 3]) {
            first[p / 64] |= 1 << (p % 64);
        }
        let dirty = DirtySet {
            regions: vec![
                RegionDirty {
                    start: GuestAddress(0),
                    len: (5 << 20) / 2,
                    bits: first,
                },
                RegionDirty {
                    start: SECOND,
                    len: (3 << 20) / 2,
                    bits: vec![0; 6],
                },
            ],
        };
        assert_eq!(full.patch(&dirty, &mem).expect("patch"), 302);
        let m = full.seal(&MachineState::default(), &shape()).expect("seal");
        assert_eq!(m.memory_digest, memory_digest(&mem), "digest at the pause");
        mem
    }

    fn contents(mem: &GuestMemory) -> Vec<u8> {
        let mut all = Vec::new();
        for r in mem.iter() {
            let mut buf = vec![0u8; r.len() as usize];
            mem.read_slice(&mut buf, r.start_addr()).expect("read");
            all.extend(buf);
        }
        all
    }

    #[test]
    fn a_full_snapshot_patched_at_the_pause_restores_the_same_memory() {
        let dir = tempfile::tempdir().expect("tempdir");
        let mem = snapshot(dir.path());
        let loaded = load(dir.path()).expect("load");
        let fresh = memory();
        apply(&loaded, &fresh).expect("apply");
        assert!(
            contents(&fresh) == contents(&mem),
            "restored memory differs"
        );
    }

    #[test]
    fn a_changed_byte_in_data_or_in_a_hole_is_a_checksum_mismatch() {
        for at in [4100u64, 3 << 19] {
            let dir = tempfile::tempdir().expect("tempdir");
            snapshot(dir.path());
            let file = std::fs::OpenOptions::new()
                .write(true)
                .open(dir.path().join(MEMORY))
                .expect("open");
            file.write_all_at(&[0x42], at).expect("corrupt");
            let loaded = load(dir.path()).expect("load");
            let err = apply(&loaded, &memory()).err().map(|e| e.to_string());
            assert!(
                err.as_deref()
                    .is_some_and(|e| e.contains("checksum mismatch")),
                "byte at {at}: {err:?}"
            );
        }
    }
}
