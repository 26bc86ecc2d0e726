//! The soak: how often a guest is lost under epochs, under mcvmm and under QEMU at the
//! same rhythm, and with no pauses at all, in test hosts on each emulator. It settles
//! whether a lost guest is mcvmm's fault or the lab's (issue 20): if mcvmm under epochs
//! loses guests clearly more often than QEMU under the same pauses, the cause is ours.
//!
//! One run: a 2-vCPU guest boots (no second try), starts its memory workload, then is
//! paused `EPOCHS` times with `EPOCH_MS` of running between pauses (mcvmm: `ctl epochs`;
//! QEMU: `mcvmm-qmp-pacer`), or runs as long untouched (the idle cases); then its memory
//! patterns must verify. Anything else is a loss, with a [`Signature`].
//!
//! The copy cases cover what the failover drill does besides epochs: from the VMM's
//! start, while the guest boots and then runs its workload, all of its RAM is copied
//! [`COPIES`] times with the dirty log on (mcvmm: full snapshots; QEMU: migrations that
//! it resumes from), as a protection's initial sync copies it.

use serde::{Deserialize, Serialize};

pub mod protection;

/// What a run does to its guest.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Case {
    /// mcvmm, `ctl epochs EPOCHS EPOCH_MS`: the pause, dirty log, copy and capture a
    /// replicating primary runs.
    McvmmEpochs,
    /// QEMU microvm, paused and resumed at the same rhythm (see `mcvmm-qmp-pacer`).
    QemuPauses,
    McvmmIdle,
    QemuIdle,
    /// mcvmm, full snapshots (`ctl snapshot`) back to back from the VMM's start, the
    /// guest booting and then running its workload meanwhile: copies of all of RAM while
    /// the guest runs, with the dirty log on, as a protection's initial sync.
    McvmmCopies,
    /// QEMU, migrations into `cat > /dev/null` back to back from its start, the guest
    /// going on after each (see `mcvmm-qmp-pacer --migrations`).
    QemuMigrations,
    /// mcvmm, a protected guest whose primary is killed again and again: each time the
    /// secondary takes over and the guest, now running from a restored checkpoint, is
    /// protected again with a new secondary (the failover drill's path, on one host).
    McvmmTakeovers,
    /// The same cycles with the secondary killed instead: the guest that booted is
    /// protected again each time, never restored. Against `McvmmTakeovers`, it tells
    /// what a takeover adds to protecting a running guest.
    McvmmReprotects,
    /// QEMU, migrated into a file and going on from it in a new QEMU again and again
    /// (see [`protection`]): QEMU's side of `McvmmTakeovers`.
    QemuRestores,
}

impl Case {
    pub const ALL: [Case; 9] = [
        Case::McvmmEpochs,
        Case::QemuPauses,
        Case::McvmmIdle,
        Case::QemuIdle,
        Case::McvmmCopies,
        Case::QemuMigrations,
        Case::McvmmTakeovers,
        Case::McvmmReprotects,
        Case::QemuRestores,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Case::McvmmEpochs => "mcvmm epochs",
            Case::QemuPauses => "QEMU pauses",
            Case::McvmmIdle => "mcvmm idle",
            Case::QemuIdle => "QEMU idle",
            Case::McvmmCopies => "mcvmm full copies",
            Case::QemuMigrations => "QEMU migrations",
            Case::McvmmTakeovers => "mcvmm takeovers",
            Case::McvmmReprotects => "mcvmm protected again",
            Case::QemuRestores => "QEMU restores",
        }
    }

    /// The name `mcvmm-soak --cases` takes.
    pub fn short(self) -> &'static str {
        match self {
            Case::McvmmEpochs => "mcvmm-epochs",
            Case::QemuPauses => "qemu-pauses",
            Case::McvmmIdle => "mcvmm-idle",
            Case::QemuIdle => "qemu-idle",
            Case::McvmmCopies => "mcvmm-copies",
            Case::QemuMigrations => "qemu-migrations",
            Case::McvmmTakeovers => "mcvmm-takeovers",
            Case::McvmmReprotects => "mcvmm-reprotects",
            Case::QemuRestores => "qemu-restores",
        }
    }

    pub fn is_qemu(self) -> bool {
        matches!(
            self,
            Case::QemuPauses | Case::QemuIdle | Case::QemuMigrations | Case::QemuRestores
        )
    }

    pub fn pauses(self) -> bool {
        matches!(self, Case::McvmmEpochs | Case::QemuPauses)
    }

    /// Whether the case's work starts with the VMM, before the guest has booted.
    pub fn from_boot(self) -> bool {
        matches!(self, Case::McvmmCopies | Case::QemuMigrations)
    }

    /// Whether the case runs a protected pair (see [`protection`]).
    pub fn protected(self) -> bool {
        matches!(
            self,
            Case::McvmmTakeovers | Case::McvmmReprotects | Case::QemuRestores
        )
    }
}

/// How a guest was lost, as far as the run's output tells.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Signature {
    /// The test host died, hung, or its kernel reported a stuck CPU.
    HostDied,
    /// The guest did not boot to its agent within the limit.
    NoBoot,
    /// A triple fault (mcvmm names the vCPU and where; QEMU reports a guest reset).
    TripleFault,
    /// The guest kernel panicked.
    GuestPanic,
    /// A vCPU found at the same instruction with an exception pending in three looks:
    /// the lab's SVM left the test host's own registers in it (its `rip` after VMRUN).
    StuckAfterVmrun,
    /// A triple fault whose test host's trace shows a page fault on the fetch of the very
    /// instruction at which the same vCPU had just left with a nested page fault, and
    /// its delivery failing: the instruction had been fetched through the same guest
    /// page tables a moment before, and nothing ran in the guest in between (see
    /// `crate::crash_site::fetch_fault_after_nested_fault`).
    FetchFaultAfterNestedFault,
    /// The VMM raised a device interrupt again and again and the guest never took it.
    InterruptsUnacknowledged,
    /// The pauses themselves failed (`ctl epochs` or the pacer reported an error).
    PausesFailed,
    /// The guest answered, but its memory patterns did not verify.
    MemoryCorrupt,
    /// The guest stopped answering, with none of the signs above.
    StoppedAnswering,
}

impl Signature {
    pub fn name(&self) -> &'static str {
        match self {
            Signature::HostDied => "test host died",
            Signature::NoBoot => "no boot",
            Signature::TripleFault => "triple fault",
            Signature::GuestPanic => "guest panic",
            Signature::StuckAfterVmrun => "stuck after vmrun",
            Signature::FetchFaultAfterNestedFault => "fetch fault after a nested fault",
            Signature::InterruptsUnacknowledged => "interrupts unacknowledged",
            Signature::PausesFailed => "pauses failed",
            Signature::MemoryCorrupt => "memory corrupt",
            Signature::StoppedAnswering => "stopped answering",
        }
    }
}

/// Guest memory and workload of every run.
pub const GUEST_MIB: u32 = 512;
pub const WORKLOAD_MIB: u32 = 256;
pub const WORKLOAD_PAGES_PER_SEC: u32 = 2000;
/// Whole copies of RAM in a run of the copy cases.
pub const COPIES: u32 = 10;

/// The test host script of one run. It prints `== ` sections that [`classify`] reads,
/// and exits 0 only when the guest came through.
pub fn script(case: Case, epochs: u32, epoch_ms: u32, idle_secs: u32) -> String {
    let ns = "ip netns exec sk";
    let cmdline = "panic=-1 mcvmm.ip=10.99.0.2/24";
    let start = if case.is_qemu() {
        format!(
            "{ns} qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m {GUEST_MIB} -smp 2 \
             -nodefaults -no-user-config -display none -no-reboot -serial file:sk.console \
             -kernel guest/vmlinux -initrd guest/initrd.img -qmp unix:sk.qmp,server=on,wait=off \
             -netdev tap,id=n0,ifname=gtap,script=no,downscript=no -device virtio-net-device,netdev=n0 \
             -append 'console=ttyS0 reboot=t acpi=off {cmdline}' >sk.log 2>&1 &"
        )
    } else {
        format!(
            "{ns} ./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img --vcpus 2 \
             --mem-mib {GUEST_MIB} --cmdline '{cmdline}' --tap gtap --serial sk.console \
             --api-sock sk.sock >sk.log 2>&1 &"
        )
    };
    let pauses = match case {
        Case::McvmmEpochs => format!("./mcvmm ctl --api-sock sk.sock epochs {epochs} {epoch_ms}"),
        Case::QemuPauses => {
            format!("./mcvmm-qmp-pacer --qmp sk.qmp --pauses {epochs} --run-ms {epoch_ms}")
        }
        Case::McvmmIdle => format!("sleep {idle_secs}"),
        Case::QemuIdle => format!("./mcvmm-qmp-pacer --qmp sk.qmp --idle-secs {idle_secs}"),
        Case::McvmmCopies => format!(
            "sh -c 'i=0; until ./mcvmm ctl --api-sock sk.sock status >/dev/null 2>&1; do i=$((i+1)); [ $i -lt 200 ] || exit 7; sleep 0.05; done
             i=0; while [ $i -lt {COPIES} ]; do i=$((i+1)); rm -rf sk.snap
               ./mcvmm ctl --api-sock sk.sock snapshot $PWD/sk.snap | tr -d \"\\n\" || {{ echo; echo \"copy $i failed\"; exit 1; }}; echo
             done; rm -rf sk.snap'"
        ),
        Case::QemuMigrations => format!(
            "sh -c 'i=0; until [ -S sk.qmp ]; do i=$((i+1)); [ $i -lt 200 ] || exit 7; sleep 0.05; done
             ./mcvmm-qmp-pacer --qmp sk.qmp --migrations {COPIES}'"
        ),
        Case::McvmmTakeovers | Case::McvmmReprotects => {
            return protection::script(case == Case::McvmmTakeovers)
        }
        Case::QemuRestores => return protection::qemu_script(),
    };
    let look = if case.is_qemu() {
        "timeout 20 ./mcvmm-qmp-pacer --qmp sk.qmp --look".to_string()
    } else {
        format!(
            "{}\nfor i in 1 2 3; do timeout 10 ./mcvmm ctl --api-sock sk.sock vcpus; done",
            crate::guest::HOST_VMRUN_LINE
        )
    };
    let limit = pauses_limit_secs(epochs, epoch_ms);
    // A case that works from boot runs in the background from the start; its output is
    // the pauses section all the same.
    let (early, late) = if case.from_boot() {
        (
            format!("timeout {limit} {pauses} >sk.pauses 2>&1 & work=$!"),
            "wait $work; rc=$?; cat sk.pauses; echo \"pauses_rc=$rc\"".to_string(),
        )
    } else {
        (
            String::new(),
            format!("timeout {limit} {pauses} 2>&1; echo \"pauses_rc=$?\""),
        )
    };
    format!(
        "# (ip by its path: busybox's timeout would run its own ip applet, which has no netns.)
a=\"$(command -v ip) netns exec sk ./agentctl --addr 10.99.0.2:7000\"
ip netns del sk 2>/dev/null; rm -f sk.*
ip netns add sk && {ns} ip link set lo up && {ns} ip tuntap add dev gtap mode tap &&
  {ns} ip addr add 10.99.0.1/24 dev gtap && {ns} ip link set gtap up || exit 9
{start}
pid=$!
{early}
end() {{ [ -z \"$work\" ] || kill $work 2>/dev/null; kill -9 $pid 2>/dev/null; wait $pid 2>/dev/null; ip netns del sk; }}
dump() {{
  echo '== vmm'
  if kill -0 $pid 2>/dev/null; then echo vmm_alive=1; else wait $pid; echo \"vmm_alive=0 vmm_status=$?\"; fi
  echo '== look'; {look} 2>&1
  echo '== log'; tail -60 sk.log; echo '== console'; tail -60 sk.console; }}
if ! $a --wait 60 ping >/dev/null; then echo '== no boot'; dump; end; exit 3; fi
timeout 60 $a mem-start {WORKLOAD_MIB} {WORKLOAD_PAGES_PER_SEC} >/dev/null || {{ echo '== no workload'; dump; end; exit 4; }}
echo '== pauses'
{late}
echo '== verify'
if ! timeout 60 $a mem-verify 2>&1; then echo 'verify_rc=1'; dump; end; exit 5; fi
if ! kill -0 $pid 2>/dev/null; then echo '== vmm exited'; dump; end; exit 6; fi
echo '== log'; tail -60 sk.log
end",
    )
}

/// How long a run's pauses may take, s: 200 ms of slack a pause, and a minute.
pub fn pauses_limit_secs(epochs: u32, epoch_ms: u32) -> u64 {
    epochs as u64 * (epoch_ms as u64 + 200) / 1000 + 60
}

/// What a finished run says about its guest: `None` when it came through. A protected
/// case's detail ends with the cycle it had reached.
pub fn classify(case: Case, status: i32, stdout: &str) -> Option<(Signature, String)> {
    let (sig, detail) = classify_run(case, status, stdout)?;
    if !case.protected() {
        return Some((sig, detail));
    }
    let at = protection::last_cycle(stdout).unwrap_or("before the first cycle");
    Some((sig, format!("{detail} [{at}]")))
}

fn classify_run(case: Case, status: i32, stdout: &str) -> Option<(Signature, String)> {
    let section = |name: &str| -> &str {
        let marker = format!("== {name}\n");
        stdout
            .find(&marker)
            .map(|at| {
                let rest = &stdout[at + marker.len()..];
                &rest[..rest.find("\n== ").map_or(rest.len(), |e| e + 1)]
            })
            .unwrap_or("")
    };
    let pauses = section("pauses");
    // (mcvmm's report has `"error": null` when all went well.)
    let pauses_failed = pauses.contains("\"error\": \"")
        || pauses.contains("\"error\":\"")
        || pauses
            .lines()
            .any(|l| l.starts_with("pauses_rc=") && l != "pauses_rc=0");
    let verify = section("verify");
    let corrupt = verify
        .split_whitespace()
        .find_map(|w| w.strip_prefix("errors="))
        .is_some_and(|n| n != "0");
    if status == 0 && !pauses_failed && !corrupt {
        return None;
    }
    if corrupt {
        return Some((Signature::MemoryCorrupt, verify.trim().to_string()));
    }
    if let Some(lost) = crate::guest::lost_signature(stdout) {
        return Some(lost);
    }
    // QEMU runs with -no-reboot: a guest that reset itself ends it. Ours resets only
    // after a panic (caught above) or a triple fault.
    if case.is_qemu() && (stdout.contains("guest-reset") || stdout.contains("vmm_alive=0")) {
        return Some((
            Signature::TripleFault,
            "QEMU ended: the guest reset itself with no panic on its console (a triple fault)"
                .into(),
        ));
    }
    if status == 3 {
        return Some((Signature::NoBoot, tail(section("console"), 3)));
    }
    if let Some(stuck) = qemu_stuck(section("look")) {
        return Some((Signature::StuckAfterVmrun, stuck));
    }
    if pauses_failed {
        return Some((Signature::PausesFailed, tail(pauses, 3)));
    }
    Some((
        Signature::StoppedAnswering,
        format!(
            "status {status}; console ends: {}",
            tail(section("console"), 2)
        ),
    ))
}

/// The median pause of a run, µs, from `ctl epochs`'s report or the pacer's.
pub fn pause_median_us(stdout: &str) -> Option<u64> {
    let at = stdout.find("== pauses\n")? + "== pauses\n".len();
    let v: serde_json::Value = serde_json::Deserializer::from_str(&stdout[at..])
        .into_iter()
        .next()?
        .ok()?;
    v["pause_us"]["median"]
        .as_u64()
        .or_else(|| v["pause_us_median"].as_u64())
}

/// A QEMU guest's vCPU at the same `RIP` in all three looks of `mcvmm-qmp-pacer --look`,
/// outside the guest kernel's text (a tiny kernel without modules: an address in the
/// module area is the test host's own, written into the guest by the emulated SVM).
fn qemu_stuck(look: &str) -> Option<String> {
    let v: serde_json::Value = serde_json::from_str(look.lines().next()?).ok()?;
    let looks = v["looks"].as_array()?;
    let first = looks.first()?.as_array()?;
    first.iter().enumerate().find_map(|(cpu, rip)| {
        let rip = rip.as_str()?;
        let same = looks
            .iter()
            .all(|l| l.get(cpu).and_then(|r| r.as_str()) == Some(rip));
        (same && rip.to_ascii_lowercase().starts_with("ffffffffc"))
            .then(|| format!("vCPU {cpu} at RIP={rip} (test host module area) in 3 looks"))
    })
}

fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join(" | ")
}

#[cfg(test)]
mod tests {
    use super::*;

    const OK_RUN: &str =
        "== pauses\n{\"epochs\": 1000}\npauses_rc=0\n== verify\npages=65536 errors=0\n== log\n";

    #[test]
    fn every_case_s_script_is_valid_shell() {
        for case in Case::ALL {
            let text = script(case, 1000, 20, 25);
            let out = std::process::Command::new("bash")
                .args(["-n", "-c", &text])
                .output()
                .expect("bash");
            assert!(
                out.status.success(),
                "{case:?}: {}\n{text}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let copies = script(Case::McvmmCopies, 1000, 20, 25);
        assert!(copies.contains("snapshot $PWD/sk.snap"), "{copies}");
    }

    #[test]
    fn a_run_that_paused_and_verified_is_no_loss() {
        assert_eq!(classify(Case::McvmmEpochs, 0, OK_RUN), None);
    }

    #[test]
    fn each_loss_gets_its_signature() {
        let bad_pages = OK_RUN.replace("errors=0", "errors=3");
        assert_eq!(
            classify(Case::McvmmEpochs, 0, &bad_pages).map(|s| s.0),
            Some(Signature::MemoryCorrupt)
        );
        let tf = "== pauses\npauses_rc=0\n== verify\nverify_rc=1\n== log\nmcvmm: vCPU 1 triple fault at rip 0x1\n";
        assert_eq!(
            classify(Case::McvmmEpochs, 5, tf).map(|s| s.0),
            Some(Signature::TripleFault)
        );
        let reset = "== pauses\n{\"error\":\"guest shut down: {\\\"reason\\\":\\\"guest-reset\\\"}\"}\npauses_rc=1\n";
        assert_eq!(
            classify(Case::QemuPauses, 5, reset).map(|s| s.0),
            Some(Signature::TripleFault)
        );
        let gone = "== no boot\n== vmm\nvmm_alive=0 vmm_status=0\n== look\n== console\nUnpacking initramfs...\n";
        assert_eq!(
            classify(Case::QemuIdle, 3, gone).map(|s| s.0),
            Some(Signature::TripleFault)
        );
        let hung = gone.replace("vmm_alive=0 vmm_status=0", "vmm_alive=1");
        assert_eq!(
            classify(Case::QemuIdle, 3, &hung).map(|s| s.0),
            Some(Signature::NoBoot)
        );
        let epochs_err = "== pauses\n{\"error\": \"pausing the vCPUs: timed out\"}\npauses_rc=0\n== verify\npages=1 errors=0\n";
        let fine = "== pauses\n{\"error\": null, \"pause_us\": {\"median\": 7}}\npauses_rc=0\n== verify\npages=1 errors=0\n";
        assert_eq!(classify(Case::McvmmEpochs, 0, fine), None);
        assert_eq!(pause_median_us(fine), Some(7));
        assert_eq!(
            classify(Case::McvmmEpochs, 0, epochs_err).map(|s| s.0),
            Some(Signature::PausesFailed)
        );
        let silent =
            "== pauses\npauses_rc=0\n== verify\nverify_rc=1\n== look\n== log\n== console\nx\n";
        assert_eq!(
            classify(Case::McvmmIdle, 5, silent).map(|s| s.0),
            Some(Signature::StoppedAnswering)
        );
        let stuck = "== look\n{\"looks\":[[\"ffffffffc04f1b7c\",\"ffffffff81000000\"],[\"ffffffffc04f1b7c\",\"ffffffff81000010\"],[\"ffffffffc04f1b7c\",\"ffffffff81000020\"]]}\n== log\n";
        assert_eq!(
            classify(Case::QemuIdle, 5, stuck).map(|s| s.0),
            Some(Signature::StuckAfterVmrun)
        );
    }
}
