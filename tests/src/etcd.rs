//! A private etcd for a lab: Debian's `etcd-server`, run on this machine inside the lab's
//! network namespace at the lab gateway's address, so every test host reaches it over
//! the lab network. Killed when dropped (and by the lab's clean-up if never dropped).

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcvmm_lab::cleanup::{self, Registered, Resource};
use mcvmm_lab::net::GATEWAY;

pub struct Etcd {
    child: Child,
    pub url: String,
    _dir: tempfile::TempDir,
    _registered: Registered,
}

impl Etcd {
    /// Starts etcd in namespace `ns` and waits (20 s at most) until it serves.
    pub fn start(ns: &str) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("etcd's directory: {e}"))?;
        let url = format!("http://{GATEWAY}:2379");
        // Its peer port on the namespace's own loopback: nobody else's.
        let peer = "http://127.0.0.1:2380";
        let child = Command::new("ip")
            .args(["netns", "exec", ns, "etcd", "--name", "lab", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                peer,
                "--initial-advertise-peer-urls",
                peer,
            ])
            .args(["--initial-cluster", &format!("lab={peer}")])
            .args(["--heartbeat-interval", "50", "--election-timeout", "500"])
            .stdout(Stdio::null())
            .stderr(Stdio::from(
                std::fs::File::create(dir.path().join("etcd.log"))
                    .map_err(|e| format!("etcd's log: {e}"))?,
            ))
            .spawn()
            .map_err(|e| format!("etcd did not start (is etcd-server installed?): {e}"))?;
        let etcd = Etcd {
            _registered: cleanup::register(Resource::Process(child.id())),
            child,
            url,
            _dir: dir,
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let out = Command::new("ip")
                .args(["netns", "exec", ns, "etcdctl", "--endpoints", &etcd.url])
                .args(["--dial-timeout", "1s", "endpoint", "health"])
                .env("ETCDCTL_API", "3")
                .output();
            if out.is_ok_and(|o| o.status.success()) {
                return Ok(etcd);
            }
            if Instant::now() > deadline {
                return Err(format!("etcd at {} never became healthy", etcd.url));
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    /// `--etcd ... --vm-name VM --node NODE` for an mcvmm of this lab.
    pub fn flags(&self, vm: &str, node: &str) -> String {
        format!("--etcd {} --vm-name {vm} --node {node}", self.url)
    }

    /// Freezes (SIGSTOP) or thaws (SIGCONT) etcd: it stops answering, its state intact.
    pub fn freeze(&self, frozen: bool) -> Result<(), String> {
        let sig = if frozen { "-STOP" } else { "-CONT" };
        let ok = Command::new("kill")
            .args([sig, &self.child.id().to_string()])
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(()).ok_or(format!("kill {sig} etcd"))
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
