//! The control protocol between the lab (outside) and `mcvmm-labd` (inside a test host),
//! carried on a virtio-serial port.
//!
//! Every message is a frame: `kind: u8 | len: u32 LE | payload[len]`. The lab sends one
//! request and reads frames until the one that ends the answer; there is never more than
//! one request in flight, so no ids are needed.
//!
//! | request (lab → labd)                          | answer (labd → lab)                    |
//! |-----------------------------------------------|----------------------------------------|
//! | `PING`                                        | `OK(version)`                          |
//! | `PUT mode:u32 path_len:u16 path data`         | `OK` or `ERR(msg)`                     |
//! | `GET path`                                    | `OK(contents)` or `ERR(msg)`           |
//! | `RUN timeout_ms:u32 command`                  | `STDOUT(..)`/`STDERR(..)`*, then `EXIT code:i32 timed_out:u8`, or `ERR(msg)` |

use std::io::{self, Read, Write};

/// Larger frames are refused before anything is allocated.
pub const MAX_FRAME: usize = 1 << 30;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Ping = 1,
    Put = 2,
    Get = 3,
    Run = 4,
    Ok = 10,
    Err = 11,
    Stdout = 12,
    Stderr = 13,
    Exit = 14,
}

impl Kind {
    fn from_u8(b: u8) -> Option<Kind> {
        Some(match b {
            1 => Kind::Ping,
            2 => Kind::Put,
            3 => Kind::Get,
            4 => Kind::Run,
            10 => Kind::Ok,
            11 => Kind::Err,
            12 => Kind::Stdout,
            13 => Kind::Stderr,
            14 => Kind::Exit,
            _ => return None,
        })
    }
}

#[derive(Debug, thiserror::Error)]
pub enum WireError {
    #[error("control channel: {0}")]
    Io(#[from] io::Error),
    #[error("control channel closed")]
    Closed,
    #[error("unknown frame kind {0}")]
    Kind(u8),
    #[error("frame of {0} bytes is over the limit")]
    TooLarge(usize),
    #[error("malformed {0} frame")]
    Malformed(&'static str),
}

pub fn write_frame(w: &mut impl Write, kind: Kind, parts: &[&[u8]]) -> Result<(), WireError> {
    let len: usize = parts.iter().map(|p| p.len()).sum();
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut head = [0u8; 5];
    head[0] = kind as u8;
    head[1..].copy_from_slice(&(len as u32).to_le_bytes());
    w.write_all(&head)?;
    for p in parts {
        w.write_all(p)?;
    }
    w.flush()?;
    Ok(())
}

pub fn read_frame(r: &mut impl Read) -> Result<(Kind, Vec<u8>), WireError> {
    let mut head = [0u8; 5];
    match r.read_exact(&mut head) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Err(WireError::Closed),
        Err(e) => return Err(e.into()),
    }
    let kind = Kind::from_u8(head[0]).ok_or(WireError::Kind(head[0]))?;
    let len = u32::from_le_bytes([head[1], head[2], head[3], head[4]]) as usize;
    if len > MAX_FRAME {
        return Err(WireError::TooLarge(len));
    }
    let mut payload = vec![0u8; len];
    r.read_exact(&mut payload).map_err(|e| match e.kind() {
        io::ErrorKind::UnexpectedEof => WireError::Closed,
        _ => e.into(),
    })?;
    Ok((kind, payload))
}

/// `PUT` payload: (mode, path, data).
pub fn encode_put(mode: u32, path: &str, data_len: usize) -> Result<Vec<u8>, WireError> {
    let plen = u16::try_from(path.len()).map_err(|_| WireError::Malformed("PUT"))?;
    if data_len > MAX_FRAME {
        return Err(WireError::TooLarge(data_len));
    }
    let mut head = Vec::with_capacity(6 + path.len());
    head.extend_from_slice(&mode.to_le_bytes());
    head.extend_from_slice(&plen.to_le_bytes());
    head.extend_from_slice(path.as_bytes());
    Ok(head)
}

pub fn decode_put(p: &[u8]) -> Result<(u32, String, &[u8]), WireError> {
    let bad = WireError::Malformed("PUT");
    if p.len() < 6 {
        return Err(bad);
    }
    let mode = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let plen = u16::from_le_bytes([p[4], p[5]]) as usize;
    let path = p.get(6..6 + plen).ok_or(WireError::Malformed("PUT"))?;
    let path = String::from_utf8(path.to_vec()).map_err(|_| bad)?;
    Ok((mode, path, &p[6 + plen..]))
}

pub fn encode_run(timeout_ms: u32, command: &str) -> Vec<u8> {
    let mut p = timeout_ms.to_le_bytes().to_vec();
    p.extend_from_slice(command.as_bytes());
    p
}

pub fn decode_run(p: &[u8]) -> Result<(u32, String), WireError> {
    if p.len() < 4 {
        return Err(WireError::Malformed("RUN"));
    }
    let timeout = u32::from_le_bytes([p[0], p[1], p[2], p[3]]);
    let cmd = String::from_utf8(p[4..].to_vec()).map_err(|_| WireError::Malformed("RUN"))?;
    Ok((timeout, cmd))
}

pub fn encode_exit(code: i32, timed_out: bool) -> [u8; 5] {
    let mut p = [0u8; 5];
    p[..4].copy_from_slice(&code.to_le_bytes());
    p[4] = timed_out as u8;
    p
}

pub fn decode_exit(p: &[u8]) -> Result<(i32, bool), WireError> {
    if p.len() != 5 {
        return Err(WireError::Malformed("EXIT"));
    }
    Ok((i32::from_le_bytes([p[0], p[1], p[2], p[3]]), p[4] != 0))
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn frame_round_trip_and_limits() {
        let mut buf = Vec::new();
        let head = encode_put(0o755, "bin/x", 3).expect("encode");
        write_frame(&mut buf, Kind::Put, &[&head, b"abc"]).expect("write");
        let (kind, payload) = read_frame(&mut buf.as_slice()).expect("read");
        assert_eq!(kind, Kind::Put);
        let (mode, path, data) = decode_put(&payload).expect("decode");
        assert_eq!((mode, path.as_str(), data), (0o755, "bin/x", &b"abc"[..]));

        let huge = [Kind::Ok as u8, 0xff, 0xff, 0xff, 0xff];
        assert!(matches!(
            read_frame(&mut &huge[..]),
            Err(WireError::TooLarge(_))
        ));
        assert!(matches!(
            read_frame(&mut &[99u8, 0, 0, 0, 0][..]),
            Err(WireError::Kind(99))
        ));
        assert!(matches!(
            read_frame(&mut &[10u8, 4, 0][..]),
            Err(WireError::Closed)
        ));
    }

    proptest! {
        #[test]
        fn decoders_never_panic(p in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = decode_put(&p);
            let _ = decode_run(&p);
            let _ = decode_exit(&p);
            let _ = read_frame(&mut p.as_slice());
        }
    }
}
