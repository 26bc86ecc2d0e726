//! mcvmm-drill: the failover drill on two lab test hosts (see `mcvmm_tests::drill`).
//! Prints what each round checked and how long the takeover took, a summary table, and
//! writes JSON.
//!
//! Usage: mcvmm-drill [--rounds N] [--partition-rounds N] [--stall-rounds N]
//!        [--host-rounds N] [--seed S] [--out FILE]

use std::time::{SystemTime, UNIX_EPOCH};

use mcvmm_tests::drill::{self, Kill, Options, Round};

const USAGE: &str = "usage: mcvmm-drill [--rounds N] [--partition-rounds N] [--stall-rounds N]
                   [--host-rounds N] [--seed S] [--out FILE]
  --rounds N       rounds that SIGKILL the primary's mcvmm (default 1)
  --partition-rounds N  rounds that cut the primary's host from everything for 3 s
                   (default 1; the secondary wins the fence, the primary then exits)
  --stall-rounds N rounds that freeze (SIGSTOP) the primary's mcvmm for 3 s (default 1)
  --host-rounds N  rounds that power off the primary's whole test host (default 1)
  --seed S         seed of the random kill moments (default: from the clock)
  --out FILE       JSON results (default bench-results/drill.json)";

fn median(mut v: Vec<u64>) -> u64 {
    v.sort_unstable();
    v.get(v.len() / 2).copied().unwrap_or(0)
}

fn summary(rounds: &[Round], kill: Kill) -> Option<String> {
    let r: Vec<&Round> = rounds.iter().filter(|r| r.kill == kill).collect();
    if r.is_empty() {
        return None;
    }
    let f = |g: fn(&Round) -> u64| -> (u64, u64) {
        let v: Vec<u64> = r.iter().map(|x| g(x)).collect();
        (median(v.clone()), v.into_iter().max().unwrap_or(0))
    };
    let (fo_med, fo_max) = f(|x| x.failover_ms);
    let (st_med, st_max) = f(|x| x.client_stall_ms);
    let acked: u64 = r.iter().map(|x| x.acked_before + x.acked_during).sum();
    Some(format!(
        "| {kill:?} | {} | {acked} | 0 | {fo_med} / {fo_max} | {st_med} / {st_max} |",
        r.len()
    ))
}

fn main() {
    let mut opts = Options {
        process_rounds: 1,
        partition_rounds: 1,
        stall_rounds: 1,
        host_rounds: 1,
        fenced: true,
        guest_mem_mib: 128,
        seed: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(1),
    };
    let mut out = mcvmm_tests::repo_root().join("bench-results/drill.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut num = |name: &str| -> u64 {
            match args.next().and_then(|v| v.parse().ok()) {
                Some(v) => v,
                None => {
                    eprintln!("mcvmm-drill: {name} needs a number\n{USAGE}");
                    std::process::exit(2)
                }
            }
        };
        match a.as_str() {
            "--rounds" => opts.process_rounds = num("--rounds") as usize,
            "--host-rounds" => opts.host_rounds = num("--host-rounds") as usize,
            "--partition-rounds" => opts.partition_rounds = num("--partition-rounds") as usize,
            "--stall-rounds" => opts.stall_rounds = num("--stall-rounds") as usize,
            "--seed" => opts.seed = num("--seed"),
            "--out" => match args.next() {
                Some(p) => out = p.into(),
                None => {
                    eprintln!("mcvmm-drill: --out needs a file\n{USAGE}");
                    std::process::exit(2)
                }
            },
            "--help" | "-h" => {
                println!("{USAGE}");
                return;
            }
            other => {
                eprintln!("mcvmm-drill: unknown argument {other}\n{USAGE}");
                std::process::exit(2)
            }
        }
    }
    let rounds = match drill::run(&opts, &mut |m| println!("drill: {m}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcvmm-drill: FAILED: {e}");
            std::process::exit(1)
        }
    };
    println!();
    println!("| kill | rounds | acknowledged writes checked | missing | failover ms (median / max) | client's longest wait ms (median / max) |");
    println!("|---|---|---|---|---|---|");
    for k in [Kill::Process, Kill::Partition, Kill::Stall, Kill::Host] {
        if let Some(line) = summary(&rounds, k) {
            println!("{line}");
        }
    }
    println!(
        "\nThe running guest was protected again (`mcvmm ctl protect`) for {} round(s)",
        drill::protected_again(&rounds)
    );
    if let Some(dir) = out.parent() {
        let _ = std::fs::create_dir_all(dir);
    }
    let json = serde_json::json!({ "seed": opts.seed, "rounds": rounds });
    match serde_json::to_string_pretty(&json).map(|s| std::fs::write(&out, s)) {
        Ok(Ok(())) => println!("\nJSON: {}", out.display()),
        Ok(Err(e)) => eprintln!("mcvmm-drill: {}: {e}", out.display()),
        Err(e) => eprintln!("mcvmm-drill: {e}"),
    }
}
