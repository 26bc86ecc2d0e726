//! The first step of building a VM: KVM, memory slots, irqchip and PIT, devices on their
//! buses. Nothing here depends on where the guest comes from.

use std::fs::OpenOptions;
use std::sync::{Arc, Mutex, OnceLock};
use std::time::Instant;

use kvm_bindings::{kvm_pit_config, KVM_PIT_SPEAKER_DUMMY};
use kvm_ioctls::{IoEventAddress, Kvm, VmFd};
use mcvmm_checkpoint::dirty::register_slots;
use mcvmm_checkpoint::state::{DiskShape, VmShape};
use mcvmm_devices::bus::Bus;
use mcvmm_devices::i8042::{self, I8042};
use mcvmm_devices::interrupt::Interrupt;
use mcvmm_devices::serial;
use mcvmm_devices::virtio::block::Block;
use mcvmm_devices::virtio::mmio::{MmioBusFront, MmioTransport, NOTIFY_OFFSET, WINDOW};
use mcvmm_devices::virtio::net::Net;
use mcvmm_devices::virtio::tap::Tap;
use mcvmm_devices::virtio::VirtioDevice;
use mcvmm_devices::GuestMemory;
use vm_memory::{GuestMemoryBackend, GuestMemoryRegion};

use super::{kvm_call, Prepared, Seams, Source, VmConfig, VmError};
use crate::boot;
use crate::irq_line::IrqfdLine;
use crate::layout::*;
use crate::vcpu::VmExit;

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
    let (kvm, vm_fd) = kvm_vm(&mem, config.mem_mib)?;
    step("vm and memory");
    let exit = Arc::new(VmExit::new()?);
    let mut pio = Bus::default();
    let serial_irq = Arc::new(Interrupt::new(
        serial::IRQ,
        IrqfdLine::register(&vm_fd, serial::IRQ)?,
    ));
    let i8042_dev = Arc::new(Mutex::new(I8042::new(exit.reset_line()?)));
    pio.insert(i8042::PORT, i8042::PORT_LEN, i8042_dev.clone())?;
    let virtio = virtio_devices(&config, &mut seams)?;
    let user_cmdline = match &config.source {
        Source::Boot { cmdline, .. } => cmdline.as_str(),
        Source::Restore(_) | Source::Replica { .. } => "",
    };
    let mut cmdline = format!(
        "console=ttyS0 reboot=k i8042.noaux i8042.nomux i8042.nopnp i8042.dumbkbd {user_cmdline}"
    );
    let (mmio, devices) = on_mmio_bus(&vm_fd, &mem, virtio.devices, &mut cmdline)?;
    step("devices");
    Ok(Prepared {
        kvm,
        config,
        shape: virtio.shape,
        vm_fd,
        mem,
        exit,
        serial_irq,
        i8042: i8042_dev,
        pio,
        mmio,
        devices,
        cmdline,
        announce_on: virtio.announce_on,
        net_started: virtio.net_started,
        images,
        steps,
        started,
    })
}

/// KVM's VM over `mem`: memory slots, TSS and identity map, in-kernel irqchip and PIT.
fn kvm_vm(mem: &GuestMemory, mem_mib: u64) -> Result<(Kvm, Arc<VmFd>), VmError> {
    let kvm = Kvm::new().map_err(VmError::Kvm)?;
    if kvm.get_api_version() != 12 {
        return Err(VmError::NotKvm);
    }
    let vm_fd = Arc::new(kvm.create_vm().map_err(kvm_call("KVM_CREATE_VM"))?);
    let mem_size = mem_mib << 20;
    let len: u64 = mem.iter().map(|r| r.len()).sum();
    if len != mem_size {
        return Err(VmError::Shape(format!(
            "the guest memory has {len} bytes, this VM {mem_size}"
        )));
    }
    register_slots(&vm_fd, mem, 0).map_err(VmError::Slots)?;
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
    Ok((kvm, vm_fd))
}

/// The virtio devices of a configuration, and what the VM looks like with them.
struct Virtio {
    devices: Vec<Box<dyn VirtioDevice>>,
    shape: VmShape,
    announce_on: Option<Tap>,
    net_started: Arc<OnceLock<Instant>>,
}

/// A block device per disk, then the NIC if there is a tap.
fn virtio_devices(config: &VmConfig, seams: &mut Seams) -> Result<Virtio, VmError> {
    let mut devices: Vec<Box<dyn VirtioDevice>> = Vec::new();
    let mut disk_shapes = Vec::new();
    for (i, disk) in config.disks.iter().enumerate() {
        let path = disk.path.display().to_string();
        let disk_err = |source| VmError::Disk {
            path: path.clone(),
            source,
        };
        let file = OpenOptions::new()
            .read(true)
            .write(!disk.read_only)
            .open(&disk.path)
            .map_err(disk_err)?;
        let id = format!("mcvmm-vd{}", (b'a' + i as u8) as char);
        let mut block = Block::new(file, path.clone(), disk.read_only, &id).map_err(disk_err)?;
        if let Some(sink) = &seams.disk_writes {
            block.forward_writes(i, sink.clone());
        }
        disk_shapes.push(DiskShape {
            size_bytes: block.size_bytes(),
            read_only: disk.read_only,
        });
        devices.push(Box::new(block));
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
        devices.push(Box::new(net));
    }
    if devices.len() as u32 > IOAPIC_PINS - VIRTIO_IRQ_BASE {
        return Err(VmError::TooManyDevices(devices.len()));
    }
    Ok(Virtio {
        devices,
        shape,
        announce_on,
        net_started,
    })
}

/// Each device behind a virtio-mmio transport on the MMIO bus, with its interrupt line
/// and queue notifies; their entries go on the kernel command line.
#[allow(clippy::type_complexity)]
fn on_mmio_bus(
    vm_fd: &VmFd,
    mem: &GuestMemory,
    virtio: Vec<Box<dyn VirtioDevice>>,
    cmdline: &mut String,
) -> Result<(Bus, Vec<Arc<Mutex<MmioTransport>>>), VmError> {
    let mut mmio = Bus::default();
    let mut devices = Vec::new();
    for (i, dev) in virtio.into_iter().enumerate() {
        let base = VIRTIO_MMIO_BASE + i as u64 * WINDOW;
        let gsi = VIRTIO_IRQ_BASE + i as u32;
        let interrupt = Arc::new(Interrupt::new(gsi, IrqfdLine::register(vm_fd, gsi)?));
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
        *cmdline += &format!(" virtio_mmio.device=4K@{base:#x}:{gsi}");
    }
    Ok((mmio, devices))
}
