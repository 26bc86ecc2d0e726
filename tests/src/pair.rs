//! A protected guest on two lab test hosts joined by the lab network: starting the pair,
//! protecting a guest that took over again with a new secondary on the other host, and
//! talking to the guest's agent from the lab network (this machine, in the lab's
//! namespace). The drill and the replication benchmark build on these.
//!
//! The pair is fenced: each lab gets an etcd on its network ([`crate::etcd`]), and each
//! pair started afresh a guest name of its own, so its generations start at 1; a guest
//! protected again keeps its name.
//!
//! Each host keeps one set of files, named after the role it starts with (`p` on host 0,
//! `s` on host 1: `p.log`, `p.sock`, `p1.img`..., tap `ptap`); the guest moves between the
//! hosts as rounds kill its primary, so after a takeover host 1's `s.sock` is a primary's.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use crate::etcd::Etcd;

use mcvmm_lab::{net, HostOptions, Lab, LabOptions, TestHost};

pub const PRIMARY: usize = 0;
pub const SECONDARY: usize = 1;
/// The file prefix of each host (see above).
pub const NODE: [&str; 2] = ["p", "s"];
const PORT: u16 = 7777;

/// The other host of the pair.
pub fn other(host: usize) -> usize {
    1 - host
}

fn guest_ip() -> Ipv4Addr {
    net::guest_addr(0)
}

pub fn run_ok(host: &TestHost, what: &str, cmd: &str, secs: u64) -> Result<String, String> {
    let out = host
        .run(cmd, Duration::from_secs(secs))
        .map_err(|e| format!("{what}: {e}"))?;
    if !out.success() {
        return Err(format!(
            "{what}: status {}{}\n{}\n{}",
            out.status,
            if out.timed_out { " (timed out)" } else { "" },
            out.stdout_text(),
            out.stderr_text()
        ));
    }
    Ok(out.stdout_text())
}

/// `agentctl` against the guest, from the lab network.
pub fn agentctl(ns: &str, args: &[&str]) -> Command {
    let bin = crate::workspace_command("mcvmm-agentctl");
    let mut c = Command::new("ip");
    c.args(["netns", "exec", ns]).arg(bin.get_program());
    c.args(["--addr", &format!("{}:7000", guest_ip())]);
    c.args(args);
    c
}

pub fn agent(ns: &str, args: &[&str]) -> Result<String, String> {
    let out = agentctl(ns, args)
        .output()
        .map_err(|e| format!("agentctl: {e}"))?;
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if !out.status.success() {
        return Err(format!(
            "agentctl {}: {}{}",
            args.join(" "),
            text,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    Ok(text)
}

/// The number after `key=` in `text` (words separated by white space).
pub fn value(text: &str, key: &str) -> Option<u64> {
    text.split_whitespace()
        .find_map(|w| w.strip_prefix(&format!("{key}=")))
        .and_then(|v| v.parse().ok())
}

/// Each lab's etcd and the name of the guest it runs now, by the lab's namespace.
static FENCES: Mutex<BTreeMap<String, (Etcd, String)>> = Mutex::new(BTreeMap::new());

fn lab_ns(lab: &Lab) -> Result<String, String> {
    lab.net()
        .map(|n| n.ns.clone())
        .ok_or("the lab has no network".into())
}

/// A new guest name for the pair about to start on `lab`; `fenced: false` runs it
/// without the fence.
fn new_guest_name(lab: &Lab, fenced: bool) -> Result<(), String> {
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(1);
    let ns = lab_ns(lab)?;
    let mut fences = FENCES.lock().unwrap_or_else(PoisonError::into_inner);
    let entry = fences.get_mut(&ns).ok_or("the lab has no etcd")?;
    entry.1 = if fenced {
        format!(
            "guest{}",
            SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed)
        )
    } else {
        String::new()
    };
    Ok(())
}

/// The fence flags of the mcvmm on `host`, for the guest the lab runs now (none if it
/// runs unfenced).
pub fn fence_flags(lab: &Lab, host: usize) -> Result<String, String> {
    let ns = lab_ns(lab)?;
    let fences = FENCES.lock().unwrap_or_else(PoisonError::into_inner);
    let (etcd, vm) = fences.get(&ns).ok_or("the lab has no etcd")?;
    if vm.is_empty() {
        return Ok(String::new());
    }
    Ok(etcd.flags(vm, &node_name(host)))
}

/// Host `host`'s node name in the fence.
pub fn node_name(host: usize) -> String {
    format!("host{host}")
}

/// The lab's etcd, to freeze it.
pub fn with_etcd<T>(lab: &Lab, f: impl FnOnce(&Etcd) -> T) -> Result<T, String> {
    let ns = lab_ns(lab)?;
    let fences = FENCES.lock().unwrap_or_else(PoisonError::into_inner);
    fences
        .get(&ns)
        .map(|(e, _)| f(e))
        .ok_or("the lab has no etcd".into())
}

/// Starts a two-host lab with an etcd on its network.
pub fn start_lab(mem_mib: u32) -> Result<Lab, String> {
    let lab = start_lab_hosts(mem_mib)?;
    let ns = lab_ns(&lab)?;
    let etcd = Etcd::start(&ns)?;
    let mut fences = FENCES.lock().unwrap_or_else(PoisonError::into_inner);
    // Labs that are gone (their namespace removed) take their etcd with them.
    fences.retain(|ns, _| std::path::Path::new("/run/netns").join(ns).exists());
    fences.insert(ns, (etcd, String::new()));
    drop(fences);
    Ok(lab)
}

fn start_lab_hosts(mem_mib: u32) -> Result<Lab, String> {
    let images = mcvmm_lab::reference::GuestImages::locate().map_err(|e| e.to_string())?;
    let mut binaries = Vec::new();
    for (name, dest) in [("mcvmm", "mcvmm"), ("mcvmm-agentctl", "agentctl")] {
        let bin = mcvmm_lab::assets::workspace_binary(name).map_err(|e| e.to_string())?;
        binaries.push((bin, dest.to_string()));
    }
    crate::start_lab(&LabOptions {
        hosts: 2,
        network: true,
        host: HostOptions {
            mem_mib: mem_mib + 768,
            files: images.files(),
            binaries,
            ..HostOptions::default()
        },
    })
    .map_err(|e| format!("starting the lab: {e}"))
}

/// Starts a secondary on `host`, listening on its lab address, with its three disks:
/// fresh ones, or those a killed mcvmm of this host left (then the initial sync sends
/// only the chunks that differ). The previous log is kept as `.prev.log`. Returns once
/// it listens, with the seconds that took.
pub fn start_secondary(lab: &Lab, host: usize, fresh_disks: bool) -> Result<String, String> {
    start_secondary_with(lab, host, fresh_disks, "")
}

/// [`start_secondary`] with more flags for `mcvmm run --secondary`.
pub fn start_secondary_with(
    lab: &Lab,
    host: usize,
    fresh_disks: bool,
    extra: &str,
) -> Result<String, String> {
    let n = NODE[host];
    let ip = net::host_addr(host);
    let env = vmm_env();
    let extra = format!("{} {extra}", fence_flags(lab, host)?);
    let disks = if fresh_disks {
        format!("rm -f {n}1.img {n}2.img {n}3.img; truncate -s 32M {n}1.img {n}2.img {n}3.img")
    } else {
        format!("for d in {n}1.img {n}2.img {n}3.img; do [ -f $d ] || truncate -s 32M $d; done")
    };
    run_ok(
        lab.host(host),
        "starting the secondary",
        &format!(
            "{disks}
             mv -f {n}.log {n}.prev.log 2>/dev/null
             ip link del {n}tap 2>/dev/null; ip tuntap add dev {n}tap mode tap
             ip link set {n}tap master br0 up
             t0=$(cut -d' ' -f1 /proc/uptime)
             {env}./mcvmm run --secondary --listen {ip}:{PORT} --disk {n}1.img --disk {n}2.img \
                 --disk {n}3.img --tap {n}tap --serial {n}.console --api-sock {n}.sock {extra} >{n}.log 2>&1 &
             echo $! >{n}.pid
             # Its control socket answers once it listens for a primary.
             i=0
             until ./mcvmm ctl --api-sock {n}.sock status >/dev/null 2>&1; do
               i=$((i+1))
               if [ $i -gt 300 ] || ! kill -0 $(cat {n}.pid) 2>/dev/null; then echo 'the secondary did not come up'; cat {n}.log; exit 1; fi
               sleep 0.1
             done
             t1=$(cut -d' ' -f1 /proc/uptime)
             echo \"$t1 $t0\" | awk '{{print $1-$2}}'"
        ),
        45,
    )
    .map(|up| up.trim().to_string())
}

/// Shell lines that wait (100 s at most) until the mcvmm of node `n` reports the guest
/// protected.
fn wait_protected_script(n: &str) -> String {
    format!(
        "end=$(( $(cut -d. -f1 /proc/uptime) + 100 ))
         until ./mcvmm ctl --api-sock {n}.sock status 2>/dev/null | grep -q '\"protected\": true'; do
           if [ $(cut -d. -f1 /proc/uptime) -gt $end ]; then echo 'not protected in 100 s'; ./mcvmm ctl --api-sock {n}.sock status; cat {n}.log; exit 1; fi
           if ! kill -0 $(cat {n}.pid) 2>/dev/null; then echo 'the primary ended'; cat {n}.log; exit 1; fi
           sleep 0.2
         done"
    )
}

/// What the secondary on `host` said, for an error that involves it.
fn secondary_log(lab: &Lab, host: usize) -> String {
    let n = NODE[host];
    lab.host(host)
        .run(
            &format!("cat {n}.log; tail -5 {n}.console"),
            Duration::from_secs(10),
        )
        .map(|o| o.stdout_text())
        .unwrap_or_default()
}

/// Starts the secondary, then the primary, waits until the guest is protected.
/// `extra`: more flags for the primary.
pub fn start_pair(lab: &Lab, mem_mib: u32, extra: &str) -> Result<(), String> {
    start_pair_with(lab, mem_mib, extra, "", true)
}

/// [`start_pair`] with flags for each side (`extra` for the primary, `secondary_extra`
/// for the secondary), fenced or not.
pub fn start_pair_with(
    lab: &Lab,
    mem_mib: u32,
    extra: &str,
    secondary_extra: &str,
    fenced: bool,
) -> Result<(), String> {
    start_pair_on(lab, mem_mib, extra, secondary_extra, fenced, true)
}

/// [`start_pair_with`], the secondary on fresh disks or on those its host has (any
/// missing one made).
pub fn start_pair_on(
    lab: &Lab,
    mem_mib: u32,
    extra: &str,
    secondary_extra: &str,
    fenced: bool,
    fresh_secondary_disks: bool,
) -> Result<(), String> {
    let sec_ip = net::host_addr(SECONDARY);
    new_guest_name(lab, fenced)?;
    let extra = format!("{} {extra}", fence_flags(lab, PRIMARY)?);
    start_secondary_with(lab, SECONDARY, fresh_secondary_disks, secondary_extra)?;
    run_ok(
        lab.host(PRIMARY),
        "starting the primary",
        &format!(
            "{}
             {}",
            start_primary_script(
                mem_mib,
                &format!("--primary --peer {sec_ip}:{PORT} {extra}")
            ),
            wait_protected_script(NODE[PRIMARY])
        ),
        150,
    )
    .map_err(|e| format!("{e}\nsecondary log:\n{}", secondary_log(lab, SECONDARY)))?;
    Ok(())
}

/// The guest runs unprotected on `host` (it took over there): a new secondary on the
/// other host, `mcvmm ctl protect` to it, and the wait until the guest is protected.
/// Returns the primary's line about the initial sync.
pub fn protect_again(lab: &Lab, host: usize) -> Result<String, String> {
    let to = other(host);
    let up = start_secondary(lab, to, false)?;
    let n = NODE[host];
    let to_ip = net::host_addr(to);
    run_ok(
        lab.host(host),
        "protecting the guest again",
        &format!(
            "t0=$(cut -d' ' -f1 /proc/uptime)
             ./mcvmm ctl --api-sock {n}.sock protect {to_ip}:{PORT} | grep -q '\"ok\": true' || {{ ./mcvmm ctl --api-sock {n}.sock status; tail -20 {n}.log; exit 1; }}
             t1=$(cut -d' ' -f1 /proc/uptime)
             {}
             t2=$(cut -d' ' -f1 /proc/uptime)
             sed -n '/protecting the guest: connecting/,$p' {n}.log | grep -v '^mcvmm: sync ' | head -4
             echo \"accepted in $(echo \"$t1 $t0\" | awk '{{print $1-$2}}') s, protected $(echo \"$t2 $t1\" | awk '{{print $1-$2}}') s later; $(grep 'initial sync done' {n}.log | tail -1 | sed 's/^mcvmm: //')\"",
            wait_protected_script(n)
        ),
        150,
    )
    .map(|out| format!("secondary up in {up} s, {}", out.trim().replace('\n', " | ")))
    .map_err(|e| format!("{e}\nnew secondary's log:\n{}", secondary_log(lab, to)))
}

/// Ends whatever a failed start left on both hosts.
pub fn clean(lab: &Lab) {
    for (h, p) in [(PRIMARY, NODE[PRIMARY]), (SECONDARY, NODE[SECONDARY])] {
        let _ = lab.host(h).run(
            &format!(
                "kill -9 $(cat {p}.pid) 2>/dev/null; sleep 0.2; rm -f {p}1.img {p}2.img {p}3.img; ip link del {p}tap 2>/dev/null; true"
            ),
            Duration::from_secs(20),
        );
    }
}

/// Settings of mcvmm's own that a run on this machine hands on to the test hosts' mcvmm
/// (`MCVMM_DIRTY_LOG`, to compare the dirty log's modes in the lab), as shell assignments.
pub fn vmm_env() -> String {
    ["MCVMM_DIRTY_LOG"]
        .iter()
        .filter_map(|k| std::env::var(k).ok().map(|v| format!("{k}={v} ")))
        .filter(|a| {
            a.chars()
                .all(|c| c.is_ascii_alphanumeric() || "_= ".contains(c))
        })
        .collect()
}

/// Shell lines (for the primary's host) that start the guest in the background with
/// three fresh disks and a tap on the lab bridge; `flags` go to `mcvmm run`.
fn start_primary_script(mem_mib: u32, flags: &str) -> String {
    format!(
        "rm -f p1.img p2.img p3.img; truncate -s 32M p1.img p2.img p3.img
         mv -f p.log p.prev.log 2>/dev/null
         ip link del ptap 2>/dev/null; ip tuntap add dev ptap mode tap
         ip link set ptap master br0 up
         {}./mcvmm run --kernel guest/vmlinux --initrd guest/initrd.img --mem-mib {mem_mib} \\
             --cmdline 'panic=-1 mcvmm.ip={}/{}' --disk p1.img --disk p2.img --disk p3.img \\
             --tap ptap --serial p.console --api-sock p.sock {flags} >p.log 2>&1 &
         echo $! >p.pid",
        vmm_env(),
        guest_ip(),
        net::SUBNET_PREFIX
    )
}

/// The same guest on the primary's host without protection (the baseline).
pub fn start_standalone(lab: &Lab, mem_mib: u32) -> Result<(), String> {
    new_guest_name(lab, true)?;
    run_ok(
        lab.host(PRIMARY),
        "starting the unprotected guest",
        &start_primary_script(mem_mib, &fence_flags(lab, PRIMARY)?),
        30,
    )?;
    Ok(())
}
