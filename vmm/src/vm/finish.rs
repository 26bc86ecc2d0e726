//! The second step of building a VM: vCPUs created with their CPUID, the kernel loaded or
//! the state restored, vCPU threads started.

use std::fs::File;
use std::io::{LineWriter, Write};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Instant;

use kvm_bindings::{CpuId, KVM_MAX_CPUID_ENTRIES};
use kvm_ioctls::{Kvm, VcpuFd, VmFd};
use mcvmm_checkpoint::persist::{find_part, Persist};
use mcvmm_checkpoint::snapshot::{self, Loaded};
use mcvmm_checkpoint::state::MachineState;
use mcvmm_devices::bus::Bus;
use mcvmm_devices::serial::{self, Serial};
use mcvmm_devices::virtio::mmio::MmioTransport;
use mcvmm_devices::virtio::net::{announce_moved, mac_text, ANNOUNCE_AT_MS};
use mcvmm_devices::virtio::tap::Tap;
use mcvmm_devices::GuestMemory;

use super::{
    device_parts, kvm_call, ConsoleFile, Continue, Prepared, SerialOut, SharedPart, Vm, VmConfig,
    VmError,
};
use crate::boot;
use crate::coalesced::CoalescedPort;
use crate::vcpu::{self, VcpuControl, Vcpus, VmExit};
use crate::vcpu_state;
use crate::vm_state::InKernel;

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
        cmdline,
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
    let (restore_state, restore_shape, snapshot_files) = match restore {
        Some(Continue::Image(state, shape)) => (Some(state), Some(shape), None),
        Some(Continue::Snapshot(l)) => (Some(&l.state), Some(l.shape()), Some(l)),
        None => (None, None, None),
    };
    if let Some(why) = restore_shape.and_then(|r| r.mismatch(&shape)) {
        return Err(VmError::Shape(why));
    }
    let out = serial_out(&config.serial)?;
    let serial_dev = Arc::new(Mutex::new(Serial::new(serial_irq, out)));
    pio.insert(serial::PORT, serial::PORT_LEN, serial_dev.clone())?;
    let parts = device_parts(&serial_dev, &i8042_dev, &devices);
    if let Some(s) = restore_state {
        restore_devices(s, &parts)?;
    }
    if let Some(tap) = announce_on {
        announce(tap, config.mac)?;
    }
    let fds = create_vcpus(&kvm, &vm_fd, &config, restore_state)?;
    // A guest that boots writes its log to the UART; a restored one has done so.
    if let (None, Some(vcpu)) = (restore_state, fds.first()) {
        hold_console_writes(&kvm, &vm_fd, vcpu, &serial_dev);
    }
    step("vcpus and devices");
    let (cmdline, load_alongside) = load_guest(
        restore_state.map(|st| (st, snapshot_files)),
        images,
        (&mem, &fds, &vm_fd, &devices),
        cmdline,
        &config,
    )?;
    step(if restore_state.is_some() {
        "state"
    } else {
        "kernel wait"
    });
    let _ = net_started.set(finishing);
    let vcpus = start_vcpus(&kvm, fds, pio, mmio, &exit)?;
    step("threads");
    if let Some(ms) = load_alongside {
        steps.push(("kernel load alongside", ms));
    }
    log_started(&steps, restore_state.is_some(), started, finishing);
    Ok(Vm {
        parts,
        config,
        shape,
        vm_fd,
        mem,
        devices,
        vcpus,
        exit,
        started: finishing,
        cmdline,
    })
}

/// Lets KVM hold the guest's writes to the UART's data port without an exit, where it
/// can (see `Serial::hold_writes`).
fn hold_console_writes(kvm: &Kvm, vm_fd: &Arc<VmFd>, vcpu: &VcpuFd, serial_dev: &Mutex<Serial>) {
    match CoalescedPort::start(kvm, vm_fd, vcpu, serial::PORT) {
        Ok(Some(port)) => serial_dev
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .hold_writes(Box::new(port)),
        Ok(None) => {}
        Err(e) => tracing::warn!("console writes exit one by one: {e}"),
    }
}

/// Puts the guest in place: restored from its state (and a snapshot's files), or its
/// kernel booted from `images`. Returns the command line it runs with and, for a boot,
/// how long loading the kernel took alongside the rest.
fn load_guest(
    restore: Option<(&MachineState, Option<&Loaded>)>,
    images: Option<boot::Loading>,
    (mem, fds, vm_fd, devices): (&GuestMemory, &[VcpuFd], &VmFd, &[Arc<Mutex<MmioTransport>>]),
    cmdline: String,
    config: &VmConfig,
) -> Result<(String, Option<f64>), VmError> {
    match (restore, images) {
        (Some((st, files)), _) => {
            restore_machine(st, files, mem, fds, vm_fd, devices)?;
            Ok((st.cmdline.clone(), None))
        }
        (None, Some(loading)) => {
            let ms = boot_guest(loading, mem, &cmdline, config, fds)?;
            Ok((cmdline, Some(ms)))
        }
        (None, None) => Err(VmError::Restore(
            "nothing to restore from was loaded".into(),
        )),
    }
}

/// Waits for the kernel and initrd, writes the boot data, sets the vCPUs up to boot.
/// Returns how long the load took alongside the VM's building, ms.
fn boot_guest(
    loading: boot::Loading,
    mem: &GuestMemory,
    cmdline: &str,
    config: &VmConfig,
    fds: &[VcpuFd],
) -> Result<f64, VmError> {
    let (images, load_ms) = loading.wait()?;
    let entry = boot::write_boot_data(mem, &images, cmdline, config.vcpus, config.mem_mib << 20)?;
    for (id, vcpu) in fds.iter().enumerate() {
        boot::regs::setup_common(vcpu)?;
        if id == 0 {
            boot::regs::setup_boot_cpu(vcpu, mem, entry)?;
        }
    }
    Ok(load_ms)
}

/// How long the VM took to start, and each step.
fn log_started(steps: &[(&str, f64)], restored: bool, started: Instant, finishing: Instant) {
    let parts: Vec<String> = steps.iter().map(|(n, ms)| format!("{n} {ms:.1}")).collect();
    if restored {
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
}

/// Where the guest's console goes.
fn serial_out(to: &SerialOut) -> Result<Box<dyn Write + Send>, VmError> {
    Ok(match to {
        SerialOut::Stdout => Box::new(std::io::stdout()),
        SerialOut::File(p) => Box::new(ConsoleFile(LineWriter::new(File::create(p).map_err(
            |source| VmError::Serial {
                path: p.display().to_string(),
                source,
            },
        )?))),
    })
}

/// Every device's saved state into the prepared devices. A checkpoint with a part that
/// no device here takes came from a VM with other devices, and is refused.
fn restore_devices(s: &MachineState, parts: &[(String, SharedPart)]) -> Result<(), VmError> {
    if let Some(extra) = s
        .devices
        .iter()
        .find(|p| !parts.iter().any(|(name, _)| *name == p.name))
    {
        return Err(VmError::Shape(format!(
            "it has state for {}, a device this VM does not have",
            extra.name
        )));
    }
    for (name, dev) in parts {
        let part = find_part(&s.devices, name)?;
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .restore_from(name, part)?;
    }
    Ok(())
}

/// Tells the network the guest's MAC is behind this tap now.
fn announce(mut tap: Tap, mac: [u8; 6]) -> Result<(), VmError> {
    // Frames the tap queued while this VM waited are for no one now.
    let stale = tap.drain();
    announce_moved(tap.writer()?, mac)?;
    tracing::info!(
        "announcing {} on tap {} ({} RARPs over {} ms; {stale} stale frame(s) dropped)",
        mac_text(mac),
        tap.name,
        ANNOUNCE_AT_MS.len(),
        ANNOUNCE_AT_MS[ANNOUNCE_AT_MS.len() - 1]
    );
    Ok(())
}

/// The vCPUs, each with its CPUID: the saved one for a restored guest.
fn create_vcpus(
    kvm: &Kvm,
    vm_fd: &VmFd,
    config: &VmConfig,
    restore_state: Option<&MachineState>,
) -> Result<Vec<VcpuFd>, VmError> {
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
    Ok(fds)
}

/// A restored guest: the snapshot's memory (a replica's is in place already), each
/// vCPU's state, the in-kernel devices' state; then the interrupts the devices had
/// raised and the guest had not taken yet are raised again.
fn restore_machine(
    st: &MachineState,
    snapshot_files: Option<&Loaded>,
    mem: &GuestMemory,
    fds: &[VcpuFd],
    vm_fd: &VmFd,
    devices: &[Arc<Mutex<MmioTransport>>],
) -> Result<(), VmError> {
    if let Some(l) = snapshot_files {
        snapshot::apply(l, mem).map_err(|e| VmError::Restore(e.to_string()))?;
    }
    for (vcpu, s) in fds.iter().zip(&st.vcpus) {
        vcpu_state::restore(vcpu, s)
            .map_err(|e| VmError::Restore(format!("vCPU {}: {e}", s.id)))?;
    }
    InKernel(vm_fd).restore(&st.vm)?;
    for dev in devices {
        dev.lock()
            .unwrap_or_else(PoisonError::into_inner)
            .raise_unacknowledged();
    }
    Ok(())
}

/// A thread per vCPU, running.
fn start_vcpus(
    kvm: &Kvm,
    fds: Vec<VcpuFd>,
    pio: Bus,
    mmio: Bus,
    exit: &Arc<VmExit>,
) -> Result<Vcpus, VmError> {
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
    Ok(vcpus)
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcvmm_devices::i8042::{ResetLine, I8042};
    use mcvmm_devices::interrupt::{CountingLine, Interrupt};
    use std::sync::atomic::AtomicBool;
    use vmm_sys_util::eventfd::EventFd;

    /// A UART and a keyboard controller, fresh, as their parts.
    fn parts() -> Vec<(String, SharedPart)> {
        let irq = Arc::new(Interrupt::new(
            serial::IRQ,
            Arc::new(CountingLine::default()),
        ));
        let serial = Arc::new(Mutex::new(Serial::new(irq, Box::new(std::io::sink()))));
        let i8042 = Arc::new(Mutex::new(I8042::new(ResetLine {
            requested: Arc::new(AtomicBool::new(false)),
            wake: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        })));
        device_parts(&serial, &i8042, &[])
    }

    fn saved(parts: &[(String, SharedPart)]) -> MachineState {
        MachineState {
            devices: parts
                .iter()
                .map(|(name, d)| d.lock().expect("device").save_as(name).expect("save"))
                .collect(),
            ..MachineState::default()
        }
    }

    #[test]
    fn every_part_goes_to_its_device_and_no_other() {
        let state = saved(&parts());
        restore_devices(&state, &parts()).expect("the same devices");

        let mut extra = saved(&parts());
        let mut nic = extra.devices[0].clone();
        nic.name = "virtio-mmio.0".into();
        extra.devices.push(nic);
        let e = restore_devices(&extra, &parts()).expect_err("a device this VM lacks");
        assert!(e.to_string().contains("virtio-mmio.0"), "{e}");

        let mut missing = saved(&parts());
        missing.devices.retain(|p| p.name != "i8042");
        let e = restore_devices(&missing, &parts()).expect_err("no keyboard controller");
        assert!(e.to_string().contains("no state for i8042"), "{e}");
    }
}
