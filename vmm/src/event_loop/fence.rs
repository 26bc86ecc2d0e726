//! The device loop's side of the fence (`--etcd`): a primary whose protection ended
//! without a goodbye the secondary surely heard claims the next generation; its held
//! output is released only once it wins, the guest is paused if the claim takes longer
//! than `--fence-timeout-ms`, and a lost claim stops the guest for good.

use std::time::Instant;

use mcvmm_replication::messages::Farewell;

use super::{DeviceLoop, Role};
use crate::api::{Answer, Refusal, Yes};
use crate::epochs::PAUSE_LIMIT;
use crate::fencing::{fenced_line, Outcome};
use crate::vcpu::ExitReason;

/// A claim of the fence in progress.
pub(super) struct Claiming {
    generation: u64,
    since: Instant,
    /// The claim paused the guest (not the operator).
    paused: bool,
}

/// How long `ctl unprotect` waits for its goodbye to be written.
const GOODBYE_WAIT: std::time::Duration = std::time::Duration::from_secs(2);

impl DeviceLoop<'_> {
    /// After each round of events: starts the claim a lost secondary calls for, and
    /// pauses the guest once the claim has taken `--fence-timeout-ms`.
    pub(super) fn watch_fence(&mut self) {
        let Some(fence) = &self.protectable.fence else {
            return;
        };
        let Role::Primary(p) = &*self.role else {
            return;
        };
        match &mut self.claim {
            None if p.needs_claim() => {
                let generation = self.protectable.generation + 1;
                fence.claim(generation);
                self.claim = Some(Claiming {
                    generation,
                    since: Instant::now(),
                    paused: false,
                });
            }
            Some(c)
                if !c.paused
                    && !self.paused
                    && c.since.elapsed() >= self.protectable.settings.fence_timeout =>
            {
                match self.vm.vcpus.pause(PAUSE_LIMIT) {
                    Ok(()) => {
                        c.paused = true;
                        tracing::warn!(
                            "fence: generation {} not won after {} ms, with the secondary lost: the guest is PAUSED until this node wins it",
                            c.generation,
                            c.since.elapsed().as_millis()
                        );
                    }
                    Err(e) => tracing::error!("fence: pausing the guest: {e}"),
                }
            }
            _ => {}
        }
    }

    /// etcd decided the claim: the guest goes on with its held output released, or
    /// this node stops.
    pub(super) fn on_fence(&mut self) -> Option<ExitReason> {
        let outcome = self.protectable.fence.as_ref()?.outcome()?;
        let claim = self.claim.take();
        let paused_by_claim = claim.as_ref().is_some_and(|c| c.paused);
        let Role::Primary(p) = &mut *self.role else {
            return None;
        };
        let line = match outcome {
            Outcome::Won(owner) => {
                self.protectable.generation = owner.generation;
                p.fence_settled = true;
                p.gate.open();
                if paused_by_claim {
                    self.vm.vcpus.resume();
                }
                tracing::warn!(
                    "fence: won generation {}: held output released; the guest runs UNPROTECTED",
                    owner.generation
                );
                return None;
            }
            Outcome::Lost { generation, owner } => fenced_line(generation, owner.as_ref()),
            Outcome::Impossible(why) => format!("fenced: {why}"),
        };
        if !paused_by_claim && !self.paused {
            let _ = self.vm.vcpus.pause(PAUSE_LIMIT);
        }
        p.gate.discard();
        Some(ExitReason::Fenced(line))
    }

    /// `ctl unprotect`: ends the protection on purpose. The secondary is told goodbye
    /// (it waits for the next primary instead of taking over); held output is released
    /// at once, or with a fence once this node has won the next generation.
    pub(super) fn unprotect(&mut self) -> Result<Answer, Refusal> {
        let Role::Primary(p) = &mut *self.role else {
            return Err(Refusal::NotPrimary);
        };
        if p.link.is_lost() {
            return Err(Refusal::busy(
                "not protected: the secondary is lost already",
            ));
        }
        p.ended_on_purpose = true;
        let said = p.link.goodbye(Farewell::Unprotected, GOODBYE_WAIT);
        let fenced = p.link.is_fenced();
        if !fenced {
            p.gate.open();
        }
        tracing::warn!(
            "protection ended (`ctl unprotect`){}; {}",
            if said {
                ""
            } else {
                ": the goodbye could not be written, the connection stays open"
            },
            if fenced {
                "held output waits for the fence"
            } else {
                "the guest runs UNPROTECTED"
            }
        );
        Ok(Answer::Unprotected {
            ok: Yes,
            goodbye_said: said,
            claiming_fence: fenced,
        })
    }

    /// Whether a claim of the fence is in progress (no new protection meanwhile).
    pub(super) fn claiming(&self) -> bool {
        self.claim.is_some()
    }
}
