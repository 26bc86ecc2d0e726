//! Nothing the lab creates outlives it: QEMU processes, run folders, network namespaces.
//!
//! Four layers, because each covers a way out the others miss:
//! * `Drop` of the owning object (normal return, and a panicking test unwinding);
//! * an `atexit` hook and a SIGINT/SIGTERM/SIGHUP handler that clean what is registered;
//! * QEMU gets `PR_SET_PDEATHSIG`, so even a SIGKILL'd lab takes its test hosts along;
//! * names carry the creating PID, and every start removes leftovers of dead PIDs.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Mutex, Once, OnceLock, PoisonError};

#[derive(Debug, Clone)]
pub enum Resource {
    Process(u32),
    Dir(PathBuf),
    Netns(String),
}

static REGISTRY: Mutex<BTreeMap<u64, Resource>> = Mutex::new(BTreeMap::new());
static NEXT: AtomicU64 = AtomicU64::new(1);
static INSTALL: Once = Once::new();

/// Prefix of every name the lab gives to folders and namespaces.
pub fn prefix() -> String {
    format!("mcvmm-lab-{}-", std::process::id())
}

/// Removes the resource when dropped (and on exit or a fatal signal if never dropped).
pub struct Registered(u64);

pub fn register(r: Resource) -> Registered {
    INSTALL.call_once(install_handlers);
    let id = NEXT.fetch_add(1, Ordering::Relaxed);
    REGISTRY
        .lock()
        .unwrap_or_else(PoisonError::into_inner)
        .insert(id, r);
    Registered(id)
}

impl Drop for Registered {
    fn drop(&mut self) {
        let r = REGISTRY
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(&self.0);
        if let Some(r) = r {
            release(&r);
        }
    }
}

fn release(r: &Resource) {
    match r {
        Resource::Process(pid) => {
            // SAFETY: kill takes plain integers.
            unsafe { libc::kill(*pid as libc::pid_t, libc::SIGKILL) };
        }
        Resource::Dir(d) => {
            let _ = std::fs::remove_dir_all(d);
        }
        Resource::Netns(name) => {
            let _ = Command::new("ip").args(["netns", "del", name]).output();
        }
    }
}

/// Releases everything still registered: processes first, then what they were using.
pub fn release_all() {
    let all: Vec<Resource> =
        std::mem::take(&mut *REGISTRY.lock().unwrap_or_else(PoisonError::into_inner))
            .into_values()
            .collect();
    let rank = |r: &Resource| match r {
        Resource::Process(_) => 0,
        Resource::Netns(_) => 1,
        Resource::Dir(_) => 2,
    };
    let mut all = all;
    all.sort_by_key(rank);
    for r in &all {
        release(r);
    }
}

extern "C" fn at_exit() {
    release_all();
}

static SIGNAL_PIPE: OnceLock<libc::c_int> = OnceLock::new();

extern "C" fn on_signal(sig: libc::c_int) {
    if let Some(&fd) = SIGNAL_PIPE.get() {
        let b = sig as u8;
        // SAFETY: write(2) is async-signal-safe; `b` lives for the call.
        unsafe { libc::write(fd, (&b as *const u8).cast(), 1) };
    }
}

fn install_handlers() {
    // SAFETY: registering a plain extern "C" fn with no captured state.
    unsafe { libc::atexit(at_exit) };
    let mut fds = [0; 2];
    // SAFETY: `fds` is a valid array of two ints.
    if unsafe { libc::pipe(fds.as_mut_ptr()) } != 0 {
        return;
    }
    let _ = SIGNAL_PIPE.set(fds[1]);
    let read_fd = fds[0];
    std::thread::spawn(move || {
        let mut b = 0u8;
        // SAFETY: reading one byte into a local.
        let n = unsafe { libc::read(read_fd, (&mut b as *mut u8).cast(), 1) };
        if n == 1 {
            eprintln!("mcvmm-lab: signal {b}, cleaning up test hosts");
            release_all();
            std::process::exit(128 + b as i32);
        }
    });
    for sig in [libc::SIGINT, libc::SIGTERM, libc::SIGHUP] {
        // SAFETY: the handler only calls write(2).
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Spawns a process that dies with this one. `PR_SET_PDEATHSIG` fires when the *thread*
/// that forked exits, so the fork happens on a thread that lives as long as the process
/// (a test host shared by several tests must not die with the first test's thread).
pub fn spawn_tied(mut cmd: Command) -> std::io::Result<Child> {
    type Job = (Command, mpsc::Sender<std::io::Result<Child>>);
    static SPAWNER: OnceLock<Mutex<mpsc::Sender<Job>>> = OnceLock::new();
    let tx = SPAWNER.get_or_init(|| {
        let (tx, rx) = mpsc::channel::<Job>();
        std::thread::spawn(move || {
            for (mut cmd, reply) in rx {
                let _ = reply.send(cmd.spawn());
            }
        });
        Mutex::new(tx)
    });
    use std::os::unix::process::CommandExt;
    // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    let (reply_tx, reply_rx) = mpsc::channel();
    tx.lock()
        .unwrap_or_else(PoisonError::into_inner)
        .send((cmd, reply_tx))
        .map_err(|_| std::io::Error::other("lab spawner thread is gone"))?;
    reply_rx
        .recv()
        .map_err(|_| std::io::Error::other("lab spawner thread is gone"))?
}

fn pid_alive(pid: u32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

/// The PID in a name made with [`prefix`], if the name is one of ours.
fn owner(name: &str) -> Option<u32> {
    name.strip_prefix("mcvmm-lab-")?
        .split('-')
        .next()?
        .parse()
        .ok()
}

/// Removes folders and namespaces left by lab processes that no longer exist.
pub fn remove_stale() {
    if let Ok(entries) = std::fs::read_dir(std::env::temp_dir()) {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            if owner(&name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = std::fs::remove_dir_all(e.path());
            }
        }
    }
    if let Ok(out) = Command::new("ip").args(["netns", "list"]).output() {
        for line in String::from_utf8_lossy(&out.stdout).lines() {
            let name = line.split_whitespace().next().unwrap_or_default();
            if owner(name).is_some_and(|pid| !pid_alive(pid)) {
                let _ = Command::new("ip").args(["netns", "del", name]).output();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn owner_of_names() {
        assert_eq!(owner("mcvmm-lab-123-4"), Some(123));
        assert_eq!(owner("mcvmm-lab-x-4"), None);
        assert_eq!(owner("other-123"), None);
    }

    #[test]
    fn dropped_registration_removes_the_folder() {
        let dir = std::env::temp_dir().join(format!("{}cleanup-test", prefix()));
        std::fs::create_dir_all(&dir).expect("dir");
        drop(register(Resource::Dir(dir.clone())));
        assert!(!dir.exists());
    }
}
