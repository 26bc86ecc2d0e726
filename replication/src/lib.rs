//! Replication of a running VM to a second host by micro-checkpointing (DESIGN.md,
//! "Epochs" and "Wire protocol"): the frames on the wire, the primary's sender, the
//! secondary's receiver with its per-epoch disk buffer, and the output gate that holds
//! the guest's network output until the checkpoint that produced it is committed.
//!
//! Knows no KVM and no device: it moves checkpoints (`mcvmm_checkpoint`) and is driven by
//! `vmm`.
//!
//! The stream, in order:
//!
//! ```text
//! primary                                   secondary
//! Hello(version, shape, generation)  ──►
//!                                    ◄──    Accept(disk chunk digests) | Refuse(reason)
//! Pages(0)… DiskChunk(0)… DiskWrite(1)… SyncDone  ──►   (initial sync, guest running)
//! per epoch n: DiskWrite(n)… Begin(n) Pages(n)… State(n) End(n)  ──►
//!                                    ◄──    Ack(n) once n is committed
//! Heartbeat ◄──► Heartbeat  (when idle)
//! Takeover(n)                        ──►    (planned switch)
//! ```

pub mod delta;
pub mod disk;
pub mod gate;
pub mod messages;
pub mod primary;
pub mod secondary;
pub mod wire;
