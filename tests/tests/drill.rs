//! The failover drill of issue 6 on two lab test hosts: twenty rounds that SIGKILL the
//! primary's mcvmm at a random moment after protection (mid-epoch, mid-transfer, during
//! the secondary's apply: wherever it falls), and one that powers off the primary's whole
//! test host. Every round checks that every write the client saw acknowledged is on the
//! secondary's disk, that the guest's memory patterns verify, and that the guest keeps
//! serving at the same address. The seed is printed; `mcvmm-drill --seed S` replays it.

use mcvmm_tests::drill::{self, Kill, Options};

#[test]
fn twenty_process_kills_and_a_host_kill_lose_no_acknowledged_write() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let opts = Options {
        process_rounds: 20,
        host_rounds: 1,
        guest_mem_mib: 128,
        seed,
    };
    let rounds =
        drill::run(&opts, &mut |m| eprintln!("drill: {m}")).unwrap_or_else(|e| panic!("{e}"));
    // Rounds whose primary died on its own before the kill are checked like the rest
    // and do not count: the drill adds one (a few at most) for each.
    let killed = |kind| {
        rounds
            .iter()
            .filter(|r| r.kill == kind && !r.primary_died_first)
            .count()
    };
    assert_eq!(killed(Kill::Process), 20, "{rounds:#?}");
    assert_eq!(rounds.iter().filter(|r| r.kill == Kill::Host).count(), 1);
    for r in &rounds {
        assert!(
            r.acked_during > 0,
            "the client got writes through round {}: {r:?}",
            r.round
        );
        assert!(r.took_over_epoch > 0, "{r:?}");
    }
}
