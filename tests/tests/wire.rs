//! A real `mcvmm run --secondary` (it needs no KVM until it takes over, so this runs on
//! any machine) against a peer that sends what no honest primary sends: every bad stream
//! is refused with its reason, nothing of it reaches the disk, the secondary goes on
//! waiting for a primary and never panics.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use mcvmm_checkpoint::state::{DiskShape, VmShape, FORMAT_VERSION};
use mcvmm_replication::messages::{self, disk_header, pages_header, Hello, PageEncoding};
use mcvmm_replication::wire::{self, Kind};
use mcvmm_tests::workspace_command;

const DISK: u64 = 1 << 20;

struct Secondary {
    child: Child,
    addr: String,
    dir: std::path::PathBuf,
}

impl Drop for Secondary {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

fn secondary() -> Secondary {
    let dir =
        std::env::temp_dir().join(format!("mcvmm-wire-{}-{}", std::process::id(), free_port()));
    std::fs::create_dir_all(&dir).expect("dir");
    let disk = dir.join("disk.img");
    std::fs::File::create(&disk)
        .and_then(|f| f.set_len(DISK))
        .expect("disk");
    let addr = format!("127.0.0.1:{}", free_port());
    let child = workspace_command("mcvmm")
        .args(["run", "--secondary", "--listen", &addr, "--disk"])
        .arg(&disk)
        .arg("--api-sock")
        .arg(dir.join("api.sock"))
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(dir.join("log")).expect("log"))
        .spawn()
        .expect("mcvmm");
    Secondary { child, addr, dir }
}

fn hello() -> Hello {
    Hello {
        protocol: messages::PROTOCOL_VERSION,
        state_format: FORMAT_VERSION,
        shape: VmShape {
            mem_mib: 16,
            vcpus: 1,
            disks: vec![DiskShape {
                size_bytes: DISK,
                read_only: false,
            }],
            net: None,
        },
        generation: 1,
        chunk_bytes: 1 << 20,
    }
}

impl Secondary {
    fn connect(&self) -> TcpStream {
        let t = Instant::now();
        loop {
            match TcpStream::connect(&self.addr) {
                Ok(s) => {
                    s.set_read_timeout(Some(Duration::from_secs(20)))
                        .expect("timeout");
                    return s;
                }
                Err(e) if t.elapsed() > Duration::from_secs(20) => {
                    panic!("secondary at {}: {e}; log: {}", self.addr, self.log())
                }
                Err(_) => std::thread::sleep(Duration::from_millis(50)),
            }
        }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(self.dir.join("log")).unwrap_or_default()
    }

    fn disk(&self) -> Vec<u8> {
        std::fs::read(self.dir.join("disk.img")).expect("disk")
    }

    /// Sends `hello`, returns the answer's kind and payload.
    fn handshake(&self, hello: &Hello) -> (TcpStream, Kind, String) {
        let mut s = self.connect();
        wire::write_frame(&mut s, Kind::Hello, 0, &[&messages::encode(hello)]).expect("hello");
        let mut payload = Vec::new();
        let h = wire::read_frame(&mut s, &mut payload).expect("an answer");
        (s, h.kind, String::from_utf8_lossy(&payload).into_owned())
    }

    /// After an accepted handshake and a finished sync, sends `frames`; returns the reason
    /// the secondary gave for dropping the connection.
    fn refused_after(&self, frames: &[u8]) -> String {
        let (mut s, kind, _) = self.handshake(&hello());
        assert_eq!(kind, Kind::Accept);
        wire::write_frame(&mut s, Kind::SyncDone, 0, &[]).expect("sync done");
        s.write_all(frames).expect("frames");
        let mut payload = Vec::new();
        loop {
            match wire::read_frame(&mut s, &mut payload) {
                Ok(h) if h.kind == Kind::Heartbeat || h.kind == Kind::Ack => continue,
                Ok(h) if h.kind == Kind::Refuse => {
                    return String::from_utf8_lossy(&payload).into_owned()
                }
                other => panic!("expected a refusal, got {other:?}; log: {}", self.log()),
            }
        }
    }
}

fn frame(kind: Kind, epoch: u64, parts: &[&[u8]]) -> Vec<u8> {
    let mut out = Vec::new();
    wire::write_frame(&mut out, kind, epoch, parts).expect("frame");
    out
}

/// Epoch 1 up to (not including) its end: a disk write and a page.
fn epoch_one() -> Vec<u8> {
    let mut out = frame(Kind::DiskWrite, 1, &[&disk_header(0, 0), &[0xEE; 512]]);
    out.extend(frame(Kind::Begin, 1, &[]));
    out.extend(frame(
        Kind::Pages,
        1,
        &[&pages_header(0x1000, 1, PageEncoding::Raw), &[7u8; 4096]],
    ));
    out
}

#[test]
fn a_secondary_refuses_bad_peers_with_the_reason_and_applies_nothing() {
    let sec = secondary();

    let mut h = hello();
    h.protocol = 99;
    let (_, kind, why) = sec.handshake(&h);
    assert_eq!(kind, Kind::Refuse);
    assert!(why.contains("protocol version 99"), "{why}");

    let mut h = hello();
    h.shape.disks[0].size_bytes = 2 * DISK;
    let (_, kind, why) = sec.handshake(&h);
    assert_eq!(kind, Kind::Refuse);
    assert!(why.contains("disk 1"), "{why}");

    // Not a frame at all.
    let mut s = sec.connect();
    s.write_all(b"GET / HTTP/1.0\r\n\r\n").expect("garbage");
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);

    // A bit flipped in transit, inside epoch 1.
    let mut bad = epoch_one();
    let n = bad.len();
    bad[n - 200] ^= 4;
    let why = sec.refused_after(&bad);
    assert!(why.contains("checksum"), "{why}");

    // Pages past the end of guest memory (16 MiB).
    let mut bad = frame(Kind::DiskWrite, 1, &[&disk_header(0, 0), &[0xEE; 512]]);
    bad.extend(frame(Kind::Begin, 1, &[]));
    bad.extend(frame(
        Kind::Pages,
        1,
        &[&pages_header(16 << 20, 1, PageEncoding::Raw), &[7u8; 4096]],
    ));
    let why = sec.refused_after(&bad);
    assert!(why.contains("outside guest memory"), "{why}");

    // A disk write past the disk's end.
    let bad = frame(
        Kind::DiskWrite,
        1,
        &[&disk_header(0, DISK - 256), &[0xEE; 512]],
    );
    let why = sec.refused_after(&bad);
    assert!(why.contains("past its end"), "{why}");

    // An epoch whose end lies about its contents.
    let mut bad = epoch_one();
    bad.extend(frame(
        Kind::End,
        1,
        &[&messages::encode(&messages::End {
            pages: 1,
            disk_writes: 1,
            memory_digest: None,
            disk_digests: None,
        })],
    ));
    let why = sec.refused_after(&bad);
    assert!(why.contains("without its machine state"), "{why}");

    assert!(
        sec.disk().iter().all(|b| *b == 0),
        "a write of an epoch that never committed reached the disk"
    );
    let status = mcvmm_tests::workspace_command("mcvmm")
        .args(["ctl", "--api-sock"])
        .arg(sec.dir.join("api.sock"))
        .arg("status")
        .output()
        .expect("ctl");
    let status = String::from_utf8_lossy(&status.stdout);
    assert!(status.contains("\"role\": \"secondary\""), "{status}");
    assert!(status.contains("\"last_committed_epoch\": 0"), "{status}");
    let log = sec.log();
    assert!(!log.contains("panicked"), "{log}");
    assert!(log.contains("not taking over"), "{log}");
}
