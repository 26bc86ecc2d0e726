//! The reference VMM: QEMU `-M microvm` with KVM inside a test host, booting the test
//! guest. It proves the lab and the guest image work end to end, and it is the side-by-side
//! baseline for mcvmm's benchmarks (same kernel, same initrd, same test host).

use std::net::Ipv4Addr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use mcvmm_guest::client::AgentClient;
use mcvmm_guest::records;

use crate::host::{HostOptions, TestHost};
use crate::{net, Lab, LabError, LabOptions};

/// The test guest's files, as `guest-images/build.sh` leaves them.
#[derive(Debug, Clone)]
pub struct GuestImages {
    pub vmlinux: PathBuf,
    pub bzimage: PathBuf,
    pub initrd: PathBuf,
}

impl GuestImages {
    pub fn locate() -> Result<GuestImages, LabError> {
        let out = std::env::var_os("MCVMM_GUEST_IMAGES")
            .map(PathBuf::from)
            .unwrap_or_else(|| crate::assets::workspace_root().join("guest-images/out"));
        let images = GuestImages {
            vmlinux: out.join("vmlinux"),
            bzimage: out.join("bzImage"),
            initrd: out.join("initrd.img"),
        };
        for p in [&images.vmlinux, &images.bzimage, &images.initrd] {
            if !p.is_file() {
                return Err(LabError::Check(format!(
                    "{} missing: run guest-images/build.sh",
                    p.display()
                )));
            }
        }
        Ok(images)
    }

    /// (local file, path in a test host) for `HostOptions::files`.
    pub fn files(&self) -> Vec<(PathBuf, String)> {
        vec![
            (self.vmlinux.clone(), "guest/vmlinux".into()),
            (self.bzimage.clone(), "guest/bzImage".into()),
            (self.initrd.clone(), "guest/initrd.img".into()),
        ]
    }
}

/// One QEMU microvm guest inside a test host.
#[derive(Debug, Clone)]
pub struct QemuGuest {
    /// Prefix of this guest's files in the host's /work: `NAME.log`, `NAME.pid`.
    pub name: String,
    pub mem_mib: u32,
    pub cpus: u32,
    pub disk: Option<String>,
    /// (tap to create and add to br0, guest address on the lab network)
    pub net: Option<(String, Ipv4Addr)>,
}

/// The test host's clock in hundredths of a second, for a shell command (busybox's date
/// has no subsecond format).
const NOW_CS: &str = "$(awk '{ printf \"%d\", $1 * 100 }' /proc/uptime)";

impl QemuGuest {
    /// Shell commands (for a test host) that start the guest in the background and wait
    /// for its ready line; they print `ready_ms=N`, measured inside the test host. The
    /// limit is by the test host's clock, not a count of polls: each poll costs tens of
    /// milliseconds in a nested test host, and a counted limit outlasted the caller's.
    pub fn start_script(&self, ready_timeout_s: u32) -> String {
        let n = &self.name;
        // reboot=t: QEMU's microvm has no i8042, so with reboot=k the kernel falls through
        // its slow reset methods (measured 5 s to over 60 s in a test host); the triple
        // fault ends it in 0.2 s. mcvmm emulates the i8042 and its guests use reboot=k.
        let mut append = "console=ttyS0 reboot=t panic=-1 acpi=off".to_string();
        let mut args = format!(
            "-M microvm,acpi=off -accel kvm -cpu host -m {} -smp {} -nodefaults -no-user-config \
             -display none -no-reboot -serial file:{n}.log -kernel guest/vmlinux -initrd guest/initrd.img",
            self.mem_mib, self.cpus
        );
        let mut setup = String::new();
        if let Some(disk) = &self.disk {
            args += &format!(
                " -drive id=d0,file={disk},format=raw,if=none \
                 -device virtio-blk-device,drive=d0"
            );
        }
        if let Some((tap, addr)) = &self.net {
            setup +=
                &format!("ip tuntap add dev {tap} mode tap && ip link set {tap} master br0 up && ");
            args += &format!(
                " -netdev tap,id=n0,ifname={tap},script=no,downscript=no -device virtio-net-device,netdev=n0"
            );
            append += &format!(" mcvmm.ip={addr}/{}", net::SUBNET_PREFIX);
        }
        format!(
            "set -e; rm -f {n}.log; {setup}\
             t0=$(cut -d' ' -f1 /proc/uptime); \
             qemu-system-x86_64 {args} -append '{append}' >{n}.qemu.log 2>&1 & echo $! > {n}.pid; \
             end=$(( {now_cs} + {limit_cs} )); \
             until grep -q 'mcvmm-guest: ready' {n}.log 2>/dev/null; do \
               if ! kill -0 $(cat {n}.pid) 2>/dev/null; then echo 'qemu exited:'; cat {n}.qemu.log; tail -40 {n}.log; exit 1; fi; \
               if [ {now_cs} -gt $end ]; then \
                 echo 'guest not ready in time:'; tail -20 {n}.log; kill -9 $(cat {n}.pid); exit 1; fi; \
               sleep 0.02; done; \
             t1=$(cut -d' ' -f1 /proc/uptime); \
             awk -v a=$t0 -v b=$t1 'BEGIN {{ printf \"ready_ms=%d\\n\", (b-a)*1000 }}'",
            limit_cs = ready_timeout_s * 100,
            now_cs = NOW_CS,
        )
    }

    /// Waits (in the host) for the guest's QEMU to exit; fails after `timeout_s` by the
    /// test host's clock.
    pub fn wait_exit_script(&self, timeout_s: u32) -> String {
        format!(
            "pid=$(cat {n}.pid); end=$(( {now_cs} + {limit_cs} )); \
             while kill -0 $pid 2>/dev/null; do \
               if [ {now_cs} -gt $end ]; then echo 'guest still running'; exit 1; fi; \
               sleep 0.05; done",
            n = self.name,
            limit_cs = timeout_s * 100,
            now_cs = NOW_CS,
        )
    }
}

/// What the reference proof measured.
#[derive(Debug, Clone)]
pub struct ProofReport {
    pub host_boot: Duration,
    pub guest_ready_ms: u64,
    pub records: u64,
    pub records_per_sec: f64,
    pub end_to_exit: Duration,
}

/// Item 5 of the lab issue, end to end: in a test host, QEMU boots the test guest with a
/// virtio-mmio disk and a tap NIC on the lab network; a client on the lab network performs
/// acknowledged writes through the agent, asks the guest to end, and the disk file the
/// host kept is checked to hold every acknowledged record.
pub fn proof(records_count: u64, log: &mut dyn FnMut(&str)) -> Result<ProofReport, LabError> {
    let images = GuestImages::locate()?;
    log("booting a test host on a lab network");
    let lab = Lab::start(&LabOptions {
        hosts: 1,
        network: true,
        host: HostOptions {
            with_qemu: true,
            files: images.files(),
            ..HostOptions::default()
        },
    })?;
    let host = lab.host(0);
    log(&format!(
        "{} up in {:.1} s with /dev/kvm",
        host.name,
        host.boot_time.as_secs_f64()
    ));
    let guest_addr = net::guest_addr(0);
    let guest = QemuGuest {
        name: "ref".into(),
        mem_mib: 256,
        cpus: 1,
        disk: Some("disk.img".into()),
        net: Some(("gtap0".into(), guest_addr)),
    };
    check(host, "truncate -s 8M disk.img", 10)?;
    let out = check(host, &guest.start_script(60), 90)?;
    let ready_ms = out
        .lines()
        .find_map(|l| l.strip_prefix("ready_ms="))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    log(&format!(
        "QEMU microvm guest ready in {ready_ms} ms (inside the test host)"
    ));

    let run_id = std::process::id() as u64;
    let addr = format!("{guest_addr}:{}", mcvmm_guest::proto::DEFAULT_PORT);
    let net = lab
        .net()
        .ok_or_else(|| LabError::Check("lab has no network".into()))?;
    let client = net.run_inside(move || -> Result<(Duration, Instant), String> {
        let mut c = AgentClient::connect_retry(&addr, Duration::from_secs(20))
            .map_err(|e| e.to_string())?;
        let start = Instant::now();
        for seq in 0..records_count {
            c.write("vda", records::offset(seq), &records::record(run_id, seq))
                .map_err(|e| format!("record {seq}: {e}"))?;
        }
        let took = start.elapsed();
        c.shutdown().map_err(|e| e.to_string())?;
        Ok((took, Instant::now()))
    })?;
    let (took, asked_to_end) =
        client.map_err(|e| LabError::Check(format!("client on the lab network: {e}")))?;
    let rate = records_count as f64 / took.as_secs_f64().max(1e-9);
    log(&format!(
        "{records_count} acknowledged writes over TCP from the lab network ({rate:.0}/s)"
    ));
    check(host, &guest.wait_exit_script(30), 40)?;
    let end_to_exit = asked_to_end.elapsed();
    log("guest ended (i8042 reset); checking the disk file in the test host");
    let disk = host.get("disk.img")?;
    let missing = records::missing(&disk, run_id, records_count);
    if !missing.is_empty() {
        return Err(LabError::Check(format!(
            "{} acknowledged records missing from the disk file, first {:?}",
            missing.len(),
            &missing[..missing.len().min(10)]
        )));
    }
    log(&format!(
        "all {records_count} acknowledged records are in the disk file"
    ));
    Ok(ProofReport {
        host_boot: host.boot_time,
        guest_ready_ms: ready_ms,
        records: records_count,
        records_per_sec: rate,
        end_to_exit,
    })
}

/// Runs a command that must succeed; its output, or an error with both streams.
pub fn check(host: &TestHost, command: &str, timeout_s: u64) -> Result<String, LabError> {
    let out = host.run(command, Duration::from_secs(timeout_s))?;
    if !out.success() {
        return Err(LabError::Check(format!(
            "in {}: `{}` {}:\n{}{}",
            host.name,
            short(command),
            if out.timed_out {
                "timed out".to_string()
            } else {
                format!("exited {}", out.status)
            },
            out.stdout_text(),
            out.stderr_text()
        )));
    }
    Ok(out.stdout_text())
}

fn short(command: &str) -> String {
    let c: String = command.chars().take(80).collect();
    if c.len() < command.len() {
        c + "…"
    } else {
        c
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// Runs `script` with a `qemu-system-x86_64` on PATH that only sleeps: a guest
    /// that never gets ready and never exits.
    fn with_silent_qemu(test: &str, script: &str) -> (std::process::Output, Duration) {
        let dir = std::env::temp_dir().join(format!("mcvmm-{test}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("temp dir");
        let qemu = dir.join("qemu-system-x86_64");
        std::fs::write(&qemu, "#!/bin/sh\nexec sleep 30\n").expect("fake qemu");
        Command::new("chmod")
            .arg("+x")
            .arg(&qemu)
            .status()
            .expect("chmod");
        let path = format!(
            "{}:{}",
            dir.display(),
            std::env::var("PATH").unwrap_or_default()
        );
        let t0 = Instant::now();
        let out = Command::new("sh")
            .arg("-c")
            .arg(script)
            .current_dir(&dir)
            .env("PATH", path)
            .output()
            .expect("sh");
        let took = t0.elapsed();
        let _ = std::fs::remove_dir_all(&dir);
        (out, took)
    }

    fn bare_guest() -> QemuGuest {
        QemuGuest {
            name: "t".into(),
            mem_mib: 64,
            cpus: 1,
            disk: None,
            net: None,
        }
    }

    #[test]
    fn a_guest_that_never_gets_ready_fails_after_the_limit_and_is_killed() {
        let guest = bare_guest();
        let (out, took) = with_silent_qemu("ready", &guest.start_script(1));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("guest not ready in time"), "{text}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }

    #[test]
    fn waiting_for_a_guest_that_does_not_exit_fails_after_the_limit() {
        let guest = bare_guest();
        let script = format!(
            "qemu-system-x86_64 & echo $! > t.pid; ({}); rc=$?; kill -9 $(cat t.pid); exit $rc",
            guest.wait_exit_script(1)
        );
        let (out, took) = with_silent_qemu("exit", &script);
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!out.status.success(), "{text}");
        assert!(text.contains("guest still running"), "{text}");
        assert!(took < Duration::from_secs(10), "took {took:?}");
    }
}
