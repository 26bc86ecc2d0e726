//! virtio-net on a tap: queue 0 receives, queue 1 transmits. No offloads: every frame
//! carries the 12-byte virtio-net header of VERSION_1, all zero but `num_buffers`.
//!
//! Receive path: a frame read from the tap that finds no guest buffer waits in `pending`,
//! and the tap is not watched until the guest posts RX buffers (its notify), so a guest
//! that stops receiving stops the VMM reading, not the VMM spinning. Only then does the
//! device ask for that notify (with event indices, the only way the guest sends one):
//! while frames find buffers, the guest is asked not to notify the RX queue, or each
//! refill after each frame received would wake the device loop for nothing.

use std::os::fd::{AsRawFd, RawFd};
use std::sync::{Arc, OnceLock};
use std::time::Instant;

use mcvmm_checkpoint::persist::Persist;
use mcvmm_checkpoint::seams::OutputGate;
use serde::{Deserialize, Serialize};

use virtio_queue::{DescriptorChain, Queue, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use super::tap::Tap;
use super::{DeviceError, VirtioDevice, TYPE_NET};
use crate::interrupt::{Interrupt, INT_USED_RING};
use crate::GuestMemory;

const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const F_MAC: u64 = 1 << 5;
const HDR_LEN: usize = 12;
/// Largest frame without offloads (a 64 KiB frame is more than any MTU the guest can set).
const MAX_FRAME: usize = 65_550;

#[derive(Debug, Default, Clone, serde::Serialize)]
pub struct NetStats {
    pub rx_frames: u64,
    pub rx_bytes: u64,
    pub rx_dropped: u64,
    pub tx_frames: u64,
    pub tx_bytes: u64,
    pub tx_dropped: u64,
}

pub struct Net {
    tap: Tap,
    mac: [u8; 6],
    pending: Option<Vec<u8>>,
    buf: Vec<u8>,
    stats: NetStats,
    /// Replication: frames the guest sends may have to wait for their checkpoint.
    gate: Option<Arc<dyn OutputGate>>,
    /// After a takeover: when the guest started here, until its first frame each way is
    /// logged (the failover's last steps, as this host saw them).
    first_frames_since: Option<Arc<OnceLock<Instant>>>,
    rx_logged: bool,
    tx_logged: bool,
}

impl Net {
    pub fn new(tap: Tap, mac: [u8; 6]) -> Net {
        Net {
            tap,
            mac,
            pending: None,
            buf: vec![0u8; MAX_FRAME],
            stats: NetStats::default(),
            gate: None,
            first_frames_since: None,
            rx_logged: false,
            tx_logged: false,
        }
    }

    /// Logs the first frame delivered to the guest and the first it sends, in ms from
    /// the moment `start` is set to (a VM prepared ahead sets it when it starts).
    pub fn log_first_frames(&mut self, start: Arc<OnceLock<Instant>>) {
        self.first_frames_since = Some(start);
    }

    /// Logs the first frame `what` ("to", "from") the guest, if first frames are logged
    /// (see `log_first_frames`); returns whether it did.
    fn first_frame(&self, what: &str) -> bool {
        match self.first_frames_since.as_ref().and_then(|c| c.get()) {
            Some(t) => {
                tracing::info!(
                    "net: first frame {what} the guest {:.1} ms after it started here",
                    t.elapsed().as_secs_f64() * 1e3
                );
                true
            }
            None => false,
        }
    }

    /// Sends the guest's frames through `gate`.
    pub fn gate_output(&mut self, gate: Arc<dyn OutputGate>) {
        self.gate = Some(gate);
    }

    /// Copies `frame` (with a header in front) into the next RX chain. Returns false if
    /// the guest has posted no buffer.
    fn deliver(
        &mut self,
        frame: &[u8],
        queue: &mut Queue,
        mem: &GuestMemory,
    ) -> Result<bool, DeviceError> {
        let Some(chain) = queue.pop_descriptor_chain(mem) else {
            return Ok(false);
        };
        let head = chain.head_index();
        let mut hdr = [0u8; HDR_LEN];
        hdr[10] = 1; // num_buffers
        let mut parts: [&[u8]; 2] = [&hdr, frame];
        let mut written = 0usize;
        let mut ok = true;
        for d in chain.take(usize::from(QUEUE_SIZE)) {
            if parts.iter().all(|p| p.is_empty()) {
                break;
            }
            if !d.is_write_only() {
                ok = false;
                break;
            }
            let mut room = d.len() as usize;
            let mut at: GuestAddress = d.addr();
            for p in parts.iter_mut() {
                if room == 0 || p.is_empty() {
                    continue;
                }
                let n = room.min(p.len());
                if mem.write_slice(&p[..n], at).is_err() {
                    ok = false;
                    break;
                }
                *p = &p[n..];
                room -= n;
                written += n;
                match at.checked_add(n as u64) {
                    Some(next) => at = next,
                    None => ok = false,
                }
            }
            if !ok {
                break;
            }
        }
        if !ok || parts.iter().any(|p| !p.is_empty()) {
            // Buffers too small or not writable: the frame is lost, the chain returned.
            self.stats.rx_dropped += 1;
            queue.add_used(mem, head, 0)?;
            return Ok(true);
        }
        self.stats.rx_frames += 1;
        self.stats.rx_bytes += frame.len() as u64;
        if !self.rx_logged {
            self.rx_logged = self.first_frame("to");
        }
        queue.add_used(mem, head, written as u32)?;
        Ok(true)
    }

    fn receive(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let mut delivered = false;
        let mut looked_again = false;
        loop {
            let frame = match self.pending.take() {
                Some(f) => f,
                None => match self.tap.read_frame(&mut self.buf) {
                    Ok(n) => self.buf[..n].to_vec(),
                    Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => break,
                    Err(e) => return Err(e.into()),
                },
            };
            if self.deliver(&frame, &mut queues[RX], mem)? {
                delivered = true;
                continue;
            }
            self.pending = Some(frame);
            // Out of buffers: the guest's next refill is to notify. Buffers it posted
            // before it could see that are looked for once more (only once: a ring whose
            // index promises buffers it does not hold must not spin the loop).
            if queues[RX].enable_notification(mem)? && !looked_again {
                looked_again = true;
                continue;
            }
            break;
        }
        if self.pending.is_none() {
            queues[RX].disable_notification(mem)?;
        }
        if delivered && queues[RX].needs_notification(mem)? {
            interrupt.trigger(INT_USED_RING);
        }
        Ok(())
    }

    fn transmit(
        &mut self,
        queue: &mut Queue,
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        let used_any = super::drain_queue(queue, mem, |chain| {
            self.send(chain, mem);
            0
        })?;
        if used_any && queue.needs_notification(mem)? {
            interrupt.trigger(INT_USED_RING);
        }
        Ok(())
    }

    /// Sends the frame of one TX chain to the tap, or to the output gate that holds it;
    /// a malformed chain's frame is dropped.
    fn send(&mut self, chain: DescriptorChain<&GuestMemory>, mem: &GuestMemory) {
        let mut frame = Vec::new();
        let mut ok = true;
        for d in chain.take(usize::from(QUEUE_SIZE)) {
            let len = d.len() as usize;
            if d.is_write_only() || frame.len() + len > MAX_FRAME + HDR_LEN {
                ok = false;
                break;
            }
            let start = frame.len();
            frame.resize(start + len, 0);
            if mem.read_slice(&mut frame[start..], d.addr()).is_err() {
                ok = false;
                break;
            }
        }
        if !ok || frame.len() <= HDR_LEN {
            self.stats.tx_dropped += 1;
            return;
        }
        let held = self
            .gate
            .as_ref()
            .is_some_and(|g| g.hold(&frame[HDR_LEN..]));
        if !held {
            if self.tap.write_frame(&frame[HDR_LEN..]).is_err() {
                // A full tap queue drops the frame, as a congested link would.
                self.stats.tx_dropped += 1;
                return;
            }
            if !self.tx_logged {
                self.tx_logged = self.first_frame("from");
            }
        }
        self.stats.tx_frames += 1;
        self.stats.tx_bytes += (frame.len() - HDR_LEN) as u64;
    }
}

/// `mac` as operators write it: 52:54:00:12:34:56.
pub fn mac_text(mac: [u8; 6]) -> String {
    mac.map(|b| format!("{b:02x}")).join(":")
}

/// When a moved guest's RARP announcements go out, from the moment it starts. A bridge
/// port that has just come up may still drop the first ones, and one lost frame would
/// leave switches sending the guest's traffic to its old host until their entries age
/// out, so they are repeated, densely at first (QEMU sends five over half a second).
pub const ANNOUNCE_AT_MS: [u64; 8] = [0, 20, 50, 100, 200, 400, 800, 1600];

/// Announces `mac` through `tap` (a handle from [`Tap::writer`]) on the
/// [`ANNOUNCE_AT_MS`] schedule, from a thread of its own so the guest need not wait.
pub fn announce_moved(mut tap: std::fs::File, mac: [u8; 6]) -> std::io::Result<()> {
    use std::io::Write;
    let frame = rarp_announce(mac);
    std::thread::Builder::new()
        .name("announce".into())
        .spawn(move || {
            let start = std::time::Instant::now();
            for at in ANNOUNCE_AT_MS {
                let due = std::time::Duration::from_millis(at);
                std::thread::sleep(due.saturating_sub(start.elapsed()));
                // A full tap queue drops one announcement; the next one follows.
                let _ = tap.write(&frame);
            }
        })
        .map(|_| ())
}

/// A RARP "request reverse" frame from `mac` to everyone: what a moved guest announces.
pub fn rarp_announce(mac: [u8; 6]) -> Vec<u8> {
    let mut f = Vec::with_capacity(60);
    f.extend_from_slice(&[0xff; 6]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0x80, 0x35]); // ethertype RARP
    f.extend_from_slice(&[0, 1, 0x08, 0, 6, 4, 0, 3]); // Ethernet/IPv4, opcode 3
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.extend_from_slice(&mac);
    f.extend_from_slice(&[0; 4]);
    f.resize(60, 0);
    f
}

/// virtio-net keeps no state a restored guest needs: the queues are the transport's,
/// the MAC is configuration, and a frame read from the tap that no receive buffer took
/// yet is network input in flight, which a guest must expect to lose as on a real link
/// (its sender retransmits it), not state.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NetState {}

impl Persist for Net {
    type State = NetState;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&mut self) -> Result<NetState, Self::Error> {
        Ok(NetState {})
    }

    fn restore(&mut self, _: &NetState) -> Result<(), Self::Error> {
        Ok(())
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE, QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        // Event indices are not offered: in the lab request/response was the same with
        // and without them (docs/lab-notes.md).
        F_MAC
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        // mac[6], status u16 (not offered), max_virtqueue_pairs u16
        let mut config = [0u8; 10];
        config[..6].copy_from_slice(&self.mac);
        config[8] = 1;
        super::copy_config(&config, offset, data);
    }

    fn activate(&mut self, _acked: u64) -> Result<(), DeviceError> {
        Ok(())
    }

    fn process_queue(
        &mut self,
        index: usize,
        queues: &mut [Queue],
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        match index {
            RX => self.receive(queues, mem, interrupt),
            TX => self.transmit(&mut queues[TX], mem, interrupt),
            _ => Ok(()),
        }
    }

    fn reset(&mut self) {
        self.pending = None;
    }

    fn io_fd(&self) -> Option<RawFd> {
        Some(self.tap.as_raw_fd())
    }

    fn process_io(
        &mut self,
        queues: &mut [Queue],
        mem: &GuestMemory,
        interrupt: &Interrupt,
    ) -> Result<(), DeviceError> {
        self.receive(queues, mem, interrupt)
    }

    fn wants_io(&self) -> bool {
        self.pending.is_none()
    }

    fn stats(&self) -> serde_json::Value {
        serde_json::json!({
            "tap": self.tap.name,
            "mac": mac_text(self.mac),
            "io": self.stats,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use mcvmm_checkpoint::persist::Part;

    #[test]
    fn state_restores_into_a_fresh_nic() {
        let nic = || {
            let file = std::fs::File::open("/dev/null").expect("/dev/null");
            Net::new(Tap::from_file(file, "test0"), [2, 0, 0, 0, 0, 1])
        };
        let part = nic().save_as("virtio-net").expect("save");
        let mut fresh = nic();
        fresh.restore_from("virtio-net", &part).expect("restore");
        assert_eq!(fresh.save_as("virtio-net").expect("save again"), part);
        let mut block_part = part;
        block_part.name = "virtio-blk".into();
        assert!(fresh.restore_from("virtio-net", &block_part).is_err());
    }
}
