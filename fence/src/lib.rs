//! The fence: which node may run a VM's guest. The guest of generation G runs only on the
//! node whose own etcd transaction moved the VM's owner key from generation G-1 to G;
//! everyone else is fenced off. etcd (an existing consensus engine) decides, never this
//! process: a claim is one compare-and-swap on the key's last revision, so two nodes
//! that race for the same generation cannot both win, and a node that was partitioned
//! away cannot win with a stale view.
//!
//! The key `/mcvmm/NAME/owner` holds an [`Owner`] as JSON. No key is generation 0.
//!
//! The VMM is not async: [`Fence`] runs the etcd client on a runtime of its own, and
//! every call is bounded by the fence's timeout.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use etcd_client::{Client, Compare, CompareOp, ConnectOptions, Txn, TxnOp, TxnOpResponse};
use serde::{Deserialize, Serialize};

/// Who owns a VM's guest: the node that won `generation`, and since when.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Owner {
    pub generation: u64,
    pub node: String,
    /// When the node won it, in milliseconds since the Unix epoch.
    pub since: u64,
}

impl std::fmt::Display for Owner {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "node {:?} (generation {})", self.node, self.generation)
    }
}

/// How a claim ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// This node owns the generation asked for (now, or already: a claim repeated after
    /// an answer was lost is won again, not lost to itself).
    Won(Owner),
    /// Another claim got there first, or the key is past the generation asked for:
    /// `owner` is who owns the guest now (`None`: the key is gone).
    Lost { owner: Option<Owner> },
}

#[derive(Debug, thiserror::Error)]
pub enum FenceError {
    #[error(
        "--vm-name {0:?}: use 1 to 64 of the characters a-z, A-Z, 0-9, '-', '_' and '.', not starting with '.'"
    )]
    BadName(String),
    #[error("--node {0:?}: use 1 to 64 characters, no control characters")]
    BadNode(String),
    #[error("--etcd: no URL given")]
    NoUrl,
    #[error("etcd at {urls}: {source}")]
    Etcd {
        urls: String,
        source: etcd_client::Error,
    },
    #[error("etcd at {urls} did not answer within {} ms", timeout.as_millis())]
    Timeout { urls: String, timeout: Duration },
    #[error("{key} holds something that is not an owner record ({why}): not touching it")]
    NotAnOwner { key: String, why: String },
    #[error("encoding the owner record: {0}")]
    Encode(serde_json::Error),
    #[error("generation {0} cannot be claimed: generations start at 1")]
    NoGeneration(u64),
    #[error("the fence's runtime: {0}")]
    Runtime(std::io::Error),
    #[error("{key} changed under {tries} claims in a row without leaving generation {generation}")]
    Contended {
        key: String,
        generation: u64,
        tries: usize,
    },
}

/// The key as read: its owner and the revision it was written at, or absent.
type View = Option<(Owner, i64)>;

/// Transactions one claim makes at most while the key keeps changing under it at the
/// generation before the one claimed (nothing writes it that way; the cap only keeps a
/// claim from looping on a misbehaving writer).
const CLAIM_TRIES: usize = 4;

/// How one claim's transaction went.
enum Swap {
    Done(Owner),
    /// The key was not as the claim saw it; this is how it is.
    Changed(View),
}

/// One VM's fence in etcd, for one node.
pub struct Fence {
    rt: tokio::runtime::Runtime,
    client: Client,
    urls: String,
    key: String,
    node: String,
    timeout: Duration,
    /// The key as this fence last saw it (a read, or a claim's answer); `None`: not yet.
    seen: Mutex<Option<View>>,
}

/// Whether `name` can be a VM's name in an etcd key: no separators, no control
/// characters, nothing that reads as a path step.
pub fn valid_vm_name(name: &str) -> bool {
    (1..=64).contains(&name.len())
        && !name.starts_with('.')
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'))
}

impl Fence {
    /// Connects to etcd at `urls` for the VM `vm_name`, as `node`. Fails if no URL
    /// answers within `timeout`.
    pub fn connect(
        urls: &[String],
        vm_name: &str,
        node: &str,
        timeout: Duration,
    ) -> Result<Fence, FenceError> {
        if !valid_vm_name(vm_name) {
            return Err(FenceError::BadName(vm_name.to_string()));
        }
        if node.is_empty() || node.len() > 64 || node.chars().any(char::is_control) {
            return Err(FenceError::BadNode(node.to_string()));
        }
        if urls.is_empty() {
            return Err(FenceError::NoUrl);
        }
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .map_err(FenceError::Runtime)?;
        let joined = urls.join(",");
        let options = ConnectOptions::new()
            .with_connect_timeout(timeout)
            .with_timeout(timeout);
        let client = bounded(&rt, &joined, timeout, Client::connect(urls, Some(options)))?;
        let fence = Fence {
            rt,
            client,
            urls: joined,
            key: format!("/mcvmm/{vm_name}/owner"),
            node: node.to_string(),
            timeout,
            seen: Mutex::new(None),
        };
        // The client connects lazily: one read proves that etcd answers.
        fence.owner()?;
        Ok(fence)
    }

    /// The key this fence guards.
    pub fn key(&self) -> &str {
        &self.key
    }

    /// The owner now, if the key exists.
    pub fn owner(&self) -> Result<Option<Owner>, FenceError> {
        Ok(self.read()?.map(|(owner, _)| owner))
    }

    /// The owner and the revision its record was last written at.
    fn read(&self) -> Result<View, FenceError> {
        let mut client = self.client.clone();
        let got = bounded(
            &self.rt,
            &self.urls,
            self.timeout,
            client.get(self.key.as_str(), None),
        )?;
        let view = match got.kvs().first() {
            None => None,
            Some(kv) => Some((self.decode(kv.value())?, kv.mod_revision())),
        };
        self.saw(view.clone());
        Ok(view)
    }

    fn saw(&self, view: View) {
        *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = Some(view);
    }

    /// The key as last seen, if that view leads to `generation`: its generation is the
    /// one before (absent, for generation 1).
    fn seen_before(&self, generation: u64) -> Option<View> {
        let seen = self.seen.lock().unwrap_or_else(PoisonError::into_inner);
        match &*seen {
            Some(Some((o, r))) if o.generation.checked_add(1) == Some(generation) => {
                Some(Some((o.clone(), *r)))
            }
            Some(None) if generation == 1 => Some(None),
            _ => None,
        }
    }

    fn decode(&self, value: &[u8]) -> Result<Owner, FenceError> {
        serde_json::from_slice(value).map_err(|e| FenceError::NotAnOwner {
            key: self.key.clone(),
            why: e.to_string(),
        })
    }

    /// Claims `generation` for this node: won only if this transaction moves the key
    /// from `generation - 1` (no key for 1) to `generation`, compared on the revision the
    /// record was read at, so that nothing written in between is overwritten.
    ///
    /// A view of the key seen before (a read when a primary was accepted, or a claim's
    /// answer) that says `generation - 1` lets the transaction go at once: one round
    /// trip. It is never enough to decide: the transaction compares the revision, so a
    /// stale view cannot win, and a claim decides a loss only on what etcd answered.
    pub fn claim(&self, generation: u64) -> Result<Claim, FenceError> {
        if generation == 0 {
            return Err(FenceError::NoGeneration(0));
        }
        let began = std::time::Instant::now();
        let (mut view, mut fresh) = match self.seen_before(generation) {
            Some(v) => (v, false),
            None => (self.read()?, true),
        };
        for _ in 0..CLAIM_TRIES {
            if fresh {
                let held = view.as_ref().map_or(0, |(o, _)| o.generation);
                if let Some((o, _)) = &view {
                    if o.generation == generation && o.node == self.node {
                        return Ok(Claim::Won(o.clone()));
                    }
                }
                if held != generation - 1 {
                    return Ok(Claim::Lost {
                        owner: view.map(|(o, _)| o),
                    });
                }
            }
            match self.swap(generation, &view)? {
                Swap::Done(owner) => {
                    tracing::info!(
                        "fence: {} won generation {generation} of {} ({:.1} ms)",
                        self.node,
                        self.key,
                        began.elapsed().as_secs_f64() * 1e3
                    );
                    return Ok(Claim::Won(owner));
                }
                Swap::Changed(now) => {
                    view = now;
                    fresh = true;
                }
            }
        }
        Err(FenceError::Contended {
            key: self.key.clone(),
            generation,
            tries: CLAIM_TRIES,
        })
    }

    /// One transaction: this node's record for `generation` if the key is still as in
    /// `view` (compared on its revision), else the key as it is now.
    fn swap(&self, generation: u64, view: &View) -> Result<Swap, FenceError> {
        let owner = Owner {
            generation,
            node: self.node.clone(),
            since: now_ms(),
        };
        let value = serde_json::to_vec(&owner).map_err(FenceError::Encode)?;
        let unchanged = match view {
            Some((_, revision)) => {
                Compare::mod_revision(self.key.as_str(), CompareOp::Equal, *revision)
            }
            // Absent: never created, or created and deleted since the read.
            None => Compare::create_revision(self.key.as_str(), CompareOp::Equal, 0),
        };
        let txn = Txn::new()
            .when([unchanged])
            .and_then([TxnOp::put(self.key.as_str(), value, None)])
            .or_else([TxnOp::get(self.key.as_str(), None)]);
        let mut client = self.client.clone();
        let done = bounded(&self.rt, &self.urls, self.timeout, client.txn(txn))?;
        if done.succeeded() {
            // The put is the transaction's only write: its revision is the record's.
            match done.header().map(|h| h.revision()) {
                Some(revision) => self.saw(Some((owner.clone(), revision))),
                None => *self.seen.lock().unwrap_or_else(PoisonError::into_inner) = None,
            }
            return Ok(Swap::Done(owner));
        }
        let now = done.op_responses().into_iter().find_map(|r| match r {
            TxnOpResponse::Get(g) => Some(g),
            _ => None,
        });
        let now = match now.as_ref().and_then(|g| g.kvs().first()) {
            Some(kv) => Some((self.decode(kv.value())?, kv.mod_revision())),
            None => None,
        };
        self.saw(now.clone());
        Ok(Swap::Changed(now))
    }

    /// [`Fence::claim`] until etcd decides: a claim that could not be made (etcd
    /// unreachable, slow, or answering with an error) is made again every `retry`, for as
    /// long as it takes, and each failure is put to `failed` with the time spent so far.
    /// Only a generation that can never be claimed is returned as an error.
    pub fn claim_until_decided(
        &self,
        generation: u64,
        retry: Duration,
        mut failed: impl FnMut(&FenceError, Duration),
    ) -> Result<Claim, FenceError> {
        let began = std::time::Instant::now();
        loop {
            match self.claim(generation) {
                Ok(c) => return Ok(c),
                Err(e @ FenceError::NoGeneration(_)) => return Err(e),
                Err(e) => {
                    failed(&e, began.elapsed());
                    std::thread::sleep(retry);
                }
            }
        }
    }

    pub fn node(&self) -> &str {
        &self.node
    }
}

/// Runs `f` on `rt`, bounded by `timeout`.
fn bounded<T>(
    rt: &tokio::runtime::Runtime,
    urls: &str,
    timeout: Duration,
    f: impl std::future::Future<Output = Result<T, etcd_client::Error>>,
) -> Result<T, FenceError> {
    rt.block_on(async { tokio::time::timeout(timeout, f).await })
        .map_err(|_| FenceError::Timeout {
            urls: urls.to_string(),
            timeout,
        })?
        .map_err(|source| FenceError::Etcd {
            urls: urls.to_string(),
            source,
        })
}

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vm_names_that_could_not_be_one_key_step_are_refused() {
        for good in ["web1", "db.primary", "a-b_c", "X"] {
            assert!(valid_vm_name(good), "{good}");
        }
        let long = "a".repeat(65);
        for bad in [
            "",
            "a/b",
            "..",
            ".hidden",
            "a b",
            "é",
            "a\nb",
            long.as_str(),
        ] {
            assert!(!valid_vm_name(bad), "{bad:?}");
        }
    }

    #[test]
    fn a_bad_name_is_refused_before_any_connection() {
        let e = Fence::connect(
            &["http://127.0.0.1:1".into()],
            "a/b",
            "n1",
            Duration::from_millis(100),
        )
        .err()
        .map(|e| e.to_string())
        .unwrap_or_default();
        assert!(e.starts_with("--vm-name \"a/b\""), "{e}");
    }
}
