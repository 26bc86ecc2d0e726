//! mcvmm-retries LEDGER: the table of a test run's retries (see `mcvmm_tests::retry`),
//! ending with the line `retries: N of 3 allowed`. Exits 1 when the run took more than
//! its budget, so that `scripts/test.sh` fails it whatever passed. (A refused retry is
//! listed too; the test that asked for it has failed on its own.)

use mcvmm_tests::retry::{read_ledger, Cause, BUDGET};

fn main() {
    let Some(path) = std::env::args().nth(1) else {
        eprintln!("usage: mcvmm-retries LEDGER");
        std::process::exit(2);
    };
    let entries = read_ledger(std::path::Path::new(&path));
    let granted = entries.iter().filter(|e| e.granted).count();
    if !entries.is_empty() {
        println!("\n| test | cause | signature, phase | granted | evidence |");
        println!("|---|---|---|---|---|");
        for e in &entries {
            let (cause, sig) = match &e.cause {
                Cause::HostDied => ("test host died", String::new()),
                Cause::QemuGuestLost => ("QEMU's guest lost", String::new()),
                Cause::GuestLost { signature, phase } => {
                    ("guest lost", format!("{}, {phase:?}", signature.name()))
                }
            };
            println!(
                "| {} | {cause} | {sig} | {} | {} |",
                e.test,
                if e.granted { "yes" } else { "no" },
                e.detail.replace('|', "/")
            );
        }
    }
    println!("retries: {granted} of {BUDGET} allowed");
    if granted > BUDGET {
        std::process::exit(1);
    }
}
