//! The memory workload: a region of guest RAM rewritten at a chosen rate with patterns that
//! check themselves.
//!
//! Page `i` at version `v` holds `MAGIC ^ i`, then `v`, then 510 words of a xorshift stream
//! seeded from `(i, v)`. Any page can therefore be verified on its own, without a copy: a
//! lost or torn page write (a checkpoint that missed a dirty page) shows up as a page whose
//! contents do not match its own header, or whose version is newer than any ever written.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

pub const PAGE_SIZE: usize = 4096;
const WORDS: usize = PAGE_SIZE / 8;
const MAGIC: u64 = 0x6d63_766d_6d5f_7067; // "mcvmm_pg"
const TICK: Duration = Duration::from_millis(10);
/// Pages written between two looks at the stop flag when running flat out.
const FLAT_OUT_BATCH: u64 = 256;

#[repr(C, align(4096))]
#[derive(Clone)]
struct Page([u64; WORDS]);

/// The pages and the highest version ever written to any of them.
struct Region {
    pages: Vec<Page>,
    next_version: u64,
}

fn fill(page: &mut Page, index: u64, version: u64) {
    page.0[0] = MAGIC ^ index;
    page.0[1] = version;
    let mut x = index.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ version ^ 0x2545_f491_4f6c_dd1d;
    for w in &mut page.0[2..] {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        *w = x;
    }
}

fn check(page: &Page, index: u64, newest: u64) -> bool {
    let version = page.0[1];
    if page.0[0] != MAGIC ^ index || version >= newest {
        return false;
    }
    let mut expected = Page([0; WORDS]);
    fill(&mut expected, index, version);
    expected.0 == page.0
}

/// Counters of a running workload, readable without stopping it.
#[derive(Default)]
pub struct MemStats {
    pub pages_written: AtomicU64,
    pub passes: AtomicU64,
}

/// Result of [`MemLoad::verify`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Verified {
    pub pages: u64,
    pub errors: u64,
}

/// A running memory workload; dropping it stops the writer thread.
pub struct MemLoad {
    region: Arc<Mutex<Region>>,
    stats: Arc<MemStats>,
    stop: Arc<AtomicBool>,
    writer: Option<JoinHandle<()>>,
    pub mib: u32,
    pub pages_per_sec: u64,
}

impl MemLoad {
    /// Allocates `mib` MiB, writes every page once, and starts rewriting them round-robin at
    /// `pages_per_sec` (0: as fast as it can).
    pub fn start(mib: u32, pages_per_sec: u64) -> MemLoad {
        let count = mib as usize * (1 << 20) / PAGE_SIZE;
        let mut pages = vec![Page([0; WORDS]); count];
        for (i, page) in pages.iter_mut().enumerate() {
            fill(page, i as u64, 0);
        }
        let region = Arc::new(Mutex::new(Region {
            pages,
            next_version: 1,
        }));
        let stats = Arc::new(MemStats::default());
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let (region, stats, stop) = (region.clone(), stats.clone(), stop.clone());
            std::thread::spawn(move || write_loop(&region, &stats, &stop, pages_per_sec))
        };
        MemLoad {
            region,
            stats,
            stop,
            writer: Some(writer),
            mib,
            pages_per_sec,
        }
    }

    pub fn stats(&self) -> &MemStats {
        &self.stats
    }

    /// Checks every page against its own header while the writer waits.
    pub fn verify(&self) -> Verified {
        let region = self.region.lock().unwrap_or_else(PoisonError::into_inner);
        let errors = region
            .pages
            .iter()
            .enumerate()
            .filter(|(i, p)| !check(p, *i as u64, region.next_version))
            .count();
        Verified {
            pages: region.pages.len() as u64,
            errors: errors as u64,
        }
    }

    /// Flips one word of one page, for tests that must see `verify` fail.
    pub fn corrupt(&self, page: usize) {
        let mut region = self.region.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(p) = region.pages.get_mut(page) {
            p.0[WORDS / 2] ^= 1;
        }
    }
}

impl Drop for MemLoad {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(writer) = self.writer.take() {
            let _ = writer.join();
        }
    }
}

fn write_loop(region: &Mutex<Region>, stats: &MemStats, stop: &AtomicBool, pages_per_sec: u64) {
    let mut next_page = 0usize;
    let started = Instant::now();
    let mut written = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let due = if pages_per_sec == 0 {
            written + FLAT_OUT_BATCH
        } else {
            // Pace against the start time so that sleeping late does not lose rate.
            (started.elapsed().as_secs_f64() * pages_per_sec as f64) as u64
        };
        if due > written {
            let mut r = region.lock().unwrap_or_else(PoisonError::into_inner);
            let count = r.pages.len();
            if count == 0 {
                return;
            }
            for _ in written..due {
                let version = r.next_version;
                r.next_version += 1;
                fill(&mut r.pages[next_page], next_page as u64, version);
                next_page += 1;
                if next_page == count {
                    next_page = 0;
                    stats.passes.fetch_add(1, Ordering::Relaxed);
                }
            }
            stats
                .pages_written
                .fetch_add(due - written, Ordering::Relaxed);
            written = due;
        }
        if pages_per_sec != 0 {
            std::thread::sleep(TICK);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fresh_and_rewritten_pages_verify() {
        let load = MemLoad::start(1, 0);
        std::thread::sleep(Duration::from_millis(50));
        let v = load.verify();
        assert_eq!(
            v,
            Verified {
                pages: 256,
                errors: 0
            }
        );
        assert!(load.stats().pages_written.load(Ordering::Relaxed) > 256);
    }

    #[test]
    fn a_flipped_bit_is_found() {
        let load = MemLoad::start(1, 100);
        load.corrupt(7);
        assert_eq!(load.verify().errors, 1);
    }

    #[test]
    fn a_page_from_the_future_is_found() {
        let mut p = Page([0; WORDS]);
        fill(&mut p, 3, 10);
        assert!(check(&p, 3, 11));
        assert!(!check(&p, 3, 10), "version not yet written");
        assert!(!check(&p, 4, 11), "page of another index");
    }

    #[test]
    fn rate_is_respected() {
        let before = Instant::now();
        let load = MemLoad::start(1, 1000);
        std::thread::sleep(Duration::from_millis(300));
        let n = load.stats().pages_written.load(Ordering::Relaxed);
        let allowed = (before.elapsed().as_secs_f64() * 1000.0) as u64;
        // Pacing never runs ahead of the clock, however slow or busy the machine is.
        assert!(
            n > 0 && n <= allowed,
            "{n} pages written, {allowed} allowed"
        );
    }
}
