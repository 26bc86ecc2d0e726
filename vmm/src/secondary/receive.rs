//! Receiving from one accepted primary until its stream ends, and what that end means
//! (see `verdict`).

use std::io::BufReader;
use std::net::{Shutdown, TcpListener, TcpStream};
use std::os::fd::AsRawFd;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use mcvmm_replication::disk::Disks;
use mcvmm_replication::secondary::{self, Ended, Patient, Receiver};

use super::listen::silence_rule;
use super::verdict::{verdict, Verdict};
use super::{refuse, SecondaryConfig, SecondaryError, Session, Shared};

/// How often the replicas are synced while a primary streams: an acknowledged checkpoint
/// is in the replicas' page cache at once, and on their disks within this.
const REPLICA_SYNC_EVERY: Duration = Duration::from_secs(1);

/// How receiving from one primary ended.
pub(super) enum Received {
    /// The primary was dropped, alive, or ended protection on purpose: the disks go back
    /// to waiting for the next one.
    Dropped(Disks),
    /// The primary may be alive or dead, and there is no fence to ask: its last commit
    /// is kept for the operator.
    Orphaned { why: String, rx: Box<Receiver> },
    /// The guest ended on the primary.
    GuestEnded(String),
    /// The primary is gone (or handed over): take over from what was committed, once
    /// the fence (if any) says so.
    Gone {
        why: String,
        detected: Instant,
        rx: Box<Receiver>,
    },
}

/// Receives the sync and the checkpoints of an accepted primary, answering with
/// heartbeats, until its stream ends; then judges what that means (see `verdict`).
pub(super) fn receive(
    session: &Session,
    cfg: &SecondaryConfig,
    shared: &Arc<Shared>,
    listener: &TcpListener,
    fenced: bool,
    disks: Disks,
) -> Result<Received, SecondaryError> {
    let Session {
        stream, peer, mem, ..
    } = session;
    let connection = |source| SecondaryError::Connection {
        peer: peer.clone(),
        source,
    };
    shared.set_phase("syncing");
    let _ = stream.set_nodelay(true);
    stream
        .set_read_timeout(Some(Patient::<TcpStream>::poll_interval(cfg.timeout)))
        .map_err(connection)?;
    stream
        .set_write_timeout(Some(cfg.timeout))
        .map_err(connection)?;
    shared.set_primary(Some((
        peer.clone(),
        stream.try_clone().map_err(connection)?,
    )));
    let replies = Arc::new(Mutex::new(stream.try_clone().map_err(connection)?));
    let stop_beats = Arc::new(AtomicBool::new(false));
    let beats = secondary::heartbeats(
        replies.clone(),
        mcvmm_replication::primary::HEARTBEAT,
        stop_beats.clone(),
    );
    let background = disks
        .sync_in_background(REPLICA_SYNC_EVERY)
        .map_err(connection)?;
    let mut rx = Receiver::new(mem.clone(), disks, shared.progress.clone());
    let patient = Patient::new(
        stream.try_clone().map_err(connection)?,
        cfg.timeout,
        silence_rule(shared.clone(), listener.as_raw_fd(), fenced),
    );
    let mut reader = BufReader::with_capacity(1 << 20, patient);
    let ended = rx.run(&mut reader, &replies, cfg.timeout);
    let detected = Instant::now();
    drop(background);
    let silent_for = reader.get_ref().silent_for();
    stop_beats.store(true, Ordering::SeqCst);
    shared.set_primary(None);
    let operator = shared.operator_takeover.load(Ordering::SeqCst);
    let v = verdict(&ended, silent_for, cfg.timeout, fenced, operator);
    if !matches!(v, Verdict::TakeOver(_)) || rx.committed() == 0 {
        if let Ended::Refused(e) = &ended {
            refuse(stream, &e.to_string());
        }
        let _ = stream.shutdown(Shutdown::Both);
        let _ = beats.join();
    } else {
        let _ = stream.shutdown(Shutdown::Both);
        // Not joined: it may be asleep until its next beat, and it ends by itself.
        drop(beats);
    }
    Ok(match v {
        Verdict::End(why) => Received::GuestEnded(why),
        Verdict::Wait(why) => {
            tracing::warn!("{why}; waiting for a primary");
            shared.set_phase("waiting for a primary");
            Received::Dropped(rx.disks)
        }
        Verdict::Keep(_) | Verdict::TakeOver(_) if rx.committed() == 0 => {
            tracing::warn!(
                "primary {peer} gone before the first checkpoint committed: nothing consistent to run; waiting for a primary"
            );
            shared.set_phase("waiting for a primary");
            Received::Dropped(rx.disks)
        }
        Verdict::Keep(why) => Received::Orphaned {
            why,
            rx: Box::new(rx),
        },
        Verdict::TakeOver(why) => Received::Gone {
            why,
            detected,
            rx: Box::new(rx),
        },
    })
}
