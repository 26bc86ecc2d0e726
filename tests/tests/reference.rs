//! The reference VMM in the lab: QEMU microvm boots the test guest, a client on the lab
//! network makes acknowledged writes through the agent, and after the guest ends the
//! disk file holds every one of them.

#[test]
fn qemu_boots_the_test_guest_and_acknowledged_writes_are_on_disk() {
    let report = mcvmm_lab::reference::proof(100, &mut |m| eprintln!("proof: {m}"))
        .expect("reference proof");
    assert_eq!(report.records, 100);
    assert!(report.guest_ready_ms > 0, "ready time not measured");
}
