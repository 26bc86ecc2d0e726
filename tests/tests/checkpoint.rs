//! The checkpoint engine against real guests on real KVM: pause and resume, and the epoch
//! self-check (invariant 1 of DESIGN.md: every page written in an epoch is in its dirty
//! set, whether the guest or the VMM wrote it).

use mcvmm_tests::guest::{one_at_a_time, report, script};
use serde_json::Value;

#[test]
fn pause_stops_the_guest_and_resume_lets_it_go_on() {
    let _serial = one_at_a_time();
    let out = script(
        "start_guest pr vmlinux 2 128
         agent pr mem-start 16 0
         echo '== pause'; ./mcvmm ctl --api-sock pr.sock pause
         echo '== status'; ./mcvmm ctl --api-sock pr.sock status
         echo '== vcpus'; ./mcvmm ctl --api-sock pr.sock vcpus
         sleep 1
         echo '== resume'; ./mcvmm ctl --api-sock pr.sock resume
         agent pr mem-verify
         stop_guest pr",
    );
    let paused = report(&out, "pause");
    assert_eq!(paused["ok"], true, "{out}");
    assert_eq!(report(&out, "status")["state"], "paused", "{out}");
    // Both vCPUs say where they are: the kernel or the memory workload's user space, in
    // long mode (a cr3 inside the guest's 128 MiB).
    let vcpus = report(&out, "vcpus");
    let vcpus = vcpus["vcpus"].as_array().expect("a vcpus list");
    assert_eq!(vcpus.len(), 2, "{out}");
    let hex = |v: &Value, k: &str| {
        let text = v[k].as_str().unwrap_or("");
        u64::from_str_radix(text.trim_start_matches("0x"), 16).unwrap_or(0)
    };
    for v in vcpus {
        assert_ne!(hex(v, "rip"), 0, "{v}");
        assert!((1..128 << 20).contains(&hex(v, "cr3")), "{v}");
        assert!(v["mp_state"].is_string(), "{v}");
    }
    assert_eq!(report(&out, "resume")["ok"], true, "{out}");
    assert!(out.contains("errors=0"), "{out}");
    assert!(out.contains("mcvmm exit status 0"), "{out}");
}

#[test]
fn every_page_written_shows_in_the_dirty_sets_and_the_check_catches_a_gap() {
    let _serial = one_at_a_time();
    // The guest dirties memory, reads its disk with O_DIRECT (DMA into guest buffers by
    // the VMM) and receives TCP traffic, while 200 epochs are checked against a shadow
    // copy. Leaving the VMM's own writes out must be noticed.
    let out = script(
        "truncate -s 64M sc.img
         start_guest sc vmlinux 1 96 --disk sc.img
         agent sc mem-start 32 0
         ( while :; do ip netns exec sc ./agentctl --addr 10.99.0.2:7000 diskbench vda 2 \
             >>bg.log 2>&1 || echo diskbench failed at $(now_ms) ms >>bg.log; done ) &
         bg=$!
         phase epochs
         echo '== complete'; ./mcvmm ctl --api-sock sc.sock selfcheck 200 40
         # Each pause compares all of memory (about 0.1 s in the lab), so longer epochs
         # let the guest get its disk reads done; they land in an epoch of their own only
         # by chance, so this run is long enough to see some.
         echo '== guest-only'; ./mcvmm ctl --api-sock sc.sock selfcheck 60 300 guest-only
         kill $bg; wait $bg || true
         echo '== disk load'; tail -5 bg.log
         agent sc mem-verify
         stop_guest sc",
    );
    let complete = report(&out, "complete");
    assert_eq!(complete["error"], Value::Null, "{complete:#}");
    assert_eq!(complete["epochs"], 200, "{complete:#}");
    let guest_only = report(&out, "guest-only");
    eprintln!(
        "complete: {} pages in {} s; guest-only: {} pages, {} missing",
        complete["dirty_pages"],
        complete["seconds"],
        guest_only["dirty_pages"],
        guest_only["mismatching_pages"]
    );
    // The guest runs 40 ms between pauses however long a pause takes, so its memory
    // workload and disk reads go on throughout. (When the interval counted from the start
    // of a pause, the lab's 120 ms pauses left the guest all but starved: a few hundred
    // pages in all, and a guest that sometimes did not come back to its network.)
    assert!(
        complete["dirty_pages"].as_u64() > Some(10_000),
        "{complete:#}"
    );
    assert_eq!(complete["mismatching_pages"], 0, "{complete:#}");
    // Half the epochs copied ahead of their pause, as a replicating primary does.
    assert_eq!(complete["copy_ahead"]["epochs"], 100, "{complete:#}");
    assert_eq!(guest_only["epochs"], 60, "{guest_only:#}");
    assert!(
        guest_only["mismatching_pages"].as_u64() > Some(0),
        "without the VMM's own writes the check must find missing pages: {guest_only:#}\n{out}"
    );
    assert!(out.contains("errors=0"), "{out}");
    assert!(out.contains("mcvmm exit status 0"), "{out}");
}

/// `key=value` from the agent's STATUS lines in `out` (the last occurrence).
fn status_text(out: &str, key: &str) -> String {
    out.lines()
        .rev()
        .find_map(|l| l.strip_prefix(&format!("{key}=")))
        .map(|v| v.trim().to_string())
        .unwrap_or_else(|| panic!("no {key}= in:\n{out}"))
}

fn status_value(out: &str, key: &str) -> u64 {
    let text = status_text(out, key);
    text.parse()
        .unwrap_or_else(|_| panic!("{key}={text} is not a number"))
}

fn snapshot_kill_restore(vcpus: u8) {
    let n = format!("rs{vcpus}");
    let out = script(&format!(
        "truncate -s 16M {n}.img; truncate -s 16M {n}b.img; truncate -s 16M {n}c.img
         start_guest {n} vmlinux {vcpus} 128 --disk {n}.img --disk {n}b.img --disk {n}c.img
         agent {n} mem-start 32 2000
         agent {n} records vda 1 100
         # Disk I/O in flight while the snapshot is taken.
         ( while :; do ip netns exec {n} ./agentctl --addr 10.99.0.2:7000 diskbench vdb 2 \
             >/dev/null 2>&1 || true; done ) &
         bg=$!
         sleep 1
         echo '== before'; agent {n} status
         echo '== snapshot'; ./mcvmm ctl --api-sock {n}.sock snapshot {n}.snap
         kill $bg; wait $bg 2>/dev/null || true
         kill_guest {n}
         restore_guest {n} {n}.snap --disk {n}.img --disk {n}b.img --disk {n}c.img
         echo '== after'; agent {n} status
         agent {n} mem-verify
         agent {n} records vdc 2 100
         agent {n} diskbench vdb 2
         stop_guest {n}
         ./agentctl check-records {n}.img 1 100
         ./agentctl check-records {n}c.img 2 100
         rm -rf {n}.snap {n}*.img"
    ));
    assert_eq!(report(&out, "snapshot")["ok"], true, "{out}");
    let before =
        &out[out.find("== before").expect("before")..out.find("== snapshot").expect("snapshot")];
    let after = &out[out.find("== after").expect("after")..];
    assert_eq!(status_value(after, "cpus"), u64::from(vcpus), "{out}");
    assert_eq!(
        status_text(after, "boot_id"),
        status_text(before, "boot_id"),
        "the restored guest is another boot: {out}"
    );
    assert!(
        status_value(after, "requests") > status_value(before, "requests"),
        "the agent's counters did not go on: {out}"
    );
    assert!(
        status_value(after, "uptime_ms") >= status_value(before, "uptime_ms"),
        "{out}"
    );
    assert!(
        out.contains("pages=8192 errors=0"),
        "memory workload after restore: {out}"
    );
    assert!(out.contains("write_mbps="), "disk I/O after restore: {out}");
    assert!(out.contains("all 100 records present"), "{out}");
    assert_eq!(out.matches("all 100 records present").count(), 2, "{out}");
    assert!(out.contains("mcvmm exit status 0"), "{out}");
}

#[test]
fn snapshot_kill_restore_one_vcpu() {
    let _serial = one_at_a_time();
    snapshot_kill_restore(1);
}

#[test]
fn snapshot_kill_restore_four_vcpus() {
    let _serial = one_at_a_time();
    snapshot_kill_restore(4);
}

#[test]
fn an_incremental_chain_restores_the_memory_of_a_full_snapshot_and_bad_snapshots_are_refused() {
    let _serial = one_at_a_time();
    let out = script(
        "truncate -s 16M ic.img
         start_guest ic vmlinux 1 128 --disk ic.img
         agent ic mem-start 32 4000
         ./mcvmm ctl --api-sock ic.sock snapshot c0 >/dev/null
         sleep 1; ./mcvmm ctl --api-sock ic.sock snapshot c1 incremental >/dev/null
         sleep 1; ./mcvmm ctl --api-sock ic.sock snapshot c2 incremental >/dev/null
         sleep 1; ./mcvmm ctl --api-sock ic.sock pause >/dev/null
         echo '== c3'; ./mcvmm ctl --api-sock ic.sock snapshot c3 incremental
         echo '== f3'; ./mcvmm ctl --api-sock ic.sock snapshot f3
         ./mcvmm ctl --api-sock ic.sock resume >/dev/null
         kill_guest ic
         echo \"digest c3 $(grep memory_digest c3/manifest.json)\"
         echo \"digest f3 $(grep memory_digest f3/manifest.json)\"
         restore_guest ic c3 --disk ic.img
         agent ic mem-verify
         kill_guest ic
         refuse() { label=$1; shift
           rm -f refused.sock
           # A snapshot wrongly accepted runs its guest: stopped after 60 s, reported.
           rc=0
           ip netns exec ic timeout 60 ./mcvmm run --restore \"$@\" --tap gtap \
                --serial refused.console --api-sock refused.sock 2>refused.err || rc=$?
           case $rc in 0|124|137|143) echo \"$label: STARTED\";; esac
           [ -e refused.sock ] && echo \"$label: SOCKET LEFT\"
           echo \"$label: $(cat refused.err)\"
         }
         # Copies that share the memory file (hard links) unless they change it: the test
         # host's disk is its RAM.
         variant() { mkdir \"$1\"; cp f3/manifest.json f3/state.json \"$1\"/; }
         variant trunc; head -c 1000 f3/memory > trunc/memory
         refuse truncated trunc --disk ic.img
         rm -rf trunc
         variant flip; cp f3/memory flip/
         printf 'Z' | dd of=flip/memory bs=1 seek=5000 conv=notrunc 2>/dev/null
         refuse corrupted flip --disk ic.img
         rm -rf flip
         variant st; ln f3/memory st/memory
         printf 'Z' | dd of=st/state.json bs=1 seek=100 conv=notrunc 2>/dev/null
         refuse state st --disk ic.img
         variant ver; ln f3/memory ver/memory
         sed -i 's/\"format_version\": [0-9]*/\"format_version\": 99/' ver/manifest.json
         refuse version ver --disk ic.img
         rm -rf st ver
         refuse memory f3 --disk ic.img --mem-mib 256
         refuse vcpus f3 --disk ic.img --vcpus 2
         truncate -s 8M small.img
         refuse disksize f3 --disk small.img
         refuse nodisk f3
         rm c0/memory
         refuse parent c3 --disk ic.img
         rm -rf c0 c1 c2 c3 f3 ic.img small.img
         ip netns del ic",
    );
    let c3 = report(&out, "c3");
    let f3 = report(&out, "f3");
    assert_eq!(c3["kind"], "incremental", "{out}");
    assert!(
        c3["pages"].as_u64() < f3["pages"].as_u64(),
        "an increment holds fewer pages than a full snapshot: {out}"
    );
    let digest = |name: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(&format!("digest {name} ")))
            .map(|d| d.trim().to_string())
            .unwrap_or_else(|| panic!("no digest of {name}: {out}"))
    };
    assert!(digest("c3").contains("memory_digest"), "{out}");
    assert_eq!(
        digest("c3"),
        digest("f3"),
        "chain and full snapshot differ: {out}"
    );
    assert!(
        out.contains("pages=8192 errors=0"),
        "restored from the chain: {out}"
    );
    assert!(
        !out.contains("STARTED"),
        "a bad snapshot was started: {out}"
    );
    assert!(!out.contains("SOCKET LEFT"), "{out}");
    for (label, reason) in [
        ("truncated", "truncated or replaced"),
        ("corrupted", "checksum mismatch"),
        ("state", "checksum mismatch"),
        ("version", "format version 99"),
        (
            "memory",
            "memory: the checkpoint has 128 MiB, this VM 256 MiB",
        ),
        ("vcpus", "vCPUs: the checkpoint has 1, this VM 2"),
        ("disksize", "disk 1: the checkpoint's is 16777216 bytes"),
        ("nodisk", "disks: the checkpoint has 1, this VM 0"),
        ("parent", "c0/memory"),
    ] {
        let line = out
            .lines()
            .find(|l| l.starts_with(&format!("{label}: ")))
            .unwrap_or_else(|| panic!("no {label} line: {out}"));
        assert!(line.contains(reason), "{label}: {line}");
        assert!(!line.contains("panicked"), "{line}");
    }
}
