//! Protection again without an operator: a primary that lost its secondary (and may go
//! on: no fence, or it won the fence) connects to the same secondary again, with
//! backoff, and syncs the guest to it with the digest re-sync. `ctl unprotect` ends
//! protection on purpose: nothing is tried after it.

use std::time::{Duration, Instant};

use serde_json::{json, Value};

use super::{DeviceLoop, Role};
use crate::protect;

const FIRST_WAIT: Duration = Duration::from_secs(1);
const LONGEST_WAIT: Duration = Duration::from_secs(30);

/// This node's attempts to protect its guest again.
pub(super) struct Reprotect {
    peer: String,
    attempts: u32,
    next_at: Instant,
    wait: Duration,
    last_error: Option<String>,
    since: Instant,
}

impl Reprotect {
    fn new(peer: String) -> Reprotect {
        let now = Instant::now();
        Reprotect {
            peer,
            attempts: 0,
            next_at: now + FIRST_WAIT,
            wait: FIRST_WAIT,
            last_error: None,
            since: now,
        }
    }

    /// An attempt failed: the next one comes after twice the wait (at most 30 s).
    pub(super) fn failed(&mut self, why: &str) {
        self.wait = (self.wait * 2).min(LONGEST_WAIT);
        self.next_at = Instant::now() + self.wait;
        tracing::warn!(
            "protecting the guest again at {} failed (attempt {}): {why}; next try in {} s",
            self.peer,
            self.attempts,
            self.wait.as_secs()
        );
        self.last_error = Some(why.to_string());
    }

    pub(super) fn status(&self) -> Value {
        json!({
            "peer": self.peer,
            "attempts": self.attempts,
            "next_in_ms": self.next_at.saturating_duration_since(Instant::now()).as_millis() as u64,
            "last_error": self.last_error,
            "unprotected_for_ms": self.since.elapsed().as_millis() as u64,
        })
    }
}

impl DeviceLoop<'_> {
    /// After each round of events: starts the next attempt to protect the guest again,
    /// once one is due.
    pub(super) fn watch_reprotect(&mut self) -> std::io::Result<()> {
        let Role::Primary(p) = &*self.role else {
            self.reprotect = None;
            return Ok(());
        };
        let wanted =
            p.link.is_lost() && !p.needs_claim() && !p.link.handed_over() && !p.ended_on_purpose;
        if !wanted {
            self.reprotect = None;
            return Ok(());
        }
        // Runs after every round of events: the link's stats are read once, not each time.
        let r = self.reprotect.get_or_insert_with(|| {
            let peer = p.link.snapshot().peer;
            tracing::info!("will protect the guest again at {peer}, trying from 1 s on");
            Reprotect::new(peer)
        });
        // While an attempt is on its way `pending` is set; its end sets the next time.
        if self.pending.is_some()
            || self.claim.is_some()
            || self.paused
            || Instant::now() < r.next_at
        {
            return Ok(());
        }
        r.attempts += 1;
        let (peer, attempt) = (r.peer.clone(), r.attempts);
        tracing::info!("protecting the guest again at {peer} (attempt {attempt})");
        self.pending = Some(protect::connect(
            self.vm,
            self.protectable,
            peer,
            self.protectable.generation,
            None,
            self.connected.try_clone()?,
        ));
        Ok(())
    }

    /// The attempts to protect the guest again, for `status`.
    pub(super) fn reprotect_status(&self) -> Option<Value> {
        self.reprotect.as_ref().map(Reprotect::status)
    }
}
