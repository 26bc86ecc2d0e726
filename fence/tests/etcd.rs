//! The fence against a real etcd (Debian's `etcd-server`, installed by `scripts/setup.sh`),
//! one private instance per test on loopback ports.

use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Barrier};
use std::time::{Duration, Instant};

use mcvmm_fence::{Claim, Fence, FenceError};

const TIMEOUT: Duration = Duration::from_secs(5);

/// A private etcd, killed when dropped.
struct Etcd {
    child: Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free loopback port")
}

fn etcd() -> Etcd {
    let dir = tempfile::tempdir().expect("dir");
    let (client, peer) = (free_port(), free_port());
    let url = format!("http://127.0.0.1:{client}");
    let peer_url = format!("http://127.0.0.1:{peer}");
    let child = Command::new("etcd")
        .args(["--name", "fence-test", "--data-dir"])
        .arg(dir.path().join("data"))
        .args([
            "--listen-client-urls",
            &url,
            "--advertise-client-urls",
            &url,
        ])
        .args(["--listen-peer-urls", &peer_url])
        .args(["--initial-advertise-peer-urls", &peer_url])
        .args(["--initial-cluster", &format!("fence-test={peer_url}")])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
        .expect("etcd did not start: is Debian's etcd-server installed (scripts/setup.sh)?");
    let etcd = Etcd {
        child,
        url,
        _dir: dir,
    };
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match Fence::connect(std::slice::from_ref(&etcd.url), "probe", "probe", TIMEOUT) {
            Ok(_) => return etcd,
            Err(e) if Instant::now() > deadline => panic!("etcd never answered: {e}"),
            Err(_) => std::thread::sleep(Duration::from_millis(100)),
        }
    }
}

fn fence(e: &Etcd, vm: &str, node: &str) -> Fence {
    Fence::connect(std::slice::from_ref(&e.url), vm, node, TIMEOUT).expect("connect")
}

#[test]
fn the_first_claim_wins_generation_one_and_the_next_must_come_from_it() {
    let e = etcd();
    let a = fence(&e, "vm1", "a");
    assert_eq!(a.owner().expect("owner"), None);
    let Claim::Won(won) = a.claim(1).expect("claim") else {
        panic!("the first claim of generation 1 lost");
    };
    assert_eq!((won.generation, won.node.as_str()), (1, "a"));
    assert_eq!(a.owner().expect("owner"), Some(won.clone()));
    // Asked again (an answer lost on the way): still won, and nothing rewritten.
    assert_eq!(a.claim(1).expect("again"), Claim::Won(won.clone()));
    let b = fence(&e, "vm1", "b");
    // Generation 3 cannot be claimed from 1.
    assert_eq!(
        b.claim(3).expect("skip"),
        Claim::Lost {
            owner: Some(won.clone())
        }
    );
    let Claim::Won(second) = b.claim(2).expect("claim 2") else {
        panic!("b could not take generation 2 from 1");
    };
    // a, partitioned away meanwhile, still believes it may claim 1 or 2: it may not.
    assert_eq!(
        a.claim(2).expect("stale"),
        Claim::Lost {
            owner: Some(second.clone())
        }
    );
    assert_eq!(
        a.claim(1).expect("stale"),
        Claim::Lost {
            owner: Some(second)
        }
    );
    // Another VM's key is its own.
    assert!(matches!(fence(&e, "vm2", "a").claim(1), Ok(Claim::Won(_))));
}

#[test]
fn of_many_nodes_racing_for_one_generation_exactly_one_wins() {
    let e = etcd();
    fence(&e, "race", "first").claim(1).expect("generation 1");
    let nodes = 8;
    let start = Arc::new(Barrier::new(nodes));
    let claims: Vec<_> = (0..nodes)
        .map(|i| {
            let f = fence(&e, "race", &format!("node{i}"));
            let start = start.clone();
            std::thread::spawn(move || {
                start.wait();
                f.claim(2).expect("claim")
            })
        })
        .collect();
    let results: Vec<Claim> = claims
        .into_iter()
        .map(|t| t.join().expect("thread"))
        .collect();
    let winners: Vec<&Claim> = results
        .iter()
        .filter(|c| matches!(c, Claim::Won(_)))
        .collect();
    assert_eq!(winners.len(), 1, "{results:?}");
    let Claim::Won(w) = winners[0] else {
        unreachable!()
    };
    for c in &results {
        if let Claim::Lost { owner } = c {
            assert_eq!(owner.as_ref(), Some(w), "a loser is told the winner");
        }
    }
}

#[test]
fn a_key_that_holds_something_else_is_left_alone() {
    let e = etcd();
    let f = fence(&e, "odd", "a");
    let status = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &e.url, "put", "/mcvmm/odd/owner", "not json"])
        .stdout(Stdio::null())
        .status()
        .expect("etcdctl (Debian's etcd-client)");
    assert!(status.success());
    let err = f.claim(1).expect_err("not an owner record");
    assert!(matches!(err, FenceError::NotAnOwner { .. }), "{err}");
    assert!(err.to_string().contains("/mcvmm/odd/owner"), "{err}");
    // A node starting now is told at once.
    let err = Fence::connect(std::slice::from_ref(&e.url), "odd", "b", TIMEOUT)
        .err()
        .expect("refused at start");
    assert!(matches!(err, FenceError::NotAnOwner { .. }), "{err}");
}

#[test]
fn an_etcd_that_does_not_answer_is_an_error_within_the_timeout() {
    // A port nobody listens on, and one that accepts but never speaks.
    let silent = TcpListener::bind("127.0.0.1:0").expect("bind");
    let silent_url = format!("http://{}", silent.local_addr().expect("addr"));
    let closed_url = format!("http://127.0.0.1:{}", free_port());
    for url in [closed_url, silent_url] {
        let t = Instant::now();
        let e = Fence::connect(
            std::slice::from_ref(&url),
            "vm",
            "a",
            Duration::from_millis(500),
        )
        .err()
        .expect("no etcd there");
        assert!(
            t.elapsed() < Duration::from_secs(5),
            "{url}: {:?}",
            t.elapsed()
        );
        let msg = e.to_string();
        assert!(msg.starts_with(&format!("etcd at {url}")), "{msg}");
    }
}

#[test]
fn a_claim_waits_out_a_frozen_etcd_and_is_decided_once_it_answers() {
    let e = etcd();
    let f = Fence::connect(
        std::slice::from_ref(&e.url),
        "frozen",
        "a",
        Duration::from_millis(300),
    )
    .expect("connect");
    let signal = |s: &str, pid: u32| {
        let ok = Command::new("kill")
            .args([s, &pid.to_string()])
            .status()
            .is_ok_and(|st| st.success());
        assert!(ok, "kill {s} etcd");
    };
    let pid = e.child.id();
    signal("-STOP", pid);
    let thaw = std::thread::spawn(move || {
        std::thread::sleep(Duration::from_millis(1500));
        signal("-CONT", pid);
    });
    let mut failures = Vec::new();
    let claim = f
        .claim_until_decided(1, Duration::from_millis(100), |err, waited| {
            failures.push((err.to_string(), waited));
        })
        .expect("decided");
    thaw.join().expect("thawed");
    assert!(
        matches!(claim, Claim::Won(ref o) if o.generation == 1),
        "{claim:?}"
    );
    assert!(failures.len() >= 2, "{failures:?}");
    assert!(
        failures.iter().all(|(why, _)| why.starts_with("etcd at ")),
        "{failures:?}"
    );
    assert!(failures
        .last()
        .is_some_and(|f| f.1 >= Duration::from_millis(600)));
    assert!(matches!(
        f.claim_until_decided(0, Duration::from_millis(10), |_, _| {}),
        Err(FenceError::NoGeneration(0))
    ));
}

/// A claim tries its transaction at once on the key as last seen, and that view may be
/// stale. It can never win on it, and a loss is decided on what etcd answers.
#[test]
fn a_claim_on_a_stale_view_cannot_win_and_a_moved_record_is_claimed_anew() {
    let e = etcd();
    let a = fence(&e, "vm5", "a");
    let b = fence(&e, "vm5", "b");
    assert!(matches!(a.claim(1).expect("claim"), Claim::Won(_)));
    // b sees generation 1 and takes generation 2; a's view is still generation 1.
    assert_eq!(b.owner().expect("owner").map(|o| o.generation), Some(1));
    assert!(matches!(b.claim(2).expect("claim"), Claim::Won(_)));
    match a.claim(2).expect("claim") {
        Claim::Lost { owner: Some(o) } => assert_eq!((o.node.as_str(), o.generation), ("b", 2)),
        other => panic!("a won or lost wrongly on a stale view: {other:?}"),
    }
    // c sees b's record; then the record is written again at the same generation (a new
    // revision): c's view is stale, but its generation is right, so c claims anew.
    let c = fence(&e, "vm5", "c");
    assert_eq!(c.owner().expect("owner").map(|o| o.generation), Some(2));
    let put = Command::new("etcdctl")
        .env("ETCDCTL_API", "3")
        .args(["--endpoints", &e.url, "put", "/mcvmm/vm5/owner"])
        .arg(r#"{"generation":2,"node":"b","since":1}"#)
        .output()
        .expect("etcdctl (Debian's etcd-client, installed by scripts/setup.sh)");
    assert!(put.status.success(), "{put:?}");
    match c.claim(3).expect("claim") {
        Claim::Won(o) => assert_eq!((o.node.as_str(), o.generation), ("c", 3)),
        other => panic!("c did not claim over a rewritten record: {other:?}"),
    }
    assert_eq!(
        a.owner().expect("owner").map(|o| (o.node, o.generation)),
        Some(("c".to_string(), 3))
    );
}
