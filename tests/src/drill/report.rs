//! What a failed drill round leaves to read, and whether the retry policy lets it run
//! again.

use std::process::Command;
use std::time::Duration;

use mcvmm_lab::Lab;

use super::{check_disks, Chain, RoundFailure, PRIMARY, SECONDARY};
use crate::pair::{run_ok, NODE};
use crate::retry::{self, Cause, Phase};

/// How far back a test host's KVM records are this round's: a round lasts well under
/// this, and an earlier round's loss on the same hosts must not speak for this one.
const RECENT_S: f64 = 90.0;

/// What `command(prefix)` prints on host 0 ("p") and host 1 ("s"), each under a
/// heading; a host that does not answer adds nothing (diagnostics only).
pub(super) fn on_both_hosts(lab: &Lab, secs: u64, command: impl Fn(&str) -> String) -> String {
    [(PRIMARY, NODE[PRIMARY]), (SECONDARY, NODE[SECONDARY])]
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
pub(super) fn console_tails(lab: &Lab) -> String {
    on_both_hosts(lab, 10, |p| format!("tail -20 {p}.console 2>&1"))
}

/// What a round had seen when a check after the takeover failed.
pub(super) struct Seen {
    pub(super) secondary: usize,
    pub(super) run: u64,
    pub(super) before: u64,
    pub(super) verified_epoch: Option<u64>,
}

/// A check after the takeover failed with `e`. If the guest that took over crashed, or
/// left its devices' interrupts unacknowledged again and again, by itself (mcvmm on the
/// secondary says so), the round failed that way, and what the client saw acknowledged
/// (`acked`) must still be on the secondary's disks all the same; otherwise the check's
/// failure is the round's.
pub(super) fn after_failed_check(
    lab: &Lab,
    e: String,
    acked: impl FnOnce() -> Result<u64, String>,
    seen: Seen,
) -> RoundFailure {
    let Seen {
        secondary,
        run,
        before,
        verified_epoch,
    } = seen;
    let sn = NODE[secondary];
    let host_line = crate::guest::HOST_VMRUN_LINE;
    let shutdowns = crate::crash_site::SHUTDOWN_EXITS_LINE;
    let crashed = run_ok(
        lab.host(secondary),
        "the secondary's log",
        &format!(
            "grep -h 'the guest crashed' {sn}.log
             n=$(grep -c 'interrupt unacknowledged for over' {sn}.log)
             [ \"$n\" -ge 3 ] && echo \"the guest stopped taking interrupts ($n interrupts raised again)\"
             # Where its vCPUs stand: one at the test host's own VMRUN holds the
             # host's registers, the lab's (see crate::guest::stuck_vcpu).
             [ \"$n\" -ge 3 ] && {{ {host_line}; for i in 1 2 3; do ./mcvmm ctl --api-sock {sn}.sock vcpus | tr -d ' \\n'; echo; done; }}
             tail -5 {sn}.console; {shutdowns}; true"
        ),
        20,
    )
    .unwrap_or_default();
    // A crash found now is at most a round old.
    let crashed = crate::crash_site::recent(&crashed, RECENT_S);
    let crashed = format!("{crashed}\n{}", crate::crash_site::describe(&crashed));
    if !crashed.contains("the guest crashed")
        && !crashed.contains("the guest stopped taking interrupts")
    {
        return RoundFailure::Check(e);
    }
    let disks = acked().and_then(|a| check_disks(lab, secondary, run, &[before, a]));
    match disks {
        Ok(d) => RoundFailure::GuestCrashed(format!(
            "{e}\n{}\nits disks: {}\nthe secondary's image verified whole at epoch {}",
            crashed.trim(),
            d.trim().replace('\n', "; "),
            verified_epoch.map_or("(none before the kill)".into(), |v| v.to_string())
        )),
        Err(d) => RoundFailure::Check(format!("{e}\n{crashed}\nits disks: {d}")),
    }
}

/// What a failed round leaves to read: the failure, both sides' logs, guest consoles and
/// status, where the lab's switch sends guest MACs, and the test hosts' consoles.
pub(super) fn failure_report(l: &Lab, ns: &str, n: usize, e: &RoundFailure) -> String {
    let consoles: String = l
        .hosts()
        .iter()
        .map(|h| h.console_tail())
        .collect::<Vec<_>>()
        .join("\n---\n");
    let host_line = crate::guest::HOST_VMRUN_LINE;
    let shutdowns = crate::crash_site::SHUTDOWN_EXITS_LINE;
    let logs = on_both_hosts(l, 45, |p| {
        format!(
            "echo '{p}.log:'; tail -15 {p}.log; echo '-- guest console:'; tail -15 {p}.console
             echo '-- status:'; timeout 10 ./mcvmm ctl --api-sock {p}.sock status 2>&1 | head -c 4000
             # Where its vCPUs stand, three looks: one stuck shows the same rip each time.
             {shutdowns}
             echo '-- vcpus:'
             {host_line}
             for i in 1 2 3; do timeout 10 ./mcvmm ctl --api-sock {p}.sock vcpus 2>&1 | tr -d ' \\n' | head -c 1500; echo; done"
        )
    });
    // A stale entry pointing at the old primary's port keeps the guest unreachable.
    let fdb = Command::new("ip")
        .args(["netns", "exec", ns, "bridge", "fdb", "show"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default();
    let fdb: Vec<&str> = fdb.lines().filter(|l| l.contains("52:54:00")).collect();
    let logs = crate::crash_site::recent(&logs, RECENT_S);
    let sites = crate::crash_site::describe(&logs);
    format!(
        "round {n}: {e}\n{sites}\n{logs}\nlab switch entries for guest MACs:\n{}\ntest host consoles:\n{consoles}",
        fdb.join("\n")
    )
}

/// Keeps the evidence of a failure on `lab` and asks the retry policy whether what
/// failed may run again: a test host that died (not the one a round powered off) is the
/// lab's; a guest lost with a signature in `why` is judged in `phase`; anything else is
/// not retried.
pub(super) fn lab_retry(lab: &Lab, chain: &Chain, label: &str, phase: Phase, why: &str) -> bool {
    let all: Vec<&mcvmm_lab::TestHost> = lab.hosts().iter().collect();
    let kept = crate::evidence::keep(label, &all, None, why);
    let dead = all
        .iter()
        .enumerate()
        .any(|(i, h)| chain.powered_off != Some(i) && !h.healthy());
    let lost = crate::guest::lost_signature(why);
    let cause = if dead {
        Cause::HostDied
    } else if let Some((signature, _)) = &lost {
        Cause::GuestLost {
            signature: signature.clone(),
            phase,
        }
    } else {
        eprintln!("drill: {label} failed; evidence in {}", kept.display());
        return false;
    };
    let line = lost.map(|(_, l)| l).unwrap_or_default();
    retry::allow(cause, &format!("{line}; evidence in {}", kept.display()))
}
