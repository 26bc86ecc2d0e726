//! The nemesis drill: a fenced, protected guest on two test hosts goes through faults
//! picked at random — the replication link cut, a host cut from everything, etcd
//! stopped, either mcvmm frozen, the link slowed, the primary killed, and the orderly
//! ends (`ctl stop`, a guest reboot, `ctl unprotect`, `ctl failover` on a secondary whose
//! primary lives) — while a client writes acknowledged records. After each fault, once
//! it is healed and the pair has settled, it checks:
//!
//! - at most one mcvmm runs the guest (an mcvmm that lost the fence has exited with its
//!   "fenced" line; one still claiming has its guest paused);
//! - every record the client saw acknowledged is on the disk of the host that runs the
//!   guest now;
//! - after `ctl stop` or a reboot, no guest runs anywhere.
//!
//! Then the pair is made whole again (protected again by its own attempts, by `ctl
//! protect`, or booted afresh) and the next fault comes. Host power-off is the failover
//! drill's (a lab of its own each). A round that a test host's death or a guest's crash
//! spoilt goes to the retry policy (`retry`): what it grants as the lab's is counted as
//! not judged (and in the run's retries), anything else is a wrong outcome.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use serde::Serialize;

use crate::faults::{fenced_line, Doing, Fixture};
use crate::pair::{agent, clean, other, protect_again, start_pair_with, NODE, PRIMARY};
use crate::retry::{self, Cause};
use crate::Rng;

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub enum FaultKind {
    LinkCut,
    PrimaryCutOff,
    SecondaryCutOff,
    EtcdStopped,
    PrimaryFrozen,
    SecondaryFrozen,
    LinkDelay,
    PrimaryKilled,
    Stop,
    GuestReboot,
    Unprotect,
    OperatorFailover,
}

const KINDS: [FaultKind; 12] = [
    FaultKind::LinkCut,
    FaultKind::PrimaryCutOff,
    FaultKind::SecondaryCutOff,
    FaultKind::EtcdStopped,
    FaultKind::PrimaryFrozen,
    FaultKind::SecondaryFrozen,
    FaultKind::LinkDelay,
    FaultKind::PrimaryKilled,
    FaultKind::Stop,
    FaultKind::GuestReboot,
    FaultKind::Unprotect,
    FaultKind::OperatorFailover,
];

/// One fault and how it ended.
#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub n: usize,
    pub kind: FaultKind,
    /// How long the fault lasted (0 for an instant one).
    pub fault_ms: u64,
    /// The outcome was right.
    pub correct: bool,
    /// It could not be judged (a test host died, the guest crashed).
    pub unjudged: bool,
    pub acked: u64,
    pub missing: u64,
    /// From the end of the fault until one host ran the guest (or none, after a stop).
    pub settle_ms: u64,
    pub what: String,
}

pub struct Options {
    pub faults: usize,
    pub seed: u64,
    pub mem_mib: u32,
    /// Pairs run with `--etcd` (the lab's); without, to show what the fence changes
    /// (and to run an mcvmm older than the fence, `MCVMM_MCVMM=PATH`).
    pub fenced: bool,
}

/// Runs the drill; `log` gets a line per round.
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Vec<Round>, String> {
    let mut f = Fixture::start(opts.mem_mib)?;
    let mut rng = Rng::new(opts.seed);
    let mut rounds = Vec::new();
    let mut owner = None;
    // Every kind once, in a random order, then picks at random (the network and freeze
    // faults twice as likely as the others, which end or move the guest).
    let mut first = KINDS;
    for i in (1..first.len()).rev() {
        first.swap(i, rng.below(i as u64 + 1) as usize);
    }
    for n in 1..=opts.faults {
        let kind = match first.get(n - 1) {
            Some(k) => *k,
            None => KINDS[rng.below(KINDS.len() as u64 + 6) as usize % KINDS.len()],
        };
        let r = match whole_again(&f, opts, &mut owner) {
            Ok(p) => round(&f, n, kind, p, &mut rng, &mut owner),
            Err(e) => {
                let r = unjudged(n, kind, format!("the pair could not be made whole: {e}"));
                match f.lab_trouble() {
                    Some((cause, what)) => judged_by_policy(&f, r, cause, what),
                    // Nothing says it was the lab's: mcvmm failed to protect or start.
                    None => Round {
                        unjudged: false,
                        ..r
                    },
                }
            }
        };
        f.heal();
        log(&format!(
            "round {n}: {kind:?} ({} ms): {}{}; {} acknowledged, {} missing; settled in {} ms",
            r.fault_ms,
            if r.unjudged {
                "NOT JUDGED: "
            } else if r.correct {
                "ok: "
            } else {
                "WRONG: "
            },
            r.what,
            r.acked,
            r.missing,
            r.settle_ms
        ));
        if r.unjudged {
            owner = None;
        }
        rounds.push(r);
        // A test host that died stays dead: the next rounds get new ones (the round it
        // spoilt went to the retry policy above).
        if !f.hosts_alive() {
            log("a test host died: the next rounds run on new test hosts");
            drop(f);
            f = Fixture::start(opts.mem_mib)?;
            owner = None;
        }
    }
    clean(&f.lab);
    Ok(rounds)
}

fn unjudged(n: usize, kind: FaultKind, what: String) -> Round {
    Round {
        n,
        kind,
        fault_ms: 0,
        correct: false,
        unjudged: true,
        acked: 0,
        missing: 0,
        settle_ms: 0,
        what,
    }
}

/// Makes the pair protected again: by its own attempts, by `ctl protect` to a secondary
/// started anew, or booted afresh. Returns the host that runs the guest.
fn whole_again(f: &Fixture, opts: &Options, owner: &mut Option<usize>) -> Result<usize, String> {
    if let Some(p) = *owner {
        let deadline = Instant::now() + Duration::from_secs(40);
        let mut asked = false;
        while Instant::now() < deadline {
            match (f.doing(p), f.doing(other(p))) {
                (
                    Doing::RunsGuest {
                        protected: true, ..
                    },
                    Doing::Secondary,
                ) => return Ok(p),
                (Doing::RunsGuest { .. }, Doing::Nothing) if !asked => {
                    asked = true;
                    protect_again(&f.lab, p)?;
                }
                (Doing::RunsGuest { .. }, Doing::Secondary) if !asked => {
                    asked = true;
                    // After `ctl unprotect` nothing comes by itself; otherwise its own
                    // attempt may be on its way (then this one is refused: no matter).
                    let to = format!("{}:7777", mcvmm_lab::net::host_addr(other(p)));
                    let _ = f.sh(
                        p,
                        "ctl protect",
                        &format!("./mcvmm ctl --api-sock {}.sock protect {to}", NODE[p]),
                    );
                }
                (Doing::RunsGuest { .. }, _) => {}
                _ => break,
            }
            std::thread::sleep(Duration::from_millis(500));
        }
    }
    *owner = None;
    clean(&f.lab);
    start_pair_with(&f.lab, opts.mem_mib, "", "", opts.fenced)?;
    agent(&f.ns, &["--wait", "60", "ping"])?;
    *owner = Some(PRIMARY);
    Ok(PRIMARY)
}

/// How long a fault of `kind` lasts this time (0: an instant one).
fn duration(kind: FaultKind, rng: &mut Rng) -> u64 {
    match kind {
        FaultKind::LinkCut
        | FaultKind::PrimaryCutOff
        | FaultKind::SecondaryCutOff
        | FaultKind::EtcdStopped => rng.between(1000, 5000),
        FaultKind::PrimaryFrozen | FaultKind::SecondaryFrozen => rng.between(300, 5000),
        FaultKind::LinkDelay => 10_000,
        _ => 0,
    }
}

/// Puts the fault on the pair whose primary is host `p`, for `ms`.
fn apply(f: &Fixture, kind: FaultKind, p: usize, ms: u64) -> Result<(), String> {
    let s = other(p);
    let hold = || std::thread::sleep(Duration::from_millis(ms));
    let ctl = |host: usize, req: &str| {
        f.sh(
            host,
            req,
            &format!("./mcvmm ctl --api-sock {}.sock {req}", NODE[host]),
        )
    };
    match kind {
        FaultKind::LinkCut => {
            f.isolate(true)?;
            hold();
            f.isolate(false)?;
        }
        FaultKind::PrimaryCutOff | FaultKind::SecondaryCutOff => {
            let h = if kind == FaultKind::PrimaryCutOff {
                p
            } else {
                s
            };
            f.cut_off(h, true)?;
            hold();
            f.cut_off(h, false)?;
        }
        FaultKind::EtcdStopped => f.freeze_etcd(ms)?,
        FaultKind::PrimaryFrozen => f.freeze(p, ms)?,
        FaultKind::SecondaryFrozen => f.freeze(s, ms)?,
        FaultKind::LinkDelay => {
            f.delay(s, Some(200))?;
            hold();
            f.delay(s, None)?;
        }
        FaultKind::PrimaryKilled => {
            f.sh(p, "kill", &format!("kill -9 $(cat {}.pid)", NODE[p]))?;
        }
        FaultKind::Stop => {
            ctl(p, "stop")?;
        }
        FaultKind::GuestReboot => {
            agent(&f.ns, &["shutdown"])?;
        }
        FaultKind::Unprotect => {
            ctl(p, "unprotect")?;
        }
        FaultKind::OperatorFailover => {
            ctl(s, "failover")?;
        }
    }
    Ok(())
}

/// Who runs the guest once the pair settled (20 s at most): `Ok(Some(host))`, `Ok(None)`
/// (nobody, and no mcvmm runs), or why the state is wrong.
fn settle(f: &Fixture, within: Duration) -> Result<Option<usize>, String> {
    let deadline = Instant::now() + within;
    let mut last = String::new();
    while Instant::now() < deadline {
        let d = [f.doing(0), f.doing(1)];
        let running: Vec<usize> = (0..2)
            .filter(|h| matches!(d[*h], Doing::RunsGuest { paused: false, .. }))
            .collect();
        let busy = d
            .iter()
            .any(|x| matches!(x, Doing::Silent | Doing::RunsGuest { paused: true, .. }));
        match (running.as_slice(), busy) {
            ([h], false) => return Ok(Some(*h)),
            ([], false) if d.iter().all(|x| *x == Doing::Nothing) => return Ok(None),
            _ => {}
        }
        last = format!("host 0: {:?}, host 1: {:?}", d[0], d[1]);
        std::thread::sleep(Duration::from_millis(400));
    }
    Err(format!("not settled in {} s: {last}", within.as_secs()))
}

/// A round the lab may have spoilt (a test host died, a guest crashed): the retry policy
/// judges it. Granted, the round is not judged (and the run's ledger counts it);
/// refused, it is wrong: a guest lost that way may be mcvmm's doing.
fn judged_by_policy(f: &Fixture, mut r: Round, cause: Cause, what: String) -> Round {
    let hosts: Vec<&mcvmm_lab::TestHost> = f.lab.hosts().iter().collect();
    let kept = crate::evidence::keep(&format!("round{}", r.n), &hosts, None, &what);
    let granted = retry::allow(
        cause.clone(),
        &format!("{what}; evidence in {}", kept.display()),
    );
    r.unjudged = granted;
    r.correct = false;
    r.what = format!(
        "{what} ({cause:?}, {}; evidence in {})",
        if granted {
            "the lab's: not judged"
        } else {
            "not shown to be the lab's"
        },
        kept.display()
    );
    r
}

fn round(
    f: &Fixture,
    n: usize,
    kind: FaultKind,
    p: usize,
    rng: &mut Rng,
    owner: &mut Option<usize>,
) -> Round {
    // A round that ends before judging leaves the pair to be booted afresh.
    *owner = None;
    let run = 1000 + n as u64;
    let mut r = unjudged(n, kind, String::new());
    r.fault_ms = duration(kind, rng);
    // Writing before, through and after the fault.
    let client = match f.client(run, 4 + r.fault_ms / 1000) {
        Ok(c) => c,
        Err(e) => {
            r.unjudged = false;
            r.what = e;
            return r;
        }
    };
    std::thread::sleep(Duration::from_millis(1000));
    let applied = apply(f, kind, p, r.fault_ms);
    let t = Instant::now();
    let ends_guest = matches!(kind, FaultKind::Stop | FaultKind::GuestReboot);
    // The guest's reboot comes once the agent's reply is out: the primary must end
    // before anything is judged.
    let applied = applied.and_then(|()| {
        if ends_guest && !f.wait_gone(p, 20) {
            return Err(format!("host {p}'s mcvmm still runs 20 s after a {kind:?}"));
        }
        Ok(())
    });
    let settled = applied.and_then(|()| settle(f, Duration::from_secs(25)));
    r.settle_ms = t.elapsed().as_millis() as u64;
    // The client ends on its own (its time, or its first failed write once the guest
    // ended).
    let acked = Fixture::acked(client);
    if let Some((cause, what)) = f.lab_trouble() {
        return judged_by_policy(f, r, cause, what);
    }
    r.unjudged = false;
    let (who, acked) = match (settled, acked) {
        (Ok(w), Ok(a)) => (w, a),
        (Err(e), _) | (_, Err(e)) => {
            r.what = e;
            return r;
        }
    };
    r.acked = acked;
    *owner = who;
    let check = match who {
        Some(h) if !ends_guest => f.check_records(h, run, acked).and_then(|()| {
            // The guest that runs must answer too.
            agent(&f.ns, &["--wait", "20", "ping"])
                .map(|_| h)
                .map_err(|e| format!("host {h} runs the guest, which does not answer: {e}"))
        }),
        Some(h) => Err(format!("the guest runs on host {h} after a {kind:?}")),
        None if ends_guest => {
            r.correct = true;
            r.what = "no guest runs anywhere".into();
            return r;
        }
        None => Err("no guest runs anywhere".into()),
    };
    match check {
        Ok(h) => {
            r.correct = true;
            let ended = if f.alive(other(h)) {
                String::new()
            } else {
                let log = f.log(other(h));
                format!(
                    "; host {}'s mcvmm ended{}",
                    other(h),
                    fenced_line(&log).map_or(String::new(), |l| format!(": {l}"))
                )
            };
            r.what = format!(
                "host {h} runs the guest{}{ended}",
                if h == p { "" } else { " (moved)" }
            );
        }
        Err(e) => {
            // A guest that crashed while it was being checked.
            if let Some((cause, what)) = f.lab_trouble() {
                return judged_by_policy(f, r, cause, format!("{e}; {what}"));
            }
            if !ends_guest {
                r.missing = acked;
            }
            r.what = e;
        }
    }
    r
}

/// Per fault kind: faults, correct outcomes, unjudged, records checked, missing, median
/// settle time.
pub fn table(rounds: &[Round]) -> String {
    let mut by: BTreeMap<FaultKind, Vec<&Round>> = BTreeMap::new();
    for r in rounds {
        by.entry(r.kind).or_default().push(r);
    }
    let mut out = String::from(
        "| fault | faults | correct | not judged | acked records checked | missing | median settle (ms) |\n|---|---|---|---|---|---|---|\n",
    );
    // After a stop or a reboot no guest runs: its records are not checked (`correct`
    // says that nothing runs).
    for (kind, rs) in &by {
        let mut settle: Vec<u64> = rs
            .iter()
            .filter(|r| !r.unjudged)
            .map(|r| r.settle_ms)
            .collect();
        settle.sort_unstable();
        out += &format!(
            "| {kind:?} | {} | {} | {} | {} | {} | {} |\n",
            rs.len(),
            rs.iter().filter(|r| r.correct).count(),
            rs.iter().filter(|r| r.unjudged).count(),
            rs.iter()
                .filter(
                    |r| !r.unjudged && !matches!(r.kind, FaultKind::Stop | FaultKind::GuestReboot)
                )
                .map(|r| r.acked)
                .sum::<u64>(),
            rs.iter().map(|r| r.missing).sum::<u64>(),
            settle.get(settle.len() / 2).copied().unwrap_or(0)
        );
    }
    out
}
