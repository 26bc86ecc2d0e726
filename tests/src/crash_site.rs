//! Where a guest triple-faulted. On AMD, KVM resets a vCPU at its shutdown exit before
//! the VMM can read it, so mcvmm's own report of a triple fault shows only the reset
//! state. Test hosts trace every shutdown exit into a tracefs instance of their own (the
//! lab's test host init); this reads those records and names the guest kernel's function
//! at each `rip` (the guest kernel is built without address randomization).

use std::path::Path;
use std::process::Command;

/// Shell lines that print a test host's shutdown exits (at most the last 8), then the
/// last KVM events of the vCPU thread of the latest one. The test host's uptime comes
/// first: the records are the host's whole history, and their times say which are this
/// test's.
pub const SHUTDOWN_EXITS_LINE: &str = "echo '-- shutdown exits (test host KVM trace):'; \
     echo \"uptime=$(cut -d' ' -f1 /proc/uptime)\"; \
     grep -v '^#' /sys/kernel/tracing/instances/shutdowns/trace 2>/dev/null | tail -8; \
     echo '-- last KVM events of that vCPU:'; \
     v=$(grep -v '^#' /sys/kernel/tracing/instances/shutdowns/trace 2>/dev/null | tail -1 | awk '{print $1}'); \
     [ -n \"$v\" ] && grep -F -- \"$v \" /sys/kernel/tracing/trace | tail -6; true";

/// Shell lines that print both traces whole, for the evidence folder: every shutdown
/// exit, and the last of all the guests' exits and injections.
pub const KVM_TRACE_LINES: &str = "echo '=== shutdown exits'; \
     cat /sys/kernel/tracing/instances/shutdowns/trace 2>/dev/null; \
     echo '=== last KVM events'; tail -n 3000 /sys/kernel/tracing/trace 2>/dev/null";

/// `text` without the trace lines older than `within` seconds by their host's clock (the
/// `uptime=` line above them): a test host's records are its whole history, and a test
/// must not be judged by a guest that an earlier one lost there.
pub fn recent(text: &str, within: f64) -> String {
    with_uptime(text)
        .filter(|(uptime, l)| match (time_of(l), uptime) {
            (Some(at), Some(u)) => u - at <= within,
            _ => true,
        })
        .map(|(_, l)| l)
        .collect::<Vec<_>>()
        .join("\n")
}

/// Each line of `text` with its host's uptime as the last `uptime=` line above it (or
/// that line itself) says.
fn with_uptime(text: &str) -> impl Iterator<Item = (Option<f64>, &str)> {
    let mut uptime = None;
    text.lines().map(move |l| {
        if let Some(u) = l.trim().strip_prefix("uptime=") {
            uptime = u.parse().ok();
        }
        (uptime, l)
    })
}

/// When a trace line's KVM event happened, in seconds since its host booted.
fn time_of(line: &str) -> Option<f64> {
    let i = line.find(": kvm_")?;
    line[..i].split_whitespace().last()?.parse().ok()
}

/// The hexadecimal number after `key` in a trace line (`rip 0x...`, `intr_info 0x...`).
fn hex_after(line: &str, key: &str) -> Option<u64> {
    let at = line.find(key)? + key.len();
    let word = line[at..].split_whitespace().next()?;
    u64::from_str_radix(word.trim_start_matches("0x"), 16).ok()
}

/// One shutdown exit read from a trace line.
#[derive(Debug, Clone, PartialEq)]
pub struct Shutdown {
    pub vcpu: u32,
    pub rip: u64,
    /// The event being delivered when delivery failed for good (SVM's `EXITINTINFO`):
    /// bit 31 valid, bits 8-10 the type, 0-7 the vector.
    pub intr_info: Option<u32>,
    /// Seconds since the test host booted.
    pub at: f64,
    /// Seconds before the host's last `uptime=` line above it (see
    /// [`SHUTDOWN_EXITS_LINE`]), if there is one.
    pub ago: Option<f64>,
}

/// The shutdown exits in `text` (lines of the `kvm_exit` trace event), of one test host
/// or several, each after its `uptime=` line.
pub fn shutdowns(text: &str) -> Vec<Shutdown> {
    with_uptime(text)
        .filter_map(|(uptime, l)| {
            if !(l.contains("kvm_exit:") && l.contains("reason shutdown")) {
                return None;
            }
            let at = time_of(l)?;
            let vcpu = l[l.find("vcpu ")? + 5..]
                .split_whitespace()
                .next()?
                .parse()
                .ok()?;
            let rip = hex_after(l, " rip ")?;
            let intr_info = hex_after(l, " intr_info ").and_then(|i| u32::try_from(i).ok());
            Some(Shutdown {
                vcpu,
                rip,
                intr_info,
                at,
                ago: uptime.map(|u| u - at),
            })
        })
        .collect()
}

/// A triple fault that only the lab's translation can have caused (see
/// [`crate::soak::Signature::FetchFaultAfterNestedFault`]): in `text`, a shutdown exit
/// delivering a page fault (vector 14) whose error code says instruction fetch, right
/// after the same vCPU thread's nested page fault at the same `rip`. Returns the two
/// trace lines.
pub fn fetch_fault_after_nested_fault(text: &str) -> Option<String> {
    let exits: Vec<(&str, &str)> = text
        .lines()
        .filter(|l| l.contains("kvm_exit:"))
        .filter_map(|l| Some((l.split_whitespace().next()?, l)))
        .collect();
    exits.iter().enumerate().find_map(|(i, (thread, line))| {
        let intr = hex_after(line, " intr_info ")?;
        let code = hex_after(line, " error_code ")?;
        let fetch_fault = line.contains("reason shutdown")
            && intr & (1 << 31) != 0
            && intr & 0xff == 14
            && code & (1 << 4) != 0;
        if !fetch_fault {
            return None;
        }
        let rip = hex_after(line, " rip ")?;
        let (_, before) = exits[..i].iter().rev().find(|(t, _)| t == thread)?;
        (before.contains("reason npf") && hex_after(before, " rip ")? == rip)
            .then(|| format!("{}\n{}", before.trim(), line.trim()))
    })
}

/// The function symbols of an ELF, sorted by address, from `nm` (binutils).
fn symbols(elf: &Path) -> Vec<(u64, String)> {
    let Ok(out) = Command::new("nm").arg("-n").arg(elf).output() else {
        return Vec::new();
    };
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| {
            let mut w = l.split_whitespace();
            let addr = u64::from_str_radix(w.next()?, 16).ok()?;
            let kind = w.next()?;
            let name = w.next()?;
            matches!(kind, "T" | "t" | "W" | "w").then(|| (addr, name.to_string()))
        })
        .collect()
}

/// `sym+0xoff` for `addr` among `syms` (sorted), if it lies in the kernel's text.
fn name(syms: &[(u64, String)], addr: u64) -> Option<String> {
    let at = syms.partition_point(|(a, _)| *a <= addr).checked_sub(1)?;
    let (base, sym) = &syms[at];
    let offset = addr - base;
    // Past the last function by far: not kernel text.
    (offset < 0x10000).then(|| format!("{sym}+{offset:#x}"))
}

/// One line per shutdown exit in `text`, naming the guest kernel's function at its
/// `rip` when the guest images are at hand; empty when the trace shows none. An exit
/// seen in both traces is named once.
pub fn describe(text: &str) -> String {
    let mut found = shutdowns(text);
    let mut seen = std::collections::HashSet::new();
    found.retain(|s| seen.insert((s.vcpu, s.rip)));
    if found.is_empty() {
        return String::new();
    }
    let syms = mcvmm_lab::reference::GuestImages::locate()
        .map(|g| symbols(&g.vmlinux))
        .unwrap_or_default();
    found
        .iter()
        .map(|s| {
            let place = if s.rip < 0xffff_8000_0000_0000 {
                "user space".to_string()
            } else {
                name(&syms, s.rip).unwrap_or_else(|| "outside the guest kernel's text".into())
            };
            let delivering = match s.intr_info {
                Some(i) if i & (1 << 31) != 0 => {
                    format!(", delivering vector {} (type {})", i & 0xff, (i >> 8) & 7)
                }
                _ => String::new(),
            };
            let when = s
                .ago
                .map_or_else(String::new, |a| format!(", {a:.1} s ago"));
            format!(
                "triple fault (test host's trace): vCPU {} at rip {:#x}, {place}{delivering}{when}",
                s.vcpu, s.rip
            )
        })
        .collect::<Vec<_>>()
        .join("\n")
}

#[cfg(test)]
mod tests {
    use super::*;

    const LINE: &str = "       CPU 0/KVM-812     [001] d..1.   201.334455: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff8102a3b4 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x00000000 error_code 0x00000000";

    #[test]
    fn reads_a_shutdown_exit() {
        let text = format!("# tracer: nop\n{LINE}\nother: kvm_exit: vcpu 1 reason npf rip 0x1\n");
        assert_eq!(
            shutdowns(&text),
            vec![Shutdown {
                vcpu: 0,
                rip: 0xffff_ffff_8102_a3b4,
                intr_info: Some(0),
                at: 201.334455,
                ago: None,
            }]
        );
    }

    #[test]
    fn each_host_has_its_own_clock() {
        let text = format!("uptime=300.5\n{LINE}\nuptime=900.0\n{LINE}\n");
        let ago: Vec<_> = shutdowns(&text).iter().map(|s| s.ago).collect();
        assert_eq!(
            ago,
            vec![Some(300.5 - 201.334455), Some(900.0 - 201.334455)]
        );
    }

    #[test]
    fn names_the_function_below_an_address() {
        let syms = vec![(0x1000, "a".to_string()), (0x2000, "b".to_string())];
        assert_eq!(name(&syms, 0x2010).as_deref(), Some("b+0x10"));
        assert_eq!(name(&syms, 0x1000).as_deref(), Some("a+0x0"));
        assert_eq!(name(&syms, 0x10), None);
        assert_eq!(name(&syms, 0x20000), None);
    }

    /// A guest made to reboot by a triple fault (`reboot=t`: an empty IDT, then `int3`),
    /// as the trace of a test host showed it.
    #[test]
    fn names_a_reboot_by_triple_fault() {
        let text = "uptime=10.39\n           vcpu0-143     [001] .....     7.420211: kvm_exit: vcpu 0 reason shutdown rip 0xffffffff8101f775 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000403 error_code 0x00000000";
        let said = describe(text);
        assert!(said.contains("vCPU 0 at rip 0xffffffff8101f775"), "{said}");
        assert!(said.contains("delivering vector 3 (type 4)"), "{said}");
        assert!(said.contains("3.0 s ago"), "{said}");
        if mcvmm_lab::reference::GuestImages::locate().is_ok() {
            assert!(said.contains("native_machine_emergency_restart+"), "{said}");
        }
    }

    /// As traced in a clean-clone CI (a guest under epochs, 2026-12-08).
    #[test]
    fn a_fetch_fault_right_after_a_nested_fault_at_the_same_rip_is_the_labs() {
        let npf = "vcpu0-154 [000] ..... 39.624403: kvm_exit: vcpu 0 reason npf rip 0x7fa1071733d6 info1 0x0000000100000007 info2 0x00000000023a9000 intr_info 0x00000000 error_code 0x00000000";
        let other = "vcpu1-155 [001] ..... 39.624500: kvm_exit: vcpu 1 reason hlt rip 0xffffffff812d4052 info1 0x0 info2 0x0 intr_info 0x00000000 error_code 0x00000000";
        let shutdown = "vcpu0-154 [000] ..... 39.624771: kvm_exit: vcpu 0 reason shutdown rip 0x7fa1071733d6 info1 0x0000000000000000 info2 0x0000000000000000 intr_info 0x80000b0e error_code 0x00000014";
        let seen = fetch_fault_after_nested_fault(&format!("{npf}\n{other}\n{shutdown}\n"));
        assert!(seen.is_some_and(|s| s.contains("reason shutdown")));
        // Another rip, a data fault, a fault with no nested one before it, or another
        // vector: not this signature.
        let elsewhere = npf.replace("0x7fa1071733d6", "0x7fa1071733d0");
        assert_eq!(
            fetch_fault_after_nested_fault(&format!("{elsewhere}\n{shutdown}")),
            None
        );
        let data = shutdown.replace("error_code 0x00000014", "error_code 0x00000006");
        assert_eq!(
            fetch_fault_after_nested_fault(&format!("{npf}\n{data}")),
            None
        );
        assert_eq!(fetch_fault_after_nested_fault(shutdown), None);
        let timer = shutdown.replace("intr_info 0x80000b0e", "intr_info 0x800000ec");
        assert_eq!(
            fetch_fault_after_nested_fault(&format!("{npf}\n{timer}")),
            None
        );
    }

    #[test]
    fn old_records_of_a_host_are_left_out() {
        let text = format!("header\nuptime=300.0\n{LINE}\nuptime=205.0\n{LINE}\n");
        let kept = recent(&text, 10.0);
        assert_eq!(shutdowns(&kept).len(), 1, "{kept}");
        assert!(kept.starts_with("header\nuptime=300.0\nuptime=205.0"));
    }

    #[test]
    fn nothing_to_say_without_a_shutdown() {
        assert_eq!(describe("# tracer: nop\n"), "");
    }
}
