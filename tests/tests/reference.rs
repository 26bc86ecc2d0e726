//! The reference VMM in the lab: QEMU microvm boots the test guest, a client on the lab
//! network makes acknowledged writes through the agent, and after the guest ends the
//! disk file holds every one of them.

use mcvmm_lab::host::HostError;
use mcvmm_lab::LabError;

/// How often a run that the lab failed (not QEMU or the guest's workload) is tried again.
const LAB_RETRIES: usize = 2;

#[test]
fn qemu_boots_the_test_guest_and_acknowledged_writes_are_on_disk() {
    let mut log = |m: &str| eprintln!("proof: {m}");
    // Lab test hosts (nested KVM under TCG) sometimes freeze or crash under a nested
    // guest, with QEMU as much as with mcvmm (see the notes of issue 4), or the nested
    // guest itself dies or stalls during boot (QEMU exits on the guest's panic). That is the lab
    // failing, not the thing under test: say so, and try again on a new host, twice at
    // most (on 2026-12-02 one run met a frozen host and then a dying guest).
    let mut report = mcvmm_lab::reference::proof(100, &mut log);
    for again in 1..=LAB_RETRIES {
        let why = match &report {
            Err(LabError::Host(
                e @ (HostError::Hung { .. }
                | HostError::Died { .. }
                | HostError::BootTimeout { .. }),
            )) => format!("the test host failed ({e})"),
            Err(LabError::Check(why)) if why.contains("qemu exited") => {
                format!("QEMU's guest died in the test host ({why})")
            }
            // The nested guest's boot stalls now and then under QEMU too (about 1 in 20
            // boots in one test host on 2026-12-02, after "Last level dTLB entries"; in a
            // full test run the same day): its console tail is in `why`.
            Err(LabError::Check(why)) if why.contains("guest not ready in time") => {
                format!("QEMU's guest stalled while booting ({why})")
            }
            _ => break,
        };
        eprintln!("WARNING: {why}; trying again on a fresh host ({again} of {LAB_RETRIES})");
        report = mcvmm_lab::reference::proof(100, &mut log);
    }
    let report = report.expect("reference proof");
    assert_eq!(report.records, 100);
    assert!(report.guest_ready_ms > 0, "ready time not measured");
}
