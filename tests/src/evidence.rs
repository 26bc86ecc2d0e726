//! What a failed lab test leaves behind: under `target/lab-failures/<test>/<label>/`, the
//! test's own output, each test host's whole console, and every VMM log and guest
//! console in the hosts' work folders (both sides of a pair, the drill's hosts alike).
//! `scripts/test.sh` names the folders at the end of its output. A test host that no
//! longer answers still gives its console (the lab keeps it on this machine).

use std::path::PathBuf;
use std::time::Duration;

use mcvmm_lab::TestHost;

/// Where all failures of a run go; `scripts/test.sh` empties it first.
pub fn root() -> PathBuf {
    crate::repo_root().join("target/lab-failures")
}

fn folder_name(s: &str) -> String {
    s.chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect()
}

/// The logs and consoles in a host's work folder (and the `again` folder of a later
/// try), whole up to 256 KiB each.
const COLLECT: &str = "for f in *.log *.console */*.log */*.console; do \
  [ -f \"$f\" ] || continue; echo \"=== $f\"; tail -c 262144 \"$f\"; echo; done";

/// Where [`keep`] puts the evidence of the running test's failure `label`.
pub fn folder(label: &str) -> PathBuf {
    root()
        .join(folder_name(&crate::retry::test_name()))
        .join(folder_name(label))
}

/// Keeps the evidence of one failure of the running test; returns its folder.
pub fn keep(
    label: &str,
    hosts: &[&TestHost],
    local: Option<&mcvmm_lab::KvmHost>,
    output: &str,
) -> PathBuf {
    let dir = folder(label);
    let write = |name: &str, text: &str| {
        if let Err(e) =
            std::fs::create_dir_all(&dir).and_then(|_| std::fs::write(dir.join(name), text))
        {
            eprintln!("WARNING: keeping evidence in {}: {e}", dir.display());
        }
    };
    write("output.txt", output);
    for h in hosts {
        write(&format!("{}.console.txt", h.name), &h.console());
        let files = h
            .run(COLLECT, Duration::from_secs(30))
            .map(|o| o.stdout_text())
            .unwrap_or_else(|e| format!("(the test host did not give its files: {e})"));
        write(&format!("{}.guests.txt", h.name), &files);
        if let Ok(o) = h.run(crate::crash_site::KVM_TRACE_LINES, Duration::from_secs(30)) {
            write(&format!("{}.kvm-trace.txt", h.name), &o.stdout_text());
        }
    }
    if let Some(k) = local.filter(|k| k.test_hosts().is_empty()) {
        let files = k
            .run(COLLECT, Duration::from_secs(30))
            .map(|o| o.stdout_text())
            .unwrap_or_default();
        write("local.guests.txt", &files);
    }
    dir
}

/// [`keep`] for a test on a [`mcvmm_lab::KvmHost`].
pub fn keep_kvm(label: &str, host: &mcvmm_lab::KvmHost, output: &str) -> PathBuf {
    let hosts: Vec<&TestHost> = host.test_hosts().iter().collect();
    keep(label, &hosts, Some(host), output)
}
