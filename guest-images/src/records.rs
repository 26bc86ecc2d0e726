//! Records for acknowledged-write tests: a client writes record `seq` of a run at offset
//! `seq * RECORD_SIZE`, and whoever holds the disk afterwards can tell, for each slot,
//! whether the exact record is there.

pub const RECORD_SIZE: usize = 512;
const MAGIC: &[u8; 8] = b"MCVMMREC";

/// The bytes of record `seq` of run `run` (a run id keeps old disk contents from passing).
pub fn record(run: u64, seq: u64) -> [u8; RECORD_SIZE] {
    let mut r = [0u8; RECORD_SIZE];
    r[..8].copy_from_slice(MAGIC);
    r[8..16].copy_from_slice(&run.to_le_bytes());
    r[16..24].copy_from_slice(&seq.to_le_bytes());
    let mut x = run ^ seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ 1;
    for chunk in r[24..].chunks_mut(8) {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        chunk.copy_from_slice(&x.to_le_bytes()[..chunk.len()]);
    }
    r
}

pub fn offset(seq: u64) -> u64 {
    seq * RECORD_SIZE as u64
}

/// Which of records `0..count` of `run` are intact in `disk` (the whole disk's bytes).
pub fn missing(disk: &[u8], run: u64, count: u64) -> Vec<u64> {
    (0..count)
        .filter(|&seq| {
            let start = offset(seq) as usize;
            disk.get(start..start + RECORD_SIZE) != Some(&record(run, seq)[..])
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn records_are_found_and_damage_is_seen() {
        let mut disk = vec![0u8; RECORD_SIZE * 4];
        for seq in 0..3 {
            let at = offset(seq) as usize;
            disk[at..at + RECORD_SIZE].copy_from_slice(&record(7, seq));
        }
        assert_eq!(missing(&disk, 7, 4), vec![3]);
        assert_eq!(
            missing(&disk, 8, 1),
            vec![0],
            "another run's record does not count"
        );
        disk[RECORD_SIZE + 100] ^= 1;
        assert_eq!(missing(&disk, 7, 3), vec![1]);
        assert_eq!(
            missing(&disk, 7, 100).len(),
            100 - 3 + 1,
            "past the end is missing"
        );
    }
}
