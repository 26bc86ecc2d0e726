//! The agent's server and client talking over real TCP on loopback, with plain files
//! standing in for the guest's block devices.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use mcvmm_guest::client::{AgentClient, ClientError};
use mcvmm_guest::proto::MAX_LINE;
use mcvmm_guest::server::{serve, Agent};

/// The agent's stand-in device folder, removed when the test ends (passing or not).
struct Disks(PathBuf);

impl Drop for Disks {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

fn start_agent() -> (String, Disks) {
    let dir = std::env::temp_dir().join(format!(
        "mcvmm-agent-test-{}-{:?}",
        std::process::id(),
        std::thread::current().id()
    ));
    std::fs::create_dir_all(&dir).expect("temp dir");
    std::fs::write(dir.join("vda"), vec![0u8; 1 << 16]).expect("disk file");
    let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("addr").to_string();
    let agent = Arc::new(Agent::new(dir.clone()));
    std::thread::spawn(move || serve(listener, agent, || {}));
    (addr, Disks(dir))
}

fn client(addr: &str) -> AgentClient {
    AgentClient::connect(addr, Duration::from_secs(5)).expect("connect")
}

#[test]
fn acknowledged_write_is_in_the_file_and_reads_back() {
    let (addr, dir) = start_agent();
    let mut c = client(&addr);
    c.ping().expect("ping");
    c.write("vda", 4096, b"record-1").expect("write");
    assert_eq!(
        &std::fs::read(dir.0.join("vda")).expect("read")[4096..4104],
        b"record-1"
    );
    assert_eq!(c.read("vda", 4096, 8).expect("read"), b"record-1");
    let s = c.status().expect("status");
    assert_eq!(s.num("writes"), Some(1));
    assert_eq!(s.num("write_bytes"), Some(8));
    assert!(s.get("boot_id").is_some());
}

#[test]
fn malformed_requests_get_an_error_and_the_connection_goes_on() {
    let (addr, _dir) = start_agent();
    let mut c = client(&addr);
    for bad in [
        "",
        "NOPE",
        "WRITE vda 1",
        "WRITE ../../etc/passwd 0 00",
        "READ vda 0 x",
        "READ nodisk 0 1",
        "MEM VERIFY",
        "\u{7f}\u{1}",
    ] {
        let reply = c.raw(bad).expect("reply");
        assert!(reply.starts_with("ERR "), "{bad:?} -> {reply:?}");
    }
    c.ping().expect("still usable");
    assert_eq!(c.status().expect("status").num("errors"), Some(8));
    assert!(
        matches!(c.read("vda", 1 << 20, 4), Err(ClientError::Refused(_))),
        "read past the end"
    );
}

#[test]
fn invalid_utf8_and_overlong_lines_do_not_kill_the_agent() {
    let (addr, _dir) = start_agent();
    let mut s = TcpStream::connect(&addr).expect("connect");
    s.write_all(b"\xff\xfe\n").expect("send");
    let mut buf = [0u8; 64];
    let n = s.read(&mut buf).expect("reply");
    assert!(buf[..n].starts_with(b"ERR "));

    let mut long = TcpStream::connect(&addr).expect("connect");
    long.write_all(&vec![b'A'; MAX_LINE + 10]).expect("send");
    let mut reply = String::new();
    long.read_to_string(&mut reply).expect("reply then close");
    assert!(reply.starts_with("ERR line longer"), "{reply:?}");

    client(&addr).ping().expect("agent alive");
}

#[test]
fn memory_workload_runs_and_verifies() {
    let (addr, _dir) = start_agent();
    let mut c = client(&addr);
    c.mem_start(4, 5000).expect("start");
    std::thread::sleep(Duration::from_millis(100));
    assert_eq!(c.mem_verify().expect("verify"), (1024, 0));
    assert!(
        c.status()
            .expect("status")
            .num("mem_pages_written")
            .unwrap_or(0)
            > 0
    );
    c.raw("MEM STOP").expect("stop");
    assert!(c.mem_verify().is_err(), "no workload after stop");
}
