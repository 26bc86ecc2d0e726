//! Connecting to the secondary, the handshake, and starting the sender and reader
//! threads on the connection.

use std::io::BufWriter;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, AtomicU64};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use super::link::{acks, Link, LinkStats};
use super::sender::sender;
use super::{PageCoding, PrimaryError};
use crate::gate::HeldOutput;
use crate::messages::{self, Accept, Hello};
use crate::wire::{self, Kind, WireError};

/// Connects to the secondary (retrying until `wait` is over: it may be starting) and
/// does the handshake.
pub fn connect(
    peer: &str,
    hello: &Hello,
    wait: Duration,
) -> Result<(TcpStream, Accept), PrimaryError> {
    let started = Instant::now();
    let connect_err = |source| PrimaryError::Connect {
        peer: peer.to_string(),
        source,
    };
    let mut said = false;
    let mut stream = loop {
        let addrs: Vec<_> = peer.to_socket_addrs().map_err(connect_err)?.collect();
        let attempt = addrs
            .first()
            .ok_or_else(|| connect_err(std::io::Error::other("no address")))
            .and_then(|a| {
                TcpStream::connect_timeout(a, Duration::from_secs(2)).map_err(connect_err)
            });
        match attempt {
            Ok(s) => break s,
            Err(e) if started.elapsed() >= wait => return Err(e),
            Err(e) => {
                if !said {
                    tracing::info!("waiting for the secondary ({e})");
                    said = true;
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        }
    };
    let _ = stream.set_nodelay(true);
    let hs = |source| PrimaryError::Handshake {
        peer: peer.to_string(),
        source,
    };
    wire::write_frame(&mut stream, Kind::Hello, 0, &[&messages::encode(hello)])
        .map_err(|e| hs(WireError::Io(e)))?;
    // Reading its disks' digests takes the secondary a while.
    stream
        .set_read_timeout(Some(Duration::from_secs(120)))
        .map_err(connect_err)?;
    let mut payload = Vec::new();
    let h = wire::read_frame(&mut stream, &mut payload).map_err(hs)?;
    match h.kind {
        Kind::Accept => Ok((stream, messages::decode(&h, &payload).map_err(hs)?)),
        Kind::Refuse => Err(PrimaryError::Refused {
            peer: peer.to_string(),
            reason: String::from_utf8_lossy(&payload).into_owned(),
        }),
        kind => Err(PrimaryError::Unexpected {
            peer: peer.to_string(),
            kind,
        }),
    }
}

/// Starts the sender and reader threads on a connection that passed the handshake.
pub fn start(
    stream: TcpStream,
    peer: &str,
    gate: Arc<HeldOutput>,
    timeout: Duration,
    coding: PageCoding,
    fenced: bool,
) -> std::io::Result<Arc<Link>> {
    let (tx, rx) = mpsc::sync_channel(2);
    let link = Arc::new(Link {
        stats: Mutex::new(LinkStats {
            peer: peer.to_string(),
            ..LinkStats::default()
        }),
        lost: AtomicBool::new(false),
        acked: AtomicU64::new(0),
        in_flight: AtomicU64::new(0),
        taken: Mutex::new(Vec::new()),
        handed_over: AtomicBool::new(false),
        fenced,
        keep_open: Mutex::new(Some(stream.try_clone()?)),
        gate,
        jobs: Mutex::new(Some(tx)),
        coding,
        spare: Mutex::new(Vec::new()),
        on_progress: Mutex::new(None),
    });
    let mut reader = stream.try_clone()?;
    reader.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout.max(Duration::from_secs(5))))?;
    let l = link.clone();
    std::thread::Builder::new()
        .name("repl-send".into())
        .spawn(move || {
            let mut w = BufWriter::with_capacity(1 << 20, stream);
            if let Err(e) = sender(&l, &rx, &mut w) {
                l.lose(&format!("sending: {e}"));
            }
        })?;
    let l = link.clone();
    std::thread::Builder::new()
        .name("repl-recv".into())
        .spawn(move || {
            let why = acks(&l, &mut reader, timeout);
            l.lose(&why);
        })?;
    Ok(link)
}
