//! The failover drill: a primary and a secondary on two lab test hosts joined by the lab
//! network, a client on that network (this machine, in the lab's namespace) making
//! acknowledged disk writes to the guest's agent, and the primary killed at a random
//! moment — its mcvmm process, or the whole test host. After each kill it checks that the
//! guest answers again at the same address, that every write the client saw acknowledged
//! is on the secondary's disk, that the agent's memory patterns verify, and that new
//! requests succeed.
//!
//! One guest lives through the rounds: after a process kill it runs on where the
//! secondary was, and the next round protects it again (`mcvmm ctl protect`) with a new
//! secondary where the killed primary was, so it moves back and forth between the two
//! hosts. A guest is booted only for the first round, after a host kill, or when a round
//! had to start over.

use std::collections::VecDeque;
use std::process::Stdio;
use std::time::{Duration, Instant};

use mcvmm_lab::Lab;
use serde::Serialize;

pub use crate::pair::{
    agent, clean, run_ok, start_lab, start_pair, start_standalone, value, PRIMARY, SECONDARY,
};
use crate::pair::{agentctl, other, protect_again, NODE};
use crate::retry::Phase;
use crate::Rng;

mod report;

use report::{console_tails, failure_report, lab_retry, Seen};

/// How a round kills the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kill {
    /// SIGKILL to the primary's mcvmm.
    Process,
    /// The primary's test host is cut from everything (its lab link down) for 3 s: the
    /// secondary wins the fence and takes over; the primary, back, loses and exits.
    Partition,
    /// The primary's mcvmm is frozen (SIGSTOP) for 3 s: the same outcome.
    Stall,
    /// The primary's whole test host is powered off.
    Host,
}

/// How long a partition or a stall lasts.
const FAULT_MS: u64 = 3000;

#[derive(Debug, Clone, Serialize)]
pub struct Round {
    pub round: usize,
    pub kill: Kill,
    /// Time from protection to the kill, ms (random).
    pub kill_after_ms: u64,
    /// Writes acknowledged before the drill, and by the client running through the kill.
    pub acked_before: u64,
    pub acked_during: u64,
    /// The client's longest wait for one acknowledged write (it spans the failover).
    pub client_stall_ms: u64,
    /// Kill to the first answer on a new connection to the guest's address.
    pub failover_ms: u64,
    /// What the secondary reports of the takeover.
    pub took_over_epoch: u64,
    /// The epoch the secondary verified whole against the primary before the kill
    /// (`ctl verify` at protection), if it committed it in time.
    pub verified_epoch: Option<u64>,
    pub takeover_build_ms: f64,
    /// The host whose mcvmm was the primary (0 or 1).
    pub primary_host: usize,
    /// The guest was protected again after an earlier round's takeover (not booted).
    pub protected_again: bool,
    /// The round ran on test hosts booted for it (the drill's first, after a host kill,
    /// or after a retry): the only rounds that boot a guest.
    pub first_on_lab: bool,
    /// Starting both sides (or protecting again) to the guest protected, ms.
    pub protected_ms: u64,
    /// The same to the guest's workload running and the writes before the kill done, ms.
    pub ready_ms: u64,
    /// The checks after the kill (verify, new writes, shutdown, the disks), ms.
    pub checks_ms: u64,
    /// The pair ran with the fence.
    pub fenced: bool,
    /// How long the secondary's claim in the fence took (fenced only), ms.
    pub fence_claim_ms: Option<f64>,
    /// The primary's guest died on its own before the kill (the secondary took over by
    /// itself; every check still ran): what the primary's log and console said.
    pub primary_died_first: Option<String>,
}

pub struct Options {
    pub process_rounds: usize,
    /// Rounds that cut the primary's host off, and that freeze its mcvmm.
    pub partition_rounds: usize,
    pub stall_rounds: usize,
    pub host_rounds: usize,
    pub guest_mem_mib: u32,
    pub seed: u64,
    /// The pairs run with the fence (etcd). Unfenced, partition and stall rounds would
    /// never take over: they need it.
    pub fenced: bool,
}

/// How many rounds protected the running guest again.
pub fn protected_again(rounds: &[Round]) -> usize {
    rounds.iter().filter(|r| r.protected_again).count()
}

/// How and when a round kills the primary: `after_ms` after the guest is protected.
#[derive(Debug, Clone, Copy)]
pub struct KillAt {
    pub kill: Kill,
    pub after_ms: u64,
}

/// Why a round failed: before its kill (the protected guest never got ready), or in
/// what it checks after the kill.
#[derive(Debug)]
pub enum RoundFailure {
    Start(String),
    /// Protecting the running guest again failed: it was lost (or the protection failed)
    /// before it was protected, in its initial sync.
    Sync(String),
    Check(String),
    /// A check failed and the guest that took over had crashed, or stopped taking
    /// interrupts, by itself (mcvmm on the secondary says so). After a takeover that is
    /// never retried (see `retry`): the soak has no QEMU counterpart to show it the lab's.
    GuestCrashed(String),
}

impl std::fmt::Display for RoundFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundFailure::Start(e) => write!(f, "the protected guest did not get ready: {e}"),
            RoundFailure::Sync(e) => write!(f, "protecting the running guest again: {e}"),
            RoundFailure::Check(e) => f.write_str(e),
            RoundFailure::GuestCrashed(e) => {
                write!(f, "the guest that took over crashed or hung by itself: {e}")
            }
        }
    }
}

impl From<String> for RoundFailure {
    fn from(e: String) -> Self {
        RoundFailure::Check(e)
    }
}

/// Where the drill's guest runs between rounds: on the host that took it over last, not
/// protected, or nowhere (none booted yet, or its hosts were replaced).
#[derive(Debug, Default)]
pub struct Chain {
    pub running_on: Option<usize>,
    /// The host a host-kill round powered off (gone on purpose, not dead).
    pub powered_off: Option<usize>,
}

/// How a round's guest got protected.
struct Prepared {
    primary: usize,
    protected_ms: u64,
    /// The running guest was protected again (not booted).
    again: bool,
    /// What happened, for the log.
    how: String,
}

/// Brings a protected guest up with its workload and the writes before the kill: the
/// running guest protected again, or (first round on these hosts) a new one booted.
/// Either failing fails the round; whether it runs again is the retry policy's.
fn prepare(
    lab: &Lab,
    ns: &str,
    chain: &mut Chain,
    run: u64,
    before: u64,
    opts: &Options,
) -> Result<Prepared, RoundFailure> {
    let records = || {
        agent(
            ns,
            &["records", "vda", &run.to_string(), &before.to_string()],
        )
    };
    let t = Instant::now();
    if let Some(host) = chain.running_on.take() {
        let sync = protect_again(lab, host).map_err(RoundFailure::Sync)?;
        let protected_ms = t.elapsed().as_millis() as u64;
        records().map_err(RoundFailure::Start)?;
        return Ok(Prepared {
            primary: host,
            protected_ms,
            again: true,
            how: format!(
                "protected again in {:.1} s ({sync})",
                protected_ms as f64 / 1e3
            ),
        });
    }
    let start = || -> Result<u64, String> {
        crate::pair::start_pair_with(lab, opts.guest_mem_mib, "", "", opts.fenced)
            .map_err(|e| format!("{e}\n{}", console_tails(lab)))?;
        let protected_ms = t.elapsed().as_millis() as u64;
        agent(ns, &["--wait", "60", "ping"])?;
        agent(ns, &["mem-start", "16", "2000"])?;
        records()?;
        Ok(protected_ms)
    };
    let protected_ms = start().map_err(RoundFailure::Start)?;
    Ok(Prepared {
        primary: PRIMARY,
        protected_ms,
        again: false,
        how: format!("booted and protected in {:.1} s", protected_ms as f64 / 1e3),
    })
}

/// One round; `lab` must have both hosts up with nothing running.
pub fn round(
    lab: &Lab,
    ns: &str,
    chain: &mut Chain,
    n: usize,
    at: KillAt,
    opts: &Options,
    log: &mut dyn FnMut(&str),
) -> Result<Round, RoundFailure> {
    let KillAt {
        kill,
        after_ms: kill_after_ms,
    } = at;
    let run = n as u64 + 1;
    let run_s = run.to_string();
    let before = 10;
    let started = Instant::now();
    let Prepared {
        primary,
        protected_ms,
        again: protected_again,
        how,
    } = prepare(lab, ns, chain, run, before, opts)?;
    let ready_ms = started.elapsed().as_millis() as u64;
    let secondary = other(primary);
    let sn = NODE[secondary];
    // The client writes through the kill.
    let client_secs = (kill_after_ms / 1000 + 4).to_string();
    let client = agentctl(ns, &["records-for", "vdb", &run_s, &client_secs])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("client: {e}"))?;
    // The secondary checks its image and replicas whole against the primary's at the
    // next epoch: a guest lost after the takeover then says whether what it was restored
    // from was right a few epochs before.
    let pn = NODE[primary];
    run_ok(
        lab.host(primary),
        "asking for a verified epoch",
        &format!("./mcvmm ctl --api-sock {pn}.sock verify"),
        20,
    )?;
    std::thread::sleep(Duration::from_millis(kill_after_ms));
    let t0 = Instant::now();
    if kill == Kill::Host {
        chain.powered_off = Some(primary);
    }
    let primary_died_first = take_away(lab, ns, primary, kill, n)?;
    let mut client = Some(client);
    let mut acked_seen = None;
    let mut verified_epoch = None;
    let mut checks_started = Instant::now();
    let checked = (|| -> Result<_, String> {
        let probe = agent(ns, &["answer-within", "30"])?;
        // The probe started after the kill was issued; its own count is what it waited.
        let failover_ms = value(&probe, "answered_ms").unwrap_or(0);
        let kill_issued_ms = (t0.elapsed().as_millis() as u64).saturating_sub(failover_ms);
        let (acked, stall) = client_result(client.take())?;
        acked_seen = Some(acked);
        checks_started = Instant::now();
        // A secondary started this round: what it says it took over is this round's.
        let status = run_ok(
            lab.host(secondary),
            "secondary status",
            &format!("./mcvmm ctl --api-sock {sn}.sock status"),
            20,
        )?;
        let status: serde_json::Value =
            serde_json::from_str(&status).map_err(|e| format!("status: {e}: {status}"))?;
        if status["took_over"].is_null() {
            return Err(format!("the secondary did not take over: {status:#}"));
        }
        let verified = run_ok(
            lab.host(secondary),
            "the secondary's verification",
            &format!("grep -h 'VERIFY FAILED\\|verified epoch' {sn}.log | tail -1; true"),
            20,
        )?;
        if verified.contains("VERIFY FAILED") {
            return Err(format!(
                "the secondary's image was not the primary's: {verified}"
            ));
        }
        verified_epoch = verified
            .split_whitespace()
            .skip_while(|w| *w != "epoch")
            .nth(1)
            .and_then(|e| e.trim_end_matches(':').parse().ok());
        let verify = agent(ns, &["mem-verify"])?;
        if !verify.contains("errors=0") {
            return Err(format!("memory patterns after failover: {verify}"));
        }
        agent(ns, &["records", "vdc", &run_s, "10"])?;
        let check = check_disks(lab, secondary, run, &[before, acked, 10])?;
        if matches!(kill, Kill::Partition | Kill::Stall) {
            fenced_off(lab, primary)?;
        }
        Ok((failover_ms, kill_issued_ms, acked, stall, status, check))
    })();
    let (failover_ms, kill_issued_ms, acked, stall, status, check) = match checked {
        Ok(c) => c,
        Err(e) => {
            let acked = || match acked_seen {
                Some(a) => Ok(a),
                None => client_result(client.take()).map(|(a, _)| a),
            };
            let seen = Seen {
                secondary,
                run,
                before,
                verified_epoch,
            };
            return Err(report::after_failed_check(lab, e, acked, seen));
        }
    };
    let checks_ms = checks_started.elapsed().as_millis() as u64;
    if kill != Kill::Host {
        chain.running_on = Some(secondary);
    }
    log(&format!(
        "round {n}: {kill:?} kill of host {primary}'s primary {kill_after_ms} ms after protection; {acked} writes acknowledged through it (longest wait {stall} ms); new connections answered {failover_ms} ms after the kill (+{kill_issued_ms} ms issuing it); took over at epoch {} (verified whole at {}); {}; {how}; ready in {:.1} s, checked in {:.1} s",
        status["took_over"]["epoch"],
        verified_epoch.map_or("none".into(), |v| v.to_string()),
        check.trim().replace('\n', "; "),
        ready_ms as f64 / 1000.0,
        checks_ms as f64 / 1000.0
    ));
    Ok(Round {
        round: n,
        kill,
        kill_after_ms,
        acked_before: before,
        acked_during: acked,
        client_stall_ms: stall,
        failover_ms,
        took_over_epoch: status["took_over"]["epoch"].as_u64().unwrap_or(0),
        verified_epoch,
        takeover_build_ms: status["took_over"]["build_ms"].as_f64().unwrap_or(0.0),
        primary_died_first,
        primary_host: primary,
        protected_again,
        first_on_lab: false,
        fenced: opts.fenced,
        fence_claim_ms: status["took_over"]["fence_claim_ms"].as_f64(),
        protected_ms,
        ready_ms,
        checks_ms,
    })
}

/// Takes the primary on `primary` away as `kill` says. `Some(what it said)`: its mcvmm
/// had ended before a process kill (the secondary took over on its own: the round's
/// checks still hold; whether the round counts is the retry policy's, see `run`).
fn take_away(
    lab: &Lab,
    ns: &str,
    primary: usize,
    kill: Kill,
    n: usize,
) -> Result<Option<String>, String> {
    let pn = NODE[primary];
    match kill {
        Kill::Process => {
            let out = run_ok(
                lab.host(primary),
                "killing the primary",
                &format!(
                    "kill -9 $(cat {pn}.pid) 2>/dev/null || {{ echo GONE; tail -3 {pn}.log; echo '-- its guest console:'; tail -25 {pn}.console; }}"
                ),
                20,
            )?;
            if out.contains("GONE") {
                eprintln!("WARNING: round {n}: the primary had ended before the kill:\n{out}");
                return Ok(Some(out));
            }
        }
        Kill::Partition => {
            let (ns, tap) = (ns.to_string(), mcvmm_lab::net::LabNet::tap(primary));
            let link = move |state: &str| {
                let _ = std::process::Command::new("ip")
                    .args(["netns", "exec", &ns, "ip", "link", "set", &tap, state])
                    .status();
            };
            link("down");
            std::thread::spawn(move || {
                std::thread::sleep(Duration::from_millis(FAULT_MS));
                link("up");
            });
        }
        Kill::Stall => {
            run_ok(
                lab.host(primary),
                "freezing the primary",
                &format!(
                    "(kill -STOP $(cat {pn}.pid); sleep {}; kill -CONT $(cat {pn}.pid)) >/dev/null 2>&1 &",
                    FAULT_MS / 1000
                ),
                20,
            )?;
        }
        Kill::Host => lab.host(primary).kill(),
    }
    Ok(None)
}

/// The primary of a partition or a stall, back, must have lost the fence and ended
/// (30 s at most) with its line: else the guest runs twice.
fn fenced_off(lab: &Lab, primary: usize) -> Result<(), String> {
    let pn = NODE[primary];
    run_ok(
        lab.host(primary),
        "the old primary's end",
        &format!(
            "i=0; while kill -0 $(cat {pn}.pid) 2>/dev/null; do
               i=$((i+1)); [ $i -gt 150 ] && {{ echo 'TWO LIVE COPIES: the old primary still runs'; tail -5 {pn}.log; exit 1; }}; sleep 0.2; done
             grep -q 'fenced: ' {pn}.log || {{ echo 'the old primary ended without its fenced line'; tail -5 {pn}.log; exit 1; }}"
        ),
        60,
    )
    .map(drop)
}

/// What the client that wrote through the kill reports: writes acknowledged, and its
/// longest wait for one, ms.
fn client_result(client: Option<std::process::Child>) -> Result<(u64, u64), String> {
    let out = client
        .ok_or("the client was already waited for")?
        .wait_with_output()
        .map_err(|e| format!("client: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked = value(&text, "acknowledged").ok_or(format!("client: {text}"))?;
    Ok((acked, value(&text, "slowest_ms").unwrap_or(0)))
}

/// Checks that disk i (1, 2, 3) of `host` holds the first `counts[i - 1]` records of run
/// `run`. The guest goes on (the next round protects it again): its disks are read as
/// they are. Every record checked was acknowledged after its fdatasync, so it is in the
/// file; records of earlier runs at the same places do not count.
fn check_disks(lab: &Lab, host: usize, run: u64, counts: &[u64]) -> Result<String, String> {
    let n = NODE[host];
    let script: Vec<String> = counts
        .iter()
        .enumerate()
        .map(|(i, c)| format!("./agentctl check-records {n}{}.img {run} {c}", i + 1))
        .collect();
    run_ok(
        lab.host(host),
        "checking the secondary's disks",
        &script.join("\n"),
        60,
    )
}

/// Runs the rounds: process kills on one lab, then each host kill on a lab of its own
/// (the killed host is gone for good).
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Vec<Round>, String> {
    if !opts.fenced && opts.partition_rounds + opts.stall_rounds > 0 {
        return Err("partition and stall rounds need the fence: without it the secondary never takes over from a primary that may be alive".into());
    }
    let mut rng = Rng::new(opts.seed);
    log(&format!("seed {}", opts.seed));
    let mut rounds = Vec::new();
    let mut plan: VecDeque<Kill> = vec![Kill::Process; opts.process_rounds].into();
    plan.extend(vec![Kill::Partition; opts.partition_rounds]);
    plan.extend(vec![Kill::Stall; opts.stall_rounds]);
    plan.extend(vec![Kill::Host; opts.host_rounds]);
    let mut lab: Option<Lab> = None;
    let mut chain = Chain::default();
    let mut lab_rounds = 0;
    while let Some(kill) = plan.pop_front() {
        let n = rounds.len();
        if lab.is_none() {
            log("booting two test hosts on a lab network");
            lab = Some(start_lab(opts.guest_mem_mib)?);
            chain = Chain::default();
        }
        let Some(l) = lab.as_ref() else { continue };
        let ns = l
            .net()
            .map(|n| n.ns.clone())
            .ok_or("the lab has no network")?;
        let at = KillAt {
            kill,
            after_ms: rng.below(3000),
        };
        // A round that starts from a guest that took over earlier: anything lost in it
        // is lost after a takeover.
        let after_takeover = chain.running_on.is_some();
        let first_on_lab = lab_rounds == 0;
        let mut r = match round(l, &ns, &mut chain, n + 1, at, opts, log) {
            Ok(r) => r,
            Err(e) => {
                let phase = match e {
                    RoundFailure::Sync(_) => Phase::Sync,
                    RoundFailure::Start(_) if !after_takeover => Phase::Boot,
                    _ => Phase::AfterTakeover,
                };
                let why = failure_report(l, &ns, n + 1, &e);
                if !lab_retry(l, &chain, &format!("round{}", n + 1), phase, &why) {
                    return Err(why);
                }
                log(&format!("round {} runs again on fresh hosts", n + 1));
                drop(lab.take());
                lab_rounds = 0;
                plan.push_front(kill);
                continue;
            }
        };
        if let (Some(out), Kill::Process) = (&r.primary_died_first, kill) {
            // Still a checked failover, but not a kill at a random moment. The primary
            // ran under epochs: its guest lost there is the lab's only if the soak shows
            // QEMU losing guests that way; then one more round replaces it.
            if !lab_retry(
                l,
                &chain,
                &format!("round{}-primary", n + 1),
                Phase::Epochs,
                out,
            ) {
                return Err(format!(
                    "round {}: the primary ended on its own before its kill:\n{out}",
                    n + 1
                ));
            }
            plan.push_front(Kill::Process);
        }
        r.first_on_lab = first_on_lab;
        rounds.push(r);
        lab_rounds += 1;
        if kill == Kill::Host {
            lab = None;
            lab_rounds = 0;
        }
    }
    Ok(rounds)
}
