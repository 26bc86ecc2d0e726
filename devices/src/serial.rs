//! The 16550 UART at 0x3f8 (IRQ 4): the guest's console, output to stdout or a file.

use std::io::Write;
use std::sync::Arc;

use vm_superio::serial::NoEvents;
use vm_superio::{Serial as Uart, Trigger};

use mcvmm_checkpoint::state::SerialState;

use crate::bus::BusDevice;
use crate::interrupt::Interrupt;

pub const PORT: u64 = 0x3f8;
pub const PORT_LEN: u64 = 8;
pub const IRQ: u32 = 4;

pub struct IrqTrigger(pub Arc<Interrupt>);

impl Trigger for IrqTrigger {
    type E = std::io::Error;
    fn trigger(&self) -> std::io::Result<()> {
        self.0.irqfd.write(1)
    }
}

pub struct Serial {
    uart: Uart<IrqTrigger, NoEvents, Box<dyn Write + Send>>,
}

impl Serial {
    pub fn new(interrupt: Arc<Interrupt>, out: Box<dyn Write + Send>) -> Serial {
        Serial {
            uart: Uart::new(IrqTrigger(interrupt), out),
        }
    }

    /// A UART that continues from `state` (a restore).
    pub fn from_state(
        state: &SerialState,
        interrupt: Arc<Interrupt>,
        out: Box<dyn Write + Send>,
    ) -> Result<Serial, String> {
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
        let uart = Uart::from_state(&s, IrqTrigger(interrupt), NoEvents, out)
            .map_err(|e| format!("serial state: {e:?}"))?;
        Ok(Serial { uart })
    }

    pub fn save(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
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
        }
    }
}

impl BusDevice for Serial {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        if let (Some(b), Ok(off)) = (data.first_mut(), u8::try_from(offset)) {
            *b = self.uart.read(off);
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        if let (Some(&b), Ok(off)) = (data.first(), u8::try_from(offset)) {
            // An output error (a closed console) must not stop the guest.
            let _ = self.uart.write(off, b);
        }
    }
}
