//! What the secondary answers on the control socket while it receives and while it
//! takes over: `status`, `failover`, `stop`.

use std::net::Shutdown;
use std::os::unix::net::UnixStream;
use std::sync::atomic::Ordering;
use std::sync::PoisonError;

use serde_json::{json, Value};

use super::Shared;
use crate::api::{self, Answer, Refusal, Request, Yes};
use crate::phase::Phase;

/// Answers one request on the secondary's control socket: `status`, `failover` and
/// `stop` are answered here; any other request is refused, since no guest runs here yet.
pub(super) fn handle(shared: &Shared, stream: UnixStream, request: Request) {
    let outcome = match request {
        Request::Status => Ok(Answer::Report(status(shared))),
        Request::Failover => operator_failover(shared),
        Request::Stop => {
            api::answer(&stream, Ok(Answer::done()));
            tracing::info!("stopped (secondary)");
            std::process::exit(0);
        }
        Request::Invalid(why) => Err(Refusal::Invalid(why)),
        other => Err(Refusal::NotOnSecondary {
            request: other.name(),
        }),
    };
    api::answer(&stream, outcome);
}

fn status(shared: &Shared) -> Value {
    let p = shared
        .progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .clone();
    let primary = shared
        .primary
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .as_ref()
        .map(|p| p.0.clone());
    let phase = if shared.receiving.load(Ordering::SeqCst) {
        Phase::Receiving
    } else {
        Phase::TakingOver
    };
    json!({
        "role": phase.role(),
        "state": phase.name(),
        "phase": phase.name(),
        "pid": std::process::id(),
        "protected": p.committed_epoch > 0 && primary.is_some(),
        "primary": primary,
        "generation": shared.generation.load(Ordering::SeqCst),
        "last_committed_epoch": p.committed_epoch,
        "kept_commit_of_lost_primary": shared.orphaned.load(Ordering::SeqCst),
        "fence": shared.fence.lock().unwrap_or_else(PoisonError::into_inner).clone(),
        "uptime_ms": shared.started.elapsed().as_millis() as u64,
        "progress": p,
    })
}

/// `ctl failover` on a secondary: the operator says the primary is dead; the connection
/// to it is cut, and the receiver's end takes over from the last commit.
fn operator_failover(shared: &Shared) -> Result<Answer, Refusal> {
    if !shared.receiving.load(Ordering::SeqCst) {
        return Err(Refusal::busy("taking over already"));
    }
    let committed = shared
        .progress
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .committed_epoch;
    let primary = shared
        .primary
        .lock()
        .unwrap_or_else(PoisonError::into_inner);
    let orphaned = shared.orphaned.load(Ordering::SeqCst);
    match (&*primary, committed) {
        (Some((_, s)), c) if c > 0 => {
            shared.operator_takeover.store(true, Ordering::SeqCst);
            let _ = s.shutdown(Shutdown::Both);
            Ok(Answer::TakingOver {
                ok: Yes,
                taking_over_from_epoch: c,
            })
        }
        (None, _) if orphaned > 0 => {
            shared.operator_takeover.store(true, Ordering::SeqCst);
            Ok(Answer::TakingOver {
                ok: Yes,
                taking_over_from_epoch: orphaned,
            })
        }
        (None, _) => Err(Refusal::NoPrimary),
        _ => Err(Refusal::NothingCommitted),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::path::PathBuf;
    use std::sync::Arc;

    use crate::control::{ControlServer, Serving};

    /// A secondary's control socket with no primary connected yet.
    fn control_socket(dir: &tempfile::TempDir) -> (PathBuf, Arc<Shared>, Serving) {
        let path = dir.path().join("s.sock");
        let shared = Arc::new(Shared::new(4));
        let s = shared.clone();
        let serving = ControlServer::bind(&path)
            .expect("bind")
            .serve_on_thread("test-secondary-control", move |stream, request| {
                handle(&s, stream, request)
            })
            .expect("serve");
        (path, shared, serving)
    }

    #[test]
    fn the_control_socket_answers_what_a_secondary_can_do_and_refuses_the_rest() {
        let dir = tempfile::tempdir().expect("dir");
        let (sock, shared, _serving) = control_socket(&dir);
        let status = api::request(&sock, "status").expect("status");
        assert_eq!(status["role"], "secondary");
        assert_eq!(status["generation"], 4);
        assert_eq!(status["protected"], false);
        let failover = api::request(&sock, "failover").expect("failover");
        assert_eq!(failover["error"], "no primary connected");
        let pause = api::request(&sock, "pause").expect("pause");
        let why = pause["error"].as_str().expect("an error");
        assert!(why.starts_with("pause: this is a secondary"), "{why}");
        let unknown = api::request(&sock, "reboot now").expect("unknown");
        let why = unknown["error"].as_str().expect("an error");
        assert!(why.contains("unknown request \"reboot now\""), "{why}");
        shared.receiving.store(false, Ordering::SeqCst);
        let status = api::request(&sock, "status").expect("status");
        assert_eq!(status["state"], "taking over");
        let failover = api::request(&sock, "failover").expect("failover");
        assert_eq!(failover["error"], "taking over already");
    }

    #[test]
    fn status_shows_a_claim_etcd_has_not_decided_and_why() {
        let dir = tempfile::tempdir().expect("dir");
        let (sock, shared, _serving) = control_socket(&dir);
        assert!(api::request(&sock, "status").expect("status")["fence"].is_null());
        *shared.fence.lock().expect("fence") = Some(crate::fencing::FenceStatus {
            key: "/mcvmm/vm1/owner".into(),
            node: "b".into(),
            ..Default::default()
        });
        shared.fence_status(|s| {
            s.claiming = Some(5);
            s.claiming_for_ms = 3250;
            s.etcd_error = Some("etcd at http://10.0.0.1:2379: deadline has elapsed".into());
        });
        let fence = &api::request(&sock, "status").expect("status")["fence"];
        assert_eq!(fence["claiming"], 5);
        assert_eq!(fence["claiming_for_ms"], 3250);
        let why = fence["etcd_error"].as_str().expect("etcd's error");
        assert!(why.contains("deadline has elapsed"), "{why}");
    }
}
