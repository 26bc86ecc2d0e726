//! The virtio-mmio transport, version 2 (virtio 1.x, section 4.2.2): a 4 KiB register
//! window per device. Register accesses arrive on vCPU threads; queue notifications arrive
//! as ioeventfds on the device loop, which calls [`MmioTransport::notify`].

use std::sync::{Arc, Mutex, PoisonError};

use virtio_queue::{Queue, QueueT};
use vmm_sys_util::eventfd::EventFd;

use super::{type_name, DeviceError, VirtioDevice, VIRTIO_F_VERSION_1};
use mcvmm_checkpoint::persist::{DeviceState, Persist};
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::interrupt::{Interrupt, INT_CONFIG};
use crate::GuestMemory;

pub const WINDOW: u64 = 0x1000;
/// Offset of QueueNotify, where ioeventfds are registered (datamatch = queue index).
pub const NOTIFY_OFFSET: u64 = 0x50;

const INTERRUPT_STATUS: u64 = 0x60;
const INTERRUPT_ACK: u64 = 0x64;

const MAGIC: u32 = 0x7472_6976; // "virt"
const VENDOR: u32 = 0x4d43_564d; // "MCVM"

/// Offered for every device: the guest says after which used entry it wants the next
/// interrupt, and the device after which available one it wants the next notification.
/// Without it, a guest whose transmit path asks for completions got an interrupt for
/// each frame sent; with it, Linux asks for one once most of the sent frames are done
/// (`virtqueue_enable_cb_delayed`), as under QEMU, which offers it too.
const VIRTIO_RING_F_EVENT_IDX: u64 = 1 << 29;

const STATUS_DRIVER: u32 = 2;
const STATUS_DRIVER_OK: u32 = 4;
const STATUS_FEATURES_OK: u32 = 8;
const STATUS_FAILED: u32 = 0x80;

/// A virtqueue's position and layout (what `virtio_queue::QueueState` holds).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct QueueState {
    pub max_size: u16,
    pub size: u16,
    pub ready: bool,
    pub next_avail: u16,
    pub next_used: u16,
    pub event_idx: bool,
    pub desc_table: u64,
    pub avail_ring: u64,
    pub used_ring: u64,
}

/// A virtio-mmio transport, the negotiation its driver did, and the device behind it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct VirtioMmioState {
    pub device_type: u32,
    pub status: u32,
    pub device_features_sel: u32,
    pub driver_features_sel: u32,
    pub acked_features: u64,
    pub queue_sel: u32,
    pub config_generation: u32,
    pub active: bool,
    pub interrupt_status: u32,
    pub queues: Vec<QueueState>,
    /// The device's own state, as it saves it.
    pub device: DeviceState,
}

pub struct MmioTransport {
    device: Box<dyn VirtioDevice>,
    mem: GuestMemory,
    pub queues: Vec<Queue>,
    pub queue_events: Vec<EventFd>,
    pub interrupt: Arc<Interrupt>,
    status: u32,
    device_features_sel: u32,
    driver_features_sel: u32,
    acked_features: u64,
    queue_sel: u32,
    config_generation: u32,
    active: bool,
    /// The last error of the device, kept for `status` and the log.
    pub last_error: Option<String>,
}

impl MmioTransport {
    pub fn new(
        device: Box<dyn VirtioDevice>,
        mem: GuestMemory,
        interrupt: Arc<Interrupt>,
    ) -> Result<MmioTransport, DeviceError> {
        let mut queues = Vec::new();
        let mut queue_events = Vec::new();
        for &size in device.queue_max_sizes() {
            queues.push(Queue::new(size)?);
            queue_events.push(EventFd::new(libc::EFD_NONBLOCK)?);
        }
        Ok(MmioTransport {
            device,
            mem,
            queues,
            queue_events,
            interrupt,
            status: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            acked_features: 0,
            queue_sel: 0,
            config_generation: 0,
            active: false,
            last_error: None,
        })
    }

    pub fn device(&self) -> &dyn VirtioDevice {
        self.device.as_ref()
    }

    pub fn is_active(&self) -> bool {
        self.active
    }

    /// The guest notified queue `index` (its ioeventfd fired).
    pub fn notify(&mut self, index: usize) {
        if !self.active || index >= self.queues.len() {
            return;
        }
        let r = self
            .device
            .process_queue(index, &mut self.queues, &self.mem, &self.interrupt);
        self.note(r);
    }

    /// The device's own fd (a tap) is readable.
    pub fn io_ready(&mut self) {
        if !self.active {
            return;
        }
        let r = self
            .device
            .process_io(&mut self.queues, &self.mem, &self.interrupt);
        self.note(r);
    }

    pub fn wants_io(&self) -> bool {
        self.active && self.device.wants_io()
    }

    fn note(&mut self, r: Result<(), DeviceError>) {
        if let Err(e) = r {
            // A broken queue is the guest's doing: say so once, mark the device as
            // needing a reset, and leave the VMM running.
            if self.last_error.is_none() {
                tracing::warn!("virtio device type {}: {e}", self.device.device_type());
            }
            self.last_error = Some(e.to_string());
            self.status |= 0x40; // DEVICE_NEEDS_RESET
            self.interrupt.trigger(INT_CONFIG);
        }
    }

    /// Raises again an interrupt the driver had not acknowledged when the state was
    /// captured: an edge raised around the capture may be missing from the interrupt
    /// controllers' saved state, and a lost one can stall a queue for good (a NIC whose
    /// RX ring is full waits for the guest, which waits for the interrupt). A spurious
    /// one is harmless.
    /// Call it after the interrupt controllers' and vCPUs' state is restored, which
    /// would overwrite an edge delivered before.
    pub fn raise_unacknowledged(&self) {
        if self.interrupt.status() != 0 {
            let _ = self.interrupt.raise();
        }
    }

    /// Where each queue stands, for `status`: the device's positions next to the indices
    /// the driver and the device last published in guest memory, and the interrupt bits
    /// not yet acknowledged. A queue whose `avail_idx` runs ahead of `next_avail` has work
    /// the device has not taken; one whose `used_idx` the driver has not caught up with is
    /// waiting for an interrupt.
    pub fn queues_status(&self) -> serde_json::Value {
        use std::sync::atomic::Ordering;
        let queues: Vec<serde_json::Value> = self
            .queues
            .iter()
            .map(|q| {
                let ring = |r: Result<std::num::Wrapping<u16>, virtio_queue::Error>| {
                    r.map_or(serde_json::Value::Null, |v| v.0.into())
                };
                let (avail, used) = if q.ready() {
                    (
                        ring(q.avail_idx(&self.mem, Ordering::Acquire)),
                        ring(q.used_idx(&self.mem, Ordering::Acquire)),
                    )
                } else {
                    (serde_json::Value::Null, serde_json::Value::Null)
                };
                serde_json::json!({
                    "ready": q.ready(),
                    "size": q.size(),
                    "next_avail": q.next_avail(),
                    "next_used": q.next_used(),
                    "avail_idx": avail,
                    "used_idx": used,
                })
            })
            .collect();
        serde_json::json!({
            "status": self.status,
            "interrupt_status": self.interrupt.status(),
            "interrupts_raised_again": self.interrupt.raised_again(),
            "wants_io": self.wants_io(),
            "queues": queues,
        })
    }

    fn selected_queue(&mut self) -> Option<&mut Queue> {
        self.queues.get_mut(self.queue_sel as usize)
    }

    fn reset(&mut self) {
        self.device.reset();
        for q in &mut self.queues {
            q.reset();
        }
        self.status = 0;
        self.acked_features = 0;
        self.device_features_sel = 0;
        self.driver_features_sel = 0;
        self.queue_sel = 0;
        self.active = false;
        self.last_error = None;
        self.interrupt.set_status(0);
    }

    fn set_status(&mut self, value: u32) {
        if value == 0 {
            self.reset();
            return;
        }
        let newly = value & !self.status;
        if newly & STATUS_FEATURES_OK != 0 && self.acked_features & VIRTIO_F_VERSION_1 == 0 {
            // A modern-only device: a driver that did not take VERSION_1 cannot use it.
            self.status = value & !STATUS_FEATURES_OK;
            return;
        }
        self.status = value;
        if newly & STATUS_DRIVER_OK != 0 && !self.active {
            let ready_ok = self
                .queues
                .iter()
                .all(|q| !q.ready() || q.is_valid(&self.mem));
            let event_idx = self.acked_features & VIRTIO_RING_F_EVENT_IDX != 0;
            for q in &mut self.queues {
                q.set_event_idx(event_idx);
            }
            let r = if ready_ok {
                self.device.activate(self.acked_features)
            } else {
                Err(DeviceError::Queue(virtio_queue::Error::InvalidSize))
            };
            match r {
                Ok(()) => self.active = true,
                Err(e) => {
                    self.last_error = Some(e.to_string());
                    self.status |= STATUS_FAILED;
                }
            }
        }
    }

    fn offered(&self) -> u64 {
        self.device.features() | VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
    }

    fn read_reg(&mut self, offset: u64) -> u32 {
        match offset {
            0x00 => MAGIC,
            0x04 => 2,
            0x08 => self.device.device_type(),
            0x0c => VENDOR,
            0x10 => {
                let f = self.offered();
                match self.device_features_sel {
                    0 => f as u32,
                    1 => (f >> 32) as u32,
                    _ => 0,
                }
            }
            0x34 => self
                .selected_queue()
                .map(|q| u32::from(q.max_size()))
                .unwrap_or(0),
            0x44 => self.selected_queue().map(|q| q.ready() as u32).unwrap_or(0),
            INTERRUPT_STATUS => self.interrupt.status(),
            0x70 => self.status,
            0xfc => self.config_generation,
            _ => 0,
        }
    }

    fn write_reg(&mut self, offset: u64, v: u32) {
        // Queue layout may only change while the driver sets the device up.
        let setting_up = self.status & STATUS_DRIVER_OK == 0;
        match offset {
            0x14 => self.device_features_sel = v,
            0x20 => {
                let offered = self.offered();
                let shift = match self.driver_features_sel {
                    0 => 0,
                    1 => 32,
                    _ => return,
                };
                if self.status & STATUS_FEATURES_OK == 0 {
                    let mask = 0xffff_ffffu64 << shift;
                    self.acked_features =
                        (self.acked_features & !mask) | ((u64::from(v) << shift) & offered);
                }
            }
            0x24 => self.driver_features_sel = v,
            0x30 => self.queue_sel = v,
            0x38 if setting_up => {
                if let Some(q) = self.selected_queue() {
                    // virtio-queue checks the size (power of two, not above the maximum).
                    q.set_size(v as u16);
                }
            }
            0x44 if setting_up => {
                if let Some(q) = self.selected_queue() {
                    q.set_ready(v == 1);
                }
            }
            0x50 => {
                // A notify that did not go through the ioeventfd (e.g. a 16-bit write).
                self.notify(v as usize);
            }
            INTERRUPT_ACK => self.interrupt.ack(v),
            0x70 => self.set_status(v),
            0x80 | 0x84 | 0x90 | 0x94 | 0xa0 | 0xa4 if setting_up => {
                let (low, high) = if offset.is_multiple_of(8) {
                    (Some(v), None)
                } else {
                    (None, Some(v))
                };
                if let Some(q) = self.selected_queue() {
                    match offset {
                        0x80 | 0x84 => q.set_desc_table_address(low, high),
                        0x90 | 0x94 => q.set_avail_ring_address(low, high),
                        _ => q.set_used_ring_address(low, high),
                    }
                }
            }
            _ => {}
        }
    }
}

impl Persist for MmioTransport {
    type State = VirtioMmioState;
    type Error = DeviceError;
    const STATE_VERSION: u32 = 1;

    /// The transport's state and its queues' (device loop parked, vCPUs paused).
    fn save(&mut self) -> Result<VirtioMmioState, DeviceError> {
        Ok(VirtioMmioState {
            device_type: self.device.device_type(),
            status: self.status,
            device_features_sel: self.device_features_sel,
            driver_features_sel: self.driver_features_sel,
            acked_features: self.acked_features,
            queue_sel: self.queue_sel,
            config_generation: self.config_generation,
            active: self.active,
            interrupt_status: self.interrupt.status(),
            queues: self
                .queues
                .iter()
                .map(|q| {
                    let s = q.state();
                    QueueState {
                        max_size: s.max_size,
                        size: s.size,
                        ready: s.ready,
                        next_avail: s.next_avail,
                        next_used: s.next_used,
                        event_idx: s.event_idx_enabled,
                        desc_table: s.desc_table,
                        avail_ring: s.avail_ring,
                        used_ring: s.used_ring,
                    }
                })
                .collect(),
            device: self.device.save_as(type_name(self.device.device_type()))?,
        })
    }

    /// Continues from `s` (a restore, before any vCPU runs): the same negotiation, the
    /// same queue positions, the device active again if it was. A state that does not
    /// fit this device (another type, other queues, an invalid queue) is refused.
    fn restore(&mut self, s: &VirtioMmioState) -> Result<(), DeviceError> {
        if s.device_type != self.device.device_type() || s.queues.len() != self.queues.len() {
            return Err(DeviceError::State(format!(
                "device type {} with {} queues in the checkpoint, {} with {} here",
                s.device_type,
                s.queues.len(),
                self.device.device_type(),
                self.queues.len()
            )));
        }
        let mut queues = Vec::new();
        for (q, live) in s.queues.iter().zip(&self.queues) {
            if q.max_size != live.max_size() {
                return Err(DeviceError::State("queue maximum size differs".into()));
            }
            let state = virtio_queue::QueueState {
                max_size: q.max_size,
                next_avail: q.next_avail,
                next_used: q.next_used,
                event_idx_enabled: q.event_idx,
                size: q.size,
                ready: q.ready,
                desc_table: q.desc_table,
                avail_ring: q.avail_ring,
                used_ring: q.used_ring,
            };
            queues.push(Queue::try_from(state)?);
        }
        self.device
            .restore_from(type_name(self.device.device_type()), &s.device)?;
        self.queues = queues;
        self.status = s.status;
        self.device_features_sel = s.device_features_sel;
        self.driver_features_sel = s.driver_features_sel;
        self.acked_features = s.acked_features;
        self.queue_sel = s.queue_sel;
        self.config_generation = s.config_generation;
        self.interrupt.set_status(s.interrupt_status);
        if s.active {
            self.device.activate(self.acked_features)?;
            self.active = true;
        }
        Ok(())
    }
}

impl BusDevice for MmioTransport {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if offset >= 0x100 {
            self.device.read_config(offset - 0x100, data);
            return;
        }
        if data.len() != 4 {
            data.fill(0);
            return;
        }
        data.copy_from_slice(&self.read_reg(offset).to_le_bytes());
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset >= 0x100 {
            if self.status & STATUS_DRIVER != 0 {
                self.device.write_config(offset - 0x100, data);
                self.config_generation = self.config_generation.wrapping_add(1);
            }
            return;
        }
        let Ok(bytes) = <[u8; 4]>::try_from(data) else {
            return;
        };
        self.write_reg(offset, u32::from_le_bytes(bytes));
    }
}

/// A transport as the vCPUs reach it. The driver reads InterruptStatus and writes
/// InterruptACK on every interrupt; both are atomics, answered here without the
/// transport's lock. The device loop holds that lock while it works a queue, and it
/// raises the interrupt in the middle of that work: a vCPU taking it at once found the
/// lock held and slept until the loop was done. Every other register takes the lock.
pub struct MmioBusFront {
    interrupt: Arc<Interrupt>,
    transport: Arc<Mutex<MmioTransport>>,
}

impl MmioBusFront {
    pub fn new(transport: Arc<Mutex<MmioTransport>>) -> MmioBusFront {
        let interrupt = transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .interrupt
            .clone();
        MmioBusFront {
            interrupt,
            transport,
        }
    }

    fn transport(&self) -> std::sync::MutexGuard<'_, MmioTransport> {
        self.transport
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }
}

impl BusDevice for MmioBusFront {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match data.len() {
            4 if offset == INTERRUPT_STATUS => {
                data.copy_from_slice(&self.interrupt.status().to_le_bytes())
            }
            _ => self.transport().read(offset, data),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        match <[u8; 4]>::try_from(data) {
            Ok(v) if offset == INTERRUPT_ACK => self.interrupt.ack(u32::from_le_bytes(v)),
            _ => self.transport().write(offset, data),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingLine;
    use crate::virtio::block::Block;
    use vm_memory::GuestAddress;

    fn transport(disk: &tempfile::NamedTempFile) -> MmioTransport {
        let mem = GuestMemory::from_ranges(&[(GuestAddress(0), 1 << 20)]).expect("memory");
        let file = disk.reopen().expect("disk");
        let block = Block::new(file, "disk".into(), false, "d").expect("block");
        let interrupt = Arc::new(Interrupt::new(5, Arc::new(CountingLine::default())));
        MmioTransport::new(Box::new(block), mem, interrupt).expect("transport")
    }

    fn reg(t: &mut MmioTransport, offset: u64, v: u32) {
        t.write(offset, &v.to_le_bytes());
    }

    /// What Linux's driver does: acknowledge, accept VERSION_1, set up queue 0, go.
    fn negotiate(t: &mut MmioTransport) {
        reg(t, 0x70, 1);
        reg(t, 0x70, 1 | STATUS_DRIVER);
        reg(t, 0x24, 1);
        reg(t, 0x20, 1);
        reg(t, 0x70, 1 | STATUS_DRIVER | STATUS_FEATURES_OK);
        reg(t, 0x30, 0);
        reg(t, 0x38, 16);
        for (offset, at) in [(0x80, 0x1000), (0x90, 0x2000), (0xa0, 0x3000)] {
            reg(t, offset, at);
            reg(t, offset + 4, 0);
        }
        reg(t, 0x44, 1);
        reg(
            t,
            0x70,
            1 | STATUS_DRIVER | STATUS_FEATURES_OK | STATUS_DRIVER_OK,
        );
    }

    fn disk() -> tempfile::NamedTempFile {
        let disk = tempfile::NamedTempFile::new().expect("disk");
        disk.as_file().set_len(64 * 1024).expect("size");
        disk
    }

    #[test]
    fn a_negotiated_transport_restores_into_a_fresh_one() {
        let disk = disk();
        let mut t = transport(&disk);
        negotiate(&mut t);
        let saved = t.save().expect("save");
        assert!(saved.active, "the driver set DRIVER_OK");
        assert_eq!(saved.queues[0].desc_table, 0x1000);
        let mut fresh = transport(&disk);
        fresh.restore(&saved).expect("restore");
        assert_eq!(fresh.save().expect("save again"), saved);
        let mut ready = [0u8; 4];
        fresh.read(0x44, &mut ready);
        assert_eq!(u32::from_le_bytes(ready), 1, "queue 0 is ready again");
    }

    #[test]
    fn state_of_another_device_is_refused_and_changes_nothing() {
        let disk = disk();
        let mut t = transport(&disk);
        negotiate(&mut t);
        let saved = t.save().expect("save");
        let mut fresh = transport(&disk);
        let untouched = fresh.save().expect("save");

        let mut other_type = saved.clone();
        other_type.device_type = super::super::TYPE_NET;
        assert!(matches!(
            fresh.restore(&other_type),
            Err(DeviceError::State(_))
        ));
        let mut other_part = saved.clone();
        other_part.device.name = "virtio-net".into();
        assert!(matches!(
            fresh.restore(&other_part),
            Err(DeviceError::Persist(_))
        ));
        let mut bad_queue = saved;
        bad_queue.queues[0].size = 3;
        assert!(
            fresh.restore(&bad_queue).is_err(),
            "a size no ring can have"
        );
        assert_eq!(fresh.save().expect("save"), untouched);
    }
}
