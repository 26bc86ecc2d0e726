//! The secondary's disks: its own replica of every disk of the primary, and the guest
//! writes forwarded to it, held per epoch until that epoch's checkpoint commits.
//!
//! A write is checked when it arrives (disk index, range, epoch not yet committed); so
//! a commit cannot fail on bad input halfway. Epochs that never commit are dropped whole.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::Read;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use mcvmm_checkpoint::digest::Digest;

/// The replicas' sync in the background ([`Disks::sync_in_background`]); it stops when
/// dropped, or at its first error, which it keeps.
pub struct BackgroundSync {
    stop: Arc<AtomicBool>,
    error: Arc<Mutex<Option<String>>>,
}

impl BackgroundSync {
    /// The error that stopped the sync, if one did: the replicas may not hold what was
    /// written to them.
    pub fn failed(&self) -> Arc<Mutex<Option<String>>> {
        self.error.clone()
    }
}

impl Drop for BackgroundSync {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

/// Most bytes of forwarded writes held for epochs not yet committed; a primary that sends
/// more is dropped rather than allowed to exhaust the secondary's memory.
pub const MAX_HELD_BYTES: u64 = 1 << 30;

#[derive(Debug, thiserror::Error)]
pub enum DiskError {
    #[error("disk {path}: {source}")]
    Open {
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {index} ({path}): writing {len} bytes at {offset}: {source}")]
    Write {
        index: usize,
        path: String,
        offset: u64,
        len: usize,
        #[source]
        source: std::io::Error,
    },
    #[error("disk {index} ({path}): {source}")]
    Io {
        index: usize,
        path: String,
        #[source]
        source: std::io::Error,
    },
    #[error("write to disk {0}, but there are {1} disks")]
    NoSuchDisk(u32, usize),
    #[error("disk {index}: {len} bytes at offset {offset} go past its end ({size} bytes)")]
    PastEnd {
        index: u32,
        offset: u64,
        len: usize,
        size: u64,
    },
    #[error("a write for epoch {epoch}, which is committed already (last committed {committed})")]
    StaleEpoch { epoch: u64, committed: u64 },
    #[error("more than {MAX_HELD_BYTES} bytes of writes held for uncommitted epochs")]
    TooMuchHeld,
}

/// One replica disk, opened read-write.
pub struct Replica {
    pub path: PathBuf,
    file: File,
    pub size: u64,
}

impl Replica {
    pub fn open(path: &Path) -> Result<Replica, DiskError> {
        let open_err = |source| DiskError::Open {
            path: path.display().to_string(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(path)
            .map_err(open_err)?;
        let size = file.metadata().map_err(open_err)?.len();
        Ok(Replica {
            path: path.to_path_buf(),
            file,
            size,
        })
    }

    fn name(&self) -> String {
        self.path.display().to_string()
    }
}

/// Digest of every `chunk` bytes of `file` (the last chunk may be shorter).
pub fn chunk_digests(file: &mut impl Read, size: u64, chunk: u64) -> std::io::Result<Vec<u64>> {
    let mut out = Vec::with_capacity(size.div_ceil(chunk.max(1)) as usize);
    let mut buf = vec![0u8; chunk as usize];
    let mut left = size;
    while left > 0 {
        let n = left.min(chunk) as usize;
        file.read_exact(&mut buf[..n])?;
        out.push(mcvmm_checkpoint::digest::of(&buf[..n]));
        left -= n as u64;
    }
    Ok(out)
}

/// Digest of a whole file's contents (verification runs).
pub fn file_digest(file: &File, size: u64) -> std::io::Result<u64> {
    let mut d = Digest::default();
    let mut buf = vec![0u8; 1 << 20];
    let mut at = 0;
    while at < size {
        let n = (size - at).min(buf.len() as u64) as usize;
        file.read_exact_at(&mut buf[..n], at)?;
        d.update(&buf[..n]);
        at += n as u64;
    }
    Ok(d.finish())
}

struct HeldWrite {
    disk: u32,
    offset: u64,
    data: Vec<u8>,
}

/// The replicas and the writes held for epochs not yet committed.
pub struct Disks {
    replicas: Vec<Replica>,
    held: BTreeMap<u64, Vec<HeldWrite>>,
    held_bytes: u64,
    committed: u64,
    /// The first write or sync that failed on a replica, for good: after a failed sync
    /// the kernel may have dropped the writes while the page cache still shows them, so
    /// neither the replicas' digests nor their contents can be trusted again.
    failed: Arc<Mutex<Option<String>>>,
}

impl Disks {
    pub fn new(replicas: Vec<Replica>) -> Disks {
        Disks {
            replicas,
            held: BTreeMap::new(),
            held_bytes: 0,
            committed: 0,
            failed: Arc::new(Mutex::new(None)),
        }
    }

    /// Why a replica cannot be trusted any more (see the field), if one failed.
    pub fn failed(&self) -> Option<String> {
        self.failed
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Keeps the first failure; passes `e` on.
    fn failing(&self, e: DiskError) -> DiskError {
        let mut f = self.failed.lock().unwrap_or_else(PoisonError::into_inner);
        f.get_or_insert_with(|| e.to_string());
        e
    }

    pub fn replicas(&self) -> &[Replica] {
        &self.replicas
    }

    /// Chunk digests of every replica (for the handshake).
    pub fn digests(&self, chunk: u64) -> Result<Vec<Vec<u64>>, DiskError> {
        self.replicas
            .iter()
            .enumerate()
            .map(|(index, r)| {
                let mut f = &r.file;
                std::io::Seek::rewind(&mut f)
                    .and_then(|_| chunk_digests(&mut f, r.size, chunk))
                    .map_err(|source| DiskError::Io {
                        index,
                        path: r.name(),
                        source,
                    })
            })
            .collect()
    }

    fn check(&self, disk: u32, offset: u64, len: usize) -> Result<&Replica, DiskError> {
        let r = self
            .replicas
            .get(disk as usize)
            .ok_or(DiskError::NoSuchDisk(disk, self.replicas.len()))?;
        if offset
            .checked_add(len as u64)
            .is_none_or(|end| end > r.size)
        {
            return Err(DiskError::PastEnd {
                index: disk,
                offset,
                len,
                size: r.size,
            });
        }
        Ok(r)
    }

    /// Initial sync: a chunk goes to the replica at once (nothing is committed yet).
    pub fn write_chunk(&mut self, disk: u32, offset: u64, data: &[u8]) -> Result<(), DiskError> {
        let r = self.check(disk, offset, data.len())?;
        r.file.write_all_at(data, offset).map_err(|source| {
            self.failing(DiskError::Write {
                index: disk as usize,
                path: r.name(),
                offset,
                len: data.len(),
                source,
            })
        })
    }

    /// A guest write of `epoch`: held until that epoch commits.
    pub fn hold(
        &mut self,
        epoch: u64,
        disk: u32,
        offset: u64,
        data: &[u8],
    ) -> Result<(), DiskError> {
        self.check(disk, offset, data.len())?;
        if epoch <= self.committed {
            return Err(DiskError::StaleEpoch {
                epoch,
                committed: self.committed,
            });
        }
        if self.held_bytes + data.len() as u64 > MAX_HELD_BYTES {
            return Err(DiskError::TooMuchHeld);
        }
        self.held_bytes += data.len() as u64;
        self.held.entry(epoch).or_default().push(HeldWrite {
            disk,
            offset,
            data: data.to_vec(),
        });
        Ok(())
    }

    /// Writes held for `epoch` (counted by the checkpoint's end).
    pub fn held_in(&self, epoch: u64) -> u64 {
        self.held.get(&epoch).map_or(0, |w| w.len() as u64)
    }

    pub fn held_bytes(&self) -> u64 {
        self.held_bytes
    }

    /// Applies every write held for epochs up to `epoch`, in the order they happened.
    /// Returns the bytes written. They reach the replica files (the page cache) but are
    /// not synced here: a commit guards against losing the primary, and syncing every
    /// epoch would put a disk flush into every output's latency. [`Disks::sync`] makes
    /// them durable before a takeover.
    pub fn commit(&mut self, epoch: u64) -> Result<u64, DiskError> {
        let later = self.held.split_off(&(epoch + 1));
        let due = std::mem::replace(&mut self.held, later);
        let mut written = 0;
        for w in due.into_values().flatten() {
            let r = &self.replicas[w.disk as usize];
            r.file.write_all_at(&w.data, w.offset).map_err(|source| {
                self.failing(DiskError::Write {
                    index: w.disk as usize,
                    path: r.name(),
                    offset: w.offset,
                    len: w.data.len(),
                    source,
                })
            })?;
            written += w.data.len() as u64;
        }
        self.held_bytes -= written;
        self.committed = epoch;
        Ok(written)
    }

    /// Makes everything committed so far durable.
    pub fn sync(&self) -> Result<(), DiskError> {
        for (index, r) in self.replicas.iter().enumerate() {
            r.file.sync_data().map_err(|source| {
                self.failing(DiskError::Io {
                    index,
                    path: r.name(),
                    source,
                })
            })?;
        }
        Ok(())
    }

    /// Syncs the replicas every `every` on a thread of its own, so that a disk that
    /// fails is found within that time, not at a takeover.
    pub fn sync_in_background(
        &self,
        every: std::time::Duration,
    ) -> std::io::Result<BackgroundSync> {
        let files = self
            .replicas
            .iter()
            .map(|r| Ok((r.name(), r.file.try_clone()?)))
            .collect::<std::io::Result<Vec<_>>>()?;
        let stop = Arc::new(AtomicBool::new(false));
        // A failure here is the replicas' for good, as any other (see `failed`).
        let error = self.failed.clone();
        let (s, e) = (stop.clone(), error.clone());
        std::thread::Builder::new()
            .name("replica-sync".into())
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    std::thread::sleep(every);
                    for (name, f) in &files {
                        if let Err(err) = f.sync_data() {
                            tracing::error!("syncing replica {name}: {err}");
                            e.lock()
                                .unwrap_or_else(PoisonError::into_inner)
                                .get_or_insert_with(|| format!("syncing replica {name}: {err}"));
                            return;
                        }
                    }
                }
            })?;
        Ok(BackgroundSync { stop, error })
    }

    /// Forgets the writes of every epoch after the last committed one (failover, or a
    /// checkpoint that did not arrive whole).
    pub fn discard_uncommitted(&mut self) -> u64 {
        let n: u64 = self.held.values().map(|w| w.len() as u64).sum();
        self.held.clear();
        self.held_bytes = 0;
        n
    }

    /// Digest of each replica's whole contents.
    pub fn file_digests(&self) -> Result<Vec<u64>, DiskError> {
        self.replicas
            .iter()
            .enumerate()
            .map(|(index, r)| {
                file_digest(&r.file, r.size).map_err(|source| DiskError::Io {
                    index,
                    path: r.name(),
                    source,
                })
            })
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn disks(n: usize, size: u64) -> (tempfile::TempDir, Disks) {
        let dir = tempfile::tempdir().expect("tempdir");
        let replicas = (0..n)
            .map(|i| {
                let p = dir.path().join(format!("d{i}"));
                File::create(&p)
                    .and_then(|f| f.set_len(size))
                    .expect("create");
                Replica::open(&p).expect("open")
            })
            .collect();
        (dir, Disks::new(replicas))
    }

    fn contents(d: &Disks, i: usize) -> Vec<u8> {
        std::fs::read(&d.replicas()[i].path).expect("read")
    }

    #[test]
    fn writes_reach_the_disk_only_when_their_epoch_commits() {
        let (_dir, mut d) = disks(2, 8192);
        d.hold(1, 0, 0, b"one").expect("hold");
        d.hold(2, 1, 512, b"two").expect("hold");
        d.hold(2, 0, 1, b"XX").expect("hold");
        assert_eq!(contents(&d, 0)[..3], [0, 0, 0]);
        assert_eq!(d.commit(1).expect("commit"), 3);
        assert_eq!(&contents(&d, 0)[..3], b"one");
        assert_eq!(contents(&d, 1)[512..515], [0, 0, 0]);
        assert_eq!(d.held_in(2), 2);
        assert_eq!(d.discard_uncommitted(), 2);
        d.commit(2).expect("commit of nothing");
        assert_eq!(&contents(&d, 0)[..3], b"one", "discarded writes stay out");
        assert_eq!(contents(&d, 1)[512..515], [0, 0, 0]);
        assert_eq!(d.held_bytes(), 0);
    }

    /// A replica whose writes fail (here: its file opened read-only, so every write
    /// fails as a failing disk's would) is distrusted for good, and says why.
    #[test]
    fn a_replica_that_failed_a_write_is_never_trusted_again() {
        let (dir, mut d) = disks(1, 4096);
        assert_eq!(d.failed(), None);
        let path = dir.path().join("d0");
        d.replicas[0].file = File::open(&path).expect("read-only");
        d.hold(1, 0, 0, b"lost").expect("hold");
        let e = d.commit(1).expect_err("a write that fails");
        assert!(matches!(e, DiskError::Write { .. }), "{e}");
        let why = d.failed().expect("remembered");
        assert!(why.contains("writing 4 bytes at 0"), "{why}");
        // Later writes that happen to succeed change nothing.
        d.replicas[0].file = OpenOptions::new().write(true).open(&path).expect("rw");
        d.write_chunk(0, 0, b"fine").expect("write");
        assert_eq!(d.failed(), Some(why.clone()));
        let bg = d
            .sync_in_background(std::time::Duration::from_millis(1))
            .expect("sync thread");
        assert_eq!(
            bg.failed().lock().expect("lock").clone(),
            Some(why),
            "a background sync reports the failure from the start"
        );
    }

    #[test]
    fn bad_writes_are_refused_on_arrival() {
        let (_dir, mut d) = disks(1, 4096);
        assert!(matches!(
            d.hold(1, 1, 0, b"x"),
            Err(DiskError::NoSuchDisk(1, 1))
        ));
        assert!(matches!(
            d.hold(1, 0, 4095, b"xy"),
            Err(DiskError::PastEnd { .. })
        ));
        assert!(matches!(
            d.hold(1, 0, u64::MAX, b"x"),
            Err(DiskError::PastEnd { .. })
        ));
        assert!(matches!(
            d.write_chunk(0, 4000, &[0; 200]),
            Err(DiskError::PastEnd { .. })
        ));
        d.commit(3).expect("commit");
        assert!(matches!(
            d.hold(3, 0, 0, b"x"),
            Err(DiskError::StaleEpoch { .. })
        ));
        assert_eq!(contents(&d, 0), vec![0; 4096], "nothing was written");
    }

    proptest! {
        /// Later writes win, in the order they were held, whatever the epochs' split.
        #[test]
        fn commits_replay_writes_in_order(writes in proptest::collection::vec(
            (0u64..4, 0u64..60, proptest::collection::vec(any::<u8>(), 1..8)), 1..40)) {
            let (_dir, mut d) = disks(1, 64);
            let mut model = vec![0u8; 64];
            let mut epochs: Vec<u64> = writes.iter().map(|w| w.0 + 1).collect();
            epochs.sort();
            for ((_, off, data), epoch) in writes.iter().zip(&epochs) {
                let len = data.len().min(64 - *off as usize);
                d.hold(*epoch, 0, *off, &data[..len]).expect("hold");
                model[*off as usize..*off as usize + len].copy_from_slice(&data[..len]);
            }
            d.commit(*epochs.last().expect("non-empty")).expect("commit");
            prop_assert_eq!(contents(&d, 0), model);
        }
    }

    #[test]
    fn chunk_digests_cover_a_short_last_chunk() {
        let data: Vec<u8> = (0..2500u32).map(|i| i as u8).collect();
        let got = chunk_digests(&mut data.as_slice(), 2500, 1000).expect("digests");
        assert_eq!(got.len(), 3);
        assert_eq!(got[2], mcvmm_checkpoint::digest::of(&data[2000..]));
    }
}
