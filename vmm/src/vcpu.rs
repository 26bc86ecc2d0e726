//! vCPUs: CPUID and initial state, and one thread each running `KVM_RUN`, handling port
//! and MMIO exits through the buses, and reporting how the guest ended.

use std::cell::Cell;
use std::os::unix::thread::JoinHandleExt;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::thread::JoinHandle;
use std::time::Duration;

use kvm_bindings::{kvm_run, CpuId};
use kvm_ioctls::{VcpuExit, VcpuFd};
use mcvmm_checkpoint::state::VcpuState;
use mcvmm_devices::bus::Bus;
use mcvmm_devices::i8042::ResetLine;
use vmm_sys_util::eventfd::EventFd;

use crate::vcpu_state;

const KVM_SYSTEM_EVENT_SHUTDOWN: u32 = 1;
const KVM_SYSTEM_EVENT_RESET: u32 = 2;

/// How `ExitReason::GuestEnded` names a reset through the i8042, whichever thread sees it
/// first (the vCPU that wrote it, or the device loop woken by it).
pub const I8042_RESET: &str = "reset (i8042)";
pub const POWER_OFF: &str = "power off";

/// Why the VM stopped running.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ExitReason {
    /// The guest asked for a reset (i8042) or a power-off: a clean end.
    GuestEnded(&'static str),
    /// A triple fault: the guest crashed.
    TripleFault { vcpu: u8 },
    /// KVM could not run the vCPU.
    Failed { vcpu: u8, why: String },
    /// SIGTERM/SIGINT or `ctl stop`.
    Stopped,
    /// `ctl failover`: the secondary runs the guest from this epoch's checkpoint.
    HandedOver(u64),
    /// Another node won the fence: this one stopped its guest (the line says who).
    Fenced(String),
}

/// The first reason wins; the eventfd wakes the device loop.
pub struct VmExit {
    pub evt: EventFd,
    reason: Mutex<Option<ExitReason>>,
    /// Raised by the i8042 (see `ResetLine`).
    reset: Arc<AtomicBool>,
}

impl VmExit {
    pub fn new() -> std::io::Result<VmExit> {
        Ok(VmExit {
            evt: EventFd::new(libc::EFD_NONBLOCK)?,
            reason: Mutex::new(None),
            reset: Arc::new(AtomicBool::new(false)),
        })
    }

    /// What the i8042 raises for a guest reset: this exit's flag and eventfd.
    pub fn reset_line(&self) -> std::io::Result<ResetLine> {
        Ok(ResetLine {
            requested: self.reset.clone(),
            wake: self.evt.try_clone()?,
        })
    }

    fn reset_requested(&self) -> bool {
        self.reset.load(Ordering::SeqCst)
    }

    pub fn set(&self, reason: ExitReason) {
        let mut r = self.reason.lock().unwrap_or_else(PoisonError::into_inner);
        if r.is_none() {
            *r = Some(reason);
        }
        let _ = self.evt.write(1);
    }

    pub fn reason(&self) -> Option<ExitReason> {
        self.reason
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// This vCPU's CPUID: what KVM supports, with the hypervisor bit and a topology the guest
/// can believe: one package of `cpus` cores, one thread each, this vCPU being core `id`
/// (its APIC id). Leaves copied from the host would describe the host's topology and
/// disagree with the MP table. `tsc_deadline`: KVM emulates the local APIC timer's
/// TSC-deadline mode (`KVM_CAP_TSC_DEADLINE_TIMER`; it is never in the supported CPUID,
/// as it depends on the in-kernel irqchip). A guest told so skips calibrating the APIC
/// timer against its tick, about a tenth of a second of every boot.
pub fn cpuid_for(base: &CpuId, id: u8, cpus: u8, tsc_deadline: bool) -> CpuId {
    let mut cpuid = base.clone();
    let core_bits = u32::from(cpus).next_power_of_two().trailing_zeros();
    for e in cpuid.as_mut_slice() {
        match e.function {
            1 => {
                e.ebx = (e.ebx & 0x0000_ffff) | (u32::from(id) << 24) | (u32::from(cpus) << 16);
                if cpus > 1 {
                    e.edx |= 1 << 28; // HTT: the count in EBX is valid
                }
                e.ecx |= 1 << 31; // running under a hypervisor
                if tsc_deadline {
                    e.ecx |= 1 << 24;
                }
            }
            // Deterministic cache parameters: cores per package, no cache shared by threads.
            4 => e.eax = (e.eax & 0x3ff) | (u32::from(cpus - 1) << 26),
            // Extended topology: level 0 is SMT (1 thread), level 1 cores, then the end.
            0xb | 0x1f => {
                (e.eax, e.ebx, e.ecx) = match e.index {
                    0 => (0, 1, 1 << 8),
                    1 => (core_bits, u32::from(cpus), (2 << 8) | 1),
                    n => (0, 0, n & 0xff),
                };
                e.edx = u32::from(id);
            }
            // AMD: number of cores - 1 and the APIC id bits that number them.
            0x8000_0008 => e.ecx = (core_bits << 12) | u32::from(cpus - 1),
            _ => {}
        }
    }
    cpuid
}

/// The signal that kicks a vCPU out of `KVM_RUN`.
fn kick_signal() -> libc::c_int {
    libc::SIGRTMIN()
}

thread_local! {
    /// This vCPU thread's `kvm_run` area, for the kick handler.
    static KVM_RUN: Cell<*mut kvm_run> = const { Cell::new(std::ptr::null_mut()) };
}

extern "C" fn on_kick(_: libc::c_int) {
    // Setting immediate_exit makes a KVM_RUN in progress return EINTR (the signal
    // interrupts it) and the next one return at once: a kick between checking for a
    // pause and entering KVM_RUN cannot be lost.
    let run = KVM_RUN.with(Cell::get);
    if !run.is_null() {
        // SAFETY: set by this thread to its own live kvm_run mapping before any kick
        // could reach it, and cleared before that mapping goes away.
        unsafe { std::ptr::write_volatile(&raw mut (*run).immediate_exit, 1) };
    }
}

/// Installs the kick handler (once per process).
pub fn install_kick_handler() -> std::io::Result<()> {
    // SAFETY: a zeroed sigaction with a handler that only does an async-signal-safe
    // volatile store; sigaction copies the struct.
    unsafe {
        let mut sa: libc::sigaction = std::mem::zeroed();
        sa.sa_sigaction = on_kick as *const () as usize;
        // Other syscalls a vCPU thread makes (device I/O behind port and MMIO exits) go
        // on after a kick; KVM_RUN itself still returns EINTR.
        sa.sa_flags = libc::SA_RESTART;
        libc::sigemptyset(&mut sa.sa_mask);
        if libc::sigaction(kick_signal(), &sa, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
    }
    Ok(())
}

#[derive(Default)]
struct ControlState {
    pause: bool,
    /// Parked vCPUs are to capture their state into `saved`.
    save: bool,
    saved: Vec<(u8, Result<VcpuState, vcpu_state::VcpuStateError>)>,
}

impl ControlState {
    /// Parked vCPUs capture afresh from now on.
    fn ask_capture(&mut self) {
        self.save = true;
        self.saved.clear();
    }
}

/// How the device loop stops and restarts the vCPUs.
#[derive(Default)]
pub struct VcpuControl {
    state: Mutex<ControlState>,
    changed: Condvar,
    pause_requested: AtomicBool,
    /// vCPU threads parked. Changed only under `state`'s lock (so a waiter on `changed`
    /// misses no change), read without it by a pause that spins.
    parked: AtomicUsize,
    /// The MSRs a saved vCPU state carries (KVM's list for this host).
    msr_indices: Vec<u32>,
}

#[derive(Debug, thiserror::Error)]
pub enum PauseError {
    #[error("the vCPUs are not paused")]
    NotPaused,
    #[error("vCPU {0}: {1}")]
    Save(u8, vcpu_state::VcpuStateError),
    #[error("{parked} of {total} vCPUs stopped within {waited:?}")]
    Timeout {
        parked: usize,
        total: usize,
        waited: Duration,
    },
}

impl VcpuControl {
    fn lock(&self) -> std::sync::MutexGuard<'_, ControlState> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub fn new(msr_indices: Vec<u32>) -> VcpuControl {
        VcpuControl {
            msr_indices,
            ..Default::default()
        }
    }

    /// Parks the calling vCPU thread while a pause is asked for, capturing its state
    /// whenever that is asked for meanwhile. The vCPU's own thread does the capture: it
    /// owns the fd, and it is known to be out of KVM_RUN.
    fn park(&self, id: u8, vcpu: &VcpuFd, learned: &mut vcpu_state::Learned) {
        let mut st = self.lock();
        self.parked.fetch_add(1, Ordering::SeqCst);
        self.changed.notify_all();
        while st.pause {
            if st.save && !st.saved.iter().any(|(i, _)| *i == id) {
                drop(st);
                let state = vcpu_state::save(vcpu, id, &self.msr_indices, learned);
                st = self.lock();
                st.saved.push((id, state));
                self.changed.notify_all();
                continue;
            }
            st = self
                .changed
                .wait(st)
                .unwrap_or_else(PoisonError::into_inner);
        }
        self.parked.fetch_sub(1, Ordering::SeqCst);
        self.changed.notify_all();
    }
}

/// How long a pause spins for the vCPUs to stop before it sleeps on the condition
/// variable: `MCVMM_PAUSE_SPIN_US`, 150 unless set (0 never spins, to measure the two).
fn pause_spin() -> Duration {
    static SPIN: std::sync::OnceLock<Duration> = std::sync::OnceLock::new();
    *SPIN.get_or_init(|| {
        let us = std::env::var("MCVMM_PAUSE_SPIN_US")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(150);
        Duration::from_micros(us)
    })
}

pub struct VcpuThread {
    handle: JoinHandle<()>,
}

/// The vCPU threads of a VM, and the way to stop and restart them all.
pub struct Vcpus {
    threads: Vec<VcpuThread>,
    control: Arc<VcpuControl>,
}

impl Vcpus {
    pub fn new(control: Arc<VcpuControl>) -> Vcpus {
        Vcpus {
            threads: Vec::new(),
            control,
        }
    }

    pub fn push(&mut self, t: VcpuThread) {
        self.threads.push(t);
    }

    /// Takes every vCPU out of `KVM_RUN` and keeps it out until `resume`. When this
    /// returns, each vCPU has completed the exit it was handling (KVM has taken the result
    /// of a pending port or MMIO read), so its state is whole. A vCPU whose thread has
    /// ended (the guest is going away) counts as stopped.
    pub fn pause(&self, limit: Duration) -> Result<(), PauseError> {
        self.stop(limit, false)
    }

    /// Like `pause`, and each vCPU captures its state the moment it stops, on its own
    /// thread, while the caller gets on with the dirty log and the copy; `save` then
    /// collects what they captured. A checkpoint's pause is shorter by the capture, which
    /// is a dozen ioctls per vCPU.
    pub fn pause_capturing(&self, limit: Duration) -> Result<(), PauseError> {
        self.stop(limit, true)
    }

    fn stop(&self, limit: Duration, capture: bool) -> Result<(), PauseError> {
        let started = std::time::Instant::now();
        let mut st = self.control.lock();
        if capture {
            st.ask_capture();
        }
        st.pause = true;
        self.control.pause_requested.store(true, Ordering::SeqCst);
        drop(st);
        for t in &self.threads {
            // SAFETY: the thread may have ended, in which case pthread_kill on its (not
            // yet joined) handle fails harmlessly with ESRCH.
            unsafe { libc::pthread_kill(t.handle.as_pthread_t(), kick_signal()) };
        }
        // A vCPU stops within a fraction of a millisecond; sleeping meanwhile would add
        // this thread's own wake-up to every pause (an IPI, in a nested guest hundreds of
        // microseconds). Yielding now and then lets a vCPU thread on this core park.
        let all = self.threads.len();
        while self.control.parked.load(Ordering::SeqCst) < all && started.elapsed() < pause_spin() {
            for _ in 0..64 {
                std::hint::spin_loop();
            }
            std::thread::yield_now();
        }
        let mut st = self.control.lock();
        loop {
            let live = self
                .threads
                .iter()
                .filter(|t| !t.handle.is_finished())
                .count();
            let parked = self.control.parked.load(Ordering::SeqCst);
            if parked >= live {
                return Ok(());
            }
            let waited = started.elapsed();
            if waited >= limit {
                drop(st);
                self.resume();
                return Err(PauseError::Timeout {
                    parked,
                    total: self.threads.len(),
                    waited,
                });
            }
            // Short waits: a thread that ends instead of parking does not notify.
            let wait = (limit - waited).min(Duration::from_millis(5));
            st = self
                .control
                .changed
                .wait_timeout(st, wait)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
    }

    /// Runs `f` with every vCPU out of KVM_RUN: paused for it, unless `already` paused
    /// (and then left so). Memory slots change their dirty-logging flag only this way,
    /// on and off: KVM allows it under running vCPUs, but the lab's nested KVM was seen
    /// to leave a guest faulting for good on a page right after such a change.
    pub fn paused_for<T>(
        &self,
        already: bool,
        limit: Duration,
        f: impl FnOnce() -> T,
    ) -> Result<T, PauseError> {
        if !already {
            self.pause(limit)?;
        }
        let r = f();
        if !already {
            self.resume();
        }
        Ok(r)
    }

    /// Captures every vCPU's state, or collects what they captured as they stopped (see
    /// `pause_capturing`); the vCPUs must be paused (and stay so).
    pub fn save(&self, limit: Duration) -> Result<Vec<VcpuState>, PauseError> {
        let started = std::time::Instant::now();
        let mut st = self.control.lock();
        if !st.pause {
            return Err(PauseError::NotPaused);
        }
        if !st.save {
            st.ask_capture();
            self.control.changed.notify_all();
        }
        while st.saved.len() < self.threads.len() {
            let waited = started.elapsed();
            if waited >= limit {
                st.save = false;
                return Err(PauseError::Timeout {
                    parked: st.saved.len(),
                    total: self.threads.len(),
                    waited,
                });
            }
            st = self
                .control
                .changed
                .wait_timeout(st, limit - waited)
                .unwrap_or_else(PoisonError::into_inner)
                .0;
        }
        st.save = false;
        let mut saved = std::mem::take(&mut st.saved);
        saved.sort_by_key(|(id, _)| *id);
        saved
            .into_iter()
            .map(|(id, r)| r.map_err(|e| PauseError::Save(id, e)))
            .collect()
    }

    /// Lets every vCPU run again.
    pub fn resume(&self) {
        let mut st = self.control.lock();
        st.pause = false;
        // Captures nobody collected (a checkpoint that failed) are stale at the next pause.
        st.save = false;
        self.control.pause_requested.store(false, Ordering::SeqCst);
        self.control.changed.notify_all();
    }
}

/// Starts vCPU `id`; it runs until the guest ends or fails, then reports to `exit`.
pub fn spawn(
    id: u8,
    mut vcpu: VcpuFd,
    pio: Arc<Bus>,
    mmio: Arc<Bus>,
    exit: Arc<VmExit>,
    control: Arc<VcpuControl>,
) -> std::io::Result<VcpuThread> {
    let handle = std::thread::Builder::new()
        .name(format!("vcpu{id}"))
        .spawn(move || {
            KVM_RUN.with(|r| r.set(vcpu.get_kvm_run()));
            let reason = run(id, &mut vcpu, &pio, &mmio, &control, &exit);
            KVM_RUN.with(|r| r.set(std::ptr::null_mut()));
            exit.set(reason);
        })?;
    Ok(VcpuThread { handle })
}

/// Says where a vCPU that triple-faulted stands, as far as KVM still knows.
fn log_triple_fault(id: u8, vcpu: &VcpuFd) {
    if let (Ok(r), Ok(s)) = (vcpu.get_regs(), vcpu.get_sregs()) {
        // On AMD, KVM reinitializes the vCPU when it sees the shutdown, so what is read
        // here is the reset state, not where the guest was.
        let reset = r.rip == 0xfff0 && s.cr0 & 1 == 0;
        tracing::error!(
            "vCPU {id} triple fault at rip {:#x} rsp {:#x} cr0 {:#x} cr3 {:#x} cr4 {:#x} efer {:#x}{}",
            r.rip,
            r.rsp,
            s.cr0,
            s.cr3,
            s.cr4,
            s.efer,
            if reset {
                " (the reset state: KVM reinitialized the vCPU at the shutdown, as it does on AMD; where the guest faulted is not known)"
            } else {
                ""
            }
        );
    }
}

fn run(
    id: u8,
    vcpu: &mut VcpuFd,
    pio: &Bus,
    mmio: &Bus,
    control: &VcpuControl,
    exit: &VmExit,
) -> ExitReason {
    let mut learned = vcpu_state::Learned::default();
    loop {
        if control.pause_requested.load(Ordering::SeqCst) {
            // Enter once more with immediate_exit set: KVM completes the exit just
            // handled (a port or MMIO read's data goes into the registers) and returns
            // EINTR, where the thread parks.
            vcpu.set_kvm_immediate_exit(1);
        }
        match vcpu.run() {
            Ok(VcpuExit::IoIn(port, data)) => {
                if !pio.read(u64::from(port), data) {
                    data.fill(0xff);
                }
            }
            Ok(VcpuExit::IoOut(port, data)) => {
                pio.write(u64::from(port), data);
                if exit.reset_requested() {
                    return ExitReason::GuestEnded(I8042_RESET);
                }
            }
            Ok(VcpuExit::MmioRead(addr, data)) => {
                if !mmio.read(addr, data) {
                    data.fill(0);
                }
            }
            Ok(VcpuExit::MmioWrite(addr, data)) => {
                mmio.write(addr, data);
            }
            Ok(VcpuExit::Hlt) => {}
            Ok(VcpuExit::Shutdown) => {
                log_triple_fault(id, vcpu);
                return ExitReason::TripleFault { vcpu: id };
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_RESET, _)) => {
                return ExitReason::GuestEnded("reset")
            }
            Ok(VcpuExit::SystemEvent(KVM_SYSTEM_EVENT_SHUTDOWN, _)) => {
                return ExitReason::GuestEnded(POWER_OFF)
            }
            Ok(VcpuExit::FailEntry(reason, _)) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("VM entry failed (hardware reason {reason:#x})"),
                }
            }
            Ok(VcpuExit::InternalError) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: "KVM internal error (emulation failure)".into(),
                }
            }
            Ok(other) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("unexpected exit {other:?}"),
                }
            }
            Err(e) if e.errno() == libc::EINTR || e.errno() == libc::EAGAIN => {
                vcpu.set_kvm_immediate_exit(0);
                if control.pause_requested.load(Ordering::SeqCst) {
                    control.park(id, vcpu, &mut learned);
                }
            }
            Err(e) => {
                return ExitReason::Failed {
                    vcpu: id,
                    why: format!("KVM_RUN: {e}"),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kvm_bindings::kvm_cpuid_entry2;

    fn entry(function: u32, index: u32) -> kvm_cpuid_entry2 {
        kvm_cpuid_entry2 {
            function,
            index,
            eax: 0xffff_ffff,
            ebx: 0xffff_ffff,
            ecx: 0xffff_ffff,
            edx: 0xffff_ffff,
            ..Default::default()
        }
    }

    #[test]
    fn topology_names_this_vcpu_among_its_siblings() {
        let base = CpuId::from_entries(&[
            entry(1, 0),
            entry(0xb, 0),
            entry(0xb, 1),
            entry(0xb, 2),
            entry(0x8000_0008, 0),
        ])
        .expect("cpuid");
        let c = cpuid_for(&base, 2, 3, true);
        let get = |f: u32, i: u32| {
            *c.as_slice()
                .iter()
                .find(|e| e.function == f && e.index == i)
                .expect("leaf")
        };
        assert_eq!(get(1, 0).ebx >> 24, 2, "APIC id");
        assert_eq!((get(1, 0).ebx >> 16) & 0xff, 3, "logical count");
        assert_ne!(get(1, 0).ecx & (1 << 31), 0, "hypervisor bit");
        let (smt, core, end) = (get(0xb, 0), get(0xb, 1), get(0xb, 2));
        assert_eq!((smt.ebx, smt.ecx >> 8 & 0xff, smt.edx), (1, 1, 2));
        assert_eq!((core.eax, core.ebx, core.ecx >> 8 & 0xff), (2, 3, 2));
        assert_eq!((end.ebx, end.ecx >> 8 & 0xff), (0, 0));
        assert_eq!(get(0x8000_0008, 0).ecx & 0xff, 2, "cores - 1");
    }

    #[test]
    fn tsc_deadline_is_offered_only_where_kvm_emulates_it() {
        let mut leaf1 = entry(1, 0);
        leaf1.ecx = 0;
        let base = CpuId::from_entries(&[leaf1]).expect("cpuid");
        for on in [true, false] {
            let c = cpuid_for(&base, 0, 1, on);
            assert_eq!(c.as_slice()[0].ecx & (1 << 24) != 0, on);
        }
    }
}
