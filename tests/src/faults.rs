//! Faults to put a protected pair through, and what to look at after them: a two-host
//! lab with its etcd (see `pair`), the files of each host named after it (`p` on host
//! 0, `s` on host 1) whichever role it has now. The fencing tests and the nemesis drill
//! build on these.

use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use mcvmm_lab::{net, Lab};

use crate::pair::{agentctl, run_ok, value, with_etcd, NODE};
use crate::retry::{Cause, Phase};
use crate::soak::Signature;

pub struct Fixture {
    pub lab: Lab,
    pub ns: String,
}

/// What a host's mcvmm is doing, from its status.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Doing {
    /// No mcvmm runs there.
    Nothing,
    /// Runs the guest (a primary, protected or not, or one that took over).
    RunsGuest { protected: bool, paused: bool },
    /// A secondary (receiving, or waiting for a primary).
    Secondary,
    /// Alive but its control socket did not answer.
    Silent,
}

impl Fixture {
    pub fn start(mem_mib: u32) -> Result<Fixture, String> {
        let lab = crate::pair::start_lab(mem_mib)?;
        let ns = lab.net().ok_or("the lab has no network")?.ns.clone();
        Ok(Fixture { lab, ns })
    }

    pub fn sh(&self, host: usize, what: &str, cmd: &str) -> Result<String, String> {
        run_ok(self.lab.host(host), what, cmd, 60)
    }

    pub fn alive(&self, host: usize) -> bool {
        let n = NODE[host];
        self.sh(host, "is mcvmm alive", &format!("kill -0 $(cat {n}.pid)"))
            .is_ok()
    }

    /// What the lab may have done here, for the retry policy to judge: a test host that
    /// died, or a guest that an mcvmm says crashed (its signature from that mcvmm's log
    /// and its console, judged in the phase the log ends in). `None`: neither.
    pub fn lab_trouble(&self) -> Option<(Cause, String)> {
        if !self.hosts_alive() {
            return Some((Cause::HostDied, "a test host died".into()));
        }
        for (h, node) in NODE.iter().enumerate() {
            let log = self.log(h);
            if !log.contains("the guest crashed") {
                continue;
            }
            let console = self
                .sh(h, "console", &format!("tail -20 {node}.console"))
                .unwrap_or_default();
            // A nemesis round or a fencing case lasts well under 90 s.
            let trace = self
                .sh(h, "trace", crate::crash_site::SHUTDOWN_EXITS_LINE)
                .map(|t| crate::crash_site::recent(&t, 90.0))
                .unwrap_or_default();
            let sites = crate::crash_site::describe(&trace);
            let seen = format!("{log}\n{console}\n{sites}\n{trace}");
            let (signature, line) = crate::guest::lost_signature(&seen)
                .unwrap_or((Signature::StoppedAnswering, "the guest crashed".to_string()));
            let cause = Cause::GuestLost {
                signature,
                phase: Phase::from_vmm_log(&log),
            };
            return Some((
                cause,
                format!("the guest crashed on host {h}: {line} {sites}"),
            ));
        }
        None
    }

    /// Whether both test hosts still run commands (and neither reported a stuck CPU).
    pub fn hosts_alive(&self) -> bool {
        (0..2).all(|h| self.lab.host(h).healthy())
    }

    /// Waits up to `secs` for the mcvmm of `host` to end.
    pub fn wait_gone(&self, host: usize, secs: u64) -> bool {
        let end = Instant::now() + Duration::from_secs(secs);
        while Instant::now() < end {
            if !self.alive(host) {
                return true;
            }
            std::thread::sleep(Duration::from_millis(300));
        }
        false
    }

    pub fn status(&self, host: usize) -> Result<serde_json::Value, String> {
        let n = NODE[host];
        let out = self.sh(
            host,
            "status",
            &format!("./mcvmm ctl --api-sock {n}.sock status"),
        )?;
        serde_json::from_str(&out).map_err(|e| format!("status of {n}: {e}: {out}"))
    }

    pub fn doing(&self, host: usize) -> Doing {
        if !self.alive(host) {
            return Doing::Nothing;
        }
        match self.status(host) {
            Ok(s) if s["role"] == "secondary" => Doing::Secondary,
            Ok(s) => Doing::RunsGuest {
                protected: s["protected"] == true,
                paused: s["state"] == "paused"
                    || s["phase"]
                        .as_str()
                        .is_some_and(|p| p.starts_with("fencing")),
            },
            Err(_) => Doing::Silent,
        }
    }

    pub fn log(&self, host: usize) -> String {
        let n = NODE[host];
        self.sh(host, "log", &format!("cat {n}.log"))
            .unwrap_or_else(|e| e)
    }

    /// Writes records of `run` for `secs` seconds in the background.
    pub fn client(&self, run: u64, secs: u64) -> Result<Child, String> {
        agentctl(
            &self.ns,
            &["records-for", "vdb", &run.to_string(), &secs.to_string()],
        )
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("client: {e}"))
    }

    /// The records the client saw acknowledged.
    pub fn acked(client: Child) -> Result<u64, String> {
        let out = client
            .wait_with_output()
            .map_err(|e| format!("client: {e}"))?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        value(&text, "acknowledged").ok_or(format!(
            "the client ({}) said: {text}{}",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))
    }

    /// Checks that `host`'s second disk holds records 0..`count` of `run`.
    pub fn check_records(&self, host: usize, run: u64, count: u64) -> Result<(), String> {
        let n = NODE[host];
        self.sh(
            host,
            "checking the acknowledged records",
            &format!("./agentctl check-records {n}2.img {run} {count}"),
        )
        .map(drop)
    }

    /// The records the client saw acknowledged, all checked on `host`'s second disk.
    pub fn check_acked(&self, client: Child, run: u64, host: usize) -> Result<u64, String> {
        let acked = Self::acked(client)?;
        if acked == 0 {
            return Err("no record acknowledged".into());
        }
        self.check_records(host, run, acked)?;
        Ok(acked)
    }

    fn in_ns(&self, args: &[&str]) -> Result<(), String> {
        let ok = Command::new("ip")
            .args(["netns", "exec", &self.ns])
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        ok.then_some(()).ok_or(args.join(" "))
    }

    /// Cuts the test hosts off from each other (not from the gateway: etcd and the
    /// clients) with bridge port isolation, or joins them again.
    pub fn isolate(&self, on: bool) -> Result<(), String> {
        let state = if on { "on" } else { "off" };
        for host in 0..2 {
            let tap = net::LabNet::tap(host);
            self.in_ns(&["bridge", "link", "set", "dev", &tap, "isolated", state])?;
        }
        Ok(())
    }

    /// Cuts `host` from everything (its lab link down), or brings it back.
    pub fn cut_off(&self, host: usize, on: bool) -> Result<(), String> {
        let tap = net::LabNet::tap(host);
        self.in_ns(&["ip", "link", "set", &tap, if on { "down" } else { "up" }])
    }

    /// Delays everything `host` sends by `ms` (netem on its NIC, in the test host: this
    /// machine's kernel may have no netem), or stops it.
    pub fn delay(&self, host: usize, ms: Option<u64>) -> Result<(), String> {
        let cmd = match ms {
            Some(ms) => format!("tc qdisc replace dev eth0 root netem delay {ms}ms"),
            None => "tc qdisc del dev eth0 root 2>/dev/null; true".to_string(),
        };
        self.sh(host, "netem", &cmd).map(drop)
    }

    /// Freezes the mcvmm of `host` for `ms`.
    pub fn freeze(&self, host: usize, ms: u64) -> Result<(), String> {
        let n = NODE[host];
        self.sh(
            host,
            "freezing mcvmm",
            &format!(
                "kill -STOP $(cat {n}.pid); sleep {}; kill -CONT $(cat {n}.pid)",
                ms as f64 / 1000.0
            ),
        )
        .map(drop)
    }

    /// Stops etcd for `ms`.
    pub fn freeze_etcd(&self, ms: u64) -> Result<(), String> {
        with_etcd(&self.lab, |e| e.freeze(true))??;
        std::thread::sleep(Duration::from_millis(ms));
        with_etcd(&self.lab, |e| e.freeze(false))?
    }

    /// Undoes every network fault (after a case, whatever happened).
    pub fn heal(&self) {
        let _ = self.isolate(false);
        for host in 0..2 {
            let _ = self.cut_off(host, false);
            let _ = self.delay(host, None);
        }
        let _ = with_etcd(&self.lab, |e| e.freeze(false));
    }
}

/// The line a fenced mcvmm ends with, if its log has it.
pub fn fenced_line(log: &str) -> Option<&str> {
    log.lines().find(|l| l.contains("fenced: "))
}
