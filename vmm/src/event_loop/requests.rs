//! The control socket's requests, one handler each, run on the device loop.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use mcvmm_checkpoint::dirty::Sources;
use serde_json::json;

use super::{cannot_protect, vcpu_summaries, DeviceLoop, LogOwner, Role};
use crate::api::{self, answer, Answer, Refusal, Request, Yes};
use crate::epochs::{self, EpochRun, Mode, PAUSE_LIMIT};
use crate::protect;
use crate::snapshot;
use crate::vcpu::ExitReason;

impl DeviceLoop<'_> {
    /// Serves every connection waiting on the control socket.
    pub(super) fn on_api(&mut self) -> std::io::Result<Option<ExitReason>> {
        let Some(control) = self.api else {
            return Ok(None);
        };
        while let Some((stream, request)) = control.next() {
            if let Some(reason) = self.on_request(request, stream)? {
                return Ok(Some(reason));
            }
        }
        Ok(None)
    }

    fn on_request(
        &mut self,
        request: Request,
        stream: UnixStream,
    ) -> std::io::Result<Option<ExitReason>> {
        let now = match request {
            Request::Stop => {
                answer(&stream, Ok(Answer::done()));
                return Ok(Some(ExitReason::Stopped));
            }
            Request::Failover => match self.failover() {
                Ok(epoch) => {
                    answer(
                        &stream,
                        Ok(Answer::HandedOver {
                            ok: Yes,
                            handed_over_at_epoch: epoch,
                        }),
                    );
                    return Ok(Some(ExitReason::HandedOver(epoch)));
                }
                Err(e) => Err(e),
            },
            Request::Unprotect => self.unprotect(),
            Request::Pause => self.pause()?,
            Request::Resume => self.resume()?,
            Request::Snapshot { dir, incremental } => self.snapshot(&dir, incremental),
            Request::Verify => match &*self.role {
                Role::Primary(p) => Ok(Answer::Verifying {
                    ok: Yes,
                    epoch: p.verify_next(),
                }),
                _ => Err(Refusal::NotPrimary),
            },
            Request::Vcpus => vcpu_summaries(self.vm, self.paused)
                .map(|vcpus| Answer::Vcpus { vcpus })
                .map_err(Refusal::failed),
            Request::Status => Ok(Answer::Report(self.status())),
            Request::Invalid(why) => Err(Refusal::Invalid(why)),
            // These answer later, when their work is done, unless refused now.
            Request::Epochs(req) => match self.epochs(req, &stream)? {
                Some(refused) => Err(refused),
                None => return Ok(None),
            },
            Request::Protect { peer, generation } => {
                match self.protect(peer, generation, &stream)? {
                    Some(refused) => Err(refused),
                    None => return Ok(None),
                }
            }
        };
        answer(&stream, now);
        Ok(None)
    }

    fn pause(&mut self) -> std::io::Result<Result<Answer, Refusal>> {
        if self.paused {
            return Ok(Err(Refusal::AlreadyPaused));
        }
        let t0 = Instant::now();
        if let Err(e) = self.vm.vcpus.pause(PAUSE_LIMIT) {
            return Ok(Err(Refusal::failed(e)));
        }
        self.park_devices(true)?;
        self.paused = true;
        Ok(Ok(Answer::Paused {
            ok: Yes,
            pause_us: t0.elapsed().as_micros() as u64,
        }))
    }

    fn resume(&mut self) -> std::io::Result<Result<Answer, Refusal>> {
        if !self.paused {
            return Ok(Err(Refusal::NotPaused));
        }
        self.vm.vcpus.resume();
        self.park_devices(false)?;
        self.paused = false;
        Ok(Ok(Answer::done()))
    }

    /// `epochs` and `selfcheck`: a run of their own, or on a primary the self-check on its
    /// own checkpoints. Returns why not, or nothing: the run answers when it ends.
    fn epochs(
        &mut self,
        req: epochs::Request,
        stream: &UnixStream,
    ) -> std::io::Result<Option<Refusal>> {
        let refused = match (self.log_owner(), &mut *self.role) {
            (LogOwner::Replication, Role::Primary(p)) => match req.mode {
                Mode::Check(Sources::GuestAndVmm) => p.attach_check(req.epochs, stream.try_clone()?).err(),
                Mode::Check(Sources::GuestOnly) => Some("a replicating primary's dirty sets include the VMM's own writes: guest-only is for a guest that is not protected"),
                Mode::Stage => Some("replication owns dirty tracking: no epoch runs on a primary (selfcheck runs on its checkpoints)"),
            },
            (LogOwner::Nobody, _) if !self.paused => {
                match EpochRun::start(self.vm, req, stream.try_clone()?) {
                    Ok(c) => {
                        // One shot, armed again after each pause.
                        self.epoch_timer.reset(c.interval, None)?;
                        self.epochs = Some(c);
                    }
                    Err(e) => return Ok(Some(Refusal::failed(e))),
                }
                None
            }
            _ => Some("the VM is paused, epochs run already, or snapshots track dirty pages"),
        };
        Ok(refused.map(Refusal::busy))
    }

    fn snapshot(&mut self, dir: &Path, incremental: bool) -> Result<Answer, Refusal> {
        match self.log_owner() {
            LogOwner::Replication => {
                return Err(Refusal::busy(
                    "replication owns dirty tracking: no snapshots or epoch runs on a primary",
                ))
            }
            LogOwner::Epochs => {
                return Err(Refusal::busy("epochs are running; snapshot after them"))
            }
            LogOwner::Nobody | LogOwner::Snapshots => {}
        }
        let v = snapshot::take(self.vm, &mut self.snaps, dir, incremental, self.paused)
            .map_err(|e| Refusal::Failed(format!("snapshot {}: {e}", dir.display())))?;
        tracing::info!(
            "snapshot {} ({}, {} pages, pause {:.1} ms)",
            dir.display(),
            v["kind"],
            v["pages"],
            v["pause_ms"].as_f64().unwrap_or(0.0)
        );
        Ok(Answer::Report(v))
    }

    /// A planned switch: the epoch at which the secondary took the guest over (the loop
    /// ends then).
    fn failover(&mut self) -> Result<u64, Refusal> {
        match &mut *self.role {
            Role::Primary(p) if !self.paused => p.hand_over(self.vm).map_err(Refusal::failed),
            Role::Primary(_) => Err(Refusal::ResumeFirst),
            _ => Err(Refusal::NothingToFailOverTo),
        }
    }

    fn status(&self) -> serde_json::Value {
        let mut v = api::status(self.vm);
        v["state"] = json!(if self.paused { "paused" } else { "running" });
        self.role.status(&mut v);
        v["generation"] = json!(self.protectable.generation);
        if let Some(t) = &self.protectable.took_over {
            v["took_over"] = t.clone();
        }
        if let Some(p) = &self.pending {
            v["connecting_to_secondary"] = json!(p.peer);
        }
        if let Some(f) = &self.protectable.fence {
            v["fence"] = json!(f.status());
        }
        if let Some(r) = self.reprotect_status() {
            v["protecting_again"] = r;
        }
        v
    }

    /// Starts connecting to a new secondary off the loop (`on_connected` finishes and
    /// answers), or says why not.
    fn protect(
        &mut self,
        peer: String,
        generation: Option<u64>,
        stream: &UnixStream,
    ) -> std::io::Result<Option<Refusal>> {
        let busy = match &*self.role {
            Role::Primary(p) if !p.link.is_lost() => {
                Some("already protected (`status` names its secondary)".to_string())
            }
            _ => None,
        }
        .or_else(|| {
            self.pending
                .as_ref()
                .map(|p| format!("already connecting to a secondary at {}", p.peer))
        })
        .or_else(|| {
            self.claiming()
                .then(|| "the fence is deciding which node runs the guest".to_string())
        })
        .or_else(|| cannot_protect(self.paused, self.log_owner()).map(str::to_string));
        if let Some(why) = busy {
            return Ok(Some(Refusal::Busy(why)));
        }
        let generation = generation.unwrap_or(self.protectable.generation);
        self.pending = Some(protect::connect(
            self.vm,
            self.protectable,
            peer,
            generation,
            Some(stream.try_clone()?),
            self.connected.try_clone()?,
        ));
        Ok(None)
    }
}
