//! Building a VM from its configuration, in two steps. `prepare`: KVM, memory slots,
//! irqchip and PIT (before vCPUs, so their LAPICs are in-kernel), devices on their buses
//! (their command-line entries are part of what gets loaded). `finish`: vCPUs created
//! with their CPUID, the kernel loaded or the state restored, vCPU threads started. A secondary
//! prepares while it receives and only finishes at a takeover.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_ioctls::{Kvm, VmFd};
use mcvmm_checkpoint::dirty::DirtyError;
use mcvmm_checkpoint::persist::{Part, PersistError};
use mcvmm_checkpoint::seams::{DiskWriteSink, OutputGate};
use mcvmm_checkpoint::snapshot::Loaded;
use mcvmm_checkpoint::state::{MachineState, VmShape};
use mcvmm_devices::bus::{Bus, BusError};
use mcvmm_devices::i8042::I8042;
use mcvmm_devices::interrupt::Interrupt;
use mcvmm_devices::serial::Serial;
use mcvmm_devices::virtio::mmio::MmioTransport;
use mcvmm_devices::virtio::tap::{Tap, TapError};
use mcvmm_devices::virtio::DeviceError;
use mcvmm_devices::GuestMemory;
use vm_memory::GuestAddress;

use crate::boot::{self, BootError};
use crate::layout::*;
use crate::vcpu::{Vcpus, VmExit};

mod finish;
mod prepare;
pub use finish::finish;
pub use prepare::prepare;

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
}

/// A console file written a line at a time. The UART flushes its output after every
/// byte, which for a file would be a write(2) per byte the guest prints, its boot log
/// included (in the lab about a tenth of the boot); here that flush does nothing, and a
/// line reaches the file at its newline (a last line without one, when mcvmm ends).
struct ConsoleFile(LineWriter<File>);

impl Write for ConsoleFile {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        self.0.write(buf)
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

#[derive(Debug, Clone)]
pub enum SerialOut {
    Stdout,
    File(PathBuf),
}

/// Where the guest comes from.
#[derive(Debug, Clone)]
pub enum Source {
    Boot {
        kernel: PathBuf,
        initrd: Option<PathBuf>,
        cmdline: String,
    },
    /// A snapshot (see `mcvmm_checkpoint::snapshot`), checked by `load` already.
    Restore(PathBuf),
    /// The last checkpoint a secondary committed (failover).
    Replica { primary: String, epoch: u64 },
}

/// Where replication looks at or holds what the devices do.
#[derive(Default)]
pub struct Seams {
    pub disk_writes: Option<Arc<dyn DiskWriteSink>>,
    pub output: Option<Arc<dyn OutputGate>>,
    /// Filled with a second handle on the tap, for releasing held output.
    pub tap_writer: Option<Arc<OnceLock<File>>>,
    /// The tap, opened before the VM was built (a secondary holds its own from the
    /// start, so that its bridge port is forwarding by the time it takes over).
    pub tap: Option<Tap>,
    /// Announce the guest's MAC on the tap at start (after a failover).
    pub announce: bool,
}

/// Zeroed guest memory of `mem_mib` with the VM's layout (RAM split around the MMIO hole).
pub fn guest_memory(mem_mib: u64) -> Result<GuestMemory, VmError> {
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_mib << 20)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    GuestMemory::from_ranges(&ranges).map_err(|e| VmError::Memory {
        mib: mem_mib,
        why: e.to_string(),
    })
}

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub source: Source,
    pub disks: Vec<DiskConfig>,
    pub tap: Option<String>,
    pub mac: [u8; 6],
    pub mem_mib: u64,
    pub vcpus: u8,
    pub serial: SerialOut,
}

#[derive(Debug, thiserror::Error)]
pub enum VmError {
    #[error("opening /dev/kvm: {0}")]
    Kvm(kvm_ioctls::Error),
    #[error("opening /dev/kvm: it does not answer as KVM (API version 12)")]
    NotKvm,
    #[error("{what}: {source}")]
    KvmCall {
        what: &'static str,
        source: kvm_ioctls::Error,
    },
    #[error("allocating {mib} MiB of guest memory: {why}")]
    Memory { mib: u64, why: String },
    #[error("disk {path}: {source}")]
    Disk {
        path: String,
        source: std::io::Error,
    },
    #[error("serial output {path}: {source}")]
    Serial {
        path: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Tap(#[from] TapError),
    #[error(transparent)]
    Boot(#[from] BootError),
    #[error(transparent)]
    Regs(#[from] boot::regs::RegsError),
    #[error("device: {0}")]
    Device(#[from] DeviceError),
    #[error("bus: {0}")]
    Bus(#[from] BusError),
    #[error("too many devices for the interrupt lines ({0})")]
    TooManyDevices(usize),
    #[error("guest memory: {0}")]
    Slots(DirtyError),
    #[error("restore: {0}")]
    Restore(String),
    #[error("restore: the snapshot does not fit this VM: {0}")]
    Shape(String),
    #[error("restore: {0}")]
    Persist(#[from] PersistError),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

/// A device whose state a checkpoint carries, shared with the bus it is on.
pub type SharedPart = Arc<Mutex<dyn Part + Send>>;

/// Every device whose state a checkpoint carries, each with the name of its part, in
/// the order they are restored: the UART, the keyboard controller, each virtio transport.
/// (A device left out of this list would be restored at power-on state: every device
/// implements `Persist`, and one added to the VM is added here.)
pub fn device_parts(
    serial: &Arc<Mutex<Serial>>,
    i8042: &Arc<Mutex<I8042>>,
    devices: &[Arc<Mutex<MmioTransport>>],
) -> Vec<(String, SharedPart)> {
    let mut parts: Vec<(String, SharedPart)> = vec![
        ("serial".into(), serial.clone()),
        ("i8042".into(), i8042.clone()),
    ];
    for (i, d) in devices.iter().enumerate() {
        parts.push((format!("virtio-mmio.{i}"), d.clone()));
    }
    parts
}

pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

pub struct Vm {
    pub config: VmConfig,
    pub shape: VmShape,
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemory,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    pub vcpus: Vcpus,
    pub exit: Arc<VmExit>,
    pub started: Instant,
    pub cmdline: String,
    /// [`device_parts`] of this VM, made once: every checkpoint's pause saves them, and
    /// building the list there costs the guest time.
    parts: Vec<(String, SharedPart)>,
}

impl Vm {
    /// [`device_parts`] of this VM.
    pub fn device_parts(&self) -> &[(String, SharedPart)] {
        &self.parts
    }
}

/// What a VM is before its guest is loaded or restored: KVM, memory slots, in-kernel
/// irqchip and PIT, devices on their buses with their interrupt lines and ioeventfds.
/// None of it depends on where the guest comes from, so a secondary builds it as soon as
/// it knows the primary's VM and a takeover only has to restore the state.
pub struct Prepared {
    kvm: Kvm,
    config: VmConfig,
    shape: VmShape,
    vm_fd: Arc<VmFd>,
    mem: GuestMemory,
    exit: Arc<VmExit>,
    serial_irq: Arc<Interrupt>,
    i8042: Arc<Mutex<I8042>>,
    pio: Bus,
    mmio: Bus,
    devices: Vec<Arc<Mutex<MmioTransport>>>,
    /// The kernel command line: the user's and the devices' entries.
    cmdline: String,
    /// A second handle on the NIC's tap, to drop stale frames and announce the guest's
    /// MAC when the guest starts (after a failover).
    announce_on: Option<Tap>,
    /// Set when the guest starts, for the NIC's log of its first frames.
    net_started: Arc<OnceLock<Instant>>,
    /// The kernel and initrd being loaded (a VM that boots).
    images: Option<boot::Loading>,
    /// How long each part took, for the build log.
    steps: Vec<(&'static str, f64)>,
    started: Instant,
}

/// Builds and starts a VM: from its kernel, or restored from `snapshot`.
pub fn build(config: VmConfig, snapshot: Option<&Loaded>, seams: Seams) -> Result<Vm, VmError> {
    let mem = guest_memory(config.mem_mib)?;
    finish(
        prepare(config, mem, seams)?,
        snapshot.map(Continue::Snapshot),
    )
}

/// What `finish` continues a prepared VM from.
pub enum Continue<'a> {
    Snapshot(&'a Loaded),
    /// A committed checkpoint whose memory the prepared VM already has.
    Image(&'a MachineState, &'a VmShape),
}
