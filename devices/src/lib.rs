//! mcvmm's device model. Every device here runs on the VMM's single device thread (queue
//! work) or is reached from a vCPU thread through a [`bus::Bus`] (register accesses), each
//! behind its own lock; so when the vCPUs are paused and the device loop is parked, no
//! device is in the middle of anything.

pub mod bus;
pub mod i8042;
pub mod interrupt;
pub mod serial;
pub mod virtio;

pub use mcvmm_checkpoint::GuestMemory;
