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
        let text = format!("{}\n--- stderr\n{}", out.stdout_text(), out.stderr_text());
        let kept = crate::evidence::keep_kvm(&format!("try{attempt}"), &h, &text);
        let lost = lost_signature(&text);
        let detail = lost
            .as_ref()
            .map_or_else(String::new, |(_, line)| line.clone());
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
            "script failed (status {}, timed out {}); evidence in {}:\n--- stdout\n{}\n--- stderr\n{}",
            out.status,
            out.timed_out,
            kept.display(),
            out.stdout_text(),
            out.stderr_text()
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

/// A vCPU caught at the same instruction with the same exception pending in each of the
/// last three `vcpus` looks that `agent` prints when the guest stops answering. The lab
/// leaves one so now and then: its `rip` and `cr3` are then not the guest's but the test
/// host's own, `rip` inside the host's kvm_amd at its VMRUN (`__svm_vcpu_run+0x9c`),
/// written into the guest by the emulated SVM (see docs/lab-notes.md). The guest is as dead as
/// after a triple fault.
pub fn stuck_vcpu(text: &str) -> Option<String> {
    let looks: Vec<serde_json::Value> = text
        .match_indices("{\n  \"vcpus\": [")
        .filter_map(|(at, _)| {
            serde_json::Deserializer::from_str(&text[at..])
                .into_iter()
                .next()
                .and_then(Result::ok)
        })
        .collect();
    let last = looks.get(looks.len().checked_sub(3)?..)?;
    let vcpus = last[0]["vcpus"].as_array()?;
    vcpus.iter().find_map(|v| {
        let (id, rip, exception) = (&v["id"], &v["rip"], &v["pending_exception"]);
        let same = last.iter().all(|look| {
            look["vcpus"].as_array().is_some_and(|all| {
                all.iter().any(|w| {
                    &w["id"] == id && &w["rip"] == rip && &w["pending_exception"] == exception
                })
            })
        });
        (same && !exception.is_null()).then(|| {
            format!("vCPU {id} stuck at rip {rip} with exception {exception} pending in 3 looks")
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

    fn look(rip: &str, exception: &str) -> String {
        format!(
            "{{\n  \"vcpus\": [\n    {{\n      \"id\": 0,\n      \"pending_exception\": {exception},\n      \"rip\": \"{rip}\"\n    }}\n  ]\n}}\n"
        )
    }

    #[test]
    fn a_vcpu_at_one_rip_with_an_exception_pending_three_times_is_stuck() {
        let stuck = format!(
            "agent failed\n{}",
            look("0xffffffffc04f1b7c", "14").repeat(3)
        );
        let found = stuck_vcpu(&stuck).expect("stuck");
        assert!(found.contains("0xffffffffc04f1b7c"), "{found}");
        // Moving on, or nothing pending, or fewer than three looks: not stuck.
        let moving = look("0x1", "14") + &look("0x2", "14") + &look("0x2", "14");
        assert_eq!(stuck_vcpu(&moving), None);
        assert_eq!(stuck_vcpu(&look("0x1", "null").repeat(3)), None);
        assert_eq!(stuck_vcpu(&look("0x1", "14").repeat(2)), None);
    }
}
