//! Frames of the replication stream: one ordered TCP connection per replicated VM.
//!
//! Every frame is
//!
//! ```text
//! offset  size  field
//!      0     4  magic "MCVR"
//!      4     1  kind (see [`Kind`])
//!      5     3  zero
//!      8     8  epoch (little endian; 0 = initial sync / not tied to an epoch)
//!     16     4  payload length in bytes (little endian), at most MAX_PAYLOAD
//!     20     n  payload (layout per kind, see `messages`)
//!   20+n     4  CRC32C of the 20 header bytes and the payload
//! ```
//!
//! The length is checked against the cap before anything is allocated, and the CRC
//! before the payload is looked at: a peer's bytes are untrusted input.

use std::io::{self, Read, Write};

pub const MAGIC: [u8; 4] = *b"MCVR";
pub const HEADER_LEN: usize = 20;
/// Largest payload a frame may carry: a page run of 256 pages with room to spare, or a
/// machine state of many vCPUs.
pub const MAX_PAYLOAD: u32 = 16 << 20;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    /// primary → secondary: protocol version, VM shape, generation.
    Hello = 1,
    /// secondary → primary: the handshake is accepted (with the secondary's disk digests).
    Accept = 2,
    /// either way: refused, with the reason as UTF-8.
    Refuse = 3,
    /// primary → secondary: a run of guest pages (epoch 0: initial sync).
    Pages = 4,
    /// primary → secondary: a chunk of a disk, initial sync.
    DiskChunk = 5,
    /// primary → secondary: a guest write to a disk, tagged with its epoch.
    DiskWrite = 6,
    /// primary → secondary: a checkpoint's frames follow.
    Begin = 7,
    /// primary → secondary: the machine state of the checkpoint.
    State = 8,
    /// primary → secondary: the checkpoint is complete (with counts to check it by).
    End = 9,
    /// secondary → primary: the checkpoint of this epoch is committed.
    Ack = 10,
    /// either way: still alive.
    Heartbeat = 11,
    /// primary → secondary: a planned switch; take over from the committed checkpoint.
    Takeover = 12,
    /// primary → secondary: the initial sync is complete (all RAM and disks sent).
    SyncDone = 13,
    /// primary → secondary: the primary ends this connection on purpose (and says why);
    /// the secondary must not take over.
    Goodbye = 14,
}

impl Kind {
    fn from_u8(v: u8) -> Option<Kind> {
        Some(match v {
            1 => Kind::Hello,
            2 => Kind::Accept,
            3 => Kind::Refuse,
            4 => Kind::Pages,
            5 => Kind::DiskChunk,
            6 => Kind::DiskWrite,
            7 => Kind::Begin,
            8 => Kind::State,
            9 => Kind::End,
            10 => Kind::Ack,
            11 => Kind::Heartbeat,
            12 => Kind::Takeover,
            13 => Kind::SyncDone,
            14 => Kind::Goodbye,
            _ => return None,
        })
    }
}

/// A bad frame, or the stream ending.
#[derive(Debug, thiserror::Error)]
pub enum WireError {
    /// The peer closed the connection between frames.
    #[error("the peer closed the connection")]
    Closed,
    #[error("no frame from the peer for {0} ms")]
    TimedOut(u64),
    #[error("connection: {0}")]
    Io(#[source] io::Error),
    #[error("not a replication frame (magic {0:02x?})")]
    BadMagic([u8; 4]),
    #[error("unknown frame kind {0}")]
    UnknownKind(u8),
    #[error("frame header has non-zero reserved bytes")]
    Reserved,
    #[error("{kind:?} frame of {len} bytes is over the limit of {MAX_PAYLOAD}")]
    TooLong { kind: Kind, len: u32 },
    #[error("{kind:?} frame of epoch {epoch}: checksum mismatch (corrupted in transit)")]
    Checksum { kind: Kind, epoch: u64 },
    #[error("{kind:?} frame of epoch {epoch}: {why}")]
    Malformed { kind: Kind, epoch: u64, why: String },
}

impl WireError {
    /// Whether the stream just stopped (closed or silent) rather than carried bad bytes.
    pub fn is_loss(&self) -> bool {
        matches!(self, WireError::Closed | WireError::TimedOut(_))
            || matches!(self, WireError::Io(e) if e.kind() != io::ErrorKind::InvalidData)
    }
}

/// One frame read from the stream. The payload lives in the reader's buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    pub kind: Kind,
    pub epoch: u64,
    pub len: u32,
}

impl Header {
    /// An error about this frame's payload.
    pub fn malformed(&self, why: impl Into<String>) -> WireError {
        WireError::Malformed {
            kind: self.kind,
            epoch: self.epoch,
            why: why.into(),
        }
    }
}

fn header_bytes(kind: Kind, epoch: u64, len: u32) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4] = kind as u8;
    h[8..16].copy_from_slice(&epoch.to_le_bytes());
    h[16..20].copy_from_slice(&len.to_le_bytes());
    h
}

/// Writes one frame whose payload is the concatenation of `parts` (so that page data is
/// not copied into a frame buffer first). Returns the bytes written.
pub fn write_frame(
    w: &mut impl Write,
    kind: Kind,
    epoch: u64,
    parts: &[&[u8]],
) -> io::Result<usize> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    let len32 = u32::try_from(len)
        .ok()
        .filter(|l| *l <= MAX_PAYLOAD)
        .ok_or_else(|| {
            io::Error::new(
                io::ErrorKind::InvalidInput,
                format!("{kind:?} frame of {len} bytes is over the limit"),
            )
        })?;
    let header = header_bytes(kind, epoch, len32);
    let mut crc = crc32c::crc32c(&header);
    w.write_all(&header)?;
    for p in parts {
        crc = crc32c::crc32c_append(crc, p);
        w.write_all(p)?;
    }
    w.write_all(&crc.to_le_bytes())?;
    Ok(HEADER_LEN + len + 4)
}

fn read_full(r: &mut impl Read, buf: &mut [u8], at_boundary: bool) -> Result<(), WireError> {
    let mut got = 0;
    while got < buf.len() {
        match r.read(&mut buf[got..]) {
            Ok(0) if got == 0 && at_boundary => return Err(WireError::Closed),
            Ok(0) => {
                return Err(WireError::Io(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "the connection closed in the middle of a frame",
                )))
            }
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(e) => return Err(WireError::Io(e)),
        }
    }
    Ok(())
}

/// Reads the next frame into `payload` (resized to fit) and checks it. A read timeout on
/// the stream shows as `Io` with `WouldBlock`/`TimedOut`; callers map it to `TimedOut`.
pub fn read_frame(r: &mut impl Read, payload: &mut Vec<u8>) -> Result<Header, WireError> {
    let mut h = [0u8; HEADER_LEN];
    read_full(r, &mut h, true)?;
    if h[..4] != MAGIC {
        return Err(WireError::BadMagic([h[0], h[1], h[2], h[3]]));
    }
    let kind = Kind::from_u8(h[4]).ok_or(WireError::UnknownKind(h[4]))?;
    if h[5..8] != [0, 0, 0] {
        return Err(WireError::Reserved);
    }
    let mut e = [0u8; 8];
    e.copy_from_slice(&h[8..16]);
    let epoch = u64::from_le_bytes(e);
    let len = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
    if len > MAX_PAYLOAD {
        return Err(WireError::TooLong { kind, len });
    }
    payload.resize(len as usize, 0);
    read_full(r, payload, false)?;
    let mut c = [0u8; 4];
    read_full(r, &mut c, false)?;
    let crc = crc32c::crc32c_append(crc32c::crc32c(&h), payload);
    if crc != u32::from_le_bytes(c) {
        return Err(WireError::Checksum { kind, epoch });
    }
    Ok(Header { kind, epoch, len })
}

/// `read_frame` on a stream with a read timeout of `timeout`: a peer silent that long is
/// `TimedOut`.
pub fn read_frame_within(
    r: &mut impl Read,
    payload: &mut Vec<u8>,
    timeout: std::time::Duration,
) -> Result<Header, WireError> {
    read_frame(r, payload).map_err(|e| match e {
        WireError::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ) =>
        {
            WireError::TimedOut(timeout.as_millis() as u64)
        }
        other => other,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn frame(kind: Kind, epoch: u64, payload: &[u8]) -> Vec<u8> {
        let mut out = Vec::new();
        write_frame(&mut out, kind, epoch, &[payload]).expect("write to a Vec");
        out
    }

    proptest! {
        #[test]
        fn frames_round_trip(kind in 1u8..=14, epoch: u64,
                             a in proptest::collection::vec(any::<u8>(), 0..300),
                             b in proptest::collection::vec(any::<u8>(), 0..300)) {
            let kind = Kind::from_u8(kind).expect("in range");
            let mut out = Vec::new();
            let n = write_frame(&mut out, kind, epoch, &[&a, &b]).expect("write");
            prop_assert_eq!(n, out.len());
            let mut payload = Vec::new();
            let h = read_frame(&mut out.as_slice(), &mut payload).expect("read");
            prop_assert_eq!(h, Header { kind, epoch, len: (a.len() + b.len()) as u32 });
            prop_assert_eq!(&payload[..a.len()], &a[..]);
            prop_assert_eq!(&payload[a.len()..], &b[..]);
        }

        #[test]
        fn any_flipped_bit_is_refused(epoch: u64,
                                      payload in proptest::collection::vec(any::<u8>(), 1..200),
                                      at: prop::sample::Index, bit in 0u8..8) {
            let mut f = frame(Kind::Pages, epoch, &payload);
            let i = at.index(f.len());
            f[i] ^= 1 << bit;
            let mut buf = Vec::new();
            // A flip may make the frame look longer than it is: then the stream ends early.
            prop_assert!(read_frame(&mut f.as_slice(), &mut buf).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..100)) {
            let mut buf = Vec::new();
            let _ = read_frame(&mut bytes.as_slice(), &mut buf);
        }
    }

    #[test]
    fn a_huge_length_is_refused_before_allocating() {
        let mut f = frame(Kind::State, 3, b"x");
        f[16..20].copy_from_slice(&u32::MAX.to_le_bytes());
        let mut buf = Vec::new();
        match read_frame(&mut f.as_slice(), &mut buf) {
            Err(WireError::TooLong {
                kind: Kind::State, ..
            }) => {}
            other => panic!("{other:?}"),
        }
        assert!(buf.capacity() < 1024);
    }

    #[test]
    fn a_silent_peer_is_a_timeout_and_counts_as_lost() {
        struct Silent;
        impl Read for Silent {
            fn read(&mut self, _: &mut [u8]) -> io::Result<usize> {
                Err(io::ErrorKind::WouldBlock.into())
            }
        }
        let mut buf = Vec::new();
        let e = read_frame_within(&mut Silent, &mut buf, std::time::Duration::from_millis(500))
            .expect_err("silent");
        assert!(matches!(e, WireError::TimedOut(500)), "{e:?}");
        assert!(e.is_loss());
    }

    #[test]
    fn clean_end_and_cut_frame_are_told_apart() {
        let mut buf = Vec::new();
        assert!(matches!(
            read_frame(&mut [].as_slice(), &mut buf),
            Err(WireError::Closed)
        ));
        let f = frame(Kind::Ack, 1, b"");
        let cut = &f[..f.len() - 1];
        assert!(matches!(
            read_frame(&mut &cut[..], &mut buf),
            Err(WireError::Io(_))
        ));
        assert!(matches!(
            read_frame(&mut &f[1..], &mut buf),
            Err(WireError::BadMagic(_))
        ));
        let mut k = f.clone();
        k[4] = 99;
        assert!(matches!(
            read_frame(&mut k.as_slice(), &mut buf),
            Err(WireError::UnknownKind(99))
        ));
    }
}
