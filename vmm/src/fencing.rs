//! The fence as this process uses it (`--etcd`): which node may run the guest, decided
//! by etcd (see `mcvmm_fence`). A node claims generation G+1 whenever a protection at
//! generation G ends without a goodbye (its secondary or its primary lost): the primary
//! to release its held output and go on, the secondary to take over. Exactly one wins;
//! the other stops.
//!
//! The device loop never waits for etcd: its claims run on a thread of their own, which
//! tries until etcd decides, however long that takes, and wakes the loop with the
//! outcome. Meanwhile `status` shows the claim and etcd's last error.

use std::os::fd::AsRawFd;
use std::sync::mpsc::{channel, Sender};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use mcvmm_fence::{Claim, Fence, FenceError, Owner};
use serde::Serialize;
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::subscriber::{Registry, Source, Subscriber};

/// How often a claim etcd did not decide is made again.
pub const RETRY: Duration = Duration::from_millis(250);
/// How often a claim still undecided is logged.
pub const SAY_EVERY: Duration = Duration::from_secs(3);

/// What `status` shows of the fence.
#[derive(Debug, Clone, Default, Serialize)]
pub struct FenceStatus {
    pub key: String,
    pub node: String,
    /// The generation being claimed, while etcd has not decided.
    pub claiming: Option<u64>,
    pub claiming_for_ms: u64,
    /// Why etcd has not decided yet (its last error).
    pub etcd_error: Option<String>,
    /// Who owns the guest, as last read.
    pub owner: Option<Owner>,
}

/// The end of a claim.
#[derive(Debug, Clone)]
pub enum Outcome {
    Won(Owner),
    Lost {
        generation: u64,
        owner: Option<Owner>,
    },
    /// The claim can never be made (a generation of 0).
    Impossible(String),
}

/// Claims made and decided off the device loop.
pub struct Fencing {
    requests: Mutex<Sender<u64>>,
    outcome: Arc<Mutex<Option<Outcome>>>,
    status: Arc<Mutex<FenceStatus>>,
    decided: EventFd,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// Logs a claim that etcd has not decided, every [`SAY_EVERY`]; `said` keeps when it was
/// last said.
pub fn say_undecided(
    generation: u64,
    e: &FenceError,
    waited: Duration,
    said: &mut Option<Instant>,
) {
    if said.is_none_or(|t| t.elapsed() >= SAY_EVERY) {
        *said = Some(Instant::now());
        tracing::warn!(
            "fence: generation {generation} not decided after {:.1} s ({e}); nothing held is released and nothing is taken over until etcd answers",
            waited.as_secs_f64()
        );
    }
}

impl Fencing {
    /// Moves `fence` to a thread of its own that makes the claims asked of it.
    pub fn start(fence: Fence, owner: Option<Owner>) -> std::io::Result<Fencing> {
        let (tx, rx) = channel::<u64>();
        let outcome = Arc::new(Mutex::new(None));
        let status = Arc::new(Mutex::new(FenceStatus {
            key: fence.key().to_string(),
            node: fence.node().to_string(),
            owner,
            ..FenceStatus::default()
        }));
        let decided = EventFd::new(EFD_NONBLOCK)?;
        let (o, s, d) = (outcome.clone(), status.clone(), decided.try_clone()?);
        std::thread::Builder::new()
            .name("fence".into())
            .spawn(move || {
                for generation in rx {
                    let result = claim(&fence, generation, &s);
                    *lock(&o) = Some(result);
                    let _ = d.write(1);
                }
            })?;
        Ok(Fencing {
            requests: Mutex::new(tx),
            outcome,
            status,
            decided,
        })
    }

    /// Starts claiming `generation`; [`Fencing::outcome`] has the end once the loop is
    /// woken (see [`Source::Fence`]).
    pub fn claim(&self, generation: u64) {
        tracing::info!("fence: claiming generation {generation}");
        let _ = lock(&self.requests).send(generation);
    }

    /// The outcome of the claim, once decided (taken).
    pub fn outcome(&self) -> Option<Outcome> {
        let _ = self.decided.read();
        lock(&self.outcome).take()
    }

    pub fn status(&self) -> FenceStatus {
        lock(&self.status).clone()
    }
}

impl Subscriber for Fencing {
    fn register(&self, r: &Registry) -> std::io::Result<()> {
        r.watch(self.decided.as_raw_fd(), Source::Fence)
    }
}

/// One claim, made until etcd decides; `status` follows it.
fn claim(fence: &Fence, generation: u64, status: &Mutex<FenceStatus>) -> Outcome {
    let began = Instant::now();
    {
        let mut s = lock(status);
        s.claiming = Some(generation);
        s.claiming_for_ms = 0;
    }
    let mut said = None;
    let result = fence.claim_until_decided(generation, RETRY, |e, waited| {
        let mut s = lock(status);
        s.etcd_error = Some(e.to_string());
        s.claiming_for_ms = waited.as_millis() as u64;
        drop(s);
        say_undecided(generation, e, waited, &mut said);
    });
    let mut s = lock(status);
    s.claiming = None;
    s.etcd_error = None;
    s.claiming_for_ms = began.elapsed().as_millis() as u64;
    match result {
        Ok(Claim::Won(owner)) => {
            s.owner = Some(owner.clone());
            Outcome::Won(owner)
        }
        Ok(Claim::Lost { owner }) => {
            s.owner = owner.clone();
            Outcome::Lost { generation, owner }
        }
        Err(e) => Outcome::Impossible(e.to_string()),
    }
}

/// The line a node that lost the fence ends with.
pub fn fenced_line(generation: u64, owner: Option<&Owner>) -> String {
    match owner {
        Some(o) => format!(
            "fenced: {o} owns this guest; this node lost generation {generation}, stopped its guest and dropped its held output"
        ),
        None => format!(
            "fenced: generation {generation} could not be claimed and the key has no owner; this node stopped its guest and dropped its held output"
        ),
    }
}
