//! Building a VM from its configuration: KVM, guest memory, irqchip and PIT, devices on
//! their buses, the kernel loaded, vCPUs configured. Order matters and is: memory, irqchip
//! (before vCPUs, so their LAPICs are in-kernel), devices (their command-line entries are
//! part of what gets loaded), kernel, vCPUs.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{
    kvm_clock_data, kvm_irqchip, kvm_pit_config, CpuId, KVM_CLOCK_REALTIME, KVM_IRQCHIP_IOAPIC,
    KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use mcvmm_devices::bus::{Bus, BusError};
use mcvmm_devices::i8042::{self, I8042};
use mcvmm_devices::interrupt::Interrupt;
use mcvmm_devices::serial::{self, Serial};
use mcvmm_devices::virtio::block::Block;
use mcvmm_devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET, WINDOW};
use mcvmm_devices::virtio::net::{announce_moved, mac_text, Net, ANNOUNCE_AT_MS};
use mcvmm_devices::virtio::tap::{Tap, TapError};
use mcvmm_devices::virtio::{DeviceError, VirtioDevice};
use mcvmm_devices::GuestMemory;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{self, BootError, BootSpec};
use crate::layout::*;
use crate::vcpu::{self, VcpuControl, Vcpus, VmExit};
use mcvmm_checkpoint::dirty::{register_slots, DirtyError};
use mcvmm_checkpoint::seams::{DiskWriteSink, OutputGate};
use mcvmm_checkpoint::snapshot::{self, Loaded};
use mcvmm_checkpoint::state::{DiskShape, MachineState, VmShape, VmState};

use crate::vcpu_state;

#[derive(Debug, Clone)]
pub struct DiskConfig {
    pub path: PathBuf,
    pub read_only: bool,
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

/// What a restored VM continues from.
pub enum Restore<'a> {
    Snapshot(&'a Loaded),
    /// A secondary's committed checkpoint: its memory becomes the VM's as it is.
    Image {
        state: &'a MachineState,
        shape: &'a VmShape,
        mem: GuestMemory,
    },
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

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

pub struct Vm {
    pub config: VmConfig,
    pub shape: VmShape,
    pub serial: Arc<Mutex<Serial>>,
    pub i8042: Arc<Mutex<I8042>>,
    pub vm_fd: VmFd,
    pub mem: GuestMemory,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    pub vcpus: Vcpus,
    pub exit: Arc<VmExit>,
    pub started: Instant,
    pub cmdline: String,
}

pub fn build(config: VmConfig, restore: Option<Restore>, mut seams: Seams) -> Result<Vm, VmError> {
    let started = Instant::now();
    // Where a build's time goes, logged for restores: a takeover waits on all of it.
    let mut steps: Vec<(&str, f64)> = Vec::new();
    let mut lap = Instant::now();
    let mut step = |name: &'static str| {
        steps.push((name, lap.elapsed().as_secs_f64() * 1e3));
        lap = Instant::now();
    };
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::NotKvm);
    }
    let vm_fd = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;

    let mem_size = config.mem_mib << 20;
    // The state and shape to continue from, and the snapshot whose files fill memory.
    let (mem, restore_state, restore_shape, snapshot_files) = match restore {
        Some(Restore::Image { state, shape, mem }) => {
            let len: u64 = mem.iter().map(|r| r.len()).sum();
            if len != mem_size {
                return Err(VmError::Shape(format!(
                    "the committed image has {len} bytes of memory, this VM {mem_size}"
                )));
            }
            (mem, Some(state), Some(shape), None)
        }
        Some(Restore::Snapshot(l)) => (
            guest_memory(config.mem_mib)?,
            Some(&l.state),
            Some(l.shape()),
            Some(l),
        ),
        None => (guest_memory(config.mem_mib)?, None, None, None),
    };
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
    let out: Box<dyn Write + Send> = match &config.serial {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(LineWriter::new(File::create(p).map_err(|source| {
            VmError::Serial {
                path: p.display().to_string(),
                source,
            }
        })?)),
    };
    let serial_irq = Arc::new(Interrupt::new(serial::IRQ)?);
    vm_fd
        .register_irqfd(&serial_irq.irqfd, serial::IRQ)
        .map_err(kvm_call("KVM_IRQFD"))?;
    let serial_dev = Arc::new(Mutex::new(match restore_state {
        Some(s) => Serial::from_state(&s.serial, serial_irq, out).map_err(VmError::Restore)?,
        None => Serial::new(serial_irq, out),
    }));
    pio.insert(serial::PORT, serial::PORT_LEN, serial_dev.clone())?;
    let mut kbd = I8042::new(exit.evt.try_clone()?);
    if let Some(s) = restore_state {
        kbd.restore(&s.i8042);
    }
    let i8042_dev = Arc::new(Mutex::new(kbd));
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
    if let Some(why) = restore_shape.and_then(|r| r.mismatch(&shape)) {
        return Err(VmError::Shape(why));
    }
    if let Some(name) = &config.tap {
        let mut tap = match seams.tap.take() {
            Some(tap) => tap,
            None => Tap::open(name)?,
        };
        if seams.announce {
            let stale = tap.drain();
            announce_moved(tap.writer()?, config.mac)?;
            eprintln!(
                "mcvmm: announcing {} on tap {} ({} RARPs over {} ms; {stale} stale frame(s) dropped)",
                mac_text(config.mac),
                tap.name,
                ANNOUNCE_AT_MS.len(),
                ANNOUNCE_AT_MS[ANNOUNCE_AT_MS.len() - 1]
            );
        }
        if let Some(slot) = &seams.tap_writer {
            let _ = slot.set(tap.writer()?);
        }
        let mut net = Net::new(tap, config.mac);
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
        let interrupt = Arc::new(Interrupt::new(gsi)?);
        vm_fd
            .register_irqfd(&interrupt.irqfd, gsi)
            .map_err(kvm_call("KVM_IRQFD"))?;
        let mut transport = MmioTransport::new(dev, mem.clone(), interrupt)?;
        if let Some(s) = restore_state {
            let state = s.virtio.get(i).ok_or_else(|| {
                VmError::Shape(format!(
                    "no state for virtio device {} in the snapshot",
                    i + 1
                ))
            })?;
            transport.restore(state)?;
        }
        for (q, evt) in transport.queue_events.iter().enumerate() {
            vm_fd
                .register_ioevent(evt, &IoEventAddress::Mmio(base + NOTIFY_OFFSET), q as u32)
                .map_err(kvm_call("KVM_IOEVENTFD"))?;
        }
        let transport = Arc::new(Mutex::new(transport));
        mmio.insert(base, WINDOW, transport.clone())?;
        devices.push(transport);
        cmdline += &format!(" virtio_mmio.device=4K@{base:#x}:{gsi}");
    }

    step("devices");
    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))?;
    let mut fds = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        let cpuid = match restore_state {
            Some(st) => {
                let s = st.vcpus.get(usize::from(id)).ok_or_else(|| {
                    VmError::Shape(format!("no state for vCPU {id} in the snapshot"))
                })?;
                CpuId::from_entries(&s.cpuid)
                    .map_err(|e| VmError::Restore(format!("vCPU {id} CPUID: {e:?}")))?
            }
            None => vcpu::cpuid_for(&base_cpuid, id, config.vcpus),
        };
        vcpu.set_cpuid2(&cpuid)
            .map_err(kvm_call("KVM_SET_CPUID2"))?;
        fds.push(vcpu);
    }
    step("vcpus");
    match (restore_state, &config.source) {
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
                    .unwrap_or_else(std::sync::PoisonError::into_inner)
                    .raise_unacknowledged();
            }
            cmdline = st.cmdline.clone();
        }
        (None, Source::Boot { kernel, initrd, .. }) => {
            let entry = boot::load(
                &mem,
                &BootSpec {
                    kernel,
                    initrd: initrd.as_deref(),
                    cmdline: &cmdline,
                    cpus: config.vcpus,
                    mem_size,
                },
            )?;
            for (id, vcpu) in fds.iter().enumerate() {
                boot::regs::setup_common(vcpu)?;
                if id == 0 {
                    boot::regs::setup_boot_cpu(vcpu, &mem, entry)?;
                }
            }
        }
        (None, Source::Restore(_) | Source::Replica { .. }) => {
            return Err(VmError::Restore(
                "nothing to restore from was loaded".into(),
            ))
        }
    }
    step(if restore_state.is_some() {
        "state"
    } else {
        "kernel"
    });
    let msr_indices = kvm
        .get_msr_index_list()
        .map_err(kvm_call("KVM_GET_MSR_INDEX_LIST"))?
        .as_slice()
        .to_vec();
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
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
    if restore_state.is_some() {
        let parts: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
        eprintln!(
            "mcvmm: VM built in {:.1} ms ({})",
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
        started,
        cmdline,
    })
}

/// The in-kernel devices' state: both PICs, the IOAPIC, the PIT, kvmclock. The vCPUs
/// must be paused.
pub fn save_vm_state(vm: &VmFd) -> Result<VmState, VmError> {
    let chip = |id: u32| -> Result<kvm_irqchip, VmError> {
        let mut c = kvm_irqchip {
            chip_id: id,
            ..Default::default()
        };
        vm.get_irqchip(&mut c)
            .map_err(kvm_call("KVM_GET_IRQCHIP"))?;
        Ok(c)
    };
    Ok(VmState {
        pic_master: chip(KVM_IRQCHIP_PIC_MASTER)?,
        pic_slave: chip(KVM_IRQCHIP_PIC_SLAVE)?,
        ioapic: chip(KVM_IRQCHIP_IOAPIC)?,
        pit: vm.get_pit2().map_err(kvm_call("KVM_GET_PIT2"))?,
        clock: vm.get_clock().map_err(kvm_call("KVM_GET_CLOCK"))?,
    })
}

fn restore_vm_state(vm: &VmFd, s: &VmState) -> Result<(), VmError> {
    for chip in [&s.pic_master, &s.pic_slave, &s.ioapic] {
        vm.set_irqchip(chip).map_err(kvm_call("KVM_SET_IRQCHIP"))?;
    }
    vm.set_pit2(&s.pit).map_err(kvm_call("KVM_SET_PIT2"))?;
    // Only KVM_CLOCK_REALTIME may be passed back: with it KVM moves the clock on by the
    // real time that went by since the capture, so the guest's clock goes on. A
    // checkpoint from another host whose real-time clock is ahead of this one's would move
    // the guest's clock backwards, and a guest that trusts kvmclock then sleeps through
    // its timers: in that case the clock goes on from the captured value instead.
    let mut flags = s.clock.flags & KVM_CLOCK_REALTIME;
    if flags != 0 && realtime_ns() < s.clock.realtime {
        eprintln!(
            "mcvmm: the checkpoint's real-time clock is {} ms ahead of this host's; the guest's clock is not moved back",
            (s.clock.realtime - realtime_ns()) / 1_000_000
        );
        flags = 0;
    }
    let clock = kvm_clock_data { flags, ..s.clock };
    vm.set_clock(&clock).map_err(kvm_call("KVM_SET_CLOCK"))?;
    Ok(())
}

/// This host's CLOCK_REALTIME in nanoseconds (what KVM compares a clock's `realtime` with).
fn realtime_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid local.
    unsafe { libc::clock_gettime(libc::CLOCK_REALTIME, &mut ts) };
    (ts.tv_sec as u64)
        .saturating_mul(1_000_000_000)
        .saturating_add(ts.tv_nsec as u64)
}
