//! The lab network: a bridge inside a network namespace the lab creates, one tap per test
//! host on it. Addresses are `10.77.0.0/24`: the namespace itself (where local clients
//! run) is `.1`, test host `i` is `.10+i`; guests inside test hosts take `.100` and up.

use std::net::Ipv4Addr;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use crate::cleanup::{self, Registered, Resource};

pub const SUBNET_PREFIX: u8 = 24;
pub const GATEWAY: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);

pub fn host_addr(index: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + index as u8)
}

/// Address for the `n`th guest on the lab network.
pub fn guest_addr(n: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 100 + n as u8)
}

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("`ip {args}` failed: {msg} (the lab network needs root and iproute2)")]
    Ip { args: String, msg: String },
    #[error("entering network namespace {ns}: {source}")]
    Setns { ns: String, source: std::io::Error },
}

fn ip(args: &[&str]) -> Result<(), NetError> {
    let fail = |msg: String| NetError::Ip {
        args: args.join(" "),
        msg,
    };
    let out = Command::new("ip")
        .args(args)
        .output()
        .map_err(|e| fail(e.to_string()))?;
    if !out.status.success() {
        return Err(fail(
            String::from_utf8_lossy(&out.stderr).trim().to_string(),
        ));
    }
    Ok(())
}

pub struct LabNet {
    pub ns: String,
    _registered: Registered,
}

impl LabNet {
    pub fn create(hosts: usize) -> Result<LabNet, NetError> {
        static SEQ: AtomicU32 = AtomicU32::new(0);
        let ns = format!(
            "{}{}",
            cleanup::prefix(),
            SEQ.fetch_add(1, Ordering::Relaxed)
        );
        ip(&["netns", "add", &ns])?;
        let net = LabNet {
            _registered: cleanup::register(Resource::Netns(ns.clone())),
            ns,
        };
        let ns = net.ns.as_str();
        let gw = format!("{GATEWAY}/{SUBNET_PREFIX}");
        ip(&["-n", ns, "link", "set", "lo", "up"])?;
        ip(&[
            "-n",
            ns,
            "link",
            "add",
            "labbr0",
            "type",
            "bridge",
            "forward_delay",
            "0",
            "stp_state",
            "0",
        ])?;
        ip(&["-n", ns, "addr", "add", &gw, "dev", "labbr0"])?;
        ip(&["-n", ns, "link", "set", "labbr0", "up"])?;
        for i in 0..hosts {
            let tap = Self::tap(i);
            ip(&["-n", ns, "tuntap", "add", "dev", &tap, "mode", "tap"])?;
            ip(&["-n", ns, "link", "set", &tap, "master", "labbr0", "up"])?;
        }
        Ok(net)
    }

    pub fn tap(index: usize) -> String {
        format!("labtap{index}")
    }

    /// Runs `f` on a thread inside the lab namespace: sockets it opens are on the lab
    /// network (`setns` changes only the calling thread's namespace).
    pub fn run_inside<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> Result<T, NetError> {
        let ns = self.ns.clone();
        let handle = std::thread::spawn(move || -> Result<T, NetError> {
            let path = format!("/run/netns/{ns}");
            let file = std::fs::File::open(&path).map_err(|source| NetError::Setns {
                ns: ns.clone(),
                source,
            })?;
            use std::os::fd::AsRawFd;
            // SAFETY: a valid namespace fd; only this thread's namespace changes.
            if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
                return Err(NetError::Setns {
                    ns,
                    source: std::io::Error::last_os_error(),
                });
            }
            Ok(f())
        });
        match handle.join() {
            Ok(r) => r,
            Err(panic) => std::panic::resume_unwind(panic),
        }
    }
}
