//! Payloads of the frames in `wire`. Small control messages are serde structs in a fixed
//! binary encoding (bincode, fixed-width integers, a size limit); page runs and disk data
//! have a hand-made layout so that their bytes go from guest memory or a file to the
//! socket without an intermediate copy.
//!
//! ```text
//! Pages:      gpa u64 | count u32 | encoding u8 | 3 zero | data
//!             (raw: count*4096 bytes; lz4: a block that decompresses to count*4096)
//! DiskChunk,
//! DiskWrite:  disk u32 | 4 zero | offset u64 | data
//! ```

use bincode::Options;
use mcvmm_checkpoint::state::VmShape;
use mcvmm_checkpoint::PAGE_SIZE;
use serde::{de::DeserializeOwned, Deserialize, Serialize};

use crate::wire::{Header, WireError, MAX_PAYLOAD};

/// Version of this protocol. Primary and secondary must run the same one. (4: the
/// primary's goodbye.)
pub const PROTOCOL_VERSION: u32 = 4;
/// Pages in one `Pages` frame at most.
pub const MAX_RUN_PAGES: u32 = 256;
pub const PAGES_HEADER_LEN: usize = 16;
pub const DISK_HEADER_LEN: usize = 16;

fn codec() -> impl Options {
    bincode::DefaultOptions::new()
        .with_fixint_encoding()
        .with_limit(u64::from(MAX_PAYLOAD))
        .reject_trailing_bytes()
}

pub fn encode<T: Serialize>(v: &T) -> Vec<u8> {
    // Serializing plain structs into a Vec cannot fail; a failure would be a bug here.
    codec().serialize(v).unwrap_or_default()
}

pub fn decode<T: DeserializeOwned>(h: &Header, payload: &[u8]) -> Result<T, WireError> {
    codec()
        .deserialize(payload)
        .map_err(|e| h.malformed(format!("cannot decode: {e}")))
}

/// What the primary says first.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// `mcvmm_checkpoint::state::FORMAT_VERSION` of the primary.
    pub state_format: u32,
    pub shape: VmShape,
    /// Raised at every takeover: a secondary that took over refuses primaries of a
    /// generation not above its own.
    pub generation: u64,
    /// Disk chunk size for the initial sync's digests.
    pub chunk_bytes: u64,
}

/// The secondary's yes: the digest of every chunk of each of its disks, so that the
/// primary sends only the chunks that differ.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accept {
    pub disk_digests: Vec<Vec<u64>>,
}

/// What ends a checkpoint: counts the secondary checks its stage against, and optional
/// digests of the primary's memory and disks at the capture (verification runs).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct End {
    pub pages: u64,
    pub disk_writes: u64,
    pub memory_digest: Option<u64>,
    pub disk_digests: Option<Vec<u64>>,
}

/// Why a primary ends its connection on purpose (the `Goodbye` frame).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Farewell {
    /// `ctl stop` or SIGTERM: the guest ends with the primary.
    Stopped,
    /// The guest powered itself off.
    PoweredOff,
    /// The guest rebooted: the primary ends, and with it the guest (see the README).
    Rebooted,
    /// `ctl unprotect`: the guest runs on, unprotected; a new primary may come.
    Unprotected,
    /// The primary gave up on this secondary (silent, slow or lying) and runs on without
    /// it.
    SecondaryDropped,
}

impl Farewell {
    /// Whether the guest is gone for good: the secondary has nothing left to protect.
    pub fn guest_ended(self) -> bool {
        matches!(
            self,
            Farewell::Stopped | Farewell::PoweredOff | Farewell::Rebooted
        )
    }

    pub fn says(self) -> &'static str {
        match self {
            Farewell::Stopped => "the primary was stopped",
            Farewell::PoweredOff => "the guest powered off",
            Farewell::Rebooted => "the guest rebooted (its primary ends)",
            Farewell::Unprotected => "protection was ended on purpose (`ctl unprotect`)",
            Farewell::SecondaryDropped => "the primary dropped this secondary",
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Goodbye {
    pub why: Farewell,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum PageEncoding {
    Raw = 0,
    Lz4 = 1,
    /// LZ4 of the XOR against the pages the secondary holds, after their CRC32C
    /// (`delta`); checkpoints only.
    Delta = 2,
}

/// The fixed part of a `Pages` frame.
pub fn pages_header(gpa: u64, count: u32, encoding: PageEncoding) -> [u8; PAGES_HEADER_LEN] {
    let mut h = [0u8; PAGES_HEADER_LEN];
    h[..8].copy_from_slice(&gpa.to_le_bytes());
    h[8..12].copy_from_slice(&count.to_le_bytes());
    h[12] = encoding as u8;
    h
}

/// A `Pages` payload, checked for shape (not yet against guest memory).
pub struct PageRun<'a> {
    pub gpa: u64,
    pub count: u32,
    pub encoding: PageEncoding,
    pub data: &'a [u8],
}

pub fn parse_pages<'a>(h: &Header, p: &'a [u8]) -> Result<PageRun<'a>, WireError> {
    if p.len() < PAGES_HEADER_LEN {
        return Err(h.malformed("shorter than its header"));
    }
    let gpa = u64::from_le_bytes(p[..8].try_into().map_err(|_| h.malformed("gpa"))?);
    let count = u32::from_le_bytes(p[8..12].try_into().map_err(|_| h.malformed("count"))?);
    if p[13..16] != [0, 0, 0] {
        return Err(h.malformed("reserved bytes are not zero"));
    }
    if gpa % PAGE_SIZE != 0 {
        return Err(h.malformed(format!("address {gpa:#x} is not page aligned")));
    }
    if count == 0 || count > MAX_RUN_PAGES {
        return Err(h.malformed(format!("{count} pages in a run (1..={MAX_RUN_PAGES})")));
    }
    let encoding = match p[12] {
        0 => PageEncoding::Raw,
        1 => PageEncoding::Lz4,
        2 => PageEncoding::Delta,
        e => return Err(h.malformed(format!("unknown page encoding {e}"))),
    };
    let data = &p[PAGES_HEADER_LEN..];
    if encoding == PageEncoding::Raw && data.len() as u64 != u64::from(count) * PAGE_SIZE {
        return Err(h.malformed(format!("{} data bytes for {count} pages", data.len())));
    }
    Ok(PageRun {
        gpa,
        count,
        encoding,
        data,
    })
}

impl PageRun<'_> {
    /// The pages' bytes, decompressed into `scratch` if need be.
    pub fn bytes<'s>(
        &'s self,
        h: &Header,
        scratch: &'s mut Vec<u8>,
    ) -> Result<&'s [u8], WireError> {
        let want = self.count as usize * PAGE_SIZE as usize;
        match self.encoding {
            PageEncoding::Raw => Ok(self.data),
            PageEncoding::Lz4 => {
                scratch.resize(want, 0);
                let n = lz4_flex::block::decompress_into(self.data, scratch)
                    .map_err(|e| h.malformed(format!("lz4: {e}")))?;
                if n != want {
                    return Err(h.malformed(format!("lz4 gave {n} bytes, not {want}")));
                }
                Ok(&scratch[..want])
            }
            PageEncoding::Delta => Err(h.malformed("a delta run needs the pages it is based on")),
        }
    }

    /// A delta run's pages, rebuilt into `scratch` from `base`, the pages the receiver
    /// holds at the same addresses.
    pub fn rebuild<'s>(
        &self,
        h: &Header,
        base: &[u8],
        scratch: &'s mut Vec<u8>,
    ) -> Result<&'s [u8], WireError> {
        crate::delta::decode(self.data, base, scratch).map_err(|e| h.malformed(e.to_string()))?;
        Ok(&scratch[..base.len()])
    }
}

pub fn disk_header(disk: u32, offset: u64) -> [u8; DISK_HEADER_LEN] {
    let mut h = [0u8; DISK_HEADER_LEN];
    h[..4].copy_from_slice(&disk.to_le_bytes());
    h[8..16].copy_from_slice(&offset.to_le_bytes());
    h
}

/// A `DiskChunk` or `DiskWrite` payload: (disk, offset, data), checked for shape.
pub fn parse_disk<'a>(h: &Header, p: &'a [u8]) -> Result<(u32, u64, &'a [u8]), WireError> {
    if p.len() < DISK_HEADER_LEN {
        return Err(h.malformed("shorter than its header"));
    }
    if p[4..8] != [0, 0, 0, 0] {
        return Err(h.malformed("reserved bytes are not zero"));
    }
    let disk = u32::from_le_bytes(p[..4].try_into().map_err(|_| h.malformed("disk"))?);
    let offset = u64::from_le_bytes(p[8..16].try_into().map_err(|_| h.malformed("offset"))?);
    Ok((disk, offset, &p[DISK_HEADER_LEN..]))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::wire::Kind;
    use mcvmm_checkpoint::state::DiskShape;
    use proptest::prelude::*;

    fn hdr(kind: Kind) -> Header {
        Header {
            kind,
            epoch: 1,
            len: 0,
        }
    }

    #[test]
    fn hello_round_trips_and_trailing_bytes_are_refused() {
        let hello = Hello {
            protocol: PROTOCOL_VERSION,
            state_format: 1,
            shape: VmShape {
                mem_mib: 256,
                vcpus: 2,
                disks: vec![DiskShape {
                    size_bytes: 1 << 26,
                    read_only: false,
                }],
                net: Some([0x52, 0x54, 0, 1, 2, 3]),
            },
            generation: 7,
            chunk_bytes: 1 << 20,
        };
        let mut bytes = encode(&hello);
        let h = hdr(Kind::Hello);
        assert_eq!(decode::<Hello>(&h, &bytes).expect("decode"), hello);
        bytes.push(0);
        assert!(decode::<Hello>(&h, &bytes).is_err());
        assert!(decode::<Hello>(&h, &bytes[..bytes.len() - 5]).is_err());
    }

    #[test]
    fn page_runs_are_checked() {
        let h = hdr(Kind::Pages);
        let page = vec![7u8; PAGE_SIZE as usize];
        let mut p = pages_header(0x1000, 1, PageEncoding::Raw).to_vec();
        p.extend_from_slice(&page);
        let run = parse_pages(&h, &p).expect("good run");
        assert_eq!((run.gpa, run.count), (0x1000, 1));
        let mut unaligned = pages_header(0x1001, 1, PageEncoding::Raw).to_vec();
        unaligned.extend_from_slice(&page);
        assert!(parse_pages(&h, &unaligned).is_err());
        let mut short = pages_header(0x1000, 2, PageEncoding::Raw).to_vec();
        short.extend_from_slice(&page);
        assert!(parse_pages(&h, &short).is_err());
        let mut zero = pages_header(0, 0, PageEncoding::Raw).to_vec();
        zero.extend_from_slice(&page);
        assert!(parse_pages(&h, &zero).is_err());
        let mut bad_enc = p.clone();
        bad_enc[12] = 9;
        assert!(parse_pages(&h, &bad_enc).is_err());
    }

    proptest! {
        #[test]
        fn lz4_runs_round_trip(fill in proptest::collection::vec(any::<u8>(), 1..64), count in 1u32..4) {
            let h = hdr(Kind::Pages);
            let raw: Vec<u8> = fill.iter().copied().cycle().take(count as usize * PAGE_SIZE as usize).collect();
            let mut p = pages_header(0, count, PageEncoding::Lz4).to_vec();
            p.extend_from_slice(&lz4_flex::block::compress(&raw));
            let run = parse_pages(&h, &p).expect("parse");
            let mut scratch = Vec::new();
            prop_assert_eq!(run.bytes(&h, &mut scratch).expect("decompress"), &raw[..]);
        }

        #[test]
        fn arbitrary_payloads_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200)) {
            let h = hdr(Kind::Pages);
            if let Ok(run) = parse_pages(&h, &bytes) {
                let mut scratch = Vec::new();
                let _ = run.bytes(&h, &mut scratch);
            }
            let _ = parse_disk(&h, &bytes);
            let _ = decode::<Hello>(&h, &bytes);
            let _ = decode::<End>(&h, &bytes);
        }
    }
}
