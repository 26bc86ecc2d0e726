//! The one retry policy of the lab tests and the drill. A retry can hide a bug of mcvmm's,
//! so every test that wants one asks [`allow`], which grants it only for a cause shown to
//! be the lab's, records it (granted or not) in the run's ledger, and says so on stderr.
//! `scripts/test.sh` prints the ledger at the end and fails a run with more than
//! [`BUDGET`] retries; [`allow`] refuses any past it.
//!
//! What counts as the lab's:
//! * a test host that died, hung or reported a CPU stuck in its kernel: the test could
//!   not be judged either way;
//! * a guest of QEMU (the reference VMM) that was lost: no code of mcvmm's ran;
//! * a guest lost with a signature that the soak (`mcvmm-soak`, docs/lab-notes.md) shows
//!   QEMU losing guests with, at a comparable rate, in a comparable phase
//!   ([`LAB_LOSSES`]). That includes a guest lost in a protection's initial sync, a
//!   taken-over one too: the soak loses guests there whether they took over or not, and
//!   QEMU loses restored guests while migrating them. Any other loss after a restore or
//!   a takeover is never retried on that ground;
//! * a vCPU found holding the test host's own registers (its `rip` at the host's VMRUN),
//!   in any phase: the emulated SVM wrote them there, no VMM can;
//! * a triple fault that the test host's KVM trace shows as a page fault on the fetch of
//!   the instruction the same vCPU had just left at with a nested page fault, whose
//!   delivery failed, in any phase: the instruction had just been fetched through the
//!   same guest page tables, the vCPU ran nothing in between, and delivering the fault
//!   failed on kernel structures that are always mapped. Only the translation (the
//!   emulated nested paging) changed, and no VMM writes that.

use std::io::Write;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};

use serde::{Deserialize, Serialize};

use crate::soak::Signature;

/// Retries one run of the test suite may take.
pub const BUDGET: usize = 3;

/// What the guest was doing when it was lost, as far as the test can tell (scripts say
/// it with `phase` in `tests/scripts/guest.sh`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Phase {
    Boot,
    /// Running, without pauses.
    Running,
    /// Under epochs: a self-check, `ctl epochs`, or a protected primary.
    Epochs,
    AfterRestore,
    AfterTakeover,
    /// A protection's initial sync, until the guest is protected: its memory copied
    /// while it runs with the dirty log on (a guest booted or one that took over).
    Sync,
    /// The test cannot tell.
    Unknown,
}

impl Phase {
    pub fn parse(s: &str) -> Phase {
        match s.trim() {
            "boot" => Phase::Boot,
            "running" => Phase::Running,
            "epochs" | "protected" => Phase::Epochs,
            "after-restore" => Phase::AfterRestore,
            "after-takeover" => Phase::AfterTakeover,
            "sync" => Phase::Sync,
            _ => Phase::Unknown,
        }
    }

    /// What the guest of an mcvmm was doing at the end of its log: booting until its
    /// first protection's sync starts, in that sync until it is done, under epochs
    /// after it, running on alone once the secondary is lost. Once it took over there,
    /// anything but a sync is after the takeover.
    pub fn from_vmm_log(log: &str) -> Phase {
        let mut took_over = false;
        let mut phase = Phase::Boot;
        for l in log.lines() {
            if l.contains("TOOK OVER") {
                took_over = true;
                phase = Phase::AfterTakeover;
            } else if l.contains("initial sync started") {
                phase = Phase::Sync;
            } else if l.contains("initial sync done") || l.contains("runs UNPROTECTED") {
                phase = match (took_over, l.contains("UNPROTECTED")) {
                    (true, _) => Phase::AfterTakeover,
                    (false, true) => Phase::Running,
                    (false, false) => Phase::Epochs,
                };
            }
        }
        phase
    }

    /// The last phase a script announced in `text` (lines `MCVMM-PHASE name`).
    pub fn last_in(text: &str) -> Phase {
        text.lines()
            .rev()
            .find_map(|l| l.strip_prefix("MCVMM-PHASE "))
            .map_or(Phase::Unknown, Phase::parse)
    }
}

/// Why a test wants to run something again.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Cause {
    HostDied,
    GuestLost {
        signature: Signature,
        phase: Phase,
    },
    /// A guest of the reference VMM (QEMU) was lost: no code of mcvmm's ran.
    QemuGuestLost,
}

/// Guest losses the soak showed under QEMU about as often as under mcvmm, with the
/// phases they may be retried in (docs/lab-notes.md, "The soak"): a QEMU guest reset
/// itself (a triple fault: its QEMU reported `guest-reset` with no panic on the console)
/// while booting, under the pause rhythm as often as mcvmm's guests under epochs, and
/// while being migrated, restored or not, as often per copy as mcvmm's guests in the
/// initial syncs of their protections, taken over or not; a QEMU guest never answered at
/// boot. Nothing else has been shown the lab's.
pub const LAB_LOSSES: &[(Signature, &[Phase])] = &[
    (
        Signature::TripleFault,
        &[Phase::Boot, Phase::Epochs, Phase::Sync],
    ),
    (Signature::NoBoot, &[Phase::Boot]),
    (Signature::StuckAfterVmrun, &ANY_PHASE),
    (Signature::FetchFaultAfterNestedFault, &ANY_PHASE),
];

/// A vCPU that holds the test host's own registers (`guest::stuck_vcpu`) is the
/// emulator's whatever the guest was doing: no VMM ever has those registers to write.
const ANY_PHASE: [Phase; 7] = [
    Phase::Boot,
    Phase::Running,
    Phase::Epochs,
    Phase::AfterRestore,
    Phase::AfterTakeover,
    Phase::Sync,
    Phase::Unknown,
];

/// Whether `cause` is the lab's by the rules above (the budget aside).
pub fn is_the_labs(cause: &Cause) -> bool {
    match cause {
        Cause::HostDied | Cause::QemuGuestLost => true,
        Cause::GuestLost { signature, phase } => LAB_LOSSES
            .iter()
            .any(|(s, phases)| s == signature && phases.contains(phase)),
    }
}

#[derive(Debug, Serialize, Deserialize)]
pub struct Entry {
    pub test: String,
    pub cause: Cause,
    pub detail: String,
    pub granted: bool,
}

/// The run's ledger: `MCVMM_RETRY_LEDGER` (scripts/test.sh sets it), else one file per
/// `cargo test` (the test binaries of one are children of the same process).
pub fn ledger_path() -> PathBuf {
    if let Some(p) = std::env::var_os("MCVMM_RETRY_LEDGER") {
        return PathBuf::from(p);
    }
    // SAFETY: getppid has no preconditions and cannot fail.
    let parent = unsafe { libc::getppid() };
    crate::repo_root().join(format!("target/retries/cargo-{parent}.jsonl"))
}

pub fn read_ledger(path: &std::path::Path) -> Vec<Entry> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

/// The name of the running test (cargo's test threads carry it), or the program's.
pub fn test_name() -> String {
    std::thread::current()
        .name()
        .filter(|n| *n != "main")
        .map(str::to_string)
        .or_else(|| std::env::args().next())
        .unwrap_or_default()
}

/// Asks to run again after `cause`; `detail` is the evidence (the signature's line, a
/// console). Granted only for a cause that is the lab's, within the run's budget.
pub fn allow(cause: Cause, detail: &str) -> bool {
    allow_in(&ledger_path(), cause, detail)
}

fn allow_in(path: &std::path::Path, cause: Cause, detail: &str) -> bool {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    let _turn = ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner);
    let taken = read_ledger(path).iter().filter(|e| e.granted).count();
    let labs = is_the_labs(&cause);
    let granted = labs && taken < BUDGET;
    let entry = Entry {
        test: test_name(),
        cause,
        detail: detail.lines().take(3).collect::<Vec<_>>().join(" | "),
        granted,
    };
    eprintln!(
        "WARNING: {}: {} ({:?}); {}",
        entry.test,
        if labs {
            "lost to the lab"
        } else {
            "not shown to be the lab's"
        },
        entry.cause,
        if granted {
            format!("retry {} of {BUDGET} this run", taken + 1)
        } else if labs {
            format!("no retry: the run's {BUDGET} are spent")
        } else {
            "no retry".into()
        }
    );
    if let Err(e) = record(path, &entry) {
        eprintln!("WARNING: the retry ledger {}: {e}", path.display());
    }
    granted
}

fn record(path: &std::path::Path, entry: &Entry) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let line = serde_json::to_string(entry).map_err(std::io::Error::other)?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)?;
    writeln!(f, "{line}")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_a_dead_host_a_loss_the_soak_shows_under_qemu_or_the_hosts_registers_are_the_labs() {
        assert!(is_the_labs(&Cause::HostDied));
        for phase in [Phase::AfterRestore, Phase::AfterTakeover] {
            for signature in [Signature::TripleFault, Signature::StoppedAnswering] {
                assert!(!is_the_labs(&Cause::GuestLost { signature, phase }));
            }
        }
        // Under epochs, only what the soak showed QEMU's guests lost to as well.
        let lost = |signature, phase| Cause::GuestLost { signature, phase };
        assert!(is_the_labs(&lost(Signature::TripleFault, Phase::Epochs)));
        assert!(!is_the_labs(&lost(Signature::MemoryCorrupt, Phase::Epochs)));
        // A triple fault in a protection's initial sync is, taken over or not.
        assert!(is_the_labs(&lost(Signature::TripleFault, Phase::Sync)));
        assert!(!is_the_labs(&lost(
            Signature::StoppedAnswering,
            Phase::Sync
        )));
        // Guest losses that could be a restore's or a takeover's are never the lab's,
        // but for a vCPU holding the test host's registers, which no VMM can write.
        for (signature, phases) in LAB_LOSSES {
            let proven = matches!(
                signature,
                Signature::StuckAfterVmrun | Signature::FetchFaultAfterNestedFault
            );
            assert_eq!(phases.contains(&Phase::AfterRestore), proven);
            assert_eq!(phases.contains(&Phase::AfterTakeover), proven);
            assert_eq!(phases.contains(&Phase::Unknown), proven, "{signature:?}");
        }
        assert!(is_the_labs(&lost(
            Signature::StuckAfterVmrun,
            Phase::AfterTakeover
        )));
    }

    #[test]
    fn the_budget_is_kept_across_calls_and_refusals_are_recorded() {
        let dir = std::env::temp_dir().join(format!("mcvmm-retry-test-{}", std::process::id()));
        let ledger = dir.join("ledger.jsonl");
        let _ = std::fs::remove_dir_all(&dir);
        let grants: Vec<bool> = (0..BUDGET + 1)
            .map(|_| allow_in(&ledger, Cause::HostDied, "host gone"))
            .collect();
        let lost = Cause::GuestLost {
            signature: Signature::TripleFault,
            phase: Phase::AfterTakeover,
        };
        let after_takeover = allow_in(&ledger, lost, "triple fault");
        assert_eq!(grants, [true, true, true, false]);
        assert!(!after_takeover);
        let entries = read_ledger(&ledger);
        assert_eq!(entries.len(), BUDGET + 2);
        assert_eq!(entries.iter().filter(|e| e.granted).count(), BUDGET);
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[test]
    fn the_last_phase_a_script_announced_counts() {
        let text = "MCVMM-PHASE boot\nx\nMCVMM-PHASE running\nMCVMM-PHASE after-takeover\ny";
        assert_eq!(Phase::last_in(text), Phase::AfterTakeover);
    }

    #[test]
    fn a_vmm_log_says_where_its_guest_was() {
        let booted = "mcvmm: VM started in 80 ms\nmcvmm: secondary 10.0.0.2:7777 accepted the VM (generation 1); initial sync started\n";
        assert_eq!(
            Phase::from_vmm_log("mcvmm: VM started in 80 ms\n"),
            Phase::Boot
        );
        assert_eq!(Phase::from_vmm_log(booted), Phase::Sync);
        let protected = format!("{booted}mcvmm: initial sync done in 2500 ms (...)\n");
        assert_eq!(Phase::from_vmm_log(&protected), Phase::Epochs);
        let alone = format!(
            "{protected}mcvmm: warning: SECONDARY LOST (x): held output released; the guest runs UNPROTECTED\n"
        );
        assert_eq!(Phase::from_vmm_log(&alone), Phase::Running);
        let took = "mcvmm: warning: TOOK OVER at epoch 45 in 83.8 ms; this is now an unprotected primary (generation 2)\n";
        assert_eq!(Phase::from_vmm_log(took), Phase::AfterTakeover);
        let again = format!("{took}mcvmm: secondary 10.0.0.1:7777 accepted the VM (generation 2); initial sync started\n");
        assert_eq!(Phase::from_vmm_log(&again), Phase::Sync);
        let protected_again = format!("{again}mcvmm: initial sync done in 2000 ms\n");
        assert_eq!(Phase::from_vmm_log(&protected_again), Phase::AfterTakeover);
        assert_eq!(Phase::last_in("nothing"), Phase::Unknown);
    }
}
