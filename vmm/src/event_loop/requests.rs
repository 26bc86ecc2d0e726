//! The control socket's requests, one handler each, run on the device loop.

use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Instant;

use mcvmm_checkpoint::dirty::Sources;
use serde_json::json;

use super::{cannot_protect, vcpu_summaries, DeviceLoop, LogOwner, Role};
use crate::api::reply;
use crate::api::{self, Request};
use crate::epochs::{self, EpochRun, Mode, PAUSE_LIMIT};
use crate::protect;
use crate::snapshot;
use crate::vcpu::ExitReason;

impl DeviceLoop<'_> {
    /// Serves every connection waiting on the control socket.
    pub(super) fn on_api(&mut self) -> std::io::Result<Option<ExitReason>> {
        let Some(l) = self.api else {
            return Ok(None);
        };
        while let Ok((stream, _)) = l.accept() {
            let _ = stream.set_nonblocking(false);
            let request = api::read_request(&stream);
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
        match request {
            Request::Stop => {
                reply(&stream, &json!({"ok": true}));
                return Ok(Some(ExitReason::Stopped));
            }
            Request::Pause => self.pause(&stream)?,
            Request::Resume => self.resume(&stream)?,
            Request::Epochs(req) => self.epochs(req, stream)?,
            Request::Snapshot { dir, incremental } => self.snapshot(&dir, incremental, &stream),
            Request::Verify => match &*self.role {
                Role::Primary(p) => {
                    let epoch = p.verify_next();
                    reply(&stream, &json!({"ok": true, "epoch": epoch}))
                }
                _ => reply(&stream, &json!({"error": "not a replicating primary"})),
            },
            Request::Failover => return Ok(self.failover(&stream)),
            Request::Vcpus => {
                let v = match vcpu_summaries(self.vm, self.paused) {
                    Ok(v) => json!({"vcpus": v}),
                    Err(e) => json!({"error": e.to_string()}),
                };
                reply(&stream, &v);
            }
            Request::Status => self.status(&stream),
            Request::Protect { peer, generation } => self.protect(peer, generation, stream)?,
            Request::Invalid(why) => reply(&stream, &json!({"error": why})),
        }
        Ok(None)
    }

    fn pause(&mut self, stream: &UnixStream) -> std::io::Result<()> {
        if self.paused {
            reply(stream, &json!({"error": "already paused"}));
            return Ok(());
        }
        let t0 = Instant::now();
        match self.vm.vcpus.pause(PAUSE_LIMIT) {
            Ok(()) => {
                self.park_devices(true)?;
                self.paused = true;
                reply(
                    stream,
                    &json!({"ok": true, "pause_us": t0.elapsed().as_micros() as u64}),
                );
            }
            Err(e) => reply(stream, &json!({"error": e.to_string()})),
        }
        Ok(())
    }

    fn resume(&mut self, stream: &UnixStream) -> std::io::Result<()> {
        if !self.paused {
            reply(stream, &json!({"error": "not paused"}));
            return Ok(());
        }
        self.vm.vcpus.resume();
        self.park_devices(false)?;
        self.paused = false;
        reply(stream, &json!({"ok": true}));
        Ok(())
    }

    /// `epochs` and `selfcheck`: a run of their own, or on a primary the self-check on its
    /// own checkpoints.
    fn epochs(&mut self, req: epochs::Request, stream: UnixStream) -> std::io::Result<()> {
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
                    Err(e) => reply(&stream, &json!({"error": e.to_string()})),
                }
                None
            }
            _ => Some("the VM is paused, epochs run already, or snapshots track dirty pages"),
        };
        if let Some(why) = refused {
            reply(&stream, &json!({"error": why}));
        }
        Ok(())
    }

    fn snapshot(&mut self, dir: &Path, incremental: bool, stream: &UnixStream) {
        let refused = match self.log_owner() {
            LogOwner::Replication => {
                Some("replication owns dirty tracking: no snapshots or epoch runs on a primary")
            }
            LogOwner::Epochs => Some("epochs are running; snapshot after them"),
            LogOwner::Nobody | LogOwner::Snapshots => None,
        };
        if let Some(why) = refused {
            reply(stream, &json!({"error": why}));
            return;
        }
        match snapshot::take(self.vm, &mut self.snaps, dir, incremental, self.paused) {
            Ok(v) => {
                tracing::info!(
                    "snapshot {} ({}, {} pages, pause {:.1} ms)",
                    dir.display(),
                    v["kind"],
                    v["pages"],
                    v["pause_ms"].as_f64().unwrap_or(0.0)
                );
                reply(stream, &v)
            }
            Err(e) => reply(
                stream,
                &json!({"error": format!("snapshot {}: {e}", dir.display())}),
            ),
        }
    }

    /// A planned switch; the loop ends when the secondary took the guest over.
    fn failover(&mut self, stream: &UnixStream) -> Option<ExitReason> {
        match &mut *self.role {
            Role::Primary(p) if !self.paused => match p.hand_over(self.vm) {
                Ok(epoch) => {
                    reply(stream, &json!({"ok": true, "handed_over_at_epoch": epoch}));
                    return Some(ExitReason::HandedOver(epoch));
                }
                Err(e) => reply(stream, &json!({"error": e.to_string()})),
            },
            Role::Primary(_) => reply(stream, &json!({"error": "resume the VM first"})),
            _ => reply(
                stream,
                &json!({"error": "not a replicating primary: nothing to fail over to"}),
            ),
        }
        None
    }

    fn status(&self, stream: &UnixStream) {
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
        reply(stream, &v);
    }

    /// Starts connecting to a new secondary off the loop; `on_connected` finishes.
    fn protect(
        &mut self,
        peer: String,
        generation: Option<u64>,
        stream: UnixStream,
    ) -> std::io::Result<()> {
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
        .or_else(|| cannot_protect(self.paused, self.log_owner()).map(str::to_string));
        match busy {
            Some(why) => reply(&stream, &json!({"error": why})),
            None => {
                let generation = generation.unwrap_or(self.protectable.generation);
                self.pending = Some(protect::connect(
                    self.vm,
                    self.protectable,
                    peer,
                    generation,
                    stream,
                    self.connected.try_clone()?,
                ));
            }
        }
        Ok(())
    }
}
