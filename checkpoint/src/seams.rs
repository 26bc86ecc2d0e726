//! The points where replication observes or holds what a device does. The traits live
//! here, at the bottom, so that `devices/` calls them and `replication/` implements them
//! without either knowing the other.

/// Sees every guest write to a disk once it has reached the local file, in the order the
/// device completed them (all on the device thread).
pub trait DiskWriteSink: Send + Sync {
    /// `data` is handed over: the device made it for this call, so nothing copies it again.
    fn written(&self, disk: usize, offset: u64, data: Vec<u8>);

    /// Whether writes are wanted now: a guest that is not protected at the moment (it
    /// may be later) has its writes done without handing them over.
    fn recording(&self) -> bool {
        true
    }
}

/// Decides whether a frame the guest transmitted may leave now.
pub trait OutputGate: Send + Sync {
    /// `true`: the gate took the frame and sends it when its epoch is acknowledged (or
    /// drops it, as a congested link would); `false`: the device sends it at once.
    fn hold(&self, frame: &[u8]) -> bool;
}
