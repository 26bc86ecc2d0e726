//! mcvmm-init: PID 1 of the test guest.
//!
//! Mounts /dev, /proc, /sys and /tmp, configures `lo` and (from `mcvmm.ip=`) `eth0`, starts
//! the agent, waits until it accepts connections, prints `mcvmm-guest: ready`, then reaps
//! children. Init must never exit or panic (that is a kernel panic): every failure is
//! printed and, where the guest cannot be useful any more, ends it with a reset.

use std::ffi::CString;
use std::io::Write;
use std::net::{Ipv4Addr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use mcvmm_guest::cmdline::{netmask, GuestConfig};

fn log(msg: &str) {
    let mut out = std::io::stdout().lock();
    let _ = writeln!(out, "mcvmm-guest: {msg}");
    let _ = out.flush();
}

fn mount(source: &str, target: &str, fstype: &str) {
    let _ = std::fs::create_dir_all(target);
    let (Ok(s), Ok(t), Ok(f)) = (
        CString::new(source),
        CString::new(target),
        CString::new(fstype),
    ) else {
        return;
    };
    // SAFETY: all three are valid NUL-terminated strings that outlive the call; no data.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), 0, std::ptr::null()) };
    let err = std::io::Error::last_os_error();
    if rc != 0 && err.raw_os_error() != Some(libc::EBUSY) {
        log(&format!("mount {fstype} on {target}: {err}"));
    }
}

fn sockaddr_in(addr: Ipv4Addr) -> libc::sockaddr_in {
    libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: 0,
        sin_addr: libc::in_addr {
            s_addr: u32::from(addr).to_be(),
        },
        sin_zero: [0; 8],
    }
}

/// An AF_INET datagram socket, the handle the interface ioctls need.
struct Sock(libc::c_int);

impl Sock {
    fn new() -> std::io::Result<Sock> {
        // SAFETY: plain syscall with constant arguments.
        let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM, 0) };
        if fd < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(Sock(fd))
    }

    fn ifreq(name: &str) -> libc::ifreq {
        // SAFETY: ifreq is plain old data; all-zero is a valid value.
        let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
        for (dst, src) in req
            .ifr_name
            .iter_mut()
            .zip(name.bytes().take(libc::IFNAMSIZ - 1))
        {
            *dst = src as libc::c_char;
        }
        req
    }

    fn ioctl(
        &self,
        request: libc::Ioctl,
        req: &mut libc::ifreq,
        what: &str,
    ) -> std::io::Result<()> {
        // SAFETY: `req` is a valid ifreq for the whole call, as these requests expect.
        let rc = unsafe { libc::ioctl(self.0, request, req as *mut libc::ifreq) };
        if rc < 0 {
            let e = std::io::Error::last_os_error();
            return Err(std::io::Error::new(e.kind(), format!("{what}: {e}")));
        }
        Ok(())
    }

    fn set_addr(
        &self,
        name: &str,
        request: libc::Ioctl,
        addr: Ipv4Addr,
        what: &str,
    ) -> std::io::Result<()> {
        let mut req = Self::ifreq(name);
        let sin = sockaddr_in(addr);
        // SAFETY: sockaddr_in fits in the sockaddr of the union; both are plain data.
        unsafe {
            std::ptr::write_unaligned(
                std::ptr::addr_of_mut!(req.ifr_ifru.ifru_addr).cast::<libc::sockaddr_in>(),
                sin,
            );
        }
        self.ioctl(request, &mut req, what)
    }

    fn up(&self, name: &str) -> std::io::Result<()> {
        let mut req = Self::ifreq(name);
        self.ioctl(libc::SIOCGIFFLAGS, &mut req, "get flags")?;
        // SAFETY: SIOCGIFFLAGS just filled the flags member of the union.
        unsafe {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
        }
        self.ioctl(libc::SIOCSIFFLAGS, &mut req, "set flags")
    }

    fn default_route(&self, gateway: Ipv4Addr) -> std::io::Result<()> {
        // SAFETY: rtentry is plain old data; all-zero is a valid value.
        let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
        let to_sockaddr = |a: Ipv4Addr| {
            // SAFETY: sockaddr_in and sockaddr have the same size; plain data.
            unsafe { std::mem::transmute::<libc::sockaddr_in, libc::sockaddr>(sockaddr_in(a)) }
        };
        rt.rt_dst = to_sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_genmask = to_sockaddr(Ipv4Addr::UNSPECIFIED);
        rt.rt_gateway = to_sockaddr(gateway);
        rt.rt_flags = libc::RTF_UP | libc::RTF_GATEWAY;
        // SAFETY: `rt` is a valid rtentry for the whole call.
        let rc = unsafe { libc::ioctl(self.0, libc::SIOCADDRT, &mut rt as *mut libc::rtentry) };
        if rc < 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
}

impl Drop for Sock {
    fn drop(&mut self) {
        // SAFETY: we own the descriptor.
        unsafe { libc::close(self.0) };
    }
}

fn configure_network(cfg: &GuestConfig) -> std::io::Result<()> {
    let sock = Sock::new()?;
    sock.up("lo")?;
    let Some((addr, prefix)) = cfg.ip else {
        return Ok(());
    };
    // virtio-net probes asynchronously; give it a moment to register eth0.
    let start = Instant::now();
    // Generous: a loaded nested host can take seconds to probe the device.
    while !std::path::Path::new("/sys/class/net/eth0").exists() {
        if start.elapsed() > Duration::from_secs(30) {
            return Err(std::io::Error::other(
                "mcvmm.ip is set but there is no eth0",
            ));
        }
        std::thread::sleep(Duration::from_millis(10));
    }
    sock.set_addr("eth0", libc::SIOCSIFADDR, addr, "set address")?;
    sock.set_addr("eth0", libc::SIOCSIFNETMASK, netmask(prefix), "set netmask")?;
    sock.up("eth0")?;
    if let Some(gw) = cfg.gateway {
        sock.default_route(gw)?;
    }
    log(&format!("eth0 {addr}/{prefix}"));
    Ok(())
}

fn end_guest(why: &str) -> ! {
    log(why);
    // SAFETY: sync and reboot take no pointers.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    // reboot only returns on failure; init must not exit, so park.
    loop {
        std::thread::sleep(Duration::from_secs(3600));
    }
}

fn main() {
    mount("devtmpfs", "/dev", "devtmpfs");
    mount("proc", "/proc", "proc");
    mount("sysfs", "/sys", "sysfs");
    mount("tmpfs", "/tmp", "tmpfs");

    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let cfg = match GuestConfig::parse(&cmdline) {
        Ok(cfg) => cfg,
        Err(e) => end_guest(&format!("bad kernel command line: {e}")),
    };
    if let Err(e) = configure_network(&cfg) {
        end_guest(&format!("network: {e}"));
    }

    let agent = match Command::new("/bin/mcvmm-agent")
        .args(["--port", &cfg.port.to_string()])
        .spawn()
    {
        Ok(child) => child,
        Err(e) => end_guest(&format!("starting the agent: {e}")),
    };
    let start = Instant::now();
    while TcpStream::connect(("127.0.0.1", cfg.port)).is_err() {
        if start.elapsed() > Duration::from_secs(30) {
            end_guest("the agent did not start listening within 30 s");
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    log("ready");

    let agent_pid = agent.id() as libc::pid_t;
    loop {
        let mut status = 0;
        // SAFETY: `status` is a valid out pointer.
        let pid = unsafe { libc::waitpid(-1, &mut status, 0) };
        if pid == agent_pid {
            end_guest(&format!("the agent exited (wait status {status:#x})"));
        }
        if pid < 0 {
            std::thread::sleep(Duration::from_secs(1));
        }
    }
}
