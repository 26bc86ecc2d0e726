//! mcvmm-agentctl: drive the in-guest agent from a shell (tests, the lab, by hand).

use std::time::{Duration, Instant};

use mcvmm_guest::client::AgentClient;
use mcvmm_guest::proto::{decode_hex, encode_hex};
use mcvmm_guest::records;

const USAGE: &str = "\
usage: mcvmm-agentctl [--addr HOST:PORT] [--wait SECS] COMMAND
  --addr HOST:PORT   the agent (default 127.0.0.1:7000)
  --wait SECS        keep trying to connect this long (default 0: one try)
commands:
  ping | status | mem-verify | shutdown
  write DISK OFFSET HEX          acknowledged write (fsync'd before the reply)
  read DISK OFFSET LEN           prints hex
  mem-start MIB PAGES_PER_SEC    start the self-checking memory workload
  records DISK RUN COUNT         write records 0..COUNT of RUN, one acknowledged write each;
                                 prints the number acknowledged
  records-for DISK RUN SECS      like records, for SECS seconds or until a write fails (a
                                 failover drill); prints acknowledged=N, and error=... if one
                                 did; exits 0 either way
  answer-within SECS             (failover probes) new connections every 100 ms until the
                                 agent answers a PING; prints answered_ms=N
  check-records FILE RUN COUNT   (no agent) checks a disk image holds records 0..COUNT of RUN
  diskbench DISK MIB             sequential write+read throughput inside the guest (overwrites!)
  cpubench MS                    an integer loop for MS ms inside the guest; prints iters=N
  latency COUNT                  COUNT PINGs one after another; prints median and p99 in µs
  raw LINE                       send a protocol line as is, print the reply";

fn main() {
    // Like any filter: a reader that went away (`| grep -q`, `| head`) ends us quietly
    // instead of making println panic on EPIPE.
    // SAFETY: restores a default signal disposition before any other thread exists.
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_DFL) };
    if let Err(e) = run() {
        eprintln!("mcvmm-agentctl: {e}");
        std::process::exit(1);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], i: usize, name: &str) -> Result<T, String> {
    let v = args
        .get(i)
        .ok_or_else(|| format!("missing {name}\n{USAGE}"))?;
    v.parse().map_err(|_| format!("{name}: cannot parse {v:?}"))
}

fn run() -> Result<(), String> {
    let mut addr = "127.0.0.1:7000".to_string();
    let mut wait = 0f64;
    let mut args: Vec<String> = std::env::args().skip(1).collect();
    while args.first().is_some_and(|a| a.starts_with("--")) {
        let flag = args.remove(0);
        if flag == "--help" {
            println!("{USAGE}");
            return Ok(());
        }
        if args.is_empty() {
            return Err(format!("{flag} needs a value"));
        }
        let value = args.remove(0);
        match flag.as_str() {
            "--addr" => addr = value,
            "--wait" => {
                wait = value
                    .parse()
                    .map_err(|_| format!("--wait {value}: not a number"))?
            }
            _ => return Err(format!("unknown option {flag}\n{USAGE}")),
        }
    }
    let command = args.first().cloned().ok_or(USAGE)?;
    if command == "check-records" {
        let file: String = arg(&args, 1, "FILE")?;
        let run: u64 = arg(&args, 2, "RUN")?;
        let count: u64 = arg(&args, 3, "COUNT")?;
        let disk = std::fs::read(&file).map_err(|e| format!("{file}: {e}"))?;
        let missing = records::missing(&disk, run, count);
        if missing.is_empty() {
            println!("all {count} records present");
            return Ok(());
        }
        return Err(format!(
            "{} of {count} records missing or wrong, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        ));
    }
    if command == "answer-within" {
        let secs: f64 = arg(&args, 1, "SECS")?;
        let start = Instant::now();
        loop {
            let answered = AgentClient::connect(addr.as_str(), Duration::from_millis(100))
                .and_then(|c| {
                    c.set_timeout(Duration::from_secs(1))?;
                    let mut c = c;
                    c.ping()
                });
            if answered.is_ok() {
                println!("answered_ms={}", start.elapsed().as_millis());
                return Ok(());
            }
            if start.elapsed().as_secs_f64() > secs {
                return Err(format!("no answer within {secs} s"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    let mut c = AgentClient::connect_retry(&addr, Duration::from_secs_f64(wait))
        .map_err(|e| e.to_string())?;
    let e = |e: mcvmm_guest::client::ClientError| e.to_string();
    match command.as_str() {
        "ping" => c.ping().map_err(e)?,
        "status" => {
            for (k, v) in c.status().map_err(e)?.pairs {
                println!("{k}={v}");
            }
        }
        "mem-verify" => {
            // Every page is read; in a slow (nested) guest a large workload takes a while.
            c.set_timeout(Duration::from_secs(600)).map_err(e)?;
            let (pages, errors) = c.mem_verify().map_err(e)?;
            println!("pages={pages} errors={errors}");
            if errors != 0 {
                return Err(format!("{errors} of {pages} pages fail their pattern"));
            }
        }
        "shutdown" => c.shutdown().map_err(e)?,
        "write" => {
            let data = decode_hex(&arg::<String>(&args, 3, "HEX")?).map_err(|e| e.to_string())?;
            c.write(
                &arg::<String>(&args, 1, "DISK")?,
                arg(&args, 2, "OFFSET")?,
                &data,
            )
            .map_err(e)?;
        }
        "read" => {
            let data = c
                .read(
                    &arg::<String>(&args, 1, "DISK")?,
                    arg(&args, 2, "OFFSET")?,
                    arg(&args, 3, "LEN")?,
                )
                .map_err(e)?;
            println!("{}", encode_hex(&data));
        }
        "mem-start" => {
            // Every page is written once before the reply.
            c.set_timeout(Duration::from_secs(600)).map_err(e)?;
            c.mem_start(arg(&args, 1, "MIB")?, arg(&args, 2, "PAGES_PER_SEC")?)
                .map_err(e)?
        }
        "records" => {
            let disk: String = arg(&args, 1, "DISK")?;
            let run: u64 = arg(&args, 2, "RUN")?;
            let count: u64 = arg(&args, 3, "COUNT")?;
            // A protected guest's replies wait for their checkpoint; a nested lab host
            // stretches that now and then.
            c.set_timeout(Duration::from_secs(30)).map_err(e)?;
            let start = Instant::now();
            for seq in 0..count {
                c.write(&disk, records::offset(seq), &records::record(run, seq))
                    .map_err(|err| format!("record {seq}: {err} ({seq} acknowledged)"))?;
            }
            let secs = start.elapsed().as_secs_f64();
            println!(
                "{count} records acknowledged in {secs:.3} s ({:.0}/s)",
                count as f64 / secs.max(1e-9)
            );
        }
        "records-for" => {
            let disk: String = arg(&args, 1, "DISK")?;
            let run: u64 = arg(&args, 2, "RUN")?;
            let secs: f64 = arg(&args, 3, "SECS")?;
            // A request that waits this long has outlived any failover worth the name.
            c.set_timeout(Duration::from_secs(30)).map_err(e)?;
            let start = Instant::now();
            let mut acked = 0u64;
            let mut error = None;
            let mut slowest = 0f64;
            while start.elapsed().as_secs_f64() < secs {
                let t = Instant::now();
                match c.write(&disk, records::offset(acked), &records::record(run, acked)) {
                    Ok(()) => acked += 1,
                    Err(err) => {
                        error = Some(err.to_string());
                        break;
                    }
                }
                slowest = slowest.max(t.elapsed().as_secs_f64());
            }
            println!("acknowledged={acked}");
            println!("slowest_ms={:.0}", slowest * 1e3);
            if let Some(err) = error {
                println!("error={err}");
            }
        }
        "cpubench" => {
            c.set_timeout(Duration::from_secs(700)).map_err(e)?;
            let reply = c
                .call(&mcvmm_guest::proto::Request::CpuBench {
                    ms: arg(&args, 1, "MS")?,
                })
                .map_err(e)?;
            println!("{reply}");
        }
        "diskbench" => {
            c.set_timeout(Duration::from_secs(600)).map_err(e)?;
            let reply = c
                .call(&mcvmm_guest::proto::Request::DiskBench {
                    disk: arg(&args, 1, "DISK")?,
                    mib: arg(&args, 2, "MIB")?,
                })
                .map_err(e)?;
            println!("{reply}");
        }
        "latency" => {
            let count: usize = arg(&args, 1, "COUNT")?;
            let mut us: Vec<f64> = Vec::with_capacity(count);
            for _ in 0..count.max(1) {
                let t = Instant::now();
                c.ping().map_err(e)?;
                us.push(t.elapsed().as_secs_f64() * 1e6);
            }
            us.sort_by(f64::total_cmp);
            let at = |q: f64| us[((us.len() - 1) as f64 * q).round() as usize];
            println!("median_us={:.0} p99_us={:.0}", at(0.5), at(0.99));
        }
        "raw" => println!("{}", c.raw(&args[1..].join(" ")).map_err(e)?),
        other => return Err(format!("unknown command {other:?}\n{USAGE}")),
    }
    Ok(())
}
