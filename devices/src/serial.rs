//! The 16550 UART at 0x3f8 (IRQ 4): the guest's console, output to stdout or a file.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};

use mcvmm_checkpoint::persist::Persist;
use serde::{Deserialize, Serialize};

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;

pub const PORT: u64 = 0x3f8;
pub const PORT_LEN: u64 = 8;
pub const IRQ: u32 = 4;

pub struct IrqTrigger(pub Arc<Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.raise()
    }
}

/// Writes to the data port that the guest made without an exit (KVM's coalesced port
/// I/O) and that the device has not seen yet. Booting, the kernel writes its log one byte
/// at a time, each byte a data-port write and a status read: two exits per byte, the
/// slowest part of a boot under nested KVM. Holding the writes halves that. A held write
/// raises no interrupt until it is replayed, so holding must stop before the guest relies
/// on the transmit interrupt (it enables it first).
pub trait HeldWrites: Send {
    /// Hands each write held since the last call to `write` (offset in the UART's range,
    /// byte), oldest first.
    fn replay(&mut self, write: &mut dyn FnMut(u8, u8));
    /// Stops holding: every later write exits; false if that failed (holding goes on).
    /// Writes held until then are replayed after.
    fn stop(&mut self) -> bool;
}

/// Interrupt enable register, and its transmit-holding-empty bit.
const IER: u8 = 1;
const IER_THRI: u8 = 0x02;
/// Line control's divisor latch bit: with it set, offsets 0 and 1 are the divisor.
const LCR_DLAB: u8 = 0x80;

/// The UART's registers and receive FIFO (what `vm_superio::SerialState` holds).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SerialState {
    pub baud_divisor_low: u8,
    pub baud_divisor_high: u8,
    pub interrupt_enable: u8,
    pub interrupt_identification: u8,
    pub line_control: u8,
    pub line_status: u8,
    pub modem_control: u8,
    pub modem_status: u8,
    pub scratch: u8,
    pub in_buffer: Vec<u8>,
}

#[derive(Debug, thiserror::Error)]
#[error("serial state: {0}")]
pub struct SerialError(String);

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
    held: Option<Box<dyn HeldWrites>>,
}

impl Serial {
    pub fn new(interrupt: Arc<Interrupt>, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: Uart::new(IrqTrigger(interrupt), out),
            held: None,
        }
    }

    /// Lets `held` hold the guest's data-port writes until the next access to the UART
    /// (any register), the next [`Serial::save`], or until the guest enables the transmit
    /// interrupt (then holding stops for good).
    pub fn hold_writes(&mut self, held: Box<dyn HeldWrites>) {
        self.held = Some(held);
    }

    /// Whether data-port writes are being held.
    pub fn holding(&self) -> bool {
        self.held.is_some()
    }

    /// Gives the device every held write, in order: done before anything reads or
    /// changes its registers, so the guest sees the same UART as without holding.
    fn replay_held(&mut self) {
        if let Some(held) = self.held.as_mut() {
            let uart = &mut self.uart;
            // An output error (a closed console) must not stop the guest.
            held.replay(&mut |off, b| {
                let _ = uart.write(off, b);
            });
        }
    }
}

impl Persist for Serial {
    type State = SerialState;
    type Error = SerialError;
    const STATE_VERSION: u32 = 1;

    /// The device's state, held writes included.
    fn save(&mut self) -> Result<SerialState, SerialError> {
        self.replay_held();
        let s = self.uart.state();
        Ok(SerialState {
            baud_divisor_low: s.baud_divisor_low,
            baud_divisor_high: s.baud_divisor_high,
            interrupt_enable: s.interrupt_enable,
            interrupt_identification: s.interrupt_identification,
            line_control: s.line_control,
            line_status: s.line_status,
            modem_control: s.modem_control,
            modem_status: s.modem_status,
            scratch: s.scratch,
            in_buffer: s.in_buffer,
        })
    }

    /// Continues from `state` with this device's interrupt and console. Writes held
    /// until now reach the console first: the guest made them before.
    fn restore(&mut self, state: &SerialState) -> Result<(), SerialError> {
        self.replay_held();
        let s = vm_superio::serial::SerialState {
            baud_divisor_low: state.baud_divisor_low,
            baud_divisor_high: state.baud_divisor_high,
            interrupt_enable: state.interrupt_enable,
            interrupt_identification: state.interrupt_identification,
            line_control: state.line_control,
            line_status: state.line_status,
            modem_control: state.modem_control,
            modem_status: state.modem_status,
            scratch: state.scratch,
            in_buffer: state.in_buffer.clone(),
        };
        let trigger = IrqTrigger(self.uart.interrupt_evt().0.clone());
        // Built with a stand-in console, so that a state the UART refuses (a FIFO over
        // its size) leaves this device and its console as they were.
        let mut uart = Uart::from_state(
            &s,
            trigger,
            NoEvents,
            Box::new(std::io::sink()) as Box<dyn Write + Send>,
        )
        .map_err(|e| SerialError(format!("{e:?}")))?;
        std::mem::swap(uart.writer_mut(), self.uart.writer_mut());
        self.uart = uart;
        Ok(())
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        self.replay_held();
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        self.replay_held();
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An output error (a closed console) must not stop the guest.
            let _ = self.uart.write(off, b);
            // Looked at only while holding: the state is a copy, FIFO included.
            let thri_on = self.held.is_some()
                && off == IER
                && b & IER_THRI != 0
                && self.uart.state().line_control & LCR_DLAB == 0;
            if thri_on && self.held.as_mut().is_some_and(|h| h.stop()) {
                self.replay_held();
                self.held = None;
            }
        }
    }
}

impl Drop for Serial {
    /// The last bytes the guest wrote (a panic message) reach the console.
    fn drop(&mut self) {
        self.replay_held();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::interrupt::CountingLine;
    use std::sync::Mutex;

    /// The console, as bytes.
    #[derive(Clone, Default)]
    struct Console(Arc<Mutex<Vec<u8>>>);

    impl Write for Console {
        fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
            self.0.lock().expect("console").extend_from_slice(b);
            Ok(b.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    impl Console {
        fn text(&self) -> String {
            String::from_utf8_lossy(&self.0.lock().expect("console")).into_owned()
        }
    }

    /// Writes held as KVM's ring would hold them; `stops` counts stop requests, and
    /// `refuse` makes them fail.
    #[derive(Clone, Default)]
    struct Ring {
        bytes: Arc<Mutex<Vec<u8>>>,
        stops: Arc<Mutex<u32>>,
        refuse: bool,
    }

    impl Ring {
        fn guest_writes(&self, s: &str) {
            self.bytes.lock().expect("ring").extend(s.bytes());
        }
    }

    impl HeldWrites for Ring {
        fn replay(&mut self, write: &mut dyn FnMut(u8, u8)) {
            for b in std::mem::take(&mut *self.bytes.lock().expect("ring")) {
                write(0, b);
            }
        }
        fn stop(&mut self) -> bool {
            *self.stops.lock().expect("stops") += 1;
            !self.refuse
        }
    }

    fn serial(ring: &Ring) -> (Serial, Console) {
        let console = Console::default();
        let interrupt = Arc::new(Interrupt::new(IRQ, Arc::new(CountingLine::default())));
        let mut s = Serial::new(interrupt, Box::new(console.clone()));
        s.hold_writes(Box::new(ring.clone()));
        (s, console)
    }

    const LSR: u64 = 5;

    #[test]
    fn held_writes_reach_the_console_before_any_other_access_and_at_save() {
        let ring = Ring::default();
        let (mut s, console) = serial(&ring);
        ring.guest_writes("boot ");
        assert_eq!(console.text(), "", "held until the UART is touched");
        let mut lsr = [0u8];
        s.read(LSR, &mut lsr);
        assert_eq!(console.text(), "boot ");
        // A write that exits (the ring was full) comes after what the ring holds.
        ring.guest_writes("lo");
        s.write(0, b"g");
        assert_eq!(console.text(), "boot log");
        ring.guest_writes("!");
        s.save().expect("save");
        assert_eq!(console.text(), "boot log!");
        ring.guest_writes("?");
        drop(s);
        assert_eq!(console.text(), "boot log!?", "the last bytes are not lost");
    }

    #[test]
    fn enabling_the_transmit_interrupt_stops_holding() {
        let ring = Ring::default();
        let (mut s, console) = serial(&ring);
        // With the divisor latch set, offset 1 is the divisor, not the interrupt enable.
        s.write(3, &[LCR_DLAB]);
        s.write(IER.into(), &[IER_THRI]);
        assert!(s.holding());
        s.write(3, &[0x03]);
        ring.guest_writes("a");
        s.write(IER.into(), &[IER_THRI]);
        assert!(!s.holding());
        assert_eq!(*ring.stops.lock().expect("stops"), 1);
        assert_eq!(console.text(), "a");
        ring.guest_writes("b");
        s.write(0, b"c");
        assert_eq!(
            console.text(),
            "ac",
            "nothing is replayed once holding stopped"
        );
    }

    #[test]
    fn holding_goes_on_when_it_cannot_stop() {
        let ring = Ring {
            refuse: true,
            ..Ring::default()
        };
        let (mut s, console) = serial(&ring);
        s.write(IER.into(), &[IER_THRI]);
        assert!(s.holding());
        ring.guest_writes("x");
        s.write(0, b"y");
        assert_eq!(console.text(), "xy");
    }

    /// A UART with its registers set as a driver leaves them: 115200 8N1, FIFO on,
    /// receive interrupt enabled, a scratch value.
    fn configured() -> (Serial, Console) {
        let (mut s, console) = serial(&Ring::default());
        s.write(3, &[LCR_DLAB | 0x03]);
        s.write(0, &[0x01]);
        s.write(1, &[0x00]);
        s.write(3, &[0x03]);
        s.write(IER.into(), &[0x01]);
        s.write(7, &[0x5a]);
        (s, console)
    }

    #[test]
    fn state_restores_into_a_fresh_uart_with_its_own_console() {
        let (mut s, _) = configured();
        let mut saved = s.save().expect("save");
        saved.in_buffer = b"typed".to_vec();
        let (mut fresh, console) = serial(&Ring::default());
        fresh.restore(&saved).expect("restore");
        assert_eq!(fresh.save().expect("save again"), saved);
        let mut b = [0u8];
        fresh.read(0, &mut b);
        assert_eq!(b[0], b't', "the input the guest had not read yet");
        fresh.write(0, b"k");
        assert_eq!(
            console.text(),
            "k",
            "output goes to the fresh device's console"
        );
    }

    #[test]
    fn a_state_the_uart_cannot_hold_is_refused_and_changes_nothing() {
        let (mut s, console) = configured();
        let before = s.save().expect("save");
        let mut bad = before.clone();
        bad.scratch = 0;
        bad.in_buffer = vec![0; 65];
        assert!(s.restore(&bad).is_err());
        assert_eq!(s.save().expect("save"), before);
        s.write(0, b"z");
        assert_eq!(console.text(), "z");
    }
}
