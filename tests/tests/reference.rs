//! The reference VMM in the lab: QEMU microvm boots the test guest, a client on the lab
//! network makes acknowledged writes through the agent, and after the guest ends the
//! disk file holds every one of them.

use mcvmm_lab::host::HostError;
use mcvmm_lab::LabError;
use mcvmm_tests::retry::{self, Cause};

#[test]
fn qemu_boots_the_test_guest_and_acknowledged_writes_are_on_disk() {
    let mut log = |m: &str| eprintln!("proof: {m}");
    // A test host that dies, or QEMU's own guest lost in it, is the lab failing, not the
    // thing under test: the retry policy decides whether it runs again on a new host.
    loop {
        let report = mcvmm_lab::reference::proof(100, &mut log);
        let cause = match &report {
            Err(LabError::Host(
                HostError::Hung { .. } | HostError::Died { .. } | HostError::BootTimeout { .. },
            )) => Cause::HostDied,
            Err(LabError::Check(why))
                if why.contains("qemu exited") || why.contains("guest not ready in time") =>
            {
                Cause::QemuGuestLost
            }
            _ => {
                let report = report.expect("reference proof");
                assert_eq!(report.records, 100);
                assert!(report.guest_ready_ms > 0, "ready time not measured");
                return;
            }
        };
        let why = report.err().map(|e| e.to_string()).unwrap_or_default();
        if !retry::allow(cause, &why) {
            panic!("reference proof: {why}");
        }
    }
}
