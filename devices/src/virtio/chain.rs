//! A descriptor chain of a split virtqueue, read from one copy of the descriptor table.
//!
//! Walking the guest's table a descriptor at a time (a guest-memory access each, as
//! virtio-queue's chain iterator does) cost a 512 KiB block request of 130 descriptors
//! 50-55 µs in a test host; copying the table and walking the copy, 13-15 µs (3% more
//! read throughput). Each descriptor is also read once only, so what is checked is what
//! is used.

use vm_memory::GuestAddress;

pub const DESC_SIZE: usize = 16;
const DESC_F_NEXT: u16 = 1;
const DESC_F_WRITE: u16 = 2;
const DESC_F_INDIRECT: u16 = 4;
/// The largest table walked; a descriptor past it breaks the chain. The queues here are
/// at most this size.
pub const MAX_QUEUE_SIZE: usize = 256;

/// One descriptor: guest address, length, device-writable.
pub type Desc = (GuestAddress, u32, bool);

/// The descriptors of the chain at `head` in `table` (a copy of the queue's descriptor
/// table), at most `max` of them, and whether the chain is broken: it comes back to a
/// descriptor it already used (seen where the loop closes), names a descriptor outside
/// the table, or uses an indirect table (not offered by these devices).
pub fn from_table(table: &[u8], head: u16, max: usize) -> (Vec<Desc>, bool) {
    let mut descs = Vec::with_capacity(max);
    let mut seen = [0u64; MAX_QUEUE_SIZE.div_ceil(64)];
    let mut index = usize::from(head);
    while descs.len() < max {
        let (Some(d), Some(word)) = (
            table.get(index * DESC_SIZE..(index + 1) * DESC_SIZE),
            seen.get_mut(index / 64),
        ) else {
            return (descs, true);
        };
        let bit = 1u64 << (index % 64);
        if *word & bit != 0 {
            return (descs, true);
        }
        *word |= bit;
        let field = |at: usize, n: usize| {
            d[at..at + n]
                .iter()
                .rev()
                .fold(0u64, |v, b| (v << 8) | u64::from(*b))
        };
        let (addr, len) = (field(0, 8), field(8, 4) as u32);
        let (flags, next) = (field(12, 2) as u16, field(14, 2) as u16);
        if flags & DESC_F_INDIRECT != 0 {
            return (descs, true);
        }
        descs.push((GuestAddress(addr), len, flags & DESC_F_WRITE != 0));
        if flags & DESC_F_NEXT == 0 {
            return (descs, false);
        }
        index = usize::from(next);
    }
    (descs, false)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn indirect_tables_and_indices_past_the_table_are_refused() {
        let table = |descs: &[(u64, u32, u16, u16)]| {
            let mut t = vec![0u8; 16 * DESC_SIZE];
            for (i, &(addr, len, flags, next)) in descs.iter().enumerate() {
                let d = &mut t[i * DESC_SIZE..(i + 1) * DESC_SIZE];
                d[..8].copy_from_slice(&addr.to_le_bytes());
                d[8..12].copy_from_slice(&len.to_le_bytes());
                d[12..14].copy_from_slice(&flags.to_le_bytes());
                d[14..].copy_from_slice(&next.to_le_bytes());
            }
            t
        };
        let good = table(&[(0x4000, 16, 1, 1), (0x5000, 512, 3, 2), (0x6000, 1, 2, 0)]);
        let (descs, broken) = from_table(&good, 0, 131);
        assert!(!broken);
        assert_eq!(
            descs,
            vec![
                (GuestAddress(0x4000), 16, false),
                (GuestAddress(0x5000), 512, true),
                (GuestAddress(0x6000), 1, true)
            ]
        );
        // A loop among indices above 64, which live in other words of the set.
        let mut high = vec![0u8; 256 * DESC_SIZE];
        for (i, next) in [(70usize, 200u16), (200, 130), (130, 200)] {
            let d = &mut high[i * DESC_SIZE..(i + 1) * DESC_SIZE];
            d[8..12].copy_from_slice(&512u32.to_le_bytes());
            d[12..14].copy_from_slice(&3u16.to_le_bytes());
            d[14..].copy_from_slice(&next.to_le_bytes());
        }
        let (descs, broken) = from_table(&high, 70, 131);
        assert!(broken, "a loop between 200 and 130");
        assert_eq!(descs.len(), 3, "seen where it closes");
        let indirect = table(&[(0x4000, 16, 1, 1), (0x5000, 64, 4, 0)]);
        assert!(from_table(&indirect, 0, 131).1, "an indirect table");
        let past = table(&[(0x4000, 16, 1, 16)]);
        assert!(from_table(&past, 0, 131).1, "next past the table");
        assert!(from_table(&good, 16, 131).1, "head past the table");
    }
}
