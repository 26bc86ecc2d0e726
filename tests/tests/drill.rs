//! The failover drill of issue 6 on two lab test hosts: twenty rounds that SIGKILL the
//! primary's mcvmm at a random moment after protection (mid-epoch, mid-transfer, during
//! the secondary's apply: wherever it falls), and one that powers off the primary's whole
//! test host. Every round checks that every write the client saw acknowledged is on the
//! secondary's disk, that the guest's memory patterns verify, and that the guest keeps
//! serving at the same address. One guest lives through the rounds, protected again by
//! `mcvmm ctl protect` after each takeover (it moves between the two hosts); a new one is
//! booted only on fresh test hosts (the first round, after the host kill). A round runs
//! again only where the retry policy (`mcvmm_tests::retry`) grants it: a test host died,
//! or a guest was lost in a way the soak shows to be the lab's; every such retry is
//! counted in the run's ledger. The seed is printed; `mcvmm-drill --seed S` replays it.

use mcvmm_tests::drill::{self, Kill, Options};

#[test]
fn twenty_process_kills_and_a_host_kill_lose_no_acknowledged_write() {
    let seed = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_nanos() as u64)
        .unwrap_or(1);
    let opts = Options {
        process_rounds: 20,
        partition_rounds: 0,
        stall_rounds: 0,
        host_rounds: 1,
        fenced: true,
        guest_mem_mib: 128,
        seed,
    };
    let rounds =
        drill::run(&opts, &mut |m| eprintln!("drill: {m}")).unwrap_or_else(|e| panic!("{e}"));
    // A passing test's output is not shown: what each round did is kept for a look after.
    let kept = mcvmm_tests::repo_root().join("target/drill-test.json");
    let json = serde_json::json!({ "seed": seed, "rounds": rounds });
    match serde_json::to_string_pretty(&json).map(|s| std::fs::write(&kept, s)) {
        Ok(Ok(())) => eprintln!("drill: rounds in {}", kept.display()),
        other => eprintln!(
            "drill: could not keep the rounds in {}: {other:?}",
            kept.display()
        ),
    }
    // Rounds whose primary died on its own before the kill (only where the retry policy
    // granted it) are checked like the rest and do not count: the drill adds one.
    let killed = |kind| {
        rounds
            .iter()
            .filter(|r| r.kill == kind && r.primary_died_first.is_none())
            .count()
    };
    assert_eq!(killed(Kill::Process), 20, "{rounds:#?}");
    assert_eq!(rounds.iter().filter(|r| r.kill == Kill::Host).count(), 1);
    // Every round that did not start on fresh test hosts protected the running guest
    // again (a failure to do so fails the round).
    eprintln!(
        "drill: {} rounds protected the running guest again",
        drill::protected_again(&rounds)
    );
    for r in &rounds {
        assert!(
            r.protected_again || r.first_on_lab,
            "round {} booted a guest: {r:?}",
            r.round
        );
        assert!(
            r.acked_during > 0,
            "the client got writes through round {}: {r:?}",
            r.round
        );
        assert!(r.took_over_epoch > 0, "{r:?}");
    }
}
