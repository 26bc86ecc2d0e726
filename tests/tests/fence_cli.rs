//! Bad fence input ends `mcvmm run` with one clear line and a non-zero status before any
//! guest is built (no KVM needed): an etcd that does not answer, a name etcd keys should
//! not hold, a guest another node owns, a key that holds something else. A private etcd
//! on loopback.

use mcvmm_tests::etcd::Etcd;
use mcvmm_tests::{expect_one_line_failure, workspace_command};

fn run(args: &[&str]) -> std::process::Output {
    workspace_command("mcvmm")
        .args(["run", "--kernel", "/nonexistent/vmlinux"])
        .args(args)
        .output()
        .expect("mcvmm runs")
}

#[test]
fn an_etcd_that_does_not_answer_is_one_line_on_either_side() {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let url = format!("http://127.0.0.1:{port}");
    let out = run(&["--etcd", &url, "--vm-name", "vm"]);
    expect_one_line_failure(&out, &format!("etcd at {url}"));
    let out = workspace_command("mcvmm")
        .args([
            "run",
            "--secondary",
            "--listen",
            "127.0.0.1:0",
            "--etcd",
            &url,
        ])
        .args(["--vm-name", "vm"])
        .output()
        .expect("mcvmm runs");
    expect_one_line_failure(&out, &format!("etcd at {url}"));
}

#[test]
fn names_etcd_keys_should_not_hold_are_refused() {
    let e = Etcd::start_on_loopback().expect("etcd");
    for name in ["a/b", "../x", ".hidden", "", &"x".repeat(65)] {
        let out = run(&["--etcd", &e.url, "--vm-name", name]);
        expect_one_line_failure(&out, "--vm-name");
    }
    let out = run(&["--etcd", &e.url, "--vm-name", "ok", "--node", "a\tb"]);
    expect_one_line_failure(&out, "--node");
}

#[test]
fn a_guest_another_node_owns_does_not_start_here() {
    let e = Etcd::start_on_loopback().expect("etcd");
    let key = "/mcvmm/taken/owner";
    e.put(key, r#"{"generation":5,"node":"other","since":1}"#)
        .expect("put");
    let out = run(&["--etcd", &e.url, "--vm-name", "taken", "--node", "me"]);
    expect_one_line_failure(
        &out,
        r#"fenced: node "other" (generation 5) owns this guest, so generation 1 cannot start here; start with --generation 6"#,
    );
    assert!(e.get(key).expect("get").contains(r#""node":"other""#));
    // The next generation is this node's to take (the kernel then fails: no guest runs).
    let out = run(&[
        "--etcd",
        &e.url,
        "--vm-name",
        "taken",
        "--node",
        "me",
        "--generation",
        "6",
    ]);
    assert!(!out.status.success());
    let now = e.get(key).expect("get");
    assert!(
        now.contains(r#""generation":6"#) && now.contains(r#""node":"me""#),
        "{now}"
    );
    e.put("/mcvmm/foreign/owner", "not json").expect("put");
    let out = run(&["--etcd", &e.url, "--vm-name", "foreign"]);
    expect_one_line_failure(&out, "holds something that is not an owner record");
}
