//! The agent's request handling, independent of where it runs: in the guest the disks are
//! `/dev/vdX`; in unit tests `dev_dir` is a temporary folder of plain files.

use std::fs::OpenOptions;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{TcpListener, TcpStream};
use std::os::unix::fs::FileExt;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use crate::memload::MemLoad;
use crate::proto::{encode_hex, Reply, Request, MAX_LINE};

#[derive(Default)]
struct Counters {
    requests: AtomicU64,
    errors: AtomicU64,
    writes: AtomicU64,
    write_bytes: AtomicU64,
    reads: AtomicU64,
    read_bytes: AtomicU64,
}

/// What the caller must do after sending a reply.
#[derive(Debug, PartialEq, Eq)]
pub enum After {
    Continue,
    /// The client asked for the guest to end.
    Shutdown,
}

pub struct Agent {
    dev_dir: PathBuf,
    started: Instant,
    /// Distinguishes one run of the agent from the next: after a restore it must not change.
    boot_id: u64,
    counters: Counters,
    mem: Mutex<Option<MemLoad>>,
}

impl Agent {
    pub fn new(dev_dir: PathBuf) -> Agent {
        let now = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Agent {
            dev_dir,
            started: Instant::now(),
            boot_id: now ^ (std::process::id() as u64) << 32,
            counters: Counters::default(),
            mem: Mutex::new(None),
        }
    }

    /// Answers one request line.
    pub fn handle_line(&self, line: &str) -> (Reply, After) {
        self.counters.requests.fetch_add(1, Ordering::Relaxed);
        let result = Request::parse(line)
            .map_err(|e| e.to_string())
            .and_then(|req| self.handle(req));
        match result {
            Ok(ok) => ok,
            Err(msg) => {
                self.counters.errors.fetch_add(1, Ordering::Relaxed);
                (Reply::Err(msg), After::Continue)
            }
        }
    }

    fn handle(&self, req: Request) -> Result<(Reply, After), String> {
        let ok = |s: String| Ok((Reply::Ok(s), After::Continue));
        match req {
            Request::Ping => ok("pong".into()),
            Request::Status => ok(self.status()),
            Request::Shutdown => Ok((Reply::Ok(String::new()), After::Shutdown)),
            Request::Write { disk, offset, data } => {
                let file = OpenOptions::new()
                    .write(true)
                    .open(self.dev_dir.join(&disk))
                    .map_err(|e| format!("open {disk}: {e}"))?;
                file.write_all_at(&data, offset)
                    .map_err(|e| format!("write {disk} at {offset}: {e}"))?;
                // The reply is the acknowledgement: it must not leave before the data is
                // on the device, past the guest's page cache.
                file.sync_data()
                    .map_err(|e| format!("fdatasync {disk}: {e}"))?;
                self.counters.writes.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .write_bytes
                    .fetch_add(data.len() as u64, Ordering::Relaxed);
                ok(data.len().to_string())
            }
            Request::Read { disk, offset, len } => {
                let file = OpenOptions::new()
                    .read(true)
                    .open(self.dev_dir.join(&disk))
                    .map_err(|e| format!("open {disk}: {e}"))?;
                let mut buf = vec![0u8; len as usize];
                file.read_exact_at(&mut buf, offset)
                    .map_err(|e| format!("read {disk} at {offset}: {e}"))?;
                self.counters.reads.fetch_add(1, Ordering::Relaxed);
                self.counters
                    .read_bytes
                    .fetch_add(len as u64, Ordering::Relaxed);
                ok(encode_hex(&buf))
            }
            Request::MemStart { mib, pages_per_sec } => {
                let total_mib = mem_total_kib() / 1024;
                // Leave room for the kernel and the agent itself, or the guest OOMs.
                if total_mib != 0 && u64::from(mib) + 32 > total_mib {
                    return Err(format!(
                        "{mib} MiB does not fit in a guest with {total_mib} MiB"
                    ));
                }
                let mut mem = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
                *mem = None; // stop the old writer before allocating the new region
                *mem = Some(MemLoad::start(mib, pages_per_sec));
                ok(String::new())
            }
            Request::MemVerify => {
                let mem = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
                let load = mem.as_ref().ok_or("no memory workload running")?;
                let v = load.verify();
                ok(format!("pages={} errors={}", v.pages, v.errors))
            }
            Request::DiskBench { disk, mib } => {
                let (w, r) = disk_bench(&self.dev_dir.join(&disk), mib)
                    .map_err(|e| format!("{disk}: {e}"))?;
                ok(format!("write_mbps={w:.1} read_mbps={r:.1}"))
            }
            Request::CpuBench { ms } => {
                let until = std::time::Instant::now() + std::time::Duration::from_millis(ms.into());
                let (mut x, mut iters) = (0x9e37_79b9_7f4a_7c15u64, 0u64);
                while std::time::Instant::now() < until {
                    for _ in 0..10_000 {
                        x ^= x << 13;
                        x ^= x >> 7;
                        x ^= x << 17;
                    }
                    iters += 10_000;
                }
                ok(format!("iters={iters} x={:x}", x & 0xff))
            }
            Request::BadChain { disk, kind } => {
                let outcome = crate::badchain::run(&disk, kind)?;
                ok(outcome.to_string())
            }
            Request::MemStop => {
                *self.mem.lock().unwrap_or_else(PoisonError::into_inner) = None;
                ok(String::new())
            }
        }
    }

    fn status(&self) -> String {
        let c = &self.counters;
        let get = |a: &AtomicU64| a.load(Ordering::Relaxed);
        let mem = self.mem.lock().unwrap_or_else(PoisonError::into_inner);
        let (mib, rate, written, passes) = match mem.as_ref() {
            Some(m) => (
                m.mib,
                m.pages_per_sec,
                get(&m.stats().pages_written),
                get(&m.stats().passes),
            ),
            None => (0, 0, 0, 0),
        };
        format!(
            "boot_id={:016x} uptime_ms={} cpus={} mem_total_kib={} requests={} errors={} \
             writes={} write_bytes={} reads={} read_bytes={} mem_mib={} mem_rate={} \
             mem_pages_written={} mem_passes={}",
            self.boot_id,
            self.started.elapsed().as_millis(),
            online_cpus(),
            mem_total_kib(),
            get(&c.requests),
            get(&c.errors),
            get(&c.writes),
            get(&c.write_bytes),
            get(&c.reads),
            get(&c.read_bytes),
            mib,
            rate,
            written,
            passes,
        )
    }
}

/// Sequential write then read of `mib` MiB in 1 MiB requests, bypassing the page cache
/// where the file system allows it (block devices do); MB/s each way.
fn disk_bench(path: &std::path::Path, mib: u32) -> std::io::Result<(f64, f64)> {
    use std::os::unix::fs::OpenOptionsExt;
    const CHUNK: usize = 1 << 20;
    #[repr(C, align(4096))]
    struct Aligned([u8; CHUNK]);
    let mut buf = Box::new(Aligned([0x5a; CHUNK]));
    let open = |direct: bool| {
        OpenOptions::new()
            .read(true)
            .write(true)
            .custom_flags(if direct { libc::O_DIRECT } else { 0 })
            .open(path)
    };
    let file = open(true).or_else(|_| open(false))?;
    let start = Instant::now();
    for i in 0..u64::from(mib) {
        file.write_all_at(&buf.0, i * CHUNK as u64)?;
    }
    file.sync_data()?;
    let write_s = start.elapsed().as_secs_f64();
    let start = Instant::now();
    for i in 0..u64::from(mib) {
        file.read_exact_at(&mut buf.0, i * CHUNK as u64)?;
    }
    let read_s = start.elapsed().as_secs_f64();
    let mb = f64::from(mib) * CHUNK as f64 / 1e6;
    Ok((mb / write_s.max(1e-9), mb / read_s.max(1e-9)))
}

fn online_cpus() -> u64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let n = unsafe { libc::sysconf(libc::_SC_NPROCESSORS_ONLN) };
    n.max(0) as u64
}

fn mem_total_kib() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        })
        .unwrap_or(0)
}

/// How long a shutdown waits for its client to have read the reply.
const SHUTDOWN_LINGER: std::time::Duration = std::time::Duration::from_secs(2);

/// Sends a reply and its newline in one write: `writeln!` on the socket wrote each piece
/// of the formatted reply, and the newline, as a TCP segment of its own (no delay is set),
/// so a request/response round trip carried two or three segments each way.
fn send_line(writer: &mut TcpStream, reply: &Reply) -> std::io::Result<()> {
    writer.write_all(format!("{reply}\n").as_bytes())
}

/// Serves one connection until it closes. Returns `After::Shutdown` if the client asked
/// for the guest to end (the reply has been sent by then).
pub fn serve_connection(agent: &Agent, stream: TcpStream) -> std::io::Result<After> {
    stream.set_nodelay(true)?;
    let mut writer = stream.try_clone()?;
    let mut reader = BufReader::new(stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        // One byte over the limit tells a long line from one exactly at it.
        let n = (&mut reader)
            .take(MAX_LINE as u64 + 1)
            .read_until(b'\n', &mut line)?;
        if n == 0 {
            return Ok(After::Continue);
        }
        if line.last() != Some(&b'\n') {
            let reply = if line.len() > MAX_LINE {
                Reply::Err(format!("line longer than {MAX_LINE} bytes"))
            } else {
                Reply::Err("connection closed mid-line".into())
            };
            let _ = send_line(&mut writer, &reply);
            return Ok(After::Continue);
        }
        line.pop();
        let (reply, after) = match std::str::from_utf8(&line) {
            Ok(text) => agent.handle_line(text.trim_end_matches('\r')),
            Err(_) => (Reply::Err("request is not UTF-8".into()), After::Continue),
        };
        send_line(&mut writer, &reply)?;
        if after == After::Shutdown {
            // The guest resets next, and a reply still in the NIC's queue would die with
            // it: wait (briefly) for the client to close, which it does once it has read
            // the reply.
            let _ = writer.shutdown(std::net::Shutdown::Write);
            let _ = reader.get_ref().set_read_timeout(Some(SHUTDOWN_LINGER));
            let _ = std::io::copy(&mut reader, &mut std::io::sink());
            return Ok(after);
        }
    }
}

/// Accepts connections forever, a thread each; calls `on_shutdown` when asked to end.
pub fn serve(listener: TcpListener, agent: Arc<Agent>, on_shutdown: fn()) {
    for stream in listener.incoming() {
        let Ok(stream) = stream else { continue };
        let agent = agent.clone();
        std::thread::spawn(move || {
            if let Ok(After::Shutdown) = serve_connection(&agent, stream) {
                on_shutdown();
            }
        });
    }
}
