//! The nemesis drill (see `mcvmm_tests::nemesis`): prints a line per fault, then a table
//! per fault kind, and writes every round as JSON.

use std::process::ExitCode;

use mcvmm_tests::nemesis::{self, Options};

const USAGE: &str = "usage: mcvmm-nemesis [--faults N] [--seed S] [--out FILE] [--unfenced]
  --faults N   faults to put the pair through (default 30)
  --unfenced   run the pairs without --etcd (MCVMM_MCVMM=PATH runs another mcvmm binary,
               such as one from before the fence)
  --seed S     the random choices' seed (default: from the clock; printed)
  --out FILE   every round as JSON (default target/nemesis.json)";

fn main() -> ExitCode {
    let mut opts = Options {
        faults: 30,
        seed: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64),
        mem_mib: 128,
        fenced: true,
    };
    let mut out = mcvmm_tests::repo_root().join("target/nemesis.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().ok_or(format!("{a} needs a value"));
        let parsed = match a.as_str() {
            "--faults" => value()
                .and_then(|v| v.parse().map_err(|e| format!("--faults: {e}")))
                .map(|v| opts.faults = v),
            "--seed" => value()
                .and_then(|v| v.parse().map_err(|e| format!("--seed: {e}")))
                .map(|v| opts.seed = v),
            "--out" => value().map(|v| out = v.into()),
            "--unfenced" => {
                opts.fenced = false;
                Ok(())
            }
            "-h" | "--help" => {
                println!("{USAGE}");
                return ExitCode::SUCCESS;
            }
            other => Err(format!("unknown argument {other}\n{USAGE}")),
        };
        if let Err(e) = parsed {
            eprintln!("mcvmm-nemesis: {e}");
            return ExitCode::from(2);
        }
    }
    eprintln!(
        "nemesis: seed {}, {} faults, {}",
        opts.seed,
        opts.faults,
        if opts.fenced { "fenced" } else { "unfenced" }
    );
    let rounds = match nemesis::run(&opts, &mut |l| eprintln!("nemesis: {l}")) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("mcvmm-nemesis: {e}");
            return ExitCode::FAILURE;
        }
    };
    println!("{}", nemesis::table(&rounds));
    let wrong = rounds.iter().filter(|r| !r.correct && !r.unjudged).count();
    let unjudged = rounds.iter().filter(|r| r.unjudged).count();
    println!("{wrong} wrong outcome(s), {unjudged} round(s) not judged (at most 2 allowed)");
    if let Err(e) = serde_json::to_string_pretty(&rounds)
        .map_err(|e| e.to_string())
        .and_then(|j| std::fs::write(&out, j).map_err(|e| e.to_string()))
    {
        eprintln!("mcvmm-nemesis: writing {}: {e}", out.display());
    }
    if wrong > 0 || unjudged > 2 {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
