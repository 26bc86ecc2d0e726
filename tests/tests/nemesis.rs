//! The nemesis drill in CI: 30 faults picked at random (the seed is printed; set
//! MCVMM_NEMESIS_SEED to replay one), each judged as `mcvmm_tests::nemesis` says. Any
//! wrong outcome fails; so do more than 2 rounds that could not be judged.

use mcvmm_tests::nemesis::{self, Options};

#[test]
fn thirty_faults_never_leave_two_live_copies_nor_lose_an_acknowledged_write() {
    let seed = std::env::var("MCVMM_NEMESIS_SEED")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| {
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(1, |d| d.as_nanos() as u64)
        });
    eprintln!("nemesis: seed {seed} (MCVMM_NEMESIS_SEED={seed} replays it)");
    let opts = Options {
        faults: 30,
        seed,
        mem_mib: 128,
        fenced: true,
    };
    let rounds = nemesis::run(&opts, &mut |l| eprintln!("nemesis: {l}")).expect("the drill");
    eprintln!("{}", nemesis::table(&rounds));
    let wrong: Vec<_> = rounds
        .iter()
        .filter(|r| !r.correct && !r.unjudged)
        .map(|r| format!("round {} ({:?}): {}", r.n, r.kind, r.what))
        .collect();
    let unjudged = rounds.iter().filter(|r| r.unjudged).count();
    assert!(wrong.is_empty(), "wrong outcomes:\n{}", wrong.join("\n"));
    assert!(unjudged <= 2, "{unjudged} rounds could not be judged");
}
