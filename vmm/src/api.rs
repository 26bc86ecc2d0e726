//! The control socket: one request line per connection, one JSON reply.
//!
//! Requests: `status`, `stop`. (Later issues add pause, resume, snapshot, failover.)

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

use serde_json::{json, Value};

use crate::vm::Vm;

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

/// What a request asks the device loop to do after replying.
pub enum Action {
    None,
    Stop,
}

pub fn status(vm: &Vm) -> Value {
    let devices: Vec<Value> = vm
        .devices
        .iter()
        .map(|d| {
            let t = d.lock().unwrap_or_else(std::sync::PoisonError::into_inner);
            let kind = match t.device().device_type() {
                mcvmm_devices::virtio::TYPE_BLOCK => "virtio-blk",
                mcvmm_devices::virtio::TYPE_NET => "virtio-net",
                _ => "virtio",
            };
            json!({
                "type": kind,
                "active": t.is_active(),
                "error": t.last_error,
                "detail": t.device().stats(),
            })
        })
        .collect();
    json!({
        "state": "running",
        "pid": std::process::id(),
        "vcpus": vm.config.vcpus,
        "memory_mib": vm.config.mem_mib,
        "uptime_ms": vm.started.elapsed().as_millis() as u64,
        "kernel": vm.config.kernel.display().to_string(),
        "cmdline": vm.cmdline,
        "devices": devices,
    })
}

/// Serves one connection (already accepted); short timeouts, since the device loop waits.
pub fn handle(vm: &Vm, stream: UnixStream) -> Action {
    let _ = stream.set_read_timeout(Some(Duration::from_secs(2)));
    let _ = stream.set_write_timeout(Some(Duration::from_secs(2)));
    let mut line = String::new();
    let mut reader = BufReader::new(&stream);
    if reader.read_line(&mut line).is_err() {
        return Action::None;
    }
    let (reply, action) = match line.trim() {
        "status" => (status(vm), Action::None),
        "stop" => (json!({"ok": true}), Action::Stop),
        other => (
            json!({"error": format!("unknown request {other:?}; known: status, stop")}),
            Action::None,
        ),
    };
    let mut w = &stream;
    let _ = writeln!(w, "{reply}");
    action
}

/// `mcvmm ctl`: sends one request and returns the reply.
pub fn request(sock: &Path, req: &str) -> Result<Value, ApiError> {
    let stream = UnixStream::connect(sock).map_err(|source| ApiError::Connect {
        path: sock.display().to_string(),
        source,
    })?;
    stream.set_read_timeout(Some(Duration::from_secs(30)))?;
    let mut w = &stream;
    writeln!(w, "{req}")?;
    let mut line = String::new();
    BufReader::new(&stream).read_line(&mut line)?;
    serde_json::from_str(&line).map_err(|_| ApiError::NotJson(line))
}
