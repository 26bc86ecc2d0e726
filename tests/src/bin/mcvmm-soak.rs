//! mcvmm-soak: whose crash is it? Runs the soak of `mcvmm_tests::soak` — mcvmm under
//! epochs, QEMU under the same pauses, both idle — in test hosts on each emulator, and
//! prints per emulator and case the runs, the guests lost and each loss's signature.
//!
//! Batches alternate between the emulators; a batch is one fresh test host running each
//! case once, in an order that rotates from batch to batch, so that the cases share the
//! lab's moods alike. After a loss the batch goes on in a fresh test host (a host whose
//! nested KVM went wrong may take the next guest with it, and that guest would not be the
//! case's). Every run is appended to a JSON-lines file as it ends, so an interrupted soak
//! keeps what it measured and `--resume` adds to it; `--table` only prints the table.
//!
//! Usage: mcvmm-soak [--runs N] [--emulators 7.2,10.0] [--cases a,b] [--epochs N]
//!                   [--epoch-ms MS] [--idle-secs S] [--out FILE] [--resume] [--table]

use std::collections::BTreeMap;
use std::io::Write;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mcvmm_lab::{Emulator, HostOptions, KvmHost};
use mcvmm_tests::soak::{classify, pause_median_us as pause_median_us_of, script, Case, Signature};
use serde::{Deserialize, Serialize};

#[derive(Debug, Serialize, Deserialize)]
struct RunRecord {
    emulator: String,
    /// The test host's vCPUs ran on one TCG thread (`--one-tcg-thread`), not one each.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    one_tcg_thread: bool,
    case: Case,
    batch: u32,
    lost: Option<Signature>,
    detail: String,
    pause_median_us: Option<u64>,
    secs: f64,
    at: String,
}

struct Opts {
    runs: u32,
    cases: Vec<Case>,
    emulators: Vec<Emulator>,
    epochs: u32,
    epoch_ms: u32,
    idle_secs: u32,
    out: PathBuf,
    resume: bool,
    table_only: bool,
    one_tcg_thread: bool,
}

fn parse() -> Result<Opts, String> {
    let mut o = Opts {
        runs: 30,
        cases: Case::ALL.to_vec(),
        emulators: Emulator::ALL.to_vec(),
        epochs: 1000,
        epoch_ms: 20,
        idle_secs: 25,
        out: mcvmm_tests::repo_root().join("target/soak/results.jsonl"),
        resume: false,
        table_only: false,
        one_tcg_thread: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        match flag.as_str() {
            "--resume" => o.resume = true,
            "--table" => o.table_only = true,
            "--one-tcg-thread" => o.one_tcg_thread = true,
            "--help" | "-h" => return Err(USAGE.into()),
            _ => {
                let v = it.next().ok_or(format!("{flag} needs a value\n{USAGE}"))?;
                let n = || {
                    v.parse::<u32>()
                        .map_err(|_| format!("{flag} {v}: not a number"))
                };
                match flag.as_str() {
                    "--runs" => o.runs = n()?,
                    "--epochs" => o.epochs = n()?,
                    "--epoch-ms" => o.epoch_ms = n()?,
                    "--idle-secs" => o.idle_secs = n()?,
                    "--out" => o.out = PathBuf::from(&v),
                    "--cases" => {
                        o.cases = v
                            .split(',')
                            .map(|c| {
                                Case::ALL
                                    .into_iter()
                                    .find(|k| k.short() == c)
                                    .ok_or(format!(
                                "--cases: {c}? (mcvmm-epochs, qemu-pauses, mcvmm-idle, qemu-idle, mcvmm-copies, qemu-migrations, mcvmm-takeovers, mcvmm-reprotects, qemu-restores)"
                            ))
                            })
                            .collect::<Result<_, String>>()?
                    }
                    "--emulators" => {
                        o.emulators = v
                            .split(',')
                            .map(|e| e.parse().map_err(|x| format!("{x}")))
                            .collect::<Result<_, String>>()?
                    }
                    _ => return Err(format!("unknown flag {flag}\n{USAGE}")),
                }
            }
        }
    }
    Ok(o)
}

const USAGE: &str = "usage: mcvmm-soak [--runs N (30)] [--emulators 7.2,10.0] \
[--cases mcvmm-epochs,qemu-pauses,mcvmm-idle,qemu-idle,mcvmm-copies,qemu-migrations,\
mcvmm-takeovers,mcvmm-reprotects,qemu-restores] [--epochs N (1000)] \
[--epoch-ms MS (20)] [--idle-secs S (25)] [--out FILE (target/soak/results.jsonl)] [--resume] [--table] \
[--one-tcg-thread (the test hosts' vCPUs on one TCG thread; counted apart)]";

fn main() {
    let o = match parse() {
        Ok(o) => o,
        Err(e) => {
            eprintln!("{e}");
            std::process::exit(2);
        }
    };
    if let Err(e) = soak(&o) {
        eprintln!("mcvmm-soak: {e}");
        std::process::exit(1);
    }
}

fn read_records(path: &PathBuf) -> Vec<RunRecord> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str(l).ok())
        .collect()
}

fn soak(o: &Opts) -> Result<(), String> {
    if let Some(dir) = o.out.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    if !o.table_only {
        if !o.resume {
            let _ = std::fs::remove_file(&o.out);
        }
        let done = read_records(&o.out);
        let mut batch = done.iter().map(|r| r.batch + 1).max().unwrap_or(0);
        let started = Instant::now();
        loop {
            // The emulator with the fewest runs of the chosen cases goes next, so that
            // both advance alike; runs of other cases in the file do not count.
            let records = read_records(&o.out);
            let count = |e: Emulator| {
                records
                    .iter()
                    .filter(|r| {
                        r.emulator == e.name()
                            && r.one_tcg_thread == o.one_tcg_thread
                            && o.cases.contains(&r.case)
                    })
                    .count() as u32
            };
            let Some(&emulator) = o
                .emulators
                .iter()
                .filter(|&&e| count(e) < o.runs * o.cases.len() as u32)
                .min_by_key(|&&e| count(e))
            else {
                break;
            };
            run_batch(o, emulator, batch)?;
            batch += 1;
            eprintln!(
                "soak: {} batches, {:.0} min so far",
                batch,
                started.elapsed().as_secs_f64() / 60.0
            );
        }
    }
    print_table(&read_records(&o.out), o);
    Ok(())
}

fn fresh_host(emulator: Emulator, one_tcg_thread: bool) -> Result<KvmHost, String> {
    let host = mcvmm_tests::guest_host(&HostOptions {
        emulator: Some(emulator),
        with_qemu: true,
        single_thread_tcg: one_tcg_thread,
        ..HostOptions::default()
    })?;
    let pacer =
        mcvmm_lab::assets::workspace_binary("mcvmm-qmp-pacer").map_err(|e| e.to_string())?;
    host.put_binary(&pacer, "mcvmm-qmp-pacer")
        .map_err(|e| e.to_string())?;
    Ok(host)
}

fn run_batch(o: &Opts, emulator: Emulator, batch: u32) -> Result<(), String> {
    let mut host = None;
    let n = o.cases.len();
    for k in 0..n {
        let case = o.cases[(k + batch as usize) % n];
        let t = Instant::now();
        let h = match host.take() {
            Some(h) => h,
            None => match fresh_host(emulator, o.one_tcg_thread) {
                Ok(h) => h,
                Err(e) => {
                    // A test host that does not come up is the lab's; it costs no run.
                    eprintln!("soak: WARNING: a {emulator} test host did not come up: {e}");
                    continue;
                }
            },
        };
        let limit = Duration::from_secs(
            mcvmm_tests::soak::pauses_limit_secs(o.epochs, o.epoch_ms).max(o.idle_secs as u64)
                + 180,
        );
        let mut pause_median_us = None;
        let (lost, detail, keep) =
            match h.run(&script(case, o.epochs, o.epoch_ms, o.idle_secs), limit) {
                Err(e) => (Some(Signature::HostDied), first_line(&e.to_string()), false),
                Ok(out) if h.kernel_stall().is_some() => (
                    Some(Signature::HostDied),
                    format!(
                        "{} (script status {})",
                        h.kernel_stall().unwrap_or_default(),
                        out.status
                    ),
                    false,
                ),
                Ok(out) => {
                    let text = out.stdout_text() + &out.stderr_text();
                    pause_median_us = pause_median_us_of(&text);
                    match classify(case, if out.timed_out { 124 } else { out.status }, &text) {
                        // A protected run says how far it went and its last sync.
                        None => (
                            None,
                            mcvmm_tests::soak::protection::last_cycle(&text)
                                .filter(|_| case.protected())
                                .unwrap_or_default()
                                .to_string(),
                            true,
                        ),
                        Some((sig, detail)) => {
                            keep_evidence(o, emulator, batch, case, &text, &h.console_tail());
                            (Some(sig), detail, false)
                        }
                    }
                }
            };
        let rec = RunRecord {
            emulator: emulator.name().into(),
            one_tcg_thread: o.one_tcg_thread,
            case,
            batch,
            lost: lost.clone(),
            detail,
            pause_median_us,
            secs: t.elapsed().as_secs_f64(),
            at: now(),
        };
        eprintln!(
            "soak: batch {batch} {emulator} {}: {} ({:.0} s, pause median {} µs){}",
            case.name(),
            lost.as_ref().map_or("ok", Signature::name),
            rec.secs,
            rec.pause_median_us.map_or("-".into(), |p| p.to_string()),
            if rec.detail.is_empty() {
                String::new()
            } else {
                format!(" — {}", rec.detail)
            }
        );
        append(&o.out, &rec)?;
        if keep {
            host = Some(h);
        }
    }
    Ok(())
}

fn keep_evidence(o: &Opts, e: Emulator, batch: u32, case: Case, text: &str, console: &str) {
    let Some(dir) = o.out.parent() else { return };
    let name = format!(
        "batch{batch}-{}{}-{}.txt",
        e.name(),
        if o.one_tcg_thread {
            "-one-tcg-thread"
        } else {
            ""
        },
        case.name().replace(' ', "-")
    );
    let body = format!("{text}\n== test host console\n{console}\n");
    let _ = std::fs::write(dir.join(name), body);
}

fn first_line(s: &str) -> String {
    s.lines().next().unwrap_or_default().to_string()
}

fn now() -> String {
    let secs = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.to_string()
}

fn append(path: &PathBuf, rec: &RunRecord) -> Result<(), String> {
    let line = serde_json::to_string(rec).map_err(|e| e.to_string())?;
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .map_err(|e| format!("{}: {e}", path.display()))?;
    writeln!(f, "{line}").map_err(|e| format!("{}: {e}", path.display()))
}

fn print_table(records: &[RunRecord], o: &Opts) {
    println!(
        "\nSoak: 2-vCPU guest, {} MiB workload at {} pages/s; pauses: {} × {} ms; idle: {} s; copies: {} from boot\n",
        mcvmm_tests::soak::WORKLOAD_MIB,
        mcvmm_tests::soak::WORKLOAD_PAGES_PER_SEC,
        o.epochs,
        o.epoch_ms,
        o.idle_secs,
        mcvmm_tests::soak::COPIES
    );
    println!("| emulator | case | runs | guests lost | lost % | test hosts died | signatures of the guests lost | pause median µs |");
    println!("|---|---|---|---|---|---|---|---|");
    for (e, one_thread) in Emulator::ALL
        .into_iter()
        .flat_map(|e| [(e, false), (e, true)])
    {
        for case in Case::ALL {
            let runs: Vec<&RunRecord> = records
                .iter()
                .filter(|r| {
                    r.emulator == e.name() && r.one_tcg_thread == one_thread && r.case == case
                })
                .collect();
            if runs.is_empty() {
                continue;
            }
            let mut sigs: BTreeMap<&str, u32> = BTreeMap::new();
            let mut died = 0;
            for r in &runs {
                match &r.lost {
                    Some(Signature::HostDied) => died += 1,
                    Some(s) => *sigs.entry(s.name()).or_default() += 1,
                    None => {}
                }
            }
            let lost: u32 = sigs.values().sum();
            let judged = runs.len() as u32 - died;
            let pct = if judged == 0 {
                0.0
            } else {
                100.0 * lost as f64 / judged as f64
            };
            let list: Vec<String> = sigs.iter().map(|(s, n)| format!("{s} {n}")).collect();
            let mut pauses: Vec<u64> = runs.iter().filter_map(|r| r.pause_median_us).collect();
            pauses.sort_unstable();
            println!(
                "| {}{} | {} | {} | {lost} | {pct:.0} % | {died} | {} | {} |",
                e.name(),
                if one_thread { ", one TCG thread" } else { "" },
                case.name(),
                runs.len(),
                list.join(", "),
                pauses
                    .get(pauses.len() / 2)
                    .map_or("-".into(), |p| p.to_string())
            );
        }
    }
    println!("\n(runs whose test host died are not judged: they count under 'test hosts died', not in 'lost %')");
    let lost: Vec<&RunRecord> = records.iter().filter(|r| r.lost.is_some()).collect();
    if !lost.is_empty() {
        println!("\nEach loss, and where (evidence beside the results file, batchN-EMULATOR-CASE.txt):\n");
        for r in lost {
            let sig = r.lost.as_ref().map_or("", Signature::name);
            println!(
                "- batch {} {}{} {}: {sig}: {}",
                r.batch,
                r.emulator,
                if r.one_tcg_thread {
                    ", one TCG thread"
                } else {
                    ""
                },
                r.case.name(),
                r.detail.chars().take(300).collect::<String>()
            );
        }
    }
}
