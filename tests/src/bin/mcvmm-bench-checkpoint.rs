//! Benchmark of the checkpoint engine, in one KVM host (a lab test host here), side by side:
//!
//! * epoch pause time against dirty-set size: a 1 GiB guest running the agent's memory
//!   workload at several rates, `mcvmm ctl epochs` (pause, dirty log, copy into a staging
//!   buffer, state capture, resume) — median and p99 of each step, the host's memcpy
//!   bandwidth measured in the same run, and pause / (dirty bytes / memcpy bandwidth);
//!   the guest writes at most about 45k pages a second under nested TCG, so the larger
//!   dirty sets come from longer epochs, not faster writes;
//!   alternate epochs copy every dirty page in the pause or copy most of them ahead
//!   with the guest running (as a replicating primary does), compared; each with KVM's
//!   manual dirty-log protection (the default) and with the legacy log
//!   (`MCVMM_DIRTY_LOG=legacy`);
//! * snapshot and restore of 256 MiB and 2 GiB guests: mcvmm (`ctl snapshot`, `run
//!   --restore`) and QEMU (`migrate` to a file, live and with the guest stopped first,
//!   `-incoming` from it), each until the agent answers again; mcvmm's snapshot with both dirty logs (the legacy one pauses the
//!   guest to turn the log on).
//!
//! Prints a table and writes JSON (default `bench-results/checkpoint.json`).
//! Usage: mcvmm-bench-checkpoint [--epochs N] [--snapshots-only | --epochs-only]
//! [--no-legacy] [--out FILE]

use mcvmm_lab::{HostOptions, KvmHost};
use serde_json::{json, Value};

/// The epoch length of the idle and 1k rows, as a replicating primary runs by default.
const EPOCH_MS: u64 = 100;
/// The memory workload's rate for the rows whose dirty set needs longer epochs: well
/// under what the guest can write (about 45k pages a second), so that it keeps pace.
const LONG_EPOCH_RATE: u64 = 33_000;

/// `script` with guest.sh's helpers, stopping at the first failing line (and then
/// killing the guests it started, whose namespaces the next script reuses).
fn run(host: &KvmHost, script: &str, secs: u64) -> Result<String, String> {
    mcvmm_tests::run_script(
        host,
        &format!(". ./guest.sh\ntrap cleanup_guests EXIT\nset -e\n{script}"),
        secs,
    )
}

/// The JSON object printed after the line `== name`.
fn report(out: &str, name: &str) -> Result<Value, String> {
    let marker = format!("== {name}\n");
    let at = out
        .find(&marker)
        .ok_or_else(|| format!("no {name} in {out}"))?;
    serde_json::Deserializer::from_str(&out[at + marker.len()..])
        .into_iter()
        .next()
        .and_then(Result::ok)
        .ok_or_else(|| format!("{name}: not JSON in {out}"))
}

/// The number after `key` at the start of a line (`key=12`, `downtime: 12 ms`).
fn number(text: &str, key: &str) -> Option<f64> {
    text.lines()
        .find_map(|l| l.strip_prefix(key))
        .and_then(|v| v.split_whitespace().next()?.parse().ok())
}

/// The shell line that picks mcvmm's dirty log for the guests started after it.
fn log_env(legacy: bool) -> &'static str {
    if legacy {
        "export MCVMM_DIRTY_LOG=legacy"
    } else {
        "unset MCVMM_DIRTY_LOG"
    }
}

/// Epochs of `epoch_ms` at one memory-workload rate (pages per second; None = idle),
/// once more (loudly) if the lab lost the guest: its nested guests die or get stuck on
/// their own now and then, whatever the VMM (see docs/lab-notes.md).
fn epochs_at(
    host: &KvmHost,
    rate: Option<u64>,
    epoch_ms: u64,
    epochs: u32,
    legacy: bool,
    spin: bool,
) -> Result<Value, String> {
    let load = match rate {
        Some(r) => format!("agent ep mem-start 256 {r}"),
        None => "true".into(),
    };
    let script = format!(
        "{env}
         {spin}
         start_guest ep vmlinux 1 1024 >/dev/null
         {load} >/dev/null
         sleep 2
         echo '== epochs'
         ./mcvmm ctl --api-sock ep.sock epochs {epochs} {epoch_ms} || {{
             echo 'mcvmm log:'; tail -30 ep.log; echo 'console:'; tail -30 ep.console; exit 1; }}
         # A guest the lab lost during the epochs dirties nothing: its row would
         # measure an idle guest under the wrong name.
         agent ep status >/dev/null
         kill_guest ep; ip netns del ep",
        env = log_env(legacy),
        spin = if spin {
            "unset MCVMM_PAUSE_SPIN_US"
        } else {
            "export MCVMM_PAUSE_SPIN_US=0"
        },
    );
    let out = match run(host, &script, 600) {
        Err(e) => match mcvmm_tests::guest::guest_lost(&e) {
            Some(why) => {
                eprintln!("WARNING: the lab lost the guest ({why}); running these epochs again");
                run(host, &script, 600)?
            }
            None => return Err(e),
        },
        Ok(out) => out,
    };
    report(&out, "epochs")
}

/// mcvmm: snapshot of a running guest, then a new process restored from it until the
/// agent answers. Returns (snapshot ms, pause ms, restore ms, pause to turn tracking on ms).
fn mcvmm_snapshot(host: &KvmHost, mib: u64, legacy: bool) -> Result<[f64; 4], String> {
    let out = run(
        host,
        &format!(
            "{env}
             start_guest sn vmlinux 1 {mib} >/dev/null
             agent sn mem-start {load} 0 >/dev/null
             sleep 2
             echo '== snapshot'; ./mcvmm ctl --api-sock sn.sock snapshot sn.snap
             kill_guest sn
             t0=$(cut -d' ' -f1 /proc/uptime)
             restore_guest sn sn.snap >/dev/null
             t1=$(cut -d' ' -f1 /proc/uptime)
             awk -v a=$t0 -v b=$t1 'BEGIN {{ printf \"restore_ms=%d\\n\", (b - a) * 1000 }}'
             agent sn mem-verify
             kill_guest sn; ip netns del sn; rm -rf sn.snap",
            load = (mib / 4).min(256),
            env = log_env(legacy),
        ),
        900,
    )?;
    let snap = report(&out, "snapshot")?;
    eprintln!(
        "  snapshot {mib} MiB mcvmm: tracking on in a pause of {} ms, pages copied again per round {}",
        snap["tracking_on_pause_ms"], snap["precopy_rounds_pages"]
    );
    if !out.contains(" errors=0") {
        return Err(format!("mcvmm: memory did not verify after restore: {out}"));
    }
    Ok([
        snap["total_ms"].as_f64().unwrap_or(f64::NAN),
        snap["pause_ms"].as_f64().unwrap_or(f64::NAN),
        number(&out, "restore_ms=").ok_or(format!("no restore time: {out}"))?,
        snap["tracking_on_pause_ms"].as_f64().unwrap_or(f64::NAN),
    ])
}

/// The outcome of one QEMU run: (migrate ms, downtime ms as QEMU reports it) once the
/// migration completed, and the restore's ms or why it failed.
type QemuRun = ((f64, f64), Result<f64, String>);

/// QEMU microvm: `migrate` to a file (HMP on a fifo), then `-incoming` from it until the
/// agent answers. `stopped`: the guest is stopped first (`stop`), so the file holds one
/// pass over memory and the restored guest is started with `cont` once loaded; else the
/// migration is live (QEMU's pre-copy rounds; its downtime is the last round).
fn qemu_snapshot(host: &KvmHost, mib: u64, stopped: bool) -> Result<QemuRun, String> {
    let qemu = |console: &str, extra: &str| {
        format!(
            "qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m {mib} -smp 1 \
             -nodefaults -no-user-config -display none -serial file:{console} \
             -kernel guest/vmlinux -initrd guest/initrd.img \
             -append 'console=ttyS0 reboot=t acpi=off panic=-1 mcvmm.ip=10.99.0.2/24' \
             -netdev tap,id=n0,ifname=gtap,script=no,downscript=no \
             -device virtio-net-device,netdev=n0,mac=52:54:00:12:34:56 {extra}"
        )
    };
    let out = run(
        host,
        &format!(
            "ip netns del q 2>/dev/null || true
             ip netns add q; ip netns exec q ip link set lo up
             ip netns exec q ip tuntap add dev gtap mode tap
             ip netns exec q ip addr add 10.99.0.1/24 dev gtap; ip netns exec q ip link set gtap up
             rm -f mon.in mon.out mon2.in; mkfifo mon.in mon2.in
             ip netns exec q {first} -monitor stdio <mon.in >mon.out 2>&1 &
             qpid=$!
             exec 3>mon.in
             a='ip netns exec q ./agentctl --addr 10.99.0.2:7000'
             $a --wait 90 ping >/dev/null
             $a mem-start {load} 0 >/dev/null
             $a status | grep boot_id
             sleep 2
             t0=$(cut -d' ' -f1 /proc/uptime)
             {stop}
             echo 'migrate \"exec:cat > q.mig\"' >&3
             # A live migration of a guest that keeps writing may not converge before
             # the file fills the test host's memory (seen at 2 GiB): it fails.
             i=0; until grep -q 'Migration status: completed' mon.out; do
               i=$((i + 1))
               if [ $i -gt 6000 ] || grep -q 'Migration status: failed' mon.out; then
                 grep -a -m3 -e error -e failed mon.out
                 kill -9 $qpid; wait $qpid 2>/dev/null || true; ip netns del q; rm -f q.mig; exit 1
               fi
               echo 'info migrate' >&3; sleep 0.1; done
             t1=$(cut -d' ' -f1 /proc/uptime)
             awk -v a=$t0 -v b=$t1 'BEGIN {{ printf \"migrate_ms=%d\\n\", (b - a) * 1000 }}'
             grep -m1 '^downtime' mon.out || true
             echo \"file_bytes=$(stat -c %s q.mig)\"
             echo quit >&3; exec 3>&-; wait $qpid 2>/dev/null || true
             t2=$(cut -d' ' -f1 /proc/uptime)
             ip netns exec q {second} -incoming 'exec:cat q.mig' <mon2.in >q2.out 2>&1 &
             qpid=$!
             exec 4>mon2.in
             # Loaded once its status is no longer 'inmigrate'; a guest stopped at the
             # migration stays paused until told to go on.
             i=0; while :; do
               echo 'info status' >&4; sleep 0.05
               last=$(tr -d '\\033' <q2.out | grep -a 'VM status' | tail -1)
               case \"$last\" in *inmigrate*) ;; *'VM status'*) break ;; esac
               i=$((i + 1)); [ $i -gt 2400 ] && break
             done
             case \"$last\" in *paused*) echo cont >&4 ;; esac
             # The migration's figures stand even if the restore fails (seen in the lab).
             if $a --wait 120 ping >/dev/null; then
               t3=$(cut -d' ' -f1 /proc/uptime)
               $a status | grep boot_id || true
               $a mem-verify || true
               awk -v c=$t2 -v d=$t3 'BEGIN {{ printf \"restore_ms=%d\\n\", (d - c) * 1000 }}'
             else
               echo \"restore failed: the agent did not answer ($last)\"; tail -5 q.console
             fi
             exec 4>&-; kill -9 $qpid; wait $qpid 2>/dev/null || true
             ip netns del q; rm -f q.mig mon.in mon.out mon2.in",
            first = qemu("q.console", ""),
            second = qemu("q2.console", "-monitor stdio"),
            load = (mib / 4).min(256),
            stop = if stopped { "echo stop >&3" } else { "" },
        ),
        900,
    )?;
    let migrate = number(&out, "migrate_ms=").ok_or(format!("no migrate time: {out}"))?;
    let downtime = number(&out, "downtime:").unwrap_or(f64::NAN);
    eprintln!(
        "  QEMU {mib} MiB ({}): file of {} MB",
        if stopped { "stopped" } else { "live" },
        number(&out, "file_bytes=").unwrap_or(f64::NAN) / 1e6
    );
    let boots: Vec<&str> = out.lines().filter(|l| l.starts_with("boot_id=")).collect();
    let restored = if out.contains("restore failed") {
        Err(format!(
            "QEMU: the guest after -incoming did not answer: {out}"
        ))
    } else if boots.len() != 2 || boots[0] != boots[1] {
        Err(format!(
            "QEMU: the guest after -incoming is not the one migrated: {out}"
        ))
    } else if !out.contains(" errors=0") {
        Err(format!("QEMU: memory did not verify after restore: {out}"))
    } else {
        number(&out, "restore_ms=").ok_or(format!("no restore time: {out}"))
    };
    Ok(((migrate, downtime), restored))
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("mcvmm-bench-checkpoint: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let mut epochs = 50u32;
    let mut snapshots_only = false;
    let mut epochs_only = false;
    let mut legacy_too = true;
    let mut out_path = mcvmm_tests::repo_root().join("bench-results/checkpoint.json");
    let mut args = std::env::args().skip(1).peekable();
    while let Some(a) = args.next() {
        if a == "--snapshots-only" {
            snapshots_only = true;
            continue;
        }
        if a == "--epochs-only" {
            epochs_only = true;
            continue;
        }
        if a == "--no-legacy" {
            legacy_too = false;
            continue;
        }
        match (a.as_str(), args.next()) {
            ("--epochs", Some(v)) => {
                epochs = v
                    .parse()
                    .map_err(|_| format!("--epochs {v}: not a number"))?
            }
            ("--out", Some(v)) => out_path = v.into(),
            _ => {
                return Err(
                    "usage: mcvmm-bench-checkpoint [--epochs N] [--snapshots-only | --epochs-only] [--no-legacy] [--out FILE]"
                        .into(),
                )
            }
        }
    }
    // Room for a 2 GiB guest, its snapshot file (the test host's disk is its RAM) and QEMU.
    let new_host = || {
        mcvmm_tests::guest_host(&HostOptions {
            cpus: 2,
            mem_mib: 7168,
            with_qemu: true,
            ..HostOptions::default()
        })
    };
    let host = new_host()?;
    eprintln!("mcvmm-bench-checkpoint: on {}", host.describe());

    // Dirty-set sizes: idle, then 1k, 10k and 50k pages per epoch. The 10k and 50k rows
    // run longer epochs (and fewer of the 50k ones, each pause copying 200 MB).
    let long = |pages: u64| pages * 1000 / LONG_EPOCH_RATE;
    let per_sec = 1000 / EPOCH_MS;
    let mut rows = Vec::new();
    // The pause spins for the vCPUs to stop; "(sleeps)" rows wait on a condition
    // variable instead, to show what the spin saves.
    let targets = [
        ("idle", None, EPOCH_MS, epochs, true),
        ("idle (sleeps)", None, EPOCH_MS, epochs, false),
        ("1k", Some(1_000 * per_sec), EPOCH_MS, epochs, true),
        (
            "1k (sleeps)",
            Some(1_000 * per_sec),
            EPOCH_MS,
            epochs,
            false,
        ),
        ("10k", Some(LONG_EPOCH_RATE), long(10_000), epochs, true),
        (
            "10k (sleeps)",
            Some(LONG_EPOCH_RATE),
            long(10_000),
            epochs,
            false,
        ),
        (
            "50k",
            Some(LONG_EPOCH_RATE),
            long(50_000),
            epochs.min(40),
            true,
        ),
    ];
    let modes: &[bool] = if legacy_too { &[false, true] } else { &[false] };
    let runs = targets
        .into_iter()
        .filter(|_| !snapshots_only)
        .flat_map(|t| modes.iter().map(move |&legacy| (t, legacy)));
    for ((label, rate, epoch_ms, epochs, spin), legacy) in runs {
        let r = epochs_at(&host, rate, epoch_ms, epochs, legacy, spin)?;
        let gbps = r["memcpy_gbps"].as_f64().unwrap_or(f64::NAN);
        let log = r["dirty_log"].as_str().unwrap_or("?").to_string();
        let mut ways = json!({});
        for way in ["all_in_pause", "copy_ahead"] {
            let w = &r[way];
            let pages = w["dirty_pages_per_epoch"]["median"].as_f64().unwrap_or(0.0);
            let copy_bound_us = pages * 4096.0 / (gbps * 1e9) * 1e6;
            let pause = w["pause_us"]["median"].as_f64().unwrap_or(f64::NAN);
            eprintln!(
                "  epochs {label:>4} ({log} log, {way}): {pages:.0} pages/epoch, pause median {pause:.0} µs, memcpy {gbps:.2} GB/s"
            );
            ways[way] = json!({
                "copy_bound_us": copy_bound_us,
                "pause_over_copy_bound": pause / copy_bound_us,
                "target_us": 1.5 * copy_bound_us + 500.0,
            });
        }
        rows.push(json!({
            "target": label,
            "epoch_ms": epoch_ms,
            "epochs": epochs,
            "dirty_log": log,
            "report": r,
            "bounds": ways,
        }));
    }

    let mut snaps = Vec::new();
    // A failed run is reported as such (NaN in the table, the reason in the JSON) so that
    // one flaky measurement does not lose the others.
    let nan = (f64::NAN, f64::NAN, f64::NAN);
    let mut errors = Vec::new();
    let described = host.describe();
    let mut host = Some(host);
    let sizes: &[u64] = if epochs_only { &[] } else { &[256, 2048] };
    for &mib in sizes {
        // Each size in a test host of its own: twice a test host that had run the 256 MiB
        // snapshots (mcvmm's and QEMU's) stopped answering as the 2 GiB guest started,
        // while a fresh one ran the same 2 GiB snapshot in 44 s.
        let host = match host.take() {
            Some(h) => h,
            None => new_host()?,
        };
        let mut mcvmm = |legacy: bool| {
            let m = mcvmm_snapshot(&host, mib, legacy).unwrap_or_else(|e| {
                errors.push(format!("mcvmm {mib} MiB (legacy log {legacy}): {e}"));
                [f64::NAN; 4]
            });
            eprintln!("  snapshot {mib} MiB mcvmm (legacy log {legacy}): {m:?}");
            json!({"snapshot_ms": m[0], "pause_ms": m[1], "restore_ms": m[2], "tracking_on_pause_ms": m[3]})
        };
        let m = mcvmm(false);
        let legacy = legacy_too.then(|| mcvmm(true));
        let mut qemu = |stopped: bool| {
            let how = if stopped { "stopped" } else { "live" };
            let q = match qemu_snapshot(&host, mib, stopped) {
                Ok(((migrate, downtime), restored)) => {
                    let restore = restored.unwrap_or_else(|e| {
                        errors.push(format!("QEMU {mib} MiB restore ({how}): {e}"));
                        f64::NAN
                    });
                    (migrate, downtime, restore)
                }
                Err(e) => {
                    errors.push(format!("QEMU {mib} MiB ({how}): {e}"));
                    nan
                }
            };
            eprintln!("  snapshot {mib} MiB QEMU ({how}): {q:?}");
            json!({"migrate_ms": q.0, "downtime_ms": q.1, "restore_ms": q.2})
        };
        let live = qemu(false);
        let stopped = qemu(true);
        let f = |v: &Value, k: &str| v[k].as_f64().unwrap_or(f64::NAN);
        snaps.push(json!({
            "mem_mib": mib,
            "snapshot_ratio_live": f(&m, "snapshot_ms") / f(&live, "migrate_ms"),
            "snapshot_ratio_stopped": f(&m, "snapshot_ms") / f(&stopped, "migrate_ms"),
            "restore_ratio_live": f(&m, "restore_ms") / f(&live, "restore_ms"),
            "restore_ratio_stopped": f(&m, "restore_ms") / f(&stopped, "restore_ms"),
            "mcvmm": m,
            "mcvmm_legacy_log": legacy,
            "qemu_live": live,
            "qemu_stopped": stopped,
        }));
    }

    println!("\nEpoch pause vs dirty-set size (1 GiB guest, alternate epochs copying all in the pause and most ahead; µs)\n");
    println!("| target | epoch ms × epochs | KVM dirty log | copy | dirty pages/epoch (median) | copied in the pause | pause median | pause p99 | vCPU stop | dirty log | copy | state | resume | ahead, guest running | memcpy GB/s | pause / copy bound | target (1.5×bound+500) |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for row in &rows {
        for (way, name) in [("all_in_pause", "in the pause"), ("copy_ahead", "ahead")] {
            let r = &row["report"][way];
            let m = |k: &str| r[k]["median"].as_f64().unwrap_or(f64::NAN);
            let b = |k: &str| row["bounds"][way][k].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} | {} × {} | {} | {name} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.0} | {:.2} | {:.1} | {:.0} |",
                row["target"].as_str().unwrap_or(""),
                row["epoch_ms"],
                row["epochs"],
                row["dirty_log"].as_str().unwrap_or(""),
                m("dirty_pages_per_epoch"),
                m("pause_pages"),
                m("pause_us"),
                r["pause_us"]["p99"].as_f64().unwrap_or(f64::NAN),
                m("vcpu_stop_us"),
                m("dirty_log_us"),
                m("copy_us"),
                m("state_us"),
                m("resume_us"),
                m("ahead_us"),
                row["report"]["memcpy_gbps"].as_f64().unwrap_or(f64::NAN),
                b("pause_over_copy_bound"),
                b("target_us"),
            );
        }
    }
    println!("\nSnapshot and restore (ms; restore until the agent answers with its memory verified). QEMU live: `migrate` with the guest running (its downtime is the last round); QEMU stopped: `stop` first, the whole migration is downtime; ratios are mcvmm / QEMU\n");
    println!("| guest | mcvmm snapshot | mcvmm pause | mcvmm pause turning the log on | QEMU live migrate | its downtime | QEMU stopped migrate | ratio to live | ratio to stopped | mcvmm restore | QEMU restore, live file | QEMU restore, stopped file | ratio to live | ratio to stopped |");
    println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
    for s in &snaps {
        let f = |a: &str, b: &str| s[a][b].as_f64().unwrap_or(f64::NAN);
        let r = |k: &str| s[k].as_f64().unwrap_or(f64::NAN);
        println!(
            "| {} MiB | {:.0} | {:.1} | {:.1} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} | {:.0} | {:.0} | {:.0} | {:.2} | {:.2} |",
            s["mem_mib"],
            f("mcvmm", "snapshot_ms"),
            f("mcvmm", "pause_ms"),
            f("mcvmm", "tracking_on_pause_ms"),
            f("qemu_live", "migrate_ms"),
            f("qemu_live", "downtime_ms"),
            f("qemu_stopped", "migrate_ms"),
            r("snapshot_ratio_live"),
            r("snapshot_ratio_stopped"),
            f("mcvmm", "restore_ms"),
            f("qemu_live", "restore_ms"),
            f("qemu_stopped", "restore_ms"),
            r("restore_ratio_live"),
            r("restore_ratio_stopped"),
        );
    }
    if legacy_too {
        println!("\nmcvmm's snapshot with the legacy dirty log (turning it on write-protects all RAM in a pause; ms)\n");
        println!("| guest | snapshot | pause | pause turning the log on | restore |");
        println!("|---|---|---|---|---|");
        for s in &snaps {
            let f = |b: &str| s["mcvmm_legacy_log"][b].as_f64().unwrap_or(f64::NAN);
            println!(
                "| {} MiB | {:.0} | {:.1} | {:.1} | {:.0} |",
                s["mem_mib"],
                f("snapshot_ms"),
                f("pause_ms"),
                f("tracking_on_pause_ms"),
                f("restore_ms"),
            );
        }
    }
    let json = json!({
        "host": described,
        "epochs": rows,
        "snapshots": snaps,
        "errors": errors,
    });
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    let text = serde_json::to_string_pretty(&json).map_err(|e| e.to_string())?;
    std::fs::write(&out_path, text).map_err(|e| format!("{}: {e}", out_path.display()))?;
    eprintln!("mcvmm-bench-checkpoint: wrote {}", out_path.display());
    Ok(())
}
