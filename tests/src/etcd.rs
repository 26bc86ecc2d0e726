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
    /// Starts etcd in namespace `ns` at the lab gateway's address and waits (20 s at
    /// most) until it serves.
    pub fn start(ns: &str) -> Result<Etcd, String> {
        // Its peer port on the namespace's own loopback: nobody else's.
        Self::launch(
            Some(ns),
            format!("http://{GATEWAY}:2379"),
            "http://127.0.0.1:2380".into(),
        )
    }

    /// Starts etcd on this machine's loopback, on free ports.
    pub fn start_on_loopback() -> Result<Etcd, String> {
        let port = || {
            std::net::TcpListener::bind("127.0.0.1:0")
                .and_then(|l| l.local_addr())
                .map(|a| a.port())
                .map_err(|e| format!("a free port: {e}"))
        };
        Self::launch(
            None,
            format!("http://127.0.0.1:{}", port()?),
            format!("http://127.0.0.1:{}", port()?),
        )
    }

    /// `program` run in namespace `ns`, or here.
    fn command(ns: Option<&str>, program: &str) -> Command {
        match ns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, program]);
                c
            }
            None => Command::new(program),
        }
    }

    fn launch(ns: Option<&str>, url: String, peer: String) -> Result<Etcd, String> {
        let dir = tempfile::tempdir().map_err(|e| format!("etcd's directory: {e}"))?;
        let child = Self::command(ns, "etcd")
            .args(["--name", "lab", "--data-dir"])
            .arg(dir.path().join("data"))
            .args([
                "--listen-client-urls",
                &url,
                "--advertise-client-urls",
                &url,
            ])
            .args([
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
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
            let out = Self::command(ns, "etcdctl")
                .args(["--endpoints", &etcd.url])
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

    /// Puts `value` at `key` (etcdctl, on this machine: a loopback etcd).
    pub fn put(&self, key: &str, value: &str) -> Result<(), String> {
        let ok = Command::new("etcdctl")
            .args(["--endpoints", &self.url, "put", key, value])
            .env("ETCDCTL_API", "3")
            .stdout(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(()).ok_or(format!("etcdctl put {key}"))
    }

    /// The value at `key`, if any.
    pub fn get(&self, key: &str) -> Result<String, String> {
        let out = Command::new("etcdctl")
            .args(["--endpoints", &self.url, "get", "--print-value-only", key])
            .env("ETCDCTL_API", "3")
            .output()
            .map_err(|e| format!("etcdctl get {key}: {e}"))?;
        Ok(String::from_utf8_lossy(&out.stdout).trim().to_string())
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
