//! The reference VMM in the lab: QEMU microvm boots the test guest, a client on the lab
//! network makes acknowledged writes through the agent, and after the guest ends the
//! disk file holds every one of them.

use mcvmm_lab::host::HostError;
use mcvmm_lab::LabError;

#[test]
fn qemu_boots_the_test_guest_and_acknowledged_writes_are_on_disk() {
    let mut log = |m: &str| eprintln!("proof: {m}");
    let report = match mcvmm_lab::reference::proof(100, &mut log) {
        // Lab test hosts (nested KVM under TCG) sometimes freeze or crash under a nested
        // guest, with QEMU as much as with mcvmm (see the notes of issue 4). That is the
        // lab failing, not the thing under test: say so, and try once more on a new host.
        Err(LabError::Host(
            e @ (HostError::Hung { .. } | HostError::Died { .. } | HostError::BootTimeout { .. }),
        )) => {
            eprintln!("WARNING: the test host failed ({e}); retrying once on a fresh host");
            mcvmm_lab::reference::proof(100, &mut log)
        }
        // The same environment has made the nested guest itself die during boot (QEMU
        // exits on the guest's panic): also the lab, also worth exactly one more try.
        Err(LabError::Check(why)) if why.contains("qemu exited") => {
            eprintln!("WARNING: QEMU's guest died in the test host ({why}); retrying once");
            mcvmm_lab::reference::proof(100, &mut log)
        }
        other => other,
    }
    .expect("reference proof");
    assert_eq!(report.records, 100);
    assert!(report.guest_ready_ms > 0, "ready time not measured");
}
