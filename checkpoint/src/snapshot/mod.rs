//! Snapshots on disk. A snapshot is a directory:
//!
//! * `memory` (full) — all guest RAM, region after region, pages of zeros left as holes;
//!   or `pages` (incremental) — records of an 8-byte little-endian guest address and the
//!   4 KiB page there;
//! * `state.json` — the [`MachineState`];
//! * `manifest.json` — version, kind, parent (incremental), the VM's shape, the size and
//!   checksum of every file, and the digest of all guest memory at the pause. It is
//!   written last (renamed into place), so a directory without it is not a snapshot.
//!
//! Loading checks the manifests, versions, the shape along the chain, file sizes and the
//! state's checksum; applying (before any vCPU runs) checks each data file's checksum as
//! it reads it, in the same pass, and the digest of all memory after a chain.
//!
//! The memory file's checksum is the digest of all memory (see [`memory_digest`]): chunk
//! by chunk, so it is taken while the memory is copied and only the chunks a pause
//! patched are read again, and a restore reads and checks only the chunks that are not
//! holes (a hole's digest is known).

mod restore;
mod write;

pub use restore::{apply, load, Loaded};
pub use write::{begin_full, write_incremental, FullSnapshot};

use std::fs::File;
use std::io::Write;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::digest::{self, CHUNK};
use crate::resident::Pagemap;
use crate::state::{MachineState, VmShape, FORMAT_VERSION};
use crate::GuestMemory;

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
    #[error("arming the dirty log for the copy: {0}")]
    Dirty(#[from] crate::dirty::DirtyError),
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

/// The digest of all guest RAM: of the digests of its [`CHUNK`]s, region after region.
/// Same contract as for capture: nothing writes meanwhile.
pub fn memory_digest(mem: &GuestMemory) -> u64 {
    let mut pagemap = Pagemap::open();
    let mut zeros = digest::Zeros::default();
    // SAFETY: see this function's contract (the vCPUs are paused by the caller).
    let regions = unsafe { regions(mem) };
    let mut chunks = Vec::new();
    for (_, bytes) in &regions {
        for chunk in bytes.chunks(CHUNK) {
            // Memory never touched is zeros: its digest is known without faulting it in.
            let untouched = pagemap
                .as_mut()
                .is_some_and(|p| !p.touched(chunk.as_ptr(), chunk.len()));
            chunks.push(if untouched {
                zeros.digest(chunk.len())
            } else {
                digest::of(chunk)
            });
        }
    }
    digest::of_chunks(chunks)
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

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::Bytes;

    #[test]
    fn untouched_memory_has_the_digest_of_zeros_written_out() {
        let len = (5 << 20) / 2;
        let fresh = GuestMemory::from_ranges(&[(GuestAddress(0), len)]).expect("memory");
        let written = GuestMemory::from_ranges(&[(GuestAddress(0), len)]).expect("memory");
        written
            .write_slice(&vec![0u8; len], GuestAddress(0))
            .expect("write");
        assert_eq!(memory_digest(&fresh), memory_digest(&written));
        fresh
            .write_obj(1u8, GuestAddress(len as u64 - 1))
            .expect("write");
        assert_ne!(memory_digest(&fresh), memory_digest(&written));
    }
}
