//! Building a VM from its configuration: KVM, guest memory, irqchip and PIT, devices on
//! their buses, the kernel loaded, vCPUs configured. Order matters and is: memory, irqchip
//! (before vCPUs, so their LAPICs are in-kernel), devices (their command-line entries are
//! part of what gets loaded), kernel, vCPUs.

use std::fs::{File, OpenOptions};
use std::io::{LineWriter, Write};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Instant;

use kvm_bindings::{
    kvm_pit_config, kvm_userspace_memory_region, KVM_MAX_CPUID_ENTRIES, KVM_PIT_SPEAKER_DUMMY,
};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use mcvmm_devices::bus::{Bus, BusError};
use mcvmm_devices::i8042::{self, I8042};
use mcvmm_devices::interrupt::Interrupt;
use mcvmm_devices::serial::{self, Serial};
use mcvmm_devices::virtio::block::Block;
use mcvmm_devices::virtio::mmio::{MmioTransport, NOTIFY_OFFSET, WINDOW};
use mcvmm_devices::virtio::net::Net;
use mcvmm_devices::virtio::tap::{Tap, TapError};
use mcvmm_devices::virtio::{DeviceError, VirtioDevice};
use mcvmm_devices::GuestMemory;
use vm_memory::{GuestAddress, GuestMemoryBackend, GuestMemoryRegion};

use crate::boot::{self, BootError, BootSpec};
use crate::layout::*;
use crate::vcpu::{self, VcpuThread, VmExit};

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

#[derive(Debug, Clone)]
pub struct VmConfig {
    pub kernel: PathBuf,
    pub initrd: Option<PathBuf>,
    pub cmdline: String,
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
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

fn kvm_call(what: &'static str) -> impl FnOnce(kvm_ioctls::Error) -> VmError {
    move |source| VmError::KvmCall { what, source }
}

pub struct Vm {
    pub config: VmConfig,
    // The VM, its memory and its vCPU threads live as long as this; the checkpoint engine
    // will use them directly.
    #[allow(dead_code)]
    pub vm_fd: VmFd,
    #[allow(dead_code)]
    pub mem: GuestMemory,
    pub devices: Vec<Arc<Mutex<MmioTransport>>>,
    #[allow(dead_code)]
    pub vcpus: Vec<VcpuThread>,
    pub exit: Arc<VmExit>,
    pub started: Instant,
    pub cmdline: String,
}

pub fn build(config: VmConfig) -> Result<Vm, VmError> {
    let started = Instant::now();
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::NotKvm);
    }
    let vm_fd = kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?;

    let mem_size = config.mem_mib << 20;
    let ranges: Vec<(GuestAddress, usize)> = ram_ranges(mem_size)
        .into_iter()
        .map(|(start, len)| (GuestAddress(start), len as usize))
        .collect();
    let mem = GuestMemory::from_ranges(&ranges).map_err(|e| VmError::Memory {
        mib: config.mem_mib,
        why: e.to_string(),
    })?;
    for (slot, region) in mem.iter().enumerate() {
        let r = kvm_userspace_memory_region {
            slot: slot as u32,
            guest_phys_addr: region.start_addr().0,
            memory_size: region.len(),
            userspace_addr: region.as_ptr() as u64,
            flags: 0,
        };
        // SAFETY: the region is a live mapping owned by `mem`, which outlives the VM fd's
        // use of it (both live in `Vm`, and the process ends with them).
        unsafe { vm_fd.set_user_memory_region(r) }
            .map_err(kvm_call("KVM_SET_USER_MEMORY_REGION"))?;
    }

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
    pio.insert(
        serial::PORT,
        serial::PORT_LEN,
        Arc::new(Mutex::new(Serial::new(serial_irq, out))),
    )?;
    pio.insert(
        i8042::PORT,
        i8042::PORT_LEN,
        Arc::new(Mutex::new(I8042::new(exit.evt.try_clone()?))),
    )?;

    let mut virtio: Vec<Box<dyn VirtioDevice>> = Vec::new();
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
        virtio.push(Box::new(
            Block::new(file, path, disk.read_only, &id).map_err(|source| VmError::Disk {
                path: disk.path.display().to_string(),
                source,
            })?,
        ));
    }
    if let Some(name) = &config.tap {
        virtio.push(Box::new(Net::new(Tap::open(name)?, config.mac)));
    }
    if virtio.len() as u32 > IOAPIC_PINS - VIRTIO_IRQ_BASE {
        return Err(VmError::TooManyDevices(virtio.len()));
    }

    let mut cmdline = format!(
        "console=ttyS0 reboot=k i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd {}",
        config.cmdline
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
        let transport = MmioTransport::new(dev, mem.clone(), interrupt)?;
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

    let entry = boot::load(
        &mem,
        &BootSpec {
            kernel: &config.kernel,
            initrd: config.initrd.as_deref(),
            cmdline: &cmdline,
            cpus: config.vcpus,
            mem_size,
        },
    )?;

    let base_cpuid = kvm
        .get_supported_cpuid(KVM_MAX_CPUID_ENTRIES)
        .map_err(kvm_call("KVM_GET_SUPPORTED_CPUID"))?;
    let mut fds = Vec::new();
    for id in 0..config.vcpus {
        let vcpu = vm_fd
            .create_vcpu(u64::from(id))
            .map_err(kvm_call("KVM_CREATE_VCPU"))?;
        vcpu.set_cpuid2(&vcpu::cpuid_for(&base_cpuid, id, config.vcpus))
            .map_err(kvm_call("KVM_SET_CPUID2"))?;
        boot::regs::setup_common(&vcpu)?;
        if id == 0 {
            boot::regs::setup_boot_cpu(&vcpu, &mem, entry)?;
        }
        fds.push(vcpu);
    }
    let (pio, mmio) = (Arc::new(pio), Arc::new(mmio));
    let mut vcpus = Vec::new();
    for (id, fd) in fds.into_iter().enumerate() {
        vcpus.push(vcpu::spawn(
            id as u8,
            fd,
            pio.clone(),
            mmio.clone(),
            exit.clone(),
        )?);
    }
    Ok(Vm {
        config,
        vm_fd,
        mem,
        devices,
        vcpus,
        exit,
        started,
        cmdline,
    })
}
