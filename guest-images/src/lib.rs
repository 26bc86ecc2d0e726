//! The mcvmm test guest's user space: the agent protocol and its server and client, the
//! self-checking memory workload, and the bits of init that are worth testing on the host.

pub mod badchain;
pub mod client;
pub mod cmdline;
pub mod memload;
pub mod proto;
pub mod records;
pub mod server;
