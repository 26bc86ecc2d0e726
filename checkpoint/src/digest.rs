//! A fast 64-bit digest for checkpoint data: checksums of snapshot files and the digest
//! of all guest memory at a pause. It guards against truncation, corruption and mixing
//! up files, not against an adversary.

const K: [u64; 4] = [
    0x9e37_79b9_7f4a_7c15,
    0xc2b2_ae3d_27d4_eb4f,
    0x1656_67b1_9e37_79f9,
    0x85eb_ca77_c2b2_ae63,
];

/// Streaming digest: feed bytes with `update`, read with `finish`. The same bytes give the
/// same digest however they are split.
#[derive(Clone)]
pub struct Digest {
    lanes: [u64; 4],
    pending: Vec<u8>,
    len: u64,
}

impl Default for Digest {
    fn default() -> Self {
        Digest {
            lanes: K,
            pending: Vec::with_capacity(32),
            len: 0,
        }
    }
}

fn mix(lane: u64, word: u64, k: u64) -> u64 {
    (lane ^ word).wrapping_mul(k).rotate_left(29)
}

impl Digest {
    fn block(&mut self, b: &[u8]) {
        for (i, w) in b.chunks_exact(8).enumerate() {
            let mut word = [0u8; 8];
            word.copy_from_slice(w);
            self.lanes[i] = mix(self.lanes[i], u64::from_le_bytes(word), K[i]);
        }
    }

    pub fn update(&mut self, mut data: &[u8]) {
        self.len += data.len() as u64;
        if !self.pending.is_empty() {
            let take = (32 - self.pending.len()).min(data.len());
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            if self.pending.len() < 32 {
                return;
            }
            let full = std::mem::take(&mut self.pending);
            self.block(&full);
            self.pending = full;
            self.pending.clear();
        }
        let mut blocks = data.chunks_exact(32);
        for b in &mut blocks {
            self.block(b);
        }
        self.pending.extend_from_slice(blocks.remainder());
    }

    pub fn finish(&self) -> u64 {
        let mut tail = self.pending.clone();
        tail.resize(32, 0);
        let mut d = self.clone();
        d.block(&tail);
        let mut h = self.len.wrapping_mul(K[0]);
        for (lane, k) in d.lanes.iter().zip(K) {
            h = mix(h, *lane, k);
        }
        h ^ (h >> 31)
    }
}

/// The digest of one buffer.
pub fn of(data: &[u8]) -> u64 {
    let mut d = Digest::default();
    d.update(data);
    d.finish()
}

/// Guest memory, and the memory file of a full snapshot, are digested in chunks of this
/// many bytes, counted from the start of each RAM region (a region's last chunk may be
/// shorter). A snapshot then checksums its file while copying it, takes again only the
/// chunks a pause patched, and a restore skips chunks that are holes in the file.
pub const CHUNK: usize = 1 << 20;

/// The digest of a sequence of chunk digests, in region order: the digest of all memory.
pub fn of_chunks(chunks: impl IntoIterator<Item = u64>) -> u64 {
    let mut d = Digest::default();
    for c in chunks {
        d.update(&c.to_le_bytes());
    }
    d.finish()
}

/// The digest of `len` zero bytes, remembered for the last length asked: the chunk digest
/// of a hole.
#[derive(Default)]
pub struct Zeros {
    last: Option<(usize, u64)>,
}

impl Zeros {
    pub fn digest(&mut self, len: usize) -> u64 {
        match self.last {
            Some((l, d)) if l == len => d,
            _ => {
                let d = of(&vec![0u8; len]);
                self.last = Some((len, d));
                d
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splitting_does_not_matter_and_a_flipped_bit_does() {
        let data: Vec<u8> = (0..1000u32).map(|i| (i * 7 + 3) as u8).collect();
        let whole = of(&data);
        for split in [0, 1, 31, 32, 33, 500, 999] {
            let mut d = Digest::default();
            d.update(&data[..split]);
            d.update(&data[split..]);
            assert_eq!(d.finish(), whole, "split at {split}");
        }
        let mut flipped = data.clone();
        flipped[517] ^= 4;
        assert_ne!(of(&flipped), whole);
        assert_ne!(of(&data[..999]), whole, "truncation");
        assert_ne!(of(&[0u8; 64]), of(&[0u8; 65]), "zeros of another length");
    }

    #[test]
    fn zeros_and_chunk_lists() {
        let mut z = Zeros::default();
        assert_eq!(z.digest(4096), of(&[0u8; 4096]));
        assert_eq!(
            z.digest(100),
            of(&[0u8; 100]),
            "another length is not the cached one"
        );
        assert_ne!(of_chunks([1, 2]), of_chunks([2, 1]), "order matters");
        assert_ne!(of_chunks([1]), of_chunks([1, 1]));
    }
}
