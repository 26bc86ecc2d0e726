//! mcvmm-qmp-pacer: runs inside a test host beside a QEMU guest and gives it the rhythm of
//! mcvmm's `ctl epochs` through QMP, so that `mcvmm-soak` can compare how often each
//! VMM's guests are lost under the same pauses.
//!
//! Each pause: `stop`, then `info registers -a` (QEMU reads every vCPU's whole state from
//! KVM, and writes it back before the vCPUs run again, which is more than mcvmm's capture
//! does), then `cont`, then `--run-ms` of guest time. Every `--dirty-every` pauses it
//! starts `calc-dirty-rate` in dirty-bitmap mode for one second: KVM's dirty log on,
//! synced at both ends. (QEMU has no cheaper way to sync the log at every pause without
//! migrating.) `--idle-secs` instead lets the guest run untouched for that long.
//!
//! `--migrations N` instead migrates the guest N times back to back, each time into
//! `cat > /dev/null` at QEMU's default bandwidth, and lets it run on (`cont`) after each:
//! QEMU's whole copy of RAM while the guest runs, with KVM's dirty log on and synced
//! while it runs, as mcvmm's full copies (`ctl snapshot`) and its replication's initial
//! sync do.
//!
//! `--migrate-to FILE` migrates the guest once into FILE at `--mib-per-s` (32: about
//! what mcvmm's initial sync sends in a test host) and leaves QEMU paused, for a new
//! QEMU to go on from it (`-incoming "exec:cat FILE"`): a restore, as a secondary's
//! takeover is one.
//!
//! `--look` prints each vCPU's `RIP` three times, 1 s apart, for a guest that stopped
//! answering. Prints one JSON object; exits 1 if QEMU went away or reported the guest
//! shut down (a triple fault, or a guest kernel that panicked with `panic=-1`).

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::time::{Duration, Instant};

use serde_json::{json, Value};

struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    /// Events QEMU sent (SHUTDOWN, RESET, STOP, RESUME ...), by name.
    events: Vec<Value>,
}

impl Qmp {
    fn connect(path: &str) -> Result<Qmp, String> {
        let stream = UnixStream::connect(path).map_err(|e| format!("{path}: {e}"))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .map_err(|e| e.to_string())?;
        let writer = stream.try_clone().map_err(|e| e.to_string())?;
        let mut qmp = Qmp {
            reader: BufReader::new(stream),
            writer,
            events: Vec::new(),
        };
        qmp.read()?; // the greeting
        qmp.execute("qmp_capabilities", json!({}))?;
        Ok(qmp)
    }

    fn read(&mut self) -> Result<Value, String> {
        let mut line = String::new();
        match self.reader.read_line(&mut line) {
            Ok(0) => Err("QEMU closed its QMP socket".into()),
            Ok(_) => serde_json::from_str(&line).map_err(|e| format!("QMP sent {line:?}: {e}")),
            Err(e) => Err(format!("reading QMP: {e}")),
        }
    }

    /// Runs a command; its `return`, or its error's description as `Err`.
    fn execute(&mut self, command: &str, arguments: Value) -> Result<Value, String> {
        let msg = json!({ "execute": command, "arguments": arguments });
        writeln!(self.writer, "{msg}").map_err(|e| format!("writing QMP: {e}"))?;
        loop {
            let reply = self.read()?;
            if let Some(ev) = reply.get("event") {
                // Its own pauses' STOP and RESUME are not news.
                if ev != "STOP" && ev != "RESUME" {
                    self.events.push(reply);
                }
                continue;
            }
            if let Some(r) = reply.get("return") {
                return Ok(r.clone());
            }
            return Err(format!("{command}: {}", reply["error"]["desc"]));
        }
    }

    fn shutdown_event(&self) -> Option<&Value> {
        self.events.iter().find(|e| e["event"] == "SHUTDOWN")
    }

    fn hmp(&mut self, line: &str) -> Result<String, String> {
        let r = self.execute("human-monitor-command", json!({ "command-line": line }))?;
        Ok(r.as_str().unwrap_or_default().to_string())
    }
}

struct Args {
    qmp: String,
    pauses: u32,
    run_ms: u64,
    dirty_every: u32,
    idle_secs: u64,
    migrations: u32,
    migrate_to: Option<String>,
    mib_per_s: u64,
    look: bool,
    /// Skip reading the vCPUs' state in the pauses (to measure what it costs).
    no_state: bool,
}

fn parse() -> Result<Args, String> {
    let mut a = Args {
        qmp: String::new(),
        pauses: 0,
        run_ms: 20,
        dirty_every: 55,
        idle_secs: 0,
        migrations: 0,
        migrate_to: None,
        mib_per_s: 32,
        look: false,
        no_state: false,
    };
    let mut it = std::env::args().skip(1);
    while let Some(flag) = it.next() {
        if flag == "--look" || flag == "--no-state" {
            a.look |= flag == "--look";
            a.no_state |= flag == "--no-state";
            continue;
        }
        let v = it.next().ok_or(format!("{flag} needs a value"))?;
        let n = || {
            v.parse::<u64>()
                .map_err(|_| format!("{flag} {v}: not a number"))
        };
        match flag.as_str() {
            "--qmp" => a.qmp = v.clone(),
            "--pauses" => a.pauses = n()? as u32,
            "--run-ms" => a.run_ms = n()?,
            "--dirty-every" => a.dirty_every = n()?.max(1) as u32,
            "--idle-secs" => a.idle_secs = n()?,
            "--migrations" => a.migrations = n()? as u32,
            "--migrate-to" => a.migrate_to = Some(v.clone()),
            "--mib-per-s" => a.mib_per_s = n()?.max(1),
            _ => return Err(format!("unknown flag {flag}; usage: mcvmm-qmp-pacer --qmp SOCK (--pauses N [--run-ms MS] [--dirty-every N] | --idle-secs S | --migrations N | --migrate-to FILE [--mib-per-s N] | --look)")),
        }
    }
    if a.qmp.is_empty() {
        return Err("--qmp SOCK is required".into());
    }
    Ok(a)
}

fn rips(qmp: &mut Qmp) -> Result<Vec<String>, String> {
    let text = qmp.hmp("info registers -a")?;
    Ok(text
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("RIP="))
        .map(str::to_string)
        .collect())
}

fn run(a: &Args, qmp: &mut Qmp, report: &mut Value) -> Result<(), String> {
    if a.look {
        let mut looks = Vec::new();
        for _ in 0..3 {
            looks.push(rips(qmp)?);
            std::thread::sleep(Duration::from_secs(1));
        }
        report["looks"] = json!(looks);
        return Ok(());
    }
    if a.idle_secs > 0 {
        let end = Instant::now() + Duration::from_secs(a.idle_secs);
        while Instant::now() < end && qmp.shutdown_event().is_none() {
            qmp.execute("query-status", json!({}))?;
            std::thread::sleep(Duration::from_millis(500));
        }
        return Ok(());
    }
    if let Some(file) = &a.migrate_to {
        // (The file name goes to a shell: only plain names.)
        if !file
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-/".contains(c))
        {
            return Err(format!(
                "--migrate-to {file:?}: only letters, digits and ._-/"
            ));
        }
        qmp.execute(
            "migrate-set-parameters",
            json!({ "max-bandwidth": a.mib_per_s << 20 }),
        )?;
        let t = Instant::now();
        migrate_once(qmp, &format!("exec:cat > {file}"))?;
        report["migration_ms"] = json!(t.elapsed().as_millis() as u64);
        return Ok(());
    }
    if a.migrations > 0 {
        return migrate(a.migrations, qmp, report);
    }
    let mut pause_us = Vec::with_capacity(a.pauses as usize);
    let mut state_us = Vec::with_capacity(a.pauses as usize);
    let (mut dirty_runs, mut dirty_busy) = (0u32, 0u32);
    for i in 0..a.pauses {
        if i % a.dirty_every == 0 {
            let args = json!({ "calc-time": 1, "mode": "dirty-bitmap" });
            match qmp.execute("calc-dirty-rate", args) {
                Ok(_) => dirty_runs += 1,
                // The previous measurement is still going: its log stays on.
                Err(e) if e.contains("already") => dirty_busy += 1,
                Err(e) => return Err(e),
            }
        }
        let t = Instant::now();
        qmp.execute("stop", json!({}))?;
        if !a.no_state {
            let s = Instant::now();
            qmp.hmp("info registers -a")?;
            state_us.push(s.elapsed().as_micros() as u64);
        }
        qmp.execute("cont", json!({}))?;
        pause_us.push(t.elapsed().as_micros() as u64);
        report["pauses"] = json!(i + 1);
        if qmp.shutdown_event().is_some() {
            break;
        }
        std::thread::sleep(Duration::from_millis(a.run_ms));
    }
    let at = |v: &mut Vec<u64>, q: f64| {
        v.sort_unstable();
        v.get(((v.len() as f64 - 1.0) * q) as usize).copied()
    };
    report["pause_us_median"] = json!(at(&mut pause_us, 0.5));
    report["pause_us_p99"] = json!(at(&mut pause_us, 0.99));
    report["state_us_median"] = json!(at(&mut state_us, 0.5));
    report["dirty_rate_runs"] = json!(dirty_runs);
    report["dirty_rate_busy"] = json!(dirty_busy);
    Ok(())
}

/// One migration to `uri`, until QEMU says it completed (the source is paused then).
fn migrate_once(qmp: &mut Qmp, uri: &str) -> Result<(), String> {
    qmp.execute("migrate", json!({ "uri": uri }))?;
    loop {
        if let Some(ev) = qmp.shutdown_event() {
            return Err(format!("guest shut down while migrating: {}", ev["data"]));
        }
        let status = qmp.execute("query-migrate", json!({}))?;
        match status["status"].as_str() {
            Some("completed") => return Ok(()),
            Some("failed") | Some("cancelled") => return Err(format!("migration: {status}")),
            _ => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

/// Migrates the guest `n` times into `cat > /dev/null`, letting it run on after each.
fn migrate(n: u32, qmp: &mut Qmp, report: &mut Value) -> Result<(), String> {
    let mut total_ms = Vec::new();
    for i in 0..n {
        let t = Instant::now();
        match migrate_once(qmp, "exec:cat > /dev/null") {
            Ok(()) => {}
            // The caller reads the shutdown from the events.
            Err(_) if qmp.shutdown_event().is_some() => return Ok(()),
            Err(e) => return Err(format!("migration {}: {e}", i + 1)),
        }
        // A migrated source stays paused; it goes on as if nothing had happened.
        qmp.execute("cont", json!({}))?;
        total_ms.push(t.elapsed().as_millis() as u64);
        report["migrations"] = json!(i + 1);
    }
    total_ms.sort_unstable();
    report["migration_ms_median"] = json!(total_ms.get(total_ms.len() / 2));
    Ok(())
}

fn main() {
    let a = match parse() {
        Ok(a) => a,
        Err(e) => {
            eprintln!("mcvmm-qmp-pacer: {e}");
            std::process::exit(2);
        }
    };
    let started = Instant::now();
    let mut report = json!({ "pauses": 0 });
    let outcome = Qmp::connect(&a.qmp).and_then(|mut qmp| {
        let r = run(&a, &mut qmp, &mut report);
        report["events"] = json!(qmp
            .events
            .iter()
            .map(|e| json!({ "event": e["event"], "data": e["data"] }))
            .collect::<Vec<_>>());
        match (r, qmp.shutdown_event()) {
            (Err(e), _) => Err(e),
            (Ok(()), Some(ev)) => Err(format!("guest shut down: {}", ev["data"])),
            (Ok(()), None) => Ok(()),
        }
    });
    report["secs"] = json!(started.elapsed().as_secs_f64());
    if let Err(e) = &outcome {
        report["error"] = json!(e);
    }
    println!("{report}");
    if outcome.is_err() {
        std::process::exit(1);
    }
}
