//! Just enough of the i8042 keyboard controller (ports 0x60 and 0x64) for Linux to probe it
//! quickly and to reset the machine through it (`reboot=k`: command 0xFE on port 0x64).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use vmm_sys_util::eventfd::EventFd;

use mcvmm_checkpoint::persist::Persist;
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;

pub const PORT: u64 = 0x60;
pub const PORT_LEN: u64 = 5;

const STATUS_OUTPUT_FULL: u8 = 0x01;
const STATUS_SYSTEM_FLAG: u8 = 0x04;
const STATUS_COMMAND: u8 = 0x08;

const CMD_READ_CTR: u8 = 0x20;
const CMD_WRITE_CTR: u8 = 0x60;
const CMD_SELF_TEST: u8 = 0xaa;
const CMD_KBD_TEST: u8 = 0xab;
const CMD_READ_OUTPORT: u8 = 0xd0;
const CMD_WRITE_OUTPORT: u8 = 0xd1;
const CMD_RESET_CPU: u8 = 0xfe;

/// How the controller asks for a machine reset. The flag is for the vCPU that wrote the
/// command: it must not enter the guest again, or a guest that resets from its panic path
/// (`reboot=k`) falls through to its triple-fault fallback before the device loop has
/// woken, and a clean reboot is reported as a crash. The eventfd wakes the device loop.
pub struct ResetLine {
    pub requested: Arc<AtomicBool>,
    pub wake: EventFd,
}

/// The controller's registers and the byte it has for the guest.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct I8042State {
    pub status: u8,
    pub control: u8,
    pub outport: u8,
    pub output: Option<u8>,
    pub pending_write: Option<u8>,
}

pub struct I8042 {
    reset: ResetLine,
    status: u8,
    control: u8,
    outport: u8,
    output: Option<u8>,
    pending_write: Option<u8>,
}

impl I8042 {
    /// `reset` is raised when the guest asks for a CPU reset.
    pub fn new(reset: ResetLine) -> I8042 {
        I8042 {
            reset,
            status: STATUS_SYSTEM_FLAG,
            control: 0,
            outport: 0x01,
            output: None,
            pending_write: None,
        }
    }

    fn respond(&mut self, byte: u8) {
        self.output = Some(byte);
    }

    fn command(&mut self, cmd: u8) {
        self.status |= STATUS_COMMAND;
        match cmd {
            CMD_READ_CTR => self.respond(self.control),
            CMD_WRITE_CTR | CMD_WRITE_OUTPORT => self.pending_write = Some(cmd),
            CMD_SELF_TEST => self.respond(0x55),
            CMD_KBD_TEST => self.respond(0x00),
            CMD_READ_OUTPORT => self.respond(self.outport),
            CMD_RESET_CPU => {
                self.reset.requested.store(true, Ordering::SeqCst);
                let _ = self.reset.wake.write(1);
            }
            _ => {}
        }
    }
}

impl Persist for I8042 {
    type State = I8042State;
    type Error = std::convert::Infallible;
    const STATE_VERSION: u32 = 1;

    fn save(&mut self) -> Result<I8042State, Self::Error> {
        Ok(I8042State {
            status: self.status,
            control: self.control,
            outport: self.outport,
            output: self.output,
            pending_write: self.pending_write,
        })
    }

    fn restore(&mut self, s: &I8042State) -> Result<(), Self::Error> {
        self.status = s.status;
        self.control = s.control;
        self.outport = s.outport;
        self.output = s.output;
        self.pending_write = s.pending_write;
        Ok(())
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let Some(b) = data.first_mut() else { return };
        *b = match offset {
            0 => self.output.take().unwrap_or(0),
            4 => {
                self.status
                    | if self.output.is_some() {
                        STATUS_OUTPUT_FULL
                    } else {
                        0
                    }
            }
            _ => 0,
        };
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        match offset {
            4 => self.command(b),
            0 => {
                self.status &= !STATUS_COMMAND;
                match self.pending_write.take() {
                    Some(CMD_WRITE_CTR) => self.control = b,
                    Some(CMD_WRITE_OUTPORT) => self.outport = b,
                    _ => {}
                }
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn self_test_control_register_and_reset() {
        let reset = EventFd::new(libc::EFD_NONBLOCK).expect("eventfd");
        let requested = Arc::new(AtomicBool::new(false));
        let mut kbd = I8042::new(ResetLine {
            requested: requested.clone(),
            wake: reset.try_clone().expect("clone"),
        });
        let mut b = [0u8];
        kbd.write(4, &[CMD_SELF_TEST]);
        kbd.read(4, &mut b);
        assert_eq!(b[0] & STATUS_OUTPUT_FULL, 1);
        kbd.read(0, &mut b);
        assert_eq!(b[0], 0x55);
        kbd.write(4, &[CMD_WRITE_CTR]);
        kbd.write(0, &[0x47]);
        kbd.write(4, &[CMD_READ_CTR]);
        kbd.read(0, &mut b);
        assert_eq!(b[0], 0x47);
        assert!(reset.read().is_err(), "no reset yet");
        assert!(!requested.load(Ordering::SeqCst));
        kbd.write(4, &[CMD_RESET_CPU]);
        assert_eq!(reset.read().expect("reset"), 1);
        assert!(
            requested.load(Ordering::SeqCst),
            "the writing vCPU can see it"
        );
    }

    fn controller() -> I8042 {
        I8042::new(ResetLine {
            requested: Arc::new(AtomicBool::new(false)),
            wake: EventFd::new(libc::EFD_NONBLOCK).expect("eventfd"),
        })
    }

    #[test]
    fn state_saved_mid_command_restores_into_a_fresh_controller() {
        let mut kbd = controller();
        kbd.write(4, &[CMD_WRITE_CTR]);
        kbd.write(0, &[0x47]);
        kbd.write(4, &[CMD_READ_CTR]);
        // Saved with a byte waiting for the guest and a command waiting for its data.
        kbd.write(4, &[CMD_WRITE_OUTPORT]);
        let saved = kbd.save().expect("save");
        let mut fresh = controller();
        fresh.restore(&saved).expect("restore");
        assert_eq!(fresh.save().expect("save again"), saved);
        let mut b = [0u8];
        fresh.read(0, &mut b);
        assert_eq!(b[0], 0x47, "the byte the guest had not read yet");
    }
}
