//! Page runs encoded against the version the secondary already holds. Most pages a
//! running guest dirties in an epoch change in a few bytes (timers, counters, list
//! heads), so `new XOR old` is mostly zeros and LZ4 shrinks it to a few dozen bytes.
//!
//! The primary keeps the last version it sent of recently sent pages ([`SentPages`], a
//! direct-mapped cache: a page whose slot another page took is simply sent whole). The
//! secondary needs no cache: its committed image holds exactly the versions the primary
//! sent, because a checkpoint is applied whole or the link is dropped, and a new link
//! starts with an empty cache. Each delta run carries the CRC32C of the pages it
//! rebuilds, so a base that differs is caught on the secondary, never applied.

use mcvmm_checkpoint::PAGE_SIZE;

const PAGE: usize = PAGE_SIZE as usize;
/// Size of the CRC32C in front of a delta run's LZ4 data.
const CRC_LEN: usize = 4;

#[derive(Debug, thiserror::Error)]
pub enum DeltaError {
    #[error("delta run shorter than its checksum")]
    Short,
    #[error("delta run: lz4: {0}")]
    Lz4(String),
    #[error("delta run: lz4 gave {got} bytes, not {want}")]
    Length { got: usize, want: usize },
    #[error("delta run: the rebuilt pages do not match their checksum (the base differs from the primary's)")]
    Checksum,
}

/// The versions of pages last sent on one link, by guest physical address.
pub struct SentPages {
    /// The address each slot holds, `u64::MAX` for none.
    tags: Vec<u64>,
    data: Vec<u8>,
}

impl SentPages {
    /// A cache of `mib` MiB (at least one page). Its memory is touched only as pages
    /// are sent.
    pub fn new(mib: u64) -> SentPages {
        let slots = ((mib << 20) / PAGE_SIZE).max(1) as usize;
        SentPages {
            tags: vec![u64::MAX; slots],
            data: vec![0; slots * PAGE],
        }
    }

    fn slot(&self, gpa: u64) -> usize {
        ((gpa / PAGE_SIZE) % self.tags.len() as u64) as usize
    }

    fn get(&self, gpa: u64) -> Option<&[u8]> {
        let s = self.slot(gpa);
        (self.tags[s] == gpa).then(|| &self.data[s * PAGE..(s + 1) * PAGE])
    }

    /// Whether `page` at `gpa` is the version last sent: the secondary holds it already.
    pub fn unchanged(&self, gpa: u64, page: &[u8]) -> bool {
        self.get(gpa) == Some(page)
    }

    /// Remembers the run of pages at `gpa` as sent.
    pub fn put(&mut self, gpa: u64, pages: &[u8]) {
        for (i, page) in pages.chunks_exact(PAGE).enumerate() {
            let addr = gpa + (i * PAGE) as u64;
            let s = self.slot(addr);
            self.tags[s] = addr;
            self.data[s * PAGE..(s + 1) * PAGE].copy_from_slice(page);
        }
    }

    /// Encodes the run at `gpa` against the versions sent before, into `out` (checksum,
    /// then LZ4 of the XOR), if every page of it is cached and the result is worth it
    /// (smaller by an eighth). `xor` is scratch space.
    pub fn encode(&self, gpa: u64, pages: &[u8], xor: &mut Vec<u8>, out: &mut Vec<u8>) -> bool {
        xor.clear();
        for (i, page) in pages.chunks_exact(PAGE).enumerate() {
            let Some(old) = self.get(gpa + (i * PAGE) as u64) else {
                return false;
            };
            xor.extend(page.iter().zip(old).map(|(a, b)| a ^ b));
        }
        out.clear();
        out.extend_from_slice(&crc32c::crc32c(pages).to_le_bytes());
        out.resize(
            CRC_LEN + lz4_flex::block::get_maximum_output_size(xor.len()),
            0,
        );
        match lz4_flex::block::compress_into(xor, &mut out[CRC_LEN..]) {
            Ok(n) if CRC_LEN + n < pages.len() - pages.len() / 8 => {
                out.truncate(CRC_LEN + n);
                true
            }
            _ => false,
        }
    }
}

/// Rebuilds a delta run's pages from `payload` and the pages the secondary holds at the
/// same addresses (`base`), into `out`; the run is `base.len()` bytes.
pub fn decode(payload: &[u8], base: &[u8], out: &mut Vec<u8>) -> Result<(), DeltaError> {
    let (crc, lz) = payload.split_at_checked(CRC_LEN).ok_or(DeltaError::Short)?;
    let want = base.len();
    out.resize(want, 0);
    let got =
        lz4_flex::block::decompress_into(lz, out).map_err(|e| DeltaError::Lz4(e.to_string()))?;
    if got != want {
        return Err(DeltaError::Length { got, want });
    }
    for (o, b) in out.iter_mut().zip(base) {
        *o ^= b;
    }
    let crc = u32::from_le_bytes([crc[0], crc[1], crc[2], crc[3]]);
    if crc32c::crc32c(out) != crc {
        return Err(DeltaError::Checksum);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn page(fill: u8) -> Vec<u8> {
        (0..PAGE)
            .map(|i| fill.wrapping_add((i % 251) as u8))
            .collect()
    }

    #[test]
    fn a_page_changed_in_a_few_bytes_goes_small_and_comes_back_whole() {
        let mut sent = SentPages::new(1);
        let old = [page(1), page(2)].concat();
        let (mut xor, mut out, mut rebuilt) = (Vec::new(), Vec::new(), Vec::new());
        assert!(
            !sent.encode(0x1000, &old, &mut xor, &mut out),
            "nothing sent yet: no delta"
        );
        sent.put(0x1000, &old);
        let mut new = old.clone();
        new[17] ^= 0xff;
        new[PAGE + 100..PAGE + 108].copy_from_slice(&42u64.to_le_bytes());
        assert!(sent.encode(0x1000, &new, &mut xor, &mut out));
        assert!(
            out.len() < 100,
            "{} bytes for two nearly equal pages",
            out.len()
        );
        decode(&out, &old, &mut rebuilt).expect("decodes");
        assert_eq!(rebuilt, new);
    }

    #[test]
    fn a_base_that_differs_is_caught_not_applied() {
        let mut sent = SentPages::new(1);
        let old = page(7);
        sent.put(0, &old);
        let mut new = old.clone();
        new[0] ^= 1;
        let (mut xor, mut out, mut rebuilt) = (Vec::new(), Vec::new(), Vec::new());
        assert!(sent.encode(0, &new, &mut xor, &mut out));
        let mut other_base = old.clone();
        other_base[4000] ^= 0x10;
        assert!(matches!(
            decode(&out, &other_base, &mut rebuilt),
            Err(DeltaError::Checksum)
        ));
        assert!(matches!(
            decode(&out[..3], &old, &mut rebuilt),
            Err(DeltaError::Short)
        ));
        assert!(decode(&out, &old[..PAGE / 2], &mut rebuilt).is_err());
    }

    #[test]
    fn a_slot_taken_by_another_page_is_a_miss() {
        // One page of cache: every address shares the slot.
        let mut sent = SentPages::new(0);
        let (mut xor, mut out) = (Vec::new(), Vec::new());
        sent.put(0x2000, &page(3));
        sent.put(0x5000, &page(4));
        assert!(!sent.encode(0x2000, &page(3), &mut xor, &mut out));
        assert!(sent.encode(0x5000, &page(4), &mut xor, &mut out));
    }

    #[test]
    fn rewritten_pages_are_not_sent_as_deltas() {
        let mut sent = SentPages::new(1);
        sent.put(0, &page(0));
        let noise: Vec<u8> = (0..PAGE as u32)
            .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
            .collect();
        let (mut xor, mut out) = (Vec::new(), Vec::new());
        assert!(!sent.encode(0, &noise, &mut xor, &mut out));
    }
}
