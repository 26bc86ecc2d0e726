//! A test host: a Linux VM under QEMU's TCG with nested SVM, so that it has a real
//! `kvm_amd` and a `/dev/kvm` on which Linux guests boot. The lab talks to `mcvmm-labd`
//! inside it over a virtio-serial port (see `wire`).

use std::fs::File;
use std::io::Write;
use std::net::Ipv4Addr;
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::assets::{AssetError, HostKernel, ImageBuilder};
use crate::cleanup::{self, Registered, Resource};
use crate::diagnose;
use crate::emulator::{Emulator, EmulatorError};
use crate::net::{self, LabNet};
use crate::wire::{self, Kind, WireError};

/// Time a test host may take from QEMU start to an answering labd.
pub const DEFAULT_BOOT_TIMEOUT: Duration = Duration::from_secs(60);
/// Beyond a command's own time limit (enforced inside), how long the lab waits for the
/// host to answer before it declares it hung and kills it.
const HUNG_GRACE: Duration = Duration::from_secs(30);

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error(transparent)]
    Asset(#[from] AssetError),
    #[error(transparent)]
    Net(#[from] net::NetError),
    #[error("test host {host}: {what}: {source}")]
    Io {
        host: String,
        what: &'static str,
        source: std::io::Error,
    },
    #[error("test host {host} did not come up within {secs} s; last console lines:\n{console}")]
    BootTimeout {
        host: String,
        secs: u64,
        console: String,
    },
    #[error("test host {host} stopped ({status}); last console lines:\n{console}")]
    Died {
        host: String,
        status: String,
        console: String,
    },
    #[error("test host {host} did not answer for {secs} s and was killed; its CPUs were at:\n{cpus}\nlast console lines:\n{console}")]
    Hung {
        host: String,
        secs: u64,
        cpus: String,
        console: String,
    },
    #[error("test host {host}: {msg}")]
    Refused { host: String, msg: String },
    #[error("test host {host}: {source}")]
    Wire { host: String, source: WireError },
    #[error(transparent)]
    Emulator(#[from] EmulatorError),
}

/// What a test host is given.
#[derive(Debug, Clone)]
pub struct HostOptions {
    pub mem_mib: u32,
    pub cpus: u32,
    /// Put QEMU and its firmware in (for the reference VMM).
    pub with_qemu: bool,
    /// (local file, path in the host, relative to `/work` unless absolute)
    pub files: Vec<(PathBuf, String)>,
    /// Like `files`, plus the shared libraries each one loads.
    pub binaries: Vec<(PathBuf, String)>,
    pub boot_timeout: Duration,
    /// One TCG thread for all the host's vCPUs instead of one each. Slower, but guests with
    /// several vCPUs were seen to freeze multi-threaded TCG test hosts now and then.
    pub single_thread_tcg: bool,
    /// The QEMU that emulates the host; `None`: [`Emulator::configured`].
    pub emulator: Option<Emulator>,
}

impl HostOptions {
    /// The emulator these options ask for, or the configured one.
    pub fn emulator(&self) -> Result<Emulator, EmulatorError> {
        self.emulator.map_or_else(Emulator::configured, Ok)
    }
}

impl Default for HostOptions {
    fn default() -> Self {
        HostOptions {
            mem_mib: 2560,
            cpus: 2,
            with_qemu: false,
            files: Vec::new(),
            binaries: Vec::new(),
            boot_timeout: DEFAULT_BOOT_TIMEOUT,
            single_thread_tcg: false,
            emulator: None,
        }
    }
}

/// A finished command.
#[derive(Debug, Clone)]
pub struct Output {
    pub status: i32,
    pub timed_out: bool,
    pub stdout: Vec<u8>,
    pub stderr: Vec<u8>,
}

impl Output {
    pub fn success(&self) -> bool {
        self.status == 0 && !self.timed_out
    }
    pub fn stdout_text(&self) -> String {
        String::from_utf8_lossy(&self.stdout).into_owned()
    }
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr).into_owned()
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

struct Conn {
    writer: UnixStream,
    frames: mpsc::Receiver<Result<(Kind, Vec<u8>), WireError>>,
}

pub struct TestHost {
    pub name: String,
    pub index: usize,
    /// Address on the lab network, if the host is on one.
    pub addr: Option<Ipv4Addr>,
    pub emulator: Emulator,
    pub boot_time: Duration,
    dir: PathBuf,
    child: Mutex<Child>,
    conn: Mutex<Conn>,
    /// Held for a whole request and its answer: tests sharing a host take turns.
    exchange: Mutex<()>,
    /// Set by `kill`: a host that stops answering after it is no news.
    killed: AtomicBool,
    // Order matters: the process is killed before its folder goes.
    _process: Registered,
    _dir: Registered,
}

impl TestHost {
    /// Boots a test host and waits until its labd answers.
    pub fn boot(
        index: usize,
        opts: &HostOptions,
        kernel: &HostKernel,
        labd: &Path,
        net: Option<&LabNet>,
    ) -> Result<TestHost, HostError> {
        let name = format!("labhost{index}");
        let io = |what: &'static str| {
            let host = name.clone();
            move |source| HostError::Io { host, what, source }
        };
        // Several labs may run in one process (tests): every host gets its own folder.
        static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
        let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("{}{seq}-{name}", cleanup::prefix()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).map_err(io("creating run folder"))?;
        let dir_reg = cleanup::register(Resource::Dir(dir.clone()));
        // MCVMM_LAB_LOGS keeps consoles after the run (post-mortems of CI failures).
        let console = match std::env::var_os("MCVMM_LAB_LOGS") {
            Some(logs) => {
                let logs = PathBuf::from(logs);
                std::fs::create_dir_all(&logs).map_err(io("creating MCVMM_LAB_LOGS folder"))?;
                logs.join(format!("{}{seq}-{name}.console.log", cleanup::prefix()))
            }
            None => dir.join("console.log"),
        };
        if console != dir.join("console.log") {
            // Error messages read the console through the run folder either way.
            std::os::unix::fs::symlink(&console, dir.join("console.log"))
                .map_err(io("linking the console log"))?;
        }

        let initrd = dir.join("initrd.cpio");
        let mut image = ImageBuilder::new(std::io::BufWriter::new(
            File::create(&initrd).map_err(io("writing initramfs"))?,
        ));
        image.base(kernel, labd)?;
        if opts.with_qemu {
            image.qemu()?;
        }
        for (local, dest) in &opts.binaries {
            image.binary(local, &in_work(dest))?;
        }
        for (local, dest) in &opts.files {
            image.copy(local, &in_work(dest), file_mode(local))?;
        }
        image.finish()?.flush().map_err(io("writing initramfs"))?;

        let addr = net.map(|_| net::host_addr(index));
        // Transparent huge pages off: with them, a guest under nested KVM here (TCG's SVM
        // emulation) was found stuck for good with a corrupted cr3 and rip after its VMM had
        // read all of its memory (the checkpoint self-check; `mcvmm ctl vcpus` showed it),
        // in about half the runs; with them off, in none (see the notes of issue 5). Real
        // hosts keep theirs: this is about the emulated MMU of the lab.
        let mut append = format!(
            "console=ttyS0 panic=-1 tsc_early_khz=2600000 transparent_hugepage=never nokaslr lab.name={name}"
        );
        if std::env::var_os("MCVMM_LAB_VERBOSE").is_none() {
            append += " quiet";
        }
        if let Some(a) = addr {
            append += &format!(" lab.ip={a}/{}", net::SUBNET_PREFIX);
        }
        let sock = dir.join("ctl.sock");
        let emulator = opts.emulator()?;
        let (qemu, qemu_args) = emulator.command()?;
        let mut cmd = match net {
            Some(n) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", &n.ns]).arg(&qemu);
                c
            }
            None => Command::new(&qemu),
        };
        cmd.args(&qemu_args);
        let tcg = if opts.single_thread_tcg {
            "tcg,thread=single"
        } else {
            "tcg,thread=multi"
        };
        cmd.args(["-accel", tcg])
            .args(["-cpu", "qemu64,+svm,+npt,+sse4.1,+sse4.2,+ssse3,+popcnt"])
            .args([
                "-M",
                "q35",
                "-nodefaults",
                "-no-user-config",
                "-display",
                "none",
                "-no-reboot",
            ])
            .args([
                "-smp",
                &opts.cpus.to_string(),
                "-m",
                &opts.mem_mib.to_string(),
            ])
            .arg("-kernel")
            .arg(&kernel.vmlinuz)
            .arg("-initrd")
            .arg(&initrd)
            .args(["-append", &append])
            .arg("-serial")
            .arg(format!("file:{}", console.display()))
            .args(["-device", "virtio-serial-pci,id=vser0"])
            .arg("-chardev")
            .arg(format!(
                "socket,id=ctl,path={},server=on,wait=off",
                sock.display()
            ))
            .args([
                "-device",
                "virtserialport,bus=vser0.0,chardev=ctl,name=mcvmm.lab",
            ])
            // QEMU's human monitor: where each CPU of a hung test host is (`diagnose`).
            .arg("-monitor")
            .arg(format!(
                "unix:{},server=on,wait=off",
                dir.join("monitor.sock").display()
            ));
        if net.is_some() {
            cmd.args([
                "-netdev",
                &format!(
                    "tap,id=n0,ifname={},script=no,downscript=no",
                    LabNet::tap(index)
                ),
            ])
            .args([
                "-device",
                &format!(
                    "virtio-net-pci,netdev=n0,mac=52:54:00:77:00:{:02x}",
                    10 + index
                ),
            ]);
        }
        let log = File::create(dir.join("qemu.log")).map_err(io("creating qemu.log"))?;
        cmd.stdin(Stdio::null())
            .stdout(log.try_clone().map_err(io("qemu.log"))?)
            .stderr(log);
        let started = Instant::now();
        let child = cleanup::spawn_tied(cmd).map_err(|e| HostError::Io {
            host: name.clone(),
            what: "starting the test host's QEMU (scripts/setup.sh installs it)",
            source: e,
        })?;
        let process = cleanup::register(Resource::Process(child.id()));
        let child = Mutex::new(child);

        let writer = loop {
            if let Ok(s) = UnixStream::connect(&sock) {
                break s;
            }
            if let Some(err) = Self::exited(&name, &child, &dir) {
                return Err(err);
            }
            if started.elapsed() > opts.boot_timeout {
                return Err(HostError::BootTimeout {
                    host: name,
                    secs: opts.boot_timeout.as_secs(),
                    console: tail(&dir),
                });
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        let mut reader = writer.try_clone().map_err(io("control socket"))?;
        let (tx, frames) = mpsc::channel();
        std::thread::spawn(move || loop {
            let frame = wire::read_frame(&mut reader);
            let end = frame.is_err();
            if tx.send(frame).is_err() || end {
                break;
            }
        });
        let mut host = TestHost {
            name,
            index,
            addr,
            emulator,
            boot_time: Duration::ZERO,
            dir,
            child,
            conn: Mutex::new(Conn { writer, frames }),
            exchange: Mutex::new(()),
            killed: AtomicBool::new(false),
            _process: process,
            _dir: dir_reg,
        };
        host.send(Kind::Ping, &[])?;
        match host.recv(started + opts.boot_timeout, true)? {
            (Kind::Ok, _) => {}
            (kind, _) => {
                return Err(HostError::Refused {
                    host: host.name.clone(),
                    msg: format!("answered {kind:?} to PING"),
                })
            }
        }
        host.boot_time = started.elapsed();
        Ok(host)
    }

    fn exited(name: &str, child: &Mutex<Child>, dir: &Path) -> Option<HostError> {
        let mut c = child.lock().unwrap_or_else(PoisonError::into_inner);
        match c.try_wait() {
            Ok(Some(status)) => {
                let qemu = std::fs::read_to_string(dir.join("qemu.log")).unwrap_or_default();
                Some(HostError::Died {
                    host: name.to_string(),
                    status: format!("{status}; qemu said: {}", qemu.trim()),
                    console: tail(dir),
                })
            }
            _ => None,
        }
    }

    fn send(&self, kind: Kind, parts: &[&[u8]]) -> Result<(), HostError> {
        let mut conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        wire::write_frame(&mut conn.writer, kind, parts).map_err(|source| HostError::Wire {
            host: self.name.clone(),
            source,
        })
    }

    /// Next frame from labd, or an error naming why none came by `deadline`.
    fn recv(&self, deadline: Instant, booting: bool) -> Result<(Kind, Vec<u8>), HostError> {
        let conn = self.conn.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            match conn.frames.recv_timeout(Duration::from_millis(250)) {
                Ok(Ok(frame)) => return Ok(frame),
                Ok(Err(_)) | Err(mpsc::RecvTimeoutError::Disconnected) => {
                    // Give QEMU a moment to be reaped so the error can say how it ended.
                    std::thread::sleep(Duration::from_millis(200));
                    return Err(Self::exited(&self.name, &self.child, &self.dir).unwrap_or(
                        HostError::Died {
                            host: self.name.clone(),
                            status: "control channel closed".into(),
                            console: tail(&self.dir),
                        },
                    ));
                }
                Err(mpsc::RecvTimeoutError::Timeout) => {
                    if let Some(err) = Self::exited(&self.name, &self.child, &self.dir) {
                        return Err(err);
                    }
                    if Instant::now() >= deadline {
                        let cpus = diagnose::cpu_places(&self.dir.join("monitor.sock"))
                            .unwrap_or_else(|e| format!("(QEMU's monitor: {e})"));
                        self.kill();
                        let console = tail(&self.dir);
                        return Err(if booting {
                            HostError::BootTimeout {
                                host: self.name.clone(),
                                secs: DEFAULT_BOOT_TIMEOUT.as_secs(),
                                console,
                            }
                        } else {
                            HostError::Hung {
                                host: self.name.clone(),
                                secs: HUNG_GRACE.as_secs(),
                                cpus,
                                console,
                            }
                        });
                    }
                }
            }
        }
    }

    fn expect_ok(&self, deadline: Instant) -> Result<Vec<u8>, HostError> {
        match self.recv(deadline, false)? {
            (Kind::Ok, data) => Ok(data),
            (Kind::Err, msg) => Err(HostError::Refused {
                host: self.name.clone(),
                msg: String::from_utf8_lossy(&msg).into_owned(),
            }),
            (kind, _) => Err(HostError::Refused {
                host: self.name.clone(),
                msg: format!("unexpected {kind:?} frame"),
            }),
        }
    }

    /// Runs `sh -c command` in `/work`, passing output to `on_output` as it comes. The
    /// command is killed (with its process group) after `timeout`.
    pub fn run_streaming(
        &self,
        command: &str,
        timeout: Duration,
        on_output: &mut dyn FnMut(Stream, &[u8]),
    ) -> Result<Output, HostError> {
        let ms = u32::try_from(timeout.as_millis()).unwrap_or(u32::MAX);
        let _turn = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        self.send(Kind::Run, &[&wire::encode_run(ms, command)])?;
        let deadline = Instant::now() + timeout + HUNG_GRACE;
        let mut out = Output {
            status: -1,
            timed_out: false,
            stdout: Vec::new(),
            stderr: Vec::new(),
        };
        loop {
            match self.recv(deadline, false)? {
                (Kind::Stdout, d) => {
                    on_output(Stream::Stdout, &d);
                    out.stdout.extend_from_slice(&d);
                }
                (Kind::Stderr, d) => {
                    on_output(Stream::Stderr, &d);
                    out.stderr.extend_from_slice(&d);
                }
                (Kind::Exit, p) => {
                    let (code, timed_out) =
                        wire::decode_exit(&p).map_err(|source| HostError::Wire {
                            host: self.name.clone(),
                            source,
                        })?;
                    out.status = code;
                    out.timed_out = timed_out;
                    return Ok(out);
                }
                (Kind::Err, msg) => {
                    return Err(HostError::Refused {
                        host: self.name.clone(),
                        msg: String::from_utf8_lossy(&msg).into_owned(),
                    })
                }
                (kind, _) => {
                    return Err(HostError::Refused {
                        host: self.name.clone(),
                        msg: format!("unexpected {kind:?} frame"),
                    })
                }
            }
        }
    }

    /// Runs a command and collects its output.
    pub fn run(&self, command: &str, timeout: Duration) -> Result<Output, HostError> {
        self.run_streaming(command, timeout, &mut |_, _| {})
    }

    /// Writes `data` to `dest` (relative to `/work` unless absolute).
    pub fn put(&self, data: &[u8], dest: &str, mode: u32) -> Result<(), HostError> {
        let head = wire::encode_put(mode, dest, data.len()).map_err(|source| HostError::Wire {
            host: self.name.clone(),
            source,
        })?;
        let _turn = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        self.send(Kind::Put, &[&head, data])?;
        self.expect_ok(Instant::now() + HUNG_GRACE + Duration::from_secs(data.len() as u64 >> 20))
            .map(|_| ())
    }

    /// Copies a local file in, keeping its permission bits.
    pub fn put_file(&self, local: &Path, dest: &str) -> Result<(), HostError> {
        let data = std::fs::read(local).map_err(|source| HostError::Io {
            host: self.name.clone(),
            what: "reading the file to copy",
            source,
        })?;
        self.put(&data, dest, file_mode(local))
    }

    /// Copies a binary in, with the shared libraries it loads.
    pub fn put_binary(&self, local: &Path, dest: &str) -> Result<(), HostError> {
        let files = crate::assets::with_libraries(local)?;
        self.put_file(&files[0], dest)?;
        for lib in &files[1..] {
            self.put_file(lib, &lib.to_string_lossy())?;
        }
        Ok(())
    }

    /// Reads a file from the host.
    pub fn get(&self, path: &str) -> Result<Vec<u8>, HostError> {
        let _turn = self.exchange.lock().unwrap_or_else(PoisonError::into_inner);
        self.send(Kind::Get, &[path.as_bytes()])?;
        self.expect_ok(Instant::now() + HUNG_GRACE * 2)
    }

    /// Cuts the power: SIGKILL to QEMU (failover drills kill whole hosts this way).
    pub fn kill(&self) {
        self.killed.store(true, Ordering::SeqCst);
        let mut c = self.child.lock().unwrap_or_else(PoisonError::into_inner);
        let _ = c.kill();
        let _ = c.wait();
    }

    /// Whether `kill` cut this host's power.
    pub fn was_killed(&self) -> bool {
        self.killed.load(Ordering::SeqCst)
    }

    /// The last lines the host printed on its console.
    pub fn console_tail(&self) -> String {
        tail(&self.dir)
    }

    /// Everything the host printed on its console.
    pub fn console(&self) -> String {
        std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default()
    }

    /// The first line in which the host's kernel reported a CPU stuck in the kernel (a
    /// soft lockup, an RCU stall, a task blocked for minutes), if it did. Such a host may
    /// still run short commands on its other CPU and answer the lab, yet hang whatever
    /// lands on the stuck one (seen when TCG lost a kernel code patch, which
    /// `mcvmm-labd` now avoids; see `hold_kvm_static_keys` there).
    pub fn kernel_stall(&self) -> Option<String> {
        diagnose::stall_line(
            &std::fs::read_to_string(self.dir.join("console.log")).unwrap_or_default(),
        )
    }

    /// Whether the host still runs commands and its kernel reported no stuck CPU (see
    /// [`TestHost::kernel_stall`]: such a host may answer yet hang what it is given).
    pub fn healthy(&self) -> bool {
        !self.was_killed()
            && self.kernel_stall().is_none()
            && self
                .run("true", Duration::from_secs(20))
                .is_ok_and(|o| o.success())
    }
}

impl Drop for TestHost {
    fn drop(&mut self) {
        self.kill();
    }
}

fn in_work(dest: &str) -> String {
    if dest.starts_with('/') {
        dest.to_string()
    } else {
        format!("/work/{dest}")
    }
}

fn file_mode(path: &Path) -> u32 {
    use std::os::unix::fs::PermissionsExt;
    std::fs::metadata(path)
        .map(|m| m.permissions().mode() & 0o7777)
        .unwrap_or(0o644)
}

fn tail(dir: &Path) -> String {
    let text = std::fs::read_to_string(dir.join("console.log")).unwrap_or_default();
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(15)..].join("\n")
}
