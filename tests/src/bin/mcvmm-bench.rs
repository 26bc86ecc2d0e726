//! mcvmm-bench: mcvmm against QEMU `-M microvm`, side by side on one KVM host (a lab test
//! host here), same kernel and initrd. Prints a table and writes JSON.
//!
//! Measured, per VMM:
//! * boot: process start to `mcvmm-guest: ready` on the console (`--runs` times), timed
//!   inside the host with /proc/uptime (10 ms steps) while polling the console every 5 ms;
//! * memory overhead: the VMM's RSS minus the resident part of the guest RAM mapping,
//!   right after boot;
//! * disk: in-guest sequential O_DIRECT write and read of 128 MiB in 1 MiB requests
//!   (`--io-runs` times, 10 by default);
//! * network: request/response latency of 500 PINGs to the agent over the tap.
//!
//! With `--baseline PATH`, a second mcvmm binary (an earlier commit, another build) runs
//! in the same host, alternating with the other two, and the table gains its column and
//! the ratio to it: a change measured side by side, not against another day's lab.
//!
//! Usage: mcvmm-bench [--runs N] [--io-runs N] [--baseline PATH] [--out FILE]

use mcvmm_lab::{HostOptions, KvmHost};
use serde_json::json;

const MEM_MIB: u32 = 256;

#[derive(Clone, Copy, PartialEq)]
enum Vmm {
    Mcvmm,
    Qemu,
    /// The `--baseline` binary, copied into the host as `mcvmm-baseline`.
    Baseline,
}

impl Vmm {
    fn name(self) -> &'static str {
        match self {
            Vmm::Mcvmm => "mcvmm",
            Vmm::Qemu => "qemu",
            Vmm::Baseline => "baseline",
        }
    }

    /// The command line that boots the test guest, console to `log`; with a disk and a
    /// tap named `gtap` when `io` is set (run inside a namespace holding that tap).
    fn command(self, log: &str, io: bool) -> String {
        // Without a NIC the guest must not be told to configure one (init would give up).
        let cmdline = if io {
            "panic=-1 mcvmm.ip=10.99.0.2/24"
        } else {
            "panic=-1"
        };
        match self {
            Vmm::Mcvmm | Vmm::Baseline => {
                let bin = if self == Vmm::Mcvmm {
                    "mcvmm"
                } else {
                    "mcvmm-baseline"
                };
                let mut c = format!(
                    "./{bin} run --kernel guest/vmlinux --initrd guest/initrd.img --mem-mib {MEM_MIB} \
                     --serial {log} --cmdline '{cmdline}'"
                );
                if io {
                    c += " --disk bench.img --tap gtap";
                }
                c
            }
            Vmm::Qemu => {
                let mut c = format!(
                    "qemu-system-x86_64 -M microvm,acpi=off -accel kvm -cpu host -m {MEM_MIB} -smp 1 \
                     -nodefaults -no-user-config -display none -no-reboot -serial file:{log} \
                     -kernel guest/vmlinux -initrd guest/initrd.img \
                     -append 'console=ttyS0 reboot=t acpi=off {cmdline}'"
                );
                if io {
                    c += " -drive id=d0,file=bench.img,format=raw,if=none \
                          -device virtio-blk-device,drive=d0 \
                          -netdev tap,id=n0,ifname=gtap,script=no,downscript=no \
                          -device virtio-net-device,netdev=n0";
                }
                c
            }
        }
    }
}

fn value(text: &str, key: &str) -> Option<f64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|v| v.strip_prefix('=')))
        .and_then(|v| v.parse().ok())
}

fn median(v: &mut [f64]) -> f64 {
    v.sort_by(f64::total_cmp);
    if v.is_empty() {
        return f64::NAN;
    }
    v[v.len() / 2]
}

/// One boot: start time to ready line, then RSS figures; the VMM is killed after.
fn boot_once(host: &KvmHost, vmm: Vmm) -> Result<(f64, f64), String> {
    let script = format!(
        "rm -f boot.log
         t0=$(cut -d' ' -f1 /proc/uptime)
         {cmd} >boot.out 2>&1 &
         pid=$!
         # Given up after 60 s by the clock (looked at every 100 polls: a poll under TCG
         # takes far longer than its 5 ms sleep), with the VMM killed, not left running.
         i=0; until grep -q 'mcvmm-guest: ready' boot.log 2>/dev/null; do
           i=$((i + 1))
           if [ $((i % 100)) = 0 ] && awk -v a=$t0 -v b=$(cut -d' ' -f1 /proc/uptime) 'BEGIN {{ exit !(b - a > 60) }}'; then
             cat boot.out; kill -9 $pid; exit 1
           fi
           sleep 0.005; done
         t1=$(cut -d' ' -f1 /proc/uptime)
         sleep 0.3
         total=$(awk '/^VmRSS:/ {{print $2}}' /proc/$pid/status)
         guest=$(awk -v want={want} '/^[0-9a-f]+-[0-9a-f]+ / {{ins=0}} /^Size:/ {{ins=($2>=want && $2<=want+4096)}} /^Rss:/ {{if (ins) g+=$2}} END {{print g+0}}' /proc/$pid/smaps)
         kill -9 $pid; wait $pid 2>/dev/null
         awk -v a=$t0 -v b=$t1 -v t=$total -v g=$guest 'BEGIN {{ printf \"boot_ms=%d total_kib=%d guest_kib=%d\\n\", (b - a) * 1000, t, g }}'",
        cmd = vmm.command("boot.log", false),
        want = MEM_MIB * 1024,
    );
    let out = mcvmm_tests::run_script(host, &script, 120)?;
    let boot_ms = value(&out, "boot_ms").ok_or(format!("no boot time in {out:?}"))?;
    let total = value(&out, "total_kib").unwrap_or(f64::NAN);
    let guest = value(&out, "guest_kib").unwrap_or(f64::NAN);
    Ok((boot_ms, (total - guest) / 1024.0))
}

/// Disk throughput and network latency with the guest on a disk and a tap.
fn io_once(host: &KvmHost, vmm: Vmm) -> Result<(f64, f64, f64, f64), String> {
    let script = format!(
        "truncate -s 256M bench.img
         ip netns del bench 2>/dev/null || true
         ip netns add bench
         ip netns exec bench ip link set lo up
         ip netns exec bench ip tuntap add dev gtap mode tap
         ip netns exec bench ip addr add 10.99.0.1/24 dev gtap
         ip netns exec bench ip link set gtap up
         ip netns exec bench {cmd} >io.out 2>&1 &
         pid=$!
         a='ip netns exec bench ./agentctl --addr 10.99.0.2:7000'
         $a --wait 60 ping || {{ cat io.out; tail io.log; kill -9 $pid; ip netns del bench; exit 1; }}
         $a latency 500
         $a diskbench vda 128
         kill -9 $pid; wait $pid 2>/dev/null
         ip netns del bench; rm -f bench.img",
        cmd = vmm.command("io.log", true),
    );
    let out = mcvmm_tests::run_script(host, &script, 300)?;
    let get = |k| value(&out, k).ok_or(format!("{k} missing in {out:?}"));
    Ok((
        get("write_mbps")?,
        get("read_mbps")?,
        get("median_us")?,
        get("p99_us")?,
    ))
}

fn io_json(samples: &[(f64, f64, f64, f64)]) -> Vec<serde_json::Value> {
    samples
        .iter()
        .map(|s| json!({"write_mbps": s.0, "read_mbps": s.1, "rtt_median_us": s.2, "rtt_p99_us": s.3}))
        .collect()
}

fn main() {
    if let Err(e) = bench() {
        eprintln!("mcvmm-bench: {e}");
        std::process::exit(1);
    }
}

fn bench() -> Result<(), String> {
    let mut runs = 10usize;
    // The issue asks ten runs of each measure; the round trip, noisier than the rest
    // (one guest's medians ranged 2.8-3.8 ms between connections), needs them most.
    let mut io_runs = 10usize;
    let mut baseline: Option<std::path::PathBuf> = None;
    let mut out_path = mcvmm_tests::repo_root().join("bench-results/vmm.json");
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        match (a.as_str(), args.next()) {
            ("--runs", Some(v)) => {
                runs = v.parse().map_err(|_| format!("--runs {v}: not a number"))?
            }
            ("--io-runs", Some(v)) => {
                io_runs = v
                    .parse()
                    .map_err(|_| format!("--io-runs {v}: not a number"))?
            }
            ("--baseline", Some(v)) => baseline = Some(v.into()),
            ("--out", Some(v)) => out_path = v.into(),
            _ => {
                return Err(
                    "usage: mcvmm-bench [--runs N] [--io-runs N] [--baseline PATH] [--out FILE]"
                        .into(),
                )
            }
        }
    }
    let mut vmms = vec![Vmm::Mcvmm, Vmm::Qemu];
    if let Some(path) = &baseline {
        if !path.is_file() {
            return Err(format!("--baseline {}: no such file", path.display()));
        }
        vmms.push(Vmm::Baseline);
    }
    let setup = || -> Result<KvmHost, String> {
        // As many vCPUs as this machine has cores: with 4 on 2 cores a test host stopped
        // answering its lab daemon for 30 s in the middle of a run.
        let host = mcvmm_tests::guest_host(&HostOptions {
            cpus: 2,
            with_qemu: true,
            ..HostOptions::default()
        })?;
        if let Some(path) = &baseline {
            host.put_binary(path, "mcvmm-baseline")
                .map_err(|e| e.to_string())?;
        }
        Ok(host)
    };
    let mut host = setup()?;
    let mut lost = 0;
    // After a failed run: a test host that died (seen under this lab's load, with either
    // VMM) is replaced, so the runs after it still count.
    let mut revive = |host: &mut KvmHost| -> Result<(), String> {
        let alive = host
            .run("true", std::time::Duration::from_secs(20))
            .is_ok_and(|o| o.success());
        if alive {
            return Ok(());
        }
        // A fresh test host sometimes fails to come up too (seen: not up within 60 s, then
        // the next attempt fine); that counts as one more lost.
        loop {
            lost += 1;
            if lost > 3 {
                return Err("lost more than 3 test hosts; giving up".into());
            }
            eprintln!("  the test host is gone; starting a fresh one");
            match setup() {
                Ok(fresh) => {
                    *host = fresh;
                    return Ok(());
                }
                Err(e) => eprintln!("  starting a fresh test host: {e}"),
            }
        }
    };
    eprintln!(
        "mcvmm-bench: on {}; {runs} boots per VMM, alternating",
        host.describe()
    );

    // A failed run is logged and left out (the JSON lists it), so that one flaky boot in
    // the lab does not lose the others; the medians say how many runs they are over.
    let mut errors = Vec::new();
    let mut boot = vec![Vec::new(); vmms.len()];
    let mut overhead = vec![Vec::new(); vmms.len()];
    // Each round starts with the next VMM, so that no VMM always runs right after the
    // same other one, or first.
    let n = vmms.len();
    let rotation = |r: usize| (0..n).map(move |k| (k + r) % n);
    for r in 0..runs {
        for i in rotation(r) {
            let vmm = vmms[i];
            match boot_once(&host, vmm) {
                Ok((ms, over)) => {
                    eprintln!(
                        "  boot {r:2} {:5}: {ms:7.1} ms, overhead {over:5.1} MiB",
                        vmm.name()
                    );
                    boot[i].push(ms);
                    overhead[i].push(over);
                }
                Err(e) => {
                    eprintln!("  boot {r:2} {:5}: FAILED: {e}", vmm.name());
                    errors.push(format!("boot {r} {}: {e}", vmm.name()));
                    revive(&mut host)?;
                }
            }
        }
    }
    // The first disk writes in a test host are slow whichever VMM makes them (about 0.6
    // of every later run's, QEMU's included): one I/O run first, not counted.
    match io_once(&host, vmms[0]) {
        Ok(s) => eprintln!("  io warm-up (not counted): write {:.0} MB/s", s.0),
        Err(e) => {
            eprintln!("  io warm-up: FAILED: {e}");
            revive(&mut host)?;
        }
    }
    let mut io = vec![Vec::new(); vmms.len()];
    for r in 0..io_runs {
        for i in rotation(r) {
            let vmm = vmms[i];
            match io_once(&host, vmm) {
                Ok(s) => {
                    eprintln!(
                        "  io   {r:2} {:5}: write {:.0} MB/s, read {:.0} MB/s, rtt median {:.0} µs p99 {:.0} µs",
                        vmm.name(),
                        s.0,
                        s.1,
                        s.2,
                        s.3
                    );
                    io[i].push(s);
                }
                Err(e) => {
                    eprintln!("  io   {r:2} {:5}: FAILED: {e}", vmm.name());
                    errors.push(format!("io {r} {}: {e}", vmm.name()));
                    revive(&mut host)?;
                }
            }
        }
    }
    let io_median = |i: usize, f: fn(&(f64, f64, f64, f64)) -> f64| {
        let mut v: Vec<f64> = io[i].iter().map(f).collect();
        median(&mut v)
    };
    let per_vmm = |f: &dyn Fn(usize) -> f64| -> Vec<f64> { (0..vmms.len()).map(f).collect() };
    let rows: Vec<(&str, Vec<f64>, &str)> = vec![
        (
            "boot to ready, median (ms)",
            per_vmm(&|i| median(&mut boot[i].clone())),
            "≤ 0.7",
        ),
        (
            "VMM memory overhead, median (MiB)",
            per_vmm(&|i| median(&mut overhead[i].clone())),
            "≤ 5 MiB",
        ),
        (
            "disk sequential write (MB/s)",
            per_vmm(&|i| io_median(i, |s| s.0)),
            "≥ 1",
        ),
        (
            "disk sequential read (MB/s)",
            per_vmm(&|i| io_median(i, |s| s.1)),
            "≥ 1",
        ),
        (
            "TCP request/response median (µs)",
            per_vmm(&|i| io_median(i, |s| s.2)),
            "≤ 1",
        ),
        (
            "TCP request/response p99 (µs)",
            per_vmm(&|i| io_median(i, |s| s.3)),
            "≤ 1",
        ),
    ];
    let with_baseline = vmms.len() > 2;
    if with_baseline {
        println!(
            "| measure | mcvmm | QEMU microvm | mcvmm/QEMU | target | baseline | mcvmm/baseline |"
        );
        println!("|---|---|---|---|---|---|---|");
    } else {
        println!("| measure | mcvmm | QEMU microvm | mcvmm/QEMU | target |");
        println!("|---|---|---|---|---|");
    }
    for (name, v, target) in &rows {
        let (m, q) = (v[0], v[1]);
        print!("| {name} | {m:.1} | {q:.1} | {:.2} | {target} |", m / q);
        if with_baseline {
            print!(" {:.1} | {:.2} |", v[2], m / v[2]);
        }
        println!();
    }
    let by_vmm = |f: &dyn Fn(usize) -> serde_json::Value| -> serde_json::Value {
        vmms.iter()
            .enumerate()
            .map(|(i, v)| (v.name().to_string(), f(i)))
            .collect::<serde_json::Map<_, _>>()
            .into()
    };
    let json = json!({
        "host": host.describe(),
        "runs": runs,
        "guest_mem_mib": MEM_MIB,
        "baseline": baseline.as_ref().map(|p| p.display().to_string()),
        "errors": errors,
        "boot_ms": by_vmm(&|i| json!(boot[i])),
        "overhead_mib": by_vmm(&|i| json!(overhead[i])),
        "io": by_vmm(&|i| json!(io_json(&io[i]))),
        "summary": rows.iter().map(|(n, v, t)| json!({
            "measure": n,
            "mcvmm": v[0],
            "qemu": v[1],
            "ratio": v[0] / v[1],
            "baseline": v.get(2),
            "ratio_to_baseline": v.get(2).map(|b| v[0] / b),
            "target": t,
        })).collect::<Vec<_>>(),
    });
    if let Some(dir) = out_path.parent() {
        std::fs::create_dir_all(dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    }
    std::fs::write(&out_path, format!("{json:#}\n"))
        .map_err(|e| format!("{}: {e}", out_path.display()))?;
    eprintln!("mcvmm-bench: JSON in {}", out_path.display());
    Ok(())
}
