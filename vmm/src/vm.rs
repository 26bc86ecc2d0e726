//! Building a VM from its configuration, in two steps. `prepare`: KVM, memory slots,
//! irqchip and PIT (before vCPUs, so their LAPICs are in-kernel), devices on their buses
//! (their command-line entries are part of what gets loaded). `finish`: vCPUs created
//! with their CPUID, the kernel loaded or the state restored, vCPU threads started. A secondary
//! prepares while it receives and only finishes at a takeover.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock, PoisonError};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, CpuId, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use mcvmm_devices::bus::{Bus, BusError};
use mcvmm_devices::i8042::{self, I8042};
use mcvmm_devices::interrupt::Interrupt;
use mcvmm_devices::serial::{self, Serial};
use mcvmm_devices::virtio::block::Block;
use mcvmm_devices::virtio::mmio::{MmioBusFront, MmioTransport, NOTIFY_OFFSET, WINDOW};
use mcvmm_devices::virtio::net::{announce_moved, mac_text, Net, ANNOUNCE_AT_MS};
use mcvmm_devices::virtio::tap::{Tap, TapError};
use mcvmm_devices::virtio::{DeviceError, VirtioDevice};
use mcvmm_devices::GuestMemory;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{self, BootError};
use crate::coalesced::CoalescedPort;
use crate::irq_line::IrqfdLine;
use crate::layout::*;
use crate::vcpu::{self, VcpuControl, Vcpus, VmExit};
use mcvmm_checkpoint::dirty::{register_slots, DirtyError};
use mcvmm_checkpoint::seams::{DiskWriteSink, OutputGate};
use mcvmm_checkpoint::snapshot::{self, Loaded};
use mcvmm_checkpoint::state::{DiskShape, MachineState, VmShape};

use crate::vcpu_state;
use crate::vm_state::restore_vm_state;

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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

pub(crate) fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

pub struct Vm {
    pub config: VmConfig,
    pub shape: VmShape,
    pub serial: Arc<Mutex<Serial>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub vm_fd: Arc<VmFd>,
    pub mem: GuestMemory,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    pub vcpus: Vcpus,
    pub exit: Arc<VmExit>,
    pub started: Instant,
    pub cmdline: String,
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

pub fn prepare(config: VmConfig, mem: GuestMemory, mut seams: Seams) -> Result<Prepared, VmError> {
    let started = Instant::now();
    // Loading the kernel needs only the memory: it goes on while KVM and the devices are
    // set up.
    let images = match &config.source {
        Source::Boot { kernel, initrd, .. } => Some(boot::Loading::start(
            mem.clone(),
            kernel.clone(),
            initrd.clone(),
            config.mem_mib << 20,
        )?),
        Source::Restore(_) | Source::Replica { .. } => None,
    };
    let mut steps: Vec<(&'static str, f64)> = Vec::new();
    let mut lap = Instant::now();
    let mut step = |name: &'static str| {
        steps.push((name, lap.elapsed().as_secs_f64() * 1e3));
        lap = Instant::now();
    };
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::NotKvm);
    }
    let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?);
    let mem_size = config.mem_mib << 20;
    let len: u64 = mem.iter().map(|r| r.len()).sum();
    if len != mem_size {
        return Err(VmError::Shape(format!(
            "the guest memory has {len} bytes, this VM {mem_size}"
        )));
    }
    register_slots(&vm_fd, &mem, 0).map_err(VmError::Slots)?;

    vm_fd
        .set_tss_address(TSS_ADDR as usize)
        .map_err(kvm_call("KVM_SET_TSS_ADDR"))?;
    vm_fd
        .set_identity_map_address(IDENTITY_MAP_ADDR)
        .map_err(kvm_call("KVM_SET_IDENTITY_MAP_ADDR"))?;
    vm_fd
        .create_irq_chip()
        .map_err(kvm_call("KVM_CREATE_IRQCHIP"))?;
    vm_fd
        .create_pit2(kvm_pit_config {
            flags: KVM_PIT_SPEAKER_DUMMY,
            ..Default::default()
        })
        .map_err(kvm_call("KVM_CREATE_PIT2"))?;

    step("vm and memory");
    let exit = Arc::new(VmExit::new()?);
    let mut pio = Bus::default();
    let serial_irq = Arc::new(Interrupt::new(
        serial::IRQ,
        IrqfdLine::register(&vm_fd, serial::IRQ)?,
    ));
    let i8042_dev = Arc::new(Mutex::new(I8042::new(exit.reset_line()?)));
    pio.insert(i8042::PORT, i8042::PORT_LEN, i8042_dev.clone())?;

    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut disk_shapes = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let path = disk.path.display().to_string();
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(|source| VmError::Disk {
                path: path.clone(),
                source,
            })?;
        let id = format!("mcvmm-vd{}", (b'a' + i as u8) as char);
        let mut block =
            Block::new(file, path, disk.read_only, &id).map_err(|source| VmError::Disk {
                path: disk.path.display().to_string(),
                source,
            })?;
        if let Some(sink) = &seams.disk_writes {
            block.forward_writes(i, sink.clone());
        }
        disk_shapes.push(DiskShape {
            size_bytes: block.size_bytes(),
            read_only: disk.read_only,
        });
        virtio.push(Box::new(block));
    }
    let shape = VmShape {
        mem_mib: config.mem_mib,
        vcpus: config.vcpus,
        disks: disk_shapes,
        net: config.tap.as_ref().map(|_| config.mac),
    };
    let mut announce_on = None;
    let net_started = Arc::new(OnceLock::new());
    if let Some(name) = &config.tap {
        let tap = match seams.tap.take() {
            Some(tap) => tap,
            None => Tap::open(name)?,
        };
        if seams.announce {
            announce_on = Some(tap.try_clone()?);
        }
        if let Some(slot) = &seams.tap_writer {
            let _ = slot.set(tap.writer()?);
        }
        let mut net = Net::new(tap, config.mac);
        if seams.announce {
            net.log_first_frames(net_started.clone());
        }
        if let Some(gate) = &seams.output {
            net.gate_output(gate.clone());
        }
        virtio.push(Box::new(net));
    }
    if virtio.len() as u32 > IOAPIC_PINS - VIRTIO_IRQ_BASE {
        return Err(VmError::TooManyDevices(virtio.len()));
    }

    let user_cmdline = match &config.source {
        Source::Boot { cmdline, .. } => cmdline.as_str(),
        Source::Restore(_) | Source::Replica { .. } => "",
    };
    let mut cmdline = format!(
        "console=ttyS0 reboot=k i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd {user_cmdline}"
    );
    let mut mmio = Bus::default();
    let mut devices = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * WINDOW;
        let gsi = VIRTIO_IRQ_BASE + i as u32;
        let interrupt = Arc::new(Interrupt::new(gsi, IrqfdLine::register(&vm_fd, gsi)?));
        let transport = MmioTransport::new(dev, mem.clone(), interrupt)?;
        for (q, evt) in transport.queue_events.iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(kvm_call("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(
            base,
            WINDOW,
            Arc::new(Mutex::new(MmioBusFront::new(transport.clone()))),
        )?;
        devices.push(transport);
        cmdline += &format!(" virtio_mmio.device=4K@{base:#x}:{gsi}");
    }

    step("devices");
    Ok(Prepared {
        kvm,
        config,
        shape,
        vm_fd,
        mem,
        exit,
        serial_irq,
        i8042: i8042_dev,
        pio,
        mmio,
        devices,
        cmdline,
        announce_on,
        net_started,
        images,
        steps,
        started,
    })
}

/// Loads the guest into a prepared VM, or restores it there, and starts its vCPUs.
pub fn finish(p: Prepared, restore: Option<Continue>) -> Result<Vm, VmError> {
    let Prepared {
        kvm,
        config,
        shape,
        vm_fd,
        mem,
        exit,
        serial_irq,
        i8042: i8042_dev,
        mut pio,
        mmio,
        devices,
        mut cmdline,
        announce_on,
        net_started,
        images,
        mut steps,
        started,
    } = p;
    let finishing = Instant::now();
    let mut lap = Instant::now();
    let mut step = |name: &'static str| {
        steps.push((name, lap.elapsed().as_secs_f64() * 1e3));
        lap = Instant::now();
    };
    let mut load_alongside = None;
    let (restore_state, restore_shape, snapshot_files) = match restore {
        Some(Continue::Image(state, shape)) => (Some(state), Some(shape), None),
        Some(Continue::Snapshot(l)) => (Some(&l.state), Some(l.shape()), Some(l)),
        None => (None, None, None),
    };
    if let Some(why) = restore_shape.and_then(|r| r.mismatch(&shape)) {
        return Err(VmError::Shape(why));
    }
    let out: Box<dyn Write + Send> = match &config.serial {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(ConsoleFile(LineWriter::new(File::create(p).map_err(
            |source| VmError::Serial {
                path: p.display().to_string(),
                source,
            },
        )?))),
    };
    let serial_dev = Arc::new(Mutex::new(match restore_state {
        Some(s) => Serial::from_state(&s.serial, serial_irq, out).map_err(VmError::Restore)?,
        None => Serial::new(serial_irq, out),
    }));
    pio.insert(serial::PORT, serial::PORT_LEN, serial_dev.clone())?;
    if let Some(s) = restore_state {
        i8042_dev
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .restore(&s.i8042);
        for (i, dev) in devices.iter().enumerate() {
            let state = s.virtio.get(i).ok_or_else(|| {
                VmError::Shape(format!(
                    "no state for virtio device {} in the snapshot",
                    i + 1
                ))
            })?;
            dev.lock()
                .unwrap_or_else(PoisonError::into_inner)
                .restore(state)?;
        }
    }
    if let Some(mut tap) = announce_on {
        // Frames the tap queued while this VM waited are for no one now.
        let stale = tap.drain();
        announce_moved(tap.writer()?, config.mac)?;
        tracing::info!(
            "announcing {} on tap {} ({} RARPs over {} ms; {stale} stale frame(s) dropped)",
            mac_text(config.mac),
            tap.name,
            ANNOUNCE_AT_MS.len(),
            ANNOUNCE_AT_MS[ANNOUNCE_AT_MS.len() - 1]
        );
    }
    // vCPUs are created here, not prepared ahead: KVM takes a TSC written within a second
    // of the value it expects from the last write (a vCPU's creation writes 0) for an
    // attempt to synchronize, and keeps its own offset instead of the restored TSC. A
    // secondary's VM prepared at about the time the primary's guest started would fall
    // into that window.
    let mut fds = Vec::new();
    for id in 0..config.vcpus {
        fds.push(
            vm_fd
                .create_vcpu(u64::from(id))
                .map_err(kvm_call("KVM_CREATE_VCPU"))?,
        );
    }
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))?;
    let tsc_deadline = kvm.check_extension(kvm_ioctls::Cap::TscDeadlineTimer);
    for (id, vcpu) in fds.iter().enumerate() {
        let cpuid = match restore_state {
            Some(st) => {
                let s = st.vcpus.get(id).ok_or_else(|| {
                    VmError::Shape(format!("no state for vCPU {id} in the snapshot"))
                })?;
                CpuId::from_entries(&s.cpuid)
                    .map_err(|e| VmError::Restore(format!("vCPU {id} CPUID: {e:?}")))?
            }
            None => vcpu::cpuid_for(&base_cpuid, id as u8, config.vcpus, tsc_deadline),
        };
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_call("KVM_SET_CPUID2"))?;
    }
    // A guest that boots writes its log to the UART; a restored one has done so.
    if let (None, Some(vcpu)) = (restore_state, fds.first()) {
        match CoalescedPort::start(&kvm, &vm_fd, vcpu, serial::PORT) {
            Ok(Some(port)) => serial_dev
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .hold_writes(Box::new(port)),
            Ok(None) => {}
            Err(e) => tracing::warn!("console writes exit one by one: {e}"),
        }
    }
    step("vcpus and devices");
    match (restore_state, images) {
        (Some(st), _) => {
            if let Some(l) = snapshot_files {
                snapshot::apply(l, &mem).map_err(|e| VmError::Restore(e.to_string()))?;
            }
            for (vcpu, s) in fds.iter().zip(&st.vcpus) {
                vcpu_state::restore(vcpu, s)
                    .map_err(|e| VmError::Restore(format!("vCPU {}: {e}", s.id)))?;
            }
            restore_vm_state(&vm_fd, &st.vm)?;
            for dev in &devices {
                dev.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .raise_unacknowledged();
            }
            cmdline = st.cmdline.clone();
        }
        (None, Some(loading)) => {
            let (images, load_ms) = loading.wait()?;
            load_alongside = Some(load_ms);
            let entry =
                boot::write_boot_data(&mem, &images, &cmdline, config.vcpus, config.mem_mib << 20)?;
            for (id, vcpu) in fds.iter().enumerate() {
                boot::regs::setup_common(vcpu)?;
                if id == 0 {
                    boot::regs::setup_boot_cpu(vcpu, &mem, entry)?;
                }
            }
        }
        (None, None) => {
            return Err(VmError::Restore(
                "nothing to restore from was loaded".into(),
            ))
        }
    }
    step(if restore_state.is_some() {
        "state"
    } else {
        "kernel wait"
    });
    let msr_indices = kvm
        .get_msr_index_list()
        .map_err(kvm_call("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let _ = net_started.set(finishing);
    vcpu::install_kick_handler()?;
    let control = Arc::new(VcpuControl::new(msr_indices));
    let mut vcpus = Vcpus::new(control.clone());
    for (id, fd) in fds.into_iter().enumerate() {
        vcpus.push(vcpu::spawn(
            id as u8,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
            control.clone(),
        )?);
    }
    step("threads");
    if let Some(ms) = load_alongside {
        steps.push(("kernel load alongside", ms));
    }
    let parts: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
    if restore_state.is_some() {
        tracing::info!(
            "VM started in {:.1} ms from its state ({:.1} ms since it was prepared: {})",
            finishing.elapsed().as_secs_f64() * 1e3,
            started.elapsed().as_secs_f64() * 1e3,
            parts.join(", ")
        );
    } else {
        tracing::info!(
            "VM started in {:.1} ms ({})",
            started.elapsed().as_secs_f64() * 1e3,
            parts.join(", ")
        );
    }
    Ok(Vm {
        config,
        shape,
        serial: serial_dev,
        i8042: i8042_dev,
        vm_fd,
        mem,
        devices,
        vcpus,
        exit,
        started: finishing,
        cmdline,
    })
}
