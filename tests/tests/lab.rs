//! The lab itself: test hosts boot with a real, nested-paging /dev/kvm, commands and files
//! go in and come back, limits are enforced, hosts share a network, nothing is left over.

use std::sync::OnceLock;
use std::time::Duration;

use mcvmm_lab::{HostOptions, Lab, LabOptions, TestHost};
use mcvmm_tests::{expect_one_line_failure, start_lab, workspace_command};

/// One test host shared by the tests that only run commands in it.
fn shared() -> &'static TestHost {
    static LAB: OnceLock<Lab> = OnceLock::new();
    LAB.get_or_init(|| match start_lab(&LabOptions::default()) {
        Ok(lab) => lab,
        Err(e) => panic!("the lab is required for this test and could not start: {e}"),
    })
    .host(0)
}

#[test]
fn test_host_has_kvm_with_nested_paging() {
    let host = shared();
    let out = host
        .run(
            "test -c /dev/kvm && cat /sys/module/kvm_amd/parameters/npt",
            Duration::from_secs(20),
        )
        .expect("run");
    assert!(
        out.success(),
        "no /dev/kvm: {}{}",
        out.stdout_text(),
        out.stderr_text()
    );
    assert_eq!(out.stdout_text().trim(), "Y", "nested paging off");
}

/// Without it, each VM start and end in a test host switches kernel static keys, which
/// TCG has been seen to livelock on (see `hold_kvm_static_keys` in `mcvmm-labd`).
#[test]
fn the_test_host_holds_a_vm_and_a_vcpu_open() {
    let out = shared()
        .run(
            "ls -l /proc/[0-9]*/fd 2>/dev/null | grep -c 'anon_inode:kvm-'",
            Duration::from_secs(20),
        )
        .expect("run");
    let open: u32 = out.stdout_text().trim().parse().unwrap_or(0);
    assert!(
        open >= 2,
        "KVM descriptors open in the test host: {}{}",
        out.stdout_text(),
        out.stderr_text()
    );
}

#[test]
fn exit_status_and_both_streams_come_back() {
    let out = shared()
        .run(
            "echo to-stdout; echo to-stderr >&2; exit 7",
            Duration::from_secs(20),
        )
        .expect("run");
    assert_eq!(out.status, 7);
    assert!(!out.timed_out);
    assert_eq!(out.stdout_text(), "to-stdout\n");
    assert_eq!(out.stderr_text(), "to-stderr\n");
}

#[test]
fn a_hanging_command_is_killed_at_its_limit() {
    let host = shared();
    let out = host
        .run("echo begun; sleep 600", Duration::from_secs(2))
        .expect("run");
    assert!(out.timed_out, "not reported as timed out: {out:?}");
    assert_eq!(out.stdout_text(), "begun\n");
    let after = host
        .run("echo still-serving", Duration::from_secs(20))
        .expect("run");
    assert_eq!(after.stdout_text(), "still-serving\n");
}

#[test]
fn files_go_in_and_come_back() {
    let host = shared();
    let data: Vec<u8> = (0..300_000u32).map(|i| (i * 7 % 251) as u8).collect();
    host.put(&data, "sub/dir/blob", 0o640).expect("put");
    let out = host
        .run(
            "stat -c %a sub/dir/blob; wc -c < sub/dir/blob",
            Duration::from_secs(20),
        )
        .expect("run");
    assert_eq!(out.stdout_text(), "640\n300000\n");
    assert_eq!(host.get("sub/dir/blob").expect("get"), data);
    assert!(host.get("no/such/file").is_err());
}

#[test]
fn two_hosts_reach_each_other_on_the_lab_network() {
    let lab = start_lab(&LabOptions {
        hosts: 2,
        network: true,
        host: HostOptions {
            mem_mib: 512,
            ..HostOptions::default()
        },
    })
    .expect("lab with two hosts");
    let (a, b) = (lab.host(0), lab.host(1));
    let b_addr = b.addr.expect("host 1 address");
    let out = a
        .run(&format!("ping -c 2 -W 5 {b_addr}"), Duration::from_secs(30))
        .expect("run");
    assert!(
        out.success(),
        "{} cannot reach {b_addr}: {}",
        a.name,
        out.stdout_text()
    );
    // And TCP, from the lab network's own namespace to a host.
    let listen = b
        .run(
            "(echo hello-from-b | nc -l -p 5555 >/dev/null 2>&1 &) ; sleep 0.5",
            Duration::from_secs(20),
        )
        .expect("run");
    assert!(listen.success());
    let got = lab
        .net()
        .expect("net")
        .run_inside(move || {
            use std::io::Read;
            let mut s = std::net::TcpStream::connect((b_addr, 5555)).map_err(|e| e.to_string())?;
            let mut text = String::new();
            s.read_to_string(&mut text).map_err(|e| e.to_string())?;
            Ok::<_, String>(text)
        })
        .expect("netns");
    assert_eq!(got.expect("tcp"), "hello-from-b\n");
}

#[test]
fn a_panicking_test_leaves_nothing_behind() {
    let prefix = mcvmm_lab::cleanup::prefix();
    let result = std::panic::catch_unwind(|| {
        let lab = Lab::start(&LabOptions {
            hosts: 1,
            network: true,
            host: HostOptions {
                mem_mib: 512,
                ..HostOptions::default()
            },
        })
        .expect("lab");
        let ns = lab.net().expect("net").ns.clone();
        assert!(std::path::Path::new(&format!("/run/netns/{ns}")).exists());
        panic!("deliberate");
    });
    assert!(result.is_err());
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    let netns = String::from_utf8_lossy(&netns.stdout);
    // The shared host (if started) is this process's too, so look for networked leftovers.
    assert!(!netns.contains(&prefix), "namespace left: {netns}");
}

#[test]
fn ctrl_c_cleans_up_everything() {
    let mut child = workspace_command("mcvmm-lab")
        .args([
            "run",
            "--net",
            "--mem-mib",
            "512",
            "--",
            "echo",
            "up;",
            "sleep",
            "600",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .expect("mcvmm-lab");
    let pid = child.id();
    let mut stdout = child.stdout.take().expect("stdout");
    let mut first = [0u8; 3];
    std::io::Read::read_exact(&mut stdout, &mut first).expect("command started");
    assert_eq!(&first, b"up\n");
    // SAFETY: kill takes plain integers.
    unsafe { libc::kill(pid as libc::pid_t, libc::SIGINT) };
    let status = child.wait().expect("wait");
    assert!(!status.success());
    let prefix = format!("mcvmm-lab-{pid}-");
    let netns = std::process::Command::new("ip")
        .args(["netns", "list"])
        .output()
        .expect("ip");
    assert!(
        !String::from_utf8_lossy(&netns.stdout).contains(&prefix),
        "namespace left"
    );
    let dirs: Vec<_> = std::fs::read_dir(std::env::temp_dir())
        .expect("tmp")
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with(&prefix))
        .collect();
    assert!(dirs.is_empty(), "run folders left: {dirs:?}");
    std::thread::sleep(Duration::from_millis(500));
    let qemu = std::process::Command::new("pgrep")
        .args(["-f", &prefix])
        .output()
        .expect("pgrep");
    assert!(
        qemu.stdout.is_empty(),
        "QEMU left running: {}",
        String::from_utf8_lossy(&qemu.stdout)
    );
}

#[test]
fn bad_input_gets_one_clear_line() {
    let out = workspace_command("mcvmm-lab")
        .args(["run", "--copy", "/no/such/file", "--", "true"])
        .output()
        .expect("run");
    expect_one_line_failure(&out, "/no/such/file: no such file to copy");

    let out = workspace_command("mcvmm-lab")
        .args(["run", "--", "true"])
        .env("PATH", "/nonexistent")
        .output()
        .expect("run");
    expect_one_line_failure(&out, "ldd not found in PATH");

    let out = workspace_command("mcvmm-lab")
        .args(["run", "--emulator", "10.0", "--", "true"])
        .env("MCVMM_CACHE", "/nonexistent")
        .output()
        .expect("run");
    expect_one_line_failure(&out, "QEMU 10.0 not found at /nonexistent/qemu-10.0/");

    let out = workspace_command("mcvmm-lab")
        .args(["run", "--", "true"])
        .env("MCVMM_LAB_EMULATOR", "9.1")
        .output()
        .expect("run");
    expect_one_line_failure(&out, "MCVMM_LAB_EMULATOR=\"9.1\"");

    let out = workspace_command("mcvmm-lab")
        .args(["run", "--mem-mib", "512", "--", "no-such-command-xyz"])
        .output()
        .expect("run");
    assert_eq!(out.status.code(), Some(127), "{out:?}");
    expect_one_line_failure(&out, "no-such-command-xyz: not found");
}

#[test]
fn kvm_host_helper_runs_commands_where_kvm_is_real() {
    let host = mcvmm_lab::KvmHost::acquire(&HostOptions {
        mem_mib: 512,
        ..HostOptions::default()
    })
    .expect("a KVM host");
    if !mcvmm_lab::kvm::hardware_kvm() {
        assert!(
            matches!(host, mcvmm_lab::KvmHost::Lab(_)),
            "software /dev/kvm here, so the lab must be used"
        );
    }
    let script =
        std::env::temp_dir().join(format!("{}kvm-helper.sh", mcvmm_lab::cleanup::prefix()));
    std::fs::write(&script, "test -c /dev/kvm && echo kvm-ok").expect("write");
    host.put_file(&script, "check.sh").expect("put");
    let _ = std::fs::remove_file(&script);
    let out = host
        .run("sh check.sh", Duration::from_secs(20))
        .expect("run");
    assert_eq!(
        out.stdout_text(),
        "kvm-ok\n",
        "on {}: {}",
        host.describe(),
        out.stderr_text()
    );
}
