//! Guests booted with mcvmm on one KVM host shared by the tests of a test binary (locally
//! on hardware KVM, else a lab test host), driven by `tests/scripts/guest.sh`.

use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use mcvmm_lab::{HostOptions, KvmHost, Output};

use crate::retry::{self, Cause, Phase};
use crate::soak::Signature;

/// Test host memory: room for a guest whose RAM goes on above 4 GiB. A lab test host only
/// takes from the machine what its guests touch.
const HOST_MEM_MIB: u32 = 5120;

fn new_host() -> Arc<KvmHost> {
    let opts = HostOptions {
        mem_mib: HOST_MEM_MIB,
        ..HostOptions::default()
    };
    Arc::new(crate::guest_host(&opts).unwrap_or_else(|e| panic!("{e}")))
}

/// The KVM host shared by these tests.
static HOST: Mutex<Option<Arc<KvmHost>>> = Mutex::new(None);

pub fn host() -> Arc<KvmHost> {
    let mut slot = HOST.lock().unwrap_or_else(PoisonError::into_inner);
    slot.get_or_insert_with(new_host).clone()
}

/// Whether `host` still runs commands (a dead or frozen test host does not).
/// A host whose kernel reported a stuck CPU is not: it answers and runs short commands
/// on its other CPU while what lands on the stuck one hangs.
fn healthy(host: &KvmHost) -> bool {
    host.kernel_stall().is_none()
        && host
            .run("true", Duration::from_secs(20))
            .is_ok_and(|o| o.success())
}

/// Replaces `dead` with a fresh host, unless another test already did.
fn replace(dead: &Arc<KvmHost>) -> Arc<KvmHost> {
    let mut slot = HOST.lock().unwrap_or_else(PoisonError::into_inner);
    if slot.as_ref().is_some_and(|h| Arc::ptr_eq(h, dead)) {
        *slot = Some(new_host());
    }
    slot.get_or_insert_with(new_host).clone()
}

/// Runs `command` on the shared host. When it fails *and* its test host no longer
/// answers or reported a stuck CPU, it runs again on a fresh host if the retry policy
/// grants it (`retry::allow`). A failure on a healthy host stands.
pub fn resilient(command: &str, timeout: Duration) -> Output {
    loop {
        let h = host();
        let result = h.run(command, timeout);
        if matches!(&result, Ok(o) if o.success()) || healthy(&h) {
            return result.unwrap_or_else(|e| panic!("{e}"));
        }
        let why = match &result {
            Ok(o) => format!("command status {}", o.status),
            Err(e) => e.to_string(),
        };
        let kept = crate::evidence::keep_kvm("test host died", &h, &why);
        let detail = format!("{why}; evidence in {}", kept.display());
        if !retry::allow(Cause::HostDied, &detail) {
            panic!("the test host died under this test ({detail})");
        }
        replace(&h);
    }
}

/// Runs a script (with the guest helpers loaded) that must succeed; returns its stdout.
///
/// A failed script leaves its evidence under `target/lab-failures/<test>/` and runs again
/// (in a fresh folder, on a fresh test host) only if the retry policy grants it: its
/// test host died, or its guest was lost in a way the soak shows to be the lab's
/// (`retry::LAB_LOSSES`), in the phase the script last announced.
pub fn script(body: &str) -> String {
    for attempt in 1.. {
        let h = host();
        let prelude = if attempt == 1 { "" } else { FRESH_FOLDER };
        let ran = std::time::Instant::now();
        let result = h.run(
            &format!("{prelude}. ./guest.sh\ntrap cleanup_guests EXIT\nset -e\n{body}"),
            Duration::from_secs(240),
        );
        let out = match result {
            Ok(out) if out.success() => {
                // Interrupts the guest never took and the VMM raised again: rare, and
                // worth seeing.
                for line in out
                    .stderr_text()
                    .lines()
                    .filter(|l| l.starts_with("WATCHDOG "))
                {
                    eprintln!("{line}");
                }
                return out.stdout_text();
            }
            Ok(out) => out,
            Err(e) => Output {
                status: -1,
                timed_out: false,
                stdout: Vec::new(),
                stderr: e.to_string().into_bytes(),
            },
        };
        let mut text = format!("{}\n--- stderr\n{}", out.stdout_text(), out.stderr_text());
        // The test host's records of this script's time only.
        let trace = h
            .run(
                crate::crash_site::SHUTDOWN_EXITS_LINE,
                Duration::from_secs(20),
            )
            .map(|o| crate::crash_site::recent(&o.stdout_text(), ran.elapsed().as_secs_f64() + 5.0))
            .unwrap_or_default();
        let sites = crate::crash_site::describe(&trace);
        if !sites.is_empty() {
            text.push_str(&format!("\n--- where\n{sites}\n{trace}\n"));
        }
        let kept = crate::evidence::keep_kvm(&format!("try{attempt}"), &h, &text);
        let lost = lost_signature(&text);
        let mut detail = lost
            .as_ref()
            .map_or_else(String::new, |(_, line)| line.clone());
        if !sites.is_empty() {
            detail.push_str(&format!(" ({})", sites.replace('\n', "; ")));
        }
        let cause = if !healthy(&h) {
            Some(Cause::HostDied)
        } else {
            lost.map(|(signature, _)| Cause::GuestLost {
                signature,
                phase: Phase::last_in(&text),
            })
        };
        if let Some(cause) = cause {
            if retry::allow(cause, &format!("{detail}; evidence in {}", kept.display())) {
                replace(&h);
                continue;
            }
        }
        panic!(
            "script failed (status {}, timed out {}); evidence in {}:\n--- stdout\n{text}",
            out.status,
            out.timed_out,
            kept.display(),
        );
    }
    unreachable!("the loop above returns or panics")
}

/// Moves a later try into an empty folder with what the first one was given.
const FRESH_FOLDER: &str = "rm -rf again && mkdir again && cd again || exit 1
for f in mcvmm agentctl guest guest.sh; do ln -s \"../$f\" . || exit 1; done
";

/// How a script's output says its guest was lost, with the line that says it: mcvmm's
/// line for a triple fault, a guest kernel's panic in a console the script printed (with
/// `panic=-1` such a guest resets itself, which mcvmm sees as a clean reboot), the
/// `vcpus` looks that `agent` prints on failure finding a vCPU stuck, a guest that never
/// answered at boot, or the device watchdog raising interrupts nobody took.
pub fn lost_signature(text: &str) -> Option<(Signature, String)> {
    let line = |needle: &str| {
        text.lines()
            .find(|l| l.contains(needle))
            .map(str::to_string)
    };
    if let Some(l) = crate::crash_site::fetch_fault_after_nested_fault(text) {
        return Some((Signature::FetchFaultAfterNestedFault, l));
    }
    if let Some(l) = line("triple fault") {
        return Some((Signature::TripleFault, l));
    }
    if let Some(l) = line("Kernel panic") {
        return Some((Signature::GuestPanic, l));
    }
    if let Some(s) = stuck_vcpu(text) {
        return Some((Signature::StuckAfterVmrun, s));
    }
    if let Some(l) =
        line("did not answer; mcvmm log").or_else(|| line("did not answer; primary log"))
    {
        return Some((Signature::NoBoot, l));
    }
    line("raised again").map(|l| (Signature::InterruptsUnacknowledged, l))
}

/// The lines of a script's output that say its guest was lost (see `lost_signature`).
pub fn guest_lost(text: &str) -> Option<String> {
    lost_signature(text).map(|(s, line)| format!("{}: {line}", s.name()))
}

/// Shell lines that print where the test host's `__svm_vcpu_run` lies, for
/// [`stuck_vcpu`] (test hosts boot without address randomization, and run this as root).
pub const HOST_VMRUN_LINE: &str =
    "echo \"test_host_svm_vcpu_run=$(awk '$3 == \"__svm_vcpu_run\" {print $1; exit}' /proc/kallsyms 2>/dev/null)\"";

/// A vCPU that holds the test host's own registers, not its guest's: in each of the last
/// three `ctl vcpus` looks in `text` (pretty or compact JSON), its `rip` is the same and
/// lies in the test host's `__svm_vcpu_run` (the line of [`HOST_VMRUN_LINE`] in `text`
/// says where), where the host goes on after a `#VMEXIT`. The emulated SVM wrote the
/// host's state into the guest's (docs/lab-notes.md, "THP"); no VMM can, since neither
/// the host's registers nor that address are ever in its hands. Without the host's
/// line, nothing is found.
pub fn stuck_vcpu(text: &str) -> Option<String> {
    let host = text
        .lines()
        .find_map(|l| l.trim().strip_prefix("test_host_svm_vcpu_run="))
        .and_then(|a| u64::from_str_radix(a.trim(), 16).ok())
        .filter(|&a| a != 0)?;
    let looks: Vec<serde_json::Value> = text
        .match_indices("\"vcpus\"")
        .filter_map(|(at, _)| {
            let open = text[..at].rfind('{')?;
            serde_json::Deserializer::from_str(&text[open..])
                .into_iter::<serde_json::Value>()
                .next()
                .and_then(Result::ok)
                .filter(|v| v["vcpus"].is_array())
        })
        .collect();
    let last = looks.get(looks.len().checked_sub(3)?..)?;
    let vcpus = last[0]["vcpus"].as_array()?;
    vcpus.iter().find_map(|v| {
        let (id, rip) = (&v["id"], &v["rip"]);
        let same = last.iter().all(|look| {
            look["vcpus"]
                .as_array()
                .is_some_and(|all| all.iter().any(|w| &w["id"] == id && &w["rip"] == rip))
        });
        let at = u64::from_str_radix(rip.as_str()?.trim_start_matches("0x"), 16).ok()?;
        let offset = at.checked_sub(host).filter(|&o| o < 0x200)?;
        same.then(|| {
            format!(
                "vCPU {id} holds the test host's registers in 3 looks: rip {rip} is the test host's __svm_vcpu_run+{offset:#x}, cr3 {}",
                v["cr3"]
            )
        })
    })
}

/// Tests that keep a test host busy take turns: a second guest beside one in a nested-TCG
/// host slows both past their time limits.
pub fn one_at_a_time() -> MutexGuard<'static, ()> {
    static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());
    ONE_AT_A_TIME.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The JSON object a script printed after its line `== name` (the last such line).
pub fn report(out: &str, name: &str) -> serde_json::Value {
    let marker = format!("== {name}\n");
    let at = out
        .rfind(&marker)
        .unwrap_or_else(|| panic!("no {name} report in:\n{out}"));
    let mut stream = serde_json::Deserializer::from_str(&out[at + marker.len()..]).into_iter();
    match stream.next() {
        Some(Ok(v)) => v,
        other => panic!("{name}: not JSON ({other:?}):\n{out}"),
    }
}

#[cfg(test)]
mod tests {
    use super::stuck_vcpu;

    fn look(rip: &str) -> String {
        format!(
            "{{\n  \"vcpus\": [\n    {{\n      \"cr3\": \"0x37c30000\",\n      \"id\": 0,\n      \"pending_exception\": 14,\n      \"rip\": \"{rip}\"\n    }}\n  ]\n}}\n"
        )
    }

    const HOST: &str = "test_host_svm_vcpu_run=ffffffffc032dae0\n";

    #[test]
    fn a_vcpu_at_the_hosts_vmrun_three_times_holds_the_hosts_registers() {
        let stuck = format!(
            "agent failed\n{HOST}{}",
            look("0xffffffffc032db7c").repeat(3)
        );
        let found = stuck_vcpu(&stuck).expect("stuck");
        assert!(found.contains("__svm_vcpu_run+0x9c"), "{found}");
        // The drill's looks are compact JSON, one per line.
        let compact: String = look("0xffffffffc032db7c")
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        let drill = format!("-- vcpus:\n{HOST}{}", format!("{compact}\n").repeat(3));
        assert!(stuck_vcpu(&drill).is_some(), "{drill}");
    }

    #[test]
    fn a_stuck_vcpu_is_the_hosts_only_where_the_host_says_so() {
        let three = look("0xffffffffc032db7c").repeat(3);
        assert_eq!(stuck_vcpu(&three), None, "no line from the test host");
        let elsewhere = format!("{HOST}{}", look("0xffffffffc04f1b7c").repeat(3));
        assert_eq!(stuck_vcpu(&elsewhere), None, "not the host's vmrun");
        let guest_code = format!("{HOST}{}", look("0xffffffff81002fb7").repeat(3));
        assert_eq!(stuck_vcpu(&guest_code), None);
        let moving = format!(
            "{HOST}{}{}{}",
            look("0xffffffffc032db7c"),
            look("0xffffffffc032db80"),
            look("0xffffffffc032db7c")
        );
        assert_eq!(stuck_vcpu(&moving), None);
        let two = format!("{HOST}{}", look("0xffffffffc032db7c").repeat(2));
        assert_eq!(stuck_vcpu(&two), None);
    }
}
