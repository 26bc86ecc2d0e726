//! Why a test host is stuck: what its kernel reported on the console, and where QEMU's
//! monitor says its CPUs are. Test hosts boot with `nokaslr`, so an address from here
//! resolves against the host's `/proc/kallsyms` (from any healthy test host of the same
//! kernel).

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::time::Duration;

/// Kernel messages that say a CPU or a task has been stuck for far longer than any
/// healthy kernel path takes.
/// The RCU reports' later lines are listed too: a console cut to its last lines may
/// have lost the first.
const STALL_MARKERS: [&str; 6] = [
    "BUG: soft lockup",
    "self-detected stall on CPU",
    "detected stalls on CPUs",
    "blocked for more than",
    "kthread timer wakeup didn't happen",
    "kthread starved for",
];

/// The first console line reporting a stuck CPU or task, if any.
pub fn stall_line(console: &str) -> Option<String> {
    console
        .lines()
        .find(|l| STALL_MARKERS.iter().any(|m| l.contains(m)))
        .map(str::to_string)
}

const PROMPT: &[u8] = b"(qemu) ";

/// One line per CPU of the test host whose monitor socket is `sock`: its instruction
/// pointer, flags, privilege level and whether it is halted.
pub fn cpu_places(sock: &Path) -> std::io::Result<String> {
    let mut monitor = UnixStream::connect(sock)?;
    monitor.set_read_timeout(Some(Duration::from_secs(3)))?;
    read_to_prompt(&mut monitor)?;
    monitor.write_all(b"info registers -a\n")?;
    let text = String::from_utf8_lossy(&read_to_prompt(&mut monitor)?).into_owned();
    Ok(rip_lines(&text))
}

fn read_to_prompt(monitor: &mut UnixStream) -> std::io::Result<Vec<u8>> {
    let mut text = Vec::new();
    let mut chunk = [0u8; 4096];
    while !text.ends_with(PROMPT) {
        let n = monitor.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::ErrorKind::UnexpectedEof.into());
        }
        text.extend_from_slice(&chunk[..n]);
    }
    Ok(text)
}

/// From `info registers -a`: "CPU#n RIP=… RFL=… CPL=… HLT=…" for each CPU.
fn rip_lines(registers: &str) -> String {
    let mut cpu = "";
    let mut out = Vec::new();
    for line in registers.lines().map(str::trim) {
        if line.starts_with("CPU#") {
            cpu = line;
        } else if line.starts_with("RIP=") {
            out.push(format!("{cpu} {line}"));
        }
    }
    out.join("\n")
}

#[cfg(test)]
mod tests {
    use super::{rip_lines, stall_line};

    #[test]
    fn a_stuck_cpu_on_the_console_is_found_and_a_healthy_boot_is_not() {
        let healthy = "[    2.12] kvm: Nested Virtualization enabled\nlab-host: labhost0 up";
        assert_eq!(stall_line(healthy), None);
        let stuck = format!(
            "{healthy}\n[  616.60] watchdog: BUG: soft lockup - CPU#1 stuck for 574s! [mcvmm:150]\n"
        );
        assert_eq!(
            stall_line(&stuck).as_deref(),
            Some("[  616.60] watchdog: BUG: soft lockup - CPU#1 stuck for 574s! [mcvmm:150]")
        );
        let rcu = "[  591.84] rcu: INFO: rcu_preempt self-detected stall on CPU";
        assert!(stall_line(rcu).is_some());
    }

    #[test]
    fn each_cpu_gets_its_instruction_pointer_line() {
        let registers = "info registers -a\r\n\r\nCPU#0\r\nRAX=0000000000000000 RBX=1\r\n\
            RIP=ffffffff81a0595b RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\r\n\
            ES =0000\r\n\r\nCPU#1\r\nRIP=ffffffff81c00ba0 RFL=00000046 [---Z-P-] CPL=0 HLT=1\r\n";
        assert_eq!(
            rip_lines(registers),
            "CPU#0 RIP=ffffffff81a0595b RFL=00000046 [---Z-P-] CPL=0 II=0 A20=1 SMM=0 HLT=0\n\
             CPU#1 RIP=ffffffff81c00ba0 RFL=00000046 [---Z-P-] CPL=0 HLT=1"
        );
    }
}
