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

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
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
    /// Primary: end the protection on purpose (the secondary does not take over).
    Unprotect,
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
            Request::Unprotect => "unprotect",
            Request::Vcpus => "vcpus",
            Request::Protect { .. } => "protect",
            Request::Invalid(_) => "an invalid request",
        }
    }
}

/// `"ok": true` in an answer.
#[derive(Debug, Clone, Copy)]
pub struct Yes;

impl Serialize for Yes {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_bool(true)
    }
}

/// What a request that succeeded gets back: one JSON object on the wire.
#[derive(Debug, Serialize)]
#[serde(untagged)]
pub enum Answer {
    /// `stop`, `resume`.
    Done {
        ok: Yes,
    },
    Paused {
        ok: Yes,
        pause_us: u64,
    },
    /// `verify`: the checkpoint that will carry the digests.
    Verifying {
        ok: Yes,
        epoch: u64,
    },
    /// A primary's planned `failover`.
    HandedOver {
        ok: Yes,
        handed_over_at_epoch: u64,
    },
    /// A secondary's `failover`: it takes over from its last commit.
    TakingOver {
        ok: Yes,
        taking_over_from_epoch: u64,
    },
    /// `unprotect`: whether the secondary was told, and whether held output waits for
    /// the fence.
    Unprotected {
        ok: Yes,
        goodbye_said: bool,
        claiming_fence: bool,
    },
    Protecting {
        ok: Yes,
        secondary: String,
        generation: u64,
        syncing: bool,
    },
    Vcpus {
        vcpus: Vec<Value>,
    },
    /// A report its own module builds (`status`, `snapshot`, `epochs`, `selfcheck`).
    Report(Value),
}

impl Answer {
    pub fn done() -> Answer {
        Answer::Done { ok: Yes }
    }
}

/// Why a request was refused or failed; the client gets `{"error": "<this>"}`.
#[derive(Debug, thiserror::Error)]
pub enum Refusal {
    /// Not understood (see [`read_request`]).
    #[error("{0}")]
    Invalid(String),
    #[error("already paused")]
    AlreadyPaused,
    #[error("not paused")]
    NotPaused,
    #[error("resume the VM first")]
    ResumeFirst,
    #[error("not a replicating primary")]
    NotPrimary,
    #[error("not a replicating primary: nothing to fail over to")]
    NothingToFailOverTo,
    /// Something else holds what the request needs (the dirty log, a connection).
    #[error("{0}")]
    Busy(String),
    #[error(
        "{request}: this is a secondary, no guest runs here yet; known: status, failover, stop"
    )]
    NotOnSecondary { request: &'static str },
    #[error("no primary connected")]
    NoPrimary,
    #[error("no checkpoint committed yet: nothing consistent to run")]
    NothingCommitted,
    /// The work was tried and failed; the reason is the work's own error.
    #[error("{0}")]
    Failed(String),
}

impl Refusal {
    pub fn busy(why: impl Into<String>) -> Refusal {
        Refusal::Busy(why.into())
    }

    pub fn failed(e: impl std::fmt::Display) -> Refusal {
        Refusal::Failed(e.to_string())
    }
}

/// Writes the one-line JSON reply of a request: the answer, or `{"error": why}`.
pub fn answer(mut stream: &UnixStream, result: Result<Answer, Refusal>) {
    let line = match result {
        Ok(a) => serde_json::to_value(a).unwrap_or_else(|e| json!({ "error": e.to_string() })),
        Err(e) => json!({ "error": e.to_string() }),
    };
    let _ = writeln!(stream, "{line}");
}

const KNOWN: &str = "status, stop, pause, resume, snapshot DIR [incremental], \
                     selfcheck EPOCHS INTERVAL_MS [guest-only], epochs EPOCHS INTERVAL_MS, \
                     verify, failover, unprotect, vcpus, protect HOST:PORT [GENERATION]";

/// The longest request line read (a snapshot's directory is the longest part).
const REQUEST_LIMIT: u64 = 4096;

/// Reads the request line of a connection just accepted (short timeouts: the device loop
/// waits for it).
pub fn read_request(stream: &UnixStream) -> Request {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    if BufReader::new(stream.take(REQUEST_LIMIT))
        .read_line(&mut line)
        .is_err()
    {
        return Request::Invalid("no request line within 2 s".into());
    }
    if !line.ends_with('\n') && line.len() as u64 == REQUEST_LIMIT {
        return Request::Invalid(format!("a request line is at most {REQUEST_LIMIT} bytes"));
    }
    let words: Vec<&str> = line.split_whitespace().collect();
    match words.as_slice() {
        ["status"] => Request::Status,
        ["stop"] => Request::Stop,
        ["pause"] => Request::Pause,
        ["resume"] => Request::Resume,
        ["verify"] => Request::Verify,
        ["failover"] => Request::Failover,
        ["unprotect"] => Request::Unprotect,
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
    fn a_request_line_longer_than_the_limit_is_refused_unread() {
        let long = format!("snapshot /{}", "d".repeat(10_000));
        match parse(&long) {
            Request::Invalid(why) => assert!(why.contains("at most 4096 bytes"), "{why}"),
            other => panic!("{} accepted", other.name()),
        }
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

    /// The line a client reads for `result`.
    fn answered(result: Result<Answer, Refusal>) -> Value {
        let (client, server) = UnixStream::pair().expect("socket pair");
        answer(&server, result);
        let mut line = String::new();
        BufReader::new(&client).read_line(&mut line).expect("read");
        serde_json::from_str(&line).expect("JSON")
    }

    #[test]
    fn answers_keep_the_shape_clients_read() {
        assert_eq!(answered(Ok(Answer::done())), json!({"ok": true}));
        assert_eq!(
            answered(Ok(Answer::Paused {
                ok: Yes,
                pause_us: 7
            })),
            json!({"ok": true, "pause_us": 7})
        );
        assert_eq!(
            answered(Ok(Answer::Report(json!({"state": "running"})))),
            json!({"state": "running"})
        );
        assert_eq!(
            answered(Err(Refusal::NotOnSecondary { request: "pause" })),
            json!({"error": "pause: this is a secondary, no guest runs here yet; known: status, failover, stop"})
        );
        assert_eq!(
            answered(Err(Refusal::failed("disk full"))),
            json!({"error": "disk full"})
        );
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
