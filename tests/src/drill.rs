//! The failover drill: a primary and a secondary on two lab test hosts joined by the lab
//! network, a client on that network (this machine, in the lab's namespace) making
//! acknowledged disk writes to the guest's agent, and the primary killed at a random
//! moment — its mcvmm process, or the whole test host. After each kill it checks that the
//! guest answers again at the same address, that every write the client saw acknowledged
//! is on the secondary's disk, that the agent's memory patterns verify, and that new
//! requests succeed.

use std::collections::VecDeque;
use std::net::Ipv4Addr;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use mcvmm_lab::{net, HostOptions, Lab, LabOptions, TestHost};
use serde::Serialize;

/// How a round kills the primary.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Kill {
    /// SIGKILL to the primary's mcvmm.
    Process,
    /// The primary's whole test host is powered off.
    Host,
}

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
    pub takeover_build_ms: f64,
    /// The primary's guest died on its own before the kill (the secondary took over by
    /// itself; every check still ran).
    pub primary_died_first: bool,
}

pub struct Options {
    pub process_rounds: usize,
    pub host_rounds: usize,
    pub guest_mem_mib: u32,
    pub seed: u64,
}

pub const PRIMARY: usize = 0;
pub const SECONDARY: usize = 1;
const PORT: u16 = 7777;
/// Fresh labs a drill may start after test hosts died under it.
const MAX_LAB_RESTARTS: usize = 3;
/// Rounds a drill may add for primaries whose guest died on its own before the kill
/// (issue 6's notes: seen about once in ten rounds in the lab, cause not yet known).
pub const MAX_EXTRA_ROUNDS: usize = 6;

fn guest_ip() -> Ipv4Addr {
    net::guest_addr(0)
}

pub fn run_ok(host: &TestHost, what: &str, cmd: &str, secs: u64) -> Result<String, String> {
    let out = host
        .run(cmd, Duration::from_secs(secs))
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.success() {
        return Err(format!(
            "{what}: status {}{}\n{}\n{}",
            out.status,
            if out.timed_out { " (timed out)" } else { "" },
            out.stdout_text(),
            out.stderr_text()
        ));
    }
    Ok(out.stdout_text())
}

/// `agentctl` against the guest, from the lab network.
fn agentctl(ns: &str, args: &[&str]) -> Command {
    let bin = crate::workspace_command("mcvmm-agentctl");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(bin.get_program());
    c.args(["--addr", &format!("{}:7000", guest_ip())]);
    c.args(args);
    c
}

pub fn agent(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = agentctl(ns, args)
        .output()
        .map_err(|e| format!("agentctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "agentctl {}: {}{}",
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

/// The number after `key=` in `text` (words separated by white space).
pub fn value(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// A small deterministic generator: the seed is printed, so a round can be replayed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0 % n.max(1)
    }
}

pub fn start_lab(mem_mib: u32) -> Result<Lab, String> {
    let images = mcvmm_lab::reference::GuestImages::locate().map_err(|e| e.to_string())?;
    let mut binaries = Vec::new();
    for (name, dest) in [("mcvmm", "mcvmm"), ("mcvmm-agentctl", "agentctl")] {
        let bin = mcvmm_lab::assets::workspace_binary(name).map_err(|e| e.to_string())?;
        binaries.push((bin, dest.to_string()));
    }
    Lab::start(&LabOptions {
        hosts: 2,
        network: true,
        host: HostOptions {
            mem_mib: mem_mib + 768,
            files: images.files(),
            binaries,
            ..HostOptions::default()
        },
    })
    .map_err(|e| format!("starting the lab: {e}"))
}

/// Starts the secondary, then the primary, waits until the guest is protected.
/// `extra`: more flags for the primary.
pub fn start_pair(lab: &Lab, mem_mib: u32, extra: &str) -> Result<(), String> {
    let sec_ip = net::host_addr(SECONDARY);
    run_ok(
        lab.host(SECONDARY),
        "starting the secondary",
        &format!(
            "rm -f s1.img s2.img s3.img; truncate -s 32M s1.img s2.img s3.img
             ip link del stap 2>/dev/null; ip tuntap add dev stap mode tap
             ip link set stap master br0 up
             ./mcvmm run --secondary --listen {sec_ip}:{PORT} --disk s1.img --disk s2.img \
                 --disk s3.img --tap stap --serial s.console --api-sock s.sock >s.log 2>&1 &
             echo $! >s.pid"
        ),
        30,
    )?;
    run_ok(
        lab.host(PRIMARY),
        "starting the primary",
        &format!(
            "{}
             end=$(( $(cut -d. -f1 /proc/uptime) + 100 ))
             until ./mcvmm ctl --api-sock p.sock status 2>/dev/null | grep -q '\"protected\": true'; do
               if [ $(cut -d. -f1 /proc/uptime) -gt $end ]; then echo 'not protected in 100 s'; cat p.log; exit 1; fi
               if ! kill -0 $(cat p.pid) 2>/dev/null; then echo 'primary ended'; cat p.log; exit 1; fi
               sleep 0.2
             done",
            start_primary_script(
                mem_mib,
                &format!("--primary --peer {sec_ip}:{PORT} {extra}")
            )
        ),
        150,
    )
    .map_err(|e| {
        let s = lab
            .host(SECONDARY)
            .run("cat s.log; tail -5 s.console", Duration::from_secs(10))
            .map(|o| o.stdout_text())
            .unwrap_or_default();
        format!("{e}\nsecondary log:\n{s}")
    })?;
    Ok(())
}

/// Ends whatever a failed start left on both hosts.
pub fn clean(lab: &Lab) {
    for (h, p) in [(PRIMARY, "p"), (SECONDARY, "s")] {
        let _ = lab.host(h).run(
            &format!(
                "kill -9 $(cat {p}.pid) 2>/dev/null; sleep 0.2; rm -f {p}1.img {p}2.img {p}3.img; ip link del {p}tap 2>/dev/null; true"
            ),
            Duration::from_secs(20),
        );
    }
}

/// Why a round failed: before its kill (the protected guest never got ready), or in
/// what it checks after the kill.
#[derive(Debug)]
pub enum RoundFailure {
    Start(String),
    Check(String),
}

impl std::fmt::Display for RoundFailure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            RoundFailure::Start(e) => write!(f, "the protected guest did not get ready: {e}"),
            RoundFailure::Check(e) => f.write_str(e),
        }
    }
}

impl From<String> for RoundFailure {
    fn from(e: String) -> Self {
        RoundFailure::Check(e)
    }
}

/// Brings a protected guest up with its workload and the writes before the drill. The
/// lab's nested guests have been seen to die during boot under QEMU as well as mcvmm (see
/// issue 4's notes): a start that fails is tried once more, loudly; a kill is never. A
/// second failure is the caller's to take to fresh test hosts.
fn prepare(lab: &Lab, ns: &str, run: u64, before: u64, opts: &Options) -> Result<(), String> {
    let once = || -> Result<(), String> {
        start_pair(lab, opts.guest_mem_mib, "")?;
        agent(ns, &["--wait", "60", "ping"])?;
        agent(ns, &["mem-start", "16", "2000"])?;
        agent(
            ns,
            &["records", "vda", &run.to_string(), &before.to_string()],
        )?;
        Ok(())
    };
    once().or_else(|e| {
        eprintln!(
            "WARNING: starting the protected guest failed ({e}\n{}); trying once more",
            console_tails(lab)
        );
        clean(lab);
        once().map_err(|e| format!("{e}\n{}", console_tails(lab)))
    })
}

/// What `command(prefix)` prints on the primary's host ("p") and the secondary's ("s"),
/// each under a heading; a host that does not answer adds nothing (diagnostics only).
fn on_both_hosts(lab: &Lab, secs: u64, command: impl Fn(&str) -> String) -> String {
    [(PRIMARY, "p"), (SECONDARY, "s")]
        .iter()
        .map(|(i, p)| {
            lab.host(*i)
                .run(&command(p), Duration::from_secs(secs))
                .map(|o| format!("-- {p}:\n{}", o.stdout_text()))
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join("\n")
}

/// The end of both guests' consoles: where a guest that never got ready stopped.
fn console_tails(lab: &Lab) -> String {
    on_both_hosts(lab, 10, |p| format!("tail -8 {p}.console 2>&1"))
}

/// One round; `lab` must have both hosts up with nothing running.
pub fn round(
    lab: &Lab,
    ns: &str,
    n: usize,
    kill: Kill,
    kill_after_ms: u64,
    opts: &Options,
    log: &mut dyn FnMut(&str),
) -> Result<Round, RoundFailure> {
    let run = n as u64 + 1;
    let run_s = run.to_string();
    let before = 30;
    prepare(lab, ns, run, before, opts).map_err(RoundFailure::Start)?;
    // The client writes through the kill.
    let client_secs = (kill_after_ms / 1000 + 4).to_string();
    let client = agentctl(ns, &["records-for", "vdb", &run_s, &client_secs])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("client: {e}"))?;
    std::thread::sleep(Duration::from_millis(kill_after_ms));
    let t0 = Instant::now();
    let mut primary_died_first = false;
    match kill {
        Kill::Process => {
            let out = run_ok(
                lab.host(PRIMARY),
                "killing the primary",
                "kill -9 $(cat p.pid) 2>/dev/null || { echo GONE; tail -3 p.log; }",
                20,
            )?;
            if out.contains("GONE") {
                // Seen in the lab: the primary's guest crashed by itself (issue 6 notes)
                // and the secondary took over on its own. The round's checks still hold.
                primary_died_first = true;
                eprintln!("WARNING: round {n}: the primary had ended before the kill:\n{out}");
            }
        }
        Kill::Host => lab.host(PRIMARY).kill(),
    }
    let probe = agent(ns, &["answer-within", "30"])?;
    // The probe started after the kill was issued; its own count is what it waited.
    let failover_ms = value(&probe, "answered_ms").unwrap_or(0);
    let kill_issued_ms = (t0.elapsed().as_millis() as u64).saturating_sub(failover_ms);
    let out = client
        .wait_with_output()
        .map_err(|e| format!("client: {e}"))?;
    let client_out = String::from_utf8_lossy(&out.stdout).into_owned();
    let acked = value(&client_out, "acknowledged").ok_or(format!("client: {client_out}"))?;
    let stall = value(&client_out, "slowest_ms").unwrap_or(0);
    let status = run_ok(
        lab.host(SECONDARY),
        "secondary status",
        "./mcvmm ctl --api-sock s.sock status",
        20,
    )?;
    let status: serde_json::Value =
        serde_json::from_str(&status).map_err(|e| format!("status: {e}: {status}"))?;
    if status["took_over"].is_null() {
        return Err(format!("the secondary did not take over: {status:#}").into());
    }
    let verify = agent(ns, &["mem-verify"])?;
    if !verify.contains("errors=0") {
        return Err(format!("memory patterns after failover: {verify}").into());
    }
    agent(ns, &["records", "vdc", &run_s, "10"])?;
    agent(ns, &["shutdown"])?;
    let check = run_ok(
        lab.host(SECONDARY),
        "checking the secondary's disks",
        &format!(
            "i=0; while kill -0 $(cat s.pid) 2>/dev/null; do i=$((i+1)); [ $i -gt 300 ] && exit 1; sleep 0.1; done
             ./agentctl check-records s1.img {run} {before}
             ./agentctl check-records s2.img {run} {acked}
             ./agentctl check-records s3.img {run} 10
             rm -f s1.img s2.img s3.img; ip link del stap"
        ),
        60,
    )?;
    log(&format!(
        "round {n}: {kill:?} kill {kill_after_ms} ms after protection; {acked} writes acknowledged through it (longest wait {stall} ms); new connections answered {failover_ms} ms after the kill (+{kill_issued_ms} ms issuing it); {}",
        check.trim().replace('\n', "; ")
    ));
    if kill == Kill::Process {
        run_ok(
            lab.host(PRIMARY),
            "cleaning the primary",
            "rm -f p1.img p2.img p3.img; ip link del ptap",
            20,
        )?;
    }
    Ok(Round {
        round: n,
        kill,
        kill_after_ms,
        acked_before: before,
        acked_during: acked,
        client_stall_ms: stall,
        failover_ms,
        took_over_epoch: status["took_over"]["epoch"].as_u64().unwrap_or(0),
        takeover_build_ms: status["took_over"]["build_ms"].as_f64().unwrap_or(0.0),
        primary_died_first,
    })
}

/// Runs the rounds: process kills on one lab, then each host kill on a lab of its own
/// (the killed host is gone for good).
pub fn run(opts: &Options, log: &mut dyn FnMut(&str)) -> Result<Vec<Round>, String> {
    let mut rng = Rng(opts.seed | 1);
    log(&format!("seed {}", opts.seed));
    let mut rounds = Vec::new();
    let mut plan: VecDeque<Kill> = vec![Kill::Process; opts.process_rounds].into();
    plan.extend(vec![Kill::Host; opts.host_rounds]);
    let mut lab: Option<Lab> = None;
    let mut lab_restarts = 0;
    let mut extra_rounds = 0;
    while let Some(kill) = plan.pop_front() {
        let n = rounds.len();
        if lab.is_none() {
            log("booting two test hosts on a lab network");
            lab = Some(start_lab(opts.guest_mem_mib)?);
        }
        let Some(l) = lab.as_ref() else { continue };
        let ns = l
            .net()
            .map(|n| n.ns.clone())
            .ok_or("the lab has no network")?;
        let kill_after_ms = rng.below(3000);
        let r = match round(l, &ns, n + 1, kill, kill_after_ms, opts, log) {
            Ok(r) => r,
            Err(e) => {
                let consoles: String = l
                    .hosts()
                    .iter()
                    .map(|h| h.console_tail())
                    .collect::<Vec<_>>()
                    .join("\n---\n");
                let logs = on_both_hosts(l, 15, |p| {
                    format!(
                        "echo '{p}.log:'; tail -15 {p}.log; echo '-- guest console:'; tail -15 {p}.console
                         echo '-- status:'; timeout 10 ./mcvmm ctl --api-sock {p}.sock status 2>&1 | head -c 4000"
                    )
                });
                // Where the lab's switch sends the guest's MAC (a stale entry pointing
                // at the old primary's port keeps the guest unreachable).
                let fdb = Command::new("ip")
                    .args(["netns", "exec", &ns, "bridge", "fdb", "show"])
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                    .unwrap_or_default();
                let fdb: Vec<&str> = fdb.lines().filter(|l| l.contains("52:54:00")).collect();
                let why = format!(
                    "round {}: {e}\n{logs}\nlab switch entries for guest MACs:\n{}\ntest host consoles:\n{consoles}",
                    n + 1,
                    fdb.join("\n")
                );
                // A nested-TCG test host sometimes freezes or dies on its own (soft
                // lockups in its KVM, see issue 4's notes), and its guests have failed to
                // boot twice in a row on hosts that had run many rounds. Such a round could
                // not be checked either way: it runs again on fresh hosts, loudly, a few
                // times at most. A failed check on healthy hosts fails the drill.
                // A host-kill round's primary counts only if it died before its kill.
                let dead = l.hosts().iter().any(|h| {
                    !h.was_killed()
                        && !h
                            .run("true", Duration::from_secs(20))
                            .is_ok_and(|o| o.success())
                });
                let never_started = matches!(e, RoundFailure::Start(_));
                if !(dead || never_started) || lab_restarts >= MAX_LAB_RESTARTS {
                    return Err(why);
                }
                lab_restarts += 1;
                eprintln!(
                    "WARNING: {}; round {} runs again on fresh hosts:\n{why}",
                    if dead {
                        "a test host died under the drill"
                    } else {
                        "the protected guest did not get ready twice on these hosts"
                    },
                    n + 1
                );
                drop(lab.take());
                let fresh = start_lab(opts.guest_mem_mib)?;
                let ns = fresh
                    .net()
                    .map(|n| n.ns.clone())
                    .ok_or("the lab has no network")?;
                let r = round(&fresh, &ns, n + 1, kill, kill_after_ms, opts, log)
                    .map_err(|e| e.to_string())?;
                lab = Some(fresh);
                r
            }
        };
        if r.primary_died_first && kill == Kill::Process {
            // Still a checked failover, but not a kill at a random moment: one more
            // round, so that the drill has as many of those as it was asked for.
            if extra_rounds >= MAX_EXTRA_ROUNDS {
                return Err(format!(
                    "{} primaries died on their own before their kill (rounds so far: {rounds:#?})",
                    extra_rounds + 1
                ));
            }
            extra_rounds += 1;
            plan.push_front(Kill::Process);
        }
        rounds.push(r);
        if kill == Kill::Host {
            lab = None;
        }
    }
    Ok(rounds)
}

/// Shell lines (for the primary's host) that start the guest in the background with
/// three fresh disks and a tap on the lab bridge; `flags` go to `mcvmm run`.
fn start_primary_script(mem_mib: u32, flags: &str) -> String {
    format!(
        "rm -f p1.img p2.img p3.img; truncate -s 32M p1.img p2.img p3.img
         ip link del ptap 2>/dev/null; ip tuntap add dev ptap mode tap
         ip link set ptap master br0 up
         ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img --mem-mib {mem_mib} \\
             --cmdline 'panic=-1 mcvmm.ip={}/{}' --disk p1.img --disk p2.img --disk p3.img \\
             --tap ptap --serial p.console --api-sock p.sock {flags} >p.log 2>&1 &
         echo $! >p.pid",
        guest_ip(),
        net::SUBNET_PREFIX
    )
}

/// The same guest on the primary's host without protection (the baseline).
pub fn start_standalone(lab: &Lab, mem_mib: u32) -> Result<(), String> {
    run_ok(
        lab.host(PRIMARY),
        "starting the unprotected guest",
        &start_primary_script(mem_mib, ""),
        30,
    )?;
    Ok(())
}
