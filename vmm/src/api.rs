//! The control socket: one request line per connection, one JSON reply.
//!
//! Requests: `status`, `stop`, `pause`, `resume` (vCPUs out of KVM_RUN and the devices
//! parked, and back), `snapshot DIR [incremental]` (see `snapshot`),
//! `selfcheck EPOCHS INTERVAL_MS [guest-only]` and `epochs EPOCHS INTERVAL_MS` (see
//! `epochs`); on a replicating primary `verify` (digests with the next checkpoint),
//! `selfcheck` (on its own checkpoints) and `failover` (planned switch, see `primary`);
//! on an unprotected guest
//! `protect HOST:PORT [GENERATION]` (a new secondary, see `protect`). A secondary answers
//! `status`, `failover`
//! and `stop` (see `secondary`). `vcpus` tells where each vCPU executes and what its
//! LAPIC holds: the first look at a guest that stopped answering.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{json, Value};

use crate::epochs;
use crate::vm::{Source, Vm};

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("control socket {path}: {source}")]
    Connect {
        path: String,
        source: std::io::Error,
    },
    #[error("control socket: {0}")]
    Io(#[from] std::io::Error),
    #[error("the VMM answered with something that is not JSON: {0:?}")]
    NotJson(String),
}

/// A request on the control socket.
pub enum Request {
    Status,
    Stop,
    Pause,
    Resume,
    Epochs(epochs::Request),
    Snapshot {
        dir: PathBuf,
        incremental: bool,
    },
    /// Primary: send digests of memory and disks with the next checkpoint.
    Verify,
    /// Primary: planned switch to the secondary.
    Failover,
    /// Where each vCPU is (a short pause to read it).
    Vcpus,
    /// An unprotected guest: replicate it to the secondary at `peer` from now on.
    Protect {
        peer: String,
        generation: Option<u64>,
    },
    /// Not understood; the reason goes back to the client.
    Invalid(String),
}

impl Request {
    /// The request's first word, as a client writes it.
    pub fn name(&self) -> &'static str {
        match self {
            Request::Status => "status",
            Request::Stop => "stop",
            Request::Pause => "pause",
            Request::Resume => "resume",
            Request::Epochs(r) => match r.mode {
                epochs::Mode::Check(_) => "selfcheck",
                epochs::Mode::Stage => "epochs",
            },
            Request::Snapshot { .. } => "snapshot",
            Request::Verify => "verify",
            Request::Failover => "failover",
            Request::Vcpus => "vcpus",
            Request::Protect { .. } => "protect",
            Request::Invalid(_) => "an invalid request",
        }
    }
}

/// Writes the one-line JSON reply of a request.
pub fn reply(mut stream: &UnixStream, value: &Value) {
    let _ = writeln!(stream, "{value}");
}

const KNOWN: &str = "status, stop, pause, resume, snapshot DIR [incremental], \
                     selfcheck EPOCHS INTERVAL_MS [guest-only], epochs EPOCHS INTERVAL_MS, \
                     verify, failover, vcpus, protect HOST:PORT [GENERATION]";

/// Reads the request line of a connection just accepted (short timeouts: the device loop
/// waits for it).
pub fn read_request(stream: &UnixStream) -> Request {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new(stream).read_line(&mut line).is_err() {
        return Request::Invalid("no request line within 2 s".into());
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Request::Status,
        ["stop"] => Request::Stop,
        ["pause"] => Request::Pause,
        ["resume"] => Request::Resume,
        ["verify"] => Request::Verify,
        ["failover"] => Request::Failover,
        ["vcpus"] => Request::Vcpus,
        ["protect", peer] => Request::Protect {
            peer: peer.to_string(),
            generation: None,
        },
        ["protect", peer, generation] => match generation.parse() {
            Ok(g) => Request::Protect {
                peer: peer.to_string(),
                generation: Some(g),
            },
            Err(_) => Request::Invalid(format!(
                "protect: generation {generation:?} is not a number"
            )),
        },
        ["protect", ..] => Request::Invalid("usage: protect HOST:PORT [GENERATION]".into()),
        ["snapshot", dir] => Request::Snapshot {
            dir: PathBuf::from(dir),
            incremental: false,
        },
        ["snapshot", dir, "incremental"] => Request::Snapshot {
            dir: PathBuf::from(dir),
            incremental: true,
        },
        ["snapshot", ..] => Request::Invalid("usage: snapshot DIR [incremental]".into()),
        ["selfcheck", args @ ..] => match epochs::Request::parse(args, true) {
            Ok(r) => Request::Epochs(r),
            Err(e) => Request::Invalid(e.to_string()),
        },
        ["epochs", args @ ..] => match epochs::Request::parse(args, false) {
            Ok(r) => Request::Epochs(r),
            Err(e) => Request::Invalid(e.to_string()),
        },
        _ => Request::Invalid(format!("unknown request {:?}; known: {KNOWN}", line.trim())),
    }
}

pub fn status(vm: &Vm) -> Value {
    let devices: Vec<Value> = vm
        .devices
        .iter()
        .map(|d| {
            let t = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let kind = mcvmm_devices::virtio::type_name(t.device().device_type());
            json!({
                "type": kind,
                "active": t.is_active(),
                "error": t.last_error,
                "detail": t.device().stats(),
                "transport": t.queues_status(),
            })
        })
        .collect();
    json!({
        "state": "running",
        "pid": std::process::id(),
        "vcpus": vm.config.vcpus,
        "memory_mib": vm.config.mem_mib,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "source": match &vm.config.source {
            Source::Boot { kernel, .. } => json!({"kernel": kernel.display().to_string()}),
            Source::Restore(dir) => json!({"restored_from": dir.display().to_string()}),
            Source::Replica { primary, epoch } => json!({"took_over_from": primary, "epoch": epoch}),
        },
        "cmdline": vm.cmdline,
        "devices": devices,
    })
}

/// `mcvmm ctl`: sends one request and returns the reply.
pub fn request(sock: &Path, req: &str) -> Result<Value, ApiError> {
    let stream = UnixStream::connect(sock).map_err(|source| ApiError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    // A self-check answers when its epochs are done; everything else at once.
    let long = ["selfcheck", "epochs", "snapshot", "failover", "protect"]
        .iter()
        .any(|r| req.starts_with(r));
    stream.set_read_timeout((!long).then(|| Duration::from_secs(30)))?;
    let mut w = &stream;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|_| ApiError::NotJson(line))
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::net::UnixStream;

    /// What the control socket makes of `line`.
    fn parse(line: &str) -> Request {
        let (client, server) = UnixStream::pair().expect("socket pair");
        let mut w = &client;
        writeln!(w, "{line}").expect("write");
        read_request(&server)
    }

    #[test]
    fn requests_parse_with_their_arguments() {
        assert!(matches!(parse("status"), Request::Status));
        assert!(matches!(
            parse("protect 10.0.0.2:7777 5"),
            Request::Protect { peer, generation: Some(5) } if peer == "10.0.0.2:7777"
        ));
        assert!(matches!(
            parse("snapshot /tmp/s incremental"),
            Request::Snapshot {
                incremental: true,
                ..
            }
        ));
        assert_eq!(parse("selfcheck 10 20").name(), "selfcheck");
        assert_eq!(parse("epochs 10 20").name(), "epochs");
    }

    #[test]
    fn bad_requests_say_why() {
        let why = |line: &str| match parse(line) {
            Request::Invalid(why) => why,
            other => panic!("{line:?} parsed as {}", other.name()),
        };
        assert!(why("protect a:1 many").contains("not a number"));
        assert!(why("snapshot").starts_with("usage: snapshot"));
        assert!(why("frobnicate").contains("known: status"));
        let (client, server) = UnixStream::pair().expect("socket pair");
        drop(client);
        assert!(matches!(read_request(&server), Request::Invalid(_)));
    }
}
