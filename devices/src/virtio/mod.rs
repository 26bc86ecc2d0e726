//! virtio devices over the virtio-mmio transport (version 2, "modern" only).

pub mod block;
pub mod chain;
pub mod mmio;
pub mod net;
pub mod tap;

use std::sync::Arc;

use mcvmm_checkpoint::persist::{Part, PersistError};
use virtio_queue::{DescriptorChain, Queue, QueueT};

use crate::interrupt::Interrupt;
use crate::GuestMemory;

pub const VIRTIO_F_VERSION_1: u64 = 1 << 32;

/// Works through every chain the driver has added to `queue`; `handle` does one and
/// returns the bytes it wrote into it, for the used ring. Returns whether any was used.
/// The driver need not kick meanwhile (each kick is a VM exit): what it adds is picked up
/// before kicks are asked for again.
pub fn drain_queue(
    queue: &mut Queue,
    mem: &GuestMemory,
    mut handle: impl FnMut(DescriptorChain<&GuestMemory>) -> u32,
) -> Result<bool, DeviceError> {
    let mut used_any = false;
    loop {
        queue.disable_notification(mem)?;
        let mut took = false;
        while let Some(chain) = queue.pop_descriptor_chain(mem) {
            took = true;
            let head = chain.head_index();
            let len = handle(chain);
            queue.add_used(mem, head, len)?;
            used_any = true;
        }
        // A round that took nothing while the avail index says there is more is a ring
        // the guest broke: going round again would spin the device loop for good.
        if !(queue.enable_notification(mem)? && took) {
            return Ok(used_any);
        }
    }
}

pub const TYPE_NET: u32 = 1;
pub const TYPE_BLOCK: u32 = 2;

/// A device type's name, as `status` shows it and as the device's part in a checkpoint
/// is named.
pub fn type_name(device_type: u32) -> &'static str {
    match device_type {
        TYPE_BLOCK => "virtio-blk",
        TYPE_NET => "virtio-net",
        _ => "virtio",
    }
}

/// The device half of a virtio device; the transport owns queues and registers.
/// Every device implements [`mcvmm_checkpoint::persist::Persist`] (so it is a [`Part`]):
/// the transport saves and restores the device's own state with its queues'.
pub trait VirtioDevice: Send + Part {
    fn device_type(&self) -> u32;
    /// Maximum size of each queue; the number of entries is the number of queues.
    fn queue_max_sizes(&self) -> &[u16];
    /// Feature bits offered to the driver.
    fn features(&self) -> u64;
    /// Reads the device-specific configuration space.
    fn read_config(&self, offset: u64, data: &mut [u8]);
    /// Configuration writes are ignored unless a device says otherwise.
    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}
    /// The driver set DRIVER_OK: from now on queues carry requests.
    fn activate(&mut self, acked_features: u64) -> Result<(), DeviceError>;
    /// Handles the guest's notification of queue `index`.
    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError>;
    /// Back to the state before activation (the driver wrote 0 to Status).
    fn reset(&mut self);
    /// An extra file descriptor the device loop must watch (a tap), if any.
    fn io_fd(&self) -> Option<std::os::fd::RawFd> {
        None
    }
    /// `io_fd` became readable.
    fn process_io(
        &mut self,
        _queues: &mut [Queue],
        _mem: &GuestMemory,
        _interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        Ok(())
    }
    /// Whether the device wants `io_fd` watched right now (a full RX path says no).
    fn wants_io(&self) -> bool {
        true
    }
    /// Counters for `status`.
    fn stats(&self) -> serde_json::Value;
}

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    #[error("virtqueue: {0}")]
    Queue(#[from] virtio_queue::Error),
    #[error("{0}")]
    Io(#[from] std::io::Error),
    #[error("driver did not accept VIRTIO_F_VERSION_1")]
    Legacy,
    #[error("checkpointed state does not fit: {0}")]
    State(String),
    #[error(transparent)]
    Persist(#[from] PersistError),
}

/// Reads `data.len()` bytes of a config space at `offset`; bytes past its end read as 0
/// (a driver may probe beyond what a device has).
pub fn copy_config(config: &[u8], offset: u64, data: &mut [u8]) {
    let start = usize::try_from(offset).unwrap_or(usize::MAX);
    for (i, b) in data.iter_mut().enumerate() {
        *b = start
            .checked_add(i)
            .and_then(|at| config.get(at))
            .copied()
            .unwrap_or(0);
    }
}

/// Shared ownership of the interrupt for devices that signal from the device loop.
pub type SharedInterrupt = Arc<Interrupt>;
