//! mcvmm-agent: the in-guest test agent. Serves the protocol of `mcvmm_guest::proto` on TCP.
//!
//! Usage: mcvmm-agent [--port N] [--dev-dir DIR]

use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;

use mcvmm_guest::proto::DEFAULT_PORT;
use mcvmm_guest::server::{serve, Agent};

fn end_guest() {
    // SAFETY: sync and reboot take no pointers; reboot only returns on failure.
    unsafe {
        libc::sync();
        libc::reboot(libc::RB_AUTOBOOT);
    }
    eprintln!(
        "mcvmm-agent: reboot failed: {}",
        std::io::Error::last_os_error()
    );
}

fn main() {
    let mut port = DEFAULT_PORT;
    let mut dev_dir = PathBuf::from("/dev");
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--port", Some(v)) => match v.parse() {
                Ok(p) => port = p,
                Err(_) => fail(&format!("--port {v}: not a port number")),
            },
            ("--dev-dir", Some(v)) => dev_dir = PathBuf::from(v),
            _ => fail(&format!(
                "unknown argument {arg:?}; usage: mcvmm-agent [--port N] [--dev-dir DIR]"
            )),
        }
    }
    let listener = match TcpListener::bind(("0.0.0.0", port)) {
        Ok(l) => l,
        Err(e) => fail(&format!("listening on port {port}: {e}")),
    };
    eprintln!("mcvmm-agent: listening on port {port}");
    serve(listener, Arc::new(Agent::new(dev_dir)), end_guest);
}

fn fail(msg: &str) -> ! {
    eprintln!("mcvmm-agent: {msg}");
    std::process::exit(2);
}
